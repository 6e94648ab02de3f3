"""Atomic file writes: nothing is ever left half-written.

The content goes to a temporary file in the target folder, is flushed and fsynced, then renamed over
the target (atomic on POSIX and Windows); on any failure the temporary file is removed and an older
file at the target stays intact. Every checkpoint, LoRA and config the project writes goes through here.

Files get the ordinary permissions of a new file (``0o666`` less the process umask, so ``0o644`` under the
usual umask ``022``), like every other output of ComfyUI: a LoRA is meant to be shared. (``tempfile.mkstemp``
would create them ``0o600``.)
"""
from __future__ import annotations

import os
import secrets
from typing import IO, Callable

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)


def _create_temp(folder: str, name: str) -> tuple[int, str]:
    """A new, empty file next to the target, created with mode ``0o666`` (the kernel applies the umask)."""
    for _ in range(100):
        tmp = os.path.join(folder, f".tmp-{secrets.token_hex(6)}-{name}")
        try:
            return os.open(tmp, _FLAGS, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file for {name!r} in {folder}")


def _is_temp_of(entry: str, name: str | None) -> bool:
    """Whether ``entry`` is a temporary file of :func:`_create_temp` (``.tmp-<12 hex>-<name>``)."""
    if not entry.startswith(".tmp-") or len(entry) < 19 or entry[17] != "-":
        return False
    token = entry[5:17]
    return all(c in "0123456789abcdef" for c in token) and (name is None or entry[18:] == name)


def remove_stale_temps(folder: str | os.PathLike, name: str | None = None) -> list[str]:
    """Remove the temporaries a crashed :func:`atomic_write` left in ``folder`` (of target ``name``, or all);
    returns the paths removed. Call it where no other write into ``folder`` can be under way (a run's start)."""
    folder = os.fspath(folder)
    try:
        entries = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for entry in entries:
        path = os.path.join(folder, entry)
        if _is_temp_of(entry, name) and os.path.isfile(path) and not os.path.islink(path):
            try:
                os.unlink(path)
                removed.append(path)
            except OSError:
                pass
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], *, binary: bool = True) -> None:
    """Call ``write(handle)`` on a temporary file, then move it over ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = _create_temp(folder, os.path.basename(path))
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text), binary=False)


def _fsync_dir(directory: str) -> None:
    """Persist a rename on POSIX; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
