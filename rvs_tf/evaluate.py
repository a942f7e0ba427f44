"""Robustness report for any Keras classifier or exported SavedModel: an attack ensemble, its per-example
worst case with Clopper-Pearson intervals, sanity checks from the literature, JSON + Markdown + figures.

Why an ensemble: OT-based defences like RVS have looked robust under PGD and collapsed under stronger
attacks (DESIGN.md section 2). The headline (`report["worst_case"]`) counts an example as robust only if
no attack in the ensemble broke it, and every figure names its attack, steps, restarts, loss and eps.

Presets (`attacks=`):
- "standard" (AutoAttack-like): APGD-CE (100 steps), APGD-T (targeted DLR, 9 targets x 100 steps) and
  Square (5,000 queries), plus FGSM and PGD-20 (cross-entropy, 1 restart, step 2.5*eps/20) run on their own
  for comparison with the literature. All five count towards the worst case.
- "quick" (the training loop's end-of-run report): the same attacks with APGD-CE 50 steps, APGD-T 3 targets
  x 50 steps, Square 1,000 queries.
- "pgd20": FGSM and PGD-20 only. Its worst case is an upper bound on robust accuracy, not a robust accuracy.
- a comma-separated list of names from `ATTACKS` (e.g. "pgd20,apgd-dlr,square").

How the figures are computed: see METHOD.

Shell: `rvs-evaluate --model=saved_models/<name>/<version>` or `python -m rvs_tf.evaluate --model=...`.
"""
import dataclasses
import json
import numbers
import os
import sys
import time
import warnings

import keras
import numpy as np
import tensorflow as tf

from rvs_tf import attacks as attacks_lib
from rvs_tf import export

__all__ = ["AttackSpec", "attack_spec", "ATTACKS", "PRESETS", "LARGE_EPS", "NEAR_ZERO", "clopper_pearson",
           "load_model",
           "resolve_model_path", "default_output_dir", "resolve_attacks", "robustness_report",
           "format_summary"]

LARGE_EPS = 0.5   # at eps 0.5 every image can be moved to the same grey image: accuracy must be ~0
NEAR_ZERO = 0.05  # the worst-case accuracy allowed at LARGE_EPS for the sanity check to pass
METHOD = (
    "FGSM and PGD attack every correctly classified example (stand-alone "
    "accuracy). With `cascade=True` (default, as AutoAttack) every other attack only attacks the examples no "
    "earlier attack broke, so its row gives the accuracy after it and every attack above it; gradient-free "
    "attacks run last, so what they break is exactly what every white-box attack missed. Broken examples are "
    "re-checked by running the model on the returned images, and every adversarial image is checked to "
    "lie in the eps-ball and [0, 1]. The eps sweep (figure and sanity checks) runs every attack on its own "
    "on the first "
    "`sweep_examples` examples, with the budgets listed under eps_sweep.attacks (for the standard "
    "ensemble: the quick budgets, to keep the run short).")


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """One configured attack: `fn` names a function of rvs_tf.attacks, `params` its keyword arguments."""
    name: str
    fn: str
    params: tuple = ()
    white_box: bool = True

    @property
    def standalone(self):
        """FGSM and PGD attack every example, so they stay comparable with published figures."""
        return self.fn in ("fgsm", "pgd")

    def describe(self, eps):
        p = dict(self.params)
        if self.fn == "fgsm":
            parts = ["1 step", "loss=ce"]
        elif self.fn == "pgd":
            parts = [f"{p['steps']} steps", f"{p.get('restarts', 1)} restart(s)",
                     f"loss={p.get('loss', 'ce')}",
                     "step=2.5*eps/steps", "random start"]
        elif self.fn == "apgd":
            parts = [f"{p.get('steps', 100)} steps", f"{p.get('restarts', 1)} restart(s)",
                     f"loss={p.get('loss', 'ce')}"]
            if p.get("targeted"):
                parts.insert(1, f"{p.get('num_targets', 9)} targets")
        else:
            parts = [f"{p.get('queries', 5000)} queries", f"p_init={p.get('p_init', 0.8)}", "loss=margin"]
        return f"{self.name} ({', '.join(parts)}, eps={eps:.4g}, L-inf)"


def attack_spec(name, fn, *, white_box=True, **params):
    """AttackSpec for `rvs_tf.attacks.<fn>` with keyword arguments `params` (eps and seed come later)."""
    if fn not in ("fgsm", "pgd", "apgd", "square"):
        raise ValueError(f"fn must name an attack of rvs_tf.attacks (fgsm, pgd, apgd, square), got {fn!r}")
    return AttackSpec(name, fn, tuple(sorted(params.items())), white_box)


ATTACKS = {
    "fgsm": attack_spec("FGSM", "fgsm"),
    "pgd20": attack_spec("PGD-20", "pgd", steps=20, restarts=1, loss="ce"),
    "pgd20-cw": attack_spec("PGD-20-CW", "pgd", steps=20, restarts=1, loss="margin"),
    "pgd100-5r": attack_spec("PGD-100x5", "pgd", steps=100, restarts=5, loss="ce"),
    "apgd-ce": attack_spec("APGD-CE", "apgd", steps=100, loss="ce"),
    "apgd-dlr": attack_spec("APGD-DLR", "apgd", steps=100, loss="dlr"),
    "apgd-t": attack_spec("APGD-T", "apgd", steps=100, loss="dlr", targeted=True, num_targets=9),
    "square": attack_spec("Square", "square", white_box=False, queries=5000, p_init=0.8),
}
PRESETS = {
    "standard": [ATTACKS[k] for k in ("fgsm", "pgd20", "apgd-ce", "apgd-t", "square")],
    "quick": [ATTACKS["fgsm"], ATTACKS["pgd20"], attack_spec("APGD-CE", "apgd", steps=50, loss="ce"),
              attack_spec("APGD-T", "apgd", steps=50, loss="dlr", targeted=True, num_targets=3),
              attack_spec("Square", "square", white_box=False, queries=1000, p_init=0.8)],
    "pgd20": [ATTACKS["fgsm"], ATTACKS["pgd20"]],
}


def resolve_attacks(attacks):
    """Preset name, comma-separated `ATTACKS` names, or a list of AttackSpec -> ordered list of specs
    (stand-alone FGSM/PGD first, white-box before gradient-free)."""
    if isinstance(attacks, str):
        if attacks in PRESETS:
            specs = list(PRESETS[attacks])
        else:
            names = [a.strip() for a in attacks.split(",") if a.strip()]
            unknown = [a for a in names if a not in ATTACKS]
            if not names or unknown:
                raise ValueError(f"attacks must be a preset {sorted(PRESETS)} or a comma-separated list of "
                                 f"{sorted(ATTACKS)}, got {attacks!r}")
            specs = [ATTACKS[a] for a in dict.fromkeys(names)]
    else:
        specs = list(attacks)
        if not specs or not all(isinstance(s, AttackSpec) for s in specs):
            raise ValueError(f"attacks must be a non-empty list of AttackSpec, got {attacks!r}")
    if len({s.name for s in specs}) != len(specs):
        raise ValueError(f"attacks must have distinct names, got {[s.name for s in specs]}")
    return sorted(specs, key=lambda s: (not s.standalone, not s.white_box))


# --------------------------------------------------------------------------------------------- statistics
def clopper_pearson(successes, trials, confidence=0.95):
    """Exact (Clopper-Pearson) binomial interval from Beta quantiles: conservative at any n, and honest
    at 0% and 100%, where the normal approximation collapses to a point."""
    import tensorflow_probability as tfp

    k, n = np.asarray(successes, np.float64), np.asarray(trials, np.float64)
    if np.any(n < 1) or np.any(k < 0) or np.any(k > n) or np.any(k != np.round(k)):
        raise ValueError(f"successes must be integers in [0, trials] and trials >= 1, "
                         f"got {successes}, {trials}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    alpha = 1.0 - confidence
    beta = tfp.distributions.Beta
    lower = beta(np.maximum(k, 1e-300), n - k + 1).quantile(alpha / 2).numpy()
    upper = beta(k + 1, np.maximum(n - k, 1e-300)).quantile(1 - alpha / 2).numpy()
    return np.where(k == 0, 0.0, lower), np.where(k == n, 1.0, upper)


def _rate(correct, n):
    lo, hi = clopper_pearson(int(correct), n)
    return {"accuracy": correct / n, "correct": int(correct), "n": int(n), "ci95": [float(lo), float(hi)]}


# ---------------------------------------------------------------------------------------------- models
def resolve_model_path(path):
    """`saved_models/<name>/<version>`, `saved_models/<name>` (highest integer version, as TF Serving does)
    or a `.keras` file -> (path, version or None)."""
    path = os.fspath(path)
    if path.endswith(".keras"):
        if not os.path.isfile(path):
            raise ValueError(f"model: no .keras file at {path!r}")
        return path, None
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        base = os.path.basename(os.path.normpath(path))
        return path, int(base) if base.isdigit() else None
    versions = [v for v in export.versions(path) if os.path.isfile(os.path.join(path, str(v), "saved_model.pb"))]
    if not versions:
        raise ValueError(f"model must be a SavedModel directory, a folder of integer versions of one, or a "
                         f".keras file; found none at {path!r}")
    return os.path.join(path, str(max(versions))), max(versions)


def default_output_dir(path):
    """Next to the model, never inside the SavedModel folder: <name>/eval_<version> or <file>_eval."""
    path, version = resolve_model_path(path)
    if path.endswith(".keras"):
        return path[: -len(".keras")] + "_eval"
    parent = os.path.dirname(os.path.normpath(path))
    return os.path.join(parent, f"eval_{version if version is not None else 'model'}")


def mixed_policies(model):
    """Names of the mixed-precision dtype policies among the model's layers."""
    return sorted({layer.dtype_policy.name for layer in model._flatten_layers()
                   if layer.dtype_policy.name.startswith("mixed")})


def float32_copy(model):
    """(model, note): a float32 twin of a mixed-precision Keras model (same weights) and a note saying so
    for the report, or the model itself and "" if it already computes in float32.

    Attacks need float32 gradients: in float16, small input gradients underflow to zero and a white-box
    attack fails where it would succeed, which reads as robustness (a form of gradient masking).
    """
    mixed = mixed_policies(model)
    if not mixed:
        return model, ""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")  # for sublayers that layers create in their constructors
    try:
        copy = keras.models.clone_model(
            model, clone_function=lambda layer: layer.__class__.from_config({**layer.get_config(),
                                                                             "dtype": "float32"}))
    except Exception as error:  # e.g. a subclassed model that clone_model cannot rebuild
        raise ValueError(f"model: computes in {mixed}; attacks need a float32 copy, which "
                         f"keras.models.clone_model could not build ({error}). Rebuild the model under "
                         f"the float32 policy, load its weights, and evaluate that.") from error
    finally:
        keras.config.set_dtype_policy(previous)
    copy.set_weights(model.get_weights())
    return copy, f" (float32 copy of its {'/'.join(mixed)} weights)"


def load_model(model):
    """Keras model or model path -> (logits callable, metadata dict, description string).

    A mixed-precision Keras model is evaluated through its float32 copy (see `float32_copy`)."""
    if isinstance(model, keras.Model):
        from rvs_tf.training import RobustModel
        if isinstance(model, RobustModel) and mixed_policies(model):
            model = model.classifier  # the classifier is what is attacked; it is functional, so it clones
        copy, note = float32_copy(model)
        return copy, {}, f"Keras model '{model.name}'{note}"
    if callable(model) and not isinstance(model, (str, os.PathLike)):
        return model, {}, getattr(model, "__name__", type(model).__name__)
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError(f"model must be a Keras model, a callable returning logits or a path, got {model!r}")
    path, _ = resolve_model_path(model)
    if path.endswith(".keras"):
        try:  # registers rvs_tf's custom layers and models with Keras, if they are there
            import rvs_tf.models  # noqa: F401
        except ImportError:
            pass
        copy, note = float32_copy(keras.saving.load_model(path, compile=False))
        return copy, {}, path + note
    loaded = tf.saved_model.load(path)
    if "serving_default" not in loaded.signatures:
        raise ValueError(f"model: SavedModel at {path!r} has no 'serving_default' signature "
                         f"(has {sorted(loaded.signatures)})")
    signature = loaded.signatures["serving_default"]
    inputs = list(signature.structured_input_signature[1])
    if len(inputs) != 1:
        raise ValueError(f"model: serving_default must take one image input, takes {inputs}")
    outputs = signature.structured_outputs
    if "logits" not in outputs:
        raise ValueError(f"model: serving_default must return 'logits', returns {sorted(outputs)}")

    def logits_fn(x, _signature=signature, _name=inputs[0], _keep=loaded):
        return _signature(**{_name: x})["logits"]

    metadata = export.read_metadata(path)
    policy = (metadata.get("flags") or {}).get("mixed_precision", "float32")
    if policy != "float32":  # the export computes as it was trained; its gradients may underflow
        warnings.warn(f"model: {path} computes in {policy}, so attack gradients may underflow and "
                      "overstate robustness; for trustworthy figures evaluate the run's "
                      "best_classifier.keras, which is evaluated through a float32 copy", stacklevel=2)
        path = f"{path} (computes in {policy})"
    return logits_fn, metadata, path


# ------------------------------------------------------------------------------------------------ data
def _materialise(dataset, num_examples):
    """(images, labels) numpy arrays from a tf.data.Dataset of batches or examples, or a pair of arrays."""
    if isinstance(dataset, (tuple, list)) and len(dataset) == 2:
        x, y = np.asarray(dataset[0]), np.asarray(dataset[1])
    elif isinstance(dataset, tf.data.Dataset):
        xs, ys, count = [], [], 0
        for element in dataset:
            if not isinstance(element, (tuple, list)) or len(element) != 2:
                raise ValueError("dataset must yield (images, labels) pairs")
            bx, by = np.asarray(element[0]), np.asarray(element[1])
            if by.ndim == 0:
                bx, by = bx[None], by[None]
            xs.append(bx)
            ys.append(by)
            count += len(by)
            if num_examples is not None and count >= num_examples:
                break
        if not xs:
            raise ValueError("dataset is empty")
        x, y = np.concatenate(xs), np.concatenate(ys)
    else:
        raise ValueError(f"dataset must be a tf.data.Dataset of (images, labels) or a pair of arrays, "
                         f"got {type(dataset).__name__}")
    if num_examples is not None:
        x, y = x[:num_examples], y[:num_examples]
    if x.ndim != 4 or y.shape != (len(x),):
        raise ValueError(f"dataset must give images [N, H, W, C] and labels [N], got {x.shape} and {y.shape}")
    if not np.issubdtype(x.dtype, np.floating) or x.min() < 0.0 or x.max() > 1.0:
        raise ValueError(f"dataset images must be floats in [0, 1], got dtype {x.dtype} in "
                         f"[{x.min()}, {x.max()}]")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"dataset labels must be integer class indices, got dtype {y.dtype}")
    return x.astype(np.float32), y.astype(np.int64)


# ------------------------------------------------------------------------------------------------ runner
class _Runner:
    """Compiles each attack once (eps and seed are tensors, so the sweep does not retrace), runs it in
    batches, re-checks every result independently of the attack's own bookkeeping."""

    def __init__(self, model, image_shape, batch_size, seed, progress):
        self.model, self.batch_size, self.seed, self.progress = model, batch_size, seed, progress
        self._x_spec = tf.TensorSpec([None, *image_shape], tf.float32)
        self.predict = tf.function(lambda x: tf.argmax(attacks_lib.model_logits(model, x), -1),
                                   input_signature=[self._x_spec])
        self._compiled = {}
        self._calls = 0

    def _attack_fn(self, spec):
        if spec not in self._compiled:
            fn, params = getattr(attacks_lib, spec.fn), dict(spec.params)

            def run(x, y, eps, seed):
                seeded = {} if spec.fn == "fgsm" else {"seed": seed}
                return fn(self.model, x, y, eps=eps, **params, **seeded)

            self._compiled[spec] = tf.function(run, input_signature=[
                self._x_spec, tf.TensorSpec([None], tf.int64), tf.TensorSpec([], tf.float32),
                tf.TensorSpec([2], tf.int64)])
        return self._compiled[spec]

    def labels(self, x):
        if not len(x):
            return np.zeros(0, np.int64)
        return np.concatenate([self.predict(x[i:i + self.batch_size]).numpy()
                               for i in range(0, len(x), self.batch_size)])

    def attack(self, spec, x, y, eps, title):
        """Adversarial images for (x, y) and whether each one is misclassified."""
        self._calls += 1
        run, n = self._attack_fn(spec), len(x)
        x_adv = np.empty_like(x)
        bar = None
        if self.progress and n:
            print(title, file=sys.stderr, flush=True)
            bar = keras.utils.Progbar(n, unit_name="image")
        for b, i in enumerate(range(0, n, self.batch_size)):
            seed = tf.constant([self.seed, self._calls * 100_003 + b], tf.int64)
            out = run(x[i:i + self.batch_size], y[i:i + self.batch_size], tf.constant(eps, tf.float32), seed)
            x_adv[i:i + self.batch_size] = out.numpy()
            if bar is not None:
                bar.update(min(i + self.batch_size, n))
        excess = np.max(np.abs(x_adv - x), initial=0.0)
        if excess > eps + 1e-5 or (n and (x_adv.min() < 0.0 or x_adv.max() > 1.0)):
            raise RuntimeError(f"{spec.name} returned images outside the eps-ball or [0, 1] "
                               f"(max |delta| {excess}, eps {eps}); this is a bug in rvs_tf.attacks")
        return x_adv, self.labels(x_adv) != y


# ------------------------------------------------------------------------------------------------ report
def robustness_report(model, dataset, *, eps, attacks="standard", num_examples=None, batch_size=250,
                      cascade=True, sweep_eps=None, sweep_examples=100, sweep_attacks=None, output_dir=None,
                      seed=0,
                      progress=True, class_names=None, dataset_name=None, tolerance=0.01):
    """Attack `model` on `dataset` at L-inf radius `eps`; return the report as a JSON-ready dict.

    model: Keras model returning logits, a callable returning logits (or a dict with "logits"), or the
    path of a SavedModel with a `serving_default` signature, a folder of integer versions, a .keras file.
    dataset: tf.data.Dataset of (images in [0, 1], integer labels), batched or not, or an (x, y) pair; the
    first `num_examples` are held in memory. attacks: see the module docstring. sweep_eps: radii of the
    accuracy-against-eps curve (default eps/2, eps, 2*eps and LARGE_EPS); sweep_examples=0 skips it;
    sweep_attacks: the attacks of the sweep (default: the "quick" budgets for "standard", else `attacks`).
    output_dir: where report.json, report.md, accuracy_vs_eps.png and examples.png go (None: no files).
    dataset_name: recorded in the report (default: the model's metadata).
    tolerance: slack, as a fraction of examples, allowed by the sanity checks (at least one example).
    """
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must be a number in [0, 1] (L-inf radius for images in [0, 1]), got {eps!r}")
    for name, value, minimum in (("batch_size", batch_size, 1), ("sweep_examples", sweep_examples, 0),
                                 ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if num_examples is not None and (not isinstance(num_examples, numbers.Integral) or num_examples < 1):
        raise ValueError(f"num_examples must be None or an integer >= 1, got {num_examples!r}")
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")
    preset = attacks if isinstance(attacks, str) else "custom"
    specs = resolve_attacks(attacks)
    eps = float(eps)
    if sweep_eps is None:
        sweep_eps = [eps / 2, eps, 2 * eps, LARGE_EPS] if eps < LARGE_EPS else [eps / 4, eps / 2, eps]
    sweep_eps = sorted({float(e) for e in sweep_eps if e > 0})
    if any(e > 1.0 for e in sweep_eps):
        raise ValueError(f"sweep_eps must hold radii in (0, 1], got {sweep_eps}")

    start = time.perf_counter()
    logits_fn, metadata, model_name = load_model(model)
    x, y = _materialise(dataset, num_examples)
    n = len(y)
    runner = _Runner(logits_fn, x.shape[1:], batch_size, seed, progress)
    num_classes = int(attacks_lib.model_logits(logits_fn, tf.constant(x[:1])).shape[-1])
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"dataset labels must be in [0, {num_classes}) for this model, "
                         f"got [{y.min()}, {y.max()}]")
    class_names = list(class_names or metadata.get("class_names") or [str(i) for i in range(num_classes)])

    correct = runner.labels(x) == y
    robust = correct.copy()
    broken = {}                      # attack name -> examples it broke (False where it did not attack)
    x_show = x.copy()                # per example, the adversarial image shown in the figure
    shown_by = [None] * n
    rows = []
    for spec in specs:
        if spec.standalone or not cascade:
            idx, evaluated_on = np.flatnonzero(correct), "every correctly classified example"
        else:
            idx, evaluated_on = np.flatnonzero(robust), "the examples no attack above broke"
        t0 = time.perf_counter()
        x_adv, wrong = runner.attack(spec, x[idx], y[idx], eps, f"{spec.describe(eps)}: {len(idx)} images")
        seconds = time.perf_counter() - t0
        hit = np.zeros(n, bool)
        hit[idx] = wrong
        broken[spec.name] = hit
        newly = hit & robust
        for j, i in enumerate(idx):
            if (wrong[j] and robust[i]) or shown_by[i] is None:
                x_show[i], shown_by[i] = x_adv[j], spec.name
        robust &= ~hit
        alone = spec.standalone or not cascade
        row = {"name": spec.name, "description": spec.describe(eps), "function": spec.fn,
               "params": dict(spec.params), "white_box": spec.white_box, "evaluated_on": evaluated_on,
               "accuracy_kind": "stand-alone" if alone else "cumulative (this attack and all above)",
               **_rate(int(np.sum(correct & ~hit)) if alone else int(robust.sum()), n),
               "examples_attacked": int(len(idx)), "newly_broken": int(newly.sum()),
               "seconds": seconds, "images_per_second": len(idx) / seconds if seconds > 0 else None}
        rows.append(row)

    if sweep_attacks is None:
        sweep_attacks = "quick" if preset == "standard" else attacks
    sweep_specs = resolve_attacks(sweep_attacks)
    sweep = _sweep(runner, sweep_specs, x, y, correct, sweep_eps, sweep_examples) if sweep_examples else None
    seconds = time.perf_counter() - start
    report = {
        "model": model_name, "dataset": dataset_name or metadata.get("dataset"), "num_examples": n,
        "eps": eps, "norm": "Linf",
        "attacks_preset": preset, "cascade": cascade, "seed": seed, "class_names": class_names,
        "clean": _rate(int(correct.sum()), n),
        "attacks": rows,
        "worst_case": {**_rate(int(robust.sum()), n), "over": [s.name for s in specs],
                       "description": "per-example worst case: an example counts as robust only if it is "
                                      "classified correctly and no attack listed broke it",
                       "is_upper_bound_only": all(s.fn in ("fgsm", "pgd") for s in specs)},
        "eps_sweep": sweep,
        "method": METHOD,
        "timing": {"seconds": seconds, "images_per_second": n / seconds},
    }
    report["sanity_checks"] = _sanity_checks(report, specs, sweep_specs, broken, correct, n, tolerance)
    if output_dir is not None:
        _write_outputs(report, output_dir, x, x_show, y, shown_by, runner, class_names, eps)
    return report


def _sweep(runner, specs, x, y, correct, sweep_eps, sweep_examples):
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
            _, wrong = runner.attack(spec, xs[idx], ys[idx], e, title)
            hit = np.zeros(m, bool)
            hit[idx] = wrong
            curves[spec.name].append(float(np.mean(ok & ~hit)))
            robust_all &= ~hit
        worst.append(float(robust_all.mean()))
    return {"eps": [0.0, *sweep_eps], "num_examples": m, "accuracy": curves, "worst_case": worst,
            "attacks": {s.name: s.describe(float("nan")).replace(", eps=nan", "") for s in specs},
            "seconds": time.perf_counter() - start,
            "note": "each attack on its own (no cascade); eps 0 is clean accuracy"}


def _check(name, passed, detail):
    return {"name": name, "passed": passed, "detail": detail}


def _sanity_checks(report, specs, sweep_specs, broken, correct, n, tolerance):
    """The checks of Carlini et al. 2019 / Croce & Hein 2020 that catch a weak or fooled evaluation."""
    checks = []
    sweep = report["eps_sweep"]
    rows = {r["name"]: r for r in report["attacks"]}
    m = sweep["num_examples"] if sweep else n
    tol = max(tolerance, 1.0 / m)

    if sweep:
        bad = [f"{name}: {a:.3f} -> {b:.3f} at eps {e:.4g}"
               for name, curve in [*sweep["accuracy"].items(), ("worst case", sweep["worst_case"])]
               for e, a, b in zip(sweep["eps"][1:], curve, curve[1:]) if b > a + tol]
        checks.append(_check("accuracy_falls_as_eps_grows", not bad,
                             "; ".join(bad) or f"every curve non-increasing over eps {sweep['eps']}"))
        big = max(sweep["eps"])
        if big >= LARGE_EPS:
            acc = sweep["worst_case"][-1]
            checks.append(_check("near_zero_at_large_eps", acc <= NEAR_ZERO,
                                 f"worst-case accuracy {acc:.3f} at eps {big:.4g} (pass: <= {NEAR_ZERO}; "
                                 f"at eps "
                                 f"0.5 every image can reach the same grey image)"))
        else:
            checks.append(_check("near_zero_at_large_eps", None,
                                 f"skipped: largest sweep eps {big} < {LARGE_EPS}"))
    else:
        checks.append(_check("accuracy_falls_as_eps_grows", None, "skipped: no eps sweep"))
        checks.append(_check("near_zero_at_large_eps", None, "skipped: no eps sweep"))

    fgsm = [s.name for s in specs if s.fn == "fgsm"]
    iterative = [s.name for s in specs if s.white_box and s.fn != "fgsm"]
    if fgsm and iterative:
        bad = [f"{name} {rows[name]['accuracy']:.3f} > FGSM {rows[fgsm[0]]['accuracy']:.3f} "
               f"at eps {report['eps']:.4g}"
               for name in iterative if rows[name]["accuracy_kind"] == "stand-alone"
               and rows[name]["accuracy"] > rows[fgsm[0]]["accuracy"] + max(tolerance, 1.0 / n)]
        sweep_fgsm = [s.name for s in sweep_specs if s.fn == "fgsm"]
        if sweep and sweep_fgsm:
            curves = sweep["accuracy"]
            bad += [f"{s.name} {a:.3f} > FGSM {f:.3f} at eps {e:.4g} (sweep)"
                    for s in sweep_specs if s.white_box and s.fn != "fgsm"
                    for e, a, f in zip(sweep["eps"], curves[s.name], curves[sweep_fgsm[0]]) if a > f + tol]
        checks.append(_check("iterative_at_least_as_strong_as_fgsm", not bad,
                             "; ".join(bad) or f"{', '.join(iterative)} never weaker than FGSM"))
    else:
        checks.append(_check("iterative_at_least_as_strong_as_fgsm", None,
                             "skipped: needs FGSM and an iterative attack"))

    black = [s.name for s in specs if not s.white_box]
    white = [s.name for s in specs if s.white_box]
    if black and white:
        white_hit = np.any([broken[w] for w in white], axis=0)
        only = int(np.sum(np.any([broken[b] for b in black], axis=0) & ~white_hit & correct))
        bad = []
        if only > max(tolerance * n, 1):
            bad.append(f"{', '.join(black)} broke {only} examples ({only / n:.1%}) that every white-box "
                       f"attack missed")
        sweep_black = [s.name for s in sweep_specs if not s.white_box]
        sweep_white = [s.name for s in sweep_specs if s.white_box]
        if sweep and sweep_black and sweep_white:
            curves = sweep["accuracy"]
            for e_i, e in enumerate(sweep["eps"]):
                best_white = min(curves[w][e_i] for w in sweep_white)
                bad += [f"{b} {curves[b][e_i]:.3f} < white-box {best_white:.3f} at eps {e:.4g} (sweep)"
                        for b in sweep_black if curves[b][e_i] < best_white - tol]
        checks.append(_check("white_box_at_least_as_strong_as_gradient_free", not bad,
                             ("possible gradient masking: " + "; ".join(bad)) if bad else
                             f"gradient-free attacks broke {only} examples the white-box attacks missed"))
    else:
        checks.append(_check("white_box_at_least_as_strong_as_gradient_free", None,
                             "skipped: needs a gradient-free attack (e.g. Square) and a white-box one"))
    return checks


# ----------------------------------------------------------------------------------------------- outputs
def _pct(rate):
    lo, hi = rate["ci95"]
    return f"{100 * rate['accuracy']:.2f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def format_summary(report):
    """The lines `rvs-evaluate` prints: clean, every attack named with its settings, the worst case."""
    lines = [f"model {report['model']}, {report['num_examples']} examples, L-inf eps={report['eps']:.4g}",
             f"clean accuracy: {_pct(report['clean'])}"]
    for r in report["attacks"]:
        lines.append(f"{r['description']}: {_pct(r)} ({r['accuracy_kind']})")
    wc = report["worst_case"]
    label = ("worst case over " + ", ".join(wc["over"]) +
             (" (an upper bound on robust accuracy: run --attacks=standard for a robustness figure)"
              if wc["is_upper_bound_only"] else ""))
    lines.append(f"{label}: {_pct(wc)}")
    for c in report["sanity_checks"]:
        lines.append(f"check {c['name']}: {_status(c['passed'])} ({c['detail']})")
    lines.append(f"{report['timing']['images_per_second']:.2f} images/s, {report['timing']['seconds']:.1f} s")
    return lines


def _status(passed):
    return {True: "PASS", False: "FAIL", None: "SKIPPED"}[passed]


def _write_outputs(report, output_dir, x, x_show, y, shown_by, runner, class_names, eps):
    os.makedirs(output_dir, exist_ok=True)
    files = {"json": "report.json", "markdown": "report.md", "eps_plot": "accuracy_vs_eps.png",
             "examples": "examples.png"}
    report["files"] = {k: os.path.join(output_dir, v) for k, v in files.items()}
    if report["eps_sweep"]:
        _plot_sweep(report, report["files"]["eps_plot"])
    else:
        del report["files"]["eps_plot"]
    _plot_examples(x, x_show, y, shown_by, runner, class_names, eps, report["files"]["examples"])
    with open(report["files"]["json"], "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    with open(report["files"]["markdown"], "w", encoding="utf-8") as f:
        f.write(_markdown(report))


def _markdown(report):
    wc = report["worst_case"]
    out = [f"# Robustness report: {report['model']}", "",
           f"Dataset {report['dataset'] or '(given)'}, {report['num_examples']} examples, L-inf eps = "
           f"{report['eps']:.4g}, attacks: {report['attacks_preset']}, seed {report['seed']}.", "",
           f"**Worst case over {', '.join(wc['over'])}: {_pct(wc)}** (95% Clopper-Pearson interval)"
           + (" - an upper bound only, not a robust accuracy." if wc["is_upper_bound_only"] else "."), "",
           f"Clean accuracy: {_pct(report['clean'])}.", "",
           "| attack | settings | evaluated on | accuracy [95% CI] | kind | newly broken | images/s |",
           "|---|---|---|---|---|---|---|"]
    for r in report["attacks"]:
        ips = f"{r['images_per_second']:.1f}" if r["images_per_second"] else "-"
        out.append(f"| {r['name']} | {r['description']} | {r['evaluated_on']} | {_pct(r)} | "
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
    from matplotlib.figure import Figure

    sweep = report["eps_sweep"]
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.add_subplot()
    ax.plot(sweep["eps"], sweep["worst_case"], color="grey", lw=5, alpha=0.4, label="worst case")
    for name, curve in sweep["accuracy"].items():
        ax.plot(sweep["eps"], curve, marker="o", label=name)
    ax.axvline(report["eps"], color="grey", lw=0.8)
    ax.set(xlabel="L-inf eps", ylabel="accuracy", ylim=(-0.02, 1.02),
           title=f"accuracy against eps ({sweep['num_examples']} examples)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _plot_examples(x, x_show, y, shown_by, runner, class_names, eps, path, count=8):
    """Columns: examples (broken ones first); rows: clean, perturbation (grey = 0, scaled to +-eps),
    adversarial image with the model's prediction."""
    from matplotlib.figure import Figure

    changed = [i for i in range(len(y)) if shown_by[i] is not None]
    pred = runner.labels(x_show[changed]) if changed else np.zeros(0, np.int64)
    broken = [i for i, p in zip(changed, pred) if p != y[i]]
    order = (broken + [i for i in changed if i not in set(broken)] + list(range(len(y))))
    picks = list(dict.fromkeys(order))[:count]
    preds = dict(zip(changed, pred))
    fig = Figure(figsize=(1.6 * len(picks), 5.2), dpi=100)
    axes = fig.subplots(3, len(picks), squeeze=False)
    scale = 2 * eps if eps > 0 else 1.0
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
    fig.suptitle(f"clean / perturbation (eps={eps:.4g}, grey = 0) / adversarial", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    from absl import flags as _flags

    from rvs_tf.cli import evaluate as _cli

    _flags.adopt_module_key_flags(_cli)  # so --help lists the CLI's flags
    _cli.run()
