"""The XLA flags the jaxtl commands add (jaxtl/xla.py): added where unset, never over the user's own."""

import os
import subprocess
import sys

from jaxtl.xla import CPU_FLAGS, add_xla_flags, use_cpu_flags

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


def test_the_cpu_flags_are_added_only_for_the_jaxlib_releases_they_were_tested_with():
    assert list(CPU_FLAGS) == ["xla_cpu_experimental_ynn_fusion_type"]
    environ = {}
    assert use_cpu_flags(environ, jaxlib_version="0.10.2") == [YNN] and environ == {"XLA_FLAGS": YNN}
    for version in ("0.9.2", "0.11.0", "1.0", "unknown"):
        environ = {}
        assert use_cpu_flags(environ, jaxlib_version=version) == [] and environ == {}, version


def test_the_jaxtl_command_runs_with_the_cpu_flags_and_xla_accepts_them():
    # What `jaxtl` does before jax is imported, then a computation in the same process: an XLA that
    # did not know the flag would abort here.
    code = (
        "import os, jaxtl.xla, jax, jax.numpy as jnp; jaxtl.xla.use_cpu_flags(); "
        "print(os.environ['XLA_FLAGS']); print(float(jnp.dot(jnp.ones((4, 4)), jnp.ones((4, 4))).sum()))"
    )
    env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [YNN, "64.0"]


def test_every_jaxtl_command_adds_the_cpu_flags_before_it_runs(monkeypatch, tmp_path, capsys):
    from jaxtl.cli import main

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    assert main(["convert", "resnet18", "--weights", "NO_SUCH_WEIGHTS", "--out", str(tmp_path / "w")]) == 2
    assert "NO_SUCH_WEIGHTS" in capsys.readouterr().err
    added = f" {YNN}" if use_cpu_flags({}) else ""  # none on a jaxlib the flags were not tested with
    assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=1{added}"
