"""Reduce-on-plateau against torch.optim.lr_scheduler.ReduceLROnPlateau: the decisions, and the updates they scale."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from torch.optim import lr_scheduler as S

from jaxtl.config import ConfigError, config_from_dict
from jaxtl.models.layers import Linear
from jaxtl.models.names import key_path_name
from jaxtl.optim import (
    OptimizerConfig,
    ParamGroupError,
    Plateau,
    Rule,
    assign,
    build_optimizer,
    get_plateau_scales,
    group_state_leaves,
    plateau_peaks,
    set_plateau_scales,
)
from jaxtl.train.state import RunState

PEAKS = {"head": 0.1, "body": 0.003}  # two groups: min_lr clamps the smaller one first


def torch_scheduler(config: OptimizerConfig, lrs) -> tuple[torch.optim.Optimizer, S.ReduceLROnPlateau]:
    """torch's scheduler with the settings ``config`` names, over one parameter group per lr."""
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    optimizer = torch.optim.SGD(groups)
    scheduler = S.ReduceLROnPlateau(
        optimizer, mode="min" if config.plateau_metric == "val_loss" else "max", factor=config.gamma,
        patience=config.plateau_patience, threshold=config.plateau_threshold,
        threshold_mode=config.plateau_threshold_mode, cooldown=config.plateau_cooldown, min_lr=config.min_lr,
        eps=config.plateau_eps,
    )  # fmt: skip
    return optimizer, scheduler


FLAT = [0.99] * 14  # a long plateau: reductions until min_lr holds every group
CASES = [
    pytest.param(
        dict(gamma=0.5, plateau_patience=2, min_lr=1e-3),
        # a tie, 1e-4 relative below the best (the threshold's edge, no improvement), just past it, then flat
        [1.0, 1.0, 1.0 * (1 - 1e-4), 0.99995, 0.9998999, *FLAT],
        id="loss-rel-ties-edge-min_lr",
    ),
    pytest.param(
        dict(gamma=0.1, plateau_patience=1, plateau_threshold=0.05, plateau_threshold_mode="abs", plateau_cooldown=2),
        # 1.95 is exactly the threshold below 2.0: not better; cooldown ignores the bad epochs after each reduction
        [2.0, 1.96, 1.95, 1.0, 1.2, 1.3, 1.3, 1.3, 0.96, 0.95, 0.95, 0.95, 0.95, 0.95],
        id="loss-abs-cooldown",
    ),
    pytest.param(
        dict(plateau_metric="val_acc1", gamma=0.2, plateau_patience=0, plateau_threshold=0.0, min_lr=5e-4),
        [0.5, 0.5, 0.6, 0.55, 0.55, 0.7, 0.7, 0.7, 0.7, 0.8],
        id="acc-rel-patience0",
    ),
    pytest.param(
        dict(
            plateau_metric="val_acc1",
            gamma=0.5,
            plateau_patience=1,
            plateau_threshold=0.01,
            plateau_threshold_mode="abs",
            plateau_cooldown=1,
            plateau_eps=1e-3,
        ),  # fmt: skip
        # body: 0.003 -> 0.0015 falls by more than eps; 0.0015 -> 0.00075 does not and is not applied
        [0.5, 0.505, 0.51, 0.52, 0.52, 0.52, 0.52, 0.52, 0.52, 0.6, 0.6, 0.6, 0.6],
        id="acc-abs-cooldown-eps",
    ),
    pytest.param(
        dict(plateau_threshold=1.0, plateau_patience=0),  # inf * (1 - 1) is nan: nothing ever improves, as in torch
        [1.0, 0.5, 0.25, 0.1],
        id="loss-rel-threshold-1",
    ),
]


@pytest.mark.parametrize("settings, values", CASES)
def test_each_groups_lr_after_each_epoch_is_torchs(settings, values):
    config = OptimizerConfig(schedule="plateau", **settings)
    optimizer, scheduler = torch_scheduler(config, PEAKS.values())
    plateau, reductions = Plateau(), 0
    for epoch, value in enumerate(values, start=1):
        scheduler.step(value)
        before = plateau
        # Each epoch starts from the record as a checkpoint's meta.json holds it: a resumed run decides the same.
        plateau = Plateau.from_json(json.loads(json.dumps(plateau.to_json())))
        plateau = plateau.step({config.plateau_metric: value, "other": math.nan}, config, PEAKS)
        expected = [group["lr"] for group in optimizer.param_groups]
        assert [plateau.lr(name, peak) for name, peak in PEAKS.items()] == expected, epoch  # exactly
        worst = math.inf if config.plateau_metric == "val_loss" else -math.inf
        assert (plateau.best if plateau.best is not None else worst) == scheduler.best, epoch
        assert (plateau.bad_epochs, plateau.cooldown_left) == (scheduler.num_bad_epochs, scheduler.cooldown_counter)
        reductions += plateau.lrs != {name: before.lr(name, peak) for name, peak in PEAKS.items()}
    assert reductions >= 2  # every case reduces more than once
    assert plateau.lr("body", PEAKS["body"]) < PEAKS["body"]


def test_min_lr_clamps_each_group_on_its_own():
    config = OptimizerConfig(schedule="plateau", gamma=0.1, plateau_patience=0, min_lr=1e-3)
    plateau = Plateau()
    for value in (1.0, 2.0, 2.0, 2.0):
        plateau = plateau.step({"val_loss": value}, config, PEAKS)
    assert plateau.lrs == {"head": pytest.approx(1e-3), "body": 1e-3}  # 0.1 -> 0.01 -> 0.001; 0.003 -> 0.001
    assert plateau.scales(PEAKS) == {"head": pytest.approx(0.01), "body": pytest.approx(1 / 3)}


class TwoLayers(nnx.Module):
    head_name = "fc"

    def __init__(self, rngs: nnx.Rngs):
        self.body = Linear(3, 4, rngs=rngs)
        self.fc = Linear(4, 2, rngs=rngs)


def _named(tree) -> dict[str, np.ndarray]:
    return {key_path_name(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _tree_like(params, named: dict[str, np.ndarray]):
    return jax.tree_util.tree_map_with_path(lambda path, _: jnp.asarray(named[key_path_name(path)]), params)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_the_scaled_updates_are_torchs_at_the_reduced_lrs_without_a_new_compile(name):
    # Two epochs of two steps each between validations; torch's scheduler and jaxtl's decide on the same values.
    config = OptimizerConfig(name=name, schedule="plateau", weight_decay=0.05, momentum=0.9, gamma=0.1,
                             plateau_patience=0, min_lr=2e-3)  # fmt: skip
    model = TwoLayers(nnx.Rngs(0))
    groups = assign(model, [Rule("fc.*", group="head", lr=0.1), Rule("*", group="body", lr=0.01)])
    peaks = plateau_peaks(groups, config)
    assert peaks == {"head": 0.1, "body": 0.01}
    optimizer = build_optimizer(groups, config)
    params = nnx.state(model, nnx.Param)
    opt_state = optimizer.init(params)
    update = jax.jit(optimizer.update)

    start = _named(params)
    torch_params = {key: torch.nn.Parameter(torch.tensor(value)) for key, value in start.items()}
    torch_groups = [
        {"params": [p for key, p in torch_params.items() if groups.labels[key] == group], "lr": lr}
        for group, lr in peaks.items()
    ]
    if name == "sgd":
        torch_optimizer = torch.optim.SGD(torch_groups, momentum=0.9, weight_decay=0.05)
    else:
        torch_optimizer = torch.optim.AdamW(torch_groups, betas=config.betas, eps=config.eps, weight_decay=0.05)
    scheduler = S.ReduceLROnPlateau(torch_optimizer, factor=0.1, patience=0, min_lr=2e-3)

    # optax's AdamW takes 1 - 0.999 ** t in float32 (1e-5 off), torch in float64: moves of 0.1 differ by 1e-6.
    # A reduction not applied would differ by the moves themselves.
    atol = 1e-7 if name == "sgd" else 1e-5
    rng = np.random.default_rng(0)
    plateau = Plateau()
    # head 0.1 -> 0.01 after epoch 2 -> min_lr 0.002 after epoch 4; body 0.01 -> 0.002 (clamped) after epoch 2
    for epoch, value in enumerate([1.0, 1.5, 0.5, 0.6, 0.7], start=1):
        for _ in range(2):
            grads = {key: rng.standard_normal(array.shape).astype(np.float32) for key, array in start.items()}
            updates, opt_state = update(_tree_like(params, grads), opt_state, params)
            params = optax.apply_updates(params, updates)
            for key, p in torch_params.items():
                p.grad = torch.tensor(grads[key])
            torch_optimizer.step()
        for key, array in _named(params).items():
            expected = torch_params[key].detach().numpy()
            np.testing.assert_allclose(array, expected, rtol=1e-5, atol=atol, err_msg=f"epoch {epoch}: {key}")
        scheduler.step(value)
        plateau = plateau.step({"val_loss": value}, config, peaks)
        opt_state = set_plateau_scales(opt_state, plateau.scales(peaks))
        assert [plateau.lr(g, peak) for g, peak in peaks.items()] == [g["lr"] for g in torch_optimizer.param_groups]
    assert plateau.lrs == {"head": 0.002, "body": 0.002}
    scales = get_plateau_scales(opt_state)
    assert scales == {"head": pytest.approx(0.02), "body": pytest.approx(0.2)}
    assert update._cache_size() == 1  # the scales are arrays of the state: one program for every lr


def test_warmup_ramps_up_to_the_peak_that_the_scale_multiplies():
    # SGD without momentum or decay: an update is -peak * min(1, k / warmup_steps) * scale * gradient.
    config = OptimizerConfig(name="sgd", schedule="plateau", momentum=0.0, weight_decay=0.0, warmup_steps=4)
    model = TwoLayers(nnx.Rngs(0))
    groups = assign(model, [Rule("fc.*", group="head", lr=0.5), Rule("*", group="body", frozen=True)])
    optimizer = build_optimizer(groups, config)
    params = nnx.state(model, nnx.Param)
    opt_state = optimizer.init(params)
    assert group_state_leaves(opt_state) == {"head": 2, "body": 0}  # the schedule's count and the scale
    ones = jax.tree.map(jnp.ones_like, params)
    found = []
    for k in range(6):
        if k == 2:
            opt_state = set_plateau_scales(opt_state, {"head": 0.1})
        updates, opt_state = optimizer.update(ones, opt_state, params)
        found.append(float(_named(updates)["fc.bias"][0]))
        assert not _named(updates)["body.weight"].any()
    np.testing.assert_allclose(found, [-0.0, -0.125, -0.025, -0.0375, -0.05, -0.05], rtol=1e-6)


def test_setting_the_scale_of_a_group_without_one_is_an_error():
    model = TwoLayers(nnx.Rngs(0))
    groups = assign(model, [Rule("fc.*", group="head"), Rule("*", group="body", frozen=True)])
    params = nnx.state(model, nnx.Param)
    with_plateau = build_optimizer(groups, OptimizerConfig(schedule="plateau")).init(params)
    with pytest.raises(ValueError, match="group 'body' holds no plateau scale"):
        set_plateau_scales(with_plateau, {"body": 0.5})
    constant = build_optimizer(groups, OptimizerConfig()).init(params)
    with pytest.raises(ValueError, match="group 'head' holds no plateau scale"):
        set_plateau_scales(constant, {"head": 0.5})
    assert get_plateau_scales(constant) == {} and get_plateau_scales(with_plateau) == {"head": 1.0}


def test_the_run_state_keeps_the_record_and_reads_checkpoints_without_one():
    plateau = Plateau(best=0.25, bad_epochs=2, cooldown_left=1, lrs={"head": 1e-4, "backbone": 1e-6})
    state = RunState(phase=1, epoch_in_phase=3, batch=2, step=40, plateau=plateau)
    assert json.loads(json.dumps(state.to_json()))["plateau"] == {
        "best": 0.25, "bad_epochs": 2, "cooldown_left": 1, "lrs": {"head": 1e-4, "backbone": 1e-6}
    }  # fmt: skip
    assert RunState.from_json(json.loads(json.dumps(state.to_json()))) == state
    old = {"phase": 1, "epoch_in_phase": 3, "step": 40}  # a checkpoint written before plateau existed
    assert RunState.from_json(old).plateau == Plateau()
    assert "plateau" not in RunState(step=3).to_json()


def test_the_plateau_config_parses_and_names_a_wrong_value():
    optim = {"schedule": "plateau", "plateau_metric": "val_acc1", "plateau_patience": 0, "min_lr": 1e-6}
    config = config_from_dict({"optim": optim}, (), "run.yaml")
    assert (config.optim.plateau_metric, config.optim.plateau_patience, config.optim.min_lr) == ("val_acc1", 0, 1e-6)
    assert (config.optim.gamma, config.optim.plateau_threshold, config.optim.plateau_threshold_mode) == (
        0.1,
        1e-4,
        "rel",
    )
    with pytest.raises(ConfigError, match="optim.plateau_patience = -1 is out of range"):
        config_from_dict({"optim": {**optim, "plateau_patience": -1}}, (), "run.yaml")
    with pytest.raises(ConfigError, match="plateau_metric"):
        config_from_dict({"optim": {**optim, "plateau_metric": "val_acc5"}}, (), "run.yaml")
    with pytest.raises(ParamGroupError, match=r"gamma=1.0 must be below 1 for schedule plateau"):
        OptimizerConfig(schedule="plateau", gamma=1.0)
    with pytest.raises(ParamGroupError, match="plateau_threshold_mode 'relative' is not one of rel, abs"):
        OptimizerConfig(schedule="plateau", plateau_threshold_mode="relative")


def test_a_phase_carrying_optimizer_state_does_not_carry_a_reduced_plateau_scale():
    """A new phase starts at its configured lrs (a new torch scheduler): carry_optimizer_state keeps scales at 1."""
    import jax
    import numpy as np

    import jaxtl.models
    from jaxtl.optim import OptimizerConfig, Phase, carry_optimizer_state, set_plateau_scales
    from jaxtl.optim.plateau import ScaleByPlateauState
    from jaxtl.train.step import split_model

    model = jaxtl.models.create("resnet18", num_classes=3)
    config = OptimizerConfig(name="sgd", lr=0.1, schedule="plateau")
    first = Phase("head", "head_only", steps=2, optimizer=config)
    second = Phase("last", "last_n_blocks:1", steps=2, optimizer=config)
    groups1, groups2 = first.groups(model), second.groups(model)
    old = first.optax(groups1).init(split_model(model, groups1)[1].trainable)
    old = set_plateau_scales(old, {"head": 0.01})
    fresh = second.optax(groups2).init(split_model(model, groups2)[1].trainable)
    carried, names = carry_optimizer_state(groups1, old, groups2, fresh)
    assert names == ["head"]
    scales = [
        float(node.scale)
        for node in jax.tree.leaves(carried, is_leaf=lambda n: isinstance(n, ScaleByPlateauState))
        if isinstance(node, ScaleByPlateauState)
    ]
    assert scales and np.all(np.asarray(scales) == 1.0)
