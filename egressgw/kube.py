"""The Kubernetes API edge: a client, and list-then-watch of one resource that never gives up.

``ListWatch.run()`` keeps a consumer's view of one resource current:

1. List in pages (``limit``/``continue``) and hand the whole list to ``on_list`` at once; its
   ``resourceVersion`` is where the watch starts.
2. Watch from the last resourceVersion with ``allowWatchBookmarks``: each ADDED, MODIFIED or
   DELETED object goes to ``on_event`` and moves the resourceVersion; a BOOKMARK moves it only.
3. A watch that ends (the server's ``timeoutSeconds``, a dropped connection, a silent one past
   the read timeout) is opened again from the last resourceVersion: nothing is listed again.
4. 410 Gone, as the response or as an ERROR event (the resourceVersion is too old, or a page's
   ``continue`` token expired): list again from scratch.
5. Any other failure (refused connection, 5xx, another ERROR event, an unreadable line): wait
   with capped exponential backoff and jitter, then go on as in 3 (or 1 if nothing was listed).
   401: the credentials are read again first (a rotated service-account token).
6. Nothing is cleared on failure: the consumer keeps serving its last good view meanwhile.

The client is kubernetes_asyncio's (kubeconfig or in-cluster configuration, TLS, the token that
rotates); lists and events are read as raw JSON (``_preload_content=False``, docs/decisions.md):
consumers take plain dicts, and the typed models would cost seconds on a big cluster's list.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import structlog
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config

log = structlog.get_logger("egressgw.kube")

# How long the server holds one watch open (timeoutSeconds); the API server's own default is
# 30-60 minutes, shorter here so a stale connection is renewed without waiting for TCP.
DEFAULT_WATCH_TIMEOUT = 300
# No byte for this long past the server's timeout: the connection is dead (bookmarks come about
# once a minute on a quiet resource).
READ_GRACE = 30.0
CONNECT_TIMEOUT = 10.0
DEFAULT_PAGE_SIZE = 500
BACKOFF_MIN = 0.25
BACKOFF_MAX = 30.0
# One watch event (one object) larger than this is a broken stream, not an object.
MAX_EVENT_BYTES = 16 * 1024 * 1024
# Wait this long after a burst of events before telling listeners (a re-list of many objects
# becomes one change, not thousands).
DEFAULT_SETTLE = 0.05


class ApiError(Exception):
    """The API answered with an error status (or an ERROR event) other than 410 Gone."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(f"HTTP {status}: {message}")


class Gone(ApiError):
    """410 Gone: the resourceVersion or continue token is too old; list again."""


class Api:
    """A kubernetes_asyncio ApiClient whose credentials can be read again."""

    def __init__(self, kubeconfig: Path | None) -> None:
        self.kubeconfig = kubeconfig
        self.configuration = k8s_client.Configuration()
        self.client: k8s_client.ApiClient | None = None

    async def open(self) -> k8s_client.ApiClient:
        """Load the configuration and make the client (ConfigException when there is none)."""
        await self.reload_credentials()
        self.client = k8s_client.ApiClient(self.configuration)
        return self.client

    async def reload_credentials(self) -> None:
        """Read the kubeconfig (or the in-cluster token and CA) again into the same client."""
        if self.kubeconfig is not None:
            await k8s_config.load_kube_config(
                str(self.kubeconfig), client_configuration=self.configuration, persist_config=False
            )
        else:
            load: Any = k8s_config.load_incluster_config  # untyped in the library
            load(client_configuration=self.configuration)

    async def aclose(self) -> None:
        """Close the client's connections."""
        if self.client is not None:
            await self.client.close()


async def check(response: aiohttp.ClientResponse) -> None:
    """Raise Gone or ApiError unless the response is a success (its body then stays unread)."""
    if 200 <= response.status < 300:
        return
    body = await response.read()
    response.release()
    try:
        message = str(orjson.loads(body).get("message", ""))
    except (orjson.JSONDecodeError, AttributeError):
        message = body[:200].decode("utf-8", "replace")
    if response.status == 410:
        raise Gone(410, message)
    raise ApiError(response.status, message)


# A list function of the client's API classes, with the resource's arguments bound.
Lister = Callable[..., Awaitable[Any]]


def backoff_delays(low: float = BACKOFF_MIN, high: float = BACKOFF_MAX) -> Callable[[], float]:
    """A function giving the next delay: doubling from ``low`` to ``high``, with full jitter."""
    current = [low]

    def next_delay() -> float:
        delay = current[0]
        current[0] = min(high, delay * 2)
        return random.uniform(delay / 2, delay)

    return next_delay


class ListWatch:
    """List then watch one resource, forever (see the module's rules)."""

    def __init__(
        self,
        what: str,
        api: Api,
        lister: Callable[[k8s_client.ApiClient], Lister],
        on_list: Callable[[Sequence[Any]], None],
        on_event: Callable[[str, Mapping[str, Any]], None],
        *,
        read_page: Callable[[list[Any]], list[Any]] = list,
        field_selector: str | None = None,
        watch_timeout: int = DEFAULT_WATCH_TIMEOUT,
        page_size: int = DEFAULT_PAGE_SIZE,
        backoff: tuple[float, float] = (BACKOFF_MIN, BACKOFF_MAX),
    ) -> None:
        self.what = what
        self.api = api
        self.lister = lister
        self.on_list = on_list
        self.on_event = on_event
        # Applied to each page's objects as it comes: a consumer keeping a compact form of them
        # holds one page of raw objects at a time, not the whole list.
        self.read_page = read_page
        self.field_selector = field_selector
        self.watch_timeout = watch_timeout
        self.page_size = page_size
        self.backoff = backoff
        self.resource_version: str | None = None
        self.synced = asyncio.Event()  # set once the first list was handed over
        self.lists = 0  # lists handed over (a 410 makes one more)
        self.failures = 0

    def _params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"_preload_content": False}
        if self.field_selector:
            params["field_selector"] = self.field_selector
        return params

    async def run(self) -> None:
        """List and watch until cancelled."""
        delay = backoff_delays(*self.backoff)
        while True:
            try:
                if self.resource_version is None:
                    await self._list()
                    delay = backoff_delays(*self.backoff)
                if await self._watch():
                    delay = backoff_delays(*self.backoff)
            except Gone as e:
                log.info("resource version gone: listing again", what=self.what, reason=e.message)
                self.resource_version = None
            except (ApiError, aiohttp.ClientError, TimeoutError, ValueError, OSError) as e:
                self.failures += 1
                wait = delay()
                log.warning(
                    "kubernetes API failed: retrying, keeping the last view",
                    what=self.what,
                    error=str(e) or type(e).__name__,
                    retry_in=round(wait, 2),
                )
                if isinstance(e, ApiError) and e.status == 401:
                    await self._reload_credentials()
                await asyncio.sleep(wait)

    async def _reload_credentials(self) -> None:
        try:
            await self.api.reload_credentials()
        except Exception as e:  # a kubeconfig being rewritten: try again next time
            log.warning("kubernetes credentials unreadable", error=str(e))

    async def _list(self) -> None:
        client = self.api.client
        assert client is not None
        items: list[Any] = []
        token: str | None = None
        version = ""
        while True:
            params = self._params()
            params["limit"] = self.page_size
            if token:
                params["_continue"] = token
            response = await self.lister(client)(
                **params, _request_timeout=(CONNECT_TIMEOUT, self.watch_timeout + READ_GRACE)
            )
            await check(response)
            try:
                page = orjson.loads(await response.read())
            finally:
                response.release()
            if not isinstance(page, dict) or not isinstance(page.get("items"), list):
                raise ValueError("a list without items")
            items.extend(self.read_page(page.pop("items")))
            meta = page.get("metadata") or {}
            token = meta.get("continue") or None
            version = str(meta.get("resourceVersion") or "")
            if not token:
                break
        if not version:
            raise ValueError("a list without a resourceVersion")
        self.on_list(items)
        self.resource_version = version
        self.lists += 1
        self.synced.set()
        log.info("listed", what=self.what, objects=len(items), resource_version=version)

    async def _watch(self) -> bool:
        """Watch until the stream ends; True if it delivered anything (the API is well)."""
        client = self.api.client
        assert client is not None
        params = self._params()
        params.update(
            watch=True,
            allow_watch_bookmarks=True,
            resource_version=self.resource_version,
            timeout_seconds=self.watch_timeout,
        )
        response = await self.lister(client)(
            **params, _request_timeout=(CONNECT_TIMEOUT, self.watch_timeout + READ_GRACE)
        )
        await check(response)
        delivered = False
        buffer = b""
        try:
            async for chunk in response.content.iter_any():
                buffer += chunk
                if b"\n" not in chunk:
                    if len(buffer) > MAX_EVENT_BYTES:
                        raise ValueError(f"a watch event over {MAX_EVENT_BYTES} bytes")
                    continue
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        self._event(line)
                        delivered = True
        finally:
            response.release()
        return delivered

    def _event(self, line: bytes) -> None:
        event = orjson.loads(line)
        kind = event.get("type") if isinstance(event, dict) else None
        obj = event.get("object") if isinstance(event, dict) else None
        if not isinstance(kind, str) or not isinstance(obj, dict):
            raise ValueError("a watch event without type or object")
        if kind == "ERROR":
            code = int(obj.get("code") or 500)
            message = str(obj.get("message", ""))
            raise Gone(code, message) if code == 410 else ApiError(code, message)
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            try:
                self.on_event(kind, obj)
            except ValueError as e:
                # One unreadable object must not stop the others: it is skipped and said.
                meta = obj.get("metadata") or {}
                log.warning(
                    "object skipped",
                    what=self.what,
                    name=f"{meta.get('namespace', '')}/{meta.get('name', '')}".lstrip("/"),
                    error=str(e),
                )
        elif kind != "BOOKMARK":
            raise ValueError(f"unknown watch event type {kind!r}")
        if version:
            self.resource_version = str(version)
