"""jaxtl.data.augment.geometry against torchvision's v2 functional kernels on the same uint8 images."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as F

from jaxtl.data.augment import geometry

SIZES = [(37, 53), (97, 131), (224, 224)]
# Pixels whose nearest source may land on the other side of a float32 tie than torch's. Measured: none,
# on these sizes and parameters (the grid is computed with torch's float32 operations and roundings).
NEAREST_MISMATCH_BOUND = 1e-3


def noise(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def gradient(height, width):
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1), 127 + 0 * x], axis=-1)
    return image.round().astype(np.uint8)


def images():
    for height, width in SIZES:
        yield noise(height, width, height), f"noise{height}x{width}"
        yield gradient(height, width), f"gradient{height}x{width}"


def to_torch(image):
    return torch.from_numpy(image).permute(2, 0, 1).contiguous()


def to_numpy(tensor):
    return tensor.permute(1, 2, 0).numpy()


def mismatch(ours, theirs):
    """Fraction of pixels with any channel different."""
    return float((np.asarray(ours) != theirs).any(-1).mean())


def test_hflip_equals_torchvision_and_batches():
    image = noise(37, 53)
    assert np.array_equal(
        np.asarray(geometry.hflip(jnp.asarray(image), True)), to_numpy(F.horizontal_flip(to_torch(image)))
    )
    assert np.array_equal(np.asarray(geometry.hflip(jnp.asarray(image), False)), image)
    batch = jnp.stack([jnp.asarray(noise(37, 53, s)) for s in range(4)])
    flags = jnp.array([True, False, False, True])
    batched = jax.jit(jax.vmap(geometry.hflip))(batch, flags)
    for k in range(4):
        assert np.array_equal(batched[k], geometry.hflip(batch[k], flags[k]))


AFFINE_CASES = [
    # angle, tx, ty, shear_x, shear_y, fill
    (10.0, 3.0, -4.0, 5.0, 7.0, 0),
    (0.0, 0.0, 0.0, 15.0, 0.0, 0),
    (0.0, 12.7, -3.2, 0.0, 0.0, 0),
    (-33.3, 0.0, 0.0, 0.0, -20.0, 128),
    (90.0, 1.0, 1.0, 0.0, 0.0, 255),
    (180.0, 0.0, 0.0, 0.0, 0.0, 0),
    (30.0, 0.0, 0.0, 0.0, 0.0, 0),
    (-135.0, -7.0, 2.0, 3.0, -3.0, 17),
]


@pytest.mark.parametrize("height,width", SIZES)
def test_affine_nearest_equals_torchvision(height, width):
    fn = jax.jit(geometry.affine)
    worst = 0.0
    for image in (noise(height, width, 1), gradient(height, width)):
        for angle, tx, ty, sx, sy, fill in AFFINE_CASES:
            theirs = F.affine(to_torch(image), angle, [tx, ty], 1.0, [sx, sy], fill=fill)
            ours = fn(jnp.asarray(image), angle, tx, ty, sx, sy, fill)
            worst = max(worst, mismatch(ours, to_numpy(theirs)))
    assert worst <= NEAREST_MISMATCH_BOUND


@pytest.mark.parametrize("height,width", SIZES)
def test_affine_with_a_corner_pivot_equals_torchvision(height, width):
    image = noise(height, width, 2)
    theirs = F.affine(to_torch(image), 12.0, [2.0, -1.0], 1.0, [8.0, -4.0], center=[0, 0])
    ours = geometry.affine(jnp.asarray(image), 12.0, 2.0, -1.0, 8.0, -4.0, center=(0.0, 0.0))
    assert mismatch(ours, to_numpy(theirs)) <= NEAREST_MISMATCH_BOUND


ROTATIONS = [0.0, 4.5, -4.5, 30.0, -30.0, 10.0 / 3.0, 89.0, 90.0, -90.0, 135.0, -135.0, 180.0, 270.0, 359.0]


@pytest.mark.parametrize("height,width", SIZES)
def test_rotate_nearest_equals_torchvision(height, width):
    rotate = jax.jit(geometry.rotate)
    worst = 0.0
    for image in (noise(height, width, 3), gradient(height, width)):
        for angle in ROTATIONS:
            angle = float(np.float32(angle))  # what a float32 magnitude table hands torchvision
            theirs = to_numpy(F.rotate(to_torch(image), angle))
            worst = max(worst, mismatch(rotate(jnp.asarray(image), angle), theirs))
    assert worst <= NEAREST_MISMATCH_BOUND


@pytest.mark.parametrize("height,width", SIZES)
def test_shears_equal_torchvisions_corner_pivot_affine(height, width):
    image = noise(height, width, 4)
    shear_x, shear_y = jax.jit(geometry.shear_x), jax.jit(geometry.shear_y)
    worst = 0.0
    for magnitude in np.linspace(-0.99, 0.99, 23, dtype=np.float32):
        degrees = math.degrees(math.atan(float(magnitude)))
        theirs_x = F.affine(to_torch(image), 0.0, [0, 0], 1.0, [degrees, 0.0], center=[0, 0])
        theirs_y = F.affine(to_torch(image), 0.0, [0, 0], 1.0, [0.0, degrees], center=[0, 0])
        worst = max(worst, mismatch(shear_x(jnp.asarray(image), magnitude), to_numpy(theirs_x)))
        worst = max(worst, mismatch(shear_y(jnp.asarray(image), magnitude), to_numpy(theirs_y)))
    assert worst <= NEAREST_MISMATCH_BOUND


def test_affine_and_rotate_batch_with_per_sample_parameters():
    batch = jnp.stack([jnp.asarray(noise(37, 53, s)) for s in range(4)])
    angles = jnp.array([0.0, 30.0, -45.0, 90.0])
    shifts = jnp.array([0.0, 3.0, -5.0, 1.5])
    shears = jnp.array([0.0, 10.0, -5.0, 2.0])
    affine = jax.jit(jax.vmap(lambda im, a, t, s: geometry.affine(im, a, t, -t, s, -s)))(batch, angles, shifts, shears)
    rotate = jax.jit(jax.vmap(geometry.rotate))(batch, angles)
    for k in range(4):
        one = geometry.affine(batch[k], angles[k], shifts[k], -shifts[k], shears[k], -shears[k])
        assert np.array_equal(affine[k], one)
        assert np.array_equal(rotate[k], geometry.rotate(batch[k], angles[k]))


CROPS = [
    # top, left, crop_h, crop_w, size: downscale, upscale, mixed, identity-sized, whole image.
    (3, 5, 30, 40, 16),
    (1, 2, 20, 30, 64),
    (0, 7, 30, 17, 24),
    (2, 3, 24, 24, 24),
    (0, 0, None, None, 32),
]


@pytest.mark.parametrize("image,name", list(images()), ids=lambda v: v if isinstance(v, str) else "")
def test_resized_crop_equals_torchvision(image, name):
    height, width = image.shape[:2]
    # The image at the top-left of a larger zero canvas, as the data pipeline ships it.
    canvas = np.zeros((height + 11, width + 6, 3), np.uint8)
    canvas[:height, :width] = image
    crop = jax.jit(geometry.resized_crop, static_argnums=7)
    differing, worst = 0.0, 0
    for top, left, crop_h, crop_w, size in CROPS:
        crop_h, crop_w = crop_h or height, crop_w or width
        crop_h, crop_w = min(crop_h, height - top), min(crop_w, width - left)
        theirs = to_numpy(F.resized_crop(to_torch(image), top, left, crop_h, crop_w, [size, size], antialias=True))
        ours = np.asarray(crop(jnp.asarray(canvas), height, width, top, left, crop_h, crop_w, size))
        diff = np.abs(ours.astype(int) - theirs)
        differing, worst = max(differing, float((diff > 0).mean())), max(worst, int(diff.max()))
    # Measured: identical (ATen's fixed-point weights reproduced; float32 weights could round an int16
    # weight differently from torch's float64 ones, moving a value by 1).
    assert worst <= 1
    assert differing <= 0.01


def test_resized_crop_224_from_a_large_box_equals_torchvision():
    image = noise(300, 260, 9)
    for top, left, crop_h, crop_w in [(10, 20, 250, 200), (100, 100, 60, 90), (0, 0, 300, 260)]:
        theirs = to_numpy(F.resized_crop(to_torch(image), top, left, crop_h, crop_w, [224, 224], antialias=True))
        ours = np.asarray(geometry.resized_crop(jnp.asarray(image), 300, 260, top, left, crop_h, crop_w, 224))
        diff = np.abs(ours.astype(int) - theirs)
        assert diff.max() <= 1 and (diff > 0).mean() <= 0.01


def test_resized_crop_batches_with_per_sample_boxes():
    canvases = jnp.stack([jnp.asarray(noise(40, 50, s)) for s in range(3)])
    boxes = jnp.array([[0, 0, 40, 50], [5, 6, 20, 33], [10, 1, 9, 12]])
    fn = jax.jit(jax.vmap(lambda c, b: geometry.resized_crop(c, 40, 50, b[0], b[1], b[2], b[3], 16)))
    batched = fn(canvases, boxes)
    for k in range(3):
        one = geometry.resized_crop(canvases[k], 40, 50, *boxes[k], 16)
        assert np.array_equal(batched[k], one)


def sample_boxes(height, width, count=4000, **kwargs):
    keys = jax.random.split(jax.random.key(0), count)
    fn = jax.jit(jax.vmap(lambda k: geometry.sample_random_resized_crop(k, height, width, **kwargs)))
    return [np.asarray(v) for v in fn(keys)]


@pytest.mark.parametrize("height,width", [(224, 224), (97, 131), (375, 500)])
def test_random_resized_crop_boxes_fit_and_follow_the_bounds(height, width):
    top, left, crop_h, crop_w = sample_boxes(height, width)
    assert (top >= 0).all() and (left >= 0).all() and (crop_h >= 1).all() and (crop_w >= 1).all()
    assert (top + crop_h <= height).all() and (left + crop_w <= width).all()
    area = crop_h * crop_w / (height * width)
    ratio = crop_w / crop_h
    # Rounded sides stretch the bounds by at most a pixel on each side.
    slack_area = (crop_h + crop_w + 1) / (height * width)
    assert (area >= 0.08 - slack_area).all() and (area <= 1.0 + 1e-9).all()
    # Boxes that hit the image's border (where torchvision also clips) may leave the ratio range; the rest not.
    inner = (crop_h < height) & (crop_w < width)
    slack_ratio = 1.0 / np.minimum(crop_h, crop_w)
    assert (ratio[inner] >= 0.75 * (1 - slack_ratio[inner]) - 1e-6).all()
    assert (ratio[inner] <= 4 / 3 * (1 + slack_ratio[inner]) + 1e-6).all()
    # Sane distribution: the mean area of an accepted box under uniform scale in [0.08, 1] is about 0.5,
    # a little less because large boxes with extreme ratios are rejected; positions spread over the image.
    assert 0.35 < area.mean() < 0.6
    assert np.log(ratio).std() > 0.1
    assert len(np.unique(top)) > 10 and len(np.unique(left)) > 10


def test_random_resized_crop_matches_torchvision_distribution():
    """Same algorithm, different random streams: the box statistics agree with torchvision's draws."""
    from torchvision.transforms.v2 import RandomResizedCrop

    height, width = 97, 131
    torch.manual_seed(0)
    transform = RandomResizedCrop(32)
    theirs = np.array([list(transform.make_params([torch.zeros(3, height, width)]).values()) for _ in range(4000)])
    top, left, crop_h, crop_w = sample_boxes(height, width)
    for ours, col in [(crop_h, 2), (crop_w, 3), (top, 0), (left, 1)]:
        assert abs(ours.mean() - theirs[:, col].mean()) < 0.05 * theirs[:, col].mean() + 1.0
        assert abs(ours.std() - theirs[:, col].std()) < 0.1 * theirs[:, col].std() + 1.0


@pytest.mark.parametrize(
    "height,width,expected",
    [
        (10, 200, (0, 93, 10, 13)),  # too wide: h = height, w = round(h * 4 / 3)
        (200, 10, (93, 0, 13, 10)),  # too tall: w = width, h = round(w / (3 / 4))
        (50, 60, (0, 0, 50, 60)),  # ratio inside the bounds: the whole image
    ],
)
def test_random_resized_crop_falls_back_to_torchvisions_center_crop(height, width, expected):
    # A scale no box can meet (more than the whole image) makes every attempt fail, as in torchvision.
    key = jax.random.key(1)
    ours = tuple(int(v) for v in geometry.sample_random_resized_crop(key, height, width, scale=(1.5, 2.0)))
    from torchvision.transforms.v2 import RandomResizedCrop

    theirs = RandomResizedCrop(8, scale=(1.5, 2.0)).make_params([torch.zeros(3, height, width)])
    assert ours == expected == (theirs["top"], theirs["left"], theirs["height"], theirs["width"])


def test_random_resized_crop_with_traced_image_sizes():
    sizes = jnp.array([[224, 224], [97, 131], [10, 200]])
    keys = jax.random.split(jax.random.key(3), 3)
    fn = jax.jit(jax.vmap(lambda k, s: geometry.sample_random_resized_crop(k, s[0], s[1])))
    batched = fn(keys, sizes)
    for k in range(3):
        one = geometry.sample_random_resized_crop(keys[k], int(sizes[k, 0]), int(sizes[k, 1]))
        assert tuple(int(b[k]) for b in batched) == tuple(int(v) for v in one)
