"""Shared test set-up: every test gets its own jaxtl and torch caches, never the user's.

XLA's persistent compilation cache is shared by the whole session (per worker): the CLI runs of
tests/e2e compile the same programs, and a cached executable is the same program.
"""

import pytest


@pytest.fixture(scope="session")
def compilation_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xla-compilation-cache")


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch, compilation_cache):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(compilation_cache))
    monkeypatch.setenv("JAXTL_CACHE", str(tmp_path / "jaxtl-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return tmp_path
