"""Typed records that cross module boundaries: who asked, what to make, how far it got, what came out."""

from __future__ import annotations

import hashlib
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.pipeline.presets import Preset
from engine.storage.images import ImageInfo, Mode

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


# Where a video would be shown, as the content rules (safety.policy) tell places apart.
PlaceKind = Literal["public", "age_restricted", "private"]


class JobSource(BaseModel):
    """Where a job came from and what an adapter needs to answer there."""

    platform: str
    chat_id: str
    user_id: str
    user_name: str = ""
    place: PlaceKind = Field("public", description="A server channel or group, an age-restricted channel, a DM.")
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


class LoraUse(BaseModel):
    """A LoRA of [loras] as one job uses it: where its files are (as serve resolved them) and its weight."""

    name: str
    weight: float
    repo: str
    files: list[str] = Field(description="One file for every expert, or the high-noise then the low-noise one.")

    @property
    def label(self) -> str:
        return f"{self.name}:{self.weight:g}"

    @property
    def key(self) -> str:
        """The same files, the same key, whatever the weight or the name [loras] gives them: what a worker holds."""
        return hashlib.sha256("\n".join([self.repo, *self.files]).encode()).hexdigest()[:12]


class GenerationParams(BaseModel):
    """Every generation setting with its resolved value; stored as versioned JSON with the job."""

    model_config = ConfigDict(extra="ignore")

    v: int = PARAMS_VERSION
    prompt: str
    original_prompt: str | None = Field(None, description="The user's own words, when `prompt` is the enhancer's.")
    negative_prompt: str = ""
    seed: int
    steps: int
    guidance: float
    guidance_2: float | None = None
    width: int
    height: int
    frames: int
    fps: int
    # Jobs stored before presets existed ran the official settings.
    preset: Preset = Preset.QUALITY
    loras: list[LoraUse] = Field(default_factory=list, description="Style LoRAs, applied in this order.")
    extends: int | None = Field(None, description="The job whose video this one continues from its last frame.")
    loop: bool = Field(False, description="The video returns to its first frame (its end image is its start).")
    loop_model: str | None = Field(
        None, description="A t2v loop's second pass: the i2v model that makes it from the first pass's first frame."
    )
    flagged: str | None = Field(
        None, description="What the content check flagged in its pictures (label and score), where it may still run."
    )
    adjustments: list[str] = Field(default_factory=list, description="What was changed from the request, why.")
    warnings: list[str] = Field(default_factory=list)

    @classmethod
    def from_stored(cls, data: dict[str, Any]) -> GenerationParams:
        """Load params written by this or an older version; fields added later take their defaults."""
        return cls.model_validate({**data, "v": PARAMS_VERSION})


class PreviewInfo(BaseModel):
    """A running job's latest live preview: a JPEG at `path`, replaced in place by each newer one (so the file may
    already hold a later one) and deleted when the job ends."""

    seq: int = Field(description="1 for the first preview of this run of the job, then 2, 3...: a new seq is new.")
    step: int = Field(description="The denoising step whose estimate of the finished video it shows.")
    path: str
    width: int
    height: int


class Progress(BaseModel):
    stage: Stage
    step: int = 0
    total: int = 0
    eta_s: float | None = Field(None, description="Seconds until the video is made: steps, decode and encode.")
    eta_steps_only: bool = Field(False, description="eta_s leaves out decode and encode: their time is not known yet.")
    detail: str = ""
    preview: PreviewInfo | None = Field(None, description="The latest live preview, from the first one on.")

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 0.0


class FinishTimes(BaseModel):
    """What follows a job's last step, expected from the model's recent videos: seconds of VAE decode and of MP4
    encode. Both take seconds (more than a step of a tiny model), so every time left includes them."""

    decode_s: float
    encode_s: float

    @property
    def total_s(self) -> float:
        return self.decode_s + self.encode_s


class RunInfo(BaseModel):
    """How a video was actually made: what the pipeline ran, counted while it ran."""

    preset: Preset
    loras: list[str] = Field(default_factory=list, description="'repo/file' of every LoRA fused in.")
    styles: list[str] = Field(
        default_factory=list, description="'name:weight (repo/file, ...)' of every style LoRA active, in order."
    )
    scheduler: str
    sigmas: list[float]
    transformer_calls: dict[str, int] = Field(description="Forward passes per transformer, counted by a hook.")
    speedups: dict[str, str] = Field(default_factory=dict, description="attention, fp8, compile: what was on.")


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
    run: RunInfo | None = None  # None for videos made before it was recorded
    # The video's last frame as decoded (not from the MP4), stored like a picture: an Extend starts from it.
    last_frame: ImageInfo | None = None
    # What the content check flagged in the video's frames or its pictures (label and score); None: nothing.
    flagged: str | None = None


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
    worker_id: str | None = Field(None, description="The worker that claimed it last.")
    claim_token: str | None = Field(None, description="Proves a write comes from the claim that runs the job.")
    upload_starts: int = Field(0, description="Uploads of its video started (by any process), ended or not.")

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
    PREVIEW = "preview"  # a running job has a new live preview (JobEvent.preview)


class WorkerState(StrEnum):
    STARTING = "starting"
    IDLE = "idle"
    WORKING = "working"
    PAUSED = "paused"
    STOPPED = "stopped"


class WorkerRecord(BaseModel):
    """A worker process as the fleet sees it: stored with each heartbeat, read by /status and `wanbot workers`."""

    id: str
    host: str
    pid: int
    device: str
    machine: str = Field(
        "", description="The host and its process namespace: where `pid` means something (containers share hosts)."
    )
    gpu_name: str | None = None
    free_memory_bytes: int | None = None
    loaded_model: str | None = None
    current_job: int | None = None
    state: WorkerState = WorkerState.STARTING
    started_at: float
    heartbeat_at: float = 0.0
    downloading: list[str] = Field(default_factory=list, description="Models it is fetching for waiting jobs.")

    def online(self, now: float, lease_s: float) -> bool:
        """Heard from within the lease and not stopped."""
        return self.state is not WorkerState.STOPPED and now - self.heartbeat_at <= lease_s


class ServingRecord(BaseModel):
    """The one process that serves a database's chats (`wanbot serve`, or `wanbot run` with a chat token): it alone
    acknowledges requests and uploads videos, so a second one refuses to start while this one is alive."""

    id: str
    host: str
    machine: str = Field(description="The host and its process namespace, as WorkerRecord.machine.")
    pid: int
    started_at: float
    heartbeat_at: float = 0.0


class JobEvent(BaseModel):
    kind: EventKind
    job: Job
    progress: Progress | None = None
    preview: PreviewInfo | None = None


class QueuePosition(BaseModel):
    position: int = Field(description="1 means next to start.")
    eta_s: float | None
    no_worker: bool = Field(
        False, description="No worker is online and none runs a job: nothing starts until one does."
    )


class EnqueueResult(BaseModel):
    job: Job
    created: bool = Field(description="False when the same message was already queued (a redelivery).")
    position: QueuePosition | None
