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


def free_port(count=1):
    """A port with ``count - 1`` free ports after it, below the ephemeral range (so no client socket takes them)."""
    import random
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

class ConfigTest(unittest.TestCase):
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
                          ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"), ({"ECHO_HEADERS": "maybe"}, "ECHO_HEADERS")]:
            with self.subTest(env=env), self.assertRaisesRegex(sm.ConfigError, word):
                sm.Config.from_env(env)


# --- Route grammar --------------------------------------------------------------------------------------------

T = sm.Target


class RouteGrammarTest(unittest.TestCase):
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

    def test_ip_literals(self):
        for name in ["127.0.0.1", "127.1", "10.0.0.1", "2130706433", "0x7f000001", "0x7f.1"]:
            self.assertTrue(sm.is_ip_literal(name), name)
        for name in ["b", "b.ns.svc.cluster.local", "x1", "a-1.b2", "0xfoo"]:
            self.assertFalse(sm.is_ip_literal(name), name)


# --- Directives -----------------------------------------------------------------------------------------------

class DirectivesTest(unittest.TestCase):
    config = sm.Config(host="t")

    def test_durations_and_sizes(self):
        for text, seconds in [("200ms", 0.2), ("1.5s", 1.5), ("2m", 120), ("0.5", 0.5), (".25s", 0.25), ("3", 3)]:
            self.assertAlmostEqual(sm.parse_duration(text), seconds)
        for text in ["", "fast", "1h", "-1s", "1 s", "1e3"]:
            self.assertRaises(ValueError, sm.parse_duration, text)
        for text, size in [("512", 512), ("10k", 10240), ("2m", 2 * 1024 ** 2), ("1KB", 1024)]:
            self.assertEqual(sm.parse_size(text), size)
        self.assertRaises(ValueError, sm.parse_size, "lots")

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
        self.assertEqual(set(self.failures({"status": "503"}, {})), {None})  # ERROR_STATUS only names the code
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


# --- Trace context --------------------------------------------------------------------------------------------

# --- Outbound calls -------------------------------------------------------------------------------------------

# --- The answer and its views ---------------------------------------------------------------------------------

# --- Metrics --------------------------------------------------------------------------------------------------

# --- Span export ----------------------------------------------------------------------------------------------

# --- The node over HTTP ---------------------------------------------------------------------------------------

class NodeOverHttpTest(unittest.TestCase):
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

    def test_incoming_traceparent_is_kept(self):
        traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        with Mesh({"a": {}, "b": {}}) as mesh:
            _status, _headers, answer = mesh.request("a", "/b", headers={"traceparent": traceparent})
        self.assertEqual(answer["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736")
        self.assertEqual(answer["next_node"][0]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736")

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
            self.assertEqual((answer["delay"], answer["status"]), (0.2, 200))  # ERROR_STATUS alone fails nothing
            _s, _h, answer = mesh.request("a", "/?delay=0&error=1")
            self.assertNotIn("delay", answer)
            self.assertEqual(answer["status"], 418)

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
            status, _h, answer = mesh.request("a", "/dead~b~nosuchname.invalid")
        self.assertEqual(status, 502)
        dead, b, unknown = answer["next_node"]
        self.assertEqual((dead["host"], dead["status"]), ("dead", 502))
        self.assertIn("connection refused", dead["error"])
        self.assertTrue(dead["url"].startswith("http://dead/"))
        self.assertEqual(b["status"], 200)
        self.assertEqual((unknown["host"], unknown["status"]), ("nosuchname.invalid", 502))
        self.assertIn("cannot resolve", unknown["error"])

    def test_timeout_is_504(self):
        with Mesh({"a": {}, "b": {}}) as mesh:
            started = time.perf_counter()
            status, _h, answer = mesh.request("a", "/b;delay=2s?timeout=300ms")
            elapsed = time.perf_counter() - started
        self.assertEqual((status, answer["next_node"][0]["status"]), (504, 504))
        self.assertIn("timeout", answer["next_node"][0]["error"])
        self.assertLess(elapsed, 1.5)

    def test_reset_closes_without_an_answer(self):
        with Mesh({"a": {}, "b": {}}) as mesh:
            status, _h, answer = mesh.request("a", "/b;reset=1")
            self.assertEqual(status, 502)
            self.assertIn("reset", answer["next_node"][0]["error"])
            with self.assertRaises((http.client.RemoteDisconnected, ConnectionResetError)):
                mesh.request("b", "/?reset=1")

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
        threading.Thread(target=other.serve_forever, daemon=True).start()
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

    def test_method_and_body_are_forwarded(self):
        with Mesh({"a": {}, "b": {}}) as mesh:
            status, _h, answer = mesh.request("a", "/b?headers", method="POST", body=b'{"x": 1}',
                                              headers={"Content-Type": "application/json"})
            self.assertEqual(status, 200)
            status, _h, _text = mesh.request("a", "/b", method="HEAD")
            self.assertEqual(status, 200)
            status, _h, answer = mesh.request("a", "/b;headers", method="DELETE")
        self.assertEqual(answer["next_node"][0]["headers"].get("content-type"), None)
        self.assertEqual(status, 200)

    def test_large_body_with_expect_continue(self):
        body = b"x" * 5000
        with Mesh({"a": {}, "b": {}}) as mesh:
            with socket.create_connection(("127.0.0.1", mesh.port("a")), timeout=5) as sock:
                sock.sendall(b"POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n"
                             b"Expect: 100-continue\r\n\r\n")
                self.assertEqual(sock.recv(100), b"HTTP/1.1 100 Continue\r\n\r\n")
                sock.sendall(body)
                self.assertIn(b"200 OK", sock.recv(100))

    def test_post_body_reaches_the_last_hop(self):
        seen = []
        with Mesh({"a": {}, "b": {}}) as mesh:
            node_b = mesh.node("b")
            original = node_b.serve

            def spy(request):
                seen.append((request.method, request.body))
                return original(request)

            node_b.serve = spy
            mesh.request("a", "/b", method="PUT", body=b"payload")
        self.assertEqual(seen, [("PUT", b"payload")])

    def test_outbound_connections_are_reused(self):
        with Mesh({"a": {}, "b": {}}) as mesh:
            accepted = []
            server_b = mesh.servers["b"]
            original = server_b.process_request
            server_b.process_request = lambda request, address: (accepted.append(address), original(request, address))
            for _ in range(20):
                self.assertEqual(mesh.request("a", "/b")[0], 200)
        self.assertEqual(len(accepted), 1)

    def test_limits_refuse_before_any_call(self):
        with Mesh({"a": {}, "b": {}}, max_calls=5, max_depth=3) as mesh:
            status, _h, answer = mesh.request("a", "/b~b~b/b~b")
            self.assertEqual(status, 400)
            self.assertIn("MAX_CALLS=5", answer["error"])
            status, _h, answer = mesh.request("a", "/b/b/b/b")
            self.assertEqual(status, 400)
            self.assertIn("MAX_DEPTH=3", answer["error"])
            self.assertEqual(mesh.node("b").metrics.requests, {})  # nobody was called

    def test_bad_route_is_a_400_with_position(self):
        with Mesh({"a": {}}) as mesh:
            status, _h, answer = mesh.request("a", "/b/%28c")
            self.assertEqual(status, 400)
            self.assertEqual(answer["position"], 3)
            self.assertIn("not closed", answer["error"])
            status, _h, answer = mesh.request("a", "/b?dealy=1s")
            self.assertEqual(status, 400)
            self.assertIn("dealy", answer["error"])

    def test_refused_targets_are_403(self):
        with Mesh({"a": {}, "b": {}}, allowed_hosts=("b", "*.svc")) as mesh:
            status, _h, answer = mesh.request("a", "/127.0.0.1")
            self.assertEqual(status, 403)
            self.assertIn("ALLOW_IP_TARGETS", answer["error"])
            status, _h, answer = mesh.request("a", "/c")
            self.assertEqual((status, answer["rule"]), (403, "ALLOWED_HOSTS"))
            self.assertEqual(mesh.request("a", "/b")[0], 200)

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

    def test_runtime_defaults_make_a_sick_replica(self):
        with Mesh({"a": {}}) as mesh:
            status, _h, answer = mesh.request("a", "/-/defaults?error=1&status=503", method="POST")
            self.assertEqual((status, answer["defaults"]), (200, {"error": "1", "status": "503"}))
            self.assertEqual(mesh.request("a", "/")[0], 503)
            self.assertEqual(mesh.request("a", "/healthz")[0], 200)
            self.assertEqual(mesh.request("a", "/-/defaults?error=5", method="POST")[0], 400)
            mesh.request("a", "/-/defaults", method="DELETE")
            self.assertEqual(mesh.request("a", "/")[0], 200)

    def test_identity_and_version_fields(self):
        with Mesh({"a": {}}, version="v2", identity={"pod": "a-7f", "namespace": "demo"}) as mesh:
            _s, _h, answer = mesh.request("a", "/")
        self.assertEqual((answer["version"], answer["pod"], answer["namespace"]), ("v2", "a-7f", "demo"))

    def test_cpu_burn(self):
        with Mesh({"a": {}}) as mesh:
            before = time.process_time()
            _s, _h, answer = mesh.request("a", "/?cpu=200ms")
            burnt = time.process_time() - before
        self.assertEqual(answer["cpu"], 0.2)
        self.assertGreater(burnt, 0.19)


# --- Robustness -----------------------------------------------------------------------------------------------

# --- Command line ---------------------------------------------------------------------------------------------

class CommandLineTest(unittest.TestCase):
    def test_help_runs_on_a_bare_interpreter(self):
        for args in [("--help",), ("serve", "--help"), ("mesh", "--help")]:
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
            self.assertEqual(hosts(answer), ["gateway", [["a", [["b", [["c", []]]]]]]])
            a = answer["next_node"][0]
            self.assertGreaterEqual(a["elapsed_time"], 0.6)
            self.assertLess(a["elapsed_time"], 0.9)
        finally:
            process.send_signal(__import__("signal").SIGINT)
            out, err = process.communicate(timeout=15)
        self.assertEqual(process.returncode, 0, err)
        self.assertIn(f"curl http://localhost:{port}/a/b/c", out)
        self.assertNotIn("Traceback", err)
        self.assertIn("path=/a/b/c status=200", out)  # the access log

    def test_mesh_with_two_versions_behind_one_name(self):
        port = free_port(3)
        process = subprocess.Popen([sys.executable, "-I", "-S", os.path.join(HERE, "simplemesh.py"), "mesh",
                                    "--port", str(port), "b;version=v1", "b;version=v2"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for_port(port + 2)
            versions = {http_request(("127.0.0.1", port), "/b")[2]["next_node"][0]["version"] for _ in range(4)}
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
        access = [line for line in lines if line.get("path") == "/"]
        self.assertEqual(access[0]["trace_id"], answer["trace_id"])
        self.assertEqual(access[0]["status"], 200)


# --- Packaging ------------------------------------------------------------------------------------------------


if __name__ == "__main__":
    unittest.main()
