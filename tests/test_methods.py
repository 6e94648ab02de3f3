"""Forward-process objectives (DiffusionNFT, AWM, DGPO) and the step-credit presets: each loss against
a hand computation written from the paper's formula, a float64 gradient check on a tiny linear
velocity model, the objectives fed by a tree and by a flat group, and every new preset raising a
held-out reward of the toy DiT in a short CPU run."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from branchgrpo import AdvantageConfig, BranchGRPOTrainer, BranchSchedule, OptimConfig, TrainerConfig, preset
from branchgrpo.lora import LoRAConfig
from branchgrpo.peft_adapter import PeftAdapter
from branchgrpo.objectives import (EMAPolicy, ObjectiveConfig, awm_logprob, awm_loss, dgpo_clip_mask, dgpo_loss,
                                   nft_loss, nft_reward_weight, old_decay, pick_timesteps, velocity_kl)
from tiny_flow import MeanBrightness, TinyFlow, decode_to_image

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (4, 4, 4)


# ---------------------------------------------------------------- hand computations
def test_nft_loss_by_hand():
    # One element: v = 0.5, v_old = 0.3, x_t = 0.8, x0 = 0.2, t = 0.6, A = 2.5 with clip 5 -> r = 0.75.
    one = lambda x: torch.tensor([[x]])  # noqa: E731
    r = nft_reward_weight(torch.tensor([2.5]), 5.0)
    assert r.item() == pytest.approx(0.75)
    assert nft_reward_weight(torch.tensor([-9.0, 9.0]), 5.0).tolist() == [0.0, 1.0]
    # beta = 1: v+ = 0.5, v- = 2*0.3 - 0.5 = 0.1; x0+ = 0.8 - 0.6*0.5 = 0.5, x0- = 0.74.
    # L+ = 0.3^2 / 0.3 = 0.3, L- = 0.54^2 / 0.54 = 0.54; loss = 5 (0.75*0.3 + 0.25*0.54) / 1 = 1.8
    got = nft_loss(one(0.5), one(0.3), one(0.8), one(0.2), torch.tensor([0.6]), r, 1.0, 5.0)
    assert got.item() == pytest.approx(1.8, abs=1e-6)
    # beta = 0.5: v+ = 0.4, v- = 0.2; x0+ = 0.56 (err 0.36), x0- = 0.68 (err 0.48);
    # loss = 5 (0.75*0.36 + 0.25*0.48) / 0.5 = 3.9
    got = nft_loss(one(0.5), one(0.3), one(0.8), one(0.2), torch.tensor([0.6]), r, 0.5, 5.0)
    assert got.item() == pytest.approx(3.9, abs=1e-6)
    # Two elements: the adaptive weight is the mean |error|, the loss the mean squared error over it.
    v, vo = torch.tensor([[0.5, -0.5]]), torch.tensor([[0.5, -0.5]])
    xt, x0 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    # v+ = v- = v: x0 = [1 - 0.5*0.5, 0.25] = [0.75, 0.25]; w = 0.5; mse = (0.5625 + 0.0625)/2 = 0.3125
    got = nft_loss(v, vo, xt, x0, torch.tensor([0.5]), torch.tensor([1.0]), 1.0, 5.0)
    assert got.item() == pytest.approx(5 * 0.3125 / 0.5, abs=1e-6)


def test_awm_loss_by_hand():
    v, target = torch.tensor([[0.5, -0.1]]), torch.tensor([[0.2, 0.3]])
    mse = (0.3 ** 2 + 0.4 ** 2) / 2  # 0.125
    t = torch.tensor([0.6])
    assert awm_logprob(v, target, t, "uniform").item() == pytest.approx(-mse)
    assert awm_logprob(v, target, t, "t").item() == pytest.approx(-0.6 * mse)
    ghuber = -((mse + 1e-10) ** 0.25 - 1e-10 ** 0.25) * 0.6 / 0.25
    assert awm_logprob(v, target, t, "ghuber", 0.25).item() == pytest.approx(ghuber, rel=1e-6)
    # PPO ratio exp(-0.1 + 0.2) = 1.105 clipped to 1.05: A = 1 -> max(-1.105, -1.05) = -1.05; A = -1 -> 1.105
    lp, old = torch.tensor([-0.1, -0.1]), torch.tensor([-0.2, -0.2])
    got = awm_loss(lp, old, torch.tensor([1.0, -1.0]), 0.05)
    assert got.tolist() == pytest.approx([-1.05, math.exp(0.1)], abs=1e-6)


def test_dgpo_loss_by_hand_and_official_gradient():
    # One group of two: better sample (A = 1) dsm 0.2 vs ref 0.3, worse (A = -1) dsm 0.5 vs ref 0.3.
    dsm = torch.tensor([0.2, 0.5], requires_grad=True)
    ref, adv, group = torch.tensor([0.3, 0.3]), torch.tensor([1.0, -1.0]), torch.tensor([0, 0])
    beta = 10.0
    z = beta * (1 * (0.2 - 0.3) + (-1) * (0.5 - 0.3)) / 2  # -1.5
    want = math.log1p(math.exp(z)) * 2 / beta  # -log sigmoid(-z) * G / beta
    loss = dgpo_loss(dsm, ref, adv, group, beta)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    (loss / 2).backward()
    # The official code's loss: mean(sigmoid(z).detach() * A * dsm) over the 2 samples.
    official = (torch.sigmoid(torch.tensor(z)) * adv / 2)
    assert torch.allclose(dsm.grad, official, atol=1e-7)
    # Groups are independent: a second group leaves the first one's term unchanged.
    two = dgpo_loss(torch.tensor([0.2, 0.5, 0.1, 0.1]), torch.tensor([0.3, 0.3, 0.1, 0.1]),
                    torch.tensor([1.0, -1.0, 1.0, -1.0]), torch.tensor([0, 0, 7, 7]), beta)
    assert two.item() == pytest.approx(want + math.log(2) * 2 / beta, rel=1e-6)
    # clip_dsm: ratio exp(dsm_old - dsm) above 1 + eps for A > 0, below 1 - eps for A < 0
    mask = dgpo_clip_mask(torch.tensor([0.1, 0.1, 0.3, 0.3]), torch.tensor([0.3, 0.1, 0.1, 0.3]),
                          torch.tensor([1.0, 1.0, -1.0, -1.0]), 0.01)
    assert mask.tolist() == [True, False, True, False]


def test_old_policy_decay_and_swap():
    assert [old_decay(n, 0.001, 0.5) for n in (0, 10, 600)] == [0.0, pytest.approx(0.01), 0.5]
    assert old_decay(50, 0.0075, 0.999, flat=75) == 0.0
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = EMAPolicy([p])
    with torch.no_grad():
        p.add_(1.0)
    ema.update(0.25)  # 0.25 * old + 0.75 * new
    assert ema.shadow[0].tolist() == pytest.approx([1.75, 2.75])
    with ema.active():
        assert p.tolist() == pytest.approx([1.75, 2.75])
    assert p.tolist() == [2.0, 3.0]


# ---------------------------------------------------------------- gradient checks (float64)
def _linear_setup(seed=0, n=4, d=3):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, d, generator=g, dtype=torch.float64, requires_grad=True)
    x0 = torch.randn(n, d, generator=g, dtype=torch.float64)
    eps = torch.randn(n, d, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.8 + 0.1
    xt = (1 - t[:, None]) * x0 + t[:, None] * eps
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    W_other = W.detach() + 0.1 * torch.randn(d, d, generator=g, dtype=torch.float64)
    return W, x0, eps, t, xt, adv, W_other


def test_gradcheck_nft():
    W, x0, eps, t, xt, adv, W_old = _linear_setup()
    v_old = xt @ W_old + t[:, None]
    r = nft_reward_weight(adv, 2.0)
    with torch.no_grad():  # the adaptive weights are constants of the backward (detached)
        v = xt @ W + t[:, None]
        w_pos = ((xt - t[:, None] * (0.7 * v + 0.3 * v_old)) - x0).abs().mean(1)
        w_neg = ((xt - t[:, None] * (1.7 * v_old - 0.7 * v)) - x0).abs().mean(1)
    f = lambda W: nft_loss(xt @ W + t[:, None], v_old, xt, x0, t, r, 0.7, 2.0, (w_pos, w_neg)).sum()  # noqa: E731
    assert torch.autograd.gradcheck(f, (W,))


def test_gradcheck_awm_and_kl():
    W, x0, eps, t, xt, adv, W_old = _linear_setup(1)
    old = awm_logprob(xt @ W_old, eps - x0, t, "ghuber").detach()
    f = lambda W: (awm_loss(awm_logprob(xt @ W, eps - x0, t, "ghuber"), old, adv, 10.0)  # noqa: E731
                   + 0.3 * velocity_kl(xt @ W, xt @ W_old)).sum()
    assert torch.autograd.gradcheck(f, (W,))


def test_gradcheck_dgpo():
    W, x0, eps, t, xt, adv, W_ref = _linear_setup(2, n=6)
    ref = ((eps - x0 - xt @ W_ref) ** 2).mean(1)
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    f = lambda W: dgpo_loss(((eps - x0 - xt @ W) ** 2).mean(1), ref, adv, group, 3.0)  # noqa: E731
    assert torch.autograd.gradcheck(f, (W,))


# ---------------------------------------------------------------- the objectives in the trainer
def adapted(seed=0):
    model = TinyFlow(seed=seed)
    model.requires_grad_(False)
    lora = PeftAdapter(model, LoRAConfig(rank=4, alpha=4, targets=("blocks.*",)), seed=seed)
    return model, lora


@pytest.mark.parametrize("name", ["diffusionnft", "awm", "dgpo"])
@pytest.mark.parametrize("sampler", ["tree", "flat"])
def test_every_objective_trains_on_a_tree_and_on_a_flat_ode_group(name, sampler):
    model, lora = adapted()
    if sampler == "tree":
        sch = BranchSchedule(num_steps=5, split_steps=(0, 2), sde_window=(0, 0))
        adv = AdvantageConfig(mode="tree")
    else:
        sch = BranchSchedule(num_steps=5, split_steps=(), branching=1, group_size=4, sde_window=(0, 0))
        adv = AdvantageConfig(mode="group")
    obj = ObjectiveConfig(name=name, train_timesteps=2, kl_beta=0.01, old_kl_beta=0.5 if name == "awm" else 0.0,
                          shared_noise=name == "dgpo")
    cfg = TrainerConfig(schedule=sch, advantage=adv, objective=obj, iterations=2, prompts_per_iteration=2,
                        optim=OptimConfig(learning_rate=1e-2, max_train_batch=3))
    tr = BranchGRPOTrainer(model, lora, ["a cat", "a dog"], [MeanBrightness()], decode_to_image, cfg, SHAPE)
    before = [p.detach().clone() for p in lora.parameters()]
    m = tr.step()
    n = 2 * sch.num_leaves()
    # forwards: the policy, plus the reference (KL, DGPO) and the old policy (NFT, AWM's EMA-KL, DGPO's clip)
    per = 1 + 1 + (1 if name in ("diffusionnft", "awm", "dgpo") else 0)
    # DGPO's groups (4 samples) exceed max_train_batch (3): one more forward, without gradients, per sample
    per += 1 if name == "dgpo" else 0
    assert m["nfe_train"] == per * n * 2 and m["edges_trained"] == n * 2
    assert m["optimizer_steps"] == 1 and math.isfinite(m["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, lora.parameters()))
    assert (tr.old_policy is not None) == obj.needs_old()
    if tr.old_policy is not None:  # decay 0.001 after one step: the old policy followed the adapter
        assert any(not torch.equal(a, b) for a, b in zip(before, tr.old_policy.shadow))


def test_forward_objective_resume_equals_uninterrupted_run(tmp_path):
    def make():
        model, lora = adapted()
        cfg = preset("branch-nft", iterations=3, prompts_per_iteration=1, seed=5)
        cfg.schedule = BranchSchedule(num_steps=5, split_steps=(0, 2), sde_window=(0, 0))
        cfg.objective.train_timesteps = 2
        cfg.optim.learning_rate = 1e-2
        return BranchGRPOTrainer(model, lora, ["a", "b"], [MeanBrightness()], decode_to_image, cfg, SHAPE), lora

    full, lora_full = make()
    full.train()
    part, _ = make()
    part.train(checkpoint_path=tmp_path / "ck.pt", until=2)
    resumed, lora_res = make()
    resumed.load_checkpoint(tmp_path / "ck.pt")
    resumed.train()
    assert all(torch.equal(a, b) for a, b in zip(lora_full.parameters(), lora_res.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(full.old_policy.shadow, resumed.old_policy.shadow))


def test_ppo_objective_rejects_an_ode_rollout_and_bad_objective_fields_are_named():
    with pytest.raises(ValueError, match="no SDE step"):
        TrainerConfig(schedule=BranchSchedule(split_steps=(), branching=1, group_size=4, sde_window=(0, 0))).validate()
    with pytest.raises(ValueError, match="objective: name"):
        TrainerConfig(objective=ObjectiveConfig(name="nft")).validate()
    with pytest.raises(ValueError, match="objective: dpo_beta"):
        TrainerConfig(objective=ObjectiveConfig(name="dgpo", dpo_beta=0)).validate()


def test_timestep_picks_follow_the_official_samplers():
    g = torch.Generator().manual_seed(0)
    sch = BranchSchedule(num_steps=14)
    awm = pick_timesteps(sch, preset("awm").objective, g)  # 6 strata of steps [1, 12)
    assert len(awm) == 6 and all(1 <= s < 12 for s in awm) and awm == sorted(awm)
    nft = pick_timesteps(BranchSchedule(num_steps=10), preset("diffusionnft").objective, g)
    assert len(set(nft)) == 9 and max(nft) <= 8
    dg = pick_timesteps(BranchSchedule(num_steps=10), preset("dgpo").objective, g)
    assert len(set(dg)) == 4 and max(dg) <= 4


def test_step_credit_presets_sample_and_train_what_they_say():
    tf = preset("tempflow-grpo")
    splits = {tf.schedule.for_iteration(i).split_steps for i in range(30)}
    assert len(splits) > 3 and all(len(s) == 1 and 0 <= s[0] < 7 for s in splits)
    s3 = tf.schedule.for_iteration(3)
    assert s3.sde_steps(3) == list(s3.split_steps) and s3.num_leaves() == 16
    fast = preset("flowgrpo-fast")
    windows = {tuple(fast.schedule.sde_steps(i)) for i in range(30)}
    assert len(windows) > 2 and all(len(w) == 2 and w[0] + 1 == w[1] and w[1] <= 4 for w in windows)


# ---------------------------------------------------------------- every new preset on the toy DiT
NEW_PRESETS = ("tempflow-grpo", "flowgrpo-fast", "diffusionnft", "awm", "dgpo", "branch-nft", "branch-awm",
               "branch-dgpo")
DEMO = Path(__file__).resolve().parent.parent / "demo" / "tiny_t2i.safetensors"


def toy_model():
    from safetensors import safe_open
    from safetensors.torch import load_file

    from branchgrpo.models.toy_dit import ToyDiT, ToyDiTConfig, ToyVelocityModel
    with safe_open(str(DEMO), "pt") as fh:
        config = ToyDiTConfig.from_dict(json.loads(fh.metadata()["model_config"]))
    net = ToyDiT(config)
    net.load_state_dict({k: v.float() for k, v in load_file(str(DEMO)).items()})
    return ToyVelocityModel(net.eval())


@torch.no_grad()
def heldout_reward(model, reward, classes=("purple gradient", "cyan stripes"), per=6, steps=8):
    from branchgrpo.sde import sigma_schedule
    prompts = [c for c in classes for _ in range(per)]
    cond = model.encode(list(classes))
    idx = torch.arange(len(classes)).repeat_interleave(per)
    x = torch.randn((len(prompts), *model.latent_shape), generator=torch.Generator().manual_seed(99))
    sig = sigma_schedule(steps, 3.0).float()
    for i in range(steps):
        x = x + (sig[i + 1] - sig[i]) * model.velocity(x, sig[i].expand(x.shape[0]), cond, idx)
    return float(reward(model.decode(x), prompts).mean())


def shrink(cfg: TrainerConfig) -> TrainerConfig:
    """The preset's method on an 8-step schedule with 8 samples per prompt (seconds on a CPU)."""
    s = cfg.schedule
    if s.branch_step_range is not None:
        s.num_steps, s.branching, s.branch_step_range = 8, 8, (0, 5)
    elif s.split_steps:
        s.num_steps, s.split_steps = 8, (0, 2, 4)
        s.branching = 2
    else:
        s.num_steps, s.group_size = 8, 8
        if s.sde_window_range is not None:
            s.sde_window_range = (0, 4)
    cfg.objective.train_timesteps = min(cfg.objective.train_timesteps, 3)
    return cfg


@pytest.mark.parametrize("name", NEW_PRESETS)
def test_new_preset_raises_the_heldout_reward_of_the_toy_dit(name):
    from branchgrpo.models.toy_dit import CLASS_NAMES
    from branchgrpo.rewards.weight_free import Brightness
    torch.manual_seed(0)
    model = toy_model()
    model.requires_grad_(False)
    lora = PeftAdapter(model, LoRAConfig(rank=4, alpha=4, targets=("*.attn.*", "*.mlp.*")), seed=0)
    reward = Brightness(target=1.0)
    cfg = shrink(preset(name, iterations=4, prompts_per_iteration=1, seed=0, max_batch=64))
    cfg.validate()
    cfg.optim.learning_rate = 2e-2 if cfg.objective.forward_process else 5e-2
    cfg.optim.kl_beta = 0.0
    cfg.objective.kl_beta = 0.0
    cfg.optim.max_train_batch = 16
    train_prompts = [c for c in CLASS_NAMES if c not in ("purple gradient", "cyan stripes")]
    before = heldout_reward(model, reward)
    tr = BranchGRPOTrainer(model, lora, train_prompts, [reward], model.decode, cfg, model.latent_shape)
    hist = tr.train()
    after = heldout_reward(model, reward)
    assert all(h["optimizer_steps"] == 1 for h in hist)
    assert after > before + 0.005, (name, before, after)
