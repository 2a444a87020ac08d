from __future__ import annotations

# The service tests' small bundle (the built-in model at 64/4/128, converted once per session) and its unbatched
# PyTorch reference, for the soaks and the rolling restart.
from tests.service.conftest import reference, small_bundle

__all__ = ["reference", "small_bundle"]
