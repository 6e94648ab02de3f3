"""The headless path's adapters: ``peft``'s LoRA, DoRA, LoHa, LoKr and OFT on any torch module.

:class:`PeftAdapter` injects one ``peft`` adapter into a model in place (``peft.inject_adapter_in_model``
on the modules :func:`~branchgrpo.lora.select_linear` picks) and implements the engine's
:class:`~branchgrpo.lora.TrainableAdapter` protocol over it: the adapter's parameters, the base model under
:meth:`PeftAdapter.disabled` (peft's own enable / disable of its tuner layers), a checkpoint of the adapter
tensors only, and the adapter in ComfyUI's key format (:meth:`PeftAdapter.comfy_state_dict`).

``peft`` is imported here only, when an adapter is built: ``import branchgrpo`` does not import it.

ComfyUI format, per algorithm (every conversion exact, checked against ComfyUI 0.3.75's
``comfy.weight_adapter`` by the tests):

* **LoRA**: ``lora_A`` / ``lora_B`` are ``lora_down`` / ``lora_up``; ``alpha`` is written (peft keeps it in its
  config; ComfyUI scales by ``alpha / lora_down.shape[0]`` like peft's ``alpha / r``).
* **DoRA**: LoRA plus ``dora_scale`` ``[out, 1]`` from peft's ``lora_magnitude_vector`` ``m``. peft's weight is
  ``m * (W + dW) / ||W + dW||`` (row norms); ComfyUI 0.3.75 (``weight_decompose`` with a per-output-row scale)
  computes ``dora_scale * (W + dW) / (||W|| + eps)``, dividing by the norm of the *base* weight. So the file
  holds ``dora_scale = m * (||W|| + eps) / ||W + dW||`` with ``eps`` float32's (ComfyUI patches in float32):
  it is computed at save time from the base weights and reproduces the trained weight on those base weights
  (on other ones -- another checkpoint, a quantised copy -- the rows are rescaled by their ratio of norms).
* **LoHa**: peft's ``hada_w1_a/b``, ``hada_w2_a/b`` are ComfyUI's keys; ``alpha`` with rank ``hada_w1_b.shape[0]``
  on both sides.
* **LoKr**: ``lokr_w1`` (or ``_a/_b``), ``lokr_w2`` (or ``_a/_b``) as peft has them, and ``alpha``. ComfyUI
  applies ``alpha / rank`` only when a factor is decomposed (otherwise scale 1), peft always ``alpha / r``: when
  both factors are full, the scale is folded into ``lokr_w1`` and no ``alpha`` is written.
* **OFT**: peft rotates the layer's *input* (``W R^T``, blocks along the input features), ComfyUI's
  ``oft_blocks`` rotate its *output* rows (``R^T W``): the two parameterisations differ, so the file holds
  the exact weight difference ``.diff`` (``W_trained - W``, one full-size tensor per adapted layer), which
  ComfyUI's loaders apply as a plain difference.

Module names: ``comfy_state_dict`` writes ``diffusion_model.<name>`` with the model's own module names, or,
with a ``layout`` (``branchgrpo.models.diffusers_adapter.comfy_layout``), ComfyUI's names for a diffusers
transformer. Parts of a ComfyUI layer that diffusers splits (FLUX / SD3 q, k, v; FLUX's single-block
``linear1``) are merged exactly: LoRA / DoRA / LoHa factors block-diagonally (rank = sum of ranks, alpha
scaled so that alpha / rank is unchanged; DoRA's rows that no part adapts keep scale 1), LoKr and OFT as one
``.diff`` of the fused weight. Rows diffusers stores in another order (``norm_out``) are swapped back.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .lora import LoRAConfig, select_linear

__all__ = ["ALGORITHMS", "AdapterError", "PeftAdapter", "algorithm_error", "module_weights", "delta_weight", "effective_weight"]

ALGORITHMS = ("LoRA", "LoHa", "LoKr", "OFT", "DoRA")
_F32_EPS = torch.finfo(torch.float32).eps  # ComfyUI's weight_decompose eps (it patches float32 weights)
_ADAPTER = "default"


class AdapterError(ValueError):
    """A setting the adapter cannot be built with; ``field`` names the :class:`LoRAConfig` field (or
    ``"algorithm"``) to change."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def algorithm_error(algorithm: Any) -> str | None:
    """Why ``algorithm`` cannot be trained headless, or None when it can."""
    if algorithm in ALGORITHMS:
        return None
    return (f"unknown adapter algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)} "
            "(ComfyUI's weight adapter names, plus DoRA)")


def _peft_config(algorithm: str, config: LoRAConfig, pattern: str):
    import peft
    common = {"target_modules": pattern}
    if algorithm in ("LoRA", "DoRA"):
        return peft.LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0, bias="none",
                               use_dora=algorithm == "DoRA", init_lora_weights=True, **common)
    if algorithm == "LoHa":
        return peft.LoHaConfig(r=config.rank, alpha=config.alpha, rank_dropout=0.0, module_dropout=0.0,
                               use_effective_conv2d=False, init_weights=True, **common)
    if algorithm == "LoKr":
        return peft.LoKrConfig(r=config.rank, alpha=config.alpha, rank_dropout=0.0, module_dropout=0.0,
                               decompose_both=False, decompose_factor=-1, use_effective_conv2d=False,
                               init_weights=True, **common)
    if algorithm == "OFT":
        # OFT's "rank" is its block size (the input features are rotated in blocks of this size); exact
        # Cayley transform (no Neumann series), no constraint, so the trained weight is what it says.
        return peft.OFTConfig(r=0, oft_block_size=config.rank, module_dropout=0.0, coft=False, block_share=False,
                              use_cayley_neumann=False, init_weights=True, **common)
    raise ValueError(algorithm_error(algorithm))


def _full(t: Tensor) -> Tensor:
    """The whole tensor of a DTensor shard (FSDP), detached."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()


def _base_weight(layer: nn.Module) -> Tensor:
    """The base weight of a tuner layer, or the weight of a module peft did not adapt."""
    return _full((layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer).weight)


def _lora_weight(layer: nn.Module, w: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """``W + scaling * up @ down``: the weight DoRA normalises."""
    return w + (up @ down) * float(layer.scaling[_ADAPTER])


def module_weights(layer: nn.Module, algorithm: str) -> dict[str, Tensor]:
    """One peft tuner layer (the adapter ``default``) as ComfyUI's suffix -> tensor, float32 CPU, in the
    layer's own rows (see the module doc for each algorithm's conversion)."""
    a = _ADAPTER
    f32 = (lambda t: _full(t).to("cpu", torch.float32).contiguous())
    if algorithm in ("LoRA", "DoRA"):
        down, up = f32(layer.lora_A[a].weight), f32(layer.lora_B[a].weight)
        alpha = float(layer.lora_alpha[a])
        out = {".lora_up.weight": up, ".lora_down.weight": down, ".alpha": torch.tensor(alpha)}
        if algorithm == "DoRA":
            w = _base_weight(layer).to("cpu", torch.float32)
            m = f32(layer.lora_magnitude_vector[a].weight).reshape(-1)
            trained = _lora_weight(layer, w, up, down)
            dora = m * (w.norm(dim=1) + _F32_EPS) / trained.norm(dim=1)
            out[".dora_scale"] = dora.reshape(-1, 1).contiguous()
        return out
    if algorithm == "LoHa":
        out = {f".hada_{k}": f32(getattr(layer, f"hada_{k}")[a]) for k in ("w1_a", "w1_b", "w2_a", "w2_b")}
        out[".alpha"] = torch.tensor(float(layer.alpha[a]))
        return out
    if algorithm == "LoKr":
        out = {}
        for k in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b"):
            d = getattr(layer, f"lokr_{k}")
            if a in d:
                out[f".lokr_{k}"] = f32(d[a])
        if ".lokr_w1" in out and ".lokr_w2" in out:  # ComfyUI: scale 1 when no factor is decomposed
            out[".lokr_w1"] = (out[".lokr_w1"] * float(layer.scaling[a])).contiguous()
        else:
            out[".alpha"] = torch.tensor(float(layer.alpha[a]))
        return out
    if algorithm == "OFT":
        return {".diff": delta_weight(layer, algorithm)}
    raise ValueError(algorithm_error(algorithm))


@torch.no_grad()
def delta_weight(layer: nn.Module, algorithm: str) -> Tensor:
    """``W_trained - W`` ``[out, in]`` of one tuner layer, computed in float32 (whatever the base dtype), CPU."""
    w = _base_weight(layer).float()
    if algorithm == "OFT":  # y = W (R x): the rotation module applied to the identity gives R (block-diagonal)
        rot = layer.oft_R[_ADAPTER]
        r = rot(torch.eye(w.shape[1], device=w.device, dtype=rot.weight.dtype)).float()
        d = w @ r.t() - w
    elif algorithm == "DoRA":
        up, down = layer.lora_B[_ADAPTER].weight.float(), layer.lora_A[_ADAPTER].weight.float()
        trained = _lora_weight(layer, w, up, down)
        m = _full(layer.lora_magnitude_vector[_ADAPTER].weight).float().reshape(-1, 1)
        d = trained * (m / trained.norm(dim=1, keepdim=True)) - w
    else:  # peft's own dense delta of LoRA / LoHa / LoKr
        d = layer.get_delta_weight(_ADAPTER).float()
    return d.to("cpu").contiguous()


@torch.no_grad()
def effective_weight(layer: nn.Module) -> Tensor:
    """The weight ``[out, in]`` the tuner layer acts with (probed with the identity: exact for the linear
    maps peft builds), float32 CPU."""
    base = layer.get_base_layer()
    w = _base_weight(layer)
    eye = torch.eye(w.shape[1], device=w.device, dtype=w.dtype)
    y = layer(eye)
    if base.bias is not None:
        y = y - _full(base.bias)
    return y.t().to("cpu", torch.float32).contiguous()


def _swap_halves(t: Tensor) -> Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


class PeftAdapter:
    """A ``peft`` adapter injected into ``model`` in place, as the engine's :class:`TrainableAdapter`.

    ``config`` picks the modules (:func:`select_linear`: ``targets`` / ``exclude`` globs on the model's
    ``nn.Linear`` names), the rank (OFT: the block size) and alpha. ``seed`` makes the initialisation
    reproducible without touching the global RNG; for LoRA / DoRA ``lora_A`` is drawn exactly as the
    engine's earlier hook adapter drew ``down`` (kaiming-uniform from ``torch.manual_seed(seed)``, modules
    in name order; ``config.init_std`` draws it normal instead) and ``lora_B`` is zero, so a fresh adapter
    leaves the model unchanged. The adapter tensors are ``dtype`` (float32 by default, whatever the base's
    dtype), on the device of the modules they adapt. ``layout`` (``{module name: (ComfyUI module, row
    offset, swap halves)}``, ``{ComfyUI module: rows}``) maps names for :meth:`comfy_state_dict`; without
    one, the model's own names are written.
    """

    def __init__(self, model: nn.Module, config: LoRAConfig, algorithm: str = "LoRA", *, seed: int | None = None,
                 dtype: torch.dtype = torch.float32,
                 layout: tuple[Mapping[str, tuple[str, int, bool]], Mapping[str, int]] | None = None,
                 prefix: str = "diffusion_model") -> None:
        err = algorithm_error(algorithm)
        if err:
            raise AdapterError("algorithm", err)
        config.validate()
        import peft  # noqa: F401  (fails here, with its own message, when peft is missing)
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.model, self.config, self.algorithm, self.prefix = model, config, algorithm, prefix
        found = select_linear(model, config)
        if not found:
            linears = [n for n, m in model.named_modules() if n and isinstance(m, nn.Linear)]
            raise AdapterError("targets", f"{algorithm}: no nn.Linear module matches targets={config.targets!r}"
                               + (f" minus exclude={config.exclude!r}" if config.exclude else "")
                               + (f"; the model's Linear modules include {linears[:8]}" if linears else
                                  f"; {type(model).__name__} contains no nn.Linear"))
        self.names: list[str] = [n for n, _ in found]
        if algorithm == "OFT":
            bad = [f"{n} ({m.in_features} inputs)" for n, m in found if m.in_features % config.rank]
            if bad:
                raise AdapterError("rank", f"OFT rotates each layer's inputs in blocks of rank = {config.rank} "
                                   f"features, which must divide every adapted layer's input size: {bad[:6]}; "
                                   f"choose a rank that divides them (e.g. a power of two) or exclude those layers")
        if layout is not None:
            missing = [n for n in self.names if n not in layout[0]]
            if missing:
                raise AdapterError("targets", f"{len(missing)} adapted module(s) have no ComfyUI equivalent: "
                                              f"{missing[:6]}")
        self.layout = layout
        self._bases = {n: m for n, m in found}
        pattern = "^(?:" + "|".join(re.escape(n) for n in self.names) + ")$"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0 if seed is None else seed)
            peft.inject_adapter_in_model(_peft_config(algorithm, config, pattern), model, adapter_name=_ADAPTER)
        self.layers: dict[str, nn.Module] = {}
        for n in self.names:
            layer = model.get_submodule(n)
            if not isinstance(layer, BaseTunerLayer):
                raise RuntimeError(f"peft did not adapt {n!r} ({type(layer).__name__})")
            self.layers[n] = layer
        extra = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and n not in self.layers]
        if extra:
            raise RuntimeError(f"peft adapted modules outside the selection: {extra[:6]}")
        # adapter tensors in ``dtype``; parameter names (relative to the model) in module order
        prefixes = tuple(f"{n}." for n in self.names)
        self._param_names = [k for k, p in model.named_parameters()
                             if k.startswith(prefixes) and f".{_ADAPTER}" in k]
        with torch.no_grad():
            for k in self._param_names:
                p = model.get_parameter(k)
                if p.dtype != dtype:
                    p.data = p.data.to(dtype)
                p.requires_grad_(True)
        if algorithm in ("LoRA", "DoRA"):
            self._init_lora(seed)

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def _init_lora(self, seed: int | None) -> None:
        """``lora_A`` drawn like the engine's earlier hook adapter (modules in name order), ``lora_B`` zero."""
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            for n in self.names:
                layer = self.layers[n]
                a = layer.lora_A[_ADAPTER].weight
                fresh = torch.empty(a.shape, dtype=a.dtype, device=a.device)
                if self.config.init_std is None:
                    nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))
                else:
                    nn.init.normal_(fresh, std=self.config.init_std)
                a.copy_(fresh)
                layer.lora_B[_ADAPTER].weight.zero_()

    # ------------------------------------------------------------------ protocol
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for k in self._param_names:
            yield k, self.model.get_parameter(k)

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, p in self.named_parameters():
            yield p

    def num_parameters(self) -> int:
        return sum(_full(p).numel() for p in self.parameters())

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Inside, every tuner layer acts as its base layer (peft's ``enable_adapters(False)``); on exit
        the adapters are enabled again and each parameter's ``requires_grad`` is as it was."""
        was = {n: bool(layer.disable_adapters) for n, layer in self.layers.items()}
        flags = [(p, p.requires_grad) for p in self.parameters()]
        for layer in self.layers.values():
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for n, layer in self.layers.items():
                layer.enable_adapters(not was[n])
            for p, flag in flags:
                p.requires_grad_(flag)

    def state_dict(self) -> dict[str, Tensor]:
        """The adapter tensors only (never the base model), by parameter name."""
        return {k: _full(p) for k, p in self.named_parameters()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        mine = dict(self.named_parameters())
        missing = sorted(set(mine) - set(state))
        unexpected = sorted(set(state) - set(mine))
        wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(p.shape)}" for k, p in mine.items()
                 if k in state and tuple(state[k].shape) != tuple(_full(p).shape)]
        if missing or unexpected or wrong:
            raise RuntimeError(f"{self.algorithm} adapter state does not fit: {len(missing)} missing "
                               f"{missing[:4]}, {len(unexpected)} unexpected {unexpected[:4]}, shapes {wrong[:4]}")
        with torch.no_grad():
            for k, p in mine.items():
                p.copy_(state[k].to(device=p.device, dtype=p.dtype))

    def to(self, device: torch.device | str) -> "PeftAdapter":
        """Move the adapter tensors (only) to ``device``."""
        with torch.no_grad():
            for p in self.parameters():
                p.data = p.data.to(device)
        return self

    # ------------------------------------------------------------------ ComfyUI format
    def module_weights(self, name: str) -> dict[str, Tensor]:
        """The adapter of module ``name`` in ComfyUI's format (suffix -> tensor), in its own rows."""
        return module_weights(self.layers[name], self.algorithm)

    def delta(self, name: str) -> Tensor:
        """``W_trained - W`` of module ``name`` (float32 CPU)."""
        return delta_weight(self.layers[name], self.algorithm)

    def comfy_state_dict(self) -> dict[str, Tensor]:
        """:class:`TrainableAdapter`: the adapter in ComfyUI's key format (see the module doc)."""
        p = f"{self.prefix}." if self.prefix else ""
        if self.layout is None:
            return {f"{p}{n}{s}": t for n in self.names for s, t in self.module_weights(n).items()}
        layout, rows = self.layout
        groups: dict[str, list[tuple[int, bool, str]]] = defaultdict(list)
        for n in self.names:
            target, offset, swap = layout[n]
            groups[target].append((offset, swap, n))
        sd: dict[str, Tensor] = {}
        for target in sorted(groups):
            members = sorted(groups[target])
            base = f"{p}{target}"
            off0, swap0, n0 = members[0]
            if len(members) == 1 and off0 == 0 and not swap0 and \
                    self._bases[n0].out_features == rows[target]:
                for s, t in self.module_weights(n0).items():
                    sd[base + s] = t
                continue
            for s, t in self._merge(target, members, rows[target]).items():
                sd[base + s] = t
        return sd

    def _part_rows(self, target: str) -> list[tuple[int, str]]:
        """Every module of the model (adapted or not) that makes rows of ComfyUI module ``target``."""
        return sorted((off, n) for n, (t, off, _) in self.layout[0].items() if t == target)

    def _merge(self, target: str, members: Sequence[tuple[int, bool, str]], height: int) -> dict[str, Tensor]:
        alg = self.algorithm
        if alg in ("LoKr", "OFT"):  # no exact factor merge in general: one difference of the fused weight
            diff = None
            for offset, swap, n in members:
                d = self.delta(n)
                if diff is None:
                    diff = torch.zeros(height, d.shape[1])
                diff[offset:offset + d.shape[0]] = _swap_halves(d) if swap else d
            return {".diff": diff}
        parts = [(offset, swap, self.module_weights(n)) for offset, swap, n in members]
        if alg in ("LoRA", "DoRA"):
            pairs = [(".lora_up.weight", ".lora_down.weight")]
        else:
            pairs = [(".hada_w1_a", ".hada_w1_b"), (".hada_w2_a", ".hada_w2_b")]
        r = sum(w[pairs[0][1]].shape[0] for _, _, w in parts)
        scale = float(parts[0][2][".alpha"]) / parts[0][2][pairs[0][1]].shape[0]
        out: dict[str, Tensor] = {}
        for up_key, down_key in pairs:
            down = torch.cat([w[down_key] for _, _, w in parts], dim=0)
            up = torch.zeros(height, r)
            col = 0
            for offset, swap, w in parts:
                u = w[up_key]
                up[offset:offset + u.shape[0], col:col + u.shape[1]] = _swap_halves(u) if swap else u
                col += u.shape[1]
            out[up_key], out[down_key] = up.contiguous(), down.contiguous()
        out[".alpha"] = torch.tensor(scale * r)
        if alg == "DoRA":  # rows no part adapts: scale = their norm (+ eps), i.e. unchanged
            dora = torch.empty(height, 1)
            for offset, n in self._part_rows(target):
                w = _base_weight(self.model.get_submodule(n)).to("cpu", torch.float32)
                dora[offset:offset + w.shape[0], 0] = w.norm(dim=1) + _F32_EPS
            for offset, swap, w in parts:
                d = w[".dora_scale"]
                dora[offset:offset + d.shape[0]] = _swap_halves(d) if swap else d
            out[".dora_scale"] = dora
        return out

    def __repr__(self) -> str:
        return (f"PeftAdapter({self.algorithm}, rank={self.config.rank}, alpha={self.config.alpha:g}, "
                f"modules={len(self.names)})")
