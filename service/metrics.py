"""Every Prometheus object of the service, and the adapter the batcher reports through.

With several worker processes, prometheus_client's multiprocess mode is used: ``__main__`` points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before the workers start, each worker writes its own
files there, and ``/metrics`` on any worker aggregates all of them. ``/metrics`` never fails for that
directory's sake: if it vanished (a /tmp cleaner, another suite's cleanup), the worker recreates it and, until
the aggregate can be read again, answers with its own values.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ParamSpec

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from service.batching.observer import BatchStats

if TYPE_CHECKING:
    from service.engine.devices import DeviceStatus

log = logging.getLogger(__name__)
P = ParamSpec("P")

OUTCOMES = ("ok", "invalid", "overloaded", "timeout", "cancelled", "error", "unavailable")
DROP_REASONS = ("cancelled", "timeout")
UNREAD_BODY_RESULTS = ("drained", "limit", "disconnected")  # service.api.early.RESULTS
SHM_PATHS = ("direct", "copied")  # service.engine.direct: DIRECT, COPIED
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZE_BUCKETS = tuple(float(1 << i) for i in range(13))  # 1 .. 4096, powers of two
CONTENT_TYPE = CONTENT_TYPE_LATEST


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def multiprocess_enabled() -> bool:
    return multiprocess_dir() is not None


def _identity(path: str | None) -> tuple[int, int] | None:
    """(device, inode) of a directory, None if it is missing: a recreated directory is not the same one."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def never_raises(method: Callable[P, None]) -> Callable[P, None]:
    """Metrics are never worth a failed request: log and go on."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            method(*args, **kwargs)
        except Exception:
            log.warning("recording metric %s failed", method.__name__, exc_info=True)

    return wrapper


def bucket_label(samples: int, buckets: tuple[int, ...]) -> str:
    """The batch-size label: the smallest bucket holding ``samples``, so label values stay a small fixed set."""
    return str(next((b for b in buckets if b >= samples), buckets[-1]))


class Metrics:
    """The service's metrics on a registry of their own (so several apps can live in one test process)."""

    def __init__(self, multiprocess_mode: bool | None = None) -> None:
        # `*_created` series double the page and no dashboard or alert reads them. The switch is process-wide
        # in prometheus_client; every Metrics instance wants the same, so flipping it here is harmless.
        disable_created_metrics()
        self.multiprocess = multiprocess_enabled() if multiprocess_mode is None else multiprocess_mode
        # Read once: the page must not depend on the environment staying as it was at start.
        self.multiprocess_dir = multiprocess_dir() if self.multiprocess else None
        if self.multiprocess_dir is not None:
            # A worker (re)started after the directory vanished would otherwise fail creating its value files.
            os.makedirs(self.multiprocess_dir, exist_ok=True)
        self._dir_identity = _identity(self.multiprocess_dir)
        self._aggregate_lost = False
        self._engines: EngineCollector | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("encoder_requests", "inference requests by outcome", ["outcome"], registry=r)
        self.request_latency = Histogram(
            "encoder_request_duration_seconds", "inference latency to the answer", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "encoder_queue_wait_seconds", "a request chunk's wait for its batch", buckets=LATENCY_BUCKETS, registry=r
        )
        # Engine-side batch metrics carry the device (a GPU ordinal, "cpu" or "cpuN": bounded by --devices).
        self.inference = Histogram(
            "encoder_inference_duration_seconds",
            "engine time per batch, by batch-size bucket and device",
            ["batch_size", "device"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "encoder_batch_size",
            "samples per engine batch (before padding)",
            ["device"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.worker_batch_size = Histogram(
            "encoder_worker_batch_size",
            "samples per batch a worker sends to the engine processes (with --workers and engine processes)",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.samples = Counter(
            "encoder_samples_processed", "samples computed (rate() = throughput)", ["device"], registry=r
        )
        self.padding = Counter(
            "encoder_padding_samples", "padding rows added to reach a bucket size", ["device"], registry=r
        )
        self.batch_failures = Counter("encoder_batch_failures", "engine batches that raised", ["device"], registry=r)
        self.dropped = Counter(
            "encoder_dropped_requests", "requests dropped from the queue before compute", ["reason"], registry=r
        )
        self.queue_depth = Gauge(
            "encoder_queue_depth", "requests waiting for a batch", multiprocess_mode="livesum", registry=r
        )
        self.batcher_alive = Gauge(
            "encoder_batcher_alive",
            "1 while the batching loop runs (min over workers)",
            multiprocess_mode="livemin",
            registry=r,
        )
        self.model_info = Gauge(
            "encoder_model_info",
            "the loaded model (value 1)",
            ["model", "provider", "dtype", "dim", "max_seq_len", "max_batch_size"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.unread_bodies = Counter(
            "encoder_unread_bodies",
            "answers given before the request body was read, by what became of the rest: drained (read and "
            "dropped, the client could read its answer), limit (cut off at --discard-body-bytes/-s), disconnected",
            ["result"],
            registry=r,
        )
        self.shm_requests = Counter(
            "encoder_shm_requests",
            "requests served with shared memory, by path: direct (the engine process read and wrote the client's "
            "regions itself) or copied (through this worker's batch and the engine's arena)",
            ["path"],
            registry=r,
        )
        # Labelled children looked up once: labels() costs a lock and a dict lookup on every request.
        self._requests_by_outcome = {outcome: self.requests.labels(outcome=outcome) for outcome in OUTCOMES}
        for reason in DROP_REASONS:
            self.dropped.labels(reason=reason)
        for result in UNREAD_BODY_RESULTS:
            self.unread_bodies.labels(result=result)
        self._shm_by_path = {path: self.shm_requests.labels(path=path) for path in SHM_PATHS}

    @never_raises
    def observe_request(self, outcome: str, seconds: float) -> None:
        counter = self._requests_by_outcome.get(outcome) or self.requests.labels(outcome=outcome)
        counter.inc()
        self.request_latency.observe(seconds)

    @never_raises
    def observe_shm_request(self, path: str) -> None:
        self._shm_by_path[path].inc()

    @never_raises
    def observe_unread_body(self, result: str) -> None:
        self.unread_bodies.labels(result=result).inc()

    @never_raises
    def set_model(self, info: dict[str, Any]) -> None:
        self.model_info.labels(**{k: str(v) for k, v in info.items()}).set(1)

    def observer(self, buckets: tuple[int, ...], batches: bool = True, device: str = "cpu") -> MetricsObserver:
        """The batcher's (or engine process's) observer; ``batches`` with the ``device`` they run on."""
        return MetricsObserver(self, buckets, batches, device)

    def watch_engines(self, status: Callable[[], list[DeviceStatus]]) -> None:
        """Export the supervised engine processes' state (read from the engine board at every scrape)."""
        self._engines = EngineCollector(status)
        self.registry.register(self._engines)

    def render(self) -> bytes:
        if self.multiprocess and not self._aggregate_lost:
            try:
                return self._render_all_workers()
            except Exception as exc:
                # A failed scrape teaches nothing; this worker's own values (still in its mmapped files, even if
                # they were unlinked) are a partial but honest answer, and the warning says why.
                log.warning("cannot aggregate worker metrics (%s): serving this worker's own values", exc)
        return generate_latest(self.registry)

    def _render_all_workers(self) -> bytes:
        path = self.multiprocess_dir
        if path is None or _identity(path) != self._dir_identity:
            # The other workers' files went with the directory: an aggregate would be silently wrong from now
            # on, so this worker reports its own values for good. Recreated for workers started later (another
            # worker may already have done so: the identity check sees through that).
            self._aggregate_lost = True
            if path is not None:
                os.makedirs(path, exist_ok=True)
            raise FileNotFoundError(f"the multiprocess metrics directory {path!r} is missing")
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=path)
        if self._engines is not None:  # not in the multiprocess files: every worker reads the same board
            registry.register(self._engines)
        return generate_latest(registry)

    @never_raises
    def close(self) -> None:
        """A worker going away: its live gauges leave the aggregate."""
        if self.multiprocess_dir is not None and os.path.isdir(self.multiprocess_dir):
            multiprocess.mark_process_dead(os.getpid(), self.multiprocess_dir)


def forget_process(pid: int) -> None:
    """A process that died without :meth:`Metrics.close` (a killed engine process): its live gauges leave the
    aggregate; its counters stay, so totals do not drop."""
    directory = multiprocess_dir()
    if directory is not None and os.path.isdir(directory):
        multiprocess.mark_process_dead(pid, directory)


class EngineCollector:
    """``encoder_engine_up{device}`` and ``encoder_engine_restarts_total{device}`` from the engine board."""

    def __init__(self, status: Callable[[], list[DeviceStatus]]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("encoder_engine_up", "1 while the device's engine process serves", labels=["device"])
        restarts = CounterMetricFamily(
            "encoder_engine_restarts", "times the device's engine process was restarted", labels=["device"]
        )
        for device in self._status():
            up.add_metric([device.device], 1.0 if device.up else 0.0)
            restarts.add_metric([device.device], float(device.restarts))
        yield up
        yield restarts


class MetricsObserver:
    """The batcher's :class:`~service.batching.observer.BatcherObserver`, writing into :class:`Metrics`."""

    def __init__(self, metrics: Metrics, buckets: tuple[int, ...], batches: bool = True, device: str = "cpu") -> None:
        """``batches=False``: record queue waits only; a shared engine process records the batches it runs."""
        self._m = metrics
        self._buckets = buckets
        self._batches = batches
        if batches:  # no series of a device this process does not run batches on
            # Children looked up once, not per batch; every label value exists from the start, so rate() works.
            self._inference = {b: metrics.inference.labels(batch_size=str(b), device=device) for b in buckets}
            self._batch_size = metrics.batch_size.labels(device=device)
            self._samples = metrics.samples.labels(device=device)
            self._padding = metrics.padding.labels(device=device)
            self._failures = metrics.batch_failures.labels(device=device)

    def on_batch(self, stats: BatchStats) -> None:
        m = self._m
        for wait in stats.queue_waits_s:
            m.queue_wait.observe(wait)
        if not self._batches:
            self._m.worker_batch_size.observe(stats.samples)
            return
        self._batch_size.observe(stats.samples)
        if stats.failed:
            self._failures.inc()
            return
        self._inference[int(bucket_label(stats.samples, self._buckets))].observe(stats.compute_s)
        self._samples.inc(stats.samples)
        self._padding.inc(stats.padded - stats.samples)

    def on_dropped(self, reason: str, count: int) -> None:
        self._m.dropped.labels(reason=reason).inc(count)

    def on_queue_depth(self, depth: int) -> None:
        self._m.queue_depth.set(depth)

    def on_alive(self, alive: bool) -> None:
        self._m.batcher_alive.set(1 if alive else 0)
