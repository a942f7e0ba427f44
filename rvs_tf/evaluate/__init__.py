"""Robustness report for any Keras classifier or exported SavedModel: an attack ensemble, its per-example
worst case with Clopper-Pearson intervals, sanity checks from the literature, JSON + Markdown + figures.

Why an ensemble: OT-based defences like RVS have looked robust under PGD and collapsed under stronger
attacks (DESIGN.md section 2). The headline (`report["worst_case"]`) counts an example as robust only if
no attack in the ensemble broke it, and every figure names its attack, steps, restarts, loss and eps.

Presets (`attacks=`):
- "standard" (AutoAttack's standard ensemble, with FMN in FAB-T's place): APGD-CE (100 steps), APGD-T
  (targeted DLR, 9 targets x 100 steps), FMN (minimum norm, 100 steps) and Square (5,000 queries), plus
  FGSM and PGD-20 (cross-entropy, 1 restart, step 2.5*eps/20) run on their own for comparison with the
  literature. All six count towards the worst case. FMN's run on every example also gives each one's
  radius (`report["radius"]`): the median, and robust accuracy against eps read from one run.
- "quick" (the training loop's end-of-run report): the same attacks with APGD-CE 50 steps, APGD-T 3 targets
  x 50 steps, FMN 50 steps, Square 1,000 queries.
- "pgd20": FGSM and PGD-20 only. Its worst case is an upper bound on robust accuracy, not a robust accuracy.
- a comma-separated list of names from `ATTACKS` (e.g. "pgd20,apgd-dlr,square").

How the figures are computed: see METHOD.

Shell: `rvs-evaluate --model=saved_models/<name>/<version>` or `python -m rvs_tf.evaluate --model=...`.

This package is the public face; one module per concept: specs (the attacks), statistics (rates and
their intervals), models (what is attacked), runner, shards (batches dealt to a strategy's replicas),
state (progress kept in `state_dir`, so a killed run resumes), ensemble (the cascade and the eps sweep),
checks, render (summary, JSON, Markdown, figures) and report (the pipeline).
"""

from rvs_tf.evaluate.checks import LARGE_EPS, NEAR_ZERO, Check, sanity_checks
from rvs_tf.evaluate.ensemble import accuracy_at
from rvs_tf.evaluate.models import float32_copy, load_model, mixed_policies
from rvs_tf.evaluate.render import default_output_dir, format_summary
from rvs_tf.evaluate.report import METHOD, robustness_report
from rvs_tf.evaluate.specs import (ATTACKS, KINDS, PRESETS, SWEEP_PRESETS, AttackKind, AttackSpec,
                                   attack_spec, resolve_attacks)
from rvs_tf.evaluate.statistics import clopper_pearson, rate
from rvs_tf.export import resolve_model_path

__all__ = ["AttackSpec", "attack_spec", "ATTACKS", "PRESETS", "LARGE_EPS", "NEAR_ZERO", "clopper_pearson",
           "load_model",
           "resolve_model_path", "default_output_dir", "resolve_attacks", "robustness_report",
           "format_summary", "AttackKind", "KINDS", "SWEEP_PRESETS", "METHOD", "Check", "sanity_checks",
           "rate", "float32_copy", "mixed_policies", "accuracy_at"]
