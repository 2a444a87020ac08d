"""All service configuration: one pydantic-settings class, read from ``ENCODER_*`` variables and CLI flags.

Built once in ``__main__`` (or by :func:`service.app.app_from_env` in a worker process) and passed down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "ENCODER_"
MIB = 1 << 20
SHARED_MEMORY_KINDS = ("none", "system", "cuda")


class Settings(BaseSettings):
    """Service settings; every field is also the environment variable ``ENCODER_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    host: str = Field(default="0.0.0.0", description="address to listen on")
    port: int = Field(default=8000, ge=0, le=65535, description="port to listen on")
    grpc_port: int = Field(
        default=8001,
        ge=0,
        le=65535,
        description="gRPC port of the Open Inference Protocol (inference.GRPCInferenceService); 0 turns it off",
    )
    model_dir: Path | None = Field(default=None, description="bundle directory; unset: the built-in default model")
    provider: Literal["auto", "tensorrt", "cuda", "cpu"] = Field(default="auto", description="onnxruntime provider")
    max_batch_size: int = Field(default=32, ge=1, le=4096, description="most samples in one engine batch")
    max_delay_ms: float = Field(
        default=0.0,
        ge=0,
        # 0 (as Triton's default): the engine runs as soon as it is free, and batches grow with load because
        # requests pile up while a batch computes. A fixed wait only adds latency when the engine is idle.
        description="longest wait for a batch to fill after its first request (0: go as soon as the engine is free)",
    )
    max_queue: int = Field(default=1024, ge=1, description="most requests waiting; beyond it, 429 at once")
    request_timeout_ms: float = Field(
        default=30_000, gt=0, description="default deadline (X-Request-Timeout-Ms overrides)"
    )
    max_body_bytes: int = Field(default=64 * MIB, ge=1, description="largest request body; beyond it, 413")
    # An answer given before the body was read (413, 408, 429, 503...) is followed by reading and dropping the
    # rest, so the client, still sending, can read it (see service/api/early.py). 4x the default body limit
    # and a few seconds: a 70 MiB upload refused with 413 is read off in well under a second on a LAN.
    discard_body_bytes: int = Field(
        default=256 * MIB,
        ge=0,
        description="after an answer given before the request body was read: most bytes of the rest read and "
        "dropped so the client can read the answer; beyond it the connection is closed",
    )
    discard_body_s: float = Field(
        default=5.0, ge=0, description="... and the longest time spent reading them (then the connection is closed)"
    )
    keep_alive_s: float = Field(
        # Above every common proxy's idle timeout (nginx 75 s to clients and 60 s upstream, AWS ALB 60 s): the
        # proxy, not the server, closes an idle connection first, so it never reuses one the server is closing.
        default=90.0,
        gt=0,
        description="idle keep-alive connections are closed after this many seconds; keep it above the idle "
        "timeout of any proxy or load balancer in front",
    )
    workers: int = Field(default=1, ge=1, description="HTTP worker processes")
    shared_engine: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="with several workers: 'on' = one engine process computes for all of them (one model copy and "
        "CUDA context, batches merged across workers, tensors through shared memory); 'off' = an engine per worker; "
        "'auto' = on when the model runs on a GPU, off on the CPU",
    )
    devices: str = Field(
        default="all",
        description="devices to serve on, one engine process each: 'all' (every GPU; the CPU without one), GPU "
        "ordinals like '0,1', 'cpu', or 'cpu:N' (N CPU engine processes)",
    )
    engine_restart_limit: int = Field(
        default=5,
        ge=0,
        description="an engine process that dies is restarted at most this many times per --engine-restart-window-s; "
        "one death more and the service exits 1 (the orchestrator replaces it)",
    )
    engine_restart_window_s: float = Field(
        default=300.0, gt=0, description="the window --engine-restart-limit counts an engine's deaths in"
    )
    engine_restart_backoff_s: float = Field(
        default=1.0, ge=0, description="wait before restarting a dead engine process; doubles with each recent death"
    )
    engine_restart_backoff_max_s: float = Field(
        default=30.0, ge=0, description="the longest wait before restarting a dead engine process"
    )
    in_flight_batches: int = Field(
        default=0,
        ge=0,
        le=64,
        description="with engine processes: batches each worker keeps in flight to them at once (0: 2, or more "
        "when there are fewer workers than devices: 2 per device in all); more means smaller worker batches",
    )
    spread_ratio: float = Field(
        default=4.0,
        ge=0,
        description="with several devices: the next device takes batches once the runs of those before it take this "
        "many times their quickest (light loads merge on the first device); 0: every batch to the least-loaded device",
    )
    engine_thread: bool = Field(
        default=False,
        description="with engine processes: each runs its batches on a thread of its own, reading worker frames and "
        "writing answers while the GPU computes (not yet measured on a GPU, hence off); off: on its event loop",
    )
    engine_dir: str | None = Field(
        default=None, description="internal: set by the supervisor: the engine processes' sockets and status board"
    )
    max_shared_memory_bytes: int = Field(
        default=4 << 30,
        ge=1,
        description="shared memory: most bytes registered in all regions of one kind (system, CUDA) together; "
        "beyond it, 409",
    )
    max_shared_memory_regions: int = Field(
        default=256,
        ge=1,
        description="shared memory: most regions of one kind (system, CUDA) registered at once; beyond it, 409",
    )
    shared_memory_dir: str | None = Field(
        default=None,
        description="internal: the registry of shared-memory regions that every worker reads (set by the "
        "supervisor; unset: a private one per process)",
    )
    seq_lens: Annotated[tuple[int, ...], NoDecode] = Field(
        default=(196,), description="comma-separated sequence lengths to warm up (and capture CUDA graphs for)"
    )
    cuda_graphs: bool = Field(default=True, description="capture CUDA graphs per batch bucket on the CUDA EP")
    cache_dir: Path | None = Field(
        default=None, description="parent of the converted default model (~/.cache/encoder-service)"
    )
    drain_s: float = Field(
        default=0.0,
        ge=0,
        description="after SIGTERM: seconds of /readyz 503 while still serving, so load balancers stop routing here "
        "before the listener closes",
    )
    graceful_timeout_s: float = Field(
        default=30.0, gt=0, description="after the listener closed: longest wait for accepted requests to finish"
    )
    engine: Literal["onnx", "fake"] = Field(
        default="onnx", description="test-only: 'fake' serves service.engine.fake.FakeEngine (dim 8, no model)"
    )
    fake_delay_ms: float = Field(default=0.0, ge=0, description="test-only: the fake engine's time per batch")
    fake_sample_delay_ms: float = Field(
        default=0.0, ge=0, description="test-only: the fake engine's time per sample, added to its time per batch"
    )
    model_name: str = Field(
        default="encoder",
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9_.\-]+$",
        description="the model's name in the Open Inference Protocol (/v2/models/<name>)",
    )
    shared_memory: str = Field(
        default="none",
        description="Open Inference Protocol shared-memory extensions: 'none' or a comma list of 'system', 'cuda'",
    )
    cuda_memory: Literal["cuda", "fake"] = Field(
        default="cuda",
        description="CUDA shared memory's device layer: 'cuda' (the CUDA runtime); test-only: 'fake' (a handle "
        "names a host shared-memory object, so the extension runs without a GPU)",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(default="info", description="log level")
    access_log: bool = Field(
        default=False,
        description="log one line per HTTP request (off by default: at thousands of requests/s the formatting and "
        "writing cost about six percent of a worker's CPU; /metrics counts requests by outcome)",
    )

    @field_validator("seq_lens", mode="before")
    @classmethod
    def _split_seq_lens(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(int(part) for part in value.split(",") if part.strip())
        return value

    @field_validator("seq_lens")
    @classmethod
    def _positive_seq_lens(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or min(value) < 1:
            raise ValueError("seq_lens must be positive integers")
        return value

    @field_validator("shared_memory")
    @classmethod
    def _known_shared_memory(cls, value: str) -> str:
        kinds = [part.strip().lower() for part in value.split(",") if part.strip()]
        unknown = set(kinds) - set(SHARED_MEMORY_KINDS)
        if not kinds or unknown or ("none" in kinds and len(kinds) > 1):
            allowed = ", ".join(SHARED_MEMORY_KINDS[1:])
            raise ValueError(f"shared_memory must be 'none' or a comma list of {allowed}; got {value!r}")
        return ",".join(kinds)

    @property
    def shared_memory_kinds(self) -> frozenset[str]:
        """The enabled shared-memory extensions ('system', 'cuda'); empty with 'none'."""
        return frozenset(self.shared_memory.split(",")) - {"none"}

    @field_validator("devices")
    @classmethod
    def _check_devices(cls, value: str) -> str:
        from service.engine.devices import check_syntax

        return check_syntax(value)

    @property
    def fake_delay_s(self) -> float:
        return self.fake_delay_ms / 1000.0

    @property
    def fake_sample_delay_s(self) -> float:
        return self.fake_sample_delay_ms / 1000.0

    @property
    def max_delay_s(self) -> float:
        return self.max_delay_ms / 1000.0

    def to_env(self) -> dict[str, str]:
        """These settings as ``ENCODER_*`` variables, for worker processes that rebuild them from the env."""
        env = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, tuple):
                value = ",".join(str(v) for v in value)
            env[f"{ENV_PREFIX}{name.upper()}"] = str(value)
        return env
