"""One tritonclient (HTTP) script for any Open Inference Protocol server: this service, or Triton itself.

It runs the same calls against a URL and returns what the server answered: health, metadata, statistics, the
outputs of a fixed set of inputs (FP32 and FP16, client batches of 1 and 4, JSON and binary tensors) and the
HTTP status of each bad request. Run it against two servers and compare, e.g. this service and a Triton serving
the same bundle:

    python -m loadtest.oip_conformance --url 127.0.0.1:8000 --out ours.npz
    python -m loadtest.oip_conformance --url 127.0.0.1:9000 --out triton.npz --compare ours.npz

(``--compare`` prints the largest difference per case and which bad requests were refused with which status.)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

DATATYPES = {"FP32": np.float32, "FP16": np.float16}
BATCHES = (1, 4)


@dataclass
class Answers:
    """What one server answered. ``outputs`` maps a case to its output; ``failed`` a case to the server's error;
    ``refused`` a bad request to its HTTP status (None: the server accepted it)."""

    live: bool
    ready: bool
    model_ready: bool
    server: dict[str, Any]
    model: dict[str, Any]
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    refused: dict[str, int | None] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


def case_input(datatype: str, batch: int, seq_len: int, dim: int) -> np.ndarray:
    """The same values on every run (seeded by the case), so two servers see identical inputs."""
    seed = (list(DATATYPES).index(datatype) * 10 + batch) * 1000 + seq_len
    return np.random.default_rng(seed).standard_normal((batch, seq_len, dim)).astype(DATATYPES[datatype])


def infer(client: httpclient.InferenceServerClient, model: str, x: np.ndarray, binary: bool) -> np.ndarray:
    """One request: ``binary`` sends and asks for binary tensors, otherwise JSON both ways."""
    datatype = "FP16" if x.dtype == np.float16 else "FP32"
    tensor = httpclient.InferInput("input", list(x.shape), datatype)
    tensor.set_data_from_numpy(x, binary_data=binary)
    wanted = httpclient.InferRequestedOutput("output", binary_data=binary)
    result = client.infer(model, [tensor], outputs=[wanted])
    output = result.as_numpy("output")
    if output is None:
        raise RuntimeError("the answer has no output named 'output'")
    return output


def status_of(call: Any) -> int | None:
    """The HTTP status a request was refused with, None if it was answered."""
    try:
        call()
    except InferenceServerException as exc:
        return int(exc.status()) if exc.status() and str(exc.status()).isdigit() else -1
    return None


def bad_requests(client: httpclient.InferenceServerClient, model: str, dim: int) -> dict[str, Any]:
    """Requests every server must refuse with a 4xx, as zero-argument calls."""
    x = case_input("FP32", 1, 4, dim)

    def send(name: str = "input", datatype: str = "FP32", shape: list[int] | None = None, array: Any = x,
             output: str = "output", to: str = model) -> Any:  # fmt: skip
        def call() -> Any:
            tensor = httpclient.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array, binary_data=True)
            if shape is not None:
                tensor.set_shape(shape)
            return client.infer(to, [tensor], outputs=[httpclient.InferRequestedOutput(output)])

        return call

    return {
        "unknown model": send(to=model + "_missing"),
        "unknown input": send(name="tokens"),
        "unknown output": send(output="logits"),
        "INT32 input": send(datatype="INT32", array=x.astype(np.int32)),
        "wrong width": send(array=case_input("FP32", 1, 4, dim + 1)),
        "rank 1": send(array=x.reshape(-1)),
        "shape does not match the data": send(shape=[1, 5, dim]),
    }


def run(url: str, model: str = "encoder", seq_len: int = 16) -> Answers:
    """Every call against the server at ``url`` (host:port)."""
    with httpclient.InferenceServerClient(url=url, network_timeout=120) as client:
        metadata = client.get_model_metadata(model)
        answers = Answers(
            live=client.is_server_live(),
            ready=client.is_server_ready(),
            model_ready=client.is_model_ready(model),
            server=client.get_server_metadata(),
            model=metadata,
        )
        dim = int(metadata["inputs"][0]["shape"][-1])
        for datatype in DATATYPES:
            for batch in BATCHES:
                for binary in (False, True):
                    case = f"{datatype} bs={batch} {'binary' if binary else 'json'}"
                    x = case_input(datatype, batch, seq_len, dim)
                    answers.inputs[case] = x
                    try:
                        answers.outputs[case] = infer(client, model, x, binary)
                    except InferenceServerException as exc:
                        answers.failed[case] = f"{exc.status()}: {exc.message()}"
        for name, call in bad_requests(client, model, dim).items():
            answers.refused[name] = status_of(call)
        answers.stats = client.get_inference_statistics(model)
        answers.config = client.get_model_config(model)
    return answers


def save(answers: Answers, path: Path) -> None:
    arrays = {f"output/{case}": out for case, out in answers.outputs.items()}
    arrays |= {f"input/{case}": x for case, x in answers.inputs.items()}
    np.savez(path, **arrays)  # type: ignore[arg-type]
    summary = {k: v for k, v in vars(answers).items() if k not in ("inputs", "outputs")}
    path.with_suffix(".json").write_text(json.dumps(summary, indent=2, default=str))


def compare(answers: Answers, other: Path) -> list[str]:
    """One line per case: the largest absolute difference to the outputs saved in ``other``."""
    saved = np.load(other)
    lines = []
    for case, out in answers.outputs.items():
        key = f"output/{case}"
        if key not in saved:
            lines.append(f"{case}: only here")
            continue
        diff = np.abs(out.astype(np.float32) - saved[key].astype(np.float32)).max()
        lines.append(f"{case}: max |difference| {diff:.3g}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="127.0.0.1:8000", help="host:port of the server's HTTP endpoint")
    parser.add_argument("--model", default="encoder")
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--out", type=Path, help="save the answers (.npz, and a .json summary beside it)")
    parser.add_argument("--compare", type=Path, help="a saved .npz to compare the outputs with")
    args = parser.parse_args(argv)
    answers = run(args.url, args.model, args.seq_len)
    print(f"live={answers.live} ready={answers.ready} model_ready={answers.model_ready}")
    print(f"server: {answers.server}\nmodel: {answers.model}")
    print(f"answered: {sorted(answers.outputs)}\nfailed: {answers.failed}\nrefused: {answers.refused}")
    if args.out is not None:
        save(answers, args.out)
    if args.compare is not None:
        print("\n".join(compare(answers, args.compare)))
    refused_all = all(status is not None and 400 <= status < 500 for status in answers.refused.values())
    return 0 if refused_all and not answers.failed else 1


if __name__ == "__main__":
    sys.exit(main())
