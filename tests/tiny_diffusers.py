"""Tiny random-weight diffusers pipelines (FLUX, SD3, Wan 2.1) saved as local diffusers folders.

Every folder is a complete ``save_pretrained`` layout (``model_index.json``, ``transformer/``,
``vae/``, text encoders, tokenizers, scheduler), so ``<Pipeline>.from_pretrained(folder,
local_files_only=True)`` loads it exactly as it would a real model; nothing is downloaded.
Tokenizers are built from tiny in-memory vocabularies (byte-level BPE for CLIP, a unigram vocab for
T5/UMT5). Weights are seeded: the same arguments give the same files.
"""
from __future__ import annotations

from pathlib import Path

import torch

TINY_LATENT_CHANNELS = 4


def _seeded(seed: int):
    torch.manual_seed(seed)


def _byte_chars() -> list[str]:
    """GPT-2 / CLIP's printable stand-ins for the 256 bytes (``bytes_to_unicode``)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_tokenizer(max_length: int = 77):
    """A byte-level CLIP BPE tokenizer with no merges: every character is a token."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer(max_length: int = 512):
    """A unigram (sentencepiece-style) T5 tokenizer over lower-case letters, digits and a few symbols."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,-'"]
    pieces += [("\u2581" + c, -2.5) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _clip_text(seed: int, hidden: int = 32, projection: bool = False, vocab: int = 514):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden,
                         bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    _seeded(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5(seed: int, d_model: int = 32, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel
    cls_cfg, cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    cfg = cls_cfg(vocab_size=72, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=2,
                  relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    _seeded(seed)
    return cls(cfg).eval()


def _kl_vae(seed: int, latent_channels: int = TINY_LATENT_CHANNELS, shift: float | None = 0.1):
    from diffusers import AutoencoderKL
    _seeded(seed)
    kw = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
              latent_channels=latent_channels, norm_num_groups=4, sample_size=32, scaling_factor=0.5,
              use_quant_conv=False, use_post_quant_conv=False)
    if shift is not None:
        kw["shift_factor"] = shift
    return AutoencoderKL(**kw).eval()


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def build_flux(seed: int = 0, guidance: bool = True):
    """A FluxPipeline: 1 double + 1 single block, 2 heads x 16, 4 latent channels (16 packed), CLIP + T5."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    _seeded(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4 * TINY_LATENT_CHANNELS, num_layers=1,
                                         num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance,
                                         axes_dims_rope=(4, 6, 6)).eval()
    return FluxPipeline(scheduler=_scheduler(), vae=_kl_vae(seed + 1), text_encoder=_clip_text(seed + 2),
                        tokenizer=clip_tokenizer(), text_encoder_2=_t5(seed + 3), tokenizer_2=t5_tokenizer(),
                        transformer=transformer)


def build_sd3(seed: int = 0):
    """A StableDiffusion3Pipeline: 2 MMDiT layers, 2 heads x 64 and 16 latent channels (ComfyUI's detection reads
    hidden = 64 x depth and matches SD3 on 16 channels, so ComfyUI loads this transformer too), CLIP-L/G (with
    projection) + T5."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    _seeded(seed)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, num_layers=2,
                                        attention_head_dim=64, num_attention_heads=2, joint_attention_dim=64,
                                        caption_projection_dim=128, pooled_projection_dim=64,
                                        out_channels=16, pos_embed_max_size=16).eval()
    return StableDiffusion3Pipeline(
        scheduler=_scheduler(), vae=_kl_vae(seed + 1, latent_channels=16),
        text_encoder=_clip_text(seed + 2, projection=True),
        tokenizer=clip_tokenizer(), text_encoder_2=_clip_text(seed + 3, projection=True), tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5(seed + 4, d_model=64), tokenizer_3=t5_tokenizer(), transformer=transformer)


def build_wan(seed: int = 0):
    """A WanPipeline (2.1 text-to-video): 2 layers, 2 heads x 16, UMT5, a tiny Wan VAE (4x8x8 compression)."""
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
    _seeded(seed)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                        in_channels=TINY_LATENT_CHANNELS, out_channels=TINY_LATENT_CHANNELS,
                                        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32).eval()
    _seeded(seed + 1)
    vae = AutoencoderKLWan(base_dim=8, z_dim=TINY_LATENT_CHANNELS, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True],
                           latents_mean=[0.0] * TINY_LATENT_CHANNELS, latents_std=[1.0] * TINY_LATENT_CHANNELS).eval()
    return WanPipeline(tokenizer=t5_tokenizer(), text_encoder=_t5(seed + 2, umt5=True), transformer=transformer,
                       vae=vae, scheduler=_scheduler())


BUILDERS = {"flux": build_flux, "sd3": build_sd3, "wan": build_wan}


def write_tiny_pipeline(family: str, folder, seed: int = 0, **kwargs) -> Path:
    """Build the tiny ``family`` pipeline and ``save_pretrained`` it into ``folder`` (safetensors)."""
    folder = Path(folder)
    BUILDERS[family](seed, **kwargs).save_pretrained(str(folder), safe_serialization=True)
    return folder
