"""A tiny class-conditional rectified-flow DiT: the model of the CPU demo (and of the toy benchmark).

Everything lives in pixel space: a "latent" is an RGB image ``[B, 3, 16, 16]`` with data in
``[-1, 1]``, so decoding is just ``(x + 1) / 2`` moved to ComfyUI's ``[N, H, W, 3]`` layout.

Conventions (same as the engine, see ``branchgrpo/models/base.py``)::

    x_sigma = (1 - sigma) * x0 + sigma * noise      sigma in [0, 1], sigma = 1 is pure noise
    v       = noise - x0                             what ToyDiT predicts

Its training data, procedural shapes, is :mod:`branchgrpo.models.toy_data`; its pre-training and the
export of ``demo/tiny_t2i.safetensors`` are ``demo/pretrain.py`` and ``demo/make_demo_model.py``.

The "prompts" are a fixed vocabulary :data:`CLASS_NAMES`; a prompt is encoded as its index
and the network embeds it with a learned table (one extra row, :attr:`ToyDiT.null_class`,
is the unconditional token used for classifier-free-guidance dropout during pre-training).

Module names are chosen so LoRA adapters can target them by pattern: every block has
``blocks.<i>.attn.{q,k,v,out}`` and ``blocks.<i>.mlp.{fc1,fc2}`` (all ``nn.Linear``), plus
``blocks.<i>.adaLN`` for the modulation.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "CLASS_NAMES",
    "ToyDiTConfig",
    "ToyDiT",
    "ToyVelocityModel",
    "sigma_schedule",
    "sample",
    "decode",
]

#: The prompt vocabulary; a prompt's class id is its position here.
CLASS_NAMES = (
    "red circle",
    "green square",
    "blue triangle",
    "yellow ring",
    "magenta cross",
    "cyan stripes",
    "orange checkerboard",
    "purple gradient",
)


# ------------------------------------------------------------------------------- network ---


@dataclass(frozen=True)
class ToyDiTConfig:
    img_size: int = 16
    channels: int = 3
    patch: int = 2
    hidden: int = 192
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = len(CLASS_NAMES)
    freq_dim: int = 128

    def to_dict(self) -> Dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict) -> "ToyDiTConfig":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def timestep_embedding(sigma: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of ``1000 * sigma`` (``[B] -> [B, dim]``), as in DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
    args = (sigma.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding ``[1, grid * grid, dim]`` (row-major tokens)."""
    assert dim % 4 == 0
    quarter = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    pos = torch.arange(grid, dtype=torch.float32)
    gy, gx = torch.meshgrid(pos, pos, indexing="ij")

    def emb(p: torch.Tensor) -> torch.Tensor:
        a = p.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(a), torch.cos(a)], dim=1)

    return torch.cat([emb(gy), emb(gx)], dim=1)[None]


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        assert dim % heads == 0
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, h, d // h).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero modulation (shift/scale/gate per branch)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN(F.silu(c)).chunk(6, dim=-1)
        x = x + g1[:, None] * self.attn(_modulate(self.norm1(x), sh1, sc1))
        x = x + g2[:, None] * self.mlp(_modulate(self.norm2(x), sh2, sc2))
        return x


class ToyDiT(nn.Module):
    """``model(x [B,C,H,W], sigma [B] or scalar, class_idx [B] long) -> v [B,C,H,W]``."""

    def __init__(self, config: Optional[ToyDiTConfig] = None):
        super().__init__()
        cfg = config or ToyDiTConfig()
        self.config = cfg
        assert cfg.img_size % cfg.patch == 0
        d = cfg.hidden
        self.grid = cfg.img_size // cfg.patch
        patch_dim = cfg.channels * cfg.patch * cfg.patch
        self.null_class = cfg.num_classes
        self.patch_embed = nn.Linear(patch_dim, d)
        self.register_buffer("pos_embed", sincos_2d(d, self.grid), persistent=False)
        self.t_embed = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.y_embed = nn.Embedding(cfg.num_classes + 1, d)
        self.blocks = nn.ModuleList([DiTBlock(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Linear(d, 2 * d)
        self.final = nn.Linear(d, patch_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        for lin in self.t_embed:
            if isinstance(lin, nn.Linear):
                nn.init.normal_(lin.weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output as zero.
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN.weight)
            nn.init.zeros_(blk.adaLN.bias)
        nn.init.zeros_(self.final_adaLN.weight)
        nn.init.zeros_(self.final_adaLN.bias)
        nn.init.zeros_(self.final.weight)
        nn.init.zeros_(self.final.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        p, g = self.config.patch, self.grid
        x = x.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, g * g, c * p * p)

    def unpatchify(self, t: torch.Tensor) -> torch.Tensor:
        b = t.shape[0]
        c, p, g = self.config.channels, self.config.patch, self.grid
        x = t.reshape(b, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, g * p, g * p)

    def forward(self, x: torch.Tensor, sigma: Union[torch.Tensor, float], class_idx: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if sigma.dim() == 0:
            sigma = sigma.expand(b)
        sigma = sigma.reshape(b)
        class_idx = torch.as_tensor(class_idx, dtype=torch.long, device=x.device).reshape(-1).expand(b)
        dtype = self.patch_embed.weight.dtype
        h = self.patch_embed(self.patchify(x.to(dtype))) + self.pos_embed
        c = self.t_embed(timestep_embedding(sigma, self.config.freq_dim).to(dtype)) + self.y_embed(class_idx)
        for blk in self.blocks:
            h = blk(h, c)
        shift, scale = self.final_adaLN(F.silu(c)).chunk(2, dim=-1)
        h = self.final(_modulate(self.final_norm(h), shift, scale))
        return self.unpatchify(h).to(x.dtype)


# ------------------------------------------------------------------------- engine view ---


def decode(x0: torch.Tensor) -> torch.Tensor:
    """Model space ``[N, 3, H, W]`` in ``[-1, 1]`` -> ComfyUI IMAGE ``[N, H, W, 3]`` in ``[0, 1]``."""
    return ((x0.float() + 1.0) * 0.5).clamp(0.0, 1.0).permute(0, 2, 3, 1).contiguous()


def _normalise_prompt(p: str) -> str:
    return " ".join(str(p).lower().split())


class ToyVelocityModel(nn.Module):
    """The engine's :class:`~branchgrpo.models.base.VelocityModel` view of a :class:`ToyDiT`.

    ``encode(prompts)`` maps each prompt (one of :data:`CLASS_NAMES`, case and extra spaces
    ignored) to its class id and returns a ``LongTensor [P]``; ``velocity(x, sigma, cond,
    index)`` is ``net(x, sigma, cond[index])``; ``decode(x0)`` gives ``[N, H, W, 3]`` in ``[0, 1]``.
    Being an ``nn.Module`` its parameters are ``net.*`` (LoRA patterns like ``*.attn.*`` match).
    """

    def __init__(self, net: ToyDiT, class_names: Sequence[str] = CLASS_NAMES):
        super().__init__()
        if len(class_names) != net.config.num_classes:
            raise ValueError(f"{len(class_names)} class names for a {net.config.num_classes}-class network")
        self.net = net
        self.class_names = tuple(class_names)
        self._ids = {_normalise_prompt(n): i for i, n in enumerate(self.class_names)}

    @property
    def latent_shape(self) -> tuple:
        """Shape of one latent (``[C, H, W]``)."""
        c = self.net.config
        return (c.channels, c.img_size, c.img_size)

    @property
    def device(self) -> torch.device:
        return self.net.patch_embed.weight.device

    def class_id(self, prompt: str) -> int:
        try:
            return self._ids[_normalise_prompt(prompt)]
        except KeyError:
            raise ValueError(
                f"unknown prompt {prompt!r} for the toy model; valid prompts: {', '.join(self.class_names)}"
            ) from None

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        return torch.tensor([self.class_id(p) for p in prompts], dtype=torch.long, device=self.device)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.net(x, sigma, cond.to(x.device)[index.to(x.device)])

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.velocity(x, sigma, cond, index)

    @staticmethod
    def decode(x0: torch.Tensor) -> torch.Tensor:
        return decode(x0)


# ---------------------------------------------------------------------------- sampling ---


def sigma_schedule(steps: int, shift: float = 3.0, device=None) -> torch.Tensor:
    """SD3 shifted schedule: ``u = linspace(1, 0, steps + 1)``, ``sigma = s u / (1 + (s - 1) u)``."""
    u = torch.linspace(1.0, 0.0, steps + 1, device=device)
    return shift * u / (1.0 + (shift - 1.0) * u)


@torch.no_grad()
def sample(
    model: Union[ToyDiT, ToyVelocityModel],
    class_idx: Union[torch.Tensor, Sequence[int], int],
    steps: int = 20,
    shift: float = 3.0,
    noise: Optional[torch.Tensor] = None,
    seed: int = 0,
    cfg_scale: float = 1.0,
) -> torch.Tensor:
    """Euler ODE sampling from ``sigma = 1`` to ``0``; returns ``x0`` in model space ``[B, C, H, W]``.

    ``noise`` (default: ``randn`` from a generator seeded with ``seed``) is the starting point.
    ``cfg_scale != 1`` applies classifier-free guidance against the null class.
    """
    net = model.net if isinstance(model, ToyVelocityModel) else model
    device = net.patch_embed.weight.device
    if isinstance(class_idx, int):
        class_idx = [class_idx]
    y = torch.as_tensor(class_idx, dtype=torch.long, device=device).reshape(-1)
    cfg = net.config
    if noise is None:
        g = torch.Generator().manual_seed(int(seed))
        noise = torch.randn(y.shape[0], cfg.channels, cfg.img_size, cfg.img_size, generator=g)
    x = noise.to(device=device, dtype=torch.float32)
    if y.shape[0] == 1 and x.shape[0] > 1:
        y = y.expand(x.shape[0])
    sigmas = sigma_schedule(steps, shift, device=device)
    null = torch.full_like(y, net.null_class)
    for i in range(steps):
        s = sigmas[i].expand(x.shape[0])
        if cfg_scale == 1.0:
            v = net(x, s, y)
        else:
            v_c, v_u = net(torch.cat([x, x]), torch.cat([s, s]), torch.cat([y, null])).chunk(2)
            v = v_u + cfg_scale * (v_c - v_u)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x
