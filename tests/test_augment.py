"""Parity of the fused augmentation op with simclr_reference.augment (torchvision v2, float64), on CPU and
CUDA, for every op alone and all together, every output dtype, both layouts and ragged batches.

Tolerances. The reference runs in float64 except adjust_hue (torchvision converts to float32 for it); the
op computes in float32. Its error comes from float32 rounding of the bilinear weights and products (~1e-7
relative), the HSV round trip (a few float32 ulps of values in [0, 1], amplified by the division by the
channel range near gray pixels), the contrast mean (float32 vs float64 sum) and the blur's 2 x k-term
float32 accumulations. Measured worst cases over 40 random batches with every op on are 1.3e-5 (max) and
1.9e-7 (mean) on [0, 1] values; normalization divides by std >= 0.2 (x5). AUGMENT_F32_MAX = 5e-5 and
AUGMENT_F32_MEAN = 2e-6 (tests/parity.py) on [0, 1] values leave a ~4x / ~10x margin and still catch any real
mistake (one wrong pixel, tap, weight or
rounding step is >= 1e-3). For float16 /
bfloat16 outputs the op may be at most 2x as far from the float64 reference as the reference itself rounded
to that dtype (the flash-attention criterion), plus the float32 allowance.
"""
from dataclasses import fields, replace

import pytest
import torch
from parity import AUGMENT_F32_MAX, DEVICES, assert_augment_close_to_reference

import simclr_reference
from simclr_ext import AugmentParams, SimCLRAugment, augment
from simclr_ext.augment import default_blur_kernel


def _images(b, c, h, w, seed, dtype=torch.uint8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, c, h, w), generator=g, dtype=torch.uint8)
    assert x.float().std() > 10  # never constant
    return x if dtype == torch.uint8 else x.to(dtype) / 255


def _check(images, aug, params, device, **kw):
    """Run the op on `device` and compare with the reference on CPU in float64."""
    dev_images = [im.to(device) for im in images] if isinstance(images, list) else images.to(device)
    out = augment(dev_images, params, out_dtype=aug.out_dtype, mean=aug.mean, std=aug.std,
                  solarize_threshold=aug.solarize_threshold, memory_format=aug.memory_format, **kw)
    assert out.device.type == device and out.dtype == aug.out_dtype
    ref_images = images if not kw.get("layout") == "NHWC" else images.permute(0, 3, 1, 2)
    ref = simclr_reference.augment(ref_images, params, mean=aug.mean, std=aug.std,
                                   solarize_threshold=aug.solarize_threshold)
    scale = 1.0 if aug.std is None else 1.0 / min(aug.std)
    assert_augment_close_to_reference(out, ref, scale)
    return out


# Every op alone: the crop is the whole image resized to itself (an exact identity) unless the op is the
# crop; the jitter ops are isolated by setting the other three factors to their identities.
NOTHING = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0,
               mean=None, std=None)
ALONE = {
    "crop": dict(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)),
    "crop_upscale": dict(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), size=40),
    "flip": dict(flip_p=1.0),
    "rotate": dict(rotation_degrees=180.0),
    "brightness": dict(jitter_p=1.0),
    "contrast": dict(jitter_p=1.0),
    "saturation": dict(jitter_p=1.0),
    "hue": dict(jitter_p=1.0),
    "grayscale": dict(grayscale_p=1.0),
    "blur": dict(blur_p=1.0, blur_kernel=5),
    "solarize": dict(solarize_p=1.0),
    "normalize": dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
}
IDENTITY = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", sorted(ALONE))
def test_each_op_alone_matches_reference(op, device):
    images = _images(6, 3, 24, 24, seed=sorted(ALONE).index(op))
    kw = dict(NOTHING, size=24)
    kw.update(ALONE[op])
    aug = SimCLRAugment(**kw)
    params = aug.sample(images, torch.Generator().manual_seed(1))
    if op in IDENTITY:
        for name, ident in IDENTITY.items():
            if name != op:
                getattr(params, name).fill_(ident)
    out = _check(images, aug, params, device)
    if op not in ("crop", "crop_upscale"):  # the op really changed the image
        assert (out.float().cpu() - images.float() / 255).abs().max() > 0.05


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_full_pipeline_matches_reference(out_dtype, device):
    images = _images(8, 3, 40, 36, seed=3)
    aug = SimCLRAugment(size=(28, 32), rotation_degrees=25.0, solarize_p=0.3, out_dtype=out_dtype)
    params = aug.sample(images, torch.Generator().manual_seed(7))
    _check(images, aug, params, device)


@pytest.mark.parametrize("device", DEVICES)
def test_every_branch_together(device):
    """All ops on for every sample, with odd sizes and the imagenet blur kernel rule."""
    images = _images(5, 3, 37, 53, seed=4)
    aug = SimCLRAugment(size=(31, 29), flip_p=1.0, rotation_degrees=40.0, jitter_p=1.0, grayscale_p=1.0,
                        blur_p=1.0, solarize_p=1.0, blur_kernel=7)
    _check(images, aug, aug.sample(images, torch.Generator().manual_seed(2)), device)


@pytest.mark.parametrize("device", DEVICES)
def test_nhwc_and_channels_last_inputs(device):
    images = _images(6, 3, 30, 34, seed=5)
    aug = SimCLRAugment(size=24, rotation_degrees=10.0, blur_kernel=5)
    params = aug.sample(images, torch.Generator().manual_seed(3))
    nchw = _check(images, aug, params, device)
    nhwc = _check(images.permute(0, 2, 3, 1).contiguous(), aug, params, device, layout="NHWC")
    torch.testing.assert_close(nhwc, nchw, rtol=0, atol=0)
    cl = augment(images.to(device).contiguous(memory_format=torch.channels_last), params, mean=aug.mean, std=aug.std)
    torch.testing.assert_close(cl, nchw, rtol=0, atol=0)
    sub = images[:, :, ::2, 1::2]  # neither contiguous nor channels_last: copied once
    sub_params = aug.sample(sub, torch.Generator().manual_seed(4))
    strided = augment(images.to(device)[:, :, ::2, 1::2], sub_params, mean=aug.mean, std=aug.std)
    ref = simclr_reference.augment(sub, sub_params, mean=aug.mean, std=aug.std)
    assert_augment_close_to_reference(strided, ref, 1 / min(aug.std))


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_output(device):
    images = _images(4, 3, 26, 26, seed=6)
    aug = SimCLRAugment(size=20, blur_kernel=3, memory_format=torch.channels_last)
    params = aug.sample(images, torch.Generator().manual_seed(5))
    out = _check(images, aug, params, device)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
def test_ragged_list_of_sizes(device):
    g = torch.Generator().manual_seed(8)
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
              for h, w in [(17, 40), (64, 23), (32, 32), (9, 11), (50, 71)]]
    aug = SimCLRAugment(size=16, rotation_degrees=20.0, blur_kernel=5)
    params = aug.sample(images, torch.Generator().manual_seed(6))
    assert params.height.max() > 16 and params.height.min() <= 11
    _check(images, aug, params, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_float_inputs(dtype, device):
    images = _images(4, 3, 28, 28, seed=9, dtype=torch.float64).to(dtype)
    aug = SimCLRAugment(size=20, rotation_degrees=15.0, blur_kernel=3)
    params = aug.sample(images, torch.Generator().manual_seed(9))
    # The reference sees exactly the float32 values the op reads (float64 input is rounded to float32).
    out = augment(images.to(device), params, mean=aug.mean, std=aug.std)
    ref = simclr_reference.augment(images.float(), params, mean=aug.mean, std=aug.std)
    assert_augment_close_to_reference(out, ref, 1 / min(aug.std))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", ["mnist", "cifar10", "stl10"])
def test_presets_match_reference(preset, device):
    c = 1 if preset == "mnist" else 3
    aug = SimCLRAugment.preset(preset, size=16 if preset != "stl10" else 24, jitter_p=1.0)
    images = _images(6, c, 30, 30, seed=10)
    _check(images, aug, aug.sample(images, torch.Generator().manual_seed(10)), device)


def test_presets_follow_the_paper():
    im = SimCLRAugment.preset("imagenet")
    assert im.size == (224, 224) and im.blur_kernel == 23 and im.blur_p == 0.5 and im.jitter_p == 0.8
    assert im.scale == (0.08, 1.0) and im.grayscale_p == 0.2 and im.flip_p == 0.5 and im.hue_strength == 0.2
    cifar = SimCLRAugment.preset("cifar10")
    assert cifar.size == (32, 32) and cifar.blur_p == 0.0
    assert SimCLRAugment.preset("stl10").size == (96, 96)
    digits = SimCLRAugment.preset("digits", size=32)
    assert digits.size == (32, 32) and digits.flip_p == 0 and digits.rotation_degrees > 0
    assert digits.hue_strength == 0 and len(digits.mean) == 1
    assert default_blur_kernel((96, 96)) == 9 and default_blur_kernel((32, 32)) == 3


def test_two_views_are_reproducible_from_a_seed():
    images = _images(4, 3, 32, 32, seed=11)
    aug = SimCLRAugment.preset("cifar10", blur_p=0.5)
    v1, v2 = aug(images, generator=torch.Generator().manual_seed(0))
    w1, w2 = aug(images, generator=torch.Generator().manual_seed(0))
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
    assert not torch.equal(v1, v2)
    u1, _ = aug(images, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(u1, v1)
    assert v1.shape == (4, 3, 32, 32) and v1.dtype == torch.float32


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_same_seed_same_views_on_cpu_and_cuda():
    images = _images(6, 3, 48, 48, seed=12)
    aug = SimCLRAugment(size=32, rotation_degrees=30.0, solarize_p=0.5, blur_kernel=5)
    c1, c2 = aug(images, generator=torch.Generator().manual_seed(3))
    g1, g2 = aug(images.cuda(), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(g1.cpu(), c1, rtol=0, atol=AUGMENT_F32_MAX / min(aug.std))
    torch.testing.assert_close(g2.cpu(), c2, rtol=0, atol=AUGMENT_F32_MAX / min(aug.std))
    again, _ = aug(images.cuda(), generator=torch.Generator().manual_seed(3))
    assert torch.equal(again, g1)  # deterministic: no atomics in the contrast mean


def test_opcheck():
    images = _images(3, 3, 20, 20, seed=13)
    aug = SimCLRAugment(size=12, blur_kernel=3, rotation_degrees=10.0)
    p = aug.sample(images, torch.Generator().manual_seed(0))
    src = images.reshape(-1)
    offsets = torch.arange(3, dtype=torch.int64) * 1200
    shapes = torch.tensor([[20, 20]] * 3, dtype=torch.int64)
    for out_dtype, cl in [(torch.float32, False), (torch.bfloat16, True)]:
        args = (src, offsets, shapes, p.packed(), 3, False, 12, 12, 3, 0.5, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25],
                out_dtype, cl)
        torch.library.opcheck(torch.ops.simclr_ext.augment.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_params_dataclass():
    images = _images(3, 3, 20, 20, seed=14)
    p = SimCLRAugment(size=8, blur_kernel=3).sample(images, torch.Generator().manual_seed(0))
    assert isinstance(p, AugmentParams) and len(p) == 3
    assert p.packed().shape == (3, 19) and p.packed().dtype == torch.float32
    assert p.order.shape == (3, 4) and sorted(p.order[0].tolist()) == [0, 1, 2, 3]
    assert set(p.to_list()[0]) >= {"top", "flip", "order", "sigma"}


# The CPU kernel's fast paths: the blur runs over the taps whose weights matter (small sigmas use a few of
# the 23) in register chunks of 64 / 16 outputs plus a scalar tail, the bilinear rows are gathered 8 at a
# time plus a tail, and a zero hue shift skips the HSV round trip. Each is compared with the reference on
# odd sizes that exercise every chunk and tail, both source layouts and both output layouts.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_blur_sigma_range_odd_sizes(layout, memory_format, device):
    images = _images(6, 3, 97, 121, seed=15)
    aug = SimCLRAugment(size=(37, 83), blur_p=1.0, blur_kernel=23, flip_p=0.5, memory_format=memory_format)
    params = aug.sample(images, torch.Generator().manual_seed(15))
    # Tiny, mid and the largest sigmas: from ~1 live tap per side to all 11.
    params.sigma.copy_(torch.tensor([0.1, 0.3, 0.7, 1.2, 1.9, 2.0]))
    src = images if layout == "NCHW" else images.permute(0, 2, 3, 1).contiguous()
    out = _check(src, aug, params, device, layout=layout)
    assert out.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_bilinear_rows_odd_widths(dtype, layout, device):
    """Down- and upscaled crops into widths with and without an 8-wide tail, flipped or not, from uint8 and
    float sources in both layouts (the row conversion has a planar and a strided path)."""
    images = _images(8, 3, 45, 67, seed=16, dtype=dtype)
    for size in [(13, 7), (29, 40), (31, 53)]:
        aug = SimCLRAugment(size=size, scale=(0.05, 1.0), flip_p=0.5, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
        params = aug.sample(images, torch.Generator().manual_seed(size[1]))
        assert params.flip.any() and not params.flip.all()
        src = images if layout == "NCHW" else images.permute(0, 2, 3, 1).contiguous()
        out = augment(src.to(device), params, mean=aug.mean, std=aug.std, layout=layout)
        ref = simclr_reference.augment(images, params, mean=aug.mean, std=aug.std)
        assert_augment_close_to_reference(out, ref, 1 / min(aug.std))


@pytest.mark.parametrize("device", DEVICES)
def test_zero_hue_shift_matches_reference(device):
    """Jittered samples with hue exactly 0 (the HSV round trip is skipped) and nonzero (it runs), mixed in
    one batch, in every jitter order."""
    images = _images(8, 3, 33, 35, seed=17)
    aug = SimCLRAugment(size=(27, 31), jitter_p=1.0, grayscale_p=0.0, blur_p=0.0)
    params = aug.sample(images, torch.Generator().manual_seed(17))
    params.hue[::2] = 0.0
    out = _check(images, aug, params, device)
    params.hue[::2] = 1e-3  # a tiny nonzero shift is applied, not skipped
    shifted = _check(images, aug, params, device)
    assert not torch.equal(out[::2], shifted[::2]) and torch.equal(out[1::2], shifted[1::2])


def test_cpu_results_do_not_depend_on_thread_count():
    images = _images(7, 3, 61, 59, seed=18)
    aug = SimCLRAugment(size=(45, 83), rotation_degrees=15.0, blur_kernel=23)
    params = aug.sample(images, torch.Generator().manual_seed(18))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = augment(images, params, mean=aug.mean, std=aug.std)
        torch.set_num_threads(2)
        two = augment(images, params, mean=aug.mean, std=aug.std)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def _subset(params, index):
    """The samples `index` of params, as their own AugmentParams."""
    return replace(params, **{f.name: getattr(params, f.name)[index] for f in fields(params)
                              if f.name not in ("size", "kernel_size")})


@pytest.mark.parametrize("device", DEVICES)
def test_a_view_does_not_depend_on_the_rest_of_the_batch(device):
    """A sample's view is the same bits whether other samples of its batch blur or not, and alone or in a
    batch. On CUDA the blur's shared memory (and the smaller tiles it forces for large kernels) is planned
    only when a sample blurs, and each block decodes its sample's parameters once; neither may leak into
    another sample (the contrast mean is summed over the same tiles either way). blur_kernel 101 is large
    enough that the blur path's tile is smaller than the contrast-mean tiles on sm_80 and sm_90."""
    images = _images(6, 3, 150, 141, seed=19)
    aug = SimCLRAugment(size=(120, 113), rotation_degrees=30.0, jitter_p=1.0, solarize_p=0.5, blur_kernel=101)
    params = aug.sample(images, torch.Generator().manual_seed(19))
    params.blur.copy_(torch.tensor([True, False, True, False, False, True]))
    mixed = _check(images, aug, params, device)
    plain = _check(images, aug, replace(params, blur=torch.zeros_like(params.blur)), device)
    keep = ~params.blur
    assert torch.equal(mixed[keep], plain[keep])
    assert (mixed[~keep] - plain[~keep]).abs().max() > 0.05  # the blur really ran
    dev_images = images.to(device)
    for i in range(len(params)):
        alone = augment(dev_images[i:i + 1], _subset(params, [i]), mean=aug.mean, std=aug.std)
        assert torch.equal(alone[0], mixed[i]), f"sample {i} differs alone and in its batch"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_blur_shared_memory_is_needed_only_when_a_sample_blurs():
    """blur_kernel 255 needs more shared memory per block than any GPU offers: a batch in which no sample
    blurs runs without it (and matches the reference); once a sample blurs the op refuses clearly."""
    images = _images(3, 3, 140, 137, seed=20)
    aug = SimCLRAugment(size=(130, 129), rotation_degrees=20.0, jitter_p=1.0, blur_p=0.0, blur_kernel=255)
    params = aug.sample(images, torch.Generator().manual_seed(20))
    assert not params.blur.any()
    _check(images, aug, params, "cuda")
    params.blur[1] = True
    params.sigma[1] = 1.5
    with pytest.raises(RuntimeError, match=r"blur_kernel 255 needs \d+ bytes of shared memory per block, "
                                           r"the device allows \d+"):
        augment(images.cuda(), params, mean=aug.mean, std=aug.std)
