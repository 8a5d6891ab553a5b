"""Run as a script: prints the peak resident-memory increase (bytes) of one NT-Xent forward+backward.

Usage: python memory_probe.py PROVIDER TWO_N D [TWO_N ...]; PROVIDER is fused, plain (simclr_reference's
F.cross_entropy formulation), lightly, gemm_floor (benchmarks/bench_ntxent.py) or reference (the float64-style
oracle). Prints one line per TWO_N, in the order given. Runs in its own process so that the peak (VmHWM,
reset through /proc/self/clear_refs before each size) belongs to that computation alone.
"""
import functools
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from bench_ntxent import gemm_floor_step  # noqa: E402
from common import peak_rss_growth  # noqa: E402


def _step(which):
    if which == "fused":
        import simclr_ext

        return lambda z1, z2: simclr_ext.nt_xent(z1, z2).backward()
    if which == "reference":
        import simclr_reference

        return lambda z1, z2: simclr_reference.nt_xent(z1, z2).backward()
    if which == "plain":
        import simclr_reference

        return lambda z1, z2: simclr_reference.nt_xent_plain(z1, z2).backward()
    if which == "lightly":
        from lightly.loss import NTXentLoss

        loss = NTXentLoss(temperature=0.5)
        return lambda z1, z2: loss(z1, z2).backward()
    if which == "gemm_floor":
        return lambda z1, z2: gemm_floor_step(torch.cat([z1, z2]).detach())
    raise SystemExit(f"unknown provider {which!r}")


def main():
    which, sizes, d = sys.argv[1], [int(sys.argv[2])] + [int(s) for s in sys.argv[4:]], int(sys.argv[3])
    step = _step(which)
    g = torch.Generator().manual_seed(0)
    # Warm up on a small batch so one-time allocations (thread pools, BLAS buffers) are not counted.
    w1 = torch.randn(32, d, generator=g, requires_grad=True)
    step(w1, torch.randn(32, d, generator=g, requires_grad=True))
    for two_n in sizes:
        z1 = torch.randn(two_n // 2, d, generator=g, requires_grad=True)
        z2 = torch.randn(two_n // 2, d, generator=g, requires_grad=True)
        print(peak_rss_growth(functools.partial(step, z1, z2)), flush=True)
        del z1, z2


if __name__ == "__main__":
    main()
