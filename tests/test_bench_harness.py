"""The benchmark harness (benchmarks/common.py) and the scripts on it, on tiny sizes (their contract, never
their timings): the one results format and naming scheme, one row per (case, mode, provider) with the
ratios the tables print, the GEMM floor's products per mode, the modes of a differentiable step, and
arguments that name what they got."""
import argparse
import json
import os
import re
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_grad_cache  # noqa: E402
import bench_losses  # noqa: E402
import bench_ntxent  # noqa: E402
import bench_transform_workers  # noqa: E402
import common  # noqa: E402

STAMP = re.compile(r"^(?P<op>[a-z_]+)_(?P<device>cpu|cuda)_(?P<stamp>\d{8}-\d{4})(-\d+)?\.(md|json)$")


def _results(out_dir):
    files = sorted(os.listdir(out_dir))
    assert len(files) == 2 and all(STAMP.match(f) for f in files), files
    js, md = (os.path.join(out_dir, f) for f in files)  # .json sorts before .md
    with open(js) as f:
        data = json.load(f)
    with open(md) as f:
        text = f.read()
    assert STAMP.match(os.path.basename(md)).group("stamp") == data["date_utc"].replace("-", "").replace(
        " ", "-").replace(":", "")
    return text, data


def _check_header(text, data, op, device):
    """What every results file carries: op, device, date, git SHA and state, machine, load, command."""
    assert data["format"] == common.FORMAT_VERSION and data["op"] == op and data["device"] == device
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", data["date_utc"]) and data["end_utc"] >= data["date_utc"]
    assert re.fullmatch(r"[0-9a-f]{12}", data["git"]["sha"]) and data["git"]["dirty"] in (True, False)
    assert data["machine"]["cpu"] and data["machine"]["versions"]["torch"] == torch.__version__
    assert data["command"].startswith(f"python benchmarks/bench_{op}.py")
    import simclr_ext

    isa = data["machine"]["isa"]  # the clone that ran, named in the header
    assert isa["simclr_ext"] == simclr_ext.info()["cpu_isa"]
    assert isa["simclr_ext_best"] in ("avx512", "avx2", "baseline")
    assert f"- CPU ISA: simclr_ext clone {isa['simclr_ext']}" in text
    for line in (f"- op: {op}; device: {device}", f"- date: {data['date_utc']}", f"- git: {data['git']['sha']}",
                 f"- machine: {data['machine']['cpu']}", f"before / after: {data['load_before']} / ",
                 f"- command: `{data['command']}`"):
        assert line in text, line
    assert data["rows"] and all({"mode", "provider"} <= set(r) for r in data["rows"])


def test_run_writes_the_format_and_never_overwrites(tmp_path):
    args = argparse.Namespace(note="a note", probe=None)
    run = common.Run("ntxent", "cpu", "A title", "bench_ntxent.py", args, ["--sizes", "8"])
    rows = [{"mode": "full", "provider": "fused", "time_s": 0.5}]
    md, paths = run.finish(rows, "| a |\n|---|\n| 1 |", ["method line"], str(tmp_path))
    _, paths2 = run.finish(rows, "body", [], str(tmp_path))  # same minute: a new name, the first kept
    assert [os.path.basename(p) for p in paths2] == [os.path.basename(p).replace(".", "-2.", 1) for p in paths]
    with open(paths[1]) as f:
        data = json.load(f)
    assert md == open(paths[0]).read() and md.startswith("# A title\n\n")
    assert data["rows"] == rows and data["note"] == "a note" and data["settings"] == {"note": "a note"}
    assert "- note: a note\n- method line\n\n| a |" in md
    assert data["command"] == "python benchmarks/bench_ntxent.py --sizes 8"


@pytest.mark.slow
def test_ntxent_rows_ratios_and_tables(tmp_path):
    bench_ntxent.main(["--device", "cpu", "--sizes", "16", "24", "--dims", "8", "--threads", "1", "--reps", "2",
                       "--modes", "backward", "full", "--providers", "plain", "fused", "gemm_floor",
                       "--memory-sizes", "32", "--memory-providers", "fused", "--out", str(tmp_path), "--note", "t"])
    text, data = _results(tmp_path)
    _check_header(text, data, "ntxent", "cpu")
    timed = [r for r in data["rows"] if "time_s" in r]
    assert [(r["two_n"], r["mode"], r["provider"]) for r in timed] == [
        (n, m, p) for n in (16, 24) for m in ("backward", "full") for p in ("plain", "fused", "gemm_floor")]
    assert all(r["time_s"] > 0 and r["reps"] == 2 and r["dtype"] == "fp32" and r["loadavg"] for r in timed)
    by = {(r["two_n"], r["mode"], r["provider"]): r for r in timed}
    for n in (16, 24):
        for m in ("backward", "full"):
            fused, plain, floor = (by[(n, m, p)] for p in ("fused", "plain", "gemm_floor"))
            assert plain["fused_speedup"] == pytest.approx(plain["time_s"] / fused["time_s"])
            assert fused["over_gemm_floor"] == pytest.approx(fused["time_s"] / floor["time_s"])
            passes = {"backward": 2, "full": 3}[m]
            assert fused["tflops"] == pytest.approx(passes * 2 * n * n * 8 / fused["time_s"] / 1e12)
    # memory: the fresh-process probe, at its own sizes, 1 thread; a row per (mode, provider) it measured
    mem = [r for r in data["rows"] if "peak_mib" in r]
    assert sorted((r["two_n"], r["mode"], r["provider"], r["threads"]) for r in mem) == [
        (32, "backward", "fused", 1), (32, "full", "fused", 1)]
    assert all(r["peak_mib"] is not None and r["peak_mib"] >= 0 for r in mem)
    assert "| threads | dtype | D | 2N | mode | reps | plain ms | fused ms | gemm_floor ms | plain / fused | " \
           "fused / gemm_floor | load avg |" in text
    assert "| fp32 | 8 | 32 | full | - | " in text and "- note: t" in text


def test_ntxent_lightly_missing_is_listed_not_fatal(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lightly", None)  # import lightly now raises ImportError
    monkeypatch.setitem(sys.modules, "lightly.loss", None)
    bench_ntxent.main(["--sizes", "8", "--dims", "4", "--threads", "1", "--reps", "1", "--metrics", "time",
                       "--providers", "lightly,fused", "--out", str(tmp_path)])
    text, data = _results(tmp_path)
    assert [r["provider"] for r in data["rows"]] == ["fused"]
    assert data["skipped"] == [{"what": "lightly", "why": "unavailable: lightly is not importable"}]
    assert "- not run: lightly: unavailable" in text


def test_ntxent_max_seconds_skips_and_still_writes(tmp_path):
    bench_ntxent.main(["--sizes", "8,12", "--dims", "4", "--threads", "1", "--reps", "1", "--metrics", "time",
                       "--providers", "fused", "--max-seconds", "0", "--out", str(tmp_path)])
    _, data = _results(tmp_path)  # the first configuration always runs: there is a result to write
    assert [(r["two_n"], r["reps"]) for r in data["rows"]] == [(8, 1)]
    assert data["skipped"] == [{"what": "threads=1 fp32 D=4 2N=12 full", "why": "--max-seconds 0 spent"}]


def test_losses_rows_and_table(tmp_path):
    bench_losses.main(["--device", "cpu", "--cases", "dcl", "supcon", "--rows", "12", "--reps", "1",
                       "--modes", "forward", "full", "--metrics", "time", "--out", str(tmp_path)])
    text, data = _results(tmp_path)
    _check_header(text, data, "losses", "cpu")
    assert [(r["loss"], r["mode"], r["provider"]) for r in data["rows"]] == [
        (c, m, p) for c in ("dcl", "supcon") for m in ("forward", "full") for p in ("fused", "peer")]
    rows = {(r["loss"], r["mode"], r["provider"]): r for r in data["rows"]}
    peer, fused = rows[("dcl", "full", "peer")], rows[("dcl", "full", "fused")]
    assert peer["fused_speedup"] == pytest.approx(peer["time_s"] / fused["time_s"])
    assert peer["peer"] == "lightly" and "12 (--rows)" in peer["case"]
    assert "| loss | peer | case | threads | mode | fused ms | peer ms | speedup |" in text


@pytest.mark.slow
def test_losses_memory_in_a_fresh_process(tmp_path):
    bench_losses.main(["--cases", "dcl", "--rows", "64", "--reps", "1", "--out", str(tmp_path)])
    _, data = _results(tmp_path)
    peer, fused = data["rows"][1], data["rows"][0]
    assert fused["peak_mib"] >= 0 and peer["peak_mib"] > 0
    assert peer["fused_memory_ratio"] == pytest.approx(fused["peak_mib"] / peer["peak_mib"])


@pytest.mark.parametrize("mode", ["forward", "backward", "full"])
def test_gemm_floor_does_the_products_of_its_mode(mode):
    g = torch.Generator().manual_seed(7)
    z = torch.randn(40, 6, generator=g, dtype=torch.float64)
    floor = bench_ntxent.GemmFloor(z, mode, rows=16)  # 40 rows: blocks of 16, 16, 8
    out = floor()
    if mode == "forward":
        assert out is None
    elif mode == "full":  # per block S_b = z_b z^T, then S_b z twice: 2 z z^T z
        torch.testing.assert_close(out, 2 * z @ z.T @ z)
        torch.testing.assert_close(bench_ntxent.gemm_floor_step(z), out)
    else:  # one stand-in score tile for every block
        tile = floor.tile
        assert tile.shape == (16, 40)
        torch.testing.assert_close(out[32:], 2 * tile[:8] @ z)
        torch.testing.assert_close(out[:16], 2 * tile @ z)


def test_step_modes_agree_with_autograd():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, generator=g, requires_grad=True)
    y = torch.randint(3, (5,), generator=g)
    fn = lambda a, labels: torch.nn.functional.cross_entropy(a * 2, labels)  # noqa: E731
    expected = torch.autograd.grad(fn(x, y), [x])
    full, backward = common.Step(fn, (x, y), "full"), common.Step(fn, (x, y), "backward")
    torch.testing.assert_close(full()[0], expected[0])
    backward.prepare()
    graph = backward.graph
    for _ in range(2):  # the kept graph is reused, not rebuilt
        torch.testing.assert_close(backward()[0], expected[0])
    assert backward.graph is graph and x.grad is None
    assert common.Step(fn, (x, y), "forward")().item() == pytest.approx(fn(x, y).item())
    with pytest.raises(ValueError, match="mode must be one of"):
        common.Step(fn, (x, y), "both")


@pytest.mark.parametrize("argv, match", [
    (["--modes", "both"], r"--modes: unknown \['both'\]"),
    (["--providers", "reference"], r"--providers: unknown \['reference'\]; known: plain, lightly, fused"),
    (["--sizes", "7"], "--sizes: every value must be an even number"),
    (["--dims", "x"], "--dims: invalid literal"),
    (["--tf32"], "--tf32: CUDA only"),
    (["--device", "cuda", "--threads", "1"], "--threads: CPU only"),
    (["--reps", "0"], "--reps: must be >= 1, got 0"),
])
def test_ntxent_bad_arguments_name_what_they_got(argv, match, tmp_path):
    with pytest.raises(SystemExit, match=match):
        bench_ntxent.main(argv + ["--out", str(tmp_path)])
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("argv, match", [(["--cases", "clip,nope"], r"--cases: unknown \['nope'\]"),
                                         (["--rows", "1"], "--rows: must be >= 2, got 1")])
def test_losses_bad_arguments_name_what_they_got(argv, match, tmp_path):
    with pytest.raises(SystemExit, match=match):
        bench_losses.main(argv + ["--out", str(tmp_path)])


def test_grad_cache_rows_ratios_and_table(tmp_path):
    bench_grad_cache.main(["--batches", "4", "6", "--chunk", "2", "--uncached-max", "4", "--reps", "1",
                           "--metrics", "time", "--no-warmup", "--out", str(tmp_path)])
    text, data = _results(tmp_path)
    data["rows"] = [dict(r, mode="full") for r in data["rows"]]  # a training step: the one mode
    _check_header(text, data, "grad_cache", "cpu")
    rows = {(r["batch"], r["provider"]): r for r in data["rows"]}
    assert sorted(rows) == [(4, "cached"), (4, "uncached"), (6, "cached"), (6, "uncached")]
    assert rows[(4, "cached")]["time_ratio"] == pytest.approx(rows[(4, "cached")]["time_s"] /
                                                              rows[(4, "uncached")]["time_s"])
    assert rows[(6, "uncached")]["status"].startswith("not run (batch > --uncached-max 4)")
    assert rows[(6, "cached")]["time_s"] > 0 and rows[(4, "cached")]["reps"] == 1  # alone: timed, no probe
    assert "| effective batch | chunk | threads | provider | step s | ms / image |" in text


@pytest.mark.slow
def test_grad_cache_memory_in_a_fresh_process(tmp_path):
    bench_grad_cache.main(["--batches", "6", "--chunk", "3", "--uncached-max", "3", "--metrics", "memory",
                           "--out", str(tmp_path)])
    _, data = _results(tmp_path)
    rows = {(r["batch"], r["provider"]): r for r in data["rows"]}
    assert sorted(rows) == [(3, "cached"), (3, "uncached"), (6, "cached"), (6, "uncached")]  # the chunk added
    one_chunk = rows[(3, "uncached")]["peak_mib"]
    assert one_chunk > 0 and rows[(6, "cached")]["probe_time_s"] > 0
    assert rows[(6, "cached")]["peak_over_one_chunk"] == pytest.approx(rows[(6, "cached")]["peak_mib"] / one_chunk)


@pytest.mark.parametrize("argv, match", [
    (["--modes", "forward"], r"--modes: a training step is forward \+ backward: only full"),
    (["--batches", "1"], "--batches must be >= 2"),
    (["--chunk", "0"], "--chunk >= 1"),
    (["--malloc-mmap-threshold", "-1"], "--malloc-mmap-threshold: must be >= 0 bytes, got -1"),
])
def test_grad_cache_bad_arguments_name_what_they_got(argv, match, tmp_path):
    with pytest.raises(SystemExit, match=match):
        bench_grad_cache.main(argv + ["--out", str(tmp_path)])
    assert not os.listdir(tmp_path)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_ntxent_on_cuda_times_and_measures_every_mode(tmp_path):
    bench_ntxent.main(["--device", "cuda", "--sizes", "64", "--dims", "16", "--dtypes", "bf16", "fp32",
                       "--reps", "2", "--out", str(tmp_path)])
    text, data = _results(tmp_path)
    _check_header(text, data, "ntxent", "cuda")
    assert data["machine"]["gpu"] and data["machine"]["driver"]
    assert {(r["dtype"], r["mode"]) for r in data["rows"]} == {(d, m) for d in ("bf16", "fp32")
                                                               for m in ("forward", "backward", "full")}
    assert all(r["time_s"] > 0 and r["peak_mib"] >= 0 for r in data["rows"] if r["provider"] != "lightly")
    assert "fused TFLOP/s" in text


def test_isa_env_caps_simclr_ext_and_torch_or_names_the_bad_value():
    assert common.isa_env("native") == {}
    env = common.isa_env("avx2")
    assert env == {"SIMCLR_EXT_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                   "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert common.isa_env("baseline")["ATEN_CPU_CAPABILITY"] == "default"
    with pytest.raises(SystemExit, match="--isa: must be one of native, avx512, avx2, baseline, got 'avx3'"):
        common.isa_env("avx3")


@pytest.mark.slow
def test_transform_workers_rows_and_table(tmp_path):
    bench_transform_workers.main(["--images", "4", "--batch", "2", "--workers", "1", "--reps", "1", "--out",
                                  str(tmp_path)])
    text, data = _results(tmp_path)
    _check_header(text, data, "transform_workers", "cpu")
    names = data["providers"]
    assert names[0] == "fused" and set(names) <= {"fused", "lightly"}
    assert [(r["case"], r["workers"], r["provider"]) for r in data["rows"]] == [
        (c, 1, p) for c in ("decoded", "jpeg") for p in names]
    assert all(r["images_per_s"] > 0 and r["images"] == 4 for r in data["rows"])
    assert "| case | workers | images | reps | fused images/s" in text


def test_transform_workers_arguments_name_what_they_got():
    with pytest.raises(SystemExit, match="--workers: every value must be >= 1, got"):
        bench_transform_workers.parse_args(["--workers", "0"])
    with pytest.raises(SystemExit, match="--cases: unknown"):
        bench_transform_workers.parse_args(["--cases", "png"])
