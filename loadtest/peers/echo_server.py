"""The I/O ceiling: a bare FastAPI ``/encode`` that decodes the raw body with numpy and re-encodes it.

Same wire format as the service's raw path (``X-Shape``, ``X-Dtype``, ``application/octet-stream``) and the
same uvicorn worker model, but no model, no batching, no metrics: whatever the service spends beyond this is
its own overhead. ``python -m loadtest.peers.echo_server --port 8001 --workers 8``
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

RAW = "application/octet-stream"
DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}


def create_app() -> FastAPI:
    app = FastAPI(title="echo")

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/encode")
    async def encode(request: Request) -> Response:
        body = await request.body()
        try:
            shape = tuple(int(n) for n in request.headers["x-shape"].split(","))
            dtype = DTYPES[request.headers["x-dtype"].strip().lower()]
        except (KeyError, ValueError):
            return JSONResponse({"error": "X-Shape and X-Dtype (float16|float32) are required"}, status_code=422)
        if len(body) != math.prod(shape) * dtype.itemsize:
            return JSONResponse({"error": "body length does not match X-Shape"}, status_code=422)
        # The same decode -> array -> encode steps the service does, minus the model in between.
        array = np.frombuffer(body, dtype=dtype).reshape(shape)
        out = np.ascontiguousarray(array).tobytes()
        headers = {"X-Shape": ",".join(map(str, array.shape)), "X-Dtype": dtype.name}
        return Response(out, media_type=RAW, headers=headers)

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    uvicorn.run(
        "loadtest.peers.echo_server:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
