"""The device-side finiteness check, run on the CPU provider: exact per-sample flags, never a false pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from converter.bundle import load_bundle
from converter.finite import FLAGS_OUTPUT, FiniteCheck, finite_rows, with_finite_output
from converter.providers import CPU
from service.dataplane import all_finite


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_flags_exactly_the_samples_with_an_inf_or_a_nan(dtype: type) -> None:
    rng = np.random.default_rng(0)
    batch = (rng.standard_normal((6, 37, 48)) * 100).astype(dtype)
    batch[1, 5, 7] = np.inf
    batch[3, 36, 47] = -np.inf
    batch[4, 0, 0] = np.nan
    batch[5] = np.finfo(dtype).max  # the largest finite values: x - x is still 0
    flags = FiniteCheck(np.dtype(dtype)).host(batch)
    assert flags.tolist() == [True, False, True, False, False, True]
    assert flags.tolist() == [all_finite(sample) for sample in batch]  # the host check's answer, sample by sample


def test_agrees_with_the_host_check_on_random_bit_patterns() -> None:
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 1 << 16, size=(64, 4, 16), dtype=np.uint16)  # every fp16 pattern, Inf/NaN included
    batch = bits.view(np.float16)
    check = FiniteCheck(np.dtype(np.float16))
    assert check.host(batch).tolist() == [all_finite(sample) for sample in batch]
    assert not check.host(batch).all() and check.host(batch).any()  # the draw has both kinds


def test_refuses_what_it_cannot_check() -> None:
    check = FiniteCheck(np.dtype(np.float16))
    with pytest.raises(ValueError, match="C-contiguous"):
        check.host(np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        check.host(np.zeros((2, 3, 8), np.float16)[:, :, ::2])
    with pytest.raises(RuntimeError, match="CUDA"):
        check.device(0, (1, 1, 1))


def test_the_added_output_leaves_the_models_answers_bit_for_bit_and_flags_each_sample(small_bundle: Path) -> None:
    """The engine's own batches: the flags as a second output of the served model (what its CUDA session builds)."""
    bundle = load_bundle(small_bundle)
    plain = ort.InferenceSession(str(bundle.model_path), providers=[CPU])
    model = with_finite_output(onnx.load(str(bundle.model_path)), bundle.input_name, np.dtype(bundle.dtype))
    flagged = ort.InferenceSession(model.SerializeToString(), providers=[CPU])
    assert [o.name for o in flagged.get_outputs()] == [bundle.output_name, FLAGS_OUTPUT]
    x = np.random.default_rng(2).standard_normal((5, 16, bundle.dim)).astype(np.float32)
    x[1, 3, 4], x[3, 15, bundle.dim - 1] = np.nan, -np.inf
    (want,) = plain.run([bundle.output_name], {bundle.input_name: x})
    got, flags = flagged.run(None, {bundle.input_name: x})
    assert got.tobytes() == want.tobytes()
    assert flags.shape == (5,) and (flags == 0).tolist() == finite_rows(x).tolist() == [True, False, True, False, True]
    (alone,) = flagged.run([bundle.output_name], {bundle.input_name: x})  # the answers alone, flags not asked for
    assert alone.tobytes() == want.tobytes()


def test_the_output_is_added_once_and_only_for_the_models_input(small_bundle: Path) -> None:
    bundle = load_bundle(small_bundle)
    model = with_finite_output(onnx.load(str(bundle.model_path)), bundle.input_name, np.dtype(np.float32))
    with pytest.raises(ValueError, match="cannot add"):
        with_finite_output(model, bundle.input_name, np.dtype(np.float32))
    with pytest.raises(ValueError, match="cannot add"):
        with_finite_output(onnx.load(str(bundle.model_path)), "not-an-input", np.dtype(np.float32))
