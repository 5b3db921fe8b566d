"""``suggest``: which layers of a pretrained classifier to fine-tune on an ImageFolder dataset, and why.

    from jaxtl.train.suggest import suggest
    result = suggest("path/to/data", arch="resnet18")  # path/to/data/{train,val}/<class>/<image>
    print(result.summary())  # the counts, the linear probe, the row of the decision table and why
    result.write_config("suggested.yaml")  # a config for `jaxtl train` to start from

Two measurements decide. The dataset's size: the median number of train images per class (the smallest and
largest, and their ratio, are reported; a ratio of ``IMBALANCE_RATIO`` or more adds
``train.class_weights: balanced``). And how well the pretrained features already fit the task: a linear probe
(:func:`jaxtl.train.probe.linear_probe`, scikit-learn's logistic regression with ``C=PROBE_C`` on standardised
features) trained on the frozen backbone's pooled train features, computed once in eval mode, and scored on the
val split. Its accuracy is put on a scale from chance (the val accuracy of always answering the train split's
most frequent class) to perfect: ``lift = (accuracy - chance) / (1 - chance)``. Features that separate the
classes well are a sign that the data is close to what the weights were trained on; a low lift is a sign of a
domain shift, or of a task that the pretrained features do not capture. These are heuristics: the thresholds
below are named so that they can be read and argued with, and the summary prints every number they are
compared with.

With random-init weights (``weights=None``, or a fallback) the probe measures random features: its lift then
says little about the domain, and the summary says so.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml

from jaxtl.config import RunConfig, config_from_dict
from jaxtl.data import data_sharding, labels_of
from jaxtl.errors import DataError
from jaxtl.optim import Phase
from jaxtl.train.features import compute_features
from jaxtl.train.fit import run_model
from jaxtl.train.inputs import RunData, build_loaders, load_data, with_size
from jaxtl.train.probe import linear_probe
from jaxtl.train.run_steps import run_features_step
from jaxtl.train.step import split_model

# Size: the median number of train images per class.
VERY_SMALL_PER_CLASS = 10  # below: too few to adapt any pretrained layer without overfitting
SMALL_PER_CLASS = 100  # below: small; at or above: large
# Domain: the probe's lift, the share of the way from chance to perfect val accuracy.
SIMILAR_LIFT = 0.7  # at or above: the frozen features already separate the classes (similar domain)
IMBALANCE_RATIO = 3.0  # largest over smallest train class at or above: weight the loss by class
PROBE_C = 1.0  # the probe's inverse L2 strength (scikit-learn's default), on standardised features
RANDOM_INIT = "random_init"  # the weight spec's name of a random initialisation (jaxtl.weights.make_random_init_spec)

# The decision table: (size, domain) -> the approach and the phases of the config it writes. Learning rates
# follow docs/recipe.md's defaults: 1e-3 for a new head, 1e-5 to 1e-4 for pretrained layers.
HEAD_PHASE = {"name": "head", "policy": "head_only", "lrs": {"head": 1.0e-3}}
ADVICE: dict[tuple[str, str], tuple[str, tuple[dict[str, Any], ...]]] = {
    ("very small", "similar"): (
        "feature extraction: freeze the backbone, train a new head",
        ({**HEAD_PHASE, "epochs": 10},),
    ),
    ("very small", "different"): (
        "feature extraction: freeze the backbone, train a new head (too few images to adapt pretrained layers; "
        "more images, or weights closer to the data, would help more than unfreezing)",
        ({**HEAD_PHASE, "epochs": 10},),
    ),
    ("small", "similar"): (
        "feature extraction: freeze the backbone, train a new head",
        ({**HEAD_PHASE, "epochs": 10},),
    ),
    ("small", "different"): (
        "fine-tune the last blocks: the head first, then the last two blocks with it at a smaller learning rate",
        (
            {**HEAD_PHASE, "epochs": 5},
            {
                "name": "last_blocks",
                "policy": "last_n_blocks:2",
                "epochs": 5,
                "lrs": {"head": 1.0e-3, "blocks": 1.0e-4},
            },
        ),
    ),
    ("large", "similar"): (
        "fine-tune more at a small learning rate: the head first, then the whole model, the backbone at 1e-5",
        (
            {**HEAD_PHASE, "epochs": 3},
            {"name": "all", "policy": "full", "epochs": 7, "lrs": {"head": 1.0e-4, "backbone": 1.0e-5}},
        ),
    ),
    ("large", "different"): (
        "full fine-tuning with differential learning rates: the head first, then the whole model, the backbone "
        "at a tenth of the head's rate",
        (
            {**HEAD_PHASE, "epochs": 3},
            {"name": "all", "policy": "full", "epochs": 10, "lrs": {"head": 1.0e-3, "backbone": 1.0e-4}},
        ),
    ),
}


@dataclasses.dataclass(frozen=True)
class DatasetCounts:
    """How many images each class has, in label order."""

    classes: tuple[str, ...]
    train_per_class: tuple[int, ...]
    val_per_class: tuple[int, ...]

    @property
    def median_per_class(self) -> float:
        return float(np.median(self.train_per_class))

    @property
    def imbalance(self) -> float:
        """The largest train class's count over the smallest's (1.0: balanced)."""
        return max(self.train_per_class) / max(min(self.train_per_class), 1)

    @property
    def size(self) -> str:
        """``"very small"``, ``"small"`` or ``"large"``, by the median against the thresholds."""
        if self.median_per_class < VERY_SMALL_PER_CLASS:
            return "very small"
        return "small" if self.median_per_class < SMALL_PER_CLASS else "large"


def count_images(data: RunData) -> DatasetCounts:
    """The images per class of both splits, from their file lists (nothing is decoded)."""
    num_classes = len(data.classes)
    train, val = (np.bincount(labels_of(split), minlength=num_classes) for split in (data.train, data.val))
    return DatasetCounts(data.classes, tuple(int(n) for n in train), tuple(int(n) for n in val))


@dataclasses.dataclass(frozen=True)
class ProbeEvidence:
    """A linear probe on the frozen backbone's features: its accuracies, chance, and the weights it measured.

    Attributes:
        val_accuracy, train_accuracy: the probe's accuracy on the val and train features.
        chance: the val accuracy of always answering the train split's most frequent class.
        val_count: val images with features (a file skipped by ``data.skip_bad_files`` has none).
        feature_dim: the backbone's pooled feature width.
        weights: where the backbone's weights came from (their source, or "random init ...").
        random_init: the backbone is a random initialisation, so the probe says little about the domain.
        converged: the probe's solver met its tolerance.
    """

    val_accuracy: float
    train_accuracy: float
    chance: float
    val_count: int
    feature_dim: int
    weights: str
    random_init: bool
    converged: bool

    @property
    def lift(self) -> float:
        """``(val_accuracy - chance) / (1 - chance)``: 0 at chance, 1 when every val image is right."""
        return (self.val_accuracy - self.chance) / (1.0 - self.chance)

    @property
    def domain(self) -> str:
        """``"similar"`` when the lift reaches ``SIMILAR_LIFT``, else ``"different"``."""
        return "similar" if self.lift >= SIMILAR_LIFT else "different"


def probe_evidence(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    *,
    weights: str,
    random_init: bool,
) -> ProbeEvidence:
    """Fits the probe to the train features and scores it on the val features.

    Args:
        train_features, val_features: ``(N, D)`` and ``(M, D)`` floats; train_labels, val_labels: ``(N,)``, ``(M,)``.
        weights, random_init: as :class:`ProbeEvidence` holds them.

    Raises:
        DataError: every val image is of one class, so that no accuracy can beat chance.
    """
    if len(np.unique(val_labels)) < 2:
        raise DataError(
            f"the val split's {len(val_labels)} images are all of one class: the probe's accuracy cannot be "
            "compared with chance; give the val split images of every class"
        )
    probe = linear_probe(train_features, train_labels, C=PROBE_C, standardize=True)
    majority = np.argmax(np.bincount(train_labels))
    return ProbeEvidence(
        val_accuracy=probe.accuracy(val_features, val_labels),
        train_accuracy=probe.accuracy(train_features, train_labels),
        chance=float(np.mean(val_labels == majority)), val_count=len(val_labels),
        feature_dim=train_features.shape[1], weights=weights, random_init=random_init, converged=probe.converged,
    )  # fmt: skip


def measure_probe(config: RunConfig, data: RunData, log: Callable[[str], None] = print) -> ProbeEvidence:
    """Computes the frozen backbone's pooled features of both splits once (eval mode, the weights' eval
    preprocessing, as the trainer's feature cache does) and fits the probe on them."""
    model, weights, preprocessing = run_model(config, None, len(data.classes), None, log)
    preprocessing = with_size(preprocessing, config.data.crop_size, config.data.resize_size)
    loaders = build_loaders(config, data, preprocessing, jax.device_count())
    started = time.perf_counter()
    try:
        groups = Phase("features", "head_only", epochs=1).groups(model)
        graphdef, state = split_model(model, groups)
        both = loaders.both
        sharding = data_sharding(both.batch_size)
        state = jax.device_put(state, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))
        step = run_features_step(config, graphdef, preprocessing)
        count = len(data.train) + len(data.val)
        log(f"computing the frozen {config.model.arch}'s features of {count} images ({weights.get('source')})")
        features = compute_features(step, state, both, sharding, len(data.train))
    finally:
        loaders.close()
    log(f"  in {time.perf_counter() - started:.1f}s")
    train, val = features["train"], features["val"]
    return probe_evidence(
        train.features[train.valid], train.labels[train.valid], val.features[val.valid], val.labels[val.valid],
        weights=str(weights.get("source", "?")), random_init=weights.get("name") == RANDOM_INIT,
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Advice:
    """The row of the decision table that the counts and the probe select, and the phases it suggests."""

    size: str
    domain: str
    approach: str
    phases: tuple[dict[str, Any], ...]
    class_weights: bool

    @property
    def row(self) -> str:
        return f"{self.size} dataset, {self.domain} domain"


def choose_advice(counts: DatasetCounts, probe: ProbeEvidence) -> Advice:
    """The decision table's row for ``counts`` and ``probe`` (module docstring; the thresholds are constants)."""
    approach, phases = ADVICE[(counts.size, probe.domain)]
    return Advice(counts.size, probe.domain, approach, phases, counts.imbalance >= IMBALANCE_RATIO)


@dataclasses.dataclass(frozen=True)
class SuggestResult:
    """What ``suggest`` measured and decided, and the config it suggests (checked as ``jaxtl train`` checks one).

    Attributes:
        root: the dataset folder.
        counts, probe, advice: the evidence and the row chosen.
        config: the suggested run config; ``plain``: its YAML form, the values that differ from the defaults
            (the model, the data folder, the optimizer and the phases always written).
    """

    root: Path
    counts: DatasetCounts
    probe: ProbeEvidence
    advice: Advice
    config: RunConfig
    plain: dict[str, Any]

    def evidence(self) -> list[str]:
        """The numbers the decision compared, one line each."""
        c, p = self.counts, self.probe
        per_class = c.train_per_class
        lines = [
            f"dataset: {len(c.classes)} classes ({_listed(c.classes)}); {sum(per_class)} train images, "
            f"{sum(c.val_per_class)} val images",
            f"  train images per class: median {c.median_per_class:g}, min {min(per_class)}, max {max(per_class)} "
            f"(imbalance {c.imbalance:.1f})",
            f"linear probe: logistic regression (C={PROBE_C:g}) on the frozen backbone's standardised features "
            f"({p.feature_dim} per image; weights: {p.weights})",
            f"  val accuracy {p.val_accuracy:.3f} on {p.val_count} images (train {p.train_accuracy:.3f}); chance "
            f"{p.chance:.3f} (always the most frequent train class); lift {p.lift:.2f} (0 at chance, 1 perfect)",
        ]
        if p.random_init:
            lines.append(
                "note: the backbone is a random initialisation, not pretrained weights: the probe measures random "
                "features, and says little about how close the data is to any pretraining data"
            )
        if not p.converged:
            lines.append("note: the probe's solver stopped at its iteration limit; its accuracy is an estimate")
        return lines

    def decision(self) -> list[str]:
        """The thresholds, the row they select and the phases it suggests, one line each."""
        c, p, a = self.counts, self.probe, self.advice
        lines = [
            f"size: {a.size} (median {c.median_per_class:g} train images per class; very small below "
            f"{VERY_SMALL_PER_CLASS}, small below {SMALL_PER_CLASS}, large from {SMALL_PER_CLASS})",
            f"domain: {a.domain} (probe lift {p.lift:.2f}; similar from {SIMILAR_LIFT:g}, different below)",
            "decision table (heuristics; jaxtl.train.suggest):",
        ]
        for (size, domain), (approach, _) in ADVICE.items():
            mark = "->" if (size, domain) == (a.size, a.domain) else "  "
            lines.append(f"  {mark} {size + ' dataset, ' + domain + ' domain':<36} {approach.split(':')[0]}")
        lines.append(f"suggested: {a.approach}")
        for phase in self.config.phases:
            lrs = ", ".join(f"{group} {lr:g}" for group, lr in phase.lrs.items())
            lines.append(f"  phase {phase.name!r}: {phase.describe()}, {phase.describe_length()}, lr {lrs}")
        if a.class_weights:
            lines.append(
                f"imbalance {c.imbalance:.1f} (at least {IMBALANCE_RATIO:g}): train.class_weights: balanced weights "
                "the loss by class"
            )
        return lines

    def summary(self) -> str:
        return "\n".join([*self.evidence(), *self.decision()])

    def config_yaml(self) -> str:
        """The suggested config as YAML."""
        return yaml.safe_dump(self.plain, sort_keys=False, default_flow_style=None, width=120)

    def config_text(self) -> str:
        """:meth:`config_yaml` with the evidence and the decision as comments above it."""
        header = [f"Suggested by `jaxtl suggest {self.root}`.", *self.evidence(), *self.decision()]
        return "".join(f"# {line}\n" for line in header) + self.config_yaml()

    def write_config(self, path: str | os.PathLike) -> Path:
        """Writes :meth:`config_text` to ``path`` (its folder created); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.config_text(), encoding="utf-8")
        return path


def suggest(
    data_root: str | os.PathLike,
    *,
    arch: str = "resnet18",
    weights: str | os.PathLike | None = "DEFAULT",
    overrides: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> SuggestResult:
    """Measures an ImageFolder dataset and a linear probe on ``arch``'s frozen features, and suggests what to
    fine-tune (module docstring).

    Args:
        data_root: a folder with ``train/<class>/<image>`` and ``val/<class>/<image>`` (``data.source: folder``).
        arch: the architecture (``jaxtl models`` lists them).
        weights: as ``model.weights``: a weight name, a .pth file, a converted directory, or None for torchvision's
            random init. Weights that cannot be had stop with the command that converts them, unless an override
            sets ``model.allow_random_init_fallback=true``.
        overrides: dotted ``key=value`` settings, as ``jaxtl train --set`` takes them, applied to the measurement
            (``data.eval_batch_size``, ``data.crop_size``, ...) and to the suggested config.
        log: where progress lines go (a weights fallback's banner among them).

    Returns:
        The :class:`SuggestResult`.

    Raises:
        ConfigError, DataError, WeightsError: a bad override, dataset or weights, naming it.
    """
    root = Path(data_root).expanduser().resolve()
    base = {
        "run_dir": f"runs/{root.name}-{{time}}",
        "model": {"arch": arch, "weights": None if weights is None else os.fspath(weights)},
        "data": {"source": "folder", "root": str(root)},
    }
    measured = config_from_dict(base, overrides, "jaxtl suggest")
    data = load_data(measured.data)
    counts = count_images(data)
    probe = measure_probe(measured, data, log)
    advice = choose_advice(counts, probe)
    suggested = {
        **base,
        "optim": {"name": "adamw", "weight_decay": 1.0e-4},
        "phases": [dict(phase) for phase in advice.phases],
    }
    if advice.class_weights:
        suggested["train"] = {"class_weights": "balanced"}
    config = config_from_dict(suggested, overrides, "jaxtl suggest")
    return SuggestResult(root, counts, probe, advice, config, plain_config(config))


# Written even where they equal the defaults: what a reader of the suggested config looks for first.
ALWAYS_WRITTEN = {"run_dir", "model.arch", "model.weights", "data.source", "data.root", "optim.name", "optim.lr",
                  "optim.weight_decay"}  # fmt: skip


def plain_config(config: RunConfig) -> dict[str, Any]:
    """``config`` as YAML values, without the ones equal to the defaults (``ALWAYS_WRITTEN`` kept); each phase
    without its unset keys. ``load_config`` of the result gives ``config`` back."""
    plain = _without_defaults(config.to_dict(), RunConfig().to_dict(), "")
    defaults = _phase_defaults()
    plain["phases"] = [
        {key: value for key, value in phase.items() if key not in defaults or value != defaults[key]}
        for phase in config.to_dict()["phases"]
    ]
    return plain


def _phase_defaults() -> dict[str, Any]:
    """A phase's default values as a YAML file holds them (a tuple as a list)."""
    defaults = {}
    for field in dataclasses.fields(Phase):
        if field.default is not dataclasses.MISSING:
            defaults[field.name] = list(field.default) if isinstance(field.default, tuple) else field.default
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
    return defaults


def _without_defaults(values: dict[str, Any], defaults: dict[str, Any], prefix: str) -> dict[str, Any]:
    kept = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict):
            inner = _without_defaults(value, default, f"{name}.")
            if inner:
                kept[key] = inner
        elif value != default or name in ALWAYS_WRITTEN:
            kept[key] = value
    return kept


def _listed(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names) - limit} more)"
