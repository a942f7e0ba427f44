"""Attack specs: each attack function of rvs_tf.attacks with the properties evaluation needs, so the
runner, the sweep and the sanity checks read properties instead of branching on names."""
import dataclasses
from typing import Callable

from rvs_tf import attacks as attacks_lib
from rvs_tf import min_norm
from rvs_tf.threat_model import parse_norm


def norm_label(norm):
    """How reports name a norm: "L-inf" or "L2"."""
    return {"linf": "L-inf", "l2": "L2"}[parse_norm(norm)]


@dataclasses.dataclass(frozen=True)
class AttackKind:
    """An attack function and what evaluation must know about it.

    standalone: attacks every correctly classified example (FGSM and PGD, as the literature reports them);
    an ensemble of stand-alone attacks only gives an upper bound on robust accuracy.
    white_box: uses gradients (the default of its specs). seeded: takes a `seed`.
    single_step: the one-step reference that iterative attacks must beat (a sanity check).
    settings: params dict -> the settings shown in the report, e.g. ["20 steps", "loss=ce"].
    norms: the threat models it runs in; `fn` takes `norm=` when this names more than L-inf.
    """
    name: str
    fn: Callable
    settings: Callable
    standalone: bool = False
    white_box: bool = True
    seeded: bool = True
    single_step: bool = False
    norms: tuple = ("linf",)


def _fgsm_settings(_):
    return ["1 step", "loss=ce"]


def _pgd_settings(p):
    return [f"{p['steps']} steps", f"{p.get('restarts', 1)} restart(s)", f"loss={p.get('loss', 'ce')}",
            "step=2.5*eps/steps", "random start"]


def _apgd_settings(p):
    parts = [f"{p.get('steps', 100)} steps", f"{p.get('restarts', 1)} restart(s)",
             f"loss={p.get('loss', 'ce')}"]
    if p.get("targeted"):
        parts.insert(1, f"{p.get('num_targets', 9)} targets")
    return parts


def _square_settings(p):
    return [f"{p.get('queries', 5000)} queries", f"p_init={p.get('p_init', 0.8)}", "loss=margin"]


def _fmn_settings(p):
    targets = [f"{p['num_targets']} targets"] if p.get("num_targets") else []
    return [f"{p.get('steps', 100)} steps", *targets, "minimum norm", "loss=margin"]


BOTH_NORMS = ("linf", "l2")
KINDS = {kind.name: kind for kind in (
    AttackKind("fgsm", attacks_lib.fgsm, _fgsm_settings, standalone=True, seeded=False, single_step=True,
               norms=BOTH_NORMS),
    AttackKind("pgd", attacks_lib.pgd, _pgd_settings, standalone=True, norms=BOTH_NORMS),
    AttackKind("apgd", attacks_lib.apgd, _apgd_settings, norms=BOTH_NORMS),
    AttackKind("square", attacks_lib.square, _square_settings, white_box=False, norms=BOTH_NORMS),
    AttackKind("fmn", min_norm.fmn, _fmn_settings, seeded=False, norms=BOTH_NORMS),
)}


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """One configured attack: its kind and keyword arguments (eps and seed come from the runner).
    float32_search: search in float32 even when the evaluation searches in bfloat16 (no preset needs it:
    README, "bfloat16", measured keeping attacks float32 on the row where the searches differed most)."""
    name: str
    kind: AttackKind
    params: tuple = ()
    white_box: bool = True
    float32_search: bool = False

    def __post_init__(self):
        if isinstance(self.kind, str):  # AttackSpec("PGD-20", "pgd", ...), as before kinds existed
            if self.kind not in KINDS:
                raise ValueError(f"fn: expected an attack of rvs_tf.attacks ({', '.join(KINDS)}), "
                                 f"got {self.kind!r}")
            object.__setattr__(self, "kind", KINDS[self.kind])

    @property
    def fn(self):
        """The attack function's name in rvs_tf.attacks (what the report records)."""
        return self.kind.name

    @property
    def standalone(self):
        return self.kind.standalone

    def settings(self, norm="linf"):
        """Name and settings without the radius, e.g. for the sweep, which runs at several."""
        return f"{self.name} ({', '.join(self.kind.settings(dict(self.params)))}, {norm_label(norm)})"

    def describe(self, eps, norm="linf"):
        return (f"{self.name} ({', '.join(self.kind.settings(dict(self.params)))}, eps={eps:.4g}, "
                f"{norm_label(norm)})")

    def run(self, model, x, y, eps, seed, norm="linf"):
        """The attack on (x, y) at `eps` in `norm`; `seed` reaches only attacks that take one."""
        seeded = {"seed": seed} if self.kind.seeded else {}
        normed = {"norm": norm} if self.kind.norms != ("linf",) else {}
        return self.kind.fn(model, x, y, eps=eps, **dict(self.params), **seeded, **normed)


def attack_spec(name, fn, *, white_box=None, float32_search=False, **params):
    """AttackSpec for `rvs_tf.attacks.<fn>` with keyword arguments `params` (eps and seed come later);
    `white_box` defaults to the attack's own (False for Square); `float32_search`: see AttackSpec."""
    spec = AttackSpec(name, fn, tuple(sorted(params.items())), float32_search=float32_search)
    return dataclasses.replace(spec, white_box=spec.kind.white_box if white_box is None else white_box)


ATTACKS = {
    "fgsm": attack_spec("FGSM", "fgsm"),
    "pgd20": attack_spec("PGD-20", "pgd", steps=20, restarts=1, loss="ce"),
    "pgd20-cw": attack_spec("PGD-20-CW", "pgd", steps=20, restarts=1, loss="margin"),
    "pgd100-5r": attack_spec("PGD-100x5", "pgd", steps=100, restarts=5, loss="ce"),
    "apgd-ce": attack_spec("APGD-CE", "apgd", steps=100, loss="ce"),
    "apgd-dlr": attack_spec("APGD-DLR", "apgd", steps=100, loss="dlr"),
    "apgd-t": attack_spec("APGD-T", "apgd", steps=100, loss="dlr", targeted=True, num_targets=9),
    "square": attack_spec("Square", "square", queries=5000, p_init=0.8),
    # The minimum-norm attack: in an ensemble, its smallest break where it lies within eps (AutoAttack's
    # FAB-T plays this part); on its own, each example's radius (robustness_report's `radius`).
    "fmn": attack_spec("FMN", "fmn", steps=100),
}
PRESETS = {
    "standard": [ATTACKS[k] for k in ("fgsm", "pgd20", "apgd-ce", "apgd-t", "fmn", "square")],
    "quick": [ATTACKS["fgsm"], ATTACKS["pgd20"], attack_spec("APGD-CE", "apgd", steps=50, loss="ce"),
              attack_spec("APGD-T", "apgd", steps=50, loss="dlr", targeted=True, num_targets=3),
              attack_spec("FMN", "fmn", steps=50), attack_spec("Square", "square", queries=1000, p_init=0.8)],
    "pgd20": [ATTACKS["fgsm"], ATTACKS["pgd20"]],
}
# The eps sweep runs each attack at several radii: the standard ensemble sweeps with the quick budgets.
SWEEP_PRESETS = {"standard": "quick"}


def resolve_attacks(attacks):
    """Preset name, comma-separated `ATTACKS` names, or a list of AttackSpec -> ordered list of specs
    (stand-alone FGSM/PGD first, white-box before gradient-free)."""
    if isinstance(attacks, str):
        specs = _named_specs(attacks)
    else:
        specs = list(attacks)
        if not specs or not all(isinstance(s, AttackSpec) for s in specs):
            raise ValueError(f"attacks: expected a non-empty list of AttackSpec, got {attacks!r}")
    if len({s.name for s in specs}) != len(specs):
        raise ValueError(f"attacks: expected distinct names, got {[s.name for s in specs]}")
    return sorted(specs, key=lambda s: (not s.standalone, not s.white_box))


def _named_specs(attacks):
    if attacks in PRESETS:
        return list(PRESETS[attacks])
    names = [a.strip() for a in attacks.split(",") if a.strip()]
    unknown = [a for a in names if a not in ATTACKS]
    if not names or unknown:
        raise ValueError(f"attacks: expected a preset {sorted(PRESETS)} or a comma-separated list of "
                         f"{sorted(ATTACKS)}, got {attacks!r}")
    return [ATTACKS[a] for a in dict.fromkeys(names)]


def minimum_norm_spec(specs):
    """The ensemble's minimum-norm attack (the one whose kind is FMN), or None."""
    return next((s for s in specs if s.kind.name == "fmn"), None)


def check_norm(specs, norm):
    """Refuse attacks that cannot run in `norm` (a custom AttackKind is L-inf unless it names more)."""
    unable = [s.name for s in specs if parse_norm(norm) not in s.kind.norms]
    if unable:
        raise ValueError(f"attacks: {', '.join(unable)} cannot run under norm {parse_norm(norm)} (their "
                         "AttackKind's norms); choose other attacks or norm='linf'")


def is_upper_bound_only(specs):
    """True when only stand-alone FGSM/PGD ran: their worst case bounds robust accuracy from above."""
    return all(s.standalone for s in specs)
