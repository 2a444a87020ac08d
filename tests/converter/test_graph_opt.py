from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from converter.convert import ConvertConfig, build_manifest, convert
from converter.errors import ConversionError
from converter.graph_opt import PAD_COLUMNS, apply_graph_opts
from tests.converter.conftest import SMALL


@pytest.fixture(scope="session")
def fp16_proto(tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    """The fused fp16 bert-route graph of the small model (no graph opts)."""
    out = tmp_path_factory.mktemp("bundles") / "small16"
    convert(ConvertConfig(out=out, dims=SMALL, precision="fp16", verify_provider="cpu", max_seq_len=64, graph_opts=()))
    return onnx.load(str(out / "model.onnx"))


def ops(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


def init(proto: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == name))


@pytest.mark.parametrize(
    ("opts", "present", "absent"),
    [
        (("ffn-bias-fold",), {"Pad", "Attention"}, {"Add"}),
        (("ffn-bias-concat",), {"Concat", "Expand"}, {"Add", "Pad"}),
        (("mha-split",), {"MultiHeadAttention", "Add"}, {"Attention"}),
        (("mha-split", "ffn-bias-concat"), {"MultiHeadAttention", "Concat"}, {"Attention", "Pad"}),
    ],
)
def test_cpu_verified_graph_opts(tmp_path: Path, opts: tuple[str, ...], present: set[str], absent: set[str]) -> None:
    # convert() verifies against PyTorch on the CPU EP: these passes are exact algebra and must pass fp32.
    manifest = convert(ConvertConfig(out=tmp_path / "b", dims=SMALL, verify_provider="cpu", graph_opts=opts))
    counts = manifest["op_counts"]
    assert manifest["verification"]["passed"] and manifest["graph_opts"] == list(opts)
    assert present <= set(counts) and not absent & set(counts), counts
    assert manifest["cuda_graphs"] is True


def test_mha_split_keeps_only_q_bias(fp16_proto: onnx.ModelProto) -> None:
    proto = apply_graph_opts(copy.deepcopy(fp16_proto), ("mha-split",), SMALL.heads)
    adds = [n for n in proto.graph.node if n.op_type == "Add"]
    assert len(adds) == 2  # q bias + the FFN bias; k dropped, v folded into the SkipLayerNorm bias
    assert ops(proto).count("MatMul") == 3 + 3


def test_mha_packed_layout(fp16_proto: onnx.ModelProto) -> None:
    # CUDA-only (no packed-QKV MultiHeadAttention on the CPU EP): check the construction and the weights.
    source = {t.name: numpy_helper.to_array(t) for t in fp16_proto.graph.initializer}
    attention = next(n for n in fp16_proto.graph.node if n.op_type == "Attention")
    weight, bias = source[attention.input[1]].astype(np.float32), source[attention.input[2]].astype(np.float32)
    proto = apply_graph_opts(copy.deepcopy(fp16_proto), ("mha-packed",), SMALL.heads)
    assert {"Pad", "Reshape", "MultiHeadAttention"} <= set(ops(proto)) and "Attention" not in ops(proto)
    mha = next(n for n in proto.graph.node if n.op_type == "MultiHeadAttention")
    assert len(mha.input) == 1
    packed = init(proto, "Attention_0_qkv_packed_weight").astype(np.float32)
    x = np.random.default_rng(0).standard_normal((5, SMALL.dim)).astype(np.float32)
    ones = np.ones((5, PAD_COLUMNS), np.float32)
    got = (np.concatenate([x, ones], 1) @ packed).reshape(5, SMALL.heads, 3, SMALL.dim // SMALL.heads)
    want = (x @ weight + bias).reshape(5, 3, SMALL.heads, SMALL.dim // SMALL.heads).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)


def test_ffn_gemm8_construction(fp16_proto: onnx.ModelProto) -> None:
    # CUDA-only (GemmFloat8 has no CPU kernel): check the node and that the folded weight reproduces the FFN.
    source = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in fp16_proto.graph.initializer}
    ffn1 = next(
        n for n in fp16_proto.graph.node if n.op_type == "MatMul" and source[n.input[1]].shape == (SMALL.dim, SMALL.ffn)
    )
    add = next(n for n in fp16_proto.graph.node if n.op_type == "Add")
    proto = apply_graph_opts(copy.deepcopy(fp16_proto), ("ffn-gemm8",), SMALL.heads)
    gemm = next(n for n in proto.graph.node if n.op_type == "GemmFloat8")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}
    assert attrs["activation"] == b"RELU" and attrs["dtype"] == onnx.TensorProto.FLOAT16
    assert "Relu" not in ops(proto) and "Add" not in ops(proto)
    w_aug = init(proto, gemm.input[1]).astype(np.float32)
    x = np.random.default_rng(1).standard_normal((4, SMALL.dim)).astype(np.float32)
    got = np.maximum(np.concatenate([x, np.ones((4, PAD_COLUMNS), np.float32)], 1) @ w_aug, 0)
    want = np.maximum(x @ source[ffn1.input[1]] + source[add.input[1]], 0)
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)


def test_ffn_gemm8_marks_bundle_uncapturable(tmp_path: Path, fp16_proto: onnx.ModelProto) -> None:
    config = ConvertConfig(out=tmp_path / "b", dims=SMALL, precision="fp16", graph_opts=("ffn-gemm8",))
    manifest = build_manifest(config, {"kind": "builtin-default"}, fp16_proto, {})
    assert manifest["cuda_graphs"] is False


def test_ffn_gemm8_refuses_fp32(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="fp16"):
        convert(ConvertConfig(out=tmp_path / "b", dims=SMALL, verify_provider="cpu", graph_opts=("ffn-gemm8",)))


def test_graph_opt_errors(tmp_path: Path, fp16_proto: onnx.ModelProto) -> None:
    with pytest.raises(ConversionError, match="must be among"):
        ConvertConfig(out=tmp_path, graph_opts=("nope",))
    with pytest.raises(ConversionError, match="--fusion bert"):
        ConvertConfig(out=tmp_path, fusion="onnxscript", graph_opts=("mha-split",))
    with pytest.raises(ConversionError, match="choose one"):
        apply_graph_opts(copy.deepcopy(fp16_proto), ("mha-split", "mha-packed"), SMALL.heads)
    split = apply_graph_opts(copy.deepcopy(fp16_proto), ("mha-split",), SMALL.heads)
    with pytest.raises(ConversionError, match="found nothing"):
        apply_graph_opts(split, ("mha-split",), SMALL.heads)


def test_graph_opt_defaults(tmp_path: Path) -> None:
    from converter.__main__ import graph_opts
    from converter.graph_opt import DEFAULT_GRAPH_OPTS

    assert ConvertConfig(out=tmp_path).graph_opts == DEFAULT_GRAPH_OPTS
    assert ConvertConfig(out=tmp_path, fusion="onnxscript").graph_opts == ()
    assert graph_opts(None) is None
    assert graph_opts(["none"]) == ()
    assert graph_opts(["mha-split", "ffn-bias-fold"]) == ("mha-split", "ffn-bias-fold")
