"""``jaxtl demo MODEL``: a local web page (Gradio) where one drops an image and sees the model's top classes.

The page classifies an image as ``jaxtl predict`` does: the uploaded file decoded by :func:`jaxtl.data.load_image`
(grayscale, RGBA, palette and CMYK converted to RGB as torchvision converts them), the checkpoint's eval
preprocessing, its softmax (multi-label: each class's sigmoid) probabilities. It is served on this machine only:
never a share link, no telemetry, nothing fetched from the internet.

Gradio is an optional extra (``pip install 'jaxtl[demo]'``), imported only when a page is built.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxtl.errors import JaxtlError

INSTALL = "pip install 'jaxtl[demo]'"
API_NAME = "predict"  # the endpoint a gradio_client calls: Client(url).predict(handle_file(path), api_name="/predict")
IMAGE_ID, LABEL_ID = "jaxtl-image", "jaxtl-label"  # the components' elem_id (their HTML id)


def import_gradio():
    """The gradio module, with its telemetry and version check off; a JaxtlError naming the extra without it."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read by gradio at each Blocks(): no call to api.gradio.app
    try:
        import gradio
    except ImportError:
        raise JaxtlError(f"the demo needs Gradio, an optional extra of jaxtl: {INSTALL}") from None
    return gradio


def _load_classifier(path: str | Path):
    """The classifier a path holds: a training checkpoint's :class:`jaxtl.train.Predictor`, or an exported
    artifact's (:func:`jaxtl.artifacts.loading.load_classifier`)."""
    from jaxtl.artifacts.loading import load_classifier

    return load_classifier(path)


def ranked(classifier, probabilities: np.ndarray, top_k: int) -> dict[str, float]:
    """``{class name: probability}`` of the ``top_k`` most probable classes (multi-label: every class), most
    probable first, ties in class order: what the page's label shows."""
    k = len(classifier.classes) if classifier.multilabel else min(top_k, len(classifier.classes))
    order = np.argsort(-np.asarray(probabilities, np.float32), kind="stable")[:k]
    return {classifier.classes[i]: float(probabilities[i]) for i in order}


def _model_info(classifier) -> Any:
    """What the classifier says about its model (a checkpoint's meta, an artifact's info): arch and preprocessing."""
    return getattr(classifier, "info", None) or getattr(classifier, "meta", None)


def describe(classifier, *, top_k: int, source: str | None = None) -> str:
    """The page's text (Markdown): the model, where it came from, its preprocessing and what the label shows."""
    info = _model_info(classifier)
    classes = classifier.classes
    arch = getattr(info, "arch", None) or "model"
    names = ", ".join(f"`{name}`" for name in classes[:12]) + (
        f", ... ({len(classes) - 12} more)" if len(classes) > 12 else ""
    )
    lines = [f"**Model**: {arch}, {len(classes)} classes ({names})" + (f", from `{source}`" if source else "") + "."]
    p = getattr(info, "preprocessing", None)
    if p is not None:
        antialias = ", antialiased" if p.antialias else ""
        mean = ", ".join(f"{v:.3f}" for v in p.mean)
        std = ", ".join(f"{v:.3f}" for v in p.std)
        lines.append(
            f"**Preprocessing** (as `jaxtl predict`): the image converted to RGB, its shorter side resized to "
            f"{p.resize_size} px ({p.interpolation}{antialias}), the center {p.crop_size}x{p.crop_size} crop, scaled "
            f"to [0, 1] and normalised with mean ({mean}) and std ({std})."
        )
    if classifier.multilabel:
        lines.append(
            f"**Output**: multi-label: every class's sigmoid probability; a class is predicted from a probability "
            f"of {classifier.threshold:g} (the threshold its run chose on validation)."
        )
    else:
        k = min(top_k, len(classes))
        lines.append(f"**Output**: the {k} most probable classes and their softmax probabilities.")
    return "\n\n".join(lines)


def build_demo(
    classifier,
    *,
    top_k: int = 5,
    title: str | None = None,
    examples: Sequence[str | Path] | None = None,
    source: str | None = None,
):
    """A Gradio Blocks page that classifies an image with ``classifier``.

    Args:
        classifier: any object with ``.classes`` (names), ``.multilabel``, ``.threshold`` and
            ``.probabilities(pil_image) -> np.ndarray`` (one float32 per class), as :class:`jaxtl.train.Predictor`;
            its ``.meta`` or ``.info`` (``arch``, ``preprocessing``), where it has one, is described on the page.
        top_k: how many classes the label shows (multi-label: every class).
        title: the page's heading and browser title (default: ``jaxtl: ARCH``).
        examples: image files shown under the input; a click classifies one.
        source: the file the model came from (a checkpoint's path), named on the page.

    The classification is the page's API endpoint ``/predict`` (one image file in, the label out).
    """
    gr = import_gradio()
    from jaxtl.data import load_image

    if top_k < 1:
        raise JaxtlError(f"top_k={top_k}: show at least one class")
    info = _model_info(classifier)
    title = title or f"jaxtl: {getattr(info, 'arch', None) or 'image classifier'}"
    num_shown = len(classifier.classes) if classifier.multilabel else min(top_k, len(classifier.classes))
    if classifier.multilabel:
        label_name = f"Sigmoid probabilities (a class is predicted from {classifier.threshold:g})"
    else:
        label_name = f"Top {num_shown} classes"

    def predict(path: str | None) -> dict[str, float] | None:
        if path is None:  # the image was cleared
            return None
        try:
            image = load_image(path)
        except JaxtlError as error:
            raise gr.Error(str(error).replace(str(path), Path(path).name)) from None
        return ranked(classifier, classifier.probabilities(image), top_k)

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}\n\n{describe(classifier, top_k=top_k, source=source)}")
        with gr.Row():
            with gr.Column():
                # filepath and no image_mode: the uploaded file itself, decoded by load_image as `jaxtl predict`
                # does (gradio would convert modes and rotate by EXIF); png: anything gradio must re-encode
                # (a pasted image) stays lossless.
                image = gr.Image(
                    type="filepath", image_mode=None, format="png", sources=["upload", "clipboard"],
                    label="Image", elem_id=IMAGE_ID,
                )  # fmt: skip
                if examples:
                    gr.Examples([[str(path)] for path in examples], inputs=[image], label="Examples")
            with gr.Column():
                label = gr.Label(num_top_classes=num_shown, label=label_name, elem_id=LABEL_ID)
        image.change(predict, inputs=image, outputs=label, api_name=API_NAME, show_progress="minimal")
    return demo


def launch_demo(
    demo,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    open_browser: bool = False,
    allowed_paths: Sequence[str | Path] = (),
) -> str:
    """Starts ``demo``'s server on this machine (no share link, no server-side rendering, no MCP server), in the
    background; returns its local URL."""
    import_gradio()
    try:
        _, url, _ = demo.launch(
            server_name=host, server_port=port, share=False, inbrowser=open_browser, prevent_thread_lock=True,
            quiet=True, ssr_mode=False, mcp_server=False, pwa=False, run_history=False,
            footer_links=["api", "gradio", "settings"], allowed_paths=[str(p) for p in allowed_paths],
        )  # fmt: skip
    except OSError as error:  # gradio's "Cannot find empty port in range ..." and the like
        raise JaxtlError(f"the demo cannot be served on {host}:{port or 'a free port'}: {error}") from None
    return url


def serve(
    path: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    top_k: int = 5,
    open_browser: bool = False,
    block: bool = True,
    examples: Sequence[str | Path] | None = None,
    title: str | None = None,
):
    """``jaxtl demo PATH``: serves the page of the model at ``path`` on ``host:port`` (None: Gradio's first free
    port from 7860) and prints its URL.

    With ``block`` it serves until interrupted (Ctrl-C) and returns None; otherwise it returns ``(demo, url)``
    at once, and ``demo.close()`` stops the server.
    """
    import_gradio()  # before loading the model: say the missing extra at once
    classifier = _load_classifier(path)
    demo = build_demo(classifier, top_k=top_k, title=title, examples=examples, source=str(path))
    folders = sorted({str(Path(example).resolve().parent) for example in examples or ()})
    url = launch_demo(demo, host=host, port=port, open_browser=open_browser, allowed_paths=folders)
    print(f"jaxtl demo: serving {path} at {url} (Ctrl-C stops it)", flush=True)
    if not block:
        return demo, url
    try:
        demo.block_thread()
    finally:
        demo.close(verbose=False)
    return None
