"""GPU smoke test of EncoderSession's pinned/pipelined host path against onnxruntime's own copies.

python loadtest/experiments/smoke_pinned.py BUNDLE_DIR
"""

from __future__ import annotations

import sys

import numpy as np

from converter.bundle import load_bundle
from converter.providers import SessionOptions
from converter.session import EncoderSession


def main(path: str) -> int:
    buckets = (1, 8, 32, 128)
    fast = EncoderSession(load_bundle(path), SessionOptions(provider="cuda", batch_buckets=buckets))
    plain = EncoderSession(
        load_bundle(path), SessionOptions(provider="cuda", batch_buckets=buckets, host_path="pageable")
    )
    fast.warmup()
    plain.warmup()
    print(fast.describe())
    worst = 0.0
    for batch in (*buckets, 5):
        x = np.random.default_rng(batch).standard_normal((batch, 196, fast.dim)).astype(np.float16)
        a, b = fast.run(x), plain.run(x)
        kept = fast.run(x)
        again = fast.run(x * 0)  # must not overwrite the arrays handed out before
        buf = fast.input_buffer(batch, 196)
        buf[...] = x
        c = fast.run(buf)  # pinned input: sent without staging
        stable = np.array_equal(a, c)
        err = float(np.linalg.norm((a - b).astype(np.float64)) / np.linalg.norm(b.astype(np.float64)))
        stable = stable and np.array_equal(a, kept) and not np.array_equal(kept, again)
        print(f"bs={batch}: rel L2 pinned vs pageable {err:.2e}, owned arrays stable: {stable}")
        worst = max(worst, err if stable else 1.0)
    print("SMOKE", "OK" if worst < 1e-3 else "FAILED")
    return 0 if worst < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
