"""On-device training augmentation: jax operations on uint8 (H, W, 3) images computing what torchvision's compute."""

from jaxtl.data.augment.color import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    adjust_sharpness,
    autocontrast,
    equalize,
    invert,
    posterize,
    rgb_to_grayscale,
    solarize,
)
from jaxtl.data.augment.crop import resized_crop, sample_random_resized_crop
from jaxtl.data.augment.erasing import erase, sample_erasing
from jaxtl.data.augment.geometry import affine, hflip, rotate, shear_x, shear_y, translate
from jaxtl.data.augment.jitter import ColorJitterParams, apply_color_jitter, sample_color_jitter
from jaxtl.data.augment.policies import (
    OPS,
    apply_op,
    apply_ops,
    apply_policy,
    sample_auto_augment,
    sample_rand_augment,
    sample_trivial_augment,
)

__all__ = [
    "OPS",
    "affine",
    "apply_op",
    "apply_ops",
    "apply_policy",
    "hflip",
    "resized_crop",
    "rotate",
    "sample_auto_augment",
    "sample_rand_augment",
    "sample_random_resized_crop",
    "sample_trivial_augment",
    "shear_x",
    "shear_y",
    "translate",
    "ColorJitterParams",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "adjust_sharpness",
    "apply_color_jitter",
    "autocontrast",
    "equalize",
    "erase",
    "invert",
    "posterize",
    "rgb_to_grayscale",
    "sample_color_jitter",
    "sample_erasing",
    "solarize",
]
