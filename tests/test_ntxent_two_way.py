"""The op's two-way mode (CLIP): one call gives every query row's loss over the keys and every key column's
loss over the queries. Against the float64 oracle run once per direction: values, gradients of q, k and the
temperature, in every dtype; the path it takes, opcheck, bad arguments, NaN and zero rows."""
import pytest
import torch
from parity import DEVICES, assert_matches_reference, backend

import simclr_ext
import simclr_reference as ref

ops = simclr_ext.ops
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _sample(m, l, d, gen, dtype=torch.float64, classes=3):
    q = torch.randn(m, d, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(l, d, generator=gen, dtype=torch.float64).to(dtype)
    # Repeated labels: several positives per row and per column, and some rows / columns without any.
    return q, k, torch.randint(0, classes, (m,), generator=gen), torch.randint(0, classes + 1, (l,), generator=gen)


def _two_way(q, k, ql, kl, t):
    return ops.ntxent(q, k, ql, kl, t, -1, False, two_way=True)


def _oracle(q, k, ql, kl, t):
    """(M + L,) per-row losses from the materialized formula: rows of q over k, then rows of k over q."""
    return torch.cat([ref.contrastive_loss(q, k, ql, kl, t, reduction="none"),
                      ref.contrastive_loss(k, q, kl, ql, t, reduction="none")])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,l,d", [(1, 1, 1), (5, 3, 7), (70, 300, 33), (257, 129, 16)])
def test_values_and_gradients_match_the_oracle_in_both_directions(m, l, d, device, gen):
    q, k, ql, kl = _sample(m, l, d, gen)
    t = torch.tensor(0.07 + torch.rand((), generator=gen, dtype=torch.float64).item(), dtype=torch.float64,
                     requires_grad=True)
    grad_out = torch.rand(m + l, generator=gen, dtype=torch.float64)
    a, b = q.to(device).requires_grad_(), k.to(device).requires_grad_()
    loss, lse, npos = _two_way(a, b, ql.to(device), kl.to(device), t)
    loss, lse, npos = loss.cpu(), lse.cpu(), npos.cpu()
    t2 = t.detach().clone().requires_grad_()
    a2, b2 = q.clone().requires_grad_(), k.clone().requires_grad_()
    expected = _oracle(a2, b2, ql, kl, t2)
    assert loss.shape == lse.shape == npos.shape == (m + l,)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    positives = (ql[:, None] == kl[None, :]).to(torch.int32)
    assert torch.equal(npos, torch.cat([positives.sum(1), positives.sum(0)]).to(torch.int32))
    ours = torch.autograd.grad(loss, (a, b, t), grad_out)
    theirs = torch.autograd.grad(expected, (a2, b2, t2), grad_out)
    for name, x, y in zip(("q", "k", "temperature"), ours, theirs):
        torch.testing.assert_close(x.cpu(), y, rtol=1e-9, atol=1e-12,
                                   msg=lambda msg, name=name: f"grad of {name}: {msg}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_against_float64(dtype, device, gen):
    q, k, ql, kl = _sample(37, 300, 24, gen)
    grad_out = torch.rand(337, generator=gen, dtype=torch.float64)
    a, b = q.to(device, dtype).requires_grad_(), k.to(device, dtype).requires_grad_()
    loss, _, _ = _two_way(a, b, ql.to(device), kl.to(device), 0.2)
    a64, b64 = q.clone().requires_grad_(), k.clone().requires_grad_()
    ref64 = _oracle(a64, b64, ql, kl, 0.2)
    a_lo, b_lo = q.to(dtype).requires_grad_(), k.to(dtype).requires_grad_()
    ref_lo = _oracle(a_lo, b_lo, ql, kl, 0.2)
    assert_matches_reference(loss, ref_lo, ref64, dtype, "loss")
    ours = torch.autograd.grad(loss, (a, b), grad_out.to(device, loss.dtype))
    lo = torch.autograd.grad(ref_lo, (a_lo, b_lo), grad_out.to(ref_lo.dtype))
    r64 = torch.autograd.grad(ref64, (a64, b64), grad_out)
    for name, x, y, z in zip(("q", "k"), ours, lo, r64):
        assert x.dtype == dtype and x.device.type == device
        assert_matches_reference(x.cpu(), y, z, dtype, f"grad of {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_takes_the_two_way_paths_and_equals_two_one_way_calls(device, gen):
    q, k, ql, kl = _sample(130, 90, 10, gen, dtype=torch.float32)
    q, k, ql, kl = q.to(device), k.to(device), ql.to(device), kl.to(device)
    a, b = q.clone().requires_grad_(), k.clone().requires_grad_()
    ops.reset_ntxent_path_counts()
    loss, _, _ = _two_way(a, b, ql, kl, 0.3)
    loss.sum().backward()
    counts = ops.ntxent_path_counts()
    assert counts[f"{backend(device)}_forward_two_way"] == 1 and counts[f"{backend(device)}_backward_two_way"] == 1
    a2, b2 = q.clone().requires_grad_(), k.clone().requires_grad_()
    rows = simclr_ext.contrastive_loss(a2, b2, ql, kl, 0.3, reduction="none")
    cols = simclr_ext.contrastive_loss(b2, a2, kl, ql, 0.3, reduction="none")
    torch.testing.assert_close(loss, torch.cat([rows, cols]), rtol=2e-6, atol=2e-6)
    (rows.sum() + cols.sum()).backward()
    torch.testing.assert_close(a.grad, a2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-5, atol=1e-6)


def test_deterministic_and_thread_count_independent_up_to_rounding(gen):
    q, k, ql, kl = _sample(700, 520, 20, gen, dtype=torch.float32)
    threads = torch.get_num_threads()

    def run(n_threads):
        torch.set_num_threads(n_threads)
        try:
            a, b = q.clone().requires_grad_(), k.clone().requires_grad_()
            loss, _, _ = _two_way(a, b, ql, kl, 0.1)
            return [loss] + list(torch.autograd.grad(loss.sum(), (a, b)))
        finally:
            torch.set_num_threads(threads)

    first, again, two = run(1), run(1), run(2)
    for x, y, z in zip(first, again, two):
        assert torch.equal(x, y)  # same thread count: bit for bit
        torch.testing.assert_close(x, z, rtol=1e-5, atol=1e-6)  # dk and column sums are summed per task


def test_tensor_temperature_under_compile(gen):
    q, k, ql, kl = _sample(20, 30, 6, gen, dtype=torch.float32)
    fn = torch.compile(lambda a, b, t: _two_way(a, b, ql, kl, t)[0].mean(), fullgraph=True, backend="aot_eager")
    t = torch.tensor(0.5, requires_grad=True)
    (g,) = torch.autograd.grad(fn(q, k, t), t)
    t2 = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    (g2,) = torch.autograd.grad(_oracle(q.double(), k.double(), ql, kl, t2).mean(), t2)
    torch.testing.assert_close(g.double(), g2, rtol=1e-4, atol=1e-6)


def test_opcheck(gen):
    q, k, ql, kl = _sample(6, 9, 5, gen, dtype=torch.float32)
    q.requires_grad_()
    k.requires_grad_()
    args = (q, k, ql, kl, torch.tensor(0.3), -1, False, False, False, None, True)
    torch.library.opcheck(torch.ops.simclr_ext.ntxent.default, args)
    loss, lse, npos, _ = torch.ops.simclr_ext.ntxent(*args)
    grad = torch.rand(15, generator=gen)
    bargs = (grad, q.detach(), k.detach(), ql, kl, lse, npos, torch.tensor(0.3), -1, False, None, False, None, True)
    torch.library.opcheck(torch.ops.simclr_ext._ntxent_backward.default, bargs,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_nan_and_zero_rows(gen):
    q, k, ql, kl = _sample(8, 6, 4, gen)
    ql[:] = kl[0]  # every query is a positive of key 0: every loss is defined
    q[3] = 0.0  # a zero row: clamped norm, cosine 0 with everything, as F.normalize gives
    loss, _, _ = _two_way(q, k, ql, kl, 0.5)
    torch.testing.assert_close(loss, _oracle(q, k, ql, kl, 0.5), rtol=1e-10, atol=1e-12)
    q[5, 1] = float("nan")
    loss, _, npos = _two_way(q, k, ql, kl, 0.5)
    assert torch.isnan(loss[5]) and not torch.isnan(loss[:5]).any()
    # Every key column sees the NaN query; those without positives have the constant loss 0, as in the oracle.
    assert torch.equal(torch.isnan(loss), torch.isnan(_oracle(q, k, ql, kl, 0.5)))
    assert torch.isnan(loss[8:][npos[8:] > 0]).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(self_offset=0), "self_offset = -1"),
    (dict(exclude_positives=True), "exclude_positives"),
    (dict(keep_probs=True), "keep_probs"),
])
def test_bad_combinations_are_refused(kwargs, match, gen):
    q, k, ql, kl = _sample(4, 4, 3, gen, dtype=torch.float32)
    args = dict(self_offset=-1, keep_probs=False, exclude_positives=False)
    args.update(kwargs)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.simclr_ext.ntxent(q, k, ql, kl, torch.tensor(0.3), args["self_offset"], False, args["keep_probs"],
                                    args["exclude_positives"], None, True)


def test_backward_checks_the_two_way_lengths(gen):
    q, k, ql, kl = _sample(4, 5, 3, gen, dtype=torch.float32)
    _, lse, npos, _ = torch.ops.simclr_ext.ntxent(q, k, ql, kl, torch.tensor(0.3), -1, False, False, False, None, True)
    with pytest.raises(RuntimeError, match=r"grad_loss must have shape \[9\]"):
        torch.ops.simclr_ext._ntxent_backward(torch.ones(4), q, k, ql, kl, lse, npos, torch.tensor(0.3), -1, False,
                                              None, False, None, True)
