"""The program gpu_check.sh profiles with Nsight Compute: one fused NT-Xent forward and one backward on
random inputs, after warm-up calls, between cudaProfilerStart and cudaProfilerStop, so that
`ncu --profile-from-start off` sees only the op's own kernels of one step and none of the set-up.

    ncu --profile-from-start off --clock-control none ... python benchmarks/gpu_check_ncu.py [--n2 16384]
        [--dim 128] [--dtype bf16]
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "python")]

import simclr_ext  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n2", type=int, default=16384, help="2N, the number of embeddings (even)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    if args.n2 < 2 or args.n2 % 2:
        p.error(f"--n2 must be an even number >= 2, got {args.n2}")
    if args.dim < 1:
        p.error(f"--dim must be >= 1, got {args.dim}")
    if not torch.cuda.is_available():
        sys.exit("gpu_check_ncu.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    if not simclr_ext.info()["cuda_compiled"]:
        sys.exit("simclr_ext was built without its CUDA kernels")
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (args.n2 // 2, args.dim)
    z1 = torch.randn(shape, device="cuda", dtype=DTYPES[args.dtype], generator=gen).requires_grad_(True)
    z2 = torch.randn(shape, device="cuda", dtype=DTYPES[args.dtype], generator=gen).requires_grad_(True)
    for _ in range(args.warmup):
        torch.autograd.grad(simclr_ext.nt_xent(z1, z2), (z1, z2))
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    loss = simclr_ext.nt_xent(z1, z2)
    grads = torch.autograd.grad(loss, (z1, z2))
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    bad = [name for name, g in zip(("z1", "z2"), grads) if not torch.isfinite(g).all()]
    print(f"loss {loss.item():.6f}; 2N={args.n2} D={args.dim} {args.dtype}"
          + (f"; non-finite gradient of {', '.join(bad)}" if bad else ""))
    return 1 if bad or not torch.isfinite(loss) else 0


if __name__ == "__main__":
    sys.exit(main())
