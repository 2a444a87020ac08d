from __future__ import annotations

import dataclasses
import functools
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from converter import merged
from converter.bundle import load_bundle
from converter.finite import FLAGS_OUTPUT, finite_rows, with_finite_output
from converter.pinned import D2H, H2D, data_ptr
from converter.pipeline import (
    Slot,
    Span,
    assign_slots,
    chunk_sizes,
    copy_plan,
    cross_aliased,
    pick_chunk,
    run_chunks,
    serial_pieces,
)
from converter.providers import CPU, SessionOptions
from converter.session import EncoderSession, GraphSlot
from converter.verify import TOLERANCE
from tests.converter.fake_streams import FakeStreams

BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def test_chunk_sizes_fill_full_chunks_then_the_smallest_bucket_for_the_rest() -> None:
    assert chunk_sizes(64, 16, BUCKETS) == [16, 16, 16, 16]
    assert chunk_sizes(40, 16, BUCKETS) == [16, 16, 8]
    assert chunk_sizes(45, 16, BUCKETS) == [16, 16, 16]  # 13 left: the bucket that holds them is 16
    assert chunk_sizes(3, 16, BUCKETS) == [4]
    assert chunk_sizes(64, 64, BUCKETS) == [64]
    with pytest.raises(ValueError):
        chunk_sizes(0, 16, BUCKETS)


def test_serial_pieces_cut_a_batch_that_would_pad_far_into_distinct_buckets() -> None:
    buckets = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert serial_pieces(152, buckets) == [128, 32]  # not 256: 104 padding rows
    assert serial_pieces(100, buckets) == [64, 32, 4]
    assert serial_pieces(200, buckets) == [128, 64, 8]
    assert serial_pieces(255, buckets) == [256] and serial_pieces(128, buckets) == [128]  # little padding: one run
    assert serial_pieces(24, buckets) == [32]  # too few rows to be worth a second launch
    assert serial_pieces(80, [8, 64, 100]) == [100]  # 64 + 8 + 8 would need one bucket twice
    for rows in range(1, 257):
        pieces = serial_pieces(rows, buckets)
        assert sum(pieces) >= rows and len(set(pieces)) == len(pieces) and pieces == sorted(pieces, reverse=True)
    with pytest.raises(ValueError):
        serial_pieces(300, buckets)


def test_copy_plan_spans_parts_across_chunks_and_chunks_across_parts() -> None:
    plan = copy_plan([5, 3, 10], [8, 8, 2])
    assert plan == [
        [Span(0, 0, 0, 5), Span(1, 0, 5, 3)],  # two parts in the first chunk
        [Span(2, 0, 0, 8)],
        [Span(2, 8, 0, 2)],  # the third part's tail in the last chunk
    ]
    assert copy_plan([4], [8]) == [[Span(0, 0, 0, 4)]]  # padding rows are not copied
    assert copy_plan([0, 2], [2]) == [[Span(1, 0, 0, 2)]]  # an empty part has no copy
    with pytest.raises(ValueError, match="do not fit"):
        copy_plan([9], [8])


@pytest.mark.parametrize("seed", range(20))
def test_copy_plan_covers_every_row_once_in_order(seed: int) -> None:
    rng = np.random.default_rng(seed)
    part_rows = [int(r) for r in rng.integers(0, 40, size=int(rng.integers(1, 9)))]
    total = max(1, sum(part_rows))
    chunk = int(rng.choice([1, 2, 4, 8, 16, 32]))
    sizes = chunk_sizes(total, chunk, BUCKETS)
    plan = copy_plan(part_rows, sizes)
    merged = [(p, r) for p, n in enumerate(part_rows) for r in range(n)]  # rows in the order of the batch
    seen = []
    for chunk_index, spans in enumerate(plan):
        slot_rows = [s.slot_row + k for s in spans for k in range(s.rows)]
        assert slot_rows == list(range(len(slot_rows)))  # each chunk filled from its first row, no gaps
        assert len(slot_rows) <= sizes[chunk_index]
        seen += [(s.part, s.part_row + k) for s in spans for k in range(s.rows)]
    assert seen == merged


def test_pick_chunk_aims_for_enough_full_chunks_then_two() -> None:
    defaults = SessionOptions()
    # The defaults pick what won on the H200 (BENCHMARKS.md; 32 rows: 8 and 16 within noise of each other).
    sizes = (8, 15, 16, 32, 48, 64, 128, 256)
    picks = [pick_chunk(rows, defaults.pipeline_chunks, defaults.pipeline_min_chunks) for rows in sizes]
    assert picks == [0, 0, 8, 8, 16, 16, 32, 32]
    assert pick_chunk(48, [16, 32], 4) == 16  # not four chunks of either: two of 16
    assert pick_chunk(31, [16, 32], 4) == 0  # not even two full chunks
    assert pick_chunk(64, [16, 32], 2) == 32
    assert pick_chunk(256, [], 2) == 0
    assert pick_chunk(256, [16], 1) == 0  # one chunk is no pipeline: off


def test_assign_slots_alternates_full_chunks_and_gives_the_tail_its_bucket() -> None:
    assert assign_slots([16, 16, 16, 8], 16) == [(16, 0), (16, 1), (16, 0), (8, 0)]
    assert assign_slots([64], 0) == [(64, 0)]  # one serial batch on its bucket's slot


class Device:
    """Two slots per chunk size (and one per other bucket), each a 'graph' computing rows * 2 + 1 and, as a second
    output, each row's sum of x - x (0 when finite, NaN otherwise: the session's finiteness flags)."""

    def __init__(self, cuda: FakeStreams, dim: int) -> None:
        self.cuda, self.dim, self.events = cuda, dim, itertools.count(100)
        self.buffers: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def slot(self, rows: int) -> Slot:
        inp, out = np.full((rows, self.dim), np.nan), np.full((rows, self.dim), np.nan)
        flags = np.full(rows, 7.0)  # neither 0 nor NaN: a flag never written would show

        def graph(x: np.ndarray) -> np.ndarray:
            with np.errstate(invalid="ignore"):  # inf - inf: the NaN wanted
                flags[:] = (x - x).sum(axis=1)
            return x * 2 + 1

        launch = functools.partial(self.cuda.launch, inp, out, graph)
        made = Slot(data_ptr(inp), data_ptr(out), next(self.events), launch, data_ptr(flags))
        self.buffers[id(made)] = (inp, out, flags)
        return made


def pipelined(cuda: FakeStreams, part_rows: list[int], chunk: int, in_place: bool) -> list[np.ndarray]:
    dim = 3
    rng = np.random.default_rng(sum(part_rows) + chunk)
    parts = [rng.standard_normal((n, dim)) for n in part_rows]
    expected = [p * 2 + 1 for p in parts]
    outs = parts if in_place else [np.full_like(p, np.nan) for p in parts]
    device = Device(cuda, dim)
    sizes = chunk_sizes(sum(part_rows), chunk, BUCKETS)
    pair = (device.slot(chunk), device.slot(chunk))
    slots = [pair[which] if size == chunk else device.slot(size) for size, which in assign_slots(sizes, chunk)]
    plan = copy_plan(part_rows, sizes)
    run_chunks(cuda, (1, 2), slots, plan, [data_ptr(p) for p in parts], [data_ptr(o) for o in outs], dim * 8)
    assert all(isinstance(op, int) for queue in cuda.queues.values() for op in queue)  # every copy has run
    for out, want in zip(outs, expected, strict=True):
        np.testing.assert_array_equal(out, want)
    return outs


@pytest.mark.parametrize("eager", [False, True])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize(
    ("part_rows", "chunk"),
    [([16, 16, 16, 16], 16), ([16, 16, 16, 16], 8), ([5, 11, 7, 9], 8), ([40], 16), ([3, 2], 4), ([64], 64)],
)
def test_run_chunks_answers_every_row_whatever_order_the_copies_run_in(
    eager: bool, in_place: bool, part_rows: list[int], chunk: int
) -> None:
    cuda = FakeStreams(eager=eager)
    pipelined(cuda, part_rows, chunk, in_place)
    assert cuda.launches == len(chunk_sizes(sum(part_rows), chunk, BUCKETS))


def test_run_chunks_queues_the_next_input_before_computing_and_copies_out_after() -> None:
    cuda = FakeStreams()
    pipelined(cuda, [16, 16, 16, 16], 16, in_place=True)
    h2d = [i for i, (what, kind, _) in enumerate(cuda.log) if what == "copy" and kind == H2D]
    d2h = [i for i, (what, kind, _) in enumerate(cuda.log) if what == "copy" and kind == D2H]
    assert len(h2d) == len(d2h) == 4 and all(cuda.log[i][2] == 1 for i in h2d) and all(cuda.log[i][2] == 2 for i in d2h)
    # Chunk 1's input is queued before chunk 0's output (i.e. before chunk 0 ran): the copy overlaps compute.
    assert h2d[1] < d2h[0] and h2d[2] < d2h[1] and h2d[3] < d2h[2]
    syncs = [i for i, (what, _, stream) in enumerate(cuda.log) if what == "sync" and stream == 2]
    assert syncs == [len(cuda.log) - 1]  # the output stream is waited on once, at the end


def test_the_fake_refuses_a_launch_with_a_copy_still_due() -> None:
    cuda = FakeStreams()
    inp, out = np.zeros(4), np.zeros(4)
    src = np.ones(4)
    cuda.copy(data_ptr(inp), data_ptr(src), inp.nbytes, H2D, 1)
    with pytest.raises(AssertionError, match="still queued"):
        cuda.launch(inp, out, lambda x: x)
    cuda.sync(1)
    cuda.launch(inp, out, lambda x: x)
    np.testing.assert_array_equal(out, src)


def test_run_chunks_refuses_one_slot_for_consecutive_chunks() -> None:
    cuda = FakeStreams()
    slot = Device(cuda, 2).slot(4)
    with pytest.raises(ValueError, match="different slots"):
        run_chunks(cuda, (1, 2), [slot, slot], copy_plan([8], [4, 4]), [0], [0], 16)


class _Value:
    """An OrtValue stand-in over a host array (the fake device buffer)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def data_ptr(self) -> int:
        return data_ptr(self.array)

    def shape(self) -> list[int]:
        return list(self.array.shape)


def fake_device_session(small_bundle: Path, monkeypatch: pytest.MonkeyPatch, cuda: FakeStreams) -> EncoderSession:
    """A CPU session whose 'device' is ``cuda``: captured slots for buckets 1..8, spares for chunks of 2 and 4, each
    graph the real CPU session run on the slot's input (the engine wiring of run_into, without a GPU)."""
    bundle = load_bundle(small_bundle)
    options = SessionOptions(provider="cpu", batch_buckets=(1, 2, 4, 8), seq_lens=(16,), pipeline_chunks=(2, 4))
    session = EncoderSession(bundle, dataclasses.replace(options, pipeline_min_chunks=2))
    cpu, dim = session.session, session.dim

    def slot(batch: int, graph_id: int) -> GraphSlot:
        inp, out = (_Value(np.full((batch, 16, dim), np.nan, np.float32)) for _ in range(2))
        return GraphSlot(graph_id, (inp.array, out.array), inp, out, None, done=1000 + graph_id)

    class FakeOrt:
        def run_with_iobinding(self, binding: tuple[np.ndarray, np.ndarray], run_options: object) -> None:
            cuda.launch(*binding, lambda x: cpu.run(None, {bundle.input_name: x})[0])

    monkeypatch.setattr(session, "session", FakeOrt())
    monkeypatch.setattr(session, "_cuda", cuda)
    monkeypatch.setattr(session, "_in_stream", 1, raising=False)
    monkeypatch.setattr(session, "_out_stream", 2, raising=False)
    monkeypatch.setattr(session, "_graphs", {(b, 16): slot(b, b) for b in (1, 2, 4, 8)})
    monkeypatch.setattr(session, "_spares", {(c, 16): slot(c, 100 + c) for c in (2, 4)})
    return session


def cpu_answers(small_bundle: Path, parts: list[np.ndarray]) -> list[np.ndarray]:
    session = EncoderSession(load_bundle(small_bundle), SessionOptions(provider="cpu"))
    return [session.run(p) for p in parts]


def test_session_run_into_through_chunks_matches_per_part_runs(
    small_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EncoderSession's own chunk wiring (slots, spares, tail bucket, in place): the answers must be the per-part
    answers, whatever the chunking."""
    cuda = FakeStreams()
    session = fake_device_session(small_bundle, monkeypatch, cuda)
    rng = np.random.default_rng(5)
    parts = [rng.standard_normal((b, 16, session.dim)).astype(np.float32) for b in (1, 3, 2)]
    expected = cpu_answers(small_bundle, parts)
    tolerance = TOLERANCE[session.bundle.precision]
    # None: the policy (6 rows make 2 full chunks of 2, not of 4); 0: one batch on bucket 8; 4: 4 + a tail of 2.
    for chunk, ran, launches in ((None, 6, 3), (0, 8, 1), (4, 6, 2), (2, 6, 3)):
        before = cuda.launches
        outs = [np.full_like(p, np.nan) for p in parts]
        assert session.run_into(parts, outs, chunk=chunk) == ran
        assert cuda.launches - before == launches
        for out, want in zip(outs, expected, strict=True):
            np.testing.assert_allclose(out, want, rtol=tolerance, atol=tolerance)
    inputs = [p.copy() for p in parts]
    assert session.run_into(inputs, inputs) == 6  # in place, as the engine process does
    for out, want in zip(inputs, expected, strict=True):
        np.testing.assert_allclose(out, want, rtol=tolerance, atol=tolerance)
    with pytest.raises(ValueError, match="no pipelined slots"):
        session.run_into(parts, [np.empty_like(p) for p in parts], chunk=1)


def test_cross_aliased_finds_outs_over_other_parts_inputs() -> None:
    assert not cross_aliased([(0, 8), (8, 8)], [(0, 8), (8, 8)])  # in place
    assert not cross_aliased([(0, 8), (8, 8)], [(100, 8), (108, 8)])  # apart
    assert cross_aliased([(0, 8), (8, 8)], [(8, 8), (0, 8)])  # swapped: each answer lands on the other's input
    assert cross_aliased([(0, 8)], [(4, 8)])  # its own input, shifted
    assert not cross_aliased([], [])
    assert not cross_aliased([(0, 8), (100, 8)], [(50, 8), (200, 8)])  # interleaved regions, no overlap
    assert cross_aliased([(0, 8), (100, 8)], [(50, 8), (96, 8)])  # interleaved, the second answer over its input


def test_session_runs_cross_aliased_outs_serially(small_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Answers written over another part's input rows: chunk 0's answer would land (eager copies) before chunk 2's
    input was copied in; the session copies every input in first, as one batch, and the answers stay right."""
    cuda = FakeStreams(eager=True)
    session = fake_device_session(small_bundle, monkeypatch, cuda)
    buf = np.random.default_rng(6).standard_normal((6, 16, session.dim)).astype(np.float32)
    parts = [buf[0:2], buf[2:4], buf[4:6]]
    expected = cpu_answers(small_bundle, [p.copy() for p in parts])
    outs = [buf[4:6], buf[2:4], buf[0:2]]  # part 0's answer over part 2's input, and back
    before = cuda.launches
    assert session.run_into(parts, outs, chunk=2) == 8  # one batch on bucket 8, not three chunks of 2
    assert cuda.launches - before == 1
    tolerance = TOLERANCE[session.bundle.precision]
    for out, want in zip(outs, expected, strict=True):
        np.testing.assert_allclose(out, want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("eager", [False, True])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize(("part_rows", "chunk"), [([16, 16, 16, 16], 16), ([5, 11, 7, 9], 8), ([3, 2], 4), ([40], 16)])
def test_each_chunks_flags_land_at_its_rows_of_the_batch(
    eager: bool, in_place: bool, part_rows: list[int], chunk: int
) -> None:
    """Flags copied too late would be the slot's next chunk's (slots alternate); padding rows must not spill over
    the next chunk's flags; the answers must not change."""
    cuda, dim = FakeStreams(eager=eager), 3
    rng = np.random.default_rng(sum(part_rows) + chunk)
    parts = [rng.standard_normal((n, dim)) for n in part_rows]
    total = sum(part_rows)
    bad = sorted({int(r) for r in rng.integers(0, total, size=3)})
    rows_in = np.concatenate(parts)
    for row in bad:  # spoil rows of the concatenation, each in its part
        part = int(np.searchsorted(np.cumsum(part_rows), row, side="right"))
        parts[part][row - sum(part_rows[:part]), row % dim] = np.inf if row % 2 else np.nan
    rows_in = np.concatenate(parts)
    outs = parts if in_place else [np.full_like(p, np.nan) for p in parts]
    device = Device(cuda, dim)
    sizes = chunk_sizes(total, chunk, BUCKETS)
    pair = (device.slot(chunk), device.slot(chunk))
    slots = [pair[which] if size == chunk else device.slot(size) for size, which in assign_slots(sizes, chunk)]
    flags = np.full(total + 8, 5.0)  # room past the rows: nothing may be written there
    plan = copy_plan(part_rows, sizes)
    ins, ats = [data_ptr(p) for p in parts], [data_ptr(o) for o in outs]
    run_chunks(cuda, (1, 2), slots, plan, ins, ats, dim * 8, (data_ptr(flags), flags.itemsize))
    assert all(isinstance(op, int) for queue in cuda.queues.values() for op in queue)  # every copy has run
    assert np.flatnonzero(np.isnan(flags[:total])).tolist() == bad
    assert (flags[:total][~np.isnan(flags[:total])] == 0).all() and (flags[total:] == 5.0).all()
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(np.concatenate(outs), rows_in * 2 + 1)


def fake_flags_session(small_bundle: Path, monkeypatch: pytest.MonkeyPatch, cuda: FakeStreams) -> EncoderSession:
    """:func:`fake_device_session` whose 'graphs' are the bundle's model with the finiteness output added (run on the
    CPU), each slot with its flags buffer: the engine's wiring of the flags, without a GPU."""
    session = fake_device_session(small_bundle, monkeypatch, cuda)
    bundle = session.bundle
    model = with_finite_output(onnx.load(str(bundle.model_path)), bundle.input_name, session.dtype)
    flagged = ort.InferenceSession(model.SerializeToString(), providers=[CPU])

    def with_flags(slot: GraphSlot) -> GraphSlot:
        flags = _Value(np.full(slot.input.array.shape[0], 7.0, np.float32))

        def graph(x: np.ndarray) -> np.ndarray:
            answer, flags.array[:] = flagged.run(None, {bundle.input_name: x})
            return answer

        return dataclasses.replace(slot, binding=(slot.input.array, slot.output.array, graph), flags=flags)

    class FakeOrt:
        def run_with_iobinding(self, binding: tuple[np.ndarray, np.ndarray, Any], run_options: object) -> None:
            cuda.launch(*binding)

    monkeypatch.setattr(session, "session", FakeOrt())
    monkeypatch.setattr(session, "_graphs", {k: with_flags(v) for k, v in session._graphs.items()})
    monkeypatch.setattr(session, "_spares", {k: with_flags(v) for k, v in session._spares.items()})
    monkeypatch.setattr(session, "flags_output", FLAGS_OUTPUT)
    return session


def test_session_run_into_flags_non_finite_rows_from_the_slots(
    small_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine process's direct path: flags from the graph's own output, chunk by chunk, never a host read."""
    cuda = FakeStreams()
    session = fake_flags_session(small_bundle, monkeypatch, cuda)
    host_checks: list[int] = []
    monkeypatch.setattr(merged, "finite_rows", lambda x: host_checks.append(1) or finite_rows(x))
    rng = np.random.default_rng(6)
    parts = [rng.standard_normal((b, 16, session.dim)).astype(np.float32) for b in (1, 3, 2)]
    parts[1][2, 7, 1] = np.nan
    parts[2][0, 15, 0] = -np.inf
    expected = cpu_answers(small_bundle, parts)
    tolerance = TOLERANCE[session.bundle.precision]
    for chunk, launches in ((None, 3), (0, 1), (4, 2), (2, 3)):
        before, outs = cuda.launches, [np.full_like(p, np.nan) for p in parts]
        flags = np.zeros(6, bool)
        session.run_into(parts, outs, chunk=chunk, finite=flags)
        assert flags.tolist() == [True, True, True, False, False, True]
        assert cuda.launches - before == launches and not host_checks  # no run of their own, no host read
        got, want = np.concatenate(outs), np.concatenate(expected)
        np.testing.assert_allclose(got[flags], want[flags], rtol=tolerance, atol=tolerance)  # the others unharmed
    inputs = [p.copy() for p in parts]
    flags = np.zeros(6, bool)
    session.run_into(inputs, inputs, finite=flags)  # in place: the flags are the inputs', not the answers'
    assert flags.tolist() == [True, True, True, False, False, True]


def test_slots_without_the_flags_output_flag_rows_on_the_host(
    small_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session whose graph lacks the flags output (never built so on the CUDA path, but the guard must hold):
    the rows are checked on the host before computing, never read from a slot buffer that does not exist."""
    cuda = FakeStreams()
    session = fake_device_session(small_bundle, monkeypatch, cuda)
    assert session.flags_output is None
    parts = [np.random.default_rng(7).standard_normal((b, 16, session.dim)).astype(np.float32) for b in (2, 3)]
    parts[1][1, 3, 3] = np.inf
    flags = np.zeros(5, bool)
    session.run_into(parts, [p.copy() for p in parts], chunk=2, finite=flags)
    assert flags.tolist() == [True, True, True, False, True]
