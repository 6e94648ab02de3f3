"""The Trainer node's preview: the best and the worst leaf of the latest tree, and the latest evaluation
samples, side by side in one image sent through ComfyUI's progress bar (``ProgressBar.update_absolute``
with a ``("JPEG", PIL.Image, max_size)`` preview, which the server streams as a binary preview event).

Only what is shown is decoded and kept: two leaf images per iteration and at most ``max_eval`` evaluation
images. Given a ``decode`` (clean latents -> IMAGE), the keeper decodes just those from the tree's and the
evaluation's clean latents, so the trainer need not keep every decoded leaf (``keep_images``).
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

    def __init__(self, decode=None, max_eval: int = 4):
        self.decode = decode
        self.max_eval = max_eval
        self.best: tuple[float, torch.Tensor] | None = None
        self.worst: tuple[float, torch.Tensor] | None = None
        self.eval: tuple[int, list[torch.Tensor], list[float]] | None = None

    def _images(self, images: torch.Tensor | None, x0: torch.Tensor | None, ids: list[int]) -> list | None:
        if images is not None:
            return [images[i].detach().cpu().clone() for i in ids]
        if self.decode is None or x0 is None:
            return None
        with torch.no_grad():
            out = self.decode(x0[torch.as_tensor(ids, device=x0.device)])
        return [img.detach().cpu().clone() for img in out]

    def rollout(self, tree, leaf_rewards: torch.Tensor, images: torch.Tensor | None) -> None:
        """The best and the worst leaf of the iteration's first tree (the tree the live chart draws)."""
        if images is not None and images.shape[0] != leaf_rewards.numel():
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
        pics = self._images(images, getattr(tree, "leaf_x0", None), [int(ids[hi]), int(ids[lo])])
        if pics is not None:
            self.best, self.worst = (float(r[hi]), pics[0]), (float(r[lo]), pics[1])

    def evaluation(self, iteration: int, result: dict) -> None:
        """The first ``max_eval`` samples of an evaluation (:func:`branchgrpo.evaluate.evaluate`'s result)."""
        images, x0 = result.get("images"), result.get("x0")
        total = images.shape[0] if images is not None else (x0.shape[0] if x0 is not None else 0)
        n = min(self.max_eval, total)
        pics = self._images(images, x0, list(range(n))) if n else None
        if pics is None:
            return
        rewards = [float(v) for v in result.get("rewards", torch.full((n,), float("nan")))[:n]]
        self.eval = (iteration, pics, rewards)

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
