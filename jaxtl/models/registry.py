"""The model registry: builders by torchvision name, and ``create`` that builds one with its weights."""

from __future__ import annotations

import contextlib
import difflib
import functools
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from flax import nnx

from jaxtl.errors import UnknownModelError, WeightsError
from jaxtl.models.layers import shapes_only
from jaxtl.models.state_dict import load_state_dict

_BUILDERS: dict[str, Callable[..., nnx.Module]] = {}


def register_model(builder: Callable[..., nnx.Module]) -> Callable[..., nnx.Module]:
    """Registers a builder under its function name, which is the torchvision builder's name."""
    _BUILDERS[builder.__name__] = builder
    return builder


def list_models() -> list[str]:
    """The architectures jaxtl can build, in natural order (resnet18 before resnet101)."""
    return sorted(_BUILDERS, key=lambda name: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)])


def get_builder(arch: str) -> Callable[..., nnx.Module]:
    """The builder of ``arch``; an unknown name raises with the closest known names."""
    try:
        return _BUILDERS[arch]
    except KeyError:
        close = difflib.get_close_matches(arch, _BUILDERS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"unknown architecture {arch!r}.{hint} Known: {', '.join(list_models())}"
        ) from None


@contextlib.contextmanager
def _no_tracer_provenance() -> Iterator[None]:
    """Skips jax's provenance message for tracer attribute errors while a model is built abstractly.

    Each parameter drawn from ``nnx.Rngs`` increments a counter through ``Variable.__setitem__``,
    which probes ``getattr(new_value, "sharding", None)``; on a tracer jax answers with an
    AttributeError whose message walks the whole jaxpr built so far. That makes an abstract build
    quadratic in the parameter count: 10 s for EfficientNet-B7 instead of 1.4 s. The message is
    only ever discarded there.
    """
    from jax._src.interpreters import partial_eval

    tracer = getattr(partial_eval, "DynamicJaxprTracer", None)
    original = getattr(tracer, "_origin_msg", None)
    if original is None:
        yield
        return
    tracer._origin_msg = lambda self: ""
    try:
        yield
    finally:
        tracer._origin_msg = original


def abstract_model(arch: str, *, num_classes: int = 1000) -> nnx.Module:
    """``arch`` with shapes and dtypes but no arrays (``jax.ShapeDtypeStruct`` leaves), built without compute.

    For inspecting an architecture (names, shapes, parameter counts) and as the target that
    ``load_state_dict`` fills with converted weights.
    """
    # A copy of one build per (arch, num_classes): conversion fills the model it gets in place.
    return nnx.clone(_abstract_template(arch, num_classes))


@functools.lru_cache(maxsize=16)
def _abstract_template(arch: str, num_classes: int) -> nnx.Module:
    builder = get_builder(arch)
    with _no_tracer_provenance(), shapes_only():
        return nnx.eval_shape(lambda: builder(num_classes=num_classes, rngs=nnx.Rngs(0)))


def resolve_weights(arch: str, weights: str | os.PathLike) -> Path:
    """The converted-weights directory that ``weights`` names for ``arch``.

    ``weights`` is a converted-weights directory, or a torchvision weight name (``"DEFAULT"``,
    ``"IMAGENET1K_V1"``) that has been converted into the cache. Raises WeightsError with the
    command that fixes it otherwise.
    """
    from jaxtl import weights as weights_module

    path = Path(weights)
    if weights_module.is_converted_weights(path):
        return path
    if path.is_file():
        raise WeightsError(
            f"{path} is a file; jaxtl.models.create reads converted weights, which need no torch. Convert it once "
            f"with `jaxtl convert {arch} --weights {path} --out DIR` and pass DIR, or call "
            f"convert.create_model({arch!r}, weights={str(path)!r}) from Python"
        )
    if path.exists() or os.sep in str(weights) or str(weights).endswith((".pth", ".pt")):
        raise WeightsError(f"weights path {path} is not a converted-weights directory or does not exist")
    cached = weights_module.converted_weights_path(arch, str(weights))  # raises for an unknown name
    if not weights_module.is_converted_weights(cached):
        raise WeightsError(
            f"weights {weights!r} for {arch} are not converted yet (looked in {cached}). Run once "
            f"`jaxtl convert {arch} --weights {weights}` (downloads through torchvision, needs torch), "
            f"or call convert.create_model({arch!r}, weights={str(weights)!r})"
        )
    return cached


def create(
    arch: str, *, num_classes: int | None = None, weights: str | os.PathLike | None = None, seed: int = 0
) -> nnx.Module:
    """Builds ``arch``, optionally with pretrained weights, with a head of ``num_classes``.

    Args:
        arch: a name from ``list_models()``, e.g. ``"resnet50"``.
        num_classes: width of the classifier head. Defaults to the weights' (1000 without weights).
            With weights of another width, the backbone is loaded and the head freshly initialised
            as a new ``nn.Linear`` is, from ``seed`` (:func:`reset_head`).
        weights: None for torchvision's own random init; a converted-weights directory; or a
            torchvision weight name (``"DEFAULT"``, ``"IMAGENET1K_V2"``) already in the cache.
        seed: seed of the random initialisation.

    Returns:
        The model, in train mode (as a freshly built torch module is).
    """
    from jaxtl import weights as weights_module

    builder = get_builder(arch)
    if weights is None:
        return builder(num_classes=1000 if num_classes is None else num_classes, rngs=nnx.Rngs(seed))
    path = resolve_weights(arch, weights)
    state, spec = weights_module.load_converted_weights(path)
    if spec.arch != arch:
        raise WeightsError(f"weights in {path} are for {spec.arch}, not {arch}; use create({spec.arch!r}, ...)")
    num_classes = spec.num_classes if num_classes is None else num_classes
    model = builder(num_classes=num_classes, rngs=nnx.Rngs(seed))
    fresh_head = (f"{model.head_name}.",) if num_classes != spec.num_classes else ()
    load_state_dict(model, state, source=str(path), ignore_prefixes=fresh_head)
    if fresh_head:
        reset_head(model, seed)
    return model


def fill_rng_state(model: nnx.Module, seed: int = 0) -> None:
    """Gives RNG streams that hold only shapes concrete keys (each its own, from ``seed``) and counts of 0.

    A model filled from :func:`abstract_model` (as ``convert.from_torchvision`` fills one) has parameters
    but shape-only dropout and stochastic-depth streams; after this it runs in train mode.
    Streams that hold values are left as they are.
    """
    import jax
    import jax.numpy as jnp

    key = jax.random.key(seed)
    streams = [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.RngStream)]
    for index, stream in enumerate(streams):
        if isinstance(stream.key.get_value(), jax.ShapeDtypeStruct):
            stream.key.set_value(jax.random.fold_in(key, index))
        count = stream.count.get_value()
        if isinstance(count, jax.ShapeDtypeStruct):
            stream.count.set_value(jnp.zeros(count.shape, count.dtype))


def reset_head(model: nnx.Module, seed: int = 0) -> None:
    """Initialises the head as the recipe's new one, ``nn.Linear(in_features, num_classes)``, from ``seed``.

    Every Linear of the head gets torch's default init, U(-1/sqrt(in_features), 1/sqrt(in_features)) for
    the weight and the bias, whatever the architecture's builder gives its own classifier: torchvision's
    EfficientNets draw theirs from U(+-1/sqrt(num_classes)) with a zero bias, 16x wider for 5 classes.
    """
    import jax

    from jaxtl.models.layers import Linear, torch_default_uniform

    rngs = nnx.Rngs(params=jax.random.fold_in(jax.random.key(seed), 0x4EAD))
    for _, layer in nnx.iter_graph(getattr(model, model.head_name)):
        if isinstance(layer, Linear):
            init = torch_default_uniform(layer.in_features)
            for param in (layer.weight, layer.bias):
                if param is not None:
                    value = param.get_value()
                    param.set_value(init(rngs.params(), value.shape, value.dtype))
