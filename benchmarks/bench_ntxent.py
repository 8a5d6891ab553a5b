"""NT-Xent (simclr_ext.nt_xent) against what users run instead, on the CPU or a CUDA GPU.

Providers (--providers):
  plain       simclr_reference.nt_xent_plain: F.cross_entropy on the masked (2N)^2 logits, the usual
              PyTorch formulation, in the inputs' dtype on the inputs' device
  lightly     lightly's NTXentLoss (left out, and listed as not run, when lightly is not importable)
  fused       simclr_ext.nt_xent
  gemm_floor  the GEMM passes of the same shapes and nothing else (no softmax, no normalization), tiled by
              row blocks so the (2N)^2 matrix never exists: per block the score tile S_b = z_b z^T
              (forward), then S_b z twice (backward: dZ from dS and from dS^T); the bound a fused kernel
              can approach, with the same BLAS / cuBLAS and the same precision setting
The float64 oracle (simclr_reference.nt_xent) is for parity only: never timed, never a denominator.

Modes (--modes): forward (the loss, autograd recording), backward (the gradients of one kept graph),
full (forward + backward, a training step). Metrics (--metrics): time, the median of interleaved runs in
one process (plain, lightly, fused, gemm_floor, plain, ...; CUDA-event timings on the GPU); peak memory,
on the CPU the resident-set growth in a fresh process (1 thread, one process per provider, mode, dtype
and D, the sizes in turn), on CUDA torch.cuda.max_memory_allocated() above the inputs during the first,
untimed call; in backward mode both count above the kept forward graph. Ratios: <peer> / fused (> 1:
fused faster), fused / gemm_floor, and fused / plain for memory; fused TFLOP/s counts the GEMM flops.

    python benchmarks/bench_ntxent.py --device cpu     # --sizes 256 512 2048 8192 16384 --dims 128 512
                                                       # --threads 1 2 --dtypes fp32 --modes full
                                                       # (about 10 minutes on a quiet 2-core machine)
    python benchmarks/bench_ntxent.py --device cuda    # --sizes 4096 16384 65536 --dims 128 512
                                                       # --dtypes bf16 fp32 --modes forward backward full
                                                       # --max-seconds 200

Lists take spaces or commas (--sizes 256 512 or --sizes 256,512). Results: benchmarks/results/
ntxent_<device>_<YYYYMMDD-HHMM>.{md,json} (benchmarks/common.py: the one format), unless --no-write.
"""
import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [p for p in (ROOT, os.path.join(ROOT, "python"), os.path.dirname(os.path.abspath(__file__)))
                if p not in sys.path]

import common  # noqa: E402
from common import MODES, Step  # noqa: E402

TEMPERATURE = 0.5
PROVIDERS = ("plain", "lightly", "fused", "gemm_floor")
PEERS = ("plain", "lightly")  # what users run instead: the speed-up columns are <peer> / fused
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
GEMM_PASSES = {"forward": 1, "backward": 2, "full": 3}  # products of 2 (2N)^2 D flops each
DEFAULTS = {
    "cpu": dict(sizes=[256, 512, 2048, 8192, 16384], dims=[128, 512], threads=[1, 2], dtypes=["fp32"],
                modes=["full"], max_seconds=None),
    "cuda": dict(sizes=[4096, 16384, 65536], dims=[128, 512], threads=None, dtypes=["bf16", "fp32"],
                 modes=list(MODES), max_seconds=200.0),
}
# CPU: interleaved repetitions per 2N (each provider runs this many times after one warm-up call): enough
# for a stable median at small sizes, few where one call of the slowest provider takes seconds.
CPU_REPS = {256: 41, 512: 21, 2048: 7, 4096: 5, 8192: 3, 16384: 2}
# CPU: from this 2N on the sizes run after smaller ones (pools and buffers are warm) and one call takes
# seconds, so there is no warm-up call.
CPU_NO_WARMUP_FROM = 8192
GEMM_FLOOR_ROWS = 256  # CPU row tile of the GEMM floor: its score tile stays small (16 MiB at 2N = 16384)


# ------------------------------------------------------------------------------------------- providers
def loss_fn(name):
    """fn(z1, z2) -> scalar loss for a loss provider, or None when its package is not importable."""
    if name == "plain":
        import simclr_reference

        return lambda z1, z2: simclr_reference.nt_xent_plain(z1, z2, TEMPERATURE)
    if name == "lightly":
        try:
            from lightly.loss import NTXentLoss
        except Exception:  # not installed (or broken): the provider is left out and listed as not run
            return None
        loss = NTXentLoss(temperature=TEMPERATURE)
        return lambda z1, z2: loss(z1, z2)
    if name == "fused":
        import simclr_ext

        return lambda z1, z2: simclr_ext.nt_xent(z1, z2, TEMPERATURE)
    raise ValueError(f"provider must be one of {PROVIDERS}, got {name!r}")


def floor_rows(two_n, device):
    """Row tile of the GEMM floor: small on the CPU (cache-sized tiles, as a fused CPU kernel uses); on CUDA
    large enough for cuBLAS to run at full rate, capped at 2^27 tile entries (512 MiB in float32)."""
    if device == "cpu":
        return GEMM_FLOOR_ROWS
    return min(two_n, max(GEMM_FLOOR_ROWS, 2**27 // two_n))


class GemmFloor:
    """The GEMM passes of NT-Xent on z (2N, D) in one mode: forward, one product per row block
    (S_b = z_b z^T); backward, two (S_b z, then accumulate S_b z, with one fixed score tile standing in for
    S_b: the backward's shapes and flops, values do not matter); full, all three on the real S_b."""

    def __init__(self, z, mode, rows=GEMM_FLOOR_ROWS):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.z, self.mode, self.rows, self.tile = z, mode, rows, None

    def prepare(self):
        if self.mode == "backward" and self.tile is None:
            n = self.z.shape[0]
            self.tile = torch.randn(min(self.rows, n), n, dtype=self.z.dtype, device=self.z.device)

    def __call__(self):
        self.prepare()
        z = self.z
        out = None if self.mode == "forward" else torch.empty_like(z)
        for r0 in range(0, z.shape[0], self.rows):
            block = z[r0:r0 + self.rows]
            s = self.tile[:block.shape[0]] if self.mode == "backward" else block @ z.T
            if out is not None:
                o = out[r0:r0 + self.rows]
                torch.mm(s, z, out=o)
                o.addmm_(s, z)
        return out

    def release(self):
        self.tile = None


def gemm_floor_step(z):
    """The floor's forward + backward on z with the CPU tile (tests/memory_probe.py measures it)."""
    return GemmFloor(z, "full")()


def make_inputs(two_n, d, dtype, device, seed=None):
    g = torch.Generator(device=device).manual_seed(two_n * 1000 + d if seed is None else seed)
    return [torch.randn(two_n // 2, d, generator=g, device=device, dtype=dtype, requires_grad=True)
            for _ in range(2)]


def make_step(name, z1, z2, mode):
    if name == "gemm_floor":
        return GemmFloor(torch.cat([z1, z2]).detach(), mode, floor_rows(2 * z1.shape[0], z1.device.type))
    return Step(loss_fn(name), (z1, z2), mode)


# ------------------------------------------------------------------------------------------- measuring
def cpu_reps(two_n, scale):
    base = CPU_REPS.get(two_n, max(2, int(3 * (8192 / two_n) ** 2)))
    return max(2, int(round(base * scale)))


def measure(device, two_n, d, dtype, mode, names, args, budget_s, deadline):
    """{provider: {"time_s", "reps", "peak_mib", "status"}} for one configuration and mode."""
    z1, z2 = make_inputs(two_n, d, dtype, device)
    want_time, want_memory = "time" in args.metrics, "memory" in args.metrics and device == "cuda"
    steps, out = {}, {}
    for name in names:
        step = make_step(name, z1, z2, mode)
        try:
            step.prepare()
            if device == "cuda":  # the first call: untimed for the medians, it sizes the repetitions
                t0 = time.perf_counter()
                peak = common.cuda_peak_growth(step) if want_memory else None
                if peak is None:
                    step()
                    torch.cuda.synchronize()
                out[name] = {"first_s": time.perf_counter() - t0,
                             "peak_mib": None if peak is None else peak / 2**20, "status": "ok"}
            elif two_n < CPU_NO_WARMUP_FROM:
                step()  # warm-up (thread pools, allocator, BLAS buffers)
                out[name] = {"status": "ok"}
            else:
                out[name] = {"status": "ok"}
            steps[name] = step
        except torch.cuda.OutOfMemoryError:
            step.release()
            out[name] = {"status": "OOM"}
            torch.cuda.empty_cache()
    if want_time and steps:
        if args.reps is not None:
            reps = args.reps
        elif device == "cuda":
            est = max([r["first_s"] for r in out.values() if "first_s" in r] + [1e-5])
            reps = int(min(15, max(3, budget_s / (len(steps) * est))))
        else:
            reps = cpu_reps(two_n, args.reps_scale)
        times = common.interleaved(steps, reps, device, deadline)
        for name, t in times.items():
            out[name].update(time_s=statistics.median(t["wall"]), reps=len(t["wall"]))
    for step in steps.values():
        step.release()
    del steps, z1, z2
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def probe(args):
    """--probe PROVIDER MODE DTYPE D TWO_N...: in this fresh process, the peak resident-set growth of one
    call per 2N, one line each, after a warm-up on 32 rows (one-time allocations are not counted)."""
    name, mode, dtype, d, *sizes = args.probe
    d, sizes, dtype = int(d), [int(s) for s in sizes], DTYPES[dtype]
    make_step(name, *make_inputs(64, d, dtype, "cpu", seed=0), mode)()
    for two_n in sizes:
        z1, z2 = make_inputs(two_n, d, dtype, "cpu", seed=two_n)
        step = make_step(name, z1, z2, mode)
        step.prepare()
        print(common.peak_rss_growth(step), flush=True)
        step.release()
        del step, z1, z2


def cpu_memory(names, modes, dtypes, dims, sizes, run):
    """{(dtype, d, two_n, mode, provider): MiB or None}: one fresh 1-thread process per provider, mode,
    dtype and D, over the sizes."""
    out = {}
    for dtype in dtypes:
        for d in dims:
            for mode in modes:
                for name in names:
                    try:
                        got = common.probe_in_fresh_process(__file__, [name, mode, dtype, d, *sizes], threads=1)
                    except RuntimeError as e:
                        run.skip(f"peak memory {name} {mode} {dtype} D={d}", str(e).splitlines()[-1])
                        got = []
                    values = [b / 2**20 for b in got] + [None] * (len(sizes) - len(got))
                    out.update({(dtype, d, n, mode, name): v for n, v in zip(sizes, values)})
                    print(f"peak memory {name} {mode} {dtype} D={d}: " + ", ".join(
                        f"2N={n}: {common.fmt_mib(v)} MiB" for n, v in zip(sizes, values)), flush=True)
    return out


# ------------------------------------------------------------------------------------------- reporting
def add_ratios(rows):
    """Per (configuration, mode): <provider> time / fused time on every row (fused_speedup: > 1, fused is
    faster), fused / gemm_floor and the model TFLOP/s on the fused and floor rows, fused peak / provider
    peak (fused_memory_ratio)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["threads"], r["dtype"], r["dim"], r["two_n"], r["mode"]), {})[r["provider"]] = r
    for (_, _, d, two_n, mode), by in groups.items():
        fused = by.get("fused", {})
        for name, r in by.items():
            if r.get("time_s") and fused.get("time_s"):
                r["fused_speedup"] = r["time_s"] / fused["time_s"]
            if isinstance(r.get("peak_mib"), float) and isinstance(fused.get("peak_mib"), float) and r["peak_mib"] > 0:
                r["fused_memory_ratio"] = fused["peak_mib"] / r["peak_mib"]
            if name in ("fused", "gemm_floor") and r.get("time_s"):
                r["tflops"] = GEMM_PASSES[mode] * 2 * two_n * two_n * d / r["time_s"] / 1e12
        floor = by.get("gemm_floor", {})
        if fused.get("time_s") and floor.get("time_s"):
            fused["over_gemm_floor"] = fused["time_s"] / floor["time_s"]


def _cell_ms(r):
    if r is None:
        return "n/a"
    return "OOM" if r.get("status") == "OOM" else common.fmt_ms(r.get("time_s"))


def time_table(rows, names, device):
    by = {}
    for r in rows:
        if "time_s" in r or r.get("status") == "OOM":
            by.setdefault((r["threads"], r["dtype"], r["dim"], r["two_n"], r["mode"]), {})[r["provider"]] = r
    peers = [p for p in PEERS if p in names and "fused" in names]
    head = (["threads"] if device == "cpu" else []) + ["dtype", "D", "2N", "mode", "reps"] + \
        [f"{p} ms" for p in names] + [f"{p} / fused" for p in peers] + \
        (["fused / gemm_floor"] if {"fused", "gemm_floor"} <= set(names) else []) + \
        (["fused TFLOP/s"] if device == "cuda" and "fused" in names else []) + ["load avg"]
    body = []
    for (threads, dtype, d, two_n, mode), rs in by.items():
        fused = rs.get("fused", {})
        any_row = next(iter(rs.values()))
        cells = ([threads] if device == "cpu" else []) + [dtype, d, two_n, mode, any_row.get("reps", "-")]
        cells += [_cell_ms(rs.get(p)) for p in names]
        cells += [common.fmt_ratio(rs.get(p, {}).get("fused_speedup")) for p in peers]
        if {"fused", "gemm_floor"} <= set(names):
            cells.append(common.fmt_ratio(fused.get("over_gemm_floor")))
        if device == "cuda" and "fused" in names:
            cells.append("-" if "tflops" not in fused else f"{fused['tflops']:.1f}")
        cells.append(any_row["loadavg"])
        body.append(cells)
    return common.markdown_table(head, body)


def memory_table(rows, names):
    by = {}
    for r in rows:
        if "peak_mib" in r:
            by.setdefault((r["dtype"], r["dim"], r["two_n"], r["mode"]), {})[r["provider"]] = r
    ratio = "fused" in names and "plain" in names
    head = ["dtype", "D", "2N", "mode"] + [f"{p} MiB" for p in names] + (["fused / plain"] if ratio else [])
    body = []
    for (dtype, d, two_n, mode), rs in by.items():
        cells = [dtype, d, two_n, mode]
        cells += ["OOM" if rs.get(p, {}).get("status") == "OOM" else common.fmt_mib(rs.get(p, {}).get("peak_mib"))
                  for p in names]
        if ratio:
            x = rs.get("plain", {}).get("fused_memory_ratio")
            cells.append("-" if x is None else f"{100 * x:.2f}%")
        body.append(cells)
    return common.markdown_table(head, body)


def method_lines(args, device, names):
    reps = (f"{args.reps} per case" if args.reps is not None else
            "per 2N: " + ", ".join(f"{n}: {cpu_reps(n, args.reps_scale)}" for n in args.sizes) if device == "cpu"
            else "3 to 15 per case, from the first call's time and the budget")
    lines = [f"providers: {', '.join(names)}; plain = simclr_reference.nt_xent_plain (F.cross_entropy on the "
             f"masked logits), gemm_floor = the tiled GEMM passes of the same shapes (benchmarks/bench_ntxent.py); "
             f"the float64 oracle is not a baseline and is not timed; temperature {TEMPERATURE}",
             f"modes: {', '.join(args.modes)} (forward; backward of a kept graph; full = forward + backward)"]
    if "time" in args.metrics:
        lines.append(f"time: medians of interleaved runs in one process ({reps})"
                     + ("; CUDA-event timings" if device == "cuda" else "; load average read per row"))
    if "memory" in args.metrics:
        lines.append("peak memory: " + ("resident-set growth of one call, 1 thread, one fresh process per provider, "
                                        "mode, dtype and D" if device == "cpu" else
                                        "torch.cuda.max_memory_allocated() above the inputs during the first call")
                     + "; backward: above the kept forward graph")
    if device == "cuda":
        lines.append(f"float32 matmul precision: {torch.get_float32_matmul_precision()} (all providers; "
                     f"simclr_ext TF32: {_tf32()})")
    return lines


def _tf32():
    import simclr_ext

    return simclr_ext.tf32_enabled()


def _order(args):
    """Sort key of the rows: threads, dtype, D, 2N, mode, provider, each in the order the flags gave."""
    lists = [args.threads, args.dtypes, args.dims, args.sizes + [n for n in args.memory_sizes if n not in args.sizes],
             args.modes, list(PROVIDERS)]
    fields = ["threads", "dtype", "dim", "two_n", "mode", "provider"]

    def key(r):
        return tuple(lst.index(r[f]) if r[f] in lst else len(lst) for f, lst in zip(fields, lists))
    return key


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_harness_args(p, PROVIDERS, modes_help="cpu full; cuda forward backward full",
                            metrics_help="time memory",
                            reps_help="interleaved repetitions per case (default: CPU, by 2N; CUDA, 3 to 15 from "
                                      "the first call's time and the budget)")
    p.add_argument("--sizes", nargs="+", help="values of 2N (default: cpu 256 512 2048 8192 16384; cuda 4096 "
                                              "16384 65536)")
    p.add_argument("--dims", nargs="+", help="values of D (default: 128 512)")
    p.add_argument("--dtypes", nargs="+", help=f"of {', '.join(DTYPES)} (default: cpu fp32; cuda bf16 fp32)")
    p.add_argument("--threads", nargs="+", help="CPU thread counts, torch.set_num_threads (default: 1 2)")
    p.add_argument("--reps-scale", type=float, default=1.0, help="CPU: multiplies the repetitions per 2N")
    p.add_argument("--memory-sizes", nargs="+", help="CPU: 2N values of the memory probes (default: --sizes)")
    p.add_argument("--memory-dims", nargs="+", help="CPU: D values of the memory probes (default: --dims)")
    p.add_argument("--memory-providers", nargs="+", help="CPU: providers of the memory probes (default: all)")
    p.add_argument("--tf32", action="store_true",
                   help="CUDA: torch.set_float32_matmul_precision('high'): every provider's float32 matmuls "
                        "(and the fused kernel, which follows it) use TF32; default: full fp32")
    p.add_argument("--probe", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        return args
    d = DEFAULTS[args.device]
    args.modes = common.parse_list(args.modes or d["modes"], "--modes", MODES)
    args.metrics = common.parse_list(args.metrics or list(common.METRICS), "--metrics", common.METRICS)
    args.providers = common.parse_list(args.providers, "--providers", PROVIDERS)
    args.sizes = common.parse_list(args.sizes or d["sizes"], "--sizes", convert=int)
    args.dims = common.parse_list(args.dims or d["dims"], "--dims", convert=int)
    args.dtypes = common.parse_list(args.dtypes or d["dtypes"], "--dtypes", list(DTYPES))
    for flag, values in (("--sizes", args.sizes), ("--dims", args.dims)):
        if any(v < 2 or (flag == "--sizes" and v % 2) for v in values):
            raise SystemExit(f"{flag}: every value must be {'an even number >= 2' if flag == '--sizes' else '>= 2'}, "
                             f"got {values}")
    if args.device == "cpu":
        args.threads = common.parse_list(args.threads or d["threads"], "--threads", convert=int)
        if args.tf32:
            raise SystemExit("--tf32: CUDA only (the CPU kernels are always exact)")
    else:
        cpu_only = [f for f in ("threads", "memory_sizes", "memory_dims", "memory_providers") if getattr(args, f)]
        if cpu_only:
            raise SystemExit(f"--{cpu_only[0].replace('_', '-')}: CPU only (on CUDA memory is measured with the "
                             f"timings, on the GPU's threads)")
        args.threads = [torch.get_num_threads()]
    args.memory_sizes = common.parse_list(args.memory_sizes or args.sizes, "--memory-sizes", convert=int)
    args.memory_dims = common.parse_list(args.memory_dims or args.dims, "--memory-dims", convert=int)
    args.memory_providers = common.parse_list(args.memory_providers or args.providers, "--memory-providers", PROVIDERS)
    if args.max_seconds is None:
        args.max_seconds = d["max_seconds"]
    args.reps = common.check_reps(args.reps)
    return args


def main(argv=None):
    args = parse_args(argv)
    if not args.probe:
        common.apply_isa(args.isa)  # re-executes with the --isa environment, unless it holds already
    if args.probe:
        common.enter_probe_process()
        probe(args)
        return 0
    device = args.device
    common.check_device(device)
    if device == "cuda":
        import simclr_ext

        if not simclr_ext.info()["cuda_compiled"]:
            raise SystemExit("--device cuda: simclr_ext was built without its CUDA kernels "
                             "(simclr_ext.info()['cuda_compiled'] is False)")
        torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
    where = "CUDA" if device == "cuda" else "the CPU"
    run = common.Run("ntxent", device, f"NT-Xent on {where}: fused vs plain PyTorch, lightly and the GEMM floor",
                     __file__, args, argv)
    print(run.header(), flush=True)
    names = []
    for name in args.providers:
        if name in ("plain", "fused", "gemm_floor") or loss_fn(name) is not None:
            names.append(name)
        else:
            run.skip(name, "unavailable: lightly is not importable")
    rows = {}

    def row(threads, dtype, d, two_n, mode, name):
        key = (threads, dtype, d, two_n, mode, name)
        if key not in rows:
            rows[key] = {"threads": threads, "dtype": dtype, "dim": d, "two_n": two_n, "mode": mode,
                         "provider": name}
        return rows[key]

    if device == "cpu" and "memory" in args.metrics:
        mem_names = [n for n in args.memory_providers if n in names]
        for (dtype, d, two_n, mode, name), mib in cpu_memory(mem_names, args.modes, args.dtypes, args.memory_dims,
                                                             args.memory_sizes, run).items():
            row(1, dtype, d, two_n, mode, name)["peak_mib"] = mib
    t0, measured = time.perf_counter(), False
    deadline = None if args.max_seconds is None else t0 + args.max_seconds
    if "time" in args.metrics or device == "cuda":
        for threads in args.threads:
            torch.set_num_threads(threads)
            for dtype in args.dtypes:
                for d in args.dims:
                    for two_n in args.sizes:
                        for mode in args.modes:
                            what = f"threads={threads} {dtype} D={d} 2N={two_n} {mode}"
                            if measured and deadline is not None and time.perf_counter() > deadline:
                                run.skip(what, f"--max-seconds {args.max_seconds:g} spent")
                                continue
                            left = None if deadline is None else deadline - time.perf_counter()
                            budget = 3.0 if left is None else max(0.5, min(3.0, left / 20))
                            got = measure(device, two_n, d, DTYPES[dtype], mode, names, args, budget, deadline)
                            measured = True
                            load = common.loadavg()
                            for name, r in got.items():
                                r.pop("first_s", None)
                                row(threads, dtype, d, two_n, mode, name).update(r, loadavg=load)
                            print(f"{what}: " + ", ".join(f"{n} {_cell_ms(r)} ms" for n, r in got.items())
                                  + f" (load {load})", flush=True)
    rows = sorted(rows.values(), key=_order(args))
    add_ratios(rows)
    body = []
    if any("time_s" in r for r in rows):
        body.append(time_table(rows, names, device))
    if any("peak_mib" in r for r in rows):
        body.append("Peak memory" + (" (1 thread)" if device == "cpu" else "") + ":\n\n" + memory_table(rows, names))
    md, paths = run.finish(rows, "\n\n".join(body) or "(nothing measured)", method_lines(args, device, names),
                           args.out, not args.no_write, extra={"providers": names, "temperature": TEMPERATURE})
    common.report(md, paths)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
