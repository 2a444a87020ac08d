"""The Triton peer's model repository and its Python-backend model's batching, without a Triton server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from loadtest.peers.triton import model as triton_model
from loadtest.peers.triton.repository import ModelOptions, config_text, write_repository
from loadtest.peers.triton.server import TritonUnavailable, command, parse_args, stub_path


def test_run_batched_runs_each_shape_once_and_answers_copies_in_request_order() -> None:
    calls: list[tuple[int, ...]] = []

    def run(batch: np.ndarray) -> np.ndarray:
        calls.append(batch.shape)
        assert batch.dtype == np.float32  # the engine's dtype, whatever the wire's
        return batch * 2.0

    arrays = [np.full((2, 4, 3), 1, np.float16), np.full((1, 5, 3), 2, np.float16), np.full((3, 4, 3), 3, np.float16)]
    answers = triton_model.run_batched(run, arrays, np.dtype(np.float32))
    assert sorted(calls) == [(1, 5, 3), (5, 4, 3)]
    for array, answer in zip(arrays, answers, strict=True):
        assert answer.dtype == np.float16 and answer.shape == array.shape
        np.testing.assert_array_equal(answer, array * 2)
        assert answer.flags.owndata and answer.flags.c_contiguous


def test_quiet_capsule_hook_drops_only_the_capsule_complaint() -> None:
    seen: list[object] = []
    hook = triton_model.quiet_capsule_hook(seen.append)

    class Report:
        def __init__(self, exc: BaseException) -> None:
            self.exc_value = exc

    hook(Report(ValueError("PyCapsule_GetPointer called with incorrect name")))
    other = Report(ValueError("something else"))
    hook(other)
    assert seen == [other]


def bundle(tmp_path: Path, dtype: str = "float16") -> Path:
    manifest = {
        "model_file": "model.onnx",
        "dims": {"dim": 768},
        "inputs": [{"name": "input", "dtype": dtype}],
        "outputs": [{"name": "output", "dtype": dtype}],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def test_config_names_the_tensors_dims_batching_and_instances(tmp_path: Path) -> None:
    options = ModelOptions(bundle(tmp_path), provider="cuda", instances=3, max_batch_size=64, max_delay_ms=0.5)
    text = config_text(options)
    assert 'name: "encoder"' in text and 'backend: "python"' in text and "max_batch_size: 64" in text
    assert 'input [ { name: "input" data_type: TYPE_FP16 dims: [ -1, 768 ] } ]' in text
    assert 'output [ { name: "output" data_type: TYPE_FP16 dims: [ -1, 768 ] } ]' in text
    assert "count: 3 kind: KIND_GPU" in text and "max_queue_delay_microseconds: 500" in text
    assert f'string_value: "{(tmp_path / "model.onnx").resolve()}"' in text
    cpu = config_text(ModelOptions(bundle(tmp_path, "float32"), wire_dtype="float32"))
    assert "KIND_CPU" in cpu and "TYPE_FP32" in cpu and 'key: "engine_dtype" value: { string_value: "float32" }' in cpu


def test_repository_layout(tmp_path: Path) -> None:
    root = write_repository(tmp_path / "models", ModelOptions(bundle(tmp_path)))
    assert (root / "encoder" / "config.pbtxt").is_file()
    assert (root / "encoder" / "1" / "model.py").read_text() == Path(triton_model.__file__).read_text()


def test_command_line_and_missing_stub(tmp_path: Path) -> None:
    args = parse_args(["--model-dir", "b", "--http-port", "1", "--grpc-port", "2", "--metrics-port", "3"])
    argv = command(tmp_path, tmp_path / "models", tmp_path / "backends", args)
    assert argv[0] == str(tmp_path / "bin" / "tritonserver")
    assert {"--http-port=1", "--grpc-port=2", "--metrics-port=3", "--strict-readiness=true"} <= set(argv)
    assert f"--backend-directory={tmp_path / 'backends'}" in argv
    with pytest.raises(TritonUnavailable, match=r"Python 3\.99"):
        stub_path(tmp_path, (3, 99))


def test_the_benchmark_interpreters_packages_come_first_in_the_stub(monkeypatch: pytest.MonkeyPatch) -> None:
    # A stub whose own site-packages holds a CPU-only onnxruntime must import the benchmark's onnxruntime-gpu.
    monkeypatch.setattr(triton_model.sys, "path", ["/stub/lib", "/stub/site-packages", "/bench/site"])
    triton_model.extend_sys_path("/bench/gpu-site:/bench/site")
    assert triton_model.sys.path == ["/bench/gpu-site", "/bench/site", "/stub/lib", "/stub/site-packages"]
