"""Engine benchmark: PyTorch eager vs torch.compile vs our onnxruntime session, one card, one run.

Prints a table in the spirit of FX2AIT's transformer example (latency, QPS, speedup) and saves JSON under
``loadtest/results/``. Needs a CUDA GPU. Example:

    python loadtest/bench_engine.py --bundle bundles/fp16=bert --bundle bundles/fp16-split=split,sdpa_kernel=8

``DIR=label[,key=value...]``: extra keys are CUDA EP provider options for that session (e.g. ``sdpa_kernel``).
Device time is a CUDA-graph replay on device buffers; host-to-host is ``EncoderSession.run`` (pinned host path,
and for the first bundle also onnxruntime's pageable path, checked equal). ``--profile-batch`` adds a
kernel-level profile (torch.profiler/CUPTI sees onnxruntime's kernels) of one graph-less run per bundle.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    x = sample(batch, seq, dim)
    session.run(x)
    device = time_ms(lambda: session.replay(batch, seq), lambda: None, iters_for(batch))
    e2e = time_ms(lambda: session.run(x), lambda: None, max(5, iters_for(batch) // 2))
    return device, e2e


def sample(batch: int, seq: int, dim: int) -> np.ndarray:
    return np.random.default_rng(batch).standard_normal((batch, seq, dim)).astype(np.float16)


def parse_bundle(item: str) -> tuple[str, str, dict[str, str]]:
    path, _, rest = item.partition("=")
    label, *pairs = (rest or Path(path).name).split(",")
    return path, label, dict(pair.split("=", 1) for pair in pairs)


def profile_kernels(path: str, extra: dict[str, str], batch: int, seq: int, dim: int) -> list[dict[str, object]]:
    """Top kernels (device time per run) of a graph-less session run: CUPTI sees onnxruntime's launches."""
    from torch.profiler import ProfilerActivity, profile

    options = SessionOptions(provider="cuda", cuda_graphs=False, extra_cuda_options=extra, host_path="pageable")
    session = EncoderSession(load_bundle(path), options)
    x, runs = sample(batch, seq, dim), 5
    session.run(x)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            session.run(x)
        torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        total = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if total > 0:
            rows.append({"kernel": evt.key[:110], "ms_per_run": total / 1e3 / runs, "calls": evt.count // runs})
    rows.sort(key=lambda r: -float(r["ms_per_run"]))  # type: ignore[arg-type]
    whole = sum(float(r["ms_per_run"]) for r in rows) or 1.0  # type: ignore[arg-type]
    for r in rows:
        r["share"] = round(float(r["ms_per_run"]) / whole, 3)  # type: ignore[arg-type]
    return rows[:20]


def check_host_paths(fast: EncoderSession, plain: EncoderSession, batch: int, seq: int, dim: int) -> float:
    """rel L2 between the pinned/pipelined path and onnxruntime's own copies (chunk graphs may pick other GEMMs)."""
    x = sample(batch, seq, dim)
    a, b = fast.run(x).astype(np.float64), plain.run(x).astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def bench_bundle(
    args: argparse.Namespace,
    index: int,
    path: str,
    label: str,
    extra: dict[str, str],
    batches: tuple[int, ...],
    seq: int,
    dim: int,
    rows: dict[int, dict[str, float]],
    profiles: dict[str, object],
) -> None:
    options = SessionOptions(
        provider="cuda",
        batch_buckets=batches,
        seq_lens=(seq,),
        cuda_graphs=True,
        extra_cuda_options=extra,
        host_path=args.host_path,
    )
    session = EncoderSession(load_bundle(path), options)
    if session.provider != "CUDAExecutionProvider":
        raise RuntimeError(f"{label}: runs on {session.provider}, not the CUDA EP")
    session.warmup()
    print(f"{label}: {session.describe()}", flush=True)
    for b in batches:
        device, e2e = bench_session(session, b, seq, dim)
        rows[b][f"{label}_ms"], rows[b][f"{label}_e2e_ms"] = device, e2e
        print(f"{label} bs={b}: device {device:.3f} ms, host-to-host {e2e:.3f} ms", flush=True)
    if index == 0 and args.host_path == "pinned":
        for b in batches:
            buf = session.input_buffer(b, seq)
            buf[...] = sample(b, seq, dim)
            rows[b][f"{label}_e2e_pinned_in_ms"] = time_ms(lambda s=session, v=buf: s.run(v), lambda: None, 5)
            print(f"{label} bs={b}: host-to-host, pinned input {rows[b][f'{label}_e2e_pinned_in_ms']:.3f} ms")
    if index == 0 and not args.no_pageable:
        plain = EncoderSession(load_bundle(path), dataclasses.replace(options, host_path="pageable"))
        plain.warmup()
        for b in batches:
            x = sample(b, seq, dim)
            rows[b][f"{label}_e2e_pageable_ms"] = time_ms(lambda s=plain, v=x: s.run(v), lambda: None, 5)
            rows[b][f"{label}_pinned_vs_pageable_rel_l2"] = check_host_paths(session, plain, b, seq, dim)
            print(f"{label} bs={b}: pageable host-to-host {rows[b][f'{label}_e2e_pageable_ms']:.3f} ms", flush=True)
        del plain
    del session
    if args.profile_batch:
        try:
            profiles[label] = profile_kernels(path, extra, args.profile_batch, seq, dim)
            for r in profiles[label][:12]:  # type: ignore[index]
                print(f"  profile {label} bs={args.profile_batch}: {r}", flush=True)
        except Exception as exc:  # the profile is extra information, never a reason to lose the run
            print(f"profile {label} failed: {type(exc).__name__}: {exc}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bundle", action="append", required=True, help="DIR=label (first one is 'ours')")
    parser.add_argument("--seq", type=int, default=196)
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--profile-batch", type=int, default=0, help="kernel profile at this batch (0: none)")
    parser.add_argument("--host-path", default="pinned", choices=("pinned", "pageable"))
    parser.add_argument("--no-pageable", action="store_true", help="skip the pageable host-path baseline")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/engine.json"))
    args = parser.parse_args()
    batches = tuple(int(b) for b in args.batches.split(","))
    seq = args.seq
    bundles = [parse_bundle(item) for item in args.bundle]
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
    profiles: dict[str, object] = {}
    for index, (path, label, extra) in enumerate(bundles):
        try:
            bench_bundle(args, index, path, label, extra, batches, seq, dims.dim, rows, profiles)
        except Exception as exc:  # one broken variant must not lose the others' numbers
            print(f"{label} FAILED: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
            for b in batches:
                rows[b].setdefault(f"{label}_ms", float("nan"))
                rows[b].setdefault(f"{label}_e2e_ms", float("nan"))
    ours = bundles[0][1]
    card = torch.cuda.get_device_name()
    print(f"\n{card}, fp16, S={seq}, D={dims.dim}; ours = {ours} (CUDA EP, io-binding, CUDA graph)")
    header = (
        "| batch | eager ms | compile ms | ours ms | vs eager | vs compile | TFLOP/s "
        "| e2e ms | e2e pinned-in ms | e2e ORT pageable ms |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for b in batches:
        r = rows[b]
        o = r[f"{ours}_ms"]
        comp = r.get("compile_ms", float("nan"))
        nan = float("nan")
        print(
            f"| {b} | {r['eager_ms']:.3f} | {comp:.3f} | {o:.3f} | {r['eager_ms'] / o:.2f}x | {comp / o:.2f}x "
            f"| {b * FLOP_PER_SAMPLE / o / 1e9:.0f} | {r[f'{ours}_e2e_ms']:.3f} "
            f"| {r.get(f'{ours}_e2e_pinned_in_ms', nan):.3f} | {r.get(f'{ours}_e2e_pageable_ms', nan):.3f} |"
        )
    labels = [label for _, label, _ in bundles]
    print("\ndevice ms per variant (same run): | batch | " + " | ".join(labels) + " |")
    for b in batches:
        print(f"| {b} | " + " | ".join(f"{rows[b][f'{label}_ms']:.3f}" for label in labels) + " |")
    result = {
        "card": card,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "seq": seq,
        "dims": dims.__dict__,
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime_version()},
        "bundles": {
            label: {
                "fusion": load_bundle(p).manifest["fusion"],
                "graph_opts": load_bundle(p).manifest.get("graph_opts", []),
                "cuda_options": extra,
                "op_counts": load_bundle(p).manifest["op_counts"],
                "verification": load_bundle(p).manifest.get("verification", {}),
            }
            for p, label, extra in bundles
        },
        "rows": {str(b): rows[b] for b in batches},
        "kernel_profiles": profiles,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
