"""What a user writes first: FastAPI + PyTorch eager, one request = one forward pass, no batching.

Loads the same seeded default weights as the bundle (``converter.model.default_model`` with the bundle's
dims), fp16 on CUDA (fp32 on the CPU, where fp16 is slow and not what anyone would deploy). Speaks the raw
wire format of the service. Configured through ``NAIVE_*`` variables so every uvicorn worker can read it.
``python -m loadtest.peers.naive_torch --port 8002 --workers 4 --model-dir bundles/fp16 --device cuda``
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request, Response

from converter.model import EncoderDims, default_model
from loadtest.peers.wire import decode_raw, encode_raw, peer_app, peer_parser, serve


def model_dims(model_dir: str | None) -> EncoderDims:
    if not model_dir:
        return EncoderDims()
    from converter.bundle import load_bundle

    dims = load_bundle(Path(model_dir)).manifest["dims"]
    return EncoderDims(int(dims["dim"]), int(dims["heads"]), int(dims["ffn"]))


def create_app() -> FastAPI:
    device = torch.device(os.environ.get("NAIVE_DEVICE", "cuda"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        model = default_model(model_dims(os.environ.get("NAIVE_MODEL_DIR"))).to(device=device, dtype=dtype).eval()
        with torch.inference_mode():  # one warm-up pass: cuBLAS handles, kernels chosen
            model(torch.zeros(1, 196, model.norm1.normalized_shape[0], device=device, dtype=dtype))
        state["model"] = model
        yield

    app = peer_app("naive-torch", lifespan=lifespan)

    @app.post("/encode")
    async def encode(request: Request) -> Response:
        array = await decode_raw(request)
        if isinstance(array, Response):
            return array
        # Inline in the event loop, as most first versions are: the forward pass blocks this worker.
        with torch.inference_mode():
            x = torch.from_numpy(array.copy()).to(device=device, dtype=dtype)
            batch = x if x.dim() == 3 else x.unsqueeze(0)
            y = state["model"](batch)
            y = y if x.dim() == 3 else y[0]
            return encode_raw(y.to(torch.float16 if array.itemsize == 2 else torch.float32).cpu().numpy())

    return app


def main(argv: list[str] | None = None) -> int:
    parser = peer_parser(__doc__, 8002)
    parser.add_argument("--model-dir", help="bundle whose dims to use (default 768/12/3072)")
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    args = parser.parse_args(argv)
    os.environ["NAIVE_DEVICE"] = args.device  # the workers' app factory reads these
    if args.model_dir:
        os.environ["NAIVE_MODEL_DIR"] = str(args.model_dir)
    return serve("loadtest.peers.naive_torch:create_app", args)


if __name__ == "__main__":
    sys.exit(main())
