"""The configuration of a SimCLR run and the recipe of each dataset, every number cited.

Sources: [paper] Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of
Visual Representations", ICML 2020, arXiv:2002.05709 (section and appendix named at each number);
[repo] github.com/google-research/simclr, its README's CIFAR-10 command (`run.py --train_batch_size=512
--train_epochs=1000 --learning_rate=1.0 --weight_decay=1e-4 --temperature=0.5 --resnet_depth=18
--use_blur=False --color_jitter_strength=0.5`) and run.py's flag defaults; [ours] chosen here, with
the measurement when there is one.

A PretrainConfig leaves most fields None; `resolved()` fills them from the dataset's recipe (or the one
`recipe` names) and checks every field.
"""
import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from ..augment import SimCLRAugment
from . import data as data_lib

__all__ = ["PretrainConfig", "RECIPES", "DATASET_RECIPE", "AUGMENT_PRESETS", "AUGMENT_RECIPES", "PRECISIONS",
           "build_augment"]

PRECISIONS = ("fp32", "bf16", "fp16")

# The recipe each dataset gets when `recipe` is not given.
DATASET_RECIPE = {"digits": "digits", "mnist": "mnist", "cifar10": "cifar10", "cifar100": "cifar100",
                  "stl10": "stl10", "imagefolder": "imagenet"}

# The CIFAR command of [repo]: ResNet-18 with the CIFAR stem ([paper] B.9: 3x3 stride-1 conv1, no
# max-pool), LARS ([paper] sec. 2.2 / B.1; [repo] run.py default optimizer) at lr 1.0 x B/256 (linear
# scaling, [repo] run.py default learning_rate_scaling), batch 512, wd 1e-4, t = 0.5, 1000 epochs,
# 10 warmup epochs ([repo] run.py default warmup_epochs; [paper] sec. 3 "Default setting"). Its
# augmentation (jitter strength 0.5, no blur) is SimCLRAugment's "cifar10" preset.
_CIFAR = dict(arch="resnet18", cifar_stem=True, optimizer="lars", lr=1.0, lr_scaling="linear", batch_size=512,
              weight_decay=1e-4, temperature=0.5, epochs=1000, warmup_epochs=10.0)

RECIPES: Dict[str, dict] = {
    # [ours] tuned on the digits validation split, never the test split (benchmarks/results/
    # train_digits_cpu.md): a small CNN (width 32, global average pooling, no ReLU on the pooled
    # features) with AdamW lr 5e-3 on one CPU thread; SimCLR's LARS recipe targets batches of thousands.
    "digits": dict(arch="small_cnn", width=32, pool=1, final_relu=False, batch_size=128, optimizer="adamw", lr=5e-3,
                   lr_scaling="none", weight_decay=1e-5, temperature=0.5, epochs=100, warmup_epochs=10.0,
                   threads=1),
    # [ours] the digits recipe, untuned on MNIST (28 px, 60k images: more steps per epoch, so fewer epochs).
    "mnist": dict(arch="small_cnn", width=32, pool=1, final_relu=False, batch_size=256, optimizer="adamw", lr=8e-3,
                  lr_scaling="none", weight_decay=1e-5, temperature=0.5, epochs=30, warmup_epochs=2.0, threads=None),
    "cifar10": dict(_CIFAR),
    # [paper] B.9 trains CIFAR-100 as CIFAR-10; [repo] documents the command for CIFAR-10 only.
    "cifar100": dict(_CIFAR),
    # [ours] STL-10 (96 px, 105k images) has no recipe in [paper] or [repo]: the CIFAR command's optimizer
    # settings, the ImageNet stem (96 px is large enough for its stride) and ImageNet-style augmentation
    # with blur (SimCLRAugment's "stl10" preset), 500 epochs.
    "stl10": dict(_CIFAR, cifar_stem=False, epochs=500),
    # [paper] sec. 3 "Default setting": ResNet-50, batch 4096, LARS lr 4.8 = 0.3 x B/256 (linear
    # scaling), wd 1e-6, 100 epochs, linear warmup for the first 10 epochs then cosine decay; t = 0.1:
    # table 5 (best of the temperatures compared) and [repo] run.py's default temperature. Longer runs
    # help (fig. 9, up to 800-1000 epochs): --epochs.
    "imagenet": dict(arch="resnet50", cifar_stem=False, optimizer="lars", lr=0.3, lr_scaling="linear", batch_size=4096,
                     weight_decay=1e-6, temperature=0.1, epochs=100, warmup_epochs=10.0),
    # The small-machine variant of "imagenet" (--recipe imagenet_small): [paper] B.1 finds square-root
    # scaling, lr = 0.075 x sqrt(B), better for small batches and short runs; batch 256 and ResNet-18 are
    # [ours] (one or two GPUs); wd, t, epochs and warmup as "imagenet".
    "imagenet_small": dict(arch="resnet18", cifar_stem=False, optimizer="lars", lr=0.075, lr_scaling="sqrt",
                           batch_size=256, weight_decay=1e-6, temperature=0.1, epochs=100, warmup_epochs=10.0),
}

# The SimCLRAugment presets `augment` may name, and the per-dataset overrides of the dataset's own preset
# (a run that picks another preset with --augment gets that preset as it is, with the dataset's mean/std).
AUGMENT_PRESETS = ("digits", "mnist", "cifar10", "stl10", "imagenet")
AUGMENT_RECIPES: Dict[str, dict] = {
    # [ours] 8x8 digits: crops of at least half the area, near-square, small rotations, mild jitter.
    "digits": dict(scale=(0.5, 1.0), ratio=(0.8, 1.25), rotation_degrees=15.0, jitter_strength=0.5),
}


def build_augment(preset: str, dataset: str, size: int, mean, std) -> SimCLRAugment:
    """The two-view augmentation of a run: SimCLRAugment's `preset` at `size`, normalized with the dataset's
    statistics, with the dataset's recipe overrides (`AUGMENT_RECIPES`) when `preset` is its default."""
    if preset not in AUGMENT_PRESETS:
        raise ValueError(f"augment must be one of {list(AUGMENT_PRESETS)}, got {preset!r}")
    default = data_lib.DEFAULT_AUGMENT.get(dataset)
    overrides = dict(AUGMENT_RECIPES.get(dataset, {})) if preset == default else {}
    return SimCLRAugment.preset(preset, size=size, mean=tuple(mean), std=tuple(std), **overrides)


@dataclass
class PretrainConfig:
    """Everything a pretraining run depends on. Fields left None are resolved from the recipe (`RECIPES`:
    the dataset's, or the one `recipe` names: digits/MNIST train a small CNN with AdamW on a CPU in
    minutes; CIFAR follows the official SimCLR CIFAR-10 command, ImageFolder the paper's ImageNet
    setting) and from the machine."""
    dataset: str = "digits"
    recipe: Optional[str] = None
    data_dir: Optional[str] = None
    download: bool = False
    image_size: Optional[int] = None
    augment: Optional[str] = None
    arch: Optional[str] = None
    width: Optional[int] = None
    pool: Optional[int] = None           # small CNN: output grid side (1 = global average pooling)
    final_relu: Optional[bool] = None    # small CNN: a ReLU after the last conv-BN (the features' sign)
    cifar_stem: Optional[bool] = None
    head: str = "simclr"
    proj_dim: int = 128                  # [paper] sec. 2.1 / B.4: 128-d projection output
    hidden_dim: Optional[int] = None
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    optimizer: Optional[str] = None
    lr: Optional[float] = None
    lr_scaling: Optional[str] = None
    weight_decay: Optional[float] = None
    momentum: float = 0.9                # [repo] run.py momentum default
    warmup_epochs: Optional[float] = None
    temperature: Optional[float] = None
    precision: str = "fp32"
    accum_steps: int = 1
    grad_cache_chunk: Optional[int] = None  # images per chunk of a gradient-cached step (None: uncached)
    sync_bn: bool = True                 # under DDP on CUDA ([paper] sec. 2.2: global BN)
    seed: int = 0
    out: str = "runs/simclr"
    resume: bool = False
    overwrite: bool = False
    device: Optional[str] = None
    num_workers: int = 0
    threads: Optional[int] = None        # torch CPU threads during the run (recipe; None: torch's choice)
    knn_every: int = 20
    checkpoint_every: int = 1
    max_nonfinite_steps: int = 3         # consecutive skipped (NaN / inf) steps before the run stops
    eval: bool = True
    knn_k: int = 200                     # Wu et al. 2018's kNN monitor: k = 200, T = 0.1
    knn_temperature: float = 0.1
    fewshot_shots: int = 5
    fewshot_draws: int = 5
    progress: bool = True

    def recipe_name(self) -> str:
        return self.recipe or DATASET_RECIPE.get(self.dataset, "")

    def resolved(self) -> "PretrainConfig":
        """A copy with every None filled in and every field checked."""
        c = dataclasses.replace(self)
        if c.dataset not in data_lib.DATASETS:
            raise ValueError(f"dataset must be one of {list(data_lib.DATASETS)}, got {c.dataset!r}")
        if c.recipe is not None and c.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {list(RECIPES)}, got {c.recipe!r}")
        c.recipe = c.recipe_name()
        for name, value in RECIPES[c.recipe].items():
            if getattr(c, name) is None:
                setattr(c, name, value)
        if c.cifar_stem is None:
            c.cifar_stem = c.dataset not in ("stl10", "imagefolder") or (c.image_size or 224) <= 64
        c.device = c.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if c.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {c.precision!r}")
        if c.precision == "fp16" and not c.device.startswith("cuda"):
            raise ValueError(f"precision 'fp16' needs a CUDA device (got device {c.device!r}); use bf16 on the CPU")
        if c.augment is not None and c.augment not in AUGMENT_PRESETS:
            raise ValueError(f"augment must be one of {list(AUGMENT_PRESETS)}, got {c.augment!r}")
        if c.resume and c.overwrite:
            raise ValueError("resume and overwrite exclude each other: continue the run or start it over")
        c.pool = 2 if c.pool is None else c.pool          # the ResNets ignore them; filled for the checkpoint
        c.final_relu = True if c.final_relu is None else c.final_relu
        c.width = 32 if c.width is None else c.width
        c.warmup_epochs = 10.0 if c.warmup_epochs is None else c.warmup_epochs
        if c.pool < 1:
            raise ValueError(f"pool must be >= 1, got {c.pool}")
        if c.threads is not None and c.threads < 1:
            raise ValueError(f"threads must be >= 1, got {c.threads}")
        for name in ("epochs", "batch_size", "accum_steps", "checkpoint_every", "max_nonfinite_steps"):
            if getattr(c, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(c, name)}")
        if c.grad_cache_chunk is not None and c.grad_cache_chunk < 1:
            raise ValueError(f"grad_cache_chunk must be >= 1 (images per chunk) or None, got {c.grad_cache_chunk}")
        if c.batch_size % c.accum_steps:
            raise ValueError(f"batch_size ({c.batch_size}) must be divisible by accum_steps ({c.accum_steps})")
        if c.temperature <= 0 or c.lr < 0 or c.warmup_epochs < 0:
            raise ValueError("need temperature > 0, lr >= 0, warmup_epochs >= 0; "
                             f"got {c.temperature}, {c.lr}, {c.warmup_epochs}")
        return c
