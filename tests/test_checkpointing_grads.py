"""Gradient checkpointing changes no gradient: the LoRA gradients of one forward + backward of tiny FLUX (whose
blocks update their inputs in place) with checkpointing on equal those with it off, up to float rounding.

ComfyUI is imported in this process (CPU). The end-to-end check through a real server is
``tests/test_comfy_families.py::test_gradient_checkpointing_gives_the_same_lora``.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from bench import node_vs_engine as nve


@pytest.fixture(scope="module")
def pack():
    nve.import_comfy()
    yield (importlib.import_module(f"{nve.PACK}.nodes.comfy_model"),
           importlib.import_module(f"{nve.PACK}.nodes.memory"),
           importlib.import_module("comfy_dev_pack.tiny_flux"))


def _lora_grads(pack, checkpointing: bool) -> dict[str, torch.Tensor]:
    from branchgrpo.lora import LoRAConfig
    cm, probe, tiny = pack
    torch.manual_seed(0)  # the random conditioning below
    mp = tiny.build_tiny_model("flux", 0)
    with torch.inference_mode(False), torch.enable_grad():
        mpl, lora = cm.attach_lora(mp, LoRAConfig(rank=4, alpha=4.0, targets=("*",)), seed=3, device="cpu")
        with torch.no_grad():  # both factors non-zero, so every LoRA parameter gets a gradient
            for i, p in enumerate(p for p in lora.parameters() if p.requires_grad):
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        cond = probe.random_conditioning(mpl.model.diffusion_model, 8, 3.5)
        call = probe.SamplingCall(mpl, cond, (16, 8, 8))
        x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
        try:
            with cm.gradient_checkpointing(mpl, checkpointing) as n_blocks:
                assert n_blocks == (len(mpl.model.diffusion_model.double_blocks)
                                    + len(mpl.model.diffusion_model.single_blocks) if checkpointing else 0)
                v = call(x, torch.full((2,), 0.5))
                (v.float() ** 2).mean().backward()
        finally:
            call.close()
        return {n: p.grad.clone() for n, p in lora.named_parameters() if p.requires_grad}


def test_checkpointing_gives_the_same_lora_gradients(pack):
    off, on = _lora_grads(pack, False), _lora_grads(pack, True)
    assert set(on) == set(off)
    scale = max(float(g.abs().max()) for g in off.values())
    assert scale > 1e-4
    diff = max(float((on[k] - off[k]).abs().max()) for k in on)
    assert diff <= 1e-5 * scale, (diff, scale)
