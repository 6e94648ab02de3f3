"""The Trainer's preview grid (nodes/preview.py, plain torch + PIL): best and worst leaf of the first tree,
the evaluation samples, video leaves, and what is kept between iterations."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from branchgrpo import BranchSchedule, rollout
from tiny_flow import TinyFlow, decode_to_image

_spec = importlib.util.spec_from_file_location(
    "branchgrpo_preview", Path(__file__).resolve().parent.parent / "nodes" / "preview.py")
P = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(P)


def _tree(shape=(4, 4, 4)):
    model = TinyFlow()
    sch = BranchSchedule(num_steps=3, split_steps=(0, 1))
    tree = rollout(model, model.encode(["a", "b"]), 2, sch, shape, generator=torch.Generator().manual_seed(0))
    return tree, decode_to_image(tree.leaf_x0)


def test_best_and_worst_leaf_of_the_first_tree_and_the_eval_samples():
    tree, images = _tree()
    n = images.shape[0]
    rewards = torch.arange(n, dtype=torch.float32).flip(0)  # leaf 0 best; the last leaf of tree 0 worst
    rewards[-1] = 100.0  # a better leaf in tree 1 is not tree 0's best
    keep = P.PreviewKeeper(max_eval=3)
    assert keep.image() is None
    keep.rollout(tree, rewards, images)
    t0 = torch.nonzero(tree.leaf_tree() == 0).flatten()
    assert keep.best[0] == float(rewards[t0].max()) and torch.equal(keep.best[1], images[t0[0]])
    assert keep.worst[0] == float(rewards[t0].min()) and torch.equal(keep.worst[1], images[t0[-1]])
    img = keep.image()
    assert img.size == (2 * P.TILE + 4, P.TILE + P.CAPTION)
    # the best tile is leaf 0 scaled up pixel for pixel
    tile = np.asarray(img)[: P.TILE, : P.TILE]
    want = np.asarray(P.to_pil(images[t0[0]]).resize((P.TILE, P.TILE), P.Image.NEAREST))
    assert np.array_equal(tile, want)
    eval_images = torch.rand(5, 4, 4, 3)
    keep.evaluation(4, {"images": eval_images, "rewards": torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])})
    assert len(keep.eval[1]) == 3 and keep.eval[2] == pytest.approx([0.1, 0.2, 0.3])  # at most max_eval kept
    assert keep.image().size == (5 * P.TILE + 4 * 4, P.TILE + P.CAPTION)
    # without images (keep_images off) or with non-finite rewards nothing changes
    before = keep.best
    keep.rollout(tree, rewards, None)
    keep.rollout(tree, torch.full((n,), float("nan")), images)
    assert keep.best is before


def test_video_leaves_show_their_middle_frame_and_grids_of_odd_shapes():
    frames = torch.zeros(5, 6, 8, 3)
    frames[2] = 1.0
    pic = P.to_pil(frames)
    assert pic.size == (8, 6) and np.asarray(pic).min() == 255
    grid = P.preview_grid([("wide", torch.rand(6, 12, 3)), ("grey", torch.rand(10, 10, 1))], tile=30)
    assert grid.size == (60 + 4 + 30, 30 + P.CAPTION)
    assert P.preview_grid([]) is None


def test_with_a_decoder_only_the_shown_latents_are_decoded():
    tree, images = _tree()
    calls = []

    def decode(x0):
        calls.append(x0.shape[0])
        return decode_to_image(x0)

    keep = P.PreviewKeeper(decode=decode, max_eval=2)
    rewards = torch.linspace(0, 1, images.shape[0])
    keep.rollout(tree, rewards, None)  # the trainer kept no images
    t0 = torch.nonzero(tree.leaf_tree() == 0).flatten()
    assert calls == [2]
    assert torch.equal(keep.best[1], images[t0[-1]]) and torch.equal(keep.worst[1], images[t0[0]])
    x0 = torch.randn(6, 4, 4, 4)
    keep.evaluation(3, {"x0": x0, "rewards": torch.arange(6.0)})
    assert calls == [2, 2] and torch.equal(keep.eval[1][1], decode_to_image(x0[1:2])[0])
    assert keep.image().size == (4 * P.TILE + 3 * 4, P.TILE + P.CAPTION)
