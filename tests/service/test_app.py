"""The app in-process (httpx.ASGITransport) with a FakeEngine: formats, batching, errors, readiness, metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from service.app import batcher_config
from service.batching import BatcherConfig
from service.engine.fake import POISON, FakeEngine, fake_output
from tests.service.batching.support import eventually
from tests.service.support import from_npy, metric, metric_samples, npy, serving, settings

pytestmark = pytest.mark.anyio
DIM = 8
JSON = {"content-type": "application/json"}
NPY = {"content-type": "application/x-npy"}


def sample(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape or (4, DIM)).astype(np.float32)


def raw_headers(x: np.ndarray) -> dict[str, str]:
    dtype = x.dtype.name
    return {"content-type": "application/octet-stream", "x-shape": ",".join(map(str, x.shape)), "x-dtype": dtype}


async def post_json(client: httpx.AsyncClient, x: np.ndarray, **headers: str) -> httpx.Response:
    return await client.post("/encode", content=orjson.dumps({"inputs": x.tolist()}), headers=JSON | headers)


def expected(x: np.ndarray) -> np.ndarray:
    return fake_output(x if x.ndim == 3 else x[np.newaxis]).reshape(x.shape)


async def test_json_single_sequence_and_batch() -> None:
    async with serving() as (client, _):
        for x in (sample(1, 5, DIM), sample(2, 3, 5, DIM)):
            response = await post_json(client, x)
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["shape"] == list(x.shape) and body["model"] == "fake"
            np.testing.assert_allclose(np.asarray(body["outputs"], np.float32), expected(x), rtol=1e-6)
            assert float(response.headers["x-queue-time"]) >= 0
            assert float(response.headers["x-inference-time"]) >= 0


@pytest.mark.parametrize("dtype", ["float16", "float32"])
async def test_npy_answers_in_the_request_dtype(dtype: str) -> None:
    x = sample(3, 2, 6, DIM).astype(dtype)
    async with serving() as (client, _):
        response = await client.post("/encode", content=npy(x), headers=NPY)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/x-npy"
        out = from_npy(response.content)
        assert out.dtype == np.dtype(dtype) and out.shape == x.shape
        np.testing.assert_allclose(
            out, expected(x.astype(np.float32)).astype(dtype), rtol=1e-2 if dtype == "float16" else 1e-6
        )


@pytest.mark.parametrize("dtype", ["float16", "float32"])
async def test_raw_bytes_with_shape_and_dtype_headers(dtype: str) -> None:
    x = sample(4, 6, DIM).astype(dtype)
    async with serving() as (client, _):
        response = await client.post("/encode", content=x.tobytes(), headers=raw_headers(x))
        assert response.status_code == 200, response.text
        assert response.headers["x-shape"] == f"6,{DIM}" and response.headers["x-dtype"] == dtype
        out = np.frombuffer(response.content, dtype=dtype).reshape(x.shape)
        np.testing.assert_allclose(
            out, expected(x.astype(np.float32)).astype(dtype), rtol=1e-2 if dtype == "float16" else 1e-6
        )


async def test_accept_chooses_the_answer_format() -> None:
    x = sample(5, 2, 3, DIM)
    async with serving() as (client, _):
        as_npy = await post_json(client, x, accept="application/x-npy")
        np.testing.assert_allclose(from_npy(as_npy.content), expected(x), rtol=1e-6)
        as_json = await client.post(
            "/encode", content=npy(x.astype(np.float16)), headers=NPY | {"accept": "application/json"}
        )
        assert as_json.headers["content-type"] == "application/json"
        assert as_json.json()["shape"] == [2, 3, DIM]


async def test_concurrent_requests_are_batched_and_answered_correctly() -> None:
    engine = FakeEngine(dim=DIM, delay_s=0.02)
    inputs = [sample(i, 1 + i % 3, 4 + 2 * (i % 2), DIM) for i in range(40)]
    async with serving(engine) as (client, _):
        responses = await asyncio.gather(*(client.post("/encode", content=npy(x), headers=NPY) for x in inputs))
        for x, response in zip(inputs, responses, strict=True):
            assert response.status_code == 200, response.text
            np.testing.assert_allclose(from_npy(response.content), expected(x), rtol=1e-6)
        text = (await client.get("/metrics")).text
    assert max(engine.batch_sizes) > 1
    assert all(seq in (4, 6) for _, seq in engine.batches)
    assert metric(text, "encoder_batch_size_count") == len(engine.batches) < len(inputs)


async def test_a_client_batch_over_the_maximum_is_split() -> None:
    engine = FakeEngine(dim=DIM)
    x = sample(6, 20, 3, DIM)
    async with serving(engine) as (client, _):
        response = await client.post("/encode", content=npy(x), headers=NPY)
    np.testing.assert_allclose(from_npy(response.content), expected(x), rtol=1e-6)
    assert engine.batch_sizes == [8, 8, 4]


async def test_fixed_shape_engines_get_padded_batches_and_clean_answers() -> None:
    engine = FakeEngine(dim=DIM, fixed_shapes=True)
    x = sample(7, 3, 3, DIM)
    async with serving(engine) as (client, _):
        response = await client.post("/encode", content=npy(x), headers=NPY)
        text = (await client.get("/metrics")).text
    np.testing.assert_allclose(from_npy(response.content), expected(x), rtol=1e-6)
    assert engine.batch_sizes == [4]
    assert metric(text, "encoder_padding_samples_total") == 1
    assert metric(text, "encoder_inference_duration_seconds_count", batch_size="4") == 1


def _bad(x: np.ndarray) -> bytes:
    return npy(x)


BAD_INPUTS: list[tuple[str, dict[str, str], bytes, int]] = [
    ("rank 1", JSON, orjson.dumps({"inputs": [1.0] * DIM}), 422),
    ("rank 4", NPY, _bad(np.zeros((1, 1, 2, DIM), np.float32)), 422),
    ("last dimension", NPY, _bad(np.zeros((2, 3, DIM + 1), np.float32)), 422),
    ("sequence too long", NPY, _bad(np.zeros((65, DIM), np.float32)), 422),
    ("empty sequence", NPY, _bad(np.zeros((0, DIM), np.float32)), 422),
    ("raw body too short", raw_headers(np.zeros((2, DIM), np.float32)), b"\0" * (2 * DIM * 4 - 1), 422),
    ("raw body too long", raw_headers(np.zeros((2, DIM), np.float32)), b"\0" * (2 * DIM * 4 + 4), 422),
    ("unknown raw dtype", raw_headers(np.zeros((2, DIM), np.float64)), b"\0" * (2 * DIM * 8), 422),
    ("npy int dtype", NPY, _bad(np.zeros((2, DIM), np.int64)), 422),
    ("malformed json", JSON, b'{"inputs": [[1, 2', 422),
    ("json without inputs", JSON, b'{"input": []}', 422),
    ("empty body", JSON, b"", 422),
    ("unknown content type", {"content-type": "text/csv"}, b"1,2,3", 415),
    ("no content type", {}, b"abc", 415),
    ("body over the limit", JSON, b" " * 5000, 413),
    ("bad timeout header", JSON | {"x-request-timeout-ms": "soon"}, orjson.dumps({"inputs": [[0.0] * DIM]}), 422),
]


async def test_bad_input_is_refused_without_harming_anyone() -> None:
    engine = FakeEngine(dim=DIM)
    good = sample(8, 2, DIM)
    async with serving(engine, max_body_bytes=4096) as (client, _):
        for name, headers, body, status in BAD_INPUTS:
            response = await client.post("/encode", content=body, headers=headers)
            assert response.status_code == status, (name, response.text)
            error = response.json()["error"]
            assert set(error) == {"type", "message"} and error["message"], name
            ok = await post_json(client, good)
            assert ok.status_code == 200, name
        text = (await client.get("/metrics")).text
    assert metric(text, "encoder_requests_total", outcome="invalid") == len(BAD_INPUTS)
    assert metric(text, "encoder_requests_total", outcome="ok") == len(BAD_INPUTS)
    assert len(engine.batches) == len(BAD_INPUTS)  # no bad input ever reached the engine


async def test_a_streamed_body_over_the_limit_is_cut_off() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b" " * 1000

    async with serving(max_body_bytes=4096) as (client, _):
        response = await client.post("/encode", content=chunks(), headers=JSON)
    assert "content-length" not in response.request.headers
    assert response.status_code == 413 and response.json()["error"]["type"] == "payload_too_large"


async def test_a_full_queue_answers_429_with_retry_after() -> None:
    engine = FakeEngine(dim=DIM, delay_s=0.5)
    async with serving(engine, max_queue=1, max_delay_ms=0) as (client, app):
        batcher = app.state.service.batcher
        first = asyncio.ensure_future(post_json(client, sample(1)))
        await eventually(lambda: len(engine.batches) == 1)
        second = asyncio.ensure_future(post_json(client, sample(2)))
        await eventually(lambda: batcher.queue_depth == 1)
        refused = await post_json(client, sample(3))
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "overloaded"
        assert [r.status_code for r in await asyncio.gather(first, second)] == [200, 200]
        text = (await client.get("/metrics")).text
    assert metric(text, "encoder_requests_total", outcome="overloaded") == 1


async def test_a_request_past_its_deadline_gets_504_and_is_never_computed() -> None:
    engine = FakeEngine(dim=DIM, delay_s=0.5)
    late = sample(9)
    async with serving(engine, max_delay_ms=0) as (client, _):
        first = asyncio.ensure_future(post_json(client, sample(1)))
        await eventually(lambda: len(engine.batches) == 1)
        response = await post_json(client, late, **{"x-request-timeout-ms": "50"})
        assert response.status_code == 504 and response.json()["error"]["type"] == "deadline_exceeded"
        assert (await first).status_code == 200
        text = (await client.get("/metrics")).text
    assert not any(np.array_equal(batch[0], late) for batch in engine.inputs)
    assert metric(text, "encoder_requests_total", outcome="timeout") == 1
    assert metric(text, "encoder_dropped_requests_total", reason="timeout") == 1


async def test_a_failing_batch_fails_only_its_own_requests() -> None:
    bad = sample(10, 2, DIM)
    bad[0, 0] = POISON
    async with serving(max_delay_ms=0) as (client, _):
        failed = await post_json(client, bad)
        assert failed.status_code == 500
        assert failed.json()["error"]["type"] == "inference_failed"
        after = await post_json(client, sample(11))
        assert after.status_code == 200
        np.testing.assert_allclose(np.asarray(after.json()["outputs"]), expected(sample(11)), rtol=1e-6)
        text = (await client.get("/metrics")).text
    assert metric(text, "encoder_requests_total", outcome="error") == 1
    assert metric(text, "encoder_batch_failures_total") == 1


async def test_a_client_that_leaves_is_dropped_and_counted() -> None:
    engine = FakeEngine(dim=DIM, delay_s=0.5)
    gone = sample(12)
    async with serving(engine, max_delay_ms=0) as (client, app):
        batcher = app.state.service.batcher
        first = asyncio.ensure_future(post_json(client, sample(1)))
        await eventually(lambda: len(engine.batches) == 1)
        leaving = asyncio.ensure_future(post_json(client, gone))
        await eventually(lambda: batcher.queue_depth == 1)
        leaving.cancel()
        await asyncio.gather(leaving, return_exceptions=True)
        assert (await first).status_code == 200
        text = (await client.get("/metrics")).text
    assert engine.batch_sizes == [1]
    assert metric(text, "encoder_requests_total", outcome="cancelled") == 1
    assert metric(text, "encoder_dropped_requests_total", reason="cancelled") == 1
    assert metric(text, "encoder_queue_depth") == 0


async def test_readiness_follows_warm_up_and_the_batcher() -> None:
    engine = FakeEngine(dim=DIM, warmup_s=0.5)
    async with serving(engine, ready=False) as (client, app):
        assert (await client.get("/healthz")).status_code == 200
        not_ready = await client.get("/readyz")
        assert not_ready.status_code == 503 and "warming" in not_ready.json()["error"]["message"]
        early = await post_json(client, sample(1))
        assert early.status_code == 503 and early.headers["retry-after"] == "1"
        assert (await client.get("/v1/models")).status_code == 503
        await eventually(lambda: engine.warmed)
        await eventually(lambda: app.state.service.batcher is not None)
        assert (await client.get("/readyz")).status_code == 200

        # A bug kills the batching loop: the request in flight gets a 503, and readiness says so from then on.
        def broken(*args: object) -> Any:
            raise RuntimeError("bug in the batcher")

        app.state.service.batcher._queue.ready = broken
        died = await post_json(client, sample(2))
        assert died.status_code == 503 and "died" in died.json()["error"]["message"]
        dead = await client.get("/readyz")
        assert dead.status_code == 503 and "bug in the batcher" in dead.json()["error"]["message"]
        unhealthy = await client.get("/healthz")  # only a restart helps now
        assert unhealthy.status_code == 503 and "died" in unhealthy.json()["error"]["message"]
        text = (await client.get("/metrics")).text
    assert metric(text, "encoder_requests_total", outcome="unavailable") == 2
    assert metric(text, "encoder_batcher_alive") == 0


async def test_a_model_that_fails_to_load_is_not_ready_nor_healthy() -> None:
    class Broken(FakeEngine):
        def warmup(self) -> None:
            raise RuntimeError("cannot allocate the engine")

    async with serving(Broken(dim=DIM), ready=False) as (client, app):
        await eventually(lambda: app.state.service.load_error is not None)
        assert (await client.get("/healthz")).status_code == 503
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and "cannot allocate" in ready.json()["error"]["message"]


async def test_models_describes_the_loaded_engine() -> None:
    async with serving(FakeEngine(dim=DIM, max_seq_len=64, max_batch_size=8)) as (client, _):
        body = (await client.get("/v1/models")).json()
    (card,) = body["models"]
    assert card["dim"] == DIM and card["dtype"] == "float32" and card["max_seq_len"] == 64
    assert card["provider"] == "fake" and card["buckets"] == [1, 2, 4, 8] and card["max_batch_size"] == 8


async def test_metrics_names_labels_and_values_move() -> None:
    engine = FakeEngine(dim=DIM, delay_s=0.01)
    inputs = [sample(i, 1 + i % 2, 3, DIM) for i in range(12)]
    async with serving(engine) as (client, _):
        before = metric_samples((await client.get("/metrics")).text)
        await asyncio.gather(*(client.post("/encode", content=npy(x), headers=NPY) for x in inputs))
        response = await client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    after = metric_samples(response.text)
    samples = sum(x.shape[0] for x in inputs)
    cpu = (("device", "cpu"),)  # engine-side batch metrics name their device; a fake engine runs on the CPU
    processed = after[("encoder_samples_processed_total", cpu)] - before[("encoder_samples_processed_total", cpu)]
    assert processed == samples
    assert after[("encoder_requests_total", (("outcome", "ok"),))] == len(inputs)
    assert after[("encoder_request_duration_seconds_count", ())] == len(inputs)
    assert after[("encoder_queue_wait_seconds_count", ())] == len(inputs)
    assert after[("encoder_batch_size_sum", cpu)] == samples
    assert after[("encoder_queue_depth", ())] == 0 and after[("encoder_batcher_alive", ())] == 1
    labels = {dict(key[1]).get("batch_size") for key in after if key[0] == "encoder_inference_duration_seconds_count"}
    assert labels == {"1", "2", "4", "8"}  # the bucket sizes, and only them
    per_bucket = sum(value for (name, _), value in after.items() if name == "encoder_inference_duration_seconds_count")
    assert per_bucket == len(engine.batches)
    info = next(dict(key[1]) for key in after if key[0] == "encoder_model_info")
    assert info == {
        "model": "fake",
        "provider": "fake",
        "dtype": "float32",
        "dim": str(DIM),
        "max_seq_len": "64",
        "max_batch_size": "8",
    }
    for outcome in ("ok", "invalid", "overloaded", "timeout", "cancelled", "error"):
        assert ("encoder_requests_total", (("outcome", outcome),)) in after


async def test_a_broken_metrics_backend_does_not_fail_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    async with serving() as (client, app):
        metrics = app.state.service.metrics

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("metrics backend down")

        monkeypatch.setattr(metrics.inference, "labels", broken)
        monkeypatch.setattr(metrics.requests, "labels", broken)
        response = await post_json(client, sample(1))
    assert response.status_code == 200


async def test_unknown_routes_use_the_error_body() -> None:
    async with serving() as (client, _):
        response = await client.get("/nope")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "http_error"


async def test_large_bodies_are_decoded_and_encoded_off_the_event_loop() -> None:
    engine = FakeEngine(dim=DIM, max_seq_len=4096, max_batch_size=16)
    x = sample(13, 9, 4096, DIM)
    assert x.nbytes > 1 << 20
    async with serving(engine, max_batch_size=16) as (client, _):
        for headers, body in ((NPY, npy(x)), (JSON, orjson.dumps({"inputs": x.tolist()}))):
            response = await client.post("/encode", content=body, headers=headers | {"accept": "application/x-npy"})
            assert response.status_code == 200, response.text
            np.testing.assert_allclose(from_npy(response.content), expected(x), rtol=1e-6)


async def test_with_several_workers_startup_waits_until_the_engine_is_warm() -> None:
    engine = FakeEngine(dim=DIM, warmup_s=0.3)
    async with serving(engine, ready=False, workers=2) as (client, _):
        assert engine.warmed  # the lifespan (hence accepting connections) waited for warm-up
        assert (await client.get("/readyz")).status_code == 200


async def test_with_several_workers_a_failed_load_fails_startup() -> None:
    class Broken(FakeEngine):
        def warmup(self) -> None:
            raise RuntimeError("no memory left")

    with pytest.raises(RuntimeError, match="no memory left"):
        async with serving(Broken(dim=DIM), ready=False, workers=2):
            pass


async def test_batches_in_flight_follow_the_engines_concurrency() -> None:
    local = FakeEngine(dim=DIM, max_batch_size=8)
    assert not hasattr(local, "concurrency")
    config = batcher_config(settings(max_batch_size=8), local)
    assert config.max_in_flight == 1  # an in-process engine: one batch at a time, as before
    assert (config.max_batch_size, config.max_delay_s, config.pad_buckets) == (8, 0.02, None)

    class Pooled(FakeEngine):
        concurrency = 2  # like a RemotePool of two connections

    pooled = Pooled(dim=DIM, max_batch_size=8)
    assert batcher_config(settings(max_batch_size=8), pooled).max_in_flight == 2
    # Everything else is as for the in-process engine.
    assert batcher_config(settings(max_batch_size=8), pooled) == BatcherConfig(
        max_batch_size=8, max_delay_s=0.02, max_queue=config.max_queue, max_in_flight=2
    )
    async with serving(pooled) as (client, app):  # the app's batcher is built with it
        assert app.state.service.batcher.config.max_in_flight == 2
        x = sample(14, 3, 5, DIM)
        response = await client.post("/encode", content=npy(x), headers=NPY)
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(from_npy(response.content), expected(x), rtol=1e-6)
