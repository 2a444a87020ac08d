"""Graph rewrites that make ``nn.MultiheadAttention`` fusable by onnxruntime.

onnxruntime's transformer optimizer never fuses the packed in-projection that ``nn.MultiheadAttention``
exports. We trace the model with torch.fx (``nn`` modules stay leaves), find every attention call, check it
is plain self-attention whose weights output is unused, and swap the module for an equivalent one:

* ``split``: separate q/k/v Linears and explicit softmax attention. ``optimize_model(model_type="bert")``
  fuses that into ``Attention`` + ``SkipLayerNormalization``.
* ``no-weights``: the original module called with ``need_weights=False``, which the dynamo exporter lowers
  to scaled-dot-product attention; onnxscript's ORT fusions turn it into ``MultiHeadAttention``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from converter.errors import ConversionError


@dataclass(frozen=True)
class AttentionSite:
    """One ``nn.MultiheadAttention`` call found by tracing."""

    path: str
    embed_dim: int
    num_heads: int


def _check_module(path: str, mha: nn.MultiheadAttention) -> None:
    if not mha._qkv_same_embed_dim:
        raise ConversionError(f"{path}: MultiheadAttention with kdim/vdim != embed_dim is not supported")
    if mha.bias_k is not None or mha.add_zero_attn:
        raise ConversionError(f"{path}: add_bias_kv / add_zero_attn are not supported")


def _check_call(node: fx.Node) -> None:
    """Self-attention (query is key is value), no masks, and only output 0 is used."""
    args = list(node.args) + [None] * 3
    query, key, value = (args[0], args[1], args[2])
    key = node.kwargs.get("key", key)
    value = node.kwargs.get("value", value)
    if not (query is key is value):
        raise ConversionError(f"{node.target}: only self-attention (query is key is value) is supported")
    if len(node.args) > 3:
        raise ConversionError(f"{node.target}: positional mask/need_weights arguments are not supported")
    for name in ("key_padding_mask", "attn_mask"):
        if node.kwargs.get(name) is not None:
            raise ConversionError(f"{node.target}: {name} is not supported yet")
    if node.kwargs.get("is_causal"):
        raise ConversionError(f"{node.target}: is_causal is not supported yet")
    for user in node.users:
        if not (user.op == "call_function" and user.target is operator.getitem and user.args[1] == 0):
            raise ConversionError(f"{node.target}: the attention weights output is used; cannot rewrite")


def find_attention(model: nn.Module) -> list[AttentionSite]:
    """Trace ``model`` and return every MultiheadAttention call, checked for rewritability."""
    try:
        graph = fx.Tracer().trace(model)
    except Exception as exc:  # fx raises many types for untraceable code
        raise ConversionError(f"cannot trace the model with torch.fx: {type(exc).__name__}: {exc}") from exc
    sites = []
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        module = model.get_submodule(str(node.target))
        if isinstance(module, nn.MultiheadAttention):
            _check_module(str(node.target), module)
            _check_call(node)
            sites.append(AttentionSite(str(node.target), module.embed_dim, module.num_heads))
    return sites


class SplitSelfAttention(nn.Module):
    """``nn.MultiheadAttention`` self-attention as q/k/v Linears and explicit softmax(QK^T/sqrt(d))V."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        dim = mha.embed_dim
        self.num_heads = mha.num_heads
        self.head_dim = dim // mha.num_heads
        self.batch_first = mha.batch_first
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.out = nn.Linear(dim, dim)
        with torch.no_grad():
            weight = mha.in_proj_weight
            bias = mha.in_proj_bias if mha.in_proj_bias is not None else torch.zeros(3 * dim)
            for i, linear in enumerate((self.q, self.k, self.v)):
                linear.weight.copy_(weight[i * dim : (i + 1) * dim])
                linear.bias.copy_(bias[i * dim : (i + 1) * dim])
            self.out.weight.copy_(mha.out_proj.weight)
            out_bias = mha.out_proj.bias
            self.out.bias.copy_(out_bias if out_bias is not None else torch.zeros(dim))

    def forward(self, query: torch.Tensor, *_: object, **__: object) -> tuple[torch.Tensor, None]:
        x = query if self.batch_first else query.transpose(0, 1)
        batch, seq, dim = x.shape
        heads, head_dim = self.num_heads, self.head_dim
        q = self.q(x).reshape(batch, seq, heads, head_dim).transpose(1, 2)
        k = self.k(x).reshape(batch, seq, heads, head_dim).permute(0, 2, 3, 1)
        v = self.v(x).reshape(batch, seq, heads, head_dim).transpose(1, 2)
        probs = torch.softmax(torch.matmul(q, k) / math.sqrt(head_dim), dim=-1)
        out = self.out(torch.matmul(probs, v).transpose(1, 2).reshape(batch, seq, dim))
        return (out if self.batch_first else out.transpose(0, 1)), None


class NoWeightsAttention(nn.Module):
    """The original module, always called with ``need_weights=False`` (so it lowers to SDPA)."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.mha = mha

    def forward(self, query: torch.Tensor, *_: object, **__: object) -> tuple[torch.Tensor, None]:
        return self.mha(query, query, query, need_weights=False)[0], None


REWRITES = {"split": SplitSelfAttention, "no-weights": NoWeightsAttention}


def rewrite_attention(model: nn.Module, kind: str = "split") -> tuple[nn.Module, list[AttentionSite]]:
    """Swap every traced MultiheadAttention call for the ``kind`` replacement (in place)."""
    if kind not in REWRITES:
        raise ConversionError(f"unknown attention rewrite {kind!r}; choose from {sorted(REWRITES)}")
    sites = find_attention(model)
    for site in sites:
        parent_path, _, name = site.path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        mha = model.get_submodule(site.path)
        assert isinstance(mha, nn.MultiheadAttention)  # find_attention only reports these
        setattr(parent, name, REWRITES[kind](mha))
    return model, sites
