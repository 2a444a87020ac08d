from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from converter.errors import CheckpointError
from converter.model import EncoderBlock, EncoderDims, default_model, load_checkpoint

DIMS = EncoderDims(64, 4, 128)


def test_default_model_is_deterministic_and_layernorm_not_identity() -> None:
    a, b = default_model(DIMS), default_model(DIMS)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.allclose(a.norm1.weight, torch.ones(64))
    assert not torch.allclose(a.norm2.bias, torch.zeros(64))


def test_encoder_block_equals_transformer_encoder_layer() -> None:
    block = default_model(DIMS)
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True).eval()
    state = block.state_dict()
    mapping = {
        "attn.in_proj_weight": "self_attn.in_proj_weight",
        "attn.in_proj_bias": "self_attn.in_proj_bias",
        "attn.out_proj.weight": "self_attn.out_proj.weight",
        "attn.out_proj.bias": "self_attn.out_proj.bias",
        "linear_net.0.weight": "linear1.weight",
        "linear_net.0.bias": "linear1.bias",
        "linear_net.3.weight": "linear2.weight",
        "linear_net.3.bias": "linear2.bias",
    }
    layer.load_state_dict({mapping.get(k, k): v for k, v in state.items()})
    x = torch.randn(3, 11, 64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_load_checkpoint_roundtrip(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(3)
    source = EncoderBlock(64, 4, 128).eval()
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".pt":
        torch.save(source.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = load_checkpoint(path, DIMS)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))


def _save(tmp_path: Path, state: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.pop("norm1.weight"), "missing keys ['norm1.weight']"),
        (lambda s: s.__setitem__("extra.weight", torch.zeros(1)), "unexpected keys ['extra.weight']"),
        (lambda s: s.__setitem__("linear_net.0.weight", torch.zeros(256, 64)), "linear_net.0.weight has shape"),
    ],
)
def test_bad_state_dicts(tmp_path: Path, mutate, message: str) -> None:
    state = EncoderBlock(64, 4, 128).state_dict()
    mutate(state)
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_checkpoint(_save(tmp_path, state), DIMS)


def test_dimension_mismatch_names_the_flags(tmp_path: Path) -> None:
    path = _save(tmp_path, EncoderBlock(64, 4, 128).state_dict())
    with pytest.raises(CheckpointError, match="--dim 96"):
        load_checkpoint(path, EncoderDims(96, 4, 128))


def test_unreadable_and_absent_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(garbage, DIMS)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pt", DIMS)
    bad_st = tmp_path / "garbage.safetensors"
    bad_st.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(bad_st, DIMS)


def test_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="not a state_dict"):
        load_checkpoint(path, DIMS)


def test_heads_must_divide_dim() -> None:
    with pytest.raises(CheckpointError, match="not divisible"):
        EncoderDims(64, 5, 128)
