"""RunConfig: every setting of a training run in one frozen object, what `rvs_tf.runs.train_and_export`
takes and what rvs-train's flags fill (one field per flag, same name, same default).

Most fields define the experiment: a workdir records them (`record()`, in `config.json`) and a rerun
resumes only with the same values (`changes_from`), since resuming with others would mix two experiments.
The rest (where data and outputs go, the epoch count, the strategy, XLA) may change between reruns.
"""
import dataclasses
import math
import os
import warnings
from typing import Optional, Tuple, Union

from rvs_tf import data, distribute, models, precision, rvs, sinkhorn
from rvs_tf.builder import METHODS, OPTIMIZERS
from rvs_tf.export import DEFAULT_EXPORT_DIR, NAME_PATTERN, SERVING_PRECISIONS
from rvs_tf.threat_model import NORMS, ThreatModelWarning, eps_warning

RUNS_DIR = "runs"  # the default workdir is <RUNS_DIR>/<run name>
RUN_NAME = "{dataset}_{method}"  # the default run name
DATASETS = data.TFDS_DATASETS + data.LOCAL_DATASETS
AUGMENTS = ("default", *data.AUGMENTATIONS)  # "default": the dataset's own


def _setting(default):
    """A field that may change between reruns of one run (not part of the experiment's identity)."""
    return dataclasses.field(default=default, metadata={"identity": False})


def parse_cost_scale(value):
    """`ot_cost_scale` as the solver takes it: None, "mean", "max" or a positive number, from that value or
    its text ("none", "mean", "max", "0.5")."""
    text = str(value).strip().lower()
    if text in ("none", ""):
        return None
    if text in ("mean", "max"):
        return text
    try:
        number = float(text)
    except ValueError:
        number = -1.0
    if number <= 0:
        raise ValueError(f"ot_cost_scale: expected none, mean, max or a positive number, got {value!r}")
    return number


def parse_drop_epochs(values):
    """`lr_drop_epochs` as a sorted tuple of epochs >= 1, from integers or their text."""
    try:
        epochs = tuple(sorted(int(v) for v in values))
    except (TypeError, ValueError):
        raise ValueError(f"lr_drop_epochs: expected a comma-separated list of epochs, got {values}") from None
    if any(e < 1 for e in epochs):
        raise ValueError(f"lr_drop_epochs: expected epochs >= 1, got {values}")
    return epochs


# eps: (exclusive lowest, highest) per norm. An L2 radius is bounded by the image's diameter, which the
# classifier checks once the image shape is known (RobustModel).
EPS_BOUNDS = {"linf": (0.0, 1.0), "l2": (0.0, math.inf)}
BOUNDS = {  # field: (lowest, highest) value accepted, None for no bound (the flags take theirs from here)
    "validation_size": (1, None),
    "pad": (0, None),
    "batch_size": (2, None),
    "epochs": (1, None),
    "steps_per_epoch": (1, None),
    "wrn_depth": (10, None),
    "wrn_width": (1, None),
    "noise_dim": (1, None),
    "pgd_steps": (1, None),
    "trades_beta": (0.0, None),
    "fgsm_step_ratio": (1e-09, None),
    "single_step_ratio": (1e-09, None),
    "nfgsm_noise_ratio": (0.0, None),
    "pairing_weight": (0.0, None),
    "prior_momentum": (0.0, 0.999),
    "generator_every": (1, None),
    "init_generator_width": (1, None),
    "init_start_ratio": (1e-09, None),
    "init_noise_ratio": (0.0, None),
    "init_ot_weight": (0.0, None),
    "overfit_gap": (0.01, 1.0),
    "collapse_guard_window": (0, None),
    "label_smoothing": (0.0, 0.99),
    "ot_weight": (0.0, None),
    "ot_share_cap": (0.0, None),
    "ot_epsilon": (1e-06, None),
    "ot_max_iters": (1, None),
    "clean_ce_weight": (0.0, None),
    "eps_warmup_epochs": (0, None),
    "lr": (0.0, None),
    "lr_drop_factor": (0.0, 1.0),
    "momentum": (0.0, 1.0),
    "weight_decay": (0.0, None),
    "generator_lr": (0.0, None),
    "eval_pgd_steps": (1, None),
}

@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A training run's settings; each field is the rvs-train flag of the same name (see `rvs-train
    --help` for what each means). `lr_drop_epochs` and `ot_cost_scale` are normalised on construction
    (text is accepted), and choices are checked, so a bad value fails before anything is built.
    """

    # Data.
    dataset: str = "fashion_mnist_idx"
    data_dir: Optional[str] = _setting(None)
    idx_dir: str = _setting(data.DEFAULT_IDX_DIR)
    validation_size: int = 5000
    augment: str = "default"
    pad: int = 4
    batch_size: int = 128
    epochs: int = _setting(10)
    steps_per_epoch: Optional[int] = None
    # Models.
    arch: str = "small_cnn"
    wrn_depth: int = 34
    wrn_width: int = 10
    noise_dim: Optional[int] = None
    # Method.
    method: str = "rvs"
    pgd_steps: int = 10
    pgd_step_size: Optional[float] = None
    trades_beta: float = 6.0
    fgsm_step_ratio: float = 1.25
    single_step_ratio: float = 1.0
    nfgsm_noise_ratio: float = 2.0
    pairing_weight: Optional[float] = None
    prior_momentum: float = 0.3
    generator_every: int = 20
    init_generator_width: int = 32
    init_start_ratio: float = 1.0
    init_noise_ratio: float = 0.0
    init_project: bool = True
    init_ot_weight: float = 0.0
    overfit_gap: float = _setting(0.3)
    collapse_guard_window: int = _setting(50)
    # RVS.
    eps: float = 0.1
    norm: str = "linf"
    bound: str = "clip"
    random_start: bool = True
    label_smoothing: Optional[float] = None
    ot_weight: float = 1.0
    ot_on: str = "features"
    ot_epsilon: float = 0.01
    ot_cost_scale: Union[str, float, None] = "mean"
    ot_max_iters: int = 100
    ot_gradient: str = "implicit"
    ot_debiased: bool = False
    clean_ce_weight: float = 0.0
    rvs_update: str = "alternating"
    feature_distance: str = "sinkhorn"
    ot_units: str = "spread"
    ot_share_cap: float = rvs.DEFAULT_OT_SHARE_CAP  # 0: no cap
    freeze_generator: bool = False
    eps_warmup_epochs: int = 0
    # Optimisation.
    optimizer: str = "sgd"
    lr: float = 0.1
    lr_drop_epochs: Tuple[int, ...] = ()
    lr_drop_factor: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    generator_optimizer: str = "sgd"
    generator_lr: float = 0.01
    # Evaluation, checkpoints, export, execution.
    eval_pgd_steps: int = 10
    name: Optional[str] = _setting(None)
    workdir: Optional[str] = _setting(None)
    export_dir: str = _setting(DEFAULT_EXPORT_DIR)
    export: bool = _setting(True)
    seed: int = 0
    deterministic: bool = False  # op determinism changes the kernels and so the figures
    jit_compile: bool = _setting(False)
    strategy: str = _setting("default")
    precision: str = "float32"
    serving_precision: str = _setting("float32")

    def __post_init__(self):
        object.__setattr__(self, "lr_drop_epochs", parse_drop_epochs(self.lr_drop_epochs))
        object.__setattr__(self, "ot_cost_scale", parse_cost_scale(self.ot_cost_scale))
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}: expected one of {', '.join(choices)}, got {getattr(self, name)!r}")
        for name, (low, high) in BOUNDS.items():
            value = getattr(self, name)
            if value is not None and ((low is not None and value < low) or (high is not None and value > high)):
                expected = (f"a number in [{low}, {high}]" if low is not None and high is not None else
                            f"a number >= {low}" if low is not None else f"a number <= {high}")
                raise ValueError(f"{name}: expected {expected}, got {value!r}")
        low, high = EPS_BOUNDS[self.norm]
        if not (isinstance(self.eps, (int, float)) and low < self.eps <= high):
            raise ValueError(f"eps: expected a number in (0, {high:g}] for norm {self.norm} on images in [0, 1], got "
                             f"{self.eps!r}" + (" (an L2 radius? pass --norm=l2)" if self.norm == "linf" else ""))
        if eps_warning(self.norm, self.eps):
            warnings.warn(eps_warning(self.norm, self.eps), ThreatModelWarning, stacklevel=3)
        if (self.wrn_depth - 4) % 6:
            raise ValueError(f"wrn_depth: expected 6n + 4 with n >= 1 (e.g. 16, 28, 34), got {self.wrn_depth}")
        if self.name is not None and not NAME_PATTERN.match(self.name):
            raise ValueError(f"name: expected letters, digits, '_', '-' or '.' (it names a folder), got "
                             f"{self.name!r}")

    @property
    def run_name(self):
        """`name`, or `RUN_NAME` of the dataset and method: names the workdir and the export."""
        return self.name or RUN_NAME.format(dataset=self.dataset, method=self.method)

    @property
    def run_dir(self):
        """`workdir`, or <RUNS_DIR>/<run name>: checkpoints, logs, the recorded config."""
        return self.workdir or os.path.join(RUNS_DIR, self.run_name)

    @classmethod
    def identity_fields(cls):
        """Names of the fields that define the experiment (all but those of `_setting`)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("identity", True))

    def record(self):
        """The identity fields as JSON-ready values (what a workdir's config.json and an export's
        metadata hold)."""
        return {name: (list(value) if isinstance(value, tuple) else value)
                for name, value in ((n, getattr(self, n)) for n in self.identity_fields())}

    @classmethod
    def from_record(cls, record, **settings):
        """The config a `record()` describes (fields it lacks, added after it was written, take their
        defaults; names no longer known are ignored), with `settings` for the non-identity fields."""
        known = set(cls.identity_fields())
        if "mixed_precision" in record and "precision" not in record:  # the field's name before 2026-12
            record = {**record, "precision": record["mixed_precision"]}
        if "ot_units" not in record:  # written before the feature term became scale-free (2026-12-05)
            record = {**record, "ot_units": "absolute"}
        if "ot_share_cap" not in record:  # written before the OT term's start share was capped (2026-12-07):
            # an RVS run trained without a cap; to the other methods the field means nothing
            record = {**record, "ot_share_cap": 0.0 if record.get("method") == "rvs" else rvs.DEFAULT_OT_SHARE_CAP}
        return cls(**{k: v for k, v in record.items() if k in known}, **settings)

    def changes_from(self, other):
        """{field: (other's value, this value)} for each identity field where the two differ."""
        return {name: (getattr(other, name), getattr(self, name)) for name in self.identity_fields()
                if getattr(other, name) != getattr(self, name)}


_CHOICES = {"dataset": DATASETS, "augment": AUGMENTS, "arch": models.ARCHITECTURES, "method": METHODS,
            "bound": rvs.BOUNDS, "ot_on": rvs.OT_TARGETS, "ot_gradient": sinkhorn.GRADIENTS,
            "rvs_update": rvs.RVS_UPDATES, "feature_distance": rvs.FEATURE_DISTANCES,
            "ot_units": rvs.OT_UNITS, "optimizer": OPTIMIZERS,
            "generator_optimizer": OPTIMIZERS, "strategy": distribute.STRATEGIES,
            "precision": precision.PRECISIONS, "serving_precision": SERVING_PRECISIONS, "norm": NORMS}
