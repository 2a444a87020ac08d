"""Write a Triton model repository for the benchmark peer: model ``encoder`` on the Python backend.

The model runs the converter's ONNX bundle with onnxruntime (``model.py`` beside this file). Inputs and outputs
are ``input`` / ``output`` of dims ``[-1, dim]`` (batch dimension implicit: ``max_batch_size``), in the wire
dtype the clients send (FP16 by default; the model casts to the bundle's dtype when they differ).

Dynamic batching: ``max_queue_delay_microseconds`` is the service's ``--max-delay-ms`` (0 in the GPU run), so
both servers get the same batching knob. With 0, Triton batches whatever is queued when an instance frees up:
under closed-loop load the queue fills while an instance runs, so batches form without adding latency at low
load. The preferred batch size is ``max_batch_size``, which only matters when the delay is above 0.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

MODEL_NAME = "encoder"
TRITON_DTYPES = {"float16": "TYPE_FP16", "float32": "TYPE_FP32"}


@dataclass(frozen=True)
class ModelOptions:
    """What the repository needs to know: the bundle, the batching and the instances."""

    bundle_dir: Path
    provider: str = "cpu"  # cuda | cpu
    instances: int = 1
    max_batch_size: int = 64
    max_delay_ms: float = 0.0
    wire_dtype: str = "float16"
    sys_path: tuple[str, ...] = ()
    intra_op_threads: int = 0


def _manifest(bundle_dir: Path) -> dict[str, object]:
    manifest: dict[str, object] = json.loads((bundle_dir / "manifest.json").read_text())
    return manifest


def config_text(options: ModelOptions) -> str:
    """config.pbtxt for the ``encoder`` model."""
    manifest = _manifest(options.bundle_dir)
    dims = manifest["dims"]
    inputs, outputs = manifest["inputs"], manifest["outputs"]
    assert isinstance(dims, dict) and isinstance(inputs, list) and isinstance(outputs, list)
    dim = int(dims["dim"])
    dtype = TRITON_DTYPES[options.wire_dtype]
    kind = "KIND_GPU" if options.provider == "cuda" else "KIND_CPU"
    delay_us = round(options.max_delay_ms * 1000)
    params = {
        "model_path": str((options.bundle_dir / str(manifest["model_file"])).resolve()),
        "input_name": str(inputs[0]["name"]),
        "output_name": str(outputs[0]["name"]),
        "engine_dtype": str(inputs[0]["dtype"]),
        "provider": options.provider,
        "sys_path": ":".join(options.sys_path),
        "intra_op_threads": str(options.intra_op_threads),
    }
    parameters = "\n".join(
        f'parameters: {{ key: "{k}" value: {{ string_value: {json.dumps(v)} }} }}' for k, v in params.items()
    )
    return f"""name: "{MODEL_NAME}"
backend: "python"
max_batch_size: {options.max_batch_size}
input [ {{ name: "input" data_type: {dtype} dims: [ -1, {dim} ] }} ]
output [ {{ name: "output" data_type: {dtype} dims: [ -1, {dim} ] }} ]
instance_group [ {{ count: {options.instances} kind: {kind} }} ]
dynamic_batching {{
  preferred_batch_size: [ {options.max_batch_size} ]
  max_queue_delay_microseconds: {delay_us}
}}
{parameters}
"""


def write_repository(root: Path, options: ModelOptions) -> Path:
    """``root/encoder/{config.pbtxt,1/model.py}``; returns ``root``."""
    model_dir = root / MODEL_NAME
    if model_dir.exists():
        shutil.rmtree(model_dir)
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(config_text(options))
    shutil.copyfile(Path(__file__).with_name("model.py"), model_dir / "1" / "model.py")
    return root
