"""Fusion with onnxruntime's transformer optimizer (or onnxscript's ORT fusions) and fp16 conversion."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import onnx

from converter.errors import ConversionError

log = logging.getLogger(__name__)
ATTENTION_OPS = ("Attention", "MultiHeadAttention")
SKIP_LAYER_NORM = "SkipLayerNormalization"
FUSIONS = ("bert", "onnxscript")


def op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(node.op_type for node in proto.graph.node).items()))


def fuse_bert(path: Path, num_heads: int, hidden_size: int, fp16: bool) -> onnx.ModelProto:
    """``optimize_model(model_type="bert", opt_level=1)``: Attention + SkipLayerNormalization.

    ``opt_level=1`` because level 99 runs onnxruntime's own graph passes first, which rewrite the
    attention subgraph into a shape the fusion no longer recognises.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    model = optimize_model(
        str(path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=1, use_gpu=fp16
    )
    if fp16:
        model.convert_float_to_float16(keep_io_types=False)
    return model.model


def fuse_onnxscript(path: Path, fp16: bool) -> onnx.ModelProto:
    """onnxscript's ``optimize_for_ort``: MultiHeadAttention + SkipLayerNormalization."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.load(str(path))
    optimize_for_ort(model)
    proto = ir.to_proto(model)
    if fp16:
        from onnxruntime.transformers.onnx_model import OnnxModel

        wrapped = OnnxModel(proto)
        wrapped.convert_float_to_float16(keep_io_types=False)
        proto = wrapped.model
    return proto


def fuse(path: Path, fusion: str, num_heads: int, hidden_size: int, fp16: bool) -> onnx.ModelProto:
    if fusion == "bert":
        return fuse_bert(path, num_heads, hidden_size, fp16)
    if fusion == "onnxscript":
        return fuse_onnxscript(path, fp16)
    raise ConversionError(f"unknown fusion {fusion!r}; choose from {FUSIONS}")


def check_fused(counts: dict[str, int], attention_sites: int) -> dict[str, int]:
    """The served graph must hold one fused attention per attention module and SkipLayerNormalization."""
    fused = {op: counts.get(op, 0) for op in (*ATTENTION_OPS, SKIP_LAYER_NORM)}
    attention = sum(counts.get(op, 0) for op in ATTENTION_OPS)
    if attention != attention_sites:
        raise ConversionError(
            f"fusion produced {attention} fused attention ops for {attention_sites} attention modules ({counts})"
        )
    if counts.get(SKIP_LAYER_NORM, 0) == 0:
        raise ConversionError(f"fusion produced no {SKIP_LAYER_NORM} ({counts})")
    return fused
