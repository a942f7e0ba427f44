"""Screen RVS variants cheaply by validation PGD-10, to pick the one that gets a full row in
compare_methods.py (the test images are never used for the choice).

  python benchmarks/screen_rvs_variants.py                 # every variant, ~2.5 min each on 2 CPU cores
  python benchmarks/screen_rvs_variants.py --variants=tanh,clean_ce

Each variant is `rvs-train --flagfile=flags/fashion_mnist.cfg` with compare_methods.py's budget (3 epochs of
150 steps) but the quick start's lr drop at epoch 2, plus the variant's flags; the table gives, per epoch, validation PGD-10 and clean accuracy (2,000 held-out training
images) and the epoch the run would keep (best validation PGD-10). Finished variants are skipped on rerun.
"""
import argparse
import json
import os
import sys

from compare_methods import BIN, ROOT, run

VARIANTS = {
    "authors": [],  # flags/fashion_mnist.cfg as it is: absolute OT epsilon 0.01, clip bound, weight 1
    "ot_mean": ["--ot_cost_scale=mean"],
    "ot_weight10": ["--ot_weight=10"],
    "ot_mean_weight10": ["--ot_cost_scale=mean", "--ot_weight=10"],
    "debiased": ["--ot_cost_scale=mean", "--ot_debiased"],
    "clean_ce": ["--clean_ce_weight=1"],
    "tanh": ["--bound=tanh"],
    "generator_adam": ["--generator_optimizer=adam", "--generator_lr=0.001"],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--workdir", default=os.path.join(ROOT, "benchmarks", "runs", "screen"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps_per_epoch", type=int, default=150)
    parser.add_argument("--lr_drop_epochs", default="2",
                        help="as rvs-train (default: the quick start's drop at epoch 2, unlike compare_methods.py)")
    options = parser.parse_args()
    names = options.variants.split(",")
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}")
    print("| variant | flags | val PGD-10 / clean per epoch | kept epoch: PGD-10, clean |")
    print("|---|---|---|---|")
    for name in names:
        folder = os.path.join(options.workdir, name)
        state_path = os.path.join(folder, "run", "checkpoints", "state.json")
        os.makedirs(folder, exist_ok=True)
        run([os.path.join(BIN, "rvs-train"), "--flagfile=flags/fashion_mnist.cfg", *VARIANTS[name],
             f"--epochs={options.epochs}", f"--steps_per_epoch={options.steps_per_epoch}",
             f"--lr_drop_epochs={options.lr_drop_epochs}", f"--workdir={folder}/run", "--noexport"],
            os.path.join(folder, "log.txt"))
        with open(state_path, encoding="utf-8") as handle:
            history = json.load(handle)["history"]
        epochs = sorted(history, key=int)
        per_epoch = ", ".join(f"{100 * history[e]['val_pgd_accuracy']:.1f} / "
                              f"{100 * history[e]['val_clean_accuracy']:.1f}" for e in epochs)
        kept = max(epochs, key=lambda e: history[e]["val_pgd_accuracy"])
        print(f"| {name} | {' '.join(VARIANTS[name]) or '(none)'} | {per_epoch} | epoch {kept}: "
              f"{100 * history[kept]['val_pgd_accuracy']:.1f}, {100 * history[kept]['val_clean_accuracy']:.1f} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
