"""Which samples of a batch hold a NaN or an infinity, computed where the batch already is.

The service refuses non-finite inputs (422). On the host that check is a full read of every input: on an H200
host serving system shared memory it was the largest single cost in a worker (py-spy, client batches of 16,
2026-11-30: more than the two host copies together), because the worker reads each 301 KB sample from another
process's memory only to check it. Once the engine copies inputs straight from a client's region to the GPU,
no worker needs to touch those bytes, and the check runs on the device instead, on the batch already there.

How: for IEEE floats ``x - x`` is 0 when ``x`` is finite and NaN when it is an infinity or a NaN, and a sum
propagates NaN, so ``ReduceSum(x - x)`` over (S, D) is exactly 0 for a finite sample and NaN otherwise (a sum of
zeros cannot overflow, in any precision). A two-node ONNX graph run by onnxruntime on the device buffer, B
numbers back to the host: no host pass over the data. :func:`finite_rows` is the same answer computed on the
host, for batches that are not on a device (the CPU engine, or a batch that runs without a captured slot).

The engine's own batches need no run of their own: :func:`with_finite_output` adds the same two nodes to the
model as a second output (:data:`FLAGS_OUTPUT`), so the CUDA session's captured graphs compute the flags with the
answers and they come back with them (``converter.merged``). :class:`FiniteCheck` remains for inputs checked
before they reach a batch (client CUDA regions, see ``service.engine.jobs``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

OPSET = 18  # ReduceSum takes its axes as an input from opset 13 on
FLAGS_OUTPUT = "finite_flags"  # the added output: (B,), 0 for a finite sample, NaN otherwise
_EXPONENT16 = 0x7C00  # a float16 whose exponent bits are all ones is an Inf or a NaN


def finite_rows(x: np.ndarray) -> np.ndarray:
    """Per-sample flags of a host (B, ...) array: True where every value of the sample is finite.

    onnx and onnxruntime are imported only by the device check, so a worker can use this without them. float16 is
    tested on its bits (numpy's half-precision ``isfinite`` is scalar code, several times slower)."""
    rows = x.reshape(x.shape[0], -1)
    if x.dtype == np.float16:
        if rows.shape[1] == 0:
            return np.ones(x.shape[0], bool)
        return np.asarray((rows.view(np.uint16) & _EXPONENT16).max(axis=1) != _EXPONENT16)
    return np.asarray(np.isfinite(rows).all(axis=1))


def _flag_nodes(x: str, y: str, prefix: str, opset: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes (and initializers) computing ``y`` (B,) = ReduceSum(x - x) over axes 1 and 2 of ``x`` (B, S, D)."""
    from onnx import TensorProto, helper

    diff = f"{prefix}zero_or_nan"
    if opset < 13:  # axes are an attribute before opset 13
        reduce = helper.make_node("ReduceSum", [diff], [y], axes=[1, 2], keepdims=0)
        return [helper.make_node("Sub", [x, x], [diff]), reduce], []
    axes = helper.make_tensor(f"{prefix}axes", TensorProto.INT64, [2], [1, 2])
    reduce = helper.make_node("ReduceSum", [diff, axes.name], [y], keepdims=0)
    return [helper.make_node("Sub", [x, x], [diff]), reduce], [axes]


def _element(dtype: np.dtype[Any]) -> int:
    from onnx import TensorProto

    return {np.dtype(np.float16): TensorProto.FLOAT16, np.dtype(np.float32): TensorProto.FLOAT}[np.dtype(dtype)]


def finite_graph(dtype: np.dtype[Any]) -> onnx.ModelProto:
    """x: (B, S, D) -> y: (B,), 0 where the sample is finite, NaN where it holds an Inf or a NaN."""
    import onnx
    from onnx import helper

    element = _element(dtype)
    nodes, initializers = _flag_nodes("x", "y", "", OPSET)
    graph = helper.make_graph(
        nodes,
        "finite_samples",
        [helper.make_tensor_value_info("x", element, ["batch", "seq", "dim"])],
        [helper.make_tensor_value_info("y", element, ["batch"])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9  # what onnxruntime 1.2x+ reads; the graph uses nothing newer
    onnx.checker.check_model(model)
    return model


def with_finite_output(model: onnx.ModelProto, input_name: str, dtype: np.dtype[Any]) -> onnx.ModelProto:
    """``model`` (changed in place and returned) with :data:`FLAGS_OUTPUT`: the per-sample flags of its input.

    Two nodes beside the model's own, reading only its input: no node of the model changes or gains an input, so
    its outputs are those of the model alone (the tests compare them bit for bit)."""
    from onnx import helper

    names = {o.name for o in model.graph.output} | {i.name for i in model.graph.initializer}
    names |= {out for node in model.graph.node for out in node.output}
    if FLAGS_OUTPUT in names or input_name not in {i.name for i in model.graph.input}:
        raise ValueError(f"cannot add {FLAGS_OUTPUT!r} for input {input_name!r} to this model")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), OPSET)
    nodes, initializers = _flag_nodes(input_name, FLAGS_OUTPUT, f"{FLAGS_OUTPUT}/", opset)
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(initializers)
    model.graph.output.append(helper.make_tensor_value_info(FLAGS_OUTPUT, _element(dtype), ["batch"]))
    return model


class FiniteCheck:
    """Per-sample finiteness of a batch in device (or host) memory, one onnxruntime run per call.

    ``provider`` is the session's: CUDAExecutionProvider checks device buffers (:meth:`device`), the CPU one
    host arrays (:meth:`host`, for tests and the CPU engine). Not thread-safe: the engine calls it from the one
    thread that runs its batches.
    """

    def __init__(self, dtype: np.dtype[Any], provider: str = "CPUExecutionProvider", device_id: int = 0) -> None:
        import onnxruntime as ort

        self.dtype = np.dtype(dtype)
        self.device_id = device_id
        self.on_gpu = provider == "CUDAExecutionProvider"
        providers: list[Any] = [(provider, {"device_id": device_id})] if self.on_gpu else [provider]
        options = ort.SessionOptions()
        options.log_severity_level = 3  # the graph's shape ops are not worth a warning per session
        self.session = ort.InferenceSession(
            finite_graph(self.dtype).SerializeToString(), sess_options=options, providers=providers
        )
        if self.session.get_providers()[0] != provider:
            raise RuntimeError(f"the finiteness check wanted {provider}, got {self.session.get_providers()}")
        self._binding = self.session.io_binding()

    def device(self, ptr: int, shape: tuple[int, int, int]) -> np.ndarray:
        """Finite flags (bool, one per sample) of the (B, S, D) batch at device pointer ``ptr``. The caller
        makes sure the batch is there (its copy stream synchronised) before calling."""
        if not self.on_gpu:
            raise RuntimeError("device() needs the CUDA execution provider")
        return self._run("cuda", ptr, shape)

    def host(self, array: np.ndarray) -> np.ndarray:
        """Finite flags of a host (B, S, D) array of this check's dtype (C-contiguous)."""
        if array.dtype != self.dtype or array.ndim != 3 or not array.flags.c_contiguous:
            wanted = f"a C-contiguous (B, S, D) {self.dtype.name} array"
            raise ValueError(f"expected {wanted}, got {array.dtype} {array.shape}")
        if self.on_gpu:
            y = self.session.run(["y"], {"x": array})[0]
            return np.asarray(y == 0)
        return self._run("cpu", int(array.ctypes.data), array.shape)  # type: ignore[arg-type]

    def _run(self, device: str, ptr: int, shape: tuple[int, int, int]) -> np.ndarray:
        binding = self._binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        device_id = self.device_id if device == "cuda" else 0
        binding.bind_input("x", device, device_id, self.dtype, list(shape), ptr)
        binding.bind_output("y", "cpu")  # B numbers: onnxruntime copies them back itself
        self.session.run_with_iobinding(binding)
        (y,) = binding.copy_outputs_to_cpu()
        return np.asarray(y == 0)
