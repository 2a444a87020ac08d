"""The benchmark's profiler: py-spy over a real process tree, and the summary per process and function."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from loadtest.peers import profile

ENGINE = (
    'process 10:"python -m service.engine.host --socket x";<module> (host.py:1);_run_next (service/engine/host.py:270)'
)
WORKER = (
    'process 9:"python -m service";process 11:"python -c from multiprocessing.spawn import spawn_main; spawn_main(1)"'
)
WORKER += ";<module> (x.py:1)"
COLLAPSED = textwrap.dedent(
    f"""\
    {ENGINE};run_into (converter/session.py:200) 30
    {ENGINE} 10
    {WORKER};infer (service/oip/rest.py:40) 60
    garbage line
    """
)


def test_summary_splits_processes_by_role_and_names_functions_without_lines() -> None:
    summary = profile.summarize(COLLAPSED, seconds=1.0)
    assert summary["samples"] == 100
    worker, engine = summary["processes"]
    assert (worker["role"], worker["share"]) == ("worker", 0.6)
    assert (engine["role"], engine["share"]) == ("engine process", 0.4)
    assert engine["self"][0] == ["run_into (session.py)", 0.75]
    assert ["_run_next (host.py)", 1.0] in engine["inclusive"]
    assert engine["busy_cores"] == round(40 / profile.RATE_HZ, 2)
    roles = profile.by_role(summary)
    assert roles == {"worker": round(60 / profile.RATE_HZ, 2), "engine process": engine["busy_cores"]}


def test_without_py_spy_the_point_says_why(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(profile, "py_spy", lambda: None)
    started = profile.start(os.getpid(), 1, tmp_path / "p.txt")
    assert profile.finish(started) == {"error": "py-spy is not installed here"}


@pytest.mark.skipif(profile.py_spy() is None, reason="py-spy is not installed")
def test_profiles_a_real_child_process(tmp_path: Path) -> None:
    script = "import time\ndef spin_here():\n    t = time.time()\n    while time.time() - t < 6: pass\nspin_here()\n"
    path = tmp_path / "spin.py"  # a file, not -c: py-spy writes the command line into every stack
    path.write_text(script)
    child = subprocess.Popen([sys.executable, str(path)])
    try:
        summary = profile.finish(profile.start(child.pid, 2, tmp_path / "p.txt"))
    finally:
        child.kill()
        child.wait()
    if "error" in summary and "ermission" in summary["error"]:
        pytest.skip(f"no ptrace rights here: {summary['error']}")
    (process,) = summary["processes"]
    assert process["self"][0][0] == "spin_here (spin.py)"
    assert process["busy_cores"] > 0.5  # one spinning thread is about one core
    assert Path(summary["stacks"]).read_text().count("spin_here") >= 1


def test_profiled_from_the_benchmark_its_spawned_processes_are_clients_and_the_services_are_workers() -> None:
    bench = 'process 5:"python loadtest/bench_service.py --profile-clients"'
    spawned = 'process {}:"python -c from multiprocessing.spawn import spawn_main; spawn_main(1)"'
    client = f"{bench};{spawned.format(6)};one (loadtest/peers/oip_loops.py:160) 30"
    worker = f'{bench};process 9:"python -m service";{spawned.format(11)};infer (service/oip/rest.py:40) 50'
    engine = f'{bench};process 9:"python -m service";{ENGINE};run_into (converter/session.py:200) 20'
    summary = profile.summarize("\n".join([client, worker, engine]), seconds=1.0)
    roles = {p["process"]: p["role"] for p in summary["processes"]}
    assert roles == {"pid 6": "client", "pid 11": "worker", "pid 10": "engine process"}
