from __future__ import annotations

import pytest
import torch
from torch import nn

from converter.errors import ConversionError
from converter.model import EncoderDims, default_model
from converter.rewrite import NoWeightsAttention, SplitSelfAttention, find_attention, rewrite_attention


class TwoBlocks(nn.Module):
    """A different module built from the same parts: two attention layers, nested."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([default_model(EncoderDims(32, 2, 64), seed=s) for s in (1, 2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize("kind", ["split", "no-weights"])
def test_rewrite_preserves_numerics_on_nested_models(kind: str) -> None:
    model = TwoBlocks().eval()
    x = torch.randn(3, 9, 32)
    with torch.no_grad():
        expected = model(x)
        rewritten, sites = rewrite_attention(model, kind)
        actual = rewritten(x)
    assert [s.path for s in sites] == ["blocks.0.attn", "blocks.1.attn"]
    expected_type = SplitSelfAttention if kind == "split" else NoWeightsAttention
    assert isinstance(rewritten.blocks[1].attn, expected_type)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_split_attention_seq_first() -> None:
    mha = nn.MultiheadAttention(32, 4, batch_first=False).eval()
    x = torch.randn(7, 2, 32)
    with torch.no_grad():
        torch.testing.assert_close(SplitSelfAttention(mha)(x)[0], mha(x, x, x)[0], rtol=1e-5, atol=1e-5)


class CrossAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x * 2, x)[0]


class UsesWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, weights = self.attn(x, x, x)
        return out + weights.sum()


class Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, key_padding_mask=mask)[0]


@pytest.mark.parametrize(
    ("module", "message"),
    [(CrossAttention, "only self-attention"), (UsesWeights, "weights output is used"), (Masked, "key_padding_mask")],
)
def test_unsupported_attention_is_refused(module: type[nn.Module], message: str) -> None:
    with pytest.raises(ConversionError, match=message):
        find_attention(module())


def test_unknown_rewrite() -> None:
    with pytest.raises(ConversionError, match="unknown attention rewrite"):
        rewrite_attention(TwoBlocks(), "fancy")
