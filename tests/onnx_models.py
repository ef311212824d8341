"""Tiny real ONNX models for the engine tests: logistic regression on the serving features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from workers.features.definitions import FEATURE_INDEX, FEATURE_NAMES, MODEL_METADATA_KEY, N_FEATURES

# Score = sigmoid(0.02 * amount - 4): 100 -> 0.12, 250 -> 0.73, 400 -> 0.98.
AMOUNT_WEIGHT = 0.02
BIAS = -4.0
DEFAULT_THRESHOLDS = {"review": 0.5, "decline": 0.9}


def expected_score(amount: float) -> float:
    return float(1.0 / (1.0 + np.exp(-(AMOUNT_WEIGHT * amount + BIAS))))


def logistic_model(
    name: str = "mlp",
    version: int = 1,
    feature_names: tuple[str, ...] | list[str] = FEATURE_NAMES,
    bias: float = BIAS,
    sigmoid: bool = True,
    flat_output: bool = False,
) -> onnx.ModelProto:
    """Gemm + Sigmoid over the features; only ``tx_amount`` carries weight."""
    weights = np.zeros((N_FEATURES, 1), dtype=np.float32)
    weights[FEATURE_INDEX["tx_amount"], 0] = AMOUNT_WEIGHT
    initializers = [
        numpy_helper.from_array(weights, "W"),
        numpy_helper.from_array(np.array([bias], dtype=np.float32), "B"),
    ]
    nodes = [helper.make_node("Gemm", ["features", "W", "B"], ["logit"])]
    last = "logit"
    if sigmoid:
        nodes.append(helper.make_node("Sigmoid", [last], ["prob"]))
        last = "prob"
    out_shape: list = [None] if flat_output else [None, 1]
    if flat_output:
        initializers.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat_shape"))
        nodes.append(helper.make_node("Reshape", [last, "flat_shape"], ["fraud_probability"]))
    else:
        nodes.append(helper.make_node("Identity", [last], ["fraud_probability"]))
    graph = helper.make_graph(
        nodes,
        "logistic",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, N_FEATURES])],
        [helper.make_tensor_value_info("fraud_probability", TensorProto.FLOAT, out_shape)],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    helper.set_model_props(
        model,
        {
            MODEL_METADATA_KEY: json.dumps(list(feature_names)),
            "model_name": name,
            "model_version": str(version),
        },
    )
    onnx.checker.check_model(model)
    return model


def write_model(
    directory: Path,
    name: str = "mlp",
    version: int = 1,
    thresholds: dict | None = None,
    **model_kwargs,
) -> Path:
    """Writes ``<name>-v<version>.onnx`` and its card; returns the model path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-v{version}.onnx"
    model = logistic_model(name, version, **model_kwargs)
    card = {"thresholds": thresholds or DEFAULT_THRESHOLDS, "model_name": name, "model_version": version}
    (directory / f"{name}-v{version}.card.json").write_text(json.dumps(card))
    # Written under a temporary name and renamed, as a trainer should: never half a file.
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(model.SerializeToString())
    tmp.replace(path)
    return path
