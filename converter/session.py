"""onnxruntime sessions for a bundle: the one module that imports ``onnxruntime`` for inference.

``EncoderSession.run`` takes a host array ``(B, S, D)`` and returns a host array. On the CUDA EP it uses
io-binding, and for the warmed shapes (batch bucket x served sequence length) a captured CUDA graph with
fixed device buffers, one graph per shape. Other shapes run through io-binding without a graph.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from converter.bundle import Bundle
from converter.errors import ProviderError
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


class EncoderSession:
    """An onnxruntime session for a bundle that reports the provider that really runs."""

    def __init__(self, bundle: Bundle, options: SessionOptions | None = None) -> None:
        self.bundle = bundle
        self.options = options or SessionOptions()
        self.dtype = np.dtype(bundle.dtype)
        self.dim = bundle.dim
        available = available_providers()
        candidates = candidate_providers(self.options.provider, available)
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
        self._device_type = "cuda"

    @property
    def on_gpu(self) -> bool:
        return self.provider in GPU_PROVIDERS

    @property
    def uses_cuda_graphs(self) -> bool:
        return self.provider == CUDA and self.options.cuda_graphs

    def _build(self, candidates: list[str]) -> ort.InferenceSession:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.options.intra_op_threads:
            so.intra_op_num_threads = self.options.intra_op_threads
        opts = provider_options(
            candidates,
            self.bundle.directory,
            self.options,
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
        """Host (B, S, D) in, host (B, S, D) out. Thread-safe; the batcher calls it from one thread."""
        x = self._check(x)
        if not self.on_gpu:
            return self.session.run([self.bundle.output_name], {self.bundle.input_name: x})[0]
        with self._lock:
            slot = self._graphs.get((x.shape[0], x.shape[1]))
            if slot is not None:
                return self._run_graph(slot, x)
            return self._run_bound(x)

    def _run_graph(self, slot: _GraphSlot, x: np.ndarray) -> np.ndarray:
        slot.input.update_inplace(x)
        self.session.run_with_iobinding(slot.binding, slot.run_options)
        return slot.output.numpy()

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
        graph_id = len(self._graphs) + 1
        run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        return _GraphSlot(graph_id, binding, inp, out, run_options)

    def warmup(self, seed: int = 0) -> list[tuple[int, int]]:
        """Run every (batch bucket, served seq length) shape; on the CUDA EP capture one graph each."""
        rng = np.random.default_rng(seed)
        shapes = [(b, s) for s in self.options.seq_lens for b in self.options.batch_buckets]
        for batch, seq in shapes:
            x = rng.standard_normal((batch, seq, self.dim)).astype(self.dtype)
            if self.uses_cuda_graphs:
                with self._lock:
                    slot = self._graphs.get((batch, seq)) or self._graph_slot(batch, seq)
                    for _ in range(_GRAPH_WARM_RUNS):
                        self._run_graph(slot, x)
                    self._graphs[(batch, seq)] = slot
            else:
                self.run(x)
        return shapes

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
            "onnxruntime": onnxruntime_version(),
        }
