"""`python -m rvs_tf.export` is `rvs-export` (see rvs_tf.cli.export); the library is the package."""
from absl import flags

from rvs_tf.cli import export as _cli

__doc__ = _cli.__doc__  # absl prints __main__'s docstring as the usage of --help
flags.adopt_module_key_flags(_cli)  # so --help lists the CLI's flags
_cli.run()
