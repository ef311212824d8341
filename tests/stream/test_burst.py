"""Issue 11's burst check on the real broker and Redis: a card-testing burst on a card with a
history goes through the stream feature job and the Kafka worker one purchase at a time, and
the card's decisions change within the burst. The same purchases scored on the card's
features as they were before the burst (no stream job) do not change: the velocity features
the job keeps fresh are what catch it."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from tests.kafka.harness import (
    Collector,
    decisions_of,
    feast_env,
    free_port,
    produce_transactions,
    start_worker,
    worker_env,
)
from tests.stream import harness as h
from workers.features import definitions as d
from workers.features import history as state
from workers.features import offline
from workers.features.store import load_online
from workers.health import is_ready
from workers.offline.simulator import LiveStream, SimulatorConfig, simulate_transactions
from workers.offline.training import onnx_scores, read_model_contract
from workers.proto.fraud.v1 import fraud_pb2
from workers.records import Transaction
from workers.settings import REPO_ROOT, Settings

pytestmark = [pytest.mark.kafka, pytest.mark.redis]

MODEL_DIR = REPO_ROOT / "models" / "card-testing"  # trained with the scenario (models/README.md)
GAP_S = 0.5  # between purchases: far above the job's freshness at this rate


def _frozen_outcomes(history, burst: list[Transaction]) -> list[int]:
    """What the model says of each purchase on the card's pre-burst features (nothing of the
    burst counted), with the thresholds the worker uses."""
    customers = offline.customer_state(history).set_index(d.CUSTOMER_JOIN_KEY)[d.CUSTOMER_EVENTS_FIELD]
    terminals = offline.terminal_state(history).set_index(d.TERMINAL_JOIN_KEY)[d.TERMINAL_TILES_FIELD]
    at = np.array([t.event_time_us for t in burst])
    events = state.unpack_customer(customers.loc[burst[0].customer_id])
    customer = offline.customer_features_from_state([events], np.zeros(len(burst), dtype=np.int64), at)
    tiles = [state.unpack_terminal(terminals.get(t.terminal_id, b"")) for t in burst]
    terminal = offline.terminal_features_from_state(tiles, np.arange(len(burst)), at)
    matrix = d.assemble(np.array([t.amount for t in burst]), at, customer, terminal)
    path = MODEL_DIR / "mlp-v2.onnx"
    thresholds = json.loads(read_model_contract(path).metadata["thresholds"])
    scores = onnx_scores(path.read_bytes(), matrix)
    return [
        fraud_pb2.DECLINE
        if s >= thresholds["decline"]
        else fraud_pb2.REVIEW
        if s >= thresholds["review"]
        else fraud_pb2.APPROVE
        for s in scores
    ]


@pytest.mark.timeout(300)
def test_a_card_testing_burst_changes_the_cards_decisions_within_the_burst(
    local_stack: Settings, kafka_topics, tmp_path
) -> None:
    sim = SimulatorConfig.ending_now(n_customers=300, n_terminals=600, n_days=40, seed=9)
    history = simulate_transactions(sim)
    job = h.job_settings(local_stack, kafka_topics, tmp_path)
    load_online(job, history)
    recent = history[history["event_time_us"] > history["event_time_us"].max() - 30 * 86_400_000_000]
    card = int(recent["customer_id"].value_counts().index[0])  # a regular: plenty of history
    job_port, worker_port = free_port(), free_port()
    stream_job = h.start_job(
        h.job_env(job, "burst", FRAUDSCORE_METRICS__STREAM_PORT=str(job_port)), tmp_path / "job.log"
    )
    worker = start_worker(
        worker_env(
            kafka_topics,
            feast_env(job),
            FRAUDSCORE_MODEL__DIRECTORY=str(MODEL_DIR),
            FRAUDSCORE_METRICS__PORT=str(worker_port),
        ),
        tmp_path / "worker.log",
    )
    collector = Collector(kafka_topics, kafka_topics.decisions_topic)
    outcomes: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not (is_ready(job_port) and is_ready(worker_port)):
            assert time.monotonic() < deadline, (stream_job.log()[-2000:], worker.log()[-2000:])
            time.sleep(0.5)
        burst = LiveStream.create(config=sim).card_testing_burst(customer=card)
        sent = []
        for i, txn in enumerate(burst):
            stamped = Transaction(f"burst-{i}", txn.customer_id, txn.terminal_id, txn.amount, time.time_ns() // 1000)
            produce_transactions(kafka_topics, [stamped])
            sent.append(stamped)
            collector.read_until(lambda m, n=i + 1: len(m) >= n, timeout_s=30)
            time.sleep(GAP_S)
        decided = {d.transaction_id: d for d in decisions_of(collector.messages)}
        outcomes = [decided[t.transaction_id].outcome for t in sent]
        assert not any(decided[t.transaction_id].degraded for t in sent), [decided[t.transaction_id] for t in sent]
    finally:
        collector.close()
        worker.stop()
        stream_job.stop()

    frozen = _frozen_outcomes(history, sent)
    changed_at = next((i for i, o in enumerate(outcomes) if o != fraud_pb2.APPROVE), None)
    print(
        f"burst of {len(sent)} on card {card}: outcomes {outcomes}, first not approved at #{changed_at}; frozen {frozen}"
    )
    assert outcomes[0] == fraud_pb2.APPROVE, "the first small purchase looks like the card's usual self"
    assert changed_at is not None, f"the burst was approved throughout: {outcomes}"
    assert sum(o != fraud_pb2.APPROVE for o in outcomes) > sum(o != fraud_pb2.APPROVE for o in frozen), (
        f"live {outcomes} vs frozen features {frozen}: the fresh features should catch more of the burst"
    )
