"""Several GPUs, verified on the GPU host: equal answers per device, and one engine process killed under load.

1. **Equal per device.** One engine process per device (as the service starts them); the same inputs go to
   each device's engine directly; the answers are compared between devices, and batched with unbatched.
2. **Kill -9 under load.** ``python -m service --devices 0,1`` under steady load; at ``--kill-at`` seconds the
   first device's engine process is killed (light loads all go to the first device: it holds work in flight).
   Expected: only requests in flight on it fail (503, each started before it died), every other answer is
   right, /readyz stays 200 naming it down, it is restarted (``encoder_engine_restarts_total``) and computes
   again.

Saves JSON and prints a summary; exits 0 when every check passed. On a two-GPU host, one command:

    python loadtest/verify_devices.py --model-dir bundles/fp16 --devices 0,1
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from loadtest.bench_service import card_name, ensure_bundle, slug
from loadtest.peers.launch import ServerProcess, free_port
from loadtest.peers.scrape import scrape, total
from service.engine.devices import resolve
from service.engine.remote import RemoteEngine
from service.engine.supervisor import RestartPolicy, supervised
from service.settings import Settings

log = logging.getLogger("verify_devices")
TOLERANCE = 2e-2  # fp16 outputs: different batch sizes may pick different kernels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path("bundles/fp16"))
    p.add_argument("--devices", default="0,1")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--seq", type=int, default=196)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--inputs", type=int, default=64, help="distinct inputs (answers checked against phase 1)")
    p.add_argument("--concurrency", type=int, default=48, help="client threads in phase 2")
    p.add_argument("--duration", type=float, default=40.0, help="seconds of load in phase 2")
    p.add_argument("--kill-at", type=float, default=10.0, help="seconds into the load when the engine is killed")
    p.add_argument("--ready-timeout", type=float, default=900.0)
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def npy(x: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, x)
    return buffer.getvalue()


def per_device(args: argparse.Namespace, xs: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
    """Phase 1: every input on every device, batched and one by one; returns the report and device 0's answers."""
    settings = Settings(model_dir=args.model_dir, max_batch_size=args.max_batch_size, seq_lens=(args.seq,))
    settings = settings.model_copy(update={"devices": args.devices})
    os.environ.update(settings.to_env())
    devices = resolve(settings)
    answers: dict[str, np.ndarray] = {}
    single: dict[str, float] = {}
    with supervised(devices, RestartPolicy(limit=0)) as supervisor:
        for device, path in zip(devices, supervisor.board.sockets, strict=True):
            engine = RemoteEngine(path)
            try:
                step = min(args.max_batch_size, len(xs))
                outs = [np.array(engine.run(xs[i : i + step])) for i in range(0, len(xs), step)]
                answers[device.label] = np.concatenate(outs).astype(np.float32)
                alone = np.array(engine.run(xs[:1])).astype(np.float32)
                single[device.label] = float(np.abs(alone[0] - answers[device.label][0]).max())
            finally:
                engine.close()
    first = answers[devices[0].label]
    between = {label: float(np.abs(out - first).max()) for label, out in answers.items()}
    report = {
        "devices": [d.label for d in devices],
        "max_abs_diff_vs_device_" + devices[0].label: between,
        "max_abs_diff_batched_vs_alone": single,
        "equal": all(v <= TOLERANCE for v in (*between.values(), *single.values())),
        "bitwise_equal_between_devices": all(np.array_equal(out, first) for out in answers.values()),
    }
    return report, first


class Load:
    """Client threads cycling through the inputs; every outcome with its start time and whether it was right."""

    def __init__(self, url: str, xs: np.ndarray, refs: np.ndarray, threads: int) -> None:
        self.url, self.xs, self.refs = url, xs, refs
        self.bodies = [npy(x[np.newaxis]) for x in xs]
        self.results: list[tuple[float, int | str, bool]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(threads)]

    def _client(self, seed: int) -> None:
        headers = {"content-type": "application/x-npy", "accept": "application/x-npy"}
        with httpx.Client(timeout=30) as client:
            n = seed
            while not self._stop.is_set():
                i = n % len(self.xs)
                n += 7
                started = time.monotonic()
                try:
                    response = client.post(f"{self.url}/encode", content=self.bodies[i], headers=headers)
                except httpx.HTTPError as exc:
                    self.results.append((started, type(exc).__name__, False))
                    continue
                right = False
                if response.status_code == 200:
                    out = np.load(io.BytesIO(response.content)).astype(np.float32)[0]
                    right = bool(np.allclose(out, self.refs[i], rtol=TOLERANCE, atol=TOLERANCE))
                self.results.append((started, response.status_code, right))

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def engine_of(server_pid: int, label: str) -> psutil.Process:
    for child in psutil.Process(server_pid).children(recursive=True):
        command = child.cmdline()
        if "service.engine.host" in " ".join(command) and command[command.index("--device") + 1] == label:
            return child
    raise RuntimeError(f"no engine process for device {label}")


def kill_under_load(args: argparse.Namespace, xs: np.ndarray, refs: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Phase 2; see the module docstring. The first device's engine process is killed (the one computing)."""
    victim = labels[0]
    port = free_port()
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), "--log-level", "info"]
    command += ["--model-dir", str(args.model_dir), "--devices", args.devices, "--workers", str(args.workers)]
    command += ["--seq-lens", str(args.seq), "--max-batch-size", str(args.max_batch_size)]
    log_path = args.out.with_name(f"{args.out.stem}-service.log")
    server = ServerProcess(command, port, "/readyz", log_path, {})
    server.start()
    try:
        server.wait_ready(args.ready_timeout, consecutive=3)
        url = server.url
        load = Load(url, xs, refs, args.concurrency)
        load.start()
        time.sleep(args.kill_at)
        before = scrape(url)
        process = engine_of(server.pid or 0, victim)
        process.kill()
        process.wait(30)
        dead_at = time.monotonic()
        readiness: list[tuple[float, int, dict[str, str]]] = []
        back_at = None
        while time.monotonic() - dead_at < args.duration - args.kill_at:
            with contextlib.suppress(httpx.HTTPError):
                ready = httpx.get(f"{url}/readyz", timeout=10)
                devices = ready.json().get("devices") or {} if ready.status_code == 200 else {}
                readiness.append((round(time.monotonic() - dead_at, 2), ready.status_code, devices))
                if back_at is None and devices.get(victim) == "up" and len(readiness) > 1:
                    back_at = time.monotonic()
            time.sleep(0.25)
        load.stop()
        after = scrape(url)
    finally:
        server.stop()
    statuses = [status for _, status, _ in load.results]
    failed = [started for started, status, _ in load.results if status == 503]
    computed_after = total(after, "encoder_samples_processed_total", device=victim) - total(
        before, "encoder_samples_processed_total", device=victim
    )
    report = {
        "killed_device": victim,
        "requests": len(statuses),
        "outcomes": {str(s): statuses.count(s) for s in sorted(set(statuses), key=str)},
        "wrong_answers": sum(1 for _, status, right in load.results if status == 200 and not right),
        "503_started_after_death": sum(1 for started in failed if started >= dead_at),
        "readyz_always_200": all(code == 200 for _, code, _ in readiness),
        "readyz_named_it_down": any(d.get(victim) == "down" for _, _, d in readiness),
        "recovery_s": None if back_at is None else round(back_at - dead_at, 2),
        "restarts": total(after, "encoder_engine_restarts_total", device=victim),
        "victim_samples_since_kill": computed_after,
        "samples_per_device": {d: total(after, "encoder_samples_processed_total", device=d) for d in labels},
    }
    report["passed"] = (
        set(statuses) <= {200, 503}
        and report["wrong_answers"] == 0
        and report["503_started_after_death"] == 0
        and report["readyz_always_200"]
        and report["readyz_named_it_down"]
        and report["restarts"] == 1
        and report["recovery_s"] is not None
        and computed_after > 0
    )
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    card = card_name("cuda")
    today = dt.date.today().isoformat()
    args.out = args.out or Path(f"loadtest/results/devices-{slug(card)}-{today}.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    manifest = ensure_bundle(args.model_dir, "cpu" if args.devices.startswith("cpu") else "cuda")
    dim = int(manifest["dims"]["dim"])
    dtype = manifest["inputs"][0]["dtype"]
    xs = np.random.default_rng(0).standard_normal((args.inputs, args.seq, dim)).astype(dtype)
    equality, refs = per_device(args, xs)
    log.info("per device: %s", equality)
    killed = kill_under_load(args, xs, refs, equality["devices"])
    log.info("kill under load: %s", killed)
    document = {
        "card": card,
        "date": today,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "equal_per_device": equality,
        "kill_under_load": killed,
    }
    args.out.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(json.dumps({"equal_per_device": equality, "kill_under_load": killed}, indent=2, default=str))
    print(f"\nsaved {args.out}")
    return 0 if equality["equal"] and killed["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
