"""Reward nodes: loaders (one per scorer), Reward Mix, Score Images. Thin: the scorers, their file
formats and checks live in ``branchgrpo/rewards/``.

Where weights are looked for
    ComfyUI's ``reward_models`` folder kind, registered here: ``<models>/reward_models/`` plus any
    ``reward_models:`` entry of ``extra_model_paths.yaml``. Files (``ImageReward.pt``,
    ``HPS_v2.1_compressed.pt``, ``sac+logos+ava1-l14-linearMSE.pth``) are listed recursively; Hugging
    Face model folders (``PickScore_v1/``, ``clip-vit-large-patch14/``: a folder holding ``config.json``)
    are listed up to two levels down, and entries of the local hub cache of the official repos appear
    as ``hf:<repo id>``. Nothing is ever downloaded.

Devices and memory
    A loader reads the weights onto ComfyUI's offload device (the CPU) in the chosen dtype ("auto": fp16
    on a GPU that supports it, else bf16, else fp32; fp32 on the CPU) and hands each torch module to
    ComfyUI's model management as a ``ModelPatcher`` (load device: ``get_torch_device()``). Every score
    call first asks ``comfy.model_management.load_models_gpu`` for the modules: ComfyUI moves them to the
    GPU, making room by offloading other models, and moves them back to the CPU when it needs the VRAM
    (or on ``unload_all_models`` / the /free endpoint). This is how ComfyUI's own CLIP-vision and
    upscale models are managed; no private device logic, no memory ComfyUI does not know about.

Caching
    ComfyUI's node cache keeps a loader's output between runs while its inputs are unchanged
    (``fingerprint_inputs`` adds the file's size and modification time, so a replaced file reloads). In
    addition, loaded scorers sit in a weak-valued cache keyed by (file, device, dtype): two loaders or two
    graphs that ask for the same weights share one copy, and the copy is freed, RAM and VRAM, as soon as
    no node output, mix or trainer holds it any more (e.g. when ComfyUI drops its caches on /free).
"""
from __future__ import annotations

import copy
import importlib
import inspect
import logging
import os
import weakref
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from comfy_api.latest import io

from branchgrpo.rewards.files import (MODEL_CARDS, WEIGHT_EXTENSIONS, RewardLoadError, WeightsNotFoundError, cached,
                                      file_key, find_file, find_folder, hf_cache_snapshot, missing_weights_message)
from branchgrpo.rewards.mix import AGGREGATIONS, RewardMix
from branchgrpo.rewards.weight_free import WEIGHT_FREE_REWARDS, make_weight_free

from . import types as T
from . import comfy_core as core

log = logging.getLogger(__name__)

FOLDER = "reward_models"
MISSING_PREFIX = "(missing) "
DTYPES = ["auto", "fp32", "fp16", "bf16"]
MAX_MIX = 4


# ------------------------------------------------------------------------- model folders ---

def register_reward_models_folder() -> str:
    """Register ``reward_models`` with ComfyUI's folder_paths (idempotent; keeps yaml entries)."""
    default = os.path.join(core.folder_paths.models_dir, FOLDER)
    core.folder_paths.add_model_folder_path(FOLDER, default)
    paths, exts = core.folder_paths.folder_names_and_paths[FOLDER]
    core.folder_paths.folder_names_and_paths[FOLDER] = (paths, set(exts) | set(WEIGHT_EXTENSIONS))
    try:
        os.makedirs(default, exist_ok=True)
    except OSError:  # read-only install: users can still use extra_model_paths.yaml
        pass
    return default


register_reward_models_folder()


def reward_dirs() -> List[str]:
    return core.folder_paths.get_folder_paths(FOLDER)


def _model_folder_paths() -> List[str]:
    out = []
    for base in reward_dirs():
        if not os.path.isdir(base):
            continue
        for root, dirs, files in os.walk(base, followlinks=True):
            rel = os.path.relpath(root, base)
            depth = 0 if rel == "." else rel.count(os.sep) + 1
            if depth >= 2:
                dirs[:] = []
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            if depth and "config.json" in files:
                out.append(rel.replace(os.sep, "/"))
    return sorted(set(out))


def weight_files() -> List[str]:
    """Checkpoint files in the reward_models folders, except those inside Hugging Face model folders."""
    try:
        files = core.folder_paths.get_filename_list(FOLDER)
    except KeyError:
        files = []
    folders = _model_folder_paths()
    return sorted(f for f in files if os.path.splitext(f)[1].lower() in WEIGHT_EXTENSIONS
                  and not any(f.startswith(d + "/") for d in folders))


def model_folders(hf_repos=()) -> List[str]:
    """Sub-folders (up to two levels) of the reward_models folders that hold a config.json, plus
    ``hf:<repo>`` for each of ``hf_repos`` present in the local hub cache."""
    return _model_folder_paths() + [f"hf:{r}" for r in hf_repos if r and hf_cache_snapshot(r) is not None]


def _matches(item: str, name: str) -> bool:
    return item == name or item.endswith("/" + name)


def choices(items: List[str], card_key: str) -> tuple:
    """(options, default) for a combo: the canonical name first if present; if no canonical name is
    present, a ``(missing) <name>`` entry first, which fails validation with the full explanation."""
    card = MODEL_CARDS[card_key]
    for name in card.files:
        for it in items:
            if _matches(it, name):
                return items, it
    if card.hf_repo and f"hf:{card.hf_repo}" in items:
        return items, f"hf:{card.hf_repo}"
    missing = MISSING_PREFIX + card.files[0]
    return [missing] + items, missing


def _files_tooltip(card_key: str, what: str) -> str:
    card = MODEL_CARDS[card_key]
    return (f"{what}: {' or '.join(card.files)} in models/{FOLDER}/ (or a '{FOLDER}' entry of "
            f"extra_model_paths.yaml). Official weights: {card.publisher}. Nothing is downloaded.")


# ------------------------------------------------------------------------ device / memory ---

def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "fp32":
        return torch.float32
    if choice == "fp16":
        return torch.float16
    if choice == "bf16":
        return torch.bfloat16
    if device.type == "cpu":
        return torch.float32
    if core.mm.should_use_fp16(device, prioritize_performance=True):
        return torch.float16
    if core.mm.should_use_bf16(device, prioritize_performance=True):
        return torch.bfloat16
    return torch.float32


class _Holder(torch.nn.Module):
    """What ComfyUI's ModelPatcher manages: a plain module around one scorer module (the patcher sets
    attributes such as ``device`` on it, which e.g. transformers models expose read-only)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner


_patchers: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()


def patcher_for(module: torch.nn.Module):
    """One ModelPatcher per torch module (a CLIP shared by two scorers is moved once)."""
    p = _patchers.get(id(module))
    if p is None or p.model.inner is not module:
        p = core.model_patcher.ModelPatcher(_Holder(module), load_device=core.mm.get_torch_device(),
                                             offload_device=core.mm.text_encoder_offload_device())
        _patchers[id(module)] = p
    return p


class ComfyManagedReward:
    """An engine scorer whose weights ComfyUI's model management loads, offloads and frees.

    Calls go to the scorer after ``load_models_gpu`` on its modules; attributes (``name``,
    ``differentiable``, ``batch_size`` ...) are the scorer's."""

    def __init__(self, scorer):
        self.scorer = scorer
        self.patchers = [patcher_for(m) for m in scorer.modules()]

    def __call__(self, images: torch.Tensor, prompts=None, grad: bool = False) -> torch.Tensor:
        if not grad:
            core.mm.load_models_gpu(self.patchers, force_full_load=True)
            return self.scorer(images, prompts)
        # Gradients to the pixels: ComfyUI runs nodes under torch.inference_mode, and weights moved there
        # become inference tensors, which autograd cannot save for backward.
        with torch.inference_mode(False):
            core.mm.load_models_gpu(self.patchers, force_full_load=True)
            for m in self.scorer.modules():
                normal_tensors_(m)
            return self.scorer(images, prompts, grad=True)

    def __getattr__(self, name):
        if name in ("scorer", "patchers") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.scorer, name)

    def __repr__(self) -> str:
        return f"ComfyManagedReward({self.scorer!r})"


def normal_tensors_(module: torch.nn.Module) -> int:
    """Replace inference-mode parameters/buffers of ``module`` by normal tensors (same values, frozen).
    Returns how many were replaced."""
    n = 0
    with torch.inference_mode(False):
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and p.is_inference():
                    m._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
                    n += 1
            for name, b in list(m._buffers.items()):
                if b is not None and b.is_inference():
                    m._buffers[name] = b.clone()
                    n += 1
    return n


def _view(base, batch_size: int, max_frames: int, temporal_weight: float):
    """A scorer sharing ``base``'s weights with its own batching / video settings."""
    v = copy.copy(base)
    v.batch_size, v.max_frames, v.temporal_weight = int(batch_size), (int(max_frames) or None), float(temporal_weight)
    v._base = base  # keeps the weakly cached base (and so the cache entry) alive as long as the view lives
    return v


# ------------------------------------------------------------------------------ loaders ---

def _common_inputs() -> list:
    return [
        io.Combo.Input("dtype", options=DTYPES, default="auto",
                       tooltip="Weight precision. auto: fp16 on a GPU that supports it (else bf16, else fp32), fp32 "
                               "on the CPU. fp16/bf16 halve the memory (ImageReward ~0.9 GB, HPS/PickScore "
                               "~2 GB, CLIP-L ~0.9 GB in fp16); scores differ from fp32 by ~1e-3."),
        io.Int.Input("batch_size", default=8, min=1, max=256,
                     tooltip="Images per forward pass when scoring. Larger is faster until the GPU is full "
                             "(activations grow linearly; ~0.1-0.3 GB per image at 224 px with gradients)."),
        io.Int.Input("max_frames", default=0, min=0, max=4096,
                     tooltip="Video leaves [N,T,H,W,3]: score at most this many evenly spaced frames per video "
                             "(0 = every frame). Cost grows linearly with the frames scored."),
        io.Float.Input("temporal_weight", default=0.0, min=0.0, max=100.0, step=0.01,
                       tooltip="Video leaves: score = mean frame score + temporal_weight x (1 - mean |frame "
                               "difference|), the VBench temporal-flickering term in [0, 1]. 0 = plain mean."),
    ]


def _reward_output():
    return T.RewardModel.Output(display_name="reward", tooltip="The reward model: connect it to Score Images, "
                                "Reward Mix or the Trainer. Its weights move to the GPU only while scoring.")


def _check_choice(node: str, field: str, value: str, card_key: str) -> Optional[str]:
    """None if ``value`` names weights that exist, else the message (expected files, folders, publisher).
    Runs at queue time: ComfyUI skips its own combo-list check for inputs a node validates itself."""
    if value in (None, "") or str(value).startswith(MISSING_PREFIX):
        return (f"{node}: {field} — no weights selected. "
                + missing_weights_message(card_key, reward_dirs()))
    card = MODEL_CARDS[card_key]
    try:
        if card.kind == "folder":
            find_folder(card_key, value, reward_dirs())
        else:
            find_file(card_key, value, reward_dirs())
    except WeightsNotFoundError as e:
        return f"{node}: {field} — {value!r} not found. {e}"
    return None


def _stat_key(*rel: str) -> tuple:
    """Size and mtime of the selected files/folders (ComfyUI re-runs the loader when they change)."""
    out = []
    for r in rel:
        if not r or r.startswith(MISSING_PREFIX):
            out.append(None)
        elif r.startswith("hf:"):
            snap = hf_cache_snapshot(r[3:])
            out.append(file_key(snap) if snap else None)
        else:
            p = core.folder_paths.get_full_path(FOLDER, r)
            if p is None:
                for d in reward_dirs():
                    if os.path.isdir(os.path.join(d, r)):
                        p = os.path.join(d, r)
                        break
            if p and os.path.isdir(p):
                out.append(tuple(file_key(os.path.join(p, f)) for f in sorted(os.listdir(p))))
            else:
                out.append(file_key(p) if p else None)
    return tuple(out)


def _load(node: str, field: str, kind: str, load: Callable, dtype: str, batch_size: int, max_frames: int,
          temporal_weight: float, key: tuple):
    """Resolve, load (weakly cached per weights/device/dtype), wrap for ComfyUI's memory management."""
    load_device = core.mm.get_torch_device()
    offload = core.mm.text_encoder_offload_device()
    torch_dtype = resolve_dtype(dtype, load_device)
    cache_key = ("comfy", kind) + key + (str(load_device), str(offload), str(torch_dtype))
    try:
        with torch.inference_mode(False):  # normal tensors: usable with autograd (grad=True) later
            base = cached(cache_key, lambda: load(device=offload, dtype=torch_dtype, search_dirs=reward_dirs(),
                                                  where=node))
    except (WeightsNotFoundError, RewardLoadError) as e:
        msg = str(e)
        msg = msg[len(node) + 2:] if msg.startswith(node + ": ") else msg
        raise ValueError(f"{node}: {field} — {msg}") from None
    except ImportError as e:
        raise RuntimeError(f"{node}: a Python package is missing: {e}. Install the pack's requirements "
                           "(pip install -r requirements.txt) and restart ComfyUI.") from e
    return ComfyManagedReward(_view(base, batch_size, max_frames, temporal_weight))


# One table of reward specifications, one loader class built from it. Each spec becomes a V3 node class
# (``loader_node(spec)``); node ids, names, inputs and tooltips are the shipped ones, so saved workflows load.

AUTO_PROCESSOR = "auto"


@dataclass(frozen=True)
class WeightsInput:
    """A combo input that selects weights: a file (``listing="files"``) or a model folder (``"folders"``) of
    the reward_models folders, described by ``MODEL_CARDS[card]``. Validated at queue time."""
    name: str
    card: str
    listing: str
    what: str  # the tooltip's first words (the expected files and the publisher follow)
    note: str = ""  # appended to the tooltip

    def options(self) -> tuple:
        items = weight_files() if self.listing == "files" else model_folders([MODEL_CARDS[self.card].hf_repo])
        return choices(items, self.card)

    def input(self):
        options, default = self.options()
        return io.Combo.Input(self.name, options=options, default=default,
                              tooltip=_files_tooltip(self.card, self.what) + self.note)


@dataclass(frozen=True)
class OptionInput:
    """A combo input with an ``auto`` choice, passed to the engine loader as ``None`` when ``auto``; its
    options are the local model folders of ``hf_repos`` (not validated: ``auto`` always works)."""
    name: str
    hf_repos: tuple
    tooltip: str

    def input(self):
        return io.Combo.Input(self.name, options=[AUTO_PROCESSOR] + model_folders(list(self.hf_repos)),
                              default=AUTO_PROCESSOR, tooltip=self.tooltip)

    @staticmethod
    def value(v: Optional[str]) -> Optional[str]:
        return None if v in (AUTO_PROCESSOR, "", None) else v


@dataclass(frozen=True)
class RewardSpec:
    """One reward loader node. ``load`` is ``"module:function"`` in ``branchgrpo.rewards``, called as
    ``function(*weights, *options, device=, dtype=, search_dirs=, where=)`` (imported on first use)."""
    node_id: str
    display_name: str
    node: str  # the name in error messages
    class_name: str
    kind: str  # the scorer's cache key
    load: str
    description: str
    weights: tuple  # WeightsInput, in input order
    options: tuple = ()  # OptionInput, after the weights


REWARD_SPECS: tuple = (
    RewardSpec(
        node_id="BranchGRPOImageRewardLoader", display_name="ImageReward Loader (BranchGRPO)",
        node="ImageReward Loader", class_name="ImageRewardLoaderNode", kind="imagereward",
        load="imagereward:load_imagereward",
        description="ImageReward v1.0 (BLIP ViT-L + BERT cross-attention + MLP, 224 px): human-preference score "
                    "of an image for its prompt, roughly standard-normal (higher is better). Differentiable. "
                    "Loads ImageReward.pt from models/reward_models with every key checked; the BLIP config and "
                    "the BERT vocabulary ship with the pack. ~450 M parameters (0.9 GB fp16).",
        weights=(WeightsInput("checkpoint", "imagereward", "files", "The ImageReward checkpoint",
                              note=" A med_config.json / vocab.txt beside it overrides the shipped ones."),),
    ),
    RewardSpec(
        node_id="BranchGRPOHPSLoader", display_name="HPS v2.1 Loader (BranchGRPO)",
        node="HPS v2.1 Loader", class_name="HPSLoaderNode", kind="hps_v2.1", load="hps:load_hps",
        description="HPS v2.1 (Human Preference Score): cosine of open_clip ViT-H-14 image and text embeddings "
                    "fine-tuned on human preferences; typically 0.2-0.35, higher is better. Differentiable. "
                    "Builds the ViT-H-14 architecture with open-clip-torch (no download) and loads "
                    "HPS_v2.1_compressed.pt with every key checked. ~990 M parameters (2 GB fp16).",
        weights=(WeightsInput("checkpoint", "hps_v2.1", "files", "The HPS v2.1 checkpoint"),),
    ),
    RewardSpec(
        node_id="BranchGRPOPickScoreLoader", display_name="PickScore Loader (BranchGRPO)",
        node="PickScore Loader", class_name="PickScoreLoaderNode", kind="pickscore",
        load="clip_models:load_pickscore",
        description="PickScore v1: CLIP ViT-H-14 fine-tuned on Pick-a-Pic preferences; score = logit scale x "
                    "cosine (typically 18-23, higher is better). Differentiable. Loads a local PickScore_v1 "
                    "folder (transformers CLIPModel, every key checked). ~990 M parameters (2 GB fp16).",
        weights=(WeightsInput("model", "pickscore", "folders", "The PickScore model folder (config.json + "
                              "model.safetensors or pytorch_model.bin)"),),
        options=(OptionInput("processor", ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K",),
                             "Tokenizer and preprocessing (laion/CLIP-ViT-H-14-laion2B-s32B-b79K). auto: the model "
                             "folder's own files, else the hub cache, else the CLIP BPE vocabulary shipped in "
                             "open-clip-torch (the same token ids) with 224 px OpenAI-normalised preprocessing (the "
                             "processor's values)."),),
    ),
    RewardSpec(
        node_id="BranchGRPOCLIPScoreLoader", display_name="CLIP Score Loader (BranchGRPO)",
        node="CLIP Score Loader", class_name="CLIPScoreLoaderNode", kind="clip_score",
        load="clip_models:load_clip_score",
        description="CLIP score: cosine of CLIP image and prompt embeddings, in [-1, 1] (typically 0.15-0.35 "
                    "for a matching pair; x100 for torchmetrics' scale). Differentiable. Loads a local "
                    "transformers CLIP folder (default openai/clip-vit-large-patch14, ~430 M parameters, "
                    "0.9 GB fp16), every key checked.",
        weights=(WeightsInput("model", "clip", "folders", "The CLIP model folder (config.json + weights "
                              "+ tokenizer files)"),),
    ),
    RewardSpec(
        node_id="BranchGRPOAestheticLoader", display_name="Aesthetic Loader (BranchGRPO)",
        node="Aesthetic Loader", class_name="AestheticLoaderNode", kind="aesthetic",
        load="aesthetic:load_aesthetic",
        description="LAION aesthetic predictor v2: an MLP on L2-normalised CLIP ViT-L/14 image embeddings, "
                    "rating on the AVA scale ~1-10 (typically 4-7); the prompt is ignored. Differentiable. "
                    "Needs the MLP file (3.7 MB) and the CLIP ViT-L/14 folder (shared with CLIP Score when "
                    "both use the same folder; ~0.9 GB fp16).",
        weights=(WeightsInput("checkpoint", "aesthetic", "files", "The aesthetic MLP"),
                 WeightsInput("clip", "clip", "folders", "The CLIP ViT-L/14 folder for the image embeddings")),
    ),
)


def _with_signature(fn, names: Sequence[str]):
    """``fn(cls, **values)`` that ComfyUI sees as ``fn(cls, <names>)``: it reads the argument names of
    ``validate_inputs`` to pass exactly those inputs, attach a failure to them only, and skip its own
    combo-list check for them."""
    params = [inspect.Parameter("cls", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    fn.__signature__ = inspect.Signature(params)
    return fn


class RewardLoaderNode(io.ComfyNode):
    """The loader of one :class:`RewardSpec` (``SPEC``); :func:`loader_node` makes one subclass per spec."""
    SPEC: RewardSpec

    @classmethod
    def define_schema(cls):
        spec = cls.SPEC
        return io.Schema(
            node_id=spec.node_id, display_name=spec.display_name, category=T.CATEGORY + "/rewards",
            description=spec.description,
            inputs=[w.input() for w in spec.weights] + [o.input() for o in spec.options] + _common_inputs(),
            outputs=[_reward_output()],
        )

    @classmethod
    def _check(cls, values: dict) -> Optional[str]:
        """The first weights input that names no existing weights, as a message; None when all exist.
        Runs at queue time: ComfyUI skips its own combo-list check for inputs a node validates itself."""
        for w in cls.SPEC.weights:
            if w.name in values:
                msg = _check_choice(cls.SPEC.node, w.name, values[w.name], w.card)
                if msg:
                    return msg
        return None

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return _stat_key(*(kwargs.get(w.name) for w in cls.SPEC.weights))

    @classmethod
    def execute(cls, dtype, batch_size, max_frames, temporal_weight, **values) -> io.NodeOutput:
        spec = cls.SPEC
        msg = cls._check(values)
        if msg:
            raise ValueError(msg)
        module, function = spec.load.split(":")
        load_fn = getattr(importlib.import_module(f"branchgrpo.rewards.{module}"), function)
        args = [values[w.name] for w in spec.weights] + [o.value(values.get(o.name)) for o in spec.options]
        load = lambda **kw: load_fn(*args, **kw)  # noqa: E731
        key = _stat_key(*(a or "" for a in args))
        field = "/".join(w.name for w in spec.weights)  # named by load errors
        return io.NodeOutput(_load(spec.node, field, spec.kind, load, dtype, batch_size, max_frames,
                                   temporal_weight, key))


def loader_node(spec: RewardSpec) -> type:
    """The V3 node class of ``spec``: ``SPEC`` set, and a ``validate_inputs`` that names its weights inputs."""
    def validate_inputs(cls, **values):
        return cls._check(values) or True

    names = [w.name for w in spec.weights]
    validate = classmethod(_with_signature(validate_inputs, names))
    return type(spec.class_name, (RewardLoaderNode,), {"SPEC": spec, "validate_inputs": validate,
                                                       "__module__": __name__, "__qualname__": spec.class_name})


LOADER_NODES = [loader_node(spec) for spec in REWARD_SPECS]
ImageRewardLoaderNode, HPSLoaderNode, PickScoreLoaderNode, CLIPScoreLoaderNode, AestheticLoaderNode = LOADER_NODES


class WeightFreeRewardNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BranchGRPOWeightFreeReward", display_name="Weight-free Reward (BranchGRPO)",
            category=T.CATEGORY + "/rewards",
            description="Rewards that need no model weights: DDPO's JPEG compressibility / incompressibility and "
                        "simple image statistics (colourfulness, saturation, brightness, contrast). Useful for "
                        "demos, CPU runs and sanity checks.",
            inputs=[io.Combo.Input("reward", options=sorted(WEIGHT_FREE_REWARDS), default="jpeg_compressibility",
                                   tooltip="Which weight-free reward: jpeg_compressibility = -JPEG size in kB "
                                           "(q95); jpeg_incompressibility = +size; colorfulness (Hasler-Suesstrunk, "
                                           "0-~110); saturation (0-1); brightness (-|mean luma - 0.5|, -1-0); "
                                           "contrast (luma std, 0-0.5). No memory cost.")],
            outputs=[T.RewardModel.Output(display_name="reward", tooltip="The reward model.")],
        )

    @classmethod
    def execute(cls, reward) -> io.NodeOutput:
        return io.NodeOutput(make_weight_free(reward))


# ------------------------------------------------------------------------------ mix ---

class RewardMixNode(io.ComfyNode):
    NODE = "Reward Mix"

    @classmethod
    def define_schema(cls):
        inputs = []
        for i in range(1, MAX_MIX + 1):
            inputs.append(T.RewardModel.Input(
                f"reward_{i}", optional=i > 1,
                tooltip=f"Reward {i} (any REWARD_MODEL, also another mix)." + (" Optional." if i > 1 else "")))
            inputs.append(io.Float.Input(  # optional (default 1): an API prompt names only the weights it uses
                f"weight_{i}", default=1.0, min=-100.0, max=100.0, step=0.01, optional=True,
                tooltip=f"Weight of reward {i} (negative = penalise; 0 = ignore it and skip its forward pass). "
                        "Ignored when reward {i} is not connected.".replace("{i}", str(i))))
        inputs.append(io.Combo.Input(  # optional too, so the widgets keep their order (weights, then this)
            "aggregation", options=list(AGGREGATIONS), default="reward_sum", optional=True,
            tooltip="reward_sum: one reward sum_k w_k r_k, then advantages. advantage_sum: advantages of each reward "
                    "separately (each on its own scale), summed with the weights (MixGRPO); use it when the rewards' "
                    "scales differ (PickScore ~20 vs HPS ~0.3)."))
        return io.Schema(
            node_id="BranchGRPORewardMix", display_name="Reward Mix (BranchGRPO)", category=T.CATEGORY + "/rewards",
            description="Combines up to 4 rewards with weights into one REWARD_MODEL for the Trainer (reward-sum or "
                        "advantage-sum aggregation). Scored directly (Score Images) it gives the weighted sum. "
                        "No extra memory: the members keep their own weights.",
            inputs=inputs,
            outputs=[T.RewardModel.Output(display_name="reward", tooltip="The mix: .rewards, .weights, .aggregation; "
                                          "callable as the weighted sum of its members' scores.")],
        )

    @classmethod
    def validate_inputs(cls, **kwargs):
        agg = kwargs.get("aggregation")
        if agg is not None and agg not in AGGREGATIONS:
            return f"{cls.NODE}: aggregation — must be one of {', '.join(AGGREGATIONS)} (got {agg!r})."
        return True

    @classmethod
    def execute(cls, reward_1, weight_1=1.0, aggregation="reward_sum", **kwargs) -> io.NodeOutput:
        rewards, weights = [reward_1], [weight_1]
        for i in range(2, MAX_MIX + 1):
            r = kwargs.get(f"reward_{i}")
            if r is not None:
                rewards.append(r)
                weights.append(kwargs.get(f"weight_{i}", 1.0))
        for i, r in enumerate(rewards, 1):
            if not callable(r):
                raise ValueError(f"{cls.NODE}: reward_{i} — not a reward model ({type(r).__name__}); connect a "
                                 "reward loader's output.")
        if all(w == 0 for w in weights):
            raise ValueError(f"{cls.NODE}: weight_1..weight_{MAX_MIX} — every connected reward has weight 0; give "
                             "at least one a non-zero weight.")
        try:
            mix = RewardMix(rewards, weights, aggregation, where=cls.NODE)
        except ValueError as e:
            raise ValueError(str(e)) from None
        return io.NodeOutput(mix, ui={"text": [mix.name]})


# --------------------------------------------------------------------------- score images ---

def split_prompts(prompt: str, n: int) -> List[str]:
    """One prompt per image when the text has exactly ``n`` (> 1) non-empty lines, else the whole text
    for every image."""
    lines = [ln.strip() for ln in (prompt or "").splitlines() if ln.strip()]
    if n > 1 and len(lines) == n:
        return lines
    return [(prompt or "").strip()] * n


class ScoreImagesNode(io.ComfyNode):
    NODE = "Score Images"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BranchGRPOScoreImages", display_name="Score Images (BranchGRPO)", category=T.CATEGORY + "/rewards",
            description="Scores an IMAGE batch with a reward model (a loader or a Reward Mix) and shows one score per "
                        "image on the node. Use it to check a reward before training, or to compare LoRAs. Memory: the "
                        "reward model's weights plus one batch of activations (no gradients).",
            inputs=[
                io.Image.Input("images", tooltip="IMAGE batch [N, H, W, 3], RGB in 0-1; any size (each scorer resizes "
                               "and centre-crops to its own resolution, e.g. 224 px)."),
                T.RewardModel.Input("reward", tooltip="The reward model to score with."),
                io.String.Input("prompt", default="", multiline=True,
                                tooltip="The prompt the images were made for. With exactly N non-empty lines for N > 1 "
                                        "images, line i goes with image i; otherwise the whole text is every image's "
                                        "prompt. Ignored by prompt-free rewards (aesthetic, weight-free)."),
                io.Boolean.Input("as_video", default=False,
                                 tooltip="Treat the batch as the frames of ONE video: one score, the mean over frames "
                                         "(plus the loader's temporal term), as for video leaves in training."),
            ],
            outputs=[
                io.Float.Output(display_name="mean", tooltip="Mean score over the batch (the reward's own units)."),
                io.String.Output(display_name="scores", tooltip="One score per image (or one for the video), one "
                                 "per line, 6 decimals."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, reward, prompt, as_video) -> io.NodeOutput:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"{cls.NODE}: images — expected an IMAGE batch [N, H, W, 3], got "
                             f"{tuple(getattr(images, 'shape', ()))}.")
        if not callable(reward):
            raise ValueError(f"{cls.NODE}: reward — not a reward model ({type(reward).__name__}); connect a reward "
                             "loader or Reward Mix.")
        if images.shape[0] == 0:
            raise ValueError(f"{cls.NODE}: images — the batch is empty.")
        if as_video:
            batch, prompts = images[None], [(prompt or "").strip()]
        else:
            batch, prompts = images, split_prompts(prompt, images.shape[0])
        scores = reward(batch, prompts).detach().float().cpu()
        values = [float(s) for s in scores]
        mean = float(sum(values) / len(values))
        label = "video" if as_video else "image"
        lines = [f"{label} {i}: {v:.6f}" for i, v in enumerate(values)] + [f"mean: {mean:.6f}"]
        name = getattr(reward, "name", type(reward).__name__)
        return io.NodeOutput(mean, "\n".join(f"{v:.6f}" for v in values),
                             ui={"text": [f"{name}\n" + "\n".join(lines)]})


REWARD_NODES = [WeightFreeRewardNode, ImageRewardLoaderNode, HPSLoaderNode, PickScoreLoaderNode, CLIPScoreLoaderNode,
                AestheticLoaderNode, RewardMixNode, ScoreImagesNode]

__all__ = ["REWARD_NODES", "REWARD_SPECS", "RewardSpec", "RewardLoaderNode", "loader_node", "WeightFreeRewardNode",
           "ImageRewardLoaderNode", "HPSLoaderNode", "PickScoreLoaderNode", "CLIPScoreLoaderNode",
           "AestheticLoaderNode", "RewardMixNode", "ScoreImagesNode", "ComfyManagedReward",
           "register_reward_models_folder", "split_prompts", "resolve_dtype"]
