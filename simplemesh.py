#!/usr/bin/env python3
"""simple-mesh: one program that plays every service of a test service mesh.

The URL path is the route. A request for ``http://a/b/c`` makes node ``a`` call ``http://b/c``, which
calls ``http://c/``; every answer nests the answers of the calls below it, so one ``curl`` shows the whole
call tree with its timings. ``/b~c/d`` fans out, ``/(b/d)~(c/e)`` draws any tree, and per-hop directives
(``/b;delay=200ms;error=0.5/c``) inject latency and faults exactly where they should happen.

Standard library only, one module: copy it into any pod that has Python 3.11 and run it.

    python3 simplemesh.py mesh 'a;delay=0.5' 'b;delay=1' 'c;delay=1.5'
    curl localhost:9090/a/b/c

The module reads top to bottom in the order a request flows, in banner sections; each one uses only the
sections above it (the server and the command line, which assemble everything, excepted):

- Shared utilities: Struct, setting converters, timestamps, the log line, a thread pool and the turn gate, an
  answer's JSON text.
- HTTP/1.1 wire: requests and answers as bytes, both directions (the server's reader, the client's reader).
- Directives: one directive's text to its typed value (the DIRECTIVES table); a request's Directives. A new
  directive is a row in DIRECTIVES, a field of Directives, and the node's use of it.
- Route grammar: the path parsed into Targets and Groups, the calls one node makes, the route's size.
- Budgets: what a request may spend (answer bytes, CPU seconds), counted before any call and while it runs.
- Trace context: W3C traceparent/tracestate and B3, parsed and written.
- Outbound client: peers, name resolution, the connection pool, call_peer; a new way a peer can fail is
  caught here and becomes a CallFailed, then the caller's record.
- The node: plan_request (pure: a Plan, or a Refusal for every 4xx), then admit and execute: faults injected,
  calls made, the answer's record out (an Outcome).
- Views: the record as JSON, a terminal tree or an HTML page; a new view is a pure function of the record,
  named in VIEWS and drawn by render_view.
- Metrics, Span export: what a node reports, Prometheus text and OTLP spans.
- Configuration: the environment read once into a Config.
- Gateway: what ``mesh``'s gateway does with a path that names one entry node: forward it, invisible.
- Server: the handler (bytes to a Request, an Outcome to bytes) and the poller and workers that run it.
- Manifests, Command line: Kubernetes objects for a mesh; ``serve``, ``mesh`` (a process per node), ``call``,
  ``load``.
"""

import argparse
import bisect
import collections
import contextlib
import email.utils
import errno
import fnmatch
import functools
import gzip
import html
import itertools
import json
import math
import os
import queue
import random
import re
import select
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from http import HTTPStatus
from datetime import datetime
from urllib.parse import quote, unquote, urlsplit

__version__ = "0.1.0"


# --- Shared utilities --------------------------------------------------------------------------------------
# The small pieces every later section leans on: Struct (a cheap stand-in for a dataclass), the converters that
# read a setting's text, timestamps, the logfmt log line, a bounded thread pool, and the JSON text of an answer
# (streamed in pieces, padded to a size). None of them knows about requests, routes or peers.

class Struct:
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


def ascii_int(text):
    """int() of ASCII digits only: int() alone also takes other scripts' digits, underscores and spaces."""
    if not is_number(text.strip()):
        raise ValueError(f"expected a whole number, got {text!r}")
    return int(text)


def _port(text):
    port = ascii_int(text)
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
    code = ascii_int(text)
    if not 400 <= code <= 599:
        raise ValueError("a failure status is 400 to 599")
    return code


def json_bytes(record):
    """A record as strict JSON (see answer_json), whole."""
    return "".join(answer_json(record)[1]).encode()


def finite_only(value):
    """``value`` with every NaN or infinite float replaced by None (iteratively: a peer's JSON may be deep)."""
    root = [value]
    stack = [(root, 0)]
    while stack:
        container, key = stack.pop()
        item = container[key]
        if isinstance(item, float) and not math.isfinite(item):
            container[key] = None
        elif isinstance(item, dict):
            item = container[key] = dict(item)
            stack.extend((item, name) for name in item)
        elif isinstance(item, list):
            item = container[key] = list(item)
            stack.extend((item, index) for index in range(len(item)))
    return root[0]


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


ANSWER_CHUNK = 256 * 1024  # a big answer is encoded and sent in pieces of about this size
PADDING_FIELD = ', "padding": ""'
STRICT_JSON = json.JSONEncoder(allow_nan=False)  # iterencode() yields the text piece by piece, for big answers
INDENTED_JSON = json.JSONEncoder(allow_nan=False, indent=2)  # for people's tools (wants_indented_json)
PEOPLE_TOOLS = ("curl/", "httpie/", "wget/", "wget2/", "xh/")  # User-Agent prefixes, lower-cased


def wants_indented_json(headers):
    """Whether the client is a person's tool (curl, HTTPie, Wget, xh, or a browser asking for JSON without
    text/html): it gets indented JSON. Nodes send their own User-Agent and get compact JSON, as do scripts."""
    agent = headers.get("user-agent", "").lower()
    if agent.startswith(PEOPLE_TOOLS):
        return True
    accept = headers.get("accept", "")
    return agent.startswith("mozilla/") and "json" in accept and "text/html" not in accept


def answer_json(record, size=0, big=False, indent=False):
    """(length, pieces): a record's JSON text, padded with a last ``padding`` field to about ``size`` bytes (SPEC 2).

    The text is ASCII (json escapes the rest), so its length in characters is its length in bytes. A ``big``
    record (one holding large downstream answers) is encoded lazily, twice (once to count), so besides the
    record only one of its strings is held as text at a time; the padding is never held whole. The JSON is
    strict: a peer may answer NaN or Infinity (Python's json reads them), which no other JSON reader accepts, so
    those values become null rather than make the whole answer invalid. ``indent``: indented, with a newline at
    the end (for a person's terminal); the padding still makes it ``size`` bytes, plus that newline.
    """
    encoder = INDENTED_JSON if indent else STRICT_JSON
    try:
        if big:
            length, pieces = sum(map(len, encoder.iterencode(record))), encoder.iterencode(record)
        else:
            text = encoder.encode(record)
            length, pieces = len(text), (text,)
    except ValueError:
        return answer_json(finite_only(record), size, big, indent)
    end = "\n" if indent else ""  # a terminal's prompt starts on a line of its own
    missing = size - length - len(PADDING_FIELD)
    if missing <= 0:
        return length + len(end), itertools.chain(pieces, (end,)) if end else pieces
    # A record is never empty, so the padding field always follows another.
    return size + len(end), itertools.chain(_without_closing_brace(pieces), (', "padding": "',), _padding(missing),
                                            ('"}' + end,))


def _without_closing_brace(pieces):
    held = None
    for piece in pieces:
        if held is not None:
            yield held
        held = piece
    yield held[:-1]


def _padding(count):
    block = "x" * min(count, ANSWER_CHUNK)
    for start in range(0, count, ANSWER_CHUNK):
        yield block if count - start >= ANSWER_CHUNK else block[:count - start]


def ascii_chunks(pieces):
    """ASCII text pieces -> bytes of about ANSWER_CHUNK each, encoding one piece at a time."""
    buffer, buffered = [], 0
    for piece in pieces:
        if len(piece) >= ANSWER_CHUNK:
            if buffer:
                yield "".join(buffer).encode("ascii")
                buffer, buffered = [], 0
            for start in range(0, len(piece), ANSWER_CHUNK):
                yield piece[start:start + ANSWER_CHUNK].encode("ascii")
            continue
        buffer.append(piece)
        buffered += len(piece)
        if buffered >= ANSWER_CHUNK:
            yield "".join(buffer).encode("ascii")
            buffer, buffered = [], 0
    if buffer:
        yield "".join(buffer).encode("ascii")


def log_warning(config, fields):
    """A warning log line (unless LOG_LEVEL=error): for what goes wrong in the export thread, which no answer shows."""
    if config.log_level != "error":
        log_line(config, fields)


# A logfmt value that needs no quotes: printable ASCII but space, '"', '=' and '\'. Anything else is quoted
# with JSON's escapes, so no value (a path with %20, quotes or CR LF) can forge a field or a line.
LOGFMT_BARE_RE = re.compile(r"[\x21\x23-\x3c\x3e-\x5b\x5d-\x7e]+")


def logfmt_value(value):
    text = ",".join(value) if isinstance(value, list) else str(value)
    return text if LOGFMT_BARE_RE.fullmatch(text) else json.dumps(text)


def log_line(config, fields):
    """One line on stdout, written with a single os.write so lines from many threads never interleave. Every line
    opens with the time and the node's name."""
    fields = {"time": iso_time(time.time()), "host": config.host, **fields}
    if config.log_format == "json":
        line = json.dumps(fields)
    else:
        words = []
        for key, value in fields.items():
            if value == "" or value is None or value == []:
                continue
            words.append(logfmt_value(value) if key in ("time", "host") else f"{key}={logfmt_value(value)}")
        line = " ".join(words)
    try:
        os.write(1, (line + "\n").encode("utf-8", "replace"))
    except OSError:
        pass


class WorkerPool:
    """At most ``max_threads`` threads, started when work waits and none is free, ended after ``idle_exit``
    seconds without work. ``submit`` queues; ``try_submit`` refuses (False) when every thread is taken."""

    def __init__(self, max_threads, name, idle_exit=30.0):
        self.max_threads = max_threads
        self.name = name
        self.idle_exit = idle_exit
        self.jobs = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.threads = self.waiting = self.queued = 0

    def submit(self, job):
        self._submit(job, queue_when_full=True)

    def try_submit(self, job):
        return self._submit(job, queue_when_full=False)

    def _submit(self, job, queue_when_full):
        with self.lock:  # checked and counted at once: two try_submits never both take the last thread
            if not queue_when_full and self.threads - self.waiting + self.queued >= self.max_threads:
                return False
            self.queued += 1
            start = self.queued > self.waiting and self.threads < self.max_threads
            if start:
                self.threads += 1
            self.jobs.put(job)
        if start:
            threading.Thread(target=self._run, name=self.name, daemon=True).start()
        return True

    def _run(self):
        while True:
            with self.lock:
                self.waiting += 1
            try:
                job = self.jobs.get(timeout=self.idle_exit)
            except queue.Empty:
                with self.lock:
                    self.waiting -= 1
                    if self.queued <= self.waiting:  # nothing unclaimed: this thread may go
                        self.threads -= 1
                        return
                continue
            with self.lock:
                self.waiting -= 1
                self.queued -= 1
            job()
            job = None  # not kept while waiting for the next one: it may hold a finished request's answers


class TurnGate:
    """At most ``slots`` threads of this process run request work at once, let in strictly in the order they asked.

    Under saturation hundreds of workers are runnable, and the interpreter lock goes to whichever thread the OS
    wakes: a request needs the lock a dozen times (once after every system call), so an unlucky one waited for
    a second while most were served in milliseconds (issue 15: p99 17x p50 at 256 connections). Here the others
    wait on a lock of their own, in a queue, and the few inside take turns with the lock among themselves.
    Work that waits (an upstream call, a delay, a CPU burn queued behind others, a slow client) steps out with
    ``pause`` and queues again, at the head, when it resumes. One gate per process: the interpreter lock is too.
    Probes, scrapes and refusals of the probe lane never queue here.
    """

    def __init__(self, slots):
        self.free = slots
        self.queue = collections.deque()  # a held lock per waiting thread, released when its turn comes
        self.lock = threading.Lock()
        self.holders = threading.local()

    def enter(self, first=False):
        with self.lock:
            if self.free and not self.queue:
                self.free -= 1
                turn = None
            else:
                turn = threading.Lock()
                turn.acquire()
                if first:
                    self.queue.appendleft(turn)
                else:
                    self.queue.append(turn)
        if turn is not None:
            turn.acquire()  # leave() handed this thread its slot
        self.holders.inside = True

    def leave(self):
        self.holders.inside = False
        with self.lock:
            if self.queue:
                self.queue.popleft().release()  # the slot passes straight to the longest waiting thread
            else:
                self.free += 1

    def pause(self):
        """Step out before waiting (a no-op on a thread that is not inside); pass the result to ``resume``."""
        inside = getattr(self.holders, "inside", False)
        if inside:
            self.leave()
        return inside

    def resume(self, was_inside):
        """Back in at the head of the queue: a request under way arrived before any that waits, and finishing it
        first frees the answers it holds (queued behind new requests, they lifted a node's peak memory)."""
        if was_inside:
            self.enter(first=True)

    @contextlib.contextmanager
    def outside(self):
        """``with gate.outside():`` around a wait that is no work (a peer's answer, a delay, a slow client)."""
        was_inside = self.pause()
        try:
            yield
        finally:
            self.resume(was_inside)


REQUEST_TURNS = TurnGate(8)  # a few at once keep both cores busy across system calls; more only convoy


# --- HTTP/1.1 wire -----------------------------------------------------------------------------------------
# RFC 9110 and 9112, both directions, apart from sockets and threads: one wire for the server and the client.
# Header lines are read by one function for requests and answers. Reading a request is pure: a stream in
# (anything with readline(limit) and read(n): SocketReader, or io.BytesIO in the tests), a RequestHead and the body
# bytes out, or a BadRequest with the exact status and message a client gets; encode_answer writes an answer in
# one send. For calls, request_bytes writes a request, and read_answer reads an answer with our own rules, not
# http.client's: it skips every interim 1xx answer, refuses conflicting framing at once, never takes a short read
# for a whole body, and says how many bytes came (AnswerError carries the status a caller reports).

class Headers(dict):
    """HTTP headers with lower-cased names; repeated headers are joined with ", " (RFC 9110 5.3)."""

    def get(self, name, default=None):
        return dict.get(self, name.lower(), default)


MAX_HEADER_LINE = 16 * 1024
MAX_HEADERS = 100
MAX_HEADER_BYTES = 64 * 1024  # all header lines together: 100 lines of 16 KiB would hold 1.6 MB per connection


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

    Used for requests (by the handler) and for answers (by read_answer), so both sides apply the same rules.
    """
    headers = Headers()
    total = 0
    for _ in range(MAX_HEADERS + 1):
        line = stream.readline(MAX_HEADER_LINE + 1)
        if len(line) > MAX_HEADER_LINE:
            raise HeaderError(f"a header line is longer than {MAX_HEADER_LINE} bytes", 431)
        total += len(line)
        if total > MAX_HEADER_BYTES:
            raise HeaderError(f"the headers are longer than {MAX_HEADER_BYTES} bytes in all", 431)
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


MAX_REQUEST_LINE = 16 * 1024
MAX_CHUNK_LINE = 1024  # a chunk-size line with its extensions
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
# Control characters are refused where they arrive: a CR or LF in a value a node forwards would inject a line.
REQUEST_LINE_BAD_RE = re.compile(r"[\x00-\x1f\x7f]")
CHUNK_SIZE_RE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n]*)?\r?\n")  # extensions are ignored
REASONS = {status.value: status.phrase for status in HTTPStatus}
# A node writes these itself on every call (framing, connection management, the target's name), so they are never
# copied from a request: FORWARD_HEADERS naming one is refused at start-up, as are the proxy-* headers.
NOT_FORWARDABLE = frozenset(("connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
                             "content-length", "host"))


class BadRequest(Exception):
    """A request a node answers with ``status`` and closes the connection after."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class SocketReader:
    """A socket's bytes, buffered, for both sides of the wire: ``readline(limit)``, and ``read(size)`` (``size``
    bytes, fewer only when the stream ends). ``buffered`` says whether bytes are waiting here (a poller cannot see
    those: they already left the kernel); ``received`` counts the bytes of the current message and ``eof`` says
    the peer closed, so a failure can tell "closed before answering" from "cut short". Lines are sliced from the
    last chunk received at an offset, so reading a request's few lines copies each byte once.

    A request body that must be gathered (``arrived``) and a peer's answer of known length (``read_full``) are
    received straight into one buffer of their size, charged to the node's budget first: no pieces to join, and
    big buffers (glibc maps them apart) go back to the system when freed.
    """
    __slots__ = ("sock", "data", "position", "received", "eof", "body", "body_got", "charged")

    def __init__(self, sock):
        self.sock = sock
        self.data = b""
        self.position = 0
        self.received = 0
        self.eof = False
        self.body = None  # the bytearray a request body is gathered into, after the head in ``data``
        self.body_got = 0
        self.charged = None  # (budget, bytes) charged for that body

    @property
    def buffered(self):
        """How many bytes were received and not yet read."""
        return len(self.data) - self.position + self.body_got

    def fill(self):
        """Receive once more; False when the peer has closed."""
        return False if self.eof else self.receive()

    def receive(self, flags=0):
        """One recv (``flags``: MSG_DONTWAIT for the poller); False when the peer has closed."""
        if self.body is None:
            return self.feed(self.sock.recv(65536, flags))
        with memoryview(self.body) as view:
            count = self.sock.recv_into(view[self.body_got:], 0, flags)
        self.body_got += count
        self.received += count
        self.eof = not count
        return count > 0

    def feed(self, chunk):
        """Add bytes received elsewhere; False for the empty read of a closed connection."""
        self.received += len(chunk)
        self.eof = not chunk
        self.data = self.data[self.position:] + chunk if self.position < len(self.data) else chunk
        self.position = 0
        return bool(chunk)

    def arrived(self, max_body, budget=None):
        """Whether a request is here whole (request_missing). A body still to come is charged to ``budget`` (the
        node's MAX_INFLIGHT_BYTES) and then gathered into its own buffer; when it does not fit, the request is
        handed on at once, and its worker answers 503 before reading the body."""
        if self.body is not None:
            return self.body_got == len(self.body)
        missing, length, body_start = request_missing(self.data, self.position, max_body)
        if missing <= 1 or budget is None:
            return not missing
        if not budget.charge(length):
            return True
        self.charged = (budget, length)
        self.body = bytearray(length)
        self.body_got = len(self.data) - body_start
        self.body[:self.body_got] = memoryview(self.data)[body_start:]
        self.data = self.data[self.position:body_start]
        self.position = 0
        return False

    def take_charge(self):
        """The body bytes charged while the request was gathered: now the request's to give back."""
        charged, self.charged = self.charged, None
        return charged[1] if charged else 0

    def release_charge(self):
        charged, self.charged = self.charged, None
        if charged:
            charged[0].release(charged[1])

    def readline(self, limit):
        while True:
            end = self.data.find(b"\n", self.position, self.position + limit)
            if end >= 0:
                return self._take(end + 1 - self.position)
            if len(self.data) - self.position >= limit or self.body is not None or not self.fill():
                return self._take(min(limit, len(self.data) - self.position))

    def read(self, size):
        """``size`` bytes, fewer only when the stream ends (a request body: usually here already)."""
        if self.body is not None and self.position >= len(self.data):  # the body gathered after the head
            while self.body_got < len(self.body) and self.receive():
                pass
            body, got = self.body, self.body_got
            self.body, self.body_got = None, 0
            return body if got == len(body) == size else bytes(body[:min(got, size)])
        if len(self.data) - self.position >= size:
            return self._take(size)
        return bytes(self.read_full(size))

    def read_full(self, size):
        """``size`` bytes received straight into one buffer (a bytearray); fewer only when the stream ends."""
        buffer = bytearray(size)
        got = min(size, len(self.data) - self.position)
        with memoryview(buffer) as view:
            view[:got] = memoryview(self.data)[self.position:self.position + got]
            self._take(got)
            while got < size and not self.eof:
                count = self.sock.recv_into(view[got:])
                self.received += count
                self.eof = not count
                got += count
        if got < size:
            del buffer[got:]
        return buffer

    def read_some(self, size):
        """At most ``size`` bytes, what has come; b"" only when the stream has ended (a body read to the close)."""
        if self.position >= len(self.data) and not self.fill():
            return b""
        return self._take(min(size, len(self.data) - self.position))

    def _take(self, size):
        if self.position == 0 and size >= len(self.data):  # all of it: no copy
            data, self.data = self.data, b""
            return data
        data = self.data[self.position:self.position + size]
        self.position += size
        if self.position >= len(self.data):  # nothing left: the buffer is not kept while the connection idles
            self.data, self.position = b"", 0
        return data


class RequestHead:
    """A request line and its headers, with the body's framing decided. (Made per request: plain slots.)"""
    __slots__ = ("method", "target", "version", "headers", "length", "chunked", "keep_alive")

    def __init__(self, method, target, version, headers, length=0, chunked=False, keep_alive=True):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.length = length  # Content-Length (0 when absent or chunked)
        self.chunked = chunked
        self.keep_alive = keep_alive  # the client may send another request on this connection

    @property
    def expects_continue(self):
        """RFC 9110 10.1.1: ``100 Continue`` is for HTTP/1.1 clients that asked for it and will send a body."""
        return (self.version == "HTTP/1.1" and (self.length or self.chunked)
                and self.headers.get("expect", "").lower() == "100-continue")


def read_request_head(stream, max_body):
    """The request line and headers -> RequestHead; None when the stream ends before a request; BadRequest."""
    line = stream.readline(MAX_REQUEST_LINE + 1)
    if line in (b"\r\n", b"\n"):  # RFC 9112 2.2: an empty line before a request line is ignored
        line = stream.readline(MAX_REQUEST_LINE + 1)
    if not line:
        return None
    if len(line) > MAX_REQUEST_LINE:
        raise BadRequest(414, f"request line longer than {MAX_REQUEST_LINE} bytes")
    method, target, version = parse_request_line(line)
    try:
        headers = read_header_lines(stream)
    except HeaderError as error:
        raise BadRequest(error.status, str(error)) from None
    if method not in METHODS:
        raise BadRequest(501 if method.isupper() and method.isalpha() else 400, f"unsupported method {method!r}")
    check_host(version, headers)
    length, chunked = body_framing(version, headers, max_body)
    return RequestHead(method, target, version, headers, length, chunked, wants_keep_alive(version, headers))


def parse_request_line(line):
    """``b"GET /a HTTP/1.1\\r\\n"`` -> (method, target, version); BadRequest for anything else."""
    text = line.decode("latin-1").rstrip("\r\n")
    if REQUEST_LINE_BAD_RE.search(text):
        raise BadRequest(400, "control character in the request line")
    parts = text.split(" ")
    if len(parts) != 3 or not all(parts):
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise BadRequest(505 if version.startswith("HTTP/") else 400, f"unsupported protocol {version!r}")
    return method, target, version


def check_host(version, headers):
    """RFC 9112 3.2: an HTTP/1.1 request has exactly one Host; no request has two (repeats arrive joined by ",")."""
    host = headers.get("host")
    if host is None:
        if version == "HTTP/1.1":
            raise BadRequest(400, "an HTTP/1.1 request needs a Host header")
    elif "," in host:
        raise BadRequest(400, "more than one Host header")


def body_framing(version, headers, max_body):
    """RFC 9112 6: (Content-Length, chunked) of a request's body; BadRequest (400, 413) when it cannot be read
    safely. Both headers at once is how requests are smuggled past proxies, so that is a 400, not a choice."""
    coding = headers.get("transfer-encoding")
    if coding is not None:
        if version == "HTTP/1.0":
            raise BadRequest(400, "Transfer-Encoding in an HTTP/1.0 request")
        if "content-length" in headers:
            raise BadRequest(400, "both Transfer-Encoding and Content-Length")
        if not coding.strip():
            raise BadRequest(400, "empty Transfer-Encoding")
        if [word.strip().lower() for word in coding.split(",")] != ["chunked"]:
            raise BadRequest(400, f"unsupported Transfer-Encoding {coding[:40]!r} (only chunked)")
        return 0, True
    text = headers.get("content-length")
    if text is None:
        return 0, False
    values = {value.strip() for value in text.split(",")}  # identical repeats are allowed (RFC 9110 8.6)
    length = values.pop() if len(values) == 1 else ""
    if not is_number(length):
        raise BadRequest(400, "bad Content-Length")
    if len(length) > 18 or int(length) > max_body:
        raise BadRequest(413, f"Content-Length {length[:20]} is above MAX_BODY={max_body}")
    return int(length), False


def wants_keep_alive(version, headers):
    """HTTP/1.1 keeps the connection unless told ``close``; HTTP/1.0 only when it asks for ``keep-alive``. The
    same rule for a client's request and a peer's answer."""
    tokens = {word.strip().lower() for word in headers.get("connection", "").split(",")}
    if "close" in tokens:
        return False
    return version == "HTTP/1.1" or "keep-alive" in tokens


def read_body(stream, head, max_body):
    """The body announced by ``head`` -> bytes; None when the stream ends first (the client went away)."""
    if head.chunked:
        return read_chunked_body(stream, max_body)
    if not head.length:
        return b""
    body = stream.read(head.length)
    return body if len(body) == head.length else None


def read_chunked_body(stream, max_body):
    """RFC 9112 7.1: chunks up to the last one, trailers read and dropped -> the body bytes (at most max_body);
    None when the stream ends first; BadRequest for a malformed chunk or a body above max_body."""
    parts, total = [], 0
    while True:
        line = stream.readline(MAX_CHUNK_LINE + 1)
        if not line.endswith(b"\n"):
            if len(line) > MAX_CHUNK_LINE:
                raise BadRequest(400, f"chunk size line longer than {MAX_CHUNK_LINE} bytes")
            return None
        match = CHUNK_SIZE_RE.fullmatch(line)
        if not match:
            raise BadRequest(400, "bad chunk size")
        size = int(match.group(1), 16)
        if size == 0:
            break
        total += size
        if total > max_body:
            raise BadRequest(413, f"chunked body above MAX_BODY={max_body}")
        data = stream.read(size)
        end = stream.readline(3)
        if len(data) < size or not end:
            return None
        if end not in (b"\r\n", b"\n"):
            raise BadRequest(400, "chunk data not followed by CRLF")
        parts.append(data)
    try:
        read_header_lines(stream)  # trailer fields: nothing a node acts on
    except HeaderError as error:
        raise BadRequest(error.status, f"trailer: {error}") from None
    return b"".join(parts)


def split_target(target):
    """A request target -> (percent-decoded path, raw query); absolute form as proxies send it is accepted."""
    if target.startswith(("http://", "https://")):
        target = "/" + target.split("/", 3)[3] if target.count("/") >= 3 else "/"
    elif not target.startswith("/"):
        raise BadRequest(400, "the request target must start with /")
    path, _, query = target.partition("?")
    path = path.partition("#")[0]
    if "%" in path:
        try:
            path = unquote(path, errors="strict")
        except UnicodeDecodeError:
            raise BadRequest(400, "the path is not UTF-8 once percent-decoded") from None
    return path, query


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


HEAD_END_RE = re.compile(rb"\r?\n\r?\n")
CONTENT_LENGTH_RE = re.compile(rb"\ncontent-length[ \t]*:[ \t]*([0-9]{1,18})[ \t]*\r?\n", re.IGNORECASE)
EXPECT_CONTINUE_RE = re.compile(rb"\nexpect[ \t]*:[ \t]*100-continue", re.IGNORECASE)
HEAD_WAIT_LIMIT = 64 * 1024  # a head not ended within this many bytes is handed to the parser (and its limits)


def request_missing(data, start, max_body):
    """(missing, length, body_start): how many more bytes ``data[start:]`` needs to hold a whole request head and
    its Content-Length body (1 while the head is unfinished), that body's length and where it starts. ``missing``
    is 0 when the request is here, or enough of it that the parser will refuse it (a head over HEAD_WAIT_LIMIT, a
    length over ``max_body``), or the client waits for a ``100 Continue`` before its body. Only a readiness
    guess, so that a worker never waits for a slow client: the parser decides everything else (chunked bodies
    included)."""
    end = HEAD_END_RE.search(data, start)
    if end is None:
        return (0 if len(data) - start > HEAD_WAIT_LIMIT else 1), 0, len(data)
    length = CONTENT_LENGTH_RE.search(data, start - 1 if start else 0, end.end())
    if length is None:
        return 0, 0, end.end()
    length = int(length.group(1))
    if length > max_body or EXPECT_CONTINUE_RE.search(data, start - 1 if start else 0, end.end()) is not None:
        return 0, length, end.end()
    return max(0, length - (len(data) - end.end())), length, end.end()


def encode_answer(status, body, content_type="application/json", extra_headers=(), trace_id="", connection=None,
                 head_only=False, length=None):
    """An answer's bytes: status line, headers and (unless ``head_only``) the body. ``connection`` is ``"close"``,
    ``"keep-alive"`` (the acknowledgement an HTTP/1.0 client needs) or None (HTTP/1.1's default); ``length``
    is the body's, when it is sent apart (a big answer, in pieces)."""
    head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body) if length is None else length}\r\n"
            f"Date: {HTTP_DATE(int(time.time()))}\r\n"]
    if trace_id:
        head.append(f"X-Trace-Id: {trace_id}\r\n")
    for name, value in extra_headers:
        head.append(f"{name}: {value}\r\n")
    if connection:
        head.append(f"Connection: {connection}\r\n")
    head.append("\r\n")
    data = "".join(head).encode("latin-1")
    return data if head_only else data + body


class AnswerError(Exception):
    """A peer's answer that cannot be taken as one: not HTTP, badly framed, cut short or over the budget.

    ``received``: answer bytes that had arrived (0 with ``closed``: the peer closed before answering at all).
    """

    def __init__(self, message, received=0, status=None, closed=False, over_budget=False):
        super().__init__(message)
        self.received = received
        self.status = status  # the status line's code, once read
        self.closed = closed
        self.over_budget = over_budget


class Answer:
    """A peer's final answer, whole: status, headers, body, and whether its connection may be used again."""
    __slots__ = ("status", "headers", "body", "reusable")

    def __init__(self, status, headers, body, reusable):
        self.status = status
        self.headers = headers
        self.body = body
        self.reusable = reusable


STATUS_LINE_RE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: [^\r\n]*)?\r?\n")  # the reason is not kept
MAX_INTERIM_ANSWERS = 32
SMALL_BODY = 16 * 1024  # a request body up to this size is sent with its head in one send
READ_PIECE = 64 * 1024


def read_answer(reader, method, charge=None):
    """Read one final answer from ``reader`` (a SocketReader): interim 1xx answers skipped, the body framed by
    Content-Length, chunked coding or the close. ``charge(nbytes) -> bool`` is told of body bytes as they come
    (a declared Content-Length at once); False stops the read. Raises AnswerError, never returns a partial body."""
    reader.received = reader.buffered  # bytes of this answer: a keep-alive reader has read others before
    for _ in range(MAX_INTERIM_ANSWERS + 1):
        version, status = _status_line(reader)
        try:
            headers = read_header_lines(reader)
        except HeaderError as error:
            raise AnswerError(f"bad header block in a {status} answer: {error}", reader.received, status) from None
        if reader.eof:
            raise AnswerError(f"closed mid-answer, in the headers of a {status} answer", reader.received, status)
        if status == 101:
            raise AnswerError("answered 101 Switching Protocols, but no upgrade was asked for", reader.received, 101)
        if status >= 200:
            break
    else:
        raise AnswerError(f"more than {MAX_INTERIM_ANSWERS} interim 1xx answers", reader.received)
    try:
        framing, length = answer_framing(status, method, headers)
    except ValueError as error:
        raise AnswerError(str(error), reader.received, status) from None
    body = _read_body(reader, framing, length, charge or (lambda nbytes: True), status)
    keep_alive = wants_keep_alive("HTTP/1.1" if version == b"1" else "HTTP/1.0", headers)
    return Answer(status, headers, body, keep_alive and framing != "close")


def _status_line(reader):
    line = reader.readline(MAX_HEADER_LINE + 1)
    if not line:
        raise AnswerError("connection closed before an answer", reader.received, closed=reader.received == 0)
    match = STATUS_LINE_RE.fullmatch(line)
    if not match:
        if not line.endswith(b"\n") and len(line) <= MAX_HEADER_LINE:
            raise AnswerError("closed mid-answer, in the status line", reader.received)
        raise AnswerError(f"the answer is not HTTP/1.x: {_printable(line[:40].decode('latin-1'))!r}", reader.received)
    return match.group(1), int(match.group(2))


def answer_framing(status, method, headers):
    """How an answer's body is delimited (RFC 9112 6.3): ("none", 0), ("length", n), ("chunked", None) or
    ("close", None). ValueError for framing no client can trust: differing or invalid Content-Lengths, both
    Transfer-Encoding and Content-Length, an empty Transfer-Encoding."""
    if method == "HEAD" or status in (204, 304) or status < 200:
        return "none", 0
    coding = headers.get("transfer-encoding")
    length = headers.get("content-length")
    if coding is not None:
        if length is not None:
            raise ValueError("the answer has both Transfer-Encoding and Content-Length")
        codings = [item.strip().lower() for item in coding.split(",")]
        if not all(codings):
            raise ValueError(f"bad Transfer-Encoding {coding!r}")
        return ("chunked", None) if codings[-1] == "chunked" else ("close", None)
    if length is None:
        return "close", None
    values = {item.strip() for item in length.split(",")}  # "10, 10": one length sent twice, joined
    if len(values) > 1:
        raise ValueError(f"differing Content-Length headers ({length})")
    value = values.pop()
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise ValueError(f"invalid Content-Length {value[:40]!r}")
    return "length", int(value)


def _read_body(reader, framing, length, charge, status):
    if framing == "none":
        return b""
    if framing == "length":
        if not charge(length):
            raise AnswerError(f"an answer of {length} bytes", reader.received, status, over_budget=True)
        return _read_exactly(reader, length, status, f"after {{}} of {length} bytes")
    if framing == "chunked":
        return _read_chunked(reader, charge, status)
    pieces = []
    while True:
        piece = reader.read_some(READ_PIECE)
        if not piece:
            return b"".join(pieces)
        if not charge(len(piece)):
            raise AnswerError("an answer read to its close", reader.received, status, over_budget=True)
        pieces.append(piece)


def _read_exactly(reader, size, status, cut, before=0):
    data = reader.read_full(size)
    if len(data) < size:
        raise AnswerError("closed mid-answer " + cut.format(before + len(data)), reader.received, status)
    return data


def _read_chunked(reader, charge, status):
    pieces, got = [], 0
    while True:
        line = reader.readline(1024)
        match = CHUNK_SIZE_RE.fullmatch(line)
        if not match:
            if reader.eof and not line.endswith(b"\n"):
                raise AnswerError(f"closed mid-answer after {got} bytes of a chunked answer", reader.received, status)
            raise AnswerError(f"bad chunk size line {_printable(line[:40].decode('latin-1'))!r}", reader.received,
                              status)
        size = int(match.group(1), 16)
        if size == 0:
            break
        if not charge(size):
            raise AnswerError("a chunked answer", reader.received, status, over_budget=True)
        pieces.append(_read_exactly(reader, size, status, "after {} bytes of a chunked answer", got))
        got += size
        if reader.readline(3) not in (b"\r\n", b"\n"):
            if reader.eof:
                raise AnswerError(f"closed mid-answer after {got} bytes of a chunked answer", reader.received, status)
            raise AnswerError("a chunk is not followed by CRLF", reader.received, status)
    try:
        read_header_lines(reader)  # trailers: read and dropped
    except HeaderError as error:
        raise AnswerError(f"bad trailer: {error}", reader.received, status) from None
    if reader.eof:
        raise AnswerError(f"closed mid-answer after {got} bytes of a chunked answer", reader.received, status)
    return b"".join(pieces)


def request_bytes(method, path, host_header, headers, body):
    """One request's bytes as the buffers to send: request line, Host, the given headers and Content-Length, with
    the body in the same buffer when it is small (one send), apart when it is big (never copied)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host_header}"]
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return (head + body,) if len(body) <= SMALL_BODY else (head, body)


def _printable(text):
    """``text`` with control characters as spaces: a peer's bytes must not drive a terminal or break a line."""
    return text if text.isprintable() else "".join(c if c.isprintable() else " " for c in text)


# --- Directives --------------------------------------------------------------------------------------------
# SPEC 2. A directive is written as text in three places (the environment, a query string, a route's matrix
# parameter) and always validated by the same parser: check_directive, with the DIRECTIVES table (a DirectiveSpec,
# one directive's schema, per name). Directives.resolve() merges a node's defaults with what a request asked for,
# checks the caps, and gives the typed values one request runs with (a Directives). This section comes before the
# route because the route parser checks each hop's directive text as it reads it.

class DirectiveError(ValueError):
    def __init__(self, message, name=None):
        super().__init__(message)
        self.name = name


# re.ASCII: \d alone also matches other scripts' digits, which float() and int() would then read (``delay=٣s``).
DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m)?", re.ASCII)
SIZE_RE = re.compile(r"(\d+)([kmg]?)b?", re.IGNORECASE | re.ASCII)
PROBABILITY_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(%?)", re.ASCII)
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
    """``0.25`` or ``25%`` (fortio's form) -> 0.25."""
    match = PROBABILITY_RE.fullmatch(text.strip())  # float() alone takes "nan", "1_0", "٣"
    value = float(match.group(1)) / (100 if match.group(2) else 1) if match else -1.0
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"bad probability {text!r} (a number from 0 to 1, or a percentage)")
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


def weighted_choice(choices, draw):
    """The value of ((value, weight), ...) whose stretch of [0, total weight) holds ``draw``; a weight of None
    takes every draw. None when ``draw`` lies past the last stretch (the weights' rest)."""
    for value, weight in choices:
        if weight is None:
            return value
        draw -= weight
        if draw < 0:
            return value
    return None


class Delay(Struct):
    """A delay distribution: fixed (low == high), uniform in [low, high], or weighted choices."""
    low: float = 0.0
    high: float = 0.0
    choices: tuple = ()

    @property
    def maximum(self):
        return max([self.high] + [value for value, _weight in self.choices])

    def sample(self, rng):
        if self.choices:
            value = weighted_choice(self.choices, rng.random())
            return 0.0 if value is None else value  # the weights' rest: no delay
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


MAX_RESPONSE_HEADERS = 8
MAX_RESPONSE_HEADER_BYTES = 1024
HEADER_VALUE_RE = re.compile(r"[ \t!-~]*")  # visible ASCII, space and tab: no CR, LF or NUL
NODE_WRITTEN_HEADERS = frozenset(("content-type", "date", "x-trace-id"))


def parse_response_headers(text):
    """``response-header=set-cookie:v=1|cache-control:no-store`` -> (("set-cookie", "v=1"), ...): headers a hop
    adds to its answer. Names are tokens and never a header the node writes itself (hop-by-hop, framing,
    Content-Type, Date); values are visible ASCII; at most MAX_RESPONSE_HEADERS, MAX_RESPONSE_HEADER_BYTES in all."""
    if len(text) > MAX_RESPONSE_HEADER_BYTES:
        raise ValueError(f"response headers above {MAX_RESPONSE_HEADER_BYTES} bytes")
    pairs = []
    for item in text.split("|"):
        name, sep, value = item.partition(":")
        name, value = name.strip().lower(), value.strip()
        if not sep or not TOKEN_RE.fullmatch(name):
            raise ValueError(f"bad header {item!r}: expected name:value, several separated by '|'")
        if name in NOT_FORWARDABLE or name in NODE_WRITTEN_HEADERS or name.startswith("proxy-"):
            raise ValueError(f"{name!r} is written by the node itself (hop-by-hop, framing, content-type, date)")
        if not HEADER_VALUE_RE.fullmatch(value):
            raise ValueError(f"bad value for {name!r}: visible ASCII only (no CR, LF or control characters)")
        pairs.append((name, value))
    if len(pairs) > MAX_RESPONSE_HEADERS:
        raise ValueError(f"more than {MAX_RESPONSE_HEADERS} response headers")
    return tuple(pairs)


class DirectiveSpec(Struct):
    """One directive's schema: its name, its environment variable, its parser, its cap."""
    name: str
    env: str
    parse: object  # text -> value; flags take None for "on"
    cap: object = None  # (value, config) -> (amount, limit, limit's variable name), or None: no cap
    flag: bool = False


def _flag(text):
    return True if text is None else parse_bool(text)


DIRECTIVES = {d.name: d for d in (
    DirectiveSpec("delay", "DELAY", parse_delay, lambda v, c: (v.maximum, c.max_delay, "MAX_DELAY")),
    DirectiveSpec("error", "ERROR_RATE", parse_probability),
    DirectiveSpec("status", "ERROR_STATUS", parse_status),
    DirectiveSpec("reset", "RESET_RATE", parse_probability),
    DirectiveSpec("size", "RESPONSE_SIZE", parse_size, lambda v, c: (v, c.max_size, "MAX_SIZE")),
    DirectiveSpec("cpu", "CPU", parse_duration, lambda v, c: (v, c.max_cpu, "MAX_CPU")),
    DirectiveSpec("timeout", "UPSTREAM_TIMEOUT", _positive(parse_duration),
              lambda v, c: (v, c.max_timeout, "MAX_TIMEOUT")),
    DirectiveSpec("parallel", "FANOUT", _flag, flag=True),
    DirectiveSpec("headers", "ECHO_HEADERS", _flag, flag=True),
    DirectiveSpec("body", "ECHO_BODY", _flag, flag=True),
    DirectiveSpec("response-header", "RESPONSE_HEADERS", parse_response_headers),
)}  # and "route" (ROUTE), added by the route grammar section: its value is a route


def capped_directive(config, key, text):
    """check_directive(), then the directive's cap under ``config``: DirectiveError above it."""
    value = check_directive(key, text)
    cap = DIRECTIVES[key].cap
    if cap:
        amount, limit, variable = cap(value, config)
        if amount > limit:
            raise DirectiveError(f"{key}={text} is above the limit {variable}={limit:g}", key)
    return value


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


class Directives(Struct):
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
    body: bool = False  # echo the request body in the record (httpbin's /anything)
    response_headers: tuple = ()  # (name, value) pairs added to this hop's answer
    route: tuple = ()  # the node's default route (ROUTE): the steps a request for "/" follows

    FIELDS = {"response-header": "response_headers"}  # directive name -> field, where they differ

    @classmethod
    def resolve(cls, config, defaults, requested):
        """Merge node defaults (raw text, as in the environment) with a request's (raw text) and check caps."""
        values = {}
        status_alone = False  # one meaning everywhere (SPEC 4): ``status`` without ``error`` always fails
        for source in (defaults, requested):
            for key, text in source.items():
                values[cls.FIELDS.get(key, key)] = capped_directive(config, key, text)
            if "error" in source or "status" in source:
                status_alone = "error" not in source
        if status_alone:
            values["error"] = None
        elif "error" not in values:
            values["error"] = 0.0
        return cls(**values)

    def failure_status(self, rng):
        """The status of the injected failure this request gets, or None."""
        if self.error is None:  # status alone: always, or each code at its probability
            return weighted_choice(self.status, rng.random())
        if not self.error or rng.random() >= self.error:
            return None
        if not self.status:
            return 500
        if len(self.status) == 1:
            return self.status[0][0]
        total = sum(weight or 0 for _code, weight in self.status) or 1.0  # error= decides; the weights share it
        code = weighted_choice(self.status, rng.random() * total)
        return self.status[-1][0] if code is None else code


def burn_cpu(seconds):
    """Spend ``seconds`` of this thread's CPU time (visible in CPU metrics and autoscalers), however busy the machine."""
    end = time.thread_time() + seconds
    n = 0
    while time.thread_time() < end:
        for _ in range(1000):
            n = (n * 1103515245 + 12345) & 0x7FFFFFFF


# --- Route grammar -----------------------------------------------------------------------------------------
# SPEC 1. The path is parsed by a pure function into Targets and Groups; a fault raises RouteError with its
# position (an offset into the decoded path, the leading "/" being 0). plan_calls() turns a parsed route into
# the calls one node makes, route_size() counts the whole tree before anything is sent, and check_route_caps()
# applies every hop's directive caps at the entry node.

class RouteError(ValueError):
    def __init__(self, message, position):
        super().__init__(message)
        self.message = message
        self.position = position


class Target(Struct):
    """One hop: a name, an optional port and that hop's directives as (key, value-or-None) pairs."""
    name: str
    port: int = None
    directives: tuple = ()

    def address_text(self):
        return self.name if self.port is None else f"{self.name}:{self.port}"

    def query(self):
        return "&".join(key if value is None else f"{key}={value}" for key, value in self.directives)


class Group(Struct):
    """A parenthesised sub-route; the rest of the outer route is appended to it."""
    steps: tuple


NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.")
DIGITS = frozenset("0123456789")  # str.isdigit() also takes other scripts' digits
VALUE_END = frozenset("/~();")
# Directive text travels on in the next hop's URL, so only printable ASCII may pass: no space, CR/LF or NUL.
NOT_URL_TEXT_RE = re.compile(r"[^!-~]")
MAX_NESTING = 32


def parse_route(path, max_calls=None):
    """Parse a decoded path (``/b;delay=1s~c/d``) into a tuple of steps; a step is a tuple of branches.

    Every target written in a route is called at least once, so a route naming more than ``max_calls`` targets
    is refused while parsing: what a parse holds stays small whatever the path (see RouteCache for reuse).
    """
    if not path.startswith("/"):
        raise RouteError("the path must start with '/'", 0)
    if path == "/":
        return ()
    return _RouteParser(path, max_calls).parse()


class _RouteParser:
    def __init__(self, text, max_calls=None):
        self.text = text
        self.pos = 1  # after the leading "/"
        self.nesting = 0
        self.max_calls = max_calls
        self.targets_left = max_calls

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
        if self.targets_left is not None:
            self.targets_left -= 1
            if self.targets_left < 0:
                raise RouteError(f"the route names more than MAX_CALLS={self.max_calls} targets", start)
        name = self.read_name(start)
        port = self.read_port() if self.peek() == ":" else None
        directives = []
        while self.peek() == ";":
            self.pos += 1
            key_start = self.pos
            key, value = self.read_directive()
            if any(key == seen for seen, _value in directives):  # also bounds what one hop's directives hold
                raise RouteError(f"directive {key!r} is given twice for this hop", key_start)
            directives.append((key, value))
        return Target(name, port, tuple(directives))

    def read_name(self, start):
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
        return name

    def read_port(self):
        """``:port`` after a name, from its colon."""
        text = self.text
        self.pos += 1
        port_start = self.pos
        while self.pos < len(text) and text[self.pos] in DIGITS:
            self.pos += 1
        digits = text[port_start:self.pos]
        if not digits or len(digits) > 5 or not 0 < int(digits) < 65536:
            raise RouteError("bad port: expected a number from 1 to 65535", port_start)
        return int(digits)

    def read_directive(self):
        """``key`` or ``key=value`` after a ``;``, checked as a directive (check_directive) -> (key, value)."""
        text = self.text
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
        return key, value


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


# The paths a node answers itself (SPEC 1, 4): its probes and metrics, and the admin paths under ADMIN_PREFIX.
# Their names are reserved as a route's first step; a service of that name is called as a group: ``(metrics)``.
PROBE_PATHS = ("/healthz", "/readyz")
METRICS_PATH = "/metrics"
OPERATIONS_PATHS = PROBE_PATHS + (METRICS_PATH,)
ADMIN_PREFIX = "/-/"
RESERVED_NAMES = frozenset(path[1:] for path in OPERATIONS_PATHS)


def is_operations_path(path):
    """Paths a node answers itself: probes, metrics and the /-/ admin paths."""
    return path in OPERATIONS_PATHS or path.startswith(ADMIN_PREFIX)


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


def route_directive(steps):
    """The first hop of a route that carries directives (what ALLOW_DIRECTIVES=false refuses), or None."""
    for step in steps:
        for branch in step:
            found = route_directive(branch.steps) if isinstance(branch, Group) else (
                branch.address_text() if branch.directives else None)
            if found:
                return found
    return None


def parse_default_route(text):
    """ROUTE / ``route=``: a route (``b~c/d`` or ``/b~c/d``) that a request for "/" follows -> its steps."""
    try:
        return parse_route("/" + text.strip().lstrip("/"))
    except RouteError as error:
        raise ValueError(f"{error.message} (at {error.position} in {text!r})") from None


# The one directive whose value is a route: its row joins the table here, where a route can be parsed.
DIRECTIVES["route"] = DirectiveSpec("route", "ROUTE", parse_default_route)


# --- Budgets -----------------------------------------------------------------------------------------------
# SPEC 8. What one request may make a node spend is counted from its parsed route before any call: the answer
# bytes and the CPU seconds its whole tree asks for (route_cost). While it runs, the bytes it holds (downstream
# answers as they arrive, its own padded answer, its body) are charged to a RequestBudget, which charges the
# node-wide Budget in step, so all requests together stay under MAX_INFLIGHT_BYTES and so under the pod's
# memory limit. Parsed routes are reused from a cache bounded in bytes that keeps only routes a node accepted.

RECORD_BYTES = 2048  # what a hop's record adds to its answer besides padding (a budget allowance per call)


def route_cost(steps, max_calls):
    """(answer bytes, CPU seconds, calls) the hops of ``steps`` ask for in their own directives (``size=``,
    ``cpu=``), summed over every call the route expands to, so fan-out multiplies. The node's own directives are not
    in ``steps``: the caller adds them. Hops' environment defaults are unknown here; each node counts its own
    subtree again when the request reaches it.

    Counting stops after ``max_calls`` calls (route_size refuses such routes), so this costs at most that many
    steps whatever the route.
    """
    total_bytes, total_cpu, calls = 0, 0.0, 0
    pending = [steps]
    while pending and calls <= max_calls:
        for target, rest in plan_calls(pending.pop()):
            calls += 1
            size, cpu = hop_cost(target)
            total_bytes += size
            total_cpu += cpu
            if rest:
                pending.append(rest)
    return total_bytes, total_cpu, calls


def hop_cost(target):
    """(answer bytes, CPU seconds) one hop's matrix directives ask for (its directives were checked at parse)."""
    size, cpu = 0, 0.0
    for key, text in target.directives:
        if key == "size":
            size = parse_size(text)
        elif key == "cpu":
            cpu = parse_duration(text)
    return size, cpu


def json_parse_overhead(data):
    """At most how many bytes parsing JSON ``data`` takes beyond the text.

    A simple-mesh answer is mostly one long padding string: parsed, it takes about its text's size again (in
    ANSWER_MEMORY_FACTOR), and the caller charges only what goes beyond that, before child_record parses it.
    ``[0.5,0.5,...]`` or ``[{},{},...]`` from a foreign peer becomes an object of 24 to 250 bytes per few bytes
    of text: each separator can start a value (64 bytes or less), each ``{`` a dict, each ``[`` a list.
    """
    return (64 * (data.count(b",") + data.count(b":")) + 256 * data.count(b"{") + 72 * data.count(b"["))


class Budget:
    """Bytes held by the whole node (MAX_INFLIGHT_BYTES): shared by every request thread, so under a lock."""

    def __init__(self, limit, name="MAX_INFLIGHT_BYTES"):
        self.limit = limit
        self.name = name
        self.used = 0
        self.lock = threading.Lock()

    def charge(self, nbytes):
        """Take ``nbytes`` if they fit: True, else False and nothing is taken."""
        with self.lock:
            if self.used + nbytes > self.limit:
                return False
            self.used += nbytes
            return True

    def release(self, nbytes):
        with self.lock:
            self.used -= nbytes


class RequestBudget:
    """The answer bytes one request holds (at most MAX_ROUTE_BYTES), each charged to the node's Budget too.

    Bytes are charged when they are really held (a downstream answer as it arrives, the node's own answer when
    it is built), never reserved ahead: a request waiting on a ``delay`` holds nothing, so slow requests cannot
    starve the others. Parallel branches charge the same budget. ``close()`` gives everything back to the node
    once the answer is sent. ``allowance`` is taken beyond ``limit`` (MAX_ROUTE_BYTES) for what records add.
    """

    def __init__(self, limit, node_budget, allowance=0):
        self.limit = limit
        self.allowance = allowance
        self.node_budget = node_budget
        self.used = 0  # what the node's budget holds for this request
        self.refused = ""  # the limit a refused charge ran into, for the call's error
        self.lock = threading.Lock()

    def charge(self, nbytes):
        """Count ``nbytes`` just read: False (and nothing counted) when they go past either limit."""
        with self.lock:
            if self.used + nbytes > self.limit + self.allowance:
                self.refused = f"the answers are above MAX_ROUTE_BYTES={self.limit} for this request"
                return False
            if not self.node_budget.charge(nbytes):
                self.refused = f"the node holds {self.node_budget.name}={self.node_budget.limit} in answers"
                return False
            self.used += nbytes
            return True

    def close(self):
        with self.lock:
            used, self.used = self.used, 0
        self.node_budget.release(used)


class RouteCache:
    """Parsed routes by path, bounded by an estimate of their bytes; only routes a node accepted are put in.

    A mesh sees the same few routes over and over, so parsing each once saves a hop's worth of CPU. Refused
    routes are never kept, and neither are long ones, so no client can fill a node's memory through it.
    """
    BYTES_PER_CHAR = 200  # what a parsed route holds per character of its path, at most (measured: 15 to 150)

    def __init__(self, max_bytes=4 * 1024 * 1024, max_path=2048):
        self.max_bytes = max_bytes
        self.max_path = max_path
        self.entries = {}  # path -> steps, oldest first (dicts keep insertion order)
        self.size = 0
        self.lock = threading.Lock()

    def get(self, path):
        return self.entries.get(path)  # a plain read: no lock needed, and no reordering (evicted oldest-first)

    def put(self, path, steps):
        if len(path) > self.max_path:
            return
        with self.lock:
            if path in self.entries:
                return
            self.entries[path] = steps
            self.size += self.cost(path)
            while self.size > self.max_bytes:
                oldest = next(iter(self.entries))
                del self.entries[oldest]
                self.size -= self.cost(oldest)

    def cost(self, path):
        return 256 + self.BYTES_PER_CHAR * len(path)


ROUTES = RouteCache()


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


class B3(Struct):
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
    if not any(name in headers for name in B3_SIGNAL_HEADERS):  # the usual case: no B3 at all
        return None
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
        b3 = parse_b3(headers)
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


# --- Outbound client ---------------------------------------------------------------------------------------
# SPEC 1, 3, 8. One keep-alive connection pool per peer address, so a hop costs one request and no TCP handshake;
# the bytes go out and come back through the HTTP/1.1 wire section. A call never raises: whatever happens
# (refused, reset, timeout, garbage) becomes a record in the caller's tree. A connection goes back to the pool
# only after a complete, well-framed answer with nothing after it. Names are resolved on a small pool of threads,
# so the call's deadline bounds getaddrinfo too, and the address actually connected to is checked against the
# reach rule (loopback, link-local, unspecified, multicast), so DNS cannot get round it.

class Connection:
    """One keep-alive TCP connection to a peer, with its reader. ``fresh`` until it is taken from the pool."""
    __slots__ = ("sock", "reader", "fresh")

    def __init__(self, sock):
        self.sock = sock
        self.reader = SocketReader(sock)
        self.fresh = True

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class ConnectionPool:
    """Idle keep-alive connections by peer address. A connection is taken out while in use, then put back.

    Each peer's idle connections are a stack, most recently used on top. One idle for longer than ``max_idle``
    is closed rather than reused: servers close idle connections on their own timers (simplemesh after
    KEEPALIVE_TIMEOUT, 75 s), and reusing one just as its server closes it fails the call. A reaper thread,
    running only while something is idle, closes every peer's expired connections and those their peer has
    closed (no CLOSE_WAIT sockets pile up for a peer never called again).
    """

    def __init__(self, connect=None, max_idle_per_peer=256, max_idle=30.0):
        self.connect = connect or (lambda peer, deadline: connect_to(peer.address, deadline))
        self.idle = {}  # address -> [(connection, idle since), ...]
        self.lock = threading.Lock()
        self.max_idle_per_peer = max_idle_per_peer
        self.max_idle = max_idle
        self.reaping = False
        self.closed = threading.Event()

    def take(self, peer, deadline):
        """An idle connection to ``peer`` that is still open, else a new one (CallFailed or OSError)."""
        while True:
            with self.lock:
                stack = self.idle.get(peer.address)
                connection, since = stack.pop() if stack else (None, 0.0)
            if connection is None:
                return self.connect(peer, deadline)
            if time.monotonic() - since < self.max_idle and _still_open(connection.sock):  # outside the lock
                connection.fresh = False
                return connection
            connection.close()

    def give_back(self, address, connection):
        with self.lock:
            stack = self.idle.setdefault(address, [])
            if len(stack) < self.max_idle_per_peer and not self.closed.is_set():
                stack.append((connection, time.monotonic()))
                connection = None
            start_reaper = not self.reaping and not self.closed.is_set()
            self.reaping = self.reaping or start_reaper
        if connection is not None:
            connection.close()
        if start_reaper:
            threading.Thread(target=self.reap, name="pool-reaper", daemon=True).start()

    def reap(self):
        """Sweep every ``max_idle / 4`` (at most 1 s) while connections are idle; stop when none are."""
        while not self.closed.wait(min(1.0, self.max_idle / 4)):
            if not self.sweep():
                with self.lock:
                    if not any(self.idle.values()):
                        self.reaping = False
                        return

    def sweep(self):
        """Close the idle connections that expired or that their peer closed; the number still idle."""
        now = time.monotonic()
        dead = []
        with self.lock:
            for address in list(self.idle):
                keep = []
                for connection, since in self.idle[address]:
                    alive = now - since < self.max_idle and _still_open(connection.sock)
                    (keep.append((connection, since)) if alive else dead.append(connection))
                if keep:
                    self.idle[address] = keep
                else:
                    del self.idle[address]
            left = sum(len(stack) for stack in self.idle.values())
        for connection in dead:
            connection.close()
        return left

    def count(self):
        with self.lock:
            return sum(len(stack) for stack in self.idle.values())

    def close(self):
        self.closed.set()
        with self.lock:
            for stack in self.idle.values():
                for connection, _since in stack:
                    connection.close()
            self.idle.clear()


def _still_open(sock):
    """False when the peer has closed an idle connection, or sent bytes nobody asked for. poll(), not select():
    select() fails for descriptors above 1,024."""
    if sock is None:
        return False
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLPRI)
        return not poller.poll(0)
    except (OSError, ValueError):
        return False


class Peer:
    """Where one call goes: the address to connect to, the Host header the mesh routes by, and whether the
    addresses it resolves to must pass the reach rule (not for PEERS names, nor with ALLOW_IP_TARGETS=true)."""
    __slots__ = ("address", "host_header", "url", "guarded")

    def __init__(self, address, host_header, url, guarded=False):
        self.address = address
        self.host_header = host_header
        self.url = url
        self.guarded = guarded


def address_kind(ip):
    """"loopback", "link-local", "unspecified" or "multicast" for an address a node refuses to call by default
    (SPEC 8), else None. IPv4, IPv6, and IPv4 inside IPv6 (::ffff:127.0.0.1)."""
    ip = ip.partition("%")[0]  # an IPv6 scope
    try:
        packed = socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
    except (OSError, ValueError):
        return None
    if len(packed) == 16:
        if packed[:12] == b"\0" * 10 + b"\xff\xff":
            packed = packed[12:]
        elif packed == b"\0" * 16:
            return "unspecified"
        elif packed == b"\0" * 15 + b"\1":
            return "loopback"
        elif packed[0] == 0xfe and packed[1] & 0xc0 == 0x80:
            return "link-local"
        elif packed[0] == 0xff:
            return "multicast"
        else:
            return None
    first = packed[0]
    if first == 127:
        return "loopback"
    if first == 0:
        return "unspecified"  # 0.0.0.0/8, "this network": connecting there reaches this machine
    if first == 169 and packed[1] == 254:
        return "link-local"  # the cloud metadata address 169.254.169.254 among them
    if 224 <= first <= 239:
        return "multicast"
    return None


class _Lookup:
    """One name resolution in progress or done; ``expires`` is set when it ends."""
    __slots__ = ("done", "addresses", "error", "expires")

    def __init__(self):
        self.done = threading.Event()
        self.addresses = None
        self.error = None
        self.expires = math.inf


class Resolver:
    """Names to addresses: the PEERS map first (a local mesh), else the name itself on UPSTREAM_PORT (DNS).

    getaddrinfo() ignores every socket timeout, so it runs on a few threads of the resolver's own and a call
    waits for it only until its deadline. Answers are cached for ``ttl`` seconds (failures for ``negative_ttl``),
    in at most ``cache_size`` entries; calls to one name share one lookup in flight. ``getaddrinfo`` can be
    replaced (tests simulate slow or lying resolvers with it).
    """

    def __init__(self, peers, upstream_port, allow_ip_targets=False, getaddrinfo=socket.getaddrinfo,
                 workers=4, cache_size=1024, ttl=5.0, negative_ttl=1.0):
        self.peers = peers
        self.upstream_port = upstream_port
        self.allow_ip_targets = allow_ip_targets
        self.getaddrinfo = getaddrinfo
        self.workers = workers
        self.cache_size = cache_size
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.turn = {}
        self.cache = {}  # (host, port) -> _Lookup
        self.jobs = queue.SimpleQueue()
        self.threads = 0
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
        guarded = not addresses and not self.allow_ip_targets
        return Peer(address, host_header, f"http://{host_header}{path}", guarded), path

    def connect(self, peer, deadline):
        """A new Connection to ``peer`` by ``deadline``: resolved, each address checked, connected."""
        infos = self.lookup(peer.address[0], peer.address[1], deadline)
        if peer.guarded:
            refused = [(sockaddr[0], address_kind(sockaddr[0])) for _family, sockaddr in infos]
            infos = [info for info, (_ip, kind) in zip(infos, refused) if kind is None]
            if not infos:
                ip, kind = refused[0]
                raise CallFailed(f"target {peer.host_header!r} resolves to {ip}, a {kind} address; set "
                                 f"ALLOW_IP_TARGETS=true or name it in PEERS to allow it", 403, rule="ALLOW_IP_TARGETS")
        return connect_to(peer.address, deadline, infos)

    def lookup(self, host, port, deadline):
        """[(family, sockaddr), ...] for host:port; TimeoutError at the deadline, socket.gaierror if unknown."""
        numeric = _numeric_address(host, port)
        if numeric:
            return numeric
        key = (host, port)
        with self.lock:
            entry = self.cache.get(key)
            if entry is None or entry.expires <= time.monotonic():
                self.cache.pop(key, None)  # inserted last: the cache is evicted oldest first
                entry = self.cache[key] = _Lookup()
                while len(self.cache) > self.cache_size:
                    del self.cache[next(iter(self.cache))]
                self.jobs.put((entry, host, port))
                if self.threads < self.workers:
                    self.threads += 1
                    threading.Thread(target=self.run, name="resolver", daemon=True).start()
        if not entry.done.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"resolving {host!r}")
        if entry.error is not None:
            raise entry.error
        return entry.addresses

    def run(self):
        while True:
            entry, host, port = self.jobs.get()
            try:
                infos = self.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
                entry.addresses = [(family, sockaddr) for family, _type, _proto, _name, sockaddr in infos]
                if not entry.addresses:
                    raise socket.gaierror(socket.EAI_NONAME, "no address")
                entry.expires = time.monotonic() + self.ttl
            except Exception as error:  # gaierror, or anything a replaced getaddrinfo raises
                entry.error = error if isinstance(error, OSError) else socket.gaierror(socket.EAI_FAIL, str(error))
                entry.expires = time.monotonic() + self.negative_ttl
            entry.done.set()


def _numeric_address(host, port):
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except (OSError, ValueError):
            continue
        return [(family, (host, port) if family == socket.AF_INET else (host, port, 0, 0))]
    return None


def connect_to(address, deadline, infos=None):
    """A Connection to the first of ``infos`` (or the numeric ``address``) that accepts before ``deadline``."""
    infos = infos or _numeric_address(*address) or [(socket.AF_UNSPEC, address)]
    error = None
    for family, sockaddr in infos:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("connecting")
        if family == socket.AF_UNSPEC:  # a name with no resolver: the standard library's resolution
            return Connection(_nodelay(socket.create_connection(sockaddr, remaining)))
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(remaining)
            sock.connect(sockaddr)
            return Connection(_nodelay(sock))
        except OSError as failure:
            sock.close()
            error = failure
    raise error


def _nodelay(sock):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class CallFailed(Exception):
    """A call that got no answer; ``status`` is what the caller records (502, 504 for a timeout, 403 for a target
    refused once resolved, with ``rule``); ``code`` is the HTTP status received, if any."""

    def __init__(self, message, status=502, code=None, rule=None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.rule = rule


class UpstreamBudget:
    """One call's answer budget: MAX_UPSTREAM_BODY bytes for this answer, and the request's RequestBudget when
    one is given. call_peer() only needs ``charge(nbytes) -> bool`` (False: over, nothing counted) and
    ``refused`` (the limit that was hit, for the call's error)."""
    __slots__ = ("left", "max_bytes", "request_budget", "refused")

    def __init__(self, max_bytes, request_budget=None):
        self.left = self.max_bytes = max_bytes
        self.request_budget = request_budget
        self.refused = ""

    def charge(self, nbytes):
        if nbytes > self.left:
            self.refused = f"above MAX_UPSTREAM_BODY={self.max_bytes} bytes"
            return False
        if self.request_budget is not None and not self.request_budget.charge(nbytes):
            self.refused = self.request_budget.refused
            return False
        self.left -= nbytes
        return True


class Deadlines:
    """Enforces a call's total timeout: a socket timeout bounds each read, not the call, so a peer trickling a
    byte now and then could hold a caller forever. One thread for the process shuts down the socket of any call
    (or inbound request) that outlives its deadline. It looks at least once a second, so that watching a
    deadline further away than its next look costs no wake-up (most requests are done long before theirs).
    """

    def __init__(self):
        self.watched = {}  # id(entry) -> entry: [deadline, socket or connection, expired]
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
IDEMPOTENT_METHODS = frozenset(("GET", "HEAD", "PUT", "DELETE", "OPTIONS"))


def call_peer(pool, peer, path, method, body, headers, timeout, budget):
    """One HTTP call on a pooled connection -> its final Answer (status, headers, body), within ``timeout`` in all
    (name resolution and connecting included). ``budget.charge(nbytes)`` is told of answer bytes as they come.

    A reused connection that the peer closed before sending any byte (the race with its idle timer: a clean
    close, or a broken pipe while sending) is retried once on a new connection, for idempotent methods only.
    A reset after the request arrived (ECONNRESET, what the ``reset`` directive sends) is never retried.
    Raises CallFailed, never anything else: whatever the peer does becomes a record in the caller's tree.
    """
    deadline = time.monotonic() + timeout
    try:
        request = request_bytes(method, path, peer.host_header, headers, body)
    except UnicodeEncodeError:
        raise CallFailed("a header value cannot be sent as latin-1") from None
    try:
        answer = exchange(pool, peer, method, request, deadline, budget.charge, method in IDEMPOTENT_METHODS)
    except _Retry:
        raise CallFailed("connection closed before an answer") from None
    except CallFailed:
        raise
    except Exception as error:
        raise _call_failure(error, peer, timeout, budget) from None
    return answer


def exchange(pool, peer, method, request, deadline, charge=None, retry_stale=False):
    """The one HTTP client: send ``request`` (request_bytes) to ``peer`` on a pooled keep-alive connection and read
    the whole final Answer, all by ``deadline``. Calls, the span exporter, ``call`` and ``load`` all use it.

    One connection policy: a connection goes back to the pool only after a complete, well-framed answer with
    nothing after it. A reused connection that the peer closed before sending any byte is retried once on a new
    connection when ``retry_stale``, else _Retry is raised. Raises OSError (TimeoutError at the deadline),
    AnswerError, or what ``pool.connect`` raises.
    """
    connection = pool.take(peer, deadline)
    while True:
        try:
            answer = _exchange(connection, request, method, charge, deadline)
        except _Retry:
            if retry_stale:
                retry_stale = False
                connection = pool.connect(peer, deadline)  # a new one: another idle one may be stale too
                continue
            raise
        if answer.reusable and not connection.reader.buffered:  # nothing after the answer: clean for the next one
            pool.give_back(peer.address, connection)
        else:
            connection.close()
        return answer


class _Retry(Exception):
    """A reused connection the peer had closed: nothing was answered, the request may go again."""


def _exchange(connection, request, method, charge, deadline):
    """Send ``request`` and read the answer on ``connection``, closing it on any failure."""
    sending = True
    watch = DEADLINES.watch(connection, max(0.0, deadline - time.monotonic()))
    try:
        connection.sock.settimeout(max(0.001, deadline - time.monotonic()))
        for buffer in request:
            connection.sock.sendall(buffer)
        sending = False
        answer = read_answer(connection.reader, method, charge)
    except Exception as error:
        expired = DEADLINES.release(watch)
        connection.close()
        if expired:
            raise TimeoutError("deadline") from None
        closed_early = ((sending and isinstance(error, (BrokenPipeError, ConnectionResetError)))
                        or (isinstance(error, AnswerError) and error.closed))
        if closed_early and not connection.fresh:
            raise _Retry() from None
        raise
    if DEADLINES.release(watch):
        connection.close()
        raise TimeoutError("deadline")
    return answer


def _call_failure(error, peer, timeout, budget):
    """The CallFailed for an exception raised by a call (the peer refused, reset, or answered garbage)."""
    if isinstance(error, TimeoutError):
        return CallFailed(f"timeout after {timeout:g}s", 504)
    if isinstance(error, AnswerError):
        if error.over_budget:
            return CallFailed(f"{error} refused: {budget.refused}", code=error.status)
        return CallFailed(str(error))  # no code: metrics count it as an error, not as the status it began with
    if isinstance(error, ConnectionRefusedError):
        return CallFailed("connection refused")
    if isinstance(error, socket.gaierror):
        return CallFailed(f"cannot resolve {peer.address[0]!r}: {error.strerror}")
    if isinstance(error, (ConnectionResetError, BrokenPipeError)):
        return CallFailed("connection reset before an answer")
    return CallFailed(f"{type(error).__name__}: {str(error)[:200]}")


def origin_request(scheme, host, port, method, path, headers, body=b""):
    """(Peer, request bytes) for a request to a URL's origin (``call``, ``load``, the span exporter): no reach
    rule; the Host header is the one in ``headers`` if any, else host[:port]."""
    host_header = next((value for name, value in headers.items() if name.lower() == "host"), None)
    if host_header is None:
        host_header = (f"[{host}]" if ":" in host else host) + ("" if port == (443 if scheme == "https" else 80)
                                                                  else f":{port}")
    headers = {name: value for name, value in headers.items() if name.lower() != "host"}
    peer = Peer((host, port), host_header, f"{scheme}://{host_header}/")
    return peer, request_bytes(method, path, host_header, headers, body)


def origin_pool(scheme):
    """A ConnectionPool for one origin: its connections wrapped in TLS for https."""
    return ConnectionPool(_connect_tls if scheme == "https" else None)


def _connect_tls(peer, deadline):
    import ssl  # only here: most runs never need it
    sock = connect_to(peer.address, deadline).sock
    try:
        return Connection(ssl.create_default_context().wrap_socket(sock, server_hostname=peer.address[0]))
    except BaseException:  # a failed handshake: the socket is not left open
        sock.close()
        raise


def byte_limit(limit):
    """A ``charge`` for read_answer that refuses once more than ``limit`` body bytes came."""
    used = [0]

    def charge(nbytes):
        used[0] += nbytes
        return used[0] <= limit
    return charge


def caller_record(name, url, status, error, elapsed, timeout=False, **extra):
    """The record a caller writes for a call that got no simplemesh answer (SPEC 3): it never leaves the tree."""
    record = {"host": name, "url": url, "status": status, "elapsed_time": round(elapsed, 6)}
    if error:
        record["error"] = error
    if timeout:
        record["timeout"] = True  # this call timed out: the caller answers 504, not 502
    record.update(extra)
    return record


EXCERPT_LENGTH = 200


def child_record(name, url, status, content_type, data, method, elapsed):
    """The record of one answer: the callee's own when it is a simplemesh record; an answer in the original
    FastAPI design's shape nested as its tree; anything else a foreign record written by the caller, with the
    real status, type, size and an excerpt. Only the status says whether the call failed."""
    if method == "HEAD":
        return caller_record(name, url, status, f"answered {status}" if status >= 400 else "", elapsed)
    answer = _json_object(content_type, data)
    if answer is not None and isinstance(answer.get("host"), str):
        record_status = answer.get("status")
        if isinstance(record_status, int) and not isinstance(record_status, bool):
            return answer
        if record_status is None and isinstance(answer.get("next_node", []), list) and "elapsed_time" in answer:
            return _seed_record(answer, status)
    excerpt = _printable(data[:EXCERPT_LENGTH].decode("utf-8", "replace")).strip()
    error = f"answered {status}, not a simplemesh answer" + (f": {excerpt}" if excerpt else "") if status >= 400 \
        else ""
    return caller_record(name, url, status, error, elapsed, foreign=True, content_type=content_type,
                         size=len(data), excerpt=excerpt)


def _json_object(content_type, data):
    if "json" not in content_type:
        return None
    try:
        answer = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
        return None
    return answer if isinstance(answer, dict) else None


def _seed_record(answer, status):
    """A record of the original FastAPI design (host, elapsed_time, next_node, no status): its tree as it came,
    with the HTTP status the caller saw; the records under it have no status of their own."""
    record = {"host": answer["host"], "status": status, "design": "fastapi"}
    record.update((key, value) for key, value in answer.items() if key not in record)
    return record


# --- The node ----------------------------------------------------------------------------------------------
# What one node does with one request, apart from sockets, in three steps. plan_request is pure: the path, query
# and config give a Plan (the calls, the directives, what the tree costs) or one Refusal carrying the status,
# message and fields of every 4xx. Node.admit charges the node's budgets (a 503 Refusal when they are full);
# Node.execute injects the faults, makes the calls and builds the answer's record into an Outcome. The server
# section turns bytes into a Request and an Outcome into bytes; the node is given its Metrics and SpanExporter
# (build_node, in the server section) and only calls their methods.

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


class Request:
    """One inbound request, as the handler read it. (Made per request: plain slots, not a Struct.)"""
    __slots__ = ("method", "path", "query", "headers", "body", "received", "received_wall", "held", "budget", "hops")

    def __init__(self, method, path, query, headers, body=b"", received=0.0, received_wall=0.0, held=0):
        self.hops = 0  # calls between the entry node and this one (HOPS_HEADER): set by Node.serve, +1 in Node.call
        self.held = held  # body bytes charged to the node's budget (Node.release gives them back)
        self.budget = None  # the RequestBudget of a routed request, once admitted
        self.method = method
        self.path = path  # percent-decoded
        self.query = query
        self.headers = headers  # Headers: lower-cased names
        self.body = body
        self.received = received  # perf_counter at receipt
        self.received_wall = received_wall


class Outcome:
    """What the handler sends: a status, a JSON-able record (or raw text) and what to log."""
    __slots__ = ("status", "record", "text", "content_type", "reset", "extra_headers", "trace_id", "targets", "trace",
                 "size", "big", "head_length")

    def __init__(self, status, record=None, text=None, content_type="application/json", reset=False,
                 extra_headers=(), trace_id="", targets=(), trace=None, size=0, big=False, head_length=None):
        self.head_length = head_length  # the Content-Length of a HEAD answer passed on without its body (gateway)
        self.size = size  # the JSON answer is padded to about this many bytes (``size``)
        self.big = big  # the record holds big downstream answers: encode it piece by piece (answer_json)
        self.status = status
        self.record = record
        self.text = text
        self.content_type = content_type
        self.reset = reset  # close with an RST instead of answering
        self.extra_headers = extra_headers
        self.trace_id = trace_id
        self.targets = targets  # names called, for the access log
        self.trace = trace  # the request's TraceContext: its SERVER span, exemplar and log fields


class Refusal:
    """A request answered with an error before any call: every 4xx the plan finds, and the node's 503s.
    ``fields`` go into the error answer (``rule``, ``position``, ``target``...); ``retry_after``: try again."""
    __slots__ = ("status", "message", "fields", "retry_after")

    def __init__(self, status, message, retry_after=False, **fields):
        self.status = status
        self.message = message
        self.fields = fields
        self.retry_after = retry_after

    def outcome(self, host, trace=None):
        """The Outcome answering it, as node ``host`` (with the request's trace id, when it has a trace)."""
        if trace is None:
            outcome = Outcome(self.status, error_answer(host, self.status, self.message, **self.fields))
        else:
            record = error_answer(host, self.status, self.message, trace_id=trace.trace_id, **self.fields)
            outcome = Outcome(self.status, record, trace_id=trace.trace_id, trace=trace)
        if self.retry_after:
            outcome.extra_headers = (("Retry-After", "1"),)
        return outcome


def error_outcome(host, status, message, **extra):
    """The Outcome of an error answer that has no request trace (the server's, the admin paths')."""
    return Refusal(status, message, **extra).outcome(host)


def error_answer(host, status, message, **extra):
    """A 4xx/5xx answer that still reads as a node record, so it nests in a caller's tree."""
    record = {"host": host, "status": status, "error": message}
    record.update(extra)
    return record


HOPS_HEADER = "x-simplemesh-hops"  # calls made since the entry node: MAX_DEPTH holds across nodes (ROUTE cycles)
USER_AGENT = f"simplemesh/{__version__}"  # nodes talk compact JSON to each other (wants_indented_json)


def hop_count(headers):
    """The hop count a call arrived with (0 at the entry node); ValueError for a value that is not one."""
    text = headers.get(HOPS_HEADER)
    if text is None:
        return 0
    if not is_number(text.strip()) or len(text.strip()) > 6:
        raise ValueError(f"bad {HOPS_HEADER} header {text[:20]!r}: a whole number of hops")
    return int(text)


class Plan(Struct):
    """What a node will do for one request: the route, the calls this node makes and the directives it runs
    with, and what the whole tree asks for (answer bytes, calls) before any call. ``steps`` is the route the path
    gave (cached in ROUTES); the calls of a request for "/" may come from the node's default route instead."""
    steps: list = None
    calls: list = None
    directives: object = None
    answer_bytes: int = 0
    call_count: int = 0
    fresh: bool = False  # the route was parsed now, not taken from ROUTES: cached once admitted


def plan_request(config, defaults, base_directives, path, query, hops=0):
    """The pure plan step: a request's path and query (+ the node's config and defaults) -> its Plan, or the
    Refusal of a bad or forbidden request (every 4xx, and the 508 of a loop), before any call.
    ``base_directives``: ``defaults`` resolved (Directives.resolve), for a request without directives of its own;
    ``hops``: the calls made before this node (hop_count)."""
    query = split_query(query)
    query.pop("view", None)  # how to show the answer (the handler reads it), not a directive
    try:
        return _plan(config, defaults, base_directives, path, query, hops)
    except RouteError as error:
        return Refusal(400, f"bad route: {error.message}", position=error.position, route=path)
    except DirectiveError as error:
        return Refusal(400, f"bad directive: {error}")


def _plan(config, defaults, base_directives, path, query, hops):
    steps = ROUTES.get(path)
    fresh = steps is None
    if fresh:
        steps = parse_route(path, config.max_calls)
    if not config.allow_directives and (query or route_directive(steps)):
        where = f"for hop {route_directive(steps)!r} " if not query else ""
        return Refusal(403, f"directives {where}are not allowed here (ALLOW_DIRECTIVES=false)",
                       rule="ALLOW_DIRECTIVES")
    directives = Directives.resolve(config, defaults, query) if query else base_directives
    followed = steps or directives.route  # ROUTE: a route in the request wins
    calls = plan_calls(followed)
    if calls:
        refusal = route_refusal(config, followed, calls, hops)
        if refusal:
            return refusal
    answer_bytes, cpu, call_count = route_cost(followed, config.max_calls)
    answer_bytes, cpu = answer_bytes + directives.size, cpu + directives.cpu
    for amount, limit, variable in ((answer_bytes, config.max_route_bytes, "MAX_ROUTE_BYTES"),
                                    (answer_bytes, config.max_inflight_bytes, "MAX_INFLIGHT_BYTES"),
                                    (cpu, config.max_route_cpu, "MAX_ROUTE_CPU"),
                                    (directives.cpu, config.max_inflight_cpu, "MAX_INFLIGHT_CPU")):
        if amount > limit:
            what = "answer bytes" if "BYTES" in variable else "CPU seconds"
            return Refusal(400, f"the route asks for {amount:g} {what} across its tree, above the limit "
                                f"{variable}={limit:g}", rule=variable)
    return Plan(steps, calls, directives, answer_bytes, call_count, fresh)


def route_refusal(config, steps, calls, hops=0):
    """The Refusal of a route with calls (too big, too deep, a forbidden target, a hop above a cap), or None.
    ``hops``: the calls already made to reach this node; with default routes (ROUTE) a cycle of nodes could call
    forever, so the hops so far count against MAX_DEPTH too (508 Loop Detected)."""
    total, depth = route_size(steps, config.max_calls, config.max_depth)
    if hops and hops + depth > config.max_depth:
        return Refusal(508, f"this call is {hops} hops from its entry node and its route goes {depth} deeper, "
                            f"above MAX_DEPTH={config.max_depth}: a cycle of default routes (ROUTE)?",
                       rule="MAX_DEPTH", hops=hops)
    if total > config.max_calls:
        return Refusal(400, f"the route expands to more than MAX_CALLS={config.max_calls} calls", rule="MAX_CALLS")
    if depth > config.max_depth:
        return Refusal(400, f"the route is deeper than MAX_DEPTH={config.max_depth} hops", rule="MAX_DEPTH")
    for target, _rest in calls:
        refusal = target_refusal(config, target.name)
        if refusal:
            return Refusal(403, refusal[0], rule=refusal[1], target=target.name)
    check_route_caps(config, steps)  # raises DirectiveError
    return None


def target_refusal(config, name):
    """(why, rule) when a node may not call ``name`` (SPEC 8), else None."""
    if is_ip_literal(name) and not config.allow_ip_targets:
        return f"target {name!r} is an IP address; set ALLOW_IP_TARGETS=true to allow it", "ALLOW_IP_TARGETS"
    if config.allowed_hosts and not any(fnmatch.fnmatchcase(name, glob) for glob in config.allowed_hosts):
        return f"target {name!r} is not in ALLOWED_HOSTS", "ALLOWED_HOSTS"
    return None


# Paths of other tools (httpbin, podinfo, fortio) -> the directives asking a simple-mesh node for the same thing.
OTHER_TOOL_PATHS = {"status": "status={}", "delay": "delay={}s", "bytes": "size={}", "headers": "headers",
                    "user-agent": "headers", "anything": "headers&body", "echo": "headers&body", "get": "headers",
                    "post": "headers&body", "put": "headers&body", "patch": "headers&body", "delete": "headers",
                    "response-headers": "response-header=name:value"}


def other_tool_hint(name, rest):
    """For a target that could not be resolved and reads like another tool's path (``/status/503``,
    ``/delay/1``, ``/anything``): how simple-mesh says it, as a sentence to add to the call's error; else ''."""
    form = OTHER_TOOL_PATHS.get(name)
    argument = format_route(rest).split("/", 1)[0].split(";", 1)[0]
    if form is None or ("{}" in form and not is_number(argument.replace(".", "", 1))):
        return ""
    query = form.format(argument)
    path = f"/{name}/{argument}" if "{}" in form else f"/{name}"
    return (f"; {path} reads like httpbin's or podinfo's path, but here a path names services and a hop's "
            f"behaviour is a directive: ?{query} at this node, or /b;{query.replace('&', ';')} for hop b")


class Node:
    """One simple-mesh node: its configuration, runtime defaults, connection pool, and what it reports to (its
    Metrics, and a SpanExporter with native spans: build_node in the server section makes them)."""

    def __init__(self, config, metrics, exporter=None):
        self.config = config
        self.defaults = dict(config.defaults)
        self.base_directives = Directives.resolve(config, self.defaults, {})
        self.resolver = Resolver(config.peers, config.upstream_port, config.allow_ip_targets)
        self.pool = ConnectionPool(self.resolver.connect)
        self.inflight = Budget(config.max_inflight_bytes)  # answer and body bytes of all requests (SPEC 8)
        self.cpu_queue = Budget(config.max_inflight_cpu, "MAX_INFLIGHT_CPU")  # CPU seconds queued or burning
        self.cpu_lock = threading.Lock()
        self.metrics = metrics
        self.fanout = WorkerPool(config.max_fanout_threads, f"fanout-{config.host}")
        self.exporter = exporter
        self.ready = True
        self.healthy = True  # POST /-/healthy?healthy=false fails /healthz on purpose (SPEC 4)
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
        """Answer one routed request, the heart of simple-mesh: plan (pure), admit (budgets), execute."""
        config = self.config
        trace = TraceContext.from_headers(request.headers, config.forward_headers, config.tracing)
        try:
            request.hops = hop_count(request.headers)
        except ValueError as error:
            return Refusal(400, str(error)).outcome(config.host, trace)
        plan = plan_request(config, self.defaults, self.base_directives, request.path, request.query, request.hops)
        if not isinstance(plan, Refusal):
            plan = self.admit(request, plan)
        if isinstance(plan, Refusal):
            return plan.outcome(config.host, trace)
        return self.execute(request, plan, trace)

    def admit(self, request, plan):
        """The plan again, once the node's budget has room for what it asks (SPEC 8), else the 503 Refusal. An
        admitted request holds a RequestBudget (request.budget) until its answer is sent."""
        if plan.fresh:
            ROUTES.put(request.path, plan.steps)
        if self.inflight.used + plan.answer_bytes > self.inflight.limit:  # a look, not a hold: see RequestBudget
            return self.busy()
        # Answers bring their records' own fields besides their padding: RECORD_BYTES each, headers echo aside.
        request.budget = RequestBudget(self.config.max_route_bytes, self.inflight, RECORD_BYTES * plan.call_count)
        return plan

    def execute(self, request, plan, trace):
        """Faults, then calls, then the Outcome with the answer's record."""
        directives = plan.directives
        record = self.new_record(request, trace)
        stopped = self.inject_faults(request, directives, record, trace)
        if stopped is not None:
            return stopped
        failure = directives.failure_status(self.rng)
        children = self.call_all(plan.calls, request, trace, directives) if plan.calls and not failure else []
        return self.finish(request, plan, trace, record, failure, children)

    def new_record(self, request, trace):
        """The answer's record before anything happened (field order as in the original)."""
        config = self.config
        record = {"host": config.host}
        if config.version:
            record["version"] = config.version
        record["status"] = 200
        record["elapsed_time"] = 0.0  # set when answering; here for the field order of the original
        record.update(config.identity)
        record["start_time"] = iso_time(request.received_wall)
        record["trace_id"] = trace.trace_id
        record["span_id"] = trace.span_id
        return record

    def inject_faults(self, request, directives, record, trace):
        """reset, delay, cpu, the headers and body echoes (SPEC 2): the Outcome that ends the request here, or None."""
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
                with REQUEST_TURNS.outside():
                    time.sleep(delay)
        if directives.cpu:
            if not self.burn(directives.cpu):
                return self.busy("the CPU work queued here is near", self.cpu_queue).outcome(self.config.host, trace)
            self.metrics.count_fault("cpu")
            trace.event("simplemesh.cpu", **{"simplemesh.cpu_seconds": directives.cpu})
            record["cpu"] = directives.cpu
        if directives.headers:
            echoed = sum(len(name) + len(value) for name, value in request.headers.items())
            if not self.inflight.charge(echoed):  # up to MAX_HEADER_BYTES, rendered again in the answer
                return self.busy().outcome(self.config.host, trace)
            request.held += echoed
            record["headers"] = dict(request.headers.items())
        if directives.body and request.body:
            return self.echo_body(request, record, trace)
        return None

    def echo_body(self, request, record, trace):
        """``body``: the request body in the record (httpbin's /anything), as text; None, or the Outcome refusing
        it. The body is at most MAX_BODY; its JSON text (up to 6 characters a byte, escaped) is charged to the
        request's budget before it is made."""
        if not request.budget.charge(6 * len(request.body)):
            return Refusal(503, f"the body is not echoed: {request.budget.refused}",
                           retry_after=True).outcome(self.config.host, trace)
        record["body"] = request.body.decode("utf-8", "replace")
        return None

    def finish(self, request, plan, trace, record, failure, children):
        """The Outcome of a request whose calls are done: status, error and elapsed time in its record."""
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
        # The padding is streamed (answer_json): writing it holds two pieces at most, not the whole size.
        size = plan.directives.size
        own = min(size, 2 * ANSWER_CHUNK)
        if not self.inflight.charge(own):
            return self.busy().outcome(self.config.host, trace)
        request.held += own
        return Outcome(status, record, trace_id=trace.trace_id, trace=trace, size=size,
                       targets=tuple(target.name for target, _rest in plan.calls),
                       big=request.budget.used > ANSWER_CHUNK, extra_headers=plan.directives.response_headers)

    def busy(self, what="the answers it holds are near", budget=None):
        """The 503 Refusal with Retry-After: this node's budget (bytes by default) has no room for it now."""
        budget = budget or self.inflight
        limit = f"{budget.limit:g}" if isinstance(budget.limit, float) else budget.limit
        return Refusal(503, f"the node is busy: {what} {budget.name}={limit}", retry_after=True, rule=budget.name)

    def burn(self, seconds):
        """Burn ``seconds`` of CPU, one request at a time: False when the queue is full (MAX_INFLIGHT_CPU).

        burn_cpu holds the GIL but for a switch every 5 ms, so N requests burning at once make every other
        thread (probes too) wait about N x 5 ms per step: 40 requests of cpu=3s kept /healthz 14 s from an
        answer. A node never burns more than one core anyway, so queueing them costs no throughput.
        """
        if not self.cpu_queue.charge(seconds):
            return False
        try:
            with REQUEST_TURNS.outside():  # burners queue on cpu_lock, and one burning must not hold a turn either
                with self.cpu_lock:
                    burn_cpu(seconds)
        finally:
            self.cpu_queue.release(seconds)
        return True

    def release(self, request):
        """Give back what a request held in the node's budget (its body, its answers), once its answer is sent."""
        if request.held:
            self.inflight.release(request.held)
            request.held = 0
        if request.budget is not None:
            request.budget.close()

    def flush_spans(self, timeout=5.0):
        """Export the spans still queued and stop the exporter (at shutdown)."""
        if self.exporter:
            self.exporter.shutdown(timeout)

    def call_all(self, calls, request, trace, directives):
        """Call every target; concurrently with ``parallel``. The records come back in route order.

        Branches run on the node's fan-out pool (MAX_FANOUT_THREADS, shared by all requests); a branch that
        finds no free thread runs on the request's own thread, after the others, so a busy pool slows a
        fan-out down but never blocks it (nor deadlocks a node calling itself).
        """
        if len(calls) == 1 or not directives.parallel:
            return [self.call(target, rest, request, trace, directives) for target, rest in calls]
        records = [None] * len(calls)
        waits, inline = [], [0]
        for index in range(1, len(calls)):
            finished = threading.Event()
            job = functools.partial(self.call_branch, calls, index, records, (request, trace, directives), finished)
            if self.fanout.try_submit(job):
                waits.append(finished)
            else:
                inline.append(index)
        for index in inline:
            self.call_branch(calls, index, records, (request, trace, directives))
        with REQUEST_TURNS.outside():
            for finished in waits:
                finished.wait()
        return records

    def call_branch(self, calls, index, records, context, finished=None):
        target, rest = calls[index]
        try:
            records[index] = self.call(target, rest, *context)
        except Exception as error:  # a bug; on a thread of its own it would leave a hole in the tree
            records[index] = caller_record(target.name, "", 502, f"internal error: {type(error).__name__}", 0.0)
        finally:
            if finished:
                finished.set()

    def call(self, target, rest, request, trace, directives):
        peer, path = self.resolver.resolve(target, forward_route(rest), target.query())
        span_id = new_span_id() if trace.native else ""
        started_ns = time.time_ns() if trace.sampled else 0
        started = time.perf_counter()
        try:
            headers = dict(trace.headers_for(span_id), **{HOPS_HEADER: str(request.hops + 1), "user-agent": USER_AGENT})
            if request.body and "content-type" in request.headers:  # the body goes on unchanged, and so does its type
                headers["content-type"] = request.headers["content-type"]
            with REQUEST_TURNS.outside():  # the wait for the peer's answer is no work here
                answer = call_peer(self.pool, peer, path, request.method, request.body, headers,
                                   directives.timeout, UpstreamBudget(self.config.max_upstream_body, request.budget))
            status, content_type, data = answer.status, answer.headers.get("content-type", ""), answer.body
            if "json" in content_type and not request.budget.charge(max(0, json_parse_overhead(data) - len(data))):
                raise CallFailed(f"answer of {len(data)} bytes not parsed: {request.budget.refused}", code=status)
            elapsed = time.perf_counter() - started
            self.metrics.observe_call(target.name, str(status), elapsed, trace)
            if trace.sampled:
                self.exporter.add_client_span(trace, span_id, request.method, target.name, peer, status, "",
                                             started_ns, time.time_ns())
            return child_record(target.name, peer.url, status, content_type, data, request.method, elapsed)
        except CallFailed as failure:
            elapsed = time.perf_counter() - started
            code = str(failure.code) if failure.code else ("timeout" if failure.status == 504 else "error")
            self.metrics.observe_call(target.name, code, elapsed, trace)
            if trace.sampled:
                self.exporter.add_client_span(trace, span_id, request.method, target.name, peer, failure.status,
                                             str(failure), started_ns, time.time_ns())
            extra = {"rule": failure.rule} if failure.rule else {}
            error = str(failure)
            if error.startswith("cannot resolve"):
                error += other_tool_hint(target.name, rest)
            return caller_record(target.name, peer.url, failure.status, error, elapsed, failure.status == 504,
                                 **extra)


# --- Views -------------------------------------------------------------------------------------------------
# SPEC 3. A node's record is a plain dict (field names of the original kept) so every view renders the same tree:
# JSON, render_tree() for a terminal and render_html() for a browser; the views are pure functions of the record.

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


def render_view(outcome, view, path, query, trace_ui_url=""):
    """A routed request's Outcome in the ``view`` it asked for: its record drawn as text (tree, html) in place;
    JSON, and an Outcome with no record (a reset), left as they are (the server writes JSON itself)."""
    if view == "json" or outcome.record is None:
        return outcome
    if view == "tree":
        outcome.text, outcome.content_type = render_tree(outcome.record), "text/plain; charset=utf-8"
    else:
        outcome.text = render_html(outcome.record, view_route(path, query), trace_ui_url, query)
        outcome.content_type = "text/html; charset=utf-8"
        outcome.extra_headers += (("Content-Security-Policy", HTML_CSP),)
    return outcome


def view_route(path, query):
    """The route as a user would type it again: the path without its leading "/" and the query without ``view``."""
    query = query_without_view(query)
    return path[1:] + ("?" + query if query else "")


def query_without_view(query):
    """A query string without its ``view`` items: the directives part, as the user wrote it."""
    return "&".join(item for item in query.split("&") if item and item.partition("=")[0].lower() != "view")


class Hop(Struct):
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
        # A record with no status is failed only when it says why (a simplemesh record always has one; the
        # records nested under an answer of the original FastAPI design have none, and did not fail).
        hop.failed = hop.status >= 400 if hop.status is not None else bool(hop.error)
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


def _status_class(status, failed=True):
    if status is None:
        return "fail" if failed else "ok"
    if status >= 500:
        return "fail"
    return "client" if status >= 400 else "ok"


def _status_text(status):
    return "---" if status is None else str(status)


def hop_note(hop):
    """What the tree and the waterfall say of a hop that answered without being a simplemesh node, else ""."""
    record = hop.record
    if record.get("design") == "fastapi":
        return "FastAPI design"
    if record.get("foreign") is not True:
        return ""
    size = record.get("size")
    note = f"not simplemesh: {_printable(str(record.get('content_type') or 'no content type'))[:60]}"
    note += f", {size} B" if isinstance(size, int) and not isinstance(size, bool) else ""
    excerpt = record.get("excerpt")
    if isinstance(excerpt, str) and excerpt and not hop.failed:  # a failed hop's error has it already
        note += f": {_printable(excerpt)[:60]}"
    return note


def render_tree(record, color=False):
    """The call tree as aligned plain text for a terminal (ANSI colours with ``color``), trace id on top."""
    hops = walk_tree(record)
    paint = (lambda text, *styles: "".join(ANSI[s] for s in styles) + text + ANSI["reset"]) if color else \
        (lambda text, *styles: text)
    labels = [_tree_prefix(hop) + _printable(hop.host) for hop in hops]
    width = max(len(label) for label in labels)
    times = [format_seconds(hop.elapsed) for hop in hops]
    time_width = max(len(text) for text in times)
    root = hops[0]
    lines = []
    if isinstance(record, dict) and record.get("trace_id"):
        lines.append(paint(f"trace {_printable(str(record['trace_id']))}", "dim"))
    for hop, label, elapsed in zip(hops, labels, times):
        status = _status_text(hop.status)
        notes = []
        if hop.delay:
            notes.append(f"delay {format_seconds(hop.delay)}")
        cpu = hop.record.get("cpu") if isinstance(hop.record, dict) else None
        if isinstance(cpu, (int, float)) and not isinstance(cpu, bool) and cpu > 0:
            notes.append(f"cpu {format_seconds(_number(cpu))}")
        note = hop_note(hop)
        if note:
            notes.append(note)
        if hop.failed:
            mark = "✗ " + _printable(hop.error or f"status {hop.status}")
            notes.append(paint(mark, "fail", "bold") if hop.origin else paint(mark, "dim"))
        line = (f"{label:<{width}}  {paint(f'{status:>3}', _status_class(hop.status, hop.failed))}  "
                f"{elapsed:>{time_width}}"
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


def render_html(record, route, trace_ui_url="", query=None):
    """A self-contained page (inline CSS and JS, no other request) drawing the call tree as a waterfall.

    ``query`` is the route's query string (by default what follows the first "?" of ``route``)."""
    query = route.partition("?")[2] if query is None else query
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
        note = hop_note(hop)
        label = (format_seconds(hop.elapsed) + (f" · {hop.error}" if hop.failed and hop.error else "")
                 + (f" · {note}" if note else ""))
        if left + width <= 65:  # the label goes after the bar, before it, or on a bar too wide for either
            side = f"left:{left + width:.3f}%"
        elif left >= 35:
            side = f"right:{100 - left:.3f}%"
        else:
            side = f"left:{left:.3f}%;color:#fff"
        classes = " ".join(["hop", _status_class(hop.status, hop.failed)] + ["failed"] * hop.failed
                           + ["origin"] * hop.origin)
        guides = "".join(f'<i class="g{" end" if last else ""}"></i>' for last in hop.last)
        details = "".join(f"<dt>{esc(str(key))}</dt><dd>{esc(str(value))}</dd>"
                          for key, value in hop.record.items() if key not in ("next_node", "padding", "headers"))
        rows.append(
            f'<div class="{classes}" data-index="{hop.index}" data-parent="{hop.parent}" data-depth="{hop.depth}" '
            f'data-host="{esc(hop.host)}" data-status="{"" if hop.status is None else hop.status}">'
            f'<div class="name">{guides}<b>{esc(hop.host)}</b><span class="code">{_status_text(hop.status)}</span>'
            f'</div><div class="lane"><div class="bar" style="left:{left:.3f}%;width:{width:.3f}%"'
            f'{" title=estimated" if hop.estimated else ""}><div class="delay" style="width:{delay:.1f}%"></div>'
            f'</div><span class="label" style="{side}">{esc(label)}</span></div>'
            f'<dl class="details" hidden>{details}</dl></div>')
    ticks = "".join(f'<span style="left:{25 * i}%">{format_seconds(total * i / 4)}</span>' for i in range(5))
    status = _status_text(root.status)
    return HTML_PAGE.format(
        title=esc(f"{status} /{route}"), route=esc(route), status=status, cls=_status_class(root.status, root.failed),
        elapsed=format_seconds(root.elapsed), hops=len(hops), failed=sum(hop.origin for hop in hops),
        trace=trace, ticks=ticks, rows="\n".join(rows),
        json_link=esc(view_link(query, "json")), tree_link=esc(view_link(query, "tree")))


def view_link(query, view):
    """A link to another view of this page, relative: the query alone (``?delay=1s&view=json``), so the browser
    keeps the path it asked for. A path written as "/" + route could read as ``//evil.example`` (off-site)."""
    query = query_without_view(query)
    return "?" + (query + "&" if query else "") + "view=" + view


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

    def enter(self, limit):
        """Count a request in flight: False when that makes more than ``limit`` (MAX_CONCURRENCY)."""
        with self.lock:
            self.in_flight += 1
            return self.in_flight <= limit

    def leave(self):
        with self.lock:
            self.in_flight -= 1

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


class TracingConfig(Struct):
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
        """The OTEL_* variables' settings, or None when spans are not exported."""
        get = functools.partial(_otel_text, environ)
        endpoint = otlp_endpoint(get)
        if endpoint is None:
            return None
        number = functools.partial(_otel_number, get)
        protocol = otlp_protocol(get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"), get("OTEL_EXPORTER_OTLP_PROTOCOL"))
        # the traces-specific variable wins over the general one
        compression = (get("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION") or get("OTEL_EXPORTER_OTLP_COMPRESSION")).lower()
        if compression not in ("", "none", "gzip"):
            raise ConfigError(f"OTEL_EXPORTER_OTLP_COMPRESSION={compression!r}: expected gzip or none")
        try:
            headers = tuple(parse_key_values(get("OTEL_EXPORTER_OTLP_HEADERS")).items()) + tuple(
                parse_key_values(get("OTEL_EXPORTER_OTLP_TRACES_HEADERS")).items())
            resource = parse_key_values(get("OTEL_RESOURCE_ATTRIBUTES"))
        except ValueError as error:
            raise ConfigError(f"OTEL_EXPORTER_OTLP_HEADERS or OTEL_RESOURCE_ATTRIBUTES: {error}") from None
        service_name = get("OTEL_SERVICE_NAME") or resource.pop("service.name", "")
        sampler, ratio = otel_sampler(get)
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


def _otel_text(environ, name):
    return (environ.get(name) or "").strip()


def _otel_number(get, name, convert, default, scale=1.0):
    """A positive number setting (times ``scale``: milliseconds to seconds), ``default`` when unset."""
    text = get(name)
    if not text:
        return default
    try:
        value = convert(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r}: expected a number") from None
    if value <= 0:
        raise ConfigError(f"{name}={text!r}: must be above zero")
    return convert(value * scale)  # an int setting stays an int (a batch size slices the queue)


def otlp_endpoint(get):
    """The OTLP traces URL the OTEL_* variables name (``get(name)`` reads one), or None: no span export."""
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
    return endpoint


def otel_sampler(get):
    """(sampler, ratio) from OTEL_TRACES_SAMPLER and its argument."""
    sampler = get("OTEL_TRACES_SAMPLER").lower() or "parentbased_always_on"
    if sampler not in SAMPLERS:
        raise ConfigError(f"OTEL_TRACES_SAMPLER={sampler!r}: expected one of {', '.join(SAMPLERS)}")
    ratio = 1.0
    if sampler.endswith("traceidratio") and get("OTEL_TRACES_SAMPLER_ARG"):
        try:
            ratio = parse_probability(get("OTEL_TRACES_SAMPLER_ARG"))
        except ValueError as error:
            raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG: {error}") from None
    return sampler, ratio


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


class Span(Struct):
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


class ExportAnswer(Struct):
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
        self.origin = (url.scheme, url.hostname, url.port or (443 if url.scheme == "https" else 80))
        self.pool = origin_pool(url.scheme)
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
                self.pool.close()
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
        """The ExportAnswer of one POST (exchange: a kept-alive connection the collector closed gets one retry)."""
        try:
            peer, request = origin_request(*self.origin, "POST", self.path, self.headers, payload)
            answer = exchange(self.pool, peer, "POST", request, time.monotonic() + self.tracing.timeout,
                              byte_limit(MAX_EXPORT_ANSWER), retry_stale=True)
        except AnswerError as error:  # an answer above MAX_EXPORT_ANSWER keeps its status, not its body
            return ExportAnswer(error.status if error.over_budget else None)
        except Exception:
            return ExportAnswer()
        return ExportAnswer(answer.status, retry_after_seconds(answer.headers.get("retry-after")),
                            answer.headers.get("content-type", ""), answer.body)

    def shutdown(self, timeout=5.0):
        """Export what is queued, then stop the thread (SPEC 8: spans are flushed on SIGTERM)."""
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout)


# --- Configuration -----------------------------------------------------------------------------------------
# Everything a node is told comes from its environment (SPEC 2, 4, 6, 8), read once at start-up into a frozen
# Config. A bad value stops the program with a clear message instead of surfacing on the first request. Config
# comes after the sections whose settings it reads (directives, the wire's header rules, TracingConfig).

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


# The memory a node is given and the bytes its answers may hold are one decision, made here: ``manifests`` writes
# MEMORY_LIMIT_MIB as each pod's limit, and MAX_INFLIGHT_BYTES defaults to what fits in it. A node at rest uses
# about 30 MiB (BASE_MEMORY_MIB leaves room for threads, pools and caches); each in-flight answer byte costs up to
# ANSWER_MEMORY_FACTOR bytes of memory (a body read, its parsed tree, the rendered answer), as measured by
# RobustMemoryTest. To give a node more, raise both: limit >= BASE_MEMORY_MIB + factor * MAX_INFLIGHT_BYTES.
MEMORY_LIMIT_MIB = 128
BASE_MEMORY_MIB = 44
ANSWER_MEMORY_FACTOR = 3


def inflight_bytes_for(memory_limit_mib):
    """The MAX_INFLIGHT_BYTES that keeps a node under ``memory_limit_mib`` (README: sizing a node)."""
    return (memory_limit_mib - BASE_MEMORY_MIB) * 1024 * 1024 // ANSWER_MEMORY_FACTOR


class Config(Struct):
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
    max_route_bytes: int = 10 * 1024 * 1024  # answer bytes one request may ask for across its tree
    max_route_cpu: float = 10.0  # CPU seconds one request may ask for across its tree
    max_inflight_bytes: int = inflight_bytes_for(MEMORY_LIMIT_MIB)  # all requests' answer and body bytes at once
    max_inflight_cpu: float = 10.0  # CPU seconds all requests together may have queued or burning on this node
    max_concurrency: int = 512
    max_connections: int = 10000
    max_fanout_threads: int = 64
    keepalive_timeout: float = 75.0
    shutdown_delay: float = 0.0
    shutdown_grace: float = 30.0
    log_format: str = "text"
    log_level: str = "info"
    gateway: bool = False  # GATEWAY: a mesh's gateway, transparent like an ingress (SPEC 6)
    trace_ui_url: str = ""  # TRACE_UI_URL: the trace id on the HTML page links there ({trace_id} filled in)
    identity: dict = {}  # pod, namespace, ip, node from the downward API
    tracing: object = None  # TracingConfig when native spans are on (OTEL_EXPORTER_OTLP_*ENDPOINT set)

    @classmethod
    def from_env(cls, environ, **overrides):
        """Build a Config from environment variables; ``overrides`` win (the ``mesh`` command uses them)."""
        settings = read_settings(environ, CONFIG_VARIABLES)
        if "host" not in settings:
            settings["host"] = socket.gethostname()
        settings["defaults"] = directive_defaults(environ)
        settings["identity"] = {key: environ[var] for key, var in IDENTITY_ENV.items() if environ.get(var)}
        settings["tracing"] = TracingConfig.from_env(environ)
        settings.update(overrides)
        config = cls(**settings)
        config.check_defaults(environ)
        return config

    def check_defaults(self, environ):
        """ConfigError when the node's own directive defaults break its caps: every request would be refused."""
        config = self
        try:
            base = Directives.resolve(config, config.defaults, {})
        except DirectiveError as error:
            raise ConfigError(f"{DIRECTIVES[error.name].env}: {error}") from None
        for amount, limit, variable, name in ((base.size, config.max_route_bytes, "MAX_ROUTE_BYTES", "RESPONSE_SIZE"),
                                              (base.size, config.max_inflight_bytes, "MAX_INFLIGHT_BYTES",
                                               "RESPONSE_SIZE"),
                                              (base.cpu, config.max_route_cpu, "MAX_ROUTE_CPU", "CPU"),
                                              (base.cpu, config.max_inflight_cpu, "MAX_INFLIGHT_CPU", "CPU")):
            if amount > limit:  # else every routed request would be refused
                raise ConfigError(f"{name}={environ.get(name) or amount} is above {variable}={limit:g}")


def read_settings(environ, variables):
    """{attribute: value} for each (VARIABLE, attribute, convert) of ``variables`` set (not empty) in ``environ``;
    a value ``convert`` refuses is a ConfigError naming the variable."""
    settings = {}
    for name, attr, convert in variables:
        raw = environ.get(name)
        if raw is None or raw == "":
            continue
        try:
            settings[attr] = convert(raw)
        except ValueError as error:
            raise ConfigError(f"{name}={raw!r}: {error}") from None
    return settings


def directive_defaults(environ):
    """A node's directive defaults from the environment (DELAY, ERROR_RATE...), as raw text."""
    defaults = {}
    for directive in DIRECTIVES.values():
        raw = environ.get(directive.env)
        if raw and directive.name == "parallel":  # FANOUT=parallel|sequential
            if raw.lower() not in ("parallel", "sequential"):
                raise ConfigError(f"FANOUT={raw!r}: expected parallel or sequential")
            raw = "true" if raw.lower() == "parallel" else "false"
        if raw:
            defaults[directive.name] = raw
    return defaults


IDENTITY_ENV = {"pod": "POD_NAME", "namespace": "POD_NAMESPACE", "ip": "POD_IP", "node": "NODE_NAME"}


def listen_address(text):
    """ADDRESS: an IP address (``0.0.0.0``, ``::``, ``127.0.0.1``...) or ``localhost``; never a name to look up."""
    if text == "localhost":
        return text
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, text)
            return text
        except OSError:
            continue
    raise ValueError("expected an IP address to listen on, such as 0.0.0.0, ::, 127.0.0.1 or ::1")


def forward_header_names(text):
    """FORWARD_HEADERS: lower-cased names; a hop-by-hop or framing header is refused (the node writes those)."""
    names = tuple(word.lower() for word in _word_list(text))
    refused = [name for name in names if name in NOT_FORWARDABLE or name.startswith("proxy-")]
    if refused:
        raise ValueError(f"{', '.join(refused)} cannot be forwarded: a node writes hop-by-hop and framing "
                         "headers (connection, keep-alive, te, trailer, transfer-encoding, upgrade, "
                         "content-length, host, proxy-*) itself")
    return names


_POSITIVE_INT = _positive(ascii_int)
# (variable, Config attribute, converter): what Config.from_env reads (the directive defaults apart: DIRECTIVES).
CONFIG_VARIABLES = (
    ("HOST", "host", str),
    ("PORT", "port", _port),
    ("ADDRESS", "address", listen_address),
    ("VERSION", "version", str),
    ("UPSTREAM_PORT", "upstream_port", _port),
    ("PEERS", "peers", parse_peers),
    ("ALLOW_DIRECTIVES", "allow_directives", parse_bool),
    ("ALLOW_IP_TARGETS", "allow_ip_targets", parse_bool),
    ("ALLOWED_HOSTS", "allowed_hosts", lambda text: tuple(glob.lower() for glob in _word_list(text))),
    ("FORWARD_HEADERS", "forward_headers", forward_header_names),
    ("MAX_CALLS", "max_calls", _POSITIVE_INT),
    ("MAX_DEPTH", "max_depth", _POSITIVE_INT),
    ("MAX_DELAY", "max_delay", parse_duration),
    ("MAX_CPU", "max_cpu", parse_duration),
    ("MAX_SIZE", "max_size", parse_size),
    ("MAX_TIMEOUT", "max_timeout", parse_duration),
    ("MAX_BODY", "max_body", parse_size),
    ("MAX_UPSTREAM_BODY", "max_upstream_body", parse_size),
    ("MAX_ROUTE_BYTES", "max_route_bytes", _positive(parse_size)),
    ("MAX_ROUTE_CPU", "max_route_cpu", parse_duration),
    ("MAX_INFLIGHT_BYTES", "max_inflight_bytes", _positive(parse_size)),
    ("MAX_INFLIGHT_CPU", "max_inflight_cpu", _positive(parse_duration)),
    ("MAX_CONCURRENCY", "max_concurrency", _POSITIVE_INT),
    ("MAX_CONNECTIONS", "max_connections", _POSITIVE_INT),
    ("MAX_FANOUT_THREADS", "max_fanout_threads", _POSITIVE_INT),
    ("KEEPALIVE_TIMEOUT", "keepalive_timeout", _positive(parse_duration)),
    ("SHUTDOWN_DELAY", "shutdown_delay", parse_duration),
    ("SHUTDOWN_GRACE", "shutdown_grace", parse_duration),
    ("LOG_FORMAT", "log_format", _choice("text", "json")),
    ("LOG_LEVEL", "log_level", _choice("debug", "info", "warning", "error")),
    ("TRACE_UI_URL", "trace_ui_url", str),
    ("GATEWAY", "gateway", parse_bool),
)


# --- Gateway -----------------------------------------------------------------------------------------------
# SPEC 6. The gateway of ``mesh`` (GATEWAY=true) is what an ingress is in a cluster: invisible. The first segment
# of the path names the entry node and everything after it is that node's, so ``/a/b~c?parallel`` at the gateway
# is ``http://a/b~c?parallel`` in a cluster (``/a/metrics`` is a's /metrics, ``/a/-/healthy`` a's control): the
# answer, its status and its headers are a's. A path without one entry node (``/``, a fan-out ``/a~b``, a group)
# is answered by the gateway as a node of its own, as are the gateway's own /metrics, probes and /-/ paths. The
# server's dispatch asks gateway_entry (pure) first, then forward_to_entry makes the one call.

GATEWAY_ANSWER_SKIPPED = NOT_FORWARDABLE | {"content-type", "date", "x-trace-id", "server"}  # written again


def gateway_entry(path, query):
    """(entry Target, the rest of the path as sent on, the entry's query) for a request to the gateway, or None
    when the first segment is not one node. The rest goes on as it came (the entry node checks it), percent-
    encoded again; the entry's matrix directives join its query (``/a;delay=1s/b``)."""
    first, _slash, rest = path[1:].partition("/")
    try:
        steps = parse_route("/" + first)
    except RouteError:
        return None
    if len(steps) != 1 or len(steps[0]) != 1 or isinstance(steps[0][0], Group):
        return None
    entry = steps[0][0]
    return entry, quote(rest, safe="/;~()=:,.-_!*'+@$&|"), "&".join(part for part in (entry.query(), query) if part)


def forward_to_entry(node, request, entry):
    """The entry node's answer, as it came (status, body, headers), or the gateway's record of the failed call."""
    target, rest, query = entry
    refusal = target_refusal(node.config, target.name)
    if refusal:
        return error_outcome(node.config.host, 403, refusal[0], rule=refusal[1], target=target.name)
    peer, path = node.resolver.resolve(target, rest, query)
    headers = {name: value for name, value in request.headers.items()
               if name not in NOT_FORWARDABLE and name != "expect" and not name.startswith("proxy-")}
    request.budget = RequestBudget(node.config.max_route_bytes, node.inflight, RECORD_BYTES)  # as for one call
    upstream = UpstreamBudget(node.config.max_upstream_body, request.budget)
    started = time.perf_counter()
    try:
        with REQUEST_TURNS.outside():  # the wait for the entry node's answer is no work here
            answer = call_peer(node.pool, peer, path, request.method, request.body, headers,
                               node.base_directives.timeout, upstream)
    except CallFailed as failure:
        elapsed = time.perf_counter() - started
        record = caller_record(target.name, peer.url, failure.status, str(failure), elapsed, failure.status == 504)
        return Outcome(failure.status, record, targets=(target.name,))
    kept = tuple((name, value) for name, value in answer.headers.items() if name not in GATEWAY_ANSWER_SKIPPED)
    length = answer.headers.get("content-length", "")  # a HEAD answer has no body, but the length it would have
    head_length = int(length) if request.method == "HEAD" and length.isascii() and length.isdigit() else None
    return Outcome(answer.status, text=answer.body, content_type=answer.headers.get("content-type", ""),
                   extra_headers=kept, trace_id=answer.headers.get("x-trace-id", ""), targets=(target.name,),
                   head_length=head_length)


# --- Server ------------------------------------------------------------------------------------------------
# What a worker does with a connection that has bytes waiting, in Handler: read one request with the wire section
# (serve_one, read_request), admit it (answer: above MAX_CONCURRENCY requests in flight, a 503; probes, scrapes
# and admin calls are never refused), dispatch it (to the node, the probes, /metrics or the admin paths; a routed
# request's Outcome drawn in its view), send the answer in one send, then account for it (metrics, access log).
#
# A custom HTTP/1.1 server built for a node's three duties under load: never a thread per connection, probes
# answered first, refusals cheap. One poller thread owns the listener and every idle connection (epoll, so any
# number of descriptors); a connection whose first byte arrives is handed to a bounded pool of workers, or to a
# small separate lane of its own when its request line (peeked, not read) is a probe or a scrape. A worker reads
# one request with the HTTP/1.1 wire section above, answers it, serves any request already buffered behind it,
# then gives the connection back to the poller. Idle connections close after KEEPALIVE_TIMEOUT, the oldest first
# when MAX_CONNECTIONS is near; beyond it new ones wait in the listen backlog. Error answers end with a lingering
# close done by the poller, so the client reads the 400 or 413 instead of a reset and no worker waits for it.
# Above TURNS_ABOVE busy workers, requests take turns through REQUEST_TURNS (a TurnGate, in Shared utilities;
# the node steps out of it around its waits), so none waits seconds for the interpreter lock under saturation.

PROBE_PREFIXES = tuple(f"{method} {path}{end}".encode() for method in ("GET", "HEAD")
                       for path in OPERATIONS_PATHS for end in (" ", "?"))
PROBE_PEEK = 2048  # bytes of a new request looked at (not read) to tell a probe
LINGER_SECONDS = 1.0  # how long a closing connection's unread input is drained, at most
LINGER_BYTES = 1024 * 1024  # and how much of it
STAY_SECONDS = 0.005  # a worker waits this long for a keep-alive client's next request, when the node is not busy
STAY_WORKERS = 32  # "not busy": at most this many workers at work
QUICK_READ = 0.05  # a worker waits this long for more of a request before handing it back to the poller
REFUSING_WORKERS = 4  # workers beyond MAX_CONCURRENCY: they answer the 503s, so refusing never takes more
TURNS_ABOVE = 8  # workers at work on one server before its requests take turns (at or below: no queue, no switch)


def build_node(config):
    """A Node with what it reports to: its Metrics and, with native spans (config.tracing), its SpanExporter."""
    metrics = Metrics()
    exporter = SpanExporter(config.tracing, node_resource(config), metrics,
                            warn=functools.partial(log_warning, config)) if config.tracing else None
    return Node(config, metrics, exporter)


def switch_probe(node, method, probe, query):
    """SPEC 4: ``POST /-/ready?ready=false`` fails /readyz, ``POST /-/healthy?healthy=false`` fails /healthz (so
    the kubelet restarts the container), until set true again; GET shows the switch."""
    host = node.config.host
    if method == "POST" and not node.config.allow_directives:
        return error_outcome(host, 403, f"switching /-/{probe} is not allowed here (ALLOW_DIRECTIVES=false)",
                             rule="ALLOW_DIRECTIVES")
    if method == "POST":
        try:
            setattr(node, probe, parse_bool(query.get(probe) or "unset"))
        except ValueError:
            return error_outcome(host, 400, f"use ?{probe}=true or ?{probe}=false")
    elif method != "GET":
        return error_outcome(host, 405, "use GET or POST")
    return Outcome(200, {"host": host, probe: getattr(node, probe)})


class Handler:
    """Serves the requests a connection has sent, one at a time, on the worker that the server handed it to."""

    def __init__(self, server, conn, patient=False):
        self.server = server
        self.node = server.node
        self.conn = conn
        self.patient = patient  # wait for the whole request here (the poller has stopped), not on the poller
        self.head = None

    def serve(self):
        """What to do with the connection next: ``keep`` (idle again), ``arriving`` (a request is slow to come:
        the poller gathers the rest), ``linger`` (an error was answered: drain, then close), ``close`` or
        ``reset`` (closed already)."""
        workers = self.server.workers
        while True:
            # Turns only when busy (as for staying on a connection): a few runnable threads share the interpreter
            # fairly by themselves, and queueing them costs a thread switch per request. Draining: a slow client
            # must not hold a turn.
            if self.patient or workers.threads - workers.waiting <= TURNS_ABOVE:
                result = self.serve_one()
            else:
                REQUEST_TURNS.enter()
                try:
                    result = self.serve_one()
                finally:
                    REQUEST_TURNS.leave()
            if result != "keep":
                return result
            if not self.conn.reader.buffered and not self.next_request_soon():  # pipelined: served at once
                return result
            self.conn.first_byte = time.monotonic()

    def next_request_soon(self):
        """Whether this keep-alive client's next request starts within STAY_SECONDS, when the node is not busy:
        serving it on the same worker saves two thread hand-offs through the poller (about a third of a simple
        request's CPU). Busy (more than STAY_WORKERS workers at work, or work queued), every connection goes back
        to the poller: fewer threads then compete for the interpreter, and probes stay fast."""
        workers = self.server.workers
        if self.patient or workers.queued or workers.threads - workers.waiting > STAY_WORKERS:
            return False
        conn = self.conn
        if conn.stay_poll is None:  # made once per connection: two system calls fewer per request
            conn.stay_poll = select.poll()
            conn.stay_poll.register(conn.sock, select.POLLIN)
        return bool(conn.stay_poll.poll(STAY_SECONDS * 1000))

    def serve_one(self):
        conn = self.conn
        # KEEPALIVE_TIMEOUT bounds the whole request from its first byte (the socket timeout only bounds each
        # read): a client trickling its request line, headers or body cannot hold a worker (slowloris).
        remaining = conn.first_byte + self.node.config.keepalive_timeout - time.monotonic()
        watch = DEADLINES.watch(conn.sock, max(remaining, 0.001))
        try:
            if not self.patient and not self.request_arrived():
                DEADLINES.release(watch)
                return "arriving"
            request = self.read_request()
        except BadRequest as error:
            DEADLINES.release(watch)
            return self.answer_malformed(error)
        except OSError:  # a timeout or a reset: the client is gone, or too slow
            DEADLINES.release(watch)
            return "close"
        if DEADLINES.release(watch) or request is None:
            return "close"
        return self.answer(request)

    def request_arrived(self):
        """Whether the whole request is here, after waiting QUICK_READ at most for each next piece. False: the
        rest is slow to come, and the poller waits for it, not a worker (a client trickling its request holds
        no thread). The usual request is all in the first read, which the poller saw waiting (so it does not
        block, and the socket's timeout is changed only for slow clients: each change is two system calls)."""
        reader, sock, max_body = self.conn.reader, self.conn.sock, self.node.config.max_body
        if not reader.buffered and not reader.fill():
            return True  # the client closed: the parser says what that was
        if reader.arrived(max_body, self.node.inflight):
            return True
        sock.settimeout(QUICK_READ)
        try:
            with REQUEST_TURNS.outside():  # waiting for a client's bytes is no work
                while not reader.arrived(max_body, self.node.inflight):
                    if not reader.fill():
                        return True
            return True
        except TimeoutError:
            return False
        finally:
            sock.settimeout(self.node.config.keepalive_timeout)

    def read_request(self):
        """The next request on the connection; None when the client closed it first."""
        reader, max_body = self.conn.reader, self.node.config.max_body
        head = read_request_head(reader, max_body)
        if head is None:
            return None
        received, received_wall = time.perf_counter(), time.time()
        self.head = head
        path, query = split_target(head.target)
        inflight = self.node.inflight
        held = reader.take_charge()  # a body gathered on the poller was charged before it came
        if head.length and not held:
            held = charge_body(inflight, head.length)  # before a byte of it is read (SPEC 8)
        try:
            if head.expects_continue:
                self.conn.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits a second before a body
            body = read_body(reader, head, max_body)
            if body and head.chunked:  # its length is known only now
                held = charge_body(inflight, len(body))
        except BaseException:
            inflight.release(held)
            raise
        if body is None:
            inflight.release(held)
            return None
        return Request(head.method, path, query, head.headers, body, received, received_wall, held=held)

    def answer_malformed(self, error):
        """Answered, counted and logged like any request; then a lingering close (unread input may follow)."""
        node = self.node
        # A 503: the node's budget was full, try again.
        outcome = Refusal(error.status, str(error), retry_after=error.status == 503).outcome(node.config.host)
        # Counted before it is sent, so a client that reads /metrics next sees it ("-": no method label value).
        node.metrics.observe_request("-", str(error.status), 0.0)
        self.log_access(None, outcome, 0.0)
        try:
            self.conn.sock.sendall(encode_answer(error.status, json_bytes(outcome.record),
                                                 extra_headers=outcome.extra_headers,
                                                 connection="close"))
        except OSError:
            return "close"
        return "linger"

    def answer(self, request):
        """A request read: admit, dispatch, send, then count and log it. The connection's next state."""
        node = self.node
        # Probes, scrapes and admin calls are always answered: a busy node must not look dead to the kubelet.
        admitted = node.metrics.enter(node.config.max_concurrency) or is_operations_path(request.path)
        try:
            outcome = self.outcome_for(request) if admitted else self.overloaded()
            result = self.send(outcome, request.method)
        except OSError:  # the client went away while the answer was written
            result, outcome = "close", Outcome(499)
        finally:
            node.release(request)
            node.metrics.leave()
        self.account(request, outcome)
        return result

    def send(self, outcome, method):
        return self.reset_connection() if outcome.reset else self.write_answer(outcome, method)

    def account(self, request, outcome):
        """The request's metrics and its access-log line, once its answer is sent."""
        elapsed = time.perf_counter() - request.received
        self.node.metrics.observe_request(request.method, str(outcome.status or "reset"), elapsed, outcome.trace)
        self.log_access(request, outcome, elapsed)

    def overloaded(self):
        config = self.node.config
        return Refusal(503, f"too many requests in flight (MAX_CONCURRENCY={config.max_concurrency})",
                       retry_after=True).outcome(config.host)

    def outcome_for(self, request):
        node = self.node
        try:
            outcome = self.dispatch(node, request)
        except Exception as error:  # a bug: answer and log one line rather than drop the connection
            outcome = internal_error(node.config, error)
        if outcome.trace is not None and outcome.trace.sampled:  # queued before the answer leaves
            node.exporter.add_server_span(outcome.trace, request, outcome.status, time.time_ns())
        return outcome

    def dispatch(self, node, request):
        path = request.path
        if path.startswith(ADMIN_PREFIX):
            return self.admin(node, request)
        if path in PROBE_PATHS:
            ready = node.ready if path == "/readyz" else node.healthy
            status = "ok" if ready else "not ready" if path == "/readyz" else "unhealthy (POST /-/healthy?healthy=true)"
            return Outcome(200 if ready else 503, {"host": node.config.host, "status": status})
        if path == METRICS_PATH:
            if "application/openmetrics-text" in request.headers.get("accept", ""):
                return Outcome(200, text=node.metrics.render(openmetrics=True), content_type=OPENMETRICS_TYPE)
            return Outcome(200, text=node.metrics.render(), content_type=PROMETHEUS_TYPE)
        first = path[1:].split("/", 1)[0]
        if first in RESERVED_NAMES or first.startswith("-"):
            return error_outcome(node.config.host, 404, f"/{first} is reserved; "
                                             f"to call a service named {first!r} write the step as ({first})")
        entry = gateway_entry(path, request.query) if node.config.gateway else None
        if entry:
            return forward_to_entry(node, request, entry)
        view = choose_view(request.query, request.headers.get("accept", ""))
        if view is None:
            return error_outcome(node.config.host, 400, f"unknown view; use ?view={'|'.join(VIEWS)}")
        return render_view(node.serve(request), view, request.path, request.query, node.config.trace_ui_url)

    def admin(self, node, request):
        """SPEC 4 runtime controls: /-/defaults, /-/ready and /-/healthy."""
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
        if request.path in (ADMIN_PREFIX + "ready", ADMIN_PREFIX + "healthy"):
            return switch_probe(node, request.method, request.path[len(ADMIN_PREFIX):], query)
        return error_outcome(host, 404, f"no admin path {request.path}")

    def write_answer(self, outcome, method):
        """Sent in one send (a big answer: its head, then a piece at a time, never a whole copy of it in memory);
        ``keep`` when the connection stays open for another request, else ``close``."""
        head = self.head
        keep = head.keep_alive and not self.server.draining
        connection = None if keep and head.version == "HTTP/1.1" else ("keep-alive" if keep else "close")
        if outcome.text is not None:
            body = outcome.text if isinstance(outcome.text, (bytes, bytearray)) else outcome.text.encode()
            length = len(body) if outcome.head_length is None or method != "HEAD" else outcome.head_length
        else:
            length, pieces = answer_json(outcome.record, outcome.size, outcome.big, wants_indented_json(head.headers))
            body = "".join(pieces).encode() if length <= ANSWER_CHUNK else None
        sock = self.conn.sock
        sock.sendall(encode_answer(outcome.status, body, outcome.content_type, outcome.extra_headers,
                                   outcome.trace_id, connection, head_only=method == "HEAD" or body is None,
                                   length=length))
        if body is None and method != "HEAD":
            with REQUEST_TURNS.outside():  # a big answer goes at the client's pace: no turn held meanwhile
                for chunk in ascii_chunks(pieces):
                    sock.sendall(chunk)
        return "keep" if keep else "close"

    def reset_connection(self):
        """Close without answering, with an RST (what Envoy reports as an upstream reset)."""
        sock = self.conn.sock
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        except OSError:
            pass
        return "reset"

    def log_access(self, request, outcome, elapsed):
        config = self.node.config
        if config.log_level not in ("debug", "info"):
            return
        log_line(config, {
            "method": request.method if request else "-", "path": request.path if request else "-",
            "query": request.query if request and request.query else None, "status": outcome.status or "reset",
            "elapsed": round(elapsed, 6), "trace_id": outcome.trace_id,
            "span_id": outcome.trace.span_id if outcome.trace else "", "targets": list(outcome.targets)})


def internal_error(config, error):
    """A 500 for an exception no input should cause: one log line that says where, no traceback, no hang."""
    innermost = error.__traceback__
    while innermost.tb_next:
        innermost = innermost.tb_next
    place = f"{os.path.basename(innermost.tb_frame.f_code.co_filename)}:{innermost.tb_lineno}"
    message = f"{type(error).__name__}: {error}"
    log_line(config, {"level": "error", "error": message, "at": place})
    return error_outcome(config.host, 500, f"internal error: {message[:200]}")


def listen(address, port):
    """A listening socket on ``address``; ``::`` is dual-stack (IPv4 too) where the system allows it.
    ConfigError, one line naming the port, for a port in use or an address this machine does not have."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    dual_stack = address == "::" and socket.has_dualstack_ipv6()
    try:
        sock = socket.create_server((address, port), family=family, backlog=1024, dualstack_ipv6=dual_stack)
    except OSError as error:
        where = f"[{address}]:{port}" if family == socket.AF_INET6 else f"{address}:{port}"
        raise ConfigError(f"cannot listen on {where}: {listen_problem(error, port)}") from None
    sock.setblocking(False)
    return sock


def listen_problem(error, port):
    if error.errno == errno.EADDRINUSE:
        return f"port {port} is already in use"
    if error.errno == errno.EADDRNOTAVAIL:
        return "that address is not one of this machine's (ADDRESS)"
    if error.errno == errno.EACCES:
        return f"not allowed to listen on port {port}"
    return error.strerror or str(error)


def connection_cap(configured):
    """MAX_CONNECTIONS, lowered to fit the process's descriptor limit (with room for outbound connections)."""
    try:
        import resource  # here: only this needs it, and start-up time is measured
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return configured
    if soft == resource.RLIM_INFINITY:
        return configured
    return min(configured, max(16, soft // 2))


def charge_body(inflight, nbytes):
    """Charge a request body to the node's MAX_INFLIGHT_BYTES: ``nbytes``, or the 503 that says the node is full."""
    if not inflight.charge(nbytes):
        raise BadRequest(503, f"the node is busy: the bytes it holds are near MAX_INFLIGHT_BYTES={inflight.limit}")
    return nbytes


class InboundConnection:
    """One client connection: its socket, reader, and when it was last idle (for the poller)."""
    __slots__ = ("sock", "reader", "idle_since", "first_byte", "linger_until", "lingered", "routed", "stay_poll")

    def __init__(self, sock):
        self.sock = sock
        self.reader = SocketReader(sock)
        self.idle_since = time.monotonic()
        self.first_byte = 0.0  # when the current request's first byte was seen
        self.linger_until = 0.0
        self.lingered = 0
        self.routed = False  # served by the workers before: its next requests go to them without a peek
        self.stay_poll = None  # a worker's poll object for this connection's next request (Handler.next_request_soon)

    def close(self):
        self.reader.release_charge()
        try:
            self.sock.close()
        except OSError:
            pass


def is_probe(first_bytes):
    """A probe or scrape that arrived whole (a kubelet's is a few hundred bytes): one that trickles in goes to the
    workers, so no client can hold the probe lane by sending ``GET /healthz`` a byte at a time."""
    return first_bytes.startswith(PROBE_PREFIXES) and (b"\r\n\r\n" in first_bytes or b"\n\n" in first_bytes)


class Poller:
    """What ``selectors`` does for the server, plus the peer's half-close: on Linux, epoll with EPOLLRDHUP, so a
    closed keep-alive connection is seen as closed without reading it (a mass disconnect costs no worker).
    Elsewhere selectors' default, without that hint. ``select`` gives (data, hung up) pairs."""

    def __init__(self):
        self.epoll = select.epoll() if hasattr(select, "epoll") else None
        self.selector = None if self.epoll else selectors.DefaultSelector()
        self.data = {}  # fd -> what register() was given

    def register(self, sock, data):
        fd = sock.fileno()
        if self.epoll:
            self.epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP)
        else:
            self.selector.register(sock, selectors.EVENT_READ)
        self.data[fd] = data

    def unregister(self, sock):
        fd = sock.fileno()
        del self.data[fd]
        if self.epoll:
            self.epoll.unregister(fd)
        else:
            self.selector.unregister(sock)

    def select(self, timeout):
        if self.epoll:
            hangup = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
            return [(self.data[fd], bool(mask & hangup)) for fd, mask in self.epoll.poll(timeout)]
        return [(self.data[key.fd], False) for key, _mask in self.selector.select(timeout)]

    def close(self):
        (self.epoll or self.selector).close()


class Server:
    """A node's listener, poller and workers. ``serve_forever`` runs the poller until ``shutdown``;
    ``server_close`` closes the listener (requests in flight still finish on their workers)."""

    def __init__(self, node, sock=None):
        config = node.config
        self.node = node
        self.draining = False
        self.socket = sock or listen(config.address, config.port)
        self.server_address = self.socket.getsockname()
        self.max_connections = connection_cap(config.max_connections)
        self.workers = WorkerPool(config.max_concurrency + REFUSING_WORKERS, f"http-{config.host}")
        self.probe_lane = WorkerPool(2, f"probes-{config.host}")
        self.poller = Poller()
        self.wake_read, self.wake_write = socket.socketpair()
        self.wake_write.setblocking(False)
        self.given_back = collections.deque()  # connections workers are done with, for the poller
        self.idle = {}  # fd -> InboundConnection waiting for a request, oldest first
        self.lingering = {}  # fd -> InboundConnection being drained before its close, oldest first
        self.arriving = {}  # fd -> InboundConnection whose request is slow to arrive, by its first byte
        self.open = 0  # every connection accepted and not yet closed (poller's count)
        self.active = 0  # connections with a request from its first byte to its answer
        self.lock = threading.Lock()
        self.accepting = False
        self.stop_request = False
        self.stopped = threading.Event()
        self.stopped.set()

    # The poller thread: the only one that touches ``poller``, ``idle``, ``arriving`` and ``lingering``.
    def serve_forever(self, poll_interval=0.5):
        self.stopped.clear()
        self.poller.register(self.wake_read, "wake")
        self.listen_on(True)
        try:
            while not self.stop_request:
                events = self.poller.select(self.next_timeout(poll_interval))
                now = time.monotonic()
                for data, hung_up in events:
                    if data == "listener":
                        self.accept_all(now)
                    elif data == "wake":
                        self.take_given_back(now)
                    elif data.sock.fileno() in self.lingering:
                        self.drain_lingering(data)
                    elif data.sock.fileno() in self.arriving:
                        self.gather(data)
                    else:
                        self.on_readable(data, now, hung_up)
                self.expire(now)
                if not self.accepting and (self.open < self.max_connections or self.idle):
                    self.listen_on(True)
        finally:
            self.close_all()
            self.stopped.set()

    def next_timeout(self, poll_interval):
        timeout = poll_interval
        now = time.monotonic()
        keepalive = self.node.config.keepalive_timeout
        for table, due in ((self.idle, lambda c: c.idle_since + keepalive),
                           (self.arriving, lambda c: c.first_byte + keepalive),
                           (self.lingering, lambda c: c.linger_until)):
            for conn in table.values():  # dicts keep insertion order: the first is the oldest
                timeout = min(timeout, max(0.0, due(conn) - now))
                break
        return timeout

    def listen_on(self, on):
        if on != self.accepting and self.socket.fileno() >= 0:
            if on:
                self.poller.register(self.socket, "listener")
            else:
                self.poller.unregister(self.socket)
            self.accepting = on

    def accept_all(self, now):
        for attempt in range(256):
            # At the cap the connection idle longest makes room, but only for a client known to be waiting (the
            # first accept of a wake-up); with none idle the rest wait in the listen backlog.
            if self.open >= self.max_connections and (attempt or not self.evict_oldest_idle()):
                if not self.idle:
                    self.listen_on(False)
                return
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of descriptors (EMFILE): free an idle one, or wait in the backlog
                if not self.evict_oldest_idle():
                    self.listen_on(False)
                return
            with self.lock:
                self.open += 1
            self.process_request(sock, address)

    def process_request(self, sock, address):
        """A new connection: set up, then idle until its first byte."""
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.node.config.keepalive_timeout)
        except OSError:
            pass
        self.park(InboundConnection(sock))

    def park(self, conn):
        conn.idle_since = time.monotonic()
        try:
            self.poller.register(conn.sock, conn)
        except (ValueError, OSError):  # closed meanwhile
            self.forget(conn)
            return
        self.idle[conn.sock.fileno()] = conn

    def on_readable(self, conn, now, hung_up=False):
        fd = conn.sock.fileno()
        self.poller.unregister(conn.sock)
        del self.idle[fd]
        conn.first_byte = now
        if conn.routed and not hung_up:  # a keep-alive client of the workers: straight back to them (no peek)
            self.dispatch(conn, self.workers)
            return
        # A new connection, or one that sent a probe: peek at its request line. Each peek lets go of the GIL,
        # which under load costs a wait to get it back: so only these are peeked, not every keep-alive request.
        try:
            first = conn.sock.recv(PROBE_PEEK, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            self.park(conn)
            return
        except OSError:
            first = b""
        if not first:  # the client closed: no worker needed
            self.forget(conn)
            return
        if is_probe(first):
            self.dispatch(conn, self.probe_lane)
        else:
            conn.routed = True
            self.dispatch(conn, self.workers)

    def dispatch(self, conn, lane):
        with self.lock:
            self.active += 1  # in flight from its first byte: a drain waits for a request still arriving
        lane.submit(functools.partial(self.serve_connection, conn))

    def wait_for_rest(self, conn):
        """A request a worker found slow to arrive: gathered here until whole, within KEEPALIVE_TIMEOUT of its
        first byte (still counted in ``active``)."""
        try:
            self.poller.register(conn.sock, conn)
        except (ValueError, OSError):
            self.end_arriving(conn)
            return
        self.arriving[conn.sock.fileno()] = conn

    def gather(self, conn):
        try:
            more = conn.reader.receive(socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            more = False
        if not more:  # the client gave up
            self.drop_arriving(conn)
        elif conn.reader.arrived(self.node.config.max_body, self.node.inflight):
            del self.arriving[conn.sock.fileno()]
            self.poller.unregister(conn.sock)
            self.workers.submit(functools.partial(self.serve_connection, conn))  # counted in active already

    def drop_arriving(self, conn):
        del self.arriving[conn.sock.fileno()]
        self.poller.unregister(conn.sock)
        self.end_arriving(conn)

    def end_arriving(self, conn):
        self.forget(conn)
        with self.lock:
            self.active -= 1

    def take_given_back(self, now):
        try:
            self.wake_read.recv(4096)
        except OSError:
            pass
        while self.given_back:
            conn, what = self.given_back.popleft()
            if what == "arriving":
                if self.stop_request:
                    self.workers.submit(functools.partial(self.serve_connection, conn, True))
                else:
                    self.wait_for_rest(conn)
            elif self.stop_request:
                self.forget(conn)
            elif what == "linger":
                self.start_lingering(conn, now)
            else:
                self.park(conn)

    def start_lingering(self, conn, now):
        """Half-closed after an error answer: read and drop what the client still sends, briefly, then close."""
        conn.linger_until = now + LINGER_SECONDS
        try:
            conn.sock.shutdown(socket.SHUT_WR)
            self.poller.register(conn.sock, conn)
        except (ValueError, OSError):
            self.forget(conn)
            return
        self.lingering[conn.sock.fileno()] = conn

    def drain_lingering(self, conn):
        sock = conn.sock
        try:
            data = sock.recv(65536, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        conn.lingered += len(data)
        if not data or conn.lingered > LINGER_BYTES:
            self.stop_lingering(conn)

    def stop_lingering(self, conn):
        del self.lingering[conn.sock.fileno()]
        self.poller.unregister(conn.sock)
        self.forget(conn)

    def expire(self, now):
        """Close idle connections past KEEPALIVE_TIMEOUT and lingering ones past their bound (oldest first)."""
        keepalive = self.node.config.keepalive_timeout
        while self.idle:
            conn = next(iter(self.idle.values()))
            if conn.idle_since + keepalive > now:
                break
            self.drop_idle(conn)
        while self.lingering:
            conn = next(iter(self.lingering.values()))
            if conn.linger_until > now:
                break
            self.stop_lingering(conn)
        while self.arriving:  # too slow: cut at KEEPALIVE_TIMEOUT from the first byte, like on a worker
            conn = next(iter(self.arriving.values()))
            if conn.first_byte + keepalive > now:
                break
            self.drop_arriving(conn)

    def evict_oldest_idle(self):
        """Near MAX_CONNECTIONS: close the connection idle the longest; False if none is idle."""
        if not self.idle:
            return False
        self.drop_idle(next(iter(self.idle.values())))
        return True

    def drop_idle(self, conn):
        del self.idle[conn.sock.fileno()]
        self.poller.unregister(conn.sock)
        self.forget(conn)

    def forget(self, conn):
        conn.close()
        with self.lock:
            self.open -= 1

    def close_all(self):
        for conn in list(self.arriving.values()):  # requests still arriving: a drain waits for them, on workers
            self.poller.unregister(conn.sock)
            self.workers.submit(functools.partial(self.serve_connection, conn, True))
        self.arriving.clear()
        for table in (self.idle, self.lingering):
            for conn in list(table.values()):
                self.poller.unregister(conn.sock)
                self.forget(conn)
            table.clear()
        self.listen_on(False)
        self.poller.unregister(self.wake_read)

    # Workers.
    def serve_connection(self, conn, patient=False):
        """On a worker: serve the requests this connection has sent, then give it back (or close it)."""
        outcome = "close"
        try:
            outcome = Handler(self, conn, patient).serve()
        except Exception as error:  # a bug in the handler: one log line, the connection closed, the worker lives
            internal_error(self.node.config, error)
        finally:
            if outcome != "arriving":  # a request still arriving stays in flight
                with self.lock:
                    self.active -= 1
        if outcome == "arriving" and self.stop_request:  # no poller to wait for the rest: wait here
            self.serve_connection(conn, patient=True)
            return
        if outcome == "arriving" or (outcome in ("keep", "linger") and not self.stop_request):
            self.given_back.append((conn, outcome))
        else:
            if outcome != "reset":  # a reset closed its socket already
                conn.close()
            with self.lock:
                self.open -= 1
        self.wake()

    def wake(self):
        try:
            self.wake_write.send(b"x")
        except OSError:  # the wake-up buffer is full (the poller will look anyway) or the server is closed
            pass

    # Control, as socketserver's servers have it.
    def shutdown(self):
        self.stop_request = True
        self.wake()
        self.stopped.wait()

    def server_close(self):
        self.socket.close()
        self.poller.close()
        for sock in (self.wake_read, self.wake_write):
            sock.close()


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
WAYPOINT = "waypoint"  # the ambient namespace's waypoint proxy (a Gateway of class istio-waypoint)
GATEWAY_API = "gateway.networking.k8s.io/v1"
SIDECAR_MODES = ("istio", "gateway-api")  # mesh_mode() values whose pods get an Istio sidecar
GATEWAY_API_MODES = ("gateway-api", "ambient")  # ... and those routed with the Gateway API
DOWNWARD_API = (("HOST", "metadata.labels['app']"), ("VERSION", "metadata.labels['version']"),
                ("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace"),
                ("POD_IP", "status.podIP"), ("NODE_NAME", "spec.nodeName"))


def build_manifests(specs, namespace="", image=DEFAULT_IMAGE, istio=False, gateway_api=False, ambient=False,
                    otlp="", load="", rate="5", concurrency=""):
    """Kubernetes objects (dicts) for node specs from parse_node_spec(); raises ValueError on a bad input.

    Every name gets a Service and a ServiceAccount (its mesh identity); every (name, version) its own Deployment
    behind them, so ``b;version=v2`` is a second version of ``b``. The mesh options need a namespace
    (``simplemesh`` unless one is given) and pick how Istio routes it: ``istio`` with sidecars and Istio's
    APIs (Gateway, VirtualService, DestinationRule subsets); ``gateway_api`` with sidecars and the Kubernetes
    Gateway API (a Gateway, HTTPRoutes, one Service per version to split between); ``ambient`` with the Gateway
    API, no sidecars, ztunnel and a waypoint proxy for L7.
    """
    mode = mesh_mode(istio, gateway_api, ambient)
    if mode and not namespace:
        namespace = "simplemesh"
    if namespace and not DNS_LABEL_RE.fullmatch(namespace):
        raise ValueError(f"bad namespace {namespace!r}: a DNS label (a-z, 0-9, '-', starting with a letter)")
    if not image or any(char.isspace() for char in image):
        raise ValueError(f"bad image {image!r}")
    if otlp and not otlp.startswith(("http://", "https://")):
        raise ValueError(f"bad OTLP endpoint {otlp!r}: expected http://host:port")
    versions = _versions_by_name(specs, load, split_services=mode in GATEWAY_API_MODES)
    pod = PodSettings(namespace, image, sidecar=mode in SIDECAR_MODES)
    objects = [_namespace(namespace, mode)] if namespace else []
    for name, by_version in versions.items():
        objects += [_service_account(name, namespace), _service(name, namespace)]
        if len(by_version) > 1 and mode in GATEWAY_API_MODES:
            objects += [_service(name, namespace, version) for version in by_version]
        for version, directives in by_version.items():
            objects.append(_deployment(pod, name, version, _node_env(directives, otlp), _node_container_extras()))
    if load:
        objects.append(_service_account(LOADGEN, namespace))
        objects.append(_deployment(pod, LOADGEN, "v1", [], _loadgen_container_extras(load, rate, concurrency),
                                   component="load-generator"))
    if mode == "istio":
        objects.extend(_istio_examples(versions, namespace))
    elif mode:
        objects.extend(_gateway_api_routes(versions, namespace, waypoint=mode == "ambient"))
    return objects


def mesh_mode(istio, gateway_api, ambient):
    """'' (plain Kubernetes), 'istio', 'gateway-api' or 'ambient' (which routes with the Gateway API too)."""
    if istio and (gateway_api or ambient):
        raise ValueError("--istio (VirtualServices) and --gateway-api/--ambient (HTTPRoutes) would both route the "
                         "same traffic: pick one")
    return "ambient" if ambient else "gateway-api" if gateway_api else "istio" if istio else ""


def _versions_by_name(specs, load, split_services):
    """{name: {version: directives}} in the order given, every name, version and directive checked."""
    if not specs:
        raise ValueError("name at least one node")
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
    if split_services:
        _check_version_service_names(versions)
    return versions


def _check_version_service_names(versions):
    """A Gateway API split's per-version Services, NAME-VERSION: Service names, and not another node's."""
    for name, by_version in versions.items():
        for service in [f"{name}-{version}" for version in by_version] if len(by_version) > 1 else []:
            if not DNS_LABEL_RE.fullmatch(service):
                raise ValueError(f"Service {service!r} (node {name!r}, one per version): longer than 63 characters")
            if service in versions:
                raise ValueError(f"node {service!r} has the name of {name!r}'s per-version Service; rename it")


class PodSettings(Struct):
    """What every generated pod shares: where it runs, its image, and whether an Istio sidecar is injected."""
    namespace: str
    image: str
    sidecar: bool


def _metadata(name, namespace, labels=None, **extra):
    metadata = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    if labels:
        metadata["labels"] = labels
    metadata.update(extra)
    return metadata


def _namespace(namespace, mode):
    labels = {"app.kubernetes.io/part-of": "simplemesh"}
    if mode in SIDECAR_MODES:
        labels["istio-injection"] = "enabled"
    elif mode == "ambient":  # ztunnel for every pod, and L7 (routes, faults, spans) through the waypoint
        labels.update({"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": WAYPOINT})
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


def _service(name, namespace, version=None):
    """The Service of a name, or (with a version) of one version: what a Gateway API split routes between."""
    selector = {"app": name, "version": version} if version else {"app": name}
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _metadata(f"{name}-{version}" if version else name, namespace, _labels(name, version)),
            "spec": {"selector": selector,
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "appProtocol": "http"}]}}


def _service_account(name, namespace):
    """One identity per service: the mesh's mTLS principal cluster.local/ns/NAMESPACE/sa/NAME."""
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(name, namespace, _labels(name)),
            "automountServiceAccountToken": False}


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


def sidecar_proxy_config():
    """The Istio sidecar's settings for a node pod (``proxy.istio.io/config``), as JSON (which is YAML).

    The app calls out at once (the load generator does), so it waits for its proxy. On SIGTERM a classic
    sidecar drains for ``terminationDrainDuration`` (5 s by default) and exits, cutting the node's calls still in
    flight; kept up for the node's whole SHUTDOWN_DELAY + SHUTDOWN_GRACE, it carries them to the end, and the
    kubelet's SIGKILL (terminationGracePeriodSeconds) still comes later. A native sidecar stops after the app.
    """
    drain = POD_SHUTDOWN_DELAY + POD_SHUTDOWN_GRACE
    return json.dumps({"holdApplicationUntilProxyStarts": True, "terminationDrainDuration": f"{drain}s"})


def _deployment(pod, name, version, env, container_extras, component="node"):
    labels = _labels(name, version, component)
    annotations = {}
    if component == "node":
        annotations.update({"prometheus.io/scrape": "true", "prometheus.io/port": str(CONTAINER_PORT),
                            "prometheus.io/path": "/metrics"})
    if pod.sidecar:
        annotations["proxy.istio.io/config"] = sidecar_proxy_config()
    template_metadata = {"labels": labels}
    if annotations:
        template_metadata["annotations"] = annotations
    container = {"name": "simplemesh", "image": pod.image, "imagePullPolicy": "IfNotPresent"}
    container.update(container_extras)
    if env:
        container["env"] = env
    container["resources"] = {"requests": {"cpu": "50m", "memory": "32Mi"},
                              "limits": {"cpu": "500m", "memory": f"{MEMORY_LIMIT_MIB}Mi"}}  # MAX_INFLIGHT_BYTES fits
    container["securityContext"] = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "runAsNonRoot": True, "privileged": False,
                                    "capabilities": {"drop": ["ALL"]}}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": _metadata(f"{name}-{version}", pod.namespace, labels),
            "spec": {"replicas": 1,
                     "selector": {"matchLabels": {"app": name, "version": version}},
                     "template": {"metadata": template_metadata, "spec": {
                         "serviceAccountName": name,
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


def _gateway_api_routes(versions, namespace, waypoint):
    """Kubernetes Gateway API routing as Istio documents it: an ingress Gateway (class ``istio``) with an
    HTTPRoute to the first node, and for a name with several versions an HTTPRoute attached to its Service that
    splits between the per-version Services. In ambient mode, the waypoint (class ``istio-waypoint``) that the
    namespace's ``istio.io/use-waypoint`` label sends L7 traffic through.
    """
    first = next(iter(versions))
    objects = [
        {"apiVersion": GATEWAY_API, "kind": "Gateway", "metadata": _metadata("simplemesh", namespace),
         "spec": {"gatewayClassName": "istio",
                  "listeners": [{"name": "http", "port": 80, "protocol": "HTTP",
                                 "allowedRoutes": {"namespaces": {"from": "Same"}}}]}},
        {"apiVersion": GATEWAY_API, "kind": "HTTPRoute", "metadata": _metadata("simplemesh-ingress", namespace),
         "spec": {"parentRefs": [{"name": "simplemesh"}],
                  "rules": [{"backendRefs": [{"name": first, "port": 80}]}]}}]
    for name, by_version in versions.items():
        if len(by_version) > 1:
            share, extra = divmod(100, len(by_version))
            objects.append({"apiVersion": GATEWAY_API, "kind": "HTTPRoute", "metadata": _metadata(name, namespace),
                            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": name, "port": 80}],
                                     "rules": [{"backendRefs": [
                                         {"name": f"{name}-{version}", "port": 80,
                                          "weight": share + (1 if index < extra else 0)}
                                         for index, version in enumerate(by_version)]}]}})
    if waypoint:
        objects.append({"apiVersion": GATEWAY_API, "kind": "Gateway",
                        "metadata": _metadata(WAYPOINT, namespace, {"istio.io/waypoint-for": "service"}),
                        "spec": {"gatewayClassName": "istio-waypoint",
                                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}})
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


def start_node(config, sock=None):
    """Bind a node's server (or take the listening ``sock``) and serve it on a daemon thread; returns the Server."""
    server = Server(build_node(config), sock)
    threading.Thread(target=server.serve_forever, name=f"serve-{config.host}", daemon=True).start()
    return server


def startup_line(config, hint=False):
    log_line(config, {"event": "start",
                      "listen": (f"[{config.address}]:{config.port}" if ":" in config.address
                                 else f"{config.address}:{config.port}"), "version": config.version or None,
                      "peers": ",".join(sorted(config.peers)) or None,
                      "defaults": ",".join(f"{k}={v}" for k, v in config.defaults.items()) or None,
                      "max_calls": config.max_calls, "max_depth": config.max_depth,
                      "max_concurrency": config.max_concurrency, "max_connections": config.max_connections,
                      "traces": (f"{config.tracing.endpoint} sampler={config.tracing.sampler}" if config.tracing
                                 else "mesh-only"), "simplemesh": __version__,
                      "try": f"curl 'localhost:{config.port}/?view=tree' or python3 simplemesh.py call "
                             f"localhost:{config.port}/" if hint else None})


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
    """Block until ``stop`` is set (SIGTERM or SIGINT), then drain (SPEC 8); the number of requests dropped.

    At once every node turns not ready and answers with ``Connection: close``; after SHUTDOWN_DELAY the listeners
    of ``servers`` close; requests in flight (counted from their first byte: an upload still arriving, a delay)
    finish, up to SHUTDOWN_GRACE; then the ``internal`` servers close (a mesh's nodes, which the in-flight requests
    were still calling), each node's ``on_stop`` callables run (span export flushes there) and the connection
    pools close. Requests still in flight when the grace runs out are dropped, and logged.
    """
    stop = stop or stop_signals()
    while not stop.wait(3600):
        pass
    everything = list(servers) + list(internal)
    for server in everything:
        server.node.ready = False
        server.draining = True
    log_draining(everything)
    time.sleep(max(server.node.config.shutdown_delay for server in everything))
    for server in servers:
        server.shutdown()
        server.server_close()
    deadline = time.monotonic() + max(server.node.config.shutdown_grace for server in everything)
    while time.monotonic() < deadline and any(in_flight(server) for server in everything):
        time.sleep(0.02)
    dropped = 0
    for server in everything:
        count = in_flight(server)
        if count:
            dropped += count
            config = server.node.config
            log_line(config, {"level": "warning", "event": "drop", "dropped": count,
                              "error": f"SHUTDOWN_GRACE={config.shutdown_grace:g}s ran out with requests in flight"})
    for server in internal:
        server.shutdown()
        server.server_close()
    for server in everything:
        for hook in server.node.on_stop:
            hook()
        server.node.pool.close()
    return dropped


def log_draining(servers):
    """Say what shutting down waits for: ``draining 3 requests, up to 30 s`` (after SHUTDOWN_DELAY, if any)."""
    config = servers[0].node.config
    if config.log_level not in ("debug", "info"):
        return
    count = sum(in_flight(server) for server in servers)
    delay = max(server.node.config.shutdown_delay for server in servers)
    grace = max(server.node.config.shutdown_grace for server in servers)
    waits = f"not ready; new connections taken for {delay:g} s more, then " if delay else ""
    log_line(config, {"event": "stop",
                      "message": f"{waits}draining {count} request{'' if count == 1 else 's'}, up to {grace:g} s"})


def in_flight(server):
    """Requests a server has not answered yet: from their first byte, or admitted (a probe's included)."""
    return max(server.active, server.node.metrics.in_flight)


def release_start_up_memory():
    """Hand back to the OS the heap that compiling this module left free, and every big buffer once freed.

    glibc keeps freed memory for reuse; malloc_trim returns it (about 4 MB of an idle node's RSS). glibc also
    raises its mmap threshold each time a big buffer is freed, so later answer-sized buffers come from a heap it
    never shrinks: fixing the threshold (M_MMAP_THRESHOLD, unless MALLOC_MMAP_THRESHOLD_ is set) makes every
    big buffer its own mapping, given back when freed. That keeps a node's RSS near what it holds now rather
    than the worst it ever held (RobustMemoryTest). The trim runs half a second later, on a thread of its own,
    so the first answers do not wait for it; elsewhere (musl, macOS) this does nothing.
    """
    def release():
        try:
            import ctypes  # here, not at the top: only this needs it, and start-up time is measured
            libc = ctypes.CDLL(None)
            if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
                libc.mallopt(-3, 128 * 1024)  # -3: M_MMAP_THRESHOLD
            time.sleep(0.5)
            libc.malloc_trim(0)
        except (ImportError, OSError, AttributeError):
            pass

    threading.Thread(target=release, name="release-memory", daemon=True).start()


def command_serve(args, environ):
    config = Config.from_env(environ)
    stop = stop_signals()
    server = start_node(config)
    startup_line(config, hint=True)
    release_start_up_memory()
    return 1 if wait_for_stop([server], stop) else 0  # dropped requests: the orchestrator should know


DEFAULT_MESH = ("a", "b;delay=50ms", "c;delay=100ms..200ms", "d;error=0.1")


def command_mesh(args, environ):
    try:
        specs = [parse_node_spec(text) for text in (args.nodes or DEFAULT_MESH)]
    except ValueError as error:
        raise ConfigError(str(error)) from None
    try:
        base = Config.from_env(environ, address=listen_address(args.address))
    except ValueError as error:
        raise ConfigError(f"--address {args.address!r}: {error}") from None
    ports = {}
    for index, (name, _version, _directives) in enumerate(specs, start=1):
        local = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(args.address, args.address)
        ports.setdefault(name, []).append((local, args.port + index))
    peers = dict(base.peers)
    peers.update(ports)
    if base.tracing:  # each node of a local mesh is its own service in the trace backend
        base = base.replace(tracing=base.tracing.replace(service_name=""))
    configs = [base.replace(host="gateway", port=args.port, peers=peers, version="", gateway=True)]
    for index, (name, version, directives) in enumerate(specs, start=1):
        defaults = dict(base.defaults)
        defaults.update(directives)
        configs.append(base.replace(host=name, port=args.port + index, peers=peers, version=version,
                               defaults=defaults))
    if args.one_process:
        return run_mesh_in_process(args, configs)
    return run_mesh_processes(args, configs)


def run_mesh_in_process(args, configs):
    """``mesh --one-process``: every node a Server of this process (they share one core)."""
    stop = stop_signals()
    servers = []
    try:
        for config in configs:
            Directives.resolve(config, config.defaults, {})
            servers.append(start_node(config))
            startup_line(config)
    except (ConfigError, OSError, DirectiveError) as error:  # ConfigError: a port in use, which it names
        for server in servers:
            server.shutdown()
            server.server_close()
        raise ConfigError(f"cannot start the mesh: {error}") from None
    print(mesh_banner(args.address, args.port, configs[1:]), flush=True)
    release_start_up_memory()
    dropped = wait_for_stop(servers[:1], stop, internal=servers[1:])  # the gateway closes first: nodes finish its calls
    return 1 if dropped else 0


def mesh_banner(address, port, nodes):
    """What ``mesh`` prints once it runs: where the gateway and the ``nodes`` (their Configs) listen, and requests
    to try (a chain, its tree, ``call``, a fan-out at the entry node, the metrics)."""
    names = [config.host for config in nodes]
    example = "/".join(dict.fromkeys(names))
    fan_out = "~".join(dict.fromkeys(names[1:3] or names[:1]))  # /a/b~c?parallel: a calls b and c at once
    host = ("localhost" if address in ("0.0.0.0", "127.0.0.1", "::") else
            f"[{address}]" if ":" in address else address)
    return (f"simple-mesh: gateway on http://{host}:{port}, nodes: "
            + ", ".join(f"{config.host}{'@' + config.version if config.version else ''}=:{config.port}"
                        for config in nodes)
            + f"\n  try: curl http://{host}:{port}/{example}\n"
              f"       curl 'http://{host}:{port}/{example}?view=tree'\n"
              f"       python3 simplemesh.py call {host}:{port}/{example}\n"
              f"       curl 'http://{host}:{port}/{names[0]}/{fan_out}?parallel'\n"
              f"       curl http://{host}:{port}/metrics\n  Ctrl-C stops the mesh.")


# Local mesh, one process per node (part of the command line). ``mesh`` runs each node in a child process (forked
# where the system can: no re-import, no pickling), so a local mesh uses every core rather than one. The gateway
# stays in this process and binds its port before any child starts: a client that sees a node's port open finds
# the gateway's open too. Children log straight to the inherited stdout (each line one write, tagged with its
# host, as in one process). Ctrl-C reaches the whole process group, so children ignore SIGINT: this process
# drains the gateway first (nodes still finish its calls), then sends each child SIGTERM, and they drain their
# own requests. A child whose parent died stops by itself.

MESH_CHILD_START_SECONDS = 30.0  # a child that has not bound its port by then failed to start


def run_mesh_processes(args, configs):
    """``mesh``: the gateway here, one child process per node; the exit status of the whole drain."""
    for config in configs:
        try:
            Directives.resolve(config, config.defaults, {})
        except DirectiveError as error:
            raise ConfigError(f"cannot start the mesh: {error}") from None
    stop = stop_signals()
    gateway_socket = listen(configs[0].address, configs[0].port)  # raises ConfigError naming the port
    children = []
    try:
        children = start_node_processes(configs[1:], gateway_socket)
        gateway = start_node(configs[0], gateway_socket)
    except BaseException:
        stop_node_processes(children, 0.0)
        gateway_socket.close()
        raise
    startup_line(configs[0])
    print(mesh_banner(args.address, args.port, configs[1:]), flush=True)
    threading.Thread(target=watch_node_processes, args=(children, stop, configs[0]), name="watch-nodes",
                     daemon=True).start()
    release_start_up_memory()
    dropped = wait_for_stop([gateway], stop)  # the gateway drains while every node still answers
    grace = max(config.shutdown_grace for config in configs)
    statuses = stop_node_processes(children, grace)
    return 1 if dropped or any(statuses) else 0


def start_node_processes(configs, inherited_socket):
    """One started child per config, each ready (its port bound); ConfigError naming the first that failed."""
    import multiprocessing  # here: only this command needs it, and start-up time is measured
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    children = []
    try:
        for config in configs:
            reader, writer = context.Pipe(duplex=False)
            # SHUTDOWN_DELAY is the gateway's (the mesh's entry is unready for it); a node then drains at once.
            child = context.Process(target=serve_node_process, name=f"mesh-{config.host}", daemon=False,
                                    args=(config.replace(shutdown_delay=0.0), writer, inherited_socket, os.getpid()))
            child.start()
            writer.close()  # the child's end: closed here, so a child that dies shows as EOF
            children.append((child, reader))
        for child, reader in children:
            try:
                problem = reader.recv() if reader.poll(MESH_CHILD_START_SECONDS) else "did not start in time"
            except EOFError:
                problem = "a node's process exited while starting"
            if problem:
                raise ConfigError(f"cannot start the mesh: {problem}")
    except BaseException:
        stop_node_processes([child for child, _reader in children], 0.0)
        raise
    finally:
        for _child, reader in children:
            reader.close()
    return [child for child, _reader in children]


def serve_node_process(config, ready, inherited_socket, parent_pid):
    """A mesh node's child process: serve until SIGTERM (or the parent's death), then drain and exit."""
    inherited_socket.close()  # this process's copy of the gateway's listener
    stop = stop_signals()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent decides the order of the drain
    try:
        server = start_node(config)
    except (ConfigError, OSError) as error:
        ready.send(str(error))
        sys.exit(2)
    startup_line(config)
    ready.send("")
    ready.close()
    threading.Thread(target=watch_parent, args=(parent_pid, stop), name="watch-parent", daemon=True).start()
    release_start_up_memory()
    sys.exit(1 if wait_for_stop([server], stop) else 0)


def watch_node_processes(children, stop, gateway_config):
    """Stop the mesh, saying which, when a node's process ends by itself (a crash, an OOM kill): a local mesh
    never goes on with a node silently missing. The exit status then says a node failed."""
    import multiprocessing.connection
    ended = multiprocessing.connection.wait([child.sentinel for child in children])
    if stop.is_set():
        return  # the drain ended them
    for child in children:
        if child.sentinel in ended:
            child.join()
            log_line(gateway_config, {"level": "error", "event": "node-exit", "node": child.name.removeprefix("mesh-"),
                                      "exitcode": child.exitcode, "error": "a node's process ended: stopping the mesh"})
    stop.set()


def watch_parent(parent_pid, stop):
    """Set ``stop`` when the process that started this one is gone (killed, not drained): no orphan nodes."""
    while not stop.wait(1.0):
        if os.getppid() != parent_pid:
            stop.set()


def stop_node_processes(children, grace):
    """SIGTERM every child at once, wait for their drains (``grace`` and some), kill any left; their statuses."""
    for child in children:
        if child.is_alive():
            child.terminate()
    deadline = time.monotonic() + grace + 5.0
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()
            child.join(5.0)
    return [child.exitcode for child in children]


def command_manifests(args, environ):
    try:
        specs = [parse_node_spec(text) for text in args.nodes]
        objects = build_manifests(specs, namespace=args.namespace, image=args.image, istio=args.istio,
                                  gateway_api=args.gateway_api, ambient=args.ambient, otlp=args.otlp,
                                  load=args.load, rate=args.rate, concurrency=args.concurrency)
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
    """One request; the answer drawn as a tree (an answer that is not a simplemesh record is drawn as one foreign
    hop). Exit 0 when the root answered < 400, 1 when it did not, 2 when there was no answer at all."""
    scheme, host, port, path = split_url(args.url)
    headers = request_headers(args.header)
    method = args.method.upper()
    started = time.perf_counter()
    try:
        answer = fetch(scheme, host, port, method, path, headers, args.data.encode() if args.data else b"",
                       args.timeout)
    except (OSError, AnswerError) as error:
        print(f"simplemesh call: no answer from {host}:{port}: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    status, data = answer.status, answer.body
    if args.json:
        sys.stdout.write(data.decode("utf-8", "replace") + ("" if data.endswith(b"\n") else "\n"))
        return 0 if status < 400 else 1
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    record = child_record(where, f"{scheme}://{where}{path}", status, answer.headers.get("content-type", ""), data,
                          method, time.perf_counter() - started)
    sys.stdout.write(render_tree(record, color=use_color(sys.stdout, environ)))
    return 0 if status < 400 else 1


def fetch(scheme, host, port, method, path, headers, body, timeout):
    """One request (exchange) on a connection of its own -> the whole final Answer (interim 1xx answers skipped), within
    ``timeout`` in all. OSError or AnswerError when there is none."""
    peer, request = origin_request(scheme, host, port, method, path, headers, body)
    pool = origin_pool(scheme)
    try:
        return exchange(pool, peer, method, request, time.monotonic() + timeout)
    except TimeoutError:
        raise TimeoutError(f"no whole answer within {timeout:g}s") from None
    finally:
        pool.close()


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


class LoadStats(Struct):
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
    def failures(self):
        """Why requests failed: status code >= 400 or error kind (refused, timeout, reset, error) -> count."""
        return {code: count for code, count in sorted(self.codes.items(), key=lambda item: str(item[0]))
                if not isinstance(code, int) or code >= 400}

    @property
    def errors(self):
        return sum(self.failures.values())

    def too_many_failures(self, max_error_rate=None):
        """True when the run failed: above ``max_error_rate`` of the answers failed (None: every one of them)."""
        answered = sum(self.codes.values())
        if not answered:
            return False
        if max_error_rate is None:
            return self.errors == answered
        return self.errors / answered > max_error_rate

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
            f"errors {stats.errors}{format_failures(stats.failures)}  "
            f"p50 {format_seconds(stats.latency.percentile(0.5))}  "
            f"p99 {format_seconds(stats.latency.percentile(0.99))}" + (f"  MISSED {missed}" if missed else ""))


def format_failures(failures):
    """`` (502=24 timeout=3)``: why requests failed, for the progress line; empty when none did."""
    return " (" + " ".join(f"{code}={count}" for code, count in failures.items()) + ")" if failures else ""


def render_load_summary(summary, url):
    """The final summary of a load run, for people; honest about a rate it did not keep."""
    latency = summary["latency"]
    lines = [f"load {url}: {summary['sent']} requests in {summary['elapsed']:.2f} s = "
             f"{summary['achieved_rate']:.1f}/s (target {summary['target_rate']:g}/s)",
             "status: " + (" ".join(f"{code}={count}" for code, count in summary["codes"].items()) or "none"),
             f"latency: p50 {format_seconds(latency['p50'])}  p90 {format_seconds(latency['p90'])}  "
             f"p99 {format_seconds(latency['p99'])}  max {format_seconds(latency['max'])}"]
    if summary["errors"]:
        failures = {code: count for code, count in summary["codes"].items()
                    if not code.isdigit() or int(code) >= 400}
        lines.append(f"failed: {summary['errors']} of {summary['answered']}{format_failures(failures)}")
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
    """Send one request per job (its due time) on a keep-alive connection of this worker's own (exchange)."""
    pool = origin_pool(scheme)
    peer, request = origin_request(scheme, host, port, method, path, headers)
    while True:
        due = jobs.get()
        if due is None:
            break
        try:
            code = exchange(pool, peer, method, request, time.monotonic() + timeout,
                            retry_stale=method in IDEMPOTENT_METHODS).status
        except (OSError, AnswerError, _Retry) as error:
            code = ("refused" if isinstance(error, ConnectionRefusedError) else
                    "timeout" if isinstance(error, TimeoutError) else
                    "reset" if isinstance(error, (ConnectionResetError, _Retry)) or getattr(error, "closed", False)
                    else "error")
        latency = time.monotonic() - due  # from when it was due: time lost in this client counts too
        with stats.lock:
            stats.in_flight -= 1
            stats.codes[code] = stats.codes.get(code, 0) + 1
            stats.latency.add(latency)
    pool.close()


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
    if not math.isfinite(args.rate) or args.rate <= 0 or args.concurrency < 1 or args.duration < 0:
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
    return 1 if stats.too_many_failures(args.max_error_rate) else 0


def add_manifests_parser(commands):
    """The ``manifests`` command's options (SPEC 7)."""
    manifests = commands.add_parser(
        "manifests", help="print Kubernetes YAML for a mesh",
        description="Print Kubernetes YAML for these nodes: a Service and a ServiceAccount per name and a "
                    "Deployment per version (directives become the node's environment defaults).",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keep the example on one pasteable line
        epilog="example:\n  simplemesh manifests 'a;delay=0.5' 'b;delay=1' 'b;delay=1;version=v2' c "
               "--load http://a/b/c --istio | kubectl apply -f -")
    manifests.add_argument("nodes", nargs="+", metavar="NODE",
                           help="a node spec: name[;directive=value...][;version=v2][;route=b~c]")
    manifests.add_argument("--namespace", default="", help="put everything in this namespace (and create it)")
    manifests.add_argument("--image", default=DEFAULT_IMAGE, help="container image (default %(default)s)")
    manifests.add_argument("--istio", action="store_true",
                           help="label the namespace for sidecar injection (namespace simplemesh unless given) "
                                "and add an ingress Gateway, DestinationRules and version splits (Istio's APIs)")
    manifests.add_argument("--gateway-api", action="store_true",
                           help="the same with sidecars and the Kubernetes Gateway API: an ingress Gateway, "
                                "HTTPRoutes, and a Service per version to split between")
    manifests.add_argument("--ambient", action="store_true",
                           help="Istio's ambient mode: no sidecars, the namespace labelled for ztunnel and a "
                                "waypoint proxy (L7), routed with the Gateway API as --gateway-api")
    manifests.add_argument("--otlp", default="", metavar="ENDPOINT",
                           help="send native spans to this OTLP/HTTP endpoint (OTEL_EXPORTER_OTLP_ENDPOINT)")
    manifests.add_argument("--load", default="", metavar="URL",
                           help="add a load generator Deployment that runs `simplemesh load URL`")
    manifests.add_argument("--rate", default="5", help="the load generator's requests per second (default 5)")
    manifests.add_argument("--concurrency", default="", help="the load generator's concurrency")


def add_mesh_parser(commands):
    """The ``mesh`` command's options."""
    mesh = commands.add_parser("mesh", help="run a gateway and named nodes, each in its own process",
                               description="Run a whole mesh on this machine: a gateway on --port and each NODE on "
                                           "the next ports, resolving each other's names; each node in its own "
                                           "process (every core), unless --one-process. The gateway is invisible, "
                                           "like an ingress: /a/b~c?parallel is a's route and a's query string, and "
                                           "the answer is a's.")
    mesh.add_argument("nodes", nargs="*", metavar="NODE",
                      help="a node spec: name[;directive=value...][;version=v2][;route=b~c] (default: %s)"
                      % " ".join(DEFAULT_MESH))
    mesh.add_argument("--port", type=int, default=9090, help="the gateway's port; nodes take the next ones")
    mesh.add_argument("--address", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    mesh.add_argument("--one-process", action="store_true",
                      help="run the gateway and every node in this one process (one core; easier to debug)")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="simplemesh", description="simple-mesh: a test server for service meshes; the URL path is the route.")
    parser.add_argument("--version", action="version", version=f"simplemesh {__version__}")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="run one node, configured by environment variables (the default)",
                        description="Run one node. HOST, PORT (9090), ADDRESS, PEERS, UPSTREAM_PORT, the directive "
                                    "defaults (DELAY, ERROR_RATE, ...) and the limits come from the environment; "
                                    "OTEL_EXPORTER_OTLP_ENDPOINT turns on native spans (OTLP/HTTP JSON).")
    add_mesh_parser(commands)
    add_manifests_parser(commands)
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
    load.add_argument("--max-error-rate", type=parse_probability, default=None, metavar="RATE",
                      help="exit 1 when more than RATE of the answers failed (0.05 or 5%%; default: exit 1 only "
                           "when every answer failed)")
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
