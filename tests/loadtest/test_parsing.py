"""The runner's and the benchmark's arithmetic, on made-up inputs (fast)."""

from __future__ import annotations

from loadtest.peers.loadgen import split
from loadtest.peers.scrape import batch_sizes, shm_paths
from loadtest.run import per_step


def row(ts: int, users: int, name: str, total: int) -> dict[str, str]:
    return {"Timestamp": str(ts), "User Count": str(users), "Name": name, "Total Request Count": str(total), "50%": "5"}


def test_per_step_counts_samples_by_client_batch_size() -> None:
    history = [
        row(100, 0, "Aggregated", 0),
        row(101, 2, "encode raw bs=1", 10),
        row(101, 2, "encode npy bs=8", 2),
        row(101, 2, "Aggregated", 12),
        row(103, 4, "encode raw bs=1", 30),
        row(103, 4, "encode npy bs=8", 6),
        row(103, 4, "Aggregated", 36),
    ]
    first, second = per_step(history)
    assert (first["users"], first["requests_per_s"], first["samples_per_s"]) == (2, 12.0, 26.0)
    assert (second["users"], second["seconds"], second["requests_per_s"], second["samples_per_s"]) == (4, 2, 12, 26)


def test_batch_sizes_are_the_histogram_delta() -> None:
    def hist(counts: dict[str, float], total: float) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        samples = {("encoder_batch_size_bucket", (("le", le),)): v for le, v in counts.items()}
        samples[("encoder_batch_size_count", ())] = counts["+Inf"]
        samples[("encoder_batch_size_sum", ())] = total
        return samples

    before = hist({"1.0": 5, "2.0": 5, "4.0": 6, "+Inf": 6}, 9)
    after = hist({"1.0": 7, "2.0": 9, "4.0": 12, "+Inf": 12}, 27)
    result = batch_sizes(before, after)
    assert result["formed"] == {"1": 2, "2": 2, "4": 2}
    assert result["batches"] == 6 and result["mean_batch_size"] == 3.0


def test_shm_paths_are_the_counter_deltas_by_path() -> None:
    def counts(direct: float, copied: float) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        name = "encoder_shm_requests_total"
        return {(name, (("path", "direct"),)): direct, (name, (("path", "copied"),)): copied}

    assert shm_paths(counts(3, 1), counts(10, 1)) == {"direct": 7, "copied": 0}
    assert shm_paths({}, {}) == {"direct": 0, "copied": 0}


def test_concurrency_is_split_over_client_processes() -> None:
    assert split(96, 6) == [16] * 6
    assert split(10, 4) == [3, 3, 2, 2]
    assert split(2, 6) == [1, 1]
