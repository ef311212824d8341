"""The stream job's readiness probe before its faust worker runs (no servers needed)."""

from __future__ import annotations

import threading

from workers.settings import Settings
from workers.stream.app import _assigned
from workers.stream.topology import FeatureJob


class _NoWriter:
    def read_states(self, *args, **kwargs):  # pragma: no cover - never reached: nothing is consumed
        return {}


def test_readiness_polled_before_the_worker_starts_does_not_make_fausts_consumer(tmp_path) -> None:
    # A probe thread asking faust's app.consumer made the consumer there, on another event loop,
    # and the worker then died at start ("Future attached to a different loop").
    settings = Settings().model_copy(update={"stream": Settings().stream.model_copy(update={"data_dir": tmp_path})})
    job = FeatureJob(settings, _NoWriter())
    results = []
    probe = threading.Thread(target=lambda: results.append(_assigned(job)))
    probe.start()
    probe.join(10)
    (result,) = results
    assert not result.ok
    assert "not started" in result.detail
    assert job.app._consumer is None, "the probe must not create faust's consumer"
