"""``python -m service.engine.host``: the engine process's start-up, from the service's settings to serving.

It builds the engine (warmed up on the compute thread with ``--engine-thread``), its metrics observer and, with
``--shared-memory cuda``, the table of client CUDA regions, then serves workers with
:class:`~service.engine.host.EngineHost` until the engine breaks (status 1: the supervisor restarts it) or the
process is stopped. Kept apart from the host so that host.py holds only how workers are served.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import threading
import time
from collections.abc import Sequence

from service.engine import host as host_module
from service.engine.base import EngineUnrecoverable
from service.engine.compute import ComputeThread
from service.engine.cuda_regions import CudaRegionTable
from service.engine.host import EngineHost

log = logging.getLogger(__name__)


def _exit_with_parent() -> None:
    """The supervisor owns this process: if it dies (even by SIGKILL), so do we, instead of holding the GPU."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        log.error("the supervisor is gone: the engine process exits")
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    from service.engine.factory import build_engine
    from service.metrics import Metrics
    from service.settings import Settings

    about = host_module.__doc__  # what an engine process is, for --help
    parser = argparse.ArgumentParser(prog="python -m service.engine.host", description=about)
    parser.add_argument("--socket", required=True, help="Unix socket path to listen on")
    parser.add_argument("--device", default="cpu", help="the device's label in metrics (its GPU is the one visible)")
    args = parser.parse_args(argv)
    settings = Settings().model_copy(update={"engine_dir": None})  # the service's ENCODER_* environment
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _exit_with_parent()
    engine = build_engine(settings)
    compute = ComputeThread(engine) if settings.engine_thread else None
    if compute is not None:
        compute.call(engine.warmup)  # its CUDA graphs captured on the thread that will replay them
    else:
        engine.warmup()
    metrics = Metrics()  # with several workers: the same multiprocess directory, so /metrics shows our batches
    observer = metrics.observer(engine.buckets, device=args.device)
    limits = (settings.max_shared_memory_regions, settings.max_shared_memory_bytes)  # the registry's
    cuda_regions = None
    if "cuda" in settings.shared_memory_kinds:
        # The fake layer's "device" memory is host memory any engine reads; real device memory needs the CUDA path.
        if settings.cuda_memory == "fake" or getattr(engine, "reads_device_memory", False):
            from service.cudashm.device import device_memory

            cuda_regions = CudaRegionTable(device_memory(settings.cuda_memory), 0, *limits)  # its GPU: ordinal 0
        else:
            log.warning("CUDA shared memory is served by copying: this engine cannot read device memory")
    batch = min(settings.max_batch_size, max(engine.buckets))
    host = EngineHost(
        engine,
        batch,
        observer,
        args.device,
        *limits,
        cuda_regions=cuda_regions,
        threaded=compute is not None,
        compute=compute,
    )
    log.info(
        "engine process ready: %s on %s (device %s), batches up to %s",
        engine.name,
        engine.provider,
        args.device,
        host.max_batch_size,
    )
    try:
        asyncio.run(host.serve(args.socket))
    except EngineUnrecoverable as exc:
        log.error("the engine is broken for good, exiting: %s", exc)
        return 1
    finally:
        metrics.close()
    return 0
