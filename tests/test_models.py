"""Tests for rvs_tf.models: shapes, feature layers, parameter counts, saving, normalisation."""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from rvs_tf import models


def _features(model, x):
    return models.with_features(model)(x, training=False)[1].numpy()


def _trainable(model):
    return sum(math.prod(v.shape) for v in model.trainable_weights)


# Closed-form trainable-parameter counts (BN contributes gamma and beta per channel).
def _preact_resnet18_params(in_channels, k):
    bn = lambda c: 2 * c  # noqa: E731
    total, cin = 9 * in_channels * 64, 64
    for cout, stride in zip((64, 128, 256, 512), (1, 2, 2, 2)):
        for block in range(2):
            projection = cin * cout if (block == 0 and (stride != 1 or cin != cout)) else 0
            total += bn(cin) + 9 * cin * cout + bn(cout) + 9 * cout * cout + projection
            cin = cout
    return total + bn(512) + 512 * k + k


def _wrn_params(depth, width, in_channels, k):
    n, total, cin = (depth - 4) // 6, 9 * in_channels * 16, 16
    for cout in (16 * width, 32 * width, 64 * width):
        for _ in range(n):  # no parameters in the avg-pool + zero-pad shortcuts
            total += 2 * cin + 9 * cin * cout + 2 * cout + 9 * cout * cout
            cin = cout
    return total + 2 * cin + cin * k + k


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3)])
def test_classifier_output_and_feature_shapes(shape):
    x = np.random.default_rng(0).uniform(size=(2,) + shape).astype(np.float32)
    for model, dim in ((models.small_cnn(shape, 10, feature_dim=48), 48),
                       (models.preact_resnet18(shape, 7), 512),
                       (models.wide_resnet(shape, 10, depth=10, width=1), 64),
                       (models.wide_resnet(shape, 10, depth=16, width=2), 128)):
        k = model.output_shape[-1]
        logits, feats = models.with_features(model)(x, training=False)
        assert logits.shape == (2, k) and feats.shape == (2, dim)
        assert model.get_layer(models.FEATURES_LAYER).output.shape == (None, dim)
        np.testing.assert_allclose(logits, model(x, training=False), rtol=1e-6, atol=1e-6)
        assert np.all(np.isfinite(logits))


def test_parameter_counts_match_closed_forms():
    assert _trainable(models.preact_resnet18((32, 32, 3), 10)) == _preact_resnet18_params(3, 10)
    # Kuang Liu's PyTorch PreActResNet18 has 11,171,146; ours adds He et al.'s final BN (1024).
    assert _preact_resnet18_params(3, 10) == 11_171_146 + 1024
    for depth, width in ((10, 1), (16, 2), (34, 10)):
        model = models.wide_resnet((32, 32, 3), 10, depth=depth, width=width)
        assert _trainable(model) == _wrn_params(depth, width, 3, 10), (depth, width)
    assert model.name == "wrn_34_10" and model.get_layer("features").output.shape[-1] == 640
    assert _trainable(models.small_cnn()) == (
        (9 * 1 * 32 + 32) + (9 * 32 * 32 + 32) + (9 * 32 * 64 + 64) + (9 * 64 * 64 + 64)
        + (7 * 7 * 64 * 128 + 128) + (128 * 10 + 10))


def test_wrn_shortcuts_are_avg_pool_plus_zero_channel_padding():
    """With every residual branch zeroed, a WRN is stem -> shortcuts -> head: check it in numpy."""
    slope, eps = 0.1, 1e-3
    model = models.wide_resnet((8, 8, 3), 10, depth=10, width=1, leaky_relu=slope)
    for layer in model.layers:
        if layer.name.endswith("_conv2"):
            layer.kernel.assign(tf.zeros_like(layer.kernel))
    x = np.random.default_rng(1).uniform(size=(2, 8, 8, 3)).astype(np.float32)
    leaky = lambda t: np.where(t > 0, t, slope * t)  # noqa: E731
    bn = lambda t: t / np.sqrt(1.0 + eps)  # freshly initialised BN in inference mode  # noqa: E731
    stem = model.get_layer("stem_conv")(tf.image.per_image_standardization(x)).numpy()
    h = leaky(bn(stem))                                     # stage 1: activated shortcut, 16 ch
    h = h.reshape(2, 4, 2, 4, 2, 16).mean(axis=(2, 4))      # stage 2: 2x2 average pool
    h = np.pad(h, [(0, 0), (0, 0), (0, 0), (8, 8)])         # 16 -> 32 channels, zeros both sides
    h = h.reshape(2, 2, 2, 2, 2, 32).mean(axis=(2, 4))      # stage 3
    h = np.pad(h, [(0, 0), (0, 0), (0, 0), (16, 16)])       # 32 -> 64 channels
    expected = leaky(bn(h)).mean(axis=(1, 2))
    np.testing.assert_allclose(_features(model, x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("image_shape", [(28, 28, 1), (32, 32, 3), (30, 30, 3), (29, 31, 2)])
def test_generator_shapes_and_layout(image_shape):
    gen = models.make_generator(16, image_shape)
    z = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32)
    delta = gen(z, training=False)
    assert delta.shape == (3,) + image_shape and delta.dtype == tf.float32
    assert float(tf.math.reduce_std(delta)) > 0
    h0, w0 = math.ceil(image_shape[0] / 4), math.ceil(image_shape[1] / 4)
    assert gen.get_layer("project").output.shape == (None, h0 * w0 * 64)
    assert [v.path for v in gen.weights if v.path.endswith("bias")] == ["project/bias"]
    assert sorted(v.path for v in gen.weights if v.path.endswith("kernel")) == [
        "deconv1/kernel", "deconv2/kernel", "project/kernel", "to_image/kernel"]
    assert gen.get_layer("deconv1").kernel.shape == (4, 4, 32, 64)  # (kh, kw, out, in) for ConvT
    assert gen.get_layer("deconv2").kernel.shape == (4, 4, 16, 32)
    assert gen.get_layer("to_image").kernel.shape == (4, 4, 16, image_shape[2])


def test_generator_crop_is_centred():
    """A 30x30 generator equals the centre of the 32x32 generator with the same weights."""
    small, big = models.make_generator(8, (30, 30, 1)), models.make_generator(8, (32, 32, 1))
    big.set_weights(small.get_weights())
    z = np.random.default_rng(2).normal(size=(2, 8)).astype(np.float32)
    np.testing.assert_allclose(small(z, training=False), big(z, training=False)[:, 1:31, 1:31],
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("build", [
    lambda: models.small_cnn((28, 28, 1), 10, batch_norm=True),
    lambda: models.wide_resnet((16, 16, 3), 5, depth=10, width=1),
    lambda: models.preact_resnet18((8, 8, 1), 3, normalization="none"),
    lambda: models.make_generator(12, (30, 30, 3)),
])
def test_save_load_roundtrip(tmp_path, build):
    model = build()
    x = np.random.default_rng(0).uniform(size=(4,) + model.input_shape[1:]).astype(np.float32)
    # A training-mode call moves BN statistics away from their initial values first.
    model(x, training=True)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects: the layers are registered
    np.testing.assert_array_equal(loaded(x, training=False), model(x, training=False))
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers]


def test_per_image_standardization_matches_tf():
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(5, 9, 7, 3)).astype(np.float32)
    images[1] = 0.25  # constant image: std clamped at 1/sqrt(N)
    images[2] *= 1e-4  # tiny contrast: clamp active
    layer = models.PerImageStandardization()
    np.testing.assert_allclose(layer(images), tf.image.per_image_standardization(images),
                               rtol=1e-5, atol=1e-5)
    x = tf.constant(images)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.reduce_sum(layer(x) * tf.constant(rng.normal(size=images.shape), tf.float32))
    assert np.all(np.isfinite(tape.gradient(y, x).numpy()))
    model = models.small_cnn(normalization="per_image")
    assert isinstance(model.get_layer("standardize"), models.PerImageStandardization)
    assert not any(isinstance(layer, models.PerImageStandardization)
                   for layer in models.small_cnn(normalization="none").layers)


def test_zero_pad_channels_layer():
    x = np.arange(2 * 3 * 3 * 4, dtype=np.float32).reshape(2, 3, 3, 4)
    out = models.ZeroPadChannels(9)(x)
    np.testing.assert_array_equal(out, np.pad(x, [(0, 0), (0, 0), (0, 0), (2, 3)]))


def test_only_conv_and_dense_kernels_end_in_kernel():
    for model in (models.small_cnn(batch_norm=True), models.wide_resnet(depth=10, width=1),
                  models.preact_resnet18((8, 8, 3), 10)):
        kernels = {v.path for v in model.weights if v.path.endswith("kernel")}
        layers = {f"{layer.name}/kernel" for layer in model.layers
                  if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))}
        assert kernels == layers and kernels


def test_features_and_logits_are_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = models.small_cnn()
        gen = models.make_generator(8, (28, 28, 1))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    logits, feats = models.with_features(model)(np.zeros((2, 28, 28, 1), np.float32))
    assert logits.dtype == feats.dtype == tf.float32
    assert model.get_layer("conv1_1").compute_dtype == "float16"
    assert gen(np.zeros((2, 8), np.float32)).dtype == tf.float32


def test_builder_and_argument_errors():
    model = models.build_classifier("wide_resnet", (32, 32, 3), 10, depth=10, width=1)
    assert model.name == "wrn_10_1"
    assert models.build_classifier("small_cnn", (28, 28, 1), 4).output_shape == (None, 4)
    with pytest.raises(ValueError, match="small_cnn, preact_resnet18, wide_resnet"):
        models.build_classifier("resnet50", (32, 32, 3), 10)
    with pytest.raises(ValueError, match="depth"):
        models.wide_resnet(depth=33)
    with pytest.raises(ValueError, match="normalization"):
        models.preact_resnet18(normalization="batch")
    with pytest.raises(ValueError, match="input_shape"):
        models.small_cnn((28, 28))
    with pytest.raises(ValueError, match="num_classes"):
        models.small_cnn(num_classes=1)
    with pytest.raises(ValueError, match="image_shape"):
        models.make_generator(8, (28, 28))
    with pytest.raises(ValueError, match="noise_dim"):
        models.make_generator(0, (28, 28, 1))
    with pytest.raises(ValueError, match="features"):
        models.with_features(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))
