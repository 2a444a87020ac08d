"""The OIP conformance script (``loadtest/oip_conformance.py``) against this service and a real Triton serving
the same bundle, answers compared: every case Triton answers must get the same answer from the service within
the datatype's tolerance, and every bad request must be refused with a 4xx by both.

    python -m loadtest.peers.triton.conformance --model-dir bundles/fp32 --provider cpu

A Triton model has one datatype per tensor, so Triton runs twice, once with FP32 and once with FP16 tensors
(each run answers that datatype's cases and refuses the others). Prints one line per case and per bad request;
exit status 0 when everything agrees. Needs ``nvidia-pytriton`` (see ``loadtest/peers/triton``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loadtest import oip_conformance
from loadtest.peers.launch import free_port, running
from loadtest.peers.triton.server import READY_PATH

TOLERANCE = {"FP32": 1e-4, "FP16": 1e-2}  # |ours - Triton's| <= tol * (1 + |Triton's|), element-wise


@dataclass
class Report:
    """The comparison: per case the largest scaled difference, per bad request both statuses, what failed."""

    differences: dict[str, float] = field(default_factory=dict)
    statuses: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)
    not_compared: dict[str, str] = field(default_factory=dict)  # cases Triton refuses (JSON FP16), and why
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{case}: max |service - Triton| / (1 + |Triton|) = {d:.3g}" for case, d in self.differences.items()]
        out += [f"{case}: not compared, Triton refuses it: {why}" for case, why in self.not_compared.items()]
        out += [f"bad request '{name}': service {a}, Triton {b}" for name, (a, b) in self.statuses.items()]
        return out + [f"PROBLEM: {p}" for p in self.problems]


def compare(ours: oip_conformance.Answers, triton: Sequence[oip_conformance.Answers]) -> Report:
    """Ours against the Triton runs (each answers the cases of its datatype)."""
    report = Report()
    for case, out in ours.outputs.items():
        peer = next((t.outputs[case] for t in triton if case in t.outputs), None)
        if peer is None:
            refusals = [t.failed[case] for t in triton if case in t.failed]
            if case.endswith("json") and refusals:  # Triton takes FP16 only as binary data; the service does both
                report.not_compared[case] = refusals[-1]
            else:
                report.problems.append(f"{case}: no Triton run answered it ({refusals})")
            continue
        if peer.shape != out.shape or peer.dtype != out.dtype:
            report.problems.append(f"{case}: service {out.dtype}{out.shape}, Triton {peer.dtype}{peer.shape}")
            continue
        want = peer.astype(np.float32)
        scaled = float((np.abs(out.astype(np.float32) - want) / (1.0 + np.abs(want))).max())
        report.differences[case] = scaled
        if scaled > TOLERANCE[case.split()[0]]:
            report.problems.append(f"{case}: answers differ by {scaled:.3g} > {TOLERANCE[case.split()[0]]:g}")
    report.problems += [f"{case}: the service failed: {why}" for case, why in ours.failed.items()]
    for name, status in ours.refused.items():
        peer_status = triton[0].refused.get(name)
        report.statuses[name] = (status, peer_status)
        for who, code in (("service", status), ("Triton", peer_status)):
            if code is None or not 400 <= code < 500:
                report.problems.append(f"bad request '{name}': {who} answered {code}, not a 4xx")
    return report


def run_service(model_dir: Path, provider: str, work: Path, seq_len: int) -> oip_conformance.Answers:
    port = free_port()
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), "--model-dir"]
    command += [str(model_dir), "--provider", provider, "--seq-lens", str(seq_len), "--log-level", "warning"]
    with running(command, port, "/readyz", work / "service.log", timeout_s=300):
        return oip_conformance.run(f"127.0.0.1:{port}", seq_len=seq_len)


def run_triton(model_dir: Path, provider: str, dtype: str, work: Path, seq_len: int) -> oip_conformance.Answers:
    http = free_port()
    command = [sys.executable, "-m", "loadtest.peers.triton.server", "--model-dir", str(model_dir)]
    command += ["--provider", provider, "--instances", "1", "--dtype", dtype, "--http-port", str(http)]
    command += ["--grpc-port", str(free_port()), "--metrics-port", str(free_port()), "--workdir", str(work / dtype)]
    with running(command, http, READY_PATH, work / f"triton-{dtype}.log", timeout_s=300):
        return oip_conformance.run(f"127.0.0.1:{http}", seq_len=seq_len)


def conformance(model_dir: Path, provider: str, work: Path, seq_len: int = 16) -> Report:
    ours = run_service(model_dir, provider, work, seq_len)
    triton = [run_triton(model_dir, provider, dtype, work, seq_len) for dtype in ("float32", "float16")]
    return compare(ours, triton)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--provider", choices=("cuda", "cpu"), default="cpu")
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--workdir", type=Path, help="logs and Triton repositories (default: a temporary dir)")
    args = parser.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="oip-conformance-"))
    work.mkdir(parents=True, exist_ok=True)
    report = conformance(args.model_dir, args.provider, work, args.seq_len)
    print("\n".join(report.lines()))
    print(f"logs in {work}")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
