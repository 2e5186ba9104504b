"""An Elasticsearch stand-in (aiohttp) that follows the documented wire API the sink uses.

* ``GET /``: the info document (version 9.x, tagline) the official client can check.
* Every response carries ``X-Elastic-Product: Elasticsearch`` (the client refuses 2xx
  answers without it), unless ``product_header`` is turned off.
* ``HEAD|GET|PUT /_index_template/<name>``: composable index templates.
* ``POST /_bulk``: NDJSON action/document pairs. ``create`` fails per item with 409 when
  the ``_id`` exists; data streams (indices matching a template with ``data_stream``)
  accept only ``create`` and require ``@timestamp`` (400 otherwise). Faults are scripted:
  ``fail_requests`` answers whole requests with a status (e.g. 503), ``item_fault`` picks a
  per-item status (429, 400, 500, ...) for a document.
* ``GET|POST /_mget`` and ``/<index>/_mget`` (``docs`` with ``_index``/``_id``, or ``ids``
  with the index in the path): one answer per requested document, in order:
  ``{"_index", "_id", "_version", "_seq_no", "_primary_term", "found": true, "_source"}``,
  ``{"_index", "_id", "found": false}``, or ``{"_index", "_id", "error": {...}}`` with an
  ``index_not_found_exception`` for an index that does not exist. ``fail_mget`` answers whole
  requests with a status, like ``fail_requests``.
* ``GET /<index>/_doc/<_id>``: the same document answer, 404 when it is not found.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

PRODUCT_HEADER = {"X-Elastic-Product": "Elasticsearch"}
JSON = "application/json"
ItemFault = Callable[[dict[str, Any], int], int | None]

ERROR_TYPES = {
    400: "document_parsing_exception",
    429: "es_rejected_execution_exception",
    500: "internal_server_error",
    503: "unavailable_shards_exception",
}


class EsStandin:
    """In-process stand-in server; `docs[index][_id]` holds what was stored."""

    def __init__(self) -> None:
        self.docs: dict[str, dict[str, dict[str, Any]]] = {}
        self.templates: dict[str, dict[str, Any]] = {}
        self.fail_requests: list[int] = []
        self.fail_mget: list[int] = []
        self.mget_requests = 0
        self.item_fault: ItemFault | None = None
        self.product_header = True
        self.max_bulk_bytes = 0  # like http.max_content_length; 0: unlimited
        self.deny_templates = False  # answer 403 to template requests (a writer-only key)
        self.bulk_requests = 0
        self.item_statuses: dict[int, int] = {}
        self.template_puts = 0
        self._attempts: dict[str, int] = {}
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """Base URL of the running server."""
        return f"http://127.0.0.1:{self.port}"

    def all_docs(self) -> list[dict[str, Any]]:
        """Every stored document, all indices."""
        return [d for index in self.docs.values() for d in index.values()]

    def _response(self, body: Any, status: int = 200) -> web.Response:
        headers = PRODUCT_HEADER if self.product_header else {}
        return web.Response(
            body=orjson.dumps(body), status=status, content_type=JSON, headers=headers
        )

    async def info(self, request: web.Request) -> web.Response:
        return self._response(
            {
                "name": "standin",
                "cluster_name": "egressgw-test",
                "cluster_uuid": "standin-uuid",
                "version": {"number": "9.1.0", "build_flavor": "default"},
                "tagline": "You Know, for Search",
            }
        )

    async def template(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if self.deny_templates:
            return self._response({"error": {"type": "security_exception"}, "status": 403}, 403)
        if request.method == "PUT":
            self.templates[name] = await request.json(loads=orjson.loads)
            self.template_puts += 1
            return self._response({"acknowledged": True})
        if name not in self.templates:
            return self._response({"index_templates": []} if request.method == "GET" else {}, 404)
        return self._response(
            {"index_templates": [{"name": name, "index_template": self.templates[name]}]}
        )

    def _data_stream(self, index: str) -> bool:
        return any(
            "data_stream" in t and any(fnmatch.fnmatch(index, p) for p in t["index_patterns"])
            for t in self.templates.values()
        )

    def _item(self, op: str, meta: dict[str, Any], doc: dict[str, Any], n: int) -> dict[str, Any]:
        index, _id = meta.get("_index", ""), meta.get("_id")
        base: dict[str, Any] = {"_index": index, "_id": _id}
        status: int | None = None
        error = ""
        if self.item_fault is not None:
            key = f"{index}/{_id}"
            self._attempts[key] = self._attempts.get(key, 0) + 1
            status = self.item_fault(doc, self._attempts[key])
            error = "scripted fault"
        if status is None and self._data_stream(index):
            if op != "create":
                status, error = 400, "only write ops with an op_type of create are allowed"
            elif "@timestamp" not in doc:
                status, error = 400, "data stream timestamp field [@timestamp] is missing"
        if status is None and _id in self.docs.get(index, {}):
            status, error = 409, f"[{_id}]: version conflict, document already exists"
            self.item_statuses[409] = self.item_statuses.get(409, 0) + 1
            return {
                op: {
                    **base,
                    "status": 409,
                    "error": {"type": "version_conflict_engine_exception", "reason": error},
                }
            }
        if status is not None:
            self.item_statuses[status] = self.item_statuses.get(status, 0) + 1
            etype = ERROR_TYPES.get(status, "exception")
            return {op: {**base, "status": status, "error": {"type": etype, "reason": error}}}
        if _id is None:
            _id = f"auto-{n}-{len(self.docs.get(index, {}))}"
        self.docs.setdefault(index, {})[_id] = doc
        self.item_statuses[201] = self.item_statuses.get(201, 0) + 1
        return {op: {**base, "_id": _id, "status": 201, "result": "created", "_version": 1}}

    async def bulk(self, request: web.Request) -> web.Response:
        self.bulk_requests += 1
        if self.fail_requests:
            status = self.fail_requests.pop(0)
            return self._response(
                {
                    "error": {"type": ERROR_TYPES.get(status, "exception"), "reason": "scripted"},
                    "status": status,
                },
                status,
            )
        if self.max_bulk_bytes and (request.content_length or 0) > self.max_bulk_bytes:
            return self._response({"error": "Request Entity Too Large", "status": 413}, 413)
        if not request.content_type.endswith("x-ndjson"):
            return self._response({"error": "bulk body must be NDJSON", "status": 400}, 400)
        lines = [ln for ln in (await request.read()).split(b"\n") if ln.strip()]
        items = []
        default_index = request.match_info.get("index")
        for n in range(0, len(lines), 2):
            action = orjson.loads(lines[n])
            op, meta = next(iter(action.items()))
            if default_index and "_index" not in meta:
                meta["_index"] = default_index
            items.append(self._item(op, meta, orjson.loads(lines[n + 1]), n))
        errors = any(next(iter(i.values()))["status"] >= 300 for i in items)
        return self._response({"took": 1, "errors": errors, "items": items})

    def _error(self, status: int) -> web.Response:
        return self._response(
            {
                "error": {"type": ERROR_TYPES.get(status, "exception"), "reason": "scripted"},
                "status": status,
            },
            status,
        )

    def _get_doc(self, index: str, _id: str) -> dict[str, Any]:
        # One document as GET _doc and each entry of _mget answer it.
        if index not in self.docs:
            reason = f"no such index [{index}]"
            cause = {"type": "index_not_found_exception", "reason": reason, "index": index}
            return {"_index": index, "_id": _id, "error": {**cause, "root_cause": [cause]}}
        stored = self.docs[index]
        if _id not in stored:
            return {"_index": index, "_id": _id, "found": False}
        seq_no = list(stored).index(_id)
        return {
            "_index": index,
            "_id": _id,
            "_version": 1,
            "_seq_no": seq_no,
            "_primary_term": 1,
            "found": True,
            "_source": stored[_id],
        }

    async def mget(self, request: web.Request) -> web.Response:
        self.mget_requests += 1
        if self.fail_mget:
            return self._error(self.fail_mget.pop(0))
        body = await request.json(loads=orjson.loads)
        default_index = request.match_info.get("index")
        if "docs" in body:
            wanted = [(d.get("_index", default_index), str(d["_id"])) for d in body["docs"]]
        else:
            wanted = [(default_index, str(i)) for i in body.get("ids", [])]
        if not wanted or any(index is None for index, _ in wanted):
            reason = "Validation Failed: 1: index is missing;" if wanted else "no documents"
            error = {"type": "action_request_validation_exception", "reason": reason}
            return self._response({"error": error, "status": 400}, 400)
        return self._response({"docs": [self._get_doc(str(i), _id) for i, _id in wanted]})

    async def get_doc(self, request: web.Request) -> web.Response:
        doc = self._get_doc(request.match_info["index"], request.match_info["id"])
        if "error" in doc:
            return self._response({"error": doc["error"], "status": 404}, 404)
        return self._response(doc, 200 if doc["found"] else 404)

    def app(self) -> web.Application:
        """The aiohttp application."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/", self.info)
        app.router.add_route("*", "/_index_template/{name}", self.template)
        app.router.add_post("/_bulk", self.bulk)
        app.router.add_put("/_bulk", self.bulk)
        app.router.add_post("/{index}/_bulk", self.bulk)
        for path in ("/_mget", "/{index}/_mget"):
            app.router.add_get(path, self.mget)
            app.router.add_post(path, self.mget)
        app.router.add_get("/{index}/_doc/{id}", self.get_doc)
        return app

    async def start(self, port: int = 0) -> str:
        """Listen on 127.0.0.1 (port 0: any free port); returns the URL."""
        self._runner = web.AppRunner(self.app())
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port or self.port)
        await site.start()
        if not self.port:
            self.port = int(self._runner.addresses[0][1])
        return self.url

    async def stop(self) -> None:
        """Stop listening (stored documents stay, so it can be started again)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
