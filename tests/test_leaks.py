"""No memory leak on the CPU: 2000 forward+backward calls of each op and loss module (forward calls of the
augmentation) keep the process's resident memory flat, within 16 MiB of its size after a warm-up.

The inputs are small (fast) but not tiny: every loss call concatenates or saves at least 16 KiB of tensors
(the two (32, 64) float32 views; the augmentation writes 24 KiB per view), so a call that leaked its autograd
graph or its inputs would grow RSS by more than 31 MiB over 2000 calls (the control test at the end checks
that the probe catches such a leak). A leak of a few bytes per call (a counter, a small Python
object) is below what this bound can see."""
import ctypes
import gc
import os
import sys

import pytest
import torch

import simclr_ext

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm (Linux)"),
              pytest.mark.usefixtures("one_torch_thread")]

CALLS, WARMUP = 2000, 200
LIMIT = 16 * 2 ** 20
N, D = 32, 64  # 8 KiB per (N, D) float32 view


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_free_heap():
    """Hands glibc's free heap pages back to the system, so that RSS counts live memory: otherwise a leak can
    fill the holes that earlier tests of the same process freed and never show in RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS then also holds free heap, as before
        pass


def _growth(step):
    """RSS after CALLS calls of step(i) minus RSS after WARMUP calls (allocator pools and caches are warm)."""
    for i in range(WARMUP):
        step(i)
    gc.collect()
    _release_free_heap()
    before = _rss()
    for i in range(CALLS):
        step(i)
    gc.collect()
    _release_free_heap()
    return _rss() - before


def _views(i, dtype=torch.float32):
    g = torch.Generator().manual_seed(i)
    z1 = torch.randn(N, D, generator=g, dtype=dtype).requires_grad_()
    z2 = torch.randn(N, D, generator=g, dtype=dtype).requires_grad_()
    return z1, z2


def _labels(i, n=N, classes=5):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(i))


def _backward(loss, *inputs):
    loss.backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in inputs)


def _contrastive(i):
    z1, z2 = _views(i)
    _backward(simclr_ext.contrastive_loss(z1, z2, _labels(i), _labels(i + 1), temperature=0.2), z1, z2)


def _nt_xent_tensor_temperature(i):
    z1, z2 = _views(i, torch.float64)
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    _backward(simclr_ext.nt_xent(z1, z2, temperature=t), z1, z2, t)


def _module(make, call):
    module = make()

    def step(i):
        call(module, i)

    return step


def _pair_call(module, i):
    z1, z2 = _views(i)
    _backward(module(z1, z2), z1, z2)


def _clip_call(module, i):
    z1, z2 = _views(i)
    scale = torch.tensor(10.0, requires_grad=True)
    _backward(module(z1, z2, scale), z1, z2, scale)


def _supcon_call(module, i):
    z = torch.randn(N, 2, D, generator=torch.Generator().manual_seed(i)).requires_grad_()
    _backward(module(z, _labels(i)), z)


def _augment_step():
    aug = simclr_ext.SimCLRAugment(size=16, blur_p=0.5, solarize_p=0.2, rotation_degrees=10.0)
    images = torch.randint(0, 256, (8, 3, 24, 24), dtype=torch.uint8)  # 24 KiB of float32 output per view
    ragged = [torch.rand(3, 12 + k, 18 - k) for k in range(2)]

    def step(i):
        g = torch.Generator().manual_seed(i)
        v1, v2 = aug(images, generator=g)
        r1, r2 = aug(ragged, generator=g)
        assert v1.shape == (8, 3, 16, 16) and r2.shape == (2, 3, 16, 16) and torch.isfinite(v1).all()

    return step


CASES = {
    "contrastive_loss": lambda: _contrastive,
    "nt_xent-tensor-temperature": lambda: _nt_xent_tensor_temperature,
    "NTXentLoss": lambda: _module(lambda: simclr_ext.NTXentLoss(0.5), _pair_call),
    "NTXentLoss-bank": lambda: _module(lambda: simclr_ext.NTXentLoss(0.5, memory_bank_size=(256, D)), _pair_call),
    "NTXentLoss-batch-and-bank": lambda: _module(
        lambda: simclr_ext.NTXentLoss(0.5, memory_bank_size=256, memory_bank_mode="batch_and_bank"), _pair_call),
    "ClipLoss": lambda: _module(simclr_ext.ClipLoss, _clip_call),
    "SupConLoss": lambda: _module(lambda: simclr_ext.SupConLoss(0.1), _supcon_call),
    "DCLLoss": lambda: _module(lambda: simclr_ext.DCLLoss(0.1), _pair_call),
    "DCLWLoss": lambda: _module(lambda: simclr_ext.DCLWLoss(0.1, sigma=0.5), _pair_call),
    "SimCLRAugment": _augment_step,
}


@pytest.mark.parametrize("case", list(CASES))
def test_resident_memory_stays_flat(case):
    growth = _growth(CASES[case]())
    assert growth <= LIMIT, f"{case}: RSS grew by {growth / 2 ** 20:.1f} MiB over {CALLS} calls after warm-up"


def test_the_probe_sees_a_leak_of_one_input_per_call():
    kept = []

    def leaking(i):
        z1, z2 = _views(i)
        loss = simclr_ext.nt_xent(z1, z2)
        loss.backward()
        kept.append(torch.cat([z1, z2]).detach())  # 16 KiB per call, what a leaked saved input would cost

    assert _growth(leaking) > LIMIT
