"""The contrastive family: each fused module against its peer's own implementation, on the CPU or a CUDA
GPU: time (median of interleaved runs: fused, peer, fused, ...) and peak memory (CPU: resident-set growth
of one call in a fresh process; CUDA: torch.cuda.max_memory_allocated() above the inputs during the first,
untimed call), per mode (forward, backward of a kept graph, full = forward + backward).

    ClipLoss    vs open_clip's ClipLoss (on F.normalize'd features, what open_clip's models hand it; ours
                normalizes inside: normalize=True)
    SigLipLoss  vs open_clip's SigLipLoss (unit-norm features, learnable logit_scale and logit_bias)
    SupConLoss  vs pytorch-metric-learning's SupConLoss (on the flattened views)
    DCLLoss     vs lightly's DCLLoss;  DCLWLoss vs lightly's DCLWLoss

    python benchmarks/bench_losses.py [--device cpu] [--threads 1] [--reps 3] [--cases clip siglip supcon dcl dclw]
                                      [--providers fused peer] [--modes full] [--metrics time memory]

Results: benchmarks/results/losses_<device>_<YYYYMMDD-HHMM>.{md,json} (benchmarks/common.py), unless
--no-write.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [p for p in (ROOT, os.path.join(ROOT, "python"), os.path.dirname(os.path.abspath(__file__)))
                if p not in sys.path]

import common  # noqa: E402
from common import MODES, Step  # noqa: E402

# name: (rows, D, description). CLIP: N pairs; SupCon: B samples x 2 views; DCL: N pairs (2N anchors).
CASES = {
    "clip": (8192, 512, "N=8192 pairs, D=512"),
    "siglip": (8192, 512, "N=8192 pairs, D=512"),
    "supcon": (4096, 128, "B=4096 x V=2 views, D=128, 100 classes"),
    "dcl": (4096, 128, "N=4096 pairs (2N=8192 anchors), D=128"),
    "dclw": (4096, 128, "N=4096 pairs (2N=8192 anchors), D=128, sigma=0.5"),
}
PEERS = {"clip": "open_clip", "siglip": "open_clip", "supcon": "pytorch-metric-learning", "dcl": "lightly",
         "dclw": "lightly"}
PROVIDERS = ("fused", "peer")


def _inputs(case):
    rows, d, _ = CASES[case]
    g = torch.Generator().manual_seed(0)
    if case == "clip":
        return [torch.randn(rows, d, generator=g, requires_grad=True) for _ in range(2)] + \
               [torch.tensor(14.3, requires_grad=True)]
    if case == "siglip":
        return [F.normalize(torch.randn(rows, d, generator=g), dim=1).requires_grad_() for _ in range(2)] + \
               [torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)]
    if case == "supcon":
        return [torch.randn(rows, 2, d, generator=g, requires_grad=True), torch.randint(100, (rows,), generator=g)]
    return [torch.randn(rows, d, generator=g, requires_grad=True) for _ in range(2)]


def _loss_fn(case, provider):
    """fn(*inputs) -> scalar loss, for provider "fused" or "peer"."""
    import simclr_ext

    if case == "clip":
        if provider == "fused":
            return simclr_ext.ClipLoss(normalize=True)
        from open_clip.loss import ClipLoss

        peer = ClipLoss()
        return lambda a, b, s: peer(F.normalize(a, dim=1), F.normalize(b, dim=1), s)
    if case == "siglip":
        if provider == "fused":
            return simclr_ext.SigLipLoss()
        from open_clip.loss import SigLipLoss

        return SigLipLoss()
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


def inputs_on(case, device, limit=None):
    """The case's inputs on `device` (the same values on every device), as fresh leaves; with `limit`,
    only the first `limit` rows (the warm-up of a memory probe)."""
    out = []
    for x in _inputs(case):
        grad = x.requires_grad
        x = x.detach()
        if limit is not None and x.dim():
            x = x[:limit]
        out.append(x.to(device).requires_grad_(grad))
    return out


def make_step(case, provider, mode, inputs, device):
    fn = _loss_fn(case, provider)
    if isinstance(fn, torch.nn.Module):
        fn = fn.to(device)
    return Step(fn, inputs, mode)


# ------------------------------------------------------------------------------------------- measuring
def probe(case, provider, mode):
    """In this fresh process: peak resident-set growth (bytes) of one call, after a warm-up on 64 rows
    (one-time allocations, thread pools and BLAS buffers, are not counted)."""
    make_step(case, provider, mode, inputs_on(case, "cpu", limit=64), "cpu")()
    step = make_step(case, provider, mode, inputs_on(case, "cpu"), "cpu")
    step.prepare()
    return common.peak_rss_growth(step)


def measure(case, names, mode, args):
    """{provider: {"time_s", "reps", "peak_mib", "status"}} of one case in one mode."""
    device = args.device
    steps, out = {}, {name: {"status": "ok"} for name in names}
    on_device = "time" in args.metrics or device == "cuda"  # CPU memory alone: only the fresh processes
    inputs = inputs_on(case, device) if on_device else None
    for name in names if on_device else ():
        step = make_step(case, name, mode, inputs, device)
        try:
            step.prepare()
            if device == "cuda" and "memory" in args.metrics:  # the first call doubles as the warm-up
                out[name] = {"peak_mib": common.cuda_peak_growth(step) / 2**20, "status": "ok"}
            else:
                step()  # warm-up
                common.sync(device)
                out[name] = {"status": "ok"}
            steps[name] = step
        except torch.cuda.OutOfMemoryError:
            step.release()
            out[name] = {"status": "OOM"}
            torch.cuda.empty_cache()
    if "time" in args.metrics and steps:
        times = common.interleaved(steps, args.reps, device, args.deadline)
        for name, t in times.items():
            out[name].update(time_s=statistics.median(t["wall"]), reps=len(t["wall"]))
    for step in steps.values():
        step.release()
    if device == "cpu" and "memory" in args.metrics:
        for name in names:
            rows = [] if args.rows is None else ["--rows", args.rows]
            got = common.probe_in_fresh_process(__file__, [case, name, mode, *rows], threads=args.current_threads)
            out[name]["peak_mib"] = got[-1] / 2**20
    return out


def table(rows, names):
    head = ["loss", "peer", "case", "threads", "mode"] + [f"{p} ms" for p in names] + \
        (["speedup"] if len(names) == 2 else []) + [f"{p} peak MiB" for p in names] + \
        (["memory ratio"] if len(names) == 2 else []) + ["load avg"]
    by = {}
    for r in rows:
        by.setdefault((r["loss"], r["threads"], r["mode"]), {})[r["provider"]] = r
    body = []
    for (loss, threads, mode), rs in by.items():
        any_row = next(iter(rs.values()))
        cells = [loss, PEERS[loss], CASES[loss][2], threads, mode]
        cells += ["OOM" if rs.get(p, {}).get("status") == "OOM" else common.fmt_ms(rs.get(p, {}).get("time_s"))
                  for p in names]
        if len(names) == 2:
            cells.append(common.fmt_ratio(rs.get("peer", {}).get("fused_speedup")))
        cells += [common.fmt_mib(rs.get(p, {}).get("peak_mib")) for p in names]
        if len(names) == 2:
            x = rs.get("peer", {}).get("fused_memory_ratio")
            cells.append("-" if x is None else f"{100 * x:.2f}%")
        cells.append(any_row["loadavg"])
        body.append(cells)
    return common.markdown_table(head, body)


def add_ratios(rows):
    """On each peer row: peer time / fused time (fused_speedup, > 1: fused faster) and fused peak / peer
    peak (fused_memory_ratio)."""
    fused = {(r["loss"], r["threads"], r["mode"]): r for r in rows if r["provider"] == "fused"}
    for r in rows:
        f = fused.get((r["loss"], r["threads"], r["mode"]), {})
        if r.get("time_s") and f.get("time_s"):
            r["fused_speedup"] = r["time_s"] / f["time_s"]
        if r.get("peak_mib") and f.get("peak_mib") is not None:
            r["fused_memory_ratio"] = f["peak_mib"] / r["peak_mib"]


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_harness_args(p, PROVIDERS, modes_help="full", metrics_help="time memory",
                            reps_help="interleaved repetitions per case (default: 3)")
    p.add_argument("--cases", nargs="+", help=f"subset of {', '.join(CASES)} (default: all)")
    p.add_argument("--threads", nargs="+", help="CPU thread counts, torch.set_num_threads (default: 1)")
    p.add_argument("--rows", type=int, help="replaces every case's row count (N pairs, B samples): quick checks "
                                            "of the script on small inputs, not the cases of the results")
    p.add_argument("--probe", nargs=3, metavar=("CASE", "PROVIDER", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rows is not None:
        if args.rows < 2:
            raise SystemExit(f"--rows: must be >= 2, got {args.rows}")
        for case, (_, d, what) in list(CASES.items()):
            CASES[case] = (args.rows, d, f"{what.split(',')[0].split('=')[0]}={args.rows} (--rows), D={d}")
    if args.probe:
        return args
    args.modes = common.parse_list(args.modes or ["full"], "--modes", MODES)
    args.metrics = common.parse_list(args.metrics or list(common.METRICS), "--metrics", common.METRICS)
    args.providers = common.parse_list(args.providers, "--providers", PROVIDERS)
    args.cases = common.parse_list(args.cases or list(CASES), "--cases", list(CASES))
    if args.device == "cpu":
        args.threads = common.parse_list(args.threads or ["1"], "--threads", convert=int)
    elif args.threads:
        raise SystemExit("--threads: CPU only")
    else:
        args.threads = [torch.get_num_threads()]
    args.reps = common.check_reps(args.reps, 3)
    return args


def main(argv=None):
    args = parse_args(argv)
    common.apply_isa(args.isa)  # re-executes with the --isa environment, unless it holds already
    if args.probe:
        common.enter_probe_process()
        print(probe(*args.probe))
        return 0
    common.check_device(args.device)
    where = "CUDA" if args.device == "cuda" else "the CPU"
    run = common.Run("losses", args.device, f"The contrastive family on {where}: fused vs each peer's own "
                     "implementation, float32", __file__, args, argv)
    print(run.header(), flush=True)
    args.deadline = None if args.max_seconds is None else time.perf_counter() + args.max_seconds
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        args.current_threads = threads
        for case in args.cases:
            for mode in args.modes:
                what = f"{case} threads={threads} {mode}"
                if rows and args.deadline is not None and time.perf_counter() > args.deadline:
                    run.skip(what, f"--max-seconds {args.max_seconds:g} spent")
                    continue
                load = common.loadavg()
                got = measure(case, args.providers, mode, args)
                for name, r in got.items():
                    rows.append({"loss": case, "peer": PEERS[case], "case": CASES[case][2], "threads": threads,
                                 "dtype": "float32", "mode": mode, "provider": name, **r, "loadavg": load})
                print(f"{what}: " + ", ".join(f"{n} {common.fmt_ms(r.get('time_s'))} ms, "
                                               f"{common.fmt_mib(r.get('peak_mib'))} MiB" for n, r in got.items()),
                      flush=True)
    add_ratios(rows)
    method = [f"providers: {', '.join(args.providers)} (peer: each loss's own library, column peer); modes: "
              f"{', '.join(args.modes)} (full = forward + backward)",
              f"time: median of {args.reps} interleaved runs ({', '.join(args.providers)}, ...)"
              + ("; CUDA-event timings" if args.device == "cuda" else "") + "; load average read before each row",
              "peak memory: " + ("resident-set growth of one call in a fresh process, at the row's thread count"
                                 if args.device == "cpu" else
                                 "torch.cuda.max_memory_allocated() above the inputs during the first call")
              + "; backward: above the kept forward graph"]
    md, paths = run.finish(rows, table(rows, args.providers), method, args.out, not args.no_write)
    common.report(md, paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
