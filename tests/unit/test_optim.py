"""Parameter groups, policies, the optimizer and phases, against hand-computed updates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch.optim import lr_scheduler as S

import jaxtl.models
from jaxtl.models.layers import BatchNorm2d, Conv2d, Linear, global_avg_pool
from jaxtl.optim import (
    Group,
    OptimizerConfig,
    ParamGroupError,
    Phase,
    Rule,
    assign,
    assign_labels,
    build_optimizer,
    carry_optimizer_state,
    get_policy,
    group_state_leaves,
    progressive_unfreezing,
    schedule,
)
from jaxtl.train.step import make_train_step, split_model


class Tiny(nnx.Module):
    """stem (conv1, bn1) -> layer1 (conv, bn) -> layer2 (conv, bn) -> fc, with jaxtl's layers."""

    head_name = "fc"

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = Conv2d(3, 4, 3, padding=1, rngs=rngs)
        self.bn1 = BatchNorm2d(4)
        self.layer1 = nnx.Dict(conv=Conv2d(4, 4, 3, padding=1, bias=True, rngs=rngs), bn=BatchNorm2d(4))
        self.layer2 = nnx.Dict(conv=Conv2d(4, 6, 3, stride=2, padding=1, rngs=rngs), bn=BatchNorm2d(6))
        self.fc = Linear(6, 3, rngs=rngs)

    def blocks(self):
        return (("stem", ("conv1.", "bn1.")), ("layer1", ("layer1.",)), ("layer2", ("layer2.",)), ("head", ("fc.",)))

    def __call__(self, x):
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        x = jax.nn.relu(self.layer1["bn"](self.layer1["conv"](x)))
        x = jax.nn.relu(self.layer2["bn"](self.layer2["conv"](x)))
        return self.fc(global_avg_pool(x))


def tiny():
    return Tiny(nnx.Rngs(0))


# --- rules -----------------------------------------------------------------------------------------


def test_first_matching_rule_wins_and_globs_cross_dots():
    groups = assign(tiny(), [Rule("fc.*", group="head"), Rule("*.bias", group="biases"), Rule("*", group="rest")])
    assert groups.names("head") == ["fc.bias", "fc.weight"]
    assert groups.names("biases") == ["bn1.bias", "layer1.bn.bias", "layer1.conv.bias", "layer2.bn.bias"]
    assert len(groups.names("rest")) == 6
    assert list(groups.groups) == ["head", "biases", "rest"]


def test_regex_rules_match_whole_names():
    groups = assign(tiny(), [Rule(r"re:layer[12]\.conv\..*", group="convs"), Rule("*", group="rest", frozen=True)])
    assert groups.names("convs") == ["layer1.conv.bias", "layer1.conv.weight", "layer2.conv.weight"]
    with pytest.raises(ParamGroupError, match="invalid regular expression"):
        Rule("re:layer[")


def test_a_parameter_no_rule_matches_is_an_error_naming_it():
    with pytest.raises(ParamGroupError, match=r"parameter 'bn1.bias' matches no rule .*catch-all"):
        assign(tiny(), [Rule("fc.*"), Rule("layer*")])


def test_a_rule_that_matches_nothing_is_an_error_naming_it():
    with pytest.raises(ParamGroupError, match=r"rule\(s\) matching no parameter: 'layer9.\*'"):
        assign(tiny(), [Rule("fc.*"), Rule("layer9.*"), Rule("*", frozen=True)])
    with pytest.raises(ParamGroupError, match=r"matching no parameter: 'fc.weight'"):  # shadowed by an earlier rule
        assign(tiny(), [Rule("fc.*", group="head"), Rule("fc.weight"), Rule("*", frozen=True)])


def test_everything_frozen_is_an_error():
    with pytest.raises(ParamGroupError, match="every parameter is frozen"):
        assign(tiny(), [Rule("*", frozen=True)])


def test_bn_policy_on_a_group_without_batch_norms_is_an_error():
    with pytest.raises(ParamGroupError, match=r"group 'head' sets bn='frozen' but holds no BatchNorm weights"):
        assign(tiny(), [Rule("fc.*", group="head", bn="frozen"), Rule("*", frozen=True)])
    with pytest.raises(ParamGroupError, match="bn='eval' is not one of train, frozen"):
        Rule("*", bn="eval").to_group()


def test_rules_giving_one_group_two_settings_are_an_error():
    with pytest.raises(ParamGroupError, match="rules for group 'g' disagree"):
        assign(tiny(), [Rule("fc.*", group="g", lr=1e-3), Rule("*", group="g", lr=1e-4)])


def test_label_function_and_its_errors():
    groups = assign_labels(
        tiny(),
        lambda name, array: "head" if name.startswith("fc.") else ("convs" if array.ndim == 4 else "frozen"),
        [Group("head", lr=1e-3), Group("convs", lr_mult=0.1), Group("frozen", frozen=True)],
    )
    assert groups.names("convs") == ["conv1.weight", "layer1.conv.weight", "layer2.conv.weight"]
    with pytest.raises(ParamGroupError, match=r"labelled 'nope', which is not a group"):
        assign_labels(tiny(), lambda name, array: "nope", [Group("a")])
    with pytest.raises(ParamGroupError, match="group\\(s\\) without parameters: unused"):
        assign_labels(tiny(), lambda name, array: "a", [Group("a"), Group("unused")])


def test_bn_policy_defaults_follow_freezing_and_are_applied():
    model = tiny()
    groups = assign(
        model, [Rule("layer2.*", group="l2"), Rule("fc.*", group="head"), Rule("*", group="rest", frozen=True)]
    )
    assert groups.batch_norms == {"bn1": "frozen", "layer1.bn": "frozen", "layer2.bn": "train"}
    model.train()
    groups.apply_bn_policy(model)
    assert (model.bn1.use_running_average, model.layer1["bn"].use_running_average) == (True, True)
    assert model.layer2["bn"].use_running_average is False


# --- built-in policies on the real architectures ---------------------------------------------------

RESNET18 = jaxtl.models.abstract_model("resnet18", num_classes=5)
EFFNET_B0 = jaxtl.models.abstract_model("efficientnet_b0", num_classes=5)


def counts(model, policy):
    groups = assign(model, get_policy(policy)(model))
    return {name: len(groups.names(name)) for name in groups.groups}, groups


def test_head_only():
    for model, head in (
        (RESNET18, ["fc.bias", "fc.weight"]),
        (EFFNET_B0, ["classifier.1.bias", "classifier.1.weight"]),
    ):
        found, groups = counts(model, "head_only")
        assert groups.names("head") == head and groups.groups["backbone"].frozen
        assert set(groups.batch_norms.values()) == {"frozen"}
    assert counts(RESNET18, "head_only")[0] == {"head": 2, "backbone": 60}
    assert counts(EFFNET_B0, "head_only")[0] == {"head": 2, "backbone": 211}


def test_last_n_blocks():
    found, groups = counts(RESNET18, "last_n_blocks:1")
    assert found == {"head": 2, "blocks": 15, "frozen": 45}
    assert all(n.startswith("layer4.") for n in groups.names("blocks"))
    assert {m for m, p in groups.batch_norms.items() if p == "train"} == {
        "layer4.0.bn1", "layer4.0.bn2", "layer4.0.downsample.1", "layer4.1.bn1", "layer4.1.bn2"
    }  # fmt: skip
    found, groups = counts(EFFNET_B0, "last_n_blocks:1")
    assert found == {"head": 2, "blocks": 16, "frozen": 195}
    assert {n.split(".")[1] for n in groups.names("blocks")} == {"7", "8"}  # last stage + final 1x1 conv
    assert counts(RESNET18, "last_n_blocks:5")[0] == {"head": 2, "blocks": 60}
    with pytest.raises(ParamGroupError, match="has 5 blocks before its head"):
        counts(RESNET18, "last_n_blocks:6")


def test_full_discriminative_and_layerwise():
    found, groups = counts(RESNET18, "full:0.1")
    assert found == {"head": 2, "backbone": 60} and groups.groups["backbone"].lr_mult == 0.1
    found, groups = counts(RESNET18, "discriminative:0.5")
    assert found == {"head": 2, "layer4": 15, "layer3": 15, "layer2": 15, "layer1": 12, "stem": 3}
    assert [g.lr_mult for g in groups.groups.values()] == [1, 0.5, 0.25, 0.125, 0.0625, 0.03125]
    found, groups = counts(RESNET18, "layerwise_lr_decay:0.5")
    assert list(found) == ["head", "layer4.1", "layer4.0", "layer3.1", "layer3.0", "layer2.1", "layer2.0",
                           "layer1.1", "layer1.0", "stem"]  # fmt: skip
    assert groups.groups["stem"].lr_mult == 0.5**9
    found, groups = counts(EFFNET_B0, "layerwise_lr_decay:0.9")
    assert list(found)[:3] == ["head", "features.8", "features.7.0"] and list(found)[-1] == "stem"
    assert len(found) == 19 and sum(found.values()) == 213


def test_bitfit_and_norm_only():
    found, groups = counts(RESNET18, "bitfit")
    assert found == {"head": 2, "biases": 20, "frozen": 40}
    assert all(n.endswith(".bias") for n in groups.names("biases"))
    found, groups = counts(EFFNET_B0, "bitfit")
    assert found == {"head": 2, "biases": 81, "frozen": 130}  # BN biases and squeeze-excitation conv biases
    found, groups = counts(RESNET18, "norm_only")
    assert found == {"head": 2, "norms": 40, "frozen": 20}
    assert set(groups.batch_norms.values()) == {"train"}


def test_surgical_trains_the_head_and_one_block_group():
    # ResNet-18: conv1/bn1 (3 tensors) + layer1 (12), layer2 (15: its downsample), layer4 (15), fc (2).
    found, groups = counts(RESNET18, "surgical:first")
    assert found == {"head": 2, "block": 15, "frozen": 45}
    assert {n.split(".")[0] for n in groups.names("block")} == {"conv1", "bn1", "layer1"}
    found, groups = counts(RESNET18, "surgical:middle")
    assert {n.split(".")[0] for n in groups.names("block")} == {"layer2"} and found["block"] == 15
    found, groups = counts(RESNET18, "surgical:last")
    assert {n.split(".")[0] for n in groups.names("block")} == {"layer4"} and found["block"] == 15
    # EfficientNet-B0: seven stages features.1-7 (features.8, the last 1x1 conv, rides with the last); middle is 4.
    _, groups = counts(EFFNET_B0, "surgical:middle")
    assert {".".join(n.split(".")[:2]) for n in groups.names("block")} == {"features.4"}


@pytest.mark.parametrize("spec, message", [("nope", "unknown policy"),
                                           ("last_n_blocks", "needs an argument: last_n_blocks:1"),
                                           ("surgical", "needs an argument: surgical:first"),
                                           ("surgical:top", "the block is one of first, middle, last"),
                                           ("head_only:3", "takes no argument"),
                                           ("full:x", "is not a float")])  # fmt: skip
def test_policy_spec_errors(spec, message):
    with pytest.raises(ParamGroupError, match=message):
        get_policy(spec)


def test_summary_answers_which_parameters_are_trainable():
    groups = assign(RESNET18, get_policy("last_n_blocks:1")(RESNET18))
    text = groups.summary(base_lr=1e-3, default_weight_decay=0.01)
    assert "62 parameter tensors, 11,179,077 parameters; trainable: 17 tensors, 8,396,293 parameters" in text
    assert "layer4.* (15 keys)" in text and "fc.* (2 keys)" in text
    frozen_line = next(line for line in text.splitlines() if line.strip().startswith("frozen"))
    assert "frozen" in frozen_line.split()[3] and "conv1.weight" in frozen_line


# --- the optimizer against hand-computed updates -----------------------------------------------


def adamw_reference(p, grads, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    """torch.optim.AdamW, by hand: decoupled decay, bias-corrected moments, eps outside the root."""
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return p


def sgd_reference(p, grads, lr, wd, momentum):
    buf = None
    for g in grads:
        g = g + wd * p
        buf = g if buf is None else momentum * buf + g
        p = p - lr * buf
    return p


def run_steps(model, groups, config, n=3):
    """n train steps; returns the gradients seen by each trainable leaf (recomputed outside the step)."""
    graphdef, state = split_model(model, groups)
    optimizer = build_optimizer(groups, config)
    opt_state = optimizer.init(state.trainable)
    step = make_train_step(graphdef, optimizer, donate=False)
    rng = np.random.default_rng(0)
    history = []
    for _ in range(n):
        images = jnp.asarray(rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
        labels = jnp.asarray(rng.integers(0, 3, 4), jnp.int32)
        mask = jnp.ones(4, bool)
        grads = jax.grad(_loss, argnums=1)(graphdef, state.trainable, state, images, labels, mask)
        history.append({k: np.asarray(v) for k, v in _flat(grads).items()})
        state, opt_state, _ = step(state, opt_state, images, labels, mask, 0)
    return state, opt_state, history


def _loss(graphdef, trainable, state, images, labels, mask):
    from jaxtl.train.losses import CrossEntropy
    from jaxtl.train.step import _inputs

    model = nnx.merge(graphdef, trainable, state.frozen, state.rest, copy=True)
    return CrossEntropy()(model(_inputs(images, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))), labels, mask)


def _flat(state):
    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_updates_equal_hand_computed_per_group(name):
    model = tiny()
    start = {k: np.asarray(v) for k, v in _flat(nnx.state(model)).items()}
    rules = [Rule("fc.*", group="head", lr=0.05), Rule("layer2.*", group="l2", lr_mult=0.1, weight_decay=0.0),
             Rule("*", group="rest", frozen=True)]  # fmt: skip
    groups = assign(model, rules)
    config = OptimizerConfig(name=name, lr=0.02, weight_decay=0.1, momentum=0.9)
    state, opt_state, history = run_steps(model, groups, config)
    trained = _flat(state.trainable)
    for key, value in trained.items():
        group = groups.groups[groups.labels[key]]
        lr = group.lr if group.lr is not None else config.lr * group.lr_mult
        wd = group.weight_decay if group.weight_decay is not None else config.weight_decay
        grads = [h[key] for h in history]
        if name == "adamw":
            expected = adamw_reference(start[key], grads, lr, wd)
        else:
            expected = sgd_reference(start[key], grads, lr, wd, config.momentum)
        np.testing.assert_allclose(np.asarray(value), expected, rtol=2e-5, atol=1e-6, err_msg=key)
        assert not np.array_equal(np.asarray(value), start[key])
    frozen = _flat(state.frozen)
    assert set(frozen) == set(groups.names("rest"))
    for key, value in frozen.items():
        assert np.array_equal(np.asarray(value), start[key]), key  # bit-identical
    held = group_state_leaves(opt_state)
    count, moments = (1, 2) if name == "adamw" else (0, 1)  # AdamW: step count, mu, nu; SGD: momentum
    assert held == {"head": count + moments * 2, "l2": count + moments * 3, "rest": 0}
    stats = _flat(state.rest)
    for key in ("bn1.running_mean", "bn1.running_var", "layer1.bn.running_mean"):
        assert np.array_equal(np.asarray(stats[key]), start[key]), key  # frozen group: BN in eval mode
    for key in ("layer2.bn.running_mean", "layer2.bn.running_var"):
        assert not np.array_equal(np.asarray(stats[key]), start[key]), key  # train group: updated


def test_frozen_groups_hold_no_optimizer_state_even_in_a_full_tree():
    model = tiny()
    groups = assign(model, [Rule("fc.*", group="head"), Rule("*", group="rest", frozen=True)])
    optimizer = build_optimizer(groups, OptimizerConfig())
    params = nnx.state(model, nnx.Param)
    opt_state = optimizer.init(params)
    assert group_state_leaves(opt_state) == {"head": 1 + 2 * 2, "rest": 0}  # count + mu/nu of 2 leaves
    updates, _ = optimizer.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
    for key, value in _flat(updates).items():
        assert (np.asarray(value) == 0).all() == (groups.labels[key] == "rest"), key


def test_no_weight_decay_patterns_exempt_parameters():
    model = tiny()
    groups = assign(model, [Rule("fc.*", group="head", lr=0.1), Rule("*", frozen=True)])
    config = OptimizerConfig(name="sgd", momentum=0.0, weight_decay=0.5, no_weight_decay=("*.bias",))
    optimizer = build_optimizer(groups, config)
    params = nnx.state(model, nnx.Param)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zero, optimizer.init(params), params)
    flat, start = _flat(updates), _flat(params)
    np.testing.assert_allclose(flat["fc.weight"], -0.1 * 0.5 * np.asarray(start["fc.weight"]), rtol=1e-6)
    assert (np.asarray(flat["fc.bias"]) == 0).all()


def test_schedules_scale_each_groups_peak():
    from jaxtl.optim import schedule

    config = OptimizerConfig(schedule="warmup_cosine", warmup_steps=10, final_lr_fraction=0.1)
    s = schedule(config, 0.5, total_steps=110)
    assert float(s(0)) == 0.0 and float(s(10)) == pytest.approx(0.5) and float(s(110)) == pytest.approx(0.05)
    assert float(s(60)) == pytest.approx(0.05 + 0.45 * 0.5)
    one_cycle = schedule(OptimizerConfig(schedule="one_cycle"), 1.0, total_steps=100)
    assert max(float(one_cycle(i)) for i in range(100)) == pytest.approx(1.0, rel=1e-3)
    with pytest.raises(ParamGroupError, match="needs the number of steps"):
        schedule(config, 0.5, total_steps=None)


# --- the compiled step skips the frozen backward -----------------------------------------------


SIZE = 128  # layer4 at 4x4: its convs run as XLA convs, whose flops count no padding (as the taps' would)


def step_flops(model, policy):
    groups = assign(model, get_policy(policy)(model))
    graphdef, state = split_model(model, groups)
    optimizer = build_optimizer(groups, OptimizerConfig())
    step = make_train_step(graphdef, optimizer, donate=False)
    images = jnp.zeros((2, SIZE, SIZE, 3), jnp.uint8)
    args = (state, optimizer.init(state.trainable), images, jnp.zeros(2, jnp.int32), jnp.ones(2, bool), 0)
    return step.lower(*args).compile().cost_analysis()["flops"]


def test_head_only_and_last_block_steps_skip_the_frozen_backward():
    model = jaxtl.models.create("resnet18", num_classes=5)
    full = step_flops(model, "full")
    head = step_flops(model, "head_only")
    last = step_flops(model, "last_n_blocks:1")
    model.eval()
    forward = jax.jit(lambda x: model(x)).lower(jnp.zeros((2, SIZE, SIZE, 3))).compile().cost_analysis()["flops"]
    # A backward pass costs about twice the forward: full ~3x forward, head-only ~1x.
    assert full > 2.5 * forward
    assert head < 1.1 * forward
    assert forward < last < 0.5 * full  # layer4's backward only: 2 of 18 layers' worth


# --- phases --------------------------------------------------------------------------------------


def test_phase_transition_carries_the_state_of_parameters_that_stay():
    model = tiny()
    first = Phase("head", "head_only", steps=2, lrs={"head": 0.01})
    second = Phase("last", "last_n_blocks:1", steps=2, lrs={"head": 0.01, "blocks": 0.001})
    groups1 = first.groups(model)
    state, opt_state, _ = run_steps(model, groups1, first.optimizer, n=2)
    model = nnx.merge(split_model(model, groups1)[0], *state)
    groups2 = second.groups(model)
    graphdef, state2 = split_model(model, groups2)
    fresh = second.optax(groups2).init(state2.trainable)
    carried, names = carry_optimizer_state(groups1, opt_state, groups2, fresh)
    assert names == ["head"]
    old_adam = opt_state.inner_states["head"].inner_state[0]
    new_adam = carried.inner_states["head"].inner_state[0]
    assert int(new_adam.count) == 2
    for old, new in zip(jax.tree.leaves(old_adam.mu), jax.tree.leaves(new_adam.mu), strict=True):
        assert np.array_equal(np.asarray(old), np.asarray(new))
    blocks = carried.inner_states["blocks"].inner_state[0]
    assert int(blocks.count) == 0 and all(not np.asarray(x).any() for x in jax.tree.leaves(blocks.mu))
    assert groups2.groups["head"].lr == 0.01 and groups2.groups["blocks"].lr == 0.001


def test_a_carried_group_starts_the_next_phases_schedule_at_its_first_step():
    # SGD without momentum or decay: an update is -lr(schedule count) * gradient, by hand.
    config = OptimizerConfig(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.0, schedule="warmup_cosine",
                             warmup_steps=1, final_lr_fraction=0.0)  # fmt: skip
    model = tiny()
    first = Phase("head", "head_only", steps=3, optimizer=config)
    second = Phase("last", "last_n_blocks:1", steps=4, optimizer=config, lrs={"head": 0.1, "blocks": 0.01})
    groups1, groups2 = first.groups(model), second.groups(model)
    trainable1 = split_model(model, groups1)[1].trainable
    optimizer1 = first.optax(groups1, 3)
    state1 = optimizer1.init(trainable1)
    grads1 = jax.tree.map(jnp.ones_like, trainable1)
    for _ in range(3):
        _, state1 = optimizer1.update(grads1, state1, trainable1)
    trainable2 = split_model(model, groups2)[1].trainable
    optimizer2 = second.optax(groups2, 4)
    carried, names = carry_optimizer_state(groups1, state1, groups2, optimizer2.init(trainable2))
    assert names == ["head"]
    grads2 = jax.tree.map(jnp.ones_like, trainable2)
    # The second phase's schedule: 0 at its step 0 (warmup), the peak 0.1 at step 1, then cosine to 0
    # at step 4. A head that kept the first phase's count (3) would run at lr(3) = 0.0146, then lr(4) = 0.
    expected = [0.0, 0.1, 0.1 * 0.5 * (1 + np.cos(np.pi / 3))]
    for lr in expected:
        updates, carried = optimizer2.update(grads2, carried, trainable2)
        flat = _flat(updates)
        np.testing.assert_allclose(flat["fc.weight"], -lr * np.ones((6, 3)), rtol=1e-6, atol=1e-9)
        # The new group (lr 0.01) starts its schedule at step 0 too.
        np.testing.assert_allclose(flat["layer2.conv.weight"], -lr / 10 * np.ones((3, 3, 4, 6)), rtol=1e-6, atol=1e-9)


def test_a_phase_can_hold_every_batchnorm_in_eval_mode_while_its_groups_train():
    # The recipe's model.apply(set_batchnorm_eval) for fine-tuning on little data, as a phase setting.
    model = tiny()
    held = Phase("all", "full", steps=1, bn="frozen").groups(model)
    assert set(held.batch_norms.values()) == {"frozen"} and held.groups["backbone"].bn_policy == "frozen"
    assert set(Phase("all", "full", steps=1).groups(model).batch_norms.values()) == {"train"}
    graphdef, state = split_model(model, held)
    optimizer = build_optimizer(held, OptimizerConfig(name="sgd", lr=0.1))
    images = jax.random.randint(jax.random.key(0), (4, 8, 8, 3), 0, 256).astype(jnp.uint8)
    after, _, _ = make_train_step(graphdef, optimizer, donate=False)(
        state, optimizer.init(state.trainable), images, jnp.array([0, 1, 2, 0]), jnp.ones(4, bool), 0
    )
    for a, b in zip(jax.tree.leaves(state.rest), jax.tree.leaves(after.rest), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # running statistics kept
    assert not np.array_equal(state.trainable["bn1"]["weight"][...], after.trainable["bn1"]["weight"][...])
    with pytest.raises(ParamGroupError, match="bn='eval' is not one of train, frozen"):
        Phase("all", "full", steps=1, bn="eval")


def test_progressive_unfreezing_is_three_phases():
    phases = progressive_unfreezing(epochs=(2, 1, 3))
    model = RESNET18
    found = [list(p.groups(model).groups) for p in phases]
    assert found == [["head", "backbone"], ["head", "blocks", "frozen"], ["head", "backbone"]]
    assert [p.epochs for p in phases] == [2, 1, 3]
    assert phases[2].groups(model).groups["backbone"].lr == 1e-5


def test_phase_errors():
    with pytest.raises(ParamGroupError, match="unknown group\\(s\\) blocks; its groups are head, backbone"):
        Phase("p", "head_only", steps=1, lrs={"blocks": 1e-3}).groups(RESNET18)
    with pytest.raises(ParamGroupError, match="sets lrs for frozen group\\(s\\) backbone"):
        Phase("p", "head_only", steps=1, lrs={"backbone": 1e-3}).groups(RESNET18)
    with pytest.raises(ParamGroupError, match="exactly one of steps and epochs"):
        Phase("p", "head_only")
    with pytest.raises(ParamGroupError, match="at least 1"):
        Phase("p", "head_only", epochs=0)


def test_the_custom_freezing_transforms_of_the_design_docs():
    import optax

    from jaxtl import optim

    def convs_slow_norms_fast(model):
        return [
            optim.Rule(f"{model.head_name}.*", group="head"),
            optim.Rule(r"re:.*\.(bn\d|downsample\.1)\.(weight|bias)|bn1\..*", group="norms", lr_mult=10.0, bn="train"),
            optim.Rule("layer4.*", group="layer4", lr_mult=0.1),
            optim.Rule("*", group="frozen", frozen=True),
        ]

    groups = optim.assign(RESNET18, convs_slow_norms_fast(RESNET18))
    assert {k: len(groups.names(k)) for k in groups.groups} == {"head": 2, "norms": 40, "layer4": 5, "frozen": 15}
    assert set(groups.batch_norms.values()) == {"train"}
    groups = optim.assign_labels(
        RESNET18,
        lambda name, w: "convs" if w.ndim == 4 else "rest",
        [optim.Group("convs", transform=optax.lion(1e-4)), optim.Group("rest", lr=1e-3)],
    )
    assert len(groups.names("convs")) == 20
    model = tiny()
    groups = optim.assign_labels(model, lambda name, w: "convs" if w.ndim == 4 else "rest",
                                 [optim.Group("convs", transform=optax.sgd(0.5)),
                                  optim.Group("rest", frozen=True)])  # fmt: skip
    params = nnx.state(model, nnx.Param)
    optimizer = optim.build_optimizer(groups)
    updates, _ = optimizer.update(jax.tree.map(jnp.ones_like, params), optimizer.init(params), params)
    flat = _flat(updates)
    assert (np.asarray(flat["conv1.weight"]) == -0.5).all() and (np.asarray(flat["fc.weight"]) == 0).all()


def test_bf16_compute_keeps_float32_parameters_and_statistics():
    model = tiny()
    groups = assign(model, get_policy("full")(model))
    graphdef, state = split_model(model, groups)
    optimizer = build_optimizer(groups, OptimizerConfig(lr=1e-3))
    images = jax.random.randint(jax.random.key(1), (4, 12, 12, 3), 0, 256).astype(jnp.uint8)
    labels, mask = jnp.array([0, 1, 2, 0]), jnp.ones(4, bool)
    f32_step = make_train_step(graphdef, optimizer, donate=False)
    bf16_step = make_train_step(graphdef, optimizer, compute_dtype=jnp.bfloat16, donate=False)
    args = (state, optimizer.init(state.trainable), images, labels, mask, 0)
    # The convolutions and matrix products run in bf16 ...
    jaxpr = str(jax.make_jaxpr(bf16_step)(*args))
    convs = [line for line in jaxpr.splitlines() if "conv_general_dilated" in line or "dot_general" in line]
    assert convs and all("bf16" in line for line in convs)
    # ... on float32 parameters, optimizer state and BatchNorm statistics, which stay float32.
    (new16, opt16, m16), (new32, _, m32) = bf16_step(*args), f32_step(*args)
    for tree in (new16.trainable, new16.rest, opt16):
        assert {leaf.dtype for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)} == {
            jnp.dtype(jnp.float32)
        }
    # The same step to bf16 rounding: loss, updated parameters and running statistics.
    assert float(m16["loss"]) == pytest.approx(float(m32["loss"]), rel=1e-2)
    for a, b in zip(jax.tree.leaves(new16.rest), jax.tree.leaves(new32.rest), strict=True):
        if jnp.issubdtype(a.dtype, jnp.floating):
            np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2)
    moved16 = jax.tree.map(lambda new, old: new - old, new16.trainable, state.trainable)
    moved32 = jax.tree.map(lambda new, old: new - old, new32.trainable, state.trainable)
    flat16, flat32 = jax.tree_util.tree_leaves_with_path(moved16), jax.tree.leaves(moved32)
    for (path, a), b in zip(flat16, flat32, strict=True):
        if "layer1" in str(path) and "conv" in str(path) and "bias" in str(path):
            continue  # a conv bias right before BatchNorm: zero gradient in exact arithmetic, rounding noise here
        # AdamW's first step moves each parameter by about lr * sign(gradient): the signs agree almost everywhere.
        assert np.mean(np.sign(a) == np.sign(b)) > 0.9, path


def test_a_padded_batch_trains_like_the_same_examples_without_padding():
    # A loader pads its last batch (3 examples here) to the fixed batch size with masked zero rows:
    # BatchNorm statistics, running stats, loss and update must be those of the 3 examples alone,
    # as torch computes them on its smaller last batch.
    model = tiny()
    groups = assign(model, get_policy("full")(model))
    graphdef, state = split_model(model, groups)
    # SGD: Adam would blow the rounding noise of a zero gradient (the conv bias before a BN) up to lr.
    optimizer = build_optimizer(groups, OptimizerConfig(name="sgd", lr=1e-1))
    step = make_train_step(graphdef, optimizer, donate=False)
    images = jax.random.randint(jax.random.key(2), (3, 12, 12, 3), 0, 256).astype(jnp.uint8)
    labels = jnp.array([0, 1, 2])
    opt_state = optimizer.init(state.trainable)
    exact = step(state, opt_state, images, labels, jnp.ones(3, bool), 0)
    padded_images = jnp.concatenate([images, jnp.zeros((1, 12, 12, 3), jnp.uint8)])
    padded = step(state, opt_state, padded_images, jnp.array([0, 1, 2, 0]), jnp.array([True, True, True, False]), 0)
    assert float(padded[2]["loss"]) == pytest.approx(float(exact[2]["loss"]), rel=1e-6)
    assert int(padded[2]["count"]) == 3
    for a, b in zip(jax.tree.leaves((padded[0], padded[1])), jax.tree.leaves((exact[0], exact[1])), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Without the mask, the zero row would have moved the running statistics.
    unmasked = step(state, opt_state, padded_images, jnp.array([0, 1, 2, 0]), jnp.ones(4, bool), 0)
    assert not np.allclose(unmasked[0].rest["bn1"]["running_mean"][...], exact[0].rest["bn1"]["running_mean"][...])


def _torch_lrs(make_scheduler, steps: int, lr: float) -> np.ndarray:
    """The LR torch's scheduler gives before each of ``steps`` optimizer steps (one scheduler.step() after each)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = make_scheduler(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return np.asarray(lrs)


TORCH_SCHEDULES = [
    pytest.param(dict(schedule="step", step_size=7, gamma=0.5), lambda o: S.StepLR(o, 7, 0.5), id="StepLR"),
    pytest.param(
        dict(schedule="multistep", milestones=(5, 12, 30), gamma=0.3),
        lambda o: S.MultiStepLR(o, [5, 12, 30], 0.3),
        id="MultiStepLR",
    ),  # fmt: skip
    pytest.param(dict(schedule="exponential", gamma=0.95), lambda o: S.ExponentialLR(o, 0.95), id="ExponentialLR"),
    pytest.param(
        dict(schedule="cosine_restarts", restart_steps=10, final_lr_fraction=0.01),
        lambda o: S.CosineAnnealingWarmRestarts(o, 10, 1, eta_min=0.001),
        id="WarmRestarts-1",
    ),  # fmt: skip
    pytest.param(
        dict(schedule="cosine_restarts", restart_steps=5, restart_mult=2),
        lambda o: S.CosineAnnealingWarmRestarts(o, 5, 2),
        id="WarmRestarts-2",
    ),  # fmt: skip
    pytest.param(
        dict(schedule="cosine_restarts", restart_steps=3, restart_mult=3, final_lr_fraction=0.1),
        lambda o: S.CosineAnnealingWarmRestarts(o, 3, 3, eta_min=0.01),
        id="WarmRestarts-3",
    ),  # fmt: skip
]


@pytest.mark.parametrize("settings, make_scheduler", TORCH_SCHEDULES)
def test_torch_schedules_give_torchs_lr_at_every_step(settings, make_scheduler):
    lr_schedule = jax.jit(schedule(OptimizerConfig(lr=0.1, **settings), 0.1, 130))
    ours = np.asarray([lr_schedule(jnp.int32(k)) for k in range(130)])  # optax counts in int32, on the device
    # float32 on the device against torch's float64: relative 2e-6, and 1e-7 of the peak near eta_min = 0
    np.testing.assert_allclose(ours, _torch_lrs(make_scheduler, 130, 0.1), rtol=2e-6, atol=1e-8)


def test_milestones_must_increase():
    with pytest.raises(ParamGroupError, match=r"milestones \[5, 3\] must increase"):
        OptimizerConfig(schedule="multistep", milestones=(5, 3))
