"""The service end to end against its peers, one host, one run: samples/s, p50, p99 per (server, concurrency).

Each server starts in turn as a subprocess on a free port with the same worker count, is driven by N client
processes (closed loop, single-sample S x D fp16 requests) and stopped. Servers: ``service`` (ours, raw
bytes), ``json`` (ours, JSON bodies: the format's cost), ``echo`` (the I/O ceiling), ``naive`` (FastAPI +
PyTorch eager, no batching), ``litserve`` (LitServe batching, the same onnxruntime session; skipped where
LitServe is not installed), ``triton`` (a real Triton Inference Server on the same bundle, OIP loads only).
``--protocols`` adds the Open Inference Protocol loads (HTTP binary tensors, gRPC, system and CUDA shared memory,
at each of ``--client-batches``) on the service and Triton; see ``loadtest/peers/oip_bench.py``. Saves JSON and
prints markdown tables. On the GPU host, one command:

    python loadtest/bench_service.py --model-dir bundles/fp16 --workers 8 --concurrency 24,96,192

(the fp16 bundle is converted first if the directory does not exist). CPU self-test: ``--device cpu``. One GPU
against two, same run: ``--servers service --devices 0 --devices 0,1`` (rows ``service@0``, ``service@0,1``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from loadtest.peers import litserve_server, oip_bench, profile
from loadtest.peers.launch import ServerFailed, ServerProcess, free_port
from loadtest.peers.loadgen import drive, make_spec
from loadtest.peers.scrape import Samples, batch_sizes, device_samples, scrape, time_breakdown
from loadtest.peers.triton import server as triton_server

log = logging.getLogger("bench_service")
SERVERS = ("service", "per-worker", "json", "echo", "naive", "litserve", "triton")
# Which process serves each entry, and the body format its clients send.
# ``per-worker`` is ours with an engine in every worker (``--shared-engine off``) instead of one engine process.
PROCESS = {"service": "service", "per-worker": "per-worker", "json": "service", "echo": "echo", "naive": "naive"}
PROCESS["litserve"] = "litserve"
PROCESS["triton"] = "triton"
FORMAT = {"service": "raw", "per-worker": "raw", "json": "json", "echo": "raw", "naive": "raw", "litserve": "litserve"}
FORMAT["triton"] = "oip"
OURS = ("service", "per-worker")
NOT_SETTINGS = ("out", "model_dir", "server_list", "references", "service_help")  # not flags, or not JSON


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", default="service,json,echo,naive,litserve")
    p.add_argument("--concurrency", default="24,96,192", help="in-flight requests, all clients together")
    p.add_argument("--duration", type=float, default=15.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds of load before each point")
    p.add_argument("--workers", type=int, default=8, help="uvicorn workers (API servers for LitServe), all servers")
    p.add_argument("--naive-workers", type=int, help="workers for the naive server (default --workers)")
    p.add_argument("--clients", type=int, default=6, help="client processes")
    p.add_argument("--model-dir", type=Path, default=Path("bundles/fp16"))
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--seq", type=int, default=196)
    p.add_argument("--max-batch-size", type=int, default=32, help="the service's and LitServe's batch limit")
    p.add_argument("--max-delay-ms", type=float, default=2.0, help="the service's and LitServe's batch wait")
    p.add_argument("--litserve-workers-per-device", type=int, default=2)
    p.add_argument("--service-arg", action="append", default=[], help="extra flag for the service (repeatable)")
    p.add_argument(
        "--devices",
        action="append",
        default=[],
        help="the service's --devices; repeat to compare in one run (e.g. --devices 0 --devices 0,1): every service "
        "server runs once per value, its rows named service@<devices>; flags after the devices go to that server "
        "only (e.g. --devices '0,1 --spread-ratio 0')",
    )
    p.add_argument("--profile", action="store_true", help="py-spy the service at the top raw concurrency, if installed")
    p.add_argument("--ready-timeout", type=float, default=600.0)
    p.add_argument("--out", type=Path, help="default loadtest/results/service-<card>-<date>.json")
    p.add_argument("--log-level", default="INFO")
    oip_bench.add_arguments(p)
    return p.parse_args(argv)


def card_name(device: str) -> str:
    if device == "cuda" and shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            query = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
            return subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.splitlines()[0].strip()
    return f"cpu-{platform.machine()}"


def slug(text: str) -> str:
    short = re.sub(r"^nvidia\s+", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", short.split()[0] if short.split() else short).strip("-") or "unknown"


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("onnxruntime-gpu", "onnxruntime", "torch", "fastapi", "uvicorn", "aiohttp", "litserve", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[package] = metadata.version(package)
    return found


def ensure_bundle(model_dir: Path, device: str) -> dict[str, Any]:
    if not (model_dir / "manifest.json").exists():
        precision = "fp16" if device == "cuda" else "fp32"
        command = [sys.executable, "-m", "converter", "--out", str(model_dir), "--precision", precision]
        command += ["--verify-provider", "cuda" if device == "cuda" else "cpu"]
        log.info("no bundle at %s: converting (%s)", model_dir, " ".join(command))
        subprocess.run(command, check=True, cwd=Path(__file__).resolve().parents[1])
    manifest: dict[str, Any] = json.loads((model_dir / "manifest.json").read_text())
    return manifest


def server_command(
    kind: str, args: argparse.Namespace, port: int, grpc_port: int = 0, metrics_port: int = 0, devices: str = ""
) -> tuple[list[str], str, dict[str, str]]:
    """(argv, readiness path, extra environment) for one server kind (ours on ``devices``, if given)."""
    py, common = sys.executable, ["--host", "127.0.0.1", "--port", str(port)]
    if kind in OURS:
        cmd = [py, "-m", "service", *common, "--model-dir", str(args.model_dir), "--workers", str(args.workers)]
        cmd += ["--devices", *devices.split()] if devices else []  # flags after the devices: this server's
        cmd += ["--max-batch-size", str(args.max_batch_size), "--max-delay-ms", str(args.max_delay_ms)]
        cmd += ["--seq-lens", str(args.seq), "--log-level", "warning"]
        if args.device == "cpu":
            cmd += ["--provider", "cpu"]
        cmd += ["--shared-engine", "off" if kind == "per-worker" else "on"]
        return cmd + oip_bench.service_flags(args, grpc_port) + args.service_arg, "/readyz", {}
    if kind == "echo":
        return [py, "-m", "loadtest.peers.echo_server", *common, "--workers", str(args.workers)], "/readyz", {}
    if kind == "naive":
        workers = str(args.naive_workers or args.workers)
        cmd = [py, "-m", "loadtest.peers.naive_torch", *common, "--workers", workers, "--device", args.device]
        return [*cmd, "--model-dir", str(args.model_dir)], "/readyz", {}
    if kind == "litserve":
        cmd = [py, "-m", "loadtest.peers.litserve_server", *common, "--model-dir", str(args.model_dir)]
        cmd += ["--device", args.device, "--api-servers", str(args.workers), "--seq-len", str(args.seq)]
        cmd += ["--workers-per-device", str(args.litserve_workers_per_device)]
        cmd += ["--max-batch-size", str(args.max_batch_size), "--batch-timeout-ms", str(args.max_delay_ms)]
        return cmd, litserve_server.READY_PATH, {}
    if kind == "triton":
        return (*oip_bench.triton_command(args, port, grpc_port, metrics_port), {})
    raise ValueError(kind)


def profile_path(args: argparse.Namespace, point: str) -> Path:
    return Path(args.out.with_name(f"{args.out.stem}-profile-{slug(point)}.txt"))


def try_scrape(url: str) -> Samples | None:
    """/metrics, or None: a broken metrics endpoint is reported by the service's own tests, not fatal here."""
    try:
        return scrape(url)
    except (OSError, ValueError) as exc:
        log.warning("could not read %s/metrics: %s", url, exc)
        return None


def measure(entry: str, server: ServerProcess, args: argparse.Namespace, dim: int, conc: int) -> dict[str, Any]:
    spec = make_spec(FORMAT[entry], server.url, args.seq, dim)
    ours = PROCESS[entry] in OURS
    if ours and FORMAT[entry] == "raw":  # answers checked against the reference, not only their length
        spec = dataclasses.replace(spec, check=args.references.raw_check())
    before, started = (try_scrape(server.url) if ours else None), time.time()
    profiler = None
    if ours and args.profile and conc == max(args.concurrencies):
        profiler = profile.start(server.pid or 0, args.duration + args.warmup, profile_path(args, f"{entry}-c{conc}"))
    point = drive(spec, conc, args.clients, args.warmup, args.duration)
    if profiler is not None:
        point["profile"] = profile.finish(profiler)
    after = try_scrape(server.url) if ours else None
    if before is not None and after is not None:
        point["server_batches"] = batch_sizes(before, after)
        busy = oip_bench.service_busy(before, after, time.time() - started)
        point["server_time"] = time_breakdown(before, after) | busy
        point["server_devices"] = device_samples(before, after)  # samples each device computed
    return {"server": entry, "format": FORMAT[entry], **point}


def run_servers(args: argparse.Namespace, dim: int) -> tuple[list[dict[str, Any]], dict[str, str]]:
    results: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    kinds = list(dict.fromkeys(PROCESS[s] for s in args.server_list))
    runs = [(kind, devices) for kind in kinds for devices in (args.devices or [""] if kind in OURS else [""])]
    for kind, devices in runs:
        entries = [s for s in args.server_list if PROCESS[s] == kind]
        if kind == "litserve" and litserve_server.ls is None:
            skipped[kind] = "litserve is not installed on this host"
            log.warning("skipping litserve: %s", skipped[kind])
            continue
        if kind == "triton" and (reason := triton_server.unavailable()):
            skipped[kind] = reason
            log.warning("skipping triton: %s", reason)
            continue
        port, grpc_port, metrics_port = free_port(), free_port(), free_port()
        command, ready, env = server_command(kind, args, port, grpc_port, metrics_port, devices)
        named = re.sub(r"[^a-z0-9]+", "-", devices.lower()).strip("-")
        log_path = args.out.with_name(f"{args.out.stem}-{kind}{'-' + named if devices else ''}.log")
        first = len(results)
        server = ServerProcess(command, port, ready, log_path, env)
        server.start()
        try:
            server.wait_ready(args.ready_timeout, consecutive=1 if kind == "triton" else 3 * args.workers)
            for entry in entries:
                for conc in args.concurrencies if FORMAT[entry] != "oip" and wants_raw(entry, args) else ():
                    log.info("%s at concurrency %d for %.0f s", entry, conc, args.duration)
                    point = measure(entry, server, args, dim, conc)
                    results.append(point)
                    log.info("  %s", summary_line(point))
                if entry in oip_bench.OIP_SERVERS:
                    metrics = f"http://127.0.0.1:{metrics_port if kind == 'triton' else port}"
                    http, grpc = f"127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"
                    pid = server.pid if entry == "service" else None
                    results += oip_bench.oip_points(entry, (http, grpc, metrics), args, skipped, pid)
        except ServerFailed as exc:
            skipped[kind] = str(exc).splitlines()[0]
            log.error("%s failed: %s", kind, exc)
        except KeyboardInterrupt:  # a time budget ran out (SIGINT): keep and save what was measured
            skipped["interrupted"] = f"stopped during {kind}; later points were not measured"
            log.error("interrupted during %s: saving the points measured so far", kind)
            break
        finally:
            server.stop()
        for point in results[first:] if devices else ():
            point["server"], point["devices"] = f"{point['server']}@{devices}", devices
    return results, skipped


def device_scaling(results: list[dict[str, Any]], devices: list[str]) -> list[dict[str, Any]]:
    """samples/s of ``service@<devices>`` over ``service@<first devices>``, per concurrency (e.g. 2 GPUs vs 1)."""
    by_key = {(r["server"], r["concurrency"]): r for r in results if r.get("format") == "raw"}
    rows = []
    for (server, conc), point in by_key.items():
        base = by_key.get((f"service@{devices[0]}", conc))
        if server.startswith("service@") and base is not None and server != base["server"]:
            ratio = point["samples_per_s"] / max(base["samples_per_s"], 1e-9)
            rows.append({"concurrency": conc, "server": server, "vs": base["server"], "samples_per_s_ratio": ratio})
    return rows


def wants_raw(entry: str, args: argparse.Namespace) -> bool:
    """The service's raw /encode load runs when --protocols names raw; every other server runs its own format."""
    return entry not in OURS or "raw" in args.protocols.split(",")


def summary_line(p: dict[str, Any]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    rate = f"{p['samples_per_s']:,.0f} samples/s"
    return f"{rate}, p50 {ms(p['p50_ms'])} ms, p99 {ms(p['p99_ms'])} ms, {p['errors']} errors"


def markdown(results: list[dict[str, Any]]) -> str:
    by_key = {(r["server"], r["concurrency"]): r for r in results}
    lines = [
        "| server | format | concurrency | samples/s | p50 ms | p99 ms | errors | mean batch | vs echo samples/s | "
        "p50 vs echo | vs naive | engine busy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        echo, naive = by_key.get(("echo", r["concurrency"])), by_key.get(("naive", r["concurrency"]))
        batch = (r.get("server_batches") or r.get("triton") or {}).get("mean_batch_size")
        busy = (r.get("server_time") or {}).get("engine_busy_fraction")

        def ratio(a: float | None, b: float | None) -> str:
            return f"{a / b:.2f}×" if a and b else "-"

        lines.append(
            f"| {r['server']} | {r['format']} | {r['concurrency']} | {r['samples_per_s']:,.0f} | "
            f"{r['p50_ms'] or 0:.1f} | {r['p99_ms'] or 0:.1f} | {r['errors']} | "
            f"{'-' if batch is None else f'{batch:.1f}'} | "
            f"{ratio(r['samples_per_s'], echo and echo['samples_per_s'])} | "
            f"{ratio(r['p50_ms'], echo and echo['p50_ms'])} | "
            f"{ratio(r['samples_per_s'], naive and naive['samples_per_s'])} | "
            f"{'-' if busy is None else f'{busy:.0%}'} |"
        )
    return "\n".join(lines)


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's bar per concurrency: >= 90 % of echo's samples/s, p50 <= 1.2x echo's, >= 1.5x naive."""
    by_key = {(r["server"], r["concurrency"]): r for r in results}
    checks = []
    for (server, conc), ours in by_key.items():
        if server != "service" or ours["format"] != "raw":
            continue
        check: dict[str, Any] = {"concurrency": conc}
        if echo := by_key.get(("echo", conc)):
            check["throughput_vs_echo"] = ours["samples_per_s"] / max(echo["samples_per_s"], 1e-9)
            check["p50_vs_echo"] = (ours["p50_ms"] or 0) / max(echo["p50_ms"] or 1e-9, 1e-9)
            check["meets_echo_bar"] = check["throughput_vs_echo"] >= 0.9 and check["p50_vs_echo"] <= 1.2
        if naive := by_key.get(("naive", conc)):
            check["throughput_vs_naive"] = ours["samples_per_s"] / max(naive["samples_per_s"], 1e-9)
            check["meets_naive_bar"] = check["throughput_vs_naive"] >= 1.5
        checks.append(check)
    return checks


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = sorted(set(args.server_list) - set(SERVERS))
    if unknown:
        sys.stderr.write(f"unknown servers {unknown}; choose from {SERVERS}\n")
        return 2
    args.concurrencies = [int(c) for c in args.concurrency.split(",")]
    if problem := oip_bench.validate(args):
        sys.stderr.write(problem + "\n")
        return 2
    card = card_name(args.device)
    today = dt.date.today().isoformat()
    args.out = args.out or Path(f"loadtest/results/service-{slug(card)}-{today}.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    manifest = ensure_bundle(args.model_dir, args.device)
    args.references = oip_bench.References(args, manifest)
    started = time.time()
    engine = oip_bench.engine_baseline(args)  # before any server: the GPU to itself
    results, skipped = run_servers(args, int(manifest["dims"]["dim"]))
    scaling = device_scaling(results, args.devices) if len(args.devices) > 1 else []
    document = {
        "card": card,
        "date": today,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "host": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "versions": versions(),
        "bundle": {"dir": str(args.model_dir), "precision": manifest["precision"], "dims": manifest["dims"]},
        "settings": {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS},
        "request": {"shape": [args.seq, int(manifest["dims"]["dim"])], "dtype": "float16", "samples": 1},
        "elapsed_s": round(time.time() - started, 1),
        "results": results,
        "targets": targets(results),
        "engine_device_only": engine,
        "oip_targets": oip_bench.oip_targets(results, engine),
        "skipped": skipped,
        "device_scaling": scaling,
    }
    args.out.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(f"\n{card}, {today}: {document['command']}\n")
    print(markdown(results))
    if side_by_side := oip_bench.comparison(results):
        print(f"\nservice vs Triton, same clients:\n\n{side_by_side}")
    for row in scaling:
        print(f"\n{row['server']} vs {row['vs']} at {row['concurrency']}: {row['samples_per_s_ratio']:.2f}x samples/s")
    for name, reason in skipped.items():
        print(f"\nskipped {name}: {reason}")
    for r in (r for r in results if r["errors"]):
        print(f"\nerrors in {r['server']} {r['format']} at {r['concurrency']}: {r['error_kinds']}")
    print(f"\nsaved {args.out}")
    failed = sum(r["errors"] for r in results)
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
