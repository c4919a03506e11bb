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


def require_tool(testcase, name):
    """Skip a test whose tool is missing; in CI (CI=true) a missing tool is a failure."""
    import shutil
    if shutil.which(name) is None:
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

KNOWN_TREE = {
    "host": "a", "status": 502, "elapsed_time": 0.35, "start_time": "2026-01-01T00:00:00.000000Z",
    "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "error": "a downstream call failed", "next_node": [
        {"host": "b", "version": "v2", "status": 200, "elapsed_time": 0.2, "delay": 0.1,
         "start_time": "2026-01-01T00:00:00.001000Z", "next_node": [
             {"host": "c", "status": 200, "elapsed_time": 0.05, "start_time": "2026-01-01T00:00:00.150000Z",
              "next_node": []}]},
        {"host": "d", "url": "http://d/", "status": 502, "elapsed_time": 0.01, "error": "connection refused"}]}


class TestTreeView(unittest.TestCase):
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


class TestWaterfallLayout(unittest.TestCase):
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


class TestHtmlView(unittest.TestCase):
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


class TestViewsOverHttp(unittest.TestCase):
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


def chromium_flags(profile):
    return ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--window-size=1280,800", f"--user-data-dir={profile}"]


def read_text(path):
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except FileNotFoundError:
        return ""


class DevTools:
    """Just enough of the Chrome DevTools protocol over a stdlib WebSocket client to drive one page."""

    def __init__(self, test):
        require_tool(test, "chromium")
        import tempfile
        self.profile = tempfile.TemporaryDirectory(ignore_cleanup_errors=True)
        self.process = subprocess.Popen(["chromium", *chromium_flags(self.profile.name), "--remote-debugging-port=0",
                                         "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)  # its own group: close() ends its helpers too
        port_file = os.path.join(self.profile.name, "DevToolsActivePort")
        deadline = time.monotonic() + 20
        while not read_text(port_file).count("\n"):  # written once the browser listens
            if time.monotonic() > deadline:
                self.close()
                raise AssertionError("chromium did not open its DevTools port")
            time.sleep(0.05)
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


class TestWaterfallInChromium(unittest.TestCase):
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

# --- Span export ----------------------------------------------------------------------------------------------

# --- The node over HTTP ---------------------------------------------------------------------------------------

# --- Robustness -----------------------------------------------------------------------------------------------

# --- Command line ---------------------------------------------------------------------------------------------

class TestCallCommand(unittest.TestCase):
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


class TestLatencyHistogram(unittest.TestCase):
    def test_percentiles_within_one_percent(self):
        histogram = sm.LatencyHistogram()
        for value in range(1, 1001):
            histogram.add(value / 1000)
        for fraction, expected in ((0.5, 0.5), (0.9, 0.9), (0.99, 0.99)):
            self.assertAlmostEqual(histogram.percentile(fraction), expected, delta=expected * 0.011)
        self.assertEqual((histogram.count, histogram.max, histogram.percentile(1.0)), (1000, 1.0, 1.0))
        self.assertEqual(sm.LatencyHistogram().percentile(0.5), 0.0)
        self.assertLess(len(histogram.counts), 700)  # bounded: buckets, not samples


class TestLoadSummary(unittest.TestCase):
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


class TestLoadCommand(unittest.TestCase):
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
        self.assertEqual(result.returncode, 0)
        self.assertNotIn("\r", result.stdout)
        self.assertEqual(len([line for line in lines if " sent " in line]), 2, result.stdout)
        self.assertIn("status: 502=24", result.stdout)
        self.assertRegex(result.stdout, r"latency: p50 [\d.]+ ms  p90 [\d.]+ ms  p99 [\d.]+ ms  max [\d.]+ ms")
        result = run_cli("load", f"127.0.0.1:{free_port()}/", "--rate", "20", "--duration", "0.5s", "--json")
        self.assertEqual(json.loads(result.stdout)["codes"], {"refused": 10})

    def test_duration_0_runs_until_sigterm_and_prints_the_summary(self):
        import signal
        with Mesh({"a": {}}) as mesh:
            for signum in (signal.SIGTERM, signal.SIGINT):
                process = subprocess.Popen([sys.executable, "-I", "-S", os.path.join(HERE, "simplemesh.py"), "load",
                                            f"127.0.0.1:{mesh.port('a')}/", "--rate", "50", "--duration", "0",
                                            "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                before, deadline = sum(mesh.node("a").metrics.requests.values()), time.monotonic() + 10
                while sum(mesh.node("a").metrics.requests.values()) == before and time.monotonic() < deadline:
                    time.sleep(0.02)  # the load has started
                time.sleep(0.6)
                self.assertIsNone(process.poll())
                process.send_signal(signum)
                out, err = process.communicate(timeout=10)
                self.assertEqual(process.returncode, 0, err)
                summary = json.loads(out)
                self.assertGreaterEqual(summary["sent"], 30)
                self.assertAlmostEqual(summary["achieved_rate"], 50, delta=5)

    def test_bad_arguments(self):
        result = run_cli("load", "127.0.0.1:1/", "--rate", "0")
        self.assertEqual(result.returncode, 2)
        self.assertIn("--rate", result.stderr)
        result = run_cli("load", "127.0.0.1:1/", "--duration", "soon")
        self.assertEqual(result.returncode, 2)


# --- Packaging ------------------------------------------------------------------------------------------------


if __name__ == "__main__":
    unittest.main()
