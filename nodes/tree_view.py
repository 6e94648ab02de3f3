"""Tree View: draws a Tree Sampler tree (widths per step, forks, leaves; leaf rewards when scored) as an IMAGE."""
from __future__ import annotations

import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image, ImageDraw

from . import types as T

NODE = "BranchGRPO Tree View"


def leaf_colour(t: float) -> tuple[int, int, int]:
    """Red (worst) -> yellow -> green (best) for ``t`` in [0, 1]."""
    t = min(max(t, 0.0), 1.0)
    return (int(220 * min(1.0, 2 - 2 * t)), int(190 * min(1.0, 2 * t)), 60)


def draw_tree(tree, rewards: list[float] | None, width: int, height: int) -> Image.Image:
    """The first tree of the record: one row per depth (node dots), an edge to every parent, forks in orange,
    leaves coloured by reward (grey without rewards)."""
    img = Image.new("RGB", (width, height), (250, 250, 250))
    d = ImageDraw.Draw(img)
    first = tree.tree == 0
    ids = torch.nonzero(first).flatten().tolist()
    depth, parent = tree.depth.tolist(), tree.parent.tolist()
    rows: dict[int, list[int]] = {}
    for i in ids:
        rows.setdefault(depth[i], []).append(i)
    top, bottom, left, right = 34, height - 14, 70, width - 14
    pos = {}
    for k, nodes in rows.items():
        y = top + (bottom - top) * k / max(tree.num_steps, 1)
        for j, i in enumerate(nodes):
            pos[i] = (left + (right - left) * (j + 0.5) / len(nodes), y)
    leaves = [i for i in ids if depth[i] == tree.num_steps]
    lo, hi = (min(rewards), max(rewards)) if rewards else (0.0, 1.0)
    for i in ids:
        if parent[i] >= 0:
            colour = (230, 140, 30) if bool(tree.is_fork[i]) else (150, 150, 150)
            d.line([pos[parent[i]], pos[i]], fill=colour, width=2 if bool(tree.is_fork[i]) else 1)
    for k, nodes in rows.items():
        d.text((6, pos[nodes[0]][1] - 6), f"{k}: {len(nodes)}", fill=(60, 60, 60))
    for i in ids:
        x, y = pos[i]
        fill = (90, 90, 90)
        if i in leaves and rewards:
            r = rewards[leaves.index(i)]
            fill = leaf_colour((r - lo) / (hi - lo) if hi > lo else 0.5)
        rad = 5 if i in leaves else 3
        d.ellipse([x - rad, y - rad, x + rad, y + rad], fill=fill)
    title = f"{len(leaves)} leaves, {tree.num_steps} steps, forks at " + \
        ",".join(str(s) for s in range(tree.num_steps) if len(rows.get(s + 1, [])) > len(rows.get(s, [])))
    if rewards:
        title += f"; leaf reward {lo:.4g} (red) .. {hi:.4g} (green)"
    d.text((6, 8), title, fill=(20, 20, 20))
    return img


class TreeViewNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BranchGRPOTreeView", display_name="Tree View (BranchGRPO)", category=T.CATEGORY,
            description="Draws the Tree Sampler's tree: one row per denoising step with its width, the forks in "
                        "orange, and the leaves, coloured by reward when leaf images and a reward model are given "
                        "(decode the sampler's leaves with VAE Decode).",
            inputs=[
                T.Tree.Input("tree", tooltip="The tree record from the Tree Sampler."),
                io.Image.Input("leaf_images", optional=True, tooltip="The decoded leaves (VAE Decode of the "
                               "sampler's leaves), to score them."),
                T.RewardModel.Input("reward", optional=True, tooltip="Scores the leaf images (needs leaf_images)."),
                io.String.Input("prompt", default="", optional=True, tooltip="The prompt the leaves are scored "
                                "against (the sampler's prompt)."),
                io.Int.Input("width", default=768, min=128, max=4096, optional=True, tooltip="Image width."),
                io.Int.Input("height", default=512, min=128, max=4096, optional=True, tooltip="Image height."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The drawn tree.")],
        )

    @classmethod
    def execute(cls, tree, leaf_images=None, reward=None, prompt="", width=768, height=512) -> io.NodeOutput:
        if not hasattr(tree, "leaf_tree") or not hasattr(tree, "depth"):
            raise ValueError(f"{NODE}: tree — expected the Tree Sampler's tree, got {type(tree).__name__}.")
        rewards = None
        n0 = int((tree.leaf_tree() == 0).sum())
        if reward is not None:
            if leaf_images is None:
                raise ValueError(f"{NODE}: leaf_images — a reward needs the decoded leaves; connect VAE Decode of "
                                 "the Tree Sampler's leaves.")
            if leaf_images.shape[0] < n0:
                raise ValueError(f"{NODE}: leaf_images — {leaf_images.shape[0]} images for a tree of {n0} leaves; "
                                 "decode the sampler's leaves output.")
            scores = reward(leaf_images[:n0], [prompt or ""] * n0)
            rewards = [float(s) for s in scores.detach().float().cpu()]
        img = draw_tree(tree, rewards, width, height)
        out = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
        text = f"{n0} leaves" + (f"; rewards {min(rewards):.4g} .. {max(rewards):.4g}" if rewards else "")
        return io.NodeOutput(out, ui={"text": [text]})


__all__ = ["TreeViewNode", "draw_tree"]
