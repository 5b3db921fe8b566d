"""Fine-tuning strategies from the literature as optax transformations: L2-SP and Auto-RGN.

Each is usable as one parameter group's transformation (``Group("backbone", transform=...)`` in
:class:`jaxtl.optim.Labels`); L2-SP is also a config option (``optim.l2sp_alpha``, applied by
:func:`jaxtl.optim.build_optimizer`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class L2SPState(NamedTuple):
    """The starting point L2-SP pulls toward: a copy of the parameters ``init`` was given (same tree and dtypes)."""

    anchor: Any


def l2sp(alpha: float) -> optax.GradientTransformation:
    """Adds ``alpha * (w - w0)`` to each gradient: the gradient of L2-SP's penalty ``alpha / 2 * ||w - w0||^2``.

    Li, Grandvalet and Davoine, "Explicit Inductive Bias for Transfer Learning with Convolutional Networks",
    ICML 2018 (arXiv:1802.01483): fine-tuning minimises the loss plus ``alpha / 2 * ||w_S - w0_S||^2`` over
    the pretrained parameters ``w_S`` (``w0_S``: their values at the start of fine-tuning) plus
    ``beta / 2 * ||w_new||^2`` over the new head's, which is ``optax.add_decayed_weights(beta)``.

    Coupled, as the paper's penalty is a term of the loss: chain it before the optimizer (:func:`with_l2sp`),
    so that momentum, Adam's moments and gradient clipping see the penalty's gradient as they see the loss's,
    as ``torch.optim.SGD(weight_decay=...)`` couples L2. (Decoupled, as AdamW decouples weight decay, would
    subtract ``lr * alpha * (w - w0)`` from the parameters after the optimizer's scaling instead: not the
    paper's.)

    The anchor ``w0`` is what the parameters are when ``init`` is called: in a run, the weights at the start
    of the phase whose optimizer is initialised. :func:`jaxtl.optim.carry_optimizer_state` carries the anchor
    of a group that stays trainable under the same name, so it stays the weights that group started from;
    a group new in a phase (or any group under ``carry_state: false``) anchors at the phase's first weights.
    The anchor is a copy of the group's parameters in the optimizer state, saved with it in checkpoints.

    Args:
        alpha: the penalty's strength (the paper's alpha), a finite number >= 0.

    Returns:
        A GradientTransformation whose state is :class:`L2SPState`; ``update`` needs ``params``.
    """
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"l2sp: alpha={alpha} must be a finite number >= 0")

    def init(params):
        return L2SPState(anchor=jax.tree.map(jnp.copy, params))  # a buffer of its own: the step donates params

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("l2sp needs the parameters: call update(updates, state, params)")
        pulled = jax.tree.map(lambda g, w, w0: g + (alpha * (w - w0)).astype(g.dtype), updates, params, state.anchor)
        return pulled, state

    return optax.GradientTransformation(init, update)


def with_l2sp(inner: optax.GradientTransformation, *, alpha: float) -> optax.GradientTransformation:
    """``inner`` (an optimizer: ``optax.sgd(1e-3, momentum=0.9)``) on the gradient plus L2-SP's, :func:`l2sp`.

    For a pretrained group: ``Group("backbone", transform=with_l2sp(optax.sgd(1e-3, momentum=0.9), alpha=0.01))``;
    the new head takes plain L2, ``optax.chain(optax.add_decayed_weights(beta), optax.sgd(...))``.
    """
    return optax.chain(l2sp(alpha), inner)


def relative_gradient_norm_scales(grads: Any, params: Any) -> Any:
    """Each tensor's relative gradient norm ``||g|| / ||w||`` over the largest one: Auto-RGN's lr multipliers.

    Lee, Chen, Tajwar, Kumar, Yao, Liang and Finn, "Surgical Fine-Tuning Improves Adaptation to Distribution
    Shifts", ICLR 2023 (arXiv:2210.11466), Auto-RGN: RGN of a parameter tensor = the L2 (Frobenius) norm of its
    gradient over the L2 norm of its weights; each tensor's learning rate is the base one times its RGN divided
    by the largest RGN (the authors' code, anniesch/surgical-finetuning ``main.py``: ``weights[k] = v / max_weight``).

    A tensor whose weights are all zero (a zero-initialised bias) has no scale to be relative to: it gets 1 and
    takes no part in the maximum, which would otherwise be infinite and set every other tensor's scale to 0.
    When every RGN is 0 (a zero gradient), every scale is 1.

    Args:
        grads: the loss's gradient, a tree of arrays.
        params: the parameters, a tree of the same structure and shapes.

    Returns:
        A tree of the same structure of float32 scalars in [0, 1]; the largest finite RGN's is 1.
    """

    def norm(x):
        return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32))))

    weight_norms = jax.tree.map(norm, params)
    rgns = jax.tree.map(lambda g, n: norm(g) / jnp.where(n > 0, n, 1.0), grads, weight_norms)
    leaves = [jnp.where(n > 0, r, 0.0) for r, n in zip(jax.tree.leaves(rgns), jax.tree.leaves(weight_norms))]
    if not leaves:
        return rgns
    largest = jnp.max(jnp.stack(leaves))
    return jax.tree.map(
        lambda r, n: jnp.where((n > 0) & (largest > 0), r / jnp.where(largest > 0, largest, 1.0), 1.0),
        rgns,
        weight_norms,
    )


def scale_by_relative_gradient_norm(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Auto-RGN: ``inner``'s update of each tensor times that tensor's :func:`relative_gradient_norm_scales`.

    Lee et al., "Surgical Fine-Tuning Improves Adaptation to Distribution Shifts", ICLR 2023 (arXiv:2210.11466):
    the learning rate of each parameter tensor is the base one times ``RGN / max RGN``, RGN = ``||g|| / ||w||``,
    so the tensor whose gradient is largest relative to its weights moves at the full rate and the others
    slower; the paper's optimizer is Adam. Recomputed every step from that step's gradient (the authors
    recompute once per epoch, from 5 batches' average RGN, and leave BatchNorm parameters out of training: give
    those to another group to do so).

    It wraps the optimizer rather than being chained before it: the scales are computed on the gradient
    ``inner`` receives and multiply the update ``inner`` returns, as a per-tensor learning rate does. Scaling
    the gradient instead would change nothing under Adam (invariant to a gradient's scale) and would be
    remembered by momentum. Stateless apart from ``inner``'s state, which is its state. The maximum is over the
    tensors it sees: one group's under :func:`jaxtl.optim.build_optimizer`'s partition, so give every trainable
    parameter one group for the paper's whole-model normalisation::

        Labels(lambda name, value: "all", [Group("all", transform=scale_by_relative_gradient_norm(optax.adam(1e-4)))])

    Args:
        inner: the optimizer whose updates are scaled, e.g. ``optax.adam(1e-4)``.

    Returns:
        A GradientTransformation with ``inner``'s state; ``update`` needs ``params``.
    """

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_relative_gradient_norm needs the parameters: update(updates, state, params)")
        scales = relative_gradient_norm_scales(updates, params)
        updates, state = inner.update(updates, state, params)
        return jax.tree.map(lambda u, s: u * s.astype(u.dtype), updates, scales), state

    return optax.GradientTransformation(inner.init, update)
