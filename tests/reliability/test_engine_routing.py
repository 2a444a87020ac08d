"""Two engine processes under a real service: light load merges on the first, long runs bring the second in, and
every answer is its request's own either way."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.reliability.support import NPY_HEADERS, assert_answer, fake_server, metrics_of, npy, sample, wait_until
from tests.service.support import metric

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
# Runs like a GPU's: a fixed cost and a cost per sample (5 + 40 ms each): one sample takes 45 ms, a merged run of
# eight 325 ms, over four times as long, so the second engine joins once the runs grow.
FLAGS = ("--workers", "2", "--shared-engine", "on", "--max-batch-size", "8", "--max-delay-ms", "5")
FLAGS += ("--devices", "cpu:2", "--fake-delay-ms", "5", "--fake-sample-delay-ms", "40")


def post(url: str, x: np.ndarray) -> bytes:
    # A new connection each time: a kept-alive one would stick to one worker.
    response = httpx.post(f"{url}/encode", content=npy(x), headers=NPY_HEADERS | {"connection": "close"}, timeout=60)
    assert response.status_code == 200, response.text
    return response.content


def computed(url: str) -> dict[str, float]:
    text = metrics_of(url)
    return {device: metric(text, "encoder_samples_processed_total", device=device) for device in ("cpu0", "cpu1")}


def test_light_load_merges_on_the_first_engine_and_long_runs_spread_over_both(tmp_path: Path) -> None:
    with fake_server(tmp_path / "server.log", *FLAGS) as (url, _):
        for i in range(6):  # one at a time: short runs, nothing for a second engine to gain
            x = sample(i)
            assert_answer(x, post(url, x))
        assert computed(url) == {"cpu0": 6.0, "cpu1": 0.0}
        xs = [sample(100 + i, batch=1 + i % 3) for i in range(96)]
        with ThreadPoolExecutor(16) as pool:  # sixteen at a time: runs of up to eight samples
            answers = list(pool.map(lambda x: post(url, x), xs))
        for x, answer in zip(xs, answers, strict=True):
            assert_answer(x, answer)
        served = computed(url)
        assert served["cpu1"] >= 8 and served["cpu0"] >= 8 + 6, served  # both engines computed
        assert sum(served.values()) == 6 + sum(x.shape[0] for x in xs)
        wait_until(lambda: metric(metrics_of(url), "encoder_worker_batch_size_count") > 0, "workers' batch sizes")
