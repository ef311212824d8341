"""Running the stream feature job: ``fraudscore features stream`` (one process of the group).

Several processes with the same ``stream.app_id`` share the partitions (faust's consumer
group ``<app_id>`` for the repartition topics, ``<app_id>-sources`` for the source topics); each needs its own ``stream.web_port`` and ``metrics.stream_port`` on one host, and
its own ``stream.data_dir`` with the rocksdb store. Give each a stable ``stream.instance_id``
(static membership) so that a restart after a crash gets its partitions back at once.
"""

from __future__ import annotations

import logging

from workers.health import CheckResult, HealthServer, Probes
from workers.settings import Settings

log = logging.getLogger(__name__)


def run(settings: Settings) -> int:
    import faust

    from workers.features.writer import FeatureWriter
    from workers.stream.topology import FeatureJob

    settings.stream.data_dir.mkdir(parents=True, exist_ok=True)
    job = FeatureJob(settings, FeatureWriter(settings))
    probes = Probes()
    probes.add_ready("partitions", lambda: _assigned(job))
    probes.add_ready("source_partitions", job.splitter.assignment)
    probes.add_live("source_loop", job.splitter.alive)
    # A crashed faust service (e.g. its Fetcher on an unsupported codec) leaves the process
    # up and idle: liveness fails so that it is restarted.
    probes.add_live("faust", lambda: CheckResult(not job.app.crashed, "crashed" if job.app.crashed else ""))
    health = HealthServer(settings.metrics.host, settings.metrics.stream_port, probes).start()
    log.info(
        "stream feature job %s: store %s, %d partitions, slice %.0f ms, web port %d, metrics port %d",
        settings.stream.app_id,
        settings.stream.store,
        settings.stream.partitions,
        settings.stream.slice_ms,
        settings.stream.web_port,
        settings.metrics.stream_port,
    )
    job.splitter.start()
    try:
        worker = faust.Worker(job.app, loglevel=settings.log_level.lower(), redirect_stdouts=False)
        worker.execute_from_commandline()
    finally:
        job.splitter.stop()
        health.stop()
    return 0


def _assigned(job) -> CheckResult:
    """Ready once faust's consumer holds partitions. Never through ``app.consumer``: that
    property creates the consumer when there is none, and made from this probe's thread
    before the worker starts, it is bound to another event loop, and the worker then dies at
    start ("Future attached to a different loop": the demo's readiness poll hit it)."""
    consumer = job.app._consumer  # None until the worker makes it, on its own loop
    if consumer is None:
        return CheckResult(False, "consumer not started")
    try:
        assigned = consumer.assignment()
    except Exception as exc:  # starting or stopping
        return CheckResult(False, f"consumer not ready: {exc}")
    return CheckResult(bool(assigned), f"{len(assigned)} partitions assigned")
