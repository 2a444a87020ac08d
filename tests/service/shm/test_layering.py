"""service.shm is transport-neutral: the REST and gRPC adapters both call it, it imports neither."""

from __future__ import annotations

from tests.service.test_imports import SERVICE, violations


def test_the_registry_imports_no_transport() -> None:
    files = sorted((SERVICE / "shm").glob("*.py"))
    assert len(files) >= 3
    banned = ("fastapi", "starlette", "grpc", "uvicorn", "onnxruntime", "service.api", "service.oip.rest")
    assert violations(files, banned) == []
