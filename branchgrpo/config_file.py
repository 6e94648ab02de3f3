"""Run configuration files for headless training (``python -m branchgrpo train CONFIG``).

Format: TOML (read with the standard library's :mod:`tomllib`; written by :func:`dump_toml`, a small
writer for exactly the values a run config holds). Every field is documented: the documentation of the
engine's own settings (``[schedule]``, ``[advantage]``, ``[pruning]``, ``[optim]``, ``[training]``) is
read from the attribute docstrings of the engine's dataclasses, so the template never drifts from the
code. ``python -m branchgrpo train --print-default-config`` prints the commented template.

Layout::

    preset = "branchgrpo-deppru"   # a named engine preset; the sections below override its fields
    [run]       run name, output folder, LoRA file, resume, device, dtype, logging
    [model]     the diffusers model: local folder / single files, resolution, guidance, memory options
    [lora]      rank, alpha, target modules (diffusers module names, fnmatch globs)
    [prompts]   training prompts (inline list and/or a text file)
    [[rewards]] one table per reward: name (registry), weight, args for its loader
    [training]  iterations, prompts_per_iteration, seed, max_batch, checkpoint_every
    [schedule] [advantage] [pruning] [optim]   the engine's settings, field by field

Every problem is reported as a :class:`ConfigError` naming the field (``schedule.split_steps: ...``)
before anything is loaded. Relative paths are relative to the config file's folder.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import math
import os
import re
import textwrap
import tomllib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .fileio import write_text_atomic  # noqa: F401  (re-exported for the CLI and the nodes)
from .advantage import AdvantageConfig
from .loss import OptimConfig
from .presets import PRESETS
from .pruning import PruningConfig
from .schedule import BranchSchedule
from .trainer import TrainerConfig

__all__ = ["ConfigError", "RunConfig", "RunSection", "ModelSection", "LoRASection", "PromptsSection",
           "RewardEntry", "load_config", "parse_config", "dump_config", "default_template", "dump_toml",
           "DEFAULT_LORA_TARGETS", "write_text_atomic"]

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
FAMILIES = ("auto", "flux", "sd3", "wan")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_LORA_TARGETS = ("*.to_q", "*.to_k", "*.to_v", "*.to_out.0", "*.add_q_proj", "*.add_k_proj",
                        "*.add_v_proj", "*.to_add_out")
TRAINING_FIELDS = ("iterations", "prompts_per_iteration", "seed", "max_batch", "checkpoint_every")
ENGINE_SECTIONS: dict[str, type] = {"schedule": BranchSchedule, "advantage": AdvantageConfig,
                                    "pruning": PruningConfig, "optim": OptimConfig}


class ConfigError(ValueError):
    """A bad run config; ``field`` is the dotted name of the offending field (``schedule.split_steps``)."""

    def __init__(self, field_name: str, message: str, source: str | None = None):
        self.field = field_name
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"config error: {where}{field_name}: {message}")


# ---------------------------------------------------------------------------------------------- sections
@dataclass
class RunSection:
    name: str = "branchgrpo_run"
    """Run name (letters, digits, '_', '.', '-'): the run folder is <output_dir>/<name>/ (checkpoint.pt,
    metrics.jsonl, the LoRA, TensorBoard logs, the resolved config)."""
    output_dir: str = "."
    """Folder that holds the run folder (relative paths: relative to this config file's folder)."""
    lora_file: str = ""
    """Where the trained LoRA (ComfyUI key format) is written, e.g. ComfyUI/models/loras/branchgrpo/x.safetensors.
    Empty: <run folder>/<name>.safetensors. It is rewritten at every checkpoint and at the end."""
    resume: str = "auto"
    """'auto': continue from <run folder>/checkpoint.pt when it exists (same settings required, the
    iteration count may grow); 'never': start fresh (an existing checkpoint is overwritten)."""
    device: str = "auto"
    """'auto' (cuda:<LOCAL_RANK> when CUDA is available, else cpu), 'cpu', 'cuda' or 'cuda:N'."""
    dtype: str = "auto"
    """Weights / compute dtype of the diffusion model and text encoders: 'auto' (bfloat16 on CUDA,
    float32 on CPU), 'float32', 'bfloat16' or 'float16'. The LoRA and its optimizer stay float32."""
    tensorboard: str = "auto"
    """TensorBoard event files in <run folder>/tensorboard: 'auto' (when the tensorboard package is
    installed), 'on' (fail at start when it is not) or 'off'. Metrics always go to metrics.jsonl."""
    progress: bool = True
    """Show a tqdm progress bar (rank 0 only)."""


@dataclass
class ModelSection:
    family: str = "auto"
    """'flux' (FLUX.1 dev/schnell), 'sd3' (SD3 / SD3.5), 'wan' (Wan 2.1 text-to-video), or 'auto' (read
    from model_index.json / transformer/config.json of 'path')."""
    path: str = ""
    """A local diffusers folder (model_index.json, transformer/, vae/, text encoders, tokenizers). It
    provides every component not given as a single file below, and always the configs and tokenizers.
    Loaded with local_files_only=True: nothing is downloaded."""
    transformer_file: str = ""
    """Optional single-file transformer checkpoint (.safetensors in the original / ComfyUI layout, e.g.
    ComfyUI/models/diffusion_models/flux1-dev.safetensors), loaded with diffusers' from_single_file using
    'path' for its config."""
    vae_file: str = ""
    """Optional single-file VAE checkpoint (e.g. ComfyUI/models/vae/ae.safetensors), with 'path' for its config."""
    text_encoder_files: dict = field(default_factory=dict)
    """Optional single-file text encoders in the Hugging Face transformers layout, by pipeline component:
    { text_encoder = "clip_l.safetensors", text_encoder_2 = "t5xxl_fp16.safetensors", text_encoder_3 = ... }."""
    width: int = 512
    """Image width in pixels (a multiple of 16)."""
    height: int = 512
    """Image height in pixels (a multiple of 16)."""
    frames: int = 33
    """Wan only: video frames (4k+1: 1, 5, ..., 33, 81). Ignored for images."""
    guidance: float = 3.5
    """FLUX-dev distilled guidance (3.5 in the research code); ignored by models without a guidance embedding."""
    cfg_scale: float = 1.0
    """True classifier-free guidance scale (1 = off; > 1 evaluates a negative prompt too, doubling the cost)."""
    negative_prompt: str = ""
    """Negative prompt for true CFG."""
    max_sequence_length: int = 0
    """T5 / UMT5 prompt tokens (0: the family's default: FLUX 512, SD3 256, Wan 226)."""
    gradient_checkpointing: bool = False
    """Recompute the transformer's activations in the backward pass (far less memory, ~30% more time)."""
    fsdp: bool = False
    """Shard the transformer's weights over the ranks with torch FSDP (fully_shard), for models that do not
    fit one GPU. Needs torchrun with >= 2 processes; every rank must run the same number of model calls, so
    prompts_per_iteration must be a multiple of the world size, pruning.width_mode 'off' and
    pruning.timestep_fraction 1.0."""
    release_text_encoders: bool = True
    """Encode every training prompt once at start, then free the text encoders (saves their memory)."""


@dataclass
class LoRASection:
    rank: int = 16
    """LoRA rank (4-64 is usual)."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha / rank."""
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    """fnmatch globs on the transformer's diffusers module names ('*' also matches dots). Default: every
    attention projection. Every adapted module must have a ComfyUI equivalent (checked at start)."""
    exclude: tuple[str, ...] = ()
    """Globs of modules never adapted."""


@dataclass
class PromptsSection:
    train: tuple[str, ...] = ()
    """Training prompts."""
    file: str = ""
    """A UTF-8 text file with one prompt per line (blank lines and lines starting with # are skipped),
    appended to 'train'."""


@dataclass
class RewardEntry:
    name: str = "jpeg_compressibility"
    """A registered reward: imagereward, hps_v2.1, pickscore, clip_score, aesthetic, or a weight-free
    one (jpeg_compressibility, jpeg_incompressibility, colorfulness, saturation, brightness, contrast)."""
    weight: float = 1.0
    """Weight of this reward in the mix (see advantage.aggregation)."""
    args: dict = field(default_factory=dict)
    """Keyword arguments of the reward's loader, e.g. { checkpoint = "/models/ImageReward.pt",
    dtype = "bfloat16", batch_size = 8 } or, for brightness, { target = 0.6 }."""


@dataclass
class RunConfig:
    """A parsed, validated run config."""
    trainer: TrainerConfig
    run: RunSection
    model: ModelSection
    lora: LoRASection
    prompts: list[str]
    rewards: list[RewardEntry]
    preset: str = ""
    source: str | None = None
    base_dir: str = "."
    prompts_section: PromptsSection = field(default_factory=PromptsSection)

    def path(self, value: str) -> str:
        """A config path resolved against the config file's folder (empty stays empty)."""
        if not value:
            return value
        p = os.path.expanduser(value)
        return p if os.path.isabs(p) else os.path.normpath(os.path.join(self.base_dir, p))

    @property
    def run_dir(self) -> str:
        return os.path.join(self.path(self.run.output_dir), self.run.name)

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.run_dir, "checkpoint.pt")

    @property
    def lora_path(self) -> str:
        return self.path(self.run.lora_file) if self.run.lora_file else \
            os.path.join(self.run_dir, f"{self.run.name}.safetensors")

    def to_dict(self) -> dict:
        """The config as a TOML-ready dict (what :func:`dump_config` writes); round-trips through parse."""
        t = self.trainer
        out: dict[str, Any] = {}
        if self.preset:
            out["preset"] = self.preset
        out["run"] = dataclasses.asdict(self.run)
        out["model"] = dataclasses.asdict(self.model)
        out["lora"] = dataclasses.asdict(self.lora)
        out["prompts"] = {"train": list(self.prompts), "file": ""}
        out["rewards"] = [dataclasses.asdict(r) for r in self.rewards]
        out["training"] = {k: getattr(t, k) for k in TRAINING_FIELDS}
        for sec in ENGINE_SECTIONS:
            out[sec] = dataclasses.asdict(getattr(t, sec))
        return out


# ------------------------------------------------------------------------------------- documentation
def _attribute_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` from the string literal that follows each field in the class body."""
    docs: dict[str, str] = {}
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return docs
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr) \
                and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str):
            docs[a.target.id] = " ".join(b.value.value.split())
    return docs


# Fields the engine's dataclasses leave without a docstring.
_EXTRA_DOCS: dict[str, dict[str, str]] = {
    "training": {
        "seed": "Seed of every random draw of the run (rollout noise, prompt order, LoRA initialisation).",
        "max_batch": "Most latents per model call in the rollout and in decoding (bounds memory).",
    },
    "optim": {
        "learning_rate": "AdamW learning rate of the LoRA (1e-4 to 3e-4 is usual).",
        "betas": "AdamW betas.",
        "adam_eps": "AdamW epsilon.",
        "weight_decay": "AdamW weight decay.",
        "max_grad_norm": "Gradient-norm clip before every optimizer step.",
    },
    "advantage": {
        "eps": "Added to the std of a z-score.",
    },
    "pruning": {
        "depth_slide_interval": "Iterations between two slides of the pruned depths.",
        "width_ratio": "Fraction of the post-split edges that width pruning keeps.",
    },
}


def field_docs(section: str) -> dict[str, str]:
    cls = {"run": RunSection, "model": ModelSection, "lora": LoRASection, "prompts": PromptsSection,
           "rewards": RewardEntry, "training": TrainerConfig, **ENGINE_SECTIONS}[section]
    docs = _attribute_docs(cls)
    for k, v in _EXTRA_DOCS.get(section, {}).items():
        docs.setdefault(k, v)
    return docs


SECTION_DOCS = {
    "run": "Run folder, outputs, resume, device and logging.",
    "model": "The diffusion model, loaded through diffusers from local files only.",
    "lora": "The trained LoRA. It is exported in ComfyUI's key format (diffusion_model.<ComfyUI module>.lora_up/"
            "lora_down/alpha), so the stock LoraLoaderModelOnly loads it.",
    "prompts": "Training prompts.",
    "rewards": "One [[rewards]] table per reward model; several are mixed with their weights.",
    "training": "Length and batch of the run.",
    "schedule": "The branching rollout: steps, split steps, branching factor, SDE.",
    "advantage": "From leaf rewards to per-edge advantages.",
    "pruning": "Which edges enter the backward pass.",
    "optim": "The PPO-clip update and its optimizer.",
}


# ------------------------------------------------------------------------------------- type checking
def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None)) + \
            (' or "none"' if type(None) in args else "")
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}s"
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            dict: "a table"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """``value`` (from TOML) checked against the annotation ``tp``; lists become tuples."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() == "none")):
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, name)
            except ConfigError:
                continue
        raise ConfigError(name, f"expected {_describe(tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
            if len(value) != len(args):
                raise ConfigError(name, f"expected {_describe(tp)}, got {len(value)} values")
            return tuple(_coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    else:
        return value
    raise ConfigError(name, f"expected {_describe(tp)}, got {value!r}")


def _unknown(name: str, key: str, valid: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid fields: {', '.join(sorted(valid))}"
    return ConfigError(f"{name}.{key}" if name else key, f"unknown field{hint}")


def _fill(cls: type, base: Any, data: Any, section: str) -> Any:
    """A ``cls`` instance: ``base`` (an instance, or None for the defaults) with ``data``'s fields replaced."""
    if not isinstance(data, dict):
        raise ConfigError(section, f"expected a table ([{section}]), got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown(section, key, names)
        values[key] = _coerce(value, hints[key], f"{section}.{key}")
    obj = base if base is not None else cls()
    return dataclasses.replace(obj, **values)


# ------------------------------------------------------------------------------------------ parsing
TOP_LEVEL = ("preset", "run", "model", "lora", "prompts", "rewards", "training", *ENGINE_SECTIONS)


def parse_config(data: Mapping[str, Any], *, base_dir: str | os.PathLike = ".", source: str | None = None,
                 check_files: bool = True) -> RunConfig:
    """Validate a config dict (as :mod:`tomllib` returns it). Raises :class:`ConfigError` naming the field."""
    try:
        return _parse(dict(data), os.fspath(base_dir), source, check_files)
    except ConfigError as e:
        if e.source is None and source:
            raise ConfigError(e.field, str(e).split(f"{e.field}: ", 1)[-1], source) from None
        raise


def _parse(data: dict, base_dir: str, source: str | None, check_files: bool) -> RunConfig:
    for key in data:
        if key not in TOP_LEVEL:
            raise _unknown("", key, TOP_LEVEL)
    preset_name = data.get("preset", "")
    if not isinstance(preset_name, str):
        raise ConfigError("preset", f"expected a string, got {preset_name!r}")
    if preset_name:
        if preset_name not in PRESETS:
            raise ConfigError("preset", f"unknown preset {preset_name!r}; choose one of {', '.join(sorted(PRESETS))}")
        base = PRESETS[preset_name]()
    else:
        base = TrainerConfig()

    subs = {}
    for sec, cls in ENGINE_SECTIONS.items():
        subs[sec] = _fill(cls, getattr(base, sec), data.get(sec, {}), sec)
    training = data.get("training", {})
    if not isinstance(training, dict):
        raise ConfigError("training", f"expected a table ([training]), got {training!r}")
    hints = typing.get_type_hints(TrainerConfig)
    top = {}
    for key, value in training.items():
        if key not in TRAINING_FIELDS:
            raise _unknown("training", key, TRAINING_FIELDS)
        top[key] = _coerce(value, hints[key], f"training.{key}")
    top.setdefault("checkpoint_every", 1)  # headless runs checkpoint every iteration unless told otherwise

    run = _fill(RunSection, None, data.get("run", {}), "run")
    model = _fill(ModelSection, None, data.get("model", {}), "model")
    lora = _fill(LoRASection, None, data.get("lora", {}), "lora")
    prompts_sec = _fill(PromptsSection, None, data.get("prompts", {}), "prompts")

    raw_rewards = data.get("rewards", [])
    if isinstance(raw_rewards, dict):
        raw_rewards = [raw_rewards]
    if not isinstance(raw_rewards, list) or not raw_rewards:
        raise ConfigError("rewards", "no reward given; add at least one [[rewards]] table with a 'name', e.g. "
                                     "[[rewards]] name = \"jpeg_compressibility\"")
    rewards = [_fill(RewardEntry, None, r, f"rewards[{i}]") for i, r in enumerate(raw_rewards)]

    cfg = RunConfig(trainer=TrainerConfig(**subs, **top,
                                          reward_weights=tuple(float(r.weight) for r in rewards)),
                    run=run, model=model, lora=lora, prompts=[], rewards=rewards, preset=preset_name,
                    source=source, base_dir=base_dir, prompts_section=prompts_sec)
    _validate(cfg, check_files)
    return cfg


def _validate(cfg: RunConfig, check_files: bool) -> None:
    # -- engine settings: the engine's own checks, reported under the section that holds the field
    t = cfg.trainer
    for sec in ENGINE_SECTIONS:
        try:
            if sec == "pruning":
                t.pruning.validate(t.schedule.num_steps, "pruning")
            else:
                getattr(t, sec).validate(sec)
        except ValueError as e:
            msg = str(e)
            fname = _field_in_message(msg, ENGINE_SECTIONS[sec])
            raise ConfigError(f"{sec}.{fname}" if fname else sec, msg.split(": ", 1)[-1]) from None
    for name in TRAINING_FIELDS:
        lo = 0 if name in ("checkpoint_every", "seed") else 1
        val = getattr(t, name)
        if val < lo:
            raise ConfigError(f"training.{name}", f"must be an integer >= {lo} (got {val!r})")

    # -- run
    r = cfg.run
    if not RUN_NAME.match(r.name):
        raise ConfigError("run.name", f"{r.name!r} is not a plain folder name; use letters, digits, '_', '.' "
                                      "or '-' (no slashes), e.g. 'flux_hps_run1'")
    if r.resume not in ("auto", "never"):
        raise ConfigError("run.resume", f"must be 'auto' or 'never' (got {r.resume!r})")
    if r.dtype not in DTYPES:
        raise ConfigError("run.dtype", f"must be one of {', '.join(DTYPES)} (got {r.dtype!r})")
    if r.tensorboard not in ("auto", "on", "off"):
        raise ConfigError("run.tensorboard", f"must be 'auto', 'on' or 'off' (got {r.tensorboard!r})")
    if not re.match(r"^(auto|cpu|cuda(:\d+)?|mps)$", r.device):
        raise ConfigError("run.device", f"must be 'auto', 'cpu', 'cuda' or 'cuda:N' (got {r.device!r})")
    if r.lora_file and not r.lora_file.endswith(".safetensors"):
        raise ConfigError("run.lora_file", f"must end in .safetensors (got {r.lora_file!r})")

    # -- model
    m = cfg.model
    if m.family not in FAMILIES:
        raise ConfigError("model.family", f"must be one of {', '.join(FAMILIES)} (got {m.family!r})")
    for name in ("width", "height", "frames"):
        if getattr(m, name) < 1:
            raise ConfigError(f"model.{name}", f"must be >= 1 (got {getattr(m, name)})")
    if m.cfg_scale < 1.0:
        raise ConfigError("model.cfg_scale", f"must be >= 1 (1 = off; got {m.cfg_scale})")
    if m.guidance < 0:
        raise ConfigError("model.guidance", f"must be >= 0 (got {m.guidance})")
    if m.max_sequence_length < 0:
        raise ConfigError("model.max_sequence_length", "must be >= 0 (0 = the family's default)")
    for key, value in m.text_encoder_files.items():
        if key not in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            raise ConfigError(f"model.text_encoder_files.{key}", "unknown component; use text_encoder, "
                                                                 "text_encoder_2 or text_encoder_3")
        if not isinstance(value, str):
            raise ConfigError(f"model.text_encoder_files.{key}", f"expected a file path, got {value!r}")
    if not m.path:
        raise ConfigError("model.path", "empty; give the local diffusers folder of the model (it holds the "
                                        "configs and tokenizers, and every component not given as a file)")
    if check_files:
        folder = cfg.path(m.path)
        if not os.path.isdir(folder):
            raise ConfigError("model.path", f"{folder} is not a folder; give a local diffusers model folder")
        if not (os.path.isfile(os.path.join(folder, "model_index.json"))
                or os.path.isfile(os.path.join(folder, "transformer", "config.json"))):
            raise ConfigError("model.path", f"{folder} has no model_index.json or transformer/config.json; it is "
                                            "not a diffusers model folder")
        files = [("model.transformer_file", m.transformer_file), ("model.vae_file", m.vae_file)]
        files += [(f"model.text_encoder_files.{k}", v) for k, v in m.text_encoder_files.items()]
        for fname, value in files:
            if value and not os.path.isfile(cfg.path(value)):
                raise ConfigError(fname, f"{cfg.path(value)} does not exist")

    # -- lora
    lo = cfg.lora
    if lo.rank < 1:
        raise ConfigError("lora.rank", f"must be an integer >= 1 (got {lo.rank}); typical values are 4-64")
    if not (math.isfinite(lo.alpha) and lo.alpha > 0):
        raise ConfigError("lora.alpha", f"must be a number > 0 (got {lo.alpha}); alpha = rank gives scale 1")
    if not lo.targets or not all(lo.targets):
        raise ConfigError("lora.targets", "must be a non-empty list of non-empty globs, e.g. [\"*.to_q\"]")

    # -- prompts
    prompts = [p.strip() for p in cfg.prompts_section.train if p.strip()]
    if cfg.prompts_section.file:
        path = cfg.path(cfg.prompts_section.file)
        if check_files or os.path.isfile(path):
            if not os.path.isfile(path):
                raise ConfigError("prompts.file", f"{path} does not exist")
            with open(path, encoding="utf-8") as fh:
                prompts += [ln.strip() for ln in fh if ln.strip() and not ln.strip().startswith("#")]
    if not prompts:
        raise ConfigError("prompts.train", "the prompt list is empty; give at least one prompt in prompts.train "
                                           "or a prompts.file")
    cfg.prompts = prompts

    # -- rewards
    from .rewards.registry import reward_names
    valid = reward_names()
    for i, rw in enumerate(cfg.rewards):
        if rw.name not in valid:
            close = difflib.get_close_matches(rw.name, valid, n=1)
            raise ConfigError(f"rewards[{i}].name", f"unknown reward {rw.name!r}"
                              + (f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(valid)}"))
        if not math.isfinite(rw.weight):
            raise ConfigError(f"rewards[{i}].weight", f"must be a finite number (got {rw.weight})")
    if all(rw.weight == 0 for rw in cfg.rewards):
        raise ConfigError("rewards[0].weight", "every reward has weight 0; give at least one a non-zero weight")


def _field_in_message(msg: str, cls: type) -> str | None:
    """The dataclass field an engine validation message is about (the first field name it mentions)."""
    body = msg.split(": ", 1)[-1]
    names = sorted((f.name for f in dataclasses.fields(cls)), key=len, reverse=True)
    first = None
    for n in names:
        m = re.search(rf"\b{re.escape(n)}\b", body)
        if m and (first is None or m.start() < first[0]):
            first = (m.start(), n)
    return first[1] if first else None


def load_config(path: str | os.PathLike, overrides: Sequence[str] = (), check_files: bool = True) -> RunConfig:
    """Read and validate a TOML run config; ``overrides`` are ``section.field=value`` strings (TOML values)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError("CONFIG", f"{path} does not exist")
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("CONFIG", f"{path} is not valid TOML: {e}") from None
    for item in overrides:
        apply_override(data, item)
    return parse_config(data, base_dir=os.path.dirname(os.path.abspath(path)), source=path,
                        check_files=check_files)


def apply_override(data: dict, item: str) -> None:
    """``"schedule.num_steps=10"`` (the value is TOML; bare words are strings) into ``data``."""
    if "=" not in item:
        raise ConfigError(item, "an override must look like section.field=value, e.g. training.iterations=10")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(key, "cannot override inside a non-table value")
    node[parts[-1]] = value


# ------------------------------------------------------------------------------------------ writing
_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE.match(k) else json.dumps(k)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items() if x is not None) + " }" \
            if v else "{}"
    if isinstance(v, os.PathLike):
        return json.dumps(os.fspath(v), ensure_ascii=False)
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _comment(text: str, width: int = 100) -> list[str]:
    return ["# " + ln for ln in textwrap.wrap(text, width - 2)] if text else []


def dump_toml(data: Mapping[str, Any], docs: bool = True, header: str = "") -> str:
    """TOML text for a run-config dict: top-level scalars, then one table per section, ``rewards`` as an
    array of tables. ``docs`` adds every field's documentation as comments; ``None`` is written as the
    string ``"none"`` (TOML has no null), which the parser reads back as None for optional fields."""
    lines: list[str] = []
    if header:
        lines += _comment(header) + [""]
    tables = [(k, v) for k, v in data.items() if isinstance(v, dict) or (isinstance(v, list) and v
                                                                            and all(isinstance(x, dict) for x in v))]
    for k, v in data.items():
        if (k, v) in tables:
            continue
        if docs and k == "preset":
            lines += _comment("A named engine preset (" + ", ".join(sorted(PRESETS)) + "); the sections "
                              "below override its fields. Empty: the engine's defaults.")
        lines.append(f"{_key(k)} = {_value(v)}")
    for name, value in tables:
        rows = value if isinstance(value, list) else [value]
        field_doc = field_docs(name) if docs and name in SECTION_DOCS else {}
        for row in rows:
            lines.append("")
            if docs and name in SECTION_DOCS and (row is rows[0]):
                lines += _comment(SECTION_DOCS[name])
            lines.append(f"[[{name}]]" if isinstance(value, list) else f"[{name}]")
            for fk, fv in row.items():
                if docs and field_doc.get(fk):
                    lines += _comment(field_doc[fk])
                lines.append(f"{_key(fk)} = {_value('none' if fv is None else fv)}")
    return "\n".join(lines) + "\n"


def dump_config(cfg: RunConfig | Mapping[str, Any], docs: bool = True, header: str = "") -> str:
    data = cfg.to_dict() if isinstance(cfg, RunConfig) else cfg
    return dump_toml(data, docs=docs, header=header)


def default_template(preset: str = "branchgrpo", family: str = "flux") -> str:
    """The commented template ``--print-default-config`` prints: every field with its documentation."""
    base = PRESETS[preset]() if preset else TrainerConfig()
    data: dict[str, Any] = {"preset": preset}
    data["run"] = dataclasses.asdict(RunSection())
    model = dataclasses.asdict(ModelSection())
    example = {"flux": "FLUX.1-dev", "sd3": "stable-diffusion-3.5-medium", "wan": "Wan2.1-T2V-1.3B-Diffusers"}
    model.update(family=family, path=f"/path/to/{example.get(family, 'model')}")
    data["model"] = model
    data["lora"] = dataclasses.asdict(LoRASection())
    data["prompts"] = {"train": ["a photo of a cat", "a watercolor of a lighthouse"], "file": ""}
    data["rewards"] = [dataclasses.asdict(RewardEntry())]
    data["training"] = {k: getattr(base, k) for k in TRAINING_FIELDS}
    data["training"]["checkpoint_every"] = 1
    for sec in ENGINE_SECTIONS:
        data[sec] = dataclasses.asdict(getattr(base, sec))
    header = ("BranchGRPO run config (TOML). Train with:  python -m branchgrpo train THIS_FILE  or, on N GPUs,  "
              "torchrun --nproc_per_node N -m branchgrpo train THIS_FILE.  Relative paths are relative to this "
              "file's folder. Values that are not set keep the preset's (or the engine's) defaults; an optional "
              "value is cleared with \"none\". Override any field on the command line: --set section.field=value.")
    return dump_toml(data, docs=True, header=header)


