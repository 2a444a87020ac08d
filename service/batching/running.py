"""Running one formed batch on the engine thread: stack and pad, or hand placed inputs over as they are."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from service.batching.queue import Placed


class BatchEngine(Protocol):
    """What the batcher needs from an engine."""

    def run(self, x: np.ndarray) -> np.ndarray: ...

    def input_buffer(self, batch: int, seq: int) -> np.ndarray: ...

    def warmup(self) -> None: ...


class PlacingEngine(BatchEngine, Protocol):
    """An engine that also takes :class:`~service.batching.queue.Placed` inputs (computed where they lie). An input
    the engine refuses on its own (e.g. NaN/Inf found where it lies) gets an exception instead of an answer: only
    that input's request fails."""

    def run_placed(self, parts: Sequence[np.ndarray | Placed]) -> tuple[list[np.ndarray | Exception], float]: ...


def pad_size(samples: int, buckets: Sequence[int] | None) -> int:
    """Smallest bucket holding ``samples`` (or ``samples`` itself without buckets)."""
    if not buckets:
        return samples
    return next(b for b in sorted(buckets) if b >= samples)


def run_batch(engine: BatchEngine, inputs: list[np.ndarray], padded: int) -> tuple[np.ndarray, float]:
    """Stack, pad, run, check: executed on the engine thread so the event loop stays free; (answer, seconds)."""
    out, compute_s, _ = run_batch_timed(engine, inputs, padded)
    return out, compute_s


def run_batch_timed(engine: BatchEngine, inputs: list[np.ndarray], padded: int) -> tuple[np.ndarray, float, float]:
    """:func:`run_batch`, its time split in two: (answer, compute seconds, seconds spent elsewhere).

    An engine in another process (``run_timed``) says how long it computed; the rest of the call (the hop, its
    queue there) is queue time for the request, so ``x-inference-time`` is compute in every layout.
    """
    samples = sum(int(part.shape[0]) for part in inputs)
    if len(inputs) == 1 and padded == samples:
        x = inputs[0]
    else:
        # One array of the padded size, filled in place: concatenating and then padding copied every sample twice.
        # The engine hands it out, so on the GPU it is already pinned memory and needs no staging copy.
        x = engine.input_buffer(padded, int(inputs[0].shape[1]))
        offset = 0
        for part in inputs:
            np.copyto(x[offset : offset + part.shape[0]], part)
            offset += part.shape[0]
        x[samples:] = 0
    start = time.perf_counter()
    run_timed = getattr(engine, "run_timed", None)
    if run_timed is None:
        out = engine.run(x)
        compute_s = elapsed = time.perf_counter() - start
    else:
        out, compute_s = run_timed(x)
        elapsed = time.perf_counter() - start
    if out.shape[:2] != x.shape[:2]:
        raise RuntimeError(f"engine returned shape {out.shape} for input {x.shape}")
    return out[:samples], compute_s, max(0.0, elapsed - compute_s)


def run_placed_timed(
    engine: BatchEngine, inputs: list[np.ndarray | Placed]
) -> tuple[list[np.ndarray | Exception], float, float]:
    """A batch holding :class:`Placed` inputs, as the engine's ``run_placed`` computes it: (each input's answer,
    compute seconds, seconds spent elsewhere). Never padded: only an engine that pads its merged batches itself
    hands out placed inputs. An input the engine refused has its exception instead of an answer."""
    run_placed = getattr(engine, "run_placed", None)
    if run_placed is None:
        raise TypeError(f"{type(engine).__name__} cannot compute inputs placed in shared memory")
    start = time.perf_counter()
    outs, compute_s = run_placed(inputs)
    elapsed = time.perf_counter() - start
    for x, out in zip(inputs, outs, strict=True):
        if not isinstance(out, Exception) and out.shape[:2] != x.shape[:2]:
            raise RuntimeError(f"engine returned shape {out.shape} for input {x.shape}")
    return outs, compute_s, max(0.0, elapsed - compute_s)


def run_split_timed(
    engine: BatchEngine, inputs: list[np.ndarray | Placed], padded: int
) -> tuple[list[np.ndarray], float, float]:
    """:func:`run_batch_timed` on arrays, the answer cut into one per input."""
    arrays = [x for x in inputs if isinstance(x, np.ndarray)]
    out, compute_s, away_s = run_batch_timed(engine, arrays, padded)
    answers, offset = [], 0
    for x in arrays:
        answers.append(out[offset : offset + x.shape[0]])
        offset += x.shape[0]
    return answers, compute_s, away_s
