"""README.md stays true: its Python example runs, and CI runs exactly its test command."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_first_blocks_are_the_main_job_and_the_tests():
    main_job, tests = blocks("bash")[:2]
    assert "rvs-train --flagfile=flags/fashion_mnist.cfg" in main_job and "rvs-evaluate" in main_job
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert tests.strip() in ci.splitlines()


@pytest.mark.skipif(not os.path.isfile("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"),
                    reason="needs Debian's dataset-fashion-mnist (scripts/setup.sh installs it)")
def test_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in blocks("python"):  # in order, in one namespace, as a reader would paste them
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    assert namespace["logits"].shape == (8, 10)
    assert os.path.isfile(tmp_path / "rvs.keras")
    assert namespace["init"].history.history["val_fgsm_accuracy"]  # the learned-initialisation example
