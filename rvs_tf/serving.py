"""TF Serving's predict API in-process: the REST JSON mapping, a small HTTP server and a gRPC servicer.

The TF Serving model server binary is not installable from the package registries this project uses, so
this module reproduces what it does with an exported version, to test clients and exports without it
(and to serve from a plain Python process when a container is not an option). The REST mapping follows
https://www.tensorflow.org/tfx/serving/api_rest:

  request  {"signature_name": "...", "instances": [...]}   row format: one entry per example; an entry
                                                            is the value of the only input, or an object
                                                            {input name: value} when there are several
           {"signature_name": "...", "inputs": ...}         columnar: the batched value of the only input,
                                                            or an object {input name: batched value}
  response {"predictions": [...]}                           row: one entry per example; an entry is the
                                                            value of the only output, or {output: value}
           {"outputs": ...}                                 columnar: the batched value of the only
                                                            output, or {output name: batched value}

Binary values travel as {"b64": "<base64>"} in both directions (outputs whose name ends in `_bytes`);
errors are {"error": "..."} with HTTP status 400.
"""
import base64
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import tensorflow as tf

from rvs_tf import export

DEFAULT_SIGNATURE = export.SERVING_SIGNATURE  # what a request without "signature_name" gets


class PredictError(ValueError):
    """A bad predict request; its message is what TF Serving would put in {"error": ...}."""


def _decode_b64(value):
    if isinstance(value, dict):
        if set(value) != {"b64"} or not isinstance(value["b64"], str):
            raise PredictError("expected a value or {\"b64\": \"...\"}, got an object with keys "
                               f"{sorted(value)}")
        try:
            return base64.b64decode(value["b64"], validate=True)
        except ValueError as error:
            raise PredictError(f"b64: expected base64 text, got invalid base64 ({error})") from None
    if isinstance(value, list):
        return [_decode_b64(item) for item in value]
    return value


def _as_tensor(value, spec, name):
    value = _decode_b64(value)
    try:
        if spec.dtype == tf.string:
            array = np.array(value, dtype=object)
            flat = [v.encode() if isinstance(v, str) else v for v in array.reshape(-1)]
            if not all(isinstance(v, bytes) for v in flat):
                raise ValueError("expected strings or {\"b64\": ...} values")
            tensor = tf.constant(np.array(flat, dtype=object).reshape(array.shape), tf.string)
        else:
            tensor = tf.constant(np.asarray(value, dtype=spec.dtype.as_numpy_dtype))
    except (ValueError, TypeError) as error:
        raise PredictError(f"input {name!r}: expected {spec.dtype.name} values, got ones that cannot be read "
                           f"as such ({error})") from None
    if not spec.shape.is_compatible_with(tensor.shape):
        raise PredictError(f"input {name!r}: expected shape {spec.shape.as_list()} (None = any), "
                           f"got {tensor.shape.as_list()}")
    return tensor


def _to_json(tensor, name):
    array = tensor.numpy() if hasattr(tensor, "numpy") else np.asarray(tensor)
    if array.dtype == object:  # strings: base64 for *_bytes outputs (binary), UTF-8 text otherwise
        if name.endswith("_bytes"):
            encode = np.vectorize(lambda b: {"b64": base64.b64encode(b).decode()}, otypes=[object])
            return encode(array).tolist()
        return np.vectorize(lambda b: b.decode("utf-8", "replace"), otypes=[object])(array).tolist()
    return array.tolist()


def input_specs(signature):
    """{input name: TensorSpec} of a loaded signature (a ConcreteFunction)."""
    return dict(signature.structured_input_signature[1])


def predict_json(signatures, body):
    """Answer a TF Serving REST predict body (a dict or JSON text) with `signatures` (a SavedModel's
    `.signatures` mapping); returns the JSON-ready response dict. Raises PredictError on a bad body."""
    if isinstance(body, (str, bytes)):
        try:
            body = json.loads(body)
        except json.JSONDecodeError as error:
            raise PredictError(f"body: expected valid JSON, got {error}") from None
    if not isinstance(body, dict):
        raise PredictError(f"body: expected a JSON object with 'instances' or 'inputs', "
                           f"got {type(body).__name__}")
    name = body.get("signature_name", DEFAULT_SIGNATURE)
    if name not in signatures:
        raise PredictError(f"signature_name: expected one of {sorted(signatures)}, got {name!r}")
    if ("instances" in body) == ("inputs" in body):
        raise PredictError(f"body: expected exactly one of 'instances' (row format) or 'inputs' (columnar "
                           f"format), got {sorted(k for k in ('instances', 'inputs') if k in body)}")
    signature = signatures[name]
    specs = input_specs(signature)
    row = "instances" in body
    data = body["instances"] if row else body["inputs"]
    if row:
        if not isinstance(data, list) or not data:
            raise PredictError("instances: expected a non-empty list, one entry per example, "
                               f"got {type(data).__name__} {data!r:.40}")
        if len(specs) == 1 and not (isinstance(data[0], dict) and set(data[0]) == set(specs)):
            columns = {next(iter(specs)): data}
        else:
            odd = [item for item in data if not (isinstance(item, dict) and set(item) == set(specs))]
            if odd:
                raise PredictError(f"instances: expected objects with the inputs {sorted(specs)}, "
                                   f"got {odd[0]!r:.80}")
            columns = {key: [item[key] for item in data] for key in specs}
    else:
        if len(specs) == 1 and not (isinstance(data, dict) and set(data) == set(specs)):
            columns = {next(iter(specs)): data}
        elif isinstance(data, dict) and set(data) == set(specs):
            columns = data
        else:
            raise PredictError(f"inputs: expected an object with the inputs {sorted(specs)}, "
                               f"got {data!r:.80}")
    tensors = {key: _as_tensor(value, specs[key], key) for key, value in columns.items()}
    outputs = signature(**tensors)
    if row:
        sizes = {int(t.shape[0]) for t in outputs.values() if t.shape.rank}
        if sizes != {len(data)}:
            raise PredictError("instances: expected every output batched like the instances (row format); "
                               "use 'inputs' (columnar)")
        per_output = {key: _to_json(value, key) for key, value in outputs.items()}
        if len(per_output) == 1:
            return {"predictions": next(iter(per_output.values()))}
        return {"predictions": [{key: values[i] for key, values in per_output.items()}
                                for i in range(len(data))]}
    per_output = {key: _to_json(value, key) for key, value in outputs.items()}
    return {"outputs": next(iter(per_output.values())) if len(per_output) == 1 else per_output}


# -- a REST endpoint ------------------------------------------------------------------------------------
_PREDICT = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?:predict$")


class RestServer:
    """POST /v1/models/<name>[/versions/<v>]:predict on `host`:`port` (0 = a free port), for the versions
    under `model_dir` (saved_models/<name>). Serves until `max_requests` were answered or `close()`.

      with RestServer("saved_models/fmnist", max_requests=10) as server:
          requests.post(server.url + ":predict", json={"instances": [...]})
    """

    def __init__(self, model_dir, *, host="127.0.0.1", port=0, max_requests=None):
        self.name = os.path.basename(os.path.normpath(model_dir))
        self.models = export.load_versions(model_dir)
        self.latest = max(self.models)
        self.remaining = max_requests
        self._lock = threading.Lock()
        self._http = ThreadingHTTPServer((host, port), self._handler())
        self.url = f"http://{host}:{self._http.server_address[1]}/v1/models/{self.name}"
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                match = _PREDICT.match(self.path)
                try:
                    if not match or match["name"] != server.name:
                        raise LookupError(f"no model at {self.path!r}; expected /v1/models/{server.name}"
                                          "[/versions/N]:predict")
                    version = int(match["version"] or server.latest)
                    if version not in server.models:
                        raise LookupError(f"version {version} of {server.name!r} is not loaded")
                    body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                    status, answer = 200, predict_json(server.models[version].signatures, body)
                except PredictError as error:
                    status, answer = 400, {"error": str(error)}
                except LookupError as error:
                    status, answer = 404, {"error": str(error)}
                except tf.errors.InvalidArgumentError as error:
                    status, answer = 400, {"error": error.message}
                except Exception as error:  # noqa: BLE001  (always answer; never leave a client hanging)
                    status, answer = 500, {"error": f"{type(error).__name__}: {error}"}
                payload = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                server._count()

        return Handler

    def _count(self):
        with self._lock:
            if self.remaining is not None:
                self.remaining -= 1
                if self.remaining <= 0:
                    threading.Thread(target=self._http.shutdown, daemon=True).start()

    def close(self):
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- gRPC ---------------------------------------------------------------------------------------------
def prediction_servicer(model_dir):
    """A `tensorflow_serving.apis` PredictionService servicer (Predict only) for the versions under
    `model_dir`: add it to a `grpc.server` to test gRPC clients without the model server binary."""
    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    name = os.path.basename(os.path.normpath(model_dir))
    models = export.load_versions(model_dir)

    class Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            spec = request.model_spec
            version = spec.version.value if spec.HasField("version") else max(models)
            if spec.name != name or version not in models:
                context.abort(grpc.StatusCode.NOT_FOUND, f"no model {spec.name!r} version {version}")
            signatures = models[version].signatures
            signature_name = spec.signature_name or DEFAULT_SIGNATURE
            if signature_name not in signatures:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"no signature {signature_name!r}")
            signature = signatures[signature_name]
            specs = input_specs(signature)
            if set(request.inputs) != set(specs):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"inputs {sorted(request.inputs)} do not match {sorted(specs)}")
            tensors = {key: tf.constant(tf.make_ndarray(proto), specs[key].dtype)
                       for key, proto in request.inputs.items()}
            outputs = signature(**tensors)
            response = predict_pb2.PredictResponse()
            response.model_spec.name = name
            response.model_spec.version.value = version
            response.model_spec.signature_name = signature_name
            for key, value in outputs.items():
                if not request.output_filter or key in request.output_filter:
                    response.outputs[key].CopyFrom(tf.make_tensor_proto(value.numpy()))
            return response

    return Servicer()
