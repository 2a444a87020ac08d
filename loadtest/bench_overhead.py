"""The service's own overhead: its /encode with a no-op engine against the bare FastAPI echo (the I/O ceiling).

Both run as one uvicorn worker on this machine and are driven by the same closed-loop load (single-sample raw
196x768 float16 requests). The engine returns its input, so whatever the service spends beyond the echo is
HTTP handling, validation, batching and metrics, not compute. Compare ratios, not absolutes, across machines.

    python -m loadtest.bench_overhead --concurrency 8 --repeat 2
    python -m loadtest.bench_overhead --serve-noop 8123   # the service alone, e.g. for py-spy
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from loadtest.peers import launch
from loadtest.peers.loadgen import drive, make_spec
from service.engine.fake import FakeEngine

log = logging.getLogger("bench_overhead")
RESULTS = Path(__file__).resolve().parent / "results"
SEQ, DIM = 196, 768


class NoopEngine(FakeEngine):
    """The FakeEngine's shape checks and buckets, but ``run`` returns its input: zero compute."""

    def __init__(self) -> None:
        super().__init__(dim=DIM, max_seq_len=512, max_batch_size=32, dtype="float16", poison=False, record=False)
        self.name = "noop"

    def run(self, x: np.ndarray) -> np.ndarray:
        return x

    def run_into(self, parts: Sequence[np.ndarray], outs: Sequence[np.ndarray]) -> int:
        """As the ONNX engine in the engine process: answers go straight to ``outs`` (here: the inputs
        themselves, so nothing moves), no gather into one batch array and no scatter back."""
        for part, out in zip(parts, outs, strict=True):
            if out is not part:
                np.copyto(out, part)
        return sum(int(part.shape[0]) for part in parts)


def serve_noop(port: int, log_level: str, engine_process: bool = False) -> None:
    """The service as ``python -m service`` serves it (same uvicorn options), with the no-op engine; with
    ``engine_process`` the engine lives in a child process and the worker reaches it as ``--workers N`` does."""
    from service.__main__ import serve_one, uvicorn_options
    from service.settings import Settings

    settings = Settings(port=port, host="127.0.0.1", max_delay_ms=0, engine="fake", log_level=log_level)  # type: ignore[arg-type]
    settings = settings.model_copy(update={"grpc_port": 0})  # HTTP only: what this benchmark compares
    if not engine_process:
        serve_one(settings, uvicorn_options(settings), NoopEngine())
        return
    from service.engine.board import EngineBoard, Slot

    directory = tempfile.mkdtemp(prefix="bench-engine-", dir="/tmp")
    board = EngineBoard.create(directory, ["cpu"])  # what the supervisor tells the workers: one engine process
    path = board.sockets[0]
    host = multiprocessing.get_context("spawn").Process(target=host_noop, args=(path,), daemon=True)
    host.start()
    while not os.path.exists(path):
        if not host.is_alive():
            raise RuntimeError("the no-op engine process died before it listened")
        time.sleep(0.05)
    board.write(0, Slot(True, 1, 0))
    settings = settings.model_copy(update={"engine_dir": directory})
    serve_one(settings, uvicorn_options(settings))


def host_noop(path: str) -> None:
    """The engine process with the no-op engine (what ``python -m service.engine.host`` runs, minus the model)."""
    from service.engine.host import EngineHost

    asyncio.run(EngineHost(NoopEngine(), 32).serve(path))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children (the engine process), all threads."""
    process = psutil.Process(pid)
    total = 0.0
    for proc in (process, *process.children(recursive=True)):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def measure(name: str, command: list[str], port: int, concurrency: int, duration_s: float) -> dict[str, Any]:
    """One closed-loop run, plus the server's CPU time per answered request over the same window: throughput
    on a shared 2-core box swings by 5-10% between runs, CPU per request much less, so small changes show."""
    log_path = Path(f"/tmp/bench-overhead-{name}-{port}.log")
    with launch.running(command, port, log_path=log_path, timeout_s=60) as server:
        spec = make_spec("raw", server.url, SEQ, DIM)
        pid = server.pid
        assert pid is not None
        cpu: list[float] = []
        # drive() starts its window 2 s + warm-up after it is called; sample the server's CPU at both ends.
        start = time.time() + 2.0 + 1.0
        timer = threading.Thread(target=_sample_cpu, args=(pid, (start, start + duration_s), cpu), daemon=True)
        timer.start()
        result = drive(spec, concurrency, clients=1, warmup_s=1, duration_s=duration_s)
        timer.join()
    if len(cpu) == 2 and result["requests_ok"]:
        result["server_cpu_us_per_request"] = (cpu[1] - cpu[0]) / result["requests_ok"] * 1e6
    return {"server": name, **result}


def _sample_cpu(pid: int, window: tuple[float, float], out: list[float]) -> None:
    for instant in window:
        time.sleep(max(0.0, instant - time.time()))
        out.append(cpu_seconds(pid))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8])
    parser.add_argument("--repeat", type=int, default=2, help="runs of each server at each concurrency")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--log-level", default="info", help="the service's log level (its default: info)")
    parser.add_argument("--serve-noop", type=int, metavar="PORT", help="only serve the no-op service on PORT")
    parser.add_argument(
        "--engine-process",
        action="store_true",
        help="with --serve-noop: the no-op engine in its own process; else: also measure that layout",
    )
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True, help="server on CPU 0")
    parser.add_argument("--tag", default="", help="suffix for the results file")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    if args.serve_noop is not None:
        serve_noop(args.serve_noop, args.log_level, args.engine_process)
        return 0
    py = launch.python()
    pin: list[str] = []
    if args.pin and os.cpu_count() and shutil.which("taskset"):
        # Server on CPU 0, load generator on the others: with both free to migrate, the same server's
        # throughput varied up to 2x between runs on the 2-core box.
        pin = ["taskset", "-c", "0"]
        os.sched_setaffinity(0, set(range(1, os.cpu_count() or 2)))
    rows: list[dict[str, Any]] = []
    for concurrency in args.concurrency:
        for run in range(args.repeat):
            for name in ("echo", "service", *(("service-ep",) if args.engine_process else ())):
                port = launch.free_port()
                if name == "echo":
                    command = [*pin, py, "-m", "loadtest.peers.echo_server", "--port", str(port), "--workers", "1"]
                else:
                    command = [*pin, py, "-m", "loadtest.bench_overhead", "--serve-noop", str(port)]
                    command += ["--log-level", args.log_level]
                    if name == "service-ep":
                        command.append("--engine-process")
                row = measure(name, command, port, concurrency, args.duration)
                rows.append({**row, "run": run})
    print(table(rows))
    if not args.no_save:
        path = RESULTS / f"overhead-cpu-{dt.date.today().isoformat()}{('-' + args.tag) if args.tag else ''}.json"
        meta: dict[str, Any] = {"machine": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()}
        meta["time"] = time.time()
        path.write_text(json.dumps({"meta": meta, "args": vars(args), "rows": rows}, indent=2))
        print(f"saved {path}")
    return 0


def table(rows: list[dict[str, Any]]) -> str:
    """samples/s, p50, p99 per run; the service's ratio is against the echo of the same run and concurrency."""
    echo = {(r["concurrency"], r["run"]): r for r in rows if r["server"] == "echo"}
    head = ("server", "conc", "run", "samples/s", "p50 ms", "p99 ms", "x echo", "p50 x", "cpu us/req")
    lines = ["{:8} {:>4} {:>3} {:>10} {:>8} {:>8} {:>7} {:>6} {:>10}".format(*head)]
    for r in rows:
        ref = echo.get((r["concurrency"], r["run"]))
        ratio = r["samples_per_s"] / ref["samples_per_s"] if ref and ref["samples_per_s"] else float("nan")
        p50x = r["p50_ms"] / ref["p50_ms"] if ref and ref["p50_ms"] and r["p50_ms"] else float("nan")
        cells: tuple[Any, ...] = (r["server"], r["concurrency"], r["run"], r["samples_per_s"], r["p50_ms"] or 0)
        cells += (r["p99_ms"] or 0, ratio, p50x, r.get("server_cpu_us_per_request", 0))
        line = "{:8} {:>4} {:>3} {:>10.0f} {:>8.2f} {:>8.2f} {:>7.2f} {:>6.2f} {:>10.0f}".format(*cells)
        lines.append(line + (f"  errors {r['errors']}" if r["errors"] else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
