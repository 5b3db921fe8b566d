"""Per-group diagnostics: the step's gradient, update and weight norms against an independent ``jax.grad`` of the
same loss written out in jax.numpy, the epoch's means, distances and BatchNorm drift against numpy, and a run's
records of them (metrics.jsonl, TensorBoard, ``jaxtl inspect RUN_DIR``) across a resume."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from devices import host_devices_env
from flax import nnx
from tiny import TINY

import jaxtl
from jaxtl.config import config_from_dict
from jaxtl.models.layers import BatchNorm2d, Conv2d, Linear, global_avg_pool
from jaxtl.models.state_dict import state_dict
from jaxtl.optim import OptimizerConfig, Rule, assign, build_optimizer, get_policy
from jaxtl.train import Callback, fit, load_checkpoint
from jaxtl.train.diagnostics import (
    add_step,
    drift,
    epoch_diagnostics,
    relative_change,
    starting_weights,
    step_means,
)
from jaxtl.train.drain import Drain
from jaxtl.train.state import EpochTotals, RunState
from jaxtl.train.step import make_train_step, merge_model, split_model
from jaxtl.weights import Preprocessing, WeightSpec, save_converted_weights

EPS, MOMENTUM = 1e-5, 0.1  # BatchNorm2d's defaults (torch's)


class Tiny(nnx.Module):
    """conv-BN-relu twice, pool, fc: the model contract's names, small enough to write out by hand."""

    head_name = "fc"

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = Conv2d(3, 4, 3, padding=1, rngs=rngs)
        self.bn1 = BatchNorm2d(4)
        self.conv2 = Conv2d(4, 6, 3, padding=1, rngs=rngs)
        self.bn2 = BatchNorm2d(6)
        self.fc = Linear(6, 3, rngs=rngs)

    def blocks(self):
        return (("stem", ("conv1.", "bn1.")), ("layer1", ("conv2.", "bn2.")), ("head", ("fc.",)))

    def __call__(self, x):
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        x = jax.nn.relu(self.bn2(self.conv2(x)))
        return self.fc(global_avg_pool(x))


def create_tiny() -> Tiny:
    """Tiny with BatchNorm affine parameters and running statistics away from their 1 / 0 init."""
    model = Tiny(nnx.Rngs(0))
    rng = np.random.default_rng(1)
    for bn in (model.bn1, model.bn2):
        n = bn.num_features
        bn.weight.set_value(jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32))
        bn.bias.set_value(jnp.asarray(rng.normal(0, 0.2, n), jnp.float32))
        bn.running_mean.set_value(jnp.asarray(rng.normal(0, 0.5, n), jnp.float32))
        bn.running_var.set_value(jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32))
    return model


# The stem frozen with its BatchNorm in train mode (its statistics drift, its parameters never move).
RULES = [
    Rule("re:(conv1|bn1)\\..*", group="stem", frozen=True, bn="train"),
    Rule("re:(conv2|bn2)\\..*", group="body"),
    Rule("fc.*", group="head"),
]


def _conv(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest"
    )


def _batch_norm(x, weight, bias):
    """Train mode: the batch's mean and biased variance over N, H, W (torch's BatchNorm2d)."""
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    return (x - mean) / jnp.sqrt(var + EPS) * weight + bias


def reference_loss(p, x, y):
    """The mean cross-entropy of Tiny in train mode, written out on a {torchvision name: array} dict."""
    h = jax.nn.relu(_batch_norm(_conv(x, p["conv1.weight"]), p["bn1.weight"], p["bn1.bias"]))
    h = jax.nn.relu(_batch_norm(_conv(h, p["conv2.weight"]), p["bn2.weight"], p["bn2.bias"]))
    logits = jnp.dot(h.mean((1, 2)), p["fc.weight"], precision="highest") + p["fc.bias"]
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])


def l2(arrays) -> float:
    return math.sqrt(sum(float(np.sum(np.square(np.asarray(a, np.float64)))) for a in arrays))


def batch(rows=8, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(rows, 8, 8, 3)), jnp.float32), jnp.arange(rows) % 3


def one_step(rules=RULES, accumulate_steps=1, with_groups=True, sharding=None):
    """(groups, arrays before, the model after, the step's metrics) of one SGD step of a fresh Tiny; ``sharding``:
    the batch's over the devices."""
    model = create_tiny()
    groups = assign(model, rules)
    before = state_dict(model)
    graphdef, state = split_model(model, groups)
    optimizer = build_optimizer(groups, OptimizerConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-2))
    step = make_train_step(
        graphdef, optimizer, donate=False, accumulate_steps=accumulate_steps, groups=groups if with_groups else None
    )
    x, y = batch()
    inputs = (x, y, jnp.ones(len(y), bool))
    if sharding is not None:
        inputs = jax.device_put(inputs, sharding)
    state, _, metrics = step(state, optimizer.init(state.trainable), *inputs, 0)
    return groups, before, merge_model(graphdef, state), jax.device_get(metrics)


@pytest.fixture(scope="module")
def stepped():
    return one_step()


def test_the_steps_group_norms_are_those_of_an_independent_gradient_the_update_and_the_weights(stepped):
    groups, before, model, metrics = stepped
    after = state_dict(model)
    x, y = batch()
    loss, grads = jax.value_and_grad(reference_loss)({k: jnp.asarray(v) for k, v in before.items()}, x, y)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)  # the reference is the step's loss
    assert set(metrics["groups"]) == {"body", "head"}  # the frozen stem has no gradient and no update
    for name in ("body", "head"):
        params, norms = groups.names(name), metrics["groups"][name]
        np.testing.assert_allclose(norms["grad_norm"], l2(grads[p] for p in params), rtol=1e-4)
        np.testing.assert_allclose(norms["update_norm"], l2(after[p] - before[p] for p in params), rtol=1e-4)
        np.testing.assert_allclose(norms["weight_norm"], l2(before[p] for p in params), rtol=1e-6)
    assert norms["update_norm"] > 0 and norms["grad_norm"] > 0


def test_a_step_without_groups_returns_no_group_metrics():
    *_, metrics = one_step(with_groups=False)
    assert set(metrics) == {"loss", "correct", "count"}


def test_accumulated_micro_batches_report_the_norms_of_the_whole_batchs_gradient():
    """Without train-mode BatchNorm, k micro-batches sum to the whole batch's gradient: same norms."""
    rules = [Rule("re:(conv1|bn1)\\..*", group="stem", frozen=True), Rule("re:(conv2|bn2)\\..*", group="body",
             bn="frozen"), Rule("fc.*", group="head")]  # fmt: skip
    *_, whole = one_step(rules)
    *_, accumulated = one_step(rules, accumulate_steps=4)
    for name in ("body", "head"):
        for key in ("grad_norm", "update_norm", "weight_norm"):
            np.testing.assert_allclose(accumulated["groups"][name][key], whole["groups"][name][key], rtol=2e-5)


def test_on_two_devices_the_batch_sharded_over_them_gives_the_same_norms(stepped):
    """A second process: the device count is fixed when jax starts."""
    env = host_devices_env(2, JAX_PLATFORMS="cpu")
    code = (
        "import sys, json, jax; sys.path[:0] = sys.argv[1:]; import test_diagnostics as t; "
        "from jaxtl.data import data_sharding; assert jax.device_count() == 2; "
        "*_, m = t.one_step(sharding=data_sharding(8)); "
        "print(json.dumps(jax.tree.map(float, m['groups'])))"
    )
    here = Path(__file__).parent
    result = subprocess.run([sys.executable, "-c", code, str(here), str(here.parent)], cwd=here.parents[1], env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = json.loads(result.stdout.splitlines()[-1])
    *_, metrics = stepped
    assert set(sharded) == set(metrics["groups"])
    for name, norms in metrics["groups"].items():
        assert sharded[name] == pytest.approx(jax.tree.map(float, norms), rel=1e-5)


def test_an_epochs_distances_and_batchnorm_drift_against_numpy(stepped):
    groups, before, model, metrics = stepped
    after = state_dict(model)
    record = epoch_diagnostics(groups, add_step({}, metrics["groups"]), before, model)
    assert list(record) == ["stem", "body", "head"]
    # The frozen stem: not moved, but its train-mode BatchNorm took one step of the batch's statistics.
    assert set(record["stem"]) == {"distance", "bn_mean_drift", "bn_var_drift"} and record["stem"]["distance"] == 0
    x, _ = batch()
    conv1 = np.asarray(_conv(x, jnp.asarray(before["conv1.weight"])), np.float64)
    count = conv1.size // conv1.shape[-1]
    mean, var = conv1.mean((0, 1, 2)), conv1.var((0, 1, 2)) * count / (count - 1)  # torch keeps the unbiased one
    mean0, var0 = before["bn1.running_mean"], before["bn1.running_var"]
    np.testing.assert_allclose(record["stem"]["bn_mean_drift"], MOMENTUM * l2([mean - mean0]) / l2([mean0]), rtol=1e-4)
    np.testing.assert_allclose(record["stem"]["bn_var_drift"], MOMENTUM * l2([var - var0]) / l2([var0]), rtol=1e-4)
    body = groups.names("body")
    np.testing.assert_allclose(
        record["body"]["distance"], l2(after[p] - before[p] for p in body) / l2(before[p] for p in body), rtol=1e-5
    )
    for key, statistic in (("bn_mean_drift", "running_mean"), ("bn_var_drift", "running_var")):
        name = f"bn2.{statistic}"
        np.testing.assert_allclose(
            record["body"][key], l2([after[name] - before[name]]) / l2([before[name]]), rtol=1e-5
        )
    head, fc = metrics["groups"]["head"], ("fc.weight", "fc.bias")
    assert record["head"] == pytest.approx(
        {
            "grad_norm": float(head["grad_norm"]),
            "update_ratio": float(head["update_norm"]) / float(head["weight_norm"]),
            "distance": l2(after[p] - before[p] for p in fc) / l2(before[p] for p in fc),
        },
        rel=1e-5,
    )


def test_a_zero_reference_has_no_relative_change_and_a_group_without_batchnorm_no_drift():
    assert relative_change([np.ones(3)], [np.zeros(3)]) is None
    assert relative_change([np.array([3.0, 4.0]), np.array([1.0])], [np.zeros(2), np.ones(1)]) == 5.0
    model = create_tiny()
    groups = assign(model, RULES)
    arrays = state_dict(model)
    assert drift(groups, arrays, arrays) == {
        "stem": {"distance": 0.0, "bn_mean_drift": 0.0, "bn_var_drift": 0.0},
        "body": {"distance": 0.0, "bn_mean_drift": 0.0, "bn_var_drift": 0.0},
        "head": {"distance": 0.0},
    }


class Events:
    """The event writer's scalars, as logged."""

    def __init__(self):
        self.logged: list[tuple[dict, int]] = []

    def scalar(self, tag, value, step):
        self.logged.append(({tag: value}, step))

    def scalars(self, values, step):
        self.logged.append((dict(values), step))


STEPS = [
    {"head": {"grad_norm": 3.0, "update_norm": 0.2, "weight_norm": 4.0}, "body": {"grad_norm": 1.0,
     "update_norm": 0.1, "weight_norm": 0.0}},
    {"head": {"grad_norm": 5.0, "update_norm": 0.3, "weight_norm": 2.0}, "body": {"grad_norm": 2.0,
     "update_norm": 0.5, "weight_norm": 1.0}},
]  # fmt: skip


def drained(steps, first=1, totals=None):
    drain = Drain("p", 0, totals or EpochTotals(), (), Events(), lambda: "")
    for number, groups in enumerate(steps, start=first):
        drain.pending.append((number, {"loss": np.float32(1.0), "correct": 2, "count": 4, "groups": groups}))
    drain()
    return drain


def test_the_drain_averages_each_groups_steps_and_a_resumed_epoch_averages_the_same():
    drain = drained(STEPS)
    means = step_means(drain.totals.groups)
    # The mean of the ratios (0.05, 0.15), not the ratio of the means; body's first step has no ratio (zero weights).
    assert means == {"head": {"grad_norm": 4.0, "update_ratio": pytest.approx(0.1)}, "body": {"grad_norm": 1.5,
                     "update_ratio": 0.5}}  # fmt: skip
    assert drain.events.logged[-1] == (
        {"groups/head/grad_norm_step": 4.0, "groups/head/update_ratio_step": pytest.approx(0.1),
         "groups/body/grad_norm_step": 1.5, "groups/body/update_ratio_step": 0.5}, 2,
    )  # fmt: skip
    # A mid-epoch checkpoint after step 1: its meta.json's sums carry the epoch on.
    first = drained(STEPS[:1])
    saved = json.loads(json.dumps(RunState(batch=1, step=1, totals=first.totals).to_json()))
    resumed = drained(STEPS[1:], first=2, totals=RunState.from_json(saved).totals)
    assert resumed.totals == drain.totals


def test_the_starting_weights_are_a_copy_or_are_loaded_again_on_resume(tmp_path):
    model = jaxtl.models.create("resnet18", num_classes=3, seed=4)
    snapshot = starting_weights(model, None, 3, None, print)
    expected = state_dict(model)
    model.fc.bias.set_value(model.fc.bias[...] + 1.0)  # a later change of the model leaves the snapshot
    assert all(np.array_equal(snapshot[k], expected[k]) for k in expected)
    path = save_pretrained(tmp_path / "weights", seed=5)
    config = config_from_dict({"model": {"arch": "resnet18", "weights": str(path)}})
    lines: list[str] = []
    rebuilt = starting_weights(model, config, 3, {"source": "/nowhere/test.pth"}, lines.append)
    loaded = state_dict(jaxtl.models.create("resnet18", num_classes=3, weights=path))
    assert all(np.array_equal(rebuilt[k], loaded[k]) for k in loaded) and not lines
    assert starting_weights(model, config, 3, {"source": "x", "sha256": "ab12"}, lines.append) is None
    assert "are not those the run started from (sha256 ab12)" in lines[-1]
    gone = config_from_dict({"model": {"arch": "resnet18", "weights": str(tmp_path / "gone")}})
    assert starting_weights(model, gone, 3, {"source": "x"}, lines.append) is None
    assert lines[-1].startswith("per-group distance and BatchNorm drift are not recorded: the starting weights cannot")


# -- a run -----------------------------------------------------------------------------------------


def save_pretrained(path, seed):
    """Converted weights of a resnet18 with a 3-way head whose BatchNorm statistics are not torch's 0 / 1 init."""
    model = jaxtl.models.create("resnet18", num_classes=3, seed=seed)
    arrays = state_dict(model)
    rng = np.random.default_rng(seed)
    for name, array in arrays.items():
        if name.endswith("running_mean"):
            arrays[name] = rng.normal(0, 0.3, array.shape).astype(np.float32)
        elif name.endswith("running_var"):
            arrays[name] = rng.uniform(0.5, 2.0, array.shape).astype(np.float32)
    spec = WeightSpec(
        arch="resnet18", name="test", source="/nowhere/test.pth", num_classes=3, categories=("a", "b", "c"),
        preprocessing=Preprocessing(resize_size=73, crop_size=64),
    )  # fmt: skip
    return save_converted_weights(path, arrays, spec)


class Interrupt(Exception):
    pass


class StopAtStep(Callback):
    def __init__(self, step):
        self.step = step

    def on_step(self, step, metrics):
        if step == self.step:
            raise Interrupt(step)


def run_config(tmp_path, weights, name):
    # quickstart's phases: head_only on cached features (1 epoch of 5 steps), then layer4 too (2 epochs).
    return TINY + [
        f"model.weights={weights}", "phases.0.epochs=1", "phases.1.epochs=2", "train.checkpoint_every_steps=3",
        "train.log_every=1", "train.group_diagnostics=true", f"run_dir={tmp_path / name}",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory, persistent_compilation_cache):
    """The uninterrupted run, its steps compiled through the cache that the interrupted and resumed runs read."""
    directory = tmp_path_factory.mktemp("diagnostics")
    weights = save_pretrained(directory / "weights", seed=5)
    result = fit("configs/quickstart.yaml", overrides=run_config(directory, weights, "whole"), log=lambda line: None)
    return directory, weights, result


@pytest.mark.slow
def test_a_run_records_each_groups_diagnostics_and_inspect_prints_them(run, capsys):
    directory, weights, result = run
    head, first, last = (record["groups"] for record in result.history)
    assert list(head) == ["head", "backbone"] and list(first) == list(last) == ["head", "blocks", "frozen"]
    assert list(head["head"]) == ["grad_norm", "update_ratio", "distance"]  # no BatchNorm in the head
    assert head["backbone"] == {"distance": 0.0, "bn_mean_drift": 0.0, "bn_var_drift": 0.0}  # frozen, BN frozen
    assert last["frozen"] == {"distance": 0.0, "bn_mean_drift": 0.0, "bn_var_drift": 0.0}
    assert list(last["blocks"]) == ["grad_norm", "update_ratio", "distance", "bn_mean_drift", "bn_var_drift"]
    assert all(value > 0 for value in last["blocks"].values())
    # The last epoch's distances: the latest checkpoint against the weights the run started from.
    start = state_dict(jaxtl.models.create("resnet18", num_classes=3, weights=weights))
    model, _ = load_checkpoint(result.latest_checkpoint, average=False)
    end = state_dict(model)
    groups = assign(model, get_policy("last_n_blocks:1")(model))
    for group in ("head", "blocks"):
        names = groups.names(group)
        expected = l2(end[n] - start[n] for n in names) / l2(start[n] for n in names)
        np.testing.assert_allclose(last[group]["distance"], expected, rtol=1e-6)
    means = [f"{name}.running_mean" for name, label in groups.batch_norms.items() if groups.labels[f"{name}.weight"]
             == "blocks"]  # fmt: skip
    expected = l2(end[n] - start[n] for n in means) / l2(start[n] for n in means)
    np.testing.assert_allclose(last["blocks"]["bn_mean_drift"], expected, rtol=1e-6)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(result.run_dir / "tensorboard")).Reload()
    logged = events.Scalars("groups/blocks/distance")
    assert [e.step for e in logged] == [10, 15]
    np.testing.assert_allclose([e.value for e in logged], [first["blocks"]["distance"], last["blocks"]["distance"]],
                               rtol=1e-6)  # fmt: skip
    assert len(events.Scalars("groups/head/grad_norm_step")) == 15  # train.log_every=1: every step

    from jaxtl.cli import main

    assert main(["inspect", str(result.run_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{result.run_dir}: 3 epoch(s) in metrics.jsonl, phase(s) head, last_block"
    row = next(line.split() for line in out if line.split()[:3] == ["3", "last_block", "blocks"])
    assert [float(cell) for cell in row[3:]] == pytest.approx([last["blocks"][k] for k in last["blocks"]], rel=1e-3)


@pytest.mark.slow
def test_a_resumed_run_reports_what_an_uninterrupted_one_does(run):
    directory, weights, whole = run
    overrides = run_config(directory, weights, "interrupted")
    with pytest.raises(Interrupt):  # at phase 2's first epoch's last step, after its mid-epoch checkpoint at step 9
        fit("configs/quickstart.yaml", overrides=overrides, callbacks=[StopAtStep(10)], log=lambda line: None)
    resumed = fit("configs/quickstart.yaml", overrides=overrides, resume=True, log=lambda line: None)
    assert [r["groups"] for r in resumed.history] == [r["groups"] for r in whole.history]  # bitwise
