"""Engines: what computes a batch. ``onnx`` is the only module that touches converter.session/onnxruntime."""

from __future__ import annotations

from service.engine.base import Engine, EngineUnrecoverable, batch_buckets
from service.engine.fake import FakeEngine

__all__ = ["Engine", "EngineUnrecoverable", "FakeEngine", "batch_buckets"]
