"""simclr_ext.ClipLoss against open_clip's ClipLoss (float64, values and every gradient, logit_scale's
included) and against the float64 oracle in every dtype and precision path; bad input. On every device."""
import math

import pytest
import torch
import torch.nn.functional as F
from parity import DEVICE_PATHS, DEVICES, assert_matches_reference
from peers import assert_close64, check_on_device, grads, leaves, ref_clip

import simclr_ext

open_clip_loss = pytest.importorskip("open_clip.loss", reason="open_clip_torch is installed by requirements-dev.txt")


def _sample(n, d, gen, dtype=torch.float64):
    image = torch.randn(n, d, generator=gen, dtype=dtype)
    text = image + torch.randn(n, d, generator=gen, dtype=dtype)  # matched pairs are correlated
    scale = torch.tensor(math.exp(torch.empty(()).uniform_(1.0, 4.6, generator=gen).item()), dtype=torch.float64)
    return image, text, scale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,d", [(1, 1), (2, 3), (3, 130), (17, 5), (129, 64)])
def test_value_and_gradients_equal_open_clip(n, d, device, gen):
    image, text, scale = _sample(n, d, gen)
    grad_out = torch.rand((), generator=gen, dtype=torch.float64) + 0.5
    a, b, s = leaves(image, text, scale, device=device)
    ours = simclr_ext.ClipLoss()(a, b, s)
    # open_clip's models hand the loss L2-normalized features; ours normalizes inside.
    a2, b2, s2 = leaves(image, text, scale, device=device)
    theirs = open_clip_loss.ClipLoss()(F.normalize(a2, dim=1), F.normalize(b2, dim=1), s2)
    assert_close64(ours, theirs, "loss")
    for name, g_o, g_t in zip(("image", "text", "logit_scale"), grads(ours, [a, b, s], grad_out),
                              grads(theirs, [a2, b2, s2], grad_out)):
        assert_close64(g_o, g_t, f"grad of {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_normalized_features_give_open_clip_gradients_upstream(device, gen):
    """Fed what an open_clip model outputs (F.normalize of its projections), the gradients reaching the
    projections are open_clip's."""
    x, y, scale = _sample(33, 20, gen)
    grad_out = torch.rand((), generator=gen, dtype=torch.float64) + 0.5
    a, b, s = leaves(x, y, scale, device=device)
    ours = simclr_ext.ClipLoss()(F.normalize(a, dim=1), F.normalize(b, dim=1), s)
    a2, b2, s2 = leaves(x, y, scale, device=device)
    theirs = open_clip_loss.ClipLoss()(F.normalize(a2, dim=1), F.normalize(b2, dim=1), s2)
    assert_close64(ours, theirs, "loss")
    for g_o, g_t in zip(grads(ours, [a, b, s], grad_out), grads(theirs, [a2, b2, s2], grad_out)):
        assert_close64(g_o, g_t, "gradient")


@pytest.mark.parametrize("device", DEVICES)
def test_output_dict_and_float_logit_scale(device, gen):
    image, text, _ = _sample(9, 7, gen)
    image, text = image.to(device), text.to(device)
    out = simclr_ext.ClipLoss()(image, text, 14.3, output_dict=True)
    assert list(out) == ["contrastive_loss"]
    theirs = open_clip_loss.ClipLoss()(F.normalize(image, dim=1), F.normalize(text, dim=1), 14.3)
    assert_close64(out["contrastive_loss"], theirs, "loss")
    assert_close64(simclr_ext.clip_loss(image, text, 14.3), theirs, "functional")


@pytest.mark.parametrize("device", DEVICES)
def test_logit_scale_gradient_matches_materialized_formula(device, gen):
    """dL/d logit_scale from the fused backward against autograd through the materialized logits."""
    image, text, scale = _sample(65, 33, gen)
    image, text = image.to(device), text.to(device)
    log_scale = scale.log().to(device).requires_grad_(True)
    simclr_ext.clip_loss(image, text, log_scale.exp()).backward()
    ours = log_scale.grad.clone()
    log_scale.grad = None
    ref_clip(image, text, log_scale.exp()).backward()
    assert_close64(ours, log_scale.grad, "grad of log(logit_scale)")
    assert ours.abs() > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,d", [(3, 5), (64, 130)])
def test_dtypes_against_float64_oracle(n, d, dtype, device, gen):
    image, text, scale = _sample(n, d, gen, dtype)
    scale = scale.to(torch.float32)
    grad_out = torch.rand((), generator=gen, dtype=torch.float64) + 0.5
    a, b, s = leaves(image, text, scale, device=device)
    ours = simclr_ext.clip_loss(a, b, s)
    assert ours.dtype == torch.float32 and ours.device.type == device
    a1, b1, s1 = leaves(image, text, scale)
    same = ref_clip(a1, b1, s1)
    a64, b64, s64 = leaves(image.double(), text.double(), scale.double())
    ref64 = ref_clip(a64, b64, s64)
    assert_matches_reference(ours.cpu(), same, ref64, dtype, "loss")
    for name, g_o, g_s, g_r in zip(("image", "text", "logit_scale"), grads(ours, [a, b, s], grad_out),
                                   grads(same, [a1, b1, s1], grad_out.float()),
                                   grads(ref64, [a64, b64, s64], grad_out)):
        assert g_o.dtype == (dtype if name != "logit_scale" else torch.float32)
        assert_matches_reference(g_o.cpu(), g_s, g_r, dtype if name != "logit_scale" else torch.float32,
                                 f"grad of {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_features(device, gen):
    image = torch.randn(40, 2 * 24, generator=gen, dtype=torch.float64).to(device)[:, ::2]
    text = torch.randn(24, 40, generator=gen, dtype=torch.float64).to(device).t()
    theirs = open_clip_loss.ClipLoss()(F.normalize(image, dim=1), F.normalize(text, dim=1), 10.0)
    assert_close64(simclr_ext.ClipLoss()(image, text, 10.0), theirs, "loss")


@pytest.mark.parametrize("image_shape,text_shape,scale,match", [
    ((4, 3), (5, 3), 2.0, "same N and D"),
    ((4, 3), (4, 2), 2.0, "same N and D"),
    ((2, 4, 3, 1), (2, 4, 3, 1), 2.0, "image_features must be 2-D"),
    ((4, 3), (4, 3), torch.ones(2), "logit_scale must be a number or a one-element tensor, got a tensor of shape"),
    ((4, 3), (4, 3), -1.0, "logit_scale must be finite and > 0"),
    ((4, 3), (4, 3), "10", "logit_scale must be a real number or a tensor"),
    ((4, 3), (4, 3), torch.tensor(10), "logit_scale must be a floating tensor"),
    ((0, 3), (0, 3), 2.0, "at least one pair"),
])
@pytest.mark.parametrize("device", DEVICES)
def test_bad_input(image_shape, text_shape, scale, match, device):
    with pytest.raises((ValueError, TypeError), match=match):
        simclr_ext.ClipLoss()(torch.randn(image_shape, device=device), torch.randn(text_shape, device=device), scale)


@pytest.mark.parametrize("device", DEVICES)
def test_logit_bias_is_refused(device):
    with pytest.raises(ValueError, match="logit_bias is not supported: it belongs to SigLIP"):
        simclr_ext.ClipLoss()(torch.randn(4, 3, device=device), torch.randn(4, 3, device=device), 10.0,
                              logit_bias=torch.tensor(-10.0))


@pytest.mark.parametrize("device,dtype,tf32", DEVICE_PATHS)
def test_every_precision_path_against_float64_oracle(device, dtype, tf32, gen):
    """clip_loss on every device and precision path: values and gradients (logit_scale's included) against
    the float64 oracle on the CPU."""
    image, text = torch.randn(2, 45, 33, generator=gen).to(dtype)
    scale = torch.tensor(14.0, dtype=torch.float32 if dtype != torch.float64 else torch.float64)
    check_on_device(lambda a, b, s: simclr_ext.clip_loss(a, b, s, allow_tf32=tf32), ref_clip, [image, text, scale],
                    device, dtype, tf32, gen, "clip")
