"""Values and gradients of the fused contrastive op against simclr_reference in float64."""
import itertools

import pytest
import torch

import simclr_ext
import simclr_reference as ref
from parity import assert_matches_reference

FLOAT_DTYPES = [torch.float64, torch.float32]
HALF_DTYPES = [torch.float16, torch.bfloat16]


def _leaf(x):
    return x.detach().clone().requires_grad_(True)


def _compare(fused_fn, ref_fn, inputs, dtype, gen, what):
    """Runs both losses on copies of `inputs` (dtype) and the reference also in float64; checks the
    loss and the gradients of (loss * grad_out).sum() with a random grad_out that is not 1."""
    ours_in = [_leaf(x) for x in inputs]
    same_in = [_leaf(x) for x in inputs]
    ref64_in = [_leaf(x.double()) for x in inputs]
    ours = fused_fn(*ours_in)
    same = ref_fn(*same_in)
    ref64 = ref_fn(*ref64_in)
    grad_out = torch.rand(ours.shape, generator=gen, dtype=torch.float64) + 0.5
    assert_matches_reference(ours, same, ref64, dtype, f"{what} loss")
    for name, o, s, r in zip("abcdef", ours_in, same_in, ref64_in):
        (g_o,) = torch.autograd.grad((ours * grad_out.to(ours.dtype)).sum(), o, retain_graph=True)
        (g_s,) = torch.autograd.grad((same * grad_out.to(same.dtype)).sum(), s, retain_graph=True)
        (g_r,) = torch.autograd.grad((ref64 * grad_out).sum(), r, retain_graph=True)
        assert g_o.dtype == o.dtype and g_o.shape == o.shape
        assert_matches_reference(g_o, g_s, g_r, dtype, f"{what} grad of input {name}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n,d", list(itertools.product([1, 2, 3, 64, 257], [1, 3, 128, 300])))
@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.5, 1.0])
def test_nt_xent_matches_reference(n, d, temperature, dtype, gen):
    z1 = torch.randn(n, d, generator=gen, dtype=dtype)
    z2 = torch.randn(n, d, generator=gen, dtype=dtype)
    _compare(lambda a, b: simclr_ext.nt_xent(a, b, temperature),
             lambda a, b: ref.nt_xent(a, b, temperature), [z1, z2], dtype, gen, f"N={n} D={d} t={temperature}")


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("n,d", [(1, 3), (3, 1), (64, 128), (129, 130)])
def test_nt_xent_half_inputs(n, d, dtype, gen):
    z1 = torch.randn(n, d, generator=gen).to(dtype)
    z2 = torch.randn(n, d, generator=gen).to(dtype)
    loss = simclr_ext.nt_xent(z1, z2, 0.1)
    assert loss.dtype == torch.float32, "half inputs are upcast: the loss is float32"
    _compare(lambda a, b: simclr_ext.nt_xent(a, b, 0.1), lambda a, b: ref.nt_xent(a, b, 0.1), [z1, z2], dtype, gen,
             f"{dtype} N={n} D={d}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_reductions(reduction, dtype, gen):
    z1 = torch.randn(33, 17, generator=gen, dtype=dtype)
    z2 = torch.randn(33, 17, generator=gen, dtype=dtype)
    _compare(lambda a, b: simclr_ext.nt_xent(a, b, 0.2, reduction=reduction),
             lambda a, b: ref.nt_xent(a, b, 0.2, reduction=reduction), [z1, z2], dtype, gen, reduction)


def _noncontiguous(rows, d, dtype, gen, kind):
    if kind == "strided":
        return torch.randn(rows, 2 * d, generator=gen, dtype=dtype)[:, ::2]
    if kind == "transposed":
        return torch.randn(d, rows, generator=gen, dtype=dtype).t()
    return torch.randn(2 * rows, d, generator=gen, dtype=dtype)[::2]


@pytest.mark.parametrize("kind", ["strided", "transposed", "row_step"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + HALF_DTYPES)
def test_noncontiguous_inputs(kind, dtype, gen):
    z1 = _noncontiguous(37, 19, dtype, gen, kind)
    z2 = _noncontiguous(37, 19, dtype, gen, kind)
    assert not z1.is_contiguous()
    out = simclr_ext.nt_xent(z1, z2, 0.3)
    assert torch.equal(out, simclr_ext.nt_xent(z1.contiguous(), z2.contiguous(), 0.3))
    _compare(lambda a, b: simclr_ext.nt_xent(a, b, 0.3), lambda a, b: ref.nt_xent(a, b, 0.3), [z1, z2], dtype, gen,
             kind)


@pytest.mark.parametrize("views", [3, 4])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_multi_view(views, dtype, gen):
    n, d = 21, 24
    z = torch.randn(views * n, d, generator=gen, dtype=dtype)
    labels = torch.arange(n).repeat(views)
    _compare(lambda a: simclr_ext.contrastive_loss(a, a, labels, labels, 0.1, self_offset=0),
             lambda a: ref.contrastive_loss(a, a, labels, labels, 0.1, self_offset=0), [z], dtype, gen, f"{views} views")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_supervised_labels_with_singletons(reduction, dtype, gen):
    # Classes 0..4 repeat; 100 and 101 occur once, so their rows have no positive (loss 0, not counted).
    m, d = 70, 33
    labels = torch.randint(0, 5, (m,), generator=gen)
    labels[3], labels[40] = 100, 101
    q = torch.randn(m, d, generator=gen, dtype=dtype)
    _compare(lambda a: simclr_ext.contrastive_loss(a, a, labels, labels, 0.07, self_offset=0, reduction=reduction),
             lambda a: ref.contrastive_loss(a, a, labels, labels, 0.07, self_offset=0, reduction=reduction), [q],
             dtype, gen, "supcon")
    per_row = simclr_ext.contrastive_loss(q, q, labels, labels, 0.07, self_offset=0, reduction="none")
    assert per_row[3].item() == 0 and per_row[40].item() == 0


@pytest.mark.parametrize("m,l,offset", [(5, 5, 0), (7, 300, 0), (7, 300, 150), (7, 300, 293), (129, 131, 2),
                                        (6, 40, None), (300, 7, None)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_queries_against_keys(m, l, offset, dtype, gen):
    d = 13
    k_labels = torch.randint(0, 9, (l,), generator=gen)
    if offset is None:
        q_labels = torch.randint(0, 9, (m,), generator=gen)
        q = torch.randn(m, d, generator=gen, dtype=dtype)
    else:
        q_labels = k_labels[offset:offset + m].clone()
        q = None
    k = torch.randn(l, d, generator=gen, dtype=dtype)
    if q is None:
        q = k[offset:offset + m].clone() + 0.01 * torch.randn(m, d, generator=gen, dtype=dtype)
    _compare(lambda a, b: simclr_ext.contrastive_loss(a, b, q_labels, k_labels, 0.2, self_offset=offset),
             lambda a, b: ref.contrastive_loss(a, b, q_labels, k_labels, 0.2, self_offset=offset), [q, k], dtype, gen,
             f"M={m} L={l} offset={offset}")


def test_all_rows_without_positives_give_zero_not_nan(gen):
    q = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(6)
    loss = simclr_ext.contrastive_loss(q, q, labels, labels, 0.5, self_offset=0)
    assert loss.item() == 0.0
    (g,) = torch.autograd.grad(loss, q)
    assert torch.equal(g, torch.zeros_like(g))


def test_gradcheck_float64(gen):
    q = torch.randn(9, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(12, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    q_labels = torch.randint(0, 3, (9,), generator=gen)
    k_labels = torch.cat([q_labels, torch.randint(0, 3, (3,), generator=gen)])
    for offset in (None, 0, 3):
        assert torch.autograd.gradcheck(
            lambda a, b: simclr_ext.contrastive_loss(a, b, q_labels if offset != 3 else k_labels[3:12], k_labels,
                                                     0.3, self_offset=offset, reduction="none"), (q, k))
    z1 = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: simclr_ext.nt_xent(a, b, 0.1), (z1, z2))


@pytest.mark.parametrize("n", [1, 2, 5, 64])
@pytest.mark.parametrize("temperature", [0.05, 0.5, 1.0])
def test_identical_embeddings_closed_form(n, temperature, gen):
    # All 2N embeddings equal: every logit is 1/t, so each anchor's loss is log(2N - 1).
    v = torch.randn(1, 16, generator=gen, dtype=torch.float64)
    z = v.expand(n, 16)
    loss = simclr_ext.nt_xent(z, z, temperature)
    assert abs(loss.item() - torch.log(torch.tensor(2.0 * n - 1, dtype=torch.float64)).item()) < 1e-12


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_zero_vectors_behave_like_f_normalize(dtype, gen):
    z1 = torch.randn(8, 6, generator=gen, dtype=dtype)
    z2 = torch.randn(8, 6, generator=gen, dtype=dtype)
    z1[2] = 0
    z2[5] = 0
    z2[0] = 1e-14  # below the clamp: scaled by 1/eps like F.normalize does
    _compare(lambda a, b: simclr_ext.nt_xent(a, b, 0.5), lambda a, b: ref.nt_xent(a, b, 0.5), [z1, z2], dtype, gen,
             "zero rows")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_inputs_propagate_nan(bad, gen):
    z1 = torch.randn(10, 8, generator=gen, requires_grad=True)
    z2 = torch.randn(10, 8, generator=gen)
    with torch.no_grad():
        z1[4, 3] = bad
    loss = simclr_ext.nt_xent(z1, z2, 0.5)
    assert torch.isnan(loss)
    (g,) = torch.autograd.grad(loss, z1)
    assert torch.isnan(g).any()


def test_deterministic_across_calls(gen):
    z1 = torch.randn(300, 64, generator=gen, requires_grad=True)
    z2 = torch.randn(300, 64, generator=gen, requires_grad=True)
    runs = []
    for _ in range(2):
        loss = simclr_ext.nt_xent(z1, z2, 0.1)
        runs.append((loss, *torch.autograd.grad(loss, (z1, z2))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_no_double_backward(gen):
    z1 = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(simclr_ext.nt_xent(z1, z2), z1, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(g.sum(), z1)


@pytest.mark.parametrize("n,d", [(1, 3), (17, 9), (64, 128)])
def test_plain_baseline_is_nt_xent(n, d, gen):
    """simclr_reference.nt_xent_plain (the benchmarks' baseline, F.cross_entropy on the masked logits) is
    the same loss as the oracle, value and gradients, in float64."""
    z1 = torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    plain = ref.nt_xent_plain(z1, z2, 0.3)
    oracle = ref.nt_xent(z1, z2, 0.3)
    torch.testing.assert_close(plain, oracle, rtol=0, atol=1e-12)
    for a, b in zip(torch.autograd.grad(plain, (z1, z2)), torch.autograd.grad(oracle, (z1, z2))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
