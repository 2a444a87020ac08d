"""/metrics never 5xx over the multiprocess directory; no ``*_created`` series."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from service.__main__ import worker_environment
from service.metrics import Metrics
from service.settings import Settings
from tests.reliability.support import NPY_HEADERS, fake_args, metric, npy, sample
from tests.service.server_support import clean_env, running


def test_worker_environment_is_undone_afterwards() -> None:
    # The leak behind the intermittent 500: PROMETHEUS_MULTIPROC_DIR left pointing at a removed directory.
    before = dict(os.environ)
    with worker_environment(Settings(workers=2, engine="fake")):
        path = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        assert path.is_dir() and os.environ["ENCODER_WORKERS"] == "2"
    assert dict(os.environ) == before and not path.exists()


def test_a_vanished_directory_falls_back_to_this_process(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "metrics"
    path.mkdir()
    metrics = Metrics(multiprocess_mode=True)  # no env var: multiprocess without a directory renders locally
    assert b"encoder_requests_total" in metrics.render()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    try:
        metrics = Metrics()
    finally:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
    metrics.observe_request("ok", 0.01)
    shutil.rmtree(path)
    page = metrics.render().decode()
    assert metric(page, "encoder_requests_total", outcome="ok") == 1
    assert path.is_dir()  # recreated for workers started later
    assert "serving this worker's own values" in caplog.text


@pytest.mark.slow
def test_two_workers_keep_serving_metrics_when_the_directory_is_deleted(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = clean_env(TMPDIR=str(tmp))  # so the server's metrics directory is one this test can find
    with running([*fake_args("--workers", "2")], tmp_path / "server.log", env=env) as url:
        for i in range(4):
            assert httpx.post(f"{url}/encode", content=npy(sample(i)), headers=NPY_HEADERS).status_code == 200
        (metrics_dir,) = tmp.glob("encoder-metrics-*")
        whole = httpx.get(f"{url}/metrics").text
        shutil.rmtree(metrics_dir)  # what a /tmp cleaner or another suite's cleanup did
        pages = [httpx.get(f"{url}/metrics", headers={"connection": "close"}) for _ in range(8)]
        after = httpx.post(f"{url}/encode", content=npy(sample(9)), headers=NPY_HEADERS)
    assert metric(whole, "encoder_requests_total", outcome="ok") == 4
    assert [p.status_code for p in pages] == [200] * 8
    assert all("encoder_requests_total" in p.text for p in pages)
    assert after.status_code == 200
    assert "_created" not in whole and not any("_created" in p.text for p in pages)


@pytest.mark.slow
def test_no_created_series_with_one_worker(tmp_path: Path) -> None:
    with running(fake_args(), tmp_path / "server.log") as url:
        httpx.post(f"{url}/encode", content=npy(sample(0)), headers=NPY_HEADERS)
        page = httpx.get(f"{url}/metrics").text
    assert "encoder_requests_total" in page and "_created" not in page
