"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService``, as tritonclient.grpc speaks it.

A thin servicer on grpcio's asyncio server, in the same event loop as the HTTP app of its worker: each RPC turns
its message into the protocol's types (:mod:`service.oip.grpc_codec`), calls the transport-neutral OIP data plane
(the same admission, checks, batcher, engine, metrics and statistics as REST) and maps domain errors to status
codes (:mod:`service.oip.grpc_status`). The stubs are the generated ones tritonclient ships, so the wire is
exactly the one its clients expect.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from service.cudashm import CudaSharedMemory
from service.dataplane import admitted
from service.errors import BadRequest, describe
from service.oip import dataplane as oip
from service.oip import grpc_codec as codec
from service.oip.grpc_status import NotEnabled, status_for
from service.shm.registry import SystemSharedMemory
from service.state import ServiceState

log = logging.getLogger(__name__)
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]


def rpc(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Domain errors -> their status code; anything else -> INTERNAL, logged (by :func:`status_for`)."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        try:
            return await method(self, request, context)
        except Exception as exc:
            spec = status_for(exc)
            await context.abort(spec.code, describe(exc))
            raise  # abort raised already; this only tells type checkers that nothing is returned

    return wrapper


def not_enabled(what: str) -> NotEnabled:
    return NotEnabled(f"{what} is not enabled on this server (see --shared-memory)")


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService``. RPCs not overridden here answer UNIMPLEMENTED (the stub's default):
    repository control, trace and log settings, streaming inference."""

    def __init__(self, state: ServiceState) -> None:
        self._state = state

    @rpc
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=oip.server_live(self._state) is None)

    @rpc
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=oip.server_ready(self._state) is None)

    @rpc
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        reason = oip.model_ready(self._state, request.name, request.version or None)
        return pb.ModelReadyResponse(ready=reason is None)

    @rpc
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return codec.server_metadata(oip.server_metadata(self._state.settings))

    @rpc
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        return codec.model_metadata(oip.model_metadata(self._state, request.name, request.version or None))

    @rpc
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        return codec.model_config(oip.model_config(self._state, request.name, request.version or None))

    @rpc
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        values = oip.model_stats(self._state, request.name or None, request.version or None)
        return codec.model_statistics(values)

    async def ModelInfer(self, request: codec.ParsedInfer, context: grpc.aio.ServicerContext) -> Any:
        """Every call is counted once in ``encoder_requests_total`` by outcome, as ``/encode`` counts its own."""
        started = time.perf_counter()
        arrived = time.monotonic()
        outcome = "error"
        try:
            if request.error is not None:
                raise BadRequest(request.error)
            # An unknown model costs nothing to find out, so it is NOT_FOUND even under overload (as in REST).
            oip.check_model(self._state.settings, request.message.model_name, request.message.model_version or None)
            with admitted(self._state):  # the same in-flight bound as every HTTP inference route
                answer = await self._infer(request, context, arrived)
            outcome = "ok"
            return answer
        except asyncio.CancelledError:
            outcome = "cancelled"  # the client cancelled or its deadline passed: grpc cancels the handler
            raise
        except Exception as exc:
            spec = status_for(exc)
            outcome = spec.outcome
            await context.abort(spec.code, describe(exc))
        finally:
            self._state.metrics.observe_request(outcome, time.perf_counter() - started)

    async def _infer(
        self, request: codec.ParsedInfer, context: grpc.aio.ServicerContext, arrived: float
    ) -> codec.EncodedInfer:
        req = codec.infer_request(request.message, request.raw)
        deadline = arrived + self._budget_s(context)
        answer = await oip.infer(self._state, req, self._state.shared_memory, deadline, arrived)
        return codec.encode_infer_response(answer)  # the bytes are copied once, by grpc's serializer

    def _budget_s(self, context: grpc.aio.ServicerContext) -> float:
        """The client's gRPC deadline, capped by the server's default; the request's ``timeout`` parameter
        (microseconds, as Triton) is applied by the data plane, the earlier one winning."""
        budget_s = self._state.settings.request_timeout_ms / 1000.0
        remaining = context.time_remaining()
        return budget_s if remaining is None else min(budget_s, max(0.0, remaining))

    def _registry(self) -> SystemSharedMemory:
        registry = self._state.shared_memory
        if not isinstance(registry, SystemSharedMemory):
            raise not_enabled("the system shared-memory extension")
        return registry

    @rpc
    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Any
    ) -> pb.SystemSharedMemoryStatusResponse:
        return codec.system_shm_status(self._registry().status(request.name or None))

    @rpc
    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Any
    ) -> pb.SystemSharedMemoryRegisterResponse:
        registry = self._registry()
        oip.register_system_region(self._state, registry, request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @rpc
    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Any
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self._registry().unregister(request.name or None)  # no name: every region, as in Triton
        return pb.SystemSharedMemoryUnregisterResponse()

    def _cuda(self) -> CudaSharedMemory:
        registry = self._state.cuda_shared_memory
        if registry is None:
            raise not_enabled("the CUDA shared-memory extension")
        return registry

    @rpc
    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: Any
    ) -> pb.CudaSharedMemoryStatusResponse:
        return codec.cuda_shm_status(self._cuda().status(request.name or None))

    @rpc
    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: Any
    ) -> pb.CudaSharedMemoryRegisterResponse:
        registry = self._cuda()
        # Opening a handle (and, the first time, this worker's CUDA context) takes a while: off the event loop.
        await asyncio.to_thread(
            registry.register, request.name, request.raw_handle, request.device_id, request.byte_size
        )
        return pb.CudaSharedMemoryRegisterResponse()

    @rpc
    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: Any
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        await asyncio.to_thread(self._cuda().unregister, request.name or None)  # no name: every region
        return pb.CudaSharedMemoryUnregisterResponse()


class _Captured:
    """Stands in for the server while the generated code registers its handlers, so they can be amended."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same handlers arrive through add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.service, self.handlers = service, dict(handlers)


def add_servicer(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """The generated registration (every method's name and messages), with ``ModelInfer``'s (de)serializers
    replaced by the codec's zero-copy ones (see :mod:`service.oip.grpc_codec`)."""
    captured = _Captured()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, captured)
    handlers = captured.handlers
    handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
        servicer.ModelInfer,
        request_deserializer=codec.parse_infer_request,
        response_serializer=codec.serialize_infer_response,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(captured.service, handlers),))
    server.add_registered_method_handlers(captured.service, handlers)


class GrpcServer:
    """The gRPC listener of one worker process; ``start``/``stop`` from the app's lifespan, in its event loop.

    With several workers each one binds the same port with SO_REUSEPORT and the kernel spreads connections over
    them (a gRPC connection, and so a client channel, stays on the worker that accepted it). With one worker
    the option stays off, so a port that is taken is an error at start rather than a silent second listener.
    """

    def __init__(self, servicer: InferenceServicer, host: str, port: int, reuse_port: bool, max_message_bytes: int):
        self._servicer = servicer
        self._address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._options = [
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            ("grpc.max_receive_message_length", max_message_bytes),
            # Answers are bounded by what the client sent (the input's size and datatype) or registered as shared
            # memory; a send limit could only fail an answer already computed.
            ("grpc.max_send_message_length", -1),
        ]
        self._server: grpc.aio.Server | None = None
        self.port: int | None = None

    async def start(self) -> int:
        server = grpc.aio.server(options=self._options)
        add_servicer(self._servicer, server)
        self.port = server.add_insecure_port(self._address)  # raises when the address cannot be bound
        await server.start()
        self._server = server
        log.info("gRPC (Open Inference Protocol) listening on port %s", self.port)
        return self.port

    async def stop(self, grace_s: float) -> None:
        """No new calls from now on; calls in flight get ``grace_s`` to finish, then are cancelled."""
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None


async def start_grpc(state: ServiceState) -> GrpcServer | None:
    """This worker's gRPC listener on ``--grpc-port`` (None when it is 0); every worker of ``--workers N``
    binds the same port."""
    settings = state.settings
    if settings.grpc_port == 0:
        return None
    servicer, reuse_port = InferenceServicer(state), settings.workers > 1
    server = GrpcServer(servicer, settings.host, settings.grpc_port, reuse_port, settings.max_body_bytes)
    await server.start()
    return server
