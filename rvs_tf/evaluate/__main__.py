"""`python -m rvs_tf.evaluate` is `rvs-evaluate` (see rvs_tf.cli.evaluate); the library is the package."""
from absl import flags

from rvs_tf.cli import evaluate as _cli

__doc__ = _cli.__doc__  # absl prints __main__'s docstring as the usage of --help
flags.adopt_module_key_flags(_cli)  # so --help lists the CLI's flags
_cli.run()
