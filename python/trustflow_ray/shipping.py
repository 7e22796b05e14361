"""The engine shipped with a job. When the driver runs from the trustflow wheel (the
`trustflow` package holds the engine binary) and neither `--binary` nor
`$TRUSTFLOW_BIN` names a binary, the job's runtime environment carries two modules:
the `trustflow` package itself and `trustflow_ort`, a copy of the ONNX Runtime library
the driver uses. A node with Python and Ray, and nothing of trustflow, then runs parts:
Ray unpacks both modules on the node, and the part runs the binary from there with
`ORT_DYLIB_PATH` pointing at the shipped library.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, List, Optional, Tuple

#: `spec["binary"]` of a job whose engine travels with it (resolved on each node).
SHIPPED = "trustflow (shipped with the job)"

#: The module holding the shipped ONNX Runtime library (`trustflow.onnxruntime_library`
#: looks for it).
ORT_MODULE = "trustflow_ort"


def installed_engine():
    """The `trustflow` package when it holds an engine binary (installed from the
    wheel), else None."""
    try:
        import trustflow
    except ImportError:
        return None
    binary = getattr(trustflow, "binary", None)
    if binary is None or not binary().is_file():
        return None
    return trustflow


def job_runtime_env() -> Dict:
    """The runtime environment of the Ray job this driver runs in, when it was started
    by the jobs API (`ray job submit`); {} otherwise."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    try:
        return json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}


def bundle(workdir: str) -> Tuple[List[str], Dict[str, str]]:
    """The `py_modules` entries that carry the engine (the package folder, and the ONNX
    Runtime library copied into `workdir/trustflow_ort`), and what was found, for the
    log. Raises LookupError when the wheel or ONNX Runtime is not installed here."""
    trustflow = installed_engine()
    if trustflow is None:
        raise LookupError("the trustflow package with its engine binary is not installed")
    lib = trustflow.onnxruntime_library()
    if not lib or not os.path.isfile(lib):
        raise LookupError("ONNX Runtime's library was not found (install the wheel's "
                          "pinned onnxruntime, or set ORT_DYLIB_PATH)")
    ort_dir = os.path.join(workdir, ORT_MODULE)
    os.makedirs(ort_dir, exist_ok=True)
    with open(os.path.join(ort_dir, "__init__.py"), "w", encoding="utf-8") as f:
        f.write('"""ONNX Runtime\'s library, shipped with a trustflow Ray job."""\n')
    shutil.copy2(lib, os.path.join(ort_dir, os.path.basename(lib)))
    package = os.path.dirname(os.path.abspath(trustflow.__file__))
    found = {"binary": str(trustflow.binary()), "onnxruntime": lib,
             "version": getattr(trustflow, "__version__", "?")}
    return [package, ort_dir], found


def resolve(binary: str) -> Tuple[str, Optional[str]]:
    """On a node: the binary to run and the ONNX Runtime library it gets (`None`: the
    node's own environment decides). The shipped binary may have lost its mode bits in
    Ray's package archive."""
    if binary != SHIPPED:
        return binary, os.environ.get("ORT_DYLIB_PATH")
    trustflow = installed_engine()
    if trustflow is None:
        raise FileNotFoundError("the trustflow package shipped with the job is not "
                                "importable on this node (was the job started with "
                                "--no-ship-package?)")
    exe = str(trustflow.binary())
    if not os.access(exe, os.X_OK):
        os.chmod(exe, 0o755)
    lib = trustflow.onnxruntime_library()
    if lib:
        os.environ["ORT_DYLIB_PATH"] = lib
    return exe, lib
