"""simclr_ext.SigLipLoss against open_clip's SigLipLoss (float64: values and the gradients of the features,
logit_scale and logit_bias; features as given or normalized), the sigmoid mode's dtypes against the float64
oracle, multi-positive labels, bad input; the CUDA kernel's sigmoid mode on every precision path."""
import math

import pytest
import torch
import torch.nn.functional as F
from parity import DEVICE_PATHS, assert_matches_reference
from peers import assert_close64, check_on_device, grads, leaves

import simclr_ext
import simclr_reference as ref

open_clip_loss = pytest.importorskip("open_clip.loss", reason="open_clip_torch is installed by requirements-dev.txt")


def _sample(n, d, gen, dtype=torch.float64):
    image = torch.randn(n, d, generator=gen, dtype=dtype) / d ** 0.5
    text = image + torch.randn(n, d, generator=gen, dtype=dtype) / d ** 0.5
    scale = torch.tensor(math.exp(torch.empty(()).uniform_(0.5, 2.5, generator=gen).item()), dtype=dtype)
    bias = torch.empty((), dtype=dtype).uniform_(-10, 2, generator=gen)
    return image, text, scale, bias


@pytest.mark.parametrize("n,d", [(1, 1), (2, 3), (17, 5), (70, 33), (300, 16)])
@pytest.mark.parametrize("normalize", [False, True])
def test_value_and_gradients_equal_open_clip(n, d, normalize, gen):
    image, text, scale, bias = _sample(n, d, gen)
    image = image * (torch.rand(n, 1, generator=gen, dtype=torch.float64) + 0.5)  # rows of unequal norms
    a, b, s, c = leaves(image, text, scale, bias)
    ours = simclr_ext.SigLipLoss(normalize=normalize)(a, b, s, c)
    a2, b2, s2, c2 = leaves(image, text, scale, bias)
    prep = (lambda x: F.normalize(x, dim=1)) if normalize else (lambda x: x)
    theirs = open_clip_loss.SigLipLoss()(prep(a2), prep(b2), s2, c2)
    assert_close64(ours, theirs, "loss")
    for name, g_o, g_t in zip(("image", "text", "logit_scale", "logit_bias"), grads(ours, [a, b, s, c], 1.7),
                              grads(theirs, [a2, b2, s2, c2], 1.7)):
        assert_close64(g_o, g_t, f"grad of {name}")


def test_output_dict_cache_labels_and_no_bias(gen):
    image, text, scale, _ = _sample(9, 4, gen)
    out = simclr_ext.SigLipLoss(cache_labels=True)(image, text, scale, output_dict=True)
    assert list(out) == ["contrastive_loss"]
    assert_close64(out["contrastive_loss"], ref.siglip_loss(image, text, scale), "loss without bias")
    assert_close64(simclr_ext.siglip_loss(image, text, 2.0, -1.5), ref.siglip_loss(image, text, 2.0, -1.5),
                   "numbers for scale and bias")


@pytest.mark.parametrize("normalize", [False, True])
def test_labels_multi_positive_against_oracle(normalize, gen):
    """Every pair with equal labels has y = +1."""
    image, text, scale, bias = _sample(41, 7, gen)
    labels = torch.randint(0, 5, (41,), generator=gen)
    a, b, s, c = leaves(image, text, scale, bias)
    ours = simclr_ext.SigLipLoss(normalize=normalize)(a, b, s, c, labels=labels)
    a2, b2, s2, c2 = leaves(image, text, scale, bias)
    prep = (lambda x: F.normalize(x, dim=1)) if normalize else (lambda x: x)
    theirs = ref.siglip_loss(prep(a2), prep(b2), s2, c2, labels, labels)
    assert_close64(ours, theirs, "loss")
    for g_o, g_t in zip(grads(ours, [a, b, s, c], 0.8), grads(theirs, [a2, b2, s2, c2], 0.8)):
        assert_close64(g_o, g_t, "gradient")
    loss = simclr_ext.SigLipLoss()
    assert torch.equal(loss(image, text, scale, bias, labels=torch.arange(41)), loss(image, text, scale, bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_against_float64_oracle(dtype, gen):
    image, text, scale, bias = _sample(150, 24, gen)
    image, text = image.to(dtype), text.to(dtype)
    scale, bias = scale.float(), bias.float()
    a, b, s, c = leaves(image, text, scale, bias)
    ours = simclr_ext.siglip_loss(a, b, s, c)
    assert ours.dtype == torch.float32
    a1, b1, s1, c1 = leaves(image, text, scale, bias)
    same = ref.siglip_loss(a1, b1, s1.to(dtype), c1.to(dtype))
    a64, b64, s64, c64 = leaves(image.double(), text.double(), scale.double(), bias.double())
    ref64 = ref.siglip_loss(a64, b64, s64, c64)
    assert_matches_reference(ours, same, ref64, dtype, "loss")
    for name, g_o, g_s, g_r in zip(("image", "text", "logit_scale", "logit_bias"), grads(ours, [a, b, s, c], 1.1),
                                   grads(same, [a1, b1, s1, c1], 1.1), grads(ref64, [a64, b64, s64, c64], 1.1)):
        tol = dtype if name in ("image", "text") else torch.float32
        assert_matches_reference(g_o, g_s, g_r, tol, f"grad of {name}")


def test_noncontiguous_and_extreme_logits(gen):
    """Strided features; logits far in both tails (softplus and sigmoid stay finite and exact)."""
    image = torch.randn(30, 2 * 8, generator=gen, dtype=torch.float64)[:, ::2]
    text = torch.randn(8, 30, generator=gen, dtype=torch.float64).t()
    for scale, bias in ((1.0, 0.0), (60.0, -40.0), (60.0, 40.0)):
        a, b = leaves(image, text)
        ours = simclr_ext.SigLipLoss()(a, b, scale, bias)
        a2, b2 = leaves(image, text)
        theirs = open_clip_loss.SigLipLoss()(a2, b2, scale, bias)
        assert_close64(ours, theirs, f"loss at scale {scale}, bias {bias}")
        for g_o, g_t in zip(grads(ours, [a, b], 1.0), grads(theirs, [a2, b2], 1.0)):
            torch.testing.assert_close(g_o, g_t, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(dist_impl="ring"), ValueError, "dist_impl must be None or one of"),
    (dict(rank=3, world_size=2), ValueError, "rank in \\[0, world_size\\)"),
    (dict(world_size="2"), TypeError, "world_size must be an int"),
])
def test_bad_constructor(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        simclr_ext.SigLipLoss(**kwargs)


@pytest.mark.parametrize("bias,exc,match", [
    (torch.ones(2), ValueError, "logit_bias must be a number or a one-element tensor"),
    (torch.tensor(1), TypeError, "logit_bias must be a floating tensor"),
    (float("nan"), ValueError, "logit_bias must be finite"),
    ("1", TypeError, "logit_bias must be None, a real number or a tensor"),
])
def test_bad_bias(bias, exc, match):
    with pytest.raises(exc, match=match):
        simclr_ext.SigLipLoss()(torch.randn(3, 2), torch.randn(3, 2), 1.0, bias)


def test_world_size_without_a_process_group_is_refused():
    with pytest.raises(ValueError, match="needs an initialized torch.distributed process group"):
        simclr_ext.SigLipLoss(rank=0, world_size=2)(torch.randn(3, 2), torch.randn(3, 2), 1.0)


def test_op_refuses_bad_sigmoid_arguments():
    q, labels = torch.randn(4, 3), torch.arange(4)
    t = torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="the sigmoid mode needs self_offset = -1"):
        torch.ops.simclr_ext.ntxent(q, q, labels, labels, t, 0, False, False, False, None, False, True, True, None)
    with pytest.raises(RuntimeError, match="does not take exclude_positives, positive_weight or two_way"):
        torch.ops.simclr_ext.ntxent(q, q, labels, labels, t, -1, False, False, False, None, True, True, True, None)
    with pytest.raises(RuntimeError, match="bias is the sigmoid mode's"):
        torch.ops.simclr_ext.ntxent(q, q, labels, labels, t, -1, False, False, False, None, False, True, False, t)


def test_opcheck_sigmoid_and_dot_modes(gen):
    q, k = torch.randn(5, 3, generator=gen), torch.randn(7, 3, generator=gen)
    ql, kl = torch.randint(0, 3, (5,), generator=gen), torch.randint(0, 3, (7,), generator=gen)
    for normalize, sigmoid, bias in ((False, False, None), (False, True, torch.tensor(-2.0)), (True, True, None)):
        args = (q.requires_grad_(), k, ql, kl, torch.tensor(0.5), -1, False, False, False, None, False, normalize,
                sigmoid, bias)
        torch.library.opcheck(torch.ops.simclr_ext.ntxent.default, args)


@pytest.mark.parametrize("device,dtype,tf32", DEVICE_PATHS)
def test_every_precision_path_against_float64_oracle(device, dtype, tf32, gen):
    """siglip_loss on every device and precision path (the CUDA kernel's sigmoid mode included): values and the
    gradients of features, logit_scale and logit_bias against the float64 oracle on the CPU."""
    image, text, _, _ = _sample(45, 33, gen, torch.float32)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale, bias = torch.tensor(4.0, dtype=acc), torch.tensor(-3.0, dtype=acc)
    check_on_device(lambda a, b, s, c: simclr_ext.siglip_loss(a, b, s, c, allow_tf32=tf32),
                    lambda a, b, s, c: ref.siglip_loss(a, b, s.to(a.dtype), c.to(a.dtype)),
                    [image.to(dtype), text.to(dtype), scale, bias], device, dtype, tf32, gen, "siglip")
