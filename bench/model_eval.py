"""The models on the Handbook protocol and on card-testing bursts (issue 11), in one run.

1. Handbook dataset (seed 0, burst scenario off): LightGBM candidates scored on the
   validation weeks that end with the training week (``training.validation_protocols``; the
   test week is never used to choose), then the chosen ``LGBM_PARAMS`` and the MLP on the
   test week.
2. The same history with scenario 4 (card testing) on: each model trained on the training
   week with every feature and without the velocity ones (the ablation), thresholds picked
   on the test week as the exported models' are, and its recall on the test week's burst
   transactions at review and decline; plus the committed models (trained with the scenario
   off) scored through ONNX at their cards' thresholds.

    python bench/model_eval.py            # ~3-5 min on 2 cores
    python bench/model_eval.py --short    # fewer candidates

Prints a summary and writes bench/results/model-<stamp>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from workers.features import definitions as d
from workers.offline import training
from workers.offline.simulator import SimulatorConfig, simulate_transactions

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MODELS = ROOT / "models"

# Overrides of training.LGBM_PARAMS; the first is the v1 models' setting.
GRID: list[dict[str, Any]] = [
    {"n_estimators": 300, "learning_rate": 0.05},
    {},  # LGBM_PARAMS as committed
    {"num_leaves": 7, "min_child_samples": 50},
    {"num_leaves": 31, "min_child_samples": 100},
    {"n_estimators": 600, "learning_rate": 0.025},
    {"colsample_bytree": 1.0},
    {"scale_pos_weight": 3.0},
]
SHORT_GRID = GRID[:2]


def dataset(card_testing: bool) -> training.Dataset:
    timings: dict[str, float] = {}
    transactions = simulate_transactions(SimulatorConfig(card_testing=card_testing))
    return training.build_dataset(transactions, training.Protocol(), timings)


def handbook(grid: list[dict[str, Any]]) -> dict[str, Any]:
    data = dataset(card_testing=False)
    protocol = training.Protocol()
    trials = training.tune_lgbm(data, protocol, grid, seed=0)
    trials += training.tune_lgbm(data, protocol, [{}], seed=0, derived=False)
    y = data.transactions["is_fraud"].to_numpy()
    test_frame = data.transactions.iloc[data.split.test]
    test = {}
    for name in training.MODEL_NAMES:
        started = time.perf_counter()
        model = training.train_model(name, data.matrix[data.split.train], y[data.split.train], seed=0)
        seconds = round(time.perf_counter() - started, 1)
        scores = training.native_scores(model, data.matrix[data.split.test])
        test[name] = {"metrics": training.metrics(test_frame, scores), "train_seconds": seconds}
    return {"validation_trials": trials, "test": test, "lgbm_params": training.LGBM_PARAMS}


def bursts() -> dict[str, Any]:
    data = dataset(card_testing=True)
    velocity = d.CUSTOMER_VELOCITY_FEATURES
    runs = [
        training.burst_evaluation(data, name, seed=0, drop=drop)
        for name in training.MODEL_NAMES
        for drop in ((), velocity)
    ]
    test_frame = data.transactions.iloc[data.split.test]
    committed = []
    for name in training.MODEL_NAMES:
        path = max(MODELS.glob(f"{name}-v*.onnx"), key=lambda p: int(p.stem.split("-v")[-1]))
        card = json.loads(path.with_suffix(".card.json").read_text())
        scores = training.onnx_scores(path.read_bytes(), data.matrix[data.split.test]).astype(np.float64)
        committed.append(
            {
                "model": path.stem,
                "trained_with_card_testing": card.get("card_testing", False),
                "metrics": training.metrics(test_frame, scores),
                "thresholds": card["thresholds"],
                "bursts": training.burst_recall(test_frame, scores, card["thresholds"]),
            }
        )
    return {"velocity_features": list(velocity), "trained_on_bursts": runs, "committed_models": committed}


def markdown(result: dict[str, Any]) -> str:
    hb, bu = result["handbook"], result["bursts"]
    lines = [
        f"# Models: Handbook protocol and card-testing bursts ({result['stamp']})",
        "",
        f"`python bench/model_eval.py` on {result['host_cores']} cores, seed 0, lightgbm params {hb['lgbm_params']}.",
        "",
        "## Handbook protocol (burst scenario off)",
        "",
        "Validation (mean of 3 folds: train on a week, 7-day delay, validate on a week that ends on or",
        "before the last training day; the test week is not used to choose):",
        "",
        "| LightGBM overrides | derived ratios | AP | card P@100 | AUC | s |",
        "|---|---|---|---|---|---|",
    ]
    for trial in hb["validation_trials"]:
        m = trial["mean"]
        lines.append(
            f"| `{json.dumps(trial['params'])}` | {trial['derived']} | {m['average_precision']} | "
            f"{m['card_precision_at_100']} | {m['auc_roc']} | {trial['seconds']} |"
        )
    lines += ["", "Test week (2018-08-08 .. 08-14), committed settings:", ""]
    lines += ["| model | AP | card P@100 | AUC | train s |", "|---|---|---|---|---|"]
    for name, run in hb["test"].items():
        m = run["metrics"]
        lines.append(
            f"| {name} | {m['average_precision']} | {m['card_precision_at_100']} | {m['auc_roc']} | "
            f"{run['train_seconds']} |"
        )
    lines += [
        "",
        "## Card-testing bursts (scenario 4 on)",
        "",
        "Recall over the test week's burst transactions at each model's thresholds (chosen on that",
        "week by the cards' policy), the share of bursts with at least one transaction at or above it,",
        "and the median position in its burst of the first such transaction.",
        "",
        (
            "| model | trained on | velocity features | AP | card P@100 | bursts / tx | review recall | "
            "bursts caught | first at | decline recall | bursts caught | first at |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [(r["model"], "bursts on", "no" if r["dropped"] else "yes", r) for r in bu["trained_on_bursts"]]
    rows += [(r["model"], "bursts off (committed)", "yes", r) for r in bu["committed_models"]]
    for model, trained_on, velocity, r in rows:
        m, b = r["metrics"], r["bursts"]
        lines.append(
            f"| {model} | {trained_on} | {velocity} | {m['average_precision']} | {m['card_precision_at_100']} | "
            f"{b['bursts']} / {b['burst_transactions']} | {b['review']['recall']} | {b['review']['bursts_caught']} | "
            f"{b['review']['median_first_position']} | {b['decline']['recall']} | {b['decline']['bursts_caught']} | "
            f"{b['decline']['median_first_position']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="two LightGBM candidates only")
    args = parser.parse_args()
    started = time.perf_counter()
    result: dict[str, Any] = {
        "stamp": datetime.now(UTC).strftime("%Y%m%d-%H%M%S"),
        "host_cores": os.cpu_count(),
        "handbook": handbook(SHORT_GRID if args.short else GRID),
        "bursts": bursts(),
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"model-{result['stamp']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    text = markdown(result)
    stem.with_suffix(".md").write_text(text)
    print(text)
    print(f"written {stem}.json/.md in {result['seconds']} s")


if __name__ == "__main__":
    main()
