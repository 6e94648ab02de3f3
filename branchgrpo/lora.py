"""Low-rank adapters (LoRA) for the ``nn.Linear`` layers of a model.

A :class:`LoRA` owns one pair of matrices per adapted layer -- ``down`` ``[rank, in]`` and
``up`` ``[out, rank]`` -- whose product, times ``scale = alpha / rank``, is added to the
layer's weight. It holds parameters only; how they act is the caller's choice:

* :meth:`LoRA.attach` registers forward hooks, so a plain torch module is adapted in place
  (``output += scale * up(down(x))``), and :meth:`LoRA.disabled` switches them off for a
  reference forward;
* :meth:`LoRA.delta` gives the dense update ``scale * up @ down`` for callers that patch
  weights instead (ComfyUI weight wrappers).

Files use ComfyUI's LoRA key format (``<prefix>.<module>.lora_up.weight``,
``.lora_down.weight``, ``.alpha``), so a trained adapter loads in a stock LoRA loader.
:func:`save_lora` writes them atomically.
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator, Mapping, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors import torch as safetensors_torch
from torch import Tensor, nn

from .fileio import atomic_write

__all__ = ["TrainableAdapter", "LoRAConfig", "LoRA", "freeze_base", "save_lora", "save_state_dict", "load_lora_file"]

_UP = ".lora_up.weight"
_DOWN = ".lora_down.weight"
_ALPHA = ".alpha"
_LIST_LIMIT = 8  # how many names an error message lists before eliding the rest


@runtime_checkable
class TrainableAdapter(Protocol):
    """All the engine needs of an adapter, whatever implements it.

    ``comfy.weight_adapter``'s LoRA / LoHa / LoKr / OFT implement it in ``nodes/`` (weight wrappers on a
    ComfyUI MODEL); ``peft`` implements it on a torch module in the headless path. The trainer never
    looks inside: it optimises :meth:`parameters`, evaluates the reference policy under :meth:`disabled`,
    checkpoints :meth:`state_dict`, and the run's file is :meth:`comfy_state_dict`.
    """

    def parameters(self) -> Iterator[Tensor]:
        """The adapter's tensors; those with ``requires_grad`` are trained."""

    def disabled(self) -> ContextManager[None]:
        """Inside: the model acts as the base model (the KL / reference policy)."""

    def state_dict(self) -> Mapping[str, Tensor]:
        """Every tensor needed to restore the adapter exactly (the checkpoint's ``adapter`` entry)."""

    def load_state_dict(self, state: Mapping[str, Tensor]) -> Any:
        """Inverse of :meth:`state_dict`; tensors of another shape raise ``RuntimeError``."""

    def comfy_state_dict(self) -> dict[str, Tensor]:
        """The adapter in ComfyUI's key format (``diffusion_model.<module>.lora_up.weight``, ``.hada_w1_a``,
        ``.lokr_w1``, ``.oft_blocks``, ``.alpha``, ``.diff``, ``.diff_b``, ...): CPU tensors that the stock
        LoRA loaders consume completely."""


@dataclass
class LoRAConfig:
    """Which layers to adapt and how.

    ``targets`` and ``exclude`` are case-sensitive :mod:`fnmatch` globs on module names
    relative to the wrapped root (``*`` also matches dots, so ``"*.attn.*"`` reaches every
    nesting depth). A module is adapted when it is an ``nn.Linear`` (or subclass), matches a
    target and matches no exclude pattern.
    """

    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    init_std: float | None = None  # std of ``down``; None -> kaiming-uniform like nn.Linear

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field and how to fix it."""
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRAConfig.rank must be an integer >= 1 (got {self.rank!r}); typical values are 4-64")
        if not _is_real(self.alpha) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(
                f"LoRAConfig.alpha must be a finite number > 0 (got {self.alpha!r}); "
                f"scale = alpha / rank, so alpha = rank gives scale 1"
            )
        _check_patterns("targets", self.targets, allow_empty=False)
        _check_patterns("exclude", self.exclude, allow_empty=True)
        if self.init_std is not None and (
            not _is_real(self.init_std) or not math.isfinite(self.init_std) or self.init_std <= 0
        ):
            raise ValueError(
                f"LoRAConfig.init_std must be None (kaiming-uniform) or a finite number > 0 "
                f"(got {self.init_std!r})"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _matches(name: str, config: LoRAConfig) -> bool:
    return (any(fnmatch.fnmatchcase(name, p) for p in config.targets)
            and not any(fnmatch.fnmatchcase(name, p) for p in config.exclude))


def select_linear(root: nn.Module, config: LoRAConfig) -> list[tuple[str, nn.Linear]]:
    """The ``(name, module)`` pairs of ``root`` a LoRA with ``config`` adapts, sorted by name."""
    return sorted((name, module) for name, module in root.named_modules()
                  if name and isinstance(module, nn.Linear) and _matches(name, config))


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_patterns(field: str, patterns: Any, *, allow_empty: bool) -> None:
    if isinstance(patterns, str):
        raise ValueError(
            f"LoRAConfig.{field} must be a tuple of glob patterns, not a string; "
            f"write ({patterns!r},) instead of {patterns!r}"
        )
    if not isinstance(patterns, (tuple, list)) or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"LoRAConfig.{field} must be a tuple of non-empty glob strings (got {patterns!r})")
    if not patterns and not allow_empty:
        raise ValueError(f"LoRAConfig.{field} is empty, so nothing would be adapted; use ('*',) for every Linear")


def _escape_glob(name: str) -> str:
    """A glob pattern matching exactly ``name``."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _listing(items: Iterable[Any], quote: bool = True) -> str:
    """``'a', 'b', ... (n more)``: the first few items of a list for an error message."""
    items = list(items)
    shown = ", ".join(repr(i) if quote else str(i) for i in items[:_LIST_LIMIT])
    more = len(items) - _LIST_LIMIT
    return shown + (f", ... ({more} more)" if more > 0 else "")


class LoRAAdapter(nn.Module):
    """The two matrices of one adapted layer: ``down`` ``[rank, in]`` and ``up`` ``[out, rank]``."""

    def __init__(self, in_features: int, out_features: int, rank: int, *, dtype: torch.dtype,
                 device: torch.device | str | None, init_std: float | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.down = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.up = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        with torch.no_grad():
            if init_std is None:
                nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # nn.Linear's default
            else:
                nn.init.normal_(self.down, std=init_std)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def resize(self, rank: int, init_std: float | None) -> None:
        """Replace both matrices by freshly initialised ones of ``rank`` (same dtype, device, requires_grad)."""
        fresh = LoRAAdapter(self.in_features, self.out_features, rank, dtype=self.down.dtype,
                            device=self.down.device, init_std=init_std)
        fresh.down.requires_grad_(self.down.requires_grad)
        fresh.up.requires_grad_(self.up.requires_grad)
        self.down, self.up = fresh.down, fresh.up

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"


class LoRA(nn.Module):
    """Adapter weights for the Linear layers of a root module.

    Holds parameters only; how they act is chosen by the caller: :meth:`attach` registers
    forward hooks (``output += scale * up(down(x))``) so a plain torch module is adapted in
    place; :meth:`delta` gives the dense weight update ``scale * up @ down`` for callers that
    patch weights instead (ComfyUI weight wrappers).

    ``up`` starts at zero, so a fresh adapter leaves the model's outputs unchanged. The root
    is not stored and not frozen (see :func:`freeze_base`); move the adapter to the model's
    device with ``lora.to(device)``. The hooks compute in the adapter's dtype and cast the
    result to the layer's output dtype, also under autocast, so a bf16 model can carry fp32
    adapters.

    Gradient checkpointing: the hooks run again when ``torch.utils.checkpoint`` recomputes a
    segment. With ``use_reentrant=False`` this needs nothing more; with ``use_reentrant=True``
    some input of the segment must require grad (as always with reentrant checkpointing),
    otherwise no gradient reaches the adapter. The :meth:`disabled` switch is read when the
    forward runs, so run a checkpointed backward with the switch as it was for its forward.
    """

    def __init__(self, root: nn.Module, config: LoRAConfig, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, seed: int | None = None) -> None:
        """``seed`` makes the initialisation of ``down`` reproducible without touching the global RNG."""
        super().__init__()
        config.validate()
        self.config = config
        found = select_linear(root, config)
        if not found:
            raise ValueError(self._no_match_message(root))
        self.names: list[str] = [name for name, _ in found]
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self.adapters = nn.ModuleList(
                LoRAAdapter(m.in_features, m.out_features, config.rank, dtype=dtype, device=device,
                            init_std=config.init_std)
                for _, m in found
            )
        self._index = {name: i for i, name in enumerate(self.names)}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._enabled = True

    # ------------------------------------------------------------------ selection

    def _selected(self, name: str) -> bool:
        return _matches(name, self.config)

    def _no_match_message(self, root: nn.Module) -> str:
        c = self.config
        linears = [n for n, m in root.named_modules() if n and isinstance(m, nn.Linear)]
        head = f"LoRA: no nn.Linear module matches targets={c.targets!r}"
        head += f" minus exclude={c.exclude!r}" if c.exclude else ""
        if linears:
            return (f"{head}. {len(linears)} Linear modules are available, e.g. {_listing(linears)}; "
                    f"patterns are fnmatch globs on these names ('*' also matches dots)")
        others = [f"{n} ({type(m).__name__})" for n, m in root.named_modules() if n]
        return (f"{head}: {type(root).__name__} contains no nn.Linear at all"
                + (f"; its modules include {_listing(others)}" if others else ""))

    # ------------------------------------------------------------------ accessors

    @property
    def scale(self) -> float:
        """``alpha / rank``, the factor applied to ``up @ down``."""
        return self.config.scale

    @property
    def rank(self) -> int:
        return self.config.rank

    @property
    def alpha(self) -> float:
        return self.config.alpha

    def adapter(self, name: str) -> LoRAAdapter:
        """The ``down``/``up`` pair of the adapted module ``name``."""
        try:
            return self.adapters[self._index[name]]
        except KeyError:
            raise KeyError(f"{name!r} is not adapted by this LoRA; adapted modules: {_listing(self.names)}") from None

    @property
    def enabled(self) -> bool:
        """False inside :meth:`disabled` (weight wrappers and hooks then contribute nothing)."""
        return self._enabled

    def delta(self, name: str) -> Tensor:
        """Dense weight update ``scale * up @ down`` ``[out, in]`` (adapter dtype/device, differentiable)."""
        a = self.adapter(name)
        return (a.up @ a.down) * self.scale

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, modules={len(self.names)}, attached={self.attached}"

    # ------------------------------------------------------------------ hooks

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, root: nn.Module) -> None:
        """Adapt ``root`` in place with forward hooks on the adapted Linear modules.

        ``root`` must have the layout this LoRA was built for (same names, same Linear
        shapes). Idempotent: hooks of a previous :meth:`attach` (to this or another root)
        are removed first, so a LoRA is attached to at most one root at a time.
        """
        modules: list[nn.Module] = []
        problems: list[str] = []
        for name, adapter in zip(self.names, self.adapters):
            try:
                module = root.get_submodule(name)
            except AttributeError:
                problems.append(f"{name!r} is missing")
                continue
            if not isinstance(module, nn.Linear):
                problems.append(f"{name!r} is a {type(module).__name__}, not an nn.Linear")
            elif (module.in_features, module.out_features) != (adapter.in_features, adapter.out_features):
                problems.append(f"{name!r} is {module.in_features}->{module.out_features}, "
                                f"the adapter {adapter.in_features}->{adapter.out_features}")
            modules.append(module)
        if problems:
            raise ValueError(f"LoRA.attach: root does not fit this adapter: {_listing(problems, quote=False)}")
        self.detach()
        self._handles = [
            module.register_forward_hook(self._make_hook(adapter), with_kwargs=True)
            for module, adapter in zip(modules, self.adapters)
        ]

    def detach(self) -> None:
        """Remove the hooks of :meth:`attach` (no-op when not attached)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Inside, the attached adapters contribute nothing (e.g. for a KL reference forward)."""
        previous = self._enabled
        self._enabled = False
        try:
            yield
        finally:
            self._enabled = previous

    def _make_hook(self, adapter: LoRAAdapter) -> Callable[..., Tensor | None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Tensor | None:
            if not self._enabled:
                return None
            x = args[0] if args else kwargs["input"]
            if not isinstance(output, Tensor):
                raise TypeError(f"LoRA hook expects a Tensor output from {type(module).__name__}, "
                                f"got {type(output).__name__}")
            if x.device != adapter.down.device:
                raise RuntimeError(f"LoRA adapter is on {adapter.down.device} but the layer input is on "
                                   f"{x.device}; move the adapter with lora.to({str(x.device)!r})")
            with _autocast_off(x.device.type):
                h = F.linear(x.to(adapter.down.dtype), adapter.down) * self.scale
                h = F.linear(h, adapter.up)
            return output + h.to(output.dtype)

        return hook

    # ------------------------------------------------------------------ ComfyUI format

    def comfy_state_dict(self) -> dict[str, Tensor]:
        """:class:`TrainableAdapter`: :meth:`to_comfy_state_dict` with the ``diffusion_model`` prefix."""
        return self.to_comfy_state_dict()

    def to_comfy_state_dict(self, prefix: str = "diffusion_model") -> dict[str, Tensor]:
        """Tensors in ComfyUI's LoRA key format: contiguous CPU copies in the adapter dtype.

        Keys per adapted module: ``{prefix}.{name}.lora_up.weight`` ``[out, rank]``,
        ``{prefix}.{name}.lora_down.weight`` ``[rank, in]`` and ``{prefix}.{name}.alpha``
        (0-dim float32).
        """
        sd: dict[str, Tensor] = {}
        for name, a in zip(self.names, self.adapters):
            base = _key(prefix, name)
            sd[base + _UP] = a.up.detach().to("cpu", copy=True).contiguous()
            sd[base + _DOWN] = a.down.detach().to("cpu", copy=True).contiguous()
            sd[base + _ALPHA] = torch.tensor(float(self.alpha), dtype=torch.float32)
        return sd

    def load_comfy_state_dict(self, sd: Mapping[str, Tensor], prefix: str = "diffusion_model",
                              strict: bool = True) -> None:
        """Inverse of :meth:`to_comfy_state_dict`.

        ``strict``: any missing or unexpected key is a ``ValueError`` listing them. Otherwise
        keys of other modules are ignored and adapters absent from ``sd`` are kept (or, when
        the rank changes, re-initialised so they contribute nothing). A missing ``.alpha``
        means ``alpha = rank`` (ComfyUI's convention). When the file's rank or alpha differ
        from the config, the file's are adopted (the config is replaced, and on a rank change
        the parameters are new tensors: rebuild any optimizer) -- provided every matrix fits
        its module; otherwise nothing is changed and a ``ValueError`` explains the mismatch.
        """
        expected = {_key(prefix, n) + s for n in self.names for s in (_UP, _DOWN, _ALPHA)}
        if strict:
            missing = sorted(k for k in expected if k not in sd)
            unexpected = [k for k in sd if k not in expected]
            if missing or unexpected:
                parts = []
                if missing:
                    parts.append(f"{len(missing)} missing key(s): {_listing(missing)}")
                if unexpected:
                    parts.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
                raise ValueError("LoRA.load_comfy_state_dict (strict): " + "; ".join(parts)
                                 + f". The file may be for another model, or saved with another prefix "
                                   f"than {prefix!r}; strict=False loads the matching adapters only")

        loaded: dict[str, tuple[Tensor, Tensor]] = {}
        incomplete, mismatched = [], []
        for name, a in zip(self.names, self.adapters):
            base = _key(prefix, name)
            up, down = sd.get(base + _UP), sd.get(base + _DOWN)
            if up is None and down is None:
                continue
            if up is None or down is None:
                incomplete.append(name)
                continue
            if (up.ndim != 2 or down.ndim != 2 or up.shape[0] != a.out_features
                    or down.shape[1] != a.in_features or up.shape[1] != down.shape[0]):
                mismatched.append(f"{name}: up {tuple(up.shape)}, down {tuple(down.shape)} "
                                  f"(module is {a.in_features}->{a.out_features})")
                continue
            loaded[name] = (up, down)
        if incomplete:
            raise ValueError(f"LoRA.load_comfy_state_dict: lora_up and lora_down must come in pairs; "
                             f"only one of them is present for {_listing(incomplete)}")
        if mismatched:
            raise ValueError(f"LoRA.load_comfy_state_dict: matrices do not fit the modules "
                             f"(expected up [out, r], down [r, in]): {_listing(mismatched, quote=False)}. "
                             f"The file was made for a different model")
        if not loaded:
            raise ValueError(f"LoRA.load_comfy_state_dict: no adapter of this LoRA is in the state dict "
                             f"under prefix {prefix!r}; its keys include {_listing(sd)}")

        ranks = {name: up.shape[1] for name, (up, _) in loaded.items()}
        if len(set(ranks.values())) > 1:
            raise ValueError(f"LoRA.load_comfy_state_dict: the file mixes ranks {sorted(set(ranks.values()))}; "
                             f"one LoRA holds a single rank")
        rank = next(iter(ranks.values()))
        alphas = {}
        for name in loaded:
            t = sd.get(_key(prefix, name) + _ALPHA)
            if t is not None and t.numel() != 1:
                raise ValueError(f"LoRA.load_comfy_state_dict: {_key(prefix, name) + _ALPHA} must hold one "
                                 f"number, got shape {tuple(t.shape)}")
            alphas[name] = float(t.item()) if t is not None else float(rank)
        alpha = next(iter(alphas.values()))
        if not all(math.isclose(v, alpha, rel_tol=1e-6) for v in alphas.values()):
            raise ValueError(f"LoRA.load_comfy_state_dict: the file mixes alphas "
                             f"{sorted(set(alphas.values()))}; one LoRA holds a single alpha")
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"LoRA.load_comfy_state_dict: the file's alpha {alpha} is not a positive number")

        # Everything checked: now mutate.
        if math.isclose(alpha, self.alpha, rel_tol=1e-6):
            alpha = self.alpha  # float32 storage of e.g. 0.1 is not a config change
        if rank != self.rank or alpha != self.alpha:
            self.config = replace(self.config, rank=rank, alpha=alpha)
        with torch.no_grad():
            for name, a in zip(self.names, self.adapters):
                if a.rank != rank:
                    a.resize(rank, self.config.init_std)
                if name in loaded:
                    up, down = loaded[name]
                    a.up.copy_(up)
                    a.down.copy_(down)

    @classmethod
    def from_comfy_state_dict(cls, root: nn.Module, sd: Mapping[str, Tensor], prefix: str = "diffusion_model",
                              *, dtype: torch.dtype = torch.float32,
                              device: torch.device | str | None = None) -> "LoRA":
        """Build a LoRA for ``root`` from a ComfyUI-format state dict, inferring rank, alpha and targets."""
        start = f"{prefix}." if prefix else ""
        names = sorted(k[len(start):-len(_DOWN)] for k in sd if k.startswith(start) and k.endswith(_DOWN))
        if not names:
            raise ValueError(f"LoRA.from_comfy_state_dict: no '{start}<module>{_DOWN}' key; "
                             f"the state dict's keys include {_listing(sd)}")
        first = _key(prefix, names[0])
        rank = int(sd[first + _DOWN].shape[0])
        alpha_t = sd.get(first + _ALPHA)
        alpha = float(alpha_t.item()) if alpha_t is not None else float(rank)
        config = LoRAConfig(rank=rank, alpha=alpha, targets=tuple(_escape_glob(n) for n in names))
        lora = cls(root, config, dtype=dtype, device=device)
        absent = [n for n in names if n not in lora._index]
        if absent:
            raise ValueError(f"LoRA.from_comfy_state_dict: the state dict adapts modules that are not "
                             f"nn.Linear modules of root: {_listing(absent)}")
        lora.load_comfy_state_dict(sd, prefix=prefix, strict=True)
        return lora


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@contextmanager
def _autocast_off(device_type: str) -> Iterator[None]:
    """Disable autocast for ``device_type`` if it is on there, so the adapter runs in its own dtype."""
    try:
        active = torch.is_autocast_enabled(device_type)
    except (RuntimeError, TypeError):  # device types autocast does not know
        active = False
    with torch.autocast(device_type=device_type, enabled=False) if active else nullcontext():
        yield


def freeze_base(root: nn.Module) -> None:
    """Set ``requires_grad = False`` on every parameter of ``root`` (the adapter is not part of it)."""
    for p in root.parameters():
        p.requires_grad_(False)


# ---------------------------------------------------------------------- files


def save_lora(path: str | os.PathLike, lora: LoRA, metadata: Mapping[str, Any] | None = None,
              prefix: str = "diffusion_model") -> None:
    """Write ``lora`` as a ComfyUI-format ``.safetensors`` file, atomically (see :func:`save_state_dict`)."""
    save_state_dict(path, lora.to_comfy_state_dict(prefix), metadata)


def save_state_dict(path: str | os.PathLike, tensors: Mapping[str, Tensor],
                    metadata: Mapping[str, Any] | None = None) -> None:
    """Write tensors as ``.safetensors``, atomically.

    The file is written to a temporary name in the target directory, fsynced, then renamed
    over ``path``: a failure leaves no partial file and any older file at ``path`` intact.
    Metadata values that are not strings are JSON-encoded. Missing parent directories are
    created.
    """
    path = Path(path)
    meta: dict[str, str] = {}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str):
            raise TypeError(f"save_lora: metadata keys must be strings, got {k!r}")
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    data = safetensors_torch.save(tensors, metadata=meta)
    atomic_write(path, lambda fh: fh.write(data))


def load_lora_file(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors (on CPU) and string metadata of a ``.safetensors`` file."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, metadata
