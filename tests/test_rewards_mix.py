"""Reward fusion (RewardMix) against the engine's advantage code, the registry, and the grad contract."""
from __future__ import annotations

import pytest
import torch

import tiny_rewards as tr
from branchgrpo.advantage import AdvantageConfig, compute_advantages
from branchgrpo.rewards import RewardMix, make_reward, reward_names
from branchgrpo.rewards.weight_free import WEIGHT_FREE_REWARDS
from branchgrpo.schedule import BranchSchedule
from branchgrpo.tree import rollout


class ZeroVelocity:
    """The smallest VelocityModel: enough to build a real tree for the advantage code."""

    def encode(self, prompts):
        return list(prompts)

    def velocity(self, x, sigma, cond, index):
        return torch.zeros_like(x)


def _tree(prompts=("a", "b")):
    sch = BranchSchedule(num_steps=4, split_steps=(0, 2), branching=2)
    return rollout(ZeroVelocity(), list(prompts), len(prompts), sch, (1, 2, 2),
                   generator=torch.Generator().manual_seed(0))


class Scaled:
    """A deterministic differentiable 'reward' on its own scale: scale * mean pixel of channel c."""

    differentiable = True

    def __init__(self, name, scale, channel):
        self.name, self.scale, self.channel = name, scale, channel

    def __call__(self, images, prompts=None, grad=False):
        return self.scale * images[..., self.channel].flatten(1).mean(1)


def test_mix_is_callable_as_the_weighted_sum():
    a, b = Scaled("a", 20.0, 0), Scaled("b", 0.3, 1)
    mix = RewardMix([a, b], [1.0, 2.0], "advantage_sum")
    x = tr.tiny_images(4)
    assert mix.rewards == [a, b] and mix.weights == [1.0, 2.0] and mix.aggregation == "advantage_sum"
    assert torch.allclose(mix.score_all(x), torch.stack([a(x), b(x)]))
    assert torch.allclose(mix(x, "p"), a(x) + 2.0 * b(x))
    assert mix.differentiable and "20" not in mix.name and "a" in mix.name


@pytest.mark.parametrize("aggregation", ["reward_sum", "advantage_sum"])
def test_fusion_matches_compute_advantages(aggregation):
    tree = _tree()
    n = tree.leaves.numel()
    g = torch.Generator().manual_seed(1)
    leaves = torch.rand(n, 8, 8, 3, generator=g)
    a, b = Scaled("pick_like", 20.0, 0), Scaled("hps_like", 0.3, 2)
    mix = RewardMix([a, b], [1.0, 0.5], aggregation)
    scores = mix.score_all(leaves, ["p"] * n)            # [R, L], what the trainer fuses
    cfg = AdvantageConfig(aggregation=aggregation, clip=100.0)
    got = compute_advantages(tree, scores, cfg, mix.weights)
    if aggregation == "reward_sum":
        want = compute_advantages(tree, a(leaves) + 0.5 * b(leaves), AdvantageConfig(clip=100.0))
        assert torch.allclose(got, compute_advantages(tree, mix(leaves), AdvantageConfig(clip=100.0)), atol=1e-6)
    else:
        single = AdvantageConfig(clip=100.0)
        want = compute_advantages(tree, a(leaves), single) + 0.5 * compute_advantages(tree, b(leaves), single)
        # scale-invariance: the 20x reward does not dominate the 0.3x one beyond its weight
        assert torch.allclose(got, compute_advantages(tree, torch.stack([a(leaves) / 20, b(leaves) / 0.3]), cfg,
                                                      mix.weights), atol=1e-5)
    assert torch.allclose(got, want, atol=1e-5)


def test_nesting_zero_weights_and_errors():
    a, b, c = Scaled("a", 1, 0), Scaled("b", 1, 1), Scaled("c", 1, 2)
    inner = RewardMix([a, b], [1.0, 3.0], "reward_sum")
    flat = RewardMix([inner, c], [2.0, 1.0], "reward_sum")
    assert flat.rewards == [a, b, c] and flat.weights == [2.0, 6.0, 1.0]
    kept = RewardMix([inner, c], [2.0, 1.0], "advantage_sum")
    assert kept.rewards == [inner, c]  # a reward_sum mix is one reward inside an advantage_sum mix
    adv_inner = RewardMix([a, b], [1.0, 1.0], "advantage_sum")
    assert RewardMix([adv_inner, c], [0.5, 1.0], "advantage_sum").weights == [0.5, 0.5, 1.0]
    with pytest.raises(ValueError, match="cannot be nested"):
        RewardMix([adv_inner, c], [1.0, 1.0], "reward_sum")
    assert RewardMix([a, b], [0.0, 1.0]).rewards == [b]
    with pytest.raises(ValueError, match="every weight is 0"):
        RewardMix([a, b], [0.0, 0.0])
    with pytest.raises(ValueError, match="aggregation"):
        RewardMix([a], [1.0], "mean")
    with pytest.raises(ValueError, match="one weight each"):
        RewardMix([a, b], [1.0])
    with pytest.raises(ValueError, match="not callable"):
        RewardMix([object()], [1.0])
    with pytest.raises(ValueError, match="finite"):
        RewardMix([a], [float("nan")])


def test_mix_of_weight_free_and_grad_contract():
    jpeg, sat = make_reward("jpeg_compressibility"), make_reward("saturation")
    x = tr.tiny_images(2).requires_grad_(True)
    mix = RewardMix([jpeg, sat], [1.0, 1.0])
    assert not mix.differentiable
    with pytest.raises(ValueError, match="not differentiable"):
        mix(x, "p", grad=True)
    diff = RewardMix([sat, make_reward("contrast")], [1.0, 2.0])
    diff(x, "p", grad=True).sum().backward()
    assert float(x.grad.abs().sum()) > 0
    v = tr.tiny_images(2, video_frames=3)
    assert mix(v, ["a", "b"]).shape == (2,)


def test_registry_lists_every_reward():
    names = reward_names()
    for n in ("imagereward", "hps_v2.1", "pickscore", "clip_score", "aesthetic", *WEIGHT_FREE_REWARDS):
        assert n in names
    assert make_reward("brightness", target=0.25).target == 0.25
    with pytest.raises(ValueError, match="valid names"):
        make_reward("nope")
