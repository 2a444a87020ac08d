"""Locust scenarios for /encode and the Open Inference Protocol: .npy, raw, JSON and OIP binary-tensor users,
a realistic mix of shapes, and answers checked.

Each request is checked for status and shape; a sample of them (``ENCODER_CHECK_FRACTION``, default 0.05)
also for values. Inputs are deterministic (one seeded sample per (seq, seed)), so the same sample is sent
again and again, alone or inside batches of 8 and 32: its first answer is remembered as a small sketch (the
output projected on 4 fixed random directions) and every later answer must match it within tolerance,
whatever batch the server put it in. With ``ENCODER_CHECK_TORCH=1`` (and torch importable; the served bundle
must be the built-in default model) the sketches are computed up front with PyTorch instead, so even first
answers are checked against an independent reference.

The OIP user posts to ``/v2/models/<LOCUST_OIP_MODEL, default encoder>/infer`` with the binary tensor
extension (a JSON header, ``Inference-Header-Content-Length``, then the raw FP16 tensor) and reads the answer
the same way, checking the declared ``binary_data_size``. Requests are named ``encode <format> bs=<client batch
size>`` so locust's stats split by both. The load
steps up through ``LOCUST_STEPS`` users (default 4,8,16), ``LOCUST_STEP_SECONDS`` each (default 20). Users
run a closed loop by default; ``LOCUST_USER_RPS`` paces each one at that many requests per second instead, so
users x rate is an offered load that does not shrink when the server answers slowly or refuses (soak tests).
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from gevent.lock import BoundedSemaphore
from locust import FastHttpUser, LoadTestShape, constant, constant_throughput, events, task

log = logging.getLogger("loadtest")
SKETCH_DIRS = 4
USER_RPS = os.environ.get("LOCUST_USER_RPS")


def env_weights(name: str, default: str) -> list[tuple[int, int]]:
    """'196:6,128:2' -> [(196, 6), (128, 2)]: values with relative weights."""
    pairs = []
    for part in os.environ.get(name, default).split(","):
        value, _, weight = part.partition(":")
        pairs.append((int(value), int(weight or 1)))
    return pairs


class Reference:
    """Per process: the model's shape, the deterministic inputs, and the sketches answers must match."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.dim = int(info["dim"])
        self.max_seq_len = int(info["max_seq_len"])
        self.dims = info.get("details", {}).get("dims", {"dim": self.dim})
        self.pool = int(os.environ.get("LOCUST_POOL", "32"))
        self.rtol = float(os.environ.get("ENCODER_CHECK_RTOL", "2e-2"))
        self.fraction = float(os.environ.get("ENCODER_CHECK_FRACTION", "0.05"))
        seqs = [(s, w) for s, w in env_weights("LOCUST_SEQ_LENS", "196:6,128:2,64:2") if s <= self.max_seq_len]
        self.seq_lens = seqs or [(self.max_seq_len, 1)]
        self.directions = np.random.default_rng(7).standard_normal((self.dim, SKETCH_DIRS)).astype(np.float32)
        self.inputs: dict[tuple[int, int], np.ndarray] = {}
        self.sketches: dict[tuple[int, int], np.ndarray] = {}
        self.counts = {"checked": 0, "mismatched": 0, "first_seen": 0, "torch_reference": 0}
        if os.environ.get("ENCODER_CHECK_TORCH") == "1":
            self._torch_sketches()

    def sample(self, seq: int, seed: int) -> np.ndarray:
        key = (seq, seed % self.pool)
        if key not in self.inputs:
            rng = np.random.default_rng([seq, key[1]])
            self.inputs[key] = rng.standard_normal((seq, self.dim)).astype(np.float16)
        return self.inputs[key]

    def sketch(self, output: np.ndarray) -> np.ndarray:
        return np.asarray(output, dtype=np.float32) @ self.directions

    def _torch_sketches(self) -> None:
        try:
            import torch

            from converter.model import EncoderDims, default_model
        except ImportError as exc:
            log.warning("ENCODER_CHECK_TORCH=1 but %s: checking answers against each other only", exc)
            return
        model = default_model(EncoderDims(**{k: int(v) for k, v in self.dims.items()}))
        # Up front, before the load: a CPU forward pass would block every user of this gevent process.
        with torch.inference_mode():
            for seq, _ in self.seq_lens:
                batch = np.stack([self.sample(seq, seed) for seed in range(self.pool)]).astype(np.float32)
                out = model(torch.from_numpy(batch)).numpy()
                for seed in range(self.pool):
                    self.sketches[(seq, seed)] = self.sketch(out[seed])
        self.counts["torch_reference"] = len(self.sketches)

    def check(self, seq: int, seeds: list[int], output: np.ndarray) -> str | None:
        """Compare each sample's answer with its sketch (remembering first answers); a message if one is off."""
        for seed, out in zip(seeds, output, strict=True):
            key = (seq, seed % self.pool)
            got = self.sketch(out)
            if not np.isfinite(got).all():
                self.counts["mismatched"] += 1
                return f"non-finite values for sample {key}"
            want = self.sketches.get(key)
            if want is None:
                self.sketches[key] = got
                self.counts["first_seen"] += 1
                continue
            self.counts["checked"] += 1
            err = float(np.linalg.norm(got - want) / max(float(np.linalg.norm(want)), 1e-12))
            if err > self.rtol:
                self.counts["mismatched"] += 1
                return f"sample {key}: answer differs from the reference by rel L2 {err:.3g} > {self.rtol:g}"
        return None


_lock = BoundedSemaphore(1)
_reference: Reference | None = None


def reference(host: str) -> Reference:
    """Fetched once per process from /v1/models; users that arrive meanwhile wait for it."""
    global _reference
    with _lock:
        if _reference is None:
            with urllib.request.urlopen(host.rstrip("/") + "/v1/models", timeout=30) as response:
                info = json.load(response)["models"][0]
            _reference = Reference(info)
            log.info("model %s: dim %s, max_seq_len %s", info.get("name"), info["dim"], info["max_seq_len"])
    return _reference


@events.test_stop.add_listener
def _save_checks(environment: Any, **_: Any) -> None:
    out = os.environ.get("LOCUST_CHECKS_DIR")
    if out and _reference is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"checks-{os.getpid()}.json").write_text(json.dumps(_reference.counts))


class EncoderUser(FastHttpUser):
    """One client in a closed loop (no think time): users = concurrency."""

    abstract = True
    fmt = ""
    wait_time = constant_throughput(float(USER_RPS)) if USER_RPS else constant(0)
    network_timeout = 120.0
    connection_timeout = 30.0
    batch_sizes = env_weights("LOCUST_BATCH_SIZES", "1:8,8:3,32:1")
    path = "/encode"
    bare_single = True  # whether bs=1 may go as a bare (S, D) sample

    def on_start(self) -> None:
        self.ref = reference(self.host or "")
        self.rng = random.Random()

    def body(self, x: np.ndarray) -> tuple[bytes, dict[str, str]]:
        raise NotImplementedError

    def decode(self, response: Any) -> np.ndarray:
        raise NotImplementedError

    @task
    def encode(self) -> None:
        ref = self.ref
        sizes, weights = zip(*self.batch_sizes, strict=True)
        bs = self.rng.choices(sizes, weights)[0]
        seqs, seq_weights = zip(*ref.seq_lens, strict=True)
        seq = self.rng.choices(seqs, seq_weights)[0]
        first = self.rng.randrange(ref.pool)
        seeds = [first + i for i in range(bs)]
        # bs=1 goes as a bare (S, D) half of the time: both request ranks are part of the API.
        x = np.stack([ref.sample(seq, s) for s in seeds])
        sent = x[0] if bs == 1 and self.bare_single and self.rng.random() < 0.5 else x
        data, headers = self.body(sent)
        name = f"encode {self.fmt} bs={bs}"
        with self.client.post(self.path, data=data, headers=headers, name=name, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                return
            try:
                out = self.decode(resp)
            except Exception as exc:  # any undecodable answer is a failed request, with the reason
                resp.failure(f"undecodable answer: {type(exc).__name__}: {exc}")
                return
            if out.shape != sent.shape:
                resp.failure(f"answer shape {list(out.shape)}, expected {list(sent.shape)}")
                return
            if self.rng.random() < ref.fraction:
                problem = ref.check(seq, seeds, out.reshape(x.shape))
                if problem:
                    resp.failure(problem)
                    return
            resp.success()


class NpyUser(EncoderUser):
    weight = 3
    fmt = "npy"

    def body(self, x: np.ndarray) -> tuple[bytes, dict[str, str]]:
        buffer = io.BytesIO()
        np.save(buffer, x, allow_pickle=False)
        return buffer.getvalue(), {"Content-Type": "application/x-npy"}

    def decode(self, response: Any) -> np.ndarray:
        out = np.load(io.BytesIO(response.content), allow_pickle=False)
        if out.dtype != np.float16:
            raise ValueError(f"answer dtype {out.dtype}, expected float16 (the request's)")
        return out


class RawUser(EncoderUser):
    weight = 3
    fmt = "raw"

    def body(self, x: np.ndarray) -> tuple[bytes, dict[str, str]]:
        shape = ",".join(map(str, x.shape))
        return x.tobytes(), {"Content-Type": "application/octet-stream", "X-Shape": shape, "X-Dtype": "float16"}

    def decode(self, response: Any) -> np.ndarray:
        if response.headers.get("X-Dtype") != "float16":
            raise ValueError(f"X-Dtype {response.headers.get('X-Dtype')!r}, expected float16")
        shape = tuple(int(n) for n in response.headers["X-Shape"].split(","))
        return np.frombuffer(response.content, dtype="<f2").reshape(shape)


class JsonUser(EncoderUser):
    """JSON costs ~10x the bytes and real parsing: fewer of these users, and no bs=32 (48 MB bodies)."""

    weight = 1
    fmt = "json"
    batch_sizes = [(bs, w) for bs, w in EncoderUser.batch_sizes if bs <= 8] or [(1, 1)]

    def body(self, x: np.ndarray) -> tuple[bytes, dict[str, str]]:
        data = orjson.dumps({"inputs": x.astype(np.float32)}, option=orjson.OPT_SERIALIZE_NUMPY)
        return data, {"Content-Type": "application/json"}

    def decode(self, response: Any) -> np.ndarray:
        document = orjson.loads(response.content)
        out = np.asarray(document["outputs"], dtype=np.float32)
        if list(out.shape) != document["shape"]:
            raise ValueError(f"'shape' {document['shape']} does not match the outputs {list(out.shape)}")
        return out


class OipUser(EncoderUser):
    """Open Inference Protocol v2 with binary tensors, as tritonclient sends them: the body is a JSON header
    (its length in ``Inference-Header-Content-Length``) followed by the raw FP16 tensor; so is the answer."""

    weight = 3
    fmt = "oip"
    path = f"/v2/models/{os.environ.get('LOCUST_OIP_MODEL', 'encoder')}/infer"
    bare_single = False  # the protocol's tensors carry their batch dimension

    def body(self, x: np.ndarray) -> tuple[bytes, dict[str, str]]:
        tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP16"}
        header = {
            "inputs": [tensor | {"parameters": {"binary_data_size": x.nbytes}}],
            "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
        }
        head = orjson.dumps(header)
        headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}
        return head + x.tobytes(), headers

    def decode(self, response: Any) -> np.ndarray:
        size = int(response.headers["Inference-Header-Content-Length"])
        content = response.content
        header = orjson.loads(content[:size])
        (output,) = header["outputs"]
        if output["name"] != "output" or output["datatype"] != "FP16":
            raise ValueError(f"answer tensor {output['name']!r} {output['datatype']}, expected 'output' FP16")
        declared = output.get("parameters", {}).get("binary_data_size")
        data = content[size:]
        if declared != len(data) or len(data) != 2 * int(np.prod(output["shape"])):
            raise ValueError(f"binary_data_size {declared}, {len(data)} bytes, shape {output['shape']}")
        return np.frombuffer(data, dtype="<f2").reshape(output["shape"])


class StepLoadShape(LoadTestShape):
    """Step the number of users up: ``LOCUST_STEPS`` users, ``LOCUST_STEP_SECONDS`` each, then stop."""

    def __init__(self) -> None:
        super().__init__()
        self.steps = [int(s) for s in os.environ.get("LOCUST_STEPS", "4,8,16").split(",") if s.strip()]
        self.step_seconds = float(os.environ.get("LOCUST_STEP_SECONDS", "20"))
        # Default: every step's users at once, so each step is measured at its full concurrency.
        self.spawn_rate = float(os.environ.get("LOCUST_SPAWN_RATE", str(max(self.steps, default=1))))

    def tick(self) -> tuple[int, float] | None:
        index = int(self.get_run_time() // self.step_seconds)
        if index >= len(self.steps):
            return None
        return self.steps[index], self.spawn_rate
