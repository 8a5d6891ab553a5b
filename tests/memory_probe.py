"""Run as a script: prints the peak resident-memory increase (bytes) of one forward+backward.

Usage: python memory_probe.py {fused|reference} TWO_N D. Runs in its own process so that the peak
(VmHWM, reset through /proc/self/clear_refs) belongs to this computation alone.
"""
import sys

import torch


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main():
    which, two_n, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if which == "fused":
        import simclr_ext

        loss_fn = simclr_ext.nt_xent
    else:
        import simclr_reference

        loss_fn = simclr_reference.nt_xent
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(two_n // 2, d, generator=g, requires_grad=True)
    z2 = torch.randn(two_n // 2, d, generator=g, requires_grad=True)
    # Warm up on a small batch so one-time allocations (thread pools, BLAS buffers) are not counted.
    loss_fn(z1[:64], z2[:64]).backward()
    z1.grad = z2.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    loss_fn(z1, z2).backward()
    print((_status_kib("VmHWM") - before) * 1024)


if __name__ == "__main__":
    main()
