"""`jaxtl lr-find`: the range test's schedule, smoothing, stop and suggestions against fastai's formulas, the ramp
against per-step learning rates, the overrides it prints, and a run on the generated data (Python and CLI).

The references below are transcriptions of fastai 2.x (Apache-2.0) into numpy: fastai/callback/schedule.py
(`sched_exp`/`SchedExp`, `LRFinder`, `valley`, `steep`, `minimum`, `Learner.lr_find`) and fastai/learner.py
(`AvgSmoothLoss`, `Recorder.after_batch`, `TrainEvalCallback.after_batch`). fastai itself is not installed here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import optax
import pytest
from tiny import TINY

from jaxtl.config import ConfigError, load_config, parse_overrides
from jaxtl.train.lr_curve import (
    STOP_DIVERGED,
    STOP_DONE,
    STOP_NON_FINITE,
    LossRecord,
    SmoothedLoss,
    exponential_lrs,
    minimum,
    steep,
    suggestion_window,
    valley,
)
from jaxtl.train.lr_find import LRFindResult, collect_lr_settings, lr_find, scale_by_ramp
from jaxtl.train.run_dir import RunError

QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart.yaml"


# -- fastai, transcribed ---------------------------------------------------------------------------------------


def fastai_sched_exp(start, end, pos):
    return start * (end / start) ** pos


class FastaiAvgSmoothLoss:
    def __init__(self, beta=0.98):
        self.beta, self.count, self.val = beta, 0, 0.0

    def accumulate(self, loss):
        self.count += 1
        # torch.lerp(loss, val, beta) with beta >= 0.5: end - (end - start) * (1 - weight) (ATen/native/Lerp.h)
        self.val = self.val - (self.val - loss) * (1 - self.beta)

    @property
    def value(self):
        return self.val / (1 - self.beta**self.count)


def fastai_record(raw_losses, start_lr, end_lr, num_it, stop_div=True):
    """The recorder's lrs and losses after `Learner.lr_find`'s fit, each batch's loss given: LRFinder.before_batch
    sets SchedExp(train_iter / num_it); after the batch TrainEvalCallback (order -10) counts it, the Recorder (50)
    smooths and records, LRFinder (60) tracks the best and cancels the fit."""
    smooth, lrs, losses, train_iter, best_loss = FastaiAvgSmoothLoss(), [], [], 0, float("inf")
    for loss in raw_losses:
        lr = fastai_sched_exp(start_lr, end_lr, train_iter / num_it)
        train_iter += 1
        smooth.accumulate(loss)
        lrs.append(lr)
        losses.append(smooth.value)
        if smooth.value < best_loss:
            best_loss = smooth.value
        if smooth.value > 4 * best_loss and stop_div:
            break
        if train_iter >= num_it:
            break
    return np.array(lrs), np.array(losses)


def fastai_valley(lrs, losses):
    n = len(losses)
    max_start, max_end = 0, 0
    lds = [1] * n
    for i in range(1, n):
        for j in range(0, i):
            if (losses[i] < losses[j]) and (lds[i] < lds[j] + 1):
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    idx = max_start + int(sections) + int(sections / 2)
    return float(lrs[idx]), (float(lrs[idx]), losses[idx])


def fastai_minimum(lrs, losses):
    lr_min = lrs[losses.argmin()].item()
    loss_idx = losses[min(range(len(lrs)), key=lambda i: abs(lrs[i] - lr_min))]
    return lr_min / 10, (lr_min, loss_idx)


def fastai_steep(lrs, losses):
    grads = (losses[1:] - losses[:-1]) / (np.log(lrs[1:]) - np.log(lrs[:-1]))
    lr_steep = lrs[grads.argmin()].item()
    loss_idx = losses[min(range(len(lrs)), key=lambda i: abs(lrs[i] - lr_steep))]
    return lr_steep, (lr_steep, loss_idx)


def fastai_suggestions(recorded_lrs, recorded_losses, num_it):
    """Learner.lr_find after its fit: the recorder's points without the first num_it // 10 and the last 5, cut at
    the first NaN, through each suggestion function."""
    lrs, losses = recorded_lrs[num_it // 10 : -5], recorded_losses[num_it // 10 : -5]
    nan_idxs = np.flatnonzero(np.isnan(losses))
    if len(nan_idxs) > 0:
        drop_idx = nan_idxs.min()
        lrs, losses = lrs[:drop_idx], losses[:drop_idx]
    return {"valley": fastai_valley(lrs, losses), "steep": fastai_steep(lrs, losses),
            "minimum": fastai_minimum(lrs, losses)}  # fmt: skip


# -- the fixed curves --------------------------------------------------------------------------------------------

NUM_IT = 100
START, END = 1e-7, 10.0


def u_curve(lr):
    """A range test's loss: flat at 2.3, down to 0.7 around 1e-3, wiggling, then exploding past 0.1."""
    x = np.log10(lr)
    return 0.7 + 1.6 / (1 + np.exp(2.5 * (x + 4))) + 0.03 * np.sin(5 * x) + 0.5 * np.exp(3 * (x + 1))


def raw_losses(curve=u_curve, nan_from=None, inf_at=None):
    """One raw loss per step of the whole ramp (fastai goes on with NaN after a NaN: the parameters are NaN)."""
    losses = curve(np.array([fastai_sched_exp(START, END, i / NUM_IT) for i in range(NUM_IT)]))
    if nan_from is not None:
        losses[nan_from:] = np.nan
    if inf_at is not None:
        losses[inf_at] = np.inf
    return losses


def run_record(raw, stop_div=True) -> LRFindResult:
    """The library's record of the same steps, as lr_find's loop feeds it, as a result."""
    lrs, record = exponential_lrs(START, END, NUM_IT), LossRecord(NUM_IT, stop_div)
    for i, loss in enumerate(raw):
        stop = record.add(float(lrs[i]), float(loss))
        if stop is not None:
            break
    return LRFindResult(
        lrs=np.asarray(record.lrs), losses=np.asarray(record.losses), smoothed=np.asarray(record.smoothed),
        num_iter=NUM_IT, start_lr=START, end_lr=END, stop=stop, phase_index=0, phase_name="head",
        lr_settings={"optim.lr": 1.0},
    )  # fmt: skip


# -- schedule, smoothing, stop -----------------------------------------------------------------------------------


def test_the_ramp_is_fastais_sched_exp_at_train_iter_over_num_it():
    lrs = exponential_lrs(START, END, NUM_IT)
    expected = [fastai_sched_exp(START, END, i / NUM_IT) for i in range(NUM_IT)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-15, atol=0)
    assert lrs[0] == 1e-7
    # The last step runs at 1e-7 * 1e8 ** 0.99 = 10 ** 0.92, below end_lr, as fastai's does.
    assert lrs[-1] == pytest.approx(10**0.92, rel=1e-13) and lrs[-1] == pytest.approx(8.317637711026709, rel=1e-13)


def test_smoothing_is_fastais_avg_smooth_loss():
    smoothing, reference = SmoothedLoss(), FastaiAvgSmoothLoss()
    # Hand-derived: the first value is the loss itself; the second (0.98 * 0.02 * 2 + 0.02 * 1) / (1 - 0.98 ** 2);
    # an infinite loss makes it infinite, not NaN (torch's lerp), and a NaN one NaN.
    assert smoothing.add(2.0) == pytest.approx(2.0, rel=1e-15)
    assert smoothing.add(1.0) == pytest.approx(0.0592 / 0.0396, rel=1e-14)
    assert SmoothedLoss().add(math.inf) == math.inf and math.isnan(SmoothedLoss().add(math.nan))
    smoothing = SmoothedLoss()
    for loss in raw_losses():
        reference.accumulate(float(loss))
        assert smoothing.add(float(loss)) == reference.value


@pytest.mark.parametrize(
    "raw, stop_div, stop, steps",
    [
        (raw_losses(), True, STOP_DIVERGED, None),
        (raw_losses(), False, STOP_DONE, NUM_IT),
        (raw_losses(nan_from=60), True, STOP_NON_FINITE, 61),
        (raw_losses(inf_at=55), True, STOP_DIVERGED, 56),
        (raw_losses(lambda lr: 2.3 - 0.1 * np.log10(lr / START)), True, STOP_DONE, NUM_IT),
    ],
    ids=["diverges", "no-stop-div", "nan", "inf", "decreasing"],
)
def test_the_record_and_its_stop_are_fastais(raw, stop_div, stop, steps):
    result = run_record(raw, stop_div)
    lrs, losses = fastai_record(raw, START, END, NUM_IT, stop_div)
    assert result.stop == stop
    if steps is not None:
        assert len(result.lrs) == steps
    if stop == STOP_NON_FINITE:  # fastai trains on to num_it, recording NaN; the steps before are the same
        assert len(lrs) == NUM_IT and np.isnan(losses[steps - 1 :]).all()
        lrs, losses = lrs[:steps], losses[:steps]
    np.testing.assert_array_equal(result.lrs, lrs)
    np.testing.assert_array_equal(result.smoothed, losses)
    np.testing.assert_array_equal(result.losses, raw[: len(result.losses)])


def test_the_u_curve_diverges_where_its_smoothed_loss_passes_four_times_its_lowest():
    result = run_record(raw_losses())
    assert result.smoothed[-1] > 4 * result.smoothed.min() and result.smoothed[-2] <= 4 * result.smoothed[:-1].min()
    assert 0.1 < result.lrs[-1] < END and len(result.lrs) < NUM_IT


# -- suggestions -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, stop_div",
    [
        (raw_losses(), True),
        (raw_losses(), False),
        (raw_losses(nan_from=60), True),
        (raw_losses(nan_from=60), False),
        (raw_losses(inf_at=55), True),
        (raw_losses(lambda lr: 2.3 - 0.1 * np.log10(lr / START)), True),
    ],
    ids=["diverges", "no-stop-div", "nan", "nan-no-stop-div", "inf", "decreasing"],
)
def test_suggestions_are_fastais_on_fixed_curves(raw, stop_div):
    result = run_record(raw, stop_div)
    expected = fastai_suggestions(*fastai_record(raw, START, END, NUM_IT, stop_div), NUM_IT)
    suggestions = result.suggestions
    assert set(suggestions) == set(expected)
    for name, (lr, (at_lr, at_loss)) in expected.items():
        assert suggestions[name] == (lr, at_lr, at_loss), name


def test_suggestions_on_the_u_curve_fall_in_its_valley():
    suggestions = run_record(raw_losses()).suggestions
    # The curve falls fastest at 1e-4 (its sigmoid's middle) and is lowest near 1e-2, where it starts to rise.
    assert 1e-5 < suggestions["steep"].lr < 1e-3
    assert 1e-3 < suggestions["minimum"].at_lr < 1e-1 and suggestions["minimum"].lr == suggestions["minimum"].at_lr / 10
    assert 1e-5 < suggestions["valley"].lr < 1e-2


def test_the_window_leaves_out_the_first_tenth_the_last_five_and_from_the_first_nan():
    lrs, losses = np.arange(1.0, 101.0), np.linspace(3.0, 1.0, 100)
    window_lrs, window_losses = suggestion_window(lrs, losses, 100)
    np.testing.assert_array_equal(window_lrs, lrs[10:95])
    np.testing.assert_array_equal(window_losses, losses[10:95])
    losses[50] = np.nan
    window_lrs, _ = suggestion_window(lrs, losses, 100)
    np.testing.assert_array_equal(window_lrs, lrs[10:50])
    window_lrs, _ = suggestion_window(lrs[:60], np.ones(60), 100)  # stopped after 60 steps: its last 5 go
    np.testing.assert_array_equal(window_lrs, lrs[10:55])
    assert len(suggestion_window(lrs[:12], losses[:12], 100)[0]) == 0


@pytest.mark.parametrize(
    "losses, index",
    [
        # valley lengths 1, 2, 1, 3, 4, 1, 5, 1: the valley ends at 6, starts at 6 - 5 = 1, 1 + int(5/3) + int(5/6)
        ([5.0, 4.0, 6.0, 3.0, 2.0, 7.0, 1.0, 8.0], 2),
        ([1.0, 2.0, 3.0, 4.0, 5.0], 0),  # no decrease: the first point
        ([2.0, 1.0, 3.0, 4.0, 5.0], -1),  # a valley of the first two points: start -1, index -1, as fastai's
        ([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0], 3),  # end 9, start 9 - 10: -1 + int(10/3) + int(10/6)
    ],
)
def test_valley_by_hand_and_as_fastai(losses, index):
    lrs, losses = np.logspace(-5, -1, len(losses)), np.array(losses)
    suggestion = valley(lrs, losses)
    assert suggestion.lr == lrs[index] and suggestion.at_loss == losses[index]
    assert (suggestion.lr, (suggestion.at_lr, suggestion.at_loss)) == fastai_valley(lrs, losses)


def test_steep_and_minimum_by_hand():
    lrs, losses = np.array([1e-3, 1e-2, 1e-1, 1.0]), np.array([2.0, 1.9, 1.0, 3.0])
    # slopes per unit of ln(lr): -0.1 / ln 10, -0.9 / ln 10, 2 / ln 10; the steepest starts at 1e-2
    assert steep(lrs, losses) == (1e-2, 1e-2, 1.9)
    assert minimum(lrs, losses) == (1e-1 / 10, 1e-1, 1.0)
    for ours, fastai in ((steep, fastai_steep), (minimum, fastai_minimum)):
        lr, (at_lr, at_loss) = fastai(lrs, losses)
        assert ours(lrs, losses) == (lr, at_lr, at_loss)


def test_too_few_points_for_a_suggestion_is_one_clear_error():
    raw = np.r_[np.full(5, 1.0), np.full(95, 100.0)]  # diverges at step 6
    result = run_record(raw)
    assert result.stop == STOP_DIVERGED and len(result.lrs) == 6
    with pytest.raises(RunError, match=r"after 6 of 100 steps.*start lower \(start_lr\) or take more steps"):
        result.summary()
    assert result.to_json()["suggestions"] is None


def test_json_holds_no_nan():
    result = run_record(raw_losses(nan_from=60))
    data = json.loads(json.dumps(result.to_json(), allow_nan=False))
    assert data["smoothed"][-1] is None and data["losses"][-1] is None and len(data["lrs"]) == 61
    assert data["stop"] == "non-finite" and data["suggestions"]["valley"]["lr"] == result.suggestions["valley"].lr


# -- the ramp and the overrides ----------------------------------------------------------------------------------


def test_scale_by_ramp_multiplies_each_steps_update_by_its_factor():
    params = {"w": np.array([0.5, -1.0], np.float32)}
    grads = {"w": np.array([1.0, -2.0], np.float32)}
    optimizer = optax.chain(optax.sgd(0.5), scale_by_ramp([1.0, 10.0, 100.0]))
    state = optimizer.init(params)
    for factor in (1.0, 10.0, 100.0, 100.0):  # the last factor holds after the ramp
        updates, state = optimizer.update(grads, state, params)
        np.testing.assert_array_equal(updates["w"], -0.5 * factor * grads["w"])


def test_the_ramp_after_adamw_is_adamw_at_each_steps_lr():
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 4)).astype(np.float32)}
    factors = exponential_lrs(1e-4, 1.0, 6) / 1e-3
    ramped = optax.chain(optax.adamw(1e-3, weight_decay=0.1), scale_by_ramp(factors))
    ramped_state, reference_state, reference_params = ramped.init(params), optax.adamw(1.0).init(params), params
    for factor in factors:
        grads = {"w": rng.normal(size=(3, 4)).astype(np.float32)}
        updates, ramped_state = ramped.update(grads, ramped_state, params)
        # AdamW's state does not depend on its lr: each step's reference is AdamW at that step's lr.
        reference = optax.adamw(1e-3 * factor, weight_decay=0.1)
        expected, reference_state = reference.update(grads, reference_state, reference_params)
        np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-6)
        params = optax.apply_updates(params, updates)
        reference_params = optax.apply_updates(reference_params, expected)


def phase_groups(config, index):
    from jaxtl import models

    return config.phases[index].groups(models.abstract_model(config.model.arch, num_classes=3))


@pytest.mark.parametrize(
    "overrides, index, peak, settings",
    [
        ([], 0, 3e-3, {"phases.0.lrs.head": 1.0}),
        ([], 1, 1e-3, {"phases.1.lrs.head": 1.0, "phases.1.lrs.blocks": 0.1}),
        (["optim.lr=2e-3", "phases.0.lrs={}", "phases.0.policy=full:0.1"], 0, 2e-3, {"optim.lr": 1.0}),
        (
            ["optim.lr=1e-3", "phases.0.lrs={}", "phases.0.policy=null",
             "phases.0.rules=[{pattern: 'fc.*', group: head, lr_mult: 4}, {pattern: '*', group: rest, frozen: true}]"],
            0, 4e-3, {"optim.lr": 0.25},
        ),
        (["phases.0.lrs={}", "phases.0.optimizer={name: sgd, lr: 0.1}"], 0, 0.1, {"phases.0.optimizer.lr": 1.0}),
    ],
    ids=["head-lrs", "differential-lrs", "lr-mult", "lr-mult-above-1", "phase-optimizer"],
)  # fmt: skip
def test_the_overrides_set_every_key_a_trained_groups_lr_comes_from(overrides, index, peak, settings):
    config = load_config(QUICKSTART, overrides)
    found_peak, found = collect_lr_settings(config, index, phase_groups(config, index))
    assert found_peak == pytest.approx(peak, rel=1e-15) and found == pytest.approx(settings, rel=1e-15)
    applied = load_config(QUICKSTART, [*overrides, *with_settings(found).overrides(2e-2)])
    own = config.phases[index].optimizer
    assert applied.phases[index].optimizer == (None if own is None else dataclasses.replace(own, lr=2e-2))
    before, after = group_lrs(config, index), group_lrs(applied, index)
    assert max(after.values()) == pytest.approx(2e-2, rel=1e-12)  # the suggestion is the new peak
    for name, lr in after.items():
        assert lr / 2e-2 == pytest.approx(before[name] / peak, rel=1e-12)  # every group keeps its ratio


def group_lrs(config, index):
    groups = phase_groups(config, index)
    optimizer = config.phases[index].optimizer or config.optim
    return {name: g.lr or optimizer.lr * g.lr_mult for name, g in groups.groups.items() if not g.frozen}


def with_settings(settings):
    return dataclasses.replace(run_record(raw_losses()), lr_settings=settings)


def test_the_set_arguments_are_what_jaxtl_train_takes():
    result = with_settings({"phases.1.lrs.head": 1.0, "phases.1.lrs.blocks": 0.1})
    assert result.set_arguments(3e-4) == "--set phases.1.lrs.head=3.0e-04 --set phases.1.lrs.blocks=3.0e-05"
    assert parse_overrides(result.overrides(3e-4)) == [("phases.1.lrs.head", 3e-4), ("phases.1.lrs.blocks", 3e-5)]


# -- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"phase": 2}, r"phase=2 is not a phase of the config; its phases .*: 0 'head', 1 'last_block'"),
        ({"phase": "tail"}, r"phase='tail' is not a phase of the config"),
        ({"phase": True}, r"phase=True is not a phase"),
        ({"start_lr": 1.0, "end_lr": 0.1}, r"start_lr=1 must be below end_lr=0.1"),
        ({"start_lr": 0.0}, r"start_lr=0.0 must be a finite number > 0"),
        ({"end_lr": math.inf}, r"end_lr=inf must be a finite number > 0"),
        ({"num_iter": 6}, r"num_iter=6 must be an integer >= 7: the suggestions leave out"),
        ({"num_iter": 50.0}, r"num_iter=50.0 must be an integer"),
    ],
)
def test_bad_arguments_are_one_clear_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        lr_find(QUICKSTART, overrides=TINY, **kwargs)


# -- a range test on the generated data --------------------------------------------------------------------------


def model_values(model):
    import jax
    from flax import nnx

    arrays = {str(path): np.array(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model))}
    modules = (module for _, module in nnx.iter_modules(model))
    modes = [module.use_running_average for module in modules if hasattr(module, "use_running_average")]
    return arrays, modes


@pytest.mark.slow
def test_lr_find_trains_a_copy_at_the_ramps_lrs_and_leaves_the_model_as_it_was():
    from jaxtl import models

    model = models.create("resnet18", num_classes=3, seed=0)
    arrays, modes = model_values(model)
    result = lr_find(
        QUICKSTART, phase="last_block", model=model, overrides=TINY, start_lr=1e-6, end_lr=1e-2, num_iter=8,
        log=lambda line: None,
    )  # fmt: skip
    after_arrays, after_modes = model_values(model)
    assert after_modes == modes and arrays.keys() == after_arrays.keys()
    for name, values in arrays.items():
        np.testing.assert_array_equal(after_arrays[name], values, err_msg=name)
    np.testing.assert_allclose(result.lrs, [fastai_sched_exp(1e-6, 1e-2, i / 8) for i in range(8)], rtol=1e-15)
    assert result.stop == STOP_DONE and result.phase_index == 1 and result.phase_name == "last_block"
    assert result.lr_settings == {"phases.1.lrs.head": 1.0, "phases.1.lrs.blocks": pytest.approx(0.1, rel=1e-15)}
    assert np.isfinite(result.losses).all() and len(set(result.losses.tolist())) == 8  # every step trained
    # Three classes, a new head: the first batch's loss is near ln 3.
    assert abs(result.losses[0] - math.log(3)) < 1.0


def test_the_cli_prints_the_set_line_and_writes_the_curve(tmp_path):
    run_dir = tmp_path / "run"
    sets = [f"run_dir={run_dir}", *TINY]
    command = [sys.executable, "-m", "jaxtl.cli", "lr-find", str(QUICKSTART), "--phase", "1", "--num-iter", "30"]
    result = subprocess.run(
        [*command, *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, timeout=600,
        env=os.environ,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    plot = run_dir / "lr_find" / "phase1-head.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    assert sorted(p.name for p in run_dir.iterdir()) == ["lr_find"]  # no checkpoint, no config: not a run
    data = json.loads(plot.with_suffix(".json").read_text())
    np.testing.assert_allclose(data["lrs"], [fastai_sched_exp(1e-7, 10.0, i / 30) for i in range(len(data["lrs"]))])
    line = re.search(r"^use \(valley, fastai's default\): (.*)$", result.stdout, re.M).group(1)
    overrides = [item for item in line.split("--set ") if item.strip()]
    parsed = parse_overrides([item.strip() for item in overrides])
    valley_lr = data["suggestions"]["valley"]["lr"]
    assert parsed == [("phases.0.lrs.head", float(f"{valley_lr:.1e}"))]
    config = load_config(QUICKSTART, [*TINY, *(item.strip() for item in overrides)])
    assert config.phases[0].lrs == {"head": float(f"{valley_lr:.1e}")}
    for name in ("valley", "steep", "minimum/10"):
        assert re.search(rf"^  {re.escape(name)} +\d\.\de[-+]\d\d  --set phases\.0\.lrs\.head=", result.stdout, re.M)


def test_the_cli_names_a_bad_phase_and_a_bad_out(tmp_path):
    base = [sys.executable, "-m", "jaxtl.cli", "lr-find", str(QUICKSTART)]
    for args, message in (
        (["--phase", "3"], "jaxtl lr-find: error: --phase 3: "),
        (["--phase", "0"], "has 2 phase(s): 1 'head', 2 'last_block'"),
        (["--out", str(tmp_path / "curve.svg")], "curve.svg: give a .png file"),
    ):
        result = subprocess.run([*base, *args], capture_output=True, text=True, timeout=120, env=os.environ)
        assert result.returncode == 2 and message in result.stderr, result.stderr
