"""What a new user hits, refused or explained before any compute, in a real ComfyUI server (tiny FLUX):

- a Save LoRA file name that comes through a link (a String primitive, a Concatenate of literals) is checked before
  training; one that cannot be known before it runs is named in the Trainer's log and text;
- a corrupt or empty ``continue_lora`` file is refused with the node, the field, the file and the fix;
- a continued file's metadata describes the tensors it holds, and the node says which inputs the file overrides;
- nonsense (a LoRA / LoKr rank no layer can use, ``train_timesteps`` the schedule cannot give, a NaN learning rate,
  1 step with a split) is refused; legal but unlikely values (more trees than prompts, a forward-process method on
  an all-SDE schedule) are noted on the node;
- resume with another adapter names what differs with both values; resume off keeps the old checkpoint aside;
- a stale temporary of a crashed checkpoint write is removed when the run starts;
- Reward Mix takes API prompts that name only the weights of connected rewards.

In-process: every forward-process preset's schedule is reachable from the Branch Schedule node's inputs.
"""
from __future__ import annotations

import importlib
import json
import os

import pytest
import torch
from safetensors import safe_open

from bench import node_vs_engine as nve
from browser_helpers import http_json
from comfy_server import ComfyExecutionError, ComfyQueueError
from test_comfy_adapters import _fails_before_compute, _graph, models  # noqa: F401 (fixture)
from test_comfy_families import lora_path, metrics_of


def _text(entry) -> str:
    return " ".join(entry["outputs"]["trainer"]["text"])


def _run_dir(comfy_base, run):
    return comfy_base / "output" / "branchgrpo" / run


# ------------------------------------------------------------------------------------------- linked file names
def test_a_linked_bad_save_name_is_refused_before_training(comfy, comfy_base, models):
    g = _graph(models, "linked_evil", iterations=50)
    g["name"] = {"class_type": "PrimitiveString", "inputs": {"value": "../../evil_linked"}}
    g["save"]["inputs"]["filename"] = ["name", 0]
    msg = _fails_before_compute(comfy, g, "ad_linked_evil")
    assert "not started" in msg and "escapes the loras folder" in msg and "(from node name (PrimitiveString))" in msg
    assert not _run_dir(comfy_base, "ad_linked_evil").exists()

    g = _graph(models, "concat_evil", iterations=50)
    g["a"] = {"class_type": "PrimitiveString", "inputs": {"value": ".."}}
    g["join"] = {"class_type": "StringConcatenate", "inputs": {"string_a": ["a", 0], "string_b": "evil_concat",
                                                               "delimiter": "/"}}
    g["save"]["inputs"]["filename"] = ["join", 0]
    msg = _fails_before_compute(comfy, g, "ad_concat_evil")
    assert "escapes the loras folder" in msg and "'../evil_concat'" in msg, msg


def test_a_linked_name_that_is_known_only_at_run_time_is_said_at_the_start(comfy, comfy_base, models):
    g = _graph(models, "linked_later", iterations=1)
    # a second Save LoRA named by the first one's output: known only once the first has run
    g["save2"] = {"class_type": "BranchGRPOSaveLoRA", "inputs": {"lora": ["trainer", 1], "filename": ["save", 0],
                                                                  "overwrite": True}}
    entry = comfy.run(g, timeout=600)
    text = _text(entry)
    assert ("WARNING: Save LoRA (node save2) gets its file name from node save (BranchGRPOSaveLoRA), which is known "
            "only when it runs") in text, text
    assert "Save LoRA (node save2)" in comfy.server.log_tail(200000)


# ------------------------------------------------------------------------------------------- bad LoRA files
def test_corrupt_and_empty_continue_files_are_refused_with_the_fix(comfy, comfy_base, models):
    loras = comfy_base / "models" / "loras" / "branchgrpo"
    loras.mkdir(parents=True, exist_ok=True)
    (loras / "random_bytes.safetensors").write_bytes(os.urandom(4096))
    (loras / "zero_bytes.safetensors").write_bytes(b"")
    from safetensors.torch import save_file
    save_file({}, str(loras / "no_tensors.safetensors"))
    for name, expect in (("random_bytes", "is not a readable LoRA file"), ("zero_bytes", "is 0 bytes long"),
                         ("no_tensors", "holds no tensors")):
        msg = _fails_before_compute(comfy, _graph(models, name, continue_lora=f"branchgrpo/{name}.safetensors"),
                                    f"ad_{name}")
        assert msg.startswith("BranchGRPO Trainer: continue_lora — ") and f"{name}.safetensors" in msg, msg
        assert expect in msg and "set continue_lora to none" in msg, msg
        assert "SafetensorError" not in msg.split(":")[0]


def test_a_continued_files_metadata_describes_its_tensors(comfy, comfy_base, models):
    # its own LoHa file (a run name of its own: another module's metrics of the same run would mix with these)
    assert comfy.run(_graph(models, "checks_loha", algorithm="LoHa"), timeout=600)["status"]["status_str"] == "success"
    g = _graph(models, "loha_meta", iterations=3, algorithm="LoRA", rank=8,
               continue_lora="branchgrpo/ad_checks_loha.safetensors")
    text = _text(comfy.run(g, timeout=600))
    assert "continue_lora — branchgrpo/ad_checks_loha.safetensors keeps its own adapters" in text, text
    assert "algorithm 'LoRA' (the file's: 'LoHa')" in text and "lora_rank 8 (the file's: 4)" in text, text
    with safe_open(str(lora_path(comfy_base, "ad_loha_meta")), framework="pt") as f:
        meta = json.loads(f.metadata()["branchgrpo.lora"])
        inner = {f.get_tensor(k).shape[0] for k in f.keys() if k.endswith("hada_w1_b")}
    assert meta["algorithm"] == "LoHa" and meta["rank"] == 4 and inner == {4}, meta
    assert meta["continued_from"] == "branchgrpo/ad_checks_loha.safetensors"


# ------------------------------------------------------------------------------------------- nonsense
def test_ranks_no_layer_can_use_are_refused(comfy, comfy_base, models):
    msg = _fails_before_compute(comfy, _graph(models, "rank512", rank=512), "ad_rank512")
    assert "lora_rank — LoRA rank 512 is above the rank every adapted layer can have (at most 64" in msg, msg
    msg = _fails_before_compute(comfy, _graph(models, "lokr512", algorithm="LoKr", rank=512), "ad_lokr512")
    assert "LoKr factor 512 fits none of the" in msg and "another factorisation" in msg, msg


def test_method_and_schedule_mismatches_are_refused_or_noted(comfy, comfy_base, models):
    method = {"class_type": "BranchGRPOMethod", "inputs": {"method": "diffusionnft", "train_timesteps": 100,
                                                           "kl_beta": -1.0}}
    g = _graph(models, "nft100", extra={"method": method})
    g["trainer"]["inputs"]["method"] = ["method", 0]
    msg = _fails_before_compute(comfy, g, "ad_nft100")
    assert "Method (BranchGRPO): train_timesteps — 100" in msg and "set at most 3" in msg, msg

    # the default (9) trimmed, SDE everywhere, more trees than prompts: legal, noted
    g = _graph(models, "nft_noted", iterations=1, extra={"method": dict(method, inputs=dict(method["inputs"],
                                                                                        train_timesteps=0))})
    g["trainer"]["inputs"].update(method=["method", 0], prompts_per_iteration=5)
    text = _text(comfy.run(g, timeout=600))
    assert "diffusionnft trains 3 timesteps per image, not its default 9" in text, text
    assert "samples with SDE at every step here" in text and "sde_mode" in text, text
    assert "prompts_per_iteration — 5 trees per iteration from 2 prompt(s)" in text, text

    # sde_mode 'forks only': what the branch presets use; no SDE note
    g["schedule"]["inputs"]["sde_mode"] = "forks only"
    g["trainer"]["inputs"].update(prompts_per_iteration=1, run_name="ad_nft_forks")
    text = _text(comfy.run(g, timeout=600))
    assert "samples with SDE at every step" not in text and "prompts_per_iteration" not in text, text


@pytest.mark.parametrize("what,change,expect", [
    ("nan learning rate", {"learning_rate": float("nan")}, "learning_rate must be a finite number (got nan)"),
    ("one step with a split", {"steps": 1, "split_steps": "0"}, "a 1-step rollout has no step to fork at"),
])
def test_exact_messages(comfy, comfy_base, models, what, change, expect):
    g = _graph(models, what.replace(" ", "_"))
    for k, v in change.items():
        (g["schedule"] if k in g["schedule"]["inputs"] else g["trainer"])["inputs"][k] = v
    with pytest.raises((ComfyExecutionError, ComfyQueueError)) as err:
        comfy.run(g, timeout=300)
    if getattr(err.value, "prompt_id", None):  # a NaN in the server's history is not JSON the frontend can read
        http_json(comfy.url + "/history", {"delete": [err.value.prompt_id]})
    msg = str(err.value) + str(getattr(err.value, "body", ""))
    assert expect in msg and "step -1" not in msg, msg[-2000:]


# ------------------------------------------------------------------------------------------- resume and files
def test_resume_with_another_adapter_names_both_values_and_resume_off_keeps_the_old_one(comfy, comfy_base, models):
    g = _graph(models, "res_algo", iterations=1)
    g["trainer"]["inputs"]["resume"] = True
    assert comfy.run(g, timeout=600)["status"]["status_str"] == "success"
    run = _run_dir(comfy_base, "ad_res_algo")
    first = torch.load(run / "checkpoint.pt", weights_only=True)["adapter"]

    g2 = _graph(models, "res_algo", iterations=2, algorithm="LoHa", rank=8)
    g2["trainer"]["inputs"]["resume"] = True
    with pytest.raises(ComfyExecutionError) as err:
        comfy.run(g2, timeout=300)
    msg = err.value.error_message["exception_message"]
    assert "algorithm: checkpoint 'LoRA', now 'LoHa'" in msg and "lora_rank: checkpoint 4, now 8" in msg, msg

    # a crashed checkpoint write left its temporary; resume off moves the old checkpoint aside and says so
    stale = run / ".tmp-0123456789ab-checkpoint.pt"
    stale.write_bytes(b"x" * 1000)
    g3 = _graph(models, "res_algo", iterations=1)
    entry = comfy.run(g3, timeout=600)
    assert not stale.exists()
    assert "resume is off: the run's earlier checkpoint was moved to" in _text(entry)
    aside = torch.load(run / "checkpoint.previous.pt", weights_only=True)["adapter"]
    assert all(torch.equal(aside[k], first[k]) for k in first)
    assert "(started fresh)" in _text(entry) and "resumed from 0" not in _text(entry)


def test_a_reward_mix_needs_only_the_weights_of_connected_rewards(comfy, comfy_base, models):
    g = _graph(models, "mix_two", iterations=1)
    g["r2"] = {"class_type": "BranchGRPOWeightFreeReward", "inputs": {"reward": "contrast"}}
    g["mix"] = {"class_type": "BranchGRPORewardMix", "inputs": {"reward_1": ["reward", 0], "weight_1": 1.0,
                                                                "reward_2": ["r2", 0], "weight_2": 0.5}}
    g["trainer"]["inputs"]["reward"] = ["mix", 0]
    assert comfy.run(g, timeout=600)["status"]["status_str"] == "success"
    assert [m["iteration"] for m in metrics_of(comfy, "ad_mix_two")] == [1]


# ------------------------------------------------------------------------------------------- in-process
@pytest.fixture(scope="module")
def settings_mod():
    nve.import_comfy()
    return importlib.import_module(f"{nve.PACK}.nodes.settings")


FLAT = dict(split_steps="", branching="1", split_noise_scale=4.0, sde="flowgrpo", eta=0.7, shift=3.0,
            group_size=16, sde_window_size=0, sde_window_start=0, sde_mode="none")
TREE = dict(steps=20, split_steps="0,3,6,9", branching="2", split_noise_scale=4.0, sde="dancegrpo", eta=0.3,
            shift=3.0, group_size=1, sde_window_size=0, sde_window_start=0, sde_mode="forks only")
FORWARD_PRESETS = {"diffusionnft": dict(FLAT, steps=10), "awm": dict(FLAT, steps=14), "dgpo": dict(FLAT, steps=10),
                   "branch-nft": TREE, "branch-awm": TREE, "branch-dgpo": TREE}


@pytest.mark.parametrize("name", sorted(FORWARD_PRESETS))
def test_each_forward_process_presets_schedule_comes_from_node_inputs(settings_mod, name):
    from branchgrpo.presets import preset
    node = settings_mod.BranchScheduleNode
    inputs = FORWARD_PRESETS[name]
    built = node.build(**inputs)
    wanted = preset(name).schedule
    assert built == wanted, (built, wanted)
    assert built.sde_steps() == ([] if not wanted.split_steps else list(wanted.split_steps))
    # what the node gave before sde_mode (window size 0 = SDE everywhere) is not the preset's
    assert node.build(**dict(inputs, sde_mode="auto")) != wanted


def test_sde_modes_that_cannot_mean_anything_are_refused(settings_mod):
    node = settings_mod.BranchScheduleNode
    with pytest.raises(ValueError, match="Branch Schedule: sde_mode — 'none' samples every step with the ODE"):
        node.build(**dict(TREE, sde_mode="none"))
    with pytest.raises(ValueError, match="sde_mode 'window' needs a window of at least 1 step"):
        node.build(**dict(TREE, sde_mode="window"))
    assert node.build(**dict(TREE, sde_mode="window", sde_window_size=4)).sde_window == (0, 4)
    assert node.build(**dict(TREE, sde_mode="everywhere", sde_window_size=4)).sde_window is None


def test_rank_notes_on_some_layers_and_refusal_on_all(settings_mod):
    adapters = importlib.import_module(f"{nve.PACK}.nodes.adapters")
    T = adapters.Target
    targets = [T("wide", "weight", (256, 256)), T("narrow", "weight", (32, 256))]
    notes = adapters.rank_warnings(targets, "LoRA", 64)
    assert len(notes) == 1 and "narrow (32x256)" in notes[0] and "wide" not in notes[0], notes
    adapters.check_rank(targets, "LoRA", 64)  # legal: the wide layer uses it
    with pytest.raises(ValueError, match="at most 256"):
        adapters.check_rank(targets, "LoRA", 512)
    assert adapters.rank_warnings(targets, "LoKr", 4) == []
    assert "narrow (32x256)" in adapters.rank_warnings(targets, "LoKr", 8)[0]  # 8 * 8 > 32
    assert adapters.rank_warnings(targets, "LoRA", 16) == []
