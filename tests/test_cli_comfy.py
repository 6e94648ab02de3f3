"""The headless path against ComfyUI itself, in-process (ComfyUI 0.3.75 from .comfyui/, CPU):

* the LoRA exported from a diffusers-trained adapter (FLUX, SD3, Wan 2.1) is consumed key by key by
  ComfyUI's own LoRA loader (``comfy.lora.model_lora_keys_unet`` + ``load_lora``), and the weight update
  ComfyUI applies equals the adapter's update on the diffusers weights, mapped through ComfyUI's own
  diffusers tables (``comfy.utils.flux_to_diffusers`` / ``mmdit_to_diffusers``) or, for Wan, through
  diffusers' own single-file converter (the transformer is loaded from a ComfyUI-layout file);
* the Export Run Config node, fed by the pack's real settings/prompts/reward nodes, writes a config that
  ``python -m branchgrpo train`` runs headless, and the LoRA it writes loads in ComfyUI.

Tiny random-weight models; needs scripts/setup_dev.sh (skipped when .comfyui/ is missing).
"""
from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import procs
import tiny_diffusers as td
from branchgrpo.lora import LoRAConfig
from branchgrpo.models import diffusers_adapter as da
from branchgrpo.peft_adapter import PeftAdapter

ROOT = Path(__file__).resolve().parents[1]
from bench import sandbox  # noqa: E402
from bench.sandbox import COMFY_DIR  # noqa: E402
PY = sys.executable

pytestmark = pytest.mark.skipif(not (COMFY_DIR / "comfy" / "lora.py").is_file(),
                                reason=".comfyui/ is missing: run scripts/setup_dev.sh")


@pytest.fixture(scope="module")
def comfy():
    """ComfyUI's modules imported in this process (CPU)."""
    sandbox.import_comfy()
    import comfy.lora
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.sd
    import comfy.utils
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield comfy
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny_diffusers")
    return {f: td.write_tiny_pipeline(f, base / f) for f in ("flux", "sd3", "wan")}


def _transformer(family: str, folder: Path):
    import diffusers
    return getattr(diffusers, da.TRANSFORMERS[family]).from_pretrained(str(folder), subfolder="transformer",
                                                                        local_files_only=True).eval()


def _random_lora(root, family, rank=2, alpha=3.0) -> PeftAdapter:
    """A LoRA on every Linear of a diffusers transformer, exported under ComfyUI's module names."""
    lora = PeftAdapter(root, LoRAConfig(rank=rank, alpha=alpha, targets=("*",)), seed=0,
                       layout=da.comfy_layout(root, family))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in lora.names:
            up = lora.layers[n].lora_B["default"].weight
            up.copy_(torch.randn(up.shape, generator=g))
    return lora


def _comfy_model(comfy, unet_config: dict):
    mc = comfy.model_detection.model_config_from_unet_config(dict(unet_config))
    assert mc is not None, f"ComfyUI does not know {unet_config}"
    mc.set_inference_dtype(torch.float32, None)
    with torch.inference_mode(False):
        model = mc.get_model({})
    return model


def _apply_lora_in_comfy(comfy, model, lora_sd: dict) -> dict[str, torch.Tensor]:
    """ComfyUI's stock path: key map -> load_lora -> ModelPatcher patches -> patched weights. Returns
    ``{weight key: patched - original}`` for every weight, and checks every file key was consumed."""
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    bases = {k.rsplit(".lora_", 1)[0] if ".lora_" in k else k.rsplit(".", 1)[0] for k in lora_sd}
    unmapped = sorted(b for b in bases if b not in key_map)
    assert not unmapped, f"ComfyUI maps no weight for {unmapped}"
    patches = comfy.lora.load_lora(lora_sd, key_map)
    assert len(patches) == len(bases)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    mp = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    assert len(mp.add_patches(patches, 1.0)) == len(patches)
    with torch.inference_mode(False):
        mp.patch_model()
    after = model.state_dict()
    return {k: after[k].float() - before[k].float() for k in before}


def _expected_from_table(table: dict, lora: PeftAdapter, shapes: dict) -> dict[str, torch.Tensor]:
    """The update of each ComfyUI weight implied by ComfyUI's diffusers->ComfyUI table."""
    out = {k: torch.zeros(s) for k, s in shapes.items()}
    for name in lora.names:
        target = table[name + ".weight"]
        delta = lora.delta(name).detach()
        if isinstance(target, str):
            out[target] += delta
        elif target[1] is None:  # (key, None, function): e.g. swap_scale_shift
            out[target[0]] += target[2](delta)
        else:
            dim, off, size = target[1]
            out[target[0]].narrow(dim, off, size).add_(delta)
    return out


def _compare(applied: dict, expected: dict) -> None:
    touched = 0
    for k, exp in expected.items():
        torch.testing.assert_close(applied[k], exp, atol=1e-5, rtol=1e-5, msg=lambda m: f"{k}: {m}")
        touched += bool(exp.abs().sum() > 0)
    assert touched > 0


TINY_COMFY_FLUX = {"image_model": "flux", "in_channels": 4, "out_channels": 4, "patch_size": 2, "vec_in_dim": 32,
                   "context_in_dim": 32, "hidden_size": 32, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
                   "depth_single_blocks": 1, "axes_dim": [4, 6, 6], "theta": 10000, "qkv_bias": True,
                   "guidance_embed": True}
TINY_COMFY_WAN = {"image_model": "wan2.1", "model_type": "t2v", "dim": 32, "out_dim": 4, "num_heads": 2,
                  "ffn_dim": 64, "num_layers": 2, "patch_size": (1, 2, 2), "freq_dim": 32, "text_dim": 32,
                  "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6, "in_dim": 4}


def test_flux_lora_keys_load_in_comfyui(comfy, tiny):
    """FLUX: every Linear adapted (q/k/v fused into ComfyUI's qkv and linear1, norm_out swapped)."""
    tr = _transformer("flux", tiny["flux"])
    lora = _random_lora(tr, "flux")
    sd = lora.comfy_state_dict()
    assert all(k.startswith("diffusion_model.") for k in sd)
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight" in sd
    assert sd["diffusion_model.single_blocks.0.linear1.lora_down.weight"].shape[0] == 4 * 2  # q, k, v, mlp
    model = _comfy_model(comfy, TINY_COMFY_FLUX)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.zero_()
    applied = _apply_lora_in_comfy(comfy, model, sd)
    table = comfy.utils.flux_to_diffusers(TINY_COMFY_FLUX, output_prefix="diffusion_model.")
    _compare(applied, _expected_from_table(table, lora, {k: v.shape for k, v in model.state_dict().items()}))


def test_sd3_lora_keys_load_in_comfyui(comfy, tiny):
    """SD3: the diffusers transformer is loaded by ComfyUI itself (diffusers-format detection)."""
    tr = _transformer("sd3", tiny["sd3"])
    mp = comfy.sd.load_diffusion_model_state_dict({k: v.clone() for k, v in tr.state_dict().items()})
    assert mp is not None and type(mp.model).__name__ == "SD3"
    lora = _random_lora(tr, "sd3")  # (peft wraps the adapted Linears in place)
    sd = lora.comfy_state_dict()
    applied = _apply_lora_in_comfy(comfy, mp.model, sd)
    table = comfy.utils.mmdit_to_diffusers(mp.model.model_config.unet_config, output_prefix="diffusion_model.")
    _compare(applied, _expected_from_table(table, lora, {k: v.shape for k, v in mp.model.state_dict().items()}))


def test_wan_single_file_and_lora_keys_load_in_comfyui(comfy, tiny, tmp_path):
    """Wan 2.1: a ComfyUI-layout transformer file loads through diffusers' from_single_file (the
    model.transformer_file path), its Linear weights sit where our table says, and the exported LoRA's
    update applied by ComfyUI equals the adapter's."""
    model = _comfy_model(comfy, TINY_COMFY_WAN)
    g = torch.Generator().manual_seed(5)
    comfy_sd = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in model.diffusion_model.state_dict().items()}
    model.diffusion_model.load_state_dict(comfy_sd)
    path = tmp_path / "tiny_wan_comfy.safetensors"
    save_file(comfy_sd, str(path))
    pipe = da.load_pipeline("wan", str(tiny["wan"]), transformer_file=str(path))
    tr = pipe.transformer
    layout, _ = da.comfy_layout(tr, "wan")
    linears = [n for n, m in tr.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(layout) == sorted(linears)
    for name in linears:  # diffusers' converter put ComfyUI's tensor exactly where our table says
        target, offset, swap = layout[name]
        assert offset == 0 and not swap
        assert torch.equal(tr.get_submodule(name).weight, comfy_sd[target + ".weight"]), name
    lora = _random_lora(tr, "wan")
    sd = lora.comfy_state_dict()
    applied = _apply_lora_in_comfy(comfy, model, sd)
    expected = {f"diffusion_model.{k}": torch.zeros(v.shape) for k, v in comfy_sd.items()}
    for name in lora.names:
        expected[f"diffusion_model.{layout[name][0]}.weight"] += lora.delta(name).detach()
    _compare(applied, expected)


# ----------------------------------------------------------------------------------- the export node
def _pack_nodes():
    """The pack imported as ComfyUI imports custom nodes (:func:`bench.sandbox.import_comfy`)."""
    nodes = sandbox.import_comfy()
    return (sandbox.pack_module("export_config"), sandbox.pack_module("settings"), sandbox.pack_module("rewards"),
            nodes)


def test_export_node_config_trains_headless(comfy, tiny, tmp_path):
    import folder_paths
    export, settings, rewards, nodes_pkg = _pack_nodes()
    assert export.ExportRunConfigNode in nodes_pkg.NODES
    schema = export.ExportRunConfigNode.define_schema()
    assert schema.node_id == "BranchGRPOExportRunConfig" and schema.description
    for item in list(schema.inputs) + list(schema.outputs):
        assert getattr(item, "tooltip", None), f"{item.id} has no tooltip"
    assert export.ExportRunConfigNode.GET_NODE_INFO_V1()["output_node"]  # what the server sends the frontend

    models = tmp_path / "models"
    (models / "diffusers").mkdir(parents=True)
    os.symlink(tiny["flux"], models / "diffusers" / "tiny_flux")
    out_dir, loras = tmp_path / "output", models / "loras"
    loras.mkdir()
    saved_output = folder_paths.get_output_directory()
    saved_paths = {k: list(folder_paths.folder_names_and_paths[k][0]) for k in ("diffusers", "loras")}
    folder_paths.add_model_folder_path("diffusers", str(models / "diffusers"), is_default=True)
    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
    folder_paths.set_output_directory(str(out_dir))
    try:
        # real upstream objects from the pack's own nodes
        prompts = settings.PromptsNode.execute("a red cube\na blue ball", "", 0).args[0]
        schedule = settings.BranchScheduleNode.execute(4, "0,1", "2", 4.0, "dancegrpo", 0.3, 3.0, 1, 0, 0).args[0]
        advantage = settings.TreeAdvantageNode.execute("tree", "mean", 1.0, False, 5.0).args[0]
        pruning = settings.PruningNode.execute("4", False, 30, 0, "off", 0.5, 1.0, True, 1.0).args[0]
        reward = rewards.WeightFreeRewardNode.execute("contrast").args[0]
        assert "tiny_flux" in export.diffusers_folders()
        res = export.ExportRunConfigNode.execute(
            name="node_run", diffusers_model="tiny_flux", prompts=prompts, reward=reward, schedule=schedule,
            advantage=advantage, pruning=pruning, width=16, height=16, iterations=2, prompts_per_iteration=2,
            learning_rate=1e-2, lora_rank=2, lora_alpha=2.0, seed=7, nproc_per_node=2)
    finally:
        folder_paths.set_output_directory(saved_output)
        for k, paths in saved_paths.items():
            folder_paths.folder_names_and_paths[k][0][:] = paths
    config_path, command = res.args[0], res.args[1]
    assert config_path == str(out_dir / "branchgrpo" / "node_run.toml")
    assert "torchrun --nproc_per_node 2 -m branchgrpo train" in " ".join(res.ui["text"])
    assert "python -m branchgrpo train" in command
    data = tomllib.loads(Path(config_path).read_text())
    assert data["model"]["path"] == str(models / "diffusers" / "tiny_flux")
    assert data["schedule"]["split_steps"] == [0, 1] and data["pruning"]["depths"] == [4]
    assert data["rewards"] == [{"name": "contrast", "weight": 1.0, "args": {"eps": 1e-08}}]
    assert data["prompts"]["train"] == ["a red cube", "a blue ball"]
    assert data["run"]["lora_file"] == str(loras / "branchgrpo" / "node_run.safetensors")

    # headless: exactly the command line the node shows (single process), in a fresh process
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = procs.run([PY, "-m", "branchgrpo", "train", config_path, "-q", "--set", "model.max_sequence_length=16"],
                     cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lora_file = loras / "branchgrpo" / "node_run.safetensors"
    assert lora_file.is_file() and (out_dir / "branchgrpo" / "node_run" / "checkpoint.pt").is_file()
    lora_sd = load_file(str(lora_file))
    model = _comfy_model(comfy, TINY_COMFY_FLUX)
    applied = _apply_lora_in_comfy(comfy, model, lora_sd)
    assert any(v.abs().sum() > 0 for v in applied.values())
