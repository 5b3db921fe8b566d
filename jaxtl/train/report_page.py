"""The report's HTML page: a :class:`~jaxtl.train.report.Report` drawn as one self-contained ``report.html``.

Styles are inline and every image is a PNG ``data:`` URI: the page needs no network, server or JavaScript.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from jaxtl.train.evaluate import balanced_accuracy

if TYPE_CHECKING:  # the report module imports this one to write its page
    from jaxtl.train.report import Report, TopLoss

THUMBNAIL_SIZE = 160  # pixels, the longer side: 16 thumbnails of a 224-pixel crop stay near 1 MB of PNG

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1180px;
       padding: 0 1rem; color: #1d2330; background: #fff; }
h1 { font-size: 1.6rem; margin-bottom: 0.3rem; }
h2 { font-size: 1.2rem; border-bottom: 1px solid #d8dce3; padding-bottom: 0.2rem; margin-top: 2rem; }
dl.summary { display: grid; grid-template-columns: max-content 1fr; gap: 0.2rem 1rem; margin: 0; }
dl.summary dt { font-weight: 600; color: #4a5263; }
dl.summary dd { margin: 0; overflow-wrap: anywhere; }
img.figure { max-width: 100%; height: auto; border: 1px solid #e4e7ec; }
table.per-class { border-collapse: collapse; font-variant-numeric: tabular-nums; }
table.per-class th, table.per-class td { padding: 0.25rem 0.8rem; border-bottom: 1px solid #e4e7ec; }
table.per-class td { text-align: right; }
table.per-class th[scope=row] { text-align: left; font-weight: 500; }
.note { color: #5b6475; font-size: 0.9rem; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: 1rem; }
figure.top-loss { margin: 0; padding: 0.5rem; border: 1px solid #e4e7ec; border-radius: 6px; }
figure.top-loss img { display: block; width: 160px; height: auto; margin: 0 auto 0.4rem;
                      image-rendering: pixelated; }
figure.top-loss figcaption { font-size: 0.85rem; line-height: 1.35; overflow-wrap: anywhere; }
.wrong { color: #b42318; font-weight: 600; }
.right { color: #067647; font-weight: 600; }
.path { color: #5b6475; font-size: 0.75rem; }
"""


def render_report(report: Report) -> str:
    """The report's HTML: one string, every image inline, no script and no external reference."""
    meta = report.meta
    name = report.run_dir.name if report.run_dir is not None else report.checkpoint.name
    sections = [_summary(report), _curves(report), _confusion(report), _per_class(report), _gallery(report)]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>jaxtl report: {_text(meta.arch)}, {_text(name)}</title>\n<style>{_STYLE}</style>\n</head>\n"
        "<body>\n" + "\n".join(sections) + "\n</body>\n</html>\n"
    )


def _text(value: object) -> str:
    return html.escape(str(value), quote=True)


def _image(png: bytes, alt: str, css_class: str) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as picture:
        width, height = picture.size
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<img class="{css_class}" alt="{_text(alt)}" width="{width}" height="{height}" '
        f'src="data:image/png;base64,{data}">'
    )


def _summary(report: Report) -> str:
    meta, evaluation = report.meta, report.evaluation
    best = meta.state.best
    rows = {
        "architecture": meta.arch,
        "run directory": report.run_dir if report.run_dir is not None else "(none: the checkpoint is on its own)",
        "checkpoint": report.checkpoint,
        "weights": meta.weights.get("name") or meta.weights.get("source") or "-",
        "classes": f"{meta.num_classes}: {', '.join(meta.classes)}",
        "best epoch": f"{best.epoch} ({_metrics_line(best.metrics)})" if best.epoch is not None else "-",
    }
    skipped = f", {len(report.predictions.skipped)} unreadable skipped" if report.predictions.skipped else ""
    tta = ", TTA: flip (each image's probabilities averaged with its mirror image's)" if report.tta == "flip" else ""
    top5 = f", acc@5 {evaluation.acc5:.4f}" if meta.num_classes > 5 else ""
    rows[f"this evaluation ({report.split})"] = (
        f"{evaluation.count} images{skipped}{tta}: acc@1 {evaluation.acc1:.4f}{top5}, balanced accuracy "
        f"{balanced_accuracy(evaluation.confusion):.4f}, loss {evaluation.loss:.4f}"
    )
    items = "\n".join(f"<dt>{_text(key)}</dt><dd>{_text(value)}</dd>" for key, value in rows.items())
    heading = f"<h1>{_text(meta.arch)} on {meta.num_classes} classes</h1>"
    return f'<header>\n{heading}\n<dl class="summary">\n{items}\n</dl>\n</header>'


def _metrics_line(metrics: Mapping[str, object]) -> str:
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return ", ".join(f"{k} {v:.4f}" for k, v in numbers.items())


def _curves(report: Report) -> str:
    if report.curves_png is None:
        where = report.run_dir / "metrics.jsonl" if report.run_dir is not None else "metrics.jsonl"
        body = f'<p class="note">No training curves: {_text(where)} does not exist.</p>'
    else:
        body = (
            _image(report.curves_png, "training curves: loss and accuracy per epoch, phases marked", "figure")
            + '\n<p class="note">Loss and accuracy per epoch; a dashed line marks where each phase starts.</p>'
        )
    return f'<section id="curves">\n<h2>Training curves</h2>\n{body}\n</section>'


def _confusion(report: Report) -> str:
    image = _image(report.confusion_png, f"confusion matrix on {report.split}", "figure")
    note = "Rows: the true class; columns: the predicted class; colour: the share of the true class's images."
    heading = f"<h2>Confusion matrix ({_text(report.split)})</h2>"
    return f'<section id="confusion">\n{heading}\n{image}\n<p class="note">{note}</p>\n</section>'


def _per_class(report: Report) -> str:
    table = report.evaluation.per_class(report.meta.classes)
    rows = "\n".join(
        f'<tr><th scope="row">{_text(name)}</th><td>{row["precision"]:.4f}</td><td>{row["recall"]:.4f}</td>'
        f"<td>{row['f1']:.4f}</td><td>{row['support']}</td></tr>"
        for name, row in table.items()
    )
    balanced = balanced_accuracy(report.evaluation.confusion)
    return (
        f'<section id="per-class">\n<h2>Per-class metrics ({_text(report.split)})</h2>\n'
        f'<p>Balanced accuracy (the mean recall over the classes): <strong id="balanced-accuracy">{balanced:.4f}'
        "</strong></p>\n"
        '<table class="per-class">\n<thead><tr><th scope="col">class</th><th scope="col">precision</th>'
        '<th scope="col">recall</th><th scope="col">F1</th><th scope="col">support</th></tr></thead>\n'
        f"<tbody>\n{rows}\n</tbody>\n</table>\n</section>"
    )


def _gallery(report: Report) -> str:
    p = report.meta.preprocessing
    seen = (
        f"as the model saw it: resized to {p.resize_size} pixels on the shorter side ({_text(p.interpolation)}) and "
        f"center-cropped to {p.crop_size}x{p.crop_size} by the eval transform, shown at most {THUMBNAIL_SIZE} "
        "pixels wide"
    )
    folder = _common_folder([item.description for item in report.top_losses])
    figures = "\n".join(_top_loss(item, folder) for item in report.top_losses)
    files = f" File paths are relative to {_text(folder)}." if folder else ""
    return (
        f'<section id="top-losses">\n<h2>Top losses ({_text(report.split)})</h2>\n'
        f'<p class="note">The {len(report.top_losses)} images with the highest loss (-log of the true class\'s '
        f"probability), highest first. Each image is shown {seen}.{files}</p>\n"
        f'<div class="gallery">\n{figures}\n</div>\n</section>'
    )


def _common_folder(descriptions: list[str]) -> str | None:
    """The folder that holds every file named (None unless every description is an absolute path)."""
    if not descriptions or not all(os.path.isabs(d) for d in descriptions):
        return None
    return os.path.commonpath([os.path.dirname(d) for d in descriptions])


def _top_loss(item: TopLoss, folder: str | None) -> str:
    verdict = "right" if item.predicted_class == item.true_class else "wrong"
    shown = os.path.relpath(item.description, folder) if folder else item.description
    image = _image(item.thumbnail, f"{item.description}: true {item.true_class}, predicted {item.predicted_class}",
                   "thumbnail")  # fmt: skip
    return (
        f'<figure class="top-loss" data-rank="{item.rank}" data-loss="{item.loss:.9g}" '
        f'data-true="{_text(item.true_class)}" data-predicted="{_text(item.predicted_class)}" '
        f'data-probability-predicted="{item.probability_predicted:.9g}" '
        f'data-probability-true="{item.probability_true:.9g}" data-source="{_text(item.description)}">\n'
        f"{image}\n<figcaption>#{item.rank} loss {item.loss:.3f}<br>"
        f'predicted <span class="{verdict}">{_text(item.predicted_class)}</span> '
        f"p={item.probability_predicted:.3f}<br>true <strong>{_text(item.true_class)}</strong> "
        f'p={item.probability_true:.3f}<br><span class="path">{_text(shown)}</span></figcaption>\n'
        "</figure>"
    )
