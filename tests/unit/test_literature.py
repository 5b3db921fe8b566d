"""L2-SP and Auto-RGN (jaxtl.optim.literature) against hand-computed updates, a PyTorch loop with L2-SP's penalty
in its loss, and numpy's norms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from jaxtl.models.layers import Conv2d, Linear, global_avg_pool
from jaxtl.models.names import key_path_name
from jaxtl.optim import (
    Group,
    L2SPState,
    Labels,
    OptimizerConfig,
    ParamGroupError,
    Phase,
    Rule,
    assign,
    build_optimizer,
    carry_optimizer_state,
    full,
    l2sp,
    relative_gradient_norm_scales,
    scale_by_relative_gradient_norm,
    with_l2sp,
)
from jaxtl.train.step import make_train_step, merge_model, split_model

LR, MOMENTUM, ALPHA, BETA = 0.1, 0.9, 0.5, 0.1


class Small(nnx.Module):
    """conv1 (3 -> 4) -> relu -> layer1 (4 -> 6, stride 2) -> relu -> global average -> fc (6 -> 3); no BatchNorm."""

    head_name = "fc"

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = Conv2d(3, 4, 3, padding=1, bias=True, rngs=rngs)
        self.layer1 = Conv2d(4, 6, 3, stride=2, padding=1, bias=True, rngs=rngs)
        self.fc = Linear(6, 3, rngs=rngs)

    def blocks(self):
        return (("stem", ("conv1.",)), ("layer1", ("layer1.",)), ("head", ("fc.",)))

    def __call__(self, x):
        x = jax.nn.relu(self.conv1(x))
        x = jax.nn.relu(self.layer1(x))
        return self.fc(global_avg_pool(x))


class TorchSmall(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.layer1 = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.layer1(F.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def _flat(tree) -> dict[str, np.ndarray]:
    return {key_path_name(path): np.array(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _torch_layout(name: str, value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:
        return value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    return value.T if value.ndim == 2 else value


def _batches(steps: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        (rng.normal(size=(4, 8, 8, 3)).astype(np.float32), rng.integers(0, 3, size=4).astype(np.int32))
        for _ in range(steps)
    ]


def _anchor(opt_state, group: str) -> dict[str, np.ndarray]:
    """The anchor L2-SP keeps in ``group``'s part of build_optimizer's state, by dotted name ({} if none)."""
    nodes = jax.tree.leaves(opt_state.inner_states[group], is_leaf=lambda node: isinstance(node, L2SPState))
    anchors = [node.anchor for node in nodes if isinstance(node, L2SPState)]
    assert len(anchors) <= 1
    return _flat(anchors[0]) if anchors else {}


# --- L2-SP -----------------------------------------------------------------------------------------


def test_l2sp_with_sgd_momentum_equals_hand_computed_updates_over_three_steps():
    rng = np.random.default_rng(0)
    start = {"conv": rng.normal(size=(2, 3)), "bias": rng.normal(size=3)}
    grads = [{k: rng.normal(size=v.shape) for k, v in start.items()} for _ in range(3)]
    tx = with_l2sp(optax.sgd(LR, momentum=MOMENTUM), alpha=ALPHA)
    params = {k: jnp.asarray(v, jnp.float32) for k, v in start.items()}
    state = tx.init(params)
    expected, momentum = {k: v.copy() for k, v in start.items()}, {k: np.zeros_like(v) for k, v in start.items()}
    for g in grads:
        updates, state = tx.update({k: jnp.asarray(v, jnp.float32) for k, v in g.items()}, state, params)
        params = optax.apply_updates(params, updates)
        for k in start:  # torch.optim.SGD on loss + alpha / 2 * ||w - w0||^2: buf = m * buf + g + alpha (w - w0)
            momentum[k] = MOMENTUM * momentum[k] + g[k] + ALPHA * (expected[k] - start[k])
            expected[k] = expected[k] - LR * momentum[k]
            np.testing.assert_allclose(np.asarray(params[k]), expected[k], rtol=1e-5, atol=1e-6)
    anchor = state[0].anchor
    for k in start:  # the anchor is the start, not the current weights
        np.testing.assert_array_equal(np.asarray(anchor[k]), start[k].astype(np.float32))


def test_l2sp_refuses_a_bad_alpha_and_an_update_without_parameters():
    with pytest.raises(ValueError, match=r"alpha=-0.1 must be a finite number >= 0"):
        l2sp(-0.1)
    with pytest.raises(ValueError, match=r"alpha=nan"):
        l2sp(float("nan"))
    tx = l2sp(0.1)
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="l2sp needs the parameters"):
        tx.update(params, tx.init(params))


def _torch_trained(model: Small, batches, alpha: float) -> dict[str, np.ndarray]:
    """PyTorch's loop: cross-entropy + alpha / 2 * ||w - w0||^2 over the backbone + BETA / 2 * ||w||^2 over fc,
    torch.optim.SGD(momentum) without weight decay."""
    torch_model = TorchSmall()
    start = _flat(nnx.state(model, nnx.Param))
    torch_model.load_state_dict({name: torch.from_numpy(_torch_layout(name, v).copy()) for name, v in start.items()})
    anchor = {name: p.detach().clone() for name, p in torch_model.named_parameters()}
    optimizer = torch.optim.SGD(torch_model.parameters(), lr=LR, momentum=MOMENTUM)
    for x, y in batches:
        optimizer.zero_grad()
        loss = F.cross_entropy(torch_model(torch.from_numpy(x).permute(0, 3, 1, 2)), torch.from_numpy(y).long())
        for name, p in torch_model.named_parameters():
            if name.startswith("fc."):
                loss = loss + BETA / 2 * (p**2).sum()
            else:
                loss = loss + alpha / 2 * ((p - anchor[name]) ** 2).sum()
        loss.backward()
        optimizer.step()
    return {name: p.detach().numpy() for name, p in torch_model.named_parameters()}


def _config_groups(model):
    return assign(model, full()(model)), OptimizerConfig(
        name="sgd", lr=LR, momentum=MOMENTUM, weight_decay=BETA, l2sp_alpha=ALPHA
    )


def _python_groups(model):
    sgd = optax.sgd(LR, momentum=MOMENTUM)
    labels = Labels(
        lambda name, value: "head" if name.startswith("fc.") else "backbone",
        [
            Group("head", transform=optax.chain(optax.add_decayed_weights(BETA), sgd)),
            Group("backbone", transform=with_l2sp(sgd, alpha=ALPHA)),
        ],
    )
    return labels.assign(model), None


@pytest.mark.parametrize("route", [_config_groups, _python_groups], ids=["config", "python"])
def test_l2sp_training_equals_pytorch_with_the_penalty_in_its_loss(route):
    model, batches = Small(nnx.Rngs(1)), _batches(4)
    expected = _torch_trained(model, batches, ALPHA)
    groups, config = route(model)
    graphdef, state = split_model(model, groups)
    optimizer = build_optimizer(groups, config)
    step = make_train_step(graphdef, optimizer, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), donate=False)
    opt_state = optimizer.init(state.trainable)
    for index, (x, y) in enumerate(batches):
        state, opt_state, _ = step(state, opt_state, jnp.asarray(x), jnp.asarray(y), jnp.ones(4, bool), index)
    ours = _flat(state.trainable)
    assert ours.keys() == expected.keys()
    for name, value in ours.items():
        np.testing.assert_allclose(_torch_layout(name, value), expected[name], rtol=1e-5, atol=1e-7, err_msg=name)
    without = _torch_trained(model, batches, 0.0)  # the penalty changes the run by far more than the tolerance
    assert max(np.max(np.abs(without[n] - expected[n]) / np.abs(expected[n]).max()) for n in expected) > 1e-3


def test_the_config_route_needs_a_head_group_and_replaces_the_backbones_weight_decay():
    model = Small(nnx.Rngs(0))
    config = OptimizerConfig(name="sgd", l2sp_alpha=0.1)
    unnamed = assign(model, [Rule("fc.*", group="classifier"), Rule("*", group="backbone")])
    with pytest.raises(ParamGroupError, match=r"no group is named 'head' \(groups: classifier, backbone\)"):
        build_optimizer(unnamed, config)
    decayed = assign(model, [Rule("fc.*", group="head"), Rule("*", group="backbone", weight_decay=0.01)])
    with pytest.raises(ParamGroupError, match=r"group\(s\) backbone set weight_decay, which optim.l2sp_alpha replaces"):
        build_optimizer(decayed, config)
    groups = assign(model, full()(model))
    params = nnx.state(model, nnx.Param)
    opt_state = build_optimizer(groups, config).init(params)
    assert _anchor(opt_state, "head") == {}
    anchor, start = _anchor(opt_state, "backbone"), _flat(params)
    assert sorted(anchor) == ["conv1.bias", "conv1.weight", "layer1.bias", "layer1.weight"]
    for name, value in anchor.items():
        np.testing.assert_array_equal(value, start[name])


def _train_phase(model: Small, phase: Phase, batches, previous=None):
    """A phase as the trainer runs it: groups, optimizer state (carried from ``previous``), steps that donate.

    Returns the trained model, (groups, optimizer state) for the next phase, and copies of the phase's first
    optimizer state and of a fresh ``init``'s.
    """
    groups = phase.groups(model)
    graphdef, state = split_model(model, groups)
    optimizer = phase.optax(groups)
    fresh = optimizer.init(state.trainable)
    opt_state = fresh if previous is None else carry_optimizer_state(*previous, groups, fresh)[0]
    at_start, fresh = jax.tree.map(np.array, opt_state), jax.tree.map(np.array, fresh)  # before the step donates
    step = make_train_step(graphdef, optimizer, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    for index, (x, y) in enumerate(batches):
        state, opt_state, _ = step(state, opt_state, jnp.asarray(x), jnp.asarray(y), jnp.ones(4, bool), index)
    return merge_model(graphdef, state), (groups, opt_state), at_start, fresh


@pytest.mark.parametrize("first_policy", ["full", "last_n_blocks:1"])
def test_the_anchor_across_a_phase_boundary(first_policy):
    """A group that stays (same name, trainable in both phases) keeps the anchor of its first phase, the pretrained
    weights; a group new in a phase anchors at that phase's first weights: pretrained where they were frozen,
    fine-tuned where they trained under another name (last_n_blocks' "blocks" becomes full's "backbone")."""
    model = Small(nnx.Rngs(2))
    pretrained = _flat(nnx.state(model, nnx.Param))
    config = OptimizerConfig(name="sgd", lr=LR, momentum=MOMENTUM, weight_decay=0.0, l2sp_alpha=ALPHA)
    first = Phase("first", first_policy, steps=2, optimizer=config)
    second = Phase("second", "full", steps=2, optimizer=config)
    model, previous, _, _ = _train_phase(model, first, _batches(2, seed=1))
    after_first = _flat(nnx.state(model, nnx.Param))
    assert not np.allclose(after_first["layer1.weight"], pretrained["layer1.weight"])
    conv1_trained = not np.allclose(after_first["conv1.weight"], pretrained["conv1.weight"])
    assert conv1_trained == (first_policy == "full")
    _, _, at_start, fresh = _train_phase(model, second, _batches(2, seed=2), previous)
    anchor, fresh_anchor = _anchor(at_start, "backbone"), _anchor(fresh, "backbone")
    assert sorted(anchor) == sorted(fresh_anchor) == ["conv1.bias", "conv1.weight", "layer1.bias", "layer1.weight"]
    for name in anchor:
        np.testing.assert_array_equal(fresh_anchor[name], after_first[name], err_msg=name)  # init: the weights now
        kept = first_policy == "full" or name.startswith("conv1.")  # carried, or frozen until now
        np.testing.assert_array_equal(anchor[name], (pretrained if kept else after_first)[name], err_msg=name)


# --- Auto-RGN --------------------------------------------------------------------------------------


def _gradient(model: Small, seed: int = 0):
    graphdef, params = nnx.split(model, nnx.Param)
    x, y = _batches(1, seed)[0]

    def loss(params):
        logits = nnx.merge(graphdef, params)(jnp.asarray(x))
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean()

    return jax.grad(loss)(params), params


def test_scales_are_each_tensors_relative_gradient_norm_over_the_largest():
    grads, params = _gradient(Small(nnx.Rngs(3)))
    g, w = _flat(grads), _flat(params)
    rgn = {name: np.linalg.norm(g[name].astype(np.float64)) / np.linalg.norm(w[name].astype(np.float64)) for name in g}
    largest = max(rgn.values())
    scales = _flat(relative_gradient_norm_scales(grads, params))
    assert scales.keys() == rgn.keys()
    for name, value in scales.items():
        assert value.shape == () and value.dtype == np.float32
        np.testing.assert_allclose(value, rgn[name] / largest, rtol=1e-5, err_msg=name)
    assert sum(value == 1.0 for value in scales.values()) == 1
    assert min(scales.values()) < 0.5  # the scales differ enough to matter


def test_the_largest_rgn_tensor_moves_as_the_inner_optimizer_and_the_others_by_their_scale():
    """Adam is invariant to a gradient's scale: the scales must multiply its update, not its input."""
    grads, params = _gradient(Small(nnx.Rngs(4)), seed=1)
    inner = optax.adam(1e-2)
    tx = scale_by_relative_gradient_norm(inner)
    ours, _ = tx.update(grads, tx.init(params), params)
    plain, _ = inner.update(grads, inner.init(params), params)
    ours, plain, scales = _flat(ours), _flat(plain), _flat(relative_gradient_norm_scales(grads, params))
    top = max(scales, key=scales.get)
    np.testing.assert_array_equal(ours[top], plain[top])
    for name in ours:
        np.testing.assert_allclose(ours[name], plain[name] * scales[name], rtol=1e-6, err_msg=name)
    assert min(np.max(np.abs(ours[n])) / np.max(np.abs(plain[n])) for n in ours) < 0.5


def test_momentum_accumulates_the_gradient_and_the_scale_multiplies_each_steps_update():
    rng = np.random.default_rng(1)
    w = {"a": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
    grads = [{"a": rng.normal(size=(3, 2)).astype(np.float32), "b": 0.1 * rng.normal(size=4).astype(np.float32)}
             for _ in range(2)]  # fmt: skip
    tx = scale_by_relative_gradient_norm(optax.sgd(LR, momentum=MOMENTUM))
    params = {k: jnp.asarray(v) for k, v in w.items()}
    state, expected, buffer = tx.init(params), {k: v.astype(np.float64) for k, v in w.items()}, {"a": 0.0, "b": 0.0}
    for g in grads:
        rgn = {k: np.linalg.norm(g[k]) / np.linalg.norm(expected[k]) for k in w}
        updates, state = tx.update({k: jnp.asarray(v) for k, v in g.items()}, state, params)
        params = optax.apply_updates(params, updates)
        for k in w:  # the lr times RGN / max RGN, on torch.optim.SGD's buffer of the unscaled gradients
            buffer[k] = MOMENTUM * buffer[k] + g[k]
            expected[k] = expected[k] - LR * rgn[k] / max(rgn.values()) * buffer[k]
            np.testing.assert_allclose(np.asarray(params[k]), expected[k], rtol=1e-5, err_msg=k)


def test_a_zero_weight_gets_scale_one_without_shrinking_the_others_and_a_zero_gradient_scales_nothing():
    params = {"zero": jnp.zeros(3), "b": jnp.ones((2, 2)), "c": 2 * jnp.ones(4)}
    grads = {"zero": jnp.ones(3), "b": 0.5 * jnp.ones((2, 2)), "c": 0.5 * jnp.ones(4)}  # RGN: inf, 1 / 2, 1 / 4
    scales = relative_gradient_norm_scales(grads, params)
    assert {k: float(v) for k, v in scales.items()} == {"zero": 1.0, "b": 1.0, "c": 0.5}
    still = relative_gradient_norm_scales(jax.tree.map(jnp.zeros_like, grads), params)
    assert {k: float(v) for k, v in still.items()} == {"zero": 1.0, "b": 1.0, "c": 1.0}
    tx = scale_by_relative_gradient_norm(optax.sgd(1.0))
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(grads, tx.init(params))


def test_each_groups_largest_rgn_is_its_own_under_build_optimizer():
    """The maximum is over the tensors the transformation sees: one group's under optax.partition."""
    model = Small(nnx.Rngs(5))
    grads, params = _gradient(model, seed=2)
    tx = scale_by_relative_gradient_norm(optax.sgd(LR))
    labels = Labels(
        lambda name, value: "head" if name.startswith("fc.") else "backbone",
        [Group("head", transform=tx), Group("backbone", transform=tx)],
    )
    optimizer = build_optimizer(labels.assign(model))
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    ratios = {n: np.max(np.abs(u)) / np.max(np.abs(LR * _flat(grads)[n])) for n, u in _flat(updates).items()}
    assert max(v for n, v in ratios.items() if n.startswith("fc.")) == pytest.approx(1.0, rel=1e-6)
    assert max(v for n, v in ratios.items() if not n.startswith("fc.")) == pytest.approx(1.0, rel=1e-6)


def test_the_group_table_shows_l2sp_where_it_replaces_weight_decay():
    import jaxtl.models
    from jaxtl.optim import assign, get_policy

    model = jaxtl.models.abstract_model("resnet18", num_classes=3)
    groups = assign(model, get_policy("full:0.1")(model))
    rows = {line.split()[0]: line for line in groups.summary(1e-3, 1e-4, 0.01).splitlines()[2:]}
    assert rows["backbone"].split()[4:6] == ["l2sp", "0.01"]
    assert rows["head"].split()[4] == "0.0001"


def test_optim_auto_rgn_scales_each_tensors_sgd_update_by_its_rgn_over_its_groups_largest():
    """The config route (optim.auto_rgn) against the paper's formula by hand: lr * g * (RGN / max RGN in the group)."""
    model = Small(nnx.Rngs(3))
    grads, params = _gradient(model, seed=4)
    groups = Phase("all", "full", epochs=1).groups(model)
    optimizer = build_optimizer(
        groups, OptimizerConfig(name="sgd", lr=LR, momentum=0.0, weight_decay=0.0, auto_rgn=True)
    )
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    g, w = _flat(grads), _flat(params)
    rgn = {n: np.linalg.norm(g[n].astype(np.float64)) / np.linalg.norm(w[n].astype(np.float64)) for n in g}
    for names in ([n for n in g if n.startswith("fc.")], [n for n in g if not n.startswith("fc.")]):
        largest = max(rgn[n] for n in names)
        for n in names:
            np.testing.assert_allclose(_flat(updates)[n], -LR * g[n] * rgn[n] / largest, rtol=2e-5, atol=1e-9)
