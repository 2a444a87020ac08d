from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.engine import remote as remote_module
from service.engine.base import Engine, EngineUnrecoverable
from service.engine.fake import POISON, FakeEngine, fake_output
from service.engine.remote import RemoteEngine, RemotePool
from tests.service.engine.support import (
    TIMEOUT_S,
    HostThread,
    hosting,
    remotes,
    sample,
)
from tests.service.server_support import REPO
from tests.service.support import from_npy, npy, serving

pytestmark = pytest.mark.timeout(60)
NPY_HEADERS = {"content-type": "application/x-npy"}


def test_a_remote_engine_reports_the_host_engine_and_never_pads() -> None:
    engine = FakeEngine(max_batch_size=8, delay_s=0.0, fixed_shapes=True)
    with hosting(engine, max_batch_size=8) as host, remotes(host.path) as (remote,):
        assert isinstance(remote, Engine)
        assert (remote.name, remote.dim, remote.dtype, remote.max_seq_len) == ("fake", 8, np.float32, 64)
        assert remote.buckets == (1, 2, 4, 8) and remote.provider == "fake"
        assert remote.fixed_shapes is False  # the engine process pads the merged batch, not each worker
        remote.warmup()  # nothing to do, and harmless
        described = remote.describe()
        assert described["fixed_shapes"] is True and described["delay_s"] == 0.0  # the host engine's own facts
        shared = described["engine_process"]
        assert shared["socket"] == host.path and shared["arena_pinned"] is False
        assert shared["arena_bytes"] == remote.arena.size > 0


def test_buckets_stop_at_the_hosts_max_batch_size() -> None:
    with hosting(FakeEngine(max_batch_size=8), max_batch_size=4) as host, remotes(host.path) as (remote,):
        assert remote.buckets == (1, 2, 4)


def test_an_arena_built_input_gets_its_answer() -> None:
    with hosting(FakeEngine()) as host, remotes(host.path) as (remote,):
        x = sample(1, batch=3)
        buffer = remote.input_buffer(3, 4)
        assert remote.arena.offset_of(buffer) is not None  # the batcher assembles batches in shared memory
        buffer[...] = x
        np.testing.assert_allclose(remote.run(buffer), fake_output(x), rtol=1e-6)


def test_a_foreign_input_gets_its_answer_and_is_left_alone() -> None:
    with hosting(FakeEngine()) as host, remotes(host.path) as (remote,):
        x = sample(2, batch=3)
        original = x.copy()
        np.testing.assert_allclose(remote.run(x), fake_output(x), rtol=1e-6)
        np.testing.assert_array_equal(x, original)
        frozen = sample(3, batch=2)
        frozen.setflags(write=False)  # the service hands over read-only views of request bodies
        np.testing.assert_allclose(remote.run(frozen), fake_output(frozen), rtol=1e-6)
        wide = sample(4, batch=2, seq=8)[:, ::2]  # not contiguous
        np.testing.assert_allclose(remote.run(wide), fake_output(wide), rtol=1e-6)


def test_answers_stay_valid_while_later_batches_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # However the worker reuses its shared memory, an answer the caller still holds must never be overwritten.
    monkeypatch.setattr(remote_module, "REGION_WAIT_S", 0.2, raising=False)
    with hosting(FakeEngine()) as host, remotes(host.path) as (remote,):
        held: list[tuple[np.ndarray, np.ndarray]] = []
        for i in range(12):
            x = sample(10 + i, batch=1 + i % 3)
            source = remote.input_buffer(*x.shape[:2]) if i % 2 else x.copy()
            source[...] = x
            try:
                held.append((x, remote.run(source)))
            except RuntimeError:  # no shared memory left while every answer is held: refusing is fine
                break
            del source
            for kept_x, kept_out in held:
                np.testing.assert_allclose(kept_out, fake_output(kept_x), rtol=1e-6)
        assert len(held) >= 2
        held.clear()  # answers dropped: their memory is free again
        for i in range(8):
            np.testing.assert_allclose(remote.run(sample(40 + i)), fake_output(sample(40 + i)), rtol=1e-6)


def test_input_buffer_too_big_for_shared_memory_is_a_plain_array() -> None:
    with hosting(FakeEngine()) as host, remotes(host.path, max_arena_bytes=8192) as (remote,):
        big = remote.input_buffer(64, 64)
        assert big.shape == (64, 64, 8) and big.dtype == np.float32
        assert remote.arena.offset_of(big) is None


def test_a_small_arena_sends_a_big_batch_in_pieces() -> None:
    engine = FakeEngine()
    # 8 KiB: every piece (and a whole row at the longest sequence, 2 KiB) fits, but not the batch of 10 x 512 B.
    with hosting(engine) as host, remotes(host.path, max_arena_bytes=8192) as (remote,):
        x = sample(5, batch=10, seq=16)
        original = x.copy()
        np.testing.assert_allclose(remote.run(x), fake_output(x), rtol=1e-6)
        np.testing.assert_array_equal(x, original)
        assert len(engine.batches) > 1 and all(seq == 16 for _, seq in engine.batches)
        assert sum(engine.batch_sizes) == 10
        np.testing.assert_array_equal(np.concatenate(engine.inputs), x)  # in order, each sample once
        np.testing.assert_allclose(remote.run(sample(6)), fake_output(sample(6)), rtol=1e-6)


def test_wrong_shapes_and_dtypes_are_refused_before_anything_is_sent() -> None:
    engine = FakeEngine()
    with hosting(engine) as host, remotes(host.path) as (remote,):
        for bad in (np.zeros((2, 4, 7), np.float32), np.zeros((4, 8), np.float32), np.zeros((1, 4, 8), np.float64)):
            with pytest.raises(ValueError, match="expected"):
                remote.run(bad)
        assert engine.batches == []
        np.testing.assert_allclose(remote.run(sample(7)), fake_output(sample(7)), rtol=1e-6)


def test_a_failed_batch_is_a_runtime_error_and_the_next_call_works() -> None:
    with hosting(FakeEngine()) as host, remotes(host.path) as (remote,):
        x = sample(8)
        x[0, 0, 0] = POISON
        with pytest.raises(RuntimeError, match="poisoned") as info:
            remote.run(x)
        assert not isinstance(info.value, EngineUnrecoverable)
        np.testing.assert_allclose(remote.run(sample(9)), fake_output(sample(9)), rtol=1e-6)


def test_a_stopped_host_makes_run_unrecoverable() -> None:
    host = HostThread(FakeEngine(), 8).start()
    try:
        with remotes(host.path) as (remote,):
            np.testing.assert_allclose(remote.run(sample(1)), fake_output(sample(1)), rtol=1e-6)
            host.stop()
            for _ in range(2):  # and it stays so
                with pytest.raises(EngineUnrecoverable, match="gone"):
                    remote.run(sample(2))
    finally:
        host.stop()


@pytest.mark.parametrize("attach", [RemoteEngine, RemotePool])
def test_attaching_where_no_host_listens_is_a_connection_error(attach: Callable[[str], object]) -> None:
    host = HostThread(FakeEngine(), 8)  # never started: its path does not exist
    try:
        with pytest.raises(ConnectionError, match="cannot attach"):
            attach(host.path)
    finally:
        host.stop()


def test_threads_sharing_one_remote_engine_get_their_own_answers() -> None:
    with hosting(FakeEngine(delay_s=0.002)) as host, remotes(host.path) as (remote,):

        def work(seed: int) -> None:
            for i in range(10):
                x = sample(seed * 100 + i, batch=1 + i % 3)
                np.testing.assert_allclose(remote.run(x), fake_output(x), rtol=1e-6)

        with ThreadPoolExecutor(3) as pool:
            for job in [pool.submit(work, seed) for seed in range(3)]:
                job.result(TIMEOUT_S)


# --- inside the app --------------------------------------------------------------------------------------------


def test_the_app_serves_through_a_remote_engine_and_turns_unavailable_when_the_host_goes() -> None:
    host = HostThread(FakeEngine(), 8).start()

    async def scenario(remote: RemoteEngine) -> None:
        async with serving(remote, engine_dir=host.directory) as (client, _):
            x = sample(3, batch=2)
            response = await client.post("/encode", content=npy(x), headers=NPY_HEADERS)
            assert response.status_code == 200, response.text
            np.testing.assert_allclose(from_npy(response.content), fake_output(x), rtol=1e-6)
            details = (await client.get("/v1/models")).json()["models"][0]["details"]
            assert details["engine_process"]["socket"] == host.path
            metrics = (await client.get("/metrics")).text
            # The engine process counts samples: a worker exports no batch series at all.
            assert "encoder_samples_processed_total{" not in metrics and "encoder_queue_wait_seconds_count" in metrics
            await asyncio.to_thread(host.stop)
            first = await client.post("/encode", content=npy(x), headers=NPY_HEADERS)
            # The batch that found the engine process gone fails (like a batch that breaks a local engine);
            # from then on the worker is unavailable: a 503 to retry elsewhere, never a hang.
            assert first.status_code in (500, 503), first.text
            later = await client.post("/encode", content=npy(x), headers=NPY_HEADERS)
            assert later.status_code == 503 and later.headers["retry-after"] == "1"
            assert (await client.get("/readyz")).status_code == 503

    try:
        with remotes(host.path) as (remote,):
            asyncio.run(asyncio.wait_for(scenario(remote), TIMEOUT_S))
    finally:
        host.stop()


# --- memory safety: in a subprocess, since the failure is a segfault -------------------------------------------


def assert_survives(body: str) -> None:
    """Run ``body`` in a fresh interpreter: it must reach its end (a segfault or an exception fails the test)."""
    script = (
        textwrap.dedent(
            """
        import numpy as np
        from service.engine.fake import FakeEngine, fake_output
        from service.engine.remote import RemoteEngine
        from tests.service.engine.support import hosting, sample
        """
        )
        + textwrap.dedent(body)
        + '\nprint("survived")\n'
    )
    command = [sys.executable, "-c", script]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and "survived" in result.stdout, (result.returncode, result.stderr[-2000:])


def test_an_arena_smaller_than_a_row_per_region_is_refused_or_works() -> None:
    assert_survives(
        """
        with hosting(FakeEngine()) as host:
            remote = RemoteEngine(host.path, max_arena_bytes=4096)  # rows of 64 x 8 float32 are 2 KiB
            for i in range(4):
                x = sample(i, seq=64)
                try:
                    assert np.allclose(remote.run(x), fake_output(x))
                except ValueError:
                    pass
        """
    )


def test_answers_survive_closing_the_remote_engine() -> None:
    assert_survives(
        """
        with hosting(FakeEngine()) as host:
            remote = RemoteEngine(host.path)
            x = sample(1)
            out = remote.run(x)
            remote.close()
            assert np.allclose(out, fake_output(x))
        """
    )


def test_closing_a_remote_engine_twice_is_harmless() -> None:
    assert_survives(
        """
        with hosting(FakeEngine()) as host:
            remote = RemoteEngine(host.path)
            remote.close()
            remote.close()
        """
    )
