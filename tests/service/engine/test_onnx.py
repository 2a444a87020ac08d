from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from converter.pinned import CudaError
from service.engine.base import Engine, EngineUnrecoverable, batch_buckets
from service.engine.cuda_errors import is_sticky_cuda_error
from service.engine.onnx import OnnxEngine, served_seq_lens
from tests.service.conftest import SMALL_DIMS, SMALL_MAX_SEQ_LEN


def test_batch_buckets_are_powers_of_two_then_the_maximum() -> None:
    assert batch_buckets(1) == (1,)
    assert batch_buckets(8) == (1, 2, 4, 8)
    assert batch_buckets(12) == (1, 2, 4, 8, 12)


def test_served_seq_lens_fit_the_bundle() -> None:
    assert served_seq_lens((196, 64, 64), 128) == (64,)
    assert served_seq_lens((196,), 128) == (128,)


def test_onnx_engine_matches_pytorch(small_bundle: Path, reference: Callable[[np.ndarray], np.ndarray]) -> None:
    engine = OnnxEngine.from_dir(small_bundle, provider="cpu", max_batch_size=4, seq_lens=(16,))
    assert isinstance(engine, Engine)
    assert (engine.dim, engine.max_seq_len, engine.buckets) == (SMALL_DIMS[0], SMALL_MAX_SEQ_LEN, (1, 2, 4))
    assert engine.provider == "CPUExecutionProvider" and not engine.fixed_shapes
    engine.warmup()
    x = np.random.default_rng(0).standard_normal((3, 16, SMALL_DIMS[0])).astype(np.float32)
    x.setflags(write=False)  # the service hands over read-only views of request bodies
    np.testing.assert_allclose(engine.run(x), reference(x), rtol=1e-4, atol=1e-4)
    assert engine.describe()["dims"] == {"dim": 64, "heads": 4, "ffn": 128}


class _FailingSession:
    """Stands in for the session: raises ``error`` from both entry points."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def run(self, x: np.ndarray) -> np.ndarray:
        raise self.error

    def run_into(self, parts: object, outs: object, finite: object = None) -> int:
        raise self.error


@pytest.mark.parametrize(
    ("error", "sticky"),
    [
        (RuntimeError("CUDA failure 700: an illegal memory access was encountered ; GPU=0 ; expr=cudaMemcpy"), True),
        (CudaError("cudaMemcpyAsync failed: unspecified launch failure (719)"), True),
        (RuntimeError("CUDA error: device-side assert triggered"), True),
        (RuntimeError("CUDA failure 2: out of memory"), False),  # a batch too large: not the context's death
        (ValueError("wrong shape"), False),
    ],
)
def test_sticky_cuda_errors_are_unrecoverable_and_others_fail_only_their_batch(
    small_bundle: Path, error: Exception, sticky: bool
) -> None:
    engine = OnnxEngine.from_dir(small_bundle, provider="cpu", max_batch_size=4, seq_lens=(16,))
    engine.session = _FailingSession(error)  # type: ignore[assignment]
    x = np.zeros((1, 16, SMALL_DIMS[0]), np.float32)
    for call in (lambda: engine.run(x), lambda: engine.run_into([x], [x])):
        with pytest.raises(Exception) as raised:
            call()
        assert isinstance(raised.value, EngineUnrecoverable) is sticky
        assert raised.value is error or raised.value.__cause__ is error
    assert is_sticky_cuda_error(RuntimeError("wrapped")) is False
    wrapped = RuntimeError("batch failed")
    wrapped.__cause__ = error
    assert is_sticky_cuda_error(wrapped) is sticky  # found through the cause chain too
