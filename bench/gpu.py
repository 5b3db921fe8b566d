"""GPU fine-tuning throughput: jaxtl against PyTorch AMP + channels_last on the same device, in one run.

Cases, each timed for both frameworks in alternating rounds after warm-up (medians, ratio jaxtl/torch):

- train: full fine-tuning steps of ResNet50, ResNet18, EfficientNet-B0, ConvNeXt-tiny and ViT-B/16 at 224 in
  bf16 on device-resident synthetic batches. jaxtl: ``make_train_step`` with bf16 compute on float32
  parameters and BatchNorm statistics, AdamW through ``build_optimizer``, uint8 NHWC batches
  normalised inside the step. PyTorch: ``torch.autocast(bfloat16)``, channels_last, fused AdamW,
  float32 NCHW batches already normalised (its usual input). Then the same PyTorch step under
  ``torch.compile`` for the first architecture, where it compiles (``--no-compile`` skips it).
- eval: forward passes in bf16 (jaxtl ``make_eval_step(compute_dtype=bf16)``; PyTorch
  ``inference_mode`` + autocast + channels_last).
- loader: training fed by the real input pipelines from generated JPEGs (RandomResizedCrop + flip):
  jaxtl's ``Loader`` (worker processes, then worker threads) + ``device_batches`` against
  ``DataLoader(num_workers=W, pin_memory=True)``, both into the model's train step above.
- loader(cache): the same JPEGs through jaxtl's decoded cache (``DecodedCache.build`` with W processes,
  then ``Loader(CachedSource, CachedTrainTransform)``, W worker processes) into the same train step,
  against the same DataLoader. ``1st epoch``: building the cache into a fresh root plus one epoch from it
  (workers started); ``epoch 2+``: epochs from the built cache, also as a fraction of the device-resident
  train rate above (target: >= 90% of it and >= 2x the DataLoader); ``+trivialaugment``: epochs 2+ with
  ``DeviceAugment(policy="trivialaugment")`` on each batch before the step, against the DataLoader with
  ``TrivialAugmentWide`` after the flip.

It needs only the jax and torch already installed (``pip install --no-deps -e .`` or PYTHONPATH=.),
stops starting new cases after ``--budget-s`` seconds, and prints each result as it comes.

    python bench/gpu.py --json bench/results/DATE-GPU-gpu.json      # under 8 minutes on an H100
    python bench/gpu.py --smoke                                       # tiny sizes, any backend (tests)
"""

from __future__ import annotations

import os

# Both frameworks share the GPU in one process: JAX takes a fixed share instead of 75%.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

import jaxtl.models  # noqa: E402
from jaxtl.data import (  # noqa: E402
    CachedTrainTransform,
    DecodedCache,
    ImageFolder,
    Loader,
    TrainTransform,
    device_batches,
    generate_synthetic,
)
from jaxtl.data.augment.pipeline import DeviceAugment, make_device_augment  # noqa: E402
from jaxtl.optim import OptimizerConfig, assign, build_optimizer, get_policy  # noqa: E402
from jaxtl.train.step import make_eval_step, make_train_step, split_model  # noqa: E402
from jaxtl.weights import Preprocessing  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Python 3.11's forkserver never preloads __main__ (CPython gh-126631, fixed in later releases): every worker
# process it starts re-runs this script, torch's and jax's imports included (seconds each). Preloaded in the
# forkserver they are inherited, so that the first epoch from the cache times jaxtl's workers, not these imports.
FORKSERVER_PRELOAD = ["__main__", "torch", "torchvision", "jax", "flax", "jaxtl.models", "jaxtl.data"]
CASE = 35  # width of the case column: "loader(cache)+trivialaugment->train"


@dataclass
class Settings:
    archs: tuple[str, ...]
    batch: int
    eval_batch: int
    size: int
    num_classes: int
    steps: int
    rounds: int
    loader_arch: str
    loader_images: int
    workers: int
    compile: bool
    budget_s: float


GPU = Settings(
    archs=("resnet50", "resnet18", "efficientnet_b0", "convnext_tiny", "vit_b_16"), batch=256, eval_batch=512, size=224,
    num_classes=100,
    steps=20, rounds=5, loader_arch="resnet50", loader_images=2560, workers=min(16, os.cpu_count() or 1),
    compile=True, budget_s=420,
)  # fmt: skip
SMOKE = Settings(
    archs=("resnet18",), batch=4, eval_batch=4, size=32, num_classes=5, steps=2, rounds=2,
    loader_arch="resnet18", loader_images=5, workers=2, compile=False, budget_s=600,
)  # fmt: skip


@dataclass
class Result:
    case: str
    arch: str
    batch: int
    jaxtl: float | None = None  # images per second (median over rounds)
    torch: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        return self.jaxtl / self.torch if self.jaxtl and self.torch else None

    def line(self) -> str:
        fmt = lambda v: f"{v:10.1f}" if v else f"{'-':>10}"  # noqa: E731
        ratio = f"{self.ratio:6.2f}x" if self.ratio else f"{'-':>7}"
        rates = f"{fmt(self.jaxtl)} {fmt(self.torch)} {ratio}"
        return f"{self.case:<{CASE}} {self.arch:<16} {self.batch:>5} {rates}  {self.note}"


HEADER = f"{'case':<{CASE}} {'arch':<16} {'batch':>5} {'jaxtl':>10} {'torch':>10} {'ratio':>7}  (images/s, median)"


def torch_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def alternate(runs: dict[str, Callable[[], int]], rounds: int) -> dict[str, float]:
    """Median images/s of each run (a callable returning images done, blocked on completion), alternating."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    done: dict[str, int] = {}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            done[name] = run()
            times[name].append(time.perf_counter() - start)
    return {name: done[name] / statistics.median(ts) for name, ts in times.items()}


# jaxtl ---------------------------------------------------------------------------------------


class JaxtlTrainer:
    """A jaxtl model, its groups (full fine-tuning) and its jitted bf16 train and eval steps."""

    def __init__(self, arch: str, s: Settings):
        model = jaxtl.models.create(arch, num_classes=s.num_classes, seed=0)
        groups = assign(model, get_policy("full")(model))
        self.graphdef, self.state = split_model(model, groups)
        self.tx = build_optimizer(groups, OptimizerConfig(name="adamw", lr=1e-4, weight_decay=1e-4))
        self.opt_state = self.tx.init(self.state.trainable)
        self.train_step = make_train_step(self.graphdef, self.tx, mean=MEAN, std=STD, compute_dtype=jnp.bfloat16)
        self.eval_step = make_eval_step(self.graphdef, mean=MEAN, std=STD, compute_dtype=jnp.bfloat16)
        self.step_index = 0

    def step(self, images, labels, mask):
        self.state, self.opt_state, metrics = self.train_step(
            self.state, self.opt_state, images, labels, mask, self.step_index
        )
        self.step_index += 1
        return metrics


def jaxtl_batches(n: int, batch: int, size: int, num_classes: int, seed: int) -> list[tuple]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
        labels = rng.integers(0, num_classes, (batch,), dtype=np.int32)
        out.append(tuple(jax.device_put(a) for a in (images, labels, np.ones((batch,), bool))))
    return out


# PyTorch -------------------------------------------------------------------------------------


class TorchTrainer:
    """The recipe's fine-tuning step in PyTorch's best GPU configuration: AMP bf16, channels_last, fused AdamW."""

    def __init__(self, arch: str, s: Settings, compiled: bool = False):
        self.device = torch_device()
        torch.manual_seed(0)
        model = torchvision.models.get_model(arch, weights=None, num_classes=s.num_classes)
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=1e-4, weight_decay=1e-4, fused=self.device.type == "cuda"
        )
        self.forward = torch.compile(self.model) if compiled else self.model

    def step(self, x, y):
        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(self.forward(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss

    @torch.inference_mode()
    def predict(self, x):
        self.model.eval()
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            return self.forward(x)


def torch_batches(n: int, batch: int, size: int, num_classes: int, seed: int) -> list[tuple]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 3, size, size, generator=generator)
        y = torch.randint(0, num_classes, (batch,), generator=generator)
        out.append((x.to(torch_device(), memory_format=torch.channels_last), y.to(torch_device())))
    return out


# cases ---------------------------------------------------------------------------------------


def bench_train_and_eval(arch: str, s: Settings, deadline: float, trainers: dict[str, JaxtlTrainer]) -> list[Result]:
    """Train and eval throughput of ``arch``; its jaxtl trainer is left in ``trainers`` for the loader case."""
    nb = 4  # rotate among distinct batches
    jx = trainers[arch] = JaxtlTrainer(arch, s)
    jb = jaxtl_batches(nb, s.batch, s.size, s.num_classes, seed=1)
    start = time.perf_counter()
    first = jx.step(*jb[0])
    jax.block_until_ready(first)
    compile_s = time.perf_counter() - start

    tt = TorchTrainer(arch, s)
    tb = torch_batches(nb, s.batch, s.size, s.num_classes, seed=1)

    def run_jaxtl() -> int:
        for i in range(s.steps):
            metrics = jx.step(*jb[i % nb])
        loss = float(metrics["loss"])  # blocks
        assert np.isfinite(loss), f"jaxtl {arch}: loss {loss}"
        return s.steps * s.batch

    def run_torch() -> int:
        for i in range(s.steps):
            loss = tt.step(*tb[i % nb])
        assert torch.isfinite(loss).item(), f"torch {arch}: loss {loss}"
        return s.steps * s.batch

    run_jaxtl(), run_torch()  # warm-up: autotuning, cuDNN plans, allocator
    rates = alternate({"jaxtl": run_jaxtl, "torch": run_torch}, s.rounds)
    train = Result("train bf16", arch, s.batch, rates["jaxtl"], rates["torch"], note=f"jaxtl compile {compile_s:.1f}s")
    train.extra["jaxtl_compile_s"] = compile_s
    report(train)
    results = [train]

    # eval throughput
    ev = jaxtl_batches(nb, s.eval_batch, s.size, s.num_classes, seed=2)
    tev = torch_batches(nb, s.eval_batch, s.size, s.num_classes, seed=2)

    def eval_jaxtl() -> int:
        for i in range(s.steps):
            logits, _ = jx.eval_step(jx.state, *ev[i % nb])
        jax.block_until_ready(logits)
        return s.steps * s.eval_batch

    def eval_torch() -> int:
        for i in range(s.steps):
            tt.predict(tev[i % nb][0])
        torch_sync()
        return s.steps * s.eval_batch

    eval_jaxtl(), eval_torch()
    rates = alternate({"jaxtl": eval_jaxtl, "torch": eval_torch}, s.rounds)
    results.append(report(Result("eval bf16", arch, s.eval_batch, rates["jaxtl"], rates["torch"])))

    if s.compile and arch == s.archs[0] and deadline - time.perf_counter() > 240:
        results.append(report(bench_torch_compile(arch, s, jx, jb, run_jaxtl)))
    return results


def bench_torch_compile(arch: str, s: Settings, jx, jb, run_jaxtl) -> Result:
    """jaxtl against the same PyTorch step under torch.compile (its compile time noted)."""
    try:
        tt = TorchTrainer(arch, s, compiled=True)
        tb = torch_batches(4, s.batch, s.size, s.num_classes, seed=1)
        start = time.perf_counter()
        tt.step(*tb[0])
        torch_sync()
        compile_s = time.perf_counter() - start
    except Exception as error:  # torch.compile's support differs between machines: report, don't stop
        return Result(
            "train compiled", arch, s.batch, note=f"torch.compile failed: {type(error).__name__}: {error}"[:200]
        )

    def run_torch() -> int:
        for i in range(s.steps):
            tt.step(*tb[i % 4])
        torch_sync()
        return s.steps * s.batch

    run_torch()
    rates = alternate({"jaxtl": run_jaxtl, "torch": run_torch}, s.rounds)
    result = Result(
        "train compiled", arch, s.batch, rates["jaxtl"], rates["torch"], note=f"torch.compile {compile_s:.0f}s"
    )
    result.extra["torch_compile_s"] = compile_s
    return result


def loader_data(s: Settings, root: Path) -> tuple[Path, Preprocessing]:
    """The generated JPEGs' train folder (5 classes, written once under ``root``) and their preprocessing."""
    classes = min(5, s.num_classes)
    per_class = max(1, s.loader_images // classes)
    data = generate_synthetic(root, num_classes=classes, train_per_class=per_class, val_per_class=1) / "train"
    return data, Preprocessing(resize_size=256, crop_size=s.size, interpolation="bilinear", mean=MEAN, std=STD)


def torch_loader(data: Path, s: Settings, *augment) -> torch.utils.data.DataLoader:
    """torch's DataLoader over ``data``: RandomResizedCrop + flip (+ ``augment`` on the PIL crop), normalised."""
    transform = v2.Compose([
        v2.RandomResizedCrop(s.size, antialias=True), v2.RandomHorizontalFlip(), *augment,
        v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD),
    ])  # fmt: skip
    return torch.utils.data.DataLoader(
        torchvision.datasets.ImageFolder(str(data), transform=transform),
        batch_size=s.batch,
        shuffle=True,
        drop_last=True,
        num_workers=s.workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=True,
        multiprocessing_context="forkserver",  # never fork a process that runs JAX's threads
    )


def torch_epoch(tt: TorchTrainer, loader: torch.utils.data.DataLoader) -> int:
    """One epoch of ``loader`` through torch's train step; images trained on."""
    n = 0
    for x, y in loader:
        x = x.to(tt.device, non_blocking=True, memory_format=torch.channels_last)
        tt.step(x, y.to(tt.device, non_blocking=True))
        n += x.shape[0]
    torch_sync()
    return n


def jaxtl_epoch(jx: JaxtlTrainer, loader: Loader, epoch: int, augment=None) -> int:
    """Epoch ``epoch`` of ``loader`` through jaxtl's train step (each batch through ``augment`` first, on the
    device, as the trainer applies DeviceAugmentation); images trained on."""
    metrics = None
    for batch in device_batches(loader.epoch(epoch)):
        images = batch.images if augment is None else augment(batch.images, batch.indices.astype(jnp.int32), epoch)
        metrics = jx.step(images, batch.labels, batch.mask)
    jax.block_until_ready(metrics)
    return len(loader.source)  # a padded last batch is masked: every image counts once


def bench_loader(s: Settings, root: Path, trainer: JaxtlTrainer | None = None) -> list[Result]:
    """Training fed by each framework's own input pipeline from JPEG files, one epoch per round.

    jaxtl's loader runs twice, with worker processes and with worker threads (the same batches);
    both are compared with torch's DataLoader. The model keeps ``s.num_classes`` outputs (the 5
    classes' labels are among them), so that the train case's ``trainer`` of the same architecture,
    whose step is compiled, can be passed in.
    """
    arch = s.loader_arch
    data, preprocessing = loader_data(s, root)
    transform = TrainTransform(preprocessing, random_resized_crop=True, flip_p=0.5)
    loaders = {
        kind: Loader(
            ImageFolder(data),
            transform,
            batch_size=s.batch,
            shuffle=True,
            num_workers=s.workers,
            seed=0,
            worker_type=kind,
        )
        for kind in ("process", "thread")
    }
    jx = trainer or JaxtlTrainer(arch, s)
    tt = TorchTrainer(arch, s)
    baseline = torch_loader(data, s)
    epochs = itertools.count()
    runs = {kind: lambda loader=loader: jaxtl_epoch(jx, loader, next(epochs)) for kind, loader in loaders.items()}
    runs["torch"] = lambda: torch_epoch(tt, baseline)
    for run in runs.values():
        run()  # warm-up: compile, worker start
    rates = alternate(runs, max(2, s.rounds // 2))
    for loader in loaders.values():
        loader.close()
    note = f"{len(loaders['thread'].source)} JPEGs/epoch"
    return [
        Result("loader->train", arch, s.batch, rates["process"], rates["torch"], note=f"{note}, {s.workers} processes"),
        Result("loader threads", arch, s.batch, rates["thread"], rates["torch"], note=f"{note}, {s.workers} threads"),
    ]


def bench_cache(
    s: Settings, root: Path, trainer: JaxtlTrainer | None = None, train_rate: float | None = None
) -> list[Result]:
    """Training fed from the decoded cache of ``bench_loader``'s JPEGs, one epoch per round, against torch's
    DataLoader over the files (without, then with TrivialAugmentWide) in the same rounds.

    The first epoch's side builds the cache into a fresh root every round (``s.workers`` decoding processes)
    and trains one epoch from it with a new Loader (its workers started); the later epochs' sides read one
    cache built beforehand. ``train_rate``: the device-resident train rate of ``s.loader_arch`` (images/s),
    which the later epochs' rates are given as a fraction of.
    """
    arch = s.loader_arch
    data, preprocessing = loader_data(s, root)
    transform = CachedTrainTransform(preprocessing, random_resized_crop=True, flip_p=0.5)
    scratch = tempfile.TemporaryDirectory(prefix="jaxtl-bench-cache-")
    builds: list[float] = []

    def cache_loader(cache_root: Path) -> Loader:
        start = time.perf_counter()
        cached = DecodedCache(cache_root).build(ImageFolder(data), preprocessing, num_workers=s.workers, progress=False)
        builds.append(time.perf_counter() - start)
        return Loader(cached, transform, batch_size=s.batch, shuffle=True, num_workers=s.workers, seed=0,
                      worker_type="process")  # fmt: skip

    def first_epoch() -> int:
        with tempfile.TemporaryDirectory(dir=scratch.name) as fresh, cache_loader(Path(fresh)) as loader:
            return jaxtl_epoch(jx, loader, next(epochs))

    jx = trainer or JaxtlTrainer(arch, s)
    tt = TorchTrainer(arch, s)
    baseline, baseline_ta = torch_loader(data, s), torch_loader(data, s, v2.TrivialAugmentWide())
    loader = cache_loader(Path(scratch.name) / "built")
    augment = make_device_augment(DeviceAugment(policy="trivialaugment"), seed=0)
    epochs = itertools.count()
    runs = {
        "1st epoch": first_epoch,
        "epoch 2+": lambda: jaxtl_epoch(jx, loader, next(epochs)),
        "torch": lambda: torch_epoch(tt, baseline),
        "trivialaugment": lambda: jaxtl_epoch(jx, loader, next(epochs), augment),
        "torch trivialaugment": lambda: torch_epoch(tt, baseline_ta),
    }
    try:
        for run in runs.values():
            run()  # warm-up: compile, worker start
        builds.clear()
        rates = alternate(runs, max(2, s.rounds // 2))
    finally:
        loader.close()
        scratch.cleanup()
    build_s = statistics.median(builds)
    note = f"{len(loader.source)} JPEGs/epoch, {s.workers} processes"
    first = Result("loader(cache)->train, 1st epoch", arch, s.batch, rates["1st epoch"], rates["torch"],
                   note=f"{note}, cache build {build_s:.1f}s + 1 epoch", extra={"cache_build_s": build_s})  # fmt: skip
    later = Result("loader(cache)->train, epoch 2+", arch, s.batch, rates["epoch 2+"], rates["torch"], note=note)
    ta = Result("loader(cache)+trivialaugment->train", arch, s.batch, rates["trivialaugment"],
                rates["torch trivialaugment"], note=f"{note}, epoch 2+, torch: + TrivialAugmentWide")  # fmt: skip
    for result in (later, ta):
        if train_rate:
            result.extra["of_device_resident"] = result.jaxtl / train_rate
            result.note += f", {result.jaxtl / train_rate:.0%} of device-resident train"
    return [first, later, ta]


def device_resident_rate(results: list[Result], arch: str) -> float | None:
    """The device-resident jaxtl train rate of ``arch`` measured earlier in the run (None: not measured)."""
    return next((r.jaxtl for r in results if r.case == "train bf16" and r.arch == arch and r.jaxtl), None)


def report(result: Result) -> Result:
    print(result.line(), flush=True)
    return result


def environment() -> dict:
    info = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "jax_device": str(jax.devices()[0].device_kind),
        "torch_device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on any backend (for the test suite)")
    parser.add_argument(
        "--archs",
        help="comma-separated architectures (default: resnet50,resnet18,efficientnet_b0,convnext_tiny,vit_b_16)",
    )
    parser.add_argument("--batch", type=int, help="train batch size (default 256)")
    parser.add_argument("--steps", type=int, help="steps per timed round (default 20)")
    parser.add_argument("--rounds", type=int, help="timed rounds per framework (default 5)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile case")
    parser.add_argument("--no-loader", action="store_true", help="skip the input-pipeline cases")
    parser.add_argument("--budget-s", type=float, help="start no new case after this many seconds (default 420)")
    parser.add_argument("--data", type=Path, help="folder for the generated JPEGs (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    s = SMOKE if args.smoke else GPU
    overrides = {
        "archs": tuple(args.archs.split(",")) if args.archs else None,
        "batch": args.batch,
        "steps": args.steps,
        "rounds": args.rounds,
        "budget_s": args.budget_s,
        "compile": False if args.no_compile else None,
    }
    s = Settings(**{**asdict(s), **{k: v for k, v in overrides.items() if v is not None}})
    multiprocessing.set_forkserver_preload(FORKSERVER_PRELOAD)
    start = time.perf_counter()
    deadline = start + s.budget_s
    env = environment()
    print(" ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    if jax.default_backend() == "cpu" and not args.smoke:
        print("note: jax runs on the CPU; this benchmark is meant for a GPU (use --smoke for a quick check)")
    print(f"size {s.size}, {s.steps} steps x {s.rounds} rounds per framework, bf16, {s.num_classes} classes")
    print(HEADER, flush=True)

    results: list[Result] = []
    failures: list[str] = []

    def attempt(name: str, fn: Callable[[], list[Result]]) -> None:
        if time.perf_counter() > deadline:
            results.append(report(Result(name, "", 0, note=f"not run: past the {s.budget_s:.0f}s budget")))
            return
        try:
            results.extend(fn())
        except Exception as error:
            traceback.print_exc()
            failures.append(f"{name}: {type(error).__name__}: {error}")
            results.append(report(Result(name, "", 0, note=f"FAILED: {type(error).__name__}")))
        write_json(args.json, env, s, results, failures, time.perf_counter() - start)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the case's models and batches are gone: give their memory back

    trainers: dict[str, JaxtlTrainer] = {}
    for arch in s.archs:
        attempt(f"train+eval {arch}", lambda arch=arch: bench_train_and_eval(arch, s, deadline, trainers))
        if arch != s.loader_arch:
            trainers.pop(arch, None)  # only the loader's architecture is needed again
    if not args.no_loader:
        with tempfile.TemporaryDirectory() as tmp:
            root = args.data or Path(tmp) / "synthetic"
            attempt("loader->train", lambda: [report(r) for r in bench_loader(s, root, trainers.get(s.loader_arch))])
            trainer, rate = trainers.get(s.loader_arch), device_resident_rate(results, s.loader_arch)
            attempt("loader(cache)->train", lambda: [report(r) for r in bench_cache(s, root, trainer, rate)])

    total = time.perf_counter() - start
    print(f"\n{HEADER}")
    for result in results:
        print(result.line())
    print(f"total {total:.0f}s; ratio = jaxtl / torch images per second (>1: jaxtl faster)")
    write_json(args.json, env, s, results, failures, total)
    if failures:
        print("failed cases:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


def write_json(path: Path | None, env: dict, s: Settings, results: list[Result], failures: list[str], seconds: float):
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "benchmark": "gpu",
        "environment": env,
        "settings": asdict(s),
        "seconds": seconds,
        "results": [{**asdict(r), "ratio": r.ratio} for r in results],
        "failures": failures,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
