"""The attack ensemble at one radius (per-example worst case, AutoAttack's cascade) and the eps sweep."""
import dataclasses
import time

import numpy as np

from rvs_tf.evaluate import specs as specs_lib
from rvs_tf.evaluate.statistics import rate
from rvs_tf.threat_model import per_example_size


@dataclasses.dataclass
class Ensemble:
    """What the ensemble found, per example: clean-correct, robust to every attack, broken by each attack
    (False where it did not attack), and the adversarial image shown in the figure and who made it."""
    rows: list
    correct: np.ndarray
    robust: np.ndarray
    broken: dict
    x_show: np.ndarray
    shown_by: list


def run_ensemble(runner, specs, x, y, eps, cascade, state=None):
    """Every attack in order; with `cascade`, non-stand-alone attacks only attack what survived so far.
    `state` (an EvaluationState) keeps each attack's finished batches, so a killed run resumes."""
    n = len(y)
    correct = runner.labels(x) == y
    found = Ensemble([], correct, correct.copy(), {}, x.copy(), [None] * n)
    for position, spec in enumerate(specs):
        alone = spec.standalone or not cascade
        idx = np.flatnonzero(correct if alone else found.robust)
        t0 = time.perf_counter()
        progress = state.attack(position, spec.name, idx, runner.batch_size) if state is not None else None
        x_adv, wrong = runner.attack(spec, x[idx], y[idx], eps, f"{spec.describe(eps, runner.norm)}: {len(idx)} images",
                                     tag=spec.name, state=progress)
        seconds = progress.seconds() if progress is not None else time.perf_counter() - t0
        hit = np.zeros(n, bool)
        hit[idx] = wrong
        found.broken[spec.name] = hit
        newly = hit & found.robust
        for j, i in enumerate(idx):
            if (wrong[j] and found.robust[i]) or found.shown_by[i] is None:
                found.x_show[i], found.shown_by[i] = x_adv[j], spec.name
        found.robust &= ~hit
        accuracy = rate(int(np.sum(correct & ~hit)) if alone else int(found.robust.sum()), n)
        found.rows.append(_row(spec, eps, runner.norm, alone, accuracy, len(idx), int(newly.sum()), seconds))
        found.rows[-1]["batches_resumed"] = progress.restored if progress is not None else 0
        found.rows[-1]["seconds_in_earlier_runs"] = progress.earlier_seconds if progress is not None else 0.0
    return found


def _row(spec, eps, norm, alone, accuracy, attacked, newly_broken, seconds):
    """The report's row of one attack."""
    return {"name": spec.name, "description": spec.describe(eps, norm), "function": spec.fn,
            "params": dict(spec.params), "white_box": spec.white_box,
            "evaluated_on": ("every correctly classified example" if alone else
                             "the examples no attack above broke"),
            "accuracy_kind": "stand-alone" if alone else "cumulative (this attack and all above)",
            **accuracy,
            "examples_attacked": int(attacked), "newly_broken": newly_broken,
            "seconds": seconds, "images_per_second": attacked / seconds if seconds > 0 else None}


def sweep_radii(eps, sweep_eps, large_eps, max_eps=1.0):
    """The radii of the sweep: `sweep_eps`, or by default eps/2, eps, 2*eps and `large_eps` (where every
    model must fail), or eps/4, eps/2, eps when eps is that large already. `max_eps`: the largest radius
    that means anything (the diameter of [0, 1]^d in the norm)."""
    if sweep_eps is None:
        sweep_eps = [eps / 2, eps, 2 * eps, large_eps] if eps < large_eps else [eps / 4, eps / 2, eps]
    sweep_eps = sorted({float(e) for e in sweep_eps if e > 0})
    if any(e > max_eps for e in sweep_eps):
        raise ValueError(f"sweep_eps: expected radii in (0, {max_eps:.4g}], got {sweep_eps}")
    return sweep_eps


def sweep(runner, specs, x, y, correct, sweep_eps, sweep_examples, large_eps):
    """Each attack on its own at each radius on the first `sweep_examples` examples."""
    start = time.perf_counter()
    m = min(sweep_examples, len(y))
    xs, ys, ok = x[:m], y[:m], correct[:m]
    idx = np.flatnonzero(ok)
    curves, worst = {s.name: [float(ok.mean())] for s in specs}, [float(ok.mean())]
    for e in sweep_eps:
        robust_all = ok.copy()
        for spec in specs:
            title = f"sweep eps={e:.4g}: {spec.name}, {len(idx)} images"
            _, wrong = runner.attack(spec, xs[idx], ys[idx], e, title, tag=f"sweep {spec.name} eps={e!r}")
            hit = np.zeros(m, bool)
            hit[idx] = wrong
            curves[spec.name].append(float(np.mean(ok & ~hit)))
            robust_all &= ~hit
        worst.append(float(robust_all.mean()))
    return {"eps": [0.0, *sweep_eps], "num_examples": m, "accuracy": curves, "worst_case": worst,
            "attacks": {s.name: s.settings(runner.norm) for s in specs}, "large_eps": large_eps,
            "seconds": time.perf_counter() - start,
            "note": "each attack on its own (no cascade); eps 0 is clean accuracy"}


def radii(runner, specs, x, y, correct, examples, largest, eps):
    """Each example's radius, in one run of the ensemble's minimum-norm attack (FMN of `specs`, else FMN
    with 100 steps) on the first `examples` examples (None: all when `specs` has FMN, else none; 0: none
    -> None): the norm of the smallest perturbation it found that the model misclassifies (0 where the
    clean image already is, None where it found none). Robust accuracy at any radius r is then the
    fraction of radii above r (an upper bound, as each radius bounds the true one from above)."""
    spec = specs_lib.minimum_norm_spec(specs)
    examples = (len(y) if spec is not None else 0) if examples is None else examples
    if not examples:
        return None
    spec = spec or specs_lib.ATTACKS["fmn"]
    start = time.perf_counter()
    m = min(examples, len(y))
    idx = np.flatnonzero(correct[:m])
    x_adv, wrong = runner.attack(spec, x[idx], y[idx], largest, f"radius: {spec.settings(runner.norm)}, "
                                 f"{len(idx)} images", tag=f"radius {spec.name}")
    radius = np.zeros(m)
    radius[idx] = np.where(wrong, per_example_size(x_adv - x[idx], runner.norm), np.inf)
    median = float(np.median(radius))
    return {"attack": spec.settings(runner.norm), "num_examples": m,
            "median": median if np.isfinite(median) else None,
            "robust_at_eps": accuracy_at(radius, [eps])[0],
            "not_found": int(np.sum(np.isinf(radius))),
            "radii": [float(f"{r:.6g}") if np.isfinite(r) else None for r in radius],
            "seconds": time.perf_counter() - start,
            "note": "radius 0: misclassified without perturbation; None: no adversarial point found"}


def accuracy_at(radii, eps):
    """Robust accuracy at each radius of `eps` read from per-example radii (None or inf: not broken)."""
    values = np.array([np.inf if r is None else r for r in radii], dtype=float)
    return [float(np.mean(values > e)) for e in eps]
