"""The Kubernetes API as plain JSON, through the official client's configuration (kubeconfig, in-cluster
service account, TLS, tokens), without its model classes.

The bridge reads every pod of the cluster and follows them by watch: turning each object into the
client's generated models costs more CPU than the API server spends serving it. Here a list is pages of
dicts, a watch is a stream of ``(type, dict)``, and a write sends a dict. :class:`Informer` keeps a
cache of one kind by list-then-watch, as client-go's informers do.

Called by :mod:`hami_ray.k8s.scheduler`.
"""

from __future__ import annotations

import calendar
import datetime
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

log = logging.getLogger(__name__)
PAGE = 500
MERGE_PATCH = "application/merge-patch+json"
Handler = Callable[[str, dict[str, Any]], None]


class Gone(Exception):
    """The watch's resource version is too old (410): list again."""


class KubeApi:
    """``get``/``post``/``patch``/``list``/``watch`` on API paths, JSON in and out.

    Raises:
        ApiException: a status outside 2xx (``.status``, ``.body`` as the server said).
    """

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api

    def _send(self, method: str, path: str, body: Any = None, query: list[tuple[str, str]] | None = None,
              content_type: str = "application/json", timeout: float | None = 30.0) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        method_, url, headers_, body_, post = self.api.param_serialize(
            method, path, query_params=query or [], header_params=headers, body=body, auth_settings=["BearerToken"])
        resp = self.api.call_api(method_, url, header_params=headers_, body=body_, post_params=post,
                                 _request_timeout=timeout)
        if not 200 <= resp.status <= 299:
            resp.read()  # type: ignore[no-untyped-call]
            raise ApiException(http_resp=resp)
        return resp

    def request(self, method: str, path: str, body: Any = None, *, query: list[tuple[str, str]] | None = None,
                content_type: str = "application/json") -> dict[str, Any]:
        data = self._send(method, path, body, query, content_type).read()
        parsed: dict[str, Any] = json.loads(data) if data else {}
        return parsed

    def get(self, path: str) -> dict[str, Any]:
        return self.request("GET", path)

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", path, body)

    def patch(self, path: str, body: dict[str, Any], content_type: str = MERGE_PATCH) -> dict[str, Any]:
        return self.request("PATCH", path, body, content_type=content_type)

    def list(self, path: str) -> tuple[list[dict[str, Any]], str]:
        """Every object at ``path`` (in pages) and the list's resource version (to watch from)."""
        items: list[dict[str, Any]] = []
        token = ""
        while True:
            query = [("limit", str(PAGE))] + ([("continue", token)] if token else [])
            page = self.request("GET", path, query=query)
            items.extend(page.get("items") or [])
            meta = page.get("metadata") or {}
            token = meta.get("continue") or ""
            if not token:
                return items, str(meta.get("resourceVersion", ""))

    def watch(self, path: str, resource_version: str, timeout_s: int = 60) -> Iterator[tuple[str, dict[str, Any]]]:
        """Changes after ``resource_version``, with bookmarks, until the server ends the watch.

        Raises:
            Gone: the version is too old; list again.
        """
        query = [("watch", "true"), ("allowWatchBookmarks", "true"), ("resourceVersion", resource_version),
                 ("timeoutSeconds", str(timeout_s))]
        resp = self._send("GET", path, query=query, timeout=timeout_s + 15)
        try:
            for line in iter_resp_lines(resp.response):  # type: ignore[no-untyped-call]
                if not line:
                    continue
                event = json.loads(line)
                kind, obj = event.get("type", ""), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone(obj.get("message", "resource version too old"))
                    raise ApiException(status=obj.get("code", 500), reason=obj.get("message", "watch error"))
                yield kind, obj
        finally:
            resp.response.release_conn()


class Informer:
    """A cache of the objects at ``path`` (by uid), kept by list-then-watch; ``handler(type, obj)`` hears
    every change (``ADDED``/``MODIFIED``/``DELETED``; a relist reports what changed meanwhile, deletions
    included). One bad object or a failing handler never stops it; a lost watch resumes from the last
    version seen, a 410 lists again."""

    def __init__(self, api: KubeApi, path: str, handler: Handler, name: str) -> None:
        self.api = api
        self.path = path
        self.handler = handler
        self.name = name
        self.cache: dict[str, dict[str, Any]] = {}
        self.synced = threading.Event()
        self._version = ""

    def relist(self) -> None:
        """List, report the differences to the cache (as events), remember the version to watch from."""
        items, version = self.api.list(self.path)
        fresh = {o["metadata"]["uid"]: o for o in items if (o.get("metadata") or {}).get("uid")}
        for uid in [u for u in self.cache if u not in fresh]:
            self._deliver("DELETED", self.cache.pop(uid))
        for uid, obj in fresh.items():
            old = self.cache.get(uid)
            self.cache[uid] = obj
            if old is None:
                self._deliver("ADDED", obj)
            elif old["metadata"].get("resourceVersion") != obj["metadata"].get("resourceVersion"):
                self._deliver("MODIFIED", obj)
        self._version = version
        self.synced.set()

    def run(self, stop: threading.Event) -> None:
        """List and watch until ``stop`` (a thread's body)."""
        while not stop.is_set():
            try:
                if not self._version:
                    self.relist()
                for kind, obj in self.api.watch(self.path, self._version):
                    meta = obj.get("metadata") or {}
                    self._version = str(meta.get("resourceVersion") or self._version)
                    uid = meta.get("uid")
                    if kind != "BOOKMARK" and uid:
                        if kind == "DELETED":
                            self.cache.pop(uid, None)
                        else:
                            self.cache[uid] = obj
                        self._deliver(kind, obj)
                    if stop.is_set():
                        return
            except Gone:
                self._version = ""
            except Exception as exc:  # noqa: BLE001 - the API server restarting: watch again
                log.info("%s watch: %s", self.name, exc)
                stop.wait(0.5)

    def _deliver(self, kind: str, obj: dict[str, Any]) -> None:
        try:
            self.handler(kind, obj)
        except Exception:  # noqa: BLE001 - one bad object never stops the others
            log.exception("%s: %s %s not handled", self.name, kind, (obj.get("metadata") or {}).get("name"))


def follow_all(informers: list[Informer], stop: threading.Event) -> None:
    """List each informer's objects in order (retrying until the API server answers, or ``stop``), then
    keep it by watch in a daemon thread of its own; returns once the first lists are in."""
    for informer in informers:
        while not stop.is_set():
            try:
                informer.relist()
                break
            except Exception as exc:  # noqa: BLE001 - the API server is not there yet
                log.warning("listing %s: %s", informer.name, exc)
                stop.wait(1.0)
        threading.Thread(target=informer.run, args=(stop,), name=f"hami-ray-{informer.name}", daemon=True).start()


def pod_path(obj: dict[str, Any], sub: str = "") -> str:
    """A pod's API path (``/api/v1/namespaces/ns/pods/name``) + ``sub`` (``/binding``, ``/status``)."""
    meta = obj["metadata"]
    return f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}{sub}"


def owner_of(obj: dict[str, Any]) -> str:
    """An object's ``namespace/name`` (a pod's owner in the ledger and in messages)."""
    meta = obj["metadata"]
    return f"{meta.get('namespace')}/{meta.get('name')}"


def since(stamp: str | None) -> float:
    """A Kubernetes timestamp (``2026-11-29T02:00:00Z``) as seconds since the epoch (0 when missing)."""
    if not stamp:
        return 0.0
    return float(calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")))


def timestamp(micro: bool = False) -> str:
    """Now as a Kubernetes timestamp (``2026-11-29T02:00:00Z``; ``micro``: with microseconds, as events'
    ``eventTime``)."""
    stamp = datetime.datetime.now(datetime.timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")
