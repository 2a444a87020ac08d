"""The application factory and its lifespan: the one place that wires concrete parts together.

With one worker the server answers /healthz at once; the engine is built and warmed up in the background,
and /readyz turns 200 only when that finished and the batcher runs. With several workers each one accepts
connections only once its engine is warm (see the lifespan).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from starlette.types import Receive, Scope, Send

from service.api import early, serving
from service.api.deps import ServiceState
from service.api.errors import install_error_handlers
from service.api.routes import router
from service.batching.batcher import Batcher, BatcherConfig
from service.cudashm.devices import open_cuda_shared_memory
from service.engine.base import Engine
from service.engine.devices import local_label
from service.engine.factory import build_engine
from service.metrics import Metrics
from service.oip import cudashm_rest, shm_rest
from service.oip import rest as oip_rest
from service.oip.grpc_server import start_grpc
from service.oip.stats import StatsObserver
from service.settings import Settings
from service.shm import SystemSharedMemory

log = logging.getLogger(__name__)


def batcher_config(settings: Settings, engine: Engine) -> BatcherConfig:
    max_batch = min(settings.max_batch_size, max(engine.buckets))
    return BatcherConfig(
        max_batch_size=max_batch,
        max_delay_s=settings.max_delay_s,
        max_queue=settings.max_queue,
        pad_buckets=engine.buckets if engine.fixed_shapes else None,
        # An engine in another process can take a second batch while the first one's answer travels back.
        max_in_flight=int(getattr(engine, "concurrency", 1)),
    )


def model_info(engine: Engine, max_batch_size: int) -> dict[str, object]:
    return {
        "model": engine.name,
        "provider": engine.provider,
        "dtype": engine.dtype.name,
        "dim": engine.dim,
        "max_seq_len": engine.max_seq_len,
        "max_batch_size": max_batch_size,
    }


async def bring_up(state: ServiceState, engine: Engine | None) -> None:
    """Build (unless given), warm up on the engine thread, start batching; record any failure for /readyz."""
    batcher: Batcher | None = None
    try:
        if engine is None:
            engine = await asyncio.to_thread(build_engine, state.settings, state.stopping)
        config = batcher_config(state.settings, engine)
        # Behind engine processes this batcher forms worker batches; the engine processes count the real ones.
        local = state.settings.engine_dir is None
        device = local_label(state.settings, engine.provider)
        metrics = state.metrics.observer(engine.buckets, batches=local, device=device)
        observer = StatsObserver(metrics, state.oip_stats)  # also the OIP statistics extension's executions
        batcher = Batcher(engine, config, observer=observer)
        await batcher.warm_up()
        batcher.start()
    except Exception as exc:
        log.exception("loading the model failed")
        state.load_error = f"{type(exc).__name__}: {exc}"
        if batcher is not None:
            await batcher.stop()  # releases the engine thread
        return
    state.metrics.set_model(model_info(engine, config.max_batch_size))
    device_status = getattr(engine, "device_status", None)
    if device_status is not None:
        state.metrics.watch_engines(device_status)
    state.engine, state.batcher = engine, batcher
    log.info("ready: %s on %s, batches up to %s", engine.name, engine.provider, config.max_batch_size)


class EncoderApp(FastAPI):
    """FastAPI, except that ``POST /encode`` goes straight to :func:`serving.encode` (and the Open Inference
    Protocol's ``POST /v2/models/<name>/infer`` to :func:`service.oip.rest.infer`).

    The hot route needs none of what FastAPI wraps around it: it takes the raw request, its state is fixed at
    creation, and ``serving.encode`` turns every error into its JSON answer itself. The middleware stack,
    routing and dependency solving cost about a quarter of a worker's CPU per request under load (py-spy), so
    they are skipped; the FastAPI route stays, for the OpenAPI schema and as the path any other URL form takes.

    Every request with a body, whatever its route, first gets an :class:`early.BodyGuard`: an answer given
    before the body was read (413, 408, 429, 503...) then reaches the client instead of a connection reset.
    """

    discard_limits = early.DiscardLimits(max_bytes=0, max_s=0.0)  # create_app sets the configured ones

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and early.has_body(scope["headers"]):
            guard = early.BodyGuard(receive, send, self.discard_limits)
            receive, send = guard.receive, guard.send
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            if path == "/encode":
                scope["app"] = self  # as Starlette sets it, for anything that reads request.app
                response = await serving.encode(Request(scope, receive), self.state.service)
                await response(scope, receive, send)
                return
            target = oip_rest.infer_target(path)  # the OIP's POST /v2/models/<name>/infer: the same shortcut
            if target is not None:
                scope["app"] = self
                response = await oip_rest.infer(Request(scope, receive), self.state.service, *target)
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def open_shared_memory(settings: Settings) -> SystemSharedMemory | None:
    """The system shared-memory registry when ``--shared-memory`` enables it: the supervisor's directory with
    several workers (every worker sees every region), a private one otherwise."""
    if "system" not in settings.shared_memory_kinds:
        return None
    return SystemSharedMemory(
        settings.shared_memory_dir, settings.max_shared_memory_regions, settings.max_shared_memory_bytes
    )


def system_has(system: SystemSharedMemory | None, name: str) -> bool:
    """Is ``name`` a registered system region (CUDA and system regions share one namespace)?"""
    return system is not None and system.records.read_raw(name) is not None


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """The ASGI app. ``engine`` is for tests (e.g. a FakeEngine); by default the lifespan builds an OnnxEngine."""
    state = ServiceState(settings=settings, metrics=Metrics())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.shared_memory = system = open_shared_memory(settings)
        state.cuda_shared_memory = cuda = open_cuda_shared_memory(settings, lambda name: system_has(system, name))
        loading = asyncio.create_task(bring_up(state, engine), name="encoder-load")
        if settings.workers > 1:
            # Workers share one listening socket and uvicorn accepts only after the lifespan started, so a worker
            # that finishes loading first never receives a request it cannot serve yet.
            await loading
            if state.load_error is not None:
                raise RuntimeError(f"worker cannot serve: {state.load_error}")
        try:
            grpc_server = await start_grpc(state)  # a port that cannot be bound fails the start, loudly
        except BaseException:
            loading.cancel()
            raise
        sweeping = None if cuda is None else asyncio.create_task(cuda.sweep_forever(), name="encoder-cudashm-sweep")
        try:
            yield
        finally:
            state.draining = True
            if grpc_server is not None:
                # After uvicorn finished its HTTP requests: gRPC calls in flight get the same grace.
                await grpc_server.stop(settings.graceful_timeout_s)
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
            if state.batcher is not None:
                # uvicorn already waited for in-flight requests; what is still queued gets its answer too.
                await state.batcher.stop(drain_s=settings.graceful_timeout_s)
            state.metrics.close()
            if isinstance(state.shared_memory, SystemSharedMemory):
                state.shared_memory.close()
            if sweeping is not None:
                sweeping.cancel()
            if state.cuda_shared_memory is not None:
                state.cuda_shared_memory.close()

    app = EncoderApp(title="encoder-service", version="0.1.0", lifespan=lifespan)
    app.state.service = state
    limits = (settings.discard_body_bytes, settings.discard_body_s, state.metrics.observe_unread_body)
    app.discard_limits = early.DiscardLimits(*limits)
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(oip_rest.router)
    app.include_router(shm_rest.router)
    app.include_router(cudashm_rest.router)
    return app


def app_from_env() -> FastAPI:
    """uvicorn factory for worker processes (``--workers N``): settings come from ``ENCODER_*`` variables."""
    return create_app(Settings())
