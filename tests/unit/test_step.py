"""The train step's randomness: dropout and stochastic depth masks are a function of (seed, step).

A checkpoint holds parameters and BatchNorm statistics, not the models' RNG counters, so a resumed
run draws the masks an uninterrupted one draws only if each step reseeds every stream itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxtl.models
from jaxtl.models.layers import Conv2d, Linear, StochasticDepth, global_avg_pool
from jaxtl.optim import OptimizerConfig, assign, build_optimizer, get_policy
from jaxtl.train.step import head_of, make_train_step, reseed_streams, split_model


class Dropping(nnx.Module):
    """conv -> a residual branch under stochastic depth -> pool -> dropout -> fc, built like jaxtl's models."""

    head_name = "fc"

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = Conv2d(3, 4, 3, padding=1, rngs=rngs)
        self.conv2 = Conv2d(4, 4, 3, padding=1, rngs=rngs)
        self.drop_path = StochasticDepth(0.5, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.fc = Linear(4, 3, rngs=rngs)

    def blocks(self):
        return (("stem", ("conv1.",)), ("layer1", ("conv2.",)), ("head", ("fc.",)))

    def __call__(self, x):
        x = jax.nn.relu(self.conv1(x))
        x = x + self.drop_path(jax.nn.relu(self.conv2(x)))
        return self.fc(self.dropout(global_avg_pool(x)))


def saved(model: nnx.Module) -> nnx.State:
    """What a checkpoint keeps of a model: parameters and BatchNorm statistics."""
    return nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))


def train(make_model, policy, batches, first_step, *, forward=None, restore=None):
    """Trains ``make_model()`` on ``batches`` from step ``first_step`` on; ``restore`` is a checkpoint
    (model arrays, optimizer state) to start from. Returns (model, optimizer state, losses)."""
    model = make_model()
    if restore is not None:
        nnx.update(model, restore[0])
    groups = assign(model, get_policy(policy)(model))
    graphdef, state = split_model(model, groups)
    optimizer = build_optimizer(groups, OptimizerConfig(name="sgd", lr=0.1, momentum=0.9))
    kwargs = {"forward": forward} if forward is not None else {}
    step = make_train_step(graphdef, optimizer, donate=False, seed=7, **kwargs)
    opt_state = optimizer.init(state.trainable) if restore is None else restore[1]
    losses = []
    for index, (inputs, labels) in enumerate(batches, start=first_step):
        state, opt_state, metrics = step(state, opt_state, inputs, labels, jnp.ones(len(labels), bool), index)
        losses.append(float(metrics["loss"]))
    return nnx.merge(graphdef, *state), opt_state, losses


def assert_resumed_equals_uninterrupted(make_model, policy, batches, **kwargs):
    whole, _, whole_losses = train(make_model, policy, batches, 0, **kwargs)
    first, opt_state, first_losses = train(make_model, policy, batches[:2], 0, **kwargs)
    # A fresh process: the model is built again (RNG counters at 0) and loads the checkpoint.
    rest, _, rest_losses = train(make_model, policy, batches[2:], 2, restore=(saved(first), opt_state), **kwargs)
    assert first_losses + rest_losses == whole_losses
    for (path, a), (_, b) in zip(
        jax.tree_util.tree_leaves_with_path(saved(whole)), jax.tree_util.tree_leaves_with_path(saved(rest)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_masks_are_a_function_of_the_step_so_a_resumed_run_equals_an_uninterrupted_one():
    key = jax.random.key(0)
    images = jax.random.randint(key, (8, 8, 8, 3), 0, 256).astype(jnp.uint8)
    labels = jax.random.randint(jax.random.fold_in(key, 1), (8,), 0, 3)
    batches = [(images, labels)] * 4  # the same batch each step: only the masks change the loss
    make = lambda: Dropping(nnx.Rngs(0))
    _, _, losses = train(make, "full", batches, 0)
    assert len(set(losses)) == 4  # every step draws new masks
    assert_resumed_equals_uninterrupted(make, "full", batches)


def test_reseeding_gives_every_stream_its_own_key_whatever_its_tag():
    def keys(model):
        streams = [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.RngStream)]
        return [tuple(np.asarray(jax.random.key_data(s.key.get_value())).tolist()) for s in streams]

    for rngs in (nnx.Rngs(0), nnx.Rngs(params=0, dropout=0)):  # streams tagged "default", "dropout"
        model = Dropping(rngs)
        before = keys(model)
        reseed_streams(model, jax.random.key(3))
        after = keys(model)
        assert len(after) == len(set(after)) == 2 and not set(after) & set(before)
        again = Dropping(nnx.Rngs(5))
        reseed_streams(again, jax.random.key(3))
        assert keys(again) == after  # the key decides, not how the model was seeded


def test_an_efficientnet_head_trained_with_dropout_resumes_exactly():
    # The head-only phase on cached features: the classifier's dropout (0.2) is the only randomness.
    key = jax.random.key(1)
    features = jax.random.normal(key, (16, 1280))
    labels = jax.random.randint(jax.random.fold_in(key, 1), (16,), 0, 5)
    make = lambda: jaxtl.models.create("efficientnet_b0", num_classes=5, seed=0)
    assert_resumed_equals_uninterrupted(make, "head_only", [(features, labels)] * 4, forward=head_of)
