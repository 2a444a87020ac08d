from __future__ import annotations

# The service tests' small bundle (the built-in model at 64/4/128, converted once per session), for the soak.
from tests.service.conftest import small_bundle

__all__ = ["small_bundle"]
