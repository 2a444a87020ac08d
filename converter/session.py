"""onnxruntime sessions for a bundle: the one module that imports ``onnxruntime`` for inference.

``EncoderSession.run`` takes a host array ``(B, S, D)`` and returns a host array the caller owns. On the CUDA
EP it uses io-binding, and for the warmed shapes (batch bucket x served sequence length) a captured CUDA graph
with fixed device buffers, one graph per shape. Other shapes run through io-binding without a graph.

Host path (``SessionOptions.host_path="pinned"``, the default on the CUDA EP): inputs are staged into
page-locked buffers with parallel host copies and sent with async copies on our own streams; outputs come
back by DMA straight into pinned arrays from a pool (see ``converter.pinned``). Batches of at least
``pipeline_min_batch`` run as four or more chunk graphs so that the copies of one chunk overlap the compute
of the next; ``run_into`` (merged batches from many parts, :mod:`converter.merged`) does the same by
``converter.pipeline``'s plan.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from converter.bundle import Bundle
from converter.devices import cuda_device_count
from converter.errors import ProviderError
from converter.finite import FLAGS_OUTPUT, with_finite_output
from converter.merged import MergedRuns
from converter.pinned import D2H, H2D, CudaRuntime, PinnedPool, data_ptr, load_cudart
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


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def onnxruntime_version() -> str:
    return str(ort.__version__)


@dataclass
class GraphSlot:
    """Fixed device buffers and binding for one captured CUDA graph."""

    graph_id: int
    binding: Any
    input: Any
    output: Any
    run_options: Any
    staging: np.ndarray | None = None  # pinned host copy of the input, reused every call
    flags: Any = None  # device (batch,) finiteness of the input's samples, when the graph computes them
    done: int = 0  # event recorded after this slot's output was copied out (pipelined path)
    extra: dict[str, Any] = field(default_factory=dict)


class EncoderSession(MergedRuns):
    """An onnxruntime session for a bundle that reports the provider that really runs; ``run_into`` and
    ``run_device_into`` (merged batches) are :class:`converter.merged.MergedRuns`'s."""

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
        self.flags_output: str | None = None  # set by _build when the graph also outputs finiteness flags
        self.session = self._build(candidates)
        self.provider = check_running_provider(self.options.provider, candidates, self.session.get_providers())
        if self.provider == CPU and any(p in GPU_PROVIDERS for p in candidates):
            log.warning("no GPU provider could start (tried %s): running on the CPU", candidates[:-1])
        log.info("session for %s runs on %s", bundle.model_path.name, self.provider)
        self._lock = threading.Lock()
        self._graphs: dict[tuple[int, int], GraphSlot] = {}
        self._spares: dict[tuple[int, int], GraphSlot] = {}  # second slot per chunk shape, for pipelining
        self._device_type = "cuda"
        self._cuda: CudaRuntime | None = None
        self._pool: PinnedPool | None = None
        self._flags: np.ndarray | None = None
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
        flags = self.options.finite_flags and self.options.cuda_graphs
        if flags and CUDA in candidates:  # the slot path: finiteness flags come with the answers
            try:
                flagged = self._with_flags(so)
                return ort.InferenceSession(flagged, sess_options=so, providers=candidates, provider_options=opts)
            except Exception as exc:  # still correct without: run_into then checks the inputs on the host
                log.warning("no finiteness output in the graph (NaN/Inf checked on the host): %s", exc)
                self.flags_output = None
        try:
            return ort.InferenceSession(
                str(self.bundle.model_path), sess_options=so, providers=candidates, provider_options=opts
            )
        except Exception as exc:
            raise ProviderError(f"cannot build an onnxruntime session with {candidates}: {exc}") from exc

    def _with_flags(self, so: ort.SessionOptions) -> bytes:
        """The bundle's model with :data:`converter.finite.FLAGS_OUTPUT` added (see :func:`with_finite_output`)."""
        import onnx
        from onnx.external_data_helper import uses_external_data

        proto = onnx.load(str(self.bundle.model_path), load_external_data=False)
        if any(uses_external_data(t) for t in proto.graph.initializer):  # read where they are, beside the model
            folder = str(self.bundle.directory)
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
        self.flags_output = FLAGS_OUTPUT
        return with_finite_output(proto, self.bundle.input_name, self.dtype).SerializeToString()

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

    def _run_graph(self, slot: GraphSlot, x: np.ndarray) -> np.ndarray:
        """onnxruntime's own copies: synchronous pageable memcpy in, a fresh numpy array out."""
        slot.input.update_inplace(x)
        self.session.run_with_iobinding(slot.binding, slot.run_options)
        return slot.output.numpy()

    def input_buffer(self, batch: int, seq: int) -> np.ndarray:
        """A (batch, seq, D) host array to fill and pass to ``run``: pinned on the GPU path, so no staging copy."""
        if self._pool is None:
            return np.empty((batch, seq, self.dim), self.dtype)
        return self._pool.empty((batch, seq, self.dim), self.dtype)

    def _stage_in(self, slot: GraphSlot, x: np.ndarray) -> None:
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

    def _run_pinned(self, slot: GraphSlot, x: np.ndarray) -> np.ndarray:
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

    def _graph_slot(self, batch: int, seq: int) -> GraphSlot:
        shape = (batch, seq, self.dim)
        dev, dev_id = self._device_type, self.options.device_id
        elem = self.dtype.type
        inp = ort.OrtValue.ortvalue_from_shape_and_type(shape, elem, dev, dev_id)
        out = ort.OrtValue.ortvalue_from_shape_and_type(shape, elem, dev, dev_id)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.bundle.input_name, inp)
        binding.bind_ortvalue_output(self.bundle.output_name, out)
        flags = None
        if self.flags_output is not None:
            flags = ort.OrtValue.ortvalue_from_shape_and_type((batch,), elem, dev, dev_id)
            binding.bind_ortvalue_output(self.flags_output, flags)
        run_options = ort.RunOptions()
        graph_id = len(self._graphs) + len(self._spares) + 1
        if self.uses_cuda_graphs:
            run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        slot = GraphSlot(graph_id, binding, inp, out, run_options, flags=flags)
        if self._pool is not None and self._cuda is not None:
            slot.staging = self._pool.empty(shape, self.dtype)
            slot.done = self._cuda.event()
        return slot

    def _capture(self, slot: GraphSlot, x: np.ndarray) -> None:
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
        return shapes

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
            "finite_flags": "graph output" if self.flags_output else "host",
            "onnxruntime": onnxruntime_version(),
        }
