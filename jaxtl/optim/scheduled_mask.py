"""Unfreezing on a step schedule inside one optimizer: a group's updates held at zero until its start step.

The alternative to phases for progressive unfreezing. A phase per stage rebuilds the groups and compiles a new
train step, which then differentiates only the trainable parameters (no backward pass through the frozen
prefix). A scheduled mask (``phases.N.unfreeze_at: {group: step}``, :attr:`jaxtl.optim.Group.start_step`)
keeps one optimizer and one compiled step for the whole schedule: every group's gradient is computed from the
first step, and a group's update is zero until its start step. Which is cheaper depends on how long the early,
mostly frozen stages run against a compile: docs/design.md measures it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class StartAtState(NamedTuple):
    """The optimizer steps taken so far (``count``) and the state of the wrapped transformation (``inner``)."""

    count: jax.Array
    inner: Any


def start_at(step: int, inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` from optimizer step ``step`` (0-based) on; before it, zero updates and ``inner``'s state unchanged.

    While held, the group is frozen as far as its parameters and optimizer go: momentum, Adam's moments and
    step count, and the learning-rate schedule's count stay at their initial values, so at step ``step`` the
    group starts as a fresh ``inner`` would (its warmup and schedule run from there). Its gradient is still
    computed, which is the price of keeping one compiled step.

    Args:
        step: the first optimizer step whose update is applied, >= 0.
        inner: the group's optimizer.
    """
    if step < 0:
        raise ValueError(f"start_at({step}): the start step must be >= 0")

    def init(params):
        return StartAtState(jnp.zeros([], jnp.int32), inner.init(params))

    def update(updates, state, params=None):
        new_updates, new_inner = inner.update(updates, state.inner, params)
        active = state.count >= step
        updates = jax.tree.map(lambda u: jnp.where(active, u, jnp.zeros_like(u)), new_updates)
        held = jax.tree.map(lambda new, old: jnp.where(active, new, old), new_inner, state.inner)
        return updates, StartAtState(optax.safe_int32_increment(state.count), held)

    return optax.GradientTransformation(init, update)
