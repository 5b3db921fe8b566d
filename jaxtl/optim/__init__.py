"""Parameter groups (freezing, learning rates, weight decay, BatchNorm policy), phases and their optimizer.

Names load on first use: the settings a run config holds (``OptimizerConfig``, ``Phase``, ``Rule``,
``Group``, ``Labels``) need no jax, so a config is read and checked before jax is imported.
"""

import importlib

_NAMES = {
    "jaxtl.optim.rules": ("BN_POLICIES", "BNPolicy", "Group", "ParamGroupError", "Rule"),
    "jaxtl.optim.settings": ("Freezing", "Labels", "OptimizerConfig", "Phase"),
    "jaxtl.optim.groups": ("ParamGroups", "assign", "assign_labels", "parameters"),
    "jaxtl.optim.optimizer": (
        "build_optimizer", "group_lr", "group_state_leaves", "learning_rates", "plateau_peaks", "schedule",
    ),
    "jaxtl.optim.plateau": ("Plateau", "get_plateau_scales", "scale_by_plateau", "set_plateau_scales"),
    "jaxtl.optim.phases": ("carry_optimizer_state", "progressive_unfreezing"),
    "jaxtl.optim.literature": (
        "L2SPState", "l2sp", "relative_gradient_norm_scales", "scale_by_relative_gradient_norm", "with_l2sp",
    ),
    "jaxtl.optim.policies": (
        "POLICIES", "bitfit", "discriminative", "full", "get_policy", "head_only", "last_n_blocks",
        "layerwise_lr_decay", "norm_only", "surgical",
    ),
}  # fmt: skip
_MODULES = {name: module for module, names in _NAMES.items() for name in names}

__all__ = sorted(_MODULES)


def __getattr__(name: str):
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'jaxtl.optim' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
