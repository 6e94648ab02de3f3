"""The Trainer's adapters are ComfyUI's own (``comfy.weight_adapter``: LoRA, LoHa, LoKr, OFT), in a real ComfyUI:

- each algorithm trains 2 iterations on tiny FLUX; the saved file through the stock ``LoraLoaderModelOnly``, and the
  Trainer's ``LORA_MODEL`` through ComfyUI's ``LoraModelLoader``, reproduce the trained MODEL's prediction with every
  key consumed; ComfyUI's own ``SaveLoRA`` writes the same tensors;
- continuing a file: the continued run starts at the file's weights (in-process: its prediction equals the stock
  loader's, for every algorithm, kohya names and a file without alpha; in the server: its first rollout equals the
  uninterrupted run's at that iteration) and counts on from the file's iterations; how 2 + 2 iterations compare with
  4 uninterrupted ones (AdamW restarts); a LoHa file continued with algorithm LoRA stays LoHa;
- ``train_bias_norm``: ``.diff`` / ``.diff_b`` on tiny Wan 2.1 (affine norms), consumed and reproduced;
- bad inputs (unknown file, another model's file, a rank the algorithm cannot use) fail before any compute.
"""
from __future__ import annotations

import importlib
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_models as tm
from bench import node_vs_engine as nve
from comfy_server import ComfyExecutionError, ComfyQueueError
from test_comfy_families import (_log_since, _log_size, family_nodes, lora_path, metrics_of, predict_nodes,
                                 read_latent, training_graph)

KEYS = {
    "LoRA": re.compile(r"^diffusion_model\..+\.(lora_up\.weight|lora_down\.weight|alpha)$"),
    "LoHa": re.compile(r"^diffusion_model\..+\.(hada_w1_a|hada_w1_b|hada_w2_a|hada_w2_b|alpha)$"),
    "LoKr": re.compile(r"^diffusion_model\..+\.(lokr_w1|lokr_w2|alpha)$"),
    "OFT": re.compile(r"^diffusion_model\..+\.(oft_blocks|alpha)$"),
}


@pytest.fixture(scope="module")
def models(comfy_base):
    paths = tm.write_all_tiny(comfy_base / "models")
    paths["clip_l"] = tm.write_random_clip_l(comfy_base / "models")
    return paths


def _graph(models, tag, *, family="flux", iterations=2, algorithm="LoRA", continue_lora=None, bias_norm=False,
           rank=4, extra=None):
    g = training_graph(models, family, f"ad_{tag}", f"branchgrpo/ad_{tag}", iterations=iterations, extra=extra)
    t = g["trainer"]["inputs"]
    t.update(algorithm=algorithm, lora_rank=rank, lora_alpha=float(rank))
    if continue_lora:
        t["continue_lora"] = continue_lora
    if bias_norm:
        g["trainer_settings"]["inputs"]["train_bias_norm"] = True
    return g


def _stock_graph(models, family, tag, file):
    g = family_nodes(models, family)
    g["lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["unet", 0], "lora_name": file,
                                                                 "strength_model": 1.0}}
    g.update(predict_nodes(tag, ["lora", 0]))
    return g


def _train_and_check(comfy, comfy_base, models, tag, *, family="flux", iterations=2, **kw):
    """Train; compare trained MODEL, LoraModelLoader(LORA_MODEL) and stock LoraLoaderModelOnly(file); return the file."""
    log0 = _log_size(comfy)
    extra = {**predict_nodes(f"{tag}_trained", ["trainer", 0]), **predict_nodes(f"{tag}_base", ["unet", 0]),
             "native": {"class_type": "LoraModelLoader", "inputs": {"model": ["unet", 0], "lora": ["trainer", 1],
                                                                    "strength_model": 1.0}},
             **predict_nodes(f"{tag}_native", ["native", 0]),
             "native_save": {"class_type": "SaveLoRA", "inputs": {"lora": ["trainer", 1],
                                                                  "prefix": f"native_lora/{tag}"}}}
    if "bypass" in (comfy.object_info()["LoraModelLoader"]["input"].get("required") or {}):  # ComfyUI 0.2x on
        extra["native"]["inputs"]["bypass"] = False
    entry = comfy.run(_graph(models, tag, family=family, iterations=iterations, extra=extra, **kw), timeout=600)
    assert entry["status"]["status_str"] == "success"
    log1 = _log_size(comfy)
    assert comfy.run(_stock_graph(models, family, f"{tag}_stock", f"branchgrpo/ad_{tag}.safetensors"),
                     timeout=300)["status"]["status_str"] == "success"
    log = _log_since(comfy, log0)
    assert "lora key not loaded" not in log and "Traceback" not in log, "a key was not consumed by ComfyUI"
    assert log1 > log0
    trained, native, stock, base = (read_latent(comfy_base, f"{tag}_{t}") for t in ("trained", "native", "stock",
                                                                                     "base"))
    d_base, d_stock, d_native = (float((trained - x).abs().max()) for x in (base, stock, native))
    print(f"[{tag}] max |trained - base| {d_base:.3e}, |trained - stock file| {d_stock:.1e}, "
          f"|trained - LoraModelLoader| {d_native:.1e}")
    assert d_base > 1e-3  # it trained
    assert d_stock < 1e-5
    assert d_native < 1e-5
    sd = load_file(str(lora_path(comfy_base, f"ad_{tag}")))
    native_files = sorted((comfy_base / "output" / "native_lora").glob(f"{tag}_*.safetensors"))
    assert native_files, "ComfyUI's SaveLoRA wrote no file"
    native_sd = load_file(str(native_files[-1]))
    assert set(native_sd) == set(sd) and all(torch.equal(native_sd[k], sd[k]) for k in sd)
    return sd, entry


# ---------------------------------------------------------------------------------------------------- algorithms
@pytest.mark.parametrize("algorithm", ["LoRA", "LoHa", "LoKr", "OFT"])
def test_algorithm_trains_and_every_stock_loader_reproduces_it(comfy, comfy_base, models, algorithm):
    sd, _ = _train_and_check(comfy, comfy_base, models, algorithm, algorithm=algorithm)
    assert sd and all(KEYS[algorithm].match(k) for k in sd), sorted(sd)[:6]
    assert not any(k.endswith((".diff", ".diff_b")) for k in sd)  # train_bias_norm is off by default
    trained = [v for k, v in sd.items() if not k.endswith(".alpha")]
    assert any(float(v.abs().max()) > 0 for v in trained)
    meta_lora = metrics_of(comfy, f"ad_{algorithm}")
    assert [m["iteration"] for m in meta_lora] == [1, 2]


# ---------------------------------------------------------------------------------------------------- bias / norm
def test_train_bias_norm_adds_diff_and_diff_b_that_the_stock_loader_applies(comfy, comfy_base, models):
    sd, _ = _train_and_check(comfy, comfy_base, models, "wan_bias", family="wan21", iterations=1, bias_norm=True)
    diffs = [k for k in sd if k.endswith(".diff")]
    biases = [k for k in sd if k.endswith(".diff_b")]
    assert any(".norm3." in k for k in diffs) and any("norm_q" in k for k in diffs), diffs
    assert any(".self_attn.q.diff_b" in k for k in biases), biases[:5]
    assert any(float(sd[k].abs().max()) > 0 for k in diffs) and any(float(sd[k].abs().max()) > 0 for k in biases)


# ---------------------------------------------------------------------------------------------------- continuing
def test_continue_goes_on_from_the_files_weights_and_iterations(comfy, comfy_base, models, capsys):
    four = comfy.run(_graph(models, "uninterrupted", iterations=4), timeout=600)
    assert four["status"]["status_str"] == "success"
    if not lora_path(comfy_base, "ad_LoRA").is_file():  # the 2-iteration LoRA of the algorithm test (same settings)
        comfy.run(_graph(models, "LoRA", iterations=2), timeout=600)
    log0 = _log_size(comfy)
    comfy.run(_graph(models, "then2", iterations=4, continue_lora="branchgrpo/ad_LoRA.safetensors"), timeout=600)
    assert "lora key not loaded" not in _log_since(comfy, log0)
    straight = {m["iteration"]: m["metrics"] for m in metrics_of(comfy, "ad_uninterrupted")}
    cont = {m["iteration"]: m["metrics"] for m in metrics_of(comfy, "ad_then2")}
    assert sorted(cont) == [3, 4]  # counts on from the file's branchgrpo.iterations
    # iteration 3's rollout (before its update) runs the file's weights with iteration 3's seeds: the same tree and
    # rewards as the uninterrupted run's, whose weights after 2 iterations are the file's
    assert cont[3]["reward_mean"] == pytest.approx(straight[3]["reward_mean"], rel=1e-6, abs=1e-7)
    a, b, f = (load_file(str(lora_path(comfy_base, f"ad_{t}"))) for t in ("then2", "uninterrupted", "LoRA"))
    assert set(a) == set(b) == set(f)
    keys = [k for k in a if not k.endswith(".alpha")]
    d_cont = torch.cat([(a[k] - f[k]).flatten() for k in keys])  # iterations 3-4, continued (fresh AdamW)
    d_straight = torch.cat([(b[k] - f[k]).flatten() for k in keys])  # iterations 3-4, uninterrupted
    cos = float(torch.nn.functional.cosine_similarity(d_cont, d_straight, dim=0))
    gap = float((d_cont - d_straight).norm() / d_straight.norm())
    with capsys.disabled():
        print(f"\n2+2 vs 4 iterations: the last two updates' norms {d_cont.norm():.4f} (continued) vs "
              f"{d_straight.norm():.4f} (uninterrupted), cosine {cos:.3f}, |2+2 - 4| / |update| {gap:.3f}; reward at "
              f"iteration 4 {cont[4]['reward_mean']:.6f} vs {straight[4]['reward_mean']:.6f}")
    assert d_cont.norm() > 0 and gap > 0  # AdamW restarts: not the uninterrupted result
    assert cos > 0  # the same first gradient (same weights, same tree), so updates of a like direction


def test_a_loha_file_continued_with_lora_selected_stays_loha(comfy, comfy_base, models):
    if not lora_path(comfy_base, "ad_LoHa").is_file():
        _train_and_check(comfy, comfy_base, models, "LoHa", algorithm="LoHa")
    sd, entry = _train_and_check(comfy, comfy_base, models, "loha_as_lora", iterations=3, algorithm="LoRA",
                                 continue_lora="branchgrpo/ad_LoHa.safetensors")
    assert sd and all(KEYS["LoHa"].match(k) for k in sd), sorted(sd)[:6]
    before = load_file(str(lora_path(comfy_base, "ad_LoHa")))
    assert set(before) == set(sd) and any(not torch.equal(before[k], sd[k]) for k in sd)
    assert [m["iteration"] for m in metrics_of(comfy, "ad_loha_as_lora")] == [3]


# ---------------------------------------------------------------------------------------------------- bad inputs
def _fails_before_compute(comfy, graph, run):
    with pytest.raises(ComfyExecutionError) as err:
        comfy.run(graph, timeout=300)
    assert not metrics_of(comfy, run)
    return err.value.error_message["exception_message"]


def test_bad_adapter_inputs_are_refused_before_any_compute(comfy, comfy_base, models):
    msg = _fails_before_compute(comfy, _graph(models, "oft1", algorithm="OFT", rank=1), "ad_oft1")
    assert "lora_rank" in msg and "OFT" in msg and "block size" in msg, msg
    msg = _fails_before_compute(comfy, _graph(models, "lokr1", algorithm="LoKr", rank=1), "ad_lokr1")
    assert "lora_rank" in msg and "LoKr" in msg and "Kronecker factor" in msg, msg

    loras = comfy_base / "models" / "loras" / "branchgrpo"
    loras.mkdir(parents=True, exist_ok=True)
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(8, 2),  # a Wan key
               "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 8)},
              str(loras / "other_family.safetensors"))
    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight": torch.zeros(7, 2),  # FLUX, wrong size
               "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight": torch.zeros(2, 64)},
              str(loras / "wrong_shape.safetensors"))
    msg = _fails_before_compute(comfy, _graph(models, "other", continue_lora="branchgrpo/other_family.safetensors"),
                                "ad_other")
    assert "continue_lora" in msg and "other_family.safetensors" in msg and "maps to no weight" in msg, msg
    assert "Flux" in msg and "none" in msg
    msg = _fails_before_compute(comfy, _graph(models, "shape", continue_lora="branchgrpo/wrong_shape.safetensors"),
                                "ad_shape")
    assert "continue_lora" in msg and "does not fit" in msg and "another model" in msg, msg

    # a name not in models/loras (an API graph, or a file deleted since the page listed it): the Trainer names the
    # folders (ComfyUI 0.3.75), or the core refuses it at queue time as a value not in the list (0.33.0)
    try:
        msg = _fails_before_compute(comfy, _graph(models, "missing",
                                                  continue_lora="branchgrpo/no_such_file.safetensors"), "ad_missing")
        assert "continue_lora" in msg and "no_such_file" in msg and "is not a file in" in msg, msg
    except ComfyQueueError as e:
        errors = e.node_errors["trainer"]["errors"]
        assert errors[0]["type"] == "value_not_in_list" and errors[0]["extra_info"]["input_name"] == "continue_lora"
        assert not metrics_of(comfy, "ad_missing")


# ---------------------------------------------------------------------------------------------------- in-process
@pytest.fixture(scope="module")
def pack():
    nve.import_comfy()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {**{n: importlib.import_module(f"{nve.PACK}.nodes.{n}") for n in ("adapters", "memory")},
           "tiny_model": importlib.import_module("comfy_dev_pack.tiny_flux")}
    torch.set_num_threads(threads)


def _prediction(probe, mp):
    cond = probe.random_conditioning(mp.model.diffusion_model, 8, 3.5, generator=torch.Generator().manual_seed(0))
    call = probe.SamplingCall(mp, cond, (16, 8, 8))
    try:
        with torch.no_grad():
            return call(torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1)), torch.full((2,), 0.6))
    finally:
        call.close()


def _kohya(sd: dict) -> dict:
    """ComfyUI names -> kohya's (``lora_unet_<module with _>``), which ComfyUI's key map reads too."""
    out = {}
    for k, v in sd.items():
        module, leaf = re.match(r"^diffusion_model\.(.+?)\.((?:lora_(?:up|down)\.weight)|[a-z0-9_]+)$", k).groups()
        out[f"lora_unet_{module.replace('.', '_')}.{leaf}"] = v
    return out


@pytest.mark.parametrize("algorithm,names,alpha", [("LoRA", "comfy", True), ("LoRA", "kohya", False),
                                                   ("LoHa", "comfy", True), ("LoKr", "kohya", True),
                                                   ("OFT", "comfy", True)])
def test_a_continued_file_starts_exactly_where_the_stock_loader_puts_the_model(pack, tmp_path, algorithm, names,
                                                                              alpha):
    import comfy.sd
    from branchgrpo.lora import LoRAConfig
    ad, probe, tiny = pack["adapters"], pack["memory"], pack["tiny_model"]
    mp = tiny.build_tiny_model("flux", 0)
    src = ad.build_adapters(mp.model.diffusion_model, LoRAConfig(rank=4, alpha=2.0, targets=("*attn*",)),
                            algorithm=algorithm, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in src.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    sd = src.comfy_state_dict()
    if not alpha:  # the stock loader then scales by 1 (alpha = rank)
        sd = {k: v for k, v in sd.items() if not k.endswith(".alpha")}
    if names == "kohya":
        sd = _kohya(sd)
    path = tmp_path / "file.safetensors"
    save_file(sd, str(path))

    stock = comfy.sd.load_lora_for_models(mp, None, load_file(str(path)), 1.0, 0)[0]
    loaded = ad.load_lora_for_training(mp, str(path))
    assert not loaded.ignored
    with torch.inference_mode(False), torch.enable_grad():
        mpl, adapters = ad.attach_adapters(mp, LoRAConfig(rank=8, alpha=8.0, targets=("*",)), seed=0, device="cpu",
                                           algorithm="LoRA", existing=loaded)
    file_layers = {k.rsplit(".", 1)[0] for k in src.comfy_state_dict() if k.endswith(".alpha")}
    kinds = dict(zip(adapters.names, adapters.kinds))
    assert {kinds[n[len("diffusion_model."):]] for n in file_layers} == {algorithm.lower()}  # the file wins
    assert {k for n, k in kinds.items() if f"diffusion_model.{n}" not in file_layers} == {"lora"}  # fresh elsewhere
    stock.patch_model()  # the stock patches are merged into the weights when a sampler loads the model
    try:
        want = _prediction(probe, stock)
    finally:
        stock.unpatch_model()
    got, base = _prediction(probe, mpl), _prediction(probe, mp)
    assert float((want - base).abs().max()) > 1e-3
    print(f"[continue {algorithm}, {names} names, alpha {'in file' if alpha else 'absent'}] max |continued - stock| "
          f"{float((got - want).abs().max()):.1e} (the file moves the prediction by {float((want - base).abs().max()):.3e})")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    out = adapters.comfy_state_dict()  # the file's layers are saved under ComfyUI's names, with an alpha
    assert all(k.startswith("diffusion_model.") for k in out)
    assert {k.rsplit(".", 1)[0] for k in out if k.endswith(".alpha")} >= file_layers


def test_memory_probe_counts_each_algorithms_trainable_numbers(pack):
    from branchgrpo.lora import LoRAConfig
    ad, probe, tiny = pack["adapters"], pack["memory"], pack["tiny_model"]
    dm = tiny.build_tiny_model("flux", 0).model.diffusion_model
    cfg = LoRAConfig(rank=4, alpha=4.0, targets=("*",))
    for algorithm in ("LoRA", "LoHa", "LoKr", "OFT"):
        for bias_norm in (False, True):
            built = ad.build_adapters(dm, cfg, algorithm=algorithm, train_bias_norm=bias_norm)
            assert probe.lora_param_count(dm, cfg, algorithm, bias_norm) == built.trainable_count() > 0
    lora = ad.build_adapters(dm, cfg)
    assert lora.trainable_count() == sum(4 * (m.in_features + m.out_features)
                                         for m in dm.modules() if isinstance(m, torch.nn.Linear))


def test_memory_probe_counts_a_continued_files_own_adapters(pack, tmp_path):
    """A continued file's layers count at the file's rank and algorithm (a rank-16 LoHa file continued with a rank-2
    LoRA selected), the layers it does not cover as fresh adapters of the selected algorithm."""
    from branchgrpo.lora import LoRAConfig
    ad, probe, tiny = pack["adapters"], pack["memory"], pack["tiny_model"]
    mp = tiny.build_tiny_model("flux", 0)
    dm = mp.model.diffusion_model
    src = ad.build_adapters(dm, LoRAConfig(rank=16, alpha=16.0, targets=("*attn*",)), algorithm="LoHa", seed=1)
    save_file(src.comfy_state_dict(), str(tmp_path / "loha16.safetensors"))
    loaded = ad.load_lora_for_training(mp, str(tmp_path / "loha16.safetensors"))
    cfg = LoRAConfig(rank=2, alpha=2.0, targets=("*",))
    with torch.inference_mode(False):
        built = ad.build_adapters(dm, cfg, algorithm="LoRA", existing=loaded)
    fresh_only = probe.lora_param_count(dm, cfg, "LoRA")
    counted = probe.lora_param_count(dm, cfg, "LoRA", False, loaded)
    assert counted == built.trainable_count() > fresh_only


def test_a_fresh_lora_is_seeded_as_the_packs_lora_always_was(pack):
    """``down`` kaiming-uniform (as nn.Linear) drawn layer after layer from the seed, ``up`` zero: the numbers the
    pack's LoRA had before it used ComfyUI's modules (the CPU demo's README numbers depend on them)."""
    import math
    from branchgrpo.lora import LoRAConfig
    ad, tiny = pack["adapters"], pack["tiny_model"]
    dm = tiny.build_tiny_model("flux", 0).model.diffusion_model
    lora = ad.build_adapters(dm, LoRAConfig(rank=4, alpha=4.0, targets=("*attn*", "*mlp*")), seed=7)
    torch.manual_seed(123)  # the global RNG is not used: its state stays as it is
    before = torch.random.get_rng_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        for t, m in zip(lora.targets, lora.adapters):
            want = torch.empty(4, math.prod(t.shape[1:]))
            torch.nn.init.kaiming_uniform_(want, a=math.sqrt(5))
            assert torch.equal(m.lora_down.weight.detach(), want), t.name
            assert not m.lora_up.weight.detach().any()
    assert len(lora.targets) > 4
    ad.build_adapters(dm, LoRAConfig(rank=4, alpha=4.0), seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize("algorithm", ["LoRA", "LoHa", "LoKr", "OFT"])
def test_memory_probe_on_fake_tensors_equals_the_measured_run_for_each_algorithm(pack, algorithm):
    """The Trainer's memory prediction builds the run's adapters on a fake twin: its rollout and update transients
    equal those of the same calls computed for real (tiny FLUX, bias/norm deltas on)."""
    from branchgrpo.lora import LoRAConfig
    probe, tiny = pack["memory"], pack["tiny_model"]
    mp = tiny.build_tiny_model("flux", 0)
    kw = dict(rollout_batch=2, train_batch=2, text_tokens=8, guidance=3.5, checkpointing=False,
              algorithm=algorithm, train_bias_norm=True)
    cfg = LoRAConfig(rank=4, alpha=4.0, targets=("*",))
    fake = probe.probe_calls(mp, (16, 8, 8), cfg, **kw)
    real = probe.probe_calls(mp, (16, 8, 8), cfg, fake=False, **kw)
    assert real["update_chunk"] > real["rollout_call"] > 0, real
    if algorithm == "OFT":  # the fake twin skips OFT's norm bound (it branches on a value) and what its backward
        # keeps: measured 0.8 % of this tiny update chunk (block-sized tensors, nothing per token)
        assert fake.keys() == real.keys() and all(abs(fake[k] - real[k]) <= 0.02 * max(real[k], 1) for k in real
                                                  if isinstance(real[k], int)), (fake, real)
    else:
        assert fake == real, (fake, real)


def test_dora_files_are_refused_and_text_encoder_keys_ignored(pack, tmp_path):
    from branchgrpo.lora import LoRAConfig
    ad, tiny = pack["adapters"], pack["tiny_model"]
    mp = tiny.build_tiny_model("flux", 0)
    sd = ad.build_adapters(mp.model.diffusion_model, LoRAConfig(rank=2, alpha=2.0, targets=("*img_attn.qkv",)),
                           seed=0).comfy_state_dict()
    (key,) = [k[:-len(".alpha")] for k in sd if k.endswith(".alpha")]
    with_te = {**sd, "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(4, 2)}
    save_file(with_te, str(tmp_path / "te.safetensors"))
    loaded = ad.load_lora_for_training(mp, str(tmp_path / "te.safetensors"))
    assert loaded.ignored == ["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"]
    assert list(loaded.modules) == [(key[len("diffusion_model."):], "weight")]
    save_file({**sd, f"{key}.dora_scale": torch.ones(192, 1)}, str(tmp_path / "dora.safetensors"))
    with pytest.raises(ValueError, match="continue_lora — dora.safetensors is a DoRA file"):
        ad.load_lora_for_training(mp, str(tmp_path / "dora.safetensors"))


def test_export_run_config_offers_the_trainers_algorithms(pack):
    export = importlib.import_module(f"{nve.PACK}.nodes.export_config")
    trainer = importlib.import_module(f"{nve.PACK}.nodes.trainer")
    specs = [{i.id: i for i in node.define_schema().inputs} for node in (export.ExportRunConfigNode,
                                                                        trainer.TrainerNode)]
    assert [s["algorithm"].options for s in specs] == [["LoRA", "LoHa", "LoKr", "OFT"]] * 2
    assert export._algorithm_entry("LoKr") == {"algorithm": "LoKr"}  # the run config's [lora] algorithm


def test_a_lokr_file_whose_training_module_would_scale_differently_is_refused(pack, tmp_path):
    ad, tiny = pack["adapters"], pack["tiny_model"]
    mp = tiny.build_tiny_model("flux", 0)
    key = "diffusion_model.double_blocks.0.img_attn.qkv"  # [192, 64] = kron([4, 4], [48, 16])
    g = torch.Generator().manual_seed(0)
    sd = {f"{key}.lokr_w1_a": torch.randn(4, 2, generator=g), f"{key}.lokr_w1_b": torch.randn(2, 4, generator=g),
          f"{key}.lokr_w2_a": torch.randn(48, 3, generator=g), f"{key}.lokr_w2_b": torch.randn(3, 16, generator=g),
          f"{key}.alpha": torch.tensor(3.0)}
    save_file(sd, str(tmp_path / "lokr.safetensors"))
    with pytest.raises(ValueError, match="both Kronecker factors in low-rank form"):
        ad.load_lora_for_training(mp, str(tmp_path / "lokr.safetensors"))
    sd[f"{key}.alpha"] = torch.tensor(2.0)  # alpha = w1's rank: LokrDiff's scale equals the loader's
    save_file(sd, str(tmp_path / "lokr_ok.safetensors"))
    loaded = ad.load_lora_for_training(mp, str(tmp_path / "lokr_ok.safetensors"))
    assert loaded.kinds == {(key[len("diffusion_model."):], "weight"): "lokr"}
    import comfy.lora
    patches = comfy.lora.load_lora(load_file(str(tmp_path / "lokr_ok.safetensors")), {key: f"{key}.weight"})
    w = torch.randn(192, 64, generator=g)
    stock = comfy.lora.calculate_weight([(1.0, patches[f"{key}.weight"], 1.0, None, None)], w.clone(), key)
    with torch.no_grad():
        torch.testing.assert_close(loaded.modules[(key[len("diffusion_model."):], "weight")](w), stock)
