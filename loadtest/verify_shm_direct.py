"""System shared memory's direct path, verified on the GPU host with tritonclient's own clients.

Starts ``python -m service --workers 2 --shared-engine on --shared-memory system`` (engine processes, so a
request whose input and output are both in system shared memory in the model's precision is computed by the
engine process straight from and into the client's regions), then:

1. **Answers.** For each client batch: the input and output in tritonclient ``shared_memory`` regions, inferred
   over HTTP and over gRPC in the model's precision, each answer compared with ``/encode``'s answer to the same
   input (bit for bit, and the relative L2 error); ``encoder_shm_requests_total{path="direct"}`` counts them all.
   An FP32 request to an fp16 model (a cast) is served too, and counted as ``copied``.
2. **Page-locked.** The engine processes page-locked every region (no "cannot page-lock" in the log) and their
   pinned memory (``VmPin``/``VmLck`` of ``/proc/<pid>/status``) is reported.
3. **No leaks.** ``--cycles`` register / infer / unregister cycles with a new object each: every engine process
   holds as many descriptors and no mapping of any of those objects afterwards.

Prints one line per check, saves JSON (``--out``), exits 0 when every check passed. On the GPU host:

    python loadtest/verify_shm_direct.py --model-dir bundles/fp16

CPU self-test (an fp16 bundle runs on the CPU too, slowly): ``--provider cpu --model-dir <small fp16 bundle>``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from loadtest.peers.launch import free_port, running
from loadtest.peers.oip_clients import fixed_inputs

log = logging.getLogger("verify_shm_direct")
TYPES = {"float16": "FP16", "float32": "FP32"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path("bundles/fp16"))
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--seq", type=int, default=196)
    p.add_argument("--cycles", type=int, default=200)
    p.add_argument("--provider", default="auto")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--ready-timeout", type=float, default=900.0)
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


class Session:
    """tritonclient's HTTP and gRPC clients on one running service, and its engine processes."""

    def __init__(self, http_url: str, grpc_url: str, server_pid: int, dim: int, dtype: np.dtype[Any]) -> None:
        import tritonclient.grpc as grpcclient
        import tritonclient.http as httpclient

        self.http_url, self.dim, self.dtype = http_url, dim, dtype
        self.http = httpclient.InferenceServerClient(http_url.removeprefix("http://"))
        self.grpc = grpcclient.InferenceServerClient(grpc_url)
        self.engines = [
            p
            for p in psutil.Process(server_pid).children(recursive=True)
            if "service.engine.host" in " ".join(p.cmdline())
        ]
        self.results: dict[str, dict[str, Any]] = {}

    def record(self, name: str, ok: bool, detail: Any = None) -> None:
        self.results[name] = {"ok": bool(ok), "detail": detail}
        log.info("%s %s%s", "PASS" if ok else "FAIL", name, f": {detail}" if detail is not None else "")

    def encode(self, x: np.ndarray) -> np.ndarray:
        buffer = io.BytesIO()
        np.save(buffer, x)
        response = httpx.post(
            f"{self.http_url}/encode", content=buffer.getvalue(), headers={"content-type": "application/x-npy"}
        )
        response.raise_for_status()
        return np.load(io.BytesIO(response.content))

    def paths(self) -> dict[str, float]:
        page = httpx.get(f"{self.http_url}/metrics", timeout=10).text
        found = {"direct": 0.0, "copied": 0.0}
        for line in page.splitlines():
            if line.startswith("encoder_shm_requests_total{"):
                path = line.split('path="', 1)[1].split('"', 1)[0]
                found[path] = found.get(path, 0.0) + float(line.rsplit(" ", 1)[1])
        return found

    def infer(self, x: np.ndarray, via_grpc: bool) -> np.ndarray:
        """``x`` through a new input and output region (registered, used, unregistered); the answer read back."""
        import tritonclient.grpc as grpcclient
        import tritonclient.http as httpclient
        import tritonclient.utils.shared_memory as shm

        client, module = (self.grpc, grpcclient) if via_grpc else (self.http, httpclient)
        tag = secrets.token_hex(4)
        names = (f"direct-in-{tag}", f"direct-out-{tag}")
        regions = [shm.create_shared_memory_region(name, f"/{name}", x.nbytes) for name in names]
        try:
            shm.set_shared_memory_region(regions[0], [x])
            for name in names:
                client.register_system_shared_memory(name, f"/{name}", x.nbytes)
            tensor = module.InferInput("input", list(x.shape), TYPES[x.dtype.name])
            tensor.set_shared_memory(names[0], x.nbytes)
            answer = module.InferRequestedOutput("output")
            answer.set_shared_memory(names[1], x.nbytes)
            client.infer("encoder", [tensor], outputs=[answer])
            return np.array(shm.get_contents_as_numpy(regions[1], x.dtype, x.shape))
        finally:
            for name in names:
                with contextlib.suppress(Exception):
                    client.unregister_system_shared_memory(name)
            for region in regions:
                shm.destroy_shared_memory_region(region)


def compare(got: np.ndarray, want: np.ndarray) -> dict[str, Any]:
    g, w = got.astype(np.float32), want.astype(np.float32)
    error = float(np.linalg.norm(g - w) / max(float(np.linalg.norm(w)), 1e-30))
    return {"bit_exact": bool(np.array_equal(got, want)), "rel_l2": error}


def check_answers(s: Session, batches: list[int], seq: int) -> None:
    before = s.paths()
    sent = 0
    for batch in batches:
        x = fixed_inputs(batch, seq, s.dim, s.dtype.name)
        want = s.encode(x)
        for via_grpc in (False, True):
            result = compare(s.infer(x, via_grpc), want)
            s.record(f"answer x{batch} {'grpc' if via_grpc else 'http'}", result["rel_l2"] < 1e-3, result)
            sent += 1
    paths = {k: v - before.get(k, 0.0) for k, v in s.paths().items()}
    s.record("every request took the direct path", paths == {"direct": sent, "copied": 0}, paths)
    if s.dtype != np.float32:
        x = fixed_inputs(2, seq, s.dim, "float32")
        before = s.paths()
        result = compare(s.infer(x, False), s.encode(x))
        paths = {k: v - before.get(k, 0.0) for k, v in s.paths().items()}
        s.record("an FP32 request to the fp16 model is copied", result["rel_l2"] < 1e-3 and paths["copied"] == 1, paths)


def pinned(process: psutil.Process) -> dict[str, str]:
    lines = Path(f"/proc/{process.pid}/status").read_text().splitlines()
    return {line.split(":")[0]: line.split(":", 1)[1].strip() for line in lines if line.startswith(("VmPin", "VmLck"))}


def usage(process: psutil.Process) -> tuple[int, int]:
    """(descriptors, mappings of /dev/shm objects) of ``process``."""
    maps = Path(f"/proc/{process.pid}/maps").read_text().splitlines()
    return len(os.listdir(f"/proc/{process.pid}/fd")), sum(1 for line in maps if "/dev/shm/" in line)


def check_leaks(s: Session, cycles: int, seq: int) -> None:
    x = fixed_inputs(1, seq, s.dim, s.dtype.name)
    s.infer(x, False)
    before = [usage(e) for e in s.engines]
    for _ in range(cycles):
        s.infer(x, False)

    def settled(after: list[tuple[int, int]]) -> bool:
        return all(a[0] <= b[0] and a[1] == 0 for a, b in zip(after, before, strict=True))

    deadline = time.monotonic() + 30
    after = [usage(e) for e in s.engines]
    while time.monotonic() < deadline and not settled(after):
        s.encode(x)  # a connection unregisters what its regions left with its next frame at the latest
        time.sleep(0.2)
        after = [usage(e) for e in s.engines]
    ok = settled(after)
    s.record(f"{cycles} register/infer/unregister cycles leak nothing", ok, {"before": before, "after": after})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    manifest = json.loads((args.model_dir / "manifest.json").read_text())
    dim, dtype = int(manifest["dims"]["dim"]), np.dtype("float16" if manifest["precision"] == "fp16" else "float32")
    port, grpc_port = free_port(), free_port()
    command = [
        sys.executable,
        "-m",
        "service",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--grpc-port",
        str(grpc_port),
    ]
    command += [
        "--model-dir",
        str(args.model_dir),
        "--workers",
        "2",
        "--shared-engine",
        "on",
        "--provider",
        args.provider,
    ]
    command += ["--shared-memory", "system", "--seq-lens", str(args.seq), "--max-batch-size", str(args.max_batch_size)]
    log_path = Path(f"/tmp/verify-shm-direct-{port}.log")
    with running(command, port, log_path=log_path, timeout_s=args.ready_timeout, consecutive=4) as server:
        assert server.pid is not None
        s = Session(server.url, f"127.0.0.1:{grpc_port}", server.pid, dim, dtype)
        batches = [int(b) for b in args.batches.split(",")]
        for name, body in (
            ("answers", lambda: check_answers(s, batches, args.seq)),
            ("leaks", lambda: check_leaks(s, args.cycles, args.seq)),
        ):
            try:
                body()
            except Exception as exc:  # one group failing must not hide the others
                s.record(name, False, f"{type(exc).__name__}: {exc}")
        refused = [line for line in server.tail(100000).splitlines() if "cannot page-lock" in line]
        s.record("every region page-locked (or the CPU: nothing to lock)", not refused, refused[:3] or None)
        s.record("engine processes' pinned memory", True, [pinned(e) for e in s.engines])
    document = {"command": " ".join(sys.argv), "checks": s.results}
    if args.out is not None:
        args.out.write_text(json.dumps(document, indent=2) + "\n")
    failed = [name for name, result in s.results.items() if not result["ok"]]
    print(
        f"{len(s.results) - len(failed)} of {len(s.results)} checks passed" + (f"; failed: {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
