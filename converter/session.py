"""onnxruntime sessions for a bundle: the one module that imports ``onnxruntime`` for inference.

``EncoderSession.run`` takes a host array ``(B, S, D)`` and returns a host array the caller owns. On the CUDA
EP it uses io-binding, and for the warmed shapes (batch bucket x served sequence length) a captured CUDA graph
with fixed device buffers, one graph per shape. Other shapes run through io-binding without a graph.

Host path (``SessionOptions.host_path="pinned"``, the default on the CUDA EP): inputs are staged into
page-locked buffers with parallel host copies and sent with async copies on our own streams; outputs come
back by DMA straight into pinned arrays from a pool (see ``converter.pinned``). Batches of at least
``pipeline_min_batch`` run as four or more chunk graphs so that the copies of one chunk overlap the compute
of the next; ``run_into`` (merged batches from many parts) does the same by ``converter.pipeline``'s plan.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from converter.bundle import Bundle
from converter.device_rows import DeviceRows, Placed, contiguous, source, target
from converter.devices import cuda_device_count
from converter.errors import ProviderError
from converter.finite import FiniteCheck, finite_rows
from converter.pinned import D2H, H2D, CudaRuntime, PinnedPool, data_ptr, load_cudart
from converter.pipeline import (
    Check,
    Slot,
    assign_slots,
    chunk_sizes,
    copy_plan,
    cross_aliased,
    pick_chunk,
    run_chunks,
)
from converter.providers import (
    CPU,
    CUDA,
    GPU_PROVIDERS,
    SessionOptions,
    candidate_providers,
    check_running_provider,
    provider_options,
)

log = logging.getLogger(__name__)
_GRAPH_WARM_RUNS = 3  # onnxruntime runs a shape once before it captures its graph
_PIPELINE_CHUNKS = 4  # at least this many chunks, so copies of one overlap compute of another
_COPY_THREADS = 8  # parallel host memcpy into pinned staging: one core copies ~10 GB/s, far below PCIe
_COPY_PART = 1 << 20  # below this many bytes per thread, thread hand-offs cost more than they save
# Pageable host arrays smaller than this go through onnxruntime's own copies: staging them cost more than it
# saved (H100, 2026-11-26: bs 8 0.755 ms staged vs 0.612 ms plain; bs 32 1.834 vs 1.908). Arrays from
# ``input_buffer`` are pinned and always take the pinned path (bs 8: 0.239 ms).
_PINNED_MIN_BYTES = 8 << 20


def _direct(array: np.ndarray, dtype: np.dtype[Any]) -> bool:
    """Can ``array`` be copied to/from the device as one contiguous block of the session's dtype?"""
    return array.dtype == dtype and bool(array.flags.c_contiguous)


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def onnxruntime_version() -> str:
    return str(ort.__version__)


@dataclass
class _GraphSlot:
    """Fixed device buffers and binding for one captured CUDA graph."""

    graph_id: int
    binding: Any
    input: Any
    output: Any
    run_options: Any
    staging: np.ndarray | None = None  # pinned host copy of the input, reused every call
    done: int = 0  # event recorded after this slot's output was copied out (pipelined path)
    extra: dict[str, Any] = field(default_factory=dict)


class EncoderSession:
    """An onnxruntime session for a bundle that reports the provider that really runs."""

    def __init__(self, bundle: Bundle, options: SessionOptions | None = None) -> None:
        self.bundle = bundle
        self.options = options or SessionOptions()
        self.dtype = np.dtype(bundle.dtype)
        self.dim = bundle.dim
        available = available_providers()
        cuda_devices = cuda_device_count()
        candidates = candidate_providers(self.options.provider, available, cuda_devices)
        if self.options.provider == "auto" and cuda_devices == 0:
            log.warning("no CUDA device visible: provider auto is running on the CPU")
        if any(p in GPU_PROVIDERS for p in candidates) and hasattr(ort, "preload_dlls"):
            # Finds CUDA/cuDNN libraries shipped in pip wheels (torch's nvidia-* packages).
            try:
                ort.preload_dlls()
            except Exception as exc:  # not fatal: the session build below says what really loaded
                log.warning("onnxruntime.preload_dlls failed: %s", exc)
        self.session = self._build(candidates)
        self.provider = check_running_provider(self.options.provider, candidates, self.session.get_providers())
        if self.provider == CPU and any(p in GPU_PROVIDERS for p in candidates):
            log.warning("no GPU provider could start (tried %s): running on the CPU", candidates[:-1])
        log.info("session for %s runs on %s", bundle.model_path.name, self.provider)
        self._lock = threading.Lock()
        self._graphs: dict[tuple[int, int], _GraphSlot] = {}
        self._spares: dict[tuple[int, int], _GraphSlot] = {}  # second slot per chunk shape, for pipelining
        self._device_type = "cuda"
        self._cuda: CudaRuntime | None = None
        self._pool: PinnedPool | None = None
        self._finite: FiniteCheck | None = None  # built at the first checked batch on the device
        if self.uses_slots and self.options.host_path == "pinned":
            self._cuda = load_cudart()
        if self._cuda is not None:
            self._pool = PinnedPool(self._cuda)
            self._in_stream, self._out_stream = self._cuda.stream(), self._cuda.stream()
            self._copiers = ThreadPoolExecutor(_COPY_THREADS, thread_name_prefix="pinned-copy")
            self._stager = ThreadPoolExecutor(1, thread_name_prefix="pinned-stage")

    @property
    def on_gpu(self) -> bool:
        return self.provider in GPU_PROVIDERS

    @property
    def uses_cuda_graphs(self) -> bool:
        capturable = bool(self.bundle.manifest.get("cuda_graphs", True))  # see converter.graph_opt.NO_CUDA_GRAPH
        return self.provider == CUDA and self.options.cuda_graphs and capturable

    @property
    def uses_slots(self) -> bool:
        """Fixed device buffers per warmed shape (captured as a graph when the bundle allows it)."""
        return self.provider == CUDA and self.options.cuda_graphs

    def _build(self, candidates: list[str]) -> ort.InferenceSession:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.options.intra_op_threads:
            so.intra_op_num_threads = self.options.intra_op_threads
        # A bundle whose graph cannot be captured (manifest "cuda_graphs": false) gets the EP's graph mode off.
        capturable = bool(self.bundle.manifest.get("cuda_graphs", True))
        opts = provider_options(
            candidates,
            self.bundle.directory,
            dataclasses.replace(self.options, cuda_graphs=self.options.cuda_graphs and capturable),
            self.bundle.input_name,
            self.dim,
            self.bundle.max_seq_len,
            fp16=self.bundle.precision == "fp16",
        )
        try:
            return ort.InferenceSession(
                str(self.bundle.model_path), sess_options=so, providers=candidates, provider_options=opts
            )
        except Exception as exc:
            raise ProviderError(f"cannot build an onnxruntime session with {candidates}: {exc}") from exc

    def _check(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 3 or x.shape[2] != self.dim:
            raise ValueError(f"expected (batch, seq, {self.dim}), got {x.shape}")
        return np.ascontiguousarray(x, dtype=self.dtype)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Host (B, S, D) in, host (B, S, D) out, owned by the caller. Thread-safe (the batcher uses one thread)."""
        x = self._check(x)
        if not self.on_gpu:
            return self.session.run([self.bundle.output_name], {self.bundle.input_name: x})[0]
        with self._lock:
            key = (x.shape[0], x.shape[1])
            slot = self._graphs.get(key)
            if slot is None:
                return self._run_bound(x)
            if self._pool is None or (x.nbytes < _PINNED_MIN_BYTES and not self._pool.owns(x)):
                return self._run_graph(slot, x)
            chunk = self._chunk_for(*key)
            if chunk:
                return self._run_pipelined(x, chunk)
            return self._run_pinned(slot, x)

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
        slot checked on the device input of each chunk (:class:`converter.finite.FiniteCheck`), so the host never
        reads the inputs for it; else on the host before computing. A non-finite row is computed all the same (its
        answer is garbage; the others do not depend on it). Returns the batch size that ran, padding included.
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
        with self._lock:
            return self._run_into_chunks([int(p.shape[0]) for p in parts], (ins, ats), chunk, seq, finite)

    def run_device_into(self, parts: Sequence[Placed], outs: Sequence[Placed]) -> int:
        """:meth:`run_into` where some parts or outs lie in this GPU's memory (:class:`DeviceRows`: a client's CUDA
        shared-memory region): each goes into its rows of the captured slot with one device-to-device copy, and
        its answer out of them with one; host arrays with one host-to-device / device-to-host copy each, as in
        ``run_into``. One serial batch on the smallest captured bucket that holds every row (no pipelining: the
        device copies cost microseconds). ValueError when no captured shape holds them, or an item is not one
        contiguous block of the session's dtype. Returns the batch size that ran, padding included.
        """
        if not any(isinstance(item, DeviceRows) for item in (*parts, *outs)):
            return self.run_into(parts, outs)  # type: ignore[arg-type]  # all host arrays
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
        if not buckets:  # a shape that was not warmed up: through the host, still correct
            return self._run_device_via_host(parts, outs)
        slot, cuda = self._graphs[(buckets[0], seq)], self._cuda
        with self._lock:
            at = slot.input.data_ptr()
            for part in parts:
                address, kind = source(part)
                cuda.copy(at, address, part.nbytes, kind, self._in_stream)
                at += part.nbytes
            cuda.sync(self._in_stream)
            self.session.run_with_iobinding(slot.binding, slot.run_options)
            at = slot.output.data_ptr()
            for out in outs:
                address, kind = target(out)
                cuda.copy(address, at, out.nbytes, kind, self._out_stream)
                at += out.nbytes
            cuda.sync(self._out_stream)
        return buckets[0]

    @property
    def reads_device_memory(self) -> bool:
        """Can :meth:`run_device_into` take device-resident parts (the CUDA path with captured slots)?"""
        return self._cuda is not None

    def _run_device_via_host(self, parts: Sequence[Placed], outs: Sequence[Placed]) -> int:
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
        check = None if finite is None else self._finite_check(finite, seq)
        plan = copy_plan(part_rows, sizes)
        run_chunks(self._cuda, streams, [stages[id(s)] for s in chosen], plan, *ptrs, row_bytes, check)
        return sum(sizes)

    def _finite_check(self, finite: np.ndarray, seq: int) -> Check:
        """The chunk hook of :func:`run_chunks` that fills ``finite`` from each slot's device input."""
        if self._finite is None:
            self._finite = FiniteCheck(self.dtype, self.provider, self.options.device_id)

        def check(slot: Slot, rows: int, first_row: int) -> None:
            assert self._finite is not None
            finite[first_row : first_row + rows] = self._finite.device(slot.input, (rows, seq, self.dim))

        return check

    def _stage(self, slot: _GraphSlot) -> Slot:
        launch = functools.partial(self.session.run_with_iobinding, slot.binding, slot.run_options)
        return Slot(slot.input.data_ptr(), slot.output.data_ptr(), slot.done, launch)

    def _slot_holding(self, rows: int, seq: int) -> _GraphSlot | None:
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

    def _run_graph(self, slot: _GraphSlot, x: np.ndarray) -> np.ndarray:
        """onnxruntime's own copies: synchronous pageable memcpy in, a fresh numpy array out."""
        slot.input.update_inplace(x)
        self.session.run_with_iobinding(slot.binding, slot.run_options)
        return slot.output.numpy()

    def input_buffer(self, batch: int, seq: int) -> np.ndarray:
        """A (batch, seq, D) host array to fill and pass to ``run``: pinned on the GPU path, so no staging copy."""
        if self._pool is None:
            return np.empty((batch, seq, self.dim), self.dtype)
        return self._pool.empty((batch, seq, self.dim), self.dtype)

    def _stage_in(self, slot: _GraphSlot, x: np.ndarray) -> None:
        """Host copy into the slot's pinned staging (parallel when big), then an async DMA on the input stream.

        An ``x`` that already lives in our pinned pool (``input_buffer``) is sent as is.
        """
        assert self._cuda is not None and self._pool is not None and slot.staging is not None
        source = x
        if not self._pool.owns(x):
            source = slot.staging
            parts = min(_COPY_THREADS, x.shape[0], max(1, x.nbytes // _COPY_PART))
            if parts == 1:
                np.copyto(source, x)
            else:
                rows = np.array_split(np.arange(x.shape[0]), parts)
                jobs = [self._copiers.submit(np.copyto, source[r[0] : r[-1] + 1], x[r[0] : r[-1] + 1]) for r in rows]
                for job in jobs:
                    job.result()
        self._cuda.copy(slot.input.data_ptr(), data_ptr(source), x.nbytes, H2D, self._in_stream)
        self._cuda.sync(self._in_stream)

    def _run_pinned(self, slot: _GraphSlot, x: np.ndarray) -> np.ndarray:
        assert self._cuda is not None and self._pool is not None
        self._stage_in(slot, x)
        self.session.run_with_iobinding(slot.binding, slot.run_options)
        out = self._pool.empty(x.shape, self.dtype)
        self._cuda.copy(data_ptr(out), slot.output.data_ptr(), out.nbytes, D2H, self._out_stream)
        self._cuda.sync(self._out_stream)
        return out

    def _chunk_for(self, batch: int, seq: int) -> int:
        """Largest captured chunk size giving at least _PIPELINE_CHUNKS equal chunks, or 0 for no pipelining."""
        if batch < self.options.pipeline_min_batch:
            return 0
        for size in sorted(self.options.batch_buckets, reverse=True):
            if batch % size == 0 and batch // size >= _PIPELINE_CHUNKS and (size, seq) in self._spares:
                return size
        return 0

    def _run_pipelined(self, x: np.ndarray, chunk: int) -> np.ndarray:
        """Chunk i computes while chunk i+1 is staged and copied in and chunk i-1 is copied out."""
        assert self._cuda is not None and self._pool is not None
        cuda, seq = self._cuda, x.shape[1]
        slots = (self._graphs[(chunk, seq)], self._spares[(chunk, seq)])
        count = x.shape[0] // chunk
        out = self._pool.empty(x.shape, self.dtype)
        pending: Future[None] = self._stager.submit(self._stage_in, slots[0], x[:chunk])
        for i in range(count):
            slot = slots[i % 2]
            pending.result()  # chunk i is on the device
            if i + 1 < count:
                nxt = x[(i + 1) * chunk : (i + 2) * chunk]
                pending = self._stager.submit(self._stage_in, slots[(i + 1) % 2], nxt)
            if i >= 2:
                cuda.wait(slot.done)  # chunk i-2's output, in this slot, has left the device
            self.session.run_with_iobinding(slot.binding, slot.run_options)
            part = out[i * chunk : (i + 1) * chunk]
            cuda.copy(data_ptr(part), slot.output.data_ptr(), part.nbytes, D2H, self._out_stream)
            cuda.record(slot.done, self._out_stream)
        cuda.sync(self._out_stream)
        return out

    def _run_bound(self, x: np.ndarray) -> np.ndarray:
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.bundle.input_name, x)
        binding.bind_output(self.bundle.output_name, self._device_type, self.options.device_id)
        run_options = ort.RunOptions()
        if self.uses_cuda_graphs:
            run_options.add_run_config_entry("gpu_graph_id", "-1")  # this shape has no graph
        self.session.run_with_iobinding(binding, run_options)
        return binding.copy_outputs_to_cpu()[0]

    def _graph_slot(self, batch: int, seq: int) -> _GraphSlot:
        shape = (batch, seq, self.dim)
        dev, dev_id = self._device_type, self.options.device_id
        elem = self.dtype.type
        inp = ort.OrtValue.ortvalue_from_shape_and_type(shape, elem, dev, dev_id)
        out = ort.OrtValue.ortvalue_from_shape_and_type(shape, elem, dev, dev_id)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.bundle.input_name, inp)
        binding.bind_ortvalue_output(self.bundle.output_name, out)
        run_options = ort.RunOptions()
        graph_id = len(self._graphs) + len(self._spares) + 1
        if self.uses_cuda_graphs:
            run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        slot = _GraphSlot(graph_id, binding, inp, out, run_options)
        if self._pool is not None and self._cuda is not None:
            slot.staging = self._pool.empty(shape, self.dtype)
            slot.done = self._cuda.event()
        return slot

    def _capture(self, slot: _GraphSlot, x: np.ndarray) -> None:
        for _ in range(_GRAPH_WARM_RUNS):
            if self._pool is not None:
                self._run_pinned(slot, x)
            else:
                self._run_graph(slot, x)

    def warmup(self, seed: int = 0) -> list[tuple[int, int]]:
        """Run every (batch bucket, served seq length) shape; on the CUDA EP capture one graph each.

        With the pinned host path, chunk shapes used by pipelined batches get a second graph (own buffers).
        """
        rng = np.random.default_rng(seed)
        shapes = [(b, s) for s in self.options.seq_lens for b in self.options.batch_buckets]
        for batch, seq in shapes:
            x = rng.standard_normal((batch, seq, self.dim)).astype(self.dtype)
            if self.uses_slots:
                with self._lock:
                    slot = self._graphs.get((batch, seq)) or self._graph_slot(batch, seq)
                    self._capture(slot, x)
                    self._graphs[(batch, seq)] = slot
            else:
                self.run(x)
        if self._pool is not None:
            self._capture_spares(shapes, rng)
            self._warm_finite_check()
        return shapes

    def _warm_finite_check(self) -> None:
        """Build the device finiteness check now and run it once on each slot shape, not at the first checked batch."""
        with self._lock:
            self._finite = self._finite or FiniteCheck(self.dtype, self.provider, self.options.device_id)
            for (batch, seq), slot in sorted(self._graphs.items()):
                self._finite.device(slot.input.data_ptr(), (batch, seq, self.dim))

    def _capture_spares(self, shapes: list[tuple[int, int]], rng: np.random.Generator) -> None:
        """Second slots for the chunk shapes of big ``run`` batches and for ``pipeline_chunks`` (run_into)."""
        buckets = sorted(self.options.batch_buckets, reverse=True)
        wanted = []
        for batch, seq in shapes:
            if batch >= self.options.pipeline_min_batch:
                wanted.append((next((c for c in buckets if batch % c == 0 and batch // c >= _PIPELINE_CHUNKS), 0), seq))
            if batch in self.options.pipeline_chunks and batch < buckets[0]:
                wanted.append((batch, seq))
        for chunk, seq in wanted:
            if chunk and (chunk, seq) not in self._spares:
                x = rng.standard_normal((chunk, seq, self.dim)).astype(self.dtype)
                with self._lock:
                    slot = self._graph_slot(chunk, seq)
                    self._capture(slot, x)
                    self._spares[(chunk, seq)] = slot

    def replay(self, batch: int, seq: int) -> None:
        """Re-run a captured shape on the data already on the device: pure engine time, for benchmarks."""
        with self._lock:
            slot = self._graphs[(batch, seq)]
            self.session.run_with_iobinding(slot.binding, slot.run_options)

    def describe(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "providers": self.session.get_providers(),
            "cuda_graph_shapes": sorted(self._graphs),
            "host_path": "pinned" if self._pool is not None else "pageable",
            "pipelined_chunk_shapes": sorted(self._spares),
            "onnxruntime": onnxruntime_version(),
        }
