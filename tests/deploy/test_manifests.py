"""Every manifest in deploy/k8s/ is valid for a named Kubernetes version (kubernetes-validate, strict: unknown
fields fail too), and every kind is either validated that way or a custom resource checked field by field."""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest

from tests.deploy.conftest import K8S, KUBERNETES_VERSION, KUSTOMIZATIONS, REPO, Manifest, all_resources, kustomization

BUILT_IN = {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
# No schema in kubernetes-validate: their controllers' fields are checked in test_custom_resources.py.
CUSTOM = {"PodMonitor", "ServingRuntime", "InferenceService"}


def validate(doc: Manifest) -> str:
    return str(kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True))


def built_in() -> list[tuple[Path, Manifest]]:
    return [(path, doc) for path, doc in all_resources() if doc["kind"] in BUILT_IN]


@pytest.mark.parametrize(("path", "doc"), built_in(), ids=[f"{p.relative_to(K8S)}:{d['kind']}" for p, d in built_in()])
def test_manifest_is_valid_kubernetes(path: Path, doc: Manifest) -> None:
    try:
        # The schema actually used: the newest one not newer than the version asked for.
        assert validate(doc) == KUBERNETES_VERSION
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{path.relative_to(REPO)} ({doc['kind']}) is not valid Kubernetes {KUBERNETES_VERSION}: {exc}")


def test_every_kind_is_checked() -> None:
    kinds = {doc["kind"] for _, doc in all_resources()}
    assert kinds == BUILT_IN | CUSTOM, "a new kind must be validated here or checked in test_custom_resources.py"


def test_kustomizations_list_every_manifest() -> None:
    for directory in KUSTOMIZATIONS:
        listed = set(kustomization(directory)["resources"])
        present = {path.name for path in directory.glob("*.yaml")} - {"kustomization.yaml"}
        assert listed == present, f"{directory.relative_to(REPO)}/kustomization.yaml vs its files"


def test_strict_validation_rejects_mistakes() -> None:
    """The validator really reads the manifests: a misspelt field and a wrong type both fail."""
    deployment = next(doc for _, doc in all_resources() if doc["kind"] == "Deployment")
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = misspelt["spec"]["template"]["spec"][
        "containers"
    ][0].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinessProbes"):
        validate(misspelt)
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "60"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(wrong_type)
    hpa = copy.deepcopy(next(doc for _, doc in all_resources() if doc["kind"] == "HorizontalPodAutoscaler"))
    hpa["apiVersion"] = "autoscaling/v1"  # v1 has no `metrics`
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(hpa)
