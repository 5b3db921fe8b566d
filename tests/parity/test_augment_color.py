"""jaxtl.data.augment's color operations and RandomErasing against torchvision.transforms.v2 on the same images."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F

from jaxtl.data.augment import color as C
from jaxtl.data.augment import jitter
from jaxtl.data.augment.erasing import erase, sample_erasing

SIZES = [(37, 53), (64, 64), (3, 5)]
FACTORS = [0.0, 0.37, 1.0, 1.6, 2.5]
HUES = [-0.5, -0.23, 0.0, 0.1, 0.5]


def make_images(height, width, seed=0):
    """Uniform noise, a smooth three-channel gradient, and a low-contrast noisy gradient."""
    rng = np.random.default_rng(seed + 1000 * height + width)
    yy, xx = np.mgrid[0:height, 0:width]
    gradient = np.stack(
        [xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1), (xx + yy) * 255 / max(height + width - 2, 1)], -1
    )
    return [
        rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
        np.clip(gradient, 0, 255).astype(np.uint8),
        np.clip(gradient * 0.4 + 60 + rng.normal(0, 3, gradient.shape), 0, 255).astype(np.uint8),
    ]


def all_images():
    return [image for size in SIZES for image in make_images(*size)]


def theirs(function, image, *args):
    """torchvision's function on the (3, H, W) uint8 tensor of an (H, W, 3) array, back as (H, W, 3)."""
    return function(torch.from_numpy(image).permute(2, 0, 1), *args).permute(1, 2, 0).numpy()


def f32(value):
    """A Python float holding a float32 value: torchvision gets the factor jaxtl computes with."""
    return float(np.float32(value))


FACTOR_OPS = {
    "brightness": (C.adjust_brightness, F.adjust_brightness, FACTORS),
    "contrast": (C.adjust_contrast, F.adjust_contrast, FACTORS),
    "saturation": (C.adjust_saturation, F.adjust_saturation, FACTORS),
    "sharpness": (C.adjust_sharpness, F.adjust_sharpness, FACTORS),
    "hue": (C.adjust_hue, F.adjust_hue, HUES),
}


@pytest.mark.parametrize("name", FACTOR_OPS)
def test_factor_ops_equal_torchvision(name):
    ours, reference, values = FACTOR_OPS[name]
    ours = jax.jit(ours)
    for image in all_images():
        for value in values:
            np.testing.assert_array_equal(np.asarray(ours(image, value)), theirs(reference, image, f32(value)))


def test_factor_ops_on_a_224_image_with_random_factors():
    rng = np.random.default_rng(7)
    image = make_images(224, 224)[0]
    for name, (ours, reference, _) in FACTOR_OPS.items():
        low, high = (-0.5, 0.5) if name == "hue" else (0.0, 3.0)
        for value in rng.uniform(low, high, 3):
            np.testing.assert_array_equal(np.asarray(jax.jit(ours)(image, value)), theirs(reference, image, f32(value)))


@pytest.mark.parametrize("name", ["contrast", "saturation", "sharpness"])
def test_blends_with_alpha_equal_torchvision_given_one_plus_magnitude(name):
    # torchvision's auto-augment passes the Python float 1.0 + m; its blend weight 1.0 - (1.0 + m) is then
    # -m exactly, not 1 - float32(1 + m): alpha=-m reproduces it.
    ours, reference, _ = FACTOR_OPS[name]
    ours = jax.jit(ours)
    rng = np.random.default_rng(11)
    magnitudes = np.concatenate([[0.0, 0.03, -0.03, 0.33, -0.99], rng.uniform(-0.99, 0.99, 4)]).astype(np.float32)
    for image in all_images():
        for m in magnitudes:
            expected = theirs(reference, image, 1.0 + float(m))
            np.testing.assert_array_equal(np.asarray(ours(image, np.float32(1.0) + m, alpha=-m)), expected)


def test_contrast_with_alpha_where_the_float32_weight_is_off():
    # Contrast blends with one mean, so the float32 weight 1 - float32(1 + m) rarely moves a value: here it
    # moves two pixels (TrivialAugmentWide's bin 4 of 31, negated).
    image = np.random.default_rng(21).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    m = np.float32(-0.132)
    expected = theirs(F.adjust_contrast, image, 1.0 + float(m))
    ours = jax.jit(C.adjust_contrast)
    assert not np.array_equal(np.asarray(ours(image, np.float32(1.0) + m)), expected)
    np.testing.assert_array_equal(np.asarray(ours(image, np.float32(1.0) + m, alpha=-m)), expected)


def test_grayscale_equals_torchvision_on_every_rgb_triple():
    values = np.arange(256 * 256 * 256, dtype=np.uint32)
    image = np.stack([values >> 16, (values >> 8) & 255, values & 255], -1).astype(np.uint8).reshape(4096, 4096, 3)
    expected = theirs(lambda t: F.rgb_to_grayscale(t, num_output_channels=3), image)
    np.testing.assert_array_equal(np.asarray(jax.jit(C.rgb_to_grayscale)(image)), expected)


def test_product_rounding_is_float32s_under_jit():
    # A multiply feeding an add: XLA would otherwise contract the two into one rounding.
    rng = np.random.default_rng(3)
    a, b, c = (rng.standard_normal(100_000).astype(np.float32) for _ in range(3))
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda a, b, c: C._multiply(a, b) + c)(a, b, c)), a * b + c)


def test_integer_product_rounding_is_float32s_under_jit():
    # _multiply_integer: an integer below 2**12 times any normal float32, correctly rounded even where its
    # result feeds an add that XLA could contract.
    rng = np.random.default_rng(4)
    x = np.concatenate([np.arange(-4095, 4096), rng.integers(-4095, 4096, 91_809)]).astype(np.float32)
    b = np.concatenate([rng.standard_normal(50_000), rng.uniform(-1e4, 1e4, 50_000)]).astype(np.float32)
    b[:4] = [1.0 / 255.0, 0.2989, -0.99, 2.5]
    c = rng.standard_normal(x.size).astype(np.float32)
    ours = jax.jit(lambda x, b, c: C._multiply_integer(x, b) + c)(x, b, c)
    np.testing.assert_array_equal(np.asarray(ours), x * b + c)


def histogram_edge_cases(rng, height, width):
    """(N, H, W, 3) uint8 images whose channels are the cases of equalize's and autocontrast's tables: every
    value present, constant at 0, 255 or in between, exactly 254, 255 and 256 pixels below the maximum (the
    step of 0 and 1), two levels, a narrow range, a histogram skewed to one end."""
    size = height * width

    def channel(kind):
        if kind == "every value":
            return rng.permutation(np.arange(size) % 256)
        if kind in ("constant 0", "constant 255", "constant 77"):
            return np.full(size, int(kind.split()[1]))
        if kind.startswith("below max "):
            below = min(int(kind.split()[-1]), size - 1)
            values = np.full(size, 250)
            values[:below] = rng.integers(0, 250, below)
            return rng.permutation(values)
        if kind == "two levels":
            return rng.choice([3, 254], size)
        if kind == "narrow":
            return rng.integers(100, 104, size)
        return np.minimum(rng.geometric(0.05, size) - 1, 255)  # skewed

    kinds = ["every value", "constant 0", "constant 255", "constant 77", "below max 254", "below max 255"]
    kinds += ["below max 256", "two levels", "narrow", "skewed"]
    images = [np.stack([channel(kinds[(i + c * 3) % len(kinds)]) for c in range(3)], -1) for i in range(len(kinds))]
    images += [rng.integers(0, 256, (size, 3)), rng.integers(0, 256, (size, 3)) // 64 * 64]
    return np.stack(images).reshape(-1, height, width, 3).astype(np.uint8)


@pytest.mark.parametrize("name", ["autocontrast", "equalize"])
@pytest.mark.parametrize("height, width", [(32, 32), (1, 300), (300, 1), (17, 23)])
def test_per_channel_tables_equal_torchvision_on_edge_cases(name, height, width):
    images = histogram_edge_cases(np.random.default_rng(height * 1000 + width), height, width)
    ours = np.asarray(jax.jit(jax.vmap(getattr(C, name)))(images))
    expected = getattr(F, name)(torch.from_numpy(images).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("bits", range(9))
def test_posterize_equals_torchvision(bits):
    for image in all_images():
        np.testing.assert_array_equal(np.asarray(jax.jit(C.posterize)(image, bits)), theirs(F.posterize, image, bits))


@pytest.mark.parametrize("threshold", [0, 1, 127.5, 128, 254, 255])
def test_solarize_equals_torchvision(threshold):
    for image in all_images():
        expected = theirs(F.solarize, image, threshold)
        np.testing.assert_array_equal(np.asarray(jax.jit(C.solarize)(image, threshold)), expected)


@pytest.mark.parametrize("name", ["autocontrast", "equalize", "invert"])
def test_parameterless_ops_equal_torchvision(name):
    ours, reference = getattr(C, name), getattr(F, name)
    constant = np.full((9, 11, 3), 77, dtype=np.uint8)
    one_channel_constant = make_images(37, 53)[0].copy()
    one_channel_constant[..., 1] = 200
    two_levels = np.where(np.arange(37 * 53).reshape(37, 53, 1) % 3 == 0, 10, 240).repeat(3, -1).astype(np.uint8)
    for image in [*all_images(), make_images(224, 224)[1], constant, one_channel_constant, two_levels]:
        np.testing.assert_array_equal(np.asarray(jax.jit(ours)(image)), theirs(reference, image))


BATCHED = [
    (C.adjust_brightness, [0.0, 0.5, 2.5]),
    (C.adjust_contrast, [0.0, 0.5, 2.5]),
    (C.adjust_saturation, [0.0, 0.5, 2.5]),
    (C.adjust_sharpness, [0.0, 0.5, 2.5]),
    (C.adjust_hue, [-0.5, 0.0, 0.3]),
    (C.posterize, [1, 4, 8]),
    (C.solarize, [0.0, 128.0, 255.0]),
    (lambda image, _: C.autocontrast(image), [0, 0, 0]),
    (lambda image, _: C.equalize(image), [0, 0, 0]),
    (lambda image, _: C.invert(image), [0, 0, 0]),
    (lambda image, _: C.rgb_to_grayscale(image), [0, 0, 0]),
]


@pytest.mark.parametrize("index", range(len(BATCHED)))
def test_ops_vmap_under_jit_with_per_sample_parameters(index):
    op, values = BATCHED[index]
    images = np.stack(make_images(37, 53))
    batched = jax.jit(jax.vmap(op))(images, jnp.asarray(values))
    for image, value, result in zip(images, values, batched):
        np.testing.assert_array_equal(np.asarray(result), np.asarray(op(image, value)))


def torchvision_jitter(image, params):
    """torchvision's v2 ColorJitter.transform with the same factors in the same order."""
    functions = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
    output = torch.from_numpy(image).permute(2, 0, 1)
    for op in np.asarray(params.order):
        if bool(params.enabled[op]):
            output = functions[op](output, float(params.factors[op]))
    return output.permute(1, 2, 0).numpy()


@pytest.mark.parametrize(
    "ranges", [dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1), dict(brightness=0.8, hue=0.5)]
)
def test_color_jitter_equals_torchvision_with_the_same_draw(ranges):
    images = np.stack(make_images(37, 53) * 3)
    keys = jax.random.split(jax.random.key(0), len(images))
    params = jax.vmap(lambda key: jitter.sample_color_jitter(key, **ranges))(keys)
    results = jax.jit(jax.vmap(jitter.apply_color_jitter))(images, params)
    for k, image in enumerate(images):
        draw = jax.tree.map(lambda leaf, k=k: leaf[k], params)
        np.testing.assert_array_equal(np.asarray(results[k]), torchvision_jitter(image, draw))
        np.testing.assert_array_equal(np.asarray(jax.jit(jitter.apply_color_jitter)(image, draw)), results[k])


def test_color_jitter_sampling_matches_torchvisions_ranges():
    keys = jax.random.split(jax.random.key(1), 4000)
    draw = jax.jit(jax.vmap(lambda key: jitter.sample_color_jitter(key, brightness=1.5, contrast=(0.2, 0.3), hue=0.25)))
    params = jax.tree.map(np.asarray, draw(keys))
    assert (np.sort(params.order, axis=1) == np.arange(4)).all()
    # Every order is drawn, about equally often (24 permutations).
    counts = np.unique(params.order, axis=0, return_counts=True)[1]
    assert len(counts) == 24 and counts.min() > 4000 / 24 * 0.6
    np.testing.assert_array_equal(params.enabled, np.tile([True, True, False, True], (4000, 1)))
    brightness, contrast, saturation, hue = params.factors.T
    # brightness=1.5: [max(0, 1 - 1.5), 1 + 1.5].
    assert brightness.min() >= 0 and brightness.max() <= 2.5 and brightness.min() < 0.05 and brightness.max() > 2.45
    assert contrast.min() >= np.float32(0.2) and contrast.max() <= np.float32(0.3)
    assert (saturation == 1).all()
    assert hue.min() >= -0.25 and hue.max() <= 0.25 and abs(hue.mean()) < 0.02
    # A range collapsed to the identity is skipped, as torchvision's _check_input makes it None.
    zero = jitter.sample_color_jitter(jax.random.key(2), brightness=0, contrast=(1, 1), saturation=None, hue=0)
    assert not np.asarray(zero.enabled).any()
    image = make_images(37, 53)[0]
    np.testing.assert_array_equal(np.asarray(jitter.apply_color_jitter(image, zero)), image)


@pytest.mark.parametrize("value", [0, 255, (10, 128, 250)])
def test_erase_equals_torchvision(value):
    image = make_images(37, 53)[0]
    erase_jit = jax.jit(erase)
    for top, left, h, w in [(0, 0, 5, 7), (10, 20, 27, 33), (36, 52, 1, 1), (3, 4, 0, 9), (0, 0, 37, 53)]:
        expected = theirs(F.erase, image, top, left, h, w, torch.tensor(value, dtype=torch.float32).reshape(-1, 1, 1))
        np.testing.assert_array_equal(np.asarray(erase_jit(image, top, left, h, w, value)), expected)


@pytest.mark.parametrize("height,width", [(37, 53), (224, 224), (8, 300)])
def test_erasing_boxes_satisfy_torchvisions_constraints(height, width):
    scale, ratio, p, n = (0.02, 0.33), (0.3, 3.3), 0.5, 4000
    keys = jax.random.split(jax.random.key(height * width), n)
    draw = jax.jit(jax.vmap(lambda key: sample_erasing(key, height, width, p=p, scale=scale, ratio=ratio)))
    apply, top, left, h, w = (np.asarray(x) for x in draw(keys))
    # About p of the draws erase (binomial: 4 standard deviations), fewer where boxes can fail to fit.
    assert apply.mean() < p + 4 * math.sqrt(p * (1 - p) / n)
    if height > 20:
        assert abs(apply.mean() - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert (h[~apply] == 0).all() and (w[~apply] == 0).all()
    top, left, h, w = top[apply], left[apply], h[apply], w[apply]
    assert (h < height).all() and (w < width).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    # h and w are sqrt(area * aspect) and sqrt(area / aspect) rounded: area = (h +- 1/2)(w +- 1/2), aspect alike.
    area = height * width
    assert ((h + 0.5) * (w + 0.5) >= scale[0] * area).all() and ((h - 0.5) * (w - 0.5) <= scale[1] * area).all()
    assert ((h + 0.5) / np.maximum(w - 0.5, 1e-9) >= ratio[0]).all()
    assert ((h - 0.5) / (w + 0.5) <= ratio[1]).all()
    # Placement is uniform: every free top row is reachable.
    assert top.max() > 0 and left.max() > 0
    image = make_images(height, width)[0]
    k = int(np.argmax(apply))
    args = [np.asarray(x)[k] for x in draw(keys)][1:]
    expected = theirs(F.erase, image, *(int(a) for a in args), torch.tensor([0.0]).reshape(1, 1, 1))
    np.testing.assert_array_equal(np.asarray(erase(image, *args)), expected)


def test_erasing_gives_up_when_no_box_fits():
    # On a 1x1 image with half of it erased, h = round(sqrt(area * aspect)) >= 1 = height for every aspect in
    # ratio, or w >= 1 = width: no attempt fits, and torchvision erases nothing.
    keys = jax.random.split(jax.random.key(5), 500)
    apply, *_ = jax.vmap(lambda key: sample_erasing(key, 1, 1, p=1.0, scale=(0.5, 1.0)))(keys)
    assert not np.asarray(apply).any()
