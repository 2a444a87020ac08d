"""The device layer: the CUDA runtime binding's calls and error paths (against a stand-in for libcudart, since CI
has no GPU), the fake layer, and which device ids a process serves."""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
import pytest

from service.cudashm.device import CudaDeviceMemory, HandleError, WrongDevice, device_memory
from service.cudashm.devices import device_map
from service.cudashm.fake import FakeDeviceMemory
from service.errors import InvalidInput
from service.settings import Settings


class StubRuntime:
    """The libcudart functions CudaDeviceMemory calls, recording them; ``attributes`` is (memory type, device)."""

    def __init__(self, open_code: int = 0, attributes: tuple[int, int] = (2, 0), devices: int = 2) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.open_code, self.attributes, self.devices = open_code, attributes, devices
        self.memory = ctypes.create_string_buffer(1024)  # plays the mapped allocation
        for name in ("cudaGetLastError", "cudaStreamSynchronize", "cudaGetErrorString"):
            setattr(self, name, self._record(name))

    def _record(self, name: str) -> Any:
        def call(*args: Any) -> Any:
            self.calls.append((name, args))
            return b"stub error" if name == "cudaGetErrorString" else 0

        return _Function(call)

    def __getattr__(self, name: str) -> Any:
        method = {
            "cudaGetDeviceCount": self._count,
            "cudaSetDevice": lambda device: self.calls.append(("set", device)) or 0,
            "cudaIpcOpenMemHandle": self._open,
            "cudaIpcCloseMemHandle": lambda pointer: self.calls.append(("close", pointer)) or 0,
            "cudaPointerGetAttributes": self._attributes,
            "cudaMemcpy": self._copy,
        }[name]
        function = _Function(method)
        object.__setattr__(self, name, function)
        return function

    def _count(self, out: Any) -> int:
        out._obj.value = self.devices
        return 0

    def _open(self, pointer: Any, handle: Any, flags: int) -> int:
        self.calls.append(("open", (ctypes.string_at(ctypes.addressof(handle), 64), flags)))
        if self.open_code:
            return self.open_code
        pointer._obj.value = ctypes.addressof(self.memory)
        return 0

    def _attributes(self, buffer: Any, address: int) -> int:
        ctypes.memmove(buffer, np.array(self.attributes, np.int32).tobytes(), 8)
        return 0

    def _copy(self, dst: int, src: int, nbytes: int, kind: int) -> int:
        self.calls.append(("copy", kind))
        ctypes.memmove(dst, src, nbytes)
        return 0


class _Function:
    """A callable that takes ctypes' ``argtypes``/``restype`` like a foreign function."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.argtypes, self.restype = fn, None, None

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


def runtime(stub: StubRuntime) -> CudaDeviceMemory:
    memory = CudaDeviceMemory(stub)  # type: ignore[arg-type]
    memory._allocation_bytes = lambda address: 1024  # type: ignore[method-assign]  # the driver API call
    return memory


def test_open_passes_the_handle_by_value_with_lazy_peer_access_and_checks_the_device() -> None:
    stub = StubRuntime(devices=2)
    memory = runtime(stub)
    assert memory.device_count() == 2
    handle = bytes(range(64))
    pointer, size = memory.open(handle, 0)
    assert (pointer, size) == (ctypes.addressof(stub.memory), 1024)
    assert ("open", (handle, 1)) in stub.calls and ("set", 0) in stub.calls
    host = np.arange(8, dtype=np.float32)
    memory.from_host(pointer + 16, host, 0)
    back = np.empty(8, np.float32)
    memory.to_host(back, pointer + 16, 0)
    np.testing.assert_array_equal(back, host)
    assert [kind for name, kind in stub.calls if name == "copy"] == [1, 2]  # host to device, device to host
    memory.close(pointer, 0)
    assert ("close", pointer) in stub.calls


def test_a_handle_that_does_not_open_is_a_handle_error() -> None:
    memory = runtime(StubRuntime(open_code=400))
    with pytest.raises(HandleError, match="stale"):
        memory.open(b"\0" * 64, 0)
    with pytest.raises(InvalidInput, match="64 bytes"):
        memory.open(b"\0" * 8, 0)


def test_memory_on_another_device_is_closed_again_and_refused() -> None:
    stub = StubRuntime(attributes=(2, 1))
    with pytest.raises(WrongDevice) as info:
        runtime(stub).open(b"\0" * 64, 0)
    assert info.value.actual == 1 and any(name == "close" for name, _ in stub.calls)
    stub = StubRuntime(attributes=(1, 0))  # host memory
    with pytest.raises(HandleError, match="does not name device memory"):
        runtime(stub).open(b"\0" * 64, 0)


def test_the_layer_is_chosen_by_name_never_by_fallback() -> None:
    assert isinstance(device_memory("fake"), FakeDeviceMemory)
    with pytest.raises(ValueError, match="unknown"):
        device_memory("auto")


@pytest.mark.parametrize(
    ("devices", "count", "expected"),
    [
        ("0", 2, {0: 0}),
        ("0,1", 2, {0: 0, 1: 1}),
        ("1", 2, {1: 1}),  # a worker that sees every GPU
        ("1", 1, {1: 0}),  # --shared-engine off: the worker sees its one GPU only
        ("all", 3, {0: 0, 1: 1, 2: 2}),
    ],
)
def test_device_ids_map_to_this_processs_ordinals(devices: str, count: int, expected: dict[int, int]) -> None:
    assert device_map(Settings(devices=devices), FakeDeviceMemory(devices=count)) == expected


def test_cpu_serving_has_no_cuda_devices_except_with_the_fake_layer() -> None:
    assert device_map(Settings(devices="cpu"), FakeDeviceMemory()) == {0: 0}
    stub = runtime(StubRuntime(devices=0))
    with pytest.raises(ValueError, match="serves the CPU"):
        device_map(Settings(devices="cpu"), stub)
    with pytest.raises(ValueError, match="needs a GPU"):
        device_map(Settings(devices="all"), stub)
    with pytest.raises(ValueError, match="GPU 2 is not among"):
        device_map(Settings(devices="0,2"), FakeDeviceMemory(devices=2))


def test_settings_accept_cuda_and_both_kinds() -> None:
    assert Settings(shared_memory="cuda").shared_memory_kinds == {"cuda"}
    assert Settings(shared_memory="system, CUDA").shared_memory_kinds == {"system", "cuda"}
    with pytest.raises(ValueError, match="comma list of system, cuda"):
        Settings(shared_memory="gpu")
