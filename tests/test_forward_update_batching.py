"""Forward-process objectives go through the model in calls of at most ``max_train_batch`` rows under
gradients, whatever the group size, and the update does not depend on that batching (DGPO's coupled
group term included: a group larger than the batch is evaluated in two passes with exact coefficients)."""
from __future__ import annotations

import pytest
import torch

from branchgrpo.loss import OptimConfig
from branchgrpo.objectives import EMAPolicy, ObjectiveConfig, forward_update
from branchgrpo.schedule import BranchSchedule


class TinyVelocity(torch.nn.Module):
    """v = MLP([x, t, cond]) on 2x4x4 latents; records the rows of every call made with gradients."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(32 + 1 + 3, 24, generator=g) * 0.3)
        self.w2 = torch.nn.Parameter(torch.randn(24, 32, generator=g) * 0.3)
        self.grad_rows: list[int] = []
        self.enabled = True

    def velocity(self, x, t, cond, index):
        if torch.is_grad_enabled():
            self.grad_rows.append(x.shape[0])
        h = torch.cat([x.flatten(1), t[:, None], cond[index]], dim=1)
        out = torch.tanh(h @ self.w1) @ self.w2
        if not self.enabled:
            out = out * 0.5
        return out.view_as(x)


def _reference(model):
    class Ref:
        def __enter__(self):
            model.enabled = False

        def __exit__(self, *a):
            model.enabled = True
    return Ref()


def _run(name: str, max_train_batch: int, *, kl_beta: float = 0.0, poison: int | None = None):
    torch.manual_seed(0)
    model = TinyVelocity()
    params = [model.w1, model.w2]
    opt = torch.optim.SGD(params, lr=0.1)
    g = torch.Generator().manual_seed(1)
    n, groups = 12, 2
    x0 = torch.randn(n, 2, 4, 4, generator=g)
    if poison is not None:
        x0[poison] = float("nan")
    cond = torch.randn(groups, 3, generator=g)
    group = torch.arange(groups).repeat_interleave(n // groups)
    adv = torch.randn(n, generator=g)
    cfg = ObjectiveConfig(name=name, train_timesteps=2, kl_beta=kl_beta,
                          shared_noise=name == "dgpo", dgpo_clip_range=0.0 if name != "dgpo" else 0.2)
    old = EMAPolicy(params) if cfg.needs_old_forward() else None
    if old is not None:  # an old policy that differs from the current one
        with torch.no_grad():
            for s in old.shadow:
                s.mul_(0.9)
    sched = BranchSchedule(num_steps=6, split_steps=(), group_size=1)
    stats = forward_update(model, cond, x0, group.clone(), adv, group, sched, cfg,
                           OptimConfig(max_train_batch=max_train_batch, max_grad_norm=1e6), opt, params,
                           generator=torch.Generator().manual_seed(2), reference=lambda: _reference(model),
                           old_policy=old)
    return [p.detach().clone() for p in params], stats, model.grad_rows


@pytest.mark.parametrize("name", ["dgpo", "diffusionnft", "awm"])
def test_update_independent_of_train_batch(name):
    whole, s_whole, rows_whole = _run(name, 6)      # one group per call
    split, s_split, rows_split = _run(name, 4)      # groups of 6 split into 4 + 2
    assert max(rows_whole) == 6 and max(rows_split) <= 4
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert s_split["loss"] == pytest.approx(s_whole["loss"], rel=1e-5)
    assert s_split["edges_trained"] == s_whole["edges_trained"] == 24
    assert s_split["clipfrac"] == pytest.approx(s_whole["clipfrac"])
    extra = s_split["nfe_train"] - s_whole["nfe_train"]
    assert extra == (24 if name == "dgpo" else 0)  # DGPO's first pass: one no-grad forward per sample


def test_dgpo_split_with_kl_and_a_nonfinite_group():
    whole, s_whole, _ = _run("dgpo", 6, kl_beta=0.3, poison=1)
    split, s_split, rows = _run("dgpo", 4, kl_beta=0.3, poison=1)
    assert max(rows) <= 4
    for a, b in zip(whole, split):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert s_split["edges_trained"] == s_whole["edges_trained"] == 12  # the poisoned group dropped whole
    assert s_split["kl"] == pytest.approx(s_whole["kl"], rel=1e-5)
