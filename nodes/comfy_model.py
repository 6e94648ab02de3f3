"""The engine's velocity model over a ComfyUI ``ModelPatcher``, through ComfyUI's own conditioning path.

* The trainable adapters (ComfyUI's own LoRA / LoHa / LoKr / OFT training modules, ``nodes/adapters.py``) act
  through ``ModelPatcher.add_weight_wrapper`` on a *clone* of the input MODEL: the weight a layer uses becomes
  the module's ``f(W)`` (``W + scale * up @ down`` for LoRA). Patches applied upstream (a LoRA loaded before
  training) are merged into ``W`` first, so they keep acting; offloading (lowvram) applies weight functions per
  layer as usual; the input MODEL is never modified.
* Prompts are encoded with the CLIP input (``clip.encode_from_tokens_scheduled``), FLUX guidance is
  set on the conditioning, and every model call goes through ``comfy.samplers.sampling_function``
  (``calc_cond_batch`` + CFG), so true CFG with a negative prompt, model patches and wrappers all work
  as in a KSampler. The denoised output of a flow model is ``x - sigma * v``; the velocity is
  recovered as ``(x - denoised) / sigma``.
* A batch whose rows belong to several prompts is one model call, as in the engine: the prompts' conds
  are concatenated into one (``process_cond`` + ``concat``, what ``calc_cond_batch`` does with conds of
  equal shape); only prompts whose conds cannot be concatenated run as separate groups.
* Memory (``nodes/memory.py``): if model management unloaded the diffusion model in between (a VAE or
  reward model needed the memory), the next call loads it again; fp8 / offloaded weights are cast per
  layer by ComfyUI's ops and the adapter's weight function returns the weight in that compute dtype.
"""
from __future__ import annotations

import contextlib
import logging
import uuid
from typing import Any, Sequence

import torch
from torch.overrides import TorchFunctionMode


from branchgrpo.lora import LoRAConfig

from .comfy_core import is_loaded
from . import comfy_core as core

log = logging.getLogger("BranchGRPO")


def is_flow_model(model_patcher) -> bool:
    ms = model_patcher.get_model_object("model_sampling")
    return isinstance(ms, core.model_sampling.CONST)


def model_family(model_patcher) -> str:
    return type(model_patcher.model).__name__


#: Families ComfyUI samples as flow models (CONST) that BranchGRPO refuses (model_base class -> reason).
REFUSED_FLOW_FAMILIES: dict[str, str] = {
    **dict.fromkeys(("Hunyuan3Dv2", "Hunyuan3Dv2_1"), (
        "Hunyuan3D 2.x generates 3D shapes: its latent decodes to a shape volume, not to images or video, and every "
        "BranchGRPO reward scores images (or video frames)")),
    "ACEStep": ("ACE-Step generates audio: its latent decodes to a waveform, not to images or video, and every "
                "BranchGRPO reward scores images (or video frames)"),
}
#: Rectified-flow families that ComfyUI samples in another parameterisation than CONST (class -> reason).
OTHER_FLOW_PARAMETERISATIONS: dict[str, str] = {
    "CosmosPredict2": ("Cosmos-Predict2 is sampled in ComfyUI's COSMOS_RFLOW parameterisation (the model input is "
                       "rescaled by 1/(1+sigma) and sigma runs to 80), not the CONST flow x_t = (1-sigma) x0 + sigma "
                       "noise on which BranchGRPO's SDE and log-probabilities are defined"),
}


def require_flow_model(model_patcher, node: str) -> None:
    family = model_family(model_patcher)
    if family in REFUSED_FLOW_FAMILIES:
        raise ValueError(f"{node}: model — {family} cannot be trained with BranchGRPO: {REFUSED_FLOW_FAMILIES[family]}. "
                         "Load an image or video flow model (README, 'Model families').")
    if is_flow_model(model_patcher):
        return
    if family in OTHER_FLOW_PARAMETERISATIONS:
        raise ValueError(f"{node}: model — {family} cannot be trained with BranchGRPO: "
                         f"{OTHER_FLOW_PARAMETERISATIONS[family]}. Load a CONST flow model (README, 'Model families').")
    ms = model_patcher.get_model_object("model_sampling")
    kinds = [c.__name__ for c in type(ms).__mro__ if c.__module__ == core.model_sampling.__name__]
    raise ValueError(
        f"{node}: model — this is a {model_family(model_patcher)} model with {'/'.join(kinds[:2]) or type(ms).__name__} "
        "prediction, not a flow-matching (rectified-flow, velocity) model. BranchGRPO's SDE and log-probabilities are "
        "defined for flow models only (FLUX, SD3/3.5, Wan, HunyuanVideo, Lumina, Qwen-Image, ...). SD1.5/SDXL-style "
        "eps/v-prediction models are not supported; load a flow model instead.")


def attach_lora(model_patcher, config: LoRAConfig, *, seed: int, device, algorithm: str = "LoRA",
                train_bias_norm: bool = False, existing=None):
    """Clone ``model_patcher`` and attach fresh trainable adapters of ComfyUI's (``algorithm``: LoRA, LoHa, LoKr or
    OFT; ``nodes/adapters.py``) over its diffusion model. Returns ``(clone, ComfyAdapterSet)``."""
    from .adapters import attach_adapters
    return attach_adapters(model_patcher, config, seed=seed, device=device, algorithm=algorithm,
                           train_bias_norm=train_bias_norm, existing=existing)


class _OutOfPlaceOnBlockInputs(TorchFunctionMode):
    """Inside one transformer block with gradients on: in-place arithmetic (``x += y``, ``x.mul_(y)``) on the
    block's input tensors, and on what such ops returned, is done out of place instead.

    Some ComfyUI blocks update their inputs in place (FLUX: ``img += ...`` after ``img_norm1(img)`` saved
    ``img`` for backward), which autograd refuses ("modified by an inplace operation") and which would
    also corrupt checkpoint recomputation. ``x += y`` rebinds ``x``, so the result is the same value;
    the caller's tensor is simply left untouched. Other tensors keep their in-place ops."""

    INPLACE = {torch.Tensor.add_: torch.add, torch.Tensor.sub_: torch.sub, torch.Tensor.mul_: torch.mul,
               torch.Tensor.div_: torch.div}

    def __init__(self, inputs):
        super().__init__()
        self.keep = [a for a in inputs if isinstance(a, torch.Tensor)]  # ids stay unique while tracked
        self.ids = {id(a) for a in self.keep}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = self.INPLACE.get(func)
        if op is not None and args and id(args[0]) in self.ids:
            out = op(*args, **kwargs)
            if out.dtype != args[0].dtype:
                out = out.to(args[0].dtype)
            self.keep.append(out)
            self.ids.add(id(out))
            return out
        return func(*args, **kwargs)

    def saved_tensor_hooks(self):
        """Saved-tensor hooks: a tracked tensor is saved as a copy, so in-place updates of the block's inputs that
        cannot be made out of place (LTX-Video: ``x.addcmul_(attn, gate)`` after ``rms_norm(x)`` saved ``x``; the
        statement does not rebind ``x``) leave the saved value intact. With hooks active outside (gradient
        checkpointing's), every tensor, copied or not, goes to them; otherwise other tensors are saved as usual."""
        outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        # The hooks live as long as what they saved (until the backward): they hold the set of ids only, never
        # the block's tensors (``self.keep``), which are released when the block returns.
        ids = self.ids

        def pack(t):
            if id(t) in ids:
                t = t.clone()
                if not outer:
                    return True, t
            # Checkpointed: the copy goes to checkpointing's hooks, which drop it in the forward and keep it
            # only from the block's recomputation to its backward (a copy kept here would last until the
            # backward and undo checkpointing's savings).
            return False, (outer[0](t) if outer else t)

        def unpack(packed):
            mine, value = packed
            return value if mine or not outer else outer[1](value)

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


@contextlib.contextmanager
def gradient_checkpointing(model_patcher, enabled: bool):
    """While gradients are on, run every block of the transformer's block lists with in-place updates of its
    inputs made out of place (see :class:`_OutOfPlaceOnBlockInputs`; needed for FLUX) and, if ``enabled``,
    checkpointed. Undone after; blocks run unchanged without gradients (rollout, sampling)."""
    dm = model_patcher.model.diffusion_model
    patched = []
    for _, child in dm.named_children():
        if isinstance(child, torch.nn.ModuleList):
            for block in child:
                original = block.forward

                def run(*args, __orig=original, **kwargs):
                    if enabled:  # recomputation must read unmodified inputs: the block updates copies
                        args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
                        kwargs = {k: a.clone() if isinstance(a, torch.Tensor) else a for k, a in kwargs.items()}
                    mode = _OutOfPlaceOnBlockInputs(list(args) + list(kwargs.values()))
                    with mode, mode.saved_tensor_hooks():
                        return __orig(*args, **kwargs)

                def forward(*args, __orig=original, __run=run, **kwargs):
                    if not torch.is_grad_enabled():
                        return __orig(*args, **kwargs)
                    if enabled:
                        return torch.utils.checkpoint.checkpoint(__run, *args, use_reentrant=False, **kwargs)
                    return __run(*args, **kwargs)

                block.forward = forward
                patched.append(block)
    try:
        yield len(patched) if enabled else 0
    finally:
        for block in patched:
            del block.forward


def encode_prompt(clip, text: str, guidance: float | None) -> list:
    tokens = clip.tokenize(text)
    cond = clip.encode_from_tokens_scheduled(tokens)
    if guidance is not None:
        cond = core.node_helpers.conditioning_set_values(cond, {"guidance": guidance})
    return cond


@contextlib.contextmanager
def training_mode():
    """ComfyUI's own training switch (``comfy.model_management.in_training``, what its trainer sets around its
    loop) on while the pack's session runs: cores of 2026 then compute RoPE and quantized layers with torch ops
    that have a backward instead of comfy-kitchen's fused kernels (ComfyUI 0.33.0: "Trying to backward through
    comfy_kitchen.apply_rope"), and the rollout uses the same ops as the update. Feature-detected: cores without
    the switch (0.3.75) have no such kernels."""
    mm = core.mm
    if not hasattr(mm, "in_training"):
        yield
        return
    previous, mm.in_training = mm.in_training, True
    try:
        yield
    finally:
        mm.in_training = previous


class ComfyFlowModel:
    """:class:`branchgrpo.models.base.VelocityModel` over a ModelPatcher (use inside :meth:`session`)."""

    def __init__(self, model_patcher, latent_shape: Sequence[int], *, clip=None,
                 conditioning: dict[str, list] | None = None, negative: str = "", cfg: float = 1.0,
                 guidance: float | None = 3.5, seed: int = 0):
        self.mp = model_patcher
        self.clip = clip
        self.latent_shape = tuple(latent_shape)
        self.negative_text = negative
        self.cfg = float(cfg)
        self.guidance = guidance
        self.seed = seed
        self._raw: dict[str, list] = dict(conditioning or {})  # prompt -> CONDITIONING
        self._negative_raw = None
        self._processed: dict[str, dict] = {}
        self._batch_uuids: dict[tuple, Any] = {}
        self._sampling_args = None
        self._loaded: list = []
        self.reloads = 0  # loads of the diffusion model after the session's first (see ensure_loaded)
        self._prompt_ids: dict[str, int] = {}
        self._prompts: list[str] = []
        self.real_model = None
        self.model_options = None
        self.device = core.mm.get_torch_device()
        self._unmanaged = False

    # ------------------------------------------------------------------ conditioning
    def add_prompts(self, prompts: Sequence[str]) -> None:
        for p in prompts:
            if p not in self._raw:
                if self.clip is None:
                    raise ValueError("BranchGRPO Trainer: clip — a CLIP input is needed to encode training prompts.")
                self._raw[p] = encode_prompt(self.clip, p, self.guidance)
        if self.cfg != 1.0 and self._negative_raw is None:
            if self.clip is None:
                raise ValueError("BranchGRPO Trainer: clip — true CFG needs a CLIP input for the negative prompt.")
            self._negative_raw = encode_prompt(self.clip, self.negative_text, self.guidance)

    def _conds_for(self, prompt: str) -> dict[str, list]:
        conds = {"positive": core.sampler_helpers.convert_cond(self._raw[prompt])}
        if self.cfg != 1.0:
            conds["negative"] = core.sampler_helpers.convert_cond(self._negative_raw)
        return conds

    @contextlib.contextmanager
    def session(self, max_batch: int):
        """Load the model as a sampler would, process every prompt's conds, and clean up after."""
        mp = self.mp
        self.model_options = core.model_patcher.create_model_options_clone(mp.model_options)
        all_conds = {"positive": [], "negative": []}
        for p in self._raw:
            c = self._conds_for(p)
            for k in c:
                all_conds[k] += c[k]
        core.sampler_helpers.prepare_model_patcher(mp, all_conds, self.model_options)
        noise_shape = (max_batch, *self.latent_shape)
        self._sampling_args = (noise_shape, all_conds)
        real_model, _, loaded = core.sampler_helpers.prepare_sampling(mp, noise_shape, all_conds, self.model_options)
        self._loaded = loaded
        device = mp.load_device
        core.samplers.cast_to_load_options(self.model_options, device=device, dtype=mp.model_dtype())
        mp.pre_run()
        try:
            self.real_model, self.device = real_model, device
            zeros = torch.zeros((1, *self.latent_shape), device=device)
            for i, p in enumerate(self._raw):
                self._processed[p] = core.samplers.process_conds(real_model, zeros, self._conds_for(p), device,
                                                                  zeros, None, self.seed)
            with training_mode():
                yield self
        finally:
            mp.cleanup()
            core.sampler_helpers.cleanup_models(all_conds, self._loaded)
            core.samplers.cast_to_load_options(self.model_options, device=mp.offload_device)
            mp.restore_hook_patches()
            self.real_model = None
            self._processed = {}

    @contextlib.contextmanager
    def unmanaged_session(self):
        """:meth:`session` without ComfyUI's model management, on the CPU: what the memory prediction runs on a
        twin of fake tensors, where there is nothing to load. The adapters' weight wrappers are installed as a full
        load installs them, and taken off after."""
        mp = self.mp
        restore = []
        for name, m in mp.model.diffusion_model.named_modules():
            if hasattr(m, "weight_function"):
                restore.append((m, m.weight_function))
                m.weight_function = list(mp.weight_wrapper_patches.get(f"diffusion_model.{name}.weight", []))
        previous = mp.model.current_patcher
        mp.model.current_patcher = mp
        self.model_options = core.model_patcher.create_model_options_clone(mp.model_options)
        self._unmanaged = True
        try:
            cpu = torch.device("cpu")
            self.real_model, self.device = mp.model, cpu
            zeros = torch.zeros((1, *self.latent_shape))
            for p in self._raw:
                self._processed[p] = core.samplers.process_conds(mp.model, zeros, self._conds_for(p), cpu, zeros,
                                                                  None, self.seed)
            with training_mode():
                yield self
        finally:
            for m, fns in restore:
                m.weight_function = fns
            mp.model.current_patcher = previous
            self.real_model, self._processed, self._unmanaged = None, {}, False

    # ------------------------------------------------------------------ VelocityModel
    def encode(self, prompts: Sequence[str]) -> list[str]:
        missing = [p for p in prompts if p not in self._processed]
        if missing:
            raise RuntimeError(f"prompts not prepared for this session: {missing[:3]}")
        return list(prompts)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: list[str], index: torch.Tensor) -> torch.Tensor:
        """One model call for the whole batch, as the engine makes: the rows are ordered by prompt and the
        prompts' conds concatenated into one cond (:meth:`_batched_cond`), then run through
        ``sampling_function`` like a KSampler batch. Prompts whose conds cannot be concatenated (other
        shapes, e.g. text of another token length under a model that does not pad, or areas, masks,
        timestep ranges, hooks, ControlNets) are run as separate groups, one call each."""
        self.ensure_loaded()
        index = index.to("cpu")
        sigma = sigma.to(x.device)
        view = (-1,) + (1,) * (x.dim() - 1)
        groups = [0] if len(cond) == 1 else torch.unique(index).tolist()  # one prompt: every row is its
        out = None
        for bucket in self._buckets([cond[k] for k in groups]):
            prompts = [cond[groups[i]] for i in bucket]
            negative = self._processed[prompts[0]].get("negative")
            if len(bucket) == len(groups) and len(groups) == 1:
                positive = self._batched_cond(prompts, [x.shape[0]])
                xr, sr = x, sigma
            else:
                rows = [torch.nonzero(index == groups[i]).flatten() for i in bucket]
                positive = self._batched_cond(prompts, [len(r) for r in rows])
                order = torch.cat(rows).to(x.device)
                xr, sr = x[order], sigma[order]
            denoised = core.samplers.sampling_function(self.real_model, xr, sr, negative, positive, self.cfg,
                                                        self.model_options, self.seed)
            v = (xr.float() - denoised.float()) / sr.float().view(view)
            if len(bucket) == len(groups) and len(groups) == 1:
                return v
            if out is None:
                out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
            out[order] = v
        return out

    def ensure_loaded(self) -> None:
        """Load the diffusion model again if model management unloaded it since the last call (a VAE or a
        reward model that needed its memory); a no-op while it stays loaded, fully or partially."""
        if self.real_model is None or self._unmanaged or is_loaded(self.mp):
            return
        noise_shape, all_conds = self._sampling_args
        self.real_model, _, self._loaded = core.sampler_helpers.prepare_sampling(self.mp, noise_shape, all_conds,
                                                                                 self.model_options)
        self.reloads += 1

    # what makes a processed cond unfit to merge with another prompt's (ComfyUI treats these per cond)
    _PER_COND_KEYS = ("area", "mask", "timestep_start", "timestep_end", "hooks", "control", "gligen", "default")

    def _mergeable(self, prompt: str) -> bool:
        pos = self._processed[prompt]["positive"]
        return len(pos) == 1 and not any(k in pos[0] for k in self._PER_COND_KEYS)

    def _can_concat(self, a: str, b: str) -> bool:
        ca, cb = self._processed[a]["positive"][0]["model_conds"], self._processed[b]["positive"][0]["model_conds"]
        return ca.keys() == cb.keys() and all(ca[k].can_concat(cb[k]) for k in ca)

    def _buckets(self, prompts: list[str]) -> list[list[int]]:
        """Positions of ``prompts`` grouped into runs of one model call each: every prompt whose cond
        concatenates with the bucket's first (ComfyUI's own ``can_concat`` rules) joins it."""
        buckets: list[list[int]] = []
        for i, p in enumerate(prompts):
            if self._mergeable(p):
                for b in buckets:
                    first = prompts[b[0]]
                    if self._mergeable(first) and self._can_concat(first, p):
                        b.append(i)
                        break
                else:
                    buckets.append([i])
            else:
                buckets.append([i])
        return buckets

    def _batched_cond(self, prompts: list[str], counts: list[int]) -> list[dict]:
        """The positive cond list of a batch whose first ``counts[0]`` rows use ``prompts[0]``, the next
        ``counts[1]`` ``prompts[1]``, ...: each prompt's model conds repeated to its row count and
        concatenated (``process_cond`` + ``concat``, as ``calc_cond_batch`` batches conds)."""
        if len(prompts) == 1:
            return self._processed[prompts[0]]["positive"]
        entries = [self._processed[p]["positive"][0] for p in prompts]
        merged = {}
        for key, first in entries[0]["model_conds"].items():
            parts = [e["model_conds"][key].process_cond(batch_size=n, area=None) for e, n in zip(entries, counts)]
            merged[key] = parts[0]._copy_with(parts[0].concat(parts[1:]))
        key = tuple(prompts)
        if key not in self._batch_uuids:
            self._batch_uuids[key] = uuid.uuid4()
        return [{**entries[0], "model_conds": merged, "uuid": self._batch_uuids[key]}]

    # ------------------------------------------------------------------ latent space
    def to_vae_latent(self, x0: torch.Tensor) -> torch.Tensor:
        """Model-space latent -> the VAE's latent space (``process_latent_out``)."""
        return self.mp.model.process_latent_out(x0)
