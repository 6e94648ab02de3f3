"""The held-out ODE evaluation and the reference-KL measurement (branchgrpo.evaluate)."""
from __future__ import annotations

import pytest
import torch

from branchgrpo import BranchSchedule, rollout
from branchgrpo.evaluate import EvalParts, evaluate, ode_samples, reference_kl, seed_noise
from branchgrpo.lora import LoRAConfig
from branchgrpo.peft_adapter import PeftAdapter
from tiny_flow import MeanBrightness, TinyFlow, decode_to_image

SHAPE = (4, 4, 4)


def adapted(seed=0):
    model = TinyFlow(seed=seed)
    model.requires_grad_(False)
    lora = PeftAdapter(model, LoRAConfig(rank=4, alpha=4, targets=("blocks.*",)), seed=seed)
    return model, lora


def hand_euler(model, prompts, seeds, sched):
    """Euler from the seeds' noise, written out: x <- x + (s_next - s) v."""
    sigmas = sched.sigmas()
    cond = model.encode(prompts)
    out = []
    for p in range(len(prompts)):
        for seed in seeds:
            x = torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(seed))
            for i in range(sched.num_steps):
                v = model.velocity(x, torch.full((1,), float(sigmas[i])), cond, torch.tensor([p]))
                x = x + (float(sigmas[i + 1]) - float(sigmas[i])) * v
            out.append(x[0])
    return torch.stack(out)


def test_ode_samples_are_the_euler_ode_from_the_seeds():
    model = TinyFlow()
    sched = BranchSchedule(num_steps=5, shift=3.0, split_steps=(0, 2))
    prompts, seeds = ["a cat", "a dog"], [3, 7, 11]
    with torch.no_grad():
        want = hand_euler(model, prompts, seeds, sched)
    torch.manual_seed(123)  # the global RNG plays no part
    x0, nfe = ode_samples(model, model.encode(prompts), 2, sched, SHAPE, seeds, max_batch=4)
    torch.manual_seed(999)
    again, _ = ode_samples(model, model.encode(prompts), 2, sched, SHAPE, seeds, max_batch=64)
    assert nfe == 2 * 3 * 5
    assert torch.allclose(x0, want, atol=1e-5)
    assert torch.allclose(x0, again, atol=1e-6)  # chunking does not change a sample
    # same seed, same noise for every prompt; different seeds differ
    assert torch.equal(seed_noise([3], SHAPE)[0], torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)))
    assert not torch.allclose(x0[0], x0[1])
    # an SDE rollout from the same noise is not the ODE sample (the evaluation has no stochastic step)
    tree = rollout(model, model.encode(prompts[:1]), 1, sched, SHAPE, generator=torch.Generator().manual_seed(0),
                   init_noise=seed_noise([3], SHAPE))
    assert not torch.allclose(tree.leaf_x0[0], x0[0], atol=1e-3)
    with pytest.raises(ValueError, match="at least one"):
        ode_samples(model, model.encode(prompts), 2, sched, SHAPE, [])


def test_evaluate_is_deterministic_and_scores_the_ode_samples():
    model, lora = adapted()
    sched = BranchSchedule(num_steps=4, split_steps=(0,))
    parts = EvalParts(model=model, decode=decode_to_image, rewards=[MeanBrightness()], schedule=sched,
                      latent_shape=SHAPE, max_batch=3, reference=lora.disabled)
    prompts, seeds = ["a bird", "a fish"], [0, 1]
    a = evaluate(parts, prompts, seeds, keep_images=True)
    b = evaluate(parts, prompts, seeds)
    assert a["reward"] == b["reward"] and torch.equal(a["rewards"], b["rewards"])
    assert a["samples"] == 4 and a["nfe"] == 4 * sched.num_steps and a["images"].shape == (4, 4, 4, 3)
    with torch.no_grad():
        want = decode_to_image(hand_euler(model, prompts, seeds, sched)).flatten(1).mean(1)
    assert torch.allclose(a["rewards"], want, atol=1e-5)
    assert a["reward"] == pytest.approx(float(want.mean()), abs=1e-5)
    assert a["reward_std"] == pytest.approx(float(want.std()), abs=1e-5)
    # a zero-initialised adapter is the base model; a changed adapter changes the samples, not the base's
    ref = evaluate(parts, prompts, seeds, reference=True)
    assert torch.allclose(ref["x0"], a["x0"], atol=1e-6)
    with torch.no_grad():
        for p in lora.parameters():
            p.add_(0.3)
    moved = evaluate(parts, prompts, seeds)
    assert (moved["x0"] - a["x0"]).abs().max() > 1e-3
    assert torch.allclose(evaluate(parts, prompts, seeds, reference=True)["x0"], ref["x0"], atol=1e-6)
    # two weighted rewards: the combined reward is their weighted sum, each is reported
    class Dark:
        name = "dark"

        def __call__(self, images, prompts):
            return 1.0 - images.flatten(1).mean(1)

    two = EvalParts(model=model, decode=decode_to_image, rewards=[MeanBrightness(), Dark()], schedule=sched,
                    latent_shape=SHAPE, reward_weights=(2.0, 1.0))
    r = evaluate(two, prompts, seeds)
    assert r["reward"] == pytest.approx(2 * r["reward/brightness"] + r["reward/dark"], abs=1e-5)
    with pytest.raises(ValueError, match="evaluation prompt list is empty"):
        evaluate(parts, [], seeds)


def test_reference_kl_is_zero_for_a_fresh_adapter_and_positive_after_a_change():
    model, lora = adapted()
    sched = BranchSchedule(num_steps=4, split_steps=(0, 1))
    tree = rollout(model, model.encode(["a"]), 1, sched, SHAPE, generator=torch.Generator().manual_seed(0))
    inner = torch.nonzero(tree.depth < tree.num_steps).flatten()
    kl, nfe = reference_kl(model, model.encode(["a"]), tree, inner, sched, lora.disabled, max_batch=2)
    assert kl == pytest.approx(0.0, abs=1e-12) and nfe == 2 * inner.numel()
    with torch.no_grad():
        for p in lora.parameters():
            p.add_(0.05)
    kl, _ = reference_kl(model, model.encode(["a"]), tree, inner, sched, lora.disabled)
    assert kl > 0
    with pytest.raises(ValueError, match="leaves"):
        reference_kl(model, model.encode(["a"]), tree, tree.leaves, sched, lora.disabled)
