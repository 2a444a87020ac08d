"""The CUDA shared-memory benchmark load and verification script, run on the CPU through the service's fake
device layer (the same client code as on a GPU, except where tritonclient allocates device memory)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loadtest.peers import oip_bench
from loadtest.peers.cuda_clients import check
from loadtest.peers.cuda_regions import FakeClientRegion
from loadtest.peers.oip_clients import OipSpec, Recorder, fixed_inputs
from tests.loadtest.test_oip_clients import args_for, point
from tests.service.server_support import REPO, clean_env


def test_answers_in_a_region_are_checked_in_full_and_on_rows_and_poison_catches_unwritten_ones() -> None:
    inputs = fixed_inputs(2, 8, 16)
    expected = inputs.astype(np.float32) * 2.0
    spec = OipSpec("cuda-shm", "h:1", "h:2", inputs, expected, full_every=2, cuda_fake=True)
    rec = Recorder(spec, (0.0, 1e12))
    region = FakeClientRegion("r", spec.nbytes, 0)
    try:
        region.write(expected.astype(np.float16))
        assert check(spec, rec, region, spec.nbytes) is None  # answer 1: in full
        assert check(spec, rec, region, spec.nbytes) is None  # answer 2: the rows
        assert rec.check.counts == {"values_full": 1, "values_rows": 1}
        region.poison_rows(inputs.dtype, inputs.shape, rec.check.rows)  # a request the server never answered
        assert "non-finite" in (check(spec, rec, region, spec.nbytes) or "")
        assert "0 bytes" in (check(spec, rec, region, 0) or "")
    finally:
        region.free()


def test_service_flags_and_the_engine_bar() -> None:
    args = args_for(protocols="shm-http,cuda-shm", service_help="--grpc-port --shared-memory --cuda-memory")
    assert oip_bench.validate(args) is None
    assert oip_bench.service_flags(args, 9001) == ["--grpc-port", "9001", "--shared-memory", "system,cuda"]
    args.device = "cpu"
    assert oip_bench.service_flags(args, 9001)[-2:] == ["--cuda-memory", "fake"]
    args.service_help = "--grpc-port --shared-memory"  # a service from before the extension: the load is skipped
    assert oip_bench.service_protocols(args) == ["shm-http"]
    results = [point("service", "cuda-shm x64", 8, 90_000.0), point("service", "cuda-shm-grpc x64", 8, 70_000.0)]
    found = oip_bench.oip_targets(results, {"64": 100_000.0})
    assert found["cuda-shm x64"]["vs_engine"] == pytest.approx(0.9) and found["cuda-shm x64"]["meets"]
    assert not found["cuda-shm-grpc x64"]["meets"]
    assert "cuda-shm x64" not in oip_bench.oip_targets(results)  # no baseline: no claim
    assert oip_bench.engine_baseline(args_for(protocols="cuda-shm", device="cpu")) is None


@pytest.mark.slow
def test_the_benchmark_drives_cuda_shared_memory_on_the_fake_layer(small_fp16_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    command = [sys.executable, "loadtest/bench_service.py", "--device", "cpu", "--model-dir", str(small_fp16_bundle)]
    command += ["--servers", "service", "--protocols", "cuda-shm,cuda-shm-grpc", "--client-batches", "1,4"]
    command += ["--concurrency", "2", "--batch-inflight-samples", "8", "--duration", "1.5", "--warmup", "0.5"]
    command += ["--workers", "2", "--clients", "1", "--seq", "64", "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    document = json.loads(out.read_text())
    points = {r["format"]: r for r in document["results"] if r.get("protocol")}
    assert set(points) == {"cuda-shm", "cuda-shm x4", "cuda-shm-grpc", "cuda-shm-grpc x4"}
    for p in points.values():
        assert p["errors"] == 0 and p["samples_per_s"] > 0
        assert p["value_checks"]["values_full"] + p["value_checks"]["values_rows"] > 0
        assert p["shm_paths"]["copied"] == 0 and p["shm_paths"]["direct"] > 0, p["shm_paths"]  # device to device
    assert document["engine_device_only"] is None  # measured on a GPU only


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_the_verification_script_passes_on_the_fake_layer(
    precision: str, small_bundle: Path, small_fp16_bundle: Path, tmp_path: Path
) -> None:
    # fp16: requests computed device to device by the engine process (as on a GPU); fp32: copied by the workers.
    out = tmp_path / "verify.json"
    bundle = small_fp16_bundle if precision == "fp16" else small_bundle
    command = [sys.executable, "loadtest/verify_cudashm.py", "--fake", "--provider", "cpu"]
    command += ["--model-dir", str(bundle), "--seq", "64", "--batches", "1,4", "--cycles", "10"]
    command += ["--out", str(out)]
    result = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    document = json.loads(out.read_text())
    assert document["passed"] and len(document["checks"]) >= 20
    refused = [name for name in document["checks"] if name.startswith("refused")]
    assert len(refused) >= 10


class _AcceptingServer:
    """A registry that opens every handle but "bad" (as CUDA opens some handles of freed memory)."""

    def __init__(self) -> None:
        self.regions: set[str] = set()

    def register(self, name: str, handle: bytes) -> None:
        from tritonclient.utils import InferenceServerException

        if name in self.regions:
            raise InferenceServerException("already registered", status="409")
        if handle == b"bad":
            raise InferenceServerException("cannot be opened", status="422")
        self.regions.add(name)

    def unregister_cuda_shared_memory(self, name: str = "") -> None:
        self.regions.discard(name)


def test_a_refusal_case_that_is_accepted_is_unregistered_and_a_stale_handle_is_named(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from loadtest.peers.cuda_refusals import STALE_ACCEPTED, refuse_each
    from loadtest.verify_cudashm import Checks

    server, checks = _AcceptingServer(), Checks()
    refuse_each(
        server,
        checks,
        {
            "stale handle (memory freed)": (lambda: server.register("b", b"stale"), {"422"}),
            "gRPC: stale handle": (lambda: server.register("b", b"stale"), {"StatusCode.INVALID_ARGUMENT"}),
            "byte size 0": (lambda: server.register("b", b"good"), {"422"}),
            "64 bytes that are no handle": (lambda: server.register("b", b"bad"), {"422"}),
        },
    )
    results = checks.results
    assert results["refused: stale handle (memory freed)"] == {"ok": False, "detail": STALE_ACCEPTED}
    assert results["refused: gRPC: stale handle"] == {"ok": False, "detail": STALE_ACCEPTED}  # not a duplicate
    assert results["refused: byte size 0"] == {"ok": False, "detail": "accepted (unregistered again)"}
    assert results["refused: 64 bytes that are no handle"] == {"ok": True, "detail": "422"}
    assert server.regions == set()
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("NOTE")]
    assert len(notes) == 2 and all("cannot tell" in line and "unregister" in line for line in notes)


class _Registrar:
    def register_cuda_shared_memory(self, *args: object) -> None:
        pass

    def unregister_cuda_shared_memory(self, *args: object) -> None:
        pass


def test_with_check_every_n_only_every_nth_answer_of_a_slot_is_poisoned_and_read_back() -> None:
    import contextlib

    from loadtest.peers.cuda_clients import in_cuda_regions

    inputs = fixed_inputs(1, 8, 16)
    spec = OipSpec("cuda-shm", "h:1", "h:2", inputs, inputs.astype(np.float32), cuda_fake=True, cuda_check_every=3)
    rec = Recorder(spec, (0.0, 1e12))
    with contextlib.ExitStack() as stack:
        placement = in_cuda_regions(spec, rec, 2, _Registrar, stack)
        assert placement.answer is not None
        verdicts = []
        for _ in range(4):  # the server never writes: a checked answer is the poison, an unchecked one its size
            placement.poison(0)
            verdicts.append(placement.answer(0, spec.nbytes))
        placement.poison(1)
        slot1 = placement.answer(1, spec.nbytes)
    assert ["non-finite" in (v or "") for v in verdicts] == [True, False, False, True]
    assert "non-finite" in (slot1 or "")  # each slot counts its own answers: its first is checked
    assert rec.check.counts["values_unchecked"] == 2
