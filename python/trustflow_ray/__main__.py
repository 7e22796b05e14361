"""Command line: `python -m trustflow_ray run PIPELINE.yaml ...` (or `trustflow-ray`)."""

from __future__ import annotations

import argparse
import os
import sys


def at_least(lowest: int, kind=int):
    """An argparse type: a number of `kind` no smaller than `lowest`, else a usage error
    (exit 2) that names the value; `--parts 0` must not silently mean the default."""

    def check(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"{text} is less than {lowest}")
        return value

    return check


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trustflow-ray",
        description="Run a trustflow pipeline across a Ray cluster, exactly once per shard "
        "(docs/ray.md).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="plan once, run N parts as Ray tasks, merge the reports")
    r.add_argument("pipeline", help="pipeline file (the same path must exist on every node)")
    r.add_argument("--input", action="append", metavar="URI",
                   help="replace source.paths (repeatable; local paths go absolute)")
    r.add_argument("--out", metavar="URI", help="replace sink.path (a shared folder or s3://)")
    r.add_argument("--parts", type=at_least(1), metavar="N",
                   help="number of parts (default: 3 x the cluster's task slots, at most "
                   "the number of shards)")
    r.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, a local "
                   "cluster if one runs, else a new one on this machine)")
    r.add_argument("--binary", metavar="PATH", help="trustflow binary, same path on every "
                   "node (default: $TRUSTFLOW_BIN, else `trustflow` on each node's PATH)")
    r.add_argument("--max-retries", type=at_least(0), default=3, metavar="K",
                   help="retries of a part after a failure or a lost worker/node (default 3)")
    r.add_argument("--num-cpus", type=at_least(0, float), metavar="C",
                   help="CPUs per part (default: the pipeline's thread budget from the plan)")
    r.add_argument("--num-gpus", type=at_least(0, float), metavar="G",
                   help="GPUs per part (default: 1 if a stage uses CUDA, else 0)")
    r.add_argument("--report", metavar="PATH", help="where to write the job's report "
                   "(default: OUT/_report.json for a local out, ./trustflow-ray-report.json "
                   "for s3://)")
    r.add_argument("--env", action="append", metavar="NAME",
                   help="also forward this driver environment variable to the tasks "
                   "(repeatable; stored in the job's runtime_env, visible in the dashboard)")
    r.add_argument("--no-preflight", action="store_true",
                   help="skip the per-node check of the binary and native libraries")
    r.add_argument("--no-ship-package", action="store_true",
                   help="do not upload this package with the job (it is installed on the "
                   "nodes)")
    r.add_argument("--connect-timeout", type=at_least(1, float), default=120.0, metavar="S",
                   help="give up connecting to the cluster after S seconds (default 120)")
    r.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from .runner import ConnectTimeout, JobError, log, run_job

    try:
        return run_job(args)
    except ConnectTimeout as e:
        log(f"error: {e}")
        sys.stderr.flush()
        # Ray's connecting threads would keep the interpreter from exiting.
        os._exit(1)
    except JobError as e:
        log(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
