"""OTLP/HTTP sink for the bench: accepts POST /v1/traces, discards the body, answers 200 {}.

GET /stats answers {"posts": N, "bytes": M}, so the bench can tell whether spans were really exported.

    python3 otlp_sink.py PORT
"""
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATS = {"posts": 0, "bytes": 0}
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so the sink never makes the exporter reconnect

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        with LOCK:
            STATS["posts"] += 1
            STATS["bytes"] += len(body)
        self.answer(b"{}")

    def do_GET(self):
        with LOCK:
            self.answer(json.dumps(STATS).encode())

    def answer(self, body):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    server.daemon_threads = True
    server.serve_forever()
