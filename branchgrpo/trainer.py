"""The training loop: rollout -> rewards -> advantages -> pruning -> update, with callbacks,
seeded determinism and exact checkpoint/resume.

Determinism: every random draw of iteration ``i`` (rollout noise, DanceGRPO's timestep subset, the
shuffle of the update) comes from a CPU generator seeded with ``(seed, i)``, and the prompts of
iteration ``i`` from a permutation seeded with ``(seed, epoch)``. Nothing random is carried between
iterations, so a checkpoint needs only the adapter, the optimizer, the iteration counter and the
metrics history for a resumed run to continue exactly as an uninterrupted one (the sliding depth
schedule and the Mix window are functions of the iteration).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .advantage import AdvantageConfig, compute_advantages
from .loss import OptimConfig, policy_update
from .objectives import EMAPolicy, ObjectiveConfig, forward_update, old_decay
from .distributed import SingleProcess
from .evaluate import evaluate, reference_kl, reward_spread
from .fileio import atomic_write, remove_stale_temps
from .models.base import VelocityModel
from .pruning import PruningConfig, active_depths, select_edges
from .schedule import BranchSchedule
from .tree import Tree, rollout

log = logging.getLogger("branchgrpo")

CHECKPOINT_FORMAT = "branchgrpo-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass
class TrainerConfig:
    schedule: BranchSchedule = field(default_factory=BranchSchedule)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """What the rollout trains: ``"ppo"`` on its SDE edges, or a forward-process objective on its
    clean samples (:mod:`branchgrpo.objectives`); the sampler is ``schedule``, chosen independently."""
    init_same_noise: bool = False
    """One initial noise for every root of an iteration (the official ``--init_same_noise``)."""
    iterations: int = 100
    """Training iterations (one rollout + one update each)."""
    prompts_per_iteration: int = 1
    """Trees per iteration (one per prompt)."""
    seed: int = 0
    max_batch: int = 16
    """Most latents per model call in the rollout and in decoding (bounds memory)."""
    reward_weights: tuple[float, ...] = ()
    """One weight per reward (default 1 each)."""
    checkpoint_every: int = 0
    """Write a checkpoint every N iterations (0: only at the end) when a checkpoint path is given."""
    kl_metric_parents: int = 4
    """Trained parents per iteration (evenly spread over the trained depths) on which the KL to the reference
    (adapter off) is measured after the update, without gradients: two model evaluations each, counted in
    ``nfe_metrics``. 0 turns it off."""
    eval_every: int = 0
    """Reward of Euler-ODE samples of the held-out evaluation prompts every N iterations (and at the first
    and last iteration); 0 turns it off. Needs evaluation prompts (``eval_prompts`` of the trainer)."""
    eval_seeds: int = 2
    """Samples per evaluation prompt, from the fixed seeds ``0 .. eval_seeds - 1``."""

    MONITORING_FIELDS = ("kl_metric_parents", "eval_every", "eval_seeds")
    """Fields that only measure the run: they change no parameter update, so a resume may differ in them."""

    def validate(self, where: str = "TrainerConfig") -> None:
        self.schedule.validate(f"{where}.schedule")
        self.advantage.validate(f"{where}.advantage")
        self.pruning.validate(self.schedule.num_steps, f"{where}.pruning")
        self.optim.validate(f"{where}.optim")
        self.objective.validate(f"{where}.objective")
        if not self.objective.forward_process and not any(
                self.schedule.for_iteration(i).sde_steps(i) for i in range(min(self.iterations, 4))):
            raise ValueError(f"{where}.schedule: the rollout has no SDE step (sde_window size 0 and no split), "
                             "so the 'ppo' objective has no log-probability to train; give the window a size "
                             "or choose a forward-process objective (diffusionnft, awm, dgpo).")
        for name, lo in (("iterations", 1), ("prompts_per_iteration", 1), ("max_batch", 1),
                         ("checkpoint_every", 0), ("kl_metric_parents", 0), ("eval_every", 0),
                         ("eval_seeds", 1)):
            val = getattr(self, name)
            if not isinstance(val, int) or val < lo:
                raise ValueError(f"{where}: {name} must be an integer >= {lo} (got {val!r}).")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainerConfig":
        data = dict(data)
        subs = {"schedule": BranchSchedule, "advantage": AdvantageConfig, "pruning": PruningConfig,
                "optim": OptimConfig, "objective": ObjectiveConfig}
        kwargs = {}
        for key, value in data.items():
            if key in subs:
                kwargs[key] = _dataclass_from_dict(subs[key], value, key)
            elif key in {f.name for f in dataclasses.fields(cls)}:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
            else:
                raise ValueError(f"unknown config field {key!r}")
        return cls(**kwargs)


def _dataclass_from_dict(cls, data: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; valid fields: {sorted(names)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


class Callback:
    """Hooks of the training loop. Any method may raise to stop the run (e.g. a user cancel)."""

    def on_model_call(self, phase: str, done: int, total: int) -> None:
        """Before every model call; ``phase`` is ``"rollout"`` or ``"train"``."""

    def on_rollout_end(self, iteration: int, tree: Tree, leaf_rewards: torch.Tensor,
                       images: torch.Tensor | None) -> None:
        """After the leaves are scored (``images`` are the decoded leaves, if kept)."""

    def on_evaluation(self, iteration: int, result: dict) -> None:
        """After a held-out evaluation (:func:`branchgrpo.evaluate.evaluate`'s result; ``images`` when kept)."""

    def on_iteration_end(self, iteration: int, metrics: dict[str, float]) -> None:
        """After the update of an iteration (``iteration`` counts completed iterations)."""

    def on_phase_end(self, phase: str, index: int | None = None) -> None:
        """After the leaves are decoded (``"decode"``) and after reward ``index`` scored them (``"reward"``):
        the model of that phase may be released."""


class TrainingCancelled(RuntimeError):
    pass


def _seed_for(seed: int, iteration: int, salt: int = 0) -> int:
    return (int(seed) * 1_000_003 + int(iteration) * 7919 + salt) % (2 ** 63 - 1)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`branchgrpo.fileio.atomic_write`."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


class BranchGRPOTrainer:
    """Trains ``adapter`` (a module whose parameters act inside ``model``) with BranchGRPO.

    ``model``: a :class:`~branchgrpo.models.base.VelocityModel`. ``decode(x0) -> images`` turns
    predicted clean latents into IMAGE tensors; ``rewards`` score them. ``adapter`` must have
    ``parameters()``, ``state_dict()`` and ``load_state_dict()``; if it has ``disabled()`` (a context
    manager), that is the KL reference.
    """

    def __init__(self, model: VelocityModel, adapter: torch.nn.Module, prompts: Sequence[str],
                 rewards: Sequence[Callable], decode: Callable[[torch.Tensor], torch.Tensor],
                 config: TrainerConfig, latent_shape: Sequence[int], *, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, callbacks: Sequence[Callback] = (),
                 keep_images: bool = False, dist: Any = None, eval_prompts: Sequence[str] = ()):
        config.validate()
        self.dist = dist or SingleProcess()
        if self.dist.world_size > 1 and config.optim.edges_per_step:
            raise ValueError("TrainerConfig: optim.edges_per_step must be 0 (one optimizer step per iteration) "
                             "in a distributed run, so every rank takes the same optimizer steps.")
        if not prompts:
            raise ValueError("TrainerConfig: the prompt list is empty; give at least one prompt.")
        if not rewards:
            raise ValueError("TrainerConfig: no reward given; connect at least one reward model.")
        if config.eval_every and not eval_prompts:
            raise ValueError(f"TrainerConfig: eval_every is {config.eval_every} but there are no evaluation prompts; "
                             "hold some prompts out for evaluation, or set eval_every to 0.")
        if config.reward_weights and len(config.reward_weights) != len(rewards):
            raise ValueError(f"TrainerConfig: reward_weights has {len(config.reward_weights)} entries for "
                             f"{len(rewards)} rewards; give one weight per reward.")
        self.model, self.adapter = model, adapter
        self.prompts = list(prompts)
        self.eval_prompts = list(eval_prompts)
        self.rewards = list(rewards)
        self.decode = decode
        self.config = config
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.device = torch.device(device)
        self.dtype = dtype
        self.callbacks = list(callbacks)
        self.keep_images = keep_images
        self.params = [p for p in adapter.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the adapter has no trainable parameters")
        o = config.optim
        self.optimizer = torch.optim.AdamW(self.params, lr=o.learning_rate, betas=tuple(o.betas),
                                           eps=o.adam_eps, weight_decay=o.weight_decay)
        self.old_policy = EMAPolicy(self.params) if config.objective.needs_old() else None
        self.iteration = 0
        self.history: list[dict[str, float]] = []
        self.last_tree: Tree | None = None
        self.last_rewards: torch.Tensor | None = None
        self.phase = "start"
        """The phase running now: ``rollout``, ``decode``, ``reward``, ``update`` or ``metrics`` (what an
        out-of-memory report names)."""

    # ------------------------------------------------------------------ helpers
    def _hook(self, phase: str, done: int, total: int) -> None:
        for cb in self.callbacks:
            cb.on_model_call(phase, done, total)

    def prompts_for(self, iteration: int) -> list[int]:
        """Prompt indices of ``iteration``: consecutive slices of seeded per-epoch permutations."""
        n, per = len(self.prompts), self.config.prompts_per_iteration
        out = []
        for k in range(iteration * per, (iteration + 1) * per):
            epoch, pos = divmod(k, n)
            g = torch.Generator().manual_seed(_seed_for(self.config.seed, epoch, salt=17))
            out.append(int(torch.randperm(n, generator=g)[pos]))
        return out

    def reference(self):
        disabled = getattr(self.adapter, "disabled", None)
        return disabled() if disabled is not None else nullcontext()

    #: Leaves per VAE decode and per reward call (``None``: ``config.max_batch``); a caller sizes them to its
    #: memory budget (the ComfyUI Trainer does, from the VAE's and the scorer's memory per image).
    decode_batch: int | None = None
    reward_batch: int | None = None

    def _phase_end(self, phase: str, index: int | None = None) -> None:
        for cb in self.callbacks:
            hook = getattr(cb, "on_phase_end", None)
            if hook is not None:
                hook(phase, index)

    @torch.no_grad()
    def score(self, x0: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decode all leaves, then score them with each reward in turn; returns rewards ``[R, L]`` and
        (optionally) the images.

        Phase by phase, so only one of the VAE and the reward models has to be in memory at a time: the
        leaves are decoded in chunks of :attr:`decode_batch`, then ``on_phase_end("decode")``; reward ``k``
        scores them in chunks of :attr:`reward_batch`, then ``on_phase_end("reward", k)``. A callback
        releases the model whose phase ended. The decoded images are kept on the CPU in between."""
        n = x0.shape[0]
        db = max(1, int(self.decode_batch or self.config.max_batch))
        # decoded leaves wait in host memory (a video tree's frames would crowd the card) until they are scored
        self.phase = "decode"
        images = torch.cat([self.decode(x0[start:start + db]).cpu() for start in range(0, n, db)])
        self._phase_end("decode")
        rb = max(1, int(self.reward_batch or self.config.max_batch))
        scores = []
        for k, fn in enumerate(self.rewards):
            self.phase = "reward"
            scores.append(torch.cat([torch.as_tensor(fn(images[start:start + rb], prompts[start:start + rb]))
                                     .float().flatten().cpu() for start in range(0, n, rb)]))
            self._phase_end("reward", k)
        return torch.stack(scores), (images.detach().cpu() if self.keep_images else None)

    # ------------------------------------------------------------------ one iteration
    def step(self) -> dict[str, float]:
        cfg, it, dist = self.config, self.iteration, self.dist
        # Tree slots of this iteration dealt round-robin to ranks; one generator per slot, so a tree
        # is identical whichever rank samples it.
        slots = list(range(cfg.prompts_per_iteration))[dist.rank::dist.world_size]
        gens = [torch.Generator().manual_seed(_seed_for(cfg.seed, it, salt=101 + s)) for s in slots]
        gen = torch.Generator().manual_seed(_seed_for(cfg.seed, it))
        all_idx = self.prompts_for(it)
        prompts = [self.prompts[all_idx[s]] for s in slots]
        sched = cfg.schedule.for_iteration(it)
        obj = cfg.objective
        init_noise = None
        if cfg.init_same_noise:  # the same on every rank: seeded by the iteration only
            g0 = torch.Generator().manual_seed(_seed_for(cfg.seed, it, salt=53))
            one = torch.randn((1, *self.latent_shape), generator=g0)
            init_noise = one.expand(len(prompts) * sched.group_size, *self.latent_shape).contiguous()
        t0 = time.perf_counter()
        self.phase = "rollout"
        cond = self.model.encode(prompts)
        sample_old = self.old_policy is not None and 0 <= obj.sample_with_old_after <= it
        with (self.old_policy.active() if sample_old else nullcontext()):
            tree = rollout(self.model, cond, len(prompts), sched, self.latent_shape, generator=gens,
                           iteration=it, max_batch=cfg.max_batch, device=self.device, dtype=self.dtype,
                           init_noise=init_noise, hook=self._hook)
        t1 = time.perf_counter()
        leaf_prompts = [prompts[t] for t in tree.leaf_tree().tolist()]
        rewards, images = self.score(tree.leaf_x0, leaf_prompts)
        weights = cfg.reward_weights or (1.0,) * len(self.rewards)
        combined = (torch.tensor(weights, dtype=torch.float32)[:, None] * rewards).sum(0)
        for cb in self.callbacks:
            cb.on_rollout_end(it, tree, combined, images)
        t2 = time.perf_counter()
        batch_rewards = None
        if dist.world_size > 1:
            batch_rewards = torch.stack([dist.all_gather_cat(r) for r in rewards])
        adv = compute_advantages(tree, rewards, cfg.advantage, weights, batch_rewards)
        self.phase = "update"
        if obj.forward_process:
            edges = tree.leaves  # the clean samples are what a forward-process objective trains on
            upd = forward_update(self.model, cond, tree.leaf_x0, tree.tree[edges], adv[edges], tree.tree[edges],
                                 sched, obj, cfg.optim, self.optimizer, self.params, generator=gen,
                                 device=self.device, dtype=self.dtype, reference=self.reference,
                                 old_policy=self.old_policy, hook=self._hook,
                                 dist=dist if dist.world_size > 1 else None)
        else:
            edges = select_edges(tree, adv, cfg.pruning, sched.split_steps, it, cfg.iterations, gens)
            upd = policy_update(self.model, cond, tree, edges, adv, sched, cfg.optim, self.optimizer,
                                self.params, generator=gen, device=self.device, dtype=self.dtype,
                                reference=self.reference, hook=self._hook,
                                dist=dist if dist.world_size > 1 else None)
        if self.old_policy is not None:
            steps_done = sum(int(h.get("optimizer_steps", 0)) for h in self.history) + int(upd["optimizer_steps"])
            self.old_policy.update(old_decay(steps_done, obj.old_decay_rate, obj.old_decay_max, obj.old_decay_flat))
        if dist.world_size > 1:
            combined = (torch.tensor(weights, dtype=torch.float64)[:, None] * batch_rewards).sum(0).float()
        t3 = time.perf_counter()
        self.iteration += 1
        n_leaves = tree.leaves.numel()
        trained_adv = adv[edges] if edges.numel() else torch.zeros(1)
        metrics: dict[str, float] = {
            "iteration": self.iteration,
            "reward_mean": float(combined.mean()), "reward_std": float(combined.std()) if n_leaves > 1 else 0.0,
            "reward_max": float(combined.max()), "reward_min": float(combined.min()),
            "adv_std": float(trained_adv.std()) if trained_adv.numel() > 1 else 0.0,
            "adv_abs_mean": float(trained_adv.abs().mean()),
            "leaves": n_leaves, "edges_total": tree.num_edges, "nfe_rollout": tree.nfe,
            "pruned_depths": len(active_depths(cfg.pruning, it, sched.split_steps)),
            "time_rollout": t1 - t0, "time_reward": t2 - t1, "time_update": t3 - t2, "time_total": t3 - t0,
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        if len(self.rewards) > 1:
            for k, fn in enumerate(self.rewards):
                metrics[f"reward/{getattr(fn, 'name', k)}"] = float(rewards[k].mean())
        metrics.update(upd)
        # reward spread within trees, before normalisation (trees are contiguous blocks of leaves)
        groups = tree.leaf_tree() if dist.world_size == 1 else torch.arange(combined.numel()) // sched.num_leaves()
        metrics["reward_spread"] = reward_spread(combined, groups)
        self.phase = "metrics"
        metrics.update(self._monitor(cond, tree, edges, sched))
        if dist.world_size > 1:  # counts summed over ranks; the loss and ratios stay this rank's
            for key in ("leaves", "edges_total", "nfe_rollout", "nfe_train", "edges_trained", "nfe_metrics"):
                metrics[key] = int(dist.all_reduce_sum(metrics[key]))
        self.history.append(metrics)
        self.last_tree, self.last_rewards = tree, combined
        for cb in self.callbacks:
            cb.on_iteration_end(self.iteration, metrics)
        return metrics

    def _monitor(self, cond: Any, tree: Tree, edges: torch.Tensor, sched: BranchSchedule) -> dict[str, float]:
        """After the update: the KL to the reference on a few trained parents, and the held-out evaluation."""
        cfg, dist, it = self.config, self.dist, self.iteration
        t0 = time.perf_counter()
        out: dict[str, float] = {"nfe_metrics": 0, "nfe_eval": 0}
        if cfg.kl_metric_parents > 0:
            parents = torch.unique(tree.parent[edges]) if edges.numel() else torch.zeros(0, dtype=torch.long)
            if parents.numel() > cfg.kl_metric_parents:  # evenly spread over the depths (node ids run by depth)
                pick = torch.linspace(0, parents.numel() - 1, cfg.kl_metric_parents).round().long()
                parents = parents[pick]
            kl, nfe = reference_kl(self.model, cond, tree, parents, sched, self.reference, max_batch=cfg.max_batch,
                                   device=self.device, dtype=self.dtype, hook=self._hook)
            if dist.world_size > 1:
                kl = dist.all_reduce_sum(kl) / dist.world_size
            out["kl_ref"], out["nfe_metrics"] = float(kl), int(nfe)
        if cfg.eval_every > 0 and (it % cfg.eval_every == 0 or it in (1, cfg.iterations)):
            res = evaluate(self, self.eval_prompts, range(cfg.eval_seeds), keep_images=self.keep_images,
                           hook=self._hook)
            out.update({f"eval_{k}": v for k, v in res.items() if k.startswith("reward/")})
            out["eval_reward"], out["eval_reward_std"], out["nfe_eval"] = res["reward"], res["reward_std"], res["nfe"]
            for cb in self.callbacks:
                hook = getattr(cb, "on_evaluation", None)  # callbacks written before this hook existed lack it
                if hook is not None:
                    hook(it, res)
        out["time_metrics"] = time.perf_counter() - t0
        return out

    def train(self, checkpoint_path: str | os.PathLike | None = None, until: int | None = None,
              on_save: Callable[[], None] | None = None) -> list[dict[str, float]]:
        """Run until ``until`` (default ``config.iterations``) completed iterations, writing the checkpoint every
        ``checkpoint_every`` iterations and at the end; ``on_save()`` runs after each write (the command line
        writes its LoRA file there). A temporary left in the checkpoint's folder by a write a crash cut short is
        removed first."""
        until = self.config.iterations if until is None else until
        every = self.config.checkpoint_every
        if checkpoint_path is not None and self.dist.is_main():
            for stale in remove_stale_temps(os.path.dirname(os.path.abspath(checkpoint_path))):
                log.info("removed %s, left by a checkpoint write that did not finish", stale)
        saved_at = -1

        def save() -> None:
            nonlocal saved_at
            self.save_checkpoint(checkpoint_path)
            if on_save is not None:
                on_save()
            saved_at = self.iteration

        while self.iteration < until:
            self.step()
            if checkpoint_path is not None and every > 0 and self.iteration % every == 0:
                save()
        if checkpoint_path is not None and saved_at != self.iteration:
            save()
        return self.history

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "iteration": self.iteration,
                "adapter": {k: v.detach().cpu() for k, v in self.adapter.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "history": json.dumps(self.history),
                "config": json.dumps(self.config.to_dict()), "prompts": json.dumps(self.prompts),
                **({"old_policy": self.old_policy.state_dict()} if self.old_policy is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError("not a BranchGRPO checkpoint (missing format tag)")
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint version {state.get('version')} is not supported (expected "
                             f"{CHECKPOINT_VERSION})")
        self.adapter.load_state_dict(state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration = int(state["iteration"])
        self.history = json.loads(state["history"])
        if self.old_policy is not None:
            if "old_policy" not in state:
                raise ValueError("the checkpoint has no old (EMA) policy, which this run's objective "
                                 f"{self.config.objective.name!r} needs; resume it with the objective it was trained with")
            self.old_policy.load_state_dict(state["old_policy"])

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Written by the main process only (all ranks hold the same adapter and optimizer state)."""
        if self.dist.is_main():
            atomic_torch_save(self.state_dict(), path)
        self.dist.barrier()

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    @staticmethod
    def read_checkpoint_config(path: str | os.PathLike) -> TrainerConfig:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return TrainerConfig.from_dict(json.loads(state["config"]))
