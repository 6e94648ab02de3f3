"""Save LoRA: ComfyUI key format with alpha and metadata, written atomically into models/loras/."""
from __future__ import annotations

import os

from comfy_api.latest import io

from branchgrpo.lora import save_state_dict

from . import types as T
from . import comfy_core as core

NODE = "BranchGRPO Save LoRA"


def resolve_lora_path(filename: str) -> str:
    """``<loras>/<filename>.safetensors``; refuses absolute paths and anything escaping the folder."""
    name = (filename or "").strip().replace("\\", "/")
    if not name:
        raise ValueError(f"{NODE}: filename — empty; give a name such as 'branchgrpo/my_lora'.")
    if name.startswith("/") or os.path.isabs(name) or any(part in ("..", "") for part in name.split("/")) \
            or ":" in name:
        raise ValueError(f"{NODE}: filename — {filename!r} escapes the loras folder; use a relative name "
                         "without '..', a leading '/' or a drive, e.g. 'branchgrpo/my_lora'.")
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    base = os.path.realpath(core.folder_paths.get_folder_paths("loras")[0])
    path = os.path.realpath(os.path.join(base, name))
    if os.path.commonpath([base, path]) != base:
        raise ValueError(f"{NODE}: filename — {filename!r} resolves outside the loras folder ({base}).")
    return path


def kept_in_checkpoint(lora) -> str:
    """Where a Trainer's LoRA survives a failed save, and how to get it written without training again."""
    run = (getattr(lora, "metadata", None) or {}).get("branchgrpo.run_name")
    if not run:
        return ""
    ckpt = os.path.join(core.folder_paths.get_output_directory(), "branchgrpo", run, "checkpoint.pt")
    its = (getattr(lora, "metadata", None) or {}).get("branchgrpo.iterations", "?")
    return (f" The trained LoRA ({its} iterations) is kept in the checkpoint {ckpt}: fix the file name and queue "
            "again with the Trainer's resume on and the same settings; it loads the checkpoint and Save LoRA writes "
            "the file at once, without training.")


class SaveLoRANode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BranchGRPOSaveLoRA", display_name="Save LoRA (BranchGRPO)", category=T.CATEGORY,
            is_output_node=True,
            description="Writes the trained adapter into ComfyUI's models/loras folder in ComfyUI's key format "
                        "(lora_up / lora_down / alpha for LoRA; hada_*, lokr_*, oft_blocks for LoHa, LoKr, OFT; "
                        ".diff / .diff_b for bias and norm deltas) with the run's settings as metadata, atomically. "
                        "Load it anywhere with the stock 'LoraLoaderModelOnly', or continue it with the Trainer's "
                        "'continue_lora'.",
            inputs=[
                T.LoraModel.Input("lora", tooltip="The LORA_MODEL from the BranchGRPO Trainer (or the native trainer)."),
                io.String.Input("filename", default="branchgrpo/branchgrpo_lora", tooltip="Path relative to "
                                "models/loras (no '..'); '.safetensors' is added."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of that name "
                                 "(off: a numbered name is chosen)."),
            ],
            outputs=[io.String.Output(display_name="lora_name", tooltip="The saved name, as LoRA loaders list it.")],
        )

    @classmethod
    def validate_inputs(cls, filename=None):
        """Checked when the prompt is queued, before any node runs. Only ``filename`` is taken, so ComfyUI
        reports the error once, on that input (it attaches a failure to every input the check receives)."""
        if isinstance(filename, str):
            try:
                resolve_lora_path(filename)
            except ValueError as e:
                return str(e)
        return True

    @classmethod
    def execute(cls, lora, filename, overwrite) -> io.NodeOutput:
        try:
            path = resolve_lora_path(filename)
        except ValueError as e:  # a linked file name: only seen now, after the Trainer ran
            raise ValueError(f"{e}{kept_in_checkpoint(lora)}") from None
        if not isinstance(lora, dict) or not lora:
            raise ValueError(f"{NODE}: lora — empty or not a LORA_MODEL; connect the Trainer's 'lora' output.")
        if not overwrite and os.path.exists(path):
            stem = path[: -len(".safetensors")]
            n = 1
            while os.path.exists(f"{stem}_{n:05d}.safetensors"):
                n += 1
            path = f"{stem}_{n:05d}.safetensors"
        metadata = dict(getattr(lora, "metadata", {}) or {})
        metadata.setdefault("branchgrpo.format", "comfyui-lora")
        try:
            save_state_dict(path, lora, metadata)
        except OSError as e:
            raise OSError(f"{NODE}: filename — could not write {path}: {e}.{kept_in_checkpoint(lora)}") from None
        base = os.path.realpath(core.folder_paths.get_folder_paths("loras")[0])
        name = os.path.relpath(path, base).replace(os.sep, "/")
        return io.NodeOutput(name, ui={"text": [f"saved {name}"], "lora_name": [name]})
