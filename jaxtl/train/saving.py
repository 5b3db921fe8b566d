"""The training loop's checkpoints: what one holds, the check that it is finite, and writing ``best`` and ``latest``."""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx

from jaxtl.models.names import key_path_name
from jaxtl.train import checkpoint as ckpt
from jaxtl.train.resume import model_arrays, tree_leaves
from jaxtl.train.run_dir import RunDirectory, RunError
from jaxtl.train.state import CheckpointMeta


def checkpoint_arrays(model: nnx.Module, opt_state, average: nnx.Module | None = None) -> dict:
    """What a checkpoint holds: the model's arrays, the optimizer state and (train.ema) the average's arrays."""
    arrays = {"model": model_arrays(model), "opt_state": tree_leaves(opt_state)}
    if average is not None:
        arrays["ema"] = model_arrays(average)
    return arrays


class RunCheckpoints:
    """Writes the checkpoints of the run in ``directory`` (the first process only) and names the last good one."""

    def __init__(self, directory: RunDirectory):
        self.directory = directory
        self.pending_best: tuple[dict, CheckpointMeta] | None = None  # held by hold_best, not written yet

    def hold_best(self, arrays: dict, meta: CheckpointMeta) -> None:
        """Keeps a new ``best`` on the host until :meth:`write_pending_best` (a phase on cached features writes its
        checkpoints at its end); a newer one replaces it."""
        self.pending_best = (jax.device_get(arrays), meta)

    def write_pending_best(self) -> None:
        """Writes the held ``best``, if any."""
        if self.pending_best is not None:
            arrays, meta = self.pending_best
            self.save("best", arrays, meta, keep_previous=False)
            self.pending_best = None

    def check_finite(self, arrays: dict, val_loss: float, where: str) -> None:
        """Stops the run before a checkpoint with a non-finite parameter, statistic or optimizer state is written;
        ``where``: the phase and epoch, for the message."""
        bad = [
            key_path_name(path)
            for path, leaf in jax.tree_util.tree_leaves_with_path(arrays)
            if np.issubdtype(np.asarray(leaf).dtype, np.inexact) and not np.isfinite(leaf).all()
        ]
        if bad or not math.isfinite(val_loss):
            what = f"non-finite values in {', '.join(bad[:3])}" if bad else f"a non-finite validation loss ({val_loss})"
            raise RunError(
                f"{what} ({where}); stopped without writing a checkpoint of it. {self.last_good()} Lower the learning "
                "rate (optim.lr, phases.N.lrs) or set optim.clip_grad_norm"
            )

    def save(
        self, name: str, arrays: dict, meta: CheckpointMeta, *, keep_previous: bool = True, like: str | None = None
    ) -> None:
        """Writes checkpoint ``name``; ``like``: the checkpoint just written with the same arrays and meta, whose
        files the new one links to instead of writing them again."""
        if not self.directory.primary:
            return
        checkpoints = self.directory.path / "checkpoints"
        try:
            if like is not None:
                ckpt.link_checkpoint(checkpoints / like, checkpoints / name, keep_previous=keep_previous)
            else:
                ckpt.save_checkpoint(checkpoints / name, arrays, meta.to_json(), keep_previous=keep_previous)
        except ckpt.CheckpointError as error:
            raise RunError(f"{error}, then continue the run: jaxtl train --resume {self.directory.path}") from None

    def last_good(self) -> str:
        """A sentence naming the last good checkpoint, for the message of a run that stops."""
        latest = self.directory.latest
        if not latest.exists():
            return "No checkpoint was written before."
        try:
            return f"The last good checkpoint is {latest} (step {ckpt.load_meta(latest)['step']})."
        except ckpt.CheckpointError as error:
            return f"The last checkpoint is damaged: {error}."
