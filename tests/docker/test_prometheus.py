"""The monitoring config, proven against the real thing: promtool on the files and on a live /metrics scrape,
then a real Prometheus scraping a real service under traffic, where every expression of the rules and the
dashboard must return data.

Alert expressions are evaluated without their threshold (``ratio > 0.05`` -> ``ratio``): a healthy test run
does not fire alerts, yet each alert's signal must exist, or the alert could never fire. Every rule must also
report health "ok" in /api/v1/rules. The thresholds themselves are unit-tested by docker/prometheus/rules.test.yml.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import yaml

from tests.docker.conftest import REPO, require_tool
from tests.docker.expressions import PROMETHEUS_DIR, RULES, alert_signals, all_queries, rule_groups
from tests.service.server_support import free_port, running, wait_http

pytestmark = pytest.mark.slow

JOB = "encoder"  # the scrape job the rules and alerts select on; kept from docker/prometheus/prometheus.yml
DIM = 64  # the small bundle's width (tests/converter/conftest.py)
SEQ_LEN = 16  # short sequences: the CPU engine stays cheap on a 2-core CI box
MAX_BATCH = 8  # engine buckets 1, 2, 4, 8: the per-batch-size series are 1, 4 (a request of 3) and 8
# Generous: a 2-core CI box may be converting, importing torch and running Prometheus at the same time.
READY_TIMEOUT_S = 180.0
DATA_TIMEOUT_S = 90.0


def test_alert_thresholds_are_recognised() -> None:
    alerts = [rule for group in rule_groups() for rule in group["rules"] if "alert" in rule]
    assert {rule["alert"] for rule in alerts} >= {"EncoderHighErrorRatio", "EncoderP99LatencyHigh", "EncoderNotReady"}
    for rule in alerts:
        assert all(alert_signals(rule["expr"])), rule["alert"]  # raises if a part has no threshold
    assert alert_signals('a{x=~"b|c"} > 0.05 and on (job) b > 0.1') == ['a{x=~"b|c"}', "b"]
    assert alert_signals('x == 0 or up{job="encoder"} == 0') == ["x", 'up{job="encoder"}']
    assert alert_signals("histogram_quantile(0.99, sum by (le) (rate(h[5m]))) > 1e-1") == [
        "histogram_quantile(0.99, sum by (le) (rate(h[5m])))"
    ]
    with pytest.raises(ValueError, match="no `<comparison> <number>` threshold"):
        alert_signals("absent(up) or a > 1")


# ---------------------------------------------------------------------------------------------------------
# promtool on the files


def promtool(*args: str, stdin: bytes | None = None, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess[str]:
    command = [require_tool("promtool"), *args]
    return subprocess.run(
        command, input=stdin.decode() if stdin else None, capture_output=True, text=True, cwd=cwd, timeout=120
    )


def test_promtool_check_config() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", "rules.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests() -> None:
    result = promtool("test", "rules", "rules.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------------
# Processes


@contextlib.contextmanager
def process(command: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command`` with output to ``log``; SIGTERM it afterwards, SIGKILL if it will not stop."""
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass(frozen=True)
class Service:
    url: str
    port: int


@pytest.fixture(scope="module")
def service(small_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    log = tmp_path_factory.mktemp("service") / "service.log"
    args = ["-m", "service", "--model-dir", str(small_bundle), "--host", "127.0.0.1", "--provider", "cpu"]
    # CPU: CI has no GPU. A 20 ms batching window lets the bursts below form multi-request batches.
    args += ["--max-batch-size", str(MAX_BATCH), "--max-delay-ms", "20", "--seq-lens", str(SEQ_LEN)]
    with running(args, log, timeout=READY_TIMEOUT_S) as url:
        yield Service(url, int(url.rsplit(":", 1)[1]))


def prometheus_config(target: str, rules: Path) -> dict[str, Any]:
    """docker/prometheus/prometheus.yml with the encoder target swapped for ``target`` and 1 s intervals."""
    config: dict[str, Any] = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    # 1 s instead of 5 s: a [1m] rate has data after two scrapes, so the test waits seconds, not minutes.
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(rules)]
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == JOB]
    assert len(jobs) == 1, f"prometheus.yml must have exactly one scrape job named {JOB!r}"
    jobs[0]["static_configs"] = [{"targets": [target]}]
    # Prometheus scraping itself is for the compose stack; here it would only be one more moving part.
    config["scrape_configs"] = jobs
    return config


@pytest.fixture(scope="module")
def prometheus(service: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = require_tool("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    config = work / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(f"127.0.0.1:{service.port}", RULES)))
    check = promtool("check", "config", str(config), cwd=work)
    assert check.returncode == 0, check.stdout + check.stderr
    port = free_port()
    command = [binary, f"--config.file={config}", f"--storage.tsdb.path={work / 'data'}"]
    command += [f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    with process(command, work / "prometheus.log") as proc:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/-/ready", proc, work / "prometheus.log", 60.0)
        yield url


# ---------------------------------------------------------------------------------------------------------
# Traffic


def _npy(x: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, x, allow_pickle=False)
    return buffer.getvalue()


class Traffic:
    """Requests in a loop on a background thread, for as long as the queries run.

    Continuous rather than one burst up front: a [1m] rate of a finished burst falls to 0 a minute later,
    and a slow CI box could get there while the test is still polling. One cycle: single requests of 1, 3
    and 8 samples (alone in their batch: the per-batch-size series 1, 4 and 8), JSON and .npy, a burst of
    concurrent single samples (multi-request batches), malformed input (422) and, every few cycles, a
    request whose deadline has already passed (504, a dropped request).
    """

    def __init__(self, url: str) -> None:
        self._client = httpx.Client(base_url=url, timeout=30)
        self._pool = ThreadPoolExecutor(max_workers=8)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)
        self.statuses: dict[int, int] = {}
        self.errors: list[str] = []
        self._rng = np.random.default_rng(0)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self._pool.shutdown(wait=True)
        self._client.close()

    def _x(self, batch: int) -> np.ndarray:
        return self._rng.standard_normal((batch, SEQ_LEN, DIM)).astype(np.float32)

    def _post(self, content: bytes, content_type: str, **headers: str) -> None:
        try:
            response = self._client.post("/encode", content=content, headers={"content-type": content_type, **headers})
        except httpx.HTTPError as exc:  # recorded, not raised: the thread must keep the traffic going
            self.errors.append(repr(exc))
            return
        self.statuses[response.status_code] = self.statuses.get(response.status_code, 0) + 1

    def _json(self, x: np.ndarray, **headers: str) -> None:
        self._post(orjson.dumps({"inputs": x.tolist()}), "application/json", **headers)

    def _cycle(self, n: int) -> None:
        self._json(self._x(1))
        self._post(_npy(self._x(3)), "application/x-npy")
        self._json(self._x(8))
        self._post(_npy(self._x(8)), "application/x-npy")
        burst = [self._pool.submit(self._post, _npy(self._x(1)), "application/x-npy") for _ in range(8)]
        for future in burst:
            future.result()
        self._json(np.zeros((1, SEQ_LEN, DIM + 1), np.float32))  # wrong width: 422
        self._post(b'{"inputs": "nope"}', "application/json")  # not an array: 422
        if n % 4 == 0:
            self._json(self._x(1), **{"x-request-timeout-ms": "0.001"})  # expired on arrival: 504

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            self._cycle(n)
            n += 1
            self._stop.wait(0.1)  # leave CPU to the service and Prometheus on a small box


@pytest.fixture(scope="module")
def traffic(service: Service) -> Iterator[Traffic]:
    with Traffic(service.url) as load:
        yield load


# ---------------------------------------------------------------------------------------------------------
# The live checks


def test_metrics_pass_promtool_lint(service: Service) -> None:
    """The service's own exposition, linted: promtool exits 0 and prints nothing (no naming warnings)."""
    body = httpx.get(f"{service.url}/metrics", timeout=10).content
    result = promtool("check", "metrics", stdin=body)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr
    names = set(re.findall(r"^# TYPE (\S+)", body.decode(), re.MULTILINE))
    for expected in ("encoder_requests_total", "encoder_inference_duration_seconds", "encoder_batcher_alive"):
        assert expected in names, f"{expected} missing from /metrics"


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    assert body["data"]["resultType"] == "vector", f"{expr}: {body['data']['resultType']}"
    return list(body["data"]["result"])


def finite(result: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The series with a real number: NaN (e.g. a quantile of an idle batch-size bucket) draws nothing."""
    return [series for series in result if math.isfinite(float(series["value"][1]))]


def poll(check: Callable[[], list[str]], timeout: float) -> list[str]:
    """Run ``check`` (which returns what is still missing) until nothing is, or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    missing = check()
    while missing and time.monotonic() < deadline:
        time.sleep(1.0)
        missing = check()
    return missing


def test_every_rule_and_dashboard_expression_returns_data(prometheus: str, traffic: Traffic) -> None:
    queries = all_queries()
    assert len(queries) >= 30, "expected every record, alert signal and dashboard target"
    pending = dict(queries)

    def still_empty() -> list[str]:
        for where, expr in list(pending.items()):
            if finite(query(prometheus, expr)):
                del pending[where]
        return sorted(pending)

    missing = poll(still_empty, DATA_TIMEOUT_S)
    details = "\n".join(f"  {where}: {pending[where]!r} -> {query(prometheus, pending[where])}" for where in missing)
    assert not missing, f"queries without data after {DATA_TIMEOUT_S:.0f} s:\n{details}\ntraffic: {traffic.statuses}"
    assert not traffic.errors, traffic.errors[:5]
    assert traffic.statuses.get(200) and traffic.statuses.get(422), traffic.statuses


def test_latency_has_a_series_per_batch_size(prometheus: str, traffic: Traffic) -> None:
    """Requests of 1, 3 and 8 samples computed alone: the per-batch-size quantiles have buckets 1, 4 and 8."""

    def missing_sizes() -> list[str]:
        result = finite(query(prometheus, "encoder:inference_latency_seconds:p99_by_batch_size"))
        return sorted({"1", "4", "8"} - {series["metric"]["batch_size"] for series in result})

    missing = poll(missing_sizes, DATA_TIMEOUT_S)
    assert not missing, f"no p99 for batch sizes {missing}; traffic: {traffic.statuses}"


def test_outcomes_and_drops_are_counted(prometheus: str, traffic: Traffic) -> None:
    """The outcomes panel's interesting lines carry real, non-zero data: 200s, 422s and 504s."""

    def missing_outcomes() -> list[str]:
        result = query(prometheus, f'sum by (outcome) (increase(encoder_requests_total{{job="{JOB}"}}[5m])) > 0')
        dropped = query(prometheus, 'sum(increase(encoder_dropped_requests_total{reason="timeout"}[5m])) > 0')
        seen = {series["metric"]["outcome"] for series in result} | ({"dropped"} if dropped else set())
        return sorted({"ok", "invalid", "timeout", "dropped"} - seen)

    missing = poll(missing_outcomes, DATA_TIMEOUT_S)
    assert not missing, f"no non-zero counts for {missing}; traffic: {traffic.statuses}"


def test_every_rule_evaluates_healthy(prometheus: str, traffic: Traffic) -> None:
    expected = {rule.get("record") or rule.get("alert") for group in rule_groups() for rule in group["rules"]}

    def unhealthy() -> list[str]:
        body = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()
        rules = [rule for group in body["data"]["groups"] for rule in group["rules"]]
        bad = [f"{r['name']}: {r['health']} {r.get('lastError', '')}" for r in rules if r["health"] != "ok"]
        return bad + sorted(expected - {rule["name"] for rule in rules})

    problems = poll(unhealthy, DATA_TIMEOUT_S)
    assert not problems, problems
