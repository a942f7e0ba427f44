"""Run an rvs_tf command line with TFDS mocked (tfds.testing.mock_data), as a user would run it with the
dataset downloaded: the same flags, the same loading code, random images of the dataset's real shape.

  python tests/tfds_mock_cli.py rvs-train|rvs-evaluate [FLAGS...]

Used by tests/test_data.py (CIFAR and SVHN cannot be downloaded here). Not collected by pytest.
"""
import importlib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow_datasets as tfds  # noqa: E402

COMMANDS = {"rvs-train": "rvs_tf.cli.train", "rvs-evaluate": "rvs_tf.cli.evaluate"}

if __name__ == "__main__":
    command, flags = sys.argv[1], sys.argv[2:]
    module = importlib.import_module(COMMANDS[command])
    sys.argv = [command, *flags]
    with tfds.testing.mock_data(num_examples=64):
        module.run()
