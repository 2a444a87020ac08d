"""CUDA shared memory, verified on the GPU host with tritonclient's own ``cuda_shared_memory`` utilities.

Starts ``python -m service --shared-memory system,cuda`` (``--workers 2``: a region registered through one worker
must serve the other), then:

1. **Answers.** For each client batch: the input in a CUDA region (``create_shared_memory_region``,
   ``get_raw_handle``), registered over HTTP, the output region over gRPC; status lists both; infer over HTTP and
   over gRPC, FP16 and FP32, a system-shared-memory input with a CUDA output; every answer read back from the
   device and compared with ``/encode``'s answer to the same input.
2. **Refusals.** A handle of the wrong size, bytes that are no handle, a stale handle (its memory freed), a
   device id the service does not serve, a handle for another GPU (with two GPUs), a size of 0 or past the
   allocation, a duplicate name, an unknown region, a range past the region, a size not the tensor's: each a
   4xx (gRPC: INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS), never a 5xx (the cases:
   ``loadtest/peers/cuda_refusals.py``). A case that is accepted is unregistered at once, so each case is judged on
   its own. A stale handle that CUDA itself still opens (it may: CUDA documents no failure for it) is reported as
   that, a FAIL with a NOTE line saying why the server cannot tell.
3. **No leaks.** ``--cycles`` register / infer / unregister cycles: the server's processes hold as many file
   descriptors after as before, and status is empty.

Saves JSON and prints one line per check; exits 0 when every check passed. On the GPU host (cuda-python
installed), one command:

    python loadtest/verify_cudashm.py --model-dir bundles/fp16

CPU self-test of the same script (the service's test-only fake device layer): ``--fake --provider cpu``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from loadtest.peers.cuda_refusals import check_refusals
from loadtest.peers.cuda_regions import ClientRegion, allocate, registered
from loadtest.peers.launch import ServerProcess, free_port
from loadtest.peers.oip_clients import fixed_inputs

log = logging.getLogger("verify_cudashm")
TYPES = {"float16": "FP16", "float32": "FP32"}
TOLERANCE = 1e-3  # relative L2 against /encode's answer to the same input (the same batch: equal in practice)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path("bundles/fp16"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--seq", type=int, default=196)
    p.add_argument("--device", type=int, default=0, help="the GPU the client allocates on (the service's ordinal)")
    p.add_argument("--cycles", type=int, default=100, help="register/infer/unregister cycles of the leak check")
    p.add_argument("--provider", default="auto", help="the service's --provider")
    p.add_argument("--fake", action="store_true", help="CPU self-test: the service's fake CUDA layer, no GPU")
    p.add_argument("--ready-timeout", type=float, default=900.0)
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


class Checks:
    """Named pass/fail results with a detail each."""

    def __init__(self) -> None:
        self.results: dict[str, dict[str, Any]] = {}

    def record(self, name: str, ok: bool, detail: Any = None) -> None:
        self.results[name] = {"ok": bool(ok), "detail": detail}
        log.info("%s %s%s", "PASS" if ok else "FAIL", name, f": {detail}" if detail is not None else "")

    def attempt(self, name: str, body: Callable[[], None]) -> None:
        """Run a group of checks (each records its own results); one that raises fails as ``name``."""
        try:
            body()
        except Exception as exc:  # the other groups still run
            self.record(name, False, f"{type(exc).__name__}: {exc}")

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r["ok"] for r in self.results.values())


class Session:
    """The running service and the clients the checks use."""

    def __init__(self, args: argparse.Namespace, http_url: str, grpc_url: str) -> None:
        import tritonclient.grpc as grpcclient
        import tritonclient.http as httpclient

        self.args, self.http_url = args, http_url
        self.http = httpclient.InferenceServerClient(http_url.removeprefix("http://"), network_timeout=300.0)
        self.grpc = grpcclient.InferenceServerClient(grpc_url)
        self.httpclient, self.grpcclient = httpclient, grpcclient
        model_input = self.http.get_model_metadata("encoder")["inputs"][0]
        self.dim, self.model_datatype = int(model_input["shape"][-1]), str(model_input["datatype"])
        self.count = 0

    def region(self, size: int, device: int | None = None) -> ClientRegion:
        self.count += 1
        name = f"verify-{self.count}"
        return allocate(name, size, self.args.device if device is None else device, fake=self.args.fake)

    def paths(self) -> dict[str, float]:
        """Shared-memory requests served so far, by path (every worker's, from /metrics)."""
        from prometheus_client.parser import text_string_to_metric_families

        page = httpx.get(f"{self.http_url}/metrics", timeout=30.0).text
        counts = {"direct": 0.0, "copied": 0.0}
        for family in text_string_to_metric_families(page):
            for sample in family.samples:
                if sample.name == "encoder_shm_requests_total" and sample.labels.get("path") in counts:
                    counts[sample.labels["path"]] += sample.value
        return counts

    def encode(self, x: np.ndarray) -> np.ndarray:
        """``/encode``'s answer to ``x`` (raw bytes in, raw bytes out)."""
        headers = {"Content-Type": "application/octet-stream", "X-Shape": ",".join(map(str, x.shape))}
        headers["X-Dtype"] = x.dtype.name
        answer = httpx.post(f"{self.http_url}/encode", content=x.tobytes(), headers=headers, timeout=300.0)
        answer.raise_for_status()
        return np.frombuffer(answer.content, dtype=x.dtype).reshape(x.shape)

    def infer(self, x: np.ndarray, inp: str, out: str, grpc: bool = False, in_offset: int = 0) -> None:
        client = self.grpcclient if grpc else self.httpclient
        tensor = client.InferInput("input", list(x.shape), TYPES[x.dtype.name])
        tensor.set_shared_memory(inp, x.nbytes, offset=in_offset)
        wanted = client.InferRequestedOutput("output")
        wanted.set_shared_memory(out, x.nbytes)
        (self.grpc if grpc else self.http).infer("encoder", [tensor], outputs=[wanted])

    def close(self) -> None:
        self.http.close()
        self.grpc.close()


def compare(got: np.ndarray, want: np.ndarray) -> tuple[bool, dict[str, Any]]:
    g, w = got.astype(np.float32), want.astype(np.float32)
    err = float(np.linalg.norm(g - w) / max(float(np.linalg.norm(w)), 1e-12))
    equal = bool(np.array_equal(got, want))
    return np.isfinite(g).all() and err <= TOLERANCE, {"bitwise_equal": equal, "rel_l2": err}


def check_answers(s: Session, checks: Checks, batch: int) -> None:
    x = fixed_inputs(batch, s.args.seq, s.dim)  # float16
    expected = s.encode(x)
    inp, out = s.region(x.nbytes), s.region(x.nbytes)
    try:
        inp.write(x)
        with registered(s.http, inp), registered(s.grpc, out):
            listed = {r["name"]: r for r in s.http.get_cuda_shared_memory_status()}
            want = {inp.name: x.nbytes, out.name: x.nbytes}
            seen = {n: (r["device_id"], r["byte_size"]) for n, r in listed.items() if n in want}
            ok = seen == {n: (s.args.device, size) for n, size in want.items()}
            grpc_listed = s.grpc.get_cuda_shared_memory_status(as_json=True).get("regions", {})
            checks.record(f"x{batch} status lists both (HTTP and gRPC)", ok and set(want) <= set(grpc_listed), seen)
            before = s.paths()
            for transport in ("http", "grpc"):
                out.write(np.zeros_like(x))
                s.infer(x, inp.name, out.name, grpc=transport == "grpc")
                checks.record(
                    f"x{batch} fp16 over {transport} equals /encode", *compare(out.read(x.dtype, x.shape), expected)
                )
            taken = {path: count - before[path] for path, count in s.paths().items()}
            # Engine processes (several workers) and an FP16 bundle: the engine process copies device to device (the
            # fake layer's CPU run too, its "device" memory being host memory); otherwise the worker copies.
            direct = s.args.workers > 1 and s.model_datatype == "FP16"
            wanted = {"direct": 2, "copied": 0} if direct else {"direct": 0, "copied": 2}
            checks.record(
                f"x{batch} fp16 took the {'device-to-device' if direct else 'copied'} path", taken == wanted, taken
            )
            x32 = x.astype(np.float32)
            inp32, out32 = s.region(x32.nbytes), s.region(x32.nbytes)
            try:
                inp32.write(x32)
                with registered(s.http, inp32), registered(s.http, out32):
                    s.infer(x32, inp32.name, out32.name)
                    checks.record(
                        f"x{batch} fp32 equals /encode", *compare(out32.read(x32.dtype, x32.shape), s.encode(x32))
                    )
            finally:
                inp32.free()
                out32.free()
    finally:
        inp.free()
        out.free()


def check_mixed(s: Session, checks: Checks) -> None:
    """A system shared-memory input, the answer into a CUDA region."""
    import tritonclient.utils.shared_memory as sysshm

    x = fixed_inputs(4, s.args.seq, s.dim)
    key = f"/verify-cudashm-{int(time.time() * 1e3) % 10**9}"
    system = sysshm.create_shared_memory_region("verify-sys", key, x.nbytes)
    out = s.region(x.nbytes)
    try:
        sysshm.set_shared_memory_region(system, [x])
        s.http.register_system_shared_memory("verify-sys", key, x.nbytes)
        with registered(s.http, out):
            s.infer(x, "verify-sys", out.name)
            checks.record("system input, CUDA output equals /encode", *compare(out.read(x.dtype, x.shape), s.encode(x)))
        s.http.unregister_system_shared_memory("verify-sys")
    finally:
        sysshm.destroy_shared_memory_region(system)
        out.free()


def server_fds(pid: int) -> int:
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += proc.num_fds()
    return total


def check_cycles(s: Session, checks: Checks, pid: int) -> None:
    x = fixed_inputs(2, s.args.seq, s.dim)
    expected = s.encode(x)
    inp, out = s.region(x.nbytes), s.region(x.nbytes)
    try:
        inp.write(x)
        before = server_fds(pid)
        wrong = 0
        for i in range(s.args.cycles):
            client = s.http if i % 2 else s.grpc
            with registered(client, inp), registered(client, out):
                s.infer(x, inp.name, out.name, grpc=bool(i % 3 == 0))
                wrong += not compare(out.read(x.dtype, x.shape), expected)[0]
        s.http.unregister_cuda_shared_memory()
        time.sleep(2.5)  # every worker closes the handles of unregistered regions within a second or so
        after = server_fds(pid)
        status = s.http.get_cuda_shared_memory_status()
        detail = {"cycles": s.args.cycles, "wrong_answers": wrong, "fds_before": before, "fds_after": after}
        checks.record(
            "register/infer/unregister cycles: right answers, no leak",
            wrong == 0 and after <= before and status == [],
            detail,
        )
    finally:
        inp.free()
        out.free()


def gpu_count(fake: bool) -> int:
    if fake:
        return 1  # the fake layer's device 1 is not served by a CPU service: covered as "device id not served"
    from cuda.bindings import runtime

    err, count = runtime.cudaGetDeviceCount()
    return int(count) if err == runtime.cudaError_t.cudaSuccess else 0


@contextlib.contextmanager
def service(args: argparse.Namespace) -> Iterator[tuple[ServerProcess, str]]:
    port, grpc_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), "--grpc-port", str(grpc_port)]
    cmd += ["--model-dir", str(args.model_dir), "--workers", str(args.workers), "--seq-lens", str(args.seq)]
    cmd += ["--shared-memory", "system,cuda", "--max-batch-size", str(max(64, *args.batch_list))]
    cmd += ["--provider", args.provider, "--log-level", "warning"]
    # The CPU self-test: the fake device layer, and engine processes as on a GPU (the device-to-device path).
    cmd += ["--cuda-memory", "fake", "--shared-engine", "on"] if args.fake else []
    server = ServerProcess(cmd, port, "/readyz", Path(f"/tmp/verify-cudashm-{port}.log"))
    server.start()
    try:
        server.wait_ready(args.ready_timeout, consecutive=args.workers)
        yield server, f"127.0.0.1:{grpc_port}"
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args.batch_list = [int(b) for b in args.batches.split(",") if b.strip()]
    checks = Checks()
    started = time.time()
    with service(args) as (server, grpc_url):
        assert server.pid is not None
        s = Session(args, server.url, grpc_url)
        try:
            extensions = s.http.get_server_metadata()["extensions"]
            checks.record("metadata lists cuda_shared_memory", "cuda_shared_memory" in extensions, extensions)
            for batch in args.batch_list:
                checks.attempt(f"x{batch} answers", lambda b=batch: check_answers(s, checks, b))  # type: ignore[misc]
            checks.attempt("mixed kinds", lambda: check_mixed(s, checks))
            checks.attempt("refusals", lambda: check_refusals(s, checks, gpu_count(args.fake)))
            checks.attempt("cycles", lambda: check_cycles(s, checks, server.pid or 0))
        finally:
            s.close()
        log_text = server.log_path.read_text(errors="replace")
    checks.record("no traceback in the server log", "Traceback" not in log_text, None)
    today = dt.date.today().isoformat()
    out = args.out or Path(f"loadtest/results/verify-cudashm-{today}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) for k, v in vars(args).items()}
    document = {"date": today, "elapsed_s": round(time.time() - started, 1), "settings": settings}
    document |= {"passed": checks.passed, "checks": checks.results}
    out.write_text(json.dumps(document, indent=2, default=str) + "\n")
    failed = [name for name, r in checks.results.items() if not r["ok"]]
    print(f"\n{len(checks.results) - len(failed)}/{len(checks.results)} checks passed; saved {out}")
    for name in failed:
        print(f"FAILED {name}: {checks.results[name]['detail']}")
    return 0 if checks.passed else 1


if __name__ == "__main__":
    sys.exit(main())
