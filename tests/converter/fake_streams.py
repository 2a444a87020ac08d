"""A CUDA runtime stand-in for the pipelined copies: host memory as 'device' memory, streams as queues.

Lazy mode runs a queued copy only when a stream sync or an event wait forces it (the latest a GPU may run it);
eager mode runs it at once (the earliest). A graph launch checks that no queued copy still writes its input or
reads its output: the hazards the real ordering must rule out.
"""

from __future__ import annotations

import ctypes
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from converter.pinned import D2H, H2D, data_ptr


@dataclass
class _Copy:
    dst: int
    src: int
    nbytes: int
    kind: int


@dataclass
class FakeStreams:
    eager: bool = False
    queues: dict[int, list[_Copy | int]] = field(default_factory=lambda: defaultdict(list))
    log: list[tuple[str, int, int]] = field(default_factory=list)  # (what, kind or event, stream)
    launches: int = 0

    def copy(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        assert kind in (H2D, D2H) and nbytes > 0
        self.log.append(("copy", kind, stream))
        op = _Copy(dst, src, nbytes, kind)
        if self.eager:
            ctypes.memmove(dst, src, nbytes)
        else:
            self.queues[stream].append(op)

    def record(self, event: int, stream: int) -> None:
        self.log.append(("record", event, stream))
        self.queues[stream].append(event)

    def wait(self, event: int) -> None:
        for queue in self.queues.values():
            if event in queue:
                self._flush(queue, queue.index(event) + 1)

    def sync(self, stream: int) -> None:
        self.log.append(("sync", 0, stream))
        self._flush(self.queues[stream], len(self.queues[stream]))

    def _flush(self, queue: list[_Copy | int], upto: int) -> None:
        for op in queue[:upto]:
            if isinstance(op, _Copy):
                ctypes.memmove(op.dst, op.src, op.nbytes)
        del queue[:upto]

    def pending(self, array: np.ndarray) -> bool:
        """Does a queued copy still touch ``array``'s memory?"""
        lo, hi = data_ptr(array), data_ptr(array) + array.nbytes
        ops = [op for queue in self.queues.values() for op in queue if isinstance(op, _Copy)]
        return any(lo < p + op.nbytes and p < hi for op in ops for p in (op.dst, op.src))

    def launch(self, inp: np.ndarray, out: np.ndarray, fn: object) -> None:
        """A blocking graph run: ``out[...] = fn(inp)``, refused while a copy is still due on either buffer."""
        if self.pending(inp) or self.pending(out):
            raise AssertionError("graph launched while a copy to its input or from its output is still queued")
        self.launches += 1
        out[...] = fn(inp)  # type: ignore[operator]
