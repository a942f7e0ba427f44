"""The standard ensemble searched in bfloat16 with some attacks kept in float32 (`float32_search`), on one
method-table row: does keeping an attack float32 close a gap between the two searches?

  .venv/bin/python benchmarks/bf16_keep_float32.py --row=fgsm_pgi_eps0.2 --keep=FMN,Square
  .venv/bin/python benchmarks/bf16_keep_float32.py --row=fgsm_pgi_eps0.2 --keep=all    # the float32 search

Searches `benchmarks/runs/<row>/run/best_classifier.keras` (the classifier of the row's export) through
its bfloat16 copy, with every verdict float32 as rvs-evaluate does, and prints the worst case, each
attack's cascade accuracy and the time. Results of 2026-12-07: benchmarks/results/bf16_keep_float32.txt.
"""
import argparse
import dataclasses
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from rvs_tf import evaluate, precision  # noqa: E402
from rvs_tf.data import make_eval_dataset  # noqa: E402
from rvs_tf.evaluate import ensemble, specs  # noqa: E402
from rvs_tf.evaluate.runner import Runner, materialise  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", required=True, help="a row of compare_methods.py with a run in benchmarks/runs")
    parser.add_argument("--keep", default="", help="comma-separated attack names kept in float32, or 'all'")
    parser.add_argument("--num_examples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run = os.path.join(HERE, "runs", args.row, "run")
    with open(os.path.join(run, "metadata.json"), encoding="utf-8") as handle:
        metadata = json.load(handle)
    model, _, _ = evaluate.load_model(os.path.join(run, "best_classifier.keras"))
    ds, _ = make_eval_dataset(metadata["dataset"], split="test", batch_size=500, num_examples=args.num_examples,
                              validation_size=0)
    x, y = materialise(ds, args.num_examples)
    keep = set(filter(None, args.keep.split(",")))
    chosen = [dataclasses.replace(s, float32_search="all" in keep or s.name in keep)
              for s in specs.resolve_attacks("standard")]
    unknown = keep - {s.name for s in chosen} - {"all"}
    if unknown:
        raise SystemExit(f"--keep: expected names of the standard ensemble {[s.name for s in chosen]} or "
                         f"'all', got {sorted(unknown)}")
    runner = Runner(model, x.shape[1:], 500, args.seed, False, norm=metadata.get("norm", "linf"),
                    search_model=precision.cast_copy(model, "mixed_bfloat16"))
    start = time.perf_counter()
    found = ensemble.run_ensemble(runner, chosen, x, y, float(metadata["eps"]), cascade=True)
    print(f"{args.row}, {len(y)} images, seed {args.seed}, kept in float32: {args.keep or 'none'}: worst case "
          f"{100 * found.robust.mean():.1f}% in {time.perf_counter() - start:.0f} s; cascade "
          + ", ".join(f"{r['name']} {100 * r['accuracy']:.1f}" for r in found.rows), flush=True)


if __name__ == "__main__":
    main()
