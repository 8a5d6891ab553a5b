"""The op's registration: opcheck (schema, fake kernel, autograd), torch.compile, module behaviour."""
import pytest
import torch
from parity import OPCHECK_BACKWARD_UTILS

import simclr_ext
import simclr_reference as ref


def _sample(m, l, d, dtype, offset, gen, requires_grad):
    k = torch.randn(l, d, generator=gen, dtype=dtype, requires_grad=requires_grad)
    q = torch.randn(m, d, generator=gen, dtype=dtype, requires_grad=requires_grad)
    k_labels = torch.randint(0, 4, (l,), generator=gen)
    q_labels = k_labels[offset:offset + m].clone() if offset >= 0 else torch.randint(0, 4, (m,), generator=gen)
    return q, k, q_labels, k_labels


@pytest.mark.parametrize("keep_probs", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("m,l,offset", [(6, 6, 0), (3, 10, 4), (5, 7, -1)])
def test_opcheck_forward_and_backward(m, l, offset, dtype, keep_probs, gen):
    q, k, ql, kl = _sample(m, l, 5, dtype, offset, gen, requires_grad=True)
    args = (q, k, ql, kl, torch.tensor(0.3), offset, True, keep_probs)
    torch.library.opcheck(torch.ops.simclr_ext.ntxent.default, args)
    loss, lse, npos, probs = torch.ops.simclr_ext.ntxent(*args)
    assert probs.shape == ((m, l) if keep_probs else (0, 0))
    grad = torch.rand(m, generator=gen, dtype=loss.dtype)
    bargs = (grad, q.detach(), k.detach(), ql, kl, lse, npos, torch.tensor(0.3), offset, True,
             probs if keep_probs else None)
    torch.library.opcheck(torch.ops.simclr_ext._ntxent_backward.default, bargs,
                          test_utils=OPCHECK_BACKWARD_UTILS)


def test_opcheck_symmetric_backward(gen):
    """q is k with one labels tensor: the symmetric backward, whose whole gradient comes back as grad_q."""
    z = torch.randn(9, 4, generator=gen)
    labels = torch.randint(0, 3, (9,), generator=gen)
    for keep in (False, True):
        loss, lse, npos, probs = torch.ops.simclr_ext.ntxent(z, z, labels, labels, torch.tensor(0.3), 0, True, keep)
        grad = torch.rand(9, generator=gen)
        bargs = (grad, z, z, labels, labels, lse, npos, torch.tensor(0.3), 0, True, probs if keep else None)
        torch.library.opcheck(torch.ops.simclr_ext._ntxent_backward.default, bargs,
                              test_utils=OPCHECK_BACKWARD_UTILS)
        grad_q, grad_k, _ = torch.ops.simclr_ext._ntxent_backward(*bargs)
        assert torch.count_nonzero(grad_k) == 0 and torch.count_nonzero(grad_q) > 0


def test_torch_compile_fullgraph(gen):
    model = torch.nn.Linear(12, 8)
    loss_fn = simclr_ext.NTXentLoss(temperature=0.2)

    @torch.compile(fullgraph=True, backend="inductor")
    def step(x1, x2):
        return loss_fn(model(x1), model(x2))

    x1 = torch.randn(16, 12, generator=gen)
    x2 = torch.randn(16, 12, generator=gen)
    loss = step(x1, x2)
    loss.backward()
    compiled_grad = model.weight.grad.clone()
    model.weight.grad = None
    eager = ref.nt_xent(model(x1), model(x2), 0.2)
    eager.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_grad, model.weight.grad, rtol=1e-4, atol=1e-6)


def test_module_matches_functional_and_reference(gen):
    z1 = torch.randn(20, 9, generator=gen, dtype=torch.float64)
    z2 = torch.randn(20, 9, generator=gen, dtype=torch.float64)
    module = simclr_ext.NTXentLoss(temperature=0.3)
    assert module(z1, z2).item() == simclr_ext.nt_xent(z1, z2, 0.3).item()
    assert abs(module(z1, z2).item() - ref.nt_xent(z1, z2, 0.3).item()) < 1e-12
    assert "temperature=0.3" in repr(module)


def test_gather_distributed_without_a_process_group_is_the_local_loss(gen):
    # Cross-rank behaviour is tested with 2 gloo processes in test_distributed.py.
    z1, z2 = (torch.randn(5, 7, generator=gen, dtype=torch.float64) for _ in range(2))
    module = simclr_ext.NTXentLoss(temperature=0.3, gather_distributed=True)
    assert module(z1, z2).item() == simclr_ext.nt_xent(z1, z2, 0.3).item()


def test_memory_bank_state_dict_roundtrip(gen):
    module = simclr_ext.NTXentLoss(memory_bank_size=8)
    module(torch.randn(3, 5, generator=gen, requires_grad=True), torch.randn(3, 5, generator=gen))
    fresh = simclr_ext.NTXentLoss(memory_bank_size=8)
    fresh.load_state_dict(module.state_dict())
    assert torch.equal(fresh.bank, module.bank) and int(fresh.bank_ptr) == 3
    z1, z2 = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    assert torch.equal(fresh(z1, z2), module(z1, z2))


def test_info_reports_build():
    info = simclr_ext.info()
    for key in ("version", "torch", "cuda_compiled", "cuda_archs", "threads"):
        assert key in info
    assert info["version"] == simclr_ext.__version__
    assert info["threads"] == torch.get_num_threads()
    assert isinstance(info["cuda_compiled"], bool)
    if info["cuda_compiled"]:
        assert info["cuda_archs"], "a CUDA build records its target architectures"


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_same_value_and_gradients_as_lightly(temperature, gen):
    lightly_loss = pytest.importorskip("lightly.loss", reason="lightly is installed by requirements-dev.txt")
    z1 = torch.randn(37, 24, generator=gen, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(37, 24, generator=gen, dtype=torch.float64, requires_grad=True)
    ours = simclr_ext.NTXentLoss(temperature=temperature)(z1, z2)
    theirs = lightly_loss.NTXentLoss(temperature=temperature)(z1, z2)
    assert abs(ours.item() - theirs.item()) < 1e-12
    for a, b in zip(torch.autograd.grad(ours, (z1, z2)), torch.autograd.grad(theirs, (z1, z2))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
