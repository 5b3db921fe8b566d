"""jaxtl's Loader against grain (Google's input pipeline for JAX) making the same batches: speed and guarantees.

What a switch to grain would have to keep, and at what speed. Both sides make jaxtl's batches: each
epoch in ``permutation(seed, epoch)`` order (in order for eval), ``batch_size`` rows with the last batch
padded (``mask`` False, ``indices`` -1), each example through ``transform(image, default_rng([seed,
epoch, index]))``. jaxtl: ``Loader(source, transform, num_workers=2)`` with worker threads and with
worker processes. grain (the dataset API): ``MapDataset.range(epochs * rows_per_epoch).map(LoaderRows)
.batch(batch_size).to_iter_dataset(...)``, where ``LoaderRows`` gives row ``i`` of the run (epoch, position,
source index, the per-example generator: jaxtl's, not grain's ``random_map`` draws or ``shuffle`` order,
which are grain's own), then ``.mp_prefetch(MultiprocessingOptions(num_workers=2))`` (worker processes,
one thread each) or no worker processes (``ReadOptions(num_threads=2)``: two threads in this process).
grain's iterator runs across epochs, as grain is used; jaxtl's Loader runs one epoch at a time.

Three sets of batches, batch 64, 2 workers:

- (a) eval batches from the decoded cache: ``CachedSource`` + ``CachedEvalTransform`` over the generated
  set (``generate_synthetic(train_per_class=60)``: 300 JPEGs of 160-320 pixels), in order;
- (b) augmented crops from the cache: ``CachedTrainTransform(p, random_resized_crop=True, flip_p=0.5)``,
  shuffled;
- (c) eval batches from JPEG files: ``ImageFolder`` + ``EvalTransform`` over the photo set of
  bench/data_loader.py (``generate_photos(240)``: 1-3 megapixel JPEGs), in order.

Warm-up: two epochs from every side, from a fresh loader or iterator (the worker start is in the first
batch, printed), compared byte for byte with jaxtl's threads (images, labels, mask, indices). Rounds
then alternate the sides (reversed every other round); a round of a jaxtl side is one epoch, a round of
a grain side is as many batches (any run of them holds each example once). grain's workers keep
preparing batches while the other sides run (up to ~4 a worker process): before its timed batches a grain
side first takes ``--drain`` batches untimed (those ready count as "buffered"), and after them the bench
waits for its buffers to fill again (1.5x the time of ``--drain`` batches at jaxtl's warm-up rate), so
that it times grain's steady rate, neither its buffer nor a refill that competes with the next side.
The table gives median images per second, the ratio to jaxtl's threads and processes, and the median
CPU time (this process and its workers, user + system) per image of the timed batches: on a shared
machine the work per image is steadier than the rate (its clock ticks are 10 ms: rough for the cache's
short rounds).

Guarantees, checked and printed: grain's batches equal jaxtl's (above); grain's own ``shuffle`` and
``random_map`` do not reproduce jaxtl's order and draws; mid-epoch resume (set (b): grain's iterator
state partway through epoch 1, through JSON, into a fresh iterator, against ``Loader.epoch(1, start_batch)``);
a truncated JPEG in an ImageFolder (a copy of the generated set): jaxtl with ``skip_bad_files`` masks the
row and names the file, without it stops with a DataError; grain with the map raising (what grain does
with a failing record) and with jaxtl's skip written into the map.

Needs ``pip install grain`` (not a dependency of jaxtl). grain reads absl flags: the bench marks them
parsed, as a program that does not run absl's ``app.run`` has to before ``mp_prefetch``.

    python bench/grain_loader.py [--rounds 3] [--workers 2] [--batch 64] [--per-class 60]
        [--photos-count 240] [--drain 10] [--sets a,b,c] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from jaxtl.data import (
    Batch,
    CachedEvalTransform,
    CachedTrainTransform,
    DecodedCache,
    EvalTransform,
    ImageFolder,
    Loader,
    generate_synthetic,
)
from jaxtl.errors import DataError
from jaxtl.weights import get_weight_spec

EPOCHS = 100_000  # grain's dataset: this many epochs of rows (lazily: a range)
FIELDS = ("images", "labels", "mask", "indices")
PLURAL = {"thread": "threads", "process": "processes"}
TITLES = {
    "a": "(a) eval batches from the decoded cache: CachedSource + CachedEvalTransform (generated set)",
    "b": "(b) augmented crops from the cache: CachedTrainTransform(random_resized_crop, flip_p=0.5), shuffled",
    "c": "(c) eval batches from JPEG files: ImageFolder + EvalTransform (photo set)",
}


class LoaderRows:
    """grain's record ``i``: row ``i`` of the run's batches as jaxtl's Loader makes it, epoch after epoch.

    Row ``i`` is position ``i % rows_per_epoch`` of epoch ``i // rows_per_epoch``; positions past the
    source are padding. The example and its generator are jaxtl's (``jaxtl.data.workers._load_row``):
    ``order(epoch)[position]`` and ``default_rng([seed, epoch, index])``. With ``skip_bad_files`` a file
    that raises a DataError gives a masked zero row (jaxtl's) whose ``skipped`` names it; without, the
    DataError propagates (what grain then does is one of the checks).
    """

    def __init__(self, source, transform, *, batch_size: int, shuffle: bool, seed: int, skip_bad_files: bool):
        self.source, self.transform = source, transform
        self.batch_size, self.shuffle, self.seed, self.skip_bad_files = batch_size, shuffle, seed, skip_bad_files
        self.n = len(source)
        self.batches = -(-self.n // batch_size)
        self.rows_per_epoch = self.batches * batch_size
        self._order: tuple[int | None, np.ndarray | None] = (None, None)

    def order(self, epoch: int) -> np.ndarray:
        """Loader.order: the same permutation, kept for the epoch."""
        if self._order[0] != epoch:
            n = self.n
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order = (epoch, order)
        return self._order[1]

    def _row(self, index: int, image=None, label: int = 0, skipped: str = "") -> dict:
        height, width = self.transform.output_size
        return {
            "images": np.zeros((height, width, 3), np.uint8) if image is None else image,
            "labels": np.int32(label),
            "mask": np.bool_(image is not None),
            "indices": np.int64(index),
            "skipped": skipped,
        }

    def __call__(self, i) -> dict:
        epoch, position = divmod(int(i), self.rows_per_epoch)
        if position >= self.n:
            return self._row(-1)
        index = int(self.order(epoch)[position])
        try:
            image, label = self.source.load(index)
        except DataError:
            if not self.skip_bad_files:
                raise
            return self._row(index, skipped=self.source.describe(index))
        array = self.transform(image, np.random.default_rng([self.seed, epoch, index]))
        if array.shape != (*self.transform.output_size, 3):
            raise DataError(f"{self.source.describe(index)}: transform gave shape {array.shape}")
        return self._row(index, array, label)


def import_grain():
    try:
        import grain
    except ImportError:
        sys.exit("bench/grain_loader.py needs grain, which jaxtl does not depend on: pip install grain")
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's mp_prefetch reads absl flags, parsed or not
        flags.FLAGS.mark_as_parsed()
    return grain


def grain_iterator(rows: LoaderRows, processes: int, threads: int, epochs: int = EPOCHS):
    """The batches of ``rows`` from epoch 0 on: worker processes (one thread each), or threads in this process."""
    grain = import_grain()
    dataset = grain.MapDataset.range(epochs * rows.rows_per_epoch).map(rows).batch(rows.batch_size)
    if processes:
        dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=processes))
    else:
        dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads))
    return iter(dataset)


def as_batch(element: dict) -> Batch:
    return Batch(*(np.asarray(element[name]) for name in FIELDS))


def compare(batches: list[Batch], reference: list[Batch]) -> str:
    """'identical', or where the first difference is."""
    if len(batches) != len(reference):
        return f"{len(batches)} batches, expected {len(reference)}"
    for b, (batch, ref) in enumerate(zip(batches, reference, strict=True)):
        for name in FIELDS:
            x, y = getattr(batch, name), getattr(ref, name)
            if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
                return f"differs: batch {b}, {name} ({x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)})"
    return "identical"


def copy_batch(batch: Batch) -> Batch:
    return Batch(*(np.array(getattr(batch, name)) for name in FIELDS))


class JaxtlSide:
    def __init__(self, label, make_loader):
        self.label, self.make_loader = label, make_loader
        self.loader = None
        self.epochs = iter(range(2, 1_000_000))

    def warm_up(self) -> tuple[float, list[Batch]]:
        """The first batch's time from a fresh loader (its workers' start) and epochs 0 and 1."""
        self.loader = self.make_loader()
        start = time.perf_counter()
        batches = self.loader.epoch(0)
        out = [copy_batch(next(batches))]
        first_s = time.perf_counter() - start
        out += [copy_batch(b) for b in batches]
        start = time.perf_counter()
        out += [copy_batch(b) for b in self.loader.epoch(1)]
        self.epoch_s = time.perf_counter() - start
        return first_s, out

    def before(self) -> int:
        return 0

    def run(self) -> int:
        return sum(int(batch.mask.sum()) for batch in self.loader.epoch(next(self.epochs)))

    def after(self) -> None:
        pass

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()


class GrainSide:
    def __init__(self, label, rows: LoaderRows, processes: int, threads: int, drain: int):
        self.label, self.rows, self.processes, self.threads, self.drain = label, rows, processes, threads, drain
        self.iterator = None
        self.settle_s = 1.0  # set by time_sides: long enough for the workers to fill their buffers

    def warm_up(self) -> tuple[float, list[Batch]]:
        start = time.perf_counter()
        self.iterator = grain_iterator(self.rows, self.processes, self.threads)
        out = [copy_batch(as_batch(next(self.iterator)))]
        first_s = time.perf_counter() - start
        out += [copy_batch(as_batch(next(self.iterator))) for _ in range(2 * self.rows.batches - 1)]
        return first_s, out

    def before(self) -> int:
        """Takes ``drain`` batches untimed; gives how many of them were ready (under 5 ms)."""
        ready = 0
        for _ in range(self.drain):
            start = time.perf_counter()
            next(self.iterator)
            ready += time.perf_counter() - start < 0.005
        return ready

    def run(self) -> int:
        return sum(int(np.asarray(next(self.iterator)["mask"]).sum()) for _ in range(self.rows.batches))

    def after(self) -> None:
        time.sleep(self.settle_s)

    def close(self) -> None:
        if self.iterator is not None:
            self.iterator.close()


def cpu_seconds() -> float:
    """User + system CPU time of this process and its live children (worker processes): on a shared
    machine, the work a side does per image is steadier than its wall-clock rate."""
    import psutil  # grain's dependencies bring it

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def time_sides(sides: dict, n: int, batches_per_epoch: int, rounds: int) -> tuple[dict, list[Batch]]:
    """Warm-up (and the byte-for-byte check against the first side, a jaxtl one), then ``rounds``
    alternating rounds. Gives the results and the first side's batches of epochs 0 and 1."""
    result = {"first_batch_s": {}, "identical": {}, "seconds": {name: [] for name in sides}, "buffered": {}}
    result["cpu_seconds"] = {name: [] for name in sides}
    reference, first = None, None
    for name, side in sides.items():
        first_s, batches = side.warm_up()
        result["first_batch_s"][name] = first_s
        if reference is None:
            reference, first = batches, side
        result["identical"][name] = compare(batches, reference)
    # A grain side's refill after its timed batches: 1.5x drain batches at the first side's warm rate.
    settle_s = max(0.5, min(20.0, 1.5 * max(s.drain for s in sides.values() if hasattr(s, "drain"))
                            * first.epoch_s / batches_per_epoch))  # fmt: skip
    for side in sides.values():
        side.settle_s = settle_s
    result["settle_s"] = settle_s
    time.sleep(settle_s)
    for r in range(rounds):
        for name in list(sides)[:: -1 if r % 2 else 1]:
            side = sides[name]
            ready = side.before()
            cpu = cpu_seconds()
            start = time.perf_counter()
            count = side.run()
            result["seconds"][name].append(time.perf_counter() - start)
            result["cpu_seconds"][name].append(cpu_seconds() - cpu)
            side.after()
            result["buffered"][name] = max(result["buffered"].get(name, 0), ready)
            assert count == n, (name, count, n)
    for side in sides.values():
        side.close()
    result["images_per_second"] = {name: n / statistics.median(ts) for name, ts in result["seconds"].items()}
    result["cpu_ms_per_image"] = {name: 1000 * statistics.median(c) / n for name, c in result["cpu_seconds"].items()}
    return result, reference


def grain_own_draws(grain, n: int, seed: int) -> dict:
    """Whether grain's own shuffle and random_map reproduce jaxtl's order and per-example draws."""
    order = [int(i) for i in grain.MapDataset.range(n).shuffle(seed=seed)]
    jaxtl_order = np.random.default_rng([seed, 0]).permutation(n).tolist()
    draws = [float(x) for x in grain.MapDataset.range(8).random_map(lambda i, rng: rng.random(), seed=seed)]
    jaxtl_draws = [float(np.random.default_rng([seed, 0, i]).random()) for i in range(8)]
    return {
        "shuffle(seed) order == jaxtl's permutation(seed, 0)": order == jaxtl_order,
        "random_map(seed) draws == default_rng([seed, 0, index])": draws == jaxtl_draws,
    }


def check_resume(rows: LoaderRows, make_loader, processes: int, threads: int, reference: list[Batch]) -> dict:
    """grain: 1.5 epochs, the iterator's state through JSON into a fresh iterator, the rest of epoch 1."""
    k = rows.batches // 2
    iterator = grain_iterator(rows, processes, threads)
    for _ in range(rows.batches + k):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    iterator.close()
    resumed = grain_iterator(rows, processes, threads)
    resumed.set_state(state)
    rest = [copy_batch(as_batch(next(resumed))) for _ in range(rows.batches - k)]
    resumed.close()
    with make_loader() as loader:
        jaxtl_rest = [copy_batch(b) for b in loader.epoch(1, start_batch=k)]
    return {
        "start_batch": k,
        "state_bytes": len(json.dumps(state)),
        "jaxtl epoch(1, start_batch) vs uninterrupted": compare(jaxtl_rest, reference[rows.batches + k :]),
        "grain resumed vs jaxtl": compare(rest, jaxtl_rest),
    }


def bad_file_folder(root: Path, scratch: Path, bad: int = 10) -> tuple[Path, str]:
    """A copy of ``root`` whose ``bad``-th image (ImageFolder order) is cut to half its bytes."""
    copy = scratch / "bad-file-set"
    shutil.copytree(root, copy)
    path = ImageFolder(copy).samples[bad][0]
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    return copy, path


def grain_bad_file(rows: LoaderRows, processes: int, threads: int) -> dict:
    """One epoch (in order) of grain with the bad file: the batches it gives, what it raises, and what
    calling next() again gives (a training loop that catches the error and goes on)."""
    iterator = grain_iterator(rows, processes, threads, epochs=1)
    batches, skipped, error, after = [], [], None, None

    def position(batch: Batch) -> int:  # in order: batch k holds indices from k * batch_size
        return int(batch.indices.max()) // rows.batch_size

    try:
        for element in iterator:
            batches.append(copy_batch(as_batch(element)))
            skipped += [str(s) for s in np.asarray(element["skipped"]).ravel() if s]
    except Exception as e:  # noqa: BLE001 (what grain raises is what this reports)
        error = f"{type(e).__module__}.{type(e).__name__}: {str(e).splitlines()[0]}"
        before, then, end = [position(b) for b in batches], [], "the epoch's end"
        for _ in range(rows.batches + 1):
            try:
                then.append(position(as_batch(next(iterator))))
            except StopIteration:
                break
            except Exception as e2:  # noqa: BLE001
                end = f"{type(e2).__name__}: {str(e2).splitlines()[0][:120]}"
                break
        lost = sorted(set(range(rows.batches)) - set(before) - set(then))
        after = (f"batches {before} before the error; next() again gives batches {then}, then {end}; "
                 f"lost: batches {lost} of 0-{rows.batches - 1}")  # fmt: skip
    iterator.close()
    return {"batches": batches, "skipped": skipped, "error": error, "after_error": after}


def check_bad_file(root: Path, p, batch: int, workers: int, seed: int, scratch: Path) -> dict:
    folder, bad_path = bad_file_folder(root, scratch)
    source = ImageFolder(folder)
    transform = EvalTransform(p)
    result = {"file": bad_path}
    runs = {}
    for kind in ("thread", "process"):
        loader = Loader(source, transform, batch_size=batch, shuffle=False, seed=seed, num_workers=workers,
                        worker_type=kind, skip_bad_files=True)  # fmt: skip
        with loader:
            runs[kind] = [copy_batch(b) for b in loader.epoch(0)]
        result[f"jaxtl {PLURAL[kind]}, skip_bad_files"] = {
            "batches": len(runs[kind]),
            "masked out": sum(int((~b.mask & (b.indices >= 0)).sum()) for b in runs[kind]),
            "skipped": list(loader.skipped),
            "vs jaxtl threads": compare(runs[kind], runs["thread"]),
        }  # fmt: skip
    with Loader(source, transform, batch_size=batch, shuffle=False, seed=seed, num_workers=workers) as loader:
        got = 0
        try:
            for _ in loader.epoch(0):
                got += 1
            result["jaxtl threads, no skip"] = f"no error after {got} batches"
        except DataError as error:
            result["jaxtl threads, no skip"] = f"{got} batches, then DataError: {error}"
    for label, processes, threads in (("grain processes", workers, 0), ("grain threads", 0, workers)):
        for skip in (False, True):
            rows = LoaderRows(source, transform, batch_size=batch, shuffle=False, seed=seed, skip_bad_files=skip)
            out = grain_bad_file(rows, processes, threads)
            entry = {"batches": len(out["batches"]), "error": out["error"], "after error": out["after_error"]}
            if skip:
                entry["skipped"] = out["skipped"]
                entry["vs jaxtl threads, skip_bad_files"] = compare(out["batches"], runs["thread"])
            result[f"{label}, map {'with jaxtl skip' if skip else 'raising'}"] = entry
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-class", type=int, default=60, help="train images per class of the generated set")
    parser.add_argument("--photos-count", type=int, default=240, help="images of the photo set")
    parser.add_argument("--drain", type=int, default=10, help="untimed batches before a grain side's timed ones")
    parser.add_argument("--sets", default="a,b,c", help="which of a, b, c to time")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    grain = import_grain()
    sets = [s for s in args.sets.split(",") if s]
    if not set(sets) <= set(TITLES):
        parser.error(f"--sets {args.sets}: a comma-separated list of a, b, c")

    p = get_weight_spec(args.arch, "DEFAULT").preprocessing
    generated = generate_synthetic(train_per_class=args.per_class) / "train"
    scratch = tempfile.TemporaryDirectory(prefix="jaxtl-bench-grain-")
    cached = DecodedCache(Path(scratch.name) / "cache").build(ImageFolder(generated), p, num_workers=0, progress=False)
    configs = {
        "a": (cached, CachedEvalTransform(p), False),
        "b": (cached, CachedTrainTransform(p, random_resized_crop=True, flip_p=0.5), True),
    }
    if "c" in sets:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from data_loader import generate_photos  # here: its module imports torch, which grain's workers need not

        configs["c"] = (ImageFolder(generate_photos(args.photos_count) / "train"), EvalTransform(p), False)
    w = args.workers
    cpu = f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores"
    print(f"grain {grain.__version__}, numpy {np.__version__}, batch {args.batch}, {w} workers, {args.rounds} rounds, "
          f"drain {args.drain}; {cpu}, load average {os.getloadavg()[0]:.1f} at the start")  # fmt: skip

    results, labels = {}, {}
    for name in sets:
        source, transform, shuffle = configs[name]

        def make_loader(kind, source=source, transform=transform, shuffle=shuffle):
            return lambda: Loader(source, transform, batch_size=args.batch, shuffle=shuffle, seed=args.seed,
                                  num_workers=w, worker_type=kind)  # fmt: skip

        rows = LoaderRows(source, transform, batch_size=args.batch, shuffle=shuffle, seed=args.seed,
                          skip_bad_files=False)  # fmt: skip
        sides = {
            "jaxtl threads": JaxtlSide(f"jaxtl Loader, {w} threads", make_loader("thread")),
            "jaxtl processes": JaxtlSide(f"jaxtl Loader, {w} processes", make_loader("process")),
            "grain processes": GrainSide(f"grain mp_prefetch, {w} processes", rows, w, 0, args.drain),
            "grain threads": GrainSide(f"grain, 0 processes ({w} read threads)", rows, 0, w, args.drain),
        }
        labels[name] = {side: s.label for side, s in sides.items()}
        print(f"\n{TITLES[name]}: {len(source)} images, {rows.batches} batches an epoch", flush=True)
        result, reference = time_sides(sides, len(source), rows.batches, args.rounds)
        rates = result["images_per_second"]
        print(f"{'pipeline':<40} {'img/s (median)':>15} {'/ jaxtl thr':>12} {'/ jaxtl proc':>13} {'CPU ms/img':>11} "
              f"{'1st batch s':>12} {'buffered':>9}  epochs 0-1 vs jaxtl threads")  # fmt: skip
        for side, rate in rates.items():
            buffered = result["buffered"][side] if side.startswith("grain") else ""
            print(f"{labels[name][side]:<40} {rate:>15.1f} {rate / rates['jaxtl threads']:>11.2f}x "
                  f"{rate / rates['jaxtl processes']:>12.2f}x {result['cpu_ms_per_image'][side]:>11.2f} "
                  f"{result['first_batch_s'][side]:>12.2f} {buffered:>9}  {result['identical'][side]}")  # fmt: skip
        result["ratio_grain_over_jaxtl"] = {
            f"{g} / {j}": rates[g] / rates[j]
            for g in ("grain processes", "grain threads")
            for j in ("jaxtl threads", "jaxtl processes")
        }
        results[name] = result
        if name == "b":
            for label, processes, threads in (("grain processes", w, 0), ("grain threads", 0, w)):
                resume = check_resume(rows, make_loader("thread"), processes, threads, reference)
                result[f"resume, {label}"] = resume
                print(f"mid-epoch resume, {label}: state after {rows.batches + resume['start_batch']} batches "
                      f"({resume['state_bytes']} bytes of JSON) into a fresh iterator: rest of epoch 1 "
                      f"{resume['grain resumed vs jaxtl']} to jaxtl's epoch(1, start_batch={resume['start_batch']}) "
                      f"(which is {resume['jaxtl epoch(1, start_batch) vs uninterrupted']} to the uninterrupted "
                      "epoch's)")  # fmt: skip

    print("\ngrain's own randomness against jaxtl's:")
    own = grain_own_draws(grain, 300, args.seed)
    for check, same in own.items():
        print(f"  {check}: {'yes' if same else 'no'}")
    print(f"\na truncated JPEG in a generated set's copy (ImageFolder + EvalTransform, in order, batch {args.batch}):")
    bad = check_bad_file(generated, p, args.batch, w, args.seed, Path(scratch.name))
    print(f"  file: {bad['file']}")
    for key, value in bad.items():
        if isinstance(value, dict):
            value = "; ".join(
                f"{k}: {'[the file]' if v == [bad['file']] else v}" for k, v in value.items() if v is not None
            )
        if key != "file":
            print(f"  {key}: {value}")
    scratch.cleanup()
    load = os.getloadavg()
    print(f"\nload average at the end: {load[0]:.1f} (1 min), {load[1]:.1f} (5 min), {load[2]:.1f} (15 min)")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "grain_loader",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "grain": grain.__version__,
            "numpy": np.__version__,
            "batch": args.batch,
            "workers": w,
            "rounds": args.rounds,
            "drain": args.drain,
            "seed": args.seed,
            "cpu": cpu,
            "load_average_end": load,
            "sets": {name: TITLES[name] for name in sets},
            "labels": labels,
            "results": results,
            "grain_own_randomness": own,
            "bad_file": bad,
        }, indent=1) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
