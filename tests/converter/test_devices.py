from __future__ import annotations

from converter.devices import cuda_device_count


def test_device_count_never_raises() -> None:
    assert cuda_device_count() >= 0
