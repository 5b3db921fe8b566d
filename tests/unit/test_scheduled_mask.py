"""Unfreezing on a step schedule in one optimizer (start_at, phases.N.unfreeze_at) against hand-computed updates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxtl.models
from jaxtl.optim import OptimizerConfig, ParamGroupError, Phase, build_optimizer
from jaxtl.optim.scheduled_mask import start_at
from jaxtl.train.step import split_model

GRADS = [np.array([0.5, -1.0, 2.0], np.float32) * (t + 1) for t in range(5)]


def run(tx, grads, params):
    state, updates = tx.init(params), []
    for g in grads:
        u, state = tx.update(jnp.asarray(g), state, params)
        params = optax.apply_updates(params, u)
        updates.append(np.asarray(u))
    return updates, state


def test_sgd_with_momentum_held_until_its_start_step_then_starts_afresh():
    lr, momentum, start = 0.1, 0.9, 2
    updates, _ = run(start_at(start, optax.sgd(lr, momentum=momentum)), GRADS, jnp.zeros(3))
    assert all(np.array_equal(u, np.zeros(3)) for u in updates[:start])
    # torch/optax SGD: buf = momentum * buf + g (the buffer starting at the first active gradient), update -lr * buf.
    buf = np.zeros(3)
    for t in range(start, len(GRADS)):
        buf = momentum * buf + GRADS[t]
        np.testing.assert_allclose(updates[t], -lr * buf, rtol=1e-6)


def test_adams_moments_and_step_count_wait_so_its_first_active_step_is_a_fresh_adams():
    lr, b1, b2, eps, start = 1e-2, 0.9, 0.999, 1e-8, 3
    updates, state = run(start_at(start, optax.adam(lr, b1=b1, b2=b2, eps=eps)), GRADS, jnp.ones(3))
    m, v = np.zeros(3), np.zeros(3)
    for t in range(start, len(GRADS)):
        g, k = GRADS[t].astype(np.float64), t - start + 1  # Adam's bias correction counts the active steps only
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        expected = -lr * (m / (1 - b1**k)) / (np.sqrt(v / (1 - b2**k)) + eps)
        np.testing.assert_allclose(updates[t], expected, rtol=1e-4)  # float32: 1 - b2**k cancels (~3e-5 rel.)
    assert int(state.count) == len(GRADS) and int(state.inner[0].count) == len(GRADS) - start


def test_a_phases_unfreeze_at_holds_the_backbone_of_one_adamw_until_its_step():
    model = jaxtl.models.create("resnet18", num_classes=3, seed=0)
    phase = Phase("all", "full", epochs=1, unfreeze_at={"backbone": 2})
    groups = phase.groups(model)
    assert groups.groups["backbone"].start_step == 2 and groups.groups["head"].start_step == 0
    assert "(from step 2)" in groups.summary(1e-3, 1e-4)
    config = OptimizerConfig(name="adamw", lr=1e-3, weight_decay=0.01)
    tx = build_optimizer(groups, config, total_steps=10)
    _, state = split_model(model, groups)
    params = state.trainable
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.25), params)
    opt_state = tx.init(params)
    steps = []
    for _ in range(3):
        updates, opt_state = tx.update(grads, opt_state, params)
        steps.append(updates)
        params = optax.apply_updates(params, updates)
    first = dict(jax.tree_util.tree_flatten_with_path(steps[0])[0])
    conv = next(k for k in first if "conv1" in jax.tree_util.keystr(k) and "layer" not in jax.tree_util.keystr(k))
    fc = next(k for k in first if "fc" in jax.tree_util.keystr(k) and "weight" in jax.tree_util.keystr(k))
    leaves = [dict(jax.tree_util.tree_flatten_with_path(u)[0]) for u in steps]
    assert not np.any(leaves[0][conv]) and not np.any(leaves[1][conv])  # held
    # Step 2 is the backbone's first AdamW step: -lr * (g / (|g| + eps) + wd * w), w the (unchanged) weights.
    w = np.asarray(dict(jax.tree_util.tree_flatten_with_path(state.trainable)[0])[conv])
    np.testing.assert_allclose(leaves[2][conv], -1e-3 * (0.25 / (0.25 + 1e-8) + 0.01 * w), rtol=1e-5, atol=1e-9)
    assert np.all(leaves[0][fc] != 0)  # the head trains from the start


def test_unfreeze_at_names_a_trainable_group():
    model = jaxtl.models.create("resnet18", num_classes=3, seed=0)
    with pytest.raises(ParamGroupError, match="sets unfreeze_at for 'blocks', which is no trainable group; its "):
        Phase("p", "full", epochs=1, unfreeze_at={"blocks": 2}).groups(model)
    with pytest.raises(ParamGroupError, match="unfreeze_at for 'backbone', which is no trainable group"):
        Phase("p", "head_only", epochs=1, unfreeze_at={"backbone": 2}).groups(model)
    with pytest.raises(ValueError, match="the start step must be >= 0"):
        start_at(-1, optax.sgd(0.1))
