"""Tests for simplemesh.py, in the order of its sections.

Pure functions are tested directly; everything else starts real nodes on loopback and sends real HTTP.
Run with ``python3 -m unittest -v`` (stdlib only); the tests that drive external tools (promtool, Prometheus,
Chromium, kubectl, opentelemetry-proto) need what ``.ci/run`` installs and fail, never skip, in CI without them.

Layout: the harness first (every helper class and function: nodes, peers, sockets, tools), then the module's
shape (issue 16's rules, ModuleShapeTest), then one banner per section of the module (shared utilities, the
HTTP/1.1 wire, directives, route, budgets, trace context, outbound client, the node, views, metrics, spans,
configuration, gateway, server, manifests, command line), then the end-to-end ``Robust*`` classes in the same order.
Test classes are named ``<Section><Topic>Test`` (``RouteGrammarTest``, ``OutboundConnectionPoolTest``,
``RobustCrowdTest``); ``-k Robust`` runs the robustness part alone.

SPEC section -> test classes:

=========================  =================================================================================
SPEC                       Test classes
=========================  =================================================================================
1 Route grammar            RouteGrammarTest, RouteOverHttpTest, RouteDefaultTest, RobustParsingTest
2 Directives               DirectivesValuesTest, DirectivesOverHttpTest, DirectivesOneMeaningTest,
                           DirectivesResponseShapingTest, ConfigEnvironmentTest
3 The answer               NodeAnswerTest, NodeFanOutTest, OutboundPeerAnswersTest, OutboundOverHttpTest,
                           SharedAnswerJsonTest, View*Test (ViewTreeTest, ViewHtmlTest, ViewReadableJsonTest, ...),
                           RobustOutputHygieneTest
4 Operations endpoints     NodeOperationsTest, NodeLivenessControlTest, RouteDefaultTest (ROUTE),
                           MetricsExpositionTest, MetricsPrometheusScrapeTest,
                           ServerOverHttpTest, TraceIdsInJsonLogsTest (access log)
5 Tracing                  Trace*Test (traceparent, tracestate, B3, samplers, propagation),
                           Span*Test (OTEL_* environment, OTLP encoding, export)
6 Command line             CommandLine*Test (serve, mesh, call, load), GatewayEntryTest (mesh's gateway),
                           ConfigEnvironmentTest
7 Packaging                Manifest*Test, PackagingDockerfileTest, PackagingWheelTest
8 Robustness               Robust*Test; NodePlanTest (every 4xx refusal), WireRequestTest, BudgetAccountingTest,
                           OutboundAnswerReaderTest, OutboundResolverTest, OutboundDeadlineAndReachTest,
                           OutboundConnectionPoolTest, OutboundReachRuleTest, OutboundOtherToolsHintTest
=========================  =================================================================================
"""

import base64
import concurrent.futures
import functools
import glob
import gzip
import http.client
import http.server
import importlib
import itertools
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import unittest.mock
import urllib.parse

import simplemesh as sm


# --- Harness: skips, ports, processes, waiting ----------------------------------------------------------------
# Test-only tools fail (never skip) in CI; ports are free ones, never fixed; waits poll a condition.

HERE = os.path.dirname(os.path.abspath(__file__))
IN_CI = os.environ.get("CI") == "true"


def require_tool(testcase, name):
    """The path of executable ``name``; a missing tool fails the test in CI (where .ci/run installs it), else skips."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (.ci/run installs it)"
        testcase.fail(message) if IN_CI else testcase.skipTest(message)
    return path


def require_module(testcase, name):
    """Import a test-only package from requirements-test.txt, failing in CI and skipping elsewhere without it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        message = f"Python package {name} is not installed (pip install -r requirements-test.txt)"
        testcase.fail(message) if IN_CI else testcase.skipTest(message)


def free_port(count=1):
    """A port with ``count - 1`` free ports after it, below the ephemeral range (so no client socket takes them)."""
    for _attempt in range(200):
        base = random.randrange(20000, 32000)
        try:
            for port in range(base, base + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise AssertionError("no free ports")


def free_port_run(count):
    """The first of ``count`` consecutive free ports (the mesh command takes the ports after its own)."""
    for _ in range(50):
        port = free_port()
        try:
            for offset in range(1, count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port + offset))
            return port
        except OSError:
            continue
    raise AssertionError(f"no {count} consecutive free ports")


def port_is_free(port):
    """True when nothing holds ``port`` on 127.0.0.1."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def wait_for_port(port, timeout=10.0, address="127.0.0.1"):
    """Wait until something accepts connections on ``address:port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((address, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)  # the poll interval
    raise AssertionError(f"nothing listens on {address}:{port} after {timeout}s")


def listens(port, address="127.0.0.1"):
    """True when something accepts connections on ``address:port``, False when it refuses them."""
    try:
        socket.create_connection((address, port), timeout=1).close()
        return True
    except ConnectionRefusedError:
        return False


def in_flight_gauge(port):
    """A node's ``simplemesh_in_flight_requests`` from its /metrics (this scrape counts itself)."""
    _status, _headers, text = http_request(("127.0.0.1", port), "/metrics", timeout=5)
    return int(re.search(r"^simplemesh_in_flight_requests (\d+)$", text, re.M).group(1))


def wait_until(condition, timeout=5.0, message="the condition never held"):
    """Poll ``condition`` until it is true (state a node changes just after its answer has left)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.01)  # the poll interval


def run_cli(*args, env=None, timeout=30, input=None):
    """Run ``python3 -I -S simplemesh.py ARGS`` as the distroless image would (no site-packages)."""
    return subprocess.run([sys.executable, "-I", "-S", os.path.join(HERE, "simplemesh.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, input=input)


def process_status(pid):
    """(threads, resident bytes) of a process, from /proc."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            fields[name] = value.split()
    return int(fields["Threads"][0]), int(fields["VmRSS"][0]) * 1024


def process_memory_mib(pid):
    """{"VmHWM": peak RSS, "VmRSS": RSS} of a process, in MiB."""
    with open(f"/proc/{pid}/status") as status:
        return {line.split(":")[0]: int(line.split()[1]) / 1024 for line in status
                if line.startswith(("VmHWM:", "VmRSS:"))}


def read_text(path):
    """The text of a file, or '' when it is missing."""
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except FileNotFoundError:
        return ""


# --- Harness: real nodes and requests to them -----------------------------------------------------------------
# Nodes in this process (Mesh) or as processes (NodeProcess); HTTP and raw bytes sent to them.

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
            server = sm.Server(sm.build_node(node_config))
            self.servers[name] = server
            self.peers[name] = [(address, server.server_address[1])]
        for server in self.servers.values():
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()

    def port(self, name):
        return self.servers[name].server_address[1]

    def node(self, name):
        return self.servers[name].node

    def request(self, name, path, method="GET", body=None, headers=None, timeout=30):
        """(status, headers, parsed JSON or text) of one request to node ``name``."""
        return http_request(self.peers[name][0], path, method, body, headers, timeout)

    def record_requests(self, name):
        """A list that fills with (method, body) of every routed request node ``name`` serves from now on."""
        seen = []
        node = self.node(name)
        serve = node.serve

        def recording(request):
            seen.append((request.method, request.body))
            return serve(request)

        node.serve = recording
        return seen

    def close(self):
        for server in self.servers.values():
            server.shutdown()
            server.server_close()
            server.node.pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def start_gateway(testcase, mesh, **config):
    """A mesh's gateway (GATEWAY=true) resolving ``mesh``'s nodes; stopped at the test's end. Its address."""
    server = sm.Server(sm.build_node(sm.Config(host="gateway", port=0, address="127.0.0.1", peers=mesh.peers,
                                               gateway=True, log_level="warning", **config)))
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()

    def stop():
        server.shutdown()
        server.server_close()
        server.node.pool.close()

    testcase.addCleanup(stop)
    return ("127.0.0.1", server.server_address[1])


class NodeProcess:
    """``python3 -I -S simplemesh.py ARGS`` as a real process, its stdout and stderr kept for reading afterwards."""

    def __init__(self, *args, env, port):
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
        self.process.send_signal(signum or signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self.out.close()
        self.err.close()


def http_request(address, path, method="GET", body=None, headers=None, timeout=30):
    """One HTTP request: (status, lower-case headers, parsed JSON or text)."""
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


def deepest(record):
    """The records from the root down the first child of each, as a list."""
    chain = [record]
    while chain[-1].get("next_node"):
        chain.append(chain[-1]["next_node"][0])
    return chain


def hosts(record):
    """The tree of hosts in a record, as nested lists: {"host": "a", "next_node": [b]} -> ["a", [...]]."""
    return [record["host"], [hosts(child) for child in record.get("next_node", [])]]


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


def parse_request(stream, max_body):
    """A whole request -> (RequestHead, body bytes or None if cut short), or None if no request came; BadRequest.
    (The server reads head and body in two steps, a ``100 Continue`` between them; this is both.)"""
    head = sm.read_request_head(stream, max_body)
    if head is None:
        return None
    sm.split_target(head.target)
    return head, sm.read_body(stream, head, max_body)


def parse_raw(data, max_body=100):
    """Raw request bytes -> ("ok", method, path, query, body, keep_alive) or ("error", status, message) or None."""
    import io
    try:
        parsed = parse_request(io.BytesIO(data), max_body)
        if parsed is None:
            return None
        head, body = parsed
        path, query = sm.split_target(head.target)
        return ("ok", head.method, path, query, body, head.keep_alive)
    except sm.BadRequest as error:
        return ("error", error.status, str(error))


def mixed_traffic(mesh):
    """Successes, injected failures, a failed call and a delay, so every family has samples."""
    for path in ("/b", "/b;status=503", "/b;delay=20ms", "/nowhere", "/b?view=x", "/b~b"):
        mesh.request("a", path)
    mesh.request("a", "/", method="POST", body=b"x")


def open_clients(port, count, request=None, batch=100):
    """``count`` connections to a node; with ``request``, each sends it once and reads the answer (keep-alive),
    ``batch`` connections at a time."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        socks.append(sock)
    for start in range(0, count if request else 0, batch):
        for sock in socks[start:start + batch]:
            sock.sendall(request)
        for sock in socks[start:start + batch]:
            data = b""
            while b"\r\n\r\n" not in data:
                data += sock.recv(65536)
    return socks


def probe_latency(port, paths=("/healthz", "/readyz", "/metrics")):
    """The slowest of one request to each probe path, each on a new connection: (seconds, statuses)."""
    slowest, statuses = 0.0, []
    for path in paths:
        started = time.monotonic()
        statuses.append(http_request(("127.0.0.1", port), path, timeout=10)[0])
        slowest = max(slowest, time.monotonic() - started)
    return slowest, statuses


def closed_loop(port, path, connections, seconds):
    """``connections`` clients each sending ``path`` again as soon as its answer arrived, for ``seconds``:
    {status: answers}. One thread and a poll loop, so the client is not what limits the rate."""
    request = f"GET {path} HTTP/1.1\r\nHost: n\r\n\r\n".encode()
    poller = select.poll()
    socks, buffers = {}, {}
    for _ in range(connections):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.setblocking(False)
        socks[sock.fileno()], buffers[sock.fileno()] = sock, b""
        poller.register(sock, select.POLLIN)
        sock.send(request)
    counts = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for fd, _event in poller.poll(100):
            data = buffers[fd] + socks[fd].recv(65536)
            head, sep, body = data.partition(b"\r\n\r\n")
            length = re.search(rb"Content-Length: (\d+)", head) if sep else None
            if not length or len(body) < int(length.group(1)):
                buffers[fd] = data
                continue
            buffers[fd] = body[int(length.group(1)):]
            status = int(head.split(b" ", 2)[1])
            counts[status] = counts.get(status, 0) + 1
            socks[fd].send(request)
    for sock in socks.values():
        sock.close()
    return counts


# --- Harness: scripted peers and sockets ----------------------------------------------------------------------
# Downstreams that capture, script or misbehave, and sockets and resolvers that are scripted.

class CapturingPeer:
    """A downstream that answers like a leaf node and keeps the headers of every request it got."""

    def __init__(self):
        captured = self.captured = []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                captured.append({k.lower(): v for k, v in self.headers.items()})
                body = json.dumps({"host": "cap", "status": 200, "next_node": []}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.address = ("127.0.0.1", self.server.server_address[1])

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class BadPeer:
    """A TCP peer that misbehaves on purpose: ``behaviour(sock)`` runs for every connection after its request
    arrived. Not a simplemesh node: a dead, slow, rude or broken upstream.

    With ``keep_alive``, ``behaviour(sock, n)`` runs for each request on a connection (n = 0, 1, ...) until it
    returns False (then the peer closes the connection) or the connection ends. ``requests`` holds the head of every request received, in order.
    """

    def __init__(self, behaviour, keep_alive=False):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.behaviour = behaviour
        self.keep_alive = keep_alive
        self.connections = []
        self.requests = []
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
            for number in itertools.count():
                while b"\r\n\r\n" not in data:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, data = data.partition(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length: *([0-9]+)", head)
                while length and len(data) < int(length.group(1)):
                    data += sock.recv(65536)
                data = data[int(length.group(1)):] if length else data
                self.requests.append(head)
                if not self.keep_alive:
                    return self.behaviour(sock)
                if self.behaviour(sock, number) is False:
                    return sock.close()
        except OSError:
            pass

    def close(self):
        self.listener.close()
        for sock in self.connections:
            sock.close()


def answer_bytes(body, content_type="application/json", length=None):
    """A whole HTTP/1.1 200 answer with ``body``; ``length`` overrides its Content-Length."""
    length = len(body) if length is None else length
    return (f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n").encode() + body


def serve_answers(answers):
    """A keep-alive peer sending ``answers[n]`` (bytes, or a callable given the socket) for its n-th request."""
    def behaviour(sock, number):
        answer = answers[min(number, len(answers) - 1)]
        return answer(sock) if callable(answer) else sock.sendall(answer)
    return behaviour


def record_bytes(fields, status=200):
    """A whole HTTP/1.1 200 answer whose body is a simplemesh record: ``fields`` plus host and ``status``."""
    body = json.dumps(dict({"host": "p", "status": status}, **fields)).encode()
    return answer_bytes(body)


class ScriptedSocket:
    """What SocketReader reads from: ``raw`` handed out ``piece`` bytes at a time (short reads), then the end."""

    def __init__(self, raw, piece=7):
        self.raw = raw
        self.piece = piece

    def recv(self, size, flags=0):
        data, self.raw = self.raw[:min(size, self.piece)], self.raw[min(size, self.piece):]
        return data

    def recv_into(self, buffer, size=0, flags=0):
        data = self.recv(size or len(buffer))
        buffer[:len(data)] = data
        return len(data)


def read_raw(raw, method="GET", budget=None, piece=7):
    """(status, body, reusable, bytes left unread) of one answer, or the AnswerError's message."""
    reader = sm.SocketReader(ScriptedSocket(raw, piece))
    try:
        answer = sm.read_answer(reader, method, budget)
    except sm.AnswerError as error:
        return str(error)
    return answer.status, answer.body, answer.reusable, reader.buffered + len(reader.sock.raw)


OK_HEAD = b"HTTP/1.1 200 OK\r\n"


def fake_getaddrinfo(table, delay=0.0, asked=None):
    """A resolver for invented names (nothing reaches the machine's resolver): name -> IPv4 address, or an
    exception to raise; ``delay`` seconds per lookup; ``asked`` collects the names looked up."""
    def getaddrinfo(host, port, family=0, kind=0):
        if asked is not None:
            asked.append(host)
        time.sleep(delay)  # the scenario: a slow resolver
        answer = table.get(host, socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
        if isinstance(answer, Exception):
            raise answer
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answer, port))]
    return getaddrinfo


# --- Harness: fixtures and generated input --------------------------------------------------------------------
# Known values and the fuzzer's input.

T = sm.Target
VALID_TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
KNOWN_TREE = {
    "host": "a", "status": 502, "elapsed_time": 0.35, "start_time": "2026-01-01T00:00:00.000000Z",
    "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "error": "a downstream call failed", "next_node": [
        {"host": "b", "version": "v2", "status": 200, "elapsed_time": 0.2, "delay": 0.1,
         "start_time": "2026-01-01T00:00:00.001000Z", "next_node": [
             {"host": "c", "status": 200, "elapsed_time": 0.05, "start_time": "2026-01-01T00:00:00.150000Z",
              "next_node": []}]},
        {"host": "d", "url": "http://d/", "status": 502, "elapsed_time": 0.01, "error": "connection refused"}]}
DIRECTIVE_SOURCES = [  # directive, its text (None: a flag), its environment variable and that variable's text
    ("delay", "200ms", "DELAY", "0.2"), ("error", "25%", "ERROR_RATE", "0.25"),
    ("status", "503", "ERROR_STATUS", "503"),
    ("reset", "0.1", "RESET_RATE", "10%"), ("size", "10k", "RESPONSE_SIZE", "10240"), ("cpu", "50ms", "CPU", "0.05"),
    ("timeout", "2s", "UPSTREAM_TIMEOUT", "2"), ("parallel", None, "FANOUT", "parallel"),
    ("headers", None, "ECHO_HEADERS", "true"), ("body", None, "ECHO_BODY", "true"),
    ("response-header", "x-lab:1", "RESPONSE_HEADERS", "x-lab:1"), ("route", "b", "ROUTE", "/b"),
]


def fuzz_requests(rng, count):
    """``count`` malformed (and some well-formed) raw requests, with a label saying what kind each is."""
    route_tokens = ["a", "b", "c", "/", "/", "~", "(", ")", ";delay=1ms", ";error=0.5", ";status=503", ";bogus",
                    ";delay=", ";size=1k", ";timeout=1s", ";cpu=1ms", ";parallel", ";headers", ":9", ":99999",
                    ":", "%", "%zz", "%ff", "%0d%0a", "%00", "%2f", "%7e", "..", ".", "-", "A", "127.0.0.1",
                    "0x7f000001", "x" * 70, "é", "\t", " ", "?", "#", "&", "=", "metrics", "-/defaults", "\\",
                    ";body", ";response-header=x-a:1|set-cookie:v", ";response-header=host:x", ";route=b",
                    ";route=a"]
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
                                         "headers", "view", "x", "", "body", "response-header", "route"]) +
                             rng.choice(["", "="]) +
                             "".join(rng.choice("0123456789.:,ms-kKgx%~ \x00é") for _ in range(rng.randint(0, 8)))
                             for _ in range(rng.randint(1, 4)))
            yield "query", f"GET /b?{query} HTTP/1.1\r\nHost: a\r\n\r\n".encode("utf-8")
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
            yield "header", b"GET /b HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n"
        elif kind == 3:  # methods and protocol versions
            method = rng.choice(methods)
            version = rng.choice(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 ", "http/1.1", "", "FOO"])
            yield "method", f"{method} /b {version}\r\nHost: a\r\n\r\n".encode("utf-8")
        elif kind == 4:  # bodies: lengths that lie, are huge, negative, or chunked
            length = rng.choice(["0", "3", "10", "-1", "abc", "1048577", "9" * 30, "4, 4", "²", " 3"])
            extra = rng.choice([b"", b"Transfer-Encoding: chunked\r\n", b"Content-Length: 3\r\n"])
            yield "body", (f"POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: {length}\r\n".encode("utf-8") + extra +
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
            yield "enormous", f"GET /{route} HTTP/1.1\r\nHost: a\r\n\r\n".encode("utf-8")
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


def logfmt_fields(line):
    """A logfmt line -> {key: [values]} (bare words under ""), quoted values read as JSON strings."""
    fields = {}
    for match in re.finditer(r'(?:([^\s=]+)=)?("(?:[^"\\]|\\.)*"|\S+)', line):
        key, value = match.group(1) or "", match.group(2)
        value = json.loads(value) if value.startswith('"') else value
        fields.setdefault(key, []).append(value)
    return {key: values[0] if key == "path" else values for key, values in fields.items()}


# --- Harness: external tools ----------------------------------------------------------------------------------
# Chromium over the DevTools protocol, Prometheus's API, an OTLP receiver.

def chromium_flags(profile):
    """Chromium's command line for a headless run with its own ``profile`` directory."""
    return ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--window-size=1280,800", f"--user-data-dir={profile}"]


class DevTools:
    """Just enough of the Chrome DevTools protocol over a stdlib WebSocket client to drive one page."""

    def __init__(self, test):
        require_tool(test, "chromium")
        self.profile = tempfile.TemporaryDirectory(ignore_cleanup_errors=True)
        self.process = subprocess.Popen(["chromium", *chromium_flags(self.profile.name), "--remote-debugging-port=0",
                                         "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)  # its own group: close() ends its helpers too
        port_file = os.path.join(self.profile.name, "DevToolsActivePort")
        try:  # the file is written once the browser listens
            wait_until(lambda: read_text(port_file).count("\n"), 20, "chromium did not open its DevTools port")
        except AssertionError:
            self.close()
            raise
        port = int(read_text(port_file).split()[0])
        _status, _headers, targets = http_request(("127.0.0.1", port), "/json/list")
        page = next(t for t in targets if t["type"] == "page")
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        key = "c2ltcGxlbWVzaHRlc3RrZXk="
        path = page["webSocketDebuggerUrl"].split(str(port), 1)[1]
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                          f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                          .encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self.sock.recv(4096)
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head
        self.next_id = 0
        self.events = []

    def read(self, count):
        while len(self.buffer) < count:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("DevTools closed the connection")
            self.buffer += chunk
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def receive(self):
        message = b""
        while True:
            first, second = self.read(2)
            length = second & 0x7F
            if length == 126:
                length = int.from_bytes(self.read(2), "big")
            elif length == 127:
                length = int.from_bytes(self.read(8), "big")
            message += self.read(length)
            if first & 0x80:
                return json.loads(message)

    def send(self, method, **params):
        self.next_id += 1
        payload = json.dumps({"id": self.next_id, "method": method, "params": params}).encode()
        mask = os.urandom(4)
        length = len(payload)
        header = bytes([0x81]) + (bytes([0x80 | length]) if length < 126 else
                                  bytes([0x80 | 126]) + length.to_bytes(2, "big"))
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        while True:
            message = self.receive()
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for index, event in enumerate(self.events):
                if event.get("method") == method:
                    return self.events.pop(index)
            self.events.append(self.receive())
        raise AssertionError(f"no {method} within {timeout}s")

    def evaluate(self, expression):
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def requested_urls(self):
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def close(self):
        if getattr(self, "sock", None):
            self.sock.close()
        os.killpg(self.process.pid, 9)
        self.process.wait()
        self.profile.cleanup()


READ_WATERFALL = """JSON.stringify(Array.from(document.querySelectorAll('.hop')).map(function (hop) {
  var bar = hop.querySelector('.bar').getBoundingClientRect();
  return {index: +hop.dataset.index, parent: +hop.dataset.parent, host: hop.dataset.host,
          failed: hop.classList.contains('failed'), origin: hop.classList.contains('origin'),
          left: bar.left, right: bar.right, width: bar.width, top: bar.top,
          label: hop.querySelector('.label').textContent};
}))"""


def label_seconds(label):
    """The duration a waterfall bar's label shows: '12.5 ms · error' -> 0.0125."""
    number, unit = label.split()[:2]
    return float(number) / (1000 if unit == "ms" else 1)


def prometheus_get(port, path):
    """GET ``path`` from a Prometheus on ``port``: its JSON answer."""
    status, _headers, answer = http_request(("127.0.0.1", port), path, timeout=5)
    if status != 200:
        raise OSError(f"prometheus answered {status}: {answer}")
    return answer["data"] if "query_exemplars" in path else answer["data"]["result"]


class OTLPReceiver:
    """A local OTLP/HTTP collector on /v1/traces that takes one encoding only, as Elastic APM and Seq do: binary
    protobuf (``application/x-protobuf``) unless told ``application/json``; anything else gets 415.

    Every payload is parsed strictly with the opentelemetry-proto schema (protobuf: the bytes must re-serialize
    identically, so no unknown or misplaced field passes; JSON: json_format rejects unknown fields) and kept as
    OTLP JSON dicts with hex ids. A payload that does not parse gets 400, is noted in ``errors`` and fails the
    test. ``answers`` lists (status, Retry-After or None) to give, in turn, before answering 200; ``rejected``
    makes each 200 a partial success naming that many rejected spans.
    """

    def __init__(self, testcase, answers=(), content_type="application/x-protobuf", rejected=0):
        require_module(testcase, "opentelemetry.proto")
        self.payloads = []
        self.errors = []
        self.refused_types = []
        self.posts = 0
        self.answers = list(answers)
        self.content_type = content_type
        self.rejected = rejected
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OTLPReceiverHandler)
        self.server.daemon_threads = True
        self.server.receiver = self
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.protocol = "http/json" if content_type == "application/json" else "http/protobuf"
        testcase.addCleanup(lambda: testcase.assertEqual(self.errors, [], "payloads that did not parse"))
        testcase.addCleanup(self.close)

    def receive(self, path, headers, body):
        """(status, Retry-After or None, answer body) for one POST."""
        self.posts += 1
        status, retry_after = self.answers.pop(0) if self.answers else (200, None)
        if headers.get("Content-Type") != self.content_type:
            self.refused_types.append(headers.get("Content-Type"))
            return 415, None, b""
        if status != 200:
            return status, retry_after, b""
        if headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        self.path = path
        self.headers = {k.lower(): v for k, v in headers.items()}
        from google.protobuf import json_format
        try:
            message = self.parse(body)
        except Exception as error:  # the test fails in its cleanup, naming the error
            self.errors.append(f"{type(error).__name__}: {error}")
            return 400, None, b""
        self.payloads.append(otlp_dict(json_format, message))
        return 200, None, self.answer()

    def parse(self, body):
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
        if self.content_type == "application/json":
            return strict_otlp_json(json.loads(body))
        message = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        if message.SerializeToString() != body:
            raise ValueError("the payload does not re-serialize to the same bytes")
        return message

    def answer(self):
        """An ExportTraceServiceResponse in the request's encoding, with a partial success when asked."""
        from google.protobuf import json_format
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
        response = trace_service_pb2.ExportTraceServiceResponse()
        if self.rejected:
            response.partial_success.rejected_spans = self.rejected
            response.partial_success.error_message = "too old"
        if self.content_type == "application/json":
            return json_format.MessageToJson(response).encode()
        return response.SerializeToString()

    def tracing(self, **overrides):
        environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"}
        if self.protocol == "http/json":
            environ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = "http/json"
        return sm.TracingConfig.from_env(environ).replace(**overrides)

    def spans(self):
        """[(service name, span)] of everything received, spans as OTLP JSON dicts."""
        found = []
        for payload in self.payloads:
            for resource_spans in payload["resourceSpans"]:
                resource = {a["key"]: a["value"] for a in resource_spans["resource"]["attributes"]}
                for scope_spans in resource_spans["scopeSpans"]:
                    found.extend((resource["service.name"]["stringValue"], span) for span in scope_spans["spans"])
        return found

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class OTLPReceiverHandler(http.server.BaseHTTPRequestHandler):
    """The OTLPReceiver's HTTP side: hands each POST to the receiver and writes the answer it decides."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        receiver = self.server.receiver
        status, retry_after, data = receiver.receive(self.path, self.headers, body)
        self.send_response(status)
        if retry_after is not None:
            self.send_header("Retry-After", retry_after)
        self.send_header("Content-Type", receiver.content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def strict_otlp_json(payload):
    """Parse an OTLP/HTTP JSON payload into the official ExportTraceServiceRequest, rejecting unknown fields.

    OTLP's JSON differs from proto3 JSON in one documented way: trace and span ids are hex, not base64.
    """
    from google.protobuf import json_format
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    payload = json.loads(json.dumps(payload))
    for resource_spans in payload["resourceSpans"]:
        for scope_spans in resource_spans["scopeSpans"]:
            for span in scope_spans["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = base64.b64encode(bytes.fromhex(span[key])).decode()
    return json_format.Parse(json.dumps(payload), ExportTraceServiceRequest())


def otlp_dict(json_format, message):
    """A parsed ExportTraceServiceRequest as OTLP JSON: camelCase, int64 as strings, enums as numbers, hex ids."""
    for resource_spans in message.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                assert (len(span.trace_id), len(span.span_id)) == (16, 8), "ids of the wrong size"
                assert len(span.parent_span_id) in (0, 8), "a parent id of the wrong size"
    payload = json_format.MessageToDict(message, use_integers_for_enums=True)
    for resource_spans in payload.get("resourceSpans", []):
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = base64.b64decode(span[key]).hex()
    return payload


# --- Harness: manifests ---------------------------------------------------------------------------------------
# The demo mesh, schemas and readers for generated Kubernetes objects.

# The demo mesh of manifests/base, as the generator's arguments (manifests/base/kustomization.yaml says the same).
DEMO_NODES = ("a;delay=0.5", "b;delay=1", "b;delay=1;version=v2", "c;delay=1.5", "d")
DEMO_OPTIONS = ("--load", "http://a/b/c/d", "--rate", "2", "--concurrency", "8")
# kubernetes-validate ships the schemas; strict ones also refuse unknown fields (a typo is an error). The oldest
# and the newest Kubernetes the manifests are for.
K8S_SCHEMA_VERSIONS = ("1.25.0", "1.37.0")
# Istio's and the Gateway API's CRDs, as released (../shared/schemas/README.md says where from).
CRD_FILES = [os.path.join(HERE, "..", "shared", "schemas", name)
             for name in ("istio-1.30.3-crd-all.gen.yaml", "gateway-api-v1.6.1-standard-crds.yaml")]
# The mesh flavours: the generator's flag, the overlay directory that must equal it.
MESH_OVERLAYS = (("istio", "--istio"), ("gateway-api", "--gateway-api"), ("ambient", "--ambient"))
# Distroless Python images are named after their Debian, which has one Python.
DISTROLESS_PYTHON = {"python3-debian12": "3.11", "python3-debian13": "3.13"}


def generate(*args):
    """The YAML text of ``simplemesh manifests ARGS``, run as the image runs it."""
    result = run_cli("manifests", *args)
    if result.returncode != 0:
        raise AssertionError(f"manifests {args} failed: {result.stderr}")
    return result.stdout


def node_deployments(objects):
    """The node Deployments among generated ``objects``."""
    return [o for o in objects if o["kind"] == "Deployment"
            and o["metadata"]["labels"].get("app.kubernetes.io/component") == "node"]


def container_env(deployment, labels=None, pod="pod-0"):
    """The environment the kubelet would give the container: literal values and the downward API resolved."""
    template = deployment["spec"]["template"]
    labels = labels or template["metadata"]["labels"]
    fields = {"metadata.name": pod, "metadata.namespace": "default", "status.podIP": "10.0.0.7",
              "spec.nodeName": "node-1"}
    fields.update({f"metadata.labels['{k}']": v for k, v in labels.items()})
    env = {}
    for item in template["spec"]["containers"][0].get("env", []):
        env[item["name"]] = item["value"] if "value" in item else fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def by_kind_and_name(objects):
    """Generated ``objects`` by (kind, name)."""
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def openapi_to_json_schema(node, structural=True):
    """A CRD's OpenAPI v3 schema as JSON Schema (draft 4), with Kubernetes' extensions made checkable.

    ``nullable`` admits null; ``x-kubernetes-int-or-string`` admits an integer or a string; a ``set`` list has
    unique items; an object with ``properties`` refuses other fields unless it preserves unknown fields, as the
    API server's strict field validation (kubectl's default) does. Inside anyOf/oneOf/allOf/not, which in a
    structural schema only add constraints to fields declared beside them, nothing is closed.
    """
    if isinstance(node, list):
        return [openapi_to_json_schema(item, structural) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties"):
            out[key] = {name: openapi_to_json_schema(sub, structural) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = openapi_to_json_schema(value, structural)
        elif key in ("allOf", "anyOf", "oneOf", "not"):
            out[key] = openapi_to_json_schema(value, False)
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["allOf"] = out.get("allOf", []) + [{"anyOf": [{"type": "integer"}, {"type": "string"}]}]
    if (structural and "properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if node.get("nullable"):
        out = {"anyOf": [{"type": "null"}, out]}
    return out


def apply_schema_defaults(value, schema):
    """Fill in the schema's ``default`` values, as the API server does before its CEL rules run."""
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for name, sub in properties.items():
            if name not in value and "default" in sub:
                value[name] = json.loads(json.dumps(sub["default"]))
            if name in value:
                apply_schema_defaults(value[name], sub)
        if isinstance(schema.get("additionalProperties"), dict):
            for name in value.keys() - properties.keys():
                apply_schema_defaults(value[name], schema["additionalProperties"])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_schema_defaults(item, schema["items"])


def cel_field_names(value):
    """Kubernetes escapes CEL's reserved words in field names: ``namespace`` is ``__namespace__`` in a rule."""
    if isinstance(value, dict):
        return {("__namespace__" if key == "namespace" else key): cel_field_names(item) for key, item in value.items()}
    if isinstance(value, list):
        return [cel_field_names(item) for item in value]
    return value


class CrdSchemas:
    """Custom resources against the served version's ``openAPIV3Schema`` of their CRD (CRD_FILES).

    jsonschema checks the schema (see openapi_to_json_schema), plus the uniqueness of list-map keys; the CEL rules
    (``x-kubernetes-validations``) ARE checked: each rule on a field the object has is evaluated with cel-python
    after the schema's defaults are applied, as the API server does on create. Transition rules (``oldSelf``)
    only apply to updates and are skipped. ``format`` is not checked (int32, date-time: nothing here uses them
    beyond plain numbers). ``rules_checked`` counts the rules evaluated, so a test can see they ran.
    """
    _served = None

    def __init__(self, testcase):
        self.yaml = require_module(testcase, "yaml")
        self.jsonschema = require_module(testcase, "jsonschema")
        self.celpy = require_module(testcase, "celpy")
        self.cel = self.celpy.Environment()
        self.programs = {}
        self.rules_checked = 0
        missing = [path for path in CRD_FILES if not os.path.exists(path)]
        if missing:
            message = f"no CRD schemas at {missing[0]} (the shared/ folder beside the repository)"
            testcase.fail(message) if IN_CI else testcase.skipTest(message)
        if CrdSchemas._served is None:
            CrdSchemas._served = self.load()
        self.validator_class = self.jsonschema.validators.extend(
            self.jsonschema.Draft4Validator,
            {"x-kubernetes-validations": self.check_rules, "x-kubernetes-list-map-keys": self.check_map_keys})

    def load(self):
        served = {}
        loader = getattr(self.yaml, "CSafeLoader", self.yaml.SafeLoader)
        for path in CRD_FILES:
            with open(path, encoding="utf-8") as file:
                for crd in self.yaml.load_all(file, Loader=loader):
                    if crd and crd.get("kind") == "CustomResourceDefinition":
                        spec = crd["spec"]
                        for version in spec["versions"]:
                            if version["served"]:
                                served[f"{spec['group']}/{version['name']}", spec["names"]["kind"]] = \
                                    version["schema"]["openAPIV3Schema"]
        return served

    def knows(self, obj):
        return (obj.get("apiVersion"), obj.get("kind")) in self._served

    def errors(self, obj):
        """Messages for what the API server would refuse in ``obj``; [] when it is valid."""
        openapi = self._served[obj["apiVersion"], obj["kind"]]
        obj = json.loads(json.dumps(obj))
        apply_schema_defaults(obj, openapi)
        schema = openapi_to_json_schema(openapi)
        for field, kind in (("apiVersion", "string"), ("kind", "string"), ("metadata", "object")):
            schema["properties"].setdefault(field, {"type": kind})
        return [f"{error.message} at {list(error.absolute_path)}"
                for error in self.validator_class(schema).iter_errors(obj)]

    def check_rules(self, _validator, rules, instance, _schema):
        for rule in rules:
            if "oldSelf" in rule["rule"]:
                continue
            program = self.programs.get(rule["rule"])
            if program is None:
                program = self.programs[rule["rule"]] = self.cel.program(self.cel.compile(rule["rule"]))
            result = program.evaluate({"self": self.celpy.json_to_cel(cel_field_names(instance))})
            self.rules_checked += 1
            if not (isinstance(result, self.celpy.celtypes.BoolType) and bool(result)):  # or a CELEvalError
                yield self.jsonschema.ValidationError(f"CEL rule refused: {rule.get('message') or rule['rule']}"
                                                      f" ({result!r})")

    def check_map_keys(self, _validator, keys, instance, _schema):
        if isinstance(instance, list):
            seen = set()
            for item in instance:
                key = tuple(json.dumps(item.get(name)) for name in keys)
                if key in seen:
                    yield self.jsonschema.ValidationError(f"duplicate list entry for keys {keys}: {key}")
                seen.add(key)


def pod_security_problems(deployment):
    """What keeps a Deployment's pods from the restricted Pod Security Standard (and the house rules beyond it)."""
    pod = deployment["spec"]["template"]["spec"]
    problems = []
    if pod.get("securityContext", {}).get("seccompProfile") != {"type": "RuntimeDefault"}:
        problems.append("seccompProfile is not RuntimeDefault")
    if pod.get("automountServiceAccountToken") is not False:
        problems.append("service-account token mounted")
    for container in pod["containers"]:
        security = container.get("securityContext", {})
        expected = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                    "capabilities": {"drop": ["ALL"]}}
        problems += [f"{container['name']}: {key} is not {value}" for key, value in expected.items()
                     if security.get(key, pod.get("securityContext", {}).get(key)) != value]
        if security.get("privileged"):
            problems.append(f"{container['name']}: privileged")
        if set(container.get("resources", {}).get("limits", {})) != {"cpu", "memory"}:
            problems.append(f"{container['name']}: no cpu and memory limits")
        if container.get("ports") and not (container.get("readinessProbe") and container.get("livenessProbe")):
            problems.append(f"{container['name']}: serves without readiness and liveness probes")
    return problems


# --- The module's shape ---------------------------------------------------------------------------------------
# Issue 16's rules for simplemesh.py, read from its syntax tree: no long function, no forward use between sections.

class ModuleShapeTest(unittest.TestCase):
    """Issue 16: the module's shape, read from its syntax tree (no run)."""

    @classmethod
    def setUpClass(cls):
        import ast
        cls.ast = ast
        with open(sm.__file__, encoding="utf-8") as source:
            cls.source = source.read()
        cls.tree = ast.parse(cls.source)

    def test_no_function_is_longer_than_50_lines(self):
        ast = self.ast
        long = [f"{node.name} (line {node.lineno}): {node.end_lineno - node.body[0].lineno + 1} lines"
                for node in ast.walk(self.tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                and node.end_lineno - node.body[0].lineno + 1 > 50]
        self.assertEqual(long, [])

    def test_no_section_uses_a_later_one_but_the_server_and_the_command_line(self):
        ast = self.ast
        banners = [(number, match.group(1)) for number, line in enumerate(self.source.splitlines(), 1)
                   if (match := re.match(r"# --- (.*?) -+$", line))]
        self.assertIn("Shared utilities", [name for _number, name in banners])

        def section(line):
            return ([""] + [name for number, name in banners if number <= line])[-1]  # "": imports, __version__
        defined = {}
        for node in self.tree.body:
            names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else [
                target.id for target in getattr(node, "targets", ()) if isinstance(target, ast.Name)]
            for name in names:
                defined.setdefault(name, node.lineno)
        forward = []
        for node in self.tree.body:
            if section(node.lineno) in ("Server", "Command line"):
                continue
            local = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            local |= {a.arg for n in ast.walk(node) if isinstance(n, ast.arguments)
                      for a in n.posonlyargs + n.args + n.kwonlyargs}
            for used in ast.walk(node):
                if (isinstance(used, ast.Name) and isinstance(used.ctx, ast.Load) and used.id not in local
                        and defined.get(used.id, 0) > node.lineno
                        and section(defined[used.id]) != section(node.lineno)):
                    forward.append(f"line {used.lineno}: {used.id} ({section(defined[used.id])})")
        self.assertEqual(forward, [])


# --- Shared utilities -----------------------------------------------------------------------------------------
# Record, converters, the log line and the worker pool are tested through the sections that use them; here
# the answer's JSON text (padded to its size, streamed in chunks) and the TurnGate (turns under saturation).

class SharedAnswerJsonTest(unittest.TestCase):
    """The JSON answer: the record padded to its size, streamed."""

    def render(self, record, size=0, big=False):
        length, pieces = sm.answer_json(record, size, big)
        body = b"".join(sm.ascii_chunks(pieces))
        self.assertEqual(len(body), length)
        return body

    def test_the_answer_is_the_record_padded_to_its_size(self):
        child = {"host": "b", "padding": "x" * (3 * sm.ANSWER_CHUNK + 5), "note": "caf\u00e9 \"q\""}
        record = {"host": "a", "status": 200, "next_node": [child]}
        for big in (False, True):
            with self.subTest(big=big):
                self.assertEqual(json.loads(self.render(record, big=big)), record)
                self.assertEqual(self.render(record, big=big), json.dumps(record).encode())
                for size in (1, 100, 10_000, 3 * sm.ANSWER_CHUNK + 7):
                    padded = self.render({"host": "a"}, size, big)
                    self.assertEqual(len(padded), size if size > 30 else len(b'{"host": "a"}'))
                    self.assertEqual(set(json.loads(padded)["padding"]) if size > 30 else set(), {"x"} if size > 30
                                     else set())
                padded = json.loads(self.render(record, len(json.dumps(record)) + 100_000, big))
                self.assertEqual(padded["next_node"], [child])
                self.assertEqual(list(padded)[-1], "padding")  # the last field, as before

    def test_a_big_answer_is_never_held_whole(self):
        import tracemalloc
        record = {"host": "a", "next_node": [{"host": "b", "padding": "x" * 4_000_000}]}
        tracemalloc.start()
        try:
            length, pieces = sm.answer_json(record, 12_000_000, big=True)
            sent = sum(len(chunk) for chunk in sm.ascii_chunks(pieces))
            _current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertEqual(sent, length)
        self.assertEqual(length, 12_000_000)
        self.assertLess(peak, 4_000_000 + 4 * sm.ANSWER_CHUNK)  # one copy of the child's padding, at most


class SharedTurnGateTest(unittest.TestCase):
    """Under saturation requests take turns in arrival order (issue 15): at most ``slots`` inside at once, the
    rest let in first come, first served; a thread that waits steps out, and comes back ahead of new arrivals."""

    def test_at_most_slots_inside_and_the_rest_in_arrival_order(self):
        gate = sm.TurnGate(2)
        gate.enter()
        gate.enter()
        entered, threads = [], []

        def wait_turn(number):
            gate.enter()
            entered.append(number)
            gate.leave()

        for number in range(5):
            threads.append(threading.Thread(target=wait_turn, args=(number,)))
            threads[-1].start()
            wait_until(lambda: len(gate.queue) == number + 1)  # queued in this order
        self.assertEqual(entered, [])  # both slots are taken
        gate.leave()
        for thread in threads:
            thread.join(5)
        self.assertEqual(entered, [0, 1, 2, 3, 4])
        gate.leave()
        self.assertEqual((gate.free, len(gate.queue)), (2, 0))

    def test_pause_lets_the_next_in_and_resume_goes_ahead_of_new_arrivals(self):
        gate = sm.TurnGate(1)
        self.assertFalse(gate.pause())  # a thread that is not inside has nothing to give up
        gate.enter()
        order = []
        waiter = threading.Thread(target=lambda: (gate.enter(), order.append("waiter"), gate.leave()))
        waiter.start()
        wait_until(lambda: len(gate.queue) == 1)
        turn = gate.pause()  # e.g. an upstream call: the waiter goes first
        waiter.join(5)
        self.assertEqual(order, ["waiter"])
        gate.enter()  # the slot is ours again; now one arrival queues, then the paused thread comes back
        newcomer = threading.Thread(target=lambda: (gate.enter(), order.append("newcomer"), gate.leave()))
        newcomer.start()
        wait_until(lambda: len(gate.queue) == 1)
        resumer = threading.Thread(target=lambda: (gate.resume(turn), order.append("resumed"), gate.leave()))
        resumer.start()
        wait_until(lambda: len(gate.queue) == 2)
        gate.leave()
        for thread in (newcomer, resumer):
            thread.join(5)
        self.assertEqual(order, ["waiter", "resumed", "newcomer"])
        self.assertEqual(gate.free, 1)


# --- The HTTP/1.1 wire ----------------------------------------------------------------------------------------
# Request parsing as pure functions over raw bytes (SPEC 8).

class WireRequestTest(unittest.TestCase):
    """The HTTP/1.1 wire, byte by byte: raw request in, the parsed request or the exact error out."""

    CASES = [  # (raw bytes, expected)
        (b"GET /a/b?x=1 HTTP/1.1\r\nHost: a\r\n\r\n", ("ok", "GET", "/a/b", "x=1", b"", True)),
        (b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", ("ok", "GET", "/", "", b"", True)),  # a stray CRLF first
        (b"GET /%2F%2Fevil HTTP/1.1\nHost: a\n\n", ("ok", "GET", "///evil", "", b"", True)),  # bare LF
        (b"GET http://a/b/c?q HTTP/1.1\r\nHost: a\r\n\r\n", ("ok", "GET", "/b/c", "q", b"", True)),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", ("ok", "GET", "/", "", b"", False)),
        (b"GET / HTTP/1.0\r\n\r\n", ("ok", "GET", "/", "", b"", False)),  # no Host needed in 1.0
        (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", ("ok", "GET", "/", "", b"", True)),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc", ("ok", "POST", "/", "", b"abc", True)),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
         ("ok", "POST", "/", "", b"abc", True)),  # identical repeats are one length
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n"
         b"x-trailer: t\r\n\r\n", ("ok", "POST", "/", "", b"abcde", True)),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\nA\r\n0123456789\r\n0\r\n\r\n",
         ("ok", "POST", "/", "", b"0123456789", True)),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nab", ("ok", "POST", "/", "", None, True)),  # cut
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", ("ok", "POST", "/", "", None, True)),
        (b"", None),
        (b"GET / HTTP/1.1\r\n\r\n", ("error", 400, "an HTTP/1.1 request needs a Host header")),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", ("error", 400, "more than one Host header")),
        (b"GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n", ("error", 400, "more than one Host header")),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n\r\n", ("error", 400, "empty Transfer-Encoding")),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
         ("error", 400, "unsupported Transfer-Encoding 'gzip' (only chunked)")),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
         ("error", 400, "unsupported Transfer-Encoding 'gzip, chunked' (only chunked)")),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
         ("error", 400, "both Transfer-Encoding and Content-Length")),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
         ("error", 400, "Transfer-Encoding in an HTTP/1.0 request")),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", ("error", 400, "bad chunk size")),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\xd9\xa3\r\n", ("error", 400, "bad chunk size")),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n",
         ("error", 400, "chunk data not followed by CRLF")),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n40\r\n" + b"x" * 64 + b"\r\n41\r\n",
         ("error", 413, "chunked body above MAX_BODY=100")),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 101\r\n\r\n", ("error", 413, "Content-Length 101 is above MAX_BODY=100")),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", ("error", 400, "bad Content-Length")),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \xd9\xa3\r\n\r\n", ("error", 400, "bad Content-Length")),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", ("error", 400, "bad Content-Length")),
        (b"GET / HTTP/2.0\r\n\r\n", ("error", 505, "unsupported protocol 'HTTP/2.0'")),
        (b"GET / FOO\r\n\r\n", ("error", 400, "unsupported protocol 'FOO'")),
        (b"GET  / HTTP/1.1\r\n\r\n", ("error", 400, "malformed request line")),
        (b"GET /\x00 HTTP/1.1\r\n\r\n", ("error", 400, "control character in the request line")),
        (b"BREW / HTTP/1.1\r\nHost: a\r\n\r\n", ("error", 501, "unsupported method 'BREW'")),
        (b"get / HTTP/1.1\r\nHost: a\r\n\r\n", ("error", 400, "unsupported method 'get'")),
        (b"GET x HTTP/1.1\r\nHost: a\r\n\r\n", ("error", 400, "the request target must start with /")),
        (b"GET /%ff HTTP/1.1\r\nHost: a\r\n\r\n", ("error", 400, "the path is not UTF-8 once percent-decoded")),
        (b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", ("error", 400, "malformed header line")),
        (b"GET /" + b"a" * sm.MAX_REQUEST_LINE + b" HTTP/1.1\r\n\r\n",
         ("error", 414, f"request line longer than {sm.MAX_REQUEST_LINE} bytes")),
    ]

    def test_raw_requests(self):
        for data, expected in self.CASES:
            with self.subTest(data=data[:90]):
                self.assertEqual(parse_raw(data), expected)

    def test_when_a_request_has_arrived(self):
        """The readiness guess that lets a worker hand a slow client back to the poller."""
        for data, arrived in ((b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", True), (b"GET / HTTP/1.1\r\nHost: a\r\n", False),
                              (b"G", False), (b"GET / HTTP/1.1\nHost: a\n\n", True),
                              (b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nabcd", False),
                              (b"POST / HTTP/1.1\r\ncontent-length:5\r\n\r\nabcde", True),
                              (b"POST / HTTP/1.1\r\nContent-Length: 101\r\n\r\n", True),  # a 413 at once
                              (b"POST / HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n", True),
                              (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n", True),
                              (b"GET / HTTP/1.1\r\nx: " + b"v" * sm.HEAD_WAIT_LIMIT, True)):  # the parser refuses it
            with self.subTest(data=data[:60]):
                self.assertIs(sm.request_missing(data, 0, 100)[0] == 0, arrived)
        pipelined = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nab"
        self.assertEqual(sm.request_missing(pipelined, pipelined.index(b"POST"), 100)[:2], (1, 3))
        self.assertEqual(sm.request_missing(pipelined + b"c", pipelined.index(b"POST"), 100)[:2], (0, 3))

    def test_a_body_still_coming_is_charged_first_and_gathered_into_one_buffer(self):
        budget = sm.Budget(100)
        client, server = socket.socketpair()
        self.addCleanup(client.close)
        self.addCleanup(server.close)
        reader = sm.SocketReader(server)
        client.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 60\r\n\r\n" + b"x" * 10)
        reader.fill()
        self.assertFalse(reader.arrived(1000, budget))
        self.assertEqual((budget.used, type(reader.body), reader.body_got), (60, bytearray, 10))
        client.sendall(b"y" * 50 + b"GET / HTTP/1.1\r\n")  # the next request stays in the socket
        reader.fill()
        self.assertTrue(reader.arrived(1000, budget))
        head = sm.read_request_head(reader, 1000)
        self.assertEqual(reader.read(head.length), b"x" * 10 + b"y" * 50)
        self.assertEqual(reader.take_charge(), 60)  # the request's now: Node.release gives it back
        self.assertEqual(reader.readline(100), b"GET / HTTP/1.1\r\n")
        client.sendall(b"Host: a\r\n\r\nPOST / HTTP/1.1\r\nHost: a\r\nContent-Length: 50\r\n\r\n")
        sm.read_header_lines(reader)
        self.assertTrue(reader.arrived(1000, budget))  # does not fit: handed on at once, its worker answers 503
        self.assertEqual((budget.used, reader.body), (60, None))
        budget.release(60)
        self.assertFalse(reader.arrived(1000, budget))
        reader.release_charge()  # the connection closed while the body was coming
        self.assertEqual(budget.used, 0)

    def test_expect_continue_only_for_http_1_1_with_a_body(self):
        import io
        for data, expected in ((b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n", True),
                               (b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n", False),
                               (b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n", False)):
            with self.subTest(data=data):
                self.assertIs(bool(sm.read_request_head(io.BytesIO(data), 10).expects_continue), expected)

    def test_answers_are_strict_json_and_say_how_the_connection_goes_on(self):
        data = sm.json_bytes({"a": [1.5, float("nan"), {"b": float("inf")}], "c": -float("inf")})
        self.assertEqual(json.loads(data, parse_constant=lambda name: self.fail(name)),
                         {"a": [1.5, None, {"b": None}], "c": None})
        answer = sm.encode_answer(200, b"{}", connection="keep-alive", extra_headers=(("Retry-After", "1"),))
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"))
        self.assertIn(b"\r\nRetry-After: 1\r\nConnection: keep-alive\r\n\r\n{}", answer)
        self.assertTrue(sm.encode_answer(200, b"{}", head_only=True).endswith(b"\r\n\r\n"))


# --- Directives -----------------------------------------------------------------------------------------------
# Directive values and their resolution (SPEC 2), then through real nodes.

class DirectivesValuesTest(unittest.TestCase):
    """Directive values (durations, sizes, probabilities, distributions) and their resolution."""

    config = sm.Config(host="t")

    def test_durations_and_sizes(self):
        for text, seconds in [("200ms", 0.2), ("1.5s", 1.5), ("2m", 120), ("0.5", 0.5), (".25s", 0.25), ("3", 3)]:
            self.assertAlmostEqual(sm.parse_duration(text), seconds)
        for text in ["", "fast", "1h", "-1s", "1 s", "1e3"]:
            self.assertRaises(ValueError, sm.parse_duration, text)
        for text, size in [("512", 512), ("10k", 10240), ("2m", 2 * 1024 ** 2), ("1KB", 1024)]:
            self.assertEqual(sm.parse_size(text), size)
        self.assertRaises(ValueError, sm.parse_size, "lots")

    def test_probabilities_as_fractions_or_percentages(self):
        for text, value in [("0.25", 0.25), ("25%", 0.25), ("100%", 1.0), ("0%", 0.0), ("1", 1.0), ("0.5%", 0.005)]:
            self.assertAlmostEqual(sm.parse_probability(text), value)
        for text in ["", "%", "1.5", "150%", "-1%", "nan", "half"]:
            self.assertRaises(ValueError, sm.parse_probability, text)

    def test_delay_distributions(self):
        rng = __import__("random").Random(1)
        self.assertEqual(sm.parse_delay("200ms").sample(rng), 0.2)
        samples = [sm.parse_delay("100ms..300ms").sample(rng) for _ in range(500)]
        self.assertTrue(all(0.1 <= s <= 0.3 for s in samples))
        self.assertLess(abs(sum(samples) / len(samples) - 0.2), 0.02)
        weighted = [sm.parse_delay("10ms:0.9,2s:0.1").sample(rng) for _ in range(2000)]
        self.assertEqual(set(weighted), {0.01, 2.0})
        self.assertLess(abs(weighted.count(2.0) / 2000 - 0.1), 0.03)
        self.assertEqual(sm.parse_delay("1s:0.5,2s:0.5").maximum, 2.0)

    def test_resolve_merges_defaults_and_request_and_checks_caps(self):
        directives = sm.Directives.resolve(self.config, {"delay": "1s", "error": "0.5"}, {"delay": "2s", "parallel": None})
        self.assertEqual((directives.delay.low, directives.error, directives.parallel), (2.0, 0.5, True))
        self.assertEqual(sm.Directives.resolve(self.config, {}, {}).timeout, 30.0)
        for requested, limit in [({"delay": "61s"}, "MAX_DELAY"), ({"delay": "1s..2m"}, "MAX_DELAY"),
                                 ({"size": "11m"}, "MAX_SIZE"), ({"cpu": "6s"}, "MAX_CPU"),
                                 ({"timeout": "301s"}, "MAX_TIMEOUT")]:
            with self.subTest(requested=requested), self.assertRaisesRegex(sm.DirectiveError, limit):
                sm.Directives.resolve(self.config, {}, requested)
        self.assertRaises(sm.DirectiveError, sm.Directives.resolve, self.config, {}, {"timeout": "0"})
        self.assertRaisesRegex(sm.DirectiveError, "unknown directive 'bogus'",
                               sm.Directives.resolve, self.config, {}, {"bogus": "1"})

    def failures(self, defaults, requested, n=4000):
        rng = __import__("random").Random(7)
        directives = sm.Directives.resolve(self.config, defaults, requested)
        return [directives.failure_status(rng) for _ in range(n)]

    def test_failure_rules(self):
        self.assertEqual(set(self.failures({}, {})), {None})
        self.assertEqual(set(self.failures({}, {"status": "503"})), {503})  # status alone always fails
        self.assertEqual(set(self.failures({"status": "503"}, {})), {503})  # one meaning: alone, it always fails
        self.assertEqual(set(self.failures({"status": "503"}, {"error": "0"})), {None})
        self.assertEqual(set(self.failures({"error": "0"}, {"status": "503"})), {503})
        errors = self.failures({}, {"error": "0.3"})
        self.assertEqual(set(errors), {None, 500})
        self.assertLess(abs(errors.count(500) / len(errors) - 0.3), 0.03)
        self.assertEqual(set(self.failures({"status": "429"}, {"error": "1"})), {429})
        weighted = self.failures({}, {"status": "503:0.2,429:0.1"})
        self.assertLess(abs(weighted.count(503) / len(weighted) - 0.2), 0.03)
        self.assertLess(abs(weighted.count(429) / len(weighted) - 0.1), 0.03)
        self.assertLess(abs(weighted.count(None) / len(weighted) - 0.7), 0.03)

    def test_split_query(self):
        self.assertEqual(sm.split_query("delay=1s&parallel&view=tree&x=%32"),
                         {"delay": "1s", "parallel": None, "view": "tree", "x": "2"})

    def test_node_spec_uses_the_directive_syntax(self):
        self.assertEqual(sm.parse_node_spec("B;delay=0.5;version=v2;parallel"),
                         ("b", "v2", {"delay": "0.5", "parallel": "true"}))
        for bad in ["", "b;dealy=1", "b_c", "b;error=2"]:
            self.assertRaises(ValueError, sm.parse_node_spec, bad)


class DirectivesOverHttpTest(unittest.TestCase):
    """Directives through real nodes: per hop, from the query and the environment, caps, faults."""

    def test_directives_apply_to_their_hop_only(self):
        with Mesh({"a": {}, "b": {}, "c": {}}) as mesh:
            started = time.perf_counter()
            _s, _h, answer = mesh.request("a", "/b;delay=300ms/c")
            elapsed = time.perf_counter() - started
        b, c = answer["next_node"][0], answer["next_node"][0]["next_node"][0]
        self.assertEqual(b["delay"], 0.3)
        self.assertNotIn("delay", c)
        self.assertNotIn("delay", answer)
        self.assertGreaterEqual(elapsed, 0.3)
        self.assertGreaterEqual(answer["elapsed_time"], b["elapsed_time"])
        self.assertGreaterEqual(b["elapsed_time"], 0.3)

    def test_query_string_directives_are_the_entry_nodes(self):
        with Mesh({"a": {}, "b": {}}) as mesh:
            status, _h, answer = mesh.request("a", "/b?status=503")
            self.assertEqual((status, answer["status"]), (503, 503))
            self.assertEqual(answer["next_node"], [])  # a failing node calls no one
            self.assertIn("503", answer["error"])
            status, _h, answer = mesh.request("a", "/?size=20k")
            self.assertEqual(status, 200)
            self.assertLess(abs(len(json.dumps(answer)) - 20480), 200)

    def test_environment_defaults_and_request_override(self):
        with Mesh({"a": {"delay": "0.2", "status": "418"}, "b": {}}) as mesh:
            _s, _h, answer = mesh.request("a", "/")
            self.assertEqual((answer["delay"], answer["status"]), (0.2, 418))  # status alone fails, as in a route
            _s, _h, answer = mesh.request("a", "/?error=0")
            self.assertEqual(answer["status"], 200)
            _s, _h, answer = mesh.request("a", "/?delay=0&error=1")
            self.assertNotIn("delay", answer)
            self.assertEqual(answer["status"], 418)

    def test_hop_directives_above_a_cap_are_refused_at_the_entry(self):
        with Mesh({"a": {}, "b": {}}) as mesh:
            status, _h, answer = mesh.request("a", "/b/(b;delay=100s)")
            self.assertEqual(status, 400)
            self.assertIn("MAX_DELAY", answer["error"])
            self.assertEqual(mesh.node("b").metrics.requests, {})  # nobody was called

    def test_timeout_is_504(self):
        with Mesh({"a": {}, "b": {}}) as mesh:
            started = time.perf_counter()
            status, _h, answer = mesh.request("a", "/b;delay=2s?timeout=300ms")
            elapsed = time.perf_counter() - started
        self.assertEqual((status, answer["next_node"][0]["status"]), (504, 504))
        self.assertIn("timeout", answer["next_node"][0]["error"])
        self.assertLess(elapsed, 1.5)

    def test_a_child_answering_504_is_a_failed_call_not_a_timeout(self):
        with Mesh({"a": {}, "b": {}, "c": {}}) as mesh:
            self.assertEqual(mesh.request("a", "/b;status=504")[0], 502)
            status, _h, answer = mesh.request("a", "/b;timeout=200ms/c;delay=1s", timeout=10)
            self.assertEqual(status, 502)  # b timed out calling c (504); a saw b answer 504
            self.assertEqual(answer["next_node"][0]["status"], 504)
            self.assertTrue(answer["next_node"][0]["next_node"][0]["timeout"])

    def test_reset_closes_without_an_answer(self):
        with Mesh({"a": {}, "b": {}}) as mesh:
            status, _h, answer = mesh.request("a", "/b;reset=1")
            self.assertEqual(status, 502)
            self.assertIn("reset", answer["next_node"][0]["error"])
            with self.assertRaises(ConnectionResetError):  # an RST, not a clean close
                mesh.request("b", "/?reset=1")

    def test_cpu_burn(self):
        with Mesh({"a": {}}) as mesh:
            before = time.process_time()
            _s, _h, answer = mesh.request("a", "/?cpu=200ms")
            burnt = time.process_time() - before
        self.assertEqual(answer["cpu"], 0.2)
        self.assertGreater(burnt, 0.19)


class DirectivesOneMeaningTest(unittest.TestCase):
    """A directive means the same in a route, a query, a node spec, /-/defaults and the environment."""
    config = sm.Config(host="n")

    def test_every_directive_resolves_the_same_from_every_source(self):
        self.assertEqual({row[0] for row in DIRECTIVE_SOURCES}, set(sm.DIRECTIVES))  # a new one joins the table
        for key, text, variable, env_text in DIRECTIVE_SOURCES:
            with self.subTest(directive=key):
                written = key if text is None else f"{key}={text}"
                resolve = functools.partial(sm.Directives.resolve, self.config)
                expected = resolve({}, sm.split_query(written))
                self.assertNotEqual(expected, resolve({}, {}))  # the directive changes something
                self.assertEqual(resolve(dict(sm.parse_route(f"/n;{written}")[0][0].directives), {}), expected)
                self.assertEqual(resolve(sm.parse_node_spec(f"n;{written}")[2], {}), expected)
                self.assertEqual(resolve(sm.Config.from_env({variable: env_text}).defaults, {}), expected)
                node = sm.build_node(self.config)
                node.set_defaults(sm.split_query(written))
                self.assertEqual(node.base_directives, expected)
                manifest = sm._node_env(sm.parse_node_spec(f"n;{written}")[2], "")  # what `manifests` deploys
                env = {item["name"]: item.get("value") for item in manifest}
                self.assertEqual(resolve(sm.Config.from_env({variable: env[variable]}).defaults, {}), expected)

    def test_status_alone_fails_every_request_from_every_source_over_http(self):
        env_config = sm.Config.from_env({"ERROR_STATUS": "503"}, port=0, address="127.0.0.1", log_level="warning")
        with Mesh({"a": {}, "spec": sm.parse_node_spec("spec;status=503")[2], "posted": {},
                   "env": env_config.defaults}) as mesh:
            self.assertEqual(mesh.request("posted", "/-/defaults?status=503", method="POST")[0], 200)
            for name, path in [("a", "/?status=503"), ("spec", "/"), ("posted", "/"), ("env", "/")]:
                with self.subTest(node=name):
                    status, _h, answer = mesh.request(name, path)
                    self.assertEqual((status, answer["error"]), (503, "injected failure 503"))
            _s, _h, answer = mesh.request("a", "/a;status=503")
            self.assertEqual(answer["next_node"][0]["status"], 503)
            self.assertEqual(mesh.request("posted", "/?error=0")[0], 200)  # a request's error wins


class DirectivesResponseShapingTest(unittest.TestCase):
    """``response-header=name:value|...`` adds headers to a hop's answer; ``body`` echoes the request body."""

    def test_response_headers_are_validated(self):
        self.assertEqual(sm.parse_response_headers("Set-Cookie: lab=1; Path=/|cache-control:no-store"),
                         (("set-cookie", "lab=1; Path=/"), ("cache-control", "no-store")))
        for bad in ["x-a", "x a:1", "content-length:3", "transfer-encoding:chunked", "connection:close",
                    "content-type:text/plain", "proxy-x:1", "x-a:1\r\nx-b:2", "x-a:\x00", "x-a:é",
                    "|".join(f"x-{i}:1" for i in range(9)), "x-a:" + "v" * 1100]:
            self.assertRaises(ValueError, sm.parse_response_headers, bad)

    def test_a_hop_adds_headers_to_its_answer(self):
        with Mesh({"a": {}, "b": {"response-header": "x-served-by:b"}}) as mesh:
            status, headers, _answer = mesh.request("a", "/?response-header=set-cookie:lab%3D1|retry-after:2")
            self.assertEqual((status, headers["set-cookie"], headers["retry-after"]), (200, "lab=1", "2"))
            self.assertEqual(mesh.request("b", "/")[1]["x-served-by"], "b")
            self.assertNotIn("x-served-by", mesh.request("a", "/b")[1])  # b's answer, not a's
            status, _h, answer = mesh.request("a", "/?response-header=x-a:1%0d%0ax-b:2")
            self.assertEqual(status, 400)
            self.assertIn("response-header", answer["error"])
            self.assertEqual(mesh.request("a", "/b;response-header=content-length:1")[0], 400)

    def test_the_body_is_echoed_within_the_request_budget(self):
        with Mesh({"a": {}, "b": {}}, max_route_bytes=64 * 1024) as mesh:
            _s, _h, answer = mesh.request("a", "/b;body?body", method="POST", body="héllo".encode())
            self.assertEqual((answer["body"], answer["next_node"][0]["body"]), ("héllo", "héllo"))
            self.assertNotIn("body", mesh.request("a", "/", method="POST", body=b"x")[2])
            status, headers, answer = mesh.request("a", "/?body", method="POST", body=b"x" * 20000)
            self.assertEqual((status, headers["retry-after"]), (503, "1"))
            self.assertIn("MAX_ROUTE_BYTES", answer["error"])


# --- Route ----------------------------------------------------------------------------------------------------
# The route grammar (SPEC 1), pure, then through real nodes.

class RouteGrammarTest(unittest.TestCase):
    """The route grammar as pure functions: parse, format, plan, size."""

    def test_valid_routes(self):
        cases = {
            "/": (),
            "/b": (((T("b"),),)),
            "/b/c": ((T("b"),), (T("c"),)),
            "/b/c/": ((T("b"),), (T("c"),)),
            "/B/C.NS.svc": ((T("b"),), (T("c.ns.svc"),)),
            "/b~c/d": ((T("b"), T("c")), (T("d"),)),
            "/b:8080/c": ((T("b", 8080),), (T("c"),)),
            "/b;delay=200ms;error=0.5/c": ((T("b", None, (("delay", "200ms"), ("error", "0.5"))),), (T("c"),)),
            "/b;parallel~c": ((T("b", None, (("parallel", None),)), T("c")),),
            "/(b/d)~(c/e)/f": ((sm.Group(((T("b"),), (T("d"),))), sm.Group(((T("c"),), (T("e"),)))), (T("f"),)),
            "/((b))": ((sm.Group(((sm.Group(((T("b"),),)),),)),),),
            "/b;delay=10ms:0.9,2s:0.1": ((T("b", None, (("delay", "10ms:0.9,2s:0.1"),)),),),
            "/b;status=503:0.2,429:0.1": ((T("b", None, (("status", "503:0.2,429:0.1"),)),),),
        }
        for path, steps in cases.items():
            with self.subTest(path=path):
                self.assertEqual(sm.parse_route(path), steps)

    def test_errors_say_what_and_where(self):
        cases = [
            ("/b//c", "empty step", 3), ("//", "empty step", 1), ("/b~", "empty step", 3), ("/~b", "empty step", 1),
            ("/(b/c", "'(' is not closed", 1), ("/b)/c", "')' has no '('", 2), ("/()", "empty step", 2),
            ("/b_c", "unexpected character '_'", 2), ("/-b", "label '-b'", 1), ("/b-", "label 'b-'", 1),
            ("/a..b", "empty label", 1), ("/" + "x" * 64, "label", 1), ("/" + ".".join(["x" * 60] * 5), "253", 1),
            ("/b:0", "bad port", 3), ("/b:70000", "bad port", 3), ("/b:/c", "bad port", 3),
            ("/b;dealy=1s", "unknown directive 'dealy'", 3), ("/b;delay=fast", "bad duration", 3),
            ("/b;error=1.5", "probability", 3), ("/b;delay", "needs a value", 3), ("/b;status=200", "400 to 599", 3),
            ("/b;delay=2s..1s", "low end", 3), ("/b;delay=1s:0.7,2s:0.7", "more than 1", 3),
            ("/b c", "unexpected character ' '", 2), ("/b\x00", "unexpected character", 2), ("/b?c", "unexpected", 2),
            ("b/c", "must start with '/'", 0), ("/" + "(" * 40 + "b" + ")" * 40, "nested deeper", 33),
        ]
        for path, message, position in cases:
            with self.subTest(path=path):
                with self.assertRaises(sm.RouteError) as caught:
                    sm.parse_route(path)
                self.assertIn(message, caught.exception.message)
                self.assertEqual(caught.exception.position, position)

    def test_format_route_is_the_inverse_of_parse(self):
        for path in ["/b", "/b/c", "/b~c/d", "/(b/d)~(c/e)/f", "/b:8080;delay=1s;parallel/c", "/((b~c)/d)/e"]:
            with self.subTest(path=path):
                self.assertEqual("/" + sm.format_route(sm.parse_route(path)), path)

    def test_plan_calls_appends_the_rest_to_groups(self):
        calls = sm.plan_calls(sm.parse_route("/(b/d)~(c/e)~g/f"))
        self.assertEqual([(t.name, sm.format_route(rest)) for t, rest in calls],
                         [("b", "d/f"), ("c", "e/f"), ("g", "f")])
        calls = sm.plan_calls(sm.parse_route("/((b~c)/d)/e"))
        self.assertEqual([(t.name, sm.format_route(rest)) for t, rest in calls], [("b", "d/e"), ("c", "d/e")])
        self.assertEqual(sm.plan_calls(()), [])

    def test_route_size_counts_every_call_of_the_tree(self):
        for path, size in [("/b", (1, 1)), ("/b/c", (2, 2)), ("/b~c/d", (4, 2)), ("/b~c/d~e", (6, 2)),
                           ("/(b/d)~(c/e)/f", (6, 3)), ("/b/a/b/a", (4, 4))]:
            with self.subTest(path=path):
                self.assertEqual(sm.route_size(sm.parse_route(path), 1000, 1000), size)

    def test_route_size_stops_early_on_exponential_routes(self):
        steps = sm.parse_route("/" + "/".join(["a~b~c~d"] * 40))  # 4**40 calls if expanded
        started = time.perf_counter()
        calls, _depth = sm.route_size(steps, 100, 1000)
        self.assertGreater(calls, 100)
        self.assertLess(time.perf_counter() - started, 0.5)
        calls, depth = sm.route_size(sm.parse_route("/" + "/".join(["a"] * 40)), 1000, 16)
        self.assertGreater(depth, 16)

    def test_parsing_stops_at_max_calls_targets_and_refuses_a_directive_twice(self):
        self.assertEqual(len(sm.plan_calls(sm.parse_route("/" + "~".join(["b"] * 5), max_calls=5))), 5)
        path = "/" + "~".join(["b"] * 6) + "~" + "x" * 16000  # a parse holds at most max_calls targets
        with self.assertRaises(sm.RouteError) as caught:
            sm.parse_route(path, max_calls=5)
        self.assertIn("MAX_CALLS=5", caught.exception.message)
        self.assertEqual(caught.exception.position, 11)
        with self.assertRaises(sm.RouteError) as caught:
            sm.parse_route("/b;delay=1ms;error=0.1;delay=2ms")
        self.assertIn("'delay' is given twice", caught.exception.message)
        self.assertEqual(caught.exception.position, 23)

    def test_ip_literals(self):
        for name in ["127.0.0.1", "127.1", "10.0.0.1", "2130706433", "0x7f000001", "0x7f.1"]:
            self.assertTrue(sm.is_ip_literal(name), name)
        for name in ["b", "b.ns.svc.cluster.local", "x1", "a-1.b2", "0xfoo"]:
            self.assertFalse(sm.is_ip_literal(name), name)


class RouteOverHttpTest(unittest.TestCase):
    """A route through real nodes: nesting, reserved names, refusals before any call."""

    def test_reserved_name_after_the_first_step_is_a_call(self):
        with Mesh({"a": {}, "metrics": {}, "healthz": {}}) as mesh:
            status, _h, answer = mesh.request("a", "/(metrics)/healthz")
        self.assertEqual(status, 200)
        self.assertEqual(hosts(answer), ["a", [["metrics", [["healthz", []]]]]])
        self.assertEqual(sm.forward_route(sm.parse_route("/metrics/b")), "(metrics)/b")
        self.assertEqual(sm.forward_route(sm.parse_route("/metrics;delay=1s/b")), "metrics;delay=1s/b")

    def test_bad_route_is_a_400_with_position(self):
        with Mesh({"a": {}}) as mesh:
            status, _h, answer = mesh.request("a", "/b/%28c")
            self.assertEqual(status, 400)
            self.assertEqual(answer["position"], 3)
            self.assertIn("not closed", answer["error"])
            status, _h, answer = mesh.request("a", "/b?dealy=1s")
            self.assertEqual(status, 400)
            self.assertIn("dealy", answer["error"])

    def test_limits_refuse_before_any_call(self):
        with Mesh({"a": {}, "b": {}}, max_calls=5, max_depth=3) as mesh:
            status, _h, answer = mesh.request("a", "/b~b~b/b~b")
            self.assertEqual(status, 400)
            self.assertIn("MAX_CALLS=5", answer["error"])
            status, _h, answer = mesh.request("a", "/b/b/b/b")
            self.assertEqual(status, 400)
            self.assertIn("MAX_DEPTH=3", answer["error"])
            self.assertEqual(mesh.node("b").metrics.requests, {})  # nobody was called


class RouteDefaultTest(unittest.TestCase):
    """ROUTE / ``route=``: a deployed topology, driven by a plain request for "/", cycles stopped at MAX_DEPTH."""

    def test_a_request_for_the_root_follows_the_default_route_and_a_request_route_wins(self):
        with Mesh({"a": {"route": "b~c"}, "b": {"route": "/d"}, "c": {}, "d": {}}) as mesh:
            _s, _h, answer = mesh.request("a", "/")
            self.assertEqual(hosts(answer), ["a", [["b", [["d", []]]], ["c", []]]])
            _s, _h, answer = mesh.request("a", "/c")
            self.assertEqual(hosts(answer), ["a", [["c", []]]])  # a route in the request wins
            _s, _h, answer = mesh.request("a", "/?route=c")  # the directive, from a request, means the same
            self.assertEqual(hosts(answer), ["a", [["c", []]]])

    def test_a_cycle_of_default_routes_ends_at_max_depth(self):
        with Mesh({"a": {"route": "b"}, "b": {"route": "a"}}, max_depth=4) as mesh:
            status, _h, answer = mesh.request("a", "/", timeout=10)
        chain = deepest(answer)
        self.assertEqual([record["host"] for record in chain], ["a", "b", "a", "b", "a"])
        self.assertEqual(status, 502)
        last = chain[-1]
        self.assertEqual((last["status"], last["rule"], last["hops"]), (508, "MAX_DEPTH", 4))
        self.assertIn("MAX_DEPTH=4", last["error"])

    def test_the_hop_count_travels_with_each_call_and_a_bad_one_is_refused(self):
        with Mesh({"a": {}, "b": {"headers": "true"}}) as mesh:
            _s, _h, answer = mesh.request("a", "/b", headers={"x-simplemesh-hops": "2"})
            self.assertEqual(answer["next_node"][0]["headers"]["x-simplemesh-hops"], "3")
            status, _h, answer = mesh.request("a", "/b", headers={"x-simplemesh-hops": "many"})
            self.assertEqual(status, 400)
            self.assertIn("x-simplemesh-hops", answer["error"])
            status, _h, _answer = mesh.request("a", "/b", headers={"x-simplemesh-hops": "16"})
            self.assertEqual(status, 508)

    def test_a_bad_default_route_stops_the_node_at_start_up(self):
        self.assertRaisesRegex(sm.ConfigError, "ROUTE", sm.Config.from_env, {"ROUTE": "b//c"})
        self.assertEqual(sm.parse_node_spec("a;route=b~c")[2], {"route": "b~c"})
        self.assertRaisesRegex(ValueError, "route", sm.parse_node_spec, "a;route=b(")

    def test_manifests_deploy_the_default_route(self):
        objects = sm.build_manifests([sm.parse_node_spec(s) for s in ("a;route=b~c", "b", "c")])
        env = container_env(node_deployments(objects)[0])
        self.assertEqual((env["HOST"], env["ROUTE"]), ("a", "b~c"))


# --- Budgets --------------------------------------------------------------------------------------------------
# What a request may spend: route cost, request and node budgets, the route cache (SPEC 8).

class BudgetAccountingTest(unittest.TestCase):
    """Route cost, request and node budgets, the route cache: pure, no sockets."""

    def test_route_cost_sums_size_and_cpu_over_every_call(self):
        k, m = 1024, 1024 * 1024
        for path, cost in [("/b", (0, 0.0)), ("/b;size=1k", (k, 0.0)), ("/b;size=1k;cpu=20ms/c;cpu=1s", (k, 1.02)),
                           ("/b;size=1k~c;size=2k/d;size=1m", (3 * k + 2 * m, 0.0)),  # d is called by b and by c
                           ("/(b;cpu=1s/d)~(c/e;cpu=2s)/f;cpu=100ms", (0, 3.2)),
                           ("/b~c/d~e/f;size=1k", (4 * k, 0.0)), ("/b;size=1k/b;size=1k/b;size=1k", (3 * k, 0.0))]:
            with self.subTest(path=path):
                size, cpu, calls = sm.route_cost(sm.parse_route(path), 1000)
                self.assertEqual((size, round(cpu, 6)), cost)
                self.assertEqual(calls, sm.route_size(sm.parse_route(path), 1000, 1000)[0])

    def test_route_cost_stops_after_max_calls(self):
        steps = sm.parse_route("/" + "/".join(["a;size=1~b;size=1"] * 40))  # 2**40 calls if expanded
        started = time.perf_counter()
        size, _cpu, _calls = sm.route_cost(steps, 100)
        self.assertGreater(size, 100)
        self.assertLess(time.perf_counter() - started, 0.5)

    def test_request_budget_charges_itself_and_the_node(self):
        node = sm.Budget(1000)
        first = sm.RequestBudget(600, node)
        self.assertTrue(first.charge(300))
        self.assertTrue(first.charge(300))  # at the request's limit
        self.assertEqual(node.used, 600)
        self.assertFalse(first.charge(1))  # past it: nothing counted
        self.assertIn("MAX_ROUTE_BYTES=600", first.refused)
        self.assertEqual((first.used, node.used), (600, 600))
        second = sm.RequestBudget(600, node)
        self.assertTrue(second.charge(400))  # the node is full
        self.assertFalse(second.charge(1))
        self.assertIn("MAX_INFLIGHT_BYTES=1000", second.refused)
        self.assertEqual((second.used, node.used), (400, 1000))
        first.close()
        first.close()  # twice gives back nothing more
        self.assertEqual(node.used, 400)
        self.assertTrue(second.charge(1))
        second.close()
        self.assertEqual(node.used, 0)

    def test_request_budget_is_shared_by_parallel_branches(self):
        node = sm.Budget(10 ** 9)
        budget = sm.RequestBudget(50_000, node)
        taken = []

        def charge():
            taken.append(sum(7 for _ in range(2000) if budget.charge(7)))

        threads = [threading.Thread(target=charge) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(sum(taken), budget.used)
        self.assertEqual(budget.used, 50_000 - 50_000 % 7)
        self.assertEqual(node.used, budget.used)
        budget.close()
        self.assertEqual(node.used, 0)

    def test_route_cache_cost_is_above_what_a_parsed_route_holds(self):
        import tracemalloc
        routes = ["/b", "/b/c", "/" + "~".join(["a"] * 100), "/" + "/".join(["a;delay=1ms;size=1k;parallel"] * 16),
                  "/" + "(a~b)/" * 16 + "c", "/" + "~".join(["b:8080;headers"] * 100), "/" + ".".join(["x" * 62] * 4) + ";cpu=1ms"]
        for path in routes:
            with self.subTest(path=path[:40]):
                tracemalloc.start()
                try:
                    steps = sm.parse_route(path)
                    held, _peak = tracemalloc.get_traced_memory()
                finally:
                    tracemalloc.stop()
                self.assertTrue(steps)
                self.assertLess(held, sm.RouteCache().cost(path))

    def test_route_cache_is_bounded_in_bytes(self):
        cache = sm.RouteCache(max_bytes=100_000, max_path=1000)
        for index in range(1000):
            path = f"/b{index}/c"
            cache.put(path, sm.parse_route(path))
        self.assertLessEqual(cache.size, 100_000)
        self.assertEqual(cache.size, sum(cache.cost(path) for path in cache.entries))
        self.assertIsNone(cache.get("/b0/c"))  # the oldest went first
        self.assertIsNotNone(cache.get("/b999/c"))
        cache.put("/" + "b" * 1001, ())
        self.assertNotIn("/" + "b" * 1001, cache.entries)  # a long route is not kept


# --- Trace context --------------------------------------------------------------------------------------------
# W3C traceparent/tracestate, B3, sampling, propagation through a node (SPEC 5).

class TraceParentRulesTest(unittest.TestCase):
    """Each case quotes the W3C Trace Context rule it checks (Recommendation, level 1; level 2 where noted)."""

    def test_valid_version_00(self):
        self.assertEqual(sm.parse_traceparent(VALID_TP),
                         ("00", "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", 1))

    def test_version_ff_is_invalid(self):
        # "Version ff is invalid."
        self.assertIsNone(sm.parse_traceparent("ff" + VALID_TP[2:]))

    def test_only_lowercase_hex(self):
        # HEXDIGLC = DIGIT / "a" / "b" / "c" / "d" / "e" / "f" ; lowercase hex character
        self.assertIsNone(sm.parse_traceparent(VALID_TP.upper()))
        self.assertIsNone(sm.parse_traceparent(VALID_TP.replace("4bf9", "4BF9")))
        self.assertIsNone(sm.parse_traceparent(VALID_TP.replace("00f0", "00g0")))

    def test_all_zero_ids_are_invalid(self):
        # "All bytes as zero (00000000000000000000000000000000) is considered an invalid value." (trace-id)
        self.assertIsNone(sm.parse_traceparent(f"00-{'0' * 32}-00f067aa0ba902b7-01"))
        # "All bytes as zero (0000000000000000) is considered an invalid value." (parent-id)
        self.assertIsNone(sm.parse_traceparent(f"00-4bf92f3577b34da6a3ce929d0e0e4736-{'0' * 16}-01"))

    def test_version_00_has_no_more_fields(self):
        # Version 00 is exactly 55 characters: anything after trace-flags makes it invalid.
        self.assertIsNone(sm.parse_traceparent(VALID_TP + "-00"))
        self.assertIsNone(sm.parse_traceparent(VALID_TP + "0"))
        self.assertIsNone(sm.parse_traceparent(VALID_TP[:-1]))

    def test_higher_version_is_parsed_as_00(self):
        # "If a higher version is detected, the implementation SHOULD try to parse it": trace-id, parent-id and
        # flags as in 00; "Vendors MUST check that the 2 characters are either the end of the string or a dash."
        self.assertEqual(sm.parse_traceparent("cc" + VALID_TP[2:] + "-what-the-future-holds")[1:],
                         ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", 1))
        self.assertEqual(sm.parse_traceparent("01" + VALID_TP[2:])[0], "01")
        self.assertIsNone(sm.parse_traceparent("cc" + VALID_TP[2:] + "x-future"))
        # "If the size of the header is shorter than 55 characters, the vendor should not parse the header".
        self.assertIsNone(sm.parse_traceparent("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"))

    def test_separators_and_field_widths(self):
        self.assertIsNone(sm.parse_traceparent(VALID_TP.replace("-", "_")))
        self.assertIsNone(sm.parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01"))
        self.assertIsNone(sm.parse_traceparent(VALID_TP[:-2] + "0x"))

    def test_repeated_traceparent_headers_are_invalid(self):
        # Two traceparent headers arrive joined with ", " (RFC 9110), which is not one valid value.
        self.assertIsNone(sm.parse_traceparent(VALID_TP + ", " + VALID_TP))

    def test_optional_whitespace_around_the_value(self):
        self.assertEqual(sm.parse_traceparent(" " + VALID_TP + "\t"), sm.parse_traceparent(VALID_TP))
        self.assertIsNotNone(sm.parse_traceparent(VALID_TP))


class TraceStateRulesTest(unittest.TestCase):
    """The current W3C Trace Context editor's draft (Level 2): each case quotes the rule it checks."""

    def test_keys_values_and_order_are_kept(self):
        self.assertEqual(sm.parse_tracestate("congo=t61rcWkgMzE, rojo=00f067aa0ba902b7,tenant1@sys=v"),
                         ("congo=t61rcWkgMzE", "rojo=00f067aa0ba902b7", "tenant1@sys=v"))

    def test_empty_list_members_are_allowed(self):
        # "Empty and whitespace-only list members are allowed."
        self.assertEqual(sm.parse_tracestate("a=1,, ,b=2"), ("a=1", "b=2"))
        self.assertEqual(sm.parse_tracestate(" \t "), ())

    def test_optional_whitespace_around_members(self):
        # "Spaces and horizontal tabs surrounding list-members are ignored."
        self.assertEqual(sm.parse_tracestate("foo=1 \t , \t bar=2, \t baz=3"), ("foo=1", "bar=2", "baz=3"))
        self.assertEqual(sm.parse_tracestate("\t foo=1 \t"), ("foo=1",))
        # "all leading spaces MUST be preserved as part of the value"
        self.assertEqual(sm.parse_tracestate("foo= 1"), ("foo= 1",))

    def test_level_2_key_grammar(self):
        # key = ( lcalpha / DIGIT ) 0*255 ( keychar ); keychar = lcalpha / DIGIT / "_" / "-" / "*" / "/" / "@"
        for key in ("1key", "0", "tenant@toolongsystemid", "foo@bar@baz", "foo@", "a*b/c-d_e", "z" * 256,
                    "t" * 241 + "@" + "v" * 14, "t" * 242 + "@v", "t@" + "v" * 15,
                    "abcdefghijklmnopqrstuvwxyz0123456789_-*/@a-z0-9_-*/"):
            with self.subTest(key=key):
                self.assertEqual(sm.parse_tracestate(f"{key}=1,bar=2"), (f"{key}=1", "bar=2"))
        for key in ("z" * 257, "@foo", "_a", "-a", "*a", "/a", "Foo", "foo.bar", "foo bar", "foo ", ""):
            with self.subTest(key=key):
                self.assertEqual(sm.parse_tracestate(f"{key}=1,bar=2"), ())

    def test_value_grammar(self):
        # value = 0*255(chr) nblk-chr; nblk-chr = %x21-2B / %x2D-3C / %x3E-7E; chr = %x20 / nblk-chr
        every = "".join(map(chr, range(0x20, 0x2C))) + "".join(map(chr, range(0x2D, 0x3D))) + \
            "".join(map(chr, range(0x3E, 0x7F)))
        self.assertEqual(sm.parse_tracestate("k=" + every), ("k=" + every,))
        self.assertEqual(sm.parse_tracestate("k=" + "v" * 256), ("k=" + "v" * 256,))
        for bad in ("k=" + "v" * 257, "k=", "k=a=b", "k=x\x01", "k=\u00e9", "k"):
            with self.subTest(bad=bad):
                self.assertEqual(sm.parse_tracestate(bad + ",bar=2"), ())

    def test_a_repeated_key_drops_only_the_repeat(self):
        # "Only one entry per key is allowed because the entry represents that last position in the trace":
        # the left-most entry is the latest; the repeat goes, everyone else's entries stay.
        self.assertEqual(sm.parse_tracestate("foo=1,foo=1"), ("foo=1",))
        self.assertEqual(sm.parse_tracestate("foo=1,foo=2"), ("foo=1",))
        self.assertEqual(sm.parse_tracestate("foo=1, foo=2"), ("foo=1",))  # two headers, joined
        self.assertEqual(sm.parse_tracestate("foo=1,bar=2,baz=3,foo=4"), ("foo=1", "bar=2", "baz=3"))
        self.assertEqual(sm.parse_tracestate("foo=1,foo@tenant=2,tenant@foo=3"),
                         ("foo=1", "foo@tenant=2", "tenant@foo=3"))

    def test_at_most_32_members(self):
        # "There can be a maximum of 32 list-members in a list."
        members = [f"bar{i:02d}={i:02d}" for i in range(1, 34)]
        self.assertEqual(len(sm.parse_tracestate(",".join(members[:32]))), 32)
        self.assertEqual(sm.parse_tracestate(",".join(members)), ())
        added = sm.with_ot_threshold(sm.parse_tracestate(",".join(members[:32])), "c")  # a sampler's own entry
        self.assertEqual(sm.format_tracestate(added), ",".join(["ot=th:c"] + members[:31]))

    def test_truncation_drops_long_members_first_then_from_the_end(self):
        # "Entries larger than 128 characters long SHOULD be removed first. Then entries SHOULD be removed starting
        # from the end of tracestate."
        long_member = "big=" + "x" * 130
        members = ["first=1", long_member] + [f"k{i:02d}=" + "v" * 40 for i in range(12)]
        text = sm.format_tracestate(members)
        self.assertLessEqual(len(text), 512)
        self.assertNotIn("big=", text)
        kept = text.split(",")
        self.assertEqual(kept[0], "first=1")
        self.assertEqual(kept, [m for m in members if m != long_member][:len(kept)])
        self.assertEqual(sm.format_tracestate(["a=1", "b=2"]), "a=1,b=2")
        over = [f"k{i}=" + "v" * 125 for i in range(4)]  # 4 x 128 + 3 commas = 515: the last entry goes
        self.assertEqual(sm.format_tracestate(over), ",".join(over[:3]))
        fits = [f"k{i}=" + "v" * 124 for i in range(4)]  # 511 stay whole
        self.assertEqual(sm.format_tracestate(fits), ",".join(fits))

    def test_ot_threshold_is_a_modified_key_moved_left(self):
        # "Modified keys MUST be moved to the beginning (left) of the list."
        self.assertEqual(sm.with_ot_threshold(("a=1", "ot=rv:0123456789abcd", "b=2"), "c"),
                         ("ot=th:c;rv:0123456789abcd", "a=1", "b=2"))
        self.assertEqual(sm.with_ot_threshold(("a=1", "ot=th:8"), None), ("a=1",))
        self.assertEqual(sm.with_ot_threshold(("a=1",), None), ("a=1",))
        full = ("ot=x:" + "v" * 250,)  # th would take the ot value past 256 characters: left as it was
        self.assertEqual(sm.with_ot_threshold(full, "c"), full)
        self.assertEqual(sm.ot_subkeys(("ot=th:c;rv:0123456789abcd",)), {"th": "c", "rv": "0123456789abcd"})


class TraceB3ParsingTest(unittest.TestCase):
    """openzipkin/b3-propagation: single header, multi headers, sampling states."""

    def test_single_header(self):
        self.assertEqual(sm.parse_b3({"b3": "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90"}),
                         sm.B3("80f198ee56343ba864fe8b2a57d3eff7", "e457b5a2e4d86bd1", "1", "single"))
        self.assertEqual(sm.parse_b3({"b3": "a3ce929d0e0e4736-00f067aa0ba902b7-0"}),
                         sm.B3("0000000000000000a3ce929d0e0e4736", "00f067aa0ba902b7", "0", "single"))
        self.assertEqual(sm.parse_b3({"b3": "a3ce929d0e0e4736-00f067aa0ba902b7-d"}).state, "d")
        self.assertEqual(sm.parse_b3({"b3": "a3ce929d0e0e4736-00f067aa0ba902b7"}).state, "")  # defer
        for bad in ("xyz-e457b5a2e4d86bd1", "a3ce929d0e0e4736-00f067aa0ba902b7-2", "a3ce929d0e0e4736",
                    "a3ce929d0e0e4736-00f067aa0ba902b7-1-xyz", "2", ""):
            with self.subTest(bad=bad):
                self.assertIsNone(sm.parse_b3({"b3": bad}))

    def test_a_sampling_state_alone(self):
        # "A deny decision may omit identifiers and look like this: b3: 0"
        self.assertEqual(sm.parse_b3({"b3": "0"}), sm.B3("", "", "0", "single"))
        self.assertEqual(sm.parse_b3({"b3": "d"}), sm.B3("", "", "d", "single"))
        # "While valid to propagate only a reject sampling decision (X-B3-Sampled: 0) ..."
        self.assertEqual(sm.parse_b3({"x-b3-sampled": "0"}), sm.B3("", "", "0", "multi"))
        self.assertEqual(sm.parse_b3({"x-b3-flags": "1"}), sm.B3("", "", "d", "multi"))
        self.assertIsNone(sm.parse_b3({"x-b3-parentspanid": "0020000000000001"}))

    def test_multi_header(self):
        headers = {"x-b3-traceid": "463ac35c9f6413ad48485a3953bb6124", "x-b3-spanid": "a2fb4a1d1a96d312",
                   "x-b3-sampled": "1"}
        self.assertEqual(sm.parse_b3(headers), sm.B3("463ac35c9f6413ad48485a3953bb6124", "a2fb4a1d1a96d312", "1",
                                                     "multi"))
        # "Debug is encoded as X-B3-Flags: 1"; "When extracting state headers, the first value wins."
        self.assertEqual(sm.parse_b3(dict(headers, **{"x-b3-flags": "1"})).state, "d")
        self.assertEqual(sm.parse_b3(dict(headers, **{"x-b3-sampled": "0, 1"})).state, "0")
        self.assertEqual(sm.parse_b3(dict(headers, **{"x-b3-sampled": "true"})).state, "1")  # lenient
        self.assertIsNone(sm.parse_b3({"x-b3-traceid": "463ac35c9f6413ad48485a3953bb6124"}))

    def test_single_header_wins(self):
        # "The single-header variant takes precedence over the multiple header one when extracting fields."
        headers = {"b3": "a3ce929d0e0e4736-00f067aa0ba902b7-0", "x-b3-traceid": "463ac35c9f6413ad48485a3953bb6124",
                   "x-b3-spanid": "a2fb4a1d1a96d312", "x-b3-sampled": "1"}
        self.assertEqual(sm.parse_b3(headers).form, "single")


class TraceSamplerTest(unittest.TestCase):
    """OpenTelemetry's consistent probability sampling, with vectors computed from the spec's own tables."""

    def test_parent_based_follows_the_parent(self):
        tracing = sm.TracingConfig(endpoint="http://x/v1/traces", sampler="parentbased_always_off")
        self.assertEqual(tracing.sample("f" * 32, True), (True, ()))
        self.assertEqual(tracing.sample("f" * 32, None), (False, ()))
        self.assertFalse(sm.TracingConfig(endpoint="http://x", sampler="always_off").sample("f" * 32, True)[0])

    def test_thresholds_from_the_spec_table(self):
        # "Converting floating-point probability to threshold value", precision 4 (the SDKs' default).
        table = {1.0: "0", 0.5: "8", 1 / 3: "aaab", 0.25: "c", 0.2: "cccd", 0.125: "e", 0.1: "e666", 0.0625: "f",
                 0.01: "fd70a", 0.001: "ffbe77", 0.0001: "fff9724", 0.00001: "ffff583a", 0.000001: "ffffef39"}
        for ratio, text in table.items():
            with self.subTest(ratio=ratio):
                self.assertEqual(sm.ratio_threshold(ratio), (text, int(text.ljust(14, "0"), 16)))

    def test_ratio_compares_the_56_random_bits_with_the_threshold(self):
        # "If rv >= th, keep the span, else drop the span"; rv is the trace id's least-significant 56 bits.
        tracing = sm.TracingConfig(endpoint="http://x", sampler="traceidratio", ratio=0.25)  # th = c0000000000000
        self.assertEqual(tracing.sample("00000000000000000" + "0c0000000000000", None), (True, ("ot=th:c",)))
        self.assertEqual(tracing.sample("ffffffffffffffffff" + "bfffffffffffff", None), (False, ()))
        self.assertTrue(tracing.sample("ffffffffffffffffff" + "ffffffffffffff", None)[0])
        self.assertFalse(tracing.sample("ffffffffffffffffff" + "00000000000000", None)[0])  # the old rule kept this
        tenth = sm.TracingConfig(endpoint="http://x", sampler="traceidratio", ratio=0.1)  # th = e666 -> e6660000000000
        self.assertTrue(tenth.sample("0" * 18 + "e6660000000000", None)[0])
        self.assertFalse(tenth.sample("f" * 18 + "e665ffffffffff", None)[0])
        ids = [sm.new_trace_id() for _ in range(4000)]
        self.assertAlmostEqual(sum(tracing.sample(t, None)[0] for t in ids) / 4000, 0.25, delta=0.04)
        never = sm.TracingConfig(endpoint="http://x", sampler="traceidratio", ratio=0.0)
        self.assertFalse(never.sample("f" * 32, None)[0])

    def test_explicit_randomness_wins_over_the_trace_id(self):
        # "OpenTelemetry samplers SHOULD presume that TraceIDs meet the W3C Trace Context Level 2 randomness
        # requirements, unless an explicit randomness value is present in the rv sub-key"
        tracing = sm.TracingConfig(endpoint="http://x", sampler="traceidratio", ratio=0.25)
        members = ("a=1", "ot=rv:c0000000000000")
        self.assertEqual(tracing.sample("0" * 32, None, members), (True, ("ot=th:c;rv:c0000000000000", "a=1")))
        self.assertFalse(tracing.sample("f" * 32, None, ("ot=rv:bfffffffffffff",))[0])
        self.assertTrue(tracing.sample("f" * 32, None, ("ot=rv:BFFFFFFFFFFFFF",))[0])  # invalid rv: the id decides

    def test_parent_based_keeps_a_consistent_threshold_and_erases_the_rest(self):
        tracing = sm.TracingConfig(endpoint="http://x", sampler="parentbased_traceidratio", ratio=0.5)
        trace_id = "0" * 18 + "d0000000000000"
        self.assertEqual(tracing.sample(trace_id, True, ("ot=th:c",)), (True, ("ot=th:c",)))
        self.assertEqual(tracing.sample(trace_id, True, ("ot=th:e", "a=1")), (True, ("a=1",)))  # rv < th
        self.assertEqual(tracing.sample(trace_id, True, ("ot=th:zz;rv:1",)), (True, ("ot=rv:1",)))


class TracePropagationTest(unittest.TestCase):
    """What a node sends onward, seen by a capturing downstream, in both modes (SPEC 5)."""

    ISTIO = {"x-request-id": "7d2b9c1e-1", "x-ot-span-context": "abc;def;1", "x-cloud-trace-context": "105445aa7/1;o=1",
             "grpc-trace-bin": "AAAbbb", "sw8": "1-TRACEID-SEGMENT-3-SVC-INST-EP-ADDR",
             "x-datadog-trace-id": "123", "x-datadog-parent-id": "456", "x-datadog-sampling-priority": "1",
             "baggage": "userId=alice,serverNode=DF%2028", "end-user": "jason"}

    def setUp(self):
        self.peer = CapturingPeer()
        self.addCleanup(self.peer.close)

    def through(self, headers, tracing=None):
        """(answer of node a for /cap, headers cap received)."""
        with Mesh({"a": {}}, forward_headers=("end-user",), tracing=tracing) as mesh:
            mesh.peers["cap"] = [self.peer.address]
            status, _headers, answer = mesh.request("a", "/cap", headers=headers)
            mesh.node("a").flush_spans(0.1)
            self.spans_seen = sum(mesh.node("a").metrics.spans.values())  # exported, failed or dropped
        self.assertEqual(status, 200, answer)
        return answer, self.peer.captured[-1]

    def test_mesh_only_passes_valid_context_unchanged(self):
        sent = dict(self.ISTIO, traceparent=VALID_TP, tracestate="rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
                    b3="4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1")
        answer, got = self.through(sent)
        for name, value in sent.items():
            self.assertEqual(got.get(name), value, name)
        self.assertEqual((answer["trace_id"], answer["span_id"]), ("4bf92f3577b34da6a3ce929d0e0e4736",
                                                                   "00f067aa0ba902b7"))

    def test_mesh_only_restarts_an_invalid_trace_and_drops_its_tracestate(self):
        # "If the vendor failed to parse traceparent, it MUST NOT attempt to parse tracestate."
        answer, got = self.through({"traceparent": "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
                                    "tracestate": "rojo=1", "baggage": "k=v"})
        parsed = sm.parse_traceparent(got["traceparent"])
        self.assertEqual(parsed[1], answer["trace_id"])
        self.assertEqual(parsed[3], sm.FLAG_SAMPLED | sm.FLAG_RANDOM)  # level 2: a new trace id is random
        self.assertNotIn("tracestate", got)
        self.assertEqual(got["baggage"], "k=v")

    def test_mesh_only_rebuilds_a_future_version_as_00(self):
        # "Vendors MUST use these fields to construct the new traceparent field according to the highest version
        # of the specification known to the implementation (in this specification it is 00)."
        answer, got = self.through({"traceparent": "cc" + VALID_TP[2:-2] + "ff-extra", "tracestate": "a=1"})
        self.assertEqual(got["traceparent"], VALID_TP[:-2] + "03")  # same ids: the sidecar's span stays parent
        self.assertEqual(got["tracestate"], "a=1")
        self.assertEqual(answer["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736")

    def test_mesh_only_starts_a_trace_when_none_arrived(self):
        answer, got = self.through({})
        self.assertEqual(sm.parse_traceparent(got["traceparent"])[1:3], (answer["trace_id"], answer["span_id"]))

    def test_mesh_only_joins_b3_without_inventing_a_traceparent(self):
        sent = {"x-b3-traceid": "463ac35c9f6413ad48485a3953bb6124", "x-b3-spanid": "a2fb4a1d1a96d312",
                "x-b3-parentspanid": "0020000000000001", "x-b3-sampled": "1"}
        answer, got = self.through(sent)
        self.assertNotIn("traceparent", got)
        for name, value in sent.items():
            self.assertEqual(got[name], value)
        self.assertEqual(answer["trace_id"], "463ac35c9f6413ad48485a3953bb6124")

    def native(self, **overrides):
        return sm.TracingConfig(endpoint="http://127.0.0.1:9/v1/traces", schedule_delay=60,
                                export_timeout=0.1).replace(**overrides)

    def test_native_call_carries_its_client_span(self):
        long_state = ",".join([f"k{i:02d}=" + "v" * 40 for i in range(14)])
        sent = dict(self.ISTIO, traceparent=VALID_TP[:-2] + "ff", tracestate=long_state)
        answer, got = self.through(sent, self.native())
        version, trace_id, parent_id, flags = sm.parse_traceparent(got["traceparent"])
        self.assertEqual((version, trace_id), ("00", "4bf92f3577b34da6a3ce929d0e0e4736"))
        self.assertNotIn(parent_id, ("00f067aa0ba902b7", answer["span_id"]))  # a CLIENT span below the SERVER's
        self.assertEqual(flags, 0x03)  # unknown flags zeroed, random and sampled kept
        self.assertLessEqual(len(got["tracestate"]), 512)
        self.assertTrue(long_state.startswith(got["tracestate"]))
        for name, value in self.ISTIO.items():
            self.assertEqual(got[name], value, name)

    def test_native_restarts_an_invalid_trace(self):
        answer, got = self.through({"traceparent": VALID_TP.upper(), "tracestate": "a=1"}, self.native())
        _version, trace_id, _parent, flags = sm.parse_traceparent(got["traceparent"])
        self.assertEqual(trace_id, answer["trace_id"])
        self.assertNotEqual(trace_id, "4bf92f3577b34da6a3ce929d0e0e4736")
        self.assertEqual(flags, 0x03)
        self.assertNotIn("tracestate", got)

    def test_native_b3_single_and_multi_carry_the_client_span(self):
        # OpenTelemetry's B3 requirements: inject "MUST NOT propagate X-B3-ParentSpanId".
        answer, got = self.through({"b3": "463ac35c9f6413ad48485a3953bb6124-a2fb4a1d1a96d312-1-05e3ac9a4f6e3b90"},
                                   self.native())
        trace_id, span_id, sampled = got["b3"].split("-")
        self.assertEqual((trace_id, sampled), ("463ac35c9f6413ad48485a3953bb6124", "1"))
        self.assertEqual(sm.parse_traceparent(got["traceparent"])[2], span_id)
        self.assertNotIn(span_id, ("a2fb4a1d1a96d312", answer["span_id"]))  # "MUST NOT reuse X-B3-SpanId"
        answer, got = self.through({"x-b3-traceid": "a3ce929d0e0e4736", "x-b3-spanid": "a2fb4a1d1a96d312",
                                    "x-b3-parentspanid": "05e3ac9a4f6e3b90", "x-b3-sampled": "0"}, self.native())
        self.assertEqual(got["x-b3-traceid"], "0000000000000000a3ce929d0e0e4736")
        self.assertEqual(got["x-b3-sampled"], "0")
        self.assertNotIn("x-b3-parentspanid", got)
        self.assertEqual(got["x-b3-spanid"], sm.parse_traceparent(got["traceparent"])[2])
        self.assertEqual(self.spans_seen, 0)  # "0": nothing recorded

    def test_native_propagators_choose_the_formats(self):
        _answer, got = self.through({}, self.native(propagators=("b3",)))
        self.assertNotIn("traceparent", got)
        self.assertEqual(len(got["b3"].split("-")), 3)

    def test_mesh_only_tracestate_goes_on_byte_for_byte(self):
        # "If the value of the traceparent field wasn't changed before propagation, tracestate MUST NOT be modified"
        for state in ("foo=1,foo=2,1key=v", "x" * 600 + "=1", "Bad=1"):
            _answer, got = self.through({"traceparent": VALID_TP, "tracestate": state})
            self.assertEqual(got["tracestate"], state)

    def test_native_tracestate_follows_level_2(self):
        sent = "1key=v,foo=1,tenant@sys=x,foo=2,k@t@s=3"
        _answer, got = self.through({"traceparent": VALID_TP, "tracestate": sent}, self.native())
        self.assertEqual(got["tracestate"], "1key=v,foo=1,tenant@sys=x,k@t@s=3")
        _answer, got = self.through({"traceparent": VALID_TP, "tracestate": "ok=1,Bad=1"}, self.native())
        self.assertNotIn("tracestate", got)  # an invalid member: the header is discarded

    def test_b3_deny_alone_is_honoured_in_both_modes(self):
        for sent in ({"b3": "0"}, {"x-b3-sampled": "0"}):
            with self.subTest(sent=sent, mode="mesh only"):
                answer, got = self.through(sent)
                for name, value in sent.items():
                    self.assertEqual(got[name], value)  # the decision goes on as it came
                flags = sm.parse_traceparent(got["traceparent"])[3]
                self.assertEqual(flags & sm.FLAG_SAMPLED, 0)  # and no made-up "sampled"
                self.assertEqual(sm.parse_traceparent(got["traceparent"])[1], answer["trace_id"])
            with self.subTest(sent=sent, mode="native"):
                answer, got = self.through(sent, self.native())
                self.assertEqual(sm.parse_traceparent(got["traceparent"])[3] & sm.FLAG_SAMPLED, 0)
                if "b3" in sent:
                    self.assertEqual(got["b3"].split("-")[2], "0")
                else:
                    self.assertEqual(got["x-b3-sampled"], "0")
                self.assertEqual(self.spans_seen, 0)  # nothing recorded, whatever the sampler

    def test_b3_debug_is_kept(self):
        # OpenTelemetry: "MUST preserve a debug trace flag, if received, and propagate it with subsequent requests.
        # Additionally, an OpenTelemetry implementation MUST set the sampled trace flag when the debug flag is set."
        single = {"b3": "463ac35c9f6413ad48485a3953bb6124-a2fb4a1d1a96d312-d"}
        _answer, got = self.through(single)
        self.assertEqual(got["b3"], single["b3"])
        _answer, got = self.through(single, self.native(sampler="always_off"))
        self.assertEqual(got["b3"].split("-")[2], "d")
        self.assertEqual(sm.parse_traceparent(got["traceparent"])[3] & sm.FLAG_SAMPLED, 1)
        self.assertGreater(self.spans_seen, 0)
        multi = {"x-b3-traceid": "463ac35c9f6413ad48485a3953bb6124", "x-b3-spanid": "a2fb4a1d1a96d312",
                 "x-b3-flags": "1"}
        _answer, got = self.through(multi, self.native(sampler="parentbased_always_off"))
        # "Debug implies an accept decision, so don't also send the X-B3-Sampled header."
        self.assertEqual(got["x-b3-flags"], "1")
        self.assertNotIn("x-b3-sampled", got)
        self.assertGreater(self.spans_seen, 0)

    def test_incoming_traceparent_is_kept(self):
        traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        with Mesh({"a": {}, "b": {}}) as mesh:
            _status, _headers, answer = mesh.request("a", "/b", headers={"traceparent": traceparent})
        self.assertEqual(answer["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736")
        self.assertEqual(answer["next_node"][0]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736")


class TraceHeadersNeverBreakANodeTest(unittest.TestCase):
    """Any header text (hypothesis): no exception, and whatever traceparent goes onward is valid or what arrived."""

    def test_arbitrary_trace_headers(self):
        hypothesis = require_module(self, "hypothesis")
        strategies = hypothesis.strategies
        pieces = strategies.sampled_from(["00", "ff", "cc", "-", "4bf92f3577b34da6a3ce929d0e0e4736", "0" * 16,
                                          "00f067aa0ba902b7", "01", "x", ",", "=", "@", " ", "k=v", "\u00e9", "d",
                                          "1k@t=v", "ot=th:c;rv:"])
        header = strategies.one_of(strategies.text(max_size=80), strategies.lists(pieces, max_size=12).map("".join))
        names = ("traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled", "x-b3-flags",
                 "baggage")
        tracing = sm.TracingConfig(endpoint="http://x/v1/traces", propagators=("tracecontext", "b3", "b3multi"))

        @hypothesis.settings(max_examples=150, deadline=None)
        @hypothesis.given(strategies.dictionaries(strategies.sampled_from(names), header))
        def check(headers):
            for mode in (None, tracing):
                trace = sm.TraceContext.from_headers(headers, (), mode)
                outbound = trace.headers_for(sm.new_span_id() if mode else "")
                self.assertEqual(len(trace.trace_id), 32)
                sent = outbound.get("traceparent")
                if sent is not None and sent != headers.get("traceparent"):
                    self.assertEqual(sm.parse_traceparent(sent)[0], "00")
                if mode and "tracestate" in outbound:
                    self.assertLessEqual(len(outbound["tracestate"]), 512)
                    self.assertEqual(sm.format_tracestate(sm.parse_tracestate(outbound["tracestate"])),
                                     outbound["tracestate"])  # what a native node sends is valid as it stands
                if mode and "b3" in outbound:
                    self.assertIn(outbound["b3"].split("-")[2], ("0", "1", "d"))
                if mode:
                    self.assertNotIn("x-b3-parentspanid", outbound)

        check()


class TraceOpenTelemetryClientsTest(unittest.TestCase):
    """OpenTelemetry's own Python propagators inject a client's context, a real chain carries it (a -> b -> a
    capturing last hop, on loopback), and the same propagators extract what arrived there."""

    TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
    SPAN_ID = 0x00F067AA0BA902B7

    def setUp(self):
        self.api = require_module(self, "opentelemetry.trace")
        tracecontext = require_module(self, "opentelemetry.trace.propagation.tracecontext")
        baggage = require_module(self, "opentelemetry.baggage.propagation")
        b3 = require_module(self, "opentelemetry.propagators.b3")
        self.baggage = require_module(self, "opentelemetry.baggage")
        self.w3c = tracecontext.TraceContextTextMapPropagator()
        self.w3c_baggage = baggage.W3CBaggagePropagator()
        self.b3_single = b3.B3SingleFormat()
        self.b3_multi = b3.B3MultiFormat()
        self.peer = CapturingPeer()
        self.addCleanup(self.peer.close)
        self.receiver = OTLPReceiver(self)

    def client_context(self, sampled=True, tracestate=()):
        api = self.api
        span_context = api.SpanContext(self.TRACE_ID, self.SPAN_ID, is_remote=True,
                                       trace_flags=api.TraceFlags(api.TraceFlags.SAMPLED if sampled else 0),
                                       trace_state=api.TraceState(list(tracestate)))
        context = api.set_span_in_context(api.NonRecordingSpan(span_context))
        return self.baggage.set_baggage("user.id", "alice", self.baggage.set_baggage("tier", "gold 1", context))

    def inject(self, propagators, context):
        headers = {}
        for propagator in propagators:
            propagator.inject(headers, context=context)
        return headers

    def chain(self, headers, native=False, **tracing):
        """(answer, headers the last hop got, exported spans) after a -> b -> capturing peer."""
        with Mesh({"a": {}, "b": {}}, tracing=self.receiver.tracing(**tracing) if native else None) as mesh:
            mesh.peers["cap"] = [self.peer.address]
            status, _headers, answer = mesh.request("a", "/b/cap", headers=headers)
            for name in ("a", "b"):
                mesh.node(name).flush_spans()
        self.assertEqual(status, 200, answer)
        return answer, self.peer.captured[-1], self.receiver.spans()

    def extracted(self, propagator, headers):
        return self.api.get_current_span(propagator.extract(headers)).get_span_context()

    def test_w3c_tracecontext_and_baggage(self):
        sent = self.inject([self.w3c, self.w3c_baggage],
                           self.client_context(tracestate=[("congo", "t61rcWkgMzE"), ("rojo", "00f067aa0ba902b7")]))
        for native in (False, True):
            with self.subTest(native=native):
                answer, got, spans = self.chain(sent, native)
                context = self.extracted(self.w3c, got)
                self.assertEqual((context.trace_id, context.trace_flags.sampled), (self.TRACE_ID, True))
                self.assertEqual(list(context.trace_state.items()),
                                 [("congo", "t61rcWkgMzE"), ("rojo", "00f067aa0ba902b7")])
                baggage = self.baggage.get_all(self.w3c_baggage.extract(got))
                self.assertEqual(dict(baggage), {"tier": "gold 1", "user.id": "alice"})
                self.assertEqual(answer["trace_id"], f"{self.TRACE_ID:032x}")
                if not native:  # pass-through: the client's span stays the parent
                    self.assertEqual(context.span_id, self.SPAN_ID)
                    self.assertEqual(spans, [])
                else:  # the last hop's parent is b's CLIENT span, exported, in a chain up to the client's span
                    by_id = {span["spanId"]: span for _service, span in spans}
                    self.assertEqual(len(by_id), 4)
                    span = by_id[f"{context.span_id:016x}"]
                    self.assertEqual(span["kind"], 3)
                    while "parentSpanId" in span and span["parentSpanId"] in by_id:
                        span = by_id[span["parentSpanId"]]
                    self.assertEqual(span["parentSpanId"], f"{self.SPAN_ID:016x}")

    def test_w3c_unsampled_stays_unsampled(self):
        sent = self.inject([self.w3c], self.client_context(sampled=False))
        for native in (False, True):
            _answer, got, spans = self.chain(sent, native)
            context = self.extracted(self.w3c, got)
            self.assertEqual((context.trace_id, context.trace_flags.sampled), (self.TRACE_ID, False))
            self.assertEqual(spans, [])

    def test_b3_single_and_multi(self):
        for propagator in (self.b3_single, self.b3_multi):
            sent = self.inject([propagator], self.client_context())
            for native in (False, True):
                with self.subTest(propagator=type(propagator).__name__, native=native):
                    answer, got, _spans = self.chain(sent, native, propagators=("tracecontext", "baggage"))
                    context = self.extracted(propagator, got)
                    self.assertEqual((context.trace_id, context.trace_flags.sampled), (self.TRACE_ID, True))
                    self.assertEqual(answer["trace_id"], f"{self.TRACE_ID:032x}")
                    self.assertEqual(context.span_id == self.SPAN_ID, not native)
                    self.assertNotIn("x-b3-parentspanid", got)
                    if native:  # the W3C header names the same CLIENT span
                        self.assertEqual(self.extracted(self.w3c, got).span_id, context.span_id)

    def test_b3_deny_and_debug_reach_the_last_hop(self):
        # OpenTelemetry's B3 propagator cannot write a decision alone or debug: these are written by hand.
        for sent in ({"b3": "0"}, {"x-b3-sampled": "0"}):
            for native in (False, True):
                with self.subTest(sent=sent, native=native):
                    _answer, got, spans = self.chain(sent, native)
                    self.assertFalse(self.extracted(self.w3c, got).trace_flags.sampled)
                    propagator = self.b3_single if "b3" in sent else self.b3_multi
                    if not native:
                        self.assertEqual({name: got.get(name) for name in sent}, sent)
                    else:
                        self.assertFalse(self.extracted(propagator, got).trace_flags.sampled)
                    self.assertEqual(spans, [])
        debug = {"b3": f"{self.TRACE_ID:032x}-{self.SPAN_ID:016x}-d"}
        _answer, got, spans = self.chain(debug, True, sampler="always_off")
        self.assertEqual(got["b3"].split("-")[2], "d")
        self.assertTrue(self.extracted(self.b3_single, got).trace_flags.sampled)
        self.assertEqual(len(spans), 4)

    def test_ratio_decisions_agree_with_the_sdk_consistent_sampler(self):
        sampling = require_module(self, "opentelemetry.sdk.trace._sampling_experimental")
        rng = random.Random(12)
        for ratio in (0.5, 0.25, 0.1, 0.01):
            sdk = sampling.composite_sampler(sampling.composable_traceid_ratio_based(ratio))
            ours = sm.TracingConfig(endpoint="http://x", sampler="traceidratio", ratio=ratio)
            sdk_threshold = (1 << 56) - round(ratio * 2 ** 56)  # the SDK keeps all 56 bits of precision
            _text, threshold = sm.ratio_threshold(ratio)  # 4 hex digits, as the spec recommends to SDKs
            for _ in range(2000):
                trace_id = rng.getrandbits(128)
                randomness = trace_id & ((1 << 56) - 1)
                if min(threshold, sdk_threshold) <= randomness < max(threshold, sdk_threshold):
                    continue  # the sliver the two precisions disagree on: at most 16^-4 / 2 of traces
                result = sdk.should_sample(None, trace_id, "GET")
                decided, members = ours.sample(f"{trace_id:032x}", None)
                self.assertEqual(decided, result.decision.is_sampled(), (ratio, f"{trace_id:032x}"))
                self.assertEqual(members, (f"ot=th:{_text}",) if decided else ())
        # Through nodes: the decision and its threshold reach the next hop.
        sent = {"traceparent": f"00-{'0' * 18}{'f' * 14}-{self.SPAN_ID:016x}-01"}
        _answer, got, _spans = self.chain(sent, True, sampler="traceidratio", ratio=0.25)
        self.assertEqual(got["tracestate"], "ot=th:c")
        self.assertTrue(self.extracted(self.w3c, got).trace_flags.sampled)


class TraceIdsInJsonLogsTest(unittest.TestCase):
    """The JSON access log carries the trace and span ids."""

    def test_access_log_has_trace_and_span_ids(self):
        port = free_port()
        environ = dict(os.environ, HOST="a", PORT=str(port), ADDRESS="127.0.0.1", LOG_FORMAT="json")
        process = subprocess.Popen([sys.executable, "-I", "-S", os.path.join(HERE, "simplemesh.py"), "serve"],
                                   env=environ, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            wait_for_port(port)
            http_request(("127.0.0.1", port), "/", headers={"traceparent": VALID_TP})
            process.send_signal(signal.SIGTERM)
            output, _ = process.communicate(timeout=10)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        access = [json.loads(line) for line in output.splitlines() if '"path"' in line]
        self.assertEqual(len(access), 1, output)
        self.assertEqual((access[0]["trace_id"], access[0]["span_id"]),
                         ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"))


# --- Outbound client ------------------------------------------------------------------------------------------
# Reading a peer's answer, reach rules, the resolver, deadlines, the connection pool (SPEC 3, 8).

class OutboundAnswerReaderTest(unittest.TestCase):
    """Raw answer bytes in, the parsed answer or the exact error out (SPEC 3: every peer behaviour recorded as
    what it was). Fed 7 bytes at a time, so no short read can pass for a whole body."""

    TABLE = [
        # (what, raw bytes, method, expected (status, body, reusable, left) or error message)
        ("length", OK_HEAD + b"Content-Length: 5\r\n\r\nhello", "GET", (200, b"hello", True, 0)),
        ("no reason phrase", b"HTTP/1.1 204\r\n\r\n", "GET", (204, b"", True, 0)),
        ("interim answers skipped", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n"
         b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" + OK_HEAD
         + b"Content-Length: 2\r\n\r\nok", "GET", (200, b"ok", True, 0)),
        ("the next answer stays unread", OK_HEAD + b"Content-Length: 2\r\n\r\nok" + OK_HEAD, "GET",
         (200, b"ok", True, len(OK_HEAD))),
        ("101 without an upgrade", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n", "GET",
         "answered 101 Switching Protocols, but no upgrade was asked for"),
        ("endless interim answers", b"HTTP/1.1 103 Early Hints\r\n\r\n" * 40, "GET",
         "more than 32 interim 1xx answers"),
        ("identical duplicate Content-Length", OK_HEAD + b"Content-Length: 2\r\nContent-Length: 2\r\n\r\nok",
         "GET", (200, b"ok", True, 0)),
        ("one header, a list", OK_HEAD + b"Content-Length: 2, 2\r\n\r\nok", "GET", (200, b"ok", True, 0)),
        ("differing Content-Length", OK_HEAD + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\nokk", "GET",
         "differing Content-Length headers (2, 3)"),
        ("negative Content-Length", OK_HEAD + b"Content-Length: -1\r\n\r\n", "GET", "invalid Content-Length '-1'"),
        ("non-ASCII digits", OK_HEAD + "Content-Length: ٣\r\n\r\n".encode(), "GET",
         "invalid Content-Length '\u00d9\u00a3'"),
        ("empty Content-Length", OK_HEAD + b"Content-Length:\r\n\r\n", "GET", "invalid Content-Length ''"),
        ("cut short", OK_HEAD + b"Content-Length: 1000\r\n\r\n" + b"x" * 25, "GET",
         "closed mid-answer after 25 of 1000 bytes"),
        ("chunked", OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\n"
         b"Trailer-Field: x\r\n\r\n", "GET", (200, b"hello world", True, 0)),
        ("chunked, cut in a chunk", OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nA\r\n012",
         "GET", "closed mid-answer after 8 bytes of a chunked answer"),
        ("chunked, no last chunk", OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", "GET",
         "closed mid-answer after 5 bytes of a chunked answer"),
        ("chunked, no end of trailers", OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n", "GET",
         "closed mid-answer after 2 bytes of a chunked answer"),
        ("bad chunk size", OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", "GET",
         "bad chunk size line 'zz  '"),
        ("chunk without CRLF", OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\nhiXX0\r\n\r\n", "GET",
         "a chunk is not followed by CRLF"),
        ("both framings", OK_HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", "GET",
         "the answer has both Transfer-Encoding and Content-Length"),
        ("empty Transfer-Encoding", OK_HEAD + b"Transfer-Encoding:\r\n\r\n", "GET", "bad Transfer-Encoding ''"),
        ("other coding: read to the close", OK_HEAD + b"Transfer-Encoding: gzip\r\n\r\nabc", "GET",
         (200, b"abc", False, 0)),
        ("no framing: read to the close", OK_HEAD + b"\r\n" + b"y" * 100, "GET", (200, b"y" * 100, False, 0)),
        ("HEAD has no body", OK_HEAD + b"Content-Length: 100\r\n\r\n", "HEAD", (200, b"", True, 0)),
        ("304 has no body", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\n\r\n", "GET",
         (304, b"", True, 0)),
        ("Connection: close", OK_HEAD + b"Connection: close\r\nContent-Length: 2\r\n\r\nok", "GET",
         (200, b"ok", False, 0)),
        ("HTTP/1.0 closes", b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", "GET", (200, b"ok", False, 0)),
        ("HTTP/1.0 keep-alive", b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\nok",
         "GET", (200, b"ok", True, 0)),
        ("nothing at all", b"", "GET", "connection closed before an answer"),
        ("not HTTP", b"SSH-2.0-OpenSSH_9.6\r\n", "GET", "the answer is not HTTP/1.x: 'SSH-2.0-OpenSSH_9.6  '"),
        ("HTTP/2", b"HTTP/2 200\r\n\r\n", "GET", "the answer is not HTTP/1.x: 'HTTP/2 200  '"),
        ("cut in the status line", b"HTTP/1.1 20", "GET", "closed mid-answer, in the status line"),
        ("cut in the headers", OK_HEAD + b"Content-Type: text/pl", "GET",
         "closed mid-answer, in the headers of a 200 answer"),
        ("bad header", OK_HEAD + b"no colon here\r\n\r\n", "GET",
         "bad header block in a 200 answer: malformed header line"),
        ("header line too long", OK_HEAD + b"X: " + b"y" * 20000 + b"\r\n\r\n", "GET",
         "bad header block in a 200 answer: a header line is longer than 16384 bytes"),
    ]

    def test_table(self):
        for what, raw, method, expected in self.TABLE:
            for piece in (7, 65536):
                with self.subTest(what=what, piece=piece):
                    self.assertEqual(read_raw(raw, method, piece=piece), expected)

    def test_the_budget_is_charged_as_bytes_arrive_and_stops_the_read(self):
        charged = []

        def charge(nbytes):
            charged.append(nbytes)
            return sum(charged) <= 8

        self.assertEqual(read_raw(OK_HEAD + b"Content-Length: 5\r\n\r\nhello", budget=charge)[0], 200)
        self.assertEqual(charged, [5])  # a declared length at once
        charged.clear()
        raw = OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n5\r\nworld\r\n0\r\n\r\n"
        self.assertEqual(read_raw(raw, budget=charge), "a chunked answer")
        self.assertEqual(charged, [5, 5])
        charged.clear()
        self.assertEqual(read_raw(OK_HEAD + b"\r\n" + b"z" * 20, budget=charge, piece=4), "an answer read to its close")
        self.assertEqual(charged, [1, 4, 4])  # the byte read with the headers, then each piece as it came
        charged.clear()
        self.assertEqual(read_raw(OK_HEAD + b"Content-Length: 9\r\n\r\n", budget=charge), "an answer of 9 bytes")

    def test_a_peer_closing_before_any_byte_is_told_apart(self):
        reader = sm.SocketReader(ScriptedSocket(b""))
        with self.assertRaises(sm.AnswerError) as caught:
            sm.read_answer(reader, "GET")
        self.assertTrue(caught.exception.closed)
        reader = sm.SocketReader(ScriptedSocket(b"HTTP/1.1 200 OK\r\n"))
        with self.assertRaises(sm.AnswerError) as caught:
            sm.read_answer(reader, "GET")
        self.assertFalse(caught.exception.closed)
        self.assertEqual(caught.exception.status, 200)

    def test_request_bytes(self):
        self.assertEqual(sm.request_bytes("POST", "/c?delay=1s", "b:8080", {"traceparent": "00-x"}, b"hi"),
                         (b"POST /c?delay=1s HTTP/1.1\r\nHost: b:8080\r\ntraceparent: 00-x\r\nContent-Length: 2\r\n\r\nhi",))
        self.assertEqual(sm.request_bytes("GET", "/", "b", {}, b""), (b"GET / HTTP/1.1\r\nHost: b\r\n\r\n",))
        big = b"x" * (sm.SMALL_BODY + 1)  # sent apart from its head, never copied
        head, body = sm.request_bytes("PUT", "/", "b", {}, big)
        self.assertIs(body, big)
        self.assertTrue(head.endswith(b"Content-Length: %d\r\n\r\n" % len(big)))


class OutboundReachRuleTest(unittest.TestCase):
    """Which addresses a call may reach."""

    def test_address_kinds(self):
        for ip, kind in [("127.0.0.1", "loopback"), ("127.255.0.9", "loopback"), ("::1", "loopback"),
                         ("::ffff:127.0.0.1", "loopback"), ("169.254.169.254", "link-local"),
                         ("fe80::1%eth0", "link-local"), ("0.0.0.0", "unspecified"), ("0.1.2.3", "unspecified"),
                         ("::", "unspecified"), ("224.0.0.1", "multicast"), ("239.255.255.250", "multicast"),
                         ("ff02::1", "multicast"), ("10.0.0.1", None), ("192.168.1.1", None), ("8.8.8.8", None),
                         ("2001:db8::1", None), ("::ffff:10.1.2.3", None), ("not an address", None)]:
            with self.subTest(ip=ip):
                self.assertEqual(sm.address_kind(ip), kind)


class OutboundResolverTest(unittest.TestCase):
    """Name resolution inside the call's deadline, cached and shared, never asking the machine's resolver here."""

    def resolver(self, table, **options):
        delay = options.pop("delay", 0.0)
        asked = []
        return sm.Resolver({}, 80, getaddrinfo=fake_getaddrinfo(table, delay, asked), **options), asked

    def test_a_slow_resolver_is_cut_at_the_deadline(self):
        resolver, _asked = self.resolver({"slow.example": "10.0.0.1"}, delay=2.0)
        started = time.monotonic()
        with self.assertRaises(TimeoutError):
            resolver.lookup("slow.example", 80, time.monotonic() + 0.3)
        self.assertLess(time.monotonic() - started, 1.0)

    def test_answers_are_cached_and_shared_failures_kept_briefly(self):
        resolver, asked = self.resolver({"b.example": "10.0.0.2"}, negative_ttl=0.2)
        for _ in range(3):
            self.assertEqual(resolver.lookup("b.example", 80, time.monotonic() + 5),
                             [(socket.AF_INET, ("10.0.0.2", 80))])
        for _ in range(2):
            with self.assertRaises(socket.gaierror):
                resolver.lookup("nowhere.example", 80, time.monotonic() + 5)
        self.assertEqual(asked, ["b.example", "nowhere.example"])
        time.sleep(0.3)  # the scenario: the failure's 0.2 s negative TTL runs out
        with self.assertRaises(socket.gaierror):
            resolver.lookup("nowhere.example", 80, time.monotonic() + 5)
        self.assertEqual(asked.count("nowhere.example"), 2)
        self.assertEqual(resolver.lookup("10.1.1.1", 80, 0), [(socket.AF_INET, ("10.1.1.1", 80))])  # no lookup

    def test_the_cache_is_bounded(self):
        resolver, _asked = self.resolver({f"n{i}.example": "10.0.0.3" for i in range(50)}, cache_size=10)
        for i in range(50):
            resolver.lookup(f"n{i}.example", 80, time.monotonic() + 5)
        self.assertEqual(len(resolver.cache), 10)


class OutboundPeerAnswersTest(unittest.TestCase):
    """SPEC 3: every answer a peer gives is recorded as what it was, and never mixed with another request's."""

    def through(self, peer, path="/p?timeout=5s", times=1, method="GET", body=None, **config):
        """Answers of node ``a`` for ``times`` requests to ``path``, with ``p`` the scripted peer."""
        self.addCleanup(peer.close)
        with Mesh({"a": {}}, **config) as mesh:
            mesh.peers["p"] = [("127.0.0.1", peer.port)]
            return [mesh.request("a", path, method=method, body=body, timeout=10) for _ in range(times)]

    def test_early_hints_then_the_next_call_gets_its_own_answer(self):
        hints = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        peer = BadPeer(lambda sock, n: sock.sendall(hints + record_bytes({"n": n})), keep_alive=True)
        answers = self.through(peer, times=3)
        self.assertEqual([(status, answer["next_node"][0]["n"]) for status, _h, answer in answers],
                         [(200, 0), (200, 1), (200, 2)])
        self.assertEqual(len(peer.connections), 1)

    def test_a_body_cut_short_is_a_502_saying_how_much_came(self):
        def cut(sock):
            sock.sendall(answer_bytes(b"x" * 25, length=1000))
            sock.close()

        (status, _h, answer), = self.through(BadPeer(cut))
        child = answer["next_node"][0]
        self.assertEqual((status, child["status"], child["error"]),
                         (502, 502, "closed mid-answer after 25 of 1000 bytes"))

    def test_a_chunked_body_cut_short_is_a_502(self):
        def cut(sock):
            sock.sendall(OK_HEAD + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"10\r\n{\"host\": \"p\", \"s")
            sock.close()

        (status, _h, answer), = self.through(BadPeer(cut))
        self.assertEqual((status, answer["next_node"][0]["error"]),
                         (502, "closed mid-answer after 16 bytes of a chunked answer"))

    def test_duplicate_content_lengths(self):
        body = json.dumps({"host": "p", "status": 200}).encode()
        same = OK_HEAD + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n".encode() * 2 \
            + b"\r\n" + body
        (status, _h, answer), = self.through(BadPeer(lambda sock: sock.sendall(same)))
        self.assertEqual((status, answer["next_node"][0]["host"]), (200, "p"))
        differing = (OK_HEAD + f"Content-Length: {len(body)}\r\nContent-Length: {len(body) + 5}\r\n\r\n".encode()
                     + body)
        started = time.monotonic()
        stall = lambda sock: (sock.sendall(differing), time.sleep(5))  # the scenario: then the peer stalls
        (status, _h, answer), = self.through(BadPeer(stall))
        self.assertLess(time.monotonic() - started, 2.0, "waited for the timeout")
        self.assertEqual((status, answer["next_node"][0]["status"]), (502, 502))
        self.assertIn("differing Content-Length", answer["next_node"][0]["error"])

    def test_a_reused_connection_closed_by_the_peer_is_retried_once_on_a_new_one(self):
        def close_after_first(sock, n):
            if n == 0:
                return sock.sendall(record_bytes({"connection": len(peer.connections)}))
            return False  # read the request, then close without a byte: the race with an idle timer

        peer = BadPeer(close_after_first, keep_alive=True)
        answers = self.through(peer, times=3)
        self.assertEqual([(status, answer["next_node"][0]["connection"]) for status, _h, answer in answers],
                         [(200, 1), (200, 2), (200, 3)])
        self.assertEqual(len(peer.requests), 5)  # 1, then 2 and 3 each sent twice: on the old and a new connection

    def test_the_race_with_an_idle_timer_is_retried(self):
        def answer_then_idle_close(sock, n):
            sock.sendall(record_bytes({"connection": len(peer.connections)}))
            time.sleep(0.05)  # the scenario: idle a moment, then
            return False  # closed while idle in the caller's pool

        peer = BadPeer(answer_then_idle_close, keep_alive=True)
        self.addCleanup(peer.close)
        with Mesh({"a": {}}) as mesh:
            mesh.peers["p"] = [("127.0.0.1", peer.port)]
            # the peer's close arriving just after the pool's check: the request goes out on a closed connection
            with unittest.mock.patch.object(sm, "_still_open", lambda sock: True):
                self.assertEqual(mesh.request("a", "/p")[0], 200)
                wait_until(lambda: peer.connections[0].fileno() == -1, message="the peer never closed")
                self.assertEqual(mesh.node("a").pool.count(), 1)
                status, _h, answer = mesh.request("a", "/p")
        self.assertEqual((status, answer["next_node"][0]["connection"]), (200, 2))

    def test_no_retry_for_post_nor_after_a_reset(self):
        def close_after_first(sock, n):
            return sock.sendall(record_bytes({})) if n == 0 else False

        peer = BadPeer(close_after_first, keep_alive=True)
        answers = self.through(peer, times=2, method="POST", body=b"once")
        self.assertEqual(answers[1][2]["next_node"][0]["error"], "connection closed before an answer")
        self.assertEqual(len(peer.requests), 2)

        def reset_after_first(sock, n):
            if n == 0:
                return sock.sendall(record_bytes({}))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # an RST after the request arrived: what the reset directive sends
            return False

        peer = BadPeer(reset_after_first, keep_alive=True)
        answers = self.through(peer, times=2)
        self.assertEqual(answers[1][2]["next_node"][0]["error"], "connection reset before an answer")
        self.assertEqual(len(peer.requests), 2)

    def test_an_injected_reset_stays_visible(self):
        with Mesh({"a": {}, "b": {}}) as mesh:
            seen = mesh.record_requests("b")
            self.assertEqual(mesh.request("a", "/b")[0], 200)  # a pooled connection to b
            for _ in range(3):
                status, _h, answer = mesh.request("a", "/b;reset=1")
                self.assertEqual((status, answer["next_node"][0]["error"]), (502, "connection reset before an answer"))
        self.assertEqual(len(seen), 4, "a reset was retried")

    def test_foreign_answers_are_recorded_by_their_status(self):
        text = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nhello \x1b[2Jyou"
        (status, _h, answer), = self.through(BadPeer(lambda sock: sock.sendall(text)))
        self.assertEqual(status, 200)
        child = answer["next_node"][0]
        self.assertEqual({key: child[key] for key in ("host", "status", "foreign", "content_type", "size", "excerpt")},
                         {"host": "p", "status": 200, "foreign": True, "content_type": "text/plain", "size": 13,
                          "excerpt": "hello  [2Jyou"})
        self.assertNotIn("error", child)
        tree = sm.render_tree(answer)
        self.assertIn("└─ p  200", tree)
        self.assertIn("not simplemesh: text/plain, 13 B: hello  [2Jyou", tree)
        self.assertNotIn("✗", tree)

        rbac = b"HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: 19\r\n\r\nRBAC: access denied"
        (status, _h, answer), = self.through(BadPeer(lambda sock: sock.sendall(rbac)))
        child = answer["next_node"][0]
        self.assertEqual((status, child["status"], child["excerpt"], child["size"]),
                         (502, 403, "RBAC: access denied", 19))
        self.assertEqual(child["error"], "answered 403, not a simplemesh answer: RBAC: access denied")
        self.assertIn("✗ answered 403, not a simplemesh answer: RBAC: access denied", sm.render_tree(answer))
        page = sm.render_html(answer, "p")
        self.assertIn('class="hop client failed origin" data-index="1" data-parent="0" data-depth="1" data-host="p" '
                      'data-status="403"', page)
        self.assertIn("answered 403, not a simplemesh answer: RBAC: access denied", page)

    def test_an_answer_of_the_original_fastapi_design_nests_as_its_tree(self):
        seed = {"host": "p", "elapsed_time": 0.25, "next_node": [
            {"host": "q", "elapsed_time": 0.2, "next_node": [{"host": "r", "elapsed_time": 0.1, "next_node": []}]}]}
        (status, _h, answer), = self.through(BadPeer(lambda sock: sock.sendall(answer_bytes(json.dumps(seed).encode()))))
        self.assertEqual(status, 200)
        child = answer["next_node"][0]
        self.assertEqual((child["status"], child["design"]), (200, "fastapi"))
        self.assertEqual(hosts(answer), ["a", [["p", [["q", [["r", []]]]]]]])
        tree = sm.render_tree(answer)
        self.assertNotIn("✗", tree)
        self.assertRegex(tree, r"├─ p|└─ p +200 .*FastAPI design")
        self.assertIn("      └─ r  ---", tree)
        page = sm.render_html(answer, "p")
        self.assertEqual(page.count('class="hop ok"'), 4)

    def test_the_budget_names_its_limit(self):
        class Budget:
            refused = "above MAX_REQUEST_ANSWER_BYTES=10"

            def charge(self, nbytes):
                return nbytes <= 10

        peer = BadPeer(lambda sock: sock.sendall(OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n20\r\n" + b"x" * 32))
        self.addCleanup(peer.close)
        with self.assertRaises(sm.CallFailed) as caught:
            sm.call_peer(sm.ConnectionPool(), sm.Peer(("127.0.0.1", peer.port), "p", "http://p/"), "/", "GET", b"",
                         {}, 5, Budget())
        self.assertEqual(str(caught.exception), "a chunked answer refused: above MAX_REQUEST_ANSWER_BYTES=10")


class OutboundDeadlineAndReachTest(unittest.TestCase):
    """SPEC 8: name resolution inside the call's timeout; no way out to loopback, link-local, unspecified or
    multicast addresses by a name (DNS rebinding included); PEERS names and ALLOW_IP_TARGETS=true allowed."""

    def mesh(self, table, delay=0.0, **config):
        mesh = Mesh({"a": {}, "b": {}}, **config)
        self.addCleanup(mesh.close)
        mesh.node("a").resolver.getaddrinfo = fake_getaddrinfo(table, delay)
        return mesh

    def test_a_slow_resolver_counts_against_the_timeout(self):
        mesh = self.mesh({"slow.example": "10.0.0.1"}, delay=3.0)
        started = time.monotonic()
        status, _h, answer = mesh.request("a", "/slow.example?timeout=500ms")
        seconds = time.monotonic() - started
        child = answer["next_node"][0]
        self.assertEqual((status, child["status"], child["error"]), (504, 504, "timeout after 0.5s"))
        self.assertGreaterEqual(child["elapsed_time"], 0.45)
        self.assertLess(child["elapsed_time"], 1.2)
        self.assertLess(seconds, 2.0)

    def test_an_unknown_name_is_a_502_in_the_tree(self):
        mesh = self.mesh({})
        status, _h, answer = mesh.request("a", "/nosuchname.example")
        self.assertEqual((status, answer["next_node"][0]["status"]), (502, 502))
        self.assertEqual(answer["next_node"][0]["error"], "cannot resolve 'nosuchname.example': Name or service not known")

    def test_names_resolving_to_forbidden_addresses_are_refused_with_no_connection(self):
        peer = BadPeer(lambda sock: sock.sendall(record_bytes({})))
        self.addCleanup(peer.close)
        mesh = self.mesh({"sneaky.example": "127.0.0.1", "metadata.example": "169.254.169.254",
                          "zero.example": "0.0.0.0", "group.example": "239.1.2.3"})
        for name, kind in [("sneaky.example", "loopback"), ("metadata.example", "link-local"),
                           ("zero.example", "unspecified"), ("group.example", "multicast")]:
            with self.subTest(name=name):
                status, _h, answer = mesh.request("a", f"/{name}:{peer.port}?timeout=2s")
                child = answer["next_node"][0]
                self.assertEqual((status, child["status"], child["rule"]), (502, 403, "ALLOW_IP_TARGETS"))
                self.assertIn(f", a {kind} address", child["error"])
        self.assertEqual(peer.connections, [])

    def test_localhost_is_refused_through_the_real_resolver(self):
        with Mesh({"a": {}}) as mesh:  # the one name every machine resolves, from /etc/hosts
            status, _h, answer = mesh.request("a", f"/localhost:{mesh.port('a')}")
        self.assertEqual((status, answer["next_node"][0]["status"], answer["next_node"][0]["rule"]),
                         (502, 403, "ALLOW_IP_TARGETS"))

    def test_allow_ip_targets_lifts_the_rule_and_peers_names_stay_allowed(self):
        mesh = self.mesh({"sneaky.example": "127.0.0.1"}, allow_ip_targets=True)
        status, _h, answer = mesh.request("a", f"/sneaky.example:{mesh.port('b')}")
        self.assertEqual((status, answer["next_node"][0]["host"]), (200, "b"))
        self.assertEqual(self.mesh({})  .request("a", "/b")[0], 200)  # b is in PEERS, on 127.0.0.1


class OutboundConnectionPoolTest(unittest.TestCase):
    """Liveness at any descriptor number; every peer's idle connections expire; none left in CLOSE_WAIT."""

    def test_reuse_works_above_descriptor_1024(self):
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < 1200:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 2048), hard))
            self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        filler = []
        self.addCleanup(lambda: [os.close(fd) for fd in filler])
        while len(filler) < 1100:
            fd = os.open(os.devnull, os.O_RDONLY)
            filler.append(fd)
            if fd > 1030:
                break
        with Mesh({"a": {}, "b": {}}) as mesh:
            accepted = []
            server_b = mesh.servers["b"]
            original = server_b.process_request
            server_b.process_request = lambda request, address: (accepted.append(address), original(request, address))
            for _ in range(5):
                self.assertEqual(mesh.request("a", "/b")[0], 200)
            self.assertGreater(mesh.node("a").pool.idle[mesh.peers["b"][0]][0][0].sock.fileno(), 1024)
        self.assertEqual(len(accepted), 1)

    def test_idle_connections_to_every_peer_expire_without_more_calls(self):
        peers = [BadPeer(lambda sock, n: sock.sendall(record_bytes({})), keep_alive=True) for _ in range(5)]
        for peer in peers:
            self.addCleanup(peer.close)
        with Mesh({"a": {}}) as mesh:
            pool = mesh.node("a").pool
            pool.max_idle = 0.3
            for index, peer in enumerate(peers):
                mesh.peers[f"p{index}"] = [("127.0.0.1", peer.port)]
            self.assertEqual(mesh.request("a", "/p0~p1~p2~p3~p4")[0], 200)
            self.assertEqual(pool.count(), 5)
            wait_until(lambda: pool.count() == 0, 3, f"{pool.count()} idle connections never expired")

    def test_connections_the_peer_closed_are_reaped_at_once(self):
        def answer_then_close(sock, n):
            sock.sendall(record_bytes({}))
            time.sleep(0.05)  # the scenario: idle a moment, then
            return False  # the peer's idle timer: its end of the connection closes

        peers = [BadPeer(answer_then_close, keep_alive=True) for _ in range(4)]
        for peer in peers:
            self.addCleanup(peer.close)
        with Mesh({"a": {}}) as mesh:
            pool = mesh.node("a").pool
            for index, peer in enumerate(peers):
                mesh.peers[f"p{index}"] = [("127.0.0.1", peer.port)]
            self.assertEqual(mesh.request("a", "/p0~p1~p2~p3")[0], 200)
            idle = [connection for stack in pool.idle.values() for connection, _since in stack]
            self.assertEqual(len(idle), 4)
            # max_idle is 30 s: only the liveness check can close them this soon
            # Taken out of the pool, then closed (outside the pool's lock): both are waited for.
            wait_until(lambda: pool.count() == 0 and all(connection.sock is None for connection in idle), 3,
                       f"{pool.count()} closed connections never reaped, or a socket left in CLOSE_WAIT")

    def test_head_calls_reuse_their_connection(self):
        with Mesh({"a": {}, "b": {}}) as mesh:
            accepted = []
            server_b = mesh.servers["b"]
            original = server_b.process_request
            server_b.process_request = lambda request, address: (accepted.append(address), original(request, address))
            for _ in range(5):
                self.assertEqual(mesh.request("a", "/b", method="HEAD")[0], 200)
        self.assertEqual(len(accepted), 1)

    def test_outbound_connections_are_reused(self):
        with Mesh({"a": {}, "b": {}}) as mesh:
            accepted = []
            server_b = mesh.servers["b"]
            original = server_b.process_request
            server_b.process_request = lambda request, address: (accepted.append(address), original(request, address))
            for _ in range(20):
                self.assertEqual(mesh.request("a", "/b")[0], 200)
        self.assertEqual(len(accepted), 1)

    def test_idle_pooled_connections_expire(self):
        pool = sm.ConnectionPool(max_idle=0.05)
        with Mesh({"b": {}}) as mesh:
            peer = sm.Peer(mesh.peers["b"][0], "b", "http://b/")
            self.assertEqual(sm.call_peer(pool, peer, "/", "GET", b"", {}, 5, sm.UpstreamBudget(1 << 20)).status, 200)
            first = pool.take(peer, time.monotonic() + 5)
            pool.give_back(peer.address, first)
            self.assertIs(pool.take(peer, time.monotonic() + 5), first)  # fresh: reused
            pool.give_back(peer.address, first)
            time.sleep(0.1)  # the scenario: idle for longer than max_idle
            second = pool.take(peer, time.monotonic() + 5)
            self.assertIsNot(second, first)  # idle too long: a new connection
            self.assertIsNone(first.sock)
            second.close()
            pool.close()


class OutboundOverHttpTest(unittest.TestCase):
    """Calls between real nodes: failures in the tree, foreign answers, methods and bodies forwarded."""

    def test_failures_propagate_to_the_root(self):
        with Mesh({"a": {}, "b": {}, "c": {}}) as mesh:
            status, _h, answer = mesh.request("a", "/b/c;error=1")
        self.assertEqual(status, 502)
        b = answer["next_node"][0]
        self.assertEqual((b["status"], b["next_node"][0]["status"]), (502, 500))
        self.assertEqual(b["next_node"][0]["error"], "injected failure 500")

    def test_dead_peer_and_unknown_name_stay_in_the_tree(self):
        with Mesh({"a": {}, "b": {}}) as mesh:
            mesh.peers["dead"] = [("127.0.0.1", free_port())]
            mesh.node("a").resolver.getaddrinfo = fake_getaddrinfo({})  # no query for an invented name leaves here
            status, _h, answer = mesh.request("a", "/dead~b~nosuchname.invalid")
        self.assertEqual(status, 502)
        dead, b, unknown = answer["next_node"]
        self.assertEqual((dead["host"], dead["status"]), ("dead", 502))
        self.assertIn("connection refused", dead["error"])
        self.assertTrue(dead["url"].startswith("http://dead/"))
        self.assertEqual(b["status"], 200)
        self.assertEqual((unknown["host"], unknown["status"]), ("nosuchname.invalid", 502))
        self.assertIn("cannot resolve", unknown["error"])

    def test_non_simplemesh_answer_is_recorded_by_the_caller(self):
        from http.server import BaseHTTPRequestHandler, HTTPServer

        class Envoyish(BaseHTTPRequestHandler):
            def do_GET(self):
                body = b"no healthy upstream"
                self.send_response(503)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        other = HTTPServer(("127.0.0.1", 0), Envoyish)
        threading.Thread(target=other.serve_forever, args=(0.05,), daemon=True).start()
        try:
            with Mesh({"a": {}}) as mesh:
                mesh.peers["envoy"] = [("127.0.0.1", other.server_address[1])]
                status, _h, answer = mesh.request("a", "/envoy")
        finally:
            other.shutdown()
            other.server_close()
        self.assertEqual(status, 502)
        child = answer["next_node"][0]
        self.assertEqual((child["host"], child["status"]), ("envoy", 503))
        self.assertIn("no healthy upstream", child["error"])

    def test_refused_targets_are_403(self):
        with Mesh({"a": {}, "b": {}}, allowed_hosts=("b", "*.svc")) as mesh:
            status, _h, answer = mesh.request("a", "/127.0.0.1")
            self.assertEqual(status, 403)
            self.assertIn("ALLOW_IP_TARGETS", answer["error"])
            status, _h, answer = mesh.request("a", "/c")
            self.assertEqual((status, answer["rule"]), (403, "ALLOWED_HOSTS"))
            self.assertEqual(mesh.request("a", "/b")[0], 200)

    def test_method_and_body_are_forwarded(self):
        with Mesh({"a": {}, "b": {}}) as mesh:
            seen = mesh.record_requests("b")
            for method, body in [("POST", b'{"x": 1}'), ("PATCH", b"p"), ("DELETE", None), ("HEAD", None)]:
                status, _h, _answer = mesh.request("a", "/b", method=method, body=body)
                self.assertEqual(status, 200, method)
        self.assertEqual(seen, [("POST", b'{"x": 1}'), ("PATCH", b"p"), ("DELETE", b""), ("HEAD", b"")])

    def test_put_body_reaches_the_last_hop(self):
        with Mesh({"a": {}, "b": {}, "c": {}}) as mesh:
            seen = mesh.record_requests("c")
            self.assertEqual(mesh.request("a", "/b/c", method="PUT", body=b"payload")[0], 200)
        self.assertEqual(seen, [("PUT", b"payload")])

    def test_a_forwarded_body_keeps_its_content_type(self):
        with Mesh({"a": {}, "b": {}}) as mesh:
            _s, _h, answer = mesh.request("a", "/b;headers", method="POST", body=b'{"x": 1}',
                                          headers={"Content-Type": "application/json"})
        self.assertEqual(answer["next_node"][0]["headers"]["content-type"], "application/json")


class OutboundOtherToolsHintTest(unittest.TestCase):
    """A name that cannot be resolved and reads like httpbin's or podinfo's path gets the simple-mesh way."""

    def test_hints(self):
        rest = lambda text: sm.parse_route("/" + text) if text else ()
        self.assertIn("?status=503 at this node, or /b;status=503", sm.other_tool_hint("status", rest("503")))
        self.assertIn("?delay=1.5s", sm.other_tool_hint("delay", rest("1.5")))
        self.assertIn("?headers&body", sm.other_tool_hint("anything", ()))
        self.assertIn("/b;headers;body", sm.other_tool_hint("anything", rest("x/y")))
        for name, tail in [("status", ""), ("status", "abc"), ("shop", "503"), ("bytes", "")]:
            self.assertEqual(sm.other_tool_hint(name, rest(tail)), "", (name, tail))

    def test_an_unresolvable_tool_path_gets_a_hint_in_the_tree(self):
        with Mesh({"a": {}}) as mesh:
            mesh.node("a").resolver.getaddrinfo = fake_getaddrinfo({})  # every invented name is unknown
            _s, _h, answer = mesh.request("a", "/status/503")
            self.assertIn("cannot resolve 'status'", answer["next_node"][0]["error"])
            self.assertIn("?status=503", answer["next_node"][0]["error"])
            _s, _h, answer = mesh.request("a", "/shop")
            self.assertNotIn("reads like", answer["next_node"][0]["error"])


# --- The node -------------------------------------------------------------------------------------------------
# What a node answers (SPEC 3): its plan alone, fan-out, its operations endpoints (SPEC 4).

class NodePlanTest(unittest.TestCase):
    """The node's pipeline step by step, without sockets: plan_request (a Plan or one Refusal), admit, execute."""

    @staticmethod
    def plan(path, query="", defaults=None, **config):
        """plan_request alone: no socket, no thread, no node."""
        config = sm.Config(host="a", peers={}, **config)
        defaults = defaults or {}
        return sm.plan_request(config, defaults, sm.Directives.resolve(config, defaults, {}), path, query)

    def test_plan_gives_the_calls_and_directives_of_a_good_request(self):
        plan = self.plan("/b;delay=1ms/c", "size=100&view=tree")
        self.assertIsInstance(plan, sm.Plan)
        self.assertEqual([target.name for target, _rest in plan.calls], ["b"])
        self.assertEqual(plan.directives.size, 100)
        self.assertEqual(plan.call_count, 2)
        self.assertIsInstance(self.plan("/"), sm.Plan)

    def test_plan_refuses_every_bad_request_with_status_message_and_fields(self):
        cases = [  # (path, query, config, status, message part, fields)
            ("/b(", "", {}, 400, "bad route", {"route": "/b(", "position": 2}),
            ("/b", "delay=fast", {}, 400, "bad directive", {}),
            ("/b", "delay=1s", {"allow_directives": False}, 403, "not allowed", {"rule": "ALLOW_DIRECTIVES"}),
            ("/b/c/d", "", {"max_calls": 2}, 400, "MAX_CALLS=2", {"route": "/b/c/d", "position": 5}),
            ("/b~c/d", "", {"max_calls": 3}, 400, "MAX_CALLS=3", {"rule": "MAX_CALLS"}),
            ("/b/c/d", "", {"max_depth": 2}, 400, "MAX_DEPTH=2", {"rule": "MAX_DEPTH"}),
            ("/10.0.0.1", "", {}, 403, "IP address", {"rule": "ALLOW_IP_TARGETS", "target": "10.0.0.1"}),
            ("/b", "", {"allowed_hosts": ("c*",)}, 403, "ALLOWED_HOSTS", {"rule": "ALLOWED_HOSTS", "target": "b"}),
            ("/b", "size=2m", {"max_route_bytes": 1 << 20}, 400, "MAX_ROUTE_BYTES", {"rule": "MAX_ROUTE_BYTES"}),
        ]
        for path, query, config, status, message, fields in cases:
            with self.subTest(path=path, query=query, config=config):
                refusal = self.plan(path, query, **config)
                self.assertIsInstance(refusal, sm.Refusal)
                self.assertEqual(refusal.status, status)
                self.assertIn(message, refusal.message)
                self.assertEqual(refusal.fields, fields)
                outcome = refusal.outcome("a")
                self.assertEqual(outcome.record, {"host": "a", "status": status, "error": refusal.message, **fields})

    def test_admit_and_execute_alone_make_the_answer_of_a_plan(self):
        config = sm.Config(host="a", peers={})
        node = sm.build_node(config)
        self.addCleanup(node.pool.close)
        for query, status in (("", 200), ("error=1&status=503", 503)):
            with self.subTest(query=query):
                request = sm.Request("GET", "/", query, sm.Headers({"host": "a"}), b"", time.perf_counter(),
                                     time.time())
                trace = sm.TraceContext.from_headers(request.headers, config.forward_headers, config.tracing)
                plan = node.admit(request, self.plan("/", query))
                self.assertIsInstance(plan, sm.Plan)
                outcome = node.execute(request, plan, trace)
                node.release(request)
                self.assertEqual((outcome.status, outcome.record["status"]), (status, status))
                self.assertEqual((outcome.record["host"], outcome.record["next_node"]), ("a", []))
                self.assertEqual(outcome.record["trace_id"], trace.trace_id)
        self.assertEqual(node.inflight.used, 0)


class NodeAnswerTest(unittest.TestCase):
    """The answer a node gives (SPEC 3): the nested record, its fields and identity."""

    def test_chain_nests_answers_and_shares_one_trace(self):
        with Mesh({"a": {}, "b": {}, "c": {}}) as mesh:
            status, headers, answer = mesh.request("a", "/b/c")
        self.assertEqual(status, 200)
        self.assertEqual(hosts(answer), ["a", [["b", [["c", []]]]]])
        for key in ("host", "status", "elapsed_time", "start_time", "trace_id", "span_id", "next_node"):
            self.assertIn(key, answer)
        self.assertEqual(list(answer)[:4], ["host", "status", "elapsed_time", "start_time"])
        trace_ids = {answer["trace_id"], answer["next_node"][0]["trace_id"],
                     answer["next_node"][0]["next_node"][0]["trace_id"]}
        self.assertEqual(len(trace_ids), 1)
        self.assertRegex(answer["trace_id"], "^[0-9a-f]{32}$")
        self.assertEqual(headers["x-trace-id"], answer["trace_id"])

    def test_identity_and_version_fields(self):
        with Mesh({"a": {}}, version="v2", identity={"pod": "a-7f", "namespace": "demo"}) as mesh:
            _s, _h, answer = mesh.request("a", "/")
        self.assertEqual((answer["version"], answer["pod"], answer["namespace"]), ("v2", "a-7f", "demo"))


class NodeFanOutTest(unittest.TestCase):
    """Fan-out: groups, shared tails, parallel branches on a bounded pool."""

    def test_fan_out_groups_and_shared_tails(self):
        with Mesh({n: {} for n in "abcdef"}) as mesh:
            _s, _h, fan = mesh.request("a", "/b~c/d")
            _s, _h, groups = mesh.request("a", "/(b/d)~(c/e)/f")
        self.assertEqual(hosts(fan), ["a", [["b", [["d", []]]], ["c", [["d", []]]]]])
        self.assertEqual(hosts(groups), ["a", [["b", [["d", [["f", []]]]]], ["c", [["e", [["f", []]]]]]]])

    def test_parallel_fan_out_runs_concurrently(self):
        with Mesh({"a": {}, "b": {"delay": "0.4"}, "c": {"delay": "0.4"}, "d": {"delay": "0.4"}}) as mesh:
            started = time.perf_counter()
            status, _h, answer = mesh.request("a", "/b~c~d?parallel")
            parallel = time.perf_counter() - started
            started = time.perf_counter()
            mesh.request("a", "/b~c~d")
            sequential = time.perf_counter() - started
        self.assertEqual(status, 200)
        self.assertEqual([child["host"] for child in answer["next_node"]], ["b", "c", "d"])  # route order kept
        self.assertLess(parallel, 0.8)
        self.assertGreater(sequential, 1.2)

    def test_parallel_fan_out_shares_a_bounded_pool(self):
        """20 parallel fan-outs at once use MAX_FANOUT_THREADS threads in all; branches beyond run on their own
        request's thread, so every request still gets its whole tree."""
        with Mesh({"a": {}, "b": {"delay": "0.1"}}, max_fanout_threads=4) as mesh:
            peak = []

            pool = mesh.node("a").fanout

            def fanout_threads():  # this node's (other tests' nodes named a may still have theirs)
                return pool.threads

            with concurrent.futures.ThreadPoolExecutor(20) as clients:
                answers = [clients.submit(mesh.request, "a", "/b~b~b~b?parallel") for _ in range(20)]
                while not all(answer.done() for answer in answers):
                    peak.append(fanout_threads())
                    time.sleep(0.01)  # the sampling period of the peak
            for answer in answers:
                status, _h, record = answer.result()
                self.assertEqual((status, [child["host"] for child in record["next_node"]]), (200, ["b"] * 4))
            self.assertLessEqual(max(peak), 4)
            self.assertEqual(max(peak), 4)  # and it was used


class NodeOperationsTest(unittest.TestCase):
    """Operations endpoints (SPEC 4): probes, readiness and runtime defaults, ALLOW_DIRECTIVES."""

    def test_health_ready_and_reserved_names(self):
        with Mesh({"a": {}}) as mesh:
            self.assertEqual(mesh.request("a", "/healthz")[0], 200)
            self.assertEqual(mesh.request("a", "/readyz")[0], 200)
            mesh.request("a", "/-/ready?ready=false", method="POST")
            self.assertEqual(mesh.request("a", "/readyz")[0], 503)
            self.assertEqual(mesh.request("a", "/healthz")[0], 200)
            status, _h, answer = mesh.request("a", "/metrics/b")
            self.assertEqual(status, 404)
            self.assertIn("reserved", answer["error"])
            self.assertEqual(mesh.request("a", "/-/nothing")[0], 404)

    def test_readiness_needs_an_explicit_value(self):
        with Mesh({"a": {}}) as mesh:
            self.assertEqual(mesh.request("a", "/-/ready", method="POST")[0], 400)
            self.assertEqual(mesh.request("a", "/readyz")[0], 200)

    def test_allow_directives_false_also_locks_the_defaults(self):
        with Mesh({"a": {}}, allow_directives=False) as mesh:
            status, _h, answer = mesh.request("a", "/-/defaults?error=1", method="POST")
            self.assertEqual((status, answer["rule"]), (403, "ALLOW_DIRECTIVES"))
            self.assertEqual(mesh.request("a", "/-/defaults", method="DELETE")[0], 403)
            self.assertEqual(mesh.request("a", "/")[0], 200)
            status, _h, answer = mesh.request("a", "/-/ready?ready=false", method="POST")
            self.assertEqual((status, answer["rule"]), (403, "ALLOW_DIRECTIVES"))
            self.assertEqual(mesh.request("a", "/readyz")[0], 200)  # still in service
            self.assertEqual(mesh.request("a", "/-/ready")[2], {"host": "a", "ready": True})  # reading stays allowed
            self.assertEqual(mesh.request("a", "/-/defaults")[0], 200)

    def test_runtime_defaults_make_a_sick_replica(self):
        with Mesh({"a": {}}) as mesh:
            status, _h, answer = mesh.request("a", "/-/defaults?error=1&status=503", method="POST")
            self.assertEqual((status, answer["defaults"]), (200, {"error": "1", "status": "503"}))
            self.assertEqual(mesh.request("a", "/")[0], 503)
            self.assertEqual(mesh.request("a", "/healthz")[0], 200)
            self.assertEqual(mesh.request("a", "/-/defaults?error=5", method="POST")[0], 400)
            mesh.request("a", "/-/defaults", method="DELETE")
            self.assertEqual(mesh.request("a", "/")[0], 200)


class NodeLivenessControlTest(unittest.TestCase):
    """POST /-/healthy makes /healthz fail on purpose (SPEC 4), gated by ALLOW_DIRECTIVES."""

    def test_healthz_fails_on_purpose_until_reset(self):
        with Mesh({"a": {}}) as mesh:
            self.assertEqual(mesh.request("a", "/-/healthy?healthy=false", method="POST")[2],
                             {"host": "a", "healthy": False})
            self.assertEqual(mesh.request("a", "/healthz")[0], 503)
            self.assertEqual(mesh.request("a", "/readyz")[0], 200)  # liveness only
            self.assertEqual(mesh.request("a", "/")[0], 200)
            self.assertEqual(mesh.request("a", "/-/healthy")[2], {"host": "a", "healthy": False})
            self.assertEqual(mesh.request("a", "/-/healthy?healthy=maybe", method="POST")[0], 400)
            self.assertEqual(mesh.request("a", "/-/healthy", method="PUT")[0], 405)
            mesh.request("a", "/-/healthy?healthy=true", method="POST")
            self.assertEqual(mesh.request("a", "/healthz")[0], 200)

    def test_gated_by_allow_directives(self):
        with Mesh({"a": {}}, allow_directives=False) as mesh:
            status, _h, answer = mesh.request("a", "/-/healthy?healthy=false", method="POST")
            self.assertEqual((status, answer["rule"]), (403, "ALLOW_DIRECTIVES"))
            self.assertEqual(mesh.request("a", "/healthz")[0], 200)


# --- Views ----------------------------------------------------------------------------------------------------
# The answer as a terminal tree and an HTML waterfall (SPEC 3).

class ViewTreeTest(unittest.TestCase):
    """?view=tree: the plain-text tree for a terminal."""

    def test_known_tree_renders_aligned_with_the_failing_branch_marked(self):
        self.assertEqual(sm.render_tree(KNOWN_TREE), (
            "trace 4bf92f3577b34da6a3ce929d0e0e4736\n"
            "a        502  350.0 ms  ✗ a downstream call failed\n"
            "├─ b@v2  200  200.0 ms  delay 100.0 ms\n"
            "│  └─ c  200   50.0 ms\n"
            "└─ d     502   10.0 ms  ✗ connection refused\n"
            "1 failed hop: d\n"))

    def test_color_marks_statuses_and_the_origin_of_the_failure(self):
        text = sm.render_tree(KNOWN_TREE, color=True)
        self.assertIn("\033[32m200\033[0m", text)
        self.assertIn("\033[31m\033[1m✗ connection refused\033[0m", text)  # the origin: red and bold
        self.assertIn("\033[2m✗ a downstream call failed\033[0m", text)  # only passing it on: dim
        self.assertEqual(sm.render_tree(KNOWN_TREE).count("\033"), 0)

    def test_cpu_burn_is_shown(self):
        self.assertIn("  cpu 200.0 ms", sm.render_tree({"host": "a", "status": 200, "elapsed_time": 0.2, "cpu": 0.2}))
        self.assertNotIn("cpu", sm.render_tree({"host": "a", "status": 200, "cpu": "lots"}))

    def test_success_says_ok_and_a_reset_has_no_status(self):
        self.assertTrue(sm.render_tree({"host": "a", "status": 200, "elapsed_time": 1.5}).endswith(
            "ok: 1 hop in 1.500 s\n"))
        text = sm.render_tree({"host": "a", "status": 502, "next_node": [{"host": "b", "error": "reset"}]})
        self.assertIn("└─ b  ---", text)

    def test_garbage_from_downstream_never_breaks_the_view(self):
        for record in ({"host": "a", "next_node": "x"}, {"host": "a", "next_node": [1, None]},
                       {"host": "a", "status": "200", "elapsed_time": "slow", "start_time": 5},
                       {"host": "a", "status": True, "next_node": [{"host": "b", "start_time": "yesterday"}]},
                       {"host": "a", "elapsed_time": float("inf"), "start_time": "0001-01-01T00:00:00",
                        "next_node": [{"host": "b", "elapsed_time": float("nan"), "start_time": "9999-12-31"}]}):
            with self.subTest(record=record):
                self.assertIn("a", sm.render_tree(record))
                page = sm.render_html(record, "b")
                self.assertIn("<!DOCTYPE html>", page)
                self.assertNotIn("nan%", page)

    def test_a_very_deep_answer_renders_without_recursion(self):
        record = leaf = {"host": "n0", "status": 200, "elapsed_time": 1.0}
        for depth in range(1, 3000):
            leaf["next_node"] = [{"host": f"n{depth}", "status": 200, "elapsed_time": 1.0}]
            leaf = leaf["next_node"][0]
        self.assertEqual(len(sm.walk_tree(record)), 3000)


class ViewWaterfallLayoutTest(unittest.TestCase):
    """The waterfall's layout: where each hop's bar goes."""

    def test_hops_are_placed_on_the_root_time_line(self):
        hops = sm.walk_tree(KNOWN_TREE)
        self.assertEqual([(h.host, h.parent, h.depth) for h in hops],
                         [("a", -1, 0), ("b@v2", 0, 1), ("c", 1, 2), ("d", 0, 1)])
        self.assertAlmostEqual(hops[1].start, 0.001, places=4)
        self.assertAlmostEqual(hops[2].start, 0.150, places=4)
        # d was written by its caller (no start_time): it starts when its sibling b ended
        self.assertTrue(hops[3].estimated)
        self.assertAlmostEqual(hops[3].start, 0.201, places=4)
        self.assertEqual([h.origin for h in hops], [False, False, False, True])

    def test_a_child_is_kept_inside_its_parent_despite_clock_skew(self):
        record = {"host": "a", "status": 200, "elapsed_time": 0.1, "start_time": "2026-01-01T00:00:00Z",
                  "next_node": [{"host": "b", "status": 200, "elapsed_time": 0.05,
                                 "start_time": "2026-01-01T00:00:09Z"},
                                {"host": "c", "status": 200, "elapsed_time": 0.05,
                                 "start_time": "2025-12-31T23:59:00Z"}]}
        _a, b, c = sm.walk_tree(record)
        self.assertAlmostEqual(b.start, 0.05)
        self.assertEqual(c.start, 0.0)


class ViewHtmlTest(unittest.TestCase):
    """The self-contained HTML page and the choice of view."""

    def test_page_is_self_contained_and_escapes_what_it_shows(self):
        record = dict(KNOWN_TREE, host="<script>alert(1)</script>")
        page = sm.render_html(record, 'b/"><img src=x>', "http://jaeger:16686/trace/{trace_id}")
        self.assertNotIn("<script>alert", page)
        self.assertNotIn('"><img', page)
        self.assertIn('<link rel="icon" href="data:,">', page)
        self.assertIn('href="http://jaeger:16686/trace/4bf92f3577b34da6a3ce929d0e0e4736"', page)
        self.assertNotRegex(page, r'(src|href)="(https?:)?//(?!jaeger)')  # no external asset
        self.assertEqual(page.count('class="hop '), 4)
        self.assertIn('class="hop fail failed origin" data-index="3" data-parent="0"', page)

    def test_bars_are_positioned_by_start_and_length(self):
        page = sm.render_html(KNOWN_TREE, "b/c~d")
        self.assertIn('style="left:0.000%;width:100.000%"', page)  # the root spans the whole time line
        self.assertIn('style="left:42.857%;width:14.286%"', page)  # c: 150 ms + 50 ms of 350 ms

    def test_trace_link(self):
        self.assertEqual(sm.trace_link("http://j/trace/{trace_id}?x=1", "ab"), "http://j/trace/ab?x=1")
        self.assertEqual(sm.trace_link("http://tempo/explore?trace=", "ab"), "http://tempo/explore?trace=ab")
        self.assertEqual(sm.trace_link("", "ab"), "")

    def test_choose_view(self):
        browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
        self.assertEqual(sm.choose_view("", "*/*"), "json")
        self.assertEqual(sm.choose_view("", browser), "html")
        self.assertEqual(sm.choose_view("delay=1s&view=json", browser), "json")
        self.assertEqual(sm.choose_view("VIEW=Tree", ""), "tree")
        self.assertEqual(sm.choose_view("delay=1s", browser), "html")
        self.assertIsNone(sm.choose_view("view=xml", ""))
        self.assertEqual(sm.view_route("/b/c", "delay=1s&view=tree"), "b/c?delay=1s")
        self.assertEqual(sm.view_route("/", "view=tree"), "")

    def test_render_view_draws_an_outcome_in_its_view_alone(self):
        record = {"host": "a", "status": 200, "elapsed_time": 0.01, "next_node": []}
        self.assertIsNone(sm.render_view(sm.Outcome(200, dict(record)), "json", "/", "").text)
        tree = sm.render_view(sm.Outcome(200, dict(record)), "tree", "/", "view=tree")
        self.assertEqual(tree.text, sm.render_tree(record))
        self.assertTrue(tree.content_type.startswith("text/plain"))
        page = sm.render_view(sm.Outcome(200, dict(record)), "html", "/b", "delay=1s&view=html", "http://jaeger")
        self.assertTrue(page.content_type.startswith("text/html"))
        self.assertIn(("Content-Security-Policy", sm.HTML_CSP), page.extra_headers)
        self.assertIn("?delay=1s&amp;view=json", page.text)
        reset = sm.Outcome(0, reset=True)
        self.assertIs(sm.render_view(reset, "tree", "/", ""), reset)
        self.assertIsNone(reset.text)


class ViewReadableJsonTest(unittest.TestCase):
    """People's tools get indented JSON; nodes and scripts compact JSON."""

    def test_who_gets_indented_json(self):
        for agent, accept, indented in [("curl/8.5.0", "*/*", True), ("HTTPie/3.2.2", "application/json", True),
                                        ("Wget/1.21.4", "*/*", True), ("Mozilla/5.0", "application/json", True),
                                        ("Mozilla/5.0", "text/html,application/json", False),
                                        ("python-requests/2.32", "*/*", False), ("", "", False),
                                        (sm.USER_AGENT, "*/*", False)]:
            headers = sm.Headers({"user-agent": agent, "accept": accept})
            self.assertEqual(sm.wants_indented_json(headers), indented, (agent, accept))

    def test_curl_gets_indented_json_and_nodes_talk_compact(self):
        with Mesh({"a": {}, "b": {}}) as mesh:
            _s, _h, text = mesh.request("a", "/b;headers?view=json", headers={"user-agent": "curl/8.5.0"})
            connection = http.client.HTTPConnection(*mesh.peers["a"][0], timeout=10)
            connection.request("GET", "/b?size=3k", headers={"user-agent": "curl/8.5.0"})
            padded = connection.getresponse().read().decode()
            connection.close()
            connection = http.client.HTTPConnection(*mesh.peers["a"][0], timeout=10)
            connection.request("GET", "/b", headers={"user-agent": "a-script"})
            compact = connection.getresponse().read().decode()
            connection.close()
        self.assertEqual(text["next_node"][0]["headers"]["user-agent"], sm.USER_AGENT)  # nodes say who they are
        self.assertTrue(padded.startswith('{\n  "host": "a"'), padded[:40])
        self.assertTrue(padded.endswith("\n"))
        self.assertEqual(len(padded), 3 * 1024 + 1)  # padded to the size asked, then the last newline
        self.assertEqual(json.loads(padded)["next_node"][0]["host"], "b")
        self.assertNotIn("\n", compact)


class ViewOverHttpTest(unittest.TestCase):
    """Views chosen by a real node from Accept and ?view."""

    def test_handler_picks_the_view(self):
        with Mesh({"a": {}, "b": {}, "c": {"error": "1"}}) as mesh:
            status, headers, text = mesh.request("a", "/b~c?view=tree")
            self.assertEqual((status, headers["content-type"]), (502, "text/plain; charset=utf-8"))
            self.assertRegex(text, r"^trace [0-9a-f]{32}\na +502 .*\n├─ b +200 .*\n"
                                   r"└─ c +500 .*✗ injected failure 500")
            status, headers, page = mesh.request("a", "/b?delay=1ms", headers={"Accept": "text/html"})
            self.assertEqual((status, headers["content-type"]), (200, "text/html; charset=utf-8"))
            self.assertIn("default-src 'none'", headers["content-security-policy"])
            self.assertIn('value="b?delay=1ms"', page)
            status, headers, record = mesh.request("a", "/b?view=json", headers={"Accept": "text/html"})
            self.assertEqual(hosts(record), ["a", [["b", []]]])
            status, _headers, record = mesh.request("a", "/b?view=pdf")
            self.assertEqual(status, 400)
            self.assertIn("unknown view", record["error"])
            self.assertEqual(mesh.node("b").metrics.requests, {("GET", "200"): 3})  # the bad view called no one

    def test_trace_ui_url_links_the_trace(self):
        config = sm.Config.from_env({"TRACE_UI_URL": "http://jaeger:16686/trace/{trace_id}", "HOST": "a"})
        self.assertEqual(config.trace_ui_url, "http://jaeger:16686/trace/{trace_id}")
        with Mesh({"a": {}}, trace_ui_url=config.trace_ui_url) as mesh:
            _status, headers, page = mesh.request("a", "/", headers={"Accept": "text/html"})
            self.assertIn(f'href="http://jaeger:16686/trace/{headers["x-trace-id"]}"', page)


class ViewWaterfallInChromiumTest(unittest.TestCase):
    """The HTML page as a real browser draws it (DevTools protocol)."""

    def test_browser_draws_one_bar_per_hop_nested_with_the_failure_marked_and_fetches_nothing_else(self):
        with Mesh({"a": {}, "b": {"delay": "30ms"}, "c": {"delay": "20ms"}, "d": {"error": "1"}}) as mesh:
            devtools = DevTools(self)
            try:
                devtools.send("Network.enable")
                devtools.send("Page.enable")
                base = f"http://127.0.0.1:{mesh.port('a')}/"
                devtools.send("Page.navigate", url=base + "b/c~d")
                devtools.wait_for("Page.loadEventFired")
                hops = json.loads(devtools.evaluate(READ_WATERFALL))
                self.assertEqual([(h["host"], h["parent"]) for h in hops], [("a", -1), ("b", 0), ("c", 1), ("d", 1)])
                by_index = {h["index"]: h for h in hops}
                for hop in hops[1:]:  # each bar lies within its caller's bar and below it
                    parent = by_index[hop["parent"]]
                    self.assertGreaterEqual(hop["left"], parent["left"] - 1, hop)
                    self.assertLessEqual(hop["right"], parent["right"] + 1, hop)
                    self.assertGreater(hop["top"], parent["top"], hop)
                self.assertGreater(hops[0]["width"], 800)  # the root spans the time line of a 1280 px page
                for hop in hops[1:]:  # and every bar is as long as its share of the root's time
                    share = label_seconds(hop["label"]) / label_seconds(hops[0]["label"])
                    self.assertAlmostEqual(hop["width"] / hops[0]["width"], share, delta=0.01, msg=hop)
                self.assertGreaterEqual(hops[3]["left"], hops[2]["right"] - 1)  # d called after c (sequential)
                self.assertEqual([h["origin"] for h in hops], [False, False, False, True])
                self.assertEqual([h["failed"] for h in hops], [True, True, False, True])
                self.assertIn("injected failure 500", hops[3]["label"])
                self.assertRegex(devtools.evaluate("document.getElementById('trace').textContent"), "^[0-9a-f]{32}$")
                # the form runs another route on the same node
                devtools.evaluate("document.getElementById('route').value = 'c';"
                                  "document.getElementById('run').requestSubmit()")
                devtools.wait_for("Page.loadEventFired")
                hops = json.loads(devtools.evaluate(READ_WATERFALL))
                self.assertEqual([(h["host"], h["failed"]) for h in hops], [("a", False), ("c", False)])
                urls = devtools.requested_urls()
            finally:
                devtools.close()
        self.assertEqual([url for url in urls if not url.startswith("data:")], [base + "b/c~d", base + "c"])


# --- Metrics --------------------------------------------------------------------------------------------------
# The /metrics exposition, checked by promtool and scraped by a real Prometheus (SPEC 4).

class MetricsExpositionTest(unittest.TestCase):
    """/metrics as promtool and OpenMetrics see it."""

    def test_promtool_accepts_metrics_after_mixed_traffic(self):
        require_tool(self, "promtool")
        with Mesh({"a": {}, "b": {}}) as mesh:
            mesh.peers["nowhere"] = [("127.0.0.1", free_port())]
            mixed_traffic(mesh)
            _status, headers, text = mesh.request("a", "/metrics")
        self.assertTrue(headers["content-type"].startswith("text/plain; version=0.0.4"))
        self.assertIn('simplemesh_calls_total{target="nowhere",code="error"} 1', text)
        self.assertIn('simplemesh_http_request_duration_seconds_bucket{le="60.0"}', text)
        self.assertIn("# TYPE simplemesh_http_requests_total counter", text)
        self.assertIn("process_cpu_seconds_total ", text)
        result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                                timeout=20)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_openmetrics_with_exemplars(self):
        with Mesh({"a": {}, "b": {}}) as mesh:
            _status, _headers, answer = mesh.request("a", "/b", headers={"traceparent": VALID_TP})
            mesh.request("a", "/", headers={"traceparent": VALID_TP[:-2] + "00"})  # unsampled: no exemplar
            _status, headers, text = mesh.request(
                "a", "/metrics", headers={"Accept": "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"})
        self.assertEqual(headers["content-type"], sm.OPENMETRICS_TYPE)
        self.assertTrue(text.endswith("# EOF\n"))
        self.assertIn("# TYPE simplemesh_http_requests counter", text)
        self.assertIn("# TYPE process_cpu_seconds counter", text)
        exemplars = [line for line in text.splitlines() if " # {" in line]
        self.assertEqual(len(exemplars), 2)  # one request bucket and one call bucket
        for line in exemplars:
            self.assertRegex(line, r'_bucket\{.*\} \d+ # \{trace_id="4bf92f3577b34da6a3ce929d0e0e4736"\} '
                                   r'[0-9.e-]+ \d+\.\d{3}$')

    def test_label_values_stay_bounded(self):
        metrics = sm.Metrics()
        for index in range(sm.MAX_TARGET_LABELS + 10):
            metrics.observe_call(f"t{index}", "200", 0.01)
        targets = set(re.findall(r'target="([^"]+)"', metrics.render()))
        self.assertEqual(len(targets), sm.MAX_TARGET_LABELS + 1)
        self.assertIn("other", targets)


class MetricsPrometheusScrapeTest(unittest.TestCase):
    """A real Prometheus scrapes two nodes (OpenMetrics, exemplar storage on) and PromQL counts our requests."""

    def test_promql_counts_requests_and_exemplars_are_stored(self):
        require_tool(self, "prometheus")
        sent = 7
        with Mesh({"a": {}, "b": {}}) as mesh, tempfile.TemporaryDirectory() as workdir:
            targets = [f"127.0.0.1:{mesh.port(name)}" for name in ("a", "b")]
            config = os.path.join(workdir, "prometheus.yml")
            with open(config, "w") as out:
                out.write("global: {scrape_interval: 200ms, scrape_timeout: 200ms}\nscrape_configs:\n"
                          f"  - job_name: mesh\n    static_configs: [{{targets: {json.dumps(targets)}}}]\n")
            trace_ids = {mesh.request("a", "/b")[2]["trace_id"] for _ in range(sent)}
            port = free_port()
            process = subprocess.Popen(
                ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={workdir}/data",
                 f"--web.listen-address=127.0.0.1:{port}", "--enable-feature=exemplar-storage"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                # Scrapes are requests too: the first sample of each counter is the one taken before any scrape.
                query = "sum by (instance) (min_over_time(simplemesh_http_requests_total[5m]))"
                result = []

                def both_scraped():
                    try:
                        result[:] = prometheus_get(port, "/api/v1/query?query=" + urllib.parse.quote(query))
                    except OSError:
                        pass
                    return len(result) == 2

                wait_until(both_scraped, 20, "prometheus never scraped both nodes")
                self.assertEqual({r["metric"]["instance"]: r["value"][1] for r in result},
                                 {targets[0]: str(sent), targets[1]: str(sent)})
                now = time.time()
                exemplars = prometheus_get(port, "/api/v1/query_exemplars?query=" + urllib.parse.quote(
                    "simplemesh_http_request_duration_seconds_bucket") + f"&start={now - 120}&end={now + 5}")
                stored = {e["labels"]["trace_id"] for series in exemplars for e in series["exemplars"]}
                self.assertTrue(stored and stored <= trace_ids, (stored, trace_ids))
            finally:
                process.terminate()
                process.wait(timeout=10)


# --- Spans ----------------------------------------------------------------------------------------------------
# Native spans: OTEL_* configuration, OTLP encoding, export to a receiver (SPEC 5).

class SpanOtelEnvironmentTest(unittest.TestCase):
    """The OTEL_* environment: endpoints, switches, protocol, bad values."""

    def test_endpoints(self):
        tracing = sm.TracingConfig.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"})
        self.assertEqual(tracing.endpoint, "http://collector:4318/v1/traces")
        tracing = sm.TracingConfig.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
                                             "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://tempo/otlp/v1/traces"})
        self.assertEqual(tracing.endpoint, "https://tempo/otlp/v1/traces")

    def test_off_switches(self):
        for environ in ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"},
                        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}):
            self.assertIsNone(sm.TracingConfig.from_env(environ))

    def test_standard_variables(self):
        tracing = sm.TracingConfig.from_env({
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_HEADERS": "api-key=s%3Dcret,x=1",
            "OTEL_RESOURCE_ATTRIBUTES": "service.name=shop,deployment.environment=lab",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1",
            "OTEL_PROPAGATORS": "tracecontext,baggage,b3multi", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "2500",
            "OTEL_BSP_MAX_QUEUE_SIZE": "100", "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"})
        self.assertEqual(tracing.headers, (("api-key", "s=cret"), ("x", "1")))
        self.assertEqual((tracing.service_name, tracing.resource), ("shop", (("deployment.environment", "lab"),)))
        self.assertEqual((tracing.sampler, tracing.ratio, tracing.timeout), ("parentbased_traceidratio", 0.1, 2.5))
        self.assertEqual((tracing.max_queue, tracing.max_batch, tracing.compression), (100, 100, "gzip"))
        # Counts stay ints: the export thread slices its queue with them (a float there killed it).
        self.assertEqual([type(tracing.max_queue), type(tracing.max_batch)], [int, int])
        batched = sm.TracingConfig.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                                             "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "50"})
        self.assertIs(type(batched.max_batch), int)
        self.assertEqual(batched.max_batch, 50)
        self.assertEqual(tracing.propagators, ("tracecontext", "baggage", "b3multi"))
        config = sm.Config.from_env({"HOST": "a", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                                     "OTEL_SERVICE_NAME": "checkout"})
        self.assertEqual(sm.node_resource(config)["service.name"], "checkout")
        config = sm.Config.from_env({"HOST": "a", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
        self.assertEqual(sm.node_resource(config)["service.name"], "a")

    def test_protocol(self):
        # The SDKs' default is http/protobuf; http/json when asked; gRPC is a clear start-up error.
        environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}
        self.assertEqual(sm.TracingConfig.from_env(environ).protocol, "http/protobuf")
        for name in ("OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"):
            self.assertEqual(sm.TracingConfig.from_env(dict(environ, **{name: "http/json"})).protocol, "http/json")
        self.assertEqual(sm.TracingConfig.from_env(dict(environ, OTEL_EXPORTER_OTLP_PROTOCOL="http/json",
                                                        OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="http/protobuf")).protocol,
                         "http/protobuf")
        with self.assertRaises(sm.ConfigError) as caught:
            sm.TracingConfig.from_env(dict(environ, OTEL_EXPORTER_OTLP_PROTOCOL="grpc"))
        self.assertIn("gRPC is not supported", str(caught.exception))
        result = run_cli("serve", env=dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9",
                                           OTEL_EXPORTER_OTLP_PROTOCOL="grpc", PORT=str(free_port())))
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("OTEL_EXPORTER_OTLP_PROTOCOL='grpc'", result.stderr)
        self.assertNotIn("Traceback", result.stderr)

    def test_bad_values_are_named(self):
        for name, value in (("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"), ("OTEL_TRACES_SAMPLER", "sometimes"),
                            ("OTEL_PROPAGATORS", "xray"), ("OTEL_BSP_MAX_QUEUE_SIZE", "-1"),
                            ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318"),
                            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")):
            environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", name: value}
            with self.subTest(name=name), self.assertRaises(sm.ConfigError) as caught:
                sm.Config.from_env(environ)
            self.assertIn(name if name != "OTEL_EXPORTER_OTLP_ENDPOINT" else "endpoint", str(caught.exception))


class SpanOtlpEncodingTest(unittest.TestCase):
    """The span writers are pure: what they write must parse strictly with opentelemetry-proto, in both encodings,
    whatever a client put in the request."""

    def setUp(self):
        require_module(self, "opentelemetry.proto")
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
        self.pb = trace_service_pb2

    def parse(self, encoding, payload):
        if encoding == "http/json":
            return strict_otlp_json(json.loads(payload))
        message = self.pb.ExportTraceServiceRequest.FromString(payload)
        self.assertEqual(message.SerializeToString(), payload)  # no unknown, repeated or misplaced field
        return message

    def test_a_strange_host_header_cannot_break_a_span(self):
        trace = sm.TraceContext("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", {}, native=True, sampled=True)
        for host in ["a:\u00b9", "a:99999999999999999999", "a:", ":80", ""]:
            request = sm.Request("GET", "/", "", sm.Headers({"host": host}))
            span = sm.span_from_queue(sm.server_span(trace, request, 200, time.time_ns()))
            for encoding, encode in sm.OTLP_ENCODERS.items():
                message = self.parse(encoding, encode({"service.name": "a"}, [span]))
                self.assertEqual(message.resource_spans[0].scope_spans[0].spans[0].trace_id.hex(), trace.trace_id)

    def test_spans_with_hostile_text_parse_strictly(self):
        tracing = sm.TracingConfig(endpoint="http://x/v1/traces")
        headers = sm.Headers({"host": "a:8080", "user-agent": 'evil "agent"\\\n\u00e9\udcff', "traceparent": VALID_TP,
                              "tracestate": "rojo=00f067aa0ba902b7"})
        request = sm.Request("POST", '/b/"q\u2603', "x=1&y=%22", headers, b"x" * 1000, 0.0, 1700000000.5)
        trace = sm.TraceContext.from_headers(headers, (), tracing)
        trace.event("simplemesh.delay", **{"simplemesh.delay_seconds": 0.25})
        trace.event("simplemesh.error", **{"http.response.status_code": 503})
        peer = sm.Peer(("10.0.0.1", 80), "b", "http://b/\"q")
        queued = [sm.server_span(trace, request, 503, 1700000001_000_000_000),
                  sm.client_span(trace, "1234567812345678", "POST", "b", peer, 504, 'timeout after 1s "x"',
                                 1700000000_600_000_000, 1700000000_700_000_000)]
        spans = [sm.span_from_queue(item) for item in queued]
        resource = {"service.name": "a", "flag": True, "n": -3, "ratio": 0.5}
        for encoding, encode in sm.OTLP_ENCODERS.items():
            with self.subTest(encoding=encoding):
                message = self.parse(encoding, encode(resource, spans))
                attributes = {a.key: a.value for a in message.resource_spans[0].resource.attributes}
                self.assertEqual((attributes["flag"].bool_value, attributes["n"].int_value,
                                  attributes["ratio"].double_value), (True, -3, 0.5))
                scope = message.resource_spans[0].scope_spans[0]
                self.assertEqual((scope.scope.name, scope.scope.version), ("simplemesh", sm.__version__))
                server, client = scope.spans
                self.assertEqual((server.kind, client.kind), (2, 3))
                self.assertEqual(server.trace_id.hex(), "4bf92f3577b34da6a3ce929d0e0e4736")
                self.assertEqual(server.parent_span_id.hex(), "00f067aa0ba902b7")
                self.assertEqual(client.parent_span_id, server.span_id)
                self.assertEqual(server.trace_state, "rojo=00f067aa0ba902b7")
                self.assertEqual(server.flags, 0x301)  # sampled, and the parent is remote
                self.assertEqual(client.flags, 0x101)  # sampled, and the parent is local
                self.assertEqual(server.start_time_unix_nano, 1700000000_500_000_000)
                attributes = {a.key: a.value for a in server.attributes}
                self.assertTrue(attributes["user_agent.original"].string_value.startswith('evil "agent"\\\n\u00e9'))
                self.assertEqual(attributes["url.path"].string_value, '/b/"q\u2603')
                self.assertEqual(attributes["server.port"].int_value, 8080)
                self.assertEqual([(e.name, e.attributes[0].value.double_value or e.attributes[0].value.int_value)
                                  for e in server.events], [("simplemesh.delay", 0.25), ("simplemesh.error", 503)])
                self.assertEqual((server.status.code, client.status.code, client.status.message),
                                 (2, 2, 'timeout after 1s "x"'))

    def test_cached_attribute_bytes_keep_their_types(self):
        for value, field in ((True, "bool_value"), (1, "int_value"), (1.0, "double_value"), ("1", "string_value")):
            message = self.parse("http/protobuf", sm.otlp_protobuf({"x": value}, []))
            any_value = message.resource_spans[0].resource.attributes[0].value
            self.assertEqual((any_value.WhichOneof("value"), getattr(any_value, field)), (field, value))

    def test_a_queued_span_holds_only_what_a_span_needs(self):
        # Issue 11: a queued span kept its whole request, body included. Now it is a tuple of strings and numbers.
        trace = sm.TraceContext(VALID_TP[3:35], "00f067aa0ba902b7", {}, native=True, sampled=True, events=[])
        request = sm.Request("PUT", "/b", "", sm.Headers({"host": "a"}), b"x" * 1_000_000, 0.0, 1700000000.5)
        queued = sm.server_span(trace, request, 200, time.time_ns())
        self.assertTrue(all(isinstance(item, (str, int, tuple)) for item in queued), queued)
        self.assertLess(sum(sys.getsizeof(item) for item in queued), 2000)
        peer = sm.Peer(("10.0.0.1", 80), "b", "http://b/")
        queued = sm.client_span(trace, "1234567812345678", "PUT", "b", peer, 200, "", 1, 2)
        self.assertTrue(all(isinstance(item, (str, int)) for item in queued), queued)

    def test_partial_success_answers(self):
        response = self.pb.ExportTraceServiceResponse()
        self.assertEqual(sm.export_partial_success(response.SerializeToString(), "application/x-protobuf"), (0, ""))
        response.partial_success.rejected_spans = 7
        response.partial_success.error_message = "spans too old"
        self.assertEqual(sm.export_partial_success(response.SerializeToString(), "application/x-protobuf"),
                         (7, "spans too old"))
        self.assertEqual(sm.export_partial_success(
            b'{"partialSuccess":{"rejectedSpans":"3","errorMessage":"x"}}', "application/json"), (3, "x"))
        for body, content_type in ((b"\xff\xff", "application/x-protobuf"), (b"[1]", "application/json"),
                                   (b"\x0a\x05\x08", "application/x-protobuf"), (b"<html>", "text/html")):
            self.assertEqual(sm.export_partial_success(body, content_type), (0, ""))


class SpanExportTest(unittest.TestCase):
    """Native spans exported from real nodes to an OTLP receiver."""

    def setUp(self):
        self.receiver = OTLPReceiver(self)

    def run_mesh(self, nodes, path, tracing=None, headers=None):
        with Mesh(nodes, tracing=tracing or self.receiver.tracing()) as mesh:
            status, _headers, answer = mesh.request("a", path, headers=headers)
            for name in nodes:
                mesh.node(name).flush_spans()
            return status, answer, {name: mesh.node(name).metrics.spans for name in nodes}

    def test_fan_out_is_one_well_formed_trace(self):
        status, answer, counts = self.run_mesh({"a": {}, "b": {"delay": "20ms"}, "c": {}, "d": {}},
                                               "/b~(c/d)/d?parallel")
        self.assertEqual(status, 200)
        self.assertEqual(self.receiver.path, "/v1/traces")
        spans = self.receiver.spans()
        # a: SERVER + 2 CLIENT; b: SERVER + CLIENT; c: SERVER + CLIENT; d (from b): SERVER;
        # d (from c, route /d): SERVER + CLIENT; d (from d): SERVER.
        self.assertEqual(len(spans), 11)
        self.assertEqual({span["traceId"] for _service, span in spans}, {answer["trace_id"]})
        by_id = {span["spanId"]: (service, span) for service, span in spans}
        self.assertEqual(len(by_id), 11)
        roots = [span for _service, span in spans if "parentSpanId" not in span]
        self.assertEqual([root["spanId"] for root in roots], [answer["span_id"]])
        for service, span in spans:
            if span is roots[0]:
                continue
            parent_service, parent = by_id[span["parentSpanId"]]
            if span["kind"] == 3:  # CLIENT: a child of its own node's SERVER span
                self.assertEqual((parent["kind"], parent_service), (2, service))
            else:  # SERVER: a child of the CLIENT span that called this node
                self.assertEqual(parent["kind"], 3)
                self.assertEqual(dict((a["key"], a["value"]) for a in parent["attributes"])["server.address"],
                                 {"stringValue": service})
            self.assertLessEqual(int(parent["startTimeUnixNano"]), int(span["startTimeUnixNano"]))
            self.assertGreaterEqual(int(parent["endTimeUnixNano"]) + 2_000_000, int(span["endTimeUnixNano"]))
        self.assertEqual(counts["a"]["exported"], 3)
        self.assertEqual([service for service, _span in spans].count("d"), 4)

    def test_http_attributes_and_fault_events(self):
        status, _answer, _counts = self.run_mesh({"a": {}, "b": {}}, "/b;delay=10ms;cpu=5ms;status=503",
                                                 headers={"User-Agent": "probe/1"})
        self.assertEqual(status, 502)
        spans = {(service, span["kind"]): span for service, span in self.receiver.spans()}
        server_b = spans[("b", 2)]
        attributes = {a["key"]: a["value"] for a in server_b["attributes"]}
        self.assertEqual(attributes["http.request.method"], {"stringValue": "GET"})
        self.assertEqual(attributes["http.response.status_code"], {"intValue": "503"})
        self.assertEqual(attributes["url.query"], {"stringValue": "delay=10ms&cpu=5ms&status=503"})
        self.assertEqual(server_b["status"]["code"], 2)
        self.assertEqual([event["name"] for event in server_b["events"]],
                         ["simplemesh.delay", "simplemesh.cpu", "simplemesh.error"])
        client_a = {a["key"]: a["value"] for a in spans[("a", 3)]["attributes"]}
        self.assertEqual((client_a["server.address"], client_a["error.type"]),
                         ({"stringValue": "b"}, {"stringValue": "503"}))
        server_a = {a["key"]: a["value"] for a in spans[("a", 2)]["attributes"]}
        self.assertEqual(server_a["user_agent.original"], {"stringValue": "probe/1"})

    def test_unsampled_parent_exports_nothing(self):
        status, answer, counts = self.run_mesh({"a": {}, "b": {}}, "/b", headers={"traceparent": VALID_TP[:-2] + "00"})
        self.assertEqual(status, 200)
        self.assertEqual(self.receiver.payloads, [])
        self.assertEqual(answer["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736")

    def test_retries_honour_retry_after_then_export(self):
        receiver = OTLPReceiver(self, [(503, "0"), (429, "0"), (502, None)])
        started = time.monotonic()
        with Mesh({"a": {}}, tracing=receiver.tracing()) as mesh:
            mesh.request("a", "/")
            mesh.node("a").flush_spans()
            metrics = mesh.node("a").metrics
        self.assertEqual((receiver.posts, len(receiver.spans())), (4, 1))
        self.assertEqual((metrics.span_retries, metrics.spans["exported"]), (3, 1))
        self.assertLess(time.monotonic() - started, 3)  # Retry-After: 0 twice, one backoff of at most 0.5 s

    def test_refused_export_is_counted_not_retried(self):
        receiver = OTLPReceiver(self, [(400, None)])
        with Mesh({"a": {}}, tracing=receiver.tracing()) as mesh:
            mesh.request("a", "/")
            mesh.node("a").flush_spans()
            self.assertEqual(mesh.node("a").metrics.spans["failed"], 1)
            self.assertIn('simplemesh_spans_total{result="failed"} 1', mesh.request("a", "/metrics")[2])
        self.assertEqual(receiver.posts, 1)

    def test_bounded_queue_drops_and_counts(self):
        tracing = self.receiver.tracing(max_queue=1, max_batch=2, schedule_delay=60)
        with Mesh({"a": {}}, tracing=tracing) as mesh:
            for _ in range(3):
                mesh.request("a", "/")
            metrics = mesh.node("a").metrics
            self.assertEqual(metrics.spans["dropped"], 2)
            self.assertEqual(self.receiver.payloads, [])
            mesh.node("a").flush_spans()
            self.assertEqual((metrics.spans["exported"], len(self.receiver.spans())), (1, 1))

    def test_gzip_and_headers(self):
        tracing = self.receiver.tracing(compression="gzip", headers=(("authorization", "Bearer t"),))
        self.run_mesh({"a": {}}, "/", tracing=tracing)
        self.assertEqual(len(self.receiver.spans()), 1)
        self.assertEqual(self.receiver.headers["content-encoding"], "gzip")
        self.assertEqual(self.receiver.headers["authorization"], "Bearer t")

    def test_protobuf_is_the_default_and_http_json_is_sent_when_asked(self):
        self.run_mesh({"a": {}, "b": {}}, "/b")
        self.assertEqual(self.receiver.headers["content-type"], "application/x-protobuf")
        self.assertEqual(len(self.receiver.spans()), 3)
        json_receiver = OTLPReceiver(self, content_type="application/json")
        tracing = json_receiver.tracing()
        self.assertEqual(tracing.protocol, "http/json")
        _status, answer, counts = self.run_mesh({"a": {}, "b": {}}, "/b", tracing=tracing)
        self.assertEqual(json_receiver.headers["content-type"], "application/json")
        self.assertEqual({span["traceId"] for _service, span in json_receiver.spans()}, {answer["trace_id"]})
        self.assertEqual((counts["a"]["exported"], counts["b"]["exported"]), (2, 1))

    def test_a_receiver_that_refuses_the_encoding_is_not_retried(self):
        tracing = self.receiver.tracing(protocol="http/json")  # a protobuf-only receiver answers 415
        _status, _answer, counts = self.run_mesh({"a": {}}, "/", tracing=tracing)
        self.assertEqual(self.receiver.refused_types, ["application/json"])
        self.assertEqual((counts["a"]["failed"], self.receiver.posts), (1, 1))

    def test_partial_success_is_counted_and_logged(self):
        for content_type in ("application/x-protobuf", "application/json"):
            receiver = OTLPReceiver(self, content_type=content_type, rejected=1)
            with self.subTest(content_type=content_type), Mesh({"a": {}, "b": {}}, tracing=receiver.tracing()) as mesh:
                lines = self.stdout_of(lambda: (mesh.request("a", "/b"), mesh.node("a").flush_spans(),
                                                mesh.node("b").flush_spans()))
                self.assertEqual((mesh.node("a").metrics.spans["exported"],
                                  mesh.node("a").metrics.spans["rejected"]), (1, 1))
                self.assertEqual((mesh.node("b").metrics.spans["exported"],
                                  mesh.node("b").metrics.spans["rejected"]), (0, 1))
                self.assertIn('simplemesh_spans_total{result="rejected"} 1', mesh.request("a", "/metrics")[2])
                # One post a node: "The client MUST NOT retry the request when it receives a partial success"
                self.assertEqual(receiver.posts, 2)
                self.assertIn("rejected_spans=1", lines)
                self.assertIn("too old", lines)

    def stdout_of(self, action):
        """What the process wrote on descriptor 1 (where log_line writes) while ``action`` ran."""
        with tempfile.TemporaryFile() as log:
            saved = os.dup(1)
            os.dup2(log.fileno(), 1)
            try:
                action()
            finally:
                os.dup2(saved, 1)
                os.close(saved)
            log.seek(0)
            return log.read().decode()

    def test_mesh_command_exports_each_node_under_its_name_and_flushes_on_sigterm(self):
        port = free_port_run(3)
        environ = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=self.receiver.endpoint, OTEL_SERVICE_NAME="shop",
                       OTEL_BSP_SCHEDULE_DELAY="60000", LOG_LEVEL="warning")
        process = subprocess.Popen([sys.executable, "-I", "-S", os.path.join(HERE, "simplemesh.py"), "mesh",
                                    "--port", str(port), "a", "b"], env=environ, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        try:
            wait_for_port(port + 2)
            status, _headers, answer = http_request(("127.0.0.1", port), "/a/b")
            self.assertEqual(status, 200)
            self.assertEqual(self.receiver.payloads, [])  # the batch waits for its 60 s schedule ...
            process.send_signal(signal.SIGTERM)
            self.assertEqual(process.wait(timeout=10), 0, process.stderr.read())
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            process.stderr.close()
        spans = self.receiver.spans()  # ... and SIGTERM flushed it
        self.assertEqual(sorted({service for service, _span in spans}), ["a", "b"])  # the gateway is invisible
        self.assertEqual({span["traceId"] for _service, span in spans}, {answer["trace_id"]})


# --- Configuration --------------------------------------------------------------------------------------------
# Config.from_env: the environment read once (SPEC 2, 4, 6, 8 name the variables).

class ConfigEnvironmentTest(unittest.TestCase):
    """Config.from_env: defaults, the downward API, and bad values named by their variable."""

    def test_defaults_and_environment(self):
        config = sm.Config.from_env({"HOST": "a", "PORT": "8081", "PEERS": "b=127.0.0.1:9092,c=10.0.0.1:80|10.0.0.2:80",
                                     "DELAY": "0.5", "FANOUT": "parallel", "MAX_CALLS": "7"})
        self.assertEqual((config.host, config.port, config.max_calls), ("a", 8081, 7))
        self.assertEqual(config.peers, {"b": [("127.0.0.1", 9092)], "c": [("10.0.0.1", 80), ("10.0.0.2", 80)]})
        self.assertEqual(config.defaults, {"delay": "0.5", "parallel": "true"})
        self.assertEqual(config.upstream_port, 80)
        self.assertEqual(sm.Config.from_env({}).host, socket.gethostname())

    def test_identity_from_downward_api(self):
        config = sm.Config.from_env({"POD_NAME": "a-1", "POD_NAMESPACE": "mesh", "POD_IP": "10.1.2.3"})
        self.assertEqual(config.identity, {"pod": "a-1", "namespace": "mesh", "ip": "10.1.2.3"})

    def test_bad_values_name_the_variable(self):
        for env, word in [({"PORT": "http"}, "PORT"), ({"PEERS": "a=nowhere"}, "PEERS"), ({"DELAY": "soon"}, "DELAY"),
                          ({"ERROR_RATE": "2"}, "ERROR_RATE"), ({"FANOUT": "both"}, "FANOUT"),
                          ({"MAX_CALLS": "0"}, "MAX_CALLS"), ({"DELAY": "2m", "MAX_DELAY": "1m"}, "DELAY"),
                          ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"), ({"ECHO_HEADERS": "maybe"}, "ECHO_HEADERS"),
                          ({"MAX_ROUTE_BYTES": "0"}, "MAX_ROUTE_BYTES"), ({"MAX_INFLIGHT_BYTES": "lots"}, "INFLIGHT"),
                          ({"RESPONSE_SIZE": "2m", "MAX_ROUTE_BYTES": "1m"}, "RESPONSE_SIZE=2m is above MAX_ROUTE"),
                          ({"RESPONSE_SIZE": "2m", "MAX_INFLIGHT_BYTES": "1m"}, "RESPONSE_SIZE=2m is above MAX_INFL"),
                          ({"CPU": "2s", "MAX_ROUTE_CPU": "1s"}, "CPU=2s is above MAX_ROUTE_CPU=1"),
                          ({"CPU": "2s", "MAX_INFLIGHT_CPU": "1s"}, "CPU=2s is above MAX_INFLIGHT_CPU=1")]:
            with self.subTest(env=env), self.assertRaisesRegex(sm.ConfigError, word):
                sm.Config.from_env(env)


# --- Gateway --------------------------------------------------------------------------------------------------
# The mesh command's gateway: an invisible ingress in front of the entry node (SPEC 6).

class GatewayEntryTest(unittest.TestCase):
    """The gateway of ``mesh`` is an ingress: invisible; the entry node's query, answer, status and headers."""

    def test_gateway_entry_names_the_entry_node_and_its_query(self):
        entry, rest, query = sm.gateway_entry("/a/b~c", "parallel")
        self.assertEqual((entry.name, rest, query), ("a", "b~c", "parallel"))
        entry, rest, query = sm.gateway_entry("/a;delay=1s/b", "size=1k")
        self.assertEqual((entry.name, rest, query), ("a", "b", "delay=1s&size=1k"))
        entry, rest, query = sm.gateway_entry("/a/metrics", "")  # a's own /metrics, as http://a/metrics is
        self.assertEqual((entry.name, rest, query), ("a", "metrics", ""))
        self.assertEqual(sm.gateway_entry("/a/b c\r\n", "")[1], "b%20c%0D%0A")  # sent on as it came, encoded again
        for path in ("/", "/a~b", "/(a/b)", "/a(", "/A_b/c"):
            self.assertIsNone(sm.gateway_entry(path, ""), path)

    def test_the_answer_is_the_entry_nodes_with_its_query(self):
        with Mesh({"a": {}, "b": {"delay": "0.3"}, "c": {"delay": "0.3"}}) as mesh:
            gateway = start_gateway(self, mesh)
            status, headers, answer = http_request(gateway, "/a/b~c?parallel")
            self.assertEqual(status, 200)
            self.assertEqual(hosts(answer), ["a", [["b", []], ["c", []]]])
            self.assertLess(answer["elapsed_time"], 0.55)  # a ran its fan-out in parallel
            self.assertEqual(headers["x-trace-id"], answer["trace_id"])
            _s, headers, text = http_request(gateway, "/a/b?view=tree")
            self.assertTrue(headers["content-type"].startswith("text/plain"))
            self.assertRegex(text, r"(?m)^a +200")
            _s, _h, answer = http_request(gateway, "/a;delay=0.1")
            self.assertEqual((answer["host"], answer["delay"]), ("a", 0.1))
            status, headers, answer = http_request(gateway, "/a?status=503&response-header=retry-after:2")
            self.assertEqual((status, answer["host"], headers["retry-after"]), (503, "a", "2"))
            seen = mesh.record_requests("a")
            http_request(gateway, "/a", method="POST", body=b"order=1")
            self.assertEqual(seen, [("POST", b"order=1")])
            self.assertEqual(http_request(gateway, "/a/-/healthy?healthy=false", method="POST")[2]["host"], "a")
            self.assertEqual(http_request(gateway, "/a/healthz")[0], 503)  # a's probe, as http://a/healthz is
            self.assertEqual(http_request(gateway, "/healthz")[0], 200)  # the gateway's own
            connection = http.client.HTTPConnection(*gateway, timeout=5)
            self.addCleanup(connection.close)
            connection.request("HEAD", "/a?size=2k")  # a's head, with the length a's GET would have
            answer = connection.getresponse()
            self.assertEqual((answer.status, answer.getheader("content-length"), answer.read()), (200, "2048", b""))

    def test_without_one_entry_node_the_gateway_answers_itself(self):
        with Mesh({"a": {}, "b": {}}) as mesh:
            gateway = start_gateway(self, mesh)
            self.assertEqual(hosts(http_request(gateway, "/a~b")[2]), ["gateway", [["a", []], ["b", []]]])
            self.assertEqual(http_request(gateway, "/")[2]["host"], "gateway")
            self.assertEqual(http_request(gateway, "/healthz")[0], 200)

    def test_an_entry_node_that_is_down_is_a_502_record(self):
        with Mesh({"a": {}}) as mesh:
            mesh.peers["z"] = [("127.0.0.1", free_port())]  # nothing listens there
            gateway = start_gateway(self, mesh)
            status, _h, answer = http_request(gateway, "/z/a")
        self.assertEqual((status, answer["host"], answer["status"]), (502, "z", 502))
        self.assertIn("refused", answer["error"])


# --- Server ---------------------------------------------------------------------------------------------------
# The HTTP/1.1 server as a client meets it (SPEC 8; its limits and bad days are under Robustness).

class ServerOverHttpTest(unittest.TestCase):
    """The server's side of HTTP/1.1: 100-continue, malformed requests counted and logged."""

    def test_large_body_with_expect_continue(self):
        body = b"x" * 5000
        with Mesh({"a": {}, "b": {}}) as mesh:
            with socket.create_connection(("127.0.0.1", mesh.port("a")), timeout=5) as sock:
                sock.sendall(b"POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n"
                             b"Expect: 100-continue\r\n\r\n")
                self.assertEqual(sock.recv(100), b"HTTP/1.1 100 Continue\r\n\r\n")
                sock.sendall(body)
                self.assertIn(b"200 OK", sock.recv(100))

    def test_malformed_requests_are_counted_and_logged(self):
        with Mesh({"a": {}}) as mesh:
            with socket.create_connection(("127.0.0.1", mesh.port("a")), timeout=5) as sock:
                sock.sendall(b"BREW /pot HTTP/1.1\r\nHost: a\r\n\r\n")
                self.assertIn(b" 501 ", sock.recv(200))
            _s, _h, text = mesh.request("a", "/metrics")
        self.assertIn('simplemesh_http_requests_total{method="-",code="501"} 1', text)


# --- Manifests and packaging ----------------------------------------------------------------------------------
# Generated Kubernetes manifests, validated and run locally; the image and the wheel (SPEC 7).

class ManifestYamlTest(unittest.TestCase):
    """The hand-written YAML emitter: strings that a YAML reader would retype are quoted."""

    def test_scalars(self):
        self.assertEqual(sm.yaml_scalar("simplemesh:0.1.0"), "simplemesh:0.1.0")
        self.assertEqual(sm.yaml_scalar("/readyz"), "/readyz")
        self.assertEqual(sm.yaml_scalar(True), "true")
        self.assertEqual(sm.yaml_scalar(9090), "9090")
        for text in ("true", "No", "on", "y", "null", "9090", "0.5", "1:30", "", " a", "a: b", "#x", "a:",
                     "metadata.labels['app']", "*", "-", "@x", "é"):
            with self.subTest(text=text):
                self.assertTrue(sm.yaml_scalar(text).startswith('"'), sm.yaml_scalar(text))

    def test_round_trip_through_a_yaml_parser(self):
        yaml = require_module(self, "yaml")
        tricky = {"strings": ["yes", "0.5", "1:30", "", "a: b", "#c", "line\nbreak", 'q"uote', "é", "~", "-1",
                              "simplemesh:0.1.0", "$(POD_NAME),k=v"],
                  "empty": {}, "none": [], "nested": [[1, 2], {"k": [{"a": {"b": False}}]}], "n": 3, "f": 0.25}
        documents = [tricky] + sm.build_manifests([sm.parse_node_spec(s) for s in DEMO_NODES], istio=True,
                                                  otlp="http://collector:4318", load="http://a/b")
        self.assertEqual(list(yaml.safe_load_all(sm.to_yaml(documents))), documents)


class ManifestGeneratorTest(unittest.TestCase):
    """build_manifests() on its own: what every pod gets, and clear errors for bad input."""

    def build(self, *specs, **options):
        return sm.build_manifests([sm.parse_node_spec(s) for s in specs], **options)

    def test_service_and_a_deployment_per_version(self):
        objects = by_kind_and_name(self.build("a", "b;delay=1", "b;delay=1;version=v2"))
        self.assertEqual(sorted(objects), [("Deployment", "a-v1"), ("Deployment", "b-v1"), ("Deployment", "b-v2"),
                                           ("Service", "a"), ("Service", "b"),
                                           ("ServiceAccount", "a"), ("ServiceAccount", "b")])
        service = objects["Service", "b"]
        self.assertEqual(service["spec"]["ports"], [{"name": "http", "port": 80, "targetPort": "http",
                                                     "appProtocol": "http"}])
        for version in ("v1", "v2"):
            deployment = objects["Deployment", f"b-{version}"]
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            self.assertEqual(labels["app"], "b")
            self.assertEqual(labels["version"], version)
            self.assertEqual(labels["app.kubernetes.io/name"], "b")
            self.assertLessEqual(service["spec"]["selector"].items(), labels.items())
            self.assertLessEqual(deployment["spec"]["selector"]["matchLabels"].items(), labels.items())
            self.assertEqual(deployment["spec"]["template"]["spec"]["containers"][0]["ports"],
                             [{"name": "http", "containerPort": 9090, "protocol": "TCP"}])

    def test_pods_are_restricted_probed_limited_and_scraped(self):
        for deployment in [o for o in self.build("a", "b;version=v2", load="http://a/b") if o["kind"] == "Deployment"]:
            name = deployment["metadata"]["name"]
            pod = deployment["spec"]["template"]["spec"]
            container, = pod["containers"]
            with self.subTest(deployment=name):
                self.assertEqual(pod["securityContext"]["seccompProfile"], {"type": "RuntimeDefault"})
                self.assertIs(pod["securityContext"]["runAsNonRoot"], True)
                self.assertEqual(pod["securityContext"]["runAsUser"], 65532)
                self.assertIs(pod["automountServiceAccountToken"], False)
                security = container["securityContext"]
                self.assertIs(security["allowPrivilegeEscalation"], False)
                self.assertIs(security["readOnlyRootFilesystem"], True)
                self.assertIs(security["runAsNonRoot"], True)
                self.assertEqual(security["capabilities"], {"drop": ["ALL"]})
                for kind in ("requests", "limits"):
                    self.assertEqual(set(container["resources"][kind]), {"cpu", "memory"})
                if name == "loadgen-v1":
                    self.assertEqual(container["args"], ["load", "http://a/b", "--rate", "5", "--duration", "0"])
                    continue
                self.assertEqual(container["readinessProbe"]["httpGet"], {"path": "/readyz", "port": "http"})
                self.assertEqual(container["livenessProbe"]["httpGet"], {"path": "/healthz", "port": "http"})
                annotations = deployment["spec"]["template"]["metadata"]["annotations"]
                self.assertEqual(annotations["prometheus.io/scrape"], "true")
                self.assertEqual(annotations["prometheus.io/port"], "9090")
                self.assertEqual(annotations["prometheus.io/path"], "/metrics")

    def test_termination_outlasts_the_servers_shutdown(self):
        deployment, = [o for o in self.build("a") if o["kind"] == "Deployment"]
        config = sm.Config.from_env(container_env(deployment))
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        self.assertGreater(config.shutdown_delay, 0)
        self.assertGreater(grace, config.shutdown_delay + config.shutdown_grace)

    def test_environment_configures_the_node(self):
        objects = by_kind_and_name(self.build("c;delay=100ms..200ms;error=0.2;status=503;parallel;headers;"
                                              "timeout=2s;size=1k;cpu=10ms;reset=0.01;version=v3",
                                              otlp="http://collector:4318"))
        deployment = objects["Deployment", "c-v3"]
        raw = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        self.assertIn({"name": "HOST", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}}, raw)
        env = container_env(deployment)
        self.assertEqual(env["DELAY"], "100ms..200ms")
        self.assertEqual(env["FANOUT"], "parallel")
        self.assertEqual(env["OTEL_EXPORTER_OTLP_ENDPOINT"], "http://collector:4318")
        names = [item["name"] for item in raw]  # $(VAR) only expands variables defined before it
        self.assertGreater(names.index("OTEL_RESOURCE_ATTRIBUTES"), names.index("NODE_NAME"))
        config = sm.Config.from_env(env)
        self.assertEqual((config.host, config.version, config.port), ("c", "v3", 9090))
        self.assertEqual(config.identity, {"pod": "pod-0", "namespace": "default", "ip": "10.0.0.7",
                                           "node": "node-1"})
        self.assertEqual(config.defaults, {"delay": "100ms..200ms", "error": "0.2", "status": "503",
                                           "reset": "0.01", "size": "1k", "cpu": "10ms", "timeout": "2s",
                                           "parallel": "true", "headers": "true"})

    def test_istio_resources(self):
        objects = by_kind_and_name(self.build("a", "b", "b;version=v2", "b;version=v3", istio=True))
        namespace = objects["Namespace", "simplemesh"]
        self.assertEqual(namespace["metadata"]["labels"]["istio-injection"], "enabled")
        self.assertTrue(all(o["metadata"].get("namespace") == "simplemesh"
                            for key, o in objects.items() if key[0] != "Namespace"))
        ingress = objects["VirtualService", "simplemesh-ingress"]
        self.assertEqual(ingress["spec"]["gateways"], ["simplemesh"])
        self.assertEqual(ingress["spec"]["http"][0]["route"][0]["destination"]["host"], "a")
        self.assertEqual([s["name"] for s in objects["DestinationRule", "b"]["spec"]["subsets"]], ["v1", "v2", "v3"])
        route = objects["VirtualService", "b"]["spec"]["http"][0]["route"]
        self.assertEqual(sum(r["weight"] for r in route), 100)
        self.assertNotIn(("VirtualService", "a"), objects)  # one version: nothing to split

    def test_each_service_has_its_own_identity(self):
        """One ServiceAccount per name, so the mesh's mTLS principal (cluster.local/ns/NS/sa/NAME) is per service."""
        objects = self.build("a", "b", "b;version=v2", load="http://a/b", namespace="lab")
        accounts = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ServiceAccount"}
        self.assertEqual(sorted(accounts), ["a", "b", "loadgen"])
        for deployment in [o for o in objects if o["kind"] == "Deployment"]:
            with self.subTest(deployment=deployment["metadata"]["name"]):
                pod = deployment["spec"]["template"]["spec"]
                account = accounts[pod["serviceAccountName"]]
                self.assertEqual(pod["serviceAccountName"], deployment["spec"]["template"]["metadata"]["labels"]["app"])
                self.assertEqual(account["metadata"]["namespace"], "lab")
                self.assertIs(account["automountServiceAccountToken"], False)
        # the shipped policy examples name the identity the generator gives `a`
        for path in ("istio/examples/authorization.yaml", "ambient/examples/authorization.yaml"):
            with open(os.path.join(HERE, "manifests", path), encoding="utf-8") as file:
                self.assertRegex(file.read(), r"principals:\s+- cluster\.local/ns/simplemesh/sa/a\n")

    def test_sidecar_keeps_serving_while_the_node_drains(self):
        """With sidecars, the proxy outlives the node's shutdown (not ready, then grace) and the kubelet's SIGKILL
        comes later still; without sidecars (plain, ambient) there is no proxy setting."""
        for options, sidecar in (({"istio": True}, True), ({"gateway_api": True}, True), ({"ambient": True}, False),
                                 ({}, False)):
            for deployment in [o for o in self.build("a", load="http://a/", **options) if o["kind"] == "Deployment"]:
                with self.subTest(options=options, deployment=deployment["metadata"]["name"]):
                    annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
                    if not sidecar:
                        self.assertNotIn("proxy.istio.io/config", annotations)
                        continue
                    proxy = json.loads(annotations["proxy.istio.io/config"])
                    self.assertIs(proxy["holdApplicationUntilProxyStarts"], True)
                    drain = sm.parse_duration(proxy["terminationDrainDuration"])
                    node = sm.Config.from_env(container_env(node_deployments(self.build("a"))[0]))
                    self.assertGreaterEqual(drain, node.shutdown_delay + node.shutdown_grace)
                    self.assertLess(drain, deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])

    def test_gateway_api_resources(self):
        objects = by_kind_and_name(self.build("a", "b", "b;version=v2", "b;version=v3", gateway_api=True))
        self.assertEqual(objects["Namespace", "simplemesh"]["metadata"]["labels"]["istio-injection"], "enabled")
        gateway = objects["Gateway", "simplemesh"]
        self.assertEqual(gateway["spec"]["gatewayClassName"], "istio")
        ingress = objects["HTTPRoute", "simplemesh-ingress"]["spec"]
        self.assertEqual(ingress["parentRefs"], [{"name": "simplemesh"}])
        self.assertEqual(ingress["rules"][0]["backendRefs"], [{"name": "a", "port": 80}])
        split = objects["HTTPRoute", "b"]["spec"]  # attached to Service b, split between per-version Services
        self.assertEqual(split["parentRefs"], [{"group": "", "kind": "Service", "name": "b", "port": 80}])
        backends = split["rules"][0]["backendRefs"]
        self.assertEqual(sum(backend["weight"] for backend in backends), 100)
        for backend, version in zip(backends, ("v1", "v2", "v3")):
            service = objects["Service", backend["name"]]
            pods = objects["Deployment", f"b-{version}"]["spec"]["template"]["metadata"]["labels"]
            self.assertEqual(service["spec"]["selector"], {"app": "b", "version": version})
            self.assertLessEqual(service["spec"]["selector"].items(), pods.items())
        self.assertNotIn(("HTTPRoute", "a"), objects)  # one version: nothing to split
        self.assertNotIn(("Service", "a-v1"), objects)
        self.assertFalse([key for key in objects if key[0] in ("VirtualService", "DestinationRule")])

    def test_ambient_resources(self):
        objects = by_kind_and_name(self.build("a", "b", "b;version=v2", ambient=True, namespace="lab"))
        labels = objects["Namespace", "lab"]["metadata"]["labels"]
        self.assertEqual(labels["istio.io/dataplane-mode"], "ambient")
        self.assertNotIn("istio-injection", labels)
        waypoint = objects["Gateway", labels["istio.io/use-waypoint"]]
        self.assertEqual(waypoint["spec"]["gatewayClassName"], "istio-waypoint")
        self.assertEqual(waypoint["metadata"]["labels"]["istio.io/waypoint-for"], "service")
        self.assertEqual(waypoint["spec"]["listeners"], [{"name": "mesh", "port": 15008, "protocol": "HBONE"}])
        self.assertIn(("HTTPRoute", "b"), objects)  # the waypoint applies the split
        self.assertIn(("Service", "b-v2"), objects)

    def test_bad_input_is_refused(self):
        cases = {("1a",): "DNS label", ("a.b",): "DNS label", ("a", "a"): "twice", ("a;delay=10m",): "MAX_DELAY",
                 ("a;bogus=1",): "unknown directive", ("a;version=V_2",): "bad version", (): "at least one"}
        for specs, message in cases.items():
            with self.subTest(specs=specs), self.assertRaisesRegex(ValueError, message):
                self.build(*specs)
        for options, message in (({"namespace": "Bad_NS"}, "namespace"), ({"otlp": "collector:4318"}, "OTLP"),
                                 ({"load": "a/b"}, "load URL"), ({"load": "http://a", "rate": "0"}, "rate"),
                                 ({"image": "a b"}, "image")):
            with self.subTest(options=options), self.assertRaisesRegex(ValueError, message):
                self.build("a", **options)
        with self.assertRaisesRegex(ValueError, "load generator"):
            self.build("loadgen", load="http://a/")
        with self.assertRaisesRegex(ValueError, "pick one"):
            self.build("a", istio=True, ambient=True)
        with self.assertRaisesRegex(ValueError, "per-version Service"):
            self.build("b", "b;version=v2", "b-v2", gateway_api=True)
        self.build("b", "b;version=v2", "b-v2")  # no per-version Services without the Gateway API
        with self.assertRaisesRegex(ValueError, "63 characters"):
            self.build("b" * 40, "b" * 40 + ";version=" + "v" * 30, ambient=True)

    def test_command_line_errors_are_one_clear_line(self):
        result = run_cli("manifests", "a;delay=forever")
        self.assertEqual(result.returncode, 2)
        self.assertIn("bad duration", result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertEqual(result.stdout, "")
        self.assertEqual(run_cli("manifests").returncode, 2)  # argparse: at least one NODE
        self.assertIn("--istio", run_cli("manifests", "--help").stdout)
        result = run_cli("manifests", "a", "--istio", "--gateway-api")
        self.assertEqual((result.returncode, result.stdout), (2, ""))
        self.assertIn("pick one", result.stderr)


class ManifestRunLocallyTest(unittest.TestCase):
    """The generated environment, given to real nodes on loopback, makes the mesh the specs describe."""

    def test_generated_pods_answer_as_specified(self):
        objects = sm.build_manifests([sm.parse_node_spec(s) for s in ("a", "b;delay=50ms;version=v2")])
        servers, peers = [], {}
        try:
            for deployment in node_deployments(objects):
                env = container_env(deployment, pod=deployment["metadata"]["name"] + "-xyz")
                env.update(PORT="0", ADDRESS="127.0.0.1", LOG_LEVEL="warning")
                config = sm.Config.from_env(env).replace(peers=peers)
                server = sm.start_node(config)
                servers.append(server)
                peers[config.host] = [("127.0.0.1", server.server_address[1])]
            status, _headers, answer = http_request(peers["a"][0], "/b")
        finally:
            for server in servers:
                server.shutdown()
                server.server_close()
                server.node.pool.close()
        self.assertEqual(status, 200)
        self.assertEqual((answer["host"], answer["version"], answer["pod"]), ("a", "v1", "a-v1-xyz"))
        child, = answer["next_node"]
        self.assertEqual((child["host"], child["version"], child["pod"]), ("b", "v2", "b-v2-xyz"))
        self.assertGreaterEqual(child["elapsed_time"], 0.05)


class ManifestValidationTest(unittest.TestCase):
    """Generated and static manifests against the Kubernetes schemas and Istio's and the Gateway API's CRD schemas
    (with their CEL rules), and through ``kubectl kustomize``."""

    def setUp(self):
        self.yaml = require_module(self, "yaml")
        self.validator = require_module(self, "kubernetes_validate")
        self.crds = CrdSchemas(self)

    def check_objects(self, objects, source):
        """Kubernetes kinds against the strict schemas of each version; custom resources against their CRD."""
        self.assertTrue(objects, f"{source}: no objects")
        for obj in objects:
            kind, name = obj.get("kind"), obj.get("metadata", {}).get("name")
            with self.subTest(source=source, kind=kind, name=name):
                if self.crds.knows(obj):
                    self.assertEqual(self.crds.errors(obj), [], f"{source}: {kind}/{name}")
                    continue
                self.assertNotIn(".istio.io", obj["apiVersion"], "an Istio kind with no served schema")
                self.assertNotIn("gateway.networking.k8s.io", obj["apiVersion"], "a Gateway API kind not served")
                for version in K8S_SCHEMA_VERSIONS:
                    try:
                        self.validator.validate(obj, version, strict=True)
                    except self.validator.ValidationError as error:
                        self.fail(f"{source}: {kind}/{name} (Kubernetes {version}): {error.message} "
                                  f"at {list(error.path)}")
                if kind == "Deployment":
                    self.assertEqual(pod_security_problems(obj), [], f"{source}: {name}")

    def kustomize(self, directory):
        kubectl = require_tool(self, "kubectl")
        result = subprocess.run([kubectl, "kustomize", directory], capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        return list(self.yaml.safe_load_all(result.stdout))

    def kustomize_shipped(self, directory):
        return self.kustomize(os.path.join(HERE, "manifests", directory))

    def test_crd_schemas_refuse_what_the_api_server_would(self):
        ingress, route = [o for o in sm.build_manifests([("a", "", {}), ("b", "", {}), ("b", "v2", {})],
                                                        gateway_api=True) if o["kind"] in ("Gateway", "HTTPRoute")][:2]
        split = next(o for o in sm.build_manifests([("b", "", {}), ("b", "v2", {})], gateway_api=True)
                     if o["kind"] == "HTTPRoute" and o["metadata"]["name"] == "b")
        policy = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": "b"},
                  "spec": {"selector": {"matchLabels": {"app": "b"}},
                           "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/x/sa/a"]}}]}]}}
        self.assertEqual(self.crds.errors(policy), [])
        checked = self.crds.rules_checked
        for object_, change, message in (
                (policy, lambda o: o["spec"].update(targetRefs=[{"kind": "Service", "group": "", "name": "b"}]),
                 "only one of targetRefs or selector"),                                        # CEL
                (policy, lambda o: o["spec"].update(action="PERMIT"), "is not one of"),       # enum
                (policy, lambda o: o["spec"].update(rule=[]), "Additional properties"),       # a typo
                (ingress, lambda o: o["spec"]["listeners"].append(dict(o["spec"]["listeners"][0], port=8080)),
                 "Listener name must be unique"),                                              # CEL
                (ingress, lambda o: o["spec"].pop("gatewayClassName"), "required"),
                (split, lambda o: o["spec"]["rules"][0]["backendRefs"][0].pop("port"), "Must have port for Service"),
                (split, lambda o: o["spec"]["rules"][0]["backendRefs"][0].update(weight=1_000_001), "maximum"),
                (route, lambda o: o["spec"]["rules"][0]["backendRefs"][0].update(port="http"), "integer")):
            broken = json.loads(json.dumps(object_))
            change(broken)
            with self.subTest(kind=object_["kind"], message=message):
                self.assertEqual(self.crds.errors(object_), [])
                self.assertIn(message, " ".join(self.crds.errors(broken)))
        self.assertGreater(self.crds.rules_checked, checked)
        # int-or-string and nullable, as the translation reads them
        schema = openapi_to_json_schema({"type": "object", "properties": {
            "port": {"x-kubernetes-int-or-string": True}, "note": {"type": "string", "nullable": True}}})
        validator = self.crds.jsonschema.Draft4Validator(schema)
        self.assertTrue(all(validator.is_valid(v) for v in ({"port": 80}, {"port": "http"}, {"note": None})))
        self.assertFalse(any(validator.is_valid(v) for v in ({"port": 1.5}, {"note": 3}, {"other": 1})))

    def test_generated_manifests_validate(self):
        for args in ((*DEMO_NODES, *DEMO_OPTIONS), ("a", "b;version=v2", "--istio", "--otlp", "http://c:4318"),
                     ("a", "b", "b;version=v2", "b;version=v3", "--gateway-api", "--load", "http://a/b"),
                     ("a", "b;version=v2", "b", "--ambient", "--namespace", "lab"),
                     ("x;parallel;headers", "--namespace", "lab", "--image", "registry.example/simplemesh:1")):
            self.check_objects(list(self.yaml.safe_load_all(generate(*args))), " ".join(args))
        self.assertGreater(self.crds.rules_checked, 50)  # Gateway API resources rely on their CEL rules

    def test_pod_security_check_sees_each_gap(self):
        deployment = node_deployments(sm.build_manifests([("a", "", {})]))[0]
        self.assertEqual(pod_security_problems(deployment), [])
        for change, problem in (
                (lambda pod, box: box.update(allowPrivilegeEscalation=True), "allowPrivilegeEscalation"),
                (lambda pod, box: box.pop("readOnlyRootFilesystem"), "readOnlyRootFilesystem"),
                (lambda pod, box: box.update(capabilities={"drop": ["NET_RAW"]}), "capabilities"),
                (lambda pod, box: box.update(privileged=True), "privileged"),
                (lambda pod, box: pod["securityContext"].pop("seccompProfile"), "seccompProfile"),
                (lambda pod, box: pod.pop("automountServiceAccountToken"), "token"),
                (lambda pod, box: pod["containers"][0].pop("readinessProbe"), "probes"),
                (lambda pod, box: pod["containers"][0]["resources"].pop("limits"), "limits")):
            broken = json.loads(json.dumps(deployment))
            pod = broken["spec"]["template"]["spec"]
            change(pod, pod["containers"][0]["securityContext"])
            with self.subTest(problem=problem):
                self.assertIn(problem, " ".join(pod_security_problems(broken)))

    def test_every_kubernetes_version_from_1_25_to_1_37(self):
        """The other tests check the oldest and newest; here each kind the repo uses, in every version between."""
        versions = sorted(set(self.validator.utils.all_versions()), key=lambda v: tuple(map(int, v.split("."))))
        self.assertLessEqual({"1.25.0", "1.37.0"}, set(versions))
        objects = self.yaml.safe_load_all(generate(*DEMO_NODES, *DEMO_OPTIONS, "--ambient", "--otlp", "http://c"))
        with open(os.path.join(HERE, "manifests", "otel", "collector.yaml"), encoding="utf-8") as file:
            objects = [*objects, *self.yaml.safe_load_all(file)]
        samples = {}
        for obj in objects:
            if not self.crds.knows(obj):
                samples.setdefault(obj["kind"], obj)
        self.assertEqual(sorted(samples), ["ConfigMap", "Deployment", "Namespace", "Service", "ServiceAccount"])
        for version in versions[versions.index("1.25.0"):versions.index("1.37.0") + 1]:
            for kind, obj in samples.items():
                with self.subTest(version=version, kind=kind):
                    self.validator.validate(obj, version, strict=True)

    def test_static_manifests_validate(self):
        paths = []
        for root, _dirs, files in os.walk(os.path.join(HERE, "manifests")):
            paths += [os.path.join(root, f) for f in files if f.endswith(".yaml") and f != "kustomization.yaml"]
        self.assertGreaterEqual(len(paths), 12)
        for path in paths:
            with open(path, encoding="utf-8") as file:
                self.check_objects([o for o in self.yaml.safe_load_all(file) if o], os.path.relpath(path, HERE))

    def test_kustomize_base_is_the_generators_output(self):
        with open(os.path.join(HERE, "manifests", "base", "mesh.yaml"), encoding="utf-8") as file:
            self.assertEqual(file.read(), generate(*DEMO_NODES, *DEMO_OPTIONS),
                             "manifests/base/mesh.yaml is stale: regenerate it with the command in "
                             "manifests/base/kustomization.yaml")
        built = self.kustomize_shipped("base")
        self.check_objects(built, "kustomize base")
        self.assertEqual(by_kind_and_name(built), by_kind_and_name(self.yaml.safe_load_all(
            generate(*DEMO_NODES, *DEMO_OPTIONS))))

    def test_mesh_overlays_are_the_generators_output(self):
        for directory, flag in MESH_OVERLAYS:
            with self.subTest(overlay=directory):
                built = self.kustomize_shipped(directory)
                self.check_objects(built, f"kustomize {directory}")
                expected = self.yaml.safe_load_all(generate(*DEMO_NODES, *DEMO_OPTIONS, flag, "--namespace",
                                                            "simplemesh"))
                self.assertEqual(by_kind_and_name(built), by_kind_and_name(expected))

    def test_otel_component_combines_with_every_overlay(self):
        """manifests/otel is a kustomize Component: with the base and each mesh overlay it builds, its Collector
        is restricted and probed, and the nodes get what ``--otlp`` generates."""
        with open(os.path.join(HERE, "manifests", "otel", "kustomization.yaml"), encoding="utf-8") as file:
            component = self.yaml.safe_load(file)
        self.assertEqual((component["apiVersion"], component["kind"]),
                         ("kustomize.config.k8s.io/v1alpha1", "Component"))
        for directory, flags in (("base", ()), *((d, (f, "--namespace", "simplemesh")) for d, f in MESH_OVERLAYS)):
            with self.subTest(overlay=directory), tempfile.TemporaryDirectory() as tmp:
                relative = os.path.relpath(os.path.join(HERE, "manifests"), tmp)  # kustomize refuses absolute paths
                with open(os.path.join(tmp, "kustomization.yaml"), "w", encoding="utf-8") as file:
                    file.write(f"apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
                               f"{'namespace: simplemesh' if flags else ''}\n"
                               f"resources: [{relative}/{directory}]\ncomponents: [{relative}/otel]\n")
                built = by_kind_and_name(self.kustomize(tmp))
                self.check_objects(list(built.values()), f"{directory} + otel")
                expected = by_kind_and_name(self.yaml.safe_load_all(
                    generate(*DEMO_NODES, *DEMO_OPTIONS, *flags, "--otlp", "http://otel-collector:4318")))
                self.assertEqual({key: built[key] for key in expected}, expected)
                collector = built["Deployment", "otel-collector"]
                self.assertEqual(collector["metadata"].get("namespace"), "simplemesh" if flags else None)
                labels = collector["spec"]["template"]["metadata"]["labels"]  # out of the mesh in every mode
                self.assertEqual((labels["sidecar.istio.io/inject"], labels["istio.io/dataplane-mode"]),
                                 ("false", "none"))
                self.check_collector(collector, built["ConfigMap", "otel-collector"])

    def check_collector(self, deployment, config_map):
        config = self.yaml.safe_load(config_map["data"]["config.yaml"])
        self.assertEqual(config["exporters"]["debug"]["verbosity"], "detailed")
        self.assertIn("health_check", config["service"]["extensions"])
        health_port = int(config["extensions"]["health_check"]["endpoint"].rsplit(":", 1)[1])
        self.assertTrue(config["extensions"]["health_check"]["endpoint"].startswith("0.0.0.0:"))  # kubelet's reach
        container, = deployment["spec"]["template"]["spec"]["containers"]
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        for probe in ("readinessProbe", "livenessProbe"):
            self.assertEqual(ports[container[probe]["httpGet"]["port"]], health_port)
        self.assertEqual(pod_security_problems(deployment), [])


class PackagingDockerfileTest(unittest.TestCase):
    """No container engine runs here, so the Dockerfile is checked by reading it (and the image is not built); its
    bytecode step and entrypoint are run with a local Python of the final image's version."""

    def instructions(self):
        with open(os.path.join(HERE, "Dockerfile"), encoding="utf-8") as file:
            lines = [line.strip() for line in file if line.strip() and not line.lstrip().startswith("#")]
        return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]

    def base_images(self):
        """[(image, tag)] of each FROM, in order."""
        froms = [arg.split() for keyword, arg in self.instructions() if keyword == "FROM"]
        return [tuple(words[words.index("AS") - 1 if "AS" in words else -1].split("@")[0].split(":"))
                for words in froms]

    def image_python(self):
        """The Python version of the final image: distroless names its Debian, and each Debian has one Python."""
        image, _tag = self.base_images()[-1]
        return DISTROLESS_PYTHON[image.rsplit("/", 1)[1]]

    def python_of_the_image(self):
        """A local interpreter of the final image's Python version: the bytecode is only used by that version."""
        version = self.image_python()
        if sys.version_info[:2] == tuple(map(int, version.split("."))):
            return sys.executable
        candidates = sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python3")))
        candidates += [path for path in [shutil.which(f"python{version}")] if path]  # (a pyenv shim may not run)
        found = next((path for path in candidates if subprocess.run(
            [path, "-c", f"import sys; sys.exit(sys.version_info[:2] != {tuple(map(int, version.split('.')))})"],
            capture_output=True, timeout=30).returncode == 0), None)
        if found is None:
            message = f"no Python {version} here to run the image's bytecode step with"
            self.fail(message) if IN_CI else self.skipTest(message)
        return found

    def test_supported_distroless_base_both_stages_tagged(self):
        (build, build_tag), (final, final_tag) = self.base_images()
        self.assertEqual(final, "gcr.io/distroless/python3-debian13")  # debian12 is deprecated upstream
        self.assertEqual(final_tag, "nonroot")
        self.assertEqual(build, "python")
        # python:3.13-slim-trixie: the build stage's Python is the final image's, on the same Debian
        self.assertRegex(build_tag, rf"^{re.escape(self.image_python())}(\.\d+)?-slim-trixie$")

    def test_distroless_nonroot_one_file(self):
        instructions = self.instructions()
        final = instructions[[keyword for keyword, _ in instructions].index("FROM", 1):]
        runs = [arg for keyword, arg in instructions if keyword == "RUN"]
        self.assertEqual([json.loads(run)[1:4] for run in runs], [["-m", "compileall", "-q"]])  # nothing installed
        self.assertNotIn("RUN", [keyword for keyword, _ in final])
        self.assertEqual(dict(final)["USER"].split(":")[0], "65532")
        self.assertEqual([arg for keyword, arg in final if keyword in ("COPY", "ADD")],
                         ["simplemesh.py /app/simplemesh.py", "--from=bytecode /app/__pycache__ /app/__pycache__"])
        self.assertEqual(dict(final)["EXPOSE"], "9090")
        entrypoint = json.loads(dict(final)["ENTRYPOINT"])
        self.assertEqual(entrypoint, ["/usr/bin/python3", "-E", "-s", "-S", "-m", "simplemesh"])
        self.assertEqual(dict(final)["WORKDIR"], "/app")  # where -m finds the module
        self.assertEqual(json.loads(dict(final)["CMD"]), ["serve"])
        # The generated Deployments run this image as it is: same user, and the load generator's args fit CMD.
        deployment = next(o for o in sm.build_manifests([("a", "", {})]) if o["kind"] == "Deployment")
        self.assertEqual(deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"], 65532)

    def test_entrypoint_runs_the_precompiled_module_as_the_image_would(self):
        python = self.python_of_the_image()
        with tempfile.TemporaryDirectory() as app:
            shutil.copyfile(os.path.join(HERE, "simplemesh.py"), os.path.join(app, "simplemesh.py"))
            run = next(json.loads(arg) for keyword, arg in self.instructions() if keyword == "RUN")
            subprocess.run([python] + run[1:-1] + [app], check=True, timeout=60)
            self.assertEqual(os.listdir(os.path.join(app, "__pycache__")),
                             [f"simplemesh.cpython-{self.image_python().replace('.', '')}.pyc"])
            # unchecked-hash bytecode is used as it is: even a broken source beside it is never compiled
            with open(os.path.join(app, "simplemesh.py"), "w", encoding="utf-8") as source:
                source.write("this is not python\n")
            entrypoint = next(json.loads(arg) for keyword, arg in self.instructions() if keyword == "ENTRYPOINT")
            result = subprocess.run([python] + entrypoint[1:] + ["serve", "--help"], cwd=app,
                                    capture_output=True, text=True, timeout=30)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("usage", result.stdout)

    def test_build_context_is_only_the_module(self):
        with open(os.path.join(HERE, ".dockerignore"), encoding="utf-8") as file:
            patterns = [line.strip() for line in file if line.strip() and not line.startswith("#")]
        self.assertEqual(patterns, ["*", "!simplemesh.py"])


class PackagingWheelTest(unittest.TestCase):
    """``pip install .`` into a fresh venv gives a working ``simplemesh`` command (setuptools comes from PyPI)."""

    def test_pip_install_gives_a_working_command(self):
        with tempfile.TemporaryDirectory() as tmp:
            source = os.path.join(tmp, "src")
            os.mkdir(source)
            for name in ("pyproject.toml", "simplemesh.py", "README.md"):  # not the worktree: pip writes build/
                if os.path.exists(os.path.join(HERE, name)):
                    shutil.copy(os.path.join(HERE, name), source)
            venv = os.path.join(tmp, "venv")
            # A venv without its own pip, filled by this interpreter's pip: the same install, seconds faster.
            subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=60)
            python = os.path.join(venv, "bin", "python")
            install = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q",
                                      "--disable-pip-version-check", source],
                                     capture_output=True, text=True, timeout=300)
            self.assertEqual(install.returncode, 0, install.stderr)
            metadata = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.requires('simplemesh'))"],
                                      capture_output=True, text=True, timeout=30)
            self.assertEqual(metadata.stdout.strip(), "None")  # no dependencies
            command = os.path.join(venv, "bin", "simplemesh")
            helped = subprocess.run([command, "--help"], capture_output=True, text=True, timeout=30)
            self.assertEqual(helped.returncode, 0, helped.stderr)
            self.assertIn("manifests", helped.stdout)
            port = free_port()
            env = {"PATH": os.environ.get("PATH", ""), "HOST": "wheel", "PORT": str(port), "ADDRESS": "127.0.0.1",
                   "SHUTDOWN_GRACE": "1"}
            server = subprocess.Popen([command, "serve"], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, cwd=tmp)
            try:
                wait_for_port(port)
                status, _headers, answer = http_request(("127.0.0.1", port), "/")
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(timeout=15)
                server.stderr.close()
            self.assertEqual((status, answer["host"]), (200, "wheel"))
            self.assertEqual(server.returncode, 0)


# --- Command line ---------------------------------------------------------------------------------------------
# serve, mesh, call and load as processes (SPEC 6).

class CommandLineServeAndMeshTest(unittest.TestCase):
    """The serve and mesh commands as processes."""

    def test_help_runs_on_a_bare_interpreter(self):
        for args in [("--help",), ("serve", "--help"), ("mesh", "--help"), ("call", "--help"), ("load", "--help"),
                     ("manifests", "--help")]:
            result = run_cli(*args)
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertIn("usage", result.stdout)

    def test_bad_configuration_exits_2_with_a_message(self):
        result = run_cli("serve", env={"PORT": "nope"})
        self.assertEqual(result.returncode, 2)
        self.assertIn("PORT", result.stderr)
        result = run_cli("mesh", "b;dealy=1")
        self.assertEqual(result.returncode, 2)
        self.assertIn("dealy", result.stderr)

    def test_mesh_reproduces_the_original_demo(self):
        port = free_port(4)
        process = subprocess.Popen([sys.executable, "-I", "-S", os.path.join(HERE, "simplemesh.py"), "mesh",
                                    "--port", str(port), "a;delay=0.1", "b;delay=0.2", "c;delay=0.3"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for_port(port + 3)
            status, _h, answer = http_request(("127.0.0.1", port), "/a/b/c")
            self.assertEqual(status, 200)
            self.assertEqual(hosts(answer), ["a", [["b", [["c", []]]]]])  # the gateway is invisible
            self.assertEqual(http_request(("127.0.0.1", port), "/a/b?parallel&size=1k")[0], 200)
            a = answer
            self.assertGreaterEqual(a["elapsed_time"], 0.6)
            self.assertLess(a["elapsed_time"], 0.9)
        finally:
            process.send_signal(__import__("signal").SIGINT)
            out, err = process.communicate(timeout=15)
        self.assertEqual(process.returncode, 0, err)
        self.assertIn(f"curl http://localhost:{port}/a/b/c", out)
        self.assertNotIn("Traceback", err)
        self.assertIn("path=/a/b/c status=200", out)  # the access log
        self.assertIn('a method=GET path=/b query="parallel&size=1k" status=200', out)  # with the query (directives)
        self.assertIn(f"python3 simplemesh.py call localhost:{port}/a/b/c", out)
        self.assertIn(f"curl 'http://localhost:{port}/a/b/c?view=tree'", out)

    def test_mesh_with_two_versions_behind_one_name(self):
        port = free_port(3)
        process = subprocess.Popen([sys.executable, "-I", "-S", os.path.join(HERE, "simplemesh.py"), "mesh",
                                    "--port", str(port), "b;version=v1", "b;version=v2"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for_port(port + 2)
            versions = {http_request(("127.0.0.1", port), "/b")[2]["version"] for _ in range(4)}
        finally:
            process.terminate()
            process.communicate(timeout=15)
        self.assertEqual(versions, {"v1", "v2"})
        self.assertEqual(process.returncode, 0)

    def test_serve_is_the_default_command_and_logs_json(self):
        port = free_port()
        env = {"HOST": "solo", "PORT": str(port), "ADDRESS": "127.0.0.1", "LOG_FORMAT": "json"}
        process = subprocess.Popen([sys.executable, "-I", "-S", os.path.join(HERE, "simplemesh.py")], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for_port(port)
            status, _h, answer = http_request(("127.0.0.1", port), "/")
            self.assertEqual((status, answer["host"]), (200, "solo"))
        finally:
            process.terminate()
            out, err = process.communicate(timeout=15)
        self.assertEqual(process.returncode, 0, err)
        lines = [json.loads(line) for line in out.splitlines()]
        self.assertEqual(lines[0]["event"], "start")
        self.assertIn(f"curl 'localhost:{port}/?view=tree' or python3 simplemesh.py call", lines[0]["try"])
        access = [line for line in lines if line.get("path") == "/"]
        self.assertEqual(access[0]["trace_id"], answer["trace_id"])
        self.assertEqual(access[0]["status"], 200)


class CommandLineMeshProcessesTest(unittest.TestCase):
    """``mesh`` runs each node in its own process (every core) unless --one-process; one command starts it, the
    "mesh is up" lines come only once every node answers, and SIGTERM or a terminal's Ctrl-C drains them all."""

    def start(self, *flags):
        """A mesh ``a b c`` in a session of its own (as a terminal's process group): (process, port, stdout lines
        up to the line that says the mesh is up)."""
        port = free_port_run(4)
        process = subprocess.Popen([sys.executable, "-I", "-S", os.path.join(HERE, "simplemesh.py"), "mesh",
                                    "--port", str(port), "a", "b", "c", *flags], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.addCleanup(lambda: process.poll() is None and os.killpg(process.pid, 9))
        lines = []
        for line in process.stdout:  # blocks until the line comes; a mesh that never says it is up fails below
            lines.append(line)
            if "Ctrl-C stops the mesh" in line:
                break
        self.assertIn("Ctrl-C stops the mesh", "".join(lines), process.stderr.read() if process.poll() else "")
        return process, port, lines

    def node_processes(self, pid):
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            return [int(child) for child in children.read().split()]

    def test_each_node_in_its_own_process_ready_before_the_mesh_is_up_line(self):
        process, port, lines = self.start()
        # No wait for ports: the line above is printed only once every node answers.
        status, _headers, answer = http_request(("127.0.0.1", port), "/a/b/c")
        self.assertEqual((status, hosts(answer)), (200, ["a", [["b", [["c", []]]]]]))  # the gateway is invisible (issue 13)
        children = self.node_processes(process.pid)
        self.assertEqual(len(children), 3)
        for name, child_port in (("a", port + 1), ("b", port + 2), ("c", port + 3)):
            self.assertEqual(http_request(("127.0.0.1", child_port), "/")[2]["host"], name)
        starts = [line.split()[1] for line in lines if "event=start" in line]
        self.assertEqual(sorted(starts), ["a", "b", "c", "gateway"])
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)
        self.assertEqual(process.returncode, 0, err)
        self.assertEqual(err, "")
        self.assertRegex(out, r"Z c method=GET path=/ status=200")  # the children's access log: their own lines
        for child in children:  # every node's process has exited and been reaped
            self.assertFalse(os.path.exists(f"/proc/{child}"), child)

    def test_a_node_process_that_dies_stops_the_mesh_and_says_which(self):
        process, port, _lines = self.start()
        b = sorted(self.node_processes(process.pid))[1]  # forked in order: a, b, c
        os.kill(b, signal.SIGKILL)  # an OOM kill, say
        out, err = process.communicate(timeout=20)
        self.assertEqual(process.returncode, 1, err)
        self.assertRegex(out, r"gateway level=error event=node-exit node=b exitcode=-9")

    def test_ctrl_c_drains_a_request_through_every_process(self):
        process, port, _lines = self.start()
        results = {}
        client = threading.Thread(target=lambda: results.update(
            answer=http_request(("127.0.0.1", port), "/a/b;delay=1500ms/c")))
        client.start()
        time.sleep(0.5)  # the request is at b, in its delay
        os.killpg(process.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches every process of the group
        client.join(15)
        status, _headers, answer = results["answer"]
        self.assertEqual((status, hosts(answer)), (200, ["a", [["b", [["c", []]]]]]))
        _out, err = process.communicate(timeout=20)
        self.assertEqual(process.returncode, 0, err)
        self.assertEqual(err, "")

    def test_one_process_flag(self):
        process, port, _lines = self.start("--one-process")
        status, _headers, answer = http_request(("127.0.0.1", port), "/a/b/c")
        self.assertEqual((status, hosts(answer)), (200, ["a", [["b", [["c", []]]]]]))
        self.assertEqual(self.node_processes(process.pid), [])
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=20)
        self.assertEqual(process.returncode, 0, err)

    def test_a_node_that_cannot_start_stops_the_mesh_with_one_line(self):
        with socket.socket() as taken:
            port = free_port_run(3)
            taken.bind(("127.0.0.1", port + 2))
            taken.listen(1)
            result = run_cli("mesh", "--port", str(port), "a", "b", env={"PATH": os.environ.get("PATH", "")})
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertEqual(result.stderr.strip().splitlines(),
                         [f"simplemesh: cannot start the mesh: cannot listen on 127.0.0.1:{port + 2}: "
                          f"port {port + 2} is already in use"])
        for offset in (0, 1):  # the gateway and node a are gone too
            self.assertTrue(port_is_free(port + offset))


class CommandLineCallTest(unittest.TestCase):
    """The call command."""

    def test_call_prints_the_tree_and_exits_by_the_root_status(self):
        with Mesh({"a": {}, "b": {"delay": "10ms"}, "c": {"error": "1", "status": "503"}}) as mesh:
            url = f"127.0.0.1:{mesh.port('a')}"
            result = run_cli("call", f"{url}/b")
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertRegex(result.stdout, r"^trace [0-9a-f]{32}\na +200 .*\n"
                                            r"└─ b +200 +\d+\.\d ms  delay 10\.0 ms\nok: 2 hops in ")
            self.assertNotIn("\033", result.stdout)  # not a terminal: no colour
            result = run_cli("call", f"http://{url}/b/c")
            self.assertEqual(result.returncode, 1)
            self.assertIn("✗ injected failure 503", result.stdout)
            self.assertTrue(result.stdout.endswith("1 failed hop: c\n"))
            result = run_cli("call", "--json", f"{url}/b;delay=1ms")
            self.assertEqual(result.returncode, 0)
            self.assertEqual(hosts(json.loads(result.stdout)), ["a", [["b", []]]])
            result = run_cli("call", "--json", f"{url}/b//c")
            self.assertEqual((result.returncode, json.loads(result.stdout)["status"]), (1, 400))

    def test_call_draws_a_foreign_answer_as_one_hop_and_exits_by_its_status(self):
        with Mesh({"a": {}}) as mesh:
            result = run_cli("call", f"127.0.0.1:{mesh.port('a')}/healthz")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn("✗", result.stdout)
        self.assertNotIn("reset", result.stdout)
        self.assertRegex(result.stdout, r'^127\.0\.0\.1:\d+  200 .* not simplemesh: application/json, \d+ B: '
                                        r'\{"host": "a", "status": "ok"\}\nok: 1 hop in ')
        rbac = b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\n" \
               b"content-length: 19\r\n\r\nRBAC: access denied"
        peer = BadPeer(lambda sock: sock.sendall(rbac))
        self.addCleanup(peer.close)
        result = run_cli("call", f"127.0.0.1:{peer.port}/")
        self.assertEqual(result.returncode, 1)
        self.assertIn("403", result.stdout)
        self.assertIn("✗ answered 403, not a simplemesh answer: RBAC: access denied", result.stdout)

    def test_call_without_an_answer_exits_2(self):
        result = run_cli("call", f"http://127.0.0.1:{free_port()}/a")
        self.assertEqual(result.returncode, 2)
        self.assertIn("no answer from 127.0.0.1", result.stderr)
        result = run_cli("call", "ftp://x/a")
        self.assertEqual(result.returncode, 2)
        self.assertIn("bad URL", result.stderr)

    def test_call_in_a_terminal_is_coloured(self):
        import pty
        with Mesh({"a": {}}) as mesh:
            leader, follower = pty.openpty()
            process = subprocess.Popen([sys.executable, "-I", "-S", os.path.join(HERE, "simplemesh.py"), "call",
                                        f"127.0.0.1:{mesh.port('a')}/"], stdout=follower, stderr=follower,
                                       env={"TERM": "xterm"})
            os.close(follower)
            output = b""
            while True:
                try:
                    chunk = os.read(leader, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                output += chunk
            os.close(leader)
            self.assertEqual(process.wait(timeout=10), 0)
        self.assertIn(b"\033[32m200\033[0m", output)


class CommandLineLatencyHistogramTest(unittest.TestCase):
    """The load command's latency histogram."""

    def test_percentiles_within_one_percent(self):
        histogram = sm.LatencyHistogram()
        for value in range(1, 1001):
            histogram.add(value / 1000)
        for fraction, expected in ((0.5, 0.5), (0.9, 0.9), (0.99, 0.99)):
            self.assertAlmostEqual(histogram.percentile(fraction), expected, delta=expected * 0.011)
        self.assertEqual((histogram.count, histogram.max, histogram.percentile(1.0)), (1000, 1.0, 1.0))
        self.assertEqual(sm.LatencyHistogram().percentile(0.5), 0.0)
        self.assertLess(len(histogram.counts), 700)  # bounded: buckets, not samples


class CommandLineLoadSummaryTest(unittest.TestCase):
    """The load command's summary."""

    def test_summary_is_honest_about_a_rate_not_kept(self):
        stats = sm.LoadStats(rate=100, concurrency=2, sent=50, missed_busy=40, missed_late=10, elapsed=1.0,
                             codes={200: 49, "refused": 1})
        summary = stats.summary()
        self.assertEqual((summary["achieved_rate"], summary["rate_kept"], summary["errors"]), (50.0, False, 1))
        text = sm.render_load_summary(summary, "http://a/")
        self.assertIn("50 requests in 1.00 s = 50.0/s (target 100/s)", text)
        self.assertIn("status: 200=49 refused=1", text)
        self.assertIn("TARGET RATE NOT KEPT: 50 sends missed: 40 found all workers waiting", text)
        self.assertIn("10 could not be scheduled on time", text)
        self.assertIn("MISSED 50", sm.render_progress(stats))
        kept = sm.LoadStats(rate=10, concurrency=2, sent=10, elapsed=1.0, codes={200: 10})
        self.assertNotIn("NOT KEPT", sm.render_load_summary(kept.summary(), "http://a/"))


class CommandLineLoadTest(unittest.TestCase):
    """The load command against real nodes."""

    def load(self, mesh, *args, path="/b"):
        result = run_cli("load", f"127.0.0.1:{mesh.port('a')}{path}", "--json", *args)
        self.assertEqual(result.returncode, 0, result.stderr)
        return json.loads(result.stdout)

    def test_count_matches_rate_times_duration(self):
        with Mesh({"a": {}, "b": {"delay": "5ms"}}) as mesh:
            summary = self.load(mesh, "--rate", "100", "--duration", "2s")
            self.assertEqual(summary["sent"] + summary["missed"], 200)
            self.assertGreaterEqual(summary["sent"], 190, summary)  # a busy 2-core CI box may miss a few
            self.assertEqual(summary["answered"], summary["sent"])
            self.assertAlmostEqual(summary["achieved_rate"], summary["sent"] / 2, delta=1)
            self.assertEqual(summary["codes"], {"200": summary["sent"]})
            self.assertGreater(summary["latency"]["p50"], 0.005)
            self.assertLessEqual(summary["latency"]["p50"], summary["latency"]["p99"])
            self.assertEqual(mesh.node("b").metrics.requests, {("GET", "200"): summary["sent"]})

    def test_a_slow_service_cannot_lower_the_rate_quietly(self):
        with Mesh({"a": {}, "b": {"delay": "200ms"}}) as mesh:
            summary = self.load(mesh, "--rate", "50", "--duration", "1s", "--concurrency", "2")
            # 2 in flight for 200 ms each: about 10/s get out; the rest are reported missed, not dropped silently
            self.assertFalse(summary["rate_kept"])
            self.assertEqual(summary["sent"] + summary["missed"], 50)
            self.assertLessEqual(summary["sent"], 12)
            self.assertGreater(summary["missed_busy"], 35)
            result = run_cli("load", f"127.0.0.1:{mesh.port('a')}/b", "--rate", "20", "--duration", "0.3s",
                             "--concurrency", "1")
            self.assertIn("TARGET RATE NOT KEPT", result.stdout)

    def test_errors_are_counted_by_code_and_plain_lines_when_not_a_terminal(self):
        with Mesh({"a": {}, "b": {"error": "1", "status": "503"}}) as mesh:
            result = run_cli("load", f"127.0.0.1:{mesh.port('a')}/b", "--rate", "20", "--duration", "1.2s",
                             "--interval", "0.5s")
        lines = result.stdout.splitlines()
        self.assertEqual(result.returncode, 1, "every request failed: the run failed")
        self.assertNotIn("\r", result.stdout)
        progress = [line for line in lines if " sent " in line]
        self.assertEqual(len(progress), 2, result.stdout)
        self.assertRegex(progress[-1], r"errors \d+ \(502=\d+\)")  # why they failed, as they fail
        self.assertIn("status: 502=24", result.stdout)
        self.assertIn("failed: 24 of 24 (502=24)", result.stdout)
        self.assertRegex(result.stdout, r"latency: p50 [\d.]+ ms  p90 [\d.]+ ms  p99 [\d.]+ ms  max [\d.]+ ms")
        result = run_cli("load", f"127.0.0.1:{free_port()}/", "--rate", "20", "--duration", "0.5s", "--json")
        self.assertEqual(json.loads(result.stdout)["codes"], {"refused": 10})
        self.assertEqual(result.returncode, 1)

    def test_max_error_rate_sets_the_exit_code(self):
        with Mesh({"a": {}, "b": {"error": "0.5"}}) as mesh:
            url = f"127.0.0.1:{mesh.port('a')}/b"
            some_failed = run_cli("load", url, "--rate", "40", "--duration", "1s", "--json")
            summary = json.loads(some_failed.stdout)
            self.assertTrue(0 < summary["errors"] < summary["answered"], summary)
            self.assertEqual(some_failed.returncode, 0, "by default only a run where everything failed fails")
            strict = run_cli("load", url, "--rate", "40", "--duration", "1s", "--max-error-rate", "5%")
            self.assertEqual(strict.returncode, 1, strict.stdout)
            lenient = run_cli("load", url, "--rate", "40", "--duration", "1s", "--max-error-rate", "1")
            self.assertEqual(lenient.returncode, 0, lenient.stdout)
        self.assertEqual(run_cli("load", url, "--max-error-rate", "2").returncode, 2)

    def test_duration_0_runs_until_sigterm_and_prints_the_summary(self):
        with Mesh({"a": {}}) as mesh:
            for signum in (signal.SIGTERM, signal.SIGINT):
                process = subprocess.Popen([sys.executable, "-I", "-S", os.path.join(HERE, "simplemesh.py"), "load",
                                            f"127.0.0.1:{mesh.port('a')}/", "--rate", "50", "--duration", "0",
                                            "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                before = sum(mesh.node("a").metrics.requests.values())
                wait_until(lambda: sum(mesh.node("a").metrics.requests.values()) > before, 10,
                           "the load never started")
                time.sleep(0.6)  # the scenario: the load runs a while before the signal
                self.assertIsNone(process.poll())
                process.send_signal(signum)
                out, err = process.communicate(timeout=10)
                self.assertEqual(process.returncode, 0, err)
                summary = json.loads(out)
                self.assertGreaterEqual(summary["sent"], 30)
                self.assertAlmostEqual(summary["achieved_rate"], 50, delta=5)

    def test_bad_arguments(self):
        for rate in ("0", "inf", "nan"):  # inf and nan would make a run that never ends
            result = run_cli("load", "127.0.0.1:1/", "--rate", rate)
            self.assertEqual(result.returncode, 2, rate)
            self.assertIn("--rate", result.stderr)
        result = run_cli("load", "127.0.0.1:1/", "--duration", "soon")
        self.assertEqual(result.returncode, 2)


# --- Robustness -----------------------------------------------------------------------------------------------
# End to end: what bad input and bad days get (SPEC 8), in the order of the sections above: wire,
# directives and route, budgets, outbound, node, views, configuration, gateway and server.
# `python3 -m unittest -k Robust test_simplemesh` runs just these.

class RobustHttpRulesTest(unittest.TestCase):
    """RFC 9110/9112 on a live node with a raw-socket client: what each client behaviour gets."""

    def test_host_and_transfer_encoding_rules(self):
        with Mesh({"a": {}}) as mesh:
            port = mesh.port("a")
            for request, status in ((b"GET / HTTP/1.1\r\n\r\n", 400),
                                    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", 400),
                                    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n\r\n", 400),
                                    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: br\r\n\r\n", 400),
                                    (b"GET / HTTP/1.0\r\n\r\n", 200)):
                with self.subTest(request=request):
                    got, headers, body, _seconds = raw_exchange(port, request)
                    self.assertEqual(got, status)
                    if status == 400:
                        self.assertEqual(headers["connection"], "close")
                        self.assertIn("error", json.loads(body))

    def test_a_chunked_body_is_accepted_and_forwarded_with_a_content_length(self):
        seen = []
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)

        def peer():  # reads one request as bytes, the body by its Content-Length, and answers it
            sock, _ = listener.accept()
            with sock:
                data = b""
                while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < 10:
                    data += sock.recv(65536)
                seen.append(data)
                sock.sendall(answer_bytes(b'{"host": "p", "status": 200}'))

        threading.Thread(target=peer, daemon=True).start()
        with Mesh({"a": {}}, max_body=10) as mesh:
            mesh.peers["p"] = [("127.0.0.1", listener.getsockname()[1])]
            request = (b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n"
                       b"\r\n4\r\nchun\r\n6\r\nked!!!\r\n0\r\n\r\n")
            status, _headers, body, _seconds = raw_exchange(mesh.port("a"), request)
            self.assertEqual((status, json.loads(body)["next_node"][0]["host"]), (200, "p"))
            too_big = b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nchunk!\r\n5\r\nabcde\r\n0\r\n\r\n"
            self.assertEqual(raw_exchange(mesh.port("a"), too_big)[0], 413)
        head, _, body = b"".join(seen).partition(b"\r\n\r\n")
        self.assertIn(b"\r\nContent-Length: 10\r\n", head + b"\r\n")
        self.assertNotIn(b"chunked", head.lower())
        self.assertEqual(body, b"chunked!!!")

    def test_http_1_0_keep_alive_is_acknowledged_and_gets_no_100_continue(self):
        with Mesh({"a": {}}) as mesh, socket.create_connection(("127.0.0.1", mesh.port("a")), timeout=5) as sock:
            for _ in range(2):  # the same connection serves twice
                sock.sendall(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                answer = sock.recv(65536)
                self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer)
                self.assertIn(b"\r\nConnection: keep-alive\r\n", answer)
            sock.sendall(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
            time.sleep(0.2)  # the scenario: a client that waits for a 100 Continue a moment (none must come)
            sock.sendall(b"hi")
            answer = sock.recv(65536)
            self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer)  # not "100 Continue" first
            self.assertIn(b"\r\nConnection: close\r\n", answer)

    def test_an_error_answer_survives_unread_input(self):
        """A lingering close: the client that sends a body the node refuses still reads the 413 (no RST)."""
        with Mesh({"a": {}}, max_body=1000) as mesh:
            for attempt in range(5):
                with socket.create_connection(("127.0.0.1", mesh.port("a")), timeout=5) as sock:
                    sock.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 300000\r\n\r\n")
                    sock.recv(1, socket.MSG_PEEK)  # the node answered (and closes its side)
                    try:
                        sock.sendall(b"x" * 300000)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    answer = b""
                    while True:
                        chunk = sock.recv(65536)
                        if not chunk:
                            break
                        answer += chunk
                    self.assertTrue(answer.startswith(b"HTTP/1.1 413"), answer[:100])

    def test_forward_headers_never_names_a_hop_by_hop_or_framing_header(self):
        for name in ("content-length", "Connection", "transfer-encoding", "te", "host", "proxy-authorization",
                     "upgrade", "keep-alive", "trailer"):
            with self.subTest(name=name), self.assertRaises(sm.ConfigError) as caught:
                sm.Config.from_env({"FORWARD_HEADERS": f"end-user,{name}"})
            self.assertIn(name.lower(), str(caught.exception))
        self.assertEqual(sm.Config.from_env({"FORWARD_HEADERS": "end-user x-tenant"}).forward_headers,
                         ("end-user", "x-tenant"))
        result = run_cli("serve", env={"FORWARD_HEADERS": "content-length", "PATH": os.environ.get("PATH", "")})
        self.assertEqual(result.returncode, 2)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertIn("FORWARD_HEADERS='content-length'", result.stderr)


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
        forged = '/c%20status=200%20trace_id=forged%20x="%20y=\\'
        self.assertEqual(http_request(("127.0.0.1", port), forged)[0], 400)
        self.assertEqual(node.stop(), 0)
        lines = node.logs()[0].splitlines()
        self.assertEqual(len(lines), 6, lines)  # the start-up line, one per request and the stop line
        self.assertTrue(all(line.isprintable() for line in lines), lines)
        self.assertIn('path="/\\r\\n2026-01-01T00:00:00Z forged method=GET"', lines[1])
        fields = logfmt_fields(lines[4])
        self.assertEqual(fields["path"], urllib.parse.unquote(forged))
        self.assertEqual((fields["status"], fields["method"]), (["400"], ["GET"]))
        self.assertNotIn("forged", fields["trace_id"])


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
        require_module(self, "hypothesis")
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


class RobustBudgetTest(unittest.TestCase):
    """SPEC 8 budgets: what one request, and all requests together, may make a node hold or burn."""

    def test_route_budgets_are_checked_before_any_call(self):
        with Mesh({"a": {}, "b": {}}, max_route_bytes=100 * 1024, max_route_cpu=0.05) as mesh:
            seen = mesh.record_requests("b")
            for path, rule in (("/b;size=60k~b;size=60k", "MAX_ROUTE_BYTES"),  # fan-out multiplies
                               ("/b~b/b;size=60k", "MAX_ROUTE_BYTES"),  # 4 calls, 2 of them to the last hop
                               ("/b;size=50k?size=60k", "MAX_ROUTE_BYTES"),  # the entry's own answer counts
                               ("/b;cpu=20ms~b;cpu=20ms~b;cpu=20ms", "MAX_ROUTE_CPU"),
                               ("/b;cpu=30ms?cpu=30ms", "MAX_ROUTE_CPU")):
                with self.subTest(path=path):
                    status, _headers, answer = mesh.request("a", path)
                    self.assertEqual((status, answer["rule"]), (400, rule), answer)
                    self.assertIn(rule + "=", answer["error"])
            self.assertEqual(seen, [])
            for path in ("/b;size=40k~b;size=40k?size=20k", "/b;cpu=20ms~b;cpu=20ms?cpu=10ms"):
                with self.subTest(path=path):
                    self.assertEqual(mesh.request("a", path)[0], 200)

    def test_downstream_answers_count_against_one_budget_per_request(self):
        # a's route asks for nothing, but b pads every answer by its own default: a counts what arrives.
        with Mesh({"a": {}, "b": {"size": "40k"}}, max_route_bytes=100_000) as mesh:
            status, _headers, answer = mesh.request("a", "/b~b~b")
            self.assertEqual(status, 502)
            self.assertEqual([child["status"] for child in answer["next_node"]], [200, 200, 502])
            self.assertIn("MAX_ROUTE_BYTES=100000", answer["next_node"][2]["error"])
            status, _headers, answer = mesh.request("a", "/b~b?parallel")  # parallel branches share it
            self.assertEqual(status, 200)
            wait_until(lambda: mesh.node("a").inflight.used == 0)  # all given back once answered

    def test_an_answer_that_would_parse_into_many_objects_is_charged_before_parsing(self):
        objects = json.dumps([{}] * 50_000).encode()  # 200 KB of text, about 10 MB once parsed
        padded = json.dumps({"host": "p", "status": 200, "padding": "x" * 400_000}).encode()
        for body, status in ((objects, 502), (padded, 200), (b"[" + b"0," * 200_000 + b"0]", 502)):
            peer = BadPeer(lambda sock, body=body: sock.sendall(answer_bytes(body)))
            self.addCleanup(peer.close)
            with self.subTest(body=body[:20]), Mesh({"a": {}}, max_route_bytes=1024 * 1024) as mesh:
                mesh.peers["p"] = [("127.0.0.1", peer.port)]
                _status, _headers, answer = mesh.request("a", "/p")
                self.assertEqual(answer["next_node"][0]["status"], status, answer["next_node"][0])
                if status == 502:
                    self.assertIn("not parsed", answer["next_node"][0]["error"])
                    self.assertIn("MAX_ROUTE_BYTES=1048576", answer["next_node"][0]["error"])

    def test_node_budget_answers_503_with_retry_after(self):
        with Mesh({"a": {}, "b": {}, "c": {}, "d": {"size": "50k"}}, max_inflight_bytes=100 * 1024) as mesh:
            node = mesh.node("a")
            results = []
            # a holds b's 60 KB answer while c waits: bytes really held, not bytes asked for
            holder = threading.Thread(target=lambda: results.append(mesh.request("a", "/b;size=60k~c;delay=500ms")))
            holder.start()
            wait_until(lambda: node.inflight.used >= 60 * 1024)
            status, headers, answer = mesh.request("a", "/?size=50k")
            self.assertEqual((status, headers.get("retry-after"), answer["rule"]), (503, "1", "MAX_INFLIGHT_BYTES"))
            status, headers, answer = mesh.request("a", "/", "POST", b"x" * 50_000)  # a body counts too
            self.assertEqual((status, headers.get("retry-after")), (503, "1"))
            self.assertIn("MAX_INFLIGHT_BYTES=102400", answer["error"])
            status, _headers, answer = mesh.request("a", "/d")  # d pads by its own default: a learns it on arrival
            self.assertEqual((status, answer["next_node"][0]["status"]), (502, 502))
            self.assertIn("MAX_INFLIGHT_BYTES=102400", answer["next_node"][0]["error"])
            self.assertEqual(mesh.request("a", "/healthz")[0], 200)
            self.assertEqual(mesh.request("a", "/?delay=10ms")[0], 200)  # a request that holds nothing is served
            holder.join()
            self.assertEqual(results[0][0], 200)
            wait_until(lambda: node.inflight.used == 0)
            for path, method, body in (("/?size=50k", "GET", None), ("/", "POST", b"x" * 50_000),
                                       ("/d", "GET", None)):
                self.assertEqual(mesh.request("a", path, method, body)[0], 200)
            status, _headers, answer = mesh.request("a", "/?size=101k")  # could never fit: no use retrying
            self.assertEqual((status, answer["rule"]), (400, "MAX_INFLIGHT_BYTES"))
            wait_until(lambda: node.inflight.used == 0)

    def test_a_slow_request_holds_no_budget_while_it_waits(self):
        with Mesh({"a": {}, "b": {}}, max_inflight_bytes=100 * 1024) as mesh:
            waiting = mesh.record_requests("b")
            # each asks for 80 KB: reserved ahead, three would shut a out for as long as they wait
            holders = [threading.Thread(target=mesh.request, args=("a", "/b;size=40k;delay=500ms?size=40k"))
                       for _ in range(3)]
            for holder in holders:
                holder.start()
            wait_until(lambda: len(waiting) == 3)
            self.assertEqual(mesh.node("a").inflight.used, 0)
            self.assertEqual(mesh.request("a", "/b;size=90k")[0], 200)
            for holder in holders:
                holder.join()

    def test_cpu_is_burned_one_request_at_a_time_within_a_node_budget(self):
        with Mesh({"a": {}}, max_inflight_cpu=0.3) as mesh:
            node = mesh.node("a")
            results = []
            burners = [threading.Thread(target=lambda: results.append(mesh.request("a", "/?cpu=100ms")[0]))
                       for _ in range(2)]
            for burner in burners:
                burner.start()
            wait_until(lambda: node.cpu_queue.used >= 0.2)
            status, headers, answer = mesh.request("a", "/?cpu=150ms")  # 0.35 s would be queued
            self.assertEqual((status, headers.get("retry-after"), answer["rule"]), (503, "1", "MAX_INFLIGHT_CPU"))
            self.assertIn("MAX_INFLIGHT_CPU=0.3", answer["error"])
            self.assertEqual(mesh.request("a", "/?cpu=50ms")[0], 200)  # 0.3 s: at the limit
            for burner in burners:
                burner.join()
            self.assertEqual(results, [200, 200])
            self.assertAlmostEqual(node.cpu_queue.used, 0)
            status, _headers, answer = mesh.request("a", "/?cpu=310ms")  # could never fit
            self.assertEqual((status, answer["rule"]), (400, "MAX_INFLIGHT_CPU"))

    def test_a_crowd_burning_cpu_leaves_probes_answered(self):
        port = free_port()
        node = NodeProcess("serve", port=port, env={"PORT": str(port), "LOG_LEVEL": "warning"})
        self.addCleanup(node.kill)
        address = ("127.0.0.1", port)
        statuses = []

        def burn():
            try:
                statuses.append(http_request(address, "/?cpu=1s", timeout=30)[0])
            except OSError:
                statuses.append("cut")  # the node is killed at the end of the test

        with concurrent.futures.ThreadPoolExecutor(40) as pool:
            for _ in range(40):
                pool.submit(burn)
            wait_until(lambda: statuses.count(503) >= 30)  # 10 fit in MAX_INFLIGHT_CPU=10s, the rest are refused
            worst = 0.0
            for _ in range(10):
                started = time.monotonic()
                self.assertEqual(http_request(address, "/healthz", timeout=5)[0], 200)
                worst = max(worst, time.monotonic() - started)
            node.kill()
        # One request burns at a time: 0.03 s here. All 10 at once took 1.2 s; 40 at once (no budget), 13.9 s.
        self.assertLess(worst, 0.5)

    def test_refused_routes_are_not_cached(self):
        self.addCleanup(setattr, sm, "ROUTES", sm.ROUTES)
        sm.ROUTES = sm.RouteCache()  # the process's cache holds what earlier tests' nodes accepted
        with Mesh({"a": {}, "b": {}}, max_calls=3) as mesh:
            refused = ["/b~b~b~b", "/b;size=11m", "/b;delay=61s", "/127.0.0.1", "/b/b/b/b"]
            for path in refused:
                self.assertIn(mesh.request("a", path)[0], (400, 403))
            self.assertEqual(mesh.request("a", "/b/b")[0], 200)
            self.assertIn("/b/b", sm.ROUTES.entries)
            for path in refused:
                self.assertNotIn(path, sm.ROUTES.entries)


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
        status, child, seconds = self.call_through(lambda sock: time.sleep(5))  # the peer stalls
        self.assertEqual((status, child["status"], child["error"]), (504, 504, "timeout after 0.5s"))
        self.assertLess(seconds, 1.0)

    def test_a_peer_trickling_bytes_is_cut_at_the_total_timeout(self):
        def trickle(first, piece):
            def peer(sock):
                sock.sendall(first)
                for _ in range(100):  # each piece well inside the timeout, the whole answer far beyond it
                    sock.sendall(piece)
                    time.sleep(0.1)  # the scenario: a little at a time
            return peer

        for what, first, piece in (("headers", b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n", b"X-Slow: 1\r\n"),
                                   ("body", answer_bytes(b"", length=1000), b" ")):
            with self.subTest(what=what):
                status, child, seconds = self.call_through(trickle(first, piece))
                self.assertEqual((status, child["status"]), (504, 504))
                self.assertLess(seconds, 0.9)

    def test_reset_mid_answer(self):
        def reset(sock):
            sock.sendall(answer_bytes(b'{"host": "p", "sta', length=500))
            time.sleep(0.05)  # the scenario: part of the answer arrives, then the reset
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
        self.assertEqual((child["status"], child["foreign"], child["size"]), (200, True, len(deep)))
        self.assertNotIn("error", child)

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
        with Mesh({"a": {}, "b": {}, "c": {}}, allow_directives=False) as mesh:
            self.assertEqual(mesh.request("a", "/")[0], 200)
            status, _headers, answer = mesh.request("a", "/?error=1")
            self.assertEqual((status, answer["rule"]), (403, "ALLOW_DIRECTIVES"))
            seen = mesh.record_requests("b")
            for path, hop in (("/b;error=1", "b"), ("/b/c;delay=1ms", "c"), ("/b~(c/c;status=503)", "c"),
                              ("/b/c:9;parallel", "c:9")):  # aimed at a later hop too
                with self.subTest(path=path):
                    status, _headers, answer = mesh.request("a", path)
                    self.assertEqual((status, answer["rule"]), (403, "ALLOW_DIRECTIVES"))
                    self.assertIn(repr(hop), answer["error"])
            self.assertEqual(seen, [])  # refused before any call
            self.assertEqual(mesh.request("a", "/b/c")[0], 200)

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
            for request in (b"GET /p HTTP/1.1\r\nHost: a\r\nx-request-id: a\rInjected: 1\r\n\r\n",
                            b"GET /p HTTP/1.1\r\nHost: a\r\nend-user: a\x00b\r\n\r\n",
                            b"GET /p HTTP/1.1\r\nHost: a\r\nbaggage: a\r\n injected: 1\r\n\r\n",
                            b"GET /p;delay=%0d%0aInjected:1 HTTP/1.1\r\nHost: a\r\n\r\n",
                            b"GET /p%0d%0aInjected:%201 HTTP/1.1\r\nHost: a\r\n\r\n"):
                with self.subTest(request=request):
                    self.assertEqual(raw_exchange(port, request)[0], 400)
            self.assertEqual(seen, [], "a request with a control character reached the peer")
            self.assertEqual(raw_exchange(port, b"GET /p HTTP/1.1\r\nHost: a\r\nend-user: j\xe9 \t x\r\n\r\n")[0], 200)


class RobustInternalErrorTest(unittest.TestCase):
    """A bug answers 500 with a JSON error and one log line saying where; the connection keeps serving."""

    def test_an_exception_is_a_500_and_one_log_line(self):
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


class RobustOutputHygieneTest(unittest.TestCase):
    """Answers are strict JSON, HTML links stay on the node, numbers are ASCII digits."""

    def test_a_peer_nan_does_not_make_the_answer_invalid_json(self):
        peer = BadPeer(lambda sock: sock.sendall(answer_bytes(b'{"host": "p", "status": 200, "elapsed_time": NaN, '
                                                              b'"x": [Infinity, -Infinity]}')))
        self.addCleanup(peer.close)
        with Mesh({"a": {}}) as mesh:
            mesh.peers["p"] = [("127.0.0.1", peer.port)]
            status, _headers, body, _seconds = raw_exchange(mesh.port("a"), b"GET /p HTTP/1.1\r\nHost: a\r\n\r\n")
            answer = json.loads(body, parse_constant=lambda name: self.fail(f"{name} in the answer"))
            self.assertEqual((status, answer["next_node"][0]["x"]), (200, [None, None]))

    def test_html_links_are_relative(self):
        with Mesh({"a": {}}) as mesh:
            for path in ("/%2F%2Fevil.example", "/%2F%2Fevil.example?delay=1ms", "//evil.example"):
                with self.subTest(path=path):
                    _status, _headers, page = mesh.request("a", path + ("&" if "?" in path else "?") + "view=html")
                    links = re.findall(r'<a href="([^"]*)"', page)
                    self.assertTrue(links)
                    for link in links:
                        self.assertTrue(link.startswith("?"), link)
                        self.assertNotIn("view=html", link)
            _status, _headers, page = mesh.request("a", "/?delay=1ms&view=html")
            self.assertIn('href="?delay=1ms&amp;view=json"', page)

    def test_only_ascii_digits(self):
        with Mesh({"a": {}}) as mesh:
            for query in ("delay=%D9%A3s", "error=%D9%A3", "size=%D9%A3k", "status=%D9%A3%D9%A0%D9%A3",
                          "error=nan", "error=1_0", "delay=%EF%BC%91s"):
                with self.subTest(query=query):
                    status, _headers, answer = mesh.request("a", "/?" + query)
                    self.assertEqual(status, 400, answer)
        for env in ({"PORT": "\u0669\u0660\u0669\u0660"}, {"MAX_CALLS": "1_0"}, {"MAX_BODY": "\u0661k"}):
            with self.subTest(env=env), self.assertRaises(sm.ConfigError):
                sm.Config.from_env(env)


class RobustStartUpTest(unittest.TestCase):
    """A port in use or a bad address: one clear line and exit code 2; IPv6 and dual-stack listening."""

    def test_port_in_use_and_bad_address_in_serve_and_mesh(self):
        with socket.socket() as taken:
            port = free_port_run(2) + 1  # the mesh's gateway takes the port before, its node a this one
            taken.bind(("127.0.0.1", port))
            taken.listen(1)
            env = {"PATH": os.environ.get("PATH", ""), "HOST": "a"}
            for args, extra, words in (
                    (("serve",), {"PORT": str(port), "ADDRESS": "127.0.0.1"}, f"port {port} is already in use"),
                    (("mesh", "--port", str(port - 1), "--address", "127.0.0.1", "a"), {},
                     f"port {port} is already in use"),
                    (("serve",), {"PORT": "0", "ADDRESS": "not an address"}, "ADDRESS='not an address'"),
                    (("serve",), {"PORT": "0", "ADDRESS": "192.0.2.1"}, "not one of this machine's"),
                    (("mesh", "--address", "nowhere", "a"), {}, "--address 'nowhere'")):
                with self.subTest(args=args, env=extra):
                    result = run_cli(*args, env={**env, **extra})
                    self.assertEqual(result.returncode, 2, result.stderr)
                    self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
                    self.assertIn(words, result.stderr)
                    self.assertNotIn("Traceback", result.stderr)

    def test_dual_stack_listening(self):
        if not socket.has_ipv6:
            self.fail("no IPv6 on this machine")
        config = sm.Config(host="a", port=0, address="::", log_level="warning")
        server = sm.start_node(config)
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        port = server.server_address[1]
        self.assertEqual(http_request(("::1", port), "/healthz")[0], 200)
        if socket.has_dualstack_ipv6():
            self.assertEqual(http_request(("127.0.0.1", port), "/healthz")[0], 200)
        with Mesh({"a": {}, "b": {}}, address="::1") as mesh:
            status, _headers, answer = mesh.request("a", "/b")
            self.assertEqual((status, hosts(answer)), (200, ["a", [["b", []]]]))


class RobustLimitsTest(unittest.TestCase):
    """SPEC 8: every limit, at and beyond it."""

    def test_max_concurrency_answers_503_with_retry_after(self):
        with Mesh({"a": {}}, max_concurrency=2) as mesh:
            results = []
            threads = [threading.Thread(target=lambda: results.append(mesh.request("a", "/?delay=300ms")[0]))
                       for _ in range(2)]
            for thread in threads:
                thread.start()
            wait_until(lambda: mesh.node("a").metrics.in_flight == 2, message="the slow requests never arrived")
            status, headers, answer = mesh.request("a", "/")
            probes = [mesh.request("a", path)[0] for path in ("/healthz", "/readyz", "/metrics")]
            for thread in threads:
                thread.join()
            self.assertEqual(probes, [200, 200, 200])  # a busy node still looks alive to the kubelet
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

    def test_idle_keepalive_connections_time_out_and_hold_no_thread(self):
        with Mesh({"a": {}}, keepalive_timeout=0.3) as mesh:
            mesh.request("a", "/")  # the first worker is started
            before = threading.active_count()
            socks = []
            for index in range(20):
                sock = socket.create_connection(("127.0.0.1", mesh.port("a")), timeout=5)
                socks.append(sock)
                if index % 2:  # half idle after an answer, half stuck mid-request-line (slowloris)
                    sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                    self.assertTrue(sock.recv(65536).startswith(b"HTTP/1.1 200"))
                else:
                    sock.sendall(b"GET /")
            time.sleep(0.1)  # time for the node to start a thread per slow client, if it did (none must come)
            self.assertLessEqual(threading.active_count(), before + 20)  # the slow ones hold a worker each, at most
            busy = threading.active_count()
            socks += [socket.create_connection(("127.0.0.1", mesh.port("a")), timeout=5) for _ in range(100)]
            time.sleep(0.05)  # time for the node to start a thread per connection, if it did (none must come)
            self.assertLessEqual(threading.active_count(), busy)  # a connection with nothing to read costs no thread
            for sock in socks:  # each recv waits (up to its 5 s timeout) for KEEPALIVE_TIMEOUT to close it
                self.assertEqual(sock.recv(65536), b"", "the node kept an idle connection open")
                sock.close()
            wait_until(lambda: mesh.servers["a"].active == 0, message="a closed connection still counts as active")

    def test_a_client_trickling_its_request_is_cut_at_the_keepalive_timeout(self):
        with Mesh({"a": {}}, keepalive_timeout=0.5) as mesh:
            for head, trickle in ((b"", b"G"), (b"GET / HTTP/1.1\r\nHost: a\r\n", b"x-slow: 1\r\n"),
                                  (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n", b"x")):
                with self.subTest(trickle=trickle), \
                        socket.create_connection(("127.0.0.1", mesh.port("a")), timeout=5) as sock:
                    started = time.monotonic()
                    sock.sendall(head)
                    with self.assertRaises(OSError):  # every byte inside the timeout, the whole far beyond
                        for _ in range(30):
                            time.sleep(0.1)  # the scenario: a piece at a time
                            sock.sendall(trickle)
                            if select.select([sock], [], [], 0)[0] and sock.recv(1) == b"":
                                raise ConnectionResetError("closed")
                    self.assertLess(time.monotonic() - started, 1.0)

    def test_max_connections_closes_the_oldest_idle_first_then_leaves_the_rest_in_the_backlog(self):
        request = b"GET /?delay=%s HTTP/1.1\r\nHost: a\r\n\r\n"
        with Mesh({"a": {}}, max_connections=4) as mesh:
            port = mesh.port("a")
            idle = []
            for _ in range(4):  # idle in this order
                idle += open_clients(port, 1, request % b"0")
                time.sleep(0.02)  # the scenario: each idle since a distinct moment
            newest = open_clients(port, 1, request % b"0")[0]  # answered: the oldest idle connection made room
            self.assertEqual(idle[0].recv(100), b"")
            for sock in idle[1:]:
                sock.setblocking(False)
                with self.assertRaises(BlockingIOError):  # still open
                    sock.recv(100)
            for sock in idle + [newest]:
                sock.close()
            wait_until(lambda: mesh.servers["a"].open == 0, message="the node never saw the clients close")
            threads = threading.active_count()
            busy = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(4)]
            for sock in busy:
                sock.sendall(request % b"400ms")
            wait_until(lambda: mesh.node("a").metrics.in_flight == 4, message="the busy requests never arrived")
            started = time.monotonic()
            late = open_clients(port, 1, request % b"0")[0]  # waits in the listen backlog, is not refused
            waited = time.monotonic() - started
            self.assertGreater(waited, 0.2)
            self.assertLessEqual(threading.active_count(), threads + 4)
            for sock in busy + [late]:
                sock.close()

    def test_clients_trickling_their_requests_hold_no_worker(self):
        """Slowloris: 30 clients each sending a request a piece at a time, with 6 workers in all: a normal request
        is still answered at once, the slow ones are served once whole, and the node has no thread per client."""
        with Mesh({"a": {}}, max_concurrency=2, keepalive_timeout=5) as mesh:
            port = mesh.port("a")
            slow = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(30)]
            for index, sock in enumerate(slow):
                sock.sendall(b"GET / HTTP/1.1\r\n" if index % 2 else
                             b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nab")
            wait_until(lambda: len(mesh.servers["a"].arriving) == 30,  # every worker has seen them and handed them back
                       message=f"{len(mesh.servers['a'].arriving)} of 30 slow requests handed back to the poller")
            started = time.monotonic()
            self.assertEqual(mesh.request("a", "/?delay=0", timeout=5)[0], 200)
            self.assertLess(time.monotonic() - started, 0.5)
            self.assertLessEqual(mesh.servers["a"].workers.threads, 6)
            self.assertEqual(len(mesh.servers["a"].arriving), 30)
            for index, sock in enumerate(slow):  # one at a time: MAX_CONCURRENCY=2
                sock.sendall(b"Host: a\r\n\r\n" if index % 2 else b"cd")
                self.assertTrue(sock.recv(65536).startswith(b"HTTP/1.1 200"))
                sock.close()

    def test_header_limits(self):
        with Mesh({"a": {}}) as mesh:
            port = mesh.port("a")
            many = b"".join(b"x-h%d: v\r\n" % n for n in range(sm.MAX_HEADERS - 1))  # and Host
            self.assertEqual(raw_exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\n" + many + b"\r\n")[0], 200)
            self.assertEqual(raw_exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\n" + many + b"x: y\r\n\r\n")[0], 431)
            line = b"x: " + b"v" * (sm.MAX_HEADER_LINE - 5) + b"\r\n"
            self.assertEqual(raw_exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\n" + line + b"\r\n")[0], 200)
            self.assertEqual(raw_exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\nx" + line + b"\r\n")[0], 431)
            lines = b"".join(b"x-%d: %s\r\n" % (n, b"v" * 15_000) for n in range(4))  # 60 KB in all
            self.assertEqual(raw_exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\n" + lines + b"\r\n")[0], 200)
            status, _headers, body, _seconds = raw_exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\n" + lines + lines + b"\r\n")
            self.assertEqual(status, 431)
            self.assertIn(b"65536 bytes in all", body)
            target = b"/" + b"a" * (sm.MAX_REQUEST_LINE - 16)
            self.assertEqual(raw_exchange(port, b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n")[0], 400)  # bad name
            self.assertEqual(raw_exchange(port, b"GET " + target + b"aa HTTP/1.1\r\nHost: a\r\n\r\n")[0], 414)

    def test_directive_caps_and_route_limits(self):
        with Mesh({"a": {}, "b": {}}, max_delay=0.05, max_size=2048, max_cpu=0.01, max_timeout=1.0,
                  max_calls=4, max_depth=3) as mesh:
            for path, status, rule in (
                    ("/?delay=50ms", 200, None), ("/?delay=51ms", 400, "MAX_DELAY"),
                    ("/?delay=1ms..51ms", 400, "MAX_DELAY"), ("/?delay=1ms:0.5,1s:0.5", 400, "MAX_DELAY"),
                    ("/?size=2k", 200, None), ("/?size=2049", 400, "MAX_SIZE"),
                    ("/?cpu=10ms", 200, None), ("/?cpu=11ms", 400, "MAX_CPU"),
                    ("/?timeout=1s", 200, None), ("/?timeout=1001ms", 400, "MAX_TIMEOUT"),
                    ("/b;delay=51ms", 400, "MAX_DELAY"),  # a hop's directive is checked at the entry too
                    ("/b~b~b~b", 200, None), ("/b~b~b~b~b", 400, "MAX_CALLS"),
                    ("/b/b/b", 200, None), ("/b/b/b/b", 400, "MAX_DEPTH")):
                with self.subTest(path=path):
                    got, _headers, answer = mesh.request("a", path)
                    self.assertEqual(got, status, answer)
                    if rule:
                        self.assertIn(rule, json.dumps(answer))


class RobustMemoryTest(unittest.TestCase):
    """SPEC 8: with the defaults, no attack takes a node above the memory limit ``manifests`` gives it.

    One node process with default settings, calling itself (the worst case: it holds both sides of every call).
    Its peak RSS is reset before each attack (/proc/PID/clear_refs), so each figure is that attack's alone.
    """
    LIMIT_MIB = sm.MEMORY_LIMIT_MIB

    @classmethod
    def setUpClass(cls):
        cls.node, cls.address = cls.start_node()
        cls.figures = {}

    @staticmethod
    def start_node(**env):
        port = free_port()
        node = NodeProcess("serve", port=port, env={"PORT": str(port), "HOST": "a", "PEERS": f"a=127.0.0.1:{port}",
                                                    "LOG_LEVEL": "warning", **env})
        return node, ("127.0.0.1", port)

    @classmethod
    def tearDownClass(cls):
        cls.node.kill()
        print("\npeak RSS (MiB) per attack:", cls.figures, file=sys.stderr)

    def attack(self, name, requests, clients=32, node=None, address=None, headers=None):
        """Send (path, method, body) requests from ``clients`` threads: {status: count}; checks the peak RSS."""
        node, address = node or self.node, address or self.address
        pid = node.process.pid
        with open(f"/proc/{pid}/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current RSS
        started = time.monotonic()

        def send(request):
            path, method, body = request
            return http_request(address, path, method, body, headers, timeout=60)[0]

        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            statuses = [status for status in pool.map(send, requests)]
        peak = process_memory_mib(pid)["VmHWM"]
        self.figures[name] = round(peak, 1)
        self.assertLess(peak, self.LIMIT_MIB, f"{name}: peak RSS {peak:.0f} MiB")
        self.assertLess(time.monotonic() - started, 30)
        return {status: statuses.count(status) for status in set(statuses)}

    def served_again(self, path, method="GET", body=None):
        """The node serves ``path`` once the crowd is gone (its last requests give their bytes back just after
        their answers leave, so a few tries)."""
        wait_until(lambda: http_request(self.address, path, method, body)[0] == 200,
                   message=f"{path} is not served after the attack")

    def test_the_generated_memory_limit_and_the_defaults_agree(self):
        for deployment in node_deployments(sm.build_manifests([("a", "", {}), ("b", "v2", {"size": "1m"})])):
            self.assertEqual(deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"],
                             f"{self.LIMIT_MIB}Mi")
        config = sm.Config()
        self.assertEqual(config.max_inflight_bytes, sm.inflight_bytes_for(self.LIMIT_MIB))
        mib = 1024 * 1024
        self.assertLessEqual(sm.BASE_MEMORY_MIB * mib + sm.ANSWER_MEMORY_FACTOR * config.max_inflight_bytes,
                             self.LIMIT_MIB * mib)
        # one request at its limits fits the node's budget, and so does a body
        self.assertLessEqual(config.max_route_bytes, config.max_inflight_bytes)
        self.assertLessEqual(config.max_size, config.max_route_bytes)
        self.assertLessEqual(config.max_body, config.max_inflight_bytes)

    def test_a_30_way_fan_out_of_10m_answers(self):
        fan_out = "/" + "~".join(["a;size=10m"] * 30) + "?parallel"
        self.assertEqual(self.attack("fan-out 30 x 10m", [(fan_out, "GET", None)] * 30), {400: 30})
        within = "/" + "~".join(["a;size=2m"] * 5) + "?parallel"  # at MAX_ROUTE_BYTES: the node budget decides
        statuses = self.attack("fan-out 5 x 2m, 30 clients", [(within, "GET", None)] * 60)
        self.assertLessEqual(set(statuses), {200, 502, 503})  # 502: a call refused by the node's budget
        self.served_again(within)

    def test_a_1_gb_answer(self):
        one_gb = "/" + "/".join(["a;size=10m"] * 100)
        self.assertEqual(self.attack("1 GB answer", [(one_gb, "GET", None)] * 10), {400: 10})
        statuses = self.attack("10m answers, 30 clients", [("/?size=10m", "GET", None)] * 60)
        self.assertIn(200, statuses)  # two fit in MAX_INFLIGHT_BYTES at any time
        self.assertLessEqual(set(statuses), {200, 503})

    def test_1024_distinct_16k_bad_requests(self):
        requests = [("/" + "~".join(f"n{index}x{hop}" + "y" * 150 for hop in range(100)) + "/a;cpu=6s", "GET", None)
                    for index in range(1024)]
        self.assertGreater(len(requests[0][0]), 15_000)
        self.assertEqual(self.attack("1,024 x 16 KB bad routes", requests), {400: 1024})

    def test_200_connections_with_big_heads_echoed(self):
        heads = {f"x-{n}": "v" * 15_000 for n in range(4)}  # 60 KB, just under MAX_HEADER_BYTES
        statuses = self.attack("200 heads of 60 KB, echoed", [("/a?headers", "GET", None)] * 200, clients=200,
                               headers=heads)
        self.assertLessEqual(set(statuses), {200, 502, 503})

    def test_300_posts_of_1_mib(self):
        statuses = self.attack("300 POSTs of 1 MiB", [("/a", "POST", b"x" * (1 << 20))] * 300)
        self.assertLessEqual(set(statuses), {200, 502, 503})
        self.served_again("/a", "POST", b"x" * (1 << 20))

    def test_300_posts_of_1_mib_with_span_export(self):
        sink = OTLPReceiver(self)
        node, address = self.start_node(OTEL_EXPORTER_OTLP_ENDPOINT=sink.endpoint,
                                        OTEL_EXPORTER_OTLP_PROTOCOL=sink.protocol)
        self.addCleanup(node.kill)
        statuses = self.attack("300 POSTs of 1 MiB, spans exported", [("/a", "POST", b"x" * (1 << 20))] * 300,
                               node=node, address=address)
        self.assertLessEqual(set(statuses), {200, 502, 503})


class RobustCrowdTest(unittest.TestCase):
    """Issue 11: a crowd of connections costs no thread each, probes are answered first, overload keeps the
    goodput. Figures printed; bounded in time (each part a few seconds), loopback only."""

    def setUp(self):
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < 6000 <= hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (6000, hard))
            self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))

    def node(self, **env):
        port = free_port()
        node = NodeProcess("serve", env={"HOST": "n", "PORT": str(port), "ADDRESS": "127.0.0.1",
                                         "LOG_LEVEL": "warning", **env}, port=port)
        self.addCleanup(node.kill)
        return node, port

    def test_thousands_of_idle_connections_hold_no_threads_and_probes_survive_a_mass_disconnect(self):
        node, port = self.node()
        idle_threads = process_status(node.process.pid)[0]
        socks = open_clients(port, 5000, b"GET / HTTP/1.1\r\nHost: n\r\n\r\n", batch=20)  # workers' clients
        threads, rss = process_status(node.process.pid)
        self.assertLessEqual(threads, idle_threads + 64)  # workers for 20 requests at once (+ those lingering)
        slowest_open, statuses = probe_latency(port)
        self.assertEqual(statuses, [200, 200, 200])
        for sock in socks:
            sock.close()
        slowest_after, statuses = probe_latency(port)  # right after 5,000 keep-alive clients left at once
        self.assertEqual(statuses, [200, 200, 200])
        self.assertLess(max(slowest_open, slowest_after), 1.0)
        print(f"\ncrowd: 5000 idle keep-alive connections: {threads} threads (idle node {idle_threads}), "
              f"RSS {rss >> 20} MiB; slowest probe {slowest_open * 1000:.0f} ms, right after they all closed "
              f"{slowest_after * 1000:.0f} ms", file=sys.stderr)

    def test_probes_are_answered_within_a_second_at_1024_busy_connections(self):
        node, port = self.node()
        results = {}
        load = threading.Thread(target=lambda: results.update(closed_loop(port, "/?delay=20ms", 1024, 4.0)))
        load.start()
        time.sleep(1.0)  # the scenario: the load builds up before the first probe
        latencies = []
        while load.is_alive() and len(latencies) < 20:
            slowest, statuses = probe_latency(port)
            self.assertEqual(statuses, [200, 200, 200])
            latencies.append(slowest)
            time.sleep(0.1)  # the sampling period
        load.join()
        threads = process_status(node.process.pid)[0]
        self.assertGreater(sum(results.values()), 1000)
        self.assertLess(max(latencies), 1.0, latencies)
        print(f"\ncrowd: 1024 busy connections: {sum(results.values())} answers in 4 s {results}, "
              f"{len(latencies)} probe rounds, slowest {max(latencies) * 1000:.0f} ms, {threads} threads",
              file=sys.stderr)

    def test_goodput_at_four_times_max_concurrency(self):
        node, port = self.node(MAX_CONCURRENCY="64")
        at_limit = closed_loop(port, "/?delay=300ms", 64, 3.0)
        overload = closed_loop(port, "/?delay=300ms", 256, 3.0)
        sustainable = at_limit.get(200, 0) / 3.0
        goodput = overload.get(200, 0) / 3.0
        self.assertGreater(sustainable, 64 / 0.3 * 0.6)
        self.assertGreater(goodput, sustainable * 0.75, (at_limit, overload))
        self.assertEqual(set(overload) - {200, 503}, set())
        print(f"\ncrowd: MAX_CONCURRENCY=64, 300 ms requests: {sustainable:.0f}/s at 64 connections, "
              f"{goodput:.0f}/s 200s at 256 ({overload.get(503, 0) / 3.0:.0f}/s 503s)", file=sys.stderr)


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
        wrk = subprocess.Popen(["wrk", "-t2", "-c200", f"-d{self.SECONDS:g}s", "--timeout", "30s", "--latency",
                                f"http://127.0.0.1:{port}/a/b"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        self.addCleanup(lambda: wrk.poll() is None and wrk.kill())
        time.sleep(warmup)  # the scenario: the load warms the mesh up before the first sample
        samples = [process_status(mesh.process.pid)]
        while wrk.poll() is None:
            time.sleep(min(1.0, self.SECONDS / 10))  # the sampling period
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
        wait_until(lambda: in_flight_gauge(port) >= 2, message="the slow request never arrived")  # and this one
        signalled = time.monotonic()
        process.process.send_signal(signum)
        wait_until(lambda: http_request(("127.0.0.1", port), "/readyz")[0] == 503, message="still ready")
        results["during_delay"] = http_request(("127.0.0.1", port), "/")[0]
        wait_until(lambda: not listens(port), message="the listener stayed open after SHUTDOWN_DELAY")
        thread.join()
        status = process.process.wait(10)
        return status, results, time.monotonic() - signalled, process.logs()

    def test_serve_drains_on_sigterm_and_sigint(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            with self.subTest(signal=signum.name):
                port = free_port()
                env = {"HOST": "a", "PORT": str(port), "ADDRESS": "127.0.0.1", "SHUTDOWN_DELAY": "0.3"}
                status, results, seconds, (_out, err) = self.drain(("serve",), env, port, "/?delay=1500ms", signum)
                self.assertEqual(status, 0, err)
                self.assertEqual(results["during_delay"], 200)
                slow_status, _headers, answer = results["slow"]
                self.assertEqual((slow_status, answer["delay"]), (200, 1.5))
                self.assertLess(seconds, 2.5)
                self.assertEqual(err, "")

    def test_mesh_drains_a_chain_in_flight(self):
        port = free_port()
        while any(not port_is_free(port + n) for n in range(1, 3)):
            port = free_port()
        env = {"SHUTDOWN_DELAY": "0.3"}
        status, results, _seconds, (_out, err) = self.drain(
            ("mesh", "--port", str(port), "a", "b"), env, port, "/a;delay=2500ms/b", signal.SIGTERM)
        self.assertEqual(status, 0, err)
        slow_status, _headers, answer = results["slow"]
        self.assertEqual((slow_status, hosts(answer)), (200, ["a", [["b", []]]]))
        self.assertEqual(err, "")

    def test_a_request_still_arriving_counts_as_in_flight(self):
        port = free_port()
        env = {"HOST": "a", "PORT": str(port), "ADDRESS": "127.0.0.1", "SHUTDOWN_GRACE": "5"}
        process = NodeProcess("serve", env=env, port=port)
        self.addCleanup(process.kill)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhello")
            time.sleep(0.2)  # the node reads the head (no gauge shows a request still arriving in another process)
            process.process.send_signal(signal.SIGTERM)
            time.sleep(0.8)  # the drain waits for the rest of the body, well past the old 0.2 s
            sock.sendall(b"world")
            answer = sock.recv(65536)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer)
        self.assertIn(b"Connection: close", answer)
        self.assertEqual(process.process.wait(5), 0)

    def test_grace_period_bounds_the_drain(self):
        port = free_port()
        env = {"HOST": "a", "PORT": str(port), "ADDRESS": "127.0.0.1", "SHUTDOWN_GRACE": "0.5"}
        process = NodeProcess("serve", env=env, port=port)
        self.addCleanup(process.kill)
        threading.Thread(target=lambda: raw_exchange(port, b"GET /?delay=10s HTTP/1.1\r\nHost: a\r\n\r\n", timeout=15),
                         daemon=True).start()
        time.sleep(0.2)  # the request is in: polling /metrics here would itself count in the drain's message
        started = time.monotonic()
        self.assertEqual(process.stop(signal.SIGTERM), 1)  # a request was dropped: not a clean exit
        self.assertLess(time.monotonic() - started, 2.0)
        out, err = process.logs()
        self.assertRegex(out, r"level=warning event=drop dropped=1 error=\"SHUTDOWN_GRACE=0.5s ran out")
        self.assertIn('event=stop message="draining 1 request, up to 0.5 s"', out)  # what it waits for
        self.assertEqual(err, "")

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
        wait_until(lambda: server.node.metrics.in_flight == 1, message="the request never arrived")
        stop.set()
        sm.wait_for_stop([server], stop)
        client.join()
        # The request was in flight at the stop and the hook saw none: it ran after the drain. The client's thread
        # may note its answer after the hook ran (a race of two threads, not of the drain), so order is not checked.
        self.assertCountEqual(events, [("answer", 200), ("hook", 0)])

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
        wait_until(lambda: server.draining, message="the server never started draining")
        connection.request("GET", "/")
        response = connection.getresponse()
        response.read()
        self.assertEqual((response.status, response.getheader("connection")), (200, "close"))
        connection.close()
        drainer.join(5)
        self.assertFalse(drainer.is_alive())


if __name__ == "__main__":
    unittest.main()
