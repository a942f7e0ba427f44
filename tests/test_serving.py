"""Serving: the encoded-bytes signature, TF Serving's REST JSON mapping (row and columnar, b64), a REST
endpoint on 127.0.0.1 and the gRPC PredictionService, all checked against the model itself."""
import base64
import io
import json
import urllib.error
import urllib.request
from concurrent import futures

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from rvs_tf import export, serving

SHAPE = (8, 8, 3)


def classifier(seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(SHAPE)
    h = keras.layers.Flatten()(inputs)
    h = keras.layers.Dense(6, activation="relu", name="features")(h)
    return keras.Model(inputs, keras.layers.Dense(4)(h))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """saved_models/demo/{1,2} from two different classifiers."""
    root = str(tmp_path_factory.mktemp("saved_models"))
    models = {v: classifier(seed=v) for v in (1, 2)}
    for version, model in models.items():
        export.export_classifier(model, root, "demo", version=version)
    return root + "/demo", models


def encode(array, fmt="PNG"):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def b64(data):
    return {"b64": base64.b64encode(data).decode()}


def images(n, size=(8, 8), seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *size, 3), dtype=np.uint8)


def test_bytes_signature_decodes_and_resizes_in_the_graph(exported):
    model_dir, models = exported
    loaded = tf.saved_model.load(model_dir + "/2")
    signature = loaded.signatures[export.BYTES_SIGNATURE]
    assert dict(serving.input_specs(signature)) == {
        export.BYTES_INPUT: tf.TensorSpec([None], tf.string, name=export.BYTES_INPUT)}
    model = models[2]

    exact = images(3)  # PNG is lossless: the same pixels as the float path, to float precision
    out = signature(image_bytes=tf.constant([encode(a) for a in exact]))
    np.testing.assert_allclose(out["logits"].numpy(), model(exact / 255.0).numpy(), atol=1e-5)
    assert set(out) == {"logits", "probabilities", "classes"}

    larger = images(2, size=(16, 12), seed=1)  # resized bilinearly to 8 x 8
    out = signature(image_bytes=tf.constant([encode(a) for a in larger]))
    expected = model(tf.image.resize(larger / 255.0, SHAPE[:2])).numpy()
    np.testing.assert_allclose(out["logits"].numpy(), expected, atol=1e-4)

    gray = np.random.default_rng(2).integers(0, 256, (8, 8), dtype=np.uint8)  # 1 channel -> RGB
    out = signature(image_bytes=tf.constant([encode(gray)]))
    np.testing.assert_allclose(out["logits"].numpy(), model(np.repeat(gray[None, :, :, None], 3, -1) / 255.0),
                               atol=1e-5)

    smooth = np.clip(np.linspace(0, 255, 64).reshape(8, 8)[None, :, :, None] + [0, 40, 80], 0, 255)
    smooth = smooth.astype(np.uint8)  # JPEG: compare with Pillow's decoder, within a few grey levels
    jpeg = encode(smooth[0], "JPEG")
    decoded = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))[None] / 255.0
    out = signature(image_bytes=tf.constant([jpeg]))
    np.testing.assert_allclose(out["logits"].numpy(), model(decoded).numpy(), atol=0.05)

    with pytest.raises(tf.errors.InvalidArgumentError):
        signature(image_bytes=tf.constant([b"not an image"]))


def toy_signatures(tmp_path):
    """A SavedModel with a two-input/two-output signature and a one-input/one-output one, to check the
    mapping against the shapes of TF Serving's documented answers."""

    class Toy(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x"),
                                      tf.TensorSpec([None], tf.string, name="tag")])
        def both(self, x, tag):
            return {"total": tf.reduce_sum(x, -1), "tag_bytes": tag}

        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")])
        def double(self, x):
            return {"y": 2.0 * x}

    toy = Toy()
    tf.saved_model.save(toy, str(tmp_path / "toy"),
                        signatures={"serving_default": toy.both, "double": toy.double})
    return tf.saved_model.load(str(tmp_path / "toy")).signatures


def test_rest_mapping_row_and_columnar(tmp_path):
    signatures = toy_signatures(tmp_path)
    raw = [b"\x00\xffa", b"b"]
    rows = {"instances": [{"x": [1, 2], "tag": b64(raw[0])}, {"x": [3, 4], "tag": b64(raw[1])}]}
    assert serving.predict_json(signatures, rows) == {"predictions": [
        {"total": 3.0, "tag_bytes": b64(raw[0])}, {"total": 7.0, "tag_bytes": b64(raw[1])}]}
    columns = {"inputs": {"x": [[1, 2], [3, 4]], "tag": [b64(raw[0]), b64(raw[1])]}}
    assert serving.predict_json(signatures, json.dumps(columns)) == {
        "outputs": {"total": [3.0, 7.0], "tag_bytes": [b64(raw[0]), b64(raw[1])]}}
    # One input and one output: names are omitted in both directions.
    assert serving.predict_json(signatures, {"signature_name": "double", "instances": [[1, 2], [3, 4]]}) == {
        "predictions": [[2.0, 4.0], [6.0, 8.0]]}
    assert serving.predict_json(signatures, {"signature_name": "double", "inputs": {"x": [[1, 2]]}}) == {
        "outputs": [[2.0, 4.0]]}
    assert serving.predict_json(signatures, {"signature_name": "double", "instances": [{"x": [0, 1]}]}) == {
        "predictions": [[0.0, 2.0]]}

    for body, message in [({"instances": [], "inputs": {}}, "body: expected exactly one"),
                          ({"signature_name": "nope", "inputs": [[1, 2]]}, "signature_name: expected one of"),
                          ({"signature_name": "double", "instances": [[1, 2, 3]]},
                           "input 'x': expected shape"),
                          ({"instances": [{"x": [1, 2]}]},
                           "instances: expected objects with the inputs \\['tag', 'x'\\]"),
                          ({"signature_name": "double", "inputs": [["a", 1]]},
                           "input 'x': expected float32 values"),
                          ({"inputs": {"x": [[1, 2]], "tag": [{"b64": "%%%"}]}}, "b64: expected base64 text"),
                          ("{", "body: expected valid JSON")]:
        with pytest.raises(serving.PredictError, match=message):
            serving.predict_json(signatures, body)


def test_rest_mapping_of_an_exported_classifier(exported):
    model_dir, models = exported
    signatures = tf.saved_model.load(model_dir + "/1").signatures
    pixels = images(2)
    logits = models[1](pixels / 255.0).numpy()
    answer = serving.predict_json(signatures, {"instances": (pixels / 255.0).tolist()})
    assert [sorted(p) for p in answer["predictions"]] == [["classes", "logits", "probabilities"]] * 2
    np.testing.assert_allclose([p["logits"] for p in answer["predictions"]], logits, atol=1e-5)
    assert [p["classes"] for p in answer["predictions"]] == logits.argmax(-1).tolist()
    answer = serving.predict_json(signatures, {"signature_name": export.BYTES_SIGNATURE,
                                               "inputs": {"image_bytes": [b64(encode(p)) for p in pixels]}})
    np.testing.assert_allclose(answer["outputs"]["logits"], logits, atol=1e-5)


def post(url, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_rest_endpoint_on_localhost_serves_versions_and_stops_by_itself(exported):
    model_dir, models = exported
    pixels = images(2, seed=3)
    server = serving.RestServer(model_dir, max_requests=4)
    try:
        status, answer = post(server.url + ":predict", {"signature_name": export.BYTES_SIGNATURE,
                                                        "instances": [b64(encode(p)) for p in pixels]})
        assert status == 200
        np.testing.assert_allclose([p["logits"] for p in answer["predictions"]],
                                   models[2](pixels / 255.0).numpy(), atol=1e-5)  # newest version
        status, answer = post(server.url + "/versions/1:predict", {"inputs": (pixels / 255.0).tolist()})
        assert status == 200
        np.testing.assert_allclose(answer["outputs"]["logits"], models[1](pixels / 255.0).numpy(), atol=1e-5)
        assert post(server.url + ":predict", b"{")[0] == 400
        status, answer = post(server.url + "/versions/7:predict", {"inputs": []})
        assert status == 404 and "version 7" in answer["error"]
        server._thread.join(timeout=10)  # the fourth answer was the last one
        assert not server._thread.is_alive()
    finally:
        server.close()


def test_grpc_prediction_service_on_localhost(exported):
    grpc = pytest.importorskip("grpc")
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    model_dir, models = exported
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = serving.prediction_servicer(model_dir)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            pixels = images(3, seed=4)
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "demo"
            request.model_spec.signature_name = export.BYTES_SIGNATURE
            request.inputs[export.BYTES_INPUT].CopyFrom(
                tf.make_tensor_proto([encode(p) for p in pixels], dtype=tf.string))
            response = stub.Predict(request, timeout=30)
            assert response.model_spec.version.value == 2
            np.testing.assert_allclose(tf.make_ndarray(response.outputs["logits"]),
                                       models[2](pixels / 255.0).numpy(), atol=1e-5)

            request = predict_pb2.PredictRequest()
            request.model_spec.name = "demo"
            request.model_spec.version.value = 1
            request.inputs["images"].CopyFrom(tf.make_tensor_proto((pixels / 255.0).astype(np.float32)))
            request.output_filter.append("classes")
            response = stub.Predict(request, timeout=30)
            assert list(response.outputs) == ["classes"]
            np.testing.assert_array_equal(tf.make_ndarray(response.outputs["classes"]),
                                          models[1](pixels / 255.0).numpy().argmax(-1))

            request.model_spec.name = "other"
            with pytest.raises(grpc.RpcError) as error:
                stub.Predict(request, timeout=30)
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        server.stop(grace=None)
