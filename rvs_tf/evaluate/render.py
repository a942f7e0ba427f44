"""The report's outputs: the summary lines rvs-evaluate prints, report.json, report.md and the figures."""
import json
import os

import numpy as np

from rvs_tf import export
from rvs_tf.checkpoints import replace_durably
from rvs_tf.evaluate.ensemble import accuracy_at
from rvs_tf.evaluate.specs import norm_label
from rvs_tf.evaluate.statistics import format_rate


def default_output_dir(path):
    """Next to the model, never inside the SavedModel folder: <name>/eval_<version> or <file>_eval."""
    path, version = export.resolve_model_path(path)
    if path.endswith(".keras"):
        return path[: -len(".keras")] + "_eval"
    parent = os.path.dirname(os.path.normpath(path))
    return os.path.join(parent, f"eval_{version if version is not None else 'model'}")


def format_summary(report):
    """The lines `rvs-evaluate` prints: clean, every attack named with its settings, the worst case."""
    lines = [f"model {report['model']}, {report['num_examples']} examples, {_norm(report)} eps={report['eps']:.4g}",
             f"clean accuracy: {format_rate(report['clean'])}"]
    for r in report["attacks"]:
        lines.append(f"{r['description']}: {format_rate(r)} ({r['accuracy_kind']})")
    wc = report["worst_case"]
    label = ("worst case over " + ", ".join(wc["over"]) +
             (" (an upper bound on robust accuracy: run --attacks=standard for a robustness figure)"
              if wc["is_upper_bound_only"] else ""))
    lines.append(f"{label}: {format_rate(wc)}")
    if report.get("radius"):
        lines.append(_radius_line(report))
    for c in report["sanity_checks"]:
        lines.append(f"check {c['name']}: {_status(c['passed'])} ({c['detail']})")
    found = report.get("precision") or {}
    if found:
        rechecked = sum(found.get("search_breaks_rechecked_in_float32", {}).values())
        kept = found.get("float32_search_attacks")
        lines.append(f"attacks searched in {found['search']}"
                     + (f" (except {', '.join(kept)}: float32)" if kept else "")
                     + f", verdicts in {found['verdicts']}"
                     + (f" ({rechecked} search breaks re-attacked in float32)" if found["search"] != "float32" else "")
                     + (f"; {found['note']}" if found.get("note") else ""))
    lines.append(f"{report['timing']['images_per_second']:.2f} images/s, {report['timing']['seconds']:.1f} s")
    return lines


def _radius_line(report):
    """One line on the per-example radii: median, robust accuracy read from them at eps, not found."""
    r = report["radius"]
    median = "none found for half or more" if r["median"] is None else f"{r['median']:.4g}"
    return (f"radius ({r['attack']}, {r['num_examples']} examples): median {median}; accuracy read from the "
            f"radii at eps={report['eps']:.4g}: {100 * r['robust_at_eps']:.1f}% (an upper bound); "
            f"{r['not_found']} not broken at any radius")


def _norm(report):
    """The report's norm as printed: "L-inf" or "L2" (reports from before norms were L-inf)."""
    return norm_label(report.get("norm", "linf"))


def _status(passed):
    """A check's result as the summary and the Markdown table show it."""
    return {True: "PASS", False: "FAIL", None: "SKIPPED"}[passed]


def write_outputs(report, output_dir, x, y, ensemble, runner):
    """report.json, report.md and the figures into `output_dir`; records their paths in report["files"].
    `ensemble` gives the adversarial image shown per example; `runner` the model's predictions on them."""
    os.makedirs(output_dir, exist_ok=True)
    files = {"json": "report.json", "markdown": "report.md", "eps_plot": "accuracy_vs_eps.png",
             "examples": "examples.png"}
    report["files"] = {k: os.path.join(output_dir, v) for k, v in files.items()}
    if report["eps_sweep"] or report.get("radius"):
        _plot_sweep(report, report["files"]["eps_plot"])
    else:
        del report["files"]["eps_plot"]
    _plot_examples(x, ensemble.x_show, y, ensemble.shown_by, runner, report["class_names"], report["eps"],
                   report["files"]["examples"], _norm(report))
    _write_atomic(report["files"]["json"], json.dumps(report, indent=2))
    _write_atomic(report["files"]["markdown"], _markdown(report))


def _write_atomic(path, text):
    """A killed run leaves the previous file or the new one, never half of one."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    replace_durably(path + ".tmp", path)


def _markdown(report):
    """report.md: the headline first, then every attack, the checks and the method."""
    wc = report["worst_case"]
    out = [f"# Robustness report: {report['model']}", "",
           f"Dataset {report['dataset'] or '(given)'}, {report['num_examples']} examples, {_norm(report)} eps = "
           f"{report['eps']:.4g}, attacks: {report['attacks_preset']}, seed {report['seed']}.", "",
           f"**Worst case over {', '.join(wc['over'])}: {format_rate(wc)}** (95% Clopper-Pearson interval)"
           + (" - an upper bound only, not a robust accuracy." if wc["is_upper_bound_only"] else "."), "",
           f"Clean accuracy: {format_rate(report['clean'])}.", "",
           *([_radius_line(report) + ".", ""] if report.get("radius") else []),
           "| attack | settings | evaluated on | accuracy [95% CI] | kind | newly broken | images/s |",
           "|---|---|---|---|---|---|---|"]
    for r in report["attacks"]:
        ips = f"{r['images_per_second']:.1f}" if r["images_per_second"] else "-"
        out.append(f"| {r['name']} | {r['description']} | {r['evaluated_on']} | {format_rate(r)} | "
                   f"{r['accuracy_kind']} | {r['newly_broken']} | {ips} |")
    out += ["", "## Sanity checks", "", "| check | result | detail |", "|---|---|---|"]
    out += [f"| {c['name']} | {_status(c['passed'])} | {c['detail']} |" for c in report["sanity_checks"]]
    out += ["", "## Method", "", report["method"], ""]
    files = report.get("files", {})
    if "eps_plot" in files:
        out += [f"![accuracy against eps]({os.path.basename(files['eps_plot'])})", ""]
    out += [f"![clean, perturbation, adversarial]({os.path.basename(files['examples'])})", "",
            f"{report['timing']['images_per_second']:.2f} images/s end to end "
            f"({report['timing']['seconds']:.1f} s).", ""]
    return "\n".join(out)


def _plot_sweep(report, path):
    """Accuracy against eps, one curve per attack and the worst case."""
    from matplotlib.figure import Figure

    sweep, radius = report["eps_sweep"], report.get("radius")
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.add_subplot()
    titles = []
    if sweep:
        ax.plot(sweep["eps"], sweep["worst_case"], color="grey", lw=5, alpha=0.4, label="worst case")
        for name, curve in sweep["accuracy"].items():
            ax.plot(sweep["eps"], curve, marker="o", label=name)
        titles.append(f"sweep: {sweep['num_examples']} examples")
    if radius:
        top = max(sweep["eps"]) if sweep else 2 * report["eps"]
        grid = np.linspace(0.0, top, 200)
        ax.step(grid, accuracy_at(radius["radii"], grid), where="post", color="black", lw=1.2,
                label=f"from FMN radii (one run, {radius['num_examples']} examples)")
        titles.append(f"radii: {radius['num_examples']}")
    ax.axvline(report["eps"], color="grey", lw=0.8)
    ax.set(xlabel=f"{_norm(report)} eps", ylabel="accuracy", ylim=(-0.02, 1.02),
           title=f"accuracy against eps ({'; '.join(titles)})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _plot_examples(x, x_show, y, shown_by, runner, class_names, eps, path, norm="L-inf", count=8):
    """Columns: examples (broken ones first); rows: clean, perturbation (grey = 0, scaled to +-eps in
    L-inf, to the largest pixel change shown in L2), adversarial image with the model's prediction."""
    from matplotlib.figure import Figure

    changed = [i for i in range(len(y)) if shown_by[i] is not None]
    pred = runner.labels(x_show[changed]) if changed else np.zeros(0, np.int64)
    broken = [i for i, p in zip(changed, pred) if p != y[i]]
    order = (broken + [i for i in changed if i not in set(broken)] + list(range(len(y))))
    picks = list(dict.fromkeys(order))[:count]
    preds = dict(zip(changed, pred))
    fig = Figure(figsize=(1.6 * len(picks), 5.2), dpi=100)
    axes = fig.subplots(3, len(picks), squeeze=False)
    largest = max((float(np.max(np.abs(x_show[i] - x[i]))) for i in picks), default=0.0)
    scale = 2 * (eps if norm == "L-inf" else largest)
    scale = scale if scale > 0 else 1.0
    for col, i in enumerate(picks):
        delta = 0.5 + (x_show[i] - x[i]) / scale
        for row, (img, title) in enumerate([
                (x[i], f"label {class_names[y[i]]}"),
                (delta, f"{shown_by[i] or 'none'}"),
                (x_show[i], f"pred {class_names[preds.get(i, y[i])]}")]):
            ax = axes[row, col]
            img = np.clip(img, 0, 1)
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      vmin=0, vmax=1)
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.suptitle(f"clean / perturbation ({norm} eps={eps:.4g}, grey = 0) / adversarial", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
