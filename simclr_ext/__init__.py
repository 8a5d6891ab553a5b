"""simclr_ext: fused C++/CUDA NT-Xent loss, batched SimCLR augmentations and a training recipe.

SimCLR: Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020.
"""
from . import ops
from ._version import __version__
from .augment import AugmentParams, SimCLRAugment, augment
from .clip_loss import ClipLoss, clip_loss
from .dcl_loss import DCLLoss, DCLWLoss, dcl_loss, dclw_loss
from .info import info
from .loss import NTXentLoss, contrastive_loss, nt_xent
from .ops import set_tf32, tf32_enabled
from .supcon_loss import SupConLoss, supcon_loss
from .train import PretrainConfig, knn_eval, linear_eval, pretrain

# The per-sample transform needs torchvision (an optional dependency): imported on first use.
_LAZY = {"SimCLRTransform": "transforms", "ragged_collate": "transforms"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AugmentParams",
    "SimCLRAugment",
    "augment",
    "SimCLRTransform",
    "ragged_collate",
    "__version__",
    "info",
    "NTXentLoss",
    "nt_xent",
    "contrastive_loss",
    "ClipLoss",
    "clip_loss",
    "SupConLoss",
    "supcon_loss",
    "DCLLoss",
    "DCLWLoss",
    "dcl_loss",
    "dclw_loss",
    "set_tf32",
    "tf32_enabled",
    "PretrainConfig",
    "pretrain",
    "linear_eval",
    "knn_eval",
]
