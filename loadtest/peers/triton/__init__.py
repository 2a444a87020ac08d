"""A real Triton Inference Server as the benchmark peer and the OIP conformance reference.

Needs the ``tritonserver`` binary that the ``nvidia-pytriton`` wheel ships: ``pip install --no-deps
nvidia-pytriton`` (its own Python dependencies pin numpy < 2; only the server binary is used here).
"""
