"""Triton Python-backend model: the converter's ONNX bundle on onnxruntime, batches from Triton's dynamic batcher.

Copied into the generated model repository as ``encoder/1/model.py`` (see ``repository.py``). Runs inside
Triton's Python-backend stub, not in the benchmark's interpreter, so it imports only the standard library,
numpy (which the stub itself needs) and onnxruntime, found through the ``sys_path`` parameter the repository
writer recorded. Every request of a batch must have the same (seq, dim): inputs of one sequence length are
concatenated into one engine run; other lengths run separately.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np


def extend_sys_path(entries: str) -> None:
    """Put the benchmark interpreter's package directories first, in their order, so the stub imports the same
    onnxruntime as the benchmark: a GPU host's image may carry a CPU-only onnxruntime in the stub's own
    site-packages (seen on an H200 host: the peer then refused to start on the CPU). numpy, already imported by
    the stub, stays as it is."""
    for entry in reversed(entries.split(os.pathsep)):
        if entry:
            if entry in sys.path:
                sys.path.remove(entry)
            sys.path.insert(0, entry)


def group_by_shape(arrays: list[np.ndarray]) -> dict[tuple[int, ...], list[int]]:
    """Request indices per (seq, dim): those of one shape run as one batch."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, array in enumerate(arrays):
        groups.setdefault(tuple(array.shape[1:]), []).append(index)
    return groups


def run_batched(run: Any, arrays: list[np.ndarray], engine_dtype: np.dtype[Any]) -> list[np.ndarray]:
    """Each request's answer, in the request's dtype, from one ``run`` per shape group.

    The answers are copies, each owning its memory: Triton reads them after ``execute`` returns, through
    DLPack, and a view would keep the whole batch's output alive (or point into a buffer onnxruntime reuses).
    """
    answers: list[np.ndarray] = [np.empty(0)] * len(arrays)
    for indices in group_by_shape(arrays).values():
        batch = np.concatenate([arrays[i] for i in indices]).astype(engine_dtype, copy=False)
        out = run(batch)
        start = 0
        for i in indices:
            rows = arrays[i].shape[0]
            answers[i] = np.array(out[start : start + rows], dtype=arrays[i].dtype, copy=True, order="C")
            start += rows
    return answers


def quiet_capsule_hook(default: Any) -> Any:
    """An unraisable-exception hook that drops numpy 2's complaint about the consumed output capsule.

    ``Tensor.from_dlpack`` renames numpy's capsule once it owns the tensor; numpy 2's capsule destructor then
    reports "PyCapsule_GetPointer called with incorrect name" for every answer (the memory is released by
    the DLPack deleter all the same: the stub's RSS stays flat under load). Every other report goes through.
    """

    def hook(report: Any) -> None:
        if not (isinstance(report.exc_value, ValueError) and "PyCapsule_GetPointer" in str(report.exc_value)):
            default(report)

    return hook


class TritonPythonModel:
    """The Python backend's entry point: ``initialize`` builds the session, ``execute`` runs each batch."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        extend_sys_path(params.get("sys_path", ""))
        sys.unraisablehook = quiet_capsule_hook(sys.unraisablehook)
        import onnxruntime as ort

        provider = params["provider"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "0"))
        if provider == "cuda":
            if hasattr(ort, "preload_dlls"):
                ort.preload_dlls()
            device = int(args.get("model_instance_device_id", 0) or 0)
            providers: list[Any] = [("CUDAExecutionProvider", {"device_id": device}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(params["model_path"], options, providers=providers)
        active = self.session.get_providers()[0]
        wanted = "CUDAExecutionProvider" if provider == "cuda" else "CPUExecutionProvider"
        if active != wanted:  # never a silent CPU fallback: the peer would be measured on the wrong device
            raise RuntimeError(f"onnxruntime runs on {active}, not {wanted}")
        self.input_name = params["input_name"]
        self.output_name = params["output_name"]
        self.engine_dtype = np.dtype(params["engine_dtype"])

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: batch})[0]  # type: ignore[no-any-return]

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        # DLPack both ways, not as_numpy()/Tensor(ndarray): the stub's numpy interop reads numpy 1.x struct
        # layouts, and under numpy 2 it hands the model garbage inputs and answers 0-byte outputs.
        arrays = [np.from_dlpack(pb_utils.get_input_tensor_by_name(r, "input")) for r in requests]
        try:
            answers = run_batched(self._run, arrays, self.engine_dtype)
        except Exception as exc:  # every request of the batch learns why; the model stays up for the next
            error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        return [pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack("output", answer)]) for answer in answers]

    def finalize(self) -> None:
        self.session = None
