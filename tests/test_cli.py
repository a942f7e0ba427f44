"""The command-line main job: train -> checkpoints -> export, resume after SIGKILL, clear errors on bad
input that leave earlier checkpoints and exports intact. Each case runs the real console script."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rvs_tf import export

from test_data import _write_idx_dir  # tiny IDX files in the Fashion-MNIST layout

BIN = os.path.dirname(sys.executable)


def command(tmp, *extra, epochs=2):
    return [os.path.join(BIN, "rvs-train"), f"--idx_dir={tmp / 'idx'}", "--validation_size=40",
            "--batch_size=32", f"--epochs={epochs}", "--steps_per_epoch=2", "--eval_pgd_steps=2",
            "--ot_max_iters=10", f"--workdir={tmp / 'run'}", f"--export_dir={tmp / 'exports'}",
            "--name=tiny", *extra]


def run(args, **kwargs):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(args, capture_output=True, text=True, timeout=240, env=env, **kwargs)


def snapshot(*folders):
    """Every file under the folders with its size and modification time."""
    found = {}
    for folder in folders:
        for root, _, files in os.walk(folder):
            for name in files:
                path = os.path.join(root, name)
                found[path] = (os.path.getsize(path), os.path.getmtime(path))
    return found


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run, killed once mid-way and resumed by rerunning the same command."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "idx").mkdir()
    _write_idx_dir(str(tmp / "idx"), num_train=200, num_test=40)
    args = command(tmp, epochs=5)
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    state = tmp / "run" / "checkpoints" / "state.json"
    deadline = time.time() + 180
    while time.time() < deadline and process.poll() is None:
        if state.exists() and json.loads(state.read_text())["epoch"] >= 1:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed:\n" + process.stdout.read()
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = json.loads(state.read_text())["epoch"]
    assert 1 <= killed_at < 5
    assert not (tmp / "exports" / "tiny").exists()  # nothing exported by the killed run

    resumed = run(args)
    assert resumed.returncode == 0, resumed.stderr
    return tmp, killed_at, resumed


def test_rerun_resumes_from_the_last_finished_epoch(trained):
    tmp, killed_at, resumed = trained
    assert f"from epoch {killed_at}" in resumed.stdout
    assert f"Epoch {killed_at + 1}/5" in resumed.stdout and "Epoch 1/5" not in resumed.stdout
    state = json.loads((tmp / "run" / "checkpoints" / "state.json").read_text())
    assert state["epoch"] == 5 and set(state["history"]) == {"1", "2", "3", "4", "5"}
    assert state["best"]["metric"] == "val_pgd_accuracy"


def test_export_layout_and_metadata(trained):
    tmp, _, resumed = trained
    version = tmp / "exports" / "tiny" / "1"
    assert (version / "saved_model.pb").is_file()
    metadata = export.read_metadata(str(version))
    assert metadata["dataset"] == "fashion_mnist_idx" and metadata["eps"] == pytest.approx(0.1)
    assert metadata["norm"] == "linf"
    assert metadata["class_names"][0] == "T-shirt/top" and metadata["image_shape"] == [28, 28, 1]
    assert "test_clean_accuracy" in metadata["metrics"]
    assert (tmp / "run" / "best_classifier.keras").is_file()
    assert "Exported to" in resumed.stdout


def test_rerunning_a_finished_command_exports_nothing_new(trained):
    tmp, _, _ = trained
    config = tmp / "run" / "config.json"
    saved = json.loads(config.read_text())
    for added_later in ("augment", "pad"):  # a run written before these flags existed still resumes
        saved.pop(added_later)
    config.write_text(json.dumps(saved))
    before = snapshot(tmp / "exports")
    result = run(command(tmp, epochs=5))
    assert result.returncode == 0, result.stderr
    assert "already exported to" in result.stdout
    assert snapshot(tmp / "exports") == before


def test_rvs_export_writes_the_next_version(trained):
    tmp, _, _ = trained
    result = run([os.path.join(BIN, "rvs-export"), f"--model={tmp / 'run'}",
                  f"--export_dir={tmp / 'exports'}"])
    assert result.returncode == 0, result.stderr
    assert (tmp / "exports" / "run" / "1" / "saved_model.pb").is_file()


@pytest.mark.parametrize("extra, expected", [
    (["--dataset=imagenet"], "--dataset"),
    (["--eps=1.5"], "eps: expected a number in (0, 1] for norm linf"),
    (["--norm=l3"], "--norm"),
    (["--norm=l2", "--eps=1.5"], "--workdir"),  # an L-inf run is never resumed as an L2 one
    (["--eps=-0.1"], "eps"),
    (["--ot_cost_scale=huge"], "--ot_cost_scale"),
    (["--lr_drop_epochs=ten"], "--lr_drop_epochs"),
    (["--batch_size=1"], "batch_size"),
    (["--pad=-1"], "pad"),
    (["--augment=rotate"], "--augment"),
    (["--augment=crop"], "--workdir"),
    (["--lr=0.2"], "--workdir"),  # resuming a run with other settings would mix two experiments
])
def test_bad_flags_fail_at_start_and_leave_the_run_intact(trained, extra, expected):
    tmp, _, _ = trained
    before = snapshot(tmp / "run", tmp / "exports")
    result = run(command(tmp, *extra, epochs=5))
    assert result.returncode != 0
    assert expected in result.stderr
    assert snapshot(tmp / "run", tmp / "exports") == before


def test_missing_and_corrupt_data_and_unwritable_exports(trained, tmp_path):
    tmp, _, _ = trained
    before = snapshot(tmp / "run", tmp / "exports")
    result = run(command(tmp, f"--idx_dir={tmp_path / 'nowhere'}", epochs=5))
    assert result.returncode != 0 and "--idx_dir" in result.stderr and "Traceback" not in result.stderr

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in os.listdir(tmp / "idx"):
        (corrupt / name).write_bytes((tmp / "idx" / name).read_bytes())
    (corrupt / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    result = run(command(tmp, f"--idx_dir={corrupt}", epochs=5))
    assert result.returncode != 0 and "train-images-idx3-ubyte" in result.stderr
    assert "Traceback" not in result.stderr

    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    result = run(command(tmp, f"--export_dir={blocker}", epochs=5))
    assert result.returncode != 0 and "--export_dir" in result.stderr
    assert snapshot(tmp / "run", tmp / "exports") == before


def test_rvs_evaluate_on_the_export(trained):
    tmp, _, _ = trained
    result = run([os.path.join(BIN, "rvs-evaluate"), f"--model={tmp / 'exports' / 'tiny'}", "--attacks=pgd20",
                  f"--idx_dir={tmp / 'idx'}", "--num_examples=20", "--sweep_examples=0", "--noprogress"])
    assert result.returncode == 0, result.stderr
    assert "clean accuracy" in result.stdout and "PGD-20 (20 steps" in result.stdout
    assert (tmp / "exports" / "tiny" / "eval_1" / "report.json").is_file()


def test_mirrored_strategy_and_bfloat16_from_the_command_line(trained, tmp_path):
    tmp, _, _ = trained
    args = command(tmp, "--strategy=mirrored", "--precision=mixed_bfloat16", epochs=1)
    args = [a for a in args if not a.startswith(("--workdir", "--export_dir"))]
    result = run(args + [f"--workdir={tmp_path / 'run'}", f"--export_dir={tmp_path / 'exports'}"])
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "exports" / "tiny" / "1" / "saved_model.pb").is_file()
    metadata = export.read_metadata(str(tmp_path / "exports" / "tiny" / "1"))
    assert metadata["strategy"] == "mirrored" and metadata["flags"]["precision"] == "mixed_bfloat16"
    assert metadata["precision"] == "mixed_bfloat16" and metadata["serving_precision"] == "float32"


def test_resumed_run_matches_an_uninterrupted_one(trained, tmp_path):
    """Same data order, augmentation and noise after a resume: every epoch's figures are the same."""
    tmp, killed_at, _ = trained
    args = [a for a in command(tmp, epochs=5) if not a.startswith(("--workdir", "--export_dir"))]
    result = run(args + [f"--workdir={tmp_path / 'run'}", "--noexport"])
    assert result.returncode == 0, result.stderr
    history = lambda folder: json.loads((folder / "checkpoints" / "state.json").read_text())["history"]
    resumed, straight = history(tmp / "run"), history(tmp_path / "run")
    for epoch in range(killed_at + 1, 6):  # the epochs trained after the resume
        for key in ("loss", "ce_loss", "ot_loss", "val_clean_accuracy", "val_pgd_accuracy"):
            assert resumed[str(epoch)][key] == pytest.approx(straight[str(epoch)][key], abs=1e-5), (epoch, key)
