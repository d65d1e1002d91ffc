"""Configuration: a TOML file plus `WANBOT_<SECTION>__<KEY>` environment variables, validated by pydantic.

Precedence, highest first: environment, TOML file (`--config` or `WANBOT_CONFIG`), defaults.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import tomllib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Literal

from huggingface_hub import constants as hf_constants
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from engine.errors import ConfigError
from engine.queue.url import parse_database_url, sqlite_url

CONFIG_ENV = "WANBOT_CONFIG"
ENV_PREFIX = "WANBOT_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Keys whose value is never repeated in an error message: it may hold a password.
UNSHOWN_INPUTS = {"database.url"}

log = logging.getLogger(__name__)


class Section(BaseModel):
    """A config section; a misspelt key is an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class ImagesConfig(Section):
    max_bytes: int = Field(25_000_000, gt=0, description="Largest accepted upload in bytes.")
    # 48 and 50 MP phone cameras and 61 MP ones fit; decoding one costs about 250 MiB (bench/images.py).
    max_pixels: int = Field(64_000_000, gt=0, description="Largest accepted width*height, checked before decoding.")
    # Every RGB, grey or CMYK picture max_pixels allows fits (8 bytes a pixel at most); so do 50 MP HEIC photos. A
    # 64 MP WebP (16 bytes a pixel) or 16-bit greyscale PNG (10) does not (engine/storage/images.py has the figures).
    max_decode_bytes: int = Field(
        512_000_000,
        gt=0,
        description="Most memory decoding one picture may take, estimated from its header before decoding.",
    )
    max_concurrent_decodes: int = Field(2, ge=1, description="Pictures decoded at once, on threads of their own.")
    min_side: int = Field(64, gt=0, description="Smallest accepted width or height in pixels.")
    aspect_tolerance: float = Field(0.05, ge=0, lt=1, description="Allowed relative start/end aspect difference.")
    background: tuple[int, int, int] = Field((255, 255, 255), description="RGB behind transparent pixels.")
    retention_hours: float = Field(72.0, ge=0, description="Keep images of finished jobs this long.")


class OutputsConfig(Section):
    retention_hours: float = Field(168.0, ge=0, description="Keep a delivered video this long, then delete it.")


class QueueConfig(Section):
    per_user_limit: int = Field(3, ge=1, description="Queued jobs one user may have at once.")
    global_limit: int = Field(100, ge=1, description="Queued jobs in total.")
    daily_limit: int = Field(0, ge=0, description="Videos one user may have made in 24 hours; 0: no limit.")
    daily_gpu_seconds: float = Field(
        0, ge=0, description="Seconds of GPU time one user's videos may take in 24 hours (admins exempt); 0: no limit."
    )
    daily_chat_gpu_seconds: float = Field(
        0, ge=0, description="Seconds of GPU time the videos asked for in one chat may take in 24 hours; 0: no limit."
    )
    max_attempts: int = Field(2, ge=1, description="Starts a job gets before a crash marks it failed.")
    pause_on_start: bool = Field(False, description="Start with processing paused after a restart.")
    max_model_skips: int = Field(3, ge=0, description="Times a job may be passed over to keep a model warm.")
    write_retry_s: float = Field(
        300.0, gt=0, description="How long a finished job's result is retried on a locked or full database."
    )
    lease_s: float = Field(
        60.0, gt=0, description="A running job whose worker has not been heard from for this long is queued again."
    )
    heartbeat_s: float = Field(5.0, gt=0, description="How often a worker says it is alive (well under lease_s).")


class LoraPairConfig(Section):
    """A step-distilled LoRA pair on the Hub: the high-noise file for `transformer`, the low-noise one for
    `transformer_2`."""

    repo: str
    high: str
    low: str


LIGHTX2V_REPO = "lightx2v/Wan2.2-Distill-Loras"


class FastLorasConfig(Section):
    t2v: LoraPairConfig = LoraPairConfig(
        repo=LIGHTX2V_REPO,
        high="wan2.2_t2v_A14b_high_noise_lora_rank64_lightx2v_4step_1217.safetensors",
        low="wan2.2_t2v_A14b_low_noise_lora_rank64_lightx2v_4step_1217.safetensors",
    )
    i2v: LoraPairConfig = LoraPairConfig(
        repo=LIGHTX2V_REPO,
        high="wan2.2_i2v_A14b_high_noise_lora_rank64_lightx2v_4step_1022.safetensors",
        low="wan2.2_i2v_A14b_low_noise_lora_rank64_lightx2v_4step_1022.safetensors",
    )


LORA_MODES = ("t2v", "i2v", "ti2v")
LORA_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,31}$"


class StyleLoraConfig(Section):
    """A style or character LoRA users may pick per request (`lora=NAME[:WEIGHT]`), from the Hub or a folder."""

    repo: str = Field(description="A Hub repo id, a local folder, or 'tiny' (a random stand-in made here, for tests).")
    file: str | None = Field(None, description="One file for every expert (A14B: both; TI2V-5B has one).")
    high: str | None = Field(None, description="A14B pairs: the file for the high-noise expert (`transformer`).")
    low: str | None = Field(None, description="A14B pairs: the file for the low-noise expert (`transformer_2`).")
    weight: float = Field(0.8, ge=0, le=2, description="The weight a request without `:WEIGHT` gets.")
    modes: list[Literal["t2v", "i2v", "ti2v"]] = Field(
        default_factory=lambda: list(LORA_MODES), description="The modes it may be used in."
    )
    trigger: str = Field("", description="Words the LoRA was trained on; put before a prompt that lacks them.")
    description: str = Field("", description="What /loras says of it (one short line).")

    @field_validator("high", "low", "file")
    @classmethod
    def _safetensors(cls, value: str | None) -> str | None:
        if value is not None and not value.endswith(".safetensors"):
            raise ValueError("must name a .safetensors file")
        return value

    @model_validator(mode="after")
    def _one_file_or_a_pair(self) -> StyleLoraConfig:
        if (self.file is None) == (self.high is None and self.low is None) or (self.high is None) != (self.low is None):
            raise ValueError("give either file, or both high and low")
        return self

    @property
    def files(self) -> list[str]:
        """One file, or the high-noise then the low-noise one."""
        return [self.file] if self.file else [str(self.high), str(self.low)]


class ModelsConfig(Section):
    t2v: str = "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
    i2v: str = "Wan-AI/Wan2.2-I2V-A14B-Diffusers"
    ti2v: str = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
    fast_loras: FastLorasConfig = FastLorasConfig()
    fast_ti2v: str = Field(
        "FastVideo/FastWan2.2-TI2V-5B-FullAttn-Diffusers",
        description="The distilled TI2V-5B the fast preset runs (a repo id or folder); 'tiny' models use their own.",
    )


# Wan's own default negative prompt (sample_neg_prompt in the official Wan 2.2 configs), in the Chinese the model
# was trained with; wanbot.example.toml says what it lists.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


class GenerationConfig(Section):
    timeout_s: float = Field(3600.0, gt=0, description="Longest a generation may run before it fails.")
    max_steps: int = Field(60, ge=1)
    max_frames: int = Field(121, ge=5)
    max_pixels: int = Field(1280 * 720, ge=64 * 64, description="Largest width*height of a generated video.")
    memory: Literal["auto", "gpu", "model_offload", "group_offload", "sequential_offload", "cpu"] = Field(
        "auto",
        description="Where the model lives (`wanbot plan` shows each choice's memory and speed; auto: the fastest "
        "that fits each job).",
    )
    vram_gib: float | None = Field(
        None,
        gt=0,
        description="GPU memory wanbot plans with (default: what is free on the device), for a GPU shared with "
        "other programs.",
    )
    vae_tiling: Literal["auto", "on", "off"] = "auto"
    vae_precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="The VAE's weights and decode (auto: bf16 on a GPU, about half an 8-bit level from fp32 on "
        "average and two thirds of its memory; fp32 on a CPU).",
    )
    device: str = Field(
        "auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'; with parallel, the group's devices: 'cuda:0,cuda:1'."
    )
    parallel: int = Field(
        1,
        ge=1,
        le=8,
        description="Ranks that make each video together, a device each (diffusers' context parallelism); 1: none.",
    )
    parallel_timeout_s: float = Field(
        300.0, gt=0, description="Longest a rank waits for the others before the group counts as broken."
    )
    devices: list[str] = Field(
        default_factory=list,
        description="`wanbot worker` starts one worker process per device listed (such as ['cuda:0', 'cuda:1']).",
    )
    negative_prompt: str = Field(WAN_NEGATIVE_PROMPT, description="Used when a request names none.")
    default_preset: Literal["fast", "quality"] = Field(
        "fast", description="fast: distilled, seconds a video; quality: the official settings, minutes."
    )
    attention: Literal["auto", "on", "off"] = Field(
        "auto", description="A faster attention kernel than PyTorch's (auto: the fastest that works on this GPU)."
    )
    fp8: Literal["auto", "on", "off"] = Field(
        "auto", description="fp8 transformers with torchao (auto: on for compute capability 8.9 or newer)."
    )
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the repeated blocks (auto: off; the first job per size warms up)."
    )
    max_seconds: float = Field(20.0, gt=0, description="Longest video an Extend may make, chained extends included.")
    extend_mode: Literal["i2v", "ti2v"] = Field(
        "i2v", description="The model an Extend continues a video with (its fps must be the video's)."
    )
    max_loras: int = Field(2, ge=0, description="LoRAs (of [loras]) one request may name.")
    lora_cache: int = Field(
        4, ge=0, description="LoRAs a worker keeps loaded (inactive) after their job, for the next job that names them."
    )


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), read as huggingface_hub reads it, so one switch keeps wanbot and
    diffusers alike off the network."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in hf_constants.ENV_VARS_TRUE_VALUES


class DownloadsConfig(Section):
    endpoint: str = Field(
        default_factory=lambda: os.environ.get("HF_ENDPOINT", "https://huggingface.co"),
        description="The Hub to download from (default: $HF_ENDPOINT or huggingface.co).",
    )
    timeout_s: float = Field(300.0, gt=0, description="No bytes for this long aborts a download attempt.")
    metadata_timeout_s: float = Field(30.0, gt=0, description="Limit for each metadata request.")
    retries: int = Field(8, ge=0, description="Retries of a failing request, with exponential backoff and jitter.")
    backoff_s: float = Field(2.0, ge=0, description="First retry delay; doubles each time.")
    max_backoff_s: float = Field(120.0, ge=0)
    reserve_bytes: int = Field(5_000_000_000, ge=0, description="Disk space always left free.")
    offline: bool = Field(
        default_factory=_hub_offline,
        description="Use only models already on disk; never contact the Hub (default: $HF_HUB_OFFLINE).",
    )
    cache_dir: Path | None = Field(
        None,
        description="Where downloads go, in the Hugging Face cache layout (default: models/hub in data_dir). Set it "
        "to $HF_HUB_CACHE to keep one copy that diffusers scripts and huggingface-cli share.",
    )


class PreviewsConfig(Section):
    """Live previews: the video taking shape in a running job's progress message (engine/pipeline/previews.py)."""

    enabled: bool = Field(True, description="Make previews of running jobs.")
    interval_s: float = Field(10.0, gt=0, description="Least seconds between two previews of one job.")
    decoder: Literal["linear"] = Field(
        "linear", description="How latents become pictures: 'linear', ComfyUI's latent-to-RGB factors."
    )
    max_bytes: int = Field(100_000, ge=10_000, description="Largest preview JPEG in bytes.")


class MetricsConfig(Section):
    """Prometheus metrics and a health check over HTTP, from `wanbot run`, `serve` and `worker`."""

    port: int | None = Field(None, ge=1, le=65535, description="Serve /metrics and /healthz here; off when unset.")
    host: str = Field("127.0.0.1", description="The address to listen on (0.0.0.0 for a scraper on another host).")


class DatabaseConfig(Section):
    url: str | None = Field(
        None,
        description="Where the job queue lives: sqlite:///path (default: wanbot.sqlite3 in data_dir) or "
        "postgresql://user:password@host:port/dbname, which any number of processes and machines may share.",
    )

    @field_validator("url")
    @classmethod
    def _readable_url(cls, value: str | None) -> str | None:
        if value is not None:
            parse_database_url(value)
        return value


class AccessConfig(Section):
    admins: list[str] = Field(default_factory=list, description="'platform:user_id' entries with admin rights.")


class ChatConfig(Section):
    """What every chat platform's progress messages and video delivery are tuned by."""

    edit_interval_s: float = Field(3.0, ge=0, description="Least time between two edits of one progress message.")
    delivery_retry_s: float = Field(
        60.0, gt=0, description="Wait before the first retry of a failed upload; it doubles after each failure."
    )
    max_delivery_attempts: int = Field(5, ge=1)


class TelegramConfig(ChatConfig):
    token: SecretStr | None = Field(None, description="Bot token from @BotFather (or env TELEGRAM_BOT_TOKEN).")
    api_base_url: str = Field("https://api.telegram.org/bot", description="Bot API base; the token is appended.")
    file_base_url: str = Field("https://api.telegram.org/file/bot", description="File download base.")
    download_limit_bytes: int = Field(20_000_000, gt=0, description="Largest file bots may fetch (20 MB on the cloud).")
    upload_limit_bytes: int = Field(50_000_000, gt=0, description="Largest video bots may send (50 MB on the cloud).")
    reactions: bool = Field(True, description="Show each job's state as a reaction on its request message.")
    album_wait_s: float = Field(1.0, ge=0, description="How long to collect the photos of an album.")
    group_edit_interval_s: float = Field(
        10.0, ge=0, description="edit_interval_s in groups, where a bot may send 20 messages a minute in all."
    )
    allowed_users: list[int] = Field(default_factory=list, description="User ids allowed to use the bot; empty: all.")
    allowed_chats: list[int] = Field(default_factory=list, description="Chat ids the bot answers in; empty: all.")


class DiscordConfig(ChatConfig):
    token: SecretStr | None = Field(None, description="Bot token (or env DISCORD_BOT_TOKEN).")
    guild_ids: list[int] = Field(default_factory=list, description="Sync commands to these guilds; empty: global.")
    api_base_url: str | None = Field(None, description="REST base of an API proxy; default Discord's own.")
    gateway_url: str | None = Field(None, description="Gateway URL of an API proxy; default Discord's own.")
    interaction_lifetime_s: float = Field(
        840.0, gt=0, description="Use the interaction for replies this long (Discord allows 15 min); then post."
    )
    filesize_limit_bytes: int = Field(10 * 1024 * 1024, gt=0, description="Upload limit when Discord names none.")
    download_limit_bytes: int = Field(25_000_000, gt=0, description="Largest attachment the bot downloads.")
    allowed_guilds: list[int] = Field(default_factory=list)
    allowed_channels: list[int] = Field(default_factory=list)
    allowed_roles: list[int] = Field(default_factory=list, description="Members with any of these roles may use it.")
    allowed_users: list[int] = Field(default_factory=list)


class PromptsConfig(Section):
    """The prompt enhancer (engine/enhance/): a short prompt rewritten into the detailed one Wan was trained on."""

    enhancer: Literal["off", "local", "openai"] = Field(
        "off",
        description="'off', 'local' (a small instruct model in this process) or 'openai' (an OpenAI-compatible "
        "endpoint at enhancer_url).",
    )
    enhancer_language: Literal["keep", "english"] = Field(
        "keep", description="Write the rewrite in the prompt's own language ('keep') or in English ('english')."
    )
    enhancer_timeout_s: float = Field(
        20.0, gt=0, description="Longest wait for one answer of the endpoint, or for the local model's rewrite."
    )
    enhancer_max_new_tokens: int = Field(200, ge=1, description="Most tokens a rewrite may have.")
    enhancer_url: str = Field(
        "",
        validate_default=True,
        description="The endpoint's base URL, such as http://127.0.0.1:8000/v1; /chat/completions is added.",
    )
    enhancer_model: str = Field("", description="The model the endpoint is asked for; empty: the server's default.")
    enhancer_key_env: str = Field(
        "WANBOT_ENHANCER_KEY", description="The environment variable holding the endpoint's API key; unset: none sent."
    )
    enhancer_retries: int = Field(
        2, ge=0, description="Retries after a connection error, a timeout, 429 or 5xx, with exponential backoff."
    )
    enhancer_repo: str = Field(
        "Qwen/Qwen2.5-1.5B-Instruct",
        description="The local model: a Hub repo id, a folder, or 'tiny' (a random stand-in for tests).",
    )
    enhancer_device: str = Field(
        "cpu", pattern=r"^(cpu|auto|cuda(:\d+)?)$", description="Where the local model runs: 'cpu', 'cuda' or 'auto'."
    )

    @field_validator("enhancer_url")
    @classmethod
    def _url_for_openai(cls, value: str, info: Any) -> str:  # pydantic.ValidationInfo
        if info.data.get("enhancer") == "openai" and not value.startswith(("http://", "https://")):
            raise ValueError("must be the endpoint's http:// or https:// base URL when prompts.enhancer is 'openai'")
        return value


Policy = Literal["block", "spoiler", "allow"]
TERM_REGEX_PREFIX = "re:"


class PlacePoliciesConfig(Section):
    """What happens to a picture or video the classifier flags, by where it would be shown."""

    public: Policy = Field("block", description="Server channels and groups.")
    age_restricted: Policy = Field("allow", description="Discord channels marked age-restricted (NSFW).")
    private: Policy = Field("spoiler", description="Direct messages, private chats and the CLI.")


class SafetyConfig(Section):
    """Content rules for public places (engine/safety/): terms a prompt may not hold, and a picture classifier run
    on the start and end pictures before queueing and on a few frames of each video before it is sent."""

    blocked_terms: list[str] = Field(
        default_factory=list,
        description="Words or phrases a prompt may not hold, matched whole and case-blind; 're:PATTERN' a regex.",
    )
    blocked_message: str = Field(
        "This bot does not make videos of that.", description="What a user whose prompt holds a blocked term reads."
    )
    classifier: str = Field(
        "off",
        description="'off', an image-classification model (a Hub repo id or a folder, such as "
        "Falconsai/nsfw_image_detection), or 'tiny:LABEL' (a random stand-in that always answers LABEL, for tests).",
    )
    flagged_labels: list[str] = Field(
        default_factory=lambda: ["nsfw"], description="The classifier's labels that flag a picture."
    )
    threshold: float = Field(0.5, gt=0, le=1, description="The score of a flagged label at which a picture is flagged.")
    video_frames: int = Field(3, ge=1, le=16, description="Frames of each finished video checked, spread over it.")
    device: str = Field("cpu", pattern=r"^(cpu|auto|cuda(:\d+)?)$", description="Where the classifier runs.")
    policy: PlacePoliciesConfig = PlacePoliciesConfig()

    def policy_for(self, place: str) -> Policy:
        """What a flagged picture or video gets where it would be shown (JobSource.place)."""
        return getattr(self.policy, place)  # type: ignore[no-any-return]

    @field_validator("blocked_terms")
    @classmethod
    def _terms_compile(cls, value: list[str]) -> list[str]:
        for term in value:
            if not term.strip().removeprefix(TERM_REGEX_PREFIX).strip():
                raise ValueError("holds an empty term")
            if term.startswith(TERM_REGEX_PREFIX):
                try:
                    re.compile(term.removeprefix(TERM_REGEX_PREFIX))
                except re.error as error:
                    raise ValueError(f"{term!r} is no regular expression: {error}") from None
        return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="WANBOT_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    data_dir: Path = Field(Path("data"), description="Where the database, images, outputs and models live.")
    log_level: str = "INFO"
    images: ImagesConfig = ImagesConfig()
    outputs: OutputsConfig = OutputsConfig()
    queue: QueueConfig = QueueConfig()
    models: ModelsConfig = ModelsConfig()
    loras: dict[str, StyleLoraConfig] = Field(
        default_factory=dict, description="[loras.NAME]: the style and character LoRAs users may pick."
    )
    generation: GenerationConfig = GenerationConfig()
    access: AccessConfig = AccessConfig()
    downloads: DownloadsConfig = DownloadsConfig()
    telegram: TelegramConfig = TelegramConfig()
    discord: DiscordConfig = DiscordConfig()
    previews: PreviewsConfig = PreviewsConfig()
    database: DatabaseConfig = DatabaseConfig()
    metrics: MetricsConfig = MetricsConfig()
    prompts: PromptsConfig = PromptsConfig()
    safety: SafetyConfig = SafetyConfig()

    @field_validator("loras")
    @classmethod
    def _lora_names(cls, value: dict[str, StyleLoraConfig]) -> dict[str, StyleLoraConfig]:
        for name in value:
            if not re.match(LORA_NAME_PATTERN, name):
                raise ValueError(f"{name!r} is no LoRA name: up to 32 lowercase letters, digits, '-' and '_'")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        # logging.basicConfig takes any string and fails later with a traceback; "info" is as good as "INFO".
        level = value.strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return level

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = os.environ.get(CONFIG_ENV)
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, _PlatformTokens(settings_cls)]
        if toml_path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(toml_path)))
        return tuple(sources)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "wanbot.sqlite3"

    @property
    def database_shown(self) -> str:
        """Where the queue is, for messages and logs (never with a password)."""
        return parse_database_url(self.database_url).shown()

    @property
    def database_url(self) -> str:
        """database.url, or the SQLite file in data_dir that wanbot has always used."""
        return self.database.url or sqlite_url(self.db_path)

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def previews_dir(self) -> Path:
        return self.data_dir / "previews"


class _PlatformTokens(PydanticBaseSettingsSource):
    """The platforms' customary token variables (TELEGRAM_BOT_TOKEN, DISCORD_BOT_TOKEN), below WANBOT_*."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for platform in ("telegram", "discord"):
            if token := os.environ.get(f"{platform.upper()}_BOT_TOKEN"):
                found[platform] = {"token": token}
        return found


def load_settings(config_path: Path | None = None) -> Settings:
    """Load and validate the configuration; raise ConfigError with one line per bad key."""
    previous = os.environ.get(CONFIG_ENV)
    if config_path is not None:
        os.environ[CONFIG_ENV] = str(config_path)
    toml_path = os.environ.get(CONFIG_ENV)
    try:
        if toml_path:
            _check_toml_readable(Path(toml_path))
        settings = Settings()
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc)) from None
    finally:
        # The settings source reads the path from the environment; it must not stay there for the next load (a
        # test, or a second configuration in one process).
        if config_path is not None:
            if previous is None:
                os.environ.pop(CONFIG_ENV, None)
            else:
                os.environ[CONFIG_ENV] = previous
    for warning in unknown_environment_variables(os.environ, secrets={settings.prompts.enhancer_key_env}):
        log.warning("%s", warning)
    return settings


def unknown_environment_variables(environ: Mapping[str, str], secrets: Collection[str] = ()) -> list[str]:
    """A warning for each WANBOT_* variable that names no setting (`secrets`: the variables settings name to read a
    key from, such as prompts.enhancer_key_env).

    A misspelt key inside a section (WANBOT_QUEUE__PER_USER_LIMT) is refused like one in the TOML file, but
    pydantic-settings reads only the variables of fields it knows, so one with an unknown first part
    (WANBOT_QEUE__PER_USER_LIMIT) would be ignored without a word."""
    sections = {name.upper() for name in Settings.model_fields}
    found = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper == CONFIG_ENV or name in secrets:
            continue
        first, _, rest = upper.removeprefix(ENV_PREFIX).partition("__")
        if first in sections:
            continue
        guess = difflib.get_close_matches(first, sections, n=1)
        meant = ENV_PREFIX + "__".join(part for part in (guess[0] if guess else "", rest) if part)
        hint = f"did you mean {meant}?" if guess else f"settings are {ENV_PREFIX}<SECTION>__<KEY>."
        found.append(f"config warning: {name} is not a wanbot setting and is ignored; {hint}")
    return found


def _check_toml_readable(path: Path) -> None:
    try:
        with path.open("rb") as handle:
            tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist (set by --config or {CONFIG_ENV})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _describe_validation_error(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        got = error.get("input")
        shown = "" if isinstance(got, dict) or key in UNSHOWN_INPUTS else f" (got {got!r})"
        env_name = "WANBOT_" + "__".join(str(part).upper() for part in error["loc"])
        lines.append(f"config error: {key}: {error['msg']}{shown}; set it in the TOML file or {env_name}")
    return "\n".join(lines)
