"""The ``jaxtl`` command line. The only jaxtl module that calls into convert/ (lazily, for torch work)."""

from __future__ import annotations

import argparse
import json
import sys
import time
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
    from jaxtl import weights
    from jaxtl.models.registry import get_builder

    get_builder(args.arch)  # an unknown arch, weight name or missing file fails before torch is imported.
    weights.weights_source(args.arch, args.weights)
    import convert

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

    from jaxtl import weights

    is_checkpoint = (Path(args.checkpoint) / "meta.json").is_file()
    if not is_checkpoint:
        weights.load_weight_spec(args.checkpoint)  # not converted weights either: fails before torch is imported
    import torch

    import convert
    from jaxtl import models

    if is_checkpoint:  # a training checkpoint
        model, meta, preprocessing = _load_checkpoint_model(args.checkpoint)
        arch, num_classes = meta["arch"], meta["num_classes"]
        info = {
            "arch": arch,
            "num_classes": num_classes,
            "classes": meta["classes"],
            "class_to_idx": meta["class_to_idx"],
            "preprocessing": dataclasses.asdict(preprocessing),
            "weights": meta["weights"],
        }
    else:  # converted weights
        spec = weights.load_weight_spec(args.checkpoint)
        model = models.create(spec.arch, weights=args.checkpoint)
        arch, num_classes = spec.arch, spec.num_classes
        info = {
            "arch": spec.arch,
            "num_classes": spec.num_classes,
            "categories": spec.categories,
            "preprocessing": None if spec.preprocessing is None else dataclasses.asdict(spec.preprocessing),
            "source": spec.source,
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(convert.to_torchvision(model), out)
    sidecar = out.with_suffix(".json")
    sidecar.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print(f"exported {arch} to {out} (torchvision state_dict, load with strict=True) and {sidecar}")
    print(f"  load: torchvision.models.get_model({arch!r}, num_classes={num_classes}).load_state_dict(torch.load({str(out)!r}))")
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    _require_torch("parity")
    if args.recipe is not None:
        return _training_parity(args)
    args.size, args.batch, args.num_classes = args.size or (97, 131), args.batch or 2, args.num_classes or 10
    from jaxtl.models.registry import get_builder

    get_builder(args.arch)  # an unknown name fails here, with the known ones listed, before torch is imported.
    import torch

    from convert.parity import check_parity
    from convert.random_models import randomized_torchvision_model
    from convert.torchvision_state import from_torchvision

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


def _training_parity(args: argparse.Namespace) -> int:
    from jaxtl.models.registry import get_builder

    get_builder(args.arch)
    from convert.train_parity import get_recipe, run_training_parity

    recipe = get_recipe(args.recipe)
    size, batch, num_classes = args.size or (64, 64), args.batch or 8, args.num_classes or 5
    print(
        f"{args.arch}: random torchvision weights with randomised BatchNorm statistics (seed {args.seed}) and a new "
        f"{num_classes}-way head, converted to jaxtl; recipe {recipe.name} on {recipe.steps} batches {batch}x3x{size[0]}x{size[1]}"
    )
    report = run_training_parity(
        args.arch, recipe, batch=batch, size=size, num_classes=num_classes, seed=args.seed, float64=args.float64
    )
    print(report.format())
    return 0 if report.passed else 1


def _banner(lines: list[str]) -> str:
    rule = "=" * 78
    return "\n".join([rule, *(f" {line}" for line in lines), rule])


def _make_model_factory(model_config, seed: int):
    """``make(num_classes) -> (model, weights_info)`` for the trainer: converted weights from the cache,
    converted now (torch, download with a timeout) if needed, or torchvision's random init when the
    config says so explicitly."""

    def make(num_classes: int):
        from jaxtl import models
        from jaxtl import weights as weights_module
        from jaxtl.errors import WeightsError

        arch, name = model_config.arch, model_config.weights
        default_spec = weights_module.get_weight_spec(arch, "DEFAULT")
        if name is None:
            model = models.create(arch, num_classes=num_classes, seed=seed)
            return model, {"source": "random init (model.weights: null)", "preprocessing": default_spec.preprocessing}
        try:
            try:
                path = models.registry.resolve_weights(arch, name)
            except WeightsError:
                _require_torch("train (to convert the weights once)")
                import convert

                path = convert.convert_weights(arch, name, timeout_s=model_config.download_timeout_s)
            spec = weights_module.load_weight_spec(path)
            model = models.create(arch, num_classes=num_classes, weights=path, seed=seed)
            preprocessing = spec.preprocessing or default_spec.preprocessing
            return model, {"source": spec.source, "name": spec.name, "sha256": spec.sha256, "preprocessing": preprocessing}
        except JaxtlError as error:
            if not model_config.allow_random_init_fallback:
                raise WeightsError(
                    f"{error}\nThe run needs weights {name!r} for {arch}: convert them once with `jaxtl convert {arch} "
                    f"--weights {name}` (network or a local .pth), or set model.weights to a converted directory"
                ) from None
            print(
                _banner(
                    [
                        f"Pretrained weights {name!r} for {arch} could not be had:",
                        f"  {str(error).splitlines()[0]}",
                        "This config allows a fallback (model.allow_random_init_fallback), so the run trains from",
                        "torchvision's random initialisation: expect far lower accuracy than from ImageNet weights.",
                        "To use the real weights, with a network: "
                        f"jaxtl convert {arch} --weights {name}",
                        f"or copy {default_spec.file_name} into torch.hub's cache (~/.cache/torch/hub/checkpoints/)",
                        f"and run jaxtl convert {arch} --weights {name}.",
                    ]
                ),
                flush=True,
            )
            model = models.create(arch, num_classes=num_classes, seed=seed)
            info = {"source": f"random init (fallback: {name} unavailable)", "preprocessing": default_spec.preprocessing}
            return model, info

    return make


def cmd_train(args: argparse.Namespace) -> int:
    from jaxtl.config import load_config

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise JaxtlError(f"{run_dir} is not a jaxtl run directory (no config.yaml); pass the run_dir of a run")
        config = load_config(run_dir / "config.yaml", [*args.set, f"run_dir={run_dir}"])
    else:
        if args.config is None:
            raise JaxtlError("give a config (e.g. configs/quickstart.yaml) or --resume RUN_DIR")
        config = load_config(args.config, args.set)
        if "{time}" in config.run_dir:  # a fresh directory per run, e.g. runs/quickstart-{time}
            import dataclasses

            config = dataclasses.replace(config, run_dir=config.run_dir.replace("{time}", time.strftime("%Y%m%d-%H%M%S")))
    from jaxtl.train import distributed
    from jaxtl.train.loop import Trainer  # after the config's checks: a bad config fails in a fraction of a second

    if args.distributed or args.coordinator is not None or args.num_processes is not None or args.process_id is not None:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    started = time.perf_counter()
    result = Trainer(config, _make_model_factory(config.model, config.train.seed)).run(resume=bool(args.resume))
    if not distributed.is_primary():
        return 0
    best = result["best"]
    run_dir = Path(result["run_dir"])
    print(f"done in {time.perf_counter() - started:.0f}s. best val acc@1 {best['val_acc1']:.3f} (epoch {best['epoch']})")
    print(f"  best checkpoint: {run_dir / 'checkpoints' / 'best'}; metrics: {run_dir / 'metrics.jsonl'}")
    example = _example_image(config)
    print(f"  try: jaxtl predict {run_dir / 'checkpoints' / 'best'} {example or 'IMAGE.jpg'}")
    return 0


def _example_image(config) -> str | None:
    try:
        from jaxtl.train.loop import load_data

        val = load_data(config).val
        return val.describe(0) if hasattr(val, "samples") else None
    except JaxtlError:
        return None


def _load_checkpoint_model(checkpoint: str):
    from jaxtl import models
    from jaxtl.train import checkpoint as ckpt
    from jaxtl.train.loop import _load_model_arrays
    from jaxtl.weights import Preprocessing

    meta = ckpt.load_meta(checkpoint)
    model = models.abstract_model(meta["arch"], num_classes=meta["num_classes"])
    _load_model_arrays(model, ckpt.load_arrays(checkpoint)["model"], source=str(checkpoint))
    model.eval()
    p = meta["preprocessing"]
    preprocessing = Preprocessing(**{**p, "mean": tuple(p["mean"]), "std": tuple(p["std"])})
    return model, meta, preprocessing


def cmd_predict(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from jaxtl.data import EvalTransform, load_image, normalize

    model, meta, preprocessing = _load_checkpoint_model(args.checkpoint)
    classes = meta["classes"]
    transform = EvalTransform(preprocessing)
    forward = jax.jit(lambda x: jax.nn.softmax(model(normalize(x, preprocessing.mean, preprocessing.std, xp=jax.numpy))))
    paths, unlisted = _prediction_inputs(args.images)
    failures = unlisted
    k = min(args.top_k, len(classes))
    for path in paths:
        try:
            image = load_image(str(path))
        except JaxtlError as error:
            print(f"{path}: error: {error}", flush=True)
            failures += 1
            continue
        probabilities = np.asarray(forward(transform(image)[None]))[0]
        top = np.argsort(-probabilities)[:k]
        ranked = ", ".join(f"{classes[i]} {probabilities[i]:.3f}" for i in top)
        print(f"{path}: {ranked}", flush=True)
    total = len(paths) + unlisted
    if failures == total:
        raise JaxtlError(f"no image could be classified ({failures} file(s) failed; see the lines above)")
    if failures:
        print(f"jaxtl predict: {failures} of {total} file(s) could not be classified (see their lines)", file=sys.stderr)
        return 1
    return 0


def _prediction_inputs(items: list[str]) -> tuple[list[Path], int]:
    """The files to classify: each argument that is not a directory, and the files with an image
    extension under each directory (broken links included, so that they get their error line).

    Returns them and the count of directories that could not be listed or hold no image file, each
    of which has had its error line.
    """
    import os

    from jaxtl.data import IMG_EXTENSIONS

    paths: list[Path] = []
    unlisted = 0
    for item in items:
        path = Path(item)
        if not path.is_dir():
            paths.append(path)
            continue
        found: list[Path] = []
        try:
            for root, _, names in os.walk(path, onerror=_raise):
                found += [Path(root) / name for name in names if name.lower().endswith(IMG_EXTENSIONS)]
        except OSError as error:
            print(f"{path}: error: the directory cannot be listed ({error.strerror or error})", flush=True)
            unlisted += 1
            continue
        if not found:
            print(f"{path}: error: no files with an image extension ({', '.join(IMG_EXTENSIONS)})", flush=True)
            unlisted += 1
        paths += sorted(found)
    return paths, unlisted


def _raise(error: OSError) -> None:
    raise error


def cmd_eval(args: argparse.Namespace) -> int:

    import jax
    import numpy as np

    from jaxtl.config import config_from_dict
    from jaxtl.data import EvalTransform, Loader, normalize
    from jaxtl.train.loop import load_data

    model, meta, preprocessing = _load_checkpoint_model(args.checkpoint)
    config = config_from_dict(meta["config"], args.set, f"{args.checkpoint}/meta.json")
    data = load_data(config)
    if list(data.classes) != meta["classes"]:
        raise JaxtlError(f"the data's classes {list(data.classes)} differ from the checkpoint's {meta['classes']}")
    source = data.val if args.split == "val" else data.train
    d = config.data
    loader = Loader(
        source, EvalTransform(preprocessing), batch_size=d.eval_batch_size, shuffle=False,
        num_workers=d.num_workers, skip_bad_files=d.skip_bad_files, worker_type=d.worker_type,
    )  # fmt: skip
    forward = jax.jit(lambda x: model(normalize(x, preprocessing.mean, preprocessing.std, xp=jax.numpy)))
    correct = count = 0
    for batch in loader.epoch(0):
        predictions = np.asarray(jax.numpy.argmax(forward(batch.images), -1))
        correct += int(((predictions == batch.labels) & batch.mask).sum())
        count += int(batch.mask.sum())
    loader.close()
    skipped = f", {len(loader.skipped)} unreadable file(s) skipped (data.skip_bad_files)" if loader.skipped else ""
    if not count:
        raise JaxtlError(f"no image of the {args.split} split could be read{skipped}")
    print(f"{args.checkpoint} on {args.split} ({count} images{skipped}): acc@1 {correct / count:.4f}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from jaxtl import models, optim

    target = Path(args.target)
    if target.suffix in (".yaml", ".yml") or target.is_file():
        from jaxtl.config import load_config
        from jaxtl.train.loop import phases_of

        config = load_config(target, args.set)
        num_classes = args.num_classes or _config_num_classes(config)
        model = models.abstract_model(config.model.arch, num_classes=num_classes)
        print(f"{target}: {config.model.arch} ({num_classes} classes), {len(config.phases)} phase(s)")
        for index, phase in enumerate(phases_of(config), start=1):
            print(f"phase {index} {phase.name!r} ({phase.policy}, {phase.epochs} epochs):")
            groups = phase.groups(model)
            print(groups.summary(base_lr=phase.optimizer.lr, default_weight_decay=phase.optimizer.weight_decay))
        return 0
    num_classes = args.num_classes or 1000
    model = models.abstract_model(args.target, num_classes=num_classes)
    print(f"{args.target} ({num_classes} classes), policy {args.policy}:")
    groups = optim.assign(model, optim.get_policy(args.policy)(model))
    print(groups.summary(base_lr=args.lr, default_weight_decay=args.weight_decay))
    return 0


def _config_num_classes(config) -> int:
    from jaxtl.train.loop import load_data

    return len(load_data(config).classes)


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
        help="export a fine-tuned checkpoint or converted weights to a torchvision state_dict (needs torch)",
        description="Write a torchvision state_dict (.pth, loadable with strict=True) and a JSON of classes, "
        "class_to_idx and preprocessing next to it.",
    )
    export.add_argument("checkpoint", help="a training checkpoint (RUN_DIR/checkpoints/best) or a converted-weights directory")
    export.add_argument("--out", required=True, help="the .pth file to write")
    export.set_defaults(run=cmd_export)

    parity = commands.add_parser(
        "parity",
        help="check that a converted model computes what torchvision computes (needs torch)",
        description="Build a random torchvision model with randomised BatchNorm statistics, convert it, and compare "
        "eval logits, train-mode logits and BN updates, gradients and the export round trip against torch.",
    )
    parity.add_argument("arch", help="architecture, e.g. resnet18")
    parity.add_argument("--size", type=_parse_size, help="input HEIGHTxWIDTH (default 97x131; 64x64 with --recipe)")
    parity.add_argument("--batch", type=int, help="batch size (default 2; 8 with --recipe)")
    parity.add_argument("--num-classes", type=int, help="head width (default 10; 5 with --recipe)")
    parity.add_argument("--seed", type=int, default=0, help="seed of weights and input (default 0)")
    parity.add_argument(
        "--recipe",
        help="training parity instead: run a fine-tuning recipe (feature_extraction, differential_lr, "
        "progressive_unfreezing, bn_eval, bn_train) in PyTorch and in jaxtl on the same batches and compare "
        "losses at every step, and parameters and BN running statistics at the end",
    )
    parity.add_argument(
        "--float64",
        action="store_true",
        help="with --recipe: run both sides in float64 (bound 1e-10 instead of 1e-4), to tell float32 rounding "
        "from a difference of implementation",
    )
    parity.set_defaults(run=cmd_parity)

    train = commands.add_parser(
        "train",
        help="fine-tune a model on a dataset, as a config says",
        description="Run a training config (configs/*.yaml): data, model and weights, phases of parameter groups, "
        "evaluation every epoch, metrics (metrics.jsonl), checkpoints (checkpoints/latest and checkpoints/best) in "
        "the config's run_dir. Interrupted runs continue with --resume RUN_DIR.",
    )
    train.add_argument("config", nargs="?", help="a YAML config, e.g. configs/quickstart.yaml")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set optim.lr=3e-4 --set phases.0.epochs=1")  # fmt: skip
    train.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its latest checkpoint (verified against its manifest; if it is "
        "damaged, from the previous intact version, with a line saying so)",
    )
    multi = train.add_argument_group(
        "data parallelism across processes (hosts)",
        "Start one process per host, each with the same config and arguments but its --process-id; the batch is "
        "split across the devices of all processes, and the first process writes the run directory (it must be "
        "on storage that every host sees, for --resume).",
    )
    multi.add_argument("--distributed", action="store_true",
                       help="join the processes that JAX detects (Slurm, Open MPI, Cloud TPU)")  # fmt: skip
    multi.add_argument("--coordinator", metavar="HOST:PORT", help="the first process's host and a free port")
    multi.add_argument("--num-processes", type=int, metavar="N", help="how many processes take part")
    multi.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 to N-1")
    train.set_defaults(run=cmd_train)

    predict = commands.add_parser(
        "predict",
        help="classify images with a checkpoint: top-k class names and probabilities",
        description="Classify image files (or every image in a directory) with a checkpoint's model, its class names "
        "and its eval preprocessing. A file that cannot be read gets an error line; the others are still classified. "
        "Exit status: 0 when every file was classified, 1 when some could not be (counted on stderr), 2 when none "
        "could be.",
    )
    predict.add_argument("checkpoint", help="a checkpoint directory, e.g. runs/quickstart/checkpoints/best")
    predict.add_argument("images", nargs="+", help="image files or directories")
    predict.add_argument("--top-k", type=int, default=5, help="classes to show per image (default 5)")
    predict.set_defaults(run=cmd_predict)

    evaluate = commands.add_parser(
        "eval",
        help="accuracy of a checkpoint on a split of its run's dataset",
        description="Evaluate a checkpoint on the train or val split of the dataset its run used (overridable with "
        "--set data.root=...).",
    )
    evaluate.add_argument("checkpoint", help="a checkpoint directory")
    evaluate.add_argument("--split", choices=("val", "train"), default="val", help="which split (default val)")
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the run's config")
    evaluate.set_defaults(run=cmd_eval)

    inspect = commands.add_parser(
        "inspect",
        help="show which parameters a freezing policy trains, with LRs, weight decay and BN policy",
        description="Print, per parameter group, the parameters (whole modules collapsed), counts, learning rate, "
        "weight decay and BatchNorm policy: for every phase of a run config, or for ARCH under --policy. Needs no "
        "weights.",
    )
    inspect.add_argument("target", help="a run config (configs/quickstart.yaml) or an architecture (resnet50)")
    inspect.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the config")
    inspect.add_argument(
        "--policy",
        default="head_only",
        help="head_only, last_n_blocks:N, full[:BACKBONE_LR_MULT], discriminative[:FACTOR], "
        "layerwise_lr_decay[:DECAY], bitfit, norm_only (default head_only)",
    )
    inspect.add_argument("--num-classes", type=int, help="head width (default: the config's dataset, or 1000)")
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


def _enable_compilation_cache() -> None:
    """XLA's persistent compilation cache in jaxtl's cache: a second run of a config skips its compiles.

    jax's own variables take precedence: ``JAX_COMPILATION_CACHE_DIR`` (an empty value disables the
    cache), ``JAX_COMPILATION_CACHE_MAX_SIZE`` in bytes (default here 4 GiB) and
    ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` (default here 0: every compile is kept; jax's 1 s
    would recompile a head-only step, 0.6 s, and the small conversions of weight loading on every run).
    A bounded cache is also a locked one, so that concurrent runs share it safely. They are set as
    environment variables, which jax reads when it is imported: a bad argument or config is reported
    before jax is loaded.
    """
    import importlib.util
    import os

    from jaxtl.weights import cache_dir

    defaults = {
        "jax_compilation_cache_dir": str(cache_dir() / "xla"),
        "jax_compilation_cache_max_size": 4 << 30,
        "jax_persistent_cache_min_compile_time_secs": 0.0,
    }
    if importlib.util.find_spec("filelock") is None:  # a --no-deps install: jax can bound the cache only with it
        del defaults["jax_compilation_cache_max_size"]
    unset = {name: value for name, value in defaults.items() if name.upper() not in os.environ}
    os.environ.update({name.upper(): str(value) for name, value in unset.items()})  # read when jax is imported
    if "jax" in sys.modules:  # main() called in a process that has imported jax already
        import jax

        for name, value in unset.items():
            jax.config.update(name, value)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("train", "eval", "predict"):
        _enable_compilation_cache()
    try:
        return args.run(args)
    except JaxtlError as error:
        print(f"jaxtl {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
