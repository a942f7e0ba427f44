"""The RVS perturbation generator: noise z -> raw perturbation delta, bounded later by the trainer.

Layout (RVS authors' CIFAR-10 model): dense(noise_dim -> ceil(H/4) x ceil(W/4) x 64, with bias, no
activation); ConvT 4x4 s2 (32) - BN - LeakyReLU(0.2); ConvT 4x4 s2 (16) - BN - LeakyReLU(0.2);
Conv 4x4 to C channels; no conv biases, no final activation (the trainer's clip is the only bound).
Sizes that are not multiples of 4 are centre-cropped, so 28x28 uses a 7x7 start and 30x30 crops 32.
"""
import math

import keras


def make_generator(noise_dim, image_shape, *, base_channels=64, leaky_relu=0.2, name="generator"):
    """z ``[B, noise_dim]`` -> delta ``[B, H, W, C]`` (float32, unbounded)."""
    if isinstance(noise_dim, bool) or not isinstance(noise_dim, int) or noise_dim < 1:
        raise ValueError(f"noise_dim: expected a positive int, got {noise_dim!r}")
    shape = tuple(image_shape) if isinstance(image_shape, (tuple, list)) else None
    if shape is None or len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(f"image_shape: expected (height, width, channels) positive ints, "
                         f"got {image_shape!r}")
    height, width, channels = shape
    h0, w0 = math.ceil(height / 4), math.ceil(width / 4)

    z = keras.Input(shape=(noise_dim,), name="noise")
    x = keras.layers.Dense(h0 * w0 * base_channels, name="project")(z)
    x = keras.layers.Reshape((h0, w0, base_channels), name="reshape")(x)
    for i, filters in enumerate((base_channels // 2, base_channels // 4), start=1):
        x = keras.layers.Conv2DTranspose(filters, 4, strides=2, padding="same", use_bias=False,
                                         name=f"deconv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.LeakyReLU(negative_slope=leaky_relu, name=f"act{i}")(x)
    x = keras.layers.Conv2D(channels, 4, padding="same", use_bias=False, name="to_image",
                            dtype="float32")(x)
    crop_h, crop_w = 4 * h0 - height, 4 * w0 - width
    if crop_h or crop_w:
        x = keras.layers.Cropping2D(((crop_h // 2, crop_h - crop_h // 2),
                                     (crop_w // 2, crop_w - crop_w // 2)), name="crop",
                                    dtype="float32")(x)
    return keras.Model(z, x, name=name)


def make_init_generator(image_shape, *, noise_channels=1, width=32, name="init_generator"):
    """[x, sign(d CE/dx), z] ``[B, H, W, 2C + noise_channels]`` -> raw start ``[B, H, W, C]`` (unbounded;
    `rvs_tf.learned_init.RVSInitModel` maps it into the eps-ball with eps * tanh).

    A conv - residual block - conv network at full resolution (FGSM-SDI's generator shape): it conditions
    the start on the image and on its clean input gradient, which a generator of z alone cannot see.
    """
    shape = tuple(image_shape) if isinstance(image_shape, (tuple, list)) else None
    if shape is None or len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(f"image_shape: expected (height, width, channels) positive ints, got {image_shape!r}")
    for arg, value, low in (("noise_channels", noise_channels, 0), ("width", width, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{arg}: expected an int >= {low}, got {value!r}")
    height, image_width, channels = shape
    inputs = keras.Input(shape=(height, image_width, 2 * channels + noise_channels), name="image_gradient_noise")
    h = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name="conv_in")(inputs)
    r = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name="res_conv1")(h)
    r = keras.layers.Conv2D(width, 3, padding="same", name="res_conv2")(r)
    h = keras.layers.ReLU(name="res_out")(keras.layers.Add(name="residual")([h, r]))
    out = keras.layers.Conv2D(channels, 3, padding="same", name="to_start", dtype="float32")(h)
    return keras.Model(inputs, out, name=name)
