#!/usr/bin/env python3
"""simple-mesh: one program that plays every service of a test service mesh.

The URL path is the route. A request for ``http://a/b/c`` makes node ``a`` call ``http://b/c``, which
calls ``http://c/``; every answer nests the answers of the calls below it, so one ``curl`` shows the whole
call tree with its timings. ``/b~c/d`` fans out, ``/(b/d)~(c/e)`` draws any tree, and per-hop directives
(``/b;delay=200ms;error=0.5/c``) inject latency and faults exactly where they should happen.

Standard library only, one module: copy it into any pod that has Python 3.11 and run it.

    python3 simplemesh.py mesh 'a;delay=0.5' 'b;delay=1' 'c;delay=1.5'
    curl localhost:9090/a/b/c

The module reads top to bottom in the order a request flows: configuration, route grammar, directives,
trace context, outbound calls, the answer, metrics, the HTTP handler and server, the command line.
"""

import argparse
import bisect
import fnmatch
import json
import os
import random
import re
import select
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
import traceback
import http.client
from http import HTTPStatus
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

__version__ = "0.1.0"


# --- Configuration -----------------------------------------------------------------------------------------
# Everything a node is told comes from its environment (SPEC 2, 4, 6, 8), read once at start-up into a frozen
# Config. A bad value stops the program with a clear message instead of surfacing on the first request.

class ConfigError(ValueError):
    """A setting that cannot be used; the message names the variable."""


def parse_bool(text):
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parse_peers(text):
    """``PEERS="a=127.0.0.1:9091,b=127.0.0.1:9092|127.0.0.1:9093"`` -> {name: [(host, port), ...]}.

    Several addresses for one name (``|``) are used in turn: that is how ``mesh`` puts a v1 and a v2 behind a name.
    """
    peers = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, addresses = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"expected name=host:port, got {item!r}")
        targets = []
        for address in addresses.split("|"):
            host, sep, port = address.strip().rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"expected host:port for {name.strip()!r}, got {address!r}")
            targets.append((host, int(port)))
        peers[name.strip().lower()] = targets
    return peers


@dataclass(frozen=True)
class Config:
    host: str = "localhost"
    port: int = 9090
    address: str = "0.0.0.0"
    version: str = ""
    upstream_port: int = 80
    peers: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)  # directive defaults from the environment, raw text by name
    allow_directives: bool = True
    allow_ip_targets: bool = False
    allowed_hosts: tuple = ()
    forward_headers: tuple = ()
    max_calls: int = 100
    max_depth: int = 16
    max_delay: float = 60.0
    max_cpu: float = 5.0
    max_size: int = 10 * 1024 * 1024
    max_timeout: float = 300.0
    max_body: int = 1024 * 1024
    max_upstream_body: int = 16 * 1024 * 1024
    max_concurrency: int = 512
    keepalive_timeout: float = 75.0
    shutdown_delay: float = 0.0
    shutdown_grace: float = 30.0
    log_format: str = "text"
    log_level: str = "info"
    identity: dict = field(default_factory=dict)  # pod, namespace, ip, node from the downward API

    @classmethod
    def from_env(cls, environ, **overrides):
        """Build a Config from environment variables; ``overrides`` win (the ``mesh`` command uses them)."""
        settings = {}

        def read(name, attr, convert):
            raw = environ.get(name)
            if raw is None or raw == "":
                return
            try:
                settings[attr] = convert(raw)
            except ValueError as error:
                raise ConfigError(f"{name}={raw!r}: {error}") from None

        positive_int = _positive(int)
        read("HOST", "host", str)
        read("PORT", "port", _port)
        read("ADDRESS", "address", str)
        read("VERSION", "version", str)
        read("UPSTREAM_PORT", "upstream_port", _port)
        read("PEERS", "peers", parse_peers)
        read("ALLOW_DIRECTIVES", "allow_directives", parse_bool)
        read("ALLOW_IP_TARGETS", "allow_ip_targets", parse_bool)
        read("ALLOWED_HOSTS", "allowed_hosts", _word_list)
        read("FORWARD_HEADERS", "forward_headers", lambda text: tuple(w.lower() for w in _word_list(text)))
        read("MAX_CALLS", "max_calls", positive_int)
        read("MAX_DEPTH", "max_depth", positive_int)
        read("MAX_DELAY", "max_delay", parse_duration)
        read("MAX_CPU", "max_cpu", parse_duration)
        read("MAX_SIZE", "max_size", parse_size)
        read("MAX_TIMEOUT", "max_timeout", parse_duration)
        read("MAX_BODY", "max_body", parse_size)
        read("MAX_UPSTREAM_BODY", "max_upstream_body", parse_size)
        read("MAX_CONCURRENCY", "max_concurrency", positive_int)
        read("KEEPALIVE_TIMEOUT", "keepalive_timeout", _positive(parse_duration))
        read("SHUTDOWN_DELAY", "shutdown_delay", parse_duration)
        read("SHUTDOWN_GRACE", "shutdown_grace", parse_duration)
        read("LOG_FORMAT", "log_format", _choice("text", "json"))
        read("LOG_LEVEL", "log_level", _choice("debug", "info", "warning", "error"))
        if "host" not in settings:
            settings["host"] = socket.gethostname()
        defaults = {}
        for directive in DIRECTIVES.values():
            raw = environ.get(directive.env)
            if raw and directive.name == "parallel":  # FANOUT=parallel|sequential
                if raw.lower() not in ("parallel", "sequential"):
                    raise ConfigError(f"FANOUT={raw!r}: expected parallel or sequential")
                raw = "true" if raw.lower() == "parallel" else "false"
            if raw:
                defaults[directive.name] = raw
        settings["defaults"] = defaults
        settings["identity"] = {key: environ[var] for key, var in IDENTITY_ENV.items() if environ.get(var)}
        settings.update(overrides)
        config = cls(**settings)
        try:
            Directives.resolve(config, config.defaults, {})
        except DirectiveError as error:
            raise ConfigError(f"{DIRECTIVES[error.name].env}: {error}") from None
        return config


IDENTITY_ENV = {"pod": "POD_NAME", "namespace": "POD_NAMESPACE", "ip": "POD_IP", "node": "NODE_NAME"}


def _port(text):
    port = int(text)
    if not 0 <= port < 65536:
        raise ValueError("not a port number")
    return port


def _positive(convert):
    def positive(text):
        value = convert(text)
        if value <= 0:
            raise ValueError("must be above zero")
        return value
    return positive


def _choice(*choices):
    def choose(text):
        if text.lower() not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return text.lower()
    return choose


def _word_list(text):
    return tuple(filter(None, (word.strip() for word in text.replace(" ", ",").split(","))))


def _status_code(text):
    code = int(text)
    if not 400 <= code <= 599:
        raise ValueError("a failure status is 400 to 599")
    return code


# --- Route grammar -----------------------------------------------------------------------------------------
# SPEC 1. The path is parsed by a pure function into Targets and Groups; a fault raises RouteError with its
# position (an offset into the decoded path, the leading "/" being 0). plan_calls() turns a parsed route into
# the calls one node makes, and route_size() counts the whole tree before anything is sent.

class RouteError(ValueError):
    def __init__(self, message, position):
        super().__init__(message)
        self.message = message
        self.position = position


@dataclass(frozen=True)
class Target:
    """One hop: a name, an optional port and that hop's directives as (key, value-or-None) pairs."""
    name: str
    port: int = None
    directives: tuple = ()

    def address_text(self):
        return self.name if self.port is None else f"{self.name}:{self.port}"

    def query(self):
        return "&".join(key if value is None else f"{key}={value}" for key, value in self.directives)


@dataclass(frozen=True)
class Group:
    """A parenthesised sub-route; the rest of the outer route is appended to it."""
    steps: tuple


NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.")
DIGITS = frozenset("0123456789")  # str.isdigit() also takes other scripts' digits
VALUE_END = frozenset("/~();")
# Directive text travels on in the next hop's URL, so only printable ASCII may pass: no space, CR/LF or NUL.
NOT_URL_TEXT_RE = re.compile(r"[^!-~]")
MAX_NESTING = 32


def parse_route(path):
    """Parse a decoded path (``/b;delay=1s~c/d``) into a tuple of steps; a step is a tuple of branches."""
    if not path.startswith("/"):
        raise RouteError("the path must start with '/'", 0)
    if path == "/":
        return ()
    return _RouteParser(path).parse()


class _RouteParser:
    def __init__(self, text):
        self.text = text
        self.pos = 1  # after the leading "/"
        self.nesting = 0

    def peek(self):
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def parse(self):
        steps = self.route()
        if self.pos < len(self.text):
            char = self.peek()
            if char == ")":
                raise RouteError("unbalanced parenthesis: ')' has no '('", self.pos)
            raise RouteError(f"unexpected character {char!r}", self.pos)
        return steps

    def route(self):
        steps = [self.step()]
        while self.peek() == "/":
            self.pos += 1
            if self.peek() in ("", ")"):
                break  # one trailing slash is allowed
            steps.append(self.step())
        return tuple(steps)

    def step(self):
        branches = [self.branch()]
        while self.peek() == "~":
            self.pos += 1
            branches.append(self.branch())
        return tuple(branches)

    def branch(self):
        if self.peek() != "(":
            return self.target()
        start = self.pos
        self.nesting += 1
        if self.nesting > MAX_NESTING:
            raise RouteError(f"parentheses nested deeper than {MAX_NESTING}", start)
        self.pos += 1
        steps = self.route()
        if self.peek() != ")":
            raise RouteError("unbalanced parenthesis: '(' is not closed", start)
        self.pos += 1
        self.nesting -= 1
        return Group(steps)

    def target(self):
        start = self.pos
        text = self.text
        while self.pos < len(text) and text[self.pos] in NAME_CHARS:
            self.pos += 1
        if self.pos == start:
            char = self.peek()
            if char in ("", "/", "~", ")"):
                raise RouteError("empty step: a name is missing here", start)
            raise RouteError(f"unexpected character {char!r}: names are letters, digits, '-' and '.'", start)
        name = text[start:self.pos].lower()
        problem = name_problem(name)
        if problem:
            raise RouteError(f"bad name {name!r}: {problem}", start)
        port = None
        if self.peek() == ":":
            self.pos += 1
            port_start = self.pos
            while self.pos < len(text) and text[self.pos] in DIGITS:
                self.pos += 1
            digits = text[port_start:self.pos]
            if not digits or len(digits) > 5 or not 0 < int(digits) < 65536:
                raise RouteError("bad port: expected a number from 1 to 65535", port_start)
            port = int(digits)
        directives = []
        while self.peek() == ";":
            self.pos += 1
            key_start = self.pos
            while self.pos < len(text) and text[self.pos] not in VALUE_END and text[self.pos] != "=":
                self.pos += 1
            key = text[key_start:self.pos].lower()
            value = None
            if self.peek() == "=":
                self.pos += 1
                value_start = self.pos
                while self.pos < len(text) and text[self.pos] not in VALUE_END:
                    self.pos += 1
                value = text[value_start:self.pos]
            bad = NOT_URL_TEXT_RE.search(text, key_start, self.pos)
            if bad:
                raise RouteError(f"unexpected character {bad.group()!r} in a directive", bad.start())
            try:
                check_directive(key, value)
            except DirectiveError as error:
                raise RouteError(str(error), key_start) from None
            directives.append((key, value))
        return Target(name, port, tuple(directives))


def name_problem(name):
    """Why ``name`` is not a DNS name (labels of a-z 0-9 '-', dot-separated, at most 253 characters), or None."""
    if len(name) > 253:
        return "longer than 253 characters"
    for label in name.split("."):
        if not label:
            return "empty label"
        if not NAME_RE.fullmatch(label):
            return f"label {label!r} is not 1-63 of a-z 0-9 '-' (no '-' at either end)"
    return None


def is_ip_literal(name):
    """True for names the resolver would read as an IPv4 address (``127.0.0.1``, ``127.1``, ``0x7f000001``).

    No top-level domain is all-numeric, so a numeric or hex last label can only be an address.
    """
    last = name.rsplit(".", 1)[-1]
    return last.isdigit() or (last.startswith("0x") and all(c in "0123456789abcdef" for c in last[2:]))


def format_route(steps):
    """The inverse of parse_route, without the leading "/": what a node sends on as the rest of the route."""
    return "/".join("~".join(_format_branch(branch) for branch in step) for step in steps)


def _format_branch(branch):
    if isinstance(branch, Group):
        return "(" + format_route(branch.steps) + ")"
    text = branch.address_text()
    for key, value in branch.directives:
        text += f";{key}" if value is None else f";{key}={value}"
    return text


def plan_calls(steps):
    """The calls a node makes for ``steps``: a list of (Target, rest-of-route) in order."""
    if not steps:
        return []
    first, rest = steps[0], steps[1:]
    calls = []
    for branch in first:
        if isinstance(branch, Group):
            calls.extend(plan_calls(branch.steps + rest))
        else:
            calls.append((branch, rest))
    return calls


def route_size(steps, max_calls, max_depth):
    """(calls, depth) of the whole tree below a node, stopping early once either limit is passed.

    Counting stops as soon as the total passes ``max_calls``, so even a route that would expand exponentially
    costs at most ``max_calls`` steps to refuse.
    Likewise it never looks deeper than ``max_depth``: below that a lower bound (one more hop) is enough to refuse,
    and a route of thousands of steps costs no deep recursion.
    """
    total = 0
    depth = 0
    for _target, rest in plan_calls(steps):
        if not rest:
            calls, below = 0, 0
        elif max_depth <= 1:
            calls, below = 1, 1
        else:
            calls, below = route_size(rest, max_calls - total - 1, max_depth - 1)
        total += 1 + calls
        depth = max(depth, 1 + below)
        if total > max_calls or depth > max_depth:
            break
    return total, depth


# --- Directives --------------------------------------------------------------------------------------------
# SPEC 2. A directive is written as text in three places (the environment, a query string, a route's matrix
# parameter) and always validated by the same parser. Directives.resolve() merges a node's defaults with what a
# request asked for, checks the caps, and gives the typed values the handler acts on.

class DirectiveError(ValueError):
    def __init__(self, message, name=None):
        super().__init__(message)
        self.name = name


DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m)?")
SIZE_RE = re.compile(r"(\d+)([kmg]?)b?", re.IGNORECASE)
DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}
SIZE_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}


def parse_duration(text):
    """``200ms``, ``1.5s``, ``2m`` or a plain number of seconds -> seconds as a float."""
    match = DURATION_RE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"bad duration {text!r} (examples: 200ms, 1.5s, 2m, 0.5)")
    return float(match.group(1)) * DURATION_UNITS[match.group(2)]


def parse_size(text):
    """``10k``, ``2m`` or a plain number of bytes -> bytes (k = 1024)."""
    match = SIZE_RE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"bad size {text!r} (examples: 512, 10k, 1m)")
    return int(match.group(1)) * SIZE_UNITS[match.group(2).lower()]


def parse_probability(text):
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"bad probability {text!r} (a number from 0 to 1)") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"bad probability {text!r} (a number from 0 to 1)")
    return value


def parse_weighted(text, parse_value):
    """``v1:p1,v2:p2`` -> ((v1, p1), (v2, p2)); the probabilities add up to at most 1."""
    choices = []
    for item in text.split(","):
        value, sep, weight = item.rpartition(":")
        if not sep:
            raise ValueError(f"bad weighted list {text!r}: every item is value:probability")
        choices.append((parse_value(value), parse_probability(weight)))
    if sum(weight for _value, weight in choices) > 1.0 + 1e-9:
        raise ValueError(f"bad weighted list {text!r}: the probabilities add up to more than 1")
    return tuple(choices)


@dataclass(frozen=True)
class Delay:
    """A delay distribution: fixed (low == high), uniform in [low, high], or weighted choices."""
    low: float = 0.0
    high: float = 0.0
    choices: tuple = ()

    @property
    def maximum(self):
        return max([self.high] + [value for value, _weight in self.choices])

    def sample(self, rng):
        if self.choices:
            draw = rng.random()
            for value, weight in self.choices:
                draw -= weight
                if draw < 0:
                    return value
            return 0.0
        return self.low if self.low == self.high else rng.uniform(self.low, self.high)


def parse_delay(text):
    """``200ms``, ``100ms..300ms`` (uniform) or ``10ms:0.9,2s:0.1`` (weighted; the rest of the time, none)."""
    if ".." in text:
        low, _, high = text.partition("..")
        low, high = parse_duration(low), parse_duration(high)
        if low > high:
            raise ValueError(f"bad delay range {text!r}: the low end is above the high end")
        return Delay(low, high)
    if ":" in text:
        return Delay(choices=parse_weighted(text, parse_duration))
    value = parse_duration(text)
    return Delay(value, value)


def parse_status(text):
    """``503`` (always) or ``503:0.2,429:0.1`` (each at its probability) -> ((code, weight-or-None), ...)."""
    if ":" in text:
        return parse_weighted(text, _status_code)
    return ((_status_code(text), None),)


@dataclass(frozen=True)
class Directive:
    name: str
    env: str
    parse: object  # text -> value; flags take None for "on"
    cap: object = None  # value -> (limit, Config attribute name) to check, or None
    flag: bool = False


def _flag(text):
    return True if text is None else parse_bool(text)


DIRECTIVES = {d.name: d for d in (
    Directive("delay", "DELAY", parse_delay, lambda v, c: (v.maximum, c.max_delay, "MAX_DELAY")),
    Directive("error", "ERROR_RATE", parse_probability),
    Directive("status", "ERROR_STATUS", parse_status),
    Directive("reset", "RESET_RATE", parse_probability),
    Directive("size", "RESPONSE_SIZE", parse_size, lambda v, c: (v, c.max_size, "MAX_SIZE")),
    Directive("cpu", "CPU", parse_duration, lambda v, c: (v, c.max_cpu, "MAX_CPU")),
    Directive("timeout", "UPSTREAM_TIMEOUT", _positive(parse_duration),
              lambda v, c: (v, c.max_timeout, "MAX_TIMEOUT")),
    Directive("parallel", "FANOUT", _flag, flag=True),
    Directive("headers", "ECHO_HEADERS", _flag, flag=True),
)}


def check_directive(key, value):
    """Parse one directive's text, raising DirectiveError; returns the typed value (caps are checked later)."""
    directive = DIRECTIVES.get(key)
    if directive is None:
        raise DirectiveError(f"unknown directive {key!r} (known: {', '.join(DIRECTIVES)})", key)
    if value is None and not directive.flag:
        raise DirectiveError(f"directive {key!r} needs a value ({key}=...)", key)
    try:
        return directive.parse(value)
    except ValueError as error:
        raise DirectiveError(f"{key}: {error}", key) from None


@dataclass(frozen=True)
class Directives:
    """The typed directives one request runs with."""
    delay: Delay = None
    error: float = None  # None: ``status`` alone decides (SPEC 2)
    status: tuple = ()
    reset: float = 0.0
    size: int = 0
    cpu: float = 0.0
    timeout: float = 30.0
    parallel: bool = False
    headers: bool = False

    @classmethod
    def resolve(cls, config, defaults, requested):
        """Merge node defaults (raw text, as in the environment) with a request's (raw text) and check caps."""
        values = {}
        for source in (defaults, requested):
            for key, text in source.items():
                value = check_directive(key, text)
                cap = DIRECTIVES[key].cap
                if cap:
                    amount, limit, variable = cap(value, config)
                    if amount > limit:
                        raise DirectiveError(f"{key}={text} is above the limit {variable}={limit:g}", key)
                values[key] = value
        if "status" in requested and "error" not in requested:
            values["error"] = None
        elif "error" not in values:
            values["error"] = 0.0
        return cls(**values)

    def failure_status(self, rng):
        """The status of the injected failure this request gets, or None."""
        if self.error is None:  # status alone: always, or each code at its probability
            draw = rng.random()
            for code, weight in self.status:
                if weight is None:
                    return code
                draw -= weight
                if draw < 0:
                    return code
            return None
        if not self.error or rng.random() >= self.error:
            return None
        if not self.status:
            return 500
        if len(self.status) == 1:
            return self.status[0][0]
        return _weighted_pick(self.status, rng)


def _weighted_pick(choices, rng):
    total = sum(weight or 0 for _value, weight in choices) or 1.0
    draw = rng.random() * total
    for value, weight in choices:
        draw -= weight or 0
        if draw < 0:
            return value
    return choices[-1][0]


def split_query(query):
    """A query string into {key: raw text or None}; ``view`` is taken out, being no directive."""
    directives = {}
    for item in query.split("&"):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = unquote(key).lower()
        directives[key] = unquote(value) if sep else None
    return directives


def burn_cpu(seconds):
    """Keep one core busy for ``seconds`` of wall time (visible in CPU metrics and autoscalers)."""
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        for _ in range(1000):
            n = (n * 1103515245 + 12345) & 0x7FFFFFFF
    return n


# --- Trace context -----------------------------------------------------------------------------------------
# SPEC 5. In mesh-only mode a node passes the trace headers it got straight on, so the sidecar's inbound span is
# the parent of its outbound span; it only starts a trace (and so invents a span id) when none arrived.

TRACEPARENT_RE = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
PROPAGATED_HEADERS = (
    "traceparent", "tracestate", "baggage",
    "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags",
    "x-request-id", "x-ot-span-context", "x-cloud-trace-context", "grpc-trace-bin", "sw8",
    "x-datadog-trace-id", "x-datadog-parent-id", "x-datadog-sampling-priority", "x-datadog-origin",
)


def new_trace_id():
    return f"{random.getrandbits(128) or 1:032x}"


def new_span_id():
    return f"{random.getrandbits(64) or 1:016x}"


def parse_traceparent(value):
    """(version, trace_id, parent_id, flags) of a valid W3C traceparent, or None."""
    if not value:
        return None
    match = TRACEPARENT_RE.fullmatch(value.strip())
    if not match:
        return None
    version, trace_id, parent_id, flags, rest = match.groups()
    if version == "ff" or trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    if version == "00" and rest:
        return None
    return version, trace_id, parent_id, flags


@dataclass
class TraceContext:
    """What a node knows of the trace a request belongs to, and the headers it sends onward."""
    trace_id: str
    span_id: str
    outbound: dict

    @classmethod
    def from_headers(cls, headers, forward_headers=()):
        outbound = {}
        for name in PROPAGATED_HEADERS + tuple(forward_headers):
            value = headers.get(name)
            if value is not None:
                outbound[name] = value
        parsed = parse_traceparent(headers.get("traceparent"))
        if parsed:
            return cls(parsed[1], parsed[2], outbound)
        trace_id, span_id = new_trace_id(), new_span_id()
        outbound.pop("tracestate", None)  # a tracestate without its traceparent belongs to no trace
        outbound["traceparent"] = f"00-{trace_id}-{span_id}-01"
        return cls(trace_id, span_id, outbound)


# --- Outbound calls ----------------------------------------------------------------------------------------
# SPEC 1, 3. One keep-alive connection pool per peer address, so a hop costs one request and no TCP handshake.
# A call never raises: whatever happens (refused, reset, timeout, garbage) becomes a record in the caller's tree.

class ConnectionPool:
    """Idle keep-alive connections by (host, port). A connection is taken out while in use, then put back."""

    def __init__(self, max_idle_per_peer=256):
        self.idle = {}
        self.lock = threading.Lock()
        self.max_idle_per_peer = max_idle_per_peer

    def take(self, address, timeout):
        with self.lock:
            stack = self.idle.get(address)
            while stack:
                connection = stack.pop()
                if _still_open(connection.sock):
                    connection.sock.settimeout(timeout)
                    return connection
                connection.close()
        return http.client.HTTPConnection(address[0], address[1], timeout=timeout)

    def give_back(self, address, connection):
        with self.lock:
            stack = self.idle.setdefault(address, [])
            if len(stack) < self.max_idle_per_peer:
                stack.append(connection)
                return
        connection.close()

    def close(self):
        with self.lock:
            for stack in self.idle.values():
                for connection in stack:
                    connection.close()
            self.idle.clear()


def _still_open(sock):
    """False when the peer has closed an idle connection (it is readable: EOF or stray bytes)."""
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


@dataclass
class Peer:
    """Where one call goes: the address to connect to and the Host header the mesh routes by."""
    address: tuple
    host_header: str
    url: str


class Resolver:
    """Names to addresses: the PEERS map first (a local mesh), else the name itself on UPSTREAM_PORT (DNS)."""

    def __init__(self, peers, upstream_port):
        self.peers = peers
        self.upstream_port = upstream_port
        self.turn = {}
        self.lock = threading.Lock()

    def resolve(self, target, rest_text, query):
        addresses = self.peers.get(target.address_text()) or self.peers.get(target.name)
        if addresses:
            with self.lock:
                turn = self.turn.get(target.name, 0)
                self.turn[target.name] = turn + 1
            address = addresses[turn % len(addresses)]
        else:
            address = (target.name, target.port or self.upstream_port)
        path = "/" + rest_text + ("?" + query if query else "")
        host_header = target.address_text()
        return Peer(address, host_header, f"http://{host_header}{path}"), path


class CallFailed(Exception):
    """A call that got no simplemesh answer; ``status`` is what the caller records (502, or 504 for a timeout)."""

    def __init__(self, message, status=502, code=None):
        super().__init__(message)
        self.status = status
        self.code = code  # the HTTP status received, if any


class Deadlines:
    """Enforces a call's total timeout: a socket timeout bounds each read, not the call, so a peer trickling a
    byte now and then could hold a caller forever. One thread for the process shuts down the socket of any call
    (or inbound request) that outlives its deadline. It looks at least once a second, so that watching a
    deadline further away than its next look costs no wake-up (most requests are done long before theirs).
    """

    def __init__(self):
        self.watched = {}  # id(entry) -> entry: [deadline, socket or http.client connection, expired]
        self.wake = threading.Condition()
        self.next_check = 0.0
        self.thread = None

    def watch(self, connection, timeout):
        entry = [time.monotonic() + timeout, connection, False]
        with self.wake:
            self.watched[id(entry)] = entry
            if self.thread is None:
                self.thread = threading.Thread(target=self.run, name="deadlines", daemon=True)
                self.thread.start()
            if entry[0] < self.next_check:
                self.wake.notify()
        return entry

    def release(self, entry):
        """Stop watching; True if the deadline had passed (the call was cut short)."""
        with self.wake:
            self.watched.pop(id(entry), None)
        return entry[2]

    def run(self):
        with self.wake:
            while True:
                now = time.monotonic()
                self.next_check = now + 1.0
                for key, entry in list(self.watched.items()):
                    if entry[0] > now:
                        self.next_check = min(self.next_check, entry[0])
                        continue
                    del self.watched[key]
                    entry[2] = True
                    sock = getattr(entry[1], "sock", entry[1])
                    if sock is not None:
                        try:
                            sock.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                self.wake.wait(self.next_check - now)


DEADLINES = Deadlines()


def call_peer(pool, peer, path, method, body, headers, timeout, max_answer):
    """One HTTP call on a pooled connection -> (status, content type, answer bytes), within ``timeout`` in all.

    Raises CallFailed, never anything else: whatever the peer does becomes a record in the caller's tree.
    """
    connection = pool.take(peer.address, timeout)
    watch = DEADLINES.watch(connection, timeout)
    try:
        status, content_type, data, reusable = _exchange(connection, peer, path, method, body, headers, max_answer)
    except Exception as error:
        expired = DEADLINES.release(watch)
        connection.close()
        if expired or isinstance(error, TimeoutError):
            raise CallFailed(f"timeout after {timeout:g}s", 504) from None
        if isinstance(error, CallFailed):
            raise
        raise _call_failure(error, peer) from None
    if DEADLINES.release(watch):
        connection.close()
        raise CallFailed(f"timeout after {timeout:g}s", 504)
    if reusable:
        pool.give_back(peer.address, connection)
    else:
        connection.close()
    return status, content_type, data


def _exchange(connection, peer, path, method, body, headers, max_answer):
    connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    connection.putheader("Host", peer.host_header)
    for name, value in headers.items():
        connection.putheader(name, value)
    if body or method in ("POST", "PUT", "PATCH"):
        connection.putheader("Content-Length", str(len(body)))
    connection.endheaders(body or None)
    response = connection.getresponse()
    length = response.getheader("content-length")
    if length and length.isascii() and length.isdigit() and (len(length) > 18 or int(length) > max_answer):
        raise CallFailed(f"answer of {length} bytes is above MAX_UPSTREAM_BODY={max_answer}", code=response.status)
    data = response.read(max_answer + 1) if method != "HEAD" else b""
    if len(data) > max_answer:
        raise CallFailed(f"answer is above MAX_UPSTREAM_BODY={max_answer} bytes", code=response.status)
    reusable = not response.will_close and not response.fp
    return response.status, response.getheader("content-type", ""), data, reusable


def _call_failure(error, peer):
    """The CallFailed for an exception raised by a call (the peer refused, reset, or answered garbage)."""
    if isinstance(error, ConnectionRefusedError):
        return CallFailed("connection refused")
    if isinstance(error, socket.gaierror):
        return CallFailed(f"cannot resolve {peer.address[0]!r}: {error.strerror}")
    if isinstance(error, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
        return CallFailed("connection reset before an answer")
    if isinstance(error, http.client.IncompleteRead):
        return CallFailed(f"connection closed mid-answer, after {len(error.partial)} bytes")
    if isinstance(error, (http.client.BadStatusLine, http.client.LineTooLong)):
        return CallFailed(f"the answer is not HTTP: {type(error).__name__}: {str(error)[:100]}")
    return CallFailed(f"{type(error).__name__}: {str(error)[:200]}")


def child_record(target, url, status, content_type, data, method, elapsed):
    """The record of one call: the callee's own answer when it gave one, else one written by the caller."""
    if method == "HEAD":
        record = {"host": target.name, "url": url, "status": status, "elapsed_time": round(elapsed, 6)}
        if status >= 400:
            record["error"] = f"answered {status}"
        return record
    if "json" in content_type:
        try:
            answer = json.loads(data)
        except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
            answer = None
        if isinstance(answer, dict) and "host" in answer:
            return answer
    snippet = data[:200].decode("utf-8", "replace").strip()
    return {"host": target.name, "url": url, "status": status, "elapsed_time": round(elapsed, 6),
            "error": f"answered {status} without a simplemesh answer" + (f": {snippet}" if snippet else "")}


# --- The answer --------------------------------------------------------------------------------------------
# SPEC 3. A node's record is a plain dict (field names of the original kept) so every view renders the same tree.

def iso_time(epoch):
    """RFC 3339 UTC with microseconds, cached per second (formatting dominates otherwise)."""
    seconds = int(epoch)
    cached = _ISO_CACHE
    if cached[0] != seconds:
        cached[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        cached[0] = seconds
    return f"{cached[1]}.{int((epoch - seconds) * 1e6):06d}Z"


_ISO_CACHE = [None, ""]


def node_status(own_failure, children):
    """SPEC 3: the injected failure if one fired; else 502 (504 for a timeout) if a call failed; else 200."""
    if own_failure:
        return own_failure
    worst = 200
    for child in children:
        status = child.get("status")
        if not isinstance(status, int) or status >= 400:
            if status == 504 or child.get("timeout"):
                return 504
            worst = 502
    return worst


def pad_record(record, size):
    """Grow the record with a ``padding`` field so its JSON is about ``size`` bytes."""
    missing = size - len(json.dumps(record)) - len(', "padding": ""')
    if missing > 0:
        record["padding"] = "x" * missing
    return record


def error_answer(host, status, message, **extra):
    """A 4xx/5xx answer that still reads as a node record, so it nests in a caller's tree."""
    record = {"host": host, "status": status, "error": message}
    record.update(extra)
    return record


# --- Metrics -----------------------------------------------------------------------------------------------
# SPEC 4. Hand-written Prometheus text exposition. Labels stay bounded: codes, methods, kinds and at most
# MAX_TARGET_LABELS target names; any further target is counted as "other".

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
MAX_TARGET_LABELS = 50


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = {}  # (method, code) -> count
        self.request_buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.request_sum = 0.0
        self.calls = {}  # (target, code) -> count
        self.call_histograms = {}  # target -> [buckets..., sum]
        self.faults = {}  # kind -> count
        self.in_flight = 0
        self.start_time = time.time()

    def target_label(self, name):
        if name in self.call_histograms or len(self.call_histograms) < MAX_TARGET_LABELS:
            return name
        return "other"

    def observe_request(self, method, code, seconds):
        key = (method, code)
        with self.lock:
            self.requests[key] = self.requests.get(key, 0) + 1
            self.request_buckets[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
            self.request_sum += seconds

    def observe_call(self, target, code, seconds):
        with self.lock:
            label = self.target_label(target)
            key = (label, code)
            self.calls[key] = self.calls.get(key, 0) + 1
            histogram = self.call_histograms.get(label)
            if histogram is None:
                histogram = self.call_histograms[label] = [0] * (len(DURATION_BUCKETS) + 1) + [0.0]
            histogram[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
            histogram[-1] += seconds

    def count_fault(self, kind):
        with self.lock:
            self.faults[kind] = self.faults.get(kind, 0) + 1

    def render(self):
        """The Prometheus text format (version 0.0.4)."""
        with self.lock:
            requests = dict(self.requests)
            request_buckets = list(self.request_buckets)
            request_sum = self.request_sum
            calls = dict(self.calls)
            call_histograms = {k: list(v) for k, v in self.call_histograms.items()}
            faults = dict(self.faults)
            in_flight = self.in_flight
        out = []
        family(out, "simplemesh_http_requests", "counter", "Requests answered, by method and status code.")
        for (method, code), count in sorted(requests.items()):
            out.append(f'simplemesh_http_requests_total{{method="{method}",code="{code}"}} {count}')
        family(out, "simplemesh_http_request_duration_seconds", "histogram",
               "Time from receiving a request to answering it, downstream calls included.")
        histogram_lines(out, "simplemesh_http_request_duration_seconds", "", request_buckets, request_sum)
        family(out, "simplemesh_calls", "counter",
               "Downstream calls, by target and status code (error: no HTTP answer; timeout).")
        for (target, code), count in sorted(calls.items()):
            out.append(f'simplemesh_calls_total{{target="{target}",code="{code}"}} {count}')
        family(out, "simplemesh_call_duration_seconds", "histogram", "Duration of downstream calls, by target.")
        for target, histogram in sorted(call_histograms.items()):
            histogram_lines(out, "simplemesh_call_duration_seconds", f'target="{target}",',
                            histogram[:-1], histogram[-1])
        family(out, "simplemesh_in_flight_requests", "gauge", "Requests being served now.")
        out.append(f"simplemesh_in_flight_requests {in_flight}")
        family(out, "simplemesh_faults", "counter", "Injected faults, by kind.")
        for kind in ("delay", "error", "reset", "cpu"):
            out.append(f'simplemesh_faults_total{{kind="{kind}"}} {faults.get(kind, 0)}')
        process_metrics(out, self.start_time)
        return "\n".join(out) + "\n"


def family(out, name, kind, help_text):
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")


def histogram_lines(out, name, labels, buckets, total):
    running = 0
    for bound, count in zip(DURATION_BUCKETS, buckets):
        running += count
        out.append(f'{name}_bucket{{{labels}le="{bound}"}} {running}')
    running += buckets[-1]
    out.append(f'{name}_bucket{{{labels}le="+Inf"}} {running}')
    label_set = "{" + labels.rstrip(",") + "}" if labels else ""
    out.append(f"{name}_sum{label_set} {total}")
    out.append(f"{name}_count{label_set} {running}")


def process_metrics(out, start_time):
    """The standard process_* family, read from /proc where there is one."""
    times = os.times()
    family(out, "process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.")
    out.append(f"process_cpu_seconds_total {times.user + times.system}")
    family(out, "process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.")
    out.append(f"process_start_time_seconds {start_time}")
    try:
        with open("/proc/self/statm") as statm:
            pages = statm.read().split()
        page = os.sysconf("SC_PAGE_SIZE")
        family(out, "process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.")
        out.append(f"process_virtual_memory_bytes {int(pages[0]) * page}")
        family(out, "process_resident_memory_bytes", "gauge", "Resident memory size in bytes.")
        out.append(f"process_resident_memory_bytes {int(pages[1]) * page}")
        family(out, "process_open_fds", "gauge", "Number of open file descriptors.")
        out.append(f"process_open_fds {len(os.listdir('/proc/self/fd'))}")
    except OSError:
        pass
    family(out, "process_threads", "gauge", "Number of OS threads in the process.")
    out.append(f"process_threads {threading.active_count()}")


# --- The node ----------------------------------------------------------------------------------------------
# What one node does with one request, apart from sockets: directives applied, calls made, record built.
# The handler below only turns bytes into a Request and a record into bytes.

@dataclass
class Request:
    method: str
    path: str  # decoded
    query: str
    headers: object  # case-insensitive .get()
    body: bytes = b""
    received: float = 0.0  # perf_counter at receipt
    received_wall: float = 0.0


@dataclass
class Outcome:
    """What the handler sends: a status, a JSON-able record (or raw text) and what to log."""
    status: int
    record: dict = None
    text: str = None
    content_type: str = "application/json"
    reset: bool = False
    extra_headers: tuple = ()
    trace_id: str = ""
    targets: tuple = ()


class Node:
    """One simple-mesh node: its configuration, runtime defaults, connection pool and metrics."""

    def __init__(self, config):
        self.config = config
        self.defaults = dict(config.defaults)
        self.base_directives = Directives.resolve(config, self.defaults, {})
        self.pool = ConnectionPool()
        self.resolver = Resolver(config.peers, config.upstream_port)
        self.metrics = Metrics()
        self.ready = True
        self.rng = random.Random()
        self.started = time.time()
        self.lock = threading.Lock()
        self.on_stop = []  # callables run once the node has drained (span export flushes here)

    # Runtime controls (SPEC 4): a "sick replica" whose probes stay healthy.
    def set_defaults(self, requested):
        merged = dict(self.defaults)
        merged.update(requested)
        directives = Directives.resolve(self.config, merged, {})
        with self.lock:
            self.defaults, self.base_directives = merged, directives

    def reset_defaults(self):
        with self.lock:
            self.defaults = dict(self.config.defaults)
            self.base_directives = Directives.resolve(self.config, self.defaults, {})

    def serve(self, request):
        """Answer one routed request: the heart of simple-mesh."""
        config = self.config
        trace = TraceContext.from_headers(request.headers, config.forward_headers)
        query = split_query(request.query)
        view = query.pop("view", None)
        try:
            steps = parse_route(request.path)
            if query and not config.allow_directives:
                return self.refuse(403, "directives are not allowed here (ALLOW_DIRECTIVES=false)", trace,
                                   rule="ALLOW_DIRECTIVES")
            directives = (Directives.resolve(config, self.defaults, query) if query
                          else self.base_directives)
            calls = plan_calls(steps)
            if calls:
                total, depth = route_size(steps, config.max_calls, config.max_depth)
                if total > config.max_calls:
                    return self.refuse(400, f"the route expands to more than MAX_CALLS={config.max_calls} calls",
                                       trace, rule="MAX_CALLS")
                if depth > config.max_depth:
                    return self.refuse(400, f"the route is deeper than MAX_DEPTH={config.max_depth} hops",
                                       trace, rule="MAX_DEPTH")
                for target, _rest in calls:
                    refusal = self.target_refusal(target.name)
                    if refusal:
                        return self.refuse(403, refusal[0], trace, rule=refusal[1], target=target.name)
        except RouteError as error:
            return self.refuse(400, f"bad route: {error.message}", trace, position=error.position,
                               route=request.path)
        except DirectiveError as error:
            return self.refuse(400, f"bad directive: {error}", trace)

        record = {"host": config.host}
        if config.version:
            record["version"] = config.version
        record["status"] = 200
        record["elapsed_time"] = 0.0  # set when answering; here for the field order of the original
        record.update(config.identity)
        record["start_time"] = iso_time(request.received_wall)
        record["trace_id"] = trace.trace_id
        record["span_id"] = trace.span_id

        rng = self.rng
        if directives.reset and rng.random() < directives.reset:
            self.metrics.count_fault("reset")
            return Outcome(0, reset=True, trace_id=trace.trace_id)
        if directives.delay:
            delay = directives.delay.sample(rng)
            if delay > 0:
                self.metrics.count_fault("delay")
                record["delay"] = round(delay, 6)
                time.sleep(delay)
        if directives.cpu:
            self.metrics.count_fault("cpu")
            burn_cpu(directives.cpu)
            record["cpu"] = directives.cpu
        if directives.headers:
            record["headers"] = dict(request.headers.items())

        failure = directives.failure_status(rng)
        children = []
        if calls and not failure:
            children = self.call_all(calls, request, trace, directives)
        record["next_node"] = children
        if failure:
            self.metrics.count_fault("error")
            record["error"] = f"injected failure {failure}"
        status = node_status(failure, children)
        record["status"] = status
        if status != 200 and not failure:
            record["error"] = "a downstream call failed"
        record["elapsed_time"] = round(time.perf_counter() - request.received, 6)
        if directives.size:
            pad_record(record, directives.size)
        return Outcome(status, record, trace_id=trace.trace_id,
                       targets=tuple(target.name for target, _rest in calls))

    def refuse(self, status, message, trace, **extra):
        return Outcome(status, error_answer(self.config.host, status, message, trace_id=trace.trace_id, **extra),
                       trace_id=trace.trace_id)

    def target_refusal(self, name):
        """(why, rule) when this node may not call ``name`` (SPEC 8), else None."""
        config = self.config
        if is_ip_literal(name) and not config.allow_ip_targets:
            return f"target {name!r} is an IP address; set ALLOW_IP_TARGETS=true to allow it", "ALLOW_IP_TARGETS"
        if config.allowed_hosts and not any(fnmatch.fnmatchcase(name, glob) for glob in config.allowed_hosts):
            return f"target {name!r} is not in ALLOWED_HOSTS", "ALLOWED_HOSTS"
        return None

    def call_all(self, calls, request, trace, directives):
        """Call every target; concurrently with ``parallel``. The records come back in route order."""
        if len(calls) == 1 or not directives.parallel:
            return [self.call(target, rest, request, trace, directives) for target, rest in calls]
        records = [None] * len(calls)

        def run(index):
            target, rest = calls[index]
            records[index] = self.call(target, rest, request, trace, directives)

        threads = [threading.Thread(target=run, args=(index,), daemon=True) for index in range(1, len(calls))]
        for thread in threads:
            thread.start()
        run(0)
        for thread in threads:
            thread.join()
        return records

    def call(self, target, rest, request, trace, directives):
        peer, path = self.resolver.resolve(target, format_route(rest), target.query())
        started = time.perf_counter()
        try:
            status, content_type, data = call_peer(
                self.pool, peer, path, request.method, request.body, trace.outbound,
                directives.timeout, self.config.max_upstream_body)
            elapsed = time.perf_counter() - started
            self.metrics.observe_call(target.name, str(status), elapsed)
            return child_record(target, peer.url, status, content_type, data, request.method, elapsed)
        except CallFailed as failure:
            elapsed = time.perf_counter() - started
            code = str(failure.code) if failure.code else ("timeout" if failure.status == 504 else "error")
            self.metrics.observe_call(target.name, code, elapsed)
            return {"host": target.name, "url": peer.url, "status": failure.status, "error": str(failure),
                    "elapsed_time": round(elapsed, 6)}


# --- HTTP handler and server -------------------------------------------------------------------------------
# http.server's request parsing goes through email.feedparser and its answers through several small sends;
# the handler below reads the request line and headers itself and writes each answer in one send.

MAX_REQUEST_LINE = 16 * 1024
MAX_HEADER_LINE = 16 * 1024
MAX_HEADERS = 100
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a header name (RFC 9110 5.1)
# Control characters are refused where they arrive: a CR or LF in a value a node forwards would inject a line.
REQUEST_LINE_BAD_RE = re.compile(r"[\x00-\x1f\x7f]")
HEADER_VALUE_BAD_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
REASONS = {status.value: status.phrase for status in HTTPStatus}


class Headers(dict):
    """Request headers with lower-cased names; repeated headers are joined with ", " (RFC 9110 5.3)."""

    def get(self, name, default=None):
        return dict.get(self, name.lower(), default)


class BadRequest(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "simplemesh/" + __version__
    wbufsize = 0  # each answer is written with one sendall

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connection.settimeout(self.server.node.config.keepalive_timeout)

    def handle_one_request(self):
        node = self.server.node
        try:
            request = self.read_request()
        except (TimeoutError, ConnectionError, OSError):
            self.close_connection = True
            return
        except BadRequest as error:
            self.close_connection = True
            self.write_answer(Outcome(error.status, error_answer(node.config.host, error.status, str(error))), b"")
            return
        if request is None:
            self.close_connection = True
            return
        metrics = node.metrics
        with node.lock:
            metrics.in_flight += 1
            busy = metrics.in_flight > node.config.max_concurrency
        try:
            if busy:
                outcome = Outcome(503, error_answer(node.config.host, 503, "too many requests in flight "
                                                    f"(MAX_CONCURRENCY={node.config.max_concurrency})"),
                                  extra_headers=(("Retry-After", "1"),))
            else:
                try:
                    outcome = self.dispatch(node, request)
                except Exception as error:  # a bug: answer and log one line rather than drop the connection
                    outcome = internal_error(node.config, error)
            if outcome.reset:
                self.reset_connection()
            else:
                self.write_answer(outcome, request.method)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
            outcome = Outcome(499)
        finally:
            with node.lock:
                metrics.in_flight -= 1
        elapsed = time.perf_counter() - request.received
        metrics.observe_request(request.method, str(outcome.status or "reset"), elapsed)
        self.log_access(request, outcome, elapsed)

    def read_request(self):
        """Read the request line, headers and body; None when the client closed the connection."""
        line = self.rfile.readline(MAX_REQUEST_LINE + 1)
        if line in (b"\r\n", b"\n"):  # RFC 9112 2.2: an empty line before a request line is ignored
            line = self.rfile.readline(MAX_REQUEST_LINE + 1)
        if not line:
            return None
        received, received_wall = time.perf_counter(), time.time()
        if len(line) > MAX_REQUEST_LINE:
            raise BadRequest(414, f"request line longer than {MAX_REQUEST_LINE} bytes")
        text = line.decode("latin-1").rstrip("\r\n")
        if REQUEST_LINE_BAD_RE.search(text):
            raise BadRequest(400, "control character in the request line")
        try:
            method, target, version = text.split(" ")
        except ValueError:
            raise BadRequest(400, "malformed request line") from None
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise BadRequest(505 if version.startswith("HTTP/") else 400, f"unsupported protocol {version!r}")
        # The socket timeout bounds each read; this bounds the whole request, so a client trickling its headers
        # or body a byte at a time cannot hold a thread for ever (slowloris).
        watch = DEADLINES.watch(self.connection, self.server.node.config.keepalive_timeout)
        try:
            request = self.read_message(method, target, version, received, received_wall)
        finally:
            cut = DEADLINES.release(watch)
        if cut:
            raise TimeoutError("the request took longer than KEEPALIVE_TIMEOUT to arrive")
        return request

    def read_message(self, method, target, version, received, received_wall):
        """The headers and body after a request line -> Request (None when the client went away)."""
        headers = Headers()
        for _ in range(MAX_HEADERS + 1):
            header = self.rfile.readline(MAX_HEADER_LINE + 1)
            if len(header) > MAX_HEADER_LINE:
                raise BadRequest(431, f"a header line is longer than {MAX_HEADER_LINE} bytes")
            if header in (b"\r\n", b"\n", b""):
                break
            name, sep, value = header.decode("latin-1").partition(":")
            if not sep or not TOKEN_RE.fullmatch(name):  # also refuses obs-fold continuation lines
                raise BadRequest(400, "malformed header line")
            name = name.lower()
            value = value.strip(" \t\r\n")
            if HEADER_VALUE_BAD_RE.search(value):
                raise BadRequest(400, f"control character in the value of header {name!r}")
            headers[name] = headers[name] + ", " + value if name in headers else value
        else:
            raise BadRequest(431, f"more than {MAX_HEADERS} headers")
        self.request_version = version
        self.command = method
        connection = headers.get("connection", "").lower()
        self.close_connection = "close" in connection or (version == "HTTP/1.0" and "keep-alive" not in connection)
        if method not in METHODS:
            raise BadRequest(501 if method.isupper() and method.isalpha() else 400,
                             f"unsupported method {method!r}")
        if headers.get("transfer-encoding"):
            raise BadRequest(411, "chunked request bodies are not supported; send Content-Length")
        length = headers.get("content-length", "0")
        if not (length.isascii() and length.isdigit()):
            raise BadRequest(400, "bad Content-Length")
        max_body = self.server.node.config.max_body
        if len(length) > 18 or int(length) > max_body:
            raise BadRequest(413, f"Content-Length {length[:20]} is above MAX_BODY={max_body}")
        length = int(length)
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            return None
        if target.startswith(("http://", "https://")):  # absolute form, as proxies send it
            target = "/" + target.split("/", 3)[3] if target.count("/") >= 3 else "/"
        path, _, query = target.partition("?")
        path = path.partition("#")[0]
        if "%" in path:
            try:
                path = unquote(path, errors="strict")
            except UnicodeDecodeError:
                raise BadRequest(400, "the path is not UTF-8 once percent-decoded") from None
        return Request(method, path, query, headers, body, received, received_wall)

    def dispatch(self, node, request):
        path = request.path
        if path.startswith("/-/"):
            return self.admin(node, request)
        if path in ("/healthz", "/readyz"):
            ready = node.ready or path == "/healthz"
            return Outcome(200 if ready else 503, {"host": node.config.host, "status": "ok" if ready else "not ready"})
        if path == "/metrics":
            return Outcome(200, text=node.metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8")
        first = path[1:].split("/", 1)[0]
        if first in ("metrics", "healthz", "readyz") or first.startswith("-"):
            return Outcome(404, error_answer(node.config.host, 404, f"/{first} is reserved; "
                                             f"to call a service named {first!r} write the step as ({first})"))
        return node.serve(request)

    def admin(self, node, request):
        """SPEC 4 runtime controls: /-/defaults and /-/ready."""
        host = node.config.host
        query = split_query(request.query)
        if request.path == "/-/defaults":
            if request.method == "POST":
                try:
                    node.set_defaults(query)
                except DirectiveError as error:
                    return Outcome(400, error_answer(host, 400, f"bad directive: {error}"))
            elif request.method == "DELETE":
                node.reset_defaults()
            elif request.method != "GET":
                return Outcome(405, error_answer(host, 405, "use GET, POST or DELETE"))
            return Outcome(200, {"host": host, "defaults": node.defaults})
        if request.path == "/-/ready":
            if request.method == "POST":
                try:
                    node.ready = parse_bool(query.get("ready") or "")
                except ValueError:
                    return Outcome(400, error_answer(host, 400, "use ?ready=true or ?ready=false"))
            return Outcome(200, {"host": host, "ready": node.ready})
        return Outcome(404, error_answer(host, 404, f"no admin path {request.path}"))

    def write_answer(self, outcome, method):
        if outcome.text is not None:
            body = outcome.text.encode()
        else:
            body = json.dumps(outcome.record).encode()
        if self.server.draining:
            self.close_connection = True
        head = [f"HTTP/1.1 {outcome.status} {REASONS.get(outcome.status, 'Unknown')}\r\n"
                f"Content-Type: {outcome.content_type}\r\nContent-Length: {len(body)}\r\n"
                f"Date: {http_date()}\r\n"]
        if outcome.trace_id:
            head.append(f"X-Trace-Id: {outcome.trace_id}\r\n")
        for name, value in outcome.extra_headers:
            head.append(f"{name}: {value}\r\n")
        if self.close_connection:
            head.append("Connection: close\r\n")
        head.append("\r\n")
        data = "".join(head).encode("latin-1")
        self.wfile.write(data if method == "HEAD" else data + body)

    def reset_connection(self):
        """Close without answering, with an RST (what Envoy reports as an upstream reset)."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass

    def log_access(self, request, outcome, elapsed):
        node = self.server.node
        if node.config.log_level not in ("debug", "info"):
            return
        log_line(node.config, {
            "time": iso_time(time.time()), "host": node.config.host, "method": request.method,
            "path": request.path if request.path.isprintable() else ascii(request.path),  # no forged log lines
            "status": outcome.status or "reset", "elapsed": round(elapsed, 6),
            "trace_id": outcome.trace_id, "targets": list(outcome.targets)})

    def log_message(self, format, *args):  # http.server's own messages: kept quiet but for real errors
        pass


def internal_error(config, error):
    """A 500 for an exception no input should cause: one log line that says where, no traceback, no hang."""
    frame = traceback.extract_tb(error.__traceback__)[-1]
    message = f"{type(error).__name__}: {error}"
    log_line(config, {"time": iso_time(time.time()), "host": config.host, "level": "error",
                      "error": ascii(message), "at": f"{os.path.basename(frame.filename)}:{frame.lineno}"})
    return Outcome(500, error_answer(config.host, 500, f"internal error: {message[:200]}"))


def http_date():
    now = int(time.time())
    if _DATE_CACHE[0] != now:
        _DATE_CACHE[1] = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))
        _DATE_CACHE[0] = now
    return _DATE_CACHE[1]


_DATE_CACHE = [None, ""]


def log_line(config, fields):
    """One line on stdout, written with a single os.write so lines from many threads never interleave."""
    if config.log_format == "json":
        line = json.dumps(fields)
    else:
        line = " ".join(str(value) if key in ("time", "host") else
                        f"{key}={','.join(value) if isinstance(value, list) else value}"
                        for key, value in fields.items() if value not in ("", None, []))
    try:
        os.write(1, (line + "\n").encode("utf-8", "replace"))
    except OSError:
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True

    def __init__(self, node):
        self.node = node
        self.draining = False
        super().__init__((node.config.address, node.config.port), Handler)

    def server_bind(self):
        # HTTPServer.server_bind looks up the machine's FQDN, which can stall start-up for seconds without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            return  # a client hanging up is not an error
        log_line(self.node.config, {"time": iso_time(time.time()), "host": self.node.config.host,
                                    "level": "error", "error": f"{type(error).__name__}: {error}"})


# --- Command line ------------------------------------------------------------------------------------------
# SPEC 6. ``serve`` runs one node from the environment; ``mesh`` runs a gateway and named nodes in one process.

def parse_node_spec(text):
    """``'b;delay=1;version=v2'`` -> (name, version, {directive: raw text}), validated like a route step."""
    name, *parts = text.split(";")
    name = name.strip().lower()
    problem = name_problem(name) if name else "empty name"
    if problem:
        raise ValueError(f"bad node name {name!r}: {problem}")
    version = ""
    directives = {}
    for part in parts:
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if key == "version":
            version = value
            continue
        try:
            check_directive(key, value if sep else None)
        except DirectiveError as error:
            raise ValueError(f"node {name!r}: {error}") from None
        directives[key] = value if sep else "true"
    return name, version, directives


def start_node(config):
    """Bind a node's server and serve it on a daemon thread; returns the Server."""
    server = Server(Node(config))
    # A short poll interval: on SIGTERM the listener closes within 0.1 s of SHUTDOWN_DELAY, not 0.5 s.
    threading.Thread(target=server.serve_forever, args=(0.1,), name=f"serve-{config.host}", daemon=True).start()
    return server


def startup_line(config):
    log_line(config, {"time": iso_time(time.time()), "host": config.host, "event": "start",
                      "listen": f"{config.address}:{config.port}", "version": config.version or None,
                      "peers": ",".join(sorted(config.peers)) or None,
                      "defaults": ",".join(f"{k}={v}" for k, v in config.defaults.items()) or None,
                      "max_calls": config.max_calls, "max_depth": config.max_depth,
                      "max_concurrency": config.max_concurrency, "simplemesh": __version__})


def stop_signals():
    """An Event that SIGTERM or SIGINT sets; a second signal exits at once (an impatient Ctrl-C).

    Installed before the servers start, so a signal during start-up still drains rather than kills.
    """
    stop = threading.Event()

    def handler(signum, _frame):
        if stop.is_set():
            os._exit(128 + signum)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)
    return stop


def wait_for_stop(servers, stop=None, internal=()):
    """Block until ``stop`` is set (SIGTERM or SIGINT), then drain (SPEC 8) and return.

    At once every node turns not ready and answers with ``Connection: close``; after SHUTDOWN_DELAY the listeners
    of ``servers`` close; in-flight requests (a delay included) finish, up to SHUTDOWN_GRACE; then the ``internal``
    servers close (a mesh's nodes, which the in-flight requests were still calling), each node's ``on_stop``
    callables run (span export flushes there) and the connection pools close.
    """
    stop = stop or stop_signals()
    while not stop.wait(3600):
        pass
    everything = list(servers) + list(internal)
    for server in everything:
        server.node.ready = False
        server.draining = True
    time.sleep(max(server.node.config.shutdown_delay for server in everything))
    for server in servers:
        server.shutdown()
        server.server_close()
    deadline = time.monotonic() + max(server.node.config.shutdown_grace for server in everything)
    time.sleep(0.05)  # a connection accepted just before the close has its request read by now
    while time.monotonic() < deadline and any(server.node.metrics.in_flight for server in everything):
        time.sleep(0.02)
    for server in internal:
        server.shutdown()
        server.server_close()
    for server in everything:
        for hook in server.node.on_stop:
            hook()
        server.node.pool.close()


def command_serve(args, environ):
    config = Config.from_env(environ)
    stop = stop_signals()
    server = start_node(config)
    startup_line(config)
    wait_for_stop([server], stop)
    return 0


DEFAULT_MESH = ("a", "b;delay=50ms", "c;delay=100ms..200ms", "d;error=0.1")


def command_mesh(args, environ):
    specs = [parse_node_spec(text) for text in (args.nodes or DEFAULT_MESH)]
    base = Config.from_env(environ, address=args.address)
    ports = {}
    for index, (name, _version, _directives) in enumerate(specs, start=1):
        ports.setdefault(name, []).append(("127.0.0.1" if args.address == "0.0.0.0" else args.address,
                                           args.port + index))
    peers = dict(base.peers)
    peers.update(ports)
    configs = [replace(base, host="gateway", port=args.port, peers=peers, version="")]
    for index, (name, version, directives) in enumerate(specs, start=1):
        defaults = dict(base.defaults)
        defaults.update(directives)
        configs.append(replace(base, host=name, port=args.port + index, peers=peers, version=version,
                               defaults=defaults))
    stop = stop_signals()
    servers = []
    try:
        for config in configs:
            Directives.resolve(config, config.defaults, {})
            servers.append(start_node(config))
            startup_line(config)
    except (OSError, DirectiveError) as error:
        for server in servers:
            server.server_close()
        raise ConfigError(f"cannot start the mesh: {error}") from None
    names = [name for name, _version, _directives in specs]
    example = "/".join(dict.fromkeys(names))
    host = "localhost" if args.address in ("0.0.0.0", "127.0.0.1") else args.address
    print(f"simple-mesh: gateway on http://{host}:{args.port}, nodes: "
          + ", ".join(f"{config.host}{'@' + config.version if config.version else ''}=:{config.port}"
                      for config in configs[1:]), flush=True)
    print(f"  try: curl http://{host}:{args.port}/{example}\n"
          f"       curl 'http://{host}:{args.port}/{names[0]}~{names[-1]}?parallel'\n"
          f"       curl http://{host}:{args.port}/metrics\n  Ctrl-C stops the mesh.", flush=True)
    wait_for_stop(servers[:1], stop, internal=servers[1:])  # the gateway closes first: nodes finish its calls
    return 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="simplemesh", description="simple-mesh: a test server for service meshes; the URL path is the route.")
    parser.add_argument("--version", action="version", version=f"simplemesh {__version__}")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="run one node, configured by environment variables (the default)",
                        description="Run one node. HOST, PORT (9090), ADDRESS, PEERS, UPSTREAM_PORT, the directive "
                                    "defaults (DELAY, ERROR_RATE, ...) and the limits come from the environment.")
    mesh = commands.add_parser("mesh", help="run a gateway and named nodes in one process",
                               description="Run a whole mesh in one process: a gateway on --port and each NODE on "
                                           "the next ports, resolving each other's names.")
    mesh.add_argument("nodes", nargs="*", metavar="NODE",
                      help="a node spec: name[;directive=value...][;version=v2] (default: %s)" % " ".join(DEFAULT_MESH))
    mesh.add_argument("--port", type=int, default=9090, help="the gateway's port; nodes take the next ones")
    mesh.add_argument("--address", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    return parser


COMMANDS = {"serve": command_serve, "mesh": command_mesh}


def main(argv=None, environ=None):
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command or "serve"](args, environ)
    except ConfigError as error:
        print(f"simplemesh: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
