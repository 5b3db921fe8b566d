"""Pure jitted train and eval steps over a model split into trainable, frozen and other state.

``split_model`` cuts the model into a graph definition and three states: the trainable parameters
(the only ones differentiated and updated), the frozen parameters (constants of the step, so a
frozen prefix of the network costs its forward pass and no backward), and everything else
(BatchNorm statistics, RNG state). Batches are the loader's: uint8 NHWC images normalised inside
the step, labels, and a mask that takes padding rows out of the loss, the metrics and BatchNorm's
batch statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxtl.data.augment import mixing as mixing_ops
from jaxtl.data.augment.mixing import Mixing
from jaxtl.data.transforms import normalize
from jaxtl.models.batch_norm_ops import batch_mask, batch_norm_groups
from jaxtl.models.protocol import head_module
from jaxtl.optim.groups import ParamGroups
from jaxtl.train.diagnostics import step_norms
from jaxtl.train.losses import CrossEntropy
from jaxtl.train.task import correct_rows, eval_loss


class ModelState(NamedTuple):
    trainable: nnx.State
    frozen: nnx.State
    rest: nnx.State


def split_model(model: nnx.Module, groups: ParamGroups) -> tuple[nnx.GraphDef, ModelState]:
    """(graphdef, ModelState) with the groups' BN policy applied; ``nnx.merge(graphdef, *state)`` rebuilds it."""
    model.train()
    groups.apply_bn_policy(model)
    graphdef, trainable, frozen, rest = nnx.split(model, groups.trainable_filter(), nnx.Param, ...)
    return graphdef, ModelState(trainable, frozen, rest)


def merge_model(graphdef: nnx.GraphDef, state: ModelState) -> nnx.Module:
    return nnx.merge(graphdef, state.trainable, state.frozen, state.rest)


def _inputs(images: jax.Array, mean, std) -> jax.Array:
    return normalize(images, mean, std, xp=jnp) if images.dtype == jnp.uint8 else images


def _at_least_float32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def full_model(model: nnx.Module, x: jax.Array) -> jax.Array:
    return model(x)


def head_of(model: nnx.Module, features: jax.Array) -> jax.Array:
    """The classifier head alone, on pooled features (a feature-cached head-only phase)."""
    return head_module(model)(features)


def reseed_streams(model: nnx.Module, key: jax.Array) -> None:
    """Gives every RNG stream of ``model`` (dropout, stochastic depth) its own key drawn from ``key``, counts at 0.

    Every stream is reseeded, whatever its tag: a model built with ``nnx.Rngs(seed)`` (as
    :func:`jaxtl.models.create` builds them) tags its streams ``default``, one built with
    ``nnx.Rngs(dropout=...)`` tags them ``dropout``. Streams get distinct keys, so two layers never
    draw the same mask. The masks of a step are then a function of ``key`` alone, not of the
    streams' counters, which checkpoints do not hold.
    """
    tags = sorted({node.key.tag for _, node in nnx.iter_graph(model) if isinstance(node, nnx.RngStream)})
    if tags:
        nnx.reseed(model, **{tag: jax.random.fold_in(key, i) for i, tag in enumerate(tags)})


MIX_STREAM = 0x6D697800  # folded into a step's key for Mixup/CutMix draws, apart from the dropout streams


def _micro_batches(a: jax.Array, k: int) -> jax.Array:
    """``(k * b, ...) -> (k, b, ...)``: micro-batch i holds rows i, i + k, i + 2k, ... of the batch, so that each
    micro-batch is spread over all devices as the batch is (a contiguous split would sit on some of them)."""
    return jnp.swapaxes(a.reshape(a.shape[0] // k, k, *a.shape[1:]), 0, 1)


def _loss_terms(loss_fn):
    """``(numerator(logits, targets, mask), denominator(targets, mask))`` of ``loss_fn``: its own
    (:class:`jaxtl.train.losses.CrossEntropy`), or a mean over the rows (its value times their count)."""
    if hasattr(loss_fn, "numerator"):
        return loss_fn.numerator, loss_fn.denominator

    def numerator(logits, targets, mask):
        return loss_fn(logits, targets, mask) * jnp.sum(mask)

    return numerator, lambda targets, mask: jnp.sum(mask).astype(jnp.float32)


def make_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    *,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    loss_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None,
    forward: Callable[[nnx.Module, jax.Array], jax.Array] = full_model,
    compute_dtype=None,
    seed: int = 0,
    donate: bool = True,
    compiler_options: dict[str, str] | None = None,
    mixing: Mixing | None = None,
    num_classes: int | None = None,
    accumulate_steps: int = 1,
    bn_groups: int = 1,
    groups: ParamGroups | None = None,
) -> Callable[..., tuple[ModelState, Any, dict[str, Any]]]:
    """``step(state, opt_state, images, labels, mask, step_index) -> (state, opt_state, metrics)``, jitted.

    The gradient is taken with respect to ``state.trainable`` only; ``state.frozen`` is passed
    through unchanged. ``optimizer.init(state.trainable)`` gives the matching ``opt_state``.
    Dropout and stochastic depth draw from a key that is a function of (seed, step_index), so a
    resumed run draws what an uninterrupted one does. With ``compute_dtype=jnp.bfloat16`` the
    forward and backward run in bf16 on float32 parameters (BatchNorm statistics stay float32).
    ``loss_fn(logits, targets, mask)``: the loss (None: :class:`jaxtl.train.losses.CrossEntropy`, torch's
    plain cross-entropy over the unmasked rows). Metrics (loss, correct count, example count) stay on the
    device. ``compiler_options`` go to XLA (:func:`jaxtl.xla.program_options`).

    ``mixing``: Mixup/CutMix of each (micro-)batch (:mod:`jaxtl.data.augment.mixing`), the loss then on
    class probabilities (``num_classes`` of them); the accuracy counts each row's own label.
    ``accumulate_steps=k``: the batch is k micro-batches (rows i, i + k, ... of it), run one after the
    other (the memory of one), their gradients summed into one update; the loss is the whole batch's
    (the micro-batches' loss numerators over the batch's denominator), so without train-mode BatchNorm
    the update equals the batch's in one piece. BatchNorm in train mode takes each micro-batch's
    statistics and updates its running statistics once per micro-batch, as PyTorch does when it
    accumulates. A micro-batch without real rows adds nothing (its BatchNorm statistics are not taken).

    ``bn_groups=D``: train-mode BatchNorm takes the statistics of each of D blocks of the (micro-)batch, one
    per device with the batch sharded over D devices (:func:`jaxtl.models.batch_norm_ops.batch_norm_groups`:
    PyTorch DDP's per-replica statistics); 1: of the whole batch (SyncBatchNorm's).

    ``groups``: the phase's parameter groups; given, ``metrics["groups"]`` holds, per trainable group, the L2
    norms of its gradient (the step's, summed over the micro-batches), of the optimizer's update and of its
    weights before the update (:func:`jaxtl.train.diagnostics.step_norms`): three reductions over the trainable
    parameters.
    """
    if mixing is not None and mixing.enabled and num_classes is None:
        raise ValueError("mixing needs num_classes: the targets become class probabilities")
    if accumulate_steps < 1:
        raise ValueError(f"accumulate_steps={accumulate_steps} must be >= 1")
    mixing = mixing if mixing is not None and mixing.enabled else None
    k = accumulate_steps
    base_key = jax.random.key(seed)
    loss_fn = loss_fn or CrossEntropy()
    numerator, denominator = _loss_terms(loss_fn)

    def mix(key, x, labels, mask):
        return mixing_ops.apply(mixing_ops.draw(mixing, key, x.shape[1], x.shape[2]), x, labels, mask, num_classes)

    def forward_pass(trainable, frozen, rest, x, mask, key):
        """The logits and the new non-parameter state (BatchNorm statistics) of one forward pass."""
        params = (trainable, frozen)
        if compute_dtype is not None:
            params = _cast(params, compute_dtype)
        model = nnx.merge(graphdef, *params, rest, copy=True)
        reseed_streams(model, key)
        inputs = x if compute_dtype is None else x.astype(compute_dtype)
        with batch_mask(mask), batch_norm_groups(bn_groups):  # padding rows take no part in the statistics
            logits = _at_least_float32(forward(model, inputs))
        new_rest = nnx.state(model, nnx.Not(nnx.Param))
        if compute_dtype is not None:
            new_rest = jax.tree.map(
                lambda new, old: new.astype(old.dtype) if jnp.issubdtype(old.dtype, jnp.floating) else new,
                new_rest,
                rest,
            )
        return logits, new_rest

    def step(state: ModelState, opt_state, images, labels, mask, step_index):
        x = _inputs(images, mean, std)
        key = jax.random.fold_in(base_key, step_index)
        if k == 1:
            targets = labels
            if mixing is not None:
                x, targets = mix(jax.random.fold_in(key, MIX_STREAM), x, labels, mask)

            def compute_loss(trainable):
                logits, rest = forward_pass(trainable, state.frozen, state.rest, x, mask, key)
                return loss_fn(logits, targets, mask), (logits, rest)

            (loss, (logits, rest)), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.trainable)
            correct = correct_rows(logits, labels, mask)
        else:
            x, labels_k, mask_k = (_micro_batches(a, k) for a in (x, labels, mask))
            targets = labels_k
            if mixing is not None:
                keys = jax.random.split(jax.random.fold_in(key, MIX_STREAM), k)
                x, targets = jax.vmap(mix)(keys, x, labels_k, mask_k)
            total = jnp.maximum(jnp.sum(jax.vmap(denominator)(targets, mask_k)), jnp.finfo(jnp.float32).tiny)

            def micro(carry, inputs):
                grads, rest, loss, correct = carry
                xi, ti, li, mi, i = inputs

                def compute_loss(trainable):
                    logits, new_rest = forward_pass(trainable, state.frozen, rest, xi, mi, jax.random.fold_in(key, i))
                    return numerator(logits, ti, mi) / total, (logits, new_rest)

                (part, (logits, rest)), g = jax.value_and_grad(compute_loss, has_aux=True)(state.trainable)
                hits = correct_rows(logits, li, mi)
                grads = jax.tree.map(jnp.add, grads, g)
                return (grads, rest, loss + part.astype(loss.dtype), correct + hits.astype(correct.dtype)), None

            zeros = jax.tree.map(jnp.zeros_like, state.trainable)
            loss_dtype = jnp.promote_types(jax.tree.leaves(state.trainable)[0].dtype, jnp.float32)
            carry = (zeros, state.rest, jnp.zeros((), loss_dtype), jnp.zeros((), jnp.int32))
            # Unrolled on XLA:CPU, where a loop's (or a conditional's) body runs the model ~8x slower
            # (bench/toolbox.py); a loop elsewhere, which holds one micro-batch's activations at a time.
            unroll = k if jax.default_backend() == "cpu" else 1
            (grads, rest, loss, correct), _ = jax.lax.scan(
                micro, carry, (x, targets, labels_k, mask_k, jnp.arange(k)), unroll=unroll
            )
        updates, opt_state = optimizer.update(grads, opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {"loss": loss, "correct": correct, "count": jnp.sum(mask)}
        if groups is not None:
            metrics["groups"] = step_norms(groups.labels, grads, updates, state.trainable)
        return ModelState(trainable, state.frozen, rest), opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1) if donate else (), compiler_options=compiler_options or None)


def _eval_model_and_inputs(graphdef, state: ModelState, images, mean, std, compute_dtype):
    """The model in eval mode and its normalised input, both cast to ``compute_dtype`` if given."""
    params = (state.trainable, state.frozen)
    x = _inputs(images, mean, std)
    if compute_dtype is not None:
        params, x = _cast(params, compute_dtype), x.astype(compute_dtype)
    model = nnx.merge(graphdef, *params, state.rest, copy=True)
    model.eval()
    return model, x


def eval_logits(
    graphdef: nnx.GraphDef,
    state: ModelState,
    images: jax.Array,
    *,
    mean,
    std,
    compute_dtype=None,
    forward: Callable[[nnx.Module, jax.Array], jax.Array] = full_model,
) -> jax.Array:
    """What the eval step computes for ``images`` (uint8 are normalised): eval mode, parameters and inputs in
    ``compute_dtype`` if given, the logits at least float32. Exported artifacts trace it too."""
    model, x = _eval_model_and_inputs(graphdef, state, images, mean, std, compute_dtype)
    return _at_least_float32(forward(model, x))


def make_features_step(
    graphdef: nnx.GraphDef,
    *,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    compute_dtype=None,
    compiler_options: dict[str, str] | None = None,
):
    """``step(state, images) -> features``: the eval-mode pooled features (``forward_features``), jitted.

    With ``compute_dtype=jnp.bfloat16`` computed as the train step computes its forward pass (bf16
    parameters and inputs), so that a head trained on cached features sees what it would see
    through the frozen backbone. Features are returned in float32 (or float64). ``compiler_options`` go
    to XLA (:func:`jaxtl.xla.program_options`).
    """

    def step(state: ModelState, images):
        model, x = _eval_model_and_inputs(graphdef, state, images, mean, std, compute_dtype)
        return _at_least_float32(model.forward_features(x))

    return jax.jit(step, compiler_options=compiler_options or None)


def make_eval_step(
    graphdef: nnx.GraphDef,
    *,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    forward: Callable[[nnx.Module, jax.Array], jax.Array] = full_model,
    compute_dtype=None,
    compiler_options: dict[str, str] | None = None,
    tta: str = "none",
):
    """``step(state, images, labels, mask) -> (logits, metrics)`` in eval mode (running statistics), jitted.

    Metrics: mean loss, top-1 and top-5 correct counts and the example count over unmasked rows; with
    multi-hot ``labels`` (a multi-label task) the binary cross-entropy and the rows right in every class
    (:mod:`jaxtl.train.task`). Flip TTA averages sigmoid probabilities there.
    With ``compute_dtype=jnp.bfloat16`` parameters and inputs are cast to bf16 for the forward pass.
    ``compiler_options`` go to XLA (:func:`jaxtl.xla.program_options`). ``tta="flip"``: test-time
    augmentation, the class probabilities of each image and of its mirror image averaged; the logits
    returned are their logarithm (the loss is the cross-entropy of the averaged probabilities).
    """
    if tta not in ("none", "flip"):
        raise ValueError(f"tta={tta!r} is not one of 'none', 'flip'")

    def step(state: ModelState, images, labels, mask):
        options = dict(mean=mean, std=std, compute_dtype=compute_dtype, forward=forward)
        logits = eval_logits(graphdef, state, images, **options)
        if tta == "flip":  # NHWC: axis 2 is the width; normalisation is per pixel, so flipping first is the same
            mirrored = eval_logits(graphdef, state, images[:, :, ::-1], **options)
            if labels.ndim == 2:  # each class's sigmoid probability averaged; the logit of the average
                p = (jax.nn.sigmoid(logits) + jax.nn.sigmoid(mirrored)) / 2
                logits = jnp.log(p) - jnp.log1p(-p)
            else:
                logits = jnp.log((jax.nn.softmax(logits, -1) + jax.nn.softmax(mirrored, -1)) / 2)
        loss = eval_loss(logits, labels, mask)
        correct = correct_rows(logits, labels, mask)
        if labels.ndim == 2:  # multi-label: no top-5
            correct5 = correct
        else:
            top5 = jnp.any(jax.lax.top_k(logits, min(5, logits.shape[-1]))[1] == labels[:, None], axis=-1)
            correct5 = jnp.sum(top5 & mask)
        metrics = {"loss": loss, "correct": correct, "correct5": correct5, "count": jnp.sum(mask)}
        return logits, metrics

    return jax.jit(step, compiler_options=compiler_options or None)
