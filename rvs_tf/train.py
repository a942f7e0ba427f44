"""`python -m rvs_tf.train` is `rvs-train` (see rvs_tf.cli.train)."""
if __name__ == "__main__":  # importing this module runs nothing
    from absl import flags

    from rvs_tf.cli import train as _cli

    __doc__ = _cli.__doc__  # absl prints __main__'s docstring as the usage of --help
    flags.adopt_module_key_flags(_cli)  # so --help lists the CLI's flags
    _cli.run()
