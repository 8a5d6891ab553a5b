"""Gradient caching (simclr_ext.GradCache) on a SimCLR pretraining step: the recipe's ResNet-18 (CIFAR stem) at
32 px, two views, NT-Xent, at several effective batches with a fixed chunk, against the uncached step where it
fits: time per image (median of interleaved runs: uncached, cached, uncached, ...) and peak memory (CPU:
resident-set growth of one step in a fresh process; CUDA: torch.cuda.max_memory_allocated() above the inputs).

    uncached  _, z = model(cat(v1, v2)); NTXentLoss()(*z.chunk(2)).backward()   (what train.py does)
    cached    GradCache(lambda a, b: model(cat(a, b))[1].chunk(2), NTXentLoss(), chunk).step((v1, v2))

The claim checked: the cached step's peak does not grow with the effective batch (<= 1.25x the uncached peak
at one chunk), and its time per image is within 1.3x of the uncached step's where that fits.

    python benchmarks/bench_grad_cache.py [--batches 1024 4096 16384] [--chunk 256] [--uncached-max 4096]
                                          [--threads 1] [--reps 2] [--metrics time memory] [--max-seconds S]

Results: benchmarks/results/grad_cache_<device>_<YYYYMMDD-HHMM>.{md,json} (benchmarks/common.py).
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

PROVIDERS = ("uncached", "cached")
IMAGE = (3, 32, 32)


def build(device):
    """The recipe's CIFAR model (ResNet-18, 3x3 stride-1 stem, 2-layer head, 128-d), seeded, training mode."""
    from simclr_ext.recipe.models import build_model

    torch.manual_seed(0)
    return build_model("resnet18", 3, cifar_stem=True).to(device).train()


def views(batch, device):
    g = torch.Generator().manual_seed(batch)
    return [torch.randn(batch, *IMAGE, generator=g).to(device) for _ in range(2)]


def make_step(provider, model, v1, v2, chunk):
    """One optimizer step's forward and backward (gradients dropped after, as zero_grad(set_to_none) does)."""
    import simclr_ext

    loss_fn = simclr_ext.NTXentLoss(0.5)
    if provider == "uncached":
        def run():
            _, z = model(torch.cat([v1, v2]))
            loss_fn(*z.chunk(2)).backward()
    else:
        def both(a, b):
            return tuple(model(torch.cat([a, b]))[1].chunk(2))
        cache = simclr_ext.GradCache(both, loss_fn, chunk, modules=model)

        def run():
            cache.step((v1, v2))

    def step():
        run()
        model.zero_grad(set_to_none=True)
    return step


WARMUP_IMAGES = 2  # the probe's warm-up: enough for BatchNorm, too small to pre-grow the heap for the step


def probe(provider, batch, chunk):
    """In this fresh process: (peak resident-set growth in bytes, seconds) of one step, after a warm-up step on
    WARMUP_IMAGES images (thread pools, BLAS and oneDNN buffers are not counted; a warm-up at the chunk's size
    would leave its activations' memory in the heap and hide the step's own peak)."""
    model = build("cpu")
    make_step(provider, model, *views(WARMUP_IMAGES, "cpu"), chunk)()
    step = make_step(provider, model, *views(batch, "cpu"), chunk)
    t0 = time.perf_counter()
    peak = common.peak_rss_growth(step)
    return peak, int(1e6 * (time.perf_counter() - t0))


def measure(batch, names, args):
    """{provider: {"time_s", "reps", "peak_mib", "status"}} at one effective batch."""
    device, out = args.device, {}
    for name in names:
        if name == "uncached" and batch > args.uncached_max:
            out[name] = {"status": f"not run (batch > --uncached-max {args.uncached_max})"}
        else:
            out[name] = {"status": "ok"}
    runnable = [n for n in names if out[n]["status"] == "ok"]
    # Alone (no uncached step to interleave with), the cached step's time is its memory probe's: a step of
    # the largest batches takes many minutes on a CPU, and one is enough when there is no ratio to take.
    timed = "time" in args.metrics and (len(runnable) > 1 or "memory" not in args.metrics or device == "cuda")
    if timed or device == "cuda":
        model = build(device)
        v1, v2 = views(batch, device)
        steps = {}
        for name in runnable:
            step = make_step(name, model, v1, v2, args.chunk)
            if device == "cuda" and "memory" in args.metrics:  # the first call doubles as the warm-up
                out[name]["peak_mib"] = common.cuda_peak_growth(step) / 2**20
            elif args.warmup:
                step()
            steps[name] = step
        if timed:
            for name, t in common.interleaved(steps, args.reps, device, args.deadline).items():
                out[name].update(time_s=statistics.median(t["wall"]), reps=len(t["wall"]),
                                 s_per_image=statistics.median(t["wall"]) / batch)
        del model, v1, v2, steps
    if device == "cpu" and "memory" in args.metrics:
        for name in runnable:
            peak, micros = common.probe_in_fresh_process(__file__, [name, batch, args.chunk],
                                                         threads=args.current_threads)
            out[name]["peak_mib"] = peak / 2**20
            out[name]["probe_time_s"] = micros / 1e6
    return out


def add_ratios(rows, chunk):
    """cached/uncached time per image at the same batch, and each cached peak over the uncached peak at one
    chunk (the memory of the step gradient caching repeats)."""
    by = {(r["threads"], r["batch"], r["provider"]): r for r in rows}
    for r in rows:
        if r["provider"] != "cached":
            continue
        u = by.get((r["threads"], r["batch"], "uncached"), {})
        if r.get("time_s") and u.get("time_s"):
            r["time_ratio"] = r["time_s"] / u["time_s"]
        one = by.get((r["threads"], chunk, "uncached"), {})
        if r.get("peak_mib") and one.get("peak_mib"):
            r["peak_over_one_chunk"] = r["peak_mib"] / one["peak_mib"]


def table(rows):
    head = ["effective batch", "chunk", "threads", "provider", "step s", "ms / image", "cached / uncached time",
            "peak MiB", "peak / one-chunk peak", "load avg"]
    body = []
    for r in rows:
        status = r.get("status", "ok")
        t = r.get("time_s") or r.get("probe_time_s")
        per_image = None if t is None else f"{1e3 * t / r['batch']:.2f}" + ("" if r.get("time_s") else " (probe)")
        body.append([r["batch"], r["chunk"], r["threads"], r["provider"],
                     status if status != "ok" else ("-" if t is None else f"{t:.1f}"),
                     per_image or "-", common.fmt_ratio(r.get("time_ratio")), common.fmt_mib(r.get("peak_mib")),
                     common.fmt_ratio(r.get("peak_over_one_chunk")), r["loadavg"]])
    return common.markdown_table(head, body)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_harness_args(p, PROVIDERS, modes_help="full (a training step)", metrics_help="time memory",
                            reps_help="interleaved repetitions per batch (default: 2)")
    p.add_argument("--batches", nargs="+", help="effective batches, images (two views each; default: 1024 4096 "
                                                "16384)")
    p.add_argument("--chunk", type=int, default=256, help="images per chunk of the cached step (default: 256)")
    p.add_argument("--uncached-max", type=int, default=4096,
                   help="largest batch the uncached step runs at (its activations grow with the batch; default "
                        "4096, ~30 GiB on the CPU)")
    p.add_argument("--threads", nargs="+", help="CPU thread counts, torch.set_num_threads (default: 1)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="no untimed full-size step before the timed ones (the big batches' minutes)")
    p.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                   help="glibc's M_MMAP_THRESHOLD for the memory probes (MALLOC_MMAP_THRESHOLD_): fixed, allocations "
                        "above it are mapped and unmapped on free, so the resident set follows live memory; "
                        "default: glibc's dynamic threshold, whose heap keeps freed chunk activations resident")
    p.add_argument("--probe", nargs=3, metavar=("PROVIDER", "BATCH", "CHUNK"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        return args
    if args.modes and common.parse_list(args.modes, "--modes", common.MODES) != ["full"]:
        raise SystemExit("--modes: a training step is forward + backward: only full")
    args.metrics = common.parse_list(args.metrics or list(common.METRICS), "--metrics", common.METRICS)
    args.providers = common.parse_list(args.providers, "--providers", PROVIDERS)
    args.batches = common.parse_list(args.batches or ["1024", "4096", "16384"], "--batches", convert=int)
    if min(args.batches) < 2 or args.chunk < 1:
        raise SystemExit(f"--batches must be >= 2 and --chunk >= 1, got {args.batches} and {args.chunk}")
    if "memory" in args.metrics and "uncached" in args.providers:  # the one-chunk peak the claim compares with
        args.batches = sorted(set(args.batches) | {args.chunk})
    if args.device == "cpu":
        args.threads = common.parse_list(args.threads or ["1"], "--threads", convert=int)
    elif args.threads:
        raise SystemExit("--threads: CPU only")
    else:
        args.threads = [torch.get_num_threads()]
    args.reps = common.check_reps(args.reps, 2)
    if args.malloc_mmap_threshold is not None:
        if args.malloc_mmap_threshold < 0:
            raise SystemExit(f"--malloc-mmap-threshold: must be >= 0 bytes, got {args.malloc_mmap_threshold}")
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)  # read by the probes' glibc
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.probe:
        common.enter_probe_process()
        provider, batch, chunk = args.probe
        print("\n".join(map(str, probe(provider, int(batch), int(chunk)))))
        return 0
    common.check_device(args.device)
    import torchvision  # noqa: F401

    import simclr_ext  # noqa: F401  (its version goes into the results)

    where = "CUDA" if args.device == "cuda" else "the CPU"
    run = common.Run("grad_cache", args.device, f"Gradient caching on {where}: a ResNet-18 (32 px, CIFAR stem) "
                     "SimCLR step, cached vs uncached, float32", __file__, args, argv)
    print(run.header(), flush=True)
    args.deadline = None if args.max_seconds is None else time.perf_counter() + args.max_seconds
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        args.current_threads = threads
        for batch in args.batches:
            what = f"batch {batch} threads={threads}"
            if rows and args.deadline is not None and time.perf_counter() > args.deadline:
                run.skip(what, f"--max-seconds {args.max_seconds:g} spent")
                continue
            load = common.loadavg()
            got = measure(batch, args.providers, args)
            for name, r in got.items():
                rows.append({"batch": batch, "chunk": args.chunk, "threads": threads, "provider": name,
                             "dtype": "float32", **r, "loadavg": load})
            print(f"{what}: " + ", ".join(f"{n} {r.get('time_s') or r.get('probe_time_s') or '-'} s, "
                                           f"{common.fmt_mib(r.get('peak_mib'))} MiB" for n, r in got.items()),
                  flush=True)
    add_ratios(rows, args.chunk)
    timing = (f"time: median of {args.reps} interleaved runs (uncached, cached, ...)"
              + (" after one untimed step of each" if args.warmup else " without a full-size warm-up")
              if "time" in args.metrics else "time: not measured (--metrics memory)")
    method = ["model: simclr_ext.recipe.models.build_model('resnet18', cifar_stem=True), training mode; inputs: "
              "two random 3x32x32 views per image, made before the step; loss NTXentLoss(0.5); a step ends with "
              "zero_grad(set_to_none=True)",
              timing + "; '(probe)': the one step of the fresh memory-probe process, not interleaved",
              "peak memory: " + ("resident-set growth of one step in a fresh process after a "
                                 f"{WARMUP_IMAGES}-image warm-up, inputs excluded; glibc malloc with "
                                 + ("its default dynamic mmap threshold" if args.malloc_mmap_threshold is None else
                                    f"MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}")
                                 if args.device == "cpu" else
                                 "torch.cuda.max_memory_allocated() above the inputs during the first step"),
              f"peak / one-chunk peak: the cached step's peak over the uncached step's at batch = chunk "
              f"({args.chunk}); BatchNorm statistics are per chunk in the cached step"]
    md, paths = run.finish(rows, table(rows), method, args.out, not args.no_write)
    common.report(md, paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
