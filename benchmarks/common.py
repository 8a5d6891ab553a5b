"""Shared helpers of the benchmark scripts: machine description, interleaved timing, result files."""
import datetime
import json
import os
import platform
import statistics
import time

import torch


def machine():
    """One line describing where the numbers were measured."""
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} logical cores, {gpu}, torch {torch.__version__}"


def today():
    return datetime.date.today().isoformat()


def interleaved_medians(fns, reps, sync=lambda: None):
    """Times every function `reps` times in the order A B A B ... (so background load hits all alike);
    returns the median seconds per function."""
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def write_results(out_dir, stem, markdown, data):
    os.makedirs(out_dir, exist_ok=True)
    md_path = os.path.join(out_dir, f"{stem}.md")
    with open(md_path, "w") as f:
        f.write(markdown)
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump(data, f, indent=2)
    return md_path


# ---------------------------------------------------------------------------------------------------
# NT-Xent benchmark providers, shared by the CPU and CUDA tables and the pytest-benchmark suite. Each
# provider is a loss function (z1, z2) -> scalar, except the GEMM floor, which is not a loss.

LOSS_TEMPERATURE = 0.5


def loss_providers():
    """{"plain", "lightly" (when installed), "fused"}: the losses a user would run. The float64 oracle
    (simclr_reference.nt_xent) is for parity, never a speed baseline, and is not among them."""
    import simclr_ext
    import simclr_reference

    providers = {"plain": lambda z1, z2: simclr_reference.nt_xent_plain(z1, z2, LOSS_TEMPERATURE)}
    try:
        from lightly.loss import NTXentLoss
    except Exception:  # not installed (or broken): the column is left out
        pass
    else:
        lightly_loss = NTXentLoss(temperature=LOSS_TEMPERATURE)
        providers["lightly"] = lambda z1, z2: lightly_loss(z1, z2)
    providers["fused"] = lambda z1, z2: simclr_ext.nt_xent(z1, z2, LOSS_TEMPERATURE)
    return providers


GEMM_FLOOR_ROWS = 256  # row tile of the GEMM floor: its score tile stays small (16 MiB at 2N = 16384)


def gemm_floor_step(z):
    """The three GEMM passes of NT-Xent's forward + backward on z (2N, D), tiled by row blocks so that the
    (2N)^2 matrix never exists: per block, the score tile S_b = z_b z^T (forward), then S_b z twice (the
    backward's recompute-free products of the plain formulation: dZ from dS and from dS^T). No softmax,
    no normalization: the bound a fused kernel can approach, measured with the same BLAS."""
    out = torch.empty_like(z)
    for r0 in range(0, z.shape[0], GEMM_FLOOR_ROWS):
        block = z[r0:r0 + GEMM_FLOOR_ROWS]
        s = block @ z.T
        o = out[r0:r0 + GEMM_FLOOR_ROWS]
        torch.mm(s, z, out=o)
        o.addmm_(s, z)
    return out


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_growth(step):
    """Bytes by which the peak resident set grew while `step()` ran (Linux: VmHWM, reset through
    /proc/self/clear_refs first). Call it in a fresh process after a warm-up step, so that one-time
    allocations (thread pools, BLAS buffers) are not counted and the peak belongs to this computation."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) * 1024


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"
