"""The real tritonclient.http against a real ``python -m service`` with a real (small) model, on the CPU.

The calls are those of :mod:`loadtest.oip_conformance`, which also runs against a Triton server for comparison.
Every answer must equal ``/encode``'s for the same input and PyTorch's (fp32, unbatched) within the bundle's
tolerance; every bad request must get a 4xx.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from loadtest import oip_conformance
from tests.service.conftest import SMALL_DIMS
from tests.service.server_support import encode_raw, running

pytestmark = pytest.mark.slow
DIM = SMALL_DIMS[0]


def test_tritonclient_http_drives_the_service(
    small_bundle: Path, reference: Callable[[np.ndarray], np.ndarray], tmp_path: Path
) -> None:
    args = ["-m", "service", "--model-dir", str(small_bundle), "--host", "127.0.0.1", "--provider", "cpu"]
    with running([*args, "--seq-lens", "16", "--max-delay-ms", "0"], tmp_path / "server.log") as url:
        answers = oip_conformance.run(url.removeprefix("http://"))
        by_encode = {case: encode_raw(url, x) for case, x in answers.inputs.items()}
        assert oip_conformance.main(["--url", url.removeprefix("http://"), "--out", str(tmp_path / "run.npz")]) == 0
    assert answers.live and answers.ready and answers.model_ready
    assert answers.server["name"] == "encoder-service"
    assert answers.server["extensions"] == ["binary_tensor_data", "statistics"]
    assert answers.model == {
        "name": "encoder",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, -1, DIM]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, -1, DIM]}],
    }
    assert answers.config["max_batch_size"] == 32 and answers.config["input"][0]["dims"] == [-1, DIM]
    assert not answers.failed
    assert len(answers.outputs) == 8  # FP16/FP32 x client batch 1/4 x JSON/binary
    for case, x in answers.inputs.items():
        out = answers.outputs[case]
        assert out.dtype == x.dtype and out.shape == x.shape, case
        np.testing.assert_array_equal(out, by_encode[case], err_msg=case)
        tolerance = 1e-2 if x.dtype == np.float16 else 1e-4
        expected = reference(x.astype(np.float32))
        np.testing.assert_allclose(out.astype(np.float32), expected, rtol=tolerance, atol=tolerance, err_msg=case)
    assert answers.refused == {
        "unknown model": 404,
        "unknown input": 422,
        "unknown output": 422,
        "INT32 input": 422,
        "wrong width": 422,
        "rank 1": 422,
        "shape does not match the data": 400,
    }
    (stats,) = answers.stats["model_stats"]
    inference = stats["inference_stats"]
    assert inference["success"]["count"] == 8 and stats["inference_count"] == 2 * 2 * (1 + 4)
    assert inference["fail"]["count"] == 6  # the bad requests that named the served model
    saved = np.load(tmp_path / "run.npz")
    assert {f"output/{case}" for case in answers.outputs} <= set(saved.files)
    assert all(line.endswith("| 0") for line in oip_conformance.compare(answers, tmp_path / "run.npz"))
