"""The Kafka worker end to end: real broker, real Redis with Feast-materialized features,
real ONNX model, real worker processes."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import redis
from confluent_kafka import Producer

from tests.kafka.harness import (
    Collector,
    WorkerProcess,
    decided_ids,
    decisions_of,
    feast_env,
    free_port,
    live,
    materialize,
    produce,
    produce_transactions,
    start_worker,
    worker_env,
)
from workers import codec
from workers.features import definitions as d
from workers.kafka.config import connection_config
from workers.proto.fraud.v1 import fraud_pb2
from workers.records import Transaction
from workers.settings import REPO_ROOT, KafkaSettings, Settings
from workers.types import BatchTiming

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


def _offline_scores(settings: Settings, txns: list[Transaction]) -> np.ndarray:
    """Scores computed without the worker: Feast SDK read + the shared assembly + ONNX Runtime."""
    from workers.engine.models import ModelRegistry
    from workers.features.online import FeastSdkReader

    reader = FeastSdkReader(settings)
    customer_ids = np.array([t.customer_id for t in txns], dtype=np.int64)
    terminal_ids = np.array([t.terminal_id for t in txns], dtype=np.int64)
    event_times = np.array([t.event_time_us for t in txns], dtype=np.int64)
    entity = reader.read(customer_ids, terminal_ids, event_times)
    matrix = d.assemble(
        np.array([t.amount for t in txns]), np.array([t.event_time_us for t in txns]), entity.customer, entity.terminal
    )
    artifact = ModelRegistry(settings.model.directory).load(settings.model.name, settings.model.version)
    session = ort.InferenceSession(str(artifact.path), providers=["CPUExecutionProvider"])
    (scores,) = session.run(["fraud_probability"], {"features": matrix})
    return scores.reshape(-1)


def test_ten_thousand_events_get_exactly_ten_thousand_matching_decisions(
    kafka_topics: KafkaSettings, features: Settings, tmp_path: Path
) -> None:
    txns = live(10_000)
    produce_transactions(kafka_topics, txns)
    worker = start_worker(worker_env(kafka_topics, feast_env(features)), tmp_path / "worker.log")
    collector = Collector(kafka_topics, kafka_topics.decisions_topic)
    try:
        messages = collector.read_until(lambda m: len(m) >= 10_000, timeout_s=120)
        time.sleep(1.0)
        messages = collector.read_until(lambda m: False, timeout_s=1.0)  # anything extra would show up
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
        collector.close()

    decisions = decisions_of(messages)
    assert len(decisions) == 10_000, f"{len(decisions)} decisions for 10000 events"
    by_id = {d_.transaction_id: d_ for d_ in decisions}
    assert set(by_id) == {t.transaction_id for t in txns}
    assert all(m.key().decode() == dec.transaction_id for m, dec in zip(messages, decisions))
    assert not [dec for dec in decisions if dec.degraded], "no decision should be degraded with Redis up"

    served = np.array([by_id[t.transaction_id].score for t in txns], dtype=np.float32)
    offline = _offline_scores(features, txns)
    np.testing.assert_allclose(served, offline, rtol=0, atol=1e-6)
    outcomes = collections.Counter(fraud_pb2.Outcome.Name(dec.outcome) for dec in decisions)
    assert outcomes["APPROVE"] > 0 and outcomes["APPROVE"] < 10_000, outcomes
    headers = dict(messages[0].headers())
    assert headers["model-version"].decode() == decisions[0].model_version


def test_kill_9_mid_stream_then_restart_loses_no_transaction(
    kafka_topics: KafkaSettings, features: Settings, tmp_path: Path
) -> None:
    txns = live(6_000, seed=2)
    env = worker_env(kafka_topics, feast_env(features), FRAUDSCORE_KAFKA__CONSUME_BATCH="200")
    collector = Collector(kafka_topics, kafka_topics.decisions_topic)
    first = start_worker(env, tmp_path / "first.log")
    produce_transactions(kafka_topics, txns)
    collector.read_until(lambda m: len(m) >= 1_000, timeout_s=60)
    first.kill_hard()
    assert len(decided_ids(collector.messages)) < len(txns), "killed too late to test anything"

    second = start_worker(env, tmp_path / "second.log")
    try:
        wanted = {t.transaction_id for t in txns}
        collector.read_until(lambda m: wanted <= decided_ids(m), timeout_s=120)
    finally:
        second.stop()
        collector.close()
    missing = wanted - decided_ids(collector.messages)
    assert not missing, f"{len(missing)} transactions never got a decision"


def test_exactly_once_mode_gives_read_committed_readers_one_decision_each(
    kafka_topics: KafkaSettings, features: Settings, tmp_path: Path
) -> None:
    txns = live(4_000, seed=3)
    env = worker_env(
        kafka_topics,
        feast_env(features),
        FRAUDSCORE_KAFKA__DELIVERY="exactly-once",
        FRAUDSCORE_KAFKA__INSTANCE_ID="eos-1",
        FRAUDSCORE_KAFKA__CONSUME_BATCH="200",
    )
    uncommitted = Collector(kafka_topics, kafka_topics.decisions_topic, isolation="read_uncommitted")
    first = start_worker(env, tmp_path / "first.log")
    produce_transactions(kafka_topics, txns)
    uncommitted.read_until(lambda m: len(m) >= 800, timeout_s=60)
    first.kill_hard()  # mid-transaction: its open transaction must never become visible
    uncommitted.close()

    second = start_worker(env, tmp_path / "second.log")
    committed = Collector(kafka_topics, kafka_topics.decisions_topic, isolation="read_committed")
    try:
        wanted = {t.transaction_id for t in txns}
        committed.read_until(lambda m: wanted <= decided_ids(m), timeout_s=120)
        committed.read_until(lambda m: False, timeout_s=2)  # give duplicates a chance to appear
    finally:
        second.stop()
        committed.close()
    counts = collections.Counter(m.key().decode() for m in committed.messages)
    assert set(counts) == wanted
    duplicated = {k: n for k, n in counts.items() if n > 1}
    assert not duplicated, f"{len(duplicated)} transactions decided more than once"


def test_two_workers_share_six_partitions_and_one_takes_over_when_the_other_dies(
    kafka_topics: KafkaSettings, features: Settings, tmp_path: Path
) -> None:
    env = worker_env(kafka_topics, feast_env(features))
    a = start_worker(env, tmp_path / "a.log")
    b = start_worker(env, tmp_path / "b.log")
    collector = Collector(kafka_topics, kafka_topics.decisions_topic)
    try:
        a.wait_for_log("assigned [")
        b.wait_for_log("assigned [")
        first = live(3_000, seed=4)
        produce_transactions(kafka_topics, first)
        collector.read_until(lambda m: {t.transaction_id for t in first} <= decided_ids(m), timeout_s=90)
        assert {t.transaction_id for t in first} <= decided_ids(collector.messages)
        assert _assigned_partitions(a.log()) and _assigned_partitions(b.log()), "both workers should own partitions"

        b.kill_hard()
        second = live(3_000, seed=5)
        produce_transactions(kafka_topics, second)
        wanted = {t.transaction_id for t in second}
        collector.read_until(lambda m: wanted <= decided_ids(m), timeout_s=90)
        missing = wanted - decided_ids(collector.messages)
        assert not missing, f"{len(missing)} events not decided after one worker died"
        assert _assigned_partitions(a.log()) == set(range(6)), "the survivor should own every partition"
    finally:
        a.stop()
        collector.close()


def _assigned_partitions(log: str) -> set[int]:
    """Partitions a worker owns according to its 'assigned [...]' / 'revoked [...]' log lines."""
    owned: set[int] = set()
    for line in log.splitlines():
        for verb in ("assigned", "revoked", "lost partitions"):
            marker = f"{verb} ["
            if marker in line:
                parts = json.loads(line[line.index(marker) + len(marker) - 1 :].split("]")[0] + "]")
                owned = owned | set(parts) if verb == "assigned" else owned - set(parts)
    return owned


def test_malformed_events_go_to_the_dlq_with_reasons_and_good_ones_are_decided(
    kafka_topics: KafkaSettings, features: Settings, tmp_path: Path
) -> None:
    good = live(20, seed=6)
    bad = {
        "garbage": b"\x00\xff\xfe garbage \x01",
        "wrong-types": json.dumps(
            {"transaction_id": "x1", "customer_id": "one", "terminal_id": 1, "amount": 1.0, "event_time_us": 1}
        ).encode(),
        "missing-id": json.dumps({"customer_id": 1, "terminal_id": 1, "amount": 1.0, "event_time_us": 1}).encode(),
        "huge": b'{"transaction_id": "' + b"x" * 200_000 + b'"}',
        "empty": b"",
    }
    payloads: list[tuple[str, bytes]] = []
    for i, txn in enumerate(good):
        payloads.append((txn.transaction_id, codec.encode_transaction_json(txn)))
        if i < len(bad):
            name = list(bad)[i]
            payloads.append((f"bad-{name}", bad[name]))
    produce(kafka_topics, payloads)  # no content-type header: the worker sniffs the format
    worker = start_worker(worker_env(kafka_topics, feast_env(features)), tmp_path / "worker.log")
    decisions = Collector(kafka_topics, kafka_topics.decisions_topic)
    dlq = Collector(kafka_topics, kafka_topics.dlq_topic)
    try:
        decisions.read_until(lambda m: len(m) >= len(good), timeout_s=60)
        dlq.read_until(lambda m: len(m) >= len(bad), timeout_s=30)
    finally:
        assert worker.stop() == 0
        decisions.close(), dlq.close()
    assert decided_ids(decisions.messages) == {t.transaction_id for t in good}
    by_key = {m.key().decode(): m for m in dlq.messages}
    assert set(by_key) == {f"bad-{name}" for name in bad}
    kinds = {key: dict(m.headers())["dlq-error-kind"].decode() for key, m in by_key.items()}
    assert kinds == {
        "bad-garbage": "malformed-protobuf",
        "bad-wrong-types": "schema",
        "bad-missing-id": "schema",
        "bad-huge": "too-large",
        "bad-empty": "empty",
    }
    assert b"customer_id" in dict(by_key["bad-wrong-types"].headers())["dlq-reason"]
    assert by_key["bad-garbage"].value() == bad["garbage"], "the original bytes are kept"
    assert dict(by_key["bad-huge"].headers())["dlq-source-topic"].decode() == kafka_topics.transactions_topic


def test_redis_outage_degrades_decisions_and_recovery_restores_full_ones(
    kafka_topics: KafkaSettings, features: Settings, tmp_path: Path
) -> None:
    """A dedicated redis-server (same features) is stopped and restarted mid-stream."""
    port = 16391
    dump_dir = tmp_path / "redis"
    dump_dir.mkdir()
    redis_cmd = [
        "redis-server",
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--dir",
        str(dump_dir),
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "yes",
    ]
    subprocess.run(redis_cmd, check=True)
    outage_settings = features.model_copy(
        update={"redis": features.redis.model_copy(update={"url": f"redis://127.0.0.1:{port}/0"})}
    )
    _wait_redis(port)
    materialize(outage_settings)
    client = redis.Redis(port=port)

    env = worker_env(kafka_topics, feast_env(outage_settings), FRAUDSCORE_REDIS__TIMEOUT_MS="50")
    worker = start_worker(env, tmp_path / "worker.log")
    collector = Collector(kafka_topics, kafka_topics.decisions_topic)
    try:
        before = live(200, seed=8)
        produce_transactions(kafka_topics, before)
        collector.read_until(lambda m: len(m) >= 200, timeout_s=60)
        client.shutdown(save=True)  # stopped: connections refused from here on
        during = live(200, seed=9)
        produce_transactions(kafka_topics, during)
        collector.read_until(lambda m: len(m) >= 400, timeout_s=60)
        subprocess.run(redis_cmd, check=True)  # back, with the saved features
        _wait_redis(port)
        time.sleep(1.0)
        after = live(200, seed=10)
        produce_transactions(kafka_topics, after)
        collector.read_until(lambda m: len(m) >= 600, timeout_s=60)
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
        collector.close()
        try:
            redis.Redis(port=port).shutdown(nosave=True)
        except redis.exceptions.ConnectionError:
            pass
    by_id = {dec.transaction_id: dec for dec in decisions_of(collector.messages)}
    assert len(by_id) == 600, "every transaction is decided, outage or not"
    assert not any(by_id[t.transaction_id].degraded for t in before)
    degraded_during = [by_id[t.transaction_id] for t in during]
    assert all(dec.degraded for dec in degraded_during)
    assert {dec.degraded_cause for dec in degraded_during} == {fraud_pb2.FEATURES_UNAVAILABLE}
    assert not any(by_id[t.transaction_id].degraded for t in after), "full decisions resume after recovery"


def _wait_redis(port: int) -> None:
    for _ in range(50):
        try:
            if redis.Redis(port=port).ping():
                return
        except redis.exceptions.ConnectionError:
            time.sleep(0.1)
    raise AssertionError(f"redis on {port} did not start")


# --- poison pills -------------------------------------------------------------------------

_VALID_TIME = 1_700_000_000_000_000
POISON: dict[str, bytes | None] = {
    # 5,000 levels inside a field: the JSON decoder's recursion limit.
    "nested-json": b'{"transaction_id":"p1","meta":' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}",
    "invalid-utf8": b'{"transaction_id":"p\xff2","customer_id":1,"terminal_id":2,"amount":1.0,"event_time_us":%d}'
    % _VALID_TIME,
    # Once accepted, it overflowed feature assembly (JSON) or the protobuf decision encoder.
    "event-time-1e20": b'{"transaction_id":"p3","customer_id":1,"terminal_id":2,"amount":1.0,'
    b'"event_time_us":100000000000000000000}',
    "protobuf-only-id": fraud_pb2.Transaction(transaction_id="p4").SerializeToString(),
    "repeated-amount": b'{"transaction_id":"p5","customer_id":1,"terminal_id":2,"amount":1.0,"amount":9999,'
    b'"event_time_us":%d}' % _VALID_TIME,
    "tombstone": None,
}
POISON_KINDS = {
    "nested-json": "too-deep",
    "invalid-utf8": "invalid-utf8",
    "event-time-1e20": "schema",
    "protobuf-only-id": "schema",
    "repeated-amount": "schema",
    "tombstone": "tombstone",
}


def _produce_with_poison(kafka: KafkaSettings, good: list[Transaction]) -> None:
    payloads: list[tuple[str, bytes | None]] = []
    names = list(POISON)
    for i, txn in enumerate(good):
        payloads.append((txn.transaction_id, codec.encode_transaction_json(txn)))
        if i < len(names):
            payloads.append((f"poison-{names[i]}", POISON[names[i]]))
    produce(kafka, payloads)  # type: ignore[arg-type]


@pytest.mark.parametrize("decision_format", ["json", "protobuf"])
def test_poison_pills_go_to_the_dlq_and_a_restarted_worker_does_not_meet_them_again(
    kafka_topics: KafkaSettings, features: Settings, tmp_path: Path, decision_format: str
) -> None:
    good = live(30, seed=11)
    _produce_with_poison(kafka_topics, good)
    # A header key that is not UTF-8: the worker must still read the event (sniffing its format).
    odd_header = live(1, seed=12)[0]
    producer = Producer(connection_config(kafka_topics, "test"))
    producer.produce(
        kafka_topics.transactions_topic,
        key=odd_header.transaction_id,
        value=codec.encode_transaction_json(odd_header),
        headers=[(b"\xff\xfe", b"\x00")],
    )
    assert producer.flush(10) == 0
    env = worker_env(kafka_topics, feast_env(features), FRAUDSCORE_KAFKA__DECISION_FORMAT=decision_format)
    decisions = Collector(kafka_topics, kafka_topics.decisions_topic)
    dlq = Collector(kafka_topics, kafka_topics.dlq_topic)
    first = start_worker(env, tmp_path / "first.log")
    try:
        wanted = {t.transaction_id for t in good} | {odd_header.transaction_id}
        decisions.read_until(lambda m: wanted <= decided_ids(m), timeout_s=60)
        dlq.read_until(lambda m: len(m) >= len(POISON), timeout_s=30)
    finally:
        stop_started = time.monotonic()
        assert first.stop() == 0, first.log()[-3000:]
        stop_s = time.monotonic() - stop_started
    assert "Traceback" not in first.log(), first.log()[-3000:]
    assert stop_s < 20, f"SIGTERM took {stop_s:.0f} s: something was stuck"
    assert decided_ids(decisions.messages) == wanted, "every neighbour of a poison pill is decided"
    by_key = {m.key().decode(): m for m in dlq.messages}
    assert {k: dict(m.headers())["dlq-error-kind"].decode() for k, m in by_key.items()} == {
        f"poison-{name}": kind for name, kind in POISON_KINDS.items()
    }
    assert by_key["poison-tombstone"].value() is None, "a tombstone stays a tombstone in the DLQ"
    assert by_key["poison-invalid-utf8"].value() == POISON["invalid-utf8"], "original bytes are kept"

    later = live(5, seed=13)
    produce_transactions(kafka_topics, later)
    second = start_worker(env, tmp_path / "second.log")
    try:
        wanted |= {t.transaction_id for t in later}
        decisions.read_until(lambda m: wanted <= decided_ids(m), timeout_s=60)
        time.sleep(2.0)  # room for anything the restarted worker might wrongly re-read
        dlq.read_until(lambda m: False, timeout_s=1)
        decisions.read_until(lambda m: False, timeout_s=1)
    finally:
        assert second.stop() == 0, second.log()[-3000:]
        decisions.close(), dlq.close()
    assert "to DLQ" not in second.log(), "the restarted worker met a poison pill again"
    assert len(dlq.messages) == len(POISON)
    assert len(decisions.messages) == len(wanted), "nothing decided twice, nothing lost across the restart"


class _UnencodableDecisions:
    """The engine as the worker sees it, answering at once with the rules; decisions for
    customer 666 carry a transaction id no wire format can encode (a lone surrogate). No
    validated event can produce such a decision any more: this proves the worker's guard."""

    def submit(self, txns, deadline_ns, priority, on_done) -> bool:
        from workers.engine.decide import fallback
        from workers.records import DegradedCause

        decisions = fallback(txns, DegradedCause.MODEL_UNAVAILABLE, "test engine").decisions
        for txn, decision in zip(txns, decisions):
            if txn.customer_id == 666:
                decision.transaction_id += "\ud800"
        on_done(decisions, BatchTiming())
        return True


@pytest.mark.parametrize("decision_format", ["json", "protobuf"])
def test_a_decision_that_cannot_be_encoded_sends_its_event_to_the_dlq_and_its_neighbours_are_decided(
    kafka_topics: KafkaSettings, decision_format: str
) -> None:
    import threading

    from workers.kafka.worker import KafkaWorker

    txns = live(12, seed=14)
    txns[5] = Transaction(txns[5].transaction_id, 666, txns[5].terminal_id, txns[5].amount, txns[5].event_time_us)
    produce_transactions(kafka_topics, txns)
    kafka = kafka_topics.model_copy(update={"decision_format": decision_format})
    worker = KafkaWorker(kafka, _UnencodableDecisions(), max_chunk_rows=64, budget_ms=1000)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    decisions = Collector(kafka_topics, kafka_topics.decisions_topic)
    dlq = Collector(kafka_topics, kafka_topics.dlq_topic)
    try:
        decisions.read_until(lambda m: len(m) >= 11, timeout_s=60)
        dlq.read_until(lambda m: len(m) >= 1, timeout_s=30)
    finally:
        worker.stop()
        thread.join(30)
        decisions.close(), dlq.close()
    assert not thread.is_alive()
    assert decided_ids(decisions.messages) == {t.transaction_id for i, t in enumerate(txns) if i != 5}
    (dead,) = dlq.messages
    assert dead.key().decode() == txns[5].transaction_id
    assert dict(dead.headers())["dlq-error-kind"] == b"undeliverable-decision"
    assert b"UnicodeEncodeError" in dict(dead.headers())["dlq-reason"]


# --- one host, both sources ------------------------------------------------------------------


def test_serve_with_grpc_answers_callers_and_kafka_from_one_engine(
    kafka_topics: KafkaSettings, features: Settings, tmp_path: Path
) -> None:
    import grpc

    from workers.proto.fraud.v1 import fraud_pb2_grpc

    port = free_port()
    env = worker_env(kafka_topics, feast_env(features), FRAUDSCORE_GRPC__PORT=str(port), FRAUDSCORE_GRPC__REST_PORT="0")
    env_args = ["serve", "--grpc"]
    log_path = tmp_path / "combined.log"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "workers", *env_args],
            env=env,
            cwd=REPO_ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    worker = WorkerProcess(process, log_path)
    collector = Collector(kafka_topics, kafka_topics.decisions_topic)
    try:
        worker.wait_for_log("gRPC on", timeout_s=60)
        txns = live(50, seed=15)
        produce_transactions(kafka_topics, txns)
        caller = live(1, seed=16)[0]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            answer = fraud_pb2_grpc.FraudScoringStub(channel).Score(
                fraud_pb2.ScoreRequest(
                    request_id="r1", transaction=codec.transaction_to_proto(caller), budget_us=50_000
                ),
                timeout=10,
            )
        collector.read_until(lambda m: len(m) >= len(txns), timeout_s=60)
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
        collector.close()
    assert answer.decision.transaction_id == caller.transaction_id and not answer.decision.degraded
    assert decided_ids(collector.messages) == {t.transaction_id for t in txns}


def test_cpu_priority_idle_puts_the_worker_in_sched_idle(
    kafka_topics: KafkaSettings, features: Settings, tmp_path: Path
) -> None:
    import os

    env = worker_env(kafka_topics, feast_env(features), FRAUDSCORE_KAFKA__CPU_PRIORITY="idle")
    worker = start_worker(env, tmp_path / "idle.log")
    collector = Collector(kafka_topics, kafka_topics.decisions_topic)
    try:
        txns = live(20, seed=17)
        produce_transactions(kafka_topics, txns)
        collector.read_until(lambda m: len(m) >= len(txns), timeout_s=60)
        policies = {os.sched_getscheduler(int(tid)) for tid in os.listdir(f"/proc/{worker.process.pid}/task")}
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
        collector.close()
    assert policies == {os.SCHED_IDLE}, "every thread of the worker, librdkafka's and the engine's included"
    assert decided_ids(collector.messages) == {t.transaction_id for t in txns}


def test_a_traced_event_has_its_stage_spans_in_jaeger_and_its_decision_carries_the_trace(
    kafka_topics: KafkaSettings, features: Settings, tmp_path: Path, jaeger
) -> None:
    """Tracing on with head sampling at 0: only the event whose producer sent a sampled
    traceparent is traced; its decision carries the trace onward, and the collector holds
    every stage span under the caller's trace."""
    caller_trace = uuid.uuid4().hex
    traceparent = f"00-{caller_trace}-{uuid.uuid4().hex[:16]}-01"
    plain, traced = live(5, seed=21), live(1, seed=22)[0]
    produce_transactions(kafka_topics, plain)
    producer = Producer(connection_config(kafka_topics, "test"))
    producer.produce(
        kafka_topics.transactions_topic,
        key=traced.transaction_id,
        value=codec.encode_transaction_json(traced),
        headers=[("content-type", codec.JSON_CONTENT_TYPE), ("traceparent", traceparent)],
    )
    assert producer.flush(10) == 0
    env = worker_env(
        kafka_topics,
        feast_env(features),
        FRAUDSCORE_TRACING__ENABLED="true",
        FRAUDSCORE_TRACING__OTLP_ENDPOINT=jaeger.otlp_endpoint,
        FRAUDSCORE_TRACING__SAMPLE_RATIO="0",
    )
    decisions = Collector(kafka_topics, kafka_topics.decisions_topic)
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        decisions.read_until(lambda m: len(m) >= 6, timeout_s=60)
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]  # SIGTERM flushes the spans
    carried = {m.key().decode(): dict(m.headers()).get("traceparent") for m in decisions.messages}
    assert set(carried) == {t.transaction_id for t in [*plain, traced]}
    assert all(carried[t.transaction_id] is None for t in plain), "not sampled, not degraded: not traced"
    decision_traceparent = carried[traced.transaction_id].decode()
    assert decision_traceparent.split("-")[1] == caller_trace, "the decision continues the caller's trace"
    spans = jaeger.trace(caller_trace, spans_at_least=7)
    names = {span["operationName"] for span in spans}
    assert {"fraudscore.decision", "receive", "queue", "enrich", "score", "decide", "produce"} <= names
    root = next(span for span in spans if span["operationName"] == "fraudscore.decision")
    assert root["spanID"] == decision_traceparent.split("-")[2]
    tags = {tag["key"]: tag["value"] for tag in root["tags"]}
    assert tags["fraudscore.transaction_id"] == traced.transaction_id
    stage_parents = {
        span["operationName"]: span["references"][0]["spanID"]
        for span in spans
        if span["operationName"] in ("queue", "enrich", "score", "decide", "produce")
    }
    assert set(stage_parents.values()) == {root["spanID"]}, "every stage is a child of the decision span"
    enrich = next(span for span in spans if span["operationName"] == "enrich")
    assert any(ref["refType"] == "FOLLOWS_FROM" or ref["traceID"] != caller_trace for ref in enrich["references"]), (
        "the batch's stages link to the batch span"
    )
