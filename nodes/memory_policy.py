"""How a training run shares one card with its text encoders, VAE and reward models, through ComfyUI's model
management (``comfy.model_management``): what is loaded when, and what is released after each phase.

* Text encoders: every prompt is encoded once per run (the Trainer keeps the conditioning for all
  iterations); the CLIP is released before the rollout.
* The diffusion model is loaded for the rollout; the VAE (decode phase) and each reward model (reward phase)
  are loaded in turn, in chunks of leaves sized to the budget, and each is released when its phase ends
  (:class:`ReleaseAfterPhase`). If one of them pushed the diffusion model out, the update loads it back:
  at most one load of the diffusion model per iteration.
* Base weights in fp8 (:func:`with_base_dtype`): what the stock UNETLoader's ``weight_dtype`` fp8_e4m3fn /
  fp8_e5m2 gives: Linear weights stored in fp8, cast per layer to the compute dtype by ComfyUI's
  manual-cast ops; the LoRA's weight wrapper then adds its update in that compute dtype.
* :func:`plan` picks the defaults of all of this from the memory budget.

ComfyUI internals used here (0.3.75): ``current_loaded_models`` / ``LoadedModel.model_unload`` (the unloading
``free_memory`` does), ``ModelPatcher.clone``, ops modules' ``comfy_cast_weights``, ``BaseModel.manual_cast_dtype``,
``VAE.memory_used_decode``.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Iterable

import torch

import comfy.model_management as mm

from branchgrpo.trainer import Callback

log = logging.getLogger("BranchGRPO")

FP8 = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
BASE_WEIGHT_CHOICES = ("auto", "as loaded", *FP8)
#: ``auto`` stores the base in fp8 when the weights as loaded take more than this share of the budget
#: (the rest is for the VAE, the reward model, the stored tree, the LoRA's optimizer state and activations).
FP8_WHEN_WEIGHTS_OVER = 0.5


def _need(name: str):
    if not hasattr(mm, name):
        import comfyui_version  # noqa: F401  (present in every ComfyUI checkout)
        raise RuntimeError(f"BranchGRPO Trainer: comfy.model_management.{name} is missing in ComfyUI "
                           f"{getattr(comfyui_version, '__version__', '?')}; this pack needs ComfyUI 0.3.75 or later.")
    return getattr(mm, name)


# ------------------------------------------------------------------------------------------ loading
def is_loaded(patcher) -> bool:
    """Whether model management holds ``patcher`` loaded (fully or partially)."""
    return any(lm.model is patcher for lm in _need("current_loaded_models"))


def release(patchers: Iterable) -> int:
    """Unload these ModelPatchers from model management (weights back to their offload device), as
    ``free_memory`` unloads a model; others stay. Returns how many were unloaded."""
    targets = {id(p) for p in patchers if p is not None}
    loaded = _need("current_loaded_models")
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


class ReleaseAfterPhase(Callback):
    """Releases the VAE after the decode phase and reward model ``k`` after it has scored the leaves."""

    def __init__(self, vae, rewards):
        self.vae_patchers = patchers_of(vae)
        self.reward_patchers = [patchers_of(r) for r in rewards]
        self.released: list[str] = []

    def on_phase_end(self, phase: str, index: int | None = None) -> None:
        if phase == "decode":
            if release(self.vae_patchers):
                self.released.append("vae")
        elif phase == "reward" and index is not None and index < len(self.reward_patchers):
            if release(self.reward_patchers[index]):
                self.released.append(f"reward{index}")

    def on_rollout_end(self, iteration, tree, leaf_rewards, images) -> None:
        # a callback before this one may have decoded a preview after the decode phase: out again
        if release(self.vae_patchers):
            self.released.append("vae")


# ------------------------------------------------------------------------------------------- fp8 base
def with_base_dtype(model_patcher, dtype: torch.dtype):
    """A clone of ``model_patcher`` whose diffusion model stores its Linear weights in ``dtype`` (fp8) and
    computes in the model's compute dtype (``manual_cast_dtype``, else the dtype it was loaded in), as the
    stock UNETLoader's fp8 ``weight_dtype`` gives. The input MODEL is unchanged: the new model shares every
    other tensor with it; only the fp8 copies of the Linear weights are new (half the bytes of bf16)."""
    model = model_patcher.model
    dm = model.diffusion_model
    linears = [m for m in dm.modules() if isinstance(m, torch.nn.Linear) and hasattr(m, "comfy_cast_weights")]
    if not linears:
        raise ValueError("BranchGRPO Trainer: base_weights — this model's layers are not ComfyUI ops, so they "
                         "cannot compute from fp8 weights; set base_weights to 'as loaded'.")
    if all(m.weight.dtype == dtype for m in linears):
        return model_patcher.clone()
    # copy from the weights at rest (the offload device, nothing patched in): unload this model first
    release([lm.model for lm in _need("current_loaded_models") if lm.model.model is model])
    compute = model.manual_cast_dtype or model.get_dtype()
    if compute in FP8.values():
        compute = torch.bfloat16
    offload = model_patcher.offload_device
    memo = {}
    with torch.inference_mode(False), torch.no_grad():
        for m in linears:
            w = m.weight
            memo[id(w)] = torch.nn.Parameter(w.detach().to(device=offload, dtype=dtype), requires_grad=False)
        # everything else (norms, biases, embeddings, buffers) is shared, not copied
        for t in list(model.parameters()) + list(model.buffers()):
            memo.setdefault(id(t), t)
        if getattr(model, "current_patcher", None) is not None:  # set while a sampler runs it: not ours to copy
            memo[id(model.current_patcher)] = None
        new_model = copy.deepcopy(model, memo)
    for m in new_model.modules():
        if hasattr(m, "comfy_cast_weights"):
            m.weight_function, m.bias_function = [], []
            for attr in ("comfy_patched_weights", "prev_comfy_cast_weights"):
                if hasattr(m, attr):
                    delattr(m, attr)
            if isinstance(m, torch.nn.Linear) and m.weight.dtype == dtype:
                m.comfy_cast_weights = True
    new_model.manual_cast_dtype = compute
    new_model.device = offload
    new_model.model_loaded_weight_memory = 0
    new_model.model_lowvram = False
    new_model.current_weight_patches_uuid = None
    new_model.lowvram_patch_counter = 0
    clone = model_patcher.clone()
    clone.model = new_model
    clone.size = 0
    clone.backup, clone.object_patches_backup, clone.pinned = {}, {}, set()
    return clone


def weight_bytes(model_patcher, dtype: torch.dtype) -> int:
    """Bytes of the model's weights with its ComfyUI-op Linear weights stored in ``dtype`` (what
    :func:`with_base_dtype` keeps), everything else as loaded."""
    total = model_patcher.model_size()
    for m in model_patcher.model.diffusion_model.modules():
        if isinstance(m, torch.nn.Linear) and hasattr(m, "comfy_cast_weights"):
            w = m.weight
            total += w.numel() * (dtype.itemsize - w.element_size()) if w.element_size() > dtype.itemsize else 0
    return total


# -------------------------------------------------------------------------------------------- the plan
@dataclass
class MemoryPlan:
    base_weights: str          # "as loaded" or an fp8 name
    decode_batch: int          # leaves per VAE decode
    reward_batch: int          # leaves per reward call
    release_text_encoders: bool
    release_after_phase: bool

    def describe(self) -> str:
        return (f"base weights {self.base_weights}, decode {self.decode_batch} / reward {self.reward_batch} leaves "
                f"per call, text encoders released after encoding: {'yes' if self.release_text_encoders else 'no'}, "
                f"VAE and reward models released after their phase: {'yes' if self.release_after_phase else 'no'}")


def vae_bytes_per_leaf(vae, latent_shape) -> int:
    """Memory ComfyUI's VAE budgets to decode one latent (``memory_used_decode``), else 0."""
    fn = getattr(vae, "memory_used_decode", None)
    if fn is None:
        return 0
    try:
        return int(fn((1, *latent_shape), getattr(vae, "vae_dtype", torch.float32)))
    except Exception:  # a VAE without a decode-memory model: no bound from it
        return 0


def plan(*, budget: int, weights: int, latent_shape, max_batch: int, vae=None, reward=None,
         base_weights: str = "auto", reward_batch: int = 0, decode_batch: int = 0,
         release_models: str = "auto") -> MemoryPlan:
    """The memory settings of a run. ``budget``: bytes of the device; ``weights``: bytes of the diffusion
    model as loaded. ``0`` batches and ``"auto"`` choices pick themselves from the budget:

    * base weights: fp8 (e4m3fn) when the weights as loaded take more than half the budget
      (:data:`FP8_WHEN_WEIGHTS_OVER`) and are wider than fp8;
    * decode chunk: as many leaves as a quarter of the budget holds by the VAE's own decode-memory model
      (at most ``max_batch``);
    * reward chunk: the reward model's own ``batch_size`` if it has one, else ``max_batch``;
    * release: on when the weights take more than a quarter of the budget (off on a roomy card, where keeping
      the VAE and reward models resident saves their reload every iteration)."""
    if base_weights not in BASE_WEIGHT_CHOICES:
        raise ValueError(f"BranchGRPO Trainer: base_weights — {base_weights!r} is not one of "
                         f"{', '.join(BASE_WEIGHT_CHOICES)}.")
    if release_models not in ("auto", "on", "off"):
        raise ValueError(f"BranchGRPO Trainer: release_models — {release_models!r} is not auto, on or off.")
    budget = max(1, int(budget))
    if base_weights == "auto":
        base_weights = "fp8_e4m3fn" if weights > FP8_WHEN_WEIGHTS_OVER * budget else "as loaded"
    if decode_batch <= 0:
        per_leaf = vae_bytes_per_leaf(vae, latent_shape)
        decode_batch = max_batch if per_leaf <= 0 else max(1, min(max_batch, (budget // 4) // per_leaf))
    if reward_batch <= 0:
        sizes = [int(getattr(r, "batch_size", 0) or 0) for r in (getattr(reward, "rewards", None) or [reward])
                 if r is not None]
        sizes = [s for s in sizes if s > 0]
        reward_batch = min([max_batch] + sizes)
    release = release_models == "on" or (release_models == "auto" and weights > budget // 4)
    return MemoryPlan(base_weights=base_weights, decode_batch=int(decode_batch), reward_batch=int(reward_batch),
                      release_text_encoders=release, release_after_phase=release)


__all__ = ["MemoryPlan", "plan", "weight_bytes", "release", "is_loaded", "patchers_of", "ReleaseAfterPhase",
           "with_base_dtype",
           "BASE_WEIGHT_CHOICES", "FP8"]
