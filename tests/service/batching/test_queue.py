from __future__ import annotations

import asyncio

import numpy as np

from service.batching.queue import Item, PendingQueue, Ticket


def make_item(loop: asyncio.AbstractEventLoop, samples: int, seq: int, enqueued: float) -> Item:
    return Item(np.zeros((samples, seq, 2), np.float32), loop.create_future(), Ticket(1), enqueued)


def test_ready_waits_for_the_delay_or_a_full_group() -> None:
    loop = asyncio.new_event_loop()
    try:
        queue = PendingQueue()
        queue.add(make_item(loop, 1, 5, enqueued=10.0))
        assert queue.ready(now=10.001, max_samples=4, max_delay_s=0.01) == (None, 10.01)
        assert queue.ready(now=10.02, max_samples=4, max_delay_s=0.01)[0] == 5
        queue.add(make_item(loop, 3, 5, enqueued=10.0))
        assert queue.ready(now=10.0, max_samples=4, max_delay_s=10)[0] == 5
    finally:
        loop.close()


def test_oldest_ready_group_goes_first_and_lengths_never_mix() -> None:
    loop = asyncio.new_event_loop()
    try:
        queue = PendingQueue()
        queue.add(make_item(loop, 1, 7, enqueued=2.0))
        queue.add(make_item(loop, 1, 5, enqueued=1.0))
        queue.add(make_item(loop, 1, 7, enqueued=3.0))
        seq, _ = queue.ready(now=100.0, max_samples=8, max_delay_s=0.0)
        assert seq == 5
        taken, rejected = queue.take(5, 8, lambda item: True)
        assert [item.seq_len for item in taken] == [5] and rejected == []
        taken, _ = queue.take(7, 8, lambda item: True)
        assert [item.enqueued for item in taken] == [2.0, 3.0]
        assert len(queue) == 0 and queue.groups == {} and queue.samples == {}
    finally:
        loop.close()


def test_take_fills_up_to_max_and_skips_rejected_items() -> None:
    loop = asyncio.new_event_loop()
    try:
        queue = PendingQueue()
        items = [make_item(loop, n, 4, enqueued=float(i)) for i, n in enumerate((2, 1, 2, 1))]
        for item in items:
            queue.add(item)
        dead = items[1]
        taken, rejected = queue.take(4, 3, lambda item: item is not dead)
        # 2 fits, the dead one is popped without counting, the next 2 would overflow 3: it stays queued.
        assert taken == [items[0]] and rejected == [dead]
        assert list(queue) == items[2:] and queue.samples[4] == 3
        assert queue.discard(items[3]) and not queue.discard(items[3])
        assert queue.samples[4] == 2
    finally:
        loop.close()
