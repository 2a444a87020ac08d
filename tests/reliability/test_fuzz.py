"""Fuzzed and hostile input against a real server: schemathesis over the OpenAPI schema plus hand-written
hostile bodies. Zero 5xx, and the service still ready and right afterwards."""

from __future__ import annotations

import contextlib
import socket
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import httpx
import hypothesis
import pytest
import requests
import schemathesis
from hypothesis.strategies import SearchStrategy
from schemathesis.generation import GenerationMode

from tests.reliability.hostile import all_cases
from tests.reliability.support import NPY_HEADERS, assert_answer, fake_server, npy, sample

pytestmark = pytest.mark.slow
MIB = 1 << 20
FLAGS = ("--max-delay-ms", "1", "--max-body-bytes", str(MIB), "--request-timeout-ms", "3000")
# Generated cases per (operation, media type, mode); GET endpoints without parameters run out of new cases
# early, so /encode carries the bulk.
ENCODE_EXAMPLES = {GenerationMode.POSITIVE: 400, GenerationMode.NEGATIVE: 300}
OTHER_EXAMPLES = 25
MIN_CASES = 2000


def fuzz(url: str) -> Counter[tuple[str, int]]:
    """Every operation of the live schema, each media type, positive and negative data: (label, status) counts."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    seen: Counter[tuple[str, int]] = Counter()
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()
        for media_type in operation.get_request_payload_content_types() or [None]:
            for mode, examples in ENCODE_EXAMPLES.items():
                count = examples if operation.path == "/encode" else OTHER_EXAMPLES
                label = f"{operation.label} {media_type or ''} {mode.value}"
                strategy = operation.as_strategy(generation_mode=mode, media_type=media_type)
                with contextlib.suppress(hypothesis.errors.Unsatisfiable):  # no negative data for some operations
                    run_cases(url, session, strategy, count, label, seen)
    return seen


def run_cases(
    url: str,
    session: requests.Session,
    strategy: SearchStrategy[schemathesis.Case],
    count: int,
    label: str,
    seen: Counter[tuple[str, int]],
) -> None:
    @hypothesis.settings(
        max_examples=count,
        deadline=None,
        database=None,
        derandomize=True,  # the same cases on every run: a CI failure reproduces
        suppress_health_check=list(hypothesis.HealthCheck),
        phases=[hypothesis.Phase.generate],
    )
    @hypothesis.given(case=strategy)
    def check(case: schemathesis.Case) -> None:
        response = case.call(base_url=url, session=session, timeout=30)
        seen[(label, response.status_code)] += 1
        assert response.status_code < 500, f"{case.as_curl_command()} -> {response.text[:500]}"

    check()


def slow_loris(port: int, timeout_ms: int) -> tuple[bytes, float]:
    """Send the headers and half the body, then stall: the answer and how long it took to come."""
    body = npy(sample(1))
    head = f"POST /encode HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-npy\r\nContent-Length: {len(body)}\r\n"
    head += f"X-Request-Timeout-Ms: {timeout_ms}\r\n\r\n"
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode() + body[: len(body) // 2])
        answer = sock.recv(65536)
        return answer, time.monotonic() - started


def test_fuzzed_and_hostile_input_never_gets_a_5xx(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with fake_server(log, *FLAGS) as (url, _):
        started = time.monotonic()
        seen = fuzz(url)
        fuzz_s = time.monotonic() - started
        hostile: Counter[int] = Counter()
        with httpx.Client(base_url=url, timeout=30) as client:
            for name, body, headers in all_cases():
                response = client.post("/encode", content=body, headers=headers)
                assert response.status_code < 500, f"{name}: {response.status_code} {response.text[:300]}"
                if response.status_code != 200 and response.headers.get("content-type") == "application/json":
                    assert response.json()["error"]["type"], name  # the app's one error body shape
                hostile[response.status_code] += 1
            too_large = client.post("/encode", content=b"\0" * (2 * MIB), headers=NPY_HEADERS)
        port = urlparse(url).port
        assert port is not None
        stalled, took = slow_loris(port, 500)
        stalled_default, took_default = slow_loris(port, 3000)  # the server's default deadline
        ready = httpx.get(f"{url}/readyz")
        after = httpx.post(f"{url}/encode", content=npy(sample(5)), headers=NPY_HEADERS)
    total = sum(seen.values())
    by_status: Counter[int] = Counter()
    for (_, status), n in seen.items():
        by_status[status] += n
    print(f"schemathesis: {total} cases in {fuzz_s:.0f} s, statuses {dict(by_status)}; hostile: {dict(hostile)}")
    assert total >= MIN_CASES
    assert sum(n for (label, _), n in seen.items() if "/encode" in label) >= MIN_CASES - 200
    assert too_large.status_code == 413
    assert stalled.startswith(b"HTTP/1.1 408") and took < 10
    assert stalled_default.startswith(b"HTTP/1.1 408") and took_default < 15
    assert ready.status_code == 200
    assert after.status_code == 200
    assert_answer(sample(5), after.content)
    assert "Traceback" not in log.read_text() and "unexpected error" not in log.read_text()
