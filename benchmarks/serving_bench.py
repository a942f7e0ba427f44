"""Export size and predict latency per image of an exported classifier, at batch 1 and 256.

    .venv/bin/python benchmarks/serving_bench.py                          # fresh small CNN, 28x28x1
    .venv/bin/python benchmarks/serving_bench.py --arch=preact_resnet18 --shape=32,32,3
    .venv/bin/python benchmarks/serving_bench.py --model=saved_models/<name>/<version>
    .venv/bin/python benchmarks/serving_bench.py --serving_precisions=float32,mixed_bfloat16   # both, one process

Times, on this machine's CPU, the SavedModel signatures as TF Serving runs them (the loaded concrete
functions): `serving_default` (float images) and `serving_bytes` (PNG strings decoded and resized in the
graph), plus the REST path of `rvs_tf.serving.predict_json` (JSON parsing and answer building included),
each the median of --repeats calls after one warm-up call. Weights are untrained: timing does not depend
on them. With several --serving_precisions, the fresh classifier is exported once per precision (the
same weights; `rvs-train --serving_precision`) and the measurements alternate between the exports, so
their ratio comes from one process under the same load.
"""
import base64
import io
import json
import os
import tempfile

from absl import app, flags, logging

from timing import median_seconds  # benchmarks/, the script's folder

flags.DEFINE_string("model", None, "An exported version to time instead of a fresh export.")
flags.DEFINE_string("arch", "small_cnn", "Classifier of the fresh export.")
flags.DEFINE_list("shape", ["28", "28", "1"], "Image shape H,W,C of the fresh export.")
flags.DEFINE_list("batches", ["1", "256"], "Batch sizes.")
flags.DEFINE_integer("repeats", 20, "Timed calls per measurement.")
flags.DEFINE_list("serving_precisions", ["float32"], "What the fresh export computes in (export."
                  "SERVING_PRECISIONS); several: one export each, timed side by side.")
FLAGS = flags.FLAGS


def _size_mb(path):
    sizes = [os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files]
    return sum(sizes) / 1e6


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import numpy as np
    import tensorflow as tf
    from PIL import Image

    from rvs_tf import export, models, serving

    if FLAGS.model:
        paths = {"as exported": export.resolve_model_path(FLAGS.model)[0]}
    else:
        shape = tuple(int(s) for s in FLAGS.shape)
        classifier = models.build_classifier(FLAGS.arch, shape, 10)
        paths = {p: export.export_classifier(classifier, tempfile.mkdtemp(), "bench", version=1,
                                             serving_precision=p) for p in FLAGS.serving_precisions}
    exports = {}
    for precision, path in paths.items():
        loaded = tf.saved_model.load(path)
        exports[precision] = loaded
        shape = tuple(serving.input_specs(loaded.signatures[export.SERVING_SIGNATURE])[export.IMAGES_INPUT].shape[1:])
        print(f"export {path} ({precision}): {_size_mb(path):.2f} MB on disk "
              f"({_size_mb(os.path.join(path, 'variables')):.2f} MB of variables), image shape {shape}")
    print("\n| computes in | path | batch | ms per call | ms per image |\n|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for batch in (int(b) for b in FLAGS.batches):
        pixels = rng.integers(0, 256, (batch, *shape), dtype=np.uint8)
        images = tf.constant(pixels / 255.0, tf.float32)
        pngs = []
        for p in pixels:
            buffer = io.BytesIO()
            Image.fromarray(p[..., 0] if shape[-1] == 1 else p).save(buffer, format="PNG")
            pngs.append(buffer.getvalue())
        body = json.dumps({"signature_name": export.BYTES_SIGNATURE,
                           "instances": [{"b64": base64.b64encode(b).decode()} for b in pngs]})
        for name in ("serving_default (float32 tensor)", "serving_bytes (PNG strings)",
                     "REST JSON, b64 PNG (predict_json)"):
            for precision, loaded in exports.items():
                signatures = loaded.signatures
                fn = {"serving_default (float32 tensor)":
                          lambda: signatures[export.SERVING_SIGNATURE](images=images)["logits"].numpy(),
                      "serving_bytes (PNG strings)":
                          lambda: signatures[export.BYTES_SIGNATURE](image_bytes=tf.constant(pngs))["logits"].numpy(),
                      "REST JSON, b64 PNG (predict_json)": lambda: serving.predict_json(signatures, body)}[name]
                seconds = median_seconds(fn, FLAGS.repeats)
                print(f"| {precision} | {name} | {batch} | {1000 * seconds:.2f} | {1000 * seconds / batch:.3f} |")


if __name__ == "__main__":
    app.run(main)
