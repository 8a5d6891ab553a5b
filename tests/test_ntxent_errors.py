"""Bad input gets a clear exception naming the argument, from the Python API and from the op itself."""
import pytest
import torch

import simclr_ext

ops = torch.ops.simclr_ext


def _pair(n=4, d=3, dtype=torch.float32):
    return torch.randn(n, d, dtype=dtype), torch.randn(n, d, dtype=dtype)


@pytest.mark.parametrize("z1,z2,exc,match", [
    (torch.randn(4), torch.randn(4), ValueError, r"z1 must be 2-D"),
    (torch.randn(4, 3), torch.randn(4, 3, 2), ValueError, r"z2 must be 2-D"),
    (torch.randn(4, 3), torch.randn(5, 3), ValueError, r"same shape"),
    (torch.randn(4, 3), torch.randn(4, 2), ValueError, r"same shape"),
    (torch.randn(4, 3), torch.randint(0, 5, (4, 3)), TypeError, r"z2 must be a floating tensor"),
    (torch.randint(0, 5, (4, 3)), torch.randint(0, 5, (4, 3)), TypeError, r"z1 must be a floating tensor"),
    (torch.randn(0, 3), torch.randn(0, 3), ValueError, r"empty batch"),
    (torch.randn(4, 0), torch.randn(4, 0), ValueError, r"D > 0"),
    ([[1.0]], torch.randn(1, 1), TypeError, r"z1 must be a torch.Tensor"),
])
def test_nt_xent_bad_embeddings(z1, z2, exc, match):
    with pytest.raises(exc, match=match):
        simclr_ext.nt_xent(z1, z2)


def test_device_mismatch_is_reported():
    z1 = torch.randn(4, 3)
    z2 = torch.randn(4, 3, device="meta")
    with pytest.raises(ValueError, match=r"same device"):
        simclr_ext.nt_xent(z1, z2)


@pytest.mark.parametrize("temperature", [0.0, -0.5, float("nan"), float("inf")])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match=r"temperature must be finite and > 0"):
        simclr_ext.nt_xent(*_pair(), temperature=temperature)
    with pytest.raises(ValueError, match=r"temperature"):
        simclr_ext.NTXentLoss(temperature=temperature)


def test_temperature_type_and_reduction():
    with pytest.raises(TypeError, match=r"temperature must be a real number"):
        simclr_ext.nt_xent(*_pair(), temperature="0.5")
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        simclr_ext.nt_xent(*_pair(), reduction="avg")


def test_bad_labels():
    q = torch.randn(4, 3)
    good = torch.arange(4)
    with pytest.raises(ValueError, match=r"q_labels must have shape \[4\], got \[5\]"):
        simclr_ext.contrastive_loss(q, q, torch.arange(5), good)
    with pytest.raises(ValueError, match=r"k_labels must have shape \[4\]"):
        simclr_ext.contrastive_loss(q, q, good, torch.arange(4).view(2, 2))
    with pytest.raises(TypeError, match=r"q_labels must have an integer dtype, got torch.float32"):
        simclr_ext.contrastive_loss(q, q, good.float(), good)
    with pytest.raises(TypeError, match=r"k_labels must be a torch.Tensor"):
        simclr_ext.contrastive_loss(q, q, good, [0, 1, 2, 3])
    # int32 labels are accepted and give the same loss as int64.
    assert torch.equal(simclr_ext.contrastive_loss(q, q, good.int(), good.int(), self_offset=0),
                       simclr_ext.contrastive_loss(q, q, good, good, self_offset=0))


@pytest.mark.parametrize("offset,exc", [(-1, ValueError), (3, ValueError), (1.0, TypeError), (True, TypeError)])
def test_bad_self_offset(offset, exc):
    q, k = torch.randn(4, 3), torch.randn(6, 3)
    with pytest.raises(exc, match=r"self_offset must be None"):
        simclr_ext.contrastive_loss(q, k, torch.arange(4), torch.arange(6), self_offset=offset)


def test_q_k_mismatch():
    with pytest.raises(ValueError, match=r"k must match q"):
        simclr_ext.contrastive_loss(torch.randn(4, 3), torch.randn(4, 5), torch.arange(4), torch.arange(4))


def test_module_arguments():
    with pytest.raises(ValueError, match=r"memory_bank_size must be an int >= 0 or a \(size, dim\) tuple .* got -1"):
        simclr_ext.NTXentLoss(memory_bank_size=-1)


def test_op_checks_its_arguments_directly():
    """The op is public through torch.ops: its own TORCH_CHECKs name the argument too."""
    q, k = torch.randn(4, 3), torch.randn(6, 3)
    ql, kl = torch.arange(4), torch.arange(6)
    cases = [
        ((q.view(2, 2, 3), k, ql, kl, torch.tensor(0.5), -1, True), r"q must be 2-D \(M, D\), got shape \[2, 2, 3\]"),
        ((q, k.double(), ql, kl, torch.tensor(0.5), -1, True), r"k must have the dtype of q"),
        ((q.long(), k.long(), ql, kl, torch.tensor(0.5), -1, True),
         r"q must be float16, bfloat16, float32 or float64, got Long"),
        ((q, torch.randn(6, 2), ql, kl, torch.tensor(0.5), -1, True), r"same feature dimension D"),
        ((q, k, ql.int(), kl, torch.tensor(0.5), -1, True), r"q_labels must be int64, got Int"),
        ((q, k, ql, kl[:5], torch.tensor(0.5), -1, True), r"k_labels must have shape \[6\], got \[5\]"),
        ((q, k, ql, kl, torch.tensor(0.0), -1, True), r"temperature must be finite and > 0, got 0"),
        ((q, k, ql, kl, torch.tensor(float("nan")), -1, True), r"temperature must be finite and > 0"),
        ((q, k, ql, kl, torch.tensor(0.5), 3, True), r"self_offset must be -1 or in \[0, L - M\] = \[0, 2\], got 3"),
        ((q, k, ql, kl, torch.tensor(0.5), -2, True), r"self_offset must be -1"),
        ((q[:, :0], k[:, :0], ql, kl, torch.tensor(0.5), -1, True), r"feature dimension D must be positive"),
    ]
    for args, match in cases:
        with pytest.raises(RuntimeError, match=match):
            ops.ntxent(*args)


def test_backward_op_checks_saved_tensors():
    q = torch.randn(4, 3)
    labels = torch.arange(4)
    loss, lse, npos, _ = ops.ntxent(q, q, labels, labels, torch.tensor(0.5), 0, True)
    with pytest.raises(RuntimeError, match=r"grad_loss must have shape \[4\]"):
        ops._ntxent_backward(loss[:3], q, q, labels, labels, lse, npos, torch.tensor(0.5), 0, True)
    with pytest.raises(RuntimeError, match=r"lse must be Float"):
        ops._ntxent_backward(loss, q, q, labels, labels, lse.double(), npos, torch.tensor(0.5), 0, True)
    with pytest.raises(RuntimeError, match=r"npos must be int32"):
        ops._ntxent_backward(loss, q, q, labels, labels, lse, npos.long(), torch.tensor(0.5), 0, True)


def test_op_empty_inputs_return_early():
    q = torch.randn(0, 3)
    k = torch.randn(5, 3)
    loss, lse, npos, _ = ops.ntxent(q, k, torch.arange(0), torch.arange(5), torch.tensor(0.5), -1, True)
    assert loss.shape == (0,) and lse.shape == (0,) and npos.shape == (0,)
    # No keys at all: every row has an empty denominator (lse = -inf) and no positive (loss 0).
    loss, lse, npos, _ = ops.ntxent(k, q, torch.arange(5), torch.arange(0), torch.tensor(0.5), -1, True)
    assert (torch.equal(loss, torch.zeros(5)) and torch.isneginf(lse).all()
            and torch.equal(npos, torch.zeros(5, dtype=torch.int32)))
