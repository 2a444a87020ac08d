"""Engine benchmark: PyTorch eager vs torch.compile vs our onnxruntime session, one card, one run.

Prints a table in the spirit of FX2AIT's transformer example (latency, QPS, speedup) and saves JSON under
``loadtest/results/``. Needs a CUDA GPU. Example:

    python loadtest/bench_engine.py --bundle bundles/fp16=bert --bundle bundles/fp16-os=onnxscript
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from converter.bundle import load_bundle
from converter.model import EncoderDims, default_model
from converter.providers import SessionOptions
from converter.session import EncoderSession, onnxruntime_version

BATCHES = (1, 8, 32, 64, 128, 256, 512)
FLOP_PER_SAMPLE = 2.9e9  # 196x768 block: projections, attention and FFN multiply-adds x2


def time_ms(fn: Callable[[], object], sync: Callable[[], None], iters: int, repeats: int = 5) -> float:
    """Median over ``repeats`` of the mean latency of ``iters`` back-to-back calls."""
    for _ in range(3):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e3 / iters)
    return statistics.median(samples)


def iters_for(batch: int) -> int:
    return max(10, 400 // batch)


def bench_torch(model: torch.nn.Module, batch: int, seq: int, dim: int) -> float:
    x = torch.randn(batch, seq, dim, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        return time_ms(lambda: model(x), torch.cuda.synchronize, iters_for(batch))


def bench_session(session: EncoderSession, batch: int, seq: int, dim: int) -> tuple[float, float]:
    """(device ms: graph replay on device buffers, end-to-end ms: host array in -> host array out)."""
    x = np.random.default_rng(batch).standard_normal((batch, seq, dim)).astype(np.float16)
    session.run(x)
    device = time_ms(lambda: session.replay(batch, seq), lambda: None, iters_for(batch))
    e2e = time_ms(lambda: session.run(x), lambda: None, max(5, iters_for(batch) // 2))
    return device, e2e


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bundle", action="append", required=True, help="DIR=label (first one is 'ours')")
    parser.add_argument("--seq", type=int, default=196)
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/engine.json"))
    args = parser.parse_args()
    batches = tuple(int(b) for b in args.batches.split(","))
    seq = args.seq
    bundles = [item.split("=", 1) if "=" in item else (item, Path(item).name) for item in args.bundle]
    first = load_bundle(bundles[0][0])
    dims = EncoderDims(**first.manifest["dims"])
    eager = default_model(dims).cuda().half().eval()
    rows: dict[int, dict[str, float]] = {b: {} for b in batches}
    for b in batches:
        rows[b]["eager_ms"] = bench_torch(eager, b, seq, dims.dim)
        print(f"eager bs={b}: {rows[b]['eager_ms']:.3f} ms", flush=True)
    if not args.no_compile:
        compiled = torch.compile(eager, dynamic=False)
        for b in batches:
            rows[b]["compile_ms"] = bench_torch(compiled, b, seq, dims.dim)
            print(f"compile bs={b}: {rows[b]['compile_ms']:.3f} ms", flush=True)
    sessions = {}
    for path, label in bundles:
        options = SessionOptions(provider="cuda", batch_buckets=batches, seq_lens=(seq,), cuda_graphs=True)
        session = EncoderSession(load_bundle(path), options)
        if session.provider != "CUDAExecutionProvider":
            raise SystemExit(f"{label}: runs on {session.provider}, not the CUDA EP")
        session.warmup()
        sessions[label] = session
        for b in batches:
            device, e2e = bench_session(session, b, seq, dims.dim)
            rows[b][f"{label}_ms"], rows[b][f"{label}_e2e_ms"] = device, e2e
            print(f"{label} bs={b}: device {device:.3f} ms, host-to-host {e2e:.3f} ms", flush=True)
        del session
    ours = bundles[0][1]
    card = torch.cuda.get_device_name()
    print(f"\n{card}, fp16, S={seq}, D={dims.dim}; ours = {ours} (CUDA EP, io-binding, CUDA graph)")
    header = "| batch | eager ms | compile ms | ours ms | ours e2e ms | ours QPS | vs eager | vs compile | TFLOP/s |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for b in batches:
        r = rows[b]
        o = r[f"{ours}_ms"]
        comp = r.get("compile_ms", float("nan"))
        print(
            f"| {b} | {r['eager_ms']:.3f} | {comp:.3f} | {o:.3f} | {r[f'{ours}_e2e_ms']:.3f} | {b / o * 1e3:,.0f} "
            f"| {r['eager_ms'] / o:.2f}x | {comp / o:.2f}x | {b * FLOP_PER_SAMPLE / o / 1e9:.0f} |"
        )
    result = {
        "card": card,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "seq": seq,
        "dims": dims.__dict__,
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime_version()},
        "bundles": {
            label: {"fusion": load_bundle(p).manifest["fusion"], "op_counts": load_bundle(p).manifest["op_counts"]}
            for p, label in bundles
        },
        "rows": {str(b): rows[b] for b in batches},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
