"""Run configuration files for headless training (``python -m branchgrpo train CONFIG``).

Format: TOML, read with the standard library's :mod:`tomllib` and written with ``tomli-w``. The typed schema
is the dataclasses themselves: the run's own sections below and the engine's settings (every dataclass field
of :class:`~branchgrpo.trainer.TrainerConfig` is a section, e.g. ``[schedule]``; its plain fields form
``[training]``), checked by ``pydantic`` (strict types: no string is taken for a number). Every field is
documented from the attribute docstring that follows it in its dataclass, so the template never drifts from
the code. ``python -m branchgrpo train --print-default-config`` prints the commented template.

Layout::

    preset = "branchgrpo-deppru"   # a named engine preset; the sections below override its fields
    [run]       run name, output folder, LoRA file, resume, device, dtype, logging
    [model]     the diffusers model: local folder / single files, resolution, guidance, memory options
    [lora]      rank, alpha, target modules (diffusers module names, fnmatch globs)
    [prompts]   training prompts (inline list and/or a text file)
    [[rewards]] one table per reward: name (registry), weight, args for its loader
    [training]  iterations, prompts_per_iteration, seed, max_batch, checkpoint_every, ...
    [schedule] [advantage] [pruning] [optim] [objective]   the engine's settings, field by field

Adding a setting is a one-place change: a field (with its docstring) in an engine dataclass, or in one of
the sections here, is parsed, type-checked, validated, written and documented from then on. A new engine
section is a new dataclass field of ``TrainerConfig`` (with a ``validate(where)`` method); only a section
with a hand-written summary needs a line in :data:`SECTION_DOCS`.

Every problem is reported as a :class:`ConfigError` naming the field (``schedule.split_steps: ...``), with the
closest valid name for a misspelt one, before anything is loaded. Relative paths are relative to the config
file's folder.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import os
import re
import textwrap
import tomllib
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Mapping, Sequence

import pydantic
import tomli_w

from .fileio import write_text_atomic  # noqa: F401  (re-exported for the CLI and the nodes)
from .presets import PRESETS
from .trainer import TrainerConfig

__all__ = ["ConfigError", "RunConfig", "RunSection", "ModelSection", "LoRASection", "PromptsSection",
           "RewardEntry", "load_config", "parse_config", "dump_config", "default_template", "dump_toml",
           "DEFAULT_LORA_TARGETS", "write_text_atomic"]

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
Family = Literal["auto", "flux", "sd3", "wan"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
FAMILIES, DTYPES = typing.get_args(Family), typing.get_args(Dtype)
DEFAULT_LORA_TARGETS = ("*.to_q", "*.to_k", "*.to_v", "*.to_out.0", "*.add_q_proj", "*.add_k_proj",
                        "*.add_v_proj", "*.to_add_out")

_TRAINER_HINTS = typing.get_type_hints(TrainerConfig)
#: The engine's settings sections: every dataclass field of TrainerConfig (schedule, advantage, ...).
ENGINE_SECTIONS: dict[str, type] = {f.name: _TRAINER_HINTS[f.name] for f in dataclasses.fields(TrainerConfig)
                                    if dataclasses.is_dataclass(_TRAINER_HINTS[f.name])}
#: ``[training]``: TrainerConfig's plain fields (the reward weights come from ``[[rewards]]``).
TRAINING_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrainerConfig)
                                         if f.name not in ENGINE_SECTIONS and f.name != "reward_weights")
#: Lower bounds of [training]'s integer fields (checked here, before the engine's own validation).
_TRAINING_MIN = {"iterations": 1, "prompts_per_iteration": 1, "max_batch": 1}
#: Extra positional arguments of an engine section's ``validate`` (pruning needs the step count).
_VALIDATE_ARGS = {"pruning": lambda t: (t.schedule.num_steps,)}


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
    resume: Literal["auto", "never"] = "auto"
    """'auto': continue from <run folder>/checkpoint.pt when it exists (same settings required, the
    iteration count may grow); 'never': start fresh (an existing checkpoint is overwritten)."""
    device: str = "auto"
    """'auto' (cuda:<LOCAL_RANK> when CUDA is available, else cpu), 'cpu', 'cuda' or 'cuda:N'."""
    dtype: Dtype = "auto"
    """Weights / compute dtype of the diffusion model and text encoders: 'auto' (bfloat16 on CUDA,
    float32 on CPU), 'float32', 'bfloat16' or 'float16'. The LoRA and its optimizer stay float32."""
    tensorboard: Literal["auto", "on", "off"] = "auto"
    """TensorBoard event files in <run folder>/tensorboard: 'auto' (when the tensorboard package is
    installed), 'on' (fail at start when it is not) or 'off'. Metrics always go to metrics.jsonl."""
    progress: bool = True
    """Show a tqdm progress bar (rank 0 only)."""


@dataclass
class ModelSection:
    family: Family = "auto"
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
    algorithm: str = "LoRA"
    """The adapter, trained with peft: 'LoRA', 'LoHa', 'LoKr', 'OFT' (ComfyUI's weight adapter names) or 'DoRA'.
    The file is in ComfyUI's key format for each (DoRA: lora_up/down + dora_scale; OFT: the exact weight
    difference, .diff, since peft's OFT rotates inputs and ComfyUI's oft_blocks rotate outputs)."""
    rank: int = 16
    """LoRA rank (4-64 is usual); LoHa / LoKr: their rank; OFT: the block size (must divide every adapted
    layer's input size)."""
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
    "objective": {
        "ghuber_power": "Power p of AWM's 'ghuber' surrogate: -t * ((mse + 1e-10)^p - 1e-10^p) / p.",
        "old_decay_rate": "EMA old policy: the decay grows by this much per optimizer step (see old_decay_flat).",
        "old_decay_max": "EMA old policy: the largest decay (see old_decay_flat).",
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
    "lora": "The trained adapter (peft: LoRA, LoHa, LoKr, OFT or DoRA). It is exported in ComfyUI's key format "
            "(diffusion_model.<ComfyUI module>.lora_up/lora_down/alpha, hada_*, lokr_*, dora_scale, diff), so the "
            "stock LoraLoaderModelOnly loads it.",
    "prompts": "Training prompts.",
    "rewards": "One [[rewards]] table per reward model; several are mixed with their weights.",
    "training": "Length and batch of the run.",
    "schedule": "The branching rollout: steps, split steps, branching factor, SDE.",
    "advantage": "From leaf rewards to per-edge advantages.",
    "pruning": "Which edges enter the backward pass.",
    "optim": "The PPO-clip update and its optimizer.",
    "objective": "What the rollout trains: 'ppo' (the PPO-clip update on the tree's SDE edges, [optim]) or a "
                 "forward-process objective on its clean samples (diffusionnft, awm, dgpo); the sampler is "
                 "[schedule], chosen independently.",
}
for _name in ENGINE_SECTIONS:  # a new engine section is documented by its TrainerConfig field's docstring
    SECTION_DOCS.setdefault(_name, _attribute_docs(TrainerConfig).get(_name, f"The engine's {_name} settings."))


# ---------------------------------------------------------------------------------------- typed schema
# One pydantic model per dataclass, derived from its type hints: numbers, booleans and strings are strict
# (TOML has types; "3" is not 3), TOML arrays become tuples, "none" clears an optional field, unknown keys
# are refused. Only the keys present are validated; the rest keep the preset's / the dataclass's defaults.
def _none(value: Any) -> Any:
    return None if isinstance(value, str) and value.strip().lower() == "none" else value


_STRICT = {int: pydantic.StrictInt, float: pydantic.StrictFloat, bool: pydantic.StrictBool,
           str: pydantic.StrictStr}


def _strict(tp: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = typing.Union[tuple(_strict(a) for a in args)]
        return Annotated[inner, pydantic.BeforeValidator(_none)] if type(None) in args else inner
    if origin is tuple:
        return tuple[tuple(_strict(a) if a is not Ellipsis else a for a in args)]
    if tp is dict or origin is dict:
        return dict
    return _STRICT.get(tp, tp)


@functools.cache
def _schema(cls: type) -> type[pydantic.BaseModel]:
    hints = typing.get_type_hints(cls)
    fields = {f.name: (_strict(hints[f.name]), None) for f in dataclasses.fields(cls)}
    return pydantic.create_model(f"{cls.__name__}Schema", __config__=pydantic.ConfigDict(extra="forbid"),
                                 **fields)


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None)) + \
            (' or "none"' if type(None) in args else "")
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            plural = {int: "integers", float: "numbers", bool: "true/false values", str: "strings"}
            return f"a list of {plural.get(args[0], _describe(args[0]))}"
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            dict: "a table"}.get(tp, getattr(tp, "__name__", str(tp)))


def _unknown(name: str, key: str, valid: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid fields: {', '.join(sorted(valid))}"
    return ConfigError(f"{name}.{key}" if name else key, f"unknown field{hint}")


def _config_error(err: pydantic.ValidationError, cls: type, data: Mapping, section: str) -> ConfigError:
    """The first problem (in the order of the config's keys) as a ConfigError naming the field."""
    order = list(data)
    first = min(err.errors(), key=lambda e: order.index(e["loc"][0]) if e["loc"][0] in order else len(order))
    key, rest = first["loc"][0], first["loc"][1:]
    if first["type"] == "extra_forbidden":
        return _unknown(section, str(key), [f.name for f in dataclasses.fields(cls)])
    tp, value, name = typing.get_type_hints(cls)[key], data[key], f"{section}.{key}"
    args = typing.get_args(tp)
    if first["type"] == "literal_error" and isinstance(value, str):
        close = difflib.get_close_matches(value, [str(a) for a in args], n=1)
        if close:
            return ConfigError(name, f"expected {_describe(tp)}, got {value!r}; did you mean {close[0]!r}?")
    if first["type"] in ("too_long", "too_short", "missing") and isinstance(value, (list, tuple)):
        return ConfigError(name, f"expected {_describe(tp)}, got {len(value)} values")
    if rest and isinstance(rest[0], int) and typing.get_origin(tp) is tuple and isinstance(value, (list, tuple)):
        i = rest[0]  # one element of a list (a union's errors carry the member's name instead)
        tp, value, name = (args[0] if args[-1] is Ellipsis else args[i]), value[i], f"{name}[{i}]"
    return ConfigError(name, f"expected {_describe(tp)}, got {value!r}")


def _values(cls: type, data: Any, section: str) -> dict[str, Any]:
    """The fields ``data`` (a TOML table) sets, checked against ``cls``'s schema."""
    if not isinstance(data, dict):
        raise ConfigError(section, f"expected a table ([{section}]), got {data!r}")
    try:
        parsed = _schema(cls).model_validate(data)
    except pydantic.ValidationError as e:
        raise _config_error(e, cls, data, section) from None
    return {k: getattr(parsed, k) for k in data}


def _fill(cls: type, base: Any, data: Any, section: str) -> Any:
    """A ``cls`` instance: ``base`` (an instance, or None for the defaults) with ``data``'s fields replaced."""
    return dataclasses.replace(base if base is not None else cls(), **_values(cls, data, section))


#: The schema of ``[training]``: TrainerConfig's plain fields.
_TrainingSection = dataclasses.make_dataclass(
    "TrainingSection", [(n, _TRAINER_HINTS[n], dataclasses.field(default=None)) for n in TRAINING_FIELDS])


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

    subs = {sec: _fill(cls, getattr(base, sec), data.get(sec, {}), sec) for sec, cls in ENGINE_SECTIONS.items()}
    top = {k: getattr(base, k) for k in TRAINING_FIELDS}
    top["checkpoint_every"] = 1  # headless runs checkpoint every iteration unless told otherwise
    top.update(_values(_TrainingSection, data.get("training", {}), "training"))

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
    for sec, cls in ENGINE_SECTIONS.items():
        try:
            getattr(t, sec).validate(*_VALIDATE_ARGS.get(sec, lambda _: ())(t), sec)
        except ValueError as e:
            raise _engine_error(str(e), sec, cls) from None
    for name in TRAINING_FIELDS:
        val = getattr(t, name)
        if _TRAINER_HINTS[name] is int and val < _TRAINING_MIN.get(name, 0):
            raise ConfigError(f"training.{name}", f"must be an integer >= {_TRAINING_MIN.get(name, 0)} (got {val!r})")
    try:  # the checks across sections (e.g. an objective that needs SDE steps the schedule does not have)
        t.validate("training")
    except ValueError as e:
        where, _, msg = str(e).partition(": ")
        sec = where.split(".", 1)[1] if where.startswith("training.") else ""
        if sec in ENGINE_SECTIONS:
            raise _engine_error(msg, sec, ENGINE_SECTIONS[sec]) from None
        fname = next((n for n in TRAINING_FIELDS if re.search(rf"\b{n}\b", msg)), None)
        raise ConfigError(f"training.{fname}" if fname else "training", msg) from None

    # -- run
    r = cfg.run
    if not RUN_NAME.match(r.name):
        raise ConfigError("run.name", f"{r.name!r} is not a plain folder name; use letters, digits, '_', '.' "
                                      "or '-' (no slashes), e.g. 'flux_hps_run1'")
    if not re.match(r"^(auto|cpu|cuda(:\d+)?|mps)$", r.device):
        raise ConfigError("run.device", f"must be 'auto', 'cpu', 'cuda' or 'cuda:N' (got {r.device!r})")
    if r.lora_file and not r.lora_file.endswith(".safetensors"):
        raise ConfigError("run.lora_file", f"must end in .safetensors (got {r.lora_file!r})")

    # -- model
    m = cfg.model
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
    from .peft_adapter import algorithm_error  # (peft itself is imported only when an adapter is built)
    problem = algorithm_error(lo.algorithm)
    if problem:
        raise ConfigError("lora.algorithm", problem)
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


def _engine_error(msg: str, sec: str, cls: type) -> ConfigError:
    """An engine validation message as a ConfigError on the field it is about (``schedule.split_steps``)."""
    fname = _field_in_message(msg, cls)
    return ConfigError(f"{sec}.{fname}" if fname else sec, msg.split(": ", 1)[-1])


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
# tomli-w writes every key and value; this lays them out as a documented file: one table per section in
# the config's order, each field preceded by its documentation, short lists on one line, a field that is
# itself a table (model.text_encoder_files, rewards[i].args) as a sub-table after the section's fields.
_SHORT = 96  # longest list kept on one line


def _clean(value: Any) -> Any:
    """``value`` with ``None`` as ``"none"`` (TOML has no null) and paths as strings, all the way down."""
    if value is None:
        return "none"
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _toml_line(key: str, value: Any) -> str:
    """``key = value`` as tomli-w writes it; a list of plain values on one line when it is short."""
    value = _clean(value)
    if isinstance(value, list) and value and not any(isinstance(x, (list, Mapping)) for x in value):
        items = [tomli_w.dumps({"v": x})[len("v = "):-1] for x in value]
        line = tomli_w.dumps({key: []})[:-len("[]\n")] + "[" + ", ".join(items) + "]"
        if len(line) <= _SHORT:
            return line
    return tomli_w.dumps({key: value}).rstrip("\n")


def _comment(text: str, width: int = 100) -> list[str]:
    return ["# " + ln for ln in textwrap.wrap(text, width - 2)] if text else []


def dump_toml(data: Mapping[str, Any], docs: bool = True, header: str = "") -> str:
    """TOML text for a run-config dict: top-level scalars, then one table per section, ``rewards`` as an
    array of tables. ``docs`` adds every field's documentation as comments; ``None`` is written as the
    string ``"none"``, which the parser reads back as None for optional fields."""
    lines: list[str] = []
    if header:
        lines += _comment(header) + [""]
    tables = {k: v for k, v in data.items() if isinstance(v, Mapping)
              or (isinstance(v, (list, tuple)) and v and all(isinstance(x, Mapping) for x in v))}
    for k, v in data.items():
        if k in tables:
            continue
        if docs and k == "preset":
            lines += _comment("A named engine preset (" + ", ".join(sorted(PRESETS)) + "); the sections "
                              "below override its fields. Empty: the engine's defaults.")
        lines.append(_toml_line(k, v))
    for name, value in tables.items():
        array = not isinstance(value, Mapping)
        field_doc = field_docs(name) if docs and name in SECTION_DOCS else {}
        for i, row in enumerate(value if array else [value]):
            lines.append("")
            if docs and name in SECTION_DOCS and i == 0:
                lines += _comment(SECTION_DOCS[name])
            key = tomli_w.dumps({name: 0})[:-len(" = 0\n")]  # quoted by tomli-w when it has to be
            lines.append(f"[[{key}]]" if array else f"[{key}]")
            plain = [(k, v) for k, v in row.items() if not isinstance(v, Mapping)]
            for fk, fv in plain + [(k, v) for k, v in row.items() if isinstance(v, Mapping)]:
                if docs and field_doc.get(fk):
                    lines += _comment(field_doc[fk])
                if isinstance(fv, Mapping):  # a sub-table [name.fk] (of this element, for an array)
                    lines += tomli_w.dumps({name: {fk: _clean(fv)}}).rstrip("\n").splitlines()
                else:
                    lines.append(_toml_line(fk, fv))
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
