"""Pure-PyTorch reference implementations, never importing simclr_ext. Everything runs in the dtype it is
given, float64 included.

- `contrastive_loss`, `nt_xent`, `augment`: the oracle of simclr_ext's parity tests, deliberately naive
  (the full similarity matrix is built, the general masked formulation).
- `siglip_loss`: SigLIP's sigmoid loss on the materialized logits (the oracle of SigLipLoss's labels mode).
- `nt_xent_plain`: the baseline of simclr_ext's loss benchmarks, NT-Xent as users write it
  (F.cross_entropy on the masked logits). Never compare speed against the oracle."""

from .augment import augment
from .loss import contrastive_loss, nt_xent, nt_xent_plain, siglip_loss

__all__ = ["augment", "contrastive_loss", "nt_xent", "nt_xent_plain", "siglip_loss"]
