"""Numerical verification of an optimized bundle against the PyTorch fp32 model."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from converter.bundle import Bundle
from converter.errors import VerificationError
from converter.providers import SessionOptions
from converter.session import EncoderSession

DEFAULT_SHAPES: tuple[tuple[int, int], ...] = ((1, 196), (5, 196), (2, 37))
TOLERANCE = {"fp32": 1e-4, "fp16": 3e-3}


@dataclass(frozen=True)
class VerifyCase:
    batch: int
    seq: int
    rel_l2: float
    max_abs: float

    def as_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "seq": self.seq, "rel_l2": self.rel_l2, "max_abs": self.max_abs}


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    actual64, expected64 = actual.astype(np.float64), expected.astype(np.float64)
    return float(np.linalg.norm(actual64 - expected64)) / max(float(np.linalg.norm(expected64)), 1e-30)


def reference_output(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """PyTorch fp32 on the CPU: the ground truth every backend is held to."""
    with torch.no_grad():
        return model(torch.from_numpy(x.astype(np.float32))).numpy()


def verify_bundle(
    model: nn.Module,
    bundle: Bundle,
    provider: str = "auto",
    shapes: tuple[tuple[int, int], ...] = DEFAULT_SHAPES,
    seed: int | None = None,
) -> dict[str, Any]:
    """Run ``bundle`` and ``model`` on fresh random inputs; raise VerificationError past tolerance."""
    seed = secrets.randbits(32) if seed is None else seed
    rng = np.random.default_rng(seed)
    session = EncoderSession(bundle, SessionOptions(provider=provider, cuda_graphs=False))
    tolerance = TOLERANCE[bundle.precision]
    cases = []
    for batch, seq in shapes:
        # Round the input to the served dtype first: input quantisation is not the model's error.
        x = rng.standard_normal((batch, seq, bundle.dim)).astype(session.dtype)
        actual = session.run(x)
        expected = reference_output(model, x)
        if actual.shape != expected.shape:
            raise VerificationError(f"shape {actual.shape} from onnxruntime, {expected.shape} from PyTorch")
        diff = np.abs(actual.astype(np.float32) - expected)
        cases.append(VerifyCase(batch, seq, rel_l2(actual, expected), float(np.nan_to_num(diff, nan=np.inf).max())))
    worst = max(case.rel_l2 for case in cases)
    result = {
        "provider": session.provider,
        "seed": seed,
        "tolerance_rel_l2": tolerance,
        "worst_rel_l2": worst,
        "cases": [case.as_dict() for case in cases],
        "passed": bool(worst <= tolerance),
    }
    if not result["passed"]:
        raise VerificationError(
            f"verification failed on {session.provider}: relative L2 error {worst:.3g} > {tolerance:g} ({result})"
        )
    return result
