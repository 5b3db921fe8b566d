"""jaxtl.data.augment.geometry against torchvision's v2 functional kernels on the same uint8 images."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from grid_rounding import fused_torch_grid  # noqa: F401 (autouse: torchvision's grid as jaxtl rounds it)
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from jaxtl.data.augment import crop, geometry, policies

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


def positions(height, width):
    """Every pixel a distinct colour (its row and column in three bytes), none equal to POSITION_FILL: an
    output equal to another shows that every pixel was read from the same source pixel, or filled."""
    row, column = np.mgrid[0:height, 0:width]
    image = np.stack([row % 256, column % 256, (row // 256) * 16 + column // 256], axis=-1)
    return image.astype(np.uint8)


POSITION_FILL = [0, 0, 255]
GEOMETRIC_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
# The functions the policies run for each op (policies._op_table), with a fill.
POLICY_GEOMETRY = {
    "ShearX": lambda image, m, fill: geometry.shear_x(image, m, fill),
    "ShearY": lambda image, m, fill: geometry.shear_y(image, m, fill),
    "TranslateX": lambda image, m, fill: geometry.translate(image, jnp.trunc(m), 0.0, fill),
    "TranslateY": lambda image, m, fill: geometry.translate(image, 0.0, jnp.trunc(m), fill),
    "Rotate": lambda image, m, fill: geometry.rotate(image, m, fill),
}


def policy_magnitudes(name, height, width):
    """Every magnitude TrivialAugmentWide, RandAugment and AutoAugment can give ``name``: all bins, both signs."""
    values = []
    for space, num_bins in (
        (policies.TRIVIAL_AUGMENT_SPACE, 31),
        (policies.RAND_AUGMENT_SPACE, 31),
        (policies.AUTO_AUGMENT_SPACE, 10),
    ):
        _, magnitudes, _ = policies.magnitude_table(space, num_bins, height, width)
        row = magnitudes[list(space).index(name)]
        values += [row, -row]
    return np.unique(np.concatenate(values))


def torchvision_op(name, image, magnitude):
    """torchvision's auto-augment op ``name`` at ``magnitude`` (the same method in all three policies)."""
    transform = v2.TrivialAugmentWide(fill=POSITION_FILL)
    return to_numpy(
        transform._apply_image_or_video_transform(
            to_torch(image), name, float(magnitude), interpolation=transform.interpolation, fill=transform._fill
        )
    )


@pytest.mark.parametrize("name", GEOMETRIC_OPS)
@pytest.mark.parametrize("height,width", [(224, 224), (37, 53), (53, 37)])
def test_policy_geometric_ops_equal_torchvision_at_every_policy_magnitude(name, height, width):
    image = positions(height, width)
    values = policy_magnitudes(name, height, width)
    fill = jnp.asarray(POSITION_FILL, jnp.uint8)
    ours = jax.jit(jax.vmap(POLICY_GEOMETRY[name], in_axes=(None, 0, None)))(jnp.asarray(image), values, fill)
    for value, out in zip(values, np.asarray(ours)):
        assert np.array_equal(out, torchvision_op(name, image, value)), (name, value)


@pytest.mark.parametrize("height,width", [(224, 224), (37, 53), (53, 37)])
def test_translate_equals_torchvisions_affine(height, width):
    image = positions(height, width)
    rng = np.random.default_rng(height)
    # Whole pixels past both borders, halves (ties), and arbitrary fractions.
    shifts = np.concatenate([np.arange(-width - 2, width + 3, 7), np.arange(-5, 6) + 0.5, rng.uniform(-40, 40, 12)])
    translate = jax.jit(geometry.translate)
    for tx, ty in zip(shifts, np.roll(shifts, 5)):
        tx, ty = float(np.float32(tx)), float(np.float32(ty))
        theirs = to_numpy(F.affine(to_torch(image), 0.0, [tx, ty], 1.0, [0.0, 0.0], fill=POSITION_FILL))
        assert np.array_equal(translate(jnp.asarray(image), tx, ty, jnp.asarray(POSITION_FILL, jnp.uint8)), theirs)


@pytest.mark.parametrize("height,width", [(37, 53), (53, 37)])
def test_shears_equal_torchvision_beyond_the_policy_magnitudes(height, width):
    # Shears of 45 degrees and more put many source columns (rows) exactly on pixel boundaries.
    image = positions(height, width)
    magnitudes = np.concatenate([np.linspace(-3.0, 3.0, 25), [0.5, -0.5, 0.2, 0.1, 1 / 3]]).astype(np.float32)
    fill = jnp.asarray(POSITION_FILL, jnp.uint8)
    for shear, index in ((geometry.shear_x, 0), (geometry.shear_y, 1)):
        ours = np.asarray(jax.jit(jax.vmap(shear, in_axes=(None, 0, None)))(jnp.asarray(image), magnitudes, fill))
        for magnitude, out in zip(magnitudes, ours):
            degrees = [0.0, 0.0]
            degrees[index] = math.degrees(math.atan(float(magnitude)))
            theirs = F.affine(to_torch(image), 0.0, [0, 0], 1.0, degrees, fill=POSITION_FILL, center=[0, 0])
            assert np.array_equal(out, to_numpy(theirs)), (index, magnitude)


@pytest.mark.parametrize("height,width", [(131, 97), (97, 131), (53, 37)])
def test_shears_at_odd_sizes_equal_torchvision(height, width):
    # ATen unnormalises with fma(grid + 1, size / 2, -0.5), rounded once: with size / 2 a half-integer, rounding
    # the product first moved exact ties (26 pixels of ShearX -0.2 at 131x97).
    image = positions(height, width)
    fill = jnp.asarray(POSITION_FILL, jnp.uint8)
    for magnitude in np.float32([-0.28, -0.2, -0.12, 0.12, 0.2, 0.28, 0.792, -0.792]):
        for name, op in (("ShearX", geometry.shear_x), ("ShearY", geometry.shear_y)):
            ours = np.asarray(op(jnp.asarray(image), magnitude, fill))
            assert np.array_equal(ours, torchvision_op(name, image, magnitude)), (name, magnitude)


def test_warps_reject_images_beyond_4096_pixels():
    image = jnp.zeros((4097, 2, 3), jnp.uint8)
    for warp in (geometry.shear_x, geometry.shear_y, geometry.rotate):
        with pytest.raises(ValueError):
            warp(image, 0.1)
    with pytest.raises(ValueError):
        geometry.translate(image, 1.0, 0.0)


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
    resized_crop = jax.jit(crop.resized_crop, static_argnums=7)
    differing, worst = 0.0, 0
    for top, left, crop_h, crop_w, size in CROPS:
        crop_h, crop_w = crop_h or height, crop_w or width
        crop_h, crop_w = min(crop_h, height - top), min(crop_w, width - left)
        theirs = to_numpy(F.resized_crop(to_torch(image), top, left, crop_h, crop_w, [size, size], antialias=True))
        ours = np.asarray(resized_crop(jnp.asarray(canvas), height, width, top, left, crop_h, crop_w, size))
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
        ours = np.asarray(crop.resized_crop(jnp.asarray(image), 300, 260, top, left, crop_h, crop_w, 224))
        diff = np.abs(ours.astype(int) - theirs)
        assert diff.max() <= 1 and (diff > 0).mean() <= 0.01


def test_resized_crop_batches_with_per_sample_boxes():
    canvases = jnp.stack([jnp.asarray(noise(40, 50, s)) for s in range(3)])
    boxes = jnp.array([[0, 0, 40, 50], [5, 6, 20, 33], [10, 1, 9, 12]])
    fn = jax.jit(jax.vmap(lambda c, b: crop.resized_crop(c, 40, 50, b[0], b[1], b[2], b[3], 16)))
    batched = fn(canvases, boxes)
    for k in range(3):
        one = crop.resized_crop(canvases[k], 40, 50, *boxes[k], 16)
        assert np.array_equal(batched[k], one)


def sample_boxes(height, width, count=4000, **kwargs):
    keys = jax.random.split(jax.random.key(0), count)
    fn = jax.jit(jax.vmap(lambda k: crop.sample_random_resized_crop(k, height, width, **kwargs)))
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
    ours = tuple(int(v) for v in crop.sample_random_resized_crop(key, height, width, scale=(1.5, 2.0)))
    from torchvision.transforms.v2 import RandomResizedCrop

    theirs = RandomResizedCrop(8, scale=(1.5, 2.0)).make_params([torch.zeros(3, height, width)])
    assert ours == expected == (theirs["top"], theirs["left"], theirs["height"], theirs["width"])


def test_random_resized_crop_with_traced_image_sizes():
    sizes = jnp.array([[224, 224], [97, 131], [10, 200]])
    keys = jax.random.split(jax.random.key(3), 3)
    fn = jax.jit(jax.vmap(lambda k, s: crop.sample_random_resized_crop(k, s[0], s[1])))
    batched = fn(keys, sizes)
    for k in range(3):
        one = crop.sample_random_resized_crop(keys[k], int(sizes[k, 0]), int(sizes[k, 1]))
        assert tuple(int(b[k]) for b in batched) == tuple(int(v) for v in one)


@pytest.mark.parametrize("height,width", [pytest.param(299, 299, marks=pytest.mark.slow), (160, 213)])
def test_rotations_at_odd_sizes_read_torchvisions_source_pixel_but_for_a_few_neighbours(height, width):
    # torchvision's rotation matrix and jaxtl's differ in the last bit at some angles where a size is odd: at most
    # 8 of 89,401 pixels (0.009%) take a neighbouring source pixel (measured over every policy magnitude).
    image = positions(height, width)
    fill = jnp.asarray(POSITION_FILL, jnp.uint8)

    def source(pixels):  # the row and column each output pixel was read from (positions() encodes them)
        p = pixels.astype(np.int64)
        return p[..., 0] + 256 * (p[..., 2] // 16), p[..., 1] + 256 * (p[..., 2] % 16)

    for magnitude in policy_magnitudes("Rotate", height, width):
        ours = np.asarray(geometry.rotate(jnp.asarray(image), magnitude, fill))
        theirs = torchvision_op("Rotate", image, magnitude)
        differ = (ours != theirs).any(-1)
        assert differ.sum() <= 10, (magnitude, int(differ.sum()))
        filled = (ours == POSITION_FILL).all(-1) | (theirs == POSITION_FILL).all(-1)
        (row, column), (their_row, their_column) = source(ours), source(theirs)
        inner = differ & ~filled
        assert np.all(np.abs(row - their_row)[inner] <= 1) and np.all(np.abs(column - their_column)[inner] <= 1)
