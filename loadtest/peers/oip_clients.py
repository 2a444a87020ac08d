"""Closed-loop Open Inference Protocol clients for the service benchmark: what they send and how every answer
is checked. They run tritonclient's own HTTP and gRPC clients, with binary tensors or shared memory, against
the service or a real Triton (:mod:`loadtest.peers.oip_loops`), so the comparison is the servers'.

Every answer is checked: its size as the server declares it (``binary_data_size``, the raw output's length,
``shared_memory_byte_size``: a Python-backend model can answer 0 bytes), its shape and dtype, and its values
against a reference computed once for the fixed input: three sequence positions of every sample on every
answer, all values on the first answer and every ``full_every``-th one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from loadtest.peers.loadgen import ClientReport

PROTOCOLS = ("oip-http", "grpc", "shm-http", "shm-grpc", "cuda-shm", "cuda-shm-grpc")
TRITON_DTYPES = {"float16": "FP16", "float32": "FP32"}


@dataclass(frozen=True)
class OipSpec:
    """One request (a (B, S, D) batch), sent again and again, and the answer it must get."""

    protocol: str
    http_url: str  # host:port, as tritonclient takes it
    grpc_url: str
    inputs: np.ndarray
    expected: np.ndarray  # the reference answer, float32, same shape
    model: str = "encoder"
    tolerance: float = 2e-2  # relative L2 error per sample
    full_every: int = 50
    cuda_device: int = 0  # CUDA shared memory: the GPU the client allocates on (the service's ordinal)
    cuda_fake: bool = False  # CUDA shared memory through the service's test-only fake layer (CPU self-test)
    # CUDA shared memory: the values of every n-th answer of a slot are read from the device and checked (each
    # check costs the client process two device operations, during which its other requests wait); every
    # answer's size is checked.
    cuda_check_every: int = 1

    @property
    def samples(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def datatype(self) -> str:
        return TRITON_DTYPES[self.inputs.dtype.name]

    @property
    def nbytes(self) -> int:
        return int(self.inputs.nbytes)


def fixed_inputs(batch: int, seq: int, dim: int, dtype: str = "float16", seed: int = 0) -> np.ndarray:
    """``batch`` different samples; sample 0 is the one the raw /encode load sends (same seed)."""
    rows = [np.random.default_rng(seed).standard_normal((seq, dim))]
    rows += [np.random.default_rng([seed, i]).standard_normal((seq, dim)) for i in range(1, batch)]
    return np.stack(rows).astype(dtype)


def reference_outputs(model_file: str, inputs: np.ndarray, engine_dtype: str, device: str) -> np.ndarray:
    """Each sample run alone through the bundle's ONNX model with plain onnxruntime: the unbatched answers."""
    import onnxruntime as ort

    if device == "cuda":
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        providers = ["CUDAExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    session = ort.InferenceSession(model_file, providers=providers)
    if session.get_providers()[0] != providers[0]:
        raise RuntimeError(f"reference runs on {session.get_providers()[0]}, not {providers[0]}")
    name, out = session.get_inputs()[0].name, session.get_outputs()[0].name
    rows = [session.run([out], {name: x[np.newaxis].astype(engine_dtype)})[0][0] for x in inputs]
    return np.stack(rows).astype(np.float32)


class AnswerCheck:
    """Compares answers with the reference (see the module docstring); a message says what is wrong."""

    def __init__(self, spec: OipSpec) -> None:
        self.spec = spec
        seq = spec.expected.shape[1]
        self.rows = sorted({0, seq // 2, seq - 1})
        self.expected_rows = np.ascontiguousarray(spec.expected[:, self.rows, :])
        self.answers = 0
        self.counts = {"values_full": 0, "values_rows": 0}

    def size(self, declared: int | None) -> str | None:
        if declared != self.spec.nbytes:
            return f"answer size {declared} bytes, expected {self.spec.nbytes}"
        return None

    def __call__(self, out: np.ndarray) -> str | None:
        spec = self.spec
        if out.shape != spec.inputs.shape or out.dtype != spec.inputs.dtype:
            return f"answer {out.dtype}{list(out.shape)}, expected {spec.inputs.dtype}{list(spec.inputs.shape)}"
        self.answers += 1
        full = spec.full_every <= 1 or self.answers % spec.full_every == 1
        got = out.astype(np.float32) if full else out[:, self.rows, :].astype(np.float32)
        want = spec.expected if full else self.expected_rows
        self.counts["values_full" if full else "values_rows"] += 1
        return self.compare(got, want)

    def compare(self, got: np.ndarray, want: np.ndarray) -> str | None:
        """float32 answers (all rows, or the checked ones) against the reference's same rows."""
        spec = self.spec
        if not np.isfinite(got).all():
            return "non-finite values in the answer"
        diff = np.linalg.norm((got - want).reshape(len(got), -1), axis=1)
        err = diff / np.maximum(np.linalg.norm(want.reshape(len(want), -1), axis=1), 1e-12)
        if float(err.max()) > spec.tolerance:
            return f"values differ from the reference: rel L2 {float(err.max()):.3g} > {spec.tolerance:g}"
        return None


class RawAnswerCheck:
    """The raw /encode load's value check: the answer to sample 0 of the fixed input, on the checked rows."""

    def __init__(self, expected: np.ndarray, tolerance: float) -> None:
        seq = expected.shape[0]
        self.shape = expected.shape
        self.rows = sorted({0, seq // 2, seq - 1})
        self.want = np.ascontiguousarray(expected[self.rows], dtype=np.float32)
        self.tolerance = tolerance

    def __call__(self, body: bytes) -> str | None:
        got = np.frombuffer(body, dtype="<f2").reshape(self.shape)[self.rows].astype(np.float32)
        if not np.isfinite(got).all():
            return "non-finite values in the answer"
        err = float(np.linalg.norm(got - self.want) / max(float(np.linalg.norm(self.want)), 1e-12))
        if err > self.tolerance:
            return f"values differ from the reference: rel L2 {err:.3g} > {self.tolerance:g}"
        return None


class Recorder:
    """Counts answers completed inside the measured window, as ``loadgen`` does for the raw clients."""

    def __init__(self, spec: OipSpec, window: tuple[float, float]) -> None:
        self.start, self.stop = window
        self.report = ClientReport()
        self.check = AnswerCheck(spec)

    def inside(self) -> bool:
        return self.start <= time.time() <= self.stop

    def done(self, sent: float, problem: str | None) -> None:
        now = time.time()
        if not self.start <= now <= self.stop:
            return
        if problem:
            self.report.error(problem)
            return
        self.report.ok += 1
        self.report.latencies_ms.append((now - sent) * 1e3)

    def failed(self, exc: Exception) -> None:
        if self.inside():
            self.report.error(message(exc))

    def finish(self) -> ClientReport:
        self.report.checks = dict(self.check.counts)
        return self.report


def message(exc: BaseException) -> str:
    """``str(exc)``, short; tritonclient's exception cannot always print itself (an answer not in its format)."""
    try:
        text = str(exc)
    except Exception:
        text = repr(getattr(exc, "_msg", None))
    return f"{type(exc).__name__}: {text[:160]}"


def declared_bytes(spec: OipSpec, datatype: str, shape: list[int], byte_size: int | None) -> int | None:
    """A shared-memory answer's size as the server declares it: the byte size where it says one (the
    service does), else its shape and datatype (Triton answers only those)."""
    if datatype != spec.datatype:
        return None
    return byte_size if byte_size is not None else int(np.prod(shape)) * spec.inputs.dtype.itemsize
