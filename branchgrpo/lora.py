"""What the engine needs of an adapter, which modules an adapter takes, and adapter files.

* :class:`TrainableAdapter`: the protocol the trainer talks to (parameters, the disabled reference, its
  checkpoint state, its tensors in ComfyUI's key format). The ComfyUI nodes implement it with
  ``comfy.weight_adapter``'s adapters (``nodes/``), the headless path with ``peft``'s
  (:mod:`branchgrpo.peft_adapter`);
* :class:`LoRAConfig` and :func:`select_linear`: rank, alpha and the ``nn.Linear`` modules adapted (globs on
  module names);
* :func:`save_state_dict` / :func:`load_lora_file`: ``.safetensors`` files in ComfyUI's LoRA key format,
  written atomically. The diffusers -> ComfyUI module names are in
  :mod:`branchgrpo.models.diffusers_adapter` (``comfy_layout``).
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Iterator, Mapping, Protocol, runtime_checkable

from safetensors import safe_open
from safetensors import torch as safetensors_torch
from torch import Tensor, nn

from .fileio import atomic_write

__all__ = ["TrainableAdapter", "LoRAConfig", "select_linear", "save_state_dict", "load_lora_file"]


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

    def selects(self, name: str) -> bool:
        """Whether module ``name`` matches a target and no exclude pattern."""
        return (any(fnmatch.fnmatchcase(name, p) for p in self.targets)
                and not any(fnmatch.fnmatchcase(name, p) for p in self.exclude))


def select_linear(root: nn.Module, config: LoRAConfig) -> list[tuple[str, nn.Linear]]:
    """The ``(name, module)`` pairs of ``root`` a LoRA with ``config`` adapts, sorted by name."""
    return sorted((name, module) for name, module in root.named_modules()
                  if name and isinstance(module, nn.Linear) and config.selects(name))


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


# ---------------------------------------------------------------------- files


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
            raise TypeError(f"save_state_dict: metadata keys must be strings, got {k!r}")
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
