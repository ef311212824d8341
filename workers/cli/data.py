"""Data subcommands: ``simulate``, ``train``, ``features apply|materialize|all|stream``.

Heavy libraries (pandas, feast, lightgbm) are imported inside the handlers.
Data flows one way: simulate -> feature_repo/data/*.parquet -> Feast -> online store;
simulate -> features -> models/*.onnx.
"""

from __future__ import annotations

import argparse
import logging
import time
from datetime import date
from pathlib import Path

from workers.cli import command
from workers.settings import load_settings

log = logging.getLogger(__name__)

TRANSACTIONS_FILE = "transactions.parquet"


def _simulator_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="one seed for population, transactions and models")
    p.add_argument("--customers", type=int, default=5_000)
    p.add_argument("--terminals", type=int, default=10_000)
    p.add_argument("--days", type=int, default=183)
    p.add_argument("--data-dir", type=Path, default=None, help="default: <feast repo>/data")
    p.add_argument(
        "--card-testing",
        action="store_true",
        help="add fraud scenario 4 (bursts of small then large purchases on stolen cards); "
        "off by default so that the Handbook's figures stay comparable",
    )
    period = p.add_mutually_exclusive_group()
    period.add_argument(
        "--start-date", type=date.fromisoformat, default=None, help="first simulated day (default 2018-04-01)"
    )
    period.add_argument(
        "--end-now",
        action="store_true",
        help="a history that ends now: the last simulated day is today (UTC), cut at the current time, "
        "so that a live stream continues it",
    )


def _simulator_args_defaults() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    _simulator_args(parser)
    return parser.parse_args([])


def _simulate_and_write(args: argparse.Namespace, timings: dict[str, float]):
    """(the simulator config, the transactions), written with their snapshots to the data dir."""
    from workers.features import offline
    from workers.offline.simulator import simulate_transactions, write_parquet

    data_dir = args.data_dir or load_settings().feast.data_dir
    config = _simulator_config(args)
    started = time.perf_counter()
    transactions = simulate_transactions(config)
    timings["simulate_s"] = round(time.perf_counter() - started, 2)
    write_parquet(transactions, data_dir / TRANSACTIONS_FILE)
    started = time.perf_counter()
    offline.write_snapshots(transactions, data_dir)
    timings["snapshots_s"] = round(time.perf_counter() - started, 2)
    print(f"{len(transactions)} transactions ({transactions['is_fraud'].mean():.2%} fraud) and snapshots in {data_dir}")
    return config, transactions


def _simulator_config(args: argparse.Namespace):
    from workers.offline.simulator import SimulatorConfig

    fields = {
        "n_customers": args.customers,
        "n_terminals": args.terminals,
        "n_days": args.days,
        "seed": args.seed,
        "card_testing": args.card_testing,
    }
    if args.end_now:
        return SimulatorConfig.ending_now(**fields)
    if args.start_date is not None:
        return SimulatorConfig(start_date=args.start_date, **fields)
    return SimulatorConfig(**fields)


@command("simulate", "simulate the transaction dataset and write it plus Feast snapshots as Parquet", _simulator_args)
def _simulate(args: argparse.Namespace) -> int:
    timings: dict[str, float] = {}
    _simulate_and_write(args, timings)
    print(timings)
    return 0


def _train_args(p: argparse.ArgumentParser) -> None:
    _simulator_args(p)
    p.add_argument("--version", type=int, default=2, help="integer model version written to the file names")
    p.add_argument("--models", default="lgbm,mlp", help="comma-separated subset of lgbm,mlp")
    p.add_argument("--out", type=Path, default=None, help="default: settings.model.directory")


@command("train", "simulate, compute features, train LightGBM + MLP, export ONNX and model cards", _train_args)
def _train(args: argparse.Namespace) -> int:
    from workers.offline import training

    timings: dict[str, float] = {}
    simulator, transactions = _simulate_and_write(args, timings)
    # The Handbook's weeks, at the same distance from the start of a moved history.
    protocol = training.Protocol.for_history(simulator.start_date)
    dataset = training.build_dataset(transactions, protocol, timings)
    config = training.TrainConfig(
        seed=args.seed,
        version=args.version,
        models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
        out_dir=args.out or Path(load_settings().model.directory),
        protocol=protocol,
        card_testing=args.card_testing,
    )
    started = time.perf_counter()
    cards = training.train_and_export(dataset, config)
    timings["train_and_export_s"] = round(time.perf_counter() - started, 2)
    for card in cards:
        print(
            f"{card['file']}: {card['metrics']} thresholds {card['thresholds']} onnx diff {card['onnx_max_abs_diff']:.1e}"
        )
    print(timings)
    return 0


def _features_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "action",
        choices=("apply", "materialize", "all", "stream"),
        help="all = apply then materialize; stream = run the stream feature job (workers/stream)",
    )


@command(
    "features",
    "register the Feast repo and/or materialize the end-of-history state into the online store "
    "(all: simulates the history first when none exists)",
    _features_args,
)
def _features(args: argparse.Namespace) -> int:
    if args.action == "stream":
        from workers.cli.stream import run_stream_job

        return run_stream_job()
    from workers.features import store as feast_store
    from workers.features.offline import snapshot_paths

    settings = load_settings()
    missing = [p for p in snapshot_paths(settings.feast.data_dir).values() if not p.exists()]
    if missing and args.action != "all":
        print(
            f"no feature snapshots at {', '.join(map(str, missing))}: run `fraudscore simulate` first "
            "(or `fraudscore features all`, which does)"
        )
        return 2
    if missing:
        print("no feature snapshots yet: simulating the transaction history they come from ...", flush=True)
        _simulate_and_write(_simulator_args_defaults(), {})
    store = feast_store.feature_store(settings)
    if args.action in ("apply", "all"):
        feast_store.apply(store, settings)
        print(f"applied project {settings.feast.project!r} to {settings.feast.repo_path / 'registry.db'}")
    if args.action in ("materialize", "all"):
        started = time.perf_counter()
        start, end = feast_store.materialize(store, settings, show_progress=True)
        print(f"materialized {start} .. {end} in {time.perf_counter() - started:.1f} s")
    return 0
