"""Configuration models for the spool and the sinks (pydantic v2, frozen, no extra keys).

The gateway embeds `SpoolSpec` and a list of `SinkSpec` in its own configuration model, so
validation errors carry the full key path (``sinks.2.transport``). Relative paths are
resolved against a base directory: pass ``context={"base_dir": dir}`` to ``model_validate``
or call `resolve_paths` / `Exporter.from_config(..., base_dir)` afterwards.

Every limit has a named default constant here and a key in the model.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from siem.relp import DEFAULT_WINDOW

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

DEFAULT_SPOOL_MAX_BYTES = 256 * MIB
DEFAULT_SEGMENT_BYTES = 8 * MIB
DEFAULT_FSYNC_INTERVAL = 1.0
DEFAULT_BATCH_EVENTS = 1000
DEFAULT_BATCH_INTERVAL = 0.05
DEFAULT_LEDGER_INTERVAL = 0.2
DEFAULT_MEMORY_QUEUE_EVENTS = 100_000

DEFAULT_SINK_BATCH_EVENTS = 500
DEFAULT_BACKOFF_INITIAL = 0.1
DEFAULT_BACKOFF_MAX = 30.0
DEFAULT_TIMEOUT = 10.0

DEFAULT_FILE_ROTATE_BYTES = 100 * MIB
DEFAULT_FILE_KEEP = 5

DEFAULT_SYSLOG_APP_NAME = "egressgw"
DEFAULT_SYSLOG_FACILITY = "local0"
DEFAULT_SYSLOG_UDP_MAX_BYTES = 8192
DEFAULT_SYSLOG_SD_ID = "egressgw@32473"
DEFAULT_RELP_WINDOW = DEFAULT_WINDOW  # librelp's default: 128 messages in flight
TLS_TRANSPORTS = ("tls", "relp_tls")
RELP_TRANSPORTS = ("relp", "relp_tls")

DEFAULT_DATA_STREAM = "logs-egressgw-default"
DEFAULT_TEMPLATE_NAME = "egressgw"

DEFAULT_HEC_SOURCETYPE = "_json"
DEFAULT_HEC_SOURCE = "egressgw"
DEFAULT_HEC_ACK_TIMEOUT = 30.0

SYSLOG_FACILITIES: dict[str, int] = {
    "kern": 0,
    "user": 1,
    "mail": 2,
    "daemon": 3,
    "auth": 4,
    "syslog": 5,
    "lpr": 6,
    "news": 7,
    "uucp": 8,
    "cron": 9,
    "authpriv": 10,
    "ftp": 11,
    "local0": 16,
    "local1": 17,
    "local2": 18,
    "local3": 19,
    "local4": 20,
    "local5": 21,
    "local6": 22,
    "local7": 23,
}

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*$")
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}


def parse_size(value: object) -> int:
    """Parse a byte size: an int, or "512", "64KiB", "256MiB", "1GiB", "10MB" (SI)."""
    if isinstance(value, bool):
        raise ValueError("a size must be an integer or a string such as '256MiB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size must not be negative")
        return value
    if not isinstance(value, str):
        raise ValueError("a size must be an integer or a string such as '256MiB'")
    m = _SIZE_RE.match(value)
    if m is None:
        raise ValueError(f"invalid size {value!r} (examples: 1048576, '64KiB', '256MiB', '1GiB')")
    number, unit = int(m.group(1)), (m.group(2) or "").lower()
    if unit.endswith("b") and len(unit) > 1:
        unit = unit[:-1]
    if unit.endswith("i"):
        return number * int(1024 ** ("kmgt".index(unit[0]) + 1))
    return number * _SIZE_UNITS[unit]


ByteSize = Annotated[int, BeforeValidator(parse_size), Field(ge=0)]


def _resolve(path: Path | None, info: ValidationInfo) -> Path | None:
    base = info.context.get("base_dir") if isinstance(info.context, dict) else None
    if path is None or base is None or path.is_absolute():
        return path
    return Path(base) / path


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {value!r} must be host:port (IPv6 as [::1]:514)")
    return value


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SpoolSpec(_Frozen):
    """Durable on-disk queue between the producer and the sinks."""

    dir: Path
    max_bytes: ByteSize = DEFAULT_SPOOL_MAX_BYTES
    segment_bytes: ByteSize = DEFAULT_SEGMENT_BYTES
    fsync: Literal["batch", "interval"] = "batch"
    fsync_interval: float = Field(DEFAULT_FSYNC_INTERVAL, gt=0)
    when_full: Literal["drop_oldest", "refuse_new"] = "drop_oldest"
    batch_events: int = Field(DEFAULT_BATCH_EVENTS, ge=1)
    batch_interval: float = Field(DEFAULT_BATCH_INTERVAL, gt=0)
    ledger_interval: float = Field(DEFAULT_LEDGER_INTERVAL, ge=0)

    _resolve_dir = field_validator("dir")(_resolve)

    @model_validator(mode="after")
    def _sizes(self) -> SpoolSpec:
        if self.segment_bytes < 4 * KIB:
            raise ValueError("segment_bytes must be at least 4KiB")
        if self.max_bytes < 2 * self.segment_bytes:
            raise ValueError("max_bytes must be at least twice segment_bytes")
        return self


class _SinkBase(_Frozen):
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    batch_events: int = Field(DEFAULT_SINK_BATCH_EVENTS, ge=1)
    backoff_initial: float = Field(DEFAULT_BACKOFF_INITIAL, gt=0)
    backoff_max: float = Field(DEFAULT_BACKOFF_MAX, gt=0)
    queue_events: int = Field(DEFAULT_MEMORY_QUEUE_EVENTS, ge=1)


class FileSinkSpec(_SinkBase):
    """JSON lines to a local file with size-based rotation."""

    type: Literal["file"]
    path: Path
    rotate_bytes: ByteSize = DEFAULT_FILE_ROTATE_BYTES
    keep: int = Field(DEFAULT_FILE_KEEP, ge=0)
    fsync: bool = False

    _resolve_path = field_validator("path")(_resolve)


class StdoutSinkSpec(_SinkBase):
    """JSON lines to standard output."""

    type: Literal["stdout"]


class SyslogSinkSpec(_SinkBase):
    """RFC 5424 over UDP, TCP (RFC 6587 octet counting), TLS (RFC 5425) or RELP (plain or TLS)."""

    type: Literal["syslog"]
    address: Annotated[str, BeforeValidator(_host_port)]
    transport: Literal["udp", "tcp", "tls", "relp", "relp_tls"] = "tcp"
    format: Literal["json", "cef", "leef"] = "json"
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None
    app_name: str = Field(DEFAULT_SYSLOG_APP_NAME, pattern=r"^[!-~]{1,48}$")
    facility: int | str = DEFAULT_SYSLOG_FACILITY
    hostname: str | None = Field(None, pattern=r"^[!-~]{1,255}$")
    sd_id: str = Field(DEFAULT_SYSLOG_SD_ID, pattern=r"^[!#-<>-\\^-~]{1,32}$")
    max_message_bytes: ByteSize = DEFAULT_SYSLOG_UDP_MAX_BYTES
    timeout: float = Field(DEFAULT_TIMEOUT, gt=0)
    window: int = Field(DEFAULT_RELP_WINDOW, ge=1)

    _resolve_paths = field_validator("ca", "cert", "key")(_resolve)

    @field_validator("facility")
    @classmethod
    def _facility(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 0 <= value <= 23:
            raise ValueError("facility must be 0..23 or a name such as local0")
        if isinstance(value, str) and value not in SYSLOG_FACILITIES:
            raise ValueError(f"unknown facility {value!r}; one of {', '.join(SYSLOG_FACILITIES)}")
        return value

    @model_validator(mode="after")
    def _tls_files(self) -> SyslogSinkSpec:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together")
        if self.transport not in TLS_TRANSPORTS and (self.ca or self.cert):
            raise ValueError("ca, cert and key need transport: tls or relp_tls")
        if self.transport not in RELP_TRANSPORTS and "window" in self.model_fields_set:
            raise ValueError("window needs transport: relp or relp_tls")
        return self

    @property
    def facility_code(self) -> int:
        """The numeric syslog facility."""
        return self.facility if isinstance(self.facility, int) else SYSLOG_FACILITIES[self.facility]


class ElasticsearchSinkSpec(_SinkBase):
    """Elasticsearch data stream through the official async client."""

    type: Literal["elasticsearch"]
    hosts: list[str] = Field(min_length=1)
    data_stream: str = Field(DEFAULT_DATA_STREAM, pattern=r"^[a-z0-9][a-z0-9._-]*-[a-z0-9._-]+$")
    api_key: SecretStr | None = None
    api_key_file: Path | None = None  # the key in a file (a mounted Secret), read at start
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    ca: Path | None = None
    install_template: bool = True
    template_name: str = DEFAULT_TEMPLATE_NAME
    dead_letter: Path | None = None
    timeout: float = Field(DEFAULT_TIMEOUT, gt=0)

    _resolve_paths = field_validator("ca", "dead_letter", "api_key_file", "password_file")(_resolve)

    @model_validator(mode="after")
    def _auth(self) -> ElasticsearchSinkSpec:
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("use api_key or api_key_file, not both")
        if self.password is not None and self.password_file is not None:
            raise ValueError("use password or password_file, not both")
        has_password = self.password is not None or self.password_file is not None
        if (self.username is None) == has_password:
            raise ValueError("username and password (or password_file) go together")
        if (self.api_key is not None or self.api_key_file is not None) and self.username:
            raise ValueError("use api_key or username/password, not both")
        return self


class SplunkHecSinkSpec(_SinkBase):
    """Splunk HTTP Event Collector (event endpoint)."""

    type: Literal["splunk_hec"]
    url: str = Field(pattern=r"^https?://")
    token: SecretStr | None = None
    token_file: Path | None = None  # the token in a file (a mounted Secret), read at start
    index: str | None = None
    source: str = DEFAULT_HEC_SOURCE
    sourcetype: str = DEFAULT_HEC_SOURCETYPE
    ack: bool = False
    ack_timeout: float = Field(DEFAULT_HEC_ACK_TIMEOUT, gt=0)
    ca: Path | None = None
    timeout: float = Field(DEFAULT_TIMEOUT, gt=0)

    _resolve_paths = field_validator("ca", "token_file")(_resolve)

    @model_validator(mode="after")
    def _token(self) -> SplunkHecSinkSpec:
        if (self.token is None) == (self.token_file is None):
            raise ValueError("give token or token_file (one of them)")
        return self


class WebhookSinkSpec(_SinkBase):
    """HTTP POST of JSON-lines batches."""

    type: Literal["webhook"]
    url: str = Field(pattern=r"^https?://")
    headers: dict[str, str] = Field(default_factory=dict)
    ca: Path | None = None
    timeout: float = Field(DEFAULT_TIMEOUT, gt=0)

    _resolve_paths = field_validator("ca")(_resolve)


SinkSpec = Annotated[
    FileSinkSpec
    | StdoutSinkSpec
    | SyslogSinkSpec
    | ElasticsearchSinkSpec
    | SplunkHecSinkSpec
    | WebhookSinkSpec,
    Field(discriminator="type"),
]

_M = TypeVar("_M", bound=BaseModel)
_PATH_FIELDS = (
    "dir",
    "path",
    "ca",
    "cert",
    "key",
    "dead_letter",
    "token_file",
    "api_key_file",
    "password_file",
)


def resolve_paths(spec: _M, base_dir: Path | str) -> _M:
    """Return a copy of a spool or sink spec with relative paths made absolute under base_dir."""
    update: dict[str, Any] = {}
    for name in _PATH_FIELDS:
        value = getattr(spec, name, None)
        if isinstance(value, Path) and not value.is_absolute():
            update[name] = Path(base_dir) / value
    return spec.model_copy(update=update) if update else spec


def sink_names(sinks: list[Any]) -> list[str]:
    """Stable, unique names for sinks: the configured name, else the type (numbered if repeated)."""
    names: list[str] = []
    for spec in sinks:
        base = spec.name or spec.type
        name, n = base, 2
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names.append(name)
    return names
