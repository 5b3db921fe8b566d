"""EfficientNet B0-B7 and V2 S/M/L: structure, per-variant settings, stochastic depth (no torch)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from archs import by_family
from flax import nnx

import jaxtl.models
from jaxtl.models.efficientnet import FusedMBConv, MBConv, make_divisible
from jaxtl.models.layers import BatchNorm2d, StochasticDepth

# torchvision's weights metadata (num_params of the 1000-class models).
TORCHVISION_NUM_PARAMS = {
    "efficientnet_b0": 5288548, "efficientnet_b1": 7794184, "efficientnet_b2": 9109994,
    "efficientnet_b3": 12233232, "efficientnet_b4": 19341616, "efficientnet_b5": 30389784,
    "efficientnet_b6": 43040704, "efficientnet_b7": 66347960, "efficientnet_v2_s": 21458488,
    "efficientnet_v2_m": 54139356, "efficientnet_v2_l": 118515272,
}  # fmt: skip
# (eps, momentum, classifier dropout) per variant (docs/numerics.md, traps 8 and 12).
SETTINGS = {
    "efficientnet_b0": (1e-5, 0.1, 0.2), "efficientnet_b1": (1e-5, 0.1, 0.2), "efficientnet_b2": (1e-5, 0.1, 0.3),
    "efficientnet_b3": (1e-5, 0.1, 0.3), "efficientnet_b4": (1e-5, 0.1, 0.4), "efficientnet_b5": (1e-3, 0.01, 0.4),
    "efficientnet_b6": (1e-3, 0.01, 0.5), "efficientnet_b7": (1e-3, 0.01, 0.5), "efficientnet_v2_s": (1e-3, 0.1, 0.2),
    "efficientnet_v2_m": (1e-3, 0.1, 0.3), "efficientnet_v2_l": (1e-3, 0.1, 0.4),
}  # fmt: skip


def _abstract(arch):
    return jaxtl.models.abstract_model(arch)


@pytest.mark.parametrize("arch", by_family(sorted(TORCHVISION_NUM_PARAMS)))
def test_parameter_count_and_settings_equal_torchvision(arch):
    model = _abstract(arch)
    params = nnx.state(model, nnx.Param)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == TORCHVISION_NUM_PARAMS[arch]
    eps, momentum, dropout = SETTINGS[arch]
    norms = [m for _, m in nnx.iter_modules(model) if isinstance(m, BatchNorm2d)]
    assert {(bn.eps, bn.momentum) for bn in norms} == {(eps, momentum)}
    assert model.classifier[0].rate == dropout


def test_make_divisible_matches_torchvision():
    # torchvision.models._utils._make_divisible
    assert [make_divisible(v) for v in (32 * 1.1, 16 * 1.1, 24 * 1.4, 40 * 1.8, 320 * 2.0, 3.0)] == [
        32,
        16,
        32,
        72,
        640,
        8,
    ]


def test_mbconv_names_depthwise_kernels_and_squeeze_width():
    model = _abstract("efficientnet_b0")
    shapes = {".".join(map(str, p)): v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    # Stage 1 has expand ratio 1: no expand conv, the depthwise conv comes first.
    assert shapes["features.0.0.weight"] == (3, 3, 3, 32)
    assert shapes["features.1.0.block.0.0.weight"] == (3, 3, 1, 32)  # depthwise: (kh, kw, 1, C)
    # Stage 2, block 0: 16 -> expand 96 -> squeeze max(1, 16 // 4) = 4, not 96 // 4.
    assert shapes["features.2.0.block.0.0.weight"] == (1, 1, 16, 96)
    assert shapes["features.2.0.block.1.0.weight"] == (3, 3, 1, 96)
    assert shapes["features.2.0.block.2.fc1.weight"] == (1, 1, 96, 4)
    assert shapes["features.2.0.block.2.fc1.bias"] == (4,)
    assert shapes["features.2.0.block.3.0.weight"] == (1, 1, 96, 24)
    assert shapes["features.3.0.block.1.0.weight"] == (5, 5, 1, 144)
    assert shapes["features.8.0.weight"] == (1, 1, 320, 1280)
    assert shapes["classifier.1.weight"] == (1280, 1000)


def test_fused_mbconv_has_no_squeeze_excitation():
    model = _abstract("efficientnet_v2_s")
    assert isinstance(model.features[1][0], FusedMBConv) and isinstance(model.features[4][0], MBConv)
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert not any("fc1" in n for n in names if n.startswith(("features.1.", "features.2.", "features.3.")))
    assert "features.2.0.block.0.0.weight" in names and "features.2.0.block.1.0.weight" in names  # expand, project
    assert model.features[2][0].block[0][0].weight.shape == (3, 3, 24, 96)  # the fused kxk expand conv


def test_stochastic_depth_probability_grows_with_block_index():
    model = _abstract("efficientnet_b0")
    blocks = [block for stage in list(model.features)[1:-1] for block in stage]
    assert len(blocks) == 16
    expected = [0.2 * i / 16 for i in range(16)]
    np.testing.assert_allclose([b.stochastic_depth.p for b in blocks], expected)
    assert [b.use_res_connect for b in blocks[:4]] == [False, False, True, False]


def test_stochastic_depth_drops_whole_samples_and_rescales():
    layer = StochasticDepth(0.3, rngs=nnx.Rngs(dropout=0))
    layer.train()
    x = jnp.ones((4000, 2, 3, 5))
    out = np.asarray(layer(x))
    per_sample = out.reshape(4000, -1)
    assert np.all(per_sample == per_sample[:, :1])  # one decision per sample ("row" mode)
    values = np.unique(per_sample)
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / 0.7, rel=1e-6)
    dropped = float(np.mean(per_sample[:, 0] == 0))
    assert abs(dropped - 0.3) < 4 * np.sqrt(0.3 * 0.7 / 4000)
    assert not np.array_equal(out, np.asarray(layer(x)))  # the stream advances: a new mask each call


def test_stochastic_depth_is_identity_in_eval_mode():
    layer = StochasticDepth(0.5, rngs=nnx.Rngs(dropout=0))
    layer.eval()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 3, 3, 4)), jnp.float32)
    np.testing.assert_array_equal(layer(x), x)


@pytest.mark.slow
def test_efficientnet_train_mode_is_random_and_eval_mode_deterministic():
    model = jaxtl.models.create("efficientnet_b0", num_classes=4, seed=0)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 64, 64, 3)), jnp.float32)
    forward = nnx.jit(lambda model, x: model(x))  # one compile per mode; the RNG state advances per call
    model.eval()
    np.testing.assert_array_equal(forward(model, x), forward(model, x))
    model.train()
    assert not np.allclose(forward(model, x), forward(model, x))  # dropout and stochastic depth masks change


@pytest.mark.slow  # B0's shapes are also checked by its parity test in the quick set
@pytest.mark.parametrize("arch, size", [("efficientnet_b0", (57, 71)), ("efficientnet_v2_s", (64, 64))])
def test_forward_shapes(arch, size):
    model = jaxtl.models.create(arch, num_classes=3)
    model.eval()
    x = jnp.ones((2, *size, 3))
    # Traced, not run: shapes and the order of the stages (a jitted dict comes back sorted).
    assert nnx.eval_shape(lambda model, x: model(x), model, x).shape == (2, 3)
    assert nnx.eval_shape(lambda model, x: model.forward_features(x), model, x).shape == (2, 1280)
    stages = []
    nnx.eval_shape(lambda model, x: stages.extend(model.forward_intermediates(x)), model, x)
    assert stages[0] == "features.0" and stages[-2:] == ["avgpool", "classifier"]
