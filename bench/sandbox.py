"""The development sandbox (``scripts/setup_dev.sh``), found in one place, and ComfyUI imported into this process.

``COMFY_DIR`` is the ComfyUI tree (``.comfyui/``, or ``$BRANCHGRPO_COMFYUI_DIR``), ``VENV_PYTHON`` the Python that
runs it (``.venv/bin/python``, or ``$BRANCHGRPO_COMFY_PYTHON``). :func:`import_comfy` imports ComfyUI's modules and
the pack (as ComfyUI imports a custom node, so the top-level ``nodes`` stays ComfyUI's) with one attention setting
for every caller: PyTorch's SDPA, what ComfyUI uses on CUDA GPUs. Its CPU default (sub-quadratic chunks sized by
the free RAM of the moment) would make activation sizes depend on the machine's free memory.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMFY_DIR = Path(os.environ.get("BRANCHGRPO_COMFYUI_DIR", ROOT / ".comfyui"))
VENV_PYTHON = Path(os.environ.get("BRANCHGRPO_COMFY_PYTHON", ROOT / ".venv" / "bin" / "python"))
PACK = "comfyui_branchgrpo_pack"
"""The module name the pack is imported under in this process."""


def comfy_missing_reason() -> str | None:
    """Why ComfyUI cannot be used here (a sentence), or None."""
    if not (COMFY_DIR / "comfy" / "samplers.py").is_file():
        return f"ComfyUI is missing at {COMFY_DIR}: run scripts/setup_dev.sh"
    return None


def import_comfy(cpu: bool = True):
    """ComfyUI's modules in this process and the pack; returns the pack's ``nodes`` package."""
    reason = comfy_missing_reason()
    if reason:
        raise SystemExit(reason)
    if str(COMFY_DIR) not in sys.path:
        sys.path.insert(0, str(COMFY_DIR))
    import comfy.cli_args
    if cpu:
        comfy.cli_args.args.cpu = True
    comfy.cli_args.args.use_pytorch_cross_attention = True
    import comfy.model_management  # noqa: F401
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = mod
        spec.loader.exec_module(mod)
    return importlib.import_module(f"{PACK}.nodes")


def pack_module(name: str):
    """``nodes.<name>`` of the pack imported by :func:`import_comfy`."""
    return importlib.import_module(f"{PACK}.nodes.{name}")
