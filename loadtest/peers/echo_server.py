"""The I/O ceiling: a bare FastAPI ``/encode`` that decodes the raw body with numpy and re-encodes it.

Same wire format as the service's raw path (``X-Shape``, ``X-Dtype``, ``application/octet-stream``) and the
same uvicorn worker model, but no model, no batching, no metrics: whatever the service spends beyond this is
its own overhead. ``python -m loadtest.peers.echo_server --port 8001 --workers 8``
"""

from __future__ import annotations

import argparse
import sys

import uvicorn
from fastapi import FastAPI, Request, Response

from loadtest.peers.wire import decode_raw, encode_raw


def create_app() -> FastAPI:
    app = FastAPI(title="echo")

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/encode")
    async def encode(request: Request) -> Response:
        # The same decode -> array -> encode steps the service does, minus the model in between.
        array = await decode_raw(request)
        return array if isinstance(array, Response) else encode_raw(array)

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
