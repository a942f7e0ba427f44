"""Value + gradient of entropic OT: rvs_tf.sinkhorn against POT (NumPy, and its TensorFlow backend).

    .venv/bin/python benchmarks/sinkhorn_bench.py            # n in {64, 128, 512}, d in {64, 640}
    .venv/bin/python benchmarks/sinkhorn_bench.py --quick    # one small case, a smoke run

Problem: x, y [n, d] independent N(0, 1) clouds (y shifted by 0.1), uniform weights, squared Euclidean
cost, epsilon = 0.01 x mean cost (rvs_tf's default `cost_scale="mean"`), at most 1000 iterations.
Equal accuracy: rvs_tf stops at an L1 row-marginal error of 1e-4; POT checks the L2 column-marginal
error, so it gets 1e-4 / sqrt(n), which implies the same L1 bound; the achieved error of each value
against a float64 POT reference run to 1e-9 is printed next to the times.
Each method runs in its own process (a clean TF allocator, and POT's TF backend needs
`enable_numpy_behavior`, which must not leak into rvs_tf). Time: median over repeats (3 when a call
takes over 0.5 s) of one value + gradient-wrt-x call after a warm-up (tracing, compilation) call.
Memory: peak of TF's CPU allocator during one call (`tf.config.experimental.get_memory_info`; the
workers set TF_CPU_ALLOCATOR_USE_BFC so small tensors count too), or tracemalloc's peak for NumPy.
Ratios are "POT TF backend / this" for the same (n, d), so > 1 means rvs_tf is faster / smaller.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

METHODS = {
    "rvs_tf implicit, XLA": "rvs_xla",
    "rvs_tf implicit, tf.function": "rvs_graph",
    "rvs_tf unrolled, XLA": "rvs_unrolled_xla",
    "POT TF backend (autodiff)": "pot_tf",
    "POT TF backend (envelope)": "pot_tf_envelope",
    "POT NumPy (+ envelope grad)": "pot_np",
}
BASELINE = "pot_tf"


def _data(n, d):
    import numpy as np
    rng = np.random.default_rng(0)
    return (rng.normal(size=(n, d)).astype(np.float32),
            (rng.normal(size=(n, d)) + 0.1).astype(np.float32))


def _reference(n, d, epsilon):
    import numpy as np
    import ot
    x, y = _data(n, d)
    cost = ot.dist(x.astype(np.float64), y.astype(np.float64))
    reg = epsilon * cost.mean()
    value = ot.sinkhorn2(np.full(n, 1 / n), np.full(n, 1 / n), cost, reg, method="sinkhorn_log",
                         numItermax=20000, stopThr=1e-9)
    return float(value), float(reg)


def _worker(method, n, d, epsilon, reg, repeats, max_iters):
    """Runs in a fresh process; prints one JSON line {time_ms, peak_mb, value, iterations}."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import warnings
    warnings.simplefilter("ignore")
    import numpy as np
    x_np, y_np = _data(n, d)
    tol = 1e-4
    if method == "pot_np":
        import tracemalloc
        import ot
        a = np.full(n, 1 / n)

        def step():
            cost = ot.dist(x_np, y_np)
            plan = ot.sinkhorn(a, a, cost, reg, method="sinkhorn_log", numItermax=max_iters,
                               stopThr=tol / np.sqrt(n), warn=False)
            grad = 2 * (plan.sum(1)[:, None] * x_np - plan @ y_np)  # envelope gradient wrt x
            return float(np.sum(plan * cost)), grad

        value, _ = step()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        tracemalloc.start()
        step()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return dict(time_ms=1e3 * statistics.median(times), peak_mb=peak / 2**20, value=value)

    import tensorflow as tf
    x, y = tf.constant(x_np), tf.constant(y_np)
    if method.startswith("rvs"):
        from rvs_tf import sinkhorn as sk
        gradient = "unrolled" if "unrolled" in method else "implicit"

        def value_and_grad(x, y):
            with tf.GradientTape() as tape:
                tape.watch(x)
                res = sk.solve(x, y, epsilon=epsilon, cost_scale="mean", max_iters=max_iters,
                               tolerance=tol, gradient=gradient)
            return res.cost, tape.gradient(res.cost, x), res.iterations

        step = tf.function(value_and_grad, jit_compile="xla" in method)
    else:
        import ot
        if method == "pot_tf_envelope":
            from tensorflow.python.ops.numpy_ops import np_config
            np_config.enable_numpy_behavior()
        a = tf.constant(np.full(n, 1 / n, np.float32))

        def step(x, y):
            with tf.GradientTape() as tape:
                tape.watch(x)
                cost = ot.dist(x, y)
                if method == "pot_tf":
                    value = ot.sinkhorn2(a, a, cost, reg, method="sinkhorn_log", numItermax=max_iters,
                                         stopThr=tol / np.sqrt(n), warn=False)
                    reported = value
                else:  # gradient of the regularised value by the envelope theorem; report <P, C>
                    res = ot.solve(cost, a, a, reg=reg, grad="envelope", max_iter=max_iters,
                                   tol=tol / np.sqrt(n))
                    value, reported = res.value, res.value_linear
            return reported, tape.gradient(value, x), tf.constant(-1)

    value, grad, iterations = step(x, y)  # warm-up: tracing, compilation
    t0 = time.perf_counter()
    step(x, y)[1].numpy()
    if time.perf_counter() - t0 > 0.5:  # POT's eager TF loop: seconds a call, 3 repeats are plenty
        repeats = min(repeats, 3)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = step(x, y)
        float(out[0]), out[1].numpy()
        times.append(time.perf_counter() - t0)
    tf.config.experimental.reset_memory_stats("CPU:0")
    base = tf.config.experimental.get_memory_info("CPU:0")["current"]
    out = step(x, y)
    out[1].numpy()
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] - base
    return dict(time_ms=1e3 * statistics.median(times), peak_mb=peak / 2**20, value=float(value),
                iterations=int(iterations))


def _run(method, n, d, epsilon, reg, repeats, max_iters):
    args = json.dumps(dict(method=method, n=n, d=d, epsilon=epsilon, reg=reg, repeats=repeats,
                           max_iters=max_iters))
    proc = subprocess.run([sys.executable, __file__, "--worker", args], capture_output=True, text=True,
                          env={**os.environ, "TF_CPU_ALLOCATOR_USE_BFC": "true"})
    if proc.returncode != 0:
        return dict(error=proc.stderr.strip().splitlines()[-1][:120])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="n=64, d=64, 3 repeats")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--epsilon", type=float, default=0.01, help="relative to the mean cost")
    parser.add_argument("--max-iters", type=int, default=1000)
    parser.add_argument("--n", type=int, nargs="+", default=[64, 128, 512], help="batch sizes")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(**json.loads(args.worker))))
        return
    sizes = [(64, 64)] if args.quick else [(n, d) for n in args.n for d in (64, 640)]
    repeats = 3 if args.quick else args.repeats
    print("| n | d | method | time ms | peak MiB | rel. error | iters | time ratio | memory ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, d in sizes:
        ref, reg = _reference(n, d, args.epsilon)
        rows = {key: _run(key, n, d, args.epsilon, reg, repeats, args.max_iters) for key in METHODS.values()}
        base = rows[BASELINE]
        for label, key in METHODS.items():
            r = rows[key]
            if "error" in r:
                print(f"| {n} | {d} | {label} | failed: {r['error']} | | | | | |")
                continue
            time_ratio = base.get("time_ms", float("nan")) / r["time_ms"]
            mem_ratio = base.get("peak_mb", float("nan")) / max(r["peak_mb"], 1e-6)
            iters = r.get("iterations", -1)
            print(f"| {n} | {d} | {label} | {r['time_ms']:.2f} | {r['peak_mb']:.3f} | "
                  f"{abs(r['value'] - ref) / ref:.1e} | {iters if iters >= 0 else '-'} | "
                  f"{time_ratio:.2f} | {mem_ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
