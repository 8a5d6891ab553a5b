"""The backward op's output mask: autograd asks only for the gradients it needs, and the passes nobody needs
are skipped (detached keys, as with a queue or MoCo's k = q.detach(): no dK pass), on every backend, with
gradients unchanged; masked outputs are None for the kernels and the fake kernel alike. The fake kernels'
argument checks (ranks, dtypes, devices) under FakeTensorMode and torch.compile."""
import itertools

import pytest
import torch
from parity import DEVICES, backend, on_cuda
from torch._subclasses.fake_tensor import FakeTensorMode

import simclr_ext

ops = simclr_ext.ops
MASKS = [m for m in itertools.product([False, True], repeat=3) if any(m)]
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


def _passes(device):
    return {k.split("_", 1)[1]: v for k, v in ops.ntxent_pass_counts().items() if k.startswith(backend(device)) and v}


def _op():
    """torch.ops.simclr_ext as the test sees it (the emulated ops while a cuda-emu test runs)."""
    return torch.ops.simclr_ext


def _case(kind, gen, device, dtype=torch.float64):
    """(q, k, q_labels, k_labels, self_offset, two_way) of one backward case."""
    z = torch.randn(45, 11, generator=gen, dtype=dtype)
    labels = torch.randint(0, 5, (45,), generator=gen)
    if kind == "symmetric":
        return z.to(device), z.to(device), labels.to(device), labels.to(device), 0, False
    k = torch.randn(70, 11, generator=gen, dtype=dtype)
    k_labels = torch.randint(0, 5, (70,), generator=gen)
    if kind == "slice":  # queries are keys 20..64 (self_offset), other tensors
        k[20:65] = z
        k_labels[20:65] = labels
        return z.to(device), k.to(device), labels.to(device), k_labels.to(device), 20, False
    return z.to(device), k.to(device), labels.to(device), k_labels.to(device), -1, kind == "two_way"


def _backward_args(case, gen, keep):
    q, k, ql, kl, offset, two_way = case
    t = torch.tensor(0.3, dtype=torch.float64)
    loss, lse, npos, probs = _op().ntxent(q, k, ql, kl, t, offset, False, keep and not two_way, False, None, two_way)
    grad = torch.rand(loss.shape, generator=gen, dtype=loss.dtype).to(loss.device)
    kept = probs if probs.numel() else None
    return (grad, q, k, ql, kl, lse, npos, t, offset, False, kept, False, None, two_way)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("kind", ["general", "slice", "symmetric", "two_way"])
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("qkt"[i] if m[i] else "_" for i in range(3)))
def test_masked_outputs_are_none_and_the_rest_unchanged(mask, kind, keep, device, gen):
    """Every mask against the full backward: the outputs asked for are bit-identical (the passes are
    independent), the others are None, and only the passes an output needs ran."""
    if keep and on_cuda(device):
        pytest.skip("probabilities are kept on the CPU only")
    args = _backward_args(_case(kind, gen, device), gen, keep)
    full = _op()._ntxent_backward(*args)
    ops.reset_ntxent_path_counts()
    got = _op()._ntxent_backward(*args, output_mask=list(mask))
    for wanted, out, ref_out, name in zip(mask, got, full, ("grad_q", "grad_k", "grad_temperature")):
        if wanted:
            torch.testing.assert_close(out, ref_out, rtol=0, atol=0, msg=f"{name} changed under mask {mask}")
        else:
            assert out is None, f"{name} computed under mask {mask}"
    expected = {}
    if mask[0] or mask[2]:
        expected["dq"] = 1
    if mask[1] and kind != "symmetric":  # the symmetric pass is the dq pass; its grad_k is zeros
        expected["dk"] = 1
    assert _passes(device) == expected


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("learned_t", [False, True])
@pytest.mark.parametrize("kind", ["queue", "moco", "two_way"])
def test_detached_keys_skip_the_dk_pass(kind, learned_t, device, gen):
    """Keys that take no gradient (a queue of past keys, MoCo's k = q.detach(), a frozen text tower):
    autograd's backward runs the dq pass only, and grad_q (and the temperature's) are bit-identical to
    those of a backward that also computes grad_k."""
    q0 = torch.randn(33, 16, generator=gen, dtype=torch.float64).to(device)
    labels = torch.arange(33, device=device)
    if kind == "queue":
        k0, k_labels = torch.randn(100, 16, generator=gen, dtype=torch.float64).to(device), None
    elif kind == "moco":
        k0, k_labels = None, labels
    else:
        k0, k_labels = torch.randn(33, 16, generator=gen, dtype=torch.float64).to(device), labels

    def loss_and_grads(keys_need_grad):
        q = q0.clone().requires_grad_(True)
        t = torch.tensor(0.2, dtype=torch.float64, device=device, requires_grad=learned_t)
        k = q.detach() if k0 is None else k0.clone().requires_grad_(keys_need_grad)
        if kind == "two_way":
            per_row, _, _ = ops.ntxent(q, k, labels, k_labels, t, -1, False, two_way=True)
        else:
            kl = labels if kind == "moco" else torch.full((100,), -1, device=device)
            per_row = simclr_ext.contrastive_loss(q, k, labels, kl, t, reduction="none")
        w = torch.rand(per_row.shape, generator=gen, dtype=torch.float64).to(device)
        inputs = (q, t) if learned_t else (q,)
        ops.reset_ntxent_path_counts()
        grads = torch.autograd.grad((per_row * w).sum(), inputs + ((k,) if keys_need_grad else ()))
        return grads[:len(inputs)], _passes(device)

    gen_state = gen.get_state()
    detached, passes = loss_and_grads(False)
    assert passes == {"dq": 1}
    if kind == "moco":
        return  # k = q.detach() has no gradient of its own to compare with
    gen.set_state(gen_state)
    full, passes_full = loss_and_grads(True)
    assert passes_full == {"dq": 1, "dk": 1}
    for a, b in zip(detached, full):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_queries_skip_the_dq_pass_unless_the_temperature_learns(device, gen):
    """Only the keys learn: no dq pass; a learned temperature needs the dq pass's radial dots, so it runs."""
    q = torch.randn(20, 8, generator=gen, dtype=torch.float64).to(device)
    labels = torch.arange(20, device=device)
    for learned_t, expected in ((False, {"dk": 1}), (True, {"dq": 1, "dk": 1})):
        k = torch.randn(20, 8, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
        t = torch.tensor(0.5, dtype=torch.float64, device=device, requires_grad=learned_t)
        loss = simclr_ext.contrastive_loss(q, k, labels, labels, t)
        ops.reset_ntxent_path_counts()
        grads = torch.autograd.grad(loss, (k, t) if learned_t else (k,))
        assert _passes(device) == expected
        assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("mask", [(True, False, False), (False, True, True), (False, False, True)])
@pytest.mark.parametrize("kind", ["general", "symmetric", "two_way"])
def test_opcheck_with_output_mask(kind, mask, gen):
    """Kernel and fake kernel agree on which outputs are None (schema, autograd registration, fake tensors)."""
    args = _backward_args(_case(kind, gen, "cpu"), gen, keep=False)
    torch.library.opcheck(_op()._ntxent_backward.default, args, {"output_mask": list(mask)}, test_utils=OPCHECK_UTILS)


def _fake_inputs(mode, m=6, l=9, d=5, **overrides):
    spec = {"q": ((m, d), torch.float32), "k": ((l, d), torch.float32), "q_labels": ((m,), torch.int64),
            "k_labels": ((l,), torch.int64), "temperature": ((), torch.float32)}
    spec.update(overrides)
    with mode:
        return {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in spec.items()}


@pytest.mark.parametrize("bad,message", [
    ({"q": ((6,), torch.float32)}, r"q must be 2-D \(M, D\), got shape \[6\]"),
    ({"k": ((9, 4), torch.float32)}, "q and k must have the same feature dimension D"),
    ({"k": ((9, 5), torch.float64)}, "k must have the dtype of q"),
    ({"q": ((6, 5), torch.int32), "k": ((9, 5), torch.int32)}, "q must be float16, bfloat16, float32 or float64"),
    ({"q_labels": ((5,), torch.int64)}, r"q_labels must have shape \[6\], got \[5\]"),
    ({"k_labels": ((9,), torch.int32)}, "k_labels must be int64"),
    ({"temperature": ((1,), torch.float32)}, "temperature must be a 0-d tensor"),
    ({"temperature": ((), torch.int64)}, "temperature must be a floating tensor"),
])
def test_fake_kernel_rejects_bad_arguments_under_fake_tensors(bad, message):
    """Shape and dtype errors surface when tracing, with the kernels' messages, before any kernel runs."""
    mode = FakeTensorMode()
    x = _fake_inputs(mode, **bad)
    with mode, pytest.raises(RuntimeError, match=message):
        _op().ntxent(x["q"], x["k"], x["q_labels"], x["k_labels"], x["temperature"], -1, False)


def test_fake_kernel_rejects_devices_and_backward_shapes():
    mode = FakeTensorMode()
    x = _fake_inputs(mode)
    with mode:
        meta_labels = torch.empty(9, dtype=torch.int64, device="meta")
        with pytest.raises(RuntimeError, match=r"k_labels must be on the device of q \(cpu\), got meta"):
            _op().ntxent(x["q"], x["k"], x["q_labels"], meta_labels, x["temperature"], -1, False)
        with pytest.raises(RuntimeError, match="self_offset must be -1 or in"):
            _op().ntxent(x["q"], x["k"], x["q_labels"], x["k_labels"], x["temperature"], 4, False)
        lse, npos = torch.empty(6), torch.empty(6, dtype=torch.int32)
        with pytest.raises(RuntimeError, match=r"grad_loss must have shape \[6\], got \[15\]"):
            _op()._ntxent_backward(torch.empty(15), x["q"], x["k"], x["q_labels"], x["k_labels"], lse, npos,
                                 x["temperature"], -1, False)
        with pytest.raises(RuntimeError, match="npos must be int32"):
            _op()._ntxent_backward(torch.empty(6), x["q"], x["k"], x["q_labels"], x["k_labels"], lse, npos.long(),
                                 x["temperature"], -1, False)
        grad_q, grad_k, grad_t = _op()._ntxent_backward(torch.empty(6), x["q"], x["k"], x["q_labels"], x["k_labels"],
                                                      lse, npos, x["temperature"], -1, False,
                                                      output_mask=[True, False, True])
        assert grad_q.shape == (6, 5) and grad_k is None and grad_t.shape == ()


def test_torch_compile_rejects_bad_labels_at_trace_time(gen):
    """Under torch.compile the fake kernel's check fails the trace (no graph is compiled), with the kernel's
    message; good input compiles and matches eager."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    @torch.compile(backend=backend, fullgraph=True)
    def per_row(q, k, labels):
        return _op().ntxent(q, k, labels, labels, torch.tensor(0.5), -1, False)[0]

    q, k = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
    with pytest.raises(Exception, match=r"q_labels must have shape \[4\], got \[3\]"):
        per_row(q, k, torch.arange(3))
    assert not graphs
    labels = torch.arange(4)
    eager = _op().ntxent(q, k, labels, labels, torch.tensor(0.5), -1, False)[0]
    torch.testing.assert_close(per_row(q, k, labels), eager)
    assert len(graphs) == 1
