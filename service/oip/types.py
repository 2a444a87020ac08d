"""The Open Inference Protocol's request and response, independent of the wire they came by.

The REST adapter (JSON, binary tensor extension) and the gRPC adapter (``ModelInferRequest``) both build an
:class:`InferRequest` and read an :class:`InferResponse`; everything between (checks, shared memory, batching)
is written once against these types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from service.engine.direct import Span

# OIP datatype names <-> numpy. The encoder takes and gives floating point only; the others are named so an
# input of another type gets a clear "unsupported datatype" rather than "unknown datatype".
DATATYPES: dict[str, np.dtype[Any]] = {"FP16": np.dtype("<f2"), "FP32": np.dtype("<f4")}
KNOWN_DATATYPES: tuple[str, ...] = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32")
KNOWN_DATATYPES += ("INT64", "FP16", "FP32", "FP64", "BF16", "BYTES")


def datatype_of(dtype: np.dtype[Any]) -> str:
    """The OIP name of a numpy dtype the encoder answers in."""
    for name, candidate in DATATYPES.items():
        if candidate == dtype.newbyteorder("<"):
            return name
    raise ValueError(f"no OIP datatype for {dtype}")


@dataclass(frozen=True)
class SharedMemoryRef:
    """A tensor's bytes in a registered shared-memory region (the shared-memory extensions' parameters)."""

    region: str
    offset: int
    byte_size: int


@dataclass
class InputTensor:
    """One input. Exactly one of ``data`` (decoded from JSON, binary bytes or raw gRPC contents) and ``shm``."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | None = None
    shm: SharedMemoryRef | None = None


@dataclass(frozen=True)
class RequestedOutput:
    """An output the client asked for: as binary (``binary_data``), into shared memory, or as JSON."""

    name: str
    binary: bool = False
    shm: SharedMemoryRef | None = None


@dataclass
class InferRequest:
    model: str
    inputs: list[InputTensor]
    version: str | None = None
    id: str | None = None
    outputs: list[RequestedOutput] | None = None  # None: every output, in the transport's default form
    timeout_ms: float | None = None  # the protocol's "timeout" parameter, when given
    binary_default: bool = False  # the request-level "binary_data_output" parameter
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class OutputTensor:
    """One output. ``data`` holds the values unless they were written to ``shm``."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | None = None
    shm: SharedMemoryRef | None = None
    binary: bool = False


@dataclass
class InferResponse:
    model: str
    outputs: list[OutputTensor]
    version: str | None = None
    id: str | None = None
    queue_s: float = 0.0
    compute_s: float = 0.0


class SharedMemory(Protocol):
    """What the OIP data plane needs of the shared-memory registry (``service.shm``): bounds-checked views.

    Both raise the domain errors of :mod:`service.errors` (InvalidInput, NotFound) for an unknown region, a
    range past the region or a byte size that does not match ``shape`` x ``dtype``. A view keeps its mapping
    alive, so unregistering a region while a request uses it is safe.
    """

    def input_array(self, ref: SharedMemoryRef, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
        """A read-only view of the input's bytes in the region."""
        ...

    def output_array(self, ref: SharedMemoryRef, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
        """A writable view where the output's values go."""
        ...

    def input_span(self, ref: SharedMemoryRef, dtype: np.dtype[Any], shape: tuple[int, ...]) -> Span:
        """:meth:`input_array` with its region and offset, for an engine that reads the region itself."""
        ...

    def output_span(self, ref: SharedMemoryRef, dtype: np.dtype[Any], shape: tuple[int, ...]) -> Span:
        """:meth:`output_array` with its region and offset, for an engine that writes the region itself."""
        ...
