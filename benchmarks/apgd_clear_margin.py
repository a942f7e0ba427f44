"""What going on until an example is misclassified clearly costs APGD: APGD-CE 100 steps on the first 250
test images of the N-FGSM row's export, stopping at the first misclassified point (CLEAR_MARGIN = 0, the
previous behaviour) and at the first clearly misclassified one (the default), in turn, in one process.

  .venv/bin/python benchmarks/apgd_clear_margin.py [--model=benchmarks/runs/nfgsm/export/nfgsm]
"""
import argparse
import time

import numpy as np
import tensorflow as tf

from rvs_tf import attacks, data
from rvs_tf.evaluate.models import load_model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="benchmarks/runs/nfgsm/export/nfgsm")
    parser.add_argument("--num_examples", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=2)
    options = parser.parse_args()
    logits_fn, _, _ = load_model(options.model)
    x, y = data.load_idx_arrays(data.DEFAULT_IDX_DIR, "test")
    x, y = tf.constant(x[:options.num_examples]), y[:options.num_examples].astype(np.int32)
    for round_ in range(options.rounds):
        for clear in (0.0, attacks.CLEAR_MARGIN):
            previous, attacks.CLEAR_MARGIN = attacks.CLEAR_MARGIN, clear  # read when the attack is traced
            attack = tf.function(lambda: attacks.apgd(logits_fn, x, tf.constant(y), eps=0.1, steps=100,
                                                      seed=tf.constant([1, 2], tf.int64)))
            attack.get_concrete_function()
            start = time.perf_counter()
            logits = logits_fn(attack()).numpy()
            seconds = time.perf_counter() - start
            attacks.CLEAR_MARGIN = previous
            wrong = logits.argmax(1) != y
            margin = np.where(np.eye(logits.shape[1], dtype=bool)[y], -np.inf, logits).max(1) - logits[
                np.arange(len(y)), y]
            print(f"round {round_}, CLEAR_MARGIN {clear}: {seconds:.1f} s, {wrong.sum()} broken, smallest "
                  f"margin of a broken example {margin[wrong].min():.2g}", flush=True)


if __name__ == "__main__":
    main()
