"""The shipped workflows say what they are and what they need (see tests/workflow_templates.py for why this
lives in the workflows and not in the template browser's cards)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import workflow_templates as wt

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))


def test_every_shipped_workflow_has_an_entry():
    assert sorted(p.stem for p in WORKFLOWS) == sorted(wt.TEMPLATES)


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_carries_title_description_and_hardware(path):
    info = json.loads(path.read_text())["extra"]["branchgrpo"]
    description, runs_on = wt.TEMPLATES[path.stem]
    assert info.get("title", "").strip(), "no title"
    assert info.get("description") == description and info.get("runs_on") == runs_on, \
        f"{path.name}: extra.branchgrpo is stale; regenerate it (generators call workflow_templates.apply)"
    # the hardware comes first in the description; the CPU demo says so in its Notes too
    assert description.startswith(("Runs on a CPU",) if runs_on == "cpu" else ("Needs a GPU", "Needs the GPU"))
    if runs_on == "cpu":
        notes = [n["widgets_values"][0] for n in json.loads(path.read_text())["nodes"] if n["type"] == "Note"]
        assert any("CPU" in text for text in notes)


def test_exactly_one_template_runs_on_a_cpu():
    assert [s for s, (_, runs_on) in wt.TEMPLATES.items() if runs_on == "cpu"] == ["cpu_demo"]
