"""Host values reach the device without an XLA compile: building a model, restoring an optimizer state and casting
a model for the float64 parity reference compile nothing (jnp.asarray compiles a program per shape and dtype)."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxtl.models
from jaxtl.arrays import to_device
from jaxtl.train.resume import tree_leaves, unflatten_like


@contextlib.contextmanager
def counted_compiles():
    """The XLA compiles inside the block, from a cold in-process cache (jax.clear_caches)."""
    compiles: list[str] = []

    def listen(event, duration, **kwargs):
        if event.endswith("backend_compile_duration"):
            compiles.append(kwargs.get("fun_name", "?"))

    jax.clear_caches()
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_the_counter_sees_what_jnp_asarray_compiles():
    with counted_compiles() as compiles:
        jnp.asarray(np.ones((3, 5), np.float32))
    assert compiles == ["jit(stage)"]  # one program for the shape: what to_device avoids


# nnx.Rngs turns the seed into a key (jax.random.key) and folds it: these few programs, once per process, whatever
# the model. Each parameter shape compiled a program of its own before (30-75 per model).
SEED_PROGRAMS = {"jit(stage)", "jit(_threefry_seed)", "jit(convert_element_type)", "jit(_threefry_fold_in)", "jit(add)"}


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0", "convnext_tiny", "swin_t", "densenet121"])
def test_building_a_model_compiles_no_program_per_parameter(arch):
    with counted_compiles() as compiles:
        model = jaxtl.models.create(arch, num_classes=7, seed=1)
    assert len(compiles) == len(set(compiles)) and set(compiles) <= SEED_PROGRAMS, compiles
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(nnx.state(model)))


def test_a_restored_optimizer_state_and_a_float64_cast_compile_nothing():
    model = jaxtl.models.create("resnet18", num_classes=3, seed=0)
    params = nnx.state(model, nnx.Param)
    leaves = tree_leaves(params)
    with counted_compiles() as compiles:
        restored = unflatten_like(params, leaves)
    assert compiles == []
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    with jax.enable_x64(True), counted_compiles() as compiles:
        cast = jax.tree.map(lambda a: to_device(a, jnp.float64), params)
    assert compiles == [] and {leaf.dtype for leaf in jax.tree.leaves(cast)} == {np.dtype(np.float64)}


def test_to_device_copies_and_canonicalises_as_jax_does():
    source = np.arange(6, dtype=np.float32).reshape(2, 3)
    array = to_device(source)
    source[0, 0] = 100.0  # the caller's buffer is not the device array's storage
    np.testing.assert_array_equal(array, np.arange(6, dtype=np.float32).reshape(2, 3))
    assert to_device(np.ones(3)).dtype == jnp.float32 and to_device([1, 2]).dtype == jnp.int32  # x64 off
    assert to_device(np.array([1.0, 2.5]), jnp.bfloat16).dtype == jnp.bfloat16
    with jax.enable_x64(True):
        assert to_device(np.ones(3)).dtype == jnp.float64
