"""Strategies and XLA for rvs-train, and who writes files when several workers train.

  strategy = get_strategy("mirrored")          # or "default", "multi_worker" (reads TF_CONFIG)
  precision.set_policy("auto")                 # before the models are built (rvs_tf.precision)
  with strategy.scope():
      model = RVSModel(...); model.compile(..., jit_compile=resolve_jit_compile(flag, strategy))
  checkpoints_dir = worker_dir(path)            # the chief writes `path`, other workers a scratch copy

`MultiWorkerMirroredStrategy` must be created before any other TensorFlow operation runs in the process
(it configures the collective ops of the runtime), so call `get_strategy` first thing in `main`.
"""
import json
import os
import shutil
import tempfile
import warnings

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker")
_COMMUNICATION = {"auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
                  "ring": tf.distribute.experimental.CommunicationImplementation.RING,
                  "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL}


def tf_config():
    """The parsed TF_CONFIG environment variable ({} when unset), with a clear error when malformed."""
    text = os.environ.get("TF_CONFIG", "").strip()
    if not text:
        return {}
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError("TF_CONFIG: expected JSON like {\"cluster\": {\"worker\": [\"host:port\", ...]}, "
                         f"\"task\": {{\"type\": \"worker\", \"index\": 0}}}}, got {text[:80]!r} "
                         f"({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"TF_CONFIG: expected a JSON object, got {text[:80]!r}")
    return config


def _check_cluster(config):
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not any(cluster.get(k) for k in ("worker", "chief")):
        raise ValueError("--strategy=multi_worker: TF_CONFIG must name the cluster, e.g. "
                         "{\"cluster\": {\"worker\": [\"host1:port\", \"host2:port\"]}, "
                         "\"task\": {\"type\": \"worker\", \"index\": 0}}; "
                         f"got TF_CONFIG={json.dumps(config) if config else 'unset'}")
    if not isinstance(task, dict) or task.get("type") not in cluster or not (
            0 <= int(task.get("index", -1)) < len(cluster[task["type"]])):
        raise ValueError("--strategy=multi_worker: TF_CONFIG's task must be one of its cluster's jobs with "
                         f"a valid index, got task={task!r} for cluster jobs {sorted(cluster)}")


def get_strategy(name="default", *, devices=None, communication="auto"):
    """The `tf.distribute.Strategy` for `--strategy`.

    default: the no-op default strategy (one device). mirrored: `MirroredStrategy` over `devices` (default:
    all GPUs, else the CPU). multi_worker: `MultiWorkerMirroredStrategy` with the cluster from TF_CONFIG;
    `communication` is "auto", "ring" (CPU/any) or "nccl" (GPUs).
    """
    if name not in STRATEGIES:
        raise ValueError(f"--strategy: expected one of {', '.join(STRATEGIES)}, got {name!r}")
    if communication not in _COMMUNICATION:
        raise ValueError(f"communication: expected one of {sorted(_COMMUNICATION)}, got {communication!r}")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices)
    _check_cluster(tf_config())
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=_COMMUNICATION[communication])
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except RuntimeError as error:
        if "program startup" not in str(error):
            raise
        raise RuntimeError("--strategy=multi_worker: the strategy must be created before any TensorFlow "
                           "operation runs in the process (including module-level tf.constant at import "
                           "time); call rvs_tf.distribute.get_strategy first") from error


def task(strategy=None):
    """(task type, task index) of this process: from the strategy's cluster resolver, else TF_CONFIG;
    (None, 0) on a single machine."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is not None and resolver.task_type:
        return resolver.task_type, int(resolver.task_id or 0)
    info = tf_config().get("task") or {}
    return info.get("type"), int(info.get("index", 0))


def is_chief(strategy=None):
    """True for the process that writes checkpoints and exports: the "chief" task, or worker 0 when the
    cluster has no chief (TF's convention), or the only process of a single-machine run."""
    task_type, index = task(strategy)
    if task_type is None:
        return True
    if task_type == "chief":
        return True
    cluster = tf_config().get("cluster") or {}
    return task_type == "worker" and index == 0 and not cluster.get("chief")


def worker_dir(directory, strategy=None):
    """Where this process writes what belongs in `directory`: `directory` itself on the chief, a scratch
    folder on the other workers.

    Every worker must still run the save (reading synchronised variables such as metrics is a collective
    op that waits for all workers), but only the chief's copy is kept. Call `discard_worker_dir` after.
    """
    if is_chief(strategy):
        return directory
    task_type, index = task(strategy)
    return os.path.join(tempfile.gettempdir(), f"rvs_tf-{task_type}-{index}-{os.getpid()}",
                        os.path.basename(os.path.normpath(directory)))


def discard_worker_dir(directory, strategy=None):
    """Remove a non-chief worker's scratch copy (a no-op on the chief)."""
    if not is_chief(strategy):
        shutil.rmtree(os.path.dirname(worker_dir(directory, strategy)), ignore_errors=True)


def resolve_jit_compile(jit_compile, strategy=None):
    """The `jit_compile` to pass to `compile`: False (with a warning) when the strategy has several
    replicas, because Keras XLA-compiles the whole cross-replica step and XLA then fails on variables
    of the other devices ("Trying to access resource ... from device CPU:0"). `RobustModel.compile`
    applies the same rule, so this only lets the CLI report it early."""
    strategy = strategy or tf.distribute.get_strategy()
    if jit_compile is True and strategy.num_replicas_in_sync > 1:
        warnings.warn(f"--jit_compile: XLA is not used under {type(strategy).__name__} with "
                      f"{strategy.num_replicas_in_sync} replicas (Keras would compile the cross-replica "
                      "step, which XLA cannot place); training runs without it.", stacklevel=2)
        return False
    return jit_compile
