"""What the Deployment, Service, PodDisruptionBudget and HorizontalPodAutoscaler need from each other, from the
image (Dockerfile) and from the service (settings, endpoints): a renamed setting or port breaks these tests."""

from __future__ import annotations

import re

import pytest

from service.settings import ENV_PREFIX, Settings
from tests.deploy.conftest import (
    K8S,
    REPO,
    SELECTOR,
    Manifest,
    by_name,
    env_of,
    kustomization,
    one,
    selects,
)

DOCKERFILE = (REPO / "Dockerfile").read_text()


def test_env_vars_are_settings_that_parse(container: Manifest, monkeypatch: pytest.MonkeyPatch) -> None:
    env = env_of(container)
    names = [name for name in env if name.startswith(ENV_PREFIX)]
    assert names, "the Deployment configures the service through ENCODER_* variables"
    unknown = [name for name in names if name.removeprefix(ENV_PREFIX).lower() not in Settings.model_fields]
    assert unknown == [], f"not settings of service/settings.py (renamed?): {unknown}"
    for name in list(Settings.model_fields):
        monkeypatch.delenv(ENV_PREFIX + name.upper(), raising=False)
    for name in names:
        monkeypatch.setenv(name, env[name])
    settings = Settings()  # the values parse and pass the settings' own validation
    assert settings.provider == "cuda", "a GPU pod must not quietly run on the CPU"


def test_selectors_match_the_pods(deployment: Manifest, pod_labels: dict[str, str]) -> None:
    assert deployment["spec"]["selector"]["matchLabels"] == SELECTOR
    assert selects(SELECTOR, pod_labels)
    assert selects(one("Service")["spec"]["selector"], pod_labels)
    assert selects(one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)


def test_ports_match_the_settings_and_the_service(container: Manifest) -> None:
    env = env_of(container)
    ports = container["ports"]
    assert by_name(ports, "http")["containerPort"] == int(env.get("ENCODER_PORT", Settings().port))
    assert by_name(ports, "grpc")["containerPort"] == int(env["ENCODER_GRPC_PORT"])
    service_ports = one("Service")["spec"]["ports"]
    assert {port["name"] for port in service_ports} == {"http", "grpc"}
    for port in service_ports:
        assert port["targetPort"] in {p["name"] for p in ports}, port
    assert by_name(service_ports, "http")["appProtocol"] == "http"
    assert by_name(service_ports, "grpc")["appProtocol"] == "kubernetes.io/h2c"  # gRPC without TLS


def test_probes_use_the_service_endpoints(container: Manifest) -> None:
    names = {port["name"] for port in container["ports"]}
    paths = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert paths["readinessProbe"]["path"] == "/readyz"
    assert paths["livenessProbe"]["path"] == "/healthz"
    assert paths["startupProbe"]["path"] == "/readyz"  # started = converted and warmed up
    assert all(get["port"] in names for get in paths.values())
    routes = (REPO / "service" / "api" / "routes.py").read_text()
    assert '@router.get("/readyz"' in routes and '@router.get("/healthz"' in routes


def test_startup_probe_allows_conversion_and_warm_up(container: Manifest) -> None:
    """At least the image's own HEALTHCHECK start period, which allows for the first start's conversion."""
    start_period = re.search(r"--start-period=(\d+)s", DOCKERFILE)
    assert start_period is not None
    probe = container["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 2 * int(start_period.group(1))


def test_termination_grace_covers_the_drain(deployment: Manifest, container: Manifest) -> None:
    """preStop, then SIGTERM: the drain window, then the wait for accepted requests, all before SIGKILL."""
    env = env_of(container)
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(env["ENCODER_DRAIN_S"])
    graceful = float(env["ENCODER_GRACEFUL_TIMEOUT_S"])
    assert drain > 0, "readiness must turn 503 while the pod still serves"
    needed = float(pre_stop[1]) + drain + graceful
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= needed + 10


def test_one_gpu_per_pod(container: Manifest) -> None:
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1


def test_runs_as_the_image_user(deployment: Manifest, container: Manifest) -> None:
    user = re.search(r"^USER (\d+):(\d+)$", DOCKERFILE, re.MULTILINE)
    assert user is not None
    pod = deployment["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert (pod["runAsUser"], pod["runAsGroup"]) == (int(user.group(1)), int(user.group(2)))
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_writable_places_are_volumes(deployment: Manifest, container: Manifest) -> None:
    """Read-only root: the models directory and /tmp (engine socket, worker metrics) are volumes."""
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"] for volume in deployment["spec"]["template"]["spec"]["volumes"]}
    assert set(mounts.values()) <= volumes
    env = env_of(container)
    assert env.get("ENCODER_MODEL_DIR", env["ENCODER_CACHE_DIR"]) in mounts
    assert "/tmp" in mounts
    assert 'VOLUME ["/models"]' in DOCKERFILE and "/models" in mounts


def test_image_is_the_one_kustomize_sets(container: Manifest) -> None:
    images = {image["name"] for image in kustomization(K8S)["images"]}
    assert container["image"] in images
    assert f"-t {container['image']} ." in DOCKERFILE  # the name the Dockerfile's build line gives it


def test_autoscaler_targets_the_deployment(deployment: Manifest) -> None:
    hpa = one("HorizontalPodAutoscaler")["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
    assert target["name"] == deployment["metadata"]["name"]
    assert hpa["minReplicas"] >= 2, "with one pod the disruption budget would block every drain"
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    assert [metric["type"] for metric in hpa["metrics"]] == ["Pods"]


def test_keep_alive_outlasts_proxy_idle_timeouts(container: Manifest) -> None:
    # An idle connection must be closed by the proxy (ingress-nginx, cloud load balancers: 60-75 s), never by the
    # service, or a request sent on it at that instant gets a reset.
    assert float(env_of(container)["ENCODER_KEEP_ALIVE_S"]) > 75
