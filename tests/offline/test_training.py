"""Training and ONNX export: scores match the native models, the MLP graph is GPU-clean,
the interface and metadata are what the engine expects, and a reordered model is refused."""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest

from workers.features import definitions as d
from workers.offline import training
from workers.offline.simulator import SimulatorConfig, simulate_transactions
from workers.records import US_PER_DAY
from workers.settings import REPO_ROOT

REPO_MODELS = REPO_ROOT / "models"
# A shorter history than the Handbook's, with the protocol moved to fit it (still 30 warm days).
SMALL = SimulatorConfig(n_customers=800, n_terminals=1600, n_days=65, seed=11)
PROTOCOL = training.Protocol(train_start=date(2018, 5, 10))


@pytest.fixture(scope="module")
def dataset() -> training.Dataset:
    return training.build_dataset(simulate_transactions(SMALL), PROTOCOL, {})


@pytest.fixture(scope="module")
def trained(dataset: training.Dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models")
    training.train_and_export(dataset, training.TrainConfig(seed=3, version=2, out_dir=out, protocol=PROTOCOL))
    return out


def test_split_follows_the_handbook_protocol(dataset: training.Dataset) -> None:
    days = dataset.transactions["event_time_us"].to_numpy() // US_PER_DAY
    first = PROTOCOL.day_index(PROTOCOL.train_start)
    assert days[dataset.split.train].min() == first and days[dataset.split.train].max() == first + 6
    assert days[dataset.split.test].min() == first + 14 and days[dataset.split.test].max() == first + 20
    train_fraudsters = set(
        dataset.transactions["customer_id"].to_numpy()[dataset.split.train][
            dataset.transactions["is_fraud"].to_numpy()[dataset.split.train] == 1
        ]
    )
    assert train_fraudsters.isdisjoint(dataset.transactions["customer_id"].to_numpy()[dataset.split.test])


@pytest.mark.parametrize("name", training.MODEL_NAMES)
def test_onnx_scores_equal_native_scores(name: str, dataset: training.Dataset, trained: Path) -> None:
    x_train = dataset.matrix[dataset.split.train]
    y_train = dataset.transactions["is_fraud"].to_numpy()[dataset.split.train]
    native_model = (
        training.train_lgbm(x_train, y_train, 3) if name == "lgbm" else training.train_mlp(x_train, y_train, 3)
    )
    held_out = dataset.matrix[dataset.split.test]
    native = training.native_scores(native_model, held_out)
    session = ort.InferenceSession(str(trained / f"{name}-v2.onnx"), providers=["CPUExecutionProvider"])
    exported = session.run(["fraud_probability"], {"features": held_out})[0]
    assert exported.shape == (len(held_out),) and exported.dtype == np.float32
    assert np.max(np.abs(exported.astype(np.float64) - native)) <= 1e-5
    assert native.std() > 0.01  # a constant model would match trivially


def test_mlp_graph_uses_only_default_domain_operators(trained: Path) -> None:
    model = onnx.load(trained / "mlp-v2.onnx")
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert {node.op_type for node in model.graph.node} <= {"Gemm", "Relu", "Sigmoid", "Reshape"}


@pytest.mark.parametrize("name", training.MODEL_NAMES)
def test_interface_and_metadata(name: str, trained: Path) -> None:
    path = trained / f"{name}-v2.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    (out,) = session.get_outputs()
    assert (inp.name, inp.type, inp.shape[1]) == ("features", "tensor(float)", d.N_FEATURES)
    assert (out.name, out.type, len(out.shape)) == ("fraud_probability", "tensor(float)", 1)
    contract = training.check_model_file(path)
    assert contract.feature_names == d.FEATURE_NAMES
    assert (contract.model_name, contract.model_version) == (name, "2")
    card = json.loads(path.with_suffix(".card.json").read_text())
    assert 0 < card["thresholds"]["review"] <= card["thresholds"]["decline"] < 1
    assert set(card["metrics"]) == {"auc_roc", "average_precision", "card_precision_at_100"}
    assert card["metrics"]["auc_roc"] > 0.7
    assert path.with_suffix(".card.md").read_text().startswith(f"# {name} v2")


def _with_feature_names(source: Path, target: Path, names: list[str] | None) -> Path:
    model = onnx.load(source)
    kept = [p for p in model.metadata_props if p.key != d.MODEL_METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    if names is not None:
        model.metadata_props.add(key=d.MODEL_METADATA_KEY, value=json.dumps(names))
    onnx.save(model, target)
    return target


def test_model_with_another_feature_order_is_refused(trained: Path, tmp_path: Path) -> None:
    names = list(d.FEATURE_NAMES)
    names[0], names[1] = names[1], names[0]
    path = _with_feature_names(trained / "mlp-v2.onnx", tmp_path / "mlp-v3.onnx", names)
    with pytest.raises(d.FeatureContractError, match="same names, other order"):
        training.check_model_file(path)


def test_model_without_feature_metadata_is_refused(trained: Path, tmp_path: Path) -> None:
    path = _with_feature_names(trained / "lgbm-v2.onnx", tmp_path / "lgbm-v3.onnx", None)
    with pytest.raises(d.FeatureContractError, match="missing"):
        training.check_model_file(path)


def test_lgbm_export_is_deterministic(dataset: training.Dataset, trained: Path, tmp_path: Path) -> None:
    training.train_and_export(
        dataset, training.TrainConfig(seed=3, version=2, models=("lgbm",), out_dir=tmp_path, protocol=PROTOCOL)
    )
    assert (tmp_path / "lgbm-v2.onnx").read_bytes() == (trained / "lgbm-v2.onnx").read_bytes()


def test_card_precision_counts_cards_per_day() -> None:
    frame = pd.DataFrame(
        {
            "event_time_us": [0, 0, 0, US_PER_DAY],
            "customer_id": [1, 1, 2, 1],
            "is_fraud": [0, 1, 0, 0],
        }
    )
    # Day 0: card 1 (max score 0.9, compromised) ranks first; day 1: card 1 not compromised.
    assert training.card_precision_top_k(frame, np.array([0.9, 0.1, 0.5, 0.7]), k=1) == 0.5


@pytest.mark.parametrize("name", training.MODEL_NAMES)
def test_committed_models_honour_the_contract(name: str) -> None:
    paths = sorted(REPO_MODELS.glob(f"{name}-v*.onnx"))
    assert paths, f"no {name} model in {REPO_MODELS}: run `fraudscore train`"
    for path in paths:
        assert training.check_model_file(path).model_name == name
        assert path.stat().st_size < 5_000_000


def test_derived_features_are_ratios_with_the_usual_default() -> None:
    x = np.zeros((3, d.N_FEATURES), dtype=np.float32)
    x[:, d.FEATURE_INDEX["tx_amount"]] = [50.0, 30.0, 7.0]
    x[:, d.FEATURE_INDEX["customer_avg_amount_7d"]] = [25.0, 0.0, 3.0]
    x[:, d.FEATURE_INDEX["customer_avg_amount_30d"]] = [10.0, 10.0, 0.0]
    out = training.with_derived_features(x)
    assert out.shape == (3, d.N_FEATURES + len(training.DERIVED_FEATURES)) and out.dtype == np.float32
    derived = dict(zip(training.DERIVED_NAMES, out[:, d.N_FEATURES :].T))
    assert derived["amount_over_customer_avg_7d"].tolist() == [2.0, 1.0, np.float32(7.0) / np.float32(3.0)]
    assert derived["amount_over_customer_avg_1d"].tolist() == [1.0, 1.0, 1.0]  # no purchase in the last day
    assert derived["customer_avg_7d_over_30d"].tolist() == [2.5, 0.0, 1.0]


def test_exported_lgbm_computes_the_derived_features_itself(trained: Path) -> None:
    model = onnx.load(trained / "lgbm-v2.onnx")
    assert [i.name for i in model.graph.input] == [d.MODEL_INPUT_NAME]
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("Div") == len(training.DERIVED_FEATURES) and "Concat" in ops


def test_validation_weeks_end_before_the_delay() -> None:
    protocol = training.Protocol()
    last_train_day = protocol.train_start + (protocol.train_days - 1) * timedelta(days=1)
    folds = training.validation_protocols(protocol, folds=3)
    assert len({f.test_start for f in folds}) == 3
    for fold in folds:
        assert fold.test_start + (fold.test_days - 1) * timedelta(days=1) <= last_train_day
    assert folds[0].test_start == protocol.train_start  # the closest fold validates on the training week


def test_burst_recall_counts_bursts_and_first_positions() -> None:
    day = US_PER_DAY * 17_000
    frame = pd.DataFrame(
        {
            "customer_id": [1, 1, 1, 2, 2, 3],
            "event_time_us": [day, day + 1, day + 2, day, day + 5, day],
            "fraud_scenario": [4, 4, 4, 4, 4, 0],
        }
    )
    scores = np.array([0.1, 0.6, 0.95, 0.2, 0.3, 0.99])
    report = training.burst_recall(frame, scores, {"review": 0.5, "decline": 0.9})
    assert (report["bursts"], report["burst_transactions"]) == (2, 5)
    assert report["review"]["recall"] == 0.4 and report["review"]["bursts_caught"] == 0.5
    assert report["review"]["median_first_position"] == 2.0
    assert report["decline"]["recall"] == 0.2 and report["decline"]["median_first_position"] == 3.0
