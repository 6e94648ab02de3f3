"""Rewards on transformers ``CLIPModel``: PickScore v1 and CLIP score.

PickScore v1 (Kirstain et al., 2023): CLIP ViT-H-14 fine-tuned on Pick-a-Pic preferences.
    score = ``logit_scale.exp() * cos(image, text)``, as in the reference code (about 100 x cosine;
    typically 18 .. 23, higher is better). Folder: ``yuvalkirstain/PickScore_v1``; processor
    (tokenizer + preprocessing) from ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
CLIP score: ``cos(image, text)`` of CLIP ViT-L/14 (``openai/clip-vit-large-patch14``), in
    ``[-1, 1]`` (typically 0.15 .. 0.35 for a matching pair; torchmetrics' CLIPScore is
    ``100 * max(cos, 0)``).

Both are differentiable. Loading is local only: :func:`load_clip_folder` reads a Hugging Face model
folder with ``CLIPModel.from_pretrained(folder, local_files_only=True)`` (safetensors, or ``.bin``
through transformers' ``weights_only`` loader) and fails on any missing, unexpected or mismatched
key (the only tolerated extra is the ``position_ids`` buffer that old checkpoints carry and
transformers itself ignores). The tokenizer is the folder's (``CLIPTokenizer``), else the processor
folder's, else the CLIP BPE vocabulary shipped inside open-clip-torch (:func:`clip_tokenizer_from_open_clip`,
the same token ids as OpenAI's and LAION's tokenizers). Preprocessing follows the folder's
``preprocessor_config.json`` (size, crop, mean/std), else CLIP's defaults (224 px, OpenAI mean/std).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ModelReward, clip_preprocess, frozen
from .files import (PathLike, RewardLoadError, WeightsNotFoundError, cached, file_key, find_folder,
                    hf_cache_snapshot)

log = logging.getLogger(__name__)

__all__ = ["CLIPScorer", "load_clip_folder", "load_pickscore", "load_clip_score", "clip_tokenizer_from_open_clip",
           "read_preprocess_config", "PICKSCORE_PROCESSOR_REPO"]

PICKSCORE_PROCESSOR_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def clip_tokenizer_from_open_clip():
    """A transformers ``CLIPTokenizer`` built offline from the CLIP BPE vocabulary that ships inside
    open-clip-torch (``bpe_simple_vocab_16e6.txt.gz``): 49408 tokens, ids equal to OpenAI's."""
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except ImportError as e:
        raise WeightsNotFoundError("no CLIP tokenizer files found, and open-clip-torch (which ships the CLIP "
                                   "BPE vocabulary) is not installed: pip install open-clip-torch") from e
    from transformers import CLIPTokenizer
    st = SimpleTokenizer()
    vocab = dict(st.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    merges = sorted(st.bpe_ranks, key=st.bpe_ranks.get)
    try:
        tok = CLIPTokenizer(vocab=vocab, merges=merges)  # transformers 5
    except TypeError:  # pragma: no cover - transformers 4.x wants files
        import tempfile
        d = Path(tempfile.mkdtemp(prefix="branchgrpo_clip_tok_"))
        (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                      encoding="utf-8")
        tok = CLIPTokenizer(vocab_file=str(d / "vocab.json"), merges_file=str(d / "merges.txt"))
    return tok


def _has_tokenizer(folder: Optional[Path]) -> bool:
    return folder is not None and any((folder / f).is_file() for f in _TOKENIZER_FILES)


def load_clip_tokenizer(*folders: Optional[Path]):
    """The first folder's ``CLIPTokenizer`` that has tokenizer files, else the open_clip vocabulary."""
    from transformers import CLIPTokenizer
    for folder in folders:
        if _has_tokenizer(folder):
            return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True), str(folder)
    return clip_tokenizer_from_open_clip(), "open_clip's CLIP BPE vocabulary"


def verify_clip_tokenizer(tok, vocab_size: int, source: str) -> None:
    ids = tok("a photo of a cat").input_ids
    if len(tok) < 1000 or len(tok) > vocab_size:
        raise RewardLoadError(f"CLIP tokenizer from {source} has {len(tok)} tokens for a text tower of "
                              f"{vocab_size}; wrong tokenizer files?")
    if tok.unk_token_id is not None and tok.unk_token_id in ids[1:-1]:
        raise RewardLoadError(f"CLIP tokenizer from {source} maps plain words to the unknown token ({ids}).")


def read_preprocess_config(*folders: Optional[Path]) -> Tuple[int, Tuple[float, ...], Tuple[float, ...]]:
    """(size, mean, std) from the first ``preprocessor_config.json`` found, else CLIP's defaults."""
    for folder in folders:
        if folder is not None and (folder / "preprocessor_config.json").is_file():
            cfg = json.loads((folder / "preprocessor_config.json").read_text(encoding="utf-8"))
            crop = cfg.get("crop_size", cfg.get("size", 224))
            if isinstance(crop, dict):
                crop = crop.get("height", crop.get("shortest_edge", 224))
            return (int(crop), tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)),
                    tuple(cfg.get("image_std", OPENAI_CLIP_STD)))
    return 224, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


def _from_pretrained_strict(folder: Path, dtype: torch.dtype, where: str):
    from transformers import CLIPModel
    try:
        model, info = CLIPModel.from_pretrained(str(folder), local_files_only=True, output_loading_info=True,
                                                dtype=dtype)
    except TypeError:  # pragma: no cover - transformers 4.x spells it torch_dtype
        model, info = CLIPModel.from_pretrained(str(folder), local_files_only=True, output_loading_info=True,
                                                torch_dtype=dtype)
    except OSError as e:
        raise WeightsNotFoundError(f"{where}: {folder} holds no loadable CLIP weights "
                                   f"(model.safetensors or pytorch_model.bin): {e}") from e
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(k for k in (info.get("unexpected_keys") or ()) if not k.endswith("position_ids"))
    mismatched = sorted(str(k) for k in (info.get("mismatched_keys") or ()))
    if missing or unexpected or mismatched or info.get("error_msgs"):
        raise RewardLoadError(f"{where}: the weights in {folder} do not match its config.json: missing "
                              f"{missing[:12]}, unexpected {unexpected[:12]}, mismatched {mismatched[:6]}, "
                              f"errors {list(info.get('error_msgs') or [])[:3]}.")
    return model


def load_clip_folder(folder: PathLike, device: Union[str, torch.device] = "cpu",
                     dtype: torch.dtype = torch.float32, where: str = "CLIP"):
    """A frozen ``CLIPModel`` from a local folder; shared between scorers (weakly cached per folder,
    device and dtype, so CLIP score and the aesthetic predictor hold one copy)."""
    folder = Path(folder)
    key = ("hf_clip",) + file_key(folder) + (str(torch.device(device)), str(dtype))

    def build():
        model = _from_pretrained_strict(folder, dtype, where)
        return frozen(model.to(device))
    return cached(key, build)


class CLIPScorer(ModelReward):
    """``scale * cos(image, text)`` of a transformers ``CLIPModel``; ``scale="logit"`` uses the model's
    ``logit_scale.exp()`` (PickScore), a number is a fixed factor (CLIP score: 1)."""

    differentiable = True

    def __init__(self, model, tokenizer, name: str = "clip_score", scale: Union[str, float] = 1.0,
                 image_size: int = 224, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, **kwargs):
        super().__init__(**kwargs)
        self.model = frozen(model)
        self.tokenizer = tokenizer
        self.name = name
        self.scale = scale
        self.image_size, self.mean, self.std = int(image_size), tuple(mean), tuple(std)
        self.max_length = int(getattr(model.config.text_config, "max_position_embeddings", 77))

    def modules(self) -> List[torch.nn.Module]:
        return [self.model]

    def _features(self, pixels: torch.Tensor, prompts: List[str]):
        x = clip_preprocess(pixels, self.image_size, self.mean, self.std).to(self.dtype)
        text = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                              return_tensors="pt")
        img = _embeds(self.model.get_image_features(pixel_values=x))
        txt = _embeds(self.model.get_text_features(input_ids=text.input_ids.to(pixels.device),
                                                   attention_mask=text.attention_mask.to(pixels.device)))
        return F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)

    def _score(self, pixels: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        img, txt = self._features(pixels, prompts)
        cos = (img * txt).sum(dim=-1)
        if self.scale == "logit":
            return self.model.logit_scale.float().exp() * cos
        return float(self.scale) * cos


def _embeds(out) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or a model output with ``pooler_output`` (5)."""
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("image_embeds", "text_embeds", "pooler_output"):
        v = getattr(out, attr, None)
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"unexpected CLIP feature output {type(out).__name__}")


def load_pickscore(model: Optional[PathLike] = None, processor: Optional[PathLike] = None, *, search_dirs=None,
                   device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                   where: str = "PickScore", **kwargs) -> CLIPScorer:
    """PickScore v1 from a local ``PickScore_v1`` folder (see the module docstring). ``processor``: a folder
    with the laion CLIP-ViT-H-14 tokenizer / preprocessor files, ``hf:<repo>``, or None (the model folder,
    else the hub cache of laion/CLIP-ViT-H-14-laion2B-s32B-b79K, else open_clip's vocabulary)."""
    folder = find_folder("pickscore", model, search_dirs, where)
    proc = None
    if processor:
        proc = find_folder("pickscore", processor, search_dirs, where + " processor", required=())
    elif not _has_tokenizer(folder):
        proc = hf_cache_snapshot(PICKSCORE_PROCESSOR_REPO)
    clip = load_clip_folder(folder, device, dtype, where)
    tok, source = load_clip_tokenizer(folder, proc)
    verify_clip_tokenizer(tok, clip.config.text_config.vocab_size, source)
    size, mean, std = read_preprocess_config(folder, proc)
    return CLIPScorer(clip, tok, name="pickscore", scale="logit", image_size=size, mean=mean, std=std, **kwargs)


def load_clip_score(model: Optional[PathLike] = None, *, search_dirs=None,
                    device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                    where: str = "CLIP score", **kwargs) -> CLIPScorer:
    """CLIP score from a local CLIP folder (default ``clip-vit-large-patch14``, or the hub cache of
    ``openai/clip-vit-large-patch14``)."""
    folder = find_folder("clip", model, search_dirs, where)
    clip = load_clip_folder(folder, device, dtype, where)
    tok, source = load_clip_tokenizer(folder)
    verify_clip_tokenizer(tok, clip.config.text_config.vocab_size, source)
    size, mean, std = read_preprocess_config(folder)
    return CLIPScorer(clip, tok, name="clip_score", scale=1.0, image_size=size, mean=mean, std=std, **kwargs)
