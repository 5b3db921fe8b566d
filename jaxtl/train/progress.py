"""The progress line of a loop over batches: redrawn in place by tqdm on a terminal, a few plain lines in a log."""

from __future__ import annotations

import math
import numbers
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from tqdm import tqdm

from jaxtl.train.events import ReportingError

_REDRAW_EVERY_S = 0.1  # on a terminal: ten redraws a second look live and cost next to nothing


class Progress:
    """A progress line for a loop over batches.

    On a terminal a tqdm bar redraws the line in place (``\\r``, cut to the terminal's width) at most ten times
    a second::

        epoch 3  37/120 [31%]  412.3 img/s  loss 0.531  eta 0:12

    On anything else (a log file, CI output, pytest's capture) a plain line is printed at most every
    ``log_every_s`` seconds and once by :meth:`close`, so logs stay short and the last line holds the
    final postfix values (a loss fetched after the last batch).

    Throughput is the images (or, when no images are reported, batches) done since the first update divided by
    the wall time since the first update: the time before the first batch, which includes jit compilation and
    the loader's start-up, does not count, and neither do the first update's images. The ETA extrapolates the
    batches still to do at that rate. The final line shows the whole wall time, first batch included. This class,
    not tqdm, composes the line and paces it: tqdm counts one unit from its creation on its own clock and prints
    nothing but in-place redraws, where this line counts batches and images from the first update, on ``clock``.

    Args:
        total: the number of batches expected.
        desc: the label at the start of the line.
        stream: where to write; ``sys.stderr`` (as it is at construction) when None.
        unit: the name of what ``images`` counts, shown as ``{unit}/s``.
        log_every_s: on a non-terminal stream, the least time between two printed lines.
        clock: seconds as a float, monotonic (tests pass a fake one).
    """

    def __init__(
        self,
        total: int,
        desc: str = "",
        *,
        stream: TextIO | None = None,
        unit: str = "img",
        log_every_s: float = 10.0,
        clock: Callable[[], float] = time.perf_counter,
    ):
        if total < 0:
            raise ReportingError(f"Progress total must be >= 0, got {total}")
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = sys.stderr if stream is None else stream
        self.is_terminal = self.stream.isatty()
        self.log_every_s = log_every_s
        self.clock = clock
        self.batches, self.images = 0, 0
        self.postfix: dict[str, Any] = {}
        self._created = clock()
        self._first: tuple[float, int, int] | None = None  # (time, batches, images) at the first update
        self._last_shown = -math.inf
        self._dirty = False  # updated since the last printed line
        self._bar: tqdm | None = None  # created by the first redraw on a terminal
        self._closed = False

    def update(self, n_batches: int = 1, images: int = 0, **postfix: float | int | str) -> None:
        """Records ``n_batches`` more batches holding ``images`` images; ``postfix`` values (e.g. ``loss=0.53``)
        are shown after the rate and replace earlier values of the same names. Pass Python numbers: a device
        array here would make the loop wait for the device."""
        if self._closed:
            raise ReportingError(f"Progress {self.desc!r} is closed; make a new one for the next loop")
        for name, value in postfix.items():
            if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
                raise ReportingError(f"postfix {name}={value!r} must be a Python number or string")
        now = self.clock()
        self.batches += n_batches
        self.images += images
        self.postfix.update(postfix)
        self._dirty = True
        if self._first is None:
            self._first = (now, self.batches, self.images)
        done = self.batches >= self.total
        if self.is_terminal:
            if done or now - self._last_shown >= _REDRAW_EVERY_S:
                self._redraw(now)
        elif not done and now - max(self._last_shown, self._first[0]) >= self.log_every_s:
            self._print_line(now)

    def close(self) -> None:
        """Shows the final state (ending the terminal line); closing twice is harmless."""
        if self._closed:
            return
        now = self.clock()
        if self.is_terminal:
            if self._bar is None:
                self._redraw(now)
            self._bar.set_description_str(self.line(now), refresh=False)
            self._bar.close()  # draws the line a last time and ends it
        elif self._dirty:
            self._print_line(now)
        self.stream.flush()
        self._closed = True

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def line(self, now: float | None = None) -> str:
        """The progress line as it would be shown at time ``now`` (the clock's time when None)."""
        now = self.clock() if now is None else now
        percent = 100.0 if self.total == 0 else 100.0 * self.batches / self.total
        if self.batches < self.total:
            percent = min(percent, 99.0)  # never show 100% before the end
        parts = [f"{self.desc}  {self.batches}/{self.total} [{percent:.0f}%]".lstrip()]
        rate, per_batch = self._rates(now)
        if rate is not None:
            parts.append(f"{rate:.1f} {self.unit}/s" if self.images else f"{rate:.2f} batch/s")
        parts.extend(f"{name} {_format_value(value)}" for name, value in self.postfix.items())
        if self.batches >= self.total:
            parts.append(f"in {_format_duration(now - self._created)}")
        elif per_batch is not None:
            parts.append(f"eta {_format_duration((self.total - self.batches) * per_batch)}")
        return "  ".join(parts)

    def _rates(self, now: float) -> tuple[float | None, float | None]:
        """(throughput, seconds per batch) since the first update; None before a second update has timing."""
        if self._first is None:
            return None, None
        started, batches, images = self._first
        seconds, batches_since = now - started, self.batches - batches
        if seconds <= 0 or batches_since <= 0:
            return None, None
        done = self.images - images if self.images else batches_since
        return done / seconds, seconds / batches_since

    def _redraw(self, now: float) -> None:
        if self._bar is None:
            # The bar shows only its description, the line; creating it draws it. position=0: another Progress
            # left unclosed (an epoch cut short by an error) must not push this line down a row; no other line
            # is drawn below it, so no row limit.
            self._bar = tqdm(
                desc=self.line(now), total=self.total, file=self.stream, bar_format="{desc}",
                position=0, ncols=_columns(self.stream), nrows=sys.maxsize,
            )  # fmt: skip
        else:
            self._bar.set_description_str(self.line(now))
        self._last_shown = now

    def _print_line(self, now: float) -> None:
        self.stream.write(self.line(now) + "\n")
        self.stream.flush()
        self._dirty = False
        self._last_shown = now


def _columns(stream: TextIO) -> int:
    """How much of the line tqdm shows: the terminal's width less one column (a full row would wrap, and every
    redraw would then add a row), or all of it where the terminal reports no size, as a new pseudo-terminal
    does (0 x 0), and tqdm's own measure would show nothing at all."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):  # no file descriptor (io.StringIO)
        return sys.maxsize
    return columns - 1 if columns > 1 else sys.maxsize


def _format_value(value: float | int | str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return str(int(value))
    value = float(value)
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.3f}"
    return f"{value:.3e}"


def _format_duration(seconds: float) -> str:
    """``M:SS``, or ``H:MM:SS`` from an hour on."""
    whole = int(round(max(seconds, 0.0)))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
