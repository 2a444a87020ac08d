from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from converter import merged
from converter.bundle import load_bundle
from converter.errors import ProviderError
from converter.finite import FLAGS_OUTPUT
from converter.providers import CPU, CUDA, SessionOptions
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


def spoiled_parts(dim: int, seed: int) -> tuple[list[np.ndarray], list[bool]]:
    """Parts of 1, 3 and 2 rows; row 3 holds a NaN and row 4 an Inf (rows counted over the concatenation)."""
    rng = np.random.default_rng(seed)
    parts = [rng.standard_normal((b, 16, dim)).astype(np.float32) for b in (1, 3, 2)]
    parts[1][2, 7, 1] = np.nan
    parts[2][0, 15, 0] = np.inf
    return parts, [True, True, True, False, False, True]


def test_run_into_flags_non_finite_rows_on_the_host_path(small_bundle: Path) -> None:
    session = EncoderSession(load_bundle(small_bundle), SessionOptions(provider="cpu", seq_lens=(16,)))
    parts, wanted = spoiled_parts(session.dim, 8)
    expected = np.concatenate(per_part(session, parts))
    flags = np.zeros(6, bool)
    inputs = [part.copy() for part in parts]
    session.run_into(inputs, inputs, finite=flags)  # in place: flagged from the inputs, before the answers land
    assert flags.tolist() == wanted
    tolerance = TOLERANCE[session.bundle.precision]
    np.testing.assert_allclose(np.concatenate(inputs)[flags], expected[flags], rtol=tolerance, atol=tolerance)
    with pytest.raises(ValueError, match="one flag per row"):
        session.run_into(parts, [np.empty_like(p) for p in parts], finite=np.zeros(5, bool))


@pytest.mark.skipif(not gpu_usable(), reason="needs a usable CUDA GPU")
def test_run_into_on_cuda_flags_non_finite_rows_from_the_graphs_own_output(
    small_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine process's direct path on a GPU: flags computed by the captured graphs, copied out with the answers
    (no host read of the inputs, no run of their own), and the answers those of the bundle's model as it is."""
    bundle = load_bundle(small_bundle)
    options = SessionOptions(provider="cuda", batch_buckets=(1, 2, 4, 8), seq_lens=(16,), pipeline_chunks=(2,))
    session = EncoderSession(bundle, options)
    session.warmup()
    assert session.flags_output == FLAGS_OUTPUT and session.describe()["finite_flags"] == "graph output"
    monkeypatch.setattr(merged, "finite_rows", None)  # a host check would fail the test
    plain = EncoderSession(bundle, dataclasses.replace(options, finite_flags=False))  # the model as it is
    plain.warmup()
    assert plain.flags_output is None
    x = np.random.default_rng(11).standard_normal((8, 16, session.dim)).astype(np.float32)
    assert session.run(x).tobytes() == plain.run(x).tobytes()  # the captured bucket-8 graphs, with and without
    parts, wanted = spoiled_parts(session.dim, 9)
    expected = np.concatenate(per_part(session, parts))
    for chunk in (0, 2, None):
        outs = [np.empty_like(part) for part in parts]
        flags = np.zeros(6, bool)
        session.run_into(parts, outs, chunk=chunk, finite=flags)
        assert flags.tolist() == wanted, chunk
        got = np.concatenate(outs)
        assert float(np.abs(got[flags] - expected[flags]).max()) < 1e-3  # the finite rows are answered as alone
    # Every fp16/fp32 value kind the host check knows, on the device, one sample per row of a bucket-8 batch.
    batch = np.random.default_rng(10).standard_normal((8, 16, session.dim)).astype(np.float32)
    batch[1, 0, 0], batch[2, 15, session.dim - 1], batch[3, 4, 4] = np.inf, -np.inf, np.nan
    batch[4] = np.finfo(np.float32).max
    flags = np.zeros(8, bool)
    session.run_into([batch], [np.empty_like(batch)], chunk=0, finite=flags)
    assert flags.tolist() == [True, False, False, False, True, True, True, True]


def test_the_cuda_slot_path_builds_the_graph_with_its_finiteness_output(small_bundle: Path) -> None:
    """What a CUDA session builds (here on whatever provider runs: onnxruntime falls back to the CPU without a GPU)."""
    session = EncoderSession(load_bundle(small_bundle), SessionOptions(provider="cpu"))
    assert session.flags_output is None and session.describe()["finite_flags"] == "host"
    built = session._build([CUDA, CPU])
    assert session.flags_output == FLAGS_OUTPUT
    assert [o.name for o in built.get_outputs()] == [session.bundle.output_name, FLAGS_OUTPUT]
    off = EncoderSession(session.bundle, SessionOptions(provider="cpu", finite_flags=False))
    assert [o.name for o in off._build([CUDA, CPU]).get_outputs()] == [session.bundle.output_name]  # as it is
    assert off.flags_output is None


def test_a_graph_that_cannot_take_the_output_is_built_without_it_loudly(
    small_bundle: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    session = EncoderSession(load_bundle(small_bundle), SessionOptions(provider="cpu"))

    def refuse(so: object) -> bytes:
        session.flags_output = FLAGS_OUTPUT
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(session, "_with_flags", refuse)
    with caplog.at_level(logging.WARNING, logger="converter.session"):
        built = session._build([CUDA, CPU])
    assert session.flags_output is None and "no such kernel" in caplog.text
    assert [o.name for o in built.get_outputs()] == [session.bundle.output_name]
