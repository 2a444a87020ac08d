from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from converter.bundle import load_bundle, sha256_file
from converter.convert import ConvertConfig, convert
from converter.errors import ConversionError, VerificationError
from converter.model import EncoderBlock, EncoderDims, default_model
from converter.providers import SessionOptions
from converter.session import EncoderSession
from converter.verify import rel_l2, verify_bundle
from tests.converter.conftest import SMALL


def test_small_bundle_manifest(small_bundle: Path) -> None:
    manifest = json.loads((small_bundle / "manifest.json").read_text())
    assert manifest["dims"] == {"dim": 64, "heads": 4, "ffn": 128}
    # The default graph opts (converter.graph_opt.DEFAULT_GRAPH_OPTS) turn Attention into MultiHeadAttention.
    assert manifest["fused_ops"]["MultiHeadAttention"] == 1 and manifest["graph_opts"] == [
        "mha-split",
        "ffn-bias-concat",
    ]
    assert manifest["fused_ops"]["SkipLayerNormalization"] == 2
    assert manifest["inputs"][0] == {"name": "input", "dtype": "float32", "shape": ["batch", "seq", 64]}
    assert manifest["opset"] == 18
    assert manifest["files"]["model.onnx"] == sha256_file(small_bundle / "model.onnx")
    assert set(manifest["tool_versions"]) >= {"torch", "onnx", "onnxruntime", "onnxscript"}
    ver = manifest["verification"]
    assert ver["passed"] and ver["worst_rel_l2"] <= 1e-4
    assert [(c["batch"], c["seq"]) for c in ver["cases"]] == [(1, 196), (5, 196), (2, 37)]
    assert manifest["created_at"]


def test_served_graph_is_fused_and_dynamic(small_bundle: Path) -> None:
    proto = onnx.load(str(small_bundle / "model.onnx"))
    ops = {n.op_type for n in proto.graph.node}
    assert {"MultiHeadAttention", "SkipLayerNormalization"} <= ops
    assert "Softmax" not in ops  # attention really fused, not left as primitives
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and dims[1].dim_param and dims[2].dim_value == 64


def test_bundle_matches_pytorch_at_untraced_shapes(small_bundle: Path) -> None:
    session = EncoderSession(load_bundle(small_bundle), SessionOptions(provider="cpu"))
    model = default_model(SMALL)
    for batch, seq in [(3, 1), (4, 250), (7, 64)]:
        x = np.random.default_rng(batch).standard_normal((batch, seq, 64)).astype(np.float32)
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        assert rel_l2(session.run(x), expected) < 1e-5


def test_batched_equals_unbatched(small_bundle: Path) -> None:
    session = EncoderSession(load_bundle(small_bundle), SessionOptions(provider="cpu"))
    x = np.random.default_rng(0).standard_normal((6, 20, 64)).astype(np.float32)
    batched = session.run(x)
    for i in range(6):
        np.testing.assert_allclose(batched[i : i + 1], session.run(x[i : i + 1]), rtol=1e-5, atol=1e-5)


def test_converts_saved_checkpoint_fp16(tmp_path: Path) -> None:
    torch.manual_seed(7)
    source = EncoderBlock(64, 4, 128).eval()
    ckpt = tmp_path / "enc.pt"
    torch.save(source.state_dict(), ckpt)
    manifest = convert(ConvertConfig(out=tmp_path / "b", checkpoint=ckpt, dims=SMALL, precision="fp16"))
    assert manifest["source"]["sha256"] == sha256_file(ckpt)
    assert manifest["inputs"][0]["dtype"] == "float16"
    assert manifest["verification"]["worst_rel_l2"] <= 3e-3
    session = EncoderSession(load_bundle(tmp_path / "b"), SessionOptions(provider="cpu"))
    x = np.random.default_rng(1).standard_normal((2, 33, 64)).astype(np.float16)
    with torch.no_grad():
        expected = source(torch.from_numpy(x.astype(np.float32))).numpy()
    assert rel_l2(session.run(x), expected) < 3e-3


def test_onnxscript_route_fuses_multiheadattention(tmp_path: Path) -> None:
    manifest = convert(ConvertConfig(out=tmp_path / "b", dims=SMALL, fusion="onnxscript"))
    assert manifest["fused_ops"]["MultiHeadAttention"] == 1
    assert manifest["fused_ops"]["SkipLayerNormalization"] == 2


def test_default_model_full_size(tmp_path: Path) -> None:
    manifest = convert(ConvertConfig(out=tmp_path / "default"))
    assert manifest["dims"] == {"dim": 768, "heads": 12, "ffn": 3072}
    assert manifest["fused_ops"]["MultiHeadAttention"] == 1
    assert manifest["verification"]["worst_rel_l2"] <= 1e-4


def test_verification_fails_on_a_different_model(small_bundle: Path) -> None:
    other = default_model(SMALL, seed=1)
    with pytest.raises(VerificationError, match="relative L2 error"):
        verify_bundle(other, load_bundle(small_bundle), provider="cpu")


def test_failed_conversion_leaves_previous_bundle(tmp_path: Path, small_bundle: Path) -> None:
    out = tmp_path / "keep"
    convert(ConvertConfig(out=out, dims=SMALL))
    before = (out / "manifest.json").read_text()
    with pytest.raises(ConversionError):
        convert(ConvertConfig(out=out, checkpoint=tmp_path / "absent.pt", dims=SMALL))
    assert (out / "manifest.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_config() -> None:
    with pytest.raises(ConversionError, match="precision"):
        ConvertConfig(out=Path("x"), precision="int8")
    with pytest.raises(ConversionError, match="fusion"):
        ConvertConfig(out=Path("x"), fusion="magic")
    with pytest.raises(ConversionError, match="max-seq-len"):
        ConvertConfig(out=Path("x"), dims=EncoderDims(), max_seq_len=0)
