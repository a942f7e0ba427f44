"""Resumable evaluation: each attack's progress kept in `state_dir`, written atomically after every round
of batches, so `kill -9` and the same command again continue where it stopped and end with the same report.

Layout: `evaluation.json` (what the state belongs to: model, data, norm and eps, attacks, seed, cascade,
batch size), then one folder per attack of the ensemble, `<position>-<name>/`, holding `index.json` (the examples the
attack runs on, how many batches are finished, which examples it broke) and `batch-<b>.npz` (the batch's
adversarial images and which of them the model misclassifies). A batch file is written before the index
names it, both through a temporary file, fsync and rename, so a killed run never leaves a half-written
file that reads as finished. The eps sweep keeps no state: it is recomputed (it is small, and its seeds
make it identical).
"""
import hashlib
import json
import os
import re
import shutil
import time
import warnings

import numpy as np

from rvs_tf.checkpoints import replace_durably, write_json_atomic

# Bumped whenever an attack's results or the state's format change, so that no report mixes batches of two
# versions (2: APGD and Square go on until an example is misclassified clearly; model logits with tolerance).
VERSION = 2
# A state's model is this evaluation's if their logits on the first examples agree to this (relative to the
# largest logit, at least 1): another process's kernels (GPU, TF32) need not reproduce them bit for bit.
LOGITS_TOLERANCE = 1e-3
LOGITS_EXAMPLES = 4
INDEX = "evaluation.json"


def fingerprint(model_name, first_logits, x, y, *, eps, specs, seed, cascade, batch_size,
                search_precision="float32", norm="linf"):
    """What an evaluation's state belongs to; a state is resumed only by an evaluation with the same one.
    The model is named by its description and its logits on the first examples (weights moved under the
    same path change them; they are compared with LOGITS_TOLERANCE), the data by a digest of the images
    and labels."""
    logits = np.asarray(first_logits, np.float64)[:LOGITS_EXAMPLES]
    return {"model": model_name, "model_logits": [[float(f"{v:.6g}") for v in row] for row in logits],
            "data": _digest(np.ascontiguousarray(x), np.ascontiguousarray(y)), "num_examples": int(len(y)),
            "norm": norm, "eps": float(eps), "attacks": [f"{s.name}: {s.fn} {dict(s.params)} white_box={s.white_box}"
                                           for s in specs],
            "seed": int(seed), "cascade": bool(cascade), "batch_size": int(batch_size),
            "search_precision": search_precision}


def _digest(*arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())
    return h.hexdigest()[:32]


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None


class EvaluationState:
    """The state folder of one evaluation. `writable` is False on the workers that are not the chief:
    they read the state to resume in step with the chief but never write it.

    restart: False refuses a state of another evaluation; True discards any saved state; "mismatched"
    discards only a state of another evaluation (what rvs-evaluate does with its default state folder,
    whose report it overwrites anyway)."""

    def __init__(self, directory, print_, *, restart=False, writable=True):
        if restart not in (False, True, "mismatched"):
            raise ValueError(f"restart: expected False, True or 'mismatched', got {restart!r}")
        self.directory, self.writable = os.fspath(directory), writable
        expected = {"version": VERSION, "fingerprint": print_}
        found = _read_json(os.path.join(self.directory, INDEX))
        differ = _mismatch(found, expected) if found is not None else ""
        other = bool(differ)
        self.fresh = found is not None and (restart is True or (other and restart == "mismatched"))
        if self.fresh:
            why = f"another evaluation's ({differ})" if other else "restart=True"
            warnings.warn(f"state_dir: discarding the saved progress in {self.directory}: {why}",
                          stacklevel=3)
        elif other:
            raise ValueError(f"state_dir: expected the state of this evaluation in {self.directory}, got "
                             f"one of another ({differ}); pass restart=True "
                             "(rvs-evaluate --restart) to discard it, or choose another state_dir")
        if self.writable:
            if self.fresh:
                shutil.rmtree(self.directory)
            os.makedirs(self.directory, exist_ok=True)
            write_json_atomic(os.path.join(self.directory, INDEX), expected)

    def attack(self, position, name, examples, batch_size):
        """The progress of the ensemble's attack number `position` on `examples` (global indices)."""
        slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-") or "attack"
        return AttackProgress(os.path.join(self.directory, f"{position:02d}-{slug}"), name, examples,
                              batch_size, writable=self.writable, fresh=self.fresh)


def _mismatch(found, expected):
    """The fields that differ, e.g. "eps: 0.1 in the state, 0.05 now"; "" when the state is this one's."""
    if found.get("version") != expected["version"]:
        return f"format version {found.get('version')!r} in the state, {expected['version']} now"
    old, new = {"norm": "linf", **(found.get("fingerprint") or {})}, expected["fingerprint"]  # L-inf before norms
    differ = []
    for k in sorted(set(old) | set(new)):
        if k == "model_logits" and k in old:
            gap = _logits_gap(old[k], new[k])
            if gap is not None:
                differ.append(f"model logits on the first examples: {gap}")
        elif old.get(k) != new.get(k):
            differ.append(f"{k}: {old.get(k)!r} in the state, {new.get(k)!r} now")
    return "; ".join(differ)


def _logits_gap(old, new):
    """None if two lists of logits agree within LOGITS_TOLERANCE, else what differs."""
    old, new = np.asarray(old, np.float64), np.asarray(new, np.float64)
    if old.shape != new.shape:
        return f"shape {old.shape} in the state, {new.shape} now"
    scale = max(1.0, float(np.max(np.abs(new), initial=0.0)))
    gap = float(np.max(np.abs(old - new), initial=0.0))
    tolerance = LOGITS_TOLERANCE * scale
    return None if gap <= tolerance else f"differ by up to {gap:.3g} (tolerance {tolerance:.3g})"


class AttackProgress:
    """One attack's finished batches: `load` restores them, `save` records newly finished ones."""

    def __init__(self, directory, name, examples, batch_size, *, writable, fresh):
        self.directory, self.name, self.batch_size = directory, name, batch_size
        self.examples = [int(i) for i in examples]
        self.writable, self.fresh = writable, fresh
        self.done, self.broken, self.restored = 0, [], 0
        self.started, self.earlier_seconds = time.perf_counter(), 0.0  # time spent by killed runs

    def _batch_path(self, b):
        return os.path.join(self.directory, f"batch-{b:06d}.npz")

    def load(self, x_adv):
        """Fill `x_adv` with the finished batches' images; return how many batches are finished."""
        index = None if self.fresh else _read_json(os.path.join(self.directory, "index.json"))
        if index is None:
            return 0
        if index.get("examples") != self.examples:
            raise ValueError(f"state_dir: expected {self.name} to attack the examples recorded in "
                             f"{self.directory}, got others (the state is inconsistent); pass restart=True")
        for b in range(index["batches_done"]):
            with np.load(self._batch_path(b)) as batch:
                x_adv[b * self.batch_size:b * self.batch_size + len(batch["x_adv"])] = batch["x_adv"]
        self.done, self.broken = index["batches_done"], list(index["broken"])
        self.restored, self.earlier_seconds = self.done, float(index.get("seconds", 0.0))
        return self.done

    def save(self, batches):
        """Record finished batches, [(batch number, adversarial images, misclassified)], in order."""
        if not self.writable:
            return
        os.makedirs(self.directory, exist_ok=True)
        for b, images, wrong in batches:
            path = self._batch_path(b)
            with open(path + ".tmp", "wb") as handle:
                np.savez_compressed(handle, x_adv=images, broken=wrong)
            replace_durably(path + ".tmp", path)
            start = b * self.batch_size
            self.broken += [self.examples[start + j] for j in np.flatnonzero(wrong)]
            self.done = b + 1
        write_json_atomic(os.path.join(self.directory, "index.json"), {
            "attack": self.name, "batch_size": self.batch_size, "examples": self.examples,
            "batches_done": self.done, "finished": min(self.done * self.batch_size, len(self.examples)),
            "broken": self.broken, "seconds": self.seconds()})

    def seconds(self):
        """Seconds this attack has run, in this process and the earlier ones whose batches it restored."""
        return self.earlier_seconds + time.perf_counter() - self.started


def load_results(directory):
    """{attack name: (examples attacked, broken mask, adversarial images)} of the finished batches in a
    state folder, in ensemble order: per-example results, e.g. to compare two runs."""
    out = {}
    for entry in sorted(os.listdir(directory)):
        if not os.path.isdir(os.path.join(directory, entry)):
            continue
        index = _read_json(os.path.join(directory, entry, "index.json"))
        if index is None:
            continue
        progress = AttackProgress(os.path.join(directory, entry), index["attack"], index["examples"],
                                  index["batch_size"], writable=False, fresh=False)
        batches = []
        for b in range(index["batches_done"]):
            with np.load(progress._batch_path(b)) as batch:
                batches.append({k: batch[k] for k in batch.files})
        done = min(index["batches_done"] * index["batch_size"], len(index["examples"]))
        out[index["attack"]] = (np.asarray(index["examples"][:done], np.int64),
                                np.concatenate([b["broken"] for b in batches]) if batches
                                else np.zeros(0, bool),
                                np.concatenate([b["x_adv"] for b in batches]) if batches else None)
    return out
