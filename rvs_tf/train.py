"""`python -m rvs_tf.train` is `rvs-train` (see rvs_tf.cli.train)."""
if __name__ == "__main__":
    from rvs_tf.cli import train as _cli

    _cli.run()
