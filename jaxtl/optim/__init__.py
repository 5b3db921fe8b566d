"""Parameter groups (freezing, learning rates, weight decay, BatchNorm policy) and their optimizer."""

from jaxtl.optim.groups import BN_POLICIES, Group, ParamGroupError, ParamGroups, Rule, assign, assign_labels, parameters
from jaxtl.optim.optimizer import OptimizerConfig, build_optimizer, group_lr, group_state_leaves, schedule
from jaxtl.optim.phases import Phase, carry_optimizer_state, progressive_unfreezing
from jaxtl.optim.policies import (
    POLICIES,
    bitfit,
    discriminative,
    full,
    get_policy,
    head_only,
    last_n_blocks,
    layerwise_lr_decay,
    norm_only,
)

__all__ = [
    "BN_POLICIES",
    "POLICIES",
    "Group",
    "OptimizerConfig",
    "Phase",
    "ParamGroupError",
    "ParamGroups",
    "Rule",
    "assign",
    "assign_labels",
    "bitfit",
    "build_optimizer",
    "carry_optimizer_state",
    "discriminative",
    "full",
    "get_policy",
    "group_lr",
    "group_state_leaves",
    "head_only",
    "last_n_blocks",
    "layerwise_lr_decay",
    "norm_only",
    "parameters",
    "progressive_unfreezing",
    "schedule",
]
