"""The alert rules (deploy/prometheus/rules.yml): promtool's unit tests, one per alert, and an
induced fault firing its alert in a real Prometheus within its ``for`` window."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.deploy.prometheus import PrometheusServer, prometheus_binary
from tests.features.harness import RedisServer, load, store_settings
from workers.engine.engine import ScoringEngine
from workers.features.online import LeanRedisReader
from workers.health import HealthServer, Probes, add_engine_checks
from workers.settings import REPO_ROOT

RULES_DIR = REPO_ROOT / "deploy" / "prometheus"
SLACK_S = 15.0  # scrape (1 s) + evaluation (1 s) + the idle store probe, on a busy 2-core box


def _rules() -> dict[str, dict]:
    groups = yaml.safe_load((RULES_DIR / "rules.yml").read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def _for_s(rule: dict) -> float:
    text = rule.get("for", "0s")
    return float(text[:-1]) * {"s": 1, "m": 60, "h": 3600}[text[-1]]


def test_promtool_unit_tests_pass_with_a_firing_and_a_quiet_case_per_alert() -> None:
    prometheus_binary()  # promtool comes in the same Debian package
    result = subprocess.run(
        ["promtool", "test", "rules", "rules_test.yml"],
        cwd=RULES_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    cases = [
        case
        for test in yaml.safe_load((RULES_DIR / "rules_test.yml").read_text())["tests"]
        for case in test["alert_rule_test"]
    ]
    fires = {case["alertname"] for case in cases if case["exp_alerts"]}
    quiet = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert fires == set(_rules()), "every alert needs a test where it fires"
    assert quiet == set(_rules()), "every alert needs a test where it does not (yet)"
    for name, rule in _rules().items():
        assert rule["labels"]["severity"] in {"page", "ticket"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


@pytest.mark.redis
@pytest.mark.timeout(240)
def test_redis_stopped_and_a_process_stopped_fire_their_alerts_in_a_real_prometheus_within_for(
    tmp_path: Path, redis_server: RedisServer, store_history: pd.DataFrame
) -> None:
    settings = store_settings(tmp_path, redis_server)
    load(settings, store_history)
    engine = ScoringEngine.from_settings(settings, LeanRedisReader(settings), executors=1)
    engine.start()
    scoring = HealthServer("127.0.0.1", 0, Probes()).start()  # the process whose store goes away
    add_engine_checks(scoring.probes, engine, settings.metrics.loop_stall_s)
    doomed = HealthServer("127.0.0.1", 0, Probes()).start()  # the process that will stop
    scoring_at, doomed_at = f"127.0.0.1:{scoring.port}", f"127.0.0.1:{doomed.port}"
    prometheus = PrometheusServer(
        tmp_path / "prometheus", {"fraudscore-grpc": [scoring_at], "fraudscore-worker": [doomed_at]}
    ).start()
    rules = _rules()
    try:
        deadline = time.monotonic() + 30
        while prometheus.targets_up() != {("fraudscore-grpc", scoring_at): 1.0, ("fraudscore-worker", doomed_at): 1.0}:
            assert time.monotonic() < deadline, prometheus.targets_up()
            time.sleep(0.2)
        assert not prometheus.firing(), "nothing is wrong yet"

        faulted = time.monotonic()
        redis_server.stop()
        doomed.stop()
        fired: dict[str, float] = {}
        expected = {"FraudscoreStoreUnusable": scoring_at, "FraudscoreTargetDown": doomed_at}
        limit = max(_for_s(rules[name]) for name in expected) + SLACK_S
        while len(fired) < len(expected):
            assert time.monotonic() - faulted < limit, (fired, prometheus.firing(), prometheus.log())
            firing = prometheus.firing()
            for name, instance in expected.items():
                if name not in fired and any(labels["instance"] == instance for labels in firing.get(name, [])):
                    fired[name] = time.monotonic() - faulted
            time.sleep(0.25)
        store_labels = next(
            labels for labels in prometheus.firing()["FraudscoreStoreUnusable"] if labels["instance"] == scoring_at
        )
    finally:
        prometheus.stop()
        scoring.stop()
        engine.stop(drain=True)
    for name, after_s in fired.items():
        window = _for_s(rules[name])
        assert window <= after_s <= window + SLACK_S, (
            f"{name} fired {after_s:.1f} s after the fault (for: {window:.0f} s)"
        )
    assert store_labels["state"] == "unreachable" and store_labels["severity"] == "page"
    print({name: f"{after_s:.1f} s" for name, after_s in fired.items()})
