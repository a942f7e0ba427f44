"""Running attacks: the evaluation set held in memory, each attack compiled once and run in batches, and
every result re-checked independently of the attack's own bookkeeping."""
import functools
import json
import sys
import weakref
import zlib

import keras
import numpy as np
import tensorflow as tf

from rvs_tf import attacks as attacks_lib
from rvs_tf.evaluate.shards import Shards
from rvs_tf.threat_model import parse_norm, per_example_size


def materialise(dataset, num_examples):
    """(images, labels) numpy arrays from a tf.data.Dataset of batches or examples, or a pair of arrays."""
    if isinstance(dataset, (tuple, list)) and len(dataset) == 2:
        x, y = np.asarray(dataset[0]), np.asarray(dataset[1])
    elif isinstance(dataset, tf.data.Dataset):
        x, y = _take(dataset, num_examples)
    else:
        raise ValueError(f"dataset: expected a tf.data.Dataset of (images, labels) or a pair of arrays, "
                         f"got {type(dataset).__name__}")
    if num_examples is not None:
        x, y = x[:num_examples], y[:num_examples]
    if x.ndim != 4 or y.shape != (len(x),):
        raise ValueError(f"dataset: expected images [N, H, W, C] and labels [N], got {x.shape} and {y.shape}")
    if not np.issubdtype(x.dtype, np.floating) or x.min() < 0.0 or x.max() > 1.0:
        raise ValueError(f"dataset: expected images as floats in [0, 1], got dtype {x.dtype} in "
                         f"[{x.min()}, {x.max()}]")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"dataset: expected labels as integer class indices, got dtype {y.dtype}")
    return x.astype(np.float32), y.astype(np.int64)


def _take(dataset, num_examples):
    """The first `num_examples` (all if None) of a dataset of (image, label) examples or batches."""
    xs, ys, count = [], [], 0
    for element in dataset:
        if not isinstance(element, (tuple, list)) or len(element) != 2:
            raise ValueError("dataset: expected (images, labels) pairs, got another structure")
        bx, by = np.asarray(element[0]), np.asarray(element[1])
        if by.ndim == 0:
            bx, by = bx[None], by[None]
        xs.append(bx)
        ys.append(by)
        count += len(by)
        if num_examples is not None and count >= num_examples:
            break
    if not xs:
        raise ValueError("dataset: expected examples, got an empty dataset")
    return np.concatenate(xs), np.concatenate(ys)


# Traces shared by every Keras model of one architecture, whose weights are arguments:
# (architecture, what, input signature) -> (weak set of the models using it, tf.function).
_SHARED_TRACES = {}
# Layers whose computation is not all in their config and weights: a Lambda's function (its closure and
# globals are not serialised), a TFSMLayer's SavedModel (which reads its own variables).
_OPAQUE_LAYERS = ("Lambda", "TFSMLayer")


def _architecture(model):
    """A key equal for Keras models that compute the same function of (weights, images), or None.

    Only functional and Sequential models made of Keras's and rvs_tf's own layers qualify (their config
    describes the whole computation; layer names are part of it, so models rebuilt by one builder or loaded
    from one file share, auto-named ones do not). Subclassed models and custom, Lambda or TFSMLayer layers
    may keep behaviour outside their config, so they get traces of their own."""
    kind = type(model)
    if not (kind.__module__.startswith("keras.") and kind.__name__ in ("Functional", "Sequential")):
        return None
    for layer in model._flatten_layers():
        if (not type(layer).__module__.startswith(("keras.", "rvs_tf."))
                or type(layer).__name__ in _OPAQUE_LAYERS):
            return None
    try:
        config = model.get_config()
        if _names_a_function(config):
            return None
        config = json.dumps([kind.__name__, config], sort_keys=True)  # not the compile config
    except (TypeError, ValueError, NotImplementedError):
        return None
    return config, tuple((v.path, tuple(v.shape), v.dtype, v.trainable) for v in model.variables)


def _names_a_function(config):
    """Whether a config holds a Python function (a custom activation, say): Keras writes one as its name
    only, without its module's globals or its closure, so two different functions can read the same."""
    if isinstance(config, dict):
        return (config.get("class_name") in ("function", "__lambda__")
                or any(_names_a_function(v) for v in config.values()))
    if isinstance(config, (list, tuple)):
        return any(_names_a_function(v) for v in config)
    return False


def _shared_trace(key, model, body, signature):
    """The tf.function of `key`, made with `model` (a live Keras model) if none is cached. It traces with
    any live model that uses it (all compute the same function of the weights), so a retrace after the
    first model is gone still works; entries no live model uses are dropped, so the cache holds no model."""
    for stale in [k for k, (users, _) in _SHARED_TRACES.items() if not users]:
        del _SHARED_TRACES[stale]
    if key not in _SHARED_TRACES:
        users = weakref.WeakSet()

        def traced(weights, *args):  # traced once per signature and graph context, by a live user
            template = next(iter(users))
            return body(lambda x: template.stateless_call(*weights, x, training=False)[0], *args)

        weight_specs = [[tf.TensorSpec(v.shape, v.dtype) for v in variables] for variables in
                        (model.trainable_variables, model.non_trainable_variables)]
        _SHARED_TRACES[key] = users, tf.function(traced, input_signature=[weight_specs, *signature])
    users, function = _SHARED_TRACES[key]
    users.add(model)
    return function


class _Bound:
    """A model as the traces see it: its architecture key (see `_architecture`) and its weights, read
    once (evaluation never changes them)."""

    def __init__(self, model):
        self.model, self.architecture = model, _architecture(model)
        self.weights = None if self.architecture is None else [
            [tf.convert_to_tensor(v) for v in variables]
            for variables in (model.trainable_variables, model.non_trainable_variables)]


class Runner:
    """Compiles each attack once (eps and seed are tensors, so the sweep does not retrace; Keras models of
    one architecture share the traces, see `_architecture`), runs it in batches (one per replica of
    `strategy` at a time), re-checks every result independently of the attack's own bookkeeping.

    With a `search_model` (the same classifier computing in bfloat16), the attacks search with it and
    every verdict is float32: an example the search broke that the float32 model still classifies
    correctly is attacked again with the float32 model, so a break found in bfloat16 never counts
    unconfirmed and one bfloat16 rounding hid is not lost."""

    def __init__(self, model, image_shape, batch_size, seed, progress, strategy=None, search_model=None,
                 norm="linf"):
        self.model, self.batch_size, self.seed, self.norm = model, batch_size, seed, parse_norm(norm)
        self.shards = Shards(strategy)
        self.progress = progress and self.shards.chief
        self._x_spec = tf.TensorSpec([None, *image_shape], tf.float32)
        self._verdict = _Bound(model)
        self._search = None if search_model is None or search_model is model else _Bound(search_model)
        self.predict = self._compile(
            "predict", lambda model, x: tf.argmax(attacks_lib.model_logits(model, x), -1), [self._x_spec])
        if self._search is not None:
            self._search_wrong = self._compile(
                "wrong", lambda model, x, y: tf.not_equal(tf.argmax(attacks_lib.model_logits(model, x), -1), y),
                [self._x_spec, tf.TensorSpec([None], tf.int64)], self._search)
        self._compiled = {}
        self.rechecked = {}  # attack name -> examples the search broke that float32 re-attacked

    def _compile(self, what, body, signature, bound=None):
        """`body(model, *args)` as a function of `args` (shapes in `signature`), traced once: per
        architecture for the Keras models `_architecture` accepts (the weights go in as arguments, so
        evaluating several models of one architecture in one process never retraces), else per model.
        `bound`: the model to use (default: the float32 model of the verdicts)."""
        bound = bound or self._verdict
        if bound.architecture is None:
            model = bound.model
            return tf.function(lambda *args: body(model, *args), input_signature=signature)
        shared = _shared_trace((bound.architecture, what, tuple(signature)), bound.model, body, signature)
        weights = bound.weights
        return lambda *args: shared(weights, *args)

    def num_classes(self, x):
        return int(self.logits(x[:1]).shape[-1])

    def logits(self, x):
        return attacks_lib.model_logits(self.model, tf.constant(x)).numpy()

    def _searches(self, spec):
        """Whether `spec` searches with the search model: there is one and the spec does not keep float32."""
        return self._search is not None and not spec.float32_search

    def _attack_fn(self, spec, search=True):
        """The compiled attack: with the search model when `search` and `_searches(spec)`, else float32."""
        bound = self._search if search and self._searches(spec) else self._verdict
        key = (spec, bound is self._verdict)
        if key not in self._compiled:
            self._compiled[key] = self._compile((spec, self.norm), functools.partial(spec.run, norm=self.norm), [
                self._x_spec, tf.TensorSpec([None], tf.int64), tf.TensorSpec([], tf.float32),
                tf.TensorSpec([2], tf.int64)], bound)
        return self._compiled[key]

    def _confirmed(self, spec, x, y, x_adv, eps_t, seed):
        """`x_adv` with every example the search broke but float32 still classifies correctly attacked
        again in float32 (same seed); a point float32 misclassifies is kept as the break it is. The
        re-attack draws its random starts for those examples alone: for a randomised attack it is an
        independent draw of the same float32 attack (re-running the whole batch would cost the search's
        saving), for a deterministic one the float32 attack's own result."""
        if not self._searches(spec) or not len(y):
            return x_adv
        unconfirmed = self._search_wrong(x_adv, y).numpy() & (self.predict(x_adv).numpy() == y)
        redo = np.flatnonzero(unconfirmed)
        self.rechecked[spec.name] = self.rechecked.get(spec.name, 0) + len(redo)
        if len(redo):
            x_adv = np.array(x_adv)
            x_adv[redo] = self._attack_fn(spec, search=False)(x[redo], y[redo], eps_t, seed).numpy()
        return x_adv

    def labels(self, x):
        if not len(x):
            return np.zeros(0, np.int64)
        return np.concatenate([self.predict(x[i:i + self.batch_size]).numpy()
                               for i in range(0, len(x), self.batch_size)])

    def attack(self, spec, x, y, eps, title, tag, state=None):
        """Adversarial images for (x, y) and whether each one is misclassified.

        Batch b's seed depends only on (seed, tag, b), never on what ran before, so a resumed run (`state`,
        an AttackProgress) and a sharded one attack every batch exactly as an uninterrupted single-device
        run does."""
        run, n, size, replicas = self._attack_fn(spec), len(x), self.batch_size, self.shards.replicas
        x_adv = np.empty_like(x)
        done = self.shards.agree(state.load(x_adv) if state is not None else 0, spec.name)
        starts, key = list(range(0, n, size)), zlib.crc32(tag.encode()) & 0x7FFFFFFF
        bar = None
        if self.progress and n:
            print(title + (f" (resuming after {done} batches)" if done else ""), file=sys.stderr, flush=True)
            bar = keras.utils.Progbar(n, unit_name="image")
        eps_t = tf.constant(eps, tf.float32)
        for first in range(done, len(starts), replicas):
            group = list(enumerate(starts[first:first + replicas], first))
            seeds = {b: tf.constant([self.seed, key * 1_000_000 + b], tf.int64) for b, _ in group}
            outs = self.shards.run(run, [(x[i:i + size], y[i:i + size], seeds[b]) for b, i in group], eps_t)
            outs = [self._confirmed(spec, x[i:i + size], y[i:i + size], out, eps_t, seeds[b])
                    for (b, i), out in zip(group, outs)]
            for (b, i), out in zip(group, outs):
                x_adv[i:i + size] = out
            if state is not None:
                state.save([(b, out, self.labels(out) != y[i:i + size]) for (b, i), out in zip(group, outs)])
            if bar is not None:
                bar.update(min(group[-1][1] + size, n))
        excess = np.max(per_example_size(x_adv - x, self.norm), initial=0.0)
        if excess > eps * (1 + 1e-5) + 1e-5 or (n and (x_adv.min() < 0.0 or x_adv.max() > 1.0)):
            raise RuntimeError(f"{spec.name}: expected images inside the {self.norm} eps-ball and [0, 1], got "
                               f"a perturbation of {self.norm} norm {excess} at eps {eps}; this is a bug in "
                               "rvs_tf.attacks (or a state_dir written by another version)")
        return x_adv, self.labels(x_adv) != y
