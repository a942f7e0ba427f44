"""Screen RVS and rvs_init variants cheaply by validation PGD-10 (and the FGSM-PGD gap, the sign of
catastrophic overfitting or masking), to pick the ones that get full rows in compare_methods.py (the test
images are never used for the choice).

  python benchmarks/screen_rvs_variants.py                 # every variant, ~2.5 min each on 2 CPU cores
  python benchmarks/screen_rvs_variants.py --variants=tanh,clean_ce
  python benchmarks/screen_rvs_variants.py --variants=init_base,init_k5 --lr_drop_epochs= --eps=0.2

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
# The learned initialisation (--method=rvs_init): FGSM-SDI's recipe, then one change each.
INIT = ["--method=rvs_init", "--generator_optimizer=adam", "--generator_lr=0.001", "--label_smoothing=0"]
VARIANTS.update({
    "init_base": INIT,
    "init_k5": INIT + ["--generator_every=5"],
    "init_ls0.4": INIT[:-1] + ["--label_smoothing=0.4"],
    "init_pairing": INIT + ["--pairing_weight=10"],
    "init_step1.25": INIT + ["--single_step_ratio=1.25"],
    "init_ot": INIT + ["--init_ot_weight=1"],
    "init_width64": INIT + ["--init_generator_width=64"],
    "init_pairing_ls0.4_k5": INIT[:-1] + ["--label_smoothing=0.4", "--pairing_weight=10", "--generator_every=5"],
    # N-FGSM's lesson inside the learned start: a start within 2 eps, one step of eps, no projection.
    "init_nfgsm": INIT + ["--init_start_ratio=2", "--noinit_project"],
    "init_start2": INIT + ["--init_start_ratio=2"],
    # N-FGSM's noise (2 eps, unprojected) under a learned offset of up to eps or half of it.
    "init_noise2": INIT + ["--init_noise_ratio=2", "--noinit_project"],
    "init_noise2_half": INIT + ["--init_noise_ratio=2", "--init_start_ratio=0.5", "--noinit_project"],
    # Its control: the same generator frozen at its random initialisation (does training it help?).
    "init_noise2_half_frozen": INIT + ["--init_noise_ratio=2", "--init_start_ratio=0.5", "--noinit_project",
                                       "--freeze_generator"],
})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--workdir", default=os.path.join(ROOT, "benchmarks", "runs", "screen"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps_per_epoch", type=int, default=150)
    parser.add_argument("--eps", default="0.1", help="as rvs-train's --eps")
    parser.add_argument("--lr_drop_epochs", default="2",
                        help="as rvs-train (default: the quick start's drop at epoch 2, unlike compare_methods.py)")
    options = parser.parse_args()
    names = options.variants.split(",")
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}")
    print(f"eps {options.eps}, lr drop at epoch(s) {options.lr_drop_epochs or 'none'}")
    print("| variant | flags | val PGD-10 / clean per epoch | kept epoch: PGD-10, clean, FGSM-PGD gap |")
    print("|---|---|---|---|")
    for name in names:
        folder = os.path.join(options.workdir, f"{name}_eps{options.eps}_drop{options.lr_drop_epochs or 'none'}")
        state_path = os.path.join(folder, "run", "checkpoints", "state.json")
        os.makedirs(folder, exist_ok=True)
        run([os.path.join(BIN, "rvs-train"), "--flagfile=flags/fashion_mnist.cfg", *VARIANTS[name],
             f"--epochs={options.epochs}", f"--steps_per_epoch={options.steps_per_epoch}",
             f"--lr_drop_epochs={options.lr_drop_epochs}", f"--eps={options.eps}", f"--workdir={folder}/run",
             "--noexport"],
            os.path.join(folder, "log.txt"))
        with open(state_path, encoding="utf-8") as handle:
            history = json.load(handle)["history"]
        epochs = sorted(history, key=int)
        per_epoch = ", ".join(f"{100 * history[e]['val_pgd_accuracy']:.1f} / "
                              f"{100 * history[e]['val_clean_accuracy']:.1f}" for e in epochs)
        kept = max(epochs, key=lambda e: history[e]["val_pgd_accuracy"])
        gap = history[kept].get("val_fgsm_accuracy", float("nan")) - history[kept]["val_pgd_accuracy"]
        print(f"| {name} | {' '.join(VARIANTS[name]) or '(none)'} | {per_epoch} | epoch {kept}: "
              f"{100 * history[kept]['val_pgd_accuracy']:.1f}, {100 * history[kept]['val_clean_accuracy']:.1f}, "
              f"{100 * gap:.1f} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
