"""pytest-benchmark suite: NT-Xent forward+backward on the CPU, float32, D=128: the fused op against
plain PyTorch (F.cross_entropy on the masked logits), lightly (when installed) and the GEMM floor (the
three GEMM passes of the same shapes, benchmarks/common.py). The float64-style oracle is not a baseline.

    pytest benchmarks/test_bench_ntxent.py --benchmark-group-by=param:two_n
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import gemm_floor_step, loss_providers  # noqa: E402

PROVIDERS = {**loss_providers(), "gemm_floor": None}


@pytest.mark.parametrize("two_n", [256, 512, 2048, 8192])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_ntxent_forward_backward(benchmark, provider, two_n):
    g = torch.Generator().manual_seed(two_n)
    z1 = torch.randn(two_n // 2, 128, generator=g, requires_grad=True)
    z2 = torch.randn(two_n // 2, 128, generator=g, requires_grad=True)
    if provider == "gemm_floor":
        z = torch.cat([z1, z2]).detach()
        out = benchmark(gemm_floor_step, z)
        assert torch.isfinite(out).all()
        return
    fn = PROVIDERS[provider]

    def step():
        return torch.autograd.grad(fn(z1, z2), (z1, z2))

    grads = benchmark(step)
    assert all(torch.isfinite(gr).all() for gr in grads)
