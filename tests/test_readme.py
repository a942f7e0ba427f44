"""README.md and docs/ stay true: their Python example runs, CI runs exactly the README's test command, and
every command and flag they show parses in the command line it names (flag files, --method choices...)."""
import glob
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
DOCS = {path: open(path, encoding="utf-8").read()
        for path in [os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "*.md"))]}
CLIS = ("train", "evaluate", "export")
ABSL_FLAGS = {"help", "helpfull", "helpshort", "flagfile", "only_check_args"}
COMMAND = re.compile(r"(?:\.venv/bin/)?(?:rvs-(train|evaluate|export)|python -m rvs_tf\.(train|evaluate|"
                     r"export))((?:[ \t]+--[\w-]+(?:=[^\s`|&]+)?)*)")
FLAG_SPAN = re.compile(r"`(--[\w-]+)(?:=([^`\s]*))?`")  # `--flag` or `--flag=value` or `--flag=a|b|c`


def blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def commands():
    """(file, cli, [--flag=value, ...]) for every rvs-* or `python -m rvs_tf.*` command in README and docs."""
    return [(os.path.relpath(path, ROOT), m[1] or m[2], m[3].split())
            for path, text in DOCS.items() for m in COMMAND.finditer(text)]


def flag_spans():
    """(file, name, value or None) for every flag quoted on its own in README and docs; a|b|c values are
    listed choices, one span each."""
    spans = []
    for path, text in DOCS.items():
        for name, value in FLAG_SPAN.findall(re.sub(r"```.*?```", "", text, flags=re.S)):
            for choice in (value.split("|") if value else [None]):
                spans.append((os.path.relpath(path, ROOT), name, choice))
    return spans


PARSE = """
import importlib, json, sys
from absl import flags
importlib.import_module("rvs_tf.cli." + sys.argv[1])
results = []
for argv in json.loads(sys.stdin.read()):
    try:
        flags.FLAGS(["rvs-" + sys.argv[1], *argv])  # parses flag files and runs the validators
        results.append(None)
    except flags.Error as error:
        results.append(str(error))
    finally:
        flags.FLAGS.unparse_flags()
print(json.dumps({"flags": sorted(flags.FLAGS), "errors": results}))
"""


@pytest.fixture(scope="module")
def parsed(tmp_path_factory):
    """{cli: (its flag names, {argv as a tuple: error or None})} for every command and quoted flag of the
    docs, one process per CLI (their flags share absl's one registry: two CLIs cannot be imported together)."""
    model = tmp_path_factory.mktemp("readme") / "m.keras"
    model.write_bytes(b"")  # --model's validator needs an existing path; nothing here loads it
    spans = [(f"{flag}={value}",) for _, flag, value in flag_spans() if value is not None]
    answers = {}
    for cli in CLIS:
        argvs = [tuple(args) for _, c, args in commands() if c == cli] + spans
        sent = argvs if cli == "train" else [  # --model is required; README paths exist only after training
            [a for a in argv if not a.startswith("--model=")] + [f"--model={model}"] for argv in argvs]
        result = subprocess.run([sys.executable, "-c", PARSE, cli], input=json.dumps(sent), cwd=ROOT, text=True,
                                capture_output=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
        assert result.returncode == 0, result.stderr[-3000:]
        answer = json.loads(result.stdout.strip().splitlines()[-1])
        answers[cli] = set(answer["flags"]), dict(zip(argvs, answer["errors"]))
    return answers


def test_first_blocks_are_the_main_job_and_the_tests():
    main_job, tests = blocks("bash")[:2]
    steps = [(m[1] or m[2], m[3].split()) for m in COMMAND.finditer(main_job)]
    assert [cli for cli, _ in steps] == ["train", "evaluate"], main_job
    (_, train_args), (_, evaluate_args) = steps
    flagfile = next(a.split("=", 1)[1] for a in train_args if a.startswith("--flagfile="))
    with open(os.path.join(ROOT, flagfile), encoding="utf-8") as handle:
        name = re.search(r"^--name=(\S+)", handle.read(), flags=re.M)[1]
    assert f"--model=saved_models/{name}" in evaluate_args  # it evaluates what the training run exported
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert tests.strip() in ci.splitlines()


def test_every_command_shown_parses(parsed):
    shown = commands()
    assert {cli for _, cli, _ in shown} == set(CLIS) and any("--flagfile" in " ".join(a) for _, _, a in shown)
    bad = [f"{where}: rvs-{cli} {' '.join(args)}: {parsed[cli][1][tuple(args)]}" for where, cli, args in shown
           if parsed[cli][1][tuple(args)]]
    assert not bad, "\n".join(bad)


def test_every_flag_and_listed_choice_is_accepted(parsed):
    spans = flag_spans()
    methods = [value for _, name, value in spans if name == "--method" and value]
    assert len(methods) >= 5 and "rvs" in methods and "pgd" in methods, methods
    benchmarks = "".join(open(p, encoding="utf-8").read()
                         for p in glob.glob(os.path.join(ROOT, "benchmarks", "*.py")))
    bad = []
    for where, flag, value in spans:
        owners = [cli for cli in CLIS if flag[2:] in parsed[cli][0]]
        if not owners and flag[2:] not in ABSL_FLAGS and not re.search(
                rf"(DEFINE_\w+\(|add_argument\()\s*\"(--)?{flag[2:]}\"", benchmarks):
            bad.append(f"{where}: {flag} is no flag of rvs-train, rvs-evaluate, rvs-export or benchmarks/")
        errors = [parsed[cli][1][(f"{flag}={value}",)] for cli in owners if value is not None]
        if errors and all(errors):
            bad.append(f"{where}: {flag}={value}: {errors[0]}")
    assert not bad, "\n".join(bad)


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
