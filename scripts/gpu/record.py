#!/usr/bin/env python3
"""The JSON bookkeeping of scripts/gpu-check.sh (standard library only).

    record.py check CHECKS_DIR NAME STATUS WALL_S [--reason TEXT] [--json FILE]... [KEY=VALUE]...
        writes CHECKS_DIR/NN-NAME.json: {"name", "status" (pass|fail|skip), "wall_s",
        "reason"?, ...}. Each --json FILE (a JSON object; a missing or broken file is
        noted, not fatal) is merged in under the key its file stem names, or under
        `--json KEY=FILE`'s KEY. KEY=VALUE pairs are added as numbers when they parse as
        numbers, as JSON when they start with { or [, else as strings.
    record.py report REPORT_JSON PREFIX [FIELD]...
        prints fields of a trustflow run or train report (_report.json; dotted paths,
        list indexes allowed) as PREFIXFIELD=VALUE lines (dots become _) for `check`.
    record.py summary CHECKS_DIR OUT_JSON KEY=VALUE...
        merges every check into OUT_JSON: {"pass": no check failed, "counts", "checks":
        [...], KEY: VALUE...}, and prints a one-line result per check; exits 0 when no
        check failed, 1 otherwise.
"""

import json
import sys
import time
from pathlib import Path


def typed(value):
    text = value.strip()
    if text[:1] in "{[":
        try:
            return json.loads(text)
        except ValueError:
            return value
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text in ("true", "false"):
        return text == "true"
    return value


def load_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        return {"unreadable": f"{path}: {e}"}


def cmd_check(args):
    folder, name, status, wall = Path(args[0]), args[1], args[2], args[3]
    entry = {"name": name, "status": status}
    try:
        entry["wall_s"] = round(float(wall), 3)
    except ValueError:
        entry["wall_s"] = None
    rest = args[4:]
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--reason" and i + 1 < len(rest):
            entry["reason"] = rest[i + 1]
            i += 2
            continue
        if arg == "--json" and i + 1 < len(rest):
            spec = rest[i + 1]
            key, _, file = spec.rpartition("=") if "=" in spec else ("", "", spec)
            entry[key or Path(file).stem] = load_json(file)
            i += 2
            continue
        key, sep, value = arg.partition("=")
        if sep:
            entry[key] = typed(value)
        i += 1
    folder.mkdir(parents=True, exist_ok=True)
    index = len(list(folder.glob("*.json")))
    (folder / f"{index:02d}-{name}.json").write_text(json.dumps(entry, indent=2, sort_keys=True) + "\n")
    return 0


def cmd_report(args):
    report = load_json(args[0])
    prefix = args[1] if len(args) > 1 else ""
    for field in args[2:]:
        value = report
        for part in field.split("."):
            if isinstance(value, list):
                try:
                    value = value[int(part)]
                except (ValueError, IndexError):
                    value = None
            elif isinstance(value, dict):
                value = value.get(part)
            else:
                value = None
        key = prefix + field.replace(".", "_")
        print(f"{key}={json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0


def cmd_summary(args):
    folder, out = Path(args[0]), Path(args[1])
    checks = []
    for path in sorted(folder.glob("*.json")):
        checks.append(load_json(path))
    counts = {}
    for c in checks:
        counts[c.get("status", "?")] = counts.get(c.get("status", "?"), 0) + 1
    summary = {"pass": bool(checks) and all(c.get("status") in ("pass", "skip") for c in checks),
               "counts": counts, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for arg in args[2:]:
        key, sep, value = arg.partition("=")
        if sep:
            summary[key] = typed(value)
    summary["checks"] = checks
    out.write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
    for c in checks:
        reason = f" ({c['reason']})" if c.get("reason") else ""
        print(f"  {c.get('status', '?'):4} {c.get('name')}: {c.get('wall_s')} s{reason}")
    print(f"gpu-check: {'PASS' if summary['pass'] else 'FAIL'} {counts} -> {out}")
    return 0 if summary["pass"] else 1


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in ("check", "report", "summary"):
        print(__doc__, file=sys.stderr)
        return 2
    return {"check": cmd_check, "report": cmd_report, "summary": cmd_summary}[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
