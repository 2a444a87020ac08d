"""The GIL convoy effect on short ctypes calls: a compute thread's batches while another thread runs Python.

The engine process can run its batches on a compute thread while its asyncio loop reads worker frames. A batch
makes a handful of short CUDA runtime calls through ctypes. ``ctypes.CDLL`` releases the GIL around every call;
when another thread wants the GIL it takes it then, and the compute thread, back from a call of microseconds,
waits for it until that thread gives it up: at the latest after ``sys.getswitchinterval()`` (5 ms). A batch of
N calls can so wait up to N switch intervals. ``ctypes.PyDLL`` keeps the GIL through the call.

No GPU needed: a cheap libc call (``memset`` of a few KiB, about a microsecond, like an enqueueing CUDA call)
stands in for the CUDA calls. Each cell is the compute thread's time per simulated batch (``--calls`` calls and
a little Python between them) and per call, with the other thread's progress (frames parsed per second):

* ``none``: no other thread (the baseline);
* ``busy``: a thread parsing frames in pure Python without pause (the worst case: a loop under load);
* ``io``: a thread that parses frames and reads each from a socket pair (``send``/``recv``: short calls that
  release the GIL, like an event loop under load reading ready sockets);
* ``bursty``: an asyncio loop that parses one frame and sleeps ``--gap-us`` (a loop with frames to read now and
  then).

A row's mean holds the waits: the median batch never waits, the batches that lost the GIL wait up to a switch
interval (the ``> 1 ms`` column). The other thread's progress is the other side of the trade: a compute thread
that keeps the GIL through its calls gives it up only at a forced switch.

    python -m loadtest.bench_gil
    python -m loadtest.bench_gil --calls 10 --seconds 1.0 --intervals 0.005 0.0005 0.0001
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import datetime as dt
import json
import os
import platform
import socket
import statistics
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
_FRAME = struct.pack("<IIQ", 7, 196 * 768 * 2, 12345) * 8


def _parse(frame: bytes) -> int:
    """A worker frame's worth of Python: header fields unpacked, a small dict built per entry."""
    total = 0
    for i in range(0, len(frame), 16):
        kind, nbytes, ident = struct.unpack_from("<IIQ", frame, i)
        total += len({"kind": kind, "nbytes": nbytes, "id": ident})
    return total


class Background:
    """The second thread: ``busy`` parses frames without pause, ``bursty`` parses one per ``gap`` on asyncio."""

    def __init__(self, mode: str, gap: float) -> None:
        self.mode, self.gap, self.frames = mode, gap, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Background:
        if self.mode != "none":
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.mode != "none":
            self._thread.join()

    def _run(self) -> None:
        if self.mode == "busy":
            while not self._stop.is_set():
                _parse(_FRAME)
                self.frames += 1
        elif self.mode == "io":
            a, b = socket.socketpair()
            with a, b:
                while not self._stop.is_set():
                    a.send(_FRAME)
                    _parse(b.recv(len(_FRAME)))
                    self.frames += 1
        else:
            asyncio.run(self._loop())

    async def _loop(self) -> None:
        while not self._stop.is_set():
            _parse(_FRAME)
            self.frames += 1
            await asyncio.sleep(self.gap)


def make_call(kind: str, nbytes: int) -> tuple[Callable[[], Any], Any]:
    lib = ctypes.CDLL(None) if kind == "CDLL" else ctypes.PyDLL(None)
    memset = lib.memset
    memset.restype = ctypes.c_void_p
    memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    buf = ctypes.create_string_buffer(nbytes)
    address = ctypes.addressof(buf)
    return (lambda: memset(address, 0, nbytes)), buf


def measure(kind: str, mode: str, interval: float, args: argparse.Namespace) -> dict[str, Any]:
    call, _buf = make_call(kind, args.call_bytes)
    sys.setswitchinterval(interval)
    times: list[float] = []
    try:
        with Background(mode, args.gap_us * 1e-6) as bg:
            time.sleep(0.05)  # the other thread is running
            start = frames0 = None
            end = time.perf_counter() + args.seconds
            start, frames0 = time.perf_counter(), bg.frames
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    call()
                    _parse(_FRAME[:32])  # the few Python lines between two CUDA calls
                times.append(time.perf_counter() - t0)
            elapsed, frames = time.perf_counter() - start, bg.frames - frames0
    finally:
        sys.setswitchinterval(0.005)
    per_batch = statistics.median(times)
    return {
        "lib": kind,
        "background": mode,
        "switch_interval_ms": interval * 1e3,
        "batches": len(times),
        "batch_median_ms": per_batch * 1e3,
        "batch_mean_ms": statistics.fmean(times) * 1e3,
        "batch_p99_ms": sorted(times)[int(0.99 * (len(times) - 1))] * 1e3,
        "call_us": per_batch / args.calls * 1e6,
        "stalled_pct": 100 * sum(t > 1e-3 for t in times) / len(times),  # waited for the GIL (or the CPU)
        "bg_frames_per_s": frames / elapsed,
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| lib | other thread | switch interval ms | batch median ms | batch mean ms | batch p99 ms "
        "| us per call (median) | batches > 1 ms % | other thread frames/s |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['lib']} | {r['background']} | {r['switch_interval_ms']:g} | {r['batch_median_ms']:.3f} "
            f"| {r['batch_mean_ms']:.3f} | {r['batch_p99_ms']:.3f} | {r['call_us']:.2f} "
            f"| {r['stalled_pct']:.2f} | {r['bg_frames_per_s']:,.0f} |"
        )
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=10, help="ctypes calls per simulated batch")
    parser.add_argument("--call-bytes", type=int, default=4096, help="bytes memset per call (its cost)")
    parser.add_argument("--seconds", type=float, default=1.0, help="per cell")
    parser.add_argument("--gap-us", type=float, default=200.0, help="bursty loop: sleep between frames")
    parser.add_argument("--modes", nargs="+", default=["none", "busy", "io", "bursty"])
    parser.add_argument("--intervals", type=float, nargs="+", default=[0.005, 0.0005])
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell, interleaved; the table shows each")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for interval in args.intervals:
        for mode in args.modes:
            for _ in range(args.repeat):  # CDLL and PyDLL alternate: a neighbour's load hits both alike
                for kind in ("CDLL", "PyDLL"):
                    rows.append(measure(kind, mode, interval, args))
                    print(table(rows[-1:]).splitlines()[-1], flush=True)
    meta = {
        "cpu": cpu_name(),
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "loadavg": os.getloadavg(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m loadtest.bench_gil " + " ".join(sys.argv[1:]),
    }
    text = table(rows)
    print(f"\n{meta['cpu']} ({meta['cores']} cores), Python {meta['python']}, {meta['date']}, load {meta['loadavg']}")
    print(f"{meta['command']}\n{text}")
    out = args.out or RESULTS / f"gil-cpu-{dt.date.today().isoformat()}.json"
    saved = {"meta": meta, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    out.write_text(json.dumps(saved, indent=1))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
