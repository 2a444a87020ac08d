"""Opt-in edits of the fused (bert route) ONNX graph into shapes onnxruntime's CUDA EP runs faster.

Each pass rewrites the graph with exact algebra on the weights; the converter's fp16 verification still
checks the result against PyTorch. All passes use ops that have CPU kernels too, so CPU verification works.

* ``ffn-bias-fold``: ``Relu(MatMul(x, W) + b)`` -> ``Relu(MatMul(Pad(x, ones), [W; b; 0]))``. The broadcast
  ``Add`` is a full read+write of the (tokens x 3072) FFN activation (616 MB at batch 512); the ones column
  (padded to 8 for tensor-core alignment) costs one pass over the 768-wide input instead.
* ``mha-split``: the ``Attention`` op (internal QKV GEMM, bias+transpose kernel, attention) ->
  three MatMuls in (B, S, N*H) layout feeding ``MultiHeadAttention``, whose flash / cuDNN kernels read that
  layout directly. The K bias is dropped (softmax is invariant to a per-query constant), the V bias is folded
  into the output projection's bias (attention rows sum to one), and only Q keeps an ``Add``.
* ``mha-packed``: one QKV MatMul (ones column for all biases) reshaped to the packed (B, S, N, 3, H) layout
  for ``MultiHeadAttention``.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from converter.errors import ConversionError

log = logging.getLogger(__name__)
MS_DOMAIN = "com.microsoft"
PAD_COLUMNS = 8  # K + 8 keeps the padded GEMM dimension a multiple of 8 (fp16 tensor-core alignment)


class _Graph:
    """Name lookups over a ModelProto's graph, plus helpers to add initializers and nodes."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        self.proto = proto
        self.graph = proto.graph
        self.inits = {t.name: t for t in self.graph.initializer}

    def producer(self, name: str) -> onnx.NodeProto | None:
        return next((n for n in self.graph.node if name in n.output), None)

    def consumers(self, name: str) -> list[onnx.NodeProto]:
        return [n for n in self.graph.node if name in n.input]

    def array(self, name: str) -> np.ndarray | None:
        init = self.inits.get(name)
        return None if init is None else numpy_helper.to_array(init)

    def set_array(self, name: str, value: np.ndarray) -> str:
        tensor = numpy_helper.from_array(value, name)
        if name in self.inits:
            self.inits[name].CopyFrom(tensor)
        else:
            self.graph.initializer.append(tensor)
            self.inits[name] = self.graph.initializer[-1]
        return name

    def replace(self, old: onnx.NodeProto, new: list[onnx.NodeProto]) -> None:
        nodes = list(self.graph.node)
        at = nodes.index(old)
        nodes[at : at + 1] = new
        del self.graph.node[:]
        self.graph.node.extend(nodes)

    def remove(self, node: onnx.NodeProto) -> None:
        self.replace(node, [])

    def prune(self) -> None:
        used = {i for n in self.graph.node for i in n.input}
        keep = [t for t in self.graph.initializer if t.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)
        self.inits = {t.name: t for t in self.graph.initializer}


def _attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else helper.get_attribute_value(found)


def _pad_ones(g: _Graph, x: str, dtype: np.dtype, tag: str) -> tuple[onnx.NodeProto, str]:
    """Pad(x, last axis + PAD_COLUMNS columns of 1.0): the ones column that carries a bias through a GEMM."""
    pads = g.set_array(f"{tag}_pads", np.array([0, 0, 0, 0, 0, PAD_COLUMNS], np.int64))
    one = g.set_array(f"{tag}_one", np.array(1.0, dtype))
    out = f"{tag}_padded"
    return helper.make_node("Pad", [x, pads, one], [out], name=f"{tag}_Pad", mode="constant"), out


def _concat_ones(g: _Graph, x: str, dtype: np.dtype, tag: str) -> tuple[list[onnx.NodeProto], str]:
    """Concat(x, Expand(1.0, (B, S, PAD_COLUMNS))): the same ones column through Concat instead of Pad."""
    ones = g.set_array(f"{tag}_ones", np.ones((1, 1, PAD_COLUMNS), dtype))
    width = g.set_array(f"{tag}_width", np.array([PAD_COLUMNS], np.int64))
    nodes = [
        helper.make_node("Shape", [x], [f"{tag}_lead"], name=f"{tag}_Shape", start=0, end=2),
        helper.make_node("Concat", [f"{tag}_lead", width], [f"{tag}_ones_shape"], name=f"{tag}_ShapeCat", axis=0),
        helper.make_node("Expand", [ones, f"{tag}_ones_shape"], [f"{tag}_ones_full"], name=f"{tag}_Expand"),
        helper.make_node("Concat", [x, f"{tag}_ones_full"], [f"{tag}_padded"], name=f"{tag}_Concat", axis=-1),
    ]
    return nodes, f"{tag}_padded"


def _augment(weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """[W; b; 0...]: (K + PAD_COLUMNS, N), so Pad(x, ones) @ it == x @ W + b."""
    zeros = np.zeros((PAD_COLUMNS - 1, weight.shape[1]), weight.dtype)
    return np.concatenate([weight, bias[None, :].astype(weight.dtype), zeros], axis=0)


def _ffn_sites(g: _Graph) -> list[tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto, np.ndarray, np.ndarray]]:
    """Every ``MatMul(x, W) -> Add(b) -> Relu`` with constant W (K, N) and b (N,)."""
    sites = []
    for matmul in [n for n in g.graph.node if n.op_type == "MatMul"]:
        weight = g.array(matmul.input[1])
        users = g.consumers(matmul.output[0])
        if weight is None or weight.ndim != 2 or len(users) != 1 or users[0].op_type != "Add":
            continue
        add = users[0]
        bias = g.array(add.input[1] if add.input[0] == matmul.output[0] else add.input[0])
        relu = g.consumers(add.output[0])
        if bias is not None and bias.shape == (weight.shape[1],) and [n.op_type for n in relu] == ["Relu"]:
            sites.append((matmul, add, relu[0], weight, bias))
    return sites


def ffn_gemm8(g: _Graph, num_heads: int) -> int:
    """``Relu(x @ W + b)`` as ``com.microsoft.GemmFloat8`` in fp16: cuBLASLt with the RELU epilogue, the bias
    carried by a ones column (its C input takes only a full (M, N) matrix, not a bias vector).

    CUDA-only, and not capturable: the kernel synchronises its stream and allocates a workspace per call, so a
    bundle with this pass is marked ``cuda_graphs: false`` and its session runs without graphs.
    """
    del num_heads
    count = 0
    for matmul, add, relu, weight, bias in _ffn_sites(g):
        if weight.dtype != np.float16:
            raise ConversionError("ffn-gemm8 needs an fp16 graph (GemmFloat8 computes fp32 as TF32)")
        tag, x = f"{matmul.name or 'MatMul'}_gemm8", matmul.input[0]
        ffn2 = g.consumers(relu.output[0])
        if len(ffn2) != 1 or ffn2[0].op_type != "MatMul":
            continue
        ones, padded = _concat_ones(g, x, weight.dtype, tag)
        as_2d = g.set_array(f"{tag}_2d", np.array([-1, weight.shape[0] + PAD_COLUMNS], np.int64))
        w = g.set_array(f"{tag}_weight", _augment(weight, bias))
        final = ffn2[0].output[0]
        new = [
            helper.make_node("Shape", [x], [f"{tag}_shape"], name=f"{tag}_Shape3"),
            *ones,
            helper.make_node("Reshape", [padded, as_2d], [f"{tag}_a"], name=f"{tag}_Reshape_in"),
            helper.make_node(
                "GemmFloat8",
                [f"{tag}_a", w],
                [relu.output[0]],
                name=f"{tag}_GemmFloat8",
                domain=MS_DOMAIN,
                activation="RELU",
                dtype=onnx.TensorProto.FLOAT16,
            ),
        ]
        second = helper.make_node("MatMul", list(ffn2[0].input), [f"{tag}_ffn2"], name=f"{tag}_ffn2_MatMul")
        back = helper.make_node("Reshape", [f"{tag}_ffn2", f"{tag}_shape"], [final], name=f"{tag}_Reshape_out")
        g.replace(matmul, new)
        g.remove(add)
        g.remove(relu)
        g.replace(ffn2[0], [second, back])
        count += 1
    # The exported graph's shape inference recorded 3-D shapes for tensors that are now 2-D.
    now_2d = {n.output[0] for n in g.graph.node if n.op_type == "GemmFloat8"}
    kept = [v for v in g.graph.value_info if v.name not in now_2d]
    del g.graph.value_info[:]
    g.graph.value_info.extend(kept)
    return count


def ffn_bias_concat(g: _Graph, num_heads: int) -> int:
    """``ffn-bias-fold`` with the ones column built by Concat + Expand instead of Pad."""
    return ffn_bias_fold(g, num_heads, concat=True)


def ffn_bias_fold(g: _Graph, num_heads: int, concat: bool = False) -> int:
    """Fold every ``MatMul(x, W) -> Add(b) -> Relu`` (constant W (K, N), b (N,)) into a padded MatMul -> Relu."""
    del num_heads
    count = 0
    for matmul, add, _relu, weight, bias in _ffn_sites(g):
        tag = f"{matmul.name or 'MatMul'}_biasfold"
        if concat:
            ones, padded = _concat_ones(g, matmul.input[0], weight.dtype, tag)
        else:
            pad, padded = _pad_ones(g, matmul.input[0], weight.dtype, tag)
            ones = [pad]
        w_aug = g.set_array(f"{tag}_weight", _augment(weight, bias))
        fused = helper.make_node("MatMul", [padded, w_aug], [add.output[0]], name=f"{tag}_MatMul")
        g.replace(matmul, [*ones, fused])
        g.remove(add)
        count += 1
    return count


def _mha(inputs: list[str], output: str, tag: str, heads: int, scale: object) -> onnx.NodeProto:
    attrs = {"num_heads": heads} if not scale else {"num_heads": heads, "scale": float(scale)}  # type: ignore[arg-type]
    return helper.make_node("MultiHeadAttention", inputs, [output], name=f"{tag}_MHA", domain=MS_DOMAIN, **attrs)


def _attention_parts(g: _Graph, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray, int]:
    weight, bias = g.array(node.input[1]), g.array(node.input[2]) if len(node.input) > 2 else None
    if weight is None or weight.ndim != 2 or weight.shape[1] != 3 * weight.shape[0]:
        raise ConversionError(f"{node.name}: Attention weights must be a constant (D, 3D) tensor")
    if any(name for name in node.input[3:]) or _attr(node, "unidirectional", 0) or _attr(node, "qkv_hidden_sizes"):
        raise ConversionError(f"{node.name}: masks, past state, causal or uneven q/k/v sizes are not rewritten")
    bias = np.zeros(weight.shape[1], weight.dtype) if bias is None else bias
    return weight, bias, int(str(_attr(node, "num_heads")))


def _fold_v_bias(g: _Graph, attn_out: str, v_bias: np.ndarray, tag: str) -> bool:
    """attention(V + bv) = attention(V) + bv, so bv @ Wo joins the out-projection bias in the SkipLayerNorm."""
    users = g.consumers(attn_out)
    if len(users) != 1 or users[0].op_type != "MatMul" or g.array(users[0].input[1]) is None:
        return False
    out_w = g.array(users[0].input[1])
    sln = g.consumers(users[0].output[0])
    if out_w is None or len(sln) != 1 or sln[0].op_type != "SkipLayerNormalization" or len(sln[0].input) < 5:
        return False
    old = g.array(sln[0].input[4])
    if old is None:
        return False
    folded = (old.astype(np.float32) + v_bias.astype(np.float32) @ out_w.astype(np.float32)).astype(old.dtype)
    sln[0].input[4] = g.set_array(f"{tag}_out_bias_with_v", folded)
    return True


def mha_split(g: _Graph, num_heads: int) -> int:
    count = 0
    for node in [n for n in g.graph.node if n.op_type == "Attention" and n.domain == MS_DOMAIN]:
        weight, bias, heads = _attention_parts(g, node)
        dim, tag, x = weight.shape[0], node.name or "Attention", node.input[0]
        new: list[onnx.NodeProto] = []
        names = {}
        for i, part in enumerate("qkv"):
            w = g.set_array(f"{tag}_{part}_weight", np.ascontiguousarray(weight[:, i * dim : (i + 1) * dim]))
            names[part] = f"{tag}_{part}"
            new.append(helper.make_node("MatMul", [x, w], [names[part]], name=f"{tag}_{part}_MatMul"))
        q_bias = g.set_array(f"{tag}_q_bias", bias[:dim])
        new.append(helper.make_node("Add", [names["q"], q_bias], [f"{tag}_q_biased"], name=f"{tag}_q_Add"))
        v = names["v"]
        if not _fold_v_bias(g, node.output[0], bias[2 * dim :], tag):
            v_bias = g.set_array(f"{tag}_v_bias", bias[2 * dim :])
            new.append(helper.make_node("Add", [v, v_bias], [f"{tag}_v_biased"], name=f"{tag}_v_Add"))
            v = f"{tag}_v_biased"
        mha = _mha([f"{tag}_q_biased", names["k"], v], node.output[0], tag, heads or num_heads, _attr(node, "scale"))
        g.replace(node, [*new, mha])
        count += 1
    return count


def mha_packed(g: _Graph, num_heads: int) -> int:
    count = 0
    for node in [n for n in g.graph.node if n.op_type == "Attention" and n.domain == MS_DOMAIN]:
        weight, bias, heads = _attention_parts(g, node)
        heads = heads or num_heads
        dim, tag = weight.shape[0], node.name or "Attention"
        head = dim // heads
        # Columns [q | k | v] (each head-major) -> per head [q_h | k_h | v_h]: the (B, S, N, 3, H) layout.
        order = np.arange(3 * dim).reshape(3, heads, head).transpose(1, 0, 2).reshape(-1)
        pad, padded = _pad_ones(g, node.input[0], weight.dtype, tag)
        w = g.set_array(f"{tag}_qkv_packed_weight", _augment(weight[:, order], bias[order]))
        shape = g.set_array(f"{tag}_packed_shape", np.array([0, 0, heads, 3, head], np.int64))
        new = [
            pad,
            helper.make_node("MatMul", [padded, w], [f"{tag}_qkv"], name=f"{tag}_qkv_MatMul"),
            helper.make_node("Reshape", [f"{tag}_qkv", shape], [f"{tag}_qkv_packed"], name=f"{tag}_Reshape"),
            _mha([f"{tag}_qkv_packed"], node.output[0], tag, heads, _attr(node, "scale")),
        ]
        g.replace(node, new)
        count += 1
    return count


# Applied when the CLI gets no --graph-opt (``--graph-opt none`` turns them off); see docs/ENGINE_NOTES.md.
DEFAULT_GRAPH_OPTS: tuple[str, ...] = ("mha-split", "ffn-bias-concat")
# Passes whose ops cannot be captured in a CUDA graph: their bundles are marked ``cuda_graphs: false``.
NO_CUDA_GRAPH = frozenset({"ffn-gemm8"})
PASSES = {
    "ffn-bias-fold": ffn_bias_fold,
    "ffn-bias-concat": ffn_bias_concat,
    "ffn-gemm8": ffn_gemm8,
    "mha-split": mha_split,
    "mha-packed": mha_packed,
}


def apply_graph_opts(proto: onnx.ModelProto, names: tuple[str, ...], num_heads: int) -> onnx.ModelProto:
    """Apply the named passes in order; a pass that finds nothing to rewrite is an error, not a no-op."""
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise ConversionError(f"unknown graph opt(s) {unknown}; choose from {sorted(PASSES)}")
    if "mha-split" in names and "mha-packed" in names:
        raise ConversionError("mha-split and mha-packed both rewrite the Attention op: choose one")
    g = _Graph(proto)
    for name in names:
        rewritten = PASSES[name](g, num_heads)
        if not rewritten:
            raise ConversionError(f"graph opt {name!r} found nothing to rewrite in this graph")
        log.info("graph opt %s rewrote %d site(s)", name, rewritten)
    g.prune()
    onnx.checker.check_model(proto)
    return proto
