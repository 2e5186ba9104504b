"""Feed definitions: the ``feeds:`` entries of the gateway configuration, validated and frozen.

Rules:

- ``FeedSpec`` is a pydantic v2 model, frozen, ``extra="forbid"``: a misspelt key is an error
  that names its path (``feeds.0.perod``) when the gateway embeds the model in its own config.
- ``catalog: NAME`` takes a ready definition from ``feeds.catalog``; keys given beside it
  override the catalog's, and ``name`` defaults to the catalog name.
- ``url`` is a path (relative to the configuration file's folder), a ``file://`` URL, or an
  ``http://`` / ``https://`` URL.
- Durations are seconds (a number) or text such as ``30s``, ``10m``, ``1h``, ``1h30m``, ``1d``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from feeds.catalog import CATALOG
from feeds.options import ParseOptions

DEFAULT_PERIOD = 3600.0
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_RETRIES = 2
DEFAULT_MAX_SHRINK = 0.5
DEFAULT_MAX_REJECTED_RATIO = 0.5
DEFAULT_TAXII_PAGE_SIZE = 1000
DEFAULT_TAXII_MAX_PAGES = 100
MIN_PERIOD = 1.0

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_URL_SCHEMES = ("http://", "https://", "file://")

FormatName = Literal["lines", "hosts", "csv", "json", "spamhaus", "stix"]


def parse_duration(value: str | float) -> float:
    """Seconds in a duration: a number, or text like ``30s``, ``10m``, ``1h30m``, ``1d``."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or text like '10m'")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip().lower()
        if not text:
            raise ValueError("empty duration")
        try:
            seconds = float(text)
        except ValueError:
            pos = 0
            seconds = 0.0
            while pos < len(text):
                m = _DURATION_PART.match(text, pos)
                if m is None:
                    raise ValueError(
                        f"invalid duration {value!r}: use a number and a unit (ms, s, m, h, d), "
                        "e.g. '30s', '10m', '1h30m'"
                    ) from None
                seconds += float(m.group(1)) * _UNITS[m.group(2)]
                pos = m.end()
    if seconds <= 0:
        raise ValueError(f"duration must be positive, got {value!r}")
    return seconds


def _duration(value: Any) -> Any:
    return parse_duration(value) if isinstance(value, str | int | float) else value


Duration = Annotated[float, BeforeValidator(_duration)]


class TaxiiOptions(BaseModel):
    """Polling options of a TAXII 2.1 collection (``url`` is the collection URL)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    page_size: int = Field(default=DEFAULT_TAXII_PAGE_SIZE, ge=1, le=100_000)
    max_pages: int = Field(default=DEFAULT_TAXII_MAX_PAGES, ge=1, le=100_000)


class FeedSpec(BaseModel):
    """One threat feed: where it is, how to read it, how often, and how much to trust it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    catalog: str | None = None
    url: str = Field(min_length=1)
    format: FormatName
    period: Duration = Field(default=DEFAULT_PERIOD, ge=MIN_PERIOD)
    kind: Literal["blocklist", "allowlist"] = "blocklist"
    subdomains: bool = True
    confidence: int | None = Field(default=None, ge=0, le=100)
    severity: Literal["low", "medium", "high", "critical"] | None = None
    labels: tuple[str, ...] = ()
    timeout: Duration = DEFAULT_TIMEOUT
    max_bytes: int = Field(default=DEFAULT_MAX_BYTES, gt=0)
    retries: int = Field(default=DEFAULT_RETRIES, ge=0, le=10)
    max_shrink: float = Field(default=DEFAULT_MAX_SHRINK, ge=0.0, le=1.0)
    max_rejected_ratio: float = Field(default=DEFAULT_MAX_REJECTED_RATIO, ge=0.0, le=1.0)
    allow_empty: bool = False
    options: ParseOptions = ParseOptions()
    taxii: TaxiiOptions | None = None
    enabled: bool = True
    # The gateway is never ready without this feed's data (fail closed); other feeds hold up
    # readiness only until the gateway's readiness timeout.
    required: bool = False
    license: str | None = None
    special_ranges: Literal["auto", "drop", "keep"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _from_catalog(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("catalog"):
            return data
        name = data["catalog"]
        if not isinstance(name, str) or name not in CATALOG:
            known = ", ".join(sorted(CATALOG))
            raise ValueError(f"unknown catalog feed {name!r}; known: {known}")
        merged = {"name": name, **CATALOG[name], **data}
        base_options = CATALOG[name].get("options")
        if isinstance(base_options, dict) and isinstance(data.get("options"), dict):
            merged["options"] = {**base_options, **data["options"]}
        return merged

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        if "://" in url and not url.lower().startswith(_URL_SCHEMES):
            raise ValueError("url must be a path, file://, http:// or https://")
        return url

    @model_validator(mode="after")
    def _check_taxii(self) -> FeedSpec:
        if self.taxii is not None and (self.format != "stix" or not self.is_remote):
            raise ValueError("a taxii feed needs format: stix and an http(s) collection url")
        return self

    @property
    def is_remote(self) -> bool:
        """True for http:// and https:// sources."""
        return self.url.lower().startswith(("http://", "https://"))

    @property
    def drops_special_ranges(self) -> bool:
        """Whether private, loopback and other special ranges are dropped from this blocklist.

        ``auto`` drops them from downloaded feeds (public lists carry 10.0.0.0/8 and the like by
        mistake) and keeps them in local files, which the operator wrote on purpose.
        """
        if self.special_ranges == "auto":
            return self.is_remote
        return self.special_ranges == "drop"


def check_unique_names(specs: Iterable[FeedSpec]) -> None:
    """Raise ValueError if two feeds share a name."""
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ValueError(f"duplicate feed name {spec.name!r}")
        seen.add(spec.name)
