"""What a 24 GB card needs, on tiny models in ComfyUI imported in this process (CPU): an fp8 base with the LoRA
computed in the compute dtype, at most one load of the diffusion model per iteration, partial loading (lowvram)
during the update, and the VAE / reward models released after their phase."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from bench import node_vs_engine as nve

pytestmark = pytest.mark.skipif(not (nve.COMFY_DIR / "comfy" / "samplers.py").is_file(),
                                reason=".comfyui/ is missing: run scripts/setup_dev.sh")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_models as tm  # noqa: E402


@pytest.fixture(scope="module")
def pk():
    nve.import_comfy()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    mods = {name: importlib.import_module(f"{nve.PACK}.nodes.{name}")
            for name in ("adapters", "comfy_model", "demo_model", "memory", "rewards")}
    yield mods
    torch.set_num_threads(threads)


def _config(iterations, lr=1e-2, steps=4, splits=(0, 1), prompts=2, max_batch=16):
    from branchgrpo.loss import OptimConfig
    from branchgrpo.schedule import BranchSchedule
    from branchgrpo.trainer import TrainerConfig
    return TrainerConfig(schedule=BranchSchedule(num_steps=steps, split_steps=splits, branching=2),
                         optim=OptimConfig(learning_rate=lr, max_train_batch=8), iterations=iterations,
                         prompts_per_iteration=prompts, seed=0, max_batch=max_batch)


def _train(pk, mp, latent_shape, conditioning, decode, rewards, config, *, callbacks=(), rank=4, targets=("*",),
           evaluate_seeds=()):
    """What the Trainer node does with a MODEL, in-process: LoRA clone, session, train. Returns
    (trainer, lora, flow, patched clone); with ``evaluate_seeds``, ``trainer.eval_gain`` is the reward gain of
    deterministic samples at those seeds (after training minus the base model)."""
    from branchgrpo.evaluate import evaluate
    from branchgrpo.lora import LoRAConfig
    from branchgrpo.trainer import BranchGRPOTrainer
    cm = pk["comfy_model"]
    with torch.inference_mode(False), torch.enable_grad():
        mpl, lora = cm.attach_lora(mp, LoRAConfig(rank=rank, alpha=float(rank), targets=targets), seed=0,
                                   device=mp.load_device)
        flow = cm.ComfyFlowModel(mpl, latent_shape, conditioning=conditioning, seed=0, guidance=None)
        trainer = BranchGRPOTrainer(flow, lora, list(conditioning), rewards, decode, config, latent_shape,
                                    device=mp.load_device, callbacks=list(callbacks))
        with flow.session(config.max_batch), cm.gradient_checkpointing(mpl, False):
            if evaluate_seeds:
                before = evaluate(trainer, list(conditioning), evaluate_seeds, reference=True)["reward"]
            trainer.train()
            if evaluate_seeds:
                trainer.eval_gain = evaluate(trainer, list(conditioning), evaluate_seeds)["reward"] - before
    return trainer, lora, flow, mpl


# ------------------------------------------------------------------------------------------ fp8 base
def _sd3_conditioning():
    g = torch.Generator().manual_seed(3)
    return {f"prompt {i}": [[torch.randn(1, 8, 4096, generator=g) * 0.5,
                             {"pooled_output": torch.randn(1, 2048, generator=g) * 0.5}]] for i in range(2)}


def _sd3_decode(x0):
    return torch.sigmoid(x0[:, :3].float()).permute(0, 2, 3, 1).contiguous()


def _brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def test_fp8_base_trains_and_its_lora_loads_with_the_stock_loader_on_bf16(pk, tmp_path):
    import comfy.sd
    import folder_paths
    import nodes as comfy_nodes  # ComfyUI's own (the pack is imported under another name)
    from branchgrpo.lora import save_state_dict

    path = tm.write_tiny_sd3(tmp_path / "models")
    fp8 = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float8_e4m3fn})  # UNETLoader fp8
    bf16 = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.bfloat16})
    linears = [m for m in fp8.model.diffusion_model.modules() if isinstance(m, torch.nn.Linear)]
    before = {id(m): m.weight.detach().clone() for m in linears}
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in linears)

    # the LoRA's weight function receives the weight in the dtype the op casts it to, never in fp8
    seen = []
    ad = pk["adapters"]
    orig_call = ad.AdapterSwitch.__call__

    def spy(self, weight):
        out = orig_call(self, weight)
        seen.append((weight.dtype, out.dtype))
        return out

    ad.AdapterSwitch.__call__ = spy
    try:
        runs = {}
        for name, model in (("fp8", fp8), ("bf16", bf16)):
            runs[name] = _train(pk, model, (16, 8, 8), _sd3_conditioning(), _sd3_decode, [_brightness],
                                _config(4, lr=3e-2), evaluate_seeds=range(4))
    finally:
        ad.AdapterSwitch.__call__ = orig_call
    assert seen and all(w == o and w not in (torch.float8_e4m3fn, torch.float8_e5m2) for w, o in seen)

    for name, (trainer, lora, flow, mpl) in runs.items():
        losses = [h["loss"] for h in trainer.history]
        assert all(torch.isfinite(torch.tensor(losses))), (name, losses)
        assert float(sum(a.lora_up.weight.detach().abs().sum() for a in lora.adapters)) > 0, name  # up starts at 0
    # the frozen fp8 base is kept: still fp8, bit for bit
    assert all(m.weight.dtype == torch.float8_e4m3fn and torch.equal(m.weight.view(torch.uint8),
                                                                     before[id(m)].view(torch.uint8))
               for m in linears)
    trend = {k: r[0].eval_gain for k, r in runs.items()}  # fixed-noise samples: after training - base model
    assert trend["fp8"] != 0 and (trend["fp8"] > 0) == (trend["bf16"] > 0), trend

    # the fp8-trained LoRA through the stock LoraLoaderModelOnly on the bf16 model
    lora = runs["fp8"][1]
    loras = tmp_path / "loras"
    save_state_dict(loras / "fp8_run.safetensors", lora.comfy_state_dict())
    saved = list(folder_paths.folder_names_and_paths["loras"][0])
    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
    try:
        patched = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(bf16, "fp8_run.safetensors", 1.0)[0]
    finally:
        folder_paths.folder_names_and_paths["loras"][0][:] = saved
    assert len(patched.patches) == len(lora.names)
    import comfy.lora
    for name in lora.names[:6]:
        key = f"diffusion_model.{name}.weight"
        base = bf16.model.get_parameter(key).float()
        got = comfy.lora.calculate_weight(patched.patches[key], base.clone(), key)
        torch.testing.assert_close(got, base + lora.delta(name).detach().float(), rtol=1e-4, atol=1e-5)


def test_with_base_dtype_stores_linear_weights_in_fp8(pk, tmp_path):
    """The Trainer's fp8 option on a MODEL loaded in full precision: its Linear weights stored in fp8 exactly as
    the stock fp8 load stores them (biases, convolutions and embeddings stay as loaded, where the stock load
    rounds them too), computed in the model's dtype; the input MODEL is unchanged."""
    import comfy.sd
    import comfy.samplers
    mpol = pk["memory"]
    path = tm.write_tiny_sd3(tmp_path / "models")
    full = comfy.sd.load_diffusion_model(str(path))
    fp8 = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float8_e4m3fn})
    full.model.current_patcher = full  # as while a sampler runs it
    cast = mpol.with_base_dtype(full, torch.float8_e4m3fn)
    assert cast.model is not full.model and cast.model.current_patcher is None
    full.model.current_patcher = None
    w_full = full.model.diffusion_model.context_embedder.weight
    w_cast = cast.model.diffusion_model.context_embedder.weight
    assert w_full.dtype == torch.float32 and w_cast.dtype == torch.float8_e4m3fn
    assert torch.equal(w_cast.view(torch.uint8), fp8.model.diffusion_model.context_embedder.weight.view(torch.uint8))
    assert cast.model_size() < 0.5 * full.model_size()
    # reference: the full model with its Linear weights rounded through fp8
    rounded = comfy.sd.load_diffusion_model(str(path))
    with torch.no_grad():
        for m in rounded.model.diffusion_model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(m.weight.to(torch.float8_e4m3fn).float())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, 8, generator=g)
    t = torch.tensor([0.7, 0.3])
    ctx, pooled = torch.randn(2, 8, 4096, generator=g), torch.randn(2, 2048, generator=g)
    with torch.no_grad():
        got, want, orig = [m.model.apply_model(x, t, c_crossattn=ctx, y=pooled) for m in (cast, rounded, full)]
        again = full.model.apply_model(x, t, c_crossattn=ctx, y=pooled)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, orig, atol=1e-5)  # fp8 rounding shows
    assert torch.equal(orig, again) and full.model.diffusion_model.context_embedder.weight.dtype == torch.float32


# ------------------------------------------------------------------------------- the demo model runs
def _demo(pk):
    demo = pk["demo_model"]
    mp, names = demo.build_demo_model()
    enc = demo.DemoTextEncoder(names)
    conditioning = {p: enc.encode_from_tokens_scheduled(enc.tokenize(p)) for p in ("red circle", "blue triangle")}
    vae = demo.DemoVAE(16)
    return mp, conditioning, vae


def _colorfulness():
    from branchgrpo.rewards.weight_free import Colorfulness
    return Colorfulness()


def _load_counter(monkeypatch):
    import comfy.model_patcher
    loads = []
    orig = comfy.model_patcher.ModelPatcher.load

    def load(self, *args, **kwargs):
        loads.append(self)
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "load", load)
    return loads


def test_diffusion_model_loads_at_most_once_per_iteration(pk, monkeypatch):
    """Counted at ModelPatcher.load: one load for the whole run while nothing pushes the model out; when the
    decode phase unloads everything (a VAE that needs the whole card), one reload per iteration (before
    the update) and the same LoRA."""
    import comfy.model_management as mm
    iterations = 3
    loads = _load_counter(monkeypatch)
    mp, conditioning, vae = _demo(pk)
    quiet = _train(pk, mp, (3, 16, 16), conditioning, vae.decode, [_colorfulness()], _config(iterations))
    assert sum(1 for p in loads if p is quiet[3]) == 1
    assert quiet[2].reloads == 0

    loads.clear()

    def evicting_decode(x0):
        mm.unload_all_models()
        return vae.decode(x0)

    mp, conditioning, vae = _demo(pk)
    evicted = _train(pk, mp, (3, 16, 16), conditioning, evicting_decode, [_colorfulness()], _config(iterations))
    n = sum(1 for p in loads if p is evicted[3])
    assert n == 1 + iterations and evicted[2].reloads == iterations  # the session's load + one per iteration
    for a, b in zip(quiet[1].parameters(), evicted[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert [h["reward_mean"] for h in quiet[0].history] == pytest.approx(
        [h["reward_mean"] for h in evicted[0].history], rel=1e-5)


def test_lowvram_partial_load_gives_the_same_lora(pk, monkeypatch):
    """A small budget forces ComfyUI's partial loading (most layers offloaded, cast per forward with their
    weight functions: an upstream LoRA's LowVramPatch, then ours) during rollout and update; the trained
    LoRA equals the one of a full load."""
    import comfy.model_management as mm
    import comfy.sd
    from branchgrpo.lora import LoRAConfig

    def upstream(mp):  # a LoRA applied before training (stock path), so lowvram layers carry LowVramPatch too
        other = pk["adapters"].build_adapters(mp.model.diffusion_model, LoRAConfig(rank=2, alpha=2.0,
                                                                                   targets=("*attn*",)), seed=5)
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for a in other.adapters:
                a.lora_up.weight.copy_(torch.randn(a.lora_up.weight.shape, generator=g) * 0.05)
        return comfy.sd.load_lora_for_models(mp, None, other.comfy_state_dict(), 1.0, 0)[0]

    mp, conditioning, vae = _demo(pk)
    full = _train(pk, upstream(mp), (3, 16, 16), conditioning, vae.decode, [_colorfulness()], _config(2))
    assert not full[3].model.model_lowvram

    state = {}
    orig = mm.LoadedModel.model_load

    def small_budget(self, lowvram_model_memory=0, force_patch_weights=False):
        if getattr(self.model, "_small_budget", False):
            lowvram_model_memory = int(self.model.model_size() * 0.3)
        out = orig(self, lowvram_model_memory, force_patch_weights)
        state["lowvram"] = bool(self.model.model.model_lowvram) if getattr(self.model, "_small_budget", False) \
            else state.get("lowvram")
        return out

    monkeypatch.setattr(mm.LoadedModel, "model_load", small_budget)
    mp, conditioning, vae = _demo(pk)
    base = upstream(mp)
    orig_clone = base.clone

    def clone():
        c = orig_clone()
        c._small_budget = True
        return c

    base.clone = clone
    calls = []
    ad = pk["adapters"]
    orig_call = ad.AdapterSwitch.__call__

    def spy(self, weight):
        calls.append(weight.requires_grad or torch.is_grad_enabled())
        return orig_call(self, weight)

    monkeypatch.setattr(ad.AdapterSwitch, "__call__", spy)
    low = _train(pk, base, (3, 16, 16), conditioning, vae.decode, [_colorfulness()], _config(2))
    assert state["lowvram"] is True
    assert low[3].model.lowvram_patch_counter > 0  # upstream patches applied per layer, not merged
    assert any(calls)  # our wrapper ran with gradients on (the update) in lowvram
    for a, b in zip(full[1].parameters(), low[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert float(sum(p.detach().abs().sum() for n, p in low[1].named_parameters() if "lora_up" in n)) > 0


# --------------------------------------------------------------------------------- release after phase
class _TinyScorer:
    """A reward model with weights (one Linear), in the engine scorers' shape: ``modules()`` + ``__call__``."""
    name = "tiny_scorer"

    def __init__(self):
        self.proj = torch.nn.Linear(3, 1)

    def modules(self):  # what ComfyManagedReward hands to model management
        return [self.proj]

    def __call__(self, images, prompts=None):
        return self.proj(images.float().mean(dim=(1, 2))).flatten()


def test_vae_and_reward_models_are_released_after_their_phase(pk):
    mpol, rewards = pk["memory"], pk["rewards"]
    import comfy.model_management as mm
    import comfy.model_patcher

    mp, conditioning, vae = _demo(pk)
    holder = torch.nn.Module()
    vae_patcher = comfy.model_patcher.ModelPatcher(holder, load_device=mm.get_torch_device(),
                                                   offload_device=mm.unet_offload_device())
    phases = []

    def decode(x0):
        mm.load_models_gpu([vae_patcher])
        phases.append(("decode", mpol.is_loaded(vae_patcher)))
        return vae.decode(x0)

    reward = rewards.ComfyManagedReward(_TinyScorer())

    def scored(images, prompts):
        phases.append(("reward", mpol.is_loaded(vae_patcher), all(mpol.is_loaded(p) for p in reward.patchers)))
        return reward(images, prompts)

    class V:
        patcher = vae_patcher

    from branchgrpo.trainer import Callback

    class Preview(Callback):  # like the Trainer's preview: decodes a leaf after the rollout, before the update
        def __init__(self):
            self.vae_in_update = []

        def on_rollout_end(self, iteration, tree, leaf_rewards, images):
            decode(tree.leaf_x0[:1])

        def on_model_call(self, phase, done, total):
            if phase == "train":
                self.vae_in_update.append(mpol.is_loaded(vae_patcher))

    preview = Preview()
    release = mpol.ReleaseAfterPhase(V(), [reward])
    trainer, _, flow, mpl = _train(pk, mp, (3, 16, 16), conditioning, decode, [scored], _config(2, max_batch=4),
                                   callbacks=[preview, release])
    # the leaves (2 prompts x 4 = 8) are decoded in chunks, then scored: the VAE is gone before the reward runs
    assert phases[0] == ("decode", True)
    assert [p for p in phases if p[0] == "reward"][0][1] is False
    assert release.released == ["vae", "reward0", "vae"] * 2  # the preview's VAE load is released again
    assert preview.vae_in_update and not any(preview.vae_in_update)
    assert not any(mpol.is_loaded(p) for p in reward.patchers) and not mpol.is_loaded(vae_patcher)
    assert flow.reloads == 0  # releasing them never pushed the diffusion model out


def test_plan_picks_defaults_from_the_budget(pk):
    mpol = pk["memory"]
    gb = 2 ** 30
    flux = mpol.plan(budget=24 * gb, weights=int(23.8 * gb), latent_shape=(16, 64, 64), max_batch=16)
    assert flux.base_weights == "fp8_e4m3fn" and flux.release_text_encoders and flux.release_after_phase
    medium = mpol.plan(budget=80 * gb, weights=5 * gb, latent_shape=(16, 128, 128), max_batch=16)
    assert medium.base_weights == "as loaded" and not medium.release_after_phase
    assert mpol.plan(budget=24 * gb, weights=23 * gb, latent_shape=(16, 64, 64), max_batch=16,
                     base_weights="as loaded").base_weights == "as loaded"

    class Vae:
        vae_dtype = torch.bfloat16

        def memory_used_decode(self, shape, dtype):
            return 2 * gb * shape[0]

    p = mpol.plan(budget=24 * gb, weights=12 * gb, latent_shape=(16, 128, 128), max_batch=16, vae=Vae())
    assert p.decode_batch == 3  # a quarter of 24 GB at 2 GB per leaf

    class Reward:
        batch_size = 4

    assert mpol.plan(budget=24 * gb, weights=gb, latent_shape=(4,), max_batch=16, reward=Reward()).reward_batch == 4
    with pytest.raises(ValueError, match="base_weights"):
        mpol.plan(budget=gb, weights=gb, latent_shape=(4,), max_batch=1, base_weights="fp4")


def test_each_prompt_is_encoded_once_per_run_and_the_text_encoder_released(pk):
    """Conditioning is cached across iterations: the CLIP encodes each prompt once; then its patcher is released."""
    import comfy.model_management as mm
    import comfy.model_patcher
    from branchgrpo.lora import LoRAConfig
    from branchgrpo.trainer import BranchGRPOTrainer
    cm, demo, mpol = pk["comfy_model"], pk["demo_model"], pk["memory"]
    mp, names = demo.build_demo_model()
    encoded = []

    class Clip(demo.DemoTextEncoder):
        def encode_from_tokens_scheduled(self, tokens, **kwargs):
            encoded.append(tokens)
            return super().encode_from_tokens_scheduled(tokens, **kwargs)

    clip = Clip(names)
    clip.patcher = comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), load_device=mm.get_torch_device(),
                                                    offload_device=mm.unet_offload_device())
    mm.load_models_gpu([clip.patcher])
    prompts = ["red circle", "blue triangle", "green square"]
    with torch.inference_mode(False), torch.enable_grad():
        mpl, lora = cm.attach_lora(mp, LoRAConfig(rank=2, alpha=2.0), seed=0, device=mp.load_device)
        flow = cm.ComfyFlowModel(mpl, (3, 16, 16), clip=clip, seed=0)
        flow.add_prompts(prompts)
        assert mpol.is_loaded(clip.patcher)
        assert mpol.release(mpol.patchers_of(clip)) == 1 and not mpol.is_loaded(clip.patcher)
        trainer = BranchGRPOTrainer(flow, lora, prompts, [_colorfulness()], demo.DemoVAE(16).decode,
                                    _config(3, prompts=2), (3, 16, 16))
        with flow.session(16):
            trainer.train()
    assert len(encoded) == len(prompts)  # 3 iterations x 2 prompts, every prompt encoded once
    assert not mpol.is_loaded(clip.patcher)


def test_fp8_base_with_bf16_compute_returns_bf16_weights_and_trains_the_lora_in_fp32(pk, tmp_path):
    """What a GPU does with an fp8 UNETLoader model (compute dtype bf16; on CPU ComfyUI picks fp32, so it is set
    here): each layer gets its weight cast to bf16; ComfyUI's LoraDiff adds its fp32 update in fp32 and rounds the
    sum once to bf16 (never fp8), and the gradients reach the fp32 adapter."""
    import comfy.sd
    from branchgrpo.lora import LoRAConfig
    cm = pk["comfy_model"]
    path = tm.write_tiny_sd3(tmp_path / "models")
    fp8 = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float8_e4m3fn})
    fp8.model.manual_cast_dtype = torch.bfloat16
    seen = []
    ad = pk["adapters"]
    orig_call = ad.AdapterSwitch.__call__

    def spy(self, weight):
        out = orig_call(self, weight)
        a = self.module
        want = (weight.float() + (a.alpha / a.rank) * (a.lora_up.weight @ a.lora_down.weight)).to(torch.bfloat16)
        seen.append((weight.dtype, out.dtype, torch.equal(out, want)))
        return out

    conditioning = _sd3_conditioning()
    ad.AdapterSwitch.__call__ = spy
    try:
        with torch.inference_mode(False), torch.enable_grad():
            mpl, lora = cm.attach_lora(fp8, LoRAConfig(rank=4, alpha=4.0), seed=0, device=fp8.load_device)
            with torch.no_grad():
                for a in lora.adapters:
                    a.lora_up.weight.fill_(0.01)
            flow = cm.ComfyFlowModel(mpl, (16, 8, 8), conditioning=conditioning, seed=0, guidance=None)
            with flow.session(4), cm.gradient_checkpointing(mpl, False):
                g = torch.Generator().manual_seed(0)
                x = torch.randn(3, 16, 8, 8, generator=g)
                v = flow.velocity(x, torch.tensor([0.9, 0.5, 0.2]), list(conditioning), torch.tensor([0, 1, 0]))
                v.float().square().mean().backward()
    finally:
        ad.AdapterSwitch.__call__ = orig_call
    assert seen and all(w == torch.bfloat16 and o == torch.bfloat16 and exact for w, o, exact in seen)
    assert all(p.dtype == torch.float32 and p.grad is not None and bool(p.grad.isfinite().all())
               for p in lora.parameters() if p.requires_grad)
    assert any(float(p.grad.abs().sum()) > 0 for p in lora.parameters() if p.requires_grad)
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in fp8.model.diffusion_model.modules()
               if isinstance(m, torch.nn.Linear))
