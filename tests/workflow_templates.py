"""What the template browser cannot show yet: a one-line description of each shipped workflow and the
hardware it needs, kept in the workflow itself (``extra.branchgrpo``, beside its title).

ComfyUI 0.3.75's frontend (comfyui_frontend_package 1.32.9) builds a custom-node template from its file name
alone: ``GET /api/workflow_templates`` answers ``{pack: [file stems]}``, and the workflow-templates store turns
each stem into ``{name: stem, title: stem, description: stem}``; the card shows ``title ?? name`` (the
translated title is used only for ComfyUI's own templates) and the description with ``-``/``_`` as spaces.
No file, field or translation a pack ships is read for the title or the description. So each workflow
carries them in ``extra.branchgrpo`` (``title``, ``description``, ``runs_on``) and says them in its Notes.

Generators of ``workflows/*.json`` (``tests/test_workflows.py``'s ``regenerate``, ``tests/cpu_demo_workflow.py``)
call :func:`apply` on each workflow they write; ``tests/test_templates.py`` checks the shipped files.
"""
from __future__ import annotations

#: stem -> (description, runs_on); runs_on is "cpu" (runs on a CPU in minutes) or "gpu".
TEMPLATES: dict[str, tuple[str, str]] = {
    "cpu_demo": (
        "Runs on a CPU in minutes, nothing to download: trains a BranchGRPO LoRA on the pack's embedded 16x16 demo "
        "model for a colourfulness reward and shows the same prompt before and after.", "cpu"),
    "flux_branchgrpo_hps": (
        "Needs a GPU (48-80 GB at 720 px): trains a BranchGRPO LoRA on FLUX.1-dev against HPS v2.1 with the paper's "
        "tree (20 steps, forks at 0, 3, 6, 9), then samples with it.", "gpu"),
    "sd35_branchgrpo_pickscore": (
        "Needs a GPU (about 24 GB at 512 px): trains a BranchGRPO LoRA on SD3.5 Medium against PickScore with "
        "Flow-GRPO's SDE and real CFG, then samples with it.", "gpu"),
    "wan21_t2v_branchgrpo": (
        "Needs a GPU (memory grows with the clip's size and length): trains a BranchGRPO LoRA on Wan 2.1 1.3B "
        "text-to-video, each clip scored frame by frame with HPS v2.1.", "gpu"),
    "eval_before_after": (
        "Needs the GPU the model needs: the base model and a trained LoRA through the stock loaders, the same "
        "prompt and seed sampled before and after, both scored with the training reward.", "gpu"),
}


def apply(workflow: dict, stem: str) -> dict:
    """Add ``description`` and ``runs_on`` to ``workflow["extra"]["branchgrpo"]`` (which holds the title)."""
    description, runs_on = TEMPLATES[stem]
    info = workflow.setdefault("extra", {}).setdefault("branchgrpo", {})
    info.update(description=description, runs_on=runs_on)
    return workflow
