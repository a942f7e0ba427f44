"""The one error path of rvs-train, rvs-evaluate and rvs-export: a library error becomes one line
`<command>: error: <message>` and exit status 2 instead of a traceback, since the library's messages
already name the argument and say what to change (`--verbosity=1` prints the traceback too); a checkpoint
that does not load is one warning line."""
import contextlib
import sys
import traceback
import warnings

from absl import app, logging

from rvs_tf.checkpoints import CheckpointWarning
from rvs_tf.threat_model import ThreatModelWarning

ONE_LINE_WARNINGS = (CheckpointWarning, ThreatModelWarning)

# What the library raises for bad input, unusable files, write failures and runs that stop (CheckpointError,
# LockedError, RunError and TrainingHalted are RuntimeErrors). Anything else is a bug: it keeps its traceback.
ERRORS = (ValueError, OSError, RuntimeError)


def fail(command, message):
    """Print `<command>: error: <message>` on stderr and exit with status 2."""
    print(f"{command}: error: {message}", file=sys.stderr)
    sys.exit(2)


@contextlib.contextmanager
def reported(command):
    """Run the block with `ERRORS` shown as `fail` shows them, and `ONE_LINE_WARNINGS` as one line
    `<command>: warning: <message>` each, when they happen (other warnings as Python shows them)."""
    with warnings.catch_warnings():
        for category in ONE_LINE_WARNINGS:
            warnings.simplefilter("always", category)
        show = warnings.showwarning

        def one_line(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, ONE_LINE_WARNINGS):
                print(f"{command}: warning: {message}", file=sys.stderr)
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = one_line
        try:
            yield
        except ERRORS as error:
            if logging.get_verbosity() >= logging.DEBUG:  # --verbosity=1: the traceback too, for bug reports
                traceback.print_exc()
            fail(command, error)


def run(command, main):
    """`absl.app.run(main)` with `main` inside `reported(command)`: the console scripts' entry."""
    def checked_main(argv):
        with reported(command):
            return main(argv)

    app.run(checked_main)
