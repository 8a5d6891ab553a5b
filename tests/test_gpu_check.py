"""What of benchmarks/gpu_check.sh can be checked without a GPU: the per-test guard (limits, records,
resumption after a hang), the readers of its report, the wheel checks, and one whole run of the script
with stand-ins for the GPU commands (step caps, a failure, a hang, a timeout, the archive, the summary)."""
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

import gpu_check_report as report  # noqa: E402

# ------------------------------------------------------------------------------------------ the guard
GUARDED = '''
import signal, time

def test_a_passes():
    assert 1 + 1 == 2

def test_b_fails():
    assert [1, 2] == [1, 3], "lists differ"

def test_c_slow_python():
    time.sleep(30)  # interruptible: the soft limit fails it and the run goes on

def test_d_hangs_in_c():
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])  # as a kernel that never returns: no handler runs
    time.sleep(60)

def test_e_after_the_hang():
    assert True
'''


def _run_guarded(tmp_path, records, **env):
    (tmp_path / "test_guarded.py").write_text(GUARDED)
    full = dict(os.environ, PYTHONPATH=BENCH, GPU_GUARD_RECORDS=str(records), GPU_GUARD_TEST_S="1",
                GPU_GUARD_HARD_S="1", PYTHONDONTWRITEBYTECODE="1")
    full.update(env)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "gpu_check_guard", "-p", "no:cacheprovider", "-q",
                           "-c", os.devnull, "--rootdir", str(tmp_path), str(tmp_path / "test_guarded.py")],
                          capture_output=True, text=True, timeout=120, env=full, cwd=tmp_path)


def test_guard_limits_tests_records_them_and_resumes_after_a_hang(tmp_path, capsys):
    records = tmp_path / "records.jsonl"
    t0 = time.time()
    first = _run_guarded(tmp_path, records)
    assert time.time() - t0 < 60, "the hard limit did not end the hung test"
    assert first.returncode != 0
    stacks = (tmp_path / "records.jsonl.stacks.txt").read_text()
    assert "Timeout" in stacks and "in test_d_hangs_in_c" in stacks  # where it hung, from the watchdog
    out = report.test_outcomes(report.read_records(records))
    ids = {k.split("::")[-1]: v for k, v in out.items()}
    assert ids["test_a_passes"][0] == "passed"
    assert ids["test_b_fails"] == ("failed", "AssertionError: lists differ")
    assert ids["test_c_slow_python"][0] == "failed" and "past its 1 s limit" in ids["test_c_slow_python"][1]
    assert ids["test_d_hangs_in_c"][0] == "hung"
    assert "test_e_after_the_hang" not in ids  # the process died before it
    report.report_tests(str(records), first.returncode)
    printed = capsys.readouterr().out
    assert "HUNG test_guarded.py::test_d_hangs_in_c" in printed
    assert re.search(r"\n    Timeout \(0:00:02\)!\n    Thread 0x\w+ \(most recent call first\):\n    File \S+test_guarded.py\", "
                     r"line \d+ in test_d_hangs_in_c\n", printed), printed

    second = _run_guarded(tmp_path, records, GPU_GUARD_RESUME="1")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "1 passed, 4 deselected" in second.stdout
    ids = {k.split("::")[-1]: v for k, v in report.test_outcomes(report.read_records(records)).items()}
    assert ids["test_e_after_the_hang"][0] == "passed" and ids["test_d_hangs_in_c"][0] == "hung"


def test_guard_starts_no_test_past_the_deadline(tmp_path):
    records = tmp_path / "records.jsonl"
    done = _run_guarded(tmp_path, records, GPU_GUARD_DEADLINE=str(time.time() + 2), GPU_GUARD_MIN_START_S="5")
    assert done.returncode == 0, done.stdout + done.stderr
    outcomes = report.test_outcomes(report.read_records(records))
    assert len(outcomes) == 5 and {o for o, _ in outcomes.values()} == {"skipped"}
    assert all("step's time was up" in m for _, m in outcomes.values())


def test_guard_rejects_bad_settings(tmp_path):
    done = _run_guarded(tmp_path, tmp_path / "r.jsonl", GPU_GUARD_TEST_S="soon")
    assert done.returncode != 0 and "GPU_GUARD_TEST_S must be a number of seconds, got 'soon'" in done.stderr


def test_report_of_test_records(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    lines = [{"ev": "start", "id": "t::a"}, {"ev": "end", "id": "t::a", "outcome": "passed", "msg": ""},
             {"ev": "start", "id": "t::b"}, {"ev": "end", "id": "t::b", "outcome": "skipped", "msg": "no lightly"},
             {"ev": "start", "id": "t::c", "limit_s": 60}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"ev": "sta')  # a record cut by a kill
    report.report_tests(str(path), 1)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "1 passed, 1 hung, 1 skipped (pytest exit 1)"
    assert out[1].startswith("HUNG t::c: started, never ended (limit 60 s)")
    assert out[2] == "skipped 1: no lightly"


# ---------------------------------------------------------------------------------------- the readers
LOSS_ROWS = [  # bench_ntxent.py's rows: one per (configuration, mode, provider)
    {"two_n": 16384, "dim": 128, "dtype": "bf16", "mode": "forward", "provider": "fused", "time_s": 0.0005},
    {"two_n": 16384, "dim": 128, "dtype": "bf16", "mode": "full", "provider": "plain", "time_s": 0.00775,
     "fused_speedup": 6.2, "peak_mib": 300.0, "fused_memory_ratio": 0.01},
    {"two_n": 16384, "dim": 128, "dtype": "bf16", "mode": "full", "provider": "fused", "time_s": 0.00125,
     "fused_speedup": 1.0, "peak_mib": 3.0},
    {"two_n": 16384, "dim": 128, "dtype": "bf16", "mode": "full", "provider": "lightly", "status": "OOM"},
    {"two_n": 16384, "dim": 128, "dtype": "bf16", "mode": "full", "provider": "gemm_floor", "time_s": 0.0008,
     "fused_speedup": 0.64},
    {"two_n": 4096, "dim": 128, "dtype": "bf16", "mode": "full", "provider": "plain", "time_s": 0.001,
     "fused_speedup": 2.0},
]


def test_loss_reader_finds_the_target_row_in_any_json(tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "whatever_name.json").write_text(json.dumps({"op": "ntxent", "rows": LOSS_ROWS}))
    (tmp_path / "broken.json").write_text("{")
    report.report_loss(str(tmp_path))
    assert capsys.readouterr().out.strip() == ("bf16 2N=16384 D=128 full: fused 1.250 ms, plain / fused 6.20x, "
                                               "fused / gemm_floor 1.56x, lightly OOM, memory fused / plain 1.00% "
                                               "(6 rows)")
    report.report_loss(str(tmp_path / "sub" / "nothing"))
    assert capsys.readouterr().out.startswith("no result JSON")
    (tmp_path / "sub" / "whatever_name.json").write_text(json.dumps({"rows": LOSS_ROWS[:1] + LOSS_ROWS[-1:]}))
    report.report_loss(str(tmp_path))
    assert capsys.readouterr().out.strip() == "2 rows; no bf16 2N=16384 D=128 full row of the fused provider"


def test_augment_reader_reports_speedups_per_case(tmp_path, capsys):
    rows = [{"case": c, "provider": p, "fused_speedup": s} for c, p, s in
            [("32x32", "fused", 1.0), ("32x32", "tv2", 55.0), ("224x224", "fused", 1.0), ("224x224", "tv2", 80.5),
             ("224x224", "kornia", 24.25)]]
    (tmp_path / "augment_cuda_20261128-1000.json").write_text(json.dumps({"machine": "x", "rows": rows}))
    report.report_augment(str(tmp_path))
    assert capsys.readouterr().out.strip() == "224x224: fused 80.5x tv2, 24.2x kornia; 32x32: fused 55.0x tv2"


def test_build_reader_counts_spills_and_our_warnings(tmp_path, capsys):
    log = tmp_path / "build.log"
    log.write_text(textwrap.dedent("""\
        ptxas info    : Compiling entry function '_Z14forward_kernelIfEvPKT_' for 'sm_90'
        ptxas info    : Function properties for _Z14forward_kernelIfEvPKT_
            0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info    : Compiling entry function '_Z11grad_kernelIfEvPKT_' for 'sm_90'
            16 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
        /work/x/csrc/ntxent/ntxent_cuda.cu(120): warning #177-D: variable "k" was declared but never referenced
        /opt/torch/include/c10/util/Half.h:10: warning: something in torch
        """))
    report.report_build(str(log))
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("ptxas: 2 kernels, 1 with spills, 1 with a stack frame; 1 warnings and 0 errors in our "
                      "sources")
    assert any("ntxent_cuda.cu(120)" in ln for ln in out[1:]) and not any("Half.h" in ln for ln in out)


NCU_CSV = '''==PROF== Connected to process 1 (/usr/bin/python3)
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","1","python3","h","void simclr_ext::normalize_kernel<__nv_bfloat16>(const T1 *, long)","1","7","(256, 1, 1)","(64, 1, 1)","0","9.0","GPU Speed Of Light Throughput","Duration","nsecond","12,000"
"1","1","python3","h","void simclr_ext::forward_kernel<__nv_bfloat16>(const T1 *)","1","7","(256, 1, 1)","(132, 1, 1)","0","9.0","GPU Speed Of Light Throughput","Duration","nsecond","100,000"
"1","1","python3","h","void simclr_ext::forward_kernel<__nv_bfloat16>(const T1 *)","1","7","(256, 1, 1)","(132, 1, 1)","0","9.0","GPU Speed Of Light Throughput","Compute (SM) Throughput","%","61.5"
"1","1","python3","h","void simclr_ext::forward_kernel<__nv_bfloat16>(const T1 *)","1","7","(256, 1, 1)","(132, 1, 1)","0","9.0","Occupancy","Achieved Occupancy","%","23.1"
"2","1","python3","h","void simclr_ext::grad_kernel<__nv_bfloat16>(const T1 *)","1","7","(256, 1, 1)","(132, 1, 1)","0","9.0","GPU Speed Of Light Throughput","Duration","usecond","400"
"2","1","python3","h","void simclr_ext::grad_kernel<__nv_bfloat16>(const T1 *)","1","7","(256, 1, 1)","(132, 1, 1)","0","9.0","Launch Statistics","Registers Per Thread","register/thread","128"
'''


def test_ncu_reader_gives_model_flops_and_the_sections(tmp_path, capsys):
    path = tmp_path / "ncu.csv"
    path.write_text(NCU_CSV)
    kernels = report.parse_ncu_csv(NCU_CSV)
    assert [k for k, _ in kernels][1].endswith("forward_kernel<__nv_bfloat16>(const T1 *)")
    assert kernels[1][1] == {"time": 100.0, "SM %": "61.5", "occ %": "23.1"}
    report.report_ncu(str(path), 16384, 128)
    out = capsys.readouterr().out.splitlines()
    # forward: 2 * 16384^2 * 128 flops in 100 us = 687 TFLOP/s; backward twice that work in 400 us
    assert out[0] == "3 kernels; fwd 100 us 687 TFLOP/s; bwd 400 us 344 TFLOP/s (model flops, 2N=16384 D=128)"
    assert out[2].split()[:2] == ["normalize_kernel", "12.0us"] and out[4].split()[-1] == "128"


# ---------------------------------------------------------------------------------------------- wheels
def _wheel(folder, filename, requires):
    name, version = filename.split("-")[:2]
    with zipfile.ZipFile(folder / filename, "w") as z:
        meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)


def test_wheel_check_against_the_device_list(tmp_path, capsys):
    import gpu_wheels

    kinds = tmp_path / "KINDS.md"
    kinds.write_text("| pip list, as a session saw it | numpy 2.5.2, torch 2.11.0 |\n\nPackages: numpy, pytest, torch.\n")
    good = tmp_path / "good"
    good.mkdir()
    _wheel(good, "kornia-0.9.0-py3-none-any.whl", ["kornia-rs>=0.2.0", "torch>=2.5.1", "numpy>=1.21",
                                                     "pillow; extra == 'image'"])
    _wheel(good, "kornia_rs-0.2.0-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
           ["nvidia-cuda-nvrtc-cu12 ; platform_system == 'Linux' and extra == 'cuda'"])
    assert gpu_wheels.check(str(good), str(kinds)) == []
    bad = tmp_path / "bad"
    bad.mkdir()
    _wheel(bad, "kornia-0.9.0-py3-none-any.whl", ["kornia-rs>=0.3", "torch>=2.12", "einops"])
    _wheel(bad, "kornia_rs-0.2.0-cp311-cp311-manylinux_2_17_x86_64.whl", [])
    _wheel(bad, "kornia_rs-0.1.0-cp312-cp312-macosx_11_0_arm64.whl", [])
    problems = "\n".join(gpu_wheels.check(str(bad), str(kinds)))
    for expected in ["two versions of kornia-rs", "cp311-cp311-manylinux_2_17_x86_64.whl is not a CPython 3.12",
                     "macosx_11_0_arm64.whl is not a CPython 3.12", "needs torch>=2.12, the device has 2.11.0",
                     "needs einops: neither a wheel here nor on the device's list", "needs kornia-rs>=0.3"]:
        assert expected in problems


# ------------------------------------------------------------------------------ the script, end to end
FAKES = {
    # the GPU machine as the script sees it, with the answers a bad day would give
    "env": """case "$1" in nvidia-smi) echo "name, driver_version"; echo "NVIDIA H200, 580.159.04, 143771 MiB";;
              *) echo "python 3.12.3 | torch 2.11.0+cu130 | cuda 13.0 | available True | NVIDIA H200";; esac""",
    "wheels": "echo kornia 0.9.0 kornia_rs 0.2.0",
    "build": """echo "ptxas info    : Compiling entry function '_Z3fwdv' for 'sm_90'"
                echo "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" """,
    "build_info": "echo True sm_90",
    "compute-sanitizer": "echo probe program ok; echo '========= ERROR SUMMARY: 0 errors'",
    "pytest": """rec=$(printf '%s\\n' "$@" | sed -n 's/^GPU_GUARD_RECORDS=//p')
        if printf '%s\\n' "$@" | grep -q '^GPU_GUARD_RESUME=1'; then
          echo '{"ev": "start", "id": "tests/t.py::late"}' >>"$rec"
          echo '{"ev": "end", "id": "tests/t.py::late", "outcome": "passed", "msg": ""}' >>"$rec"; exit 0
        fi
        echo '{"ev": "start", "id": "tests/t.py::ok"}' >>"$rec"
        echo '{"ev": "end", "id": "tests/t.py::ok", "outcome": "passed", "msg": ""}' >>"$rec"
        echo '{"ev": "start", "id": "tests/t.py::bad[bf16]"}' >>"$rec"
        echo '{"ev": "end", "id": "tests/t.py::bad[bf16]", "outcome": "failed", "msg": "AssertionError: max error 0.3"}' >>"$rec"
        echo '{"ev": "start", "id": "tests/t.py::stuck", "limit_s": 60}' >>"$rec"
        echo "Fatal Python error: Aborted"; exit 1""",
    "memcheck": """rec=$(printf '%s\\n' "$@" | sed -n 's/^GPU_GUARD_RECORDS=//p')
        printf '%s\\n' "$@" | grep -qx 'PYTORCH_NO_CUDA_MEMORY_CACHING=1' || { echo "caching allocator on"; exit 3; }
        echo '{"ev": "start", "id": "tests/t.py::small"}' >>"$rec"
        echo '{"ev": "end", "id": "tests/t.py::small", "outcome": "passed", "msg": ""}' >>"$rec"
        echo "========= Invalid __global__ read of size 4 bytes"
        echo "=========     at forward_kernel+0x1a0"
        echo "========= ERROR SUMMARY: 1 error"; exit 99""",
    "racecheck": "sleep 300",
    "bench_loss": """out=$(printf '%s\\n' "$@" | sed -n '/^--out$/{n;p}'); mkdir -p "$out"
        echo '{"rows": [{"two_n": 16384, "dim": 128, "dtype": "bf16", "mode": "full", "provider": "fused", "time_s": 0.0015},
                        {"two_n": 16384, "dim": 128, "dtype": "bf16", "mode": "full", "provider": "plain", "time_s": 0.00825, "fused_speedup": 5.5}]}' >"$out/x.json" """,
    "bench_aug": """echo 'Traceback (most recent call last):'; echo '  File "bench_augment.py", line 3'
        echo 'RuntimeError: CUDA error: an illegal memory access was encountered'; exit 1""",
    "ncu": """if printf '%s\\n' "$@" | grep -q -- --import; then echo "$NCU_CSV"
        elif printf '%s\\n' "$@" | grep -q -- --profile-from-start; then
          rep=$(printf '%s\\n' "$@" | sed -n '/^-o$/{n;p}'); : >"$rep.ncu-rep"
        else echo "Duration 1 us"; fi""",
}


needs_shell = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                 reason="needs bash and timeout")


def _run_script(tmp_path, fakes, scale=0.1):
    """gpu_check.sh with `fakes` (step or tool name -> bash body) standing in for the GPU machine."""
    folder = tmp_path / "fakes"
    folder.mkdir()
    for name, body in fakes.items():
        (folder / name).write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body) + "\n")
        (folder / name).chmod(0o755)
    env = dict(os.environ, OUT=str(tmp_path / "out"), GPU_CHECK_LOGDIR=str(tmp_path / "gpu_check"),
               GPU_CHECK_FAKE_DIR=str(folder), GPU_CHECK_TIME_SCALE=str(scale), GPU_CHECK_REV="abc1234",
               NCU_CSV=NCU_CSV, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(["bash", os.path.join(BENCH, "gpu_check.sh")], capture_output=True, text=True, env=env,
                          timeout=300)


def _rows(summary):
    return {ln.split()[0]: ln.split()[1] for ln in summary.splitlines()
            if ln.split() and ln.split()[0] in ("env", "wheels", "build", "probe", "pytest", "memcheck", "racecheck",
                                                "bench_loss", "bench_aug", "ncu")}


@needs_shell
def test_a_build_error_in_our_sources_is_shown_and_skips_what_needs_the_build(tmp_path):
    fakes = dict(FAKES, build="""echo 'csrc/ntxent/ntxent_cuda.cu(12): error: identifier "foo" is undefined'; exit 1""")
    run = _run_script(tmp_path, fakes)
    assert run.returncode == 1
    summary = (tmp_path / "out" / "summary.txt").read_text()
    rows = _rows(summary)
    assert rows["build"] == "FAILED" and rows["probe"] == "ok"
    assert all(rows[n] == "SKIPPED" for n in ("pytest", "memcheck", "racecheck", "bench_loss", "bench_aug", "ncu"))
    assert 'ntxent_cuda.cu(12): error: identifier "foo" is undefined' in summary
    assert run.stdout.count("--- build (") == 1  # an error in our sources: no second try


@needs_shell
def test_a_build_that_fails_outside_our_sources_is_retried_without_split_compile(tmp_path):
    fakes = dict(FAKES, build="""printf '%s\\n' "$@" | grep -q '^NVCC_APPEND_FLAGS=--split-compile' &&
                                 { echo "nvcc fatal   : Unknown option '--split-compile'"; exit 1; }
                                 echo ok""", racecheck=FAKES["compute-sanitizer"], pytest="exit 0",
                 memcheck="exit 0")
    run = _run_script(tmp_path, fakes)
    assert run.stdout.count("--- build (") == 2
    rows = _rows((tmp_path / "out" / "summary.txt").read_text())
    assert rows["build"] == "ok"
    assert rows["pytest"] == "FAILED" and rows["memcheck"] == "FAILED"  # exit 0 but no test ran: not a pass


@pytest.mark.slow
@needs_shell
def test_whole_run_reports_every_failure_and_stays_in_budget(tmp_path):
    out, logs = tmp_path / "out", tmp_path / "gpu_check"
    budget = 54  # 540 s scaled by 0.1
    t0 = time.time()
    run = _run_script(tmp_path, FAKES)
    took = time.time() - t0
    assert run.returncode == 1, run.stdout + run.stderr
    assert took < budget + 15 + 10, f"ran {took:.0f} s on a {budget} s budget"
    summary = (out / "summary.txt").read_text()
    assert run.stdout.rstrip().endswith(summary.rstrip())  # the summary prints last
    rows = _rows(summary)
    assert rows["env"] == "ok" and rows["build"] == "ok" and rows["probe"] == "ok"
    assert rows["pytest"] == "FAILED" and rows["memcheck"] == "FAILED" and rows["racecheck"] == "TIMEOUT"
    assert rows["bench_loss"] == "ok" and rows["bench_aug"] == "FAILED" and rows["ncu"] in ("ok", "SKIPPED")
    assert "NVIDIA H200 | driver 580.159.04 | torch 2.11.0+cu130 | rev abc1234" in summary
    assert summary.rstrip().splitlines()[-1] == "result: 4 step(s) FAILED or TIMED OUT"  # the table ends it
    # the first failure of each step, readable without the archive
    assert "2 passed, 1 failed, 1 hung" in summary  # the rerun after the crash ran the rest
    assert "FAILED tests/t.py::bad[bf16]: AssertionError: max error 0.3" in summary
    assert "HUNG tests/t.py::stuck" in summary
    assert "ERROR SUMMARY: 1 error" in summary and "Invalid __global__ read of size 4 bytes" in summary
    assert "killed at its cap after 6s" in summary
    assert "RuntimeError: CUDA error: an illegal memory access was encountered" in summary
    assert "bf16 2N=16384 D=128 full: fused 1.500 ms, plain / fused 5.50x (2 rows)" in summary
    # two files come back: the summary and one archive with every log
    assert sorted(os.listdir(out)) == ["gpu_check.tar.gz", "summary.txt"]
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = set(tar.getnames())
    for f in ["env.txt", "build.log", "pytest.log", "pytest_records.jsonl", "memcheck.log", "racecheck.log",
              "bench_loss/x.json", "bench_aug.log", "steps.tsv", "summary.txt"]:
        assert f"gpu_check/{f}" in names, f
    # each step's cap: its wish unless the floors still to come do not fit (scaled by 0.1 here)
    caps = {ln.split("\t")[0]: int(ln.split("\t")[3]) for ln in (logs / "steps.tsv").read_text().splitlines()}
    assert 12 <= caps["build"] < 30  # its wish (30) cut: the later floors (27) are set aside
    assert caps["pytest"] == 15 and caps["racecheck"] == 6  # their wishes: enough was left


@pytest.mark.slow
@needs_shell
def test_dry_run_checks_the_sanitizer_selections_and_the_benchmark_flags(tmp_path):
    """What the GPU run depends on in other files: the sanitized test ids still exist, and the benchmark
    scripts still take the flags and values the script passes. The build is stood in for (CPU build)."""
    folder = tmp_path / "fakes"
    folder.mkdir()
    for name, body in {"build": "echo built", "build_info": "echo False -"}.items():
        (folder / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (folder / name).chmod(0o755)
    env = dict(os.environ, OUT=str(tmp_path / "out"), GPU_CHECK_LOGDIR=str(tmp_path / "gpu_check"),
               GPU_CHECK_FAKE_DIR=str(folder), GPU_CHECK_DRY_RUN="1", PYTHONDONTWRITEBYTECODE="1",
               GPU_CHECK_STEPS="memcheck,racecheck,bench_loss,bench_aug,ncu")
    run = subprocess.run(["bash", os.path.join(BENCH, "gpu_check.sh")], capture_output=True, text=True, env=env,
                         timeout=600)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert run.returncode == 0, summary
    rows = _rows(summary)
    assert all(rows[n] == "DRY" for n in ("build", "memcheck", "racecheck", "bench_loss", "bench_aug", "ncu")), summary
    assert len(re.findall(r"selection collects [1-9]\d* tests", summary)) == 2, summary
