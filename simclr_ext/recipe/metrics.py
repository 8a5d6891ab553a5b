"""What a run writes while it trains: metrics.jsonl, TensorBoard scalars, progress, the loss curve.

metrics.jsonl has one JSON object per line (flushed): step rows {epoch, step, loss, lr}, epoch rows
{kind: "epoch", epoch, step, loss, images_per_s[, knn_top1]} and departure rows {kind: "departure", step,
changes}. On resume the rows past the checkpoint's step are dropped and TensorBoard purges its events
from there (purge_step), so an interrupted and resumed run logs every step once.
"""
import json
import os
import sys
import tempfile
import warnings
from typing import List, Optional

__all__ = ["MetricsLog", "Progress", "plot_curve", "truncate_metrics"]


def _row_step(row: dict) -> Optional[int]:
    return row.get("step")


def truncate_metrics(path: str, step: int, epoch: int) -> int:
    """Keep the rows of `path` up to global step `step` (rows without a step: up to `epoch`), rewritten
    atomically; a torn last line (a kill mid-write) is dropped too. Returns the number of rows dropped."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            s = _row_step(row)
            if (s is not None and s <= step) or (s is None and row.get("epoch", 0) <= epoch):
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".jsonl", dir=os.path.dirname(os.path.abspath(path)))
    with os.fdopen(fd, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)
    return dropped


class MetricsLog:
    """metrics.jsonl and TensorBoard scalars (when tensorboard is installed). `resume_step`: the global
    step of the checkpoint a resumed run starts from (None: a fresh run, the file starts empty)."""

    def __init__(self, out: str, resume_step: Optional[int] = None, resume_epoch: int = 0):
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "metrics.jsonl")
        if resume_step is not None:
            truncate_metrics(path, resume_step, resume_epoch)
        self.f = open(path, "a" if resume_step is not None else "w")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.tb = None
        else:
            # events at or after purge_step (written after the checkpoint by the run that stopped) are dropped
            self.tb = SummaryWriter(os.path.join(out, "tb"),
                                    purge_step=None if resume_step is None else resume_step + 1)

    def write(self, **row):
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()
        if self.tb is not None and "step" in row:
            for k, v in row.items():
                if isinstance(v, float) and k not in ("epoch", "step"):
                    self.tb.add_scalar(f"{row.get('kind', 'step')}/{k}", v, row["step"])

    def close(self):
        self.f.close()
        if self.tb is not None:
            self.tb.close()


class Progress:
    """tqdm's bar on a terminal; one line per epoch otherwise (a log file gets no carriage-return
    updates). Disabled: silent."""

    def __init__(self, total: int, done: int, enabled: bool, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            try:
                from tqdm.auto import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, initial=done, unit="step", dynamic_ncols=True, file=self.stream)

    def step(self, epoch: int, epochs: int, loss: float, lr: float, images_per_s: float):
        if self.bar is not None:
            self.bar.set_description(f"epoch {epoch}/{epochs}")
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", img_s=f"{images_per_s:.0f}")
            self.bar.update(1)

    def epoch(self, row: dict, epochs: int, lr: float):
        if not self.enabled:
            return
        line = (f"epoch {row['epoch']}/{epochs}: loss {row['loss']:.4f}, lr {lr:.3g}, "
                f"{row['images_per_s']:.0f} img/s")
        if "knn_top1" in row:
            line += f", kNN top-1 (validation) {100 * row['knn_top1']:.2f}%"
        if self.bar is not None:
            if "knn_top1" in row:
                self.bar.write(line)
        else:
            print(line, file=self.stream, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def plot_curve(history: List[dict], path: str) -> bool:
    """Loss per epoch, with the kNN monitor on a second axis when it ran. Without matplotlib: a
    warning, no file, False (the run's other outputs are unaffected)."""
    if not history:
        return False
    try:
        import matplotlib
    except ImportError:
        warnings.warn(f"matplotlib is not installed: the training curve {path!r} was not drawn "
                      "(pip install 'simclr_ext[train]'); metrics.jsonl has the numbers", RuntimeWarning, stacklevel=2)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["epoch"] for r in history], [r["loss"] for r in history], color="tab:blue")
    ax.set_xlabel("epoch")
    ax.set_ylabel("NT-Xent loss", color="tab:blue")
    knn = [(r["epoch"], r["knn_top1"]) for r in history if "knn_top1" in r]
    if knn:
        ax2 = ax.twinx()
        ax2.plot(*zip(*knn), "o-", color="tab:orange")
        ax2.set_ylabel("kNN top-1 (validation)", color="tab:orange")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
