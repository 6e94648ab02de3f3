"""Memory of a training run in ComfyUI: the policy that shares one card between the models, and the prediction.

**Policy** (:func:`plan`, :class:`ReleaseAfterPhase`, :func:`with_base_dtype`): how a run shares one card with its
text encoders, VAE and reward models, through ComfyUI's model management (``nodes/comfy_core.py``).

* Text encoders: every prompt is encoded once per run (the Trainer keeps the conditioning for all
  iterations); the CLIP is released before the rollout.
* The diffusion model is loaded for the rollout; the VAE (decode phase) and each reward model (reward phase)
  are loaded in turn, in chunks of leaves sized to the budget, and each is released when its phase ends. If one
  of them pushed the diffusion model out, the update loads it back: at most one load per iteration.
* Base weights in fp8: what the stock UNETLoader's ``weight_dtype`` fp8_e4m3fn / fp8_e5m2 gives: Linear weights
  stored in fp8, cast per layer to the compute dtype by ComfyUI's manual-cast ops; the adapter's weight wrapper
  then adds its update in that compute dtype.

**Prediction** (:func:`predict_run_memory`): probes of one model call under ``FakeTensorMode``. Nothing runs
arithmetic on the real model. A *twin* of the diffusion model is built from the MODEL's own ``model_config``
(same class, widths and weight dtypes; fp8 stays fp8) under ``FakeTensorMode`` with 1 or 2 blocks per block list,
the adapters (the run's algorithm) are attached through the same weight wrappers as in training, and one model
call of each kind runs through the Trainer's own sampling session (``ComfyFlowModel``, without model
management) while :class:`branchgrpo.memory.LiveTensors` follows every tensor it creates:

* the rollout: one no-grad call of ``max_batch`` latents;
* the update: one forward + backward of ``max_train_batch`` parents, with the run's gradient checkpointing.

The transient bytes of the full depth are extrapolated from the depths probed (exact when every block of a
list has the same shapes); the weights are the real model's, by dtype. The VAE decode is probed the same way
(its real weights, fake inputs, no gradients). :func:`branchgrpo.memory.plan_run` (the engine's accounting)
assembles the phases.

ComfyUI internals used here (0.3.75): ``ModelPatcher.clone``, ops modules' ``comfy_cast_weights``,
``BaseModel.manual_cast_dtype``, ``VAE.memory_used_decode``, ``model_config.get_model``.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensorMode


from branchgrpo.lora import LoRAConfig
from branchgrpo.memory import (LiveTensors, Phase, RunMemory, SavedTensors, extrapolate_depth, module_bytes,
                               planned_tree_bytes, plan_run)
from branchgrpo.trainer import Callback, TrainerConfig

from .adapters import count_trainable
from .comfy_model import ComfyFlowModel, attach_lora, encode_prompt, gradient_checkpointing, model_family
from .comfy_core import is_loaded, need, patchers_of, release
from .run_request import NODE
from . import comfy_core as core

log = logging.getLogger("BranchGRPO")
CPU = torch.device("cpu")
TEXT_TOKENS = 512
"""Text tokens assumed per prompt when the conditioning is not encoded yet (T5-XXL / umT5 at their longest)."""

FP8 = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
BASE_WEIGHT_CHOICES = ("auto", "as loaded", *FP8)

CUDA_RESERVE = 2 ** 30
"""Bytes kept free on a CUDA device for what no tensor shows: the CUDA context (0.3-0.6 GiB on recent drivers)
and the libraries' workspaces (cuBLAS, cuDNN, attention kernels). ``scripts/gpu_check.sh`` measures the context
(``mem_get_info`` against the allocator's reserve)."""
DEFAULT_MARGIN = 0.10
"""The caching allocator's reserve over the bytes allocated (block rounding, fragmentation), as a fraction of the
peak: the Trainer Settings' ``memory_margin``."""
RESIZED_BYTES = 2 * 224 * 224 * 3 * 4
"""A decoded leaf as a CLIP-style reward scores it: resized to 224 x 224 and normalised (two fp32 copies)."""


def reserve_bytes(device) -> int:
    """What :data:`CUDA_RESERVE` keeps free on ``device`` (0 off CUDA)."""
    return CUDA_RESERVE if torch.device(device).type == "cuda" else 0


def required_bytes(run: RunMemory, device, margin: float = DEFAULT_MARGIN) -> int:
    """The device memory a run needs: its predicted peak, the allocator's margin over it, and the reserve."""
    return int(run.peak * (1.0 + margin)) + reserve_bytes(device)


def linear_cast_bytes(diffusion_model: torch.nn.Module, dtype: torch.dtype) -> dict:
    """What fp8 base weights cost at compute time: ComfyUI's ops cast each Linear weight to the compute ``dtype``
    for its call. ``largest``: one layer's cast (a no-grad call frees it at once); ``block``: the largest block's
    casts (an update with checkpointing keeps one block's, for its backward); ``all``: every layer's (an update
    without checkpointing keeps each cast until the backward reaches it)."""
    size = torch.empty((), dtype=dtype).element_size()
    per = [m.weight.numel() * size for m in diffusion_model.modules()
           if isinstance(m, torch.nn.Linear) and hasattr(m, "comfy_cast_weights")]
    blocks = [sum(m.weight.numel() * size for m in b.modules() if isinstance(m, torch.nn.Linear))
              for lst in block_lists(diffusion_model).values() for b in lst]
    return {"largest": max(per, default=0), "block": max(blocks, default=0), "all": sum(per)}
#: ``auto`` stores the base in fp8 when the weights as loaded take more than this share of the budget
#: (the rest is for the VAE, the reward model, the stored tree, the LoRA's optimizer state and activations).
FP8_WHEN_WEIGHTS_OVER = 0.5



# ========================================================================================== policy
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
    release([lm.model for lm in need("current_loaded_models") if lm.model.model is model])
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
        # the config is shared, not copied (0.33's model config answers any missing attribute with None, which
        # makes deepcopy call None as __setstate__)
        memo[id(model.model_config)] = model.model_config
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
    if "model_override" in inspect.signature(model_patcher.clone).parameters:
        # public since 0.16: a plain (not DynamicVRAM) patcher over the new model, with empty backups of every kind
        n_backups = 4 if hasattr(model_patcher, "backup_buffers") else 3
        empty = ({}, {}, {}, set()) if n_backups == 4 else ({}, {}, set())
        clone = model_patcher.clone(disable_dynamic=True, model_override=(new_model, empty))
    else:  # 0.3.75
        clone = model_patcher.clone()
        clone.model = new_model
        clone.backup, clone.object_patches_backup, clone.pinned = {}, {}, set()
    clone.size = 0  # measured again: the fp8 weights take less
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


# ====================================================================================== prediction
def block_lists(diffusion_model: torch.nn.Module) -> dict[str, torch.nn.ModuleList]:
    """The transformer's block lists (the ModuleLists that gradient checkpointing wraps)."""
    return {name: child for name, child in diffusion_model.named_children()
            if isinstance(child, torch.nn.ModuleList) and len(child) > 0}


def truncate_blocks(diffusion_model: torch.nn.Module, keep: Sequence[int]) -> None:
    """Keep ``keep[i]`` blocks of the i-th block list: the first ``keep - 1`` and the last (some families
    build their last block differently, e.g. SD3's context stream ends in a pre-only block)."""
    for (name, blocks), n in zip(block_lists(diffusion_model).items(), keep):
        n = max(1, min(int(n), len(blocks)))
        kept = list(blocks)[:n - 1] + [blocks[len(blocks) - 1]]
        setattr(diffusion_model, name, torch.nn.ModuleList(kept))


def text_dims(diffusion_model: torch.nn.Module) -> tuple[int, int | None]:
    """(context width, pooled width or None) the diffusion model takes."""
    dm = diffusion_model
    for path in ("txt_in", "context_embedder", "text_embedding.0", "cap_embedder.1"):
        m = dm.get_submodule(path) if _has(dm, path) else None
        if isinstance(m, torch.nn.Linear):
            ctx = m.in_features
            break
    else:
        ctx = 4096
    pooled = None
    for path in ("vector_in.in_layer", "y_embedder.mlp.0"):
        m = dm.get_submodule(path) if _has(dm, path) else None
        if isinstance(m, torch.nn.Linear):
            pooled = m.in_features
            break
    return ctx, pooled


def _has(module: torch.nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def random_conditioning(diffusion_model: torch.nn.Module, tokens: int, guidance: float | None = 3.5,
                        generator: torch.Generator | None = None) -> list:
    """A CONDITIONING of the real shape (``[1, tokens, context]`` + pooled + guidance) with random values:
    what the text encoders would give, without running them."""
    ctx, pooled = text_dims(diffusion_model)
    extra: dict[str, Any] = {}
    if pooled is not None:
        extra["pooled_output"] = torch.randn(1, pooled, generator=generator)
    if guidance is not None:
        extra["guidance"] = guidance
    return [[torch.randn(1, tokens, ctx, generator=generator), extra]]


def conditioning_bytes(diffusion_model: torch.nn.Module, tokens: int, prompts: int) -> int:
    ctx, pooled = text_dims(diffusion_model)
    return prompts * 4 * (tokens * ctx + (pooled or 0))


def lora_param_count(diffusion_model: torch.nn.Module, lora_cfg: LoRAConfig, algorithm: str = "LoRA",
                     train_bias_norm: bool = False, existing=None) -> int:
    """Trainable numbers of the run's adapters (ComfyUI's modules for ``algorithm``, built on fake tensors; a
    continued file's own modules where it covers a layer)."""
    return count_trainable(diffusion_model, lora_cfg, algorithm=algorithm, train_bias_norm=train_bias_norm,
                           existing=existing)


class SamplingCall:
    """One model call of the Trainer's sampling session (:meth:`ComfyFlowModel.unmanaged_session
    <nodes.comfy_model.ComfyFlowModel.unmanaged_session>`: ``sampling_function``, CFG 1, no model management, the
    adapters' weight wrappers installed as a full load installs them), on ``conditioning``. :meth:`close` ends it."""

    def __init__(self, model_patcher, conditioning: list, latent_shape: Sequence[int], seed: int = 0):
        self.flow = ComfyFlowModel(model_patcher, latent_shape, conditioning={"probe": conditioning}, guidance=None,
                                   seed=seed)
        self._session = self.flow.unmanaged_session()
        self._session.__enter__()

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.flow.velocity(x, sigma, ["probe"], torch.zeros(x.shape[0], dtype=torch.long))

    def close(self) -> None:
        """Put back the layers' weight functions (needed when the probe ran on a real model)."""
        if self._session is not None:
            self._session.__exit__(None, None, None)
            self._session = None


def fake_twin(model_patcher, keep: Sequence[int] | None, mode: FakeTensorMode):
    """A ModelPatcher over a fake copy of ``model_patcher``'s diffusion model (same config and dtypes),
    truncated to ``keep`` blocks per list. Call inside ``mode``."""
    base = model_patcher.model.model_config.get_model({})
    if keep is not None:
        truncate_blocks(base.diffusion_model, keep)
    return core.model_patcher.ModelPatcher(base, load_device=CPU, offload_device=CPU)


def probe_calls(model_patcher, latent_shape: Sequence[int], lora_cfg: LoRAConfig, *, rollout_batch: int,
                train_batch: int, checkpointing: bool, text_tokens: int = 512, guidance: float | None = 3.5,
                metrics_batch: int = 0, conditioning: list | None = None,
                keep: Sequence[int] | None = None, count_saved: bool = False, fake: bool = True,
                algorithm: str = "LoRA", train_bias_norm: bool = False, kernel_device: str | None = None) -> dict:
    """Transient bytes of one rollout call and of one update chunk on a fake twin (no arithmetic); with
    ``fake=False`` the same calls on the model itself, computed (the measurement the sizing is checked against).
    ``kernel_device``: the device type the run computes on (``"cuda"``; None: the CPU the probe runs on), whose
    kernels' own buffers count (:func:`branchgrpo.memory.cpu_internal_bytes`)."""
    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    with torch.inference_mode(False), mode:
        twin = fake_twin(model_patcher, keep, mode) if fake else model_patcher
        dm = twin.model.diffusion_model
        frozen = list(twin.model.parameters()) + list(twin.model.buffers())
        mp, lora = attach_lora(twin, lora_cfg, seed=0, device=CPU, algorithm=algorithm, train_bias_norm=train_bias_norm)
        if fake:  # OFT's norm bound branches on a value, which fake tensors do not have (its tensors are block-sized)
            for m in lora.adapters:
                if hasattr(m, "constraint"):
                    m.constraint = 0.0
        if conditioning is None:
            cond = random_conditioning(dm, text_tokens, guidance)
        else:  # the run's own conditioning (a family's extra inputs, e.g. attention masks), as fakes
            cond = _as_fake(conditioning, mode) if fake else conditioning
        call = SamplingCall(mp, cond, latent_shape)
        out: dict[str, Any] = {"blocks": [len(b) for b in block_lists(dm).values()]}
        x = torch.randn(max(rollout_batch, metrics_batch), *latent_shape)
        live = LiveTensors(kernel_device)
        with live, torch.no_grad():
            v = call(x[:rollout_batch], torch.full((rollout_batch,), 0.5))
        del v
        out["rollout_call"] = live.peak
        out["metrics_call"] = 0
        if metrics_batch:
            live = LiveTensors(kernel_device)
            with live, torch.no_grad():
                v = call(x[:metrics_batch], torch.full((metrics_batch,), 0.5))
                v_ref = call(x[:metrics_batch], torch.full((metrics_batch,), 0.5))
            del v, v_ref
            out["metrics_call"] = live.peak
        x = torch.randn(train_batch, *latent_shape)
        live = LiveTensors(kernel_device)
        saved = SavedTensors(exclude=frozen)
        if count_saved:
            saved.label_blocks(block_lists(dm))
        with gradient_checkpointing(mp, checkpointing), live, (saved if count_saved else contextlib.nullcontext()):
            v = call(x, torch.full((train_batch,), 0.5))
            loss = v.float().pow(2).mean()
            loss.backward()
            del v, loss
        out["update_chunk"] = live.peak
        call.close()
        if count_saved:
            out["saved_total"] = saved.total
            out["saved_per_block"] = saved.per_list()
            out["saved_other"] = saved.per_block.get("other", 0)
    return out


def _as_fake(value, mode):
    """``value`` (conditioning: lists, tuples and dicts of tensors) with every tensor replaced by a fake."""
    if isinstance(value, torch.Tensor):
        return mode.from_tensor(value)
    if isinstance(value, dict):
        return {k: _as_fake(v, mode) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_as_fake(v, mode) for v in value)
    return value


def probe_depths(full: Sequence[int]) -> list[tuple[int, ...]]:
    """The depths probed: two blocks per list (the first and the last: the peak inside the costliest kind of
    block is in the base), then one more block in each list alone (what every further block adds: the
    inputs a checkpointed block keeps, nothing in a no-grad pass). Lists shorter than that are probed whole."""
    base = tuple(min(2, f) for f in full)
    depths = [base]
    for i, f in enumerate(full):
        if f > base[i]:
            depths.append(tuple(b + (1 if j == i else 0) for j, b in enumerate(base)))
    return depths


def probe_full_depth(model_patcher, latent_shape, lora_cfg: LoRAConfig, **kwargs) -> dict:
    """:func:`probe_calls` at the depths of :func:`probe_depths`, extrapolated to the model's full depth."""
    full = tuple(len(b) for b in block_lists(model_patcher.model.diffusion_model).values())
    probes = {d: probe_calls(model_patcher, latent_shape, lora_cfg, keep=d, **kwargs) for d in probe_depths(full)}
    out = {"depths": {str(d): {k: v for k, v in p.items() if k != "blocks"} for d, p in probes.items()},
           "full_depth": list(full)}
    for key in ("rollout_call", "update_chunk", "metrics_call"):
        out[key] = int(round(extrapolate_depth({d: p[key] for d, p in probes.items()}, full)))
    return out


class _DecodeOnly(torch.nn.Module):
    """A VAE object that is not a torch module, seen as one with no weights."""

    def __init__(self, vae):
        super().__init__()
        self._vae = vae

    def decode(self, z):
        return self._vae.decode(z)


def vae_probe(vae, latent_shape: Sequence[int], batch: int, kernel_device: str | None = None) -> dict:
    """Weights and the transient bytes of decoding ``batch`` latents with the VAE (its real weights, fake
    inputs, no gradients); ``image_bytes_per_leaf``: one decoded leaf as float32 pixels."""
    fsm = getattr(vae, "first_stage_model", vae)
    if not isinstance(fsm, torch.nn.Module):  # a VAE-like object without torch weights: only its decode counts
        fsm = _DecodeOnly(vae)
    weights = sum(module_bytes(fsm).values())
    dtype = next((p.dtype for p in fsm.parameters()), torch.float32)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    device = next((p.device for p in fsm.parameters()), CPU)
    with torch.inference_mode(False), mode, torch.no_grad():
        z = torch.randn(batch, *latent_shape, dtype=dtype, device=device)
        live = LiveTensors(kernel_device)
        with live:
            img = fsm.decode(z)
        per_leaf = img.numel() * 4 // batch
    return {"weights": weights, "decode_chunk": live.peak, "image_bytes_per_leaf": per_leaf, "batch": batch,
            "image_shape": list(img.shape[1:])}


def reward_probe(reward, image_shape: Sequence[int], batch: int, kernel_device: str | None = None) -> int:
    """Transient bytes of scoring one chunk of ``batch`` decoded leaves (fake images of ``image_shape``, no
    gradients) with a weight-free ``reward``, or 0 for one that cannot be traced on fake tensors."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with torch.inference_mode(False), mode, torch.no_grad():
            images = torch.rand(batch, *image_shape)
            live = LiveTensors(kernel_device)
            with live:
                reward(images, ["a probe"] * batch)
        return int(live.peak)
    except Exception:  # noqa: BLE001 - a scorer that needs values (tokenizers, PIL, .item())
        return 0


def reward_weight_bytes(rewards: Iterable[Any]) -> int:
    """Bytes of the torch modules behind reward scorers (0 for weight-free ones)."""
    total, seen = 0, set()
    for r in rewards:
        mods = []
        for attr in ("modules", "torch_modules"):
            fn = getattr(r, attr, None)
            if callable(fn) and not isinstance(r, torch.nn.Module):
                try:
                    mods = list(fn())
                except TypeError:
                    mods = []
                break
        inner = getattr(r, "reward", None) or getattr(r, "inner", None)
        if not mods and inner is not None and inner is not r:
            total += reward_weight_bytes([inner])
        if isinstance(r, torch.nn.Module):
            mods = [r]
        for m in mods:
            if isinstance(m, torch.nn.Module) and id(m) not in seen:
                seen.add(id(m))
                total += sum(module_bytes(m).values())
    return total


def predict_memory(model_patcher, latent_shape: Sequence[int], config: Any, lora_cfg: LoRAConfig, *,
                   checkpointing: bool, num_prompts: int = 1, text_tokens: int = 512, guidance: float | None = 3.5,
                   vae=None, vae_sizes: dict | None = None, decode_batch: int | None = None,
                   reward_weights: int = 0, reward_chunk: int = 0, conditioning: list | None = None,
                   algorithm: str = "LoRA", train_bias_norm: bool = False, existing=None,
                   device: str | None = None, cfg: float = 1.0, reward_batch: int = 0,
                   rewards: Sequence[Any] = ()) -> RunMemory:
    """The peak of a training run with ``config`` (a :class:`~branchgrpo.trainer.TrainerConfig`), per phase.

    ``vae``: probed for its decode (``vae_sizes`` instead gives the sizes: ``weights``, ``decode_chunk``,
    ``image_bytes_per_leaf``); ``reward_weights`` / ``reward_chunk``: the reward models' bytes and one chunk's
    scoring transient (``rewards``: each weight-free scorer probed on fake images of one chunk,
    :func:`reward_probe`; for a reward model the chunk's leaves on the device and resized, :data:`RESIZED_BYTES`). ``cfg`` > 1: true CFG, every model call runs the prompts' and the negative's rows
    together (ComfyUI's ``calc_cond_batch``), twice the rows of each probe."""
    dm = model_patcher.model.diffusion_model
    rows = 2 if cfg > 1.0 else 1
    schedule = config.schedule
    tree = planned_tree_bytes(schedule, config.prompts_per_iteration, latent_shape)
    widest = config.prompts_per_iteration * max([schedule.group_size, *schedule.width_before()])
    rollout_batch = min(config.max_batch, widest)
    inner = tree["nodes"] - tree["leaves"]
    train_batch = min(config.optim.max_train_batch, inner)
    metrics_batch = min(getattr(config, "kl_metric_parents", 0), config.max_batch, inner)
    probes = probe_full_depth(model_patcher, latent_shape, lora_cfg, rollout_batch=rows * rollout_batch,
                              train_batch=rows * train_batch, checkpointing=checkpointing, text_tokens=text_tokens,
                              guidance=guidance, metrics_batch=rows * metrics_batch, conditioning=conditioning,
                              algorithm=algorithm, train_bias_norm=train_bias_norm, kernel_device=device)
    decode_batch = min(int(decode_batch or config.max_batch), tree["leaves"])
    if vae_sizes is None and vae is not None:
        vae_sizes = vae_probe(vae, latent_shape, decode_batch, kernel_device=device)
    vae_sizes = vae_sizes or {"weights": 0, "decode_chunk": 0, "image_bytes_per_leaf": 0}
    weights = module_bytes(dm)
    n_lora = lora_param_count(dm, lora_cfg, algorithm, train_bias_norm, existing)
    if not reward_chunk:
        chunk = min(int(reward_batch or config.max_batch), tree["leaves"])
        shape = vae_sizes.get("image_shape")
        # only weight-free scorers are probed: a reward model's call loads its weights through model management,
        # which must not run under fake tensors (its real weights would be swapped for fakes)
        probed = max([reward_probe(r, shape, chunk, device) for r in rewards if not reward_weight_bytes([r])]
                     or [0]) if shape else 0
        estimate = chunk * (vae_sizes["image_bytes_per_leaf"] + RESIZED_BYTES) if reward_weights else 0
        reward_chunk = max(probed, estimate)
    images = vae_sizes["image_bytes_per_leaf"] * tree["leaves"]  # every decoded leaf, alive from decode to reward
    run = plan_run(weights=sum(weights.values()), lora_params=n_lora,
                   conditioning=conditioning_bytes(dm, text_tokens, num_prompts), tree=tree,
                   rollout_call=probes["rollout_call"], update_chunk=probes["update_chunk"],
                   metrics_call=probes["metrics_call"], vae_weights=vae_sizes["weights"],
                   decode_chunk=vae_sizes["decode_chunk"], reward_weights=reward_weights, reward_chunk=reward_chunk,
                   images=images)
    run.details.update(weights_by_dtype=weights, lora_params=n_lora, tree=tree, rollout_batch=rollout_batch,
                       train_batch=train_batch, metrics_batch=metrics_batch, decode_batch=decode_batch,
                       checkpointing=checkpointing, probes=probes, vae=vae_sizes, text_tokens=text_tokens,
                       cfg_rows=rows, reward_chunk=reward_chunk, images=images)
    return run


def set_weights(run: RunMemory, weights: int) -> None:
    """Replace the base weights' bytes in every phase (e.g. by what they take once stored in fp8)."""
    for phase in run.phases:
        if "weights" in phase.components:
            phase.components["weights"] = int(weights)
    run.details["weights_stored"] = int(weights)


def budget_message(node: str, run: RunMemory, budget: int, margin: float = 0.0, reserve: int = 0) -> str:
    """Why a run does not fit ``budget`` bytes (with the allocator's ``margin`` over the peak and the CUDA
    ``reserve``), and what to change, from its largest components."""
    gb = 2 ** 30
    phase = run.phase(run.peak_phase)
    parts = sorted(phase.components.items(), key=lambda kv: -kv[1])
    listing = ", ".join(f"{k} {v / gb:.2f} GiB" for k, v in parts if v > 0)
    advice = []
    top = {k for k, v in parts[:2]}
    if phase.name == "update" or "transient" in top:
        advice.append("turn gradient_checkpointing on and lower max_train_batch" if phase.name == "update"
                      else "lower max_batch")
    if "weights" in top:
        advice.append("load the model with weight_dtype fp8_e4m3fn (UNETLoader)")
    if "tree" in top or "previous_tree" in top:
        advice.append("use fewer split steps, a smaller branching factor or fewer prompts_per_iteration")
    if "lora_and_adamw" in top:
        advice.append("lower lora_rank or narrow lora_targets")
    advice.append("or use a smaller latent (resolution / frames)")
    extra = ""
    if margin or reserve:
        need = int(run.peak * (1.0 + margin)) + reserve
        extra = (f", {need / gb:.2f} GiB with the allocator's {margin:.0%} margin (memory_margin)"
                 + (f" and {reserve / gb:.2f} GiB for the CUDA context" if reserve else ""))
    return (f"{node}: memory_budget_gb — the run is too large: it needs {run.peak / gb:.2f} GiB at the peak of the "
            f"{phase.name} ({listing}){extra}, over the {budget / gb:.2f} GiB available. To fit: "
            + "; ".join(advice) + ".")


def predict_run_memory(model, latent_shape, config: TrainerConfig, lora_cfg: LoRAConfig, *, checkpointing: bool,
                       num_prompts: int, guidance, vae, rewards, decode_batch, weights_dtype=None,
                       conditioning=None, algorithm: str = "LoRA", train_bias_norm: bool = False, existing=None,
                       cfg: float = 1.0, reward_batch: int = 0, clip=None, device=None):
    """The run's peak per phase, predicted before iteration 1 with the accounting ``bench.scale`` measures
    (:func:`predict_memory`: FakeTensor probes of one model call of each kind at the run's
    shape, weights by dtype, LoRA + AdamW, the trees). ``weights_dtype``: the dtype the base weights will be
    stored in (fp8), when it differs from the loaded one. ``existing``: a LoRA file to continue (its modules count
    at their own rank and algorithm).

    Beyond :func:`predict_memory`: the **encode** phase (the text encoders' weights, from ComfyUI's patchers, while
    they encode every prompt once; model management unloads them when the diffusion model needs the room, and the
    policy releases them on a tight card), the memory ComfyUI's ``VAE.decode`` reserves for a chunk
    (``memory_used_decode``) where it is more than the probe's, and fp8 base weights' per-layer casts
    (:func:`linear_cast_bytes`)."""
    kernel_device = torch.device(device).type if device is not None else None
    run = predict_memory(model, latent_shape, config, lora_cfg, checkpointing=checkpointing,
                         num_prompts=num_prompts, text_tokens=TEXT_TOKENS,
                         guidance=guidance, vae=vae, decode_batch=decode_batch,
                         reward_weights=reward_weight_bytes(rewards),
                         conditioning=conditioning, algorithm=algorithm,
                         train_bias_norm=train_bias_norm, existing=existing, device=kernel_device, cfg=cfg,
                         reward_batch=reward_batch, rewards=rewards)
    reserved = vae_bytes_per_leaf(vae, latent_shape) * int(run.details["decode_batch"]) if vae is not None else 0
    decode = run.phase("decode")
    images = run.details["images"]
    if reserved + images > decode.components["transient"]:
        decode.components["transient"] = reserved + images
    run.details["vae_reserved"] = reserved
    if weights_dtype is not None:
        set_weights(run, weight_bytes(model, weights_dtype))
        dm = model.model.diffusion_model
        compute = model.model.manual_cast_dtype or model.model.get_dtype()
        loaded_fp8 = all(m.weight.dtype in FP8.values() for m in dm.modules()
                         if isinstance(m, torch.nn.Linear) and hasattr(m, "comfy_cast_weights"))
        if not loaded_fp8:  # probed in the loaded dtype: add the casts fp8 weights cost
            casts = linear_cast_bytes(dm, compute if compute not in FP8.values() else torch.bfloat16)
            for name, extra in (("rollout", casts["largest"]), ("metrics", casts["largest"]),
                                ("update", casts["block"] if checkpointing else casts["all"])):
                run.phase(name).components["transient"] += extra
            run.details["fp8_casts"] = casts
    te = sum(p.model_size() for p in patchers_of(clip)) if clip is not None else 0
    if te:
        cond = run.phases[0].components.get("conditioning", 0)
        run.phases.insert(0, Phase("encode", {"text_encoders": te, "conditioning": cond}))
    run.details["text_encoders"] = te
    return run


# ===================================================================================== out of memory
#: What lowers each phase's peak (Trainer / Trainer Settings inputs), for the out-of-memory message.
PHASE_ADVICE = {
    "rollout": "lower max_batch (latents per model call), prompts_per_iteration or the latent's size, or store the "
               "base in fp8 (base_weights)",
    "decode": "lower max_batch (the leaves are decoded in chunks of at most max_batch) or set release_models on",
    "reward": "lower max_batch (the leaves are scored in chunks of at most max_batch), load the reward model in "
              "fp16 / bf16, or set release_models on",
    "update": "turn gradient_checkpointing on, lower max_train_batch or lora_rank, or store the base in fp8 "
              "(base_weights)",
    "metrics": "hold fewer prompts out for evaluation (Prompts node) or lower max_batch",
}


def free_cache() -> None:
    """Collect what is no longer referenced and return the allocator's cache (after an out-of-memory error, so the
    server and the next queued prompt have the memory again)."""
    import gc

    gc.collect()
    core.free_cache()


def out_of_memory_message(node: str, phase: str, iteration: int, error: str, run_memory, device, ckpt: str) -> str:
    """Where a run ran out of memory, against what was predicted and what the device has, what was kept, and the
    settings that lower that phase's peak."""
    gb = 2 ** 30
    try:
        predicted = f"{run_memory.phase(phase).total / gb:.2f} GiB predicted for it" if run_memory is not None \
            else "no prediction for this model"
    except KeyError:
        predicted = f"{run_memory.peak / gb:.2f} GiB predicted at the run's peak"
    try:
        free, total = core.mm.get_free_memory(device) / gb, core.mm.get_total_memory(device) / gb
        room = f"{free:.2f} GiB free of {total:.2f} GiB on {device} now"
    except Exception:  # noqa: BLE001 - a device model management cannot measure
        room = f"the free memory of {device} unknown"
    kept = (f"The checkpoint of iteration {iteration} is kept in {ckpt}: queue again with resume on to go on from "
            "there" if iteration > 0 and os.path.exists(ckpt) else "No iteration had finished, so nothing was saved")
    return (f"{node}: out of memory in the {phase} of iteration {iteration + 1} ({predicted}; {room}). {kept}. To "
            f"fit: {PHASE_ADVICE.get(phase, 'lower max_batch and max_train_batch')}. ({error})")


# ==================================================================================== the run's plan
def plan_memory(request, model, clip, vae, reward) -> "RunPlan":
    """The Trainer's second step: the memory policy and the run's predicted peak for ``request``
    (:class:`nodes.run_request.RunRequest`); a run over the budget is refused before compute."""
    s = request.settings
    budget = (s.memory_budget_gb * 2 ** 30 if s.memory_budget_gb > 0
              else core.mm.get_total_memory(model.load_device))
    margin = float(s.get("memory_margin", DEFAULT_MARGIN))
    reserve = reserve_bytes(model.load_device)
    usable = max(1, int((budget - reserve) / (1.0 + margin)))  # what the run's own tensors may take
    policy = plan(budget=usable, weights=model.model_size(), latent_shape=request.latent_shape,
                                max_batch=s.max_batch, vae=vae, reward=reward, base_weights=s.base_weights,
                                release_models=s.release_models)
    try:
        run_memory = predict_run_memory(
            model, request.latent_shape, request.config, request.lora_cfg, checkpointing=request.checkpointing,
            num_prompts=len(request.prompts) + len(request.eval_prompts), guidance=s.flux_guidance, vae=vae,
            rewards=request.rewards, decode_batch=policy.decode_batch,
            weights_dtype=FP8.get(policy.base_weights),
            conditioning=encode_prompt(clip, request.prompts[0], s.flux_guidance), algorithm=request.algorithm,
            train_bias_norm=request.train_bias_norm, existing=request.existing, cfg=s.cfg,
            reward_batch=policy.reward_batch, clip=clip, device=model.load_device)
    except Exception as e:  # a model the shape-only probe cannot trace (data-dependent control flow)
        note = (f"memory_budget_gb — the memory prediction is unavailable for this {model_family(model)} model "
                f"({type(e).__name__}: {str(e)[:200]}), so the run is not checked against the budget; watch the "
                "device's memory in the first iteration (an out-of-memory error keeps the last checkpoint)")
        request.notes.append(note)
        run_memory = None
    if run_memory is not None and required_bytes(run_memory, model.load_device, margin) > budget:
        raise ValueError(budget_message(NODE, run_memory, int(budget), margin=margin, reserve=reserve))
    predicted = run_memory.summary() if run_memory is not None else f"unavailable for {model_family(model)}"
    if run_memory is not None:
        predicted += (f"; {required_bytes(run_memory, model.load_device, margin) / 2 ** 30:.2f} GiB with the "
                      f"allocator's margin ({margin:.0%})" + (f" and {reserve / 2 ** 30:.2f} GiB for the CUDA context"
                                                             if reserve else "") + f", of {budget / 2 ** 30:.2f} GiB")
    info = (f"predicted memory: {predicted}; gradient checkpointing {'on' if request.checkpointing else 'off'}; "
            f"{policy.describe()}")
    log.info("BranchGRPO %s: %s", request.run_name, info)
    return RunPlan(policy, run_memory, info)


@dataclass
class RunPlan:
    policy: object  # nodes.memory.MemoryPlan
    run_memory: object  # the prediction (None where the probe cannot trace the model)
    info: str


__all__ = ["MemoryPlan", "plan", "weight_bytes", "release", "is_loaded", "patchers_of", "ReleaseAfterPhase",
           "with_base_dtype", "BASE_WEIGHT_CHOICES", "FP8", "predict_run_memory", "predict_memory", "probe_calls",
           "probe_full_depth", "vae_probe", "fake_twin", "truncate_blocks", "block_lists", "random_conditioning",
           "SamplingCall", "budget_message", "reward_weight_bytes", "lora_param_count", "text_dims",
           "conditioning_bytes", "probe_depths", "set_weights", "TEXT_TOKENS", "plan_memory", "RunPlan", "out_of_memory_message",
           "free_cache", "PHASE_ADVICE", "CUDA_RESERVE", "DEFAULT_MARGIN", "reserve_bytes", "required_bytes",
           "linear_cast_bytes", "RESIZED_BYTES", "reward_probe"]
