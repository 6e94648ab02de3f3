"""The model families at their real widths (ComfyUI's own classes, random weights), and the one random initialiser.

``FAMILIES`` holds each family's real configuration (``comfy.supported_models`` -> ``model_base``);
:func:`build_model` builds one with ``blocks`` blocks per block list (so full width fits a CPU), bf16, fp8
(e4m3fn, computed in bf16 as the stock ``UNETLoader`` gives it) or fp32, wrapped in a ``ModelPatcher``.
``bench.scale``, ``scripts/gpu_check.sh`` (through ``bench.scale``) and the tests build their models here.

:func:`init_tensor` is the project's one seeded initialiser: each tensor is drawn from its own generator seeded
with (seed, name), so the values never depend on order; the tests' tiny models (``tests/tiny_models.py``,
``tests/comfy_dev_pack``) use it too. Only torch is imported at module level.
"""
from __future__ import annotations

import copy
import math
import zlib

import torch


# ---------------------------------------------------------------------------------------------- initialiser
def key_generator(seed: int, key: str, device=None) -> torch.Generator:
    """A generator seeded with ``(seed, key)`` (on ``device``)."""
    g = torch.Generator(device=device) if device is not None else torch.Generator()
    return g.manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2 ** 63))


def _is_norm_scale(key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    if leaf in ("gamma", "scale"):
        return True
    if leaf == "weight":
        parts = key.split(".")
        owner = parts[-2] if len(parts) >= 2 else ""
        return "norm" in owner or owner.startswith("ln")
    return False


def _is_norm_shift(key: str) -> bool:
    parts = key.split(".")
    if parts[-1] != "bias" or len(parts) < 2:
        return False
    owner = parts[-2]
    return "norm" in owner or owner.startswith("ln")


def init_tensor(key: str, shape: tuple[int, ...], seed: int, *, device=None, dtype=None) -> torch.Tensor:
    """A small deterministic random value for the tensor named ``key``: weight matrices and kernels N(0, 1/fan_in),
    biases N(0, 0.01^2), norm scales 1, norm shifts 0, positional embeddings, modulation tables and other vectors
    N(0, 0.02^2)."""
    kw = {"device": device, "dtype": dtype or torch.float32}
    if _is_norm_scale(key) or key.endswith("vae_scale"):
        return torch.ones(shape, **kw)
    if _is_norm_shift(key) or key.endswith("vae_shift"):
        return torch.zeros(shape, **kw)
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "bias":
        std = 0.01
    elif "pos_embed" in key or "position_embedding" in key or leaf == "modulation" or "token_embedding" in key:
        std = 0.02
    elif len(shape) >= 2:
        std = 1.0 / math.sqrt(max(1, math.prod(shape[1:])))
    else:
        std = 0.02
    return torch.randn(shape, generator=key_generator(seed, key, device), **kw) * std


# ---------------------------------------------------------------------------------------------- cores
#: Keys that newer cores' model classes require and their detection fills in (``comfy/model_detection.py``), with
#: the value it gives the models built here (FLUX.1 / HunyuanVideo without the newer variants' extras).
NEWER_CORE_DEFAULTS = {"txt_ids_dims": [], "meanflow_sum": False, "vec_in_dim": None, "use_x0": False,
                       "use_sequential_txt_ids": False}


def build_with_core_defaults(make, unet_config: dict):
    """``make(config)`` for a ``unet_config`` written for ComfyUI 0.3.75; on a core whose model class requires a
    key that config predates, the key gets its detection default (feature-detected: the build is tried)."""
    cfg = dict(unet_config)
    for _ in range(len(NEWER_CORE_DEFAULTS) + 1):
        try:
            return make(cfg)
        except TypeError as e:
            import re
            text = str(e)
            names = re.findall(r"'(\w+)'", text.split("missing", 1)[1]) if "required positional argument" in text \
                else []
            if not names or any(n not in NEWER_CORE_DEFAULTS or n in cfg for n in names):
                raise
            cfg.update({n: NEWER_CORE_DEFAULTS[n] for n in names})
    return make(cfg)


# ---------------------------------------------------------------------------------------------- families
_FLUX = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 768,
         "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19,
         "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
         "guidance_embed": True}


def _mmdit(depth: int, pos_embed_max_size: int, x_attn: list[int]) -> dict:
    return {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": depth, "input_size": None,
            "adm_in_channels": 2048, "num_patches": pos_embed_max_size ** 2, "pos_embed_max_size": pos_embed_max_size,
            "context_embedder_config": {"target": "torch.nn.Linear",
                                        "params": {"in_features": 4096, "out_features": 64 * depth}},
            "qk_norm": "rms", "pos_embed_scaling_factor": None, "x_block_self_attn_layers": x_attn}


def _wan(dim: int, heads: int, ffn: int, layers: int) -> dict:
    return {"image_model": "wan2.1", "dim": dim, "out_dim": 16, "num_heads": heads, "ffn_dim": ffn,
            "num_layers": layers, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1), "qk_norm": True,
            "cross_attn_norm": True, "eps": 1e-6, "in_dim": 16, "model_type": "t2v"}


# depth_keys: the config keys that set the number of blocks of each block list, in block-list order
FAMILIES: dict[str, dict] = {
    "flux-dev": {"unet": _FLUX, "depth_keys": ("depth", "depth_single_blocks"), "video": False, "guidance": 3.5,
                 "vae": "kl16", "resolution": 1024},
    "sd35-large": {"unet": _mmdit(38, 192, []), "depth_keys": ("num_blocks",), "video": False, "guidance": None,
                   "vae": "kl16", "resolution": 1024},
    "sd35-medium": {"unet": _mmdit(24, 384, list(range(13))), "depth_keys": ("num_blocks",), "video": False,
                    "guidance": None, "vae": "kl16", "resolution": 1024},
    "wan21-14b": {"unet": _wan(5120, 40, 13824, 40), "depth_keys": ("num_layers",), "video": True, "guidance": None,
                  "vae": "wan21", "resolution": (480, 832), "frames": 33},
    "wan21-1.3b": {"unet": _wan(1536, 12, 8960, 30), "depth_keys": ("num_layers",), "video": True, "guidance": None,
                   "vae": "wan21", "resolution": (480, 832), "frames": 33},
}
FULL_DEPTH = {"flux-dev": (19, 38), "sd35-large": (38,), "sd35-medium": (24,), "wan21-14b": (40,),
              "wan21-1.3b": (30,)}
HPS_V21_PARAMS = "ViT-H-14"

def narrowed(family: str, width: int) -> dict:
    """The family's configuration at ``width`` channels (head size 128 kept): a fast smoke shape of the same
    architecture. MMDiT ties its width to its depth (64 per block), so SD3.5 has no narrow form."""
    unet = copy.deepcopy(FAMILIES[family]["unet"])
    if width % 128:
        raise SystemExit(f"--width {width}: must be a multiple of 128 (the head size)")
    if unet.get("image_model") == "flux":
        unet.update(hidden_size=width, num_heads=width // 128)
    elif unet.get("image_model") == "wan2.1":
        unet.update(dim=width, num_heads=width // 128, ffn_dim=4 * width)
    else:
        raise SystemExit(f"--width: {family} sets its width from its depth; only FLUX and Wan have a narrow form")
    return unet



def latent_shape(family: str, resolution, frames: int) -> tuple[int, ...]:
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    if h % 16 or w % 16:
        raise SystemExit(f"--resolution {h}x{w}: both sides must be multiples of 16")
    if FAMILIES[family]["video"]:
        return (16, (frames - 1) // 4 + 1, h // 8, w // 8)
    return (16, h // 8, w // 8)


def parse_resolution(text: str):
    if "x" in text:
        h, w = (int(v) for v in text.lower().split("x"))
        return (h, w)
    return int(text)



def model_config(family: str, weight_dtype: str, blocks: int | None):
    import comfy.model_detection
    spec = FAMILIES[family]
    unet = copy.deepcopy(spec["unet"])
    if blocks:
        for key in spec["depth_keys"]:
            unet[key] = blocks
    mc = comfy.model_detection.model_config_from_unet_config(unet)
    if mc is None:
        raise SystemExit(f"ComfyUI 0.3.75 has no model config matching {family}")
    if weight_dtype == "fp8":
        mc.set_inference_dtype(torch.float8_e4m3fn, torch.bfloat16)
    elif weight_dtype == "bf16":
        mc.set_inference_dtype(torch.bfloat16, None)
    else:
        mc.set_inference_dtype(torch.float32, None)
    return mc


@torch.no_grad()
def init_weights_(module: torch.nn.Module, seed: int = 0) -> None:
    """Random weights in place (ComfyUI leaves them empty), each tensor from :func:`init_tensor` by its name, drawn
    on the tensor's device; fp8 tensors are drawn in bf16 and cast."""
    for name, p in list(module.named_parameters()) + list(module.named_buffers()):
        if p.is_floating_point() and p.numel() > 0:
            draw = torch.bfloat16 if p.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else p.dtype
            p.copy_(init_tensor(name, tuple(p.shape), seed, device=p.device, dtype=draw))


def _config_with(mc, unet_config: dict):
    """``mc`` with ``unet_config`` (keys a newer core requires added)."""
    mc.unet_config = dict(unet_config)
    return mc


def build_model(family: str, weight_dtype: str, blocks: int | None, device: torch.device, *, fake: bool = False):
    """A ModelPatcher over ComfyUI's model of ``family`` (random weights), ``blocks`` per block list (None: full).
    ``fake``: on the meta device (sizes only)."""
    import comfy.model_patcher
    mc = model_config(family, weight_dtype, blocks)
    with torch.inference_mode(False):
        if fake:
            base = build_with_core_defaults(lambda cfg: _config_with(mc, cfg).get_model({}, device=torch.device("meta")),
                                            mc.unet_config)
        else:
            base = build_with_core_defaults(lambda cfg: _config_with(mc, cfg).get_model({}, device=device),
                                            mc.unet_config)
            init_weights_(base.diffusion_model)
            base.diffusion_model.requires_grad_(False)
    return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=torch.device("cpu"))


def random_cond(memory, mp, tokens: int, guidance, seed: int = 0) -> list:
    return memory.random_conditioning(mp.model.diffusion_model, tokens, guidance,
                                            torch.Generator().manual_seed(seed))


