"""The stream feature job against the real broker and Redis: the store ends equal to the truth
computed from the same events with ``history`` alone, through replays, a kill -9, a Redis
outage and two processes sharing the partitions; bad labels end in their DLQ with a reason."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from tests.kafka.harness import Collector
from tests.stream import harness as h
from workers.settings import Settings
from workers.stream.topology import CUSTOMERS_TABLE, TERMINALS_TABLE, changelog_topic

pytestmark = [pytest.mark.kafka, pytest.mark.redis]

STORE_TIMEOUT_S = 90


@pytest.fixture
def job(local_stack: Settings, kafka_topics, tmp_path) -> Settings:
    return h.job_settings(local_stack, kafka_topics, tmp_path)


def _events(n: int, seed: int = 0):
    txns = h.make_transactions(n, seed=seed)
    return txns, h.labels_for(txns, seed=seed + 1)


def test_events_end_in_the_store_as_the_truth_and_a_replay_changes_nothing(job: Settings, tmp_path) -> None:
    txns, labels = _events(600)
    h.produce_transactions(job.kafka, txns)
    h.produce_labels(job.kafka, labels)
    customers, terminals = h.truth_customers(txns), h.truth_terminals(txns, labels)
    env = h.job_env(job, "a")
    worker = h.start_job(env, tmp_path / "job.log")
    try:
        assert h.wait_for_store(job, customers, terminals, STORE_TIMEOUT_S) == []
        # faust's 1,500 ms fetch wait held repartition messages for seconds at 5,000 events/s.
        assert f"repartition fetch wait: {job.stream.fetch_wait_ms} ms (was 1500 ms)" in worker.log()
        worker.stop()
        # Replay: the job's source offsets back to 0, so it reads every event a second time.
        h.rewind_sources(job)
        env = h.job_env(job, "a")
        worker = h.start_job(env, tmp_path / "job2.log")
        port = int(env["FRAUDSCORE_METRICS__STREAM_PORT"])
        replayed = h.wait_for_metric(
            port, "fraudscore_stream_events_total", {"kind": "transaction", "result": "replay"}, len(txns), 60
        )
        # Every transaction was seen again and skipped. Not "exactly once each": a message
        # fetched while faust seeks after its recovery comes again after the job's own second
        # seek (topology, ``_seek_again_after_resume``; at-least-once). With that seek missing,
        # 1 run in 12 counted ~150 fewer: one partition's messages were dropped. That each
        # replay counts once, not once per side, is tests/stream/test_tables.py's.
        assert replayed >= len(txns)
        # Labels come from their own topic, in slices of their own: waited for too, not assumed done.
        label_replays = h.wait_for_metric(
            port, "fraudscore_stream_events_total", {"kind": "label", "result": "replay"}, len(labels), 60
        )
        assert label_replays >= len(labels)  # at least once, as the transactions above
        assert h.metric_value(port, "fraudscore_stream_events_total", {"kind": "transaction", "result": "applied"}) == 0
        assert h.store_matches(job, customers, terminals) == []
        # Read without the stall watch's help: no partition was left unread after the recovery.
        assert h.metric_value(port, "fraudscore_stream_partition_stalls_total", {}) == 0
    finally:
        worker.stop()


def _persisted_offsets(data_dir, table: str) -> dict[int, int]:
    """Partition -> the changelog offset faust's rocksdb store says it holds (the job stopped)."""
    import rocksdict

    offsets = {}
    for path in data_dir.glob(f"**/{table}-*.db"):
        db = rocksdict.Rdict(
            str(path), options=rocksdict.Options(raw_mode=True), access_type=rocksdict.AccessType.read_only()
        )
        try:
            value = db.get(b"__faust\0offset__")
        finally:
            db.close()
        if value is not None:
            offsets[int(path.name.removesuffix(".db").rsplit("-", 1)[1])] = int(value)
    return offsets


def _last_offsets(job: Settings, topic: str) -> dict[int, int]:
    """Partition -> its last record's offset, for the partitions holding any."""
    return {p: high - 1 for p, (low, high) in h.watermarks(job.kafka, topic).items() if high > low}


def test_rocksdb_records_the_changelog_offset_its_states_reach(job: Settings, tmp_path) -> None:
    """A restart reads the changelog only past the offset the store records. The job writes
    its changelog itself (not through faust's send path), so it must record that offset too:
    otherwise it moved only in recovery, and every restart re-read everything since the last."""
    job = job.model_copy(update={"stream": job.stream.model_copy(update={"store": "rocksdb"})})
    txns, labels = _events(400, seed=5)
    h.produce_transactions(job.kafka, txns)
    h.produce_labels(job.kafka, labels)
    env = h.job_env(job, "p")
    worker = h.start_job(env, tmp_path / "job.log")
    try:
        problems = h.wait_for_store(job, h.truth_customers(txns), h.truth_terminals(txns, labels), STORE_TIMEOUT_S)
        assert problems == [], problems[:8]
        time.sleep(job.stream.commit_interval_s * 4)  # commits after the last message
    finally:
        worker.stop()
    data_dir = Path(env["FRAUDSCORE_STREAM__DATA_DIR"])
    for table in (CUSTOMERS_TABLE, TERMINALS_TABLE):
        ends = _last_offsets(job, changelog_topic(job, table))
        assert ends, f"no {table} changelog records"
        assert _persisted_offsets(data_dir, table) == ends, table


# rocksdb was xfail until 2026-12-07: once in three runs the restarted process recovered 29 of
# 30 customer states, reported ready, and changed nothing in the store for 90 s; faust's
# restart window (README) explains both, and the job now holds the repartition partitions
# through it and watches for a partition left unread.
@pytest.mark.parametrize("store", ["memory", "rocksdb"])
def test_kill_9_mid_stream_recovers_state_and_counts_no_event_twice(job: Settings, tmp_path, store: str) -> None:
    # rocksdb (rocksdict, the production store) keeps state on disk: the restart reads the
    # changelog only past what the disk holds; memory rebuilds everything from the changelog.
    job = job.model_copy(update={"stream": job.stream.model_copy(update={"store": store})})
    txns, labels = _events(1500, seed=3)
    first, second = txns[:900], txns[900:]
    h.produce_transactions(job.kafka, first)
    h.produce_labels(job.kafka, labels[: len(labels) // 2])
    env = h.job_env(job, "k")
    worker = h.start_job(env, tmp_path / "job.log")
    try:
        port = int(env["FRAUDSCORE_METRICS__STREAM_PORT"])
        h.wait_for_metric(port, "fraudscore_stream_store_writes_total", {"entity": "customer"}, 1, 60)
        # Mid-stream: the rest arrives while the job is being killed, some of it before the kill.
        h.produce_transactions(job.kafka, second[:300])
        worker.kill_hard()
        h.produce_transactions(job.kafka, second[300:])
        h.produce_labels(job.kafka, labels[len(labels) // 2 :])
        started = time.monotonic()
        # The same instance id (static membership): the partitions come back without waiting
        # for the dead member's session to time out.
        env = h.job_env(job, "k")
        worker = h.start_job(env, tmp_path / "job2.log")
        worker.wait_for_log("re-writing them to the store", 60)
        recovered_s = time.monotonic() - started
        problems = h.wait_for_store(job, h.truth_customers(txns), h.truth_terminals(txns, labels), STORE_TIMEOUT_S)
        port = int(env["FRAUDSCORE_METRICS__STREAM_PORT"])
        assert problems == [], (
            f"{len(problems)} entities differ from the truth: {problems[:8]}; job: {h.job_state(port)}"
        )
        assert recovered_s < 30, f"recovery took {recovered_s:.0f} s"
    finally:
        worker.stop()


def test_redis_stopped_then_back_loses_no_update(local_stack: Settings, kafka_topics, tmp_path, redis_server) -> None:
    job = h.job_settings(local_stack, kafka_topics, tmp_path)
    job = job.model_copy(update={"redis": job.redis.model_copy(update={"url": redis_server.url})})
    txns, labels = _events(800, seed=5)
    h.produce_transactions(job.kafka, txns[:400])
    env = h.job_env(job, "r")
    worker = h.start_job(env, tmp_path / "job.log")
    try:
        assert h.wait_for_store(job, h.truth_customers(txns[:400]), h.truth_terminals(txns[:400], []), 60) == []
        # Stopped with its data saved (as a restarted Redis with persistence comes back).
        redis.Redis(port=redis_server.port).shutdown(save=True)
        h.produce_transactions(job.kafka, txns[400:])
        h.produce_labels(job.kafka, labels)
        port = int(env["FRAUDSCORE_METRICS__STREAM_PORT"])
        assert h.wait_for_metric(port, "fraudscore_stream_store_write_errors_total", {}, 2, 60) >= 2
        time.sleep(2)
        redis_server.start()
        problems = h.wait_for_store(job, h.truth_customers(txns), h.truth_terminals(txns, labels), 60)
        assert problems == [], f"{len(problems)} entities differ from the truth: {problems[:5]}"
    finally:
        worker.stop()


# Two processes starting together rebalance while the first events flow. This test failed in
# 1 of 4 runs (and more often earlier): a partition's first events were never applied, with no
# lag left. Cause: after each rebalance faust seeks through aiokafka's seek_to_committed, which
# leaves a partition with no committed offset where its fetcher was, past messages faust dropped
# at the revoke. The job now sends such partitions back to their start (topology,
# _rewind_uncommitted_partitions); 10 runs in a row passed after that.
def test_two_processes_share_the_partitions(job: Settings, tmp_path) -> None:
    txns, labels = _events(1000, seed=7)
    envs = [h.job_env(job, name) for name in ("p", "q")]
    workers = [h.start_job(env, tmp_path / f"{env['FRAUDSCORE_STREAM__INSTANCE_ID']}.log") for env in envs]
    try:
        for worker in workers:
            worker.wait_for_log("re-writing them to the store", 60)
        h.produce_transactions(job.kafka, txns)
        h.produce_labels(job.kafka, labels)
        problems = h.wait_for_store(job, h.truth_customers(txns), h.truth_terminals(txns, labels), STORE_TIMEOUT_S)
        states = [h.job_state(int(env["FRAUDSCORE_METRICS__STREAM_PORT"])) for env in envs]
        assert problems == [], f"{len(problems)} entities differ from the truth: {problems[:8]}; jobs: {states}"
        # Both took part: each one's last assignment holds some of the state partitions.
        for worker in workers:
            last = [line for line in worker.log().splitlines() if "customer states in partitions" in line][-1]
            owned = last.split("partitions [", 1)[1].split("]", 1)[0]
            assert owned and len(owned.split(",")) < job.stream.partitions, last
    finally:
        for worker in workers:
            worker.stop()


def test_bad_labels_go_to_the_dlq_with_a_reason_and_good_ones_still_count(job: Settings, tmp_path) -> None:
    from workers import codec
    from workers.records import FraudLabel

    txns = h.make_transactions(50, seed=9)
    good = h.labels_for(txns, share=0.5)
    t = txns[0]
    before_event = FraudLabel(
        t.transaction_id, t.customer_id, t.terminal_id, t.event_time_us, True, t.event_time_us - 1
    )
    bad = [b"{not json", b"", b'{"transaction_id": "x"}', b"\xff\xfe\x00garbage", codec.encode_label_json(before_event)]
    h.produce_transactions(job.kafka, txns)
    h.produce_raw(job.kafka, job.kafka.labels_topic, bad)
    h.produce_labels(job.kafka, good)
    worker = h.start_job(h.job_env(job, "d"), tmp_path / "job.log")
    collector = Collector(job.kafka, job.kafka.labels_dlq_topic)
    try:
        messages = collector.read_until(lambda m: len(m) >= len(bad), 60)
        reasons = sorted(dict(m.headers())["dlq-reason"].decode() for m in messages)
        assert reasons == sorted(["malformed-json", "empty", "schema", "malformed-protobuf", "label-before-event"])
        assert all(dict(m.headers())["dlq-detail"] for m in messages if dict(m.headers())["dlq-reason"] != b"empty")
        assert {m.value() or b"" for m in messages} == set(bad)
        problems = h.wait_for_store(job, h.truth_customers(txns), h.truth_terminals(txns, good), 60)
        assert problems == []
        assert worker.process.poll() is None, "a bad label must not stop the job"
    finally:
        collector.close()
        worker.stop()
