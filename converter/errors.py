"""Errors the converter reports to users as one clear line."""

from __future__ import annotations


class ConversionError(Exception):
    """A conversion step failed for a reason the user can act on (bad checkpoint, bad dims, ...)."""


class CheckpointError(ConversionError):
    """The checkpoint is unreadable or does not match the model's architecture."""


class VerificationError(ConversionError):
    """The optimized model disagrees with PyTorch beyond tolerance."""


class BundleError(Exception):
    """A bundle directory is missing files, has a bad manifest, or fails its checksums."""


class ProviderError(Exception):
    """The requested execution provider cannot run here."""
