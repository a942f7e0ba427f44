"""`robustness_report`: validate, load, ensemble, sweep, checks, render."""
import contextlib
import math
import numbers
import os
import time
import warnings

from rvs_tf.arguments import check_int
from rvs_tf.evaluate import checks, ensemble, render, specs as specs_lib, state as state_lib
from rvs_tf.evaluate.models import load_model, search_model
from rvs_tf.evaluate.runner import Runner, materialise
from rvs_tf.evaluate.shards import resolve_strategy
from rvs_tf.evaluate.statistics import rate
from rvs_tf.threat_model import ThreatModelWarning, eps_warning, parse_norm

METHOD = (
    "FGSM and PGD attack every correctly classified example (stand-alone "
    "accuracy). With `cascade=True` (default, as AutoAttack) every other attack only attacks the examples no "
    "earlier attack broke, so its row gives the accuracy after it and every attack above it; gradient-free "
    "attacks run last, so what they break is exactly what every white-box attack missed. Broken examples are "
    "re-checked by running the model on the returned images, and every adversarial image is checked to "
    "lie in the eps-ball (of the report's norm) and [0, 1]. The eps sweep (figure and sanity checks) runs every attack on its own "
    "on the first "
    "`sweep_examples` examples, with the budgets listed under eps_sweep.attacks (for the standard "
    "ensemble: the quick budgets, to keep the run short). The radius (standard and quick ensembles) is each "
    "example's smallest breaking perturbation found by one run of the minimum-norm attack FMN; robust "
    "accuracy at a radius read from it is an upper bound, like every attack's.")


def robustness_report(model, dataset, *, eps, attacks="standard", num_examples=None, batch_size=500,
                      cascade=True, sweep_eps=None, sweep_examples=100, sweep_attacks=None, output_dir=None,
                      seed=0, progress=True, class_names=None, dataset_name=None, tolerance=0.01,
                      state_dir=None, restart=False, strategy=None, precision="float32", norm="linf",
                      radius_examples=None):
    """Attack `model` on `dataset` at radius `eps` in `norm`; return the report as a JSON-ready dict.

    model: Keras model returning logits, a callable returning logits (or a dict with "logits"), or the
    path of a SavedModel with a `serving_default` signature, a folder of integer versions, a .keras file.
    dataset: tf.data.Dataset of (images in [0, 1], integer labels), batched or not, or an (x, y) pair; the
    first `num_examples` are held in memory. attacks: see the module docstring. sweep_eps: radii of the
    accuracy-against-eps curve (default eps/2, eps, 2*eps and LARGE_EPS); sweep_examples=0 skips it;
    sweep_attacks: the attacks of the sweep (default: the "quick" budgets for "standard", else `attacks`,
      without the minimum-norm attack, whose curve the radii give).
    output_dir: where report.json, report.md, accuracy_vs_eps.png and examples.png go (None: no files).
    dataset_name: recorded in the report (default: the model's metadata).
    tolerance: slack, as a fraction of examples, allowed by the sanity checks (at least one example).
    state_dir: folder where each attack's finished batches are kept (see rvs_tf.evaluate.state): the same
    call again resumes there and ends with the same report; a state of another evaluation is refused
    unless `restart=True` (discard any saved state) or "mismatched" (discard only a state of another
    evaluation). None: nothing is kept.
    strategy: a tf.distribute.Strategy or "default" / "mirrored" / "multi_worker": the attack batches are
    dealt to its replicas (same per-example results as one device); only the chief writes files.
    precision: what the attacks search in: "float32", "mixed_bfloat16" (steps and queries computed in
    bfloat16, several times faster on CPUs with AMX; every break is re-checked in float32 and, where not
    clearly confirmed, attacked again in float32) or "auto" (bfloat16 where the hardware runs it fast, see
    `rvs_tf.precision`). The report's accuracies are float32 verdicts whatever the search used.
    norm: the threat model, "linf" (default) or "l2", for every attack of the ensemble and of the sweep
    (FGSM becomes FGM, Square takes its L2 form); eps is in its units on [0, 1] images (L2: e.g. 0.5 on
    CIFAR-10, 1.5 on Fashion-MNIST). The sweep's large radius, where every model must fail, is where every
    image can reach the same grey image: 0.5 in L-inf, 0.5 * sqrt(H * W * C) in L2.
    radius_examples: on how many of the first examples to find each one's radius (the smallest breaking
    perturbation) with the ensemble's minimum-norm attack (FMN), in one run; the report gives the median
    radius and robust accuracy against eps read from the radii. None: every example when the ensemble has
    FMN (the standard and quick presets), none otherwise; 0 skips it; a number runs FMN (100 steps) if the
    ensemble has none.
    """
    norm = parse_norm(norm)
    _validate(eps, norm, batch_size, sweep_examples, seed, num_examples, tolerance, state_dir,
              radius_examples)
    if eps_warning(norm, eps):
        warnings.warn(eps_warning(norm, eps), ThreatModelWarning, stacklevel=2)
    strategy = resolve_strategy(strategy)
    preset = attacks if isinstance(attacks, str) else "custom"
    specs = specs_lib.resolve_attacks(attacks)
    sweep_specs = specs_lib.resolve_attacks(
        sweep_attacks if sweep_attacks is not None else specs_lib.SWEEP_PRESETS.get(preset, attacks))
    if sweep_attacks is None:  # the radii draw the minimum-norm attack's curve from one run, not one per eps
        sweep_specs = [s for s in sweep_specs if s.kind.name != "fmn"] or sweep_specs
    for chosen in (specs, sweep_specs):
        specs_lib.check_norm(chosen, norm)
    eps = float(eps)

    start = time.perf_counter()
    with strategy.scope() if strategy is not None else contextlib.nullcontext():  # weights on every replica
        logits_fn, metadata, model_name = load_model(model)
    x, y = materialise(dataset, num_examples)
    largest = checks.max_eps(norm, x.shape[1:])
    if eps > largest:
        raise ValueError(f"eps: expected at most {largest:.4g} for {norm} on images of shape {x.shape[1:]} (the "
                         f"diameter of [0, 1]^d), got {eps!r}")
    large_eps = checks.large_eps(norm, x.shape[1:])
    sweep_eps = ensemble.sweep_radii(eps, sweep_eps, large_eps, largest)
    search, search_policy, search_note = search_model(logits_fn, precision)
    runner = Runner(logits_fn, x.shape[1:], batch_size, seed, progress, strategy, search_model=search, norm=norm)
    class_names = _class_names(class_names, metadata, runner.num_classes(x), y)
    state = None if state_dir is None else state_lib.EvaluationState(state_dir, state_lib.fingerprint(
        model_name, runner.logits(x[:batch_size]), x, y, eps=eps, specs=specs, seed=seed, cascade=cascade,
        batch_size=batch_size, search_precision=search_policy, norm=norm),
        restart=restart, writable=runner.shards.chief)  # only the chief writes
    found = ensemble.run_ensemble(runner, specs, x, y, eps, cascade, state)
    sweep = (ensemble.sweep(runner, sweep_specs, x, y, found.correct, sweep_eps, sweep_examples, large_eps)
             if sweep_examples else None)
    radius = ensemble.radii(runner, specs, x, y, found.correct, radius_examples, largest, eps)
    # A resumed evaluation counts the time its killed runs spent on the batches it restored.
    seconds, n = time.perf_counter() - start + sum(r["seconds_in_earlier_runs"] for r in found.rows), len(y)
    report = {
        "model": model_name, "dataset": dataset_name or metadata.get("dataset"), "num_examples": n,
        "eps": eps, "norm": {"linf": "Linf", "l2": "L2"}[norm],
        "precision": _precision(search_policy, search_note, metadata, specs, runner),
        "attacks_preset": preset, "cascade": cascade, "seed": seed, "class_names": class_names,
        "clean": rate(int(found.correct.sum()), n),
        "attacks": found.rows,
        "worst_case": _worst_case(found, specs, n), "eps_sweep": sweep, "radius": radius, "method": METHOD,
        "timing": {"seconds": seconds, "images_per_second": n / seconds,
                   "replicas": runner.shards.replicas},
    }
    report["sanity_checks"] = checks.sanity_checks(
        checks.Evidence(report, specs, sweep_specs, found.broken, found.correct, tolerance))
    if output_dir is not None and runner.shards.chief:
        render.write_outputs(report, output_dir, x, y, found, runner)
    return report


def _precision(search_policy, note, metadata, specs, runner):
    """What the attacks searched in (and which kept float32), what the verdicts computed in, and how many
    of the search's breaks float32 attacked again."""
    return {"search": search_policy, "verdicts": metadata.get("serving_precision", "float32"), "note": note,
            "float32_search_attacks": [s.name for s in specs if s.float32_search and search_policy != "float32"],
            "search_breaks_rechecked_in_float32": dict(runner.rechecked)}


def _worst_case(found, specs, n):
    return {**rate(int(found.robust.sum()), n), "over": [s.name for s in specs],
            "description": "per-example worst case: an example counts as robust only if it is "
                           "classified correctly and no attack listed broke it",
            "is_upper_bound_only": specs_lib.is_upper_bound_only(specs)}


def _validate(eps, norm, batch_size, sweep_examples, seed, num_examples, tolerance, state_dir,
              radius_examples):
    """Refuse bad arguments before loading anything."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps: expected a number >= 0 ({norm} radius for images in [0, 1]), got {eps!r}")
    if norm == "linf" and eps > 1.0:
        raise ValueError(f"eps: expected a number in [0, 1] (L-inf radius for images in [0, 1]), got {eps!r}"
                         " (an L2 radius? pass norm='l2')")
    check_int("batch_size", batch_size, 1)
    check_int("sweep_examples", sweep_examples, 0)
    check_int("seed", seed, 0)
    if num_examples is not None:
        check_int("num_examples", num_examples, 1)
    if radius_examples is not None:
        check_int("radius_examples", radius_examples, 0)
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance: expected a number in [0, 1), got {tolerance!r}")
    if state_dir is not None and not isinstance(state_dir, (str, os.PathLike)):
        raise ValueError(f"state_dir: expected a folder path or None, got {state_dir!r}")


def _class_names(class_names, metadata, num_classes, y):
    """The given names, the model's metadata's, or "0".."K-1"; labels must index them."""
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"dataset: expected labels in [0, {num_classes}) for this model, "
                         f"got [{y.min()}, {y.max()}]")
    return list(class_names or metadata.get("class_names") or [str(i) for i in range(num_classes)])
