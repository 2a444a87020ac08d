"""Closed-loop HTTP load for the service benchmark: N client processes, each keeping C requests in flight.

Each process runs an asyncio loop with aiohttp (httpx where aiohttp is not installed: slower, fine for the
CPU self-test). Every request carries the same pre-built body, so the clients spend their CPU on HTTP, not on
making data. Throughput counts the answers completed inside the measured window; latencies are those answers'.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import logging
import multiprocessing as mp
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from queue import Empty
from typing import Any

import numpy as np
import orjson

log = logging.getLogger(__name__)
FORMATS = ("raw", "json", "litserve")


@dataclass(frozen=True)
class RequestSpec:
    """One request, sent again and again: where, what, and how to tell a good answer."""

    url: str
    body: bytes
    headers: dict[str, str]
    expect_len: int | None = None  # exact answer length (raw), else only the prefix is checked
    expect_prefix: bytes = b""
    samples: int = 1
    check: Any = None  # optional picklable callable: answer body -> a problem, or None (a value check)


def make_spec(fmt: str, base_url: str, seq: int, dim: int, seed: int = 0) -> RequestSpec:
    """A single-sample (seq, dim) fp16 request in ``fmt``: raw bytes, the service's JSON, or LitServe's JSON."""
    x = np.random.default_rng(seed).standard_normal((seq, dim)).astype("<f2")
    # identity: LitServe gzips answers over 1 kB for clients that accept it, which would measure gzip.
    common = {"Accept-Encoding": "identity"}
    if fmt == "raw":
        headers = {**common, "Content-Type": "application/octet-stream", "X-Shape": f"{seq},{dim}"}
        headers["X-Dtype"] = "float16"
        return RequestSpec(f"{base_url}/encode", x.tobytes(), headers, expect_len=x.nbytes)
    if fmt == "json":
        body = orjson.dumps({"inputs": x.astype(np.float32)}, option=orjson.OPT_SERIALIZE_NUMPY)
        return RequestSpec(f"{base_url}/encode", body, {**common, "Content-Type": "application/json"}, None, b"{")
    if fmt == "litserve":
        document = {"shape": [seq, dim], "dtype": "float16", "data": base64.b64encode(x.tobytes()).decode()}
        headers = {**common, "Content-Type": "application/json"}
        return RequestSpec(f"{base_url}/predict", orjson.dumps(document), headers, None, b"{")
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


@dataclass
class ClientReport:
    latencies_ms: list[float] = field(default_factory=list)
    ok: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    queue_ms: float = 0.0  # sums of the service's X-Queue-Time / X-Inference-Time headers, where present
    inference_ms: float = 0.0
    timed: int = 0
    checks: dict[str, int] = field(default_factory=dict)  # answers whose values were checked, by kind

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


def _good(spec: RequestSpec, status: int, body: bytes) -> str | None:
    if status != 200:
        return f"status {status}"
    if spec.expect_len is not None and len(body) != spec.expect_len:
        return "wrong length"
    if not body.startswith(spec.expect_prefix):
        return "bad body"
    return spec.check(body) if spec.check is not None else None


async def _loop(spec: RequestSpec, inflight: int, window: tuple[float, float]) -> ClientReport:
    start, stop = window
    report = ClientReport()

    def record(sent: float, status: int, body: bytes, headers: Any) -> None:
        done = time.time()
        if not start <= done <= stop:
            return  # warm-up, or past the window
        problem = _good(spec, status, body)
        if problem:
            report.error(problem)
            return
        report.ok += 1
        report.latencies_ms.append((done - sent) * 1e3)
        if spec.check is not None:
            report.checks["values_rows"] = report.checks.get("values_rows", 0) + 1
        if "x-queue-time" in headers:
            report.queue_ms += float(headers["x-queue-time"]) * 1e3
            report.inference_ms += float(headers.get("x-inference-time", 0.0)) * 1e3
            report.timed += 1

    if importlib.util.find_spec("aiohttp") is not None:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

            async def one() -> None:
                while time.time() < stop:
                    sent = time.time()
                    try:
                        async with session.post(spec.url, data=spec.body, headers=spec.headers) as resp:
                            record(sent, resp.status, await resp.read(), resp.headers)
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        if start <= time.time() <= stop:
                            report.error(type(exc).__name__)

            await asyncio.gather(*(one() for _ in range(inflight)))
        return report

    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=60.0) as client:

        async def one_httpx() -> None:
            while time.time() < stop:
                sent = time.time()
                try:
                    resp = await client.post(spec.url, content=spec.body, headers=spec.headers)
                    record(sent, resp.status_code, resp.content, resp.headers)
                except httpx.HTTPError as exc:
                    if start <= time.time() <= stop:
                        report.error(type(exc).__name__)

        await asyncio.gather(*(one_httpx() for _ in range(inflight)))
    return report


def _client_main(spec: RequestSpec, inflight: int, window: tuple[float, float], out: Any) -> None:
    out.put(asyncio.run(_loop(spec, inflight, window)))


def split(concurrency: int, clients: int) -> list[int]:
    """``concurrency`` in-flight requests over at most ``clients`` processes, as evenly as possible."""
    procs = max(1, min(clients, concurrency))
    base, extra = divmod(concurrency, procs)
    return [base + (1 if i < extra else 0) for i in range(procs)]


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


ClientMain = Callable[[Any, int, tuple[float, float], Any], None]


def drive(
    spec: Any,
    concurrency: int,
    clients: int,
    warmup_s: float,
    duration_s: float,
    client: ClientMain = _client_main,
) -> dict[str, Any]:
    """Run the closed loop; return samples/s, latency percentiles (ms) and error counts for the window.

    ``client(spec, inflight, window, queue)`` is each process's body (the raw HTTP one by default; the OIP
    clients bring theirs); it puts one :class:`ClientReport` on the queue.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    # Spawned processes take ~1 s to import; the window starts after that and the warm-up.
    start = time.time() + 2.0 + warmup_s
    window = (start, start + duration_s)
    procs = [ctx.Process(target=client, args=(spec, n, window, queue)) for n in split(concurrency, clients)]
    for proc in procs:
        proc.start()
    reports = []
    give_up = window[1] + 120  # a stuck client must not hang the whole benchmark
    while len(reports) < len(procs):
        try:
            reports.append(queue.get(timeout=1.0))
        except Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead or time.time() > give_up:
                for proc in procs:
                    proc.kill()
                raise RuntimeError(f"client processes failed (exit codes {[p.exitcode for p in procs]})") from None
    for proc in procs:
        proc.join(30)
    merged = ClientReport()
    for rep in reports:
        merged.latencies_ms += rep.latencies_ms
        merged.ok += rep.ok
        merged.queue_ms += rep.queue_ms
        merged.inference_ms += rep.inference_ms
        merged.timed += rep.timed
        for kind, count in rep.error_kinds.items():
            merged.error_kinds[kind] = merged.error_kinds.get(kind, 0) + count
        for kind, count in rep.checks.items():
            merged.checks[kind] = merged.checks.get(kind, 0) + count
        merged.errors += rep.errors
    lat = merged.latencies_ms
    result: dict[str, Any] = {
        "concurrency": concurrency,
        "client_processes": len(procs),
        "duration_s": duration_s,
        "requests_ok": merged.ok,
        "errors": merged.errors,
        "error_kinds": merged.error_kinds,
        "samples_per_s": merged.ok * spec.samples / duration_s,
        "p50_ms": percentile(lat, 50),
        "p90_ms": percentile(lat, 90),
        "p99_ms": percentile(lat, 99),
        "mean_ms": float(np.mean(lat)) if lat else None,
    }
    if merged.checks:
        result["value_checks"] = merged.checks
    if merged.timed:
        result["server_queue_ms_mean"] = merged.queue_ms / merged.timed
        result["server_inference_ms_mean"] = merged.inference_ms / merged.timed
    return result
