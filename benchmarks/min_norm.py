"""The minimum-norm attack's settings, chosen on validation images (never the test images): FMN with
0, 3 or 9 targeted runs beside its untargeted one, on the same held-out training images of each model.

  .venv/bin/python benchmarks/min_norm.py --models=benchmarks/runs/rvs/export/rvs,benchmarks/runs/pgd_l2/export/pgd_l2

For each model, at its training norm and eps: APGD-CE then APGD-T (cascade, the ensemble's white-box part)
and, for each FMN setting, its median radius, how many examples it breaks at eps, how many of those the
APGDs missed (what FMN adds to the worst case), and its time. Appends one JSON line per model to
benchmarks/results/min_norm.jsonl (kept in git) and prints a Markdown table.
"""
import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from rvs_tf import attacks, evaluate, min_norm  # noqa: E402
from rvs_tf.data import make_eval_dataset  # noqa: E402
from rvs_tf.evaluate.runner import materialise  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def batched(fn, x, y, size):
    outs = [fn(tf.constant(x[i:i + size]), tf.constant(y[i:i + size])) for i in range(0, len(y), size)]
    return [np.concatenate([o[k].numpy() for o in outs]) for k in range(len(outs[0]))]


def measure(path, num_examples, batch_size, targets, steps):
    model, metadata, _ = evaluate.load_model(path)
    norm, eps = metadata.get("norm", "linf"), float(metadata["eps"])
    ds, _ = make_eval_dataset(metadata["dataset"], split="validation", batch_size=batch_size,
                              num_examples=num_examples, validation_size=2000)
    x, y = materialise(ds, num_examples)
    predict = lambda v: np.argmax(attacks.model_logits(model, tf.constant(v)).numpy(), -1)  # noqa: E731
    correct = predict(x) == y
    out = {"model": path, "norm": norm, "eps": eps, "examples": int(len(y)), "split": "validation",
           "clean": float(correct.mean())}
    t0 = time.perf_counter()
    robust = correct.copy()
    for kwargs in (dict(loss="ce"), dict(loss="dlr", targeted=True, num_targets=9)):
        idx = np.flatnonzero(robust)
        run = tf.function(lambda a, b, kw=kwargs: (attacks.apgd(model, a, b, eps=eps, steps=100, seed=0,
                                                                 norm=norm, **kw),))
        (x_adv,) = batched(run, x[idx], y[idx], batch_size)
        robust[idx[predict(x_adv) != y[idx]]] = False
    out["apgd"] = {"robust": float(robust.mean()), "seconds": time.perf_counter() - t0}
    out["fmn"] = []
    for k in targets:
        t0 = time.perf_counter()
        idx = np.flatnonzero(correct)
        run = tf.function(lambda a, b, k=k: min_norm.minimum_norm(model, a, b, norm=norm, steps=steps,
                                                                  num_targets=k))
        x_adv, radius_found = batched(run, x[idx], y[idx], batch_size)
        radius = np.zeros(len(y))
        radius[idx] = np.where(predict(x_adv) != y[idx], radius_found, np.inf)
        broken = radius <= eps
        out["fmn"].append({"num_targets": k, "steps": steps, "median_radius": float(np.median(radius)),
                           "broken_at_eps": int(np.sum(broken & correct)),
                           "added_to_apgd": int(np.sum(broken & robust)),
                           "robust_with_apgd": float(np.mean(robust & ~broken)),
                           "seconds": time.perf_counter() - t0})
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", required=True, help="comma-separated exports (folders of versions)")
    parser.add_argument("--num_examples", type=int, default=500)
    parser.add_argument("--batch_size", type=int, default=500)
    parser.add_argument("--targets", default="0,3,9", help="comma-separated numbers of targeted runs")
    parser.add_argument("--steps", type=int, default=100)
    options = parser.parse_args()
    rows = []
    for path in options.models.split(","):
        row = measure(path, options.num_examples, options.batch_size,
                      [int(t) for t in options.targets.split(",")], options.steps)
        rows.append(row)
        with open(os.path.join(HERE, "results", "min_norm.jsonl"), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
    print("| model | norm, eps | clean | APGD-CE+T robust | FMN targets | median radius | broken at eps | "
          "added to APGD | robust with APGD | FMN s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        for fmn in row["fmn"]:
            print(f"| {row['model']} | {row['norm']} {row['eps']:g} | {100 * row['clean']:.1f} | "
                  f"{100 * row['apgd']['robust']:.1f} | {fmn['num_targets']} | {fmn['median_radius']:.4g} | "
                  f"{fmn['broken_at_eps']} | {fmn['added_to_apgd']} | {100 * fmn['robust_with_apgd']:.1f} | "
                  f"{fmn['seconds']:.0f} |")


if __name__ == "__main__":
    main()
