"""Per-dataset normalization statistics (per-channel mean and std of pixels scaled to [0, 1]).

The one place these numbers live: the augmentation presets, the data splits and the evaluation
transform all read them from here. This module imports nothing, so both the library (augment.py) and
the training recipe can use it without an import cycle.
"""

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD",
           "STL10_MEAN", "STL10_STD", "MNIST_MEAN", "MNIST_STD", "DIGITS_MEAN", "DIGITS_STD", "DATASET_STATS"]

# torchvision's ImageNet statistics (also the usual choice for arbitrary photo folders).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Computed over each training split (the commonly quoted values).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
STL10_MEAN = (0.4467, 0.4398, 0.4066)
STL10_STD = (0.2603, 0.2566, 0.2713)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
# scikit-learn's 8x8 digits (values 0..16 scaled to [0, 1]): mean 0.305, std 0.377 over all 1797 images.
DIGITS_MEAN = (0.3,)
DIGITS_STD = (0.38,)

DATASET_STATS = {
    "digits": (DIGITS_MEAN, DIGITS_STD),
    "mnist": (MNIST_MEAN, MNIST_STD),
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "stl10": (STL10_MEAN, STL10_STD),
    "imagefolder": (IMAGENET_MEAN, IMAGENET_STD),
}
