"""A real CloudEvents sink on loopback for tests: an HTTP server (the standard library's) that keeps each event
it receives, parsed by the cloudevents SDK, with the headers it came with."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from thaw.eventing import events


class EventSink:
    """`received`: (event, headers) in arrival order; `status` is what it answers."""

    def __init__(self, status: int = 202):
        received = self.received = []
        sink = self
        self.status = status

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((events.parse_http_event(dict(self.headers), body), dict(self.headers)))
                self.send_response(sink.status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def events(self) -> list:
        return [event for event, _ in self.received]

    def close(self) -> None:
        self.server.shutdown()
