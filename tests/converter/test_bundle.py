from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from converter.bundle import load_bundle
from converter.errors import BundleError


@pytest.fixture
def bundle_copy(small_bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(small_bundle, target)
    return target


def test_loads_and_describes(bundle_copy: Path) -> None:
    bundle = load_bundle(bundle_copy)
    assert (bundle.dim, bundle.dtype, bundle.input_name, bundle.output_name) == (64, "float32", "input", "output")
    assert bundle.max_seq_len == 256
    assert bundle.model_path.is_file()


def test_tampered_model_is_refused(bundle_copy: Path) -> None:
    with (bundle_copy / "model.onnx").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match=r"checksum mismatch for model\.onnx"):
        load_bundle(bundle_copy)


def test_missing_pieces(bundle_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"manifest\.json is missing"):
        load_bundle(tmp_path / "nowhere")
    (bundle_copy / "model.onnx").unlink()
    with pytest.raises(BundleError, match=r"model\.onnx is missing"):
        load_bundle(bundle_copy)


def test_bad_manifest(bundle_copy: Path) -> None:
    path = bundle_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["dims"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="lacks required fields"):
        load_bundle(bundle_copy)
    path.write_text("{not json")
    with pytest.raises(BundleError, match="cannot read"):
        load_bundle(bundle_copy)
