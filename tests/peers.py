"""Helpers of the loss-family tests: fresh leaves, gradient comparison, the float64 oracles of the
modules built from simclr_reference's materialized contrastive loss."""
import torch

import simclr_reference as ref

RTOL = 1e-8  # the parity target against the peers in float64


def leaves(*xs):
    return [x.detach().clone().requires_grad_(True) for x in xs]


def grads(loss, inputs, grad_out):
    """Gradients of loss * grad_out (a scalar that is not 1) with respect to every input."""
    return torch.autograd.grad(loss * grad_out, inputs, retain_graph=True, allow_unused=False)


def assert_close64(ours, theirs, what):
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=RTOL, atol=1e-12, msg=lambda m: f"{what}: {m}")


def ref_clip(image, text, logit_scale):
    labels = torch.arange(image.shape[0])
    t = 1.0 / logit_scale
    return (ref.contrastive_loss(image, text, labels, labels, t) + ref.contrastive_loss(text, image, labels, labels, t)) / 2


def ref_supcon(features, labels, temperature, base_temperature=None):
    b, v, d = features.shape
    rows = features.transpose(0, 1).reshape(v * b, d)
    row_labels = (torch.arange(b) if labels is None else labels).repeat(v)
    loss = ref.contrastive_loss(rows, rows, row_labels, row_labels, temperature, self_offset=0)
    return loss if base_temperature is None else loss * (temperature / base_temperature)


def ref_dcl(out0, out1, temperature, weights=None):
    z = torch.cat([out0, out1])
    labels = torch.arange(out0.shape[0]).repeat(2)
    return ref.contrastive_loss(z, z, labels, labels, temperature, self_offset=0, exclude_positives=True,
                                positive_weight=weights)
