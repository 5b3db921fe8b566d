"""Event files read back by TensorBoard's own reader, confusion matrices, figures, the progress line."""

import io
import json
import re
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader, LegacyEventFileLoader
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tensorboard_masked_crc32c

from jaxtl.train.events import EventWriter, ReportingError
from jaxtl.train.figures import Figures, confusion_matrix, load_metrics, plot_confusion, plot_curves
from jaxtl.train.progress import Progress

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    accumulator = EventAccumulator(str(logdir))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


# -- TFRecord framing --------------------------------------------------------------------------------


def test_event_file_framing_and_name(tmp_path):
    with EventWriter(tmp_path / "tb") as events:
        events.scalar("loss", 1.5, step=3)
    assert re.fullmatch(r"events\.out\.tfevents\.\d{10}\.[A-Za-z0-9._-]+\.\d+\.0", events.path.name)
    raw = events.path.read_bytes()
    records = []
    while raw:
        (length,) = struct.unpack("<Q", raw[:8])
        assert struct.unpack("<I", raw[8:12])[0] == tensorboard_masked_crc32c(raw[:8])
        data = raw[12 : 12 + length]
        assert struct.unpack("<I", raw[12 + length : 16 + length])[0] == tensorboard_masked_crc32c(data)
        records.append(data)
        raw = raw[16 + length :]
    assert len(records) == 2  # file_version, then the scalar
    raw_events = list(LegacyEventFileLoader(str(events.path)).Load())  # the events as written
    assert raw_events[0].file_version == "brain.Event:2"
    assert raw_events[1].step == 3
    assert abs(raw_events[1].wall_time - time.time()) < 60
    assert [(v.tag, v.simple_value) for v in raw_events[1].summary.value] == [("loss", 1.5)]
    # TensorBoard's loader turns simple_value into a scalars-plugin tensor.
    (value,) = list(EventFileLoader(str(events.path)).Load())[1].summary.value
    assert (value.metadata.plugin_data.plugin_name, list(value.tensor.float_val)) == ("scalars", [1.5])


# -- EventWriter ------------------------------------------------------------------------------------


def test_scalars_read_back_by_tensorboard(tmp_path):
    logdir = tmp_path / "tensorboard"
    with EventWriter(logdir) as events:
        for step in (1, 2, 3):
            events.scalar("train/loss", 1.0 / step, step)
        events.scalars({"val/loss": 0.1, "val/acc1": np.float32(0.7), "lr": 3e-4}, step=3)
        events.scalar("big_step", 7, step=2**40)  # a multi-byte varint
        events.scalar("huge", 1e39, step=4)  # beyond float32: stored as infinity, as float32 would round it
    scalars = _scalars(logdir)
    assert sorted(scalars) == ["big_step", "huge", "lr", "train/loss", "val/acc1", "val/loss"]
    assert scalars["train/loss"] == [(s, float(np.float32(1.0 / s))) for s in (1, 2, 3)]
    assert scalars["val/loss"] == [(3, float(np.float32(0.1)))]
    assert scalars["val/acc1"] == [(3, float(np.float32(0.7)))]
    assert scalars["lr"] == [(3, float(np.float32(3e-4)))]
    assert scalars["big_step"] == [(2**40, 7.0)]
    assert scalars["huge"] == [(4, float("inf"))]


def test_writers_in_one_logdir_get_their_own_files(tmp_path):
    first, second = EventWriter(tmp_path), EventWriter(tmp_path)
    first.scalar("a", 1.0, 1)
    second.scalar("b", 2.0, 1)
    first.close()
    second.close()
    assert first.path != second.path
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    assert _scalars(tmp_path) == {"a": [(1, 1.0)], "b": [(1, 2.0)]}


def test_purge_step_hides_steps_logged_after_the_last_checkpoint(tmp_path):
    with EventWriter(tmp_path) as crashed:
        for step in range(1, 6):
            crashed.scalar("loss", float(step), step)
    with EventWriter(tmp_path, purge_step=4) as resumed:  # the checkpoint was at step 3
        for step in (4, 5):
            resumed.scalar("loss", 10.0 * step, step)
    assert _scalars(tmp_path)["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]


def test_event_writer_rejects_bad_input(tmp_path):
    events = EventWriter(tmp_path)
    with pytest.raises(ReportingError, match="step must be an int >= 0"):
        events.scalar("loss", 1.0, -1)
    with pytest.raises(ReportingError, match="step must be an int"):
        events.scalar("loss", 1.0, 1.5)
    with pytest.raises(ReportingError, match="'loss': value 'high' is not a number"):
        events.scalar("loss", "high", 1)
    with pytest.raises(ReportingError, match="non-empty"):
        events.scalars({}, 1)
    events.close()
    events.close()
    with pytest.raises(ReportingError, match="is closed"):
        events.scalar("loss", 1.0, 1)


# -- confusion matrix -------------------------------------------------------------------------------


def test_confusion_matrix_counts():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    predictions = np.array([0, 0, 1, 1, 2, 2, 2, 0, 2])
    expected = np.array(
        [
            [2, 1, 0],
            [0, 1, 1],
            [1, 0, 3],
        ]
    )
    matrix = confusion_matrix(labels, predictions, 3)
    assert matrix.dtype == np.int64
    np.testing.assert_array_equal(matrix, expected)
    np.testing.assert_array_equal(confusion_matrix(labels, predictions, 4)[:3, :3], expected)
    assert confusion_matrix(labels, predictions, 4)[3].sum() == 0


def test_confusion_matrix_rejects_bad_input():
    with pytest.raises(ReportingError, match=r"predictions must lie in \[0, 3\), got values from 0 to 3"):
        confusion_matrix(np.array([0, 1]), np.array([0, 3]), 3)
    with pytest.raises(ReportingError, match="labels must lie"):
        confusion_matrix(np.array([-1, 1]), np.array([0, 1]), 3)
    with pytest.raises(ReportingError, match="equally long"):
        confusion_matrix(np.array([0, 1]), np.array([0]), 3)
    with pytest.raises(ReportingError, match="integer class indices"):
        confusion_matrix(np.array([0.0, 1.0]), np.array([0, 1]), 3)


def _png_size(path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size > 5_000
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


@pytest.mark.parametrize("num_classes", [2, 12, 100])
def test_plot_confusion_writes_a_png(tmp_path, num_classes):
    rng = np.random.default_rng(num_classes)
    labels = rng.integers(0, num_classes, 500)
    predictions = np.where(rng.random(500) < 0.7, labels, rng.integers(0, num_classes, 500))
    names = [f"class_{i}" for i in range(num_classes)]
    path = plot_confusion(confusion_matrix(labels, predictions, num_classes), names, tmp_path / "sub" / "confusion.png")
    width, height = _png_size(path)
    assert width > 300 and height > 300
    if num_classes == 100:
        assert width > 2000  # big enough to read 100 class names


def test_plot_confusion_rejects_mismatched_names_and_empty_matrices(tmp_path):
    with pytest.raises(ReportingError, match=r"must be \(2, 2\) for 2 class names, got shape \(3, 3\)"):
        plot_confusion(np.eye(3, dtype=np.int64), ["a", "b"], tmp_path / "c.png")
    with pytest.raises(ReportingError, match="counts no examples"):
        plot_confusion(np.zeros((2, 2), np.int64), ["a", "b"], tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


# -- training curves --------------------------------------------------------------------------------


def _trainer_records() -> list[dict]:
    """Records as jaxtl.train.loop writes them: a 2-epoch head phase, then a 3-epoch fine-tuning phase."""
    phases = ["head", "head", "finetune", "finetune", "finetune"]
    return [
        {
            "phase": phase,
            "epoch": epoch,
            "step": 10 * epoch,
            "train_loss": 2.0 / epoch,
            "train_acc1": 0.5 + 0.08 * epoch,
            "train_images_per_s": 400.0,
            "val_loss": 2.2 / epoch,
            "val_acc1": 0.45 + 0.08 * epoch,
            "val_acc5": 0.8 + 0.03 * epoch,
        }
        for epoch, phase in enumerate(phases, start=1)
    ]


def test_plot_curves_from_metrics_jsonl(tmp_path):
    records = _trainer_records()
    metrics = tmp_path / "metrics.jsonl"
    # Epoch 3 written twice, as after a crash between the metrics line and the checkpoint: the later one counts.
    lines = [*records[:3], {**records[2], "val_loss": 9.0}, *records[3:]]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in lines))
    loaded = load_metrics(metrics)
    assert len(loaded) == 6 and loaded[3]["val_loss"] == 9.0
    width, height = _png_size(plot_curves(loaded, tmp_path / "curves.png", title="resnet18 on flowers"))
    assert (width, height) == (1100, 420)


def test_plot_curves_without_top5_and_with_one_epoch(tmp_path):
    record = {k: v for k, v in _trainer_records()[0].items() if k != "val_acc5"}
    width, height = _png_size(plot_curves([record], tmp_path / "curves.png"))
    assert width > 100 and height > 100


def test_plot_curves_rejects_records_it_cannot_plot(tmp_path):
    with pytest.raises(ReportingError, match="no metrics records"):
        plot_curves([], tmp_path / "curves.png")
    with pytest.raises(ReportingError, match="record 0 lacks val_loss, val_acc1"):
        plot_curves([{"phase": "head", "epoch": 1, "train_loss": 1.0}], tmp_path / "curves.png")
    bad = tmp_path / "metrics.jsonl"
    bad.write_text('{"epoch": 1}\n{"epoch": 2\n')
    with pytest.raises(ReportingError, match="line 2: not a JSON record"):
        load_metrics(bad)


def test_importing_jaxtl_does_not_import_matplotlib_or_tensorboard():
    code = (
        "import sys, jaxtl.train.events, jaxtl.train.figures, jaxtl.train.progress; "
        "print([m for m in ('matplotlib', 'tensorboard', 'tensorboardX') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_writing_events_imports_neither_torch_nor_tensorflow(tmp_path):
    code = (
        "import sys; from jaxtl.train.events import EventWriter\n"
        f"with EventWriter({str(tmp_path)!r}, purge_step=2) as events:\n"
        "    events.scalars({'loss': 0.5, 'lr': 1e-3}, step=3)\n"
        "print([m for m in ('torch', 'tensorflow') if m in sys.modules])\n"
        "import importlib.util; print(importlib.util.find_spec('torch') is None or __import__('torch') is not None)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "True"]  # and torch, where installed, still imports afterwards
    assert _scalars(tmp_path) == {"loss": [(3, 0.5)], "lr": [(3, float(np.float32(1e-3)))]}


# -- Progress ---------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_log_prints_a_line_every_log_every_s_and_at_the_end():
    stream, clock = io.StringIO(), FakeClock()
    progress = Progress(10, "epoch 1", stream=stream, log_every_s=3.0, clock=clock)
    clock.now = 5.0  # compilation before the first batch: not part of the throughput
    for batch in range(10):
        clock.now += 1.0
        progress.update(images=32, loss=1.0 / (batch + 1))
    progress.close()
    progress.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    # First update at t=6; lines 3 s later (t=9, batch 4), at t=12 (batch 7) and at the end (t=15).
    assert lines == [
        "epoch 1  4/10 [40%]  32.0 img/s  loss 0.250  eta 0:06",
        "epoch 1  7/10 [70%]  32.0 img/s  loss 0.143  eta 0:03",
        "epoch 1  10/10 [100%]  32.0 img/s  loss 0.100  in 0:15",
    ]


def test_progress_close_prints_an_unfinished_epoch_once():
    stream, clock = io.StringIO(), FakeClock()
    with Progress(120, "val", stream=stream, unit="img", clock=clock) as progress:
        for _ in range(37):
            clock.now += 0.25
            progress.update(images=100)
    assert stream.getvalue() == "val  37/120 [31%]  400.0 img/s  eta 0:21\n"


def test_progress_on_a_terminal_redraws_one_line_at_most_ten_times_a_second():
    stream, clock = FakeTerminal(), FakeClock()
    progress = Progress(4, "epoch 2", stream=stream, clock=clock)
    for now in (1.0, 1.05, 1.5):  # the update at 1.05 comes too soon after the one at 1.0 to redraw
        clock.now = now
        progress.update(images=32, loss=0.53)
    clock.now = 1.6
    progress.close()
    out = stream.getvalue()
    assert out.startswith("\r") and out.endswith("\n") and out.count("\n") == 1
    frames = [frame.rstrip() for frame in out[1:-1].split("\r")]
    assert frames == [
        "epoch 2  1/4 [25%]  loss 0.530",
        "epoch 2  3/4 [75%]  128.0 img/s  loss 0.530  eta 0:00",
        "epoch 2  3/4 [75%]  106.7 img/s  loss 0.530  eta 0:00",
    ]


def test_progress_without_images_reports_batches_per_second_and_rejects_device_arrays():
    stream, clock = io.StringIO(), FakeClock()
    progress = Progress(3, "features", stream=stream, clock=clock)
    for _ in range(3):
        clock.now += 2.0
        progress.update()
    assert stream.getvalue() == ""  # the end line waits for close(), which may bring a last postfix
    progress.update(0, loss=0.25)
    progress.close()
    assert stream.getvalue() == "features  3/3 [100%]  0.50 batch/s  loss 0.250  in 0:06\n"
    with pytest.raises(ReportingError, match="must be a Python number or string"):
        Progress(3, stream=io.StringIO()).update(loss=np.array([0.5]))


# -- figures of a running job ------------------------------------------------------------------------


def test_figures_draw_at_most_every_every_s_and_the_newest_on_flush():
    clock, drawn = FakeClock(), []
    figures = Figures(30.0, clock=clock)
    clock.now += 10.0
    figures.update("curves", lambda: drawn.append(("curves", 0)))  # 10 s after the start: kept for later
    assert drawn == [] and figures.pending == ["curves"]
    clock.now += 20.0
    figures.update("curves", lambda: drawn.append(("curves", 1)))  # 30 s after the start: drawn at once
    assert drawn == [("curves", 1)] and figures.pending == []
    for epoch in (2, 3):  # 10 s apart: kept for later, the newer replacing the older
        clock.now += 10.0
        figures.update("curves", lambda epoch=epoch: drawn.append(("curves", epoch)))
    figures.update("confusion", lambda: drawn.append(("confusion", 3)))
    assert drawn == [("curves", 1)] and figures.pending == ["curves", "confusion"]
    clock.now += 10.0  # 30 s since the last drawing: everything pending is drawn
    figures.update("curves", lambda: drawn.append(("curves", 4)))
    assert drawn[1:] == [("curves", 4), ("confusion", 3)] and figures.pending == []
    clock.now += 1.0
    figures.update("curves", lambda: drawn.append(("curves", 5)))
    figures.flush()  # the end of a phase or run: drawn whatever the time
    figures.flush()  # nothing pending: nothing drawn twice
    assert drawn[3:] == [("curves", 5)]


def test_figures_every_0_draws_every_update_and_a_negative_interval_is_refused():
    drawn = []
    figures = Figures(0.0, clock=FakeClock())
    for epoch in range(3):
        figures.update("curves", lambda epoch=epoch: drawn.append(epoch))
    assert drawn == [0, 1, 2]
    with pytest.raises(ReportingError, match="every_s must be >= 0 seconds, got -1"):
        Figures(-1)
