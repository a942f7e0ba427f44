"""One worker of the two-process MultiWorkerMirroredStrategy test (tests/test_distribute.py starts it).

  TF_CONFIG='{"cluster": {"worker": [...]}, "task": {"type": "worker", "index": I}}' \
      python tests/multiworker_worker.py OUT_DIR

Trains a small RVSModel for a few steps on this worker's shard of a fixed dataset, checkpoints and exports
through `rvs_tf.distribute.worker_dir` (so only the chief's copy lands in OUT_DIR), then writes its final
weights to OUT_DIR/weights-<index>.npz for the test to compare. Not collected by pytest (no test_ prefix).
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

from rvs_tf import distribute  # noqa: E402

strategy = distribute.get_strategy("multi_worker", communication="ring")  # before any other TF op

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from rvs_tf import export  # noqa: E402
from rvs_tf.checkpoints import RunCheckpoint  # noqa: E402
from rvs_tf.models import make_generator  # noqa: E402
from rvs_tf.training import RVSModel  # noqa: E402

SHAPE, CLASSES, STEPS, GLOBAL_BATCH = (8, 8, 1), 3, 3, 16


def classifier():
    inputs = keras.Input(SHAPE)
    h = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(inputs)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(8, activation="relu", name="features")(h)
    return keras.Model(inputs, keras.layers.Dense(CLASSES)(h))


def dataset():
    rng = np.random.default_rng(0)  # the same data on every worker; each trains on its own shard
    x = rng.uniform(size=(GLOBAL_BATCH * STEPS, *SHAPE)).astype("float32")
    y = rng.integers(0, CLASSES, len(x)).astype("int64")
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH).with_options(options)


def main(out_dir):
    _, index = distribute.task(strategy)
    keras.utils.set_random_seed(0)  # the same initial weights everywhere (MWMS also broadcasts them)
    with strategy.scope():
        model = RVSModel(classifier(), make_generator(8, SHAPE, base_channels=8), eps=0.1,
                         ot_epsilon=0.1, ot_max_iters=30, eval_pgd_steps=2)
        model.compile(classifier_optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                      generator_optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    trainable = model.classifier.trainable_variables + model.generator.trainable_variables
    initial = [v.numpy().copy() for v in trainable]
    checkpoints = distribute.worker_dir(os.path.join(out_dir, "checkpoints"), strategy)
    history = model.fit(dataset(), epochs=1, verbose=0,
                        callbacks=[RunCheckpoint(checkpoints, monitor="loss", mode="min")]).history
    exports = distribute.worker_dir(os.path.join(out_dir, "saved_models"), strategy)
    export.export_classifier(model.classifier, exports, "demo")
    for path in (checkpoints, exports):
        distribute.discard_worker_dir(path, strategy)
    # Trainable weights only: Keras 3 BatchNormalization keeps its moving statistics per replica
    # (aggregation "none"), so those differ between workers unless the layers are `synchronized=True`.
    np.savez(os.path.join(out_dir, f"weights-{index}.npz"),
             **{f"w{i}": v.numpy() for i, v in enumerate(trainable)},
             **{f"init{i}": w for i, w in enumerate(initial)})
    print(json.dumps({"index": index, "chief": distribute.is_chief(strategy), "scratch": checkpoints,
                      "replicas": strategy.num_replicas_in_sync,
                      "loss": float(history["loss"][-1])}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
