"""Edit Prompts (reference images): (image, instruction) pairs for image-conditioned flow models.

FLUX.1 Kontext and Qwen-Image-Edit take a reference image as ComfyUI's ``ReferenceLatent`` node gives it: the
VAE-encoded image appended to the conditioning's ``reference_latents`` (the model attaches its tokens to the
image tokens). This node pairs each instruction with its image and returns

* PROMPTS: the instructions (as the Prompts node gives them), and
* CLIP: the input text encoder, which encodes an instruction exactly as before and then appends the VAE latent
  of that instruction's image to the conditioning, as ``ReferenceLatent`` does. The Trainer (and
  CLIPTextEncode) use it as any CLIP, so every training prompt carries its own reference image.

Sampling the trained model with the stock nodes: CLIPTextEncode (the plain CLIP) -> ReferenceLatent with the
VAE-encoded image -> KSampler.
"""
from __future__ import annotations

import torch
from comfy_api.latest import io


from . import types as T
from . import comfy_core as core

NODE = "Edit Prompts (reference images)"


def _key(text: str) -> str:
    return " ".join(str(text).split())


class _Tokens(dict):
    """The wrapped CLIP's tokens, remembering the text they came from."""

    text: str = ""


class ReferenceCLIP:
    """A CLIP that appends the reference latent of an instruction to its conditioning (``ReferenceLatent``)."""

    def __init__(self, clip, references: dict[str, torch.Tensor]):
        self.clip = clip
        self.references = dict(references)

    def clone(self):
        return ReferenceCLIP(self.clip.clone(), self.references)

    def tokenize(self, text, *args, **kwargs):
        tokens = _Tokens(self.clip.tokenize(text, *args, **kwargs))
        tokens.text = _key(text)
        return tokens

    def _with_reference(self, cond: list, tokens) -> list:
        latent = self.references.get(getattr(tokens, "text", None))
        if latent is None:
            return cond
        return core.node_helpers.conditioning_set_values(cond, {"reference_latents": [latent]}, append=True)

    def encode_from_tokens_scheduled(self, tokens, *args, **kwargs):
        return self._with_reference(self.clip.encode_from_tokens_scheduled(dict(tokens), *args, **kwargs), tokens)

    def __getattr__(self, name):
        if name == "clip":
            raise AttributeError(name)
        return getattr(self.clip, name)


class EditPromptsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BranchGRPOEditPrompts", display_name=NODE, category=T.CATEGORY,
            description="(image, instruction) pairs for image-conditioned flow models (FLUX.1 Kontext, "
                        "Qwen-Image-Edit): the k-th instruction edits the k-th image. Outputs the instructions as "
                        "PROMPTS and a CLIP that adds each instruction's VAE-encoded image to its conditioning as "
                        "reference_latents, the way the stock ReferenceLatent node does. Connect both to the "
                        "Trainer.",
            inputs=[
                io.Clip.Input("clip", tooltip="The model's text encoder."),
                io.Vae.Input("vae", tooltip="The model's VAE: encodes the reference images."),
                io.Image.Input("images", tooltip="Reference images, one per instruction (a batch; all the same "
                                                 "size, e.g. from Image Batch or a folder loader)."),
                io.String.Input("instructions", multiline=True, default="",
                                tooltip="One edit instruction per line, in the order of the images; lines that "
                                        "are empty or start with # are skipped. Instructions must differ."),
            ],
            outputs=[
                io.Clip.Output(display_name="clip", tooltip="The text encoder, adding each instruction's reference "
                                                            "image (for the Trainer's clip input)."),
                T.Prompts.Output(display_name="prompts", tooltip="The instructions, for the Trainer."),
            ],
        )

    @classmethod
    def validate_inputs(cls, instructions=None, **kwargs):
        if instructions is None:  # linked from another node: checked when it runs
            return True
        items = [ln.strip() for ln in str(instructions).splitlines()]
        items = [ln for ln in items if ln and not ln.startswith("#")]
        if not items:
            return f"{NODE}: instructions — the list is empty; write one edit instruction per line."
        keys = [_key(t) for t in items]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            return (f"{NODE}: instructions — {dup[0]!r} appears more than once; each image needs its own "
                    "instruction (the conditioning is looked up by its text).")
        return True

    @classmethod
    def execute(cls, clip, vae, images, instructions) -> io.NodeOutput:
        checked = cls.validate_inputs(instructions)
        if checked is not True:
            raise ValueError(checked)
        items = [ln.strip() for ln in instructions.splitlines()]
        items = [ln for ln in items if ln and not ln.startswith("#")]
        if images.shape[0] != len(items):
            raise ValueError(f"{NODE}: images — {images.shape[0]} image(s) for {len(items)} instruction(s); give "
                             "exactly one image per instruction.")
        refs = {}
        for text, image in zip(items, images):
            latent = vae.encode(image[None, :, :, :3])
            with torch.inference_mode(False):  # a normal tensor: the Trainer back-propagates through its tokens
                refs[_key(text)] = latent.clone()
        return io.NodeOutput(ReferenceCLIP(clip, refs), {"train": items, "eval": []},
                             ui={"text": [f"{len(items)} (image, instruction) pairs"]})
