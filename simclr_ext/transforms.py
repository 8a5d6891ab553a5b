"""SimCLR's augmentation as a per-sample torchvision v2 transform, for Dataset / DataLoader pipelines.

    transform = SimCLRTransform(input_size=224)               # lightly's SimCLRTransform argument names
    dataset = torchvision.datasets.ImageFolder(root, transform=transform)
    loader = DataLoader(dataset, batch_size=256, num_workers=8)
    for (x0, x1), labels in loader: ...                       # two (B, C, 224, 224) float batches

Both views of an image come out of one call of the fused CPU op (simclr_ext.augment), with the parameters
of SimCLRAugment's sampler, so a transform and the batch op given the same parameters write the same
pixels. Randomness comes from torch's global generator, which DataLoader seeds differently in every worker.

For augmentation on the GPU instead, keep the images raw in the Dataset and batch them with
`ragged_collate` (a list of (C, H_i, W_i) uint8 tensors that SimCLRAugment accepts directly).

Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020.
"""
import math
import numbers
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import PIL.Image
import torch
from torch.utils.data import default_collate, get_worker_info
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms.v2._utils import is_pure_tensor

from .augment import IMAGENET_MEAN, IMAGENET_STD, AugmentParams, SimCLRAugment, augment

__all__ = ["SimCLRTransform", "ragged_collate"]

IMAGENET_NORMALIZE = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}

# PIL modes read as they are, and the ones with an unambiguous conversion; anything else (RGBA, CMYK,
# 16-bit, float) is refused rather than guessed.
_PIL_MODES = {"L": "L", "RGB": "RGB", "1": "L", "P": "RGB"}


def _prob(name, p):
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


def _rotation_range(rr_degrees) -> Optional[Tuple[float, float]]:
    """lightly's rr_degrees: None (a quarter turn), d (uniform in [-d, d]) or (min, max)."""
    if rr_degrees is None:
        return None
    if isinstance(rr_degrees, numbers.Real) and not isinstance(rr_degrees, bool):
        lo, hi = -float(rr_degrees), float(rr_degrees)
    elif isinstance(rr_degrees, (tuple, list)) and len(rr_degrees) == 2 \
            and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in rr_degrees):
        lo, hi = float(rr_degrees[0]), float(rr_degrees[1])
    else:
        raise TypeError(f"rr_degrees must be None, a number or a (min, max) pair, got {rr_degrees!r}")
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"rr_degrees must be a finite range with min <= max, got {rr_degrees!r}")
    return lo, hi


def _normalization(normalize):
    if normalize is None:
        return None, None
    if not isinstance(normalize, dict) or set(normalize) != {"mean", "std"}:
        raise TypeError(f"normalize must be None or a dict with 'mean' and 'std' (lightly's form), got {normalize!r}")
    return tuple(normalize["mean"]), tuple(normalize["std"])


class SimCLRTransform(v2.Transform):
    """Two SimCLR views of one image, for a Dataset's `transform=` or a `v2.Compose` (as its last step).

    Input: a PIL image (mode L, RGB, 1 or P), a (C, H, W) tensor (uint8, or float in [0, 1]; C = 1 or 3) or
    a `tv_tensors.Image`. Output: a list [view0, view1] of (C, *size) float tensors (tv_tensors.Image for a
    tv_tensors.Image input), as lightly's SimCLRTransform returns. Inside a (sample, target) structure only
    the image is transformed. A one-channel image under a three-channel `normalize` is read as RGB (the
    gray value in every channel, as PIL's convert("RGB") does); with normalize=None or a one-value mean and
    std it stays one channel.

    lightly's argument names, with lightly's defaults (the SimCLR paper's ImageNet pipeline):
        input_size: output side (int) or (H, W); 224.
        cj_prob: probability of colour jitter, 0.8. cj_strength: its strength s (brightness, contrast and
            saturation 0.8 s, hue 0.2 s), 1.0; at most 1.25 (brightness factors stay >= 0).
        min_scale: smallest crop area fraction, 0.08 (crop aspect ratio 3/4 to 4/3).
        random_gray_scale: probability of grayscale, 0.2.
        gaussian_blur: probability of blur, 0.5, kernel ~10% of the side; sigmas: its sigma range, (0.1, 2).
        hf_prob: probability of a horizontal flip, 0.5.
        rr_prob: probability of a rotation, 0. rr_degrees: None (a quarter turn, 90 degrees counter-
            clockwise, lightly's default), d (uniform in [-d, d]) or (min, max); nearest, fill 0.
        normalize: {"mean": [...], "std": [...]} (ImageNet's) or None.
    Any other keyword goes to `SimCLRAugment` (e.g. ratio, blur_kernel, solarize_p, out_dtype). lightly's
    cj_bright / cj_contrast / cj_sat / cj_hue and vf_prob have no counterpart (the sampler draws the three
    factors from one range; there is no vertical flip) and are not accepted.

    Differences from lightly's pipeline are SimCLRAugment's: the resize is bilinear without antialiasing,
    and the jitter order is random per sample (torchvision's ColorJitter).

    Threads: in a DataLoader worker the op runs on one thread (the worker's torch thread count is set to 1,
    as DataLoader itself does), so W workers use W cores, not W x cores.
    """

    _transformed_types = (PIL.Image.Image, tv_tensors.Image, is_pure_tensor)

    def __init__(self, input_size: Union[int, Tuple[int, int]] = 224, cj_prob: float = 0.8, cj_strength: float = 1.0,
                 min_scale: float = 0.08, random_gray_scale: float = 0.2, gaussian_blur: float = 0.5,
                 sigmas: Tuple[float, float] = (0.1, 2.0), hf_prob: float = 0.5, rr_prob: float = 0.0,
                 rr_degrees: Optional[Union[float, Tuple[float, float]]] = None,
                 normalize: Optional[Dict[str, Sequence[float]]] = IMAGENET_NORMALIZE, **augment_kwargs: Any):
        super().__init__()
        for name in ("size", "scale", "flip_p", "rotation_degrees", "jitter_strength", "jitter_p", "grayscale_p",
                     "blur_p", "blur_sigma", "mean", "std", "layout"):
            if name in augment_kwargs:
                raise TypeError(f"SimCLRTransform takes lightly's argument names; {name!r} is set by them "
                                "(input_size, min_scale, hf_prob, rr_prob/rr_degrees, cj_strength, cj_prob, "
                                "random_gray_scale, gaussian_blur, sigmas, normalize)")
        if not isinstance(min_scale, numbers.Real) or not 0.0 < float(min_scale) <= 1.0:
            raise ValueError(f"min_scale must be in (0, 1], got {min_scale!r}")
        mean, std = _normalization(normalize)
        self.rr_prob = _prob("rr_prob", rr_prob)
        self.rr_range = _rotation_range(rr_degrees)
        # Rotation is drawn here (lightly's probability and range); the sampler's own rotation stays off.
        self.augment = SimCLRAugment(size=input_size, scale=(float(min_scale), 1.0), flip_p=hf_prob,
                                     jitter_strength=cj_strength, jitter_p=cj_prob, grayscale_p=random_gray_scale,
                                     blur_p=gaussian_blur, blur_sigma=tuple(sigmas), mean=mean, std=std,
                                     **augment_kwargs)

    def extra_repr(self) -> str:
        return f"{self.augment.extra_repr()}, rr_prob={self.rr_prob}, rr_range={self.rr_range}"

    def check_inputs(self, flat_inputs: List[Any]) -> None:
        for inpt in flat_inputs:
            if isinstance(inpt, (tv_tensors.Video, tv_tensors.BoundingBoxes, tv_tensors.Mask)):
                raise TypeError(f"SimCLRTransform augments one image; {type(inpt).__name__} inputs are not supported")

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        """{"params": AugmentParams of the two views (view 0, view 1)}, drawn from torch's global generator."""
        if len(flat_inputs) != 1:
            raise ValueError(f"SimCLRTransform augments one image per call, got {len(flat_inputs)} images")
        c, h, w = _chw(flat_inputs[0])
        shape_only = torch.zeros((), dtype=torch.uint8).expand(c, h, w)  # the sampler reads sizes only
        return {"params": self.sample_views(shape_only)}

    def sample_views(self, image: torch.Tensor, generator: Optional[torch.Generator] = None) -> AugmentParams:
        """The parameters of both views of a (C, H, W) image: SimCLRAugment's sampler for the batch
        [image, image], then lightly's random rotation."""
        params = self.augment.sample([image, image], generator)
        if self.rr_prob > 0:
            apply = torch.rand(2, generator=generator) < self.rr_prob
            if self.rr_range is None:
                angle = torch.full((2,), 90.0)
            else:
                lo, hi = self.rr_range
                angle = (lo + (hi - lo) * torch.rand(2, generator=generator, dtype=torch.float64)).float()
            params.angle = torch.where(apply, angle, torch.zeros(2))
        return params

    def transform(self, inpt: Any, params: Dict[str, Any]) -> List[torch.Tensor]:
        image = _to_chw_tensor(inpt)
        _one_thread_in_workers()
        aug = self.augment
        if image.shape[0] == 1 and aug.mean is not None and len(aug.mean) == 3:
            image = image.expand(3, -1, -1)  # a gray image in an RGB pipeline: PIL's convert("RGB")
        views = augment([image, image], params["params"], out_dtype=aug.out_dtype, mean=aug.mean, std=aug.std,
                        solarize_threshold=aug.solarize_threshold, memory_format=aug.memory_format)
        pair = [views[0], views[1]]
        if isinstance(inpt, tv_tensors.Image):
            pair = [tv_tensors.Image(v) for v in pair]
        return pair

    # torchvision < 0.21 calls the private names
    _get_params = make_params
    _transform = transform


def _chw(inpt) -> Tuple[int, int, int]:
    if isinstance(inpt, PIL.Image.Image):
        mode = _pil_mode(inpt)
        return (1 if mode == "L" else 3), inpt.height, inpt.width
    if isinstance(inpt, torch.Tensor):
        if inpt.dim() != 3:
            raise ValueError(f"SimCLRTransform takes one (C, H, W) image, got a tensor of shape {tuple(inpt.shape)}")
        return tuple(inpt.shape)
    raise TypeError(f"SimCLRTransform takes a PIL image, a (C, H, W) tensor or a tv_tensors.Image, "
                    f"got {type(inpt).__name__}")


def _pil_mode(image: PIL.Image.Image) -> str:
    mode = _PIL_MODES.get(image.mode)
    if mode is None:
        raise ValueError(f"PIL images of mode {image.mode!r} are not supported (L, RGB, 1 and P are); convert them "
                         "first, e.g. image.convert('RGB') (which drops an alpha channel)")
    return mode


def _to_chw_tensor(inpt) -> torch.Tensor:
    """(C, H, W) uint8 or float tensor of the input, sharing memory where it can (checks: SimCLRAugment's)."""
    if isinstance(inpt, PIL.Image.Image):
        mode = _pil_mode(inpt)
        return TF.pil_to_tensor(inpt if inpt.mode == mode else inpt.convert(mode))
    _chw(inpt)
    if inpt.device.type != "cpu":
        raise ValueError(f"SimCLRTransform runs in the data pipeline on the CPU, got an image on {inpt.device}; "
                         "use SimCLRAugment for batches on the GPU")
    return inpt.as_subclass(torch.Tensor) if isinstance(inpt, tv_tensors.Image) else inpt


def _one_thread_in_workers() -> None:
    # W DataLoader workers x T intra-op threads would oversubscribe the cores; DataLoader sets 1, but a
    # worker_init_fn may have raised it.
    if get_worker_info() is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def ragged_collate(batch: List[Any]):
    """collate_fn for raw images of different sizes, to augment on the device with SimCLRAugment.

    batch: a list of images (PIL, (C, H, W) tensors, tv_tensors.Image) or of (image, target, ...) tuples.
    Returns a list of (C, H_i, W_i) tensors (PIL images become uint8 tensors), or (that list, the
    default-collated rest...) for tuples. SimCLRAugment takes the list as it is:
    `v1, v2 = aug([im.to(device, non_blocking=True) for im in images])`."""
    if not isinstance(batch, (list, tuple)) or len(batch) == 0:
        raise ValueError(f"batch must be a non-empty list of samples, got {batch!r}")
    if isinstance(batch[0], (tuple, list)):
        images = [_collate_image(sample[0]) for sample in batch]
        rest = [default_collate([sample[i] for sample in batch]) for i in range(1, len(batch[0]))]
        return (images, *rest)
    return [_collate_image(sample) for sample in batch]


def _collate_image(inpt) -> torch.Tensor:
    image = _to_chw_tensor(inpt) if isinstance(inpt, PIL.Image.Image) else inpt
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        raise ValueError(f"ragged_collate takes (C, H, W) images, got {type(inpt).__name__}"
                         f"{' of shape ' + str(tuple(inpt.shape)) if isinstance(inpt, torch.Tensor) else ''}")
    return image.as_subclass(torch.Tensor)
