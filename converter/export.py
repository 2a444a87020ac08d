"""ONNX export with dynamic batch and sequence axes (torch.export / dynamo exporter).

The legacy TorchScript exporter bakes the traced sequence length into attention reshapes and fails under
``no_grad``; the dynamo exporter keeps both axes symbolic.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from converter.errors import ConversionError

log = logging.getLogger(__name__)
OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "output"
TRACE_SHAPE = (2, 196)


def export_onnx(model: nn.Module, dim: int, path: Path, max_seq_len: int) -> onnx.ModelProto:
    """Export ``model`` (fp32, eval) to ``path`` with dims ``batch`` and ``seq`` dynamic."""
    example = torch.randn(*TRACE_SHAPE, dim)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    seq = torch.export.Dim("seq", min=1, max=max(max_seq_len, TRACE_SHAPE[1]))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                opset_version=OPSET,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={_arg_name(model): {0: batch, 1: seq}},
                verbose=False,
            )
    except Exception as exc:
        raise ConversionError(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
    if program is None:
        raise ConversionError("ONNX export returned no program")
    program.save(str(path))
    proto = onnx.load(str(path))
    check_dynamic_axes(proto)
    return proto


def _arg_name(model: nn.Module) -> str:
    params = list(inspect.signature(model.forward).parameters)
    return params[0] if params else "x"


def check_dynamic_axes(proto: onnx.ModelProto) -> None:
    """Both the input's and the output's first two axes must be symbolic, the last one fixed."""
    for value in (proto.graph.input[0], proto.graph.output[0]):
        dims = value.type.tensor_type.shape.dim
        if len(dims) != 3 or not dims[0].dim_param or not dims[1].dim_param or dims[2].dim_param:
            shape = [d.dim_param or d.dim_value for d in dims]
            raise ConversionError(f"exported {value.name} has shape {shape}; expected (batch, seq, dim)")
