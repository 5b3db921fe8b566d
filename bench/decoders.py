"""JPEG decoders for the decoded cache's build: speed and exactness against PIL, one process, one image at a time.

What the first epoch (the cache's build) does to each image is torchvision's ``pil_loader``
(``Image.open(f).convert("RGB")``) followed by ``Resize(256)`` (shorter side 256, bilinear, antialiased:
``jaxtl.data.transforms.resize``). This times, per image, from the file's bytes in memory:

- ``pil``: that, PIL's full decode + the resize (the reference);
- ``pil no copy``: the same without the copy that ``convert("RGB")`` makes of an image already RGB;
- ``pil draft``: ``image.draft("RGB", size)`` first, asking for the largest DCT scale (1/2, 1/4, 1/8) that
  keeps the shorter side at least 256 (libjpeg's reduced-size decode), then the same resize;
- ``simplejpeg``: ``simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False)``
  (accurate integer DCT, fancy upsampling: PIL's libjpeg settings), ``Image.fromarray``, the same resize;
- ``turbojpeg``: PyTurboJPEG's ``TurboJPEG().decode(data, TJPF_RGB, flags=TJFLAG_ACCURATEDCT)`` (fancy
  upsampling is TurboJPEG's default), then the same; skipped when the system's libturbojpeg is missing.

simplejpeg and PyTurboJPEG are not jaxtl's dependencies: ``pip install simplejpeg PyTurboJPEG`` (and the
system's libturbojpeg) for their rows.

Two sets: the photo set of bench/data_loader.py (``generate_photos(240)``: 1-3 megapixel JPEGs, quality
90) and the generated ImageFolder (``generate_synthetic(train_per_class=60)``: 160-320 pixel JPEGs).
Each image goes through every decoder in turn (decode alone, then decode + resize), after a warm-up
pass that also checks exactness; the tables give the median over rounds of images per second and the
ratio to PIL's. PIL's decode is the RGB PIL image (the cache resizes it as it is); the others' is their
array, which the resize takes through ``Image.fromarray``. Exactness is against PIL on every image:
the decoded arrays (identical images, largest absolute difference; a draft decode smaller than the full
image is not comparable) and the resized 256 arrays (identical images, largest absolute difference, the
fraction of differing values over all images). The decision these figures made is in docs/performance.md.

    python bench/decoders.py [--rounds 3] [--photos-count 240] [--per-class 60] [--json PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import PIL
import PIL.features
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_loader import generate_photos  # noqa: E402

from jaxtl.data import ImageFolder, generate_synthetic  # noqa: E402
from jaxtl.data.transforms import _resample, resize, resized_shorter_side  # noqa: E402

SIZE, INTERPOLATION = 256, "bilinear"  # the eval resize of every torchvision classification weight jaxtl ships


def pil_decode(data: bytes) -> Image.Image:
    """torchvision's pil_loader; the cache resizes this PIL image directly."""
    return Image.open(io.BytesIO(data)).convert("RGB")


def pil_uncopied_decode(data: bytes) -> Image.Image:
    """pil_loader without its copy: ``convert("RGB")`` of an RGB image is ``copy()``; same pixels."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


def pil_draft_decode(data: bytes) -> tuple[np.ndarray, tuple[int, int], tuple[float, float, float, float]]:
    """The reduced decode, the full image's (height, width) and the region of the reduced one it covers."""
    image = Image.open(io.BytesIO(data))
    full = image.height, image.width
    height, width = resized_shorter_side(*full, SIZE)
    _, box = image.draft("RGB", (width, height))  # scale: the largest of 8, 4, 2, 1 not over min(W // w, H // h)
    return image.convert("RGB"), full, box


def draft_resized(decoded) -> np.ndarray:
    """The reduced decode resized to the size the full image resizes to (its box: the reduced image is
    ceil(W / scale) x ceil(H / scale), covering W / scale x H / scale of the full one)."""
    image, full, box = decoded
    height, width = resized_shorter_side(*full, SIZE)
    if (image.height, image.width) == full and (height, width) == full:
        return np.asarray(image)
    return np.asarray(image.resize((width, height), _resample(INTERPOLATION), box=box))


def simplejpeg_decode(data: bytes) -> np.ndarray:
    import simplejpeg

    return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False)


def turbojpeg_decoder():
    """PyTurboJPEG's decode, or the reason it cannot run here."""
    try:
        import turbojpeg

        decoder = turbojpeg.TurboJPEG()
    except Exception as error:  # the module, or the system library it loads
        return None, f"{type(error).__name__}: {error}".splitlines()[0]

    def decode(data: bytes) -> np.ndarray:
        return decoder.decode(data, pixel_format=turbojpeg.TJPF_RGB, flags=turbojpeg.TJFLAG_ACCURATEDCT)

    return decode, None


def resized(decoded: Image.Image | np.ndarray) -> np.ndarray:
    """The cache's resize (``_decode``): a decoder's array goes through ``Image.fromarray`` first."""
    image = decoded if isinstance(decoded, Image.Image) else Image.fromarray(decoded)
    return np.asarray(resize(image, SIZE, INTERPOLATION))


def versions() -> dict:
    found = {
        "pillow": PIL.__version__,
        "pillow_libjpeg_turbo": PIL.features.version("libjpeg_turbo"),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    try:
        import simplejpeg

        found["simplejpeg"] = simplejpeg.__version__
        found["simplejpeg_libjpeg_turbo"] = _bundled_turbo_version(Path(simplejpeg.__file__).parent)
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        found["pyturbojpeg"] = version("PyTurboJPEG")
        found["libturbojpeg"] = _system_turbojpeg_version()
    except Exception:
        pass
    return found


def _bundled_turbo_version(package: Path) -> str | None:
    """The "libjpeg-turbo version X" string inside simplejpeg's extension (it links libjpeg-turbo statically)."""
    import re

    for library in package.glob("*.so"):
        match = re.search(rb"libjpeg-turbo version ([0-9.]+)", library.read_bytes())
        if match:
            return match[1].decode()
    return None


def _system_turbojpeg_version() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "libturbojpeg0"], capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() or None


def measure(name: str, paths: list[str], decoders: dict, rounds: int) -> dict:
    files = [Path(p).read_bytes() for p in paths]
    n = len(files)
    sampling, sizes = {}, []
    for d in files:
        image = Image.open(io.BytesIO(d))
        sizes.append(image.width * image.height / 1e6)
        kind = "progressive" if image.info.get("progressive") else "baseline"
        key = f"{image.mode} {kind} {_sampling(image)}"
        sampling[key] = sampling.get(key, 0) + 1
    megapixels = statistics.median(sizes)

    # Exactness (also the warm-up pass): every image, every decoder, against PIL's full decode and resize.
    reference = [np.asarray(pil_decode(d)) for d in files]
    reference_resized = [resized(a) for a in reference]
    exactness = {}
    for decoder, (decode, resize_decoded) in decoders.items():
        same_decoded = comparable = same_resized = differing = values = 0
        max_decoded = max_resized = 0
        for d, ref, ref_r in zip(files, reference, reference_resized, strict=True):
            decoded = decode(d)
            array = np.asarray(decoded[0] if isinstance(decoded, tuple) else decoded)
            if array.shape == ref.shape:
                comparable += 1
                diff = np.abs(array.astype(np.int16) - ref)
                same_decoded += int(not diff.any())
                max_decoded = max(max_decoded, int(diff.max()))
            r = resize_decoded(decoded)
            diff = np.abs(r.astype(np.int16) - ref_r)
            same_resized += int(not diff.any())
            max_resized = max(max_resized, int(diff.max()))
            differing += int(np.count_nonzero(diff))
            values += diff.size
        exactness[decoder] = {
            "decoded_comparable": comparable,
            "decoded_identical": same_decoded,
            "decoded_max_abs_diff": max_decoded if comparable else None,
            "resized_identical": same_resized,
            "resized_max_abs_diff": max_resized,
            "resized_fraction_differing": differing / values,
        }

    # Each image goes through every decoder in turn, so that a change in the machine's load over a round
    # (other processes) falls on all of them alike; a round's time is the sum over the set.
    times = {f"{decoder} {step}": [] for decoder in decoders for step in ("decode", "decode+resize")}
    for _ in range(rounds):
        total = dict.fromkeys(times, 0.0)
        for d in files:
            for decoder, (decode, resize_decoded) in decoders.items():
                start = time.perf_counter()
                decode(d)
                middle = time.perf_counter()
                resize_decoded(decode(d))
                end = time.perf_counter()
                total[f"{decoder} decode"] += middle - start
                total[f"{decoder} decode+resize"] += end - middle
        for side, seconds in total.items():
            times[side].append(seconds)
    rates = {side: n / statistics.median(ts) for side, ts in times.items()}

    print(f"\n{name}: {n} images, median {megapixels:.2f} MP; " + ", ".join(f"{k}: {v}" for k, v in sampling.items()))
    print(f"{'decoder':<12} {'decode img/s':>13} {'/ pil':>6} {'+resize img/s':>14} {'/ pil':>6}   "
          f"{'decoded ==':>10} {'max':>4}   {'resized ==':>10} {'max':>4} {'differing':>10}")  # fmt: skip
    for decoder in decoders:
        decode_rate, full_rate = rates[f"{decoder} decode"], rates[f"{decoder} decode+resize"]
        e = exactness[decoder]
        if e["decoded_comparable"]:
            decoded = f"{e['decoded_identical']:>4}/{e['decoded_comparable']:<5} {e['decoded_max_abs_diff']:>4}"
        else:
            decoded = f"{'(smaller)':>10} {'-':>4}"
        print(f"{decoder:<12} {decode_rate:>13.1f} {decode_rate / rates['pil decode']:>5.2f}x "
              f"{full_rate:>14.1f} {full_rate / rates['pil decode+resize']:>5.2f}x   {decoded}   "
              f"{e['resized_identical']:>4}/{n:<5} {e['resized_max_abs_diff']:>4} "
              f"{e['resized_fraction_differing']:>10.2%}")  # fmt: skip
    return {
        "images": n,
        "median_megapixels": megapixels,
        "jpeg_kinds": sampling,
        "seconds": times,
        "images_per_second": rates,
        "ratio_over_pil": {
            side: rate / rates["pil decode" if side.endswith(" decode") else "pil decode+resize"]
            for side, rate in rates.items()
        },
        "exactness": exactness,
    }


def _sampling(image: Image.Image) -> str:
    from PIL import JpegImagePlugin

    return {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}.get(JpegImagePlugin.get_sampling(image), "other")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--photos-count", type=int, default=240, help="images of the photo set")
    parser.add_argument("--per-class", type=int, default=60, help="train images per class of the generated set")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    decoders = {
        "pil": (pil_decode, resized),
        "pil no copy": (pil_uncopied_decode, resized),
        "pil draft": (pil_draft_decode, draft_resized),
    }
    try:
        import simplejpeg  # noqa: F401

        decoders["simplejpeg"] = (simplejpeg_decode, resized)
    except ImportError:
        print("simplejpeg skipped: not installed (pip install simplejpeg)")
    turbo, why_not = turbojpeg_decoder()
    if turbo is not None:
        decoders["turbojpeg"] = (turbo, resized)
    found = versions()
    print(f"one process, one image at a time, from bytes in memory; resize to {SIZE} ({INTERPOLATION}, antialias); "
          f"{args.rounds} rounds; {platform.processor() or platform.machine()}")  # fmt: skip
    print(", ".join(f"{k} {v}" for k, v in found.items()))
    if why_not:
        print(f"turbojpeg skipped: {why_not}")
    print("decoded/resized ==: images bit-identical to PIL's full decode / PIL's decode + resize; max: largest "
          "absolute difference; differing: fraction of the resized values that differ")  # fmt: skip

    sets = {
        "photos": ImageFolder(generate_photos(args.photos_count) / "train"),
        "generated": ImageFolder(generate_synthetic(train_per_class=args.per_class) / "train"),
    }
    results = {}
    for name, folder in sets.items():
        results[name] = measure(f"{name} ({folder.root})", [p for p, _ in folder.samples], decoders, args.rounds)
    result = {
        "benchmark": "decoders",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "rounds": args.rounds,
        "resize": {"size": SIZE, "interpolation": INTERPOLATION, "antialias": True},
        "versions": found,
        "turbojpeg_skipped": why_not,
        "sets": results,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
