"""NT-Xent forward+backward on the CPU: the fused op against the textbook reference (and lightly when
installed). Time is the median of interleaved runs; peak memory is the resident-set growth of one
forward+backward in a fresh process (tests/memory_probe.py).

    python benchmarks/bench_ntxent_cpu.py [--sizes 512 2048 8192 16384] [--threads 1 2] [--write]
"""
import argparse
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import interleaved_medians, machine, today, write_results  # noqa: E402

import simclr_ext  # noqa: E402
import simclr_reference  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = os.path.join(ROOT, "tests", "memory_probe.py")


def _providers():
    providers = {"fused": simclr_ext.nt_xent, "reference": simclr_reference.nt_xent}
    try:
        from lightly.loss import NTXentLoss as LightlyNTXent

        lightly_loss = LightlyNTXent(temperature=0.5)
        providers["lightly"] = lambda z1, z2, temperature: lightly_loss(z1, z2)
    except ImportError:
        pass
    return providers


def _step(fn, z1, z2):
    def run():
        loss = fn(z1, z2, temperature=0.5)
        torch.autograd.grad(loss, (z1, z2))
    return run


def peak_mib(which, two_n, d, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, PROBE, which, str(two_n), str(d)], capture_output=True, text=True,
                         env=env, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 8192, 16384], help="values of 2N")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="write benchmarks/results/ntxent_cpu_<date>.{md,json}")
    args = parser.parse_args()

    providers = _providers()
    rows, lines = [], []
    header = "| threads | 2N | " + " | ".join(f"{p} ms" for p in providers) + " | speedup vs reference | " \
             "fused peak MiB | reference peak MiB | memory ratio |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for threads in args.threads:
        torch.set_num_threads(threads)
        for two_n in args.sizes:
            g = torch.Generator().manual_seed(two_n)
            z1 = torch.randn(two_n // 2, args.dim, generator=g, requires_grad=True)
            z2 = torch.randn(two_n // 2, args.dim, generator=g, requires_grad=True)
            fns = {name: _step(fn, z1, z2) for name, fn in providers.items()}
            for fn in fns.values():
                fn()  # warm-up
            med = interleaved_medians(fns, args.reps)
            mem_f = peak_mib("fused", two_n, args.dim, threads)
            mem_r = peak_mib("reference", two_n, args.dim, threads)
            row = {"threads": threads, "two_n": two_n, "dim": args.dim, "dtype": "float32",
                   **{f"{p}_s": t for p, t in med.items()},
                   "speedup": med["reference"] / med["fused"], "fused_peak_mib": mem_f, "reference_peak_mib": mem_r}
            rows.append(row)
            line = f"| {threads} | {two_n} | " + " | ".join(f"{med[p] * 1e3:.1f}" for p in providers) + \
                   f" | {row['speedup']:.2f}x | {mem_f:.1f} | {mem_r:.1f} | {100 * mem_f / mem_r:.2f}% |"
            lines.append(line)
            print(line, flush=True)
    md = (f"# NT-Xent forward+backward on the CPU, float32, D={args.dim}\n\n"
          f"Machine: {machine()}. Date: {today()}. Median of {args.reps} interleaved runs per provider; "
          f"peak memory = resident-set growth of one forward+backward in a fresh process.\n\n"
          + "\n".join(lines) + "\n")
    print()
    print(md)
    if args.write:
        path = write_results(os.path.join(ROOT, "benchmarks", "results"), f"ntxent_cpu_{today()}", md,
                             {"machine": machine(), "date": today(), "rows": rows})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
