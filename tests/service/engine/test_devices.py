"""``--devices``: parsing, resolving to engine processes pinned to their GPU, and when engine processes are used."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from service.engine.devices import Device, local_label, resolve, uses_engine_processes
from service.settings import Settings


def settings(**values: Any) -> Settings:
    return Settings(**values)


@pytest.mark.parametrize("value", ["all", "cpu", "cpu:3", "0", "0,1", "1,0,3", " 0, 1 "])
def test_valid_device_lists_are_accepted(value: str) -> None:
    assert settings(devices=value).devices == value.replace(" ", "")


@pytest.mark.parametrize("value", ["", "gpu", "0,0", "-1", "cpu:0", "cpu:65", "0;1", "all,0", "cpu,0"])
def test_malformed_device_lists_are_refused(value: str) -> None:
    with pytest.raises(ValidationError, match="devices"):
        settings(devices=value)


def test_all_is_every_gpu_or_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert resolve(settings(), gpu_count=2) == (Device("0", "0"), Device("1", "1"))
    assert resolve(settings(), gpu_count=0) == (Device("cpu", None),)
    assert resolve(settings(provider="cpu"), gpu_count=2) == (Device("cpu", None),)
    # An engine in every worker can use one device only: 'all' means the first GPU then.
    assert resolve(settings(shared_engine="off"), gpu_count=2) == (Device("0", "0"),)


def test_gpu_ordinals_map_through_the_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert resolve(settings(devices="1"), gpu_count=2) == (Device("1", "3"),)
    assert resolve(settings(), gpu_count=2) == (Device("0", "2"), Device("1", "3"))
    with pytest.raises(ValueError, match="GPU 2 does not exist"):
        resolve(settings(devices="0,2"), gpu_count=2)


def test_cpu_engines_and_their_environment() -> None:
    assert resolve(settings(devices="cpu:2")) == (Device("cpu0", None), Device("cpu1", None))
    cpu = Device("cpu", None)
    assert cpu.environment() == {"CUDA_VISIBLE_DEVICES": "", "ENCODER_PROVIDER": "cpu"} and not cpu.on_gpu
    assert Device("1", "5").environment() == {"CUDA_VISIBLE_DEVICES": "5"}


def test_gpus_that_cannot_be_served_are_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(ValueError, match="does not exist: the driver shows 0"):
        resolve(settings(devices="0,1"), gpu_count=0)
    with pytest.raises(ValueError, match="--provider cpu cannot serve on GPUs"):
        resolve(settings(devices="0", provider="cpu"), gpu_count=1)
    # The test-only fake engine runs anywhere: CPU tests name GPUs to check the pinning.
    assert resolve(settings(devices="0,1", engine="fake"), gpu_count=0) == (Device("0", "0"), Device("1", "1"))


@pytest.mark.parametrize(
    ("values", "devices", "shared", "wanted"),
    [
        ({"workers": 1}, ("cpu",), False, False),  # the CPU keeps today's behaviour
        ({"workers": 4}, ("cpu",), False, False),
        ({"workers": 4}, ("0",), True, True),
        ({"workers": 1}, ("0",), True, False),  # one worker on the first GPU: in-process, no hop
        ({"workers": 1}, ("1",), True, True),  # any other single GPU: an engine process pinned to it
        ({"workers": 1}, ("0", "1"), True, True),
        ({"workers": 2}, ("cpu0", "cpu1"), False, True),
    ],
)
def test_when_engine_processes_serve(
    values: dict[str, Any], devices: tuple[str, ...], shared: bool, wanted: bool
) -> None:
    resolved = tuple(Device(d, None if d.startswith("cpu") else d) for d in devices)
    assert uses_engine_processes(settings(**values), resolved, shared) is wanted


def test_several_devices_need_engine_processes() -> None:
    with pytest.raises(ValueError, match="--shared-engine off"):
        resolve(settings(shared_engine="off", devices="cpu:2"))


def test_the_device_label_of_an_in_process_engine() -> None:
    assert local_label(settings(), "CPUExecutionProvider") == "cpu"
    assert local_label(settings(), "fake") == "cpu"
    assert local_label(settings(), "CUDAExecutionProvider") == "0"
    assert local_label(settings(devices="1"), "TensorrtExecutionProvider") == "1"
