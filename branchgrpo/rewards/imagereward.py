"""ImageReward v1.0 (Xu et al., 2023), on the ``image-reward`` package's own model classes.

Structure: BLIP ViT-L/16 image encoder (224 px) -> BERT-base text encoder with cross-attention to
the image tokens -> the [CLS] feature -> MLP 768-1024-128-64-16-1 (no activations) -> normalised
with the published mean 0.16717362830052426 and std 1.0333394966054072. Scores are roughly
standard-normal over generated images (higher is better, typically -2 .. 2). Differentiable.

Loading (:func:`load_imagereward`), all local:

- the checkpoint ``ImageReward.pt`` (THUDM/ImageReward; or a ``.safetensors`` conversion), read with
  ``torch.load(weights_only=True)`` and checked key by key (no ``strict=False``);
- the BLIP ``med_config.json`` shipped in ``branchgrpo/rewards/assets/`` (a ``med_config.json``
  next to the checkpoint, or an explicit path, takes precedence);
- the tokenizer: ``BertTokenizer`` on the bert-base-uncased WordPiece vocabulary shipped in
  ``assets/bert-base-uncased/vocab.txt`` (30522 tokens, identical to the hub's; a ``vocab.txt``
  next to the checkpoint takes precedence) plus BLIP's ``[DEC]`` (30522) and ``[ENC]`` (30523).
  The package's own ``BertTokenizer.from_pretrained('bert-base-uncased')`` is never called: offline
  on transformers 5 it silently returns a tokenizer that maps every word to ``[UNK]``. The tokenizer
  is verified (vocabulary > 30000, special ids, a test sentence without ``[UNK]``).

The vision tower's size is read from the checkpoint (width from the patch embedding, depth from
the block count, image size from the position table, heads = width / 64 as in BLIP's ViT-B and
ViT-L), so the same code loads the official ViT-L checkpoint and tiny test checkpoints.

The package is imported lazily, through :mod:`.imagereward_compat` (transformers 5 shims).
"""
from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path
from typing import List, Optional, Union

import torch

from .base import ModelReward, clip_preprocess, frozen
from .files import (PathLike, RewardLoadError, check_state_dict_keys, find_file, load_state_dict_file,
                    skip_init)

__all__ = ["ImageRewardScorer", "load_imagereward", "build_imagereward", "load_bert_tokenizer",
           "infer_vision_config", "ASSETS", "MED_CONFIG", "BERT_VOCAB"]

ASSETS = Path(__file__).resolve().parent / "assets"
MED_CONFIG = ASSETS / "med_config.json"
BERT_VOCAB = ASSETS / "bert-base-uncased"  # folder holding vocab.txt
TEXT_MAX_LENGTH = 35
SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
_VIS = "blip.visual_encoder."


def load_bert_tokenizer(vocab: Optional[PathLike] = None):
    """BLIP's tokenizer, offline: BERT uncased WordPiece + ``[DEC]`` (bos) + ``[ENC]``; verified."""
    from transformers import BertTokenizer
    folder = Path(vocab) if vocab else BERT_VOCAB
    if folder.is_file():
        if folder.name != "vocab.txt":
            raise FileNotFoundError(f"ImageReward tokenizer: give a folder holding vocab.txt, not {folder}")
        folder = folder.parent
    if not (folder / "vocab.txt").is_file():
        raise FileNotFoundError(f"ImageReward tokenizer: {folder / 'vocab.txt'} not found")
    vocab = folder / "vocab.txt"
    tok = BertTokenizer.from_pretrained(str(folder), local_files_only=True, do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tok.enc_token_id = tok.convert_tokens_to_ids("[ENC]")
    verify_bert_tokenizer(tok, str(vocab))
    return tok


def verify_bert_tokenizer(tok, source: str = "tokenizer") -> None:
    n = len(tok)
    if n <= 30000:
        raise RewardLoadError(f"ImageReward tokenizer from {source} has only {n} tokens; the bert-base-uncased "
                              "vocabulary (30522 + [DEC] + [ENC]) is required.")
    ids = tok("a photo of a cat", add_special_tokens=False).input_ids
    if not ids or tok.unk_token_id in ids:
        raise RewardLoadError(f"ImageReward tokenizer from {source} maps plain words to [UNK] ({ids}); "
                              "it is not the bert-base-uncased vocabulary.")
    if tok.convert_tokens_to_ids("[DEC]") != 30522 or tok.enc_token_id != 30523:
        raise RewardLoadError(f"ImageReward tokenizer from {source}: [DEC]/[ENC] ids are "
                              f"{tok.convert_tokens_to_ids('[DEC]')}/{tok.enc_token_id}, expected 30522/30523.")


def infer_vision_config(sd) -> dict:
    """BLIP ViT hyper-parameters from the checkpoint's shapes."""
    try:
        w = sd[_VIS + "patch_embed.proj.weight"]
        pos = sd[_VIS + "pos_embed"]
        fc1 = sd[_VIS + "blocks.0.mlp.fc1.weight"]
    except KeyError as e:
        raise RewardLoadError(f"not an ImageReward checkpoint: key {e.args[0]!r} missing") from None
    width, patch = int(w.shape[0]), int(w.shape[-1])
    grid = math.isqrt(int(pos.shape[1]) - 1)
    if grid * grid != int(pos.shape[1]) - 1:
        raise RewardLoadError(f"ImageReward checkpoint: position table of {pos.shape[1]} tokens is not 1 + a square")
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(re.escape(_VIS) + r"blocks\.(\d+)\.", k)))
    if width % 64:
        raise RewardLoadError(f"ImageReward checkpoint: ViT width {width} is not a multiple of 64 (head size)")
    return dict(img_size=grid * patch, patch_size=patch, embed_dim=width, depth=depth, num_heads=width // 64,
                mlp_ratio=int(fc1.shape[0]) / width, qkv_bias=(_VIS + "blocks.0.attn.qkv.bias") in sd)


def build_imagereward(med_config: PathLike, vision: dict, tokenizer, proj_dim: int = 256):
    """An ``ImageReward`` module of the package's classes (BLIP ViT + med BERT + MLP), weights not
    initialised (they are loaded next). Mirrors ``ImageReward.__init__`` / ``BLIP_Pretrain.__init__``
    with the vision size given (they hard-code ViT-L) and the offline tokenizer."""
    from .imagereward_compat import import_imagereward
    ir = import_imagereward()
    nn = torch.nn
    cfg = ir.BertConfig.from_json_file(str(med_config))
    cfg.encoder_width = vision["embed_dim"]
    vit_mod = ir.modules.vit
    saved_trunc = vit_mod.trunc_normal_
    with skip_init(), contextlib.ExitStack() as stack:
        vit_mod.trunc_normal_ = lambda t, *a, **k: t
        stack.callback(setattr, vit_mod, "trunc_normal_", saved_trunc)
        blip = ir.BLIP_Pretrain.__new__(ir.BLIP_Pretrain)
        nn.Module.__init__(blip)
        blip.visual_encoder = ir.VisionTransformer(
            img_size=vision["img_size"], patch_size=vision["patch_size"], embed_dim=vision["embed_dim"],
            depth=vision["depth"], num_heads=vision["num_heads"], mlp_ratio=vision.get("mlp_ratio", 4.0),
            qkv_bias=vision.get("qkv_bias", True), drop_path_rate=0.0)
        blip.tokenizer = tokenizer
        blip.text_encoder = ir.BertModel(config=cfg, add_pooling_layer=False)
        text_width = blip.text_encoder.config.hidden_size
        blip.vision_proj = nn.Linear(vision["embed_dim"], proj_dim)
        blip.text_proj = nn.Linear(text_width, proj_dim)
        model = ir.ImageReward.__new__(ir.ImageReward)
        nn.Module.__init__(model)
        model.device = "cpu"
        model.blip = blip
        model.preprocess = ir.transform(vision["img_size"])
        model.mlp = ir.MLP(text_width)
        model.mean = SCORE_MEAN
        model.std = SCORE_STD
    return model


class ImageRewardScorer(ModelReward):
    """ImageReward on ComfyUI IMAGE batches (see the module docstring)."""

    name = "imagereward"
    differentiable = True

    def __init__(self, model, tokenizer, image_size: int = 224, **kwargs):
        super().__init__(**kwargs)
        self.model = frozen(model)
        self.tokenizer = tokenizer
        self.image_size = int(image_size)

    def modules(self) -> List[torch.nn.Module]:
        return [self.model]

    def _score(self, pixels: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        device = pixels.device
        x = clip_preprocess(pixels, self.image_size).to(self.dtype)
        text = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=TEXT_MAX_LENGTH,
                              return_tensors="pt")
        self.model.device = device  # score_gard builds the image attention mask on model.device
        rewards = self.model.score_gard(text.input_ids.to(device), text.attention_mask.to(device), x)
        return rewards.reshape(-1)


def load_imagereward(checkpoint: Optional[PathLike] = None, *, search_dirs=None,
                     med_config: Optional[PathLike] = None, vocab: Optional[PathLike] = None,
                     device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                     where: str = "ImageReward", **kwargs) -> ImageRewardScorer:
    """Load ImageReward from local files only (see the module docstring). ``checkpoint``: a path, or
    a name inside ``search_dirs``; None looks for ``ImageReward.pt`` there and in the hub cache."""
    path = find_file("imagereward", checkpoint, search_dirs, where)
    from .imagereward_compat import import_imagereward
    import_imagereward()  # fail early (ImportError with the install command) before reading 1.7 GB
    sd = load_state_dict_file(path, where)
    if med_config is None:
        med_config = path.parent / "med_config.json" if (path.parent / "med_config.json").is_file() else MED_CONFIG
    if vocab is None and (path.parent / "vocab.txt").is_file():
        vocab = path.parent
    tokenizer = load_bert_tokenizer(vocab)
    vision = infer_vision_config(sd)
    proj = sd.get("blip.vision_proj.weight")
    model = build_imagereward(med_config, vision, tokenizer, proj_dim=int(proj.shape[0]) if proj is not None else 256)
    try:
        check_state_dict_keys(model, sd, f"{where}: {path.name}")
    except RewardLoadError as e:
        raise RewardLoadError(f"{e} (text encoder built from {med_config}; vision: {vision})") from None
    model.load_state_dict(sd, strict=True)
    model.to(device=device, dtype=dtype)
    return ImageRewardScorer(model, tokenizer, image_size=vision["img_size"], **kwargs)
