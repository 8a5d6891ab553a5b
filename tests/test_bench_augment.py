"""The augmentation benchmark script's contract (not its timings): results in the harness's format (device,
date, git SHA: tests/test_bench_harness.py checks the format itself), a provider that cannot be imported
is reported as unavailable instead of failing the run (the GPU machine has no kornia unless its wheels
are carried), --max-seconds skips what it cannot afford and still writes results, --profile adds the
per-stage table and --metrics memory the peak per provider."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_augment  # noqa: E402


def _results(out_dir):
    files = sorted(os.listdir(out_dir))
    md = [f for f in files if f.endswith(".md")]
    js = [f for f in files if f.endswith(".json")]
    assert len(md) == 1 and len(js) == 1, files
    with open(os.path.join(out_dir, md[0])) as f:
        text = f.read()
    with open(os.path.join(out_dir, js[0])) as f:
        data = json.load(f)
    return text, data


def test_missing_provider_is_reported_unavailable(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "kornia", None)  # import kornia now raises ImportError
    bench_augment.main(["--device", "cpu", "--threads", "1", "--cases", "32x32", "--providers", "fused,kornia",
                        "--reps", "1", "--out", str(tmp_path), "--note", "test"])
    text, data = _results(tmp_path)
    assert "- not run: kornia: unavailable: kornia is not installed" in text
    assert data["skipped"] == [{"what": "kornia", "why": "unavailable: kornia is not installed"}]
    assert [r["provider"] for r in data["rows"]] == ["fused"]
    row = data["rows"][0]
    assert row["images_per_s"] > 0 and row["cpu_s"] >= 0 and row["reps"] == 1 and row["mode"] == "forward"
    assert row["images_per_s"] == pytest.approx(row["batch"] / row["time_s"])
    assert "peak_mib" not in row  # memory is not a default metric of this script
    for key in ("date_utc", "load_before", "load_after"):
        assert data[key] and f"{data[key]}" in text, key
    assert data["git"]["sha"] in text and data["machine"]["cpu"] in text
    assert data["op"] == "augment" and data["device"] == "cpu" and data["note"] == "test"


def test_max_seconds_skips_cases_and_still_writes(tmp_path):
    bench_augment.main(["--device", "cpu", "--threads", "1", "--cases", "32x32,224x224", "--providers", "fused",
                        "--reps", "3", "--out", str(tmp_path), "--max-seconds", "0"])
    text, data = _results(tmp_path)
    assert [r["case"] for r in data["rows"]] == ["32x32"] and data["rows"][0]["reps"] == 1
    assert [s["what"] for s in data["skipped"]] == ["224x224 threads=1"]
    assert "- not run: 224x224 threads=1: skipped: --max-seconds 0 spent" in text


def test_profile_table(tmp_path):
    bench_augment.main(["--device", "cpu", "--threads", "1", "--cases", "32x32", "--providers", "fused",
                        "--reps", "1", "--out", str(tmp_path), "--profile", "--profile-repeats", "1"])
    text, data = _results(tmp_path)
    stages = [r["stage"] for r in data["profile"]]
    assert stages[0].startswith("crop/resample") and "+ 23-tap blur" in stages and len(stages) == 6
    assert all(r["us_per_view"] > 0 for r in data["profile"])
    assert "Where the fused op's time goes" in text


@pytest.mark.slow
def test_memory_metric_adds_the_peak_of_each_provider(tmp_path):
    bench_augment.main(["--device", "cpu", "--threads", "1", "--cases", "32x32", "--providers", "fused", "tv2",
                        "--reps", "1", "--out", str(tmp_path), "--metrics", "time", "memory"])
    text, data = _results(tmp_path)
    peaks = {r["provider"]: r["peak_mib"] for r in data["rows"]}
    assert set(peaks) == {"fused", "tv2"} and all(v >= 0 for v in peaks.values())
    # two float32 views of 256 images of 3 x 32 x 32 are 6 MiB: the fused call's peak holds at least those
    assert peaks["fused"] >= 2 * 256 * 3 * 32 * 32 * 4 / 2**20 * 0.9
    assert "peak MiB" in text


@pytest.mark.parametrize("argv, match", [(["--providers", "fused,nope"], "known"), (["--cases", "64x64"], "known"),
                                         (["--modes", "full"], "only a forward"), (["--metrics", "memory"], "time")])
def test_bad_arguments_name_what_is_known(argv, match, tmp_path):
    with pytest.raises(SystemExit, match=match):
        bench_augment.main(["--device", "cpu", "--out", str(tmp_path)] + argv)
