"""Tiny random-weight model files that ComfyUI's STOCK loaders load.

Written into a ComfyUI ``models/`` folder; every function is deterministic (seeded per tensor)
and imports nothing from ComfyUI, so the files can be made before a server starts.

What a stock loader can take (ComfyUI 0.3.75, detection in ``comfy/model_detection.py`` and
``comfy/sd.py``):

=====================  ==================  ==========================================================
family                 stock loader        tiny?
=====================  ==================  ==========================================================
SD3 (MMDiT)            UNETLoader          yes. hidden = 64*depth and heads = depth are read from
                                           ``x_embedder.proj.weight`` (model_detection.py:63); every
                                           other width (context, pooled, pos-embed) from shapes.
                                           depth 2 with T5/CLIP-sized inputs: ~1.9 M params.
Wan 2.1 (video, t2v)   UNETLoader          yes. ``dim`` from ``head.modulation``, heads = dim // 128
                                           (model_detection.py:453), so dim 128 = one head; ffn,
                                           layers and in/out channels from shapes. text_dim is NOT
                                           detected: WanModel's default 4096 (ldm/wan/model.py:401).
FLUX.1                 UNETLoader          NO. Detection hard-codes ``num_heads = 24`` and
                                           ``axes_dim = [16, 56, 56]`` (model_detection.py:220-222),
                                           and ldm/flux/model.py:61-63 requires
                                           hidden_size // num_heads == sum(axes_dim) == 128, so
                                           hidden_size must be 3072: even depth 0/0 is ~40 M params
                                           (160 MB fp32), one double block adds ~340 M. The diffusers
                                           path (convert_diffusers_mmdit, model_detection.py:1007)
                                           re-detects with the same constants. Needs a tiny-model
                                           loader node (build from an explicit unet_config).
VAE for 16-ch latents  VAELoader           yes, as TAESD: any ``taesd_decoder.1.weight`` state dict
(SD3 / Flux)                               is a TAESD with latent_channels from its shape
                                           (sd.py:318-320). Its body is fixed (64 channels): 2.46 M
                                           params, 4.9 MB in fp16. The KL VAE branch (sd.py:378-404)
                                           fixes ch=128, ch_mult [1,2,4,4] (~84 M params): not tiny.
Wan 2.1 VAE            VAELoader           yes. ``dim`` comes from ``decoder.head.0.gamma``
                                           (sd.py:512); dim 8 = 0.92 M params.
text encoders          CLIPLoader /        NOT tiny: every text encoder is built from a fixed
                       DualCLIPLoader      config (sd1_clip_config.json, t5_config_xxl.json,
                                           umt5_config_xxl.json ...) chosen by ``detect_te_model``
                                           (sd.py:992); shapes in the file only pick the type.
                                           The smallest usable one is CLIP-L (123 M params,
                                           246 MB fp16): ``write_random_clip_l`` makes it at test
                                           time. Loaded with ``CLIPLoader(type="sd3")`` it gives
                                           SD3-shaped conditioning: cond [B, 77, 4096] (CLIP-L
                                           zero-padded) and pooled [B, 2048] (CLIP-G part zero),
                                           which fits the tiny SD3 below and, for the 4096-wide
                                           context, the tiny Wan 2.1.
=====================  ==================  ==========================================================

Initialisation: weight matrices / conv kernels ~ N(0, 1/fan_in), biases ~ N(0, 0.01^2), norm
scales 1, norm shifts 0, positional embeddings and modulation tables ~ N(0, 0.02^2). Each tensor
is drawn from its own generator seeded with (seed, key), so the values never depend on order.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

import torch
from safetensors.torch import save_file

Spec = List[Tuple[str, Tuple[int, ...]]]

__all__ = [
    "sd3_state_dict",
    "wan21_state_dict",
    "taesd_state_dict",
    "wan21_vae_state_dict",
    "clip_l_state_dict",
    "write_tiny_sd3",
    "write_tiny_wan21",
    "write_tiny_taesd_vae",
    "write_tiny_wan21_vae",
    "write_random_clip_l",
    "write_conditioning_dataset",
    "write_all_tiny",
    "FLUX_NOT_LOADABLE",
    "init_tensor",
]

FLUX_NOT_LOADABLE = (
    "FLUX cannot be made tiny for the stock UNETLoader: comfy/model_detection.py fixes "
    "num_heads=24 and axes_dim=[16,56,56] for 'flux' and comfy/ldm/flux/model.py requires "
    "hidden_size // num_heads == sum(axes_dim) (=128), so hidden_size is forced to 3072 "
    "(>= ~40 M parameters even with zero blocks)."
)


# --------------------------------------------------------------------------- initialisation
from bench.families import init_tensor  # noqa: E402 (the project's one seeded initialiser)


def _materialise(spec: Iterable[Tuple[str, Tuple[int, ...]]], seed: int,
                 dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    for key, shape in spec:
        if key in out:
            raise ValueError(f"duplicate key in spec: {key}")
        out[key] = init_tensor(key, tuple(shape), seed).to(dtype).contiguous()
    return out


def _save(sd: Dict[str, torch.Tensor], path: Path, meta: dict) -> Path:
    """Atomic write (temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(sd, str(tmp), metadata={"branchgrpo_tiny": json.dumps(meta, sort_keys=True)})
    os.replace(tmp, path)
    return path


def _linear(prefix: str, n_in: int, n_out: int, bias: bool = True) -> Spec:
    s = [(f"{prefix}.weight", (n_out, n_in))]
    if bias:
        s.append((f"{prefix}.bias", (n_out,)))
    return s


# --------------------------------------------------------------------------- SD3 / MMDiT
def sd3_spec(depth: int = 2, in_channels: int = 16, out_channels: int = 16, patch_size: int = 2,
             context_dim: int = 4096, pooled_dim: int | None = 2048,
             pos_embed_max_size: int = 16, mlp_ratio: int = 4) -> Spec:
    """Key shapes of ComfyUI's MMDiT (comfy/ldm/modules/diffusionmodules/mmdit.py), SD3 layout."""
    h = 64 * depth
    p = patch_size
    s: Spec = [("pos_embed", (1, pos_embed_max_size * pos_embed_max_size, h)),
               ("x_embedder.proj.weight", (h, in_channels, p, p)), ("x_embedder.proj.bias", (h,))]
    s += _linear("t_embedder.mlp.0", 256, h) + _linear("t_embedder.mlp.2", h, h)
    if pooled_dim:
        s += _linear("y_embedder.mlp.0", pooled_dim, h) + _linear("y_embedder.mlp.2", h, h)
    s += _linear("context_embedder", context_dim, h)
    for i in range(depth):
        for block in ("context_block", "x_block"):
            pre_only = block == "context_block" and i == depth - 1
            b = f"joint_blocks.{i}.{block}"
            s += _linear(f"{b}.attn.qkv", h, 3 * h)
            if not pre_only:
                s += _linear(f"{b}.attn.proj", h, h)
                s += _linear(f"{b}.mlp.fc1", h, mlp_ratio * h) + _linear(f"{b}.mlp.fc2", mlp_ratio * h, h)
            s += _linear(f"{b}.adaLN_modulation.1", h, (2 if pre_only else 6) * h)
    s += _linear("final_layer.linear", h, p * p * out_channels)
    s += _linear("final_layer.adaLN_modulation.1", h, 2 * h)
    return s


def sd3_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32, **cfg) -> Dict[str, torch.Tensor]:
    return _materialise(sd3_spec(**cfg), seed, dtype)


def write_tiny_sd3(models_dir, name: str = "tiny_sd3.safetensors", seed: int = 0,
                   dtype: torch.dtype = torch.float32, **cfg) -> Path:
    """models/diffusion_models/<name>: an SD3 (MMDiT) that ``UNETLoader`` detects as SD3.

    Default: depth 2 (hidden 128, 2 heads), context 4096 and pooled 2048 (what CLIPLoader/
    TripleCLIPLoader with type sd3 produce), 16 latent channels, patch 2, pos-embed 16x16
    patches (latents up to 32x32, i.e. 256x256 pixels). ~1.9 M params, 7.6 MB fp32.
    """
    full = dict(depth=2, in_channels=16, out_channels=16, patch_size=2, context_dim=4096,
                pooled_dim=2048, pos_embed_max_size=16, mlp_ratio=4)
    full.update(cfg)
    sd = sd3_state_dict(seed=seed, dtype=dtype, **full)
    return _save(sd, Path(models_dir) / "diffusion_models" / name,
                 {"family": "sd3", "seed": seed, **full})


# --------------------------------------------------------------------------- Wan 2.1 (t2v)
def wan21_spec(dim: int = 128, ffn_dim: int = 256, num_layers: int = 2, in_dim: int = 16,
               out_dim: int = 16, text_dim: int = 4096, freq_dim: int = 256,
               patch_size: Tuple[int, int, int] = (1, 2, 2)) -> Spec:
    """Key shapes of ComfyUI's WanModel (comfy/ldm/wan/model.py), t2v with qk-norm and
    cross-attention norm (what model_detection sets for Wan 2.1)."""
    if dim % 128:
        raise ValueError("Wan detection sets num_heads = dim // 128: dim must be a multiple of 128")
    s: Spec = [("patch_embedding.weight", (dim, in_dim, *patch_size)), ("patch_embedding.bias", (dim,))]
    s += _linear("text_embedding.0", text_dim, dim) + _linear("text_embedding.2", dim, dim)
    s += _linear("time_embedding.0", freq_dim, dim) + _linear("time_embedding.2", dim, dim)
    s += _linear("time_projection.1", dim, 6 * dim)
    for i in range(num_layers):
        b = f"blocks.{i}"
        s.append((f"{b}.modulation", (1, 6, dim)))
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                s += _linear(f"{b}.{attn}.{proj}", dim, dim)
            s += [(f"{b}.{attn}.norm_q.weight", (dim,)), (f"{b}.{attn}.norm_k.weight", (dim,))]
            if attn == "self_attn":
                s += [(f"{b}.norm3.weight", (dim,)), (f"{b}.norm3.bias", (dim,))]
        s += _linear(f"{b}.ffn.0", dim, ffn_dim) + _linear(f"{b}.ffn.2", ffn_dim, dim)
    s.append(("head.modulation", (1, 2, dim)))
    s += _linear("head.head", dim, out_dim * math.prod(patch_size))
    return s


def wan21_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32, **cfg) -> Dict[str, torch.Tensor]:
    return _materialise(wan21_spec(**cfg), seed, dtype)


def write_tiny_wan21(models_dir, name: str = "tiny_wan21.safetensors", seed: int = 0,
                     dtype: torch.dtype = torch.float32, **cfg) -> Path:
    """models/diffusion_models/<name>: a Wan 2.1 text-to-video model for ``UNETLoader``.

    Default: dim 128 (1 head of 128), ffn 256, 2 layers, 16 latent channels, text_dim 4096.
    ~1.1 M params, 4.4 MB fp32. Latents [B, 16, T, H, W].
    """
    full = dict(dim=128, ffn_dim=256, num_layers=2, in_dim=16, out_dim=16, text_dim=4096, freq_dim=256)
    full.update(cfg)
    sd = wan21_state_dict(seed=seed, dtype=dtype, **full)
    return _save(sd, Path(models_dir) / "diffusion_models" / name,
                 {"family": "wan2.1", "seed": seed, **full})


# --------------------------------------------------------------------------- TAESD (VAE for 16-ch latents)
def taesd_spec(latent_channels: int = 16) -> Spec:
    """Key shapes of comfy/taesd/taesd.py TAESD (fixed 64-channel body)."""
    def conv(prefix, n_in, n_out, bias=True):
        s = [(f"{prefix}.weight", (n_out, n_in, 3, 3))]
        if bias:
            s.append((f"{prefix}.bias", (n_out,)))
        return s

    def block(prefix):  # Block(64, 64): conv.0, conv.2, conv.4 (skip is Identity)
        return conv(f"{prefix}.conv.0", 64, 64) + conv(f"{prefix}.conv.2", 64, 64) + conv(f"{prefix}.conv.4", 64, 64)

    s: Spec = [("vae_scale", ()), ("vae_shift", ())]
    # Encoder: conv(3,64), Block, [conv s2 no-bias, Block x3] x3, conv(64, latent)
    e = "taesd_encoder"
    s += conv(f"{e}.0", 3, 64) + block(f"{e}.1")
    idx = 2
    for _ in range(3):
        s += conv(f"{e}.{idx}", 64, 64, bias=False)
        for j in range(1, 4):
            s += block(f"{e}.{idx + j}")
        idx += 4
    s += conv(f"{e}.{idx}", 64, latent_channels)
    # Decoder: Clamp, conv(latent,64), ReLU, [Block x3, Upsample, conv no-bias] x3, Block, conv(64,3)
    d = "taesd_decoder"
    s += conv(f"{d}.1", latent_channels, 64)
    idx = 3
    for _ in range(3):
        for j in range(3):
            s += block(f"{d}.{idx + j}")
        s += conv(f"{d}.{idx + 4}", 64, 64, bias=False)  # idx+3 is nn.Upsample
        idx += 5
    s += block(f"{d}.{idx}") + conv(f"{d}.{idx + 1}", 64, 3)
    return s


def taesd_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16, latent_channels: int = 16):
    return _materialise(taesd_spec(latent_channels), seed, dtype)


def write_tiny_taesd_vae(models_dir, name: str = "tiny_taesd16.safetensors", seed: int = 0,
                         dtype: torch.dtype = torch.float16, latent_channels: int = 16) -> Path:
    """models/vae/<name>: a TAESD-architecture VAE for ``VAELoader`` (SD3 / Flux latents when
    latent_channels=16). 2.46 M params, 4.9 MB in fp16. 8x spatial scale."""
    sd = taesd_state_dict(seed=seed, dtype=dtype, latent_channels=latent_channels)
    return _save(sd, Path(models_dir) / "vae" / name,
                 {"family": "taesd", "seed": seed, "latent_channels": latent_channels})


# --------------------------------------------------------------------------- Wan 2.1 VAE
def wan21_vae_spec(dim: int = 8, z_dim: int = 16, dim_mult=(1, 2, 4, 4), num_res_blocks: int = 2,
                   temperal_downsample=(False, True, True)) -> Spec:
    """Key shapes of comfy/ldm/wan/vae.py WanVAE (no attention scales, as sd.py builds it)."""
    def cconv(prefix, n_in, n_out, k=(3, 3, 3)):
        return [(f"{prefix}.weight", (n_out, n_in, *k)), (f"{prefix}.bias", (n_out,))]

    def rms(prefix, n, images=False):
        return [(f"{prefix}.gamma", (n, 1, 1) if images else (n, 1, 1, 1))]

    def resblock(prefix, n_in, n_out):
        s = rms(f"{prefix}.residual.0", n_in) + cconv(f"{prefix}.residual.2", n_in, n_out)
        s += rms(f"{prefix}.residual.3", n_out) + cconv(f"{prefix}.residual.6", n_out, n_out)
        if n_in != n_out:
            s += cconv(f"{prefix}.shortcut", n_in, n_out, (1, 1, 1))
        return s

    def attn(prefix, n):
        return (rms(f"{prefix}.norm", n, images=True)
                + [(f"{prefix}.to_qkv.weight", (3 * n, n, 1, 1)), (f"{prefix}.to_qkv.bias", (3 * n,)),
                   (f"{prefix}.proj.weight", (n, n, 1, 1)), (f"{prefix}.proj.bias", (n,))])

    def resample(prefix, n, mode):
        if mode.startswith("up"):
            s = [(f"{prefix}.resample.1.weight", (n // 2, n, 3, 3)), (f"{prefix}.resample.1.bias", (n // 2,))]
            if mode == "upsample3d":
                s += cconv(f"{prefix}.time_conv", n, 2 * n, (3, 1, 1))
        else:
            s = [(f"{prefix}.resample.1.weight", (n, n, 3, 3)), (f"{prefix}.resample.1.bias", (n,))]
            if mode == "downsample3d":
                s += cconv(f"{prefix}.time_conv", n, n, (3, 1, 1))
        return s

    dim_mult = list(dim_mult)
    s: Spec = []
    # encoder (z_dim * 2 outputs: mean and log-variance)
    dims = [dim * u for u in [1] + dim_mult]
    s += cconv("encoder.conv1", 3, dims[0])
    idx = 0
    for i, (n_in, n_out) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(num_res_blocks):
            s += resblock(f"encoder.downsamples.{idx}", n_in, n_out)
            idx += 1
            n_in = n_out
        if i != len(dim_mult) - 1:
            s += resample(f"encoder.downsamples.{idx}", n_out,
                          "downsample3d" if temperal_downsample[i] else "downsample2d")
            idx += 1
    top = dims[-1]
    s += resblock("encoder.middle.0", top, top) + attn("encoder.middle.1", top) + resblock("encoder.middle.2", top, top)
    s += rms("encoder.head.0", top) + cconv("encoder.head.2", top, 2 * z_dim)
    s += cconv("conv1", 2 * z_dim, 2 * z_dim, (1, 1, 1)) + cconv("conv2", z_dim, z_dim, (1, 1, 1))
    # decoder
    temperal_upsample = list(temperal_downsample)[::-1]
    dims = [dim * u for u in [dim_mult[-1]] + dim_mult[::-1]]
    s += cconv("decoder.conv1", z_dim, dims[0])
    s += resblock("decoder.middle.0", dims[0], dims[0]) + attn("decoder.middle.1", dims[0]) \
        + resblock("decoder.middle.2", dims[0], dims[0])
    idx = 0
    for i, (n_in, n_out) in enumerate(zip(dims[:-1], dims[1:])):
        if i in (1, 2, 3):
            n_in = n_in // 2
        for _ in range(num_res_blocks + 1):
            s += resblock(f"decoder.upsamples.{idx}", n_in, n_out)
            idx += 1
            n_in = n_out
        if i != len(dim_mult) - 1:
            s += resample(f"decoder.upsamples.{idx}", n_out,
                          "upsample3d" if temperal_upsample[i] else "upsample2d")
            idx += 1
    s += rms("decoder.head.0", dims[-1]) + cconv("decoder.head.2", dims[-1], 3)
    return s


def wan21_vae_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32, **cfg):
    return _materialise(wan21_vae_spec(**cfg), seed, dtype)


def write_tiny_wan21_vae(models_dir, name: str = "tiny_wan21_vae.safetensors", seed: int = 0,
                         dtype: torch.dtype = torch.float32, dim: int = 8) -> Path:
    """models/vae/<name>: a Wan 2.1 VAE (dim from ``decoder.head.0.gamma``) for ``VAELoader``.
    dim 8: 0.92 M params, 3.7 MB fp32; 16 latent channels, 8x spatial, 4x temporal."""
    sd = wan21_vae_state_dict(seed=seed, dtype=dtype, dim=dim)
    return _save(sd, Path(models_dir) / "vae" / name, {"family": "wan2.1_vae", "seed": seed, "dim": dim})


# --------------------------------------------------------------------------- CLIP-L (not tiny)
def clip_l_spec(layers: int = 12, width: int = 768, vocab: int = 49408, ctx: int = 77) -> Spec:
    """HF CLIPTextModel layout that ``detect_te_model`` reads as CLIP-L (sd.py:997). ComfyUI
    builds it from the fixed sd1_clip_config.json, so these sizes cannot shrink."""
    s: Spec = [("text_model.embeddings.token_embedding.weight", (vocab, width)),
               ("text_model.embeddings.position_embedding.weight", (ctx, width))]
    for i in range(layers):
        b = f"text_model.encoder.layers.{i}"
        s += [(f"{b}.layer_norm1.weight", (width,)), (f"{b}.layer_norm1.bias", (width,))]
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s += _linear(f"{b}.self_attn.{proj}", width, width)
        s += [(f"{b}.layer_norm2.weight", (width,)), (f"{b}.layer_norm2.bias", (width,))]
        s += _linear(f"{b}.mlp.fc1", width, 4 * width) + _linear(f"{b}.mlp.fc2", 4 * width, width)
    s += [("text_model.final_layer_norm.weight", (width,)), ("text_model.final_layer_norm.bias", (width,))]
    s += _linear("text_projection", width, width, bias=False)
    return s


def clip_l_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16):
    return _materialise(clip_l_spec(), seed, dtype)


def write_random_clip_l(models_dir, name: str = "random_clip_l.safetensors", seed: int = 0,
                        dtype: torch.dtype = torch.float16) -> Path:
    """models/text_encoders/<name>: a random-weight CLIP-L (123 M params, 246 MB in fp16, a few
    seconds to write). Use ``CLIPLoader(clip_name=name, type="sd3")`` for SD3-shaped
    conditioning ([B,77,4096] + pooled [B,2048]). Skips the write when the file exists with the
    same seed."""
    path = Path(models_dir) / "text_encoders" / name
    meta = {"family": "clip_l", "seed": seed, "dtype": str(dtype)}
    if path.exists():
        try:
            from safetensors import safe_open
            with safe_open(str(path), "pt") as f:
                if json.loads((f.metadata() or {}).get("branchgrpo_tiny", "{}")) == meta:
                    return path
        except Exception:
            pass
    return _save(clip_l_state_dict(seed=seed, dtype=dtype), path, meta)


# --------------------------------------------------------------------------- conditioning without a text encoder
def write_conditioning_dataset(output_dir, folder: str = "tiny_conditioning", n: int = 1, seed: int = 0,
                               context_dim: int = 4096, tokens: int = 8, pooled_dim: int | None = 2048,
                               latent_shape: Tuple[int, ...] = (1, 16, 8, 8)) -> Path:
    """<output>/<folder>/shard_000.pkl in the format of the stock ``LoadTrainingDataset`` node
    (``torch.load(weights_only=True)`` of {"latents": [{"samples": T}], "conditioning": [COND]}).

    That node has no inputs and outputs lists of LATENT and CONDITIONING, so a graph can run a
    diffusion model (e.g. KSampler) on arbitrary-width conditioning without any text encoder.
    Default: SD3-shaped cond [1, tokens, 4096] with pooled [1, 2048].
    """
    gen = torch.Generator().manual_seed(seed)
    latents, conds = [], []
    for _ in range(n):
        extra = {}
        if pooled_dim:
            extra["pooled_output"] = torch.randn(1, pooled_dim, generator=gen)
        conds.append([[torch.randn(1, tokens, context_dim, generator=gen), extra]])
        latents.append({"samples": torch.randn(*latent_shape, generator=gen)})
    path = Path(output_dir) / folder / "shard_000.pkl"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save({"latents": latents, "conditioning": conds}, f)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- all at once
def write_all_tiny(models_dir, seed: int = 0) -> Dict[str, Path]:
    """Every tiny file (not the 246 MB CLIP-L). Returns {role: path}."""
    return {
        "sd3": write_tiny_sd3(models_dir, seed=seed),
        "wan21": write_tiny_wan21(models_dir, seed=seed),
        "taesd_vae": write_tiny_taesd_vae(models_dir, seed=seed),
        "wan21_vae": write_tiny_wan21_vae(models_dir, seed=seed),
    }
