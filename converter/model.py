"""The reference encoder block and checkpoint loading.

``EncoderBlock`` is FX2AIT's transformer example: post-norm, ReLU, ``nn.MultiheadAttention`` with
``batch_first=True``. Its ``state_dict`` is the checkpoint format users bring.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from converter.errors import CheckpointError

DEFAULT_SEED = 20261126


@dataclass(frozen=True)
class EncoderDims:
    """Architecture dimensions; they must match the checkpoint."""

    dim: int = 768
    heads: int = 12
    ffn: int = 3072

    def __post_init__(self) -> None:
        if min(self.dim, self.heads, self.ffn) <= 0:
            raise CheckpointError(f"dimensions must be positive, got {asdict(self)}")
        if self.dim % self.heads:
            raise CheckpointError(f"--dim {self.dim} is not divisible by --heads {self.heads}")


class EncoderBlock(nn.Module):
    """MultiheadAttention -> residual -> LayerNorm -> Linear -> ReLU -> Linear -> residual -> LayerNorm."""

    def __init__(self, input_dim: int, num_heads: int, dim_feedforward: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(input_dim, num_heads, dropout=dropout, batch_first=True)
        self.linear_net = nn.Sequential(
            nn.Linear(input_dim, dim_feedforward),
            nn.Dropout(dropout),
            nn.ReLU(inplace=True),
            nn.Linear(dim_feedforward, input_dim),
        )
        self.norm1 = nn.LayerNorm(input_dim)
        self.norm2 = nn.LayerNorm(input_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn_out = self.attn(x, x, x)[0]
        x = self.norm1(x + self.dropout(attn_out))
        x = self.norm2(x + self.dropout(self.linear_net(x)))
        return x


def build_model(dims: EncoderDims) -> EncoderBlock:
    return EncoderBlock(dims.dim, dims.heads, dims.ffn, dropout=0.0).eval()


def default_model(dims: EncoderDims, seed: int = DEFAULT_SEED) -> EncoderBlock:
    """The built-in model: deterministic weights, LayerNorm affine params far from 1/0 so mistakes show."""
    gen = torch.Generator().manual_seed(seed)
    model = build_model(dims)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("norm"):
                base = 1.0 if name.endswith("weight") else 0.0
                param.copy_(base + 0.2 * torch.randn(param.shape, generator=gen))
            elif name.endswith("bias"):
                param.copy_(0.02 * torch.randn(param.shape, generator=gen))
            else:
                fan_in = param.shape[-1]
                param.copy_(torch.randn(param.shape, generator=gen) / fan_in**0.5)
    return model


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a ``torch.save`` state_dict or a ``.safetensors`` file; raise CheckpointError on anything else."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            # weights_only: a checkpoint is data, never code to execute.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types; all mean "unreadable"
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} is not a state_dict of tensors")
    return state


def load_checkpoint(path: Path, dims: EncoderDims) -> EncoderBlock:
    """Build the block with ``dims`` and load ``path`` strictly: every key present, every shape equal."""
    state = read_state_dict(path)
    model = build_model(dims)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        raise CheckpointError(f"checkpoint {path} does not fit EncoderBlock: " + "; ".join(parts))
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"checkpoint {path}: {key} has shape {tuple(state[key].shape)}, expected "
                f"{tuple(tensor.shape)} for --dim {dims.dim} --heads {dims.heads} --ffn {dims.ffn}"
            )
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()
