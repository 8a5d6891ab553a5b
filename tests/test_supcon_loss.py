"""simclr_ext.SupConLoss against pytorch-metric-learning's SupConLoss (flattened views) and the paper's
formulation (contrast_mode "all", temperature / base_temperature factor), float64 values and gradients;
every dtype and precision path against the float64 oracle; bad input. On every device."""
import pytest
import torch
import torch.nn.functional as F
from parity import DEVICE_PATHS, DEVICES, assert_matches_reference
from peers import assert_close64, check_on_device, grads, leaves, ref_supcon

import simclr_ext

pml_losses = pytest.importorskip("pytorch_metric_learning.losses",
                                 reason="pytorch-metric-learning is installed by requirements-dev.txt")


def _paper_supcon(features, labels, temperature, base_temperature):
    """Khosla et al.'s loss as their code computes it (contrast_mode "all"), on normalized features:
    the full (VB x VB) logits, self-contrast masked, mean log-probability of the positives per anchor."""
    b, v, _ = features.shape
    z = F.normalize(torch.cat(torch.unbind(features, dim=1)), dim=1)
    labels = torch.arange(b, device=features.device) if labels is None else labels
    same = (labels[:, None] == labels[None, :]).repeat(v, v)
    not_self = ~torch.eye(v * b, dtype=torch.bool, device=features.device)
    logits = z @ z.T / temperature
    log_prob = logits - torch.logsumexp(logits.masked_fill(~not_self, float("-inf")), dim=1, keepdim=True)
    positives = same & not_self
    mean_log_prob_pos = (log_prob * positives).sum(1) / positives.sum(1)
    return (-(temperature / base_temperature) * mean_log_prob_pos).mean()


def _pml(features, labels, temperature):
    b, v, d = features.shape
    rows = features.transpose(0, 1).reshape(v * b, d)
    labels = torch.arange(b, device=features.device) if labels is None else labels
    return pml_losses.SupConLoss(temperature=temperature)(rows, labels.repeat(v))


def _check_against(fn_ours, fn_theirs, inputs, gen, device="cpu"):
    grad_out = torch.rand((), generator=gen, dtype=torch.float64) + 0.5
    ours_in, theirs_in = leaves(*inputs, device=device), leaves(*inputs, device=device)
    ours, theirs = fn_ours(*ours_in), fn_theirs(*theirs_in)
    assert_close64(ours, theirs, "loss")
    for g_o, g_t in zip(grads(ours, ours_in, grad_out), grads(theirs, theirs_in, grad_out)):
        assert_close64(g_o, g_t, "gradient")


@pytest.mark.parametrize("b,v,d,classes", [(2, 2, 3, None), (5, 2, 7, 3), (17, 3, 130, 4), (33, 2, 1, 40),
                                           (64, 4, 33, None)])
@pytest.mark.parametrize("temperature", [0.07, 0.1, 0.5])
@pytest.mark.parametrize("device", DEVICES)
def test_views_equal_pytorch_metric_learning(b, v, d, classes, temperature, device, gen):
    features = torch.randn(b, v, d, generator=gen, dtype=torch.float64)
    labels = None if classes is None else torch.randint(classes, (b,), generator=gen).to(device)
    _check_against(lambda f: simclr_ext.SupConLoss(temperature)(f, labels), lambda f: _pml(f, labels, temperature),
                   [features], gen, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,d,classes", [(6, 5, 3), (41, 16, 30), (129, 3, 7)])
def test_rows_with_labels_equal_pytorch_metric_learning(n, d, classes, device, gen):
    """(N, D) rows: singletons (no positive) are left out of the mean, as PML's AvgNonZeroReducer does."""
    rows = torch.randn(n, d, generator=gen, dtype=torch.float64)
    labels = torch.randint(classes, (n,), generator=gen).to(device)
    _check_against(lambda x: simclr_ext.supcon_loss(x, labels, 0.2),
                   lambda x: pml_losses.SupConLoss(temperature=0.2)(x, labels), [rows], gen, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature,base_temperature", [(0.07, 0.07), (0.1, 0.07), (0.5, 1.0)])
def test_base_temperature_equals_the_paper_formulation(temperature, base_temperature, device, gen):
    features = torch.randn(19, 2, 24, generator=gen, dtype=torch.float64)
    labels = torch.randint(5, (19,), generator=gen).to(device)
    loss = simclr_ext.SupConLoss(temperature, base_temperature=base_temperature)
    _check_against(lambda f: loss(f, labels), lambda f: _paper_supcon(f, labels, temperature, base_temperature),
                   [features], gen, device)


@pytest.mark.parametrize("device", DEVICES)
def test_tensor_temperature_gradient_matches_materialized_formula(device, gen):
    features = torch.randn(23, 3, 10, generator=gen, dtype=torch.float64)
    labels = torch.randint(4, (23,), generator=gen).to(device)
    temperature = torch.nn.Parameter(torch.tensor(0.15, dtype=torch.float64))
    module = simclr_ext.SupConLoss(temperature, base_temperature=0.07)
    assert [p is temperature for p in module.parameters()] == [True], "a Parameter temperature is the module's"
    _check_against(lambda f, t: simclr_ext.supcon_loss(f, labels, t, 0.07),
                   lambda f, t: ref_supcon(f, labels, t, 0.07), [features, temperature.detach()], gen, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_dtypes_against_float64_oracle(dtype, device, gen):
    features = torch.randn(37, 2, 20, generator=gen).to(dtype)
    labels = torch.randint(6, (37,), generator=gen)
    grad_out = torch.rand((), generator=gen, dtype=torch.float64) + 0.5
    (a,), (a1,), (a64,) = leaves(features, device=device), leaves(features), leaves(features.double())
    ours = simclr_ext.supcon_loss(a, labels.to(device), 0.1)
    same, ref64 = ref_supcon(a1, labels, 0.1), ref_supcon(a64, labels, 0.1)
    assert_matches_reference(ours.cpu(), same, ref64, dtype, "loss")
    (g_o,), (g_s,), (g_r,) = (grads(ours, [a], grad_out), grads(same, [a1], grad_out.float()),
                              grads(ref64, [a64], grad_out))
    assert g_o.dtype == dtype and g_o.device.type == device
    assert_matches_reference(g_o.cpu(), g_s, g_r, dtype, "gradient")


@pytest.mark.parametrize("device,dtype,tf32", DEVICE_PATHS)
def test_every_precision_path_against_float64_oracle(device, dtype, tf32, gen):
    """supcon_loss on every device and precision path: values and gradients against the float64 oracle on
    the CPU."""
    views = torch.randn(31, 3, 20, generator=gen).to(dtype)
    labels = torch.randint(5, (31,), generator=gen)

    def ours(f, y):
        return simclr_ext.supcon_loss(f, y.to(f.device), 0.1, allow_tf32=tf32)

    check_on_device(ours, lambda f, y: ref_supcon(f, y, 0.1), [views, labels], device, dtype, tf32, gen, "supcon")


@pytest.mark.parametrize("device", DEVICES)
def test_multiview_without_labels_is_nt_xent_for_two_views(device, gen):
    z1 = torch.randn(12, 8, generator=gen, dtype=torch.float64).to(device)
    z2 = torch.randn(12, 8, generator=gen, dtype=torch.float64).to(device)
    assert_close64(simclr_ext.supcon_loss(torch.stack([z1, z2], 1), None, 0.3), simclr_ext.nt_xent(z1, z2, 0.3),
                   "SupCon without labels, 2 views")


@pytest.mark.parametrize("features,labels,exc,match", [
    (torch.randn(2, 3, 4, 5), None, ValueError,
     r"features must be \(B, V, D\) views or \(N, D\) rows, got shape \[2, 3, 4, 5\]"),
    (torch.randn(6, 2, 4), torch.arange(5), ValueError, r"labels must have shape \[6\], got \[5\]"),
    (torch.randn(6, 4), None, ValueError, "labels=None needs"),
    (torch.randn(6, 4), torch.rand(6), TypeError, "labels must have an integer dtype"),
    ([[1.0, 2.0]], None, TypeError, "features must be a torch.Tensor"),
])
@pytest.mark.parametrize("device", DEVICES)
def test_bad_input(features, labels, exc, match, device):
    features = features.to(device) if isinstance(features, torch.Tensor) else features
    labels = labels.to(device) if labels is not None else None
    with pytest.raises(exc, match=match):
        simclr_ext.SupConLoss()(features, labels)


def test_bad_temperatures():
    with pytest.raises(ValueError, match="base_temperature must be finite and > 0"):
        simclr_ext.SupConLoss(0.1, base_temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        simclr_ext.SupConLoss(-0.1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(5, 8), (3, 2, 8)])
def test_no_negative_pair_gives_zero_as_pytorch_metric_learning(shape, device, gen):
    """One label for the whole batch: no negative pair, PML's SupConLoss returns 0; ours too, differentiable with
    zero gradients (the temperature's included)."""
    features = torch.randn(shape, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    temperature = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    labels = torch.full((shape[0],), 3, device=device)
    loss = simclr_ext.SupConLoss(temperature)(features, labels)
    rows = features if features.dim() == 2 else features.transpose(0, 1).reshape(-1, shape[-1])
    theirs = pml_losses.SupConLoss(temperature=0.2)(rows.detach().cpu(),
                                                    labels.repeat(rows.shape[0] // shape[0]).cpu())
    assert loss.item() == 0 and theirs.item() == 0
    g_f, g_t = torch.autograd.grad(loss, [features, temperature])
    assert torch.equal(g_f, torch.zeros_like(g_f)) and g_t.item() == 0
    # Views without labels on a single sample: no negative either.
    assert simclr_ext.SupConLoss()(features[:1] if features.dim() == 3 else features[:1, None].expand(1, 2, -1)) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_embeddings_keyword_as_pytorch_metric_learning(device, gen):
    rows = torch.randn(12, 6, generator=gen, dtype=torch.float64).to(device)
    labels = torch.randint(0, 3, (12,), generator=gen).to(device)
    loss = simclr_ext.SupConLoss(0.3)
    expected = loss(rows, labels)
    assert torch.equal(loss(embeddings=rows, labels=labels), expected)
    assert torch.equal(loss(features=rows, labels=labels), expected)
    assert_close64(expected, pml_losses.SupConLoss(temperature=0.3)(rows.cpu(), labels.cpu()), "loss")
    with pytest.raises(TypeError, match="takes the features once"):
        loss(rows, labels, embeddings=rows)
    with pytest.raises(TypeError, match="got neither"):
        loss(labels=labels)
