#!/usr/bin/env python3
"""Side-by-side benchmark of simplemesh against its reference peers on loopback.

Every node runs as its own process; implementations alternate A B A B over --rounds because
a small shared machine is noisy. Load comes from wrk when installed, else from a stdlib driver.
See README.md for what is measured and what the targets mean. Standard library only.
"""
import argparse
import contextlib
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

HERE = Path(__file__).resolve().parent
RATIO_CONCURRENCY = 16
SATURATION = 256  # the closed-loop fairness row: this many connections at one node
LATE_SECONDS = 2.0  # an answer later than this counts as late (wrk's default timeout)
WRK_TIMEOUT = "10s"  # slow peers should show up as slow (and counted late), not as wrk timeouts
START_TIMEOUT = 60.0  # fastapi imports take seconds on a busy 2-core machine
STOP_GRACE = 3.0

# scenario -> (node names, path requested at the first node, implementations that can run it, extra concurrency)
# mesh3 is `simplemesh mesh a b c` (a gateway and three nodes from one command), requested at the gateway.
SCENARIOS = {
    "chain3": (["a", "b", "c"], "/b/c", ["simplemesh", "simplemesh-otlp", "fastapi", "nginx"], ()),
    "single": (["a"], "/", ["simplemesh", "simplemesh-script", "floor"], (SATURATION,)),
    "fanout3": (["a", "b", "c", "d"], "/b~c~d", ["simplemesh", "fastapi"], ()),
    "mesh3": (["gateway", "a", "b", "c"], "/a/b/c", ["mesh-procs", "mesh-one"], ()),
}
IMPLEMENTATIONS = ("simplemesh", "fastapi", "floor", "nginx")
MESH_IMPLEMENTATIONS = {"mesh-procs": [], "mesh-one": ["--one-process"]}

CHILDREN = []  # every Popen still running, so an exception or a signal can never leak a process
NGINX_DIRS = []


class StartError(Exception):
    pass


# ---------------------------------------------------------------- processes


class Ports:
    """Hands out bindable ports counting up from --base-port, below the ephemeral range so no client takes them."""

    def __init__(self, base):
        self.next = base

    def take(self):
        while self.next < 65536:
            port = self.next
            self.next += 1
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))  # no SO_REUSEADDR: also skips ports with stale TIME_WAITs
                    return port
                except OSError:
                    continue
        raise StartError("no free port left")

    def take_run(self, count):
        """``count`` consecutive bindable ports (the mesh command takes --port and the next ones)."""
        while True:
            ports = [self.take()]
            while len(ports) < count and self.take() == ports[-1] + 1:
                ports.append(ports[-1] + 1)
            if len(ports) == count:
                return ports


def wait_ready(port, proc, spawned, err_path, daemonizes=False, path="/"):
    """Poll GET path until the first 200; return seconds from spawn to that answer."""
    while time.monotonic() - spawned < START_TIMEOUT:
        if proc.poll() is not None and (proc.returncode != 0 or not daemonizes):
            raise StartError(f"exited with {proc.returncode} before answering:\n{tail(err_path)}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            conn.close()
            if resp.status == 200:
                return time.monotonic() - spawned
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.005)  # the start-up figure is good to 5 ms
    raise StartError(f"no 200 on port {port} within {START_TIMEOUT:.0f}s:\n{tail(err_path)}")


def tail(path, lines=15):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop_procs(procs):
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + STOP_GRACE
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc in CHILDREN:
            CHILDREN.remove(proc)


def children_of(pid):
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def process_gone(pid):
    """True when pid has exited (a daemon's zombie counts as exited)."""
    try:
        return "\tZ" in Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].split("\n", 1)[0]
    except (OSError, IndexError):
        return True


def stop_nginx(prefix):
    pid_file = prefix / "nginx.pid"
    master = int(pid_file.read_text()) if pid_file.exists() else None
    # -c is needed too: without it -s reads the system nginx.conf and signals the system nginx
    subprocess.run(["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-s", "stop"],
                   capture_output=True, timeout=10, check=False)
    deadline = time.monotonic() + STOP_GRACE
    while master and not process_gone(master) and time.monotonic() < deadline:
        time.sleep(0.05)
    if master and not process_gone(master):
        for pid in children_of(master) + [master]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    if prefix in NGINX_DIRS:
        NGINX_DIRS.remove(prefix)


def cleanup():
    stop_procs(list(CHILDREN))
    for prefix in list(NGINX_DIRS):
        stop_nginx(prefix)


def rss_kb(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def time_wait(ports):
    """(TIME_WAIT sockets on loopback, those on either side of a connection to one of `ports`)."""
    loopback = ours = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] != "06":  # 06 = TCP_TIME_WAIT
                continue
            (local_ip, local), (_, remote) = (f.split(":") for f in fields[1:3])
            # 127.x.x.x is stored little-endian ("0100007F"), also at the end of ::ffff:127.0.0.1; ::1 ends "01000000"
            loopback += local_ip.endswith("7F") or local_ip == "0" * 24 + "01000000"
            ours += int(local, 16) in ports or int(remote, 16) in ports
    return loopback, ours


class Node:
    """One serving process tree: a Python node, or nginx's master and workers."""

    def __init__(self, name, pids, err_path, proc=None):
        self.name, self.pids, self.err_path, self.proc = name, pids, err_path, proc

    def exit_status(self):
        """None while it runs, else its exit code (negative: killed by that signal)."""
        if self.proc is not None:
            return self.proc.poll()
        return "gone" if process_gone(self.pids[0]) else None


class Deployment:
    """The processes of one implementation serving one scenario."""

    def __init__(self, impl, scenario, ctx):
        self.impl, self.scenario, self.ctx = impl, scenario, ctx
        self.procs = []  # every Popen, including nginx's launcher script
        self.nodes = []
        self.startup_s = []
        self.ports = set()
        self.nginx_prefix = None
        self.url = ""

    def spawn(self, name, cmd, env, port, daemonizes=False, path="/"):
        err_path = self.ctx.workdir / f"{self.impl}-{self.scenario}-{name}-{port}.stderr"
        with open(err_path, "wb") as err:
            spawned = time.monotonic()
            # stdout (the access log) goes to /dev/null: it is still formatted and written.
            # A new session keeps the terminal's Ctrl-C away: the bench stops its children itself.
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err, start_new_session=True, cwd=self.ctx.module_dir)
        CHILDREN.append(proc)
        self.procs.append(proc)
        self.startup_s.append(wait_ready(port, proc, spawned, err_path, daemonizes, path))
        if not daemonizes:
            self.nodes.append(Node(name, [proc.pid], err_path, proc))
        return err_path

    def start(self):
        names, path, _, _ = SCENARIOS[self.scenario]
        if self.impl in MESH_IMPLEMENTATIONS:
            self.start_mesh(names, path)
            return
        ports = [self.ctx.ports.take() for _ in names]
        self.ports.update(ports)
        self.url = f"http://127.0.0.1:{ports[0]}" + ("/" if self.impl == "nginx" else path)
        if self.impl == "nginx":
            self.start_nginx(ports)
            return
        peers = ",".join(f"{n}=127.0.0.1:{p}" for n, p in zip(names, ports))
        cmd, extra = self.ctx.command(self.impl)
        if self.impl == "simplemesh-otlp":
            self.ports.add(self.ctx.sink_port)  # an exporter that reconnects per batch shows as TIME_WAIT
        # Nodes start one after the other, so each start-up figure is not inflated by its siblings.
        for name, port in zip(names, ports):
            env = clean_env()
            env.update(HOST=name, PORT=str(port), ADDRESS="127.0.0.1", PEERS=peers, **extra)
            self.spawn(name, cmd, env, port)

    def start_mesh(self, names, path):
        """One `simplemesh mesh` command; ready when the whole route answers through the gateway."""
        ports = self.ctx.ports.take_run(len(names))
        self.ports.update(ports)
        self.url = f"http://127.0.0.1:{ports[0]}{path}"
        cmd = self.ctx.command("simplemesh")[0][:-1] + ["mesh", "--port", str(ports[0]), "--address", "127.0.0.1",
                                                        *names[1:], *MESH_IMPLEMENTATIONS[self.impl]]
        self.spawn("mesh", cmd, {**clean_env(), **self.ctx.extra_env}, ports[0], path=path)

    def start_nginx(self, ports):
        self.nginx_prefix = self.ctx.workdir / f"nginx-{ports[0]}"
        NGINX_DIRS.append(self.nginx_prefix)
        cmd = ["sh", str(self.ctx.peers / "nginx_chain.sh"), str(self.nginx_prefix)] + [str(p) for p in ports]
        err_path = self.spawn("chain", cmd, clean_env(), ports[0], daemonizes=True)
        master = int((self.nginx_prefix / "nginx.pid").read_text())
        self.nodes.append(Node("nginx", [master] + children_of(master), err_path))

    def dead_node(self):
        """Why a node is no longer running, or None."""
        for node in self.nodes:
            status = node.exit_status()
            if status is not None:
                return f"node {node.name} exited ({status}) during the run:\n{tail(node.err_path)}"
        return None

    def rss_mb(self):
        """Mean resident memory per node, in MB."""
        per_node = [sum(rss_kb(pid) for pid in node.pids) for node in self.nodes]
        return statistics.mean(per_node) / 1024 if per_node else 0.0

    def stop(self):
        stop_procs(self.procs)
        if self.nginx_prefix:
            stop_nginx(self.nginx_prefix)


def clean_env():
    # The user's OTEL_* variables must not turn span export on in the "export off" measurements.
    return {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}


# ---------------------------------------------------------------- load drivers


def run_wrk(url, concurrency, duration):
    cmd = ["wrk", "-t", str(min(concurrency, 2)), "-c", str(concurrency), "-d", f"{duration}s",
           "--timeout", WRK_TIMEOUT, "-s", str(HERE / "wrk_report.lua"), url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30, check=False)
    line = next((l for l in out.stdout.splitlines() if l.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary (exit {out.returncode}): {out.stderr.strip() or out.stdout}")
    s = json.loads(line.split(" ", 1)[1])
    return {"requests": s["requests"], "seconds": s["duration_us"] / 1e6,
            "p50_ms": s["p50_us"] / 1000, "p99_ms": s["p99_us"] / 1000,
            "late": s["late"] + s["timeout"],  # answered after LATE_SECONDS, or not within WRK_TIMEOUT
            "non2xx": s["status"],  # wrk counts statuses >= 400
            "socket_errors": s["connect"] + s["read"] + s["write"] + s["timeout"]}


def run_python(url, concurrency, duration):
    """Fallback driver: one keep-alive connection per thread. It is GIL-bound: compare only with itself."""
    parts = urllib.parse.urlsplit(url)
    deadline = time.monotonic() + duration
    results = []

    def worker():
        latencies, non2xx, errors, conn = [], 0, 0, None
        while (started := time.monotonic()) < deadline:
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
                conn.request("GET", parts.path or "/")
                resp = conn.getresponse()
                resp.read()
                latencies.append(time.monotonic() - started)
                non2xx += not 200 <= resp.status < 300
            except (OSError, http.client.HTTPException):
                errors += 1
                if conn:
                    conn.close()
                conn = None
                time.sleep(0.01)  # do not spin on a dead server
        if conn:
            conn.close()
        results.append((latencies, non2xx, errors))

    began = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 15)
    seconds = time.monotonic() - began
    latencies = sorted(x for lat, _, _ in results for x in lat)

    def pct(p):
        return latencies[min(len(latencies) - 1, int(len(latencies) * p / 100))] * 1000 if latencies else 0.0

    return {"requests": len(latencies), "seconds": seconds, "p50_ms": pct(50), "p99_ms": pct(99),
            "late": sum(1 for x in latencies if x > LATE_SECONDS),
            "non2xx": sum(r[1] for r in results), "socket_errors": sum(r[2] for r in results)}


# ---------------------------------------------------------------- context and measurement


class Context:
    """Paths and options shared by every deployment."""

    def __init__(self, args, workdir):
        self.args = args
        self.workdir = workdir
        self.peers = Path(args.peers).resolve()
        # The module laid out as the image lays it out: a copy with its bytecode compiled once, beforehand
        # (the Dockerfile's bytecode stage), so `-m simplemesh` starts without compiling; the script form
        # compiles at every start whatever is beside it.
        self.module_dir = workdir / "image"
        self.module_dir.mkdir()
        self.simplemesh = self.module_dir / "simplemesh.py"
        shutil.copyfile(args.simplemesh, self.simplemesh)
        subprocess.run([sys.executable, "-m", "compileall", "-q", "--invalidation-mode", "unchecked-hash",
                        str(self.module_dir)], check=True, timeout=60)
        self.fastapi_python = args.fastapi_python
        self.ports = Ports(args.base_port)
        self.sink_port = None
        self.extra_env = dict(kv.split("=", 1) for kv in args.env)
        self.load = run_wrk if args.driver == "wrk" else run_python

    def command(self, impl):
        """Command line and extra env of a Python node (started in the directory of the simplemesh copy).

        simplemesh runs as the image runs it, ``python3 -E -s -S -m simplemesh`` with precompiled bytecode;
        ``simplemesh-script`` as ``python3 simplemesh.py``, which compiles the module at every start and where
        CPython keeps the whole script's syntax tree for the life of the process. floor.py gets the same flags.
        """
        flags = [sys.executable, "-B", "-E", "-s", "-S"]
        as_module = flags + ["-m", "simplemesh", "serve"]
        if impl == "simplemesh":
            return as_module, self.extra_env
        if impl == "simplemesh-script":
            return flags + [str(self.simplemesh), "serve"], self.extra_env
        if impl == "simplemesh-otlp":
            return as_module, {**self.extra_env, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.sink_port}"}
        if impl == "fastapi":
            return [self.fastapi_python, str(self.peers / "fastapi_seed.py")], {}
        return [sys.executable, "-B", "-E", "-s", "-S", str(self.peers / "floor.py")], {}  # floor reads PORT only

    def sink_posts(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.sink_port, timeout=5)
        conn.request("GET", "/stats")
        posts = json.loads(conn.getresponse().read())["posts"]
        conn.close()
        return posts


def measure(ctx, impl, scenario, rnd, runs, deployments):
    args = ctx.args
    dep = Deployment(impl, scenario, ctx)
    try:
        dep.start()
        time.sleep(1.0)  # idle means settled: read RSS a second after the first answer, for every implementation
        record = {"implementation": impl, "scenario": scenario, "round": rnd,
                  "startup_ms": statistics.median(dep.startup_s) * 1000, "rss_idle_mb": dep.rss_mb()}
        posts_before = ctx.sink_posts() if impl == "simplemesh-otlp" else 0
        ctx.load(dep.url, max(args.concurrency), 1)  # warm-up: fill the keep-alive pools, not measured
        for c in args.concurrency + list(SCENARIOS[scenario][3]):
            _, tw_before = time_wait(dep.ports)
            r = ctx.load(dep.url, c, args.duration)
            tw_loopback, tw_after = time_wait(dep.ports)
            run = {"implementation": impl, "scenario": scenario, "concurrency": c, "round": rnd,
                   "rps": r["requests"] / r["seconds"] if r["seconds"] else 0.0,
                   "errors": r["non2xx"] + r["socket_errors"], "time_wait_loopback": tw_loopback,
                   "time_wait_new": max(0, tw_after - tw_before), "ports": len(dep.ports),
                   # a node that died mid-run would otherwise look like a slow one
                   "node_died": dep.dead_node(), **r}
            runs.append(run)
            print(f"  round {rnd} {impl:16} {scenario:8} c={c:<3} {run['rps']:9.0f} req/s  "
                  f"p50 {run['p50_ms']:7.2f} ms  p99 {run['p99_ms']:7.2f} ms  late {run['late']}  errors {run['errors']}  "
                  f"TIME_WAIT +{run['time_wait_new']}", flush=True)
            if run["node_died"]:
                raise RuntimeError(run["node_died"])
        record["rss_after_mb"] = dep.rss_mb()
        if impl == "simplemesh-otlp":
            record["otlp_posts"] = ctx.sink_posts() - posts_before
            if not record["otlp_posts"]:
                print("  WARNING: span export was on but the OTLP sink received nothing", flush=True)
        deployments.append(record)
        print(f"  round {rnd} {impl:16} {scenario:8} start-up {record['startup_ms']:.0f} ms, RSS idle "
              f"{record['rss_idle_mb']:.1f} MB, after load {record['rss_after_mb']:.1f} MB (per node)", flush=True)
        return True
    except (StartError, RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        print(f"  round {rnd} {impl} {scenario}: FAILED: {e}", flush=True)
        return False
    finally:
        dep.stop()


def measure_startups(ctx, impls, count):
    """Start-up to the first answer, ``count`` times per implementation, alternating A B A B (one node each):
    the start-up row is a ratio of medians of these, so one slow start on a busy machine cannot decide it."""
    samples = {impl: [] for impl in impls}
    for _ in range(count):
        for impl in impls:
            dep = Deployment(impl, "single", ctx)
            try:
                dep.start()
                samples[impl].append(dep.startup_s[0] * 1000)
            except (StartError, OSError) as e:
                print(f"  start-up {impl}: FAILED: {e}", flush=True)
            finally:
                dep.stop()
    for impl, ms in samples.items():
        if ms:
            print(f"  start-up {impl:16} median {statistics.median(ms):.0f} ms of {len(ms)}: "
                  + " ".join(f"{m:.0f}" for m in ms), flush=True)
    return {impl: statistics.median(ms) for impl, ms in samples.items() if ms}


# ---------------------------------------------------------------- report


def order(impl, scenario):
    """Sort key: the scenarios and implementations in the order they run."""
    return list(SCENARIOS).index(scenario), SCENARIOS[scenario][2].index(impl)


def summarize(runs, deployments):
    rows, groups = [], {}
    for run in (r for r in runs if not r["node_died"]):  # a dead node's figures are not the implementation's
        groups.setdefault((run["implementation"], run["scenario"], run["concurrency"]), []).append(run)
    for (impl, scenario, c), rs in sorted(groups.items(), key=lambda g: (*order(*g[0][:2]), g[0][2])):
        rps = [r["rps"] for r in rs]
        median = statistics.median(rps)
        rows.append({"implementation": impl, "scenario": scenario, "concurrency": c, "rps": median,
                     "spread_pct": 100 * (max(rps) - min(rps)) / median if median else 0.0,
                     "p50_ms": statistics.median(r["p50_ms"] for r in rs),
                     "p99_ms": statistics.median(r["p99_ms"] for r in rs),
                     # fairness: the worst round's tail ratio, and every late answer of every round
                     "tail_ratio": max(r["p99_ms"] / r["p50_ms"] if r["p50_ms"] else 0.0 for r in rs),
                     "late": sum(r.get("late", 0) for r in rs),
                     "errors": sum(r["errors"] for r in rs),
                     "time_wait_new": max(r["time_wait_new"] for r in rs)})
    deps = {}
    for d in deployments:
        deps.setdefault((d["implementation"], d["scenario"]), []).append(d)
    dep_rows = [{"implementation": impl, "scenario": scenario,
                 **{k: statistics.median(d[k] for d in ds) for k in ("startup_ms", "rss_idle_mb", "rss_after_mb")}}
                for (impl, scenario), ds in sorted(deps.items(), key=lambda d: order(*d[0]))]
    return rows, dep_rows


def targets(rows, dep_rows, runs, deployments, startups):
    def get(table, key, impl, scenario, c=None):
        for row in table:
            if (row["implementation"], row["scenario"]) == (impl, scenario) and row.get("concurrency") == c:
                return row[key]
        return None

    def ratio(a, b):
        return a / b if a is not None and b else None

    def per_round_min(impl_a, impl_b, scenario, c):
        """The smallest ratio of one round's a to the same round's b (a target met "in every round")."""
        ratios = [ratio(a["rps"], b["rps"]) for a in runs for b in runs
                  if (a["implementation"], b["implementation"]) == (impl_a, impl_b) and a["round"] == b["round"]
                  and a["scenario"] == b["scenario"] == scenario and a["concurrency"] == b["concurrency"] == c]
        return min(ratios) if ratios else None

    c, sat = RATIO_CONCURRENCY, SATURATION
    checks = [
        (f"3-hop chain c={c} req/s simplemesh/fastapi", ">=", 8.0,
         ratio(get(rows, "rps", "simplemesh", "chain3", c), get(rows, "rps", "fastapi", "chain3", c))),
        (f"single node c={c} req/s simplemesh/floor", ">=", 0.85,
         ratio(get(rows, "rps", "simplemesh", "single", c), get(rows, "rps", "floor", "single", c))),
        (f"single node c={sat} simplemesh p99/p50 (worst round)", "<=", 4.0,
         get(rows, "tail_ratio", "simplemesh", "single", sat)),
        (f"single node c={sat} simplemesh answers > {LATE_SECONDS:g} s", "==", 0,
         get(rows, "late", "simplemesh", "single", sat)),
        (f"mesh a b c c={c} req/s processes/one process", ">=", 1.5,
         ratio(get(rows, "rps", "mesh-procs", "mesh3", c), get(rows, "rps", "mesh-one", "mesh3", c))),
        (f"3-hop chain c={c} export on/off (worst round)", ">=", 0.9,
         per_round_min("simplemesh-otlp", "simplemesh", "chain3", c)),
        ("idle RSS simplemesh/floor", "<=", 1.1,
         ratio(get(dep_rows, "rss_idle_mb", "simplemesh", "single"), get(dep_rows, "rss_idle_mb", "floor", "single"))),
        ("start-up simplemesh/floor (median of alternating starts)", "<=", 1.3,
         ratio(startups.get("simplemesh"), startups.get("floor"))),
    ]
    if any(r["implementation"] == "simplemesh-script" for r in runs):  # for reference: `python3 simplemesh.py`
        checks += [
            ("(python3 simplemesh.py) idle RSS script/floor", "<=", 1.3,
             ratio(get(dep_rows, "rss_idle_mb", "simplemesh-script", "single"),
                   get(dep_rows, "rss_idle_mb", "floor", "single"))),
            ("(python3 simplemesh.py) start-up script/floor", "<=", 1.5,
             ratio(get(dep_rows, "startup_ms", "simplemesh-script", "single"),
                   get(dep_rows, "startup_ms", "floor", "single"))),
        ]
    results = [{"target": name, "op": op, "limit": limit, "value": value,
                "verdict": "SKIP" if value is None else
                "PASS" if (value >= limit if op == ">=" else value <= limit if op == "<=" else value == limit)
                else "FAIL"}
               for name, op, limit, value in checks]
    if any(d.get("otlp_posts") == 0 for d in deployments):
        # without spans reaching the sink, "export on" measured nothing
        results[5].update(verdict="FAIL", note="no span reached the OTLP sink")
    mine = [r for r in runs if r["implementation"].startswith(("simplemesh", "mesh-")) and not r["node_died"]]
    errors = sum(r["errors"] for r in mine)
    # Allowance: the load driver's own connections closing at the end of a run, plus 1% of requests.
    piled = [r for r in mine if r["time_wait_new"] > r["concurrency"] * r["ports"] + r["requests"] / 100]
    results.append({"target": "simplemesh errors", "op": "==", "limit": 0, "value": errors,
                    "verdict": "SKIP" if not mine else "PASS" if errors == 0 else "FAIL"})
    results.append({"target": "simplemesh runs with a TIME_WAIT pile-up", "op": "==", "limit": 0,
                    "value": len(piled), "verdict": "SKIP" if not mine else "PASS" if not piled else "FAIL"})
    return results


def print_report(rows, dep_rows, checks):
    print("\nimplementation   scenario  conc     req/s  spread   p50 ms   p99 ms  p99/p50   late  errors  TIME_WAIT+")
    for r in rows:
        print(f"{r['implementation']:16} {r['scenario']:8} {r['concurrency']:5} {r['rps']:9.0f} {r['spread_pct']:6.1f}% "
              f"{r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['tail_ratio']:8.1f} {r['late']:6} {r['errors']:7} "
              f"{r['time_wait_new']:10}")
    print("\nimplementation   scenario  start-up ms  RSS idle MB  RSS after MB   (median per node)")
    for d in dep_rows:
        print(f"{d['implementation']:16} {d['scenario']:8} {d['startup_ms']:12.0f} {d['rss_idle_mb']:12.1f} "
              f"{d['rss_after_mb']:13.1f}")
    print()
    for t in checks:
        value = "n/a" if t["value"] is None else f"{t['value']:.2f}" if isinstance(t["value"], float) else t["value"]
        note = f"  {t['note']}" if "note" in t else ""
        print(f"{t['verdict']:4}  {t['target']:48} {value:>8}  (target {t['op']} {t['limit']}){note}")


# ---------------------------------------------------------------- main


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--simplemesh", default=str(HERE.parent / "simplemesh.py"), help="path of simplemesh.py")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VAL", help="extra env for simplemesh nodes")
    p.add_argument("--peers", default=str(HERE.parent.parent / "shared" / "peers"),
                   help="directory of the reference peers (default: ../shared/peers beside the checkout)")
    p.add_argument("--fastapi-python", help="Python of a venv with requirements-fastapi.txt "
                   "(default: bench/.venv, created when missing)")
    p.add_argument("--only", default=",".join(IMPLEMENTATIONS), help="implementations to run (comma list)")
    p.add_argument("--otlp", action=argparse.BooleanOptionalAction, default=None,
                   help="also run simplemesh with span export to a local sink (default: on, off with --quick)")
    p.add_argument("--script", action="store_true", help="also run `python3 simplemesh.py` (start-up and RSS)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--starts", type=int, default=7, help="alternating start-ups per implementation for the "
                   "start-up row (default 7, --quick 3)")
    p.add_argument("--duration", type=int, default=5, help="seconds per measurement")
    p.add_argument("--concurrency", default="16", help="comma list of concurrency levels (c=256 is always run at one node)")
    p.add_argument("--quick", action="store_true",
                   help="1 round of 2 s at concurrency 16; skip fastapi if its venv is missing")
    p.add_argument("--driver", choices=("auto", "wrk", "python"), default="auto")
    # benches running at the same time on one machine rarely share ports with a pid-derived default
    p.add_argument("--base-port", type=int, default=20000 + 100 * (os.getpid() % 120),
                   help="first port to use (default: 20000 + 100 x (pid mod 120))")
    p.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.duration, args.concurrency, args.starts = 1, 2, "16", 3
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.only = [i.strip() for i in args.only.split(",") if i.strip()]
    unknown = set(args.only) - set(IMPLEMENTATIONS)
    if unknown:
        p.error(f"unknown implementation(s): {', '.join(sorted(unknown))}")
    if any("=" not in kv for kv in args.env):
        p.error("--env takes KEY=VAL")
    if args.duration < 1 or args.rounds < 1 or min(args.concurrency) < 1:
        p.error("--duration, --rounds and --concurrency must be >= 1")
    if args.driver == "auto":
        args.driver = "wrk" if shutil.which("wrk") else "python"
    return args


def select(args):
    """Implementations that can run here; explain any that are skipped."""
    chosen = list(args.only)
    if "simplemesh" in chosen and not Path(args.simplemesh).exists():
        sys.exit(f"{args.simplemesh} not found: give --simplemesh PATH or leave it out with --only")
    if "nginx" in chosen and not shutil.which("nginx"):
        print("note: nginx is not installed, skipping it")
        chosen.remove("nginx")
    if "fastapi" in chosen and args.fastapi_python and not Path(args.fastapi_python).exists():
        sys.exit(f"{args.fastapi_python} not found")
    if "fastapi" in chosen and not args.fastapi_python:
        venv_python = HERE / ".venv" / "bin" / "python"
        if not venv_python.exists():
            if args.quick:
                print("note: bench/.venv is missing, skipping fastapi (--quick)")
                chosen.remove("fastapi")
            else:
                print("creating bench/.venv for the fastapi peer ...", flush=True)
                subprocess.run([sys.executable, "-m", "venv", str(HERE / ".venv")], check=True, timeout=300)
                subprocess.run([str(venv_python), "-m", "pip", "install", "-q", "-r",
                                str(Path(args.peers) / "requirements-fastapi.txt")], check=True, timeout=900)
        args.fastapi_python = str(venv_python)
    if "simplemesh" in chosen and args.script:
        chosen.append("simplemesh-script")
    if "simplemesh" in chosen and (args.otlp if args.otlp is not None else not args.quick):
        chosen.append("simplemesh-otlp")
    if "simplemesh" in chosen:
        help_text = subprocess.run([sys.executable, args.simplemesh, "mesh", "--help"], capture_output=True,
                                   text=True, timeout=60, check=False).stdout
        if "--one-process" in help_text:
            chosen += list(MESH_IMPLEMENTATIONS)
        else:  # an older simplemesh: its mesh command is one process, with no flag to say so
            print("note: this simplemesh has no `mesh --one-process`: mesh3 runs its one-process mesh only")
            MESH_IMPLEMENTATIONS["mesh-one"] = []
            chosen.append("mesh-one")
    return chosen


def machine():
    return {"cpus": os.cpu_count(), "loadavg": Path("/proc/loadavg").read_text().split()[:3],
            "python": platform.python_version(), "kernel": platform.release()}


def main():
    args = parse_args()
    chosen = select(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally: below on kill too
    workdir = Path(tempfile.mkdtemp(prefix="simplemesh-bench-"))
    ctx = Context(args, workdir)
    runs, deployments, failed = [], [], []
    print(f"driver {args.driver}, rounds {args.rounds}, {args.duration}s per run, concurrency {args.concurrency}, "
          f"implementations {', '.join(chosen)}; machine {machine()}", flush=True)
    if os.getloadavg()[0] > (os.cpu_count() or 1) / 2:
        print("note: the machine is already busy (load average above half the CPUs): expect noisy figures")
    try:
        if "simplemesh-otlp" in chosen:
            ctx.sink_port = ctx.ports.take()
            Deployment("otlp-sink", "sink", ctx).spawn(
                "sink", [sys.executable, str(HERE / "otlp_sink.py"), str(ctx.sink_port)], clean_env(), ctx.sink_port)
        for rnd in range(1, args.rounds + 1):
            for scenario, (_, _, impls, _) in SCENARIOS.items():
                for impl in impls:
                    if impl in chosen and not measure(ctx, impl, scenario, rnd, runs, deployments):
                        failed.append((impl, scenario, rnd))
        startups = measure_startups(ctx, [i for i in ("simplemesh", "floor") if i in chosen], args.starts)
    finally:
        cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    rows, dep_rows = summarize(runs, deployments)
    checks = targets(rows, dep_rows, runs, deployments, startups)
    print_report(rows, dep_rows, checks)
    if failed:
        print("FAILED:", ", ".join(f"{impl} {scenario} round {rnd}" for impl, scenario, rnd in failed))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "config": vars(args), "implementations": chosen, "machine": machine(),
            "runs": runs, "deployments": deployments, "summary": rows, "startup_memory": dep_rows,
            "startup_median_ms": startups,
            "targets": checks, "failed": [list(f) for f in failed]}, indent=2))
    if failed:
        return 1
    return 1 if args.strict and any(t["verdict"] == "FAIL" for t in checks) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("interrupted; every process the bench started has been stopped")
