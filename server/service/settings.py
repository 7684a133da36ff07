"""Limits of the adaptation service (``protofuse serve`` flags): only pydantic here, so the CLI
can describe them without importing torch or gRPC."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field


class ServiceSettings(BaseModel):
    """Limits of the adaptation service; every one has a safe default."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_message_mb: float = Field(
        16.0,
        gt=0,
        le=1024,
        description=(
            "largest request accepted, in MiB (a 1,000 x 784 float64 support set is 6.3 MiB)"
        ),
    )
    max_support: int = Field(
        2000, ge=2, le=1_000_000, description="most support examples in one Adapt request"
    )
    max_classes: int = Field(
        100,
        ge=2,
        le=10_000,
        description="most classes (distinct labels) in one Adapt request",
    )
    max_work: int = Field(
        50_000,
        ge=4,
        le=100_000_000,
        description=(
            "most support examples x classes in one Adapt request (an adaptation's time and "
            "memory grow with both)"
        ),
    )
    max_per_caller: int = Field(
        16,
        ge=1,
        description=(
            "Adapt requests one caller (its host, and its certificate's name under mutual TLS) "
            "may have held at once, running or waiting; beyond it that caller gets "
            "RESOURCE_EXHAUSTED"
        ),
    )
    max_concurrent: int = Field(
        default_factory=lambda: max(1, os.cpu_count() or 1),
        ge=1,
        description="adaptations running at once (one torch thread each); more wait in line",
    )
    deadline_s: float = Field(
        120.0,
        gt=0,
        le=24 * 3600.0,
        description=(
            "longest a request may take, waiting included, when its caller sets no shorter deadline"
        ),
    )
    max_queued: int = Field(
        64,
        ge=1,
        description=(
            "requests held at once (running and waiting); beyond it callers get RESOURCE_EXHAUSTED"
        ),
    )
    reload_interval_s: float = Field(
        2.0,
        ge=0,
        le=3600.0,
        description="how often the bank's files are checked for a new version",
    )
