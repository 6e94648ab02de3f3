"""Engine tests on tiny random-weight models: SDE maths, tree structure, advantages, pruning, the
update, determinism, video latents, checkpoint/resume."""
from __future__ import annotations

import math

import pytest
import torch

from branchgrpo import (AdvantageConfig, BranchGRPOTrainer, BranchSchedule, OptimConfig, PruningConfig,
                        TrainerConfig, compute_advantages, preset, rollout, select_edges)
from branchgrpo.advantage import depth_advantages, group_advantages, node_rewards
from branchgrpo.lora import LoRAConfig
from branchgrpo.loss import policy_update, ppo_clip_loss
from branchgrpo.peft_adapter import PeftAdapter
from branchgrpo.sde import (flux_shift, gaussian_kl, gaussian_logprob, sigma_schedule, step_distribution)
from tiny_flow import MeanBrightness, TinyFlow, decode_to_image

SHAPE = (4, 4, 4)


def tiny_tree(schedule=None, prompts=("a cat", "a dog"), seed=0, max_batch=64, shape=SHAPE, model=None):
    model = model or TinyFlow()
    schedule = schedule or BranchSchedule()
    g = torch.Generator().manual_seed(seed)
    return rollout(model, model.encode(list(prompts)), len(prompts), schedule, shape, generator=g,
                   max_batch=max_batch), model


# ---------------------------------------------------------------- SDE steps
def test_sigma_schedule_matches_spec():
    s = sigma_schedule(20, 3.0)
    expect = [1.0, .983, .964, .944, .923, .900, .875, .848, .818, .786, .750, .711, .667, .618, .563,
              .500, .429, .346, .250, .136, 0.0]
    assert torch.allclose(s.float(), torch.tensor(expect), atol=6e-4)
    assert flux_shift(4096) == pytest.approx(math.exp(1.15))
    assert flux_shift(256) == pytest.approx(math.exp(0.5))


def test_logprob_equals_torch_normal_mean():
    g = torch.Generator().manual_seed(1)
    mean, sample = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    std = torch.tensor([0.1, 0.5, 2.0]).view(3, 1, 1)
    ref = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(sample).flatten(1).mean(1)
    assert torch.allclose(gaussian_logprob(sample, mean, std), ref, atol=1e-6)


def test_sde_steps_match_hand_computed_values():
    x, v = torch.tensor([[0.5]]), torch.tensor([[0.2]])
    mean, std = step_distribution(x, v, torch.tensor(0.8), torch.tensor(0.6), "dancegrpo", 0.3)
    # mean = x - D [v + eta^2/(2 sigma) (x + (1-sigma) v)], std = eta sqrt(D), D = 0.2
    assert mean.item() == pytest.approx(0.5 - 0.2 * (0.2 + 0.09 / 1.6 * 0.54), abs=1e-6)
    assert std.item() == pytest.approx(0.3 * math.sqrt(0.2), abs=1e-6)
    mean, std = step_distribution(x, v, torch.tensor(0.8), torch.tensor(0.6), "flowgrpo", 0.7)
    st = 0.7 * math.sqrt(0.8 / 0.2)  # a sqrt(sigma / (1 - sigma)) = 1.4
    assert mean.item() == pytest.approx(0.5 - 0.2 * (0.2 + st ** 2 / 1.6 * 0.54), abs=1e-6)
    assert std.item() == pytest.approx(st * math.sqrt(0.2), abs=1e-6)
    # The Flow-GRPO guard at sigma = 1 uses 1 - sigma_1 as the denominator.
    _, std1 = step_distribution(x, v, torch.tensor(1.0), torch.tensor(0.9), "flowgrpo", 0.7, sigma_one=0.9)
    assert std1.item() == pytest.approx(0.7 * math.sqrt(1.0 / 0.1) * math.sqrt(0.1), abs=1e-5)
    mean, std = step_distribution(x, v, torch.tensor(0.8), torch.tensor(0.6), "ode", 0.3)
    assert mean.item() == pytest.approx(0.5 - 0.2 * 0.2) and std.item() == 0.0


def test_gaussian_kl_closed_form():
    a, b, std = torch.ones(2, 3), torch.zeros(2, 3), torch.full((2, 1), 0.5)
    assert torch.allclose(gaussian_kl(a, b, std), torch.full((2,), 2.0))
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(a, 0.5), torch.distributions.Normal(b, 0.5))
    assert torch.allclose(gaussian_kl(a, b, std), ref.mean(1))


# ---------------------------------------------------------------- tree structure
def test_default_tree_counts():
    sch = BranchSchedule()
    assert (sch.num_leaves(), sch.rollout_nfe(), sch.num_edges()) == (16, 203, 218)
    tree, _ = tiny_tree(sch)
    assert tree.leaves.numel() == 32 and tree.nfe == 2 * 203 and tree.num_edges == 2 * 218
    assert tree.num_nodes == 2 * 219
    widths = [int(((tree.depth == d) & (tree.tree == 0)).sum()) for d in range(21)]
    assert widths == [1, 2, 2, 2, 4, 4, 4, 8, 8, 8] + [16] * 11
    # the children of a fork share the parent's evaluation: same parent, different latents
    kids = torch.nonzero(tree.is_fork & (tree.depth == 1)).flatten()
    assert tree.parent[kids[0]] == tree.parent[kids[1]]
    assert not torch.equal(tree.latents[kids[0]], tree.latents[kids[1]])


def test_k4_tree_and_per_split_branching():
    sch = BranchSchedule(split_steps=(0, 10), branching=4)
    assert sch.num_leaves() == 16
    tree, _ = tiny_tree(sch, prompts=("x",))
    assert tree.leaves.numel() == 16
    assert tree.nfe == 1 + 4 * 10 + 16 * 9 == sch.rollout_nfe()
    sch = BranchSchedule(split_steps=(0, 5), branching=(3, 2))
    assert sch.num_leaves() == 6 and sch.width_after()[5] == 6


def test_flat_group_is_a_tree_without_splits():
    sch = preset("dancegrpo").schedule
    assert (sch.num_leaves(), sch.rollout_nfe(), sch.num_edges()) == (16, 320, 320)


def test_batched_and_one_at_a_time_rollouts_agree():
    sch = BranchSchedule(num_steps=8, split_steps=(0, 2, 4))
    a, _ = tiny_tree(sch, max_batch=64)
    b, _ = tiny_tree(sch, max_batch=1)
    assert torch.allclose(a.latents, b.latents, atol=1e-5)
    assert torch.allclose(a.logprob, b.logprob, atol=1e-4)
    assert a.nfe == b.nfe


def test_mix_schedule_sde_steps_and_ode_edges():
    sch = preset("branchgrpo-mix").schedule
    assert sch.sde_steps() == [0, 1, 2, 3, 6, 9]
    tree, _ = tiny_tree(sch, prompts=("p",))
    assert int(tree.is_sde.sum()) == 34
    assert torch.all(tree.logprob[~tree.is_sde] == 0)
    moving = BranchSchedule(split_steps=(), group_size=4, sde_window=(0, 5), sde_window_slide_every=2)
    assert moving.sde_steps(0) == [0, 1, 2, 3, 4] and moving.sde_steps(2) == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------- advantages
def test_depth_advantages_values():
    tree, _ = tiny_tree()
    r = torch.randn(tree.leaves.numel(), generator=torch.Generator().manual_seed(3))
    adv = compute_advantages(tree, r, AdvantageConfig())
    for t in range(2):
        for d in range(21):
            a = adv[(tree.depth == d) & (tree.tree == t)]
            assert abs(float(a.mean())) < 1e-5
            if a.numel() == 1:
                assert float(a) == 0.0
            if a.numel() == 2:
                assert torch.allclose(a.abs(), torch.full((2,), 1 / math.sqrt(2)), atol=1e-5)
    # every node's fused reward is the mean of its leaves; the root's is the tree mean
    nr = node_rewards(tree, r)
    roots = torch.nonzero(tree.parent < 0).flatten()
    for t, root in enumerate(roots):
        assert nr[root].item() == pytest.approx(r[tree.leaf_tree() == t].double().mean().item())


def test_path_prob_fusion_and_group_mode():
    tree, _ = tiny_tree()
    r = torch.randn(tree.leaves.numel(), generator=torch.Generator().manual_seed(4))
    nr = node_rewards(tree, r, "path_prob", 1.0)
    # siblings' weights sum to 1, so a node's reward lies within its leaves' range
    assert torch.allclose(nr[tree.leaves], r.double())
    roots = torch.nonzero(tree.parent < 0).flatten()
    assert r[:16].min() <= nr[roots[0]] <= r[:16].max()
    # temperature 0 gives uniform weights at binary splits, i.e. mean fusion
    assert torch.allclose(node_rewards(tree, r, "path_prob", 0.0), node_rewards(tree, r, "mean"), atol=1e-9)
    flat, _ = tiny_tree(preset("dancegrpo").schedule)
    rf = torch.randn(32, generator=torch.Generator().manual_seed(5))
    ga = group_advantages(flat, rf)
    want = torch.cat([(rf[:16] - rf[:16].mean()) / rf[:16].std(), (rf[16:] - rf[16:].mean()) / rf[16:].std()])
    assert torch.allclose(ga[flat.leaves].float(), want, atol=1e-5)
    # for a flat group, per-depth z-scores of mean-fused rewards equal GRPO's per-prompt z-scores
    assert torch.allclose(depth_advantages(flat, node_rewards(flat, rf)), ga, atol=1e-6)
    glob = group_advantages(flat, rf, global_std=True)[flat.leaves]
    assert torch.allclose(glob[:16].float(), (rf[:16] - rf[:16].mean()) / rf.std(), atol=1e-5)


def test_multi_reward_aggregation():
    tree, _ = tiny_tree(prompts=("a",))
    g = torch.Generator().manual_seed(6)
    r1, r2 = torch.randn(16, generator=g), 10 * torch.randn(16, generator=g)
    cfg = AdvantageConfig(aggregation="reward_sum")
    assert torch.allclose(compute_advantages(tree, [r1, r2], cfg, [1.0, 0.5]),
                          compute_advantages(tree, r1 + 0.5 * r2, cfg), atol=1e-5)
    cfg = AdvantageConfig(aggregation="advantage_sum", clip=100)
    want = compute_advantages(tree, r1, cfg) + 0.5 * compute_advantages(tree, r2, cfg)
    assert torch.allclose(compute_advantages(tree, [r1, r2], cfg, [1.0, 0.5]), want, atol=1e-5)
    assert float(compute_advantages(tree, 1e3 * r1, AdvantageConfig(clip=0.5)).abs().max()) <= 0.5


# ---------------------------------------------------------------- pruning
def _edges(name, tree, iteration=0, total=1, adv=None):
    cfg = preset(name)
    adv = adv if adv is not None else torch.randn(tree.num_nodes, generator=torch.Generator().manual_seed(7))
    return select_edges(tree, adv, cfg.pruning, cfg.schedule.split_steps, iteration, total,
                        torch.Generator().manual_seed(0)), adv


def test_depth_pruning_keeps_138_edges_and_slides():
    tree, _ = tiny_tree(prompts=("a",))
    kept, _ = _edges("branchgrpo", tree)
    assert kept.numel() == 218
    kept, _ = _edges("branchgrpo-deppru", tree, 0, 300)
    assert kept.numel() == 138 and 138 / 16 == 8.625
    assert set(tree.depth[kept].tolist()).isdisjoint({16, 17, 18, 19, 20})
    kept, _ = _edges("branchgrpo-deppru", tree, 29, 300)  # 30th iteration: one shallower
    assert set(range(15, 20)).isdisjoint(tree.depth[kept].tolist()) and 20 in tree.depth[kept].tolist()
    kept, _ = _edges("branchgrpo-deppru", tree, 299, 300)  # stopped at depth 10
    assert set(range(10, 15)).isdisjoint(tree.depth[kept].tolist()) and kept.numel() == 138
    cfg = PruningConfig(depths=(15, 16, 17), depth_slide=True, depth_slide_interval=30, depth_stop=9)
    from branchgrpo.pruning import active_depths
    assert active_depths(cfg, 0, (0, 3, 6, 9)) == {15, 16, 17}
    assert active_depths(cfg, 29, (0, 3, 6, 9)) == {14, 15, 16}
    assert active_depths(cfg, 1000, (0, 3, 6, 9)) == {9, 10, 11}
    # active fraction: no pruning after int(total * fraction) iterations
    cfg = PruningConfig(depths=(16,), active_fraction=0.5)
    assert select_edges(tree, torch.zeros(tree.num_nodes), cfg, (0, 3, 6, 9), 4, 10).numel() == 218 - 16
    assert select_edges(tree, torch.zeros(tree.num_nodes), cfg, (0, 3, 6, 9), 5, 10).numel() == 218


def test_width_pruning_counts():
    tree, _ = tiny_tree(prompts=("a",))
    r = torch.randn(16, generator=torch.Generator().manual_seed(8))
    adv = compute_advantages(tree, r, AdvantageConfig())
    kept, _ = _edges("branchgrpo-widpru", tree, adv=adv)
    assert kept.numel() == 138
    last = kept[tree.depth[kept] > 10]
    assert last.numel() == 80
    # best/worst: 40 edges from the top leaves' chains, 40 from the bottom leaves'
    leaf_rank = torch.argsort(torch.argsort(r, descending=True))
    lineage = tree.ancestor_at(20 - 0)  # unused: chains map to leaves through advantages
    top = set(torch.sort(adv[last], descending=True).values[:40].tolist())
    assert min(top) > max(torch.sort(adv[last]).values[:40].tolist())
    # per-branch (official mode 1): half of each of the 16 post-split chains -> earliest steps
    cfg = PruningConfig(width_mode="per_branch", width_ratio=0.5)
    kept = select_edges(tree, adv, cfg, (0, 3, 6, 9))
    assert kept.numel() == 138
    post = kept[tree.depth[kept] > 10]
    assert sorted(set(tree.depth[post].tolist())) == [11, 12, 13, 14, 15]
    del leaf_rank, lineage


def test_baseline_edge_selection():
    flat, _ = tiny_tree(preset("dancegrpo").schedule, prompts=("a",))
    kept, _ = _edges("dancegrpo", flat)
    assert kept.numel() == 16 * 20  # the paper's NFE(pi_theta) = 20
    kept, _ = _edges("dancegrpo-tf0.6", flat)
    assert kept.numel() == 16 * 12  # the paper's 12
    per_root = torch.bincount(flat.root[kept], minlength=16)
    assert torch.all(per_root == 12)
    cfg = PruningConfig(train_last_step=False, timestep_fraction=0.6)
    kept = select_edges(flat, torch.zeros(flat.num_nodes), cfg, (), 0, 1, torch.Generator().manual_seed(0))
    assert kept.numel() == 16 * int(19 * 0.6) and not torch.any(flat.depth[kept] == 20)


# ---------------------------------------------------------------- the update
def adapted(seed=0, rank=4):
    model = TinyFlow(seed=seed)
    model.requires_grad_(False)
    lora = PeftAdapter(model, LoRAConfig(rank=rank, alpha=rank, targets=("blocks.*",)), seed=seed)
    return model, lora


@pytest.mark.parametrize("kind,eta", [("dancegrpo", 0.3), ("flowgrpo", 0.7)])
def test_first_ratio_is_one_and_only_adapter_gets_gradients(kind, eta):
    model, lora = adapted()
    with torch.no_grad():  # a non-trivial adapter, so the ratio test is not vacuous
        for p in lora.parameters():
            p.normal_(0, 0.1)
    sch = BranchSchedule(num_steps=6, split_steps=(0, 2), sde=kind, eta=eta)
    tree, _ = tiny_tree(sch, model=model, max_batch=5)
    adv = compute_advantages(tree, torch.randn(tree.leaves.numel()), AdvantageConfig())
    edges = select_edges(tree, adv, PruningConfig(), sch.split_steps)
    opt = torch.optim.SGD(lora.parameters(), lr=0.0)
    stats = policy_update(model, model.encode(["a cat", "a dog"]), tree, edges, adv, sch,
                          OptimConfig(max_train_batch=3), opt, lora.parameters())
    assert stats["ratio_max_dev"] < 1e-5
    assert stats["edges_trained"] == edges.numel() and stats["nfe_train"] == torch.unique(tree.parent[edges]).numel()
    # gradients: recompute one chunk by hand and check where they land
    par = tree.parent[edges][:4]
    v = model.velocity(tree.latents[par], tree.sigmas[tree.depth[par]].float(), model.encode(["a cat", "a dog"]),
                       tree.tree[par])
    v.sum().backward()
    mine = {id(p) for p in lora.parameters()}  # (peft puts the adapter inside the model)
    assert all(p.grad is None for p in model.parameters() if id(p) not in mine)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.parameters())


def test_ppo_clip_gradient_outside_band():
    eps = 0.1
    for adv, ratio, grad_zero in [(1.0, 1.5, True), (1.0, 0.5, False), (-1.0, 0.5, True), (-1.0, 1.5, False),
                                  (1.0, 1.05, False), (-1.0, 0.95, False)]:
        logp = torch.tensor([math.log(ratio)], requires_grad=True)
        loss, r, clipped = ppo_clip_loss(logp, torch.zeros(1), torch.tensor([adv]), eps)
        loss.sum().backward()
        assert (logp.grad.abs().item() == 0.0) == grad_zero, (adv, ratio)
        assert bool(clipped.item()) == grad_zero
        if not grad_zero:  # the surviving gradient pushes the ratio in the advantage's direction
            assert -logp.grad.item() * adv > 0


def test_kl_is_zero_at_start_and_counts_reference_forwards():
    model, lora = adapted()
    sch = BranchSchedule(num_steps=4, split_steps=(0,))
    tree, _ = tiny_tree(sch, model=model, prompts=("a",))
    adv = compute_advantages(tree, torch.randn(2), AdvantageConfig())
    edges = select_edges(tree, adv, PruningConfig(), sch.split_steps)
    opt = torch.optim.SGD(lora.parameters(), lr=0.0)
    st = policy_update(model, model.encode(["a"]), tree, edges, adv, sch, OptimConfig(kl_beta=0.5), opt,
                       lora.parameters(), reference=lora.disabled)
    assert st["kl"] == pytest.approx(0.0, abs=1e-10)
    assert st["nfe_train"] == 2 * torch.unique(tree.parent[edges]).numel()


def test_video_latents_go_through_rollout_advantages_and_loss():
    model, lora = adapted()
    shape = (4, 3, 2, 2)  # C, T, H, W
    sch = BranchSchedule(num_steps=5, split_steps=(0, 2))
    tree, _ = tiny_tree(sch, model=model, shape=shape, prompts=("a video",))
    assert tree.latents.shape[1:] == shape and tree.leaf_x0.shape == (4, *shape)
    images = decode_to_image(tree.leaf_x0)
    assert images.shape == (4, 3, 2, 2, 3)
    cfg = TrainerConfig(schedule=sch, iterations=2, optim=OptimConfig(learning_rate=1e-2))
    tr = BranchGRPOTrainer(model, lora, ["a video"], [MeanBrightness()], decode_to_image, cfg, shape)
    before = [p.detach().clone() for p in lora.parameters()]
    hist = tr.train()
    assert len(hist) == 2 and hist[-1]["edges_trained"] == sch.num_edges()
    assert any(not torch.equal(a, b) for a, b in zip(before, lora.parameters()))


# ---------------------------------------------------------------- trainer
def make_trainer(iterations=4, **over):
    model, lora = adapted()
    cfg = TrainerConfig(schedule=BranchSchedule(num_steps=6, split_steps=(0, 2, 4)), iterations=iterations,
                        prompts_per_iteration=2, seed=11,
                        optim=OptimConfig(learning_rate=3e-2, edges_per_step=7, max_train_batch=3),
                        pruning=PruningConfig(depths=(5, 6), depth_slide=True, depth_slide_interval=2,
                                              depth_stop=3), **over)
    return BranchGRPOTrainer(model, lora, ["a cat", "a dog", "a bird"], [MeanBrightness()], decode_to_image,
                             cfg, SHAPE), lora


def test_resume_equals_uninterrupted_run(tmp_path):
    full, lora_full = make_trainer()
    full.train()
    part, _ = make_trainer()
    part.train(checkpoint_path=tmp_path / "ck.pt", until=2)
    resumed, lora_res = make_trainer()
    resumed.load_checkpoint(tmp_path / "ck.pt")
    assert resumed.iteration == 2
    resumed.train()
    for a, b in zip(lora_full.parameters(), lora_res.parameters()):
        assert torch.equal(a, b)
    keys = ("reward_mean", "loss", "edges_trained")
    assert [[h[k] for k in keys] for h in full.history] == [[h[k] for k in keys] for h in resumed.history]
    cfg = BranchGRPOTrainer.read_checkpoint_config(tmp_path / "ck.pt")
    assert cfg.schedule.split_steps == (0, 2, 4) and cfg.optim.edges_per_step == 7


def test_seeded_determinism_and_progress_callbacks():
    from branchgrpo import Callback

    class Recorder(Callback):
        def __init__(self):
            self.calls, self.iters = [], []

        def on_model_call(self, phase, done, total):
            self.calls.append(phase)

        def on_iteration_end(self, iteration, metrics):
            self.iters.append(iteration)

    a, _ = make_trainer(iterations=2)
    rec = Recorder()
    a.callbacks.append(rec)
    ha = a.train()
    b, _ = make_trainer(iterations=2)
    hb = b.train()
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]
    assert rec.iters == [1, 2] and "rollout" in rec.calls and "train" in rec.calls


def test_cancel_between_model_calls_keeps_last_checkpoint(tmp_path):
    from branchgrpo import Callback

    class StopAt(Callback):
        def __init__(self):
            self.n = 0

        def on_model_call(self, phase, done, total):
            self.n += 1
            if self.n == 40:
                raise KeyboardInterrupt

    tr, lora = make_trainer(iterations=10, checkpoint_every=1)
    tr.callbacks.append(StopAt())
    with pytest.raises(KeyboardInterrupt):
        tr.train(checkpoint_path=tmp_path / "ck.pt")
    state = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert state["iteration"] == tr.iteration >= 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file left behind


def test_presets_counts():
    want = {"dancegrpo": (20.0, 20.0), "dancegrpo-tf0.6": (20.0, 12.0), "branchgrpo": (12.6875, 13.625),
            "branchgrpo-deppru": (12.6875, 8.625), "branchgrpo-widpru": (12.6875, 8.625),
            "branchgrpo-mix": (12.6875, 2.125), "mixgrpo": (20.0, 5.0), "flowgrpo": (10.0, 9.0)}
    for name, (nfe, edges) in want.items():
        cfg = preset(name)
        cfg.validate()
        tree, _ = tiny_tree(cfg.schedule, prompts=("a",))
        adv = compute_advantages(tree, torch.randn(tree.leaves.numel()), cfg.advantage)
        kept = select_edges(tree, adv, cfg.pruning, cfg.schedule.split_steps, 0, 100, torch.Generator())
        leaves = tree.leaves.numel()
        assert (tree.nfe / leaves, kept.numel() / leaves) == (nfe, edges), name


@pytest.mark.parametrize("change,field", [
    (dict(split_steps=(0, 25)), "split_steps"), (dict(branching=0), "branching"),
    (dict(split_steps=(), group_size=1), "branching"), (dict(sde="euler"), "sde"),
    (dict(sde_window=(30, 2)), "sde_window")])
def test_bad_schedules_name_their_field(change, field):
    sch = BranchSchedule(**change)
    with pytest.raises(ValueError, match=field):
        sch.validate()


def test_bad_trainer_input_fails_before_compute():
    model, lora = adapted()
    with pytest.raises(ValueError, match="prompt list is empty"):
        BranchGRPOTrainer(model, lora, [], [MeanBrightness()], decode_to_image, TrainerConfig(), SHAPE)
    with pytest.raises(ValueError, match="depths"):
        TrainerConfig(pruning=PruningConfig(depths=(21,))).validate()
    with pytest.raises(ValueError, match="clip_range"):
        TrainerConfig(optim=OptimConfig(clip_range=0)).validate()


def test_trained_lora_exports_and_reimports_exactly():
    tr, lora = make_trainer(iterations=2)
    tr.train()
    sd = lora.comfy_state_dict()
    assert all(k.startswith("diffusion_model.blocks.") for k in sd)
    fresh_model = TinyFlow()  # the same base weights, the file's LoRA merged in by hand
    with torch.no_grad():
        for name in lora.names:
            w = fresh_model.get_submodule(name).weight
            key = f"diffusion_model.{name}"
            w += sd[key + ".lora_up.weight"] @ sd[key + ".lora_down.weight"] * (sd[key + ".alpha"] / 4)
    x = torch.randn(3, *SHAPE)
    s = torch.tensor([0.9, 0.5, 0.1])
    cond = tr.model.encode(["a cat"])
    idx = torch.zeros(3, dtype=torch.long)
    torch.testing.assert_close(tr.model.velocity(x, s, cond, idx), fresh_model.velocity(x, s, cond, idx),
                               rtol=1e-5, atol=1e-6)
    with lora.disabled():
        base = tr.model.velocity(x, s, cond, idx)
    assert not torch.allclose(base, fresh_model.velocity(x, s, cond, idx))


def test_a_tree_does_not_depend_on_the_other_trees_of_its_batch():
    """One generator per tree: the tree of a prompt is the same alone or in a batch (what lets a
    distributed run deal trees to ranks and still match a single-process run)."""
    model = TinyFlow()
    sch = BranchSchedule(num_steps=5, split_steps=(0, 2))
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    both = rollout(model, model.encode(["a", "b"]), 2, sch, SHAPE, generator=gens([1, 2]))
    alone = rollout(model, model.encode(["b"]), 1, sch, SHAPE, generator=gens([2]))
    assert torch.allclose(both.latents[both.tree == 1], alone.latents, atol=1e-6)
    assert torch.allclose(both.logprob[both.tree == 1], alone.logprob, atol=1e-5)


# ---------------------------------------------------------------- engine fixes
def test_one_nonfinite_edge_is_dropped_and_the_step_still_moves_the_weights():
    model, lora = adapted()
    sch = BranchSchedule(num_steps=5, split_steps=(0, 2))
    tree, _ = tiny_tree(sch, model=model, prompts=("a cat", "a dog"))
    adv = compute_advantages(tree, torch.randn(tree.leaves.numel(), generator=torch.Generator().manual_seed(3)),
                             AdvantageConfig())
    edges = select_edges(tree, adv, PruningConfig(), sch.split_steps)
    bad = int(edges[edges.numel() // 2])
    tree.logprob[bad] = -200.0  # exp(new - old) overflows to inf for this edge only
    opt = torch.optim.SGD(lora.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in lora.parameters()]
    st = policy_update(model, model.encode(["a cat", "a dog"]), tree, edges, adv, sch, OptimConfig(max_train_batch=3),
                       opt, lora.parameters())
    assert st["edges_skipped_nonfinite"] == 1 and st["edges_trained"] == edges.numel() - 1
    assert st["optimizer_steps"] == 1 and st["optimizer_steps_skipped"] == 0
    assert math.isfinite(st["grad_norm"]) and st["grad_norm"] > 0
    after = list(lora.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_a_step_with_a_nonfinite_gradient_is_not_counted():
    model, lora = adapted()
    sch = BranchSchedule(num_steps=4, split_steps=(0,))
    tree, _ = tiny_tree(sch, model=model, prompts=("a",))
    adv = compute_advantages(tree, torch.tensor([0.0, 1.0]), AdvantageConfig())
    edges = select_edges(tree, adv, PruningConfig(), sch.split_steps)
    p0 = next(iter(lora.parameters()))
    p0.register_hook(lambda g: g * float("nan"))  # a NaN born inside the model, not in one edge
    opt = torch.optim.SGD(lora.parameters(), lr=1e-2)
    before = p0.detach().clone()
    st = policy_update(model, model.encode(["a"]), tree, edges, adv, sch, OptimConfig(), opt, lora.parameters())
    assert st["optimizer_steps"] == 0 and st["optimizer_steps_skipped"] == 1
    assert torch.equal(before, p0.detach())


def test_a_split_at_the_last_step_is_rejected_with_the_reason():
    with pytest.raises(ValueError, match=r"split_steps.*last step 4.*identical"):
        BranchSchedule(num_steps=5, split_steps=(0, 4)).validate()
    BranchSchedule(num_steps=5, split_steps=(0, 3)).validate()
    BranchSchedule(num_steps=5, split_steps=(0, 4), branching=(2, 1)).validate()  # K = 1 is no fork
    from branchgrpo.presets import PRESETS
    for name in PRESETS:
        PRESETS[name]().validate()


def test_init_same_noise_gives_every_root_of_an_iteration_the_same_noise():
    model, lora = adapted()
    cfg = TrainerConfig(schedule=BranchSchedule(num_steps=4, split_steps=(), branching=1, group_size=3),
                        advantage=AdvantageConfig(mode="group"), iterations=2, prompts_per_iteration=2,
                        init_same_noise=True)
    seen = []

    class Keep:
        def on_model_call(self, *a): pass
        def on_rollout_end(self, it, tree, r, im): seen.append(tree.latents[tree.depth == 0].clone())
        def on_iteration_end(self, *a): pass

    tr = BranchGRPOTrainer(model, lora, ["a", "b"], [MeanBrightness()], decode_to_image, cfg, SHAPE, callbacks=[Keep()])
    tr.train()
    for roots in seen:
        assert roots.shape[0] == 6 and all(torch.equal(roots[0], r) for r in roots)
    assert not torch.equal(seen[0][0], seen[1][0])  # a new noise every iteration
    cfg.init_same_noise = False
    seen.clear()
    BranchGRPOTrainer(model, lora, ["a", "b"], [MeanBrightness()], decode_to_image, cfg, SHAPE,
                      callbacks=[Keep()]).step()
    assert not torch.equal(seen[0][0], seen[0][1])
