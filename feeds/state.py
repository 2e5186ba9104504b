"""The last good data of each feed, persisted so the gateway is ready before the first fetch.

Layout under ``state_dir``: ``<feed>.body`` holds the last accepted body (decompressed) and
``<feed>.json`` its metadata (source, ETag, Last-Modified, time of success, SHA-256 of the
body). Each file is replaced atomically (temporary file, fsync, ``os.replace``); the body is
written first and the metadata names its hash, so a crash between the two leaves a pair that
does not verify and is ignored rather than half-trusted.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import orjson


@dataclass(frozen=True, slots=True)
class StoredFeed:
    """The persisted last good body of one feed and what is known about it."""

    body: bytes
    source: str
    etag: str | None = None
    last_modified: str | None = None
    last_success: float | None = None


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_feed(state_dir: Path, name: str, stored: StoredFeed) -> None:
    """Persist a feed's last good body and metadata atomically."""
    _atomic_write(state_dir / f"{name}.body", stored.body)
    meta = {
        "source": stored.source,
        "etag": stored.etag,
        "last_modified": stored.last_modified,
        "last_success": stored.last_success,
        "sha256": hashlib.sha256(stored.body).hexdigest(),
    }
    _atomic_write(state_dir / f"{name}.json", orjson.dumps(meta))


def load_feed(state_dir: Path, name: str) -> StoredFeed | None:
    """The persisted data of a feed, or None if absent or inconsistent."""
    try:
        meta = orjson.loads((state_dir / f"{name}.json").read_bytes())
        body = (state_dir / f"{name}.body").read_bytes()
    except (OSError, orjson.JSONDecodeError):
        return None
    if not isinstance(meta, dict) or meta.get("sha256") != hashlib.sha256(body).hexdigest():
        return None
    source = meta.get("source")
    if not isinstance(source, str):
        return None
    last_success = meta.get("last_success")
    return StoredFeed(
        body=body,
        source=source,
        etag=meta.get("etag") if isinstance(meta.get("etag"), str) else None,
        last_modified=(
            meta.get("last_modified") if isinstance(meta.get("last_modified"), str) else None
        ),
        last_success=float(last_success) if isinstance(last_success, int | float) else None,
    )
