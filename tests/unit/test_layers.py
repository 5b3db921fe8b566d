"""The torch-faithful layers against hand-computed values (docs/numerics.md, traps 1-7, 10, 17)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtl.models.initializers import kaiming_normal_fan_out
from jaxtl.models.layers import BatchNorm2d, Conv2d, Linear, global_avg_pool, max_pool2d


def _conv_with_kernel(kernel_hwio, groups=1, **kwargs):
    kh, kw, cin_per_group, cout = kernel_hwio.shape
    conv = Conv2d(cin_per_group * groups, cout, (kh, kw), groups=groups, rngs=nnx.Rngs(0), **kwargs)
    conv.weight[...] = jnp.asarray(kernel_hwio)
    return conv


def test_conv_pads_symmetrically_at_stride_2_on_even_sizes():
    # torch pads (1, 1) on both sides; 'SAME' would pad (0, 1) and give [[9, 6], [6, 4]].
    conv = _conv_with_kernel(np.ones((3, 3, 1, 1), np.float32), stride=2, padding=1)
    out = conv(jnp.ones((1, 4, 4, 1)))
    np.testing.assert_array_equal(np.asarray(out)[0, :, :, 0], [[4.0, 6.0], [6.0, 9.0]])


def test_conv_kernel_is_hwio_and_cross_correlates_like_torch():
    # torch's conv2d is a cross-correlation: output[i, j] = sum x[i + a, j + b] * w[a, b].
    x = np.arange(9, dtype=np.float32).reshape(1, 3, 3, 1)
    kernel = np.zeros((2, 2, 1, 1), np.float32)
    kernel[0, 1, 0, 0] = 1.0  # picks x[i, j + 1]
    out = _conv_with_kernel(kernel)(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(out)[0, :, :, 0], [[1.0, 2.0], [4.0, 5.0]])


def test_depthwise_conv_keeps_channels_apart():
    kernel = np.stack([np.full((3, 3), 1.0), np.full((3, 3), 2.0)], axis=-1)[:, :, None, :].astype(np.float32)
    conv = _conv_with_kernel(kernel, padding=1, groups=2)
    assert conv.weight.shape == (3, 3, 1, 2)
    x = np.zeros((1, 3, 3, 2), np.float32)
    x[0, 1, 1] = [1.0, 10.0]
    out = np.asarray(conv(jnp.asarray(x)))
    np.testing.assert_array_equal(out[0, :, :, 0], np.full((3, 3), 1.0))
    np.testing.assert_array_equal(out[0, :, :, 1], np.full((3, 3), 20.0))


def test_max_pool_pads_with_minus_infinity():
    x = -np.arange(1, 17, dtype=np.float32).reshape(1, 4, 4, 1)
    out = np.asarray(max_pool2d(jnp.asarray(x), kernel_size=3, stride=2, padding=1))[0, :, :, 0]
    # Zero padding would make every border window 0.
    np.testing.assert_array_equal(out, [[-1.0, -2.0], [-5.0, -6.0]])


def test_global_avg_pool_is_the_mean_over_height_and_width():
    x = np.random.default_rng(0).standard_normal((2, 5, 7, 3)).astype(np.float32)
    np.testing.assert_allclose(global_avg_pool(jnp.asarray(x)), x.mean(axis=(1, 2)), rtol=1e-6)


def test_batch_norm_train_mode_uses_biased_variance_and_stores_unbiased():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5, 4)).astype(np.float32) * 3 + 1
    bn = BatchNorm2d(4, eps=1e-5, momentum=0.1)
    bn.weight[...] = jnp.asarray([1.0, 2.0, 0.5, -1.0])
    bn.bias[...] = jnp.asarray([0.0, 1.0, -1.0, 0.5])
    out = np.asarray(bn(jnp.asarray(x)))
    mean = x.mean(axis=(0, 1, 2), dtype=np.float64)
    biased = x.var(axis=(0, 1, 2), dtype=np.float64)
    n = 2 * 3 * 5
    expected = (x - mean) / np.sqrt(biased + 1e-5) * [1.0, 2.0, 0.5, -1.0] + [0.0, 1.0, -1.0, 0.5]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.running_mean[...], 0.9 * 0.0 + 0.1 * mean, rtol=1e-6)
    np.testing.assert_allclose(bn.running_var[...], 0.9 * 1.0 + 0.1 * biased * n / (n - 1), rtol=1e-6)


def test_batch_norm_momentum_follows_torch_convention():
    # torch momentum 0.01 keeps 99% of the running value (flax's momentum=0.99 would be this).
    x = jnp.full((4, 1, 1, 1), 5.0).at[0].set(1.0)
    bn = BatchNorm2d(1, momentum=0.01)
    bn(x)
    np.testing.assert_allclose(bn.running_mean[...], [0.99 * 0.0 + 0.01 * 4.0], rtol=1e-6)


def test_batch_norm_eval_mode_uses_running_stats_and_changes_nothing():
    bn = BatchNorm2d(2, eps=0.0, use_running_average=True)
    bn.running_mean[...] = jnp.asarray([1.0, -2.0])
    bn.running_var[...] = jnp.asarray([4.0, 0.25])
    out = bn(jnp.asarray([[[[3.0, 0.0]]]]))
    np.testing.assert_allclose(out, [[[[1.0, 4.0]]]])
    np.testing.assert_array_equal(bn.running_mean[...], [1.0, -2.0])
    np.testing.assert_array_equal(bn.running_var[...], [4.0, 0.25])


def test_batch_norm_variance_is_two_pass_accurate():
    # E[x^2] - E[x]^2 in float32 loses everything here (mean 1e4, std 1e-2).
    rng = np.random.default_rng(1)
    x = (1e4 + 1e-2 * rng.standard_normal((8, 4, 4, 3))).astype(np.float32)
    bn = BatchNorm2d(3, eps=0.0, momentum=1.0)  # momentum 1: running_var is the batch's unbiased variance
    bn(jnp.asarray(x))
    n = x.size // 3
    exact = x.astype(np.float64).var(axis=(0, 1, 2)) * n / (n - 1)
    np.testing.assert_allclose(bn.running_var[...], exact, rtol=1e-3)


def _torch_batch_norm_grads(x, weight, bias, cotangent):
    """torch's train-mode batch_norm gradients (x NHWC float64 numpy) and its output."""
    import torch

    xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    wt, bt = torch.tensor(weight, requires_grad=True), torch.tensor(bias, requires_grad=True)
    y = torch.nn.functional.batch_norm(xt, None, None, wt, bt, training=True, eps=1e-5)
    (y * torch.tensor(cotangent.transpose(0, 3, 1, 2))).sum().backward()
    nhwc = lambda t: t.detach().numpy().transpose(0, 2, 3, 1)  # noqa: E731
    return nhwc(y), (nhwc(xt.grad), wt.grad.numpy(), bt.grad.numpy())


def test_batch_norm_gradient_is_torchs_and_padding_rows_take_no_part():
    # The closed-form backward against torch's; with a batch mask, the result on the examples is
    # torch's on the examples alone, and the padding rows get no gradient.
    from jaxtl.models.batch_norm_ops import batch_norm_train

    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, (6, 5, 4, 7))
    weight, bias = rng.normal(1.0, 0.3, 7), rng.normal(0.0, 1.0, 7)
    cotangent = rng.normal(size=x.shape)
    mask = np.array([True, True, True, True, False, False])
    with jax.enable_x64(True):
        for rows in (None, mask):
            keep = slice(None) if rows is None else rows
            batch = None if rows is None else jnp.asarray(rows)

            def f(x, w, b, batch=batch):
                y = batch_norm_train(x, w, b, batch, 1e-5)[0]
                return y, jnp.sum(y * cotangent)

            y = f(x, weight, bias)[0]
            grads = jax.grad(lambda *a: f(*a)[1], argnums=(0, 1, 2))(x, weight, bias)
            want_y, want = _torch_batch_norm_grads(x[keep], weight, bias, cotangent[keep])
            np.testing.assert_allclose(np.asarray(y)[keep], want_y, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(np.asarray(grads[0])[keep], want[0], rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(grads[1], want[1], rtol=1e-10)
            np.testing.assert_allclose(grads[2], want[2], rtol=1e-10)
            if rows is not None:
                assert not np.any(np.asarray(grads[0])[~mask])


def test_batch_norm_in_bfloat16_keeps_float32_statistics():
    # bf16 compute casts the affine parameters to bf16 too; the statistics, the example count
    # (which bf16 cannot hold exactly: 8 * 31 * 31 = 7688) and the gradient sums stay float32.
    from jaxtl.models.batch_norm_ops import batch_norm_train

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(0.5, 1.5, (8, 31, 31, 4)), jnp.bfloat16)
    weight, bias = jnp.asarray([1.0, 0.5, 2.0, 1.5], jnp.bfloat16), jnp.asarray([0.0, 1.0, -1.0, 0.5], jnp.bfloat16)
    mask = jnp.ones((8,), bool)
    _, mean, var, count = batch_norm_train(x, weight, bias, mask, 1e-5)
    x32 = np.asarray(x, np.float64)
    assert mean.dtype == var.dtype == jnp.float32 and float(count) == 7688
    np.testing.assert_allclose(mean, x32.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(var, x32.var(axis=(0, 1, 2)), rtol=1e-5)
    cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.bfloat16)
    grads = jax.grad(lambda x, w, b: jnp.sum(batch_norm_train(x, w, b, mask, 1e-5)[0] * cotangent), (0, 1, 2))(
        x, weight, bias
    )
    _, want = _torch_batch_norm_grads(x32, np.asarray(weight, np.float64), np.asarray(bias, np.float64),
                                      np.asarray(cotangent, np.float64))  # fmt: skip
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 3
    for got, expected in zip(grads, want, strict=True):
        got = np.asarray(got, np.float64)
        assert np.linalg.norm(got - expected) <= 1e-2 * np.linalg.norm(expected)


def test_batch_norm_train_mode_refuses_a_single_value_per_channel():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchNorm2d(3)(jnp.ones((1, 1, 1, 3)))


def test_batch_norm_rejects_flax_style_momentum():
    with pytest.raises(ValueError, match="torch convention"):
        BatchNorm2d(3, momentum=1.5)


def test_linear_uses_torch_default_init_and_in_out_layout():
    layer = Linear(400, 30, rngs=nnx.Rngs(0))
    bound = 1 / math.sqrt(400)
    weight, bias = np.asarray(layer.weight[...]), np.asarray(layer.bias[...])
    assert weight.shape == (400, 30)
    assert np.abs(weight).max() <= bound and np.abs(bias).max() <= bound
    assert np.std(weight) == pytest.approx(bound / math.sqrt(3), rel=0.05)  # uniform, not normal
    x = np.random.default_rng(0).standard_normal((2, 400)).astype(np.float32)
    np.testing.assert_allclose(layer(jnp.asarray(x)), x @ weight + bias, rtol=1e-5, atol=1e-5)


def test_kaiming_normal_fan_out_matches_torch_std():
    kernel = kaiming_normal_fan_out(jax.random.key(0), (3, 3, 64, 128))
    assert float(jnp.std(kernel)) == pytest.approx(math.sqrt(2.0 / (128 * 9)), rel=0.02)


@pytest.mark.parametrize(
    "kernel, stride, size, padding, dilation",
    [
        (3, 1, (9, 11), 1, 1),
        (5, 2, (10, 13), 2, 1),  # EfficientNet's strided 5x5
        (3, 2, (8, 8), 1, 1),
        (5, 1, (4, 4), 2, 1),  # kernel wider than the map
        (3, 2, (9, 7), 0, 1),  # no padding, rows the slices never reach
        (3, 1, (9, 9), 2, 2),  # dilated
        (3, 3, (10, 11), 1, 1),  # stride 3: uncovered rows and columns at the end
        (3, 2, (11, 10), 4, 1),  # padding wider than the kernel
        (3, 1, (1, 1), 1, 1),
    ],
)
def test_depthwise_taps_equal_xla_grouped_conv_forward_and_gradients(kernel, stride, size, padding, dilation):
    # The written-out gradient (dilated cotangent and flipped kernel; one reduction per tap)
    # against XLA's grouped conv and its autodiff, in float64: equal to rounding.
    from jaxtl.models.conv_ops import depthwise_conv2d

    with jax.enable_x64(True):
        rng = np.random.default_rng(0)  # numpy draws: jax.random.normal compiles ~2 s per shape here
        x = jnp.asarray(rng.standard_normal((2, *size, 6)))
        w = jnp.asarray(rng.standard_normal((kernel, kernel, 1, 6)))
        strides, pads, dilations = (stride, stride), (padding, padding), (dilation, dilation)

        @jax.jit
        def reference(x, w):
            return jax.lax.conv_general_dilated(
                x,
                w,
                strides,
                ((padding, padding),) * 2,
                rhs_dilation=dilations,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=6,
            )

        taps = jax.jit(lambda x, w: depthwise_conv2d(x, w, stride=strides, padding=pads, dilation=dilations))
        expected = reference(x, w)
        np.testing.assert_allclose(taps(x, w), expected, rtol=1e-12, atol=1e-12)
        cotangent = jnp.asarray(rng.standard_normal(expected.shape))
        grads_expected = jax.vjp(reference, x, w)[1](cotangent)
        grads_actual = jax.vjp(taps, x, w)[1](cotangent)
        for a, e in zip(grads_actual, grads_expected, strict=True):
            np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-11)


def test_depthwise_gradient_of_bf16_accumulates_in_float32():
    # bf16 activations (mixed precision): the kernel gradient sums 2 x 32 x 32 products per tap in
    # float32, then rounds once to bf16, so it is within bf16's rounding of the float64 gradient.
    from jaxtl.models.conv_ops import depthwise_conv2d

    rng = np.random.default_rng(1)
    x, w, dy = (
        jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
        for shape in ((2, 32, 32, 8), (3, 3, 1, 8), (2, 32, 32, 8))
    )
    conv = functools.partial(depthwise_conv2d, stride=(1, 1), padding=(1, 1), dilation=(1, 1))
    dx, dw = jax.vjp(conv, x, w)[1](dy)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    xd, dyd = (np.asarray(a, np.float64) for a in (x, dy))
    xp = np.pad(xd, ((0, 0), (1, 1), (1, 1), (0, 0)))
    expected = np.stack([(xp[:, i : i + 32, j : j + 32] * dyd).sum((0, 1, 2)) for i in range(3) for j in range(3)])
    np.testing.assert_allclose(np.asarray(dw, np.float64).reshape(9, 8), expected, rtol=2**-8, atol=0.05)


@pytest.mark.parametrize(
    "shape, kernel, stride, padding, groups",
    [
        ((2, 9, 11, 32), 3, 1, 1, 1),  # 3x3, XLA forward, tap gradients
        ((2, 4, 4, 32), 3, 2, 1, 1),  # strided to 2x2: taps both ways
        ((2, 3, 5, 32), 3, 1, 1, 1),  # odd tiny map
        ((2, 7, 6, 32), 1, 2, 0, 1),  # strided 1x1 (downsample)
        ((2, 8, 10, 64), 3, 1, 1, 4),  # grouped, 16 channels per group (ResNeXt)
        ((2, 8, 8, 32), 3, 2, 1, 8),  # grouped, 4 per group (ResNeXt's first stage): tap gradients
        ((2, 9, 7, 32), 3, 1, 1, 8),  # grouped, stride 1 on an odd map
        ((2, 15, 13, 3), 7, 2, 3, 1),  # stem: 3 input channels
    ],
)
def test_cpu_conv_equals_xla_conv_forward_and_gradients(shape, kernel, stride, padding, groups):
    with jax.enable_x64(True):  # float64: the two orders of summation agree to rounding
        _check_cpu_conv(shape, kernel, stride, padding, groups)


def _check_cpu_conv(shape, kernel, stride, padding, groups):
    from jaxtl.models.conv_ops import cpu_conv2d, taps_conv2d, xla_conv2d

    rng = np.random.default_rng(0)  # numpy draws: jax.random.normal compiles ~2 s per shape here
    x = jnp.asarray(rng.standard_normal(shape))
    w = jnp.asarray(rng.standard_normal((kernel, kernel, shape[-1] // groups, 48)))
    args = ((stride, stride), (padding, padding), (1, 1), groups)
    reference = jax.jit(lambda x, w: xla_conv2d(x, w, *args))
    expected = reference(x, w)
    cotangent = jnp.asarray(rng.standard_normal(expected.shape))
    grads_expected = jax.vjp(reference, x, w)[1](cotangent)
    for conv in (cpu_conv2d, taps_conv2d):
        f = jax.jit(lambda x, w, conv=conv: conv(x, w, *args))
        np.testing.assert_allclose(f(x, w), expected, rtol=1e-12, atol=1e-12)
        for actual, want in zip(jax.vjp(f, x, w)[1](cotangent), grads_expected, strict=True):
            np.testing.assert_allclose(actual, want, rtol=1e-12, atol=1e-11)


def test_a_batch_with_one_real_value_per_channel_leaves_the_running_statistics_as_they_were():
    """torch refuses a train-mode batch of one value per channel ("Expected more than 1 value per channel");
    a padded batch (or micro-batch) with one real row at 1x1 keeps its running statistics, finite."""
    import torch

    from jaxtl.models.batch_norm_ops import batch_mask

    bn = BatchNorm2d(3)
    bn.running_mean.set_value(jnp.asarray([0.5, -1.0, 2.0]))
    bn.running_var.set_value(jnp.asarray([1.5, 0.25, 3.0]))
    before = np.asarray(bn.running_mean[...]), np.asarray(bn.running_var[...])
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 1, 1, 3)), jnp.float32)
    with batch_mask(jnp.asarray([True, False])):
        y = bn(x)
    assert np.all(np.isfinite(np.asarray(y)))
    np.testing.assert_array_equal(np.asarray(y[1]), 0.0)  # the padding row leaves as zeros
    np.testing.assert_array_equal(np.asarray(bn.running_mean[...]), before[0])
    np.testing.assert_array_equal(np.asarray(bn.running_var[...]), before[1])
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        torch.nn.BatchNorm2d(3).train()(torch.zeros(1, 3, 1, 1))
    with batch_mask(jnp.asarray([True, True])):  # two real values: updated as torch updates them
        bn(x)
    reference = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        reference.running_mean.copy_(torch.from_numpy(before[0]))
        reference.running_var.copy_(torch.from_numpy(before[1]))
    reference.train()(torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2))
    np.testing.assert_allclose(np.asarray(bn.running_var[...]), reference.running_var.numpy(), rtol=1e-6)
