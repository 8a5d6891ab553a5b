"""Checkpoint IO: atomic writes, loads with torch.load(weights_only=True), RNG states as tensors.

A pretraining checkpoint (`last.pt`) is a dict of tensors and plain Python values only: model,
optimizer, scheduler and scaler state dicts, the position in the run, every RNG state (packed into
tensors), the resolved config (a dict of str/int/float/bool/None) and the per-epoch history. So it loads
with `torch.load(weights_only=True)`, which runs no pickled code: a downloaded checkpoint is safe to
open. An exported encoder (`simclr-ext export`) holds the encoder's state dict and the settings needed
to rebuild it.
"""
import dataclasses
import os
import pickle
import random
import tempfile
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .models import build_encoder, build_model

__all__ = ["CheckpointError", "save_checkpoint_atomic", "remove_stale_temporaries", "read_checkpoint", "pack_rng",
           "unpack_rng",
           "load_pretrained", "export_encoder", "load_encoder", "PRETRAIN_FORMAT", "ENCODER_FORMAT"]

PRETRAIN_FORMAT = "simclr_ext.pretrain/1"
ENCODER_FORMAT = "simclr_ext.encoder/1"


class CheckpointError(ValueError):
    """A checkpoint file is damaged, foreign, or of another kind; the message is one line naming it."""


TMP_PREFIX = ".tmp-"  # the temporary files of atomic writes; a process killed mid-write leaves one behind


def save_checkpoint_atomic(state: dict, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace and an fsync of the folder:
    a reader, a crash, a SIGKILL or a power loss never leaves a half-written file under `path` (a kill
    mid-write leaves a `.tmp-*` file beside it, which `remove_stale_temporaries` clears)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    """Makes the rename durable; a no-op where folders cannot be opened for fsync (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: str) -> int:
    """Deletes the `.tmp-*` files that writes killed midway left in `folder`; returns how many. Only for a
    folder no other process is writing to (the run directory, by its rank 0, before training)."""
    removed = 0
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        if name.startswith(TMP_PREFIX):
            os.remove(os.path.join(folder, name))
            removed += 1
    return removed


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:200] + ("..." if len(text) > 200 else "")


def read_checkpoint(path: str, kind: str = PRETRAIN_FORMAT) -> dict:
    """The dict saved at `path`, loaded on the CPU with weights_only=True, checked to be of `kind`.
    Raises FileNotFoundError or CheckpointError with a one-line message naming the file."""
    where = os.path.abspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {where!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"checkpoint {where!r} holds Python objects that safe loading (weights_only=True) "
                              f"refuses: not a simclr_ext checkpoint, or written by an older version "
                              f"({_one_line(e)[:120]})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {where!r} is damaged or not a PyTorch file (truncated or overwritten?): "
                              f"{_one_line(e)}") from None
    found = state.get("format") if isinstance(state, dict) else None
    if found != kind:
        what = f"format {found!r}" if found is not None else f"a {type(state).__name__} without a 'format' entry"
        raise CheckpointError(f"checkpoint {where!r} is not a {kind} checkpoint: it holds {what}")
    return state


# ----- RNG states as tensors ---------------------------------------------------------------------
def pack_rng() -> Dict:
    """torch, CUDA, NumPy and Python RNG states as tensors and plain values (weights_only-loadable)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, words, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(words, dtype=torch.int64), "gauss_next": gauss_next},
    }


def unpack_rng(rng: Dict) -> None:
    """Restore what pack_rng saved (the CUDA states only when CUDA is there)."""
    torch.set_rng_state(rng["torch"].cpu())
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
    n = rng["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = rng["python"]
    random.setstate((p["version"], tuple(int(w) for w in p["state"].tolist()), p["gauss_next"]))


# ----- a pretrained model from its checkpoint ---------------------------------------------------------
def _channels(dataset: str) -> int:
    return 1 if dataset in ("digits", "mnist") else 3


def load_pretrained(checkpoint: str, device: Optional[str] = None):
    """(model in eval mode, resolved PretrainConfig) from a checkpoint written by pretrain."""
    from .recipes import PretrainConfig

    state = read_checkpoint(checkpoint)
    known = {f.name for f in dataclasses.fields(PretrainConfig)}
    cfg = PretrainConfig(**{k: v for k, v in state["config"].items() if k in known})
    cfg.device = device or (cfg.device if torch.cuda.is_available() else "cpu")
    model = build_model(cfg.arch, _channels(cfg.dataset), cfg.width, cfg.cifar_stem, cfg.head, cfg.proj_dim,
                        cfg.hidden_dim, cfg.pool, cfg.final_relu)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {os.path.abspath(checkpoint)!r}: the weights do not fit the model its "
                              f"config describes: {_one_line(e)}") from None
    return model.to(cfg.device).eval(), cfg


def export_encoder(checkpoint: str, out: str) -> Dict:
    """Write the encoder of a pretraining checkpoint alone (state dict + what rebuilds it) to `out`,
    atomically; returns the saved settings. Load it with `load_encoder`."""
    from ..stats import DATASET_STATS

    model, cfg = load_pretrained(checkpoint, "cpu")
    mean, std = DATASET_STATS[cfg.dataset]
    settings = {"arch": cfg.arch, "in_channels": _channels(cfg.dataset), "width": cfg.width,
                "cifar_stem": cfg.cifar_stem, "pool": cfg.pool, "final_relu": cfg.final_relu,
                "feature_dim": int(model.encoder.feature_dim), "dataset": cfg.dataset,
                "image_size": cfg.image_size, "mean": list(mean), "std": list(std)}
    save_checkpoint_atomic({"format": ENCODER_FORMAT, "encoder": model.encoder.state_dict(), "settings": settings}, out)
    return settings


def load_encoder(path: str, device: str = "cpu") -> Tuple[nn.Module, Dict]:
    """(encoder in eval mode, settings) from a file written by export_encoder. The settings hold the
    input size and normalization the encoder was trained with."""
    state = read_checkpoint(path, ENCODER_FORMAT)
    s = state["settings"]
    encoder = build_encoder(s["arch"], s["in_channels"], s["width"], s["cifar_stem"], s["pool"], s["final_relu"])
    encoder.load_state_dict(state["encoder"])
    return encoder.to(device).eval(), s
