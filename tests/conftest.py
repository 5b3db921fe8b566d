"""Shared test set-up: every test gets its own jaxtl and torch caches, never the user's."""

import pytest


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXTL_CACHE", str(tmp_path / "jaxtl-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return tmp_path
