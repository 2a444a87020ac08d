"""Response models of the JSON endpoints (also what /docs shows)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    type: str = Field(description="machine-readable kind, e.g. invalid_input, overloaded, deadline_exceeded")
    message: str


class ErrorBody(BaseModel):
    """The body of every error answer."""

    error: ErrorDetail


class Status(BaseModel):
    status: str
    devices: dict[str, str] | None = Field(
        default=None, description="readiness: each device's engine, 'up' or 'down' (being restarted)"
    )


class ModelCard(BaseModel):
    """The loaded model, as /v1/models describes it."""

    name: str
    dim: int
    dtype: str
    max_seq_len: int
    provider: str
    buckets: list[int] = Field(description="engine batch sizes; batches are padded to them when fixed_shapes")
    max_batch_size: int
    fixed_shapes: bool
    devices: list[str] = Field(default_factory=list, description="the devices whose engines serve now")
    details: dict[str, Any]


class ModelList(BaseModel):
    models: list[ModelCard]


class EncodeJSONRequest(BaseModel):
    """JSON form of /encode (documentation only: the body is parsed with orjson + numpy)."""

    inputs: list[list[float]] | list[list[list[float]]] = Field(description="(S, D) or (B, S, D) arrays of numbers")


class EncodeJSONResponse(BaseModel):
    outputs: list[Any]
    model: str
    shape: list[int]
