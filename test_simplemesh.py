"""Tests for simplemesh.py, in the order of its sections.

Pure functions are tested directly; everything else starts real nodes on loopback and sends real HTTP.
Run with ``python3 -m unittest -v`` (stdlib only); the tests that drive external tools (promtool, Prometheus,
Chromium, kubectl, opentelemetry-proto) need what ``.ci/run`` installs and fail, never skip, in CI without them.
"""

import base64
import gzip
import http.client
import http.server
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse
from dataclasses import replace

import simplemesh as sm

HERE = os.path.dirname(os.path.abspath(__file__))
IN_CI = os.environ.get("CI") == "true"


def require_tool(testcase, name):
    """Skip ``testcase`` when the tool (an executable, or a Python module for a dotted name) is missing;
    fail instead under CI=true, where .ci/run installs every tool."""
    if "." in name:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
    else:
        found = shutil.which(name) is not None
    if not found:
        message = f"{name} is not installed (.ci/run installs it)"
        if IN_CI:
            testcase.fail(message)
        testcase.skipTest(message)



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
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.address = ("127.0.0.1", self.server.server_address[1])

    def close(self):
        self.server.shutdown()
        self.server.server_close()


VALID_TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class TestW3CTraceparentRules(unittest.TestCase):
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
        self.assertIsNotNone(sm.parse_traceparent(" " + VALID_TP + "\t"))


class TestW3CTracestateRules(unittest.TestCase):
    def test_keys_values_and_order_are_kept(self):
        self.assertEqual(sm.parse_tracestate("congo=t61rcWkgMzE, rojo=00f067aa0ba902b7,tenant1@sys=v"),
                         ("congo=t61rcWkgMzE", "rojo=00f067aa0ba902b7", "tenant1@sys=v"))

    def test_empty_list_members_are_allowed(self):
        # "Empty and whitespace-only list members are allowed."
        self.assertEqual(sm.parse_tracestate("a=1,, ,b=2"), ("a=1", "b=2"))

    def test_invalid_member_discards_the_header(self):
        for bad in ("Upper=1", "a=1,b", "a=1,=2", "a=x\x01", "a=x=y", "k=" + "v" * 257, "1key=v",
                    "tenant@toolongsystemid=v", "a=1,a=2"):
            with self.subTest(bad=bad):
                self.assertEqual(sm.parse_tracestate(bad), ())

    def test_at_most_32_members(self):
        # "There can be a maximum of 32 list-members in a list."
        members = [f"k{i}=v" for i in range(33)]
        self.assertEqual(len(sm.parse_tracestate(",".join(members[:32]))), 32)
        self.assertEqual(sm.parse_tracestate(",".join(members)), ())

    def test_truncation_drops_long_members_first_then_from_the_end(self):
        # "If truncation is required, entries larger than 128 characters long SHOULD be removed first. Then
        # entries SHOULD be removed starting from the end of tracestate."
        long_member = "big=" + "x" * 130
        members = ["first=1", long_member] + [f"k{i:02d}=" + "v" * 40 for i in range(12)]
        text = sm.format_tracestate(members)
        self.assertLessEqual(len(text), 512)
        self.assertNotIn("big=", text)
        kept = text.split(",")
        self.assertEqual(kept[0], "first=1")
        self.assertEqual(kept, [m for m in members if m != long_member][:len(kept)])
        self.assertEqual(sm.format_tracestate(["a=1", "b=2"]), "a=1,b=2")


class TestB3Parsing(unittest.TestCase):
    def test_single_header(self):
        self.assertEqual(sm.parse_b3({"b3": "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90"}),
                         ("80f198ee56343ba864fe8b2a57d3eff7", "e457b5a2e4d86bd1", True, "single"))
        self.assertEqual(sm.parse_b3({"b3": "a3ce929d0e0e4736-00f067aa0ba902b7-0"})[:3],
                         ("0000000000000000a3ce929d0e0e4736", "00f067aa0ba902b7", False))
        self.assertIsNone(sm.parse_b3({"b3": "0"}))  # a sampling decision alone carries no ids
        self.assertIsNone(sm.parse_b3({"b3": "xyz-e457b5a2e4d86bd1"}))

    def test_multi_header(self):
        headers = {"x-b3-traceid": "463ac35c9f6413ad48485a3953bb6124", "x-b3-spanid": "a2fb4a1d1a96d312",
                   "x-b3-sampled": "1"}
        self.assertEqual(sm.parse_b3(headers), ("463ac35c9f6413ad48485a3953bb6124", "a2fb4a1d1a96d312", True,
                                                "multi"))
        self.assertIsNone(sm.parse_b3({"x-b3-traceid": "463ac35c9f6413ad48485a3953bb6124"}))


class TestPropagationThroughANode(unittest.TestCase):
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
        return replace(sm.TracingConfig(endpoint="http://127.0.0.1:9/v1/traces", schedule_delay=60,
                                        export_timeout=0.1), **overrides)

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
        answer, got = self.through({"b3": "463ac35c9f6413ad48485a3953bb6124-a2fb4a1d1a96d312-1"}, self.native())
        trace_id, span_id, sampled, parent = got["b3"].split("-")
        self.assertEqual((trace_id, sampled, parent), ("463ac35c9f6413ad48485a3953bb6124", "1", answer["span_id"]))
        self.assertEqual(sm.parse_traceparent(got["traceparent"])[2], span_id)
        answer, got = self.through({"x-b3-traceid": "a3ce929d0e0e4736", "x-b3-spanid": "a2fb4a1d1a96d312",
                                    "x-b3-sampled": "0"}, self.native())
        self.assertEqual(got["x-b3-traceid"], "0000000000000000a3ce929d0e0e4736")
        self.assertEqual((got["x-b3-parentspanid"], got["x-b3-sampled"]), (answer["span_id"], "0"))
        self.assertEqual(got["x-b3-spanid"], sm.parse_traceparent(got["traceparent"])[2])

    def test_native_propagators_choose_the_formats(self):
        _answer, got = self.through({}, self.native(propagators=("b3",)))
        self.assertNotIn("traceparent", got)
        self.assertEqual(len(got["b3"].split("-")), 4)


class TestSamplers(unittest.TestCase):
    def test_parent_based_follows_the_parent(self):
        tracing = sm.TracingConfig(endpoint="http://x/v1/traces", sampler="parentbased_always_off")
        self.assertTrue(tracing.sample("f" * 32, True))
        self.assertFalse(tracing.sample("f" * 32, None))
        self.assertFalse(sm.TracingConfig(endpoint="http://x", sampler="always_off").sample("f" * 32, True))

    def test_ratio_uses_the_random_part_of_the_trace_id(self):
        tracing = sm.TracingConfig(endpoint="http://x", sampler="traceidratio", ratio=0.25)
        self.assertTrue(tracing.sample("ffffffffffffffffff" + "3" + "f" * 13, None))
        self.assertFalse(tracing.sample("000000000000000000" + "4" + "0" * 13, None))
        ids = [sm.new_trace_id() for _ in range(4000)]
        self.assertAlmostEqual(sum(tracing.sample(t, None) for t in ids) / 4000, 0.25, delta=0.04)



# --- Outbound calls -------------------------------------------------------------------------------------------

# --- The answer and its views ---------------------------------------------------------------------------------

# --- Metrics --------------------------------------------------------------------------------------------------

def mixed_traffic(mesh):
    """Successes, injected failures, a failed call and a delay, so every family has samples."""
    for path in ("/b", "/b;status=503", "/b;delay=20ms", "/nowhere", "/b?view=x", "/b~b"):
        mesh.request("a", path)
    mesh.request("a", "/", method="POST", body=b"x")


class TestMetricsExposition(unittest.TestCase):
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


class TestPrometheusScrapesAMesh(unittest.TestCase):
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
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    try:
                        result = prometheus_get(port, "/api/v1/query?query=" + urllib.parse.quote(query))
                    except OSError:
                        result = []
                    if len(result) == 2:
                        break
                    time.sleep(0.2)
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


def prometheus_get(port, path):
    status, _headers, answer = http_request(("127.0.0.1", port), path, timeout=5)
    if status != 200:
        raise OSError(f"prometheus answered {status}: {answer}")
    return answer["data"] if "query_exemplars" in path else answer["data"]["result"]



# --- Span export ----------------------------------------------------------------------------------------------

class OTLPReceiver:
    """A local OTLP/HTTP collector: keeps every JSON payload posted to /v1/traces.

    ``answers`` lists (status, Retry-After or None) to give, in turn, before answering 200.
    """

    def __init__(self, answers=()):
        self.payloads = []
        self.posts = 0
        answers = list(answers)
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.posts += 1
                status, retry_after = answers.pop(0) if answers else (200, None)
                if status == 200:
                    if self.headers.get("Content-Encoding") == "gzip":
                        body = gzip.decompress(body)
                    receiver.path = self.path
                    receiver.headers = {k.lower(): v for k, v in self.headers.items()}
                    receiver.payloads.append(json.loads(body))
                self.send_response(status)
                if retry_after is not None:
                    self.send_header("Retry-After", retry_after)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def tracing(self, **overrides):
        environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"}
        return replace(sm.TracingConfig.from_env(environ), **overrides)

    def spans(self):
        """[(service name, span)] of everything received."""
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


def strict_otlp_parse(testcase, payload):
    """Parse an OTLP/HTTP JSON payload into the official ExportTraceServiceRequest, rejecting unknown fields.

    OTLP's JSON differs from proto3 JSON in one documented way: trace and span ids are hex, not base64.
    """
    require_tool(testcase, "opentelemetry.proto")
    from google.protobuf import json_format
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    payload = json.loads(json.dumps(payload))
    for resource_spans in payload["resourceSpans"]:
        for scope_spans in resource_spans["scopeSpans"]:
            for span in scope_spans["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = base64.b64encode(bytes.fromhex(span[key])).decode()
    message = json_format.Parse(json.dumps(payload), ExportTraceServiceRequest())
    for resource_spans in message.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                testcase.assertEqual((len(span.trace_id), len(span.span_id)), (16, 8))
                testcase.assertIn(len(span.parent_span_id), (0, 8))
    return message


class TestOtelEnvironment(unittest.TestCase):
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
        self.assertEqual(tracing.propagators, ("tracecontext", "baggage", "b3multi"))
        config = sm.Config.from_env({"HOST": "a", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                                     "OTEL_SERVICE_NAME": "checkout"})
        self.assertEqual(sm.node_resource(config)["service.name"], "checkout")
        config = sm.Config.from_env({"HOST": "a", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
        self.assertEqual(sm.node_resource(config)["service.name"], "a")

    def test_bad_values_are_named(self):
        for name, value in (("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"), ("OTEL_TRACES_SAMPLER", "sometimes"),
                            ("OTEL_PROPAGATORS", "xray"), ("OTEL_BSP_MAX_QUEUE_SIZE", "-1"),
                            ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")):
            environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", name: value}
            with self.subTest(name=name), self.assertRaises(sm.ConfigError) as caught:
                sm.Config.from_env(environ)
            self.assertIn(name if name != "OTEL_EXPORTER_OTLP_ENDPOINT" else "endpoint", str(caught.exception))


class TestOtlpJsonEncoding(unittest.TestCase):
    """The span writers are pure: what they write must parse strictly, whatever a client put in the request."""

    def test_spans_with_hostile_text_parse_strictly(self):
        tracing = sm.TracingConfig(endpoint="http://x/v1/traces")
        headers = sm.Headers({"host": "a:8080", "user-agent": 'evil "agent"\\\n\u00e9', "traceparent": VALID_TP,
                              "tracestate": "rojo=00f067aa0ba902b7"})
        request = sm.Request("POST", '/b/"q\u2603', "x=1&y=%22", headers, b"", 0.0, 1700000000.5)
        trace = sm.TraceContext.from_headers(headers, (), tracing)
        trace.event("simplemesh.delay", **{"simplemesh.delay_seconds": 0.25})
        trace.event("simplemesh.error", **{"http.response.status_code": 503})
        peer = sm.Peer(("10.0.0.1", 80), "b", "http://b/\"q")
        spans = [sm.server_span_json(trace, request, 503, 1700000001_000_000_000),
                 sm.client_span_json(trace, "1234567812345678", "POST", sm.Target("b"), peer, 504,
                                     'timeout after 1s "x"', 1700000000_600_000_000, 1700000000_700_000_000)]
        payload = json.loads(sm.otlp_request({"service.name": "a", "flag": True, "n": 3}, spans))
        message = strict_otlp_parse(self, payload)
        server, client = message.resource_spans[0].scope_spans[0].spans
        self.assertEqual((server.kind, client.kind), (2, 3))
        self.assertEqual(server.parent_span_id.hex(), "00f067aa0ba902b7")
        self.assertEqual(client.parent_span_id, server.span_id)
        self.assertEqual(server.trace_state, "rojo=00f067aa0ba902b7")
        self.assertEqual(server.start_time_unix_nano, 1700000000_500_000_000)
        attributes = {a.key: a.value for a in server.attributes}
        self.assertEqual(attributes["user_agent.original"].string_value, 'evil "agent"\\\n\u00e9')
        self.assertEqual(attributes["url.path"].string_value, '/b/"q\u2603')
        self.assertEqual(attributes["server.port"].int_value, 8080)
        self.assertEqual([(e.name, e.attributes[0].value.double_value or e.attributes[0].value.int_value)
                          for e in server.events], [("simplemesh.delay", 0.25), ("simplemesh.error", 503)])
        self.assertEqual((server.status.code, client.status.code, client.status.message), (2, 2, 'timeout after 1s "x"'))


class TestNativeSpans(unittest.TestCase):
    def setUp(self):
        self.receiver = OTLPReceiver()
        self.addCleanup(self.receiver.close)

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
        for payload in self.receiver.payloads:
            strict_otlp_parse(self, payload)
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
        receiver = OTLPReceiver([(503, "0"), (429, "0"), (502, None)])
        self.addCleanup(receiver.close)
        started = time.monotonic()
        with Mesh({"a": {}}, tracing=receiver.tracing()) as mesh:
            mesh.request("a", "/")
            mesh.node("a").flush_spans()
            metrics = mesh.node("a").metrics
        self.assertEqual((receiver.posts, len(receiver.spans())), (4, 1))
        self.assertEqual((metrics.span_retries, metrics.spans["exported"]), (3, 1))
        self.assertLess(time.monotonic() - started, 3)  # Retry-After: 0 twice, one backoff of at most 0.5 s

    def test_refused_export_is_counted_not_retried(self):
        receiver = OTLPReceiver([(400, None)])
        self.addCleanup(receiver.close)
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
        self.assertEqual(sorted({service for service, _span in spans}), ["a", "b", "gateway"])
        self.assertEqual({span["traceId"] for _service, span in spans}, {answer["trace_id"]})



# --- The node over HTTP ---------------------------------------------------------------------------------------

class TestJsonLogsCarryTraceIds(unittest.TestCase):
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



# --- Robustness -----------------------------------------------------------------------------------------------

# --- Command line ---------------------------------------------------------------------------------------------

# --- Packaging ------------------------------------------------------------------------------------------------


if __name__ == "__main__":
    unittest.main()
