"""Image classifiers as functional Keras models: images in [0, 1] -> logits [B, K].

Each model standardises its input inside the graph (so attacks and the eps-ball live in pixel space)
and has a layer named ``FEATURES_LAYER`` whose output is the penultimate pooled feature vector
``[B, D]`` that RVS transports. Conv and dense kernels are the only variables whose paths end in
``"kernel"``: the trainer applies weight decay to exactly those (no layer regularizers here).
``features`` and ``logits`` compute in float32 even under a mixed-precision policy, because the
Sinkhorn solver and the attacks need float32.
"""
import math

import keras

FEATURES_LAYER = "features"
# Layers that compute in float32 under a mixed policy (the solver and the attacks need float32).
FLOAT32_LAYERS = ("standardize", FEATURES_LAYER, "logits")
ARCHITECTURES = ("small_cnn", "preact_resnet18", "wide_resnet")
NORMALIZATIONS = ("per_image", "none")


@keras.saving.register_keras_serializable(package="rvs_tf")
class PerImageStandardization(keras.layers.Layer):
    """``tf.image.per_image_standardization`` as a layer: (x - mean) / max(std, 1/sqrt(N)).

    Computed as ``sqrt(max(var, 1/N))`` (the same value) so a constant image has a finite gradient.
    """

    def call(self, images):
        axes = tuple(range(1, len(images.shape)))
        num_elements = math.prod(images.shape[1:])
        mean = keras.ops.mean(images, axis=axes, keepdims=True)
        var = keras.ops.mean(keras.ops.square(images - mean), axis=axes, keepdims=True)
        return (images - mean) / keras.ops.sqrt(keras.ops.maximum(var, 1.0 / num_elements))


@keras.saving.register_keras_serializable(package="rvs_tf")
class ZeroPadChannels(keras.layers.Layer):
    """Zero-pads channels (split evenly, any odd one at the end): a parameter-free shortcut."""

    def __init__(self, out_channels, **kwargs):
        super().__init__(**kwargs)
        self.out_channels = int(out_channels)

    def call(self, x):
        extra = self.out_channels - x.shape[-1]
        return keras.ops.pad(x, [[0, 0], [0, 0], [0, 0], [extra // 2, extra - extra // 2]])

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.out_channels,)

    def get_config(self):
        return {**super().get_config(), "out_channels": self.out_channels}


def _check_common(input_shape, num_classes, normalization):
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
    if shape is None or len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(f"input_shape: expected (height, width, channels) positive ints, "
                         f"got {input_shape!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes: expected an int >= 2, got {num_classes!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization: expected one of {NORMALIZATIONS}, got {normalization!r}")
    return shape


def _stem(input_shape, normalization):
    images = keras.Input(shape=input_shape, name="images")
    x = images
    if normalization == "per_image":
        x = PerImageStandardization(name="standardize", dtype="float32")(x)
    return images, x


def _head(x, num_classes, name, images):
    logits = keras.layers.Dense(num_classes, name="logits", dtype="float32")(x)
    return keras.Model(images, logits, name=name)


def small_cnn(input_shape=(28, 28, 1), num_classes=10, *, feature_dim=128, widths=(32, 64),
              normalization="per_image", batch_norm=False, name="small_cnn"):
    """A CPU-friendly CNN: [conv3x3(w)-ReLU x2 - maxpool] per width - dense(feature_dim) - logits.

    ``features`` is the ReLU'd dense layer. No BatchNorm by default (``batch_norm=True`` adds it
    after every conv), so training and inference mode compute the same function.
    """
    shape = _check_common(input_shape, num_classes, normalization)
    if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1:
        raise ValueError(f"feature_dim: expected a positive int, got {feature_dim!r}")
    if not widths or not all(isinstance(w, int) and w > 0 for w in widths):
        raise ValueError(f"widths: expected a non-empty sequence of positive ints, got {widths!r}")
    images, x = _stem(shape, normalization)
    for stage, width in enumerate(widths, start=1):
        for i in (1, 2):
            x = keras.layers.Conv2D(width, 3, padding="same", use_bias=not batch_norm,
                                    name=f"conv{stage}_{i}")(x)
            if batch_norm:
                x = keras.layers.BatchNormalization(name=f"bn{stage}_{i}")(x)
            x = keras.layers.ReLU(name=f"relu{stage}_{i}")(x)
        x = keras.layers.MaxPooling2D(2, padding="same", name=f"pool{stage}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(feature_dim, activation="relu", name=FEATURES_LAYER, dtype="float32")(x)
    return _head(x, num_classes, name, images)


def _conv(filters, kernel, stride, name):
    """Bias-free conv with He-normal (fan-out) init, as in the TF ResNet/WRN reference models."""
    return keras.layers.Conv2D(
        filters, kernel, strides=stride, padding="same", use_bias=False, name=name,
        kernel_initializer=keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal"))


def preact_resnet18(input_shape=(32, 32, 3), num_classes=10, *, normalization="per_image",
                    bn_momentum=0.9, name="preact_resnet18"):
    """Pre-activation ResNet-18 (He et al. 2016, "Identity mappings"), CIFAR variant.

    3x3 stem (64), four stages of two BN-ReLU-conv blocks (64, 128, 256, 512; strides 1, 2, 2, 2;
    1x1 projection shortcuts on the pre-activated input where shape changes), final BN-ReLU and
    global average pooling -> 512-d ``features``.
    """
    shape = _check_common(input_shape, num_classes, normalization)
    images, x = _stem(shape, normalization)
    x = _conv(64, 3, 1, "stem_conv")(x)
    in_filters = 64
    for stage, (filters, stride) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2)), start=1):
        for block in range(2):
            s = stride if block == 0 else 1
            p = f"stage{stage}_block{block}"
            out = keras.layers.BatchNormalization(momentum=bn_momentum, name=f"{p}_bn1")(x)
            out = keras.layers.ReLU(name=f"{p}_relu1")(out)
            shortcut = x
            if s != 1 or in_filters != filters:
                shortcut = _conv(filters, 1, s, f"{p}_shortcut")(out)
            out = _conv(filters, 3, s, f"{p}_conv1")(out)
            out = keras.layers.BatchNormalization(momentum=bn_momentum, name=f"{p}_bn2")(out)
            out = keras.layers.ReLU(name=f"{p}_relu2")(out)
            out = _conv(filters, 3, 1, f"{p}_conv2")(out)
            x = keras.layers.Add(name=f"{p}_add")([out, shortcut])
            in_filters = filters
    x = keras.layers.BatchNormalization(momentum=bn_momentum, name="final_bn")(x)
    x = keras.layers.ReLU(name="final_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name=FEATURES_LAYER, dtype="float32")(x)
    return _head(x, num_classes, name, images)


def wide_resnet(input_shape=(32, 32, 3), num_classes=10, *, depth=34, width=10,
                normalization="per_image", leaky_relu=0.1, bn_momentum=0.9, name=None):
    """Wide ResNet as in the RVS authors' (and Madry et al.'s) TF model.

    Widths 16, 16k, 32k, 64k; (depth - 4) / 6 pre-activation units a stage, strides 1, 2, 2;
    leaky ReLU everywhere; parameter-free shortcuts (average pool + zero channel padding) where the
    shape changes; the very first unit activates before branching, the others keep the raw input
    as shortcut; final BN-activation and global average pooling -> 64k-d ``features`` (640 for
    WRN-34-10).
    """
    shape = _check_common(input_shape, num_classes, normalization)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(f"depth: expected 6n + 4 with n >= 1 (e.g. 28, 34), got {depth!r}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width: expected a positive int, got {width!r}")
    if not isinstance(leaky_relu, (int, float)) or leaky_relu < 0:
        raise ValueError(f"leaky_relu: expected a slope >= 0, got {leaky_relu!r}")
    units = (depth - 4) // 6
    name = name or f"wrn_{depth}_{width}"

    def bn_act(t, prefix):
        t = keras.layers.BatchNormalization(momentum=bn_momentum, name=f"{prefix}_bn")(t)
        return keras.layers.LeakyReLU(negative_slope=leaky_relu, name=f"{prefix}_act")(t)

    images, x = _stem(shape, normalization)
    x = _conv(16, 3, 1, "stem_conv")(x)
    for stage, (filters, stride) in enumerate(zip((16 * width, 32 * width, 64 * width), (1, 2, 2)),
                                              start=1):
        for unit in range(units):
            s = stride if unit == 0 else 1
            p = f"stage{stage}_unit{unit}"
            in_filters = x.shape[-1]
            if stage == 1 and unit == 0:
                x = bn_act(x, f"{p}_pre1")
                shortcut = x
                out = x
            else:
                shortcut = x
                out = bn_act(x, f"{p}_pre1")
            out = _conv(filters, 3, s, f"{p}_conv1")(out)
            out = bn_act(out, f"{p}_pre2")
            out = _conv(filters, 3, 1, f"{p}_conv2")(out)
            if s != 1:
                shortcut = keras.layers.AveragePooling2D(s, s, padding="same",
                                                         name=f"{p}_pool")(shortcut)
            if in_filters != filters:
                shortcut = ZeroPadChannels(filters, name=f"{p}_pad")(shortcut)
            x = keras.layers.Add(name=f"{p}_add")([out, shortcut])
    x = bn_act(x, "final")
    x = keras.layers.GlobalAveragePooling2D(name=FEATURES_LAYER, dtype="float32")(x)
    return _head(x, num_classes, name, images)


_BUILDERS = {"small_cnn": small_cnn, "preact_resnet18": preact_resnet18, "wide_resnet": wide_resnet}


def build_classifier(arch, input_shape, num_classes, **kwargs):
    """Builds ``arch`` (one of ARCHITECTURES) with architecture-specific ``kwargs``."""
    if arch not in _BUILDERS:
        raise ValueError(f"Unknown architecture {arch!r}; expected one of "
                         f"{', '.join(ARCHITECTURES)}")
    return _BUILDERS[arch](input_shape, num_classes, **kwargs)


def with_features(model):
    """A model sharing ``model``'s weights that returns ``(logits, features)`` in one pass."""
    try:
        features = model.get_layer(FEATURES_LAYER).output
    except ValueError as e:
        raise ValueError(f"`model` {model.name!r} has no layer named {FEATURES_LAYER!r}") from e
    return keras.Model(model.input, [model.output, features], name=f"{model.name}_features")
