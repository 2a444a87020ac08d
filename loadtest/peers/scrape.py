"""Read the service's /metrics: the batch sizes it formed and where its time went, between two scrapes."""

from __future__ import annotations

import logging
import math
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(base_url: str, timeout: float = 10.0) -> Samples:
    """Every sample of /metrics, keyed by (sample name, sorted labels)."""
    with urllib.request.urlopen(base_url.rstrip("/") + "/metrics", timeout=timeout) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return samples


def _value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over the samples of ``name`` whose labels include ``labels`` (e.g. over every ``device``)."""
    wanted = set(labels.items())
    return sum(value for (sample, got), value in samples.items() if sample == name and wanted <= set(got))


def total(samples: Samples, name: str, **labels: str) -> float:
    """:func:`_value` for callers outside this module: one metric summed over the labels not named."""
    return _value(samples, name, **labels)


def device_samples(before: Samples, after: Samples) -> dict[str, int]:
    """Samples computed per device (``encoder_samples_processed_total{device}``) between two scrapes."""
    devices = {dict(labels).get("device") for name, labels in after if name == "encoder_samples_processed_total"}
    found = {d: round(_delta(before, after, "encoder_samples_processed_total", device=d)) for d in devices if d}
    return dict(sorted(found.items()))


def _delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return _value(after, name, **labels) - _value(before, name, **labels)


def histogram_delta(before: Samples, after: Samples, metric: str) -> dict[str, Any]:
    """Per-bucket counts (not cumulative), count and sum of a label-less histogram between two scrapes."""
    bounds = sorted(
        {dict(labels)["le"] for name, labels in after if name == f"{metric}_bucket" and "le" in dict(labels)},
        key=lambda le: math.inf if le == "+Inf" else float(le),
    )
    counts: dict[str, int] = {}
    previous = 0.0
    for le in bounds:
        cumulative = _delta(before, after, f"{metric}_bucket", le=le)
        counts[le] = round(cumulative - previous)
        previous = cumulative
    count = _delta(before, after, f"{metric}_count")
    total = _delta(before, after, f"{metric}_sum")
    return {"buckets": counts, "count": round(count), "sum": total, "mean": total / count if count else None}


def shm_paths(before: Samples, after: Samples) -> dict[str, float]:
    """Shared-memory requests between two scrapes by the path that served them (direct / copied)."""
    name = "encoder_shm_requests_total"
    return {path: _value(after, name, path=path) - _value(before, name, path=path) for path in ("direct", "copied")}


def batch_sizes(before: Samples, after: Samples) -> dict[str, Any]:
    """The engine batches the server formed: counts per power-of-two bucket ('<= le'), mean batch size."""
    hist = histogram_delta(before, after, "encoder_batch_size")
    formed = {_label(le): n for le, n in hist["buckets"].items() if n}
    return {"batches": hist["count"], "samples": hist["sum"], "mean_batch_size": hist["mean"], "formed": formed}


def _label(le: str) -> str:
    return le if le == "+Inf" else str(int(float(le)))


def time_breakdown(before: Samples, after: Samples) -> dict[str, Any]:
    """Mean server-side times (ms) between two scrapes: whole request, queue wait, engine per batch."""
    request = histogram_delta(before, after, "encoder_request_duration_seconds")
    queue = histogram_delta(before, after, "encoder_queue_wait_seconds")
    inference_sum = sum(
        after[key] - before.get(key, 0.0) for key in after if key[0] == "encoder_inference_duration_seconds_sum"
    )
    inference_count = sum(
        after[key] - before.get(key, 0.0) for key in after if key[0] == "encoder_inference_duration_seconds_count"
    )
    outcomes = {
        dict(labels)["outcome"]: round(_delta(before, after, name, **dict(labels)))
        for name, labels in after
        if name == "encoder_requests_total"
    }

    def ms(value: float | None) -> float | None:
        return None if value is None else value * 1e3

    return {
        "request_ms_mean": ms(request["mean"]),
        "queue_wait_ms_mean": ms(queue["mean"]),
        "inference_ms_per_batch_mean": ms(inference_sum / inference_count) if inference_count else None,
        "outcomes": {k: v for k, v in outcomes.items() if v},
    }
