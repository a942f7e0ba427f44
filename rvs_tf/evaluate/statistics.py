"""Accuracy with an exact binomial interval: what every figure of the report carries."""
import numpy as np


def clopper_pearson(successes, trials, confidence=0.95):
    """Exact (Clopper-Pearson) binomial interval from Beta quantiles: conservative at any n, and honest
    at 0% and 100%, where the normal approximation collapses to a point."""
    import tensorflow_probability as tfp

    k, n = np.asarray(successes, np.float64), np.asarray(trials, np.float64)
    if np.any(n < 1) or np.any(k < 0) or np.any(k > n) or np.any(k != np.round(k)):
        raise ValueError(f"successes, trials: expected integers in [0, trials] and trials >= 1, "
                         f"got {successes}, {trials}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: expected a number in (0, 1), got {confidence!r}")
    alpha = 1.0 - confidence
    beta = tfp.distributions.Beta
    lower = beta(np.maximum(k, 1e-300), n - k + 1).quantile(alpha / 2).numpy()
    upper = beta(k + 1, np.maximum(n - k, 1e-300)).quantile(1 - alpha / 2).numpy()
    return np.where(k == 0, 0.0, lower), np.where(k == n, 1.0, upper)


def rate(correct, n):
    """{"accuracy", "correct", "n", "ci95"}: the report's form of `correct` out of `n` (95% interval)."""
    lo, hi = clopper_pearson(int(correct), n)
    return {"accuracy": correct / n, "correct": int(correct), "n": int(n), "ci95": [float(lo), float(hi)]}


def format_rate(rate):
    """"12.34% [10.1, 14.8]": accuracy and its 95% interval in percent."""
    lo, hi = rate["ci95"]
    return f"{100 * rate['accuracy']:.2f}% [{100 * lo:.1f}, {100 * hi:.1f}]"
