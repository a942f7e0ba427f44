"""Tests for rvs_tf.data: IDX reading and checks, TFDS pipelines (mocked), splits, augmentation."""
import gzip
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from rvs_tf import data

REAL_IDX = os.path.isfile(os.path.join(data.DEFAULT_IDX_DIR, "train-images-idx3-ubyte.gz"))


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _idx_bytes(array, magic_ndim=None, dims=None):
    array = np.asarray(array, dtype=np.uint8)
    ndim = array.ndim if magic_ndim is None else magic_ndim
    dims = array.shape if dims is None else dims
    header = bytes([0, 0, 0x08, ndim]) + b"".join(int(d).to_bytes(4, "big") for d in dims)
    return header + array.tobytes()


def _write_idx_dir(directory, *, num_train=30, num_test=7, gz=True, rng_seed=0):
    """Writes a tiny Fashion-MNIST-like IDX set; returns the arrays written."""
    rng = np.random.default_rng(rng_seed)
    arrays = {}
    for split, prefix, n in (("train", "train", num_train), ("test", "t10k", num_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[0] = 0
        images[-1, 0, 0] = 255
        labels = (np.arange(n) % 10).astype(np.uint8)
        for stem, array in ((f"{prefix}-images-idx3-ubyte", images),
                            (f"{prefix}-labels-idx1-ubyte", labels)):
            path = os.path.join(directory, stem + (".gz" if gz else ""))
            with (gzip.open if gz else open)(path, "wb") as f:
                f.write(_idx_bytes(array))
        arrays[split] = (images, labels)
    return arrays


def _batches(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


def _keys(images):
    return [img.tobytes() for img in np.asarray(images)]


# ----------------------------------------------------------------------------------------------
# IDX files
# ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(not REAL_IDX, reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_idx():
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = data.load_idx_arrays(data.DEFAULT_IDX_DIR, split)
        assert images.shape == (n, 28, 28, 1) and images.dtype == np.float32
        assert labels.shape == (n,) and labels.dtype == np.int64
        assert images.min() == 0.0 and images.max() == 1.0
        assert set(np.unique(labels)) == set(range(10))
    info = data.dataset_info("fashion_mnist_idx")
    assert (info.num_train, info.num_validation, info.num_test) == (55000, 5000, 10000)
    assert info.image_shape == (28, 28, 1) and info.num_classes == len(info.class_names) == 10
    train, val, test, info2 = data.make_datasets("fashion_mnist_idx", batch_size=256)
    assert info2 == info
    x, y = next(iter(train))
    assert x.shape == (256, 28, 28, 1) and x.dtype == tf.float32 and y.dtype == tf.int64
    assert 0.0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 1.0


@pytest.mark.parametrize("gz", [True, False])
def test_tiny_idx_roundtrip(tmp_path, gz):
    arrays = _write_idx_dir(str(tmp_path), gz=gz)
    for split in ("train", "test"):
        images, labels = data.load_idx_arrays(str(tmp_path), split)
        np.testing.assert_array_equal(images[..., 0], arrays[split][0] / np.float32(255.0))
        np.testing.assert_array_equal(labels, arrays[split][1])
        assert images.dtype == np.float32 and labels.dtype == np.int64


@pytest.mark.parametrize("corruption, message", [
    ("bad_magic", "magic"),
    ("truncated", "truncated"),
    ("short_header", "truncated"),
    ("bad_gzip", "cannot decompress"),
    ("count_mismatch", "count mismatch"),
    ("label_range", "label 12"),
])
def test_corrupt_idx_raises_value_error_naming_file(tmp_path, corruption, message):
    _write_idx_dir(str(tmp_path), gz=True)
    images_path = tmp_path / "train-images-idx3-ubyte.gz"
    labels_path = tmp_path / "train-labels-idx1-ubyte.gz"
    good_images = np.zeros((30, 28, 28), np.uint8)
    target, payload = images_path, None
    if corruption == "bad_magic":
        payload = gzip.compress(_idx_bytes(good_images, magic_ndim=2, dims=(30, 784)))
    elif corruption == "truncated":
        payload = gzip.compress(_idx_bytes(good_images)[:-100])
    elif corruption == "short_header":
        payload = gzip.compress(_idx_bytes(good_images)[:9])
    elif corruption == "bad_gzip":
        payload = gzip.compress(_idx_bytes(good_images))
        payload = payload[:len(payload) // 2]
    elif corruption == "count_mismatch":
        payload = gzip.compress(_idx_bytes(np.zeros((29, 28, 28), np.uint8)))
    elif corruption == "label_range":
        target, payload = labels_path, gzip.compress(_idx_bytes(np.full(30, 12, np.uint8)))
    target.write_bytes(payload)
    with pytest.raises(ValueError, match=message) as err:
        data.load_idx_arrays(str(tmp_path), "train", num_classes=10)
    assert "train-" in str(err.value) and str(tmp_path) in str(err.value)


def test_missing_idx_dir_and_file(tmp_path):
    missing = str(tmp_path / "nope")
    for call in (lambda: data.load_idx_arrays(missing, "train"),
                 lambda: data.make_datasets("fashion_mnist_idx", batch_size=8, idx_dir=missing),
                 lambda: data.dataset_info("fashion_mnist_idx", idx_dir=missing)):
        with pytest.raises(FileNotFoundError) as err:
            call()
        for needle in (missing, "idx_dir", "--idx_dir", "apt-get install dataset-fashion-mnist"):
            assert needle in str(err.value)
    _write_idx_dir(str(tmp_path))
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        data.load_idx_arrays(str(tmp_path), "test")
    with pytest.raises(ValueError, match="split"):
        data.load_idx_arrays(str(tmp_path), "validation")


# ----------------------------------------------------------------------------------------------
# pipelines on local IDX data
# ----------------------------------------------------------------------------------------------

def test_idx_pipeline_splits_batches_and_shuffling(tmp_path):
    arrays = _write_idx_dir(str(tmp_path), num_train=30, num_test=7)
    train, val, test, info = data.make_datasets(
        "fashion_mnist_idx", batch_size=4, validation_size=6, idx_dir=str(tmp_path), seed=3)
    assert (info.num_train, info.num_validation, info.num_test) == (24, 6, 7)
    originals = arrays["train"][0][..., None] / np.float32(255.0)

    epoch1, epoch2 = _batches(train), _batches(train)
    assert epoch1[0].shape == (24, 28, 28, 1)  # 24 = 6 full batches, nothing dropped
    assert epoch1[0].dtype == np.float32 and epoch1[1].dtype == np.int64
    assert not np.array_equal(epoch1[0], epoch2[0])  # reshuffled each epoch
    assert sorted(_keys(epoch1[0])) == sorted(_keys(epoch2[0])) == sorted(_keys(originals[:24]))

    val_x, val_y = _batches(val)  # deterministic: the last 6 training examples, in order
    np.testing.assert_array_equal(val_x, originals[24:])
    np.testing.assert_array_equal(val_y, arrays["train"][1][24:])
    assert not set(_keys(val_x)) & set(_keys(epoch1[0]))
    test_x, _ = _batches(test)
    assert test_x.shape == (7, 28, 28, 1)  # last partial batch kept for evaluation
    assert test_x.min() >= 0.0 and test_x.max() <= 1.0

    again = data.make_datasets("fashion_mnist_idx", batch_size=4, validation_size=6,
                               idx_dir=str(tmp_path), seed=3)[0]
    np.testing.assert_array_equal(_batches(again)[0], epoch1[0])  # the seed fixes the order

    train5 = data.make_datasets("fashion_mnist_idx", batch_size=5, validation_size=6,
                                idx_dir=str(tmp_path), cache=False)[0]
    assert _batches(train5)[0].shape[0] == 20  # drop_remainder on train


def _is_shifted_crop(augmented, original, pad):
    """True if `augmented` is some (possibly flipped) crop of the zero-padded `original`."""
    h, w = original.shape[:2]
    padded = np.pad(original, ((pad, pad), (pad, pad), (0, 0)))
    for candidate in (padded, padded[:, ::-1]):
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                if np.array_equal(candidate[dy:dy + h, dx:dx + w], augmented):
                    return True
    return False


def test_idx_crop_flip_augmentation(tmp_path):
    arrays = _write_idx_dir(str(tmp_path), num_train=12, num_test=2)
    train, _, _, _ = data.make_datasets("fashion_mnist_idx", batch_size=5, validation_size=2,
                                        idx_dir=str(tmp_path), augment="crop_flip", pad=2)
    x, y = _batches(train)
    assert x.shape == (10, 28, 28, 1) and x.min() >= 0.0 and x.max() <= 1.0
    originals = arrays["train"][0][..., None] / np.float32(255.0)
    by_label = {int(label): originals[i] for i, label in enumerate(arrays["train"][1][:10])}
    assert all(_is_shifted_crop(img, by_label[int(label)], 2) for img, label in zip(x, y))
    changed = sum(not np.array_equal(img, by_label[int(label)]) for img, label in zip(x, y))
    assert changed >= 5  # 25 offsets x 2 flips: the identity is rare


def test_eval_dataset_and_bad_arguments(tmp_path):
    arrays = _write_idx_dir(str(tmp_path), num_train=20, num_test=9)
    ds, info = data.make_eval_dataset("fashion_mnist_idx", batch_size=4, num_examples=6,
                                      idx_dir=str(tmp_path), validation_size=5)
    x, y = _batches(ds)
    np.testing.assert_array_equal(x[..., 0], arrays["test"][0][:6] / np.float32(255.0))
    np.testing.assert_array_equal(y, arrays["test"][1][:6])
    assert info.num_test == 9 and info.num_train == 15
    val, _ = data.make_eval_dataset("fashion_mnist_idx", split="validation", idx_dir=str(tmp_path),
                                    validation_size=5)
    np.testing.assert_array_equal(_batches(val)[1], arrays["train"][1][15:])

    with pytest.raises(ValueError, match="cifar10.*fashion_mnist_idx"):
        data.make_datasets("imagenet", batch_size=8)
    with pytest.raises(ValueError, match="imagenet"):
        data.dataset_info("imagenet")
    with pytest.raises(ValueError, match="augment"):
        data.make_datasets("fashion_mnist_idx", batch_size=8, idx_dir=str(tmp_path),
                           validation_size=5, augment="mixup")
    with pytest.raises(ValueError, match="batch_size"):
        data.make_datasets("fashion_mnist_idx", batch_size=0, idx_dir=str(tmp_path))
    with pytest.raises(ValueError, match="validation_size"):
        data.make_datasets("fashion_mnist_idx", batch_size=4, idx_dir=str(tmp_path),
                           validation_size=20)
    with pytest.raises(ValueError, match="batch_size"):
        data.make_datasets("fashion_mnist_idx", batch_size=64, idx_dir=str(tmp_path),
                           validation_size=5)
    with pytest.raises(ValueError, match="split"):
        data.make_eval_dataset("fashion_mnist_idx", split="extra", idx_dir=str(tmp_path))


# ----------------------------------------------------------------------------------------------
# TFDS pipelines (mocked, offline)
# ----------------------------------------------------------------------------------------------

def test_tfds_mock_data_shapes_dtypes_ranges():
    with tfds.testing.mock_data(num_examples=16):
        train, val, test, info = data.make_datasets("cifar10", batch_size=8, validation_size=4)
        assert info.image_shape == (32, 32, 3) and info.num_classes == 10
        assert info.class_names[0] == "airplane"
        for ds in (train, val, test):
            x, y = next(iter(ds))
            assert x.shape[1:] == (32, 32, 3) and x.dtype == tf.float32 and y.dtype == tf.int64
            assert 0.0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 1.0
            assert float(tf.reduce_max(x)) > 0.5  # really /255, not /255 twice
        ds, info = data.make_eval_dataset("svhn_cropped", batch_size=5, num_examples=7)
        x, y = _batches(ds)
        assert x.shape == (7, 32, 32, 3) and info.num_test == 26032 and info.num_classes == 10


def _sliceable_mock(num_train, num_test, shape, seed=0):
    """A mock `_as_dataset` honouring TFDS split slicing, so held-out splits can be checked."""
    rng = np.random.default_rng(seed)
    pools = {"train": rng.integers(0, 256, size=(num_train,) + shape, dtype=np.uint8),
             "test": rng.integers(0, 256, size=(num_test,) + shape, dtype=np.uint8)}
    pools["train"][0] = 255

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False, **kwargs):
        instruction = (tfds.core.ReadInstruction.from_spec(split) if isinstance(split, str)
                       else split)
        ids = np.arange(len(pools[instruction.split_name]))[instruction.from_:instruction.to]
        return tf.data.Dataset.from_tensor_slices(
            {"image": pools[instruction.split_name][ids], "label": ids.astype(np.int64) % 10})
    return pools, as_dataset


@pytest.mark.parametrize("name", ["cifar10", "svhn_cropped"])
def test_tfds_validation_disjoint_and_default_augmentation(name):
    pools, as_dataset = _sliceable_mock(40, 10, (32, 32, 3))
    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        train, val, test, info = data.make_datasets(name, batch_size=4, validation_size=8)
        assert (info.num_train, info.num_validation, info.num_test) == (32, 8, 10)
        train_x, _ = _batches(train)
        val_x, _ = _batches(val)
        test_x, _ = _batches(test)
    originals = pools["train"] / np.float32(255.0)
    np.testing.assert_array_equal(val_x, originals[32:])
    np.testing.assert_array_equal(test_x, pools["test"] / np.float32(255.0))
    assert train_x.shape == (32, 32, 32, 3)
    assert train_x.min() >= 0.0 and train_x.max() <= 1.0
    if name == "svhn_cropped":  # no augmentation: exactly the first 32 training images
        assert sorted(_keys(train_x)) == sorted(_keys(originals[:32]))
    else:  # CIFAR default: pad-4 zero-padded crop + flip of a training (never validation) image
        changed = 0
        for img in train_x:
            matches = [i for i in range(40) if _is_shifted_crop(img, originals[i], 4)]
            assert matches and max(matches) < 32
            changed += not np.array_equal(img, originals[matches[0]])
        assert changed >= 16


def test_a_tfds_dataset_that_cannot_be_loaded_names_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--data_dir.*") as caught:
        data.make_datasets("cifar10", batch_size=8, data_dir=str(tmp_path), download=False)
    assert str(tmp_path) in str(caught.value) and "tfds build cifar10" in str(caught.value)


@pytest.mark.parametrize("name, classes", [("cifar10", 10), ("cifar100", 100), ("svhn_cropped", 10)])
def test_tfds_datasets_through_the_command_lines(tmp_path, name, classes):
    """rvs-train and rvs-evaluate on a TFDS dataset as a user runs them once it is downloaded (mocked:
    random images of the real shape), through the same flags and loading code: the run trains, exports
    with the dataset's shape and classes, and rvs-evaluate finds the dataset from the export's metadata."""
    import json
    import subprocess
    import sys

    wrapper = os.path.join(os.path.dirname(__file__), "tfds_mock_cli.py")
    run = lambda *args: subprocess.run([sys.executable, wrapper, *args], capture_output=True, text=True,  # noqa: E731
                                       timeout=300)
    trained = run("rvs-train", f"--dataset={name}", "--arch=small_cnn", "--method=rvs", "--epochs=1",
                  "--steps_per_epoch=2", "--batch_size=8", "--validation_size=8", "--eval_pgd_steps=1",
                  "--ot_max_iters=5", f"--workdir={tmp_path / 'run'}", f"--export_dir={tmp_path / 'exports'}",
                  "--name=mocked")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert f"Training rvs on {name} (" in trained.stdout and "Exported to" in trained.stdout
    evaluated = run("rvs-evaluate", f"--model={tmp_path / 'exports' / 'mocked'}", "--attacks=pgd20",
                    "--num_examples=8", "--sweep_examples=0", f"--output_dir={tmp_path / 'eval'}", "--noprogress")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["dataset"] == name and report["num_examples"] == 8, report.keys()
    assert len(report["class_names"]) == classes and "PGD-20" in evaluated.stdout
