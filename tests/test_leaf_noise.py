"""Residual fork noise (branchgrpo.diagnostics) on the demo model: the schedules of the shipped workflows give
clean leaves, and Flow-GRPO's SDE with the old fork noise scale 4.0 is caught by both checks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from branchgrpo.diagnostics import (AUTO_SPLIT_NOISE_SCALE, EXCESS_LIMIT, HF_RATIO_LIMIT, fork_noise_excess,
                                    high_frequency_energy, leaf_noise, residual_noise_warning)
from branchgrpo.schedule import BranchSchedule, parse_steps
from test_methods import toy_model

PROMPTS = ["red circle", "green square", "blue triangle", "yellow ring"]  # one tree each
WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
# the Branch Schedule's widgets, in the order a UI-format workflow stores them
SCHEDULE_WIDGETS = ("steps", "split_steps", "branching", "split_noise_scale", "sde", "eta", "shift", "group_size",
                    "sde_window_size", "sde_window_start")


def shipped_schedules() -> list[tuple[str, BranchSchedule]]:
    out = []
    for path in sorted(WORKFLOWS.glob("*.json")):
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] != "BranchGRPOBranchSchedule":
                continue
            w = dict(zip(SCHEDULE_WIDGETS, node["widgets_values"]))
            ks = parse_steps(w["branching"], "branching")
            scale = w["split_noise_scale"] or AUTO_SPLIT_NOISE_SCALE[w["sde"]]  # 0 = auto, as the node does
            out.append((path.stem, BranchSchedule(
                num_steps=w["steps"], split_steps=parse_steps(w["split_steps"], "split_steps"),
                branching=ks[0] if len(ks) == 1 else ks, split_noise_scale=scale, sde=w["sde"], eta=w["eta"],
                shift=w["shift"], group_size=w["group_size"],
                sde_window=(w["sde_window_start"], w["sde_window_size"]) if w["sde_window_size"] else None)))
    return out


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return toy_model()


def test_high_frequency_energy_sees_noise():
    smooth = torch.linspace(0, 1, 16).expand(2, 3, 16, 16).clone()
    noisy = smooth + 0.2 * torch.randn(smooth.shape, generator=torch.Generator().manual_seed(0))
    assert float(high_frequency_energy(smooth).max()) < 1e-6 < float(high_frequency_energy(noisy).min())


def test_flowgrpo_with_fork_noise_4_gives_noisy_leaves_and_auto_does_not(model):
    old = BranchSchedule(num_steps=8, split_steps=(0, 3, 5), split_noise_scale=4.0, sde="flowgrpo", eta=0.7)
    auto = BranchSchedule(num_steps=8, split_steps=(0, 3, 5), split_noise_scale=AUTO_SPLIT_NOISE_SCALE["flowgrpo"],
                          sde="flowgrpo", eta=0.7)
    assert fork_noise_excess(old) > EXCESS_LIMIT and "split_noise_scale 4" in residual_noise_warning(old)
    assert fork_noise_excess(auto) <= EXCESS_LIMIT and residual_noise_warning(auto) is None
    bad = leaf_noise(model, PROMPTS, old, model.latent_shape, model.decode)
    good = leaf_noise(model, PROMPTS, auto, model.latent_shape, model.decode)
    assert bad["noisy"] and bad["ratio"] > HF_RATIO_LIMIT, bad
    assert not good["noisy"] and good["ratio"] < bad["ratio"] / 3, (good, bad)


def test_shipped_workflows_schedules_give_clean_leaves(model):
    schedules = shipped_schedules()
    assert {name for name, _ in schedules} >= {"cpu_demo", "flux_branchgrpo_hps", "sd35_branchgrpo_pickscore",
                                               "wan21_t2v_branchgrpo"}
    for name, sch in schedules:
        assert residual_noise_warning(sch) is None, (name, residual_noise_warning(sch))
        res = leaf_noise(model, PROMPTS[:2], sch, model.latent_shape, model.decode)
        assert not res["noisy"], (name, res)
