"""The driver and the Ray tasks: plan once, run N parts, merge their reports.

The engine does the hard part: `trustflow run --part I/N` processes the shards with
index % N == I, and per-shard manifests in the output folder make every shard's
outputs appear exactly once, however often a part is started. This module only
schedules the parts on Ray (one task per part, with the pipeline's thread budget as
its CPUs), retries them, keeps their `trustflow` child from outliving them, and
merges what they report.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

from . import child as childproc
from . import report as reportlib

# Forwarded to every task by default (runtime_env env_vars) when set on the driver:
# where the native libraries are and which store to talk to. Secrets are not in this
# list: give them to the nodes (`ray start` environment, instance roles, a profile), or
# pass `--env AWS_ACCESS_KEY_ID --env AWS_SECRET_ACCESS_KEY` knowing that a job's
# runtime environment is stored in the cluster's GCS and shown by the dashboard.
DEFAULT_FORWARD = (
    "ORT_DYLIB_PATH",
    "LD_LIBRARY_PATH",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_PROFILE",
    "TRUSTFLOW_MINILM_DIR",
    "TRUSTFLOW_MINILM_TOKENIZER",
)

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class PartFailed(Exception):
    """A part's trustflow exited with an error; Ray retries the task."""


class NodeSetupError(Exception):
    """The binary or its native libraries are missing or broken on a node; not
    retried (the node needs fixing, see docs/ray.md)."""


class JobError(Exception):
    """The job cannot start (planning, preflight, cluster)."""


def log(message: str) -> None:
    print(f"trustflow-ray: {message}", file=sys.stderr, flush=True)


def is_remote(uri: str) -> bool:
    return "://" in uri


def absolute(uri: str) -> str:
    """Workers do not share the driver's working directory: local paths go absolute."""
    return uri if is_remote(uri) else os.path.abspath(uri)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def node_context() -> Dict[str, Any]:
    import ray

    try:
        ip = ray.util.get_node_ip_address()
    except Exception:  # pragma: no cover (best effort)
        ip = "?"
    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ip,
        "host": socket.gethostname(),
        "worker_pid": os.getpid(),
    }


def where(ctx: Dict[str, Any]) -> str:
    return f"node {ctx['node_ip']} ({ctx['host']}, id {str(ctx['node_id'])[:12]})"


# ---------------------------------------------------------------- in the cluster


class Tracker:
    """Attempts of every part, as the tasks report them (a Ray actor on the driver's
    node). A worker killed mid-task leaves its attempt `running`; the next attempt of
    the part shows Ray retried it."""

    def __init__(self):
        self.attempts: Dict[int, List[Dict[str, Any]]] = {}

    def started(self, part: int, info: Dict[str, Any]) -> int:
        entries = self.attempts.setdefault(part, [])
        for e in entries:
            if e["outcome"] == "running":
                e["outcome"] = "lost"
                e["error"] = "no result: its worker or node died (Ray retried the task)"
        entries.append(dict(info, attempt=len(entries) + 1, outcome="running", error=None,
                            child_pid=None, started_at=time.time()))
        return len(entries)

    def child(self, part: int, attempt: int, pid: int) -> None:
        self.attempts[part][attempt - 1]["child_pid"] = pid

    def finished(self, part: int, attempt: int, outcome: str, error: Optional[str],
                 rows_in: int = 0) -> None:
        e = self.attempts[part][attempt - 1]
        e.update(outcome=outcome, error=error, rows_in=rows_in, ended_at=time.time())

    def snapshot(self) -> Dict[int, List[Dict[str, Any]]]:
        return self.attempts

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


def _tell(call, wait: bool = False, timeout: float = 30.0):
    """Tracker calls are best effort: a lost tracker must not fail a part."""
    import ray

    try:
        return ray.get(call, timeout=timeout) if wait else call
    except Exception as e:
        if os.environ.get("TRUSTFLOW_RAY_DEBUG"):
            log(f"tracker call failed: {type(e).__name__}: {e}")
        return None


def run_part(spec: Dict[str, Any], part: int, tracker) -> Dict[str, Any]:
    """One Ray task: `trustflow run ... --part part/N --quiet --report LOCAL`, its report
    returned to the driver (so nothing but outputs and manifests lands in the output
    folder, and an s3:// output needs no client here)."""
    ctx = node_context()
    n = spec["parts"]
    attempt = _tell(tracker.started.remote(part, ctx), wait=True) if tracker else None
    tmp = tempfile.mkdtemp(prefix=f"trustflow-ray-part-{part}-of-{n}-")
    report_path = os.path.join(tmp, "report.json")
    stdout_path = os.path.join(tmp, "stdout.txt")
    stderr_path = os.path.join(tmp, "stderr.txt")
    argv = [spec["binary"], "run", spec["pipeline"], *spec["overrides"],
            "--part", f"{part}/{n}", "--quiet", "--report", report_path]
    started = time.monotonic()

    def on_start(pid):
        if tracker is not None and attempt is not None:
            _tell(tracker.child.remote(part, attempt, pid))

    try:
        try:
            code = childproc.run_tied(argv, stdout_path, stderr_path, on_start=on_start)
        except (FileNotFoundError, PermissionError) as e:
            raise NodeSetupError(
                f"{where(ctx)}: cannot start the trustflow binary {spec['binary']!r}: {e}. "
                "Install it at the same path on every node or pass --binary (docs/ray.md)."
            ) from None
        err = childproc.tail(stderr_path)
        if code in (0, 3):
            try:
                with open(report_path, encoding="utf-8") as f:
                    text = f.read()
                report = json.loads(text)
            except (OSError, ValueError) as e:
                raise PartFailed(
                    f"part {part}/{n} on {where(ctx)}: trustflow exited with "
                    f"{describe_exit(code)} but its report {report_path} is unreadable: {e}"
                ) from None
            result = dict(ctx, part=part, attempt=attempt, exit_code=code,
                          task_wall_s=time.monotonic() - started, report=report)
            if tracker is not None and attempt is not None:
                _tell(tracker.finished.remote(part, attempt, "ok", None, report.get("rows_in", 0)),
                      wait=True)
            return result
        if code == 127 or "error while loading shared libraries" in err:
            raise NodeSetupError(
                f"{where(ctx)}: the trustflow binary {spec['binary']!r} cannot start "
                f"({describe_exit(code)}): {err.strip()[-1500:]} -- the native libraries "
                "are missing on this node (docs/ray.md, 'Getting the binary to the nodes')."
            )
        raise PartFailed(
            f"part {part}/{n} on {where(ctx)}: trustflow exited with {describe_exit(code)}: "
            f"{err.strip()[-2000:]}"
        )
    except BaseException as e:
        if tracker is not None and attempt is not None:
            _tell(tracker.finished.remote(part, attempt, "failed",
                                          f"{type(e).__name__}: {str(e)[:2000]}"), wait=True,
                  timeout=5.0)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def preflight_node(binary: str, pipeline: str) -> Dict[str, Any]:
    """What a node lacks to run parts: the binary, its shared libraries (libtorch for
    the full binary), ONNX Runtime at ORT_DYLIB_PATH, the pipeline file."""
    ctx = node_context()
    problems: List[str] = []
    warnings: List[str] = []
    version = None
    found = binary if "/" in binary else shutil.which(binary)
    if not found or not os.path.isfile(found):
        problems.append(f"trustflow binary {binary!r} not found"
                        + ("" if "/" in binary else f" on PATH={os.environ.get('PATH', '')}"))
    elif not os.access(found, os.X_OK):
        problems.append(f"trustflow binary {found} is not executable")
    else:
        try:
            p = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=60)
            if p.returncode == 0:
                version = p.stdout.strip()
            else:
                problems.append(f"`{found} --version` failed ({describe_exit(p.returncode)}): "
                                f"{(p.stderr or p.stdout).strip()[-1500:]}")
        except (OSError, subprocess.TimeoutExpired) as e:
            problems.append(f"`{found} --version` failed: {e}")
    ort = os.environ.get("ORT_DYLIB_PATH")
    if ort:
        if not os.path.isfile(ort):
            problems.append(f"ORT_DYLIB_PATH={ort} does not exist (ONNX Runtime, needed by "
                            "the model stages)")
    else:
        warnings.append("ORT_DYLIB_PATH is not set: model stages (caption, pseudo_label, "
                        "clip_score) would fail here")
    if not is_remote(pipeline) and not os.path.isfile(pipeline):
        problems.append(f"pipeline file {pipeline} not found (nodes need the same path: a "
                        "shared file system or the same checkout)")
    return dict(ctx, version=version, problems=problems, warnings=warnings)


# ---------------------------------------------------------------- on the driver


def resolve_binary(binary: Optional[str]) -> str:
    name = binary or os.environ.get("TRUSTFLOW_BIN") or "trustflow"
    if "/" in name:
        return os.path.abspath(name)
    return name


def plan_job(binary: str, pipeline: str, overrides: Sequence[str]) -> Dict[str, Any]:
    local = binary if "/" in binary else shutil.which(binary)
    if not local or not os.path.isfile(local):
        raise JobError(f"trustflow binary {binary!r} not found on the driver (PATH or --binary)")
    try:
        p = subprocess.run([local, "plan", pipeline, *overrides], capture_output=True, text=True)
    except OSError as e:
        raise JobError(f"cannot run {local}: {e}") from None
    if p.returncode != 0:
        raise JobError(f"`trustflow plan` failed ({describe_exit(p.returncode)}):\n"
                       f"{(p.stderr or p.stdout).strip()}")
    try:
        return json.loads(p.stdout)
    except ValueError:
        raise JobError(f"`trustflow plan` printed no JSON (is {local} older than the "
                       f"`plan` verb?):\n{p.stdout[:500]}{p.stderr[:500]}") from None


def alive_nodes() -> List[Dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def choose_parts(shards: int, nodes: List[Dict[str, Any]], num_cpus: float,
                 factor: int = 3) -> int:
    """A few parts per task slot (so a slow or retried part does not leave the others
    idle at the end), never more than the shards."""
    slots = 0
    for n in nodes:
        cpus = n.get("Resources", {}).get("CPU", 0)
        slots += int(cpus // num_cpus) if num_cpus > 0 else int(cpus)
    return max(1, min(shards, factor * max(1, slots)))


def run_preflight(binary: str, pipeline: str, nodes: List[Dict[str, Any]],
                  timeout_s: float = 120.0) -> List[Dict[str, Any]]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    check = ray.remote(preflight_node)
    refs = {}
    for n in nodes:
        strategy = NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False)
        refs[n["NodeID"]] = check.options(num_cpus=0, max_retries=0,
                                          scheduling_strategy=strategy).remote(binary, pipeline)
    results = []
    deadline = time.monotonic() + timeout_s
    for node_id, ref in refs.items():
        try:
            results.append(ray.get(ref, timeout=max(1.0, deadline - time.monotonic())))
        except Exception as e:  # the node went away, or did not answer in time
            results.append({"node_id": node_id, "node_ip": "?", "host": "?", "version": None,
                            "problems": [f"preflight did not complete: {type(e).__name__}: "
                                         f"{str(e)[:500]}"], "warnings": []})
    return results


def _progress(done: int, parts: int, running: int, rows_done: int, rows_total: int,
              retries: int, elapsed: float) -> str:
    rate = rows_done / elapsed if elapsed > 0 else 0.0
    return (f"{done}/{parts} parts done, {running} running, {rows_done}/{rows_total} rows, "
            f"{rate:.0f} rows/s, {retries} retr{'y' if retries == 1 else 'ies'}, {elapsed:.1f} s")


def run_job(args) -> int:
    import ray

    t0 = time.monotonic()
    quiet = args.quiet
    binary = resolve_binary(args.binary)
    pipeline = absolute(args.pipeline)
    overrides: List[str] = []
    for uri in args.input or []:
        overrides += ["--input", absolute(uri)]
    if args.out:
        overrides += ["--out", absolute(args.out)]

    plan = plan_job(binary, pipeline, overrides)
    shards = plan.get("shards") or []
    rows_total = sum(int(s.get("rows") or 0) for s in shards)
    if not quiet:
        log(f"plan: {len(shards)} shard(s), {rows_total} rows, {len(plan.get('unreadable') or [])}"
            f" unreadable, threads {plan.get('threads')}, cuda {plan.get('uses_cuda')}, out "
            f"{plan.get('out_dir')} ({time.monotonic() - t0:.1f} s)")

    env_vars = {}
    for name in list(DEFAULT_FORWARD) + list(args.env or []):
        if name in os.environ:
            env_vars[name] = os.environ[name]
    runtime_env: Dict[str, Any] = {"env_vars": env_vars}
    if not args.no_ship_package:
        runtime_env["py_modules"] = [PACKAGE_DIR]
    init_kwargs: Dict[str, Any] = {"runtime_env": runtime_env, "log_to_driver": False,
                                   "logging_level": logging.WARNING}
    if args.address:
        init_kwargs["address"] = args.address
    ray.init(**init_kwargs)
    try:
        return _run_on_cluster(args, plan, binary, pipeline, overrides, rows_total, t0)
    finally:
        ray.shutdown()


def _run_on_cluster(args, plan, binary, pipeline, overrides, rows_total, t0) -> int:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    quiet = args.quiet
    shards = plan.get("shards") or []
    nodes = [n for n in alive_nodes() if n.get("Resources", {}).get("CPU", 0) > 0]
    if not nodes:
        raise JobError("the Ray cluster has no node with CPUs")
    if not quiet:
        log(f"cluster: {len(nodes)} node(s), "
            f"{sum(n['Resources'].get('CPU', 0) for n in nodes):g} CPU(s), "
            f"{sum(n['Resources'].get('GPU', 0) for n in nodes):g} GPU(s)")

    if not args.no_preflight:
        checks = run_preflight(binary, pipeline, nodes)
        bad = [c for c in checks if c["problems"]]
        versions = {c["version"] for c in checks if c.get("version")}
        for c in checks:
            for w in c.get("warnings") or []:
                if not quiet:
                    log(f"warning: {where(c)}: {w}")
        if len(versions) > 1:
            log(f"warning: nodes run different trustflow versions: {sorted(versions)}")
        if bad:
            lines = [f"  {where(c)}: " + "; ".join(c["problems"]) for c in bad]
            raise JobError(f"{len(bad)} of {len(checks)} node(s) cannot run trustflow:\n"
                           + "\n".join(lines))
        if not quiet:
            log(f"preflight: {len(checks)} node(s) ok ({', '.join(sorted(versions)) or '?'})")

    max_node_cpus = max(n["Resources"].get("CPU", 0) for n in nodes)
    num_cpus = args.num_cpus if args.num_cpus is not None else float(plan.get("threads") or 1)
    if num_cpus > max_node_cpus:
        if not quiet:
            log(f"a part wants {num_cpus:g} CPUs but the largest node has {max_node_cpus:g}: "
                f"asking for {max_node_cpus:g}")
        num_cpus = max_node_cpus
    num_gpus = args.num_gpus if args.num_gpus is not None else (1 if plan.get("uses_cuda") else 0)
    parts = args.parts or choose_parts(len(shards), nodes, num_cpus)
    if shards and parts > len(shards):
        if not quiet:
            log(f"--parts {parts} > {len(shards)} shards: using {len(shards)}")
        parts = len(shards)
    parts = max(1, parts)
    if not quiet:
        log(f"{parts} part(s), each {num_cpus:g} CPU(s) and {num_gpus:g} GPU(s), "
            f"max_retries {args.max_retries}")

    # The tracker lives on the head node (losing the head loses the cluster anyway),
    # else on the driver's.
    heads = [n["NodeID"] for n in alive_nodes()
             if "node:__internal_head__" in n.get("Resources", {})]
    tracker_node = heads[0] if heads else ray.get_runtime_context().get_node_id()
    tracker = ray.remote(Tracker).options(
        num_cpus=0, max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=tracker_node,
                                                           soft=not heads),
    ).remote()
    task = ray.remote(run_part).options(
        num_cpus=num_cpus, num_gpus=num_gpus, max_retries=args.max_retries,
        retry_exceptions=[PartFailed],
    )
    if os.environ.get("TRUSTFLOW_RAY_DEBUG"):
        log(f"tracker on node {_tell(tracker.node.remote(), wait=True)} (asked {tracker_node})")
    spec = {"binary": binary, "pipeline": pipeline, "overrides": overrides, "parts": parts}
    t_submit = time.monotonic()
    refs = {task.remote(spec, i, tracker): i for i in range(parts)}
    pending = list(refs)
    results: Dict[int, Dict[str, Any]] = {}
    failures: Dict[int, str] = {}
    setup_errors: List[str] = []
    rows_done = 0
    last_line = 0.0

    # A signal is also remembered, not only raised: Ray can swallow the
    # KeyboardInterrupt raised inside its own calls (a SIGINT during ray.wait was lost
    # that way, and the job ran to completion).
    signals: List[int] = []

    def on_signal(signum, frame):
        signals.append(signum)
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while pending or signals:
            if signals:
                raise KeyboardInterrupt
            ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in ready:
                part = refs[ref]
                try:
                    result = ray.get(ref)
                    results[part] = result
                    rows_done += int(result["report"].get("rows_in") or 0)
                except Exception as e:  # retries exhausted, or not retryable
                    text = _error_text(e)
                    failures[part] = text
                    if "NodeSetupError" in text:
                        setup_errors.append(text)
                    log(f"part {part}/{parts} failed: {text[:3000]}")
            now = time.monotonic()
            if not quiet and (ready or now - last_line >= 2.0):
                snap = _tell(tracker.snapshot.remote(), wait=True, timeout=5.0) or {}
                running = sum(1 for a in snap.values() if a and a[-1]["outcome"] == "running")
                retries = sum(max(0, len(a) - 1) for a in snap.values())
                log(_progress(len(results) + len(failures), parts, running, rows_done,
                              rows_total, retries, now - t_submit))
                last_line = now
    except KeyboardInterrupt:
        log("interrupted: cancelling the parts (finished shards are kept; a rerun resumes)")
        for ref in pending:
            try:
                ray.cancel(ref)
            except Exception:
                pass
        time.sleep(2.0)
        return 130
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    wall_s = time.monotonic() - t0
    attempts = _tell(tracker.snapshot.remote(), wait=True, timeout=30.0) or {}
    attempts = {int(k): v for k, v in attempts.items()}
    for part, entries in attempts.items():
        for e in entries:
            if e["outcome"] == "running" and part in results:
                e["outcome"] = "lost"
                e["error"] = "no result: its worker or node died (Ray retried the task)"
    report_path = args.report or (
        os.path.join(plan["out_dir"], "_report.json") if not is_remote(str(plan["out_dir"]))
        else os.path.abspath("trustflow-ray-report.json"))
    merged = reportlib.merge(
        plan, parts, results, failures, attempts, wall_s, report_path,
        extra={
            "submit_to_done_s": time.monotonic() - t_submit,
            "resources_per_part": {"num_cpus": num_cpus, "num_gpus": num_gpus},
            "max_retries": args.max_retries,
            "nodes": len(nodes),
        },
    )
    os.makedirs(os.path.dirname(report_path) or ".", exist_ok=True)
    tmp = report_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(merged, f, indent=2)
        f.write("\n")
    os.replace(tmp, report_path)

    status = "complete" if merged["complete"] else "INCOMPLETE"
    log(f"{status}: {merged['shards_processed']} shard(s) processed, "
        f"{merged['shards_skipped']} skipped, {len(merged['unreadable'])} unreadable; "
        f"{merged['rows_in']} in, {merged['rows_out']} out, {merged['rows_quarantined']} "
        f"quarantined; invariant {'holds' if merged['invariant_holds'] else 'BROKEN'}; "
        f"{parts} parts, {merged['retries']} retries; {wall_s:.1f} s, "
        f"{merged['rows_per_s']:.0f} rows/s; report {report_path}")
    for p in merged["problems"]:
        log(f"problem: {p}")
    if failures or merged["problems"]:
        if setup_errors:
            log("a node cannot run trustflow: see docs/ray.md, 'Getting the binary to the nodes'")
        return 1
    return 3 if merged["unreadable"] else 0


def _error_text(e: BaseException) -> str:
    """The root error of a Ray task failure, with its type name."""
    cause = getattr(e, "cause", None)
    if cause is not None and cause is not e:
        return f"{type(cause).__name__}: {cause}"
    return f"{type(e).__name__}: {e}"
