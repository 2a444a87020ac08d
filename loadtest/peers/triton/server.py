"""Start a real Triton Inference Server (the ``nvidia-pytriton`` wheel's binary) serving the ``encoder`` peer.

    python -m loadtest.peers.triton.server --model-dir bundles/fp16 --http-port 8000 --grpc-port 8001 \
        --metrics-port 8002 --provider cuda --instances 2 --max-batch-size 64 --max-delay-ms 0

writes a model repository and a backend directory under ``--workdir`` (a temporary directory by default) and
then becomes ``tritonserver`` (exec: signals reach the server itself). Ready when ``GET /v2/health/ready``
answers 200. The Python backend's stub embeds a libpython of this interpreter's version: where this
interpreter has a shared libpython, its directory goes first on ``LD_LIBRARY_PATH`` so the stub runs the same
Python; this interpreter's package directories go on ``PYTHONPATH`` and into the model's ``sys_path``
parameter, so numpy and onnxruntime import inside the stub as they do here.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from pathlib import Path

from loadtest.peers.triton.repository import ModelOptions, write_repository

READY_PATH = "/v2/health/ready"
# The stub's shared-memory pool per model instance: requests of 64 x 196 x 768 fp16 are 19 MB each way.
SHM_DEFAULT_BYTES = 64 << 20
SHM_GROWTH_BYTES = 64 << 20


class TritonUnavailable(RuntimeError):
    """No runnable tritonserver here (the reason says which part is missing)."""


def triton_home(explicit: str | None = None) -> Path:
    """The directory holding ``bin/tritonserver``, ``backends/python`` and ``python_backend_stubs``."""
    if explicit or os.environ.get("TRITON_HOME"):
        home = Path(explicit or os.environ["TRITON_HOME"])
    else:
        spec = importlib.util.find_spec("pytriton")  # locates the package without importing its dependencies
        if spec is None or not spec.submodule_search_locations:
            raise TritonUnavailable("nvidia-pytriton is not installed (pip install --no-deps nvidia-pytriton)")
        home = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    if not (home / "bin" / "tritonserver").is_file():
        raise TritonUnavailable(f"no tritonserver binary under {home}")
    return home


def stub_path(home: Path, version: tuple[int, int] | None = None) -> Path:
    major, minor = version or sys.version_info[:2]
    stub = home / "python_backend_stubs" / f"{major}.{minor}" / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonUnavailable(f"no Python-backend stub for Python {major}.{minor} under {home}")
    return stub


def libpython_dir() -> str | None:
    """Where this interpreter's shared libpython lives, or None (a static build: the stub finds the system's)."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return None
    libdir = sysconfig.get_config_var("LIBDIR")
    return str(libdir) if libdir and Path(libdir).is_dir() else None


def package_dirs() -> list[str]:
    """This interpreter's package directories: PYTHONPATH entries, the venv's and user site-packages."""
    found = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    found += [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    found += [*site.getsitepackages(), site.getusersitepackages()]
    return [p for p in dict.fromkeys(str(Path(p).resolve()) for p in found) if Path(p).is_dir()]


def backend_dir(home: Path, workdir: Path) -> Path:
    """``workdir/backends`` with the Python backend and the stub for this Python version beside it."""
    target = workdir / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(home / "backends" / "python" / name, target / name)
    shutil.copy2(stub_path(home), target / "triton_python_backend_stub")
    return target.parent


def server_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    # The stub was copied out of the wheel: its $ORIGIN-relative rpath to the wheel's bundled libraries is lost.
    bundled = home.parent.parent / "nvidia_pytriton.libs"
    libs = [d for d in (libpython_dir(), str(bundled) if bundled.is_dir() else None) if d]
    libs += [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if libs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
    env["PYTHONPATH"] = os.pathsep.join(package_dirs())
    return env


def check_stub(home: Path) -> None:
    """Fail early, and say why, where the stub cannot load its libraries (libpython above all) here."""
    ldd = shutil.which("ldd")
    if ldd is None:
        return
    result = subprocess.run([ldd, str(stub_path(home))], env=server_env(home), capture_output=True, text=True)
    missing = [line.split()[0] for line in result.stdout.splitlines() if "not found" in line]
    if missing:
        raise TritonUnavailable(f"the Python-backend stub cannot load {', '.join(missing)} on this host")


def unavailable() -> str | None:
    """Why a Triton peer cannot run here (no binary, no stub for this Python, a library the stub lacks), or None."""
    try:
        check_stub(triton_home())
    except TritonUnavailable as exc:
        return str(exc)
    return None


def command(home: Path, repo: Path, backends: Path, args: argparse.Namespace) -> list[str]:
    argv = [str(home / "bin" / "tritonserver"), f"--model-repository={repo}", f"--backend-directory={backends}"]
    argv += [f"--http-port={args.http_port}", f"--grpc-port={args.grpc_port}", f"--metrics-port={args.metrics_port}"]
    argv += ["--disable-auto-complete-config", "--strict-readiness=true", "--exit-timeout-secs=10"]
    argv += [f"--log-verbose={args.log_verbose}", f"--http-address={args.host}", f"--grpc-address={args.host}"]
    argv += [f"--backend-config=python,shm-default-byte-size={SHM_DEFAULT_BYTES}"]
    argv += [f"--backend-config=python,shm-growth-byte-size={SHM_GROWTH_BYTES}"]
    if args.http_threads:
        argv += [f"--http-thread-count={args.http_threads}"]
    return argv


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True, help="the converter bundle to serve")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--instances", type=int, default=2, help="model instances (each its own stub process)")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-delay-ms", type=float, default=0.0, help="dynamic batcher max_queue_delay")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="the wire dtype")
    p.add_argument("--intra-op-threads", type=int, default=0, help="onnxruntime threads per instance (0: its own)")
    p.add_argument("--http-threads", type=int, default=0, help="tritonserver --http-thread-count (0: its default)")
    p.add_argument("--triton-home", help="directory with bin/tritonserver (default: the nvidia-pytriton wheel's)")
    p.add_argument("--workdir", type=Path, help="for the repository and backends (default: a temporary dir)")
    p.add_argument("--log-verbose", type=int, default=0)
    return p.parse_args(argv)


def prepare(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """Write the repository and backend directory; the server's argv and environment."""
    home = triton_home(args.triton_home)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="triton-peer-"))
    options = ModelOptions(
        bundle_dir=args.model_dir.resolve(),
        provider=args.provider,
        instances=args.instances,
        max_batch_size=args.max_batch_size,
        max_delay_ms=args.max_delay_ms,
        wire_dtype=args.dtype,
        sys_path=tuple(package_dirs()),
        intra_op_threads=args.intra_op_threads,
    )
    repo = write_repository(workdir / "models", options)
    return command(home, repo, backend_dir(home, workdir), args), server_env(home)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        argv_, env = prepare(args)
    except TritonUnavailable as exc:
        sys.stderr.write(f"triton peer unavailable: {exc}\n")
        return 3
    sys.stderr.write(f"exec {' '.join(argv_)}\n")
    sys.stderr.flush()
    os.execve(argv_[0], argv_, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
