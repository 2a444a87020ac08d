"""The I/O ceiling: a bare FastAPI ``/encode`` that decodes the raw body with numpy and re-encodes it.

Same wire format as the service's raw path (``X-Shape``, ``X-Dtype``, ``application/octet-stream``) and the
same uvicorn worker model, but no model, no batching, no metrics: whatever the service spends beyond this is
its own overhead. ``python -m loadtest.peers.echo_server --port 8001 --workers 8``
"""

from __future__ import annotations

import sys

from fastapi import FastAPI, Request, Response

from loadtest.peers.wire import decode_raw, encode_raw, peer_app, peer_parser, serve


def create_app() -> FastAPI:
    app = peer_app("echo")

    @app.post("/encode")
    async def encode(request: Request) -> Response:
        # The same decode -> array -> encode steps the service does, minus the model in between.
        array = await decode_raw(request)
        return array if isinstance(array, Response) else encode_raw(array)

    return app


def main(argv: list[str] | None = None) -> int:
    return serve("loadtest.peers.echo_server:create_app", peer_parser(__doc__, 8001).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
