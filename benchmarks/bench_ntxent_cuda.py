"""CUDA benchmark table of the fused NT-Xent op: fused vs plain PyTorch (simclr_reference.nt_xent_plain:
F.cross_entropy on the masked logits, in the same dtype on the GPU) vs lightly (when importable), forward,
backward and both, against a cuBLAS GEMM-only floor measured in the same run. The float64-style oracle is
for parity only and is not timed.

    python benchmarks/bench_ntxent_cuda.py --out DIR [--sizes 4096,16384,65536] [--dims 128,512]
                                           [--dtypes bf16,fp32] [--max-seconds 200]

Times are medians of CUDA-event timings, providers interleaved (fused, plain, lightly, fused, ...)
for each configuration. Peak memory is torch.cuda.max_memory_allocated() above the inputs, during the
first (untimed) call of each mode. The floor is the cuBLAS products of the same shapes: one
(2N x D) @ (D x 2N) for forward, two (2N x 2N) @ (2N x D) for backward (TF32 allowed for float32, as
the fused op's default); "TFLOP/s" is those GEMM flops over the fused time. `plain` runs with torch's
defaults (full-fp32 matmuls for float32; --plain-tf32 lets it use TF32 too). A provider that runs out of
memory is reported as OOM.
Writes DIR/bench_ntxent_cuda.json and DIR/bench_ntxent_cuda.md; prints the table.
"""
import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "python")]

import simclr_ext  # noqa: E402
import simclr_reference  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwd", "bwd", "both")
GEMMS = {"fwd": 1, "bwd": 2, "both": 3}  # products of 2 (2N)^2 D flops in the floor
TEMPERATURE = 0.5


def _lightly():
    try:
        from lightly.loss import NTXentLoss
    except Exception:  # not installed (or broken): the column says n/a
        return None
    loss = NTXentLoss(temperature=TEMPERATURE)
    return lambda z1, z2: loss(z1, z2)


def providers():
    out = {"fused": lambda z1, z2: simclr_ext.nt_xent(z1, z2, TEMPERATURE),
           "plain": lambda z1, z2: simclr_reference.nt_xent_plain(z1, z2, TEMPERATURE)}
    lightly = _lightly()
    if lightly is not None:
        out["lightly"] = lightly
    return out


def _timed(fn):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


class Step:
    """One provider's call in one mode, on fresh leaf inputs; the backward mode reuses one forward graph."""

    def __init__(self, loss_fn, z1, z2, mode):
        self.loss_fn, self.mode = loss_fn, mode
        self.z1 = z1.detach().clone().requires_grad_(True)
        self.z2 = z2.detach().clone().requires_grad_(True)
        self.graph = None

    def __call__(self):
        if self.mode == "fwd":
            self.loss_fn(self.z1, self.z2)
        elif self.mode == "both":
            loss = self.loss_fn(self.z1, self.z2)
            torch.autograd.grad(loss, (self.z1, self.z2))
        else:
            torch.autograd.grad(self.graph, (self.z1, self.z2), retain_graph=True)

    def prepare(self):
        if self.mode == "bwd":
            self.graph = self.loss_fn(self.z1, self.z2)

    def release(self):
        self.graph = None
        self.z1 = self.z2 = None


def _first_call(step):
    """Runs the untimed first call; returns (ms, peak extra bytes) or raises OutOfMemoryError."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step.prepare()
    ms = _timed(step)
    return ms, torch.cuda.max_memory_allocated() - base


def measure_config(n2, d, dtype, provs, budget_s):
    """Rows of one (2N, D, dtype): every provider x mode, plus the GEMM floor."""
    gen = torch.Generator(device="cuda").manual_seed(n2 * 1000 + d)
    z1 = torch.randn(n2 // 2, d, device="cuda", dtype=dtype, generator=gen)
    z2 = torch.randn(n2 // 2, d, device="cuda", dtype=dtype, generator=gen)
    floor = gemm_floor(n2, d, dtype)
    rows = []
    for mode in MODES:
        steps, result = {}, {}
        for name, fn in provs.items():
            try:
                steps[name] = Step(fn, z1, z2, mode)
                first_ms, peak = _first_call(steps[name])
                result[name] = {"ms": [], "peak_bytes": peak, "first_ms": first_ms}
            except torch.cuda.OutOfMemoryError:
                steps.pop(name, None)
                result[name] = {"oom": True}
                torch.cuda.empty_cache()
        est = max([r["first_ms"] for r in result.values() if "first_ms" in r] + [0.01])
        reps = int(min(15, max(3, budget_s * 1000 / (len(steps) * est + 1e-9))))
        for _ in range(reps):  # interleaved: A B A B
            for name, step in steps.items():
                result[name]["ms"].append(_timed(step))
        for step in steps.values():
            step.release()
        steps.clear()
        torch.cuda.empty_cache()
        row = {"n2": n2, "d": d, "dtype": str(dtype).replace("torch.", ""), "mode": mode, "reps": reps,
               "gemm_floor_ms": floor[mode], "gemm_tflop": GEMMS[mode] * 2 * n2 * n2 * d / 1e12}
        for name, r in result.items():
            if r.get("oom"):
                row[name] = "OOM"
                continue
            row[name] = {"median_ms": statistics.median(r["ms"]), "peak_mb": r["peak_bytes"] / 2**20}
        fused = row.get("fused")
        if isinstance(fused, dict):
            row["fused_tflops"] = row["gemm_tflop"] / (fused["median_ms"] / 1e3)
            row["fused_over_floor"] = fused["median_ms"] / floor[mode]
            plain = row.get("plain")
            if isinstance(plain, dict):
                row["speedup_vs_plain"] = plain["median_ms"] / fused["median_ms"]
                row["memory_vs_plain"] = fused["peak_mb"] / max(plain["peak_mb"], 1e-9)
        rows.append(row)
    del z1, z2
    torch.cuda.empty_cache()
    return rows


def gemm_floor(n2, d, dtype, reps=5):
    """Median ms of the cuBLAS products of the loss's shapes: forward (2N x D)(D x 2N), backward 2 x
    (2N x 2N)(2N x D). Falls back to the product time scaled by flops when the 2N x 2N operand does not fit."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        a = torch.randn(n2, d, device="cuda", dtype=dtype)
        fwd = _median_ms(lambda: a @ a.T, reps)
        try:
            s = torch.randn(n2, n2, device="cuda", dtype=dtype)
            bwd = 2 * _median_ms(lambda: s @ a, reps)
            del s
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            bwd = 2 * fwd
        del a
        torch.cuda.empty_cache()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return {"fwd": fwd, "bwd": bwd, "both": fwd + bwd}


def _median_ms(fn, reps):
    fn()
    return statistics.median(_timed(fn) for _ in range(reps))


def _cell(row, name):
    v = row.get(name)
    if v is None:
        return "n/a"
    if v == "OOM":
        return "OOM"
    return f"{v['median_ms']:.3f}"


def _mem(row, name):
    v = row.get(name)
    return v if v in (None, "OOM") else f"{v['peak_mb']:.1f}"


def table(rows, lightly):
    head = ["2N", "D", "dtype", "mode", "fused ms", "plain ms"] + (["lightly ms"] if lightly else []) + \
           ["plain/fused", "GEMM ms", "fused/GEMM", "TFLOP/s", "fused MB", "plain MB", "mem fused/plain"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["n2"]), str(r["d"]), r["dtype"], r["mode"], _cell(r, "fused"), _cell(r, "plain")]
        if lightly:
            cells.append(_cell(r, "lightly"))
        cells += [f"{r['speedup_vs_plain']:.2f}x" if "speedup_vs_plain" in r else "-",
                  f"{r['gemm_floor_ms']:.3f}",
                  f"{r['fused_over_floor']:.2f}x" if "fused_over_floor" in r else "-",
                  f"{r['fused_tflops']:.1f}" if "fused_tflops" in r else "-",
                  str(_mem(r, "fused")), str(_mem(r, "plain")),
                  f"{100 * r['memory_vs_plain']:.3f}%" if "memory_vs_plain" in r else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--sizes", default="4096,16384,65536", help="2N values, comma-separated")
    p.add_argument("--dims", default="128,512")
    p.add_argument("--dtypes", default="bf16,fp32", help=f"of {sorted(DTYPES)}")
    p.add_argument("--max-seconds", type=float, default=200.0, help="stop starting configurations after this")
    p.add_argument("--plain-tf32", action="store_true", help="let the plain baseline's float32 matmuls use TF32")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_ntxent_cuda.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    if not simclr_ext.info()["cuda_compiled"]:
        sys.exit("simclr_ext was built without its CUDA kernels (simclr_ext.info()['cuda_compiled'] is False)")
    sizes = [int(s) for s in args.sizes.split(",")]
    dims = [int(s) for s in args.dims.split(",")]
    dtypes = [DTYPES[s] for s in args.dtypes.split(",")]
    provs = providers()
    torch.backends.cuda.matmul.allow_tf32 = args.plain_tf32
    configs = [(n2, d, dt) for dt in dtypes for d in dims for n2 in sizes]
    t0, rows, skipped = time.time(), [], []
    for n2, d, dt in configs:
        left = args.max_seconds - (time.time() - t0)
        if left <= 0:
            skipped.append(f"2N={n2} D={d} {dt}")
            continue
        per_config = max(0.5, min(3.0, left / 20))
        rows += measure_config(n2, d, dt, provs, per_config)
        print(f"  done 2N={n2} D={d} {dt} ({time.time() - t0:.0f} s)", flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "simclr_ext": simclr_ext.info(), "providers": sorted(provs), "skipped_for_time": skipped,
            "tf32_default": simclr_ext.tf32_enabled(), "plain_tf32": args.plain_tf32, "temperature": TEMPERATURE}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_ntxent_cuda.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
    md = table(rows, "lightly" in provs)
    with open(os.path.join(args.out, "bench_ntxent_cuda.md"), "w") as f:
        f.write(f"# Fused NT-Xent on CUDA: {meta['device']}, {meta['date_utc']} UTC\n\n"
                f"torch {meta['torch']} (CUDA {meta['cuda']}); providers {', '.join(meta['providers'])}; "
                f"medians of interleaved CUDA-event timings; peak = max_memory_allocated above the inputs.\n"
                f"fp32: fused with TF32 tensor cores (the default), plain with "
                f"{'TF32' if args.plain_tf32 else 'full-fp32'} matmuls, GEMM floor with TF32. plain = "
                f"simclr_reference.nt_xent_plain (F.cross_entropy on the masked logits).\n\n{md}\n")
        if skipped:
            f.write(f"\nNot run (time budget): {', '.join(skipped)}\n")
    print(md)
    if skipped:
        print("not run (time budget):", ", ".join(skipped))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
