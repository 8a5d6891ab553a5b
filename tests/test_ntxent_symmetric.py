"""The symmetric backward (q is k: NT-Xent, multi-view, SupCon) and the kept-probabilities forward of the
CPU kernels: parity with the float64 oracle, the path each call really takes (the kernels' path counters),
bit-identical results for 1 and 2 threads, and the general path still serving q != k."""
import contextlib

import pytest
import torch
from parity import assert_matches_reference

import simclr_ext
import simclr_reference as ref
from simclr_ext import ops

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@contextlib.contextmanager
def _keep_limit(elements):
    """Forces the forward to keep its probabilities (a large limit) or to stream (0)."""
    old = ops._KEEP_PROBS_MAX_ELEMENTS
    ops._KEEP_PROBS_MAX_ELEMENTS = elements
    try:
        yield
    finally:
        ops._KEEP_PROBS_MAX_ELEMENTS = old


KEEP = {"kept": 1 << 40, "streamed": 0}


@contextlib.contextmanager
def _threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _counts():
    return {k: v for k, v in ops.ntxent_path_counts().items() if v}


def _sample(rows, d, dtype, gen, noncontiguous=False):
    z = torch.randn(rows, 2 * d if noncontiguous else d, generator=gen)
    # Rows of norm >= 0.05: the float64 oracle's own gradient error grows like 1 / |z| (at D = 1, where the
    # exact gradient is 0, rows of norm 2e-4 gave it 7e-12, above the 1e-12 floor of the float64 bound).
    z = z * (0.05 / z.norm(dim=1, keepdim=True)).clamp_min(1.0)
    return z.to(dtype)[:, ::2] if noncontiguous else z.to(dtype)


def _check_one_input(loss_fn, ref_fn, z, dtype, gen, what):
    """loss_fn(z) (per-row losses) against ref_fn in `dtype` and in float64, values and the gradient of
    sum(loss * grad_out) with a random grad_out."""
    ours_in = z.detach().clone().requires_grad_(True)
    same_in = z.detach().clone().requires_grad_(True)
    ref_in = z.detach().double().requires_grad_(True)
    ours, same, ref64 = loss_fn(ours_in), ref_fn(same_in), ref_fn(ref_in)
    grad_out = torch.rand(ref64.shape, generator=gen, dtype=torch.float64) + 0.5
    assert_matches_reference(ours, same, ref64, dtype, f"{what} loss")
    (g_o,) = torch.autograd.grad((ours * grad_out.to(ours.dtype)).sum(), ours_in)
    (g_s,) = torch.autograd.grad((same * grad_out.to(same.dtype)).sum(), same_in)
    (g_r,) = torch.autograd.grad((ref64 * grad_out).sum(), ref_in)
    assert g_o.dtype == z.dtype and g_o.shape == z.shape
    assert_matches_reference(g_o, g_s, g_r, dtype, f"{what} grad")


def _labels(kind, rows, gen):
    if kind == "simclr":
        return torch.arange(rows // 2).repeat(2)
    if kind in ("views3", "views4"):
        v = int(kind[-1])
        return torch.arange(rows // v).repeat(v)
    labels = torch.randint(0, 5, (rows,), generator=gen)  # supcon, with two singleton classes
    labels[0], labels[rows // 2] = 100, 101
    return labels


def _rows(kind, n):
    return {"simclr": 2 * n, "views3": 3 * n, "views4": 4 * n, "supcon": 2 * n + 1}[kind]


@pytest.mark.parametrize("mode", list(KEEP))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["simclr", "views3", "views4", "supcon"])
@pytest.mark.parametrize("n,d,t", [(1, 3, 0.5), (3, 1, 0.1), (37, 33, 0.07), (131, 130, 1.0)])
def test_symmetric_path_matches_reference(n, d, t, kind, dtype, mode, gen):
    rows = _rows(kind, n)
    labels = _labels(kind, rows, gen)
    z = _sample(rows, d, dtype, gen, noncontiguous=(n == 37))

    def ours(a):
        return simclr_ext.contrastive_loss(a, a, labels, labels, t, self_offset=0, reduction="none")

    def oracle(a):
        return ref.contrastive_loss(a, a, labels, labels, t, self_offset=0, reduction="none")

    ops.reset_ntxent_path_counts()
    with _keep_limit(KEEP[mode]):
        _check_one_input(ours, oracle, z, dtype, gen, f"{kind} N={n} D={d} t={t} {mode}")
    suffix = "_kept" if mode == "kept" else ""
    assert _counts() == {f"cpu_forward_{mode}": 1, f"cpu_backward_symmetric{suffix}": 1}


@pytest.mark.parametrize("mode", list(KEEP))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nt_xent_takes_the_symmetric_path(mode, dtype, gen):
    z1, z2 = (torch.randn(70, 24, generator=gen, dtype=dtype) for _ in range(2))
    ops.reset_ntxent_path_counts()
    with _keep_limit(KEEP[mode]):
        _check_one_input(lambda z: simclr_ext.nt_xent(z[:70], z[70:], 0.2, reduction="none"),
                         lambda z: ref.nt_xent(z[:70], z[70:], 0.2, reduction="none"), torch.cat([z1, z2]), dtype,
                         gen, f"nt_xent {mode}")
    suffix = "_kept" if mode == "kept" else ""
    assert _counts() == {f"cpu_forward_{mode}": 1, f"cpu_backward_symmetric{suffix}": 1}


def test_default_keep_decision_by_size_and_grad(gen):
    """The forward keeps its probabilities only when they will be used (grad needed) and are small."""
    small = torch.randn(64, 8, generator=gen, requires_grad=True)
    ops.reset_ntxent_path_counts()
    simclr_ext.nt_xent(small, small + 1).backward()
    with torch.no_grad():
        simclr_ext.nt_xent(small, small + 1)
    simclr_ext.nt_xent(small.detach(), small.detach() + 1)
    assert _counts() == {"cpu_forward_kept": 1, "cpu_forward_streamed": 2, "cpu_backward_symmetric_kept": 1}
    limit = ops._KEEP_PROBS_MAX_ELEMENTS
    side = int(limit ** 0.5)
    big = torch.randn(side // 2 + 1, 4, generator=gen, requires_grad=True)  # (2N)^2 just above the limit
    ops.reset_ntxent_path_counts()
    simclr_ext.nt_xent(big, big * 2).backward()
    assert _counts() == {"cpu_forward_streamed": 1, "cpu_backward_symmetric": 1}


@pytest.mark.parametrize("mode", list(KEEP))
@pytest.mark.parametrize("kind", ["distinct", "detached_keys", "different_labels", "offset"])
def test_general_path_when_queries_are_not_the_keys(kind, mode, gen):
    """q != k (other tensors, or the same memory in another tensor, or other labels, or a key slice): the
    two-pass general backward, still matching the oracle for both inputs."""
    d = 19
    z = torch.randn(90, d, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 6, (90,), generator=gen)
    if kind == "offset":
        q, q_labels, offset = z[10:40].clone(), labels[10:40].clone(), 10
    else:
        q, q_labels, offset = z.clone(), labels, 0
    k_labels = labels.clone() if kind == "different_labels" else labels
    q_leaf = q.requires_grad_(True)
    k_leaf = z.clone().requires_grad_(True)
    ops.reset_ntxent_path_counts()
    with _keep_limit(KEEP[mode]):
        if kind == "detached_keys":  # MoCo style: k shares q's memory but takes no gradient
            k_in = q_leaf.detach()
            loss = simclr_ext.contrastive_loss(q_leaf, k_in, q_labels, k_labels, 0.3, self_offset=offset,
                                               reduction="none")
            ref_q = q.detach().clone().requires_grad_(True)
            expect = ref.contrastive_loss(ref_q, ref_q.detach(), q_labels, k_labels, 0.3, self_offset=offset,
                                          reduction="none")
            grad_out = torch.rand(loss.shape, generator=gen, dtype=torch.float64)
            (g,) = torch.autograd.grad((loss * grad_out).sum(), q_leaf)
            (g_ref,) = torch.autograd.grad((expect * grad_out).sum(), ref_q)
            torch.testing.assert_close(loss, expect, rtol=0, atol=1e-12)
            torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-12)
        else:
            k_in = k_leaf
            loss = simclr_ext.contrastive_loss(q_leaf, k_in, q_labels, k_labels, 0.3, self_offset=offset,
                                               reduction="none")
            a, b = q.detach().clone().requires_grad_(True), z.clone().requires_grad_(True)
            expect = ref.contrastive_loss(a, b, q_labels, k_labels, 0.3, self_offset=offset, reduction="none")
            grad_out = torch.rand(loss.shape, generator=gen, dtype=torch.float64)
            got = torch.autograd.grad((loss * grad_out).sum(), (q_leaf, k_leaf))
            want = torch.autograd.grad((expect * grad_out).sum(), (a, b))
            torch.testing.assert_close(loss, expect, rtol=0, atol=1e-12)
            for x, y in zip(got, want):
                torch.testing.assert_close(x, y, rtol=0, atol=1e-12)
    suffix = "_kept" if mode == "kept" else ""
    assert _counts() == {f"cpu_forward_{mode}": 1, f"cpu_backward_general{suffix}": 1}


def _run(fn, z):
    leaf = z.detach().clone().requires_grad_(True)
    out = fn(leaf)
    (g,) = torch.autograd.grad(out.sum() * 0.37, leaf)
    return out.detach(), g


@pytest.mark.parametrize("mode", list(KEEP))
@pytest.mark.parametrize("case", ["symmetric", "general"])
def test_one_and_two_threads_bit_identical(case, mode, gen):
    """Every output row has one owner and a fixed summation order: the thread count changes nothing."""
    rows, d = 613, 45  # several row blocks and (streamed) several key tiles, none full
    z = torch.randn(rows, d, generator=gen)
    labels = torch.randint(0, 40, (rows,), generator=gen)
    keys = torch.randn(rows + 77, d, generator=gen)
    k_labels = torch.randint(0, 40, (rows + 77,), generator=gen)
    if case == "symmetric":
        def fn(a):
            return simclr_ext.contrastive_loss(a, a, labels, labels, 0.1, self_offset=0, reduction="none")
    else:
        def fn(a):
            return simclr_ext.contrastive_loss(a, keys, labels, k_labels, 0.1, reduction="none")
    with _keep_limit(KEEP[mode]):
        with _threads(1):
            one = _run(fn, z)
        with _threads(2):
            two = _run(fn, z)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kept_and_streamed_agree(dtype, gen):
    """The two forwards (and backwards) compute the same function to rounding."""
    z = torch.randn(300, 40, generator=gen, dtype=dtype)
    labels = torch.randint(0, 30, (300,), generator=gen)

    def fn(a):
        return simclr_ext.contrastive_loss(a, a, labels, labels, 0.2, self_offset=0, reduction="none")

    with _keep_limit(KEEP["kept"]):
        kept = _run(fn, z)
    with _keep_limit(KEEP["streamed"]):
        streamed = _run(fn, z)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for a, b in zip(kept, streamed):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("mode", list(KEEP))
def test_single_key_cancels_exactly(mode):
    """N = 1: each row's only key is its positive, so its softmax is exactly 1 and the gradient exactly 0."""
    z1 = torch.randn(1, 5, dtype=torch.float32, requires_grad=True)
    z2 = torch.randn(1, 5, dtype=torch.float32, requires_grad=True)
    with _keep_limit(KEEP[mode]):
        loss = simclr_ext.nt_xent(z1, z2, 0.1)
        g1, g2 = torch.autograd.grad(loss, (z1, z2))
    assert loss.item() == 0.0
    assert torch.count_nonzero(g1) == 0 and torch.count_nonzero(g2) == 0


def test_backward_rejects_bad_probs(gen):
    z = torch.randn(6, 3, generator=gen)
    labels = torch.arange(3).repeat(2)
    loss, lse, npos, probs = torch.ops.simclr_ext.ntxent(z, z, labels, labels, torch.tensor(0.5), 0, True, True)
    with pytest.raises(RuntimeError, match=r"probs must be empty or the forward's contiguous Float \(M, L\)"):
        torch.ops.simclr_ext._ntxent_backward(loss, z, z, labels, labels, lse, npos, torch.tensor(0.5), 0, True,
                                              probs[:, :5])
    with pytest.raises(RuntimeError, match="probs must be empty"):
        torch.ops.simclr_ext._ntxent_backward(loss, z, z, labels, labels, lse, npos, torch.tensor(0.5), 0, True,
                                              probs.double())
