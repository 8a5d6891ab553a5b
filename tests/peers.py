"""Helpers of the loss-family tests: fresh leaves, gradient comparison, the float64 oracles of the
modules built from simclr_reference's materialized contrastive loss, the check of a loss on any device."""
import torch
from parity import assert_matches_reference, tolerance_dtype

import simclr_reference as ref

RTOL = 1e-8  # the parity target against the peers in float64


def leaves(*xs, device=None):
    return [x.detach().to(device).clone().requires_grad_(True) for x in xs]


def grads(loss, inputs, grad_out):
    """Gradients of loss * grad_out (a scalar that is not 1) with respect to every input."""
    return torch.autograd.grad(loss * grad_out, inputs, retain_graph=True, allow_unused=False)


def assert_close64(ours, theirs, what):
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=RTOL, atol=1e-12, msg=lambda m: f"{what}: {m}")


def ref_clip(image, text, logit_scale, normalize=False, labels=None):
    """CLIP's loss on the materialized logits: dot products of the features as given (open_clip), or cosines;
    labels: None (pair i alone) or classes (every equal-label pair is a positive)."""
    if labels is None:
        labels = torch.arange(image.shape[0], device=image.device)
    t = 1.0 / logit_scale
    return (ref.contrastive_loss(image, text, labels, labels, t, normalize=normalize)
            + ref.contrastive_loss(text, image, labels, labels, t, normalize=normalize)) / 2


def ref_supcon(features, labels, temperature, base_temperature=None):
    b, v, d = features.shape
    rows = features.transpose(0, 1).reshape(v * b, d)
    row_labels = (torch.arange(b, device=features.device) if labels is None else labels).repeat(v)
    loss = ref.contrastive_loss(rows, rows, row_labels, row_labels, temperature, self_offset=0)
    return loss if base_temperature is None else loss * (temperature / base_temperature)


def ref_dcl(out0, out1, temperature, weights=None):
    z = torch.cat([out0, out1])
    labels = torch.arange(out0.shape[0], device=out0.device).repeat(2)
    return ref.contrastive_loss(z, z, labels, labels, temperature, self_offset=0, exclude_positives=True,
                                positive_weight=weights)


def check_on_device(ours_fn, ref_fn, inputs, device, dtype, tf32, gen, what):
    """ours_fn on `device` copies of inputs; ref_fn in `dtype` and in float64 on the CPU; values and gradients
    of (loss * grad_out).sum() for every floating input. A 0-d floating input (a temperature, a logit scale)
    is judged in its accumulation dtype; the TF32 path like float16."""
    dev_in = [x.to(device).detach().requires_grad_(x.is_floating_point()) for x in inputs]
    same_in = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
    ref_in = [(x.double() if x.is_floating_point() else x).detach().requires_grad_(x.is_floating_point())
              for x in inputs]
    ours, same, ref64 = ours_fn(*dev_in), ref_fn(*same_in), ref_fn(*ref_in)
    grad_out = torch.rand(ref64.shape, generator=gen, dtype=torch.float64) + 0.5
    tol = tolerance_dtype(dtype, tf32)
    assert ours.device.type == device
    assert_matches_reference(ours.cpu(), same, ref64, tol, f"{what} loss")
    floats = [i for i, x in enumerate(inputs) if x.is_floating_point()]
    g_o = torch.autograd.grad((ours * grad_out.to(device, ours.dtype)).sum(), [dev_in[i] for i in floats])
    g_s = torch.autograd.grad((same * grad_out.to(same.dtype)).sum(), [same_in[i] for i in floats])
    g_r = torch.autograd.grad((ref64 * grad_out).sum(), [ref_in[i] for i in floats])
    for i, a, b, c in zip(floats, g_o, g_s, g_r):
        assert a.device.type == device and a.dtype == dev_in[i].dtype
        t = tol if inputs[i].dim() else (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_matches_reference(a.cpu(), b, c, tolerance_dtype(t, tf32), f"{what} grad of input {i}")

