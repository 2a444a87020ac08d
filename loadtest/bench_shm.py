"""What the system shared-memory registry costs a request, on this host (CPU only, no server).

    python loadtest/bench_shm.py [--out result.json]

Rows: the per-request registry work (input and output views: one ``readlink`` and one ``fstat`` each), its
system calls alone, a region's first use in a worker that did not register it (open, checks, ``mmap``), the
NaN/Inf check of the input where it lies, and the two host copies of the copied path (region -> the engine's
batch buffer, answer -> output region) at the benchmark's tensor sizes (196x768 fp16 per sample). The last two
rows add them up: a worker's host work per request on the direct path (views and the check: the engine process
copies between the region and the GPU) and on the copied path (the same plus both copies).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from service.dataplane import all_finite
from service.oip.types import SharedMemoryRef
from service.shm import SystemSharedMemory

SHAPE = (196, 768)  # one sample of the benchmark's model, fp16


def per_call_us(fn: Callable[[], Any], seconds: float = 1.0) -> float:
    """Median over five runs of the mean time per call."""
    runs = []
    for _ in range(5):
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / 5:
            for _ in range(100):
                fn()
            count += 100
        runs.append(elapsed / count * 1e6)
    return sorted(runs)[2]


def measure(batch: int) -> dict[str, float]:
    shape = (batch, *SHAPE)
    dtype = np.dtype("<f2")
    nbytes = int(np.prod(shape)) * dtype.itemsize
    key = f"encoder-bench-{secrets.token_hex(4)}"
    path = Path("/dev/shm") / key
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, 2 * nbytes)
    os.close(fd)
    directory = tempfile.mkdtemp(prefix="encoder-bench-shm-")
    registering, other = SystemSharedMemory(directory), SystemSharedMemory(directory)
    try:
        registering.register("r", key, 0, 2 * nbytes)
        inputs, outputs = SharedMemoryRef("r", 0, nbytes), SharedMemoryRef("r", nbytes, nbytes)
        region = registering._mapped["r"]
        entry = registering.records._entry("r")
        # The engine's batch buffers (pinned on the GPU, the engine process's arenas) start on a page, like
        # this one; numpy's own large arrays start 16 bytes past one, which a copy from a page-aligned region
        # pays for with 4K aliasing (loads falsely waiting on the stores just behind them).
        aligned = mmap.mmap(-1, nbytes)
        staging = np.frombuffer(aligned, dtype).reshape(shape)
        heap = np.ones(shape, dtype)
        registering.output_array(SharedMemoryRef("r", 0, 2 * nbytes), np.dtype(np.uint8), (2 * nbytes,))[...] = 1

        def first_use() -> None:
            other._mapped.clear()
            other.input_array(inputs, dtype, shape)

        views = per_call_us(
            lambda: (registering.input_array(inputs, dtype, shape), registering.output_array(outputs, dtype, shape))
        )
        check = per_call_us(lambda: all_finite(registering.input_array(inputs, dtype, shape)), 0.5)
        copy_in = per_call_us(lambda: np.copyto(staging, registering.input_array(inputs, dtype, shape)), 0.5)
        copy_out = per_call_us(lambda: np.copyto(registering.output_array(outputs, dtype, shape), staging), 0.5)
        return {
            "views per request (input + output)": views,
            "  of which readlink (still registered?)": per_call_us(lambda: os.readlink(entry)),
            "  of which fstat (not truncated?)": per_call_us(region.mapping.size),
            "first use in another worker (open, checks, mmap)": per_call_us(first_use, 0.5),
            "NaN/Inf check of the input where it lies": check,
            "copy region -> page-aligned batch buffer": copy_in,
            "copy answer -> output region": copy_out,
            f"copy region -> numpy heap array (+16 B; {heap.__array_interface__['data'][0] % 4096})": per_call_us(
                lambda: np.copyto(heap, registering.input_array(inputs, dtype, shape)), 0.5
            ),
            "worker host work per request, direct path": views + check,
            "worker host work per request, copied path": views + check + copy_in + copy_out,
        }
    finally:
        registering.close()
        other.close()
        os.unlink(path)
        os.rmdir(directory) if os.path.isdir(directory) and not os.listdir(directory) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,16", help="client batch sizes (samples of 196x768 fp16)")
    parser.add_argument("--out", type=Path, help="also write the table as JSON here")
    args = parser.parse_args()
    results = {int(b): measure(int(b)) for b in args.batches.split(",")}
    rows = list(next(iter(results.values())).keys())
    print(f"{'microseconds per call':58}" + "".join(f"{'batch ' + str(b):>12}" for b in results))
    for i, row in enumerate(rows):
        print(f"{row.split(' (+16')[0]:58}" + "".join(f"{list(r.values())[i]:12.2f}" for r in results.values()))
    if args.out is not None:
        document = {"host_cpus": os.cpu_count(), "results": {str(b): r for b, r in results.items()}}
        args.out.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
