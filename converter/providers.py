"""Execution-provider choice and options, as pure functions (no onnxruntime import; unit-testable).

Order for ``auto``: TensorRT EP -> CUDA EP -> CPU EP. An explicit choice that cannot run is an error,
never a quiet fallback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converter.errors import ProviderError

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
PROVIDER_ALIASES = {"tensorrt": TENSORRT, "cuda": CUDA, "cpu": CPU}
CHOICES = ("auto", "tensorrt", "cuda", "cpu")
GPU_PROVIDERS = frozenset({TENSORRT, CUDA})
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# How EncoderSession.run moves host arrays: "pinned" stages through page-locked buffers with async copies on our
# own streams (and pipelines big batches in chunks); "pageable" is onnxruntime's plain OrtValue copy path.
HOST_PATHS = ("pinned", "pageable")


@dataclass(frozen=True)
class SessionOptions:
    """How to build a session for a bundle. Plain values, built once from settings and passed down."""

    provider: str = "auto"
    batch_buckets: tuple[int, ...] = DEFAULT_BUCKETS
    # Sequence lengths served most: TRT's "opt" profile and the CUDA-graph/warm-up shapes.
    seq_lens: tuple[int, ...] = (196,)
    cuda_graphs: bool = True
    # onnxruntime CUDA EP attention kernel choice (0 = let onnxruntime pick; see AttentionBackend flags).
    sdpa_kernel: int = 0
    device_id: int = 0
    intra_op_threads: int = 0
    extra_cuda_options: dict[str, str] = field(default_factory=dict)
    host_path: str = "pinned"
    # Batches of at least this many samples (with a captured graph) run as chunks whose copies overlap compute.
    pipeline_min_batch: int = 128
    # run_into (merged batches from many parts): chunk sizes that get a second captured slot, and how many full
    # chunks to aim for (converter.pipeline.pick_chunk; below 2: never pipeline). Chosen from an H200 sweep
    # (BENCHMARKS.md, "run_into: copies overlapped with compute").
    pipeline_chunks: tuple[int, ...] = (8, 16, 32)
    pipeline_min_chunks: int = 3
    # The CUDA slot path adds each sample's NaN/Inf flag to the graph as a second output (converter.finite); off
    # only to compare answers or timings against the model as it is.
    finite_flags: bool = True

    def __post_init__(self) -> None:
        if self.host_path not in HOST_PATHS:
            raise ProviderError(f"host_path must be one of {HOST_PATHS}, got {self.host_path!r}")
        if self.provider not in CHOICES:
            raise ProviderError(f"provider must be one of {CHOICES}, got {self.provider!r}")
        if not self.batch_buckets or any(b <= 0 for b in self.batch_buckets):
            raise ProviderError(f"batch buckets must be positive, got {self.batch_buckets}")
        if any(c <= 0 for c in self.pipeline_chunks):
            raise ProviderError(f"pipeline chunks must be positive, got {self.pipeline_chunks}")
        if list(self.batch_buckets) != sorted(set(self.batch_buckets)):
            raise ProviderError(f"batch buckets must be strictly increasing, got {self.batch_buckets}")

    @property
    def max_batch(self) -> int:
        return self.batch_buckets[-1]


def candidate_providers(requested: str, available: list[str], cuda_devices: int = 1) -> list[str]:
    """Providers to hand to onnxruntime, best first; raises if an explicit choice is not built in.

    ``auto`` skips the GPU providers when the driver sees no CUDA device: onnxruntime-gpu lists them anyway and
    would try (and loudly fail) to load them first. An explicit GPU choice is still tried, and refused if it
    does not start.
    """
    if requested == "auto":
        gpus = [p for p in (TENSORRT, CUDA) if p in available] if cuda_devices > 0 else []
        return [*gpus, CPU]
    name = PROVIDER_ALIASES[requested]
    if name not in available:
        raise ProviderError(f"provider {requested!r} ({name}) is not available in this onnxruntime build")
    return [name] if name == CPU else [name, CPU]


def check_running_provider(requested: str, candidates: list[str], running: list[str]) -> str:
    """Return the provider that really runs; raise when an explicit GPU request ended on the CPU."""
    actual = running[0] if running else CPU
    if requested != "auto" and actual != PROVIDER_ALIASES[requested]:
        raise ProviderError(
            f"requested provider {requested!r} but onnxruntime runs {actual}; "
            f"it could not start {PROVIDER_ALIASES[requested]} (see onnxruntime's log above)"
        )
    if actual not in candidates:
        raise ProviderError(f"onnxruntime runs {actual}, which was not requested ({candidates})")
    return actual


def shape_spec(name: str, batch: int, seq: int, dim: int) -> str:
    return f"{name}:{batch}x{seq}x{dim}"


def tensorrt_options(
    bundle_dir: Path, options: SessionOptions, input_name: str, dim: int, max_seq_len: int, fp16: bool
) -> dict[str, Any]:
    """TRT EP options: fp16, engine + timing caches inside the bundle, one profile over the served range."""
    cache = bundle_dir / "trt-cache"
    opt_seq = max(options.seq_lens)
    return {
        "device_id": options.device_id,
        "trt_fp16_enable": fp16,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
        "trt_max_workspace_size": 8 << 30,
        "trt_profile_min_shapes": shape_spec(input_name, 1, 1, dim),
        "trt_profile_opt_shapes": shape_spec(input_name, options.max_batch, opt_seq, dim),
        "trt_profile_max_shapes": shape_spec(input_name, options.max_batch, max_seq_len, dim),
    }


def cuda_options(options: SessionOptions) -> dict[str, Any]:
    """CUDA EP options. CUDA graphs need fixed shapes and io-binding: the session keeps one per bucket."""
    opts: dict[str, Any] = {
        "device_id": options.device_id,
        "enable_cuda_graph": "1" if options.cuda_graphs else "0",
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "arena_extend_strategy": "kSameAsRequested",
    }
    if options.sdpa_kernel:
        opts["sdpa_kernel"] = str(options.sdpa_kernel)
    opts.update(options.extra_cuda_options)
    return opts


def provider_options(
    providers: list[str],
    bundle_dir: Path,
    options: SessionOptions,
    input_name: str,
    dim: int,
    max_seq_len: int,
    fp16: bool,
) -> list[dict[str, Any]]:
    """Options for each provider in ``providers``, same order (onnxruntime's ``provider_options``)."""
    out: list[dict[str, Any]] = []
    for name in providers:
        if name == TENSORRT:
            out.append(tensorrt_options(bundle_dir, options, input_name, dim, max_seq_len, fp16))
        elif name == CUDA:
            out.append(cuda_options(options))
        else:
            out.append({})
    return out


def bucket_for(batch: int, buckets: tuple[int, ...]) -> int | None:
    """Smallest bucket holding ``batch`` samples, or None when it exceeds the largest."""
    for bucket in buckets:
        if batch <= bucket:
            return bucket
    return None
