"""What each ``jaxtl`` command does: parse nothing, call the library, print. convert/ is imported lazily."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from jaxtl.errors import JaxtlError


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

    # An unknown arch, weight name or missing file fails here, before torch is imported.
    resolved = weights.resolve_weights(args.arch, args.weights)
    import convert

    report: list[str] = []
    path = convert.convert_weights(args.arch, resolved, out=args.out, layout=args.layout, log=report.append)
    spec = weights.load_weight_spec(path)
    print(f"converted {args.arch} weights {spec.name} from {spec.source}")
    for line in report:  # the key layout read, and which keys were renamed or dropped and why
        print(f"  {line}")
    print(f"  sha256 {spec.sha256}")
    head = f"{spec.num_classes} classes" if spec.num_classes else "no classifier head (num_classes=N gives a fresh one)"
    print(f"  {head}; preprocessing {spec.preprocessing}")
    print(f"  written to {path}")
    print(f"  use: jaxtl.models.create({args.arch!r}, weights={str(path)!r}, num_classes=N)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from jaxtl.artifacts import ArtifactError, model_and_info

    if args.format != "stablehlo":
        if args.precision != "fp32":
            raise ArtifactError(f"--precision {args.precision} is for --format stablehlo; {args.format} is float32")
        _require_torch(f"export --format {args.format}")
    model, info = model_and_info(args.checkpoint)  # not a checkpoint: fails before torch is imported
    out = Path(args.out)
    if args.format == "stablehlo":
        from jaxtl.artifacts.stablehlo import export_stablehlo

        info = export_stablehlo(model, info, out, precision="bfloat16" if args.precision == "bf16" else "float32")
        print(f"exported {info.arch} to {out}/ (StableHLO, {info.precision}; runs with jax alone, on CPU and CUDA)")
        print(f"  load: jax.export.deserialize(bytearray(open({str(out / 'model.stablehlo')!r}, 'rb').read()))")
    elif args.format == "onnx":
        from convert.artifacts import export_onnx

        info = export_onnx(model, info, out)
        print(f"exported {info.arch} to {out} (ONNX, the metadata in its metadata_props['jaxtl'])")
        print(f"  load: onnxruntime.InferenceSession({str(out)!r})")
    else:
        from convert.artifacts import export_torchvision

        info = export_torchvision(model, info, out)
        sidecar = out.with_suffix(".json")
        print(f"exported {info.arch} to {out} (torchvision state_dict, load with strict=True) and {sidecar}")
        print(
            f"  load: torchvision.models.get_model({info.arch!r}, num_classes={info.num_classes})"
            f".load_state_dict(torch.load({str(out)!r}))"
        )
    if args.format != "torchvision":
        p = info.preprocessing
        print(
            f"  input: uint8 RGB (N, {p.crop_size}, {p.crop_size}, 3), resized to {p.resize_size} ({p.interpolation}) "
            f"and center-cropped; normalised inside the graph. Output: float32 logits (N, {info.num_classes})"
        )
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
        f"{num_classes}-way head, converted to jaxtl; recipe {recipe.name} on {recipe.steps} batches "
        f"{batch}x3x{size[0]}x{size[1]}"
    )
    report = run_training_parity(
        args.arch, recipe, batch=batch, size=size, num_classes=num_classes, seed=args.seed, float64=args.float64
    )
    print(report.format())
    return 0 if report.passed else 1


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
    from jaxtl.train import distributed, fit  # after the config's checks: a bad config fails before jax loads

    if (
        args.distributed
        or args.coordinator is not None
        or args.num_processes is not None
        or args.process_id is not None
    ):
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    started = time.perf_counter()
    result = fit(config, resume=bool(args.resume))
    if not distributed.is_primary():
        return 0
    best = result.best
    metrics = best.metrics
    score = f"mAP {metrics['val_map']:.3f}" if "val_map" in metrics else f"acc@1 {metrics['val_acc1']:.3f}"
    print(f"done in {time.perf_counter() - started:.0f}s. best val {score} (epoch {best.epoch})")
    print(f"  best checkpoint: {result.best_checkpoint}; metrics: {result.run_dir / 'metrics.jsonl'}")
    example = _example_image(config)
    print(f"  try: jaxtl predict {result.best_checkpoint} {example or 'IMAGE.jpg'}")
    return 0


def _example_image(config) -> str | None:
    try:
        from jaxtl.train import load_data

        val = load_data(config.data).val
        return str(val.samples[0][0]) if hasattr(val, "samples") else None
    except JaxtlError:
        return None


def cmd_predict(args: argparse.Namespace) -> int:
    from jaxtl.artifacts.loading import load_classifier
    from jaxtl.data import load_image

    predictor = load_classifier(args.checkpoint)
    classes = predictor.classes
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
        probabilities = predictor.probabilities(image)
        top = sorted(range(len(classes)), key=lambda i: -probabilities[i])
        if predictor.multilabel:  # every class over the run's threshold, most probable first
            over = [i for i in top if probabilities[i] >= predictor.threshold]
            ranked = ", ".join(f"{classes[i]} {probabilities[i]:.3f}" for i in over) or "none"
            print(f"{path}: {ranked} (threshold {predictor.threshold:g})", flush=True)
            continue
        ranked = ", ".join(f"{classes[i]} {probabilities[i]:.3f}" for i in top[:k])
        print(f"{path}: {ranked}", flush=True)
    total = len(paths) + unlisted
    if failures == total:
        raise JaxtlError(f"no image could be classified ({failures} file(s) failed; see the lines above)")
    if failures:
        print(
            f"jaxtl predict: {failures} of {total} file(s) could not be classified (see their lines)", file=sys.stderr
        )
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


def cmd_demo(args: argparse.Namespace) -> int:
    from jaxtl.demo import serve

    serve(args.checkpoint, host=args.host, port=args.port, top_k=args.top_k, open_browser=args.open,
          examples=list(args.examples) or None)  # fmt: skip
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from jaxtl.train import evaluate_checkpoint
    from jaxtl.train.report import report_path_of, write_report

    report = None if args.report is None else report_path_of(args.checkpoint, args.report or None)
    result = evaluate_checkpoint(args.checkpoint, args.split, args.set, tta=args.tta)
    evaluation, skipped = result.evaluation, result.skipped
    note = f", {len(skipped)} unreadable file(s) skipped (data.skip_bad_files)" if skipped else ""
    if not evaluation.count:
        raise JaxtlError(f"no image of the {args.split} split could be read{note}")
    if evaluation.multilabel is not None:
        if report is not None:
            raise JaxtlError("--report: report.html is written for single-label tasks; this checkpoint is multi-label")
        _print_multilabel(args, evaluation, note, result.classes)
        return 0
    top5 = f" acc@5 {evaluation.acc5:.4f}" if evaluation.confusion.shape[0] > 5 else ""
    balanced = evaluation.metrics()["val_balanced_acc"]
    print(
        f"{args.checkpoint} on {args.split} ({evaluation.count} images{note}"
        f"{', TTA: flip' if args.tta == 'flip' else ''}): acc@1 {evaluation.acc1:.4f}{top5} "
        f"balanced acc {balanced:.4f} loss {evaluation.loss:.4f}"
    )
    table = evaluation.per_class(result.classes)
    width = max(len("class"), *map(len, table))
    print(f"  {'class':<{width}}  precision  recall      f1  support")
    for name, row in table.items():
        print(
            f"  {name:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  {row['f1']:6.4f}  {row['support']:7d}"
        )
    if report is not None:
        written = write_report(args.checkpoint, report, split=args.split, overrides=args.set, tta=args.tta)
        print(f"  report: {written.path}")
    return 0


def _print_multilabel(args: argparse.Namespace, evaluation, note: str, classes) -> None:
    """``jaxtl eval`` of a multi-label checkpoint: mAP, AUROC, F1 at its run's threshold, and the per-class table."""
    m = evaluation.multilabel
    print(
        f"{args.checkpoint} on {args.split} ({evaluation.count} images{note}"
        f"{', TTA: flip' if args.tta == 'flip' else ''}): mAP {m.mean_average_precision:.4f} AUROC "
        f"{m.macro_auroc:.4f} F1 {m.macro_f1:.4f} (threshold {m.threshold:g}) every class right "
        f"{evaluation.acc1:.4f} loss {evaluation.loss:.4f}"
    )
    width = max(len("class"), *map(len, classes))
    print(f"  {'class':<{width}}      AP   AUROC      f1  positives")
    for name, row in evaluation.per_class(classes).items():
        ap, auroc = (f"{row[k]:6.4f}" if row[k] is not None else "     -" for k in ("ap", "auroc"))
        print(f"  {name:<{width}}  {ap}  {auroc}  {row['f1']:6.4f}  {row['support']:9d}")


def cmd_inspect(args: argparse.Namespace) -> int:
    from jaxtl import models, optim

    target = Path(args.target)
    if target.is_dir():
        from jaxtl.train.describe import run_summary

        print("\n".join(run_summary(target)))
        return 0
    if target.suffix in (".yaml", ".yml") or target.is_file():
        from jaxtl.config import load_config
        from jaxtl.train import load_data

        config = load_config(target, args.set)
        num_classes = args.num_classes or len(load_data(config.data).classes)
        model = models.abstract_model(config.model.arch, num_classes=num_classes)
        print(f"{target}: {config.model.arch} ({num_classes} classes), {len(config.phases)} phase(s)")
        from jaxtl.train.describe import training_summary

        for line in training_summary(config):
            print(f"  {line}")
        for index, phase in enumerate(config.phases, start=1):
            print(f"phase {index} {phase.name!r} ({phase.describe()}, {phase.describe_length()}):")
            groups = phase.groups(model)
            optimizer = phase.optimizer or config.optim
            print(groups.summary(optimizer.lr, optimizer.weight_decay, optimizer.l2sp_alpha))
        return 0
    num_classes = args.num_classes or 1000
    model = models.abstract_model(args.target, num_classes=num_classes)
    print(f"{args.target} ({num_classes} classes), policy {args.policy}:")
    groups = optim.assign(model, optim.get_policy(args.policy)(model))
    print(groups.summary(base_lr=args.lr, default_weight_decay=args.weight_decay))
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    from jaxtl.config import ConfigError, load_config

    config = load_config(args.config, args.set)
    if not 1 <= args.phase <= len(config.phases):
        listed = ", ".join(f"{i} {phase.name!r}" for i, phase in enumerate(config.phases, start=1))
        raise ConfigError(f"--phase {args.phase}: {args.config} has {len(config.phases)} phase(s): {listed}")
    if args.out is not None and Path(args.out).suffix.lower() != ".png":
        raise ConfigError(f"--out {args.out}: give a .png file (the JSON of the steps is written next to it)")
    from jaxtl.train.lr_find import default_output, lr_find  # after the config's checks: a bad one fails before jax

    ramp = {"start_lr": args.start_lr, "end_lr": args.end_lr, "num_iter": args.num_iter}
    index = args.phase - 1
    result = lr_find(config, phase=index, **{name: value for name, value in ramp.items() if value is not None})
    plot = Path(args.out) if args.out is not None else default_output(config, index)
    result.plot(plot, title=f"lr-find: {config.model.arch}, {args.config}, phase {args.phase} {result.phase_name!r}")
    print(f"curve: {plot}; every step: {result.save(plot.with_suffix('.json'))}")
    print(result.summary())
    return 0


def cmd_suggest(args: argparse.Namespace) -> int:
    from jaxtl.config import ConfigError

    if args.out is not None and Path(args.out).suffix.lower() not in (".yaml", ".yml"):
        raise ConfigError(f"--out {args.out}: give a .yaml file, which `jaxtl train` then reads")
    # model.weights: null in a config; --weights null (or none) here.
    weights = None if args.weights.lower() in ("null", "none", "~") else args.weights
    from jaxtl.train.suggest import suggest

    result = suggest(args.data_root, arch=args.arch, weights=weights, overrides=args.set)
    print(result.summary())
    if args.out is None:
        print("config (write it with --out CONFIG.yaml):")
        print(result.config_yaml(), end="")
        return 0
    path = result.write_config(args.out)
    print(f"config: {path}; start with: jaxtl train {path}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from jaxtl.config import load_config

    config = load_config(args.config, args.set)
    from jaxtl.train.sweep import sweep  # after the config's checks: a bad config fails before jax loads

    result = sweep(config, args.policies.split(","), args.seeds, args.out, epochs=args.epochs)
    print(result.table())
    print(f"runs in {result.out_dir}; the table: {result.csv_path}, {result.json_path}; the plot: {result.plot_path}")
    return 0
