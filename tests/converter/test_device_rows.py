"""run_device_into: parts and answers in device memory (a client's CUDA region) copied device to device into and
out of the captured slot, host ones host to device and back, in one batch; on a fake device whose copies check
that each kind names the right sides."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from converter import merged, pipeline
from converter.bundle import load_bundle
from converter.device_rows import D2D, DeviceRows
from converter.finite import finite_rows
from converter.pinned import D2H, H2D, data_ptr
from converter.providers import SessionOptions
from converter.session import EncoderSession
from tests.converter.fake_streams import FakeStreams
from tests.converter.test_pipeline import TOLERANCE, cpu_answers, fake_device_session, fake_flags_session


class KindCheckingStreams(FakeStreams):
    """Eager copies that refuse a kind not matching where its two sides live (``device``: the 'device' buffers)."""

    def __init__(self) -> None:
        super().__init__(eager=True)
        self.device: list[np.ndarray] = []
        self.kinds: list[int] = []

    def on_device(self, address: int, nbytes: int) -> bool:
        return any(data_ptr(a) <= address and address + nbytes <= data_ptr(a) + a.nbytes for a in self.device)

    def copy(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        sides = (self.on_device(src, nbytes), self.on_device(dst, nbytes))
        assert sides == {H2D: (False, True), D2H: (True, False), D2D: (True, True)}[kind], (kind, sides)
        self.kinds.append(kind)
        ctypes.memmove(dst, src, nbytes)


def device_rows(array: np.ndarray) -> DeviceRows:
    return DeviceRows(data_ptr(array), tuple(array.shape), array.dtype)  # type: ignore[arg-type]


def test_device_and_host_parts_mix_in_one_batch_with_one_copy_each_way(
    small_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cuda = KindCheckingStreams()
    session = fake_device_session(small_bundle, monkeypatch, cuda)
    for slot in session._graphs.values():
        cuda.device += [slot.input.array, slot.output.array]
    rng = np.random.default_rng(7)
    host_in = rng.standard_normal((1, 16, session.dim)).astype(np.float32)
    client_in = rng.standard_normal((2, 16, session.dim)).astype(np.float32)  # plays a client's CUDA region
    client_out, host_out = np.full_like(client_in, np.nan), np.full_like(host_in, np.nan)
    cuda.device += [client_in, client_out]
    expected = cpu_answers(small_bundle, [host_in, client_in])
    before = cuda.launches
    ran = session.run_device_into([host_in, device_rows(client_in)], [host_out, device_rows(client_out)])
    assert ran == 4 and cuda.launches - before == 1  # 3 rows on bucket 4, one graph run
    assert cuda.kinds == [H2D, D2D, D2H, D2D]
    tolerance = TOLERANCE[session.bundle.precision]
    np.testing.assert_allclose(host_out, expected[0], rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(client_out, expected[1], rtol=tolerance, atol=tolerance)


def test_a_shape_without_a_captured_slot_goes_through_the_host(
    small_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cuda = KindCheckingStreams()
    session = fake_device_session(small_bundle, monkeypatch, cuda)
    plain = EncoderSession(load_bundle(small_bundle), SessionOptions(provider="cpu"))
    monkeypatch.setattr(session, "run", plain.run)  # the session's own uncaptured path, on the CPU
    x = np.random.default_rng(8).standard_normal((9, 16, session.dim)).astype(np.float32)  # more rows than 8
    out = np.full_like(x, np.nan)
    cuda.device += [x, out]
    assert session.run_device_into([device_rows(x)], [device_rows(out)]) == 9
    assert cuda.kinds == [D2H, H2D]
    tolerance = TOLERANCE[session.bundle.precision]
    np.testing.assert_allclose(out, cpu_answers(small_bundle, [x])[0], rtol=tolerance, atol=tolerance)


def test_refusals(small_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    session = fake_device_session(small_bundle, monkeypatch, KindCheckingStreams())
    dim = session.dim
    half = DeviceRows(1 << 20, (1, 16, dim), np.dtype(np.float16))
    with pytest.raises(ValueError, match="contiguous float32"):
        session.run_device_into([half], [half])
    rows = DeviceRows(1 << 20, (1, 16, dim), np.dtype(np.float32))
    with pytest.raises(ValueError, match="outs alike"):
        session.run_device_into([rows], [DeviceRows(1 << 20, (2, 16, dim), np.dtype(np.float32))])
    with pytest.raises(ValueError, match="one out per part"):
        session.run_device_into([rows], [])
    monkeypatch.setattr(session, "_cuda", None)  # no CUDA path: the engine host does not take CUDA regions then
    assert not session.reads_device_memory
    with pytest.raises(ValueError, match="reads_device_memory"):
        session.run_device_into([rows], [rows])


def test_device_rows_are_flagged_by_the_graphs_own_output(small_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine process's CUDA path: a client's NaN found by the captured graph's flags output, copied out with
    the answers: no check of its own per part, no host read."""
    cuda = KindCheckingStreams()
    session = fake_flags_session(small_bundle, monkeypatch, cuda)
    for slot in session._graphs.values():
        cuda.device += [slot.input.array, slot.output.array, slot.flags.array]
    host_checks: list[int] = []
    monkeypatch.setattr(merged, "finite_rows", lambda x: host_checks.append(1) or finite_rows(x))
    rng = np.random.default_rng(9)
    host_in = rng.standard_normal((1, 16, session.dim)).astype(np.float32)
    client_in = rng.standard_normal((2, 16, session.dim)).astype(np.float32)
    client_in[1, 3, 2] = np.nan
    client_out, host_out = np.full_like(client_in, 7.0), np.full_like(host_in, 7.0)
    cuda.device += [client_in, client_out]
    finite = np.zeros(3, bool)
    assert session.flags_device_rows
    session.run_device_into([host_in, device_rows(client_in)], [host_out, device_rows(client_out)], finite=finite)
    assert finite.tolist() == [True, True, False] and not host_checks
    assert cuda.kinds[-1] == D2H  # the flags, after the answers
    want = cpu_answers(small_bundle, [host_in, client_in[:1]])
    tolerance = TOLERANCE[session.bundle.precision]
    np.testing.assert_allclose(host_out, want[0], rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(client_out[:1], want[1], rtol=tolerance, atol=tolerance)  # the others unharmed


def test_a_batch_that_would_pad_far_runs_as_pieces_on_distinct_slots(
    small_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """7 rows on buckets 1..8 with pieces from 2 rows on: 4 + 2 + 1 (three runs, no padding), each row's answer
    and flag from the piece it ran in; an out over another part's input keeps one batch (inputs in first)."""
    monkeypatch.setattr(pipeline, "SPLIT_FROM", 2)
    cuda = KindCheckingStreams()
    session = fake_flags_session(small_bundle, monkeypatch, cuda)
    for slot in session._graphs.values():
        cuda.device += [slot.input.array, slot.output.array, slot.flags.array]
    rng = np.random.default_rng(10)
    host_in = rng.standard_normal((2, 16, session.dim)).astype(np.float32)
    client_in = rng.standard_normal((5, 16, session.dim)).astype(np.float32)
    client_in[4, 0, 0] = np.inf  # row 6 of the batch: the last piece's
    client_out, host_out = np.full_like(client_in, 7.0), np.full_like(host_in, 7.0)
    cuda.device += [client_in, client_out]
    finite = np.zeros(7, bool)
    before = cuda.launches
    ran = session.run_device_into([host_in, device_rows(client_in)], [host_out, device_rows(client_out)], finite)
    assert ran == 7 and cuda.launches - before == 3
    assert finite.tolist() == [True] * 6 + [False]
    want = cpu_answers(small_bundle, [host_in, client_in[:4]])
    tolerance = TOLERANCE[session.bundle.precision]
    np.testing.assert_allclose(host_out, want[0], rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(client_out[:4], want[1], rtol=tolerance, atol=tolerance)

    before = cuda.launches
    shared = rng.standard_normal((5, 16, session.dim)).astype(np.float32)
    cuda.device.append(shared)
    parts = [device_rows(shared[0:3]), device_rows(shared[3:5])]  # 5 rows: pieces 4 + 1 if nothing overlapped
    outs = [device_rows(shared[2:5]), device_rows(client_out[:2])]  # part 0's answer over part 1's input
    assert session.run_device_into(parts, outs) == 8 and cuda.launches - before == 1
