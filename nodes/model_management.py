"""ComfyUI's model management as the pack uses it: is a model loaded, unload some, which patchers an object has.

ComfyUI internals used here (0.3.75): ``comfy.model_management.current_loaded_models`` and
``LoadedModel.model_unload`` (the unloading ``free_memory`` does).
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
    """Unload these ModelPatchers from model management (weights back to their offload device), as
    ``free_memory`` unloads a model; others stay. Returns how many were unloaded."""
    targets = {id(p) for p in patchers if p is not None}
    loaded = need("current_loaded_models")
    n = 0
    for i in range(len(loaded) - 1, -1, -1):
        lm = loaded[i]
        if id(lm.model) in targets:
            lm.model_unload()
            loaded.pop(i)
            n += 1
    if n:
        mm.soft_empty_cache()
    return n


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
