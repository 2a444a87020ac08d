"""The system shared-memory extension: a registry of client shared-memory regions shared by every worker."""

from service.shm.registry import SystemSharedMemory

__all__ = ["SystemSharedMemory"]
