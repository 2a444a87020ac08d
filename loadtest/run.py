"""Headless load test, one command: step the users up against a host, save CSVs, plots and a summary.

    python loadtest/run.py --host http://127.0.0.1:8000 --steps 4,8,16 --step-seconds 20 \\
        --out loadtest/results/run-<name>

Writes into ``--out``: locust's CSVs (``locust_stats.csv``, ``locust_stats_history.csv``, ...), an HTML report,
``throughput_vs_concurrency.png``, ``latency_by_batch_size.png``, ``server_batch_sizes.png`` (the batch sizes
the server formed, from its ``/metrics``) and ``summary.json``. Exits non-zero on any failed request.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from loadtest.peers.scrape import batch_sizes, scrape, time_breakdown

log = logging.getLogger("loadtest.run")
HERE = Path(__file__).resolve().parent
BS_RE = re.compile(r"bs=(\d+)")
PERCENTILES = ("50%", "95%", "99%")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", required=True, help="base URL of the service")
    p.add_argument("--steps", default="4,8,16", help="users per step")
    p.add_argument("--step-seconds", type=float, default=20.0)
    p.add_argument("--out", type=Path, required=True, help="directory for CSVs, plots and summary.json")
    p.add_argument("--processes", type=int, default=1, help="locust worker processes (-1: one per core)")
    p.add_argument("--check-fraction", type=float, default=0.05, help="share of answers whose values are checked")
    p.add_argument("--check-torch", action="store_true", help="check values against PyTorch (default model only)")
    p.add_argument("--ready-timeout", type=float, default=120.0)
    p.add_argument("--locustfile", type=Path, default=HERE / "locustfile.py")
    return p.parse_args(argv)


def wait_ready(host: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(host.rstrip("/") + "/readyz", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{host} was not ready within {timeout_s:.0f} s")
        time.sleep(0.5)


def run_locust(args: argparse.Namespace, steps: list[int]) -> int:
    prefix = args.out / "locust"
    command = [sys.executable, "-m", "locust", "-f", str(args.locustfile), "--headless", "--host", args.host]
    command += ["--csv", str(prefix), "--csv-full-history", "--html", str(args.out / "report.html")]
    command += ["--only-summary", "--loglevel", "WARNING"]
    if args.processes != 1:
        command += ["--processes", str(args.processes)]
    env = dict(os.environ)
    env.update(
        LOCUST_STEPS=",".join(map(str, steps)),
        LOCUST_STEP_SECONDS=str(args.step_seconds),
        ENCODER_CHECK_FRACTION=str(args.check_fraction),
        LOCUST_CHECKS_DIR=str(args.out / "checks"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH", "")])),
    )
    if args.check_torch:
        env["ENCODER_CHECK_TORCH"] = "1"
    log.info("running: %s", " ".join(command))
    budget = args.step_seconds * len(steps) + 300  # generous: startup, a torch reference, shutdown
    return subprocess.run(command, env=env, timeout=budget, check=False).returncode


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def batch_size(name: str) -> int:
    match = BS_RE.search(name)
    return int(match.group(1)) if match else 1


def number(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "", "N/A") else None
    except ValueError:
        return None


def per_step(history: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Requests/s and samples/s per user count, from locust's cumulative counts at the step's edges."""
    order: list[int] = []
    last_total: dict[str, float] = defaultdict(float)  # per request name, as of the previous step's end
    last_ts: float | None = None
    by_users: dict[int, list[dict[str, str]]] = defaultdict(list)
    for row in history:
        users = int(row["User Count"])
        if users and users not in by_users:
            order.append(users)
        by_users[users].append(row)
    steps = []
    for users in order:
        rows = by_users[users]
        agg = [r for r in rows if r["Name"] == "Aggregated"]
        end_ts = float(agg[-1]["Timestamp"]) if agg else float(rows[-1]["Timestamp"])
        start_ts = last_ts if last_ts is not None else float(rows[0]["Timestamp"])
        totals: dict[str, float] = {}
        for row in rows:
            if row["Name"] != "Aggregated":
                totals[row["Name"]] = float(row["Total Request Count"])
        requests = sum(totals[n] - last_total[n] for n in totals)
        samples = sum((totals[n] - last_total[n]) * batch_size(n) for n in totals)
        seconds = max(end_ts - start_ts, 1.0)
        step: dict[str, Any] = {
            "users": users,
            "seconds": seconds,
            "requests_per_s": requests / seconds,
            "samples_per_s": samples / seconds,
        }
        if agg:  # locust's current (rolling ~10 s) percentiles at the end of the step, in ms
            step.update({f"p{p[:-1]}_ms": number(agg[-1].get(p)) for p in PERCENTILES})
        steps.append(step)
        last_total.update(totals)
        last_ts = end_ts
    return steps


def per_batch_size(stats: list[dict[str, str]]) -> dict[str, dict[str, Any]]:
    """Whole-run latency percentiles (ms) per request name, i.e. per format and client batch size."""
    out = {}
    for row in stats:
        if row["Name"] == "Aggregated":
            continue
        out[row["Name"]] = {
            "batch_size": batch_size(row["Name"]),
            "requests": int(row["Request Count"]),
            "failures": int(row["Failure Count"]),
            **{f"p{p[:-1]}_ms": number(row.get(p)) for p in PERCENTILES},
        }
    return out


def plot_throughput(steps: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    users = [s["users"] for s in steps]
    ax.plot(users, [s["samples_per_s"] for s in steps], "o-", label="samples/s")
    ax.plot(users, [s["requests_per_s"] for s in steps], "s--", label="requests/s")
    ax.set_xlabel("concurrent users")
    ax.set_ylabel("throughput (1/s)")
    ax.set_title("Throughput vs concurrency")
    ax.grid(alpha=0.3)
    if any(s.get("p50_ms") for s in steps):
        twin = ax.twinx()
        twin.plot(users, [s.get("p50_ms") or 0 for s in steps], "^:", color="grey", label="p50 ms (all requests)")
        twin.set_ylabel("p50 latency (ms)")
        twin.legend(loc="lower right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency(names: dict[str, dict[str, Any]], path: Path) -> None:
    ordered = sorted(names, key=lambda n: (names[n]["batch_size"], n))
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(ordered)), 4.5))
    width = 0.27
    for i, pct in enumerate(("p50_ms", "p95_ms", "p99_ms")):
        xs = [j + (i - 1) * width for j in range(len(ordered))]
        ax.bar(xs, [names[n][pct] or 0 for n in ordered], width, label=pct[:-3])
    ax.set_xticks(range(len(ordered)), [n.removeprefix("encode ") for n in ordered], rotation=30, ha="right")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Latency per format and client batch size (whole run)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_batches(formed: dict[str, int], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = list(formed)
    ax.bar(range(len(labels)), [formed[k] for k in labels])
    ax.set_xticks(range(len(labels)), [f"≤{k}" for k in labels])
    ax.set_xlabel("samples per engine batch")
    ax.set_ylabel("batches")
    ax.set_title("Batch sizes the server formed (from /metrics)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_checks(directory: Path) -> dict[str, int]:
    totals: dict[str, int] = defaultdict(int)
    for path in directory.glob("checks-*.json"):
        for key, value in json.loads(path.read_text()).items():
            totals[key] += int(value)
    return dict(totals)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    wait_ready(args.host, args.ready_timeout)
    before = scrape(args.host)
    started = time.time()
    code = run_locust(args, steps)
    after = scrape(args.host)
    stats = read_csv(args.out / "locust_stats.csv")
    history = read_csv(args.out / "locust_stats_history.csv")
    aggregated = next((r for r in stats if r["Name"] == "Aggregated"), None)
    requests = int(aggregated["Request Count"]) if aggregated else 0
    failures = int(aggregated["Failure Count"]) if aggregated else 0
    summary: dict[str, Any] = {
        "host": args.host,
        "steps": steps,
        "step_seconds": args.step_seconds,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "locust_exit_code": code,
        "requests": requests,
        "failures": failures,
        "failure_kinds": {r["Error"]: int(r["Occurrences"]) for r in read_csv(args.out / "locust_failures.csv")},
        "value_checks": read_checks(args.out / "checks"),
        "per_step": per_step(history),
        "per_request_name": per_batch_size(stats),
        "server_batches": batch_sizes(before, after),
        "server_time": time_breakdown(before, after),
    }
    plot_throughput(summary["per_step"], args.out / "throughput_vs_concurrency.png")
    plot_latency(summary["per_request_name"], args.out / "latency_by_batch_size.png")
    plot_batches(summary["server_batches"]["formed"], args.out / "server_batch_sizes.png")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for step in summary["per_step"]:
        print(f"{step['users']:>5} users: {step['samples_per_s']:9.1f} samples/s  {step['requests_per_s']:9.1f} req/s")
    sb = summary["server_batches"]
    print(f"server formed {sb['batches']} batches, mean size {sb['mean_batch_size']}: {sb['formed']}")
    print(f"{requests} requests, {failures} failures, value checks {summary['value_checks']}; {args.out}")
    mismatched = summary["value_checks"].get("mismatched", 0)
    return 1 if code != 0 or failures or mismatched or requests == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
