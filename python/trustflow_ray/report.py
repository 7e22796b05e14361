"""Merging the parts' run reports into one report for the whole job.

Pure functions over JSON-like dicts (no Ray), so they can be tested alone. The inputs:

* the plan (`trustflow plan`): the shards in index order, which fix which part owns a
  shard (index % N; the runner gives each part exactly those with `--shards`), and
  the shards found unreadable when planning (a part lists no shard but its own, so
  only the plan knows those of the whole source);
* one result per part: the report its last, successful attempt wrote (`RunReport` in
  crates/trustflow-engine/src/run.rs), with where it ran;
* the attempts the tracker saw (a retried part has several).

Per-shard counts come from the shards' manifests (a part's report lists a shard done
by an earlier, killed attempt as `skipped`, with the manifest's counts), so totals are
exact however often a part was retried. Per-step figures (rows through each stage,
busy seconds) only cover the work of the attempts that finished: what a killed
attempt did is lost with it, and the shards it finished are `skipped` in the report of
the attempt that completed the part.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional

STEP_SUMS = ("rows_in", "rows_out", "rows_quarantined", "batches", "busy_s")
STEP_WEIGHTED = ("busy_fraction", "blocked_fraction", "starved_fraction", "queue_fill_mean")
# The reason given for a shard the plan found unreadable (`trustflow plan` lists their
# paths only) when no part's report names it.
PLANNED_UNREADABLE = "unreadable when the job was planned (`trustflow plan`)"


def part_of(index: int, parts: int) -> int:
    return index % parts


def _add_numbers(into: Dict[str, Any], more: Dict[str, Any]) -> None:
    for key, value in more.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            into[key] = into.get(key, 0) + value


def merge_steps(reports: Iterable[Dict[str, Any]], wall_s: float) -> List[Dict[str, Any]]:
    """Per-step totals over the parts, in the pipeline's step order. Fractions are
    averaged with each part's wall time as weight; rows_per_s is over the job's wall."""
    merged: Dict[str, Dict[str, Any]] = {}
    order: List[str] = []
    weights: Dict[str, float] = {}
    for report in reports:
        part_wall = float(report.get("wall_s") or 0.0)
        for step in report.get("steps") or []:
            name = step.get("name", "?")
            if name not in merged:
                order.append(name)
                merged[name] = {"name": name, "workers": step.get("workers", 0), "parts": 0}
                merged[name].update({k: 0 for k in STEP_SUMS})
                merged[name].update({k: 0.0 for k in STEP_WEIGHTED})
                merged[name]["queue_fill_max"] = 0.0
                weights[name] = 0.0
            m = merged[name]
            m["parts"] += 1
            m["workers"] = max(m["workers"], step.get("workers", 0))
            for k in STEP_SUMS:
                m[k] += step.get(k, 0) or 0
            for k in STEP_WEIGHTED:
                m[k] += (step.get(k, 0.0) or 0.0) * part_wall
            m["queue_fill_max"] = max(m["queue_fill_max"], step.get("queue_fill_max", 0.0) or 0.0)
            weights[name] += part_wall
    out = []
    for name in order:
        m = merged[name]
        w = weights[name]
        for k in STEP_WEIGHTED:
            m[k] = m[k] / w if w > 0 else 0.0
        m["rows_per_s"] = m["rows_out"] / wall_s if wall_s > 0 else 0.0
        out.append(m)
    return out


def merge(
    plan: Dict[str, Any],
    parts: int,
    results: Dict[int, Dict[str, Any]],
    failures: Dict[int, str],
    attempts: Dict[int, List[Dict[str, Any]]],
    wall_s: float,
    report_path: Optional[str] = None,
    extra: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """The job's report. `results[part]` is a task's return value (with `report`, the
    part's parsed run report); `failures[part]` the error of a part whose retries ran
    out; `attempts[part]` what the tracker recorded for each attempt."""
    planned = plan.get("shards") or []
    index_of_stem = {s["stem"]: s["index"] for s in planned}
    problems: List[str] = []

    shards: List[Dict[str, Any]] = []
    seen: Dict[str, int] = {}
    unreadable: List[Dict[str, Any]] = []
    unreadable_seen = set()
    storage: Dict[str, Any] = {}
    part_summaries = []
    reports = []
    for part in sorted(results):
        result = results[part]
        report = result["report"]
        reports.append(report)
        if report.get("pipeline_hash") != plan.get("pipeline_hash"):
            problems.append(
                f"part {part}: pipeline hash {report.get('pipeline_hash')} differs from the "
                f"plan's {plan.get('pipeline_hash')} (pipeline, models or binary changed "
                "between planning and the run, or differ between nodes)"
            )
        for shard in report.get("shards") or []:
            stem = shard.get("stem")
            index = index_of_stem.get(stem)
            if index is None:
                problems.append(f"part {part}: shard {stem} is not in the plan")
            elif part_of(index, parts) != part:
                problems.append(
                    f"part {part}: shard {stem} (index {index}) belongs to part "
                    f"{part_of(index, parts)}"
                )
            if stem in seen:
                problems.append(f"shard {stem} reported by parts {seen[stem]} and {part}")
                continue
            seen[stem] = part
            shards.append(dict(shard, index=index, part=part))
        for u in report.get("unreadable") or []:
            key = u.get("input")
            if key not in unreadable_seen:
                unreadable_seen.add(key)
                unreadable.append(u)
        if report.get("storage"):
            _add_numbers(storage, report["storage"])
        part_summaries.append(
            {
                "part": part,
                "node_id": result.get("node_id"),
                "host": result.get("host"),
                "node_ip": result.get("node_ip"),
                "attempt": result.get("attempt"),
                "exit_code": result.get("exit_code"),
                "shards_given": result.get("shards_given"),
                "task_wall_s": result.get("task_wall_s"),
                "wall_s": report.get("wall_s"),
                "rows_in": report.get("rows_in"),
                "rows_out": report.get("rows_out"),
                "rows_quarantined": report.get("rows_quarantined"),
                "shards_processed": report.get("shards_processed"),
                "shards_skipped": report.get("shards_skipped"),
                "rows_per_s": report.get("rows_per_s"),
                "peak_rss_bytes": report.get("peak_rss_bytes"),
                "storage": report.get("storage"),
            }
        )
    shards.sort(key=lambda s: (s["index"] is None, s["index"] or 0))
    for u in plan.get("unreadable") or []:
        entry = dict(u) if isinstance(u, dict) else {"input": u, "reason": PLANNED_UNREADABLE}
        if entry.get("input") not in unreadable_seen:
            unreadable_seen.add(entry.get("input"))
            unreadable.append(entry)

    unreadable_inputs = {str(u.get("input")) for u in unreadable}
    missing = [
        s["stem"]
        for s in planned
        if s["stem"] not in seen
        and str(s["input"]) not in unreadable_inputs
        and part_of(s["index"], parts) not in failures
    ]
    if missing:
        problems.append(f"{len(missing)} planned shard(s) in no part's report: {missing[:10]}")

    totals = {"rows_in": 0, "rows_out": 0, "rows_quarantined": 0}
    reasons: Dict[str, int] = {}
    for s in shards:
        for k in totals:
            totals[k] += s.get(k, 0) or 0
        for k, v in (s.get("quarantine_reasons") or {}).items():
            reasons[k] = reasons.get(k, 0) + v
    invariant = (
        all(s.get("invariant_holds", False) for s in shards)
        and totals["rows_in"] == totals["rows_out"] + totals["rows_quarantined"]
    )
    processed_rows = sum(s.get("rows_in", 0) or 0 for s in shards if s.get("status") == "done")

    attempt_list = []
    for part in sorted(attempts):
        for a in attempts[part]:
            attempt_list.append(dict(a, part=part))
    retries = sum(max(0, len(a) - 1) for a in attempts.values())

    out: Dict[str, Any] = {
        "runner": "trustflow_ray",
        "pipeline": plan.get("pipeline"),
        "pipeline_file": plan.get("pipeline_file"),
        "pipeline_hash": plan.get("pipeline_hash"),
        "out_dir": plan.get("out_dir"),
        "report": report_path,
        "parts": parts,
        "parts_ok": len(results),
        "parts_failed": [{"part": p, "error": failures[p]} for p in sorted(failures)],
        "complete": not failures and not problems,
        "shards_planned": len(planned),
        "wall_s": wall_s,
        "rows_in": totals["rows_in"],
        "rows_out": totals["rows_out"],
        "rows_quarantined": totals["rows_quarantined"],
        "invariant_holds": invariant,
        "shards_processed": sum(1 for s in shards if s.get("status") == "done"),
        "shards_skipped": sum(1 for s in shards if s.get("status") == "skipped"),
        "unreadable": unreadable,
        "rows_per_s": processed_rows / wall_s if wall_s > 0 else 0.0,
        "retries": retries,
        "attempts": attempt_list,
        "problems": problems,
        "steps": merge_steps(reports, wall_s),
        "quarantine_reasons": dict(sorted(reasons.items())),
        "shards": shards,
        "part_reports": part_summaries,
    }
    if storage:
        out["storage"] = storage
    if extra:
        out.update(extra)
    return out
