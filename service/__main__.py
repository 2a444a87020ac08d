"""``python -m service`` / ``encoder-serve``: flags -> Settings -> uvicorn.

Every flag is also an environment variable (``--max-batch-size`` = ``ENCODER_MAX_BATCH_SIZE``); a flag
wins over its variable. Without ``--model-dir`` the built-in default model is converted once (in a
subprocess, into a cache) and reused afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from pydantic import ValidationError

from service.engine.devices import Device, uses_engine_processes
from service.engine.devices import resolve as resolve_devices
from service.settings import ENV_PREFIX, Settings

if TYPE_CHECKING:
    from service.engine.base import Engine

log = logging.getLogger("service")
_FLAG_TYPES: dict[str, Any] = {
    "port": int,
    "grpc_port": int,
    "model_dir": Path,
    "max_batch_size": int,
    "max_delay_ms": float,
    "max_queue": int,
    "request_timeout_ms": float,
    "max_body_bytes": int,
    "max_shared_memory_bytes": int,
    "max_shared_memory_regions": int,
    "discard_body_bytes": int,
    "discard_body_s": float,
    "keep_alive_s": float,
    "workers": int,
    "cache_dir": Path,
    "drain_s": float,
    "graceful_timeout_s": float,
    "fake_delay_ms": float,
    "fake_sample_delay_ms": float,
    "engine_restart_limit": int,
    "engine_restart_window_s": float,
    "engine_restart_backoff_s": float,
    "engine_restart_backoff_max_s": float,
    "in_flight_batches": int,
    "spread_ratio": float,
}
_CHOICES = {
    "provider": ("auto", "tensorrt", "cuda", "cpu"),
    "log_level": ("critical", "error", "warning", "info", "debug"),
    "engine": ("onnx", "fake"),
    "shared_engine": ("auto", "on", "off"),
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
    if settings.engine == "fake":
        return settings  # test-only: no model at all
    from converter.bundle import load_bundle
    from service.engine.default_bundle import ensure_default_bundle

    if settings.model_dir is not None:
        load_bundle(settings.model_dir)
        return settings
    path = ensure_default_bundle(settings.provider, settings.cache_dir)
    return settings.model_copy(update={"model_dir": path})


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's keyword arguments for ``settings`` (shared with loadtest/bench_overhead.py)."""
    common: dict[str, Any] = {"host": settings.host, "port": settings.port, "log_level": settings.log_level}
    common["timeout_graceful_shutdown"] = settings.graceful_timeout_s
    common["access_log"] = settings.access_log
    common["timeout_keep_alive"] = settings.keep_alive_s  # uvicorn's default of 5 s races proxies' reuse
    return common


def serve(settings: Settings, devices: tuple[Device, ...] | None = None) -> None:
    common = uvicorn_options(settings)
    devices = devices if devices is not None else resolve_devices(settings)
    if uses_engine_processes(settings, devices, uses_shared_engine(settings)):
        serve_with_engine_processes(settings, devices, common)
        return
    if settings.workers == 1:
        serve_one(settings, common)
        return
    # Several processes: each worker rebuilds the settings from the environment; metrics go through
    # prometheus_client's multiprocess files, set up before any worker imports it. The supervisor drains all
    # workers on one clock (service/drain.py), then they finish their accepted requests.
    from service.drain import run_workers

    with worker_environment(settings, devices[0].environment() if devices[0].on_gpu else {}):
        log.info("%s workers, each with its own engine", settings.workers)
        run_workers(settings, common)


def serve_with_engine_processes(settings: Settings, devices: tuple[Device, ...], common: dict[str, Any]) -> None:
    """One engine process per device, warm before any worker starts and restarted when it dies; the workers
    attach to all of them. Exits 1 when an engine kept dying (the orchestrator replaces the pod). The engines
    stop after the workers: every request a worker accepted during the drain is computed first."""
    from service.drain import run_workers
    from service.engine.supervisor import RestartPolicy, supervised

    labels = ", ".join(device.label for device in devices)
    log.info("%s worker(s) over %s engine process(es) on device(s) %s", settings.workers, len(devices), labels)
    with worker_environment(settings), supervised(devices, RestartPolicy.from_settings(settings)) as supervisor:
        os.environ[ENV_PREFIX + "ENGINE_DIR"] = supervisor.directory
        if settings.workers == 1:
            serve_one(settings.model_copy(update={"engine_dir": supervisor.directory}), common)
        else:
            run_workers(settings, common)
    if supervisor.gave_up is not None:
        log.error("exiting with status 1: %s", supervisor.gave_up)
        raise SystemExit(1)


def uses_shared_engine(settings: Settings) -> bool:
    """``--shared-engine auto``: on with a GPU, off on the CPU.

    Measured (BENCHMARKS.md): on an H100 one engine process serves 8 workers at saturation as fast as
    per-worker engines with a lower p50 and one CUDA context and model copy instead of eight (4-14 % slower
    below saturation); on the CPU the extra process hop costs 60-120 us of CPU per request and saves nothing,
    since CPU engines share no device.
    """
    if settings.shared_engine != "auto":
        return settings.shared_engine == "on"
    if settings.provider in ("cuda", "tensorrt"):
        return True
    if settings.provider == "cpu":
        return False
    from converter.devices import cuda_device_count

    return cuda_device_count() > 0


def serve_one(settings: Settings, common: dict[str, Any], engine: Engine | None = None) -> None:
    """One worker in this process; ``engine`` is for benchmarks (e.g. a no-op engine), else the lifespan builds it."""
    from service.app import create_app
    from service.server import DrainingServer

    app = create_app(settings, engine)
    state = app.state.service
    server = DrainingServer(uvicorn.Config(app, **common), on_drain=state.start_draining, drain_s=settings.drain_s)
    server.run()
    if not server.started:
        raise SystemExit(3)  # uvicorn's own "startup failed" status


@contextlib.contextmanager
def worker_environment(settings: Settings, extra: dict[str, str] | None = None) -> Iterator[None]:
    """The workers' environment: settings as ``ENCODER_*`` variables (and ``extra``), a fresh metrics directory
    and, with system shared memory, a fresh registry directory.

    All are undone afterwards. A ``PROMETHEUS_MULTIPROC_DIR`` left pointing at the removed directory made any
    later app in the same process (a test run, an embedding) fail every /metrics scrape with a 500.
    """
    saved = dict(os.environ)
    metrics_dir = tempfile.mkdtemp(prefix="encoder-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    os.environ.update(settings.to_env())
    os.environ.update(extra or {})
    # The shared-memory registry every worker reads: a region registered through one serves them all.
    shm_dir = tempfile.mkdtemp(prefix="encoder-shm-") if settings.shared_memory_kinds else None
    if shm_dir is not None:
        os.environ[ENV_PREFIX + "SHARED_MEMORY_DIR"] = shm_dir
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(metrics_dir, ignore_errors=True)
        if shm_dir is not None:
            shutil.rmtree(shm_dir, ignore_errors=True)


def check_cuda_shared_memory(settings: Settings) -> None:
    """With ``--shared-memory cuda``: the device layer loads and the devices it must serve exist (ValueError
    or RuntimeError, before anything starts)."""
    if "cuda" in settings.shared_memory_kinds:
        from service.cudashm.device import device_memory
        from service.cudashm.devices import device_map

        device_map(settings, device_memory(settings.cuda_memory))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = parse_settings(argv)
    except ValidationError as exc:
        sys.stderr.write(f"error: invalid settings:\n{exc}\n")
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        devices = resolve_devices(settings)
        check_cuda_shared_memory(settings)
        settings = resolve_model(settings)
    except Exception as exc:  # a bad bundle, a failed conversion, no such GPU: one clear line, no traceback
        log.error("cannot serve: %s", exc)
        return 2
    serve(settings, devices)
    return 0


if __name__ == "__main__":
    sys.exit(main())
