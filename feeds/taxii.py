"""TAXII 2.1 collections as a feed source: poll new objects, merge them into a STIX bundle.

Rules (TAXII 2.1, section 5.4 "Get Objects"):

- ``GET {collection}/objects/?limit=N&match[type]=indicator[&added_after=T][&next=X]`` with
  ``Accept: application/taxii+json;version=2.1``; the answer must be ``application/taxii+json``
  (a space before ``version=`` is tolerated) and is an envelope
  ``{"more": bool, "next": str, "objects": [...]}``.
- Pages: while ``more`` is true, ask again with ``next`` (same filters). A server that says
  ``more`` without ``next`` is paged by moving ``added_after`` to the page's
  ``X-TAXII-Date-Added-Last``. At most ``max_pages`` pages and ``max_bytes`` in total.
- The cursor for the next poll is the last page's ``X-TAXII-Date-Added-Last`` (server time,
  exclusive), kept by the caller with the feed's state.
- New objects are merged into the previous bundle: per ``id`` the newest ``modified`` wins, so
  revocations and new ``valid_until`` values replace older versions. The result is a plain STIX
  bundle, parsed by the ``stix`` format like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from feeds.fetch import FetchError, read_limited
from feeds.result import parse_timestamp

TAXII_MEDIA_TYPE = "application/taxii+json;version=2.1"
DEFAULT_PAGE_SIZE = 1000
DEFAULT_MAX_PAGES = 100


@dataclass(frozen=True, slots=True)
class TaxiiPoll:
    """Objects added since the cursor, and the cursor for the next poll."""

    objects: tuple[dict[str, Any], ...]
    cursor: str | None
    pages: int


def _objects_url(collection_url: str) -> str:
    base = collection_url if collection_url.endswith("/") else collection_url + "/"
    return base if base.endswith("/objects/") else base + "objects/"


def _check_media_type(value: str | None) -> None:
    media = (value or "").replace(" ", "").lower()
    if not media.startswith("application/taxii+json"):
        raise FetchError(f"TAXII server answered {value!r}, expected {TAXII_MEDIA_TYPE}")


async def poll_collection(
    session: aiohttp.ClientSession,
    collection_url: str,
    *,
    added_after: str | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    max_pages: int = DEFAULT_MAX_PAGES,
    max_bytes: int,
    request_timeout: float,
    headers: dict[str, str] | None = None,
) -> TaxiiPoll:
    """Every object a collection added after ``added_after``, following pagination."""
    url = _objects_url(collection_url)
    objects: list[dict[str, Any]] = []
    cursor = added_after
    next_token: str | None = None
    total = 0
    pages = 0
    while pages < max_pages:
        params = {"limit": str(page_size), "match[type]": "indicator"}
        if cursor:
            params["added_after"] = cursor
        if next_token:
            params["next"] = next_token
        request_headers = {"Accept": TAXII_MEDIA_TYPE, **(headers or {})}
        try:
            async with session.get(
                url,
                params=params,
                headers=request_headers,
                timeout=aiohttp.ClientTimeout(total=request_timeout),
            ) as resp:
                if resp.status != 200:
                    raise FetchError(
                        f"TAXII HTTP {resp.status}",
                        retryable=resp.status == 429 or resp.status >= 500,
                    )
                _check_media_type(resp.headers.get("Content-Type"))
                body = await read_limited(resp, max_bytes - total)
                last_added = resp.headers.get("X-TAXII-Date-Added-Last")
        except TimeoutError:
            raise FetchError(f"TAXII request timed out after {request_timeout:g}s") from None
        except aiohttp.ClientError as e:
            raise FetchError(f"TAXII request failed: {e}", retryable=True) from None
        total += len(body)
        pages += 1
        try:
            envelope = orjson.loads(body) if body.strip() else {}
        except orjson.JSONDecodeError as e:
            raise FetchError(f"TAXII envelope is not JSON: {e}") from None
        if not isinstance(envelope, dict):
            raise FetchError("TAXII envelope is not a JSON object")
        page_objects = envelope.get("objects") or []
        if not isinstance(page_objects, list):
            raise FetchError("TAXII envelope 'objects' is not a list")
        objects.extend(o for o in page_objects if isinstance(o, dict))
        cursor_out = last_added or cursor
        if not envelope.get("more"):
            return TaxiiPoll(tuple(objects), cursor_out, pages)
        token = envelope.get("next")
        if isinstance(token, str) and token:
            next_token = token
        elif last_added and last_added != cursor:
            next_token = None
            cursor = last_added
        else:
            raise FetchError("TAXII server says more but gives neither next nor a new date")
    raise FetchError(f"TAXII collection needs more than max_pages ({max_pages}) pages")


def merge_bundle(previous: bytes | None, new_objects: tuple[dict[str, Any], ...]) -> bytes:
    """A STIX bundle of the previous objects and the new ones; newest version per id wins."""
    merged: dict[str, dict[str, Any]] = {}
    if previous:
        try:
            old = orjson.loads(previous)
        except orjson.JSONDecodeError:
            old = {}
        if isinstance(old, dict) and isinstance(old.get("objects"), list):
            for obj in old["objects"]:
                if isinstance(obj, dict) and isinstance(obj.get("id"), str):
                    merged[obj["id"]] = obj
    for obj in new_objects:
        oid = obj.get("id")
        if not isinstance(oid, str):
            continue
        current = merged.get(oid)
        if current is None or _newer(obj, current):
            merged[oid] = obj
    return orjson.dumps({"type": "bundle", "id": "bundle--taxii", "objects": list(merged.values())})


def _newer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    ta = parse_timestamp(a.get("modified"))
    tb = parse_timestamp(b.get("modified"))
    if ta is None or tb is None:
        return tb is None
    return ta >= tb
