"""Tiny random-weight reward models of the SAME classes as the real ones, written to disk in the
real file layouts, so tests go through the real loading code (``branchgrpo.rewards``).

No ComfyUI import. Every writer is deterministic (each tensor drawn from its own generator seeded
with ``(seed, key)``) and returns the path(s) it wrote. Typical use in a ComfyUI test::

    paths = write_all_tiny_rewards(comfy_base / "models" / "reward_models")
    # -> {"imagereward": .../ImageReward.pt, "clip": .../clip-vit-large-patch14,
    #     "aesthetic": .../sac+logos+ava1-l14-linearMSE.pth, "pickscore": .../PickScore_v1}

then ``BranchGRPOCLIPScoreLoader`` (model "clip-vit-large-patch14"), ``BranchGRPOAestheticLoader``
(checkpoint "sac+logos+ava1-l14-linearMSE.pth", clip "clip-vit-large-patch14"),
``BranchGRPOPickScoreLoader`` (model "PickScore_v1") and ``BranchGRPOImageRewardLoader`` (checkpoint
"ImageReward.pt"; a tiny ``med_config.json`` sits next to it) load them in a real server.
HPS v2.1 needs an open_clip architecture registered in the same process
(:func:`register_tiny_open_clip`), so it is for in-process tests only.

Sizes: tiny CLIP 1.7 M params (the 49408-token CLIP vocabulary x 32), tiny ImageReward 1.1 M
(the 30524-token BERT vocabulary x 32), aesthetic MLP 0.16 M; every file < 8 MB.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Dict, Optional

import torch

from bench.families import key_generator

TINY_OPEN_CLIP = "BranchGRPO-tiny-ViT"
TINY_OPEN_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_IMAGE_SIZE = 32


def _gen(seed: int, key: str) -> torch.Generator:
    return key_generator(seed, key)


@torch.no_grad()
def tiny_init_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Deterministic init, independent of parameter order: matrices N(0, 1/fan_in), vectors
    N(0, 0.1^2) (norm scales 1 + that), embeddings N(0, 0.5^2). Scores then differ clearly between
    images and prompts (the defaults' tiny weights make every score almost the same)."""
    for name, p in module.named_parameters():
        g = _gen(seed, name)
        if p.dim() >= 2:
            fan_in = p[0].numel()
            std = 0.5 if ("embed" in name or "token" in name) else 1.0 / math.sqrt(max(1, fan_in))
            p.copy_(torch.randn(p.shape, generator=g) * std)
        elif "norm" in name.lower() and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        elif name.endswith("logit_scale"):
            p.fill_(math.log(10.0))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module


# ---------------------------------------------------------------------------------- CLIP ---

def tiny_clip_config(projection_dim: int = 16):
    from transformers import CLIPConfig
    return CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=TINY_IMAGE_SIZE, patch_size=8),
        projection_dim=projection_dim)


def write_tiny_clip(folder, seed: int = 0, with_tokenizer: bool = True, with_preprocessor: bool = True,
                    projection_dim: int = 16) -> Path:
    """A Hugging Face CLIP folder (config.json + model.safetensors [+ tokenizer, preprocessor_config])."""
    from transformers import CLIPModel
    from branchgrpo.rewards.clip_models import clip_tokenizer_from_open_clip
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = tiny_init_(CLIPModel(tiny_clip_config(projection_dim)), seed).eval()
    model.save_pretrained(str(folder))
    if with_tokenizer:
        clip_tokenizer_from_open_clip().save_pretrained(str(folder))
    if with_preprocessor:
        (folder / "preprocessor_config.json").write_text(json.dumps({
            "crop_size": {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, "do_center_crop": True,
            "do_normalize": True, "do_resize": True, "image_processor_type": "CLIPImageProcessor",
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
            "resample": 3, "size": {"shortest_edge": TINY_IMAGE_SIZE}}, indent=2))
    return folder


# ----------------------------------------------------------------------------- aesthetic ---

def write_tiny_aesthetic(folder, seed: int = 0, input_size: int = 16,
                         name: str = "sac+logos+ava1-l14-linearMSE.pth") -> Path:
    """The aesthetic MLP head (same class and keys as the real one) as a plain torch state dict."""
    from branchgrpo.rewards.aesthetic import AestheticMLP
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mlp = tiny_init_(AestheticMLP(input_size), seed)
    path = folder / name
    sd = {k: v.contiguous() for k, v in mlp.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        torch.save(sd, str(path))
    return path


# --------------------------------------------------------------------------- ImageReward ---

def tiny_med_config() -> dict:
    from branchgrpo.rewards.imagereward import MED_CONFIG
    cfg = json.loads(Path(MED_CONFIG).read_text())
    cfg.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=40, encoder_width=64)
    return cfg


TINY_IR_VISION = dict(img_size=TINY_IMAGE_SIZE, patch_size=8, embed_dim=64, depth=2, num_heads=1, mlp_ratio=4.0,
                      qkv_bias=True)


def write_tiny_imagereward(folder, seed: int = 0, name: str = "ImageReward.pt") -> Path:
    """``ImageReward.pt`` (a plain state dict, like the official file) of the package's classes at a tiny
    size, with a tiny ``med_config.json`` beside it (the loader prefers it to the shipped one)."""
    from branchgrpo.rewards.imagereward import build_imagereward, load_bert_tokenizer
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    med = folder / "med_config.json"
    med.write_text(json.dumps(tiny_med_config(), indent=2))
    model = tiny_init_(build_imagereward(med, TINY_IR_VISION, load_bert_tokenizer()), seed)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = folder / name
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        torch.save(sd, str(path))
    return path


# --------------------------------------------------------------------------------- HPS ---

def register_tiny_open_clip() -> str:
    """Register the tiny open_clip architecture in this process; returns its name."""
    import open_clip
    if open_clip.get_model_config(TINY_OPEN_CLIP) is None:
        d = Path(tempfile.mkdtemp(prefix="branchgrpo_openclip_cfg_"))
        (d / f"{TINY_OPEN_CLIP}.json").write_text(json.dumps(TINY_OPEN_CLIP_CFG))
        open_clip.add_model_config(d)
    return TINY_OPEN_CLIP


def write_tiny_hps(folder, seed: int = 0, name: str = "HPS_v2.1_compressed.pt") -> Path:
    """An HPS-style checkpoint (``{"state_dict": ...}``) of the tiny open_clip architecture."""
    import open_clip
    arch = register_tiny_open_clip()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = tiny_init_(open_clip.create_model(arch, pretrained=None, load_weights=False, pretrained_text=False),
                       seed)
    path = folder / name
    torch.save({"state_dict": {k: v.contiguous() for k, v in model.state_dict().items()}}, str(path))
    return path


def write_all_tiny_rewards(reward_models_dir, seed: int = 0) -> Dict[str, Path]:
    """Everything a ComfyUI server can load through the loader nodes (all but HPS, see above)."""
    d = Path(reward_models_dir)
    return {
        "clip": write_tiny_clip(d / "clip-vit-large-patch14", seed),
        "aesthetic": write_tiny_aesthetic(d, seed),
        "pickscore": write_tiny_clip(d / "PickScore_v1", seed + 1),
        "imagereward": write_tiny_imagereward(d / "ImageReward", seed),
    }


def tiny_images(n: int = 3, size: int = 40, seed: int = 0, video_frames: Optional[int] = None) -> torch.Tensor:
    """Deterministic IMAGE batch ``[n, size, size, 3]`` (or video ``[n, T, size, size, 3]``) in ``[0, 1]``."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, video_frames, size, size, 3) if video_frames else (n, size, size, 3)
    return torch.rand(shape, generator=g)
