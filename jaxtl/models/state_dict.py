"""A model's state as a flat ``{torchvision key: array}`` dict, and strict loading of one into a model.

Keys are the dotted parameter paths, which equal torchvision's state_dict keys. Arrays are in
jaxtl's layout (HWIO kernels, (in, out) linear weights); ``torch_permutations`` says how each
torch tensor is permuted into it, which is all a conversion from torch needs to know.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx

from jaxtl.errors import WeightsMismatchError
from jaxtl.models.names import collapse_names, dotted_name

TRANSFER_BYTES = 256 << 20  # host copies alive at once while a state_dict is loaded


def state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """Every parameter and BatchNorm statistic of ``model`` as host numpy arrays, keys sorted."""
    return {dotted_name(path): np.asarray(jax.device_get(variable.get_value())) for path, variable in _variables(model)}


def _variables(model: nnx.Module) -> list[tuple[tuple, nnx.Variable]]:
    """Parameters and BatchNorm statistics: what a torchvision state_dict holds (no RNG state)."""
    return [
        (path, variable)
        for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
        if variable.get_value() is not None
    ]


def torch_permutations(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """For each key whose jaxtl layout differs from torch's, the permutation torch -> jaxtl.

    Derived from the layer types (their ``TORCH_LAYOUT``), never guessed from shapes: a square
    linear weight has the same shape in both layouts.
    """
    permutations = {}
    for path, module in nnx.iter_modules(model):
        for name, permutation in getattr(type(module), "TORCH_LAYOUT", {}).items():
            if getattr(module, name, None) is not None:
                permutations[dotted_name((*path, name))] = permutation
    return permutations


def _describe(lines: list[str], limit: int = 25) -> str:
    shown = "\n    ".join(lines[:limit])
    more = f"\n    ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return f"\n    {shown}{more}"


def check_state_dict(
    model: nnx.Module, state: Mapping[str, np.ndarray], *, source: str, ignore_prefixes: tuple[str, ...] = ()
) -> None:
    """Raises WeightsMismatchError unless ``state`` fills every key of ``model`` with the right shape.

    Args:
        model: the target model.
        state: flat arrays in jaxtl layout.
        source: what ``state`` came from (a file, a weight name), for the message.
        ignore_prefixes: keys starting with these are neither required nor allowed to mismatch
            (a fresh head: ``("fc.",)``).
    """
    targets = {dotted_name(path): variable.get_value().shape for path, variable in _variables(model)}

    def ignored(key: str) -> bool:
        return key.startswith(ignore_prefixes) if ignore_prefixes else False

    missing = [k for k in targets if k not in state and not ignored(k)]
    unexpected = [k for k in state if k not in targets and not ignored(k)]
    mismatched = [
        f"{k}: weights {tuple(np.shape(state[k]))}, model {tuple(targets[k])}"
        for k in targets
        if k in state and not ignored(k) and tuple(np.shape(state[k])) != tuple(targets[k])
    ]
    if missing or unexpected or mismatched:
        parts = [f"weights from {source} do not fit {type(model).__name__}:"]
        if missing:
            parts.append(
                f"  {len(missing)} missing keys (in the model, not in the weights):"
                f"{_describe(collapse_names(missing, targets))}"
            )
        if unexpected:
            parts.append(
                f"  {len(unexpected)} unexpected keys (in the weights, not in the model):"
                f"{_describe(collapse_names(unexpected, state))}"
            )
        if mismatched:
            parts.append(
                f"  {len(mismatched)} shape mismatches (jaxtl layout: HWIO kernels, (in, out) linear):"
                f"{_describe(mismatched)}"
            )
        parts.append("  Check that the architecture matches the weights (jaxtl.models.list_models()).")
        raise WeightsMismatchError("\n".join(parts), missing=missing, unexpected=unexpected, mismatched=mismatched)


def load_state_dict(
    model: nnx.Module, state: Mapping[str, np.ndarray], *, source: str, ignore_prefixes: tuple[str, ...] = ()
) -> None:
    """Strictly copies ``state`` (jaxtl layout) into ``model`` in place; nothing is changed on error.

    Keys under ``ignore_prefixes`` keep the model's own values (a freshly initialised head).
    Every array is copied: the model never shares memory with ``state``, whose arrays may be views
    of torch tensors that training goes on changing in place.
    """
    check_state_dict(model, state, source=source, ignore_prefixes=ignore_prefixes)
    variables, values, copies, pending = [], [], [], 0

    def transfer():
        # One transfer for many arrays (one call per array cost 1.5 ms each: 0.3 s for ResNet-18's 202), in chunks
        # of TRANSFER_BYTES, so that the host copies of a 2.5 GB model are not all alive beside its device arrays.
        values.extend(jax.device_put(copies))
        copies.clear()

    for path, variable in _variables(model):
        key = dotted_name(path)
        if ignore_prefixes and key.startswith(ignore_prefixes):
            continue
        # A copy of our own: device_put may wrap a suitably aligned host buffer (torch's are) without copying.
        copies.append(np.array(state[key], dtype=variable.get_value().dtype, copy=True))
        variables.append(variable)
        pending += copies[-1].nbytes
        if pending >= TRANSFER_BYTES:
            transfer()
            pending = 0
    transfer()
    for variable, value in zip(variables, values, strict=True):  # all or nothing
        variable.set_value(value)
