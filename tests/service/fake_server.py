"""A real uvicorn server around a slow FakeEngine: ``python -m tests.service.fake_server --port N``."""

from __future__ import annotations

import argparse

import uvicorn

from service.app import create_app
from service.engine.fake import FakeEngine
from service.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-s", type=float, default=1.0)
    args = parser.parse_args()
    settings = Settings(host="127.0.0.1", port=args.port, grpc_port=0, max_delay_ms=0, provider="cpu")
    app = create_app(settings, engine=FakeEngine(dim=8, delay_s=args.delay_s))
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")


if __name__ == "__main__":
    main()
