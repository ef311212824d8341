"""deploy/k8s: the rendered manifests pass kubeconform -strict against schemas generated from
Kubernetes' own OpenAPI spec and KEDA's CRD (both from the Go module proxy; scripts/tools.sh),
and agree with the settings and the code (probe paths, ports, drain times, partitions)."""

from __future__ import annotations

import subprocess
import tomllib
from functools import cache
from pathlib import Path

import pytest
import yaml

from workers.settings import REPO_ROOT, GrpcSettings, KafkaSettings, MetricsSettings

K8S = REPO_ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = [K8S / "base", K8S / "overlays" / "production"]
# The worker's SIGTERM path: drain up to 30 s, then flush the producer up to 10 s (kafka/worker.py).
WORKER_DRAIN_S = 30 + 10


@cache
def tool(name: str) -> str:
    built = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "tools.sh"), name],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if built.returncode == 3:
        pytest.skip(
            f"Go is not installed: {name} cannot be built from the Go module proxy, "
            "so the Kubernetes manifests are not validated"
        )
    assert built.returncode == 0, f"scripts/tools.sh {name} failed:\n{built.stderr[-2000:]}"
    return built.stdout.strip()


def render(kustomization: Path) -> str:
    return subprocess.run(
        [tool("kustomize"), "build", str(kustomization)], capture_output=True, text=True, check=True, timeout=120
    ).stdout


def kubeconform(manifests: str) -> subprocess.CompletedProcess:
    location = f"{tool('k8s-schemas')}/{{{{ .ResourceKind }}}}{{{{ .KindSuffix }}}}.json"
    return subprocess.run(
        [tool("kubeconform"), "-strict", "-summary", "-schema-location", location, "-"],
        input=manifests,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def objects(manifests: str) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(manifests) if o}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_rendered_manifests_pass_kubeconform_strict(kustomization: Path) -> None:
    result = kubeconform(render(kustomization))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Invalid: 0, Errors: 0, Skipped: 0" in result.stdout, result.stdout


def test_kubeconform_with_these_schemas_rejects_a_misspelt_field_and_a_wrong_type() -> None:
    """The schemas are strict and real: the check above can fail."""
    manifests = render(KUSTOMIZATIONS[-1])
    misspelt = kubeconform(manifests.replace("livenessProbe:", "livenesProbe:", 1))
    assert misspelt.returncode != 0 and "additional properties 'livenesProbe' not allowed" in misspelt.stdout
    wrong_type = kubeconform(manifests.replace("maxReplicaCount: 6", "maxReplicaCount: six", 1))
    assert wrong_type.returncode != 0 and "maxReplicaCount" in wrong_type.stdout


def _assert_probes_and_resources(container: dict, metrics: MetricsSettings) -> None:
    """/livez and /readyz on the metrics port, and requests and limits sized."""
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["startupProbe"]["httpGet"]["path"] == "/livez"
    # Liveness must not fire inside one legitimate stall.
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= metrics.loop_stall_s
    assert "memory" in container["resources"]["limits"] and container["resources"]["requests"]["cpu"]


def _container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_manifests_agree_with_the_settings_and_the_code() -> None:
    rendered = objects(render(KUSTOMIZATIONS[-1]))
    metrics, grpc, kafka = MetricsSettings(), GrpcSettings(), KafkaSettings()
    worker, server = rendered[("Deployment", "fraudscore-worker")], rendered[("Deployment", "fraudscore-grpc")]
    for deployment, metrics_port in ((worker, metrics.port), (server, metrics.grpc_port)):
        container = _container(deployment)
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert ports["metrics"] == metrics_port
        _assert_probes_and_resources(container, metrics)
    assert {p["name"]: p["containerPort"] for p in _container(server)["ports"]}["grpc"] == grpc.port

    # Graceful termination outlasts the drain.
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > WORKER_DRAIN_S
    pre_stop = _container(server)["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert server["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > pre_stop + grpc.grace_period_s

    # Settings in the pods: listeners reachable from outside the pod, one process per pod.
    config = rendered[("ConfigMap", "fraudscore-config")]
    toml = tomllib.loads(config["data"]["fraudscore.toml"])
    assert toml["metrics"]["host"] == "0.0.0.0" and toml["grpc"]["host"] == "0.0.0.0"
    assert toml["grpc"]["processes"] == 1, "the pod exposes one metrics port: scale with replicas"

    # KEDA scales the worker on this group's lag, never past the partitions.
    scaled = rendered[("ScaledObject", "fraudscore-worker")]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["consumerGroup"] == kafka.group_id
    assert trigger["metadata"]["topic"] == kafka.transactions_topic
    assert trigger["metadata"]["bootstrapServers"] == toml["kafka"]["bootstrap_servers"]
    assert scaled["spec"]["maxReplicaCount"] <= kafka.transactions_partitions
    assert scaled["spec"]["scaleTargetRef"]["name"] == "fraudscore-worker"

    # gRPC: a headless Service (client-side balancing of long-lived streams), HPA on CPU.
    service = rendered[("Service", "fraudscore-grpc")]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == server["spec"]["selector"]["matchLabels"]
    hpa = rendered[("HorizontalPodAutoscaler", "fraudscore-grpc")]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "fraudscore-grpc"

    for name, deployment in (("fraudscore-worker", worker), ("fraudscore-grpc", server)):
        pdb = rendered[("PodDisruptionBudget", name)]
        assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
        assert deployment["metadata"]["namespace"] == "fraud"


def test_feature_job_manifests_agree_with_the_settings_and_the_code() -> None:
    from workers.settings import Settings, StreamSettings
    from workers.stream.topology import build_app

    rendered = objects(render(KUSTOMIZATIONS[-1]))
    metrics, stream = MetricsSettings(), StreamSettings()
    job = rendered[("StatefulSet", "fraudscore-features")]
    container = _container(job)
    assert container["command"] == ["fraudscore", "features", "stream"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"metrics": metrics.stream_port}
    annotations = job["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(metrics.stream_port)
    _assert_probes_and_resources(container, metrics)

    # Production state: rocksdb on the pod's own volume, the pod name as static membership.
    env = {e["name"]: e for e in container["env"]}
    assert env["FRAUDSCORE_STREAM__STORE"]["value"] == "rocksdb"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert env["FRAUDSCORE_STREAM__DATA_DIR"]["value"] == mounts["state"]
    assert [t["metadata"]["name"] for t in job["spec"]["volumeClaimTemplates"]] == ["state"]
    assert env["FRAUDSCORE_STREAM__INSTANCE_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert job["spec"]["replicas"] <= stream.partitions, "a replica past stream.partitions idles"

    # SIGTERM: a last store write (one retry interval at most) and a last offset commit, bounded
    # by faust's broker request timeout (a static member sends no LeaveGroup); the grace period
    # outlasts them, but stays short enough that a node drain is not held for minutes.
    conf = build_app(Settings(stream=stream)).conf
    shutdown_s = stream.retry_max_s + conf.broker_commit_interval + conf.broker_request_timeout
    grace = job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert shutdown_s < grace <= 120, (shutdown_s, grace)

    # The governing Service (stable pod names) and the disruption budget select these pods.
    selector = job["spec"]["selector"]["matchLabels"]
    assert job["spec"]["template"]["metadata"]["labels"] == selector
    service = rendered[("Service", "fraudscore-features")]
    assert job["spec"]["serviceName"] == "fraudscore-features" and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == selector
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["metrics"]
    pdb = rendered[("PodDisruptionBudget", "fraudscore-features")]
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    assert pdb["spec"]["maxUnavailable"] == 1
    assert job["metadata"]["namespace"] == "fraud"
