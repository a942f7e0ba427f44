"""The library never imports the command line, and `python -m rvs_tf.<name>` runs each command through an
entry shim, so no library module is loaded twice (once as __main__, once under its name)."""
import ast
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "rvs_tf")
SHIMS = {os.path.join("rvs_tf", "train.py")}  # and every __main__.py


def library_modules():
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            path = os.path.relpath(os.path.join(folder, name), ROOT)
            if (name.endswith(".py") and name != "__main__.py" and path not in SHIMS
                    and not path.startswith(os.path.join("rvs_tf", "cli", ""))):
                yield path


def imported_names(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_no_library_module_imports_the_cli():
    modules = list(library_modules())
    assert os.path.join("rvs_tf", "evaluate", "report.py") in modules and len(modules) > 20
    offenders = {path: name for path in modules for name in imported_names(path)
                 if name == "rvs_tf.cli" or name.startswith("rvs_tf.cli.")}
    assert not offenders, f"library modules import rvs_tf.cli: {offenders}"


@pytest.mark.parametrize("name", ["evaluate", "export"])
def test_python_m_targets_are_packages_with_an_entry_shim(name):
    spec = importlib.util.find_spec(f"rvs_tf.{name}")
    assert spec.submodule_search_locations, f"rvs_tf.{name} must be a package: -m would load it twice"
    assert os.path.isfile(os.path.join(spec.submodule_search_locations[0], "__main__.py"))


@pytest.mark.parametrize("name, flag, model", [("evaluate", "--attacks", True),
                                               ("export", "--export_dir", True), ("train", "--method", False)])
def test_python_m_runs_the_command(name, flag, model, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", f"rvs_tf.{name}", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})

    shown = run("--help")  # absl's --help exits with status 1 by design, after the usage
    assert shown.returncode == 1 and "Try --helpfull" in shown.stdout, shown.stderr[-2000:]
    assert flag in shown.stdout  # the command's own flags, not only absl's
    (tmp_path / "m.keras").write_bytes(b"")
    args = [f"--model={tmp_path / 'm.keras'}"] if model else []
    checked = run(*args, "--only_check_args")  # parse and validate every flag, then exit 0
    assert checked.returncode == 0, checked.stderr[-2000:]
