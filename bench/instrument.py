"""An instrument independent of the memory prediction: what the process (CPU) or the device (CUDA) really held.

**CPU: the kernel's own peak counter.** Linux keeps each process's peak resident set size (``VmHWM`` in
``/proc/self/status``) and resets it to the current size when ``5`` is written to ``/proc/self/clear_refs``. So a
phase's peak is exact, whatever allocates (tensors, the allocator's rounding and headers, operator workspaces,
OpenMP scratch, Python objects): at the phase's start the counter is reset and the resident size read (the
*baseline*), at its end the counter is read (the *peak*); ``peak - baseline`` is what the phase added at its
worst, its measured **transient**. No sampling thread (nothing to miss, no GIL taken from the run).

glibc keeps freed heap memory for reuse unless told otherwise, and then a phase's allocations may not show: the
measuring process must run with ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` pinned (:data:`MALLOC_ENV`;
large blocks are then mapped and unmapped, so RSS follows what is alive). :func:`malloc_pinned` says whether they
are, :func:`reexec_pinned` restarts a command line with them.

**CUDA: the caching allocator and the driver.** ``max_memory_allocated`` / ``max_memory_reserved`` reset per phase,
and ``mem_get_info`` (free bytes on the device: the CUDA context, library workspaces and other processes too) at
the phase's start and end.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "0"}
_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def malloc_pinned() -> bool:
    return all(os.environ.get(k) == v for k, v in MALLOC_ENV.items())


def reexec_pinned(argv: list[str] | None = None) -> None:
    """Restart this Python with :data:`MALLOC_ENV` set (glibc reads it at start), unless it already is."""
    if malloc_pinned():
        return
    if argv is None:
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        argv = ["-m", spec.name, *sys.argv[1:]] if spec is not None and spec.name else sys.argv
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *argv], {**os.environ, **MALLOC_ENV})


def _status_kb(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} is not in {_STATUS}")


def rss() -> int:
    """Resident set size of this process, in bytes."""
    return _status_kb("VmRSS") * 1024


def peak_rss() -> int:
    """Peak resident set size since the last :func:`reset_peak_rss` (or the start), in bytes."""
    return _status_kb("VmHWM") * 1024


def reset_peak_rss() -> None:
    _CLEAR.write_text("5")


def available() -> str | None:
    """Why the CPU instrument cannot run here (a sentence), or None."""
    try:
        peak_rss()
        reset_peak_rss()
    except (OSError, RuntimeError) as e:
        return f"the kernel's peak counter cannot be read or reset here ({e})"
    return None


class PhaseMemory:
    """Per-phase memory of a run, measured: ``switch(name)`` ends the current phase and starts ``name`` (``None``:
    no phase). A phase entered again in the same round (a callback repeating its name) goes on uninterrupted.
    ``rounds`` holds one dict per :meth:`new_round` (an iteration): ``{phase: {"baseline", "peak",
    "transient"}}`` in bytes (CPU), or ``{"allocated", "reserved", "free_before", "free_after", "baseline"}``
    (CUDA; ``baseline`` is ``memory_allocated`` at the phase's start)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if not self.cuda:
            reason = available()
            if reason:
                raise RuntimeError(reason)
        self.rounds: list[dict[str, dict]] = []
        self.current: str | None = None
        self._start: dict = {}

    def new_round(self) -> None:
        self.switch(None)
        self.rounds.append({})

    def _begin(self, name: str) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = {"baseline": torch.cuda.memory_allocated(self.device),
                           "free_before": torch.cuda.mem_get_info(self.device)[0]}
        else:
            reset_peak_rss()
            self._start = {"baseline": rss()}

    def _end(self, name: str) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            rec = {**self._start, "allocated": torch.cuda.max_memory_allocated(self.device),
                   "reserved": torch.cuda.max_memory_reserved(self.device),
                   "free_after": torch.cuda.mem_get_info(self.device)[0]}
            rec["transient"] = rec["allocated"] - rec["baseline"]
        else:
            peak = peak_rss()
            rec = {**self._start, "peak": peak, "transient": peak - self._start["baseline"]}
        rnd = self.rounds[-1] if self.rounds else self.rounds.append({}) or self.rounds[-1]
        old = rnd.get(name)
        if old is None or rec["transient"] > old["transient"]:  # a phase met twice in a round: its worst
            rnd[name] = rec

    def switch(self, name: str | None) -> None:
        if name == self.current:
            return
        if self.current is not None:
            self._end(self.current)
        self.current = name
        if name is not None:
            self._begin(name)
