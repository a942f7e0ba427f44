"""Sharded evaluation: the attack batches are dealt to the replicas of a tf.distribute strategy (local
devices with MirroredStrategy, every worker's devices with MultiWorkerMirroredStrategy) and gathered back.

Whole batches, not slices of one, go to each replica: a batch is attacked with the same images and the
same seed whichever replica runs it, so the per-example results are those of one device.
"""
import numpy as np
import tensorflow as tf

from rvs_tf import distribute


def resolve_strategy(strategy):
    """None (no strategy), a tf.distribute.Strategy, or a name for `rvs_tf.distribute.get_strategy`."""
    if strategy is None or isinstance(strategy, tf.distribute.Strategy):
        return strategy
    if isinstance(strategy, str):
        return distribute.get_strategy(strategy)
    raise ValueError(f"strategy: expected a tf.distribute.Strategy or one of "
                     f"{', '.join(distribute.STRATEGIES)}, got {strategy!r}")


class Shards:
    """Runs one round of batches (one per replica) of an attack and returns every batch's output on
    every worker, so all workers keep the same cascade and stay in step."""

    def __init__(self, strategy=None):
        self.strategy = strategy
        self.replicas = strategy.num_replicas_in_sync if strategy is not None else 1
        self.multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        self.chief = distribute.is_chief(strategy) if self.multi_worker else True

    def run(self, fn, batches, eps):
        """[fn(x, y, eps, seed) as numpy] for up to `replicas` batches [(x, y, seed)]."""
        if self.replicas == 1:
            return [fn(x, y, eps, seed).numpy() for x, y, seed in batches]
        padded = batches + [batches[0]] * (self.replicas - len(batches))  # idle replicas redo batch 0

        def per_replica(part):
            return self.strategy.experimental_distribute_values_from_function(
                lambda ctx: tf.convert_to_tensor(padded[ctx.replica_id_in_sync_group][part]))

        # A Python function, not the tf.function itself: strategy.run would trace that with the
        # per-replica values as arguments, which its input signature refuses.
        out = self.strategy.run(lambda *args: fn(*args),
                                args=(per_replica(0), per_replica(1), eps, per_replica(2)))
        if not self.multi_worker:  # every replica is local: no collective needed
            return [t.numpy() for t in self.strategy.experimental_local_results(out)][:len(batches)]
        gathered = self.strategy.gather(out, axis=0).numpy()  # every worker gets every batch
        ends = np.cumsum([len(b[1]) for b in padded])
        return np.split(gathered, ends[:-1])[:len(batches)]

    def agree(self, done, name):
        """`done` (batches restored from the state) after checking every worker restored as many."""
        if not self.multi_worker:
            return done
        counts = self.strategy.gather(self.strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant([done], tf.int64)), axis=0).numpy()
        if len(set(counts.tolist())) > 1:
            raise RuntimeError(f"state_dir: expected every worker to restore as many batches of {name}, "
                               f"got {counts.tolist()} (one per replica); put state_dir on storage every "
                               "worker reads, or pass restart=True")
        return done
