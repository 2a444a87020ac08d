"""The Open Inference Protocol's JSON documents, for the OpenAPI schema only (bodies are parsed by rest_codec)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class OIPError(BaseModel):
    """Every OIP error answer: the protocol's ``{"error": "<message>"}``."""

    error: str


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class RequestInput(BaseModel):
    name: str = Field(description='"input"')
    shape: list[int] = Field(description="(B, S, D) or (S, D)")
    datatype: str = Field(description="FP32 or FP16")
    parameters: dict[str, Any] | None = Field(
        default=None, description="binary_data_size (binary tensor extension), or shared_memory_region/_offset/_size"
    )
    data: list[Any] | None = Field(default=None, description="the values, flat or nested, row-major")


class RequestOutput(BaseModel):
    name: str = Field(description='"output"')
    parameters: dict[str, Any] | None = Field(default=None, description="binary_data: true for a binary answer")


class InferRequestBody(BaseModel):
    """The JSON part of an inference request (binary tensors follow it; see Inference-Header-Content-Length)."""

    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        default=None, description="timeout (microseconds), binary_data_output (bool)"
    )
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[float] | None = None


class InferResponseBody(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


class Duration(BaseModel):
    count: int
    ns: int


class ModelStats(BaseModel):
    name: str
    version: str
    last_inference: int
    inference_count: int
    execution_count: int
    inference_stats: dict[str, Duration]
    batch_stats: list[dict[str, Any]]


class StatsBody(BaseModel):
    model_stats: list[ModelStats]
