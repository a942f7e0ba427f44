"""Compute precision: which Keras dtype policy a run uses, and float32 twins of mixed-precision models.

  policy, note = resolve("auto")      # "mixed_bfloat16" on a CPU with AMX / AVX512-BF16 or a GPU of
                                      # compute capability >= 8.0 where a timing probe confirms it; else
                                      # "float32", and `note` says why
  set_policy(policy)                  # before the models are built
  copy, note = float32_copy(model)    # the same weights, computing in float32 (attacks, exports)

Why bfloat16: oneDNN runs bfloat16 convolutions and matrix products on AMX units several times faster
than float32 (3.7x a PGD-10 step of the small CNN on this project's CPUs). Where the units are missing,
bfloat16 is emulated and slower than float32, so `auto` never picks it there. Whatever a model computes
in, its logits, losses and the OT term stay float32, and robustness verdicts are float32 (see
`rvs_tf.attacks`).
"""
import functools
import os
import time

import keras
import tensorflow as tf

PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
POLICIES = PRECISIONS[1:]  # what `auto` resolves to
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
PROBE_MIN_SPEEDUP = 1.3  # bfloat16 must beat float32 by this much in the probe to be picked


def cpu_flags(path="/proc/cpuinfo"):
    """The CPU feature flags the kernel reports (an empty set where there is no /proc/cpuinfo)."""
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def gpu_capabilities():
    """Compute capability (major, minor) of each visible GPU."""
    found = []
    for device in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(device).get("compute_capability")
        if capability:
            found.append(tuple(capability))
    return found


def bfloat16_hardware():
    """(True, what) where the hardware runs bfloat16 natively, else (False, why not)."""
    gpus = gpu_capabilities()
    if gpus:
        if all(major >= 8 for major, _ in gpus):
            return True, f"GPU compute capability {'.'.join(map(str, min(gpus)))}"
        return False, f"GPU compute capability {'.'.join(map(str, min(gpus)))} < 8.0 has no fast bfloat16"
    present = [flag for flag in BF16_CPU_FLAGS if flag in cpu_flags()]
    if present:
        return True, f"CPU with {'/'.join(present)}"
    return False, f"this CPU has neither {' nor '.join(BF16_CPU_FLAGS)} (bfloat16 would be emulated, slower)"


def _seconds_per_conv(dtype, repeats=5):
    """Median seconds of a 3x3 convolution of a [128, 28, 28, 32] batch to 64 channels in `dtype`."""
    x = tf.random.uniform([128, 28, 28, 32], dtype=tf.float32)
    kernel = tf.random.uniform([3, 3, 32, 64], dtype=tf.float32)
    x, kernel = tf.cast(x, dtype), tf.cast(kernel, dtype)
    conv = tf.function(lambda a, b: tf.reduce_sum(tf.cast(tf.nn.conv2d(a, b, 1, "SAME"), tf.float32)))
    conv(x, kernel).numpy()  # trace and warm the kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        conv(x, kernel).numpy()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@functools.lru_cache(maxsize=None)
def probe_speedup():
    """float32 time / bfloat16 time of a small convolution on this machine (cached per process)."""
    return _seconds_per_conv(tf.float32) / _seconds_per_conv(tf.bfloat16)


def resolve(precision):
    """(policy, note): the Keras dtype policy for `precision` and a one-line reason.

    Args:
        precision: one of PRECISIONS. `auto` picks `mixed_bfloat16` where `bfloat16_hardware()` says the
            hardware has it and a timing probe confirms a speed-up of at least PROBE_MIN_SPEEDUP, else
            `float32`. RVS_TF_PRECISION in the environment overrides what `auto` picks (CI, tests).
    """
    text = str(precision).strip().lower()
    if text not in PRECISIONS:
        raise ValueError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if text != "auto":
        return text, f"precision {text} (as asked)"
    forced = os.environ.get("RVS_TF_PRECISION", "").strip().lower()
    if forced:
        if forced not in POLICIES:
            raise ValueError(f"RVS_TF_PRECISION: expected one of {', '.join(POLICIES)}, got {forced!r}")
        return forced, f"precision auto -> {forced} (RVS_TF_PRECISION)"
    fast, what = bfloat16_hardware()
    if not fast:
        return "float32", f"precision auto -> float32: {what}"
    try:
        speedup = probe_speedup()
    except (tf.errors.OpError, RuntimeError, ValueError) as error:  # no bfloat16 kernel after all
        return "float32", f"precision auto -> float32: {what}, but the bfloat16 probe failed ({error})"
    if speedup < PROBE_MIN_SPEEDUP:
        return "float32", (f"precision auto -> float32: {what}, but a bfloat16 convolution ran only "
                           f"{speedup:.1f}x float32's speed here")
    return "mixed_bfloat16", f"precision auto -> mixed_bfloat16: {what}, convolution {speedup:.1f}x float32"


def set_policy(policy):
    """Set Keras's global dtype policy (one of POLICIES, or `auto` resolved first) and return its name.
    Call it before building the models: a layer takes the policy in force when it is created."""
    policy, _ = resolve(policy)
    keras.config.set_dtype_policy(policy)
    return policy


def mixed_policies(model):
    """Names of the mixed-precision dtype policies among the model's layers."""
    return sorted({layer.dtype_policy.name for layer in model._flatten_layers()
                   if layer.dtype_policy.name.startswith("mixed")})


def float32_copy(model):
    """(model, note): a float32 twin of a mixed-precision Keras model (same weights) and a note saying so,
    or the model itself and "" if it already computes in float32.

    Attacks need float32 gradients and verdicts (in float16, small input gradients underflow to zero and a
    white-box attack fails where it would succeed, which reads as robustness), and exports serve float32.
    """
    mixed = mixed_policies(model)
    if not mixed:
        return model, ""
    return cast_copy(model, "float32"), f" (float32 copy of its {'/'.join(mixed)} weights)"


def cast_copy(model, policy):
    """A copy of a functional or Sequential Keras model whose layers compute under `policy` (its variables
    stay float32 and take the model's weights). Under a mixed policy the output layer and the layers
    rvs_tf's classifiers keep in float32 (`models.classifier.FLOAT32_LAYERS`) stay float32, so the copy
    computes as a model built under that policy does."""
    from rvs_tf.models.classifier import FLOAT32_LAYERS

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)  # for sublayers that layers create in their constructors
    kept = set(FLOAT32_LAYERS) | ({model.layers[-1].name} if model.layers else set())

    def clone(layer):
        dtype = "float32" if policy.startswith("mixed") and layer.name in kept else policy
        return layer.__class__.from_config({**layer.get_config(), "dtype": dtype})

    try:
        copy = keras.models.clone_model(model, clone_function=clone)
    except Exception as error:  # e.g. a subclassed model that clone_model cannot rebuild
        raise ValueError(f"model: a {policy} copy is needed, which keras.models.clone_model could not build "
                         f"({error}). Rebuild the model under the {policy} policy and load its "
                         "weights.") from error
    finally:
        keras.config.set_dtype_policy(previous)
    copy.set_weights(model.get_weights())
    return copy
