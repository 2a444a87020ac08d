"""The OIP benchmark clients' checks and the OIP part of the benchmark's bookkeeping, without servers."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from loadtest.peers import oip_bench
from loadtest.peers.oip_clients import (
    AnswerCheck,
    OipSpec,
    RawAnswerCheck,
    declared_bytes,
    fixed_inputs,
    reference_outputs,
)


def spec_for(batch: int = 2, seq: int = 8, dim: int = 16, tolerance: float = 1e-2, full_every: int = 3) -> OipSpec:
    inputs = fixed_inputs(batch, seq, dim)
    expected = (inputs.astype(np.float32) * 2.0) + 1.0
    return OipSpec("grpc", "h:1", "h:2", inputs, expected, tolerance=tolerance, full_every=full_every)


def test_fixed_inputs_are_distinct_samples_and_sample_zero_is_the_raw_loads() -> None:
    x = fixed_inputs(3, 8, 16)
    assert x.shape == (3, 8, 16) and x.dtype == np.float16
    raw = np.random.default_rng(0).standard_normal((8, 16)).astype("<f2")
    assert np.array_equal(x[0], raw)
    assert not np.array_equal(x[1], x[2])
    assert np.array_equal(fixed_inputs(3, 8, 16), x)


def test_check_passes_the_reference_and_counts_full_and_row_checks() -> None:
    spec = spec_for()
    check = AnswerCheck(spec)
    good = spec.expected.astype(np.float16)
    assert [check(good) for _ in range(4)] == [None] * 4
    assert check.counts == {"values_full": 2, "values_rows": 2}  # answers 1 and 4 in full


def test_check_catches_wrong_values_on_the_checked_rows_and_in_full() -> None:
    spec = spec_for(full_every=2)
    check = AnswerCheck(spec)
    bad_elsewhere = spec.expected.astype(np.float16)
    bad_elsewhere[1, 1] += 5.0  # row 1 is not one of the rows (0, 4, 7) every answer is checked on
    assert check(bad_elsewhere) is not None  # answer 1: checked in full
    assert check(bad_elsewhere) is None  # answer 2: rows only
    bad_row = spec.expected.astype(np.float16)
    bad_row[0, 7] = -bad_row[0, 7]
    assert "rel L2" in (check(bad_row) or "")


def test_check_rejects_nan_wrong_shape_and_wrong_dtype() -> None:
    spec = spec_for()
    check = AnswerCheck(spec)
    poisoned = spec.expected.astype(np.float16)
    poisoned[:, check.rows, :] = np.nan  # what an output slot holds when the server never wrote it
    assert "non-finite" in (check(poisoned) or "")
    assert "expected" in (check(spec.expected.astype(np.float16)[:1]) or "")
    assert "expected" in (check(spec.expected) or "")  # float32 answer to a float16 request


def test_size_checks_catch_empty_answers() -> None:
    spec = spec_for()
    check = AnswerCheck(spec)
    assert check.size(spec.nbytes) is None
    assert "0 bytes" in (check.size(0) or "")  # a Python-backend model's empty output
    assert check.size(None) is not None
    shape = list(spec.inputs.shape)
    assert declared_bytes(spec, "FP16", shape, None) == spec.nbytes
    assert declared_bytes(spec, "FP16", shape, 7) == 7
    assert declared_bytes(spec, "FP32", shape, None) is None


def test_reference_outputs_are_the_unbatched_answers(small_bundle: Path) -> None:
    x = fixed_inputs(2, 16, 64)
    ref = reference_outputs(str(small_bundle / "model.onnx"), x, "float32", "cpu")
    one = reference_outputs(str(small_bundle / "model.onnx"), x[1:], "float32", "cpu")
    assert ref.shape == (2, 16, 64) and ref.dtype == np.float32
    np.testing.assert_array_equal(ref[1], one[0])
    assert not np.allclose(ref[0], ref[1])


def args_for(**overrides: object) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    oip_bench.add_arguments(parser)
    args = parser.parse_args([])
    args.concurrency, args.server_list = "2,4", ["service"]
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_validate_parses_lists_and_refuses_unknown_protocols_and_triton_without_oip() -> None:
    args = args_for(protocols="raw,grpc,shm-http", client_batches="1,16", batch_inflight_samples="8,64,768")
    assert oip_bench.validate(args) is None
    args.concurrencies = [2, 4]
    assert args.client_batch_list == [1, 16]
    assert oip_bench.concurrencies(args, 1) == [2, 4]
    assert oip_bench.concurrencies(args, 16) == [1, 4, 48]  # the same samples in flight, at least one request
    assert oip_bench.concurrencies(args, 64) == [1, 12]
    assert oip_bench.oip_protocols(args) == ["grpc", "shm-http"]
    args.service_help = "usage: ... --grpc-port GRPC_PORT ... --shared-memory {off,system}"
    assert oip_bench.service_flags(args, 9001) == ["--grpc-port", "9001", "--shared-memory", "system"]
    args.service_help = "usage: ... --shared-memory {off,system}"  # a service without gRPC: those loads skip
    assert oip_bench.service_protocols(args) == ["shm-http"]
    assert oip_bench.service_flags(args, 9001) == ["--shared-memory", "system"]
    raw_only = args_for(service_help="--grpc-port GRPC_PORT --shared-memory")
    assert oip_bench.service_flags(raw_only, 9001) == ["--grpc-port", "9001"]  # never the default port
    assert "unknown" in (oip_bench.validate(args_for(protocols="raw,carrier-pigeon")) or "")
    assert "triton" in (oip_bench.validate(args_for(server_list=["triton"])) or "")
    assert oip_bench.service_flags(args_for(service_help=""), 9001) == []


def point(server: str, fmt: str, conc: int, rate: float) -> dict[str, object]:
    return {"server": server, "format": fmt, "concurrency": conc, "samples_per_s": rate, "p50_ms": 1.0, "p99_ms": 2.0}


def test_raw_check_takes_the_reference_answer_and_refuses_another() -> None:
    expected = fixed_inputs(1, 8, 16)[0].astype(np.float32) * 3.0
    check = RawAnswerCheck(expected, 1e-2)
    assert check(expected.astype("<f2").tobytes()) is None
    assert "rel L2" in (check((expected * 1.1).astype("<f2").tobytes()) or "")
    nan = expected.astype("<f2")
    nan[0, 0] = np.nan
    assert "non-finite" in (check(nan.tobytes()) or "")


def test_targets_and_side_by_side_table() -> None:
    results = [point("service", "raw", 8, 1000.0), point("service", "raw", 16, 2000.0)]
    results += [point("service", "grpc", 8, 2100.0), point("service", "oip-http", 8, 1800.0)]
    results += [point("service", "shm-grpc x16", 8, 70_000.0)]
    results += [{**r, "protocol": "x"} for r in results if r["format"] != "raw"]
    results += [point("triton", "grpc", 8, 700.0)]
    found = oip_bench.oip_targets(results)
    assert found["raw_best"] == 2000.0
    assert found["grpc"]["meets"] and not found["oip-http"]["meets"]  # 0.9x raw < 0.95x
    assert found["shm-grpc x16"]["vs_raw"] == pytest.approx(35.0) and found["shm-grpc x16"]["meets"]
    table = oip_bench.comparison(results)
    assert "| grpc | 8 | 2,100 | 1.0 | 2.0 | 700 | 1.0 | 2.0 | 3.00× |" in table
    assert oip_bench.comparison(results[:2]) == ""
