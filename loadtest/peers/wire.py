"""The raw wire format the peers share with the service: ``X-Shape``/``X-Dtype`` + little-endian bytes."""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

RAW = "application/octet-stream"
DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}


async def decode_raw(request: Request) -> np.ndarray | JSONResponse:
    """The request's array (read-only view of the body), or a 422 answer saying what is wrong."""
    body = await request.body()
    try:
        shape = tuple(int(n) for n in request.headers["x-shape"].split(","))
        dtype = DTYPES[request.headers["x-dtype"].strip().lower()]
    except (KeyError, ValueError):
        return JSONResponse({"error": "X-Shape and X-Dtype (float16|float32) are required"}, status_code=422)
    if len(body) != math.prod(shape) * dtype.itemsize:
        return JSONResponse({"error": "body length does not match X-Shape"}, status_code=422)
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def encode_raw(array: np.ndarray) -> Response:
    headers = {"X-Shape": ",".join(map(str, array.shape)), "X-Dtype": array.dtype.name}
    return Response(np.ascontiguousarray(array).tobytes(), media_type=RAW, headers=headers)


def peer_app(title: str, **kwargs: Any) -> FastAPI:
    """A peer's FastAPI app with the ``/readyz`` the benchmark waits on (ready once the lifespan ran)."""
    app = FastAPI(title=title, **kwargs)

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    return app


def peer_parser(doc: str | None, port: int) -> argparse.ArgumentParser:
    """The flags every peer server shares (it adds its own)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--log-level", default="warning")
    return parser


def serve(factory: str, args: argparse.Namespace) -> int:
    """uvicorn with the app factory ``factory`` (an import string, so ``--workers`` can fork)."""
    uvicorn.run(factory, factory=True, host=args.host, port=args.port, workers=args.workers, log_level=args.log_level)
    return 0
