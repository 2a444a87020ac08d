"""service.cudashm is transport-neutral: the REST and gRPC adapters both call it, it imports neither."""

from __future__ import annotations

from tests.service.test_imports import SERVICE, violations


def test_the_registry_and_device_layer_import_no_transport() -> None:
    files = sorted((SERVICE / "cudashm").glob("*.py"))
    assert len(files) >= 4
    banned = ("fastapi", "starlette", "grpc", "uvicorn", "onnxruntime", "service.api", "service.oip.rest")
    assert violations(files, banned) == []
