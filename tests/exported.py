"""A fine-tuned checkpoint to export, and real photographs to classify, for the tests of exported artifacts.

The checkpoint starts from torchvision's resnet18 with random weights and randomised BatchNorm statistics (so that
the statistics an exporter carries matter) and fine-tunes it for an epoch on the synthetic dataset, with seven
named classes; the photographs are the scikit-image package's (``skimage/data``).
"""

from __future__ import annotations

from pathlib import Path

from tiny import TINY

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NUM_CLASSES = 7
PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg")


def photo_paths() -> list[Path]:
    """Real RGB photographs shipped with scikit-image, of various sizes."""
    import skimage

    root = Path(skimage.__file__).parent / "data"
    return [root / name for name in PHOTOS]


def train_checkpoint(run_dir: Path, *, arch: str = "resnet18", crop_size: int = 64) -> Path:
    """Fine-tunes ``arch`` for one epoch (head only, then its last block) and returns ``RUN_DIR/checkpoints/best``."""
    import convert
    from convert.random_models import randomized_torchvision_model
    from jaxtl.train import fit

    model = convert.from_torchvision(randomized_torchvision_model(arch, num_classes=NUM_CLASSES, seed=3), arch)
    overrides = [
        *TINY,
        f"run_dir={run_dir}",
        f"data.synthetic.num_classes={NUM_CLASSES}",
        "data.synthetic.train_per_class=2",
        "data.synthetic.val_per_class=1",
        f"data.crop_size={crop_size}",
        "phases.0.epochs=1",
        "phases.1.epochs=1",
    ]
    fit(CONFIGS / "quickstart.yaml", model=model, overrides=overrides, log=lambda line: None)
    return run_dir / "checkpoints" / "best"
