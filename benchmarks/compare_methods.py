"""Every defence, and the RVS ablations, under one roof: same data, model, optimiser, budget, test images
and attack ensemble; only the method differs. Writes benchmarks/RESULTS.md and benchmarks/tradeoff.png.

  python benchmarks/compare_methods.py                      # every row (hours on 2 CPU cores)
  python benchmarks/compare_methods.py --rows=natural,pgd,rvs
  python benchmarks/compare_methods.py --report_only        # rebuild RESULTS.md / tradeoff.png

Each row is `rvs-train --flagfile=flags/fashion_mnist.cfg` plus the row's flags and the shared budget,
then `rvs-evaluate` on the first --eval_examples test images. Finished rows are kept under --workdir and
skipped on the next run, so an interrupted comparison resumes where it stopped.
"""
import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BIN = os.path.dirname(sys.executable)

# name: (flags, what the row is). Baselines use their papers' settings, named in the row.
ROWS = {
    "natural": (["--method=natural", "--label_smoothing=0"], "natural training"),
    "natural_ls0.5": (["--method=natural", "--label_smoothing=0.5"], "natural training, label smoothing 0.5"),
    "fgsm_rs": (["--method=fgsm_rs", "--fgsm_step_ratio=1.25", "--label_smoothing=0"],
                "FGSM-RS (Wong et al. 2020): uniform start, step 1.25 eps"),
    "pgd": (["--method=pgd", "--pgd_steps=10", "--label_smoothing=0"],
            "PGD-AT (Madry et al. 2018): 10 steps of 2.5 eps/10, random start"),
    "pgd_seed1": (["--method=pgd", "--pgd_steps=10", "--label_smoothing=0", "--seed=1"], "PGD-AT, seed 1"),
    "trades": (["--method=trades", "--pgd_steps=10", "--trades_beta=6", "--label_smoothing=0"],
               "TRADES (Zhang et al. 2019): beta 6, 10 KL steps of eps/4"),
    # Controls: the baselines with RVS's label smoothing 0.5 (flags/fashion_mnist.cfg sets it for every
    # method; the first comparison ran them so by mistake, and the rows are kept as evidence).
    "fgsm_rs_ls0.5": (["--method=fgsm_rs", "--fgsm_step_ratio=1.25", "--label_smoothing=0.5"],
                      "FGSM-RS with label smoothing 0.5"),
    "pgd_ls0.5": (["--method=pgd", "--pgd_steps=10", "--label_smoothing=0.5"], "PGD-AT with label smoothing 0.5"),
    "trades_ls0.5": (["--method=trades", "--pgd_steps=10", "--trades_beta=6", "--label_smoothing=0.5"],
                     "TRADES with label smoothing 0.5"),
    "rvs": (["--method=rvs"], "RVS, the authors' step (alternating), label smoothing 0.5"),
    "rvs_seed1": (["--method=rvs", "--seed=1"], "RVS, seed 1"),
    "rvs_simultaneous": (["--method=rvs", "--rvs_update=simultaneous"], "RVS, simultaneous update"),
    "rvs_no_ls": (["--method=rvs", "--label_smoothing=0"], "RVS without label smoothing"),
    "rvs_frozen_generator": (["--method=rvs", "--freeze_generator"],
                             "RVS, generator frozen at its random initialisation"),
    "rvs_paired_mse": (["--method=rvs", "--feature_distance=paired_mse"],
                       "RVS, OT replaced by paired mean squared feature distance"),
    "rvs_ot_logits": (["--method=rvs", "--ot_on=logits"], "RVS, OT on logits instead of features"),
    # The best of the variants screened by validation PGD-10 (benchmarks/screen_rvs_variants.py).
    "rvs_ot_mean": (["--method=rvs", "--ot_cost_scale=mean"],
                    "RVS variant: OT epsilon 0.01 x mean cost (converged Sinkhorn; the library default)"),
}


def run(args, log):
    with open(log, "a", encoding="utf-8") as handle:
        handle.write("$ " + " ".join(args) + "\n")
        handle.flush()
        result = subprocess.run(args, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    if result.returncode:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(args)}; see {log}")


def run_row(name, options):
    flags, _ = ROWS[name]
    folder = os.path.join(options.workdir, name)
    report_path = os.path.join(folder, "eval", "report.json")
    if os.path.isfile(report_path):
        return
    os.makedirs(folder, exist_ok=True)
    log = os.path.join(folder, "log.txt")
    budget = [f"--epochs={options.epochs}", f"--steps_per_epoch={options.steps_per_epoch}",
              f"--lr_drop_epochs={options.lr_drop_epochs}"]
    run([os.path.join(BIN, "rvs-train"), "--flagfile=flags/fashion_mnist.cfg", *flags, *budget,
         f"--workdir={folder}/run", f"--export_dir={folder}/export", f"--name={name}"], log)
    run([os.path.join(BIN, "rvs-evaluate"), f"--model={folder}/export/{name}", f"--attacks={options.attacks}",
         f"--num_examples={options.eval_examples}", f"--output_dir={folder}/eval", "--noprogress"], log)


def load_row(name, options):
    folder = os.path.join(options.workdir, name)
    try:
        with open(os.path.join(folder, "eval", "report.json"), encoding="utf-8") as handle:
            report = json.load(handle)
        with open(os.path.join(folder, "run", "checkpoints", "state.json"), encoding="utf-8") as handle:
            state = json.load(handle)
    except FileNotFoundError:
        return None
    seconds = [epoch["train_seconds"] for epoch in state["history"].values() if "train_seconds" in epoch]
    return {"report": report, "seconds_per_epoch": sum(seconds) / max(1, len(seconds))}


def attack_accuracy(report, prefix):
    for attack in report["attacks"]:
        if attack["name"].startswith(prefix):
            return attack
    return None


def interval(entry):
    low, high = entry["ci95"]
    return f"{100 * entry['accuracy']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def write_results(options):
    rows = {name: load_row(name, options) for name in ROWS}
    done = {name: row for name, row in rows.items() if row}
    # Label smoothing costs nothing, so natural_ls0.5 times natural training when that row is missing.
    reference = next((done[name] for name in ("natural", "natural_ls0.5") if name in done), None)
    natural_seconds = reference["seconds_per_epoch"] if reference else None
    first = next(iter(done.values()))["report"] if done else None
    lines = [
        "# Defences and ablations on Fashion-MNIST, eps 0.1",
        "",
        "Made by `python benchmarks/compare_methods.py` (see its docstring). Every row: "
        f"`flags/fashion_mnist.cfg` (small CNN, Adam 1e-3, batch 128), {options.epochs} epochs of "
        f"{options.steps_per_epoch} steps, the row's flags; evaluated on the first {options.eval_examples} "
        f"Fashion-MNIST test images (the same for every row) with `rvs-evaluate --attacks={options.attacks}`.",
        "Accuracies in %, 95% Clopper-Pearson intervals in brackets. The worst case counts an image as robust "
        "only if no attack of the ensemble broke it; PGD-20 alone is shown for comparison with the "
        "literature and is not a robust accuracy.",
        "",
    ]
    if first:
        attack_names = "; ".join(f"{a['description']} [{a['accuracy_kind']}]" for a in first["attacks"])
        lines += [f"Ensemble: {attack_names}.", ""]
    lines += ["| row | clean | PGD-20 | worst case (ensemble) | s/epoch | x natural | flags |",
              "|---|---|---|---|---|---|---|"]
    for name, (flags, what) in ROWS.items():
        row = rows[name]
        if not row:
            lines.append(f"| {name} | not run | | | | | `{' '.join(flags)}` |")
            continue
        report = row["report"]
        pgd = attack_accuracy(report, "PGD-20")
        ratio = f"{row['seconds_per_epoch'] / natural_seconds:.2f}" if natural_seconds else ""
        lines.append(f"| {name}: {what} | {interval(report['clean'])} | {interval(pgd) if pgd else ''} | "
                     f"**{interval(report['worst_case'])}** | {row['seconds_per_epoch']:.0f} | {ratio} | "
                     f"`{' '.join(flags)}` |")
    lines += seed_spread(done)
    lines += ["", "Sanity checks (from each report):", ""]
    for name, row in done.items():
        summary = ", ".join(f"{check['name']}: {'pass' if check['passed'] else 'FAIL'}"
                            for check in row["report"].get("sanity_checks", []))
        lines.append(f"- {name}: {summary}")
    if os.path.isfile(os.path.join(HERE, "FINDINGS.md")):
        lines += ["", open(os.path.join(HERE, "FINDINGS.md"), encoding="utf-8").read().strip()]
    with open(os.path.join(HERE, "RESULTS.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    plot_tradeoff(done, natural_seconds)
    print("\n".join(lines))


def seed_spread(done):
    """Rows `X_seedN` next to row `X`: the spread over seeds of clean and worst-case accuracy."""
    groups = {}
    for name in done:
        groups.setdefault(name.split("_seed")[0], []).append(name)
    lines = []
    for base, names in groups.items():
        if len(names) < 2 or base not in done:
            continue
        figures = []
        for key in ("clean", "worst_case"):
            values = [100 * done[name]["report"][key]["accuracy"] for name in names]
            figures.append(f"{key.replace('_', ' ')} {' / '.join(f'{v:.1f}' for v in values)} "
                           f"(mean {sum(values) / len(values):.1f}, range {max(values) - min(values):.1f})")
        lines.append(f"- {base} over {len(names)} seeds ({', '.join(names)}): {'; '.join(figures)}")
    return ["", "Spread over seeds (same flags, `--seed` differs):", "", *lines] if lines else []


def plot_tradeoff(done, natural_seconds):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 6))
    for index, (name, row) in enumerate(done.items()):
        report = row["report"]
        clean, worst = report["clean"], report["worst_case"]
        ratio = row["seconds_per_epoch"] / natural_seconds if natural_seconds else 1.0
        axes.errorbar(100 * worst["accuracy"], 100 * clean["accuracy"],
                      xerr=[[100 * (worst["accuracy"] - worst["ci95"][0])],
                            [100 * (worst["ci95"][1] - worst["accuracy"])]],
                      yerr=[[100 * (clean["accuracy"] - clean["ci95"][0])],
                            [100 * (clean["ci95"][1] - clean["accuracy"])]],
                      fmt="o", markersize=4 + 3 * ratio, alpha=0.8, capsize=3)
        axes.annotate(f"{name} ({ratio:.1f}x)", (100 * worst["accuracy"], 100 * clean["accuracy"]),
                      textcoords="offset points", xytext=(6, (4, -12, 16)[index % 3]), fontsize=8)  # staggered
    axes.set_xlabel("worst-case robust accuracy over the ensemble (%), eps 0.1")
    axes.set_ylabel("clean accuracy (%)")
    axes.set_title("Fashion-MNIST: clean vs robust accuracy (marker size and label: epoch time / natural)")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(os.path.join(HERE, "tradeoff.png"), dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows: " + ", ".join(ROWS))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps_per_epoch", type=int, default=150)
    parser.add_argument("--lr_drop_epochs", default="", help="as rvs-train's flag (default: no drop)")
    parser.add_argument("--eval_examples", type=int, default=1000)
    parser.add_argument("--attacks", default="standard")
    parser.add_argument("--workdir", default=os.path.join(HERE, "runs"))
    parser.add_argument("--report_only", action="store_true")
    options = parser.parse_args()
    unknown = [r for r in options.rows.split(",") if r not in ROWS]
    if unknown:
        parser.error(f"--rows: unknown {unknown}; expected some of {list(ROWS)}")
    if not options.report_only:
        for name in options.rows.split(","):
            print(f"== {name}", flush=True)
            run_row(name, options)
    write_results(options)


if __name__ == "__main__":
    main()
