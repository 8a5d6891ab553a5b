"""The op's differentiable temperature and its DCL variants (positives out of the denominator, a per-row
weight on the positive term): values and gradients (q, k and the temperature) against autograd through the
materialized formula in float64, every dtype, both paths (q is k, and q != k), every device and precision path
through the public contrastive_loss, the new schema under opcheck and torch.compile(fullgraph=True), bad input."""
import itertools

import pytest
import torch
from parity import DEVICE_PATHS, OPCHECK_BACKWARD_UTILS, assert_matches_reference, contrastive_inputs
from peers import check_on_device

import simclr_ext
import simclr_reference as ref
from simclr_ext import ops

_op = torch.ops.simclr_ext
# The CPU forward keeps its softmax probabilities for small problems (simclr_ext.ops._keep_probs) and the
# backward then reads them; "streamed" forces the recomputing kernels at any size.
KEEP_LIMIT = {"kept": 1 << 40, "streamed": 0}


def _leaf(x):
    return x.detach().clone().requires_grad_(True)


def _case(kind, m, d, dtype, gen):
    """(q, k or None for q is k, q_labels, k_labels, self_offset) of the label layouts the op serves."""
    if kind == "symmetric":  # q is k = cat(z1, z2): NT-Xent / DCL
        labels = torch.arange(m).repeat(2)
        return torch.randn(2 * m, d, generator=gen, dtype=dtype), None, labels, labels, 0
    if kind == "views":  # q is k, 3 views of m samples with classes: several positives per row
        labels = (torch.randperm(m, generator=gen) % max(2, m // 2)).repeat(3)  # >= 2 classes when m >= 2
        return torch.randn(3 * m, d, generator=gen, dtype=dtype), None, labels, labels, 0
    if kind == "slice":  # queries are keys [m, 2m) of 3m keys (a distributed gather)
        k = torch.randn(3 * m, d, generator=gen, dtype=dtype)
        labels = torch.arange(m).repeat(3)
        return k[m:2 * m].clone(), k, labels[m:2 * m].clone(), labels, m
    # general: q != k (CLIP), one positive per row plus a few extra negatives
    q = torch.randn(m, d, generator=gen, dtype=dtype)
    k = torch.randn(m + 3, d, generator=gen, dtype=dtype)
    return q, k, torch.arange(m), torch.cat([torch.arange(m), torch.full((3,), -1)]), None


def _run(fn, q, k, ql, kl, offset, t, exclude, weight):
    """fn on fresh leaves; returns (loss, leaves) with k=None meaning the queries are the keys."""
    qq, tt = _leaf(q), _leaf(t)
    kk = qq if k is None else _leaf(k)
    loss = fn(qq, kk, ql, kl, tt, self_offset=offset, reduction="none", exclude_positives=exclude,
              positive_weight=weight)
    return loss, [qq, tt] if k is None else [qq, kk, tt]


def _compare(kind, m, d, dtype, exclude, weighted, gen, t=0.2):
    q, k, ql, kl, offset = _case(kind, m, d, dtype, gen)
    rows = q.shape[0]
    weight = torch.rand(rows, generator=gen, dtype=torch.float64) + 0.5 if weighted else None
    temperature = torch.tensor(t, dtype=torch.float32 if dtype != torch.float64 else torch.float64)
    args = (ql, kl, offset)
    ours, ours_in = _run(simclr_ext.contrastive_loss, q, k, *args, temperature, exclude, weight)
    same, same_in = _run(ref.contrastive_loss, q, k, *args, temperature,
                         exclude, None if weight is None else weight.to(dtype))
    ref64, ref_in = _run(ref.contrastive_loss, q.double(), None if k is None else k.double(), *args,
                         temperature.double(), exclude, weight)
    grad_out = torch.rand(rows, generator=gen, dtype=torch.float64) + 0.5
    what = f"{kind} M={rows} D={d} {dtype} exclude={exclude} weighted={weighted}"
    assert_matches_reference(ours, same, ref64, dtype, f"{what} loss")
    g_o = torch.autograd.grad((ours * grad_out.to(ours.dtype)).sum(), ours_in)
    g_s = torch.autograd.grad((same * grad_out.to(same.dtype)).sum(), same_in)
    g_r = torch.autograd.grad((ref64 * grad_out).sum(), ref_in)
    for name, a, b, c, x in zip(["q", "t"] if k is None else ["q", "k", "t"], g_o, g_s, g_r, ours_in):
        assert a.dtype == x.dtype and a.shape == x.shape, f"{what} grad of {name}: {a.dtype} {list(a.shape)}"
        tol_dtype = dtype if name != "t" or dtype == torch.float64 else torch.float32
        assert_matches_reference(a, b, c, tol_dtype, f"{what} grad of {name}")
    return g_o[-1]


# With one sample, positives out of the denominator leave it empty (loss -inf): not a case to compare.
_SIZES = [(1, 3), (3, 1), (17, 130), (129, 33)]
_VARIANTS = [(False, False), (True, False), (True, True), (False, True)]


@pytest.mark.parametrize("mode", list(KEEP_LIMIT))
@pytest.mark.parametrize("kind", ["symmetric", "views", "slice", "general"])
@pytest.mark.parametrize("m,d,exclude,weighted", [(m, d, e, w)
                                                  for (m, d), (e, w) in itertools.product(_SIZES, _VARIANTS)
                                                  if m > 1 or not e])
def test_float64_values_and_gradients(kind, m, d, exclude, weighted, mode, gen, monkeypatch):
    monkeypatch.setattr(ops, "_KEEP_PROBS_MAX_ELEMENTS", KEEP_LIMIT[mode])
    ops.reset_ntxent_path_counts()
    grad_t = _compare(kind, m, d, torch.float64, exclude, weighted, gen)
    assert grad_t.dim() == 0
    counts = ops.ntxent_path_counts()
    path = "symmetric" if kind in ("symmetric", "views") else "general"
    suffix = "_kept" if mode == "kept" else ""
    assert counts[f"cpu_backward_{path}{suffix}"] == 1, counts


@pytest.mark.parametrize("mode", list(KEEP_LIMIT))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["symmetric", "general"])
@pytest.mark.parametrize("exclude,weighted", [(False, False), (True, True)])
def test_dtypes_against_float64_oracle(kind, dtype, exclude, weighted, mode, gen, monkeypatch):
    monkeypatch.setattr(ops, "_KEEP_PROBS_MAX_ELEMENTS", KEEP_LIMIT[mode])
    _compare(kind, 37, 40, dtype, exclude, weighted, gen)


@pytest.mark.parametrize("mode", list(KEEP_LIMIT))
@pytest.mark.parametrize("temperature", [0.05, 0.5, 2.0])
def test_temperature_gradient_matches_autograd_through_the_matrix(temperature, mode, gen, monkeypatch):
    monkeypatch.setattr(ops, "_KEEP_PROBS_MAX_ELEMENTS", KEEP_LIMIT[mode])
    """dL/dt alone, with a grad_output that is not 1, to 1e-10 relative: the radial-dot identity is exact."""
    z1 = torch.randn(40, 24, generator=gen, dtype=torch.float64)
    z2 = torch.randn(40, 24, generator=gen, dtype=torch.float64)
    c = torch.rand((), generator=gen, dtype=torch.float64) + 0.5
    t = torch.tensor(temperature, dtype=torch.float64, requires_grad=True)
    (simclr_ext.nt_xent(z1, z2, t) * c).backward()
    ours = t.grad.clone()
    t.grad = None
    (ref.nt_xent(z1, z2, t) * c).backward()
    torch.testing.assert_close(ours, t.grad, rtol=1e-10, atol=0)


@pytest.mark.parametrize("device,dtype,tf32", DEVICE_PATHS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("exclude,weighted", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("m,d", [(3, 5), (67, 130), (300, 64)])
def test_tensor_temperature_and_dcl_flags(m, d, symmetric, exclude, weighted, device, dtype, tf32, gen):
    """The public contrastive_loss with a tensor temperature and the DCL flags, q is k and q != k, on every
    device and precision path: values and gradients (the temperature's too) against the float64 oracle."""
    _, z64, _, labels, _ = contrastive_inputs("simclr", 2 * m, 2 * m, d, gen)  # z1, z2 stacked, one positive each
    z = z64.to(dtype)
    weight = torch.rand(2 * m, generator=gen, dtype=torch.float64) + 0.5 if weighted else None
    t = torch.tensor(0.2, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    extra = dict(exclude_positives=exclude)

    def ours(x, temperature):
        w = None if weight is None else weight.to(x.device)
        k = x if symmetric else x.flip(0)
        kl = labels if symmetric else labels.flip(0)
        return simclr_ext.contrastive_loss(x, k, labels.to(x.device), kl.to(x.device), temperature.to(x.device),
                                           self_offset=0 if symmetric else None, reduction="none", allow_tf32=tf32,
                                           positive_weight=w, **extra)

    def reference(x, temperature):
        w = None if weight is None else weight.to(x.dtype)
        k = x if symmetric else x.flip(0)
        kl = labels if symmetric else labels.flip(0)
        return ref.contrastive_loss(x, k, labels, kl, temperature, self_offset=0 if symmetric else None,
                                    reduction="none", positive_weight=w, **extra)

    check_on_device(ours, reference, [z, t], device, dtype, tf32, gen,
                    f"m={m} d={d} symmetric={symmetric} {extra} w={weighted}")


def test_clamped_rows_keep_the_temperature_gradient(gen):
    """Rows whose norm is clamped (all-zero rows, tiny rows) still count in dL/dt."""
    q = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    q[2] = 0
    q[5] *= 1e-14
    labels = torch.arange(9) % 3
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    simclr_ext.contrastive_loss(q, q, labels, labels, t, self_offset=0).backward()
    ours = t.grad.clone()
    t.grad = None
    ref.contrastive_loss(q, q, labels, labels, t, self_offset=0).backward()
    torch.testing.assert_close(ours, t.grad, rtol=1e-10, atol=1e-14)


def test_float_and_tensor_temperature_agree(gen):
    z1, z2 = torch.randn(2, 13, 6, generator=gen)
    torch.testing.assert_close(simclr_ext.nt_xent(z1, z2, torch.tensor(0.3)), simclr_ext.nt_xent(z1, z2, 0.3),
                               rtol=0, atol=0)
    torch.testing.assert_close(simclr_ext.nt_xent(z1, z2, torch.tensor([0.3], dtype=torch.float64)),
                               simclr_ext.nt_xent(z1, z2, 0.3), rtol=0, atol=0)


def test_learned_temperature_module_parameter(gen):
    """A learnable temperature trains: NTXentLoss with an nn.Parameter temperature gets its gradient."""
    t = torch.nn.Parameter(torch.tensor(0.5))
    z1, z2 = torch.randn(2, 16, 8, generator=gen)
    module = simclr_ext.NTXentLoss(temperature=t)
    assert [p is t for p in module.parameters()] == [True], "a Parameter temperature is the module's"
    module(z1, z2).backward()
    assert t.grad is not None and t.grad.shape == () and torch.isfinite(t.grad)


def _opcheck_args(gen, exclude, weighted):
    q = torch.randn(7, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(7) % 3
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(7, generator=gen, dtype=torch.float64) + 0.5 if weighted else None
    return q, labels, t, weight


@pytest.mark.parametrize("exclude,weighted", [(False, False), (True, True)])
@pytest.mark.parametrize("same", [True, False])
def test_opcheck_new_schema(exclude, weighted, same, gen):
    q, labels, t, weight = _opcheck_args(gen, exclude, weighted)
    k = q if same else torch.randn(7, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    args = (q, k, labels, labels, t, 0 if same else -1, True)
    flags = {"exclude_positives": exclude, "positive_weight": weight}
    torch.library.opcheck(_op.ntxent.default, args, flags)
    loss, lse, npos = _op.ntxent.default(*args, **flags)[:3]
    grad = torch.rand(7, generator=gen, dtype=loss.dtype)
    bargs = (grad, q.detach(), k.detach(), labels, labels, lse, npos, t.detach(), 0 if same else -1, True, None)
    torch.library.opcheck(_op._ntxent_backward.default, bargs, flags,
                          test_utils=OPCHECK_BACKWARD_UTILS)


def test_torch_compile_fullgraph_with_tensor_temperature(gen):
    model = torch.nn.Linear(12, 8)
    log_t = torch.nn.Parameter(torch.tensor(-1.2))

    @torch.compile(fullgraph=True, backend="inductor")
    def step(x1, x2):
        return simclr_ext.nt_xent(model(x1), model(x2), log_t.exp())

    x1, x2 = torch.randn(2, 16, 12, generator=gen)
    step(x1, x2).backward()
    compiled = (model.weight.grad.clone(), log_t.grad.clone())
    model.weight.grad = log_t.grad = None
    ref.nt_xent(model(x1), model(x2), log_t.exp()).backward()
    torch.testing.assert_close(compiled[0], model.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(compiled[1], log_t.grad, rtol=1e-4, atol=1e-6)


def test_torch_compile_fullgraph_clip_and_dclw(gen):
    logit_scale = torch.nn.Parameter(torch.tensor(2.6))
    clip, dclw = simclr_ext.ClipLoss(), simclr_ext.DCLWLoss(0.2)

    @torch.compile(fullgraph=True, backend="inductor")
    def step(a, b):
        return clip(a, b, logit_scale.exp()) + dclw(a, b)

    a, b = torch.randn(2, 10, 6, generator=gen)
    loss = step(a, b)
    loss.backward()
    eager = clip(a, b, logit_scale.exp()) + dclw(a, b)
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    assert logit_scale.grad is not None and torch.isfinite(logit_scale.grad)


@pytest.mark.parametrize("t,match", [
    (torch.tensor([0.1, 0.2]), "temperature must be a 0-d tensor"),
    (torch.tensor(1), "temperature must be a floating"),
    (torch.tensor(-0.5), "temperature must be finite and > 0"),
    (torch.tensor(float("nan")), "temperature must be finite and > 0"),
])
def test_raw_op_rejects_bad_temperature(t, match):
    q = torch.randn(4, 3)
    labels = torch.arange(4)
    with pytest.raises(RuntimeError, match=match):
        _op.ntxent(q, q, labels, labels, t, 0, True)


@pytest.mark.parametrize("weight,exc,match", [
    (torch.ones(3), ValueError, r"positive_weight must have shape \[4\]"),
    (torch.ones(4, dtype=torch.long), TypeError, "positive_weight must be None or a floating tensor"),
    ([1.0] * 4, TypeError, "positive_weight must be None or a floating tensor"),
])
def test_bad_positive_weight(weight, exc, match):
    q = torch.randn(4, 3)
    with pytest.raises(exc, match=match):
        simclr_ext.contrastive_loss(q, q, torch.arange(4), torch.arange(4), positive_weight=weight)


def test_raw_op_rejects_bad_positive_weight():
    q = torch.randn(4, 3)
    labels = torch.arange(4)
    with pytest.raises(RuntimeError,
                       match=r"positive_weight must be a Float tensor of shape \[4\] on cpu, got Float \[5\]"):
        _op.ntxent(q, q, labels, labels, torch.tensor(0.1), 0, True, positive_weight=torch.ones(5))


def test_temperature_on_another_device_is_refused():
    q = torch.randn(4, 3)
    t = torch.tensor(0.1, device="meta")
    with pytest.raises(ValueError, match="temperature must be on the CPU or on cpu, got meta"):
        simclr_ext.contrastive_loss(q, q, torch.arange(4), torch.arange(4), t)
