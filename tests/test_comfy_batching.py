"""The Trainer node's model path batches as the engine does: one model call per step for all prompts.

ComfyUI is imported in this process (CPU); the model is the CPU demo model (demo/tiny_t2i.safetensors).
"""
from __future__ import annotations

import importlib

import pytest
import torch

from bench import node_vs_engine as nve

pytestmark = pytest.mark.skipif(not (nve.COMFY_DIR / "comfy" / "samplers.py").is_file(),
                                reason=".comfyui/ is missing: run scripts/setup_dev.sh")


@pytest.fixture(scope="module")
def pack():
    nve.import_comfy()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield importlib.import_module(f"{nve.PACK}.nodes.comfy_model"), importlib.import_module(
        f"{nve.PACK}.nodes.demo_model")
    torch.set_num_threads(threads)


def test_node_path_makes_the_engines_model_calls(pack):
    """Same tree, same weights: the node path makes exactly the engine's model calls, rollout and update,
    and gets the same rewards."""
    res = nve.run(iterations=1, n_prompts=4, per_prompt=True)
    assert res["model_calls_rollout"]["engine"] == [10]  # one call per step for the 4 trees
    assert res["model_calls_rollout"]["node_per_prompt"] == [40]  # what a call per prompt costs
    assert res["model_calls_rollout"]["node"] == res["model_calls_rollout"]["engine"]
    assert res["model_calls_update"]["node"] == res["model_calls_update"]["engine"]
    assert res["model_calls_update"]["engine"][0] > 0
    assert res["model_evaluations"]["node"] == res["model_evaluations"]["engine"]
    assert res["reward_max_abs_diff"] < 1e-5


def _flow(pack, conditioning: dict):
    cm, demo = pack
    mp, names = demo.build_demo_model()
    flow = cm.ComfyFlowModel(mp, (3, 16, 16), clip=demo.DemoTextEncoder(names), conditioning=conditioning, seed=0)
    flow.add_prompts(list(conditioning))
    return flow, mp


def _cond(enc_id: int, length: int):
    one_hot = torch.zeros(1, 9)
    one_hot[0, enc_id] = 1.0
    return [[one_hot[:, None, :].repeat(1, length, 1), {"pooled_output": one_hot}]]


@pytest.mark.parametrize("lengths,calls", [((1, 1, 1), 1), ((2, 3, 2), 1), ((1, 5, 1), 2)])
def test_prompts_are_concatenated_or_grouped_by_shape(pack, lengths, calls):
    """Conds of equal shape run in one call; text of another token length joins the call where ComfyUI's
    own rules pad it (cross-attention: repeat to a common length, at most 4x) and runs as its own group
    otherwise; either way every row gets the velocity of a call with its prompt alone."""
    prompts = {f"p{i}": _cond(i, n) for i, n in enumerate(lengths)}
    flow, mp = _flow(pack, prompts)
    names = list(prompts)
    g = torch.Generator().manual_seed(0)
    index = torch.tensor([2, 0, 1, 0, 2, 1, 1])
    x = torch.randn(len(index), 3, 16, 16, generator=g)
    sigma = torch.rand(len(index), generator=g) * 0.9 + 0.05
    counter = nve.CallCounter(mp.model.diffusion_model)
    with torch.no_grad(), flow.session(16):
        v = flow.velocity(x, sigma, names, index)
        assert counter.take() == calls
        for k in range(len(names)):
            rows = torch.nonzero(index == k).flatten()
            alone = flow.velocity(x[rows], sigma[rows], names, torch.full((len(rows),), k))
            torch.testing.assert_close(v[rows], alone, rtol=1e-5, atol=1e-5)
    counter.handle.remove()


def test_true_cfg_batches_cond_and_uncond_together(pack):
    """With true CFG the negative joins the same call (ComfyUI concatenates cond and uncond), and the result is
    the CFG mix of the per-prompt velocities."""
    cm, demo = pack
    mp, names = demo.build_demo_model()
    flow = cm.ComfyFlowModel(mp, (3, 16, 16), clip=demo.DemoTextEncoder(names), cfg=3.0, negative="", seed=0)
    prompts = ["red circle", "blue triangle"]
    flow.add_prompts(prompts)
    index = torch.tensor([0, 1, 1, 0])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 16, 16, generator=g)
    sigma = torch.full((4,), 0.5)
    counter = nve.CallCounter(mp.model.diffusion_model)
    net = mp.model.diffusion_model
    with torch.no_grad(), flow.session(16):
        v = flow.velocity(x, sigma, prompts, index)
        assert counter.take() == 1
    counter.handle.remove()
    with torch.no_grad():
        ids = torch.tensor([names.index(p) for p in prompts])[index]
        cond = net(x, sigma * 1000, torch.nn.functional.one_hot(ids, 9).float()[:, None])
        uncond = net(x, sigma * 1000, None)
    torch.testing.assert_close(v, uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-4)
