"""Local weights for the reward models: where they are expected, how they load, and what to say
when they are missing.

Nothing here downloads. Weights are found only on disk:

- a file or folder path given explicitly;
- by name inside the *search folders* (ComfyUI's ``models/reward_models`` folders, or any folder a
  headless user passes);
- a Hugging Face hub **cache** entry, looked up with ``local_files_only=True`` (so ``HF_HUB_OFFLINE``
  or not, no request is ever made).

Checkpoints are read safely: ``.safetensors`` with safetensors, anything else with
``torch.load(weights_only=True)`` (no pickled code runs). Every state dict is checked key by key
against the model it is loaded into (:func:`load_state_dict_strict`): any missing or unexpected
key is an error that lists them.
"""
from __future__ import annotations

import contextlib
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "ModelCard", "MODEL_CARDS", "WeightsNotFoundError", "RewardLoadError", "missing_weights_message",
    "find_file", "find_folder", "hf_cache_snapshot", "load_state_dict_file", "check_state_dict_keys",
    "load_state_dict_strict", "skip_init", "cached", "clear_cache", "WEIGHT_EXTENSIONS",
]

PathLike = Union[str, os.PathLike]
WEIGHT_EXTENSIONS = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
REWARD_MODELS_FOLDER = "models/reward_models"


class WeightsNotFoundError(FileNotFoundError):
    """A reward model's weights are not on disk; the message says which files, where, and from whom."""


class RewardLoadError(RuntimeError):
    """A weights file does not fit the model (missing / unexpected keys, wrong shapes, bad format)."""


@dataclass(frozen=True)
class ModelCard:
    """What a reward model needs on disk and where the official files are published."""
    key: str
    title: str
    files: Tuple[str, ...]
    """Expected file or folder names (the first is the canonical one)."""
    publisher: str
    """Where the official weights are published (Hugging Face repo and file)."""
    kind: str = "file"
    """``"file"`` (one checkpoint file) or ``"folder"`` (a Hugging Face model folder)."""
    hf_repo: Optional[str] = None
    """Hub repo id looked up in the local hub cache (never downloaded)."""
    notes: str = ""


MODEL_CARDS: Dict[str, ModelCard] = {c.key: c for c in (
    ModelCard("imagereward", "ImageReward v1.0", ("ImageReward.pt", "ImageReward.safetensors"),
              "THUDM/ImageReward on Hugging Face (file ImageReward.pt)", hf_repo="THUDM/ImageReward",
              notes="The BLIP med_config.json and the bert-base-uncased vocabulary ship with this pack; "
                    "the Python package is installed with: pip install --no-deps image-reward==1.5"),
    ModelCard("hps_v2.1", "HPS v2.1", ("HPS_v2.1_compressed.pt", "HPS_v2.1_compressed.safetensors"),
              "xswu/HPSv2 on Hugging Face (file HPS_v2.1_compressed.pt)", hf_repo="xswu/HPSv2",
              notes="Architecture: open_clip ViT-H-14 (built by open-clip-torch, no weights fetched)."),
    ModelCard("pickscore", "PickScore v1", ("PickScore_v1",),
              "yuvalkirstain/PickScore_v1 on Hugging Face (the whole folder: config.json + model weights)",
              kind="folder", hf_repo="yuvalkirstain/PickScore_v1",
              notes="Processor: laion/CLIP-ViT-H-14-laion2B-s32B-b79K (preprocessor_config.json + tokenizer "
                    "files) in the same folder, its own folder, or the hub cache; without it the CLIP BPE "
                    "vocabulary shipped with open-clip-torch is used (identical token ids)."),
    ModelCard("clip", "CLIP ViT-L/14", ("clip-vit-large-patch14",),
              "openai/clip-vit-large-patch14 on Hugging Face (the whole folder: config.json, model.safetensors, "
              "tokenizer and preprocessor files)", kind="folder", hf_repo="openai/clip-vit-large-patch14"),
    ModelCard("aesthetic", "LAION aesthetic predictor v2",
              ("sac+logos+ava1-l14-linearMSE.pth", "sac+logos+ava1-l14-linearMSE.safetensors"),
              "christophschuhmann/improved-aesthetic-predictor on GitHub (file sac+logos+ava1-l14-linearMSE.pth, "
              "3.7 MB; also mirrored on Hugging Face)",
              notes="Also needs the CLIP ViT-L/14 folder (openai/clip-vit-large-patch14) for image embeddings."),
)}


def _as_paths(dirs: Optional[Iterable[PathLike]]) -> List[Path]:
    return [Path(d) for d in (dirs or ()) if d]


def missing_weights_message(card: Union[str, ModelCard], search_dirs: Optional[Iterable[PathLike]] = None,
                            tried: Optional[Iterable[PathLike]] = None, where: str = "") -> str:
    card = MODEL_CARDS[card] if isinstance(card, str) else card
    dirs = _as_paths(search_dirs)
    what = "folder" if card.kind == "folder" else "file"
    names = " or ".join(repr(n) for n in card.files)
    lines = [f"{where + ': ' if where else ''}{card.title} weights not found. Expected the {what} {names}"]
    if dirs:
        lines.append("in one of: " + ", ".join(str(d) for d in dirs)
                     + f" (ComfyUI: {REWARD_MODELS_FOLDER}/, or a 'reward_models' entry of extra_model_paths.yaml).")
    else:
        lines.append(f"in ComfyUI's {REWARD_MODELS_FOLDER}/ folder (or pass its path).")
    tried = [str(t) for t in (tried or ())]
    if tried:
        lines.append("Looked for: " + ", ".join(tried) + ".")
    lines.append(f"The official weights are published at {card.publisher}; download them once by hand "
                 "(nothing is downloaded at run time).")
    if card.hf_repo:
        lines.append(f"A local Hugging Face hub cache copy of {card.hf_repo} is also used if present.")
    if card.notes:
        lines.append(card.notes)
    return " ".join(lines)


def find_file(card: Union[str, ModelCard], path: Optional[PathLike] = None,
              search_dirs: Optional[Iterable[PathLike]] = None, where: str = "") -> Path:
    """The checkpoint file of ``card``: ``path`` if given (absolute, or relative to a search folder),
    else a canonical name in the search folders (also one level down, e.g. ``ImageReward/ImageReward.pt``),
    else the hub cache. Raises :class:`WeightsNotFoundError` with the full explanation."""
    card = MODEL_CARDS[card] if isinstance(card, str) else card
    dirs = _as_paths(search_dirs)
    tried: List[Path] = []
    candidates: List[Path] = []
    if path:
        p = Path(path)
        candidates += [p] if p.is_absolute() else [d / p for d in dirs] + [p]
    else:
        for d in dirs:
            for name in card.files:
                candidates += [d / name, d / Path(name).stem / name]
    for c in candidates:
        tried.append(c)
        if c.is_file():
            return c
        if c.is_dir() and path:
            for name in card.files:
                if (c / name).is_file():
                    return c / name
    if not path and card.hf_repo:
        snap = hf_cache_snapshot(card.hf_repo)
        if snap is not None:
            for name in card.files:
                if (snap / name).is_file():
                    return snap / name
    raise WeightsNotFoundError(missing_weights_message(card, dirs, tried, where))


def find_folder(card: Union[str, ModelCard], path: Optional[PathLike] = None,
                search_dirs: Optional[Iterable[PathLike]] = None, where: str = "",
                required: Sequence[str] = ("config.json",)) -> Path:
    """A Hugging Face model folder for ``card``: ``path`` (absolute, relative to a search folder, or
    ``hf:<repo id>`` for the local hub cache), else a canonical folder name in the search folders, else
    the hub cache entry of ``card.hf_repo``. The folder must hold every file in ``required``."""
    card = MODEL_CARDS[card] if isinstance(card, str) else card
    dirs = _as_paths(search_dirs)
    tried: List[str] = []

    def ok(p: Optional[Path]) -> bool:
        return p is not None and p.is_dir() and all((p / r).is_file() for r in required)

    if path and str(path).startswith("hf:"):
        repo = str(path)[3:].strip()
        snap = hf_cache_snapshot(repo)
        tried.append(f"hub cache entry {repo}")
        if ok(snap):
            return snap
    elif path:
        p = Path(path)
        for c in ([p] if p.is_absolute() else [d / p for d in dirs] + [p]):
            tried.append(str(c))
            if ok(c):
                return c
    else:
        for d in dirs:
            for name in card.files:
                c = d / name
                tried.append(str(c))
                if ok(c):
                    return c
        if card.hf_repo:
            tried.append(f"hub cache entry {card.hf_repo}")
            snap = hf_cache_snapshot(card.hf_repo)
            if ok(snap):
                return snap
    msg = missing_weights_message(card, dirs, tried, where)
    if required:
        msg += " The folder must contain: " + ", ".join(required) + "."
    raise WeightsNotFoundError(msg)


def hf_cache_snapshot(repo_id: str) -> Optional[Path]:
    """The local hub-cache snapshot folder of ``repo_id``, or None. Never touches the network."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError and friends)
        return None


# ------------------------------------------------------------------------------ state dicts ---

def load_state_dict_file(path: PathLike, where: str = "") -> Dict[str, torch.Tensor]:
    """Tensors of a checkpoint, read safely onto the CPU. A ``{"state_dict": ...}`` or ``{"model": ...}``
    wrapper is unwrapped, and a ``module.`` prefix on every key (DDP) is removed."""
    path = Path(path)
    pre = f"{where}: " if where else ""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(str(path), device="cpu")
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise RewardLoadError(
                f"{pre}{path.name} cannot be read with torch.load(weights_only=True) ({type(e).__name__}: {e}). "
                "It may hold pickled Python objects besides the weights; convert it once, where you trust "
                "the file, to safetensors: python -c \"import torch, safetensors.torch as st; "
                f"sd = torch.load('{path.name}', weights_only=False); sd = sd.get('state_dict', sd); "
                f"st.save_file({{k: v.contiguous() for k, v in sd.items()}}, '{path.stem}.safetensors')\" "
                "and select the .safetensors file.") from e
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(sd, Mapping) and wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = sd[wrapper]
            break
    if not isinstance(sd, Mapping):
        raise RewardLoadError(f"{pre}{path.name} does not hold a state dict (got {type(sd).__name__}).")
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if not sd:
        raise RewardLoadError(f"{pre}{path.name} holds no tensors.")
    return sd


def _fmt_keys(keys: Sequence[str], n: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_state_dict_keys(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                          what: str = "checkpoint") -> None:
    """Raise :class:`RewardLoadError` unless ``state_dict`` has exactly the module's keys and shapes."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = [f"{what} does not match the model ({len(state_dict)} tensors in the file, {len(expected)} in "
                 "the model)."]
        if missing:
            parts.append(f"Missing keys ({len(missing)}): {_fmt_keys(missing)}.")
        if unexpected:
            parts.append(f"Unexpected keys ({len(unexpected)}): {_fmt_keys(unexpected)}.")
        if shapes:
            parts.append(f"Shape mismatches ({len(shapes)}): {_fmt_keys(shapes, 6)}.")
        parts.append("Is it the right file for this loader?")
        raise RewardLoadError(" ".join(parts))


def load_state_dict_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                           what: str = "checkpoint") -> torch.nn.Module:
    check_state_dict_keys(module, state_dict, what)
    module.load_state_dict(state_dict, strict=True)
    return module


_INIT_FNS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
             "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
             "sparse_")
_init_lock = threading.RLock()


@contextlib.contextmanager
def skip_init():
    """Skip ``torch.nn.init`` while building a model whose every weight is loaded next (the strict key
    check guarantees that none is left uninitialised). Saves seconds of random init on big models."""
    with _init_lock:
        saved = {n: getattr(torch.nn.init, n) for n in _INIT_FNS if hasattr(torch.nn.init, n)}
        try:
            for n in saved:
                setattr(torch.nn.init, n, lambda tensor, *a, **k: tensor)
            yield
        finally:
            for n, fn in saved.items():
                setattr(torch.nn.init, n, fn)


# ----------------------------------------------------------------------------------- cache ---

_cache: "weakref.WeakValueDictionary[tuple, object]" = weakref.WeakValueDictionary()
_cache_lock = threading.RLock()


def cached(key: tuple, factory: Callable[[], object]):
    """One live object per ``key``: returns the existing one while anybody still holds it, else builds
    it with ``factory``. The cache holds only weak references, so a scorer is freed (RAM and VRAM)
    as soon as its last user drops it (for ComfyUI: when the node's cached output is released)."""
    with _cache_lock:
        obj = _cache.get(key)
        if obj is None:
            obj = factory()
            _cache[key] = obj
        return obj


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


def file_key(path: PathLike) -> tuple:
    """Identity of a file or folder for the cache: resolved path, size and modification time."""
    p = Path(path).resolve()
    try:
        st = p.stat()
        return (str(p), st.st_size, st.st_mtime_ns)
    except OSError:
        return (str(p), None, None)
