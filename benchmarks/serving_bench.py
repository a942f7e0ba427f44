"""Export size and predict latency per image of an exported classifier, at batch 1 and 256.

    .venv/bin/python benchmarks/serving_bench.py                          # fresh small CNN, 28x28x1
    .venv/bin/python benchmarks/serving_bench.py --arch=preact_resnet18 --shape=32,32,3
    .venv/bin/python benchmarks/serving_bench.py --model=saved_models/<name>/<version>

Times, on this machine's CPU, the SavedModel signatures as TF Serving runs them (the loaded concrete
functions): `serving_default` (float images) and `serving_bytes` (PNG strings decoded and resized in the
graph), plus the REST path of `rvs_tf.serving.predict_json` (JSON parsing and answer building included),
each the median of --repeats calls after one warm-up call. Weights are untrained: timing does not depend
on them.
"""
import base64
import io
import json
import os
import tempfile
import time

from absl import app, flags, logging

flags.DEFINE_string("model", None, "An exported version to time instead of a fresh export.")
flags.DEFINE_string("arch", "small_cnn", "Classifier of the fresh export.")
flags.DEFINE_list("shape", ["28", "28", "1"], "Image shape H,W,C of the fresh export.")
flags.DEFINE_list("batches", ["1", "256"], "Batch sizes.")
flags.DEFINE_integer("repeats", 20, "Timed calls per measurement.")
FLAGS = flags.FLAGS


def _median_seconds(fn, repeats):
    import numpy as np

    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


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
        path, _ = export.resolve_model_path(FLAGS.model)
    else:
        shape = tuple(int(s) for s in FLAGS.shape)
        classifier = models.build_classifier(FLAGS.arch, shape, 10)
        path = export.export_classifier(classifier, tempfile.mkdtemp(), "bench", version=1)
    loaded = tf.saved_model.load(path)
    floats, encoded = loaded.signatures[export.SERVING_SIGNATURE], loaded.signatures[export.BYTES_SIGNATURE]
    shape = tuple(serving.input_specs(floats)[export.IMAGES_INPUT].shape[1:])
    print(f"export {path}: {_size_mb(path):.2f} MB on disk "
          f"({_size_mb(os.path.join(path, 'variables')):.2f} MB of variables), image shape {shape}")
    print("\n| path | batch | ms per call | ms per image |\n|---|---|---|---|")
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
        cases = {"serving_default (float32 tensor)": lambda: floats(images=images)["logits"].numpy(),
                 "serving_bytes (PNG strings)":
                     lambda: encoded(image_bytes=tf.constant(pngs))["logits"].numpy(),
                 "REST JSON, b64 PNG (predict_json)": lambda: serving.predict_json(loaded.signatures, body)}
        for name, fn in cases.items():
            seconds = _median_seconds(fn, FLAGS.repeats)
            print(f"| {name} | {batch} | {1000 * seconds:.2f} | {1000 * seconds / batch:.3f} |")


if __name__ == "__main__":
    app.run(main)
