"""Mixup and CutMix against torchvision.transforms.v2.MixUp / CutMix for the same lambda, centre and pairing,
and the soft-target loss against torch's cross-entropy and timm's mixing of smoothed targets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from jaxtl.data.augment.mixing import Mixing, MixParams, apply, cutmix_box, draw, partners
from jaxtl.train.losses import cross_entropy

B, H, W, C = 6, 13, 17, 5


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(B, H, W, 3)).astype(np.float32)
    labels = rng.integers(0, C, size=B).astype(np.int32)
    return images, labels


def _torch_call(transform, params, images, labels):
    """torchvision's transform of an NCHW batch and its labels with the given parameters."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(labels).long()
    params = {"labels": y, "batch_size": B, **params}
    mixed = transform.transform(x, params).permute(0, 2, 3, 1).numpy()
    return mixed, transform.transform(y, params).numpy()


def _params(lam, box=(0, 0, 0, 0), cutmix=False):
    return MixParams(jnp.asarray(True), jnp.asarray(cutmix), jnp.float32(lam), jnp.asarray(box, jnp.int32))


@pytest.mark.parametrize("lam", [0.0, 0.3172, 0.5, 0.9])
def test_mixup_equals_torchvision_for_the_same_lambda(lam):
    images, labels = _batch()
    ours, targets = apply(_params(lam), jnp.asarray(images), jnp.asarray(labels), jnp.ones(B, bool), C)
    theirs, theirs_targets = _torch_call(v2.MixUp(alpha=1.0, num_classes=C), {"lam": lam}, images, labels)
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(targets), theirs_targets, rtol=0, atol=1e-7)


@pytest.mark.parametrize("seed", range(8))
def test_cutmix_box_and_corrected_lambda_equal_torchvisions(monkeypatch, seed):
    """torchvision's make_params with its random draws replaced by ours gives our box and corrected lambda."""
    rng = np.random.default_rng(seed)
    lam, r_x, r_y = float(rng.uniform()), int(rng.integers(W)), int(rng.integers(H))
    transform = v2.CutMix(alpha=1.0, num_classes=C)
    monkeypatch.setattr(transform._dist, "sample", lambda shape=(): torch.tensor(lam))
    draws = iter([torch.tensor([r_x]), torch.tensor([r_y])])
    monkeypatch.setattr(torch, "randint", lambda high, size: next(draws))
    expected = transform.make_params([torch.zeros(B, 3, H, W)])
    box, corrected = cutmix_box(jnp.float32(lam), r_x, r_y, H, W)
    y1, y2, x1, x2 = (int(v) for v in box)
    assert (x1, y1, x2, y2) == expected["box"]
    assert float(corrected) == pytest.approx(expected["lam_adjusted"], abs=1e-7)


def test_cutmix_pastes_the_box_of_the_previous_row_as_torchvision_does():
    images, labels = _batch(1)
    box, corrected = cutmix_box(jnp.float32(0.41), 9, 4, H, W)
    y1, y2, x1, x2 = (int(v) for v in box)
    ours, targets = apply(
        _params(corrected, box, cutmix=True), jnp.asarray(images), jnp.asarray(labels), jnp.ones(B, bool), C
    )
    params = {"box": (x1, y1, x2, y2), "lam_adjusted": float(corrected)}
    theirs, theirs_targets = _torch_call(v2.CutMix(alpha=1.0, num_classes=C), params, images, labels)
    np.testing.assert_array_equal(np.asarray(ours), theirs)
    np.testing.assert_allclose(np.asarray(targets), theirs_targets, rtol=0, atol=1e-7)


def test_rows_pair_with_the_previous_real_row_and_padding_stays_out():
    full = np.asarray(partners(jnp.ones(5, bool)))
    np.testing.assert_array_equal(full, np.roll(np.arange(5), 1))  # torchvision's roll(1, 0)
    mask = jnp.asarray([True, False, True, True, False, True])
    np.testing.assert_array_equal(np.asarray(partners(mask)), [5, 1, 0, 2, 4, 3])


def test_draws_follow_beta_and_the_probabilities():
    """lambda ~ Beta(alpha, alpha) (variance 1 / (4 (2 alpha + 1))); mixed with p prob; CutMix with p switch."""
    mixing = Mixing(mixup_alpha=0.4, cutmix_alpha=1.0, prob=0.7, switch_prob=0.25)
    keys = jax.random.split(jax.random.key(0), 4000)
    params = jax.vmap(lambda key: draw(mixing, key, 64, 64))(keys)
    mixed, cutmix = np.asarray(params.mixed), np.asarray(params.cutmix)
    assert mixed.mean() == pytest.approx(0.7, abs=0.03)
    assert cutmix[mixed].mean() == pytest.approx(0.25, abs=0.03)
    lam_mixup = np.asarray(params.lam)[mixed & ~cutmix]
    assert lam_mixup.var() == pytest.approx(1 / (4 * (2 * 0.4 + 1)), abs=0.01)
    assert np.all(np.asarray(params.lam)[~mixed] == 1.0)
    boxes = np.asarray(params.box)[cutmix]
    area = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])
    np.testing.assert_allclose(np.asarray(params.lam)[cutmix], 1 - area / 64**2, atol=1e-6)  # corrected


def test_mixing_the_same_key_twice_gives_the_same_batch():
    mixing = Mixing(mixup_alpha=0.2, cutmix_alpha=1.0)
    a, b = (draw(mixing, jax.random.key(7), H, W) for _ in range(2))
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_soft_target_loss_equals_torchs_cross_entropy_with_probabilities(smoothing, weighted):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(B, C)).astype(np.float32)
    targets = rng.dirichlet(np.ones(C), size=B).astype(np.float32)
    weights = rng.uniform(0.5, 2.0, size=C).tolist() if weighted else None
    mask = np.ones(B, bool)
    ours = cross_entropy(smoothing, weights)(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    theirs = F.cross_entropy(
        torch.from_numpy(logits), torch.from_numpy(targets), label_smoothing=smoothing,
        weight=None if weights is None else torch.tensor(weights, dtype=torch.float32),
    )  # fmt: skip
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    part = cross_entropy(smoothing, weights)(
        jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask).at[4:].set(False)
    )
    theirs_part = F.cross_entropy(
        torch.from_numpy(logits[:4]), torch.from_numpy(targets[:4]), label_smoothing=smoothing,
        weight=None if weights is None else torch.tensor(weights, dtype=torch.float32),
    )  # fmt: skip
    assert float(part) == pytest.approx(float(theirs_part), rel=1e-6)


def test_mixing_with_label_smoothing_is_timms_smoothed_mixed_targets():
    """Our mixed targets under the smoothed loss equal timm's SoftTargetCrossEntropy on timm's mixup_target (a
    batch of two rows, where timm's pairing, flip(0), is torchvision's, roll(1, 0))."""
    from timm.data.mixup import mixup_target
    from timm.loss import SoftTargetCrossEntropy

    images, labels = (a[:2] for a in _batch(2))
    labels[:] = [1, 3]
    logits = np.random.default_rng(4).normal(size=(2, C)).astype(np.float32)
    lam = 0.37
    _, targets = apply(_params(lam), jnp.asarray(images), jnp.asarray(labels), jnp.ones(2, bool), C)
    ours = cross_entropy(0.1)(jnp.asarray(logits), targets, jnp.ones(2, bool))
    timm_targets = mixup_target(torch.from_numpy(labels).long(), C, lam, 0.1)
    theirs = SoftTargetCrossEntropy()(torch.from_numpy(logits), timm_targets)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    np.testing.assert_allclose(np.asarray(targets) * 0.9 + 0.1 / C, timm_targets.numpy(), atol=1e-7)
