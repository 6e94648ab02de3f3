"""The Trainer node's preview: the best and the worst leaf of the latest tree, and the latest evaluation
samples, side by side in one image sent through ComfyUI's progress bar (``ProgressBar.update_absolute``
with a ``("JPEG", PIL.Image, max_size)`` preview, which the server streams as a binary preview event).

Only what is shown is kept: two leaf images per iteration and at most ``max_eval`` evaluation images.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

PREVIEW_MAX_SIZE = 512  # longest side of the preview sent to the browser
TILE = 160              # height of one tile in the grid (small latents are scaled up, pixel for pixel)
CAPTION = 14


def _frame(image: torch.Tensor) -> torch.Tensor:
    """One IMAGE ``[H, W, 3]`` from a leaf (``[H, W, C]`` or a video's ``[T, H, W, C]``: its middle frame)."""
    if image.dim() == 4:
        image = image[image.shape[0] // 2]
    if image.shape[-1] == 1:
        image = image.expand(*image.shape[:-1], 3)
    return image[..., :3]


def to_pil(image: torch.Tensor) -> Image.Image:
    arr = (_frame(image.detach().float().cpu()).clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def preview_grid(tiles: list[tuple[str, torch.Tensor]], tile: int = TILE) -> Image.Image | None:
    """A row of ``(caption, IMAGE)`` tiles of equal height with their captions underneath."""
    if not tiles:
        return None
    pics = []
    for caption, image in tiles:
        pic = to_pil(image)
        w = max(1, round(pic.width * tile / max(1, pic.height)))
        resample = Image.NEAREST if pic.height < tile else Image.BILINEAR
        pics.append((caption, pic.resize((w, tile), resample)))
    gap = 4
    width = sum(p.width for _, p in pics) + gap * (len(pics) - 1)
    grid = Image.new("RGB", (width, tile + CAPTION), (24, 24, 24))
    draw = ImageDraw.Draw(grid)
    x = 0
    for caption, pic in pics:
        grid.paste(pic, (x, 0))
        draw.text((x + 3, tile + 1), caption, fill=(220, 220, 220))
        x += pic.width + gap
    return grid


class PreviewKeeper:
    """What the Trainer's preview shows, updated by the training callbacks."""

    def __init__(self, max_eval: int = 4):
        self.max_eval = max_eval
        self.best: tuple[float, torch.Tensor] | None = None
        self.worst: tuple[float, torch.Tensor] | None = None
        self.eval: tuple[int, list[torch.Tensor], list[float]] | None = None

    def rollout(self, tree, leaf_rewards: torch.Tensor, images: torch.Tensor | None) -> None:
        """The best and the worst leaf of the iteration's first tree (the tree the live chart draws)."""
        if images is None or images.shape[0] != leaf_rewards.numel():
            return
        ids = torch.nonzero(tree.leaf_tree() == 0).flatten()
        if ids.numel() == 0:
            return
        r = leaf_rewards.detach().float().cpu()[ids]
        finite = torch.isfinite(r)
        if not finite.any():
            return
        ids, r = ids[finite], r[finite]
        hi, lo = int(torch.argmax(r)), int(torch.argmin(r))
        self.best = (float(r[hi]), images[int(ids[hi])].detach().cpu().clone())
        self.worst = (float(r[lo]), images[int(ids[lo])].detach().cpu().clone())

    def evaluation(self, iteration: int, result: dict) -> None:
        images = result.get("images")
        if images is None:
            return
        n = min(self.max_eval, images.shape[0])
        rewards = [float(v) for v in result.get("rewards", torch.full((n,), float("nan")))[:n]]
        self.eval = (iteration, [images[i].detach().cpu().clone() for i in range(n)], rewards)

    def image(self) -> Image.Image | None:
        tiles = []
        if self.best is not None:
            tiles.append((f"best {self.best[0]:.4g}", self.best[1]))
        if self.worst is not None:
            tiles.append((f"worst {self.worst[0]:.4g}", self.worst[1]))
        if self.eval is not None:
            it, images, rewards = self.eval
            for k, (img, r) in enumerate(zip(images, rewards)):
                tiles.append((f"eval@{it} {r:.3g}" if k == 0 else f"{r:.3g}", img))
        return preview_grid(tiles)
