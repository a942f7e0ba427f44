"""SavedModel export: the TF Serving layout and signature, atomic versions, clear failures."""
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from rvs_tf import evaluate, export


def classifier():
    inputs = keras.Input((6, 6, 1))
    h = keras.layers.Flatten()(inputs)
    h = keras.layers.Dense(8, activation="relu", name="features")(h)
    return keras.Model(inputs, keras.layers.Dense(3)(h))


def test_signature_versions_and_metadata(tmp_path):
    model = classifier()
    root = str(tmp_path / "saved_models")
    first = export.export_classifier(model, root, "demo", metadata={"dataset": "toy", "eps": 0.1})
    second = export.export_classifier(model, root, "demo")
    assert first.endswith(os.path.join("demo", "1")) and second.endswith(os.path.join("demo", "2"))
    assert sorted(os.listdir(os.path.join(root, "demo"))) == ["1", "2"]  # no temporary folders left

    loaded = tf.saved_model.load(first)
    signature = loaded.signatures[export.SERVING_SIGNATURE]
    _, inputs = signature.structured_input_signature
    assert list(inputs) == [export.IMAGES_INPUT] == ["images"]
    assert inputs["images"].dtype == tf.float32 and inputs["images"].shape.as_list() == [None, 6, 6, 1]
    assert set(signature.structured_outputs) == set(export.OUTPUTS) == {"logits", "probabilities", "classes"}
    assert export.image_signature(loaded, first) == (signature, "images")
    assert (export.BYTES_SIGNATURE, export.BYTES_INPUT) == ("serving_bytes", "image_bytes")  # what clients send

    x = np.random.default_rng(0).uniform(size=(5, 6, 6, 1)).astype("float32")
    out = signature(images=tf.constant(x))
    expected = model(x).numpy()
    np.testing.assert_allclose(out["logits"].numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(out["probabilities"].numpy().sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(out["classes"].numpy(), expected.argmax(-1))
    assert export.read_metadata(first) == {"dataset": "toy", "eps": 0.1, "serving_precision": "float32"}
    # No training state: the generator, optimizers and RVS wrapper are not part of the export.
    assert not any("optimizer" in v.name for v in loaded.variables)

    assert export.resolve_model_path(os.path.join(root, "demo")) == (second, 2)  # newest, as TF Serving
    logits, metadata, _ = evaluate.load_model(os.path.join(root, "demo"))
    np.testing.assert_allclose(logits(x).numpy(), expected, atol=1e-5)
    assert metadata == {"serving_precision": "float32"}  # version 2 was exported without run metadata


def test_failed_export_leaves_earlier_versions_intact(tmp_path, monkeypatch):
    model = classifier()
    root = str(tmp_path)
    first = export.export_classifier(model, root, "demo")
    before = sorted(os.listdir(first))

    def broken(self, *args, **kwargs):
        os.makedirs(args[0], exist_ok=True)
        open(os.path.join(args[0], "saved_model.pb"), "w").close()  # a partial write, then a crash
        raise OSError("disk full")

    monkeypatch.setattr(type(keras.export.ExportArchive()), "write_out", broken)  # a factory class
    with pytest.raises(OSError, match="disk full"):
        export.export_classifier(model, root, "demo")
    assert os.listdir(os.path.join(root, "demo")) == ["1"]
    assert sorted(os.listdir(first)) == before
    tf.saved_model.load(first)  # still loads


def test_existing_version_is_never_overwritten(tmp_path):
    model = classifier()
    export.export_classifier(model, str(tmp_path), "demo", version=3)
    with pytest.raises(FileExistsError, match="never overwritten"):
        export.export_classifier(model, str(tmp_path), "demo", version=3)
    assert export.versions(str(tmp_path / "demo")) == [3]
    assert export.export_classifier(model, str(tmp_path), "demo").endswith("4")


def test_unwritable_export_dir_names_the_flag(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="--export_dir"):
        export.export_classifier(classifier(), str(blocker / "exports"), "demo")


@pytest.mark.parametrize("name", ["", "../escape", "a/b", ".hidden"])
def test_bad_names_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="name"):
        export.export_classifier(classifier(), str(tmp_path), name)


def test_metadata_is_json(tmp_path):
    path = export.export_classifier(classifier(), str(tmp_path), "demo",
                                    metadata={"metrics": {"acc": np.float32(0.5).item()}})
    with open(os.path.join(path, export.VERSION_METADATA_FILE)) as handle:
        assert json.load(handle)["metrics"]["acc"] == 0.5


def test_version_readers_name_what_they_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_dir: expected integer versions"):
        export.load_versions(str(tmp_path))
    export.export_classifier(classifier(), str(tmp_path), "demo", version=2)
    assert list(export.load_versions(str(tmp_path / "demo"))) == [2]
    assert export.resolve_model_path(tmp_path / "demo" / "2") == (str(tmp_path / "demo" / "2"), 2)
    with pytest.raises(ValueError, match="model: expected a .keras file"):
        export.resolve_model_path(tmp_path / "missing.keras")
    with pytest.raises(ValueError, match="model: expected a SavedModel directory"):
        export.resolve_model_path(tmp_path)


@pytest.mark.parametrize("method", ["rvs", "natural", "fgsm_rs", "pgd", "trades", "nfgsm", "fgsm_pgi",
                                    "rvs_init"])
def test_keras_model_export_writes_the_classifiers_serving_savedmodel(tmp_path, method):
    """`model.export(path)`, Keras 3's way to write a SavedModel for TF Serving, on every rvs_tf model:
    the classifier alone with rvs-export's signatures."""
    from rvs_tf.builder import build_model
    from rvs_tf.run_config import RunConfig

    keras.utils.set_random_seed(0)
    model = build_model(RunConfig(method=method, eps=0.1), (28, 28, 1), 10, steps_per_epoch=10)
    x = np.random.default_rng(1).uniform(size=(4, 28, 28, 1)).astype("float32")
    model.predict(x, verbose=0)
    path = model.export(str(tmp_path / "served"), verbose=False)
    loaded = tf.saved_model.load(path)
    assert {export.SERVING_SIGNATURE, export.BYTES_SIGNATURE} <= set(loaded.signatures)
    out = loaded.signatures[export.SERVING_SIGNATURE](images=tf.constant(x))
    np.testing.assert_allclose(out["logits"], model.classifier(x), atol=1e-5)
    names = [v.name for v in loaded.variables]
    assert len(names) == len(model.classifier.weights) and not any("optimizer" in n for n in names)
    with pytest.raises(FileExistsError, match="never overwritten"):
        model.export(path, verbose=False)
    with pytest.raises(ValueError, match="format"):
        model.export(str(tmp_path / "other"), format="onnx")
