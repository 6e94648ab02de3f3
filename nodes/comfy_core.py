"""ComfyUI's internals, in one module: the rest of ``nodes/`` reaches ComfyUI only through this one
(``comfy_api.latest``, ComfyUI's public node schema, excepted). ``tests/test_comfy_contract.py`` checks every name
used through it against each core of the suite, without importing them; ``tests/test_layout.py`` that no other
module imports ComfyUI.

By concern (tested on ComfyUI 0.3.75 and 0.33.0):

* models and devices: ``mm`` (``comfy.model_management``), ``model_patcher`` (``ModelPatcher``: ``clone``,
  ``add_weight_wrapper``, ``model_options``), and the classes the demo model is built from (``model_base``,
  ``ops``, ``latent_formats``, ``supported_models_base``);
* the sampling path: ``samplers`` (``sampling_function``, ``CFGGuider``), ``sampler_helpers`` (``prepare_sampling``,
  ``cleanup_models``), ``model_sampling``, ``sample.fix_empty_latent_channels``, ``node_helpers`` (conditioning);
* adapters and LoRA files: :func:`weight_adapter` (the training modules and their factorisation),
  :func:`lora_diff_class`, :func:`bias_diff_class`, ``lora.model_lora_keys_unet``, ``sd.load_lora_for_models``,
  ``utils.load_torch_file``;
* unloading: :func:`is_loaded`, :func:`release`, :func:`free_cache` (model management's own functions; its lists
  are read, never edited);
* interrupt and progress: :data:`Interrupted` (a ``BaseException`` since 0.20.0: ``except Exception`` misses it),
  :func:`check_interrupted`, ``ProgressBar``;
* events and routes: :func:`prompt_server` (``PromptServer.instance``: ``send_sync``, ``routes``);
* folders: ``folder_paths``.

A capability is probed, not read off a version number; when it is missing, :func:`missing` says which ComfyUI was
found and the oldest that works.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Iterable

import comfy.latent_formats as latent_formats  # noqa: F401 (re-exported)
import comfy.lora as lora  # noqa: F401
import comfy.model_base as model_base  # noqa: F401
import comfy.model_management as mm
import comfy.model_patcher as model_patcher  # noqa: F401
import comfy.model_sampling as model_sampling  # noqa: F401
import comfy.ops as ops  # noqa: F401
import comfy.sample as sample  # noqa: F401
import comfy.sampler_helpers as sampler_helpers  # noqa: F401
import comfy.samplers as samplers  # noqa: F401
import comfy.sd as sd  # noqa: F401
import comfy.supported_models_base as supported_models_base  # noqa: F401
import comfy.utils as utils
import folder_paths  # noqa: F401
import node_helpers  # noqa: F401

#: the oldest ComfyUI the pack is tested on (pyproject.toml's requires-comfyui)
OLDEST = "0.3.75"
NODE = "BranchGRPO Trainer"

Interrupted = mm.InterruptProcessingException
ProgressBar = utils.ProgressBar


def version() -> str:
    """The version of the running ComfyUI (``comfyui_version.py``), or ``'unknown'``."""
    try:
        import comfyui_version
        return str(getattr(comfyui_version, "__version__", "unknown"))
    except ImportError:
        return "unknown"


def missing(what: str, detail: str = "", node: str = NODE) -> RuntimeError:
    """The error for a capability this ComfyUI lacks: what, the version found, the oldest that works."""
    return RuntimeError(f"{node}: {what} is missing in ComfyUI {version()}{f' ({detail})' if detail else ''}; this "
                        f"pack needs ComfyUI {OLDEST} or newer: update ComfyUI.")


def need(name: str):
    """``comfy.model_management.<name>``, or :func:`missing`."""
    if not hasattr(mm, name):
        raise missing(f"comfy.model_management.{name}")
    return getattr(mm, name)


# ---------------------------------------------------------------------------------------------- adapters
def weight_adapter():
    """``(adapters, factorization)``: ComfyUI's training modules (``comfy.weight_adapter``: ``adapters``, the
    classes that load a file's modules, and ``adapter_maps``, by algorithm name), and the LoKr / OFT block
    factorisation."""
    try:
        import comfy.weight_adapter as wa
        from comfy.weight_adapter.base import factorization
    except ImportError as e:  # pragma: no cover - ComfyUI before its trainer existed
        raise missing("comfy.weight_adapter", str(e)) from None
    return SimpleNamespace(adapters=wa.adapters, adapter_maps=wa.adapter_maps), factorization


def lora_diff_class():
    """ComfyUI's LoRA training module (``comfy.weight_adapter.lora.LoraDiff``)."""
    try:
        from comfy.weight_adapter.lora import LoraDiff
    except ImportError as e:  # pragma: no cover
        raise missing("comfy.weight_adapter.lora.LoraDiff", str(e)) from None
    return LoraDiff


def bias_diff_class(field: str = "train_bias_norm"):
    """ComfyUI's bias / norm delta module (``comfy_extras.nodes_train.BiasDiff``)."""
    try:
        from comfy_extras.nodes_train import BiasDiff
    except ImportError as e:  # pragma: no cover
        raise missing(f"comfy_extras.nodes_train.BiasDiff (for {field})", str(e)) from None
    return BiasDiff


# ---------------------------------------------------------------------------------------------- events
def prompt_server():
    """``server.PromptServer.instance`` (None outside a running server: a script, a test importing the pack)."""
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


def check_interrupted() -> None:
    """Raise :data:`Interrupted` when the user pressed Cancel."""
    mm.throw_exception_if_processing_interrupted()


# ---------------------------------------------------------------------------------------------- unloading
def free_cache() -> None:
    """Return cached device memory to the device (model management's ``soft_empty_cache``)."""
    mm.soft_empty_cache()


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
    free_cache()
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


__all__ = ["mm", "model_patcher", "samplers", "sampler_helpers", "model_sampling", "sample", "sd", "utils", "lora",
           "node_helpers", "folder_paths", "model_base", "ops", "latent_formats", "supported_models_base",
           "Interrupted", "ProgressBar", "version", "missing", "need", "weight_adapter", "lora_diff_class",
           "bias_diff_class", "prompt_server", "check_interrupted", "free_cache", "is_loaded", "release",
           "patchers_of", "OLDEST"]
