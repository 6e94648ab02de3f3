"""A tiny random-weight flow transformer for engine tests: patch tokens, attention, prompt conditioning.

Works on image latents ``[B, C, H, W]`` and video latents ``[B, C, T, H, W]`` (every position is a
token), and implements the engine's :class:`~branchgrpo.models.base.VelocityModel` protocol.
"""
from __future__ import annotations

import torch
from torch import nn


class TinyBlock(nn.Module):
    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.norm2 = nn.LayerNorm(dim)
        self.mlp_in, self.mlp_out = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, n, d = h.shape
        x = self.norm1(h)
        q, k, v = (f(x).view(b, n, self.heads, d // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        h = h + self.out(a)
        return h + self.mlp_out(torch.nn.functional.gelu(self.mlp_in(self.norm2(h))))


class TinyFlow(nn.Module):
    def __init__(self, channels: int = 4, dim: int = 32, depth: int = 2, vocab: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.inp = nn.Linear(channels, dim)
        self.time = nn.Linear(1, dim)
        self.prompt = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(TinyBlock(dim) for _ in range(depth))
        self.outp = nn.Linear(dim, channels)
        self.vocab = vocab
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        tokens = x.flatten(2).transpose(1, 2)
        h = self.inp(tokens) + self.time(sigma.view(b, 1, 1).to(x.dtype)) + self.prompt(cls)[:, None]
        for blk in self.blocks:
            h = blk(h)
        return self.outp(h).transpose(1, 2).reshape(x.shape)

    # VelocityModel protocol
    def encode(self, prompts):
        return torch.tensor([sum(map(ord, p)) % self.vocab for p in prompts])

    def velocity(self, x, sigma, cond, index):
        return self(x, sigma, cond.to(x.device)[index])


def decode_to_image(x0: torch.Tensor) -> torch.Tensor:
    """Latent ``[N, C, H, W]`` (or with a frame axis) -> IMAGE ``[N, H, W, 3]`` (or ``[N, T, H, W, 3]``) in [0, 1]."""
    rgb = x0[:, :3].clamp(-1, 1) * 0.5 + 0.5
    return rgb.movedim(1, -1)


class MeanBrightness:
    """A differentiable weight-free test reward."""
    name = "brightness"

    def __call__(self, images, prompts):
        return images.flatten(1).mean(1)
