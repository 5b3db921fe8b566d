"""Faults injected at named points of a run, for the tests that show checkpoints survive crashes and full disks.

``JAXTL_TEST_FAULT=ACTION:POINT:N`` makes the N-th pass of this process through ``POINT`` either die
at once (ACTION ``kill``: SIGKILL, as ``kill -9``, an out-of-memory kill or a power cut would end it)
or fail like a full disk (ACTION ``oserror``: OSError ENOSPC). Points:

- ``train.step``: after a training step is dispatched;
- ``train.eval``: after the first batch of an evaluation;
- ``NAME.arrays``: inside the save of checkpoint NAME (``latest``, ``best``), the arrays written and
  ``meta.json`` not yet;
- ``NAME.staged``: the new checkpoint complete (arrays, meta.json, manifest.json) under its staging name;
- ``NAME.renamed``: the new checkpoint renamed to its version directory, the ``NAME`` link not yet switched;
- ``NAME.linked``: the link switched to the new version, the old versions not yet removed.

Without the variable a point costs one environment lookup.
"""

from __future__ import annotations

import collections
import errno
import os
import re
import signal

from jaxtl.errors import JaxtlError

VARIABLE = "JAXTL_TEST_FAULT"
_SPEC = re.compile(r"^(kill|oserror):(train\.step|train\.eval|[\w-]+\.(?:arrays|staged|renamed|linked)):([1-9]\d*)$")
_passes: collections.Counter[str] = collections.Counter()


def fault_point(point: str) -> None:
    """Counts a pass through ``point`` and injects the fault ``JAXTL_TEST_FAULT`` asks for there, if any."""
    spec = os.environ.get(VARIABLE)
    if not spec:
        return
    match = _SPEC.match(spec)
    if match is None:
        raise JaxtlError(
            f"{VARIABLE}={spec!r} is not ACTION:POINT:N (ACTION kill or oserror; POINT train.step, train.eval or "
            "NAME.arrays/staged/renamed/linked), e.g. kill:latest.renamed:2; unset it for a normal run"
        )
    action, target, count = match.groups()
    if target != point:
        return
    _passes[point] += 1
    if _passes[point] != int(count):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise OSError(errno.ENOSPC, f"No space left on device (injected by {VARIABLE} at {point})")
