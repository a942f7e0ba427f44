"""Equal strength of the bfloat16 attack search: the same ensemble on the same images of each model,
searched in float32 and in bfloat16 (verdicts always float32), in one process; per-example agreement.

  .venv/bin/python benchmarks/bf16_attacks.py --rows=pgd,nfgsm,rvs        # exports of compare_methods rows
  .venv/bin/python benchmarks/bf16_attacks.py --models=saved_models/fashion_mnist_rvs/1

Appends one JSON line per model to benchmarks/results/bf16_attacks.jsonl (kept in git) and prints a
Markdown row: worst case in each precision, the difference (goal: within 0.5 points), examples robust in
one search only, the attacks whose cascade accuracy differs, and the time of each (`--table` prints the
rows of the results file, one per model: its run on the most images).
"""
import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from rvs_tf import evaluate  # noqa: E402
from rvs_tf.data import make_eval_dataset  # noqa: E402
from rvs_tf.evaluate import ensemble, specs  # noqa: E402
from rvs_tf.evaluate.models import search_model  # noqa: E402
from rvs_tf.evaluate.runner import Runner, materialise  # noqa: E402
from rvs_tf.threat_model import parse_norm  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def measure(path, attacks, num_examples, batch_size, seed, data=None):
    """The comparison for one export, on `data` (images, labels) or the first `num_examples` test images
    of the dataset its metadata names."""
    logits_fn, metadata, _ = evaluate.load_model(path)
    if data is None:
        ds, _ = make_eval_dataset(metadata["dataset"], split="test", batch_size=batch_size,
                                  num_examples=num_examples, validation_size=0)
        data = materialise(ds, num_examples)
    x, y = data
    eps, attack_specs = float(metadata["eps"]), specs.resolve_attacks(attacks)
    norm = parse_norm(metadata.get("norm", "linf"))  # the model's threat model, as rvs-evaluate takes it
    specs.check_norm(attack_specs, norm)
    out = {"model": os.path.relpath(os.path.abspath(path), os.path.dirname(HERE)), "eps": eps, "norm": norm,
           "attacks": attacks, "examples": int(len(y)), "seed": seed}
    robust = {}
    for policy in ("float32", "mixed_bfloat16"):
        search, used, note = search_model(logits_fn, policy)
        if used != policy:
            raise SystemExit(f"{path}: searched in {used}, not {policy}: {note}")
        runner = Runner(logits_fn, x.shape[1:], batch_size, seed, False, search_model=search, norm=norm)
        start = time.perf_counter()
        found = ensemble.run_ensemble(runner, attack_specs, x, y, eps, cascade=True)
        out[policy] = {"seconds": time.perf_counter() - start, "worst_case": float(found.robust.mean()),
                       "per_attack": {r["name"]: r["accuracy"] for r in found.rows},
                       "rechecked_in_float32": dict(runner.rechecked)}
        robust[policy] = found.robust
    out["difference_points"] = 100 * (out["mixed_bfloat16"]["worst_case"] - out["float32"]["worst_case"])
    out["robust_in_float32_only"] = int(np.sum(robust["float32"] & ~robust["mixed_bfloat16"]))
    out["robust_in_bfloat16_only"] = int(np.sum(robust["mixed_bfloat16"] & ~robust["float32"]))
    out["speedup"] = out["float32"]["seconds"] / out["mixed_bfloat16"]["seconds"]
    return out


HEADER = ("| model | threat model | images | float32 search | bfloat16 search | difference | robust in one only "
          "(f32 / bf16) | attacks that differ | time f32 / bf16 |\n|---|---|---|---|---|---|---|---|---|")


def label(path):
    """The method table's row name for its export (benchmarks/runs/<row>/export/<row>), else the path."""
    parts = path.split("/")
    if len(parts) == 5 and parts[:2] == ["benchmarks", "runs"] and parts[2] == parts[4] and parts[3] == "export":
        return parts[2]
    return path


def latest_per_model(outs):
    """One result per model, attack preset and seed: the one on the most images (the later of equal ones), so
    a rerun on more images (whose first images are the earlier run's) replaces the earlier row, in its place."""
    chosen = {}
    for out in outs:
        key = (out["model"], str(out["attacks"]), out.get("seed", 0))
        if key not in chosen or out["examples"] >= chosen[key]["examples"]:
            chosen[key] = out
    return list(chosen.values())


def row(out):
    """One Markdown row: worst cases in %, the difference in points, and the attacks whose cascade
    accuracy differs between the two searches (the first of them is where they part)."""
    differ = [f"{name} {100 * (out['mixed_bfloat16']['per_attack'][name] - acc):+.1f}"
              for name, acc in out["float32"]["per_attack"].items()
              if out["mixed_bfloat16"]["per_attack"][name] != acc]
    threat = f"{'L2' if out['norm'] == 'l2' else 'L-inf'} {out['eps']:g}"
    return (f"| {label(out['model'])} | {threat} | {out['examples']} | {100 * out['float32']['worst_case']:.1f} | "
            f"{100 * out['mixed_bfloat16']['worst_case']:.1f} | {out['difference_points']:+.1f} | "
            f"{out['robust_in_float32_only']} / {out['robust_in_bfloat16_only']} | {', '.join(differ) or 'none'} | "
            f"{out['float32']['seconds']:.0f} / {out['mixed_bfloat16']['seconds']:.0f} s ({out['speedup']:.2f}x) |")


def seed_lines(outs):
    """For each model measured with several attack seeds: each search's worst case per seed, so the gap
    between the searches can be read against the float32 search's own spread over seeds."""
    by_model = {}
    for out in outs:
        by_model.setdefault((out["model"], str(out["attacks"]), out["examples"]), []).append(out)
    lines = []
    for (model, _, examples), runs in by_model.items():
        if len(runs) < 2:
            continue
        runs.sort(key=lambda out: out.get("seed", 0))
        seeds = ", ".join(str(out.get("seed", 0)) for out in runs)
        lines.append(f"{label(model)}, {examples} images, seeds {seeds}: float32 search "
                     f"{_spread(runs, 'float32')}, bfloat16 search {_spread(runs, 'mixed_bfloat16')}")
    return lines


def _spread(runs, policy):
    """Worst cases of one search over `runs`, e.g. "20.3 / 21.0% (spread 0.7)"."""
    values = [100 * out[policy]["worst_case"] for out in runs]
    return f"{' / '.join(f'{v:.1f}' for v in values)}% (spread {max(values) - min(values):.1f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="", help="rows of compare_methods.py (their exports in benchmarks/runs)")
    parser.add_argument("--models", default="", help="comma-separated export paths")
    parser.add_argument("--attacks", default="standard")
    parser.add_argument("--num_examples", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table", action="store_true", help="print the table of the results file and stop")
    args = parser.parse_args()
    results = os.path.join(HERE, "results", "bf16_attacks.jsonl")
    print(HEADER, flush=True)
    if args.table:
        with open(results, encoding="utf-8") as handle:
            every_seed = latest_per_model([json.loads(line) for line in handle])
        outs = [out for out in every_seed if out.get("seed", 0) == 0]  # the table: seed 0, as rvs-evaluate
        print("\n".join(map(row, outs)))
        print(f"\n{len(outs)} models, {sum(out['examples'] for out in outs)} examples: "
              f"{sum(out['robust_in_float32_only'] for out in outs)} robust to the float32 search only, "
              f"{sum(out['robust_in_bfloat16_only'] for out in outs)} to the bfloat16 search only; differences "
              f"from {min(out['difference_points'] for out in outs):+.1f} to "
              f"{max(out['difference_points'] for out in outs):+.1f} points")
        print("\n".join(seed_lines(every_seed)))
        return
    paths = [os.path.join(HERE, "runs", name, "export", name) for name in filter(None, args.rows.split(","))]
    paths += list(filter(None, args.models.split(",")))
    for path in paths:
        out = measure(path, args.attacks, args.num_examples, args.batch_size, args.seed)
        with open(results, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(out, sort_keys=True) + "\n")
        print(row(out), flush=True)


if __name__ == "__main__":
    main()
