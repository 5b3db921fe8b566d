"""The ``jaxtl`` command line's arguments: one subcommand per job, each bound to its function in commands."""

from __future__ import annotations

import argparse

from jaxtl.cli.commands import (
    cmd_convert,
    cmd_demo,
    cmd_eval,
    cmd_export,
    cmd_inspect,
    cmd_lr_find,
    cmd_models,
    cmd_parity,
    cmd_predict,
    cmd_suggest,
    cmd_sweep,
    cmd_train,
)
from jaxtl.cli.data_commands import cmd_data_cache, cmd_data_inspect, cmd_data_prepare, cmd_data_synthetic


def _parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not HEIGHTxWIDTH, e.g. 97x131") from None
    if height < 32 or width < 32:
        raise argparse.ArgumentTypeError(f"size {text!r} is too small: ResNets need at least 32x32")
    return height, width


def build_parser() -> argparse.ArgumentParser:
    from jaxtl.optim.settings import OptimizerConfig  # no jax: the defaults shown are the config's

    parser = argparse.ArgumentParser(prog="jaxtl", description="Transfer learning of torchvision classifiers in JAX.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = commands.add_parser("models", help="list architectures and their pretrained weights")
    models.set_defaults(run=cmd_models)

    convert = commands.add_parser(
        "convert",
        help="convert torchvision weights into jaxtl's format (needs torch)",
        description="Convert torchvision weights (a weight name, downloaded through torchvision, or a local .pth "
        "state_dict) into a directory that jaxtl.models.create reads without torch. Files are read weights-only "
        "and their sha256 checked against the hash prefix in their name. Checkpoints published by self-supervised "
        "methods (MoCo v2/v3, SwAV, DINO, Barlow Twins, VICReg) and timm's (.safetensors with its config.json) "
        "are recognised by their keys; the keys dropped are listed with the reason.",
    )
    convert.add_argument("arch", help="architecture, e.g. resnet50 (see `jaxtl models`)")
    convert.add_argument(
        "--weights", required=True, help="DEFAULT, IMAGENET1K_V1, ... or a path to a .pth/.safetensors weight file"
    )
    convert.add_argument(
        "--layout",
        help="the file's key layout when it is not recognised: torchvision, backbone, dino, barlow_twins, vicreg, "
        "moco_v2, moco_v3, swav or timm (default: recognised from the keys)",
    )
    convert.add_argument("--out", help="directory to write (default: jaxtl's cache, ~/.cache/jaxtl or $JAXTL_CACHE)")
    convert.set_defaults(run=cmd_convert)

    export = commands.add_parser(
        "export",
        help="export a fine-tuned checkpoint or converted weights: StableHLO, ONNX or a torchvision state_dict",
        description="Write a model for use without jaxtl. stablehlo: a directory with the jax.export serialization "
        "(runs with jax alone, on CPU and CUDA GPUs) and jaxtl.json; onnx: one .onnx file (onnxruntime), the "
        "metadata inside; torchvision: a state_dict (.pth, loadable with strict=True) and a .json beside it. Every "
        "format carries the class names, class_to_idx and the eval preprocessing. The StableHLO and ONNX graphs take "
        "uint8 RGB crops (N, H, W, 3), the batch size free, and normalise inside; they return float32 logits.",
    )
    export.add_argument(
        "checkpoint", help="a training checkpoint (RUN_DIR/checkpoints/best) or a converted-weights directory"
    )
    export.add_argument(
        "--format", choices=("stablehlo", "onnx", "torchvision"), default="torchvision",
        help="what to write (default torchvision; onnx and torchvision need torch)",
    )  # fmt: skip
    export.add_argument("--out", required=True, help="the directory (stablehlo) or file (.onnx, .pth) to write")
    export.add_argument(
        "--precision", choices=("fp32", "bf16"), default="fp32",
        help="stablehlo only: compute in bf16 (the logits stay float32; default fp32)",
    )  # fmt: skip
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
        help="classify images with a checkpoint or an exported model: top-k class names and probabilities",
        description="Classify image files (or every image in a directory) with a checkpoint's model, or with an "
        "artifact of `jaxtl export` (a StableHLO directory, an .onnx file, a torchvision .pth), its class names and "
        "its eval preprocessing. A file that cannot be read gets an error line; the others are still classified. "
        "Exit status: 0 when every file was classified, 1 when some could not be (counted on stderr), 2 when none "
        "could be.",
    )
    predict.add_argument(
        "checkpoint", metavar="model",
        help="a checkpoint directory (runs/quickstart/checkpoints/best) or an exported artifact",
    )  # fmt: skip
    predict.add_argument("images", nargs="+", help="image files or directories")
    predict.add_argument("--top-k", type=int, default=5, help="classes to show per image (default 5)")
    predict.set_defaults(run=cmd_predict)

    demo = commands.add_parser(
        "demo",
        help="a local web page to try a model: drop an image, see the top classes (pip install 'jaxtl[demo]')",
        description="Serve a Gradio page on this machine that classifies an image with a checkpoint (or an exported "
        "artifact), as `jaxtl predict` does, and shows the top classes and their probabilities. Never shared "
        "beyond --host; Ctrl-C stops it. Its API: gradio_client.Client(URL).predict(handle_file(IMAGE), "
        "api_name='/predict').",
    )
    demo.add_argument("checkpoint", metavar="model", help="a checkpoint directory or an exported artifact")
    demo.add_argument("--host", default="127.0.0.1", help="the address to serve on (default 127.0.0.1: this machine)")
    demo.add_argument("--port", type=int, help="the port (default: the first free one from 7860)")
    demo.add_argument("--top-k", type=int, default=5, help="classes to show (default 5)")
    demo.add_argument("--examples", nargs="*", default=(), metavar="IMAGE", help="image files offered as examples")
    demo.add_argument("--open", action="store_true", help="open the page in the default browser")
    demo.set_defaults(run=cmd_demo)

    evaluate = commands.add_parser(
        "eval",
        help="accuracy of a checkpoint on a split of its run's dataset",
        description="Evaluate a checkpoint on the train or val split of the dataset its run used (overridable with "
        "--set data.root=...).",
    )
    evaluate.add_argument("checkpoint", help="a checkpoint directory")
    evaluate.add_argument("--split", choices=("val", "train"), default="val", help="which split (default val)")
    evaluate.add_argument("--tta", choices=("none", "flip"), default="none",
                          help="test-time augmentation: flip averages each image's class probabilities with its "
                          "mirror image's (default none)")  # fmt: skip
    evaluate.add_argument(
        "--report", nargs="?", const="", metavar="PATH",
        help="also write a self-contained HTML report (curves, confusion matrix, per-class table, the images with "
        "the highest loss) to PATH (default: the checkpoint's RUN_DIR/report.html)",
    )  # fmt: skip
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the run's config")
    evaluate.set_defaults(run=cmd_eval)

    inspect = commands.add_parser(
        "inspect",
        help="show which parameters a freezing policy trains, with LRs, weight decay and BN policy",
        description="Print, per parameter group, the parameters (whole modules collapsed), counts, learning rate, "
        "weight decay and BatchNorm policy: for every phase of a run config, or for ARCH under --policy. Needs no "
        "weights. For a run directory: each epoch's per-group diagnostics (gradient norm, update-to-weight ratio, "
        "distance from the starting weights, BatchNorm statistics drift) from its metrics.jsonl.",
    )
    inspect.add_argument(
        "target", help="a run config (configs/quickstart.yaml), a run directory (runs/x) or an architecture (resnet50)"
    )
    inspect.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the config")
    inspect.add_argument(
        "--policy",
        default="head_only",
        help="head_only, last_n_blocks:N, full[:BACKBONE_LR_MULT], discriminative[:FACTOR], "
        "layerwise_lr_decay[:DECAY], bitfit, norm_only (default head_only)",
    )
    inspect.add_argument("--num-classes", type=int, help="head width (default: the config's dataset, or 1000)")
    defaults = OptimizerConfig()
    inspect.add_argument("--lr", type=float, default=defaults.lr, help=f"base learning rate (default {defaults.lr:g})")
    inspect.add_argument("--weight-decay", type=float, default=defaults.weight_decay,
                         help=f"default weight decay (default {defaults.weight_decay:g})")  # fmt: skip
    inspect.set_defaults(run=cmd_inspect)

    lr_find = commands.add_parser(
        "lr-find",
        help="find a learning rate for a phase: fastai's range test, its suggestions and the --set that applies them",
        description="Train a copy of the model on one phase of a config while the learning rate grows exponentially "
        "from --start-lr to --end-lr (fastai's lr_find: smoothed loss, stop once it passes 4 times its lowest), "
        "then print fastai's suggestions (valley, steep, minimum/10) with the --set overrides that apply them "
        "(groups with their own learning rates keep their ratios), and write the curve as a PNG and a JSON. No "
        "checkpoint is written or changed.",
    )
    lr_find.add_argument("config", help="a YAML config, e.g. configs/quickstart.yaml")
    lr_find.add_argument("--phase", type=int, default=1, metavar="N",
                         help="which phase, numbered from 1 as the training log numbers them (default 1)")  # fmt: skip
    lr_find.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config value, as jaxtl train takes them")  # fmt: skip
    lr_find.add_argument("--start-lr", type=float, metavar="LR", help="the ramp's first learning rate (default 1e-7)")
    lr_find.add_argument("--end-lr", type=float, metavar="LR",
                         help="the learning rate the ramp reaches after --num-iter steps (default 10)")  # fmt: skip
    lr_find.add_argument("--num-iter", type=int, metavar="N", help="steps at most (default 100)")
    lr_find.add_argument(
        "--out", metavar="PLOT.png",
        help="the PNG to write, the JSON of every step next to it (default: RUN_DIR/lr_find/phaseN-NAME.png)",
    )  # fmt: skip
    lr_find.set_defaults(run=cmd_lr_find)

    suggest = commands.add_parser(
        "suggest",
        help="which layers to fine-tune on an ImageFolder dataset: its counts, a linear probe, a config to start from",
        description="Count the images per class of DATA_ROOT/train and DATA_ROOT/val, fit a linear probe (logistic "
        "regression) to the frozen backbone's features of the train images and score it on the val images, then "
        "pick the row of jaxtl's decision table (dataset size x how well the frozen features separate the classes) "
        "and print every number it compared. The config it suggests (the folder, the model, phases with their "
        "policies and learning rates) is printed, or written with --out, for `jaxtl train`. The thresholds are "
        "heuristics (docs/design.md).",
    )
    suggest.add_argument(
        "data_root", metavar="DATA_ROOT",
        help="an ImageFolder dataset: DATA_ROOT/train/<class>/<image> and DATA_ROOT/val/<class>/<image>",
    )  # fmt: skip
    suggest.add_argument("--arch", default="resnet18", help="architecture (default resnet18; see `jaxtl models`)")
    suggest.add_argument(
        "--weights", default="DEFAULT",
        help="as model.weights: a weight name (default DEFAULT), a .pth file or a converted directory; null for "
        "torchvision's random init (model.weights: null), which makes the probe measure random features",
    )  # fmt: skip
    suggest.add_argument("--out", metavar="CONFIG.yaml", help="write the suggested config there (default: print it)")
    suggest.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="a config value for the measurement and the suggested config, e.g. --set "
                         "data.eval_batch_size=32 or --set model.allow_random_init_fallback=true")  # fmt: skip
    suggest.set_defaults(run=cmd_suggest)

    sweep = commands.add_parser(
        "sweep",
        help="compare freezing strategies: a run per policy and seed, then their table, CSV, JSON and plot",
        description="Train CONFIG once per policy and seed, each in a normal run directory (OUT/<policy>/seed<k>), "
        "every policy with the same budget of epochs (--epochs, or the sum of the config's phases' epochs) and the "
        "same base learning rate (optim.lr; no phase's lrs), then print a table of their best validation accuracy "
        "(mean and standard deviation over the seeds), trainable parameters, compiled FLOPs per train step, step "
        "time and wall time, and write it to OUT/sweep.csv, OUT/sweep.json and OUT/sweep.png. Started again, a "
        "sweep reads its finished runs back and resumes an interrupted one.",
    )
    sweep.add_argument("config", help="a YAML config, e.g. configs/quickstart.yaml")
    sweep.add_argument(
        "--policies", required=True, metavar="LIST",
        help="comma-separated: built-in policies (head_only, last_n_blocks:N, full[:MULT], discriminative[:F], "
        "layerwise_lr_decay[:D], bitfit, norm_only, surgical:first|middle|last) and l2sp[:ALPHA] (full with "
        "optim.l2sp_alpha, default 0.01), lp_ft (a linear probe, then full), gradual (the head, then the last "
        "block, then all, in thirds of the budget), config (the config's own phases)",
    )  # fmt: skip
    sweep.add_argument("--seeds", type=int, default=1, metavar="N", help="seeds 0 to N-1 for each policy (default 1)")
    sweep.add_argument("--epochs", type=int, metavar="E", help="epochs of every policy (default: the config's total)")
    sweep.add_argument("--out", metavar="DIR", help="the sweep's directory (default: the config's run_dir + -sweep)")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, as jaxtl train takes them")  # fmt: skip
    sweep.set_defaults(run=cmd_sweep)

    data = commands.add_parser("data", help="check, cache and prepare datasets; write the synthetic dataset")
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
    cache = data_commands.add_parser(
        "cache",
        help="decode and resize a config's images once into the decoded cache (data.cache: decoded)",
        description="Decode every train and val image of a config's dataset once, resized as its weights' eval "
        "transform resizes it, into memory-mapped files in jaxtl's cache ($JAXTL_CACHE/decoded). A run with "
        "data.cache: decoded builds what is missing by itself; this does it ahead, with a progress bar.",
    )
    cache.add_argument("config", help="a run config, e.g. configs/quickstart.yaml")
    cache.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the config")
    cache.set_defaults(run=cmd_data_cache)
    inspect_data = data_commands.add_parser(
        "inspect",
        help="check a config's dataset before training: counts per class, image sizes, unreadable files, duplicates",
        description="Read every train and val example of a config's dataset once and print its classes, the "
        "examples (or, multi-label, positives) per class and split, the image sizes per split, the files that do "
        "not load, the rows the source skipped as bad, and the images found in more than one split. Exit status: "
        "0 when there is no problem, 1 when there are (counted last), 2 when the dataset cannot be read at all.",
    )
    inspect_data.add_argument("config", help="a run config, e.g. configs/quickstart.yaml")
    inspect_data.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the config")
    inspect_data.set_defaults(run=cmd_data_inspect)
    return parser
