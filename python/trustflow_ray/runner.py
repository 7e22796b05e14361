"""The driver and the Ray tasks: plan once, run N parts, merge their reports.

The engine does the hard part: `trustflow run --shards FILE` processes the shards FILE
lists (those of one part), and per-shard manifests in the output folder make every
shard's outputs appear exactly once, however often a part is started. This module only
plans the job once (`trustflow plan`), gives each Ray task its part's shards (index %
N == I, as `--part I/N` would pick them, but without listing the source again),
schedules the parts (one task per part, with the pipeline's thread budget as its
CPUs), retries them, keeps their `trustflow` child from outliving them, and merges
what they report.
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
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import child as childproc
from . import shipping
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

# `trustflow run`'s exit codes.
EXIT_OK = 0
EXIT_REFUSED = 2  # a command line it refuses: a usage error, or a shard list planned
#                   for another pipeline (hashes differ); running it again cannot help
EXIT_INCOMPLETE = 3  # done, but some input shards were unreadable
EXIT_CANNOT_START = 127  # the shell's "command not found" (or a missing library)
EXIT_INTERRUPTED = 130

# Default parts per task slot (see choose_parts).
PARTS_PER_SLOT = 3
# How long the preflight waits for all nodes, and one `trustflow` probe on a node.
PREFLIGHT_TIMEOUT_S = 120.0
PROBE_TIMEOUT_S = 60.0
# Tracker calls: the usual wait, and the short one where the driver must not hang
# (a progress line, a failing task, an interrupt).
TRACKER_TIMEOUT_S = 30.0
TRACKER_QUICK_S = 5.0
# The driver's wait loop wakes this often to see a signal, and prints a progress line
# at least this often.
WAIT_POLL_S = 1.0
PROGRESS_EVERY_S = 2.0
# After an interrupt, how long the driver gives the cancelled parts to stop their
# child cleanly (SIGTERM, then SIGKILL after the child's grace) before it disconnects.
CANCEL_GRACE_S = childproc.KILL_GRACE_S + 2.0
CANCEL_POLL_S = 0.1
# How much of an error text is kept: a child's stderr in a task error, a loader error,
# an error in the tracker, a failed part in the driver's log, `plan`'s output.
STDERR_TAIL_CHARS = 2000
LOADER_TAIL_CHARS = 1500
TRACKER_ERROR_CHARS = 2000
LOGGED_ERROR_CHARS = 3000
PLAN_OUTPUT_CHARS = 500


class PartFailed(Exception):
    """A part's trustflow exited with an error; Ray retries the task."""


class PartRefused(Exception):
    """trustflow refused the part's command line (exit code 2): the pipeline changed
    since the plan, or the binary is older than `--shards`; not retried."""


class NodeSetupError(Exception):
    """The binary or its native libraries are missing or broken on a node; not
    retried (the node needs fixing, see docs/ray.md)."""


class ConnectTimeout(Exception):
    """`ray.init` did not connect in time; the process must exit without waiting for
    Ray's own threads, which keep retrying."""


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


def part_shards(shards: Sequence[Dict[str, Any]], parts: int) -> List[List[Dict[str, Any]]]:
    """The shard list of each part: the plan's shards with index % parts == part (the
    assignment `--part I/N` makes, which report.py checks), in the plan's order, as
    the plan gives them (`index`, `input`, `stem`, `rows`). The lists share the plan's
    entries: the driver holds each shard once, however many parts."""
    lists: List[List[Dict[str, Any]]] = [[] for _ in range(parts)]
    for s in shards:
        lists[reportlib.part_of(int(s["index"]), parts)].append(s)
    return lists


def part_overrides(overrides: Sequence[str]) -> List[str]:
    """The plan's overrides a part repeats: `--out` (its inputs are its shard list;
    `trustflow run` takes `--input` or `--shards`, not both)."""
    kept: List[str] = []
    for flag, value in zip(overrides[::2], overrides[1::2]):
        if flag != "--input":
            kept += [flag, value]
    return kept


def shard_list(pipeline_hash: str, part: int, parts: int,
               shards: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The JSON `trustflow run --shards FILE` reads."""
    return {"pipeline_hash": pipeline_hash, "part": [part, parts], "shards": shards}


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


def _tell(call, wait: bool = False, timeout: float = TRACKER_TIMEOUT_S):
    """Tracker calls are best effort: a lost tracker must not fail a part."""
    import ray

    try:
        return ray.get(call, timeout=timeout) if wait else call
    except Exception as e:
        if os.environ.get("TRUSTFLOW_RAY_DEBUG"):
            log(f"tracker call failed: {type(e).__name__}: {e}")
        return None


def part_argv(spec: Dict[str, Any], shards_path: str, report_path: str) -> List[str]:
    """What a part runs: the pipeline, `--out` if the job has one, the part's shard
    list."""
    return [spec["binary"], "run", spec["pipeline"], *spec["overrides"],
            "--shards", shards_path, "--quiet", "--report", report_path]


def run_part(spec: Dict[str, Any], part: int, shards: List[Dict[str, Any]],
             tracker) -> Dict[str, Any]:
    """One Ray task: `trustflow run ... --shards LIST --quiet --report LOCAL`, where
    LIST holds `shards` (this part's, from the driver's plan) and the report comes
    back to the driver as the return value (so nothing but outputs and manifests
    lands in the output folder, and an s3:// output needs no client here)."""
    ctx = node_context()
    n = spec["parts"]
    attempt = _tell(tracker.started.remote(part, ctx), wait=True) if tracker else None
    tmp = tempfile.mkdtemp(prefix=f"trustflow-ray-part-{part}-of-{n}-")
    report_path = os.path.join(tmp, "report.json")
    shards_path = os.path.join(tmp, "shards.json")
    stdout_path = os.path.join(tmp, "stdout.txt")
    stderr_path = os.path.join(tmp, "stderr.txt")
    started = time.monotonic()

    def on_start(pid):
        if tracker is not None and attempt is not None:
            _tell(tracker.child.remote(part, attempt, pid))

    try:
        with open(shards_path, "w", encoding="utf-8") as f:
            json.dump(shard_list(spec["pipeline_hash"], part, n, shards), f)
        try:
            exe, _ = shipping.resolve(spec["binary"])
            code = childproc.run_tied(part_argv(dict(spec, binary=exe), shards_path,
                                                report_path),
                                      stdout_path, stderr_path, on_start=on_start)
        except (FileNotFoundError, PermissionError) as e:
            raise NodeSetupError(
                f"{where(ctx)}: cannot start the trustflow binary {spec['binary']!r}: {e}. "
                "Install it at the same path on every node or pass --binary (docs/ray.md)."
            ) from None
        if code not in (EXIT_OK, EXIT_INCOMPLETE):
            raise part_error(spec, part, ctx, code, childproc.tail(stderr_path))
        report = _read_part_report(report_path, part, n, ctx, code)
        if tracker is not None and attempt is not None:
            _tell(tracker.finished.remote(part, attempt, "ok", None, report.get("rows_in", 0)),
                  wait=True)
        return dict(ctx, part=part, attempt=attempt, exit_code=code, shards_given=len(shards),
                    task_wall_s=time.monotonic() - started, report=report)
    except BaseException as e:
        if tracker is not None and attempt is not None:
            _tell(tracker.finished.remote(part, attempt, "failed",
                                          f"{type(e).__name__}: {str(e)[:TRACKER_ERROR_CHARS]}"),
                  wait=True, timeout=TRACKER_QUICK_S)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_part_report(path: str, part: int, n: int, ctx: Dict[str, Any],
                      code: int) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.loads(f.read())
    except (OSError, ValueError) as e:
        raise PartFailed(
            f"part {part}/{n} on {where(ctx)}: trustflow exited with {describe_exit(code)} "
            f"but its report {path} is unreadable: {e}"
        ) from None


def part_error(spec: Dict[str, Any], part: int, ctx: Dict[str, Any], code: int,
               err: str) -> Exception:
    """The exception a failed part raises: its type says whether Ray retries it."""
    n = spec["parts"]
    if code == EXIT_CANNOT_START or "error while loading shared libraries" in err:
        return NodeSetupError(
            f"{where(ctx)}: the trustflow binary {spec['binary']!r} cannot start "
            f"({describe_exit(code)}): {err.strip()[-LOADER_TAIL_CHARS:]} -- the native "
            "libraries are missing on this node (docs/ray.md, 'Getting the binary to the "
            "nodes')."
        )
    if code == EXIT_REFUSED:
        return PartRefused(
            f"part {part}/{n} on {where(ctx)}: trustflow refused the part "
            f"({describe_exit(code)}, not retried): {err.strip()[-STDERR_TAIL_CHARS:]} -- "
            "another run is writing the output (a job with another --parts, or a whole run: "
            "wait for it, or write elsewhere), the pipeline (or a model) changed since the "
            "plan, or the binary on this node is older than `run --shards` (docs/ray.md)."
        )
    return PartFailed(
        f"part {part}/{n} on {where(ctx)}: trustflow exited with {describe_exit(code)}: "
        f"{err.strip()[-STDERR_TAIL_CHARS:]}"
    )


def _probe(argv: List[str]) -> Tuple[Optional[str], Optional[str]]:
    """(stdout, None) when `argv` exits 0, else (None, what went wrong)."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"`{' '.join(argv)}` failed: {e}"
    if p.returncode != 0:
        return None, (f"`{' '.join(argv)}` failed ({describe_exit(p.returncode)}): "
                      f"{(p.stderr or p.stdout).strip()[-LOADER_TAIL_CHARS:]}")
    return p.stdout, None


def preflight_node(binary: str, pipeline: str,
                   marker: Optional[Tuple[str, str]] = None) -> Dict[str, Any]:
    """What a node lacks to run parts: the binary (one that takes `run --shards`), its
    shared libraries (libtorch for the full binary), ONNX Runtime at ORT_DYLIB_PATH,
    the pipeline file, and, for a local output folder, the driver's view of it
    (`marker`: the file the driver wrote there, and its content)."""
    ctx = node_context()
    problems: List[str] = []
    warnings: List[str] = []
    version = None
    if marker is not None:
        problem = output_folder_problem(*marker)
        if problem:
            problems.append(problem)
    try:
        binary, _ = shipping.resolve(binary)
    except (FileNotFoundError, PermissionError) as e:
        return dict(ctx, version=None, problems=[str(e)], warnings=[], found={})
    found = binary if "/" in binary else shutil.which(binary)
    if not found or not os.path.isfile(found):
        problems.append(f"trustflow binary {binary!r} not found"
                        + ("" if "/" in binary else f" on PATH={os.environ.get('PATH', '')}"))
    elif not os.access(found, os.X_OK):
        problems.append(f"trustflow binary {found} is not executable")
    else:
        out, problem = _probe([found, "--version"])
        if out is not None:
            version = out.strip()
            out, problem = _probe([found, "run", "--help"])
            if out is not None and "--shards" not in out:
                problem = (f"trustflow binary {found} ({version}) has no `run --shards` "
                           "(older than this runner: install the same build on every node)")
        if problem:
            problems.append(problem)
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
    seen = {"binary": found, "onnxruntime": ort}
    return dict(ctx, version=version, problems=problems, warnings=warnings, found=seen)


def output_folder_problem(path: str, token: str) -> Optional[str]:
    """Why this node does not see the output folder the driver sees: the file the
    driver wrote there is missing or holds something else. Each node would then write
    its own disk, and the outputs would be scattered with no complete copy anywhere."""
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == token:
                return None
    except OSError:
        pass
    return (f"does not see the output folder {os.path.dirname(path)} as the driver does "
            f"(the driver's check file {os.path.basename(path)} is not there): a local "
            "--out must be one folder shared by the driver and every node, mounted at the "
            "same path (NFS or a cluster file system); otherwise use an s3:// output")


# ---------------------------------------------------------------- on the driver


def place_output_marker(out_dir: str) -> Tuple[str, str]:
    """A file only this job writes, in the local output folder as the driver sees it:
    the preflight asks every node to read it back (see output_folder_problem)."""
    token = uuid.uuid4().hex
    path = os.path.join(out_dir, f".trustflow-preflight-{token}")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(token)
    except OSError as e:
        raise JobError(f"cannot write to the output folder {out_dir}: {e}") from None
    return path, token


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
                       f"`plan` verb?):\n{p.stdout[:PLAN_OUTPUT_CHARS]}"
                       f"{p.stderr[:PLAN_OUTPUT_CHARS]}") from None


def alive_nodes() -> List[Dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def choose_parts(shards: int, nodes: List[Dict[str, Any]], num_cpus: float,
                 factor: int = PARTS_PER_SLOT) -> int:
    """A few parts per task slot (so a slow or retried part does not leave the others
    idle at the end), never more than the shards."""
    slots = 0
    for n in nodes:
        cpus = n.get("Resources", {}).get("CPU", 0)
        slots += int(cpus // num_cpus) if num_cpus > 0 else int(cpus)
    return max(1, min(shards, factor * max(1, slots)))


def run_preflight(binary: str, pipeline: str, nodes: List[Dict[str, Any]],
                  marker: Optional[Tuple[str, str]] = None,
                  timeout_s: float = PREFLIGHT_TIMEOUT_S) -> List[Dict[str, Any]]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    check = ray.remote(preflight_node)
    refs = {}
    for n in nodes:
        strategy = NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False)
        refs[n["NodeID"]] = check.options(num_cpus=0, max_retries=0,
                                          scheduling_strategy=strategy).remote(binary, pipeline,
                                                                              marker)
    results = []
    deadline = time.monotonic() + timeout_s
    for node_id, ref in refs.items():
        try:
            results.append(ray.get(ref, timeout=max(1.0, deadline - time.monotonic())))
        except Exception as e:  # the node went away, or did not answer in time
            results.append({"node_id": node_id, "node_ip": "?", "host": "?", "version": None,
                            "problems": [f"preflight did not complete: {type(e).__name__}: "
                                         f"{str(e)[:PLAN_OUTPUT_CHARS]}"], "warnings": []})
    return results


def _progress(done: int, parts: int, running: int, rows_done: int, rows_total: int,
              retries: int, elapsed: float) -> str:
    rate = rows_done / elapsed if elapsed > 0 else 0.0
    return (f"{done}/{parts} parts done, {running} running, {rows_done}/{rows_total} rows, "
            f"{rate:.0f} rows/s, {retries} retr{'y' if retries == 1 else 'ies'}, {elapsed:.1f} s")


@dataclass
class Job:
    """What every step of a job needs: the command line, the plan and how a part runs."""

    args: Any  # the parsed command line (trustflow_ray.__main__.parser)
    plan: Dict[str, Any]  # `trustflow plan`'s JSON
    binary: str
    pipeline: str  # absolute, or a URI
    overrides: List[str]  # `--input`/`--out`, as given to `trustflow plan` (flag, value)
    rows_total: int
    t0: float  # time.monotonic() when the driver started

    @property
    def shards(self) -> List[Dict[str, Any]]:
        return self.plan.get("shards") or []

    def say(self, message: str) -> None:
        """A progress line, unless --quiet."""
        if not self.args.quiet:
            log(message)


@dataclass
class Sizing:
    """How many parts, and what each asks of Ray."""

    parts: int
    num_cpus: float
    num_gpus: float


@dataclass
class PartOutcome:
    """How a part ended, once Ray has no more retries for it: its task's return value,
    or the root error (with `node_setup` when a node cannot run trustflow)."""

    part: int
    result: Optional[Dict[str, Any]] = None
    error: Optional[str] = None
    node_setup: bool = False

    @classmethod
    def of(cls, part: int, ref) -> "PartOutcome":
        import ray

        try:
            return cls(part, result=ray.get(ref))
        except Exception as e:  # retries exhausted, or not retryable
            return cls.failed(part, e)

    @classmethod
    def failed(cls, part: int, e: BaseException) -> "PartOutcome":
        cause = root_cause(e)
        return cls(part, error=f"{type(cause).__name__}: {cause}",
                   node_setup=isinstance(cause, NodeSetupError))


def root_cause(e: BaseException) -> BaseException:
    """The exception a task raised, out of the RayTaskError that carries it (other Ray
    errors, a lost worker or node, are their own cause)."""
    from ray.exceptions import RayTaskError

    if isinstance(e, RayTaskError) and e.cause is not None and e.cause is not e:
        return e.cause
    return e


@dataclass
class Outcomes:
    """The parts that ended so far."""

    results: Dict[int, Dict[str, Any]] = field(default_factory=dict)
    failures: Dict[int, str] = field(default_factory=dict)
    node_setup_failed: bool = False
    rows_done: int = 0

    def add(self, outcome: PartOutcome) -> None:
        if outcome.result is not None:
            self.results[outcome.part] = outcome.result
            self.rows_done += int(outcome.result["report"].get("rows_in") or 0)
        else:
            self.failures[outcome.part] = outcome.error or "?"
            self.node_setup_failed |= outcome.node_setup

    def __len__(self) -> int:
        return len(self.results) + len(self.failures)


def run_job(args) -> int:
    t0 = time.monotonic()
    ship_engine = (not args.binary and not os.environ.get("TRUSTFLOW_BIN")
                   and not args.no_ship_package and shipping.installed_engine() is not None)
    workdir = tempfile.mkdtemp(prefix="trustflow-ray-job-")
    try:
        return _run_job(args, t0, ship_engine, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run_job(args, t0: float, ship_engine: bool, workdir: str) -> int:
    import ray

    shipped: List[str] = []
    if ship_engine:
        try:
            shipped, found = shipping.bundle(workdir)
        except LookupError as e:
            raise JobError(f"cannot ship the engine with the job: {e}") from None
        log(f"shipping the engine with the job: trustflow {found['version']} "
            f"({found['binary']}), ONNX Runtime {found['onnxruntime']}")
    # A job submitted with `ray job submit --runtime-env-json '{"py_modules": [WHEEL]}'`
    # brought the wheel for this driver; its tasks get the engine from the driver, as
    # any job's do. Ray refuses a py_modules field set by both unless told to let the
    # driver's win (the job's wheel would otherwise be installed on every node too,
    # which also races when two nodes share a host, as in the tests).
    job_env = shipping.job_runtime_env()
    if job_env.get("py_modules") and not args.no_ship_package:
        os.environ["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    if ship_engine:
        # The driver plans with the same binary and library the nodes get.
        if found["onnxruntime"] and os.path.isfile(found["onnxruntime"]):
            os.environ.setdefault("ORT_DYLIB_PATH", found["onnxruntime"])
        binary = found["binary"]
    else:
        binary = resolve_binary(args.binary)
    pipeline = absolute(args.pipeline)
    overrides: List[str] = []
    for uri in args.input or []:
        overrides += ["--input", absolute(uri)]
    if args.out:
        overrides += ["--out", absolute(args.out)]

    plan = plan_job(binary, pipeline, overrides)
    if ship_engine:
        binary = shipping.SHIPPED
    shards = plan.get("shards") or []
    job = Job(args, plan, binary, pipeline, overrides,
              rows_total=sum(int(s.get("rows") or 0) for s in shards), t0=t0)
    job.say(f"plan: {len(shards)} shard(s), {job.rows_total} rows, "
            f"{len(plan.get('unreadable') or [])} unreadable, threads {plan.get('threads')}, "
            f"cuda {plan.get('uses_cuda')}, out {plan.get('out_dir')} "
            f"({time.monotonic() - t0:.1f} s)")

    env_vars = {}
    for name in list(DEFAULT_FORWARD) + list(args.env or []):
        if name in os.environ:
            env_vars[name] = os.environ[name]
    if ship_engine:
        # The node's own ORT_DYLIB_PATH, if any, must not point the shipped binary
        # elsewhere: the part finds the shipped library itself.
        env_vars.pop("ORT_DYLIB_PATH", None)
    runtime_env: Dict[str, Any] = {}
    # Ray refuses a field the job's runtime environment also sets.
    if env_vars and not job_env.get("env_vars"):
        runtime_env["env_vars"] = env_vars
    elif env_vars:
        overlap = sorted(set(env_vars) & set(job_env["env_vars"]))
        runtime_env["env_vars"] = {k: v for k, v in env_vars.items() if k not in overlap}
    if not args.no_ship_package:
        runtime_env["py_modules"] = [PACKAGE_DIR, *shipped]
    init_kwargs: Dict[str, Any] = {"runtime_env": runtime_env, "log_to_driver": False,
                                   "logging_level": logging.WARNING}
    if args.address:
        init_kwargs["address"] = args.address
    connect(ray, init_kwargs, args.connect_timeout)
    try:
        return _run_on_cluster(job)
    finally:
        ray.shutdown()


def connect(ray, init_kwargs: Dict[str, Any], timeout: float) -> None:
    """`ray.init`, given up after `timeout` seconds with what to check: with no head
    reachable at the address it retries for minutes, printing little."""
    address = init_kwargs.get("address") or os.environ.get("RAY_ADDRESS")
    if not address:
        # No address: ray.init starts a local cluster, with nothing to wait for. It must
        # run on this thread: Ray ties the processes it starts to the thread that
        # starts them (PR_SET_PDEATHSIG), and a connecting thread would end.
        ray.init(**init_kwargs)
        return
    done = threading.Event()
    failure: List[BaseException] = []

    def init():
        try:
            ray.init(**init_kwargs)
        except BaseException as e:  # handed to the caller
            failure.append(e)
        finally:
            done.set()

    threading.Thread(target=init, name="trustflow-ray-connect", daemon=True).start()
    if not done.wait(timeout):
        raise ConnectTimeout(
            f"could not connect to the Ray cluster at {address} within {timeout:g} s. Check "
            "that the head runs there (`ray status --address ADDRESS`) and that this machine "
            "reaches its GCS port; on a machine with several network interfaces, start the "
            "nodes with the address the others reach (`ray start --node-ip-address IP`, or "
            "RAY_NODE_IP_ADDRESS). --connect-timeout waits longer.")
    if failure:
        raise failure[0]


def _run_on_cluster(job: Job) -> int:
    nodes = cluster_nodes(job)
    if not job.args.no_preflight:
        check_nodes(job, nodes)
    sizing = size_parts(job, nodes)
    tracker = start_tracker()
    t_submit = time.monotonic()
    refs = submit_parts(job, sizing, tracker)
    outcomes = wait_for_parts(job, sizing, refs, tracker, t_submit)
    if outcomes is None:
        return EXIT_INTERRUPTED
    merged, report_path = write_job_report(job, sizing, len(nodes), outcomes, tracker,
                                           t_submit)
    return job_exit_code(job, sizing, outcomes, merged, report_path)


def cluster_nodes(job: Job) -> List[Dict[str, Any]]:
    """The alive nodes with CPUs (where parts can run)."""
    nodes = [n for n in alive_nodes() if n.get("Resources", {}).get("CPU", 0) > 0]
    if not nodes:
        raise JobError("the Ray cluster has no node with CPUs")
    job.say(f"cluster: {len(nodes)} node(s), "
            f"{sum(n['Resources'].get('CPU', 0) for n in nodes):g} CPU(s), "
            f"{sum(n['Resources'].get('GPU', 0) for n in nodes):g} GPU(s)")
    return nodes


def check_nodes(job: Job, nodes: List[Dict[str, Any]]) -> None:
    """The preflight: stop before any part runs when a node cannot run trustflow, or
    does not see a local output folder as the driver does."""
    out_dir = str(job.plan["out_dir"])
    marker = None if is_remote(out_dir) else place_output_marker(out_dir)
    try:
        checks = run_preflight(job.binary, job.pipeline, nodes, marker)
    finally:
        if marker is not None:
            try:
                os.remove(marker[0])
            except OSError:
                pass
    bad = [c for c in checks if c["problems"]]
    versions = {c["version"] for c in checks if c.get("version")}
    for c in checks:
        seen = c.get("found") or {}
        if seen:
            job.say(f"preflight: {where(c)}: {c.get('version') or 'trustflow ?'} at "
                    f"{seen.get('binary')}, ONNX Runtime {seen.get('onnxruntime') or 'not set'}")
        for w in c.get("warnings") or []:
            job.say(f"warning: {where(c)}: {w}")
    if len(versions) > 1:
        log(f"warning: nodes run different trustflow versions: {sorted(versions)}")
    if bad:
        lines = [f"  {where(c)}: " + "; ".join(c["problems"]) for c in bad]
        raise JobError(f"{len(bad)} of {len(checks)} node(s) cannot run trustflow:\n"
                       + "\n".join(lines))
    job.say(f"preflight: {len(checks)} node(s) ok ({', '.join(sorted(versions)) or '?'})")


def size_parts(job: Job, nodes: List[Dict[str, Any]]) -> Sizing:
    """N, and the CPUs and GPUs a part asks for (never more CPUs than a node has)."""
    args, shards = job.args, job.shards
    max_node_cpus = max(n["Resources"].get("CPU", 0) for n in nodes)
    num_cpus = args.num_cpus if args.num_cpus is not None else float(job.plan.get("threads") or 1)
    if num_cpus > max_node_cpus:
        job.say(f"a part wants {num_cpus:g} CPUs but the largest node has {max_node_cpus:g}: "
                f"asking for {max_node_cpus:g}")
        num_cpus = max_node_cpus
    num_gpus = args.num_gpus if args.num_gpus is not None else (
        1 if job.plan.get("uses_cuda") else 0)
    parts = args.parts or choose_parts(len(shards), nodes, num_cpus)
    if shards and parts > len(shards):
        job.say(f"--parts {parts} > {len(shards)} shards: using {len(shards)}")
        parts = len(shards)
    parts = max(1, parts)
    job.say(f"{parts} part(s), each {num_cpus:g} CPU(s) and {num_gpus:g} GPU(s), "
            f"max_retries {args.max_retries}")
    return Sizing(parts, num_cpus, num_gpus)


def start_tracker():
    """The attempts tracker, on the head node (losing the head loses the cluster
    anyway), else on the driver's."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    heads = [n["NodeID"] for n in alive_nodes()
             if "node:__internal_head__" in n.get("Resources", {})]
    tracker_node = heads[0] if heads else ray.get_runtime_context().get_node_id()
    tracker = ray.remote(Tracker).options(
        num_cpus=0, max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=tracker_node,
                                                           soft=not heads),
    ).remote()
    if os.environ.get("TRUSTFLOW_RAY_DEBUG"):
        log(f"tracker on node {_tell(tracker.node.remote(), wait=True)} (asked {tracker_node})")
    return tracker


def submit_parts(job: Job, sizing: Sizing, tracker) -> Dict[Any, int]:
    """One task per part, each given only its own shard list (Ray keeps a task's
    arguments for its retries: the driver holds every shard once, not N times)."""
    import ray

    task = ray.remote(run_part).options(
        num_cpus=sizing.num_cpus, num_gpus=sizing.num_gpus, max_retries=job.args.max_retries,
        retry_exceptions=[PartFailed],
    )
    spec = {"binary": job.binary, "pipeline": job.pipeline,
            "overrides": part_overrides(job.overrides), "parts": sizing.parts,
            "pipeline_hash": job.plan.get("pipeline_hash")}
    return {task.remote(spec, i, shards, tracker): i
            for i, shards in enumerate(part_shards(job.shards, sizing.parts))}


def wait_for_parts(job: Job, sizing: Sizing, refs: Dict[Any, int], tracker,
                   t_submit: float) -> Optional[Outcomes]:
    """Every part's outcome, with a progress line on each and every few seconds; None
    when SIGINT or SIGTERM interrupted the job (the parts are cancelled)."""
    import ray

    pending = list(refs)
    outcomes = Outcomes()
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
            ready, pending = ray.wait(pending, num_returns=1, timeout=WAIT_POLL_S)
            for ref in ready:
                outcome = PartOutcome.of(refs[ref], ref)
                outcomes.add(outcome)
                if outcome.error is not None:
                    log(f"part {outcome.part}/{sizing.parts} failed: "
                        f"{outcome.error[:LOGGED_ERROR_CHARS]}")
            now = time.monotonic()
            if not job.args.quiet and (ready or now - last_line >= PROGRESS_EVERY_S):
                snap = _tell(tracker.snapshot.remote(), wait=True, timeout=TRACKER_QUICK_S) or {}
                running = sum(1 for a in snap.values() if a and a[-1]["outcome"] == "running")
                retries = sum(max(0, len(a) - 1) for a in snap.values())
                log(_progress(len(outcomes), sizing.parts, running, outcomes.rows_done,
                              job.rows_total, retries, now - t_submit))
                last_line = now
    except KeyboardInterrupt:
        log("interrupted: cancelling the parts (finished shards are kept; a rerun resumes)")
        cancel_parts(pending, [refs[r] for r in pending], tracker)
        return None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return outcomes


def cancel_parts(pending: List[Any], parts: List[int], tracker) -> None:
    """Cancel the running parts and give them time to stop their child cleanly.

    ray.cancel raises KeyboardInterrupt in a running task, whose child then gets
    SIGTERM and stops cleanly (finished shards kept, temporary files and its part
    lock released). Without the wait, ray.shutdown right after would end the workers
    first and their children would die by the parent-death SIGKILL instead (on S3
    with `conditional_writes`, leaving the part lock behind). The wait ends as soon
    as the tracker has seen every cancelled attempt end."""
    import ray

    for ref in pending:
        try:
            ray.cancel(ref)
        except Exception:
            pass
    deadline = time.monotonic() + CANCEL_GRACE_S
    while time.monotonic() < deadline:
        snap = _tell(tracker.snapshot.remote(), wait=True, timeout=TRACKER_QUICK_S)
        if snap is not None:
            last = {int(p): a[-1]["outcome"] for p, a in snap.items() if a}
            if not any(last.get(p) == "running" for p in parts):
                return
        time.sleep(CANCEL_POLL_S)


def write_job_report(job: Job, sizing: Sizing, nodes: int, outcomes: Outcomes, tracker,
                     t_submit: float) -> Tuple[Dict[str, Any], str]:
    """The parts' reports merged (report.py), written next to the outputs (local) or
    to --report; returns it and its path."""
    wall_s = time.monotonic() - job.t0
    attempts = _tell(tracker.snapshot.remote(), wait=True) or {}
    attempts = {int(k): v for k, v in attempts.items()}
    for part, entries in attempts.items():
        for e in entries:
            if e["outcome"] == "running" and part in outcomes.results:
                e["outcome"] = "lost"
                e["error"] = "no result: its worker or node died (Ray retried the task)"
    out_dir = str(job.plan["out_dir"])
    report_path = job.args.report or (
        os.path.join(out_dir, "_report.json") if not is_remote(out_dir)
        else os.path.abspath("trustflow-ray-report.json"))
    merged = reportlib.merge(
        job.plan, sizing.parts, outcomes.results, outcomes.failures, attempts, wall_s,
        report_path,
        extra={
            "submit_to_done_s": time.monotonic() - t_submit,
            "resources_per_part": {"num_cpus": sizing.num_cpus, "num_gpus": sizing.num_gpus},
            "max_retries": job.args.max_retries,
            "nodes": nodes,
        },
    )
    os.makedirs(os.path.dirname(report_path) or ".", exist_ok=True)
    tmp = report_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(merged, f, indent=2)
        f.write("\n")
    os.replace(tmp, report_path)
    return merged, report_path


def job_exit_code(job: Job, sizing: Sizing, outcomes: Outcomes, merged: Dict[str, Any],
                  report_path: str) -> int:
    """The summary line, the problems, and `trustflow run`'s exit code for the job."""
    wall_s = merged["wall_s"]
    status = "complete" if merged["complete"] else "INCOMPLETE"
    log(f"{status}: {merged['shards_processed']} shard(s) processed, "
        f"{merged['shards_skipped']} skipped, {len(merged['unreadable'])} unreadable; "
        f"{merged['rows_in']} in, {merged['rows_out']} out, {merged['rows_quarantined']} "
        f"quarantined; invariant {'holds' if merged['invariant_holds'] else 'BROKEN'}; "
        f"{sizing.parts} parts, {merged['retries']} retries; {wall_s:.1f} s, "
        f"{merged['rows_per_s']:.0f} rows/s; report {report_path}")
    for p in merged["problems"]:
        log(f"problem: {p}")
    if outcomes.failures or merged["problems"]:
        if outcomes.node_setup_failed:
            log("a node cannot run trustflow: see docs/ray.md, 'Getting the binary to the nodes'")
        return 1
    return EXIT_INCOMPLETE if merged["unreadable"] else EXIT_OK
