"""Chunked, pipelined host-to-host runs for ``EncoderSession.run_into``: the plan (pure) and its execution.

A merged batch (many parts, each its own rows in host memory) is cut into chunks that have captured graph
slots. While chunk i computes, chunk i+1 is copied in on the input stream and chunk i-1 copied out on the
output stream, so the two copy directions and the compute overlap instead of running one after the other.

The plan is plain arithmetic on row counts (:func:`chunk_sizes`, :func:`copy_plan`, :func:`pick_chunk`), testable
without a GPU; :func:`run_chunks` issues it through a :class:`converter.pinned.CudaRuntime` (or a fake one).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from converter.pinned import D2H, H2D


@dataclass(frozen=True)
class Span:
    """``rows`` consecutive rows: part ``part`` from its row ``part_row`` <-> its chunk's slot from ``slot_row``."""

    part: int
    part_row: int
    slot_row: int
    rows: int


def chunk_sizes(rows: int, chunk: int, buckets: Sequence[int]) -> list[int]:
    """Full chunks of ``chunk`` rows, then the smallest bucket that holds the remainder (padding rows only there)."""
    if rows <= 0 or chunk <= 0:
        raise ValueError(f"need positive rows and chunk, got {rows} and {chunk}")
    full, rest = divmod(rows, chunk)
    sizes = [chunk] * full
    if rest:
        sizes.append(min((b for b in buckets if b >= rest), default=chunk))
    return sizes


SPLIT_FROM = 32  # a serial batch of at least this many rows is cut into pieces rather than padded far


def serial_pieces(rows: int, buckets: Sequence[int], split_from: int | None = None) -> list[int]:
    """Captured batch sizes to run ``rows`` rows serially on, largest first, all different (each its own slot).

    One batch on the smallest bucket that holds them, unless that pads more than an eighth of the rows and there
    are ``split_from`` rows or more: then the largest bucket they fill, and the rest the same way. 152 rows on
    buckets 1..256 run as 128 + 32 instead of one batch of 256 (60 % more compute); 100 as 64 + 32 + 4. Small
    batches stay one launch: there a graph run's fixed cost outweighs the padding.
    """
    split_from = SPLIT_FROM if split_from is None else split_from
    holding = [b for b in buckets if b >= rows]
    if not holding:
        raise ValueError(f"no bucket of {sorted(buckets)} holds {rows} rows")
    pieces: list[int] = []
    rest, allowed = rows, sorted(buckets)
    while rest:
        holding = [b for b in allowed if b >= rest]
        if holding and (rest < split_from or min(holding) - rest <= rest // 8):
            pieces.append(min(holding))  # little padding, or too few rows to be worth another launch
            break
        filled = [b for b in allowed if b <= rest]
        if not filled:  # cannot cut further with distinct buckets: one batch after all
            return [min(b for b in buckets if b >= rows)]
        pieces.append(max(filled))
        rest -= pieces[-1]
        allowed = [b for b in allowed if b < pieces[-1]]
    return pieces


def copy_plan(part_rows: Sequence[int], sizes: Sequence[int]) -> list[list[Span]]:
    """For each chunk, the spans of parts that fill it in order; a part may span chunks, a chunk many parts."""
    if any(r < 0 for r in part_rows):
        raise ValueError(f"row counts must not be negative, got {list(part_rows)}")
    if sum(part_rows) > sum(sizes):
        raise ValueError(f"{sum(part_rows)} rows do not fit in chunks {list(sizes)}")
    plan: list[list[Span]] = [[] for _ in sizes]
    chunk, slot_row = 0, 0
    for part, count in enumerate(part_rows):
        done = 0
        while done < count:
            if slot_row == sizes[chunk]:
                chunk, slot_row = chunk + 1, 0
            take = min(count - done, sizes[chunk] - slot_row)
            plan[chunk].append(Span(part, done, slot_row, take))
            done += take
            slot_row += take
    return plan


def pick_chunk(rows: int, chunks: Sequence[int], min_chunks: int) -> int:
    """The chunk size for ``rows`` merged rows, or 0 for one serial batch. ``chunks``: sizes with two captured slots.

    The largest that cuts the rows into at least ``min_chunks`` full chunks, else the largest that makes two;
    ``min_chunks`` below 2 turns pipelining off. On an H200 (fp16, S=196; BENCHMARKS.md) the best chunk was 8
    rows for 16, 16 for 48 and 64, 32 for 128 and 256: what ``min_chunks`` 3 over chunks (8, 16, 32) picks.
    """
    if min_chunks < 2:
        return 0
    for need in (min_chunks, 2):
        fitting = [c for c in chunks if rows >= need * c]
        if fitting:
            return max(fitting)
    return 0


def cross_aliased(parts: Sequence[tuple[int, int]], outs: Sequence[tuple[int, int]]) -> bool:
    """Does an out's memory (start, nbytes) overlap a part other than its own, or its own part shifted?

    Then a chunk's answer could land on input rows not yet copied in (the serial path copies every input in
    first): such a batch must run serially. An out that is exactly its part (answers in place) is fine.
    """
    if all(part == out for part, out in zip(parts, outs, strict=True)):
        return False  # in place (or nothing): the engine's usual case, checked first because it is cheap
    first, end = min(s for s, _ in parts), max(s + n for s, n in parts)
    if max(s + n for s, n in outs) <= first or end <= min(s for s, _ in outs):
        return False  # every answer lies outside the span of the inputs (separate output regions)
    p, o = np.asarray(parts, dtype=np.int64), np.asarray(outs, dtype=np.int64)
    p_lo, p_hi, o_lo, o_hi = p[:, 0], p[:, 0] + p[:, 1], o[:, 0:1], o[:, 0:1] + o[:, 1:2]
    overlap = (o_lo < p_hi) & (p_lo < o_hi)  # [out, part]
    np.fill_diagonal(overlap, np.diagonal(overlap) & (o[:, 0] != p[:, 0]))
    return bool(overlap.any())


def assign_slots(sizes: Sequence[int], chunk: int) -> list[tuple[int, int]]:
    """(size, 0 for the bucket's slot or 1 for its spare) per chunk: full chunks of ``chunk`` rows alternate between
    the two, any other size (the tail, or one whole batch) takes its bucket's own slot."""
    slots, full = [], 0
    for size in sizes:
        if size == chunk:
            slots.append((size, full % 2))
            full += 1
        else:
            slots.append((size, 0))
    return slots


class Runtime(Protocol):
    def copy(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None: ...

    def sync(self, stream: int) -> None: ...

    def record(self, event: int, stream: int) -> None: ...

    def wait(self, event: int) -> None: ...


@dataclass(frozen=True)
class Slot:
    """A captured graph's fixed device buffers, its 'output copied out' event, and how to run it (blocking).
    ``flags``: the device address of the graph's per-row finiteness output, 0 when it has none."""

    input: int
    output: int
    done: int
    launch: Callable[[], None]
    flags: int = 0


def run_chunks(
    cuda: Runtime,
    streams: tuple[int, int],
    slots: Sequence[Slot],
    plan: Sequence[Sequence[Span]],
    parts: Sequence[int],
    outs: Sequence[int],
    row_bytes: int,
    flags: tuple[int, int] | None = None,
) -> None:
    """Run chunk i on ``slots[i]``: H2D chunk i+1 is queued before chunk i runs, D2H chunk i right after it.

    ``parts``/``outs``: host pointers (pinned or registered) of each part and its answer. ``launch`` must return
    only once the graph has finished (onnxruntime's replay synchronises its stream): that is what makes a slot's
    input free for the next copy into it. Before a slot computes again, its previous output must have left the
    device (its ``done`` event). Consecutive chunks need distinct slots.

    ``flags`` (host address, bytes per flag), if given: each chunk's finiteness flags (its slot's ``flags``, real
    rows only) are copied out with its answer, to the place of its rows in the concatenated parts; they are there
    when this returns, like the answers.
    """
    if len(slots) != len(plan):
        raise ValueError(f"{len(plan)} chunks need as many slots, got {len(slots)}")
    if any(a is b for a, b in itertools.pairwise(slots)):
        raise ValueError("consecutive chunks must run on different slots")
    in_stream, out_stream = streams

    def copy_in(i: int) -> None:
        for s in plan[i]:
            src = parts[s.part] + s.part_row * row_bytes
            cuda.copy(slots[i].input + s.slot_row * row_bytes, src, s.rows * row_bytes, H2D, in_stream)

    used: set[int] = set()
    first_row = 0
    copy_in(0)
    for i, slot in enumerate(slots):
        cuda.sync(in_stream)  # chunk i is on the device (chunk i+1 is not queued yet)
        if i + 1 < len(slots):
            copy_in(i + 1)  # its slot's last compute (chunk i-1) has finished: its input is free
        if id(slot) in used:
            cuda.wait(slot.done)  # this slot's previous output has been copied out
        slot.launch()
        used.add(id(slot))
        for s in plan[i]:
            dst = outs[s.part] + s.part_row * row_bytes
            cuda.copy(dst, slot.output + s.slot_row * row_bytes, s.rows * row_bytes, D2H, out_stream)
        rows = sum(s.rows for s in plan[i])
        if flags is not None:  # before the event: the slot's next run waits for these bytes to leave too
            host, size = flags
            cuda.copy(host + first_row * size, slot.flags, rows * size, D2H, out_stream)
        first_row += rows
        cuda.record(slot.done, out_stream)
    cuda.sync(out_stream)
