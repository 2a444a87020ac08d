"""The production engine: a converter bundle on an onnxruntime session (TensorRT, CUDA or CPU EP)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from converter.bundle import Bundle, load_bundle
from converter.device_rows import Placed
from converter.providers import SessionOptions
from converter.session import EncoderSession
from service.engine.base import EngineUnrecoverable, batch_buckets
from service.engine.cuda_errors import is_sticky_cuda_error

log = logging.getLogger(__name__)


def served_seq_lens(seq_lens: tuple[int, ...], max_seq_len: int) -> tuple[int, ...]:
    """Warm-up sequence lengths the bundle can take; the longest allowed one if none of them fits."""
    fitting = tuple(sorted({s for s in seq_lens if 0 < s <= max_seq_len}))
    return fitting or (max_seq_len,)


def _classified(exc: Exception) -> Exception:
    """A sticky CUDA error as :class:`EngineUnrecoverable` (this process's context is lost: its engine process
    exits and is restarted); any other failure as it is (it fails its batch only)."""
    if is_sticky_cuda_error(exc):
        return EngineUnrecoverable(f"sticky CUDA error, this process's CUDA context is lost: {exc}")
    return exc


class OnnxEngine:
    """Wraps :class:`converter.session.EncoderSession`. Building it loads and checks the bundle (slow)."""

    def __init__(
        self,
        bundle: Bundle,
        provider: str = "auto",
        max_batch_size: int = 32,
        seq_lens: tuple[int, ...] = (196,),
        cuda_graphs: bool = True,
    ) -> None:
        self.bundle = bundle
        self.name = bundle.name
        self.dim = bundle.dim
        self.dtype = np.dtype(bundle.dtype)
        self.max_seq_len = bundle.max_seq_len
        self.buckets = batch_buckets(max_batch_size)
        self.seq_lens = served_seq_lens(seq_lens, bundle.max_seq_len)
        options = SessionOptions(
            provider=provider,
            batch_buckets=self.buckets,
            seq_lens=self.seq_lens,
            cuda_graphs=cuda_graphs,
        )
        self.session = EncoderSession(bundle, options)
        self.provider = self.session.provider
        # Captured CUDA graphs exist only for the bucket sizes: padding a batch up to one is what makes it fast.
        self.fixed_shapes = self.session.uses_cuda_graphs

    @classmethod
    def from_dir(cls, directory: str | Path, **kwargs: Any) -> OnnxEngine:
        return cls(load_bundle(directory), **kwargs)

    def run(self, x: np.ndarray) -> np.ndarray:
        try:
            return self.session.run(x)
        except Exception as exc:
            raise _classified(exc) from exc

    def run_into(
        self, parts: Sequence[np.ndarray], outs: Sequence[np.ndarray], finite: np.ndarray | None = None
    ) -> int:
        """One batch from many arrays (the engine process's merged worker batches), without a host gather;
        ``finite``: flags to fill, one per row (checked on the device where the batch is; see ``run_into``)."""
        try:
            return self.session.run_into(parts, outs, finite=finite)
        except Exception as exc:
            raise _classified(exc) from exc

    def run_device_into(self, parts: Sequence[Placed], outs: Sequence[Placed], finite: np.ndarray | None = None) -> int:
        """One batch whose parts or answers may lie in this GPU's memory (client CUDA shared-memory regions);
        ``finite``: flags to fill, one per row (from the graph's flags output: see ``flags_device_rows``)."""
        try:
            return self.session.run_device_into(parts, outs, finite=finite)
        except Exception as exc:
            raise _classified(exc) from exc

    @property
    def flags_device_rows(self) -> bool:
        """``run_device_into`` flags rows read from device memory (else they are checked before, where they lie)."""
        return self.session.flags_device_rows

    @property
    def reads_device_memory(self) -> bool:
        """Client CUDA regions can be computed device to device (``run_device_into``)."""
        return self.session.reads_device_memory

    def register_host(self, ptr: int, nbytes: int) -> bool:
        return self.session.register_host(ptr, nbytes)

    def unregister_host(self, ptr: int) -> None:
        self.session.unregister_host(ptr)

    def input_buffer(self, batch: int, seq: int) -> np.ndarray:
        return self.session.input_buffer(batch, seq)  # pinned on the CUDA path: no staging copy in run()

    def warmup(self) -> None:
        shapes = self.session.warmup()
        log.info("warmed up %s shapes (batch x seq) on %s", len(shapes), self.provider)

    def describe(self) -> dict[str, Any]:
        manifest = self.bundle.manifest
        return {
            "dims": manifest.get("dims", {"dim": self.dim}),
            "precision": self.bundle.precision,
            "directory": str(self.bundle.directory),
            "warmup_seq_lens": list(self.seq_lens),
            "session": self.session.describe(),
        }
