"""`jaxtl sweep`'s pieces: policy specs -> phases, run configs, the aggregation against statistics/numpy, the files
written, the table, and which runs a continued sweep reads back, resumes or starts."""

from __future__ import annotations

import csv
import dataclasses
import importlib
import io
import json
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from tiny import TINY

from jaxtl.config import ConfigError, config_from_dict, load_config, save_config
from jaxtl.optim import Phase
from jaxtl.train.losses import cross_entropy
from jaxtl.train.run_dir import RunError
from jaxtl.train.sweep import (
    L2SP_ALPHA,
    RESULT_FILE,
    TIMING_FILE,
    PolicyCost,
    StepTimer,
    config_changes,
    default_out_dir,
    l2sp_alpha,
    policy_phases,
    run_config,
    run_name,
    run_once,
    sweep,
    sweep_epochs,
)
from jaxtl.train.sweep_table import SweepResult, SweepRun, summarize

sweep_module = importlib.import_module("jaxtl.train.sweep")  # the module: jaxtl.train.sweep is the function

QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart.yaml"


@pytest.fixture(scope="module")
def config():
    return load_config(QUICKSTART, ["model.weights=null"])  # phases of 5 and 2 epochs: a budget of 7


# -- specs -> phases ------------------------------------------------------------------------------------------


def test_the_budget_is_the_configs_total_epochs_unless_given(config):
    assert sweep_epochs(config) == 7
    assert sweep_epochs(config, 3) == 3
    with pytest.raises(ConfigError, match="epochs=0: a sweep's budget must be at least 1 epoch"):
        sweep_epochs(config, 0)


@pytest.mark.parametrize("spec", ["head_only", "last_n_blocks:1", "full", "full:0.1", "bitfit", "surgical:first"])
def test_a_builtin_policy_is_one_phase_of_the_whole_budget_at_the_base_lr(config, spec):
    (phase,) = policy_phases(spec, config)
    assert (phase.name, phase.policy, phase.epochs, dict(phase.lrs)) == (spec, spec, 7, {})
    assert (phase.solver, phase.until, phase.optimizer) == ("optimizer", "epochs", None)
    assert policy_phases(spec, config, epochs=2)[0].epochs == 2


def test_lp_ft_solves_the_head_then_fine_tunes_everything_for_the_budget(config):
    probe, finetune = policy_phases("lp_ft", config, epochs=4)
    assert (probe.policy, probe.epochs, probe.solver) == ("head_only", 1, "linear_probe")
    assert (finetune.policy, finetune.epochs, finetune.solver) == ("full", 4, "optimizer")


def test_l2sp_is_full_with_the_alpha_of_its_spec(config):
    (phase,) = policy_phases("l2sp", config)
    assert (phase.policy, phase.epochs) == ("full", 7)
    assert l2sp_alpha("l2sp") == L2SP_ALPHA == 0.01
    assert l2sp_alpha("l2sp:0.1") == 0.1 and l2sp_alpha("full") is None
    assert run_config(config, "l2sp:0.1", 0, "r").optim.l2sp_alpha == 0.1
    assert run_config(config, "full", 0, "r").optim.l2sp_alpha is None
    for bad in ("l2sp:abc", "l2sp:0", "l2sp:-1", "l2sp:inf"):
        with pytest.raises(ConfigError, match=f"sweep policy '{bad}': ALPHA must be a number > 0"):
            policy_phases(bad, config)


def test_gradual_unfreezes_in_thirds_of_the_budget_the_first_two_ending_at_a_plateau(config):
    head, block, everything = policy_phases("gradual", config)
    assert [(p.policy, p.epochs, p.until) for p in (head, block, everything)] == [
        ("head_only", 2, "plateau"),
        ("last_n_blocks:1", 2, "plateau"),
        ("full", 3, "epochs"),
    ]
    with pytest.raises(ConfigError, match=r"gradual unfreezes in 3 phases: give at least 3 epochs \(got 2\)"):
        policy_phases("gradual", config, epochs=2)


def test_config_keeps_the_configs_own_phases(config):
    assert policy_phases("config", config, epochs=1) == config.phases
    assert dict(policy_phases("config", config)[1].lrs) == {"head": 1e-3, "blocks": 1e-4}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("head_onyl", "unknown sweep policy 'head_onyl'; known: head_only, last_n_blocks:N, .*lp_ft, gradual, config"),
        ("last_n_blocks", "sweep policy 'last_n_blocks': last_n_blocks needs an argument: last_n_blocks:1"),
        ("last_n_blocks:x", "^policy 'last_n_blocks:x': 'x' is not a int$"),
        ("surgical:top", "sweep policy 'surgical:top': surgical\\('top'\\): the block is one of first, middle, last"),
        ("head_only:2", r"^policy 'head_only' takes no argument \(got 'head_only:2'\)$"),
        ("lp_ft:1", "sweep policy 'lp_ft:1': lp_ft takes no argument"),
        ("config:x", "sweep policy 'config:x': config takes no argument"),
    ],
)
def test_a_bad_spec_is_one_error_naming_it(config, spec, message):
    with pytest.raises(ConfigError, match=message):
        policy_phases(spec, config)


def test_a_runs_config_sets_its_phases_seed_and_directory_and_reloads_as_itself(config, tmp_path):
    run = run_config(config, "lp_ft", 3, tmp_path / "lp_ft" / "seed3", epochs=2)
    assert (run.train.seed, run.run_dir, run.train.log_every) == (3, str(tmp_path / "lp_ft" / "seed3"), 1)
    assert [p.name for p in run.phases] == ["probe", "finetune"]
    assert (run.data, run.model, run.optim) == (config.data, config.model, config.optim)
    # A resumed run's config is checked against its checkpoint's, as config.yaml holds it.
    assert config_from_dict(run.to_dict()) == run


def test_run_folders_and_the_default_sweep_directory():
    assert [run_name(s) for s in ("last_n_blocks:1", "surgical:first", "full:0.1", "a b/c")] == [
        "last_n_blocks-1",
        "surgical-first",
        "full-0.1",
        "a_b_c",
    ]
    assert default_out_dir(load_config(QUICKSTART)) == Path("runs/quickstart-sweep")
    assert default_out_dir(load_config(None, ["run_dir=out/x"])) == Path("out/x-sweep")


# -- what a policy trains and computes ------------------------------------------------------------------------


def test_trainable_parameters_are_counted_from_the_groups(config):
    cost = PolicyCost(config, 3, loss_fn=None)
    fc = 512 * 3 + 3
    assert cost.trainable(Phase("p", "head_only", epochs=1)) == fc
    assert cost.trainable(Phase("p", "full", epochs=1)) == 11_176_512 + fc  # resnet18 without its 1000-way fc
    # layer4: four 3x3 convs (the first from 256 channels), the 1x1 downsample conv, five BatchNorms
    layer4 = 9 * 256 * 512 + 3 * 9 * 512 * 512 + 256 * 512 + 5 * 2 * 512
    assert cost.trainable(Phase("p", "last_n_blocks:1", epochs=1)) == layer4 + fc


def test_flops_per_step_average_the_phases_by_the_steps_they_ran(config, monkeypatch):
    cost = PolicyCost(config, 3, loss_fn=None)
    per_phase = {"head": 1.0, "last_block": 10.0, "full": 100.0, "probe": 7.0, "finetune": 50.0}
    totals = []
    monkeypatch.setattr(cost, "step_flops", lambda c, phase, total: totals.append(total) or per_phase[phase.name])
    gradual = run_config(config, "gradual", 0, "r", epochs=6)
    history = [{"phase": p, "step": s} for p, s in
               [("head", 5), ("head", 10), ("last_block", 15), ("full", 20), ("full", 25)]]  # fmt: skip
    trainable, flops = cost(gradual, history)
    assert flops == pytest.approx((1.0 * 10 + 10.0 * 5 + 100.0 * 10) / 25)
    assert totals == [2 * 5, 2 * 5, 2 * 5]  # each phase's optimizer schedule spans its epochs' steps
    assert trainable == 11_178_051
    # A linear probe takes no step: LP-FT's steps are all the fine-tuning's.
    lp_ft = run_config(config, "lp_ft", 0, "r", epochs=2)
    history = [{"phase": "probe", "step": 0}, {"phase": "finetune", "step": 5}, {"phase": "finetune", "step": 10}]
    assert cost(lp_ft, history) == (11_178_051, 50.0)


def test_a_head_only_step_on_cached_features_counts_the_heads_flops_alone(config):
    cost = PolicyCost(config, 3, loss_fn=cross_entropy(0.0, None))
    flops = cost.step_flops(config, Phase("p", "head_only", epochs=1), 10)
    matmul = 2 * config.data.batch_size * 512 * 3  # one (32, 512) x (512, 3) product
    assert 2 * matmul < flops < 50 * matmul  # forward and backward of the head, the loss, AdamW: no backbone


# -- aggregation, table and files -----------------------------------------------------------------------------


def record(policy, seed, acc, loss, params=100, flops=2e9, step_s=0.5, wall_s=10.0):
    return SweepRun(
        policy=policy, seed=seed, run_dir=f"{policy}/seed{seed}", best_val_acc1=acc, best_val_loss=loss,
        best_epoch=1, epochs=2, steps=10, trainable_params=params, flops_per_step=flops, step_s=step_s, wall_s=wall_s,
    )  # fmt: skip


RUNS = [
    record("full", 0, 0.6, 0.9, params=1000, wall_s=20.0),
    record("head_only", 0, 0.5, 1.1, params=10, flops=1e3, step_s=None),
    record("full", 1, 0.8, 0.7, params=1000, wall_s=30.0, step_s=0.7),
    record("head_only", 1, 0.4, 1.3, params=10, flops=1e3, step_s=0.002),
    record("full", 2, 0.65, 0.8, params=1000, wall_s=25.0, step_s=0.6),
    record("lp_ft", 0, 0.9, 0.3),
]


def test_aggregates_are_means_and_sample_standard_deviations_over_the_seeds():
    rows = summarize(RUNS)
    assert [(r.policy, r.seeds) for r in rows] == [("full", 3), ("head_only", 2), ("lp_ft", 1)]
    full = rows[0]
    accuracy, loss = np.array([0.6, 0.8, 0.65]), np.array([0.9, 0.7, 0.8])
    assert full.val_acc1_mean == pytest.approx(accuracy.mean()) and full.val_loss_mean == pytest.approx(loss.mean())
    assert full.val_acc1_std == pytest.approx(np.std(accuracy, ddof=1))
    assert full.val_loss_std == pytest.approx(statistics.stdev(loss))
    assert (full.trainable_params, full.wall_s, full.step_s) == (1000, pytest.approx(25.0), pytest.approx(0.6))
    assert rows[1].step_s == 0.002  # a run without step times takes no part in the mean
    assert rows[2].val_acc1_std is None and rows[2].val_loss_std is None  # one seed: no spread


def test_the_table_csv_json_and_plot(tmp_path):
    result = SweepResult(tmp_path, tuple(summarize(RUNS)), tuple(RUNS))
    table = result.table().splitlines()
    assert table[0].split() == ["policy", "seeds", "best", "val", "acc@1", "best", "val", "loss", "trainable",
                                "GFLOPs/step", "step", "ms", "wall", "s"]  # fmt: skip
    assert table[1].split() == ["full", "3", "0.683", "±", "0.104", "0.8000", "±", "0.1000", "1,000", "2", "600.0",
                                "25.0"]  # fmt: skip
    assert table[3].split() == ["lp_ft", "1", "0.900", "0.3000", "100", "2", "500.0", "10.0"]
    assert len({len(line) for line in table}) == 1  # aligned columns
    result.write(title="test")
    rows = list(csv.DictReader(io.StringIO(result.csv_path.read_text())))
    assert [r["policy"] for r in rows] == ["full", "head_only", "lp_ft"]
    assert float(rows[0]["val_acc1_std"]) == pytest.approx(np.std([0.6, 0.8, 0.65], ddof=1))
    assert rows[2]["val_acc1_std"] == ""
    written = json.loads(result.json_path.read_text())
    assert written["policies"] == [dataclasses.asdict(r) for r in result.rows]
    assert [SweepRun(**r) for r in written["runs"]] == RUNS
    from PIL import Image

    with Image.open(result.plot_path) as image:
        assert image.format == "PNG" and image.size == (1100, 460)


# -- which runs a sweep reads back, resumes or starts ---------------------------------------------------------


class FakeFit:
    """Stands in for jaxtl.train.fit: records its calls, and 'trains' two epochs of one phase."""

    def __init__(self):
        self.calls = []

    def __call__(self, config, *, resume, callbacks, log):
        self.calls.append((config.run_dir, resume))
        save_config(config, Path(config.run_dir) / "config.yaml")
        (timer,) = callbacks
        for step in range(1, 4):
            timer.on_step(step, {})
        timer.on_epoch_end({}, None)
        history = [{"phase": "x", "epoch": 1, "step": 3, "val_acc1": 0.5, "val_loss": 0.9},
                   {"phase": "x", "epoch": 2, "step": 6, "val_acc1": 0.75, "val_loss": 1.2}]  # fmt: skip
        return SimpleNamespace(history=history)


def measure(config, history):
    return 1539, 123.0


def test_a_run_starts_fresh_resumes_from_its_checkpoint_or_is_read_back(config, tmp_path, monkeypatch):
    fake = FakeFit()
    monkeypatch.setattr(sweep_module, "fit", fake)
    run = run_config(config, "head_only", 1, tmp_path / "head_only" / "seed1", epochs=2)
    directory = Path(run.run_dir)
    directory.mkdir(parents=True)
    (directory / TIMING_FILE).write_text(json.dumps({"wall_s": 99.0, "step_s": [9.0]}))  # a killed start's
    first = run_once(run, "head_only", tmp_path, measure, log=lambda m: None)
    assert fake.calls == [(run.run_dir, False)]
    assert (first.policy, first.seed, first.run_dir) == ("head_only", 1, "head_only/seed1")
    assert (first.best_val_acc1, first.best_val_loss, first.best_epoch, first.epochs, first.steps) == (
        0.75, 0.9, 2, 2, 6,
    )  # fmt: skip
    assert (first.trainable_params, first.flops_per_step) == (1539, 123.0)
    assert first.wall_s < 99.0 and len(json.loads((directory / TIMING_FILE).read_text())["step_s"]) == 2
    assert SweepRun.read(directory / RESULT_FILE) == first

    lines = []
    assert run_once(run, "head_only", tmp_path, measure, log=lines.append) == first
    assert len(fake.calls) == 1 and "finished before" in lines[0]  # read back, not run again

    (directory / RESULT_FILE).unlink()
    (directory / "checkpoints" / "latest").mkdir(parents=True)
    run_once(run, "head_only", tmp_path, measure, log=lambda m: None)
    assert fake.calls[-1] == (run.run_dir, True)  # a checkpoint and no result: resumed


def test_a_finished_run_of_another_config_is_not_read_back(config, tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_module, "fit", FakeFit())
    run = run_config(config, "full", 0, tmp_path / "full" / "seed0", epochs=2)
    run_once(run, "full", tmp_path, measure, log=lambda m: None)
    other = dataclasses.replace(run, optim=dataclasses.replace(run.optim, lr=0.1))
    with pytest.raises(RunError, match=r"full/seed0 holds a finished run of another config .*differs at optim.lr\)"):
        run_once(other, "full", tmp_path, measure, log=lambda m: None)
    (Path(run.run_dir) / RESULT_FILE).write_text("{")
    with pytest.raises(RunError, match=r"sweep-result.json cannot be read .*; delete it to run that run again"):
        run_once(run, "full", tmp_path, measure, log=lambda m: None)


def test_a_saved_config_differs_by_what_would_change_the_run_not_by_new_defaults_or_paths(config, tmp_path):
    run = run_config(config, "full", 0, tmp_path / "a", epochs=2)
    saved = tmp_path / "config.yaml"
    save_config(run, saved)
    assert config_changes(saved, run) == []
    moved = dataclasses.replace(run, run_dir=str(tmp_path / "b"), data=dataclasses.replace(run.data, num_workers=1))
    assert config_changes(saved, moved) == []  # run_dir and the workers shape no number
    plain = yaml.safe_load(saved.read_text())
    del plain["train"]["ema"], plain["optim"]["l2sp_alpha"]  # keys a later jaxtl added, at their defaults
    saved.write_text(yaml.safe_dump(plain))
    assert config_changes(saved, run) == []
    longer = run_config(config, "full", 0, tmp_path / "a", epochs=3)
    assert config_changes(saved, longer) == ["phases.0.epochs"]
    assert config_changes(saved, run_config(config, "l2sp", 0, tmp_path / "a", epochs=2)) == [
        "optim.l2sp_alpha",
        "phases.0.name",
    ]
    saved.write_text("optim: {lrr: 1}")
    assert config_changes(saved, run)[0].startswith("(unreadable: ")


def test_the_step_timer_keeps_what_an_interrupted_process_measured(tmp_path, monkeypatch):
    clock = iter([100.0, 101.0, 101.5, 102.5, 103.0, 110.0])
    monkeypatch.setattr(sweep_module.time, "perf_counter", lambda: next(clock))
    path = tmp_path / TIMING_FILE
    timer = StepTimer(path)  # starts at 100
    for step in (1, 2, 3):  # steps end at 101, 101.5, 102.5: two step times
        timer.on_step(step, {})
    timer.on_epoch_end({}, None)  # at 103
    assert json.loads(path.read_text()) == {"wall_s": 3.0, "step_s": [0.5, 1.0]}
    again = StepTimer(path)  # a resumed process, at 110
    assert (again.wall_s, again.step_s) == (3.0, [0.5, 1.0])


def test_a_sweep_rejects_bad_policies_and_seeds_before_any_run(tmp_path):
    overrides = [*TINY]
    with pytest.raises(ConfigError, match=r"sweep policy 'last_n_blocks:9' on resnet18: last_n_blocks\(9\): the model"):
        sweep(QUICKSTART, ["head_only", "last_n_blocks:9"], 1, tmp_path / "s", overrides=overrides)
    with pytest.raises(ConfigError, match="give at least one, each once"):
        sweep(QUICKSTART, ["full", "full"], 1, tmp_path / "s", overrides=overrides)
    with pytest.raises(ConfigError, match="seeds 0: give a count >= 1 or distinct seeds >= 0"):
        sweep(QUICKSTART, ["full"], 0, tmp_path / "s", overrides=overrides)
    assert not (tmp_path / "s").exists()


def test_the_command_names_a_bad_policy_in_one_line(tmp_path):
    command = [sys.executable, "-m", "jaxtl.cli", "sweep", str(QUICKSTART), "--policies", "head_only,fulll"]
    result = subprocess.run([*command, "--out", str(tmp_path / "s")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"jaxtl sweep: error: unknown sweep policy 'fulll'; known: {sweep_module.VOCABULARY}"
    ]
    assert not (tmp_path / "s").exists()
