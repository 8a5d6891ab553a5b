"""The CUDA kernels' differentiable temperature and DCL variants, and the loss modules on the GPU, against the
float64 oracle on the CPU. Marked `cuda`: skipped (by conftest.py) where torch sees no GPU."""
import pytest
import torch

import simclr_ext
import simclr_reference as ref
from parity import PRECISION_PATHS, assert_matches_reference
from peers import ref_clip, ref_dcl, ref_supcon

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False"),
]

DEV = "cuda"
PATHS = PRECISION_PATHS


def _tol_dtype(dtype, tf32):
    # TF32 products carry bfloat16-like operand rounding (10-bit mantissa): judged like float16.
    return torch.float16 if tf32 else dtype


def _check(ours_fn, ref_fn, inputs, dtype, tf32, gen, what):
    """ours_fn on CUDA copies of inputs; ref_fn in `dtype` and float64 on the CPU; values and gradients of
    (loss * grad_out).sum() for every floating input."""
    cuda_in = [x.to(DEV).detach().requires_grad_(x.is_floating_point()) for x in inputs]
    same_in = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
    ref_in = [(x.double() if x.is_floating_point() else x).detach().requires_grad_(x.is_floating_point())
              for x in inputs]
    ours, same, ref64 = ours_fn(*cuda_in), ref_fn(*same_in), ref_fn(*ref_in)
    grad_out = torch.rand(ref64.shape, generator=gen, dtype=torch.float64) + 0.5
    tol = _tol_dtype(dtype, tf32)
    assert_matches_reference(ours.cpu(), same, ref64, tol, f"{what} loss")
    floats = [i for i, x in enumerate(inputs) if x.is_floating_point()]
    g_o = torch.autograd.grad((ours * grad_out.to(DEV, ours.dtype)).sum(), [cuda_in[i] for i in floats])
    g_s = torch.autograd.grad((same * grad_out.to(same.dtype)).sum(), [same_in[i] for i in floats])
    g_r = torch.autograd.grad((ref64 * grad_out).sum(), [ref_in[i] for i in floats])
    for i, a, b, c in zip(floats, g_o, g_s, g_r):
        assert a.device.type == "cuda" and a.dtype == cuda_in[i].dtype
        t = tol if inputs[i].dim() else (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_matches_reference(a.cpu(), b, c, t if not tf32 else torch.float16, f"{what} grad of input {i}")


@pytest.mark.parametrize("dtype,tf32", PATHS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("exclude,weighted", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("m,d", [(3, 5), (67, 130), (300, 64)])
def test_tensor_temperature_and_dcl_flags(m, d, symmetric, exclude, weighted, dtype, tf32, gen):
    z = torch.randn(2 * m, d, generator=gen).to(dtype)
    labels = torch.arange(m).repeat(2)
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

    _check(ours, reference, [z, t], dtype, tf32, gen, f"m={m} d={d} symmetric={symmetric} {extra} w={weighted}")


def test_cpu_temperature_with_cuda_inputs(gen):
    z1, z2 = torch.randn(2, 40, 16, generator=gen, dtype=torch.float64)
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    simclr_ext.nt_xent(z1.to(DEV), z2.to(DEV), t).backward()
    assert t.grad.device.type == "cpu"
    ours = t.grad.clone()
    t.grad = None
    ref.nt_xent(z1, z2, t).backward()
    torch.testing.assert_close(ours, t.grad, rtol=1e-10, atol=0)


@pytest.mark.parametrize("dtype,tf32", PATHS)
def test_modules_on_cuda(dtype, tf32, gen):
    image, text = torch.randn(2, 45, 33, generator=gen).to(dtype)
    scale = torch.tensor(14.0, dtype=torch.float32 if dtype != torch.float64 else torch.float64)
    _check(lambda a, b, s: simclr_ext.clip_loss(a, b, s, allow_tf32=tf32), ref_clip, [image, text, scale], dtype,
           tf32, gen, "clip")
    views = torch.randn(31, 3, 20, generator=gen).to(dtype)
    labels = torch.randint(5, (31,), generator=gen)
    _check(lambda f, y: simclr_ext.supcon_loss(f, y, 0.1, allow_tf32=tf32), lambda f, y: ref_supcon(f, y, 0.1),
           [views, labels], dtype, tf32, gen, "supcon")
    out0, out1 = torch.randn(2, 29, 24, generator=gen).to(dtype)
    _check(lambda a, b: simclr_ext.dcl_loss(a, b, 0.1, allow_tf32=tf32), lambda a, b: ref_dcl(a, b, 0.1),
           [out0, out1], dtype, tf32, gen, "dcl")
