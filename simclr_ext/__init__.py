"""simclr_ext: fused C++/CUDA NT-Xent loss, batched SimCLR augmentations and a training recipe.

The library (ops, losses, augmentations, distributed helpers) is imported here; the training recipe
(simclr_ext.recipe: trainer, datasets, models, CLI) only on first use of one of its names below.

SimCLR: Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020.
"""
from . import ops as ops  # the op wrappers, simclr_ext.ops
from ._version import __version__
from .augment import AugmentParams, SimCLRAugment, augment
from .clip_loss import ClipLoss, clip_loss
from .dcl_loss import DCLLoss, DCLWLoss, dcl_loss, dclw_loss
from .grad_cache import GradCache, cached_contrastive_step
from .info import info
from .loss import NTXentLoss, contrastive_loss, nt_xent
from .ops import set_tf32, tf32_enabled
from .siglip_loss import SigLipLoss, siglip_loss
from .supcon_loss import SupConLoss, supcon_loss

# Imported on first use (PEP 562): the per-sample transform needs torchvision (an optional dependency),
# and the training recipe pulls in the trainer, the datasets and their dependencies.
_LAZY = {
    "SimCLRTransform": "transforms",
    "ragged_collate": "transforms",
    "PretrainConfig": "recipe.recipes",
    "pretrain": "recipe.train",
    "linear_eval": "recipe.train",
    "knn_eval": "recipe.train",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


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
    "SigLipLoss",
    "siglip_loss",
    "SupConLoss",
    "supcon_loss",
    "DCLLoss",
    "DCLWLoss",
    "dcl_loss",
    "dclw_loss",
    "GradCache",
    "cached_contrastive_step",
    "set_tf32",
    "tf32_enabled",
    "PretrainConfig",
    "pretrain",
    "linear_eval",
    "knn_eval",
]
