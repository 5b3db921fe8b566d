"""jaxtl.data.augment.policies against torchvision v2's TrivialAugmentWide, RandAugment and AutoAugment."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from grid_rounding import fused_torch_grid  # noqa: F401 (autouse: torchvision's grid as jaxtl rounds it)
from torchvision.transforms import v2

from jaxtl.data.augment import policies

SPACES = [
    (v2.TrivialAugmentWide, policies.TRIVIAL_AUGMENT_SPACE, 31),
    (v2.RandAugment, policies.RAND_AUGMENT_SPACE, 31),
    (v2.AutoAugment, policies.AUTO_AUGMENT_SPACE, 10),
]
# Ops whose torchvision factor is the Python float 1.0 + magnitude.
FACTOR_OPS = ("Brightness", "Color", "Contrast", "Sharpness")


def noise(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def to_numpy(tensor):
    return tensor.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("cls,space,num_bins", SPACES, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("height,width", [(37, 53), (97, 131)])
def test_magnitude_tables_equal_torchvisions(cls, space, num_bins, height, width):
    ops, magnitudes, signed = policies.magnitude_table(space, num_bins, height, width)
    assert list(space) == list(cls._AUGMENTATION_SPACE)
    for k, (name, (bins, is_signed)) in enumerate(cls._AUGMENTATION_SPACE.items()):
        assert policies.OPS[ops[k]] == name and signed[k] == is_signed
        theirs = bins(num_bins, height, width)
        expected = np.zeros(num_bins, np.float32) if theirs is None else theirs.numpy().astype(np.float32)
        assert np.array_equal(magnitudes[k], expected), name


@pytest.mark.parametrize("cls,space,num_bins", SPACES, ids=lambda v: getattr(v, "__name__", ""))
def test_every_op_equals_torchvisions_at_every_magnitude(cls, space, num_bins):
    height, width = 37, 53
    image = noise(height, width, 5)
    tensor = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    transform = cls()
    ops, magnitudes, signed = policies.magnitude_table(space, num_bins, height, width)
    apply = jax.jit(jax.vmap(policies.apply_op, in_axes=(None, 0, 0)))
    report = {}
    for k, name in enumerate(space):
        values = magnitudes[k][:1] if name in ("Identity", "AutoContrast", "Equalize", "Invert") else magnitudes[k]
        values = np.concatenate([values, -values]) if signed[k] else values
        ours = np.asarray(apply(jnp.asarray(image), np.full(len(values), ops[k]), values))
        differing, worst = 0.0, 0
        for value, out in zip(values, ours):
            theirs = to_numpy(
                transform._apply_image_or_video_transform(
                    tensor, name, float(value), interpolation=transform.interpolation, fill=transform._fill
                )
            )
            diff = np.abs(out.astype(int) - theirs)
            differing, worst = max(differing, float((diff > 0).any(-1).mean())), max(worst, int(diff.max()))
        report[name] = (differing, worst)
    for name, (differing, worst) in report.items():
        assert worst == 0, (name, differing, worst)


@pytest.mark.parametrize("cls,space,num_bins", SPACES, ids=lambda v: getattr(v, "__name__", ""))
def test_blend_weight_minus_magnitude_is_torchvisions(cls, space, num_bins):
    # apply_op passes the blends alpha = -magnitude for torchvision's 1.0 - (1.0 + magnitude) in float64:
    # the same number only where 1.0 + magnitude is exact in float64, and it rounds to float32's 1 + m.
    ops, magnitudes, signed = policies.magnitude_table(space, num_bins, 0, 0)
    for k, name in enumerate(space):
        if name in FACTOR_OPS:
            for m in np.concatenate([magnitudes[k], -magnitudes[k]]):
                factor = 1.0 + float(m)
                assert 1.0 - factor == -float(m), (name, m)
                assert np.float32(factor) == np.float32(1.0) + m, (name, m)


def test_trivial_augment_draws_ops_and_bins_uniformly_with_random_signs():
    count = 28000
    keys = jax.random.split(jax.random.key(0), count)
    op_index, magnitude = (np.asarray(v) for v in jax.jit(jax.vmap(policies.sample_trivial_augment))(keys))
    ops, magnitudes, signed = policies.magnitude_table(policies.TRIVIAL_AUGMENT_SPACE, 31, 0, 0)
    counts = collections.Counter(op_index.tolist())
    assert set(counts) == set(ops.tolist())
    expected = count / len(ops)
    assert all(abs(c - expected) < 5 * np.sqrt(expected) for c in counts.values())
    for k, op in enumerate(ops):
        drawn = magnitude[op_index == op]
        assert np.isin(np.abs(drawn), np.abs(magnitudes[k])).all()
        if magnitudes[k].any():
            bins = np.searchsorted(np.sort(np.unique(np.abs(magnitudes[k]))), np.abs(drawn))
            assert len(np.unique(bins)) == len(np.unique(np.abs(magnitudes[k])))
        if signed[k]:
            assert 0.4 < (drawn < 0).mean() < 0.6
        else:
            assert (drawn >= 0).all()


def test_rand_augment_draws_num_ops_at_the_fixed_bin():
    height, width = 224, 224
    count = 15000
    keys = jax.random.split(jax.random.key(1), count)
    fn = jax.jit(jax.vmap(lambda k: policies.sample_rand_augment(k, height, width)))
    op_index, magnitude = (np.asarray(v) for v in fn(keys))
    assert op_index.shape == (count, 2) and magnitude.shape == (count, 2)
    ops, magnitudes, signed = policies.magnitude_table(policies.RAND_AUGMENT_SPACE, 31, height, width)
    counts = collections.Counter(op_index.ravel().tolist())
    expected = 2 * count / len(ops)
    assert set(counts) == set(ops.tolist())
    assert all(abs(c - expected) < 5 * np.sqrt(expected) for c in counts.values())
    # The two draws are independent.
    assert 0.05 < (op_index[:, 0] == op_index[:, 1]).mean() < 0.10
    for k, op in enumerate(ops):
        drawn = magnitude[op_index == op]
        assert np.isin(drawn, [magnitudes[k, 9], -magnitudes[k, 9]]).all()
        if signed[k]:
            assert 0.4 < (drawn < 0).mean() < 0.6


def test_auto_augment_follows_the_imagenet_sub_policies():
    count = 40000
    keys = jax.random.split(jax.random.key(2), count)
    op_index, magnitude = (np.asarray(v) for v in jax.jit(jax.vmap(policies.sample_auto_augment))(keys))
    assert [list(p) for p in policies.IMAGENET_POLICY] == [list(p) for p in v2.AutoAugment()._policies]
    space = v2.AutoAugment._AUGMENTATION_SPACE
    for position in range(2):
        expected = collections.Counter()
        for pair in policies.IMAGENET_POLICY:
            name, probability, _ = pair[position]
            expected[name] += probability / len(policies.IMAGENET_POLICY)
            expected["Identity"] += (1 - probability) / len(policies.IMAGENET_POLICY)
        observed = collections.Counter(policies.OPS[i] for i in op_index[:, position])
        for name, p in expected.items():
            assert abs(observed[name] / count - p) < 5 * np.sqrt(p * (1 - p) / count) + 1e-9, (position, name)
        # Every magnitude is one the policy can give that op: its bin of 10, either sign where signed.
        allowed = collections.defaultdict(set)
        for pair in policies.IMAGENET_POLICY:
            name, _, bin_index = pair[position]
            bins, is_signed = space[name]
            table = bins(10, 0, 0)
            value = 0.0 if table is None else float(table[bin_index])
            allowed[name] |= {np.float32(value), np.float32(-value if is_signed else value)}
        allowed["Identity"] = {np.float32(0.0)}
        for i, value in zip(op_index[:, position], magnitude[:, position]):
            assert np.float32(value) in allowed[policies.OPS[i]]


@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment", "autoaugment"])
def test_policies_batch_with_per_sample_draws(policy):
    batch = jnp.stack([jnp.asarray(noise(32, 32, s)) for s in range(3)])
    keys = jax.random.split(jax.random.key(4), 3)
    batched = jax.jit(jax.vmap(lambda k, im: policies.apply_policy(policy, k, im)))(keys, batch)
    for k in range(3):
        assert np.array_equal(batched[k], jax.jit(policies.apply_policy, static_argnums=0)(policy, keys[k], batch[k]))


def test_rand_augment_applies_its_ops_in_order():
    image = noise(32, 32, 7)
    tensor = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    transform = v2.RandAugment()
    names = ["Rotate", "Posterize"]
    values = np.array([-9.0, 6.0], np.float32)
    ours = policies.apply_ops(jnp.asarray(image), jnp.array([policies.OPS.index(n) for n in names]), values)
    theirs = tensor
    for name, value in zip(names, values):
        theirs = transform._apply_image_or_video_transform(
            theirs, name, float(value), interpolation=transform.interpolation, fill=transform._fill
        )
    assert np.array_equal(np.asarray(ours), to_numpy(theirs))
