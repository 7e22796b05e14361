"""The wheel where users run it (issues "Installed where it runs" and "Ray jobs the way
users submit them"): a fresh virtualenv with only the wheel and its pinned dependencies
(`pip install trustflow-*.whl[ray]`), commands run with an empty environment (no
cargo, no scripts/setup.sh, no exported variable), and a local two-node Ray cluster
whose nodes have Python and Ray and nothing of trustflow or ONNX Runtime:

- `trustflow validate` and `trustflow run` of a model pipeline (clip_score);
- `python -m trustflow_ray run` on the cluster, the engine shipped with the job;
- the documented `ray job submit` command (docs/ray.md), the Python
  `JobSubmissionClient`, and `ray job stop` half-way, then a resubmitted job;

every output compared byte for byte with the single-machine run's.

The wheel comes from `bash scripts/build-wheel.sh` (scripts/test.sh builds it with
--debug and sets TRUSTFLOW_WHEEL); without it these tests are skipped, saying so.
"""

import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CLIP_MODEL = os.path.join(REPO, "tests", "fixtures", "clip", "model")
WHEEL = os.environ.get("TRUSTFLOW_WHEEL", "")
RAY_DIR = os.environ.get("TRUSTFLOW_RAY_DIR", "")
# The interpreter of the venv and of the nodes: Ray wants one Python version.
PYTHON = sys.executable
SHARDS = 12
ROWS = 360


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(argv, env, timeout=600, check=True, **kw):
    p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{argv} exited {p.returncode}:\n{p.stdout[-3000:]}\n"
                             f"{p.stderr[-3000:]}")
    return p


def outputs(folder: str) -> dict:
    """Every data and quarantine shard of an output folder, by name, as bytes."""
    found = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.parquet"))):
        with open(path, "rb") as f:
            found[os.path.basename(path)] = f.read()
    return found


@unittest.skipUnless(WHEEL and os.path.isfile(WHEEL) and RAY_DIR,
                     "no wheel: run `bash scripts/build-wheel.sh --debug` and set "
                     "TRUSTFLOW_WHEEL (scripts/test.sh does), with scripts/setup.sh sourced")
class WheelTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.root = tempfile.mkdtemp(prefix="trustflow-wheel-test-")
        cls.venv = os.path.join(cls.root, "venv")
        home = os.path.join(cls.root, "home")
        os.makedirs(home)
        # What a user's shell has after `python -m venv` and `pip install`: nothing else.
        cls.env = {"PATH": f"{cls.venv}/bin:/usr/bin:/bin", "HOME": home,
                   "LANG": "C.UTF-8"}
        started = time.monotonic()
        run([PYTHON, "-m", "venv", cls.venv], {"PATH": "/usr/bin:/bin", "HOME": home})
        # pip's cache and index settings come from the machine, as for any user.
        pip_env = dict(cls.env)
        for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CACHE_DIR", "PIP_CONFIG_FILE"):
            if name in os.environ:
                pip_env[name] = os.environ[name]
        pip_env["HOME"] = os.environ.get("HOME", home)
        run([f"{cls.venv}/bin/pip", "install", "--quiet", f"{WHEEL}[ray]"], pip_env)
        cls.install_s = time.monotonic() - started
        cls.corpus = os.path.join(cls.root, "corpus")
        run(["trustflow", "bench", "gen", "--rows", str(ROWS), "--shards", str(SHARDS),
             "--seed", "5", "--max-side", "64", "--out", cls.corpus], cls.env)
        cls.pipeline = os.path.join(cls.root, "clip.yaml")
        with open(cls.pipeline, "w") as f:
            f.write(f"name: wheel-check\nsource:\n  paths: [{cls.corpus}]\nstages:\n"
                    f"  - type: clip_score\n    model: {CLIP_MODEL}\n"
                    f"sink:\n  path: {cls.root}/out-local\nruntime:\n  batch_size: 16\n")
        cls.cluster_env = None

    @classmethod
    def tearDownClass(cls):
        cls.stop_cluster()
        shutil.rmtree(cls.root, ignore_errors=True)

    # ------------------------------------------------------------------ the cluster

    @classmethod
    def node_env(cls) -> dict:
        """A node: Python and Ray (scripts/setup.sh's pinned ray[default]), nothing of
        trustflow or ONNX Runtime on its PATH or in its environment."""
        return {"PATH": f"{os.path.dirname(PYTHON)}:/usr/bin:/bin",
                "HOME": os.path.join(cls.root, "node-home"), "PYTHONPATH": RAY_DIR,
                "LANG": "C.UTF-8", "RAY_USAGE_STATS_ENABLED": "0"}

    @classmethod
    def ray(cls, *args, env=None, check=True, timeout=300):
        return run([PYTHON, "-m", "ray.scripts.scripts", *args], env or cls.node_env(),
                   check=check, timeout=timeout)

    @classmethod
    def start_cluster(cls):
        """A head (1 CPU, with the jobs server on 127.0.0.1) and a second node (2 CPUs)."""
        if cls.cluster_env is not None:
            return
        os.makedirs(cls.node_env()["HOME"], exist_ok=True)
        cls.gcs_port, cls.dashboard_port = free_port(), free_port()
        cls.ray("start", "--head", "--port", str(cls.gcs_port), "--node-ip-address",
                "127.0.0.1", "--num-cpus", "1", "--include-dashboard", "true",
                "--dashboard-host", "127.0.0.1", "--dashboard-port", str(cls.dashboard_port))
        cls.ray("start", "--address", f"127.0.0.1:{cls.gcs_port}", "--node-ip-address",
                "127.0.0.1", "--num-cpus", "2")
        cls.cluster_env = cls.node_env()
        # The jobs server answers "No available agent" until the head's agent is up.
        deadline = time.monotonic() + 120
        while True:
            p = run(["ray", "job", "submit", "--address",
                     f"http://127.0.0.1:{cls.dashboard_port}", "--", "python3", "-c", "pass"],
                    cls.env, check=False)
            if p.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"the jobs server never took a job:\n{p.stderr[-2000:]}")
            time.sleep(1)

    @classmethod
    def stop_cluster(cls):
        if cls.cluster_env is not None:
            cls.ray("stop", "--force", check=False)
            cls.cluster_env = None

    def local_reference(self) -> dict:
        out = os.path.join(self.root, "out-local")
        if not os.path.isdir(out):
            run(["trustflow", "run", "--quiet", self.pipeline], self.env)
        return outputs(out)

    # ------------------------------------------------------------------ the tests

    def test_1_validate_and_run_from_the_wheel_with_no_environment(self):
        p = run(["trustflow", "validate", self.pipeline], self.env)
        self.assertIn("is valid", p.stdout)
        # Training is not in the wheel, and the command says what to do instead.
        p = run(["trustflow", "train", "train.yaml"], self.env, check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("Training needs libtorch", p.stderr)
        want = self.local_reference()
        self.assertEqual(len([n for n in want if not n.endswith(".quarantine.parquet")]),
                         SHARDS)
        with open(os.path.join(self.root, "out-local", "_report.json")) as f:
            report = json.load(f)
        self.assertTrue(report["invariant_holds"])
        self.assertEqual(report["rows_in"], ROWS)
        # ONNX Runtime came from the onnxruntime wheel, found by the `trustflow` command.
        p = run(["python", "-c", "import trustflow; print(trustflow.onnxruntime_library())"],
                self.env)
        self.assertIn(os.path.join(self.venv, "lib"), p.stdout)
        self.assertIn("onnxruntime/capi/libonnxruntime.so", p.stdout)

    def test_2_the_runner_ships_the_engine_to_nodes_that_lack_it(self):
        want = self.local_reference()
        self.start_cluster()
        out = os.path.join(self.root, "out-ray")
        p = run(["python", "-m", "trustflow_ray", "run", self.pipeline, "--out", out,
                 "--parts", "3", "--address", f"127.0.0.1:{self.gcs_port}"], self.env)
        self.assertIn("shipping the engine with the job", p.stderr)
        # Both nodes ran the binary Ray unpacked for the job, not one of their own.
        found = [line for line in p.stderr.splitlines()
                 if line.startswith("trustflow-ray: preflight: node")]
        self.assertEqual(len(found), 2, p.stderr)
        for line in found:
            self.assertIn("runtime_resources/py_modules_files", line)
            self.assertNotIn(self.venv, line)
        self.assertEqual(outputs(out), want)

    def submit(self, out: str):
        """The docs/ray.md command, with only the addresses (and paths) changed."""
        argv = ["ray", "job", "submit", "--address", f"http://127.0.0.1:{self.dashboard_port}",
                "--runtime-env-json", json.dumps({"py_modules": [WHEEL]}), "--",
                "python3", "-m", "trustflow_ray", "run", self.pipeline, "--out", out]
        return run(argv, self.env)

    def test_3_ray_job_submit_as_documented(self):
        want = self.local_reference()
        self.start_cluster()
        out = os.path.join(self.root, "out-job")
        p = self.submit(out)
        said = p.stdout + p.stderr
        job = re.search(r"Job '([^']+)' succeeded", said)
        self.assertIsNotNone(job, said[-3000:])
        address = ["--address", f"http://127.0.0.1:{self.dashboard_port}"]
        status = run(["ray", "job", "status", *address, job.group(1)], self.env)
        self.assertIn("succeeded", (status.stdout + status.stderr).lower())
        logs = run(["ray", "job", "logs", *address, job.group(1)], self.env)
        self.assertIn("invariant holds", logs.stdout)
        with open(os.path.join(out, "_report.json")) as f:
            merged = json.load(f)
        self.assertEqual(merged["rows_in"], ROWS)
        self.assertEqual(outputs(out), want)

    def test_4_the_python_sdk_submits_stops_and_resubmits(self):
        want = self.local_reference()
        self.start_cluster()
        out = os.path.join(self.root, "out-sdk")
        script = f"""
import json, sys, time
from ray.job_submission import JobSubmissionClient, JobStatus
client = JobSubmissionClient("http://127.0.0.1:{self.dashboard_port}")
entry = "python3 -m trustflow_ray run {self.pipeline} --out {out} --parts 6"
env = {{"py_modules": [{WHEEL!r}]}}
job = client.submit_job(entrypoint=entry, runtime_env=env)
# Stop it once the first shards are written.
import glob
deadline = time.time() + 300
while not glob.glob("{out}/*.manifest.json"):
    if client.get_job_status(job) in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        break
    assert time.time() < deadline, "no shard finished"
    time.sleep(0.05)
client.stop_job(job)
while client.get_job_status(job) not in (JobStatus.STOPPED, JobStatus.SUCCEEDED, JobStatus.FAILED):
    time.sleep(0.2)
first = client.get_job_status(job)
kept = len(glob.glob("{out}/*.manifest.json"))
job = client.submit_job(entrypoint=entry, runtime_env=env)
while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
    time.sleep(0.2)
print(json.dumps({{"first": str(first), "kept": kept, "second": str(client.get_job_status(job)),
                  "logs": client.get_job_logs(job)[-4000:]}}))
"""
        p = run(["python", "-c", script], self.env)
        result = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"\n  first job {result['first']} with {result['kept']} shard(s) kept",
              file=sys.stderr)
        self.assertEqual(result["second"], "SUCCEEDED", result["logs"])
        self.assertIn(result["first"], ("STOPPED", "SUCCEEDED"))
        self.assertGreaterEqual(result["kept"], 1)
        if result["first"] == "STOPPED":
            # The resubmitted job skipped what the stopped one had finished.
            self.assertRegex(result["logs"], r"[1-9]\d* skipped")
        self.assertEqual(outputs(out), want)


if __name__ == "__main__":
    unittest.main()
