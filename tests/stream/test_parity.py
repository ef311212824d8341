"""Issue 11's parity check, end to end on the real broker and Redis: a simulated history's last
37 days replayed through Kafka -> the stream job -> the store, then a test day scored through
the live Kafka worker. Every feature vector the engine scored with equals the one training
computes for that transaction (``offline.transaction_features`` of the whole history); also
when the job is killed with SIGKILL in the middle of the replay and restarted."""

from __future__ import annotations

import time
import urllib.request

import numpy as np
import pandas as pd
import pytest

from tests.kafka.harness import RecordingReader, free_port, worker_in_process
from tests.stream import harness as h
from workers.features import definitions as d
from workers.features import offline
from workers.features.online import make_reader
from workers.features.store import load_online
from workers.offline import replay
from workers.offline.simulator import SimulatorConfig, simulate_transactions
from workers.records import FraudLabel, Transaction
from workers.settings import Settings

pytestmark = [pytest.mark.kafka, pytest.mark.redis]

# 46 days: 8 to backfill, 37 replayed, 1 scored. About 4,000 transactions and 1,000 labels.
SIM = SimulatorConfig(n_customers=80, n_terminals=120, n_days=46, seed=21)
STORE_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def history() -> pd.DataFrame:
    return simulate_transactions(SIM)


def _transactions(frame: pd.DataFrame) -> list[Transaction]:
    return [
        Transaction(
            str(r.transaction_id), int(r.customer_id), int(r.terminal_id), float(r.amount), int(r.event_time_us)
        )
        for r in frame.itertuples()
    ]


def _labels(frame: pd.DataFrame) -> list[FraudLabel]:
    return [
        FraudLabel(
            str(r.transaction_id),
            int(r.customer_id),
            int(r.terminal_id),
            int(r.event_time_us),
            bool(r.is_fraud),
            int(r.label_time_us),
        )
        for r in frame.itertuples()
    ]


def _applied(metrics_port: int) -> float:
    """Transactions the job has applied so far (its own counter, from its /metrics)."""
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2).read().decode()
    except OSError:
        return 0.0
    for line in body.splitlines():
        if line.startswith('fraudscore_stream_events_total{kind="transaction",result="applied"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _replay(job: Settings, plan: replay.ReplayPlan, tmp_path, kill: bool):
    """The replayed days and their labels through a job process; returns the running process
    once the store equals the truth (with ``kill``: a restarted one, the first was SIGKILLed
    halfway through)."""
    metrics_port = free_port()
    # Killed mid-replay: small slices, or the whole replay fits one slice and is applied at once.
    slices = {"FRAUDSCORE_STREAM__BATCH_MAX": "100"} if kill else {}
    env = h.job_env(job, "parity", FRAUDSCORE_METRICS__STREAM_PORT=str(metrics_port), **slices)
    txns = _transactions(plan.replay)
    # Killed: the last third is produced only after the kill, so the kill lands inside the
    # replay however fast the job applies (a half-way poll once saw the whole replay applied).
    before_kill = len(txns) * 2 // 3 if kill else len(txns)
    h.produce_transactions(job.kafka, txns[:before_kill])
    h.produce_labels(job.kafka, _labels(plan.labels))
    process = h.start_job(env, tmp_path / "job.log")
    try:
        if kill:
            deadline = time.monotonic() + STORE_TIMEOUT_S
            while _applied(metrics_port) < len(txns) / 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            applied = _applied(metrics_port)
            assert len(txns) / 2 <= applied < len(txns), f"not in the middle of the replay: {applied} of {len(txns)}"
            process.kill_hard()
            h.produce_transactions(job.kafka, txns[before_kill:])
            process = h.start_job(env, tmp_path / "job-restarted.log")
        known = pd.concat([plan.backfill, plan.replay])
        labels = replay.labels_of(known)
        labels = labels[labels["label_time_us"] <= plan.test_start_us]
        customers = h.truth_customers(_transactions(known))
        terminals = h.truth_terminals(_transactions(known), _labels(labels))
        assert h.wait_for_store(job, customers, terminals, STORE_TIMEOUT_S) == []
        return process
    except BaseException:
        process.stop()
        raise


@pytest.mark.parametrize("kill", [False, True], ids=["clean", "kill-9-mid-replay"])
def test_replayed_history_serves_the_test_day_exactly_as_training(
    local_stack: Settings, kafka_topics, tmp_path, history: pd.DataFrame, kill: bool
) -> None:
    job = h.job_settings(local_stack, kafka_topics, tmp_path)
    job = job.model_copy(update={"feast": job.feast.model_copy(update={"reader": "lean"})})
    plan = replay.plan(history, replay_days=37)
    load_online(job, plan.backfill, as_of_us=plan.cutoff_us)
    process = _replay(job, plan, tmp_path, kill)
    try:
        # The test day reaches the job first (the store then holds every test transaction too:
        # harmless, windows end before each one's own time), then the worker scores it.
        start = h.end_offsets(job.kafka, job.kafka.transactions_topic)
        test = _transactions(plan.test)
        h.produce_transactions(job.kafka, test)
        everything = pd.concat([plan.backfill, plan.replay, plan.test])
        labels = replay.labels_of(everything)
        labels = labels[labels["label_time_us"] <= plan.test_start_us]
        assert (
            h.wait_for_store(
                job,
                h.truth_customers(_transactions(everything)),
                h.truth_terminals(_transactions(everything), _labels(labels)),
                STORE_TIMEOUT_S,
            )
            == []
        )
        h.commit_group_at(job.kafka, start)
        reader = RecordingReader(make_reader(job))
        with worker_in_process(job, reader) as worker:
            deadline = time.monotonic() + 60
            while worker.decided < len(test) and time.monotonic() < deadline:
                time.sleep(0.1)
        assert worker.decided == len(test)
    finally:
        process.stop()

    truth = offline.transaction_features(history)
    rows = reader.entity_rows()
    served, expected = [], []
    for position, txn in zip(plan.test.index.to_numpy(), test):
        entity = rows[(txn.customer_id, txn.terminal_id, txn.event_time_us)]
        n_customer = len(d.CUSTOMER_FEATURES)
        served.append(
            d.assemble(
                np.array([txn.amount]),
                np.array([txn.event_time_us]),
                entity[None, :n_customer],
                entity[None, n_customer:],
            )[0]
        )
        expected.append(truth.matrix[position])
    served_matrix, expected_matrix = np.array(served), np.array(expected)
    # Velocity features included; and the test day is not trivially empty of history.
    assert (expected_matrix[:, d.FEATURE_INDEX["customer_nb_tx_30d"]] > 0).mean() > 0.9
    assert float(np.abs(served_matrix - expected_matrix).max()) <= 1e-5
