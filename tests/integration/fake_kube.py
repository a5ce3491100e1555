"""
A Kubernetes API server for the tests, speaking the list/watch protocol as the real one
does: lists (paged with C{limit}/C{continue}) whose items carry no C{kind}, watches as
one chunked response of JSON lines from a C{resourceVersion}, C{BOOKMARK} events when
asked for, C{410 Gone} (an C{ERROR} event) for a version older than its history, the
end of a watch after C{timeoutSeconds}, and bearer tokens. The test drives it: objects
applied and deleted, connections dropped, watches gone silent, errors answered.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

Collection = tuple[str, str]
"""(apiVersion, plural): C{("v1", "pods")}."""


@dataclass
class _Watcher:
    request: Request
    collection: Collection
    namespace: str | None
    bookmarks: bool
    timer: IDelayedCall | None = None
    ended: bool = False


@dataclass
class FakeKube:
    clock: IReactorTime
    version: int = 0
    objects: dict[Collection, dict[str, dict[str, Any]]] = field(default_factory=dict)
    history: list[tuple[int, Collection, str, dict[str, Any]]] = field(default_factory=list)
    oldest: int = 0
    """Versions at or below this are compacted away: watching from one is a 410."""
    token: str | None = None
    """The bearer token every request must carry (none: any)."""
    failing: int | None = None
    """Answer every request with this status (a Status object)."""
    silent: bool = False
    """Watches are accepted and then say nothing (a half-open connection)."""
    stalled: bool = False
    """Requests are read and never answered, not even with a status line."""
    brief: bool = False
    """Every watch ends as soon as it has sent what it had (a proxy cutting them short)."""
    requests: list[tuple[str, dict[str, str], str | None]] = field(default_factory=list)
    watchers: list[_Watcher] = field(default_factory=list)

    # -- what a test does

    def apply(self, api: str, plural: str, obj: dict[str, Any]) -> None:
        """Create or replace an object, as C{kubectl apply} would; watchers are told."""
        collection = (api, plural)
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        key = f"{meta['namespace']}/{meta['name']}"
        kind = "MODIFIED" if key in self.objects.get(collection, {}) else "ADDED"
        self._record(collection, kind, obj)
        self.objects.setdefault(collection, {})[key] = obj

    def put(self, doc: dict[str, Any]) -> None:
        """L{apply} a whole document (its C{apiVersion} and C{kind} say where)."""
        api, kind = doc["apiVersion"], doc["kind"]
        plural = next((p for p, k, _ in _KINDS.get(api, ()) if k == kind), None)
        assert plural is not None, f"the fake does not serve {api} {kind}"
        self.apply(api, plural, doc)

    def delete(self, api: str, plural: str, namespace: str, name: str) -> None:
        collection = (api, plural)
        obj = self.objects.get(collection, {}).pop(f"{namespace}/{name}")
        self._record(collection, "DELETED", obj)

    def compact(self) -> None:
        """Forget the history so far: a watch from any version seen is a 410."""
        self.oldest = self.version
        self.history.clear()

    def bookmark(self) -> None:
        for watcher in self._live():
            if watcher.bookmarks:
                self._send(
                    watcher, "BOOKMARK", {"metadata": {"resourceVersion": str(self.version)}}
                )

    def end_watches(self) -> None:
        """Every watch ended by the server, as its C{timeoutSeconds} would."""
        for watcher in self._live():
            self._end(watcher)

    def drop(self) -> None:
        """Every watch connection cut, without a word (a proxy restarting, say)."""
        for watcher in self._live():
            watcher.ended = True
            transport: Any = watcher.request.channel.transport
            if transport is not None:
                transport.abortConnection()
        self.watchers.clear()

    # -- the protocol

    def _record(self, collection: Collection, kind: str, obj: dict[str, Any]) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        self.history.append((self.version, collection, kind, copy.deepcopy(obj)))
        if self.silent:
            return
        for watcher in self._live():
            if watcher.collection == collection and _in(watcher.namespace, obj):
                self._send(watcher, kind, obj)

    def _live(self) -> list[_Watcher]:
        self.watchers = [w for w in self.watchers if not w.ended]
        return list(self.watchers)

    def _send(self, watcher: _Watcher, kind: str, obj: dict[str, Any]) -> None:
        line = json.dumps({"type": kind, "object": obj}).encode() + b"\n"
        watcher.request.write(line)

    def answer(self, request: Request) -> bytes | int:
        path = request.path.decode()
        params = {k.decode(): v[0].decode() for k, v in (request.args or {}).items()}
        authorization = request.getHeader(b"authorization")
        self.requests.append((path, params, authorization.decode() if authorization else None))
        if self.stalled:
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"application/json")
        discovery = _DISCOVERY.get(path.rstrip("/"))
        parsed = _collection(path)
        refusal = self._refusal(request, path, authorization, discovery or parsed)
        if refusal is not None:
            return refusal
        if discovery is not None:
            return json.dumps(discovery).encode()
        assert parsed is not None
        collection, namespace = parsed
        if params.get("watch") in ("1", "true"):
            return self._watch(request, collection, namespace, params)
        return self._list(request, collection, namespace, params)

    def _refusal(
        self, request: Request, path: str, authorization: bytes | None, known: object
    ) -> bytes | None:
        """A Status for a request answered with an error: no token, failing, no such path."""
        if self.token is not None and authorization != f"Bearer {self.token}".encode():
            return _status(request, 401, "Unauthorized", "invalid bearer token")
        if self.failing is not None:
            return _status(request, self.failing, "InternalError", "the test says so")
        if not known:
            return _status(request, 404, "NotFound", f"no such path {path}")
        return None

    def _list(
        self,
        request: Request,
        collection: Collection,
        namespace: str | None,
        params: dict[str, str],
    ) -> bytes:
        items = [
            {k: v for k, v in copy.deepcopy(o).items() if k not in ("apiVersion", "kind")}
            for o in self.objects.get(collection, {}).values()
            if _in(namespace, o)
        ]
        start = int(params.get("continue") or 0)
        limit = int(params.get("limit") or 0) or len(items) or 1
        page = items[start : start + limit]
        meta: dict[str, Any] = {"resourceVersion": str(self.version)}
        if start + limit < len(items):
            meta["continue"] = str(start + limit)
        api, plural = collection
        kind = next((k for p, k, _ in _KINDS.get(api, ()) if p == plural), "")
        body = {"kind": f"{kind}List", "apiVersion": api, "metadata": meta, "items": page}
        return json.dumps(body).encode()

    def _watch(
        self,
        request: Request,
        collection: Collection,
        namespace: str | None,
        params: dict[str, str],
    ) -> int:
        since = int(params.get("resourceVersion") or 0)
        watcher = _Watcher(
            request, collection, namespace, params.get("allowWatchBookmarks") == "true"
        )
        request.write(b"")  # the head goes now, as the real server's does
        if since < self.oldest:
            status = {"kind": "Status", "code": 410, "reason": "Expired",
                      "message": f"too old resource version: {since} ({self.oldest})"}  # fmt: skip
            self._send(watcher, "ERROR", status)
            request.finish()
            return NOT_DONE_YET
        if not self.silent:
            for version, where, kind, obj in self.history:
                if version > since and where == collection and _in(namespace, obj):
                    self._send(watcher, kind, obj)
        if self.brief:
            request.finish()
            return NOT_DONE_YET
        self.watchers.append(watcher)
        seconds = int(params.get("timeoutSeconds") or 0)
        if seconds:
            watcher.timer = self.clock.callLater(seconds, self._end, watcher)
        request.notifyFinish().addBoth(lambda _: self._gone(watcher))
        return NOT_DONE_YET

    def _end(self, watcher: _Watcher) -> None:
        watcher.timer = None
        if not watcher.ended:
            watcher.ended = True
            watcher.request.finish()

    def _gone(self, watcher: _Watcher) -> None:
        watcher.ended = True
        if watcher.timer is not None and watcher.timer.active():
            watcher.timer.cancel()


_KINDS: dict[str, list[tuple[str, str, bool]]] = {
    "v1": [
        ("pods", "Pod", True),
        ("services", "Service", True),
        ("configmaps", "ConfigMap", True),
        ("serviceaccounts", "ServiceAccount", True),
        ("namespaces", "Namespace", False),
    ],
    "apps/v1": [("deployments", "Deployment", True)],
    "rbac.authorization.k8s.io/v1": [
        ("clusterroles", "ClusterRole", False),
        ("clusterrolebindings", "ClusterRoleBinding", False),
        ("roles", "Role", True),
        ("rolebindings", "RoleBinding", True),
    ],
    "networking.serving.volcano.sh/v1alpha1": [
        ("modelroutes", "ModelRoute", True),
        ("modelservers", "ModelServer", True),
    ],
    "inference.networking.k8s.io/v1": [("inferencepools", "InferencePool", True)],
    "gateway.networking.k8s.io/v1": [
        ("httproutes", "HTTPRoute", True),
        ("gateways", "Gateway", True),
    ],
    "inference.networking.x-k8s.io/v1alpha2": [
        ("inferencemodelrewrites", "InferenceModelRewrite", True)
    ],
}
"""What discovery tells a real client (kubectl) the server serves."""


def _discovery() -> dict[str, Any]:
    answers: dict[str, Any] = {
        "/version": {"major": "1", "minor": "32", "gitVersion": "v1.32.0-fake"},
        "/api": {
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}
            ],
        },
    }
    groups = []
    for group_version, kinds in _KINDS.items():
        answers["/api/v1" if group_version == "v1" else f"/apis/{group_version}"] = {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version,
            "resources": [
                {
                    "name": plural,
                    "singularName": kind.lower(),
                    "namespaced": namespaced,
                    "kind": kind,
                    "verbs": ["get", "list", "watch"],
                }
                for plural, kind, namespaced in kinds
            ],
        }
        if group_version != "v1":
            group, version = group_version.split("/")
            entry = {"groupVersion": group_version, "version": version}
            groups.append({"name": group, "versions": [entry], "preferredVersion": entry})
    answers["/apis"] = {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
    return answers


_DISCOVERY = _discovery()


def _in(namespace: str | None, obj: dict[str, Any]) -> bool:
    return namespace is None or obj.get("metadata", {}).get("namespace") == namespace


def _collection(path: str) -> tuple[Collection, str | None] | None:
    """C{/api/v1[/namespaces/NS]/PLURAL} or C{/apis/GROUP/VERSION[/namespaces/NS]/PLURAL}."""
    parts = path.strip("/").split("/")
    if parts[:2] == ["api", "v1"]:
        api, rest = "v1", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 4:
        api, rest = f"{parts[1]}/{parts[2]}", parts[3:]
    else:
        return None
    if len(rest) == 3 and rest[0] == "namespaces":
        return (api, rest[2]), rest[1]
    if len(rest) == 1:
        return (api, rest[0]), None
    return None


def _status(request: Request, code: int, reason: str, message: str) -> bytes:
    request.setResponseCode(code)
    return json.dumps(
        {"kind": "Status", "status": "Failure", "code": code, "reason": reason, "message": message}
    ).encode()


class FakeKubeResource(Resource):
    isLeaf = True

    def __init__(self, kube: FakeKube) -> None:
        super().__init__()
        self.kube = kube

    def render_GET(self, request: Request) -> bytes | int:
        return self.kube.answer(request)


def serve(reactor: Any) -> tuple[FakeKube, Any]:
    """A fake API listening on 127.0.0.1 (any port), and its listening port."""
    kube = FakeKube(reactor)
    port = reactor.listenTCP(0, Site(FakeKubeResource(kube)), interface="127.0.0.1")
    return kube, port


def kubeconfig(path: Any, port: int, token: str = "the-token") -> str:
    """A kubeconfig file at C{path} whose current context is the fake on C{port}."""
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "fake",
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}],
                "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                "users": [{"name": "u", "user": {"token": token}}],
            }
        )
    )
    return str(path)
