"""Server CPU per request: gRPC ``ModelInfer`` (raw contents) against raw HTTP ``/encode``, on the CPU.

One service process serves both transports with the no-op engine (it answers with its input), so the CPU it
spends per request is protocol handling, validation, batching and metrics, not compute. It is pinned to CPU 0,
the closed-loop clients to the other CPUs; both transports are driven in turn, several rounds, with the same
single-sample 196x768 float16 request (301 KB in, 301 KB out). CPU time per answered request is steadier than
throughput on a shared machine; compare the two transports of the same run.

    python -m loadtest.bench_grpc_cpu --concurrency 8 --repeat 3 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from loadtest.bench_overhead import DIM, SEQ, NoopEngine, cpu_seconds
from loadtest.peers import launch
from loadtest.peers.loadgen import drive, make_spec, percentile

RESULTS = Path(__file__).resolve().parent / "results"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def serve(port: int, grpc_port: int) -> None:
    """The service as ``python -m service`` runs it (one worker, same uvicorn options), no-op engine, gRPC on."""
    from service.__main__ import serve_one, uvicorn_options
    from service.settings import Settings

    settings = Settings(port=port, grpc_port=grpc_port, host="127.0.0.1", max_delay_ms=0, engine="fake")
    serve_one(settings, uvicorn_options(settings), NoopEngine())


def infer_request_bytes() -> tuple[bytes, int]:
    """A serialized ModelInferRequest of one (196, 768) FP16 sample, and its answer's payload size."""
    from tritonclient.grpc import service_pb2 as pb

    x = np.random.default_rng(0).standard_normal((SEQ, DIM)).astype("<f2")
    msg = pb.ModelInferRequest(model_name="encoder", raw_input_contents=[x.tobytes()])
    msg.inputs.add(name="input", datatype="FP16", shape=x.shape)
    return msg.SerializeToString(), x.nbytes


async def grpc_loop(address: str, inflight: int, window: tuple[float, float]) -> dict[str, Any]:
    """Closed loop over one channel (one HTTP/2 connection), the request pre-serialized: client CPU goes to
    gRPC, not to protobuf."""
    import grpc

    body, payload = infer_request_bytes()
    start, stop = window
    latencies: list[float] = []
    errors: dict[str, int] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(MODEL_INFER)  # no serializers: bytes in, bytes out

        async def one() -> None:
            while time.time() < stop:
                sent = time.time()
                try:
                    answer = await call(body, timeout=60)
                    problem = None if len(answer) > payload else "short answer"
                except grpc.aio.AioRpcError as exc:
                    problem = str(exc.code())
                done = time.time()
                if start <= done <= stop:
                    if problem is None:
                        latencies.append((done - sent) * 1e3)
                    else:
                        errors[problem] = errors.get(problem, 0) + 1

        await asyncio.gather(*(one() for _ in range(inflight)))
    return {"latencies_ms": latencies, "errors": errors}


def _grpc_client(address: str, inflight: int, window: tuple[float, float], out: Any) -> None:
    out.put(asyncio.run(grpc_loop(address, inflight, window)))


def drive_grpc(address: str, concurrency: int, warmup_s: float, duration_s: float) -> dict[str, Any]:
    """As :func:`loadgen.drive` for HTTP: one spawned client process, the window after its start-up."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    start = time.time() + 2.0 + warmup_s
    proc = ctx.Process(target=_grpc_client, args=(address, concurrency, (start, start + duration_s), queue))
    proc.start()
    report = queue.get(timeout=start + duration_s + 120 - time.time())
    proc.join(30)
    lat = report["latencies_ms"]
    return {
        "concurrency": concurrency,
        "duration_s": duration_s,
        "requests_ok": len(lat),
        "errors": sum(report["errors"].values()),
        "error_kinds": report["errors"],
        "samples_per_s": len(lat) / duration_s,
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
    }


def measured(pid: int, run: Any, warmup_s: float, duration_s: float) -> dict[str, Any]:
    """``run()``'s result plus the server's CPU per answered request over the same window."""
    cpu: list[float] = []
    start = time.time() + 2.0 + warmup_s

    def sample() -> None:
        for instant in (start, start + duration_s):
            time.sleep(max(0.0, instant - time.time()))
            cpu.append(cpu_seconds(pid))

    timer = threading.Thread(target=sample, daemon=True)
    timer.start()
    result: dict[str, Any] = run()
    timer.join()
    if len(cpu) == 2 and result["requests_ok"]:
        result["server_cpu_us_per_request"] = (cpu[1] - cpu[0]) / result["requests_ok"] * 1e6
    return result


def cpu_model() -> str:
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def table(rows: list[dict[str, Any]]) -> str:
    head = ("transport", "conc", "run", "req/s", "p50 ms", "p99 ms", "cpu us/req")
    lines = ["{:10} {:>4} {:>3} {:>8} {:>8} {:>8} {:>10}".format(*head)]
    for r in rows:
        cells = (r["transport"], r["concurrency"], r["run"], r["samples_per_s"], r["p50_ms"] or 0, r["p99_ms"] or 0)
        line = "{:10} {:>4} {:>3} {:>8.0f} {:>8.2f} {:>8.2f} {:>10.0f}".format(*cells, r["server_cpu_us_per_request"])
        lines.append(line + (f"  errors {r['error_kinds']}" if r["errors"] else ""))
    for transport in sorted({r["transport"] for r in rows}):
        cpu = [r["server_cpu_us_per_request"] for r in rows if r["transport"] == transport]
        lines.append(f"{transport}: median {np.median(cpu):.0f} us of server CPU per request over {len(cpu)} runs")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8])
    parser.add_argument("--repeat", type=int, default=3, help="rounds; each round drives both transports")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--serve", type=int, nargs=2, metavar=("PORT", "GRPC_PORT"), help="only serve")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    if args.serve:
        serve(*args.serve)
        return 0
    pin: list[str] = []
    if (os.cpu_count() or 1) > 1 and shutil.which("taskset"):
        pin = ["taskset", "-c", "0"]  # the server on CPU 0, the clients (spawned from here) on the others
        os.sched_setaffinity(0, set(range(1, os.cpu_count() or 2)))
    port, grpc_port = launch.free_port(), launch.free_port()
    command = [*pin, launch.python(), "-m", "loadtest.bench_grpc_cpu", "--serve", str(port), str(grpc_port)]
    rows: list[dict[str, Any]] = []
    with launch.running(command, port, log_path=Path(f"/tmp/bench-grpc-cpu-{port}.log"), timeout_s=60) as server:
        assert server.pid is not None
        spec = make_spec("raw", server.url, SEQ, DIM)
        for concurrency in args.concurrency:
            for run in range(args.repeat):
                runs = {
                    "http-raw": lambda c=concurrency: drive(spec, c, 1, args.warmup, args.duration),
                    "grpc": lambda c=concurrency: drive_grpc(f"127.0.0.1:{grpc_port}", c, args.warmup, args.duration),
                }
                for transport, drive_it in runs.items():
                    row = measured(server.pid, drive_it, args.warmup, args.duration)
                    rows.append({"transport": transport, "run": run, **row})
    print(table(rows))
    meta = {"cpu": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(), "time": time.time()}
    print(f"CPU: {meta['cpu']} ({meta['cpus']} cores), {dt.datetime.now(dt.UTC).isoformat(timespec='minutes')}")
    if not args.no_save:
        path = RESULTS / f"grpc-cpu-{dt.date.today().isoformat()}.json"
        path.write_text(json.dumps({"meta": meta, "args": vars(args), "rows": rows}, indent=2))
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
