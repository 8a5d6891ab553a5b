"""The augmentation benchmark script's contract (not its timings): results carry the device, date and git
SHA, a provider that cannot be imported is reported as unavailable instead of failing the run (the GPU
machine has no kornia unless its wheels are carried), --max-seconds skips what it cannot afford and still
writes results, and --profile adds the per-stage table."""
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
                        "--repeats", "1", "--out", str(tmp_path), "--note", "test"])
    text, data = _results(tmp_path)
    assert "- kornia: unavailable: kornia is not installed" in text
    assert data["unavailable"] == {"kornia": "unavailable: kornia is not installed"}
    assert [r["provider"] for r in data["rows"]] == ["fused"]
    row = data["rows"][0]
    assert row["images_per_s"] > 0 and row["cpu_s"] >= 0 and row["repeats"] == 1
    for key in ("date", "device_name", "git_sha", "load_before", "load_after"):
        assert data[key] and data[key] != "unknown" or key == "git_sha", key
        assert f"{data[key]}" in text
    assert data["note"] == "test"


def test_max_seconds_skips_cases_and_still_writes(tmp_path):
    bench_augment.main(["--device", "cpu", "--threads", "1", "--cases", "32x32,224x224", "--providers", "fused",
                        "--repeats", "3", "--out", str(tmp_path), "--max-seconds", "0"])
    text, data = _results(tmp_path)
    assert [r["case"] for r in data["rows"]] == ["32x32"] and data["rows"][0]["repeats"] == 1
    assert "224x224 threads=1" in data["unavailable"] and "skipped" in text


def test_profile_table(tmp_path):
    bench_augment.main(["--device", "cpu", "--threads", "1", "--cases", "32x32", "--providers", "fused",
                        "--repeats", "1", "--out", str(tmp_path), "--profile", "--profile-repeats", "1"])
    text, data = _results(tmp_path)
    stages = [r["stage"] for r in data["profile"]]
    assert stages[0].startswith("crop/resample") and "+ 23-tap blur" in stages and len(stages) == 6
    assert all(r["us_per_view"] > 0 for r in data["profile"])
    assert "Where the fused op's time goes" in text


@pytest.mark.parametrize("argv", [["--providers", "fused,nope"], ["--cases", "64x64"]])
def test_bad_arguments_name_what_is_known(argv, tmp_path):
    with pytest.raises(SystemExit, match="known"):
        bench_augment.main(["--device", "cpu", "--out", str(tmp_path)] + argv)
