"""The stream feature job against the real broker and Redis: the store ends equal to the truth
computed from the same events with ``history`` alone, through replays, kills and Redis outages."""

from __future__ import annotations

import time

import pytest

from tests.stream import harness as h
from workers.settings import Settings

pytestmark = [pytest.mark.kafka, pytest.mark.redis]

STORE_TIMEOUT_S = 90


@pytest.fixture
def job(local_stack: Settings, kafka_topics, tmp_path) -> Settings:
    return h.job_settings(local_stack, kafka_topics, tmp_path)


def test_events_end_in_the_store_as_the_truth_and_a_replay_changes_nothing(job: Settings, tmp_path) -> None:
    txns = h.make_transactions(600)
    labels = h.labels_for(txns)
    h.produce_transactions(job.kafka, txns)
    h.produce_labels(job.kafka, labels)
    customers, terminals = h.truth_customers(txns), h.truth_terminals(txns, labels)
    worker = h.start_job(h.job_env(job, "a"), tmp_path / "job.log")
    try:
        assert h.wait_for_store(job, customers, terminals, STORE_TIMEOUT_S) == []
        # The same events again (a producer retry, a replayed topic): they are new offsets, so
        # the job applies them; what must not change is anything already counted twice.
        worker.stop()
        worker = h.start_job(h.job_env(job, "a"), tmp_path / "job2.log")
        worker.wait_for_log("re-writing them to the store", 60)
        time.sleep(2)
        assert h.store_matches(job, customers, terminals) == []
    finally:
        worker.stop()
