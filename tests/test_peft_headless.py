"""The headless path's adapters (``peft``: LoRA, DoRA, LoHa, LoKr, OFT) and their ComfyUI files.

* LoRA through peft reproduces the engine's earlier hook adapter (same initial draw from the seed, same
  outputs and gradients), and leaves the global RNG alone;
* per algorithm, the converted keys that ComfyUI 0.3.75's ``comfy.weight_adapter`` computes its weight from
  equal the weight the peft layer acts with (every key consumed by ``comfy.lora.load_lora``);
* tiny diffusers FLUX (all algorithms) and Wan 2.1 (LoRA, LoHa, DoRA), the base weights copied into
  ComfyUI's own model: the stock loader path patches every weight to the adapted diffusers weight, and
  ComfyUI's FLUX then predicts what the adapted diffusers FLUX predicts;
* ``python -m branchgrpo train`` with LoHa and DoRA: the written file loads in ComfyUI with every key
  consumed and reproduces the trained adapter (rebuilt from the run's checkpoint);
* exact resume per algorithm on the engine's toy model; bad ``lora.algorithm`` values are config errors.

Tiny random-weight models, CPU. The ComfyUI parts need scripts/setup_dev.sh (skipped without .comfyui/).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import tiny_diffusers as td
from branchgrpo import BranchGRPOTrainer, BranchSchedule, OptimConfig, PruningConfig, TrainerConfig
from branchgrpo.config_file import ConfigError, dump_toml, parse_config
from branchgrpo.lora import LoRAConfig
from branchgrpo.models import diffusers_adapter as da
from branchgrpo.peft_adapter import ALGORITHMS, PeftAdapter, effective_weight
from tiny_flow import MeanBrightness, TinyFlow, decode_to_image

ROOT = Path(__file__).resolve().parents[1]
from bench import sandbox  # noqa: E402
from bench.sandbox import COMFY_DIR  # noqa: E402
needs_comfy = pytest.mark.skipif(not (COMFY_DIR / "comfy" / "lora.py").is_file(),
                                 reason=".comfyui/ is missing: run scripts/setup_dev.sh")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def comfy():
    sandbox.import_comfy()
    import comfy.lora
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.utils
    return comfy


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny_diffusers")
    return {f: td.write_tiny_pipeline(f, base / f) for f in ("flux", "sd3", "wan")}


def randomize(adapter: PeftAdapter, seed: int = 1, std: float = 0.05) -> None:
    """Every adapter tensor non-trivial (a fresh adapter is the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


# ------------------------------------------------------------------------------ LoRA = the hook adapter
class _ReferenceHooks:
    """The engine's earlier LoRA, re-stated: ``down`` kaiming-uniform from ``manual_seed(seed)`` for the
    selected modules in name order, ``up`` zero, ``output += (alpha / rank) * up(down(x))`` by forward hooks."""

    def __init__(self, model: nn.Module, names: list[str], rank: int, alpha: float, seed: int):
        self.scale = alpha / rank
        mods = dict(model.named_modules())
        self.down, self.up = {}, {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for n in names:
                d = torch.empty(rank, mods[n].in_features)
                nn.init.kaiming_uniform_(d, a=math.sqrt(5))
                self.down[n] = d.requires_grad_()
                self.up[n] = torch.zeros(mods[n].out_features, rank, requires_grad=True)
        for n in names:
            mods[n].register_forward_hook(self._hook(n))

    def _hook(self, n):
        def hook(module, args, output):
            h = nn.functional.linear(args[0], self.down[n]) * self.scale
            return output + nn.functional.linear(h, self.up[n])
        return hook


def test_lora_reproduces_the_hook_adapter_and_keeps_the_global_rng():
    ref_model, model = TinyFlow(seed=0), TinyFlow(seed=0)
    for m in (ref_model, model):
        m.requires_grad_(False)
    cfg = LoRAConfig(rank=4, alpha=4.0, targets=("blocks.*",))
    state = torch.get_rng_state()
    adapter = PeftAdapter(model, cfg, seed=3)
    assert torch.equal(state, torch.get_rng_state())
    ref = _ReferenceHooks(ref_model, adapter.names, 4, 4.0, seed=3)
    assert adapter.names == sorted(adapter.names) and len(adapter.names) == 12
    for n in adapter.names:  # the same initial draw
        assert torch.equal(adapter.layers[n].lora_A["default"].weight, ref.down[n])
        assert not adapter.layers[n].lora_B["default"].weight.any()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in adapter.names:
            up = torch.randn(ref.up[n].shape, generator=g) * 0.1
            ref.up[n].copy_(up)
            adapter.layers[n].lora_B["default"].weight.copy_(up)
    x, s, c = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 1, 2])
    y_ref, y = ref_model(x, s, c), model(x, s, c)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    y_ref.square().sum().backward()
    y.square().sum().backward()
    for n in adapter.names:
        torch.testing.assert_close(adapter.layers[n].lora_A["default"].weight.grad, ref.down[n].grad)
        torch.testing.assert_close(adapter.layers[n].lora_B["default"].weight.grad, ref.up[n].grad)
    assert all(p.grad is None for k, p in model.named_parameters() if ".default." not in k)
    with adapter.disabled():  # the base model, and nothing is trainable meanwhile
        torch.testing.assert_close(model(x, s, c), TinyFlow(seed=0)(x, s, c))
    assert all(p.requires_grad for p in adapter.parameters())


# ------------------------------------------------------------------------------ conversions
CASES = [("LoRA", 4), ("DoRA", 4), ("LoHa", 3), ("LoKr", 2), ("LoKr", 8), ("OFT", 8)]


def _two_layers() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32))


def _comfy_weight(comfy, sd: dict, base_key: str, weight: torch.Tensor, caplog) -> torch.Tensor:
    """ComfyUI's stock computation: ``load_lora`` (every key consumed) then ``calculate_weight``."""
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(sd, {base_key: "w"})
    assert not [r for r in caplog.records if "not loaded" in r.getMessage()], caplog.text
    assert list(patches) == ["w"]
    return comfy.lora.calculate_weight([(1.0, patches["w"], 1.0, None, None)], weight.clone(), "w")


@needs_comfy
@pytest.mark.parametrize("algorithm,rank", CASES, ids=[f"{a}-{r}" for a, r in CASES])
def test_converted_keys_give_the_peft_weight_in_comfyui(comfy, caplog, algorithm, rank):
    model = _two_layers()
    bases = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    adapter = PeftAdapter(model, LoRAConfig(rank=rank, alpha=rank * 1.5), algorithm, seed=0)
    randomize(adapter)
    sd = adapter.comfy_state_dict()
    suffixes = {k.split(".", 2)[2] for k in sd}
    expected = {"LoRA": {"lora_up.weight", "lora_down.weight", "alpha"},
                "DoRA": {"lora_up.weight", "lora_down.weight", "alpha", "dora_scale"},
                "LoHa": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
                "OFT": {"diff"}}.get(algorithm)
    if algorithm == "LoKr":  # rank 2: lokr_w2 decomposed (ComfyUI scales alpha / rank); rank 8: both full
        expected = {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"} if rank == 2 else {"lokr_w1", "lokr_w2"}
    assert suffixes == expected
    x = torch.randn(5, 32)
    for name, w in bases.items():
        trained = effective_weight(adapter.layers[name])
        assert (trained - w).abs().max() > 1e-3  # the adapter does something
        got = _comfy_weight(comfy, {k: v for k, v in sd.items() if k.startswith(f"diffusion_model.{name}.")},
                            f"diffusion_model.{name}", w, caplog)
        torch.testing.assert_close(got, trained, rtol=1e-5, atol=1e-6)
    # and the effective weight is what the peft model computes
    h = nn.functional.gelu(nn.functional.linear(x, effective_weight(adapter.layers["0"]), model[0].base_layer.bias))
    y = nn.functional.linear(h, effective_weight(adapter.layers["2"]), model[2].base_layer.bias)
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


def test_bad_algorithm_and_oft_block_size():
    with pytest.raises(ValueError, match="unknown adapter algorithm 'LoCon'"):
        PeftAdapter(_two_layers(), LoRAConfig(rank=4), "LoCon")
    with pytest.raises(ValueError, match="blocks of rank = 5"):
        PeftAdapter(_two_layers(), LoRAConfig(rank=5), "OFT")


# ------------------------------------------------------------------------------ ComfyUI's FLUX and Wan
TINY_COMFY_FLUX = {"image_model": "flux", "in_channels": 4, "out_channels": 4, "patch_size": 2, "vec_in_dim": 32,
                   "context_in_dim": 32, "hidden_size": 32, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
                   "depth_single_blocks": 1, "axes_dim": [4, 6, 6], "theta": 10000, "qkv_bias": True,
                   "guidance_embed": True}


def _comfy_model(comfy, unet_config: dict):
    mc = comfy.model_detection.model_config_from_unet_config(dict(unet_config))
    mc.set_inference_dtype(torch.float32, None)
    with torch.inference_mode(False):
        return mc.get_model({})


def _flux_weights_into_comfy(comfy, tr: nn.Module, model) -> None:
    """Copy diffusers FLUX weights into ComfyUI's FLUX through ComfyUI's own diffusers table."""
    table = comfy.utils.flux_to_diffusers(TINY_COMFY_FLUX, output_prefix="diffusion_model.")
    csd = model.state_dict()
    filled = set()
    with torch.no_grad():
        for k, v in tr.state_dict().items():
            t = table[k]
            if isinstance(t, str):
                csd[t].copy_(v)
                filled.add(t)
            elif t[1] is None:
                csd[t[0]].copy_(t[2](v))
                filled.add(t[0])
            else:
                dim, off, size = t[1]
                csd[t[0]].narrow(dim, off, size).copy_(v)
                filled.add(t[0])
    assert filled == {k for k in csd if k.startswith("diffusion_model.")}


def _patch_in_comfy(comfy, model, sd: dict, caplog) -> dict[str, torch.Tensor]:
    """The stock loader path (key map, load_lora, ModelPatcher); every key consumed. Returns the patched
    weights."""
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(sd, key_map)
    assert not [r for r in caplog.records if "not loaded" in r.getMessage()], caplog.text
    bases = {k.rsplit(".lora_", 1)[0] if ".lora_" in k else k.rsplit(".", 1)[0] for k in sd}
    assert len(patches) == len(bases)
    mp = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    assert len(mp.add_patches(patches, 1.0)) == len(patches)
    with torch.inference_mode(False):
        mp.patch_model()
    return {k: v.detach().float() for k, v in model.state_dict().items()}


def _expected_flux(comfy, adapter: PeftAdapter, before: dict, table: dict | None = None) -> dict[str, torch.Tensor]:
    """ComfyUI's weights with each adapted diffusers module's trained weight put where ComfyUI's table says."""
    table = table or comfy.utils.flux_to_diffusers(TINY_COMFY_FLUX, output_prefix="diffusion_model.")
    out = {k: v.clone() for k, v in before.items()}
    for n in adapter.names:
        t, w = table[n + ".weight"], effective_weight(adapter.layers[n])
        if isinstance(t, str):
            out[t] = w
        elif t[1] is None:
            out[t[0]] = t[2](w)
        else:
            dim, off, size = t[1]
            out[t[0]].narrow(dim, off, size).copy_(w)
    return out


def _flux_predictions(comfy, tr, model) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 32, generator=g)
    y = torch.randn(2, 32, generator=g)
    sigma, guidance = torch.tensor([0.3, 0.8]), torch.full((2,), 3.5)
    with torch.no_grad():
        ours = da._unpack(tr(hidden_states=da._pack(x), encoder_hidden_states=ctx, pooled_projections=y,
                             timestep=sigma, img_ids=da._image_ids(4, 4, x.device, x.dtype),
                             txt_ids=torch.zeros(6, 3), guidance=guidance, return_dict=False)[0], 4, 8, 8)
        theirs = model.diffusion_model(x, sigma, ctx, y=y, guidance=guidance)
    return ours, theirs


def _diffusers_transformer(family: str, folder: Path):
    import diffusers
    return getattr(diffusers, da.TRANSFORMERS[family]).from_pretrained(str(folder), subfolder="transformer",
                                                                        local_files_only=True).eval()


@needs_comfy
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_flux_file_reproduces_the_adapted_model_in_comfyui(comfy, tiny, caplog, algorithm):
    """Every Linear of tiny FLUX adapted: q/k/v fused into qkv / linear1, norm_out's halves swapped."""
    tr = _diffusers_transformer("flux", tiny["flux"])
    model = _comfy_model(comfy, TINY_COMFY_FLUX)
    _flux_weights_into_comfy(comfy, tr, model)
    ours, theirs = _flux_predictions(comfy, tr, model)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)  # the same model on both sides
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    layout = da.comfy_layout(tr, "flux")
    adapter = PeftAdapter(tr, LoRAConfig(rank=4 if algorithm != "OFT" else 8, alpha=3.0, targets=("*",)),
                          algorithm, seed=0, layout=layout)
    randomize(adapter, std=0.05 if algorithm != "OFT" else 0.2)
    sd = adapter.comfy_state_dict()
    assert all(k.startswith("diffusion_model.") for k in sd)
    after = _patch_in_comfy(comfy, model, sd, caplog)
    expected = _expected_flux(comfy, adapter, before)
    changed = 0
    for k, v in expected.items():
        torch.testing.assert_close(after[k], v, rtol=1e-5, atol=1e-5, msg=lambda m: f"{k}: {m}")
        changed += not torch.equal(v, before[k])
    assert changed >= 20
    ours2, theirs2 = _flux_predictions(comfy, tr, model)
    assert (ours2 - ours).abs().max() > 1e-3  # the adapter changes the prediction ...
    torch.testing.assert_close(theirs2, ours2, rtol=1e-4, atol=1e-5)  # ... and ComfyUI's model follows


@needs_comfy
@pytest.mark.parametrize("algorithm", ["DoRA", "LoKr"])
def test_sd3_file_reproduces_the_adapted_weights_in_comfyui(comfy, tiny, caplog, algorithm):
    """SD3 (ComfyUI loads the diffusers transformer itself): fused qkv, the context block's swapped rows."""
    import comfy.sd
    tr = _diffusers_transformer("sd3", tiny["sd3"])
    mp = comfy.sd.load_diffusion_model_state_dict({k: v.clone() for k, v in tr.state_dict().items()})
    model = mp.model
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    adapter = PeftAdapter(tr, LoRAConfig(rank=2, alpha=3.0, targets=("*",)), algorithm, seed=0,
                          layout=da.comfy_layout(tr, "sd3"))
    randomize(adapter)
    after = _patch_in_comfy(comfy, model, adapter.comfy_state_dict(), caplog)
    table = comfy.utils.mmdit_to_diffusers(model.model_config.unet_config, output_prefix="diffusion_model.")
    expected = _expected_flux(comfy, adapter, before, table)
    assert sum(not torch.equal(v, before[k]) for k, v in expected.items()) >= 10
    for k, v in expected.items():
        torch.testing.assert_close(after[k], v, rtol=1e-5, atol=1e-5, msg=lambda m: f"{k}: {m}")


TINY_COMFY_WAN = {"image_model": "wan2.1", "model_type": "t2v", "dim": 32, "out_dim": 4, "num_heads": 2,
                  "ffn_dim": 64, "num_layers": 2, "patch_size": (1, 2, 2), "freq_dim": 32, "text_dim": 32,
                  "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6, "in_dim": 4}


@needs_comfy
@pytest.mark.parametrize("algorithm", ["LoRA", "LoHa", "DoRA"])
def test_wan_file_reproduces_the_adapted_model_in_comfyui(comfy, tiny, tmp_path, caplog, algorithm):
    """Wan 2.1: ComfyUI maps no diffusers name, so the file is written under ComfyUI's names (a
    ComfyUI-layout transformer file loaded by diffusers gives both sides the same weights)."""
    from safetensors.torch import save_file
    model = _comfy_model(comfy, TINY_COMFY_WAN)
    g = torch.Generator().manual_seed(5)
    comfy_sd = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in model.diffusion_model.state_dict().items()}
    model.diffusion_model.load_state_dict(comfy_sd)
    save_file(comfy_sd, str(tmp_path / "wan.safetensors"))
    tr = da.load_pipeline("wan", str(tiny["wan"]), transformer_file=str(tmp_path / "wan.safetensors")).transformer
    layout = da.comfy_layout(tr, "wan")
    adapter = PeftAdapter(tr, LoRAConfig(rank=2, alpha=3.0, targets=("*",)), algorithm, seed=0, layout=layout)
    randomize(adapter)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    after = _patch_in_comfy(comfy, model, adapter.comfy_state_dict(), caplog)
    expected = dict(before)
    for n in adapter.names:
        expected[f"diffusion_model.{layout[0][n][0]}.weight"] = effective_weight(adapter.layers[n])
    for k, v in expected.items():
        torch.testing.assert_close(after[k], v, rtol=1e-5, atol=1e-5, msg=lambda m: f"{k}: {m}")


# ------------------------------------------------------------------------------ the command line
def _flux_run(tiny, out: Path, name: str, algorithm: str, rank: int = 2) -> dict:
    return {
        "run": {"name": name, "output_dir": str(out), "progress": False},
        "model": {"path": str(tiny["flux"]), "width": 16, "height": 16, "max_sequence_length": 16},
        "lora": {"algorithm": algorithm, "rank": rank, "alpha": 2.0, "targets": ["*"]},
        "prompts": {"train": ["a red cube", "a blue ball"]},
        "rewards": [{"name": "brightness", "args": {"target": 0.8}}],
        "training": {"iterations": 1, "prompts_per_iteration": 2, "seed": 11, "max_batch": 8},
        "schedule": {"num_steps": 3, "split_steps": [0], "branching": 2},
        "optim": {"learning_rate": 0.05, "max_train_batch": 4},
    }


@needs_comfy
@pytest.mark.parametrize("algorithm", ["LoHa", "DoRA"])
def test_headless_run_file_loads_in_comfyui(comfy, tiny, tmp_path, caplog, algorithm):
    from branchgrpo import cli
    path = tmp_path / "run.toml"
    path.write_text(dump_toml(_flux_run(tiny, tmp_path, "run", algorithm), docs=False))
    assert cli.main(["train", str(path), "-q"]) == 0
    sd = load_file(str(tmp_path / "run" / "run.safetensors"))
    assert any(k.endswith(".hada_w1_a" if algorithm == "LoHa" else ".dora_scale") for k in sd)
    # the trained adapter, rebuilt from the run's checkpoint on a fresh transformer
    tr = _diffusers_transformer("flux", tiny["flux"])
    model = _comfy_model(comfy, TINY_COMFY_FLUX)
    _flux_weights_into_comfy(comfy, tr, model)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    adapter = PeftAdapter(tr, LoRAConfig(rank=2, alpha=2.0, targets=("*",)), algorithm, seed=11,
                          layout=da.comfy_layout(tr, "flux"))
    adapter.load_state_dict(torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["adapter"])
    after = _patch_in_comfy(comfy, model, sd, caplog)
    expected = _expected_flux(comfy, adapter, before)
    assert any(not torch.equal(v, before[k]) for k, v in expected.items())  # it trained
    for k, v in expected.items():
        torch.testing.assert_close(after[k], v, rtol=1e-5, atol=1e-5, msg=lambda m: f"{k}: {m}")


def test_config_names_lora_algorithm(tiny, tmp_path):
    data = _flux_run(tiny, tmp_path, "bad", "LyCORIS")
    with pytest.raises(ConfigError, match=r"lora\.algorithm.*LoRA, LoHa, LoKr, OFT, DoRA"):
        parse_config(data, base_dir=tmp_path)
    data["lora"]["algorithm"] = "lora"  # spelled as ComfyUI spells it, case included
    with pytest.raises(ConfigError, match=r"lora\.algorithm"):
        parse_config(data, base_dir=tmp_path)
    assert parse_config(_flux_run(tiny, tmp_path, "ok", "DoRA"), base_dir=tmp_path).lora.algorithm == "DoRA"


def test_oft_block_size_is_a_config_error(tiny, tmp_path, capsys):
    from branchgrpo import cli
    path = tmp_path / "oft.toml"
    path.write_text(dump_toml(_flux_run(tiny, tmp_path, "oft", "OFT", rank=5), docs=False))
    assert cli.main(["train", str(path), "-q"]) == 2
    assert "lora.rank" in capsys.readouterr().err
    assert not (tmp_path / "oft").exists()


# ------------------------------------------------------------------------------ exact resume
def _trainer(algorithm: str, iterations: int):
    model = TinyFlow(seed=0)
    model.requires_grad_(False)
    adapter = PeftAdapter(model, LoRAConfig(rank=4 if algorithm != "OFT" else 8, alpha=4.0,
                                            targets=("blocks.*",)), algorithm, seed=0)
    cfg = TrainerConfig(schedule=BranchSchedule(num_steps=4, split_steps=(0, 2)), iterations=iterations,
                        prompts_per_iteration=2, seed=11,
                        optim=OptimConfig(learning_rate=3e-2, edges_per_step=5, max_train_batch=4),
                        pruning=PruningConfig())
    return BranchGRPOTrainer(model, adapter, ["a cat", "a dog", "a bird"], [MeanBrightness()], decode_to_image,
                             cfg, (4, 4, 4)), adapter


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_resume_is_exact_for_every_algorithm(tmp_path, algorithm):
    full, a_full = _trainer(algorithm, 3)
    full.train()
    part, _ = _trainer(algorithm, 3)
    part.train(checkpoint_path=tmp_path / "ck.pt", until=2)
    resumed, a_res = _trainer(algorithm, 3)
    resumed.load_checkpoint(tmp_path / "ck.pt")
    resumed.train()
    sd_full, sd_res = a_full.state_dict(), a_res.state_dict()
    assert list(sd_full) == list(sd_res) and all(".default" in k for k in sd_full)  # adapter tensors only
    assert all(torch.equal(sd_full[k], sd_res[k]) for k in sd_full)
    fresh = _trainer(algorithm, 3)[1].state_dict()
    assert any(not torch.equal(fresh[k], sd_full[k]) for k in sd_full)  # it trained
    with pytest.raises(RuntimeError, match="does not fit"):
        a_res.load_state_dict({k: v[..., :1] for k, v in sd_full.items()})


def test_gradient_checkpointing_keeps_the_adapter_gradients(tiny):
    """diffusers' own block checkpointing (model.gradient_checkpointing) with peft layers inside the blocks."""
    grads = []
    for checkpointing in (False, True):
        tr = _diffusers_transformer("flux", tiny["flux"])
        tr.requires_grad_(False)
        adapter = PeftAdapter(tr, LoRAConfig(rank=2, alpha=2.0, targets=("*",)), "DoRA", seed=0)
        randomize(adapter)
        if checkpointing:
            tr.enable_gradient_checkpointing()
        g = torch.Generator().manual_seed(4)
        x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 32, generator=g)
        out = tr(hidden_states=da._pack(x), encoder_hidden_states=ctx, pooled_projections=torch.ones(2, 32),
                 timestep=torch.tensor([0.3, 0.8]), img_ids=da._image_ids(4, 4, x.device, x.dtype),
                 txt_ids=torch.zeros(6, 3), guidance=torch.full((2,), 3.5), return_dict=False)[0]
        out.square().sum().backward()
        grads.append({k: p.grad.clone() for k, p in adapter.named_parameters()})
    assert grads[0].keys() == grads[1].keys() and all(g.abs().sum() > 0 for g in grads[0].values())
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_dense_delta_equals_the_layer_and_stays_float32_on_a_bf16_base(algorithm):
    """``delta`` (what LoKr / OFT files hold for fused layers, and OFT's ``.diff``) is the layer's own update;
    on a bf16 base it is computed in float32 from the adapter, not from bf16 outputs."""
    model = _two_layers()
    adapter = PeftAdapter(model, LoRAConfig(rank=8, alpha=4.0), algorithm, seed=0)
    randomize(adapter, std=0.1)
    for n in adapter.names:
        base = model.get_submodule(n).base_layer.weight.detach()
        torch.testing.assert_close(adapter.delta(n), effective_weight(adapter.layers[n]) - base, rtol=1e-5, atol=1e-6)
    want = {n: adapter.delta(n) for n in adapter.names}
    model.to(torch.bfloat16)  # the base only: peft's adapter tensors are cast back below
    for p in adapter.parameters():
        p.data = p.data.float()
    for n in adapter.names:
        got = adapter.delta(n)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want[n], rtol=0.02, atol=0.02 * want[n].abs().max().item())
