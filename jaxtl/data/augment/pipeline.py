"""Training augmentation on the device: a batch of uint8 crops in, the same crops augmented per sample out.

The host crops and flips (:class:`jaxtl.data.CachedTrainTransform`: RandomResizedCrop with PIL from the
decoded cache); the device then, per sample and jit-compiled, applies an auto-augment policy, jitters
colours and erases a box. Every random draw comes from a key that is a function of (seed, epoch, source
index) alone, so a sample is augmented the same way whatever batch, device count or resume point it lands
in.

Resampling stays on the host because there it is PIL's C code over one box; on the device a resize whose
box size varies per sample must resample over the whole canvas (``crop.resized_crop``, 13 ms per
image on a CPU core). A policy picks one of 15 ops per sample: under ``vmap`` ``lax.switch`` becomes a
select that computes every branch, so on the CPU the samples go through ``lax.map``, one branch each.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from jaxtl.data.augment import erasing, jitter, policies

Policy = Literal["none", "trivialaugment", "randaugment", "autoaugment"]
POLICIES: tuple[str, ...] = ("none", "trivialaugment", "randaugment", "autoaugment")
_STREAM = 0xA06  # the device augmentation's own stream of the run seed (the host transforms draw from numpy's)


@dataclasses.dataclass(frozen=True)
class DeviceAugment:
    """What the device does to each (crop_size, crop_size, 3) uint8 training crop.

    Attributes:
        policy: an auto-augment policy: TrivialAugmentWide, RandAugment (2 ops, magnitude 9 of 31) or
            AutoAugment's ImageNet policy, with torchvision's augmentation spaces.
        color_jitter: (brightness, contrast, saturation, hue) as torchvision's ColorJitter takes them, or None.
        erasing_p: probability of RandomErasing (scale 0.02-0.33, ratio 0.3-3.3), filled with ``erase_fill``.
        erase_fill: the uint8 colour of an erased box (torchvision erases after normalisation with 0, which is
            the mean colour: the default is the ImageNet mean in uint8).
    """

    policy: Policy = "none"
    color_jitter: tuple[float, float, float, float] | None = None
    erasing_p: float = 0.0
    erase_fill: tuple[int, int, int] = (124, 116, 104)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy {self.policy!r} is not one of {', '.join(POLICIES)}")

    @property
    def is_random(self) -> bool:
        return self.policy != "none" or self.color_jitter is not None or self.erasing_p > 0


def augment_one(augment: DeviceAugment, key: jax.Array, image: jax.Array) -> jax.Array:
    """One sample: (H, W, 3) uint8 -> (H, W, 3) uint8, the policy, then the colour jitter, then erasing."""
    k_policy, k_jitter, k_erase = jax.random.split(key, 3)
    if augment.policy != "none":
        image = policies.apply_policy(augment.policy, k_policy, image)
    if augment.color_jitter is not None:
        image = jitter.apply_color_jitter(image, jitter.sample_color_jitter(k_jitter, *augment.color_jitter))
    if augment.erasing_p > 0:
        height, width = image.shape[:2]
        apply, top, left, box_h, box_w = erasing.sample_erasing(k_erase, height, width, p=augment.erasing_p)
        fill = jnp.asarray(augment.erase_fill, jnp.uint8)
        image = jnp.where(apply, erasing.erase(image, top, left, box_h, box_w, fill), image)
    return image


def make_device_augment(augment: DeviceAugment, seed: int, *, one_branch: bool | None = None):
    """``fn(images, indices, epoch) -> images``, jitted: (B, H, W, 3) uint8 crops augmented per sample.

    ``indices`` (B,) are the samples' source indices (-1: padding, augmented as index 0 and masked out by
    the step); ``epoch`` is the loader epoch. ``one_branch`` maps over the samples one at a time so that a
    policy computes only its chosen op (default: on the CPU, where a batch gains little from vectorising).
    """
    base = jax.random.fold_in(jax.random.key(seed), _STREAM)
    if one_branch is None:
        one_branch = jax.default_backend() == "cpu"

    def batch(images, indices, epoch):
        keys = jax.vmap(lambda index: jax.random.fold_in(jax.random.fold_in(base, epoch), index))(
            jnp.maximum(indices, 0)
        )
        if one_branch:
            return jax.lax.map(lambda pair: augment_one(augment, *pair), (keys, images))
        return jax.vmap(lambda key, image: augment_one(augment, key, image))(keys, images)

    return jax.jit(batch)
