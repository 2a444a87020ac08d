from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from converter.__main__ import main
from converter.model import EncoderBlock


def test_cli_writes_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["--out", str(tmp_path / "b"), "--dim", "32", "--heads", "2", "--ffn", "64", "--verify-provider", "cpu"]
    )
    assert code == 0
    assert "verified on CPUExecutionProvider" in capsys.readouterr().out
    assert (tmp_path / "b" / "manifest.json").is_file()


@pytest.mark.parametrize(
    ("setup", "flags", "message"),
    [
        (lambda p: p.write_bytes(b"junk"), [], "cannot read checkpoint"),
        (lambda p: torch.save(EncoderBlock(32, 2, 64).state_dict(), p), ["--dim", "64"], "has shape"),
        (lambda p: torch.save({"attn.in_proj_weight": torch.zeros(96, 32)}, p), [], "missing keys"),
        (lambda p: None, [], "does not exist"),
    ],
)
def test_cli_bad_checkpoint_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], setup, flags, message):
    ckpt = tmp_path / "ckpt.pt"
    setup(ckpt)
    args = ["--checkpoint", str(ckpt), "--out", str(tmp_path / "b"), "--dim", "32", "--heads", "2", "--ffn", "64"]
    assert main(args + flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "b").exists()


def test_cli_process_exit_code(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "converter", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "b")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().endswith("does not exist or is not a file")
