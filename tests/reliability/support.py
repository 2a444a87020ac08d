"""Helpers for the reliability suite: a real server on the fake engine, requests, metrics, memory samples.

The fake engine (``python -m service --engine fake``, test-only) computes ``2x + mean(sample)`` per sample,
so every answer can be checked against its own input, and its batches are counted in /metrics
(``encoder_batch_size_count`` = engine calls, ``encoder_samples_processed_total`` = samples computed).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil

from service.engine.fake import fake_output
from tests.service.server_support import running_process
from tests.service.support import from_npy, metric, npy

DIM = 8  # the fake engine's width
NPY_HEADERS = {"content-type": "application/x-npy"}
__all__ = ["DIM", "NPY_HEADERS", "RssSampler", "fake_server", "from_npy", "metric", "npy"]


def fake_args(*flags: str) -> list[str]:
    return ["-m", "service", "--engine", "fake", "--host", "127.0.0.1", "--log-level", "info", *flags]


@contextlib.contextmanager
def fake_server(log: Path, *flags: str, timeout: float = 60.0) -> Iterator[tuple[str, psutil.Process]]:
    """A real uvicorn process serving the fake engine; yields its URL and its process (for RSS, signals)."""
    with running_process(fake_args(*flags), log, timeout=timeout) as (url, process):
        yield url, psutil.Process(process.pid)


def sample(seed: int, batch: int = 1, seq: int = 4) -> np.ndarray:
    """A distinct input per seed: answers that went to the wrong request cannot pass the check."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, seq, DIM)) + seed).astype(np.float32)


def assert_answer(x: np.ndarray, body: bytes) -> None:
    np.testing.assert_allclose(from_npy(body), fake_output(x), rtol=1e-5, atol=1e-5)


def metrics_of(url: str) -> str:
    response = httpx.get(f"{url}/metrics", timeout=30)
    assert response.status_code == 200, response.text
    return response.text


def engine_calls(text: str) -> float:
    return metric(text, "encoder_batch_size_count")


def wait_until(predicate: object, what: str, timeout: float = 30.0) -> None:
    assert callable(predicate)
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def wait_metric(url: str, name: str, at_least: float, **labels: str) -> None:
    wait_until(lambda: metric(metrics_of(url), name, **labels) >= at_least, f"{name}{labels} >= {at_least}")


class RssSampler:
    """Samples a process's resident memory every ``period_s`` on a thread (start/stop, or as a context)."""

    def __init__(self, process: psutil.Process, period_s: float = 1.0) -> None:
        self.process = process
        self.period_s = period_s
        self.samples: list[tuple[float, int]] = []  # (monotonic seconds, bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.samples.append((time.monotonic(), self.process.memory_info().rss))
            self._stop.wait(self.period_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    @property
    def peak(self) -> int:
        return max(rss for _, rss in self.samples)

    def values_after(self, start: float) -> list[int]:
        return [rss for t, rss in self.samples if t >= start]
