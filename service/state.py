"""What every protocol adapter sees of the running service: settings, metrics, engine, batcher, readiness."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from service.batching.batcher import Batcher
from service.engine.base import Engine
from service.engine.devices import DeviceStatus, local_label
from service.errors import NotReady
from service.metrics import Metrics
from service.oip.stats import ModelStats
from service.oip.types import SharedMemory
from service.settings import Settings

if TYPE_CHECKING:
    from service.cudashm import CudaSharedMemory


@dataclass
class ServiceState:
    """What the routes see. ``engine``/``batcher`` appear once loading and warm-up finished."""

    settings: Settings
    metrics: Metrics
    engine: Engine | None = None
    batcher: Batcher | None = None
    draining: bool = False
    in_flight: int = 0  # inference requests admitted and not answered yet (bounds memory: see dataplane.admitted)
    load_error: str | None = None
    oip_stats: ModelStats = field(default_factory=ModelStats)  # the OIP statistics extension (this worker)
    shared_memory: SharedMemory | None = None  # the OIP shared-memory registry, when --shared-memory enables one
    cuda_shared_memory: CudaSharedMemory | None = None  # the CUDA shared-memory registry, with --shared-memory cuda
    # Whether this process was asked to stop in a way the app does not see while it starts (a worker's
    # supervisor sets a drain deadline; service/drain.py wires it): a start-up that waits gives up.
    told_to_stop: Callable[[], bool] = lambda: False

    def start_draining(self) -> None:
        """SIGTERM arrived: /readyz turns 503 (requests that still arrive are served)."""
        self.draining = True

    def stopping(self) -> bool:
        """Draining or told to stop: what a start-up that waits (for an engine process) checks."""
        return self.draining or self.told_to_stop()

    def fatal_error(self) -> str | None:
        """Why this process can never serve again (only a restart helps), if so."""
        if self.load_error is not None:
            return f"the model failed to load: {self.load_error}"
        if self.batcher is not None and self.batcher.failure is not None:
            return f"the batching loop died: {self.batcher.failure}"
        return None

    def not_ready_reason(self) -> str | None:
        """Why /readyz says 503. Draining counts here, so load balancers stop routing new work to us."""
        fatal = self.fatal_error()
        if fatal is not None:
            return fatal
        if self.draining:
            return "the service is shutting down"
        reason = self.cannot_serve_reason()
        if reason is None and not any(device.up for device in self.device_status()):
            down = ", ".join(device.device for device in self.device_status())
            return f"no engine process serves: device(s) {down} down (restarting)"
        return reason

    def device_status(self) -> list[DeviceStatus]:
        """The devices that serve and those that do not (for /readyz, /v1/models, the OIP metadata): the engine
        processes as their supervisor reports them, or the engine in this process."""
        engine = self.engine
        if engine is None:
            return []
        status = getattr(engine, "device_status", None)
        if status is not None:
            return list(status())
        alive = self.batcher is not None and self.batcher.alive
        return [DeviceStatus(local_label(self.settings, engine.provider), alive)]

    def cannot_serve_reason(self) -> str | None:
        """Why /encode cannot be answered. Not draining: during the drain window requests that still arrive
        (the balancer has not noticed yet) are served, not failed."""
        fatal = self.fatal_error()
        if fatal is not None:
            return fatal
        if self.engine is None or self.batcher is None:
            return "the model is loading and warming up"
        if not self.batcher.alive:
            return "the batching loop is not running"
        return None

    def ready_parts(self) -> tuple[Engine, Batcher]:
        reason = self.cannot_serve_reason()
        if reason is not None:
            raise NotReady(reason)
        assert self.engine is not None and self.batcher is not None
        return self.engine, self.batcher
