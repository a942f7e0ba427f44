"""The median of timed rounds after a warm-up call: the benchmarks' one timing loop.

The median, because these machines are shared and noisy: one slow round (a neighbour's job, a
collection) should not move a figure that a ratio is taken from.
"""
import statistics
import time


def median_seconds(fn, rounds):
    """Median wall-clock seconds of `fn()` over `rounds` calls, after one untimed call (tracing, caches).

    Args:
        fn: a callable that returns only when its work is done (fetch tensors with `.numpy()` inside it).
        rounds: how many timed calls, at least 1.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    fn()
    values = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        values.append(time.perf_counter() - start)
    return statistics.median(values)
