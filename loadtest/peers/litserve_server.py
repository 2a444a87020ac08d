"""LitServe, with its own dynamic batching, serving the same onnxruntime session as the service.

LitServe hands ``decode_request`` the parsed JSON body (raw bodies are not passed through), so the wire
format here is JSON with the fp16 bytes in base64: ``{"shape": [S, D], "dtype": "float16", "data": "..."}``,
answered the same way. Batches are padded to the session's buckets so the captured CUDA graphs are used,
as the service does. ``python -m loadtest.peers.litserve_server --port 8003 --api-servers 8 --model-dir DIR``
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import sys
from typing import Any

import numpy as np

DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
READY_PATH = "/health"
PREDICT_PATH = "/predict"


def available() -> bool:
    return importlib.util.find_spec("litserve") is not None


def pad_to(bucket: int, x: np.ndarray) -> np.ndarray:
    if x.shape[0] == bucket:
        return x
    padding = np.zeros((bucket - x.shape[0], *x.shape[1:]), dtype=x.dtype)
    return np.concatenate([x, padding])


try:  # optional: the benchmark skips this peer where LitServe is not installed
    import litserve as ls
except ImportError:
    ls = None


if ls is not None:
    # At module level: LitServe pickles the API object into its spawned inference processes.
    class EncoderAPI(ls.LitAPI):  # type: ignore[misc,name-defined]
        def __init__(self, model_dir: str, max_batch_size: int, batch_timeout_s: float, seq_len: int) -> None:
            super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout_s)
            self.model_dir = model_dir
            self.batch_limit = max_batch_size
            self.seq_len = seq_len

        def setup(self, device: str) -> None:
            from converter.bundle import load_bundle
            from converter.providers import SessionOptions
            from converter.session import EncoderSession
            from service.engine.base import batch_buckets

            kind, _, index = device.partition(":")
            provider = "cuda" if kind == "cuda" else "cpu"
            self.buckets = batch_buckets(self.batch_limit)
            options = SessionOptions(
                provider=provider, batch_buckets=self.buckets, seq_lens=(self.seq_len,), device_id=int(index or 0)
            )
            self.session = EncoderSession(load_bundle(self.model_dir), options)
            self.session.warmup()

        # No annotation on purpose: LitServe reads it, and only an unannotated (or Request) parameter gets the
        # parsed JSON body; any other type becomes a FastAPI parameter of that type (Any: a query parameter).
        def decode_request(self, request):  # type: ignore[no-untyped-def]
            dtype = DTYPES[request["dtype"]]
            return np.frombuffer(base64.b64decode(request["data"]), dtype=dtype).reshape(request["shape"])

        def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
            return np.stack(inputs)

        def predict(self, x: np.ndarray) -> np.ndarray:
            if x.ndim == 2:  # max_batch_size 1: LitServe does not batch
                return self.predict(x[np.newaxis])[0]
            bucket = next((b for b in self.buckets if b >= x.shape[0]), x.shape[0])
            out = self.session.run(pad_to(bucket, x))[: x.shape[0]]
            return out.astype(np.float16, copy=False)

        def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
            return list(output)

        def encode_response(self, output: np.ndarray) -> dict[str, Any]:
            data = base64.b64encode(np.ascontiguousarray(output).tobytes()).decode("ascii")
            return {"shape": list(output.shape), "dtype": "float16", "data": data}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8003)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    parser.add_argument("--api-servers", type=int, default=1, help="uvicorn API processes (the 'workers')")
    parser.add_argument("--workers-per-device", type=int, default=2, help="inference processes")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-timeout-ms", type=float, default=5.0)
    parser.add_argument("--seq-len", type=int, default=196)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    if ls is None:
        sys.stderr.write("litserve is not installed: `pip install litserve` to benchmark it\n")
        return 3
    api = EncoderAPI(args.model_dir, args.max_batch_size, args.batch_timeout_ms / 1000.0, args.seq_len)
    server = ls.LitServer(api, accelerator=args.device, devices=1, workers_per_device=args.workers_per_device)
    server.run(
        host=args.host,
        port=args.port,
        num_api_servers=args.api_servers,
        generate_client_file=False,
        log_level=args.log_level,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
