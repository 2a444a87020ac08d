"""Which device a worker's next batch goes to: fill the devices in order, spread once runs grow with their size.

Each engine process merges whatever waits for it into one run, and a run of a few samples costs about as much
as a run of one (on a GPU: launches, copies, the wait for the device, the engine process's own loop). Least-loaded
routing sent a worker's consecutive batches to different devices, so with two GPUs each engine merged half as
many samples per run and both paid that fixed cost: raw HTTP on two H200s served 0.76x the samples/s of one GPU
(engine batches of 3.9 samples instead of 8.2, each GPU busy twice as long in all). So batches are *packed*: every
worker prefers the devices in the same order, and the next device joins only when the runs of those before it take
``--spread-ratio`` (4) times their quickest run, that is when most of a run's time grows with its size and half of
it on another device finishes sooner. Among the devices in use, the batch goes to the least loaded (this worker's
samples in flight there, then the fewest given). ``--spread-ratio 0`` spreads every batch that way over all devices.

Direct shared-memory batches are always spread over every device: the engine process reads, checks and copies
their inputs itself, so its own loop is their limit and a second engine doubles it (two H200s: 2.09x at client
batch 1, 1.77x at 16, with engine batches as small as those above).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

# Runs this many times the quickest: the next device joins (the default of --spread-ratio). Not lower: run times also
# stretch when the host's CPU is busy (a GPU run of a few samples took 1.07 ms on average, its quickest well under
# that), which another device would not cure.
SPREAD_RATIO = 4.0
# ... and it leaves again only below half that: spread over two devices, runs of 4x (a fixed cost a and 3a that grows
# with the batch) become 2.5x, which must not look empty at once, or batches would flap between packed and spread.
PACK_SHARE = 0.5
WEIGHT = 0.2  # of a new run time in the running average
STALE_S = 0.5  # run times older than this say nothing about the device now


@dataclass
class Pace:
    """A device's engine run times, as this worker reads them in its replies (the merged run its batch was in)."""

    quickest: float = math.inf
    recent: float = 0.0  # running average of the last runs
    at: float = -math.inf  # monotonic time of the last one
    spilling: bool = False  # full as of the last run
    spread_ratio: float = SPREAD_RATIO

    def observe(self, compute_s: float, now: float, engine_quickest: float = math.inf) -> None:
        """A run of ``compute_s`` just ended; ``engine_quickest``: the quickest run the engine process knows of
        (runs of every worker: a worker that only saw long runs still knows what a short one costs)."""
        if compute_s <= 0.0:
            return
        self.quickest = min(self.quickest, compute_s, engine_quickest)
        fresh = now - self.at <= STALE_S
        self.recent = self.recent + WEIGHT * (compute_s - self.recent) if fresh else compute_s
        self.at = now
        ratio = self.spread_ratio * (PACK_SHARE if self.spilling else 1.0)
        self.spilling = self.recent >= ratio * self.quickest

    def full(self, now: float) -> bool:
        """Its recent runs take ``spread_ratio`` times its quickest (then until they are back under half that):
        more samples there would make them longer still, and the next device would finish some of them sooner."""
        return self.spilling and now - self.at <= STALE_S


@dataclass
class Candidate:
    """A usable device, in the order every worker prefers them."""

    index: int
    in_flight: int  # this worker's samples there now
    batches: int  # batches given so far (the tie-break)
    pace: Pace = field(default_factory=Pace)


def choose(candidates: Sequence[Candidate], now: float, pack: bool = True) -> int:
    """The device for the next batch (``candidates`` not empty): with ``pack``, the least loaded of the devices up
    to the first one that is not full; else the least loaded of all."""
    if pack:
        end = next((k for k, c in enumerate(candidates) if not c.pace.full(now)), len(candidates) - 1)
        candidates = candidates[: end + 1]
    return min(candidates, key=lambda c: (c.in_flight, c.batches)).index
