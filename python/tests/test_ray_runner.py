"""The Ray runner on a real local multi-node Ray cluster (ray.cluster_utils.Cluster:
a head and one more node, each with its own CPUs, on 127.0.0.1), against a
single-machine `trustflow run` of the same pipeline.

Needs: the trustflow binary ($TRUSTFLOW_BIN, else $CARGO_TARGET_DIR/debug/trustflow),
Ray 2.60.0 importable (PYTHONPATH=$TRUSTFLOW_RAY_DIR:python), pyarrow from
$TRUSTFLOW_PYLIBS and moto_server + boto3 from $TRUSTFLOW_MOTO_DIR, all set up by
`source scripts/setup.sh`. Run by scripts/test.sh:

    PYTHONPATH=$TRUSTFLOW_RAY_DIR:python python3 -m unittest discover -s python/tests -v

Each test starts its own cluster in setUp and shuts it (and moto_server) down in
tearDown, whatever happened.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request

# Keep Ray on the loopback and quiet; set before Ray is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON_DIR = os.path.dirname(HERE)
SHARDS = 16
ROWS = 3200  # 200 rows a shard: a part runs long enough to be killed half-way
ACCESS_KEY = "AKIATRUSTFLOWTEST"
SECRET = "tfSecret/9f8e7d6c5b4a-never-print-me"


def trustflow_binary() -> str:
    explicit = os.environ.get("TRUSTFLOW_BIN")
    if explicit:
        return explicit
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(PYTHON_DIR, "..", "target")
    return os.path.abspath(os.path.join(target, "debug", "trustflow"))


BIN = trustflow_binary()
_LIBC = ctypes.CDLL(None, use_errno=True)


def _die_with_parent():
    _LIBC.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def import_pyarrow():
    pylibs = os.environ.get("TRUSTFLOW_PYLIBS")
    if pylibs and pylibs not in sys.path:
        sys.path.append(pylibs)
    import pyarrow.parquet as pq

    return pq


def driver_env(extra=None) -> dict:
    env = dict(os.environ)
    paths = [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if PYTHON_DIR not in paths:
        paths.append(PYTHON_DIR)
    env["PYTHONPATH"] = os.pathsep.join(paths)
    for key in list(env):
        if key.startswith("AWS_"):
            del env[key]
    env.update(extra or {})
    return env


def children_of(pid: int):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def ppid_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def cmdline(pid: int):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def alive_after(pid: int, seconds: float) -> bool:
    """Whether `pid` still runs once it has had `seconds` to exit."""
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive(pid)


def part_of(argv):
    """(part, N, the shard indexes it was given or None) of a part's command line:
    `--shards FILE` (what the runner passes; FILE lives while the part runs) or
    `--part I/N`; None when it is neither or FILE is gone."""
    if "--shards" in argv:
        try:
            with open(argv[argv.index("--shards") + 1]) as f:
                body = json.load(f)
        except (OSError, ValueError, IndexError):
            return None
        part, n = body["part"]
        return part, n, [s["index"] for s in body["shards"]]
    if "--part" in argv:
        part, n = (int(x) for x in argv[argv.index("--part") + 1].split("/"))
        return part, n, None
    return None


def part_children(out: str):
    """(pid, part) of every part's `trustflow run ... --shards FILE` (or `--part I/N`)
    writing into `out`."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        argv = cmdline(int(name))
        if len(argv) > 2 and argv[1] == "run" and out in argv:
            which = part_of(argv)
            if which is not None:
                found.append((int(name), which[0]))
    return found


def ancestors(pid: int, depth: int = 6):
    chain = []
    while pid > 1 and depth > 0:
        pid = ppid_of(pid)
        chain.append(pid)
        depth -= 1
    return chain


ROOT = None
CORPUS = PIPELINE = REFERENCE = None
REFERENCE_REPORT = None


def setUpModule():
    """The corpus (16 shards) and the reference: one `trustflow run` on one machine."""
    global ROOT, CORPUS, PIPELINE, REFERENCE, REFERENCE_REPORT
    if not os.path.isfile(BIN):
        raise unittest.SkipTest(f"no trustflow binary at {BIN} (build it or set TRUSTFLOW_BIN)")
    ROOT = tempfile.mkdtemp(prefix="trustflow-ray-test-")
    CORPUS = os.path.join(ROOT, "corpus")
    subprocess.run(
        [BIN, "bench", "gen", "--rows", str(ROWS), "--shards", str(SHARDS), "--seed", "1",
         "--out", CORPUS, "--max-side", "96", "--min-side", "48"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    PIPELINE = os.path.join(ROOT, "clean.yaml")
    with open(PIPELINE, "w") as f:
        f.write(f"source:\n  paths: [{CORPUS}]\nstages:\n  - type: clean_caption\n"
                f"sink:\n  path: {os.path.join(ROOT, 'unused')}\n")
    REFERENCE = os.path.join(ROOT, "reference")
    subprocess.run([BIN, "run", PIPELINE, "--out", REFERENCE, "--quiet"],
                   check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(REFERENCE, "_report.json")) as f:
        REFERENCE_REPORT = json.load(f)


def tearDownModule():
    if ROOT:
        shutil.rmtree(ROOT, ignore_errors=True)


def start_cluster():
    """A head (1 CPU) and a second node (2 CPUs), both on 127.0.0.1, with fast
    node-death detection for the node-removal test."""
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "node_ip_address": "127.0.0.1",
            "include_dashboard": False,
            "_system_config": {"health_check_period_ms": 500,
                               "health_check_failure_threshold": 4},
        },
    )
    try:
        node = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
    except BaseException:
        cluster.shutdown()
        raise
    return cluster, node


def stop_cluster(cluster):
    if ray.is_initialized():
        ray.shutdown()
    if cluster is not None:
        cluster.shutdown()


class Base(unittest.TestCase):
    """Helpers; a subclass with shared_cluster = True starts one cluster for all its
    tests (tearDownClass stops it), otherwise each test starts its own (tearDown)."""

    shared_cluster = False

    @classmethod
    def setUpClass(cls):
        cls.root, cls.corpus, cls.pipeline = ROOT, CORPUS, PIPELINE
        cls.reference, cls.reference_report = REFERENCE, REFERENCE_REPORT
        cls.cluster = cls.worker_node = None
        if cls.shared_cluster:
            cls.cluster, cls.worker_node = start_cluster()

    @classmethod
    def tearDownClass(cls):
        if cls.shared_cluster:
            stop_cluster(cls.cluster)

    def setUp(self):
        self.moto = None
        self.work = tempfile.mkdtemp(prefix="case-", dir=self.root)
        if not self.shared_cluster:
            self.cluster, self.worker_node = start_cluster()

    def tearDown(self):
        try:
            if not self.shared_cluster:
                stop_cluster(self.cluster)
        finally:
            if self.moto is not None:
                self.moto.kill()
                self.moto.wait()

    # ------------------------------------------------------------ helpers

    def start_driver(self, *args, env=None, binary=BIN):
        cmd = [sys.executable, "-m", "trustflow_ray", "run", self.pipeline,
               "--address", self.cluster.address, "--binary", binary, *args]
        log = open(os.path.join(self.work, f"driver-{time.monotonic_ns()}.log"), "w+")
        proc = subprocess.Popen(cmd, env=driver_env(env), stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent)
        proc.log = log
        return proc

    def finish(self, proc, timeout=150):
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        proc.log.seek(0)
        text = proc.log.read()
        proc.log.close()
        return code, text

    def run_driver(self, *args, env=None, binary=BIN, timeout=150):
        return self.finish(self.start_driver(*args, env=env, binary=binary), timeout)

    def assert_same_outputs(self, out: str):
        pq = import_pyarrow()
        names = sorted(n for n in os.listdir(self.reference) if n.endswith(".parquet"))
        got = sorted(n for n in os.listdir(out) if n.endswith(".parquet"))
        self.assertEqual(names, got)
        self.assertEqual(len(names), 2 * SHARDS)
        manifests = sorted(n for n in os.listdir(out) if n.endswith(".manifest.json"))
        self.assertEqual(len(manifests), SHARDS)
        for name in names:
            a = pq.read_table(os.path.join(self.reference, name))
            b = pq.read_table(os.path.join(out, name))
            self.assertTrue(a.equals(b), f"{name} differs from the single-machine run")

    def assert_report_matches(self, report: dict, retries_at_least: int = 0):
        ref = self.reference_report
        self.assertTrue(report["complete"], report.get("problems"))
        self.assertEqual(report["problems"], [])
        self.assertTrue(report["invariant_holds"])
        for key in ("rows_in", "rows_out", "rows_quarantined"):
            self.assertEqual(report[key], ref[key], key)
        self.assertEqual(report["rows_in"], ROWS)
        self.assertEqual(report["quarantine_reasons"], ref["quarantine_reasons"])
        got = {s["stem"]: (s["rows_in"], s["rows_out"], s["rows_quarantined"])
               for s in report["shards"]}
        want = {s["stem"]: (s["rows_in"], s["rows_out"], s["rows_quarantined"])
                for s in ref["shards"]}
        self.assertEqual(got, want)
        self.assertEqual(report["shards_processed"] + report["shards_skipped"], SHARDS)
        self.assertGreaterEqual(report["retries"], retries_at_least)
        self.assertEqual([s["name"] for s in report["steps"]], [s["name"] for s in ref["steps"]])

    def read_report(self, path):
        with open(path) as f:
            return json.load(f)

    def wrapper(self, name, on_part_run):
        """A binary that runs the shell lines `on_part_run` before a part's `trustflow
        run` (with $shards the path after `--shards`, empty without), then `exec`s the
        real binary (so the parent-death signal still reaches it)."""
        path = os.path.join(self.work, name)
        with open(path, "w") as f:
            f.write("#!/bin/sh\n"
                    "if [ \"$1\" = run ] && [ \"$2\" != --help ]; then\n"
                    "  shards=; prev=\n"
                    "  for a in \"$@\"; do\n"
                    "    if [ \"$prev\" = --shards ]; then shards=$a; fi\n"
                    "    prev=$a\n"
                    "  done\n"
                    f"{on_part_run}\n"
                    "fi\n"
                    f"exec {BIN} \"$@\"\n")
        os.chmod(path, 0o755)
        return path

    def plan(self, *overrides):
        p = subprocess.run([BIN, "plan", self.pipeline, *overrides], check=True,
                           capture_output=True, text=True)
        return json.loads(p.stdout)

    def kill_when_mid_run(self, out: str, pick, what, timeout=60.0):
        """Wait for a part's child writing into `out` that `pick(pid)` accepts and that
        has committed at least one shard (a manifest of its part), then call
        `what(child_pid)`. Returns (child pid, part, whether a manifest was seen)."""
        deadline = time.monotonic() + timeout
        first_seen = {}
        while time.monotonic() < deadline:
            for pid, part in part_children(out):
                if not pick(pid):
                    continue
                first_seen.setdefault(pid, time.monotonic())
                which = part_of(cmdline(pid))
                if which is None:
                    continue
                _, n, given = which
                stems = [s["stem"] for s in self.reference_report["shards"]]
                mine = ([stems[i] for i in given] if given is not None
                        else [stems[i] for i in range(len(stems)) if i % n == part])
                done = [s for s in mine
                        if os.path.exists(os.path.join(out, f"{s}.manifest.json"))]
                late = time.monotonic() - first_seen[pid] > 3.0
                if (done and len(done) < len(mine)) or late:
                    what(pid)
                    return pid, part, bool(done)
            time.sleep(0.01)
        self.fail(f"no part child writing into {out} within {timeout} s")



class ConnectTest(unittest.TestCase):
    """No cluster at the address: `ray.init` would retry for minutes; the runner gives
    up after --connect-timeout with what to check. No address at all: a local cluster
    is started and runs the job."""

    def test_an_unreachable_head_times_out_saying_what_to_check(self):
        out = tempfile.mkdtemp(prefix="trustflow-ray-connect-")
        self.addCleanup(shutil.rmtree, out, True)
        port = free_port()  # nothing listens there
        started = time.monotonic()
        p = subprocess.run(
            [sys.executable, "-m", "trustflow_ray", "run", PIPELINE, "--binary", BIN,
             "--out", out, "--address", f"127.0.0.1:{port}", "--connect-timeout", "3",
             "--quiet"],
            env=driver_env(), capture_output=True, text=True, timeout=120)
        self.assertEqual(p.returncode, 1, p.stderr[-2000:])
        self.assertIn(f"could not connect to the Ray cluster at 127.0.0.1:{port} within 3 s",
                      p.stderr)
        self.assertIn("--node-ip-address", p.stderr)
        self.assertLess(time.monotonic() - started, 60)

    def test_without_an_address_a_local_cluster_runs_the_job(self):
        # ray.init starts the cluster then; its processes die with the thread that
        # started them, so it must not be a connecting thread that ends.
        out = tempfile.mkdtemp(prefix="trustflow-ray-local-")
        self.addCleanup(shutil.rmtree, out, True)
        env = {k: v for k, v in driver_env().items() if k != "RAY_ADDRESS"}
        p = subprocess.run(
            [sys.executable, "-m", "trustflow_ray", "run", PIPELINE, "--binary", BIN,
             "--input", CORPUS, "--out", out, "--parts", "2", "--quiet"],
            env=env, capture_output=True, text=True, timeout=300)
        self.assertEqual(p.returncode, 0, p.stderr[-3000:])
        with open(os.path.join(out, "_report.json")) as f:
            report = json.load(f)
        self.assertTrue(report["complete"], report)
        self.assertEqual(report["rows_in"], REFERENCE_REPORT["rows_in"])
        self.assertEqual(
            sorted(n for n in os.listdir(out) if n.endswith(".manifest.json")),
            sorted(n for n in os.listdir(REFERENCE) if n.endswith(".manifest.json")))


def can_unshare_mounts() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0
    except OSError:
        return False


class OwnDiskTest(unittest.TestCase):
    """A head, and a second node started in a mount namespace of its own with an empty
    tmpfs over the output's parent folder: the same path is a different folder there,
    as a local disk on another machine would be. Both are started by `ray start` with
    an environment of their own (a fresh HOME: no auth token of an earlier cluster)."""

    def setUp(self):
        if not can_unshare_mounts():
            self.skipTest("needs `unshare -m` (root or user namespaces) to give one node "
                          "a disk of its own")
        self.work = tempfile.mkdtemp(prefix="case-", dir=ROOT)
        self.own_disk = os.path.join(self.work, "disk")
        home = os.path.join(self.work, "home")
        os.makedirs(self.own_disk)
        os.makedirs(home)
        ray_dir = os.path.dirname(os.path.dirname(os.path.abspath(ray.__file__)))
        self.env = {"PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin",
                    "HOME": home, "PYTHONPATH": f"{ray_dir}{os.pathsep}{PYTHON_DIR}",
                    "LANG": "C.UTF-8", "RAY_USAGE_STATS_ENABLED": "0"}
        ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        # Cleanups, unlike tearDown, also run when setUp fails half-way.
        self.addCleanup(subprocess.run, [*ray_cli, "stop", "--force"], env=self.env,
                        capture_output=True, timeout=120)
        subprocess.run([*ray_cli, "start", "--head", "--port", str(port),
                        "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                        "--include-dashboard", "false"],
                       env=self.env, check=True, capture_output=True, timeout=120)
        p = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c",
             'mount -t tmpfs tmpfs "$1" && shift && exec "$@"', "sh", self.own_disk,
             *ray_cli, "start", "--address", self.address, "--node-ip-address",
             "127.0.0.1", "--num-cpus", "2"],
            env=self.env, capture_output=True, text=True, timeout=120)
        self.assertEqual(p.returncode, 0, p.stderr[-2000:])

    def test_a_node_that_sees_another_output_folder_is_refused_by_name(self):
        out = os.path.join(self.own_disk, "out")
        p = subprocess.run(
            [sys.executable, "-m", "trustflow_ray", "run", PIPELINE, "--address",
             self.address, "--binary", BIN, "--input", CORPUS, "--out", out],
            env=self.env, capture_output=True, text=True, timeout=300)
        text = p.stdout + p.stderr
        self.assertEqual(p.returncode, 1, text)
        self.assertIn("1 of 2 node(s) cannot run trustflow", text)
        self.assertIn(f"does not see the output folder {out} as the driver does", text)
        # One node is named: the one that joined from its own namespace.
        refused = [line for line in text.splitlines() if "does not see the output" in line]
        self.assertEqual(len(refused), 1, text)
        self.assertIn("node ", refused[0])
        # No part ran, and the driver's check file is gone.
        self.assertEqual(os.listdir(out), [])


class ClusterTest(Base):
    """Runs on one shared two-node cluster: local disk, S3, missing libraries."""

    shared_cluster = True


    def test_local_disk_matches_single_machine_and_rerun_skips(self):
        out = os.path.join(self.work, "out")
        code, text = self.run_driver("--input", self.corpus, "--out", out, "--num-cpus", "1")
        self.assertEqual(code, 0, text)
        self.assert_same_outputs(out)
        report = self.read_report(os.path.join(out, "_report.json"))
        self.assert_report_matches(report)
        self.assertEqual(report["shards_processed"], SHARDS)
        self.assertEqual(report["retries"], 0)
        # Default N: 3 x task slots (1 + 2 CPUs at 1 CPU a part), at most the shards.
        self.assertEqual(report["parts"], 9)
        self.assertEqual(len({p["node_id"] for p in report["part_reports"]}) >= 1, True)
        self.assertIn("parts done", text)  # live progress on stderr
        self.assertFalse([n for n in os.listdir(out) if n.startswith("_report.part-")])
        # A second run finds every manifest: nothing is redone.
        code, text = self.run_driver("--input", self.corpus, "--out", out, "--num-cpus", "1",
                                     "--parts", "4", "--quiet")
        self.assertEqual(code, 0, text)
        again = self.read_report(os.path.join(out, "_report.json"))
        self.assertEqual(again["shards_skipped"], SHARDS)
        self.assertEqual(again["shards_processed"], 0)
        self.assertEqual(again["rows_in"], ROWS)
        self.assert_same_outputs(out)

    def test_parts_are_given_their_own_shard_lists(self):
        # The driver plans once; each part gets the plan's shards with index % N == I
        # in a file (`--shards`), and lists nothing itself.
        calls = os.path.join(self.work, "calls")
        os.makedirs(calls)
        binary = self.wrapper("trustflow-recording",
                              f"  printf '%s\\n' \"$@\" > {calls}/run-$$.argv\n"
                              f"  if [ -n \"$shards\" ]; then cp \"$shards\" "
                              f"{calls}/run-$$.shards.json; fi")
        out = os.path.join(self.work, "out")
        code, text = self.run_driver("--input", self.corpus, "--out", out, "--num-cpus", "1",
                                     "--parts", "5", "--quiet", binary=binary)
        self.assertEqual(code, 0, text)
        self.assert_same_outputs(out)
        report = self.read_report(os.path.join(out, "_report.json"))
        self.assert_report_matches(report)
        self.assertEqual(report["retries"], 0)
        plan = self.plan("--input", self.corpus, "--out", out)
        planned = {s["index"]: s for s in plan["shards"]}
        self.assertEqual(len(planned), SHARDS)

        runs = sorted(n[:-len(".argv")] for n in os.listdir(calls) if n.endswith(".argv"))
        self.assertEqual(len(runs), 5, runs)  # one per part: nothing was retried
        given = {}
        for run in runs:
            with open(os.path.join(calls, run + ".argv")) as f:
                argv = f.read().splitlines()
            self.assertEqual(argv[:2], ["run", self.pipeline])
            self.assertIn("--shards", argv)
            self.assertNotIn("--part", argv)
            self.assertNotIn("--input", argv)  # the inputs are the list
            self.assertEqual(argv[argv.index("--out") + 1], out)
            self.assertIn("--quiet", argv)
            self.assertIn("--report", argv)
            with open(os.path.join(calls, run + ".shards.json")) as f:
                body = json.load(f)
            self.assertEqual(body["pipeline_hash"], plan["pipeline_hash"])
            part, n = body["part"]
            self.assertEqual(n, 5)
            self.assertNotIn(part, given, "two parts with one number")
            indexes = [s["index"] for s in body["shards"]]
            self.assertEqual(indexes, sorted(i for i in planned if i % 5 == part))
            for s in body["shards"]:
                self.assertEqual(s["input"], planned[s["index"]]["input"])
                self.assertEqual(s["stem"], planned[s["index"]]["stem"])
            given[part] = indexes
        # Together the lists are the plan, each shard in one part.
        self.assertEqual(sorted(given), list(range(5)))
        self.assertEqual(sorted(i for lst in given.values() for i in lst), sorted(planned))
        # And each part reported exactly the shards it was given.
        for summary in report["part_reports"]:
            part = summary["part"]
            self.assertEqual(summary["shards_given"], len(given[part]))
            self.assertEqual(summary["shards_processed"] + summary["shards_skipped"],
                             len(given[part]), summary)
            self.assertEqual(sorted(s["stem"] for s in report["shards"] if s["part"] == part),
                             sorted(planned[i]["stem"] for i in given[part]))

    def test_a_part_planned_for_another_pipeline_is_refused_not_retried(self):
        # As if the pipeline file changed between the plan and the parts: the engine
        # refuses the list (exit code 2), and retrying cannot help.
        other = "0" * 64
        binary = self.wrapper(
            "trustflow-stale",
            f"  sed -i 's/\"pipeline_hash\": *\"[0-9a-f]*\"/\"pipeline_hash\": \"{other}\"/' "
            "\"$shards\"")
        out = os.path.join(self.work, "out")
        code, text = self.run_driver("--input", self.corpus, "--out", out, "--num-cpus", "1",
                                     "--parts", "2", "--max-retries", "2", "--quiet",
                                     binary=binary)
        self.assertEqual(code, 1, text)
        plan_hash = self.plan("--input", self.corpus, "--out", out)["pipeline_hash"]
        self.assertIn("PartRefused", text)
        self.assertIn("shards.json", text)
        self.assertIn(plan_hash, text)
        self.assertIn(other, text)
        report = self.read_report(os.path.join(out, "_report.json"))
        self.assertFalse(report["complete"])
        self.assertEqual([p["part"] for p in report["parts_failed"]], [0, 1])
        self.assertEqual(report["retries"], 0)
        self.assertEqual([a["outcome"] for a in report["attempts"]], ["failed", "failed"])
        self.assertFalse([n for n in os.listdir(out)
                          if n.endswith(".parquet") or n.endswith(".manifest.json")])

    def start_moto(self):
        moto_dir = os.environ.get("TRUSTFLOW_MOTO_DIR")
        if not moto_dir:
            self.fail("TRUSTFLOW_MOTO_DIR is not set: `source scripts/setup.sh` installs "
                      "moto_server (the S3 test server)")
        port = free_port()
        self.moto = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            env=dict(os.environ, PYTHONPATH=moto_dir), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint + "/", timeout=2).read()
                break
            except Exception:
                if time.monotonic() > deadline:
                    self.fail("moto_server did not answer within 60 s")
                time.sleep(0.1)
        return endpoint, moto_dir

    def boto(self, endpoint, moto_dir, script, *args):
        """Run `script` with boto3 (from the moto folder) in a child Python."""
        prelude = ("import boto3, os, sys\n"
                   "s3 = boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1',"
                   f" aws_access_key_id='{ACCESS_KEY}', aws_secret_access_key='{SECRET}')\n")
        subprocess.run([sys.executable, "-c", prelude + script, endpoint, *args],
                       env=dict(os.environ, PYTHONPATH=moto_dir), check=True)

    def test_s3_matches_single_machine(self):
        endpoint, moto_dir = self.start_moto()
        self.boto(endpoint, moto_dir,
                  "s3.create_bucket(Bucket='corpus')\n"
                  "for n in sorted(os.listdir(sys.argv[2])):\n"
                  "    if n.endswith('.parquet'):\n"
                  "        s3.upload_file(os.path.join(sys.argv[2], n), 'corpus', 'raw/' + n)\n",
                  self.corpus)
        aws = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
               "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
        report_path = os.path.join(self.work, "report.json")
        code, text = self.run_driver(
            "--input", "s3://corpus/raw/", "--out", "s3://corpus/enriched/run-1",
            "--num-cpus", "1", "--parts", "6", "--report", report_path,
            "--env", "AWS_ACCESS_KEY_ID", "--env", "AWS_SECRET_ACCESS_KEY", env=aws)
        self.assertEqual(code, 0, text)
        self.assertNotIn(SECRET, text)
        with open(report_path) as f:
            raw = f.read()
        self.assertNotIn(SECRET, raw)
        report = json.loads(raw)
        self.assert_report_matches(report)
        self.assertEqual(report["parts"], 6)
        self.assertGreater(report["storage"]["requests"], 0)
        got = os.path.join(self.work, "from-s3")
        self.boto(endpoint, moto_dir,
                  "os.makedirs(sys.argv[2], exist_ok=True)\n"
                  "keys = [o['Key'] for p in s3.get_paginator('list_objects_v2').paginate("
                  "Bucket='corpus', Prefix='enriched/run-1/') for o in p.get('Contents', [])]\n"
                  "assert not [k for k in keys if '_report' in k], keys\n"
                  "for k in keys:\n"
                  "    if '/.trustflow' not in k:\n"
                  "        s3.download_file('corpus', k, os.path.join(sys.argv[2], k.rsplit('/', 1)[1]))\n",
                  got)
        self.assert_same_outputs(got)

    def test_interrupt_stops_the_parts_and_a_rerun_resumes(self):
        out = os.path.join(self.work, "out")
        proc = self.start_driver("--input", self.corpus, "--out", out, "--num-cpus", "1",
                                 "--parts", "4")
        deadline = time.monotonic() + 60
        while not part_children(out):
            self.assertLess(time.monotonic(), deadline, "no part started")
            time.sleep(0.01)
        children = [pid for pid, _ in part_children(out)]
        proc.send_signal(signal.SIGINT)
        code, text = self.finish(proc, timeout=60)
        self.assertEqual(code, 130, text)
        self.assertIn("interrupted", text)
        deadline = time.monotonic() + 10
        while [c for c in children if alive(c)] and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual([c for c in children if alive(c)], [], "a part outlived the job")
        code, text = self.run_driver("--input", self.corpus, "--out", out, "--num-cpus", "1",
                                     "--parts", "4", "--quiet")
        self.assertEqual(code, 0, text)
        self.assert_same_outputs(out)
        self.assert_report_matches(self.read_report(os.path.join(out, "_report.json")))

    def test_missing_native_libraries_fail_clearly(self):
        # A binary that plans on the driver but cannot load libtorch on the nodes, as
        # when the native libraries did not reach them.
        fake = os.path.join(self.work, "trustflow")
        with open(fake, "w") as f:
            f.write("#!/bin/sh\n"
                    f"if [ \"$1\" = plan ]; then exec {BIN} \"$@\"; fi\n"
                    "echo \"$0: error while loading shared libraries: libtorch_cpu.so: "
                    "cannot open shared object file: No such file or directory\" >&2\n"
                    "exit 127\n")
        os.chmod(fake, 0o755)
        out = os.path.join(self.work, "out")
        code, text = self.run_driver("--input", self.corpus, "--out", out, binary=fake)
        self.assertEqual(code, 1, text)
        self.assertIn("2 of 2 node(s) cannot run trustflow", text)
        self.assertIn("node 127.0.0.1", text)
        self.assertIn("libtorch_cpu.so", text)
        self.assertFalse(os.path.exists(os.path.join(out, "_report.json")))
        # Without the preflight, the first task names the node and the library.
        code, text = self.run_driver("--input", self.corpus, "--out", out, "--no-preflight",
                                     "--parts", "2", "--quiet", binary=fake)
        self.assertEqual(code, 1, text)
        self.assertIn("NodeSetupError", text)
        self.assertIn("libtorch_cpu.so", text)
        # And a binary missing on the driver stops before the cluster is touched.
        code, text = self.run_driver("--input", self.corpus, "--out", out,
                                     binary=os.path.join(self.work, "nowhere", "trustflow"))
        self.assertEqual(code, 1, text)
        self.assertIn("not found on the driver", text)



class FaultTest(Base):
    """Each test on its own cluster: a worker killed, a node removed."""

    def test_kill_worker_mid_run(self):
        out = os.path.join(self.work, "out")
        proc = self.start_driver("--input", self.corpus, "--out", out, "--num-cpus", "1",
                                 "--parts", "4", "--max-retries", "3")
        killed = {}

        def kill_worker(child):
            worker = ppid_of(child)
            killed.update(child=child, worker=worker)
            os.kill(worker, signal.SIGKILL)

        child, part, mid = self.kill_when_mid_run(out, lambda pid: True, kill_worker)
        # The trustflow child dies with its worker (parent-death signal): no orphan writer.
        self.assertFalse(alive_after(child, 10), "the trustflow child outlived its killed worker")
        code, text = self.finish(proc)
        self.assertEqual(code, 0, text)
        self.assert_same_outputs(out)
        report = self.read_report(os.path.join(out, "_report.json"))
        self.assert_report_matches(report, retries_at_least=1)
        attempts = [a for a in report["attempts"] if a["part"] == part]
        self.assertGreaterEqual(len(attempts), 2, attempts)
        self.assertEqual(attempts[0]["outcome"], "lost")
        self.assertEqual(attempts[0]["worker_pid"], killed["worker"])
        self.assertEqual(attempts[-1]["outcome"], "ok")
        if not mid:
            print(f"note: part {part} was killed before it committed a shard", file=sys.stderr)
        else:
            # The retry found the shards the killed attempt had committed.
            summary = next(p for p in report["part_reports"] if p["part"] == part)
            self.assertGreaterEqual(summary["shards_skipped"], 1, summary)

    def test_remove_node_mid_run(self):
        out = os.path.join(self.work, "out")
        raylet = self.worker_node.all_processes["raylet"][0].process.pid
        proc = self.start_driver("--input", self.corpus, "--out", out, "--num-cpus", "1",
                                 "--parts", "8", "--max-retries", "3")
        removed = {}

        def remove_node(child):
            # A lost machine: its raylet and every worker go at once (a raylet killed
            # alone lets a worker finish its task and report before it notices). The
            # trustflow children are left to the parent-death signal.
            removed["child"] = child
            removed["workers"] = children_of(raylet)
            for pid in removed["workers"]:
                if cmdline(pid)[:1] != [BIN]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            self.cluster.remove_node(self.worker_node, allow_graceful=False)

        child, part, _ = self.kill_when_mid_run(out, lambda pid: raylet in ancestors(pid),
                                                remove_node)
        self.assertFalse(alive_after(child, 15), "a trustflow child outlived its removed node")
        code, text = self.finish(proc)
        self.assertEqual(code, 0, text)
        self.assert_same_outputs(out)
        report = self.read_report(os.path.join(out, "_report.json"))
        self.assertGreaterEqual(report["retries"], 1,
                                f"removed during part {part}: {report['attempts']}\n{text}")
        self.assert_report_matches(report, retries_at_least=1)
        lost = [a for a in report["attempts"] if a["outcome"] != "ok"]
        self.assertTrue(lost, report["attempts"])
        self.assertIn(part, [a["part"] for a in lost])


if __name__ == "__main__":
    unittest.main()
