"""The model registry: builders by torchvision name; ``create`` and ``load_pretrained`` build one with weights."""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib.util
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtl import weights as jaxtl_weights
from jaxtl.errors import JaxtlError, UnknownModelError, WeightsError
from jaxtl.models.initializers import shapes_only
from jaxtl.models.names import key_path_name
from jaxtl.models.protocol import head_module
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
        raise UnknownModelError(f"unknown architecture {arch!r}.{hint} Known: {', '.join(list_models())}") from None


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


def model_options(arch: str, state: Mapping[str, Any]) -> dict[str, Any]:
    """The builder options beyond ``num_classes`` that a state_dict's shapes imply; {} for most architectures.

    A ViT's position embeddings are as long as the image size it was built for (torchvision's SWAG weights:
    384, 512, 518): ``{"image_size": 384}``. A builder with such options says so with an
    ``options_from_state(state)`` attribute; ``state`` maps keys to anything with a shape, in either layout.
    """
    options_of = getattr(get_builder(arch), "options_from_state", None)
    return {} if options_of is None else dict(options_of(state))


def abstract_model(arch: str, *, num_classes: int = 1000, **options: Any) -> nnx.Module:
    """``arch`` with shapes and dtypes but no arrays (``jax.ShapeDtypeStruct`` leaves), built without compute.

    For inspecting an architecture (names, shapes, parameter counts) and as the target that
    ``load_state_dict`` fills with converted weights. Its ``weight_spec`` says it holds no values, and
    carries the preprocessing of ``arch``'s DEFAULT weights. ``options`` go to the builder (a ViT's
    ``image_size``, see :func:`model_options`).
    """
    # A copy of one build per (arch, num_classes, options): conversion fills the model it gets in place.
    model = nnx.clone(_abstract_template(arch, num_classes, tuple(sorted(options.items()))))
    model.weight_spec = jaxtl_weights.make_random_init_spec(
        arch, num_classes, source="none: an abstract model holds shapes, not values", name="abstract"
    )
    return model


@functools.lru_cache(maxsize=16)
def _abstract_template(arch: str, num_classes: int, options: tuple[tuple[str, Any], ...] = ()) -> nnx.Module:
    builder = get_builder(arch)
    with _no_tracer_provenance(), shapes_only():
        return nnx.eval_shape(lambda: builder(num_classes=num_classes, rngs=nnx.Rngs(0), **dict(options)))


def convert_weights_once(resolved: jaxtl_weights.ResolvedWeights, *, download_timeout_s: float | None = None) -> Path:
    """The converted-weights directory of ``resolved``: where it is, or converted now into jaxtl's cache.

    Converting (a .pth file, or a name not in the cache yet, downloaded through torchvision's URL)
    imports ``convert`` and so torch, only then; weights already converted never do.

    Raises:
        WeightsError: the weights need converting and torch or torchvision is not installed (says how
            to install them, or to convert elsewhere), or the conversion failed (download, hash, keys).
    """
    if resolved.converted:
        return resolved.path
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None:
        what = f"the state_dict file {resolved.path}" if resolved.kind == "file" else f"weights {resolved.given!r}"
        raise WeightsError(
            f"{what} for {resolved.arch} must be converted once, which needs torch and torchvision: "
            f"pip install 'jaxtl[torch]'. Or convert them where torch is installed, with `jaxtl convert "
            f"{resolved.arch} --weights {resolved.given} --out DIR`, and pass DIR as the weights"
        )
    import convert

    return convert.convert_weights(resolved.arch, resolved, timeout_s=download_timeout_s)


def create(
    arch: str, *, num_classes: int | None = None, weights: str | os.PathLike | None = None, seed: int = 0
) -> nnx.Module:
    """Builds ``arch``, optionally with pretrained weights, with a head of ``num_classes``.

    Args:
        arch: a name from ``list_models()``, e.g. ``"resnet50"``.
        num_classes: width of the classifier head. Defaults to the weights' (1000 without weights).
            With weights of another width, the backbone is loaded and the head freshly initialised
            as a new ``nn.Linear`` is, from ``seed`` (:func:`reset_head`). Required with weights that have
            no head (a self-supervised backbone, whose spec says ``num_classes=0``).
        weights: None for torchvision's own random init; a converted-weights directory; a torchvision
            weight name (``"DEFAULT"``, ``"IMAGENET1K_V2"``); or a torch state_dict file (.pth). A name
            not converted yet, and a file, are converted once into jaxtl's cache, which needs torch and
            torchvision (:func:`convert_weights_once`); converted weights load without them.
        seed: seed of the random initialisation.

    Returns:
        The model, in train mode (as a freshly built torch module is). Its ``weight_spec`` is the
        weights' spec (with a fresh head too: it describes the weights, not the head), or for random
        init a spec saying so; either way its ``preprocessing`` is what to feed the model.
    """
    builder = get_builder(arch)
    if weights is None:
        width = 1000 if num_classes is None else num_classes
        model = builder(num_classes=width, rngs=nnx.Rngs(seed))
        model.weight_spec = jaxtl_weights.make_random_init_spec(
            arch, width, source=f"random init (torchvision's initialisation, seed {seed})"
        )
        return model
    return _create_from(jaxtl_weights.resolve_weights(arch, weights), num_classes, seed, None)


def _create_from(
    resolved: jaxtl_weights.ResolvedWeights, num_classes: int | None, seed: int, download_timeout_s: float | None
) -> nnx.Module:
    path = convert_weights_once(resolved, download_timeout_s=download_timeout_s)
    state, spec = jaxtl_weights.load_converted_weights(path)
    arch = resolved.arch
    if spec.arch != arch:
        raise WeightsError(f"weights in {path} are for {spec.arch}, not {arch}; use create({spec.arch!r}, ...)")
    if num_classes is None and spec.num_classes == 0:
        raise WeightsError(
            f"weights in {path} ({spec.name}) have no classifier head: pass num_classes=N to give {arch} a fresh "
            "N-way head"
        )
    num_classes = spec.num_classes if num_classes is None else num_classes
    model = _shaped(arch, num_classes, seed, model_options(arch, state))
    fresh_head = (f"{model.head_name}.",) if num_classes != spec.num_classes else ()
    load_state_dict(model, state, source=str(path), ignore_prefixes=fresh_head)
    if fresh_head:
        reset_head(model, seed)
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model))
    missing = [key_path_name(path) for path, leaf in leaves if isinstance(leaf, jax.ShapeDtypeStruct)]
    if missing:  # load_state_dict checks the keys: a variable it does not know of
        raise WeightsError(f"{path} gives no value for {', '.join(missing[:5])} of {arch}; convert the weights again")
    model.weight_spec = jaxtl_weights.fill_default_preprocessing(spec)
    return model


def _shaped(arch: str, num_classes: int, seed: int, options: Mapping[str, Any] | None = None) -> nnx.Module:
    """``arch`` built with shapes only (``nnx.eval_shape``) but its random streams (dropout's, stochastic
    depth's), which get keys from ``seed``: every parameter and statistic is about to be replaced by the
    weights' or the fresh head's, and drawing them first took half a second for ResNet-18."""
    model = nnx.eval_shape(lambda: get_builder(arch)(num_classes=num_classes, rngs=nnx.Rngs(seed), **(options or {})))
    streams = [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.RngStream)]
    for index, stream in enumerate(streams):
        stream.key.set_value(jax.random.fold_in(jax.random.key(seed), index))
        stream.count.set_value(jnp.zeros(stream.count.get_value().shape, jnp.uint32))
    return model


def load_pretrained(
    arch: str,
    *,
    num_classes: int,
    weights: str | os.PathLike | None,
    seed: int = 0,
    download_timeout_s: float | None = None,
    allow_random_init_fallback: bool = False,
    log: Callable[[str], None] = print,
) -> nnx.Module:
    """``arch`` with ``weights`` and a ``num_classes`` head, for a training run: :func:`create`, plus a
    download time-out and, only when the caller allows it, torchvision's random init when the weights
    cannot be had (no cache, no network, no torch).

    Args:
        arch: a name from ``list_models()``.
        num_classes: width of the head (a fresh one when the weights' width differs).
        weights: as :func:`create`'s; None for torchvision's random init.
        seed: seed of the random initialisation (the fresh head's included).
        download_timeout_s: give up a download whose network does not answer after this many seconds.
        allow_random_init_fallback: when the weights cannot be converted, downloaded or read, log a
            banner saying so and return the random init, whose ``weight_spec.source`` is
            ``"random init (fallback: NAME unavailable)"``. Never for an unknown architecture or weight
            name, or a path that does not exist: those are mistakes, not missing weights.
        log: where the banner goes.

    Raises:
        UnknownModelError, WeightsError: a mistake as above; or, without the fallback, weights that
            cannot be had, with the command that converts them.
    """
    get_builder(arch)
    if weights is None:
        return create(arch, num_classes=num_classes, seed=seed)
    resolved = jaxtl_weights.resolve_weights(arch, weights)
    try:
        return _create_from(resolved, num_classes, seed, download_timeout_s)
    except JaxtlError as error:
        if not allow_random_init_fallback:
            raise WeightsError(
                f"{error}\n{arch} needs weights {resolved.given!r}: convert them once with `jaxtl convert {arch} "
                f"--weights {resolved.given}` (a network, or a local .pth), or pass a converted-weights directory"
            ) from None
        log(_fallback_banner(resolved, error))
    model = create(arch, num_classes=num_classes, seed=seed)
    model.weight_spec = jaxtl_weights.make_random_init_spec(
        arch, num_classes, source=f"random init (fallback: {resolved.given} unavailable)"
    )
    return model


def _fallback_banner(resolved: jaxtl_weights.ResolvedWeights, error: Exception) -> str:
    arch, given = resolved.arch, resolved.given
    lines = [
        f"Pretrained weights {given!r} for {arch} could not be had:",
        f"  {str(error).splitlines()[0]}",
        "The caller allows a fallback (allow_random_init_fallback), so the model starts from torchvision's",
        "random initialisation: expect far lower accuracy than from pretrained weights.",
        f"To use the real weights, with a network: jaxtl convert {arch} --weights {given}",
    ]
    if resolved.kind == "named":
        lines += [
            f"or copy {resolved.spec.file_name} into torch.hub's cache ($TORCH_HOME/hub/checkpoints, by default",
            f"~/.cache/torch/hub/checkpoints/) and run jaxtl convert {arch} --weights {given}.",
        ]
    rule = "=" * 78
    return "\n".join([rule, *(f" {line}" for line in lines), rule])


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

    from jaxtl.models.initializers import torch_default_uniform
    from jaxtl.models.layers import Linear

    rngs = nnx.Rngs(params=jax.random.fold_in(jax.random.key(seed), 0x4EAD))
    for _, layer in nnx.iter_graph(head_module(model)):
        if isinstance(layer, Linear):
            init = torch_default_uniform(layer.in_features)
            for param in (layer.weight, layer.bias):
                if param is not None:
                    value = param.get_value()
                    param.set_value(init(rngs.params(), value.shape, value.dtype))
