"""The GPU check's kit (scripts/gpu_kit.sh) and the check's CPU form through it (scripts/gpu_check.sh --kit).

The lent GPU machine has Python 3.12 and torch 2.11, no network and no ComfyUI; the working tree that travels there
is at most 64 MiB. These tests hold the kit to that: its size, its wheels' tags, that it covers every requirement of
ComfyUI 0.33.0 that the machine's image lacks, and that the whole check runs through it on a Python 3.12 + torch
2.11.0 venv like the machine's (``.venv-kit312/``, built by scripts/setup_dev.sh), with ComfyUI unpacked from the
kit, its server started the way the GPU run starts it (there without ``--cpu``).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / ".gpu-kit"
KIT_VENV = ROOT / ".venv-kit312" / "bin" / "python"
CORE_SRC = Path(os.environ.get("BRANCHGRPO_CORE2_SRC", ROOT.parent / "shared" / "comfyui" / "0.33.0"))
MIB = 2 ** 20

pytestmark = pytest.mark.skipif(not (CORE_SRC / "main.py").is_file(),
                                reason=f"no ComfyUI 0.33.0 tree at {CORE_SRC}: no kit to build")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line:
            out.append(norm(re.split(r"[<>=!~;\[ ]", line)[0]))
    return out


def manifest() -> dict:
    assert (KIT / "manifest.json").is_file(), "no .gpu-kit/: run scripts/setup_dev.sh (or scripts/gpu_kit.sh)"
    return json.loads((KIT / "manifest.json").read_text())


def travelling_bytes() -> int:
    """Bytes of the working tree that travels to the device: tracked and untracked-not-ignored files."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())


def test_the_kit_fits_and_covers_what_the_device_lacks():
    m = manifest()
    total = sum(p.stat().st_size for p in KIT.iterdir() if p.is_file())
    assert total <= 60 * MIB, f"the kit is {total / MIB:.1f} MiB, over 60 MiB"
    assert total + travelling_bytes() <= 64 * MIB, "the kit and the working tree are over the 64 MiB that travel"
    # every wheel installs on CPython 3.12, Linux x86-64
    from packaging import tags
    from packaging.utils import parse_wheel_filename
    platforms = [f"manylinux_2_{v}_x86_64" for v in range(28, 4, -1)] + ["manylinux2014_x86_64",
                                                                       "manylinux2010_x86_64", "linux_x86_64"]
    cp312 = set(tags.cpython_tags((3, 12), abis=["cp312", "abi3", "none"], platforms=platforms)) \
        | set(tags.compatible_tags((3, 12), "cp312", platforms))
    for w in m["wheels"]:
        assert parse_wheel_filename(w["file"])[3] & cp312, f"{w['file']} does not install on CPython 3.12 / x86-64"
    with tarfile.open(KIT / "wheels.tar.xz") as t:
        inside = {Path(n).name for n in t.getnames() if n.endswith(".whl")}
    assert inside == {w["file"] for w in m["wheels"]}
    # ComfyUI 0.33.0's requirements and the pack's own: each is on the device, in the kit, or left out with a reason
    kit = {norm(w["requirement"].split("==")[0]) for w in m["wheels"]}
    device = set(requirement_names((ROOT / "scripts" / "device_image.txt").read_text()))
    left_out = {norm(n.strip()) for key in m["left_out"] for n in key.split(",")}
    needed = requirement_names((CORE_SRC / "requirements.txt").read_text()) + ["pydantic", "tomli-w"]
    uncovered = [n for n in needed if n not in kit | device | left_out]
    assert not uncovered, f"ComfyUI 0.33.0 needs {uncovered}, which neither the device image nor the kit holds"
    # the ComfyUI tree is 0.33.0's, without its tests
    with tarfile.open(KIT / m["comfyui"]["archive"]) as t:
        names = t.getnames()
    assert f"comfyui-{m['comfyui']['version']}/main.py" in names
    assert not any("/tests-unit/" in n or n.endswith("/.git") for n in names)


@pytest.mark.skipif(not KIT_VENV.is_file(), reason="no .venv-kit312/ (no python3.12 on this machine for "
                                                   "scripts/setup_dev.sh to build it from)")
def test_the_gpu_check_runs_through_the_kit_on_the_devices_python_and_torch(tmp_path):
    """scripts/gpu_check.sh --kit --device cpu with Python 3.12 and torch 2.11.0: the kit unpacks and installs with
    pip --no-index, ComfyUI 0.33.0 starts from it, and every step of the check passes, in about 90 s."""
    import procs
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(KIT_VENV), BRANCHGRPO_KIT_RUN=str(tmp_path / "run"))
    for k in ("BRANCHGRPO_COMFYUI_DIR", "BRANCHGRPO_COMFY_PYTHON", "PYTHONPATH", "VIRTUAL_ENV"):
        env.pop(k, None)
    proc = procs.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--kit", "--device", "cpu", "--out", str(out)],
                     cwd=ROOT, env=env, timeout=420)
    log = proc.stdout[-4000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    steps = json.loads((out / "steps.json").read_text())
    assert set(steps) == {"environment", "demo", "adapters", "continued", "budget", "fp8", "ratios"}, log
    assert all(s["exit_code"] == 0 for s in steps.values()), (steps, log)
    env_ = json.loads((out / "environment.json").read_text())
    assert env_["python"].startswith("3.12.") and env_["torch"]["version"].startswith("2.11.0"), env_
    assert not env_["missing"], env_["missing"]
    # ComfyUI's own packages came from the kit, not from the venv
    assert str(tmp_path / "run" / "site") in env_["modules"]["av"]["file"]
    adapters = json.loads((out / "adapters.json").read_text())
    assert adapters["up_tensors"] > 0 and adapters["up_tensors_moved"] == adapters["up_tensors"], adapters
    budget = json.loads((out / "budget.json").read_text())
    assert budget["refused"] and budget["iterations_run"] == 0 and "memory_budget_gb" in budget["message"], budget
    cont = json.loads((out / "continued_summary.json").read_text())
    text = " ".join(t for v in cont["texts"].values() for t in v["text"])
    assert "continued from branchgrpo/cpu_demo.safetensors at 2" in text, text
    for name in ("fp8.json", "ratios.json"):
        runs = json.loads((out / name).read_text())["runs"]
        assert runs and all(r["model_evaluations"] > 0 for r in runs), name
    assert json.loads((out / "fp8.json").read_text())["runs"][0]["weight_dtype"] == "fp8"
    presets = json.loads((out / "ratios.json").read_text())["ratios"]["presets"]
    assert set(presets) == {"dancegrpo", "branchgrpo", "branchgrpo-deppru", "branchgrpo-mix"}
    assert "ComfyUI is up" in proc.stdout and (out / "summary.txt").is_file()
