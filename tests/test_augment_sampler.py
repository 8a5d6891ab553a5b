"""Statistics of the vectorized parameter sampler and the errors bad input gets.

The statistical bounds are 5-6 standard deviations wide for the sample sizes used (a false failure is
below 1e-6 per check), and still far tighter than any plausible bug (a flipped probability, a wrong range).
"""
import math

import pytest
import torch

from simclr_ext import SimCLRAugment, augment

N = 20000


def _sample(h=96, w=128, **kw):
    # The sampler only looks at sizes: a (N, 3, h, w) batch with zero strides allocates one image.
    images = torch.empty(1, 3, h, w, dtype=torch.uint8).expand(N, -1, -1, -1)
    return SimCLRAugment(**kw).sample(images, torch.Generator().manual_seed(0))


def _rate_ok(flags, p):
    sd = math.sqrt(p * (1 - p) / flags.numel())
    return abs(flags.float().mean().item() - p) <= 6 * sd + 1e-12


def test_probabilities():
    params = _sample(size=32, solarize_p=0.3)
    assert _rate_ok(params.flip, 0.5)
    assert _rate_ok(params.jitter, 0.8)
    assert _rate_ok(params.grayscale, 0.2)
    assert _rate_ok(params.blur, 0.5)
    assert _rate_ok(params.solarize, 0.3)
    off = _sample(size=32, flip_p=0.0, jitter_p=0.0, grayscale_p=1.0, blur_p=0.0)
    assert not off.flip.any() and not off.jitter.any() and off.grayscale.all() and not off.blur.any()


def test_crops_within_scale_and_ratio():
    params = _sample(size=32)
    area = (params.height * params.width).double() / (96 * 128)
    ratio = params.width.double() / params.height.double()
    # Rounding w and h to integers moves area and ratio by at most ~1/side.
    assert area.min() >= 0.08 - 0.03 and area.max() <= 1.0
    assert ratio.min() >= 0.75 - 0.1 and ratio.max() <= 4 / 3 + 0.1
    assert (params.top >= 0).all() and (params.left >= 0).all()
    assert (params.top + params.height <= 96).all() and (params.left + params.width <= 128).all()


def test_crop_distribution():
    # Square sources and areas <= 0.3: every first attempt fits, so the sampler's laws show undistorted.
    params = _sample(h=128, w=128, size=32, scale=(0.08, 0.3))
    area = (params.height * params.width).double() / 128**2
    ratio = params.width.double() / params.height.double()
    assert abs(area.mean().item() - 0.19) < 0.01  # uniform area on [0.08, 0.3]
    assert area.min() >= 0.08 - 0.03 and area.max() <= 0.3 + 0.03
    # Log-uniform ratio, symmetric in log: as many wide crops as tall ones.
    wide, tall = (ratio > 1).double().mean().item(), (ratio < 1).double().mean().item()
    assert abs(wide - tall) < 6 * math.sqrt(0.5 / N) * 2
    # Positions uniform over the free range: the mean relative position is 1/2.
    free = (128 - params.height).double()
    rel = params.top.double() / free
    assert abs(rel.mean().item() - 0.5) < 0.01


def test_center_crop_fallback():
    # A 1 x 200 strip fits no crop with ratio in [3/4, 4/3] of the target areas: the fallback crops the
    # center with the ratio clamped (torchvision: h = height, w = round(h * max ratio)).
    aug = SimCLRAugment(size=8, blur_kernel=3)
    p = aug.sample(torch.empty(50, 3, 1, 200, dtype=torch.uint8), torch.Generator().manual_seed(0))
    assert (p.height == 1).all() and (p.width == 1).all() and (p.left == 99).all() and (p.top == 0).all()
    aug = SimCLRAugment(size=8, blur_kernel=3, layout="NCHW")  # a 3 x 3 image needs its layout named
    p = aug.sample(torch.empty(50, 3, 3, 3, dtype=torch.uint8), torch.Generator().manual_seed(0))
    assert ((p.height * p.width) >= 1).all() and (p.height <= 3).all() and (p.width <= 3).all()


def test_jitter_factor_ranges_and_order():
    params = _sample(size=32, jitter_strength=0.5)
    for name in ("brightness", "contrast", "saturation"):
        f = getattr(params, name)
        assert f.min() >= 0.6 and f.max() <= 1.4 and abs(f.mean().item() - 1.0) < 0.01
    assert params.hue.min() >= -0.1 and params.hue.max() <= 0.1 and abs(params.hue.mean().item()) < 0.005
    assert (params.order.sort(dim=1).values == torch.arange(4)).all()
    # Each op is first in about a quarter of the samples.
    first = params.order[:, 0]
    for op in range(4):
        assert _rate_ok(first == op, 0.25)
    assert params.sigma.min() >= 0.1 and params.sigma.max() <= 2.0


def test_rotation_range():
    params = _sample(size=32, rotation_degrees=15.0)
    assert params.angle.min() >= -15 and params.angle.max() <= 15 and params.angle.abs().mean() > 6
    none = _sample(size=32)
    assert (none.angle == 0).all()


def test_sampling_is_reproducible_and_cpu_only():
    aug = SimCLRAugment(size=16)
    imgs = torch.empty(8, 3, 20, 20, dtype=torch.uint8)
    a = aug.sample(imgs, torch.Generator().manual_seed(5))
    b = aug.sample(imgs, torch.Generator().manual_seed(5))
    assert torch.equal(a.packed(), b.packed())
    c = aug.sample(imgs, torch.Generator().manual_seed(6))
    assert not torch.equal(a.packed(), c.packed())


# ---------------------------------------------------------------------------------------------------
# Bad input


def _good(b=2):
    images = torch.randint(0, 256, (b, 3, 16, 16), dtype=torch.uint8)
    aug = SimCLRAugment(size=8, blur_kernel=3)
    return images, aug, aug.sample(images, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kw, exc, match", [
    (dict(size=0), ValueError, "size must be positive"),
    (dict(size=(8, -1)), ValueError, "size must be positive"),
    (dict(size=2.5), TypeError, "size must be an int"),
    (dict(flip_p=1.5), ValueError, "flip_p must be a probability"),
    (dict(jitter_p=-0.1), ValueError, "jitter_p must be a probability"),
    (dict(grayscale_p=2), ValueError, "grayscale_p must be a probability"),
    (dict(blur_p=float("nan")), ValueError, "blur_p must be a probability"),
    (dict(solarize_p=1.01), ValueError, "solarize_p must be a probability"),
    (dict(scale=(0.9, 0.1)), ValueError, "scale must be a finite range with min <= max"),
    (dict(ratio=(2.0, 0.5)), ValueError, "ratio must be a finite range with min <= max"),
    (dict(blur_sigma=(2.0, 0.1)), ValueError, "blur_sigma must be a finite range"),
    (dict(scale=(0.0, 1.5)), ValueError, "scale must lie within"),
    (dict(blur_kernel=4), ValueError, "blur_kernel must be an odd int"),
    (dict(size=8, blur_kernel=17), ValueError, "blur_kernel must be an odd int"),
    (dict(rotation_degrees=-5), ValueError, "rotation_degrees must be in"),
    (dict(jitter_strength=2.0), ValueError, "jitter_strength must be in"),
    (dict(out_dtype=torch.float64), TypeError, "out_dtype must be"),
    (dict(mean=(0.5, 0.5, 0.5), std=None), ValueError, "mean and std must be given together"),
    (dict(std=(0.2, 0.0, 0.2)), ValueError, "std must be non-zero"),
])
def test_constructor_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        SimCLRAugment(**kw)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'imagenet21k'"):
        SimCLRAugment.preset("imagenet21k")


def test_image_errors():
    images, aug, params = _good()
    with pytest.raises(TypeError, match="images must be uint8 .* or floating point .* got torch.int32"):
        augment(images.int(), params)
    with pytest.raises(ValueError, match=r"images must be 4-D .* got shape \(3, 16, 16\)"):
        augment(images[0], params)
    with pytest.raises(ValueError, match="images must have 1 or 3 channels"):
        aug.sample(torch.zeros(2, 4, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="images must have 1 or 3 channels"):
        augment(torch.zeros(2, 2, 16, 16, dtype=torch.uint8), params)
    with pytest.raises(ValueError, match="empty batch"):
        aug.sample(torch.zeros(0, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="empty list"):
        aug.sample([])
    with pytest.raises(ValueError, match="params has 2 samples but images has 3"):
        augment(torch.zeros(3, 3, 16, 16, dtype=torch.uint8), params)
    with pytest.raises(ValueError, match=r"images\[1\] must be 3-D"):
        aug.sample([images[0], images[1:]])
    with pytest.raises(ValueError, match="all have 1 or all have 3 channels"):
        aug.sample([images[0], images[1, :1]])
    with pytest.raises(ValueError, match="layout must be"):
        augment(images, params, layout="CHW")
    with pytest.raises(TypeError, match="params must be AugmentParams"):
        augment(images, params.packed())
    with pytest.raises(TypeError, match="out_dtype must be"):
        augment(images, params, out_dtype=torch.int8)
    with pytest.raises(ValueError, match="mean and std must have one value per channel"):
        augment(images, params, mean=(0.5,), std=(0.2,))
    with pytest.raises(ValueError, match="generator must be a CPU torch.Generator"):
        aug.sample(images, type("CudaGenerator", (), {"device": torch.device("cuda")})())


def test_op_rejects_bad_params():
    images, aug, params = _good()
    params.height[0] = 17  # crop box outside the 16 x 16 image
    with pytest.raises(RuntimeError, match="crop box of sample 0 .* must be integral and inside its 16x16 image"):
        augment(images, params)
    _, _, params = _good()
    params.order[1] = torch.tensor([0, 0, 1, 2])
    params.jitter[1] = True
    with pytest.raises(RuntimeError, match="order of sample 1 must be a permutation"):
        augment(images, params)
    _, _, params = _good()
    params.blur[0], params.sigma[0] = True, 0.0
    with pytest.raises(RuntimeError, match="sigma of sample 0 must be > 0"):
        augment(images, params)
    _, _, params = _good()
    src = images.reshape(-1)
    args = [src, torch.tensor([0, 768]), torch.tensor([[16, 16], [16, 16]]), params.packed(), 3, False, 8, 8, 3, 0.5,
            [], [], torch.float32, False]
    bad = list(args)
    bad[1] = torch.tensor([0, 800])  # image 1 runs past the end of src
    with pytest.raises(RuntimeError, match="image 1 .* lies outside src"):
        torch.ops.simclr_ext.augment(*bad)
    bad = list(args)
    bad[8] = 4
    with pytest.raises(RuntimeError, match="blur_kernel must be odd"):
        torch.ops.simclr_ext.augment(*bad)
    bad = list(args)
    bad[0] = src.to(torch.int16)
    with pytest.raises(RuntimeError, match="src must be uint8 or float32, got Short"):
        torch.ops.simclr_ext.augment(*bad)
    bad = list(args)
    bad[4] = 2
    with pytest.raises(RuntimeError, match="channels must be 1 or 3, got 2"):
        torch.ops.simclr_ext.augment(*bad)
    bad = list(args)
    bad[3] = params.packed()[:, :10]
    with pytest.raises(RuntimeError, match=r"params must be float32 of shape \[2, 19\]"):
        torch.ops.simclr_ext.augment(*bad)
