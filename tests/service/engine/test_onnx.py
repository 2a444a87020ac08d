from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from service.engine.base import Engine, batch_buckets
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
