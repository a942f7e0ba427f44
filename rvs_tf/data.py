"""tf.data input pipelines: TFDS image datasets and local IDX files (offline Fashion-MNIST).

Every dataset yields ``(images, labels)``: float32 ``[B, H, W, C]`` in ``[0, 1]`` and int64 ``[B]``.
Normalisation is *not* done here: the models standardise inside the graph, so attacks and the
eps-ball both live in the ``[0, 1]`` pixel space.

Validation data is held out from the end of the training split (the last ``validation_size``
examples, TFDS split strings ``train[:-N]`` / ``train[-N:]``), so it is deterministic and disjoint
from what the model trains on.
"""
import dataclasses
import gzip
import math
import os

import numpy as np
import tensorflow as tf

from rvs_tf.arguments import check_int

TFDS_DATASETS = ("cifar10", "cifar100", "svhn_cropped", "mnist", "fashion_mnist")
LOCAL_DATASETS = ("fashion_mnist_idx",)  # local IDX .gz files, the offline default
DEFAULT_IDX_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
AUGMENTATIONS = ("none", "crop", "crop_flip")

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")
_DIGITS = tuple(str(i) for i in range(10))

# Published split sizes and shapes, used when TFDS has no prepared copy to read them from.
# name: (image_shape, num_classes, default class names, train size, test size, default augmentation)
_KNOWN = {
    "cifar10": ((32, 32, 3), 10, CIFAR10_CLASSES, 50000, 10000, "crop_flip"),
    "cifar100": ((32, 32, 3), 100, tuple(str(i) for i in range(100)), 50000, 10000, "crop_flip"),
    "svhn_cropped": ((32, 32, 3), 10, _DIGITS, 73257, 26032, "none"),
    "mnist": ((28, 28, 1), 10, _DIGITS, 60000, 10000, "none"),
    "fashion_mnist": ((28, 28, 1), 10, FASHION_MNIST_CLASSES, 60000, 10000, "none"),
    "fashion_mnist_idx": ((28, 28, 1), 10, FASHION_MNIST_CLASSES, 60000, 10000, "none"),
}

_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_UBYTE = 0x08


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset; ``num_train`` excludes the held-out validation examples."""
    name: str
    image_shape: tuple
    num_classes: int
    class_names: tuple
    num_train: int
    num_validation: int
    num_test: int


# ----------------------------------------------------------------------------------------------
# IDX files
# ----------------------------------------------------------------------------------------------

_IDX_HINT = ("Point the `idx_dir` argument (flag --idx_dir) at the folder holding the "
             "Fashion-MNIST IDX files, or install them with "
             f"`apt-get install dataset-fashion-mnist` (they land in {DEFAULT_IDX_DIR}).")


def _check_idx_dir(directory):
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"IDX directory not found: {directory}. {_IDX_HINT}")


def _find_idx_file(directory, stem):
    """Plain file first (no decompression), then ``.gz``; a clear error if neither exists."""
    for candidate in (os.path.join(directory, stem), os.path.join(directory, stem + ".gz")):
        if os.path.isfile(candidate):
            return candidate
    path = os.path.join(directory, stem)
    raise FileNotFoundError(f"IDX file not found: {path}(.gz). {_IDX_HINT}")


def _read_idx(path, ndim):
    """Reads an unsigned-byte IDX file into a uint8 array, checking header and size."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:  # truncated or not-gzip .gz
        raise ValueError(f"IDX file {path} is corrupt: cannot decompress ({e})") from e
    if len(raw) < 4:
        raise ValueError(f"IDX file {path} is corrupt: {len(raw)} bytes, shorter than its header")
    zero0, zero1, dtype, got_ndim = raw[:4]
    if zero0 != 0 or zero1 != 0 or dtype != _IDX_UBYTE or got_ndim != ndim:
        raise ValueError(
            f"IDX file {path} has bad magic number 0x{int.from_bytes(raw[:4], 'big'):08x}; "
            f"expected 0x{_IDX_UBYTE << 8 | ndim:08x} (unsigned bytes, {ndim} dimensions)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file {path} is truncated inside its header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(dims)
    if len(raw) - header != expected:
        raise ValueError(
            f"IDX file {path} is truncated or corrupt: dimensions {dims} need {expected} data "
            f"bytes, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _read_idx_header(path, ndim):
    """Dimensions from the header only (cheap: no full read), for `dataset_info`."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4 + 4 * ndim)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise ValueError(f"IDX file {path} is corrupt: cannot decompress ({e})") from e
    if len(head) < 4 + 4 * ndim or head[:4] != bytes([0, 0, _IDX_UBYTE, ndim]):
        raise ValueError(f"IDX file {path} has a bad or truncated header")
    return tuple(int.from_bytes(head[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))


def _load_idx_uint8(directory, split, num_classes=None):
    if split not in _IDX_FILES:
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    _check_idx_dir(directory)
    image_path, label_path = (_find_idx_file(directory, stem) for stem in _IDX_FILES[split])
    images = _read_idx(image_path, ndim=3)
    labels = _read_idx(label_path, ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"IDX count mismatch: {image_path} holds {images.shape[0]} images but "
                         f"{label_path} holds {labels.shape[0]} labels")
    if num_classes is not None and labels.size and labels.max() >= num_classes:
        raise ValueError(f"IDX file {label_path} has label {labels.max()}, expected labels in "
                         f"[0, {num_classes})")
    return images[..., None], labels.astype(np.int64)


def load_idx_arrays(directory, split, *, num_classes=None):
    """Loads ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` from ``directory``.

    Returns float32 images ``[N, H, W, 1]`` in ``[0, 1]`` and int64 labels ``[N]``. Missing files
    raise FileNotFoundError; corrupt ones (bad magic, truncated, image/label count mismatch, labels
    outside ``[0, num_classes)`` when given) raise ValueError naming the file.
    """
    images, labels = _load_idx_uint8(directory, split, num_classes)
    return images.astype(np.float32) / 255.0, labels


# ----------------------------------------------------------------------------------------------
# Sources: uint8 (image, label) datasets before batching
# ----------------------------------------------------------------------------------------------

def published_train_size(name):
    """The published size of `name`'s training split (what the full run reads, before the hold-out)."""
    _check_name(name)
    return _KNOWN[name][3]


def _check_name(name):
    if name not in TFDS_DATASETS + LOCAL_DATASETS:
        raise ValueError(f"dataset: expected one of {', '.join(TFDS_DATASETS + LOCAL_DATASETS)}, "
                         f"got {name!r}")


def _tfds_split(split, validation_size):
    """Our split names -> TFDS split strings (validation = last `validation_size` of train)."""
    if split == "test" or validation_size == 0:
        return split
    return f"train[:-{validation_size}]" if split == "train" else f"train[-{validation_size}:]"


def _source(name, split, *, validation_size, data_dir=None, idx_dir=DEFAULT_IDX_DIR,
            download=True, idx_cache=None):
    """Dataset of (uint8 image [H,W,C], int64 label) for split in train/validation/test.

    ``idx_cache`` (a dict) lets train and validation share one read of the IDX training file;
    ``download=False`` makes TFDS fail fast offline instead of trying the network.
    """
    if split == "validation" and validation_size == 0:
        raise ValueError("validation_size: expected > 0 for a validation split, got 0")
    if name in LOCAL_DATASETS:
        idx_split = "test" if split == "test" else "train"
        cache = {} if idx_cache is None else idx_cache
        if (idx_dir, idx_split) not in cache:
            cache[idx_dir, idx_split] = _load_idx_uint8(idx_dir, idx_split, _KNOWN[name][1])
        images, labels = cache[idx_dir, idx_split]
        if split != "test":
            if validation_size >= len(labels):
                raise ValueError(f"validation_size: expected fewer than the {len(labels)} training "
                                 f"examples, got {validation_size}")
            cut = len(labels) - validation_size
            part = slice(None, cut) if split == "train" else slice(cut, None)
            images, labels = images[part], labels[part]
        return tf.data.Dataset.from_tensor_slices((images, labels))
    import tensorflow_datasets as tfds  # deferred: importing TFDS costs seconds
    try:
        ds = tfds.load(name, split=_tfds_split(split, validation_size), as_supervised=True,
                       data_dir=data_dir, shuffle_files=False, download=download)
    except Exception as error:  # offline download (DownloadError, ConnectionError) or nothing prepared
        if isinstance(error, (ValueError, TypeError)) and "split" in str(error).lower():
            raise
        where = data_dir or "~/tensorflow_datasets"
        raise FileNotFoundError(
            f"dataset: TFDS could not load {name!r} from {where} and could not download it ({type(error).__name__}: "
            f"{str(error)[:200]}). Offline, prepare it on a machine with internet (`tfds build {name}`, or "
            f"any tfds.load of it), copy the folder {name}/ of its data directory to a folder here and pass "
            "that folder as --data_dir (data_dir= in Python)") from error
    return ds.map(lambda x, y: (x, tf.cast(y, tf.int64)))


def _cardinality_value(cardinality, fallback):
    n = int(cardinality)
    return n if n >= 0 else fallback  # -1 infinite / -2 unknown: trust the metadata


def _cardinality(ds, fallback):
    return _cardinality_value(ds.cardinality(), fallback)


def dataset_info(name, *, validation_size=5000, data_dir=None, idx_dir=DEFAULT_IDX_DIR):
    """Shapes, classes and split sizes without reading the images.

    TFDS: from the prepared dataset's metadata when present, else the published sizes (class names
    from ``info.features["label"].names``). IDX: from the file headers.
    """
    _check_name(name)
    check_int("validation_size", validation_size, 0)
    shape, num_classes, names, num_train, num_test, _ = _KNOWN[name]
    if name in LOCAL_DATASETS:
        _check_idx_dir(idx_dir)
        dims = {}
        for split, (images_stem, _) in _IDX_FILES.items():
            dims[split] = _read_idx_header(_find_idx_file(idx_dir, images_stem), ndim=3)
        num_train, num_test = dims["train"][0], dims["test"][0]
        shape = dims["train"][1:] + (1,)
    else:
        import tensorflow_datasets as tfds
        builder = tfds.builder(name, data_dir=data_dir)
        label_names = tuple(builder.info.features["label"].names)
        if len(label_names) == num_classes and label_names != tuple(map(str, range(num_classes))):
            names = label_names  # real names once prepared (unprepared CIFAR reports '0'..'9')
        splits = builder.info.splits
        if "train" in splits and "test" in splits and splits["train"].num_examples > 0:
            num_train, num_test = splits["train"].num_examples, splits["test"].num_examples
    if validation_size >= num_train:
        raise ValueError(f"validation_size: expected fewer than the {num_train} training examples, "
                         f"got {validation_size}")
    return DatasetInfo(name=name, image_shape=tuple(shape), num_classes=num_classes,
                       class_names=tuple(names), num_train=num_train - validation_size,
                       num_validation=validation_size, num_test=num_test)


# ----------------------------------------------------------------------------------------------
# Pipelines
# ----------------------------------------------------------------------------------------------

def _to_float(images, labels):
    return tf.cast(images, tf.float32) / 255.0, labels


def _augmenter(mode, image_shape, pad):
    """Per-example augmentation from a stateless seed pair, so runs are reproducible."""
    def augment(example, seed):
        image, label = example
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        if pad:
            image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])  # zero padding, as the authors
            image = tf.image.stateless_random_crop(image, image_shape, seed=crop_seed)
        if mode == "crop_flip":
            image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
        return image, label
    return augment


def _resolve_augment(name, augment):
    if augment is None:
        return _KNOWN[name][5]
    if augment is False:
        return "none"
    if augment is True:
        return "crop_flip"
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment: expected None (dataset default), a bool or one of {AUGMENTATIONS}, "
                         f"got {augment!r}")
    return augment


def _shuffled_and_augmented(train, shuffle_buffer, seed, mode, image_shape, pad):
    """The training examples reshuffled every epoch and, unless `mode` is "none", augmented from a
    stateless seed pair per example that also changes every epoch."""
    train = train.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if mode == "none":
        return train
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    return tf.data.Dataset.zip((train, seeds)).map(_augmenter(mode, image_shape, pad),
                                                   num_parallel_calls=tf.data.AUTOTUNE)


def make_datasets(name, *, batch_size, validation_size=5000, data_dir=None, idx_dir=DEFAULT_IDX_DIR,
                  augment=None, pad=4, seed=0, shuffle_buffer=None, cache=True,
                  drop_remainder=True, download=True):
    """Train / validation / test pipelines and the dataset's `DatasetInfo`.

    Args:
      name: one of TFDS_DATASETS (via ``tfds.load``) or LOCAL_DATASETS (IDX files in ``idx_dir``).
      batch_size: global batch size (a distribution strategy splits it across replicas).
      validation_size: examples held out from the end of train; 0 gives ``val_ds = None``.
      augment: None = dataset default (CIFAR-10/100: ``"crop_flip"``; SVHN, MNIST, Fashion-MNIST:
        ``"none"``, flips would change digits' meaning); ``"crop"``, ``"crop_flip"``, ``"none"``
        or a bool (True = ``"crop_flip"``).
      pad: zero padding per side before the random crop (4 is the usual CIFAR recipe; the RVS
        authors pad 2, i.e. 36x36).
      seed: seeds both the per-epoch shuffle and the augmentation.
      shuffle_buffer: None = the whole training split (exact shuffle; every dataset here fits).
      cache: cache the decoded uint8 examples in memory (True), in files (a path prefix; one file
        per split), or not (False). Caching comes before shuffling and augmentation, so each epoch
        is shuffled and augmented afresh.
      drop_remainder: for train only, so every replica gets an equal share of each batch.
    Returns:
      ``(train_ds, val_ds, test_ds, info)``; only ``train_ds`` shuffles and augments.
    """
    _check_name(name)
    buffer = 1 if shuffle_buffer is None else shuffle_buffer  # None: the whole split
    for arg, value, minimum in (("batch_size", batch_size, 1), ("validation_size", validation_size, 0),
                                ("pad", pad, 0), ("shuffle_buffer", buffer, 1)):
        check_int(arg, value, minimum)
    mode = _resolve_augment(name, augment)
    info = dataset_info(name, validation_size=validation_size, data_dir=data_dir, idx_dir=idx_dir)
    idx_cache = {}

    def load(split):
        ds = _source(name, split, validation_size=validation_size, data_dir=data_dir,
                     idx_dir=idx_dir, download=download, idx_cache=idx_cache)
        if cache:
            ds = ds.cache() if cache is True else ds.cache(f"{cache}_{split}")
        return ds

    def evaluation(split):
        ds = load(split)
        batched = ds.batch(batch_size).map(_to_float, num_parallel_calls=tf.data.AUTOTUNE)
        return batched.prefetch(tf.data.AUTOTUNE), ds.cardinality()

    train = load("train")
    num_train = _cardinality(train, info.num_train)
    if drop_remainder and batch_size > num_train:
        raise ValueError(f"batch_size: expected at most the {num_train} training examples (with "
                         f"drop_remainder there would be no batch at all), got {batch_size}")
    train = _shuffled_and_augmented(train, shuffle_buffer or num_train, seed, mode, info.image_shape, pad)
    train = (train.batch(batch_size, drop_remainder=drop_remainder)
             .map(_to_float, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE))

    val, num_val = evaluation("validation") if validation_size else (None, 0)
    test, num_test = evaluation("test")
    # Counts of the data actually read (TFDS metadata may be absent, e.g. under mock data).
    info = dataclasses.replace(info, num_train=num_train,
                               num_validation=_cardinality_value(num_val, validation_size),
                               num_test=_cardinality_value(num_test, info.num_test))
    return train, val, test, info


def make_eval_dataset(name, *, split="test", batch_size=256, num_examples=None, data_dir=None,
                      idx_dir=DEFAULT_IDX_DIR, validation_size=5000, download=True):
    """Deterministic, unaugmented batches of the first ``num_examples`` of a split, for attacks.

    ``split`` is ``"test"``, ``"validation"`` (the held-out end of train) or ``"train"`` (the
    rest of train, as `make_datasets` trains on it). Returns ``(ds, info)``.
    """
    _check_name(name)
    check_int("batch_size", batch_size, 1)
    if split not in ("train", "validation", "test"):
        raise ValueError(f"split: expected 'train', 'validation' or 'test', got {split!r}")
    if split == "validation" and validation_size == 0:
        raise ValueError("validation_size: expected > 0 for split='validation', got 0")
    if num_examples is not None:
        check_int("num_examples", num_examples, 1)
    info = dataset_info(name, validation_size=validation_size, data_dir=data_dir, idx_dir=idx_dir)
    ds = _source(name, split, validation_size=validation_size, data_dir=data_dir, idx_dir=idx_dir,
                 download=download)
    if num_examples is not None:
        ds = ds.take(num_examples)
    ds = ds.batch(batch_size).map(_to_float, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE), info
