"""``EncoderSession.run_into`` host to host: one serial batch vs pipelined chunks, from page-locked memory.

What the engine process does with merged worker batches: parts (16-row parts merged, or one part) in pinned host
memory are copied to the device, computed and copied back into pinned outs. Each total runs serially (one bucket,
copy in, compute, copy out) and as chunks of each size in ``--chunks`` (copies of one chunk overlap the compute
of another); device-only replay of each bucket for reference. Checks that every chunked answer equals the serial
one bit for bit, and both against PyTorch fp32. The NaN/Inf flags the engine process asks for with each batch are
an output of the captured graphs: each row also times the default policy with them ("flags") and what the
separate check they replaced cost (one FiniteCheck run per chunk, "old check"), and the session's answers are
compared bit for bit with the bundle's model without the flags output. Needs a CUDA GPU:

    python loadtest/bench_pipeline.py --bundle bundles/fp16 --out loadtest/results/pipeline.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from converter.bundle import Bundle, load_bundle
from converter.finite import FiniteCheck
from converter.model import EncoderDims, default_model
from converter.pipeline import chunk_sizes, pick_chunk
from converter.providers import CUDA, SessionOptions
from converter.session import EncoderSession, onnxruntime_version
from converter.verify import rel_l2
from loadtest.bench_engine import time_ms

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def filled(session: EncoderSession, rows: int, seq: int, seed: int) -> np.ndarray:
    buf = session.input_buffer(rows, seq)
    buf[...] = np.random.default_rng(seed).standard_normal(buf.shape).astype(buf.dtype)
    return buf


def layouts(session: EncoderSession, total: int, part_rows: int, seq: int) -> dict[str, list[np.ndarray]]:
    split = [filled(session, part_rows, seq, total + i) for i in range(max(1, total // part_rows))]
    found = {f"{part_rows}-row parts": split} if total > part_rows and total % part_rows == 0 else {}
    return {**found, "one part": [filled(session, total, seq, total)]}


def replay_blocking(session: EncoderSession, batch: int, seq: int) -> dict[str, float]:
    """Host ms inside one graph replay call vs ms a device sync waits after it: does the call block?"""
    inside, after = [], []
    for _ in range(20):
        torch.cuda.synchronize()
        start = time.perf_counter()
        session.replay(batch, seq)
        mid = time.perf_counter()
        torch.cuda.synchronize()
        inside.append((mid - start) * 1e3)
        after.append((time.perf_counter() - mid) * 1e3)
    return {"call_ms": statistics.median(inside), "sync_after_ms": statistics.median(after)}


def exactness(session: EncoderSession, model: torch.nn.Module, total: int, chunks: list[int], seq: int) -> dict:
    """Chunked answers vs the serial bucket's (bitwise) and both vs PyTorch fp32 (16-row parts, separate outs)."""
    parts = [filled(session, 16, seq, 1000 + total + i) for i in range(max(1, total // 16))]
    x = np.concatenate(parts)
    with torch.inference_mode():
        ref = model(torch.from_numpy(x.astype(np.float32)).cuda()).cpu().numpy()
    answers: dict[str, np.ndarray] = {}
    for chunk in [0, *chunks]:
        outs = [np.full_like(p, np.nan) for p in parts]
        session.run_into(parts, outs, chunk=chunk)
        answers["serial" if chunk == 0 else f"chunk {chunk}"] = np.concatenate(outs)
    serial = answers["serial"]
    return {
        name: {
            "bitwise_equal_to_serial": bool(np.array_equal(a.view(np.uint16), serial.view(np.uint16))),
            "max_abs_vs_serial": float(np.abs(a.astype(np.float32) - serial.astype(np.float32)).max()),
            "rel_l2_vs_fp32": rel_l2(a, ref),
            "max_abs_vs_fp32": float(np.abs(a.astype(np.float32) - ref).max()),
        }
        for name, a in answers.items()
    }


def old_check_ms(session: EncoderSession, check: FiniteCheck, total: int, chunk: int, seq: int) -> float:
    """What the separate NaN/Inf check cost per call: one FiniteCheck run on each chunk's slot input."""
    buckets = sorted(b for b, s in session._graphs if s == seq)
    sizes = chunk_sizes(total, chunk or buckets[-1], buckets)
    shapes = [(size, session._graphs[(size, seq)].input.data_ptr()) for size in sizes]

    def run() -> None:
        for size, ptr in shapes:
            check.device(ptr, (size, seq, session.dim))

    return time_ms(run, lambda: None, max(8, 400 // total))


def flags_exactness(session: EncoderSession, bundle: Bundle, seq: int) -> dict[str, Any]:
    """The session's answers (graphs with the flags output) against a session of the model as it is (same options,
    same captured graphs, no flags output), bit for bit; and the flags of a batch with a NaN and an Inf."""
    plain = EncoderSession(bundle, dataclasses.replace(session.options, finite_flags=False))
    plain.warmup()
    equal = {}
    for batch in (1, 16, 64):
        x = filled(session, batch, seq, 7 + batch)
        equal[str(batch)] = bool(np.array_equal(session.run(x).view(np.uint8), plain.run(x).view(np.uint8)))
    parts = [filled(session, 16, seq, 40 + i) for i in range(3)]
    parts[1][3, 5, 7], parts[2][15, seq - 1, 0] = np.nan, np.inf
    flags = np.zeros(48, bool)
    session.run_into(parts, [np.empty_like(p) for p in parts], finite=flags)
    wanted = [i not in (19, 47) for i in range(48)]
    return {
        "flags_output": session.describe()["finite_flags"],
        "bitwise_equal_to_the_model_without_flags": equal,
        "flags_right": flags.tolist() == wanted,
    }


def bench(args: argparse.Namespace) -> dict[str, Any]:
    bundle = load_bundle(args.bundle)
    chunks = [int(c) for c in args.chunks.split(",")]
    options = SessionOptions(
        provider="cuda", batch_buckets=BUCKETS, seq_lens=(args.seq,), pipeline_chunks=tuple(chunks)
    )
    session = EncoderSession(bundle, options)
    if session.provider != CUDA or session.session.get_providers()[0] != CUDA:
        raise RuntimeError(f"runs on {session.session.get_providers()}, not the CUDA EP")
    session.warmup()
    print(f"session: {session.describe()}", flush=True)
    seq, totals = args.seq, [int(t) for t in args.totals.split(",")]
    defaults = SessionOptions()
    device = {b: time_ms(functools.partial(session.replay, b, seq), lambda: None, max(10, 800 // b)) for b in BUCKETS}
    print("device-only ms:", {b: round(v, 3) for b, v in device.items()}, flush=True)
    blocking = {b: replay_blocking(session, b, seq) for b in (16, 64, 256)}
    print("replay call vs sync after (ms):", blocking, flush=True)
    check = FiniteCheck(session.dtype, CUDA, 0)  # the separate check the graphs' flags output replaced
    rows = []
    for total in totals:
        for layout, parts in layouts(session, total, args.part_rows, seq).items():
            outs = [session.input_buffer(p.shape[0], seq) for p in parts]
            row: dict[str, Any] = {"rows": total, "layout": layout, "parts": len(parts), "ms": {}}
            # The default policy's pick is timed on its own too: a repeat of that chunk's number, taken later.
            policy = pick_chunk(total, defaults.pipeline_chunks, defaults.pipeline_min_chunks)
            for name, chunk in [("serial", 0), *((str(c), c) for c in chunks if c < total), ("default", policy)]:
                call = functools.partial(session.run_into, parts, outs, chunk=chunk)
                row["ms"][name] = time_ms(call, lambda: None, max(8, 400 // total))
            flags = np.ones(total, bool)
            call = functools.partial(session.run_into, parts, outs, chunk=policy, finite=flags)
            row["flags_ms"] = time_ms(call, lambda: None, max(8, 400 // total))
            row["old_check_ms"] = old_check_ms(session, check, total, policy, seq)
            row["default_policy_chunk"] = policy
            rows.append(row)
            print(json.dumps(row), flush=True)
    model = default_model(EncoderDims(**bundle.manifest["dims"])).cuda().float().eval()
    checks = {str(t): exactness(session, model, t, [c for c in chunks if c < t], seq) for t in totals}
    for key, found in checks.items():
        print(f"exactness rows={key}: {json.dumps(found)}", flush=True)
    flagged = flags_exactness(session, bundle, seq)
    print(f"flags output: {json.dumps(flagged)}", flush=True)
    return {
        "card": torch.cuda.get_device_name(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "seq": seq,
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime_version()},
        "session": session.describe(),
        "device_only_ms": {str(b): v for b, v in device.items()},
        "replay_blocking_ms": {str(b): v for b, v in blocking.items()},
        "rows": rows,
        "exactness": checks,
        "flags_exactness": flagged,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        "| rows | layout | device-only ms | serial ms | serial samples/s | best chunk | pipelined ms | pipelined "
        "samples/s | speedup | default policy: chunk, ms | with NaN/Inf flags ms | old separate check ms | "
        "all chunk sizes (ms) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for row in result["rows"]:
        total, ms = row["rows"], row["ms"]
        serial = ms["serial"]
        device = result["device_only_ms"][str(min(b for b in BUCKETS if b >= total))]
        piped = {int(k): v for k, v in ms.items() if k not in ("serial", "default")}
        best = min(piped, key=lambda c: piped[c]) if piped else 0
        best_ms = piped.get(best, serial)
        every = ", ".join(f"{c}: {v:.3f}" for c, v in sorted(piped.items())) or "–"
        lines.append(
            f"| {total} | {row['layout']} | {device:.3f} | {serial:.3f} | {total / serial * 1e3:,.0f} | "
            f"{best or '–'} | {best_ms:.3f} | {total / best_ms * 1e3:,.0f} | {serial / best_ms:.2f}× | "
            f"{row['default_policy_chunk'] or 'serial'}, {ms.get('default', float('nan')):.3f} | "
            f"{row['flags_ms']:.3f} | +{row['old_check_ms']:.3f} | {every} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="bundles/fp16")
    parser.add_argument("--seq", type=int, default=196)
    parser.add_argument("--totals", default="16,32,48,64,128,256", help="merged rows per run_into call")
    parser.add_argument("--part-rows", type=int, default=16, help="rows per part in the merged layout")
    parser.add_argument("--chunks", default="8,16,32,64", help="chunk sizes to pipeline with")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/pipeline.json"))
    args = parser.parse_args()
    result = bench(args)
    result["table"] = table(result)
    print(f"\n{result['card']}, fp16, S={args.seq}: run_into host to host (pinned), ms per call\n{result['table']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
