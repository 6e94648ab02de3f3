"""Every phase of a training iteration with the model on a device that is not the CPU (``tests/elsewhere.py``):
a tensor made on the CPU and mixed with the device's raises, as it would on CUDA. One iteration is not enough for
what appears only later (the previous tree, the EMA and old policies, AdamW's state), so each preset runs two."""
from __future__ import annotations

import pytest
import torch

from branchgrpo import BranchGRPOTrainer, preset
from branchgrpo.lora import LoRAConfig
from branchgrpo.peft_adapter import PeftAdapter
from branchgrpo.presets import PRESETS
from elsewhere import DEVICE, CrossDevice, Elsewhere, ElsewhereMode
from tiny_flow import MeanBrightness, TinyFlow, decode_to_image

SHAPE = (4, 4, 4)


def trainer_on_device(name: str):
    model = TinyFlow(seed=0).to(DEVICE)
    model.requires_grad_(False)
    lora = PeftAdapter(model, LoRAConfig(rank=4, alpha=4, targets=("blocks.*",)), seed=0)
    cfg = preset(name, iterations=2, prompts_per_iteration=1, seed=3)
    return BranchGRPOTrainer(model, lora, ["a cat", "a dog"], [MeanBrightness()], decode_to_image, cfg,
                             SHAPE, device=DEVICE), lora


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_two_iterations_of_every_preset_on_a_device_that_is_not_the_cpu(name):
    with ElsewhereMode() as mode:
        trainer, lora = trainer_on_device(name)
        before = [p.detach().clone() for p in lora.parameters()]
        for _ in range(2):
            metrics = trainer.step()
        params = list(lora.parameters())
        assert all(isinstance(p, Elsewhere) for p in params), "the adapter left the device"
        moved = any(not torch.equal(a.elem, b.elem) for a, b in zip(params, before))
    assert mode.ops > 0 and moved, name
    assert all(isinstance(v, (int, float, str, bool, type(None), list, dict)) for v in metrics.values()), metrics


def cpu_tensor_decode(x0):
    """A planted bug: a per-leaf offset made on the CPU, added to the device's latents."""
    return decode_to_image(x0 + torch.zeros(x0.shape[0], 1, 1, 1))


def test_a_cpu_tensor_mixed_with_the_devices_is_caught():
    with ElsewhereMode():
        trainer, _ = trainer_on_device("branchgrpo")
        trainer.decode = cpu_tensor_decode
        with pytest.raises(CrossDevice, match="mixed with CPU tensors of shapes"):
            trainer.step()
        trainer, _ = trainer_on_device("branchgrpo")
        trainer.step()  # the same run without the planted line goes through


def test_a_cpu_generator_for_a_device_tensor_is_caught():
    with ElsewhereMode():
        with pytest.raises(CrossDevice, match="CPU generator"):
            torch.randn(3, generator=torch.Generator().manual_seed(0), device=DEVICE)
