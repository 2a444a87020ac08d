"""Merged batches for the engine process, on the captured slots of :class:`converter.session.EncoderSession`:
``run_into`` (many host parts, answers straight into their outs) and ``run_device_into`` (parts in GPU memory too).

Host parts are copied straight into their rows of a captured slot's device input and the answers straight out
of its output rows, pipelined in chunks (:mod:`converter.pipeline`) when the batch is big enough; from pinned
or registered memory (``register_host``) these copies are DMA. Each row's finiteness is found on the way.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from converter.device_rows import DeviceRows, Placed, contiguous, source, target
from converter.finite import finite_rows
from converter.pinned import D2H, H2D, CudaRuntime, PinnedPool, data_ptr
from converter.pipeline import (
    Slot,
    assign_slots,
    chunk_sizes,
    copy_plan,
    cross_aliased,
    pick_chunk,
    run_chunks,
    serial_pieces,
)
from converter.providers import SessionOptions

if TYPE_CHECKING:
    from converter.session import GraphSlot


def _direct(array: np.ndarray, dtype: np.dtype[Any]) -> bool:
    """Can ``array`` be copied to/from the device as one contiguous block of the session's dtype?"""
    return array.dtype == dtype and bool(array.flags.c_contiguous)


class MergedRuns:
    """The ``run_into`` family of :class:`converter.session.EncoderSession` (a mixin: the session's state)."""

    session: Any
    options: SessionOptions
    provider: str
    dtype: np.dtype[Any]
    dim: int
    _lock: threading.Lock
    _graphs: dict[tuple[int, int], GraphSlot]
    _spares: dict[tuple[int, int], GraphSlot]
    _cuda: CudaRuntime | None
    _in_stream: int
    _out_stream: int
    _pool: PinnedPool | None
    _flags: np.ndarray | None  # host memory the finiteness flags are copied to (see _flag_buffer)
    flags_output: str | None

    if TYPE_CHECKING:

        def run(self, x: np.ndarray) -> np.ndarray: ...

    def run_into(
        self,
        parts: Sequence[np.ndarray],
        outs: Sequence[np.ndarray],
        *,
        chunk: int | None = None,
        finite: np.ndarray | None = None,
    ) -> int:
        """Compute the concatenation of ``parts`` (each ``(b_i, S, D)``) as one batch, writing into ``outs``.

        With a captured shape that holds them (the smallest batch bucket >= the total), every part is copied
        straight into its rows of the device input and every answer straight out of its rows into its ``out``:
        no host-side gather or scatter; from pinned or registered memory (:meth:`register_host`) the copies are
        DMA. Rows past the total keep whatever an earlier batch left there: every sample is computed on its own,
        so they cannot change the real rows. ``outs`` may be the ``parts`` themselves (answers replace inputs).
        Enough rows run as pipelined chunks (:mod:`converter.pipeline`; ``chunk``: None picks by
        ``SessionOptions.pipeline_min_chunks``, 0 forces one serial batch, N forces chunks of N rows).
        ``finite`` (bool, one per row of the concatenated parts) is filled with each row's finiteness: on a captured
        slot it is an output of the graph itself (:func:`converter.finite.with_finite_output`), copied out with
        the answers, so the host never reads the inputs for it; else found on the host before computing. A
        non-finite row is computed all the same (its answer is garbage; the others do not depend on it). Returns
        the batch size that ran, padding included.
        """
        if not parts or len(parts) != len(outs):
            raise ValueError(f"run_into needs one out per part, got {len(parts)} parts and {len(outs)} outs")
        seq = int(parts[0].shape[1]) if parts[0].ndim == 3 else -1
        for part, out in zip(parts, outs, strict=True):
            if part.ndim != 3 or part.shape[1:] != (seq, self.dim) or out.shape != part.shape:
                wanted = f"(b, {seq}, {self.dim})"
                raise ValueError(f"parts must be {wanted} with outs alike, got {part.shape} -> {out.shape}")
        rows = sum(int(part.shape[0]) for part in parts)
        if finite is not None and finite.shape != (rows,):
            raise ValueError(f"finite must hold one flag per row ({rows}), got shape {finite.shape}")
        slot = self._slot_holding(rows, seq) if self._cuda is not None else None
        if slot is None or not all(_direct(a, self.dtype) for a in (*parts, *outs)):
            x = np.concatenate(parts)
            if finite is not None:
                finite[:] = finite_rows(x.astype(self.dtype, copy=False))  # before outs (maybe the parts) change
            answer = self.run(x)
            offset = 0
            for out in outs:
                np.copyto(out, answer[offset : offset + out.shape[0]])
                offset += out.shape[0]
            return rows
        if chunk is None:
            chunk = pick_chunk(rows, [c for c, s in self._spares if s == seq], self.options.pipeline_min_chunks)
        ins, ats, sizes = [data_ptr(p) for p in parts], [data_ptr(o) for o in outs], [p.nbytes for p in parts]
        if chunk and cross_aliased(list(zip(ins, sizes, strict=True)), list(zip(ats, sizes, strict=True))):
            chunk = 0  # an answer could overwrite input rows not yet copied in: copy every input in first
        if finite is not None and self.flags_output is None:  # slots whose graph has no flags: on the host
            finite[:] = np.concatenate([finite_rows(part) for part in parts])
            finite = None
        with self._lock:
            return self._run_into_chunks([int(p.shape[0]) for p in parts], (ins, ats), chunk, seq, finite)

    def run_device_into(self, parts: Sequence[Placed], outs: Sequence[Placed], finite: np.ndarray | None = None) -> int:
        """:meth:`run_into` where some parts or outs lie in this GPU's memory (:class:`DeviceRows`: a client's CUDA
        shared-memory region): each goes into its rows of the captured slot with one device-to-device copy, and
        its answer out of them with one; host arrays with one host-to-device / device-to-host copy each, as in
        ``run_into``. Serial runs (no pipelining: the device copies cost microseconds) on the smallest captured
        bucket that holds every row, or on a few buckets where that one would pad far (:func:`serial_pieces`).
        ValueError when an item is not one contiguous block of the session's dtype. Returns the rows that ran,
        padding included.

        ``finite`` (one flag per row of the parts) is filled with each row's finiteness from the graph's flags
        output, copied out with the answers (no run of its own, no host read). Without that output
        (:attr:`flags_device_rows` False) host rows are checked on the host and device rows are left True: the
        caller checks those where they lie before.
        """
        if not any(isinstance(item, DeviceRows) for item in (*parts, *outs)):
            return self.run_into(parts, outs, finite=finite)  # type: ignore[arg-type]  # all host arrays
        if not parts or len(parts) != len(outs):
            raise ValueError(f"run_device_into needs one out per part, got {len(parts)} parts and {len(outs)} outs")
        seq = int(parts[0].shape[1]) if parts[0].ndim == 3 else -1
        for part, out in zip(parts, outs, strict=True):
            if part.ndim != 3 or tuple(part.shape[1:]) != (seq, self.dim) or tuple(out.shape) != tuple(part.shape):
                wanted = f"(b, {seq}, {self.dim})"
                raise ValueError(f"parts must be {wanted} with outs alike, got {part.shape} -> {out.shape}")
            if not (contiguous(part, self.dtype) and contiguous(out, self.dtype)):
                raise ValueError(f"parts and outs must be contiguous {self.dtype.name}")
        rows = sum(int(part.shape[0]) for part in parts)
        if self._cuda is None:
            raise ValueError("device-resident parts need the CUDA path with captured slots (reads_device_memory)")
        buckets = sorted(b for b, s in self._graphs if s == seq and b >= rows)
        if finite is not None and finite.shape != (rows,):
            raise ValueError(f"finite must hold one flag per row ({rows}), got shape {finite.shape}")
        if not buckets:  # a shape that was not warmed up: through the host, still correct
            return self._run_device_via_host(parts, outs, finite)
        ins, ats = [source(part) for part in parts], [target(out) for out in outs]
        sizes = serial_pieces(rows, sorted(b for b, s in self._graphs if s == seq))
        nbytes = [part.nbytes for part in parts]
        if len(sizes) > 1 and cross_aliased(
            [(a, n) for (a, _), n in zip(ins, nbytes, strict=True)],
            [(a, n) for (a, _), n in zip(ats, nbytes, strict=True)],
        ):
            sizes = [buckets[0]]  # an answer could land on input rows of a later piece: every input in first
        slots, cuda = [self._graphs[(size, seq)] for size in sizes], self._cuda
        if finite is not None and any(slot.flags is None for slot in slots):
            finite[:] = np.concatenate([_host_finite(part) for part in parts])
            finite = None
        row_bytes = seq * self.dim * self.dtype.itemsize
        flags = None if finite is None else self._flag_buffer(rows)
        with self._lock:
            first = 0
            for slot, spans in zip(slots, copy_plan([int(p.shape[0]) for p in parts], sizes), strict=True):
                for span in spans:  # into the slot, then run: one piece of the batch
                    address, kind = ins[span.part]
                    at = slot.input.data_ptr() + span.slot_row * row_bytes
                    cuda.copy(at, address + span.part_row * row_bytes, span.rows * row_bytes, kind, self._in_stream)
                cuda.sync(self._in_stream)
                self.session.run_with_iobinding(slot.binding, slot.run_options)
                for span in spans:  # the answers out (distinct slots: the next piece does not wait for them)
                    address, kind = ats[span.part]
                    at = slot.output.data_ptr() + span.slot_row * row_bytes
                    cuda.copy(address + span.part_row * row_bytes, at, span.rows * row_bytes, kind, self._out_stream)
                done = sum(span.rows for span in spans)
                if flags is not None:
                    where = data_ptr(flags) + first * flags.itemsize
                    cuda.copy(where, slot.flags.data_ptr(), done * flags.itemsize, D2H, self._out_stream)
                first += done
            cuda.sync(self._out_stream)
            if finite is not None and flags is not None:
                finite[:] = flags[:rows] == 0  # NaN for a sample holding a NaN or an infinity
        return sum(sizes)

    @property
    def flags_device_rows(self) -> bool:
        """Does :meth:`run_device_into` flag the finiteness of device rows (the graph's flags output)?"""
        return self._cuda is not None and self.flags_output is not None

    @property
    def reads_device_memory(self) -> bool:
        """Can :meth:`run_device_into` take device-resident parts (the CUDA path with captured slots)?"""
        return self._cuda is not None

    def _run_device_via_host(
        self, parts: Sequence[Placed], outs: Sequence[Placed], finite: np.ndarray | None = None
    ) -> int:
        """:meth:`run_device_into` for a shape without a captured slot: device parts copied to the host, one
        :meth:`run`, answers copied back (rare: a sequence length that was not warmed up)."""
        assert self._cuda is not None
        arrays = []
        for part in parts:
            if isinstance(part, DeviceRows):
                host = np.empty(part.shape, self.dtype)
                self._cuda.copy(data_ptr(host), part.pointer, part.nbytes, D2H, self._in_stream)
                part = host
            arrays.append(part)
        self._cuda.sync(self._in_stream)
        if finite is not None:
            finite[:] = np.concatenate([finite_rows(array) for array in arrays])
        answer = self.run(np.concatenate(arrays))
        offset = 0
        for out in outs:
            rows = answer[offset : offset + out.shape[0]]
            offset += out.shape[0]
            if isinstance(out, DeviceRows):
                self._cuda.copy(out.pointer, data_ptr(np.ascontiguousarray(rows)), out.nbytes, H2D, self._out_stream)
                self._cuda.sync(self._out_stream)  # each: the temporary goes with this iteration
            else:
                np.copyto(out, rows)
        return offset

    def _run_into_chunks(
        self,
        part_rows: list[int],
        ptrs: tuple[list[int], list[int]],
        chunk: int,
        seq: int,
        finite: np.ndarray | None = None,
    ) -> int:
        """Chunks of ``chunk`` rows on their two slots (a smaller tail on its bucket's); 0: one batch, one slot.
        ``ptrs``: the host addresses of the parts and of their outs; ``finite``: flags to fill, one per row."""
        assert self._cuda is not None
        if chunk and (chunk, seq) not in self._spares:
            raise ValueError(f"no pipelined slots for chunks of {chunk} rows at seq {seq}")
        buckets = sorted(b for b, s in self._graphs if s == seq)
        sizes = chunk_sizes(sum(part_rows), chunk or buckets[-1], buckets)
        chosen = [(self._spares if spare else self._graphs)[(size, seq)] for size, spare in assign_slots(sizes, chunk)]
        stages = {id(s): self._stage(s) for s in chosen}
        row_bytes = seq * self.dim * self.dtype.itemsize
        streams = (self._in_stream, self._out_stream)
        flags = None if finite is None else self._flag_buffer(finite.shape[0])
        plan = copy_plan(part_rows, sizes)
        where = None if flags is None else (data_ptr(flags), flags.itemsize)
        run_chunks(self._cuda, streams, [stages[id(s)] for s in chosen], plan, *ptrs, row_bytes, where)
        if finite is not None and flags is not None:
            finite[:] = flags[: finite.shape[0]] == 0  # NaN for a sample holding a NaN or an infinity
        return sum(sizes)

    def _flag_buffer(self, rows: int) -> np.ndarray:
        """Host memory for ``rows`` finiteness flags (page-locked on the CUDA path), reused by every batch."""
        if self._flags is None or self._flags.shape[0] < rows:
            size = max(rows, max(self.options.batch_buckets))
            self._flags = np.empty(size, self.dtype) if self._pool is None else self._pool.empty((size,), self.dtype)
        return self._flags

    def _stage(self, slot: GraphSlot) -> Slot:
        launch = functools.partial(self.session.run_with_iobinding, slot.binding, slot.run_options)
        flags = 0 if slot.flags is None else slot.flags.data_ptr()
        return Slot(slot.input.data_ptr(), slot.output.data_ptr(), slot.done, launch, flags)

    def _slot_holding(self, rows: int, seq: int) -> GraphSlot | None:
        """The captured slot of the smallest batch bucket >= ``rows`` at ``seq``, if any."""
        sizes = sorted(b for b, s in self._graphs if s == seq and b >= rows)
        return self._graphs[(sizes[0], seq)] if sizes else None

    def register_host(self, ptr: int, nbytes: int) -> bool:
        """Page-lock host memory this session will copy from/to (a worker's shared arena); False off the CUDA path."""
        if self._cuda is None:
            return False
        self._cuda.host_register(ptr, nbytes)
        return True

    def unregister_host(self, ptr: int) -> None:
        if self._cuda is not None:
            self._cuda.host_unregister(ptr)


def _host_finite(part: Placed) -> np.ndarray:
    """Row finiteness of a host part; True for device rows (checked by the caller where they lie)."""
    return finite_rows(part) if isinstance(part, np.ndarray) else np.ones(int(part.shape[0]), bool)
