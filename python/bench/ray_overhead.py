"""What the Ray runner costs over one `trustflow run`: a tiny-shard pipeline on a local
two-node Ray cluster vs one process on this machine (docs/ray.md, "Overhead").

    source scripts/setup.sh
    PYTHONPATH=$TRUSTFLOW_RAY_DIR:python python3 python/bench/ray_overhead.py \
        [--binary $CARGO_TARGET_DIR/debug/trustflow] [--shards 64] [--rows 256] [--parts 8 16 32]

Prints one JSON object: the single-process run, N sequential `--part i/N` processes (the
binary's own start-up per part, without Ray), the cluster's start-up, and per N the
driver's wall time, its phases and the per-task overhead (task wall minus the part's
own wall).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def timed(cmd, **kw):
    t = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    return time.monotonic() - t


def main():
    p = argparse.ArgumentParser()
    default_bin = os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "debug", "trustflow")
    p.add_argument("--binary", default=os.environ.get("TRUSTFLOW_BIN", default_bin))
    p.add_argument("--shards", type=int, default=64)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--parts", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--head-cpus", type=int, default=1)
    p.add_argument("--node-cpus", type=int, default=1)
    a = p.parse_args()
    binary = os.path.abspath(a.binary)
    root = tempfile.mkdtemp(prefix="trustflow-ray-overhead-")
    corpus = os.path.join(root, "corpus")
    subprocess.run([binary, "bench", "gen", "--rows", str(a.rows), "--shards", str(a.shards),
                    "--seed", "1", "--out", corpus, "--max-side", "64", "--min-side", "32"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pipeline = os.path.join(root, "p.yaml")
    with open(pipeline, "w") as f:
        f.write(f"source:\n  paths: [{corpus}]\nstages:\n  - type: clean_caption\n"
                f"sink:\n  path: {root}/unused\n")
    out = {"shards": a.shards, "rows": a.rows, "binary": binary, "cpus": os.cpu_count()}

    single = os.path.join(root, "single")
    out["single_process_s"] = timed([binary, "run", pipeline, "--out", single, "--quiet"])
    with open(os.path.join(single, "_report.json")) as f:
        out["single_process_engine_wall_s"] = json.load(f)["wall_s"]
    out["plan_s"] = timed([binary, "plan", pipeline, "--input", corpus])
    out["version_s"] = timed([binary, "--version"])
    seq = {}
    for n in a.parts:
        d = os.path.join(root, f"seq-{n}")
        t = time.monotonic()
        for i in range(n):
            subprocess.run([binary, "run", pipeline, "--out", d, "--part", f"{i}/{n}", "--quiet",
                            "--report", os.path.join(root, f"seq-{n}-{i}.json")],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seq[n] = time.monotonic() - t
    out["sequential_parts_s"] = seq

    from ray.cluster_utils import Cluster

    t = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": a.head_cpus, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    cluster.add_node(num_cpus=a.node_cpus, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    out["cluster_start_s"] = time.monotonic() - t
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.abspath(x) for x in env.get("PYTHONPATH", "").split(os.pathsep) if x] + [here])
    runs = {}
    try:
        for n in a.parts:
            d = os.path.join(root, f"ray-{n}")
            t = time.monotonic()
            proc = subprocess.run([sys.executable, "-m", "trustflow_ray", "run", pipeline,
                                   "--input", corpus, "--out", d,
                            "--address", cluster.address, "--binary", binary, "--parts", str(n),
                            "--num-cpus", "1", "--quiet"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            total = time.monotonic() - t
            if proc.returncode != 0:
                sys.exit(f"the driver failed ({proc.returncode}):\n{proc.stderr}")
            with open(os.path.join(d, "_report.json")) as f:
                r = json.load(f)
            over = [p["task_wall_s"] - p["wall_s"] for p in r["part_reports"]]
            runs[n] = {
                "driver_process_s": total,
                "driver_report_wall_s": r["wall_s"],
                "submit_to_done_s": r["submit_to_done_s"],
                "task_wall_mean_s": statistics.mean(p["task_wall_s"] for p in r["part_reports"]),
                "part_engine_wall_mean_s": statistics.mean(p["wall_s"] for p in r["part_reports"]),
                "per_task_overhead_mean_s": statistics.mean(over),
                "per_task_overhead_max_s": max(over),
                "retries": r["retries"],
                "complete": r["complete"],
            }
    finally:
        cluster.shutdown()
    out["ray"] = runs
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
