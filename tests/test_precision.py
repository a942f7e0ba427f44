"""Precision: what `auto` picks and why, and exports that serve float32 whatever the model trained in."""
import numpy as np
import pytest
import tensorflow as tf

from rvs_tf import export, models, precision


@pytest.fixture
def bare_cpu(monkeypatch):
    """A machine with no GPU and no bfloat16 units, whatever this one has."""
    monkeypatch.delenv("RVS_TF_PRECISION", raising=False)
    monkeypatch.setattr(precision, "gpu_capabilities", lambda: [])
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "fma"})


def test_auto_stays_float32_without_bfloat16_units_and_says_why(bare_cpu, monkeypatch):
    monkeypatch.setattr(precision, "probe_speedup", lambda: pytest.fail("no probe without the units"))
    policy, note = precision.resolve("auto")
    assert policy == "float32" and "amx_bf16" in note and "avx512_bf16" in note and "emulated" in note


def test_auto_picks_bfloat16_only_where_the_probe_confirms_it(bare_cpu, monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f", "amx_bf16", "amx_tile"})
    monkeypatch.setattr(precision, "probe_speedup", lambda: 3.1)
    policy, note = precision.resolve("auto")
    assert policy == "mixed_bfloat16" and "amx_bf16" in note and "3.1x" in note
    monkeypatch.setattr(precision, "probe_speedup", lambda: 1.05)
    policy, note = precision.resolve("auto")
    assert policy == "float32" and "1.1x" in note


def test_gpus_need_compute_capability_8(bare_cpu, monkeypatch):
    monkeypatch.setattr(precision, "probe_speedup", lambda: 4.0)
    monkeypatch.setattr(precision, "gpu_capabilities", lambda: [(7, 0)])
    assert precision.resolve("auto")[0] == "float32"
    monkeypatch.setattr(precision, "gpu_capabilities", lambda: [(9, 0)])
    assert precision.resolve("auto")[0] == "mixed_bfloat16"


def test_explicit_choices_the_override_and_bad_values(bare_cpu, monkeypatch):
    assert precision.resolve("mixed_float16")[0] == "mixed_float16"
    monkeypatch.setenv("RVS_TF_PRECISION", "float32")
    assert precision.resolve("auto") == ("float32", "precision auto -> float32 (RVS_TF_PRECISION)")
    with pytest.raises(ValueError, match="--precision: expected one of auto, float32"):
        precision.resolve("bfloat16")
    monkeypatch.setenv("RVS_TF_PRECISION", "fp8")
    with pytest.raises(ValueError, match="RVS_TF_PRECISION"):
        precision.resolve("auto")


def test_the_probe_measures_a_real_ratio():
    speedup = precision.probe_speedup()
    assert np.isfinite(speedup) and speedup > 0


def bfloat16_classifier():
    try:
        precision.set_policy("mixed_bfloat16")
        return models.build_classifier("small_cnn", (28, 28, 1), 10)
    finally:
        precision.set_policy("float32")


def test_a_bfloat16_model_exports_float32_unless_asked(tmp_path):
    trained = bfloat16_classifier()
    assert precision.mixed_policies(trained) == ["mixed_bfloat16"]
    reference, _ = precision.float32_copy(trained)
    x = tf.random.stateless_uniform([16, 28, 28, 1], seed=[3, 4])
    path = export.export_classifier(trained, str(tmp_path), "bf", metadata={"eps": 0.1})
    served = tf.saved_model.load(path).signatures[export.SERVING_SIGNATURE](images=x)["logits"]
    assert served.dtype == tf.float32
    np.testing.assert_allclose(served, reference(x), atol=1e-5)  # float32 arithmetic, not bfloat16's
    assert np.max(np.abs(served - tf.cast(trained(x), tf.float32))) > 1e-4
    assert export.read_metadata(path)["serving_precision"] == "float32"

    fast = export.export_classifier(reference, str(tmp_path), "bf", serving_precision="mixed_bfloat16")
    served = tf.saved_model.load(fast).signatures[export.SERVING_SIGNATURE](images=x)["logits"]
    assert served.dtype == tf.float32  # the signature is float32 either way
    np.testing.assert_allclose(served, tf.cast(trained(x), tf.float32), atol=1e-5)
    assert export.read_metadata(fast)["serving_precision"] == "mixed_bfloat16"
    with pytest.raises(ValueError, match="serving_precision: expected one of float32, mixed_bfloat16"):
        export.export_classifier(reference, str(tmp_path), "bf", serving_precision="float16")
