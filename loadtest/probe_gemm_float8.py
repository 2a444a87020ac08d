"""Probe: the FFN as ``com.microsoft.GemmFloat8`` (fp16, activation RELU, bias folded through a ones column).

Not a converter option: onnxruntime's GemmFloat8 kernel synchronises its stream and cudaMalloc/cudaFree's a
workspace on every call, which CUDA-graph capture refuses. This script shows that (capture attempt) and times
it without graphs against the base and ``ffn-bias-fold`` graphs, on device buffers, same run. Needs a GPU.

    python loadtest/probe_gemm_float8.py BASE_BUNDLE FOLD_BUNDLE [--batch 512]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from converter.graph_opt import PAD_COLUMNS, _augment, _Graph


def gemm8_model(base: Path, out: Path) -> None:
    g = _Graph(onnx.load(str(base / "model.onnx")))
    matmul = next(n for n in g.graph.node if n.op_type == "MatMul" and g.consumers(n.output[0])[0].op_type == "Add")
    add = g.consumers(matmul.output[0])[0]
    relu = g.consumers(add.output[0])[0]
    weight, bias = g.array(matmul.input[1]), g.array(add.input[1])
    assert weight is not None and bias is not None
    x = matmul.input[0]
    g.set_array("p_pads", np.array([0, 0, 0, 0, 0, PAD_COLUMNS], np.int64))
    g.set_array("p_one", np.array(1.0, weight.dtype))
    g.set_array("p_2d", np.array([-1, weight.shape[0] + PAD_COLUMNS], np.int64))
    g.set_array("p_w", _augment(weight, bias))
    nodes = [
        helper.make_node("Pad", [x, "p_pads", "p_one"], ["p_x"], mode="constant"),
        helper.make_node("Reshape", ["p_x", "p_2d"], ["p_x2"]),
        helper.make_node(
            "GemmFloat8",
            ["p_x2", "p_w"],
            [relu.output[0]],
            domain="com.microsoft",
            activation="RELU",
            dtype=onnx.TensorProto.FLOAT16,
        ),
    ]
    g.replace(matmul, nodes)
    g.remove(add)
    g.remove(relu)
    # FFN2 now sees (tokens, 3072); give its output back the (B, S, D) shape SkipLayerNorm's skip input has.
    ffn2 = g.consumers(relu.output[0])[0]
    final = ffn2.output[0]
    new_ffn2 = helper.make_node("MatMul", list(ffn2.input), ["p_ffn2"])
    shape = helper.make_node("Shape", [x], ["p_shape"])
    g.replace(ffn2, [shape, new_ffn2, helper.make_node("Reshape", ["p_ffn2", "p_shape"], [final])])
    g.prune()
    onnx.save(g.proto, str(out))


def device_ms(model: str, batch: int, graphs: bool) -> float:
    opts = {"enable_cuda_graph": "1" if graphs else "0"}
    sess = ort.InferenceSession(model, providers=[("CUDAExecutionProvider", opts)])
    x = np.random.default_rng(0).standard_normal((batch, 196, 768)).astype(np.float16)
    inp = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
    out = ort.OrtValue.ortvalue_from_shape_and_type(x.shape, np.float16, "cuda", 0)
    binding = sess.io_binding()
    binding.bind_ortvalue_input("input", inp)
    binding.bind_ortvalue_output("output", out)
    for _ in range(3):
        sess.run_with_iobinding(binding)
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(10):
            sess.run_with_iobinding(binding)
        samples.append((time.perf_counter() - start) * 100)
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("base", type=Path)
    parser.add_argument("fold", type=Path)
    parser.add_argument("--batch", type=int, default=512)
    args = parser.parse_args()
    ort.preload_dlls()
    with tempfile.TemporaryDirectory() as tmp:
        gemm8 = str(Path(tmp) / "gemm8.onnx")
        gemm8_model(args.base, Path(gemm8))
        try:
            device_ms(gemm8, 8, graphs=True)
            print("gemm8 with CUDA graph capture: ran")
        except Exception as exc:
            print(f"gemm8 with CUDA graph capture: FAILED {type(exc).__name__}: {str(exc)[:300]}")
        for name, model in (
            ("base", str(args.base / "model.onnx")),
            ("ffn-bias-fold", str(args.fold / "model.onnx")),
            ("gemm8-relu", gemm8),
        ):
            print(f"no graph, bs={args.batch}: {name} {device_ms(model, args.batch, graphs=False):.3f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
