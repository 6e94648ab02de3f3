"""Real scale: each model family at its real width through the Trainer's code path, its memory measured and predicted.

    .venv/bin/python -m bench.scale --family flux-dev --blocks 1 --resolution 256 --out run.json
    .venv/bin/python -m bench.scale --table --out table.json        # the README memory table (full depth, sized)
    .venv/bin/python -m bench.scale --ratios --family flux-dev --blocks 1 --resolution 256 --steps 8
    .venv/bin/python -m bench.scale --device cuda --blocks 0 ...     # 0 = every block (full depth)

**Runs.** The diffusion model is ComfyUI's own class (``comfy.supported_models`` config -> ``model_base``) with
the family's real configuration (``bench.families``), random weights, and ``--blocks N`` blocks of each block list (so full width fits
a CPU); bf16 weights, or fp8 (e4m3fn) weights computed in bf16 as the stock ``UNETLoader`` gives them. It is
wrapped in a ``ModelPatcher`` and trained by what the Trainer node runs: ``nodes.comfy_model.ComfyFlowModel``
(+ LoRA weight wrappers, gradient checkpointing) under ``branchgrpo.trainer.BranchGRPOTrainer``. Conditioning
is random tensors of the real shape (T5 / umT5: ``--text-tokens`` x 4096, plus pooled vectors); no text encoder
runs. Decode and reward are stand-ins in the run (ComfyUI's TAESD decoder with random weights, per latent frame
for video; the weight-free colourfulness reward), so their *time* is not the real one; the memory table
accounts the real ones instead (below).

**Attention.** ComfyUI is imported by ``bench.sandbox`` with PyTorch's attention (SDPA, what it uses on CUDA GPUs),
so that the sizes do not depend on the free RAM of the moment (ComfyUI's CPU default chunks attention by it).

**Memory.** On a GPU, ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` per phase. On a CPU, the
exact bytes held at each phase's peak (``branchgrpo.memory``): parameters and buffers by dtype, LoRA + AdamW
state, conditioning, the trees, and every tensor the phase creates while it is alive (``LiveTensors``); the
bytes autograd saves for backward are counted per block with ``saved_tensors_hooks`` (a probe at the run's
shape, checkpointing off). ``peak_bytes_predicted`` is the Trainer's own prediction for the same run
(``nodes.memory.predict_memory``: FakeTensor probes at 1 and 2 blocks per list, extrapolated), and
``peak_bytes_full_depth`` the same prediction for the family's full depth.

**Table.** ``--table`` sizes every row at full depth without arithmetic (``FakeTensorMode``), with the real
VAE architectures (FLUX/SD3: ComfyUI's 16-channel ``AutoencoderKL``; Wan 2.1: ``WanVAE`` dim 96) decoding one
leaf per chunk, and the HPS-v2.1 reward (ViT-H-14: ComfyUI's CLIP-ViT-H vision tower + the OpenCLIP-H text
tower, 986 M parameters in bf16) loaded only in its phase.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from bench import sandbox
from bench.families import (FAMILIES, FULL_DEPTH, build_model, init_weights_, latent_shape,  # noqa: F401
                            narrowed, parse_resolution, random_cond)
from bench.instrument import PhaseMemory, malloc_pinned, reexec_pinned
from bench.sandbox import COMFY_DIR

RATIO_PRESETS = ("dancegrpo", "branchgrpo", "branchgrpo-deppru", "branchgrpo-mix")


def import_comfy(cpu: bool = True):
    """ComfyUI and the pack in this process (:func:`bench.sandbox.import_comfy`); the pack's ``comfy_model`` and
    ``memory`` modules."""
    sandbox.import_comfy(cpu)
    return sandbox.pack_module("comfy_model"), sandbox.pack_module("memory")


# ---------------------------------------------------------------------------------------------- shapes
# ---------------------------------------------------------------------------------------------- models
# ---------------------------------------------------------------------------------------------- VAE / reward
class StandInDecoder(torch.nn.Module):
    """ComfyUI's TAESD decoder (random weights) for 16-channel latents; video latents decode frame by frame.
    Returns IMAGE layout ``[N, H, W, 3]`` (``[N, T, H, W, 3]`` for video) in [0, 1]."""

    def __init__(self):
        super().__init__()
        from comfy.taesd.taesd import Decoder
        self.net = Decoder(latent_channels=16)
        init_weights_(self.net, seed=1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        video = z.dim() == 5
        if video:
            b, c, t, h, w = z.shape
            z = z.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        img = (self.net(z.float()).clamp(-1, 1) + 1) / 2
        img = img.permute(0, 2, 3, 1)
        if video:
            img = img.reshape(b, t, *img.shape[1:])
        return img


def real_vae(kind: str):
    """The family's real VAE architecture (ComfyUI's classes, untrained weights; only its shapes are used).
    Built on the CPU, not on ``meta``: ComfyUI's VAE attention asks the tensor's device for its free memory."""
    with torch.device("cpu"):
        if kind == "kl16":
            from comfy.ldm.models.autoencoder import AutoencoderKL
            dd = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                  "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
            vae = AutoencoderKL(ddconfig=dd, embed_dim=16)
        else:
            from comfy.ldm.wan.vae import WanVAE
            vae = WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                         temperal_downsample=[False, True, True], dropout=0.0)
    return vae.to(torch.bfloat16)


def hps_sizes(chunk: int, dtype=torch.bfloat16) -> dict:
    """HPS-v2.1 (OpenCLIP ViT-H-14): weights of both towers, and the transient bytes of scoring ``chunk`` 224^2
    images with the vision tower (the text is encoded once per prompt)."""
    import comfy.clip_model
    import comfy.ops
    from torch._subclasses.fake_tensor import FakeTensorMode
    from branchgrpo.memory import LiveTensors, module_bytes
    cfg_dir = COMFY_DIR / "comfy"
    vision_cfg = json.loads((cfg_dir / "clip_vision_config_h.json").read_text())
    text_cfg = json.loads((cfg_dir / "text_encoders" / "sd2_clip_config.json").read_text())
    with torch.device("meta"):
        vision = comfy.clip_model.CLIPVisionModelProjection(vision_cfg, dtype, "meta", comfy.ops.manual_cast)
        text = comfy.clip_model.CLIPTextModel(text_cfg, dtype, "meta", comfy.ops.manual_cast)
    weights = sum(module_bytes(vision).values()) + sum(module_bytes(text).values())
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    live = LiveTensors()
    with torch.inference_mode(False), mode, torch.no_grad(), live:
        vision(torch.randn(chunk, 3, 224, 224, dtype=dtype, device="meta"))
    return {"weights": weights, "chunk": live.peak,
            "params": sum(p.numel() for p in vision.parameters()) + sum(p.numel() for p in text.parameters())}


# ---------------------------------------------------------------------------------------------- configs
def trainer_config(preset_name: str, args, latent) -> "object":
    from branchgrpo.presets import preset
    cfg = preset(preset_name)
    s = cfg.schedule
    if args.steps and args.steps != s.num_steps:
        factor = args.steps / s.num_steps
        s.split_steps = tuple(sorted({min(args.steps - 1, int(round(k * factor))) for k in s.split_steps}))
        if s.sde_window is not None:
            a, b = s.sde_window
            s.sde_window = (int(a * factor), max(1, int(round(b * factor))))
        s.num_steps = args.steps
        p = cfg.pruning
        if p.depths:
            p.depths = tuple(sorted({max(1, min(args.steps, int(round(d * factor)))) for d in p.depths}))
            p.depth_stop = max(1, int(round(p.depth_stop * factor))) if p.depth_stop else p.depth_stop
    if args.group_size:
        s.group_size = args.group_size
    if args.split_steps is not None and s.split_steps:  # tree presets only; flat groups stay flat
        s.split_steps = tuple(int(v) for v in args.split_steps.split(",") if v.strip())
    cfg.max_batch = args.max_batch
    cfg.optim.max_train_batch = args.max_train_batch
    cfg.optim.learning_rate = 1e-4
    cfg.prompts_per_iteration = args.prompts
    cfg.iterations = args.iterations
    cfg.seed = 0
    cfg.validate("bench.scale")
    return cfg


# ---------------------------------------------------------------------------------------------- one run
def run_one(family: str, args, preset_name: str, device: torch.device, cm, mprobe, model=None) -> dict:
    from branchgrpo.lora import LoRAConfig
    from branchgrpo.memory import LiveTensors, Phase, RunMemory, module_bytes, optimizer_bytes, tensor_bytes, tree_bytes
    from branchgrpo.rewards.weight_free import Colorfulness
    from branchgrpo.trainer import BranchGRPOTrainer, Callback

    spec = FAMILIES[family]
    res = args.resolution or spec["resolution"]
    frames = args.frames or spec.get("frames", 1)
    latent = latent_shape(family, res, frames)
    cfg = trainer_config(preset_name, args, latent)
    blocks = None if args.blocks == 0 else args.blocks
    t_build = time.perf_counter()
    mp = model if model is not None else build_model(family, args.weight_dtype, blocks, device)
    t_build = time.perf_counter() - t_build
    lora_cfg = LoRAConfig(rank=args.lora_rank, alpha=float(args.lora_rank), targets=tuple(args.lora_targets.split(",")))
    use_gc = args.checkpointing == "on"
    prompts = [f"prompt {i}" for i in range(max(args.prompts, 1))]
    guidance = spec["guidance"]
    conds = {p: random_cond(mprobe, mp, args.text_tokens, guidance, seed=i) for i, p in enumerate(prompts)}
    decoder = StandInDecoder().to(device)
    reward = Colorfulness()

    # ---- the Trainer's prediction, before anything runs
    t0 = time.perf_counter()
    predicted = mprobe.predict_memory(mp, latent, cfg, lora_cfg, checkpointing=use_gc, num_prompts=len(prompts),
                                      text_tokens=args.text_tokens, guidance=guidance, vae=decoder,
                                      device=device.type, rewards=[reward])
    t_predict = time.perf_counter() - t0

    # ---- the run
    timers = {"decode": 0.0, "reward": 0.0}
    state = {"live": None}

    instrument = PhaseMemory(device)  # the independent measurement (bench.instrument)

    def set_phase(name):
        plant = getattr(args, "plant_update_mib", 0)  # a test of the instrument: memory the prediction cannot know
        if plant and name != "update":
            state["plant"] = None  # freed before the next phase's baseline is read
        instrument.switch(name)
        if plant and name == "update" and state.get("plant") is None:
            state["plant"] = torch.ones(plant * 2 ** 18)  # float32: MiB x 2^18 values
        if state["live"] is not None:
            state["live"].set_phase(name)
        if device.type == "cuda":
            gpu_phase(name)

    gpu_peaks: dict[str, dict] = {}
    current = {"name": None}

    def gpu_phase(name):
        prev = current["name"]
        if prev is not None:
            torch.cuda.synchronize()
            pk = gpu_peaks.setdefault(prev, {"allocated": 0, "reserved": 0})
            pk["allocated"] = max(pk["allocated"], torch.cuda.max_memory_allocated())
            pk["reserved"] = max(pk["reserved"], torch.cuda.max_memory_reserved())
            free, total = torch.cuda.mem_get_info()  # the driver's view: the context and other processes too
            pk["free_after"] = min(pk.get("free_after", free), free)
            pk["device_total"] = total
        current["name"] = name
        if name is not None:
            torch.cuda.reset_peak_memory_stats()

    def decode(x0):
        set_phase("decode")
        t = time.perf_counter()
        img = decoder.decode(flow.to_vae_latent(x0))
        timers["decode"] += time.perf_counter() - t
        return img

    def score(images, prompts_):
        set_phase("reward")
        t = time.perf_counter()
        out = reward(images, prompts_)
        timers["reward"] += time.perf_counter() - t
        return out

    class ToUpdate(Callback):
        names = {"rollout": "rollout", "train": "update", "metrics": "metrics"}

        def on_model_call(self, phase, done, total):
            set_phase(self.names.get(phase, phase))

    with torch.inference_mode(False), torch.enable_grad():
        mp2, lora = cm.attach_lora(mp, lora_cfg, seed=0, device=device)
        flow = cm.ComfyFlowModel(mp2, latent, conditioning=conds, guidance=guidance)
        trainer = BranchGRPOTrainer(flow, lora, prompts, [score], decode, cfg, latent, device=device,
                                    callbacks=[ToUpdate()])
        measured_runs, metrics = [], []
        weights = module_bytes(mp.model.diffusion_model)
        vae_bytes = sum(module_bytes(decoder).values())
        cond_bytes = tensor_bytes(t for c in conds.values() for t in [c[0][0], *[v for v in c[0][1].values()
                                                                               if isinstance(v, torch.Tensor)]])
        with flow.session(cfg.max_batch), cm.gradient_checkpointing(mp2, use_gc):
            for it in range(cfg.iterations):
                timers.update(decode=0.0, reward=0.0)
                lora_state = tensor_bytes(list(lora.parameters()) + [p.grad for p in lora.parameters()
                                                                     if p.grad is not None]) \
                    + optimizer_bytes(trainer.optimizer)
                resident = {"weights": sum(weights.values()), "lora_and_adamw": lora_state,
                            "conditioning": cond_bytes, "previous_tree": tree_bytes(trainer.last_tree)}
                live = LiveTensors() if device.type == "cpu" else None
                state["live"] = live
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    gpu_peaks.clear()
                    current["name"] = None
                instrument.new_round()
                with (live if live is not None else contextlib.nullcontext()):
                    set_phase("rollout")
                    m = trainer.step()
                    set_phase(None)
                state["live"] = None
                if live is not None:
                    # the stand-in VAE counts in its phase only, as the run's policy loads the real one only then
                    phases = [Phase(name, {**resident, **({"vae_weights": vae_bytes} if name == "decode" else {}),
                                           "transient": live.phase_peaks.get(name, 0)})
                              for name in ("rollout", "decode", "reward", "update", "metrics")]
                    measured_runs.append(RunMemory(phases))
                else:
                    measured_runs.append({k: dict(v) for k, v in gpu_peaks.items()})
                m = dict(m)
                m["time_decode"], m["time_reward_model"] = timers["decode"], timers["reward"]
                metrics.append(m)

    last = metrics[-1]
    nfe = [int(m["nfe_rollout"]) + int(m["nfe_train"]) for m in metrics]
    if device.type == "cpu":
        measured = max(r.peak for r in measured_runs)
        worst = max(measured_runs, key=lambda r: r.peak)
        measured_detail = {"peak_phase": worst.peak_phase, "phases": worst.to_dict()["phases"]}
        reserved = None
    else:
        measured = max(v["allocated"] for r in measured_runs for v in r.values())
        reserved = max(v["reserved"] for r in measured_runs for v in r.values())
        measured_detail = {"phases": measured_runs[-1]}
    # full depth: the same prediction on the family's full model (sizes only)
    full = build_model(family, args.weight_dtype, None, device, fake=True)
    full_pred = mprobe.predict_memory(full, latent, cfg, lora_cfg, checkpointing=use_gc, num_prompts=len(prompts),
                                      text_tokens=args.text_tokens, guidance=guidance, vae=decoder,
                                      device=device.type)
    per_it = [m["time_rollout"] + m["time_reward"] + m["time_update"] for m in metrics]
    run = {
        "family": family, "resolution": res if isinstance(res, int) else list(res), "frames": frames if spec["video"] else 1,
        "preset": preset_name, "weight_dtype": args.weight_dtype, "checkpointing": use_gc,
        "blocks": args.blocks if args.blocks else "full", "width": args.width or "real", "device": str(device),
        "seconds": {"rollout": last["time_rollout"], "decode": last["time_decode"],
                    "reward": last["time_reward_model"], "update": last["time_update"]},
        "seconds_per_iteration": per_it, "model_evaluations": nfe[-1],
        "model_evaluations_rollout": int(last["nfe_rollout"]), "model_evaluations_update": int(last["nfe_train"]),
        "peak_bytes_measured": int(measured), "peak_bytes_predicted": int(predicted.peak),
        "peak_bytes_full_depth": int(full_pred.peak),
        "prediction_error": (predicted.peak - measured) / measured,
        "peak_bytes_reserved": reserved,
        "latent_shape": list(latent), "text_tokens": args.text_tokens, "lora_rank": args.lora_rank,
        "lora_params": predicted.details["lora_params"], "max_batch": cfg.max_batch,
        "max_train_batch": cfg.optim.max_train_batch, "steps": cfg.schedule.num_steps,
        "split_steps": list(cfg.schedule.split_steps), "group_size": cfg.schedule.group_size,
        "prompts_per_iteration": cfg.prompts_per_iteration, "iterations": cfg.iterations,
        "leaves": int(last["leaves"]), "edges_trained": int(last["edges_trained"]),
        "weights_by_dtype": {k: int(v) for k, v in weights.items()},
        "measured": measured_detail, "predicted": predicted.to_dict(), "full_depth": full_pred.to_dict(),
        "instrument": {"kind": ("CUDA caching allocator (max_memory_allocated / reserved) and mem_get_info"
                                if device.type == "cuda" else "the kernel's peak resident set size (VmHWM), reset "
                                "per phase"), "malloc_pinned": malloc_pinned(), "rounds": instrument.rounds},
        "transients": compare_transients(predicted, instrument.rounds),
        "seconds_build": t_build, "seconds_predict": t_predict,
        "stand_ins": {"vae": "TAESD decoder (random weights, 2.4 M params)", "reward": "colorfulness (weight-free)"},
    }
    return run


PHASES = ("rollout", "decode", "reward", "update", "metrics")


def compare_transients(predicted, rounds: list[dict]) -> dict:
    """Per phase: the predicted transient (the phase's peak less its resident terms, less what an earlier phase
    left alive for it: the reward's decoded leaves) against the measured one (the instrument's peak less the
    phase's baseline) of each iteration, and their relative error ``(predicted - measured) / measured``."""
    pred = predicted.to_dict()["phases"]
    # the decoded leaves are made in the decode and still alive when the reward starts: in the instrument's
    # baseline of the reward phase, and in the prediction's transient of both phases
    carried = {"reward": int(predicted.details["images"])}
    out = {}
    for name in PHASES:
        if name not in pred:
            continue
        p = int(pred[name].get("transient", 0)) - carried.get(name, 0)
        measured = [int(r[name]["transient"]) for r in rounds if name in r]
        out[name] = {"predicted": p, "measured": measured,
                     "error": [(p - m) / m if m > 0 else None for m in measured]}
    return out


TRANSIENT_FAMILIES = ("flux-dev", "sd35-medium", "wan21-1.3b")
#: a phase agrees when its predicted transient is within this share of the measured one, or within
#: TOLERANCE_BYTES (a phase that allocates almost nothing: the reward's colourfulness, a few hundred KiB)
TOLERANCE, TOLERANCE_BYTES = 0.15, 2 ** 20


def transients(args, device, cm, mprobe) -> dict:
    """The transient of every phase, predicted against measured, at iterations 1 and 2 (2: the steady state,
    AdamW's moments and the previous tree alive), for each family x checkpointing x training batch."""
    import copy
    families = args.family if args.family_given else list(TRANSIENT_FAMILIES)
    rows, runs = [], []
    for family in families:
        for ckpt in ("on", "off"):
            for tb in (int(v) for v in args.train_batches.split(",")):
                a = copy.copy(args)
                a.checkpointing, a.max_train_batch, a.max_batch = ckpt, tb, max(args.max_batch, tb)
                run = run_one(family, a, args.preset, device, cm, mprobe)
                runs.append(run)
                for phase, t in run["transients"].items():
                    steady = t["measured"][-1]
                    err = abs(t["predicted"] - steady)
                    rows.append({"family": family, "checkpointing": ckpt == "on", "max_train_batch": tb,
                                 "phase": phase, "predicted": t["predicted"], "measured": t["measured"],
                                 "error": t["error"][-1],
                                 "within": bool(err <= max(TOLERANCE * steady, TOLERANCE_BYTES))})
                print(f"{family} checkpointing {ckpt} train batch {tb}: " + ", ".join(
                    f"{r['phase']} {r['predicted'] / 2 ** 20:.1f}/{r['measured'][-1] / 2 ** 20:.1f} MiB"
                    for r in rows[-len(run['transients']):]), flush=True)
    return {"rows": rows, "runs": runs, "tolerance": TOLERANCE, "tolerance_bytes": TOLERANCE_BYTES,
            "malloc_pinned": malloc_pinned(), "instrument": runs[0]["instrument"]["kind"] if runs else None,
            "shape": {"resolution": args.resolution, "frames": args.frames, "steps": args.steps,
                      "group_size": args.group_size, "split_steps": args.split_steps, "text_tokens": args.text_tokens,
                      "lora_rank": args.lora_rank, "lora_targets": args.lora_targets, "blocks": args.blocks,
                      "iterations": args.iterations, "preset": args.preset}}


def transients_markdown(t: dict) -> str:
    """The table of :func:`transients` (MiB; steady state = iteration 2)."""
    lines = ["| family | checkpointing | train batch | phase | predicted MiB | measured MiB (it. 1 / 2) | error |",
             "|---|---|---|---|---|---|---|"]
    for r in t["rows"]:
        m = " / ".join(f"{v / 2 ** 20:.1f}" for v in r["measured"])
        err = f"{r['error']:+.1%}" if r["error"] is not None else "n/a"
        lines.append(f"| {r['family']} | {'on' if r['checkpointing'] else 'off'} | {r['max_train_batch']} | "
                     f"{r['phase']} | {r['predicted'] / 2 ** 20:.1f} | {m} | {err}{'' if r['within'] else ' (out)'} |")
    return "\n".join(lines)


def saved_breakdown(family: str, args, cm, mprobe, mp) -> dict:
    """Bytes saved for backward per block (checkpointing off), at the run's shape, on the measured model's twin."""
    from branchgrpo.lora import LoRAConfig
    spec = FAMILIES[family]
    latent = latent_shape(family, args.resolution or spec["resolution"], args.frames or spec.get("frames", 1))
    lora_cfg = LoRAConfig(rank=args.lora_rank, alpha=float(args.lora_rank), targets=tuple(args.lora_targets.split(",")))
    p = mprobe.probe_calls(mp, latent, lora_cfg, rollout_batch=1, train_batch=1, checkpointing=False,
                           text_tokens=args.text_tokens, guidance=spec["guidance"], count_saved=True)
    return {"per_block": p["saved_per_block"], "outside_blocks": p["saved_other"], "total": p["saved_total"],
            "train_batch": 1}


# ---------------------------------------------------------------------------------------------- table
TABLE_ROWS = [  # family, resolution, frames, max_batch, max_train_batch
    ("flux-dev", 512, 1, 8, 4), ("flux-dev", 1024, 1, 4, 2),
    ("sd35-large", 1024, 1, 4, 2), ("sd35-medium", 1024, 1, 8, 4),
    ("wan21-1.3b", (480, 832), 33, 4, 2), ("wan21-14b", (480, 832), 33, 2, 1),
]


#: true CFG of the shipped workflows (workflows/*.json: SD3.5 4.5, Wan 5; FLUX.1-dev is guidance-distilled)
TABLE_CFG = {"flux-dev": 1.0, "sd35-large": 4.5, "sd35-medium": 4.5, "wan21-14b": 5.0, "wan21-1.3b": 5.0}
#: the text encoders each family's stock loaders give (ComfyUI's own configs; fp16 as their usual files)
TEXT_ENCODERS = {"flux-dev": ("t5_config_xxl.json", "sd1_clip_config.json"),
                 "sd35-large": ("t5_config_xxl.json", "sd1_clip_config.json", "clip_config_bigg.json"),
                 "sd35-medium": ("t5_config_xxl.json", "sd1_clip_config.json", "clip_config_bigg.json"),
                 "wan21-14b": ("umt5_config_xxl.json",), "wan21-1.3b": ("umt5_config_xxl.json",)}


def text_encoder_bytes(family: str) -> int:
    """Bytes of the family's text encoders in fp16: ComfyUI's T5 / CLIP classes built on ``meta`` from the configs
    ComfyUI ships, their parameters counted."""
    import comfy.clip_model
    import comfy.ops
    import comfy.text_encoders.t5 as t5
    total = 0
    for name in TEXT_ENCODERS[family]:
        path = COMFY_DIR / "comfy" / "text_encoders" / name
        if not path.is_file():
            path = COMFY_DIR / "comfy" / name
        cfg = json.loads(path.read_text())
        cls = (lambda c: t5.T5(c, torch.float16, "meta", comfy.ops.manual_cast)) if name.startswith(("t5", "umt5")) \
            else (lambda c: comfy.clip_model.CLIPTextModel(c, torch.float16, "meta", comfy.ops.manual_cast))
        total += sum(p.numel() for p in cls(cfg).parameters()) * 2
    return total


def memory_table(args, cm, mprobe) -> list[dict]:
    """Every row sized at full depth (FakeTensorMode / meta) for a CUDA card: the paper's tree (20 steps, splits
    0,3,6,9, K=2, 16 leaves), ``--prompts`` prompts per iteration (1, as the shipped workflows), LoRA rank 32 on
    every Linear, T5 512 tokens, the shipped workflows' true CFG (SD3.5 4.5, Wan 5), the real VAE decoding one
    leaf per chunk, HPS-v2.1 scoring 16 images per chunk; text encoders, VAE and reward loaded only in their
    phase. ``needs``: the peak with the allocator's margin and the CUDA reserve (nodes.memory.required_bytes)."""
    from branchgrpo.lora import LoRAConfig
    from branchgrpo.memory import Phase, gib
    from branchgrpo.presets import preset
    rows = []
    hps = hps_sizes(16)
    vae_cache = {}
    for family, res, frames, mb, mtb in TABLE_ROWS:
        spec = FAMILIES[family]
        latent = latent_shape(family, res, frames)
        if spec["vae"] not in vae_cache:
            vae_cache[spec["vae"]] = real_vae(spec["vae"])
        for weight_dtype in ("bf16", "fp8"):
            full = build_model(family, weight_dtype, None, torch.device("cpu"), fake=True)
            for gc in (True, False):
                cfg = preset("branchgrpo")
                cfg.max_batch = mb
                cfg.optim.max_train_batch = mtb if gc else 1
                cfg.prompts_per_iteration = args.prompts
                vae_sizes = mprobe.vae_probe(vae_cache[spec["vae"]], latent, 1, kernel_device="cuda")
                lora_cfg = LoRAConfig(rank=32, alpha=32.0)
                t0 = time.perf_counter()
                run = mprobe.predict_memory(full, latent, cfg, lora_cfg, checkpointing=gc, num_prompts=args.prompts,
                                            text_tokens=512, guidance=spec["guidance"], vae_sizes=vae_sizes,
                                            reward_weights=hps["weights"], reward_chunk=hps["chunk"], device="cuda",
                                            cfg=TABLE_CFG[family])
                te = text_encoder_bytes(family)
                run.phases.insert(0, Phase("encode", {"text_encoders": te,
                                                      "conditioning": run.phases[0].components["conditioning"]}))
                need = mprobe.required_bytes(run, "cuda", mprobe.DEFAULT_MARGIN)
                row = {"family": family, "resolution": res if isinstance(res, int) else list(res),
                       "frames": frames, "weight_dtype": weight_dtype, "checkpointing": gc, "max_batch": mb,
                       "max_train_batch": cfg.optim.max_train_batch, "prompts_per_iteration": args.prompts,
                       "cfg": TABLE_CFG[family], "peak_bytes": run.peak, "needs_bytes": need,
                       "margin": mprobe.DEFAULT_MARGIN, "reserve_bytes": mprobe.reserve_bytes("cuda"),
                       "peak_phase": run.peak_phase, "fits_gb": [c for c in CARDS if need <= c * 2 ** 30],
                       "phases": run.to_dict()["phases"], "lora_params": run.details["lora_params"],
                       "seconds_to_size": time.perf_counter() - t0}
                rows.append(row)
                print(f"{family:12s} {str(res):12s} {weight_dtype:5s} gc={'on ' if gc else 'off'} "
                      f"peak {gib(run.peak):7.2f} GiB ({run.peak_phase}), needs {gib(need):7.2f} GiB, fits "
                      f"{row['fits_gb']}", flush=True)
    return rows


CARDS = (24, 48, 80)


def table_markdown(rows: list[dict]) -> str:
    """The README's memory table (:func:`bench.tables.memory_table`)."""
    from bench.tables import memory_table
    return memory_table(rows)


# ---------------------------------------------------------------------------------------------- ratios
def ratios(args, device, cm, mprobe) -> dict:
    """Seconds per iteration of the ratio presets side by side on one model (iterations interleaved)."""
    family = args.family[0]
    blocks = None if args.blocks == 0 else args.blocks
    mp = build_model(family, args.weight_dtype, blocks, device)
    per: dict[str, list] = {p: [] for p in args.presets}
    runs: dict[str, dict] = {}
    for rnd in range(args.rounds):
        order = args.presets if rnd % 2 == 0 else tuple(reversed(args.presets))
        for name in order:
            r = run_one(family, args, name, device, cm, mprobe, model=mp)
            per[name].append(statistics.median(r["seconds_per_iteration"][1:] or r["seconds_per_iteration"]))
            runs.setdefault(name, r)
            runs[name]["rounds_seconds"] = per[name]
            print(f"  {name:18s} round {rnd}: {per[name][-1]:.2f} s/it  NFE {r['model_evaluations']}", flush=True)
    base = statistics.mean(per[args.presets[0]])
    table = {name: {"seconds_per_iteration": statistics.mean(v), "ratio": statistics.mean(v) / base,
                    "model_evaluations": runs[name]["model_evaluations"],
                    "model_evaluations_rollout": runs[name]["model_evaluations_rollout"],
                    "model_evaluations_update": runs[name]["model_evaluations_update"],
                    "peak_bytes_measured": runs[name]["peak_bytes_measured"],
                    "peak_bytes_predicted": runs[name]["peak_bytes_predicted"]} for name, v in per.items()}
    return {"family": family, "blocks": args.blocks or "full", "width": args.width or "real",
            "resolution": args.resolution, "steps": args.steps,
            "device": str(device), "presets": table, "runs": list(runs.values())}


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", action="append", choices=sorted(FAMILIES),
                    help="model family (repeatable; default flux-dev)")
    ap.add_argument("--resolution", type=parse_resolution, default=None,
                    help="pixels: N (square) or HxW (default: the family's: 1024, Wan 480x832)")
    ap.add_argument("--frames", type=int, default=None, help="video frames (Wan; default 33)")
    ap.add_argument("--preset", default="branchgrpo", help="training preset (branchgrpo.presets)")
    ap.add_argument("--weight-dtype", choices=("bf16", "fp8", "fp32"), default="bf16",
                    help="base weights: bf16, or fp8 e4m3fn computed in bf16")
    ap.add_argument("--checkpointing", choices=("on", "off"), default="on", help="gradient checkpointing")
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--lora-targets", default="*", help="comma-separated globs of the Linear layers to adapt")
    ap.add_argument("--steps", type=int, default=0, help="sampling steps (0: the preset's; splits are rescaled)")
    ap.add_argument("--split-steps", default=None, help="override the split steps, e.g. '0' or '' for none")
    ap.add_argument("--group-size", type=int, default=0, help="override the group size (roots per prompt)")
    ap.add_argument("--blocks", type=int, default=1, help="blocks kept per block list (0 = full depth)")
    ap.add_argument("--width", type=int, default=0,
                    help="channels of the model (0: the family's real width); a narrow smoke shape of FLUX / Wan")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=1, help="prompts (trees) per iteration")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-train-batch", type=int, default=4)
    ap.add_argument("--text-tokens", type=int, default=512, help="text tokens of the conditioning (T5: 512)")
    ap.add_argument("--saved", action="store_true", help="also count the bytes saved for backward per block")
    ap.add_argument("--table", action="store_true", help="size the README memory table (full depth, no arithmetic)")
    ap.add_argument("--plain-checkpoint-saves", action="store_true",
                    help="experiment: size the table with nodes.comfy_model's copy-on-save hook inside checkpointed "
                         "blocks turned off (what checkpointing gives when the graph keeps no copies)")
    ap.add_argument("--ratios", action="store_true", help="seconds per iteration of --presets side by side")
    ap.add_argument("--presets", default=",".join(RATIO_PRESETS), help="presets for --ratios")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of --ratios (presets interleaved)")
    ap.add_argument("--transients", action="store_true",
                    help="each phase's transient, predicted against measured (bench.instrument), for --family (default "
                         "FLUX.1-dev, SD3.5 Medium, Wan 2.1 1.3B) x checkpointing on/off x --train-batches")
    ap.add_argument("--plant-update-mib", type=int, default=0,
                    help="(a test of the instrument) keep a tensor of this many MiB alive through each update")
    ap.add_argument("--train-batches", default="4,16", help="max_train_batch values for --transients")
    ap.add_argument("--out", default=None, help="write the results as JSON")
    return ap


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    args.family_given = bool(args.family)
    if args.device == "cpu" and not args.ratios and not args.table and argv is None:
        reexec_pinned()  # the kernel's peak counter follows what is alive only with glibc's thresholds pinned
    args.family = args.family or ["flux-dev"]
    args.presets = tuple(p.strip() for p in args.presets.split(",") if p.strip())
    if args.width:
        for family in args.family:
            FAMILIES[family] = dict(FAMILIES[family], unet=narrowed(family, args.width))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    cm, mprobe = import_comfy(cpu=device.type == "cpu")
    torch.manual_seed(0)
    result: dict = {"runs": []}
    if args.plain_checkpoint_saves:
        cm._OutOfPlaceOnBlockInputs.saved_tensor_hooks = lambda self: contextlib.nullcontext()
    if args.table:
        rows = memory_table(args, cm, mprobe)
        result["table"] = rows
        result["table_markdown"] = table_markdown(rows)
        print(result["table_markdown"])
    elif args.transients:
        result["transients"] = transients(args, device, cm, mprobe)
        result["runs"] = result["transients"].pop("runs")
        print(transients_markdown(result["transients"]))
    elif args.ratios:
        result["ratios"] = ratios(args, device, cm, mprobe)
        result["runs"] = result["ratios"].pop("runs")
        for name, r in result["ratios"]["presets"].items():
            print(f"{name:18s} {r['seconds_per_iteration']:8.2f} s/it  x{r['ratio']:.2f}  NFE {r['model_evaluations']}")
    else:
        for family in args.family:
            r = run_one(family, args, args.preset, device, cm, mprobe)
            if args.saved:
                mp = build_model(family, args.weight_dtype, None if args.blocks == 0 else args.blocks, device,
                                 fake=True)
                r["saved_for_backward"] = saved_breakdown(family, args, cm, mprobe, mp)
            result["runs"].append(r)
            print(json.dumps({k: r[k] for k in ("family", "resolution", "frames", "preset", "weight_dtype",
                                                 "checkpointing", "blocks", "device", "seconds", "model_evaluations",
                                                 "peak_bytes_measured", "peak_bytes_predicted",
                                                 "peak_bytes_full_depth", "prediction_error")}), flush=True)
    if args.out:
        from branchgrpo.fileio import atomic_write
        text = json.dumps(result, indent=1, default=str)
        atomic_write(args.out, lambda fh: fh.write(text.encode()))
    return result


if __name__ == "__main__":
    main()
