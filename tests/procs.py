"""Subprocesses that die with the test that started them.

``subprocess.run(..., timeout=)`` kills only its direct child: a ``bash`` script's Python, ``torchrun``'s
workers or ComfyUI's own children keep running after the test has failed. ``run`` starts the command in a
process group of its own and kills the whole group on timeout, on any exception (including pytest's
KeyboardInterrupt) and on the way out, so nothing it started outlives it.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from typing import Sequence

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def group_kwargs() -> dict:
    """Popen arguments: a process group of its own, and SIGKILL when the test process itself dies (Linux)."""
    return {"start_new_session": True, "preexec_fn": _die_with_parent}


def kill_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM to the process group of ``proc``, then SIGKILL after ``grace`` seconds; a group already gone is fine."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone; its children may not be: the SIGKILL round still reaches them
        if sig == signal.SIGTERM:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        break


def run(cmd: Sequence[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)`` in its own process group.
    On timeout the whole group is killed and ``subprocess.TimeoutExpired`` raised, with the output so far."""
    kwargs.setdefault("text", True)
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    proc = subprocess.Popen(list(cmd), **group_kwargs(), **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(proc.args, timeout, output=out, stderr=err)
    finally:
        if proc.poll() is None:
            kill_group(proc)
        # a finished leader can leave children behind (a background server of a script)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
