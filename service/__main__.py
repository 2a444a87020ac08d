"""``python -m service`` / ``encoder-serve``: flags -> Settings -> uvicorn.

Every flag is also an environment variable (``--max-batch-size`` = ``ENCODER_MAX_BATCH_SIZE``); a flag
wins over its variable. Without ``--model-dir`` the built-in default model is converted once (in a
subprocess, into a cache) and reused afterwards.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvicorn
from pydantic import ValidationError

from service.settings import ENV_PREFIX, Settings

log = logging.getLogger("service")
_FLAG_TYPES: dict[str, Any] = {
    "port": int,
    "model_dir": Path,
    "max_batch_size": int,
    "max_delay_ms": float,
    "max_queue": int,
    "request_timeout_ms": float,
    "max_body_bytes": int,
    "workers": int,
    "cache_dir": Path,
}
_CHOICES = {
    "provider": ("auto", "tensorrt", "cuda", "cpu"),
    "log_level": ("critical", "error", "warning", "info", "debug"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = ENV_PREFIX + name.upper()
        help_text = f"{field.description} [env {env}; default {field.default!r}]"
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        # default=None: an absent flag leaves the value to the environment, then to the Settings default.
        parser.add_argument(flag, type=_FLAG_TYPES.get(name, str), choices=_CHOICES.get(name), help=help_text)
    return parser


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    args = vars(build_parser().parse_args(argv))
    return Settings(**{name: value for name, value in args.items() if value is not None})


def resolve_model(settings: Settings) -> Settings:
    """Check ``--model-dir`` now (a clear error beats a server that never gets ready), or convert the default."""
    from converter.bundle import load_bundle
    from service.engine.default_bundle import ensure_default_bundle

    if settings.model_dir is not None:
        load_bundle(settings.model_dir)
        return settings
    path = ensure_default_bundle(settings.provider, settings.cache_dir)
    return settings.model_copy(update={"model_dir": path})


def serve(settings: Settings) -> None:
    common: dict[str, Any] = {"host": settings.host, "port": settings.port, "log_level": settings.log_level}
    if settings.workers == 1:
        from service.app import create_app

        uvicorn.run(create_app(settings), **common)
        return
    # Several processes: each worker rebuilds the settings from the environment and loads its own engine;
    # metrics go through prometheus_client's multiprocess files, set up before any worker imports it.
    metrics_dir = tempfile.mkdtemp(prefix="encoder-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    os.environ.update(settings.to_env())
    try:
        uvicorn.run("service.app:app_from_env", factory=True, workers=settings.workers, **common)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = parse_settings(argv)
    except ValidationError as exc:
        sys.stderr.write(f"error: invalid settings:\n{exc}\n")
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = resolve_model(settings)
    except Exception as exc:  # a bad bundle, a failed conversion: one clear line, no traceback
        log.error("cannot serve: %s", exc)
        return 2
    serve(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
