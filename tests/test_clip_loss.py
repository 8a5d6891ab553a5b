"""simclr_ext.ClipLoss against open_clip's ClipLoss (float64, values and every gradient, logit_scale's
included; features as given or normalized; open_clip's constructor flags) and against the float64 oracle in every
dtype and precision path; multi-positive labels; bad input. On every device."""
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
@pytest.mark.parametrize("normalize", [False, True])
def test_value_and_gradients_equal_open_clip(n, d, normalize, device, gen):
    """Unnormalized features as given (open_clip's logits are scale * x @ y.T), and normalize=True against
    open_clip on F.normalize'd features: the gradient reaching the raw features includes the normalization's."""
    image, text, scale = _sample(n, d, gen)
    image = image * torch.rand(n, 1, generator=gen, dtype=torch.float64) * 0.6  # rows of unequal norms
    grad_out = torch.rand((), generator=gen, dtype=torch.float64) + 0.5
    a, b, s = leaves(image, text, scale / 4, device=device)
    ours = simclr_ext.ClipLoss(normalize=normalize)(a, b, s)
    a2, b2, s2 = leaves(image, text, scale / 4, device=device)
    prep = (lambda x: F.normalize(x, dim=1)) if normalize else (lambda x: x)
    theirs = open_clip_loss.ClipLoss()(prep(a2), prep(b2), s2)
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
    out = simclr_ext.ClipLoss()(image, text, 1.3, output_dict=True)
    assert list(out) == ["contrastive_loss"]
    theirs = open_clip_loss.ClipLoss()(image, text, 1.3)
    assert_close64(out["contrastive_loss"], theirs, "loss")
    assert_close64(simclr_ext.clip_loss(image, text, 1.3), theirs, "functional")


@pytest.mark.parametrize("device", DEVICES)
def test_logit_scale_gradient_matches_materialized_formula(device, gen):
    """dL/d logit_scale from the fused backward against autograd through the materialized logits."""
    image, text, scale = _sample(65, 33, gen)
    image, text = image.to(device), text.to(device)
    log_scale = (scale / 8).log().to(device).requires_grad_(True)
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
    image, text = image / d ** 0.5, text / d ** 0.5  # logits of CLIP's size: float16's own reference stays finite
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
    theirs = open_clip_loss.ClipLoss()(image, text, 1.0)
    assert_close64(simclr_ext.ClipLoss()(image, text, 1.0), theirs, "loss")


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
def test_logit_bias_as_open_clip(device, gen):
    """open_clip adds logit_bias to every logit: the softmax loss is unchanged and the bias's gradient is 0."""
    image, text, scale = _sample(11, 6, gen)
    a, b, s, bias = leaves(image, text, scale / 8, torch.tensor(-3.0, dtype=torch.float64), device=device)
    ours = simclr_ext.ClipLoss()(a, b, s, bias)
    a2, b2, s2, bias2 = leaves(image, text, scale / 8, torch.tensor(-3.0, dtype=torch.float64), device=device)
    theirs = open_clip_loss.ClipLoss()(a2, b2, s2, bias2)
    assert_close64(ours, theirs, "loss")
    for name, g_o, g_t in zip(("image", "text", "logit_scale", "logit_bias"), grads(ours, [a, b, s, bias], 1.5),
                              grads(theirs, [a2, b2, s2, bias2], 1.5)):
        torch.testing.assert_close(g_o, g_t, rtol=1e-8, atol=1e-12, msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("local_loss", [False, True])
@pytest.mark.parametrize("gather_with_grad", [False, True])
@pytest.mark.parametrize("cache_labels", [False, True])
def test_open_clip_constructor_single_process(local_loss, gather_with_grad, cache_labels, gen):
    """open_clip's constructor at the values its training script passes on one process: same loss and gradients,
    twice (a cached-labels module called again)."""
    args = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=cache_labels, rank=0,
                world_size=1, use_horovod=False)
    ours_mod, theirs_mod = simclr_ext.ClipLoss(**args), open_clip_loss.ClipLoss(**args)
    for n in (5, 5, 8):
        image, text, scale = _sample(n, 7, gen)
        a, b, s = leaves(image, text, scale / 8)
        a2, b2, s2 = leaves(image, text, scale / 8)
        ours, theirs = ours_mod(a, b, s), theirs_mod(a2, b2, s2)
        assert_close64(ours, theirs, "loss")
        for g_o, g_t in zip(grads(ours, [a, b, s], 0.7), grads(theirs, [a2, b2, s2], 0.7)):
            assert_close64(g_o, g_t, "gradient")


def test_open_clip_constructor_refusals():
    with pytest.raises(ValueError, match="use_horovod=True is not supported"):
        simclr_ext.ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="rank in \\[0, world_size\\)"):
        simclr_ext.ClipLoss(rank=2, world_size=2)
    with pytest.raises(TypeError, match="world_size must be an int"):
        simclr_ext.ClipLoss(world_size=2.0)
    # world_size > 1 outside a process group of that size: a clear error, not a hang.
    with pytest.raises(ValueError, match="needs an initialized torch.distributed process group"):
        simclr_ext.ClipLoss(rank=1, world_size=2)(torch.randn(3, 4), torch.randn(3, 4), 2.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize", [False, True])
def test_labels_multi_positive_against_oracle(normalize, device, gen):
    """Equal labels are positives: each direction's loss is the mean over a row's positives (SupCon's form)."""
    image, text, scale = _sample(37, 9, gen)
    labels = torch.randint(0, 6, (37,), generator=gen)
    a, b, s = leaves(image, text, scale / 8, device=device)
    ours = simclr_ext.ClipLoss(normalize=normalize)(a, b, s, labels=labels.to(device))
    a2, b2, s2 = leaves(image, text, scale / 8)
    ref = ref_clip(a2, b2, s2, normalize=normalize, labels=labels)
    assert_close64(ours, ref, "loss")
    for g_o, g_r in zip(grads(ours, [a, b, s], 1.3), grads(ref, [a2, b2, s2], 1.3)):
        assert_close64(g_o, g_r, "gradient")


def test_labels_none_is_the_diagonal_bitwise(gen):
    """labels=None is exactly today's loss, and distinct labels (arange) give the same bits."""
    image, text, scale = _sample(19, 5, gen, torch.float32)
    loss = simclr_ext.ClipLoss()
    assert torch.equal(loss(image, text, scale.float(), labels=torch.arange(19)), loss(image, text, scale.float()))
    with pytest.raises(ValueError, match="labels must have shape \\[19\\]"):
        loss(image, text, scale.float(), labels=torch.arange(18))


@pytest.mark.parametrize("device,dtype,tf32", DEVICE_PATHS)
def test_every_precision_path_against_float64_oracle(device, dtype, tf32, gen):
    """clip_loss on every device and precision path: values and gradients (logit_scale's included) against
    the float64 oracle on the CPU."""
    image, text = (torch.randn(2, 45, 33, generator=gen) / 33 ** 0.5).to(dtype)
    scale = torch.tensor(14.0, dtype=torch.float32 if dtype != torch.float64 else torch.float64)
    check_on_device(lambda a, b, s: simclr_ext.clip_loss(a, b, s, allow_tf32=tf32), ref_clip, [image, text, scale],
                    device, dtype, tf32, gen, "clip")
