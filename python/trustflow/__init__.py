"""trustflow, installed from its wheel: the engine binary lives inside this package
(`bin/trustflow`), and ONNX Runtime comes from the pinned `onnxruntime` wheel beside it.

The `trustflow` command is `main` below: it finds ONNX Runtime's library and runs the
engine binary in its place, so nothing has to be exported. `ORT_DYLIB_PATH`, when set,
still wins. The Ray runner ships this package (and the ONNX Runtime library, as the
module `trustflow_ort`) with a job, so nodes need only Python and Ray.
"""

import glob
import importlib.util
import os
import sys
from pathlib import Path
from typing import Dict, Optional

__version__ = "0.1.0"

#: The library file the engine loads (ONNX Runtime's C API, the wheel's `capi/` folder).
ORT_LIBRARY_GLOB = "libonnxruntime.so*"


def binary() -> Path:
    """The engine binary inside this package."""
    return Path(__file__).resolve().parent / "bin" / "trustflow"


def _library_in(folder: str) -> Optional[str]:
    found = sorted(glob.glob(os.path.join(folder, ORT_LIBRARY_GLOB)))
    # The fully versioned name (libonnxruntime.so.1.31.1) is the longest.
    return max(found, key=len) if found else None


def onnxruntime_library() -> Optional[str]:
    """ONNX Runtime's library: `ORT_DYLIB_PATH` if set, else the copy a Ray job shipped
    (`trustflow_ort`), else the `onnxruntime` wheel's; None when there is none. Found
    without importing onnxruntime (which would load its Python bindings)."""
    if os.environ.get("ORT_DYLIB_PATH"):
        return os.environ["ORT_DYLIB_PATH"]
    for package, sub in (("trustflow_ort", ""), ("onnxruntime", "capi")):
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        for root in (spec.submodule_search_locations or []) if spec else []:
            lib = _library_in(os.path.join(root, sub))
            if lib:
                return lib
    return None


def environment(base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """`base` (default: this process's environment) with `ORT_DYLIB_PATH` set when
    ONNX Runtime is found and it was not set."""
    env = dict(os.environ if base is None else base)
    if not env.get("ORT_DYLIB_PATH"):
        lib = onnxruntime_library()
        if lib:
            env["ORT_DYLIB_PATH"] = lib
    return env


def main() -> None:
    """The `trustflow` command: the engine binary with ONNX Runtime found."""
    exe = binary()
    if not exe.is_file():
        sys.exit(f"trustflow: the engine binary is missing from this installation ({exe}); "
                 "reinstall the wheel")
    if not os.access(exe, os.X_OK):
        # An archive that dropped the mode bits (a Ray package, a copied tree).
        os.chmod(exe, 0o755)
    os.execve(str(exe), [str(exe), *sys.argv[1:]], environment())
