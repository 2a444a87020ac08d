"""Which CUDA errors poison a CUDA context for good ("sticky" errors).

After an illegal memory access, a device-side assert, a kernel that crashed or an uncorrectable ECC error, every
later CUDA call in that process fails too: only a new process gets a working context. The engine reports such
a failure as :class:`~service.engine.base.EngineUnrecoverable`, so its engine process exits and its supervisor
starts a fresh one, instead of failing every later batch on that device.
"""

from __future__ import annotations

# cudaGetErrorString texts of the sticky cudaError_t codes (as onnxruntime's "CUDA failure 700: ..." and
# converter.pinned.CudaError "... (700)" both quote them), lower case.
STICKY_MESSAGES = (
    "an illegal memory access was encountered",  # 700 cudaErrorIllegalAddress
    "the launch timed out and was terminated",  # 702 cudaErrorLaunchTimeout
    "device-side assert triggered",  # 710 cudaErrorAssert
    "hardware stack error",  # 714 cudaErrorHardwareStackError
    "an illegal instruction was encountered",  # 715 cudaErrorIllegalInstruction
    "misaligned address",  # 716 cudaErrorMisalignedAddress
    "operation not supported on global/shared address space",  # 717 cudaErrorInvalidAddressSpace
    "invalid program counter",  # 718 cudaErrorInvalidPc
    "unspecified launch failure",  # 719 cudaErrorLaunchFailure
    "uncorrectable ecc error encountered",  # 214 cudaErrorECCUncorrectable
)


def is_sticky_cuda_error(exc: BaseException) -> bool:
    """Does ``exc`` (or an exception it was raised from) report a context-poisoning CUDA error?"""
    seen: BaseException | None = exc
    for _ in range(8):  # the cause chain, bounded
        if seen is None:
            return False
        text = str(seen).lower()
        if any(message in text for message in STICKY_MESSAGES):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
