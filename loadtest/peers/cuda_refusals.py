"""The refusal cases of ``loadtest/verify_cudashm.py``: every bad CUDA shared-memory registration or request
must get a 4xx (gRPC: INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS), never a 5xx.

Each registration case registers region "b"; one that is accepted is unregistered at once, so each case is judged
on its own. A stale handle that CUDA itself still opens (it may: CUDA documents no failure for it) is reported as
that, a failed check with a NOTE line saying why the server cannot tell.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from loadtest.peers.cuda_regions import registered
from loadtest.peers.oip_clients import fixed_inputs

if TYPE_CHECKING:
    from loadtest.verify_cudashm import Checks, Session


def status_of(call: Callable[[], Any]) -> str:
    from tritonclient.utils import InferenceServerException

    try:
        call()
    except InferenceServerException as exc:
        return str(exc.status())
    return "accepted"


STALE_ACCEPTED = "accepted: CUDA opened the handle of freed memory (unregistered again)"
STALE_NOTE = (
    "cudaIpcOpenMemHandle succeeded on a handle whose memory the client had freed, and the server cannot tell: "
    "CUDA calls freeing exported memory before the importer closes it undefined behaviour and offers no call "
    "that tells an importer the exporter freed it. Such a region reads and writes whatever CUDA maps there, within "
    "its registered size. Clients must unregister a region before freeing its memory (README, CUDA shared memory)."
)


def refuse_each(http: Any, checks: Checks, cases: dict[str, tuple[Callable[[], Any], set[str]]]) -> None:
    """Each case registers region "b" and must be refused; one that is accepted is unregistered at once, so the
    next case is judged on its own and not on a duplicate name."""
    for name, (call, wanted) in cases.items():
        got = status_of(call)
        if got == "accepted":
            http.unregister_cuda_shared_memory("b")
            got = STALE_ACCEPTED if "stale" in name else "accepted (unregistered again)"
        checks.record(f"refused: {name}", got in wanted, got)
        if got == STALE_ACCEPTED:
            print(f"NOTE refused: {name}: {STALE_NOTE}")


def check_refusals(s: Session, checks: Checks, gpus: int) -> None:
    x = fixed_inputs(2, s.args.seq, s.dim)
    dev = s.args.device
    region, stale = s.region(x.nbytes), s.region(x.nbytes)
    stale_handle = stale.raw_handle
    stale.free()  # cudaFree: the handle names nothing now
    cases: dict[str, tuple[Callable[[], Any], set[str]]] = {
        "handle of 63 bytes": (
            lambda: s.http.register_cuda_shared_memory("b", base64.b64encode(b"\1" * 63), dev, 64),
            {"422"},
        ),
        "64 bytes that are no handle": (
            lambda: s.http.register_cuda_shared_memory("b", base64.b64encode(b"\1" * 64), dev, 64),
            {"422"},
        ),
        "stale handle (memory freed)": (
            lambda: s.http.register_cuda_shared_memory("b", stale_handle, dev, 64),
            {"422"},
        ),
        "device id not served": (lambda: s.http.register_cuda_shared_memory("b", region.raw_handle, 99, 64), {"422"}),
        "byte size 0": (lambda: s.http.register_cuda_shared_memory("b", region.raw_handle, dev, 0), {"422"}),
        "byte size past the allocation": (
            lambda: s.http.register_cuda_shared_memory("b", region.raw_handle, dev, x.nbytes + (4 << 20)),
            {"422"},
        ),
        "gRPC: stale handle": (
            lambda: s.grpc.register_cuda_shared_memory("b", stale_handle, dev, 64),
            {"StatusCode.INVALID_ARGUMENT"},
        ),
    }
    if gpus >= 2:
        other = s.region(x.nbytes, device=1 - dev if dev < 2 else 0)
        cases["handle for another GPU"] = (
            lambda: s.http.register_cuda_shared_memory("b", other.raw_handle, dev, 64),
            {"422"},
        )
    else:
        checks.record("handle for another GPU", True, "skipped: one GPU")
    try:
        refuse_each(s.http, checks, cases)
        with registered(s.http, region):
            region.write(x)
            dup = status_of(lambda: s.http.register_cuda_shared_memory(region.name, region.raw_handle, dev, 64))
            checks.record("refused: duplicate name", dup == "409", dup)
            dup = status_of(lambda: s.grpc.register_cuda_shared_memory(region.name, region.raw_handle, dev, 64))
            checks.record("gRPC refused: duplicate name", dup == "StatusCode.ALREADY_EXISTS", dup)
            unknown = status_of(lambda: s.infer(x, "no-such-region", region.name))
            checks.record("refused: unknown region", unknown == "404", unknown)
            past = status_of(lambda: s.infer(x, region.name, region.name, in_offset=64))
            checks.record("refused: range past the region", past == "422", past)
            tensor = s.httpclient.InferInput("input", list(x.shape), "FP16")
            tensor.set_shared_memory(region.name, x.nbytes - 2)
            size = status_of(lambda: s.http.infer("encoder", [tensor]))
            checks.record("refused: byte size not the tensor's", size == "422", size)
            code = status_of(lambda: s.grpc.get_cuda_shared_memory_status("no-such-region"))
            checks.record("gRPC: status of an unknown region is NOT_FOUND", code == "StatusCode.NOT_FOUND", code)
    finally:
        region.free()
        if gpus >= 2:
            other.free()
