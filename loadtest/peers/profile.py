"""Where a server's CPU goes during one benchmark point: py-spy over the server and all its subprocesses.

``--profile`` (the top concurrency of the raw load) and ``--profile-point PROTOCOL:BATCH`` (the top concurrency of
one OIP load, e.g. ``shm-http:16``; with ``--profile-clients`` the load's client processes too) record with
``py-spy record --subprocesses --format raw`` (collapsed stacks, idle threads left out, so a sample is a thread
running or runnable) and write next to the result file:

- ``<stem>-profile-<point>.txt``: the collapsed stacks, for flame-graph tools;
- a summary in the point's JSON (``profile``): per process (the engine process, each worker), its share of the
  samples, its busy cores (samples / rate / seconds) and the functions that hold most samples, by self time
  and by inclusive time.

py-spy needs ptrace rights over the server (root, or ``CAP_SYS_PTRACE`` in a container); without them, or
without py-spy, the point is measured unprofiled and the JSON says why.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RATE_HZ = 97  # samples per second and thread: below py-spy's default 100, off the beat of 10 ms timers
TOP = 15
_PROCESS = re.compile(r'^process (\d+):"(.*)"$')
_PROCESS_ANYWHERE = re.compile(r'process \d+:"[^"]*"')


@dataclass
class Profiler:
    process: subprocess.Popen[bytes]
    out: Path
    seconds: float

    def finish(self, timeout_s: float = 120.0) -> dict[str, Any]:
        """Wait for py-spy, then the summary (or why there is none)."""
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return {"error": f"py-spy did not finish within {timeout_s:.0f} s"}
        if code != 0 or not self.out.exists():
            tail = (self.process.stdout.read() if self.process.stdout else b"").decode(errors="replace")[-400:]
            return {"error": f"py-spy exited {code}: {tail.strip()}"}
        return {"stacks": str(self.out)} | summarize(self.out.read_text(), self.seconds)


def py_spy() -> str | None:
    """py-spy on PATH, or installed beside this interpreter (a virtual environment not activated)."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.is_file() else None)


def start(pid: int, seconds: float, out: Path) -> Profiler | dict[str, Any]:
    """Start py-spy on ``pid`` and its subprocesses for ``seconds``; a dict saying why not, if it cannot."""
    binary = py_spy()
    if binary is None:
        return {"error": "py-spy is not installed here"}
    command = [binary, "record", "--pid", str(pid), "--subprocesses", "--duration", str(max(1, round(seconds)))]
    command += ["--rate", str(RATE_HZ), "--format", "raw", "--output", str(out), "--nonblocking"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return Profiler(process, out, seconds)


def finish(started: Profiler | dict[str, Any]) -> dict[str, Any]:
    """What :func:`start` gave: the summary once py-spy is done, or the reason there is none."""
    return started.finish() if isinstance(started, Profiler) else started


def _frame_name(frame: str) -> str:
    """``fn (path/to/module.py:123)`` -> ``fn (module.py)``: one name per function, whatever the line."""
    match = re.match(r"^(.*) \((.*?)(?::\d+)?\)$", frame)
    if not match:
        return frame
    return f"{match.group(1)} ({Path(match.group(2)).name})"


def _role(chain: list[str]) -> str:
    """A process's role from its command line and its parents' (``chain``: the profiled root's first). Profiled
    from the benchmark itself (``--profile-clients``), its own spawned processes are the load's clients."""
    cmdline = chain[-1]
    if "service.engine.host" in cmdline:
        return "engine process"
    if "bench_service" in cmdline:
        return "benchmark"
    if "multiprocessing" in cmdline or "spawn_main" in cmdline:
        return "client" if len(chain) > 1 and "bench_service" in chain[-2] else "worker"
    return "main"


def summarize(collapsed: str, seconds: float) -> dict[str, Any]:
    """Per process: samples, busy cores, and the top functions by self and inclusive samples."""
    samples: Counter[str] = Counter()
    self_time: dict[str, Counter[str]] = {}
    inclusive: dict[str, Counter[str]] = {}
    roles: dict[str, str] = {}
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # A command line may hold ";" (spawn's "-c ...; spawn_main(...)"): not a frame separator there.
        stack = _PROCESS_ANYWHERE.sub(lambda m: m.group(0).replace(";", ","), stack)
        frames = stack.split(";")
        # With --subprocesses a child's stacks sit under its parent's process frame: the last one is the process.
        marks = [i for i, frame in enumerate(frames) if _PROCESS.match(frame)]
        match = _PROCESS.match(frames[marks[-1]]) if marks else None
        key = f"pid {match.group(1)}" if match else "?"
        chain = [m.group(2) for m in (_PROCESS.match(frames[i]) for i in marks) if m]
        roles.setdefault(key, _role(chain) if match else "?")
        rest = frames[marks[-1] + 1 :] if marks else frames
        body = [_frame_name(f) for f in rest if not f.startswith("thread ")]
        samples[key] += count
        if body:
            self_time.setdefault(key, Counter())[body[-1]] += count
            for name in set(body):
                inclusive.setdefault(key, Counter())[name] += count
    total = sum(samples.values()) or 1
    processes = []
    for key, n in samples.most_common():
        processes.append(
            {
                "process": key,
                "role": roles[key],
                "share": round(n / total, 4),
                "busy_cores": round(n / RATE_HZ / max(seconds, 1e-9), 2),
                "self": [[name, round(c / n, 4)] for name, c in self_time.get(key, Counter()).most_common(TOP)],
                "inclusive": [[name, round(c / n, 4)] for name, c in inclusive.get(key, Counter()).most_common(TOP)],
            }
        )
    return {"rate_hz": RATE_HZ, "seconds": seconds, "samples": sum(samples.values()), "processes": processes}


def by_role(summary: dict[str, Any]) -> dict[str, float]:
    """Busy cores per role (engine process, workers, main): the one line a results table shows."""
    cores: Counter[str] = Counter()
    for process in summary.get("processes", []):
        cores[process["role"]] += process["busy_cores"]
    return {role: round(value, 2) for role, value in cores.items()}
