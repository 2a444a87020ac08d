"""The OIP conformance script against the service and a real Triton on the same bundle: the same answers.

Slow (three servers start) and skipped where tritonserver cannot run (``pip install --no-deps nvidia-pytriton``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from loadtest import oip_conformance
from loadtest.peers.triton.conformance import compare, conformance
from loadtest.peers.triton.server import unavailable

BINARY = {f"{dt} bs={b} binary" for dt in ("FP32", "FP16") for b in (1, 4)}


def answers(outputs: dict[str, np.ndarray], refused: dict[str, int | None]) -> oip_conformance.Answers:
    return oip_conformance.Answers(True, True, True, {}, {}, outputs=outputs, refused=refused)


def test_compare_flags_different_answers_missing_cases_and_non_4xx_refusals() -> None:
    x = np.linspace(-2, 2, 12, dtype=np.float32).reshape(1, 3, 4)
    ours = answers({"FP32 bs=1 binary": x, "FP32 bs=4 binary": x}, {"bad": 422, "worse": 422})
    peer = answers({"FP32 bs=1 binary": x + np.float32(1e-3)}, {"bad": 400, "worse": 500})
    report = compare(ours, [peer])
    want = x + np.float32(1e-3)
    expected = float((np.abs(x - want) / (1 + np.abs(want))).max())
    assert report.differences["FP32 bs=1 binary"] == pytest.approx(expected) and expected > 1e-4
    assert any("differ" in p for p in report.problems)
    assert any("FP32 bs=4 binary: no Triton run answered it" in p for p in report.problems)
    assert any("'worse': Triton answered 500" in p for p in report.problems)
    assert report.statuses == {"bad": (422, 400), "worse": (422, 500)}
    close = compare(answers({"FP32 bs=1 binary": x}, {"bad": 422}), [answers({"FP32 bs=1 binary": x}, {"bad": 400})])
    assert close.problems == [] and close.differences == {"FP32 bs=1 binary": 0.0}


@pytest.mark.slow
@pytest.mark.skipif(bool(unavailable()), reason=str(unavailable()))
def test_service_and_triton_give_the_same_answers(small_bundle: Path, tmp_path: Path) -> None:
    report = conformance(small_bundle, "cpu", tmp_path)
    assert report.problems == [], "\n".join(report.lines())
    assert BINARY | {"FP32 bs=1 json", "FP32 bs=4 json"} == set(report.differences)
    assert set(report.not_compared) == {"FP16 bs=1 json", "FP16 bs=4 json"}  # Triton: FP16 only as binary data
    assert all(400 <= a < 500 and 400 <= b < 500 for a, b in report.statuses.values())  # type: ignore[operator]
    assert len(report.statuses) == 7
