"""The Trainer node's path against the engine's, side by side on the CPU demo model.

    .venv/bin/python -m bench.node_vs_engine                       # 8 iterations each, interleaved
    .venv/bin/python -m bench.node_vs_engine --iterations 4 --out node_vs_engine.json

Both train the same LoRA (same seed, rank, targets) on the same weights (``demo/tiny_t2i.safetensors``) with
the CPU demo's settings (4 prompts per iteration, a 10-step tree forking at steps 0, 2, 4, 6, the colourfulness
reward, learning rate 1e-3):

* engine: :class:`branchgrpo.models.toy_dit.ToyVelocityModel` over the ToyDiT, the LoRA attached by hooks;
* node: what the Trainer node runs: the Demo Model Loader's ModelPatcher in ComfyUI (imported in this process),
  the LoRA through weight wrappers, :class:`nodes.comfy_model.ComfyFlowModel` calling
  ``comfy.samplers.sampling_function``.

With ``--per-prompt`` a third run is the node path with one model call per prompt (the grouping used when
conds cannot be concatenated; how every step ran before batching). Iterations alternate their order (engine,
node, ..., then the reverse) so machine noise hits all alike. Reported: seconds
per iteration (median, the first iteration of each left out as warm-up), their ratio node / engine, model
calls (forward calls of the diffusion model) per iteration in the rollout and in the update, and the largest
difference of the mean rewards between the two paths (the same tree, so ~0 up to float rounding).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import statistics
import sys
import time

import torch

from bench.sandbox import COMFY_DIR, PACK, import_comfy  # noqa: F401 (the tests' entry points)
from branchgrpo.trainer import Callback

PROMPTS = ["red circle", "green square", "blue triangle", "yellow ring"]


class CallCounter:
    """Counts forward calls of a module, split at :meth:`mark` into phases."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self._pre)

    def _pre(self, module, args):
        self.calls += 1

    def take(self) -> int:
        n, self.calls = self.calls, 0
        return n


def demo_config(iterations: int, prompts: int):
    from branchgrpo.loss import OptimConfig
    from branchgrpo.schedule import BranchSchedule
    from branchgrpo.trainer import TrainerConfig
    schedule = BranchSchedule(num_steps=10, split_steps=(0, 2, 4, 6), branching=2, split_noise_scale=4.0,
                              sde="dancegrpo", eta=0.3, shift=3.0)
    return TrainerConfig(schedule=schedule, optim=OptimConfig(learning_rate=1e-3, clip_range=1e-3,
                                                              max_grad_norm=1.0, max_train_batch=16),
                         iterations=iterations, prompts_per_iteration=prompts, seed=0, max_batch=64)


class _Phase(Callback):
    """Model calls per iteration, split at the end of the rollout."""

    def __init__(self, counter: CallCounter):
        self.counter, self.rollout, self.update = counter, [], []

    def on_rollout_end(self, iteration, tree, leaf_rewards, images):
        self.rollout.append(self.counter.take())

    def on_iteration_end(self, iteration, metrics):
        self.update.append(self.counter.take())


def build_runs(iterations: int, n_prompts: int = 4, rank: int = 8, per_prompt: bool = False) -> dict:
    """``{name: (trainer, phase counter, context or None)}`` on the demo weights: ``engine``, ``node`` and, with
    ``per_prompt``, ``node_per_prompt`` (the node path with one model call per prompt, as before batching)."""
    from branchgrpo.lora import LoRAConfig
    from branchgrpo.peft_adapter import PeftAdapter
    from branchgrpo.models.toy_dit import ToyDiT, ToyDiTConfig, ToyVelocityModel
    from branchgrpo.rewards.weight_free import Colorfulness
    from branchgrpo.trainer import BranchGRPOTrainer

    demo = importlib.import_module(f"{PACK}.nodes.demo_model")
    cm = importlib.import_module(f"{PACK}.nodes.comfy_model")
    prompts = PROMPTS[:n_prompts]
    lora_cfg = LoRAConfig(rank=rank, alpha=float(rank), targets=("*attn*", "*mlp*"))
    config = demo_config(iterations, n_prompts)
    reward = Colorfulness()
    runs = {}

    # engine
    sd, meta = demo.read_demo_file()
    net = ToyDiT(ToyDiTConfig.from_dict(json.loads(meta["model_config"])))
    net.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    net.requires_grad_(False)
    engine_model = ToyVelocityModel(net, tuple(json.loads(meta["class_names"])))
    lora_e = PeftAdapter(net, lora_cfg, seed=0)
    phase = _Phase(CallCounter(net))
    runs["engine"] = (BranchGRPOTrainer(engine_model, lora_e, prompts, [reward], engine_model.decode, config,
                                        engine_model.latent_shape, callbacks=[phase]), phase, None)

    class PerPrompt(cm.ComfyFlowModel):
        def _buckets(self, prompts):
            return [[i] for i in range(len(prompts))]

    # node (what nodes/trainer.py does)
    for name, cls in (("node", cm.ComfyFlowModel), ("node_per_prompt", PerPrompt)):
        if name == "node_per_prompt" and not per_prompt:
            continue
        mp, names = demo.build_demo_model()
        size = mp.model.diffusion_model.config.img_size
        latent_shape = (3, size, size)
        with torch.inference_mode(False):
            mpl, lora_n = cm.attach_lora(mp, lora_cfg, seed=0, device=mp.load_device)
        flow = cls(mpl, latent_shape, clip=demo.DemoTextEncoder(names), guidance=3.5, seed=0)
        flow.add_prompts(prompts)
        vae = demo.DemoVAE(size)
        phase = _Phase(CallCounter(mp.model.diffusion_model))
        trainer = BranchGRPOTrainer(flow, lora_n, prompts, [reward],
                                    lambda x0, flow=flow, vae=vae: vae.decode(flow.to_vae_latent(x0)),
                                    config, latent_shape, device=mp.load_device, callbacks=[phase])

        @contextlib.contextmanager
        def context(flow=flow, mpl=mpl):
            with flow.session(config.max_batch), cm.gradient_checkpointing(mpl, False):
                yield

        runs[name] = (trainer, phase, context)
    return runs


def run(iterations: int = 8, n_prompts: int = 4, threads: int | None = None, per_prompt: bool = False) -> dict:
    import_comfy()
    if threads:
        torch.set_num_threads(threads)
    runs = build_runs(iterations, n_prompts, per_prompt=per_prompt)
    seconds = {k: [] for k in runs}
    with torch.inference_mode(False), torch.enable_grad(), contextlib.ExitStack() as stack:
        for _, _, context in runs.values():
            if context is not None:
                stack.enter_context(context())
        names = list(runs)
        for i in range(iterations):
            for name in (names if i % 2 == 0 else names[::-1]):  # alternate the order: noise hits all alike
                t0 = time.perf_counter()
                runs[name][0].step()
                seconds[name].append(time.perf_counter() - t0)
    timed = slice(1, None) if iterations > 1 else slice(None)
    med = {k: statistics.median(v[timed]) for k, v in seconds.items()}
    rewards = {k: [h["reward_mean"] for h in r[0].history] for k, r in runs.items()}
    return {
        "model": "demo/tiny_t2i.safetensors", "prompts_per_iteration": n_prompts, "iterations": iterations,
        "threads": torch.get_num_threads(),
        "seconds_per_iteration": {k: round(v, 4) for k, v in med.items()},
        "seconds_all": {k: [round(s, 4) for s in v] for k, v in seconds.items()},
        "ratio_to_engine": {k: round(med[k] / med["engine"], 3) for k in runs},
        "ratio_node_to_engine": round(med["node"] / med["engine"], 3),
        "model_calls_rollout": {k: r[1].rollout for k, r in runs.items()},
        "model_calls_update": {k: r[1].update for k, r in runs.items()},
        "model_evaluations": {k: [int(h["nfe_rollout"]) + int(h.get("nfe_train", 0)) for h in r[0].history]
                              for k, r in runs.items()},
        "reward_mean": rewards,
        "reward_max_abs_diff": max(abs(a - b) for k in runs for a, b in zip(rewards["engine"], rewards[k])),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=4, help="prompts (trees) per iteration, at most 4")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--per-prompt", action="store_true",
                    help="also run the node path with one model call per prompt (as before batching)")
    ap.add_argument("--out", default="", help="also write the result as JSON here")
    args = ap.parse_args(argv)
    if not 1 <= args.prompts <= len(PROMPTS):
        ap.error(f"--prompts must be 1..{len(PROMPTS)}")
    res = run(args.iterations, args.prompts, args.threads or None, per_prompt=args.per_prompt)
    s = res["seconds_per_iteration"]
    print("seconds per iteration (median): " + "  ".join(f"{k} {v:.3f}" for k, v in s.items()))
    print("ratio to engine: " + "  ".join(f"{k} {v:.3f}" for k, v in res["ratio_to_engine"].items()))
    for phase in ("rollout", "update"):
        c = res[f"model_calls_{phase}"]
        print(f"model calls per iteration, {phase}: " + "  ".join(f"{k} {v}" for k, v in c.items()))
    print(f"largest |reward_mean(engine) - reward_mean(node)|: {res['reward_max_abs_diff']:.2e}")
    if args.out:
        from branchgrpo.fileio import write_text_atomic
        write_text_atomic(args.out, json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
