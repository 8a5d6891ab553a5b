"""The benchmark harness of bench_ntxent.py, bench_augment.py and bench_losses.py: machine description,
interleaved timing, peak memory, command-line conventions and the one results format.

Every script measures providers (the fused op and what users run instead) x modes (forward, backward,
full = forward + backward) x metrics (time, peak memory) over its cases, on `--device cpu|cuda`, and
writes one pair of files, benchmarks/results/<op>_<device>_<YYYYMMDD-HHMM>.{md,json}: the same header
(device, git SHA and whether the tree had uncommitted changes, date and time, machine, load average,
command line) and one row per (case, mode, provider) in the JSON, the tables in the markdown.
"""
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
MODES = ("forward", "backward", "full")
METRICS = ("time", "memory")
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------- machine
def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def gpu_driver():
    """The NVIDIA driver version (torch does not expose it): nvidia-smi, else the kernel module's banner."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/driver/nvidia/version") as f:
            words = f.readline().split()
        return next(w for w in words if w[:1].isdigit() and "." in w)
    except (OSError, StopIteration):
        return "unknown"


def _versions():
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for module in ("simclr_ext", "torchvision", "kornia", "lightly", "open_clip", "pytorch_metric_learning"):
        mod = sys.modules.get(module)  # only what this run imported: the versions the numbers depend on
        if mod is not None and getattr(mod, "__version__", None):
            out[module] = str(mod.__version__)
    return out


# --isa: the environment that makes simclr_ext's kernels (csrc/common/simd.h) and torch's own CPU code (ATen's
# vectorized kernels, MKL's and oneDNN's GEMMs) run as on a machine whose best ISA is the one named, so that
# an AVX2-only machine's figures, peers included, can be measured on an AVX-512 one. All read it at load.
ISAS = ("native", "avx512", "avx2", "baseline")
_ISA_ENV = {"SIMCLR_EXT_CPU_ISA": {"avx512": "avx512", "avx2": "avx2", "baseline": "baseline"},
            "ATEN_CPU_CAPABILITY": {"avx512": "avx512", "avx2": "avx2", "baseline": "default"},
            "MKL_ENABLE_INSTRUCTIONS": {"avx512": "AVX512", "avx2": "AVX2", "baseline": "SSE4_2"},
            "ONEDNN_MAX_CPU_ISA": {"avx512": "AVX512_CORE", "avx2": "AVX2", "baseline": "SSE41"}}


def isa_env(isa):
    """The variables --isa sets ({} for native: each library picks the best the CPU runs)."""
    if isa not in ISAS:
        raise SystemExit(f"--isa: must be one of {', '.join(ISAS)}, got {isa!r}")
    return {} if isa == "native" else {var: names[isa] for var, names in _ISA_ENV.items()}


def apply_isa(isa):
    """--isa: re-executes the script with isa_env(isa) unless the environment already holds it (torch and
    MKL are loaded by now and read their variables only at load)."""
    env = isa_env(isa)
    if all(os.environ.get(k) == v for k, v in env.items()):
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, **env))


def isa_info():
    """Which ISA ran: simclr_ext's clone (and the best this CPU runs), ATen's CPU capability and the MKL /
    oneDNN caps in the environment."""
    import simclr_ext

    info = simclr_ext.info()
    out = {"simclr_ext": info["cpu_isa"], "simclr_ext_best": info["cpu_isa_best"]}
    get_capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)  # torch >= 2.0
    out["aten"] = get_capability() if get_capability is not None else "unknown"
    for var in ("MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA"):
        out[var] = os.environ.get(var, "unset")
    return out


def describe_isa(isa):
    forced = " (forced)" if isa["simclr_ext"] != isa["simclr_ext_best"] else ""
    return (f"simclr_ext clone {isa['simclr_ext']}{forced}, the CPU runs up to {isa['simclr_ext_best']}; torch: "
            f"ATen {isa['aten']}, MKL_ENABLE_INSTRUCTIONS={isa['MKL_ENABLE_INSTRUCTIONS']}, "
            f"ONEDNN_MAX_CPU_ISA={isa['ONEDNN_MAX_CPU_ISA']}")


def machine_info(device):
    """What the numbers depend on: CPU model, logical CPUs and torch threads, the ISA the CPU code ran, the GPU
    and its driver (CUDA), library versions. Call it after the providers' modules are imported (their
    versions are listed)."""
    info = {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "isa": isa_info(), "versions": _versions()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}", driver=gpu_driver(),
                    cuda_runtime=torch.version.cuda)
    return info


def describe_machine(info):
    """The machine in one line."""
    text = f"{info['cpu']}, {info['logical_cpus']} logical CPUs"
    if "gpu" in info:
        text += (f"; {info['gpu']} ({info['gpu_memory_gib']} GiB, sm_{info['compute_capability'].replace('.', '')}), "
                 f"driver {info['driver']}, CUDA {info['cuda_runtime']}")
    return text + "; " + ", ".join(f"{k} {v}" for k, v in info["versions"].items())


def git_info():
    """{"sha", "dirty"} of the tree the scripts run from. A copy without .git (the GPU machine's) takes the
    commit from GPU_CHECK_REV and cannot tell whether it was modified (dirty is None)."""
    try:
        sha = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=20).stdout.strip()
        if sha:
            status = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=20).stdout.strip()
            return {"sha": sha, "dirty": bool(status)}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"sha": os.environ.get("GPU_CHECK_REV") or "unknown", "dirty": None}


def describe_git(git):
    state = {True: "with uncommitted changes", False: "clean", None: "no .git: state unknown"}[git["dirty"]]
    return f"{git['sha']} ({state})"


# ----------------------------------------------------------------------------------------------- timing
def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _time_once(fn, device):
    """(wall seconds, process CPU seconds) of one call; on CUDA the wall time is between two CUDA events
    around the call, so it is the GPU's time, not the launch's."""
    c0 = time.process_time()
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, time.process_time() - c0
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def interleaved(fns, reps, device="cpu", deadline=None):
    """Runs every function `reps` times in the order A B C A B C ... so that background load and clock
    changes hit all of them alike. Returns {name: {"wall": [s, ...], "cpu": [s, ...]}}. After the first
    round, stops early once time.perf_counter() passes `deadline` (every list then has as many entries)."""
    times = {name: {"wall": [], "cpu": []} for name in fns}
    for rep in range(reps):
        if rep > 0 and deadline is not None and time.perf_counter() > deadline:
            break
        for name, fn in fns.items():
            sync(device)
            wall, cpu = _time_once(fn, device)
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu)
    return times


def interleaved_medians(fns, reps, device="cpu"):
    """Median wall seconds per function of `interleaved`."""
    return {name: statistics.median(t["wall"]) for name, t in interleaved(fns, reps, device).items()}


# ----------------------------------------------------------------------------------------------- memory
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


def cuda_peak_growth(step):
    """Bytes by which torch.cuda.max_memory_allocated() rose above what was allocated before `step()`:
    what the computation itself needed on the device, inputs excluded."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def probe_in_fresh_process(script, probe_args, threads=1, timeout=3600):
    """Runs `script --probe PROBE_ARGS...` in a new Python process with `threads` threads; returns the
    integers it printed, one per line (bytes of peak growth: a fresh process keeps other measurements'
    high-water marks and allocator caches out of the resident-set peak). Raises with its stderr on failure."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, script, "--probe", *map(str, probe_args)], capture_output=True,
                         text=True, env=env, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe {os.path.basename(script)} {' '.join(map(str, probe_args))} failed: "
                           f"{out.stderr.strip()[-2000:]}")
    return [int(line) for line in out.stdout.split()]


def enter_probe_process():
    """The probe's side of probe_in_fresh_process: run with the thread count it was started with."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


# ------------------------------------------------------------------------------------- differentiable steps
class Step:
    """One provider's call in one mode: `forward` (the loss, no graph kept beyond the call), `backward`
    (the gradients of one loss whose graph `prepare()` built, retained across calls) or `full` (both, as
    one training step does). `fn(*inputs)` returns the scalar loss; gradients are taken with respect to the
    inputs that require them (torch.autograd.grad: nothing accumulates between calls)."""

    def __init__(self, fn, inputs, mode):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.fn, self.inputs, self.mode = fn, inputs, mode
        self.leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
        self.graph = None

    def prepare(self):
        if self.mode == "backward" and self.graph is None:
            self.graph = self.fn(*self.inputs)

    def __call__(self):
        if self.mode == "forward":  # autograd records, as in training: the time of the forward a backward needs
            return self.fn(*self.inputs)
        if self.mode == "full":
            return torch.autograd.grad(self.fn(*self.inputs), self.leaves)
        self.prepare()
        return torch.autograd.grad(self.graph, self.leaves, retain_graph=True)

    def release(self):
        self.graph = None


# -------------------------------------------------------------------------------------- command line
def check_reps(reps, default=None):
    """--reps: `default` when not given (None: the script's own per-case table), else at least 1."""
    reps = default if reps is None else reps
    if reps is not None and reps < 1:
        raise SystemExit(f"--reps: must be >= 1, got {reps}")
    return reps


def parse_list(text, what, known=None, convert=str):
    """A list from '1,2' or the several words of nargs='+' (['1', '2'] or ['1,2']); every value checked
    against `known` when given. Raises SystemExit naming the flag, the bad value and what is known."""
    words = text if isinstance(text, (list, tuple)) else [text]
    values = [v for w in words for v in str(w).split(",") if v]
    if not values:
        raise SystemExit(f"{what}: no value given")
    try:
        values = [convert(v) for v in values]
    except ValueError as e:
        raise SystemExit(f"{what}: {e}") from None
    if known is not None:
        bad = [v for v in values if v not in known]
        if bad:
            raise SystemExit(f"{what}: unknown {bad}; known: {', '.join(map(str, known))}")
    return values


def add_harness_args(parser, providers, modes_help, metrics_help, reps_help):
    """The flags every script takes. --modes and --metrics default to None: the script fills in its own
    (per device) defaults and checks the values with parse_list."""
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--providers", nargs="+", default=list(providers),
                        help=f"subset of {', '.join(providers)} (default: all)")
    parser.add_argument("--modes", nargs="+", help=f"subset of {', '.join(MODES)} (full = forward + backward; "
                                                   f"default: {modes_help})")
    parser.add_argument("--metrics", nargs="+", help=f"subset of time, memory (default: {metrics_help})")
    parser.add_argument("--reps", type=int, default=None, help=reps_help)
    parser.add_argument("--out", default=RESULTS,
                        help="directory of the results, <op>_<device>_<YYYYMMDD-HHMM>.{md,json} (default: "
                             "benchmarks/results)")
    parser.add_argument("--no-write", action="store_true", help="print the tables only, write no file")
    parser.add_argument("--note", default="", help="a line for the results (e.g. what else ran on the machine)")
    parser.add_argument("--isa", default="native", choices=ISAS,
                        help="CPU: run simclr_ext's kernels and torch's (ATen, MKL, oneDNN) as on a CPU whose best "
                             "ISA is this one (default: native, the best this CPU runs); the tables name it")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="time budget: the first case always runs; once spent, stop repeating and skip the "
                             "cases not started (listed in the results); results are written either way")


def check_device(device):
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")


# ---------------------------------------------------------------------------------------------- results
def _utc_now():
    return datetime.datetime.now(datetime.timezone.utc)


def result_paths(out_dir, op, device, when):
    """<out_dir>/<op>_<device>_<YYYYMMDD-HHMM>.{md,json}; a second run in the same minute gets -2, -3, ..."""
    stem = f"{op}_{device}_{when.strftime('%Y%m%d-%H%M')}"
    base, k = os.path.join(out_dir, stem), 1
    while os.path.exists(base + ".md") or os.path.exists(base + ".json"):
        k += 1
        base = os.path.join(out_dir, f"{stem}-{k}")
    return base + ".md", base + ".json"


class Run:
    """One benchmark run: records where and when it started; `finish` writes the results format.

    JSON: {"format", "op", "device", "title", "date_utc", "end_utc", "git": {"sha", "dirty"}, "machine",
    "load_before", "load_after", "command", "settings", "note", "method", "skipped", "rows", ...}; markdown:
    the same header as a list, then the body (the tables)."""

    def __init__(self, op, device, title, script, args, argv=None):
        self.op, self.device, self.title = op, device, title
        self.settings = {k: v for k, v in vars(args).items() if k != "probe"}
        words = [f"benchmarks/{os.path.basename(script)}"] + list(sys.argv[1:] if argv is None else argv)
        self.command = "python " + " ".join(shlex.quote(w) for w in words)
        self.note = getattr(args, "note", "") or ""
        self.started = _utc_now()
        self.load_before = loadavg()
        self.git = git_info()
        self.skipped = []
        self.machine = None

    def header(self):
        """One line for the console when the run starts (machine info is read at the end, see finish)."""
        return (f"{self.op} on {self.device} | git {describe_git(self.git)} | {self.started:%Y-%m-%d %H:%M} UTC | "
                f"load average {self.load_before}")

    def skip(self, what, why):
        self.skipped.append({"what": what, "why": why})
        print(f"{what}: {why}", file=sys.stderr, flush=True)

    def finish(self, rows, body, method=(), out_dir=RESULTS, write=True, extra=None):
        """Writes <op>_<device>_<stamp>.{md,json} under out_dir (unless write is False); returns the
        markdown and the paths written (or None)."""
        ended = _utc_now()
        self.machine = machine_info(self.device)
        data = {"format": FORMAT_VERSION, "op": self.op, "device": self.device, "title": self.title,
                "date_utc": f"{self.started:%Y-%m-%d %H:%M}", "end_utc": f"{ended:%Y-%m-%d %H:%M}",
                "git": self.git, "machine": self.machine, "load_before": self.load_before,
                "load_after": loadavg(), "command": self.command, "settings": self.settings, "note": self.note,
                "method": list(method), "skipped": self.skipped, "rows": rows, **(extra or {})}
        md = self._markdown(data, body)
        if not write:
            return md, None
        os.makedirs(out_dir, exist_ok=True)
        md_path, json_path = result_paths(out_dir, self.op, self.device, self.started)
        with open(md_path, "w") as f:
            f.write(md)
        with open(json_path, "w") as f:
            json.dump(data, f, indent=1, default=str)
        return md, (md_path, json_path)

    @staticmethod
    def _markdown(data, body):
        device = data["machine"].get("gpu", data["machine"]["cpu"])
        lines = [f"# {data['title']}", "",
                 f"- op: {data['op']}; device: {data['device']} ({device})",
                 f"- date: {data['date_utc']} to {data['end_utc'][-5:]} UTC",
                 f"- git: {describe_git(data['git'])}",
                 f"- machine: {describe_machine(data['machine'])}",
                 f"- CPU ISA: {describe_isa(data['machine']['isa'])}",
                 f"- load average (1, 5, 15 min) before / after: {data['load_before']} / {data['load_after']}",
                 f"- command: `{data['command']}`"]
        if data["note"]:
            lines.append(f"- note: {data['note']}")
        lines += [f"- {m}" for m in data["method"]]
        lines += [f"- not run: {s['what']}: {s['why']}" for s in data["skipped"]]
        return "\n".join(lines) + "\n\n" + body.rstrip("\n") + "\n"


def report(md, paths):
    """Prints the results and where they went."""
    print()
    print(md)
    if paths:
        print("wrote " + " and ".join(paths))


# --------------------------------------------------------------------------------------- table helpers
def fmt_ms(seconds):
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}x"


def fmt_mib(x):
    return "-" if x is None else x if isinstance(x, str) else f"{x:.1f}"


def markdown_table(head, body_rows):
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in body_rows]
    return "\n".join(lines)


def median(values):
    return statistics.median(values) if values else None
