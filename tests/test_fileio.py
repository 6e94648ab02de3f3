"""branchgrpo.fileio: atomic writes create files with the ordinary, umask-respecting permissions."""
from __future__ import annotations

import os
import stat
import sys

import pytest
import torch

from branchgrpo.fileio import atomic_write, write_text_atomic
from branchgrpo.lora import save_state_dict

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring the old one afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_files_are_0644_under_umask_022(tmp_path, umask):
    umask(0o022)
    atomic_write(tmp_path / "a.bin", lambda fh: fh.write(b"x"))
    write_text_atomic(tmp_path / "b.toml", "x = 1\n")
    save_state_dict(tmp_path / "lora.safetensors", {"w": torch.zeros(2)})  # the LoRA writer
    for name in ("a.bin", "b.toml", "lora.safetensors"):
        assert _mode(tmp_path / name) == 0o644, name
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "b.toml", "lora.safetensors"]  # no temporary file left


def test_mode_follows_the_umask_and_replaces_keep_it(tmp_path, umask):
    umask(0o077)
    atomic_write(tmp_path / "private.bin", lambda fh: fh.write(b"x"))
    assert _mode(tmp_path / "private.bin") == 0o600
    umask(0o002)
    atomic_write(tmp_path / "private.bin", lambda fh: fh.write(b"y"))  # a rewrite is a new file: new mode
    assert _mode(tmp_path / "private.bin") == 0o664
    assert (tmp_path / "private.bin").read_bytes() == b"y"
