"""Response bodies of the control plane. Bytes are ints, GB are floats, names snake_case."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ErrorBody(BaseModel):
    detail: str


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    preflight_passed: bool
    models_registered: int
    stalled: bool = False
    running_slot: int | None = None
    running_s: float = 0.0
    lost_slots_in_a_row: int = 0
    reason: str | None = None  # not_started, stalled, not_producing, shutting_down
    detail: str | None = None


class ModelOut(BaseModel):
    name: str
    vram_bytes: int
    vram_gb: float
    budget_bytes: int | None
    budget_gb: float | None
    over_budget: bool
    source: str


class Models(BaseModel):
    device: str
    total_bytes: int
    models: list[ModelOut]


class Scheduled(BaseModel):
    status: Literal["scheduled"] = "scheduled"
