"""Configuration: frozen dataclasses per concern, built once from file, environment and CLI.

Precedence, lowest first: field defaults, a TOML file (``--config``), environment
variables ``TOKENWIRE_<SECTION>_<FIELD>`` (e.g. ``TOKENWIRE_SERVER_LISTEN``), then
command-line overrides. Every field has a default and a one-line description;
``tokenwire serve --help-config`` prints them all.

    [server]
    listen = "0.0.0.0:50051"
    [backend]
    device = "cuda"
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenwire.abuse.config import AbuseConfig
from tokenwire.auth.config import AuthConfig
from tokenwire.backend import BackendConfig
from tokenwire.config_fields import parse_pairs, require_positive, setting
from tokenwire.edge.config import HttpConfig
from tokenwire.errors import ConfigError
from tokenwire.metrics.config import MetricsConfig
from tokenwire.moderation.config import ModerationConfig
from tokenwire.quotas.config import QuotaConfig
from tokenwire.router.config import RouterConfig
from tokenwire.tracing.config import TracingConfig
from tokenwire.usage.config import UsageConfig
from tokenwire.worker.config import WorkerConfig

__all__ = [
    "ENV_PREFIX",
    "Config",
    "LimitsConfig",
    "LoggingConfig",
    "ServerConfig",
    "StoreConfig",
    "describe",
    "load_config",
]

ENV_PREFIX = "TOKENWIRE_"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The gRPC listener and its lifecycle."""

    listen: str = setting("127.0.0.1:50051", "HOST:PORT to listen on; port 0 picks a free port")
    grace_period_s: float = setting(
        30.0, "on SIGTERM/SIGINT, seconds in-flight streams get to finish before they are cut"
    )
    drain_delay_s: float = setting(
        0.0,
        "on shutdown, seconds to report NOT_SERVING before closing the port "
        "(give load balancers time to notice; e.g. 5 on Kubernetes)",
    )
    max_receive_message_bytes: int = setting(
        1 << 20, "largest request message gRPC accepts (bigger is RESOURCE_EXHAUSTED)"
    )
    max_concurrent_streams: int = setting(
        1024, "most concurrent RPCs the server accepts; further calls are refused"
    )
    reuse_port: bool = setting(
        False,
        "set SO_REUSEPORT so several gateway processes can share one port (off: a second "
        "server started on a busy port by mistake fails instead of taking a share)",
    )
    open_inference: bool = setting(
        False,
        "also serve the Open Inference Protocol (KServe v2, Triton's "
        "inference.GRPCInferenceService) on this port, for Triton's clients and tools; "
        "needs the extra: tokenwire[triton]",
    )
    inference_stream_requests: int = setting(
        16, "most requests one ModelStreamInfer stream runs at once; more are refused in-stream"
    )
    coalesce_chunks: int = setting(
        16,
        "most engine chunks already waiting that one Delta carries when a client reads "
        "slower than the engine writes; 1 sends one Delta per chunk",
    )
    coalesce_budget_us: float = setting(
        100.0,
        "most microseconds one Delta spends taking in waiting chunks: a longer step would "
        "delay every other stream and every new call on the event loop",
    )
    converse_outbox_messages: int = setting(
        16,
        "responses a Converse stream holds for a client that is not reading; then its "
        "turn waits (deltas of a turn merge while they wait)",
    )
    reflection: bool = setting(True, "serve gRPC server reflection (for grpcurl and similar tools)")
    tls_cert_file: str = setting(
        "", "PEM certificate chain of the server; set with tls_key_file to serve TLS"
    )
    tls_key_file: str = setting("", "PEM private key of the server's certificate")
    tls_client_ca_file: str = setting(
        "",
        "PEM CA bundle that client certificates must chain to; set it to require client "
        "certificates (mTLS; with auth.mtls the certificate's subject is the caller)",
    )


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Bounds on every request; violations are INVALID_ARGUMENT."""

    max_message_chars: int = setting(32_000, "longest user message, in characters")
    default_max_tokens: int = setting(
        512, "completion tokens when a request leaves max_tokens at 0 (capped by the context)"
    )
    max_stop_strings: int = setting(8, "most stop strings in one request")
    max_stop_bytes: int = setting(256, "longest stop string, in UTF-8 bytes")
    max_idempotency_key_bytes: int = setting(128, "longest idempotency key, in UTF-8 bytes")
    max_model_name_chars: int = setting(256, "longest model name in a request")
    max_history_messages: int = setting(
        64, "most stored messages of a conversation sent to the model as history"
    )
    system_prompt: str = setting("", "system message prepended to every conversation; empty: none")


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Where conversations live."""

    data_dir: str = setting(".tokenwire", "directory for the server's files (SQLite database)")
    backend: str = setting(
        "sqlite", "conversation store: 'sqlite' (one file, embedded) or 'postgres' (shared)"
    )
    sqlite_path: str = setting(
        "", "SQLite database file; empty: conversations.db in data_dir; ':memory:' keeps nothing"
    )
    postgres_dsn: str = setting(
        "postgresql://127.0.0.1:5432/tokenwire", "PostgreSQL connection string (libpq URI)"
    )
    postgres_schema: str = setting(
        "public", "PostgreSQL schema holding the tables (created if missing)"
    )
    postgres_pool_size: int = setting(10, "most PostgreSQL connections per gateway process")
    idempotency_ttl_s: float = setting(
        86400.0, "how long a turn's idempotency key answers retries, in seconds"
    )
    heartbeat_s: float = setting(2.0, "how often a gateway tells the store it is alive, in seconds")
    gateway_timeout_s: float = setting(
        10.0,
        "a running turn whose gateway has not beaten for this long is dead: its "
        "conversation takes new turns and its key answers with what was stored",
    )
    live: str = setting(
        "memory",
        "where live turn events fan out to watchers and resumed turns: 'memory' (this "
        "process) or 'redis' (every gateway)",
    )
    live_redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis for store.live = 'redis'")
    live_buffer_events: int = setting(
        4096, "events kept per conversation for watchers and resumes (older ones lag)"
    )

    def __post_init__(self) -> None:
        if self.backend not in ("sqlite", "postgres"):
            raise ConfigError(f"store.backend must be 'sqlite' or 'postgres', got {self.backend!r}")
        if self.live not in ("memory", "redis"):
            raise ConfigError(f"store.live must be 'memory' or 'redis', got {self.live!r}")
        require_positive("store", self, "idempotency_ttl_s", "heartbeat_s", "gateway_timeout_s")
        if self.gateway_timeout_s <= 2 * self.heartbeat_s:
            raise ConfigError("store.gateway_timeout_s must be more than twice store.heartbeat_s")
        if self.postgres_pool_size < 1 or self.live_buffer_events < 16:
            raise ConfigError(
                "store.postgres_pool_size must be >= 1 and store.live_buffer_events >= 16"
            )

    def resolved_sqlite_path(self) -> str:
        """The SQLite file to open."""
        return self.sqlite_path or str(Path(self.data_dir) / "conversations.db")


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """Structured logs."""

    format: str = setting("console", "'console' for people, 'json' for log shippers")
    level: str = setting("info", "debug, info, warning or error")


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the server reads at start-up; immutable afterwards."""

    server: ServerConfig = field(default_factory=ServerConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    quotas: QuotaConfig = field(default_factory=QuotaConfig)
    moderation: ModerationConfig = field(default_factory=ModerationConfig)
    abuse: AbuseConfig = field(default_factory=AbuseConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    usage: UsageConfig = field(default_factory=UsageConfig)
    http: HttpConfig = field(default_factory=HttpConfig)


def _sections() -> Iterator[tuple[str, type[Any]]]:
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        yield f.name, hints[f.name]


def _coerce(value: Any, kind: Any, where: str) -> Any:
    """Turn a TOML or string value into the field's type, or raise ConfigError."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
        origin = typing.get_origin(kind)
    try:
        if origin is not None and issubclass(origin, Mapping):
            if not isinstance(value, Mapping):
                return parse_pairs(str(value), where)
            # A table of tables (e.g. quota plans) stays nested for its section to parse.
            as_text = typing.get_args(kind)[1:] == (str,)
            return {str(k): str(v) if as_text else v for k, v in value.items()}
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if kind in (int, float, str):
            if kind is not str and isinstance(value, bool):
                raise ValueError(f"not a number: {value!r}")
            return kind(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    raise ConfigError(f"{where}: unsupported field type {kind!r}")


def _apply(section_cls: type[Any], current: Any, updates: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(section_cls)
    names = {f.name for f in dataclasses.fields(section_cls)}
    changes = {}
    for key, value in updates.items():
        name = key.replace("-", "_")
        if name not in names:
            raise ConfigError(
                f"{where}: unknown setting {key!r}; known: {', '.join(sorted(names))}"
            )
        changes[name] = _coerce(value, hints[name], f"{where}.{name}")
    return dataclasses.replace(current, **changes)


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the configuration: defaults < TOML file < ``TOKENWIRE_*`` env < overrides.

    ``overrides`` keys are ``"section.field"`` (e.g. ``"server.listen"``).
    """
    env = os.environ if env is None else env
    layers: dict[str, dict[str, tuple[Any, str]]] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {os.fspath(path)!r}: {exc}") from exc
        for section, values in data.items():
            if not isinstance(values, Mapping):
                raise ConfigError(f"{path}: [{section}] must be a table")
            for key, value in values.items():
                layers.setdefault(section, {})[key] = (value, f"{path} [{section}]")
    sections = dict(_sections())
    for section, section_cls in sections.items():
        prefix = f"{ENV_PREFIX}{section.upper()}_"
        for f in dataclasses.fields(section_cls):
            name = prefix + f.name.upper()
            if name in env:
                layers.setdefault(section, {})[f.name] = (env[name], name)
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        layers.setdefault(section, {})[key] = (value, f"override {dotted}")
    config = Config()
    for section, values in layers.items():
        if section not in sections:
            raise ConfigError(f"unknown config section [{section}]; known: {', '.join(sections)}")
        current = getattr(config, section)
        for key, (value, where) in values.items():
            current = _apply(sections[section], current, {key: value}, where)
        config = dataclasses.replace(config, **{section: current})
    return config


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    factory: Any = f.default_factory
    return factory()


def describe() -> str:
    """Every setting with its default, environment variable and description."""
    lines = []
    for section, section_cls in _sections():
        lines.append(f"[{section}]  {(section_cls.__doc__ or '').strip().splitlines()[0]}")
        for f in dataclasses.fields(section_cls):
            default = _default_of(f)
            if isinstance(default, Mapping):
                default = dict(default)
            env = f"{ENV_PREFIX}{section.upper()}_{f.name.upper()}"
            lines.append(f"  {f.name} = {default!r}\n      {env}: {f.metadata.get('help', '')}")
    return "\n".join(lines)
