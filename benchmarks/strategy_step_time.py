"""RVS train-step time over the strategy x precision x XLA matrix, on CPU split into 2 logical devices.

    .venv/bin/python benchmarks/strategy_step_time.py                 # the whole matrix, ~5 min on 2 cores
    .venv/bin/python benchmarks/strategy_step_time.py --strategies=default --precisions=float32

Each cell runs in its own process (the dtype policy, logical devices and strategy are process-wide): the
small CNN and generator that rvs-train builds (rvs_tf.builder) on Fashion-MNIST-shaped random data, global
batch --batch_size, the authors' step (100 Sinkhorn iterations cap), --warmup steps to trace and compile,
then the median of --steps step times.
Prints a Markdown table with each cell's ratio to default/float32/no-XLA. Under a strategy with several
replicas `jit_compile=True` is turned off by RobustModel.compile, so those cells say so instead of timing.
"""
import itertools
import json
import os
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_list("strategies", ["default", "mirrored"], "Strategies to time.")
flags.DEFINE_list("precisions", ["float32", "mixed_float16", "mixed_bfloat16"], "Dtype policies.")
flags.DEFINE_list("jit", ["false", "true"], "jit_compile values.")
flags.DEFINE_integer("batch_size", 64, "Global batch size.")
flags.DEFINE_integer("warmup", 3, "Untimed steps (tracing, XLA compilation).")
flags.DEFINE_integer("steps", 15, "Timed steps.")
flags.DEFINE_integer("cell_timeout", 300, "Seconds before a cell is given up (float16 is emulated on CPU).")
flags.DEFINE_string("cell", None, "Internal: time one cell given as JSON and print its result.")
FLAGS = flags.FLAGS


def time_cell(cell):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np

    from rvs_tf import distribute, precision
    from rvs_tf.builder import build_model
    from rvs_tf.run_config import RunConfig

    precision.set_policy(cell["precision"])
    strategy = distribute.get_strategy(cell["strategy"], devices=["/cpu:0", "/cpu:1"]
                                       if cell["strategy"] == "mirrored" else None)
    keras.utils.set_random_seed(0)
    config = RunConfig(method="rvs", eps=0.1, lr=0.01, batch_size=FLAGS.batch_size, jit_compile=cell["jit"],
                       precision=cell["precision"], strategy=cell["strategy"])
    with strategy.scope():  # the model rvs-train builds (rvs_tf.builder)
        model = build_model(config, (28, 28, 1), 10, steps_per_epoch=1000)
    if cell["jit"] and not model.jit_compile:
        return {**cell, "step_ms": None, "note": "jit turned off (several replicas)"}
    rng = np.random.default_rng(0)
    n = FLAGS.batch_size * (FLAGS.warmup + FLAGS.steps)
    x = rng.uniform(size=(n, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, n)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(FLAGS.batch_size, drop_remainder=True)

    class Timer(keras.callbacks.Callback):
        times = []

        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            float(logs["loss"])  # wait for the step's result
            self.times.append(time.perf_counter() - self.start)

    model.fit(dataset, epochs=1, verbose=0, callbacks=[Timer()])
    timed = Timer.times[FLAGS.warmup:]
    return {**cell, "step_ms": 1000 * float(np.median(timed)), "replicas": strategy.num_replicas_in_sync,
            "first_step_s": Timer.times[0]}


def main(argv):
    del argv
    if FLAGS.cell:
        print("RESULT " + json.dumps(time_cell(json.loads(FLAGS.cell))), flush=True)
        return
    results = []
    for strategy, precision, jit in itertools.product(FLAGS.strategies, FLAGS.precisions, FLAGS.jit):
        cell = {"strategy": strategy, "precision": precision, "jit": jit.lower() == "true"}
        command = [sys.executable, __file__, f"--cell={json.dumps(cell)}", f"--batch_size={FLAGS.batch_size}",
                   f"--warmup={FLAGS.warmup}", f"--steps={FLAGS.steps}"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=FLAGS.cell_timeout)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            result = json.loads(lines[-1][7:]) if lines else {**cell, "step_ms": None,
                                                              "note": "failed: " + done.stderr[-300:]}
        except subprocess.TimeoutExpired:
            result = {**cell, "step_ms": None, "note": f"over {FLAGS.cell_timeout} s"}
        results.append(result)
        print(json.dumps(result), flush=True)
    base = next((r["step_ms"] for r in results if r["strategy"] == "default" and r["precision"] == "float32"
                 and not r["jit"] and r["step_ms"]), None)
    print(f"\nRVS step, small CNN 28x28x1, global batch {FLAGS.batch_size}, median of {FLAGS.steps} steps "
          f"after {FLAGS.warmup} warm-up, CPU as 2 logical devices\n")
    print("| strategy | precision | jit_compile | step (ms) | ratio to default/float32/no-jit "
          "| first step (s) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        ms = r["step_ms"]
        ratio = f"{ms / base:.2f}" if ms and base else "-"
        first = f"{r['first_step_s']:.1f}" if r.get("first_step_s") else "-"
        print(f"| {r['strategy']} | {r['precision']} | {r['jit']} | "
              f"{f'{ms:.0f}' if ms else r.get('note', '-')} | {ratio} | {first} |")


if __name__ == "__main__":
    app.run(main)
