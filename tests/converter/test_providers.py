from __future__ import annotations

from pathlib import Path

import pytest

from converter.errors import ProviderError
from converter.providers import (
    CPU,
    CUDA,
    TENSORRT,
    SessionOptions,
    bucket_for,
    candidate_providers,
    check_running_provider,
    cuda_options,
    provider_options,
    tensorrt_options,
)

ALL = [TENSORRT, CUDA, CPU]


def test_auto_order_is_trt_cuda_cpu() -> None:
    assert candidate_providers("auto", ALL) == [TENSORRT, CUDA, CPU]
    assert candidate_providers("auto", [CUDA, CPU]) == [CUDA, CPU]
    assert candidate_providers("auto", [CPU]) == [CPU]


def test_auto_without_a_cuda_device_is_cpu_only() -> None:
    assert candidate_providers("auto", ALL, cuda_devices=0) == [CPU]
    assert candidate_providers("auto", ALL, cuda_devices=2) == [TENSORRT, CUDA, CPU]
    # an explicit GPU request is still tried (and refused by the session if it cannot start)
    assert candidate_providers("cuda", ALL, cuda_devices=0) == [CUDA, CPU]


def test_explicit_choice() -> None:
    assert candidate_providers("cuda", ALL) == [CUDA, CPU]
    assert candidate_providers("cpu", ALL) == [CPU]
    with pytest.raises(ProviderError, match="not available"):
        candidate_providers("tensorrt", [CUDA, CPU])


def test_a_cpu_run_is_never_called_a_gpu_run() -> None:
    with pytest.raises(ProviderError, match="runs CPUExecutionProvider"):
        check_running_provider("cuda", [CUDA, CPU], [CPU])
    with pytest.raises(ProviderError, match="runs CUDAExecutionProvider"):
        check_running_provider("tensorrt", [TENSORRT, CPU], [CUDA, CPU])
    assert check_running_provider("auto", ALL, [CPU]) == CPU
    assert check_running_provider("auto", ALL, [CUDA, CPU]) == CUDA
    assert check_running_provider("tensorrt", [TENSORRT, CPU], [TENSORRT, CUDA, CPU]) == TENSORRT


def test_tensorrt_options_cover_served_range(tmp_path: Path) -> None:
    opts = tensorrt_options(
        tmp_path, SessionOptions(batch_buckets=(1, 8, 64), seq_lens=(128, 196)), "input", 768, 512, fp16=True
    )
    assert opts["trt_fp16_enable"] is True
    assert opts["trt_engine_cache_enable"] and opts["trt_timing_cache_enable"]
    assert opts["trt_engine_cache_path"] == str(tmp_path / "trt-cache") == opts["trt_timing_cache_path"]
    assert opts["trt_profile_min_shapes"] == "input:1x1x768"
    assert opts["trt_profile_opt_shapes"] == "input:64x196x768"
    assert opts["trt_profile_max_shapes"] == "input:64x512x768"


def test_cuda_options() -> None:
    opts = cuda_options(SessionOptions(cuda_graphs=True, sdpa_kernel=2, device_id=1))
    assert opts["enable_cuda_graph"] == "1" and opts["sdpa_kernel"] == "2" and opts["device_id"] == 1
    assert cuda_options(SessionOptions(cuda_graphs=False))["enable_cuda_graph"] == "0"


def test_provider_options_align_with_providers(tmp_path: Path) -> None:
    opts = provider_options(ALL, tmp_path, SessionOptions(), "input", 64, 256, fp16=False)
    assert len(opts) == 3 and "trt_fp16_enable" in opts[0] and "enable_cuda_graph" in opts[1] and opts[2] == {}


def test_session_options_validation() -> None:
    with pytest.raises(ProviderError, match="provider must be one of"):
        SessionOptions(provider="gpu")
    with pytest.raises(ProviderError, match="strictly increasing"):
        SessionOptions(batch_buckets=(8, 4))


def test_bucket_for() -> None:
    assert [bucket_for(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, None]
