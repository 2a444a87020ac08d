from __future__ import annotations

import numpy as np
import pytest

from service.dataplane import all_finite


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite_finds_every_non_finite(dtype: type, bad: float) -> None:
    x = np.random.default_rng(0).standard_normal((3, 5, 8)).astype(dtype)
    assert all_finite(x)
    x[2, 4, 7] = bad
    assert not all_finite(x)


def test_all_finite_keeps_the_largest_half() -> None:
    assert all_finite(np.array([[[65504.0, -65504.0, 6e-8]]], dtype=np.float16))
