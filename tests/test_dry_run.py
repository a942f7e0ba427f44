"""`rvs-train --dry_run`: a preset's whole path (train, checkpoint, resume, evaluate, export) in minutes,
on mocked TFDS data, through the command line as a user runs it. CI runs it for every flag file."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dry_run(*flags, cwd):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-m", "rvs_tf.train", *flags, "--dry_run"], capture_output=True,
                          text=True, timeout=600, env=env, cwd=cwd)


def test_a_tfds_preset_dry_runs_on_mocked_data_and_exports_where_asked(tmp_path):
    """CIFAR-100's preset (its dataset, optimisers, schedule, OT settings) with a small model: mocked data of
    32x32x3 and 100 classes, no download; the export lands in the requested folder, and nothing else is
    left behind."""
    result = dry_run(f"--flagfile={ROOT}/flags/cifar100.cfg", "--arch=small_cnn", "--batch_size=8",
                     f"--export_dir={tmp_path / 'exports'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "Resuming" in out and "from epoch 1" in out and "Dry run passed" in out
    assert "mocked cifar100 data" in out
    assert "classifier parameters" in out and "h of training on this machine" in out
    versions = os.listdir(tmp_path / "exports" / "cifar100_rvs_dry_run")
    assert versions == ["1"]
    assert sorted(os.listdir(tmp_path)) == ["exports"]  # no runs/ or saved_models/ in the working folder


def test_a_broken_preset_fails_the_dry_run(tmp_path):
    bad = tmp_path / "bad.cfg"
    bad.write_text(open(f"{ROOT}/flags/svhn.cfg").read() + "\n--wrn_depth=13\n--arch=wide_resnet\n")
    result = dry_run(f"--flagfile={bad}", "--batch_size=8", cwd=tmp_path)
    assert result.returncode != 0
    assert "wrn_depth: expected 6n + 4" in result.stderr and "Traceback" not in result.stderr
