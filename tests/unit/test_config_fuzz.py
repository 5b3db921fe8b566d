"""Property-based tests of the config loader: random and malformed configs, YAML text and overrides give a valid
RunConfig or a one-line ConfigError, never another exception."""

import dataclasses
import datetime
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from jaxtl.config import ConfigError, RunConfig, config_from_dict, load_config, save_config

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart.yaml"
# Deterministic, so CI never fails on an example a local run did not see; no example database in the tree.
FUZZ = settings(
    max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def _field_names(cls, prefix="") -> list[str]:
    """Every dotted key of the config, with phase index 0 and an example lrs group."""
    keys = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        keys.append(key)
        annotation = hints[field.name]
        if dataclasses.is_dataclass(annotation):
            keys += _field_names(annotation, f"{key}.")
        elif key == "phases":
            from jaxtl.optim import Phase

            keys += _field_names(Phase, "phases.0.") + ["phases.0.lrs.head", "phases.1.epochs", "phases.7.name"]
    return keys


KEYS = _field_names(RunConfig)
NAMES = sorted({key.split(".")[-1] for key in KEYS})

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.integers(min_value=10**308, max_value=10**400)  # beyond float's range
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(
        ["resnet18", "adamw", "head_only", "synthetic", "folder", "tfds", "val_acc1", "1e-3", "1e999", "nan"]
    )
    | st.dates()
)
keys = st.sampled_from(NAMES) | st.text(max_size=8) | st.integers(-3, 3) | st.none() | st.booleans()
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
    max_leaves=16,
)


def outcome(load):
    """Runs ``load``; a config must round-trip through its YAML file, an error must be one ConfigError line."""
    try:
        config = load()
    except ConfigError as error:
        assert "\n" not in str(error), str(error)
        assert str(error).strip(), "an empty message"
        return None
    assert isinstance(config, RunConfig)
    return config


def assert_round_trips(config: RunConfig, tmp_path: Path) -> None:
    path = tmp_path / "resolved.yaml"
    save_config(config, path)
    assert load_config(path) == config


@FUZZ
@given(data=st.dictionaries(st.sampled_from(NAMES) | keys, values, max_size=6))
@example(data={"optim": {"lr": 10**400}})
@example(data={"model": {"weights": 5}})
@example(data={"phases": [{"name": "a", "policy": "head_only", "lrs": {"head": 10**400}}]})
@example(data={"data": {"batch_size": datetime.date(2020, 1, 1)}})
def test_random_mappings_give_a_config_or_a_config_error(tmp_path_factory, data):
    config = outcome(lambda: config_from_dict(data, source="fuzz"))
    if config is not None:
        assert_round_trips(config, tmp_path_factory.mktemp("fuzz"))


def _set(tree, path: list, value):
    node = tree
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


def _paths(tree, prefix=()):
    yield list(prefix)
    if isinstance(tree, dict):
        for key, sub in tree.items():
            yield from _paths(sub, (*prefix, key))
    elif isinstance(tree, list):
        for index, sub in enumerate(tree):
            yield from _paths(sub, (*prefix, index))


@FUZZ
@given(base=st.sampled_from(CONFIGS), choice=st.integers(0, 10**6), value=values, delete=st.booleans())
def test_one_mutation_of_a_real_config_gives_a_config_or_a_config_error(tmp_path_factory, base, choice, value, delete):
    data = yaml.safe_load(base.read_text())
    paths = [p for p in _paths(data) if p]
    path = paths[choice % len(paths)]
    if delete and not isinstance(path[-1], int):
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        del parent[path[-1]]
    else:
        _set(data, path, value)
    config = outcome(lambda: config_from_dict(data, source=str(base)))
    if config is not None:
        assert_round_trips(config, tmp_path_factory.mktemp("fuzz"))


yaml_texts = (
    st.text(max_size=200)
    | values.map(lambda v: yaml.safe_dump(v, default_flow_style=None, allow_unicode=True))
    | st.builds(
        lambda text, at, junk: text[:at] + junk + text[at:],
        st.sampled_from([p.read_text() for p in CONFIGS]),
        st.integers(0, 2000),
        st.sampled_from(
            ["\t", ":", "- ", "{", "]", "&a", "*a", "!!python/object:os.system", "\x00", "\n  x", "'", "? "]
        ),
    )
)


@FUZZ
@given(text=yaml_texts)
@example(text="a: &a [*a]")  # a list that holds itself
@example(text="phases: &p [{name: x, policy: head_only, lrs: *p}]")
@example(text="[" * 3000 + "]" * 3000)  # nesting deeper than Python's recursion limit
@example(
    text="\n".join(
        [r"a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
        + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    )
)
@example(text="model: !!python/object/apply:os.system ['echo pwned']")
@example(text="optim:\n  lr: 1" + "0" * 400)
@example(text="\ud800: 1")
def test_random_yaml_text_gives_a_config_or_a_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "config.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    outcome(lambda: load_config(path))


override_keys = (
    st.sampled_from(KEYS) | st.text(max_size=16) | st.builds("{}.{}".format, st.sampled_from(KEYS), st.text(max_size=6))
)
override_values = st.text(max_size=20) | scalars.map(lambda v: yaml.safe_dump(v).removesuffix("\n...\n").strip())


@FUZZ
@given(overrides=st.lists(st.builds("{}={}".format, override_keys, override_values) | st.text(max_size=20), max_size=4))
@example(overrides=["model.weights=5"])
@example(overrides=["optim.lr=1" + "0" * 400])
@example(overrides=["phases=[" * 2000])
@example(overrides=["phases.0=7", "phases.0.epochs=2"])
@example(overrides=["phases=&a [*a]"])
@example(overrides=["optim=3", "optim.lr.x=1"])
@example(overrides=["phases.99.epochs=1"])
@example(overrides=["=1", "novalue", "data.batch_size=\x00"])
def test_random_overrides_give_a_config_or_a_config_error(overrides):
    outcome(lambda: load_config(QUICKSTART, overrides))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.weights=5"], "quickstart.yaml: model.weights must be a string, got 5"),
        (["optim.lr=1" + "0" * 400], r"optim.lr must be a finite number, got 100000... \(401 digits\)"),
        (["phases=" + "[" * 2000 + "]" * 2000], "nested too deeply"),
    ],
)
def test_the_inputs_that_once_raised_other_exceptions_now_explain_themselves(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(QUICKSTART, overrides)


def test_self_referencing_and_exploding_yaml_is_refused(tmp_path):
    loop = tmp_path / "loop.yaml"
    loop.write_text("phases: &p [{name: x, policy: head_only, lrs: *p}]\n")
    with pytest.raises(ConfigError, match=r"loop.yaml: .*nested too deeply"):
        load_config(loop)
    laughs = tmp_path / "laughs.yaml"
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)
    ]
    laughs.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"laughs.yaml: .*more than 100000 values"):
        load_config(laughs)
