"""The pending-work queue: chunks grouped by sequence length, FIFO within a group. Pure data, no I/O."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class Placed(Protocol):
    """A request's input that already lies where the engine reads it, naming where its answer goes (e.g. a client's
    shared memory). Opaque to the batcher: it counts its rows (``shape``: (B, S, ...)), cuts it into chunks of rows,
    batches it like any other and hands it to the engine's ``run_placed``; ``output`` is where the answer lands."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def output(self) -> np.ndarray: ...

    def __getitem__(self, rows: slice) -> Placed: ...


@dataclass(eq=False)
class Ticket:
    """One submitted request: how many of its chunks still wait, and whether a drop was already counted."""

    waiting: int = 0
    dropped: bool = False


@dataclass(frozen=True)
class Done:
    """What a computed chunk resolves to."""

    output: np.ndarray
    queue_s: float
    compute_s: float


@dataclass(eq=False)
class Item:
    """One chunk of a request: at most ``max_batch_size`` samples, all of one sequence length."""

    x: np.ndarray | Placed
    future: asyncio.Future[Done]
    ticket: Ticket
    enqueued: float
    deadline: float | None = None

    @property
    def samples(self) -> int:
        return int(self.x.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.x.shape[1])


@dataclass
class PendingQueue:
    """Items waiting for a batch. Batches never mix sequence lengths, so each length has its own FIFO."""

    groups: dict[int, deque[Item]] = field(default_factory=dict)
    samples: dict[int, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return sum(len(group) for group in self.groups.values())

    def __iter__(self) -> Iterator[Item]:
        for group in self.groups.values():
            yield from group

    def add(self, item: Item) -> None:
        self.groups.setdefault(item.seq_len, deque()).append(item)
        self.samples[item.seq_len] = self.samples.get(item.seq_len, 0) + item.samples

    def discard(self, item: Item) -> bool:
        """Remove ``item`` if it is still queued; True when it was."""
        group = self.groups.get(item.seq_len)
        if group is None:
            return False
        try:
            group.remove(item)
        except ValueError:
            return False
        self._forget(item)
        return True

    def ready(self, now: float, max_samples: int, max_delay_s: float) -> tuple[int | None, float | None]:
        """The group to run now (full, or its oldest item waited ``max_delay_s``), else when one will be due.

        Among ready groups the one whose head waited longest goes first, so no length starves.
        """
        best: Item | None = None
        next_due: float | None = None
        for seq, group in self.groups.items():
            head = group[0]
            due = head.enqueued + max_delay_s
            if self.samples[seq] >= max_samples or due <= now:
                if best is None or head.enqueued < best.enqueued:
                    best = head
            elif next_due is None or due < next_due:
                next_due = due
        return (best.seq_len if best is not None else None), next_due

    def take(self, seq_len: int, max_samples: int, accept: Callable[[Item], bool]) -> tuple[list[Item], list[Item]]:
        """Pop items of ``seq_len`` in order while they fit in ``max_samples``.

        ``accept`` is asked about each popped item; rejected ones (caller gone, deadline passed) do not
        count towards the batch, so the batch is topped up from behind them. Returns (taken, rejected).
        """
        group = self.groups.get(seq_len)
        taken: list[Item] = []
        rejected: list[Item] = []
        total = 0
        while group:
            item = group[0]
            if accept(item):
                if total + item.samples > max_samples:
                    break
                total += item.samples
                taken.append(item)
            else:
                rejected.append(item)
            group.popleft()
            self._forget(item)
        return taken, rejected

    def _forget(self, item: Item) -> None:
        seq = item.seq_len
        self.samples[seq] -= item.samples
        if not self.groups[seq]:
            del self.groups[seq]
            del self.samples[seq]
