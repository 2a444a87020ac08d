from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from loadtest import bench_gil


def test_every_cell_runs_and_the_table_is_saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "gil.json"
    argv = ["bench_gil", "--seconds", "0.05", "--repeat", "1", "--intervals", "0.005", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    bench_gil.main()
    saved = json.loads(out.read_text())
    cells = {(r["lib"], r["background"]) for r in saved["rows"]}
    assert cells == {(lib, mode) for lib in ("CDLL", "PyDLL") for mode in ("none", "busy", "io", "bursty")}
    assert all(r["batches"] > 0 and r["call_us"] > 0 for r in saved["rows"])
    assert all(r["bg_frames_per_s"] > 0 for r in saved["rows"] if r["background"] != "none")
    assert saved["meta"]["command"].startswith("python -m loadtest.bench_gil") and saved["meta"]["cpu"]
    assert sys.getswitchinterval() == 0.005  # put back
