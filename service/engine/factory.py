"""Settings -> engine: the one place that decides which engine a process serves."""

from __future__ import annotations

from collections.abc import Callable

from service.engine.base import Engine
from service.settings import Settings


def build_engine(settings: Settings, cancelled: Callable[[], bool] | None = None) -> Engine:
    """The engine for ``settings`` (slow for a real bundle: loads and checks it, builds the session).

    A worker with ``engine_dir`` set attaches to the engine processes (one per device) instead of loading the model;
    if none serves at the moment it waits for one, unless ``cancelled()`` turns true (the process is stopping).
    """
    if settings.engine_dir is not None:
        from service.engine.router import RouterEngine

        in_flight = settings.in_flight_batches or None
        return RouterEngine(
            settings.engine_dir,
            cancelled=cancelled,
            in_flight=in_flight,
            workers=settings.workers,
            spread_ratio=settings.spread_ratio,
        )
    if settings.engine == "fake":
        # Test-only: lets reliability tests count engine calls and inject faults inside a real server process.
        from service.engine.fake import FakeEngine

        return FakeEngine(
            max_batch_size=settings.max_batch_size,
            delay_s=settings.fake_delay_s,
            sample_delay_s=settings.fake_sample_delay_s,
            record=False,
        )
    if settings.model_dir is None:
        raise ValueError("model_dir is not set: run `python -m service`, which converts the default model")
    from service.engine.onnx import OnnxEngine  # imported here: onnxruntime only where a real engine is built

    return OnnxEngine.from_dir(
        settings.model_dir,
        provider=settings.provider,
        max_batch_size=settings.max_batch_size,
        seq_lens=settings.seq_lens,
        cuda_graphs=settings.cuda_graphs,
    )
