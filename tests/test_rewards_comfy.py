"""Reward nodes inside a REAL ComfyUI server: tiny weights written into ``models/reward_models``,
loaded by the loader nodes, scored by Score Images (alone and through Reward Mix).

Needs scripts/setup_dev.sh (skipped otherwise, see conftest.py).
"""
from __future__ import annotations

import re

import pytest
import torch

import procs
import tiny_rewards as tr
from comfy_server import COMFY_DIR, REPO_ROOT, VENV_PYTHON, ComfyExecutionError, ComfyQueueError, comfy_missing_reason
from branchgrpo.rewards import RewardMix, make_reward

NODE_IDS = ["BranchGRPOImageRewardLoader", "BranchGRPOHPSLoader", "BranchGRPOPickScoreLoader",
            "BranchGRPOCLIPScoreLoader", "BranchGRPOAestheticLoader", "BranchGRPORewardMix", "BranchGRPOScoreImages",
            "BranchGRPOWeightFreeReward"]
COMMON = {"dtype": "fp32", "batch_size": 8, "max_frames": 0, "temporal_weight": 0.0}
COLOR = 0xFF8822


@pytest.fixture(scope="module")
def reward_files(comfy_base):
    return tr.write_all_tiny_rewards(comfy_base / "models" / "reward_models")


def _image():
    """What the stock EmptyImage node makes: [1, 40, 48, 3] of COLOR."""
    rgb = torch.tensor([(COLOR >> 16) & 0xFF, (COLOR >> 8) & 0xFF, COLOR & 0xFF], dtype=torch.float32) / 255.0
    return rgb.expand(1, 40, 48, 3).clone()


def _texts(entry, node):
    return entry["outputs"][node]["text"]


def _scores(entry, node):
    lines = _texts(entry, node)[0].splitlines()
    return [float(ln.split(":")[1]) for ln in lines if re.match(r"(image|video) \d+: ", ln)]


def test_nodes_are_registered_with_tooltips(comfy, reward_files):
    info = comfy.object_info()
    for nid in NODE_IDS:
        assert nid in info, nid
        node = info[nid]
        assert node.get("description"), nid
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{nid}.{name} has no tooltip"
        assert all(node.get("output_tooltips") or [None]), nid
    clip_opts = info["BranchGRPOCLIPScoreLoader"]["input"]["required"]["model"][1].get("options") \
        or info["BranchGRPOCLIPScoreLoader"]["input"]["required"]["model"][0]
    assert "clip-vit-large-patch14" in clip_opts and "PickScore_v1" in clip_opts
    files = info["BranchGRPOAestheticLoader"]["input"]["required"]["checkpoint"][1].get("options") \
        or info["BranchGRPOAestheticLoader"]["input"]["required"]["checkpoint"][0]
    assert "sac+logos+ava1-l14-linearMSE.pth" in files and "ImageReward/ImageReward.pt" in files
    assert not any(f.startswith(("PickScore_v1/", "clip-vit-large-patch14/")) for f in files)  # folder models


def test_score_images_and_reward_mix_in_comfyui(comfy, reward_files):
    graph = {
        "img": {"class_type": "EmptyImage", "inputs": {"width": 48, "height": 40, "batch_size": 1, "color": COLOR}},
        "clip": {"class_type": "BranchGRPOCLIPScoreLoader", "inputs": {"model": "clip-vit-large-patch14", **COMMON}},
        "aes": {"class_type": "BranchGRPOAestheticLoader",
                "inputs": {"checkpoint": "sac+logos+ava1-l14-linearMSE.pth", "clip": "clip-vit-large-patch14",
                           **COMMON}},
        "ir": {"class_type": "BranchGRPOImageRewardLoader",
               "inputs": {"checkpoint": "ImageReward/ImageReward.pt", **COMMON}},
        "mix": {"class_type": "BranchGRPORewardMix",
                "inputs": {"reward_1": ["clip", 0], "weight_1": 1.0, "reward_2": ["aes", 0], "weight_2": 0.5,
                           "weight_3": 1.0, "weight_4": 1.0, "aggregation": "advantage_sum"}},
        "s_clip": {"class_type": "BranchGRPOScoreImages",
                   "inputs": {"images": ["img", 0], "reward": ["clip", 0], "prompt": "an orange square",
                              "as_video": False}},
        "s_ir": {"class_type": "BranchGRPOScoreImages",
                 "inputs": {"images": ["img", 0], "reward": ["ir", 0], "prompt": "an orange square",
                            "as_video": False}},
        "s_mix": {"class_type": "BranchGRPOScoreImages",
                  "inputs": {"images": ["img", 0], "reward": ["mix", 0], "prompt": "an orange square",
                             "as_video": False}},
    }
    entry = comfy.run(graph, timeout=240)
    assert entry["status"]["status_str"] == "success"
    d = reward_files["aesthetic"].parent
    x = _image()
    clip = make_reward("clip_score", search_dirs=[d])
    aes = make_reward("aesthetic", search_dirs=[d])
    ir = make_reward("imagereward", "ImageReward/ImageReward.pt", search_dirs=[d])
    want_clip = float(clip(x, "an orange square")[0])
    want_mix = float(RewardMix([clip, aes], [1.0, 0.5])(x, "an orange square")[0])
    assert _scores(entry, "s_clip") == pytest.approx([want_clip], abs=2e-5)
    assert _scores(entry, "s_ir") == pytest.approx([float(ir(x, "an orange square")[0])], abs=2e-5)
    assert _scores(entry, "s_mix") == pytest.approx([want_mix], abs=2e-5)
    assert "advantage_sum" in _texts(entry, "mix")[0]
    log = comfy.server.log_path.read_text(errors="replace")
    assert "Requested to load _Holder" in log  # scorer weights go through ComfyUI's model management


def test_score_images_as_video_and_per_line_prompts(comfy, reward_files):
    graph = {
        "img": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 2, "color": COLOR}},
        "clip": {"class_type": "BranchGRPOCLIPScoreLoader",
                 "inputs": {"model": "clip-vit-large-patch14", **{**COMMON, "temporal_weight": 1.0}}},
        "video": {"class_type": "BranchGRPOScoreImages",
                  "inputs": {"images": ["img", 0], "reward": ["clip", 0], "prompt": "a cube", "as_video": True}},
        "lines": {"class_type": "BranchGRPOScoreImages",
                  "inputs": {"images": ["img", 0], "reward": ["clip", 0], "prompt": "a cube\na sphere",
                             "as_video": False}},
    }
    entry = comfy.run(graph, timeout=120)
    d = reward_files["clip"].parent
    clip = make_reward("clip_score", search_dirs=[d], temporal_weight=1.0)
    x = _image()[:, :32, :32].expand(2, 32, 32, 3)
    assert _scores(entry, "video") == pytest.approx([float(clip(x[None], "a cube")[0])], abs=2e-5)
    assert _scores(entry, "lines") == pytest.approx([float(v) for v in clip(x, ["a cube", "a sphere"])], abs=2e-5)
    # a static "video" gets the full temporal bonus of 1
    assert _scores(entry, "video")[0] == pytest.approx(float(clip(x[:1], "a cube")[0]) + 1.0, abs=2e-5)


def test_missing_weights_fail_at_queue_time_with_the_expected_files(comfy, reward_files):
    info = comfy.object_info("BranchGRPOHPSLoader")["BranchGRPOHPSLoader"]
    spec = info["input"]["required"]["checkpoint"]
    options = spec[1].get("options") or spec[0]
    placeholder = [o for o in options if o.startswith("(missing)")]
    assert placeholder == ["(missing) HPS_v2.1_compressed.pt"], options  # no HPS file in reward_models
    assert spec[1]["default"] == placeholder[0]
    graph = {
        "img": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0}},
        "hps": {"class_type": "BranchGRPOHPSLoader", "inputs": {"checkpoint": placeholder[0], **COMMON}},
        "s": {"class_type": "BranchGRPOScoreImages",
              "inputs": {"images": ["img", 0], "reward": ["hps", 0], "prompt": "x", "as_video": False}},
    }
    with pytest.raises(ComfyQueueError) as err:
        comfy.queue(graph)
    text = str(err.value.body)
    for needle in ("HPS v2.1 Loader", "checkpoint", "HPS_v2.1_compressed.pt", "reward_models", "xswu/HPSv2"):
        assert needle in text, needle
    # a workflow saved elsewhere names the canonical file, absent here: the same explanation at queue time
    graph["hps"]["inputs"]["checkpoint"] = "HPS_v2.1_compressed.pt"
    graph["pick"] = {"class_type": "BranchGRPOPickScoreLoader",
                     "inputs": {"model": "Not_There", "processor": "auto", **COMMON}}
    graph["s2"] = {"class_type": "BranchGRPOScoreImages",
                   "inputs": {"images": ["img", 0], "reward": ["pick", 0], "prompt": "x", "as_video": False}}
    with pytest.raises(ComfyQueueError) as err:
        comfy.queue(graph)
    errors = err.value.body["node_errors"]
    hps = " ".join(e["details"] for e in errors["hps"]["errors"])
    assert errors["hps"]["errors"][0]["type"] == "custom_validation_failed"
    assert "'HPS_v2.1_compressed.pt' not found" in hps and "xswu/HPSv2" in hps
    pick = " ".join(e["details"] for e in errors["pick"]["errors"])
    assert "'Not_There' not found" in pick and "yuvalkirstain/PickScore_v1" in pick and "config.json" in pick



def test_wrong_file_fails_with_node_field_and_keys(comfy, reward_files):
    """HPS v2.1 Loader given the aesthetic MLP: checked against a meta-device ViT-H-14 (no 4 GB allocated)."""
    graph = {
        "img": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0}},
        "hps": {"class_type": "BranchGRPOHPSLoader",
                "inputs": {"checkpoint": "sac+logos+ava1-l14-linearMSE.pth", **COMMON}},
        "s": {"class_type": "BranchGRPOScoreImages",
              "inputs": {"images": ["img", 0], "reward": ["hps", 0], "prompt": "x", "as_video": False}},
    }
    with pytest.raises(ComfyExecutionError) as err:
        comfy.run(graph, timeout=120)
    msg = str(err.value)
    assert "HPS v2.1 Loader: checkpoint — sac+logos+ava1-l14-linearMSE.pth" in msg
    assert "Missing keys (686)" in msg and "Unexpected keys (10)" in msg and "right file" in msg

# In a separate process with ComfyUI's modules (no server): the loaders' memory contract.
RELEASE_SCRIPT = r'''
import gc, importlib, importlib.util, sys, types, weakref
from pathlib import Path
REPO = Path(sys.argv[1]); BASE = Path(sys.argv[2])
sys.path.insert(0, sys.argv[3]); sys.path.insert(1, str(REPO / "tests")); sys.path.append(str(REPO))
from comfy.cli_args import args
args.cpu = True
import folder_paths
folder_paths.models_dir = str(BASE / "models")
import torch
import comfy.model_management as mm
pkg = types.ModuleType("branchgrpo_pack"); pkg.__path__ = [str(REPO)]; sys.modules["branchgrpo_pack"] = pkg
sub = types.ModuleType("branchgrpo_pack.nodes"); sub.__path__ = [str(REPO / "nodes")]
sys.modules["branchgrpo_pack.nodes"] = sub
R = importlib.import_module("branchgrpo_pack.nodes.rewards")
import tiny_rewards as tr
tr.write_tiny_clip(BASE / "models" / "reward_models" / "clip-vit-large-patch14")
tr.write_tiny_aesthetic(BASE / "models" / "reward_models")
kw = dict(dtype="auto", batch_size=4, max_frames=0, temporal_weight=0.0)
reward = R.CLIPScoreLoaderNode.execute(model="clip-vit-large-patch14", **kw).args[0]
aes = R.AestheticLoaderNode.execute(checkpoint="sac+logos+ava1-l14-linearMSE.pth", clip="clip-vit-large-patch14",
                                    **kw).args[0]
assert aes.scorer.clip is reward.scorer.model, "CLIP not shared"
assert aes.patchers[0] is reward.patchers[0], "one ModelPatcher per shared module"
x = torch.rand(2, 32, 32, 3)
a = reward(x, "a cat"); b = aes(x)
loaded = [lm.model for lm in mm.current_loaded_models]
assert reward.patchers[0] in loaded and aes.patchers[1] in loaded
again = R.CLIPScoreLoaderNode.execute(model="clip-vit-large-patch14", **{**kw, "batch_size": 1}).args[0]
assert again.scorer.model is reward.scorer.model and again.batch_size == 1 and reward.batch_size == 4
assert torch.allclose(again(x, "a cat"), a)
# as inside ComfyUI: a loader and a scoring node run under torch.inference_mode; weights moved there
# become inference tensors; a grad=True call (trainer, inference_mode(False)) must still reach the pixels
with torch.inference_mode():
    r2 = R.CLIPScoreLoaderNode.execute(model="clip-vit-large-patch14", **kw).args[0]
    assert not any(p.is_inference() for p in r2.scorer.model.parameters())
    r2(x, "a cat")
    r2.scorer.model._apply(lambda t: t.clone())
assert any(p.is_inference() for p in r2.scorer.model.parameters())
with torch.inference_mode(False), torch.enable_grad():
    xg = x.clone().requires_grad_(True)
    r2(xg, "a cat", grad=True).sum().backward()
assert float(xg.grad.abs().sum()) > 0
del r2
ref = weakref.ref(reward.scorer.model)
del reward, aes, again, loaded
mm.unload_all_models(); gc.collect(); mm.cleanup_models()
assert ref() is None, gc.get_referrers(ref())
assert not any(lm.real_model() is not None for lm in mm.current_loaded_models)
print("RELEASED-OK")
'''


@pytest.mark.skipif(comfy_missing_reason() is not None, reason=str(comfy_missing_reason()))
def test_scorers_are_shared_managed_by_comfy_and_released(tmp_path):
    """Two loaders on the same CLIP folder share one module and one ModelPatcher; scoring registers it
    with comfy.model_management; a different batch size is a view on the same weights; once no output
    holds the scorer, unload_all_models + gc frees it (the weak cache does not keep it alive)."""
    script = tmp_path / "release.py"
    script.write_text(RELEASE_SCRIPT)
    assert (COMFY_DIR / "main.py").is_file()
    proc = procs.run([str(VENV_PYTHON), str(script), str(REPO_ROOT), str(tmp_path / "base"), str(COMFY_DIR)],
                     timeout=300, cwd=str(tmp_path))
    assert "RELEASED-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


YAML_SCRIPT = r'''
import importlib, sys, types
from pathlib import Path
REPO = Path(sys.argv[1]); BASE = Path(sys.argv[2])
sys.path.insert(0, sys.argv[3]); sys.path.insert(1, str(REPO / "tests")); sys.path.append(str(REPO))
from comfy.cli_args import args
args.cpu = True
import folder_paths
folder_paths.models_dir = str(BASE / "models")
import utils.extra_config
shared = BASE / "shared"
BASE.mkdir(parents=True, exist_ok=True)
(BASE / "extra.yaml").write_text(f"shared:\n  base_path: {shared}\n  reward_models: my_rewards\n")
utils.extra_config.load_extra_path_config(str(BASE / "extra.yaml"))  # as ComfyUI does before custom nodes
pkg = types.ModuleType("branchgrpo_pack"); pkg.__path__ = [str(REPO)]; sys.modules["branchgrpo_pack"] = pkg
sub = types.ModuleType("branchgrpo_pack.nodes"); sub.__path__ = [str(REPO / "nodes")]
sys.modules["branchgrpo_pack.nodes"] = sub
R = importlib.import_module("branchgrpo_pack.nodes.rewards")
dirs = R.reward_dirs()
assert str(shared / "my_rewards") in dirs and str(BASE / "models" / "reward_models") in dirs, dirs
import tiny_rewards as tr
tr.write_tiny_aesthetic(shared / "my_rewards")
tr.write_tiny_clip(shared / "my_rewards" / "clip-vit-large-patch14")
opts, default = R.choices(R.weight_files(), "aesthetic")
assert default == "sac+logos+ava1-l14-linearMSE.pth", (opts, default)
copts, cdefault = R.choices(R.model_folders(), "clip")
assert cdefault == "clip-vit-large-patch14", copts
r = R.AestheticLoaderNode.execute(checkpoint=default, clip=cdefault, dtype="auto", batch_size=2, max_frames=0,
                                  temporal_weight=0.0).args[0]
import torch
assert r(torch.rand(1, 32, 32, 3)).shape == (1,)
print("YAML-OK")
'''


@pytest.mark.skipif(comfy_missing_reason() is not None, reason=str(comfy_missing_reason()))
def test_reward_models_folder_from_extra_model_paths_yaml(tmp_path):
    """A 'reward_models' entry of extra_model_paths.yaml (loaded by ComfyUI before custom nodes) is searched
    next to <models>/reward_models, and the loaders find and load weights there."""
    script = tmp_path / "yaml_paths.py"
    script.write_text(YAML_SCRIPT)
    proc = procs.run([str(VENV_PYTHON), str(script), str(REPO_ROOT), str(tmp_path / "base"), str(COMFY_DIR)],
                     timeout=300, cwd=str(tmp_path))
    assert "YAML-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
