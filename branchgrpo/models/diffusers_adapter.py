"""The engine's velocity model over a diffusers transformer (FLUX, SD3 / SD3.5, Wan 2.1), for headless runs.

Loading (:func:`load_pipeline`): a local diffusers folder (``model_index.json`` + components), with any
of the transformer, the VAE and the text encoders optionally replaced by a single-file checkpoint
(the transformer and VAE through diffusers' ``from_single_file`` in the original / ComfyUI layout, text
encoders as Hugging Face state dicts). Everything is read with ``local_files_only=True``: nothing is
downloaded.

Conventions (:class:`DiffusersFlowModel`): the engine's rectified flow ``x_sigma = (1 - sigma) x0 +
sigma * noise`` with ``v = noise - x0`` is what all three transformers predict. The model sees the
timestep ``t = 1000 * sigma``: SD3 and Wan take ``t`` as input; FLUX takes ``sigma`` and multiplies by
1000 inside its forward (as ``FluxPipeline`` passes ``t / 1000``). FLUX latents ``[N, C, H, W]`` are
packed into 2x2 patches ``[N, H*W/4, 4C]`` with position ids; FLUX-dev gets its distilled ``guidance``;
SD3 gets pooled CLIP projections; Wan takes video latents ``[N, C, T, H, W]``. Decoding undoes each
VAE's scaling (``scaling_factor``/``shift_factor``, or Wan's per-channel mean/std) and returns ComfyUI's
IMAGE layout ``[N, H, W, 3]`` (video ``[N, T, H, W, 3]``) in ``[0, 1]``.

Adapters: ``peft``'s (:class:`~branchgrpo.peft_adapter.PeftAdapter`) on the diffusers module names;
:func:`comfy_layout` maps each diffusers Linear to its ComfyUI module (row offset, swapped halves), and
the adapter is exported under ComfyUI's native names ``diffusion_model.<ComfyUI module>.lora_up.weight`` /
``.hada_w1_a`` / ``.lokr_w1`` / ``.dora_scale`` / ``.diff`` ..., which ComfyUI's ``model_lora_keys_unet``
maps for every model. Diffusers splits some of ComfyUI's fused layers (FLUX/SD3 ``qkv``, FLUX's
single-block ``linear1`` = q, k, v and the MLP input); their adapters are merged exactly into one adapter
of the fused layer (LoRA / DoRA / LoHa factors block-diagonally, LoKr / OFT as one weight difference).
Rows that diffusers stores in another order (``norm_out``'s scale/shift) are swapped back.
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = ["FAMILIES", "detect_family", "load_pipeline", "DiffusersFlowModel", "comfy_layout",
           "shard_transformer", "default_max_sequence_length"]

FAMILIES = ("flux", "sd3", "wan")
PIPELINES = {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline", "wan": "WanPipeline"}
TRANSFORMERS = {"flux": "FluxTransformer2DModel", "sd3": "SD3Transformer2DModel", "wan": "WanTransformer3DModel"}
VAES = {"flux": "AutoencoderKL", "sd3": "AutoencoderKL", "wan": "AutoencoderKLWan"}
_MAX_SEQ = {"flux": 512, "sd3": 256, "wan": 226}


def default_max_sequence_length(family: str) -> int:
    return _MAX_SEQ[family]


class ModelConfigError(ValueError):
    """A model setting that does not fit the model; ``field`` names it (``model.height``)."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"{field_name}: {message}")


# ------------------------------------------------------------------------------------------- loading
def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def detect_family(folder: str) -> str:
    """``flux`` / ``sd3`` / ``wan`` from a diffusers folder's ``model_index.json`` or transformer config."""
    names = []
    index = os.path.join(folder, "model_index.json")
    if os.path.isfile(index):
        names.append(_read_json(index).get("_class_name", ""))
    tcfg = os.path.join(folder, "transformer", "config.json")
    if os.path.isfile(tcfg):
        names.append(_read_json(tcfg).get("_class_name", ""))
    for n in names:
        low = n.lower()
        if low.startswith("flux") and "flux2" not in low:
            return "flux"
        if "stablediffusion3" in low or low.startswith("sd3"):
            return "sd3"
        if low.startswith("wan"):
            return "wan"
    raise ModelConfigError("model.family", f"cannot tell the model family of {folder} (classes {names}); set "
                                           "model.family to 'flux', 'sd3' or 'wan'")


def _component_class(folder: str, component: str):
    """The class ``model_index.json`` names for ``component`` (None when the pipeline has no such component)."""
    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        return None
    entry = _read_json(index).get(component)
    if not (isinstance(entry, list) and len(entry) == 2 and entry[0] and entry[1]):
        return None
    return getattr(__import__(entry[0]), entry[1], None)


def _load_text_encoder_file(folder: str, component: str, path: str, dtype: torch.dtype) -> nn.Module:
    """A transformers text encoder built from ``folder/component``'s config with the weights of ``path``."""
    import transformers
    from safetensors.torch import load_file

    cls = _component_class(folder, component)
    if not isinstance(cls, type):
        raise ModelConfigError(f"model.text_encoder_files.{component}", f"the model folder's model_index.json "
                                                                        f"names no {component} class")
    config = transformers.AutoConfig.from_pretrained(os.path.join(folder, component), local_files_only=True)
    sd = load_file(path) if path.endswith(".safetensors") else torch.load(path, map_location="cpu",
                                                                            weights_only=True)
    for prefix in ("text_encoders.", "model.", "transformer."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    with torch.device("meta"):
        model = cls(config)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    model.tie_weights()
    missing = [k for k in missing if getattr(_get_param(model, k), "is_meta", False)]
    if missing:
        raise ModelConfigError(f"model.text_encoder_files.{component}",
                               f"{path} lacks {len(missing)} weights of {cls.__name__} (e.g. {missing[:3]}); "
                               f"it is not a {component} for this model")
    return model.to(dtype).eval()


def _get_param(model: nn.Module, key: str):
    try:
        return model.get_parameter(key)
    except AttributeError:
        try:
            return model.get_buffer(key)
        except AttributeError:
            return None


def quiet_libraries() -> None:
    """No per-component progress bars or informational warnings from diffusers / transformers."""
    for name in ("diffusers", "transformers"):
        try:
            lib = __import__(f"{name}.utils.logging", fromlist=["logging"])
        except ImportError:
            continue
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def load_pipeline(family: str, folder: str, *, transformer_file: str = "", vae_file: str = "",
                  text_encoder_files: dict | None = None, dtype: torch.dtype = torch.float32):
    """The diffusers pipeline of ``family`` from a local folder (and optional single files), on the CPU."""
    import diffusers

    from diffusers.utils import deprecation_utils

    # diffusers >= 0.36 calls it ``dtype`` (``torch_dtype`` is deprecated there)
    dkw = {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}
    kwargs: dict[str, Any] = {}
    if transformer_file:
        cls = getattr(diffusers, TRANSFORMERS[family])
        kwargs["transformer"] = cls.from_single_file(transformer_file, config=folder, subfolder="transformer",
                                                     local_files_only=True, **dkw)
    if vae_file:
        cls = getattr(diffusers, VAES[family])
        kwargs["vae"] = cls.from_single_file(vae_file, config=folder, subfolder="vae", local_files_only=True, **dkw)
    for component, path in (text_encoder_files or {}).items():
        kwargs[component] = _load_text_encoder_file(folder, component, path, dtype)
    pipe_cls = getattr(diffusers, PIPELINES[family])
    return pipe_cls.from_pretrained(folder, local_files_only=True, **dkw, **kwargs)


# ------------------------------------------------------------------------------------- velocity model
def _pack(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)


def _unpack(x: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    n = x.shape[0]
    return x.view(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


def _image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


class DiffusersFlowModel:
    """:class:`~branchgrpo.models.base.VelocityModel` over a diffusers pipeline's transformer.

    ``encode`` returns stacked prompt embeddings (cached per prompt: :meth:`precompute` encodes the
    training prompts once, after which :meth:`release_text_encoders` may free the encoders);
    ``velocity`` runs the transformer; ``decode`` turns clean latents into images for the rewards.
    """

    def __init__(self, pipe, family: str, *, width: int, height: int, frames: int = 1, guidance: float = 3.5,
                 cfg_scale: float = 1.0, negative_prompt: str = "", max_sequence_length: int = 0,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 move_transformer: bool = True):
        if family not in FAMILIES:
            raise ModelConfigError("model.family", f"must be one of {', '.join(FAMILIES)} (got {family!r})")
        self.pipe, self.family = pipe, family
        self.transformer: nn.Module = pipe.transformer
        self.vae: nn.Module = pipe.vae
        self.device, self.dtype = torch.device(device), dtype
        self.guidance, self.cfg_scale, self.negative_prompt = float(guidance), float(cfg_scale), negative_prompt
        self.max_sequence_length = int(max_sequence_length) or _MAX_SEQ[family]
        self.latent_shape = self._latent_shape(width, height, frames)
        self._cache: dict[str, dict[str, torch.Tensor]] = {}
        self._negative: dict[str, torch.Tensor] | None = None
        self.guidance_embeds = bool(getattr(self.transformer.config, "guidance_embeds", False))
        if move_transformer:  # (FSDP moves the shards itself)
            self.transformer.to(self.device)
        self.vae.to(self.device)

    # ---------------------------------------------------------------- shapes
    def _latent_shape(self, width: int, height: int, frames: int) -> tuple[int, ...]:
        tc, vc = self.transformer.config, self.vae.config
        if self.family == "wan":
            spatial = int(getattr(vc, "scale_factor_spatial", 8))
            temporal = int(getattr(vc, "scale_factor_temporal", 4))
            patch = tuple(tc.patch_size)
            if (frames - 1) % temporal:
                raise ModelConfigError("model.frames", f"{frames} frames: Wan needs {temporal}k+1 frames "
                                                       f"(e.g. {((frames - 1) // temporal) * temporal + 1})")
            mult_h, mult_w = spatial * patch[1], spatial * patch[2]
            c, t = int(tc.in_channels), (frames - 1) // temporal + 1
        else:
            spatial = 2 ** (len(vc.block_out_channels) - 1)
            mult_h = mult_w = spatial * (2 if self.family == "flux" else int(tc.patch_size))
            c = int(tc.in_channels) // 4 if self.family == "flux" else int(tc.in_channels)
        for name, value, mult in (("model.height", height, mult_h), ("model.width", width, mult_w)):
            if value % mult:
                raise ModelConfigError(name, f"{value} px is not a multiple of {mult} (VAE factor x patch size); "
                                             f"use e.g. {max(mult, value // mult * mult)}")
        h, w = height // spatial, width // spatial
        return (c, t, h, w) if self.family == "wan" else (c, h, w)

    # ---------------------------------------------------------------- text
    def _text_encoders(self) -> list[nn.Module]:
        return [m for m in (getattr(self.pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))
                if isinstance(m, nn.Module)]

    @torch.no_grad()
    def _encode_batch(self, prompts: list[str], negative: bool = False) -> list[dict[str, torch.Tensor]]:
        p, dev, msl = self.pipe, self.device, self.max_sequence_length
        for m in self._text_encoders():
            m.to(dev)
        if self.family == "flux":
            embeds, pooled, _ = p.encode_prompt(prompt=prompts, prompt_2=None, device=dev, max_sequence_length=msl)
            parts = {"embeds": embeds, "pooled": pooled}
        elif self.family == "sd3":
            embeds, _, pooled, _ = p.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=dev,
                                                   do_classifier_free_guidance=False, max_sequence_length=msl)
            parts = {"embeds": embeds, "pooled": pooled}
        else:
            embeds, _ = p.encode_prompt(prompt=prompts, do_classifier_free_guidance=False, max_sequence_length=msl,
                                        device=dev, dtype=self.dtype)
            parts = {"embeds": embeds}
        return [{k: v[i].detach().to("cpu", self.dtype) for k, v in parts.items()} for i in range(len(prompts))]

    def precompute(self, prompts: Sequence[str], batch_size: int = 8) -> None:
        """Encode (and cache) ``prompts`` and, with true CFG, the negative prompt."""
        todo = [q for q in dict.fromkeys(prompts) if q not in self._cache]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            for q, enc in zip(chunk, self._encode_batch(chunk)):
                self._cache[q] = enc
        if self.cfg_scale > 1 and self._negative is None:
            self._negative = self._encode_batch([self.negative_prompt])[0]

    def release_text_encoders(self) -> None:
        """Drop the text encoders (after :meth:`precompute`); new prompts can no longer be encoded."""
        for n in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if isinstance(getattr(self.pipe, n, None), nn.Module):
                setattr(self.pipe, n, None)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        missing = [q for q in prompts if q not in self._cache]
        if missing:
            if not self._text_encoders():
                raise RuntimeError(f"prompt {missing[0]!r} was not precomputed and the text encoders are released")
            self.precompute(missing)
        cond = {k: torch.stack([self._cache[q][k] for q in prompts]).to(self.device)
                for k in self._cache[prompts[0]]} if prompts else {}
        if self.cfg_scale > 1:
            if self._negative is None:
                self.precompute([])
            for k, v in self._negative.items():
                cond["neg_" + k] = v[None].to(self.device)
        return cond

    # ---------------------------------------------------------------- model
    def _forward(self, x: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor,
                 pooled: torch.Tensor | None) -> torch.Tensor:
        tr, n = self.transformer, x.shape[0]
        if self.family == "flux":
            c, h, w = x.shape[1:]
            guidance = torch.full((n,), self.guidance, device=x.device, dtype=torch.float32) \
                if self.guidance_embeds else None
            out = tr(hidden_states=_pack(x), encoder_hidden_states=embeds, pooled_projections=pooled,
                     timestep=sigma.to(x.dtype), img_ids=_image_ids(h // 2, w // 2, x.device, x.dtype),
                     txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device, dtype=x.dtype), guidance=guidance,
                     return_dict=False)[0]
            return _unpack(out, c, h, w)
        t = (sigma * 1000.0).to(x.dtype)
        if self.family == "sd3":
            return tr(hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=t,
                      return_dict=False)[0]
        return tr(hidden_states=x, timestep=t, encoder_hidden_states=embeds, return_dict=False)[0]

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor],
                 index: torch.Tensor) -> torch.Tensor:
        dt = self.dtype
        x = x.to(self.device, dt)
        sigma = sigma.to(self.device, torch.float32).reshape(-1).expand(x.shape[0])
        index = index.to(cond["embeds"].device)
        embeds = cond["embeds"][index].to(dt)
        pooled = cond["pooled"][index].to(dt) if "pooled" in cond else None
        if self.cfg_scale <= 1:
            return self._forward(x, sigma, embeds, pooled)
        n = x.shape[0]
        neg = cond["neg_embeds"].to(dt).expand(n, *embeds.shape[1:])
        if neg.shape[1] != embeds.shape[1]:  # different padding lengths: pad the shorter with zeros
            s = max(neg.shape[1], embeds.shape[1])
            neg = torch.nn.functional.pad(neg, (0, 0, 0, s - neg.shape[1]))
            embeds = torch.nn.functional.pad(embeds, (0, 0, 0, s - embeds.shape[1]))
        npooled = cond["neg_pooled"].to(dt).expand(n, -1) if pooled is not None else None
        out = self._forward(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([embeds, neg]),
                            torch.cat([pooled, npooled]) if pooled is not None else None)
        pos, negv = out.chunk(2)
        return negv + self.cfg_scale * (pos - negv)

    # ---------------------------------------------------------------- decoding
    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        vae, cfg = self.vae, self.vae.config
        vdt = next(vae.parameters()).dtype
        lat = x0.to(self.device, torch.float32)
        if self.family == "wan":
            c = lat.shape[1]
            mean = torch.tensor(cfg.latents_mean, dtype=torch.float32, device=lat.device).view(1, c, 1, 1, 1)
            std = torch.tensor(cfg.latents_std, dtype=torch.float32, device=lat.device).view(1, c, 1, 1, 1)
            video = vae.decode((lat * std + mean).to(vdt), return_dict=False)[0]  # [N, 3, T, H, W]
            return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1).contiguous()
        lat = lat / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        img = vae.decode(lat.to(vdt), return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).contiguous()


# ------------------------------------------------------------------------------ ComfyUI key mapping
_QKV = {"q": 0, "k": 1, "v": 2}


def _rules(family: str) -> list[tuple[str, str, Callable[[re.Match, int], int] | None, str]]:
    """``(diffusers regex, ComfyUI template, row offset fn, swap)``; swap: '' never, 'always', or
    'if_half' (swap when the layer has 2 * hidden rows: SD3's context-only last block)."""
    q = (lambda m, h: _QKV[m.group(2)] * h)
    if family == "flux":
        b, s = r"transformer_blocks\.(\d+)\.", r"single_transformer_blocks\.(\d+)\."
        return [
            (b + r"attn\.to_([qkv])", r"double_blocks.\1.img_attn.qkv", q, ""),
            (b + r"attn\.add_([qkv])_proj", r"double_blocks.\1.txt_attn.qkv", q, ""),
            (b + r"attn\.to_out\.0", r"double_blocks.\1.img_attn.proj", None, ""),
            (b + r"attn\.to_add_out", r"double_blocks.\1.txt_attn.proj", None, ""),
            (b + r"norm1\.linear", r"double_blocks.\1.img_mod.lin", None, ""),
            (b + r"norm1_context\.linear", r"double_blocks.\1.txt_mod.lin", None, ""),
            (b + r"ff\.net\.0\.proj", r"double_blocks.\1.img_mlp.0", None, ""),
            (b + r"ff\.net\.2", r"double_blocks.\1.img_mlp.2", None, ""),
            (b + r"ff_context\.net\.0\.proj", r"double_blocks.\1.txt_mlp.0", None, ""),
            (b + r"ff_context\.net\.2", r"double_blocks.\1.txt_mlp.2", None, ""),
            (s + r"attn\.to_([qkv])", r"single_blocks.\1.linear1", q, ""),
            (s + r"proj_mlp", r"single_blocks.\1.linear1", lambda m, h: 3 * h, ""),
            (s + r"norm\.linear", r"single_blocks.\1.modulation.lin", None, ""),
            (s + r"proj_out", r"single_blocks.\1.linear2", None, ""),
            (r"x_embedder", "img_in", None, ""),
            (r"context_embedder", "txt_in", None, ""),
            (r"time_text_embed\.timestep_embedder\.linear_1", "time_in.in_layer", None, ""),
            (r"time_text_embed\.timestep_embedder\.linear_2", "time_in.out_layer", None, ""),
            (r"time_text_embed\.text_embedder\.linear_1", "vector_in.in_layer", None, ""),
            (r"time_text_embed\.text_embedder\.linear_2", "vector_in.out_layer", None, ""),
            (r"time_text_embed\.guidance_embedder\.linear_1", "guidance_in.in_layer", None, ""),
            (r"time_text_embed\.guidance_embedder\.linear_2", "guidance_in.out_layer", None, ""),
            (r"norm_out\.linear", "final_layer.adaLN_modulation.1", None, "always"),
            (r"proj_out", "final_layer.linear", None, ""),
        ]
    if family == "sd3":
        b = r"transformer_blocks\.(\d+)\."
        return [
            (b + r"attn\.to_([qkv])", r"joint_blocks.\1.x_block.attn.qkv", q, ""),
            (b + r"attn\.add_([qkv])_proj", r"joint_blocks.\1.context_block.attn.qkv", q, ""),
            (b + r"attn2\.to_([qkv])", r"joint_blocks.\1.x_block.attn2.qkv", q, ""),
            (b + r"attn\.to_out\.0", r"joint_blocks.\1.x_block.attn.proj", None, ""),
            (b + r"attn\.to_add_out", r"joint_blocks.\1.context_block.attn.proj", None, ""),
            (b + r"attn2\.to_out\.0", r"joint_blocks.\1.x_block.attn2.proj", None, ""),
            (b + r"ff\.net\.0\.proj", r"joint_blocks.\1.x_block.mlp.fc1", None, ""),
            (b + r"ff\.net\.2", r"joint_blocks.\1.x_block.mlp.fc2", None, ""),
            (b + r"ff_context\.net\.0\.proj", r"joint_blocks.\1.context_block.mlp.fc1", None, ""),
            (b + r"ff_context\.net\.2", r"joint_blocks.\1.context_block.mlp.fc2", None, ""),
            (b + r"norm1\.linear", r"joint_blocks.\1.x_block.adaLN_modulation.1", None, ""),
            (b + r"norm1_context\.linear", r"joint_blocks.\1.context_block.adaLN_modulation.1", None, "if_half"),
            (r"context_embedder", "context_embedder", None, ""),
            (r"time_text_embed\.timestep_embedder\.linear_1", "t_embedder.mlp.0", None, ""),
            (r"time_text_embed\.timestep_embedder\.linear_2", "t_embedder.mlp.2", None, ""),
            (r"time_text_embed\.text_embedder\.linear_1", "y_embedder.mlp.0", None, ""),
            (r"time_text_embed\.text_embedder\.linear_2", "y_embedder.mlp.2", None, ""),
            (r"norm_out\.linear", "final_layer.adaLN_modulation.1", None, "always"),
            (r"proj_out", "final_layer.linear", None, ""),
        ]
    if family == "wan":
        b = r"blocks\.(\d+)\."
        return [
            (b + r"attn1\.to_([qkv])", r"blocks.\1.self_attn.\2", None, ""),
            (b + r"attn1\.to_out\.0", r"blocks.\1.self_attn.o", None, ""),
            (b + r"attn2\.to_([qkv])", r"blocks.\1.cross_attn.\2", None, ""),
            (b + r"attn2\.to_out\.0", r"blocks.\1.cross_attn.o", None, ""),
            (b + r"attn2\.add_k_proj", r"blocks.\1.cross_attn.k_img", None, ""),
            (b + r"attn2\.add_v_proj", r"blocks.\1.cross_attn.v_img", None, ""),
            (b + r"ffn\.net\.0\.proj", r"blocks.\1.ffn.0", None, ""),
            (b + r"ffn\.net\.2", r"blocks.\1.ffn.2", None, ""),
            (r"condition_embedder\.time_embedder\.linear_1", "time_embedding.0", None, ""),
            (r"condition_embedder\.time_embedder\.linear_2", "time_embedding.2", None, ""),
            (r"condition_embedder\.time_proj", "time_projection.1", None, ""),
            (r"condition_embedder\.text_embedder\.linear_1", "text_embedding.0", None, ""),
            (r"condition_embedder\.text_embedder\.linear_2", "text_embedding.2", None, ""),
            (r"condition_embedder\.image_embedder\.ff\.net\.0\.proj", "img_emb.proj.1", None, ""),
            (r"condition_embedder\.image_embedder\.ff\.net\.2", "img_emb.proj.3", None, ""),
            (r"proj_out", "head.head", None, ""),
        ]
    raise ValueError(f"unknown family {family!r}")


def _inner_dim(root: nn.Module) -> int:
    cfg = root.config
    return int(cfg.num_attention_heads) * int(cfg.attention_head_dim)


def comfy_layout(root: nn.Module, family: str) -> tuple[dict[str, tuple[str, int, bool]], dict[str, int]]:
    """For every Linear of the diffusers transformer ``root`` that ComfyUI has: ``{diffusers name:
    (ComfyUI module, row offset, swap halves)}``, and ``{ComfyUI module: rows}`` (the fused layer's height)."""
    h = _inner_dim(root)
    rules = [(re.compile(p), t, off, sw) for p, t, off, sw in _rules(family)]
    layout, rows = {}, defaultdict(int)
    wrapped: tuple[str, ...] = ()
    for name, mod in root.named_modules():
        if name.startswith(wrapped):
            continue  # inside a peft tuner layer: its base layer and adapter matrices
        if hasattr(mod, "get_base_layer"):  # a peft tuner layer stands for the Linear it wraps
            wrapped += (name + ".",)
            mod = mod.get_base_layer()
        if not name or not isinstance(mod, nn.Linear):
            continue
        for pat, tmpl, off, sw in rules:
            m = pat.fullmatch(name)
            if m:
                target = m.expand(tmpl)
                offset = off(m, h) if off else 0
                swap = sw == "always" or (sw == "if_half" and mod.out_features == 2 * h)
                layout[name] = (target, offset, swap)
                rows[target] = max(rows[target], offset + mod.out_features)
                break
    return layout, dict(rows)


# ------------------------------------------------------------------------------------------- FSDP
def shard_transformer(transformer: nn.Module, device: torch.device, ignored: set | None = None) -> int:
    """Shard ``transformer``'s weights over the default process group with FSDP2 (``fully_shard``): each
    block of its block lists is one unit, the rest the root unit. Returns the number of units. The
    ``ignored`` parameters (the adapter's, which peft puts inside the transformer) are not sharded: every
    rank keeps them whole, and the trainer all-reduces their gradients. Works with NCCL and with gloo on CPU."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    units = 0
    for child in transformer.children():
        if isinstance(child, nn.ModuleList):
            for block in child:
                fully_shard(block, mesh=mesh, ignored_params=ignored or None)
                units += 1
    fully_shard(transformer, mesh=mesh, ignored_params=ignored or None)
    return units + 1


def human_count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else str(n)


__all__ += ["ModelConfigError", "human_count"]
