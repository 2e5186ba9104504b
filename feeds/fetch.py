"""Fetching feed bodies: HTTP(S) with conditional GET, local paths and file:// URLs.

Rules:

- HTTP: ``If-None-Match`` / ``If-Modified-Since`` from the last good fetch; 304 means "not
  modified". ``Content-Encoding: gzip`` is decoded by aiohttp; a body that is itself gzip
  (``.gz`` files) is decompressed here. Both count against ``max_bytes`` after decompression:
  reading stops at the limit and the fetch fails (never a silently cut list).
- Retries: connection errors, timeouts, 429 and 5xx are retried ``retries`` times with
  exponential backoff and full jitter (``Retry-After`` honoured up to the cap); other statuses
  fail at once.
- Local: a path relative to ``base_dir``, an absolute path or ``file://``; "not modified" when
  size and mtime are unchanged.
- Every failure raises ``FetchError`` with a reason; nothing here parses or judges content.
"""

from __future__ import annotations

import asyncio
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aiohttp

DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_RETRIES = 2
DEFAULT_BACKOFF = 1.0
DEFAULT_BACKOFF_CAP = 60.0
READ_CHUNK = 64 * 1024
USER_AGENT = "egressgw-feeds/0.1"
_GZIP_MAGIC = b"\x1f\x8b"


class FetchError(Exception):
    """A feed body could not be fetched; ``reason`` says why, ``retryable`` if worth retrying."""

    def __init__(self, reason: str, *, retryable: bool = False, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class FetchResult:
    """A fetched body (None when not modified) and the validators for the next fetch."""

    body: bytes | None
    etag: str | None = None
    last_modified: str | None = None
    content_type: str | None = None
    status: int = 200

    @property
    def not_modified(self) -> bool:
        """True when the source said nothing changed since the last fetch."""
        return self.body is None


def resolve_local(url: str, base_dir: Path) -> Path:
    """The file a non-HTTP source names (file:// URL, absolute or base_dir-relative path)."""
    if url.lower().startswith("file://"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise FetchError(f"file URL with a remote host {parts.netloc!r}")
        return Path(unquote(parts.path))
    path = Path(url)
    return path if path.is_absolute() else base_dir / path


def gunzip_limited(body: bytes, max_bytes: int) -> bytes:
    """Decompress a gzip body, failing past ``max_bytes`` or on a truncated stream."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(body, max_bytes + 1)
    except zlib.error as e:
        raise FetchError(f"corrupt gzip body: {e}") from None
    if len(out) > max_bytes:
        raise FetchError(f"body larger than max_bytes ({max_bytes}) after decompression")
    if not d.eof:
        raise FetchError("truncated gzip body")
    return out


def _local_stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _read_local(path: Path, max_bytes: int, last_modified: str | None) -> FetchResult:
    try:
        stamp = _local_stamp(path)
        if last_modified == stamp:
            return FetchResult(None, last_modified=stamp, status=304)
        with path.open("rb") as f:
            body = f.read(max_bytes + 1)
    except OSError as e:
        raise FetchError(f"cannot read {path}: {e.strerror or e}") from None
    if len(body) > max_bytes:
        raise FetchError(f"file larger than max_bytes ({max_bytes})")
    if body.startswith(_GZIP_MAGIC):
        body = gunzip_limited(body, max_bytes)
    return FetchResult(body, last_modified=stamp, status=200)


async def fetch(
    url: str,
    *,
    base_dir: Path,
    session: aiohttp.ClientSession | None = None,
    request_timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int = DEFAULT_MAX_BYTES,
    etag: str | None = None,
    last_modified: str | None = None,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
    backoff_cap: float = DEFAULT_BACKOFF_CAP,
    rng: random.Random | None = None,
) -> FetchResult:
    """Fetch a feed body from any supported source; raise FetchError on failure."""
    if not url.lower().startswith(("http://", "https://")):
        path = resolve_local(url, base_dir)
        return await asyncio.to_thread(_read_local, path, max_bytes, last_modified)
    own = session is None
    http = session or aiohttp.ClientSession()
    jitter = rng or random.Random()
    try:
        attempt = 0
        while True:
            try:
                return await _get(http, url, request_timeout, max_bytes, etag, last_modified)
            except FetchError as e:
                if not e.retryable or attempt >= retries:
                    raise
                delay = min(backoff_cap, backoff * 2**attempt) * jitter.random()
                if e.retry_after is not None:
                    delay = max(delay, min(backoff_cap, e.retry_after))
                attempt += 1
                await asyncio.sleep(delay)
    finally:
        if own:
            await http.close()


async def _get(
    session: aiohttp.ClientSession,
    url: str,
    request_timeout: float,
    max_bytes: int,
    etag: str | None,
    last_modified: str | None,
) -> FetchResult:
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "gzip"}
    if etag:
        headers["If-None-Match"] = etag
    if last_modified:
        headers["If-Modified-Since"] = last_modified
    try:
        async with session.get(
            url, headers=headers, timeout=aiohttp.ClientTimeout(total=request_timeout)
        ) as resp:
            if resp.status == 304:
                return FetchResult(None, etag, last_modified, status=304)
            if resp.status == 429 or resp.status >= 500:
                raise FetchError(
                    f"HTTP {resp.status} {resp.reason or ''}".strip(),
                    retryable=True,
                    retry_after=_retry_after(resp.headers.get("Retry-After")),
                )
            if resp.status != 200:
                raise FetchError(f"HTTP {resp.status} {resp.reason or ''}".strip())
            body = await read_limited(resp, max_bytes)
            new_etag = resp.headers.get("ETag")
            new_modified = resp.headers.get("Last-Modified")
            content_type = resp.headers.get("Content-Type")
    except TimeoutError:
        raise FetchError(f"timed out after {request_timeout:g}s", retryable=True) from None
    except aiohttp.ClientPayloadError as e:
        raise FetchError(f"broken response body: {e}", retryable=True) from None
    except aiohttp.ClientError as e:
        raise FetchError(f"request failed: {e}", retryable=True) from None
    if body.startswith(_GZIP_MAGIC):
        body = gunzip_limited(body, max_bytes)
    return FetchResult(body, new_etag, new_modified, content_type, status=200)


async def read_limited(resp: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    """The whole response body, or FetchError as soon as it passes ``max_bytes``."""
    chunks: list[bytes] = []
    total = 0
    async for chunk in resp.content.iter_chunked(READ_CHUNK):
        total += len(chunk)
        if total > max_bytes:
            raise FetchError(f"body larger than max_bytes ({max_bytes})")
        chunks.append(chunk)
    return b"".join(chunks)


def _retry_after(value: str | None) -> float | None:
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())
