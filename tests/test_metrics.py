"""The trainer's health metrics: reward spread within trees, KL to the reference, held-out ODE evaluation,
pre-clip gradient norm; and the config fields that switch them."""
from __future__ import annotations

import math

import pytest
import torch

from branchgrpo import BranchGRPOTrainer, BranchSchedule, Callback, OptimConfig, TrainerConfig
from branchgrpo.evaluate import reward_spread, seed_noise
from branchgrpo.lora import LoRAConfig
from branchgrpo.peft_adapter import PeftAdapter
from branchgrpo.tree import rollout
from tiny_flow import MeanBrightness, TinyFlow, decode_to_image

SHAPE = (4, 4, 4)
SCHED = BranchSchedule(num_steps=4, split_steps=(0, 1))


def trainer(iterations=2, eval_prompts=(), keep_images=False, callbacks=(), lr=3e-2, **over):
    model = TinyFlow(seed=0)
    model.requires_grad_(False)
    lora = PeftAdapter(model, LoRAConfig(rank=4, alpha=4, targets=("blocks.*",)), seed=0)
    optim = over.pop("optim", OptimConfig(learning_rate=lr))
    cfg = TrainerConfig(schedule=SCHED, iterations=iterations, prompts_per_iteration=2, seed=5, optim=optim, **over)
    return BranchGRPOTrainer(model, lora, ["a cat", "a dog", "a bird"], [MeanBrightness()], decode_to_image, cfg,
                             SHAPE, eval_prompts=eval_prompts, keep_images=keep_images, callbacks=list(callbacks))


def test_reward_spread_is_the_mean_within_tree_std():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 10.0, 5.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2])
    assert reward_spread(r, g) == pytest.approx((math.sqrt(5 / 3) + 0.0 + 0.0) / 3)
    # interleaved groups, not contiguous
    assert reward_spread(torch.tensor([0.0, 5.0, 2.0, 5.0]), torch.tensor([0, 1, 0, 1])) == pytest.approx(
        math.sqrt(2.0) / 2)
    with pytest.raises(ValueError):
        reward_spread(r, g[:3])


def test_trainer_reports_reward_spread_before_normalisation():
    tr = trainer(iterations=2, kl_metric_parents=0)
    for _ in range(2):
        m = tr.step()
        r, t = tr.last_rewards, tr.last_tree.leaf_tree()
        by_hand = sum(float(r[t == k].std()) for k in range(tr.last_tree.num_trees)) / tr.last_tree.num_trees
        assert m["reward_spread"] == pytest.approx(by_hand, rel=1e-6) and m["reward_spread"] > 0
        assert "kl_ref" not in m and m["nfe_metrics"] == 0 and m["nfe_eval"] == 0
    # the old keys are still there
    assert {"adv_std", "loss", "clipfrac", "grad_norm", "reward_mean", "kl"} <= set(m)


def test_kl_metric_is_zero_for_a_fresh_adapter_positive_after_a_step_and_does_not_change_training():
    tr = trainer(iterations=2, kl_metric_parents=3)
    cond = tr.model.encode(["a cat", "a dog"])
    tree = rollout(tr.model, cond, 2, SCHED, SHAPE, generator=torch.Generator().manual_seed(0))
    fresh = tr._monitor(cond, tree, tree.edges, SCHED)
    assert fresh["kl_ref"] == 0.0 and fresh["nfe_metrics"] == 2 * 3
    m1 = tr.step()
    assert m1["kl_ref"] > 0 and m1["nfe_metrics"] == 6
    assert m1["nfe_train"] == torch.unique(tr.last_tree.parent[tr.last_tree.edges]).numel()  # not counted there
    m2 = tr.step()
    assert m2["kl_ref"] > 0
    off = trainer(iterations=2, kl_metric_parents=0)
    off.train()
    for a, b in zip(off.adapter.parameters(), tr.adapter.parameters()):
        assert torch.equal(a, b)
    assert [h["reward_mean"] for h in off.history] == [m1["reward_mean"], m2["reward_mean"]]


def test_eval_reward_is_deterministic_uses_the_ode_and_reaches_callbacks():
    seen = []

    class Keep(Callback):
        def on_evaluation(self, iteration, result):
            seen.append((iteration, result["images"].shape, result["reward"]))

    a = trainer(iterations=3, eval_prompts=["a fish", "a tree"], eval_every=2, eval_seeds=2, keep_images=True,
                callbacks=[Keep()], kl_metric_parents=0)
    hist = a.train()
    b = trainer(iterations=3, eval_prompts=["a fish", "a tree"], eval_every=2, eval_seeds=2, kl_metric_parents=0)
    assert [h.get("eval_reward") for h in b.train()] == [h.get("eval_reward") for h in hist]
    # iterations 1 (first), 2 (every 2nd) and 3 (last)
    assert [i for i, _, _ in seen] == [1, 2, 3] and all(s == (4, 4, 4, 3) for _, s, _ in seen)
    assert all(h["nfe_eval"] == 2 * 2 * SCHED.num_steps for h in hist)
    # the last evaluation is the Euler ODE of the trained model from seeds 0 and 1, written out
    model, sigmas = a.model, SCHED.sigmas()
    want = []
    with torch.no_grad():
        cond = model.encode(["a fish", "a tree"])
        for p in range(2):
            x = seed_noise([0, 1], SHAPE)
            for i in range(SCHED.num_steps):
                v = model.velocity(x, torch.full((2,), float(sigmas[i])), cond, torch.full((2,), p))
                x = x + (float(sigmas[i + 1]) - float(sigmas[i])) * v
            want.append(decode_to_image(x).flatten(1).mean(1))
    want = torch.cat(want)
    assert hist[-1]["eval_reward"] == pytest.approx(float(want.mean()), abs=1e-5)
    assert hist[-1]["eval_reward_std"] == pytest.approx(float(want.std()), abs=1e-5)
    assert seen[-1][2] == hist[-1]["eval_reward"]


def test_grad_norm_is_the_norm_before_clipping():
    tight = trainer(iterations=1, optim=OptimConfig(learning_rate=1e-2, max_grad_norm=1e-6), kl_metric_parents=0)
    loose = trainer(iterations=1, optim=OptimConfig(learning_rate=1e-2, max_grad_norm=1e6), kl_metric_parents=0)
    a, b = tight.step(), loose.step()
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5) and a["grad_norm"] > 1e-3


def test_config_fields_validate_and_old_configs_load():
    old = TrainerConfig().to_dict()
    for key in TrainerConfig.MONITORING_FIELDS:
        old.pop(key)
    cfg = TrainerConfig.from_dict(old)
    assert (cfg.kl_metric_parents, cfg.eval_every, cfg.eval_seeds) == (4, 0, 2)
    for bad in ({"eval_every": -1}, {"kl_metric_parents": -2}, {"eval_seeds": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainerConfig(**bad).validate()
    with pytest.raises(ValueError, match="no evaluation prompts"):
        trainer(eval_every=2)
