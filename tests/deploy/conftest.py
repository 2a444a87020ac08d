"""The Kubernetes manifests of deploy/k8s/, loaded the way kustomize reads them (a kustomization's resources)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
KUSTOMIZATIONS = (K8S, K8S / "kserve")
KUBERNETES_VERSION = "1.31"  # the version the manifests are validated against (README says so too)
SELECTOR = {"app.kubernetes.io/name": "encoder-service", "app.kubernetes.io/instance": "encoder"}

Manifest = dict[str, Any]


def kustomization(directory: Path) -> Manifest:
    doc: Manifest = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return doc


def resources(directory: Path) -> Iterator[tuple[Path, Manifest]]:
    """Every document of every file a kustomization lists, in order."""
    for name in kustomization(directory)["resources"]:
        path = directory / name
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                yield path, doc


def all_resources() -> list[tuple[Path, Manifest]]:
    return [item for directory in KUSTOMIZATIONS for item in resources(directory)]


def one(kind: str, directory: Path = K8S) -> Manifest:
    found = [doc for _, doc in resources(directory) if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in {directory.relative_to(REPO)}, found {len(found)}"
    return found[0]


def by_name(items: list[Manifest], name: str) -> Manifest:
    found = [item for item in items if item["name"] == name]
    assert len(found) == 1, f"expected one entry named {name!r} in {[item['name'] for item in items]}"
    return found[0]


@pytest.fixture(scope="module")
def deployment() -> Manifest:
    return one("Deployment")


@pytest.fixture(scope="module")
def container(deployment: Manifest) -> Manifest:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    found: Manifest = containers[0]
    return found


@pytest.fixture(scope="module")
def pod_labels(deployment: Manifest) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def env_of(container: Manifest) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """A matchLabels selector picks a pod with these labels (and selects something at all)."""
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())
