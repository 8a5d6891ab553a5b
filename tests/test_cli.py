"""The simclr-ext command line, run in-process through cli.main."""
import json

import pytest

from simclr_ext import cli

TINY = ["--epochs", "1", "--batch-size", "256", "--width", "4", "--proj-dim", "16", "--knn-every", "0",
        "--no-progress", "--device", "cpu"]


def test_info_prints_json(capsys):
    assert cli.main(["info"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out), dict)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    assert cli.main(["pretrain", *TINY, "--fewshot-draws", "1", "--out", str(out)]) == 0
    return out


def test_pretrain_prints_accuracies_beside_random_init(run_dir, capsys):
    summary = json.load(open(run_dir / "summary.json"))
    text = cli.format_summary(summary, str(run_dir))
    for label, key in [("linear probe top-1", "linear_top1"), ("kNN top-1 (k=200)", "knn_top1"),
                       ("5-per-class probe top-1", "fewshot_top1")]:
        line = next(l for l in text.splitlines() if l.startswith(label))
        assert f"{100 * summary[key]:.2f}%" in line and f"{100 * summary['random_init_' + key]:.2f}%" in line
    assert summary["config"]["epochs"] == 1 and summary["config"]["width"] == 4


def test_linear_eval_and_knn_on_the_checkpoint(run_dir, capsys):
    summary = json.load(open(run_dir / "summary.json"))
    assert cli.main(["linear-eval", "--checkpoint", str(run_dir / "last.pt")]) == 0
    assert f"top-1 {100 * summary['linear_top1']:.2f}%" in capsys.readouterr().out
    assert cli.main(["knn", "--checkpoint", str(run_dir / "last.pt")]) == 0
    assert f"top-1 {100 * summary['knn_top1']:.2f}%" in capsys.readouterr().out


def test_errors_are_one_clear_line(tmp_path, capsys):
    missing = tmp_path / "no-cifar"
    assert cli.main(["pretrain", "--dataset", "cifar10", "--data-dir", str(missing), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "--download" in err and "Traceback" not in err
    assert cli.main(["knn", "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert cli.main(["pretrain", *TINY, "--resume", "--out", str(tmp_path / "fresh")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_bad_flag_values_are_rejected(capsys):
    with pytest.raises(SystemExit):
        cli.main(["pretrain", "--epochs", "many"])
    with pytest.raises(SystemExit):
        cli.main(["pretrain", "--cifar-stem", "maybe"])


def test_no_eval_flag(tmp_path, capsys):
    assert cli.main(["pretrain", *TINY, "--no-eval", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "linear probe" not in out and "final loss" in out
    assert "linear_top1" not in json.load(open(tmp_path / "summary.json"))
