"""The demo model behind the test bed: a small fixed-seed softmax classifier, and KServe v2 tensor parsing.

Pure functions, no I/O, so the HTTP server stays thin and the model can be tested on its own. The
weights come from the model's name, so every replica of a model answers identically and two models
answer differently: an end-to-end test can tell which model computed a response.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

FEATURES = 4
CLASSES = 3

# KServe v2 numeric datatypes accepted as input.
_DTYPES: dict[str, type[np.generic]] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}


class InferenceError(ValueError):
    """The request is not a valid inference request for this model (HTTP 400)."""


@dataclass(frozen=True)
class DemoModel:
    name: str
    version: str
    weights: np.ndarray  # (FEATURES, CLASSES)
    bias: np.ndarray  # (CLASSES,)

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities (batch, CLASSES) float32 and the argmax label (batch,) int64."""
        logits = batch.astype(np.float64) @ self.weights + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        probs = exp / exp.sum(axis=1, keepdims=True)
        return probs.astype(np.float32), probs.argmax(axis=1).astype(np.int64)

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": "numpy",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, FEATURES]}],
            "outputs": [
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, CLASSES]},
                {"name": "label", "datatype": "INT64", "shape": [-1]},
            ],
        }


def load_model(name: str, version: str = "1") -> DemoModel:
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    rng = np.random.default_rng(seed)
    return DemoModel(name, version, rng.normal(size=(FEATURES, CLASSES)), rng.normal(size=CLASSES))


def parse_request(body: Any) -> tuple[np.ndarray, str | None]:
    """The input batch (n, FEATURES) of a KServe v2 infer request, and its optional id."""
    if not isinstance(body, dict):
        raise InferenceError("request body must be a JSON object")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InferenceError("'inputs' must be a list with exactly one tensor")
    tensor = inputs[0]
    for key in ("name", "shape", "datatype", "data"):
        if key not in tensor:
            raise InferenceError(f"input tensor is missing {key!r}")
    shape, datatype = tensor["shape"], tensor["datatype"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InferenceError(f"input shape must be a list of non-negative integers, got {shape!r}")
    if datatype not in _DTYPES:
        raise InferenceError(f"unsupported datatype {datatype!r} (numeric KServe v2 types only)")
    if len(shape) == 1:
        shape = [1, *shape]
    if len(shape) != 2 or shape[1] != FEATURES:
        raise InferenceError(f"input shape must be [batch, {FEATURES}] or [{FEATURES}], got {tensor['shape']!r}")
    try:
        data = np.asarray(tensor["data"], dtype=_DTYPES[datatype])
    except (TypeError, ValueError) as exc:
        raise InferenceError(f"input data is not {datatype}: {exc}") from None
    if data.size != shape[0] * shape[1]:
        needed = shape[0] * shape[1]
        raise InferenceError(f"input data has {data.size} values, shape {tensor['shape']!r} needs {needed}")
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InferenceError("'id' must be a string")
    return data.reshape(shape), request_id


def build_response(model: DemoModel, batch: np.ndarray, request_id: str | None,
                   parameters: dict[str, Any]) -> dict[str, Any]:
    probs, labels = model.predict(batch)
    response: dict[str, Any] = {
        "model_name": model.name,
        "model_version": model.version,
        "parameters": parameters,
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": list(probs.shape),
             "data": [round(float(v), 6) for v in probs.ravel()]},
            {"name": "label", "datatype": "INT64", "shape": list(labels.shape), "data": labels.tolist()},
        ],
    }
    if request_id is not None:
        response["id"] = request_id
    return response
