"""simclr_ext.DCLLoss / DCLWLoss against lightly 1.6's (float64 values and gradients), dtypes against the
float64 oracle on every precision path, bad input. On every device."""
import pytest
import torch
from parity import DEVICE_PATHS, DEVICES, assert_matches_reference
from peers import assert_close64, check_on_device, grads, leaves, ref_dcl

import simclr_ext
from simclr_ext.dcl_loss import negative_mises_fisher_weights

lightly_loss = pytest.importorskip("lightly.loss", reason="lightly is installed by requirements-dev.txt")


def _pair(n, d, gen, dtype=torch.float64):
    out0 = torch.randn(n, d, generator=gen, dtype=dtype)
    return out0, out0 + torch.randn(n, d, generator=gen, dtype=dtype)


def _check_against(ours_fn, theirs_fn, inputs, gen, device="cpu"):
    grad_out = torch.rand((), generator=gen, dtype=torch.float64) + 0.5
    ours_in, theirs_in = leaves(*inputs, device=device), leaves(*inputs, device=device)
    ours, theirs = ours_fn(*ours_in), theirs_fn(*theirs_in)
    assert_close64(ours, theirs, "loss")
    for name, g_o, g_t in zip(("out0", "out1"), grads(ours, ours_in, grad_out), grads(theirs, theirs_in, grad_out)):
        assert_close64(g_o, g_t, f"grad of {name}")


@pytest.mark.parametrize("n,d", [(2, 1), (3, 5), (17, 130), (129, 32)])
@pytest.mark.parametrize("temperature", [0.07, 0.1, 0.5])
@pytest.mark.parametrize("device", DEVICES)
def test_dcl_equals_lightly(n, d, temperature, device, gen):
    _check_against(simclr_ext.DCLLoss(temperature), lightly_loss.DCLLoss(temperature), _pair(n, d, gen), gen, device)


@pytest.mark.parametrize("n,d", [(2, 3), (9, 7), (65, 64)])
@pytest.mark.parametrize("sigma", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("device", DEVICES)
def test_dclw_equals_lightly(n, d, sigma, device, gen):
    _check_against(simclr_ext.DCLWLoss(0.1, sigma=sigma), lightly_loss.DCLWLoss(0.1, sigma=sigma), _pair(n, d, gen),
                   gen, device)


@pytest.mark.parametrize("device", DEVICES)
def test_differentiable_weight_fn_equals_lightly(device, gen):
    """lightly's own example weight_fn has a gradient: it flows through ours too."""
    def weight_fn(a, b):
        return torch.sum((a - b) ** 2, dim=1)

    _check_against(simclr_ext.DCLLoss(0.2, weight_fn=weight_fn), lightly_loss.DCLLoss(0.2, weight_fn=weight_fn),
                   _pair(21, 11, gen), gen, device)


@pytest.mark.parametrize("device", DEVICES)
def test_constant_weight_fn_equals_lightly(device, gen):
    def weight_fn(a, b):
        return torch.linspace(0.5, 1.5, a.shape[0], dtype=a.dtype, device=a.device)

    _check_against(simclr_ext.DCLLoss(0.3, weight_fn=weight_fn), lightly_loss.DCLLoss(0.3, weight_fn=weight_fn),
                   _pair(10, 4, gen), gen, device)


@pytest.mark.parametrize("device", DEVICES)
def test_functional_twins_and_weights(device, gen):
    out0, out1 = (x.to(device) for x in _pair(15, 6, gen))
    assert_close64(simclr_ext.dcl_loss(out0, out1, 0.25), lightly_loss.DCLLoss(0.25)(out0, out1), "dcl_loss")
    assert_close64(simclr_ext.dclw_loss(out0, out1, 0.25, 0.4), lightly_loss.DCLWLoss(0.25, 0.4)(out0, out1),
                   "dclw_loss")
    from lightly.loss.dcl_loss import negative_mises_fisher_weights as theirs
    # lightly calls its weight function on the normalized views; ours normalizes inside.
    n0, n1 = torch.nn.functional.normalize(out0, dim=1), torch.nn.functional.normalize(out1, dim=1)
    assert_close64(negative_mises_fisher_weights(out0, out1, 0.4), theirs(n0, n1, 0.4), "weights")


@pytest.mark.parametrize("device", DEVICES)
def test_tensor_temperature_gradient_matches_materialized_formula(device, gen):
    out0, out1 = _pair(19, 9, gen)
    weights = (torch.rand(38, generator=gen, dtype=torch.float64) + 0.5).to(device)
    temperature = torch.tensor(0.2, dtype=torch.float64)
    grad_out = torch.rand((), generator=gen, dtype=torch.float64) + 0.5
    a, b, t = leaves(out0, out1, temperature, device=device)
    z = torch.cat([a, b])
    labels = torch.arange(19, device=device).repeat(2)
    ours = simclr_ext.contrastive_loss(z, z, labels, labels, t, self_offset=0, exclude_positives=True,
                                       positive_weight=weights)
    a2, b2, t2 = leaves(out0, out1, temperature, device=device)
    theirs = ref_dcl(a2, b2, t2, weights)
    assert_close64(ours, theirs, "loss")
    for g_o, g_t in zip(grads(ours, [a, b, t], grad_out), grads(theirs, [a2, b2, t2], grad_out)):
        assert_close64(g_o, g_t, "gradient")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_against_float64_oracle(dtype, device, gen):
    out0, out1 = _pair(29, 40, gen, dtype)
    grad_out = torch.rand((), generator=gen, dtype=torch.float64) + 0.5
    weights = negative_mises_fisher_weights(out0, out1, 0.5).double().repeat(2)
    ours_in = leaves(out0, out1, device=device)
    same_in, ref_in = leaves(out0, out1), leaves(out0.double(), out1.double())
    ours = simclr_ext.dclw_loss(*ours_in, 0.1, 0.5)
    same, ref64 = ref_dcl(*same_in, 0.1, weights.to(dtype)), ref_dcl(*ref_in, 0.1, weights)
    assert_matches_reference(ours.cpu(), same, ref64, dtype, "loss")
    for g_o, g_s, g_r in zip(grads(ours, ours_in, grad_out), grads(same, same_in, grad_out.float()),
                             grads(ref64, ref_in, grad_out)):
        assert g_o.dtype == dtype and g_o.device.type == device
        assert_matches_reference(g_o.cpu(), g_s, g_r, dtype, "gradient")


@pytest.mark.parametrize("device,dtype,tf32", DEVICE_PATHS)
def test_every_precision_path_against_float64_oracle(device, dtype, tf32, gen):
    """dcl_loss on every device and precision path: values and gradients against the float64 oracle on the
    CPU."""
    out0, out1 = torch.randn(2, 29, 24, generator=gen).to(dtype)
    check_on_device(lambda a, b: simclr_ext.dcl_loss(a, b, 0.1, allow_tf32=tf32), lambda a, b: ref_dcl(a, b, 0.1),
                    [out0, out1], device, dtype, tf32, gen, "dcl")


def test_bad_input():
    with pytest.raises(ValueError,
                       match=r"out0 and out1 must have the same shape \(N, D\), dtype and device, got \[4, 3\]"):
        simclr_ext.DCLLoss()(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="out0 must be 2-D"):
        simclr_ext.DCLWLoss()(torch.randn(2, 4, 3, 1), torch.randn(2, 4, 3, 1))
    with pytest.raises(ValueError, match="DCL needs at least 2 samples"):
        simclr_ext.DCLLoss()(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match=r"weight_fn must return one weight per sample, shape \[4\], got \[3\]"):
        simclr_ext.DCLLoss(weight_fn=lambda a, b: torch.ones(3))(torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(TypeError, match="weight_fn must be None or callable"):
        simclr_ext.DCLLoss(weight_fn=2.0)
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        simclr_ext.DCLWLoss(sigma=0)
    with pytest.raises(ValueError, match="positive_weight must not require grad|must not require grad"):
        z = torch.randn(4, 3)
        simclr_ext.contrastive_loss(z, z, torch.arange(4), torch.arange(4),
                                    positive_weight=torch.ones(4, requires_grad=True))
