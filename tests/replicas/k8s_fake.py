"""A Kubernetes API server for EndpointSlices on loopback: a protocol peer for the replica watcher.

It speaks the parts of the real API the watcher uses, over real HTTP: list (with labelSelector,
limit/continue pagination and the list's resourceVersion) and watch (`?watch=1`, chunked JSON lines of
ADDED/MODIFIED/DELETED/BOOKMARK/ERROR events from a resourceVersion, `timeoutSeconds`,
`allowWatchBookmarks`), at /apis/discovery.k8s.io/v1/endpointslices and the namespaced path. Like the
real server it answers a watch from a compacted resourceVersion with an ERROR event carrying a 410
Status (or, if asked, an HTTP 410), turns label-selector exits into DELETED events, and drops
watch connections when told. Faults are injected by tests: `fail_next` (HTTP 500s), `drop_watches`
(close mid-stream, even mid-line), `compact` (history too old → 410), `send_bookmark`, `send_error`
(an ERROR event with any Status, which ends the watch as the real server does) and `after_first_page`
(a callback run between the pages of a paginated list, e.g. to let its continue token expire).
Like an in-cluster API server it can serve HTTPS (`ssl_context`, swappable: each new connection uses the
current one, as after a serving-certificate rotation) and require a bearer token (`bearer_token`: 401
otherwise).

It is not a mock of our code: nothing here knows about the watcher, only the protocol.
"""

from __future__ import annotations

import bisect
import copy
import json
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

GROUP_PATH = "/apis/discovery.k8s.io/v1"
_NAMESPACED = re.compile(r"^/apis/discovery\.k8s\.io/v1/namespaces/([^/]+)/endpointslices$")
_ALL = "/apis/discovery.k8s.io/v1/endpointslices"


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def parse_selector(text: str) -> Callable[[dict[str, str]], bool]:
    """Equality- and existence-based label selectors: `a`, `!a`, `a=b`, `a==b`, `a!=b`, comma-joined."""
    tests: list[Callable[[dict[str, str]], bool]] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if "!=" in part:
            k, v = (s.strip() for s in part.split("!=", 1))
            tests.append(lambda labels, k=k, v=v: labels.get(k) != v)
        elif "==" in part or "=" in part:
            k, v = (s.strip() for s in re.split("==?", part, maxsplit=1))
            tests.append(lambda labels, k=k, v=v: labels.get(k) == v)
        elif part.startswith("!"):
            absent = part[1:].strip()
            tests.append(lambda labels, k=absent: k not in labels)
        else:
            tests.append(lambda labels, k=part: k in labels)
    return lambda labels: all(t(labels) for t in tests)


def _labels(obj: dict[str, Any] | None) -> dict[str, str]:
    return ((obj or {}).get("metadata") or {}).get("labels") or {}


class FakeKubeAPI:
    """Thread-safe EndpointSlice store with history; serve() runs the HTTP server in a thread."""

    def __init__(self, *, bookmark_interval: float | None = None, watch_410_as_http: bool = False,
                 ssl_context: ssl.SSLContext | None = None, bearer_token: str | None = None) -> None:
        self.ssl_context = ssl_context
        self.bearer_token = bearer_token
        self.authorizations: list[str] = []  # the Authorization header of every request, in order
        self.cond = threading.Condition()
        self.rv = 100
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        # history entries: (rv, type, object-after, object-before)
        self.history: list[tuple[int, str, dict[str, Any], dict[str, Any] | None]] = []
        self.compacted_rv = self.rv
        self.bookmark_interval = bookmark_interval
        self.watch_410_as_http = watch_410_as_http
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.request_times: list[float] = []  # monotonic, parallel to requests
        self.fail_queue: list[int] = []
        self.drop_generation = 0
        self.drop_mid_line = False
        self.bookmark_generation = 0
        self.expire_generation = 0
        self.error_generation = 0
        self.error_status: dict[str, Any] = {}
        self.after_first_page: Callable[[], None] | None = None  # run once, after a first page with more to come
        self.watch_sent: list[float] = []  # monotonic send time of each event line, for benches
        self.record_send_times = False
        self.active_watches = 0
        self.server: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    # -- the store ---------------------------------------------------------------------------------

    def _stamp(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj.setdefault("kind", "EndpointSlice")
        obj.setdefault("apiVersion", "discovery.k8s.io/v1")
        obj.setdefault("metadata", {})["resourceVersion"] = str(self.rv)
        return obj

    def apply(self, event_type: str, obj: dict[str, Any]) -> int:
        """Record ADDED/MODIFIED/DELETED of an object; returns its new resourceVersion."""
        meta = obj["metadata"]
        key = (meta.get("namespace", "default"), meta["name"])
        with self.cond:
            before = self.objects.get(key)
            stamped = self._stamp(obj)
            stamped["metadata"].setdefault("namespace", key[0])
            if event_type == "DELETED":
                self.objects.pop(key, None)
            else:
                if event_type == "ADDED" and before is not None:
                    event_type = "MODIFIED"
                self.objects[key] = stamped
            self.history.append((self.rv, event_type, stamped, before))
            self.cond.notify_all()
            return self.rv

    def upsert(self, obj: dict[str, Any]) -> int:
        meta = obj["metadata"]
        exists = (meta.get("namespace", "default"), meta["name"]) in self.objects
        return self.apply("MODIFIED" if exists else "ADDED", obj)

    def delete(self, namespace: str, name: str) -> int:
        return self.apply("DELETED", self.objects[(namespace, name)])

    def load(self, objs: Iterable[dict[str, Any]]) -> None:
        """Set the initial state without history (as if it predates every watch)."""
        with self.cond:
            for obj in objs:
                stamped = self._stamp(obj)
                meta = stamped["metadata"]
                meta.setdefault("namespace", "default")
                self.objects[(meta["namespace"], meta["name"])] = stamped
            self.compacted_rv = self.rv
            self.history.clear()

    # -- fault injection ---------------------------------------------------------------------------

    def fail_next(self, count: int, code: int = 500) -> None:
        with self.cond:
            self.fail_queue += [code] * count

    def compact(self) -> None:
        """Forget all history: any watch from an older resourceVersion now gets 410 Gone."""
        with self.cond:
            self.compacted_rv = self.rv
            self.history.clear()
            self.cond.notify_all()

    def expire_watches(self) -> None:
        """Compact and tell every open watch so with an ERROR 410 event, as an apiserver restart can."""
        with self.cond:
            self.compacted_rv = self.rv
            self.history.clear()
            self.expire_generation += 1
            self.cond.notify_all()

    def send_error(self, code: int, reason: str, message: str) -> None:
        """Every open watch gets one ERROR event carrying this Status, then its stream ends."""
        with self.cond:
            self.error_status = status(code, reason, message)
            self.error_generation += 1
            self.cond.notify_all()

    def drop_watches(self, mid_line: bool = False) -> None:
        with self.cond:
            self.drop_generation += 1
            self.drop_mid_line = mid_line
            self.cond.notify_all()

    def send_bookmark(self) -> None:
        with self.cond:
            self.bookmark_generation += 1
            self.cond.notify_all()

    def request_count(self, watch: bool | None = None) -> int:
        with self.cond:
            return sum(1 for _, q in self.requests
                       if watch is None or (q.get("watch") in ("1", "true")) == watch)

    # -- HTTP ------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self.server is not None
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.server.server_address[1]}"

    def serve(self) -> FakeKubeAPI:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                api._handle(self)

        class Server(ThreadingHTTPServer):
            def get_request(self) -> tuple[socket.socket, Any]:
                sock, address = self.socket.accept()
                context = api.ssl_context
                if context is not None:  # a failed handshake raises SSLError (an OSError): the server drops it
                    sock = context.wrap_socket(sock, server_side=True)
                return sock, address

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), name="fake-kube-api",
                                       daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        if self.server is not None:
            with self.cond:
                self.drop_generation += 1
                self.cond.notify_all()
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def __enter__(self) -> FakeKubeAPI:
        return self.serve()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _send_json(handler: BaseHTTPRequestHandler, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        parsed = urllib.parse.urlsplit(handler.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(parsed.query, keep_blank_values=True).items()}
        with self.cond:
            self.requests.append((parsed.path, query))
            self.authorizations.append(handler.headers.get("Authorization", ""))
            self.request_times.append(time.monotonic())
            fail = self.fail_queue.pop(0) if self.fail_queue else None
        if fail is not None:
            self._send_json(handler, fail, status(fail, "InternalError", "injected failure"))
            return
        if self.bearer_token is not None and handler.headers.get("Authorization", "").lower() != (
                f"bearer {self.bearer_token}".lower()):
            self._send_json(handler, 401, status(401, "Unauthorized", "Unauthorized"))
            return
        match = _NAMESPACED.match(parsed.path)
        if parsed.path != _ALL and not match:
            self._send_json(handler, 404, status(404, "NotFound", f"the server could not find {parsed.path}"))
            return
        namespace = match.group(1) if match else None
        selector = parse_selector(query.get("labelSelector", ""))

        def selected(obj: dict[str, Any] | None) -> bool:
            return (obj is not None and (namespace is None or obj["metadata"].get("namespace") == namespace)
                    and selector(_labels(obj)))

        if query.get("watch") in ("1", "true"):
            self._watch(handler, query, selected)
        else:
            self._list(handler, query, selected)

    def _list(self, handler: BaseHTTPRequestHandler, query: dict[str, str],
              selected: Callable[[dict[str, Any] | None], bool]) -> None:
        limit = int(query.get("limit") or 0)
        token = query.get("continue")
        with self.cond:
            if token:
                rv_text, _, offset_text = token.partition(":")
                if int(rv_text) < self.compacted_rv:
                    self._send_json(handler, 410, status(410, "Expired",
                                                         "The provided continue parameter is too old"))
                    return
                list_rv, offset = int(rv_text), int(offset_text)
                items = self._snapshot_at(list_rv)
            else:
                list_rv, offset = self.rv, 0
                items = [copy.deepcopy(o) for _, o in sorted(self.objects.items())]
        items = [o for o in items if selected(o)]
        page = items[offset:offset + limit] if limit else items[offset:]
        meta: dict[str, Any] = {"resourceVersion": str(list_rv)}
        if limit and offset + limit < len(items):
            meta["continue"] = f"{list_rv}:{offset + limit}"
        for item in page:
            item.pop("kind", None)
            item.pop("apiVersion", None)
        hook = None
        if "continue" in meta and not token:
            with self.cond:
                hook, self.after_first_page = self.after_first_page, None
        if hook is not None:  # before answering, so the next page surely comes after it
            hook()
        self._send_json(handler, 200, {"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
                                       "metadata": meta, "items": page})

    def _snapshot_at(self, rv: int) -> list[dict[str, Any]]:
        """The store as it was at rv, undoing later history (pagination reads one consistent snapshot)."""
        objects = dict(self.objects)
        for entry_rv, _, after, before in reversed(self.history):
            if entry_rv <= rv:
                break
            key = (after["metadata"]["namespace"], after["metadata"]["name"])
            if before is None:
                objects.pop(key, None)
            else:
                objects[key] = before
        return [copy.deepcopy(o) for _, o in sorted(objects.items())]

    def _watch(self, handler: BaseHTTPRequestHandler, query: dict[str, str],
               selected: Callable[[dict[str, Any] | None], bool]) -> None:
        rv_text = query.get("resourceVersion") or "0"
        bookmarks = query.get("allowWatchBookmarks") in ("1", "true")
        timeout = float(query.get("timeoutSeconds") or 1800)
        deadline = time.monotonic() + timeout
        with self.cond:
            start_rv = int(rv_text)
            too_old = start_rv != 0 and start_rv < self.compacted_rv
            if too_old and self.watch_410_as_http:
                self._send_json(handler, 410, status(410, "Expired", f"too old resource version: {start_rv}"))
                return
            drop_generation = self.drop_generation
            bookmark_generation = self.bookmark_generation
            expire_generation = self.expire_generation
            error_generation = self.error_generation
            if start_rv == 0:  # "any": synthetic ADDED for the current state, then follow
                pending: list[tuple[int, str, dict[str, Any], dict[str, Any] | None]] = [
                    (self.rv, "ADDED", o, None) for _, o in sorted(self.objects.items())]
                position = self.rv
            else:
                pending = []
                position = start_rv
            self.active_watches += 1
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()

        def send(event: dict[str, Any], cut: bool = False) -> None:
            line = json.dumps(event).encode() + b"\n"
            if cut:
                line = line[: len(line) // 2]
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            handler.wfile.flush()
            if self.record_send_times:
                self.watch_sent.append(time.monotonic())

        try:
            if too_old:
                send({"type": "ERROR", "object": status(410, "Expired",
                                                        f"too old resource version: {start_rv} ({self.compacted_rv})")})
                handler.wfile.write(b"0\r\n\r\n")
                return
            next_bookmark = time.monotonic() + (self.bookmark_interval or 1e9)
            while True:
                for _, event_type, after, before in pending:
                    was, now = selected(before), selected(after)
                    if event_type == "DELETED":
                        if was or now:
                            send({"type": "DELETED", "object": after})
                    elif now:
                        send({"type": "ADDED" if not was or event_type == "ADDED" else "MODIFIED",
                              "object": after})
                    elif was:  # left the selector: watchers see a deletion
                        send({"type": "DELETED", "object": after})
                with self.cond:
                    while True:
                        if self.drop_generation != drop_generation:
                            if self.drop_mid_line:
                                send({"type": "MODIFIED", "object": {"metadata": {"name": "x" * 64}}}, cut=True)
                            handler.close_connection = True
                            return
                        if self.error_generation != error_generation:
                            send({"type": "ERROR", "object": self.error_status})
                            handler.wfile.write(b"0\r\n\r\n")
                            return
                        if self.expire_generation != expire_generation:
                            send({"type": "ERROR", "object": status(410, "Expired", "too old resource version")})
                            handler.wfile.write(b"0\r\n\r\n")
                            return
                        first = bisect.bisect_right(self.history, position, key=lambda h: h[0])
                        newer = self.history[first:]
                        if newer:
                            pending = newer
                            position = newer[-1][0]
                            break
                        now_t = time.monotonic()
                        if bookmarks and (self.bookmark_generation != bookmark_generation
                                          or now_t >= next_bookmark):
                            bookmark_generation = self.bookmark_generation
                            next_bookmark = now_t + (self.bookmark_interval or 1e9)
                            send({"type": "BOOKMARK", "object": {
                                "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
                                "metadata": {"resourceVersion": str(self.rv)}}})
                            position = max(position, self.rv)
                        if now_t >= deadline:
                            handler.wfile.write(b"0\r\n\r\n")
                            return
                        self.cond.wait(min(0.5, deadline - now_t, max(0.0, next_bookmark - now_t)) or 0.01)
        except (BrokenPipeError, ConnectionResetError):
            handler.close_connection = True
        finally:
            with self.cond:
                self.active_watches -= 1
