"""report.html: written at the end of a run and by `jaxtl eval --report`, read back in a real headless browser.

The browser is Debian's chromium (`make test` and .ci/run install it). A test page is the report with one
script added at its end, which writes what the browser loaded and rendered into the DOM; chromium's
`--dump-dom` gives it back. Every value read back is compared with a reference computed here without the
report's code: scikit-learn's metrics, and torch's logits of the exported model on torchvision's transforms.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import balanced_accuracy_score, precision_recall_fscore_support
from tiny import TINY

from jaxtl.errors import JaxtlError
from jaxtl.train.figures import plot_confusion, plot_curves
from jaxtl.train.report import (
    Report,
    SplitPredictions,
    figure_png,
    gather_top_losses,
    render_report,
    write_report,
)
from jaxtl.train.state import Best, CheckpointMeta, RunState
from jaxtl.weights import Preprocessing

CHROMIUM = Path("/usr/bin/chromium")
HEADLESS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
    "--disable-background-networking", "--disable-component-update", "--hide-scrollbars",
]  # fmt: skip
JAXTL = [sys.executable, "-m", "jaxtl.cli"]
CONFIGS = Path(__file__).parents[2] / "configs"

# What the browser saw, written into the page once it has loaded (the report itself has no script).
BROWSER_CHECK = """<script>
window.addEventListener("load", () => {
  const cells = (row) => [...row.cells].map((cell) => cell.textContent);
  const seen = {
    images: [...document.images].map((image) => ({
      className: image.className, scheme: image.src.split(":")[0], complete: image.complete,
      naturalWidth: image.naturalWidth, naturalHeight: image.naturalHeight,
      shownWidth: image.getBoundingClientRect().width, shownHeight: image.getBoundingClientRect().height,
    })),
    sections: [...document.querySelectorAll("section")].map((section) => section.id),
    fetched: performance.getEntriesByType("resource").map((entry) => entry.name),
    scripts: document.scripts.length,
    header: [...document.querySelectorAll("table.per-class thead th")].map((cell) => cell.textContent),
    table: [...document.querySelectorAll("table.per-class tbody tr")].map(cells),
    elementsInTable: document.querySelectorAll("table.per-class tbody tr *:not(th):not(td)").length,
    balanced: document.getElementById("balanced-accuracy").textContent,
    gallery: [...document.querySelectorAll("figure.top-loss")].map((figure) => ({ ...figure.dataset })),
    title: document.title,
  };
  const out = document.createElement("pre");
  out.id = "browser-check";
  out.textContent = JSON.stringify(seen);
  document.body.append(out);
});
</script>"""


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(
            f"{CHROMIUM} is missing: the report's browser test needs Debian's chromium. `make test` installs it "
            "when run as root; otherwise: sudo apt-get install chromium",
            pytrace=False,
        )
    command = [str(CHROMIUM), *HEADLESS, f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=True)


def seen_in_browser(report: Path, tmp_path: Path) -> dict:
    """Loads the report (with BROWSER_CHECK added) in headless chromium and returns what the script saw."""
    page = tmp_path / "browser-check.html"
    text = report.read_text(encoding="utf-8")
    assert text.count("</body>") == 1
    page.write_text(text.replace("</body>", BROWSER_CHECK + "\n</body>"), encoding="utf-8")
    dom = chromium(tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom", page.as_uri()).stdout
    found = re.search(r'<pre id="browser-check">(.*?)</pre>', dom, re.S)
    assert found, f"the browser did not run the check; its DOM ends with: {dom[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def inline_pngs(text: str) -> list[Image.Image]:
    """Every <img> of the page, decoded; each must be a PNG in a data: URI."""
    sources = re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", text)
    assert len(sources) == len(re.findall(r"<img\b", text))
    images = []
    for source in sources:
        assert source.startswith("data:image/png;base64,"), source[:60]
        image = Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1], validate=True)))
        image.load()
        assert image.format == "PNG"
        images.append(image)
    return images


def assert_self_contained(text: str) -> None:
    assert re.search(r"(?i)(https?|file|ftp)://", text) is None
    assert re.search(r"(?i)<(script|link|iframe|object|embed)\b", text) is None
    assert re.search(r"(?i)\burl\(", text) is None  # no CSS fetch (fonts, backgrounds)
    for attribute in re.findall(r"(?i)\b(?:src|href)=\"([^\"]*)\"", text):
        assert attribute.startswith("data:image/png;base64,"), attribute[:60]


def assert_everything_rendered(seen: dict, pngs: list[Image.Image]) -> None:
    assert seen["sections"] == ["curves", "confusion", "per-class", "top-losses"]
    assert seen["fetched"] == []  # the browser fetched nothing: every image came from the page itself
    assert seen["scripts"] == 1  # BROWSER_CHECK's: the report has none
    assert len(seen["images"]) == len(pngs)
    for image, png in zip(seen["images"], pngs, strict=True):
        assert image["scheme"] == "data" and image["complete"]
        assert (image["naturalWidth"], image["naturalHeight"]) == png.size  # decoded, at the PNG's own size
        assert image["shownWidth"] > 0 and image["shownHeight"] > 0


def reference_table(labels: np.ndarray, predictions: np.ndarray, classes) -> list[list[str]]:
    """The per-class rows as scikit-learn computes them, formatted as the report shows them."""
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=list(range(len(classes))), zero_division=0
    )
    return [
        [name, f"{p:.4f}", f"{r:.4f}", f"{f:.4f}", str(s)]
        for name, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
    ]


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


# -- the page, from predictions made up here (no training) ----------------------------------------------

# Names that break a page unless escaped: a tag, an ampersand, both quotes.
CLASSES = ("cat", '<b>dog</b> & "fox"', "o'clock")


class Pictures:
    """A source of small random pictures whose files are named by class (as ImageFolder's are)."""

    def __init__(self, labels: np.ndarray):
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int):
        pixels = np.random.default_rng(index).integers(0, 256, (48, 64, 3), dtype=np.uint8)
        return Image.fromarray(pixels), int(self.labels[index])

    def describe(self, index: int) -> str:
        return f"/data/val/{CLASSES[self.labels[index]]}/{index:05d}.png"


def made_up_report(tmp_path: Path, logits: np.ndarray, labels: np.ndarray, top: int) -> Report:
    log_probabilities = log_softmax64(logits).astype(np.float32)
    predictions = SplitPredictions(log_probabilities, labels, np.arange(len(labels)))
    source = Pictures(labels)
    records = [
        {"phase": phase, "epoch": epoch, "train_loss": 1.5 / epoch, "val_loss": 1.6 / epoch, "val_acc1": 0.2 * epoch}
        for phase, epoch in [("head", 1), ("head", 2), ("last_block", 3), ("last_block", 4)]
    ]  # fmt: skip
    preprocessing = Preprocessing(resize_size=56, crop_size=48)
    meta = CheckpointMeta(
        state=RunState(best=Best(0.8, 4, {"val_acc1": 0.8, "val_loss": 0.4})), metrics={}, arch="resnet18",
        classes=CLASSES, class_to_idx={name: i for i, name in enumerate(CLASSES)}, weights={"name": "IMAGENET1K_V1"},
        preprocessing=preprocessing, config={},
    )  # fmt: skip
    evaluation = predictions.evaluation()
    return Report(
        path=tmp_path / "report.html", checkpoint=tmp_path / 'r&d "runs"' / "checkpoints" / "best",
        run_dir=tmp_path / 'r&d "runs"', meta=meta, split="val", tta="none", predictions=predictions,
        evaluation=evaluation, top_losses=gather_top_losses(predictions, source, CLASSES, np.asarray, top),
        curves_png=figure_png(lambda png: plot_curves(records, png, title="resnet18, run")),
        confusion_png=figure_png(lambda png: plot_confusion(evaluation.confusion, CLASSES, png)),
    )  # fmt: skip


def test_the_page_is_self_contained_and_its_numbers_are_scikit_learns_in_the_browser(tmp_path):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 40)
    logits = rng.normal(0.0, 2.0, (40, 3))
    logits[np.arange(40), labels] += 1.5  # right more often than not, and wrong often enough
    report = made_up_report(tmp_path, logits, labels, top=8)
    report.path.write_text(render_report(report), encoding="utf-8")
    text = report.path.read_text(encoding="utf-8")

    assert_self_contained(text)
    assert "<b>dog</b>" not in text and "&lt;b&gt;dog&lt;/b&gt; &amp; &quot;fox&quot;" in text
    pngs = inline_pngs(text)
    assert pngs[0].size == (1100, 420)  # the curves, as figures.plot_curves draws them
    assert min(pngs[1].size) >= 500  # the confusion matrix
    assert [png.size for png in pngs[2:]] == [(64, 48)] * 8  # the eval crops, smaller than a thumbnail's bound

    seen = seen_in_browser(report.path, tmp_path)
    assert_everything_rendered(seen, pngs)
    assert seen["title"] == 'jaxtl report: resnet18, r&d "runs"'
    predictions = np.argmax(logits, axis=-1)
    assert seen["header"] == ["class", "precision", "recall", "F1", "support"]
    assert seen["table"] == reference_table(labels, predictions, CLASSES)  # the names as text, unescaped once
    assert seen["elementsInTable"] == 0  # no <b> of a class name became an element
    assert float(seen["balanced"]) == pytest.approx(balanced_accuracy_score(labels, predictions), abs=5e-5)

    losses = -log_softmax64(logits)[np.arange(40), labels]
    order = np.argsort(-losses, kind="stable")[:8]
    gallery = seen["gallery"]
    assert [int(item["rank"]) for item in gallery] == list(range(1, 9))
    assert [item["source"] for item in gallery] == [f"/data/val/{CLASSES[labels[i]]}/{i:05d}.png" for i in order]
    np.testing.assert_allclose([float(item["loss"]) for item in gallery], losses[order], rtol=1e-6)
    probabilities = np.exp(log_softmax64(logits))
    for item, i in zip(gallery, order):
        assert item["true"] == CLASSES[labels[i]] and item["predicted"] == CLASSES[predictions[i]]
        assert float(item["probabilityTrue"]) == pytest.approx(probabilities[i, labels[i]], rel=1e-5)
        assert float(item["probabilityPredicted"]) == pytest.approx(probabilities[i].max(), rel=1e-5)
    for png, i in zip(pngs[2:], order):  # each thumbnail is its own image, as the transform gave it
        assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(Pictures(labels).load(int(i))[0]))


@pytest.mark.slow
def test_a_report_of_what_is_not_a_checkpoint_or_into_a_directory_is_one_error_naming_it(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(JaxtlError, match=re.escape(f"checkpoint {tmp_path / 'missing'} does not exist")):
        write_report(tmp_path / "missing")
    with pytest.raises(JaxtlError, match=re.escape(f"{empty} is not a jaxtl checkpoint (no meta.json)")):
        write_report(empty, tmp_path / "report.html")
    with pytest.raises(JaxtlError, match=re.escape(f"report path {tmp_path} is a directory")):
        write_report(empty, tmp_path)
    for extra, message in [
        ([], f"{empty} is not a jaxtl checkpoint (no meta.json)"),
        ([str(tmp_path / "report.html")], f"{empty} is not a jaxtl checkpoint (no meta.json)"),
        ([str(tmp_path)], f"report path {tmp_path} is a directory; give the HTML file to write"),
    ]:
        result = subprocess.run([*JAXTL, "eval", str(empty), "--report", *extra], capture_output=True, text=True,
                                timeout=300)  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


# -- a real run: written at its end, and by jaxtl eval --report ---------------------------------------------


def jaxtl(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([*JAXTL, *args], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def torch_outputs(checkpoint: Path, files: list[str], *, flip: bool = False) -> np.ndarray:
    """(N, C) float64 log-probabilities of the checkpoint's model exported to torchvision, on torchvision's
    eval transforms of the files (with ``flip``: the probabilities averaged with the mirror image's)."""
    import torch
    import torchvision
    from torchvision.transforms import v2

    from convert import to_torchvision
    from jaxtl.train import load_checkpoint

    model, meta = load_checkpoint(checkpoint)
    torch_model = torchvision.models.get_model(meta.arch, num_classes=meta.num_classes)
    torch_model.load_state_dict(to_torchvision(model), strict=True)
    p = meta.preprocessing
    crop = v2.Compose([v2.Resize(p.resize_size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
                       v2.CenterCrop(p.crop_size)])  # fmt: skip
    tensor = v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(p.mean, p.std)])
    x = torch.stack([tensor(crop(Image.open(f).convert("RGB"))) for f in files])
    with torch.no_grad():
        probabilities = torch.softmax(torch_model.eval()(x).double(), -1)
        if flip:
            probabilities = (probabilities + torch.softmax(torch_model(x.flip(-1)).double(), -1)) / 2
    return np.log(probabilities.numpy())


def torch_crop(checkpoint: Path, file: str) -> np.ndarray:
    from torchvision.transforms import v2

    p = json.loads((checkpoint / "meta.json").read_text())["preprocessing"]
    resize = v2.Resize(p["resize_size"], interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    return np.asarray(v2.CenterCrop(p["crop_size"])(resize(Image.open(file).convert("RGB"))))


def assert_gallery_is_torchs(seen: dict, reference: np.ndarray, files: list[str], classes: list[str]) -> None:
    """The gallery holds every image (16 > 9), highest loss first, with torch's losses and probabilities."""
    gallery = seen["gallery"]
    assert sorted(item["source"] for item in gallery) == sorted(files)
    losses = np.array([float(item["loss"]) for item in gallery])
    assert np.all(np.diff(losses) <= 0)  # ordered as fastai orders its top losses: the highest first
    for item in gallery:
        i = files.index(item["source"])
        true = Path(item["source"]).parent.name  # the class folder the file lies in
        assert item["true"] == true
        assert float(item["loss"]) == pytest.approx(-reference[i, classes.index(true)], abs=2e-4)
        assert float(item["probabilityTrue"]) == pytest.approx(np.exp(reference[i, classes.index(true)]), abs=2e-4)
        assert float(item["probabilityPredicted"]) == pytest.approx(np.exp(reference[i].max()), abs=2e-4)
        if np.sort(reference[i])[-1] - np.sort(reference[i])[-2] > 1e-3:  # not a near tie
            assert item["predicted"] == classes[int(np.argmax(reference[i]))]


@pytest.mark.slow
def test_a_run_leaves_a_report_the_browser_renders_with_torchs_losses_and_scikit_learns_table(tmp_path):
    run_dir = tmp_path / "run"
    sets = [f"run_dir={run_dir}", *TINY, "phases.0.epochs=1", "phases.1.epochs=1"]
    result = jaxtl("train", str(CONFIGS / "quickstart.yaml"), *[a for s in sets for a in ("--set", s)])
    report = run_dir / "report.html"
    assert f"report: {report}" in result.stdout
    text = report.read_text(encoding="utf-8")
    assert_self_contained(text)
    pngs = inline_pngs(text)
    assert pngs[0].size == (1100, 420) and min(pngs[1].size) >= 500
    assert [png.size for png in pngs[2:]] == [(64, 64)] * 9  # the 64-pixel eval crops, every val image
    best = run_dir / "checkpoints" / "best"
    meta = json.loads((best / "meta.json").read_text())
    classes = meta["classes"]
    assert f"best epoch</dt><dd>{meta['best']['epoch']} (" in text

    seen = seen_in_browser(report, tmp_path)
    assert_everything_rendered(seen, pngs)
    # The table is the best checkpoint's confusion matrix (the run's confusion.json) as scikit-learn reads it.
    matrix = np.array(json.loads((run_dir / "confusion.json").read_text())["matrix"])
    labels, predictions = (np.repeat(axis, matrix.ravel()) for axis in np.indices(matrix.shape).reshape(2, -1))
    assert seen["table"] == reference_table(labels, predictions, classes)
    assert float(seen["balanced"]) == pytest.approx(balanced_accuracy_score(labels, predictions), abs=5e-5)
    # The gallery: torch's losses of the exported model on torchvision's transforms of the files.
    files = [item["source"] for item in seen["gallery"]]
    assert_gallery_is_torchs(seen, torch_outputs(best, files), files, classes)
    for png, item in zip(pngs[2:], seen["gallery"]):  # each thumbnail is the crop the model saw
        assert np.array_equal(np.asarray(png.convert("RGB")), torch_crop(best, item["source"]))

    shot = tmp_path / "report.png"
    chromium(tmp_path / "profile", "--window-size=1280,2000", f"--screenshot={shot}", report.as_uri())
    with Image.open(shot) as image:
        assert image.size == (1280, 2000) and len(image.convert("RGB").getcolors(1 << 24)) > 1000  # not blank

    # jaxtl eval --report: the default place is the run's report.html, rewritten; with --tta flip, elsewhere.
    report.unlink()
    evaluated = jaxtl("eval", str(best), "--report")
    assert f"report: {report}" in evaluated.stdout
    again = seen_in_browser(report, tmp_path)
    assert again["table"] == seen["table"] and [g["source"] for g in again["gallery"]] == files
    flipped_path = tmp_path / "elsewhere" / "flip.html"
    flipped = jaxtl("eval", str(best), "--tta", "flip", "--report", str(flipped_path))
    assert f"report: {flipped_path}" in flipped.stdout and "TTA: flip" in flipped_path.read_text()
    flipped_seen = seen_in_browser(flipped_path, tmp_path)
    assert_everything_rendered(flipped_seen, inline_pngs(flipped_path.read_text()))
    flip_files = [item["source"] for item in flipped_seen["gallery"]]
    assert_gallery_is_torchs(flipped_seen, torch_outputs(best, flip_files, flip=True), flip_files, classes)

    # A checkpoint outside a run directory has no default place for its report: one error naming it.
    alone = tmp_path / "alone"
    shutil.copytree(best.resolve(), alone)
    refused = subprocess.run([*JAXTL, "eval", str(alone), "--report"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"{alone} is not in a run directory (RUN_DIR/checkpoints/NAME)" in refused.stderr
    assert "--report PATH" in refused.stderr

    # A report that cannot be written does not fail a finished run: the run says so, and how to write it.
    report.unlink()
    report.mkdir()
    resumed = jaxtl("train", "--resume", str(run_dir))  # the run had finished: nothing is left to train
    assert f"report.html was not written: JaxtlError: report path {report} is a directory" in resumed.stdout
    assert f"`jaxtl eval {best} --report`" in resumed.stdout and "best val acc@1" in resumed.stdout
