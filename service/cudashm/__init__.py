"""The CUDA shared-memory extension: a registry of client CUDA allocations (IPC handles) shared by every worker."""

from service.cudashm.registry import CudaSharedMemory, Lease

__all__ = ["CudaSharedMemory", "Lease"]
