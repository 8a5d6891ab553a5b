"""Images/second of the full SimCLR augmentation (two views per image) against the usual alternatives.

    python benchmarks/bench_augment.py --device cpu [--threads 1,2] [--cases 32x32,224x224] [--reps 5]
    python benchmarks/bench_augment.py --device cuda --out $OUT
    python benchmarks/bench_augment.py --device cpu --threads 1 --profile   # + where the fused op's time goes
    python benchmarks/bench_augment.py --device cpu --metrics time memory   # + peak memory per provider

Providers (the same pipeline: RandomResizedCrop, flip, color jitter p=0.8 in random order, grayscale p=0.2,
blur p=0.5 with a ~10% kernel (off at 32x32, as in the paper for CIFAR), normalize; two views):
  fused        simclr_ext.SimCLRAugment on the batch (uint8 in, float32 out)
  tv2          torchvision.transforms.v2 one image at a time on uint8 tensors (on the benchmark device: on
               CUDA the per-image GPU pipeline a user gets by moving the tensors there)
  tv1_pil      torchvision.transforms (v1) one PIL image at a time, ToTensor + Normalize (CPU only)
  kornia       kornia.augmentation's batched pipeline on the batch (uint8 -> float conversion included); when
               kornia is not importable (the GPU machine has it only when its wheels are carried) it is
               listed as unavailable in the results instead of failing the run
Each repeat runs every provider once, in turn (A B C A B C ...); we report medians and the ratios of the
fused op's rate to each other provider's. For CUDA we also report the fused op's global-memory traffic
model against the minimum (read every source once, write every output once). Mode: forward only (uint8
images in, nothing to differentiate). Metrics: time (default); with --metrics time memory also the peak
memory of one call (CPU: resident-set growth in a fresh process after a warm-up call; CUDA:
torch.cuda.max_memory_allocated() above the inputs during the first call).
Results: benchmarks/results/augment_<device>_<YYYYMMDD-HHMM>.{md,json} (benchmarks/common.py), unless
--no-write.
"""
import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [p for p in (ROOT, os.path.join(ROOT, "python"), os.path.join(ROOT, "benchmarks")) if p not in sys.path]

import common  # noqa: E402
from common import MODES  # noqa: E402

import simclr_ext  # noqa: E402
from simclr_ext.augment import default_blur_kernel  # noqa: E402

PROVIDERS = ("fused", "tv2", "tv1_pil", "kornia")

CASES = {  # name: (source side, output side, batch on CPU, batch on CUDA)
    "32x32": (32, 32, 256, 1024),
    "224x224": (256, 224, 32, 256),
}


def _pipeline_kwargs(out):
    blur = out >= 64
    return dict(blur_p=0.5 if blur else 0.0, kernel=default_blur_kernel((out, out)))


def make_fused(out, device):
    kw = _pipeline_kwargs(out)
    aug = simclr_ext.SimCLRAugment(size=out, blur_p=kw["blur_p"])
    g = torch.Generator().manual_seed(0)
    return lambda x: aug(x, generator=g)


def make_tv2(out, device):
    from torchvision.transforms import v2 as T

    kw = _pipeline_kwargs(out)
    steps = [T.RandomResizedCrop(out), T.RandomHorizontalFlip(),
             T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), T.RandomGrayscale(p=0.2)]
    if kw["blur_p"] > 0:
        steps.append(T.RandomApply([T.GaussianBlur(kw["kernel"], (0.1, 2.0))], p=0.5))
    steps += [T.ToDtype(torch.float32, scale=True), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    t = T.Compose(steps)

    def run(x):
        return torch.stack([t(im) for im in x]), torch.stack([t(im) for im in x])
    return run


def make_tv1_pil(out, device):
    from PIL import Image
    from torchvision import transforms as T

    kw = _pipeline_kwargs(out)
    steps = [T.RandomResizedCrop(out), T.RandomHorizontalFlip(),
             T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), T.RandomGrayscale(p=0.2)]
    if kw["blur_p"] > 0:
        steps.append(T.RandomApply([T.GaussianBlur(kw["kernel"], (0.1, 2.0))], p=0.5))
    steps += [T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    t = T.Compose(steps)
    cache = {}

    def run(x):
        key = id(x)
        if key not in cache:  # PIL images are the dataset's format here: converting is not timed twice
            cache.clear()
            cache[key] = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in x]
        pil = cache[key]
        return torch.stack([t(im) for im in pil]), torch.stack([t(im) for im in pil])
    return run


def make_kornia(out, device):
    import kornia.augmentation as K

    kw = _pipeline_kwargs(out)
    steps = [K.RandomResizedCrop((out, out)), K.RandomHorizontalFlip(),
             K.ColorJitter(0.8, 0.8, 0.8, 0.2, p=0.8), K.RandomGrayscale(p=0.2)]
    if kw["blur_p"] > 0:
        steps.append(K.RandomGaussianBlur((kw["kernel"], kw["kernel"]), (0.1, 2.0), p=0.5))
    # mean / std on the device: kornia keeps them as plain attributes that .to(device) does not move
    steps.append(K.Normalize(torch.tensor([0.485, 0.456, 0.406], device=device),
                             torch.tensor([0.229, 0.224, 0.225], device=device)))
    seq = K.AugmentationSequential(*steps).to(device)

    def run(x):
        f = x.float().div_(255)
        return seq(f), seq(f)
    return run


def _have(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def _images(name, device):
    """The case's uint8 batch on the CPU and on `device` (the same values)."""
    src, _, b_cpu, b_cuda = CASES[name]
    batch = b_cuda if device == "cuda" else b_cpu
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (batch, 3, src, src), generator=g, dtype=torch.uint8)
    return images, images.to(device)


def _call(provider, fn, images, dev_images):
    """The provider's call on its input: PIL images come from the CPU batch, the rest from the device's."""
    x = images if provider == "tv1_pil" else dev_images
    return lambda: fn(x)


def bench_case(name, device, threads, repeats, providers, deadline=None, memory=False):
    """Interleaved repeats of every provider on one case (the first call of each, untimed, warms up: kernel
    caches, lazy imports, PIL conversion; on CUDA with `memory` it also measures the peak); after the first
    repeat, stops early once time.perf_counter() passes `deadline` (each row records how many repeats it has)."""
    _, out, _, _ = CASES[name]
    images, dev_images = _images(name, device)
    batch = images.shape[0]
    calls = {p: _call(p, globals()["make_" + p](out, device), images, dev_images) for p in providers}
    peaks = {}
    for p, call in calls.items():
        if memory and device == "cuda":
            peaks[p] = common.cuda_peak_growth(call) / 2**20
        else:
            call()
            common.sync(device)
    times = common.interleaved(calls, repeats, device, deadline)  # CPU time too: a loaded machine inflates it least
    rows = []
    for p in providers:
        med = statistics.median(times[p]["wall"])
        rows.append(dict(case=name, device=device, threads=threads, mode="forward", provider=p, batch=batch,
                         time_s=med, reps=len(times[p]["wall"]), cpu_s=statistics.median(times[p]["cpu"]),
                         images_per_s=batch / med, runs=[round(t, 6) for t in times[p]["wall"]]))
        if p in peaks:
            rows[-1]["peak_mib"] = peaks[p]
    fused = next(r for r in rows if r["provider"] == "fused")
    for r in rows:
        r["fused_speedup"] = fused["images_per_s"] / r["images_per_s"]
        r["fused_speedup_cpu"] = r["cpu_s"] / fused["cpu_s"] if fused["cpu_s"] > 0 else float("nan")
        if r.get("peak_mib") and "peak_mib" in fused:
            r["fused_memory_ratio"] = fused["peak_mib"] / r["peak_mib"]
    if device == "cuda":
        fused.update(traffic_model(batch, CASES[name][0], out, fused["time_s"]))
    return rows


def probe(name, provider):
    """In this fresh process (CPU): peak resident-set growth (bytes) of one call on the case's batch, after
    one warm-up call on it (one-time allocations and the PIL conversion are not counted)."""
    images, _ = _images(name, "cpu")
    call = _call(provider, globals()["make_" + provider](CASES[name][1], "cpu"), images, images)
    call()
    return common.peak_rss_growth(call)


def traffic_model(batch, src, out, seconds, jitter_p=0.8):
    """Global-memory bytes of two fused views vs the minimum, as a model (no profiler counters): each view
    reads its sources once in the main kernel and once more in the contrast-mean kernel for the jittered
    samples (neighbour and halo re-reads assumed cached), and writes its output once."""
    src_bytes = batch * 3 * src * src
    out_bytes = batch * 3 * out * out * 4
    minimum = src_bytes + 2 * out_bytes
    fused = 2 * (1 + jitter_p) * src_bytes + 2 * out_bytes
    return dict(bytes_min=minimum, bytes_model=fused, bytes_ratio=fused / minimum,
                min_bytes_per_s=minimum / seconds)



# ---------------------------------------------------------------------------------------------------
# Per-stage profile of the fused op (--profile)

def _with(params, **flags):
    """A copy of params with the given per-sample fields set for every sample (bool or float)."""
    import dataclasses

    changes = {}
    for name, value in flags.items():
        t = getattr(params, name)
        changes[name] = torch.full_like(t, value)
    return dataclasses.replace(params, **changes)


PROFILE_STAGES = [  # (stage, what it adds to the previous row's configuration)
    ("crop/resample + normalize + write", dict(jitter=False, grayscale=False, blur=False)),
    ("+ brightness, contrast, saturation", dict(jitter=True, grayscale=False, blur=False, hue=0.0)),
    ("+ hue (HSV round trip)", dict(jitter=True, grayscale=False, blur=False, hue=0.1)),
    ("+ grayscale", dict(jitter=True, grayscale=True, blur=False, hue=0.1)),
    ("+ 23-tap blur", dict(jitter=True, grayscale=True, blur=True, hue=0.1)),
]


def profile_stages(case, repeats, threads=1):
    """Time per view of the fused op with the stages switched on one at a time (every sample takes the
    stage), interleaved; a stage's cost is the difference to the row before. Crops, flips, jitter factors
    and sigmas are the preset's random draws. Times are the process's CPU time (time.process_time), which
    a loaded machine inflates far less than wall time: this table is for where the time goes, the
    providers table for speed."""
    src, out, batch, _ = CASES[case]
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (batch, 3, src, src), generator=g, dtype=torch.uint8)
    aug = simclr_ext.SimCLRAugment(size=out, blur_p=_pipeline_kwargs(out)["blur_p"])
    base = aug.sample(images, torch.Generator().manual_seed(0))
    configs = [(name, _with(base, **flags)) for name, flags in PROFILE_STAGES]
    mix = ("preset mix (jitter 0.8, gray 0.2, blur 0.5)", base)
    configs.append(mix)
    times = {name: [] for name, _ in configs}
    for _, p in configs:
        aug.view(images, p)
    for _ in range(repeats):
        for name, p in configs:
            t0 = time.process_time()
            aug.view(images, p)
            times[name].append(time.process_time() - t0)
    rows, prev = [], 0.0
    for name, _ in configs:
        per_view = statistics.median(times[name]) / batch
        is_mix = name == mix[0]
        rows.append(dict(case=case, threads=threads, stage=name, us_per_view=per_view * 1e6,
                         stage_us=None if is_mix else (per_view - prev) * 1e6))
        if not is_mix:
            prev = per_view
    return rows


def profile_markdown(rows):
    lines = ["| case | threads | configuration (every sample) | us / view | stage adds (us / view) |",
             "|---|---|---|---|---|"]
    for r in rows:
        add = "-" if r["stage_us"] is None else f"{r['stage_us']:.0f}"
        lines.append(f"| {r['case']} | {r['threads']} | {r['stage']} | {r['us_per_view']:.0f} | {add} |")
    return "\n".join(lines) + "\n"


METHOD = [
    "pipeline: RandomResizedCrop + flip + jitter(0.8,0.8,0.8,0.2, p=0.8) + grayscale(0.2) + blur(p=0.5, kernel ~10% "
    "of the side; none at 32x32) + normalize; two views per image; mode forward (the op has no backward: uint8 in)",
    "rate: source images per second (each gives two views); medians over interleaved repeats",
    "fused: uint8 in, float32 out, bilinear without antialiasing; tv2: uint8 tensors, torchvision's defaults "
    "(antialiased resize, uint8 intermediates); tv1_pil: PIL images (conversion not timed); kornia: float32 batch "
    "(uint8 -> float conversion timed); threads = torch.set_num_threads",
    "cpu s: median process CPU time of the same runs (all threads together); on a loaded machine its ratio "
    "(fused speedup, CPU) is the steadier one at 1 thread, the wall-clock one the real one on a quiet machine",
]


def to_markdown(rows, profile=None):
    """The tables: rate per case, threads and provider; the CUDA traffic model; the --profile stages."""
    memory = any("peak_mib" in r for r in rows)
    head = ["case", "threads", "provider", "batch", "reps", "median s", "images/s", "fused speedup", "cpu s",
            "fused speedup, CPU"] + (["peak MiB", "fused / provider memory"] if memory else [])
    body = []
    for r in rows:
        cells = [r["case"], r["threads"], r["provider"], r["batch"], r["reps"], f"{r['time_s']:.4f}",
                 f"{r['images_per_s']:.1f}", f"{r['fused_speedup']:.2f}x", f"{r['cpu_s']:.4f}",
                 f"{r['fused_speedup_cpu']:.2f}x"]
        if memory:
            ratio = r.get("fused_memory_ratio")
            cells += [common.fmt_mib(r.get("peak_mib")), "-" if ratio is None else f"{100 * ratio:.1f}%"]
        body.append(cells)
    lines = [common.markdown_table(head, body)]
    traffic = [r for r in rows if "bytes_model" in r]
    if traffic:
        lines += ["", "Fused op global-memory traffic (model, two views): bytes vs the minimum "
                  "(read each source once, write each output once).", "",
                  "| case | min bytes | model bytes | ratio | min bytes / s (GB/s) |", "|---|---|---|---|---|"]
        for r in traffic:
            lines.append(f"| {r['case']} | {r['bytes_min']} | {r['bytes_model']:.0f} | {r['bytes_ratio']:.2f} | "
                         f"{r['min_bytes_per_s'] / 1e9:.1f} |")
    if profile:
        lines += ["", "Where the fused op's time goes (--profile): CPU time per view with the stages switched on "
                  "one at a time for every sample; a stage's cost is the difference to the row above.", "",
                  profile_markdown(profile).rstrip("\n")]
    return "\n".join(lines) + "\n"


def cpu_memory(rows, threads):
    """Adds peak_mib (resident-set growth in a fresh process at `threads` threads) to the CPU rows."""
    for r in rows:
        got = common.probe_in_fresh_process(__file__, [r["case"], r["provider"]], threads=threads)
        r["peak_mib"] = got[-1] / 2**20
    fused = {r["case"]: r["peak_mib"] for r in rows if r["provider"] == "fused"}
    for r in rows:
        if r["peak_mib"] > 0 and r["case"] in fused:
            r["fused_memory_ratio"] = fused[r["case"]] / r["peak_mib"]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_harness_args(ap, PROVIDERS, modes_help="forward, the only one (no backward)", metrics_help="time",
                            reps_help="interleaved repeats per case (default: 5)")
    ap.add_argument("--threads", default="1,2", help="comma-separated CPU thread counts (torch.set_num_threads)")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    ap.add_argument("--profile", action="store_true",
                    help="also time the fused op per stage (CPU only, 1 thread, the 224x224 case)")
    ap.add_argument("--profile-repeats", type=int, default=9)
    ap.add_argument("--probe", nargs=2, metavar=("CASE", "PROVIDER"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        return args
    args.providers = common.parse_list(args.providers, "--providers", PROVIDERS)
    args.cases = common.parse_list(args.cases, "--cases", list(CASES))
    args.modes = common.parse_list(args.modes or ["forward"], "--modes", MODES)
    if args.modes != ["forward"]:
        raise SystemExit(f"--modes: the augmentation has only a forward (uint8 images in, no gradient), got "
                         f"{args.modes}")
    args.metrics = common.parse_list(args.metrics or ["time"], "--metrics", common.METRICS)
    if "time" not in args.metrics:
        raise SystemExit("--metrics: time is needed (the memory probes follow the timed cases)")
    args.reps = common.check_reps(args.reps, 5)
    return args


def main(argv=None):
    args = parse_args(argv)
    common.apply_isa(args.isa)  # re-executes with the --isa environment, unless it holds already
    if args.probe:
        common.enter_probe_process()
        print(probe(*args.probe))
        return 0
    common.check_device(args.device)
    run = common.Run("augment", args.device, f"SimCLR augmentation benchmark ({args.device})", __file__, args, argv)
    providers = list(args.providers)
    for p, module in (("kornia", "kornia"), ("tv1_pil", "PIL"), ("tv2", "torchvision")):
        if p in providers and not _have(module):
            run.skip(p, f"unavailable: {module} is not installed")
            providers.remove(p)
    if args.device == "cuda" and "tv1_pil" in providers:
        providers.remove("tv1_pil")  # PIL runs on the CPU only
    if "fused" not in providers:
        providers.insert(0, "fused")  # the speedup column needs it
    threads = common.parse_list(args.threads, "--threads", convert=int) if args.device == "cpu" else \
        [torch.get_num_threads()]
    print(run.header(), flush=True)
    deadline = None if args.max_seconds is None else time.perf_counter() + args.max_seconds
    memory = "memory" in args.metrics
    rows = []
    for t in threads:
        torch.set_num_threads(t)
        for case in args.cases:
            if rows and deadline is not None and time.perf_counter() > deadline:
                run.skip(f"{case} threads={t}", f"skipped: --max-seconds {args.max_seconds:g} spent")
                continue
            got = bench_case(case, args.device, t, args.reps, providers, deadline, memory)
            if memory and args.device == "cpu":
                cpu_memory(got, t)
            for r in got:
                r["loadavg"] = common.loadavg()
                rows.append(r)
                print(f"{r['case']:>8} threads={t} {r['provider']:>8}: {r['images_per_s']:10.1f} images/s "
                      f"(median {r['time_s']:.4f} s, fused {r['fused_speedup']:.2f}x; CPU {r['cpu_s']:.4f} s, "
                      f"fused {r['fused_speedup_cpu']:.2f}x)", flush=True)
    profile = None
    if args.profile and args.device == "cpu" and (deadline is None or time.perf_counter() < deadline):
        profile = profile_stages("224x224", args.profile_repeats)
        print(profile_markdown(profile), flush=True)
    md, paths = run.finish(rows, to_markdown(rows, profile), METHOD, args.out, not args.no_write,
                           extra={"providers": providers, "profile": profile})
    common.report(md, paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
