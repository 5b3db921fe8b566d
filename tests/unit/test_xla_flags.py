"""XLA_FLAGS helpers and the opt-in YNNPACK flag (jaxtl/xla.py)."""

import subprocess
import sys

from jaxtl.xla import YNNPACK, add_xla_flags, use_ynnpack, ynnpack_supported

YNN = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"


def test_flags_are_appended_to_what_xla_flags_holds_and_the_users_values_win():
    environ = {}
    assert add_xla_flags({"xla_a": "1", "xla_b": "x y"}, environ) == ["--xla_a=1", "--xla_b=x y"]
    assert environ["XLA_FLAGS"] == "--xla_a=1 '--xla_b=x y'"
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_a=7"}
    assert add_xla_flags({"xla_a": "1", "xla_c": "2"}, environ) == ["--xla_c=2"]
    assert environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8 --xla_a=7 --xla_c=2"
    environ = {"XLA_FLAGS": "--xla_a="}  # an empty value is the user's too
    assert add_xla_flags({"xla_a": "1"}, environ) == [] and environ == {"XLA_FLAGS": "--xla_a="}


def test_ynnpack_is_offered_only_for_the_jaxlib_releases_it_was_tested_with():
    assert [f"--{k}={v}" for k, v in YNNPACK.items()] == [YNN]
    assert ynnpack_supported("0.10.2") and ynnpack_supported("0.10.0")
    for version in ("0.9.2", "0.11.0", "1.0", "unknown"):
        assert not ynnpack_supported(version), version
    environ = {}
    assert use_ynnpack(environ) == ([YNN] if ynnpack_supported() else [])


def test_xla_accepts_the_ynnpack_flag_and_computes_the_same_dot():
    # XLA aborts on a flag it does not know: a jaxlib the flag is offered for must take it.
    code = (
        "import jaxtl.xla; added = jaxtl.xla.use_ynnpack(); import jax, jax.numpy as jnp, numpy as np; "
        "a = np.random.default_rng(0).standard_normal((64, 96), np.float32); "
        "print(added, float(np.abs(np.asarray(jnp.dot(a, a.T)) - a.astype(np.float64) @ a.T.astype(np.float64)).max()))"
    )
    env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    added, error = result.stdout.rsplit(" ", 1)
    assert added == (f"['{YNN}']" if ynnpack_supported() else "[]")
    assert float(error) < 1e-4  # float32 rounding of a 96-term sum of products of unit normals
