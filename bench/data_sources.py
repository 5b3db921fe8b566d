"""The sources' throughput: jaxtl's loader over each source against the pipeline its users would otherwise write.

One image set (the generated ImageFolder, or with ``--set photos`` scikit-image's photographs cut into 1-3
megapixel JPEGs: bench/data_loader.py's sets) is written in each layout jaxtl reads, the same images in the same
order: a label file (CSV), a Hugging Face dataset (``save_to_disk``, images embedded as bytes) and WebDataset
shards (``--shards`` of them). Every side decodes each image, applies the weights' eval resize and center crop
and batches uint8 arrays (torchvision's ``Resize`` + ``CenterCrop`` + ``PILToTensor``, as jaxtl's steps take
uint8 and normalise on the device), with ``--workers`` workers:

- folder: ``torch.utils.data.DataLoader(torchvision.datasets.ImageFolder(...))`` | ``Loader(ImageFolder)``
- csv: a DataLoader over the rows ``pandas.read_csv`` gives (the Dataset people write for a Kaggle set) |
  ``Loader(LabelFileSource)``
- hf: a DataLoader over ``datasets.load_from_disk(...)`` with ``with_transform`` | ``Loader(HFSource)``
- webdataset: a DataLoader over ``webdataset.WebDataset(urls).decode("pil").to_tuple("jpg", "cls")`` (its
  workers split the shards) | ``Loader(WebDatasetSource)``

Also printed: what each jaxtl source costs to open (its index) per 1,000 images. Rounds alternate between the
sides after a warm-up epoch each; the table gives median images per second and the ratio to the baseline.

    python bench/data_sources.py [--set generated|photos] [--workers 2] [--batch 32] [--rounds 3]
        [--per-class 60] [--photos-count 240] [--shards 4] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torchvision
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from data_loader import generate_photos  # noqa: E402 (bench/ is not a package)

from jaxtl.data import EvalTransform, ImageFolder, LabelFileSource, Loader, WebDatasetSource, generate_synthetic
from jaxtl.data.sources.hf import HFSource
from jaxtl.weights import get_weight_spec


def write_layouts(root: Path, scratch: Path, shards: int) -> dict[str, Path]:
    """The ImageFolder ``root/train`` written as a CSV label file, a save_to_disk dataset and WebDataset shards."""
    import datasets
    import webdataset

    folder = ImageFolder(root / "train")
    rows = [f"{Path(path).relative_to(folder.root)},{folder.classes[label]}" for path, label in folder.samples]
    (scratch / "labels.csv").write_text("\n".join(["image,label", *rows]) + "\n")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(folder.classes))})
    data = {"image": [path for path, _ in folder.samples], "label": [label for _, label in folder.samples]}
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(scratch / "hf"))
    per_shard = -(-len(folder) // shards)
    (scratch / "shards").mkdir()
    for shard in range(shards):
        with webdataset.TarWriter(str(scratch / "shards" / f"train-{shard:06d}.tar")) as sink:
            for i, (path, label) in enumerate(folder.samples[shard * per_shard : (shard + 1) * per_shard]):
                sink.write({"__key__": f"{shard:03d}{i:06d}", "jpg": Path(path).read_bytes(), "cls": label})
    return {"folder": folder.root, "csv": scratch / "labels.csv", "hf": scratch / "hf",
            "webdataset": scratch / "shards" / f"train-{{000000..{shards - 1:06d}}}.tar"}  # fmt: skip


def torch_sides(layouts: dict, transform, batch: int, workers: int) -> dict:
    """kind -> a DataLoader the way its library's users write one."""
    import datasets
    import pandas
    import webdataset

    def loader(dataset, **kwargs):  # workers kept across epochs, as bench/data_loader.py's baseline
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch, num_workers=workers, persistent_workers=workers > 0, **kwargs
        )

    class Rows(torch.utils.data.Dataset):  # the Dataset of a Kaggle notebook: pandas rows, PIL, the transform
        def __init__(self, file: Path, root: Path):
            self.frame, self.root = pandas.read_csv(file), root
            self.classes = sorted(self.frame["label"].unique())

        def __len__(self):
            return len(self.frame)

        def __getitem__(self, i):
            row = self.frame.iloc[i]
            with open(self.root / row["image"], "rb") as f:
                image = Image.open(f).convert("RGB")
            return transform(image), self.classes.index(row["label"])

    hf = datasets.load_from_disk(str(layouts["hf"])).with_transform(
        lambda rows: {"image": [transform(image.convert("RGB")) for image in rows["image"]], "label": rows["label"]}
    )
    shards = webdataset.WebDataset(str(layouts["webdataset"]), shardshuffle=False, empty_check=False)
    return {
        "folder": loader(torchvision.datasets.ImageFolder(str(layouts["folder"]), transform), shuffle=True),
        "csv": loader(Rows(layouts["csv"], layouts["folder"]), shuffle=True),
        "hf": loader(hf, shuffle=True, collate_fn=lambda rows: (torch.stack([r["image"] for r in rows]), None)),
        "webdataset": loader(shards.decode("pil").to_tuple("jpg", "cls").map_tuple(transform, int)),
    }


def jaxtl_sources(layouts: dict) -> tuple[dict, dict]:
    """kind -> jaxtl's source, and kind -> seconds to open it (its index)."""
    makers = {
        "folder": lambda: ImageFolder(layouts["folder"]),
        "csv": lambda: LabelFileSource(layouts["csv"], layouts["folder"]),
        "hf": lambda: HFSource(layouts["hf"]),
        "webdataset": lambda: WebDatasetSource(str(layouts["webdataset"])),
    }
    sources, opened = {}, {}
    for kind, make in makers.items():
        start = time.perf_counter()
        sources[kind] = make()
        opened[kind] = time.perf_counter() - start
    return sources, opened


def torch_epoch(loader) -> int:
    return sum(images.shape[0] for images, _ in loader)


def jaxtl_epoch(loader: Loader, epoch: int) -> int:
    return sum(int(batch.mask.sum()) for batch in loader.epoch(epoch))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--set", dest="image_set", choices=("generated", "photos"), default="generated")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=60, help="train images per class of the generated set")
    parser.add_argument("--photos-count", type=int, default=240, help="images of the photo set")
    parser.add_argument("--shards", type=int, default=4, help="WebDataset shards")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    p = get_weight_spec(args.arch, "DEFAULT").preprocessing
    interpolation = torchvision.transforms.InterpolationMode(p.interpolation)
    transform = torchvision.transforms.Compose([
        torchvision.transforms.Resize(p.resize_size, interpolation=interpolation, antialias=p.antialias),
        torchvision.transforms.CenterCrop(p.crop_size),
        torchvision.transforms.PILToTensor(),
    ])  # fmt: skip
    if args.image_set == "photos":
        root = generate_photos(args.photos_count)
    else:
        root = generate_synthetic(num_classes=5, train_per_class=args.per_class, val_per_class=1)
    with tempfile.TemporaryDirectory() as scratch:
        layouts = write_layouts(root, Path(scratch), args.shards)
        sources, opened = jaxtl_sources(layouts)
        n = len(sources["folder"])
        torch_loaders = torch_sides(layouts, transform, args.batch, args.workers)
        jaxtl_loaders = {
            kind: Loader(
                source,
                EvalTransform(p),
                batch_size=args.batch,
                shuffle=True,
                num_workers=args.workers,
                worker_type="thread",
            )  # fmt: skip
            for kind, source in sources.items()
        }
        times: dict[str, list[float]] = {f"{side} {kind}": [] for kind in sources for side in ("torch", "jaxtl")}
        for round_index in range(args.rounds + 1):  # round 0 warms up (worker start, file cache)
            for kind in sources:
                for side in ("torch", "jaxtl"):
                    start = time.perf_counter()
                    if side == "torch":
                        count = torch_epoch(torch_loaders[kind])
                    else:
                        count = jaxtl_epoch(jaxtl_loaders[kind], round_index)
                    assert count == n, f"{side} {kind}: {count} images of {n}"
                    if round_index:
                        times[f"{side} {kind}"].append(time.perf_counter() - start)
        for loader in jaxtl_loaders.values():
            loader.close()
    rates = {name: n / statistics.median(values) for name, values in times.items()}
    lines = [
        f"{n} images ({args.image_set}), eval resize {p.resize_size} + crop {p.crop_size} to uint8, batch "
        f"{args.batch}, {args.workers} workers, {args.rounds} rounds; {platform.processor() or platform.machine()}",
        f"{'source':<11} {'torch img/s':>12} {'jaxtl img/s':>12} {'jaxtl/torch':>12} {'open (jaxtl), s/1k img':>24}",
    ]
    for kind in sources:
        torch_rate, jaxtl_rate = rates[f"torch {kind}"], rates[f"jaxtl {kind}"]
        lines.append(f"{kind:<11} {torch_rate:12,.0f} {jaxtl_rate:12,.0f} {jaxtl_rate / torch_rate:11.2f}x "
                     f"{1000 * opened[kind] / n:24.3f}")  # fmt: skip
    print("\n".join(lines))
    if args.json:
        record = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "images": n, "images_per_s": rates,
                  "args": vars(args) | {"json": str(args.json)}, "open_s": opened, "table": lines}  # fmt: skip
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
