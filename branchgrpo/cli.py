"""Headless training from a config file: ``python -m branchgrpo train CONFIG``.

::

    python -m branchgrpo train run.toml                       # one process (one GPU, or the CPU)
    torchrun --nproc_per_node 8 -m branchgrpo train run.toml  # 8 processes: NCCL on GPUs, gloo on CPU
    python -m branchgrpo train --print-default-config > run.toml   # the commented template
    python -m branchgrpo train run.toml --check               # validate the config only
    python -m branchgrpo train run.toml --set training.iterations=50 --set optim.learning_rate=2e-4

The run uses the same engine as the ComfyUI nodes (:class:`~branchgrpo.trainer.BranchGRPOTrainer`), the
same checkpoint format (``BranchGRPOTrainer.save_checkpoint``) and the same LoRA key format (ComfyUI's); the
adapter (``lora.algorithm``: LoRA, LoHa, LoKr, OFT, DoRA) is ``peft``'s (:mod:`branchgrpo.peft_adapter`).
Under ``torchrun`` the prompts of an iteration are dealt round-robin to the ranks, each prompt's whole
tree on one rank (:class:`~branchgrpo.distributed.TorchDistributed`); only rank 0 writes files. With
``model.fsdp = true`` the transformer's weights are sharded over the ranks (FSDP2 ``fully_shard``).

Run folder ``<run.output_dir>/<run.name>/``: ``checkpoint.pt`` (every ``training.checkpoint_every``
iterations and at the end), ``metrics.jsonl`` (one JSON object per iteration), ``tensorboard/`` (when
tensorboard is installed), ``config.toml`` (the resolved config) and the LoRA (or ``run.lora_file``).
A rerun of the same config continues from the checkpoint (``run.resume = "auto"``) exactly as an
uninterrupted run would.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

log = logging.getLogger("branchgrpo")

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}
_PATH_ARGS = ("checkpoint", "model", "processor", "clip", "med_config", "vocab")


# ------------------------------------------------------------------------------------------ helpers
def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def world_from_env() -> tuple[int, int, int]:
    """``(world_size, rank, local_rank)`` as torchrun sets them (1, 0, 0 otherwise)."""
    return _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)


def resolve_device(name: str, local_rank: int):
    import torch
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def resolve_dtype(name: str, device):
    import torch
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, _DTYPES[name])


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        return True
    except Exception:  # ImportError, or a broken install
        return False


def check_distributed(cfg, world_size: int) -> None:
    """Distributed constraints, checked before anything is loaded."""
    from .config_file import ConfigError
    t = cfg.trainer
    if world_size > 1 and t.prompts_per_iteration < world_size:
        raise ConfigError("training.prompts_per_iteration",
                          f"{t.prompts_per_iteration} trees per iteration for {world_size} processes leaves some "
                          f"ranks idle; use at least {world_size} (a multiple of {world_size} balances the ranks)")
    if world_size > 1 and t.optim.edges_per_step:
        raise ConfigError("optim.edges_per_step", "must be 0 (one optimizer step per iteration) in a distributed "
                                                  "run, so every rank takes the same optimizer steps")
    if cfg.model.fsdp:
        if world_size < 2:
            raise ConfigError("model.fsdp", "FSDP shards the transformer over processes: launch with torchrun "
                                            "--nproc_per_node N (N >= 2), or set model.fsdp = false")
        if t.prompts_per_iteration % world_size:
            raise ConfigError("training.prompts_per_iteration",
                              f"with model.fsdp every rank must run the same model calls: use a multiple of the "
                              f"{world_size} processes (got {t.prompts_per_iteration})")
        if t.pruning.width_mode != "off":
            raise ConfigError("pruning.width_mode", "width pruning keeps a different number of parents per tree, "
                                                    "so FSDP ranks would run different numbers of model calls; use "
                                                    "'off' with model.fsdp")
        if t.pruning.timestep_fraction < 1.0:
            raise ConfigError("pruning.timestep_fraction", "a random step subset per tree makes FSDP ranks run "
                                                           "different numbers of model calls; use 1.0 with model.fsdp")
    if cfg.run.tensorboard == "on" and not _tensorboard_available():
        raise ConfigError("run.tensorboard", "'on' but the tensorboard package is not installed (pip install "
                                             "tensorboard), or set it to 'auto' / 'off'")


def build_rewards(cfg, device) -> list:
    """The configured rewards through the rewards registry (model rewards load from local files only)."""
    import torch

    from .config_file import ConfigError
    from .rewards.registry import MODEL_REWARDS, make_reward
    out = []
    for i, entry in enumerate(cfg.rewards):
        args = dict(entry.args)
        if entry.name in MODEL_REWARDS:
            for key in _PATH_ARGS:
                if isinstance(args.get(key), str) and args[key] and not args[key].startswith("hf:"):
                    args[key] = cfg.path(args[key])
            if isinstance(args.get("search_dirs"), list):
                args["search_dirs"] = [cfg.path(d) for d in args["search_dirs"]]
            if isinstance(args.get("dtype"), str):
                if args["dtype"] not in _DTYPES:
                    raise ConfigError(f"rewards[{i}].args.dtype", f"must be one of {', '.join(_DTYPES)}")
                args["dtype"] = getattr(torch, _DTYPES[args["dtype"]])
            args.setdefault("device", device)
        try:
            reward = make_reward(entry.name, **args)
        except TypeError as e:
            raise ConfigError(f"rewards[{i}].args", f"{entry.name}: {e}") from None
        except (OSError, ValueError, RuntimeError) as e:
            raise ConfigError(f"rewards[{i}]", f"{entry.name} could not be loaded: {e}") from None
        out.append(reward)
    return out


# ---------------------------------------------------------------------------------------- callbacks
def _make_callbacks(cfg, trainer_start: int, is_main: bool):
    from .trainer import Callback

    class JsonlMetrics(Callback):
        def __init__(self, path: str, start: int):
            self.path = path
            # A resumed run continues the file from its checkpoint: rows of iterations done after the
            # checkpoint (by a run that stopped before its next checkpoint) are dropped, as is a fresh
            # run's old file.
            keep = []
            if start > 0 and os.path.isfile(path):
                with open(path, encoding="utf-8") as fh:
                    for line in fh:
                        try:
                            if int(json.loads(line).get("iteration", 0)) <= start:
                                keep.append(line if line.endswith("\n") else line + "\n")
                        except (ValueError, TypeError, AttributeError):
                            continue
            with open(path, "w", encoding="utf-8") as fh:
                fh.writelines(keep)

        def on_iteration_end(self, iteration, metrics):
            row = {k: (float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else None)
                   for k, v in metrics.items()}
            row["iteration"] = int(iteration)
            row["wall_time"] = time.time()
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")

    class TensorBoard(Callback):
        def __init__(self, folder: str, start: int):
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(folder, purge_step=start + 1 if start > 0 else None)

        def on_iteration_end(self, iteration, metrics):
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(float(v)):
                    self.writer.add_scalar(k, float(v), int(iteration))
            self.writer.flush()

    class Progress(Callback):
        def __init__(self, total: int, start: int, name: str):
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=start, desc=name, unit="it", dynamic_ncols=True)
            self.phase = ""

        def on_model_call(self, phase, done, total):
            if phase != self.phase:
                self.phase = phase
                self.bar.set_description_str(f"{cfg.run.name} [{phase}]")

        def on_iteration_end(self, iteration, metrics):
            self.bar.update(iteration - self.bar.n)
            self.bar.set_postfix(reward=f"{metrics['reward_mean']:.4f}", loss=f"{metrics.get('loss', 0):.3g}",
                                 refresh=True)

    cbs = []
    if is_main:
        cbs.append(JsonlMetrics(os.path.join(cfg.run_dir, "metrics.jsonl"), trainer_start))
        if cfg.run.tensorboard != "off" and _tensorboard_available():
            cbs.append(TensorBoard(os.path.join(cfg.run_dir, "tensorboard"), trainer_start))
        if cfg.run.progress:
            cbs.append(Progress(cfg.trainer.iterations, trainer_start, cfg.run.name))
    return cbs


# ----------------------------------------------------------------------------------------- training
def _check_resume(cfg, state: dict, lora, source: str) -> None:
    from .config_file import ConfigError
    from .trainer import TrainerConfig
    saved = TrainerConfig.from_dict(json.loads(state["config"])).to_dict()
    current = cfg.trainer.to_dict()
    ignore = {"iterations", *TrainerConfig.MONITORING_FIELDS}  # monitoring never changes what is trained
    diff = []
    for key in sorted(set(saved) | set(current)):
        if key in ignore or saved.get(key) == current.get(key):
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diff += [f"{key}.{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(set(a) | set(b))
                     if a.get(k) != b.get(k)]
        else:
            diff.append(f"{key}: checkpoint {a!r}, now {b!r}")
    if diff:
        raise ConfigError("run.resume", f"the checkpoint {source} was made with different settings ("
                                        f"{'; '.join(diff)}); restore them, set run.resume = 'never' to start "
                                        "over, or choose another run.name")
    mine = {k: tuple(v.shape) for k, v in lora.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state["adapter"].items()}
    if mine != theirs:
        raise ConfigError("run.resume", f"the checkpoint {source} holds another adapter ({len(theirs)} tensors, "
                                        f"e.g. a ComfyUI-node run, or another lora.algorithm/targets/rank) than "
                                        f"this config ({len(mine)}); set run.resume = 'never' or choose another run.name")


def lora_metadata(cfg, family: str, iteration: int, latent_shape) -> dict[str, str]:
    return {
        "branchgrpo.method": "BranchGRPO", "branchgrpo.format": "comfyui-lora", "branchgrpo.source": "diffusers",
        "branchgrpo.config": json.dumps(cfg.trainer.to_dict()), "branchgrpo.base_model": family,
        "branchgrpo.iterations": str(iteration), "branchgrpo.run_name": cfg.run.name,
        "branchgrpo.lora": json.dumps({"algorithm": cfg.lora.algorithm, "rank": cfg.lora.rank,
                                       "alpha": cfg.lora.alpha, "targets": list(cfg.lora.targets),
                                       "exclude": list(cfg.lora.exclude)}),
        "branchgrpo.reward": ",".join(r.name for r in cfg.rewards),
        "branchgrpo.latent_shape": json.dumps(list(latent_shape)),
    }


def train(cfg, *, resume_from: str | None = None, stop_after: int | None = None) -> dict[str, Any]:
    """Run the whole training of ``cfg`` (a :class:`~branchgrpo.config_file.RunConfig`). Returns a summary.

    The steps of the Trainer node, on a diffusers model: check what needs no compute (the processes, the device,
    the family), load the session (pipeline, model, adapter, rewards, prompts encoded), resume, train with the
    checkpoint and the LoRA written together, report."""
    _offline()
    world, _, local_rank = world_from_env()
    check_distributed(cfg, world)
    device, dtype, family = resolve_run(cfg, local_rank)
    with process_group(world, device) as dist:
        session = load_session(cfg, family, device, dtype)
        trainer, resumed_from, source = start_trainer(cfg, session, dist, resume_from)
        if dist.is_main():  # everything loaded and checked: the run folder comes into being
            write_run_folder(cfg, session, world, resumed_from if source else None)
        trainer.callbacks.extend(_make_callbacks(cfg, trainer.iteration, dist.is_main()))
        until = cfg.trainer.iterations if stop_after is None else min(cfg.trainer.iterations, stop_after)
        trainer.train(cfg.checkpoint_path, until, on_save=lambda: save_lora(cfg, session, trainer, dist))
        for cb in trainer.callbacks:
            bar = getattr(cb, "bar", None)
            if bar is not None:
                bar.close()
        return {"run_dir": cfg.run_dir, "lora": cfg.lora_path, "checkpoint": cfg.checkpoint_path, "family": family,
                "iterations": trainer.iteration, "resumed_from": resumed_from, "history": trainer.history,
                "latent_shape": tuple(session.model.latent_shape), "world_size": world}


def resolve_run(cfg, local_rank: int):
    """``(device, dtype, family)`` of the run: checked without loading anything."""
    from .config_file import ConfigError
    from .models import diffusers_adapter as da
    da.quiet_libraries()
    device = resolve_device(cfg.run.device, local_rank)
    dtype = resolve_dtype(cfg.run.dtype, device)
    try:
        family = cfg.model.family if cfg.model.family != "auto" else da.detect_family(cfg.path(cfg.model.path))
    except da.ModelConfigError as e:
        raise ConfigError(e.field, str(e).split(": ", 1)[-1]) from None
    return device, dtype, family


@contextlib.contextmanager
def process_group(world: int, device):
    """The run's :mod:`branchgrpo.distributed` backend: one process, or ``torchrun``'s group (started here if no
    one did, and ended after)."""
    import torch

    from .distributed import SingleProcess, TorchDistributed
    if world <= 1:
        yield SingleProcess()
        return
    import torch.distributed as tdist
    started = False
    if not tdist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        started = True
    try:
        yield TorchDistributed(device=device if tdist.get_backend() == "nccl" else torch.device("cpu"))
    finally:
        if started:
            tdist.destroy_process_group()


@dataclass
class Session:
    """What a run holds while it trains: the family, the velocity model over the pipeline, the adapter, the
    rewards, and how long loading took."""
    family: str
    model: Any
    lora: Any
    rewards: list
    device: Any
    dtype: Any
    load_seconds: float


def load_session(cfg, family: str, device, dtype) -> Session:
    """Load the pipeline, attach the adapter, encode every prompt once (and release the text encoders if asked)."""
    import torch

    from .config_file import ConfigError
    from .lora import LoRAConfig, select_linear
    from .models import diffusers_adapter as da
    from .peft_adapter import AdapterError, PeftAdapter
    rewards = build_rewards(cfg, device)
    t0 = time.perf_counter()
    try:
        te_files = {k: cfg.path(v) for k, v in cfg.model.text_encoder_files.items()}
        pipe = da.load_pipeline(family, cfg.path(cfg.model.path), transformer_file=cfg.path(cfg.model.transformer_file),
                                vae_file=cfg.path(cfg.model.vae_file), text_encoder_files=te_files, dtype=dtype)
    except da.ModelConfigError as e:
        raise ConfigError(e.field, str(e).split(": ", 1)[-1]) from None
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        m = getattr(pipe, name, None)
        if isinstance(m, torch.nn.Module):
            m.requires_grad_(False).eval()
    transformer = pipe.transformer
    transformer.eval()
    transformer.requires_grad_(False)
    try:
        model = da.DiffusersFlowModel(
            pipe, family, width=cfg.model.width, height=cfg.model.height, frames=cfg.model.frames,
            guidance=cfg.model.guidance, cfg_scale=cfg.model.cfg_scale, negative_prompt=cfg.model.negative_prompt,
            max_sequence_length=cfg.model.max_sequence_length, device=device, dtype=dtype,
            move_transformer=not cfg.model.fsdp)
    except da.ModelConfigError as e:
        raise ConfigError(e.field, str(e).split(": ", 1)[-1]) from None
    lcfg = LoRAConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=tuple(cfg.lora.targets),
                      exclude=tuple(cfg.lora.exclude))
    layout = da.comfy_layout(transformer, family)
    unmapped = [n for n, _ in select_linear(transformer, lcfg) if n not in layout[0]]
    if unmapped:
        raise ConfigError("lora.targets", f"{len(unmapped)} adapted module(s) have no ComfyUI equivalent, so the "
                                          f"adapter could not load in ComfyUI: {unmapped[:6]}; exclude them "
                                          "(lora.exclude) or narrow lora.targets")
    try:
        lora = PeftAdapter(transformer, lcfg, cfg.lora.algorithm, seed=cfg.trainer.seed, dtype=torch.float32,
                           layout=layout)
    except AdapterError as e:
        raise ConfigError(f"lora.{e.field}", str(e)) from None
    lora.to(device)
    if cfg.model.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if cfg.model.fsdp:
        da.shard_transformer(transformer, device, ignored=set(lora.parameters()))
    model.precompute(cfg.prompts)
    if cfg.model.release_text_encoders:
        model.release_text_encoders()
    return Session(family, model, lora, rewards, device, dtype, time.perf_counter() - t0)


def start_trainer(cfg, session: Session, dist, resume_from: str | None):
    """The trainer, resumed from ``resume_from`` or the run's own checkpoint (``run.resume = "auto"``), checked
    against this config first. Returns ``(trainer, iteration it starts at, the checkpoint resumed or None)``."""
    import torch

    from .config_file import ConfigError
    from .trainer import BranchGRPOTrainer
    model = session.model
    trainer = BranchGRPOTrainer(model, session.lora, cfg.prompts, session.rewards, model.decode, cfg.trainer,
                                model.latent_shape, device=session.device,
                                dtype=None if session.dtype == torch.float32 else session.dtype, dist=dist)
    ckpt = cfg.checkpoint_path
    source = resume_from or (ckpt if cfg.run.resume == "auto" and os.path.isfile(ckpt) else None)
    if source:
        if not os.path.isfile(source):
            raise ConfigError("--resume", f"{source} does not exist")
        state = torch.load(source, map_location="cpu", weights_only=True)
        _check_resume(cfg, state, session.lora, source)
        trainer.load_state_dict(state)
    return trainer, trainer.iteration, source


def write_run_folder(cfg, session: Session, world: int, resumed_at: int | None) -> None:
    """The run folder with its resolved config, and the run's one-line announcement."""
    from .config_file import dump_config, write_text_atomic
    from .models import diffusers_adapter as da
    os.makedirs(cfg.run_dir, exist_ok=True)
    write_text_atomic(os.path.join(cfg.run_dir, "config.toml"),
                      dump_config(cfg, docs=False, header=f"Resolved config of run {cfg.run.name}"))
    mode = f"{world} processes ({'FSDP' if cfg.model.fsdp else 'replicated'})" if world > 1 else "1 process"
    lora = session.lora
    log.info("BranchGRPO %s: %s on %s %s, %s, latent %s, %s %d modules (%s params), %d prompts, "
             "%d iterations%s; loaded in %.1fs", cfg.run.name, session.family, session.device,
             str(session.dtype).split(".")[-1], mode, tuple(session.model.latent_shape), cfg.lora.algorithm,
             len(lora.names), da.human_count(lora.num_parameters()), len(cfg.prompts), cfg.trainer.iterations,
             f", resuming at {resumed_at}" if resumed_at is not None else "", session.load_seconds)


def save_lora(cfg, session: Session, trainer, dist) -> None:
    """The LoRA file beside each checkpoint (the main process writes it)."""
    from .lora import save_state_dict
    # DoRA's / OFT's conversion reads the base weights: with FSDP every rank gathers them
    sd = session.lora.comfy_state_dict() if dist.is_main() or cfg.model.fsdp else None
    if dist.is_main():
        save_state_dict(cfg.lora_path, sd, lora_metadata(cfg, session.family, trainer.iteration,
                                                         session.model.latent_shape))


# ------------------------------------------------------------------------------------------ command
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m branchgrpo",
                                description="BranchGRPO headless training (the engine of ComfyUI-BranchGRPO).")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a LoRA from a TOML run config",
                       description="Train a LoRA with BranchGRPO from a TOML run config. Under torchrun every "
                                   "process runs this same command.")
    t.add_argument("config", nargs="?", help="the run config (.toml)")
    t.add_argument("--print-default-config", action="store_true",
                   help="print a commented template with every field documented, and exit")
    t.add_argument("--preset", default="branchgrpo", help="preset of the printed template (default: branchgrpo)")
    t.add_argument("--family", default="flux", choices=["flux", "sd3", "wan"], help="model family of the template")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field (TOML value), e.g. --set training.iterations=10; repeatable")
    t.add_argument("--resume", metavar="CHECKPOINT", help="resume from this checkpoint file (default: the run "
                                                          "folder's checkpoint.pt when run.resume = 'auto')")
    t.add_argument("--stop-after", type=int, metavar="N", help="stop (with a checkpoint) once N iterations are "
                                                               "done; a later run continues")
    t.add_argument("--check", action="store_true", help="validate the config and exit")
    t.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return p


def _offline() -> None:
    """Nothing is ever downloaded at run time (every load is local_files_only as well)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
        os.environ.setdefault(var, "1")


def main(argv: Sequence[str] | None = None) -> int:
    _offline()
    args = build_parser().parse_args(argv)
    from .config_file import ConfigError, default_template, load_config
    from .presets import PRESETS
    if args.command != "train":  # pragma: no cover - argparse enforces it
        return 2
    if args.print_default_config:
        if args.preset and args.preset not in PRESETS:
            print(f"error: --preset: unknown preset {args.preset!r}; choose one of {', '.join(sorted(PRESETS))}",
                  file=sys.stderr)
            return 2
        sys.stdout.write(default_template(args.preset, args.family))
        return 0
    if not args.config:
        print("error: give a config file (python -m branchgrpo train CONFIG), or --print-default-config",
              file=sys.stderr)
        return 2
    _, rank, _ = world_from_env()
    logging.basicConfig(level=logging.WARNING if (args.quiet or rank) else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s" if rank == 0 else
                        f"[rank {rank}] %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, args.set)
        if args.check:
            world, _, _ = world_from_env()
            check_distributed(cfg, world)
            print(f"{args.config}: OK ({len(cfg.prompts)} prompts, {len(cfg.rewards)} reward(s), "
                  f"{cfg.trainer.iterations} iterations, run folder {cfg.run_dir})")
            return 0
        if args.stop_after is not None and args.stop_after < 1:
            raise ConfigError("--stop-after", "must be >= 1")
        result = train(cfg, resume_from=args.resume, stop_after=args.stop_after)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is kept (rerun the same command to continue)", file=sys.stderr)
        return 130
    if rank == 0 and not args.quiet:
        last = result["history"][-1] if result["history"] else {}
        print(f"done: {result['iterations']} iterations (resumed from {result['resumed_from']}); "
              f"reward {last.get('reward_mean', float('nan')):.4f}; LoRA {result['lora']}; "
              f"checkpoint {result['checkpoint']}")
    return 0
