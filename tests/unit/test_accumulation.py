"""Gradient accumulation (train.accumulate_steps): with BatchNorm in eval mode, k micro-batches make the update
of the whole batch in one piece; with BatchNorm in train mode, what PyTorch computes when it accumulates
(each micro-batch's statistics, running statistics updated once per micro-batch)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from convert.train_parity import create_training_pair, disable_dropout
from jaxtl.models.names import key_path_name
from jaxtl.optim import OptimizerConfig, Rule, assign, build_optimizer
from jaxtl.train.losses import cross_entropy
from jaxtl.train.step import make_train_step, split_model

K, MICRO, SIZE, CLASSES = 4, 2, 32, 5


def _batches(steps, seed=0, k=K, micro=MICRO, size=SIZE):
    generator = torch.Generator().manual_seed(seed)
    rows = k * micro
    return [
        (torch.randn(rows, 3, size, size, generator=generator), torch.randint(0, CLASSES, (rows,), generator=generator))
        for _ in range(steps)
    ]


def _nhwc(x: torch.Tensor) -> jax.Array:
    return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


def _train(model, bn, batches, k, loss_fn=None, mask=None, compiler_options=None):
    groups = assign(model, [Rule("*", group="all", bn=bn)])
    graphdef, state = split_model(model, groups)
    optimizer = build_optimizer(groups, OptimizerConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4))
    kwargs = {} if loss_fn is None else {"loss_fn": loss_fn}
    step = make_train_step(
        graphdef, optimizer, donate=False, accumulate_steps=k, compiler_options=compiler_options, **kwargs
    )
    opt_state = optimizer.init(state.trainable)
    losses = []
    for index, (x, y) in enumerate(batches):
        rows = jnp.ones(len(y), bool) if mask is None else mask
        state, opt_state, metrics = step(state, opt_state, _nhwc(x), jnp.asarray(y.numpy()), rows, index)
        losses.append(float(metrics["loss"]))
    return nnx.state(nnx.merge(graphdef, *state), nnx.Any(nnx.Param, nnx.BatchStat)), losses


def _assert_states_close(a, b, rtol, atol):
    for (path, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)):
        np.testing.assert_allclose(
            np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)
        )


@pytest.fixture(scope="module")
def pair():
    torch_model, jax_model = create_training_pair("resnet18", num_classes=CLASSES, seed=3)
    disable_dropout(torch_model, jax_model)
    return torch_model, jax_model


def _copy(model):
    return nnx.merge(*nnx.split(model))


@pytest.mark.slow
@pytest.mark.parametrize("weighted", [False, True])
def test_accumulated_micro_batches_equal_one_large_batch_without_train_mode_batchnorm(pair, weighted):
    _, jax_model = pair
    batches = _batches(2)
    loss = cross_entropy(0.1, [0.5, 1.0, 2.0, 1.5, 0.7] if weighted else None)
    whole, whole_losses = _train(_copy(jax_model), "frozen", batches, 1, loss)
    accumulated, accumulated_losses = _train(_copy(jax_model), "frozen", batches, K, loss)
    np.testing.assert_allclose(accumulated_losses, whole_losses, rtol=2e-6)
    _assert_states_close(accumulated, whole, rtol=2e-4, atol=2e-6)


@pytest.mark.slow
@pytest.mark.usefixtures("persistent_compilation_cache")  # its three runs compile one step program
def test_padding_rows_and_an_empty_micro_batch_change_nothing(pair):
    """The batch's last rows padding (micro-batches are rows i, i + k, ...: rows 6 and 7 are micro-batches 2 and 3's
    second rows) equals the batch without them."""
    _, jax_model = pair
    (x, y), *_ = _batches(1, seed=5)
    mask = jnp.asarray([True] * 6 + [False] * 2)
    padded, padded_losses = _train(_copy(jax_model), "train", [(x, y)], K, mask=mask)
    kept = torch.cat([x[:6], torch.zeros_like(x[:2])]), torch.cat([y[:6], torch.zeros_like(y[:2])])
    replaced, replaced_losses = _train(_copy(jax_model), "train", [kept], K, mask=mask)
    _assert_states_close(padded, replaced, rtol=0, atol=0)  # padding's content never matters
    assert padded_losses == replaced_losses
    empty = jnp.asarray([True, True, False, True] * 2)  # micro-batch 2 (rows 2 and 6) has no real row
    before = nnx.state(jax_model, nnx.Any(nnx.Param, nnx.BatchStat))
    after, _ = _train(_copy(jax_model), "train", [(x, y)], K, mask=empty)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(after))
    assert not np.allclose(np.asarray(after["bn1"]["running_mean"]), np.asarray(before["bn1"]["running_mean"]))


@pytest.mark.slow
def test_accumulation_with_train_mode_batchnorm_equals_pytorchs(pair):
    """PyTorch's accumulation loop: loss / k backward per micro-batch, one optimizer step; BatchNorm takes
    each micro-batch's statistics. Both sides in float64 (torch ``.double()``, jax with x64), as the training
    parity harness compares them: in float32 BatchNorm's gradient over micro-batches of a few images makes
    either run's parameters depend on rounding (and on the thread count) at 1e-4."""
    from convert.parity import fast_compile_options, relative_l2

    torch_model, jax_model = pair
    torch_model = _torch_copy(torch_model).double()
    torch_model.train()
    k = 2
    batches = [(x.double(), y) for x, y in _batches(2, seed=1, k=k, micro=4, size=64)]
    optimizer = torch.optim.SGD(torch_model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    torch_losses = []
    for x, y in batches:
        optimizer.zero_grad()
        total = 0.0
        for i in range(k):  # jaxtl's micro-batch i: rows i, i + k, ...
            loss = F.cross_entropy(torch_model(x[i::k]), y[i::k]) / k
            loss.backward()
            total += loss.item()
        optimizer.step()
        torch_losses.append(total)
    with jax.enable_x64(True), jax.default_matmul_precision("highest"):
        model = _copy(jax_model)
        cast = lambda v: jnp.asarray(np.asarray(v, np.float64)) if jnp.issubdtype(v.dtype, jnp.floating) else v  # noqa: E731
        nnx.update(model, jax.tree.map(cast, nnx.state(model)))
        ours, losses = _train(model, "train", batches, k, compiler_options=fast_compile_options())
    np.testing.assert_allclose(losses, torch_losses, rtol=1e-10)
    expected = {name: value.detach().numpy() for name, value in torch_model.state_dict().items()}
    flat = {key_path_name(path): np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(ours)}
    assert {name for name in expected if not name.endswith("num_batches_tracked")} == set(flat)
    for name, value in flat.items():
        reference = expected[name]
        if reference.ndim == 4:
            reference = reference.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif name.endswith("fc.weight"):
            reference = reference.T
        assert value.dtype == np.float64 and relative_l2(reference, value) < 1e-10, name


def _torch_copy(model):
    import copy

    return copy.deepcopy(model)
