"""Train-step time of every method against natural training, in one process, after warm-up.

  python benchmarks/step_time.py                 # small CNN (28x28, batch 128), PreAct-ResNet-18 (32x32, 32);
                                                 # also writes step_time_<cpu|gpu>.json (ratios to natural)
  python benchmarks/step_time.py --quick         # fewer rounds (a smoke run)
  python benchmarks/step_time.py --jit           # also each method with jit_compile=True
  python benchmarks/step_time.py --mixed_precision=mixed_bfloat16 --against_float32   # bfloat16's speed-up

Each model is the one rvs-train builds for that method (rvs_tf.builder, RunConfig's defaults but lr 0.01).
Steps of all methods are timed round-robin (one step of each per round, medians over rounds), so machine
noise hits them alike; figures are ratios to the natural step of the same model and batch. The share of an
RVS step spent in the OT terms and in the generator is measured by timing those pieces alone (forward and
backward, at the step's shapes). Goals (issues 6 and 9) are checked and a missed goal says what dominates.
"""
import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from rvs_tf.builder import build_model  # noqa: E402
from rvs_tf.run_config import RunConfig  # noqa: E402
from timing import median_seconds  # noqa: E402  (benchmarks/, the script's folder)

GOALS = {  # (model, method): the largest ratio to natural allowed, and to PGD-10
    ("small_cnn", "rvs_simultaneous"): (3.0, 0.30),
    ("small_cnn", "rvs_alternating"): (3.0, 0.35),
    ("preact_resnet18", "rvs_simultaneous"): (2.5, 0.30),
    ("preact_resnet18", "rvs_alternating"): (3.5, 0.45),
    ("small_cnn", "rvs_init"): (None, 0.35),  # issue 13: at most 0.35x a PGD-10 step
    ("preact_resnet18", "rvs_init"): (None, 0.35),
}


# Each benchmark name as the rvs-train run it times: everything else is RunConfig's defaults (the CLI's).
# rvs_init takes FGSM-SDI's Adam generator; every lr is 0.01 (timing does not depend on it).
CONFIGS = {"natural": dict(method="natural"), "fgsm_rs": dict(method="fgsm_rs"), "nfgsm": dict(method="nfgsm"),
           "fgsm_pgi": dict(method="fgsm_pgi"), "pgd10": dict(method="pgd", pgd_steps=10),
           "trades": dict(method="trades"), "rvs_init": dict(method="rvs_init", generator_optimizer="adam",
                                                            generator_lr=1e-3),
           "rvs_alternating": dict(method="rvs", rvs_update="alternating"),
           "rvs_simultaneous": dict(method="rvs", rvs_update="simultaneous")}


def build(method, arch, shape, jit, batch):
    """The model rvs-train builds for `method` (rvs_tf.builder), at this shape and batch."""
    keras.utils.set_random_seed(0)
    config = RunConfig(arch=arch, eps=8 / 255 if shape[-1] == 3 else 0.1, lr=0.01, batch_size=batch,
                       jit_compile=jit, **CONFIGS[method])
    return build_model(config, shape, 10, steps_per_epoch=1000)


def time_steps(models_by_name, x, y, rounds):
    for model in models_by_name.values():  # warm-up: tracing and the first steps
        for _ in range(2):
            model.train_on_batch(x, y)
    times = {name: [] for name in models_by_name}
    for _ in range(rounds):
        for name, model in models_by_name.items():
            start = time.perf_counter()
            model.train_on_batch(x, y)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def piece_times(rvs, x, rounds):
    """Seconds of (two OT value+gradient solves, generator forward+backward) at the RVS step's shapes."""
    _, features = rvs.heads(x)
    clean, adversarial = tf.constant(features.numpy()), tf.constant(features.numpy() + 0.1)
    z = tf.random.normal([x.shape[0], rvs.noise_dim])

    @tf.function
    def ot_twice(a, b):
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            cost = rvs.transport_cost(a, b)
        return cost, tape.gradient(cost, [a, b])

    @tf.function
    def generator_pass(noise):
        with tf.GradientTape() as tape:
            delta = rvs.generator(noise, training=True)
            total = tf.reduce_sum(delta)
        return tape.gradient(total, rvs.generator.trainable_variables)

    def median_time(fn, *args):
        return median_seconds(lambda: tf.nest.map_structure(lambda t: t.numpy(), fn(*args)), rounds)

    return 2 * median_time(ot_twice, clean, adversarial), median_time(generator_pass, z)


TWIN = " (float32)"  # suffix of the float32 twins of --against_float32


def run(arch, shape, batch, rounds, jit, against_float32=False):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(size=(batch, *shape)).astype("float32"))
    y = tf.constant(rng.integers(0, 10, batch))
    built = {m: build(m, arch, shape, jit=False, batch=batch) for m in CONFIGS}
    if jit:
        built.update({f"{m}+xla": build(m, arch, shape, jit=True, batch=batch) for m in CONFIGS})
    if against_float32:  # the same models in float32, timed in the same rounds (a layer keeps its policy)
        policy = keras.config.dtype_policy()
        keras.config.set_dtype_policy("float32")
        built.update({f"{m}{TWIN}": build(m, arch, shape, jit=False, batch=batch) for m in CONFIGS})
        keras.config.set_dtype_policy(policy)
    seconds = time_steps(built, x, y, rounds)
    for name in [n for n in built if n.startswith("rvs_init")]:  # + its generator step, amortised over k
        seconds[name] += generator_step_time(built[name], x, y, rounds) / built[name].generator_every
    ot, generator = piece_times(built["rvs_alternating"], x, rounds)
    return seconds, ot, generator


def generator_step_time(model, x, y, rounds):
    """Median seconds of one rvs_init generator step (gradients and update), which runs every k steps."""
    step = tf.function(lambda: model.generator_step(x, y, model.gradient_sign(x, y), tf.constant(model.eps)))
    return median_seconds(lambda: step().numpy(), rounds)


def report(arch, shape, batch, seconds, ot, generator):
    natural, pgd = seconds["natural"], seconds["pgd10"]
    lines = [f"\n### {arch}, input {'x'.join(map(str, shape))}, batch {batch}\n",
             "| method | ms/step | x natural | x PGD-10 | goal |", "|---|---|---|---|---|"]
    notes = []
    for name, value in seconds.items():
        base = name.replace("+xla", "")
        goal = GOALS.get((arch, base)) if "+xla" not in name else None
        verdict = ""
        if goal:
            ok = (goal[0] is None or value / natural <= goal[0]) and value / pgd <= goal[1]
            bound = "" if goal[0] is None else f"<= {goal[0]}x natural, "
            verdict = f"{bound}<= {goal[1]}x PGD-10: {'met' if ok else 'MISSED'}"
            if not ok and base == "rvs_init":
                notes.append(f"{name}: {value / pgd:.2f}x PGD-10: three classifier forward-backward passes a "
                             "step (clean gradient, gradient at the start, training) against PGD-10's eleven, "
                             "plus the generator's forward pass and its step every k.")
            elif not ok:
                notes.append(f"{name}: {value / natural:.2f}x natural; of its step, the two OT solves take "
                             f"{100 * 2 * ot / value:.0f}% (one per player step), the generator's forward and "
                             f"backward {100 * generator / value:.0f}%, the rest is classifier passes "
                             f"({100 * (1 - (2 * ot + generator) / value):.0f}%).")
        lines.append(f"| {name} | {1000 * value:.1f} | {value / natural:.2f} | {value / pgd:.2f} | {verdict} |")
    step = seconds["rvs_alternating"]
    lines.append(f"\nShare of an alternating RVS step: OT terms (2 solves, value+gradient) "
                 f"{100 * 2 * ot / step:.1f}%, generator forward+backward {100 * generator / step:.1f}%.")
    return "\n".join(lines + [""] + notes)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--jit", action="store_true", help="also time each method with jit_compile=True")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--archs", default="small_cnn,preact_resnet18", help="comma-separated models")
    parser.add_argument("--batch", type=int, default=None, help="one batch size for every model (default: "
                        "128 for the small CNN, 32 for PreAct-ResNet-18)")
    parser.add_argument("--mixed_precision", default="float32", choices=["float32", "mixed_float16",
                                                                          "mixed_bfloat16"])
    parser.add_argument("--against_float32", action="store_true", help="with --mixed_precision, also time each "
                        "method in float32 in the same rounds and print the speed-up")
    parser.add_argument("--no_json", action="store_true", help="do not write step_time_<device>.json")
    args = parser.parse_args()
    if args.against_float32 and args.mixed_precision == "float32":
        parser.error("--against_float32: expected --mixed_precision=mixed_bfloat16 or mixed_float16")
    rounds = args.rounds or (3 if args.quick else 10)
    keras.config.set_dtype_policy(args.mixed_precision)
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, devices "
          f"{[d.device_type for d in tf.config.list_physical_devices()]}, {rounds} rounds, "
          f"{args.mixed_precision}")
    ratios = {}
    setups = {"small_cnn": ((28, 28, 1), 128, rounds), "preact_resnet18": ((32, 32, 3), 32, max(2, rounds // 2))}
    for arch in args.archs.split(","):
        shape, batch, arch_rounds = setups[arch]
        batch = args.batch or batch
        seconds, ot, generator = run(arch, shape, batch, arch_rounds, args.jit, args.against_float32)
        twins = {name[:-len(TWIN)]: seconds.pop(name) for name in list(seconds) if name.endswith(TWIN)}
        print(report(arch, shape, batch, seconds, ot, generator), flush=True)
        if twins:
            print(f"\n| method | ms/step, {args.mixed_precision} | ms/step, float32 | speed-up |\n|---|---|---|---|")
            for name, value in twins.items():
                print(f"| {name} | {1000 * seconds[name]:.1f} | {1000 * value:.1f} | {value / seconds[name]:.2f}x |",
                      flush=True)
        ratios[arch] = {name: value / seconds["natural"] for name, value in seconds.items()}
    # what compare_methods.py plots as each method's training cost (float32 runs only)
    if not (args.quick or args.no_json or args.mixed_precision != "float32"):
        device = "gpu" if tf.config.list_physical_devices("GPU") else "cpu"
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"step_time_{device}.json"), "w",
                  encoding="utf-8") as handle:
            json.dump(ratios, handle, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
