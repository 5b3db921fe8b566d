"""Training augmentation on the device: decoded images on a fixed canvas in, augmented crops out, per sample.

The host ships each decoded image (shorter side at the weights' resize size, from the decoded cache)
at the top-left of a fixed-shape canvas, with its height and width; the device then, per sample and
jit-compiled: crops (RandomResizedCrop, or the eval transform's center crop), flips, applies an
auto-augment policy, jitters colours and erases a box. Every random draw comes from a key that is a
function of (seed, epoch, source index) alone, so a sample is augmented the same way whatever batch,
device count or resume point it lands in.

RandomResizedCrop here samples its box on the decoded image, not on the original file: the box has
the same relative geometry (scale and ratio are fractions), but the pixels it is resampled from were
already resized once, so a box much smaller than the decoded image is upsampled from fewer pixels than
torchvision's crop of the original would be.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.data.augment import color, erasing, geometry, policies

Policy = Literal["none", "trivialaugment", "randaugment", "autoaugment"]
POLICIES: tuple[str, ...] = ("none", "trivialaugment", "randaugment", "autoaugment")
_STREAM = 0xA06  # the device augmentation's own stream of the run seed (the host transforms draw from numpy's)


@dataclasses.dataclass(frozen=True)
class DeviceAugment:
    """What the device does to each training image.

    Attributes:
        crop_size: side of the square output.
        random_resized_crop: torchvision's RandomResizedCrop(crop_size, scale, ratio); otherwise the eval
            transform's center crop.
        flip_p: probability of a horizontal flip.
        policy: an auto-augment policy: TrivialAugmentWide, RandAugment (2 ops, magnitude 9 of 31) or
            AutoAugment's ImageNet policy, with torchvision's augmentation spaces.
        color_jitter: (brightness, contrast, saturation, hue) as torchvision's ColorJitter takes them, or None.
        erasing_p: probability of RandomErasing (scale 0.02-0.33, ratio 0.3-3.3), filled with ``erase_fill``.
        erase_fill: the uint8 colour of an erased box (torchvision erases after normalisation with 0, which is
            the mean colour: the default is the ImageNet mean in uint8).
    """

    crop_size: int
    random_resized_crop: bool = False
    flip_p: float = 0.0
    policy: Policy = "none"
    color_jitter: tuple[float, float, float, float] | None = None
    erasing_p: float = 0.0
    erase_fill: tuple[int, int, int] = (124, 116, 104)
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy {self.policy!r} is not one of {', '.join(POLICIES)}")

    @property
    def is_random(self) -> bool:
        return (
            self.random_resized_crop
            or self.flip_p > 0
            or self.policy != "none"
            or self.color_jitter is not None
            or self.erasing_p > 0
        )


@dataclasses.dataclass(frozen=True)
class CanvasTransform:
    """Host side: a decoded (h, w, 3) uint8 image at the top-left of a zero (H, W, 3) canvas.

    An image larger than the canvas is center-cropped to it first (a panorama keeps its middle); the
    device reads the image's size from :meth:`fitted_size`.
    """

    canvas: tuple[int, int]

    @property
    def output_size(self) -> tuple[int, int]:
        return self.canvas

    def fitted_size(self, height: int, width: int) -> tuple[int, int]:
        return min(height, self.canvas[0]), min(width, self.canvas[1])

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        height, width = image.shape[:2]
        fit_h, fit_w = self.fitted_size(height, width)
        top, left = (height - fit_h) // 2, (width - fit_w) // 2
        out = np.zeros((*self.canvas, 3), np.uint8)
        out[:fit_h, :fit_w] = image[top : top + fit_h, left : left + fit_w]
        return out


def canvas_for(heights: np.ndarray, widths: np.ndarray, resize_size: int) -> tuple[int, int]:
    """The canvas of a split: its largest decoded image, capped at twice the resize size on each side."""
    cap = 2 * resize_size
    return int(min(heights.max(), cap)), int(min(widths.max(), cap))


def _center_crop(canvas: jax.Array, height: jax.Array, width: jax.Array, size: int) -> jax.Array:
    # torchvision's F.center_crop: int(round((h - size) / 2.0)), round half to even as Python's round.
    top = jnp.round((height - size) / 2.0).astype(jnp.int32)
    left = jnp.round((width - size) / 2.0).astype(jnp.int32)
    return jax.lax.dynamic_slice(canvas, (top, left, 0), (size, size, 3))


def augment_one(augment: DeviceAugment, key: jax.Array, canvas: jax.Array, height, width) -> jax.Array:
    """One sample: (H, W, 3) uint8 canvas holding an image of ``height`` x ``width`` -> (crop, crop, 3) uint8."""
    k_crop, k_flip, k_policy, k_jitter, k_erase = jax.random.split(key, 5)
    size = augment.crop_size
    if augment.random_resized_crop:
        top, left, crop_h, crop_w = geometry.sample_random_resized_crop(
            k_crop, height, width, scale=augment.scale, ratio=augment.ratio
        )
        image = geometry.resized_crop(canvas, height, width, top, left, crop_h, crop_w, size)
    else:
        image = _center_crop(canvas, height, width, size)
    if augment.flip_p > 0:
        image = geometry.hflip(image, jax.random.uniform(k_flip) < augment.flip_p)
    if augment.policy != "none":
        image = policies.apply_policy(augment.policy, k_policy, image)
    if augment.color_jitter is not None:
        image = color.apply_color_jitter(image, color.sample_color_jitter(k_jitter, *augment.color_jitter))
    if augment.erasing_p > 0:
        apply, top, left, box_h, box_w = erasing.sample_erasing(k_erase, size, size, p=augment.erasing_p)
        fill = jnp.asarray(augment.erase_fill, jnp.uint8)
        image = jnp.where(apply, erasing.erase(image, top, left, box_h, box_w, fill), image)
    return image


def make_device_augment(augment: DeviceAugment, seed: int):
    """``fn(canvases, sizes, indices, epoch) -> (B, crop, crop, 3) uint8``, jitted.

    ``canvases`` (B, H, W, 3) uint8 from :class:`CanvasTransform`; ``sizes`` (B, 2) int32, each image's
    (height, width) on its canvas; ``indices`` (B,) the source indices (-1: padding, augmented as index 0
    and masked out by the step); ``epoch`` the loader epoch.
    """
    base = jax.random.fold_in(jax.random.key(seed), _STREAM)

    def batch(canvases, sizes, indices, epoch):
        keys = jax.vmap(lambda index: jax.random.fold_in(jax.random.fold_in(base, epoch), index))(
            jnp.maximum(indices, 0)
        )
        return jax.vmap(lambda k, c, s: augment_one(augment, k, c, s[0], s[1]))(keys, canvases, sizes)

    return jax.jit(batch)
