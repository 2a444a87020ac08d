"""The engine's device-only samples/s at given batch sizes, for the CUDA shared-memory target (issue: at client
batch 64, the service through CUDA shared memory at >= 80 % of this).

Device-only as ``loadtest/bench_engine.py`` measures it: the bundle's session with CUDA graphs, each batch a
graph replay on data already on the device (no host copy), timed back to back. Run in its own process before
the service starts (``python -m loadtest.peers.engine_baseline --model-dir bundles/fp16 --batches 1,16,64``),
so the GPU is otherwise idle and this process's memory is gone before the service runs; prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def device_only(model_dir: Path, batches: list[int], seq: int, repeats: int = 5) -> dict[int, float]:
    from converter.bundle import load_bundle
    from converter.providers import SessionOptions
    from converter.session import EncoderSession

    buckets = tuple(sorted(set(batches)))
    options = SessionOptions(provider="cuda", batch_buckets=buckets, seq_lens=(seq,), cuda_graphs=True)
    session = EncoderSession(load_bundle(model_dir), options)
    if session.provider != "CUDAExecutionProvider":
        raise RuntimeError(f"the engine runs on {session.provider}, not the CUDA EP")
    session.warmup()
    rates = {}
    for batch in buckets:
        iters = max(10, 400 // batch)
        for _ in range(3):
            session.replay(batch, seq)
        per_call = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(iters):
                session.replay(batch, seq)
            per_call.append((time.perf_counter() - start) / iters)
        rates[batch] = batch / statistics.median(per_call)
    return rates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--seq", type=int, default=196)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    rates = device_only(args.model_dir, batches, args.seq)
    print(json.dumps({"samples_per_s": {str(b): r for b, r in rates.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
