"""rvs-export: write a trained classifier as a TF Serving SavedModel version.

  rvs-export --model=runs/fashion_mnist_idx_rvs            # a training workdir: its best classifier
  rvs-export --model=my_classifier.keras --name=mine --dataset=fashion_mnist_idx --eps=0.1

Exports go to <export_dir>/<name>/<version>/ (next free version unless --version is given).
"""
import json
import os

from absl import flags, logging

from rvs_tf import export
from rvs_tf.cli import errors
from rvs_tf.cli.flag_types import DEFINE_fraction

FLAGS = flags.FLAGS

flags.DEFINE_string("model", None, "A training workdir (holding best_classifier.keras) or a .keras file "
                    "of a classifier mapping images in [0, 1] to logits.")
flags.DEFINE_string("name", None, "Model name under --export_dir (default: the workdir's run name or "
                    "the .keras file's stem).")
flags.DEFINE_string("export_dir", export.DEFAULT_EXPORT_DIR, "Root of the TF Serving exports.")
flags.DEFINE_integer("version", None, "Version number (default: the next free one).", lower_bound=1)
flags.DEFINE_string("dataset", None, "Dataset name recorded in the metadata (for a bare .keras file).")
DEFINE_fraction("eps", None, "eps recorded in the metadata (for a bare .keras file).", lower=0.0, upper=1.0)
flags.mark_flag_as_required("model")


def load_source(path):
    """(classifier, metadata, default name) from a workdir or a .keras file."""
    import keras

    import rvs_tf  # noqa: F401  (registers rvs_tf's Keras classes for load_model)
    from rvs_tf.checkpoints import CLASSIFIER_FILE, WORKDIR_METADATA_FILE

    if os.path.isdir(path):
        classifier_path = os.path.join(path, CLASSIFIER_FILE)
        if not os.path.isfile(classifier_path):
            raise FileNotFoundError(f"--model: {path!r} has no {CLASSIFIER_FILE}; has its training "
                                    "run finished?")
        metadata = {}
        if os.path.isfile(os.path.join(path, WORKDIR_METADATA_FILE)):
            with open(os.path.join(path, WORKDIR_METADATA_FILE), encoding="utf-8") as handle:
                metadata = json.load(handle)
        return keras.models.load_model(classifier_path), metadata, os.path.basename(os.path.normpath(path))
    if path.endswith(".keras") and os.path.isfile(path):
        stem = os.path.splitext(os.path.basename(path))[0]
        return keras.models.load_model(path), {}, stem
    raise FileNotFoundError(f"--model: expected a training workdir or a .keras file, got {path!r}")


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:  # TF's INFO lines about the SavedModel it writes hide our messages
        logging.set_verbosity(logging.WARNING)
    classifier, metadata, default_name = load_source(FLAGS.model)
    metadata.update({key: FLAGS[key].value for key in ("dataset", "eps") if FLAGS[key].value})
    path = export.export_classifier(classifier, FLAGS.export_dir, FLAGS.name or default_name,
                                    version=FLAGS.version, metadata=metadata)
    print(f"Exported to {path}")


def run():
    errors.run("rvs-export", main)


if __name__ == "__main__":
    run()
