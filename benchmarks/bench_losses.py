"""The contrastive family on the CPU: each fused module against its peer's own implementation, forward +
backward, speed (median of interleaved runs) and peak memory (resident-set growth of one forward+backward
in a fresh process, the method of tests/memory_probe.py).

    ClipLoss    vs open_clip's ClipLoss (on F.normalize'd features, what open_clip's models hand it)
    SupConLoss  vs pytorch-metric-learning's SupConLoss (on the flattened views)
    DCLLoss     vs lightly's DCLLoss;  DCLWLoss vs lightly's DCLWLoss

    python benchmarks/bench_losses.py [--threads 1] [--reps 3] [--only clip supcon dcl dclw] [--write]
"""
import argparse
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import interleaved_medians, loadavg, machine, peak_rss_growth, today, write_results  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (rows, D, description). CLIP: N pairs; SupCon: B samples x 2 views; DCL: N pairs (2N anchors).
CASES = {
    "clip": (8192, 512, "N=8192 pairs, D=512"),
    "supcon": (4096, 128, "B=4096 x V=2 views, D=128, 100 classes"),
    "dcl": (4096, 128, "N=4096 pairs (2N=8192 anchors), D=128"),
    "dclw": (4096, 128, "N=4096 pairs (2N=8192 anchors), D=128, sigma=0.5"),
}
PEERS = {"clip": "open_clip", "supcon": "pytorch-metric-learning", "dcl": "lightly", "dclw": "lightly"}


def _inputs(case):
    rows, d, _ = CASES[case]
    g = torch.Generator().manual_seed(0)
    if case == "clip":
        return [torch.randn(rows, d, generator=g, requires_grad=True) for _ in range(2)] + \
               [torch.tensor(14.3, requires_grad=True)]
    if case == "supcon":
        return [torch.randn(rows, 2, d, generator=g, requires_grad=True), torch.randint(100, (rows,), generator=g)]
    return [torch.randn(rows, d, generator=g, requires_grad=True) for _ in range(2)]


def _loss_fn(case, provider):
    """fn(*inputs) -> scalar loss, for provider "fused" or "peer"."""
    import simclr_ext

    if case == "clip":
        if provider == "fused":
            return simclr_ext.ClipLoss()
        from open_clip.loss import ClipLoss

        peer = ClipLoss()
        return lambda a, b, s: peer(F.normalize(a, dim=1), F.normalize(b, dim=1), s)
    if case == "supcon":
        if provider == "fused":
            return simclr_ext.SupConLoss(0.1)
        from pytorch_metric_learning.losses import SupConLoss

        peer = SupConLoss(temperature=0.1)
        return lambda f, y: peer(f.transpose(0, 1).reshape(-1, f.shape[-1]), y.repeat(f.shape[1]))
    from lightly.loss import DCLLoss, DCLWLoss

    if case == "dcl":
        return simclr_ext.DCLLoss(0.1) if provider == "fused" else DCLLoss(0.1)
    return simclr_ext.DCLWLoss(0.1, 0.5) if provider == "fused" else DCLWLoss(0.1, 0.5)


def _step(fn, inputs):
    leaves = [x for x in inputs if x.requires_grad]

    def run():
        torch.autograd.grad(fn(*inputs), leaves)
    return run


def probe(case, provider):
    """In a fresh process: peak resident-set growth (bytes) of one forward+backward, after a warm-up."""
    inputs = _inputs(case)
    fn = _loss_fn(case, provider)
    small = [x[:64] if x.dim() else x for x in inputs]
    small = [x.detach().requires_grad_(x.is_floating_point() and x.requires_grad) for x in small]
    _step(fn, small)()  # one-time allocations (thread pools, BLAS buffers) are not counted
    return peak_rss_growth(_step(fn, inputs))


def peak_mib(case, provider, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, __file__, "--probe", case, provider], capture_output=True, text=True,
                         env=env, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--write", action="store_true", help="write benchmarks/results/losses_cpu_<date>.{md,json}")
    parser.add_argument("--probe", nargs=2, metavar=("CASE", "PROVIDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(probe(*args.probe))
        return

    rows, lines = [], []
    header = "| loss | peer | case | threads | fused ms | peer ms | speedup | fused peak MiB | peer peak MiB | " \
             "memory ratio | load avg |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for threads in args.threads:
        torch.set_num_threads(threads)
        for case in args.only:
            inputs = _inputs(case)
            fns = {p: _step(_loss_fn(case, p), inputs) for p in ("fused", "peer")}
            for fn in fns.values():
                fn()  # warm-up
            load = loadavg()
            med = interleaved_medians(fns, args.reps)
            mem = {p: peak_mib(case, p, threads) for p in ("fused", "peer")}
            row = {"loss": case, "peer": PEERS[case], "case": CASES[case][2], "threads": threads,
                   "fused_s": med["fused"], "peer_s": med["peer"], "speedup": med["peer"] / med["fused"],
                   "fused_peak_mib": mem["fused"], "peer_peak_mib": mem["peer"], "loadavg": load}
            rows.append(row)
            line = (f"| {case} | {PEERS[case]} | {CASES[case][2]} | {threads} | {med['fused'] * 1e3:.0f} | "
                    f"{med['peer'] * 1e3:.0f} | {row['speedup']:.2f}x | {mem['fused']:.1f} | {mem['peer']:.1f} | "
                    f"{100 * mem['fused'] / mem['peer']:.2f}% | {load} |")
            lines.append(line)
            print(line, flush=True)
    md = (f"# The contrastive family on the CPU: fused vs each peer's own implementation, float32\n\n"
          f"Machine: {machine()}. Date: {today()}. Forward+backward; median of {args.reps} interleaved runs "
          f"(fused, peer, fused, ...); peak memory = resident-set growth of one forward+backward in a fresh "
          f"process. Load average (1, 5, 15 min) read before each row.\n\n" + "\n".join(lines) + "\n")
    print()
    print(md)
    if args.write:
        path = write_results(os.path.join(ROOT, "benchmarks", "results"), f"losses_cpu_{today()}", md,
                             {"machine": machine(), "date": today(), "rows": rows})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
