"""Host values reach the device without an XLA compile: building a model, restoring an optimizer state and casting
a model for the float64 parity reference compile nothing (jnp.asarray compiles a program per shape and dtype)."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxtl.models
from jaxtl.arrays import to_device
from jaxtl.train.resume import tree_leaves, unflatten_like


@contextlib.contextmanager
def counted_compiles():
    """The names of the programs XLA compiles inside the block (shapes new to this process compile)."""
    compiles: list[str] = []

    def listen(event, duration, **kwargs):
        if event.endswith("backend_compile_duration"):
            compiles.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_the_counter_sees_what_jnp_asarray_compiles():
    with counted_compiles() as compiles:
        jnp.asarray(np.ones((3, 5, 7, 11), np.float32))
    assert compiles == ["jit(stage)"]  # a program for the shape: what to_device avoids


BUILD = """
import sys
import jax
from test_arrays import counted_compiles
import jaxtl.models
with counted_compiles() as compiles:
    for arch in sys.argv[1:]:
        jaxtl.models.create(arch, num_classes=7, seed=1)
print(" ".join(compiles))
"""


def test_building_models_compiles_no_program_per_parameter():
    """In a fresh process, where every shape is new: nnx.Rngs turns the seed into a key and folds it (a few
    programs, once); the parameters, 30-75 shapes per model, compiled a program each before."""
    archs = ["resnet18", "efficientnet_b0", "convnext_tiny", "swin_t", "densenet121"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), *sys.path]))
    result = subprocess.run([sys.executable, "-c", BUILD, *archs], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    compiles = result.stdout.split()
    assert compiles.count("jit(stage)") <= 1 and len(compiles) <= 6, compiles


def test_a_restored_optimizer_state_and_a_float64_cast_compile_nothing():
    model = jaxtl.models.create("resnet18", num_classes=13, seed=0)
    params = nnx.state(model, nnx.Param)
    leaves = {key: np.asarray(value)[..., None] for key, value in tree_leaves(params).items()}  # shapes new here
    template = jax.tree.map(lambda a: a[..., None], params)
    with counted_compiles() as compiles:
        restored = unflatten_like(template, leaves)
    assert compiles == []
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a[..., 0], b)
    with jax.enable_x64(True), counted_compiles() as compiles:
        cast = jax.tree.map(lambda a: to_device(a, jnp.float64), restored)
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
