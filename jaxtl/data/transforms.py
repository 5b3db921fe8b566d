"""Image transforms that compute what torchvision's compute, on PIL images, without torch.

The eval transform is torchvision's ``ImageClassification`` preset (what ``weights.transforms()``
returns): resize the shorter side with PIL (always antialiased for PIL input), center crop (zero
padding when the image is smaller than the crop), scale to [0, 1], normalise. The train transform
is ``RandomResizedCrop`` + ``RandomHorizontalFlip`` with torchvision's sampling algorithm, driven by
an explicit numpy generator so that a (seed, epoch, index) always gives the same crop.

Transforms return uint8 (H, W, 3) arrays; :func:`normalize` turns a batch of them into the float32
input the model expects. The loader ships uint8 (4x fewer bytes to copy) and normalises on the
device; ``EvalTransform.normalized`` does both on the host for checks and single images.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from jaxtl.weights import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

# torchvision's InterpolationMode -> PIL resample (torchvision.transforms.functional.pil_modes_mapping).
PIL_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


def _resample(interpolation: str) -> Image.Resampling:
    try:
        return PIL_INTERPOLATION[interpolation]
    except KeyError:
        raise ValueError(f"interpolation {interpolation!r} is not one of {', '.join(PIL_INTERPOLATION)}") from None


def resized_shorter_side(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after resizing the shorter side to ``size`` (torchvision's rounding: int())."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def resize(image: Image.Image, size: int, interpolation: str) -> Image.Image:
    """torchvision ``F.resize(image, [size])`` on a PIL image."""
    height, width = image.height, image.width
    new_height, new_width = resized_shorter_side(height, width, size)
    if (new_height, new_width) == (height, width):
        return image
    return image.resize((new_width, new_height), _resample(interpolation))


def center_crop(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torchvision ``F.center_crop`` on an (H, W, C) array, zero-padding an image smaller than the crop."""
    crop_h, crop_w = size
    height, width = array.shape[:2]
    if crop_h > height or crop_w > width:
        pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
        array = np.pad(array, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
        height, width = array.shape[:2]
    top = int(round((height - crop_h) / 2.0))
    left = int(round((width - crop_w) / 2.0))
    return array[top : top + crop_h, left : left + crop_w]


def normalize(batch, mean=IMAGENET_MEAN, std=IMAGENET_STD, xp=np):
    """uint8 (..., H, W, 3) -> float32 ``(x / 255 - mean) / std``, in torchvision's order of operations.

    ``xp`` is ``numpy`` or ``jax.numpy``; with jax inside jit the result is within 1 ulp of numpy's.
    """
    x = batch.astype(xp.float32) / xp.float32(255.0)
    return (x - xp.asarray(mean, xp.float32)) / xp.asarray(std, xp.float32)


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """The eval preprocessing of a weight spec: never random.

    ``transform(image)`` gives the uint8 crop; ``transform.normalized(image)`` the float32 (H, W, 3)
    array that equals ``weights.transforms()(image)`` (C, H, W) transposed.
    """

    preprocessing: Preprocessing
    is_random = False

    @property
    def output_size(self) -> tuple[int, int]:
        return (self.preprocessing.crop_size, self.preprocessing.crop_size)

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        p = self.preprocessing
        resized = resize(image, p.resize_size, p.interpolation)
        return center_crop(np.asarray(resized), self.output_size)

    def normalized(self, image: Image.Image) -> np.ndarray:
        return normalize(self(image), self.preprocessing.mean, self.preprocessing.std)


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """``RandomResizedCrop(crop_size, scale, ratio)`` + ``RandomHorizontalFlip(flip_p)``.

    With ``random_resized_crop=False`` the crop is the eval transform's (the recipe's default: no
    augmentation); with ``flip_p=0`` there is no flip. Randomness comes only from the generator
    passed in, so the loader can make it a function of (seed, epoch, index).
    """

    preprocessing: Preprocessing
    random_resized_crop: bool = False
    flip_p: float = 0.0
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)

    def __post_init__(self):
        if not 0.0 <= self.flip_p <= 1.0:
            raise ValueError(f"flip_p={self.flip_p} is not a probability in [0, 1]")
        if not (0.0 < self.scale[0] <= self.scale[1] <= 1.0):
            raise ValueError(f"scale={self.scale} must satisfy 0 < min <= max <= 1")
        if not (0.0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"ratio={self.ratio} must satisfy 0 < min <= max")

    @property
    def output_size(self) -> tuple[int, int]:
        return (self.preprocessing.crop_size, self.preprocessing.crop_size)

    @property
    def is_random(self) -> bool:
        return self.random_resized_crop or self.flip_p > 0

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        if not self.is_random:
            return EvalTransform(self.preprocessing)(image)
        if rng is None:
            raise ValueError("a random train transform needs a numpy Generator")
        if self.random_resized_crop:
            top, left, height, width = random_resized_crop_params(
                image.height, image.width, self.scale, self.ratio, rng
            )
            image = image.crop((left, top, left + width, top + height))
            size = self.output_size
            if (image.height, image.width) != size:
                image = image.resize(size[::-1], _resample(self.preprocessing.interpolation))
            array = np.asarray(image)
        else:
            array = EvalTransform(self.preprocessing)(image)
        if self.flip_p > 0 and rng.random() < self.flip_p:
            array = array[:, ::-1]
        return np.ascontiguousarray(array)


def random_resized_crop_params(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """(top, left, height, width) as torchvision's ``RandomResizedCrop.get_params`` draws them."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w
