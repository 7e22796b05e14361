"""Running the trustflow binary as a child that cannot outlive its Ray task.

Two mechanisms, for the two ways a task ends:

* The child starts in its own session (so its own process group). When the task
  ends by an exception, a cancellation (Ray raises KeyboardInterrupt in the task) or
  anything else that unwinds the Python stack, the whole group is killed: SIGTERM
  first (trustflow stops cleanly, keeps finished shards, exits 130), then SIGKILL.
* PR_SET_PDEATHSIG(SIGKILL), set in the child between fork and exec, makes the kernel
  kill it when the thread that started it dies: a worker killed with `kill -9`, an
  out-of-memory kill or a node that goes away takes its trustflow with it, so no
  orphan keeps writing into the output folder while Ray retries the part elsewhere.

A wrapper script given as the binary must `exec` trustflow, or the grandchild would
escape the parent-death signal (the process group kill still reaches it).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from typing import Optional, Sequence

PR_SET_PDEATHSIG = 1
# How long a child has to stop cleanly after SIGTERM before it gets SIGKILL.
KILL_GRACE_S = 5.0
# How long a wait for the child blocks before Python looks for an interrupt.
WAIT_SLICE_S = 0.5

try:
    _LIBC: Optional[ctypes.CDLL] = ctypes.CDLL(None, use_errno=True)
    _LIBC.prctl  # noqa: B018 (Linux only)
except (OSError, AttributeError):  # not Linux: the process group kill still applies
    _LIBC = None


def _die_with_parent(parent_pid: int):
    """A preexec_fn: ask for SIGKILL when the parent dies, and close the race where it
    died before the request was made."""

    def preexec():
        if _LIBC is not None:
            _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def kill_group(proc: subprocess.Popen, grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM the child's process group, then SIGKILL it after `grace_s`."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_tied(
    argv: Sequence[str],
    stdout_path: str,
    stderr_path: str,
    env: Optional[dict] = None,
    on_start=None,
) -> int:
    """Run `argv` to completion as a child tied to this thread; its exit code (a
    negative number -S when killed by signal S). `on_start(pid)` is called once it
    runs. Whatever ends this call early kills the child's process group first."""
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()),
        )
    try:
        if on_start is not None:
            on_start(proc.pid)
        while True:
            # Waited in slices, not in one blocking waitpid: Ray cancels a task by
            # raising KeyboardInterrupt in it (`_thread.interrupt_main`), which Python
            # only delivers between bytecodes, so a single wait would hold the
            # cancellation until the child ended by itself.
            try:
                return proc.wait(timeout=WAIT_SLICE_S)
            except subprocess.TimeoutExpired:
                continue
    finally:
        kill_group(proc)


def tail(path: str, limit: int = 4000) -> str:
    """The last `limit` characters of a text file ('' when absent)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""
