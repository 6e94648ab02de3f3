"""Run config files (branchgrpo.config_file): the schema comes from the dataclasses, pydantic checks the types,
tomli-w writes the file. No model is loaded: parse_config(..., check_files=False) only."""
from __future__ import annotations

import dataclasses
import tomllib

import pytest

from branchgrpo.config_file import (ENGINE_SECTIONS, TRAINING_FIELDS, ConfigError, default_template, dump_config,
                                    dump_toml, parse_config)
from branchgrpo.trainer import TrainerConfig


def _config(**sections) -> dict:
    data = {"preset": "branchgrpo", "model": {"path": "/models/flux"}, "prompts": {"train": ["a cat"]},
            "rewards": [{"name": "contrast"}]}
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values} if isinstance(values, dict) else values
    return data


def _error(**sections) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(_config(**sections), check_files=False)
    return str(err.value)


def test_sections_are_the_engine_dataclasses():
    fields = {f.name: f for f in dataclasses.fields(TrainerConfig)}
    assert set(ENGINE_SECTIONS) == {n for n in fields if dataclasses.is_dataclass(fields[n].default_factory)}
    assert {"schedule", "advantage", "pruning", "optim", "objective"} <= set(ENGINE_SECTIONS)
    assert set(TRAINING_FIELDS) == set(fields) - set(ENGINE_SECTIONS) - {"reward_weights"}
    template = tomllib.loads(default_template("branchgrpo"))
    for sec, cls in ENGINE_SECTIONS.items():  # every field of every section is in the template
        assert set(template[sec]) == {f.name for f in dataclasses.fields(cls)}, sec
    assert set(template["training"]) == set(TRAINING_FIELDS)


def test_engine_sections_parse_and_name_their_fields():
    cfg = parse_config(_config(objective={"name": "diffusionnft", "train_timesteps": 3},
                               training={"init_same_noise": True}), check_files=False)
    assert cfg.trainer.objective.name == "diffusionnft" and cfg.trainer.objective.train_timesteps == 3
    assert cfg.trainer.init_same_noise is True
    assert "objective.nmae: unknown field; did you mean 'name'?" in _error(objective={"nmae": "awm"})
    assert "objective.name" in _error(objective={"name": "grpo"})  # the engine's own check, on its field


def test_types_are_strict_and_messages_name_the_field():
    assert "training.iterations: expected an integer, got '3'" in _error(training={"iterations": "3"})
    assert "training.iterations: expected an integer, got True" in _error(training={"iterations": True})
    assert "optim.learning_rate: expected a number, got '1e-4'" in _error(optim={"learning_rate": "1e-4"})
    assert "schedule.split_steps[1]: expected an integer, got 'x'" in _error(schedule={"split_steps": [0, "x"]})
    assert "optim.betas: expected a list of 2 values (a number, a number), got 3 values" in \
        _error(optim={"betas": [0.9, 0.99, 0.999]})
    assert "run.progress: expected true or false, got 1" in _error(run={"progress": 1})
    assert "model.family: expected one of 'auto', 'flux', 'sd3', 'wan', got 'flx'; did you mean 'flux'?" in \
        _error(model={"family": "flx"})
    assert "lora.targts: unknown field; did you mean 'targets'?" in _error(lora={"targts": ["*.to_q"]})
    assert "rewards[0].wieght: unknown field; did you mean 'weight'?" in \
        _error(rewards=[{"name": "contrast", "wieght": 2.0}])
    # an integer is a number; lists become tuples; "none" clears an optional field
    cfg = parse_config(_config(optim={"learning_rate": 1}, schedule={"split_steps": [0, 2], "sde_window": "none"},
                               pruning={"depth_stop": "None"}), check_files=False)
    assert cfg.trainer.optim.learning_rate == 1.0 and isinstance(cfg.trainer.optim.learning_rate, float)
    assert cfg.trainer.schedule.split_steps == (0, 2) and cfg.trainer.schedule.sde_window is None
    assert cfg.trainer.pruning.depth_stop is None


def test_written_config_reads_back_the_same():
    awkward = ['a "quoted" prompt', "two\nlines", "tab\there", "ünïcödé 猫", "back\\slash"]
    data = _config(prompts={"train": awkward}, run={"name": "r1", "lora_file": "/out/x y/ü.safetensors"},
                   model={"text_encoder_files": {"text_encoder_2": "/m/" + "t" * 150 + ".safetensors"}},
                   rewards=[{"name": "brightness", "weight": 0.5, "args": {"target": 0.6, "nested": {"k": [1, 2]}}},
                            {"name": "contrast", "args": {}}],
                   pruning={"depth_stop": None}, optim={"learning_rate": 1e-5})
    cfg = parse_config(data, check_files=False)
    for docs in (True, False):
        text = dump_config(cfg, docs=docs)
        again = parse_config(tomllib.loads(text), check_files=False)
        assert again.trainer == cfg.trainer and again.model == cfg.model and again.run == cfg.run
        assert again.rewards == cfg.rewards and again.prompts == awkward
    text = dump_toml(cfg.to_dict(), docs=False)
    assert "split_steps = [0, 3, 6, 9]" in text  # short lists stay on one line
    assert "[rewards.args]" in text and "[model.text_encoder_files]" in text


def _readme_headless_section() -> str:
    """docs/headless.md, the page the README points to for the command line."""
    from pathlib import Path
    return (Path(__file__).resolve().parents[1] / "docs" / "headless.md").read_text(encoding="utf-8")


def test_readme_config_table_and_example_match_the_code():
    import re
    section = _readme_headless_section()
    rows = re.findall(r"^\| `\[{1,2}([a-z_]+)\]{1,2}` \| .*? \| (.*) \|$", section, flags=re.M)
    template = tomllib.loads(default_template("branchgrpo"))
    documented = {name: re.findall(r"`([a-z_0-9]+)`", fields) for name, fields in rows}
    expected = {k: list((v[0] if isinstance(v, list) else v)) for k, v in template.items() if k != "preset"}
    assert documented == expected, "README's config table is stale: regenerate it from --print-default-config"
    example = re.search(r"```toml\n(.*?)```", section, flags=re.S).group(1)
    cfg = parse_config(tomllib.loads(example), check_files=False)
    assert cfg.preset == "branchgrpo-deppru" and cfg.rewards[0].name == "hps_v2.1" and len(cfg.prompts) == 2
