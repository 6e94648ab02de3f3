import io

import numpy as np
import pytest
import torch
from PIL import Image

from branchgrpo.rewards.base import Reward
from branchgrpo.rewards.weight_free import (
    WEIGHT_FREE_REWARDS,
    Brightness,
    Colorfulness,
    Contrast,
    JpegCompressibility,
    JpegIncompressibility,
    Saturation,
    make_weight_free,
)

DIFFERENTIABLE = ["colorfulness", "saturation", "brightness", "contrast"]


def _flat(n=1, h=64, w=64, rgb=(0.2, 0.5, 0.7)):
    return torch.tensor(rgb, dtype=torch.float32).expand(n, h, w, 3).clone()


def _noise(n=1, h=64, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, h, w, 3, generator=g)


def _mixed_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, 48).view(1, 48, 1, 1).expand(1, 48, 48, 3).clone()
    return torch.cat(
        [
            _flat(1, 48, 48),
            torch.rand(1, 48, 48, 3, generator=g),
            ramp,
            _flat(1, 48, 48, (0.9, 0.1, 0.1)) * 0.7 + 0.3 * torch.rand(1, 48, 48, 3, generator=g),
        ]
    )


def test_registry_names_and_protocol():
    assert set(WEIGHT_FREE_REWARDS) >= {"jpeg_compressibility", "jpeg_incompressibility", *DIFFERENTIABLE}
    for name, cls in WEIGHT_FREE_REWARDS.items():
        r = make_weight_free(name)
        assert isinstance(r, cls)
        assert r.name == name
        assert isinstance(r, Reward)
        assert isinstance(r.differentiable, bool)
    assert make_weight_free("jpeg_compressibility", quality=50).quality == 50


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        make_weight_free("aesthetic_v9")
    for name in WEIGHT_FREE_REWARDS:
        assert name in str(info.value)


def test_jpeg_flat_more_compressible_than_noise():
    comp = JpegCompressibility()
    incomp = JpegIncompressibility()
    images = torch.cat([_flat(), _noise()])
    c = comp(images, ["a", "b"])
    i = incomp(images, ["a", "b"])
    assert c.dtype == torch.float32 and c.shape == (2,)
    assert c[0] > c[1]
    assert torch.equal(i, -c)
    assert (c < 0).all()
    assert JpegCompressibility.differentiable is False
    assert JpegIncompressibility.differentiable is False


def test_jpeg_matches_reference_pil_size():
    img = _noise(1, 32, 40, seed=3)
    buf = io.BytesIO()
    arr = (img[0].numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).save(buf, format="JPEG", quality=80)
    expected = -len(buf.getvalue()) / 1000.0
    got = JpegCompressibility(quality=80)(img, [""])
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_jpeg_quality_matters_and_is_validated():
    img = _noise(1, 64, 64)
    assert JpegIncompressibility(quality=95)(img, [""]) > JpegIncompressibility(quality=30)(img, [""])
    with pytest.raises(ValueError):
        JpegCompressibility(quality=0)


@pytest.mark.parametrize("name", sorted(WEIGHT_FREE_REWARDS))
def test_deterministic_and_batch_equals_per_image(name):
    reward = make_weight_free(name)
    images = _mixed_batch()
    prompts = ["p"] * images.shape[0]
    a = reward(images, prompts)
    b = reward(images.clone(), prompts)
    assert a.shape == (images.shape[0],) and a.dtype == torch.float32
    assert torch.equal(a, b)
    singles = torch.cat([reward(images[i : i + 1], ["p"]) for i in range(images.shape[0])])
    torch.testing.assert_close(a, singles, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(a).all()


@pytest.mark.parametrize("name", sorted(WEIGHT_FREE_REWARDS))
def test_video_scores_mean_over_frames(name):
    reward = make_weight_free(name)
    frames = _mixed_batch()  # 4 frames
    video = torch.stack([frames, frames.flip(0)])  # [2, 4, H, W, 3]
    out = reward(video, ["a", "b"])
    assert out.shape == (2,) and out.dtype == torch.float32
    per_frame = reward(frames, ["x"] * 4)
    torch.testing.assert_close(out, per_frame.mean().expand(2), rtol=1e-5, atol=1e-6)


def test_bad_inputs():
    r = Colorfulness()
    with pytest.raises(ValueError):
        r(torch.rand(2, 3, 8, 8), ["a", "b"])  # channels-first
    with pytest.raises(ValueError):
        r(torch.rand(2, 8, 8, 3), ["a"])  # prompt count mismatch
    assert r(torch.rand(0, 8, 8, 3), []).shape == (0,)


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_differentiable_rewards_have_gradients(name):
    reward = make_weight_free(name)
    assert reward.differentiable is True
    images = (_mixed_batch(seed=1) * 0.8 + 0.1).requires_grad_(True)
    out = reward(images, ["p"] * images.shape[0])
    out.sum().backward()
    assert images.grad is not None
    assert torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0


def test_differentiable_reward_gradient_on_grey_is_finite():
    grey = torch.full((1, 16, 16, 3), 0.5, requires_grad=True)
    Colorfulness()(grey, ["p"]).sum().backward()
    assert torch.isfinite(grey.grad).all()


def test_colorfulness_values():
    c = Colorfulness()
    grey = torch.full((1, 8, 8, 3), 0.4)
    assert c(grey, [""]).item() == pytest.approx(0.0, abs=0.01)
    # flat pure red: rg = 255, yb = 127.5, no spread -> 0.3 * sqrt(255^2 + 127.5^2)
    red = _flat(1, 8, 8, (1.0, 0.0, 0.0))
    assert c(red, [""]).item() == pytest.approx(0.3 * np.hypot(255.0, 127.5), rel=1e-4)
    # reference numpy implementation on a random image
    img = _noise(1, 20, 20, seed=7)
    x = img[0].numpy().astype(np.float64) * 255
    rg = x[..., 0] - x[..., 1]
    yb = 0.5 * (x[..., 0] + x[..., 1]) - x[..., 2]
    ref = np.sqrt(rg.std() ** 2 + yb.std() ** 2) + 0.3 * np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
    assert c(img, [""]).item() == pytest.approx(ref, rel=1e-4)
    # gradient ascent makes an image more colourful
    x = torch.full((1, 8, 8, 3), 0.5) + 0.01 * torch.rand(1, 8, 8, 3, generator=torch.Generator().manual_seed(0))
    x.requires_grad_(True)
    before = c(x, [""]).item()
    c(x, [""]).sum().backward()
    after = c((x + 1e-3 * x.grad.sign()).clamp(0, 1), [""]).item()
    assert after > before


def test_saturation_brightness_contrast_values():
    assert Saturation()(_flat(1, 4, 4, (1.0, 0.0, 0.0)), [""]).item() == pytest.approx(1.0, abs=1e-3)
    assert Saturation()(_flat(1, 4, 4, (0.3, 0.3, 0.3)), [""]).item() == pytest.approx(0.0, abs=1e-6)
    assert Brightness()(_flat(1, 4, 4, (0.5, 0.5, 0.5)), [""]).item() == pytest.approx(0.0, abs=1e-6)
    assert Brightness(target=1.0)(_flat(1, 4, 4, (0.0, 0.0, 0.0)), [""]).item() == pytest.approx(-1.0)
    assert Contrast()(_flat(1, 4, 4), [""]).item() == pytest.approx(0.0, abs=1e-3)
    half = torch.zeros(1, 4, 4, 3)
    half[:, :2] = 1.0
    assert Contrast()(half, [""]).item() == pytest.approx(0.5, abs=1e-4)
    with pytest.raises(ValueError):
        Brightness(target=2.0)
