"""jaxtl demo: the Gradio page of a checkpoint, served on localhost, queried with gradio_client and loaded in
Debian's headless chromium.

One checkpoint for the module (tests/exported.py: resnet18, seven classes, crop 64). The page's answers are
compared with the checkpoint's own Predictor on the same files, decoded by jaxtl.data.load_image. Nothing in the
process may reach past the loopback interface while the page is served and queried (the client's Hugging Face
telemetry is turned off here: it is the client's, not the page's).
"""

from __future__ import annotations

import html
import os
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from exported import photo_paths
from PIL import Image

from jaxtl.errors import JaxtlError

CHROMIUM = Path("/usr/bin/chromium")
HEADLESS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
    "--disable-background-networking", "--disable-component-update", "--hide-scrollbars",
]  # fmt: skip
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
INSTALL = "pip install 'jaxtl[demo]'"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NetworkLog:
    """Every name looked up and address connected to that is not the loopback interface."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.outside: list[object] = []
        getaddrinfo, connect = socket.getaddrinfo, socket.socket.connect

        def logged_getaddrinfo(host, *args, **kwargs):
            if host not in LOOPBACK and not (isinstance(host, bytes) and host.decode() in LOOPBACK):
                self.outside.append(("lookup", host))
            return getaddrinfo(host, *args, **kwargs)

        def logged_connect(sock, address):
            if isinstance(address, tuple) and address[0] not in LOOPBACK:
                self.outside.append(("connect", address))
            return connect(sock, address)

        monkeypatch.setattr(socket, "getaddrinfo", logged_getaddrinfo)
        monkeypatch.setattr(socket.socket, "connect", logged_connect)


@pytest.fixture(scope="module")
def checkpoint(exported_checkpoint):
    return exported_checkpoint


@pytest.fixture(scope="module")
def served(checkpoint):
    """(url, network log, Gradio client) of the demo of ``checkpoint``, served on a free port."""
    import gradio_client
    import huggingface_hub.constants

    from jaxtl.demo import serve

    with pytest.MonkeyPatch.context() as monkeypatch:
        # gradio_client's Client builds Hugging Face headers (which fetch a registry from huggingface.co) and
        # sends telemetry, both off here: the log below is for the page's server.
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        network = NetworkLog(monkeypatch)
        demo, url = serve(checkpoint, port=free_port(), block=False, examples=photo_paths()[:2])
        try:
            client = gradio_client.Client(url, verbose=False, analytics_enabled=False)
            yield url, network, client
        finally:
            demo.close(verbose=False)


@pytest.fixture(scope="module")
def reference(checkpoint):
    from jaxtl.train import Predictor

    return Predictor.from_checkpoint(checkpoint)


def expected_top(reference, path: Path, k: int = 5) -> list[tuple[str, float]]:
    from jaxtl.data import load_image

    probabilities = reference.probabilities(load_image(str(path)))
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [(reference.classes[i], float(probabilities[i])) for i in order]


def test_the_page_answers_as_the_checkpoint(served, reference, tmp_path):
    from gradio_client import handle_file

    url, network, client = served
    assert url.startswith("http://127.0.0.1:")
    photos = {path.name: path for path in photo_paths()}
    # An RGBA upload converts to RGB as load_image converts it (alpha dropped), as `jaxtl predict` would read it.
    rgba = tmp_path / "coffee-rgba.png"
    with Image.open(photos["coffee.png"]) as image:
        image.convert("RGBA").save(rgba)
    for path in (photos["chelsea.png"], photos["rocket.jpg"], rgba):
        result = client.predict(handle_file(str(path)), api_name="/predict")
        # gr.Label gives the float itself (no rounding): the float32 probability, widened to float64
        got = [(c["label"], c["confidence"]) for c in result["confidences"]]
        expected = expected_top(reference, path)
        assert [name for name, _ in got] == [name for name, _ in expected], path.name
        np.testing.assert_allclose([p for _, p in got], [p for _, p in expected], rtol=0, atol=1e-6)
        assert result["label"] == expected[0][0]
    assert network.outside == []


def test_the_page_renders_in_chromium(served, tmp_path):
    url, network, _ = served
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"{CHROMIUM} is missing: the demo's browser test needs Debian's chromium", pytrace=False)
    served_html = urllib.request.urlopen(url, timeout=30).read().decode("utf-8")
    command = [str(CHROMIUM), *HEADLESS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
               "--dump-dom", url]  # fmt: skip
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    # What Gradio's scripts built from the config: none of it is in the HTML the server sent.
    rendered = {
        "heading": "<h1>jaxtl: resnet18</h1>",
        "image input": 'id="jaxtl-image"',
        "label output": 'id="jaxtl-label"',
        "upload area": 'data-testid="image"',
        "label": 'data-testid="label"',
    }
    for what, marker in rendered.items():
        assert marker not in served_html, what
        assert marker in dom, f"the browser did not render the {what}; its DOM ends with: {dom[-2000:]}"
    text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", re.sub(r"(?s)<(style|script).*?</\1>", "", dom))))
    assert "resnet18, 7 classes" in text
    assert "center 64x64 crop" in text  # the preprocessing
    assert "Top 5 classes" in text  # the label's name
    assert "Examples" in text
    assert network.outside == []


def test_without_gradio_it_says_the_extra(monkeypatch):
    from jaxtl import demo

    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    with pytest.raises(JaxtlError, match=re.escape(INSTALL)):
        demo.serve("any/checkpoint", block=False)
    with pytest.raises(JaxtlError, match=re.escape(INSTALL)):
        demo.build_demo(object())


def test_a_path_that_is_not_a_checkpoint(tmp_path):
    from jaxtl.demo import serve

    (tmp_path / "empty").mkdir()
    for path, message in [
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "empty", "is a directory but neither a StableHLO artifact .* nor a training checkpoint"),
        (photo_paths()[0], "is not an artifact jaxtl reads"),  # a file: neither .onnx nor .pth
    ]:
        with pytest.raises(JaxtlError, match=message) as error:
            serve(path, port=free_port(), block=False)
        assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_multilabel_page_shows_every_class_and_the_threshold():
    from jaxtl.demo import describe, ranked

    class MultiLabel:
        classes = ("a", "b", "c", "d", "e", "f", "g")
        multilabel = True
        threshold = 0.35

    probabilities = np.array([0.1, 0.9, 0.2, 0.7, 0.05, 0.5, 0.3], np.float32)
    shown = ranked(MultiLabel(), probabilities, top_k=5)
    assert list(shown) == ["b", "d", "f", "g", "c", "a", "e"]  # every class, not the top 5
    assert shown["d"] == float(np.float32(0.7))
    text = describe(MultiLabel(), top_k=5)
    assert "sigmoid" in text and "0.35" in text
