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
