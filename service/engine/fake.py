"""A CPU engine for tests: a cheap per-sample function with injectable delay and failure."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from service.engine.base import EngineUnrecoverable, batch_buckets

POISON = -12345.0  # a sample whose first value is this makes its whole batch fail (when poison is enabled)
FATAL = -54321.0  # ... and this one raises EngineUnrecoverable: the batching loop stops for good


def fake_output(x: np.ndarray) -> np.ndarray:
    """The fake model: per sample, ``2x + mean(sample)``. Depends on the whole sample, so a mixed-up or
    padded batch gives a visibly different answer, and it is cheap to compute as a reference."""
    x32 = x.astype(np.float32)
    return 2.0 * x32 + x32.mean(axis=(1, 2), keepdims=True)


class FakeEngine:
    """Records every batch shape it runs; sleeps ``delay_s`` per call plus ``sample_delay_s`` per sample (a GPU's
    run: a fixed cost, then time that grows with the batch); fails batches that ``fail_if`` picks.

    With ``poison=True`` a batch fails when any sample starts with :data:`POISON`, so a test (or an HTTP
    client) can make exactly its own batch fail; a sample starting with :data:`FATAL` makes the engine report
    itself broken for good (:class:`EngineUnrecoverable`). ``python -m service --engine fake`` serves it in a
    real process (test-only).
    """

    def __init__(
        self,
        dim: int = 8,
        max_seq_len: int = 64,
        max_batch_size: int = 8,
        dtype: str = "float32",
        delay_s: float = 0.0,
        sample_delay_s: float = 0.0,
        fixed_shapes: bool = False,
        poison: bool = True,
        fail_if: Callable[[np.ndarray], bool] | None = None,
        warmup_s: float = 0.0,
        record: bool = True,
    ) -> None:
        self.name = "fake"
        self.dim = dim
        self.dtype = np.dtype(dtype)
        self.max_seq_len = max_seq_len
        self.buckets = batch_buckets(max_batch_size)
        self.provider = "fake"
        self.fixed_shapes = fixed_shapes
        self.delay_s = delay_s
        self.sample_delay_s = sample_delay_s
        self.poison = poison
        self.fail_if = fail_if
        self.warmup_s = warmup_s
        self.warmed = False
        self.record = record  # off in a served process: the recorded inputs would grow without bound
        self.batches: list[tuple[int, int]] = []  # (batch, seq) of every run, padding included
        self.inputs: list[np.ndarray] = []
        self._lock = threading.Lock()

    def run(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 3 or x.shape[2] != self.dim or x.dtype != self.dtype:
            raise ValueError(f"fake engine wants (B, S, {self.dim}) {self.dtype}, got {x.shape} {x.dtype}")
        if self.record:
            with self._lock:
                self.batches.append((x.shape[0], x.shape[1]))
                self.inputs.append(x.copy())
        if self.delay_s or self.sample_delay_s:
            time.sleep(self.delay_s + self.sample_delay_s * x.shape[0])
        if self.poison and bool(np.any(x[:, 0, 0] == POISON)):
            raise RuntimeError("poisoned sample in batch")
        if self.poison and bool(np.any(x[:, 0, 0] == FATAL)):
            raise EngineUnrecoverable("fatal sample in batch: the fake engine is broken for good")
        if self.fail_if is not None and self.fail_if(x):
            raise RuntimeError("injected failure")
        return fake_output(x).astype(self.dtype)

    def input_buffer(self, batch: int, seq: int) -> np.ndarray:
        return np.empty((batch, seq, self.dim), self.dtype)

    def warmup(self) -> None:
        if self.warmup_s:
            time.sleep(self.warmup_s)
        self.warmed = True

    def describe(self) -> dict[str, Any]:
        described = {"provider": self.provider, "delay_s": self.delay_s, "fixed_shapes": self.fixed_shapes}
        return described | ({"sample_delay_s": self.sample_delay_s} if self.sample_delay_s else {})

    @property
    def batch_sizes(self) -> list[int]:
        with self._lock:
            return [b for b, _ in self.batches]
