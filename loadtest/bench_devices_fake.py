"""One engine process against several on the CPU, with the fake engine: raw ``/encode`` throughput and batch sizes.

The GPU comparison (``bench_service.py --devices 0 --devices 0,1``) needs the GPU host; this one shows how the
service spreads raw HTTP load over engine processes on any machine: the fake engine takes a fixed time per batch
(``--fake-delay-ms``, like a GPU run of a small batch), so what changes between the rows is only how the workers'
batches reach the engines. Per row: samples/s, latency, engine batches per device and their mean size, and the
workers' batches (frames sent to the engine processes) and their mean size. Example:

    python loadtest/bench_devices_fake.py --devices cpu:1 --devices cpu:2 --workers 2 --concurrency 24
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from loadtest.peers import launch, loadgen, scrape

log = logging.getLogger("bench_devices_fake")


def _delta(before: scrape.Samples, after: scrape.Samples, name: str, **labels: str) -> float:
    return scrape.total(after, name, **labels) - scrape.total(before, name, **labels)


def batch_table(before: scrape.Samples, after: scrape.Samples) -> dict[str, Any]:
    """Engine batches per device (count, samples, mean) and the workers' batches, between two scrapes."""
    devices = sorted(
        {dict(labels)["device"] for name, labels in after if name == "encoder_batch_size_count" and labels}
    )
    engine = {}
    for device in devices:
        count = _delta(before, after, "encoder_batch_size_count", device=device)
        samples = _delta(before, after, "encoder_batch_size_sum", device=device)
        busy = _delta(before, after, "encoder_inference_duration_seconds_sum", device=device)
        engine[device] = {
            "batches": round(count),
            "samples": round(samples),
            "mean": samples / count if count else 0.0,
            "busy_s": busy,
        }
    count = _delta(before, after, "encoder_worker_batch_size_count")
    samples = _delta(before, after, "encoder_worker_batch_size_sum")
    workers = {"batches": round(count), "samples": round(samples), "mean": samples / count if count else 0.0}
    return {"engine": engine, "workers": workers}


def cpu_seconds(pid: int | None) -> dict[str, float]:
    """CPU seconds (user + system) so far of the service's processes, by kind: engine processes, workers, the rest."""
    import psutil

    totals = {"engines": 0.0, "workers": 0.0, "other": 0.0}
    if pid is None:
        return totals
    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            line, times = " ".join(process.cmdline()), process.cpu_times()
        except psutil.Error:
            continue
        kind = "engines" if "service.engine.host" in line else "workers" if process.pid != root.pid else "other"
        if kind == "workers" and "multiprocessing" in line and "spawn" not in line:
            kind = "other"
        totals[kind] += times.user + times.system
    return totals


def run_point(args: argparse.Namespace, devices: str) -> dict[str, Any]:
    port = launch.free_port()
    command = [
        launch.python(), "-m", "service", "--engine", "fake", "--host", "127.0.0.1", "--port", str(port),
        "--workers", str(args.workers), "--devices", devices, "--fake-delay-ms", str(args.fake_delay_ms),
        "--max-batch-size", str(args.max_batch_size), "--max-delay-ms", str(args.max_delay_ms),
        "--log-level", "warning", "--shared-engine", "on", *args.service_arg,
    ]  # fmt: skip
    env = {"ENCODER_GRPC_PORT": "0"}
    log_path = Path(f"/tmp/bench-devices-fake-{port}.log")
    with launch.running(command, port, log_path=log_path, env=env, timeout_s=120, consecutive=args.workers) as server:
        spec = loadgen.make_spec("raw", server.url, args.seq, 8)
        loadgen.drive(spec, args.concurrency, args.clients, 0.5, 1.0)  # warm every connection first
        before, cpu_before = scrape.scrape(server.url), cpu_seconds(server.pid)
        result = loadgen.drive(spec, args.concurrency, args.clients, args.warmup, args.duration)
        after, cpu_after = scrape.scrape(server.url), cpu_seconds(server.pid)
    result["cpu_s"] = {k: round(cpu_after.get(k, 0.0) - cpu_before.get(k, 0.0), 2) for k in cpu_after}
    result["devices"] = devices
    result.update(batch_table(before, after))
    computed = sum(e["samples"] for e in result["engine"].values())
    result["cpu_ms_per_sample"] = 1e3 * sum(result["cpu_s"].values()) / computed if computed else None
    return result


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| `--devices` | samples/s | p50 / p99 ms | engine batches (device: count x mean samples) | worker batch "
        "(mean samples) | service CPU ms per sample |",
        "|---|---:|---|---|---:|---:|",
    ]
    for row in rows:
        engine = ", ".join(f"{d}: {e['batches']} x {e['mean']:.1f}" for d, e in row["engine"].items())
        cpu = row["cpu_ms_per_sample"]
        lines.append(
            f"| {row['devices']} | {row['samples_per_s']:,.0f} | {row['p50_ms']:.1f} / {row['p99_ms']:.1f} | {engine} "
            f"| {row['workers']['mean']:.1f} | {'-' if cpu is None else f'{cpu:.2f}'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", action="append", help="the service's --devices (repeat: one row each)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--fake-delay-ms", type=float, default=2.0)
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--max-delay-ms", type=float, default=0.0)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=1, help="run the whole list this many times (interleaved)")
    parser.add_argument("--service-arg", action="append", default=[], help="extra service flag (repeatable)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    args.devices = args.devices or ["cpu:1", "cpu:2"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = []
    for _ in range(args.repeat):
        for devices in args.devices:
            row = run_point(args, devices)
            rows.append(row)
            engine = ", ".join(f"{d}: {e['batches']} x {e['mean']:.1f}" for d, e in row["engine"].items())
            print(
                f"--devices {devices:8s} {row['samples_per_s']:8.0f} samples/s  p50 {row['p50_ms']:.1f} "
                f"p99 {row['p99_ms']:.1f} ms  errors {row['errors']}  engine batches {engine}  "
                f"worker batches {row['workers']['batches']} x {row['workers']['mean']:.1f}  cpu s {row['cpu_s']}",
                flush=True,
            )
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
