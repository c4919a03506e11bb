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
trace context, outbound calls, the answer and its views, metrics, span export, the node, the HTTP handler and
server, manifests, the command line.
"""

import argparse
import bisect
import email.utils
import fnmatch
import functools
import gzip
import html
import json
import math
import os
import queue
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
import http.client
from http import HTTPStatus
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

__version__ = "0.1.0"


# --- Configuration -----------------------------------------------------------------------------------------
# Everything a node is told comes from its environment (SPEC 2, 4, 6, 8), read once at start-up into a frozen
# Config. A bad value stops the program with a clear message instead of surfacing on the first request.

class Record:
    """Named fields with class-level defaults: a small stand-in for a dataclass.

    Importing dataclasses and generating each class's methods costs about 20 ms of start-up, and start-up to
    the first answer is a benchmarked target; these records need only construction, replace() and equality.
    Construction is two dict updates, as cheap as a generated __init__ for the records made per request.
    """
    _fields = ()

    def __init_subclass__(cls):
        super().__init_subclass__()
        names = list(cls._fields)
        names += [name for name in cls.__annotations__ if name not in names]
        cls._fields = tuple(names)
        cls._field_set = frozenset(names)
        cls._defaults = {name: getattr(cls, name) for name in names if hasattr(cls, name)}
        cls._required = cls._field_set - cls._defaults.keys()
        cls._mutable = tuple(name for name, value in cls._defaults.items() if isinstance(value, (dict, list)))

    def __init__(self, *args, **values):
        if args:
            if len(args) > len(self._fields):
                raise TypeError(f"{type(self).__name__} takes at most {len(self._fields)} positional arguments")
            for name, value in zip(self._fields, args):
                if name in values:
                    raise TypeError(f"{type(self).__name__} got {name!r} twice")
                values[name] = value
        if not values.keys() <= self._field_set:
            raise TypeError(f"{type(self).__name__} has no field {min(values.keys() - self._field_set)!r}")
        if not self._required <= values.keys():
            raise TypeError(f"{type(self).__name__} needs {min(self._required - values.keys())!r}")
        fields = self.__dict__
        fields.update(self._defaults)
        fields.update(values)
        for name in self._mutable:
            if name not in values:
                fields[name] = type(fields[name])(fields[name])  # a default is never shared between instances

    def replace(self, **changes):
        """A copy with some fields changed."""
        values = {name: getattr(self, name) for name in self._fields}
        values.update(changes)
        return type(self)(**values)

    def __eq__(self, other):
        return type(other) is type(self) and all(getattr(self, n) == getattr(other, n) for n in self._fields)

    def __hash__(self):
        return hash(tuple(getattr(self, name) for name in self._fields))

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in self._fields)})"


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the variable."""


def is_number(text):
    """True for a non-empty run of ASCII digits (str.isdigit() alone also takes '²' and other scripts' digits)."""
    return text.isascii() and text.isdigit()


def parse_bool(text):
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def split_pairs(text, expected):
    """``k1=v1,k2=v2`` -> [(k1, v1), ...] with white space stripped; ValueError names what was ``expected``."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected {expected}, got {item!r}")
        pairs.append((key.strip(), value.strip()))
    return pairs


def parse_peers(text):
    """``PEERS="a=127.0.0.1:9091,b=127.0.0.1:9092|127.0.0.1:9093"`` -> {name: [(host, port), ...]}.

    Several addresses for one name (``|``) are used in turn: that is how ``mesh`` puts a v1 and a v2 behind a name.
    """
    peers = {}
    for name, addresses in split_pairs(text, "name=host:port"):
        targets = []
        for address in addresses.split("|"):
            host, sep, port = address.strip().rpartition(":")
            if not sep or not host or not is_number(port) or not 0 < int(port) < 65536:
                raise ValueError(f"expected host:port for {name!r}, got {address!r}")
            targets.append((host, int(port)))
        peers[name.lower()] = targets
    return peers


class Config(Record):
    host: str = "localhost"
    port: int = 9090
    address: str = "0.0.0.0"
    version: str = ""
    upstream_port: int = 80
    peers: dict = {}
    defaults: dict = {}  # directive defaults from the environment, raw text by name
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
    trace_ui_url: str = ""  # TRACE_UI_URL: the trace id on the HTML page links there ({trace_id} filled in)
    identity: dict = {}  # pod, namespace, ip, node from the downward API
    tracing: object = None  # TracingConfig when native spans are on (OTEL_EXPORTER_OTLP_*ENDPOINT set)

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
        read("ALLOWED_HOSTS", "allowed_hosts", lambda text: tuple(glob.lower() for glob in _word_list(text)))
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
        read("TRACE_UI_URL", "trace_ui_url", str)
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
        settings["tracing"] = TracingConfig.from_env(environ)
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


class Target(Record):
    """One hop: a name, an optional port and that hop's directives as (key, value-or-None) pairs."""
    name: str
    port: int = None
    directives: tuple = ()

    def address_text(self):
        return self.name if self.port is None else f"{self.name}:{self.port}"

    def query(self):
        return "&".join(key if value is None else f"{key}={value}" for key, value in self.directives)


class Group(Record):
    """A parenthesised sub-route; the rest of the outer route is appended to it."""
    steps: tuple


NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.")
DIGITS = frozenset("0123456789")  # str.isdigit() also takes other scripts' digits
VALUE_END = frozenset("/~();")
# Directive text travels on in the next hop's URL, so only printable ASCII may pass: no space, CR/LF or NUL.
NOT_URL_TEXT_RE = re.compile(r"[^!-~]")
MAX_NESTING = 32


@functools.lru_cache(maxsize=1024)  # a mesh sees the same few routes over and over; the result is never changed
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


RESERVED_NAMES = frozenset(("metrics", "healthz", "readyz"))  # first segments a node answers itself (SPEC 1)


def is_operations_path(path):
    """Paths a node answers itself: probes, metrics and the /-/ admin paths."""
    return path in ("/metrics", "/healthz", "/readyz") or path.startswith("/-/")


def forward_route(steps):
    """The rest of a route as the next hop's path (no leading "/").

    A rest starting with a reserved name is sent as a group, ``(metrics)/x``, so ``/a/metrics`` calls a service
    named metrics instead of reading a's own /metrics.
    """
    text = format_route(steps)
    first = text.split("/", 1)[0]
    return f"({first}){text[len(first):]}" if first in RESERVED_NAMES else text


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


class Delay(Record):
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


class Directive(Record):
    name: str
    env: str
    parse: object  # text -> value; flags take None for "on"
    cap: object = None  # (value, config) -> (amount, limit, limit's variable name), or None: no cap
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


def capped_directive(config, key, text):
    """check_directive(), then the directive's cap under ``config``: DirectiveError above it."""
    value = check_directive(key, text)
    cap = DIRECTIVES[key].cap
    if cap:
        amount, limit, variable = cap(value, config)
        if amount > limit:
            raise DirectiveError(f"{key}={text} is above the limit {variable}={limit:g}", key)
    return value


def check_route_caps(config, steps):
    """Check the caps of every hop's directives in a route, so the entry node refuses what a hop would refuse
    (as a 400 before any call, rather than a 502 from deep in the tree)."""
    for step in steps:
        for branch in step:
            if isinstance(branch, Group):
                check_route_caps(config, branch.steps)
                continue
            for key, text in branch.directives:
                if DIRECTIVES[key].cap:
                    capped_directive(config, key, text)


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


class Directives(Record):
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
                values[key] = capped_directive(config, key, text)
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
    """A query string into {key: raw text, or None for a bare key such as ``parallel``}."""
    directives = {}
    for item in query.split("&"):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = unquote(key).lower()
        directives[key] = unquote(value) if sep else None
    return directives


def burn_cpu(seconds):
    """Spend ``seconds`` of this thread's CPU time (visible in CPU metrics and autoscalers), however busy the machine."""
    end = time.thread_time() + seconds
    n = 0
    while time.thread_time() < end:
        for _ in range(1000):
            n = (n * 1103515245 + 12345) & 0x7FFFFFFF


# --- Trace context -----------------------------------------------------------------------------------------
# SPEC 5: W3C Trace Context (the Level 2 editor's draft), B3 as openzipkin and OpenTelemetry's B3 requirements
# say, and OpenTelemetry's consistent probability sampling. Two modes:
# - mesh only (no exporter): the trace headers a node got go on unchanged, so the sidecar's inbound span is the
#   parent of its outbound span. A node starts a trace itself only when no valid context arrived at all.
# - native spans (config.tracing set): the node is a tracing participant; every call carries a fresh CLIENT span
#   as its parent, in each format the node speaks (OTEL_PROPAGATORS, plus any B3 form that arrived).
# Parsing is pure and strict: anything the W3C text says to ignore is ignored, and the trace restarts.

HEX = frozenset("0123456789abcdef")  # W3C: lowercase hex only
ZERO_TRACE_ID = "0" * 32
ZERO_SPAN_ID = "0" * 16
FLAG_SAMPLED = 0x01
FLAG_RANDOM = 0x02  # level 2: the right-most 7 bytes of the trace id are random
KNOWN_FLAGS = FLAG_SAMPLED | FLAG_RANDOM
TRACESTATE_MAX_MEMBERS = 32
TRACESTATE_MAX_LENGTH = 512
TRACESTATE_LONG_MEMBER = 128
# key = ( lcalpha / DIGIT ) 0*255 ( keychar ); keychar = lcalpha / DIGIT / "_" / "-" / "*" / "/" / "@".
# Level 1's multi-tenant form (tenant-id "@" system-id) is one case of this grammar, so it needs no rule of its own.
TRACESTATE_KEY_RE = re.compile(r"[a-z0-9][a-z0-9_\-*/@]{0,255}")
# value = 0*255(chr) nblk-chr; nblk-chr = %x21-2B / %x2D-3C / %x3E-7E; chr = %x20 / nblk-chr
TRACESTATE_VALUE_RE = re.compile(r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")
B3_HEADERS = ("b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags")
TRACE_HEADERS = ("traceparent", "tracestate") + B3_HEADERS  # what a native node writes itself
B3_SIGNAL_HEADERS = ("b3", "x-b3-traceid", "x-b3-sampled", "x-b3-flags")  # any of them may carry a B3 context
PROPAGATED_HEADERS = (
    "traceparent", "tracestate", "baggage",
    "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags",
    "x-request-id", "x-ot-span-context", "x-cloud-trace-context", "grpc-trace-bin", "sw8",
    "x-datadog-trace-id", "x-datadog-parent-id", "x-datadog-sampling-priority", "x-datadog-origin",
)


@functools.lru_cache(maxsize=None)
def copied_headers(forward_headers, native):
    """The (lower-case) request headers a node copies onward; a native node writes the trace headers itself.

    Intersecting this set with the request's few headers beats looking up every name on each request.
    """
    names = frozenset(PROPAGATED_HEADERS).union(forward_headers)
    return names.difference(TRACE_HEADERS) if native else names


def new_trace_id():
    return f"{random.getrandbits(128) or 1:032x}"


def new_span_id():
    return f"{random.getrandbits(64) or 1:016x}"


def _is_hex(text):
    return HEX.issuperset(text)


def parse_traceparent(value):
    """(version, trace_id, parent_id, flags as int) of a usable W3C traceparent, or None (restart the trace).

    Version 00 is exactly 55 characters. A higher version is read as 00 would be, provided it is at least 55
    characters and a "-" follows the flags; ``ff`` is never valid. Repeated headers (joined with ", ") fail.
    """
    if not value:
        return None
    value = value.strip(" \t")
    if len(value) < 55 or value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    version, trace_id, parent_id, flags = value[:2], value[3:35], value[36:52], value[53:55]
    if not _is_hex(version) or version == "ff":
        return None
    if len(value) > 55 and (version == "00" or value[55] != "-"):
        return None
    if not (_is_hex(trace_id) and _is_hex(parent_id) and _is_hex(flags)):
        return None
    if trace_id == ZERO_TRACE_ID or parent_id == ZERO_SPAN_ID:
        return None
    return version, trace_id, parent_id, int(flags, 16)


def parse_tracestate(value):
    """The list-members of a W3C tracestate, in order, or () when the header is invalid and must be discarded.

    Repeated headers arrive joined with ", ", which is how W3C says to combine them. "Empty and whitespace-only
    list members are allowed" and dropped. A bad key or value, or more than 32 members, invalidates the whole
    header; a repeated key drops only the repeat: "Only one entry per key is allowed because the entry represents
    that last position in the trace", and the left-most entry is the latest.
    """
    members = []
    keys = set()
    count = 0
    for item in (value or "").split(","):
        item = item.strip(" \t")  # "Spaces and horizontal tabs surrounding list-members are ignored."
        if not item:
            continue
        count += 1
        key, sep, text = item.partition("=")
        if not sep or not TRACESTATE_KEY_RE.fullmatch(key) or not TRACESTATE_VALUE_RE.fullmatch(text):
            return ()
        if key not in keys:
            keys.add(key)
            members.append(item)
    if count > TRACESTATE_MAX_MEMBERS:  # "There can be a maximum of 32 list-members in a list."
        return ()
    return tuple(members)


def format_tracestate(members, limit=TRACESTATE_MAX_LENGTH):
    """Join list-members, truncated to ``limit`` characters as W3C says: "the vendor MUST truncate whole entries.
    Entries larger than 128 characters long SHOULD be removed first. Then entries SHOULD be removed starting from
    the end of tracestate." (Vendors SHOULD propagate at least 512 characters: this node sends up to 512.)
    An entry this node adds (``ot``) can make 33 members out of 32: the right-most goes, as when truncating."""
    members = list(members[:TRACESTATE_MAX_MEMBERS])
    if len(",".join(members)) > limit:
        members = [member for member in members if len(member) <= TRACESTATE_LONG_MEMBER]
        while members and len(",".join(members)) > limit:
            members.pop()
    return ",".join(members)


def ot_subkeys(members):
    """The sub-keys of the OpenTelemetry ``ot=`` entry (``ot=th:c;rv:0123456789abcd``) as a dict."""
    for member in members:
        if member.startswith("ot="):
            return dict(part.partition(":")[::2] for part in member[3:].split(";") if part)
    return {}


def with_ot_threshold(members, threshold):
    """The members with the ``ot`` entry's ``th`` set (or removed when ``threshold`` is None).

    W3C: "Modified keys MUST be moved to the beginning (left) of the list."; an ``ot`` entry left empty goes.
    """
    subkeys = ot_subkeys(members)
    if subkeys.get("th") == threshold or (threshold is None and "th" not in subkeys):
        return members
    subkeys.pop("th", None)
    if threshold is not None:
        subkeys = dict(th=threshold, **subkeys)
    others = tuple(member for member in members if not member.startswith("ot="))
    entry = "ot=" + ";".join(f"{key}:{value}" for key, value in subkeys.items())
    if len(entry) > 3 + 256:  # OpenTelemetry: past 256 characters "SDKs are advised to abort the operation"
        return members
    return ((entry,) if subkeys else ()) + others


class B3(Record):
    """One B3 context: ids ("" when only a sampling state arrived, like ``b3: 0``), the sampling state
    ("1" accept, "0" deny, "d" debug, "" defer) and the form it came in ("single" or "multi")."""
    trace_id: str
    span_id: str
    state: str
    form: str


def parse_b3(headers):
    """The B3 context of a request, or None; the single ``b3`` header wins over the ``x-b3-*`` ones (openzipkin).

    Single: ``b3: {traceid}-{spanid}[-{state}[-{parentspanid}]]`` or the state alone (``b3: 0``). Multi: a
    64-bit trace id is left-padded to 128 bits, as Zipkin does; ``X-B3-Flags: 1`` is debug.
    """
    single = headers.get("b3")
    if single is not None:
        return _parse_b3_single(single.strip(" \t"))
    trace_id = _first_value(headers.get("x-b3-traceid")).lower()
    span_id = _first_value(headers.get("x-b3-spanid")).lower()
    sampled = _first_value(headers.get("x-b3-sampled")).lower()
    state = "d" if _first_value(headers.get("x-b3-flags")) == "1" else {
        "1": "1", "true": "1", "0": "0", "false": "0"}.get(sampled, "")  # "a lenient implementation may accept"
    if not trace_id and not span_id:
        return B3("", "", state, "multi") if state else None  # a sampling decision alone, like X-B3-Sampled: 0
    return _b3_ids(trace_id, span_id, state, "multi")


def _parse_b3_single(value):
    parts = value.split("-")
    if len(parts) == 1:  # "Sampling state can also be sent on its own (with no identifiers)."
        return B3("", "", value, "single") if value in ("0", "1", "d") else None
    if len(parts) > 4 or (len(parts) > 2 and parts[2] not in ("0", "1", "d")):
        return None
    if len(parts) == 4 and not (len(parts[3]) == 16 and _is_hex(parts[3])):
        return None
    return _b3_ids(parts[0], parts[1], parts[2] if len(parts) > 2 else "", "single")


def _b3_ids(trace_id, span_id, state, form):
    if len(trace_id) not in (16, 32) or not _is_hex(trace_id) or len(span_id) != 16 or not _is_hex(span_id):
        return None
    trace_id = trace_id.rjust(32, "0")
    if trace_id == ZERO_TRACE_ID or span_id == ZERO_SPAN_ID:
        return None
    return B3(trace_id, span_id, state, form)


def _first_value(value):
    """The first of repeated header values joined with ", ": for B3, "When extracting state headers, the first
    value wins"."""
    return (value or "").partition(",")[0].strip(" \t")


class TraceContext:
    """What a node knows of the trace a request belongs to, and the headers it sends onward.

    ``span_id`` is this node's SERVER span with native spans; in mesh-only mode it is the span id the node
    received (the sidecar's), so logs and answers point at a span a backend has.
    """
    __slots__ = ("trace_id", "span_id", "outbound", "parent_id", "flags", "native", "sampled", "tracestate",
                 "b3_forms", "events", "w3c", "b3_debug")

    def __init__(self, trace_id, span_id, outbound, parent_id="", flags=FLAG_SAMPLED, native=False, sampled=False,
                 tracestate="", b3_forms=(), events=None, w3c=True, b3_debug=False):
        self.trace_id = trace_id
        self.span_id = span_id
        self.outbound = outbound  # headers sent on with every call
        self.parent_id = parent_id
        self.flags = flags
        self.native = native  # native spans: every call gets its own CLIENT span
        self.sampled = sampled  # native spans recorded and exported for this request
        self.tracestate = tracestate
        self.b3_forms = b3_forms
        self.events = events  # (name, time ns, attributes) of injected faults, when sampled
        self.w3c = w3c  # native spans: send traceparent (OTEL_PROPAGATORS has tracecontext)
        self.b3_debug = b3_debug  # native spans: B3 debug arrived and goes on ("-d", X-B3-Flags: 1)

    @classmethod
    def from_headers(cls, headers, forward_headers=(), tracing=None):
        if tracing is not None:
            return cls._native(headers, forward_headers, tracing)
        outbound = {name: headers[name] for name in copied_headers(forward_headers, False).intersection(headers)}
        parsed = parse_traceparent(headers.get("traceparent"))
        if parsed:
            version, trace_id, parent_id, flags = parsed
            if version != "00":  # W3C: rebuild a higher version as the highest version known, 00
                outbound["traceparent"] = f"00-{trace_id}-{parent_id}-{flags & KNOWN_FLAGS:02x}"
            # "If the value of the traceparent field wasn't changed before propagation, tracestate MUST NOT be
            # modified as well": a pass-through node sends tracestate on byte for byte.
            return cls(trace_id, parent_id, outbound, parent_id, flags)
        # W3C: "If the vendor failed to parse traceparent, it MUST NOT attempt to parse tracestate."
        outbound.pop("traceparent", None)
        outbound.pop("tracestate", None)
        b3 = parse_b3(headers)
        if b3 and b3.trace_id:  # Envoy's Zipkin tracer speaks B3 only: join its trace and leave the headers alone
            return cls(b3.trace_id, b3.span_id, outbound, b3.span_id, 0 if b3.state == "0" else FLAG_SAMPLED)
        # A new trace, so the whole call tree shares one id; a B3 decision alone (b3: 0) goes on untouched and
        # the new traceparent carries the same decision, never a made-up "sampled".
        flags = FLAG_RANDOM | (0 if b3 and b3.state == "0" else FLAG_SAMPLED)
        trace_id, span_id = new_trace_id(), new_span_id()
        outbound["traceparent"] = f"00-{trace_id}-{span_id}-{flags:02x}"
        return cls(trace_id, span_id, outbound, "", flags)

    @classmethod
    def _native(cls, headers, forward_headers, tracing):
        outbound = {name: headers[name] for name in copied_headers(forward_headers, True).intersection(headers)}
        propagators = tracing.propagators
        parent = parse_traceparent(headers.get("traceparent")) if "tracecontext" in propagators else None
        b3 = parse_b3(headers) if any(name in headers for name in B3_SIGNAL_HEADERS) else None
        decision = {"1": True, "d": True, "0": False}.get(b3.state) if b3 else None
        members, forced = (), None
        if parent:
            _version, trace_id, parent_id, flags = parent
            parent_sampled = bool(flags & FLAG_SAMPLED)
            members = parse_tracestate(headers.get("tracestate"))
            flags &= FLAG_RANDOM  # W3C: unknown flags are set to zero; the random flag stays with its trace id
        elif b3 and b3.trace_id:
            trace_id, parent_id, parent_sampled, flags = b3.trace_id, b3.span_id, decision, 0
        else:
            trace_id, parent_id, parent_sampled, flags = new_trace_id(), "", None, FLAG_RANDOM
            forced = decision  # a B3 decision alone (b3: 0, X-B3-Sampled: 0) is honoured whatever the sampler
        # OpenTelemetry's B3 requirements: "MUST preserve a debug trace flag, if received, and propagate it with
        # subsequent requests. Additionally, an OpenTelemetry implementation MUST set the sampled trace flag".
        debug = bool(b3) and b3.state == "d" and b3.trace_id in ("", trace_id)
        if debug:
            forced = True
        if forced is None:
            sampled, members = tracing.sample(trace_id, parent_sampled, members)
        else:
            sampled = forced
        b3_forms = tracing.b3_forms
        if b3 and b3.form not in b3_forms:
            b3_forms += (b3.form,)  # answer B3 in the form it came in (Envoy's Zipkin tracer)
        if sampled:
            flags |= FLAG_SAMPLED
        return cls(trace_id, new_span_id(), outbound, parent_id, flags, native=True, sampled=sampled,
                   tracestate=format_tracestate(members), b3_forms=b3_forms, events=[] if sampled else None,
                   w3c="tracecontext" in propagators, b3_debug=debug)

    def headers_for(self, client_span_id):
        """The headers of one call; with native spans its parent is that call's CLIENT span.

        OpenTelemetry's B3 requirements: inject "MUST NOT propagate X-B3-ParentSpanId", so neither form sends it.
        """
        if not self.native:
            return self.outbound
        headers = dict(self.outbound)
        if self.w3c:
            headers["traceparent"] = f"00-{self.trace_id}-{client_span_id}-{self.flags:02x}"
            if self.tracestate:
                headers["tracestate"] = self.tracestate
        state = "d" if self.b3_debug else "1" if self.sampled else "0"
        for form in self.b3_forms:
            if form == "single":
                headers["b3"] = f"{self.trace_id}-{client_span_id}-{state}"
            else:
                headers.update({"x-b3-traceid": self.trace_id, "x-b3-spanid": client_span_id})
                if self.b3_debug:  # "Debug implies an accept decision, so don't also send the X-B3-Sampled header."
                    headers["x-b3-flags"] = "1"
                else:
                    headers["x-b3-sampled"] = state
        return headers

    def event(self, name, **attributes):
        """Note an injected fault as an event of this node's SERVER span (when it is recorded)."""
        if self.events is not None:
            self.events.append((name, time.time_ns(), attributes))


# --- Outbound calls ----------------------------------------------------------------------------------------
# SPEC 1, 3. One keep-alive connection pool per peer address, so a hop costs one request and no TCP handshake.
# A call never raises: whatever happens (refused, reset, timeout, garbage) becomes a record in the caller's tree.

class Response(http.client.HTTPResponse):
    """http.client's response, but its headers are read without the email parser (a tenth of a hop's CPU).

    begin() keeps http.client's own rules for status lines, 1xx answers, chunked bodies and keep-alive.
    """

    def begin(self):
        if self.headers is not None:
            return
        while True:
            version, status, reason = self._read_status()
            try:
                headers = read_header_lines(self.fp)
            except HeaderError as error:
                raise http.client.HTTPException(str(error)) from None
            if status != http.client.CONTINUE:
                break
        self.code = self.status = status
        self.reason = reason.strip()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)
        self.headers = self.msg = headers
        self.chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        self.chunk_left = None
        self.will_close = self._check_close()
        length = headers.get("content-length")
        self.length = int(length) if length and is_number(length) and not self.chunked else None
        if status in (204, 304) or 100 <= status < 200 or self._method == "HEAD":
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True


class Connection(http.client.HTTPConnection):
    response_class = Response


class Headers(dict):
    """HTTP headers with lower-cased names; repeated headers are joined with ", " (RFC 9110 5.3)."""

    def get(self, name, default=None):
        return dict.get(self, name.lower(), default)

    def get_all(self, name, default=None):  # what http.client's getheader() asks for
        value = dict.get(self, name.lower())
        return default if value is None else [value]


MAX_HEADER_LINE = 16 * 1024
MAX_HEADERS = 100


TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a header name (RFC 9110 5.1)
# A CR or LF inside a value a node forwards would inject a header line: control characters are refused on arrival.
HEADER_VALUE_BAD_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class HeaderError(ValueError):
    """A malformed or oversized header block; ``status`` is what a server answers it with."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


def read_header_lines(stream):
    """Read header lines up to the blank line into Headers; HeaderError on malformed or oversized ones.

    Used for requests (by the handler) and for answers (by Response), so both sides apply the same rules.
    """
    headers = Headers()
    for _ in range(MAX_HEADERS + 1):
        line = stream.readline(MAX_HEADER_LINE + 1)
        if len(line) > MAX_HEADER_LINE:
            raise HeaderError(f"a header line is longer than {MAX_HEADER_LINE} bytes", 431)
        if line in (b"\r\n", b"\n", b""):
            return headers
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep or not TOKEN_RE.fullmatch(name):  # also refuses obs-fold continuation lines
            raise HeaderError("malformed header line")
        name = name.lower()
        value = value.strip(" \t\r\n")
        if HEADER_VALUE_BAD_RE.search(value):
            raise HeaderError(f"control character in the value of header {name!r}")
        headers[name] = headers[name] + ", " + value if name in headers else value
    raise HeaderError(f"more than {MAX_HEADERS} headers", 431)


class ConnectionPool:
    """Idle keep-alive connections by (host, port). A connection is taken out while in use, then put back.

    Each peer's idle connections are a stack, most recently used on top. One idle for longer than ``max_idle``
    is closed rather than reused: servers close idle connections on their own timers (simplemesh after
    KEEPALIVE_TIMEOUT, 75 s), and reusing one just as its server closes it fails the call.
    """

    def __init__(self, max_idle_per_peer=256, max_idle=30.0):
        self.idle = {}  # (host, port) -> [(connection, idle since), ...]
        self.lock = threading.Lock()
        self.max_idle_per_peer = max_idle_per_peer
        self.max_idle = max_idle

    def take(self, address, timeout):
        while True:
            with self.lock:
                stack = self.idle.get(address)
                connection, since = stack.pop() if stack else (None, 0.0)
            if connection is None:
                return Connection(address[0], address[1], timeout=timeout)
            if time.monotonic() - since < self.max_idle and _still_open(connection.sock):  # outside the lock
                connection.sock.settimeout(timeout)
                return connection
            connection.close()

    def give_back(self, address, connection):
        now = time.monotonic()
        with self.lock:
            stack = self.idle.setdefault(address, [])
            expired = 0
            while expired < len(stack) and now - stack[expired][1] >= self.max_idle:
                expired += 1  # the bottom of the stack: connections no burst has needed for a while
            stale = [old for old, _since in stack[:expired]]
            del stack[:expired]
            if len(stack) < self.max_idle_per_peer:
                stack.append((connection, now))
                connection = None
        for old in stale:
            old.close()
        if connection is not None:
            connection.close()

    def close(self):
        with self.lock:
            for stack in self.idle.values():
                for connection, _since in stack:
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


class Peer:
    """Where one call goes: the address to connect to and the Host header the mesh routes by."""
    __slots__ = ("address", "host_header", "url")

    def __init__(self, address, host_header, url):
        self.address = address
        self.host_header = host_header
        self.url = url


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
        self.wake = threading.Condition(threading.Lock())  # not the default RLock: cheaper, and never re-entered
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
    if length and is_number(length) and (len(length) > 18 or int(length) > max_answer):
        raise CallFailed(f"answer of {length} bytes is above MAX_UPSTREAM_BODY={max_answer}", code=response.status)
    data = response.read(max_answer + 1)  # nothing for HEAD, but reading it frees the connection for reuse
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


def caller_record(target, url, status, error, elapsed, timeout=False):
    """The record a caller writes for a call that got no simplemesh answer (SPEC 3): it never leaves the tree."""
    record = {"host": target.name, "url": url, "status": status, "elapsed_time": round(elapsed, 6)}
    if error:
        record["error"] = error
    if timeout:
        record["timeout"] = True  # this call timed out: the caller answers 504, not 502
    return record


def child_record(target, url, status, content_type, data, method, elapsed):
    """The record of one call: the callee's own answer when it gave one, else one written by the caller."""
    if method == "HEAD":
        return caller_record(target, url, status, f"answered {status}" if status >= 400 else "", elapsed)
    if "json" in content_type:
        try:
            answer = json.loads(data)
        except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
            answer = None
        if isinstance(answer, dict) and "host" in answer:
            return answer
    snippet = data[:200].decode("utf-8", "replace").strip()
    return caller_record(target, url, status,
                         f"answered {status} without a simplemesh answer" + (f": {snippet}" if snippet else ""), elapsed)


# --- The answer and its views ------------------------------------------------------------------------------
# SPEC 3. A node's record is a plain dict (field names of the original kept) so every view renders the same tree:
# JSON, render_tree() for a terminal and render_html() for a browser; the views are pure functions of the record.

class SecondFormat:
    """A time format applied once a second: formatting the times of every answer costs a few percent otherwise."""

    def __init__(self, pattern):
        self.pattern = pattern
        self.last = (None, "")  # one tuple, so no thread reads one second's number with another's text

    def __call__(self, seconds):
        second, text = self.last
        if second != seconds:
            text = time.strftime(self.pattern, time.gmtime(seconds))
            self.last = (seconds, text)
        return text


ISO_SECONDS = SecondFormat("%Y-%m-%dT%H:%M:%S")
HTTP_DATE = SecondFormat("%a, %d %b %Y %H:%M:%S GMT")


def iso_time(epoch):
    """RFC 3339 UTC with microseconds."""
    seconds = int(epoch)
    return f"{ISO_SECONDS(seconds)}.{int((epoch - seconds) * 1e6):06d}Z"


def node_status(own_failure, children):
    """SPEC 3: the injected failure if one fired; else 504 if one of its calls timed out, 502 if one failed or
    answered >= 400; else 200."""
    if own_failure:
        return own_failure
    worst = 200
    for child in children:
        if child.get("timeout") is True:
            return 504
        status = child.get("status")
        if not isinstance(status, int) or status >= 400:
            worst = 502
    return worst


def pad_record(record, size):
    """Grow the record with a ``padding`` field so its JSON is about ``size`` bytes."""
    missing = size - len(json.dumps(record)) - len(', "padding": ""')
    if missing > 0:
        record["padding"] = "x" * missing
    return record


def error_outcome(host, status, message, **extra):
    """An Outcome carrying an error answer."""
    return Outcome(status, error_answer(host, status, message, **extra))


def error_answer(host, status, message, **extra):
    """A 4xx/5xx answer that still reads as a node record, so it nests in a caller's tree."""
    record = {"host": host, "status": status, "error": message}
    record.update(extra)
    return record

def choose_view(query, accept):
    """The view a request asks for: ``?view=json|tree|html``, else html for a browser (``Accept: text/html``),
    else json; None for an unknown ``view``. Cheap on purpose: it runs on every routed request."""
    if "view" in query.lower():
        for item in query.split("&"):
            key, sep, value = item.partition("=")
            if key.lower() == "view":
                value = unquote(value).lower()
                return value if value in VIEWS else None
    return "html" if "text/html" in accept else "json"


VIEWS = ("json", "tree", "html")


def view_route(path, query):
    """The route as a user would type it again: the path without its leading "/" and the query without ``view``."""
    query = "&".join(item for item in query.split("&") if item and item.partition("=")[0].lower() != "view")
    return path[1:] + ("?" + query if query else "")


class Hop(Record):
    """One record of the tree, read defensively (a downstream answer may be any JSON) and placed in time."""
    index: int
    parent: int  # index of the parent hop, -1 for the root
    depth: int
    last: tuple  # for each level down to this hop: is that ancestor (or this hop) its parent's last child?
    record: dict
    host: str
    status: object  # int, or None when the record has none (a reset)
    elapsed: float
    delay: float
    error: str
    failed: bool = False
    origin: bool = False  # failed, and not because of a call below it: where the failure comes from
    start: float = 0.0  # seconds from the root's start
    estimated: bool = False  # no start_time in the record: the start is inferred from its siblings


def _number(value):
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return 0.0  # JSON allows NaN and Infinity; a bar cannot be drawn with them


def _epoch(text):
    """Seconds since the epoch of a record's ``start_time``, or None."""
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except (ValueError, OverflowError, OSError):
        return None


def walk_tree(record):
    """The hops of a record in display order (depth first), each placed on the root's time line.

    Iterative, so no answer nests deep enough to exhaust the stack. A start comes from the hop's own
    ``start_time`` (clocks of different nodes can differ a little: a child is kept inside its parent's span);
    a record written by the caller has none, so its call is taken to start when the previous sibling ended
    (sequential fan-out), or after the parent's delay.
    """
    hops = []
    root_epoch = _epoch(record.get("start_time")) if isinstance(record, dict) else None
    stack = [(record, -1, 0, ())]
    cursors = {}  # parent index -> where its next estimated call starts
    while stack:
        item, parent, depth, last = stack.pop()
        if not isinstance(item, dict):
            item = {"host": "?", "error": "not a record"}
        status = item.get("status")
        hop = Hop(index=len(hops), parent=parent, depth=depth, last=last, record=item,
                  host=str(item.get("host", "?")) + (f"@{item['version']}" if item.get("version") else ""),
                  status=status if isinstance(status, int) and not isinstance(status, bool) else None,
                  elapsed=max(0.0, _number(item.get("elapsed_time"))), delay=max(0.0, _number(item.get("delay"))),
                  error=str(item.get("error") or ""))
        hop.failed = hop.status is None or hop.status >= 400
        if parent >= 0:
            above = hops[parent]
            epoch = _epoch(item.get("start_time"))
            if epoch is None or root_epoch is None:
                start, hop.estimated = cursors.get(parent, above.start + above.delay), True
            else:
                start = epoch - root_epoch
            hop.elapsed = min(hop.elapsed, above.elapsed)
            hop.start = min(max(start, above.start), above.start + above.elapsed - hop.elapsed)
            cursors[parent] = hop.start + hop.elapsed
        hops.append(hop)
        children = item.get("next_node")
        children = children if isinstance(children, list) else []
        for position in range(len(children) - 1, -1, -1):
            stack.append((children[position], hop.index, depth + 1, last + (position == len(children) - 1,)))
    for hop in hops:
        hop.origin = hop.failed
    for hop in hops:
        if hop.failed and hop.parent >= 0:
            hops[hop.parent].origin = False
    return hops


def format_seconds(seconds):
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.3f} s"


def _tree_prefix(hop):
    if hop.depth == 0:
        return ""
    guides = "".join("   " if last else "│  " for last in hop.last[:-1])
    return guides + ("└─ " if hop.last[-1] else "├─ ")


ANSI = {"ok": "\033[32m", "client": "\033[33m", "fail": "\033[31m", "bold": "\033[1m", "dim": "\033[2m",
        "reset": "\033[0m"}


def _status_class(status):
    if status is None or status >= 500:
        return "fail"
    return "client" if status >= 400 else "ok"


def render_tree(record, color=False):
    """The call tree as aligned plain text for a terminal (ANSI colours with ``color``), trace id on top."""
    hops = walk_tree(record)
    paint = (lambda text, *styles: "".join(ANSI[s] for s in styles) + text + ANSI["reset"]) if color else \
        (lambda text, *styles: text)
    labels = [_tree_prefix(hop) + hop.host for hop in hops]
    width = max(len(label) for label in labels)
    times = [format_seconds(hop.elapsed) for hop in hops]
    time_width = max(len(text) for text in times)
    root = hops[0]
    lines = []
    if isinstance(record, dict) and record.get("trace_id"):
        lines.append(paint(f"trace {record['trace_id']}", "dim"))
    for hop, label, elapsed in zip(hops, labels, times):
        status = "---" if hop.status is None else str(hop.status)
        notes = []
        if hop.delay:
            notes.append(f"delay {format_seconds(hop.delay)}")
        cpu = hop.record.get("cpu") if isinstance(hop.record, dict) else None
        if isinstance(cpu, (int, float)) and not isinstance(cpu, bool) and cpu > 0:
            notes.append(f"cpu {format_seconds(_number(cpu))}")
        if hop.failed:
            mark = "✗ " + (hop.error or ("reset" if hop.status is None else f"status {hop.status}"))
            notes.append(paint(mark, "fail", "bold") if hop.origin else paint(mark, "dim"))
        line = (f"{label:<{width}}  {paint(f'{status:>3}', _status_class(hop.status))}  {elapsed:>{time_width}}"
                + ("  " + "  ".join(notes) if notes else ""))
        lines.append(line.rstrip())
    origins = [hop for hop in hops if hop.origin]
    if origins:
        lines.append(paint(f"{len(origins)} failed hop{'s' if len(origins) > 1 else ''}: "
                           + ", ".join(hop.host for hop in origins), "fail"))
    elif root.status is not None and root.status < 400:
        lines.append(paint(f"ok: {len(hops)} hop{'s' if len(hops) > 1 else ''} "
                           f"in {format_seconds(root.elapsed)}", "ok"))
    return "\n".join(lines) + "\n"


def trace_link(trace_ui_url, trace_id):
    """TRACE_UI_URL with ``{trace_id}`` filled in (or the id appended), e.g. http://jaeger:16686/trace/{trace_id}."""
    if not trace_ui_url or not trace_id:
        return ""
    return trace_ui_url.replace("{trace_id}", trace_id) if "{trace_id}" in trace_ui_url else trace_ui_url + trace_id


HTML_CSP = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:; "
            "form-action 'self'; base-uri 'none'")


def render_html(record, route, trace_ui_url=""):
    """A self-contained page (inline CSS and JS, no other request) drawing the call tree as a waterfall."""
    esc = html.escape
    hops = walk_tree(record)
    total = max([hop.start + hop.elapsed for hop in hops] + [1e-9])
    root = hops[0]
    trace_id = str(record.get("trace_id", "")) if isinstance(record, dict) else ""
    link = trace_link(trace_ui_url, trace_id)
    trace = (f'<a id="trace" href="{esc(link)}">{esc(trace_id)}</a>' if link else
             f'<span id="trace">{esc(trace_id)}</span>') if trace_id else '<span id="trace">none</span>'
    rows = []
    for hop in hops:
        left, width = 100 * hop.start / total, max(100 * hop.elapsed / total, 0.2)
        delay = min(100.0, 100 * hop.delay / hop.elapsed) if hop.elapsed else 0.0
        label = format_seconds(hop.elapsed) + (f" · {hop.error}" if hop.failed and hop.error else "")
        if left + width <= 65:  # the label goes after the bar, before it, or on a bar too wide for either
            side = f"left:{left + width:.3f}%"
        elif left >= 35:
            side = f"right:{100 - left:.3f}%"
        else:
            side = f"left:{left:.3f}%;color:#fff"
        classes = " ".join(["hop", _status_class(hop.status)] + ["failed"] * hop.failed + ["origin"] * hop.origin)
        guides = "".join(f'<i class="g{" end" if last else ""}"></i>' for last in hop.last)
        details = "".join(f"<dt>{esc(str(key))}</dt><dd>{esc(str(value))}</dd>"
                          for key, value in hop.record.items() if key not in ("next_node", "padding", "headers"))
        rows.append(
            f'<div class="{classes}" data-index="{hop.index}" data-parent="{hop.parent}" data-depth="{hop.depth}" '
            f'data-host="{esc(hop.host)}" data-status="{hop.status or ""}">'
            f'<div class="name">{guides}<b>{esc(hop.host)}</b><span class="code">{hop.status or "reset"}</span>'
            f'</div><div class="lane"><div class="bar" style="left:{left:.3f}%;width:{width:.3f}%"'
            f'{" title=estimated" if hop.estimated else ""}><div class="delay" style="width:{delay:.1f}%"></div>'
            f'</div><span class="label" style="{side}">{esc(label)}</span></div>'
            f'<dl class="details" hidden>{details}</dl></div>')
    ticks = "".join(f'<span style="left:{25 * i}%">{format_seconds(total * i / 4)}</span>' for i in range(5))
    status = "reset" if root.status is None else root.status
    return HTML_PAGE.format(
        title=esc(f"{status} /{route}"), route=esc(route), status=status, cls=_status_class(root.status),
        elapsed=format_seconds(root.elapsed), hops=len(hops), failed=sum(hop.origin for hop in hops),
        trace=trace, ticks=ticks, rows="\n".join(rows),
        json_link=esc("/" + route + ("&" if "?" in route else "?") + "view=json"),
        tree_link=esc("/" + route + ("&" if "?" in route else "?") + "view=tree"))


# The page: str.format fields in single braces, CSS and JS braces doubled.
HTML_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,"><title>simple-mesh {title}</title>
<style>
body{{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}}
header{{padding:12px 20px;background:#fff;border-bottom:1px solid #ddd}}
form{{display:flex;gap:8px;margin-bottom:8px}} input{{flex:1;font:14px monospace;padding:6px}}
button{{padding:6px 16px}} .meta span{{margin-right:18px}} .meta a{{margin-right:10px}}
.ok{{--c:#2e9d4b}} .client{{--c:#d48a00}} .fail{{--c:#d33}}
.pill{{color:#fff;background:var(--c);border-radius:3px;padding:1px 6px;font-weight:bold}}
main{{padding:12px 20px}} .hop,.axis{{display:grid;grid-template-columns:minmax(180px,26%) 1fr;align-items:center}}
.hop{{min-height:26px;border-bottom:1px solid #eee;cursor:pointer}} .hop:hover{{background:#f0f4ff}}
.name{{white-space:nowrap;overflow:hidden;text-overflow:ellipsis;display:flex;align-items:center}}
.name b{{font-weight:600;margin-right:6px}} .code{{color:var(--c);font-size:12px}}
.g{{display:inline-block;width:14px;height:26px;border-left:1px solid #bbb;margin-left:6px}}
.g.end{{border-left-color:transparent}}
.lane{{position:relative;height:26px}}
.bar{{position:absolute;top:6px;height:14px;background:var(--c);border-radius:2px;min-width:2px;overflow:hidden}}
.bar[title]{{opacity:.7}}
.delay{{height:100%;background:repeating-linear-gradient(45deg,#fff6,#fff6 3px,transparent 3px,transparent 6px)}}
.label{{position:absolute;top:4px;padding:0 6px;font-size:12px;white-space:nowrap;color:#555}}
.failed .label{{color:#b00;font-weight:600}} .origin .name b{{color:#b00}} .origin{{background:#fff1f1}}
.axis{{font-size:11px;color:#777;white-space:nowrap}} .axis div{{position:relative;height:16px}}
.axis span{{position:absolute;transform:translateX(-50%)}} .axis span:first-child{{transform:none}}
.axis span:last-child{{transform:translateX(-100%)}}
.details{{grid-column:1/3;display:grid;grid-template-columns:max-content 1fr;gap:0 12px;margin:4px 0 8px 20px;
font:12px monospace}}
.details[hidden]{{display:none}} dd{{margin:0;word-break:break-all}}
</style></head>
<body><header>
<form id="run"><input id="route" name="route" value="{route}" placeholder="b/c~d;delay=100ms" autofocus>
<button>Run</button></form>
<div class="meta"><span class="{cls}">status <span class="pill" id="status">{status}</span></span>
<span>total <b>{elapsed}</b></span><span>{hops} hops, {failed} failed</span>
<span>trace {trace}</span><a href="{json_link}">JSON</a><a href="{tree_link}">text tree</a></div>
</header><main>
<div class="axis"><div></div><div>{ticks}</div></div>
<div id="waterfall">
{rows}
</div></main>
<script>
document.getElementById("run").addEventListener("submit", function (event) {{
  event.preventDefault();
  location.assign("/" + document.getElementById("route").value.trim().replace(/^\\/+/, ""));
}});
document.getElementById("waterfall").addEventListener("click", function (event) {{
  var hop = event.target.closest(".hop");
  if (hop) {{ var details = hop.querySelector(".details"); details.hidden = !details.hidden; }}
}});
</script></body></html>
"""


# --- Metrics -----------------------------------------------------------------------------------------------
# SPEC 4. Hand-written Prometheus text exposition (0.0.4), or OpenMetrics 1.0 with trace-id exemplars on the
# histogram buckets when the scraper asks for it. Labels stay bounded: codes, methods, kinds, span-export
# results and at most MAX_TARGET_LABELS target names; any further target is counted as "other".

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
MAX_TARGET_LABELS = 50
SPAN_RESULTS = ("exported", "failed", "dropped", "rejected")
OPENMETRICS_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = {}  # (method, code) -> count
        self.request_buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.request_exemplars = [None] * (len(DURATION_BUCKETS) + 1)  # the latest (trace id, value, time)
        self.request_sum = 0.0
        self.calls = {}  # (target, code) -> count
        self.call_histograms = {}  # target -> [buckets..., sum]
        self.call_exemplars = {}  # target -> [exemplar per bucket]
        self.faults = {}  # kind -> count
        self.spans = dict.fromkeys(SPAN_RESULTS, 0)
        self.span_retries = 0
        self.in_flight = 0
        self.start_time = time.time()

    def target_label(self, name):
        if name in self.call_histograms or len(self.call_histograms) < MAX_TARGET_LABELS:
            return name
        return "other"

    def observe_request(self, method, code, seconds, trace=None):
        """Count one answered request; a sampled ``trace`` becomes the exemplar of its bucket."""
        key = (method, code)
        index = bisect.bisect_left(DURATION_BUCKETS, seconds)
        with self.lock:
            self.requests[key] = self.requests.get(key, 0) + 1
            self.request_buckets[index] += 1
            self.request_sum += seconds
            if trace is not None and trace.flags & FLAG_SAMPLED:
                self.request_exemplars[index] = (trace.trace_id, seconds, time.time())

    def observe_call(self, target, code, seconds, trace=None):
        index = bisect.bisect_left(DURATION_BUCKETS, seconds)
        with self.lock:
            label = self.target_label(target)
            key = (label, code)
            self.calls[key] = self.calls.get(key, 0) + 1
            histogram = self.call_histograms.get(label)
            if histogram is None:
                histogram = self.call_histograms[label] = [0] * (len(DURATION_BUCKETS) + 1) + [0.0]
                self.call_exemplars[label] = [None] * (len(DURATION_BUCKETS) + 1)
            histogram[index] += 1
            histogram[-1] += seconds
            if trace is not None and trace.flags & FLAG_SAMPLED:
                self.call_exemplars[label][index] = (trace.trace_id, seconds, time.time())

    def count_fault(self, kind):
        with self.lock:
            self.faults[kind] = self.faults.get(kind, 0) + 1

    def count_spans(self, result, count=1):
        with self.lock:
            self.spans[result] += count

    def count_span_retry(self):
        with self.lock:
            self.span_retries += 1

    def render(self, openmetrics=False):
        """The Prometheus text format (version 0.0.4), or OpenMetrics 1.0 with exemplars."""
        with self.lock:
            requests = dict(self.requests)
            request_buckets = list(self.request_buckets)
            request_exemplars = list(self.request_exemplars) if openmetrics else None
            request_sum = self.request_sum
            calls = dict(self.calls)
            call_histograms = {k: list(v) for k, v in self.call_histograms.items()}
            call_exemplars = {k: list(v) for k, v in self.call_exemplars.items()} if openmetrics else {}
            faults = dict(self.faults)
            spans = dict(self.spans)
            span_retries = self.span_retries
            in_flight = self.in_flight
        om = openmetrics
        out = []
        family(out, "simplemesh_http_requests", "counter", "Requests answered, by method and status code.", om)
        for (method, code), count in sorted(requests.items()):
            out.append(f'simplemesh_http_requests_total{{method="{method}",code="{code}"}} {count}')
        family(out, "simplemesh_http_request_duration_seconds", "histogram",
               "Time from receiving a request to answering it, downstream calls included.", om)
        histogram_lines(out, "simplemesh_http_request_duration_seconds", "", request_buckets, request_sum,
                        request_exemplars)
        family(out, "simplemesh_calls", "counter",
               "Downstream calls, by target and status code (error: no HTTP answer; timeout).", om)
        for (target, code), count in sorted(calls.items()):
            out.append(f'simplemesh_calls_total{{target="{target}",code="{code}"}} {count}')
        family(out, "simplemesh_call_duration_seconds", "histogram", "Duration of downstream calls, by target.", om)
        for target, histogram in sorted(call_histograms.items()):
            histogram_lines(out, "simplemesh_call_duration_seconds", f'target="{target}",',
                            histogram[:-1], histogram[-1], call_exemplars.get(target))
        family(out, "simplemesh_in_flight_requests", "gauge", "Requests being served now.", om)
        out.append(f"simplemesh_in_flight_requests {in_flight}")
        family(out, "simplemesh_faults", "counter", "Injected faults, by kind.", om)
        for kind in ("delay", "error", "reset", "cpu"):
            out.append(f'simplemesh_faults_total{{kind="{kind}"}} {faults.get(kind, 0)}')
        family(out, "simplemesh_spans", "counter",
               "Spans by export result: exported, failed (the collector refused them or stayed unreachable) "
               "or dropped (the export queue was full).", om)
        for result in SPAN_RESULTS:
            out.append(f'simplemesh_spans_total{{result="{result}"}} {spans[result]}')
        family(out, "simplemesh_span_export_retries", "counter",
               "Span export requests retried after 429, 502, 503, 504 or no answer.", om)
        out.append(f"simplemesh_span_export_retries_total {span_retries}")
        process_metrics(out, self.start_time, om)
        if om:
            out.append("# EOF")
        return "\n".join(out) + "\n"


def family(out, name, kind, help_text, openmetrics=False):
    """HELP and TYPE of a family; a counter's family is named with _total in 0.0.4 and without in OpenMetrics."""
    if kind == "counter" and not openmetrics:
        name += "_total"
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")


def histogram_lines(out, name, labels, buckets, total, exemplars=None):
    running = 0
    for index, (bound, count) in enumerate(zip(DURATION_BUCKETS, buckets)):
        running += count
        out.append(f'{name}_bucket{{{labels}le="{bound}"}} {running}' + _exemplar(exemplars, index))
    running += buckets[-1]
    out.append(f'{name}_bucket{{{labels}le="+Inf"}} {running}' + _exemplar(exemplars, len(DURATION_BUCKETS)))
    label_set = "{" + labels.rstrip(",") + "}" if labels else ""
    out.append(f"{name}_sum{label_set} {total}")
    out.append(f"{name}_count{label_set} {running}")


def _exemplar(exemplars, index):
    if not exemplars or exemplars[index] is None:
        return ""
    trace_id, value, timestamp = exemplars[index]
    return f' # {{trace_id="{trace_id}"}} {value} {timestamp:.3f}'


def process_metrics(out, start_time, openmetrics=False):
    """The standard process_* family, read from /proc where there is one."""
    times = os.times()
    family(out, "process_cpu_seconds", "counter", "Total user and system CPU time spent in seconds.", openmetrics)
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


# --- Span export -------------------------------------------------------------------------------------------
# SPEC 5, native spans. TracingConfig reads the standard OTEL_* variables once; its sampler follows OpenTelemetry's
# consistent probability sampling. Request threads only append a slim tuple (the span's own strings and numbers,
# never the request) to a bounded queue; the SpanExporter thread encodes batches as OTLP/HTTP, binary protobuf
# by default as the SDKs do, or JSON with http/json, both written here with the standard library. It posts them
# to /v1/traces, retries 429/502/503/504 (and no answer) with backoff, honouring Retry-After, and counts the
# spans a partial-success answer says were rejected.

SPAN_KIND_SERVER = 2  # opentelemetry.proto.trace.v1.Span.SpanKind
SPAN_KIND_CLIENT = 3
STATUS_ERROR = 2
SPAN_FLAGS_HAS_IS_REMOTE = 0x100  # opentelemetry.proto.trace.v1.SpanFlags: bits 8 and 9 say if the parent is remote
SPAN_FLAGS_IS_REMOTE = 0x200
RETRYABLE_EXPORT = frozenset((429, 502, 503, 504))
EXPORT_BACKOFF = 0.5  # seconds before the first retry without Retry-After; doubled each time, up to 8 s
MAX_EXPORT_ANSWER = 64 * 1024  # bytes of a collector's answer read; an ExportTraceServiceResponse is tiny
OTLP_PROTOCOLS = {"http/protobuf": "application/x-protobuf", "http/json": "application/json"}
SAMPLERS = ("always_on", "always_off", "traceidratio",
            "parentbased_always_on", "parentbased_always_off", "parentbased_traceidratio")
PROPAGATORS = ("tracecontext", "baggage", "b3", "b3multi", "none")
MIN_SAMPLING_RATIO = 2.0 ** -56  # below this, "never" sampling, which "is not a form of probability sampling"
RANDOMNESS_MASK = (1 << 56) - 1  # the right-most 7 bytes of a trace id, random in W3C level 2


class TracingConfig(Record):
    """Native-span settings from OTEL_* variables; None from from_env() means mesh-only mode."""
    endpoint: str
    headers: tuple = ()
    timeout: float = 10.0  # one export request
    export_timeout: float = 30.0  # one batch, retries included
    compression: str = ""
    protocol: str = "http/protobuf"  # or "http/json"
    service_name: str = ""  # "" = the node's HOST
    resource: tuple = ()  # (key, value) pairs from OTEL_RESOURCE_ATTRIBUTES
    sampler: str = "parentbased_always_on"
    ratio: float = 1.0
    propagators: tuple = ("tracecontext", "baggage")
    max_queue: int = 2048
    max_batch: int = 512
    schedule_delay: float = 5.0

    @property
    def b3_forms(self):
        """The B3 forms OTEL_PROPAGATORS asks for: "b3" is the single header, "b3multi" the x-b3-* ones."""
        return _b3_forms(self.propagators)

    @classmethod
    def from_env(cls, environ):
        def get(name):
            return (environ.get(name) or "").strip()

        def signal(name):  # the traces-specific variable wins over the general one
            return get(name.replace("OTLP_", "OTLP_TRACES_")) or get(name)

        def number(name, convert, default, scale=1.0):
            text = get(name)
            if not text:
                return default
            try:
                value = convert(text)
            except ValueError:
                raise ConfigError(f"{name}={text!r}: expected a number") from None
            if value <= 0:
                raise ConfigError(f"{name}={text!r}: must be above zero")
            return value * scale

        if get("OTEL_SDK_DISABLED").lower() == "true":
            return None
        exporter = get("OTEL_TRACES_EXPORTER").lower() or "otlp"
        if exporter == "none":
            return None
        if exporter != "otlp":
            raise ConfigError(f"OTEL_TRACES_EXPORTER={exporter!r}: only otlp (or none) is supported")
        endpoint = get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        if not endpoint and get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            endpoint = get("OTEL_EXPORTER_OTLP_ENDPOINT").rstrip("/") + "/v1/traces"
        if not endpoint:
            return None
        try:
            url = urlsplit(endpoint)
            good = url.scheme in ("http", "https") and url.hostname and (url.port is None or url.port > 0)
        except ValueError:
            good = False
        if not good:
            raise ConfigError(f"OTLP traces endpoint {endpoint!r}: expected an http:// or https:// URL")
        protocol = otlp_protocol(get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"), get("OTEL_EXPORTER_OTLP_PROTOCOL"))
        compression = signal("OTEL_EXPORTER_OTLP_COMPRESSION").lower()
        if compression not in ("", "none", "gzip"):
            raise ConfigError(f"OTEL_EXPORTER_OTLP_COMPRESSION={compression!r}: expected gzip or none")
        try:
            headers = tuple(parse_key_values(get("OTEL_EXPORTER_OTLP_HEADERS")).items()) + tuple(
                parse_key_values(get("OTEL_EXPORTER_OTLP_TRACES_HEADERS")).items())
            resource = parse_key_values(get("OTEL_RESOURCE_ATTRIBUTES"))
        except ValueError as error:
            raise ConfigError(f"OTEL_EXPORTER_OTLP_HEADERS or OTEL_RESOURCE_ATTRIBUTES: {error}") from None
        service_name = get("OTEL_SERVICE_NAME") or resource.pop("service.name", "")
        sampler = get("OTEL_TRACES_SAMPLER").lower() or "parentbased_always_on"
        if sampler not in SAMPLERS:
            raise ConfigError(f"OTEL_TRACES_SAMPLER={sampler!r}: expected one of {', '.join(SAMPLERS)}")
        ratio = 1.0
        if sampler.endswith("traceidratio") and get("OTEL_TRACES_SAMPLER_ARG"):
            try:
                ratio = parse_probability(get("OTEL_TRACES_SAMPLER_ARG"))
            except ValueError as error:
                raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG: {error}") from None
        propagators = tuple(word.lower() for word in _word_list(get("OTEL_PROPAGATORS"))) or cls.propagators
        for name in propagators:
            if name not in PROPAGATORS:
                raise ConfigError(f"OTEL_PROPAGATORS: {name!r} is not one of {', '.join(PROPAGATORS)}")
        max_queue = number("OTEL_BSP_MAX_QUEUE_SIZE", int, 2048)
        timeout_name = ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT" if get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
                        else "OTEL_EXPORTER_OTLP_TIMEOUT")
        return cls(
            endpoint=endpoint, headers=headers, compression="gzip" if compression == "gzip" else "",
            protocol=protocol, timeout=number(timeout_name, float, 10.0, 0.001),
            export_timeout=number("OTEL_BSP_EXPORT_TIMEOUT", float, 30.0, 0.001),
            service_name=service_name, resource=tuple(resource.items()), sampler=sampler, ratio=ratio,
            propagators=propagators, max_queue=max_queue,
            max_batch=min(number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", int, 512), max_queue),
            schedule_delay=number("OTEL_BSP_SCHEDULE_DELAY", float, 5.0, 0.001))

    def sample(self, trace_id, parent_sampled, members=()):
        """(sampled, tracestate members) for a new SERVER span; ``parent_sampled`` is None at a trace's root.

        The ratio samplers are OpenTelemetry's consistent probability sampling, so every node of a trace (and
        every current SDK) decides alike; ``members`` gets the ``ot`` entry's ``th`` as the SDK sampler sets it.
        """
        sampler = self.sampler
        if sampler.startswith("parentbased_"):
            if parent_sampled is not None:
                return parent_sampled, parent_threshold(trace_id, parent_sampled, members)
            sampler = sampler[12:]
        if sampler == "always_on":
            return True, members
        if sampler == "always_off":
            return False, members
        return ratio_sample(self.ratio, trace_id, members)


def otlp_protocol(traces_setting, general_setting):
    """The OTLP protocol the variables ask for: the traces-specific one wins; http/protobuf is the SDKs' default."""
    name, protocol = (("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", traces_setting) if traces_setting
                      else ("OTEL_EXPORTER_OTLP_PROTOCOL", general_setting or "http/protobuf"))
    if protocol.lower() not in OTLP_PROTOCOLS:
        raise ConfigError(f"{name}={protocol!r}: simple-mesh exports OTLP over HTTP (port 4318) as http/protobuf "
                          "(the default) or http/json; gRPC is not supported")
    return protocol.lower()


@functools.lru_cache(maxsize=None)
def _b3_forms(propagators):
    return tuple(form for form, name in (("single", "b3"), ("multi", "b3multi")) if name in propagators)


@functools.lru_cache(maxsize=64)
def ratio_threshold(ratio, precision=4):
    """(``th`` text, 56-bit rejection threshold) for a sampling ratio in [2^-56, 1].

    As OpenTelemetry's "Converting floating-point probability to threshold value" computes it, with the 4 hex
    digits of precision it recommends to SDKs: 0.25 -> "c", 0.1 -> "e666", 0.01 -> "fd70a".
    """
    if ratio >= 1.0:
        return "0", 0
    _mantissa, exponent = math.frexp(ratio)
    precision = max(1, min(12, precision + exponent // -4))  # more digits for ratios near zero
    rejection = 2.0 - ratio + math.ldexp(0.5, -4 * precision)  # in [1, 2), rounded at the last digit kept
    digits = "fffffffffffff" if rejection >= 2.0 else rejection.hex()[4:-3]
    text = digits[:precision].rstrip("0") or "0"
    return text, int(text.ljust(14, "0"), 16)


def trace_randomness(trace_id, members):
    """The 56 random bits a consistent sampler compares: the ``ot`` entry's explicit ``rv`` when it is valid
    (14 lowercase hex digits), else the trace id's least-significant 56 bits (W3C level 2)."""
    explicit = ot_subkeys(members).get("rv", "")
    if len(explicit) == 14 and _is_hex(explicit):
        return int(explicit, 16)
    return int(trace_id, 16) & RANDOMNESS_MASK


def ratio_sample(ratio, trace_id, members):
    """TraceIdRatioBased: sampled when randomness >= the rejection threshold; a sampled span's tracestate gets
    ``ot=th:<threshold>``, an unsampled one keeps no threshold (its sampling probability is not that one)."""
    if ratio < MIN_SAMPLING_RATIO:
        return False, with_ot_threshold(members, None)
    text, threshold = ratio_threshold(ratio)
    sampled = trace_randomness(trace_id, members) >= threshold
    return sampled, with_ot_threshold(members, text if sampled else None)


def parent_threshold(trace_id, parent_sampled, members):
    """A parent-based decision keeps the parent's ``th``, unless it is "apparently inconsistent" (the sampled
    flag does not match ``rv >= th``) or malformed: then OpenTelemetry says to erase it."""
    text = ot_subkeys(members).get("th")
    if text is None:
        return members
    consistent = 1 <= len(text) <= 14 and _is_hex(text) and \
        (trace_randomness(trace_id, members) >= int(text.ljust(14, "0"), 16)) == parent_sampled
    return members if consistent else with_ot_threshold(members, None)


def parse_key_values(text):
    """``k1=v1,k2=v2`` with percent-encoded values (OTEL_RESOURCE_ATTRIBUTES, OTEL_EXPORTER_OTLP_HEADERS)."""
    return {unquote(key): unquote(value) for key, value in split_pairs(text, "key=value")}


def node_resource(config):
    """The OTLP resource of one node: its service name (HOST unless OTEL_SERVICE_NAME says), pod identity."""
    tracing = config.tracing
    attributes = {"service.name": tracing.service_name or config.host}
    if config.version:
        attributes["service.version"] = config.version
    for key, name in (("pod", "k8s.pod.name"), ("namespace", "k8s.namespace.name"), ("node", "k8s.node.name")):
        if key in config.identity:
            attributes[name] = config.identity[key]
    attributes.update({"telemetry.sdk.name": "simplemesh", "telemetry.sdk.language": "python",
                       "telemetry.sdk.version": __version__})
    for key, value in tracing.resource:
        attributes.setdefault(key, value)
    return attributes


# What the queue holds: a request thread builds one of these slim tuples (strings and numbers only) and the
# export thread turns it into a Span. A queued span never keeps the request, its headers or its body alive.

def server_span(trace, request, status, end_ns):
    """The SERVER span of one request, as the slim tuple the exporter queues."""
    headers = request.headers
    return (SPAN_KIND_SERVER, trace.trace_id, trace.span_id, trace.parent_id, trace.flags, trace.tracestate,
            tuple(trace.events or ()), request.method, request.path, request.query, headers.get("host") or "",
            headers.get("user-agent") or "", status, int(request.received_wall * 1e9), end_ns)


def client_span(trace, span_id, method, target_name, peer, status, error, start_ns, end_ns):
    """The CLIENT span of one downstream call; ``error`` is why it got no answer ("" when it got one)."""
    return (SPAN_KIND_CLIENT, trace.trace_id, span_id, trace.span_id, trace.flags, method, target_name,
            peer.address[1], peer.url, status, error, start_ns, end_ns)


class Span(Record):
    """One span as both OTLP encodings write it; ``events`` are (name, time ns, attributes) triples."""
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict
    events: tuple = ()
    status_code: int = 0
    status_message: str = ""
    trace_state: str = ""
    flags: int = 0  # W3C trace flags in bits 0-7, and whether the parent is remote (SpanFlags)


def span_from_queue(queued):
    return _server_span_fields(queued) if queued[0] == SPAN_KIND_SERVER else _client_span_fields(queued)


def _server_span_fields(queued):
    """HTTP semantic-convention attributes of a SERVER span, and its fault events."""
    (_kind, trace_id, span_id, parent_id, flags, tracestate, events, method, path, query, host_header, user_agent,
     status, start_ns, end_ns) = queued
    host, _, port = host_header.rpartition(":")
    if not is_number(port) or len(port) > 5:
        host, port = host_header, ""
    attributes = {"http.request.method": method, "url.scheme": "http", "url.path": path}
    if query:
        attributes["url.query"] = query
    if host:
        attributes["server.address"] = host
    if port:
        attributes["server.port"] = int(port)
    attributes["network.protocol.version"] = "1.1"
    if user_agent:
        attributes["user_agent.original"] = user_agent
    if status:
        attributes["http.response.status_code"] = status
    error = not status or status >= 500  # semconv: a server's 4xx is the client's fault, not a span error
    if error:
        attributes["error.type"] = str(status) if status else "reset"
    remote = SPAN_FLAGS_HAS_IS_REMOTE | (SPAN_FLAGS_IS_REMOTE if parent_id else 0)
    return Span(trace_id, span_id, parent_id, method, SPAN_KIND_SERVER, start_ns, max(end_ns, start_ns),
                attributes, events, STATUS_ERROR if error else 0, "", tracestate, (flags & 0xFF) | remote)


def _client_span_fields(queued):
    _kind, trace_id, span_id, parent_id, flags, method, target, port, url, status, error, start_ns, end_ns = queued
    attributes = {"http.request.method": method, "server.address": target, "server.port": port, "url.full": url}
    if status and not error:
        attributes["http.response.status_code"] = status
    failed = bool(error) or status >= 400
    if failed:
        attributes["error.type"] = ("timeout" if status == 504 else "connection") if error else str(status)
    return Span(trace_id, span_id, parent_id, method, SPAN_KIND_CLIENT, start_ns, max(end_ns, start_ns),
                attributes, (), STATUS_ERROR if failed else 0, error, "", (flags & 0xFF) | SPAN_FLAGS_HAS_IS_REMOTE)


# OTLP JSON is written straight to text: building dicts for json.dumps costs about twice as much, and the export
# thread shares the GIL with the request threads. Ids are hex and int64s are strings, as OTLP's JSON mapping says.
_quote_ascii = json.encoder.encode_basestring_ascii


def _quote(text):
    """A JSON string; a lone surrogate (from undecodable request bytes) becomes U+FFFD, as UTF-8 requires."""
    return _quote_ascii(text if text.isascii() else text.encode("utf-8", "replace").decode("utf-8"))


def otlp_json_attributes(attributes):
    parts = []
    for key, value in attributes.items():
        if isinstance(value, bool):
            kind, text = "boolValue", "true" if value else "false"
        elif isinstance(value, int):
            kind, text = "intValue", f'"{value}"'
        elif isinstance(value, float):
            kind, text = "doubleValue", repr(value)
        else:
            kind, text = "stringValue", _quote(str(value))
        parts.append(f'{{"key":{_quote(key)},"value":{{"{kind}":{text}}}}}')
    return "[" + ",".join(parts) + "]"


def otlp_json_span(span):
    parent = f'"parentSpanId":"{span.parent_id}",' if span.parent_id else ""
    extra = f',"traceState":{_quote(span.trace_state)}' if span.trace_state else ""
    if span.events:
        extra += ',"events":[' + ",".join(
            f'{{"timeUnixNano":"{when}","name":{_quote(name)},"attributes":{otlp_json_attributes(values)}}}'
            for name, when, values in span.events) + "]"
    if span.status_code:
        message = f',"message":{_quote(span.status_message)}' if span.status_message else ""
        extra += f',"status":{{"code":{span.status_code}{message}}}'
    return (f'{{"traceId":"{span.trace_id}","spanId":"{span.span_id}",{parent}"flags":{span.flags},'
            f'"name":{_quote(span.name)},"kind":{span.kind},"startTimeUnixNano":"{span.start_ns}",'
            f'"endTimeUnixNano":"{span.end_ns}","attributes":{otlp_json_attributes(span.attributes)}{extra}}}')


def otlp_json(resource, spans):
    """An ExportTraceServiceRequest in OTLP/HTTP JSON (bytes)."""
    return (f'{{"resourceSpans":[{{"resource":{{"attributes":{otlp_json_attributes(resource)}}},'
            f'"scopeSpans":[{{"scope":{{"name":"simplemesh","version":{_quote(__version__)}}},"spans":['
            + ",".join(otlp_json_span(span) for span in spans) + "]}]}]}").encode()


# OTLP protobuf, by hand: the few messages a trace export needs, field numbers from opentelemetry-proto
# (collector/trace/v1, trace/v1, common/v1, resource/v1). Each message is its fields' bytes in number order;
# a nested message is a length-delimited field.

_ONE_BYTE_VARINTS = tuple(bytes((value,)) for value in range(0x80))


def pb_varint(value):
    if 0 <= value < 0x80:
        return _ONE_BYTE_VARINTS[value]
    value &= 0xFFFFFFFFFFFFFFFF  # a negative int64 is its 64-bit two's complement
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def pb_field(number, data):
    """A length-delimited field (bytes, string or message)."""
    return pb_varint(number << 3 | 2) + pb_varint(len(data)) + data


def pb_text(number, text):
    return pb_field(number, text.encode("utf-8", "replace"))


def pb_any_value(value):
    """AnyValue: 1 string_value, 2 bool_value, 3 int_value, 4 double_value."""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + pb_varint(value)
    if isinstance(value, float):
        return b"\x21" + struct.pack("<d", value)
    return pb_text(1, str(value))


def pb_key_values(number, attributes):
    """Repeated KeyValue (1 key, 2 value) as field ``number`` of the enclosing message.

    Most attributes repeat from span to span (method, port, status, host), so the bytes of short ones are kept
    in a bounded cache: it makes protobuf as cheap to write as JSON text.
    """
    return b"".join((pb_key_value_cached if not isinstance(value, str) or len(value) <= 64 else pb_key_value)(
        number, key, value) for key, value in attributes.items())


def pb_key_value(number, key, value):
    return pb_field(number, pb_text(1, key) + pb_field(2, pb_any_value(value)))


pb_key_value_cached = functools.lru_cache(maxsize=4096, typed=True)(pb_key_value)  # typed: True is not 1


def pb_span(span):
    """Span: 1 trace_id, 2 span_id, 3 trace_state, 4 parent_span_id, 5 name, 6 kind, 7/8 start/end (fixed64),
    9 attributes, 11 events (1 time fixed64, 2 name, 3 attributes), 15 status (2 message, 3 code), 16 flags."""
    parts = [pb_field(1, bytes.fromhex(span.trace_id)), pb_field(2, bytes.fromhex(span.span_id))]
    if span.trace_state:
        parts.append(pb_text(3, span.trace_state))
    if span.parent_id:
        parts.append(pb_field(4, bytes.fromhex(span.parent_id)))
    parts += [pb_text(5, span.name), b"\x30" + pb_varint(span.kind)]
    if span.start_ns:  # proto3 leaves a field at its default (0, "") out
        parts.append(struct.pack("<BQ", 0x39, span.start_ns))
    if span.end_ns:
        parts.append(struct.pack("<BQ", 0x41, span.end_ns))
    parts.append(pb_key_values(9, span.attributes))
    for name, when, values in span.events:
        parts.append(pb_field(11, struct.pack("<BQ", 0x09, when) + pb_text(2, name) + pb_key_values(3, values)))
    if span.status_code:
        message = pb_text(2, span.status_message) if span.status_message else b""
        parts.append(pb_field(15, message + b"\x18" + pb_varint(span.status_code)))
    parts.append(b"\x85\x01" + struct.pack("<I", span.flags))  # field 16, fixed32
    return b"".join(parts)


def otlp_protobuf(resource, spans):
    """An ExportTraceServiceRequest (1 resource_spans) > ResourceSpans (1 resource, 2 scope_spans) > ScopeSpans
    (1 scope, 2 spans), in the binary protobuf encoding."""
    scope = pb_text(1, "simplemesh") + pb_text(2, __version__)
    scope_spans = pb_field(1, scope) + b"".join(pb_field(2, pb_span(span)) for span in spans)
    return pb_field(1, pb_field(1, pb_key_values(1, resource)) + pb_field(2, scope_spans))


OTLP_ENCODERS = {"http/protobuf": otlp_protobuf, "http/json": otlp_json}


def pb_fields(data):
    """(number, wire type, value) of each field of a protobuf message; ValueError when it is malformed."""
    position = 0
    while position < len(data):
        key, position = _pb_read_varint(data, position)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, position = _pb_read_varint(data, position)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, position = data[position:position + size], position + size
        elif wire == 2:
            size, position = _pb_read_varint(data, position)
            value, position = data[position:position + size], position + size
        else:
            raise ValueError(f"protobuf wire type {wire}")
        if position > len(data):
            raise ValueError("protobuf field runs past the end")
        yield number, wire, value


def _pb_read_varint(data, position):
    value = shift = 0
    while True:
        if position >= len(data) or shift > 63:
            raise ValueError("bad protobuf varint")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, position


def export_partial_success(body, content_type):
    """(rejected spans, error message) of an ExportTraceServiceResponse's partial_success (1 rejected_spans,
    2 error_message), in the encoding its Content-Type names; (0, "") when there is none or it is unreadable."""
    try:
        if "json" in content_type:
            partial = json.loads(body or b"{}").get("partialSuccess") or {}
            return int(partial.get("rejectedSpans") or 0), str(partial.get("errorMessage") or "")
        rejected, message = 0, ""
        for number, wire, value in pb_fields(body):
            if number == 1 and wire == 2:
                for inner, inner_wire, inner_value in pb_fields(value):
                    if inner == 1 and inner_wire == 0:
                        rejected = inner_value - (1 << 64) if inner_value >= 1 << 63 else inner_value
                    elif inner == 2 and inner_wire == 2:
                        message = inner_value.decode("utf-8", "replace")
        return rejected, message
    except (ValueError, TypeError, AttributeError):
        return 0, ""


def retry_after_seconds(text):
    """Retry-After as seconds (delta-seconds or an HTTP date), or None."""
    if not text:
        return None
    text = text.strip()
    if is_number(text):
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def log_warning(config, fields):
    """A warning log line (unless LOG_LEVEL=error): for what goes wrong in the export thread, which no answer shows."""
    if config.log_level != "error":
        log_line(config, dict(time=iso_time(time.time()), host=config.host, **fields))


class ExportAnswer(Record):
    """What one POST got: status (None when nothing answered), Retry-After seconds, Content-Type, body."""
    status: object = None
    retry_after: object = None
    content_type: str = ""
    body: bytes = b""


class SpanExporter:
    """A background batch exporter: a bounded queue of slim spans, one thread that encodes and posts them.

    Request threads call add_server_span() and add_client_span(); ``warn`` gets a dict of log fields.
    """

    def __init__(self, tracing, resource, metrics, warn=None):
        self.tracing = tracing
        self.resource = resource
        self.metrics = metrics
        self.warn = warn or (lambda fields: None)
        self.encode = OTLP_ENCODERS[tracing.protocol]
        url = urlsplit(tracing.endpoint)
        self.https = url.scheme == "https"
        self.address = (url.hostname, url.port or (443 if self.https else 80))
        self.path = (url.path or "/") + ("?" + url.query if url.query else "")
        self.headers = {"Content-Type": OTLP_PROTOCOLS[tracing.protocol],
                        "User-Agent": f"simplemesh/{__version__}"}
        if tracing.compression:
            self.headers["Content-Encoding"] = "gzip"
        self.headers.update(tracing.headers)
        self.queue = []
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.connection = None
        self.thread = threading.Thread(target=self.run, name="span-export", daemon=True)
        self.thread.start()

    def add_server_span(self, trace, request, status, end_ns):
        self.add(server_span(trace, request, status, end_ns))

    def add_client_span(self, trace, span_id, method, target_name, peer, status, error, start_ns, end_ns):
        self.add(client_span(trace, span_id, method, target_name, peer, status, error, start_ns, end_ns))

    def add(self, span):
        """Queue one slim span tuple (server_span() or client_span())."""
        with self.lock:
            queued = len(self.queue)
            if queued < self.tracing.max_queue:
                self.queue.append(span)
        if queued >= self.tracing.max_queue:
            self.metrics.count_spans("dropped")
        elif queued + 1 >= self.tracing.max_batch:
            self.wake.set()

    def run(self):
        while True:
            self.wake.wait(self.tracing.schedule_delay)
            self.wake.clear()
            stopping = self.stopping
            while True:
                with self.lock:
                    batch = self.queue[:self.tracing.max_batch]
                    del self.queue[:self.tracing.max_batch]
                if not batch:
                    break
                try:
                    self.export(batch)
                except Exception:  # a span this code cannot encode must not stop the exporter for good
                    self.metrics.count_spans("failed", len(batch))
            if stopping:
                if self.connection is not None:
                    self.connection.close()
                return

    def export(self, batch):
        payload = self.encode(self.resource, [span_from_queue(queued) for queued in batch])
        if self.tracing.compression:
            payload = gzip.compress(payload)
        deadline = time.monotonic() + self.tracing.export_timeout
        backoff = EXPORT_BACKOFF
        while True:
            answer = self.post(payload)
            if answer.status is not None and 200 <= answer.status < 300:
                self.count_accepted(len(batch), answer)
                return
            wait = answer.retry_after if answer.retry_after is not None else backoff * random.uniform(0.5, 1.0)
            if (answer.status is not None and answer.status not in RETRYABLE_EXPORT) or \
                    time.monotonic() + wait > deadline:
                self.metrics.count_spans("failed", len(batch))
                return
            self.metrics.count_span_retry()
            time.sleep(wait)
            backoff = min(backoff * 2, 8.0)

    def count_accepted(self, count, answer):
        """OTLP: a partial success names the spans the receiver rejected; it is logged and never retried."""
        rejected, message = export_partial_success(answer.body, answer.content_type)
        rejected = min(max(rejected, 0), count)
        self.metrics.count_spans("exported", count - rejected)
        if rejected:
            self.metrics.count_spans("rejected", rejected)
        if rejected or message:
            self.warn({"level": "warning", "event": "span export partial success", "rejected_spans": rejected,
                       "error": ascii(message[:200])})

    def post(self, payload):
        """The ExportAnswer of one POST."""
        for _ in range(2):  # a kept-alive connection the collector closed gets one fresh retry
            reused = self.connection is not None
            if not reused:
                connection_class = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
                self.connection = connection_class(*self.address, timeout=self.tracing.timeout)
            try:
                self.connection.request("POST", self.path, body=payload, headers=self.headers)
                response = self.connection.getresponse()
                body = response.read(MAX_EXPORT_ANSWER)
                if response.will_close or not response.isclosed():  # closed, or more answer than read
                    self.connection.close()
                    self.connection = None
                return ExportAnswer(response.status, retry_after_seconds(response.getheader("retry-after")),
                                    response.getheader("content-type") or "", body)
            except (OSError, http.client.HTTPException):
                self.connection.close()
                self.connection = None
                if not reused:
                    return ExportAnswer()
        return ExportAnswer()

    def shutdown(self, timeout=5.0):
        """Export what is queued, then stop the thread (SPEC 8: spans are flushed on SIGTERM)."""
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout)


# --- The node ----------------------------------------------------------------------------------------------
# What one node does with one request, apart from sockets: directives applied, calls made, record built.
# The handler below only turns bytes into a Request and a record into bytes.

class Request:
    """One inbound request, as the handler read it. (Made per request: plain slots, not a Record.)"""
    __slots__ = ("method", "path", "query", "headers", "body", "received", "received_wall")

    def __init__(self, method, path, query, headers, body=b"", received=0.0, received_wall=0.0):
        self.method = method
        self.path = path  # percent-decoded
        self.query = query
        self.headers = headers  # Headers: lower-cased names
        self.body = body
        self.received = received  # perf_counter at receipt
        self.received_wall = received_wall


class Outcome:
    """What the handler sends: a status, a JSON-able record (or raw text) and what to log."""
    __slots__ = ("status", "record", "text", "content_type", "reset", "extra_headers", "trace_id", "targets", "trace")

    def __init__(self, status, record=None, text=None, content_type="application/json", reset=False,
                 extra_headers=(), trace_id="", targets=(), trace=None):
        self.status = status
        self.record = record
        self.text = text
        self.content_type = content_type
        self.reset = reset  # close with an RST instead of answering
        self.extra_headers = extra_headers
        self.trace_id = trace_id
        self.targets = targets  # names called, for the access log
        self.trace = trace  # the request's TraceContext: its SERVER span, exemplar and log fields


class Node:
    """One simple-mesh node: its configuration, runtime defaults, connection pool and metrics."""

    def __init__(self, config):
        self.config = config
        self.defaults = dict(config.defaults)
        self.base_directives = Directives.resolve(config, self.defaults, {})
        self.pool = ConnectionPool()
        self.resolver = Resolver(config.peers, config.upstream_port)
        self.metrics = Metrics()
        self.exporter = SpanExporter(config.tracing, node_resource(config), self.metrics,
                                     warn=functools.partial(log_warning, config)) if config.tracing else None
        self.ready = True
        self.rng = random.Random()
        self.lock = threading.Lock()
        self.on_stop = [self.flush_spans] if self.exporter else []  # run once the node has drained

    # Runtime controls (SPEC 4): a "sick replica" whose probes stay healthy.
    def set_defaults(self, requested):
        with self.lock:  # two POSTs at once must not lose one of them
            merged = dict(self.defaults)
            merged.update(requested)
            self.base_directives = Directives.resolve(self.config, merged, {})
            self.defaults = merged

    def reset_defaults(self):
        with self.lock:
            self.defaults = dict(self.config.defaults)
            self.base_directives = Directives.resolve(self.config, self.defaults, {})

    def serve(self, request):
        """Answer one routed request: the heart of simple-mesh."""
        config = self.config
        trace = TraceContext.from_headers(request.headers, config.forward_headers, config.tracing)
        query = split_query(request.query)
        query.pop("view", None)  # how to show the answer (the handler reads it), not a directive
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
                check_route_caps(config, steps)
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
            trace.event("simplemesh.reset")
            return Outcome(0, reset=True, trace_id=trace.trace_id, trace=trace)
        if directives.delay:
            delay = directives.delay.sample(rng)
            if delay > 0:
                self.metrics.count_fault("delay")
                record["delay"] = round(delay, 6)
                trace.event("simplemesh.delay", **{"simplemesh.delay_seconds": delay})
                time.sleep(delay)
        if directives.cpu:
            self.metrics.count_fault("cpu")
            trace.event("simplemesh.cpu", **{"simplemesh.cpu_seconds": directives.cpu})
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
            trace.event("simplemesh.error", **{"http.response.status_code": failure})
            record["error"] = f"injected failure {failure}"
        status = node_status(failure, children)
        record["status"] = status
        if status != 200 and not failure:
            record["error"] = "a downstream call failed"
        record["elapsed_time"] = round(time.perf_counter() - request.received, 6)
        if directives.size:
            pad_record(record, directives.size)
        return Outcome(status, record, trace_id=trace.trace_id,
                       targets=tuple(target.name for target, _rest in calls), trace=trace)

    def refuse(self, status, message, trace, **extra):
        return Outcome(status, error_answer(self.config.host, status, message, trace_id=trace.trace_id, **extra),
                       trace_id=trace.trace_id, trace=trace)

    def flush_spans(self, timeout=5.0):
        """Export the spans still queued and stop the exporter (at shutdown)."""
        if self.exporter:
            self.exporter.shutdown(timeout)

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
            try:
                records[index] = self.call(target, rest, request, trace, directives)
            except Exception as error:  # a bug; on a thread of its own it would leave a hole in the tree
                records[index] = caller_record(target, "", 502, f"internal error: {type(error).__name__}", 0.0)

        threads = [threading.Thread(target=run, args=(index,), daemon=True) for index in range(1, len(calls))]
        for thread in threads:
            thread.start()
        run(0)
        for thread in threads:
            thread.join()
        return records

    def call(self, target, rest, request, trace, directives):
        peer, path = self.resolver.resolve(target, forward_route(rest), target.query())
        span_id = new_span_id() if trace.native else ""
        started_ns = time.time_ns() if trace.sampled else 0
        started = time.perf_counter()
        try:
            headers = trace.headers_for(span_id)
            if request.body and "content-type" in request.headers:  # the body goes on unchanged, and so does its type
                headers = dict(headers, **{"content-type": request.headers["content-type"]})
            status, content_type, data = call_peer(
                self.pool, peer, path, request.method, request.body, headers,
                directives.timeout, self.config.max_upstream_body)
            elapsed = time.perf_counter() - started
            self.metrics.observe_call(target.name, str(status), elapsed, trace)
            if trace.sampled:
                self.exporter.add_client_span(trace, span_id, request.method, target.name, peer, status, "",
                                             started_ns, time.time_ns())
            return child_record(target, peer.url, status, content_type, data, request.method, elapsed)
        except CallFailed as failure:
            elapsed = time.perf_counter() - started
            code = str(failure.code) if failure.code else ("timeout" if failure.status == 504 else "error")
            self.metrics.observe_call(target.name, code, elapsed, trace)
            if trace.sampled:
                self.exporter.add_client_span(trace, span_id, request.method, target.name, peer, failure.status,
                                             str(failure), started_ns, time.time_ns())
            return caller_record(target, peer.url, failure.status, str(failure), elapsed, failure.status == 504)


# --- HTTP handler and server -------------------------------------------------------------------------------
# http.server's request parsing goes through email.feedparser and its answers through several small sends;
# the handler below reads the request line and headers itself and writes each answer in one send.

MAX_REQUEST_LINE = 16 * 1024
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
# Control characters are refused where they arrive: a CR or LF in a value a node forwards would inject a line.
REQUEST_LINE_BAD_RE = re.compile(r"[\x00-\x1f\x7f]")
REASONS = {status.value: status.phrase for status in HTTPStatus}


class BadRequest(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Handler(BaseHTTPRequestHandler):
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
        except BadRequest as error:  # answered, counted and logged like any request, then the connection closes
            self.close_connection = True
            outcome = error_outcome(node.config.host, error.status, str(error))
            try:
                self.write_answer(outcome, "")
            except OSError:
                pass
            node.metrics.observe_request("-", str(error.status), 0.0)  # "-": a malformed method is no label value
            self.log_access(None, outcome, 0.0)
            return
        if request is None:
            self.close_connection = True
            return
        metrics = node.metrics
        with metrics.lock:
            metrics.in_flight += 1
            # Probes, scrapes and admin calls are always answered: a busy node must not look dead to the kubelet.
            busy = metrics.in_flight > node.config.max_concurrency and not is_operations_path(request.path)
        try:
            if busy:
                outcome = error_outcome(node.config.host, 503, "too many requests in flight "
                                        f"(MAX_CONCURRENCY={node.config.max_concurrency})")
                outcome.extra_headers = (("Retry-After", "1"),)
            else:
                try:
                    outcome = self.dispatch(node, request)
                except Exception as error:  # a bug: answer and log one line rather than drop the connection
                    outcome = internal_error(node.config, error)
                if outcome.trace is not None and outcome.trace.sampled:  # queued before the answer leaves
                    node.exporter.add_server_span(outcome.trace, request, outcome.status, time.time_ns())
            if outcome.reset:
                self.reset_connection()
            else:
                self.write_answer(outcome, request.method)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
            outcome = Outcome(499)
        finally:
            with metrics.lock:
                metrics.in_flight -= 1
        elapsed = time.perf_counter() - request.received
        metrics.observe_request(request.method, str(outcome.status or "reset"), elapsed, outcome.trace)
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
        try:
            headers = read_header_lines(self.rfile)
        except HeaderError as error:
            raise BadRequest(error.status, str(error)) from None
        connection = headers.get("connection", "").lower()
        self.close_connection = "close" in connection or (version == "HTTP/1.0" and "keep-alive" not in connection)
        if method not in METHODS:
            raise BadRequest(501 if method.isupper() and method.isalpha() else 400,
                             f"unsupported method {method!r}")
        if headers.get("transfer-encoding"):
            raise BadRequest(411, "chunked request bodies are not supported; send Content-Length")
        length = headers.get("content-length", "0")
        if not is_number(length):
            raise BadRequest(400, "bad Content-Length")
        max_body = self.server.node.config.max_body
        if len(length) > 18 or int(length) > max_body:
            raise BadRequest(413, f"Content-Length {length[:20]} is above MAX_BODY={max_body}")
        length = int(length)
        if length and headers.get("expect", "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits a second for this before a body
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
            if "application/openmetrics-text" in request.headers.get("accept", ""):
                return Outcome(200, text=node.metrics.render(openmetrics=True), content_type=OPENMETRICS_TYPE)
            return Outcome(200, text=node.metrics.render(), content_type=PROMETHEUS_TYPE)
        first = path[1:].split("/", 1)[0]
        if first in RESERVED_NAMES or first.startswith("-"):
            return error_outcome(node.config.host, 404, f"/{first} is reserved; "
                                             f"to call a service named {first!r} write the step as ({first})")
        view = choose_view(request.query, request.headers.get("accept", ""))
        if view is None:
            return error_outcome(node.config.host, 400, f"unknown view; use ?view={'|'.join(VIEWS)}")
        outcome = node.serve(request)
        if view == "json" or outcome.record is None:
            return outcome
        if view == "tree":
            outcome.text, outcome.content_type = render_tree(outcome.record), "text/plain; charset=utf-8"
        else:
            outcome.text = render_html(outcome.record, view_route(request.path, request.query),
                                       node.config.trace_ui_url)
            outcome.content_type = "text/html; charset=utf-8"
            outcome.extra_headers += (("Content-Security-Policy", HTML_CSP),)
        return outcome

    def admin(self, node, request):
        """SPEC 4 runtime controls: /-/defaults and /-/ready."""
        host = node.config.host
        query = split_query(request.query)
        if request.path == "/-/defaults":
            if request.method in ("POST", "DELETE") and not node.config.allow_directives:
                return error_outcome(host, 403, "changing defaults is not allowed here (ALLOW_DIRECTIVES=false)",
                                     rule="ALLOW_DIRECTIVES")
            if request.method == "POST":
                try:
                    node.set_defaults(query)
                except DirectiveError as error:
                    return error_outcome(host, 400, f"bad directive: {error}")
            elif request.method == "DELETE":
                node.reset_defaults()
            elif request.method != "GET":
                return error_outcome(host, 405, "use GET, POST or DELETE")
            return Outcome(200, {"host": host, "defaults": node.defaults})
        if request.path == "/-/ready":
            if request.method == "POST":
                try:
                    node.ready = parse_bool(query.get("ready") or "unset")
                except ValueError:
                    return error_outcome(host, 400, "use ?ready=true or ?ready=false")
            return Outcome(200, {"host": host, "ready": node.ready})
        return error_outcome(host, 404, f"no admin path {request.path}")

    def write_answer(self, outcome, method):
        if outcome.text is not None:
            body = outcome.text.encode()
        else:
            body = json.dumps(outcome.record).encode()
        if self.server.draining:
            self.close_connection = True
        head = [f"HTTP/1.1 {outcome.status} {REASONS.get(outcome.status, 'Unknown')}\r\n"
                f"Content-Type: {outcome.content_type}\r\nContent-Length: {len(body)}\r\n"
                f"Date: {HTTP_DATE(int(time.time()))}\r\n"]
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
            # Closed here: socketserver's shutdown(SHUT_WR) would otherwise send a FIN first, a clean close.
            self.connection.close()
        except OSError:
            pass

    def log_access(self, request, outcome, elapsed):
        node = self.server.node
        if node.config.log_level not in ("debug", "info"):
            return
        path = request.path if request else "-"
        log_line(node.config, {
            "time": iso_time(time.time()), "host": node.config.host, "method": request.method if request else "-",
            "path": path if path.isprintable() else ascii(path),  # no forged log lines
            "status": outcome.status or "reset", "elapsed": round(elapsed, 6),
            "trace_id": outcome.trace_id, "span_id": outcome.trace.span_id if outcome.trace else "",
            "targets": list(outcome.targets)})

    def log_message(self, format, *args):  # http.server's own messages: kept quiet but for real errors
        pass


def internal_error(config, error):
    """A 500 for an exception no input should cause: one log line that says where, no traceback, no hang."""
    innermost = error.__traceback__
    while innermost.tb_next:
        innermost = innermost.tb_next
    place = f"{os.path.basename(innermost.tb_frame.f_code.co_filename)}:{innermost.tb_lineno}"
    message = f"{type(error).__name__}: {error}"
    log_line(config, {"time": iso_time(time.time()), "host": config.host, "level": "error",
                      "error": ascii(message), "at": place})
    return error_outcome(config.host, 500, f"internal error: {message[:200]}")


def log_line(config, fields):
    """One line on stdout, written with a single os.write so lines from many threads never interleave."""
    if config.log_format == "json":
        line = json.dumps(fields)
    else:
        words = []
        for key, value in fields.items():
            if value == "" or value is None or value == []:
                continue
            if key in ("time", "host"):
                words.append(str(value))
            elif isinstance(value, list):
                words.append(f"{key}={','.join(value)}")
            else:
                words.append(f"{key}={value}")
        line = " ".join(words)
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


# --- Manifests ---------------------------------------------------------------------------------------------
# SPEC 7. ``manifests`` turns node specs (the words ``mesh`` takes) into Kubernetes objects: pure functions build
# plain dicts, and a small YAML emitter writes them, so the generator needs nothing outside the standard library.

DEFAULT_IMAGE = f"simplemesh:{__version__}"
CONTAINER_PORT = 9090
# Kubernetes stops sending traffic while SHUTDOWN_DELAY runs (readyz is 503), in-flight work gets SHUTDOWN_GRACE,
# and the kubelet's SIGKILL comes only after both, with room to spare.
POD_SHUTDOWN_DELAY = 5
POD_SHUTDOWN_GRACE = 20
POD_TERMINATION_GRACE = 30
DNS_LABEL_RE = re.compile(r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?")  # a Service name (RFC 1035 label)
VERSION_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?")
LOADGEN = "loadgen"
DOWNWARD_API = (("HOST", "metadata.labels['app']"), ("VERSION", "metadata.labels['version']"),
                ("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace"),
                ("POD_IP", "status.podIP"), ("NODE_NAME", "spec.nodeName"))


def build_manifests(specs, namespace="", image=DEFAULT_IMAGE, istio=False, otlp="", load="", rate="5",
                    concurrency=""):
    """Kubernetes objects (dicts) for node specs from parse_node_spec(); raises ValueError on a bad input.

    Every name gets a Service; every (name, version) its own Deployment behind it, so ``b;version=v2`` is a
    second version of ``b``. ``istio`` adds the namespace's injection label and example Istio resources
    (ingress Gateway, DestinationRule subsets, a weighted split for a name with several versions), which
    needs a namespace: ``simplemesh`` unless one is given.
    """
    if not specs:
        raise ValueError("name at least one node")
    if istio and not namespace:
        namespace = "simplemesh"
    if namespace and not DNS_LABEL_RE.fullmatch(namespace):
        raise ValueError(f"bad namespace {namespace!r}: a DNS label (a-z, 0-9, '-', starting with a letter)")
    if not image or any(char.isspace() for char in image):
        raise ValueError(f"bad image {image!r}")
    if otlp and not otlp.startswith(("http://", "https://")):
        raise ValueError(f"bad OTLP endpoint {otlp!r}: expected http://host:port")
    versions = {}
    for name, version, directives in specs:
        version = version or "v1"
        if not DNS_LABEL_RE.fullmatch(name):
            raise ValueError(f"node {name!r}: a Kubernetes Service name is one DNS label starting with a letter")
        if not VERSION_RE.fullmatch(version):
            raise ValueError(f"node {name!r}: bad version {version!r} (a-z, 0-9 and '-', at most 32)")
        if version in versions.setdefault(name, {}):
            raise ValueError(f"node {name!r} version {version!r} is given twice")
        if load and name == LOADGEN:
            raise ValueError(f"{LOADGEN!r} is the load generator's name; pick another node name")
        try:
            Directives.resolve(Config(), directives, {})
        except DirectiveError as error:
            raise ValueError(f"node {name!r}: {error}") from None
        versions[name][version] = directives
    objects = []
    if namespace:
        objects.append(_namespace(namespace, istio))
    for name, by_version in versions.items():
        objects.append(_service(name, namespace))
        for version, directives in by_version.items():
            objects.append(_deployment(name, version, namespace, image, istio,
                                       _node_env(directives, otlp), _node_container_extras()))
    if load:
        objects.append(_deployment(LOADGEN, "v1", namespace, image, istio, [],
                                   _loadgen_container_extras(load, rate, concurrency), component="load-generator"))
    if istio:
        objects.extend(_istio_examples(versions, namespace))
    return objects


def _metadata(name, namespace, labels=None, **extra):
    metadata = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    if labels:
        metadata["labels"] = labels
    metadata.update(extra)
    return metadata


def _namespace(namespace, istio):
    labels = {"app.kubernetes.io/part-of": "simplemesh"}
    if istio:
        labels["istio-injection"] = "enabled"
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": _metadata(namespace, "", labels)}


def _labels(name, version=None, component="node"):
    labels = {"app": name}
    if version:
        labels["version"] = version
    labels.update({"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "simplemesh",
                   "app.kubernetes.io/component": component, "app.kubernetes.io/managed-by": "simplemesh"})
    if version:
        labels["app.kubernetes.io/version"] = version
    return labels


def _service(name, namespace):
    return {"apiVersion": "v1", "kind": "Service", "metadata": _metadata(name, namespace, _labels(name)),
            "spec": {"selector": {"app": name},
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "appProtocol": "http"}]}}


def _node_env(directives, otlp):
    """The environment of a node container: identity from the downward API, shutdown timing, directive defaults."""
    env = [{"name": var, "valueFrom": {"fieldRef": {"fieldPath": path}}} for var, path in DOWNWARD_API]
    env.append({"name": "PORT", "value": str(CONTAINER_PORT)})
    env.append({"name": "SHUTDOWN_DELAY", "value": str(POD_SHUTDOWN_DELAY)})
    env.append({"name": "SHUTDOWN_GRACE", "value": str(POD_SHUTDOWN_GRACE)})
    for directive in DIRECTIVES.values():
        if directive.name in directives:
            value = directives[directive.name]
            if directive.name == "parallel":
                value = "parallel" if parse_bool(value) else "sequential"
            env.append({"name": directive.env, "value": value})
    env.extend(otlp_env(otlp))
    return env


def otlp_env(endpoint):
    """Native spans (SPEC 5): the exporter endpoint, and resource attributes a backend groups pods by.

    ``$(VAR)`` is expanded by the kubelet from the variables defined before it in the same container.
    """
    if not endpoint:
        return []
    return [{"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": endpoint},
            {"name": "OTEL_RESOURCE_ATTRIBUTES",
             "value": "service.version=$(VERSION),k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE),"
                      "k8s.node.name=$(NODE_NAME)"}]


def _node_container_extras():
    def probe(path, period, failures):
        return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "timeoutSeconds": 2,
                "failureThreshold": failures}
    return {"ports": [{"name": "http", "containerPort": CONTAINER_PORT, "protocol": "TCP"}],
            "readinessProbe": probe("/readyz", 2, 1),
            "livenessProbe": probe("/healthz", 10, 3),
            "startupProbe": probe("/healthz", 1, 30)}


def _loadgen_container_extras(url, rate, concurrency):
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"bad load URL {url!r}: expected http://a/b/c")
    try:
        if float(rate) <= 0 or (concurrency and int(concurrency) <= 0):
            raise ValueError
    except ValueError:
        raise ValueError(f"bad load settings: --rate {rate} --concurrency {concurrency}") from None
    args = ["load", url, "--rate", str(rate), "--duration", "0"]  # 0: until the pod is stopped
    if concurrency:
        args += ["--concurrency", str(concurrency)]
    return {"args": args}


def _deployment(name, version, namespace, image, istio, env, container_extras, component="node"):
    labels = _labels(name, version, component)
    annotations = {}
    if component == "node":
        annotations.update({"prometheus.io/scrape": "true", "prometheus.io/port": str(CONTAINER_PORT),
                            "prometheus.io/path": "/metrics"})
    if istio:  # the app calls out at once (the load generator does), so wait for the sidecar
        annotations["proxy.istio.io/config"] = '{"holdApplicationUntilProxyStarts": true}'
    template_metadata = {"labels": labels}
    if annotations:
        template_metadata["annotations"] = annotations
    container = {"name": "simplemesh", "image": image, "imagePullPolicy": "IfNotPresent"}
    container.update(container_extras)
    if env:
        container["env"] = env
    container["resources"] = {"requests": {"cpu": "50m", "memory": "32Mi"},
                              "limits": {"cpu": "500m", "memory": "128Mi"}}
    container["securityContext"] = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "runAsNonRoot": True, "privileged": False,
                                    "capabilities": {"drop": ["ALL"]}}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": _metadata(f"{name}-{version}", namespace, labels),
            "spec": {"replicas": 1,
                     "selector": {"matchLabels": {"app": name, "version": version}},
                     "template": {"metadata": template_metadata, "spec": {
                         "automountServiceAccountToken": False,
                         "terminationGracePeriodSeconds": POD_TERMINATION_GRACE,
                         "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                             "seccompProfile": {"type": "RuntimeDefault"}},
                         "containers": [container]}}}}


def _istio_examples(versions, namespace):
    """An ingress to the first node, a DestinationRule per name, and a weighted split where there are versions."""
    first = next(iter(versions))
    objects = [
        {"apiVersion": "networking.istio.io/v1", "kind": "Gateway", "metadata": _metadata("simplemesh", namespace),
         "spec": {"selector": {"istio": "ingressgateway"},
                  "servers": [{"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]}]}},
        {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
         "metadata": _metadata("simplemesh-ingress", namespace),
         "spec": {"hosts": ["*"], "gateways": ["simplemesh"],
                  "http": [{"route": [{"destination": {"host": first, "port": {"number": 80}}}]}]}}]
    for name, by_version in versions.items():
        objects.append({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                        "metadata": _metadata(name, namespace),
                        "spec": {"host": name, "subsets": [{"name": version, "labels": {"version": version}}
                                                           for version in by_version]}})
        if len(by_version) > 1:
            share, extra = divmod(100, len(by_version))
            objects.append({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                            "metadata": _metadata(name, namespace),
                            "spec": {"hosts": [name], "http": [{"route": [
                                {"destination": {"host": name, "subset": version},
                                 "weight": share + (1 if index < extra else 0)}
                                for index, version in enumerate(by_version)]}]}})
    return objects


YAML_PLAIN_RE = re.compile(r"[A-Za-z/][A-Za-z0-9_./:@-]*")
YAML_RESERVED = frozenset("y n yes no on off true false null".split())


def yaml_scalar(value):
    """One scalar as YAML: plain where no YAML 1.1 or 1.2 reader could take it for another type, else quoted."""
    if value is True or value is False:
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    if YAML_PLAIN_RE.fullmatch(value) and not value.endswith(":") and value.lower() not in YAML_RESERVED:
        return value
    return json.dumps(value)  # a JSON string is a valid YAML double-quoted scalar


def _yaml_lines(value, indent):
    pad = " " * indent
    lines = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}{yaml_scalar(key)}:")
                lines.extend(_yaml_lines(item, indent + 2))
            else:
                lines.append(f"{pad}{yaml_scalar(key)}: {yaml_scalar(item)}")
    else:
        for item in value:
            if isinstance(item, (dict, list)) and item:
                inner = _yaml_lines(item, indent + 2)
                lines.append(f"{pad}- {inner[0][indent + 2:]}")
                lines.extend(inner[1:])
            else:
                lines.append(f"{pad}- {yaml_scalar(item)}")
    return lines


def to_yaml(documents):
    """A YAML stream of mappings, one ``---`` document each."""
    return "".join("---\n" + "\n".join(_yaml_lines(document, 0)) + "\n" for document in documents)


# --- Command line ------------------------------------------------------------------------------------------
# SPEC 6. ``serve`` runs one node from the environment; ``mesh`` runs a gateway and named nodes in one process;
# ``call`` draws one answer's tree; ``load`` sends steady open-loop traffic.

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
                      "max_concurrency": config.max_concurrency,
                      "traces": (f"{config.tracing.endpoint} sampler={config.tracing.sampler}" if config.tracing
                                 else "mesh-only"), "simplemesh": __version__})


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


def release_start_up_memory():
    """Soon after start-up, hand back to the OS the heap that compiling this module left free.

    glibc keeps freed memory for reuse; malloc_trim returns it (about 4 MB of an idle node's RSS). It runs half
    a second later, on a timer thread, so the first answers do not wait for it; elsewhere (musl, macOS) it does
    nothing.
    """
    def trim():
        try:
            import ctypes  # here, not at the top: only this needs it, and start-up time is measured
            ctypes.CDLL(None).malloc_trim(0)
        except (ImportError, OSError, AttributeError):
            pass

    timer = threading.Timer(0.5, trim)
    timer.daemon = True
    timer.start()


def command_serve(args, environ):
    config = Config.from_env(environ)
    stop = stop_signals()
    server = start_node(config)
    startup_line(config)
    release_start_up_memory()
    wait_for_stop([server], stop)
    return 0


DEFAULT_MESH = ("a", "b;delay=50ms", "c;delay=100ms..200ms", "d;error=0.1")


def command_mesh(args, environ):
    try:
        specs = [parse_node_spec(text) for text in (args.nodes or DEFAULT_MESH)]
    except ValueError as error:
        raise ConfigError(str(error)) from None
    base = Config.from_env(environ, address=args.address)
    ports = {}
    for index, (name, _version, _directives) in enumerate(specs, start=1):
        ports.setdefault(name, []).append(("127.0.0.1" if args.address == "0.0.0.0" else args.address,
                                           args.port + index))
    peers = dict(base.peers)
    peers.update(ports)
    if base.tracing:  # each node of a local mesh is its own service in the trace backend
        base = base.replace(tracing=base.tracing.replace(service_name=""))
    configs = [base.replace(host="gateway", port=args.port, peers=peers, version="")]
    for index, (name, version, directives) in enumerate(specs, start=1):
        defaults = dict(base.defaults)
        defaults.update(directives)
        configs.append(base.replace(host=name, port=args.port + index, peers=peers, version=version,
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
    release_start_up_memory()
    wait_for_stop(servers[:1], stop, internal=servers[1:])  # the gateway closes first: nodes finish its calls
    return 0


def command_manifests(args, environ):
    try:
        specs = [parse_node_spec(text) for text in args.nodes]
        objects = build_manifests(specs, namespace=args.namespace, image=args.image, istio=args.istio,
                                  otlp=args.otlp, load=args.load, rate=args.rate, concurrency=args.concurrency)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    sys.stdout.write(to_yaml(objects))
    return 0


def split_url(text):
    """``localhost:9090/a/b`` or ``http://host/a/b?delay=1s`` -> (scheme, host, port, path and query)."""
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
    except ValueError as error:  # e.g. an unclosed IPv6 bracket
        raise ConfigError(f"bad URL {text!r}: {error}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"bad URL {text!r}: expected http://host[:port]/route")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ConfigError(f"bad URL {text!r}: bad port") from None
    return parts.scheme, parts.hostname, port, (parts.path or "/") + ("?" + parts.query if parts.query else "")


def open_connection(scheme, host, port, timeout):
    kind = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
    return kind(host, port, timeout=timeout)


def request_headers(pairs):
    """``-H 'name: value'`` options -> a dict, JSON asked for (the client renders the views itself)."""
    headers = {"Accept": "application/json", "User-Agent": f"simplemesh/{__version__}"}
    for pair in pairs or ():
        name, sep, value = pair.partition(":")
        if not sep or not name.strip():
            raise ConfigError(f"bad header {pair!r}: expected 'Name: value'")
        headers[name.strip()] = value.strip()
    return headers


def use_color(stream, environ):
    return stream.isatty() and "NO_COLOR" not in environ and environ.get("TERM") != "dumb"


def command_call(args, environ):
    """One request; the answer drawn as a tree. Exit 0 when the root answered < 400, 1 when it failed,
    2 when there was no answer at all."""
    scheme, host, port, path = split_url(args.url)
    headers = request_headers(args.header)
    connection = open_connection(scheme, host, port, args.timeout)
    try:
        connection.request(args.method.upper(), path, body=args.data.encode() if args.data else None,
                           headers=headers)
        response = connection.getresponse()
        data = response.read()
    except (OSError, http.client.HTTPException) as error:
        print(f"simplemesh call: no answer from {host}:{port}: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    finally:
        connection.close()
    status = response.status
    if args.json:
        sys.stdout.write(data.decode("utf-8", "replace") + ("" if data.endswith(b"\n") else "\n"))
        return 0 if status < 400 else 1
    try:
        record = json.loads(data) if "json" in (response.getheader("content-type") or "") else None
    except ValueError:
        record = None
    if isinstance(record, dict) and "host" in record:
        sys.stdout.write(render_tree(record, color=use_color(sys.stdout, environ)))
    else:
        snippet = data[:500].decode("utf-8", "replace").strip()
        print(f"{status} {response.reason} from {host}:{port}, not a simplemesh answer"
              + (f":\n{snippet}" if snippet else ""))
    return 0 if status < 400 else 1


class LatencyHistogram:
    """Latencies in logarithmic buckets 1% wide from 10 µs: bounded memory however long a load runs, and
    percentiles at most 1% high (a bucket's upper bound, capped by the largest value seen)."""

    LOW = 1e-5
    LOG_GROWTH = math.log(1.01)

    def __init__(self):
        self.counts = {}
        self.count = 0
        self.max = 0.0

    def add(self, seconds):
        index = 0 if seconds <= self.LOW else int(math.log(seconds / self.LOW) / self.LOG_GROWTH) + 1
        self.counts[index] = self.counts.get(index, 0) + 1
        self.count += 1
        self.max = max(self.max, seconds)

    def percentile(self, fraction):
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(fraction * self.count))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return min(self.LOW * math.exp(index * self.LOG_GROWTH), self.max)
        return self.max


class LoadStats(Record):
    """What a load run has done so far; workers update it under ``lock``."""
    rate: float
    concurrency: int
    sent: int = 0
    missed_busy: int = 0  # due while every worker was waiting for an answer
    missed_late: int = 0  # due while this process could not even schedule it in time
    in_flight: int = 0
    codes: dict = {}  # status code, or an error kind -> count
    elapsed: float = 0.0

    def __init__(self, *args, **values):
        super().__init__(*args, **values)
        self.latency = LatencyHistogram()
        self.lock = threading.Lock()

    @property
    def errors(self):
        return sum(count for code, count in self.codes.items() if not isinstance(code, int) or code >= 400)

    @property
    def kept(self):
        """True when the target rate was met: no due send was missed."""
        return self.missed_busy + self.missed_late == 0

    def summary(self):
        """The figures as a dict (``load --json``); latencies in seconds."""
        return {"sent": self.sent, "answered": self.latency.count, "unfinished": self.in_flight,
                "missed": self.missed_busy + self.missed_late, "missed_busy": self.missed_busy,
                "missed_late": self.missed_late, "elapsed": round(self.elapsed, 3),
                "target_rate": self.rate, "achieved_rate": round(self.sent / self.elapsed, 3) if self.elapsed else 0.0,
                "rate_kept": self.kept, "errors": self.errors,
                "codes": {str(code): count for code, count in  # status codes first, then error kinds
                          sorted(self.codes.items(), key=lambda item: (not isinstance(item[0], int), str(item[0])))},
                "latency": {name: round(self.latency.percentile(p), 6)
                            for name, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))}
                | {"max": round(self.latency.max, 6)}}


def render_progress(stats):
    """The live progress line: elapsed, sent, achieved rate, errors, p50/p99 so far."""
    rate = stats.sent / (stats.elapsed + 1 / stats.rate)  # n sends so far span n intervals (the first is at 0)
    missed = stats.missed_busy + stats.missed_late
    return (f"{stats.elapsed:7.1f}s  sent {stats.sent}  rate {rate:.1f}/s of {stats.rate:g}/s  "
            f"errors {stats.errors}  p50 {format_seconds(stats.latency.percentile(0.5))}  "
            f"p99 {format_seconds(stats.latency.percentile(0.99))}" + (f"  MISSED {missed}" if missed else ""))


def render_load_summary(summary, url):
    """The final summary of a load run, for people; honest about a rate it did not keep."""
    latency = summary["latency"]
    lines = [f"load {url}: {summary['sent']} requests in {summary['elapsed']:.2f} s = "
             f"{summary['achieved_rate']:.1f}/s (target {summary['target_rate']:g}/s)",
             "status: " + (" ".join(f"{code}={count}" for code, count in summary["codes"].items()) or "none"),
             f"latency: p50 {format_seconds(latency['p50'])}  p90 {format_seconds(latency['p90'])}  "
             f"p99 {format_seconds(latency['p99'])}  max {format_seconds(latency['max'])}"]
    if summary["unfinished"]:
        lines.append(f"{summary['unfinished']} requests had no answer yet when the run stopped (not in the figures)")
    if not summary["rate_kept"]:
        reasons = []
        if summary["missed_busy"]:
            reasons.append(f"{summary['missed_busy']} found all workers waiting for answers "
                           "(raise --concurrency, or the service is slower than rate x concurrency allows)")
        if summary["missed_late"]:
            reasons.append(f"{summary['missed_late']} could not be scheduled on time by this process "
                           "(short of CPU: a less busy machine, or several load processes)")
        lines.append(f"TARGET RATE NOT KEPT: {summary['missed']} send{'s' * (summary['missed'] != 1)} missed: "
                     + "; ".join(reasons))
    return "\n".join(lines) + "\n"


LOAD_LATE = 0.1  # a send this late is missed, not sent in a burst; a smaller lag shows in its latency instead


def load_worker(stats, jobs, scheme, host, port, path, method, headers, timeout):
    """Send one request per job (its due time) on a keep-alive connection of this worker's own."""
    connection = None
    while True:
        due = jobs.get()
        if due is None:
            break
        try:
            if connection is None:
                connection = open_connection(scheme, host, port, timeout)
            connection.request(method, path, headers=headers)
            response = connection.getresponse()
            response.read()
            code = response.status
            if response.will_close:
                connection.close()
                connection = None
        except (OSError, http.client.HTTPException) as error:
            code = ("refused" if isinstance(error, ConnectionRefusedError) else
                    "timeout" if isinstance(error, TimeoutError) else
                    "reset" if isinstance(error, (ConnectionResetError, http.client.RemoteDisconnected)) else
                    "error")
            if connection is not None:
                connection.close()
                connection = None
        latency = time.monotonic() - due  # from when it was due: time lost in this client counts too
        with stats.lock:
            stats.in_flight -= 1
            stats.codes[code] = stats.codes.get(code, 0) + 1
            stats.latency.add(latency)
    if connection is not None:
        connection.close()


def run_load(stats, url_parts, method, headers, timeout, duration, stop, progress=None, progress_every=1.0):
    """Open-loop traffic: send ``i`` is due at start + i/rate whatever the answers do. A due send starts on an
    idle worker, or is counted as missed (every worker busy, or this loop too late); never queued, so a slow
    service cannot quietly lower the rate. Runs until ``duration`` (0: until ``stop`` is set)."""
    jobs = queue.SimpleQueue()
    workers = [threading.Thread(target=load_worker, args=(stats, jobs, *url_parts, method, headers, timeout),
                                daemon=True) for _ in range(stats.concurrency)]
    for worker in workers:
        worker.start()
    start = time.monotonic()
    end = start + duration if duration else math.inf
    interval = 1.0 / stats.rate
    next_progress = start + progress_every
    index = 0
    while not stop.is_set():
        due = start + index * interval
        now = time.monotonic()
        if due >= end:
            if now >= end:
                break
            stop.wait(end - now)
            continue
        if now < due:
            stop.wait(min(due, next_progress) - now)
        else:
            with stats.lock:
                if now - due > LOAD_LATE:
                    stats.missed_late += 1
                elif stats.in_flight >= stats.concurrency:
                    stats.missed_busy += 1
                else:
                    stats.in_flight += 1
                    stats.sent += 1
                    jobs.put(due)
            index += 1
        if progress and now >= next_progress:
            stats.elapsed = now - start
            progress(stats)
            next_progress += progress_every
    stats.elapsed = min(time.monotonic(), end) - start
    for _ in workers:
        jobs.put(None)
    deadline = time.monotonic() + min(timeout, 5.0)  # answers still on their way get a moment to count
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    return stats


def command_load(args, environ):
    scheme, host, port, path = split_url(args.url)
    headers = request_headers(args.header)
    if args.rate <= 0 or args.concurrency < 1 or args.duration < 0:
        raise ConfigError("--rate and --concurrency must be above zero, --duration at least 0")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):  # both end the run with the summary so far, exit 0
        signal.signal(signum, lambda *_: stop.set())
    out = sys.stderr if args.json else sys.stdout
    live = out.isatty()

    def progress(stats):
        line = render_progress(stats)
        out.write(f"\r{line}\033[K" if live else line + "\n")
        out.flush()

    print(f"load {scheme}://{host}:{port}{path}: {args.rate:g}/s "
          f"{'until stopped' if not args.duration else f'for {args.duration:g} s'}, "
          f"up to {args.concurrency} in flight", file=out, flush=True)
    stats = run_load(LoadStats(args.rate, args.concurrency), (scheme, host, port, path), args.method.upper(),
                     headers, args.timeout, args.duration, stop, progress,
                     0.5 if live else args.interval)
    if live:
        out.write("\n")
    summary = stats.summary()
    if args.json:
        print(json.dumps(summary), flush=True)
    else:
        sys.stdout.write(render_load_summary(summary, f"{scheme}://{host}:{port}{path}"))
        sys.stdout.flush()
    return 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="simplemesh", description="simple-mesh: a test server for service meshes; the URL path is the route.")
    parser.add_argument("--version", action="version", version=f"simplemesh {__version__}")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="run one node, configured by environment variables (the default)",
                        description="Run one node. HOST, PORT (9090), ADDRESS, PEERS, UPSTREAM_PORT, the directive "
                                    "defaults (DELAY, ERROR_RATE, ...) and the limits come from the environment; "
                                    "OTEL_EXPORTER_OTLP_ENDPOINT turns on native spans (OTLP/HTTP JSON).")
    mesh = commands.add_parser("mesh", help="run a gateway and named nodes in one process",
                               description="Run a whole mesh in one process: a gateway on --port and each NODE on "
                                           "the next ports, resolving each other's names.")
    mesh.add_argument("nodes", nargs="*", metavar="NODE",
                      help="a node spec: name[;directive=value...][;version=v2] (default: %s)" % " ".join(DEFAULT_MESH))
    mesh.add_argument("--port", type=int, default=9090, help="the gateway's port; nodes take the next ones")
    mesh.add_argument("--address", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    manifests = commands.add_parser(
        "manifests", help="print Kubernetes YAML for a mesh",
        description="Print Kubernetes YAML for these nodes: a Service per name and a Deployment per version "
                    "(directives become the node's environment defaults).",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keep the example on one pasteable line
        epilog="example:\n  simplemesh manifests 'a;delay=0.5' 'b;delay=1' 'b;delay=1;version=v2' c "
               "--load http://a/b/c --istio | kubectl apply -f -")
    manifests.add_argument("nodes", nargs="+", metavar="NODE",
                           help="a node spec: name[;directive=value...][;version=v2]")
    manifests.add_argument("--namespace", default="", help="put everything in this namespace (and create it)")
    manifests.add_argument("--image", default=DEFAULT_IMAGE, help="container image (default %(default)s)")
    manifests.add_argument("--istio", action="store_true",
                           help="label the namespace for sidecar injection (namespace simplemesh unless given) "
                                "and add an ingress Gateway, DestinationRules and version splits")
    manifests.add_argument("--otlp", default="", metavar="ENDPOINT",
                           help="send native spans to this OTLP/HTTP endpoint (OTEL_EXPORTER_OTLP_ENDPOINT)")
    manifests.add_argument("--load", default="", metavar="URL",
                           help="add a load generator Deployment that runs `simplemesh load URL`")
    manifests.add_argument("--rate", default="5", help="the load generator's requests per second (default 5)")
    manifests.add_argument("--concurrency", default="", help="the load generator's concurrency")
    call = commands.add_parser("call", help="one request, the call tree drawn for a terminal",
                               description="Send one request and draw the answer as a tree (in colour on a "
                                           "terminal). Exit status: 0 the root answered < 400, 1 it failed, "
                                           "2 no answer.")
    call.add_argument("url", help="http://host[:port]/route[?directives] (http:// may be left out)")
    call.add_argument("--json", action="store_true", help="print the raw answer instead of the tree")
    load = commands.add_parser("load", help="steady open-loop traffic with a live progress line and a summary",
                               description="Send requests at a steady rate whatever the answers do (open loop), "
                                           "show progress, and end with count, achieved rate, status counts and "
                                           "latency percentiles. SIGTERM or Ctrl-C stop it with the summary so "
                                           "far. A send that cannot start on time is counted as missed.")
    load.add_argument("url", help="http://host[:port]/route[?directives] (http:// may be left out)")
    load.add_argument("--rate", type=float, default=10.0, help="requests per second (default 10)")
    load.add_argument("--duration", type=parse_duration, default=parse_duration("10s"),
                      help="how long, e.g. 30s or 5m; 0 runs until stopped (default 10s)")
    load.add_argument("--concurrency", type=int, default=32,
                      help="requests in flight at most, one keep-alive connection each (default 32)")
    load.add_argument("--interval", type=parse_duration, default=parse_duration("10s"),
                      help="how often to print a progress line when not on a terminal (default 10s)")
    load.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    for command in (call, load):
        command.add_argument("-X", "--method", default="GET", help="HTTP method (default GET)")
        command.add_argument("-H", "--header", action="append", metavar="'NAME: VALUE'", help="a request header")
        command.add_argument("--timeout", type=parse_duration, default=parse_duration("30s"),
                             help="per-request timeout (default 30s)")
    call.add_argument("-d", "--data", help="a request body")
    return parser


COMMANDS = {"serve": command_serve, "mesh": command_mesh, "call": command_call, "load": command_load,
            "manifests": command_manifests}


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
