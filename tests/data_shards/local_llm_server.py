"""A small OpenAI-compatible HTTP server for tests: real sockets on 127.0.0.1, deterministic replies.

It serves ``POST /v1/chat/completions`` and ``POST /v1/completions`` from a thread. Replies are a
pure function of the request (``reply(body) -> str``), every request is recorded, and failures
can be scripted: the first ``fail_first`` requests answer ``fail_status`` (with ``Retry-After``
when set), and every request after the first ``fail_after`` answers HTTP 500.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def default_reply(body: dict) -> str:
    """A description built from the request: the annotation's first line and the seed."""
    if "messages" in body:
        content = body["messages"][-1]["content"]
    else:
        content = body["prompt"].split("Annotations:\n", 1)[-1]
    first = content.splitlines()[0] if content else "nothing"
    return f"This protein ({first.split(': ', 1)[-1]}) is described in variant {body.get('seed')}."


@dataclass
class ServerState:
    """What the server does and what it has seen."""

    reply: Callable[[dict], str] = default_reply
    fail_first: int = 0
    fail_status: int = 503
    retry_after: str | None = None
    fail_after: int | None = None
    raw_reply: bytes | None = None  # answer these bytes verbatim (malformed responses)
    cut_first: int = 0  # the first N answers announce more bytes than they send, then hang up
    requests: list[tuple[str, dict]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's naming)
        state: ServerState = self.server.state
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        with state.lock:
            state.requests.append((self.path, body))
            count = len(state.requests)
        if self.path not in ("/v1/chat/completions", "/v1/completions"):
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        if count <= state.fail_first:
            headers = {"Retry-After": state.retry_after} if state.retry_after else {}
            return self._send(state.fail_status, {"error": {"message": "busy"}}, headers)
        if state.fail_after is not None and count > state.fail_after:
            return self._send(500, {"error": {"message": "crashed"}})
        if state.raw_reply is not None:
            return self._send_bytes(200, state.raw_reply)
        if count <= state.cut_first:  # a connection dropped mid-body
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b'{"choices": [')
            self.close_connection = True
            return None
        text = state.reply(body)
        if self.path.endswith("/chat/completions"):
            payload = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
        else:
            payload = {"choices": [{"index": 0, "text": text}]}
        return self._send(200, payload)

    def _send(self, status: int, payload: dict, headers: dict | None = None):
        self._send_bytes(status, json.dumps(payload).encode(), headers)

    def _send_bytes(self, status: int, data: bytes, headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # keep test output quiet
        pass


class LocalLLMServer:
    """Context manager: ``with LocalLLMServer() as server: server.url, server.state.requests``."""

    def __init__(self, state: ServerState | None = None):
        self.state = state or ServerState()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.state = self.state
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> LocalLLMServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
