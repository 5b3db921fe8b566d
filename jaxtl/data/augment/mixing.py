"""Mixup and CutMix on the device, inside the train step: torchvision.transforms.v2's, batch by batch.

As ``torchvision.transforms.v2.MixUp`` and ``CutMix`` compute them: each row of a batch is paired
with the row before it (``roll(1, 0)``, the first with the last), one lambda is drawn per batch from
Beta(alpha, alpha); Mixup blends the pair, ``rolled * (1 - lam) + x * lam``, and CutMix pastes a box of
the paired image whose size follows from lambda (centre uniform over the image, sides
``int(0.5 * sqrt(1 - lam) * size)`` either way of it, clipped to the image), with lambda then corrected
to the area the box really covers. Targets become class probabilities mixed with the same lambda.

From timm's ``Mixup``: a batch is mixed with probability ``prob``, and when both alphas are > 0 CutMix is
chosen over Mixup with probability ``switch_prob``. Rows that hold no image (padding, skipped files) take
no part: each real row is paired with the real row before it. The draws are a function of the key the
train step derives from (seed, step), so a resumed run mixes what an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Mixing:
    """Mixup (``mixup_alpha > 0``) and/or CutMix (``cutmix_alpha > 0``), applied to a batch with probability
    ``prob``; with both, CutMix with probability ``switch_prob``."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5

    def __post_init__(self):
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError(f"alphas must be >= 0, got mixup {self.mixup_alpha}, cutmix {self.cutmix_alpha}")
        if not (0 <= self.prob <= 1 and 0 <= self.switch_prob <= 1):
            raise ValueError(f"prob={self.prob} and switch_prob={self.switch_prob} must be in [0, 1]")

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def describe(self) -> str:
        parts = [f"mixup alpha {self.mixup_alpha:g}"] if self.mixup_alpha > 0 else []
        parts += [f"cutmix alpha {self.cutmix_alpha:g}"] if self.cutmix_alpha > 0 else []
        switch = f", cutmix chosen with p {self.switch_prob:g}" if len(parts) == 2 else ""
        return f"{' and '.join(parts)} on a batch with p {self.prob:g}{switch}"


class MixParams(NamedTuple):
    """One batch's draw: whether it is mixed, by CutMix or Mixup, with which lambda (the corrected one for
    CutMix) and which box (y1, y2, x1, x2; empty for Mixup)."""

    mixed: jax.Array
    cutmix: jax.Array
    lam: jax.Array
    box: jax.Array


def cutmix_box(lam, r_x, r_y, height: int, width: int):
    """torchvision's CutMix box for ``lam`` centred at (r_x, r_y): ``(y1, y2, x1, x2)`` and the corrected lambda."""
    r = 0.5 * jnp.sqrt(1.0 - lam)
    half_w = jnp.floor(r * width).astype(jnp.int32)  # int() of a non-negative float
    half_h = jnp.floor(r * height).astype(jnp.int32)
    x1, x2 = jnp.maximum(r_x - half_w, 0), jnp.minimum(r_x + half_w, width)
    y1, y2 = jnp.maximum(r_y - half_h, 0), jnp.minimum(r_y + half_h, height)
    corrected = 1.0 - ((x2 - x1) * (y2 - y1)).astype(jnp.float32) / (width * height)
    return jnp.stack([y1, y2, x1, x2]), corrected


def draw(mixing: Mixing, key: jax.Array, height: int, width: int) -> MixParams:
    """A batch's parameters, drawn from ``key``."""
    k_apply, k_switch, k_lam, k_x, k_y = jax.random.split(key, 5)
    mixed = jax.random.uniform(k_apply) < mixing.prob
    if mixing.mixup_alpha > 0 and mixing.cutmix_alpha > 0:
        cutmix = jax.random.uniform(k_switch) < mixing.switch_prob
    else:
        cutmix = jnp.asarray(mixing.cutmix_alpha > 0)
    alpha = jnp.where(cutmix, max(mixing.cutmix_alpha, 1e-30), max(mixing.mixup_alpha, 1e-30))
    lam = jax.random.beta(k_lam, alpha, alpha).astype(jnp.float32)
    r_x = jax.random.randint(k_x, (), 0, width)
    r_y = jax.random.randint(k_y, (), 0, height)
    box, corrected = cutmix_box(lam, r_x, r_y, height, width)
    lam = jnp.where(mixed, jnp.where(cutmix, corrected, lam), 1.0)
    box = jnp.where(mixed & cutmix, box, jnp.zeros(4, jnp.int32))
    return MixParams(mixed, cutmix & mixed, lam, box)


def partners(mask: jax.Array) -> jax.Array:
    """The row each row is mixed with: the previous real row (the last for the first); itself where ``mask`` is False.

    A batch without padding gives torchvision's pairing, ``roll(1, 0)``: row i with row i - 1.
    """
    n = jnp.sum(mask)
    real_first = jnp.argsort(~mask, stable=True)  # the real rows, in order, then the others
    rank = jnp.cumsum(mask) - 1
    partner = real_first[(rank - 1) % jnp.maximum(n, 1)]
    return jnp.where(mask, partner, jnp.arange(mask.shape[0]))


def apply(params: MixParams, images: jax.Array, labels: jax.Array, mask: jax.Array, num_classes: int):
    """``(images, targets)``: NHWC float ``images`` mixed as ``params`` say, and the (B, C) class probabilities
    (``labels``: (B,) class indices, or (B, C) multi-hot)."""
    pair = partners(mask)
    rolled = images[pair]
    lam = params.lam.astype(images.dtype)
    blended = rolled * (1.0 - lam) + images * lam
    y1, y2, x1, x2 = params.box
    rows = jnp.arange(images.shape[1])[:, None]
    cols = jnp.arange(images.shape[2])[None, :]
    inside = ((rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2))[None, :, :, None]
    pasted = jnp.where(inside, rolled, images)
    out = jnp.where(params.cutmix, pasted, jnp.where(params.mixed, blended, images))
    # Class indices become one-hot targets; multi-hot targets (a multi-label task) mix as they are.
    one_hot = labels.astype(jnp.float32) if labels.ndim == 2 else jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    targets = one_hot[pair] * (1.0 - params.lam) + one_hot * params.lam
    return out, targets
