"""The OIP REST endpoints in-process (httpx.ASGITransport, FakeEngine): answers, errors, admission, metrics."""

from __future__ import annotations

import asyncio
import gzip
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from fastapi import FastAPI, Request

from service.engine.fake import FakeEngine, fake_output
from service.errors import InvalidInput
from service.oip import rest
from tests.service.batching.support import eventually
from tests.service.support import metric, serving

pytestmark = pytest.mark.anyio
DIM = 8
INFER = "/v2/models/encoder/infer"


def sample(seed: int, *shape: int, dtype: str = "float32") -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape or (4, DIM)).astype(dtype)


def expected(x: np.ndarray) -> np.ndarray:
    return fake_output(x if x.ndim == 3 else x[np.newaxis]).reshape(x.shape)


def tensor(x: np.ndarray, **fields: Any) -> dict[str, Any]:
    datatype = "FP16" if x.dtype == np.float16 else "FP32"
    return {"name": "input", "datatype": datatype, "shape": list(x.shape), **fields}


def json_body(x: np.ndarray, **extra: Any) -> bytes:
    return orjson.dumps({"inputs": [tensor(x, data=x.tolist())]} | extra)


def binary_body(x: np.ndarray, **extra: Any) -> tuple[bytes, dict[str, str]]:
    header = orjson.dumps({"inputs": [tensor(x, parameters={"binary_data_size": x.nbytes})]} | extra)
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def binary_output(response: httpx.Response, dtype: Any) -> np.ndarray:
    length = int(response.headers["inference-header-content-length"])
    document = orjson.loads(response.content[:length])
    (out,) = document["outputs"]
    assert out["parameters"]["binary_data_size"] == len(response.content) - length
    return np.frombuffer(response.content[length:], dtype).reshape(out["shape"])


async def test_health_metadata_and_readiness_follow_warm_up() -> None:
    engine = FakeEngine(dim=DIM, warmup_s=0.5)
    async with serving(engine, ready=False) as (client, app):
        assert (await client.get("/v2/health/live")).json() == {"live": True}
        early = await client.get("/v2/health/ready")
        assert early.status_code == 503 and "warming" in early.json()["error"]
        assert (await client.get("/v2/models/encoder/ready")).status_code == 503
        assert (await client.post(INFER, content=json_body(sample(1)))).status_code == 503
        await eventually(lambda: app.state.service.batcher is not None)
        assert (await client.get("/v2/health/ready")).json() == {"ready": True}
        assert (await client.get("/v2/models/encoder/versions/1/ready")).status_code == 200
        server = (await client.get("/v2")).json()
        model = await client.get("/v2/models/encoder")
        config = await client.get("/v2/models/encoder/versions/1/config")
        unknown = await client.get("/v2/models/bert/ready")
        versioned = await client.get("/v2/models/encoder/versions/7")
    assert server["extensions"] == ["binary_tensor_data", "statistics"] and server["name"] == "encoder-service"
    assert model.json()["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, -1, DIM]}]
    assert config.json()["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [-1, DIM]}]
    assert unknown.status_code == 404 and "bert" in unknown.json()["error"]
    assert versioned.status_code == 404 and set(versioned.json()) == {"error"}


@pytest.mark.parametrize("path", [INFER, "/v2/models/encoder/versions/1/infer"])
async def test_json_inference_answers_json(path: str) -> None:
    x = sample(1, 2, 5, DIM)
    async with serving() as (client, _):
        response = await client.post(path, content=json_body(x, id="42"))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    document = response.json()
    assert (document["model_name"], document["model_version"], document["id"]) == ("encoder", "1", "42")
    (out,) = document["outputs"]
    assert out["name"] == "output" and out["datatype"] == "FP32" and out["shape"] == [2, 5, DIM]
    np.testing.assert_allclose(np.asarray(out["data"], np.float32).reshape(x.shape), expected(x), rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
async def test_binary_inference_answers_binary_in_the_input_datatype(dtype: str) -> None:
    x = sample(2, 3, 6, DIM, dtype=dtype)
    body, headers = binary_body(x, parameters={"binary_data_output": True})
    async with serving(FakeEngine(dim=DIM, dtype="float16")) as (client, _):
        response = await client.post(INFER, content=body, headers=headers)
        gzipped = await client.post(INFER, content=gzip.compress(body), headers=headers | {"content-encoding": "gzip"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    out = binary_output(response, dtype)
    np.testing.assert_allclose(out.astype(np.float32), expected(x.astype(np.float16)), rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(binary_output(gzipped, dtype), out)


async def test_large_binary_answers_are_sent_in_parts() -> None:
    x = sample(3, 4, 64, DIM)  # 8 KiB in, 8 KiB out: above the joining threshold with the header
    x = np.concatenate([x] * 2, axis=1)
    body, headers = binary_body(x)
    request = {"outputs": [{"name": "output", "parameters": {"binary_data": True}}]}
    body, headers = binary_body(x, **request)
    async with serving(FakeEngine(dim=DIM, max_seq_len=128)) as (client, _):
        response = await client.post(INFER, content=body, headers=headers)
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(binary_output(response, np.float32), expected(x), rtol=1e-6)


SHM = {"shared_memory_region": "r", "shared_memory_byte_size": 4 * DIM * 4}
BAD: list[tuple[str, bytes, dict[str, str], int]] = [
    ("malformed JSON", b"{", {}, 400),
    ("no inputs", b"{}", {}, 400),
    ("count mismatch", json_body(sample(4))[:-2] + b',"shape":[5,8]}]}', {}, 400),
    ("bad header length", json_body(sample(4)), {"Inference-Header-Content-Length": "x"}, 400),
    ("wrong width", json_body(sample(4, 3, 5)), {}, 422),
    ("INT32", json_body(sample(4)).replace(b'"FP32"', b'"INT32"'), {}, 422),
    ("FP16 overflow", json_body(np.full((1, DIM), 1e38, np.float32)).replace(b'"FP32"', b'"FP16"'), {}, 422),
    ("bad timeout header", json_body(sample(4)), {"x-request-timeout-ms": "soon"}, 422),
    ("gzip that is not", json_body(sample(4)), {"content-encoding": "gzip"}, 400),
    ("unknown encoding", json_body(sample(4)), {"content-encoding": "br"}, 415),
    ("shared memory off", orjson.dumps({"inputs": [tensor(sample(4), parameters=SHM)]}), {}, 400),
]


async def test_bad_requests_get_4xx_in_the_protocols_error_form() -> None:
    async with serving(FakeEngine(dim=DIM), max_body_bytes=4096) as (client, _):
        for name, body, headers, status in BAD:
            response = await client.post(INFER, content=body, headers=headers)
            assert response.status_code == status, (name, response.text)
            assert list(response.json()) == ["error"] and response.json()["error"], name
        unknown = await client.post("/v2/models/bert/infer", content=json_body(sample(4)))
        too_large = await client.post(INFER, content=b" " * 5000, headers={"content-length": "5000"})
        after = await client.post(INFER, content=json_body(sample(5)))
        text = (await client.get("/metrics")).text
    assert unknown.status_code == 404 and "bert" in unknown.json()["error"]
    assert too_large.status_code == 413 and too_large.headers["connection"] == "close"
    assert after.status_code == 200  # none of that harmed the service
    assert metric(text, "encoder_requests_total", outcome="invalid") == len(BAD) + 2
    assert metric(text, "encoder_requests_total", outcome="ok") == 1


async def test_admission_refuses_with_429_before_reading_the_body() -> None:
    engine = FakeEngine(dim=DIM, delay_s=0.5)
    async with serving(engine, max_queue=1, max_batch_size=1, max_delay_ms=0) as (client, app):
        state = app.state.service
        first = asyncio.ensure_future(client.post(INFER, content=json_body(sample(1))))
        await eventually(lambda: len(engine.batches) == 1)
        second = asyncio.ensure_future(client.post(INFER, content=json_body(sample(2))))
        await eventually(lambda: state.in_flight == 2)
        refused = await client.post(INFER, content=b"never read")  # malformed, but refused before parsing
        late = await client.post(INFER, content=json_body(sample(3)), headers={"x-request-timeout-ms": "50"})
        assert [r.status_code for r in await asyncio.gather(first, second)] == [200, 200]
        in_time = sample(4)
        timed = await client.post(INFER, content=json_body(in_time, parameters={"timeout": 50_000}))
        text = (await client.get("/metrics")).text
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert "in flight" in refused.json()["error"]
    assert late.status_code == 429
    assert timed.status_code == 200  # 50 ms (in microseconds) is plenty for an idle engine
    assert metric(text, "encoder_requests_total", outcome="overloaded") == 2


async def test_the_timeout_parameter_is_a_deadline_in_microseconds() -> None:
    engine = FakeEngine(dim=DIM, delay_s=0.5)
    async with serving(engine, max_delay_ms=0) as (client, _):
        busy = asyncio.ensure_future(client.post(INFER, content=json_body(sample(1))))
        await eventually(lambda: len(engine.batches) == 1)
        late = await client.post(INFER, content=json_body(sample(2), parameters={"timeout": 50_000}))
        assert (await busy).status_code == 200
        stats = (await client.get("/v2/models/encoder/stats")).json()["model_stats"][0]
    assert late.status_code == 504 and "deadline" in late.json()["error"]
    assert stats["inference_stats"]["fail"]["count"] == 1 and stats["inference_stats"]["success"]["count"] == 1


def test_infer_targets_are_recognised_from_the_path() -> None:
    assert rest.infer_target("/v2/models/encoder/infer") == ("encoder", None)
    assert rest.infer_target("/v2/models/encoder/versions/1/infer") == ("encoder", "1")
    for path in ("/v2/models//infer", "/v2/models/a/b/infer", "/v2/models/a/versions//infer", "/encode", "/v2/infer"):
        assert rest.infer_target(path) is None


async def test_the_fastapi_route_answers_as_the_shortcut() -> None:
    x = sample(6, 3, DIM)
    async with serving() as (client, app):
        plain = FastAPI()  # no EncoderApp shortcut: the request goes through FastAPI's routing
        plain.state.service = app.state.service
        plain.include_router(rest.router)
        transport = httpx.ASGITransport(app=plain)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as routed:
            via_route = await routed.post("/v2/models/encoder/versions/1/infer", content=json_body(x))
        via_shortcut = await client.post("/v2/models/encoder/versions/1/infer", content=json_body(x))
        schema = (await client.get("/openapi.json")).json()
    assert via_route.status_code == 200 and via_route.json() == via_shortcut.json()
    assert "/v2/models/{name}/infer" in schema["paths"] and "/v2/health/ready" in schema["paths"]


def scope_for(headers: dict[str, str]) -> dict[str, Any]:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return {"type": "http", "method": "POST", "path": INFER, "headers": raw, "query_string": b"", "app": None}


async def test_a_body_that_stalls_gets_408_and_a_client_that_leaves_is_dropped() -> None:
    x = sample(7)
    body = json_body(x)
    engine = FakeEngine(dim=DIM, delay_s=0.5)
    async with serving(engine, max_delay_ms=0) as (client, app):
        state = app.state.service

        async def stalled() -> dict[str, Any]:
            await asyncio.sleep(30)
            return {"type": "http.disconnect"}

        headers = {"content-length": str(len(body)), "x-request-timeout-ms": "100"}
        slow = await rest.infer(Request(scope_for(headers), stalled), state, "encoder", None)
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def leaves() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await asyncio.sleep(0.1)  # the body arrived, then the client went away while the engine is busy
            return {"type": "http.disconnect"}

        busy = asyncio.ensure_future(client.post(INFER, content=json_body(sample(8))))
        await eventually(lambda: len(engine.batches) == 1)
        gone = await rest.infer(Request(scope_for({"content-length": str(len(body))}), leaves), state, "encoder", None)
        assert (await busy).status_code == 200
        text = (await client.get("/metrics")).text
    assert slow.status_code == 408 and slow.headers["connection"] == "close"
    assert b"deadline" in slow.body
    assert gone.status_code == 499
    assert engine.batch_sizes == [1]  # the request whose client left was never computed
    assert metric(text, "encoder_requests_total", outcome="cancelled") == 1
    assert metric(text, "encoder_dropped_requests_total", reason="cancelled") == 1


def test_an_unforeseen_error_is_a_logged_500_and_bad_input_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Never silent: an error no table names answers 500 and is logged with its traceback, as /encode's is; a
    foreseen one (bad input) answers its 4xx without an error log."""
    with caplog.at_level("ERROR", logger=rest.__name__):
        refused = rest.error_response(InvalidInput("not finite"))
        assert refused.status_code == 422 and not caplog.records
        response = rest.error_response(ZeroDivisionError("surprise"))
    assert response.status_code == 500
    assert orjson.loads(response.body) == {"error": "surprise"}
    (record,) = caplog.records
    assert record.exc_info is not None and record.exc_info[0] is ZeroDivisionError
