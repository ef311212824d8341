"""The Grafana dashboard: it queries only metrics the code defines, follows the lint rules of
Grafana's dashboard-linter, and every panel's query returns data from a real Prometheus after
real traffic through both paths (a Kafka worker and two gRPC server processes) and the
stream feature job consuming the same transactions and fraud labels."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import yaml
from prometheus_client import REGISTRY

import workers.metrics  # noqa: F401  (registers every metric)
from tests.deploy.prometheus import PrometheusServer, has_numbers, query_at
from tests.kafka.harness import Collector, WorkerProcess, feast_env, live, produce, produce_transactions, worker_env
from tests.stream import harness as stream
from workers import codec
from workers.cli.stack_env import FEATURES_JOB, GRPC_JOB, WORKER_JOB, scrape_targets
from workers.health import is_ready
from workers.proto.fraud.v1 import fraud_pb2, fraud_pb2_grpc
from workers.records import US_PER_DAY, FraudLabel
from workers.settings import REPO_ROOT, GrpcSettings, KafkaSettings, Settings

DASHBOARD_PATH = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "fraudscore.json"
RULES_PATH = REPO_ROOT / "deploy" / "prometheus" / "rules.yml"
# Grafana's values for the variables when "All" is picked, and a rate window that holds a few
# of the test Prometheus's 1 s scrapes.
VARIABLES = {"$job": "fraudscore-.*", "$instance": ".*", "$__rate_interval": "30s"}
GRPC_PROCESSES = 2


def _dashboard() -> dict:
    return json.loads(DASHBOARD_PATH.read_text())


def _targets(dashboard: dict) -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every query; rows hold no queries."""
    return [
        (panel["title"], target["refId"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def _substituted(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def test_every_dashboard_query_names_a_defined_metric_or_recording_rule() -> None:
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    defined = {
        family.name + suffix
        for family in REGISTRY.collect()
        if family.name.startswith("fraudscore_")
        for suffix in suffixes.get(family.type, ("",))
    }
    groups = yaml.safe_load(RULES_PATH.read_text())["groups"]
    recorded = {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}
    exprs = [expr for _, _, expr in _targets(_dashboard())]
    queried = {name for expr in exprs for name in re.findall(r"(?<![:\w])fraudscore_[a-z_]+", expr)}
    used_rules = {name for expr in exprs for name in re.findall(r"\b[a-z_]+:fraudscore_[a-z_]+:[a-z0-9_]+", expr)}
    assert queried, "the dashboard queries nothing"
    assert not queried - defined, f"dashboard queries undefined metrics: {sorted(queried - defined)}"
    assert not used_rules - recorded, f"dashboard queries unknown recording rules: {sorted(used_rules - recorded)}"


def test_dashboard_follows_the_dashboard_linter_rules() -> None:
    """The rules of github.com/grafana/dashboard-linter, checked here whether or not it builds:
    datasource/job/instance variables; each panel on the datasource variable with a description
    and a unit; each selector filtered by $job and $instance; rates over $__rate_interval."""
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["type"] == "query" and variables[name]["includeAll"] and variables[name]["multi"]
    assert "$job" in variables["instance"]["definition"], "instances follow the chosen job"
    problems = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        title = panel["title"]
        if panel["datasource"]["uid"] != "${datasource}":
            problems.append(f"{title}: not on the datasource variable")
        if not panel.get("description") or not panel["fieldConfig"]["defaults"].get("unit"):
            problems.append(f"{title}: no description or unit")
        for target in panel["targets"]:
            expr = target["expr"]
            for selector in re.findall(r"(?<![:\w])(?:fraudscore_[a-z_]+|up)(\{[^}]*\})?", expr):
                if 'job=~"$job"' not in selector or 'instance=~"$instance"' not in selector:
                    problems.append(f"{title} {target['refId']}: selector {selector or '(none)'} lacks $job/$instance")
            for window in re.findall(r"(?:rate|increase)\([^\[]*\[([^\]]+)\]", expr):
                if window != "$__rate_interval":
                    problems.append(f"{title} {target['refId']}: rate over [{window}], not [$__rate_interval]")
    assert not problems, "\n".join(problems)


# --- every panel against a real Prometheus after real traffic ---------------------------


def _labels(txns: list) -> list[FraudLabel]:
    """Fraud labels on some of ``txns`` (applied), and one on a transaction older than any
    retained day (late): the label results the features row shows."""
    now_us = time.time_ns() // 1000
    labels = [FraudLabel(t.transaction_id, t.customer_id, t.terminal_id, t.event_time_us, True, now_us) for t in txns]
    old = txns[0]
    return [*labels, FraudLabel("too-old", old.customer_id, old.terminal_id, now_us - 400 * US_PER_DAY, True, now_us)]


def _start(args: list[str], env: dict[str, str], log_path: Path) -> WorkerProcess:
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "workers", *args], env=env, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT
        )
    return WorkerProcess(process, log_path)


def _grpc_traffic(port: int, txns: list, channels: int = 4) -> int:
    """Unary Score calls spread over a few connections (SO_REUSEPORT spreads connections)."""
    answered = 0
    opened = [
        grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.primary_user_agent", f"dash-{i}")])
        for i in range(channels)
    ]
    try:
        stubs = [fraud_pb2_grpc.FraudScoringStub(channel) for channel in opened]
        for i, txn in enumerate(txns):
            request = fraud_pb2.ScoreRequest(
                request_id=f"r{i}", transaction=codec.transaction_to_proto(txn), budget_us=50_000
            )
            reply = stubs[i % channels].Score(request, timeout=10)
            answered += reply.decision.transaction_id == txn.transaction_id
    finally:
        for channel in opened:
            channel.close()
    return answered


@pytest.mark.kafka
@pytest.mark.redis
@pytest.mark.timeout(300)
def test_every_panel_returns_data_from_a_real_prometheus_after_traffic_through_both_paths_and_the_job(
    local_stack: Settings, kafka_topics: KafkaSettings, features: Settings, tmp_path: Path
) -> None:
    metrics = local_stack.metrics
    grpc_port = local_stack.grpc.port
    base_env = worker_env(kafka_topics, feast_env(features))
    # The configured ports, so the local stack's Prometheus scrapes these very processes too.
    worker = _start(["serve"], {**base_env, "FRAUDSCORE_METRICS__PORT": str(metrics.port)}, tmp_path / "worker.log")
    servers = _start(
        ["grpc", "--processes", str(GRPC_PROCESSES), "--port", str(grpc_port), "--rest-port", "0"],
        {**base_env, "FRAUDSCORE_METRICS__GRPC_PORT": str(metrics.grpc_port)},
        tmp_path / "grpc.log",
    )
    # The stream feature job on this test's topics, writing into the workers' feature store.
    job_settings = stream.job_settings(features, kafka_topics, tmp_path).model_copy(update={"feast": features.feast})
    job_env = stream.job_env(job_settings, "dash", FRAUDSCORE_METRICS__STREAM_PORT=str(metrics.stream_port))
    feature_job = stream.start_job(job_env, tmp_path / "job.log")
    processes = (worker, servers, feature_job)
    targets = scrape_targets(metrics, GrpcSettings(processes=GRPC_PROCESSES))
    prometheus = PrometheusServer(tmp_path / "prometheus", targets).start()
    collector = Collector(kafka_topics, kafka_topics.decisions_topic)
    try:
        metrics_ports = [metrics.port, metrics.stream_port] + [metrics.grpc_port + i for i in range(GRPC_PROCESSES)]
        deadline = time.monotonic() + 120
        while not all(is_ready(port) for port in metrics_ports):
            assert time.monotonic() < deadline, [p.log()[-2000:] for p in processes]
            assert all(p.process.poll() is None for p in processes), [p.log()[-2000:] for p in processes]
            time.sleep(0.5)

        kafka_txns = live(600, seed=21)
        grpc_txns = live(300, seed=22)
        produce(kafka_topics, [(f"bad-{i}", b"{not json") for i in range(10)])  # the DLQ panel's data
        stream.produce_raw(kafka_topics, kafka_topics.labels_topic, [b"{not a label"] * 3)  # labels to their DLQ
        traffic_started = time.monotonic()
        for chunk in range(0, len(kafka_txns), 100):  # spread over time so rates see it
            produce_transactions(kafka_topics, kafka_txns[chunk : chunk + 100])
            assert _grpc_traffic(grpc_port, grpc_txns[chunk // 2 : chunk // 2 + 50]) == 50
            stream.produce_labels(kafka_topics, _labels(kafka_txns[chunk : chunk + 5]))
            time.sleep(1.0)
        collector.read_until(lambda m: len(m) >= len(kafka_txns), timeout_s=60)
        # Each transaction counts once (on its customer's side), though both sides apply it.
        applied = {"kind": "transaction", "result": "applied"}
        job_applied = stream.wait_for_metric(
            metrics.stream_port, "fraudscore_stream_events_total", applied, len(kafka_txns), timeout_s=60
        )
        job_events = {
            (kind, result): stream.metric_value(
                metrics.stream_port, "fraudscore_stream_events_total", {"kind": kind, "result": result}
            )
            for kind, result in (("transaction", "invalid"), ("label", "applied"), ("label", "late"), ("label", "dlq"))
        }
        # A few scrapes and rule evaluations after the traffic; lag is reported every 5 s.
        time.sleep(max(0.0, 12 - (time.monotonic() - traffic_started)))

        stack_instances = [f"127.0.0.1:{port}" for port in (metrics.port, metrics.grpc_port, metrics.stream_port)]
        stack_up = _stack_prometheus_up(local_stack, stack_instances)
        up = prometheus.targets_up()
        results = {
            (title, ref): query_at(prometheus.url, _substituted(expr)) for title, ref, expr in _targets(_dashboard())
        }
        job_values = prometheus.api("label/job/values", **{"match[]": 'up{job=~"fraudscore-.*"}'})
        instance_values = prometheus.api("label/instance/values", **{"match[]": f'up{{job=~"{GRPC_JOB}"}}'})
    finally:
        collector.close()
        prometheus.stop()
        # Every process is stopped before any exit code is judged: none outlives a failure.
        exit_codes = [process.stop() for process in processes]
        assert exit_codes == [0, 0, 0], [process.log()[-3000:] for process in processes]

    assert len(collector.messages) >= len(kafka_txns)
    assert up == {(job, address): 1.0 for job, addresses in targets.items() for address in addresses}
    assert job_applied == len(kafka_txns), feature_job.log()[-3000:]
    assert job_events == {
        ("transaction", "invalid"): 10,
        ("label", "applied"): 5 * len(range(0, len(kafka_txns), 100)),
        ("label", "late"): len(range(0, len(kafka_txns), 100)),
        ("label", "dlq"): 3,
    }, feature_job.log()[-3000:]
    assert stack_up == {instance: 1.0 for instance in stack_instances}, (
        "the local stack's Prometheus scrapes the worker, the gRPC process and the feature job on the configured ports"
    )
    assert sorted(job_values) == [FEATURES_JOB, GRPC_JOB, WORKER_JOB]
    assert sorted(instance_values) == sorted(targets[GRPC_JOB])
    empty = [f"{title} [{ref}]" for (title, ref), result in results.items() if not has_numbers(result)]
    assert not empty, f"panels without data after traffic through both paths and the job: {empty}"
    print(f"{len(results)} panel queries returned data; targets up: {sorted(up)}")


def _stack_prometheus_up(settings: Settings, instances: list[str], timeout_s: float = 30.0) -> dict[str, float]:
    """``up`` of ``instances`` in the local stack's Prometheus (5 s scrapes), once all are seen up."""
    url = f"http://127.0.0.1:{settings.metrics.prometheus_port}"
    deadline = time.monotonic() + timeout_s
    while True:
        seen = {
            s["metric"]["instance"]: float(s["value"][1])
            for s in query_at(url, 'up{job=~"fraudscore-.*"}')
            if s["metric"]["instance"] in instances
        }
        if (len(seen) == len(instances) and all(seen.values())) or time.monotonic() > deadline:
            return seen
        time.sleep(1.0)
