"""Format options: how a parser finds values in a feed body (the ``options:`` key of a feed).

Every key is optional; a key a format does not use is ignored by that format. Columns are
1-based numbers (as ``cut`` and MISP count) or header names.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_MAX_SAMPLES = 5


class ParseOptions(BaseModel):
    """Options shared by the format parsers."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    column: int | str | None = Field(
        default=None,
        description="csv: value column, 1-based number or header name; default: the first "
        "column whose first value is an indicator",
    )
    delimiter: str = Field(default=",", min_length=1, max_length=1, description="csv separator")
    header: Literal["auto", "row", "comment", "none"] = Field(
        default="auto",
        description="csv: where column names are: first row, last '#' comment line, none, or "
        "auto-detected",
    )
    path: str | None = Field(
        default=None,
        description="json: path selecting values or objects; stix: path selecting the objects",
    )
    value_key: str | None = Field(
        default=None, description="json: member holding the value when the path selects objects"
    )
    first_seen_field: int | str | None = Field(
        default=None, description="csv column / json member with the first-seen time"
    )
    reference_field: int | str | None = Field(
        default=None, description="csv column / json member with a reference (URL or id)"
    )
    tags_field: int | str | None = Field(
        default=None, description="csv column / json member with comma-separated tags"
    )
    confidence_field: int | str | None = Field(
        default=None, description="csv column / json member with a 0-100 confidence"
    )
    comment_prefixes: tuple[str, ...] = Field(
        default=("#", ";"), description="lines/hosts/csv: prefixes of full-line comments"
    )
    check_trailer: bool = Field(
        default=True, description="compare '# END N entries'-style trailers with the rows read"
    )
    ignore_valid_until: bool = Field(
        default=False, description="stix: keep indicators past their valid_until"
    )
    max_samples: int = Field(
        default=DEFAULT_MAX_SAMPLES, ge=0, le=100, description="rejected lines kept as samples"
    )


DEFAULT_OPTIONS = ParseOptions()
