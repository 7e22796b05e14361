#!/usr/bin/env python3
"""Writes the trustflow wheel (PEP 427) from an engine binary and the Python packages
under python/: `trustflow` (the `trustflow` command, which runs the binary in
`trustflow/bin/` with ONNX Runtime from the pinned onnxruntime wheel) and
`trustflow_ray` (the cluster runner). Entries are sorted and dated 1980-01-01, so the
same inputs give the same bytes.

    build_wheel.py --binary BIN --version 0.1.0 --platform manylinux_2_36_x86_64 --out dist

Prints the wheel's path. scripts/build-wheel.sh picks the platform tag with
`auditwheel show` (an honest tag is the oldest glibc the binary's symbols allow).
"""

import argparse
import base64
import hashlib
import sys
import zipfile
from pathlib import Path

NAME = "trustflow"
PACKAGES = ["trustflow", "trustflow_ray"]
# The same pins as scripts/setup.sh: the ONNX Runtime the engine is built and tested
# against, and the Ray of the runner (with the jobs API: `ray job submit`).
REQUIRES = ["onnxruntime==1.31.1"]
EXTRAS = {"ray": ["ray[default]==2.60.0"]}
SUMMARY = ("Streaming image-caption pipelines with ONNX model stages and exactly-once "
           "Parquet outputs (TRUST's enrichment), and a Ray runner")
EPOCH = (1980, 1, 1, 0, 0, 0)


def metadata(version: str) -> str:
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {NAME}",
        f"Version: {version}",
        f"Summary: {SUMMARY}",
        "License: Apache-2.0",
        "Requires-Python: >=3.9",
    ]
    lines += [f"Requires-Dist: {r}" for r in REQUIRES]
    for extra, reqs in EXTRAS.items():
        lines.append(f"Provides-Extra: {extra}")
        lines += [f'Requires-Dist: {r}; extra == "{extra}"' for r in reqs]
    return "\n".join(lines) + "\n"


def entry(arcname: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(arcname, EPOCH)
    info.external_attr = (0o100000 | mode) << 16  # a regular file with these bits
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


def record_line(arcname: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return f"{arcname},sha256={digest.decode()},{len(data)}"


def build(binary: Path, python: Path, version: str, platform: str, out: Path) -> Path:
    dist_info = f"{NAME}-{version}.dist-info"
    files = []
    for package in PACKAGES:
        sources = sorted((python / package).rglob("*.py"))
        if not sources:
            sys.exit(f"build_wheel: no Python package {python / package}")
        for path in sources:
            files.append((path.relative_to(python).as_posix(), path.read_bytes(), 0o644))
    files.append((f"{NAME}/bin/trustflow", binary.read_bytes(), 0o755))
    files.append((f"{dist_info}/METADATA", metadata(version).encode(), 0o644))
    files.append((f"{dist_info}/WHEEL", (
        "Wheel-Version: 1.0\nGenerator: trustflow scripts/wheel/build_wheel.py\n"
        f"Root-Is-Purelib: false\nTag: py3-none-{platform}\n").encode(), 0o644))
    files.append((f"{dist_info}/entry_points.txt", (
        "[console_scripts]\ntrustflow = trustflow:main\n"
        "trustflow-ray = trustflow_ray.__main__:main\n").encode(), 0o644))
    files.append((f"{dist_info}/top_level.txt", "\n".join(PACKAGES).encode() + b"\n", 0o644))
    files.sort(key=lambda f: f[0])
    record = [record_line(name, data) for name, data, _ in files]
    record.append(f"{dist_info}/RECORD,,")
    out.mkdir(parents=True, exist_ok=True)
    wheel = out / f"{NAME}-{version}-py3-none-{platform}.whl"
    tmp = wheel.with_suffix(".whl.tmp")
    with zipfile.ZipFile(tmp, "w") as z:
        for name, data, mode in files:
            z.writestr(entry(name, mode), data)
        z.writestr(entry(f"{dist_info}/RECORD", 0o644), "\n".join(record) + "\n")
    tmp.replace(wheel)
    return wheel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--binary", type=Path, required=True, help="the engine binary")
    p.add_argument("--python", type=Path, default=Path(__file__).resolve().parents[2] / "python")
    p.add_argument("--version", required=True)
    p.add_argument("--platform", default="linux_x86_64")
    p.add_argument("--out", type=Path, default=Path("dist"))
    a = p.parse_args()
    if not a.binary.is_file():
        sys.exit(f"build_wheel: no binary at {a.binary}")
    print(build(a.binary, a.python, a.version, a.platform, a.out))


if __name__ == "__main__":
    main()
