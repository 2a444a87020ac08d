"""Model bundle: a directory with the ONNX file(s) and ``manifest.json``.

The bundle is the contract between the converter and the service. Loading checks every file's sha256,
so a bundle that was edited or truncated after conversion is refused rather than served.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converter.errors import BundleError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_REQUIRED = ("format_version", "model_file", "files", "dims", "precision", "inputs", "outputs", "max_seq_len")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_checksums(directory: Path, names: list[str]) -> dict[str, str]:
    return {name: sha256_file(directory / name) for name in sorted(names)}


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


@dataclass(frozen=True)
class Bundle:
    """A loaded, checksum-verified bundle."""

    directory: Path
    manifest: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.directory / self.manifest["model_file"]

    @property
    def dim(self) -> int:
        return int(self.manifest["dims"]["dim"])

    @property
    def precision(self) -> str:
        return str(self.manifest["precision"])

    @property
    def dtype(self) -> str:
        """numpy dtype name of the model's input and output."""
        return str(self.manifest["inputs"][0]["dtype"])

    @property
    def input_name(self) -> str:
        return str(self.manifest["inputs"][0]["name"])

    @property
    def output_name(self) -> str:
        return str(self.manifest["outputs"][0]["name"])

    @property
    def max_seq_len(self) -> int:
        return int(self.manifest["max_seq_len"])

    @property
    def name(self) -> str:
        return str(self.manifest.get("name", self.directory.name))


def load_bundle(directory: str | Path, verify_checksums: bool = True) -> Bundle:
    """Read ``manifest.json`` and check every listed file against its sha256."""
    root = Path(directory)
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{root} is not a model bundle: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read {path}: {exc}") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{path} must hold a JSON object")
    absent = [key for key in _REQUIRED if key not in manifest]
    if absent:
        raise BundleError(f"{path} lacks required fields {absent}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise BundleError(f"{path}: unsupported format_version {manifest['format_version']}")
    files = manifest["files"]
    if manifest["model_file"] not in files:
        raise BundleError(f"{path}: model_file {manifest['model_file']!r} has no checksum in 'files'")
    if verify_checksums:
        for name, expected in files.items():
            file = root / name
            if not file.is_file():
                raise BundleError(f"bundle {root}: {name} is missing")
            actual = sha256_file(file)
            if actual != expected:
                raise BundleError(
                    f"bundle {root}: checksum mismatch for {name} (manifest {expected[:12]}…, file {actual[:12]}…)"
                )
    return Bundle(directory=root, manifest=manifest)
