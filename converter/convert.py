"""The conversion pipeline: model -> rewrite -> ONNX -> fusion -> bundle -> verification."""

from __future__ import annotations

import copy
import logging
import platform
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import onnx
import onnxscript
import torch
from torch import nn

from converter import bundle as bundle_mod
from converter.errors import ConversionError
from converter.export import INPUT_NAME, OPSET, OUTPUT_NAME, export_onnx
from converter.fuse import check_fused, fuse, op_counts
from converter.graph_opt import DEFAULT_GRAPH_OPTS, NO_CUDA_GRAPH, apply_graph_opts
from converter.graph_opt import PASSES as GRAPH_OPTS
from converter.model import DEFAULT_SEED, EncoderDims, default_model, load_checkpoint
from converter.rewrite import rewrite_attention
from converter.session import onnxruntime_version
from converter.verify import DEFAULT_SHAPES, verify_bundle

log = logging.getLogger(__name__)
MODEL_FILE = "model.onnx"
# fusion -> the attention rewrite it needs
ROUTES = {"bert": "split", "onnxscript": "no-weights"}


@dataclass(frozen=True)
class ConvertConfig:
    """Everything one conversion needs; the CLI flags map one to one."""

    out: Path
    checkpoint: Path | None = None
    dims: EncoderDims = field(default_factory=EncoderDims)
    precision: str = "fp32"
    fusion: str = "bert"
    max_seq_len: int = 512
    verify_provider: str = "auto"
    verify_shapes: tuple[tuple[int, int], ...] = DEFAULT_SHAPES
    seed: int = DEFAULT_SEED
    # converter.graph_opt passes applied after fusion, in order; None: DEFAULT_GRAPH_OPTS on the bert route.
    graph_opts: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.graph_opts is None:  # frozen dataclass: resolve the default once, here
            object.__setattr__(self, "graph_opts", DEFAULT_GRAPH_OPTS if self.fusion == "bert" else ())
        unknown = [name for name in self.graph_opts or () if name not in GRAPH_OPTS]
        if unknown:
            raise ConversionError(f"--graph-opt must be among {sorted(GRAPH_OPTS)}, got {unknown}")
        if self.graph_opts and self.fusion != "bert":
            raise ConversionError("--graph-opt rewrites the bert route's fused graph; use --fusion bert")
        if self.precision not in ("fp32", "fp16"):
            raise ConversionError(f"--precision must be fp32 or fp16, got {self.precision!r}")
        if self.fusion not in ROUTES:
            raise ConversionError(f"--fusion must be one of {sorted(ROUTES)}, got {self.fusion!r}")
        if self.max_seq_len < 1:
            raise ConversionError("--max-seq-len must be positive")


def load_source(config: ConvertConfig) -> tuple[nn.Module, dict[str, Any]]:
    if config.checkpoint is None:
        return default_model(config.dims, config.seed), {"kind": "builtin-default", "seed": config.seed}
    model = load_checkpoint(config.checkpoint, config.dims)
    source = {"kind": "checkpoint", "path": str(config.checkpoint), "sha256": bundle_mod.sha256_file(config.checkpoint)}
    return model, source


def tool_versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime_version(),
    }


def build_manifest(
    config: ConvertConfig, source: dict[str, Any], proto: onnx.ModelProto, fused: dict[str, int]
) -> dict:
    dtype = "float16" if config.precision == "fp16" else "float32"
    tensor = {"dtype": dtype, "shape": ["batch", "seq", config.dims.dim]}
    return {
        "format_version": bundle_mod.FORMAT_VERSION,
        "name": "encoder-block" if source["kind"] == "builtin-default" else Path(source["path"]).stem,
        "architecture": "EncoderBlock",
        "dims": asdict(config.dims),
        "precision": config.precision,
        "inputs": [{"name": INPUT_NAME, **tensor}],
        "outputs": [{"name": OUTPUT_NAME, **tensor}],
        "dynamic_axes": {INPUT_NAME: {"0": "batch", "1": "seq"}, OUTPUT_NAME: {"0": "batch", "1": "seq"}},
        "max_seq_len": config.max_seq_len,
        "opset": OPSET,
        "fusion": config.fusion,
        "op_counts": op_counts(proto),
        "fused_ops": fused,
        "graph_opts": list(config.graph_opts or ()),
        # False when a graph opt uses a kernel that CUDA-graph capture refuses; sessions then run without graphs.
        "cuda_graphs": not NO_CUDA_GRAPH.intersection(config.graph_opts or ()),
        "model_file": MODEL_FILE,
        "source": source,
        "tool_versions": tool_versions(),
    }


def convert(config: ConvertConfig) -> dict[str, Any]:
    """Run the pipeline and publish the bundle at ``config.out``; returns the manifest."""
    model, source = load_source(config)
    reference = copy.deepcopy(model)
    rewritten, sites = rewrite_attention(model, ROUTES[config.fusion])
    if not sites:
        raise ConversionError("the model has no nn.MultiheadAttention to fuse")
    out = config.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename at the end: a failed conversion never leaves a half bundle.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        raw = staging / "raw.onnx"
        log.info("exporting ONNX (opset %d, dynamic batch and seq)", OPSET)
        export_onnx(rewritten, config.dims.dim, raw, config.max_seq_len)
        log.info("fusing with %s (%s)", config.fusion, config.precision)
        proto = fuse(raw, config.fusion, config.dims.heads, config.dims.dim, config.precision == "fp16")
        raw.unlink()
        if config.graph_opts:
            proto = apply_graph_opts(proto, config.graph_opts, config.dims.heads)
        fused = check_fused(op_counts(proto), len(sites))
        onnx.save(proto, str(staging / MODEL_FILE))
        manifest = build_manifest(config, source, proto, fused)
        manifest["files"] = bundle_mod.file_checksums(staging, [MODEL_FILE])
        bundle_mod.write_manifest(staging, manifest)
        log.info("verifying against PyTorch fp32 on %s", config.verify_shapes)
        staged = bundle_mod.load_bundle(staging)
        manifest["verification"] = verify_bundle(reference, staged, config.verify_provider, config.verify_shapes)
        manifest["created_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        bundle_mod.write_manifest(staging, manifest)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest
