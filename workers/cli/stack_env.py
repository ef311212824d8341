"""The local stack's addresses and Prometheus set-up, from the one settings object.

``python -m workers.cli.stack_env`` prints shell assignments; ``scripts/stack.sh`` evaluates
them, so the broker, Redis and Prometheus it starts listen exactly where the worker and the
tests will look (``FRAUDSCORE_*`` env vars included).

``python -m workers.cli.stack_env prometheus DIR`` writes DIR/prometheus.yml and one file-based
target list per job (DIR/targets/<job>.json): the Kafka worker on ``metrics.port``, each gRPC
process on ``metrics.grpc_port + i`` for ``grpc.processes``, the stream feature job
(``fraudscore features stream``) on ``metrics.stream_port``. Prometheus re-reads target files
on change, so re-running it after changing the settings needs no restart.
``deploy/prometheus.yml`` (Docker) lists the same jobs and targets for the default settings;
tests/test_settings.py keeps the two in step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from workers.settings import REPO_ROOT, GrpcSettings, MetricsSettings, load_settings

WORKER_JOB = "fraudscore-worker"
GRPC_JOB = "fraudscore-grpc"
FEATURES_JOB = "fraudscore-features"
RULES_FILE = REPO_ROOT / "deploy" / "prometheus" / "rules.yml"


def stack_env() -> dict[str, str]:
    settings = load_settings()
    kafka_host, kafka_port = settings.kafka.bootstrap_servers.split(",")[0].rsplit(":", 1)
    redis = urlparse(settings.redis.url)
    return {
        "KAFKA_HOST": kafka_host,
        "KAFKA_PORT": kafka_port,
        # The KRaft controller listens on the next port.
        "KAFKA_CONTROLLER_PORT": str(int(kafka_port) + 1),
        "REDIS_HOST": redis.hostname or "127.0.0.1",
        "REDIS_PORT": str(redis.port or 6379),
        "PROMETHEUS_HOST": _reachable(settings.metrics.host),
        "PROMETHEUS_PORT": str(settings.metrics.prometheus_port),
    }


def scrape_targets(metrics: MetricsSettings, grpc: GrpcSettings) -> dict[str, list[str]]:
    """Every process the stack runs, by Prometheus job: ``{job: ["host:port", ...]}``."""
    host = _reachable(metrics.host)
    return {
        WORKER_JOB: [f"{host}:{metrics.port}"],
        GRPC_JOB: [f"{host}:{metrics.grpc_port + i}" for i in range(max(1, grpc.processes))],
        # One job process per host: a second one on the same host needs its own stream_port.
        FEATURES_JOB: [f"{host}:{metrics.stream_port}"],
    }


def prometheus_config(
    targets_dir: Path,
    jobs: list[str],
    rule_files: list[Path],
    scrape_interval: str = "5s",
    evaluation_interval: str = "5s",
) -> dict[str, Any]:
    """A Prometheus configuration scraping each job from ``targets_dir/<job>.json``."""
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": evaluation_interval},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [
            {
                "job_name": job,
                # One refresh interval for files Prometheus could not watch; changes are picked up at once otherwise.
                "file_sd_configs": [{"files": [str(targets_dir / f"{job}.json")], "refresh_interval": "30s"}],
            }
            for job in jobs
        ],
    }


def write_prometheus_setup(
    directory: Path,
    targets: dict[str, list[str]],
    rule_files: list[Path],
    scrape_interval: str = "5s",
    evaluation_interval: str = "5s",
) -> Path:
    """Writes ``directory/prometheus.yml`` and its target files; returns the config's path.

    JSON is YAML, so the config is written as JSON: no YAML library where the stack runs.
    """
    targets_dir = directory / "targets"
    targets_dir.mkdir(parents=True, exist_ok=True)
    for job, addresses in targets.items():
        _write_if_changed(targets_dir / f"{job}.json", json.dumps([{"targets": addresses, "labels": {}}], indent=2))
    config = prometheus_config(targets_dir, list(targets), rule_files, scrape_interval, evaluation_interval)
    path = directory / "prometheus.yml"
    _write_if_changed(path, json.dumps(config, indent=2))
    return path


def _write_if_changed(path: Path, text: str) -> None:
    """Rewrites only on change, via a rename: Prometheus never reads a half-written file."""
    if path.exists() and path.read_text() == text:
        return
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(text + "\n")
    partial.replace(path)


def _reachable(host: str) -> str:
    """An address to connect to for a listener bound on ``host`` (0.0.0.0 binds loopback too)."""
    return "127.0.0.1" if host in ("", "0.0.0.0") else host


def main(argv: list[str]) -> int:
    if not argv:
        for key, value in stack_env().items():
            print(f"{key}={value}")
        return 0
    if argv[0] == "prometheus" and len(argv) == 2:
        settings = load_settings()
        path = write_prometheus_setup(Path(argv[1]), scrape_targets(settings.metrics, settings.grpc), [RULES_FILE])
        print(path)
        return 0
    print("usage: python -m workers.cli.stack_env [prometheus DIR]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
