"""A stand-in Kubernetes API server: HTTPS on loopback, bearer tokens, list and watch as documented.

The real API server cannot run here. This one follows its documented wire behaviour for what
the gateway uses (https://kubernetes.io/docs/reference/using-api/api-concepts/):

- objects carry ``metadata.resourceVersion`` from one counter; ``uid``, ``creationTimestamp`` and
  ``generation`` are set on create (``generation`` moves with every change of ``spec``);
- a list answers ``{"kind": "<Kind>List", "metadata": {"resourceVersion"}, "items"}``, in pages
  with ``limit`` and ``continue`` (a consistent snapshot; a token older than the compaction
  point answers 410 Gone as the response);
- ``watch=true`` (any value Go's ``strconv.ParseBool`` takes, so the client library's ``True``
  too) streams newline-delimited events, chunked, from ``resourceVersion``: the events after it,
  then live ones; ``allowWatchBookmarks`` adds BOOKMARK events; ``timeoutSeconds`` ends the
  stream; a version older than the compaction point gets one ERROR event with a 410 Status;
- ``fieldSelector`` with ``spec.nodeName``, ``metadata.name`` and ``metadata.namespace``;
- GET of one object (404 Status if absent) and merge PATCH of ``/status``;
- ``Authorization: Bearer <token>`` or 401 with a Status body.

Failure modes are injected with ``fail(...)``: a status for the next matching requests, an
ERROR event, a connection dropped mid-stream (half a line, then the socket closed).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import itertools
import json
import ssl
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.support.pki import make_test_pki

TRUE = {"1", "t", "T", "TRUE", "true", "True"}
FALSE = {"0", "f", "F", "FALSE", "false", "False"}


@dataclass(frozen=True)
class Kind:
    """One resource type: where it lives in the API and what its objects are called."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        """``v1`` or ``group/version``."""
        return f"{self.group}/{self.version}" if self.group else self.version


KINDS = [
    Kind("", "v1", "pods", "Pod", True),
    Kind("apps", "v1", "replicasets", "ReplicaSet", True),
    Kind("batch", "v1", "jobs", "Job", True),
    Kind("egressgw.io", "v1alpha1", "globalegresspolicies", "GlobalEgressPolicy", False),
    Kind("egressgw.io", "v1alpha1", "egresspolicies", "EgressPolicy", True),
    Kind("egressgw.io", "v1alpha1", "threatfeeds", "ThreatFeed", False),
]


@dataclass
class Fault:
    """An injected failure for the next ``count`` requests matching ``path``/``watch``."""

    path: str  # a substring of the request path ("" for any)
    watch: bool | None  # only watches (True), only others (False), or both (None)
    status: int = 0  # answer with this status
    error_event: int = 0  # (watch) send one ERROR event with this code, then end
    drop_after: int = -1  # (watch) close the connection mid-line after this many events
    count: int = 1


@dataclass
class Store:
    """Objects of every kind, the event history and the resourceVersion counter."""

    version: int = 100
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    history: list[tuple[int, str, str, dict[str, Any]]] = field(default_factory=list)
    compacted: int = 0  # versions at or below this are gone


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    """A metav1.Status object."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


class KubeApiServer:
    """The stand-in: ``async with`` it in the test's loop, or in a ThreadedKubeApi."""

    def __init__(self, directory: Path, token: str = "token-1", bookmark_interval: float = 0.5):
        self.directory = directory
        self.token = token
        self.bookmark_interval = bookmark_interval
        self.store = Store()
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # method, path, query
        self.patches: list[tuple[str, dict[str, Any]]] = []  # path, body
        self._changed: asyncio.Condition | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.kinds = {(k.group, k.plural): k for k in KINDS}
        self._snapshots: dict[int, list[Any]] = {}  # the lists being paged, by id
        self._watching: set[asyncio.BaseTransport] = set()
        self._ids = itertools.count()

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> KubeApiServer:
        """Serve HTTPS on a free loopback port and write ``kubeconfig.yaml`` beside the certs."""
        self._changed = asyncio.Condition()
        tls = make_test_pki(self.directory / "pki", names=("127.0.0.1",))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls.server_cert, tls.server_key)
        self.ca = tls.ca_cert
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.write_kubeconfig()
        return self

    async def stop(self) -> None:
        """Stop serving (open watches are cut)."""
        self.cut_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> KubeApiServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def kubeconfig(self) -> Path:
        """The kubeconfig file: certificate-authority-data and the current token."""
        return self.directory / "kubeconfig.yaml"

    def write_kubeconfig(self, token: str | None = None) -> None:
        """Write the kubeconfig (with ``token``, or the server's current one)."""
        ca = base64.b64encode(self.ca.read_bytes()).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "standin",
                    "cluster": {
                        "server": f"https://127.0.0.1:{self.port}",
                        "certificate-authority-data": ca,
                    },
                }
            ],
            "users": [{"name": "gateway", "user": {"token": token or self.token}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "gateway"}}],
            "current-context": "standin",
        }
        self.kubeconfig.write_text(json.dumps(config))  # JSON is YAML

    # -- the objects (call in the server's loop) -------------------------------------------------
    def _now(self) -> str:
        return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def _record(self, kind: str, obj: dict[str, Any]) -> None:
        self.store.version += 1
        obj["metadata"]["resourceVersion"] = str(self.store.version)
        self.store.history.append((self.store.version, kind, self._plural_of(obj), obj))
        if self._changed is not None:
            changed = self._changed

            async def notify() -> None:
                async with changed:
                    changed.notify_all()

            asyncio.get_running_loop().create_task(notify())

    def _plural_of(self, obj: dict[str, Any]) -> str:
        group = obj["apiVersion"].rpartition("/")[0]
        return next(k.plural for k in KINDS if k.group == group and k.kind == obj["kind"])

    @staticmethod
    def _key(obj: dict[str, Any]) -> tuple[str, str, str]:
        meta = obj["metadata"]
        return (obj["kind"], meta.get("namespace", ""), meta["name"])

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create an object (ADDED); returns the stored copy."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", self._now())
        meta["generation"] = 1
        self.store.objects[self._key(obj)] = obj
        self._record("ADDED", obj)
        return copy.deepcopy(obj)

    def update(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Replace an object (MODIFIED), keeping uid and creation; a new spec moves generation."""
        old = self.store.objects[self._key(obj)]
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        for k in ("uid", "creationTimestamp"):
            meta[k] = old["metadata"][k]
        generation = old["metadata"]["generation"]
        meta["generation"] = generation + (obj.get("spec") != old.get("spec"))
        if "status" not in obj and "status" in old:
            obj["status"] = old["status"]
        self.store.objects[self._key(obj)] = obj
        self._record("MODIFIED", obj)
        return copy.deepcopy(obj)

    def delete(self, kind: str, name: str, namespace: str = "") -> None:
        """Delete an object (DELETED)."""
        obj = self.store.objects.pop((kind, namespace, name))
        self._record("DELETED", copy.deepcopy(obj))

    def get(self, kind: str, name: str, namespace: str = "") -> dict[str, Any]:
        """A copy of a stored object."""
        return copy.deepcopy(self.store.objects[(kind, namespace, name)])

    def compact(self) -> None:
        """Forget the history up to now: older resourceVersions answer 410 Gone."""
        self.store.compacted = self.store.version
        self.store.history.clear()

    def fail(self, path: str = "", watch: bool | None = None, **what: int) -> None:
        """Inject a failure (see Fault) for requests whose path contains ``path``."""
        self.faults.append(Fault(path, watch, **what))

    def cut_watches(self) -> None:
        """Close every open watch connection, as a restarting API server or a proxy would."""
        for transport in list(self._watching):
            transport.close()

    def rotate_token(self, token: str) -> None:
        """Accept only ``token`` from now on."""
        self.token = token

    # -- the HTTP side ---------------------------------------------------------------------------
    def _fault(self, path: str, watch: bool) -> Fault | None:
        for fault in self.faults:
            if fault.path in path and fault.watch in (None, watch):
                fault.count -= 1
                if fault.count <= 0:
                    self.faults.remove(fault)
                return fault
        return None

    def _route(self, parts: list[str]) -> tuple[Kind, str | None, str | None, str | None]:
        """(kind, namespace, name, subresource) of a path, or KeyError."""
        if parts[:2] == ["api", "v1"]:
            group, rest = "", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 4:
            group, rest = parts[1], parts[3:]
        else:
            raise KeyError("/".join(parts))
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        kind = self.kinds[(group, rest[0])]
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        return kind, namespace, name, sub

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        self.requests.append((request.method, request.path, query))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response(status(401, "Unauthorized", "Unauthorized"), status=401)
        watch_text = query.get("watch", "false")
        if watch_text not in TRUE | FALSE:
            message = f"watch: invalid value {watch_text!r}"
            return web.json_response(status(400, "BadRequest", message), status=400)
        watch = watch_text in TRUE
        fault = self._fault(request.path, watch)
        if fault is not None and fault.status:
            code = fault.status
            return web.json_response(status(code, "Injected", "injected failure"), status=code)
        try:
            kind, namespace, name, sub = self._route(request.path.strip("/").split("/"))
        except KeyError:
            return web.json_response(status(404, "NotFound", "no such path"), status=404)
        if request.method == "PATCH" and name and sub == "status":
            return await self._patch_status(request, kind, namespace or "", name)
        if request.method != "GET":
            return web.json_response(status(405, "MethodNotAllowed", "no"), status=405)
        if name is not None:
            obj = self.store.objects.get((kind.kind, namespace or "", name))
            if obj is None:
                message = f'{kind.plural} "{name}" not found'
                return web.json_response(status(404, "NotFound", message), status=404)
            return web.json_response(obj)
        selector = self._selector(query.get("fieldSelector", ""), namespace)
        if watch:
            return await self._watch(request, kind, selector, query, fault)
        return self._list(kind, selector, query)

    @staticmethod
    def _selector(text: str, namespace: str | None) -> Callable[[dict[str, Any]], bool]:
        wanted = [tuple(term.split("=", 1)) for term in text.split(",") if term]
        if namespace is not None:
            wanted.append(("metadata.namespace", namespace))

        def matches(obj: dict[str, Any]) -> bool:
            for path, value in wanted:
                node: Any = obj
                for part in path.split("."):
                    node = node.get(part) if isinstance(node, dict) else None
                if (node or "") != value:
                    return False
            return True

        return matches

    def _of(self, kind: Kind, selector: Callable[[dict[str, Any]], bool]) -> Iterator[Any]:
        for obj in self.store.objects.values():
            if obj["kind"] == kind.kind and selector(obj):
                yield obj

    def _list(
        self, kind: Kind, selector: Callable[[dict[str, Any]], bool], query: dict[str, str]
    ) -> web.Response:
        token = query.get("continue")
        if token:
            state = json.loads(base64.b64decode(token))
            if state["rv"] <= self.store.compacted:
                message = "The provided continue parameter is too old"
                return web.json_response(status(410, "Expired", message), status=410)
            version, items = state["rv"], self._snapshots[state["id"]]
        else:
            version = self.store.version
            items = sorted(
                (copy.deepcopy(o) for o in self._of(kind, selector)),
                key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]),
            )
        start = int(json.loads(base64.b64decode(token))["start"]) if token else 0
        limit = int(query.get("limit") or 0) or len(items) or 1
        page = items[start : start + limit]
        meta: dict[str, Any] = {"resourceVersion": str(version)}
        if start + limit < len(items):
            snapshot_id = next(self._ids)
            self._snapshots[snapshot_id] = items
            state = {"rv": version, "start": start + limit, "id": snapshot_id}
            meta["continue"] = base64.b64encode(json.dumps(state).encode()).decode()
            meta["remainingItemCount"] = len(items) - start - limit
        return web.json_response(
            {
                "kind": f"{kind.kind}List",
                "apiVersion": kind.api_version,
                "metadata": meta,
                "items": page,
            }
        )

    async def _watch(
        self,
        request: web.Request,
        kind: Kind,
        selector: Callable[[dict[str, Any]], bool],
        query: dict[str, str],
        fault: Fault | None,
    ) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_type = "application/json"
        response.enable_chunked_encoding()
        await response.prepare(request)
        since = int(query.get("resourceVersion") or 0) or self.store.version
        bookmarks = query.get("allowWatchBookmarks") in TRUE
        deadline = asyncio.get_running_loop().time() + float(query.get("timeoutSeconds") or 1800)
        sent = 0

        async def send(event_type: str, obj: dict[str, Any]) -> bool:
            nonlocal sent
            line = json.dumps({"type": event_type, "object": obj}).encode() + b"\n"
            if fault is not None and fault.drop_after >= 0 and sent >= fault.drop_after:
                await response.write(line[: len(line) // 2])
                assert request.transport is not None
                request.transport.close()
                return False
            await response.write(line)
            sent += 1
            return True

        if fault is not None and fault.error_event:
            code = fault.error_event
            await send("ERROR", status(code, "Expired" if code == 410 else "Injected", "injected"))
            return response
        if since < self.store.compacted:
            message = f"too old resource version: {since} ({self.store.compacted})"
            await send("ERROR", status(410, "Expired", message))
            return response
        assert self._changed is not None and request.transport is not None
        last_bookmark = asyncio.get_running_loop().time()
        transport = request.transport
        self._watching.add(transport)
        try:
            while True:
                for version, event_type, plural, obj in list(self.store.history):
                    if version > since and plural == kind.plural:
                        since = version
                        if selector(obj) and not await send(event_type, obj):
                            return response
                    elif version > since:
                        since = version
                now = asyncio.get_running_loop().time()
                if now >= deadline:
                    return response
                if bookmarks and now - last_bookmark >= self.bookmark_interval:
                    last_bookmark = now
                    mark = {
                        "kind": kind.kind,
                        "apiVersion": kind.api_version,
                        "metadata": {"resourceVersion": str(self.store.version)},
                    }
                    since = max(since, self.store.version)
                    if not await send("BOOKMARK", mark):
                        return response
                async with self._changed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            self._changed.wait(),
                            min(self.bookmark_interval, max(0.01, deadline - now)),
                        )
        except (ConnectionResetError, RuntimeError):
            return response
        finally:
            self._watching.discard(transport)

    async def _patch_status(
        self, request: web.Request, kind: Kind, namespace: str, name: str
    ) -> web.Response:
        obj = self.store.objects.get((kind.kind, namespace, name))
        if obj is None:
            return web.json_response(status(404, "NotFound", f"{name} not found"), status=404)
        if request.content_type != "application/merge-patch+json":
            message = f"unsupported patch type {request.content_type}"
            return web.json_response(status(415, "UnsupportedMediaType", message), status=415)
        body = await request.json()
        self.patches.append((request.path, body))
        obj["status"] = merge_patch(obj.get("status"), body.get("status"))
        self._record("MODIFIED", obj)
        return web.json_response(obj)


class ThreadedKubeApi:
    """The stand-in in a thread of its own, for tests whose gateway is another process."""

    def __init__(self, directory: Path, **options: Any) -> None:
        self.server = KubeApiServer(directory, **options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> KubeApiServer:
        self._thread.start()
        self.call(self.server.start)
        return self.server

    def __exit__(self, *exc: object) -> None:
        self.call(self.server.stop)

        async def settle() -> None:
            # Handlers of cut watches and pending notifications end before the loop does.
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.call(settle)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` (a coroutine function or not) in the server's loop; its result."""

        async def run() -> Any:
            result = fn(*args)
            if asyncio.iscoroutine(result):
                result = await result
            return result

        future: Future[Any] = asyncio.run_coroutine_threadsafe(run(), self._loop)
        return future.result(10)
