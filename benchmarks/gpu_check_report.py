"""The parts of gpu_check.sh's report that read files: test records, benchmark JSON, build logs, ncu CSV.

    python benchmarks/gpu_check_report.py tests RECORDS.jsonl [--rc RC]
    python benchmarks/gpu_check_report.py build BUILD.log
    python benchmarks/gpu_check_report.py loss DIR
    python benchmarks/gpu_check_report.py augment DIR
    python benchmarks/gpu_check_report.py ncu NCU.csv [--n2 N --dim D]

Each prints one summary line first (the note of the step's row in the summary table), then, when there
is something to read, details (failures, hung tests, the table). Standard library only: it runs on the
GPU machine and here. The benchmark readers find the JSON files in DIR by content, not by name, and read
rows by their fields, so they follow the benchmark scripts when those rename files or add providers.
"""
import argparse
import collections
import csv
import glob
import json
import os
import re
import sys


# ---------------------------------------------------------------------------------------------- tests
def read_records(path):
    """The records written so far, in order; a line cut short by a killed process is ignored."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue  # a line cut short by a killed process
    except FileNotFoundError:
        pass
    return out


def test_outcomes(records):
    """{nodeid: (outcome, message)} in start order; a start with no end is 'hung' (the process died in it)."""
    out = collections.OrderedDict()
    for r in records:
        if r.get("ev") == "start":
            out[r["id"]] = ("hung", f"started, never ended (limit {r.get('limit_s', '?')} s): the process was "
                                    "killed or crashed in this test")
        elif r.get("ev") == "end":
            out[r["id"]] = (r.get("outcome", "?"), r.get("msg", ""))
    return out


def hung_stack(path, nodeid, lines=8):
    """The innermost frames the guard's watchdog dumped for `nodeid` (RECORDS.stacks.txt), main thread first."""
    try:
        text = open(path + ".stacks.txt", errors="replace").read()
    except FileNotFoundError:
        return []
    section = text.split(f"--- {nodeid}\n")[-1] if f"--- {nodeid}\n" in text else ""
    section = section.split("\n--- ")[0].splitlines()
    start = next((i for i, ln in enumerate(section) if ln.startswith(("Timeout", "Fatal Python error"))), None)
    if start is None:
        return []
    main = next((i for i in range(start, len(section)) if section[i].startswith("Current thread")), start + 1)
    return [section[start]] + [ln for ln in section[main:] if ln.strip()][:lines]


def report_tests(path, rc):
    outcomes = test_outcomes(read_records(path))
    counts = collections.Counter(o for o, _ in outcomes.values())
    order = ["passed", "failed", "hung", "skipped"]
    parts = [f"{counts[k]} {k}" for k in order if counts[k]] + [f"{v} {k}" for k, v in counts.items() if k not in order]
    head = ", ".join(parts) if parts else "no test ran"
    print(head + (f" (pytest exit {rc})" if rc not in (None, 0) else ""))
    bad = [(i, o, m) for i, (o, m) in outcomes.items() if o in ("failed", "hung")]
    for nodeid, outcome, msg in bad[:40]:
        print(f"{outcome.upper()} {nodeid}: {msg}")
        if outcome == "hung":
            for ln in hung_stack(path, nodeid):
                print("    " + ln.strip())
    if len(bad) > 40:
        print(f"... and {len(bad) - 40} more (see the records in the archive)")
    reasons = collections.Counter(m for o, m in outcomes.values() if o == "skipped")
    for reason, n in reasons.most_common(5):
        print(f"skipped {n}: {reason}")


# ---------------------------------------------------------------------------------------------- build
_OURS = re.compile(r"csrc/\S+?[(:]\d+")


def report_build(path):
    text = open(path, errors="replace").read()
    lines = text.splitlines()
    ours_warn = [ln for ln in lines if _OURS.search(ln) and "warning" in ln.lower()]
    ours_err = [ln for ln in lines if _OURS.search(ln) and "error" in ln.lower()]
    spills = [ln for ln in lines if re.search(r"\b[1-9]\d* bytes spill (stores|loads)", ln)]
    stack = [ln for ln in lines if re.search(r"\b[1-9]\d* bytes stack frame", ln)]
    kernels = len(re.findall(r"Compiling entry function", text))
    print(f"ptxas: {kernels} kernels, {len(spills)} with spills, {len(stack)} with a stack frame; "
          f"{len(ours_warn)} warnings and {len(ours_err)} errors in our sources")
    for ln in (ours_err + ours_warn + spills)[:15]:
        print(ln[:300])


# -------------------------------------------------------------------------------------------- results
def _json_files(folder):
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "**", "*.json"), recursive=True)):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        rows = data.get("rows") if isinstance(data, dict) else data
        if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
            out.append((path, data, rows))
    return out


def _num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _fmt_ratios(row, keys):
    return ", ".join(f"{k} {row[k]:.2f}" for k in keys if _num(row.get(k)))


def _is_bf16(v):
    return str(v).replace("torch.", "") in ("bfloat16", "bf16")


def report_loss(folder):
    """The target row of bench_ntxent.py: bf16, 2N = 16384, D = 128, full (forward + backward): the fused
    time, each other provider's time over it (fused / gemm_floor for the floor) and the memory ratio."""
    found = _json_files(folder)
    if not found:
        print(f"no result JSON under {folder}")
        return
    rows = [r for _, _, rs in found for r in rs]
    key = [r for r in rows if _is_bf16(r.get("dtype")) and r.get("two_n") == 16384 and r.get("dim") == 128
           and r.get("mode") == "full"]
    fused = next((r for r in key if r.get("provider") == "fused"), None)
    if fused is None:
        print(f"{len(rows)} rows; no bf16 2N=16384 D=128 full row of the fused provider")
        return
    if not _num(fused.get("time_s")):
        print(f"bf16 2N=16384 D=128 full: fused {fused.get('status', 'not timed')} ({len(rows)} rows)")
        return
    parts = [f"fused {fused['time_s'] * 1e3:.3f} ms"]
    for r in key:
        if r is fused or not _num(r.get("fused_speedup")):
            continue
        if r.get("provider") == "gemm_floor":
            parts.append(f"fused / gemm_floor {1 / r['fused_speedup']:.2f}x")
        else:
            parts.append(f"{r.get('provider')} / fused {r['fused_speedup']:.2f}x")
    parts += [f"{r.get('provider')} OOM" for r in key if r.get("status") == "OOM"]
    plain = next((r for r in key if r.get("provider") == "plain"), {})
    if _num(plain.get("fused_memory_ratio")):
        parts.append(f"memory fused / plain {100 * plain['fused_memory_ratio']:.2f}%")
    print(f"bf16 2N=16384 D=128 full: {', '.join(parts)} ({len(rows)} rows)")


def report_augment(folder):
    """Per case: the fused op's speed-up over each other provider (rows carry 'fused_speedup')."""
    found = _json_files(folder)
    rows = [r for _, _, rs in found for r in rs if "provider" in r and "case" in r]
    if not rows:
        print(f"no result JSON under {folder}")
        return
    parts = []
    for case in sorted({r["case"] for r in rows}, key=lambda c: (c != "224x224", c)):
        others = [f"{r['fused_speedup']:.1f}x {r['provider']}" for r in rows
                  if r["case"] == case and r["provider"] != "fused" and _num(r.get("fused_speedup"))]
        parts.append(f"{case}: fused " + (", ".join(others) if others else "(no other provider)"))
    print("; ".join(parts))


# ------------------------------------------------------------------------------------------------ ncu
_WANT = {  # ncu --csv --page details "Metric Name" -> column
    "Duration": "time",
    "Compute (SM) Throughput": "SM %",
    "Memory Throughput": "mem %",
    "DRAM Throughput": "DRAM %",
    "Achieved Occupancy": "occ %",
    "Theoretical Occupancy": "theo occ %",
    "Registers Per Thread": "regs",
}


def _to_us(value, unit):
    scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3,
             "s": 1e6, "second": 1e6}.get(unit.strip().lower())
    return None if scale is None else float(value.replace(",", "")) * scale


def parse_ncu_csv(text):
    """[(kernel, {column: value})] in launch order from `ncu --csv --page details` output."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith('"ID"')), None)
    if start is None:
        return []
    kernels = collections.OrderedDict()
    for row in csv.DictReader(lines[start:]):
        metric = row.get("Metric Name")
        if metric not in _WANT:
            continue
        k = (row.get("ID"), row.get("Kernel Name", "?"))
        entry = kernels.setdefault(k, {})
        if metric == "Duration":
            us = _to_us(row.get("Metric Value", ""), row.get("Metric Unit", ""))
            if us is not None:
                entry["time"] = us
        else:
            entry[_WANT[metric]] = row.get("Metric Value", "").replace(",", "")
    return [(name, vals) for (_, name), vals in kernels.items()]


def _kernel_short(name):
    base = re.sub(r"<.*", "", name)
    base = base.split("(")[0]
    return base.split("::")[-1].replace("void ", "").strip()


def report_ncu(path, n2, dim):
    """One row per profiled kernel; the GEMM-like kernels get FLOP/s from the op's model count:
    the forward does one (2N x D)(D x 2N) product, the backward two (the symmetric path, docs/DESIGN.md
    "Backward"), 2 (2N)^2 D flops each."""
    kernels = parse_ncu_csv(open(path, errors="replace").read())
    if not kernels:
        print("ncu produced no kernel rows")
        return
    gemm_flops = 2.0 * n2 * n2 * dim
    ours = [(n, v) for n, v in kernels if re.search(r"forward|grad|ntxent", n)]
    fwd_us = sum(v.get("time", 0) for n, v in ours if "forward" in n)
    bwd_us = sum(v.get("time", 0) for n, v in ours if "grad" in n)
    parts = []
    if fwd_us:
        parts.append(f"fwd {fwd_us:.0f} us {gemm_flops / (fwd_us * 1e-6) / 1e12:.0f} TFLOP/s")
    if bwd_us:
        parts.append(f"bwd {bwd_us:.0f} us {2 * gemm_flops / (bwd_us * 1e-6) / 1e12:.0f} TFLOP/s")
    print(f"{len(kernels)} kernels; " + ("; ".join(parts) if parts else "no forward/grad kernel found")
          + f" (model flops, 2N={n2} D={dim})")
    cols = ["time", "SM %", "mem %", "DRAM %", "occ %", "theo occ %", "regs"]
    print(f"{'kernel':<28}" + "".join(f"{c:>11}" for c in cols))
    for name, vals in kernels:
        cells = [f"{vals['time']:.1f}us" if "time" in vals else "-"] + [str(vals.get(c, "-")) for c in cols[1:]]
        print(f"{_kernel_short(name)[:27]:<28}" + "".join(f"{c:>11}" for c in cells))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("tests")
    t.add_argument("records")
    t.add_argument("--rc", type=int, default=None)
    sub.add_parser("build").add_argument("log")
    sub.add_parser("loss").add_argument("folder")
    sub.add_parser("augment").add_argument("folder")
    n = sub.add_parser("ncu")
    n.add_argument("csv")
    n.add_argument("--n2", type=int, default=16384)
    n.add_argument("--dim", type=int, default=128)
    a = p.parse_args(argv)
    if a.what == "tests":
        report_tests(a.records, a.rc)
    elif a.what == "build":
        report_build(a.log)
    elif a.what == "loss":
        report_loss(a.folder)
    elif a.what == "augment":
        report_augment(a.folder)
    else:
        report_ncu(a.csv, a.n2, a.dim)
    return 0


if __name__ == "__main__":
    sys.exit(main())
