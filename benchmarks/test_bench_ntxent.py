"""pytest-benchmark suite: fused vs reference NT-Xent forward+backward on the CPU, float32, D=128.

    pytest benchmarks/test_bench_ntxent.py --benchmark-group-by=param:two_n
"""
import pytest
import torch

import simclr_ext
import simclr_reference

PROVIDERS = {"fused": simclr_ext.nt_xent, "reference": simclr_reference.nt_xent}


@pytest.mark.parametrize("two_n", [512, 2048, 8192])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_ntxent_forward_backward(benchmark, provider, two_n):
    g = torch.Generator().manual_seed(two_n)
    z1 = torch.randn(two_n // 2, 128, generator=g, requires_grad=True)
    z2 = torch.randn(two_n // 2, 128, generator=g, requires_grad=True)
    fn = PROVIDERS[provider]

    def step():
        return torch.autograd.grad(fn(z1, z2, temperature=0.5), (z1, z2))

    grads = benchmark(step)
    assert all(torch.isfinite(gr).all() for gr in grads)
