"""``report.html``: one self-contained page about a checkpoint, for a person to read in a browser.

The page holds the run's training curves with its phases marked, the confusion matrix, each class's
precision, recall, F1 and support with the balanced accuracy, and the validation images with the highest
loss ("top losses", ordered as fastai's ``plot_top_losses`` orders them: highest first), each with its true
and predicted class and both probabilities. Every image is a PNG inside the page (a ``data:`` URI) and the
styles are inline: the file is read without a network, a server or JavaScript, and can be mailed as it is.

A run writes ``RUN_DIR/report.html`` from its best checkpoint when it ends (:func:`jaxtl.train.fit`);
``jaxtl eval CHECKPOINT --report [PATH]`` writes one for any checkpoint (:func:`write_report`).
This module evaluates the checkpoint and gathers what the page shows; :mod:`jaxtl.train.report_page` draws it.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.config import RunConfig, config_from_dict
from jaxtl.data import EvalTransform, Loader
from jaxtl.errors import JaxtlError
from jaxtl.train import checkpoint as ckpt
from jaxtl.train.evaluate import Evaluation, Predictor, SplitPredictions
from jaxtl.train.figures import load_metrics, plot_confusion, plot_curves
from jaxtl.train.inputs import load_data
from jaxtl.train.report_page import THUMBNAIL_SIZE, render_report
from jaxtl.train.state import CheckpointMeta


def predict_split(
    predictor: Predictor,
    source,
    *,
    batch_size: int,
    num_workers: int | None = None,
    skip_bad_files: bool = False,
    worker_type: str = "auto",
) -> SplitPredictions:
    """Runs ``predictor``'s eval step over every image of ``source`` (in order) and keeps each image's output.

    The batches run on this process's default device, unsharded: a run's primary process writes the report
    on its own, while the other processes of a multi-process run have ended theirs.

    Args:
        predictor: a checkpoint's :class:`Predictor` (its eval transform, precision and TTA).
        source: the images (:class:`jaxtl.data.sources.Source`), labelled with the checkpoint's classes.
        batch_size: images per forward pass (the run's ``data.eval_batch_size``).
        num_workers, skip_bad_files, worker_type: as :class:`jaxtl.data.Loader` takes them.
    """
    loader = Loader(source, predictor.transform, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                    skip_bad_files=skip_bad_files, worker_type=worker_type)  # fmt: skip
    outputs, labels, indices = [], [], []
    try:
        for batch in loader.epoch(0):
            logits, _ = predictor.step(predictor.state, batch.images, batch.labels, batch.mask)
            rows = batch.mask
            outputs.append(np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1))[rows])
            labels.append(batch.labels[rows].astype(np.int64))
            indices.append(batch.indices[rows].astype(np.int64))
    finally:
        loader.close()
    return SplitPredictions(np.concatenate(outputs), np.concatenate(labels), np.concatenate(indices),
                            tuple(loader.skipped))  # fmt: skip


@dataclasses.dataclass(frozen=True)
class TopLoss:
    """One image of the top-losses gallery.

    Attributes:
        rank: 1 for the highest loss.
        description: where the image came from (its file path, or a tfds record).
        true_class, predicted_class: class names.
        loss: ``-log p(true class)``.
        probability_predicted, probability_true: the predicted and the true class's probabilities.
        thumbnail: PNG bytes of the image as the model saw it (the eval transform's crop), at most
            :data:`THUMBNAIL_SIZE` pixels on its longer side.
    """

    rank: int
    description: str
    true_class: str
    predicted_class: str
    loss: float
    probability_predicted: float
    probability_true: float
    thumbnail: bytes


def gather_top_losses(
    predictions: SplitPredictions, source, classes: Sequence[str], transform, k: int = 16
) -> tuple[TopLoss, ...]:
    """The ``k`` images of ``source`` with the highest loss, highest first, each loaded again for its thumbnail:
    ``transform`` (the checkpoint's :class:`jaxtl.data.EvalTransform`) gives the crop the model saw."""
    gallery = []
    for rank, row in enumerate(predictions.top_losses(k), start=1):
        log_probabilities, label = predictions.log_probabilities[row], int(predictions.labels[row])
        predicted = int(np.argmax(log_probabilities))
        index = int(predictions.indices[row])
        image, _ = source.load(index)
        gallery.append(TopLoss(
            rank=rank, description=source.describe(index), true_class=classes[label],
            predicted_class=classes[predicted], loss=float(-log_probabilities[label]),
            probability_predicted=float(np.exp(log_probabilities[predicted])),
            probability_true=float(np.exp(log_probabilities[label])),
            thumbnail=thumbnail_png(transform(image)),
        ))  # fmt: skip
    return tuple(gallery)


def thumbnail_png(image: np.ndarray, size: int = THUMBNAIL_SIZE) -> bytes:
    """PNG bytes of an ``(H, W, 3)`` uint8 image, shrunk (never enlarged) to at most ``size`` pixels a side."""
    from PIL import Image

    picture = Image.fromarray(np.asarray(image, np.uint8))
    picture.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def figure_png(draw: Callable[[Path], Path]) -> bytes:
    """The PNG bytes of a figure that ``draw(path)`` saves (the plotting functions of :mod:`.figures`)."""
    with tempfile.TemporaryDirectory(prefix="jaxtl-report-") as directory:
        return Path(draw(Path(directory) / "figure.png")).read_bytes()


@dataclasses.dataclass(frozen=True)
class Report:
    """What a report shows, and where it was written.

    Attributes:
        path: the HTML file.
        checkpoint: the checkpoint evaluated; ``run_dir`` its run directory, when it lies in one.
        meta: the checkpoint's :class:`jaxtl.train.CheckpointMeta`.
        split: the split evaluated (``"val"`` or ``"train"``), ``tta`` the test-time augmentation.
        predictions: every readable image's output; ``evaluation`` the metrics from them.
        top_losses: the gallery, highest loss first.
        curves_png: the training curves (None without ``metrics.jsonl``); ``confusion_png`` the matrix.
    """

    path: Path
    checkpoint: Path
    run_dir: Path | None
    meta: CheckpointMeta
    split: str
    tta: str
    predictions: SplitPredictions
    evaluation: Evaluation
    top_losses: tuple[TopLoss, ...]
    curves_png: bytes | None
    confusion_png: bytes


def run_dir_of(checkpoint: str | os.PathLike) -> Path | None:
    """The run directory a checkpoint lies in (``RUN_DIR/checkpoints/NAME``), or None."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


def report_path_of(checkpoint: str | os.PathLike, path: str | os.PathLike | None = None) -> Path:
    """Where a checkpoint's report goes: ``path`` (a file, not a directory), or by default ``RUN_DIR/report.html``
    for a checkpoint in a run directory; otherwise an error naming what to give instead."""
    if path is not None:
        if Path(path).is_dir():
            raise JaxtlError(f"report path {path} is a directory; give the HTML file to write, e.g. {path}/report.html")
        return Path(path)
    ckpt.load_meta(checkpoint)  # not a checkpoint: the error names the directory and what it lacks
    run_dir = run_dir_of(checkpoint)
    if run_dir is None:
        raise JaxtlError(
            f"{checkpoint} is not in a run directory (RUN_DIR/checkpoints/NAME), so the report has no default "
            "place; give one: --report PATH"
        )
    return run_dir / "report.html"


def write_report(
    checkpoint: str | os.PathLike,
    path: str | os.PathLike | None = None,
    *,
    source=None,
    split: str = "val",
    overrides: Sequence[str] = (),
    tta: str = "none",
    top_losses: int = 16,
    predictions: SplitPredictions | None = None,
    figures: Mapping[str, bytes] | None = None,
) -> Report:
    """Evaluates a checkpoint image by image and writes its self-contained HTML report.

    Args:
        checkpoint: a training checkpoint, e.g. ``RUN_DIR/checkpoints/best``.
        path: the HTML file to write (default: ``RUN_DIR/report.html``, :func:`report_path_of`).
        source: the images to evaluate (a :class:`jaxtl.data.sources.Source` with the checkpoint's classes);
            default: ``split`` of the data the checkpoint's run used, with ``overrides`` applied to its config.
        split: ``"val"`` or ``"train"``, when ``source`` is not given; named in the report.
        overrides: dotted ``key=value`` settings for the run's config (``data.root=...``).
        tta: ``"none"`` or ``"flip"`` (:func:`jaxtl.train.step.make_eval_step`).
        top_losses: how many images the gallery shows (>= 1).
        predictions: the checkpoint's outputs on ``source`` where the caller has them (the training loop keeps
            the val outputs of the epoch that saved ``best``); default: evaluated here.
        figures: PNG bytes of the ``"curves"`` and ``"confusion"`` figures where the caller has them drawn as this
            function would draw them (a run's final curves.png and its best epoch's confusion.png, with
            ``predictions`` from that epoch); default: drawn here.

    Returns:
        The :class:`Report`, written to ``path``.

    Raises:
        JaxtlError: the checkpoint, the data or the path cannot be used; the message names it.
    """
    if top_losses < 1:
        raise JaxtlError(f"top_losses={top_losses} must be at least 1")
    if split not in ("val", "train"):
        raise JaxtlError(f"split={split!r} is not one of 'val', 'train'")
    path = report_path_of(checkpoint, path)
    # Given the predictions, the model is not needed: the checkpoint's meta gives the classes and the crops.
    predictor = Predictor.from_checkpoint(checkpoint, tta=tta) if predictions is None else None
    if predictor is not None:
        meta = predictor.meta
    else:
        meta = CheckpointMeta.from_json(ckpt.load_meta(checkpoint), str(checkpoint))
    config = config_from_dict(meta.config, overrides, f"{checkpoint}/meta.json")
    source = source if source is not None else _split_source(config, split, meta.classes)
    d = config.data
    if predictor is not None:
        predictions = predict_split(predictor, source, batch_size=d.eval_batch_size, num_workers=d.num_workers,
                                    skip_bad_files=d.skip_bad_files, worker_type=d.worker_type)  # fmt: skip
    evaluation = predictions.evaluation()
    run_dir = run_dir_of(checkpoint)
    report = Report(
        path=path, checkpoint=Path(checkpoint), run_dir=run_dir, meta=meta, split=split, tta=tta,
        predictions=predictions, evaluation=evaluation,
        top_losses=gather_top_losses(predictions, source, meta.classes, EvalTransform(meta.preprocessing), top_losses),
        curves_png=figures["curves"] if figures else _curves_png(run_dir, meta.arch),
        confusion_png=figures["confusion"] if figures else figure_png(
            lambda png: plot_confusion(evaluation.confusion, meta.classes, png)
        ),
    )  # fmt: skip
    _write_text(path, render_report(report))
    return report


def _split_source(config: RunConfig, split: str, classes: tuple[str, ...]):
    """``split`` of the data ``config`` names, whose classes must be the checkpoint's."""
    data = load_data(config.data)
    if data.classes != classes:
        raise JaxtlError(f"the data's classes {list(data.classes)} differ from the checkpoint's {list(classes)}")
    return data.val if split == "val" else data.train


def _curves_png(run_dir: Path | None, arch: str) -> bytes | None:
    """The run's training curves, drawn as the run draws curves.png; None without its metrics.jsonl."""
    metrics_path = run_dir / "metrics.jsonl" if run_dir is not None else None
    if metrics_path is None or not metrics_path.is_file():
        return None
    title = f"{arch}, {run_dir.name}"
    return figure_png(lambda png: plot_curves(load_metrics(metrics_path), png, title=title))


def _write_text(path: Path, text: str) -> None:
    """Writes ``text`` whole or not at all: a reader never sees half a report."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(path.name + ".tmp")
        staging.write_text(text, encoding="utf-8")
        staging.replace(path)
    except OSError as error:
        raise JaxtlError(f"cannot write the report {path}: {error.strerror or error}") from None
