"""The routing policy on its own (no processes): devices fill in order, the next joins once runs grow long."""

from __future__ import annotations

from service.engine.routing import PACK_SHARE, SPREAD_RATIO, STALE_S, Candidate, Pace, choose

PACK_RATIO = SPREAD_RATIO * PACK_SHARE


def paced(*runs: float, now: float = 10.0) -> Pace:
    """A pace that saw ``runs`` (seconds), the last at ``now``."""
    pace = Pace()
    for k, run in enumerate(runs):
        pace.observe(run, now - (len(runs) - 1 - k) * 0.001)
    return pace


def full(now: float = 10.0) -> Pace:
    return paced(0.001, *[SPREAD_RATIO * 0.002] * 30, now=now)


def test_fresh_devices_pack_onto_the_first_even_when_it_is_the_busier() -> None:
    candidates = [Candidate(0, in_flight=12, batches=40), Candidate(1, in_flight=0, batches=0)]
    assert choose(candidates, now=10.0) == 0


def test_short_runs_keep_the_first_device() -> None:
    pace = paced(0.001, 0.0012, 0.0015, 0.0011, 0.0019, 0.0013)  # a GPU's small runs: fixed cost and jitter
    assert not pace.full(10.0)
    assert choose([Candidate(0, 8, 9, pace), Candidate(1, 0, 0)], now=10.0) == 0


def test_runs_grown_long_let_the_next_device_in_and_the_least_loaded_of_the_two_takes_the_batch() -> None:
    first = full()
    assert first.full(10.0)
    assert choose([Candidate(0, 8, 9, first), Candidate(1, 0, 0)], now=10.0) == 1
    assert choose([Candidate(0, 2, 9, first), Candidate(1, 5, 3)], now=10.0) == 0
    assert choose([Candidate(0, 4, 9, first), Candidate(1, 4, 3)], now=10.0) == 1  # a tie: the fewest given
    # A third device stays out while the second's runs are short.
    third = Candidate(2, 0, 0)
    assert choose([Candidate(0, 8, 9, first), Candidate(1, 5, 3), third], now=10.0) == 1
    assert choose([Candidate(0, 8, 9, first), Candidate(1, 5, 3, full()), third], now=10.0) == 2


def test_spreading_ends_only_when_runs_are_well_under_the_spreading_length() -> None:
    pace = full()
    for _ in range(30):  # spread: the runs are shorter, still above PACK_RATIO times the quickest
        pace.observe((PACK_RATIO + 0.3) * 0.001, 10.0)
    assert pace.full(10.0)
    for _ in range(30):
        pace.observe((PACK_RATIO - 0.3) * 0.001, 10.0)
    assert not pace.full(10.0)
    for _ in range(30):  # back at the lower length: not yet full again (it must reach SPREAD_RATIO)
        pace.observe((PACK_RATIO + 0.3) * 0.001, 10.0)
    assert not pace.full(10.0)


def test_run_times_go_stale() -> None:
    pace = full(now=10.0)
    assert pace.full(10.0 + STALE_S / 2)
    assert not pace.full(10.0 + STALE_S * 2)  # nothing heard since: the device may be idle now
    pace.observe(0.001, 10.0 + STALE_S * 2)  # a fresh run starts the average over
    assert pace.recent == 0.001 and not pace.full(10.0 + STALE_S * 2)


def test_a_run_time_of_zero_says_nothing() -> None:
    pace = paced(0.002)
    pace.observe(0.0, 10.0)
    assert pace.quickest == 0.002 and pace.recent == 0.002


def test_a_lower_spread_ratio_spreads_sooner() -> None:
    eager = Pace(spread_ratio=2.0)
    for run in (0.001, *[0.0025] * 20):
        eager.observe(run, 10.0)
    assert eager.full(10.0) and not paced(0.001, *[0.0025] * 20).full(10.0)


def test_without_packing_the_least_loaded_of_all_takes_the_batch() -> None:
    candidates = [Candidate(0, 12, 40), Candidate(1, 0, 5), Candidate(2, 0, 2)]
    assert choose(candidates, now=10.0, pack=False) == 2
    assert choose(candidates[:2], now=10.0, pack=False) == 1
