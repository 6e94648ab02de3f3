"""An out-of-memory error in any phase of a run loses nothing and says what to change, in a real ComfyUI server.

The suite's Out Of Memory Injector (``tests/comfy_dev_pack/oom.py``) wraps the MODEL, VAE and reward through
ComfyUI's own interfaces and raises ``torch.OutOfMemoryError`` on the first call of one phase in iteration 2
(it first counts the calls of one iteration). For the rollout, decode, reward and update:

- the Trainer's error names the phase and the iteration, the memory predicted for that phase and what the device
  has, the checkpoint kept, and the settings that lower that phase's peak;
- the checkpoint of iteration 1 is intact;
- the server keeps working: the same graph queued again without the injector resumes from iteration 1, and its
  LoRA equals an uninterrupted run's.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from comfy_server import ComfyExecutionError
from test_comfy_adapters import _graph, models  # noqa: F401 (fixture)
from test_comfy_families import lora_path

PHASES = ["rollout", "decode", "reward", "update"]
ITERATIONS = 3


def _run_graph(models, tag, *, injector=None):
    g = _graph(models, tag, iterations=ITERATIONS if injector is None or injector["after"] >= 0 else 1)
    g["trainer"]["inputs"]["resume"] = True
    if injector is not None:
        g["oom"] = {"class_type": "BranchGRPOOutOfMemoryInjector",
                    "inputs": {"model": ["unet", 0], "vae": ["vae", 0], "reward": ["reward", 0], "tag": tag,
                               **injector}}
        g["trainer"]["inputs"].update(model=["oom", 0], vae=["oom", 1], reward=["oom", 2])
    return g


@pytest.fixture(scope="module")
def calls_per_iteration(comfy, comfy_base, models):
    """Calls of each phase in one iteration (the injector counting, never failing)."""
    entry = comfy.run(_run_graph(models, "oom_count", injector={"phase": "update", "after": -1}), timeout=600)
    assert entry["status"]["status_str"] == "success"
    counts = json.loads((comfy_base / "output" / "oom_injector_counts.json").read_text())["oom_count"]
    assert all(counts[p] > 0 for p in PHASES), counts
    return counts


@pytest.fixture(scope="module")
def uninterrupted(comfy, comfy_base, models):
    assert comfy.run(_run_graph(models, "oom_straight"), timeout=600)["status"]["status_str"] == "success"
    return load_file(str(lora_path(comfy_base, "ad_oom_straight")))


@pytest.mark.parametrize("phase", PHASES)
def test_out_of_memory_in_a_phase_keeps_the_checkpoint_says_what_to_change_and_resumes(
        comfy, comfy_base, models, calls_per_iteration, uninterrupted, phase):
    tag = f"oom_{phase}"
    ckpt = comfy_base / "output" / "branchgrpo" / f"ad_{tag}" / "checkpoint.pt"
    with pytest.raises(ComfyExecutionError) as err:
        comfy.run(_run_graph(models, tag, injector={"phase": phase, "after": calls_per_iteration[phase]}),
                  timeout=600)
    msg = err.value.error_message["exception_message"]
    assert msg.startswith(f"BranchGRPO Trainer: out of memory in the {phase} of iteration 2 ("), msg
    assert "GiB predicted for it" in msg and "GiB free of" in msg, msg
    assert f"The checkpoint of iteration 1 is kept in {ckpt}" in msg and "resume on" in msg, msg
    advice = {"rollout": "max_batch", "decode": "release_models", "reward": "fp16", "update": "max_train_batch"}
    assert advice[phase] in msg and "injected out of memory" in msg, msg
    assert int(torch.load(ckpt, weights_only=True)["iteration"]) == 1
    assert not lora_path(comfy_base, f"ad_{tag}").exists()

    # the server goes on; the same graph without the injector resumes and ends where an uninterrupted run ends
    entry = comfy.run(_run_graph(models, tag), timeout=600)
    assert "(resumed from 1)" in " ".join(entry["outputs"]["trainer"]["text"])
    resumed = load_file(str(lora_path(comfy_base, f"ad_{tag}")))
    assert set(resumed) == set(uninterrupted)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed), phase
