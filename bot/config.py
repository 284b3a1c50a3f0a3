"""Settings: every knob is a ``SPRBOT_`` environment variable (a ``.env`` file works too).

One ``Settings`` object is built per process, at the composition root (the CLI), and passed
down. ``load_settings`` turns pydantic's validation errors into one line per bad variable,
naming the variable and never echoing a secret.
"""

from __future__ import annotations

import getpass
import os
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from bot.errors import SprbotError

ENV_PREFIX = "SPRBOT_"
DEFAULT_MODEL = "Intel/neural-chat-7b-v3-3"


def default_data_dir() -> Path:
    """Where state and models live when ``SPRBOT_DATA_DIR`` is unset."""
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "sprbot"


CommaList = Annotated[list[str], NoDecode]


class SettingsError(SprbotError, ValueError):
    """A setting has a value that cannot be used. The message names the variable."""


class Settings(BaseSettings):
    """sprbot's configuration. Field ``x`` is read from ``SPRBOT_X``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # Storage and model
    redis_url: str | None = Field(
        None, description="Redis URL (redis://, rediss://, unix://). Unset: embedded server."
    )
    # TLS (rediss:// only), as redis-py names the options.
    redis_ssl_ca_certs: Path | None = Field(
        None, description="rediss://: CA bundle (PEM) to verify the server; unset: system CAs."
    )
    redis_ssl_certfile: Path | None = Field(
        None, description="rediss://: client certificate (PEM), for servers that require one."
    )
    redis_ssl_keyfile: Path | None = Field(
        None, description="rediss://: the client certificate's private key (PEM)."
    )
    redis_ssl_cert_reqs: Literal["required", "optional", "none"] = Field(
        "required",
        description="rediss://: verify the server's certificate and host name (required), or "
        "not at all (none: encrypted but open to impersonation).",
    )
    # Redis Sentinel: the master is looked up through the sentinels and followed on failover.
    redis_sentinels: CommaList = Field(
        default_factory=list,
        description="Sentinels as host:port, comma-separated; set: SPRBOT_REDIS_URL only gives "
        "the master's credentials, database and TLS, with the master name as its host.",
    )
    redis_sentinel_master: str = Field("mymaster", description="The master's Sentinel name.")
    redis_sentinel_password: SecretStr | None = Field(
        None, description="Password of the sentinels themselves (their requirepass)."
    )
    redis_appendfsync: Literal["everysec", "always"] = Field(
        "everysec",
        description="Embedded server, read when it starts: fsync its AOF every second (an OS "
        "crash or power cut can lose the last second of writes) or on every write (none "
        "lost, each write waits for the disk). A server of your own: set it in redis.conf.",
    )
    data_dir: Path = Field(default_factory=default_data_dir, description="State and models.")
    model: str = Field(DEFAULT_MODEL, description="Hugging Face model id or local directory.")
    dtype: Literal["bfloat16", "float32", "auto"] = Field(
        "auto", description="auto: bf16 where the CPU has native bf16, else fp32."
    )
    do_sample: bool = Field(True, description="Sample (True) or decode greedily (False).")
    max_new_tokens: int = Field(256, ge=1, le=32768, description="Longest reply, in tokens.")
    faq_grounding: Literal["on", "off"] = Field(
        "on",
        description="Answer close FAQ questions straight from the FAQ store, and put the "
        "closest entries into the prompt; off: the model answers alone.",
    )
    faq_threshold: float = Field(
        0.85, ge=0.0, le=1.0, description="Cosine at which a question is answered from the FAQ."
    )
    faq_context: int = Field(
        3, ge=0, le=20, description="Closest FAQ entries put into the prompt (0: none)."
    )
    faq_embeddings: Literal["on", "off"] = Field(
        "on",
        description="on: all-MiniLM-L6-v2 sentence embeddings (bundled, offline); off: "
        "similarity of the normalised words.",
    )
    faq_duplicate_threshold: float = Field(
        0.9, ge=0.0, le=1.0, description="Cosine at which an added question updates an entry."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="auto: JSON lines when stderr is not a terminal, else text."
    )
    metrics_port: int = Field(
        9740,
        ge=0,
        le=65535,
        description="Prometheus /metrics and /healthz of each process (0: off). `sprbot up` "
        "gives its processes this port and the next ones.",
    )
    metrics_host: str = Field(
        "127.0.0.1",
        description="Address the metrics server listens on; 0.0.0.0 to be scraped from "
        "another host or container.",
    )

    # The bus and the inference worker
    max_text_chars: int = Field(4000, ge=1, description="Longest message accepted.")
    max_prompt_tokens: int = Field(
        1536, ge=16, description="Prompt budget: history is trimmed to fit; longer is refused."
    )
    max_backlog: int = Field(256, ge=1, description="Queued requests before 'busy'.")
    max_deliveries: int = Field(3, ge=1, description="Tries before a request is dead-lettered.")
    request_ttl_s: int = Field(
        86_400,
        ge=60,
        description="How long a request id is remembered: its ingress dedupe mark (Telegram "
        "re-delivers an update for up to 24 h) and its answered mark. Per-request keys expire "
        "after it, so Redis holds about rate x this many of them.",
    )
    reclaim_idle_ms: int = Field(
        300_000, ge=100, description="A request idle this long in a dead worker is retried."
    )
    reply_reclaim_idle_ms: int = Field(
        120_000,
        ge=100,
        description="An answer an adapter replica read but did not show (it died) is shown "
        "by another replica after this long.",
    )
    max_batch: int = Field(8, ge=1, le=256, description="Conversations decoded together.")
    coalesce_tokens: int = Field(
        8, ge=1, description="Streamed text goes out every this many tokens, or..."
    )
    coalesce_ms: int = Field(250, ge=0, description="...this often, whichever comes first.")
    memory_ttl_s: int = Field(7 * 86_400, ge=60, description="Conversation memory lifetime.")

    # Retraining (/retrain and `sprbot worker train`)
    # The defaults were measured on SmolLM2-135M-Instruct (docs/FINETUNING.md).
    train_epochs: float = Field(10.0, gt=0, description="Epochs over the FAQ and the replay set.")
    train_learning_rate: float = Field(1e-3, gt=0, description="LoRA learning rate.")
    train_lora_rank: int = Field(16, ge=1, le=256, description="LoRA rank (alpha: twice it).")
    train_timeout_s: int = Field(
        4 * 3600, ge=60, description="A retrain running longer is stopped and reported failed."
    )
    train_lora_layers: Literal["mlp", "all"] = Field(
        "mlp",
        description="LoRA on the MLP layers (learns facts, forgets least) or on every linear.",
    )
    train_replay: bool = Field(
        True, description="Train the base model's own general answers next to the FAQ."
    )
    train_retention_tolerance: float = Field(
        0.5,
        ge=0,
        description="How much higher (relative) the candidate's loss on the base model's "
        "general answers may be before the gate calls it forgetful.",
    )
    train_monitor_s: int = Field(
        15, ge=1, description="Training worker heartbeat; a killed one is noticed 60 s after."
    )
    train_maintenance_s: int = Field(
        30, ge=1, description="How often training workers fail jobs whose worker died."
    )

    # Telegram
    telegram_token: SecretStr | None = None
    telegram_api_url: str = Field(
        "https://api.telegram.org/bot",
        description="Bot API base, the token is appended (a self-hosted Bot API server: "
        "http://host:8081/bot); files come from the same address with /file/bot.",
    )
    telegram_admins: CommaList = Field(default_factory=list)
    telegram_webhook_url: str | None = Field(
        None, description="Set: receive updates at this public HTTPS URL; unset: long polling."
    )
    telegram_webhook_secret: SecretStr | None = Field(
        None, description="Webhook mode: the secret token every update must carry (else 403)."
    )
    telegram_webhook_port: int = Field(
        8443, ge=1, le=65535, description="Webhook mode: the local port the webhook listens on."
    )
    telegram_answer_edits: bool = Field(
        False, description="Answer an edited message again (default: edits are ignored)."
    )
    telegram_answer_bots: bool = Field(
        False, description="Answer messages from other bots (default: ignored)."
    )

    # Slack
    slack_bot_token: SecretStr | None = None
    slack_signing_secret: SecretStr | None = None
    slack_app_token: SecretStr | None = None
    slack_api_url: str = "https://slack.com/api/"
    slack_admins: CommaList = Field(default_factory=list)
    slack_port: int = Field(3000, ge=1, le=65535)

    # The terminal (`sprbot chat`): its user is the local OS user.
    console_admins: CommaList = Field(
        default_factory=lambda: [getpass.getuser()],
        description="Admins in `sprbot chat`; default: the local OS user (who owns the data "
        "dir anyway). Empty: nobody.",
    )

    # Web (`sprbot adapter web`): the OpenAI-compatible API and the chat page. Web users are
    # never admins: admin commands are for Slack, Telegram and the terminal.
    web_port: int = Field(
        8080, ge=0, le=65535, description="Port of the web API and chat page (0: any free one)."
    )
    web_api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Bearer keys the web API accepts, comma-separated. None: it listens on "
        "127.0.0.1 only, without keys.",
    )

    @field_validator(
        "telegram_admins",
        "slack_admins",
        "console_admins",
        "web_api_keys",
        "redis_sentinels",
        mode="before",
    )
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator(
        "redis_url",
        "redis_ssl_ca_certs",
        "redis_ssl_certfile",
        "redis_ssl_keyfile",
        "redis_sentinel_password",
        "telegram_webhook_url",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("redis_url")
    @classmethod
    def _known_redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must start with redis://, rediss:// (TLS) or unix://")
        return value

    @field_validator("redis_ssl_ca_certs", "redis_ssl_certfile", "redis_ssl_keyfile")
    @classmethod
    def _existing_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.expanduser().is_file():
            raise ValueError("no such file")
        return None if value is None else value.expanduser()

    @field_validator("redis_sentinels")
    @classmethod
    def _host_port_pairs(cls, value: list[str]) -> list[str]:
        for address in value:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{address!r} is not host:port (e.g. sentinel-0:26379)")
        return value

    @model_validator(mode="after")
    def _request_ttl_outlasts_reclaims(self) -> Settings:
        # A worker that overran its reclaim must still find the answered mark when it finishes,
        # or the user gets a second answer.
        floor_s = self.reclaim_idle_ms * self.max_deliveries / 1000
        if self.request_ttl_s < floor_s:
            raise ValueError(
                f"SPRBOT_REQUEST_TTL_S={self.request_ttl_s} is shorter than the last retry of a "
                f"request (SPRBOT_RECLAIM_IDLE_MS x SPRBOT_MAX_DELIVERIES = {floor_s:g} s): "
                f"raise it to at least {floor_s:g}, or lower SPRBOT_RECLAIM_IDLE_MS"
            )
        return self

    @model_validator(mode="after")
    def _redis_options_fit_the_url(self) -> Settings:
        scheme = urlsplit(self.redis_url).scheme if self.redis_url else None
        tls_options = [
            ENV_PREFIX + name.upper()
            for name in ("redis_ssl_ca_certs", "redis_ssl_certfile", "redis_ssl_keyfile")
            if getattr(self, name) is not None
        ]
        if self.redis_ssl_cert_reqs != "required":
            tls_options.append(ENV_PREFIX + "REDIS_SSL_CERT_REQS")
        if tls_options and scheme != "rediss":
            raise ValueError(
                f"{', '.join(tls_options)} apply to TLS connections only: make SPRBOT_REDIS_URL "
                "a rediss:// URL, or unset them"
            )
        if self.redis_ssl_keyfile is not None and self.redis_ssl_certfile is None:
            raise ValueError(
                "SPRBOT_REDIS_SSL_KEYFILE needs SPRBOT_REDIS_SSL_CERTFILE, the certificate "
                "that the key belongs to"
            )
        if self.redis_sentinels and self.redis_url:
            # As redis-rb does: the URL's host names the master; the sentinels know its address.
            host = _url_host(self.redis_url)
            if scheme == "unix" or host != self.redis_sentinel_master:
                master = self.redis_sentinel_master
                raise ValueError(
                    "with SPRBOT_REDIS_SENTINELS set, SPRBOT_REDIS_URL only gives the master's "
                    f"credentials, database and TLS, and its host must be the master name "
                    f"{master!r} (SPRBOT_REDIS_SENTINEL_MASTER), not {host or scheme!r}: "
                    f"e.g. redis://:PASSWORD@{master}/0 or rediss://:PASSWORD@{master}/0"
                )
        return self

    def admins(self, platform: str) -> frozenset[str]:
        """The admin user ids of one platform (``slack``, ``telegram``, ``console``); none for
        any other platform, so its users can run no admin command."""
        ids = {
            "slack": self.slack_admins,
            "telegram": self.telegram_admins,
            "console": self.console_admins,
        }.get(platform, [])
        return frozenset(ids)

    def redacted(self) -> dict[str, str]:
        """Effective values as strings, secrets masked, for ``sprbot config show``."""
        shown: dict[str, str] = {}
        for name in type(self).model_fields:
            shown[ENV_PREFIX + name.upper()] = _redact(getattr(self, name))
        return shown


def _url_host(url: str) -> str:
    """The host of a URL as written (``urlsplit().hostname`` lowercases it)."""
    host_port = urlsplit(url).netloc.rpartition("@")[2]
    return host_port.rsplit(":", 1)[0] if ":" in host_port else host_port


def _redact(value: Any) -> str:
    if isinstance(value, SecretStr):
        return "****** (set)" if value.get_secret_value() else "(empty)"
    if isinstance(value, list):
        return ",".join(_redact(v) for v in value) if value else "(none)"
    if value is None:
        return "(unset)"
    if isinstance(value, str) and "@" in value and "://" in value:
        # A URL such as redis://user:password@host carries a password: keep the host only.
        scheme, rest = value.split("://", 1)
        return f"{scheme}://******@{rest.rsplit('@', 1)[1]}"
    return str(value)


def load_settings(**overrides: Any) -> Settings:
    """Build the settings, or raise ``SettingsError`` naming each invalid variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            if not error["loc"]:  # a check across variables: its message names them
                problems.append(error["msg"].removeprefix("Value error, "))
                continue
            field = str(error["loc"][0])
            variable = ENV_PREFIX + field.upper()
            value = error.get("input")
            if field.endswith(("token", "secret", "keys", "password")):
                shown = ""
            elif field == "redis_url" and isinstance(value, str):
                shown = f"={_redact(value)!r}"  # a URL may carry a password
            else:
                shown = f"={value!r}"
            problems.append(f"{variable}{shown}: {error['msg']}")
        raise SettingsError("invalid setting " + "; ".join(problems)) from None
