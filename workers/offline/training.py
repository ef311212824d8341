"""Training on the Fraud Detection Handbook protocol, export to ONNX, model cards.

Protocol (Handbook, chapter 3): train on one week, skip a one-week delay period (labels
are not known yet), test on the following week. The simulated data start two months
earlier, so the 30-day windows are warm. Test transactions of customers already known to
be compromised (in the training week or, day by day, up to the delay) are removed.

Every exported model has the same interface, which the serving engine relies on: input
``features`` float32 [None, N_FEATURES], output ``fraud_probability`` float32 [None], and
metadata ``feature_names`` (JSON list), ``model_name``, ``model_version``, ``thresholds``.

Heavy libraries (lightgbm, sklearn, onnx) are imported inside functions so that
``read_model_contract`` stays cheap for the serving side.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workers.features import definitions as d
from workers.records import US_PER_DAY

log = logging.getLogger(__name__)

MODEL_NAMES = ("lgbm", "mlp")
TOP_K_CARDS = 100
# Thresholds: decline where the test week's precision reaches this; review where recall does.
DECLINE_PRECISION = 0.8
REVIEW_RECALL = 0.8
# ...unless that sends more than this share of all transactions to review (queue capacity).
REVIEW_MAX_ALERT_RATE = 0.01


@dataclass(frozen=True)
class Protocol:
    train_start: date = date(2018, 7, 25)
    train_days: int = 7
    delay_days: int = 7
    test_days: int = 7

    @classmethod
    def for_history(cls, start: date) -> Protocol:
        """The Handbook's weeks at the same distance from ``start`` as from its 2018-04-01."""
        from workers.offline.simulator import SimulatorConfig

        return cls(train_start=start + (cls.train_start - SimulatorConfig.start_date))

    def shifted(self, days: int) -> Protocol:
        return Protocol(self.train_start + timedelta(days=days), self.train_days, self.delay_days, self.test_days)

    def day_index(self, day: date) -> int:
        return (day - date(1970, 1, 1)).days

    @property
    def test_start(self) -> date:
        return self.train_start + timedelta(days=self.train_days + self.delay_days)


@dataclass(frozen=True)
class Split:
    train: np.ndarray  # row indices into the dataset
    test: np.ndarray


def handbook_split(transactions: pd.DataFrame, protocol: Protocol = Protocol()) -> Split:
    """The Handbook's ``get_train_test_set``: time-based, known-compromised cards removed from test."""
    day = transactions["event_time_us"].to_numpy() // US_PER_DAY
    first_train = protocol.day_index(protocol.train_start)
    is_fraud = transactions["is_fraud"].to_numpy().astype(bool)
    customer = transactions["customer_id"].to_numpy()
    train = np.flatnonzero((day >= first_train) & (day < first_train + protocol.train_days))
    known = set(customer[train][is_fraud[train]].tolist())
    test_parts = []
    for offset in range(protocol.test_days):
        # Frauds up to the day before (delay period included) are known by this test day.
        revealed = day == first_train + protocol.train_days + offset - 1
        known |= set(customer[revealed & is_fraud].tolist())
        today = np.flatnonzero(day == first_train + protocol.train_days + protocol.delay_days + offset)
        test_parts.append(today[~np.isin(customer[today], list(known))])
    return Split(train=train, test=np.concatenate(test_parts))


# --- metrics --------------------------------------------------------------------------


def card_precision_top_k(transactions: pd.DataFrame, scores: np.ndarray, k: int = TOP_K_CARDS) -> float:
    """Per day, the share of compromised cards among the k cards with the highest max score."""
    frame = pd.DataFrame(
        {
            "day": transactions["event_time_us"].to_numpy() // US_PER_DAY,
            "customer_id": transactions["customer_id"].to_numpy(),
            "is_fraud": transactions["is_fraud"].to_numpy(),
            "score": scores,
        }
    )
    per_card = frame.groupby(["day", "customer_id"], sort=False).max().reset_index()
    # Ties broken by customer id so the metric is deterministic.
    per_card = per_card.sort_values(["day", "score", "customer_id"], ascending=[True, False, True])
    top = per_card.groupby("day").head(k)
    return float(top.groupby("day")["is_fraud"].sum().div(k).mean())


def metrics(transactions: pd.DataFrame, scores: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = transactions["is_fraud"].to_numpy()
    return {
        "auc_roc": round(float(roc_auc_score(y, scores)), 4),
        "average_precision": round(float(average_precision_score(y, scores)), 4),
        "card_precision_at_100": round(card_precision_top_k(transactions, scores), 4),
    }


def suggest_thresholds(y: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """decline: lowest threshold with precision >= DECLINE_PRECISION;
    review: highest threshold with recall >= REVIEW_RECALL, raised if needed so that at most
    REVIEW_MAX_ALERT_RATE of transactions score above it; never above decline."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(y, scores)
    precision, recall = precision[:-1], recall[:-1]  # align with thresholds
    precise = np.flatnonzero(precision >= DECLINE_PRECISION)
    decline_i = int(precise[0]) if len(precise) else len(thresholds) - 1
    recalled = np.flatnonzero(recall >= REVIEW_RECALL)
    review_i = int(recalled[-1]) if len(recalled) else 0
    capacity_threshold = np.quantile(scores, 1 - REVIEW_MAX_ALERT_RATE)
    review_i = max(review_i, int(np.searchsorted(thresholds, capacity_threshold, side="left")))
    review_i = min(review_i, decline_i)
    return {
        "thresholds": {"review": float(thresholds[review_i]), "decline": float(thresholds[decline_i])},
        "at_review": _operating_point(y, scores, thresholds[review_i]),
        "at_decline": _operating_point(y, scores, thresholds[decline_i]),
        "policy": (
            f"decline: lowest score threshold where precision >= {DECLINE_PRECISION} on the test week; "
            f"review: highest threshold where recall >= {REVIEW_RECALL}, raised so that at most "
            f"{REVIEW_MAX_ALERT_RATE:.0%} of transactions reach it (review capacity), capped at decline"
        ),
    }


def _operating_point(y: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    flagged = scores >= threshold
    hits = int((flagged & (y == 1)).sum())
    return {
        "precision": round(hits / max(int(flagged.sum()), 1), 4),
        "recall": round(hits / max(int((y == 1).sum()), 1), 4),
        "alert_rate": round(float(flagged.mean()), 5),
    }


# --- models ---------------------------------------------------------------------------


# LightGBM's hyper-parameters. Chosen on validation weeks that end with the training week
# (``validation_protocols``, ``tune_lgbm``), never on the test week: bench/model_eval.py
# reruns the search and writes every trial to bench/results/model-*.
LGBM_PARAMS: dict[str, Any] = {
    "n_estimators": 500,
    "learning_rate": 0.01,
    "num_leaves": 15,
    "min_child_samples": 20,
    "subsample": 0.8,
    "subsample_freq": 1,
    "colsample_bytree": 0.8,
}


# Ratios the LightGBM model computes from the contract's columns before its trees (the first
# column over the second; 1.0, "as usual", when the second is not positive, as
# ``definitions.RATIO_DEFAULT``). Trees approximate a ratio of two inputs only with many
# splits; given these three, validation average precision rose from 0.687 to 0.707
# (bench/results/model-*). They live inside the model (``lgbm_to_onnx`` puts the same
# float32 Div/Where in front of the tree ensemble), so the serving contract stays
# ``FEATURE_NAMES`` and the engine is unchanged.
DERIVED_FEATURES: tuple[tuple[str, str, str], ...] = (
    ("amount_over_customer_avg_7d", "tx_amount", "customer_avg_amount_7d"),
    ("amount_over_customer_avg_1d", "tx_amount", "customer_avg_amount_1d"),
    ("customer_avg_7d_over_30d", "customer_avg_amount_7d", "customer_avg_amount_30d"),
)
DERIVED_NAMES = tuple(name for name, _, _ in DERIVED_FEATURES)


def with_derived_features(x: np.ndarray) -> np.ndarray:
    """``x`` (n, N_FEATURES) with the ``DERIVED_FEATURES`` columns appended, in float32
    exactly as the exported graph computes them (IEEE float32 division on both sides)."""
    x = np.asarray(x, dtype=np.float32)
    extra = np.empty((x.shape[0], len(DERIVED_FEATURES)), dtype=np.float32)
    for i, (_, numerator, denominator) in enumerate(DERIVED_FEATURES):
        top, bottom = x[:, d.FEATURE_INDEX[numerator]], x[:, d.FEATURE_INDEX[denominator]]
        np.divide(top, bottom, out=extra[:, i], where=bottom > 0)
        extra[bottom <= 0, i] = np.float32(d.RATIO_DEFAULT)
    return np.concatenate([x, extra], axis=1)


def train_lgbm(x: np.ndarray, y: np.ndarray, seed: int, params: dict[str, Any] | None = None, derived: bool = True):
    """LightGBM on ``x``; with ``derived`` a pipeline that appends ``DERIVED_FEATURES`` first
    (what is exported); without, a bare classifier on the columns given (for ablations)."""
    import lightgbm as lgb
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    model = lgb.LGBMClassifier(
        **(LGBM_PARAMS | (params or {})),
        random_state=seed,
        deterministic=True,
        force_row_wise=True,
        n_jobs=2,
        verbose=-1,
    )
    if not derived:
        return model.fit(x, y)
    return make_pipeline(FunctionTransformer(with_derived_features), model).fit(x, y)


def train_mlp(x: np.ndarray, y: np.ndarray, seed: int):
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    mlp = MLPClassifier(
        hidden_layer_sizes=(64, 32),
        activation="relu",
        alpha=1e-4,
        batch_size=256,
        learning_rate_init=1e-3,
        max_iter=40,
        early_stopping=True,
        validation_fraction=0.1,
        n_iter_no_change=6,
        random_state=seed,
    )
    return make_pipeline(StandardScaler(), mlp).fit(x.astype(np.float64), y)


def native_scores(model, x: np.ndarray) -> np.ndarray:
    return model.predict_proba(x)[:, 1]


def train_model(
    name: str, x: np.ndarray, y: np.ndarray, seed: int, params: dict[str, Any] | None = None, derived: bool = True
):
    if name == "lgbm":
        return train_lgbm(x, y, seed, params, derived)
    if name == "mlp":
        return train_mlp(x, y, seed)
    raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")


# --- model selection without the test week ---------------------------------------------


def validation_protocols(protocol: Protocol, folds: int = 3) -> list[Protocol]:
    """The Handbook's validation (its chapter 5): the same train / delay / test layout moved
    back so that each validation week ends on or before the last training day, one week
    apart. Nothing from the delay or test weeks is seen (labels of the training week are)."""
    back = protocol.delay_days + protocol.test_days
    return [protocol.shifted(-back - 7 * k) for k in range(folds)]


def validation_metrics(
    data: Dataset,
    protocol: Protocol,
    name: str,
    seed: int,
    params: dict[str, Any] | None = None,
    folds: int = 3,
    derived: bool = True,
) -> dict[str, Any]:
    """Test metrics on each validation fold and their mean."""
    per_fold = []
    y = data.transactions["is_fraud"].to_numpy()
    for fold in validation_protocols(protocol, folds):
        split = handbook_split(data.transactions, fold)
        model = train_model(name, data.matrix[split.train], y[split.train], seed, params, derived)
        per_fold.append(metrics(data.transactions.iloc[split.test], native_scores(model, data.matrix[split.test])))
    mean = {k: round(float(np.mean([m[k] for m in per_fold])), 4) for k in per_fold[0]}
    return {"folds": per_fold, "mean": mean}


def tune_lgbm(
    data: Dataset, protocol: Protocol, grid: list[dict[str, Any]], seed: int, folds: int = 3, derived: bool = True
) -> list[dict[str, Any]]:
    """Every candidate's validation metrics, best first (mean average precision, then mean
    card precision@100). Candidates override ``LGBM_PARAMS``."""
    trials = []
    for params in grid:
        started = time.perf_counter()
        result = validation_metrics(data, protocol, "lgbm", seed, params, folds, derived)
        trials.append(
            {"params": params, "derived": derived, **result, "seconds": round(time.perf_counter() - started, 1)}
        )
    return sorted(trials, key=lambda t: (-t["mean"]["average_precision"], -t["mean"]["card_precision_at_100"]))


# --- card testing (scenario 4) ----------------------------------------------------------


def burst_recall(
    test_frame: pd.DataFrame, scores: np.ndarray, thresholds: dict[str, float], scenario: int = 4
) -> dict[str, Any]:
    """How much of the test week's card-testing bursts a model stops at its thresholds.

    Per threshold: recall over the burst transactions, the share of bursts with at least one
    transaction at or above it, and the median 1-based position in its burst of the first
    such transaction (how many purchases the fraudster gets before the card is stopped)."""
    in_burst = test_frame["fraud_scenario"].to_numpy() == scenario
    frame = pd.DataFrame(
        {
            "burst": test_frame["customer_id"].to_numpy()[in_burst] * 100_000
            + test_frame["event_time_us"].to_numpy()[in_burst] // US_PER_DAY,
            "score": scores[in_burst],
        }
    )
    frame["position"] = frame.groupby("burst").cumcount() + 1
    report: dict[str, Any] = {
        "burst_transactions": int(in_burst.sum()),
        "bursts": int(frame["burst"].nunique()),
    }
    for level, threshold in thresholds.items():
        hit = frame[frame["score"] >= threshold]
        first = hit.groupby("burst")["position"].min()
        report[level] = {
            "threshold": round(float(threshold), 6),
            "recall": round(float((frame["score"] >= threshold).mean()) if len(frame) else 0.0, 4),
            "bursts_caught": round(len(first) / max(report["bursts"], 1), 4),
            "median_first_position": float(first.median()) if len(first) else None,
        }
    return report


def burst_evaluation(
    data: Dataset, name: str, seed: int, drop: tuple[str, ...] = (), params: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Trains ``name`` on the split's training week without the ``drop`` features (an
    ablation; LightGBM keeps its ``DERIVED_FEATURES``, which use none of the velocity ones),
    picks its thresholds on the test week as the exported models do, and reports its metrics
    and its recall on the test week's bursts."""
    y = data.transactions["is_fraud"].to_numpy()
    matrix, names = data.matrix, list(d.FEATURE_NAMES)
    if name == "lgbm":
        matrix, names = with_derived_features(matrix), names + list(DERIVED_NAMES)
    keep = [i for i, n in enumerate(names) if n not in drop]
    x_train, x_test = matrix[data.split.train][:, keep], matrix[data.split.test][:, keep]
    if name == "lgbm":
        model = train_lgbm(x_train, y[data.split.train], seed, params, derived=False)
    else:
        model = train_model(name, x_train, y[data.split.train], seed)
    scores = native_scores(model, x_test)
    test_frame = data.transactions.iloc[data.split.test]
    threshold_info = suggest_thresholds(y[data.split.test], scores)
    return {
        "model": name,
        "dropped": list(drop),
        "n_inputs": len(keep),
        "metrics": metrics(test_frame, scores),
        "thresholds": threshold_info["thresholds"],
        "bursts": burst_recall(test_frame, scores, threshold_info["thresholds"]),
    }


# --- ONNX export ----------------------------------------------------------------------


def lgbm_to_onnx(pipeline):
    """onnxmltools' conversion, reduced to one output: P(fraud) as ``fraud_probability``,
    behind the ``DERIVED_FEATURES`` computed from the ``features`` input."""
    import onnx
    import onnxmltools
    from onnx import TensorProto, helper
    from onnxmltools.convert.common.data_types import FloatTensorType

    model = pipeline.steps[-1][1]
    width = d.N_FEATURES + len(DERIVED_FEATURES)
    converted = onnxmltools.convert_lightgbm(
        model,
        initial_types=[(_TREE_INPUT, FloatTensorType([None, width]))],
        zipmap=False,
        target_opset=15,
    )
    _round_thresholds_down(converted, model.booster_)
    graph = converted.graph
    graph.name = "fraud_lgbm"  # the converter names it with a random uuid; keep exports reproducible
    _prepend_derived_features(graph, helper, TensorProto)
    probabilities = next(o.name for o in graph.output if o.name == "probabilities")
    graph.initializer.append(helper.make_tensor("fraud_column", TensorProto.INT64, [], [1]))
    graph.node.append(helper.make_node("Gather", [probabilities, "fraud_column"], [d.MODEL_OUTPUT_NAME], axis=1))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(d.MODEL_OUTPUT_NAME, TensorProto.FLOAT, [None]))
    # Drop the label branch: nothing reads it, and its declared shape makes ORT warn per batch.
    return _prune_unused(converted, onnx)


_TREE_INPUT = "features_with_derived"


def _prepend_derived_features(graph, helper, tensor_proto) -> None:
    """``features`` -> Concat(features, Where(den > 0, num / den, 1) per ratio) -> the trees."""
    nodes = []
    graph.initializer.extend(
        [
            helper.make_tensor("derived_zero", tensor_proto.FLOAT, [], [0.0]),
            helper.make_tensor("derived_default", tensor_proto.FLOAT, [], [d.RATIO_DEFAULT]),
        ]
    )
    ratios = []
    for name, numerator, denominator in DERIVED_FEATURES:
        for role, column in (("num", numerator), ("den", denominator)):
            graph.initializer.append(
                helper.make_tensor(f"{name}_{role}_index", tensor_proto.INT64, [1], [d.FEATURE_INDEX[column]])
            )
            nodes.append(
                helper.make_node("Gather", [d.MODEL_INPUT_NAME, f"{name}_{role}_index"], [f"{name}_{role}"], axis=1)
            )
        nodes += [
            helper.make_node("Div", [f"{name}_num", f"{name}_den"], [f"{name}_div"]),
            helper.make_node("Greater", [f"{name}_den", "derived_zero"], [f"{name}_defined"]),
            helper.make_node("Where", [f"{name}_defined", f"{name}_div", "derived_default"], [name]),
        ]
        ratios.append(name)
    nodes.append(helper.make_node("Concat", [d.MODEL_INPUT_NAME, *ratios], [_TREE_INPUT], axis=1))
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + existing)
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info(d.MODEL_INPUT_NAME, tensor_proto.FLOAT, [None, d.N_FEATURES]))


def _round_thresholds_down(onnx_model, booster) -> None:
    """LightGBM splits on ``x <= t`` with a double ``t``; the ONNX tree stores ``t`` rounded to
    the *nearest* float32, which flips the branch for an input exactly equal to a value rounded
    up. Storing the largest float32 <= t keeps every float32 input on LightGBM's side."""
    originals: list[dict[float, float]] = []
    for tree in booster.dump_model()["tree_info"]:
        per_tree: dict[float, float] = {}
        stack = [tree["tree_structure"]]
        while stack:
            node = stack.pop()
            if "threshold" in node:
                per_tree[float(np.float32(node["threshold"]))] = float(node["threshold"])
                stack += [node["left_child"], node["right_child"]]
        originals.append(per_tree)
    tree_node = next(n for n in onnx_model.graph.node if n.op_type.startswith("TreeEnsemble"))
    attrs = {a.name: a for a in tree_node.attribute}
    values, trees, modes = attrs["nodes_values"].floats, attrs["nodes_treeids"].ints, attrs["nodes_modes"].strings
    for i, (value, tree_id, mode) in enumerate(zip(list(values), trees, modes)):
        if mode != b"BRANCH_LEQ":
            continue
        exact = originals[tree_id][float(np.float32(value))]
        down = np.float32(exact)
        if float(down) > exact:
            down = np.nextafter(down, np.float32(-np.inf))
        values[i] = float(down)


def _prune_unused(model, onnx):
    needed = {o.name for o in model.graph.output}
    kept = []
    for node in reversed(model.graph.node):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(node.input)
    del model.graph.node[:]
    model.graph.node.extend(reversed(kept))
    initializers = [i for i in model.graph.initializer if i.name in needed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(initializers)
    onnx.checker.check_model(model)
    return model


def mlp_to_onnx(pipeline):
    """The MLP as Gemm/Relu/Sigmoid only (default ONNX domain, GPU-clean); the scaler is
    folded into the first layer: ((x - mean) / scale) @ W + b = x @ (W / scale) + (b - (mean / scale) @ W)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    scaler, mlp = pipeline.steps[0][1], pipeline.steps[-1][1]
    if mlp.activation != "relu" or mlp.out_activation_ != "logistic":
        raise ValueError("only a relu MLP with a logistic output is exported")
    weights = [w.astype(np.float64) for w in mlp.coefs_]
    biases = [b.astype(np.float64) for b in mlp.intercepts_]
    biases[0] = biases[0] - (scaler.mean_ / scaler.scale_) @ weights[0]
    weights[0] = weights[0] / scaler.scale_[:, None]

    nodes, initializers, current = [], [], d.MODEL_INPUT_NAME
    for i, (w, b) in enumerate(zip(weights, biases)):
        initializers += [
            numpy_helper.from_array(w.astype(np.float32), f"W{i}"),
            numpy_helper.from_array(b.astype(np.float32), f"B{i}"),
        ]
        nodes.append(helper.make_node("Gemm", [current, f"W{i}", f"B{i}"], [f"gemm{i}"]))
        last = i == len(weights) - 1
        nodes.append(helper.make_node("Sigmoid" if last else "Relu", [f"gemm{i}"], [f"act{i}"]))
        current = f"act{i}"
    initializers.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat_shape"))
    nodes.append(helper.make_node("Reshape", [current, "flat_shape"], [d.MODEL_OUTPUT_NAME]))
    graph = helper.make_graph(
        nodes,
        "fraud_mlp",
        [helper.make_tensor_value_info(d.MODEL_INPUT_NAME, TensorProto.FLOAT, [None, d.N_FEATURES])],
        [helper.make_tensor_value_info(d.MODEL_OUTPUT_NAME, TensorProto.FLOAT, [None])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="fraudscore")
    model.ir_version = 8  # readable by older ONNX Runtime / TensorRT builds as well
    onnx.checker.check_model(model)
    return model


def set_metadata(model, name: str, version: int, thresholds: dict[str, float]):
    entries = {
        d.MODEL_METADATA_KEY: json.dumps(list(d.FEATURE_NAMES)),
        "model_name": name,
        "model_version": str(version),
        "thresholds": json.dumps(thresholds),
    }
    del model.metadata_props[:]
    for key, value in entries.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    return model


def onnx_scores(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    return session.run([d.MODEL_OUTPUT_NAME], {d.MODEL_INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})[
        0
    ].reshape(-1)


# --- model contract (cheap: onnxruntime only) -----------------------------------------


@dataclass(frozen=True)
class ModelContract:
    feature_names: tuple[str, ...]
    model_name: str
    model_version: str
    metadata: dict[str, str] = field(default_factory=dict)


def read_model_contract(path: Path | str) -> ModelContract:
    """The feature names and identity a model file declares in its metadata."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    try:
        names = tuple(json.loads(metadata.get(d.MODEL_METADATA_KEY, "[]")))
    except json.JSONDecodeError:
        names = ()
    return ModelContract(names, metadata.get("model_name", ""), metadata.get("model_version", ""), metadata)


def check_model_file(path: Path | str) -> ModelContract:
    """Raises ``FeatureContractError`` unless the model expects exactly ``FEATURE_NAMES``."""
    contract = read_model_contract(path)
    d.check_contract(contract.feature_names)
    return contract


# --- the whole run --------------------------------------------------------------------


@dataclass
class TrainConfig:
    seed: int = 0
    version: int = 2
    models: tuple[str, ...] = MODEL_NAMES
    out_dir: Path = Path("models")
    protocol: Protocol = field(default_factory=Protocol)
    card_testing: bool = False  # the data had scenario 4 (recorded in the card and its regenerate command)


@dataclass
class Dataset:
    transactions: pd.DataFrame
    matrix: np.ndarray
    split: Split
    timings_s: dict[str, float]


def build_dataset(transactions: pd.DataFrame, protocol: Protocol, timings: dict[str, float]) -> Dataset:
    from workers.features.offline import transaction_features

    started = time.perf_counter()
    matrix = transaction_features(transactions).matrix
    timings["features_s"] = round(time.perf_counter() - started, 2)
    return Dataset(transactions, matrix, handbook_split(transactions, protocol), timings)


def train_and_export(dataset: Dataset, config: TrainConfig) -> list[dict[str, Any]]:
    cards = []
    for name in config.models:
        cards.append(_train_one(name, dataset, config))
    return cards


def _train_one(name: str, data: Dataset, config: TrainConfig) -> dict[str, Any]:
    train_rows, test_rows = data.split.train, data.split.test
    x_train, x_test = data.matrix[train_rows], data.matrix[test_rows]
    y_train = data.transactions["is_fraud"].to_numpy()[train_rows]
    test_frame = data.transactions.iloc[test_rows]

    started = time.perf_counter()
    model = train_model(name, x_train, y_train, config.seed)
    train_s = time.perf_counter() - started
    native = native_scores(model, x_test)
    threshold_info = suggest_thresholds(test_frame["is_fraud"].to_numpy(), native)

    onnx_model = lgbm_to_onnx(model) if name == "lgbm" else mlp_to_onnx(model)
    set_metadata(onnx_model, name, config.version, threshold_info["thresholds"])
    model_bytes = onnx_model.SerializeToString()
    exported = onnx_scores(model_bytes, x_test)

    config.out_dir.mkdir(parents=True, exist_ok=True)
    path = config.out_dir / f"{name}-v{config.version}.onnx"
    path.write_bytes(model_bytes)
    card = _card(name, config, data, model, native, exported, threshold_info, path, train_s)
    _write_card(card, path)
    log.info("%s: %s -> %s", name, card["metrics"], path)
    return card


def _card(name, config, data, model, native, exported, threshold_info, path, train_s) -> dict[str, Any]:
    protocol = config.protocol
    times = data.transactions["event_time_us"]
    train_frame = data.transactions.iloc[data.split.train]
    test_frame = data.transactions.iloc[data.split.test]
    return {
        "model_name": name,
        "model_version": config.version,
        "file": path.name,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "size_bytes": path.stat().st_size,
        "interface": {
            "input": f"{d.MODEL_INPUT_NAME} float32 [None, {d.N_FEATURES}]",
            "output": f"{d.MODEL_OUTPUT_NAME} float32 [None]",
        },
        "gpu_clean": name == "mlp",
        "data_window": {
            "dataset": [_date_of(times.min()), _date_of(times.max())],
            "train": [str(protocol.train_start), str(protocol.train_start + timedelta(days=protocol.train_days - 1))],
            "delay_days": protocol.delay_days,
            "test": [str(protocol.test_start), str(protocol.test_start + timedelta(days=protocol.test_days - 1))],
        },
        "features": list(d.FEATURE_NAMES),
        "derived_features": ([f"{n} = {a} / {b}" for n, a, b in DERIVED_FEATURES] if name == "lgbm" else []),
        "metrics": metrics(test_frame, native),
        "metrics_onnx": metrics(test_frame, exported),
        **threshold_info,
        "onnx_max_abs_diff": float(np.max(np.abs(exported.astype(np.float64) - native))),
        "training_rows": len(train_frame),
        "training_frauds": int(train_frame["is_fraud"].sum()),
        "test_rows": len(test_frame),
        "test_frauds": int(test_frame["is_fraud"].sum()),
        "seed": config.seed,
        "card_testing": config.card_testing,
        "hyperparameters": _hyperparameters(model),
        "train_seconds": round(train_s, 2),
        "library_versions": _library_versions(),
        "regenerate": f"fraudscore train --seed {config.seed} --version {config.version}"
        + (" --card-testing" if config.card_testing else ""),
    }


def _date_of(us: int) -> str:
    return str(datetime.fromtimestamp(us / 1e6, tz=UTC).date())


def _hyperparameters(model) -> dict[str, Any]:
    estimator = model.steps[-1][1] if hasattr(model, "steps") else model
    keep = (int, float, str, bool, tuple, type(None))
    return {k: v for k, v in estimator.get_params().items() if isinstance(v, keep)}


def _library_versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ("numpy", "pandas", "scikit-learn", "lightgbm", "onnx", "onnxmltools", "onnxruntime")
    return {n: version(n) for n in names}


def _write_card(card: dict[str, Any], model_path: Path) -> None:
    model_path.with_suffix(".card.json").write_text(json.dumps(card, indent=2, default=str) + "\n")
    model_path.with_suffix(".card.md").write_text(_card_markdown(card))


def _card_markdown(card: dict[str, Any]) -> str:
    m, w, t = card["metrics"], card["data_window"], card["thresholds"]
    return f"""# {card["model_name"]} v{card["model_version"]}

`{card["file"]}` ({card["size_bytes"] / 1e6:.2f} MB), input `{card["interface"]["input"]}`, output
`{card["interface"]["output"]}`. GPU-clean (default ONNX domain only): {card["gpu_clean"]}.

- Data: simulated transactions {w["dataset"][0]} .. {w["dataset"][1]} (seed {card["seed"]}, card-testing
  scenario {"on" if card["card_testing"] else "off"});
  train {w["train"][0]} .. {w["train"][1]} ({card["training_rows"]} rows, {card["training_frauds"]} frauds),
  {w["delay_days"]}-day delay, test {w["test"][0]} .. {w["test"][1]} ({card["test_rows"]} rows, known-compromised cards removed).
- Test metrics: AUC ROC {m["auc_roc"]}, average precision {m["average_precision"]},
  card precision@100 {m["card_precision_at_100"]}.
- Thresholds: review >= {t["review"]:.4f} (precision {card["at_review"]["precision"]}, recall {card["at_review"]["recall"]},
  {card["at_review"]["alert_rate"]:.2%} of transactions), decline >= {t["decline"]:.4f} (precision
  {card["at_decline"]["precision"]}, recall {card["at_decline"]["recall"]}, {card["at_decline"]["alert_rate"]:.2%} of transactions).
  Policy: {card["policy"]}.
- ONNX vs native max |score difference| on the test week: {card["onnx_max_abs_diff"]:.2e}.
- Features ({len(card["features"])}, in order): {", ".join(card["features"])}.
- Computed inside the model from them: {", ".join(card["derived_features"]) or "none"}.
- Regenerate: `{card["regenerate"]}`.
"""
