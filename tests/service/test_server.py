"""The service as a real uvicorn process: a real small bundle vs PyTorch, disconnects, several workers."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import orjson
import psutil
import pytest

from tests.service.conftest import SMALL_DIMS
from tests.service.server_support import REPO, clean_env, running, running_process, send_raw_request
from tests.service.support import from_npy, metric, npy

pytestmark = pytest.mark.slow
DIM = SMALL_DIMS[0]
Reference = Callable[[np.ndarray], np.ndarray]


def serve_args(bundle: Path, *extra: str) -> list[str]:
    return ["-m", "service", "--model-dir", str(bundle), "--host", "127.0.0.1", "--provider", "cpu", *extra]


def inputs(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(42)
    return [rng.standard_normal((1 + i % 3, (16, 9)[i % 2], DIM)).astype(np.float32) for i in range(count)]


async def post(client: httpx.AsyncClient, x: np.ndarray, fmt: str) -> np.ndarray:
    """POST in one of the three formats; returns the answer as float32."""
    if fmt == "json":
        response = await client.post(
            "/encode", content=orjson.dumps({"inputs": x.tolist()}), headers={"content-type": "application/json"}
        )
        assert response.status_code == 200, response.text
        return np.asarray(response.json()["outputs"], np.float32)
    if fmt == "npy":
        response = await client.post("/encode", content=npy(x), headers={"content-type": "application/x-npy"})
        assert response.status_code == 200, response.text
        return from_npy(response.content)
    headers = {"content-type": "application/octet-stream", "x-shape": ",".join(map(str, x.shape)), "x-dtype": "float32"}
    response = await client.post("/encode", content=x.tobytes(), headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["x-shape"] == headers["x-shape"]
    return np.frombuffer(response.content, np.float32).reshape(x.shape)


async def post_all(url: str, xs: list[np.ndarray]) -> list[np.ndarray]:
    formats = ("json", "npy", "raw")
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(*(post(client, x, formats[i % 3]) for i, x in enumerate(xs)))


def test_concurrent_requests_match_unbatched_pytorch(small_bundle: Path, reference: Reference, tmp_path: Path) -> None:
    xs = inputs(36)
    args = serve_args(small_bundle, "--max-batch-size", "8", "--max-delay-ms", "50", "--seq-lens", "16")
    with running(args, tmp_path / "server.log") as url:
        outputs = asyncio.run(post_all(url, xs))
        text = httpx.get(f"{url}/metrics").text
        models = httpx.get(f"{url}/v1/models").json()["models"][0]
    for x, out in zip(xs, outputs, strict=True):
        assert out.shape == x.shape
        np.testing.assert_allclose(out, reference(x), rtol=1e-4, atol=1e-4)
    samples = sum(x.shape[0] for x in xs)
    assert metric(text, "encoder_samples_processed_total") == samples
    batches = metric(text, "encoder_batch_size_count")
    assert batches < len(xs)  # several requests shared an engine batch
    assert metric(text, "encoder_batch_size_bucket", le="1.0") < batches or batches < samples
    assert models["provider"] == "CPUExecutionProvider" and models["dim"] == DIM


def test_a_client_that_disconnects_is_never_computed(tmp_path: Path) -> None:
    args = ["-m", "tests.service.fake_server", "--delay-s", "1.5"]
    with running(args, tmp_path / "fake.log") as url:
        port = urlparse(url).port
        assert port is not None
        busy = send_raw_request(port, npy(np.ones((1, 4, 8), np.float32)), "application/x-npy")
        wait_for_metric(url, "encoder_inference_duration_seconds_count", 0, labels={"batch_size": "1"}, at_least=False)
        leaving = send_raw_request(port, npy(np.ones((2, 4, 8), np.float32)), "application/x-npy")
        wait_for_metric(url, "encoder_queue_depth", 1)
        leaving.close()
        wait_for_metric(url, "encoder_requests_total", 1, labels={"outcome": "cancelled"})
        assert busy.recv(12) == b"HTTP/1.1 200"
        busy.close()
        wait_for_metric(url, "encoder_requests_total", 1, labels={"outcome": "ok"})
        text = httpx.get(f"{url}/metrics").text
    assert metric(text, "encoder_dropped_requests_total", reason="cancelled") == 1
    assert metric(text, "encoder_samples_processed_total") == 1  # only the first request ran
    assert metric(text, "encoder_queue_depth") == 0


def wait_for_metric(
    url: str, name: str, value: float, labels: dict[str, str] | None = None, at_least: bool = True, timeout: float = 30
) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        current = metric(httpx.get(f"{url}/metrics").text, name, **(labels or {}))
        if (current >= value) if at_least else (current == value):
            return
        time.sleep(0.02)
    raise AssertionError(f"{name}{labels or ''} never reached {value}")


def test_two_workers_serve_and_metrics_aggregate(small_bundle: Path, reference: Reference, tmp_path: Path) -> None:
    xs = inputs(40)
    # auto: this machine runs the model on the CPU, so the workers load their own engines
    with running(serve_args(small_bundle, "--workers", "2", "--seq-lens", "16"), tmp_path / "workers.log") as url:
        # Ready means one worker serves; the other may still be loading its engine (its gauge reads 0 until then,
        # and the gauge is the minimum over workers), so wait for both before checking that it stays at 1.
        wait_for_metric(url, "encoder_batcher_alive", 1, timeout=120)
        outputs = asyncio.run(post_all(url, xs))
        pages = [httpx.get(f"{url}/metrics", headers={"connection": "close"}).text for _ in range(4)]
    for x, out in zip(xs, outputs, strict=True):
        np.testing.assert_allclose(out, reference(x), rtol=1e-4, atol=1e-4)
    for text in pages:  # whichever worker answers, it reports the sum over both
        assert metric(text, "encoder_requests_total", outcome="ok") == len(xs)
        assert metric(text, "encoder_samples_processed_total") == sum(x.shape[0] for x in xs)
        assert metric(text, "encoder_batcher_alive") == 1
        assert metric(text, "encoder_queue_depth") == 0
    assert "Started parent process" in (tmp_path / "workers.log").read_text()


def test_without_model_dir_it_serves_the_cached_default_model(small_bundle: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(small_bundle, cache / "default-fp32")  # what a previous run converted
    env = clean_env(ENCODER_CACHE_DIR=str(cache))
    args = ["-m", "service", "--host", "127.0.0.1", "--provider", "cpu", "--seq-lens", "16"]
    with running(args, tmp_path / "default.log", env=env) as url:
        model = httpx.get(f"{url}/v1/models").json()["models"][0]
    assert model["dim"] == DIM and model["details"]["directory"] == str(cache / "default-fp32")
    assert "reusing the default model" in (tmp_path / "default.log").read_text()


def test_a_bad_model_dir_fails_fast_with_one_clear_line(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "service", "--model-dir", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "manifest.json is missing" in result.stderr and "Traceback" not in result.stderr


def engine_processes(server_pid: int) -> list[psutil.Process]:
    children = psutil.Process(server_pid).children(recursive=True)
    return [child for child in children if "service.engine.host" in " ".join(child.cmdline())]


def test_two_workers_share_one_engine_process(small_bundle: Path, reference: Reference, tmp_path: Path) -> None:
    xs = inputs(40)
    samples = sum(x.shape[0] for x in xs)
    log = tmp_path / "shared.log"
    flags = ("--workers", "2", "--seq-lens", "16", "--max-delay-ms", "20", "--shared-engine", "on")
    args = serve_args(small_bundle, *flags)
    with running_process(args, log) as (url, process):
        (engine,) = engine_processes(process.pid)  # one model copy, however many workers
        outputs = asyncio.run(post_all(url, xs))
        models = [httpx.get(f"{url}/v1/models", headers={"connection": "close"}).json() for _ in range(4)]
        pages = [httpx.get(f"{url}/metrics", headers={"connection": "close"}).text for _ in range(4)]
    for x, out in zip(xs, outputs, strict=True):
        np.testing.assert_allclose(out, reference(x), rtol=1e-4, atol=1e-4)
    for listing in models:  # whichever worker answers, it computes through the engine process
        details = listing["models"][0]["details"]
        assert details["engine_process"]["directory"].startswith("/"), details
        card = listing["models"][0]
        assert card["devices"] == ["cpu"] and details["devices"] == [{"device": "cpu", "up": True, "restarts": 0}]
        assert card["provider"] == "CPUExecutionProvider" and card["dim"] == DIM and card["fixed_shapes"] is False
    for text in pages:
        # The engine process counts computed samples once (the workers record only their queue waits).
        assert metric(text, "encoder_samples_processed_total") == samples
        assert metric(text, "encoder_requests_total", outcome="ok") == len(xs)
        assert 0 < metric(text, "encoder_batch_size_count") <= len(xs)
        assert metric(text, "encoder_queue_wait_seconds_count") >= len(xs)
        assert metric(text, "encoder_batcher_alive") == 1
    assert not engine.is_running()  # stopped with the service
    assert "engine process ready" in log.read_text()


def test_two_workers_without_a_shared_engine_still_serve(
    small_bundle: Path, reference: Reference, tmp_path: Path
) -> None:
    xs = inputs(20)
    args = serve_args(small_bundle, "--workers", "2", "--seq-lens", "16", "--shared-engine", "off")
    with running_process(args, tmp_path / "separate.log") as (url, process):
        assert engine_processes(process.pid) == []
        outputs = asyncio.run(post_all(url, xs))
        details = httpx.get(f"{url}/v1/models").json()["models"][0]["details"]
        text = httpx.get(f"{url}/metrics").text
    for x, out in zip(xs, outputs, strict=True):
        np.testing.assert_allclose(out, reference(x), rtol=1e-4, atol=1e-4)
    assert "engine_process" not in details
    assert metric(text, "encoder_samples_processed_total") == sum(x.shape[0] for x in xs)
