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

__all__ = [
    "AugmentParams",
    "SimCLRAugment",
    "augment",
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
