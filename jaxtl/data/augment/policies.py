"""TrivialAugmentWide, RandAugment and AutoAugment (ImageNet policy) with torchvision v2's augmentation spaces."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.data.augment import color, geometry

# Every op of the three spaces; an op index is a position here. The spaces below list names.
OPS: tuple[str, ...] = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
    "Invert",
)
IDENTITY = OPS.index("Identity")


def _linspace(start: float, end: float, steps: int) -> np.ndarray:
    # torch.linspace's CPU kernel (RangeFactoriesKernel.cpp linspace_kernel) in float32: step = (end - start)
    # / (steps - 1), the first half start + step * i, the second end - step * (steps - 1 - i), each a fused
    # multiply-add (one rounding: float64 holds the product exactly). Its vectorised lanes (arange from a
    # base) only run on 2 * lanes <= steps, which 31 and 10 steps never reach with AVX-512's 16 floats.
    start, end = np.float32(start), np.float32(end)
    step = np.float32((end - start) / np.float32(steps - 1))
    index = np.arange(steps, dtype=np.float64)
    up = np.float64(start) + np.float64(step) * index
    down = np.float64(end) - np.float64(step) * (steps - 1 - index)
    return np.where(index < steps // 2, up, down).astype(np.float32)


def _posterize_bits(steps: int, levels: int) -> np.ndarray:
    # (8 - (torch.arange(num_bins) / ((num_bins - 1) / levels))).round().int(), in float32.
    quotient = np.arange(steps).astype(np.float32) / np.float32((steps - 1) / levels)
    return np.round(np.float32(8) - quotient).astype(np.float32)


# name -> (bins(num_bins, height, width) or None, signed): torchvision.transforms.v2._auto_augment's
# _AUGMENTATION_SPACE tables.
_COMMON = {
    "ShearX": (lambda n, h, w: _linspace(0.0, 0.3, n), True),
    "ShearY": (lambda n, h, w: _linspace(0.0, 0.3, n), True),
    "TranslateX": (lambda n, h, w: _linspace(0.0, 150.0 / 331.0 * w, n), True),
    "TranslateY": (lambda n, h, w: _linspace(0.0, 150.0 / 331.0 * h, n), True),
    "Rotate": (lambda n, h, w: _linspace(0.0, 30.0, n), True),
    "Brightness": (lambda n, h, w: _linspace(0.0, 0.9, n), True),
    "Color": (lambda n, h, w: _linspace(0.0, 0.9, n), True),
    "Contrast": (lambda n, h, w: _linspace(0.0, 0.9, n), True),
    "Sharpness": (lambda n, h, w: _linspace(0.0, 0.9, n), True),
    "Posterize": (lambda n, h, w: _posterize_bits(n, 4), False),
    "Solarize": (lambda n, h, w: _linspace(1.0, 0.0, n), False),
    "AutoContrast": (None, False),
    "Equalize": (None, False),
}
AUTO_AUGMENT_SPACE = {**_COMMON, "Invert": (None, False)}
RAND_AUGMENT_SPACE = {"Identity": (None, False), **_COMMON}
TRIVIAL_AUGMENT_SPACE = {
    "Identity": (None, False),
    "ShearX": (lambda n, h, w: _linspace(0.0, 0.99, n), True),
    "ShearY": (lambda n, h, w: _linspace(0.0, 0.99, n), True),
    "TranslateX": (lambda n, h, w: _linspace(0.0, 32.0, n), True),
    "TranslateY": (lambda n, h, w: _linspace(0.0, 32.0, n), True),
    "Rotate": (lambda n, h, w: _linspace(0.0, 135.0, n), True),
    "Brightness": (lambda n, h, w: _linspace(0.0, 0.99, n), True),
    "Color": (lambda n, h, w: _linspace(0.0, 0.99, n), True),
    "Contrast": (lambda n, h, w: _linspace(0.0, 0.99, n), True),
    "Sharpness": (lambda n, h, w: _linspace(0.0, 0.99, n), True),
    "Posterize": (lambda n, h, w: _posterize_bits(n, 6), False),
    "Solarize": (lambda n, h, w: _linspace(1.0, 0.0, n), False),
    "AutoContrast": (None, False),
    "Equalize": (None, False),
}

# AutoAugment's ImageNet policy: 25 sub-policies of two (op, probability, magnitude bin of 10).
IMAGENET_POLICY: tuple[tuple[tuple[str, float, int | None], tuple[str, float, int | None]], ...] = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
    (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)
_AUTO_AUGMENT_BINS = 10


def magnitude_table(space: dict, num_bins: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A space as arrays: (op indices (K,) int32, magnitudes (K, num_bins) float32, signed (K,) bool).

    Ops without a magnitude get a row of zeros (torchvision passes them 0.0).
    """
    ops = np.array([OPS.index(name) for name in space], np.int32)
    rows = [
        np.zeros(num_bins, np.float32) if bins is None else bins(num_bins, height, width) for bins, _ in space.values()
    ]
    signed = np.array([signed for _, signed in space.values()], bool)
    return ops, np.stack(rows).astype(np.float32), signed


def _signed(key: jax.Array, magnitude: jax.Array, signed) -> jax.Array:
    # `if signed and torch.rand(()) <= 0.5: magnitude *= -1`.
    return jnp.where(signed & (jax.random.uniform(key) <= 0.5), -magnitude, magnitude)


def sample_trivial_augment(key: jax.Array, num_magnitude_bins: int = 31) -> tuple[jax.Array, jax.Array]:
    """One draw of torchvision v2's ``TrivialAugmentWide``: a uniform op, a uniform bin, a random sign.

    Returns:
        (op index into :data:`OPS`, int32 scalar; magnitude, float32 scalar).
    """
    ops, magnitudes, signed = magnitude_table(TRIVIAL_AUGMENT_SPACE, num_magnitude_bins, 0, 0)
    k_op, k_bin, k_sign = jax.random.split(key, 3)
    choice = jax.random.randint(k_op, (), 0, len(ops))
    bin_index = jax.random.randint(k_bin, (), 0, num_magnitude_bins)
    magnitude = _signed(k_sign, jnp.asarray(magnitudes)[choice, bin_index], jnp.asarray(signed)[choice])
    return jnp.asarray(ops)[choice], magnitude


def sample_rand_augment(
    key: jax.Array, height: int, width: int, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31
) -> tuple[jax.Array, jax.Array]:
    """One draw of torchvision v2's ``RandAugment``: ``num_ops`` uniform ops (with replacement), each at
    bin ``magnitude`` with its own random sign.

    Args:
        key: a jax PRNG key.
        height: static image height (TranslateY's bins scale with it).
        width: static image width (TranslateX's).
        num_ops: ops applied in sequence.
        magnitude: the bin index.
        num_magnitude_bins: bins of each op's range.

    Returns:
        (op indices (num_ops,) int32, magnitudes (num_ops,) float32), in the order to apply.
    """
    ops, magnitudes, signed = magnitude_table(RAND_AUGMENT_SPACE, num_magnitude_bins, height, width)
    k_op, k_sign = jax.random.split(key)
    choice = jax.random.randint(k_op, (num_ops,), 0, len(ops))
    values = jnp.asarray(magnitudes[:, magnitude])[choice]
    values = jax.vmap(_signed)(jax.random.split(k_sign, num_ops), values, jnp.asarray(signed)[choice])
    return jnp.asarray(ops)[choice], values


def _auto_augment_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The ImageNet policy as (25, 2) arrays: op index, probability, magnitude, signed."""
    space = AUTO_AUGMENT_SPACE
    ops = np.array([[OPS.index(name) for name, _, _ in pair] for pair in IMAGENET_POLICY], np.int32)
    probability = np.array([[p for _, p, _ in pair] for pair in IMAGENET_POLICY], np.float32)
    magnitude = np.zeros(ops.shape, np.float32)
    signed = np.zeros(ops.shape, bool)
    for i, pair in enumerate(IMAGENET_POLICY):
        for j, (name, _, bin_index) in enumerate(pair):
            bins, signed[i, j] = space[name]
            if bins is not None:
                # None of the ImageNet policy's ops depends on the image size (no Translate).
                magnitude[i, j] = bins(_AUTO_AUGMENT_BINS, 0, 0)[bin_index]
    return ops, probability, magnitude, signed


def sample_auto_augment(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One draw of torchvision v2's ``AutoAugment(IMAGENET)``: a uniform sub-policy, each of its two ops
    applied with its probability (``torch.rand(()) <= p``), at its fixed bin of 10 with a random sign.

    Returns:
        (op indices (2,) int32, Identity for an op not applied; magnitudes (2,) float32).
    """
    ops, probability, magnitude, signed = (jnp.asarray(a) for a in _auto_augment_arrays())
    k_policy, k_apply, k_sign = jax.random.split(key, 3)
    policy = jax.random.randint(k_policy, (), 0, len(IMAGENET_POLICY))
    applied = jax.random.uniform(k_apply, (2,)) <= probability[policy]
    values = jax.vmap(_signed)(jax.random.split(k_sign, 2), magnitude[policy], signed[policy])
    return jnp.where(applied, ops[policy], IDENTITY), jnp.where(applied, values, 0.0)


def _op_table(fill):
    zero = jnp.float32(0.0)
    # torchvision's ShearX/ShearY pivot on the top-left corner (center=[0, 0]); TranslateX/Y truncate
    # the magnitude with int(); colour ops take 1 + magnitude; Solarize's threshold is 255 * magnitude.
    # torchvision's factor 1.0 + magnitude is a Python float: exact in float64 for a float32 magnitude of
    # at least 2**-29 (every nonzero bin is at least 0.03), so its mul rounds it to float32 once, as 1.0 + m
    # does here, and the blends' weight 1.0 - factor is exactly -magnitude, passed as alpha.
    return (
        lambda image, m: image,
        lambda image, m: geometry.shear_x(image, m, fill),
        lambda image, m: geometry.shear_y(image, m, fill),
        lambda image, m: geometry.translate(image, jnp.trunc(m), zero, fill),
        lambda image, m: geometry.translate(image, zero, jnp.trunc(m), fill),
        lambda image, m: geometry.rotate(image, m, fill),
        lambda image, m: color.adjust_brightness(image, 1.0 + m),
        lambda image, m: color.adjust_saturation(image, 1.0 + m, alpha=-m),
        lambda image, m: color.adjust_contrast(image, 1.0 + m, alpha=-m),
        lambda image, m: color.adjust_sharpness(image, 1.0 + m, alpha=-m),
        lambda image, m: color.posterize(image, jnp.trunc(m).astype(jnp.int32)),
        lambda image, m: color.solarize(image, 255.0 * m),
        lambda image, m: color.autocontrast(image),
        lambda image, m: color.equalize(image),
        lambda image, m: color.invert(image),
    )


def apply_op(image: jax.Array, op_index, magnitude, fill=0) -> jax.Array:
    """torchvision v2's ``_AutoAugmentBase._apply_image_or_video_transform(image, OPS[op_index], magnitude,
    NEAREST, fill)``.

    Args:
        image: (H, W, 3) uint8.
        op_index: int scalar index into :data:`OPS`, possibly traced.
        magnitude: float32 scalar, signed as sampled.
        fill: geometric ops' fill, scalar or (3,).

    Returns:
        (H, W, 3) uint8.
    """
    magnitude = jnp.asarray(magnitude, jnp.float32)
    return jax.lax.switch(op_index, _op_table(fill), image, magnitude)


def apply_ops(image: jax.Array, op_indices: jax.Array, magnitudes: jax.Array, fill=0) -> jax.Array:
    """Applies the ops of (K,) ``op_indices`` and ``magnitudes`` in order."""
    for k in range(op_indices.shape[0]):
        image = apply_op(image, op_indices[k], magnitudes[k], fill)
    return image


def apply_policy(policy: str, key: jax.Array, image: jax.Array, fill=0) -> jax.Array:
    """One draw of ``policy`` ("trivialaugment", "randaugment" or "autoaugment") applied to (H, W, 3) uint8."""
    if policy == "trivialaugment":
        op_index, magnitude = sample_trivial_augment(key)
        return apply_op(image, op_index, magnitude, fill)
    if policy == "randaugment":
        height, width = image.shape[:2]
        return apply_ops(image, *sample_rand_augment(key, height, width), fill=fill)
    if policy == "autoaugment":
        return apply_ops(image, *sample_auto_augment(key), fill=fill)
    raise ValueError(f"policy {policy!r} is not one of trivialaugment, randaugment, autoaugment")
