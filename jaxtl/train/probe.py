"""``linear_probe``: scikit-learn's L2-penalised logistic regression on cached features, solved in JAX.

    from jaxtl.train.probe import linear_probe
    probe = linear_probe(train_features, train_labels)  # LogisticRegression(C=1.0).fit(...) in JAX
    probe.accuracy(val_features, val_labels)

The model and its objective are scikit-learn's ``LogisticRegression(C=C)`` (its default lbfgs solver and L2
penalty, sklearn/linear_model/_logistic.py and _linear_loss.py): with ``K > 2`` classes, a multinomial model
with one weight column and one intercept per class; with two, one weight vector and one intercept (the binomial
loss), which the probe holds as the second class's column, the first's being zero. It minimises

    mean_i CE(x_i W + b, y_i) + ||W||^2 / (2 C n)

which is ``(sum_i CE + ||W||^2 / (2 C)) / n``: scikit-learn's objective ``C * sum_i CE + ||W||^2 / 2`` divided by
``C n``, the same minimiser. The intercepts are not penalised. The solver is optax's L-BFGS with its zoom line
search, from zeros (scikit-learn's start), in float64, jitted; it stops once every component of the gradient of
the objective above is at most ``tol`` (scipy's ``gtol``, as scikit-learn sets it) or after ``max_iter``
iterations. The defaults are tighter than scikit-learn's (``tol=1e-4``, ``max_iter=100``, which often stop short
on unscaled features): on a few thousand cached features a converged probe costs well under a second.

``standardize=True`` first centres each feature and divides it by its standard deviation on the train rows
(scikit-learn's ``StandardScaler``: population std, a constant feature divided by 1); the probe applies the same
to the features it is given. scikit-learn's ``LogisticRegression`` does not standardise, nor does the default.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtl.errors import DataError


@dataclasses.dataclass(frozen=True)
class Probe:
    """A fitted linear probe: ``logits = ((features - mean) / scale) @ weights + bias``.

    Attributes:
        classes: ``(K,)`` int64, the labels seen in training, sorted (scikit-learn's ``classes_``); column ``k``
            of the weights and of :meth:`predict_proba` is ``classes[k]``.
        weights: ``(D, K)`` float64. scikit-learn's ``coef_`` is ``weights.T`` (``K > 2``) or
            ``weights[:, 1:].T`` (two classes).
        bias: ``(K,)`` float64; scikit-learn's ``intercept_`` is ``bias`` (``K > 2``) or ``bias[1:]``.
        mean, scale: ``(D,)`` float64, the standardisation (zeros and ones without it).
        objective: the objective of the module's docstring at the solution.
        gradient_max: the largest absolute component of its gradient there.
        iterations: L-BFGS iterations run; ``converged``: ``gradient_max <= tol`` within ``max_iter``.
    """

    classes: np.ndarray
    weights: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    objective: float
    gradient_max: float
    iterations: int
    converged: bool

    def logits(self, features: np.ndarray) -> np.ndarray:
        """``(N, D)`` features -> ``(N, K)`` float64 logits."""
        x = (np.asarray(features, np.float64) - self.mean) / self.scale
        return x @ self.weights + self.bias

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """``(N, D)`` -> ``(N, K)`` float64 class probabilities, columns in the order of ``classes``."""
        logits = self.logits(features)
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """``(N, D)`` -> ``(N,)`` int64, the most probable class's label."""
        return self.classes[np.argmax(self.logits(features), axis=1)]

    def accuracy(self, features: np.ndarray, labels: np.ndarray) -> float:
        """The fraction of rows whose predicted label is ``labels``'s (``(N,)`` ints)."""
        labels = np.asarray(labels)
        if not len(labels):
            raise DataError("accuracy of a probe on no rows: give at least one labelled feature row")
        return float(np.mean(self.predict(features) == labels))


def linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    *,
    C: float = 1.0,  # noqa: N803 (scikit-learn's name)
    max_iter: int = 1000,
    tol: float = 1e-6,
    standardize: bool = False,
) -> Probe:
    """Fits scikit-learn's ``LogisticRegression(C=C)`` to ``(train_features, train_labels)`` (module docstring).

    Args:
        train_features: ``(N, D)`` floats, e.g. a frozen backbone's pooled features
            (:func:`jaxtl.train.features.compute_features`).
        train_labels: ``(N,)`` ints, at least two distinct values.
        C: inverse strength of the L2 penalty, > 0 (scikit-learn's ``C``).
        max_iter: L-BFGS iterations at most.
        tol: stop once every gradient component of the objective is at most this.
        standardize: centre and scale each feature on the train rows first.

    Returns:
        The fitted :class:`Probe`, in float64.

    Raises:
        DataError: shapes that do not match, non-finite features, or fewer than two classes.
        ValueError: C, max_iter or tol out of range.
    """
    x = np.asarray(train_features, np.float64)
    y = np.asarray(train_labels)
    _check(x, y, C, max_iter, tol)
    classes, y_index = np.unique(y, return_inverse=True)
    mean, scale = np.zeros(x.shape[1]), np.ones(x.shape[1])
    if standardize:
        mean, std = x.mean(axis=0), x.std(axis=0)
        scale = np.where(std > 10 * np.finfo(np.float64).eps * np.maximum(np.abs(mean), 1.0), std, 1.0)
    x = (x - mean) / scale
    # Two classes: scikit-learn's binomial model, one weight vector (the second class's logit against 0).
    columns = 1 if len(classes) == 2 else len(classes)
    with jax.enable_x64(True):
        solution = _solve(jnp.asarray(x), jnp.asarray(y_index), columns, 1.0 / (C * len(x)), max_iter, tol)
        weights, bias, objective, gradient_max, iterations = jax.device_get(solution)
    if columns == 1:
        weights = np.concatenate([np.zeros_like(weights), weights], axis=1)
        bias = np.concatenate([np.zeros_like(bias), bias])
    return Probe(
        classes=classes.astype(np.int64), weights=np.asarray(weights, np.float64), bias=np.asarray(bias, np.float64),
        mean=mean, scale=scale, objective=float(objective), gradient_max=float(gradient_max),
        iterations=int(iterations), converged=bool(gradient_max <= tol),
    )  # fmt: skip


def probe_objective(params: dict, x: jax.Array, y: jax.Array, l2: float) -> jax.Array:
    """The mean cross-entropy plus ``l2 / 2 * ||W||^2`` (``l2 = 1 / (C n)``), as scikit-learn's ``LinearModelLoss``.

    Args:
        params: ``{"weights": (D, M), "bias": (M,)}``; ``M = 1`` is the binomial model (logits ``[0, z]``).
        x: ``(N, D)`` features; y: ``(N,)`` class indices from 0.
    """
    logits = x @ params["weights"] + params["bias"]
    if logits.shape[1] == 1:
        logits = jnp.concatenate([jnp.zeros_like(logits), logits], axis=1)
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.mean(cross_entropy) + 0.5 * l2 * jnp.sum(params["weights"] ** 2)


@functools.partial(jax.jit, static_argnames=("columns",))
def _solve(x: jax.Array, y: jax.Array, columns: int, l2: float, max_iter: int, tol: float):
    """L-BFGS from zeros, as optax's documentation runs it: the line search's value and gradient are reused."""
    params = {"weights": jnp.zeros((x.shape[1], columns), x.dtype), "bias": jnp.zeros((columns,), x.dtype)}
    objective = functools.partial(probe_objective, x=x, y=y, l2=l2)
    # scipy's L-BFGS-B keeps 10 pairs (maxcor) and tries up to 50 steps per line search (scikit-learn's maxls).
    solver = optax.lbfgs(
        memory_size=10,
        linesearch=optax.scale_by_zoom_linesearch(max_linesearch_steps=50, initial_guess_strategy="one"),
    )
    value_and_grad = optax.value_and_grad_from_state(objective)

    def largest(grad) -> jax.Array:
        return optax.tree.max(jax.tree.map(jnp.abs, grad))

    def step(carry):
        params, state, _, _ = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=objective)
        params = optax.apply_updates(params, updates)
        # The line search stores the value and gradient at the new parameters: the stop test costs nothing.
        return params, state, optax.tree.get(state, "value"), largest(optax.tree.get(state, "grad"))

    def go_on(carry):
        _, state, _, gradient_max = carry
        return (optax.tree.get(state, "count") < max_iter) & (gradient_max > tol)

    value, grad = jax.value_and_grad(objective)(params)
    params, state, value, gradient_max = jax.lax.while_loop(
        go_on, step, (params, solver.init(params), value, largest(grad))
    )
    return params["weights"], params["bias"], value, gradient_max, optax.tree.get(state, "count")


def _check(x: np.ndarray, y: np.ndarray, C: float, max_iter: int, tol: float) -> None:  # noqa: N803
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"a probe needs (N, D) features and (N,) labels; got {x.shape} and {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"probe labels must be integers (class indices); got {y.dtype}")
    if not np.all(np.isfinite(x)):
        raise DataError(f"{int(np.sum(~np.isfinite(x)))} feature values are not finite; a probe cannot fit them")
    if len(np.unique(y)) < 2:
        raise DataError(f"a probe needs at least two classes in its train labels; got {np.unique(y).tolist()}")
    if isinstance(C, bool) or not isinstance(C, (int, float)) or not np.isfinite(C) or C <= 0:
        raise ValueError(f"C={C!r} must be a finite number > 0 (the inverse strength of the L2 penalty)")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter={max_iter!r} must be an integer >= 1")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol={tol!r} must be a number >= 0")
