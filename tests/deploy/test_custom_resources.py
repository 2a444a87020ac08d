"""Custom resources that no schema validates here, checked for what their controllers need: the Prometheus
Operator's PodMonitor, prometheus-adapter's rules (the autoscaler's metric) and KServe's ServingRuntime and
InferenceService. Metric names must exist in service/metrics.py, flags in service/settings.py."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.__main__ import parse_settings
from service.metrics import Metrics
from tests.deploy.conftest import K8S, REPO, Manifest, by_name, kustomization, one, selects
from tests.docker.conftest import require_tool

ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
KSERVE = K8S / "kserve"


@pytest.fixture(scope="module")
def exported_series() -> set[str]:
    """Every series name the service's /metrics can carry (a counter's ``_total`` included)."""
    registry = Metrics(multiprocess_mode=False).registry
    return {sample.name for family in registry.collect() for sample in family.samples} | {
        family.name for family in registry.collect()
    }


@pytest.fixture(scope="module")
def adapter_rules() -> list[dict[str, Any]]:
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    assert values["prometheus"]["url"].startswith("http")
    rules: list[dict[str, Any]] = values["rules"]["custom"]
    return rules


def series_name(series_query: str) -> str:
    match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\}", series_query)
    assert match is not None, f"seriesQuery must be `name{{labels}}`: {series_query!r}"
    return match.group(1)


# ---------------------------------------------------------------------------------------------------------
# Prometheus Operator


def test_pod_monitor_scrapes_the_pods(pod_labels: dict[str, str], container: Manifest) -> None:
    monitor = one("PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert selects(monitor["spec"]["selector"]["matchLabels"], pod_labels)
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {port["name"] for port in container["ports"]}
    assert endpoint["path"] == "/metrics"
    assert '@router.get("/metrics"' in (REPO / "service" / "api" / "routes.py").read_text()


def test_pod_monitor_job_is_the_one_the_rules_select() -> None:
    """docker/prometheus/'s rules, alerts and dashboard select job="encoder"; the cluster's data must match."""
    (endpoint,) = one("PodMonitor")["spec"]["podMetricsEndpoints"]
    jobs = [r["replacement"] for r in endpoint.get("relabelings", []) if r.get("targetLabel") == "job"]
    scrape = yaml.safe_load((REPO / "docker" / "prometheus" / "prometheus.yml").read_text())
    assert jobs == ["encoder"] and "encoder" in {job["job_name"] for job in scrape["scrape_configs"]}
    rules = (REPO / "docker" / "prometheus" / "rules.yml").read_text()
    assert 'job="encoder"' in rules
    # prometheus-adapter maps these two labels to pods: nothing may rewrite them.
    assert not {r.get("targetLabel") for r in endpoint.get("relabelings", [])} & {"namespace", "pod"}


# ---------------------------------------------------------------------------------------------------------
# prometheus-adapter and the HorizontalPodAutoscaler


def test_adapter_rules_read_metrics_the_service_exports(
    adapter_rules: list[dict[str, Any]], exported_series: set[str]
) -> None:
    assert adapter_rules
    for rule in adapter_rules:
        name = series_name(rule["seriesQuery"])
        assert name in exported_series, f"{name} is not a metric of service/metrics.py"
        assert re.search(rule["name"]["matches"], name), rule["name"]
        # per pod: the adapter needs the namespace and pod labels mapped to those resources
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        assert 'namespace!=""' in rule["seriesQuery"] and 'pod!=""' in rule["seriesQuery"]
        for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            assert placeholder in rule["metricsQuery"], placeholder


def test_adapter_queries_are_valid_promql(adapter_rules: list[dict[str, Any]], tmp_path: Path) -> None:
    """promtool parses each query as the adapter sends it (placeholders filled in as the adapter does)."""
    fill = {"<<.Series>>": "", "<<.LabelMatchers>>": 'namespace="default",pod=~"encoder-a|encoder-b"'}
    fill["<<.GroupBy>>"] = "pod"
    records = []
    for index, rule in enumerate(adapter_rules):
        query = rule["metricsQuery"].replace("<<.Series>>", series_name(rule["seriesQuery"]))
        for placeholder, value in fill.items():
            query = query.replace(placeholder, value)
        records += [{"record": f"adapter:query{index}", "expr": query}]
        records += [{"record": f"adapter:series{index}", "expr": rule["seriesQuery"]}]
    rules = tmp_path / "adapter-rules.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": records}]}))
    result = subprocess.run(
        [require_tool("promtool"), "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_autoscaler_metric_is_served_by_the_adapter(adapter_rules: list[dict[str, Any]]) -> None:
    served = {rule["name"]["as"] for rule in adapter_rules}
    for metric in one("HorizontalPodAutoscaler")["spec"]["metrics"]:
        assert metric["type"] == "Pods"
        assert metric["pods"]["metric"]["name"] in served
        assert metric["pods"]["target"]["type"] == "AverageValue"


def test_queue_depth_is_a_per_pod_gauge_summed_over_workers() -> None:
    """The HPA averages one value per pod: the gauge must add up a pod's workers, not report one of them."""
    gauge = Metrics(multiprocess_mode=False).queue_depth
    assert gauge._type == "gauge" and gauge._multiprocess_mode == "livesum"


# ---------------------------------------------------------------------------------------------------------
# KServe


@pytest.fixture(scope="module")
def runtime() -> Manifest:
    return one("ServingRuntime", KSERVE)


@pytest.fixture(scope="module")
def inference_service() -> Manifest:
    return one("InferenceService", KSERVE)


def test_inference_service_uses_the_runtime(runtime: Manifest, inference_service: Manifest) -> None:
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert inference_service["apiVersion"] == "serving.kserve.io/v1beta1"
    model = inference_service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {fmt["name"] for fmt in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] == "v2" and "v2" in runtime["spec"]["protocolVersions"]
    assert model["storageUri"].startswith(("pvc://", "s3://", "gs://", "https://"))
    assert model["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_runtime_args_are_service_flags(runtime: Manifest, inference_service: Manifest) -> None:
    """The args parse as `encoder-serve` flags, with KServe's {{.Name}} filled in as KServe does."""
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"
    name = inference_service["metadata"]["name"]
    args = [arg.replace("{{.Name}}", name) for arg in container["args"]]
    try:
        settings = parse_settings(args)
    except SystemExit:  # argparse has printed which flag it does not know (renamed in service/settings.py?)
        pytest.fail(f"the ServingRuntime's args are not flags of encoder-serve: {args}", pytrace=False)
    assert str(settings.model_dir) == "/mnt/models"  # where KServe mounts the model
    assert settings.model_dump()["model_name"] == name  # /v2/models/<the InferenceService's name>
    assert settings.port == 8080 and settings.provider == "cuda"
    assert settings.grpc_port == 9000  # KServe's gRPC port
    port = by_name(container["ports"], "http1")["containerPort"]
    assert port == settings.port
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == settings.port
    annotations = runtime["spec"]["annotations"]
    assert annotations["prometheus.kserve.io/port"] == str(settings.port)
    assert annotations["prometheus.kserve.io/path"] == "/metrics"


def test_runtime_uses_the_image_and_its_user(runtime: Manifest, deployment: Manifest) -> None:
    (container,) = runtime["spec"]["containers"]
    assert container["image"] == deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert {image["name"] for image in kustomization(KSERVE)["images"]} == {container["image"]}
    pod = deployment["spec"]["template"]["spec"]["securityContext"]
    assert container["securityContext"]["runAsUser"] == pod["runAsUser"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
