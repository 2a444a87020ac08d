"""The Open Inference Protocol part of ``loadtest/bench_service.py``: OIP load on the service and on Triton.

``--protocols raw,oip-http,grpc,shm-http,shm-grpc`` picks the loads; ``raw`` is the service's own ``/encode``
(the existing clients), the others are tritonclient's clients (``oip_clients.py``) at every client batch of
``--client-batches``. The ``triton`` server is a real Triton Inference Server serving the same bundle
(``triton/``), driven by exactly the same clients. Answers are checked against a reference computed once per
client batch: each sample run alone through the bundle's ONNX model by plain onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.peers import profile
from loadtest.peers.launch import REPO_ROOT, child_env
from loadtest.peers.loadgen import drive
from loadtest.peers.oip_clients import (
    PROTOCOLS,
    OipSpec,
    RawAnswerCheck,
    fixed_inputs,
    reference_outputs,
)
from loadtest.peers.oip_loops import oip_client_main
from loadtest.peers.scrape import Samples, batch_sizes, scrape, shm_paths, time_breakdown
from loadtest.peers.triton.server import READY_PATH as TRITON_READY

log = logging.getLogger(__name__)
OIP_SERVERS = ("service", "triton")  # the entries that speak the protocol


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocols", default="raw", help=f"loads: raw (the service's /encode) and {','.join(PROTOCOLS)}")
    p.add_argument("--client-batches", default="1", help="samples per OIP request, e.g. 1,16,64")
    p.add_argument(
        "--batch-inflight-samples",
        help="samples in flight for client batches > 1, e.g. 192,768: requests in flight = samples / batch "
        "(default: --concurrency, as samples)",
    )
    p.add_argument("--triton-instances", type=int, default=2, help="Triton model instances (stub processes)")
    p.add_argument("--triton-http-threads", type=int, default=0, help="tritonserver --http-thread-count (0: default)")
    p.add_argument(
        "--profile-point",
        action="append",
        default=[],
        help="PROTOCOL:BATCH (e.g. shm-http:16): py-spy the service at that load's top concurrency (repeatable)",
    )
    p.add_argument(
        "--profile-clients",
        action="store_true",
        help="at --profile-point loads, py-spy the load's client processes as well as the service (role 'client')",
    )
    p.add_argument("--check-tolerance", type=float, default=2e-2, help="relative L2 error allowed per sample")
    p.add_argument(
        "--cuda-check-every",
        type=int,
        default=1,
        help="CUDA shared-memory loads: read back and check the values of every N-th answer of a client slot (the "
        "device reads stall the client process; every answer's size is checked)",
    )


def oip_protocols(args: argparse.Namespace) -> list[str]:
    return [p for p in args.protocols.split(",") if p.strip() and p.strip() != "raw"]


def validate(args: argparse.Namespace) -> str | None:
    """A message if the OIP flags are wrong, else None (and the parsed lists set on ``args``)."""
    wanted = [p.strip() for p in args.protocols.split(",") if p.strip()]
    unknown = sorted(set(wanted) - {"raw", *PROTOCOLS})
    if unknown:
        return f"unknown protocols {unknown}; choose from raw,{','.join(PROTOCOLS)}"
    if "triton" in args.server_list and not oip_protocols(args):
        return "--servers triton needs an OIP protocol in --protocols (raw is the service's own /encode)"
    args.client_batch_list = [int(b) for b in args.client_batches.split(",") if b.strip()]
    samples = args.batch_inflight_samples or args.concurrency
    args.batch_inflight = [int(c) for c in samples.split(",") if c.strip()]
    return None


def concurrencies(args: argparse.Namespace, batch: int) -> list[int]:
    """In-flight requests at one client batch: --concurrency for single samples, else the same samples in
    flight as --batch-inflight-samples says (so batch 16 and batch 64 put the GPU under the same load)."""
    if batch == 1:
        return list(args.concurrencies)
    return list(dict.fromkeys(max(1, samples // batch) for samples in args.batch_inflight))


# The service flags each OIP load needs; a service without them skips that load (Triton still runs it).
NEEDS = {"oip-http": (), "grpc": ("--grpc-port",), "shm-grpc": ("--grpc-port", "--shared-memory")}
NEEDS["shm-http"] = ("--shared-memory",)
NEEDS["cuda-shm"] = ("--cuda-memory",)  # the CUDA shared-memory extension came with that flag
NEEDS["cuda-shm-grpc"] = ("--grpc-port", "--cuda-memory")


def service_protocols(args: argparse.Namespace) -> list[str]:
    """The OIP loads asked for that this checkout's service has the flags for (read once from its --help)."""
    if getattr(args, "service_help", None) is None:
        command = [sys.executable, "-m", "service", "--help"]
        found = subprocess.run(command, cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=120)
        args.service_help = found.stdout
    return [p for p in oip_protocols(args) if all(flag in args.service_help for flag in NEEDS[p])]


def service_flags(args: argparse.Namespace, grpc_port: int) -> list[str]:
    """The service's extra flags: a free gRPC port wherever it has gRPC (never its default 8001, which another
    server on the host may hold), shared memory for the loads that use it."""
    protocols = service_protocols(args)
    flags = []
    if "--grpc-port" in args.service_help:
        flags += ["--grpc-port", str(grpc_port)]
    prefixes = (("system", "shm"), ("cuda", "cuda-shm"))
    kinds = [kind for kind, prefix in prefixes if any(p.startswith(prefix) for p in protocols)]
    if kinds:
        flags += ["--shared-memory", ",".join(kinds)]
    if "cuda" in kinds and getattr(args, "device", "cuda") == "cpu":
        flags += ["--cuda-memory", "fake"]  # the CPU self-test: the test-only fake device layer
    return flags


def triton_command(args: argparse.Namespace, http: int, grpc: int, metrics: int) -> tuple[list[str], str]:
    cmd = [sys.executable, "-m", "loadtest.peers.triton.server", "--model-dir", str(args.model_dir)]
    cmd += ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    cmd += ["--provider", args.device, "--instances", str(args.triton_instances)]
    cmd += ["--max-batch-size", str(args.max_batch_size), "--max-delay-ms", str(args.max_delay_ms)]
    cmd += ["--http-threads", str(args.triton_http_threads)]
    return cmd, TRITON_READY


class References:
    """The fixed input and its reference answer per client batch, computed on first use."""

    def __init__(self, args: argparse.Namespace, manifest: dict[str, Any]) -> None:
        self.args = args
        self.model_file = str(Path(args.model_dir) / manifest["model_file"])
        self.engine_dtype = str(manifest["inputs"][0]["dtype"])
        self.dim = int(manifest["dims"]["dim"])
        self.cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def get(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        if batch not in self.cache:
            inputs = fixed_inputs(batch, self.args.seq, self.dim)
            started = time.perf_counter()
            expected = reference_outputs(self.model_file, inputs, self.engine_dtype, self.args.device)
            log.info("reference for client batch %d: %.1f s", batch, time.perf_counter() - started)
            self.cache[batch] = (inputs, expected)
        return self.cache[batch]

    def raw_check(self) -> RawAnswerCheck:
        """For the service's raw /encode load, whose one sample is sample 0 of the fixed input."""
        return RawAnswerCheck(self.get(1)[1][0], self.args.check_tolerance)


def _sum(samples: Samples, name: str) -> float:
    """All label sets of one sample name (prometheus_client's parser names Triton's counters ``*_total``)."""
    return sum(value for (sample, _), value in samples.items() if sample in (name, f"{name}_total"))


def service_busy(before: Samples, after: Samples, wall_s: float) -> dict[str, Any]:
    """Engine time between two scrapes of the service (encoder_inference_duration_seconds sums)."""
    name = "encoder_inference_duration_seconds_sum"
    busy = _sum(after, name) - _sum(before, name)
    return {"engine_busy_s": busy, "wall_s": wall_s, "engine_busy_fraction": busy / wall_s if wall_s else None}


def triton_stats(before: Samples, after: Samples, wall_s: float) -> dict[str, Any]:
    """Triton's own counters between two scrapes: executions, samples per execution, per-request times."""

    def delta(name: str) -> float:
        return _sum(after, name) - _sum(before, name)

    requests, executions = delta("nv_inference_request_success"), delta("nv_inference_exec_count")
    samples = delta("nv_inference_count")
    per_request = {
        key: delta(f"nv_inference_{key}_duration_us") / requests / 1e3 if requests else None
        for key in ("queue", "compute_input", "compute_infer", "compute_output")
    }
    return {
        "executions": round(executions),
        "mean_batch_size": samples / executions if executions else None,
        "ms_per_request_mean": per_request,
        "failures": round(_sum(after, "nv_inference_request_failure") - _sum(before, "nv_inference_request_failure")),
        "wall_s": wall_s,
    }


def oip_points(
    entry: str, urls: tuple[str, str, str], args: argparse.Namespace, skipped: dict[str, str], pid: int | None = None
) -> list[dict[str, Any]]:
    """Every (protocol, client batch, concurrency) point of the OIP loads on one running server.

    ``urls``: (HTTP host:port, gRPC host:port, metrics base URL); loads the service cannot serve go to ``skipped``.
    ``pid``: the server's process, profiled at the ``--profile-point`` loads.
    """
    http, grpc, metrics_url = urls
    refs: References = args.references
    points = []
    protocols = oip_protocols(args) if entry == "triton" else service_protocols(args)
    for missing in [p for p in oip_protocols(args) if p not in protocols]:
        skipped[f"{entry} {missing}"] = f"this service has no {' / '.join(NEEDS[missing])} flag"
        log.warning("skipping %s %s: %s", entry, missing, skipped[f"{entry} {missing}"])
    for protocol in protocols:
        for batch in args.client_batch_list:
            inputs, expected = refs.get(batch)
            fake = args.device == "cpu"  # CUDA shared memory on the CPU: the service's fake layer (self-test)
            every = getattr(args, "cuda_check_every", 1)
            spec = OipSpec(
                protocol,
                http,
                grpc,
                inputs,
                expected,
                tolerance=args.check_tolerance,
                cuda_fake=fake,
                cuda_check_every=every,
            )
            concs = concurrencies(args, batch)
            for conc in concs:
                log.info("%s %s x%d at concurrency %d for %.0f s", entry, protocol, batch, conc, args.duration)
                before, started = _try_scrape(metrics_url), time.time()
                profiler = None
                if pid is not None and f"{protocol}:{batch}" in args.profile_point and conc == max(concs):
                    stem = args.out.with_name(f"{args.out.stem}-profile-{entry}-{protocol}-x{batch}-c{conc}.txt")
                    root = os.getpid() if getattr(args, "profile_clients", False) else pid  # + this run's clients
                    profiler = profile.start(root, args.duration + args.warmup, stem)
                point = drive(spec, conc, args.clients, args.warmup, args.duration, client=oip_client_main)
                if profiler is not None:
                    point["profile"] = profile.finish(profiler)
                after, wall = _try_scrape(metrics_url), time.time() - started
                if before is not None and after is not None:
                    point |= server_stats(entry, before, after, wall)
                head = {"server": entry, "format": label(protocol, batch), "protocol": protocol, "client_batch": batch}
                points.append(head | point)
                log.info("  %.0f samples/s, %d errors", point["samples_per_s"], point["errors"])
                if "shm_paths" in point:
                    log.info("  shared-memory requests by path: %s", point["shm_paths"])
    return points


def server_stats(entry: str, before: Samples, after: Samples, wall_s: float) -> dict[str, Any]:
    """What the server's own metrics say about one point: batches formed, where the time went."""
    if entry == "triton":
        return {"triton": triton_stats(before, after, wall_s)}
    busy = service_busy(before, after, wall_s)
    stats = {"server_batches": batch_sizes(before, after), "server_time": time_breakdown(before, after) | busy}
    paths = shm_paths(before, after)
    return stats | ({"shm_paths": paths} if any(paths.values()) else {})


def label(protocol: str, batch: int) -> str:
    return protocol if batch == 1 else f"{protocol} x{batch}"


def _try_scrape(url: str) -> Samples | None:
    try:
        return scrape(url)
    except (OSError, ValueError) as exc:
        log.warning("could not read %s/metrics: %s", url, exc)
        return None


def comparison(results: list[dict[str, Any]]) -> str:
    """Side by side: the service and Triton at every OIP point both ran."""
    ours = {(r["format"], r["concurrency"]): r for r in results if r["server"] == "service" and "protocol" in r}
    peer = {(r["format"], r["concurrency"]): r for r in results if r["server"] == "triton"}
    lines = [
        "| load | concurrency | service samples/s | p50 ms | p99 ms | Triton samples/s | p50 ms | p99 ms | "
        "service / Triton |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in [k for k in ours if k in peer]:
        a, b = ours[key], peer[key]
        ratio = f"{a['samples_per_s'] / b['samples_per_s']:.2f}×" if b["samples_per_s"] else "-"
        lines.append(
            f"| {key[0]} | {key[1]} | {a['samples_per_s']:,.0f} | {a['p50_ms'] or 0:.1f} | {a['p99_ms'] or 0:.1f} | "
            f"{b['samples_per_s']:,.0f} | {b['p50_ms'] or 0:.1f} | {b['p99_ms'] or 0:.1f} | {ratio} |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def engine_baseline(args: argparse.Namespace) -> dict[str, float] | None:
    """The engine's device-only samples/s per client batch, measured in its own process before any server runs,
    when a CUDA shared-memory load is asked for on a GPU (None otherwise, or if it failed: logged)."""
    if args.device != "cuda" or not any(p.startswith("cuda-shm") for p in oip_protocols(args)):
        return None
    command = [sys.executable, "-m", "loadtest.peers.engine_baseline", "--model-dir", str(args.model_dir)]
    command += ["--batches", ",".join(str(b) for b in args.client_batch_list), "--seq", str(args.seq)]
    log.info("engine device-only baseline: %s", " ".join(command))
    done = subprocess.run(command, cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        log.error("the engine baseline failed (exit %s):\n%s", done.returncode, done.stderr[-3000:])
        return None
    rates: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])["samples_per_s"]
    log.info("engine device-only samples/s: %s", {b: round(r) for b, r in rates.items()})
    return rates


def oip_targets(results: list[dict[str, Any]], engine: dict[str, float] | None = None) -> dict[str, Any]:
    """Issue 11's bars, from the service's points: best samples/s of each load against raw /encode's best; and
    issue 13's: CUDA shared memory at client batch 64 against the engine's device-only samples/s at 64."""

    def best(fmt: str) -> float | None:
        rates = [r["samples_per_s"] for r in results if r["server"] == "service" and r["format"] == fmt]
        return max(rates) if rates else None

    raw = best("raw")
    found: dict[str, Any] = {"raw_best": raw}
    for fmt, bar in (("grpc", 1.0), ("oip-http", 0.95), ("shm-grpc x16", 5.0), ("shm-http x16", 5.0)):
        rate = best(fmt)
        if rate is None:
            continue
        found[fmt] = {"best": rate, "vs_raw": rate / raw if raw else None, "bar_vs_raw": bar}
        found[fmt]["meets"] = bool(raw and rate / raw >= bar and (not fmt.startswith("shm") or rate >= 60_000))
    device_only = (engine or {}).get("64")
    for fmt in ("cuda-shm x64", "cuda-shm-grpc x64"):
        rate = best(fmt)
        if rate is not None and device_only:
            found[fmt] = {"best": rate, "engine_device_only": device_only, "vs_engine": rate / device_only}
            found[fmt] |= {"bar_vs_engine": 0.8, "meets": rate / device_only >= 0.8}
    return found
