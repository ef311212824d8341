"""One configuration object: defaults, env vars, a TOML file, librdkafka pass-through."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from workers.cli import main
from workers.settings import REPO_ROOT, GrpcSettings, KafkaSettings, MetricsSettings, RedisSettings, load_settings


def test_env_vars_override_nested_sections(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRAUDSCORE_KAFKA__BOOTSTRAP_SERVERS", "10.0.0.1:9092")
    monkeypatch.setenv("FRAUDSCORE_ENGINE__MAX_BATCH_SIZE", "64")
    monkeypatch.setenv("FRAUDSCORE_KAFKA__CONSUMER", '{"fetch.min.bytes": 1}')
    settings = load_settings()
    assert settings.kafka.bootstrap_servers == "10.0.0.1:9092"
    assert settings.engine.max_batch_size == 64
    assert settings.kafka.consumer == {"fetch.min.bytes": 1}


def test_toml_file_is_read_and_env_wins_over_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "fraudscore.toml"
    config.write_text(
        '[kafka]\ngroup_id = "from-file"\ndelivery = "exactly-once"\n'
        '[kafka.producer]\n"compression.type" = "lz4"\n'
        "[redis]\ntimeout_ms = 5\n"
    )
    monkeypatch.setenv("FRAUDSCORE_CONFIG", str(config))
    monkeypatch.setenv("FRAUDSCORE_REDIS__TIMEOUT_MS", "7")
    settings = load_settings()
    assert settings.kafka.group_id == "from-file"
    assert settings.kafka.delivery == "exactly-once"
    assert settings.kafka.producer == {"compression.type": "lz4"}
    assert settings.redis.timeout_ms == 7


def test_invalid_value_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRAUDSCORE_KAFKA__DELIVERY", "at-most-twice")
    with pytest.raises(ValueError, match="delivery"):
        load_settings()


def test_docker_compose_uses_the_same_addresses_as_the_settings() -> None:
    """The Docker path and the no-Docker path must point the worker at the same places."""
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    # Compose mirrors the defaults; the section models never read the environment.
    kafka, redis, metrics = KafkaSettings(), RedisSettings(), MetricsSettings()
    services = compose["services"]
    kafka_port = kafka.bootstrap_servers.rsplit(":", 1)[1]
    redis_port = redis.url.rsplit(":", 1)[1].split("/")[0]
    kafka_env = services["kafka"]["environment"]
    assert f"PLAINTEXT://127.0.0.1:{kafka_port}" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]
    assert redis_port in " ".join(services["redis"]["command"])
    assert str(metrics.port) in (REPO_ROOT / "deploy" / "prometheus.yml").read_text()


def test_fraudscore_config_masks_every_secret(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("FRAUDSCORE_GRPC__BEARER_TOKEN", "tok-3141")
    monkeypatch.setenv("FRAUDSCORE_REDIS__URL", "redis://feast:pw-2718@redis.internal:6379/0")
    monkeypatch.setenv("FRAUDSCORE_KAFKA__CLIENT", '{"sasl.username": "svc", "sasl.password": "pw-1618"}')
    monkeypatch.setenv("FRAUDSCORE_KAFKA__PRODUCER", '{"ssl.key.password": "pw-1414", "linger.ms": 3}')
    assert main(["config"]) == 0
    printed = capsys.readouterr().out
    for secret in ("tok-3141", "pw-2718", "pw-1618", "pw-1414"):
        assert secret not in printed
    shown = json.loads(printed)
    assert shown["redis"]["url"] == "redis://feast:**********@redis.internal:6379/0"
    assert shown["kafka"]["client"] == {"sasl.username": "svc", "sasl.password": "**********"}
    assert shown["kafka"]["producer"]["linger.ms"] == 3, "only secrets are masked"
    # The settings themselves keep the real values for the code that uses them.
    assert load_settings().grpc.bearer_token.get_secret_value() == "tok-3141"


def test_connection_properties_given_once_reach_every_kafka_client() -> None:
    from workers.kafka.admin import admin_client
    from workers.kafka.config import connection_config, consumer_config, producer_config

    kafka = KafkaSettings(
        bootstrap_servers="b1:9092,b2:9092", client={"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN"}
    )
    for config in (consumer_config(kafka), producer_config(kafka), connection_config(kafka, "smoke")):
        assert config["bootstrap.servers"] == "b1:9092,b2:9092"
        assert config["security.protocol"] == "SASL_SSL" and config["sasl.mechanism"] == "PLAIN"
    assert connection_config(kafka, "smoke")["client.id"].startswith("fraudscore-smoke-")
    # The admin client is built from the same function (it accepts the properties without a broker).
    admin_client(KafkaSettings(bootstrap_servers="127.0.0.1:1", client={"socket.timeout.ms": 100}))


def test_docker_prometheus_scrapes_what_the_stack_generator_scrapes_and_compose_runs_each_job() -> None:
    """deploy/prometheus.yml (Docker) and scripts/stack.sh's generated targets name the same
    jobs and addresses for the default settings, and compose runs a process for each job."""
    from workers.cli.stack_env import FEATURES_JOB, GRPC_JOB, WORKER_JOB, scrape_targets

    docker = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus.yml").read_text())
    docker_targets = {
        job["job_name"]: [t for static in job["static_configs"] for t in static["targets"]]
        for job in docker["scrape_configs"]
    }
    assert docker_targets == scrape_targets(MetricsSettings(), GrpcSettings())
    services = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    commands = {name: service.get("command") for name, service in services.items()}
    assert commands["worker"] == ["fraudscore", "serve"], "fraudscore-worker scrapes metrics.port"
    assert commands["grpc"] == ["fraudscore", "grpc"], "fraudscore-grpc scrapes metrics.grpc_port"
    assert commands["features"] == ["fraudscore", "features", "stream"], (
        "fraudscore-features scrapes metrics.stream_port"
    )
    assert docker_targets[FEATURES_JOB] == [f"127.0.0.1:{MetricsSettings().stream_port}"]
    assert set(docker_targets) == {WORKER_JOB, GRPC_JOB, FEATURES_JOB}
    # The job runs with the image and the addresses of the worker, its state on a volume.
    features, worker = services["features"], services["worker"]
    assert features["build"] == worker["build"] and features["network_mode"] == worker["network_mode"]
    assert {k: v for k, v in features["environment"].items() if k in worker["environment"]} == worker["environment"]
    (state_mount,) = features["volumes"]
    assert state_mount.split(":")[1] == features["environment"]["FRAUDSCORE_STREAM__DATA_DIR"]
    # The rules Prometheus loads in Docker are the repository's.
    mounts = services["prometheus"]["volumes"]
    assert "./deploy/prometheus/rules.yml:/etc/prometheus/rules.yml:ro" in mounts
    assert docker["rule_files"] == ["/etc/prometheus/rules.yml"]


def test_generated_prometheus_setup_has_a_target_per_grpc_process_and_the_feature_job(tmp_path: Path) -> None:
    from workers.cli.stack_env import (
        FEATURES_JOB,
        GRPC_JOB,
        RULES_FILE,
        WORKER_JOB,
        scrape_targets,
        write_prometheus_setup,
    )

    targets = scrape_targets(MetricsSettings(port=49108, grpc_port=49110, stream_port=49120), GrpcSettings(processes=3))
    assert targets == {
        WORKER_JOB: ["127.0.0.1:49108"],
        GRPC_JOB: [f"127.0.0.1:{p}" for p in (49110, 49111, 49112)],
        FEATURES_JOB: ["127.0.0.1:49120"],
    }
    config = yaml.safe_load(write_prometheus_setup(tmp_path, targets, [RULES_FILE]).read_text())
    assert config["rule_files"] == [str(RULES_FILE)]
    assert [job["job_name"] for job in config["scrape_configs"]] == [WORKER_JOB, GRPC_JOB, FEATURES_JOB]
    for job in config["scrape_configs"]:
        (files,) = [sd["files"] for sd in job["file_sd_configs"]]
        (written,) = yaml.safe_load(Path(files[0]).read_text())
        assert written["targets"] == targets[job["job_name"]]
