"""Out-of-memory injection for the tests: a node that makes one phase of a run raise ``torch.OutOfMemoryError``.

The Trainer's phases reach the models through ComfyUI's own interfaces, and the injector wraps them there:
the MODEL through ``set_model_unet_function_wrapper`` (a call without gradients is the rollout's or the metrics',
one with gradients the update's), the VAE's ``decode`` and the reward's call through proxies. Each wrapped entry
point counts its calls and raises on call ``after + 1``; with ``after`` -1 it never raises and only counts, and
the counts of every injector are written to ``output/oom_injector_counts.json`` after each call, so a test can
learn how many calls one iteration makes and then fail the next one.
"""
from __future__ import annotations

import json
import os

import torch
from comfy_api.latest import io

import folder_paths

from . import CATEGORY

PHASES = ("rollout", "update", "decode", "reward")
COUNTS_FILE = "oom_injector_counts.json"


class _Counter:
    def __init__(self, tag: str, phase: str, after: int):
        self.tag, self.phase, self.after = tag, phase, int(after)
        self.calls = {p: 0 for p in PHASES}

    def tick(self, phase: str) -> None:
        self.calls[phase] += 1
        path = os.path.join(folder_paths.get_output_directory(), COUNTS_FILE)
        try:
            data = json.load(open(path))
        except (OSError, ValueError):
            data = {}
        data[self.tag] = self.calls
        with open(path, "w") as fh:
            json.dump(data, fh)
        if phase == self.phase and self.after >= 0 and self.calls[phase] > self.after:
            raise torch.OutOfMemoryError(f"injected out of memory in the {phase} (call {self.calls[phase]})")


class _VAEProxy:
    def __init__(self, vae, counter: _Counter):
        self._vae, self._counter = vae, counter

    def decode(self, *args, **kwargs):
        self._counter.tick("decode")
        return self._vae.decode(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._vae, name)


class _RewardProxy:
    def __init__(self, reward, counter: _Counter):
        self._reward, self._counter = reward, counter

    def __call__(self, *args, **kwargs):
        self._counter.tick("reward")
        return self._reward(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._reward, name)


class OutOfMemoryInjectorNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BranchGRPOOutOfMemoryInjector", display_name="Out Of Memory Injector (dev)", category=CATEGORY,
            is_experimental=True, not_idempotent=True,
            description="Development only: the MODEL, VAE and REWARD_MODEL passed through, with one phase raising "
                        "torch.OutOfMemoryError on call after + 1 (after -1: count only).",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL to wrap."),
                io.Vae.Input("vae", tooltip="The VAE to wrap."),
                io.Custom("REWARD_MODEL").Input("reward", tooltip="The reward to wrap."),
                io.Combo.Input("phase", options=list(PHASES), default="update", tooltip="The phase that fails."),
                io.Int.Input("after", default=-1, min=-1, max=10 ** 6, tooltip="Calls that pass before one fails."),
                io.String.Input("tag", default="oom", tooltip="Key of this injector's counts in the counts file."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The wrapped MODEL."),
                     io.Vae.Output(display_name="vae", tooltip="The wrapped VAE."),
                     io.Custom("REWARD_MODEL").Output(display_name="reward", tooltip="The wrapped reward.")],
        )

    @classmethod
    def execute(cls, model, vae, reward, phase, after, tag) -> io.NodeOutput:
        counter = _Counter(tag, phase, after)
        m = model.clone()

        def wrapper(apply_model, args):
            counter.tick("update" if torch.is_grad_enabled() else "rollout")
            return apply_model(args["input"], args["timestep"], **args["c"])

        m.set_model_unet_function_wrapper(wrapper)
        return io.NodeOutput(m, _VAEProxy(vae, counter), _RewardProxy(reward, counter))
