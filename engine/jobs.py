"""Typed records that cross module boundaries: who asked, what to make, how far it got, what came out."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from engine.images import ImageInfo, Mode

PARAMS_VERSION = 1


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DELIVERY_FAILED = "delivery_failed"


class Stage(StrEnum):
    QUEUED = "queued"
    DOWNLOADING = "downloading"
    LOADING = "loading"
    DENOISING = "denoising"
    DECODING = "decoding"
    ENCODING = "encoding"
    UPLOADING = "uploading"


class JobSource(BaseModel):
    """Where a job came from and what an adapter needs to answer there."""

    platform: str
    chat_id: str
    user_id: str
    user_name: str = ""
    message_id: str | None = Field(None, description="The request message; the same one twice is one job.")
    reply: dict[str, str] = Field(default_factory=dict, description="Adapter-specific ids (progress message...).")

    @property
    def user_key(self) -> str:
        return f"{self.platform}:{self.user_id}"

    @property
    def dedup_key(self) -> str | None:
        if self.message_id is None:
            return None
        return f"{self.platform}:{self.chat_id}:{self.message_id}"


class Actor(BaseModel):
    """Someone acting on a job: its owner, another user or an admin."""

    platform: str
    user_id: str
    is_admin: bool = False

    @property
    def user_key(self) -> str:
        return f"{self.platform}:{self.user_id}"


class GenerationParams(BaseModel):
    """Every generation setting with its resolved value; stored as versioned JSON with the job."""

    model_config = ConfigDict(extra="ignore")

    v: int = PARAMS_VERSION
    prompt: str
    negative_prompt: str = ""
    seed: int
    steps: int
    guidance: float
    guidance_2: float | None = None
    width: int
    height: int
    frames: int
    fps: int
    adjustments: list[str] = Field(default_factory=list, description="What was changed from the request, why.")
    warnings: list[str] = Field(default_factory=list)

    @classmethod
    def from_stored(cls, data: dict[str, Any]) -> GenerationParams:
        """Load params written by this or an older version; fields added later take their defaults."""
        return cls.model_validate({**data, "v": PARAMS_VERSION})


class Progress(BaseModel):
    stage: Stage
    step: int = 0
    total: int = 0
    eta_s: float | None = None
    detail: str = ""

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 0.0


class ResultInfo(BaseModel):
    path: str
    bytes: int
    width: int
    height: int
    frames: int
    fps: int
    duration_s: float
    model: str
    seed: int
    timings: dict[str, float] = Field(default_factory=dict)


class Job(BaseModel):
    id: int
    source: JobSource
    mode: Mode
    model: str
    params: GenerationParams
    images: list[ImageInfo]
    status: JobStatus
    priority: int
    attempts: int
    cancel_requested: bool
    error_user: str | None
    error_detail: str | None
    progress: Progress | None
    result: ResultInfo | None
    delivery_status: DeliveryStatus | None
    delivery_attempts: int
    delivery_error: str | None
    retry_of: int | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    delivered_at: float | None

    def image(self, role: str) -> ImageInfo | None:
        return next((info for info in self.images if info.role == role), None)


class EventKind(StrEnum):
    ENQUEUED = "enqueued"
    STARTED = "started"
    PROGRESS = "progress"
    CANCEL_REQUESTED = "cancel_requested"
    REQUEUED = "requeued"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DELIVERED = "delivered"
    DELIVERY_FAILED = "delivery_failed"
    REDELIVERY = "redelivery"


class JobEvent(BaseModel):
    kind: EventKind
    job: Job
    progress: Progress | None = None


class QueuePosition(BaseModel):
    position: int = Field(description="1 means next to start.")
    eta_s: float | None


class EnqueueResult(BaseModel):
    job: Job
    created: bool = Field(description="False when the same message was already queued (a redelivery).")
    position: QueuePosition | None
