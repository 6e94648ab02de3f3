"""ComfyUI's model management as the pack uses it: is a model loaded, unload some, which patchers an object has.

ComfyUI internals used here (0.3.75 to 0.33.0): ``comfy.model_management.current_loaded_models`` (read, never
edited), ``LoadedModel.model`` / ``.device`` and ``free_memory(memory_required, device, keep_loaded)``.
"""
from __future__ import annotations

from typing import Iterable

import comfy.model_management as mm


def need(name: str):
    """``comfy.model_management.<name>``, or an error naming the ComfyUI version found and the one needed."""
    if not hasattr(mm, name):
        import comfyui_version  # noqa: F401  (present in every ComfyUI checkout)
        raise RuntimeError(f"BranchGRPO Trainer: comfy.model_management.{name} is missing in ComfyUI "
                           f"{getattr(comfyui_version, '__version__', '?')}; this pack needs ComfyUI 0.3.75 or later.")
    return getattr(mm, name)


def is_loaded(patcher) -> bool:
    """Whether model management holds ``patcher`` loaded (fully or partially)."""
    return any(lm.model is patcher for lm in need("current_loaded_models"))


def release(patchers: Iterable) -> int:
    """Unload these ModelPatchers from model management (weights back to their offload device); others stay.
    Done by model management itself: ``free_memory`` on each of their devices, keeping every other loaded model.
    Returns how many were unloaded."""
    targets = {id(p) for p in patchers if p is not None}
    loaded = list(need("current_loaded_models"))
    hits = [lm for lm in loaded if id(lm.model) in targets]
    if not hits:
        return 0
    keep = [lm for lm in loaded if id(lm.model) not in targets]
    for device in {lm.device for lm in hits}:
        need("free_memory")(1e30, device, keep_loaded=keep)
    mm.soft_empty_cache()
    return len(hits)


def patchers_of(obj) -> list:
    """The ModelPatchers behind a CLIP, VAE or reward (a Reward Mix: those of every scorer)."""
    if obj is None:
        return []
    out = []
    p = getattr(obj, "patcher", None)
    if p is not None:
        out.append(p)
    out += list(getattr(obj, "patchers", []) or [])
    for r in getattr(obj, "rewards", []) or []:
        out += patchers_of(r)
    return out


__all__ = ["is_loaded", "release", "patchers_of", "need"]
