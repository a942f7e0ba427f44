"""SavedModel export for TF Serving: `<export_dir>/<name>/<version>/`, classifier only.

Signature `serving_default`: input `images` float32 [batch, H, W, C] in [0, 1] (values outside are
refused with an error naming the range, never answered as if scaled); outputs `logits`,
`probabilities` and `classes`. Signature `serving_bytes` (BYTES_SIGNATURE): input `image_bytes` string
[batch], each an encoded PNG/JPEG/GIF/BMP (what TF Serving's REST API carries as `{"b64": ...}`), decoded,
converted to the model's channels and resized to its H x W (bilinear) inside the graph; same outputs.
The version is written to a hidden temporary folder beside its final place and renamed into place in
one step, so TF Serving (which polls the folder) and users never see a partial version, and a failed
export leaves earlier versions untouched. Run metadata (dataset, class names, eps, flags, metrics) goes in
`assets.extra/rvs_metadata.json`, the folder TF Serving reserves for extras.
"""
import json
import os
import re
import shutil
import tempfile

import keras
import tensorflow as tf

from rvs_tf import guards, precision
from rvs_tf.checkpoints import write_error

# The serving contract: what an exported version offers and what evaluation, serving and tests read.
SERVING_SIGNATURE = "serving_default"
BYTES_SIGNATURE = "serving_bytes"
IMAGES_INPUT = "images"
BYTES_INPUT = "image_bytes"
LOGITS_OUTPUT = "logits"
# The classifier's float32 logits computed in bfloat16, sharing the served weights: what rvs-evaluate's
# attacks search with on hardware that runs bfloat16 fast (their verdicts are float32, from serving_default).
SEARCH_SIGNATURE = "search_bfloat16"
OUTPUTS = (LOGITS_OUTPUT, "probabilities", "classes")  # of both signatures (see serving_function)
# Run metadata inside a version folder (not the training workdir's metadata, see rvs_tf.checkpoints).
VERSION_METADATA_FILE = os.path.join("assets.extra", "rvs_metadata.json")
DEFAULT_EXPORT_DIR = "saved_models"  # the export root the command lines default to
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a model name: it names a folder
SERVING_PRECISIONS = ("float32", "mixed_bfloat16")  # what an export may compute in


def versions(model_dir):
    """Integer versions present under `model_dir`, ascending (what TF Serving would consider)."""
    if not os.path.isdir(model_dir):
        return []
    return sorted(int(entry) for entry in os.listdir(model_dir)
                  if entry.isdigit() and os.path.isdir(os.path.join(model_dir, entry)))


def check_writable(export_dir, flag="--export_dir"):
    """Fail early, before any training, if exports could not be written under `export_dir`."""
    try:
        os.makedirs(export_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=export_dir, prefix=".write-check-"):
            pass
    except OSError as error:
        raise PermissionError(f"{flag}: cannot write exports under {export_dir!r}: "
                              f"{error.strerror or error}") from None


def serving_function(classifier, check_range=False):
    """The serving computation: float32 logits (even for a mixed-precision model), softmax, argmax.
    `check_range`: refuse images outside [0, 1] (what the float signature takes) with an
    InvalidArgumentError, which TF Serving returns as the request's error, instead of answering for
    mis-scaled pixels."""

    def serve(images):
        if check_range:
            images = guards.checked_images(images)
        logits = tf.cast(classifier(images, training=False), tf.float32)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits),
                "classes": tf.argmax(logits, axis=-1)}

    return serve


def search_function(classifier):
    """{"logits": float32 logits} of `classifier` computed in bfloat16 with the classifier's own
    variables (nothing is duplicated in the SavedModel), or None for a model Keras cannot clone."""
    try:
        fast = precision.cast_copy(classifier, "mixed_bfloat16")
    except ValueError:
        return None

    def search(images):
        logits, _ = fast.stateless_call([tf.convert_to_tensor(v) for v in classifier.trainable_variables],
                                        [tf.convert_to_tensor(v) for v in classifier.non_trainable_variables],
                                        images, training=False)
        return {LOGITS_OUTPUT: tf.cast(logits, tf.float32)}

    return search


def decode_images(image_bytes, image_shape):
    """Encoded images [batch] (string) -> float32 [batch, H, W, C] in [0, 1]: decoded with C channels
    (PNG/JPEG/GIF/BMP; colour converted as the decoders do) and resized to H x W when they differ."""
    height, width, channels = image_shape

    def decode(encoded):
        image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
        image = tf.image.convert_image_dtype(image, tf.float32)  # uint8 / 255
        same = tf.reduce_all(tf.equal(tf.shape(image)[:2], [height, width]))
        image = tf.cond(same, lambda: image, lambda: tf.image.resize(image, [height, width]))
        return tf.ensure_shape(image, [height, width, channels])

    return tf.map_fn(decode, image_bytes,
                     fn_output_signature=tf.TensorSpec([height, width, channels], tf.float32))


def bytes_serving_function(classifier):
    """`serving_function` behind `decode_images`: for clients that send encoded image files."""
    serve = serving_function(classifier)
    image_shape = tuple(classifier.input_shape[1:])
    if len(image_shape) != 3 or None in image_shape:
        raise ValueError(f"classifier: the bytes signature needs a fixed [H, W, C] input, got {image_shape}")

    def serve_bytes(image_bytes):
        return serve(decode_images(image_bytes, image_shape))

    return serve_bytes


def export_classifier(classifier, export_dir, name, *, version=None, metadata=None,
                      serving_precision="float32"):
    """Write `classifier` as `<export_dir>/<name>/<version>/` and return that path.

    Args:
        version: None takes the next free integer. An existing version is never overwritten.
        metadata: JSON-ready run metadata for `assets.extra/rvs_metadata.json`.
        serving_precision: see `write_savedmodel`.
    """
    if not NAME_PATTERN.match(name or ""):
        raise ValueError(f"name: expected letters, digits, '_', '-' or '.', got {name!r}")
    model_dir = os.path.join(export_dir, name)
    check_writable(model_dir)
    if version is None:
        version = (versions(model_dir) or [0])[-1] + 1
    if int(version) < 1:
        raise ValueError(f"version: expected a positive integer, got {version}")
    return write_savedmodel(classifier, os.path.join(model_dir, str(int(version))), metadata=metadata,
                            serving_precision=serving_precision,
                            kept=f"the earlier versions under {model_dir} are untouched")


def write_savedmodel(classifier, path, *, metadata=None, serving_precision="float32", kept=None):
    """Write `classifier`'s serving SavedModel (the signatures of the module docstring) at `path`, which
    must not exist: written to a hidden folder beside it and renamed into place, so it appears whole or
    not at all. Returns `path`.

    Args:
        metadata: JSON-ready run metadata for `assets.extra/rvs_metadata.json`.
        serving_precision: what the exported graph computes in. "float32" (the default, whatever the
            classifier trained in: clients and evaluations see float32 logits), or "mixed_bfloat16"
            (faster on CPUs with AMX and recent GPUs; logits still float32). Signatures are float32
            either way, and the metadata records it.
        kept: what a failed write leaves untouched, for its error message.
    """
    if not isinstance(classifier, keras.Model):
        raise ValueError(f"classifier: expected a keras.Model, got {type(classifier).__name__}")
    if serving_precision not in SERVING_PRECISIONS:
        raise ValueError(f"serving_precision: expected one of {', '.join(SERVING_PRECISIONS)}, "
                         f"got {serving_precision!r}")
    bad = guards.non_finite_variables(classifier.weights)
    if bad:
        raise ValueError(f"classifier: non-finite weights (NaN or Inf) in {', '.join(bad[:3])}; refusing to "
                         "export a diverged model (retrain it, or export an earlier checkpoint)")
    if os.path.exists(path):
        raise FileExistsError(f"version: {path!r} exists already; exports are never overwritten")
    computed = precision.mixed_policies(classifier) or ["float32"]
    if computed != [serving_precision]:
        classifier = precision.cast_copy(classifier, serving_precision)
    metadata = {**(metadata or {}), "serving_precision": serving_precision}
    image_shape = tuple(classifier.input_shape[1:])
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(path)}-", dir=parent)
    try:
        archive = keras.export.ExportArchive()
        archive.track(classifier)
        archive.add_endpoint(
            SERVING_SIGNATURE, serving_function(classifier, check_range=True),
            input_signature=[tf.TensorSpec([None, *image_shape], tf.float32, name=IMAGES_INPUT)])
        archive.add_endpoint(
            BYTES_SIGNATURE, bytes_serving_function(classifier),
            input_signature=[tf.TensorSpec([None], tf.string, name=BYTES_INPUT)])
        search = search_function(classifier)
        if search is not None:
            archive.add_endpoint(SEARCH_SIGNATURE, search, input_signature=[
                tf.TensorSpec([None, *image_shape], tf.float32, name=IMAGES_INPUT)])
        archive.write_out(staging, verbose=False)
        os.makedirs(os.path.join(staging, "assets.extra"), exist_ok=True)
        with open(os.path.join(staging, VERSION_METADATA_FILE), "w", encoding="utf-8") as handle:
            json.dump(metadata, handle, indent=2, sort_keys=True, default=str)
        os.rename(staging, path)  # atomic on one filesystem: the version appears whole or not at all
    except (OSError, tf.errors.OpError) as error:  # a full disk, a read-only folder
        shutil.rmtree(staging, ignore_errors=True)
        raise write_error(path, error, kept=kept or "nothing was written") from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def read_metadata(version_dir):
    """The run metadata of an exported version ({} if it has none)."""
    path = os.path.join(version_dir, VERSION_METADATA_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def resolve_model_path(path):
    """`saved_models/<name>/<version>`, `saved_models/<name>` (highest integer version, as TF Serving does)
    or a `.keras` file -> (path, version or None)."""
    path = os.fspath(path)
    if path.endswith(".keras"):
        if not os.path.isfile(path):
            raise ValueError(f"model: expected a .keras file, got no file at {path!r}")
        return path, None
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        base = os.path.basename(os.path.normpath(path))
        return path, int(base) if base.isdigit() else None
    found = [v for v in versions(path) if os.path.isfile(os.path.join(path, str(v), "saved_model.pb"))]
    if not found:
        raise ValueError(f"model: expected a SavedModel directory, a folder of integer versions of one, or a "
                         f".keras file, found none at {path!r}")
    return os.path.join(path, str(max(found))), max(found)


def load_versions(model_dir):
    """{version: loaded SavedModel} for every integer version under `model_dir`, as TF Serving loads them."""
    found = versions(model_dir)
    if not found:
        raise FileNotFoundError(f"model_dir: expected integer versions under {model_dir!r}, got none")
    return {v: tf.saved_model.load(os.path.join(model_dir, str(v))) for v in found}


def image_signature(loaded, where):
    """The checked `serving_default` of a loaded SavedModel: (signature, name of its one image input);
    it must return `logits`. `where` names the model in errors."""
    if SERVING_SIGNATURE not in loaded.signatures:
        raise ValueError(f"model: expected a {SERVING_SIGNATURE!r} signature in the SavedModel at {where!r}, "
                         f"got {sorted(loaded.signatures)}")
    signature = loaded.signatures[SERVING_SIGNATURE]
    inputs = list(signature.structured_input_signature[1])
    if len(inputs) != 1:
        raise ValueError(f"model: expected {SERVING_SIGNATURE} to take one image input, got {inputs}")
    outputs = signature.structured_outputs
    if LOGITS_OUTPUT not in outputs:
        raise ValueError(f"model: expected {SERVING_SIGNATURE} to return {LOGITS_OUTPUT!r}, "
                         f"got {sorted(outputs)}")
    return signature, inputs[0]
