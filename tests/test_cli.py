"""Headless training: ``python -m branchgrpo train CONFIG`` on tiny random-weight diffusers models (CPU).

* the printed template documents every field and parses back to the preset;
* bad configs fail at start, naming the field;
* FLUX trains; a run stopped after one iteration and resumed ends exactly where an uninterrupted run ends;
* ``torchrun --nproc_per_node 2`` (gloo) gives the LoRA of the 1-process run with the same global batch
  and seed, with and without FSDP, and only rank 0 writes files;
* SD3 (pooled projections, true CFG) and Wan 2.1 (video latents) train.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import procs
import tiny_diffusers as td
from branchgrpo import cli
from branchgrpo.config_file import ConfigError, default_template, dump_toml, load_config, parse_config
from branchgrpo.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny_diffusers")
    return {f: td.write_tiny_pipeline(f, base / f) for f in ("flux", "sd3", "wan")}


def flux_config(tiny, out: Path, name: str = "run", **sections) -> dict:
    cfg = {
        "run": {"name": name, "output_dir": str(out), "progress": False},
        "model": {"path": str(tiny["flux"]), "width": 16, "height": 16, "max_sequence_length": 16},
        "lora": {"rank": 2, "alpha": 2.0},
        "prompts": {"train": ["a red cube", "a blue ball", "a green tree"]},
        "rewards": [{"name": "brightness", "args": {"target": 0.8}}],
        "training": {"iterations": 3, "prompts_per_iteration": 2, "seed": 11, "max_batch": 8},
        "schedule": {"num_steps": 4, "split_steps": [0, 1], "branching": 2},
        # adam_eps: Adam turns a near-zero gradient into a step of about +-lr, so float noise in such an
        # element (sums in another order across processes) would become lr-sized; a larger eps keeps the
        # 1- and 2-process runs comparable at float tolerance.
        "optim": {"learning_rate": 0.05, "max_train_batch": 3, "clip_range": 0.2, "adam_eps": 1e-5},
    }
    for sec, values in sections.items():
        cfg.setdefault(sec, {}).update(values)
    return cfg


def write(path: Path, data: dict) -> Path:
    path.write_text(dump_toml(data, docs=False))
    return path


def lora_tensors(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# ------------------------------------------------------------------------------------------- config
def test_template_documents_every_field_and_round_trips(capsys):
    assert cli.main(["train", "--print-default-config", "--preset", "branchgrpo-deppru"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    section = None
    for i, line in enumerate(lines):
        if line.startswith("["):
            section = line
        elif section and re.match(r"^[A-Za-z_0-9]+ = ", line):
            assert lines[i - 1].startswith("#"), f"{section} {line.split(' =')[0]} is not documented"
    data = tomllib.loads(text)
    assert data["preset"] == "branchgrpo-deppru"
    cfg = parse_config(data, check_files=False)
    ref = PRESETS["branchgrpo-deppru"]()
    assert cfg.trainer.schedule == ref.schedule and cfg.trainer.pruning == ref.pruning
    assert cfg.trainer.optim == ref.optim and cfg.trainer.advantage == ref.advantage
    # preset + overrides, and the written config parses back to the same thing
    data["schedule"] = {"num_steps": 10, "split_steps": [0, 2]}
    data["pruning"] = {"depths": [9, 10], "depth_stop": "none"}
    cfg = parse_config(data, check_files=False)
    assert cfg.trainer.schedule.num_steps == 10 and cfg.trainer.schedule.branching == 2  # kept from the preset
    assert cfg.trainer.pruning.depth_stop is None and cfg.trainer.pruning.depth_slide is True
    again = parse_config(tomllib.loads(dump_toml(cfg.to_dict())), check_files=False)
    assert again.trainer == cfg.trainer and again.model == cfg.model and again.rewards == cfg.rewards
    assert "sde_window = [0, 4]" in default_template("branchgrpo-mix")


BAD = [
    ({"schedule": {"split_steps": [0, 30]}}, "schedule.split_steps"),
    ({"optim": {"learning_rat": 1e-3}}, "optim.learning_rat: unknown field; did you mean 'learning_rate'"),
    ({"training": {"iterations": "ten"}}, "training.iterations: expected an integer"),
    ({"rewards": [{"name": "imagerewrd"}]}, "rewards[0].name: unknown reward 'imagerewrd'; did you mean 'imagereward'"),
    ({"model": {"path": "/nonexistent/model"}}, "model.path"),
    ({"lora": {"rank": 0}}, "lora.rank"),
    ({"pruning": {"depths": [25]}}, "pruning.depths"),
    ({"run": {"name": "a/b"}}, "run.name"),
    ({"advantage": {"mode": "trees"}}, "advantage.mode"),
    ({"schedul": {"num_steps": 3}}, "schedul: unknown field; did you mean 'schedule'"),
    ({"model": {"fsdp": True}}, "model.fsdp"),
    ({"training": {"prompts_per_iteration": 0}}, "training.prompts_per_iteration"),
]


@pytest.mark.parametrize("change,field", BAD, ids=[b[1].split(":")[0] for b in BAD])
def test_bad_config_names_its_field(tiny, tmp_path, capsys, change, field):
    data = flux_config(tiny, tmp_path)
    for sec, value in change.items():
        if isinstance(value, dict) and isinstance(data.get(sec), dict):
            data[sec].update(value)
        else:
            data[sec] = value
    path = write(tmp_path / "bad.toml", data)
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert field in err, err
    assert not (tmp_path / "run").exists()  # failed before anything was written


def test_bad_model_settings_fail_before_training(tiny, tmp_path, capsys):
    """Checks that need the model's configs (resolution vs VAE/patch, LoRA targets) still fail at start."""
    for change, field in ((["--set", "model.height=18"], "model.height: 18 px is not a multiple of 4"),
                          (["--set", 'lora.targets=["*nomatch*"]'], "lora.targets")):
        path = write(tmp_path / "cfg.toml", flux_config(tiny, tmp_path))
        assert cli.main(["train", str(path), *change]) == 2
        err = capsys.readouterr().err
        assert field in err, err
        assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def reference_run(tiny, tmp_path_factory):
    """An uninterrupted 3-iteration FLUX run, 2 prompts per iteration, one process."""
    out = tmp_path_factory.mktemp("ref")
    path = write(out / "ref.toml", flux_config(tiny, out, "ref"))
    assert cli.main(["train", str(path), "-q"]) == 0
    return out / "ref"


def test_flux_trains_and_writes_comfy_lora(reference_run):
    files = sorted(p.name for p in reference_run.iterdir())
    assert files == ["checkpoint.pt", "config.toml", "metrics.jsonl", "ref.safetensors"]
    rows = [json.loads(ln) for ln in (reference_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert all(r["edges_trained"] > 0 and r["leaves"] == 8 for r in rows)
    sd = lora_tensors(reference_run / "ref.safetensors")
    assert set(sd) >= {"diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight",
                       "diffusion_model.double_blocks.0.img_attn.qkv.alpha",
                       "diffusion_model.single_blocks.0.linear1.lora_down.weight"}
    assert all(k.startswith("diffusion_model.") for k in sd)
    assert sd["diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight"].abs().sum() > 0  # it trained
    with safe_open(str(reference_run / "ref.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["branchgrpo.base_model"] == "flux" and meta["branchgrpo.iterations"] == "3"
    state = torch.load(reference_run / "checkpoint.pt", weights_only=True)
    assert state["format"] == "branchgrpo-checkpoint" and state["iteration"] == 3


def test_resume_continues_exactly(tiny, tmp_path, reference_run):
    import shutil
    path = write(tmp_path / "ref.toml", flux_config(tiny, tmp_path, "ref"))
    assert cli.main(["train", str(path), "-q", "--stop-after", "1"]) == 0
    assert torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=True)["iteration"] == 1
    shutil.copy(tmp_path / "ref" / "checkpoint.pt", tmp_path / "after1.pt")
    assert cli.main(["train", str(path), "-q", "--stop-after", "2"]) == 0  # run.resume = "auto"
    # as if the run had died after iteration 2 without its checkpoint: resume from the older one; the
    # metrics rows of the lost iteration are replaced, not duplicated
    assert cli.main(["train", str(path), "-q", "--resume", str(tmp_path / "after1.pt")]) == 0
    a, b = lora_tensors(reference_run / "ref.safetensors"), lora_tensors(tmp_path / "ref" / "ref.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ref_state = torch.load(reference_run / "checkpoint.pt", weights_only=True)
    new_state = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=True)
    for k, v in ref_state["adapter"].items():
        assert torch.equal(v, new_state["adapter"][k])
    drop = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time") and k != "wall_time"} for r in rows]
    ref_rows = [json.loads(x) for x in (reference_run / "metrics.jsonl").read_text().splitlines()]
    new_rows = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert drop(ref_rows) == drop(new_rows)
    # a changed setting refuses to resume, naming what to do
    assert cli.main(["train", str(path), "-q", "--set", "optim.learning_rate=0.1"]) == 2


def _torchrun(config: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "branchgrpo", "train",
           str(config), "-q", *extra]
    return procs.run(cmd, cwd=ROOT, env=ENV, timeout=300)


@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp"])
def test_two_process_gloo_matches_one_process(tiny, tmp_path, reference_run, fsdp):
    path = write(tmp_path / "ref.toml", flux_config(tiny, tmp_path, "ref", model={"fsdp": fsdp}))
    proc = _torchrun(path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "ref"
    # only rank 0 wrote, once
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.toml", "metrics.jsonl", "ref.safetensors"]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    ref_rows = [json.loads(x) for x in (reference_run / "metrics.jsonl").read_text().splitlines()]
    for r, q in zip(rows, ref_rows):  # global counts and the gathered rewards are the 1-process ones
        assert r["leaves"] == q["leaves"] and r["edges_trained"] == q["edges_trained"]
        assert r["reward_mean"] == pytest.approx(q["reward_mean"], abs=1e-5)
    a, b = lora_tensors(reference_run / "ref.safetensors"), lora_tensors(run / "ref.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")


def test_fsdp_dora_matches_one_process(tiny, tmp_path):
    """DoRA reads the (sharded) base weights in its forward and in the file's dora_scale: two FSDP processes
    give the one-process file."""
    one = flux_config(tiny, tmp_path / "one", "dora", lora={"algorithm": "DoRA", "targets": ["*"]},
                      training={"iterations": 1})
    assert cli.main(["train", str(write(tmp_path / "one.toml", one)), "-q"]) == 0
    two = flux_config(tiny, tmp_path / "two", "dora", lora={"algorithm": "DoRA", "targets": ["*"]},
                      training={"iterations": 1}, model={"fsdp": True})
    proc = _torchrun(write(tmp_path / "two.toml", two))
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = lora_tensors(tmp_path / "one" / "dora" / "dora.safetensors"), lora_tensors(tmp_path / "two" / "dora" /
                                                                                       "dora.safetensors")
    assert a.keys() == b.keys() and any(k.endswith(".dora_scale") for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")


def test_sd3_and_wan_train(tiny, tmp_path):
    sd3 = flux_config(tiny, tmp_path, "sd3", model={"path": str(tiny["sd3"]), "cfg_scale": 2.0,
                                                     "negative_prompt": "blurry"},
                      training={"iterations": 1, "prompts_per_iteration": 1})
    sd3["rewards"] = [{"name": "contrast"}, {"name": "saturation", "weight": 0.5}]
    assert cli.main(["train", str(write(tmp_path / "sd3.toml", sd3)), "-q"]) == 0
    wan = flux_config(tiny, tmp_path, "wan", model={"path": str(tiny["wan"]), "frames": 5,
                                                     "gradient_checkpointing": True},
                      training={"iterations": 1, "prompts_per_iteration": 1})
    assert cli.main(["train", str(write(tmp_path / "wan.toml", wan)), "-q"]) == 0
    for name, key in (("sd3", "diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_up.weight"),
                      ("wan", "diffusion_model.blocks.0.self_attn.q.lora_up.weight")):
        sd = lora_tensors(tmp_path / name / f"{name}.safetensors")
        assert key in sd and all(k.startswith("diffusion_model.") for k in sd)
        row = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])
        assert row["edges_trained"] > 0 and row["loss"] is not None
    meta_rows = json.loads((tmp_path / "sd3" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "reward/contrast" in meta_rows and "reward/saturation" in meta_rows


def test_config_check_and_overrides(tiny, tmp_path, capsys):
    path = write(tmp_path / "cfg.toml", flux_config(tiny, tmp_path))
    assert cli.main(["train", str(path), "--check", "--set", "training.iterations=7"]) == 0
    assert "7 iterations" in capsys.readouterr().out
    cfg = load_config(path, ["schedule.split_steps=[0]", "run.name=other"])
    assert cfg.trainer.schedule.split_steps == (0,) and cfg.run_dir.endswith("other")
    with pytest.raises(ConfigError, match="schedule.num_steps"):
        load_config(path, ["schedule.num_steps=-1"])


def test_single_file_text_encoder(tiny, tmp_path):
    """model.text_encoder_files: a text encoder from one Hugging Face-layout file (as ComfyUI keeps t5xxl)."""
    from safetensors.torch import save_file

    from branchgrpo.models import diffusers_adapter as da
    ref = da.load_pipeline("flux", str(tiny["flux"]))
    t5 = {k: v.clone() for k, v in ref.text_encoder_2.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(t5, str(tmp_path / "t5.safetensors"))
    pipe = da.load_pipeline("flux", str(tiny["flux"]),
                            text_encoder_files={"text_encoder_2": str(tmp_path / "t5.safetensors")})
    for k, v in ref.text_encoder_2.state_dict().items():
        assert torch.equal(pipe.text_encoder_2.state_dict()[k], v), k
    save_file({"shared.weight": t5["shared.weight"]}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(da.ModelConfigError, match="model.text_encoder_files.text_encoder_2"):
        da.load_pipeline("flux", str(tiny["flux"]),
                         text_encoder_files={"text_encoder_2": str(tmp_path / "partial.safetensors")})


def test_resume_check_names_each_difference_and_ignores_monitoring():
    import json as _json
    from types import SimpleNamespace

    from branchgrpo.cli import _check_resume
    from branchgrpo.config_file import ConfigError
    from branchgrpo.trainer import TrainerConfig

    lora = torch.nn.Linear(2, 2)
    saved = TrainerConfig(iterations=4, eval_every=0)
    state = {"config": _json.dumps(saved.to_dict()), "adapter": lora.state_dict()}
    # more iterations and another evaluation cadence continue the same run
    _check_resume(SimpleNamespace(trainer=TrainerConfig(iterations=9, eval_every=5)), state, lora, "ckpt")
    changed = TrainerConfig(iterations=4, seed=3)
    changed.optim.learning_rate = 5e-5
    with pytest.raises(ConfigError) as err:
        _check_resume(SimpleNamespace(trainer=changed), state, lora, "ckpt")
    text = str(err.value)
    assert "seed: checkpoint 0, now 3" in text
    assert "optim.learning_rate: checkpoint 0.0001, now 5e-05" in text
