"""Real scale on a CPU: every family at its real width (one block per list) through the Trainer's code path.

* ``bench.scale --device cpu --blocks 1`` per family at a small resolution: the JSON has every field, and the
  Trainer's own prediction (FakeTensor probes) is within 15 % of the bytes measured during the run.
* The FakeTensor sizing equals the measured accounting on the same blocks (real width, small shape).
* The depth extrapolation is exact on affine data, and the accounting counts views once.

Each family is built with ComfyUI's own classes (``comfy.supported_models`` configs), imported in-process.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from branchgrpo.memory import (LiveTensors, SavedTensors, cards_fitting, extrapolate_depth,  # noqa: E402
                               planned_tree_bytes, tensor_bytes, tree_bytes)

from bench.sandbox import COMFY_DIR  # noqa: E402
needs_comfy = pytest.mark.skipif(not (COMFY_DIR / "comfy" / "samplers.py").is_file(),
                                 reason="ComfyUI is missing (.comfyui/): run scripts/setup_dev.sh")

FIELDS = ("family", "resolution", "frames", "preset", "weight_dtype", "checkpointing", "blocks", "device",
          "seconds", "model_evaluations", "peak_bytes_measured", "peak_bytes_predicted", "peak_bytes_full_depth")

# small shapes: 64 px (Wan: 64 x 64 px x 5 frames), 8 text tokens, a 2-step tree forking at step 0
SMALL = ["--device", "cpu", "--blocks", "1", "--text-tokens", "8", "--steps", "2", "--split-steps", "0",
         "--group-size", "1", "--iterations", "1", "--max-batch", "4", "--max-train-batch", "4", "--lora-rank", "4",
         "--lora-targets", "*qkv*,*.q,*.k,*.v"]


def test_live_tensors_count_views_once_and_follow_frees():
    live = LiveTensors()
    with live:
        a = torch.zeros(1000)          # 4000 bytes
        v = a.view(10, 100)[2:]        # a view: nothing new
        b = a + 1                      # 4000 more
        del a                          # the view keeps the storage alive
        peak_with_b = live.current
        del v
    assert peak_with_b == 8000 and live.peak == 8000
    assert live.current == 4000  # only b is left
    del b
    assert live.current == 0


def test_saved_tensors_dedupe_and_exclude_parameters():
    lin = torch.nn.Linear(16, 16)
    x = torch.randn(4, 16, requires_grad=True)
    with SavedTensors(exclude=lin.parameters()) as saved:
        y = lin(x)
        (y * y).sum().backward()
    # linear saves x (the weight is excluded); y*y saves y once (both operands are the same tensor)
    assert saved.total == x.numel() * 4 + y.numel() * 4


def test_extrapolate_depth_is_exact_for_affine_sizes():
    f = lambda d: 100 + 7 * d[0] + 3 * d[1]  # noqa: E731
    sizes = {d: f(d) for d in [(1, 1), (2, 1), (1, 2)]}
    assert extrapolate_depth(sizes, (19, 38)) == f((19, 38))
    assert extrapolate_depth({(1,): 5.0, (2,): 9.0}, (40,)) == 5.0 + 4.0 * 39
    assert cards_fitting(23 * 2 ** 30) == [24, 48, 80] and cards_fitting(30 * 2 ** 30) == [48, 80]


def test_planned_tree_bytes_equal_a_real_rollout():
    from branchgrpo.schedule import BranchSchedule
    from branchgrpo.tree import rollout

    class Zero:
        def velocity(self, x, sigma, cond, index):
            return torch.zeros_like(x)

    sched = BranchSchedule(num_steps=6, split_steps=(0, 2), branching=2, group_size=2)
    shape = (4, 3, 5)
    tree = rollout(Zero(), None, 3, sched, shape, generator=torch.Generator().manual_seed(0))
    plan = planned_tree_bytes(sched, 3, shape)
    assert plan["stored"] == tree_bytes(tree)
    assert plan["nodes"] == tree.num_nodes and plan["leaves"] == tree.leaves.numel()


@pytest.fixture(scope="module")
def comfy_modules():
    from bench import scale
    return scale, *scale.import_comfy()


@needs_comfy
def test_fake_sizing_equals_the_measured_accounting(comfy_modules):
    """The same blocks (Wan 2.1 1.3B at real width, one block) sized under FakeTensorMode and run for real."""
    scale, cm, mprobe = comfy_modules
    from branchgrpo.lora import LoRAConfig
    from bench import families
    mp = families.build_model("wan21-1.3b", "bf16", 1, torch.device("cpu"))
    kw = dict(rollout_batch=2, train_batch=2, metrics_batch=1, text_tokens=8, guidance=None, count_saved=True)
    lora = LoRAConfig(rank=4, alpha=4.0, targets=("*.q", "*.k", "*.v"))
    for gc in (False, True):
        fake = mprobe.probe_calls(mp, (16, 2, 8, 8), lora, checkpointing=gc, **kw)
        real = mprobe.probe_calls(mp, (16, 2, 8, 8), lora, checkpointing=gc, fake=False, **kw)
        assert fake == real, (gc, fake, real)
        assert real["update_chunk"] > 0 and real["rollout_call"] > 0
    assert real["saved_per_block"]["blocks"] > 0  # attributed to the block that saved them (checkpointing off)


@needs_comfy
@pytest.mark.parametrize("family,resolution,frames", [
    ("flux-dev", "64", "1"), ("sd35-large", "64", "1"), ("sd35-medium", "64", "1"),
    ("wan21-14b", "64", "5"), ("wan21-1.3b", "64", "5")])
def test_bench_scale_cpu_one_block(comfy_modules, tmp_path, family, resolution, frames):
    scale = comfy_modules[0]
    out = tmp_path / "scale.json"
    result = scale.main(["--family", family, "--resolution", resolution, "--frames", frames, *SMALL,
                         "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["runs"] and data == json.loads(json.dumps(result, default=str))
    run = data["runs"][0]
    for key in FIELDS:
        assert key in run, key
    assert set(run["seconds"]) == {"rollout", "decode", "reward", "update"}
    assert run["family"] == family and run["device"] == "cpu" and run["blocks"] == 1
    assert run["model_evaluations"] > 0
    # each phase's transient (the part the prediction sizes; the weights are counted alike on both sides), the
    # prediction's probes against the run's own accounting (the independent instrument: test_memory_instrument.py)
    for phase in ("rollout", "decode", "update", "metrics"):
        p = run["predicted"]["phases"][phase]["transient"]
        m = run["measured"]["phases"][phase]["transient"]
        assert abs(p - m) <= max(0.15 * m, 2 ** 20), (phase, p, m)
    # the full-depth prediction holds the weights of the family's whole model, counted from its parameters
    from bench.families import build_model
    from branchgrpo.memory import module_bytes
    full = build_model(family, "bf16", None, torch.device("cpu"), fake=True)
    assert run["full_depth"]["phases"]["update"]["weights"] == sum(module_bytes(full.model.diffusion_model).values())
