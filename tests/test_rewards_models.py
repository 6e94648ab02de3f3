"""Model-based rewards on tiny random-weight instances of the SAME classes, through the real loaders.

Every scorer: save -> load round trip through ``branchgrpo.rewards`` (any missing or unexpected key
fails), deterministic scores, gradients to the pixels, video aggregation. Plus the missing-weights
error text, offline behaviour (sockets blocked), the ImageReward transformers-5 shims and tokenizer
guards, and the real architectures' key sets (built on the meta device or without init).
"""
from __future__ import annotations

import json
import math
import socket
import sys
import warnings

import pytest
import torch

import tiny_rewards as tr
from branchgrpo.rewards import MODEL_CARDS, RewardLoadError, WeightsNotFoundError, make_reward
from branchgrpo.rewards.base import aggregate_video, clip_preprocess, select_frames, temporal_flicker_score
from branchgrpo.rewards.files import clear_cache, find_file, find_folder, load_state_dict_file

PROMPTS = ["a cat", "a red house", "two dogs on a beach"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("reward_models")
    paths = tr.write_all_tiny_rewards(d)
    paths["hps_v2.1"] = tr.write_tiny_hps(d)
    return d, paths


LOADERS = {
    "clip_score": {},
    "pickscore": {},
    "aesthetic": {},
    "imagereward": {"checkpoint": "ImageReward/ImageReward.pt"},
    "hps_v2.1": {"arch": tr.TINY_OPEN_CLIP},
}


def _load(name, d, **kw):
    return make_reward(name, search_dirs=[d], **{**LOADERS[name], **kw})


@pytest.fixture(scope="module")
def scorers(tiny_dir):
    d, _ = tiny_dir
    return {name: _load(name, d) for name in LOADERS}


# ------------------------------------------------------------------------ every scorer ---

@pytest.mark.parametrize("name", list(LOADERS))
def test_scores_shape_determinism_and_spread(name, scorers, tiny_dir):
    s = scorers[name]
    assert s.name == name and s.differentiable
    x = tr.tiny_images(3, size=40)
    a = s(x, PROMPTS)
    assert a.shape == (3,) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, s(x, PROMPTS)), "not deterministic"
    # a fresh load of the same files gives the same scores
    clear_cache()
    b = _load(name, tiny_dir[0])(x, PROMPTS)
    assert torch.allclose(a, b, atol=1e-6)
    assert float(a.max() - a.min()) > 1e-4, f"{name}: scores do not depend on the image/prompt: {a}"
    # one prompt string for the whole batch == the list of identical prompts
    assert torch.allclose(s(x, "a cat"), s(x, ["a cat"] * 3), atol=1e-6)
    # batching does not change scores
    s1 = _load(name, tiny_dir[0], batch_size=1)
    assert torch.allclose(s1(x, PROMPTS), a, atol=1e-5)
    # the non-square input path: resize of the short side + centre crop
    assert s(tr.tiny_images(2, size=64)[:, :, :48], ["a", "b"]).shape == (2,)
    assert s(x[:0], []).shape == (0,)


@pytest.mark.parametrize("name", list(LOADERS))
def test_gradients_reach_the_pixels_only_when_asked(name, scorers):
    s = scorers[name]
    x = tr.tiny_images(2, size=40).requires_grad_(True)
    y = s(x, PROMPTS[:2])
    assert not y.requires_grad  # default: no_grad inside
    y = s(x, PROMPTS[:2], grad=True)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0
    assert all(not p.requires_grad for m in s.modules() for p in m.parameters()), "scorer weights must stay frozen"


@pytest.mark.parametrize("name", list(LOADERS))
def test_video_leaves_are_scored_per_frame_and_averaged(name, scorers):
    s = scorers[name]
    v = tr.tiny_images(2, size=32, video_frames=3, seed=4)
    got = s(v, ["a cat", "a dog"])
    frames = torch.stack([s(v[:, t], ["a cat", "a dog"]) for t in range(3)], dim=1)
    assert torch.allclose(got, frames.mean(dim=1), atol=1e-5)


def test_video_temporal_term_and_frame_subsampling(tiny_dir):
    s = _load("clip_score", tiny_dir[0], temporal_weight=2.0, max_frames=2)
    v = tr.tiny_images(2, size=32, video_frames=5, seed=5)
    idx = select_frames(5, 2)
    assert idx.tolist() == [0, 4]
    plain = _load("clip_score", tiny_dir[0])
    frames = torch.stack([plain(v[:, t], "x") for t in idx.tolist()], dim=1)
    want = frames.mean(dim=1) + 2.0 * temporal_flicker_score(v[:, idx])
    assert torch.allclose(s(v, "x"), want, atol=1e-5)


def test_aggregate_video_arithmetic():
    scores = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 3.0]])
    still = torch.full((2, 3, 4, 4, 3), 0.5)
    assert torch.allclose(aggregate_video(scores), torch.tensor([2.0, 1.0]))
    assert torch.allclose(aggregate_video(scores, still, 0.5), torch.tensor([2.5, 1.5]))
    flicker = still.clone()
    flicker[:, 1] = 0.0  # |0.5 - 0| twice over two transitions -> mean diff 0.5
    assert torch.allclose(temporal_flicker_score(flicker), torch.tensor([0.5, 0.5]))
    assert select_frames(10, None).tolist() == list(range(10)) and select_frames(3, 8).tolist() == [0, 1, 2]


def test_clip_preprocess_matches_resize_crop_normalise():
    x = torch.rand(1, 30, 60, 3)
    out = clip_preprocess(x, 16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert out.shape == (1, 3, 16, 16)
    ref = torch.nn.functional.interpolate(x.permute(0, 3, 1, 2), size=(16, 32), mode="bicubic", antialias=True,
                                          align_corners=False)[..., 8:24].clamp(0, 1)
    assert torch.allclose(out, ref, atol=1e-6)


def test_bad_inputs_are_rejected(scorers):
    s = scorers["clip_score"]
    with pytest.raises(ValueError, match="ComfyUI IMAGE layout"):
        s(torch.rand(2, 3, 32, 32), "x")
    with pytest.raises(ValueError, match="3 prompts for 2 images|got 3 prompts"):
        s(torch.rand(2, 32, 32, 3), PROMPTS)
    with pytest.raises(ValueError, match="batch_size"):
        _load("clip_score", "/nonexistent", batch_size=0) if False else type(s)(s.model, s.tokenizer, batch_size=0)


# ------------------------------------------------------------------ strict loading ---

def _tamper(path, drop=None, add=None):
    sd = torch.load(path, weights_only=True)
    inner = sd["state_dict"] if "state_dict" in sd else sd
    if drop:
        inner.pop(drop)
    if add:
        inner[add] = torch.zeros(1)
    torch.save(sd, path)


@pytest.mark.parametrize("name,key", [("imagereward", "mlp.layers.0.weight"), ("hps_v2.1", "logit_scale"),
                                      ("aesthetic", "layers.7.bias")])
def test_missing_or_unexpected_keys_fail(name, key, tmp_path):
    writers = {"imagereward": lambda d: tr.write_tiny_imagereward(d), "hps_v2.1": lambda d: tr.write_tiny_hps(d),
               "aesthetic": lambda d: tr.write_tiny_aesthetic(d)}
    kw = {"hps_v2.1": {"arch": tr.TINY_OPEN_CLIP}}.get(name, {})
    if name == "aesthetic":
        tr.write_tiny_clip(tmp_path / "clip-vit-large-patch14")
    path = writers[name](tmp_path)
    _tamper(path, drop=key)
    with pytest.raises(RewardLoadError, match=r"Missing keys \(1\): " + key.replace(".", r"\.")):
        make_reward(name, search_dirs=[tmp_path], **kw)
    path = writers[name](tmp_path)
    _tamper(path, add="extra.weight")
    with pytest.raises(RewardLoadError, match=r"Unexpected keys \(1\): extra\.weight"):
        make_reward(name, search_dirs=[tmp_path], **kw)


@pytest.mark.parametrize("name", ["clip_score", "pickscore"])
def test_clip_folder_missing_or_unexpected_keys_fail(name, tmp_path):
    from safetensors.torch import load_file, save_file
    folder = tmp_path / MODEL_CARDS["clip" if name == "clip_score" else "pickscore"].files[0]
    tr.write_tiny_clip(folder)
    sd = load_file(folder / "model.safetensors")
    sd.pop("visual_projection.weight")
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RewardLoadError, match="visual_projection.weight"):
        make_reward(name, search_dirs=[tmp_path])
    sd = load_file(folder / "model.safetensors")
    tr.write_tiny_clip(folder)
    sd = load_file(folder / "model.safetensors")
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # old checkpoints carry it: tolerated
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    clear_cache()
    make_reward(name, search_dirs=[tmp_path])
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    clear_cache()
    with pytest.raises(RewardLoadError, match="extra.weight"):
        make_reward(name, search_dirs=[tmp_path])


def test_safetensors_and_wrapped_checkpoints_load(tmp_path):
    p = tr.write_tiny_aesthetic(tmp_path, name="sac+logos+ava1-l14-linearMSE.safetensors")
    tr.write_tiny_clip(tmp_path / "clip-vit-large-patch14")
    s = make_reward("aesthetic", search_dirs=[tmp_path])
    ref = make_reward("aesthetic", tr.write_tiny_aesthetic(tmp_path / "pth"), search_dirs=[tmp_path])
    x = tr.tiny_images(2)
    assert torch.allclose(s(x), ref(x))
    sd = load_state_dict_file(p)
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, tmp_path / "wrapped.pth")
    assert set(load_state_dict_file(tmp_path / "wrapped.pth")) == set(sd)


class PickledArgs:  # an arbitrary class: weights_only=True refuses to unpickle it
    pass


def test_pickled_objects_are_refused(tmp_path):
    bad = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": PickledArgs()}, bad)
    with pytest.raises(RewardLoadError, match="weights_only=True"):
        load_state_dict_file(bad)


def test_mismatched_med_config_is_reported(tmp_path):
    path = tr.write_tiny_imagereward(tmp_path)
    cfg = json.loads((tmp_path / "med_config.json").read_text())
    cfg["hidden_size"] = 48
    cfg["num_attention_heads"] = 2
    other = tmp_path / "other_med.json"
    other.write_text(json.dumps(cfg))
    with pytest.raises(RewardLoadError, match="Shape mismatches.*other_med.json"):
        make_reward("imagereward", path, med_config=other)


# -------------------------------------------------------------- missing weights ---

@pytest.mark.parametrize("key,names,publisher", [
    ("imagereward", ["ImageReward.pt"], "THUDM/ImageReward"),
    ("hps_v2.1", ["HPS_v2.1_compressed.pt"], "xswu/HPSv2"),
    ("pickscore", ["PickScore_v1"], "yuvalkirstain/PickScore_v1"),
    ("clip", ["clip-vit-large-patch14"], "openai/clip-vit-large-patch14"),
    ("aesthetic", ["sac+logos+ava1-l14-linearMSE.pth"], "improved-aesthetic-predictor"),
])
def test_missing_weights_error_names_files_folder_and_publisher(key, names, publisher, tmp_path, empty_hub_cache):
    find = find_folder if MODEL_CARDS[key].kind == "folder" else find_file
    with pytest.raises(WeightsNotFoundError) as err:
        find(key, None, [tmp_path / "reward_models"], where="Some Loader")
    msg = str(err.value)
    assert msg.startswith("Some Loader: ")
    for n in names:
        assert repr(n) in msg
    assert str(tmp_path / "reward_models") in msg and "models/reward_models" in msg
    assert publisher in msg and "nothing is downloaded" in msg
    if key == "pickscore":
        assert "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in msg


def test_missing_weights_through_make_reward(tmp_path, empty_hub_cache):
    with pytest.raises(WeightsNotFoundError, match="HPS_v2.1_compressed.pt"):
        make_reward("hps_v2.1", search_dirs=[tmp_path])
    with pytest.raises(WeightsNotFoundError, match="clip-vit-large-patch14"):
        tr.write_tiny_aesthetic(tmp_path)
        make_reward("aesthetic", search_dirs=[tmp_path])


# --------------------------------------------------------------------- offline ---

@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def no_network(monkeypatch):
    attempts = []

    def refuse(*a, **k):
        attempts.append(a)
        raise OSError("network disabled by test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.mark.parametrize("offline", ["1", None])
def test_no_network_is_ever_attempted(offline, tiny_dir, empty_hub_cache, no_network, monkeypatch, tmp_path):
    if offline is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    clear_cache()
    d, _ = tiny_dir
    x = tr.tiny_images(2)
    for name in LOADERS:
        assert _load(name, d)(x, PROMPTS[:2]).shape == (2,)
    for key in ("imagereward", "pickscore", "clip", "hps_v2.1", "aesthetic"):
        find = find_folder if MODEL_CARDS[key].kind == "folder" else find_file
        with pytest.raises(WeightsNotFoundError):
            find(key, None, [tmp_path / "nothing"])
    assert no_network == [], f"network attempted: {no_network[:3]}"


def test_hub_cache_snapshot_is_used_offline(empty_hub_cache, no_network):
    repo = empty_hub_cache / "models--openai--clip-vit-large-patch14"
    snap = repo / "snapshots" / ("0" * 40)
    tr.write_tiny_clip(snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    assert find_folder("clip", None, []) == snap
    assert find_folder("clip", "hf:openai/clip-vit-large-patch14", []) == snap
    s = make_reward("clip_score", search_dirs=[])
    assert s(tr.tiny_images(1), "a cat").shape == (1,)
    assert no_network == []


# --------------------------------------------------------- real architectures ---

def test_hps_real_architecture_has_the_checkpoint_keys():
    import open_clip
    with torch.device("meta"):
        m = open_clip.create_model("ViT-H-14", pretrained=None, load_weights=False, pretrained_text=False,
                                   device="meta")
    assert len(m.state_dict()) == 686  # the number of tensors in HPS_v2.1_compressed.pt's state_dict


def test_aesthetic_keys_match_improved_aesthetic_predictor():
    from branchgrpo.rewards.aesthetic import AestheticMLP
    keys = list(AestheticMLP(768).state_dict())
    assert keys == [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]


def test_imagereward_builder_matches_the_official_constructor():
    """The package's own ImageReward.__init__ (ViT-L, shipped med_config) and our builder with the vision
    size read from the state dict give identical keys and shapes: the official checkpoint's layout."""
    from branchgrpo.rewards.files import skip_init
    from branchgrpo.rewards.imagereward import MED_CONFIG, build_imagereward, infer_vision_config, load_bert_tokenizer
    from branchgrpo.rewards.imagereward_compat import import_imagereward
    ir = import_imagereward()
    tok = load_bert_tokenizer()
    bp, vit = ir.modules.blip_pretrain, ir.modules.vit
    saved = bp.init_tokenizer, vit.trunc_normal_
    bp.init_tokenizer, vit.trunc_normal_ = (lambda: tok), (lambda t, *a, **k: t)
    try:
        with skip_init():
            official = ir.ImageReward(med_config=str(MED_CONFIG), device="cpu")
    finally:
        bp.init_tokenizer, vit.trunc_normal_ = saved
    osd = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    del official
    vision = infer_vision_config({k: torch.empty(s, device="meta") for k, s in osd.items()})
    assert vision == dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0,
                          qkv_bias=True)
    mine = build_imagereward(MED_CONFIG, vision, tok)
    msd = {k: tuple(v.shape) for k, v in mine.state_dict().items()}
    assert msd == osd and len(msd) == 625
    # BERT-base with cross-attention to the 1024-wide ViT-L tokens (REWARDS.md: 303 M + 142 M parameters)
    assert msd["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"] == (768, 1024)
    assert msd["blip.text_encoder.embeddings.word_embeddings.weight"] == (30524, 768)
    assert msd["mlp.layers.0.weight"] == (1024, 768) and msd["mlp.layers.7.weight"] == (1, 16)
    count = lambda prefix: sum(math.prod(s) for k, s in msd.items() if k.startswith(prefix))  # noqa: E731
    assert 302e6 < count("blip.visual_encoder.") < 305e6 and 141e6 < count("blip.text_encoder.") < 143e6


# ---------------------------------------------------------- ImageReward compat ---

def test_imagereward_import_is_private_and_side_effect_free():
    import transformers
    from branchgrpo.rewards.imagereward_compat import ALIAS, import_imagereward
    verbosity = transformers.logging.get_verbosity()
    filters = list(warnings.filters)
    ir = import_imagereward()
    assert ir.ImageReward.__module__ == ALIAS + ".ImageReward"
    assert "ImageReward" not in sys.modules and "clip" not in sys.modules and "datasets" not in sys.modules
    assert transformers.logging.get_verbosity() == verbosity
    assert list(warnings.filters) == filters


def test_transformers_helpers_shims():
    import transformers.modeling_utils as mu
    from branchgrpo.rewards.imagereward_compat import (find_pruneable_heads_and_indices, import_imagereward,
                                                       install_transformers_helpers)
    import_imagereward()
    install_transformers_helpers()
    for name in ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer"):
        assert callable(getattr(mu, name))
    heads, index = find_pruneable_heads_and_indices([1], 3, 2, set())
    assert heads == {1} and index.tolist() == [0, 1, 4, 5]
    lin = torch.nn.Linear(4, 6)
    pruned = mu.prune_linear_layer(lin, index)
    assert pruned.weight.shape == (4, 4) and torch.equal(pruned.weight, lin.weight[index])
    doubled = mu.apply_chunking_to_forward(lambda t: 2 * t, 2, 1, torch.ones(1, 4, 3))
    assert torch.equal(doubled, 2 * torch.ones(1, 4, 3))


def test_imagereward_attention_mask_shim(tmp_path):
    from branchgrpo.rewards.imagereward_compat import import_imagereward
    ir = import_imagereward()
    cfg = ir.BertConfig(**{k: v for k, v in tr.tiny_med_config().items() if k != "architectures"})
    model = ir.BertModel(cfg, add_pooling_layer=False)
    ext = model.invert_attention_mask(torch.tensor([[1, 0]]))
    assert ext.shape == (1, 1, 1, 2) and ext[0, 0, 0, 0] == 0 and ext[0, 0, 0, 1] == torch.finfo(ext.dtype).min
    assert model.get_head_mask(None, 3) == [None, None, None]


def test_imagereward_tokenizer_is_full_and_offline(no_network):
    from branchgrpo.rewards.imagereward import load_bert_tokenizer
    tok = load_bert_tokenizer()
    assert len(tok) == 30524 and tok.convert_tokens_to_ids("[DEC]") == 30522 and tok.enc_token_id == 30523
    assert tok("a photo of a cat", add_special_tokens=False).input_ids == [1037, 6302, 1997, 1037, 4937]
    assert no_network == []


def test_imagereward_rejects_an_unk_tokenizer(tmp_path):
    from branchgrpo.rewards.imagereward import load_bert_tokenizer
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) + "\n")
    with pytest.raises(RewardLoadError, match="tokens|UNK"):
        load_bert_tokenizer(tmp_path)


def test_shipped_bert_vocab_is_bert_base_uncased():
    import hashlib
    from branchgrpo.rewards.imagereward import BERT_VOCAB
    data = (BERT_VOCAB / "vocab.txt").read_bytes()
    assert hashlib.sha256(data).hexdigest() == "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
    assert len(data.decode().splitlines()) == 30522


def test_clip_tokenizer_from_open_clip_matches_open_clip_ids():
    import open_clip
    from branchgrpo.rewards.clip_models import clip_tokenizer_from_open_clip
    tok = clip_tokenizer_from_open_clip()
    prompts = ["A photo of a cat, riding a bicycle!", "an astronaut in the jungle, ultra-detailed 8k", "a" * 300]
    ours = tok(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids
    ref = open_clip.get_tokenizer("ViT-H-14")(prompts)
    real = ref != 0  # open_clip pads with 0, transformers with <|endoftext|>
    assert torch.equal(ours[real], ref[real]) and len(tok) == 49408


# ------------------------------------------------------ reference inference paths ---

def _pil(x):
    from PIL import Image
    return Image.fromarray((x * 255).round().to(torch.uint8).numpy())


def test_imagereward_matches_the_packages_own_score(scorers):
    """The package's own PIL-based ``ImageReward.score(prompt, image)`` (running on transformers 5 through
    the shims) gives the same number as our batched tensor path (at the model's size: no resampling)."""
    s = scorers["imagereward"]
    x = (tr.tiny_images(2, size=tr.TINY_IMAGE_SIZE, seed=7) * 255).round() / 255
    ours = s(x, ["a cat", "a red house"])
    ref = [s.model.score(p, _pil(img)) for p, img in zip(["a cat", "a red house"], x)]
    assert ours.tolist() == pytest.approx(ref, abs=1e-5)


def test_pickscore_matches_transformers_processor_path(scorers, tiny_dir):
    """Reference PickScore code: CLIPProcessor -> get_*_features -> normalise -> logit_scale.exp() * dot."""
    from transformers import CLIPImageProcessor
    s = scorers["pickscore"]
    folder = tiny_dir[1]["pickscore"]
    proc = CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
    x = (tr.tiny_images(2, size=tr.TINY_IMAGE_SIZE, seed=8) * 255).round() / 255
    prompts = ["a cat", "a red house"]
    with torch.no_grad():
        px = proc(images=[_pil(i) for i in x], return_tensors="pt").pixel_values
        ids = s.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        from branchgrpo.rewards.clip_models import _embeds
        img = _embeds(s.model.get_image_features(pixel_values=px))
        txt = _embeds(s.model.get_text_features(**ids))
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        ref = s.model.logit_scale.exp() * (img * txt).sum(-1)
    assert torch.allclose(s(x, prompts), ref, atol=1e-4)


def test_hps_matches_open_clip_transform_path(scorers):
    import open_clip
    s = scorers["hps_v2.1"]
    _, _, preprocess = open_clip.create_model_and_transforms(tr.TINY_OPEN_CLIP, pretrained=None, load_weights=False,
                                                             pretrained_text=False)
    x = (tr.tiny_images(2, size=tr.TINY_IMAGE_SIZE, seed=9) * 255).round() / 255
    prompts = ["a cat", "a red house"]
    with torch.no_grad():
        px = torch.stack([preprocess(_pil(i)) for i in x])
        img = s.model.encode_image(px, normalize=True)
        txt = s.model.encode_text(s.tokenizer(prompts), normalize=True)
        ref = (img * txt).sum(-1)
    assert torch.allclose(s(x, prompts), ref, atol=1e-5)
