"""``load_pretrained`` and ``create`` when named weights must be downloaded and no network answers."""

import time

import numpy as np
import pytest

import jaxtl.models
from jaxtl import weights
from jaxtl.errors import WeightsError
from jaxtl.models.registry import load_pretrained
from jaxtl.models.state_dict import state_dict


@pytest.fixture
def no_network(monkeypatch):
    """Every HTTP(S) request goes through a proxy at a port where nothing listens: refused at once.

    The caches are empty temporary directories (tests/conftest.py), so named weights must be downloaded.
    """
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)


def test_a_failed_download_falls_back_to_random_init_when_allowed(no_network):
    logged = []
    started = time.perf_counter()
    model = load_pretrained(
        "resnet18", num_classes=4, weights="DEFAULT", seed=2, download_timeout_s=5,
        allow_random_init_fallback=True, log=logged.append,
    )  # fmt: skip
    assert time.perf_counter() - started < 60
    assert len(logged) == 1
    banner = logged[0]
    assert "Pretrained weights 'DEFAULT' for resnet18 could not be had" in banner
    url = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    assert f"could not download resnet18 IMAGENET1K_V1 from {url}" in banner
    assert "torchvision's" in banner and "random initialisation" in banner
    assert "jaxtl convert resnet18 --weights DEFAULT" in banner
    assert "copy resnet18-f37072fd.pth into torch.hub's cache" in banner
    assert model.weight_spec.source == "random init (fallback: DEFAULT unavailable)"
    assert (model.weight_spec.preprocessing.resize_size, model.weight_spec.preprocessing.crop_size) == (256, 224)
    random_init = state_dict(jaxtl.models.create("resnet18", num_classes=4, seed=2))
    assert all(np.array_equal(value, random_init[key]) for key, value in state_dict(model).items())
    assert not list(weights.cache_dir().rglob("spec.json"))  # nothing half-converted was cached


def test_a_failed_download_without_fallback_says_how_to_convert(no_network):
    logged = []
    with pytest.raises(WeightsError) as info:
        load_pretrained("resnet18", num_classes=4, weights="IMAGENET1K_V1", download_timeout_s=5, log=logged.append)
    message = str(info.value)
    assert message.startswith("could not download resnet18 IMAGENET1K_V1"), message
    assert "resnet18 needs weights 'IMAGENET1K_V1': convert them once with" in message
    assert "`jaxtl convert resnet18 --weights IMAGENET1K_V1`" in message
    assert not logged


def test_create_downloads_named_weights_not_converted_yet(no_network):
    with pytest.raises(WeightsError, match="could not download efficientnet_b0 IMAGENET1K_V1 from https://download"):
        jaxtl.models.create("efficientnet_b0", num_classes=3, weights="DEFAULT")
