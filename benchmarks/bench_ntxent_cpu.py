"""NT-Xent forward+backward on the CPU, float32: the fused op against what users run instead.

Providers: `plain` (simclr_reference.nt_xent_plain: F.cross_entropy on the masked (2N)^2 logits, the usual
PyTorch formulation), `lightly` (lightly's NTXentLoss, when installed), `fused` (simclr_ext.nt_xent) and
`gemm_floor` (benchmarks/common.py: the three GEMM passes of the same shapes, tiled, nothing else: the
bound a fused kernel can approach). The float64-style oracle is for parity only and is not timed.

Times are medians of interleaved runs in one process (plain, lightly, fused, gemm_floor, plain, ...), per
thread count, 2N and D; ratios are plain / fused (> 1: fused faster) and fused / gemm_floor. Peak memory
is the resident-set growth of one forward+backward, one fresh process per provider and D (1 thread;
tests/memory_probe.py).

    python benchmarks/bench_ntxent_cpu.py [--sizes 256 512 2048 8192 16384] [--dims 128 512]
                                          [--threads 1 2] [--reps-scale 1.0] [--write] [--note TEXT]

The default table takes about 10 minutes on a quiet 2-core machine.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import (gemm_floor_step, interleaved_medians, loadavg, loss_providers, machine, today,  # noqa: E402
                    write_results)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = os.path.join(ROOT, "tests", "memory_probe.py")

# Interleaved repetitions per 2N (each provider runs this many times after one warm-up call): enough for a
# stable median at small sizes, few where one call of the slowest provider takes seconds.
REPS = {256: 41, 512: 21, 2048: 7, 4096: 5, 8192: 3, 16384: 2}


def _reps(two_n, scale):
    base = REPS.get(two_n, max(2, int(3 * (8192 / two_n) ** 2)))
    return max(2, int(round(base * scale)))


def _step(fn, z1, z2):
    def run():
        loss = fn(z1, z2)
        torch.autograd.grad(loss, (z1, z2))
    return run


def peak_mib(which, sizes, d):
    """Peak MiB of `which` at each 2N in sizes (one process, 1 thread), or None where it failed."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, PROBE, which, str(sizes[0]), str(d), *map(str, sizes[1:])],
                         capture_output=True, text=True, env=env)
    values = [int(line) / 2**20 for line in out.stdout.split()]
    return dict(zip(sizes, values + [None] * (len(sizes) - len(values))))


def measure(threads, two_n, d, providers, reps):
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(two_n * 1000 + d)
    z1 = torch.randn(two_n // 2, d, generator=g, requires_grad=True)
    z2 = torch.randn(two_n // 2, d, generator=g, requires_grad=True)
    z = torch.cat([z1, z2]).detach()
    fns = {name: _step(fn, z1, z2) for name, fn in providers.items()}
    fns["gemm_floor"] = lambda: gemm_floor_step(z)
    if two_n < 8192:  # larger sizes run after smaller ones: pools and buffers are warm, calls take seconds
        for fn in fns.values():
            fn()  # warm-up (thread pools, allocator, BLAS buffers)
    return interleaved_medians(fns, reps)


def _fmt_ms(s):
    return f"{s * 1e3:.2f}" if s < 0.1 else f"{s * 1e3:.0f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 2048, 8192, 16384], help="values of 2N")
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps-scale", type=float, default=1.0, help="multiplies the repetitions per size")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    parser.add_argument("--memory-sizes", type=int, nargs="+", help="2N values of the memory probes (default: --sizes)")
    parser.add_argument("--memory-dims", type=int, nargs="+", help="D values of the memory probes (default: --dims)")
    parser.add_argument("--memory-providers", nargs="+", help="providers of the memory probes (default: all)")
    parser.add_argument("--write", action="store_true", help="write benchmarks/results/ntxent_cpu_<date>.{md,json}")
    parser.add_argument("--note", default="", help="a line for the results file (e.g. the machine's load)")
    args = parser.parse_args()

    providers = loss_providers()
    names = list(providers) + ["gemm_floor"]
    started = time.strftime("%H:%M", time.gmtime())
    memory = {}
    mem_sizes = args.memory_sizes or args.sizes
    mem_dims = args.memory_dims or args.dims
    mem_names = args.memory_providers or names
    if not args.no_memory:
        for d in mem_dims:
            for name in mem_names:
                memory[(name, d)] = peak_mib(name, mem_sizes, d)
                print(f"peak memory {name} D={d}: " + ", ".join(
                    f"2N={n}: {'-' if v is None else f'{v:.1f}'} MiB" for n, v in memory[(name, d)].items()),
                    flush=True)

    header = ("| threads | D | 2N | " + " | ".join(f"{p} ms" for p in names) +
              " | plain / fused | fused / gemm_floor | load avg |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    rows = []
    for threads in args.threads:
        for d in args.dims:
            for two_n in args.sizes:
                reps = _reps(two_n, args.reps_scale)
                med = measure(threads, two_n, d, providers, reps)
                load = loadavg()
                row = {"threads": threads, "dim": d, "two_n": two_n, "dtype": "float32", "reps": reps,
                       "loadavg": load, **{f"{p}_s": med[p] for p in names},
                       "plain_over_fused": med["plain"] / med["fused"],
                       "fused_over_gemm_floor": med["fused"] / med["gemm_floor"]}
                if "lightly" in med:
                    row["lightly_over_fused"] = med["lightly"] / med["fused"]
                rows.append(row)
                line = (f"| {threads} | {d} | {two_n} | " + " | ".join(_fmt_ms(med[p]) for p in names) +
                        f" | {row['plain_over_fused']:.2f}x | {row['fused_over_gemm_floor']:.2f}x | {load} |")
                lines.append(line)
                print(line, flush=True)

    mem_lines = []
    if memory:
        head = "| D | 2N | " + " | ".join(f"{p} MiB" for p in mem_names) + " | fused / plain |"
        mem_lines = [head, "|" + "---|" * (head.count("|") - 1)]
        for d in mem_dims:
            for two_n in mem_sizes:
                vals = {p: memory[(p, d)][two_n] for p in mem_names}
                ratio = (f"{100 * vals['fused'] / vals['plain']:.2f}%"
                         if vals.get("fused") is not None and vals.get("plain") else "-")
                mem_lines.append(f"| {d} | {two_n} | " + " | ".join(
                    "-" if vals[p] is None else f"{vals[p]:.1f}" for p in mem_names) + f" | {ratio} |")
                for r in rows:
                    if r["dim"] == d and r["two_n"] == two_n:
                        r.update({f"{p}_peak_mib": vals[p] for p in mem_names})

    ended = time.strftime("%H:%M", time.gmtime())
    md = (f"# NT-Xent forward+backward on the CPU, float32\n\n"
          f"Machine: {machine()}. Date: {today()}, {started}-{ended} UTC. Medians of interleaved runs in one "
          f"process (reps per 2N: {', '.join(f'{n}: {_reps(n, args.reps_scale)}' for n in args.sizes)}); "
          f"`plain` is simclr_reference.nt_xent_plain (F.cross_entropy on the masked logits), `gemm_floor` "
          f"the three tiled GEMM passes of the same shapes (benchmarks/common.py). The float64-style oracle "
          f"is not a baseline and is not timed. Load average (1, 5, 15 min) printed per row.\n\n"
          + (f"{args.note}\n\n" if args.note else "")
          + "\n".join(lines) + "\n"
          + ("\nPeak memory: resident-set growth of one forward+backward, 1 thread, one process per provider "
             "and D (tests/memory_probe.py).\n\n" + "\n".join(mem_lines) + "\n" if mem_lines else ""))
    print()
    print(md)
    if args.write:
        path = write_results(os.path.join(ROOT, "benchmarks", "results"), f"ntxent_cpu_{today()}", md,
                             {"machine": machine(), "date": today(), "start_utc": started, "end_utc": ended,
                              "note": args.note, "rows": rows,
                              "memory": [{"provider": p, "dim": d, "two_n": n, "peak_mib": v}
                                         for (p, d), per in memory.items() for n, v in per.items()]})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
