"""One evaluation process of tests/test_evaluate_scale.py: robustness_report on a tiny saved model.

  [TF_CONFIG=...] python tests/evaluate_worker.py MODEL.keras OUT_DIR STATE_DIR STRATEGY

STRATEGY is default, mirrored or multi_worker (created first: MultiWorkerMirroredStrategy must exist before
any other TensorFlow operation). Prints the report as one JSON line. Not collected by pytest.
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

from rvs_tf import distribute  # noqa: E402

if __name__ == "__main__":  # imported by the tests for ATTACKS and data(): read no arguments then
    MODEL, OUT_DIR, STATE_DIR, STRATEGY = sys.argv[1:5]
    strategy = distribute.get_strategy(STRATEGY, communication="ring") if STRATEGY == "multi_worker" else None

import numpy as np  # noqa: E402

from rvs_tf import evaluate  # noqa: E402

# Cheap attacks on a tiny model; eps 0.02 leaves about half the examples for the cascade.
ATTACKS = [evaluate.attack_spec("FGSM", "fgsm"), evaluate.attack_spec("PGD-50", "pgd", steps=50),
           evaluate.attack_spec("APGD-CE", "apgd", steps=10, loss="ce"),
           evaluate.attack_spec("Square", "square", queries=60)]


def data(model_path, n=40):
    """Random images labelled by the model itself, so every example is attacked."""
    import keras

    x = np.random.default_rng(0).uniform(0.2, 0.8, size=(n, 8, 8, 1)).astype("float32")
    return x, np.argmax(keras.saving.load_model(model_path, compile=False).predict(x, verbose=0), -1)


if __name__ == "__main__":
    x, y = data(MODEL)
    report = evaluate.robustness_report(
        MODEL, (x, y), eps=0.02, attacks=ATTACKS, batch_size=8, sweep_examples=8, sweep_eps=[0.1],
        output_dir=OUT_DIR if OUT_DIR != "-" else None, state_dir=STATE_DIR if STATE_DIR != "-" else None,
        strategy=strategy if STRATEGY == "multi_worker" else STRATEGY, progress=False, seed=3)
    print(json.dumps({"chief": distribute.is_chief(strategy), "report": report}, default=str), flush=True)
