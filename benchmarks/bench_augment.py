"""Images/second of the full SimCLR augmentation (two views per image) against the usual alternatives.

    python benchmarks/bench_augment.py --device cpu --threads 1,2 --out benchmarks/results
    python benchmarks/bench_augment.py --device cuda --out $OUT
    python benchmarks/bench_augment.py --device cpu --threads 1 --profile   # + where the fused op's time goes

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
model against the minimum (read every source once, write every output once).
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "python"), os.path.join(ROOT, "benchmarks")]

import simclr_ext  # noqa: E402
from simclr_ext.augment import default_blur_kernel  # noqa: E402
from common import loadavg  # noqa: E402

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


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def bench_case(name, device, threads, repeats, providers, deadline=None):
    """Interleaved repeats of every provider on one case; after the first repeat, stops early once
    time.perf_counter() passes `deadline` (each row records how many repeats it has)."""
    src, out, b_cpu, b_cuda = CASES[name]
    batch = b_cuda if device == "cuda" else b_cpu
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (batch, 3, src, src), generator=g, dtype=torch.uint8)
    dev_images = images.to(device)
    fns = {}
    for p in providers:
        fns[p] = globals()["make_" + p](out, device)
    times = {p: [] for p in providers}
    cpu = {p: [] for p in providers}  # process CPU time: what a loaded, shared machine inflates least
    for p, fn in fns.items():  # warm-up (kernel caches, lazy imports, PIL conversion)
        fn(images if p == "tv1_pil" else dev_images)
        _sync(device)
    for rep in range(repeats):
        if rep > 0 and deadline is not None and time.perf_counter() > deadline:
            break
        for p, fn in fns.items():
            x = images if p == "tv1_pil" else dev_images
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn(x)
            _sync(device)
            times[p].append(time.perf_counter() - t0)
            cpu[p].append(time.process_time() - c0)
    rows = []
    for p in providers:
        med = statistics.median(times[p])
        rows.append(dict(case=name, device=device, threads=threads, provider=p, batch=batch, median_s=med,
                         repeats=len(times[p]), cpu_s=statistics.median(cpu[p]),
                         images_per_s=batch / med, runs=[round(t, 6) for t in times[p]]))
    fused = next(r for r in rows if r["provider"] == "fused")
    for r in rows:
        r["fused_speedup"] = fused["images_per_s"] / r["images_per_s"]
        r["fused_speedup_cpu"] = r["cpu_s"] / fused["cpu_s"] if fused["cpu_s"] > 0 else float("nan")
    if device == "cuda":
        fused.update(traffic_model(batch, src, out, fused["median_s"]))
    return rows


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


def git_sha():
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        sha = out.stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+uncommitted" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def machine(device):
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    desc = f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}"
    try:
        import torchvision
        desc += f", torchvision {torchvision.__version__}"
    except ImportError:
        pass
    if _have("kornia"):
        import kornia
        desc += f", kornia {kornia.__version__}"
    if device == "cuda":
        desc += f", GPU {torch.cuda.get_device_name()}"
    return desc


def to_markdown(rows, device, note, meta, unavailable=(), profile=None):
    lines = [f"# SimCLR augmentation benchmark ({device})", "", f"- date: {meta['date']}",
             f"- device: {meta['device_name']}", f"- machine: {meta['machine']}", f"- git: {meta['git_sha']}",
             f"- load average (1, 5, 15 min) before / after: {meta['load_before']} / {meta['load_after']}",
             "- pipeline: RandomResizedCrop + flip + jitter(0.8,0.8,0.8,0.2, p=0.8) + grayscale(0.2) + "
             "blur(p=0.5, kernel ~10% of the side; none at 32x32) + normalize; two views per image",
             "- rate: source images per second (each gives two views); medians over interleaved repeats",
             "- fused: uint8 in, float32 out, bilinear without antialiasing; tv2: uint8 tensors, torchvision's "
             "defaults (antialiased resize, uint8 intermediates); tv1_pil: PIL images (conversion not timed); "
             "kornia: float32 batch (uint8 -> float conversion timed); threads = torch.set_num_threads",
             f"- note: {note}", ""]
    for p, why in unavailable:
        lines.append(f"- {p}: {why}")
    if unavailable:
        lines.append("")
    lines += ["- cpu s: median process CPU time of the same runs (all threads together); on a loaded machine "
              "its ratio (fused speedup, CPU) is the steadier one at 1 thread, the wall-clock one the real one "
              "on a quiet machine", "",
              "| case | threads | provider | batch | median s | images/s | fused speedup | cpu s | fused speedup, CPU |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['threads']} | {r['provider']} | {r['batch']} | {r['median_s']:.4f} | "
                     f"{r['images_per_s']:.1f} | {r['fused_speedup']:.2f}x | {r['cpu_s']:.4f} | "
                     f"{r['fused_speedup_cpu']:.2f}x |")
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", default="1,2", help="comma-separated CPU thread counts (torch.set_num_threads)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="directory for the results")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    ap.add_argument("--providers", default="fused,tv2,tv1_pil,kornia")
    ap.add_argument("--note", default="", help="free text for the results file (e.g. machine shared)")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="time budget: the first case always runs once; after that, stop repeating once it is spent "
                         "and skip the cases not started (listed in the results); results are written either way")
    ap.add_argument("--profile", action="store_true",
                    help="also time the fused op per stage (CPU only, 1 thread, the 224x224 case)")
    ap.add_argument("--profile-repeats", type=int, default=9)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but torch.cuda.is_available() is False")
    providers = [p for p in args.providers.split(",") if p]
    unknown = [p for p in providers if "make_" + p not in globals()]
    if unknown:
        sys.exit(f"--providers: unknown {unknown}; known: fused, tv2, tv1_pil, kornia")
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        sys.exit(f"--cases: unknown {unknown}; known: {', '.join(CASES)}")
    unavailable = []
    for p, module in (("kornia", "kornia"), ("tv1_pil", "PIL"), ("tv2", "torchvision")):
        if p in providers and not _have(module):
            print(f"{p}: {module} is not installed: reported as unavailable", file=sys.stderr)
            unavailable.append((p, f"unavailable: {module} is not installed"))
            providers.remove(p)
    if args.device == "cuda" and "tv1_pil" in providers:
        providers.remove("tv1_pil")  # PIL runs on the CPU only
    if "fused" not in providers:
        providers.insert(0, "fused")  # the speedup column needs it
    threads = [int(t) for t in args.threads.split(",")] if args.device == "cpu" else [torch.get_num_threads()]
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                device_name=device_name(args.device), machine=machine(args.device), git_sha=git_sha(),
                load_before=loadavg())
    print(f"{meta['device_name']} | git {meta['git_sha']} | load average {meta['load_before']}", flush=True)
    deadline = None if args.max_seconds is None else time.perf_counter() + args.max_seconds
    rows = []
    for t in threads:
        torch.set_num_threads(t)
        for case in args.cases.split(","):
            if rows and deadline is not None and time.perf_counter() > deadline:
                print(f"{case} threads={t}: skipped (--max-seconds {args.max_seconds} spent)", flush=True)
                unavailable.append((f"{case} threads={t}", f"skipped: --max-seconds {args.max_seconds} spent"))
                continue
            for r in bench_case(case, args.device, t, args.repeats, providers, deadline):
                rows.append(r)
                print(f"{r['case']:>8} threads={t} {r['provider']:>8}: {r['images_per_s']:10.1f} images/s "
                      f"(median {r['median_s']:.4f} s, fused {r['fused_speedup']:.2f}x; CPU {r['cpu_s']:.4f} s, "
                      f"fused {r['fused_speedup_cpu']:.2f}x)", flush=True)
    profile = None
    if args.profile and args.device == "cpu" and (deadline is None or time.perf_counter() < deadline):
        profile = profile_stages("224x224", args.profile_repeats)
        print(profile_markdown(profile), flush=True)
    meta["load_after"] = loadavg()
    print(f"load average after: {meta['load_after']}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M")
    base = os.path.join(args.out, f"augment_{args.device}_{stamp}")
    with open(base + ".md", "w") as f:
        f.write(to_markdown(rows, args.device, args.note or "-", meta, unavailable, profile))
    with open(base + ".json", "w") as f:
        json.dump(dict(meta, note=args.note, rows=rows, unavailable=dict(unavailable), profile=profile), f,
                  indent=1)
    print(f"wrote {base}.md and {base}.json")


if __name__ == "__main__":
    main()
