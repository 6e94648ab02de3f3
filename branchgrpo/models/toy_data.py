"""Synthetic training data of the toy DiT (:mod:`branchgrpo.models.toy_dit`): procedural shapes, one per prompt.

Images are ``[B, 3, size, size]`` in ``[-1, 1]`` (the toy model's pixel-space "latent"); class ``i`` draws
:data:`~branchgrpo.models.toy_dit.CLASS_NAMES` ``[i]``. Deterministic given the ``torch.Generator``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["synthetic_batch"]


# ------------------------------------------------------------------------ synthetic data ---


def _rand(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


_BASE_COLOURS = torch.tensor(
    [
        [0.90, 0.15, 0.15],  # red
        [0.15, 0.80, 0.20],  # green
        [0.20, 0.30, 0.95],  # blue
        [0.95, 0.90, 0.15],  # yellow
        [0.90, 0.15, 0.85],  # magenta
        [0.15, 0.85, 0.90],  # cyan
        [1.00, 0.55, 0.10],  # orange
        [0.55, 0.20, 0.80],  # purple
    ]
)


@torch.no_grad()
def synthetic_batch(
    class_idx: torch.Tensor, size: int = 16, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Procedural images ``[B, 3, size, size]`` in ``[-1, 1]`` for the given class ids.

    Per class: a coloured shape (circle, square, triangle, ring, cross) on a textured
    background, or a whole-image pattern (stripes, checkerboard, gradient). Random per
    sample: position, size, orientation/frequency, colour jitter, background tone, a smooth
    background texture, and pixel noise whose strength varies from none to strong, so JPEG
    size differs a lot between samples.
    """
    g = generator or torch.Generator().manual_seed(0)
    y = torch.as_tensor(class_idx, dtype=torch.long).reshape(-1)
    n = y.shape[0]
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    xx, yy = xx[None], yy[None]  # [1, S, S]
    aa = 1.0 / size  # anti-aliasing width

    def col(v):  # [n] -> [n, 1, 1]
        return v[:, None, None]

    cx, cy = col(_rand(g, n, 0.32, 0.68)), col(_rand(g, n, 0.32, 0.68))
    r = col(_rand(g, n, 0.18, 0.32))
    dx, dy = xx - cx, yy - cy
    dist = torch.sqrt(dx**2 + dy**2)
    thick = col(_rand(g, n, 0.06, 0.11))

    masks = torch.empty(n, size, size)
    # shape masks (soft edges)
    circle = torch.sigmoid((r - dist) / aa)
    square = torch.sigmoid((0.85 * r - torch.maximum(dx.abs(), dy.abs())) / aa)
    tri_in = torch.minimum((dy + r) * 0.5 - dx.abs(), r - dy)
    triangle = torch.sigmoid(tri_in / aa)
    ring = torch.sigmoid((thick * 0.6 - (dist - r).abs()) / aa)
    cross = torch.sigmoid(
        torch.maximum(
            torch.minimum(thick * 0.6 - dx.abs(), r - dy.abs()),
            torch.minimum(thick * 0.6 - dy.abs(), r - dx.abs()),
        )
        / aa
    )
    # whole-image patterns
    theta = col(_rand(g, n, 0.0, math.pi))
    freq = col(_rand(g, n, 1.5, 3.5))
    phase = col(_rand(g, n, 0.0, 2 * math.pi))
    proj = xx * torch.cos(theta) + yy * torch.sin(theta)
    stripes = torch.sigmoid(torch.sin(2 * math.pi * freq * proj + phase) * 3.0)
    k = col(torch.randint(2, 5, (n,), generator=g).float())
    off_x, off_y = col(torch.rand(n, generator=g)), col(torch.rand(n, generator=g))
    checker = ((torch.floor(xx * k + off_x) + torch.floor(yy * k + off_y)) % 2).float()
    lo, hi = proj.amin(dim=(1, 2), keepdim=True), proj.amax(dim=(1, 2), keepdim=True)
    gradient = (proj - lo) / (hi - lo + 1e-6)
    for cls, m in enumerate((circle, square, triangle, ring, cross, stripes, checker, gradient)):
        sel = y == cls
        masks[sel] = m.expand(n, size, size)[sel]

    # colours: class colour with jitter; background a dim tone
    fg = (_BASE_COLOURS[y] + 0.08 * torch.randn(n, 3, generator=g)).clamp(0, 1)[:, :, None, None]
    bg_tone = _rand(g, n, 0.05, 0.35)[:, None]
    bg = (bg_tone + 0.05 * torch.randn(n, 3, generator=g)).clamp(0, 1)[:, :, None, None]
    # the gradient class fades to a darker shade of its own colour instead of the background
    grad_sel = y == 7
    bg[grad_sel] = fg[grad_sel] * 0.15

    # smooth random background texture (upsampled coarse noise), random strength
    coarse = torch.randn(n, 1, 4, 4, generator=g)
    texture = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    tex_amp = _rand(g, n, 0.0, 0.12)[:, None, None, None]
    bg = bg + tex_amp * texture

    m = masks[:, None]
    img = m * fg + (1 - m) * bg
    # pixel noise: none for ~a quarter of samples, otherwise up to strong
    noise_amp = (_rand(g, n, -0.03, 0.10)).clamp(min=0.0)[:, None, None, None]
    img = img + noise_amp * torch.randn(n, 3, size, size, generator=g)
    return (img.clamp(0, 1) * 2 - 1).contiguous()
