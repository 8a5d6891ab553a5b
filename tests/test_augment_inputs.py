"""Input validation of the fused augmentation: float images outside [0, 1], ambiguous layouts, wrong channel
counts. Each misuse gets a ValueError that says what was found and what to do; valid inputs still work."""
import pytest
import torch

from simclr_ext import SimCLRAugment, augment


def _aug(**kw):
    return SimCLRAugment(size=8, blur_kernel=3, **kw)


def _uint8(shape, gen):
    return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_float_images_in_0_255_are_refused(dtype, gen):
    images = _uint8((3, 3, 12, 12), gen).to(dtype)  # a forgotten / 255
    aug = _aug()
    params = aug.sample(images, gen)
    hi = images.float().max().item()
    for call in (lambda: aug(images, generator=gen), lambda: augment(images, params),
                 lambda: aug([im for im in images], generator=gen)):
        with pytest.raises(ValueError, match=rf"float images must be in \[0, 1\], got values in \[.*, {hi:.4g}\]: "
                                             r"divide 0\.\.255 pixels by 255"):
            call()


def test_normalized_and_non_finite_floats_are_refused(gen):
    aug = _aug()
    normalized = (torch.rand(2, 3, 12, 12, generator=gen) - 0.45) / 0.225  # normalized before augmenting
    with pytest.raises(ValueError, match=r"got values in \[-\d.*normalize after the augmentation"):
        aug(normalized, generator=gen)
    bad = torch.rand(2, 3, 12, 12, generator=gen)
    bad[1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="must hold finite pixel values"):
        aug(bad, generator=gen)


def test_float_images_within_the_tolerance_are_accepted(gen):
    """Resampling upstream may overshoot [0, 1] slightly: up to 0.01 passes, and gives the clamped result."""
    x = torch.rand(2, 3, 12, 12, generator=gen)
    x[0, 0, 0, 0], x[1, 1, 1, 1] = 1.009, -0.009
    aug = _aug(mean=None, std=None)
    params = aug.sample(x, torch.Generator().manual_seed(1))
    out = augment(x, params)
    assert torch.isfinite(out).all()
    x[0, 0, 0, 0] = 1.02
    with pytest.raises(ValueError, match=r"got values in \[-0.009, 1.02\]"):
        augment(x, params)


def test_auto_layout_refuses_ambiguous_shapes(gen):
    """(B, H, W, C) with H = 3: dim 1 and dim 3 could both be the channels."""
    nhwc = _uint8((2, 3, 10, 3), gen)
    aug = _aug()
    with pytest.raises(ValueError, match=r"shape \(2, 3, 10, 3\) are ambiguous: dim 1 \(3\) and dim 3 \(3\) .* "
                                         r"pass layout='NCHW' .* or layout='NHWC'"):
        aug(nhwc, generator=gen)
    with pytest.raises(ValueError, match="ambiguous"):
        augment(_uint8((2, 1, 5, 1), gen), aug.sample([torch.zeros(1, 5, 5)] * 2, gen))
    # Named, it works, and NHWC equals the same images given as NCHW.
    explicit = _aug(layout="NHWC")
    params = explicit.sample(nhwc, torch.Generator().manual_seed(3))
    out = explicit.view(nhwc, params)
    assert out.shape == (2, 3, 8, 8)
    torch.testing.assert_close(out, augment(nhwc.permute(0, 3, 1, 2).contiguous(), params, mean=explicit.mean,
                                            std=explicit.std, layout="NCHW"), rtol=0, atol=0)


def test_wrong_channel_count_names_the_dimension_it_read(gen):
    aug = _aug()
    rgba = _uint8((2, 4, 24, 24), gen)
    with pytest.raises(ValueError, match=r"got shape \(2, 4, 24, 24\): neither dim 1 \(4, NCHW\) nor dim 3 "
                                         r"\(24, NHWC\) is 1 or 3; for RGBA images drop the alpha channel"):
        aug(rgba, generator=gen)
    with pytest.raises(ValueError, match=r"neither dim 1 \(24, NCHW\) nor dim 3 \(4, NHWC\)"):
        aug(rgba.permute(0, 2, 3, 1), generator=gen)
    with pytest.raises(ValueError, match=r"got C = 4 in dim 1 of shape \(2, 4, 24, 24\) \(layout NCHW\); for RGBA"):
        _aug(layout="NCHW")(rgba, generator=gen)
    with pytest.raises(ValueError, match=r"got C = 24 in dim 3 of shape \(2, 4, 24, 24\) \(layout NHWC\)$"):
        _aug(layout="NHWC")(rgba, generator=gen)
    # dropping alpha as the message says works
    v1, v2 = aug(rgba[:, :3], generator=gen)
    assert v1.shape == v2.shape == (2, 3, 8, 8)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_one_image_listed_twice_reads_one_copy_with_the_same_result(dtype, gen):
    """[x, x] (SimCLRTransform's two views of one image) packs x once, every offset 0: the views equal those
    of two separate copies, also for a (C, H, W) view of (H, W, C) memory (pil_to_tensor's)."""
    hwc = torch.randint(0, 256, (37, 29, 3), generator=gen, dtype=torch.uint8)
    hwc = hwc if dtype == torch.uint8 else hwc.float() / 255
    x = hwc.permute(2, 0, 1)  # not contiguous
    aug = SimCLRAugment(size=21, jitter_p=1.0, blur_p=1.0, grayscale_p=0.5)
    params = aug.sample([x, x], generator=gen)
    shared = augment([x, x], params, mean=aug.mean, std=aug.std)
    copies = augment([x.contiguous(), x.clone()], params, mean=aug.mean, std=aug.std)
    assert torch.equal(shared, copies)
    assert not torch.equal(shared[0], shared[1])  # two different views
