"""Merging a worker's device-to-device requests into shared batch frames (the CUDA shared-memory direct path).

A request whose input and output lie in CUDA regions goes past the worker's batcher straight to the engine
process (see ``service.oip.dataplane.device_to_device``). Sent one frame per request, a worker has at most one
frame per engine connection in flight, so requests of one sample each queue behind one another's round trips
and the engine process sees batches of a few samples. Here, whichever request gets a free connection takes every
request waiting for one (same sequence length, up to the engine's largest batch) into its frame; the others wait
for its answer. That is the batcher's rule with no delay: nothing waits for company, but nothing goes alone
while company is already waiting.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.engine.cuda_regions import DeviceRegion

Send = Callable[[int, Sequence["DevicePart"]], list["float | Exception"]]


@dataclass(frozen=True)
class DevicePart:
    """``rows`` samples from a client CUDA region (region, byte offset) whose answers go into another."""

    source: tuple[DeviceRegion, int]
    target: tuple[DeviceRegion, int]
    rows: int


@dataclass(eq=False)
class _Waiting:
    part: DevicePart
    seq: int
    taken: bool = False
    done: bool = False
    answer: float | BaseException = 0.0


class DeviceMerger:
    """Sends device parts through ``send(seq, parts)`` (per part: engine seconds or its error) with at most
    ``slots`` frames in flight, each frame holding every part waiting when it went, up to ``max_rows`` samples."""

    def __init__(self, send: Send, slots: int, max_rows: int) -> None:
        if slots < 1 or max_rows < 1:
            raise ValueError(f"a merger needs a slot and a row, got {slots} slot(s), {max_rows} row(s)")
        self._send, self._free, self._max_rows = send, slots, max_rows
        self._pending: list[_Waiting] = []
        self._cond = threading.Condition()
        self.parts = self.frames = 0  # parts asked for and frames sent (read by tests)

    def run(self, part: DevicePart, seq: int) -> float:
        """The engine seconds of ``part``'s frame (blocking); its own error raised."""
        waiting = _Waiting(part, seq)
        with self._cond:
            self._pending.append(waiting)
            self.parts += 1
            while not waiting.taken and not self._free:
                self._cond.wait()
            if waiting.taken:  # another request's frame carries it
                while not waiting.done:
                    self._cond.wait()
                return _result(waiting)
            self._free -= 1
            batch = self._take(waiting)
            self.frames += 1
        answers: list[float | BaseException]
        try:
            answers = list(self._send(seq, [w.part for w in batch]))
        except BaseException as exc:  # the connection's error concerns every part of the frame
            answers = [exc] * len(batch)
        self._settle(batch, answers)
        del answers, batch  # no reference cycle through a raised error's traceback: regions go when dropped
        return _result(waiting)

    def _settle(self, batch: list[_Waiting], answers: list[float | BaseException]) -> None:
        """Hand each part its answer and the slot back (a function of its own: its locals go when it returns)."""
        with self._cond:
            for w, answer in zip(batch, answers, strict=True):
                w.answer, w.done = answer, True
            self._free += 1
            self._cond.notify_all()

    def _take(self, owner: _Waiting) -> list[_Waiting]:
        """``owner`` and the waiting parts of its sequence length that fit beside it (lock held), oldest first."""
        batch, rows = [owner], owner.part.rows
        for w in self._pending:
            if w is not owner and w.seq == owner.seq and rows + w.part.rows <= self._max_rows:
                batch.append(w)
                rows += w.part.rows
        for w in batch:
            w.taken = True
        self._pending = [w for w in self._pending if not w.taken]
        return batch


def _result(waiting: _Waiting) -> float:
    """The part's engine seconds, or its error raised (taken from ``waiting``: no cycle holds the part's regions,
    whose unregistration in the engine process waits for them to be garbage)."""
    answer, waiting.answer = waiting.answer, 0.0
    if isinstance(answer, BaseException):
        try:
            raise answer
        finally:
            del answer
    return answer
