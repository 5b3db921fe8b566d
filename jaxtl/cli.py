"""The ``jaxtl`` command line. The only jaxtl module that calls into convert/ (lazily, for torch work)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxtl.errors import JaxtlError


def _parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not HEIGHTxWIDTH, e.g. 97x131") from None
    if height < 32 or width < 32:
        raise argparse.ArgumentTypeError(f"size {text!r} is too small: ResNets need at least 32x32")
    return height, width


def _require_torch(command: str) -> None:
    import importlib.util

    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None:
        raise JaxtlError(f"`jaxtl {command}` needs torch and torchvision: pip install 'jaxtl[torch]'")


def cmd_models(args: argparse.Namespace) -> int:
    from jaxtl import models, weights

    for arch in models.list_models():
        names = weights.list_weights(arch)
        default = weights.default_weights(arch)
        listed = ", ".join(f"{n} (DEFAULT)" if n == default else n for n in names) or "-"
        print(f"{arch:<20} {listed}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    _require_torch("convert")
    import convert
    from jaxtl import weights

    path = convert.convert_weights(args.arch, args.weights, out=args.out)
    spec = weights.load_weight_spec(path)
    print(f"converted {args.arch} weights {spec.name} from {spec.source}")
    print(f"  sha256 {spec.sha256}")
    print(f"  {spec.num_classes} classes; preprocessing {spec.preprocessing}")
    print(f"  written to {path}")
    print(f"  use: jaxtl.models.create({args.arch!r}, weights={str(path)!r}, num_classes=N)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    _require_torch("export")
    import dataclasses

    import torch

    import convert
    from jaxtl import models, weights

    spec = weights.load_weight_spec(args.checkpoint)
    model = models.create(spec.arch, weights=args.checkpoint)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(convert.to_torchvision(model), out)
    sidecar = out.with_suffix(".json")
    sidecar.write_text(
        json.dumps(
            {
                "arch": spec.arch,
                "num_classes": spec.num_classes,
                "categories": spec.categories,
                "preprocessing": None if spec.preprocessing is None else dataclasses.asdict(spec.preprocessing),
                "source": spec.source,
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    print(f"exported {spec.arch} to {out} (torchvision state_dict, load with strict=True) and {sidecar}")
    print(f"  load: torchvision.models.get_model({spec.arch!r}, num_classes={spec.num_classes}).load_state_dict(torch.load({str(out)!r}))")
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    _require_torch("parity")
    import torch

    from convert.parity import check_parity
    from convert.random_models import randomized_torchvision_model
    from convert.torchvision_state import from_torchvision
    from jaxtl.models.registry import get_builder

    get_builder(args.arch)  # an unknown name fails here, with the known ones listed.
    torch_model = randomized_torchvision_model(args.arch, num_classes=args.num_classes, seed=args.seed)
    jax_model = from_torchvision(torch_model, args.arch, source=f"random torchvision {args.arch}")
    generator = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch, 3, *args.size, generator=generator)
    labels = torch.randint(0, args.num_classes, (args.batch,), generator=generator)
    print(
        f"{args.arch}: random torchvision weights with randomised BatchNorm statistics (seed {args.seed}), "
        f"converted to jaxtl; batch {args.batch}x3x{args.size[0]}x{args.size[1]}"
    )
    report = check_parity(torch_model, jax_model, args.arch, x, labels, float32_gradients=True)
    print(report.format())
    return 0 if report.passed else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    from jaxtl import models, optim

    model = models.abstract_model(args.arch, num_classes=args.num_classes)
    print(f"{args.arch} ({args.num_classes} classes), policy {args.policy}:")
    groups = optim.assign(model, optim.get_policy(args.policy)(model))
    print(groups.summary(base_lr=args.lr, default_weight_decay=args.weight_decay))
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    import subprocess

    # Its own process: tfds prepares most datasets with tensorflow, which must never share a
    # process with torch (or with training, which reads the prepared files without it).
    command = [sys.executable, "-m", "jaxtl.data.prepare", args.name]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    return subprocess.call(command)


def cmd_data_synthetic(args: argparse.Namespace) -> int:
    from jaxtl.data import generate_synthetic, image_folder_splits

    root = generate_synthetic(
        args.out,
        seed=args.seed,
        num_classes=args.num_classes,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
    )
    splits = image_folder_splits(root)
    print(f"synthetic dataset in {root}")
    for split, folder in splits.items():
        print(f"  {split}: {len(folder)} images, classes {', '.join(folder.classes)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxtl", description="Transfer learning of torchvision classifiers in JAX.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = commands.add_parser("models", help="list architectures and their pretrained weights")
    models.set_defaults(run=cmd_models)

    convert = commands.add_parser(
        "convert",
        help="convert torchvision weights into jaxtl's format (needs torch)",
        description="Convert torchvision weights (a weight name, downloaded through torchvision, or a local .pth "
        "state_dict) into a directory that jaxtl.models.create reads without torch. Files are read weights-only "
        "and their sha256 checked against the hash prefix in their name.",
    )
    convert.add_argument("arch", help="architecture, e.g. resnet50 (see `jaxtl models`)")
    convert.add_argument("--weights", required=True, help="DEFAULT, IMAGENET1K_V1, ... or a path to a .pth state_dict")
    convert.add_argument("--out", help="directory to write (default: jaxtl's cache, ~/.cache/jaxtl or $JAXTL_CACHE)")
    convert.set_defaults(run=cmd_convert)

    export = commands.add_parser(
        "export",
        help="export converted weights to a torchvision state_dict (needs torch)",
        description="Write a torchvision state_dict (.pth, loadable with strict=True) and a JSON of classes and "
        "preprocessing next to it.",
    )
    export.add_argument("checkpoint", help="a converted-weights directory")
    export.add_argument("--out", required=True, help="the .pth file to write")
    export.set_defaults(run=cmd_export)

    parity = commands.add_parser(
        "parity",
        help="check that a converted model computes what torchvision computes (needs torch)",
        description="Build a random torchvision model with randomised BatchNorm statistics, convert it, and compare "
        "eval logits, train-mode logits and BN updates, gradients and the export round trip against torch.",
    )
    parity.add_argument("arch", help="architecture, e.g. resnet18")
    parity.add_argument("--size", type=_parse_size, default=(97, 131), help="input HEIGHTxWIDTH (default 97x131)")
    parity.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    parity.add_argument("--num-classes", type=int, default=10, help="head width (default 10)")
    parity.add_argument("--seed", type=int, default=0, help="seed of weights and input (default 0)")
    parity.set_defaults(run=cmd_parity)

    inspect = commands.add_parser(
        "inspect",
        help="show which parameters a freezing policy trains, with LRs, weight decay and BN policy",
        description="Assign the parameters of ARCH to the groups of a policy and print, per group, the parameters "
        "(whole modules collapsed), counts, learning rate, weight decay and BatchNorm policy. Needs no weights.",
    )
    inspect.add_argument("arch", help="architecture, e.g. resnet50")
    inspect.add_argument(
        "--policy",
        default="head_only",
        help="head_only, last_n_blocks:N, full[:BACKBONE_LR_MULT], discriminative[:FACTOR], "
        "layerwise_lr_decay[:DECAY], bitfit, norm_only (default head_only)",
    )
    inspect.add_argument("--num-classes", type=int, default=1000, help="head width (default 1000)")
    inspect.add_argument("--lr", type=float, default=1e-3, help="base learning rate (default 1e-3)")
    inspect.add_argument("--weight-decay", type=float, default=0.01, help="default weight decay (default 0.01)")
    inspect.set_defaults(run=cmd_inspect)

    data = commands.add_parser("data", help="prepare tfds datasets; write the synthetic dataset")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    prepare = data_commands.add_parser(
        "prepare",
        help="download and prepare a tfds dataset as array_record files (needs tensorflow)",
        description="Download and prepare a tfds catalog dataset (e.g. tf_flowers) in array_record format, in a "
        "separate process that never imports torch. Training then reads it through tfds.data_source without "
        "tensorflow.",
    )
    prepare.add_argument("name", help="tfds catalog name, optionally with a version: tf_flowers, tf_flowers:3.0.1")
    prepare.add_argument("--data-dir", help="tfds data folder (default: tfds's, ~/tensorflow_datasets)")
    prepare.set_defaults(run=cmd_data_prepare)
    synthetic = data_commands.add_parser(
        "synthetic",
        help="write the generated shapes-and-textures dataset as an ImageFolder",
        description="Write the deterministic synthetic dataset (root/{train,val}/<class>/<n>.jpg) that the "
        "quickstart trains on. The same arguments give the same bytes; an existing complete copy is reused.",
    )
    synthetic.add_argument("--out", help="folder to write (default: a folder in jaxtl's cache)")
    synthetic.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    synthetic.add_argument("--num-classes", type=int, default=5, help="2 to 8 classes (default 5)")
    synthetic.add_argument("--train-per-class", type=int, default=60, help="train images per class (default 60)")
    synthetic.add_argument("--val-per-class", type=int, default=20, help="val images per class (default 20)")
    synthetic.set_defaults(run=cmd_data_synthetic)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except JaxtlError as error:
        print(f"jaxtl {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
