"""The device-side finiteness check, run on the CPU provider: exact per-sample flags, never a false pass."""

from __future__ import annotations

import numpy as np
import pytest

from converter.finite import FiniteCheck
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
