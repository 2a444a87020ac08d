"""A real Triton Inference Server as the benchmark peer, on the CPU: skipped where tritonserver cannot run.

Needs ``pip install --no-deps nvidia-pytriton`` (the server binary); CI's environment does not have it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from loadtest.peers.launch import free_port, running
from loadtest.peers.loadgen import drive
from loadtest.peers.oip_clients import OipSpec, fixed_inputs, reference_outputs
from loadtest.peers.oip_loops import oip_client_main
from loadtest.peers.triton.server import READY_PATH, unavailable
from tests.service.server_support import REPO, clean_env

pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(unavailable()), reason=str(unavailable()))]


@pytest.fixture(scope="module")
def triton(small_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    work = tmp_path_factory.mktemp("triton")
    http, grpc = free_port(), free_port()
    command = [sys.executable, "-m", "loadtest.peers.triton.server", "--model-dir", str(small_bundle)]
    command += ["--provider", "cpu", "--instances", "1", "--workdir", str(work), "--http-port", str(http)]
    command += ["--grpc-port", str(grpc), "--metrics-port", str(free_port()), "--max-delay-ms", "1"]
    with running(command, http, READY_PATH, work / "triton.log", timeout_s=120):
        yield f"127.0.0.1:{http}", f"127.0.0.1:{grpc}"


@pytest.mark.parametrize("protocol", ["oip-http", "grpc", "shm-http", "shm-grpc"])
def test_every_protocol_gets_the_unbatched_answers_from_triton(
    triton: tuple[str, str], small_bundle: Path, protocol: str
) -> None:
    x = fixed_inputs(3, 32, 64)
    ref = reference_outputs(str(small_bundle / "model.onnx"), x, "float32", "cpu")
    # Several in flight: Triton's dynamic batcher merges requests, answers must still match the unbatched ones.
    point = drive(OipSpec(protocol, *triton, x, ref), 4, 2, 0.3, 1.0, client=oip_client_main)
    assert point["errors"] == 0, point["error_kinds"]
    assert point["requests_ok"] > 0 and point["value_checks"]["values_full"] >= 2
    wrong = OipSpec(protocol, *triton, x, ref * np.float32(1.1))
    point = drive(wrong, 2, 1, 0.3, 0.7, client=oip_client_main)
    assert point["requests_ok"] == 0 and point["errors"] > 0
    assert all("rel L2" in kind for kind in point["error_kinds"])


def test_benchmark_runs_triton_with_every_oip_load(small_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    command = [sys.executable, "loadtest/bench_service.py", "--device", "cpu", "--model-dir", str(small_bundle)]
    command += ["--servers", "triton", "--protocols", "oip-http,grpc,shm-http,shm-grpc", "--client-batches", "1,4"]
    command += ["--concurrency", "2", "--duration", "1", "--warmup", "0.3", "--clients", "1", "--seq", "32"]
    command += ["--triton-instances", "1", "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    document = json.loads(out.read_text())
    assert {(r["protocol"], r["client_batch"]) for r in document["results"]} == {
        (p, b) for p in ("oip-http", "grpc", "shm-http", "shm-grpc") for b in (1, 4)
    }
    for point in document["results"]:
        assert point["errors"] == 0 and point["samples_per_s"] > 0 and point["value_checks"]["values_full"] > 0
        assert point["triton"]["executions"] > 0 and point["triton"]["failures"] == 0
    assert "| triton | shm-grpc x4 | 1 |" in result.stdout  # 2 samples in flight: one request of 4
