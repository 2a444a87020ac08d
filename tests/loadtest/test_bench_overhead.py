"""The overhead harness serves what it claims: the no-op engine answers with the input, in either layout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from loadtest.bench_overhead import DIM, SEQ
from tests.service.server_support import REPO, clean_env, free_port, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.mark.parametrize("layout", [[], ["--engine-process"]], ids=["in-process", "engine-process"])
def test_the_no_op_service_echoes_its_input(layout: list[str], tmp_path: Path) -> None:
    port = free_port()
    command = [sys.executable, "-m", "loadtest.bench_overhead", "--serve-noop", str(port), *layout]
    log = tmp_path / "noop.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*command, "--log-level", "warning"], cwd=REPO, env=clean_env(), stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log, 60)
        xs = [np.random.default_rng(seed).standard_normal((SEQ, DIM)).astype(np.float16) for seed in range(3)]
        headers = {"content-type": "application/octet-stream", "x-shape": f"{SEQ},{DIM}", "x-dtype": "float16"}
        for x in xs:
            answer = httpx.post(f"{url}/encode", content=x.tobytes(), headers=headers, timeout=30)
            assert answer.status_code == 200, answer.text
            np.testing.assert_array_equal(np.frombuffer(answer.content, np.float16).reshape(SEQ, DIM), x)
        described = httpx.get(f"{url}/v1/models", timeout=10).json()["models"][0]["details"]
        assert ("engine_process" in described) == bool(layout)
    finally:
        process.terminate()
        process.wait(30)
