from __future__ import annotations

import pytest

from service.engine import gpu


@pytest.mark.parametrize(
    ("devices", "requested", "expected"), [(0, "auto", "cpu"), (1, "auto", "auto"), (0, "cuda", "cuda")]
)
def test_auto_means_cpu_only_without_a_cuda_device(
    monkeypatch: pytest.MonkeyPatch, devices: int, requested: str, expected: str
) -> None:
    monkeypatch.setattr(gpu, "cuda_device_count", lambda: devices)
    assert gpu.resolve_provider(requested) == expected


def test_device_count_never_raises() -> None:
    assert gpu.cuda_device_count() >= 0
