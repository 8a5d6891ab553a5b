"""Images/second of SimCLR's per-sample transform in DataLoader workers: simclr_ext.SimCLRTransform against
lightly's SimCLRTransform, the same pipeline (lightly's defaults: the paper's ImageNet recipe at 224, two
views) from PIL images, as a Dataset's `transform=` runs it.

    python benchmarks/bench_transform_workers.py                      # --workers 1 2 --images 192 --reps 3
    python benchmarks/bench_transform_workers.py --isa avx2           # as on an AVX2-only CPU

Providers: fused (simclr_ext.SimCLRTransform) and lightly (lightly.transforms.SimCLRTransform; listed as not
run when lightly is not importable). Cases: decoded (PIL images held in memory: the transform alone) and
jpeg (JPEG bytes decoded with PIL in __getitem__, as an image folder does: decode included). Each worker
count runs one DataLoader per provider and case with persistent workers; after one untimed epoch (worker
start-up, first-touch allocations) the timed epochs alternate between providers (A B A B), and the rate is
source images per second of the median epoch (each image gives two views). Per core: 1 worker is one core's
rate; the ratio fused / lightly is the speed-up.
Results: benchmarks/results/transform_workers_cpu_<YYYYMMDD-HHMM>.{md,json} (benchmarks/common.py).
"""
import argparse
import io
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [p for p in (ROOT, os.path.join(ROOT, "python"), os.path.join(ROOT, "benchmarks")) if p not in sys.path]

import common  # noqa: E402

PROVIDERS = ("fused", "lightly")
CASES = ("decoded", "jpeg")
SIZE = 224


def make_transform(name):
    """The provider's transform with lightly's defaults at 224, or None when its package is not importable."""
    if name == "fused":
        from simclr_ext import SimCLRTransform

        return SimCLRTransform(input_size=SIZE)
    try:
        from lightly.transforms import SimCLRTransform
    except Exception:  # not installed (or broken): listed as not run
        return None
    return SimCLRTransform(input_size=SIZE)


def source_images(n, seed=0):
    """n smooth RGB PIL images of ImageNet-like sizes (short side 240 to 400, aspect 3:4 to 4:3): random
    coarse grids upsampled bicubically, so that JPEG sizes and decode times are a photo's, not noise's."""
    import PIL.Image

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        short = int(torch.randint(240, 401, (), generator=g))
        long = int(short * (1 + torch.rand((), generator=g).item() / 3))
        w, h = (long, short) if torch.rand((), generator=g).item() < 0.5 else (short, long)
        coarse = torch.randint(0, 256, (12, 12, 3), generator=g, dtype=torch.uint8).numpy()
        out.append(PIL.Image.fromarray(coarse, "RGB").resize((w, h), PIL.Image.BICUBIC))
    return out


class Images(torch.utils.data.Dataset):
    """(two views, 0) per image: PIL images as they are (decoded) or JPEG bytes decoded here (jpeg)."""

    def __init__(self, images, case, transform):
        self.case, self.transform = case, transform
        if case == "jpeg":
            self.items = []
            for im in images:
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=90)
                self.items.append(buf.getvalue())
        else:
            self.items = images

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        import PIL.Image

        item = self.items[i]
        image = PIL.Image.open(io.BytesIO(item)).convert("RGB") if self.case == "jpeg" else item
        return self.transform(image), 0


def epoch(loader):
    t0 = time.perf_counter()
    n = 0
    for (x0, x1), _ in loader:
        assert x0.shape[-2:] == (SIZE, SIZE) and x1.shape == x0.shape
        n += x0.shape[0]
    return n, time.perf_counter() - t0


def bench(case, workers, names, images, reps, batch):
    """{provider: {"images_per_s", "epoch_s", "reps"}} for one case and worker count, epochs interleaved."""
    loaders = {name: torch.utils.data.DataLoader(Images(images, case, make_transform(name)), batch_size=batch,
                                                 num_workers=workers, persistent_workers=True)
               for name in names}
    for loader in loaders.values():
        epoch(loader)  # untimed: starts the workers
    times = {name: [] for name in names}
    for _ in range(reps):
        for name, loader in loaders.items():
            _, s = epoch(loader)
            times[name].append(s)
    del loaders  # stops the workers
    return {name: {"epoch_s": statistics.median(t), "images_per_s": len(images) / statistics.median(t), "reps": reps}
            for name, t in times.items()}


def to_markdown(rows, names):
    head = ["case", "workers", "images", "reps"] + [f"{p} images/s" for p in names] + \
        (["fused / lightly"] if {"fused", "lightly"} <= set(names) else []) + ["load avg"]
    by = {}
    for r in rows:
        by.setdefault((r["case"], r["workers"]), {})[r["provider"]] = r
    body = []
    for (case, workers), rs in by.items():
        any_row = next(iter(rs.values()))
        cells = [case, workers, any_row["images"], any_row["reps"]]
        cells += [f"{rs[p]['images_per_s']:.1f}" if p in rs else "-" for p in names]
        if {"fused", "lightly"} <= set(names):
            cells.append(common.fmt_ratio(rs["lightly"]["epoch_s"] / rs["fused"]["epoch_s"]))
        cells.append(any_row["loadavg"])
        body.append(cells)
    return common.markdown_table(head, body)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_harness_args(p, PROVIDERS, modes_help="forward, the only one", metrics_help="time",
                            reps_help="timed epochs per provider, interleaved (default: 3)")
    p.add_argument("--workers", nargs="+", help="DataLoader worker counts (default: 1 2)")
    p.add_argument("--cases", nargs="+", help=f"subset of {', '.join(CASES)} (default: both)")
    p.add_argument("--images", type=int, default=192, help="images per epoch (default: 192)")
    p.add_argument("--batch", type=int, default=32, help="DataLoader batch size (default: 32)")
    args = p.parse_args(argv)
    if args.device != "cpu":
        raise SystemExit("--device: DataLoader workers run on the CPU only")
    args.providers = common.parse_list(args.providers, "--providers", PROVIDERS)
    args.cases = common.parse_list(args.cases or list(CASES), "--cases", CASES)
    args.workers = common.parse_list(args.workers or ["1", "2"], "--workers", convert=int)
    if any(w < 1 for w in args.workers):
        raise SystemExit(f"--workers: every value must be >= 1, got {args.workers}")
    if args.images < 1 or args.batch < 1:
        raise SystemExit(f"--images and --batch must be >= 1, got {args.images} and {args.batch}")
    args.reps = common.check_reps(args.reps, 3)
    return args


def main(argv=None):
    args = parse_args(argv)
    common.apply_isa(args.isa)  # re-executes with the --isa environment (the workers inherit it)
    run = common.Run("transform_workers", "cpu", "SimCLR per-sample transform in DataLoader workers: "
                     "simclr_ext.SimCLRTransform vs lightly's SimCLRTransform", __file__, args, argv)
    print(run.header(), flush=True)
    names = []
    for name in args.providers:
        if make_transform(name) is not None:
            names.append(name)
        else:
            run.skip(name, "unavailable: lightly is not importable")
    images = source_images(args.images)
    rows = []
    for workers in args.workers:
        for case in args.cases:
            got = bench(case, workers, names, images, args.reps, args.batch)
            load = common.loadavg()
            for name, r in got.items():
                rows.append({"case": case, "workers": workers, "mode": "forward", "provider": name,
                             "images": args.images, "loadavg": load, **r})
            print(f"{case} workers={workers}: " + ", ".join(f"{n} {r['images_per_s']:.1f} images/s"
                                                          for n, r in got.items()) + f" (load {load})", flush=True)
    method = [f"{SIZE}x{SIZE}, two views per image, lightly's SimCLRTransform defaults for both (crop scale "
              "0.08-1, flip 0.5, jitter 0.8 (0.8, 0.8, 0.8, 0.2), grayscale 0.2, blur 0.5 with sigma 0.1-2, "
              "ImageNet normalization)",
              "sources: smooth synthetic RGB images, short side 240-400 (benchmarks/bench_transform_workers.py); "
              "decoded = PIL images in memory, jpeg = JPEG bytes (quality 90) decoded with PIL in __getitem__",
              f"rate: source images per second of the median of {args.reps} interleaved epochs per provider "
              f"(batch {args.batch}, persistent workers, one untimed epoch first); each worker one thread"]
    md, paths = run.finish(rows, to_markdown(rows, names), method, args.out, not args.no_write,
                           extra={"providers": names})
    common.report(md, paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
