"""Remakes docs/images/demo.png: the page of ``jaxtl demo`` after it classified a photograph, in headless Chromium.

The page is :func:`jaxtl.demo.build_demo` of a checkpoint's Predictor with scikit-image's photographs as examples,
plus one event that puts ``--photo`` into the image input when the page opens (Gradio has no URL to pass an image
with), so that the page classifies it as it would an upload. It is served on 127.0.0.1 and captured by Debian's
chromium at 1200x800.

Without a checkpoint it fine-tunes the tests' one (tests/exported.py: resnet18 from random weights, seven
synthetic classes, ~30 s): its classes are shapes, so its answer for a photograph means nothing; the page is the
point.

    python bench/demo_screenshot.py [CHECKPOINT] [--photo chelsea.png] [--out docs/images/demo.png]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
HEADLESS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
    "--disable-background-networking", "--disable-component-update", "--hide-scrollbars",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", help="a training checkpoint (default: train the tests' one)")
    parser.add_argument("--photo", default="chelsea.png", help="the scikit-image photograph classified on the page")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "demo.png")
    parser.add_argument("--size", default="1200,800", help="chromium's --window-size")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))
    from exported import photo_paths

    from jaxtl.data import load_image
    from jaxtl.demo import API_NAME, IMAGE_ID, build_demo, launch_demo
    from jaxtl.train import Predictor

    with tempfile.TemporaryDirectory(prefix="jaxtl-demo-screenshot-") as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            from exported import train_checkpoint

            print("training the tests' checkpoint (~30 s)", flush=True)
            checkpoint = str(train_checkpoint(Path(tmp) / "run"))
        photos = photo_paths()
        photo = next(path for path in photos if path.name == args.photo)
        predictor = Predictor.from_checkpoint(checkpoint)
        predictor.probabilities(load_image(str(photo)))  # compiled now: the page gets its answer at once
        source = args.checkpoint or "tests/exported.py's checkpoint (shapes)"
        demo = build_demo(predictor, examples=photos, source=source)
        image = next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == IMAGE_ID)
        with demo:  # the photo goes into the input on load; the input's change event classifies it
            demo.load(lambda: str(photo), outputs=image, api_visibility="private")
        for fn in demo.fns.values():
            # Headless chromium's virtual time runs past an answer that comes through the queue's event stream
            # (the label stays at "processing"); a plain request holds it until the answer is there.
            if fn.api_name == API_NAME:
                fn.queue = False
        url = launch_demo(demo, port=free_port(), allowed_paths=[str(photo.parent)])
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            command = [
                CHROMIUM, *HEADLESS, f"--user-data-dir={tmp}/profile", f"--window-size={args.size}",
                "--virtual-time-budget=20000", f"--screenshot={args.out}", url,
            ]  # fmt: skip
            subprocess.run(command, check=True, capture_output=True, timeout=180)
        finally:
            demo.close(verbose=False)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
