"""The simclr-ext command line, run in-process through cli.main: what it prints and its exit codes."""
import importlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from simclr_ext.recipe import cli

TINY = ["--epochs", "1", "--batch-size", "256", "--width", "4", "--proj-dim", "16", "--knn-every", "0",
        "--no-progress", "--device", "cpu"]


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository


def _resolve(dotted):
    """The object a dotted name such as simclr_ext.recipe.recipes.RECIPES names (longest importable module
    prefix, then attributes)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_info_prints_json(capsys):
    assert cli.main(["info"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out), dict)


def test_python_dash_m_runs_the_cli():
    import simclr_ext

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python"),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "simclr_ext", "info"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["version"] == simclr_ext.__version__
    proc = subprocess.run([sys.executable, "-m", "simclr_ext", "pretrain", "--batch-size", "0"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "batch_size" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("command", [[], ["pretrain"], ["linear-eval"], ["knn"], ["export"], ["info"]],
                         ids=lambda c: c[0] if c else "top")
def test_module_paths_in_the_help_resolve(command, capsys):
    """Every simclr_ext.* name the help points users to can be imported (guards against moved modules)."""
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "--help"])
    assert exit_.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    named = set(re.findall(r"simclr_ext(?:\.\w+)+", help_text))
    if command == ["pretrain"]:
        assert "simclr_ext.recipe.recipes.RECIPES" in named
    for dotted in named:
        assert _resolve(dotted) is not None, dotted


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    capture = pytest.MonkeyPatch()
    import io
    import sys

    buffer = io.StringIO()
    capture.setattr(sys, "stdout", buffer)
    try:
        assert cli.main(["pretrain", *TINY, "--fewshot-draws", "1", "--out", str(out)]) == 0
    finally:
        capture.undo()
    return out, buffer.getvalue()


def test_pretrain_prints_accuracies_beside_random_init(run_dir):
    out, printed = run_dir
    summary = json.load(open(out / "summary.json"))
    for label, key in [("linear probe top-1", "linear_top1"), ("kNN top-1 (k=200)", "knn_top1"),
                       ("5-per-class probe top-1", "fewshot_top1")]:
        line = next(l for l in printed.splitlines() if l.startswith(label))
        assert f"{100 * summary[key]:.2f}%" in line and f"{100 * summary['random_init_' + key]:.2f}%" in line
    assert "held-out split (540 images)" in printed and f"summary: {out}/summary.json" in printed
    val_line = next(l for l in printed.splitlines() if l.startswith("validation split (250 images)"))
    assert f"{100 * summary['validation_knn_top1']:.2f}%" in val_line
    assert summary["config"]["epochs"] == 1 and summary["config"]["width"] == 4


def test_linear_eval_and_knn_on_the_checkpoint(run_dir, capsys):
    out, _ = run_dir
    summary = json.load(open(out / "summary.json"))
    assert cli.main(["linear-eval", "--checkpoint", str(out / "last.pt")]) == 0
    assert f"top-1 {100 * summary['linear_top1']:.2f}%" in capsys.readouterr().out
    assert cli.main(["knn", "--checkpoint", str(out / "last.pt")]) == 0
    assert f"top-1 {100 * summary['knn_top1']:.2f}%" in capsys.readouterr().out


def test_export_writes_the_encoder_alone(run_dir, tmp_path, capsys):
    from simclr_ext.recipe.checkpoint import load_encoder, load_pretrained

    out, _ = run_dir
    assert cli.main(["export", "--checkpoint", str(out / "last.pt"), "--out", str(tmp_path / "enc.pt")]) == 0
    printed = capsys.readouterr().out
    assert "written to" in printed
    assert _resolve(re.search(r"load with (simclr_ext[\w.]*\w)", printed).group(1)) is load_encoder
    saved = torch.load(tmp_path / "enc.pt", weights_only=True)
    assert set(saved) == {"format", "encoder", "settings"} and not any(k.startswith("head") for k in saved["encoder"])
    encoder, settings = load_encoder(str(tmp_path / "enc.pt"))
    model, _ = load_pretrained(str(out / "last.pt"))
    x = torch.randn(3, 1, settings["image_size"], settings["image_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(encoder(x), model.encoder(x))
    assert settings["mean"] == [0.3] and settings["feature_dim"] == encoder(x).shape[1]


def test_errors_are_one_clear_line_with_exit_code_2(run_dir, tmp_path, capsys):
    out, _ = run_dir
    missing = tmp_path / "no-cifar"
    assert cli.main(["pretrain", "--dataset", "cifar10", "--data-dir", str(missing), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "--download" in err and "Traceback" not in err
    assert cli.main(["knn", "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert cli.main(["pretrain", *TINY, "--resume", "--out", str(tmp_path / "fresh")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    # a truncated checkpoint: one line naming the file and what is wrong
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes((out / "last.pt").read_bytes()[:4096])
    for command in (["linear-eval", "--checkpoint", str(damaged)], ["export", "--checkpoint", str(damaged), "--out",
                                                                    str(tmp_path / "x.pt")]):
        assert cli.main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(damaged) in err and "damaged" in err
    # a foreign file
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    assert cli.main(["knn", "--checkpoint", str(foreign)]) == 2
    assert "not a simclr_ext.pretrain/1 checkpoint" in capsys.readouterr().err
    # an existing run directory is not overwritten silently
    assert cli.main(["pretrain", *TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds a checkpoint" in err and "--overwrite" in err and err.count("\n") == 1


def test_bad_flag_values_are_rejected(capsys):
    with pytest.raises(SystemExit):
        cli.main(["pretrain", "--epochs", "many"])
    with pytest.raises(SystemExit):
        cli.main(["pretrain", "--cifar-stem", "maybe"])
    assert "invalid" in capsys.readouterr().err


def test_no_eval_flag(tmp_path, capsys):
    assert cli.main(["pretrain", *TINY, "--no-eval", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "linear probe" not in out and "final loss" in out
    assert "linear_top1" not in json.load(open(tmp_path / "summary.json"))
