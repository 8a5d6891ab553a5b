"""Pure-PyTorch reference implementations: the oracle for simclr_ext's parity tests and the baseline
of its benchmarks. Deliberately naive (the full similarity matrix is built) and never imports simclr_ext.
Everything runs in the dtype it is given, float64 included."""

from .augment import augment
from .loss import contrastive_loss, nt_xent

__all__ = ["augment", "contrastive_loss", "nt_xent"]
