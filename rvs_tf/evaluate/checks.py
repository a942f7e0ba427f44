"""The sanity checks of Carlini et al. 2019 / Croce & Hein 2020 that catch a weak or fooled evaluation:
one function per check, each returning a named `Check` (passed is None when it could not run)."""
import dataclasses
import math

import numpy as np

from rvs_tf.threat_model import parse_norm

LARGE_EPS = 0.5   # L-inf: at eps 0.5 every image can be moved to the same grey image: accuracy must be ~0
NEAR_ZERO = 0.05  # the worst-case accuracy allowed at the large eps for the sanity check to pass


def large_eps(norm, image_shape):
    """The radius at which every image of this shape can be moved to the same grey image (0.5 everywhere),
    so every model must fail: 0.5 in L-inf, 0.5 * sqrt(d) in L2."""
    return LARGE_EPS if parse_norm(norm) == "linf" else LARGE_EPS * math.sqrt(math.prod(image_shape))


def max_eps(norm, image_shape):
    """The largest radius that means anything: the diameter of [0, 1]^d (1 in L-inf, sqrt(d) in L2)."""
    return 1.0 if parse_norm(norm) == "linf" else math.sqrt(math.prod(image_shape))


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    passed: object  # True, False, or None (skipped)
    detail: str

    def as_dict(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Evidence:
    """What the checks read: the report so far, the attacks of the ensemble and of the sweep, and per
    attack the examples it broke."""
    report: dict
    specs: list
    sweep_specs: list
    broken: dict
    correct: np.ndarray
    tolerance: float

    @property
    def n(self):
        return self.report["num_examples"]

    @property
    def sweep(self):
        return self.report["eps_sweep"]

    @property
    def sweep_tolerance(self):
        """The tolerance on the sweep's examples: at least one of them."""
        return max(self.tolerance, 1.0 / (self.sweep["num_examples"] if self.sweep else self.n))


def accuracy_falls_as_eps_grows(ev):
    name = "accuracy_falls_as_eps_grows"
    if not ev.sweep:
        return Check(name, None, "skipped: no eps sweep")
    tol = ev.sweep_tolerance
    bad = [f"{curve_name}: {a:.3f} -> {b:.3f} at eps {e:.4g}"
           for curve_name, curve in [*ev.sweep["accuracy"].items(), ("worst case", ev.sweep["worst_case"])]
           for e, a, b in zip(ev.sweep["eps"][1:], curve, curve[1:]) if b > a + tol]
    return Check(name, not bad, "; ".join(bad) or f"every curve non-increasing over eps {ev.sweep['eps']}")


def near_zero_at_large_eps(ev):
    name = "near_zero_at_large_eps"
    if not ev.sweep:
        return Check(name, None, "skipped: no eps sweep")
    big, large = max(ev.sweep["eps"]), ev.sweep.get("large_eps", LARGE_EPS)
    if big < large * (1 - 1e-9):
        return Check(name, None, f"skipped: largest sweep eps {big:.4g} < {large:.4g}")
    acc = ev.sweep["worst_case"][-1]
    return Check(name, acc <= NEAR_ZERO, f"worst-case accuracy {acc:.3f} at eps {big:.4g} (pass: <= "
                                         f"{NEAR_ZERO}; at eps {large:.4g} every image can reach the same "
                                         "grey image)")


def iterative_at_least_as_strong_as_fgsm(ev):
    name = "iterative_at_least_as_strong_as_fgsm"
    single = [s.name for s in ev.specs if s.kind.single_step]
    iterative = [s.name for s in ev.specs if s.white_box and not s.kind.single_step]
    if not (single and iterative):
        return Check(name, None, "skipped: needs FGSM and an iterative attack")
    rows = {r["name"]: r for r in ev.report["attacks"]}
    reference = rows[single[0]]["accuracy"]
    bad = [f"{a} {rows[a]['accuracy']:.3f} > FGSM {reference:.3f} at eps {ev.report['eps']:.4g}"
           for a in iterative if rows[a]["accuracy_kind"] == "stand-alone"
           and rows[a]["accuracy"] > reference + max(ev.tolerance, 1.0 / ev.n)]
    sweep_single = [s.name for s in ev.sweep_specs if s.kind.single_step]
    if ev.sweep and sweep_single:
        curves, tol = ev.sweep["accuracy"], ev.sweep_tolerance
        bad += [f"{s.name} {a:.3f} > FGSM {f:.3f} at eps {e:.4g} (sweep)"
                for s in ev.sweep_specs if s.white_box and not s.kind.single_step
                for e, a, f in zip(ev.sweep["eps"], curves[s.name], curves[sweep_single[0]]) if a > f + tol]
    return Check(name, not bad, "; ".join(bad) or f"{', '.join(iterative)} never weaker than FGSM")


def white_box_at_least_as_strong_as_gradient_free(ev):
    name = "white_box_at_least_as_strong_as_gradient_free"
    black = [s.name for s in ev.specs if not s.white_box]
    white = [s.name for s in ev.specs if s.white_box]
    if not (black and white):
        return Check(name, None, "skipped: needs a gradient-free attack (e.g. Square) and a white-box one")
    white_hit = np.any([ev.broken[w] for w in white], axis=0)
    only = int(np.sum(np.any([ev.broken[b] for b in black], axis=0) & ~white_hit & ev.correct))
    bad = []
    if only > max(ev.tolerance * ev.n, 1):
        bad.append(f"{', '.join(black)} broke {only} examples ({only / ev.n:.1%}) that every white-box "
                   f"attack missed")
    bad += _gradient_free_ahead_in_sweep(ev)
    return Check(name, not bad, ("possible gradient masking: " + "; ".join(bad)) if bad else
                 f"gradient-free attacks broke {only} examples the white-box attacks missed")


def _gradient_free_ahead_in_sweep(ev):
    """Radii of the sweep where a gradient-free attack beat every white-box one."""
    black = [s.name for s in ev.sweep_specs if not s.white_box]
    white = [s.name for s in ev.sweep_specs if s.white_box]
    if not (ev.sweep and black and white):
        return []
    curves, tol, bad = ev.sweep["accuracy"], ev.sweep_tolerance, []
    for e_i, e in enumerate(ev.sweep["eps"]):
        best_white = min(curves[w][e_i] for w in white)
        bad += [f"{b} {curves[b][e_i]:.3f} < white-box {best_white:.3f} at eps {e:.4g} (sweep)"
                for b in black if curves[b][e_i] < best_white - tol]
    return bad


CHECKS = (accuracy_falls_as_eps_grows, near_zero_at_large_eps, iterative_at_least_as_strong_as_fgsm,
          white_box_at_least_as_strong_as_gradient_free)


def sanity_checks(evidence):
    """Every check in CHECKS, in order, as the report's list of {"name", "passed", "detail"}."""
    return [check(evidence).as_dict() for check in CHECKS]
