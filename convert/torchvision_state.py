"""torchvision modules and state_dicts <-> jaxtl models: a layout change, never a renaming table."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from functools import cache

import numpy as np
import torch
from flax import nnx

from jaxtl.errors import WeightsMismatchError
from jaxtl.models import list_models
from jaxtl.models.layers import Linear
from jaxtl.models.names import dotted_name
from jaxtl.models.protocol import head_module
from jaxtl.models.registry import abstract_model, fill_rng_state, get_builder, model_options
from jaxtl.models.state_dict import check_state_dict, load_state_dict, state_dict, torch_permutations
from jaxtl.weights import WeightSpec, fill_default_preprocessing

BN_COUNTER = ".num_batches_tracked"


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    array = tensor.detach().cpu()
    if array.dtype in (torch.float16, torch.bfloat16):  # numpy has no bfloat16; jaxtl keeps float32 weights.
        array = array.float()
    return array.numpy()


def _drop_bn_counters(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """num_batches_tracked has no jaxtl counterpart: torchvision's BNs use a fixed momentum, so it is unused."""
    return {
        key: value
        for key, value in state.items()
        if not (key.endswith(BN_COUNTER) and key[: -len(BN_COUNTER)] + ".running_mean" in state)
    }


def torch_buffers(model: nnx.Module) -> dict[str, np.ndarray]:
    """torchvision's persistent buffers that ``model`` holds as constants, by state_dict key.

    A module lists them in ``TORCH_BUFFERS`` (Swin's ``relative_position_index``): attributes computed from
    its configuration, never nnx Variables, so optimizers and checkpoints never see them; only the exchange
    with torchvision state_dicts does.
    """
    return {
        dotted_name((*path, name)): np.asarray(getattr(module, name))
        for path, module in nnx.iter_modules(model)
        for name in getattr(type(module), "TORCH_BUFFERS", ())
    }


def check_torch_buffers(model: nnx.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Raises WeightsMismatchError if a buffer of ``state`` that ``model`` holds as a constant differs from it.

    An absent buffer is accepted: it is a constant of the architecture, which the model has already.
    """
    mismatched = []
    for key, constant in torch_buffers(model).items():
        if key in state:
            given = _to_numpy(state[key])
            if given.shape != constant.shape or not np.array_equal(given, constant):
                mismatched.append(f"{key}: weights {tuple(given.shape)}, model {tuple(constant.shape)} (values differ)")
    if mismatched:
        lines = "\n    ".join(mismatched[:25])
        raise WeightsMismatchError(
            f"weights from {source} do not fit {type(model).__name__}: {len(mismatched)} buffers differ from the "
            f"constants the architecture computes (a different window size?):\n    {lines}",
            mismatched=mismatched,
        )


def torch_to_jaxtl_layout(model: nnx.Module, state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A torch state_dict as numpy arrays in ``model``'s layout (conv OIHW -> HWIO, linear (out, in) -> (in, out)).

    The arrays are views of the tensors' memory where they can be (no copy, for checking shapes):
    ``load_state_dict`` copies them into a model. The buffers ``model`` holds as constants
    (:func:`torch_buffers`) are left out, as BatchNorm's ``num_batches_tracked`` is.
    """
    permutations = torch_permutations(model)
    buffers = torch_buffers(model)
    arrays = {}
    for key, tensor in _drop_bn_counters(state).items():
        if key in buffers:
            continue
        array = _to_numpy(tensor)
        if key in permutations and array.ndim == len(permutations[key]):
            array = np.transpose(array, permutations[key])
        arrays[key] = array
    return arrays


@cache
def _abstract_model(arch: str, num_classes: int, options: tuple = ()) -> nnx.Module:
    return abstract_model(arch, num_classes=num_classes, **dict(options))


def _options(arch: str, state: Mapping[str, torch.Tensor]) -> tuple:
    """The builder options ``state``'s shapes imply (a ViT's image_size), hashable."""
    return tuple(sorted(model_options(arch, state).items()))


def _head_width(arch: str, state: Mapping[str, torch.Tensor]) -> int | None:
    """Output width of the head's last linear layer (``fc.weight``, ``classifier.1.weight``) in ``state``."""
    model = _abstract_model(arch, 1000)
    key = _head_weight_key(model)
    weight = state.get(key)
    return None if weight is None or weight.ndim != 2 else int(weight.shape[0])


def _head_weight_key(model: nnx.Module) -> str:
    """The weight of the head's last Linear, whose output width is the class count: ``fc.weight``,
    ``classifier.1.weight``, MobileNetV3's ``classifier.3.weight`` (not ``classifier.0``, its hidden layer)."""
    linears = [path for path, module in nnx.iter_modules(head_module(model)) if isinstance(module, Linear)]
    return dotted_name((model.head_name, *linears[-1], "weight"))  # in forward order; () is a bare fc


def _roots(keys) -> frozenset[str]:
    return frozenset(key.split(".")[0] for key in keys)


@cache
def _family_roots(family: str) -> frozenset[str]:
    """The top-level module names of the first architecture registered by the module ``family``."""
    arch = next(arch for arch in list_models() if get_builder(arch).__module__ == family)
    state = nnx.state(_abstract_model(arch, 1000), nnx.Any(nnx.Param, nnx.BatchStat))
    return _roots(dotted_name(path) for path, _ in nnx.to_flat_state(state))


def _candidates(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The architectures to try for ``state``, in registry order: those of the families whose top-level modules
    are the state's (``conv1``, ``layer1``, ``fc``: a ResNet), so that one abstract model per family is built
    to rule the others out; every architecture where no family's match."""
    roots = _roots(state)
    matching = [arch for arch in list_models() if _family_roots(get_builder(arch).__module__) == roots]
    return matching or list_models()


def infer_arch(state: Mapping[str, torch.Tensor]) -> str:
    """The registered architecture whose keys and shapes a torchvision state_dict fits exactly."""
    state = _drop_bn_counters(state)
    for arch in _candidates(state):
        num_classes = _head_width(arch, state)
        if num_classes is None:
            continue
        options = _options(arch, state)
        # All but the head's last layer against the build at 1000 classes, which every candidate has (cached):
        # most candidates fail there, without a build at the state's class count.
        template = _abstract_model(arch, 1000, options)
        head = _head_weight_key(template).removesuffix("weight")
        try:
            check_state_dict(template, torch_to_jaxtl_layout(template, state), source="", ignore_prefixes=(head,))
        except WeightsMismatchError:
            continue
        model = _abstract_model(arch, num_classes, options)
        try:
            check_state_dict(model, torch_to_jaxtl_layout(model, state), source="the state_dict")
            check_torch_buffers(model, state, source="the state_dict")
        except WeightsMismatchError:
            continue
        return arch
    raise WeightsMismatchError(
        f"the state_dict ({len(state)} keys, first {list(state)[:3]}) fits none of jaxtl's architectures "
        f"({', '.join(list_models())}); pass arch= to see which keys differ"
    )


def from_torchvision(
    module_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
    arch: str | None = None,
    *,
    source: str = "torchvision",
    spec: WeightSpec | None = None,
) -> nnx.Module:
    """A jaxtl model computing what the torchvision model computes.

    Args:
        module_or_state_dict: a torchvision model or its ``state_dict()``.
        arch: the registry name (``"resnet50"``); inferred from the keys and shapes when None.
        source: what the weights came from, for error messages and the model's ``weight_spec``.
        spec: the weights' spec (``jaxtl.weights.get_weight_spec("resnet50", "IMAGENET1K_V2")`` for a
            module built with those weights), which becomes the model's ``weight_spec``. When None,
            a spec naming ``source``, with the preprocessing of ``arch``'s DEFAULT weights.

    Returns:
        The jaxtl model in train mode, with the torch module's head width. BatchNorm running
        statistics are carried over; ``num_batches_tracked`` is dropped. Every array is a copy: later
        changes to the torch module (training it, in-place edits) do not reach the jaxtl model.

    Raises:
        WeightsMismatchError: listing missing, unexpected and mis-shaped keys.
    """
    if isinstance(module_or_state_dict, torch.nn.Module):
        state = module_or_state_dict.state_dict()
    else:
        state = module_or_state_dict
    arch = arch or infer_arch(state)
    num_classes = _head_width(arch, state)
    if num_classes is None:
        head = _head_weight_key(_abstract_model(arch, 1000))
        raise WeightsMismatchError(
            f"weights from {source} have no 2-D {head}, so they are not a {arch} state_dict "
            f"(first keys: {list(state)[:5]})",
            missing=[head],
        )
    # Shapes only: every array is about to be replaced, so no random init is spent on them.
    model = abstract_model(arch, num_classes=num_classes, **model_options(arch, state))
    check_torch_buffers(model, state, source=source)
    load_state_dict(model, torch_to_jaxtl_layout(model, state), source=source)
    fill_rng_state(model)  # dropout and stochastic depth streams: keys, so that it trains
    if spec is None:
        name = "torchvision module" if isinstance(module_or_state_dict, torch.nn.Module) else "state_dict"
        spec = WeightSpec(arch=arch, name=name, source=source, num_classes=num_classes)
    model.weight_spec = fill_default_preprocessing(spec)
    return model


def to_torchvision(model: nnx.Module) -> OrderedDict[str, torch.Tensor]:
    """``model``'s state as a torchvision state_dict, loadable with ``load_state_dict(strict=True)``.

    Every tensor owns a copy of its values: changing it in place leaves ``model`` as it is. Each
    BatchNorm gets ``num_batches_tracked = 0``: torchvision's BNs use a fixed momentum, so the counter
    does not enter any computation. The buffers the model holds as constants (:func:`torch_buffers`)
    are written too.
    """
    permutations = torch_permutations(model)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, array in state_dict(model).items():
        if key in permutations:
            array = np.transpose(array, np.argsort(permutations[key]))
        out[key] = torch.from_numpy(np.array(array, order="C", copy=True))
        if key.endswith(".running_var"):
            out[key[: -len(".running_var")] + BN_COUNTER] = torch.tensor(0, dtype=torch.long)
    for key, constant in torch_buffers(model).items():
        out[key] = torch.from_numpy(np.array(constant, copy=True))
    return out
