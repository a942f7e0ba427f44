"""Evaluation at scale: a run killed with SIGKILL resumes from its state_dir to the uninterrupted report, a
state of another evaluation is refused, and sharding over 2 logical CPUs or 2 worker processes gives the
per-example results of one device."""
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from rvs_tf import evaluate
from rvs_tf.evaluate import state as state_lib

WORKER = os.path.join(os.path.dirname(__file__), "evaluate_worker.py")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny untrained CNN saved as .keras (the worker script labels its data with it)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Flatten()(keras.layers.Conv2D(4, 3, activation="relu")(inputs))
    path = str(tmp_path_factory.mktemp("tiny") / "m.keras")
    keras.Model(inputs, keras.layers.Dense(10)(h)).save(path)
    return path


def start(model, out_dir, state_dir, strategy="default", env=None):
    return subprocess.Popen([sys.executable, WORKER, model, str(out_dir), str(state_dir), strategy],
                            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(process, timeout=240):
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def assert_same_results(a, b):
    """Per-example results of two state folders: examples attacked, broken, adversarial images."""
    results_a, results_b = state_lib.load_results(a), state_lib.load_results(b)
    assert list(results_a) == list(results_b) == ["FGSM", "PGD-50", "APGD-CE", "Square"]
    for name in results_a:
        for u, v in zip(results_a[name], results_b[name]):
            np.testing.assert_array_equal(u, v, err_msg=name)


def accuracies(report):
    return ([(r["name"], r["correct"], r["examples_attacked"]) for r in report["attacks"]],
            report["worst_case"]["correct"], report["clean"]["correct"], report["eps_sweep"]["accuracy"])


def test_sigkill_then_the_same_command_ends_with_the_uninterrupted_report(tiny, tmp_path):
    reference = finish(start(tiny, tmp_path / "ref", tmp_path / "ref_state"))["report"]
    process = start(tiny, tmp_path / "out", tmp_path / "state")
    index = tmp_path / "state" / "00-FGSM" / "index.json"
    deadline = time.monotonic() + 200
    while not index.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    partial = state_lib.load_results(tmp_path / "state")
    assert "FGSM" in partial and len(partial.get("Square", ((),))[0]) < 20  # killed mid-run
    assert not (tmp_path / "out" / "report.json").exists()

    resumed = finish(start(tiny, tmp_path / "out", tmp_path / "state"))["report"]
    assert resumed["attacks"][0]["batches_resumed"] >= 1
    assert accuracies(resumed) == accuracies(reference)
    assert_same_results(tmp_path / "state", tmp_path / "ref_state")
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert accuracies(on_disk) == accuracies(reference)


def test_a_state_of_another_evaluation_is_refused_unless_restarting(tmp_path):
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])
    x = np.random.default_rng(1).uniform(0.2, 0.8, size=(12, 4, 4, 1)).astype("float32")
    y = np.argmax(model.predict(x, verbose=0), -1)
    kwargs = dict(attacks="pgd20", sweep_examples=0, progress=False, batch_size=4, state_dir=str(tmp_path))
    first = evaluate.robustness_report(model, (x, y), eps=0.05, **kwargs)
    again = evaluate.robustness_report(model, (x, y), eps=0.05, **kwargs)  # finished: all restored
    assert [r["batches_resumed"] for r in again["attacks"]] == [3, 3]
    assert accuracies_no_sweep(again) == accuracies_no_sweep(first)
    with pytest.raises(ValueError, match=r"state_dir: expected the state of this evaluation.*eps: 0\.05 in "
                                         r"the state, 0\.1 now.*restart=True"):
        evaluate.robustness_report(model, (x, y), eps=0.1, **kwargs)
    with pytest.warns(UserWarning, match="state_dir: discarding"):
        other = evaluate.robustness_report(model, (x, y), eps=0.1, restart=True, **kwargs)
    assert [r["batches_resumed"] for r in other["attacks"]] == [0, 0]
    assert json.loads((tmp_path / "evaluation.json").read_text())["fingerprint"]["eps"] == 0.1


def test_a_state_resumes_under_rounding_noise_in_the_logits_but_not_after_the_weights_moved(tmp_path):
    """Another process (other kernels, TF32 on a GPU) need not reproduce the logits bit for bit: noise
    well inside LOGITS_TOLERANCE resumes; weights that moved are another model."""
    x = np.zeros((6, 2, 2, 1), np.float32)
    y = np.zeros(6, np.int64)
    logits = np.random.default_rng(0).normal(size=(6, 10)) * 5

    def state(first_logits, **kwargs):
        return state_lib.EvaluationState(tmp_path, state_lib.fingerprint(
            "m", first_logits, x, y, eps=0.1, specs=[], seed=0, cascade=True, batch_size=6), **kwargs)

    state(logits)
    assert not state(logits + 1e-4 * np.sign(logits)).fresh  # 1e-4 of logits up to ~10: resumed
    with pytest.raises(ValueError, match=r"model logits on the first examples: differ by up to 0\.05"):
        state(logits + 0.05)
    with pytest.warns(UserWarning, match="discarding .*model logits"):
        assert state(logits + 0.05, restart="mismatched").fresh


def accuracies_no_sweep(report):
    return [(r["name"], r["correct"]) for r in report["attacks"]], report["worst_case"]["correct"]


def worker_data(model_path):
    sys.path.insert(0, os.path.dirname(__file__))
    try:
        import evaluate_worker
    finally:
        sys.path.pop(0)
    return evaluate_worker, evaluate_worker.data(model_path)


def test_mirrored_over_two_logical_cpus_gives_the_per_example_results_of_one_device(tiny, tmp_path):
    from test_distribute import mirrored  # pytest's module: one MirroredStrategy per process (see there)

    worker, (x, y) = worker_data(tiny)
    kwargs = dict(eps=0.02, attacks=worker.ATTACKS, batch_size=8, sweep_examples=8, sweep_eps=[0.1],
                  progress=False, seed=3)
    one = evaluate.robustness_report(tiny, (x, y), state_dir=str(tmp_path / "one"), **kwargs)
    two = evaluate.robustness_report(tiny, (x, y), state_dir=str(tmp_path / "two"), strategy=mirrored(),
                                     output_dir=str(tmp_path / "out"), **kwargs)
    assert (one["timing"]["replicas"], two["timing"]["replicas"]) == (1, 2)
    assert accuracies(two) == accuracies(one)
    assert_same_results(tmp_path / "two", tmp_path / "one")
    assert json.loads((tmp_path / "out" / "report.json").read_text())["worst_case"] == one["worst_case"]


def two_workers(model, tmp_path):
    """Two evaluation processes of one MultiWorkerMirroredStrategy cluster; each is given its own output
    and state folders (out-<i>, state-<i>), so the test sees which one writes."""
    from test_distribute import free_ports

    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    return [start(model, tmp_path / f"out-{index}", tmp_path / f"state-{index}", "multi_worker", env=dict(
        os.environ, TF_CONFIG=json.dumps({"cluster": {"worker": workers},
                                          "task": {"type": "worker", "index": index}})))
            for index in range(2)]


def communicate(processes, timeout=240):
    try:
        return [p.communicate(timeout=timeout) for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()


def test_two_worker_processes_give_the_single_process_report_and_only_the_chief_writes(tiny, tmp_path):
    processes = two_workers(tiny, tmp_path)
    outputs = communicate(processes)
    assert [p.returncode for p in processes] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    chief, other = (json.loads(out.strip().splitlines()[-1]) for out, _ in outputs)
    assert (chief["chief"], other["chief"]) == (True, False)
    assert chief["report"]["timing"]["replicas"] == 2
    worker, (x, y) = worker_data(tiny)
    single = evaluate.robustness_report(tiny, (x, y), eps=0.02, attacks=worker.ATTACKS, batch_size=8,
                                        sweep_examples=8, sweep_eps=[0.1], progress=False, seed=3,
                                        state_dir=str(tmp_path / "single"))
    assert accuracies(chief["report"]) == accuracies(other["report"]) == accuracies(single)
    assert_same_results(tmp_path / "state-0", tmp_path / "single")
    assert sorted(os.listdir(tmp_path / "out-0")) == ["accuracy_vs_eps.png", "examples.png", "report.json",
                                                      "report.md"]
    assert accuracies(json.loads((tmp_path / "out-0" / "report.json").read_text())) == accuracies(single)
    assert not (tmp_path / "out-1").exists() and not (tmp_path / "state-1").exists()

    # Again: worker 1 cannot see the chief's state (as when it is not on shared storage). Both stop with
    # an error naming the cause instead of waiting for each other forever.
    processes = two_workers(tiny, tmp_path)
    outputs = communicate(processes)
    assert all(p.returncode != 0 for p in processes)
    assert all("expected every worker to restore as many batches of FGSM, got [5, 0]" in err
               for _, err in outputs), outputs[1][1][-3000:]


def test_cli_resumes_from_its_default_state_and_refuses_an_explicit_foreign_one(tmp_path, capsys, monkeypatch):
    from rvs_tf.cli import evaluate as cli
    from rvs_tf.data import DEFAULT_IDX_DIR

    if not os.path.isdir(DEFAULT_IDX_DIR):
        pytest.skip(f"offline Fashion-MNIST IDX files not in {DEFAULT_IDX_DIR}")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.AveragePooling2D(4),
                              keras.layers.Flatten(), keras.layers.Dense(10)])
    model.save(tmp_path / "m.keras")

    def rvs_evaluate(*argv, model=tmp_path / "m.keras"):
        try:
            cli.FLAGS(["rvs-evaluate", f"--model={model}", "--dataset=fashion_mnist_idx",
                       "--attacks=fgsm,pgd20", "--num_examples=30", "--batch_size=10", "--sweep_examples=0",
                       "--noprogress", *argv])
            cli.main(["rvs-evaluate"])
        finally:
            cli.FLAGS.unparse_flags()
        return json.loads((tmp_path / "m_eval" / "report.json").read_text())

    first = rvs_evaluate("--eps=0.05")
    assert (tmp_path / "m_eval" / "state" / "evaluation.json").exists()
    monkeypatch.chdir(tmp_path)
    again = rvs_evaluate("--eps=0.05", model="m.keras")  # the same model, spelled from another folder
    assert [r["batches_resumed"] for r in again["attacks"]] == [-(-r["examples_attacked"] // 10)
                                                                for r in first["attacks"]]  # all of them
    assert accuracies_no_sweep(again) == accuracies_no_sweep(first)
    for before, after in zip(first["attacks"], again["attacks"]):  # the time counts the first run's work
        assert 0 < after["seconds_in_earlier_runs"] <= before["seconds"]
        assert after["seconds"] >= after["seconds_in_earlier_runs"]
        assert after["images_per_second"] == pytest.approx(after["examples_attacked"] / after["seconds"])
    assert again["timing"]["seconds"] > sum(r["seconds_in_earlier_runs"] for r in again["attacks"])
    with pytest.warns(UserWarning, match="discarding .*eps: 0.05 in the state, 0.1 now"):
        rvs_evaluate("--eps=0.1")  # the default state follows the command, as the report does
    with pytest.raises(ValueError, match="state_dir: expected the state of this evaluation"):
        rvs_evaluate("--eps=0.05", f"--state_dir={tmp_path / 'm_eval' / 'state'}")
    with pytest.warns(UserWarning, match="discarding"):
        rvs_evaluate("--eps=0.05", f"--state_dir={tmp_path / 'm_eval' / 'state'}", "--restart")
    assert "worst case over FGSM, PGD-20" in capsys.readouterr().out
