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

from rvs_tf import guards
from rvs_tf.checkpoints import write_error

METADATA_FILE = os.path.join("assets.extra", "rvs_metadata.json")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


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


BYTES_SIGNATURE = "serving_bytes"


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


def export_classifier(classifier, export_dir, name, *, version=None, metadata=None):
    """Write `classifier` as `<export_dir>/<name>/<version>/` and return that path.

    `version` None takes the next free integer. An existing version is never overwritten.
    """
    if not isinstance(classifier, keras.Model):
        raise ValueError(f"classifier: expected a keras.Model, got {type(classifier).__name__}")
    if not _NAME.match(name or ""):
        raise ValueError(f"name: expected letters, digits, '_', '-' or '.', got {name!r}")
    bad = guards.non_finite_variables(classifier.weights)
    if bad:
        raise ValueError(f"classifier: non-finite weights (NaN or Inf) in {', '.join(bad[:3])}; refusing to "
                         "export a diverged model (retrain it, or export an earlier checkpoint)")
    model_dir = os.path.join(export_dir, name)
    check_writable(model_dir)
    if version is None:
        version = (versions(model_dir) or [0])[-1] + 1
    if int(version) < 1:
        raise ValueError(f"version: expected a positive integer, got {version}")
    final = os.path.join(model_dir, str(int(version)))
    if os.path.exists(final):
        raise FileExistsError(f"version: {final!r} exists already; exports are never overwritten")

    image_shape = tuple(classifier.input_shape[1:])
    staging = tempfile.mkdtemp(prefix=f".tmp-{int(version)}-", dir=model_dir)
    try:
        archive = keras.export.ExportArchive()
        archive.track(classifier)
        archive.add_endpoint(
            "serving_default", serving_function(classifier, check_range=True),
            input_signature=[tf.TensorSpec([None, *image_shape], tf.float32, name="images")])
        archive.add_endpoint(
            BYTES_SIGNATURE, bytes_serving_function(classifier),
            input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        archive.write_out(staging, verbose=False)
        os.makedirs(os.path.join(staging, "assets.extra"), exist_ok=True)
        with open(os.path.join(staging, METADATA_FILE), "w", encoding="utf-8") as handle:
            json.dump(metadata or {}, handle, indent=2, sort_keys=True, default=str)
        os.rename(staging, final)  # atomic on one filesystem: the version appears whole or not at all
    except (OSError, tf.errors.OpError) as error:  # a full disk, a read-only folder
        shutil.rmtree(staging, ignore_errors=True)
        raise write_error(final, error, kept=f"the earlier versions under {model_dir} are untouched") from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def read_metadata(version_dir):
    path = os.path.join(version_dir, METADATA_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


if __name__ == "__main__":
    from rvs_tf.cli import export as _cli

    _cli.run()
