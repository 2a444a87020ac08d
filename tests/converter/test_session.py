from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from converter.bundle import load_bundle
from converter.errors import ProviderError
from converter.providers import CPU, SessionOptions
from converter.session import EncoderSession
from converter.verify import TOLERANCE, rel_l2


def gpu_usable() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def test_cpu_session_reports_cpu(small_bundle: Path) -> None:
    session = EncoderSession(load_bundle(small_bundle), SessionOptions(provider="cpu"))
    assert session.provider == CPU and not session.on_gpu
    assert session.describe()["provider"] == CPU
    shapes = session.warmup()
    assert shapes == [(b, 196) for b in SessionOptions().batch_buckets]


def test_rejects_wrong_shapes(small_bundle: Path) -> None:
    session = EncoderSession(load_bundle(small_bundle), SessionOptions(provider="cpu"))
    with pytest.raises(ValueError, match="expected"):
        session.run(np.zeros((2, 3, 65), np.float32))


@pytest.mark.skipif(gpu_usable(), reason="this machine has a usable GPU")
@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_explicit_gpu_without_gpu_is_an_error(small_bundle: Path, provider: str) -> None:
    # onnxruntime-gpu lists the GPU providers even where they cannot start; we must refuse, not fall back.
    with pytest.raises(ProviderError, match=provider if provider == "cuda" else "TensorrtExecutionProvider"):
        EncoderSession(load_bundle(small_bundle), SessionOptions(provider=provider))


@pytest.mark.skipif(gpu_usable(), reason="this machine has a usable GPU")
def test_auto_falls_back_to_cpu_loudly(small_bundle: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="converter.session"):
        session = EncoderSession(load_bundle(small_bundle), SessionOptions(provider="auto"))
    assert session.provider == CPU
    assert "running on the CPU" in caplog.text


def test_explicit_provider_missing_from_build(small_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    with pytest.raises(ProviderError, match="not available in this onnxruntime build"):
        EncoderSession(load_bundle(small_bundle), SessionOptions(provider="cuda"))


def per_part(session: EncoderSession, parts: list[np.ndarray]) -> list[np.ndarray]:
    return [session.run(part) for part in parts]


def test_run_into_matches_per_part_runs_on_the_cpu(small_bundle: Path) -> None:
    bundle = load_bundle(small_bundle)
    session = EncoderSession(bundle, SessionOptions(provider="cpu", batch_buckets=(1, 2, 4, 8), seq_lens=(16,)))
    tolerance = TOLERANCE[bundle.precision]
    rng = np.random.default_rng(3)
    parts = [rng.standard_normal((b, 16, session.dim)).astype(np.float32) for b in (1, 3, 2)]
    expected = per_part(session, parts)
    outs = [np.full_like(part, np.nan) for part in parts]
    assert session.run_into(parts, outs) == 6  # no captured shapes on the CPU: the rows themselves
    for out, want in zip(outs, expected, strict=True):
        assert rel_l2(out, want) <= tolerance
        np.testing.assert_allclose(out, want, rtol=tolerance, atol=tolerance)
    # In place: the answers replace the inputs.
    inputs = [part.copy() for part in parts]
    assert session.run_into(inputs, inputs) == 6
    for out, want in zip(inputs, expected, strict=True):
        np.testing.assert_allclose(out, want, rtol=tolerance, atol=tolerance)


def test_run_into_rejects_mismatched_shapes(small_bundle: Path) -> None:
    session = EncoderSession(load_bundle(small_bundle), SessionOptions(provider="cpu"))
    dim = session.dim
    a, b = np.zeros((2, 16, dim), np.float32), np.zeros((1, 16, dim), np.float32)
    cases = [
        ([a, np.zeros((1, 9, dim), np.float32)], [a, np.zeros((1, 9, dim), np.float32)]),  # sequence lengths differ
        ([a], [np.zeros((3, 16, dim), np.float32)]),  # an out of another size
        ([a, b], [a]),  # an out missing
        ([], []),
        ([np.zeros((2, 16, dim + 1), np.float32)], [np.zeros((2, 16, dim + 1), np.float32)]),  # wrong width
        ([np.zeros((16, dim), np.float32)], [np.zeros((16, dim), np.float32)]),  # not a batch
    ]
    for parts, outs in cases:
        with pytest.raises(ValueError):
            session.run_into(parts, outs)


@pytest.mark.skipif(not gpu_usable(), reason="needs a usable CUDA GPU")
def test_run_into_on_cuda_matches_per_part_runs_from_plain_and_registered_memory(small_bundle: Path) -> None:
    from service.engine import ipc  # the worker arenas the engine process registers

    bundle = load_bundle(small_bundle)
    options = SessionOptions(provider="cuda", batch_buckets=(1, 2, 4, 8), seq_lens=(16,), pipeline_chunks=(2,))
    session = EncoderSession(bundle, options)
    session.warmup()
    assert (2, 16) in session.describe()["pipelined_chunk_shapes"]
    dim, rng = session.dim, np.random.default_rng(4)
    arena = ipc.Arena.create(64 * 16 * dim * 4)
    try:
        assert session.register_host(arena.address, arena.size) is True
        for sizes, bucket in (((1, 2), 4), ((3, 5), 8)):
            parts = [rng.standard_normal((b, 16, dim)).astype(np.float32) for b in sizes]
            expected = per_part(session, parts)
            outs = [np.empty_like(part) for part in parts]
            assert session.run_into(parts, outs, chunk=0) == bucket  # the captured bucket that holds them
            for out, want in zip(outs, expected, strict=True):
                assert float(np.abs(out - want).max()) < 1e-3
            piped = [np.empty_like(part) for part in parts]  # chunks of 2 rows, copies overlapping compute
            assert session.run_into(parts, piped, chunk=2) == sum(sizes)  # a 1-row tail runs on bucket 1
            for out, want in zip(piped, expected, strict=True):
                assert float(np.abs(out - want).max()) < 1e-3
            # From the registered arena, answers written over the inputs (what the engine process does).
            shared, offset = [], 0
            for part in parts:
                view = arena.view(offset, part.shape, np.dtype(np.float32))
                view[...] = part
                shared.append(view)
                offset += part.nbytes + 4096  # apart, not adjacent: each part is copied on its own
            assert session.run_into(shared, shared) == bucket
            for out, want in zip(shared, expected, strict=True):
                assert float(np.abs(out - want).max()) < 1e-3
    finally:
        session.unregister_host(arena.address)
        arena.close()
