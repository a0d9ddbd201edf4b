"""Service settings: one pydantic-settings model, read from ``PROMPTDISTILL_*`` environment variables.

Nothing is read at import time; :func:`get_settings` builds (and caches) the settings on first use,
and tests pass a :class:`Settings` to ``create_app``; routes read the app's own copy
(``app.state.settings``, service/deps.py).
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024
IVF_MIN_CLASSES = 10_000  # an 'ivf' label set smaller than this is searched exactly (clustering buys nothing)


class Settings(BaseSettings):
    """Everything the service can be told. Environment: ``PROMPTDISTILL_<FIELD>`` (case-insensitive)."""

    model_config = SettingsConfigDict(env_prefix="PROMPTDISTILL_", extra="ignore", frozen=True)

    # --- what to serve
    bundle: Path | None = Field(default=None, description="bundle folder (manifest.json + tensors)")
    state_dir: Path = Field(default=Path("promptdistill-state"), description="SQLite database of label sets lives here")
    database_url: SecretStr | None = Field(
        default=None,
        description="postgresql://user:password@host:5432/db: label sets shared by every replica "
        "(default: SQLite in state_dir)",
    )
    poll_interval_s: float = Field(
        default=2.0, gt=0, le=3600, description="PostgreSQL: how often each replica re-checks versions besides LISTEN"
    )
    min_version_wait_s: float = Field(
        default=1.0, ge=0, le=60, description="how long a lagging replica waits for a requested min_version"
    )
    backend: Literal["auto", "onnx", "torch"] = Field(
        default="auto",
        description="image encoder runtime; auto: ONNX Runtime when the bundle has an ONNX graph, else torch",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto: CUDA when available")
    faiss_gpu: bool = Field(default=True, description="use a FAISS GPU index when FAISS GPU and a GPU are present")
    threads: int | None = Field(
        default=None, ge=1, description="intra-op threads for the encoder (None: runtime default)"
    )
    onnx_precision: Literal["fp32", "int8"] = Field(
        default="fp32", description="which ONNX graph to serve: fp32, or the dynamically quantised int8 one"
    )
    index_kind: Literal["flat", "ivf"] = Field(
        default="flat",
        description="search of label sets created without an 'index': flat = exact; ivf = approximate "
        f"(FAISS IVF, for >= 100k classes; sets under {IVF_MIN_CLASSES:,} classes are searched exactly)",
    )
    ivf_nprobe: int = Field(default=32, ge=1, le=4096, description="IVF lists visited per query (recall vs speed)")
    # --- engine (dynamic micro-batching) and admission
    max_batch_size: int = Field(default=16, ge=1, le=4096, description="images per encoder call")
    max_wait_ms: float = Field(
        default=0.0,
        ge=0,
        le=10_000,
        description="how long an image that finds the encoder idle waits for company (0: encoded at once; "
        "batches still form from what queues while the encoder is busy)",
    )
    max_images_in_flight: int | None = Field(
        default=None,
        ge=1,
        description="admission capacity: images in flight (decoding, queued, encoding) at most; beyond this "
        "requests get 429 before any decoding. None: target_latency_s / the measured service time per image",
    )
    target_latency_s: float = Field(
        default=0.5,
        gt=0,
        description="the latency an admitted image is promised; sets the default admission capacity. Higher "
        "admits more (fewer clients sent away for retry_after_s, >= 1 s), at the price of slower answers",
    )
    decode_workers: int = Field(default=2, ge=1, le=64, description="threads decoding + preprocessing images")
    request_timeout_s: float = Field(default=30.0, gt=0, description="per-request deadline for queued inference")
    retry_after_s: int = Field(default=1, ge=1, description="least Retry-After sent with 429/503")
    # --- input caps
    max_request_bytes: int = Field(default=64 * MiB, ge=1024, description="whole request body")
    max_image_bytes: int = Field(default=16 * MiB, ge=1024, description="one encoded image")
    max_image_pixels: int = Field(
        default=40_000_000, ge=1, description="width x height of one image (decompression bombs)"
    )
    min_image_side: int = Field(default=16, ge=1, description="smaller images are rejected")
    max_aspect_ratio: float = Field(
        default=32.0, ge=1, description="long side / short side at most (the model sees a centred square)"
    )
    max_decoded_mib: int = Field(default=192, ge=1, description="memory one decoded bitmap may take")
    max_images_per_request: int = Field(default=32, ge=1)
    max_labels_per_request: int = Field(default=1000, ge=1, description="names or candidate labels in one request")
    max_name_length: int = Field(default=200, ge=1)
    max_templates: int = Field(default=100, ge=1)
    max_top_k: int = Field(default=1000, ge=1)
    max_candidate_prompts: int = Field(
        default=256,
        ge=1,
        description="text work of one anonymous request: candidate labels x templates (each one row of a "
        "forward pass, at most the context length long); more -> 422",
    )
    # --- security and serving
    api_key: SecretStr | None = Field(default=None, description="X-API-Key required on mutating routes when set")
    allow_insecure_bind: bool = Field(default=False, description="listen on a non-loopback host without an API key")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1)
    graceful_shutdown_s: float = Field(default=30.0, gt=0)
    # --- connections (service/server.py): uvicorn itself has no deadline for headers or bodies
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="a request's headers must arrive within this (from its first byte) or 408"
    )
    body_timeout_s: float = Field(
        default=60.0, gt=0, description="a request's whole body must arrive within this after its headers or 408"
    )
    keep_alive_s: float = Field(default=5.0, gt=0, description="idle keep-alive connections are closed after this")
    max_connections: int = Field(
        default=512, ge=1, description="open connections per process; requests on connections beyond it get 503"
    )
    worker_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="--workers > 1: the supervisor restarts a worker silent this long (counted after its start-up)",
    )
    worker_dir: Path | None = Field(
        default=None, description="set by `serve --workers N`: where each worker marks itself ready (for /readyz)"
    )
    log_level: str = "info"
    # --- precision gate (models/precision.py, service/encoders.py)
    precision: Literal["fp32", "fp16", "bf16", "int8"] | None = Field(
        default=None,
        description="image tower precision: fp16/bf16 run on the torch backend, int8 is ONNX's quantised graph. A "
        "reduced precision is scored against fp32 on the bundle's probe images at start-up and served only above "
        "the bundle's floor (else fp32, logged; /readyz says which). None: onnx_precision",
    )
    # --- capture of classified images for re-distillation (service/capture.py); off unless capture_dir is set
    capture_dir: Path | None = Field(
        default=None,
        description="keep a sample of classified images here (re-encoded JPEGs named by content hash; a folder "
        "replicas may share). None: capture off",
    )
    capture_rate: float = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description="fraction of classified images kept; its cost in throughput grows with it (BENCHMARKS.md)",
    )
    capture_max_images: int = Field(default=100_000, ge=1, description="capture pauses when the folder holds this many")
    capture_max_bytes: int = Field(default=10 * 1024 * MiB, ge=MiB, description="... or this many bytes")
    capture_retention_days: float = Field(default=30.0, gt=0, description="kept images older than this are deleted")

    @property
    def image_precision(self) -> str:
        """The precision asked for: ``precision``, else ``onnx_precision`` (which it supersedes)."""
        return self.precision or self.onnx_precision

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.api_key is not None and not self.api_key.get_secret_value().strip():
            raise ValueError("api_key is empty; unset PROMPTDISTILL_API_KEY or give a real key")
        url = self.database_url.get_secret_value() if self.database_url is not None else None
        if url is not None and not url.startswith(("postgresql://", "postgres://")):
            raise ValueError("database_url must start with postgresql:// (unset it for the embedded SQLite store)")
        if self.max_image_bytes > self.max_request_bytes:
            raise ValueError("max_image_bytes cannot exceed max_request_bytes")
        return self

    def insecure_bind_problem(self) -> str | None:
        """Why listening on ``host`` would be unsafe, or None when it is fine."""
        if self.api_key is not None or self.allow_insecure_bind or is_loopback(self.host):
            return None
        return (
            f"refusing to listen on {self.host!r} without an API key: anyone who can reach it could change "
            "label sets. Set --api-key / PROMPTDISTILL_API_KEY, bind to 127.0.0.1, or pass "
            "--allow-insecure-bind (PROMPTDISTILL_ALLOW_INSECURE_BIND=1) if a proxy in front does authentication"
        )

    # --- other protocols (issue 25): Open Inference Protocol v2 over gRPC, its API key (tracing: OTEL_* variables)
    grpc_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="serve the Open Inference Protocol v2 over gRPC on this port too (Triton's convention: 8001), "
        "on the same host; off when unset. One process only (workers = 1)",
    )
    oip_require_api_key: bool = Field(
        default=False,
        description="require the API key on the Open Inference Protocol routes (REST X-API-Key, gRPC x-api-key "
        "metadata) although they only read; off: open like /v1/classify",
    )

    @model_validator(mode="after")
    def _check_grpc(self) -> Settings:
        if self.grpc_port is not None and self.workers > 1:
            raise ValueError(
                "grpc_port needs workers = 1: worker processes would each try to bind the one gRPC port "
                "(run more replicas, or serve gRPC from a single-worker server)"
            )
        if self.grpc_port is not None and self.grpc_port == self.port:
            raise ValueError("grpc_port must differ from the HTTP port")
        return self


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings from the environment, built once (the app keeps its own in ``app.state.settings``)."""
    return Settings()
