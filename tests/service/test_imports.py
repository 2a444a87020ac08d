"""The import rules of the architecture, checked on the source with ``ast``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parents[2] / "service"
CONVERTER_TORCH_MODULES = ("converter.model", "converter.export", "converter.fuse", "converter.verify")
CONVERTER_TORCH_MODULES += ("converter.rewrite", "converter.convert", "converter.__main__")


def imports_of(path: Path) -> set[str]:
    """Every module a file imports (``from a import b`` gives ``a`` and ``a.b``), top level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: use absolute imports"
            assert node.module is not None
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def matches(module: str, banned: tuple[str, ...]) -> bool:
    return any(module == b or module.startswith(b + ".") for b in banned)


def service_files() -> list[Path]:
    files = sorted(SERVICE.rglob("*.py"))
    assert len(files) > 10
    return files


def violations(files: list[Path], banned: tuple[str, ...]) -> list[str]:
    return [f"{f.relative_to(SERVICE)} imports {m}" for f in files for m in sorted(imports_of(f)) if matches(m, banned)]


def test_the_walker_sees_imports_inside_functions() -> None:
    # service/engine/factory.py imports OnnxEngine inside build_engine: a walker that missed it would pass vacuously.
    assert "service.engine.onnx" in imports_of(SERVICE / "engine" / "factory.py")
    assert violations([SERVICE / "metrics.py"], ("prometheus_client",))


def test_batching_imports_no_http_no_onnxruntime_no_prometheus() -> None:
    files = [f for f in service_files() if "batching" in f.parts]
    assert files
    assert violations(files, ("fastapi", "starlette", "onnxruntime", "prometheus_client", "service.api")) == []


def test_service_never_imports_torch_or_the_converters_pytorch_code() -> None:
    assert violations(service_files(), ("torch", *CONVERTER_TORCH_MODULES)) == []


@pytest.mark.parametrize("banned", ["onnxruntime", "converter.session"])
def test_only_the_engine_package_touches_onnxruntime(banned: str) -> None:
    outside = [f for f in service_files() if "engine" not in f.relative_to(SERVICE).parts]
    assert violations(outside, (banned,)) == []


def test_importing_the_service_loads_no_torch() -> None:
    code = "import sys, service.__main__, service.app, service.engine.onnx; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_the_data_plane_is_transport_neutral() -> None:
    # Every protocol adapter (/encode, OIP REST, gRPC) calls these; none of them may pull a transport in.
    files = [SERVICE / name for name in ("dataplane.py", "errors.py", "state.py")]
    banned = ("fastapi", "starlette", "grpc", "onnxruntime", "service.api", "uvicorn")
    assert violations(files, banned) == []
