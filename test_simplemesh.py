"""Tests for simplemesh.py, in the order of its sections.

Pure functions are tested directly; everything else starts real nodes on loopback and sends real HTTP.
Run with ``python3 -m unittest -v`` (stdlib only); the tests that drive external tools (promtool, Prometheus,
Chromium, kubectl, opentelemetry-proto) need what ``.ci/run`` installs and fail, never skip, in CI without them.
"""

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import unittest
from dataclasses import replace

import simplemesh as sm

HERE = os.path.dirname(os.path.abspath(__file__))
IN_CI = os.environ.get("CI") == "true"


# --- Harness: real nodes on loopback -------------------------------------------------------------------------

class Mesh:
    """Nodes started in this process on free loopback ports, resolving each other through one shared PEERS map.

    ``Mesh({"a": {}, "b": {"delay": "1s"}}, max_calls=5)``: node name -> directive defaults; keyword arguments
    become Config fields of every node. Use as a context manager, or call close().
    """

    def __init__(self, nodes, address="127.0.0.1", **config):
        self.peers = {}
        self.servers = {}
        for name, defaults in nodes.items():
            node_config = sm.Config(host=name, port=0, address=address, peers=self.peers,
                                    defaults=dict(defaults), log_level="warning", **config)
            server = sm.Server(sm.Node(node_config))
            self.servers[name] = server
            self.peers[name] = [(address, server.server_address[1])]
        for server in self.servers.values():
            threading.Thread(target=server.serve_forever, daemon=True).start()

    def port(self, name):
        return self.servers[name].server_address[1]

    def node(self, name):
        return self.servers[name].node

    def request(self, name, path, method="GET", body=None, headers=None, timeout=30):
        """(status, headers, parsed JSON or text) of one request to node ``name``."""
        return http_request(self.peers[name][0], path, method, body, headers, timeout)

    def close(self):
        for server in self.servers.values():
            server.shutdown()
            server.server_close()
            server.node.pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def http_request(address, path, method="GET", body=None, headers=None, timeout=30):
    connection = http.client.HTTPConnection(*address, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        answer_headers = {k.lower(): v for k, v in response.getheaders()}
        if "json" in answer_headers.get("content-type", "") and data:
            return response.status, answer_headers, json.loads(data)
        return response.status, answer_headers, data.decode("utf-8", "replace")
    finally:
        connection.close()


def hosts(record):
    """The tree of hosts in a record, as nested lists: {"host": "a", "next_node": [b]} -> ["a", [...]]."""
    return [record["host"], [hosts(child) for child in record.get("next_node", [])]]


def run_cli(*args, env=None, timeout=30, input=None):
    """Run ``python3 -I -S simplemesh.py ARGS`` as the distroless image would (no site-packages)."""
    return subprocess.run([sys.executable, "-I", "-S", os.path.join(HERE, "simplemesh.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, input=input)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port, timeout=10.0, address="127.0.0.1"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((address, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {address}:{port} after {timeout}s")


# --- Configuration --------------------------------------------------------------------------------------------

# --- Route grammar --------------------------------------------------------------------------------------------

# --- Directives -----------------------------------------------------------------------------------------------

# --- Trace context --------------------------------------------------------------------------------------------

# --- Outbound calls -------------------------------------------------------------------------------------------

# --- The answer and its views ---------------------------------------------------------------------------------

# --- Metrics --------------------------------------------------------------------------------------------------

# --- Span export ----------------------------------------------------------------------------------------------

# --- The node over HTTP ---------------------------------------------------------------------------------------

# --- Robustness -----------------------------------------------------------------------------------------------

# --- Command line ---------------------------------------------------------------------------------------------

# --- Packaging ------------------------------------------------------------------------------------------------


if __name__ == "__main__":
    unittest.main()
