"""Training: ``fit`` (the public API the CLI calls), its loop, steps, evaluation, checkpoints and resume.

    from jaxtl.train import fit
    result = fit("configs/quickstart.yaml", overrides=["phases.0.epochs=1"])

Files: :mod:`~jaxtl.train.fit` (the entry point), :mod:`~jaxtl.train.loop` (phases and epochs over a
:class:`RunState`), :mod:`~jaxtl.train.step` (pure jitted steps), :mod:`~jaxtl.train.features` (the
feature cache), :mod:`~jaxtl.train.evaluate`, :mod:`~jaxtl.train.run_dir`, :mod:`~jaxtl.train.resume`,
:mod:`~jaxtl.train.checkpoint`, :mod:`~jaxtl.train.callbacks`, :mod:`~jaxtl.train.events`,
:mod:`~jaxtl.train.figures`, :mod:`~jaxtl.train.progress`, :mod:`~jaxtl.train.distributed`,
:mod:`~jaxtl.train.losses`, :mod:`~jaxtl.train.ema` (the weight average), :mod:`~jaxtl.train.report`
(``report.html``), :mod:`~jaxtl.train.lr_find` (the learning-rate range test), :mod:`~jaxtl.train.probe` and
:mod:`~jaxtl.train.suggest` (a linear probe on the frozen backbone's features; which layers to fine-tune),
:mod:`~jaxtl.train.diagnostics` (per-group quantities of each epoch), :mod:`~jaxtl.train.sweep` (freezing
strategies compared).
"""

from jaxtl.train.callbacks import Callback
from jaxtl.train.evaluate import Evaluation, Predictor, evaluate, evaluate_checkpoint
from jaxtl.train.fit import FitResult, fit, resolve_config
from jaxtl.train.inputs import RunData, load_data
from jaxtl.train.lr_find import LRFindResult, lr_find
from jaxtl.train.probe import Probe, linear_probe
from jaxtl.train.report import write_report
from jaxtl.train.resume import load_checkpoint
from jaxtl.train.run_dir import RunError
from jaxtl.train.state import Best, CheckpointMeta, EpochTotals, RunState
from jaxtl.train.suggest import SuggestResult, suggest
from jaxtl.train.sweep import SweepResult, sweep

__all__ = [
    "Best",
    "Callback",
    "CheckpointMeta",
    "EpochTotals",
    "Evaluation",
    "FitResult",
    "LRFindResult",
    "Predictor",
    "Probe",
    "RunData",
    "RunError",
    "RunState",
    "SuggestResult",
    "SweepResult",
    "evaluate",
    "evaluate_checkpoint",
    "fit",
    "linear_probe",
    "load_checkpoint",
    "load_data",
    "lr_find",
    "resolve_config",
    "suggest",
    "sweep",
    "write_report",
]
