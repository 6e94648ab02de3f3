"""The Trainer's adapters: ``comfy.weight_adapter``'s training modules (LoRA, LoHa, LoKr, OFT) on a clone of the MODEL.

:class:`ComfyAdapterSet` implements the engine's :class:`branchgrpo.lora.TrainableAdapter` protocol with the very
modules ComfyUI's own trainer (``comfy_extras/nodes_train.py``) trains: ``LoraDiff``, ``LohaDiff``, ``LokrDiff``,
``OFTDiff`` (from ``adapter_maps[algorithm].create_train`` or, when a LoRA file is continued, from
``adapter.load(...).to_train()``) and ``BiasDiff`` for the ``.diff`` / ``.diff_b`` deltas. Each is attached with
``ModelPatcher.add_weight_wrapper`` behind a thin :class:`AdapterSwitch` that returns the weight unchanged while
the set is :meth:`~ComfyAdapterSet.disabled` (the reference policy). ComfyUI's ops hand a weight function the
layer's weight in the compute dtype (an fp8 or offloaded base is cast per layer first); the modules return it in
that dtype (LoRA, LoHa and OFT add their fp32 update in fp32 and round once, LoKr adds it in the compute dtype).

Which layers: the ``nn.Linear`` layers of ``diffusion_model`` that ``LoRAConfig.targets`` / ``exclude`` select
(:func:`branchgrpo.lora.select_linear`). With ``train_bias_norm``: a ``.diff_b`` (bias delta) for each of those
layers that has a bias, and a ``.diff`` for the 1-D weight (scale) of every normalisation layer of ComfyUI's ops
(LayerNorm, RMSNorm, GroupNorm) whose name the same globs select; norms without a weight, or with their scale
outside ComfyUI's ops (FLUX's QK ``RMSNorm.scale``), have nothing a weight wrapper could change.

The state in ComfyUI's key format (:meth:`~ComfyAdapterSet.comfy_state_dict`) is what ComfyUI's trainer puts in its
``LORA_MODEL``: ``diffusion_model.<module>.<parameter name>`` over each module's ``named_parameters()`` (``alpha``
included), ``.diff`` and ``.diff_b``; the stock ``LoraLoaderModelOnly`` and ``LoraModelLoader`` consume every key.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from branchgrpo.lora import LoRAConfig, select_linear
from . import comfy_core as core

log = logging.getLogger("BranchGRPO")

ALGORITHMS = ("LoRA", "LoHa", "LoKr", "OFT")
NODE = "BranchGRPO Trainer"
PREFIX = "diffusion_model."
_LIST = 6


def _listing(items) -> str:
    items = list(items)
    return ", ".join(str(i) for i in items[:_LIST]) + (f", ... ({len(items) - _LIST} more)" if len(items) > _LIST else "")


# ---------------------------------------------------------------------------------------------- which layers
@dataclass(frozen=True)
class Target:
    """One tensor the set trains: ``kind`` "weight" (an adapter of ``algorithm`` on a Linear weight), "diff"
    (the 1-D weight of a norm) or "diff_b" (a bias)."""
    name: str  # module name relative to diffusion_model
    kind: str
    shape: tuple[int, ...]


def plan_targets(diffusion_model: torch.nn.Module, config: LoRAConfig, *, train_bias_norm: bool = False) -> list[Target]:
    """What a set with ``config`` trains on ``diffusion_model``, in a fixed order (sorted Linear names first)."""
    linears = select_linear(diffusion_model, config)
    out = [Target(n, "weight", tuple(m.weight.shape)) for n, m in linears]
    if train_bias_norm:
        for n, m in linears:
            if getattr(m, "bias", None) is not None:
                out.append(Target(n, "diff_b", tuple(m.bias.shape)))
        for n, m in sorted(diffusion_model.named_modules()):
            if not n or isinstance(m, torch.nn.Linear) or not hasattr(m, "weight_function"):
                continue
            w = getattr(m, "weight", None)
            if isinstance(w, torch.Tensor) and w.dim() == 1 and config.selects(n):
                out.append(Target(n, "diff", tuple(w.shape)))
                if getattr(m, "bias", None) is not None:
                    out.append(Target(n, "diff_b", tuple(m.bias.shape)))
    return out


def check_rank(targets: Sequence[Target], algorithm: str, rank: int, node: str = NODE) -> None:
    """Refuse a rank the algorithm cannot use on these layers, before anything is built.

    OFT: ``rank`` is the wanted block size; ``factorization(out, rank)`` must give blocks of at least 2x2 (a 1x1
    skew-symmetric block is 0: the layer could not change). LoKr: ``rank`` is the Kronecker factor; a factor that
    leaves one side 1x1 makes the other as large as the weight (full fine-tuning memory)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"{node}: algorithm — {algorithm!r} is not one of {', '.join(ALGORITHMS)}.")
    _, factorization = core.weight_adapter()
    bad = []
    for t in targets:
        if t.kind != "weight":
            continue
        out_dim, in_dim = t.shape[0], math.prod(t.shape[1:])
        if algorithm == "OFT":
            block_size, _ = factorization(out_dim, rank)
            if block_size < 2:
                bad.append(f"{t.name} (out {out_dim})")
        elif algorithm == "LoKr":
            o1, o2 = factorization(out_dim, rank)
            i1, i2 = factorization(in_dim, rank)
            if o1 * i1 + o2 * i2 >= out_dim * in_dim:
                bad.append(f"{t.name} ({out_dim}x{in_dim})")
    useless = _rank_unused(targets, algorithm, rank)
    weights = [t for t in targets if t.kind == "weight"]
    if weights and len(useless) == len(weights) and not bad:
        if algorithm == "LoKr":
            raise ValueError(f"{node}: lora_rank — LoKr factor {rank} fits none of the {len(weights)} adapted "
                             f"layers (a factor f is used on a width it divides with f*f <= width), so ComfyUI would "
                             f"quietly pick another factorisation for every one: {_listing(useless)}. Pick a factor "
                             "that divides the widths (e.g. 4, 8 or 16).")
        widest = max(min(t.shape[0], math.prod(t.shape[1:])) for t in weights)
        raise ValueError(f"{node}: lora_rank — {algorithm} rank {rank} is above the rank every adapted layer can "
                         f"have (at most {widest}: the smaller of its widths), so the extra rank trains nothing and "
                         f"only costs memory. Set lora_rank to at most {widest}.")
    if not bad:
        return
    if algorithm == "OFT":
        raise ValueError(f"{node}: lora_rank — OFT with lora_rank {rank} gives 1x1 blocks (no rotation can train) for "
                         f"{len(bad)} layer(s): {_listing(bad)}. For OFT lora_rank is the block size: pick one that "
                         "divides the layers' output widths (e.g. 4, 8 or 16), or exclude those layers.")
    raise ValueError(f"{node}: lora_rank — LoKr with lora_rank {rank} factors {len(bad)} layer(s) into a Kronecker "
                     f"product whose factors hold as many numbers as the weight itself: {_listing(bad)}. For LoKr "
                     "lora_rank is the Kronecker factor: pick one that divides the layer widths (e.g. 4, 8 or 16).")


def _rank_unused(targets: Sequence[Target], algorithm: str, rank: int) -> list[str]:
    """The weight layers on which ``rank`` does not mean what it says: a LoRA / LoHa rank above the layer's
    smaller width (the extra rank adds nothing), a LoKr factor that ComfyUI's ``factorization`` does not take (it
    picks another one)."""
    out = []
    for t in targets:
        if t.kind != "weight":
            continue
        out_dim, in_dim = t.shape[0], math.prod(t.shape[1:])
        if algorithm in ("LoRA", "LoHa") and rank > min(out_dim, in_dim):
            out.append(f"{t.name} ({out_dim}x{in_dim})")
        elif algorithm == "LoKr" and not all(d % rank == 0 and d >= rank * rank for d in (out_dim, in_dim)):
            out.append(f"{t.name} ({out_dim}x{in_dim})")
    return out


def rank_warnings(targets: Sequence[Target], algorithm: str, rank: int) -> list[str]:
    """A note when ``rank`` means nothing on some (not all: :func:`check_rank` refuses that) of the layers."""
    useless = _rank_unused(targets, algorithm, rank)
    if not useless:
        return []
    if algorithm == "LoKr":
        return [f"lora_rank — LoKr factor {rank} does not fit {len(useless)} layer(s), which get another "
                f"factorisation: {_listing(useless)}"]
    return [f"lora_rank — {algorithm} rank {rank} is above the smaller width of {len(useless)} layer(s), where the "
            f"extra rank trains nothing: {_listing(useless)}"]


# ---------------------------------------------------------------------------------------------- the modules
def _fresh_module(t: Target, algorithm: str, rank: int, alpha: float):
    """A new training module of ComfyUI's for ``t`` (random numbers from the current RNG)."""
    if t.kind != "weight":
        return core.bias_diff_class()(torch.nn.Parameter(torch.zeros(t.shape)))
    wa, _ = core.weight_adapter()
    if algorithm == "LoRA":
        # ComfyUI's create_train draws ``up`` and zeroes ``down``; this pack has always drawn ``down``
        # (kaiming-uniform, as nn.Linear) and zeroed ``up``, so a seed gives the same LoRA as before.
        LoraDiff = core.lora_diff_class()
        out_dim, in_dim = t.shape[0], math.prod(t.shape[1:])
        down = torch.empty(rank, in_dim)
        torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        up = torch.zeros(out_dim, rank)
        with torch.random.fork_rng(devices=[]):  # LoraDiff's nn.Linear init draws numbers it then overwrites
            return LoraDiff((up, down, float(alpha), None, None, None))
    shape_only = torch.zeros(()).expand(t.shape)  # create_train reads the shape and device only
    return wa.adapter_maps[algorithm].create_train(shape_only, rank=rank, alpha=float(alpha))


class AdapterSwitch:
    """The weight function installed on a layer: the ComfyUI training module while the set is enabled, the weight
    unchanged while it is disabled (the reference policy)."""

    def __init__(self, owner: "ComfyAdapterSet", module: torch.nn.Module):
        self.owner, self.module = owner, module

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.owner.enabled:
            return weight
        return self.module(weight)

    def move_to(self, device=None) -> int:
        # The module stays on the compute device: its AdamW state lives there, and moving the parameters during
        # a partial unload would put them on another device than their optimizer state. It is small.
        return self.passive_memory_usage()

    def passive_memory_usage(self) -> int:
        return self.module.passive_memory_usage()


def _algorithm_and_rank(params: dict) -> tuple[str, int] | None:
    """``(algorithm, the number lora_rank stands for)`` of one training module from its parameters by name (a
    module's ``state_dict()`` or a checkpoint's ``adapters.<i>.*``): LoRA / LoHa the inner dimension, OFT the block
    size, LoKr the first Kronecker factor's rows (the factor, where it divides the width); None for a bias / norm
    delta."""
    if "lora_down.weight" in params:
        return "LoRA", int(params["lora_down.weight"].shape[0])
    if "hada_w1_b" in params:
        return "LoHa", int(params["hada_w1_b"].shape[0])
    if "oft_blocks" in params:
        return "OFT", int(params["oft_blocks"].shape[-1])
    w1 = params.get("lokr_w1", params.get("lokr_w1_a"))
    if w1 is not None:
        return "LoKr", int(w1.shape[0])
    return None


def describe_tensors(modules: Iterable[dict]) -> dict:
    """``{"algorithm", "rank", "alpha", "layers", "bias_norm_deltas"}`` of training modules given as their
    parameters by name (a list where they differ): what a file or checkpoint of them holds, whatever was asked."""
    algos, ranks, alphas, layers, deltas = [], [], [], 0, 0
    for params in modules:
        found = _algorithm_and_rank(params)
        if found is None:
            deltas += 1
            continue
        layers += 1
        alpha = float(params["alpha"]) if "alpha" in params else None
        for seen, value in ((algos, found[0]), (ranks, found[1]), (alphas, alpha)):
            if value not in seen:
                seen.append(value)
    one = lambda xs: xs[0] if len(xs) == 1 else (sorted(xs, key=str) if xs else None)  # noqa: E731
    return {"algorithm": "+".join(algos) if algos else None, "rank": one(ranks), "alpha": one(alphas),
            "layers": layers, "bias_norm_deltas": deltas}


def describe_modules(modules: Iterable[torch.nn.Module]) -> dict:
    """``{"algorithm", "rank", "alpha"}`` of what the modules hold (:func:`describe_tensors`)."""
    d = describe_tensors(dict(m.state_dict()) for m in modules)
    return {k: d[k] for k in ("algorithm", "rank", "alpha")}


class ComfyAdapterSet(torch.nn.Module):
    """ComfyUI training modules on the layers of one diffusion model (:class:`branchgrpo.lora.TrainableAdapter`).

    ``targets[i]`` is trained by ``adapters[i]``; ``kinds[i]`` says what the module is ("lora", "loha", "lokr",
    "oft" or "diff" / "diff_b"). :meth:`state_dict` (the checkpoint) is the modules' own; tensors of another
    shape, another algorithm or other layers make :meth:`load_state_dict` raise ``RuntimeError``."""

    def __init__(self, targets: Sequence[Target], modules: Sequence[torch.nn.Module], kinds: Sequence[str],
                 algorithm: str, rank: int, alpha: float):
        super().__init__()
        self.targets = list(targets)
        self.adapters = torch.nn.ModuleList(modules)
        self.kinds = list(kinds)
        self.algorithm, self.rank, self.alpha = algorithm, rank, alpha
        self._enabled = True

    # -- protocol ---------------------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self._enabled

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        previous, self._enabled = self._enabled, False
        try:
            yield
        finally:
            self._enabled = previous

    def comfy_state_dict(self) -> dict[str, torch.Tensor]:
        """``diffusion_model.<module>.<parameter>`` as ComfyUI's trainer builds its ``lora_sd``: CPU copies."""
        sd: dict[str, torch.Tensor] = {}
        for t, m, kind in zip(self.targets, self.adapters, self.kinds):
            if kind in ("diff", "diff_b"):
                sd[f"{PREFIX}{t.name}.{kind}"] = m.bias.detach().to("cpu", copy=True).contiguous()
                continue
            for pname, p in m.named_parameters():
                sd[f"{PREFIX}{t.name}.{pname}"] = p.detach().to("cpu", copy=True).contiguous()
        return sd

    # -- conveniences -----------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The Linear layers carrying an adapter of the algorithm (module names relative to diffusion_model)."""
        return [t.name for t, k in zip(self.targets, self.kinds) if k not in ("diff", "diff_b")]

    def adapter(self, name: str, kind: str = "weight") -> torch.nn.Module:
        for t, m in zip(self.targets, self.adapters):
            if t.name == name and t.kind == kind:
                return m
        raise KeyError(f"{name!r} ({kind}) is not trained by this adapter set")

    def delta(self, name: str) -> torch.Tensor:
        """The update of layer ``name``'s weight in fp32 (``module(W) - W`` at ``W = 0`` for additive adapters)."""
        m = self.adapter(name)
        t = next(t for t in self.targets if t.name == name and t.kind == "weight")
        zero = torch.zeros(t.shape, device=next(m.parameters()).device)
        return m(zero).float()

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def stored(self) -> dict:
        """What the set's tensors are (:func:`describe_modules`): a continued file keeps its own algorithm and rank."""
        return describe_modules(self.adapters)

    def extra_repr(self) -> str:
        return f"algorithm={self.algorithm}, rank={self.rank}, alpha={self.alpha:g}, tensors={len(self.targets)}"


def describe_state(state: dict) -> dict:
    """:func:`describe_tensors` of a checkpoint's adapter state (``adapters.<i>.<parameter>`` keys): what a resume
    compares with the run it is asked to be."""
    params: dict[int, dict] = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) >= 3 and parts[0] == "adapters" and parts[1].isdigit():
            params.setdefault(int(parts[1]), {})[".".join(parts[2:])] = value
    return describe_tensors(params[i] for i in sorted(params))


def describe_set(adapter_set: "ComfyAdapterSet") -> dict:
    """:func:`describe_state` of a set, from its own state (the same keys a checkpoint holds)."""
    return describe_state(adapter_set.state_dict())


# ---------------------------------------------------------------------------------------------- continuing a file
@dataclass
class LoadedFile:
    """A LoRA file turned into training modules: ``modules[(name, kind)]`` (kind "weight", "diff", "diff_b")."""
    path: str
    modules: dict
    kinds: dict
    metadata: dict
    ignored: list

    def stored(self) -> dict:
        return describe_modules(self.modules[k] for k in sorted(self.modules))


def _neutral_alpha(adapter) -> float:
    """The alpha that makes a training module scale as the stock loader does when the file has no ``.alpha``."""
    name, w = adapter.name, adapter.weights
    if name == "lora":
        return float(w[1].shape[0])
    if name == "loha":
        return float(w[1].shape[0])
    if name == "lokr":
        w1_b, w2_b = w[4], w[6]
        return float((w2_b if w2_b is not None else w1_b).shape[0]) if (w1_b is not None or w2_b is not None) else 1.0
    return 0.0  # oft: no constraint


def load_lora_for_training(model_patcher, path: str, node: str = NODE, field: str = "continue_lora") -> LoadedFile:
    """:func:`_load_for_training` outside inference mode (ComfyUI runs nodes in it), so the modules can train."""
    with torch.inference_mode(False):
        return _load_for_training(model_patcher, path, node, field)


def read_lora_file(path: str, node: str = NODE, field: str = "continue_lora") -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a LoRA file, or an error naming the node, the field, what is wrong with the file
    and what to do: unreadable (not a safetensors file, cut short, corrupt) or empty."""
    fname = os.path.basename(path)
    fix = f"Pick another file, or set {field} to none to train a new LoRA."
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise ValueError(f"{node}: {field} — {fname} cannot be read ({e.strerror}). {fix}") from None
    if size < 8:
        raise ValueError(f"{node}: {field} — {fname} is {size} bytes long: it is not a LoRA file (a safetensors "
                         f"file starts with an 8-byte header length). {fix}")
    try:
        sd, metadata = core.utils.load_torch_file(path, safe_load=True, return_metadata=True)
    except Exception as e:  # noqa: BLE001 - safetensors / torch raise their own types for a bad file
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"{node}: {field} — {fname} ({size} bytes) is not a readable LoRA file: "
                         f"{type(e).__name__}: {first}. It may be cut short by a failed download or copy, or not be a "
                         f"safetensors file at all. {fix}") from None
    tensors = {k: v for k, v in (sd or {}).items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{node}: {field} — {fname} holds no tensors (an empty LoRA file). {fix}")
    return tensors, dict(metadata or {})


def _load_for_training(model_patcher, path: str, node: str, field: str) -> LoadedFile:
    """Read a LoRA file of any algorithm for this MODEL: its keys mapped to the model's weights with ComfyUI's own
    key map (``comfy.lora.model_lora_keys_unet``: ComfyUI, kohya and diffusers names), each module's adapter found
    with ``adapter.load`` over ``comfy.weight_adapter.adapters`` and turned into its training module
    (``to_train()``); ``.diff`` / ``.diff_b`` become ``BiasDiff`` modules. Keys that map to no weight of the
    diffusion model (a text encoder's part of the file) are ignored with a warning; a file that maps to nothing,
    a DoRA file, or an adapter ComfyUI cannot train is refused."""
    wa, _ = core.weight_adapter()
    fname = os.path.basename(path)
    family = type(model_patcher.model).__name__
    sd, metadata = read_lora_file(path, node, field)
    key_map = core.lora.model_lora_keys_unet(model_patcher.model, {})
    prefixes = set()
    for k in sd:
        parts = k.split(".")
        prefixes.update(".".join(parts[:i]) for i in range(1, len(parts)))
    dm = model_patcher.model.diffusion_model
    modules: dict = {}
    kinds: dict = {}
    loaded: set[str] = set()
    problems: list[str] = []
    for x in sorted(prefixes & set(key_map)):
        target = key_map[x]
        if not target.startswith(PREFIX) or not target.endswith(".weight"):
            continue
        name = target[len(PREFIX):-len(".weight")]
        try:
            module = dm.get_submodule(name)
        except AttributeError:
            continue
        alpha_t = sd.get(f"{x}.alpha")
        alpha = float(alpha_t.item()) if alpha_t is not None else None
        if f"{x}.dora_scale" in sd:
            raise ValueError(f"{node}: {field} — {fname} is a DoRA file (it has {x}.dora_scale): ComfyUI's training "
                             "modules do not train DoRA's magnitude, so it cannot be continued here. Train it with "
                             "the command line (peft), or set continue_lora to none.")
        found = None
        for cls in wa.adapters:
            found = cls.load(x, sd, alpha, None, set())
            if found is not None:
                break
        if found is not None:
            if not hasattr(module, "weight_function"):
                problems.append(f"{target} ({type(module).__name__} takes no weight function)")
                continue
            if alpha is None:
                w = list(found.weights)
                w[2] = _neutral_alpha(found)
                found.weights = tuple(w)
            if found.name == "lokr" and found.weights[3] is not None and found.weights[5] is not None:
                # both Kronecker factors low-rank: LokrDiff scales each by alpha / its rank, the stock loader the
                # product once by alpha / (w2's rank); continue only where the two agree
                a, ra, rb = float(found.weights[2]), found.weights[4].shape[0], found.weights[6].shape[0]
                if not math.isclose((a / ra) * (a / rb), (alpha / rb) if alpha is not None else 1.0, rel_tol=1e-6):
                    raise ValueError(f"{node}: {field} — {fname}: the LoKr adapter {x} has both Kronecker factors in "
                                     "low-rank form, which ComfyUI's training module scales differently from its "
                                     "loader; it cannot be continued exactly. Set continue_lora to none.")
            try:
                train = found.to_train()
            except NotImplementedError:
                raise ValueError(f"{node}: {field} — {fname} holds {found.name} adapters (e.g. {x}), which ComfyUI "
                                 f"cannot train (its trainer offers {', '.join(ALGORITHMS)}); set continue_lora to "
                                 "none.") from None
            train = train.float()
            try:
                with torch.no_grad():
                    train(torch.zeros(tuple(module.weight.shape)))
            except RuntimeError as e:
                raise ValueError(f"{node}: {field} — {fname}: the {found.name} adapter {x} does not fit "
                                 f"{target} {tuple(module.weight.shape)} ({str(e).splitlines()[0]}); the file was "
                                 f"made for another model than this {family}.") from None
            modules[(name, "weight")] = train
            kinds[(name, "weight")] = found.name
            loaded.update(found.loaded_keys)
            if alpha_t is not None:
                loaded.add(f"{x}.alpha")
        for suffix, kind, tensor_of in ((".diff", "diff", module.weight if hasattr(module, "weight") else None),
                                        (".diff_b", "diff_b", getattr(module, "bias", None))):
            key = x + suffix
            if key not in sd:
                continue
            if tensor_of is None or not hasattr(module, "weight_function") or tuple(sd[key].shape) != tuple(tensor_of.shape):
                problems.append(f"{key} ({tuple(sd[key].shape)})")
                continue
            modules[(name, kind)] = core.bias_diff_class()(torch.nn.Parameter(sd[key].detach().float().clone()))
            kinds[(name, kind)] = kind
            loaded.add(key)
    if problems:
        raise ValueError(f"{node}: {field} — {fname} holds tensors that do not fit this {family} model: "
                         f"{_listing(problems)}; the file was made for another model. Pick a LoRA of this model, or "
                         "set continue_lora to none.")
    if not modules:
        raise ValueError(f"{node}: {field} — {fname} maps to no weight of this {family} model (its keys start "
                         f"{_listing(sorted(sd)[:3])}); it was made for another model family. Pick a LoRA trained "
                         "for this model, or set continue_lora to none to train a new one.")
    ignored = sorted(k for k in sd if k not in loaded)
    if ignored:
        log.warning("BranchGRPO: %s — %d key(s) of %s map to no weight of the diffusion model and are not continued "
                    "(e.g. a text encoder's part): %s", field, len(ignored), fname, _listing(ignored))
    return LoadedFile(path, modules, kinds, metadata, ignored)


# ---------------------------------------------------------------------------------------------- attaching
def prepare_base_for_training(model) -> int:
    """Freeze the base weights and turn inference tensors into normal ones (same values, in place).

    ComfyUI loads weights under ``torch.inference_mode``; autograd cannot save such tensors for the
    backward pass, which every frozen layer above an adapted layer needs. Returns how many were converted.
    """
    converted = 0
    with torch.inference_mode(False):
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is None:
                    continue
                if p.is_inference():
                    module._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
                    converted += 1
                else:
                    p.requires_grad_(False)
            for name, b in list(module._buffers.items()):
                if b is not None and b.is_inference():
                    module._buffers[name] = b.clone()
                    converted += 1
    return converted


def build_adapters(diffusion_model, config: LoRAConfig, *, algorithm: str = "LoRA", seed: int = 0,
                   train_bias_norm: bool = False, existing: LoadedFile | None = None,
                   node: str = NODE) -> ComfyAdapterSet:
    """The set for ``diffusion_model`` on the CPU: the file's modules where ``existing`` covers a tensor (the file
    wins, also over ``algorithm`` and outside ``lora_targets``), fresh ``algorithm`` modules elsewhere (seeded)."""
    targets = plan_targets(diffusion_model, config, train_bias_norm=train_bias_norm)
    check_rank(targets, algorithm, config.rank, node)
    if existing is not None:
        have = {(t.name, t.kind) for t in targets}
        for (name, kind) in sorted(existing.modules):
            if (name, kind) not in have:
                m = diffusion_model.get_submodule(name)
                shape = tuple((m.weight if kind != "diff_b" else m.bias).shape)
                targets.append(Target(name, kind, shape))
    wa, _ = core.weight_adapter()
    modules, kinds = [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for t in targets:
            key = (t.name, t.kind)
            if existing is not None and key in existing.modules:
                modules.append(existing.modules[key])
                kinds.append(existing.kinds[key])
            else:
                modules.append(_fresh_module(t, algorithm, config.rank, config.alpha))
                kinds.append(t.kind if t.kind != "weight" else wa.adapter_maps[algorithm].name)
    for m in modules:
        for pname, p in m.named_parameters():
            p.requires_grad_(pname != "alpha")  # alpha is stored with the module, never trained
    return ComfyAdapterSet(targets, modules, kinds, algorithm, config.rank, config.alpha)


def attach_adapters(model_patcher, config: LoRAConfig, *, seed: int, device, algorithm: str = "LoRA",
                    train_bias_norm: bool = False, existing: LoadedFile | None = None, node: str = NODE):
    """Clone ``model_patcher`` and attach a :class:`ComfyAdapterSet` to the clone's layers (weight wrappers for the
    weights, bias functions for ``.diff_b``). Returns ``(clone, set)``; the input MODEL is not modified."""
    prepare_base_for_training(model_patcher.model)
    mp = model_patcher.clone()
    adapters = build_adapters(mp.model.diffusion_model, config, algorithm=algorithm, seed=seed,
                              train_bias_norm=train_bias_norm, existing=existing, node=node)
    device = torch.device(device)
    if any(p.device != device for p in adapters.parameters()):  # (built on the CPU: seeded numbers on any device)
        adapters.to(device)
    for t, m in zip(adapters.targets, adapters.adapters):
        key = f"{PREFIX}{t.name}.{'bias' if t.kind == 'diff_b' else 'weight'}"
        mp.add_weight_wrapper(key, AdapterSwitch(adapters, m))
    return mp, adapters


def count_trainable(diffusion_model, config: LoRAConfig, *, algorithm: str = "LoRA",
                    train_bias_norm: bool = False, existing: LoadedFile | None = None) -> int:
    """Trainable numbers of the set :func:`build_adapters` would build (fresh modules built on fake tensors: no
    memory); with ``existing`` (a file to continue), the file's modules count where they cover a tensor, at the
    file's rank and algorithm, as in :func:`build_adapters`."""
    covered = set(existing.modules) if existing is not None else set()
    with FakeTensorMode(allow_non_fake_inputs=True):
        targets = plan_targets(diffusion_model, config, train_bias_norm=train_bias_norm)
        total = 0
        for t in targets:
            if (t.name, t.kind) in covered:
                continue
            m = _fresh_module(t, algorithm, config.rank, config.alpha)
            total += sum(p.numel() for n, p in m.named_parameters() if n != "alpha")
    if existing is not None:
        total += sum(p.numel() for m in existing.modules.values() for n, p in m.named_parameters() if n != "alpha")
    return int(total)


__all__ = ["ALGORITHMS", "ComfyAdapterSet", "AdapterSwitch", "Target", "LoadedFile", "plan_targets", "check_rank",
           "build_adapters", "attach_adapters", "load_lora_for_training", "count_trainable",
           "prepare_base_for_training"]
