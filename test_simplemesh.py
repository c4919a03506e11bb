"""Tests for simplemesh.py, in the order of its sections.

Pure functions are tested directly; everything else starts real nodes on loopback and sends real HTTP.
Run with ``python3 -m unittest -v`` (stdlib only); the tests that drive external tools (promtool, Prometheus,
Chromium, kubectl, opentelemetry-proto) need what ``.ci/run`` installs and fail, never skip, in CI without them.
"""

import concurrent.futures
import http.client
import json
import os
import random
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import unittest
from dataclasses import replace

import simplemesh as sm

HERE = os.path.dirname(os.path.abspath(__file__))
IN_CI = os.environ.get("CI") == "true"


def require_tool(testcase, name, module=False):
    """Skip without ``name`` (a command, or with module=True a Python module); in CI a missing tool is a failure."""
    if module:
        import importlib.util
        found = importlib.util.find_spec(name) is not None
    else:
        import shutil
        found = shutil.which(name) is not None
    if not found:
        if IN_CI:
            testcase.fail(f"{name} is not installed (.ci/run installs it)")
        testcase.skipTest(f"{name} is not installed")


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

class NodeProcess:
    """``python3 -I -S simplemesh.py ARGS`` as a real process, its stdout and stderr kept for reading afterwards."""

    def __init__(self, *args, env, port):
        import tempfile
        self.out, self.err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.join(HERE, "simplemesh.py"), *args],
            env={"PATH": os.environ.get("PATH", "/usr/bin"), **env}, stdout=self.out, stderr=self.err)
        self.port = port
        try:
            wait_for_port(port)
        except AssertionError:
            self.process.kill()
            raise

    def logs(self):
        """(stdout, stderr) so far."""
        for stream in (self.out, self.err):
            stream.seek(0)
        return self.out.read().decode("utf-8", "replace"), self.err.read().decode("utf-8", "replace")

    def stop(self, signum=None, timeout=10):
        """Send ``signum`` (SIGTERM by default) and wait: the exit status."""
        import signal
        self.process.send_signal(signum or signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self.out.close()
        self.err.close()


def raw_exchange(port, data, timeout=5.0, half_close=True):
    """Send raw bytes, then read until the node closes: (status or None, headers, body bytes, seconds taken).

    The client half-closes after sending, so a request the node is still waiting on ends at once (EOF), and a
    node that hangs shows as a timeout here.
    """
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the node answered and closed before reading everything (a 413, a 431)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    answer = b"".join(chunks)
    seconds = time.monotonic() - started
    if not answer:
        return None, {}, b"", seconds
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body[:int(headers.get("content-length", len(body)))], seconds


def fuzz_requests(rng, count):
    """``count`` malformed (and some well-formed) raw requests, with a label saying what kind each is."""
    route_tokens = ["a", "b", "c", "/", "/", "~", "(", ")", ";delay=1ms", ";error=0.5", ";status=503", ";bogus",
                    ";delay=", ";size=1k", ";timeout=1s", ";cpu=1ms", ";parallel", ";headers", ":9", ":99999",
                    ":", "%", "%zz", "%ff", "%0d%0a", "%00", "%2f", "%7e", "..", ".", "-", "A", "127.0.0.1",
                    "0x7f000001", "x" * 70, "é", "\t", " ", "?", "#", "&", "=", "metrics", "-/defaults", "\\"]
    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "get", "TRACE", "CONNECT", "G\x00T",
               "", "BREW", "GET GET"]
    base = b"GET /a/b?delay=1ms HTTP/1.1\r\nHost: a\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-" \
           b"00f067aa0ba902b7-01\r\nContent-Length: 4\r\n\r\nbody"
    for index in range(count):
        kind = index % 8
        if kind == 0:  # routes from the grammar's pieces, good and bad
            route = "".join(rng.choice(route_tokens) for _ in range(rng.randint(0, 25)))
            yield "route", f"GET /{route} HTTP/1.1\r\nHost: a\r\n\r\n".encode("utf-8")
        elif kind == 1:  # query-string directives with random keys and values
            query = "&".join(rng.choice(["delay", "error", "status", "reset", "size", "cpu", "timeout", "parallel",
                                         "headers", "view", "x", ""]) + rng.choice(["", "="]) +
                             "".join(rng.choice("0123456789.:,ms-kKgx%~ \x00é") for _ in range(rng.randint(0, 8)))
                             for _ in range(rng.randint(1, 4)))
            yield "query", f"GET /b?{query} HTTP/1.1\r\n\r\n".encode("utf-8")
        elif kind == 2:  # header names and values of any bytes, or too many, or too long
            choice = rng.random()
            if choice < 0.1:
                headers = b"".join(b"x-h%d: v\r\n" % n for n in range(rng.randint(95, 110)))
            elif choice < 0.2:
                headers = b"x-long: " + b"v" * rng.randint(16 * 1024 - 20, 16 * 1024 + 20) + b"\r\n"
            else:
                name = bytes(rng.choice(b"abcXYZ-_:; \t\x00\x7f\xff") for _ in range(rng.randint(0, 8)))
                value = bytes(rng.randrange(256) for _ in range(rng.randint(0, 12)))
                headers = rng.choice([b"x-request-id", b"traceparent", b"b3", b"baggage", name]) + b": " + \
                    value.replace(b"\n", b"\r") + b"\r\n"
            yield "header", b"GET /b HTTP/1.1\r\n" + headers + b"\r\n"
        elif kind == 3:  # methods and protocol versions
            method = rng.choice(methods)
            version = rng.choice(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 ", "http/1.1", "", "FOO"])
            yield "method", f"{method} /b {version}\r\n\r\n".encode("utf-8")
        elif kind == 4:  # bodies: lengths that lie, are huge, negative, or chunked
            length = rng.choice(["0", "3", "10", "-1", "abc", "1048577", "9" * 30, "4, 4", "²", " 3"])
            extra = rng.choice([b"", b"Transfer-Encoding: chunked\r\n", b"Content-Length: 3\r\n"])
            yield "body", (f"POST /b HTTP/1.1\r\nContent-Length: {length}\r\n".encode("utf-8") + extra +
                           b"\r\nabc")
        elif kind == 5:  # a valid request with random bytes replaced, inserted or removed
            data = bytearray(base)
            for _ in range(rng.randint(1, 6)):
                position = rng.randrange(len(data))
                operation = rng.random()
                if operation < 0.4:
                    data[position] = rng.randrange(256)
                elif operation < 0.7:
                    data.insert(position, rng.randrange(256))
                else:
                    del data[position]
            yield "mutation", bytes(data)
        elif kind == 6:  # enormous fan-outs, depths and nesting
            size = rng.randint(100, 4000)
            route = rng.choice(["a~" * size + "a", "a/" * size, "(" * size + "a" + ")" * size,
                                "(a~b)/" * (size // 6), "a;delay=1ms" * (size // 10), "b:" + "1" * size])
            yield "enormous", f"GET /{route} HTTP/1.1\r\n\r\n".encode("utf-8")
        else:  # raw bytes, not HTTP at all
            yield "bytes", bytes(rng.randrange(256) for _ in range(rng.randint(1, 80)))


def fuzz_config(port):
    """A node whose every directive is capped small, that may call a, b and c (itself) and nobody else."""
    return {"HOST": "a", "PORT": str(port), "ADDRESS": "127.0.0.1",
            "PEERS": f"a=127.0.0.1:{port},b=127.0.0.1:{port},c=127.0.0.1:{port}",
            "ALLOWED_HOSTS": "a,b,c", "MAX_DELAY": "20ms", "MAX_CPU": "5ms", "MAX_SIZE": "20k", "MAX_CALLS": "8",
            "MAX_TIMEOUT": "2s", "UPSTREAM_TIMEOUT": "2s", "KEEPALIVE_TIMEOUT": "2s", "LOG_FORMAT": "json"}


def failure_origins(record):
    """The statuses of the failed records in a tree whose own calls all succeeded: where failures began."""
    failed = [child for child in record.get("next_node", []) if child.get("status", 200) >= 400]
    if not failed:
        return [record.get("status")] if record.get("status", 200) >= 400 else []
    return [code for child in failed for code in failure_origins(child)]


class RobustFuzzLiveNodeTest(unittest.TestCase):
    """SPEC 8: thousands of malformed requests to a live node: a 4xx JSON error or a correct answer, never an
    unasked-for 500, never a traceback, never a hang; and the node still serves afterwards."""

    COUNT = int(os.environ.get("FUZZ_COUNT", "2400"))

    def test_fuzzed_requests(self):
        port = free_port()
        node = NodeProcess("serve", env=fuzz_config(port), port=port)
        self.addCleanup(node.kill)
        rng = random.Random(20261125)
        kinds = {}
        slowest = 0.0
        inputs = list(fuzz_requests(rng, self.COUNT))
        with concurrent.futures.ThreadPoolExecutor(8) as pool:  # several at once, as a node gets them
            answers = list(pool.map(lambda item: raw_exchange(port, item[1]), inputs))
        for (kind, data), (status, headers, body, seconds) in zip(inputs, answers):
            slowest = max(slowest, seconds)
            kinds[kind] = kinds.get(kind, 0) + 1
            text = data.decode("latin-1")
            asked_to_fail = any(word in text for word in ("status", "error", "reset"))
            with self.subTest(kind=kind, request=text[:200]):
                self.assertLess(seconds, 3.0, "the node hung")
                if status is None:  # closed without an answer: only for a request that never ended or a reset
                    continue
                if status >= 400:
                    self.assertEqual(headers.get("content-type"), "application/json")
                    self.assertIn("error", json.loads(body))
                if status >= 500 and status not in (501, 505) and not asked_to_fail:
                    origins = failure_origins(json.loads(body))  # a 502 passing on a refusal below is fine
                    self.assertTrue(origins and all(400 <= code < 500 for code in origins),
                                    f"{status} that no directive asked for: {body[:300]!r}")
        status, _headers, answer = http_request(("127.0.0.1", port), "/b/c")
        self.assertEqual((status, hosts(answer)), (200, ["a", [["a", [["a", []]]]]]))
        self.assertEqual(node.stop(), 0)
        out, err = node.logs()
        self.assertNotIn("Traceback", err)
        self.assertEqual(err.strip(), "")
        errors = [line for line in out.splitlines() if '"level": "error"' in line]
        self.assertEqual(errors, [])
        for line in out.splitlines():  # every log line is one JSON object: no input forged a line
            json.loads(line)
        print(f"\nfuzz: {sum(kinds.values())} requests {kinds}, slowest {slowest:.3f}s", file=sys.stderr)

    def test_no_input_forges_a_text_log_line(self):
        port = free_port()
        node = NodeProcess("serve", env={**fuzz_config(port), "LOG_FORMAT": "text"}, port=port)
        self.addCleanup(node.kill)
        for path in ("/%0d%0a2026-01-01T00:00:00Z%20forged%20method=GET", "/b%0a", "/%1b[31mred"):
            self.assertEqual(http_request(("127.0.0.1", port), path)[0], 400)
        self.assertEqual(node.stop(), 0)
        lines = node.logs()[0].splitlines()
        self.assertEqual(len(lines), 4, lines)  # the start-up line and one per request
        self.assertTrue(all(line.isprintable() for line in lines), lines)
        self.assertIn("path='/\\r\\n2026-01-01T00:00:00Z forged method=GET'", lines[1])


class RobustInternalErrorTest(unittest.TestCase):
    """A bug answers 500 with a JSON error and one log line saying where; the connection keeps serving."""

    def test_an_exception_is_a_500_and_one_log_line(self):
        import tempfile
        with Mesh({"a": {}}) as mesh, tempfile.TemporaryFile() as log:
            node = mesh.node("a")

            def broken(request):
                raise KeyError("bug")

            node.serve = broken
            saved = os.dup(1)
            os.dup2(log.fileno(), 1)
            try:
                connection = http.client.HTTPConnection("127.0.0.1", mesh.port("a"), timeout=5)
                connection.request("GET", "/b")
                response = connection.getresponse()
                answer = json.loads(response.read())
                connection.request("GET", "/healthz")
                health = connection.getresponse()
                health.read()
                connection.close()
            finally:
                os.dup2(saved, 1)
                os.close(saved)
            self.assertEqual((response.status, answer["error"]), (500, "internal error: KeyError: 'bug'"))
            self.assertEqual(health.status, 200)
            log.seek(0)
            lines = log.read().decode().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertRegex(lines[0], r"level=error error=\"KeyError: 'bug'\" at=test_simplemesh.py:\d+")


class RobustParsingTest(unittest.TestCase):
    """The pure parsers against what the fuzzers found."""

    def test_route_size_on_thousands_of_steps_is_no_deep_recursion(self):
        steps = sm.parse_route("/" + "a/" * 5000)
        calls, depth = sm.route_size(steps, 100, 16)
        self.assertGreater(depth, 16)
        self.assertEqual(sm.route_size(sm.parse_route("/b/c/d"), 100, 2)[1], 3)  # a lower bound still refuses
        self.assertEqual(sm.route_size(sm.parse_route("/b~c/d~e/f"), 100, 16), (10, 3))

    def test_directive_text_that_would_break_the_next_url_is_refused_where_it_is(self):
        for route, char, position in (("/b;delay=\r\n1s/c", "\r", 9), ("/b;delay= 1s", " ", 9),
                                      ("/b;delay=\u0661s", "\u0661", 9), ("/b;status=503\x00", "\x00", 13)):
            with self.subTest(route=route), self.assertRaises(sm.RouteError) as caught:
                sm.parse_route(route)
            self.assertIn(repr(char), caught.exception.message)
            self.assertEqual(caught.exception.position, position)

    def test_ports_are_ascii_digits_and_short(self):
        for route in ("/b:" + "1" * 5000, "/b:\u0661\u0662", "/b:0", "/b:65536"):
            with self.subTest(route=route[:12]), self.assertRaises(sm.RouteError):
                sm.parse_route(route)
        self.assertEqual(sm.parse_route("/b:65535")[0][0].port, 65535)

    def test_any_text_parses_to_a_route_that_formats_as_plain_url_text(self):
        require_tool(self, "hypothesis", module=True)
        from hypothesis import given, settings, strategies as st
        pieces = st.sampled_from(["a", "b", "/", "~", "(", ")", ";delay=1s", ";error=0.5", ":80", ";x", "%",
                                  "\r", "\n", " ", "\x00", "\u0661", "é", ";status=503", "="])

        @settings(max_examples=1500, deadline=None, database=None)
        @given(st.one_of(st.lists(pieces, max_size=30).map("".join), st.text(max_size=40)))
        def check(text):
            try:
                steps = sm.parse_route("/" + text)
            except sm.RouteError as error:
                self.assertIsInstance(error.position, int)
                return
            formatted = sm.format_route(steps)
            self.assertIsNone(sm.NOT_URL_TEXT_RE.search(formatted), formatted)
            self.assertEqual(sm.parse_route("/" + formatted), steps)
            sm.route_size(steps, 100, 16)

        check()


class BadPeer:
    """A TCP peer that misbehaves on purpose: ``behaviour(sock)`` runs for every connection after its request
    arrived. Not a simplemesh node: a dead, slow, rude or broken upstream."""

    def __init__(self, behaviour):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.behaviour = behaviour
        self.connections = []
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(sock)
            threading.Thread(target=self.serve, args=(sock,), daemon=True).start()

    def serve(self, sock):
        try:
            sock.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                data += chunk
            self.behaviour(sock)
        except OSError:
            pass

    def close(self):
        self.listener.close()
        for sock in self.connections:
            sock.close()


def answer_bytes(body, content_type="application/json", length=None):
    length = len(body) if length is None else length
    return (f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n").encode() + body


class RobustDeadAndSlowPeerTest(unittest.TestCase):
    """SPEC 3, 8: whatever a peer does, the caller answers within its timeout and the failure is in the tree."""

    def call_through(self, behaviour, route="/p?timeout=500ms", **config):
        peer = BadPeer(behaviour)
        self.addCleanup(peer.close)
        with Mesh({"a": {}}, **config) as mesh:
            mesh.peers["p"] = [("127.0.0.1", peer.port)]
            started = time.monotonic()
            status, _headers, answer = mesh.request("a", route, timeout=10)
            return status, answer["next_node"][0], time.monotonic() - started

    def test_refused(self):
        port = free_port()
        with Mesh({"a": {}}) as mesh:
            mesh.peers["p"] = [("127.0.0.1", port)]
            status, _headers, answer = mesh.request("a", "/p")
        self.assertEqual((status, answer["next_node"][0]["status"]), (502, 502))
        self.assertEqual(answer["next_node"][0]["error"], "connection refused")

    def test_never_answers(self):
        status, child, seconds = self.call_through(lambda sock: time.sleep(5))
        self.assertEqual((status, child["status"], child["error"]), (504, 504, "timeout after 0.5s"))
        self.assertLess(seconds, 1.0)

    def test_a_peer_trickling_bytes_is_cut_at_the_total_timeout(self):
        def trickle(sock):
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
            for _ in range(100):  # each byte well inside the timeout, the whole answer far beyond it
                sock.sendall(b"X-Slow: 1\r\n")
                time.sleep(0.1)

        status, child, seconds = self.call_through(trickle)
        self.assertEqual((status, child["status"]), (504, 504))
        self.assertLess(seconds, 0.9)

    def test_a_slow_body_is_cut_at_the_total_timeout(self):
        def slow_body(sock):
            sock.sendall(answer_bytes(b"", length=1000))
            for _ in range(100):
                sock.sendall(b" ")
                time.sleep(0.1)

        status, child, seconds = self.call_through(slow_body)
        self.assertEqual((status, child["status"]), (504, 504))
        self.assertLess(seconds, 0.9)

    def test_reset_mid_answer(self):
        def reset(sock):
            sock.sendall(answer_bytes(b'{"host": "p", "sta', length=500))
            time.sleep(0.05)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()

        status, child, _seconds = self.call_through(reset)
        self.assertEqual((status, child["status"]), (502, 502))
        self.assertRegex(child["error"], r"mid-answer|reset")

    def test_garbage(self):
        for garbage in (b"hello there\r\n\r\n", b"\x00\xff" * 100, b"HTTP/1.1 abc\r\n\r\n",
                        b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * 70000 + b"\r\n\r\n"):
            with self.subTest(garbage=garbage[:20]):
                status, child, _seconds = self.call_through(lambda sock: (sock.sendall(garbage), sock.close()))
                self.assertEqual((status, child["status"]), (502, 502))
                self.assertIn("error", child)

    def test_json_nested_too_deep_is_no_crash(self):
        deep = b"[" * 100000 + b"]" * 100000
        status, child, _seconds = self.call_through(lambda sock: sock.sendall(answer_bytes(deep)))
        self.assertEqual(status, 200)  # a 200 that is not a simplemesh answer: recorded, not a failure
        self.assertIn("without a simplemesh answer", child["error"])

    def test_upstream_answer_size_at_and_above_the_cap(self):
        body = json.dumps({"host": "p", "status": 200, "pad": "x" * 1000}).encode()
        for cap, expected in ((len(body), 200), (len(body) - 1, 502)):
            with self.subTest(cap=cap):
                status, child, _s = self.call_through(lambda sock: sock.sendall(answer_bytes(body)),
                                                      max_upstream_body=cap)
                self.assertEqual((status, child["status"]), (expected, expected))
                if expected == 502:
                    self.assertIn("MAX_UPSTREAM_BODY", child["error"])
        # without a Content-Length (read to the close), the cap holds too
        status, child, _s = self.call_through(
            lambda sock: (sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + body),
                          sock.close()), max_upstream_body=len(body) - 1)
        self.assertIn("MAX_UPSTREAM_BODY", child["error"])

    def test_pool_recovers_when_a_peer_comes_back(self):
        port = free_port()
        env = {"HOST": "p", "PORT": str(port), "ADDRESS": "127.0.0.1"}
        with Mesh({"a": {}}) as mesh:
            mesh.peers["p"] = [("127.0.0.1", port)]
            peer = NodeProcess("serve", env=env, port=port)
            self.addCleanup(peer.kill)
            self.assertEqual(mesh.request("a", "/p")[0], 200)
            self.assertEqual(len(mesh.node("a").pool.idle[("127.0.0.1", port)]), 1)
            peer.kill()  # its pooled connection dies with it
            peer = NodeProcess("serve", env=env, port=port)
            self.addCleanup(peer.kill)
            self.assertEqual(mesh.request("a", "/p")[0], 200, "a dead pooled connection was reused")
            peer.kill()
            status, _h, answer = mesh.request("a", "/p")
            self.assertEqual((status, answer["next_node"][0]["error"]), (502, "connection refused"))
            peer = NodeProcess("serve", env=env, port=port)
            self.addCleanup(peer.kill)
            for _ in range(3):
                self.assertEqual(mesh.request("a", "/p")[0], 200)


class RobustLimitsTest(unittest.TestCase):
    """SPEC 8: every limit, at and beyond it."""

    def test_max_concurrency_answers_503_with_retry_after(self):
        with Mesh({"a": {}}, max_concurrency=2) as mesh:
            results = []
            threads = [threading.Thread(target=lambda: results.append(mesh.request("a", "/?delay=300ms")[0]))
                       for _ in range(2)]
            for thread in threads:
                thread.start()
            time.sleep(0.1)
            status, headers, answer = mesh.request("a", "/")
            for thread in threads:
                thread.join()
            self.assertEqual(results, [200, 200])  # at the limit
            self.assertEqual((status, headers.get("retry-after")), (503, "1"))  # beyond it
            self.assertIn("MAX_CONCURRENCY=2", answer["error"])
            self.assertEqual(mesh.request("a", "/")[0], 200)  # and the slot is free again

    def test_max_body(self):
        with Mesh({"a": {}}, max_body=100) as mesh:
            self.assertEqual(mesh.request("a", "/", "POST", b"x" * 100)[0], 200)
            status, _headers, answer = mesh.request("a", "/", "POST", b"x" * 101)
            self.assertEqual(status, 413)
            self.assertIn("MAX_BODY=100", answer["error"])

    def test_idle_keepalive_connections_time_out_and_free_their_threads(self):
        with Mesh({"a": {}}, keepalive_timeout=0.3) as mesh:
            before = threading.active_count()
            socks = []
            for index in range(20):
                sock = socket.create_connection(("127.0.0.1", mesh.port("a")), timeout=5)
                socks.append(sock)
                if index % 2:  # half idle after an answer, half stuck mid-request-line (slowloris)
                    sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
                    self.assertTrue(sock.recv(65536).startswith(b"HTTP/1.1 200"))
                else:
                    sock.sendall(b"GET /")
            time.sleep(0.2)
            self.assertGreaterEqual(threading.active_count(), before + 20)
            time.sleep(0.5)
            for sock in socks:
                self.assertEqual(sock.recv(65536), b"", "the node kept an idle connection open")
                sock.close()
            deadline = time.monotonic() + 2
            while threading.active_count() > before and time.monotonic() < deadline:
                time.sleep(0.02)
            self.assertLessEqual(threading.active_count(), before)

    def test_a_client_trickling_its_request_is_cut_at_the_keepalive_timeout(self):
        with Mesh({"a": {}}, keepalive_timeout=0.5) as mesh:
            for head, trickle in ((b"GET / HTTP/1.1\r\n", b"x-slow: 1\r\n"),
                                  (b"POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\n", b"x")):
                with self.subTest(trickle=trickle), \
                        socket.create_connection(("127.0.0.1", mesh.port("a")), timeout=5) as sock:
                    started = time.monotonic()
                    sock.sendall(head)
                    with self.assertRaises(OSError):  # every byte inside the timeout, the whole far beyond
                        for _ in range(30):
                            time.sleep(0.1)
                            sock.sendall(trickle)
                            if select.select([sock], [], [], 0)[0] and sock.recv(1) == b"":
                                raise ConnectionResetError("closed")
                    self.assertLess(time.monotonic() - started, 1.0)

    def test_header_limits(self):
        with Mesh({"a": {}}) as mesh:
            port = mesh.port("a")
            many = b"".join(b"x-h%d: v\r\n" % n for n in range(sm.MAX_HEADERS))
            self.assertEqual(raw_exchange(port, b"GET / HTTP/1.1\r\n" + many + b"\r\n")[0], 200)
            self.assertEqual(raw_exchange(port, b"GET / HTTP/1.1\r\n" + many + b"x: y\r\n\r\n")[0], 431)
            line = b"x: " + b"v" * (sm.MAX_HEADER_LINE - 5) + b"\r\n"
            self.assertEqual(raw_exchange(port, b"GET / HTTP/1.1\r\n" + line + b"\r\n")[0], 200)
            self.assertEqual(raw_exchange(port, b"GET / HTTP/1.1\r\nx" + line + b"\r\n")[0], 431)
            target = b"/" + b"a" * (sm.MAX_REQUEST_LINE - 16)
            self.assertEqual(raw_exchange(port, b"GET " + target + b" HTTP/1.1\r\n\r\n")[0], 400)  # bad name
            self.assertEqual(raw_exchange(port, b"GET " + target + b"aa HTTP/1.1\r\n\r\n")[0], 414)

    def test_directive_caps_and_route_limits(self):
        with Mesh({"a": {}, "b": {}}, max_delay=0.05, max_size=2048, max_cpu=0.01, max_timeout=1.0,
                  max_calls=4, max_depth=3) as mesh:
            for path, status, rule in (
                    ("/?delay=50ms", 200, None), ("/?delay=51ms", 400, "MAX_DELAY"),
                    ("/?delay=1ms..51ms", 400, "MAX_DELAY"), ("/?delay=1ms:0.5,1s:0.5", 400, "MAX_DELAY"),
                    ("/?size=2k", 200, None), ("/?size=2049", 400, "MAX_SIZE"),
                    ("/?cpu=10ms", 200, None), ("/?cpu=11ms", 400, "MAX_CPU"),
                    ("/?timeout=1s", 200, None), ("/?timeout=1001ms", 400, "MAX_TIMEOUT"),
                    ("/b;delay=51ms", 502, "MAX_DELAY"),  # b refuses its hop's directive; a records it
                    ("/b~b~b~b", 200, None), ("/b~b~b~b~b", 400, "MAX_CALLS"),
                    ("/b/b/b", 200, None), ("/b/b/b/b", 400, "MAX_DEPTH")):
                with self.subTest(path=path):
                    got, _headers, answer = mesh.request("a", path)
                    self.assertEqual(got, status, answer)
                    if rule:
                        self.assertIn(rule, json.dumps(answer))


class RobustOutboundSafetyTest(unittest.TestCase):
    """SPEC 8: a node is no open proxy. Refusals are 403 JSON errors that name the rule, and nothing is called."""

    def test_ip_literal_targets(self):
        with Mesh({"a": {}}) as mesh:
            port = mesh.port("a")
            for target in ("127.0.0.1", "127.1", "0x7f000001", "10.0.0.1", "2130706433"):
                with self.subTest(target=target):
                    status, _headers, answer = mesh.request("a", f"/{target}:{port}")
                    self.assertEqual((status, answer["rule"]), (403, "ALLOW_IP_TARGETS"))
                    self.assertNotIn("next_node", answer)
        with Mesh({"a": {}}, allow_ip_targets=True) as mesh:
            status, _headers, answer = mesh.request("a", f"/127.0.0.1:{mesh.port('a')}")
            self.assertEqual((status, answer["next_node"][0]["host"]), (200, "a"))

    def test_allowed_hosts_globs(self):
        with Mesh({"a": {}, "b1": {}, "b2": {}, "c": {}, "d": {}}, allowed_hosts=("b*", "c")) as mesh:
            self.assertEqual(mesh.request("a", "/b1~b2/c")[0], 200)
            for path in ("/d", "/b1~d", "/(c/b1)~d"):
                with self.subTest(path=path):
                    status, _headers, answer = mesh.request("a", path)
                    self.assertEqual((status, answer["rule"], answer["target"]), (403, "ALLOWED_HOSTS", "d"))
            status, _headers, answer = mesh.request("a", "/b1/d")  # b1 refuses its own call to d
            self.assertEqual((status, answer["next_node"][0]["status"]), (502, 403))
            self.assertEqual(mesh.node("d").metrics.requests, {})

    def test_allow_directives_false(self):
        with Mesh({"a": {}}, allow_directives=False) as mesh:
            self.assertEqual(mesh.request("a", "/")[0], 200)
            status, _headers, answer = mesh.request("a", "/?error=1")
            self.assertEqual((status, answer["rule"]), (403, "ALLOW_DIRECTIVES"))

    def test_inbound_values_cannot_inject_header_lines_downstream(self):
        seen = []

        def record(sock):
            seen.append(sock)
            sock.sendall(answer_bytes(b'{"host": "p", "status": 200}'))

        peer = BadPeer(record)
        self.addCleanup(peer.close)
        with Mesh({"a": {}}, forward_headers=("end-user",)) as mesh:
            mesh.peers["p"] = [("127.0.0.1", peer.port)]
            port = mesh.port("a")
            for request in (b"GET /p HTTP/1.1\r\nx-request-id: a\rInjected: 1\r\n\r\n",
                            b"GET /p HTTP/1.1\r\nend-user: a\x00b\r\n\r\n",
                            b"GET /p HTTP/1.1\r\nbaggage: a\r\n injected: 1\r\n\r\n",
                            b"GET /p;delay=%0d%0aInjected:1 HTTP/1.1\r\n\r\n",
                            b"GET /p%0d%0aInjected:%201 HTTP/1.1\r\n\r\n"):
                with self.subTest(request=request):
                    self.assertEqual(raw_exchange(port, request)[0], 400)
            self.assertEqual(seen, [], "a request with a control character reached the peer")
            self.assertEqual(raw_exchange(port, b"GET /p HTTP/1.1\r\nend-user: j\xe9 \t x\r\n\r\n")[0], 200)


class RobustShutdownTest(unittest.TestCase):
    """SPEC 8: SIGTERM and SIGINT drain: not ready at once, no new connections after SHUTDOWN_DELAY, in-flight
    requests finish (a delay included), on_stop hooks run after the drain, exit 0 within the grace period."""

    def drain(self, args, env, port, path, signum):
        process = NodeProcess(*args, env=env, port=port)
        self.addCleanup(process.kill)
        results = {}

        def slow():
            results["slow"] = http_request(("127.0.0.1", port), path, timeout=10)

        thread = threading.Thread(target=slow)
        thread.start()
        time.sleep(0.3)  # the request is mid-delay
        signalled = time.monotonic()
        process.process.send_signal(signum)
        time.sleep(0.1)
        results["ready"] = http_request(("127.0.0.1", port), "/readyz")[0]
        results["during_delay"] = http_request(("127.0.0.1", port), "/")[0]
        time.sleep(0.5)  # SHUTDOWN_DELAY is over: the listener is closed
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        thread.join()
        status = process.process.wait(10)
        return status, results, time.monotonic() - signalled, process.logs()

    def test_serve_drains_on_sigterm_and_sigint(self):
        import signal
        for signum in (signal.SIGTERM, signal.SIGINT):
            with self.subTest(signal=signum.name):
                port = free_port()
                env = {"HOST": "a", "PORT": str(port), "ADDRESS": "127.0.0.1", "SHUTDOWN_DELAY": "0.3"}
                status, results, seconds, (_out, err) = self.drain(("serve",), env, port, "/?delay=1500ms", signum)
                self.assertEqual(status, 0, err)
                self.assertEqual((results["ready"], results["during_delay"]), (503, 200))
                slow_status, _headers, answer = results["slow"]
                self.assertEqual((slow_status, answer["delay"]), (200, 1.5))
                self.assertLess(seconds, 2.5)
                self.assertEqual(err, "")

    def test_mesh_drains_a_chain_in_flight(self):
        import signal
        port = free_port()
        while any(not port_is_free(port + n) for n in range(1, 3)):
            port = free_port()
        env = {"SHUTDOWN_DELAY": "0.3"}
        status, results, _seconds, (_out, err) = self.drain(
            ("mesh", "--port", str(port), "a", "b"), env, port, "/a;delay=2500ms/b", signal.SIGTERM)
        self.assertEqual(status, 0, err)
        slow_status, _headers, answer = results["slow"]
        self.assertEqual((slow_status, hosts(answer)), (200, ["gateway", [["a", [["b", []]]]]]))
        self.assertEqual(err, "")

    def test_grace_period_bounds_the_drain(self):
        import signal
        port = free_port()
        env = {"HOST": "a", "PORT": str(port), "ADDRESS": "127.0.0.1", "SHUTDOWN_GRACE": "0.5"}
        process = NodeProcess("serve", env=env, port=port)
        self.addCleanup(process.kill)
        threading.Thread(target=lambda: raw_exchange(port, b"GET /?delay=10s HTTP/1.1\r\n\r\n", timeout=15),
                         daemon=True).start()
        time.sleep(0.2)
        started = time.monotonic()
        self.assertEqual(process.stop(signal.SIGTERM), 0)
        self.assertLess(time.monotonic() - started, 2.0)

    def test_on_stop_hooks_run_after_the_drain(self):
        stop = threading.Event()
        config = sm.Config(host="a", port=0, address="127.0.0.1", log_level="warning", shutdown_delay=0.1)
        server = sm.start_node(config)
        events = []
        server.node.on_stop.append(lambda: events.append(("hook", server.node.metrics.in_flight)))
        port = server.server_address[1]
        client = threading.Thread(target=lambda: events.append(
            ("answer", http_request(("127.0.0.1", port), "/?delay=400ms")[0])))
        client.start()
        time.sleep(0.1)
        stop.set()
        sm.wait_for_stop([server], stop)
        client.join()
        self.assertEqual(events, [("answer", 200), ("hook", 0)])

    def test_keepalive_clients_are_told_to_close_while_draining(self):
        stop = threading.Event()
        config = sm.Config(host="a", port=0, address="127.0.0.1", log_level="warning", shutdown_delay=0.3)
        server = sm.start_node(config)
        connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=5)
        connection.request("GET", "/")
        response = connection.getresponse()
        response.read()
        self.assertIsNone(response.getheader("connection"))
        drainer = threading.Thread(target=sm.wait_for_stop, args=([server], stop))
        drainer.start()
        stop.set()
        time.sleep(0.1)
        connection.request("GET", "/")
        response = connection.getresponse()
        response.read()
        self.assertEqual((response.status, response.getheader("connection")), (200, "close"))
        connection.close()
        drainer.join(5)
        self.assertFalse(drainer.is_alive())


def port_is_free(port):
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def process_status(pid):
    """(threads, resident bytes) of a process, from /proc."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            fields[name] = value.split()
    return int(fields["Threads"][0]), int(fields["VmRSS"][0]) * 1024


class RobustSoakTest(unittest.TestCase):
    """SPEC 8 under load: 200 concurrent keep-alive connections (wrk) on a three-node mesh for SOAK_SECONDS
    (60 in CI, 12 locally by default, 10 at least): no unexpected errors, threads and memory flat after the
    warm-up (the first quarter, at least 5 s: connection pools grow to the load's concurrency, then stay)."""

    SECONDS = max(10.0, float(os.environ.get("SOAK_SECONDS", "60" if IN_CI else "12")))

    def test_soak(self):
        require_tool(self, "wrk")
        port = free_port()
        while any(not port_is_free(port + n) for n in range(1, 3)):
            port = free_port()
        mesh = NodeProcess("mesh", "--port", str(port), "a", "b", env={"LOG_LEVEL": "warning"}, port=port)
        self.addCleanup(mesh.kill)
        warmup = max(5.0, self.SECONDS / 4)
        idle = process_status(mesh.process.pid)
        wrk = subprocess.Popen(["wrk", "-t2", "-c200", f"-d{self.SECONDS:g}s", "--timeout", "10s", "--latency",
                                f"http://127.0.0.1:{port}/a/b"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        self.addCleanup(lambda: wrk.poll() is None and wrk.kill())
        time.sleep(warmup)
        samples = [process_status(mesh.process.pid)]
        while wrk.poll() is None:
            time.sleep(min(1.0, self.SECONDS / 10))
            if wrk.poll() is None:
                samples.append(process_status(mesh.process.pid))
        out, err = wrk.communicate()
        self.assertEqual(wrk.returncode, 0, err)
        requests = int(re.search(r"(\d+) requests in", out).group(1))
        self.assertNotIn("Non-2xx", out)
        self.assertNotIn("Socket errors", out)
        self.assertGreater(requests, 100 * self.SECONDS)
        threads = [t for t, _rss in samples]
        rss = [r for _t, r in samples]
        # A thread per connection per hop and no more (a leak of one per request would pass this in a second);
        # pools may still grow a little after the warm-up, when a rare peak of concurrency reaches a hop.
        self.assertLessEqual(max(threads), 3 * 200 + 20, threads)
        self.assertLessEqual(threads[-1] - threads[0], 60, threads)
        self.assertLessEqual(rss[-1] - rss[0], max(16 << 20, rss[0] // 5), rss)
        self.assertEqual(http_request(("127.0.0.1", port), "/a/b")[0], 200)
        self.assertEqual(mesh.stop(), 0)
        _out, mesh_err = mesh.logs()
        self.assertEqual(mesh_err, "")
        latency = re.search(r"99%\s+(\S+)", out).group(1)
        print(f"\nsoak: {requests} requests in {self.SECONDS:g}s at 200 connections, p99 {latency}; idle "
              f"{idle[0]} threads, {idle[1] >> 20} MiB; after warm-up {threads[0]} -> {threads[-1]} threads "
              f"(max {max(threads)}), RSS {rss[0] >> 20} -> {rss[-1] >> 20} MiB (max {max(rss) >> 20})",
              file=sys.stderr)


# --- Command line ---------------------------------------------------------------------------------------------

# --- Packaging ------------------------------------------------------------------------------------------------


if __name__ == "__main__":
    unittest.main()
