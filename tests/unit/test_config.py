"""The run config: YAML and overrides into typed dataclasses, and one clear error per bad input."""

from pathlib import Path

import pytest

from jaxtl.config import ConfigError, RunConfig, config_from_dict, load_config, save_config
from jaxtl.optim import get_policy

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_the_four_configs_exist():
    assert {p.stem for p in CONFIGS} >= {
        "quickstart", "resnet18_feature_extraction", "resnet50_finetune", "efficientnet_b0_progressive"
    }  # fmt: skip


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads_and_round_trips(path, tmp_path):
    config = load_config(path)
    for phase in config.phases:
        get_policy(phase.policy)  # every policy name is known
    save_config(config, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == config


def test_only_the_quickstart_may_fall_back_to_random_init():
    fallback = {p.stem for p in CONFIGS if load_config(p).model.allow_random_init_fallback}
    assert fallback == {"quickstart"}


def test_overrides_are_dotted_and_typed():
    config = load_config(
        CONFIGS[0].parent / "quickstart.yaml",
        ["optim.lr=3e-4", "data.batch_size=16", "phases.1.lrs.blocks=1e-5", "model.weights=null", "data.flip_p=0.5"],
    )
    assert config.optim.lr == 3e-4 and config.data.batch_size == 16 and config.data.flip_p == 0.5
    assert config.phases[1].lrs == {"head": 1e-3, "blocks": 1e-5}
    assert config.model.weights is None


def test_defaults_without_a_file():
    assert load_config(None) == RunConfig()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.batchsize=3"], r"unknown key\(s\) data.batchsize; known under data: source"),
        (["data.batch_size=0"], r"data.batch_size = 0 is out of range \[1, inf\]"),
        (["data.batch_size=2.5"], "data.batch_size must be an integer, got 2.5"),
        (["optim.lr=fast"], "optim.lr must be a number, got 'fast'"),
        (["optim.lr=.nan"], "optim.lr must be finite"),
        (["optim.name=rmsprop"], "optim.name is 'rmsprop'; expected one of 'adamw', 'adam', 'sgd'"),
        (["data.flip_p=1.5"], r"data.flip_p = 1.5 is out of range \[0, 1\]"),
        (["phases.5.epochs=1"], r"phases.5: no item 5 \(the list has 2\)"),
        (["phases.0.epochs=0"], r"phases.0.epochs = 0 is out of range"),
        (["phases.0.lrs.head=-1"], r"phases.0.lrs.head = -1.0 is out of range"),
        (["phases=[]"], "phases is empty"),
        (["data.source=folder"], "data.root is required when data.source is folder"),
        (["data.source=tfds"], "data.tfds_name is required"),
        (["data.source=csv"], "data.labels.train and data.labels.val, or data.labels.file required when data.source"),
        (["data.source=csv", "data.labels.train=a.csv"], "data.labels.train and data.labels.val, or data.labels.file"),
        (["data.source=hf"], "data.hf.path required when data.source is hf"),
        (["data.source=webdataset", "data.webdataset.train=a.tar"], "data.webdataset.train and data.webdataset.val"),
        (["data.source=parquet"], "data.source is 'parquet'; expected one of"),
        (["task=multiclass"], "task is 'multiclass'; expected one of 'single_label', 'multilabel'"),
        (["train.checkpoint_metric=val_map"], "val_map is the mean average precision of a multi-label task"),
        (["optim.plateau_metric=val_map"], "set task: multilabel"),
        (["train.pos_weight=[-1.0]"], r"train.pos_weight.0 = -1.0 is out of range"),
        (
            ["task=multilabel", "phases=[{name: p, policy: head_only, epochs: 1, solver: linear_probe}]"],
            r"phases.0 \(solver: linear_probe\) fit\(s\) a multinomial logistic regression",
        ),
        (["data.sampler=balanced"], "data.sampler is 'balanced'; expected one of 'shuffle', 'class_balanced'"),
        (["data.labels.class_columns=all"], "data.labels.class_columns"),
        (["train.feature_cache=maybe"], "train.feature_cache must be true or false"),
        (["optim.betas=[0.9]"], "optim.betas must have 2 items"),
        (["optim.betas=[0.9, 1.0]"], r"optim.betas.1 = 1.0 is out of range \[0, 1\)"),
        (["optim.betas=[-0.1, 0.99]"], r"optim.betas.0 = -0.1 is out of range \[0, 1\)"),
        (["phases.0.bn=eval"], "phases.0.bn is 'eval'; expected one of 'train', 'frozen'"),
        (["train.seed=-1"], r"train.seed = -1 is out of range \[0, 9223372036854775807\]"),
        (["data.synthetic.seed=-3"], r"data.synthetic.seed = -3 is out of range"),
        (["nonsense"], "is not KEY=VALUE"),
        (["data=[1, 2]"], "data must be a mapping"),
    ],
)
def test_bad_values_are_config_errors_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS[0].parent / "quickstart.yaml", overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml is not valid YAML"):
        load_config(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="the top level must be a mapping"):
        load_config(listed)
    repeated = {"phases": [{"name": "a", "policy": "full"}, {"name": "a", "policy": "full"}]}
    with pytest.raises(ConfigError, match="phase names repeat"):
        config_from_dict(repeated)
    with pytest.raises(ConfigError, match="phases.0.name is required"):
        config_from_dict({"phases": [{"policy": "full"}]})


def test_save_config_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    save_config(RunConfig(), path)
    before = path.read_text()
    changed = config_from_dict({}, ["optim.lr=0.5"], "test")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_config(changed, path)
    assert path.read_text() == before  # the old file whole, no staging file left behind
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
    monkeypatch.undo()
    save_config(changed, path)
    assert load_config(path).optim.lr == 0.5


def test_the_run_config_holds_jaxtl_optims_own_optimizer_and_phase_types(tmp_path):
    import jaxtl.models
    from jaxtl.optim import OptimizerConfig, Phase, Rule

    rules = [{"pattern": "fc.*", "group": "head", "lr": 0.01}, {"pattern": "*", "group": "rest", "frozen": True}]
    config = config_from_dict({"phases": [{"name": "probe", "rules": rules, "epochs": 2}]})
    assert type(config.optim) is OptimizerConfig and config.optim == OptimizerConfig()
    assert config.optim.weight_decay == 1e-4  # one default, the recipe's
    (phase,) = config.phases
    assert type(phase) is Phase and phase.policy is None and phase.optimizer is None
    assert phase.rules == (Rule("fc.*", group="head", lr=0.01), Rule("*", group="rest", frozen=True))
    groups = phase.groups(jaxtl.models.abstract_model("resnet18", num_classes=3))
    assert groups.trainable_names == {"fc.weight", "fc.bias"} and groups.groups["head"].lr == 0.01
    save_config(config, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == config
    with pytest.raises(ConfigError, match="phases.0: phase 'probe': give exactly one of policy"):
        config_from_dict({"phases": [{"name": "probe", "rules": rules, "policy": "full"}]})


def test_bounds_live_next_to_their_fields_and_hold_from_python_too():
    from jaxtl.optim import OptimizerConfig, ParamGroupError, Phase

    with pytest.raises(ParamGroupError, match=r"optimizer: lr = -1 is out of range \[0, inf\]"):
        OptimizerConfig(lr=-1)
    with pytest.raises(ParamGroupError, match=r"optimizer: betas.1 = 1.0 is out of range \[0, 1\)"):
        OptimizerConfig(betas=(0.9, 1.0))
    with pytest.raises(ParamGroupError, match=r"phase 'p': lrs.head = -0.5 is out of range \[0, inf\]"):
        Phase("p", "head_only", epochs=1, lrs={"head": -0.5})


def test_the_loader_and_the_config_share_one_worker_default():
    import inspect

    from jaxtl.config import DataConfig
    from jaxtl.data import Loader

    assert DataConfig().worker_type == inspect.signature(Loader).parameters["worker_type"].default == "auto"


def test_a_config_is_read_and_checked_without_jax():
    import subprocess
    import sys

    code = (
        "import sys\nfrom jaxtl.config import load_config\nload_config('configs/quickstart.yaml', ['optim.lr=1e-4'])\n"
        "print(sorted(m for m in ('jax', 'flax', 'optax', 'torch') if m in sys.modules))"
    )
    root = Path(__file__).parents[2]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
