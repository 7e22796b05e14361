#!/usr/bin/env python3
"""A latency and fault stand-in for an object store, in front of a local S3 server.

Why it exists: an object store answers each request in 10-50 ms; tests and benchmarks
on 127.0.0.1 must pay that latency to measure honestly, and fault tests need a share
of requests to fail the way S3 fails. `moto_server` on the loopback answers in well
under a millisecond and never fails, so a pipeline measured against it alone hides
every cost that comes from waiting on the store (too few requests in flight, one
round trip per footer, serial listings) and never exercises the retry paths.

This proxy sits between a client (the engine's object_store/reqwest client, boto3,
http.client) and the S3 server:

    client --HTTP/1.1--> s3_proxy (127.0.0.1) --HTTP/1.1--> moto_server

* every request waits --delay-ms before it is forwarded; each request pays it on its
  own handler thread, so concurrent requests pay it concurrently, as with a real store;
* a share --fail-share of requests, picked by a seeded generator (the same sequence of
  requests gets the same sequence of failures for a given --seed), fails before it is
  forwarded, so the server never sees it and a retry is always safe:
    slowdown  HTTP 503 with the S3 error body <Code>SlowDown</Code>; the connection
              stays usable (the request body is read first);
    reset     the request (headers and body) is read, then the socket is closed with
              a TCP RST (SO_LINGER 0) and no answer;
* everything else is forwarded faithfully: the method, the request target byte for
  byte (percent-encoding and query untouched), every end-to-end header unchanged,
  Host included (SigV4 signs it), the body (a chunked upload is decoded and sent with
  Content-Length), and the answer's status, headers and body, streamed in chunks.
  Only hop-by-hop headers (Connection, Keep-Alive, Transfer-Encoding, TE, Trailer,
  Upgrade, Proxy-Connection, and Expect, which the proxy answers itself) are not
  passed on.

Usage:

    python3 scripts/s3_proxy.py --upstream http://127.0.0.1:PORT [--listen 127.0.0.1:0]
        [--delay-ms 25] [--fail-share 0.0] [--fail-kinds slowdown,reset] [--seed 0]
        [--stats-file PATH]

Once listening it prints one line, `listening http://127.0.0.1:PORT`, on stdout, and
nothing else per request. Counts (requests, by_method, delayed, failed_slowdown,
failed_reset, forwarded, upstream_errors) go to --stats-file as JSON, rewritten
atomically at most once a second while running and once more on SIGTERM/SIGINT, on
which it exits with status 0. Standard library only (Python 3.11).
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import os
import random
import select
import signal
import socket
import socketserver
import struct
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from xml.sax.saxutils import escape

CHUNK = 1 << 20  # bytes copied per read/write when streaming bodies
# Request bodies are held until forwarded (so a stale keep-alive connection to the
# server can be retried); up to a 16 MiB multipart part stays in memory, larger
# bodies spill to a temporary file.
SPOOL_MAX = (16 << 20) + (64 << 10)
UPSTREAM_TIMEOUT_S = 300
CLIENT_IDLE_TIMEOUT_S = 300

# S3's answer to too many requests:
# <Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>
SLOWDOWN_MESSAGE = "Please reduce your request rate."

# Hop-by-hop headers (RFC 9110 7.6.1) are per connection: not passed on either way.
REQUEST_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
               "trailer", "upgrade", "expect"}
RESPONSE_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding",
                "trailer", "upgrade"}

FAIL_KINDS = ("slowdown", "reset")


class Stats:
    """Counters shared by all handler threads, with a version bumped on every change."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data = {
            "requests": 0,
            "by_method": {},
            "delayed": 0,
            "failed_slowdown": 0,
            "failed_reset": 0,
            "forwarded": 0,
            "upstream_errors": 0,
        }
        self.version = 0

    def request(self, method: str) -> None:
        with self._lock:
            self._data["requests"] += 1
            by_method = self._data["by_method"]
            by_method[method] = by_method.get(method, 0) + 1
            self.version += 1

    def add(self, key: str) -> None:
        with self._lock:
            self._data[key] += 1
            self.version += 1

    def snapshot(self) -> tuple[dict, int]:
        with self._lock:
            return json.loads(json.dumps(self._data)), self.version


class StatsWriter:
    """Writes the stats as JSON via a temporary file and os.replace (readers never see a
    partial file), only when they changed since the last write."""

    def __init__(self, stats: Stats, path: str | None) -> None:
        self.stats = stats
        self.path = path
        self.written = -1

    def write(self, force: bool = False) -> None:
        if not self.path:
            return
        data, version = self.stats.snapshot()
        if version == self.written and not force:
            return
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(prefix=".s3_proxy-stats-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=2, sort_keys=True)
                f.write("\n")
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self.written = version


class Faults:
    """Which requests fail and how: one seeded generator behind a lock, one draw per
    request (and a second to pick the kind when several are enabled), so a sequence of
    requests gets the same sequence of failures for the same seed."""

    def __init__(self, share: float, kinds: list[str], seed: int) -> None:
        self.share = share
        self.kinds = kinds
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def draw(self) -> str | None:
        with self._lock:
            if self._rng.random() >= self.share:
                return None
            if len(self.kinds) == 1:
                return self.kinds[0]
            return self.kinds[self._rng.randrange(len(self.kinds))]


class UpstreamConnection(http.client.HTTPConnection):
    """An HTTPConnection that sends the request target exactly as the client sent it
    (the request line was decoded as Latin-1 by http.server; encode it back the same
    way instead of insisting on ASCII)."""

    def _encode_request(self, request: str) -> bytes:  # noqa: D401 (stdlib hook)
        return request.encode("latin-1")


class _BadRequest(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _ClientGone(Exception):
    pass


def _connection_tokens(values: list[str] | None) -> set[str]:
    return {t.strip().lower() for v in values or [] for t in v.split(",") if t.strip()}


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = CLIENT_IDLE_TIMEOUT_S
    server: "ProxyServer"

    # -- connection lifetime ------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self.upstream: UpstreamConnection | None = None

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self._close_upstream()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet by design
        pass

    # -- requests -----------------------------------------------------------------

    def do_GET(self) -> None:
        self._proxy()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_OPTIONS = do_PATCH = do_GET

    def _raw_target(self) -> str:
        # self.path may have been normalised ('//' collapsed); the request line is raw.
        words = self.requestline.split()
        return words[1] if len(words) >= 2 else self.path

    def _proxy(self) -> None:
        cfg = self.server
        method = self.command
        cfg.stats.request(method)
        fate = cfg.faults.draw()
        try:
            body, length, chunked = self._read_body()
        except _ClientGone:
            self.close_connection = True
            return
        except _BadRequest as e:
            self.close_connection = True
            self._send_xml_error(e.code, "BadRequest" if e.code == 400 else "NotImplemented",
                                 str(e))
            return
        try:
            if cfg.delay_s > 0:
                cfg.stats.add("delayed")
                time.sleep(cfg.delay_s)
            if fate == "reset":
                cfg.stats.add("failed_reset")
                self._reset()
            elif fate == "slowdown":
                cfg.stats.add("failed_slowdown")
                self._send_xml_error(503, "SlowDown", SLOWDOWN_MESSAGE, reason="Slow Down")
            else:
                self._forward(method, self._raw_target(), body, length, chunked)
        finally:
            if body is not None:
                body.close()

    def _read_body(self):
        """The request body, read whole into a spooled file: (file or None, length,
        was_chunked)."""
        te = self.headers.get_all("Transfer-Encoding")
        if te:
            codings = [c for c in (t.strip().lower() for v in te for t in v.split(","))
                       if c]
            if codings != ["chunked"]:
                raise _BadRequest(501, f"unsupported Transfer-Encoding {', '.join(te)!r}")
            return self._read_chunked(), None, True
        cls = self.headers.get_all("Content-Length")
        if not cls:
            return None, None, False
        values = {v.strip() for v in cls}
        if len(values) != 1 or not next(iter(values)).isdigit():
            raise _BadRequest(400, f"bad Content-Length {', '.join(cls)!r}")
        length = int(next(iter(values)))
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MAX)
        try:
            self._copy_exact(spool, length)
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        return spool, length, False

    def _copy_exact(self, out, length: int) -> None:
        left = length
        while left > 0:
            try:
                data = self.rfile.read(min(CHUNK, left))
            except OSError as e:
                raise _ClientGone() from e
            if not data:
                raise _ClientGone()
            out.write(data)
            left -= len(data)

    def _read_line(self) -> bytes:
        try:
            line = self.rfile.readline(65537)
        except OSError as e:
            raise _ClientGone() from e
        if not line:
            raise _ClientGone()
        if len(line) > 65536:
            raise _BadRequest(400, "chunk header line too long")
        return line

    def _read_chunked(self):
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MAX)
        try:
            while True:
                line = self._read_line()
                size_text = line.split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise _BadRequest(400, f"bad chunk size {size_text[:40]!r}") from None
                if size < 0:
                    raise _BadRequest(400, "negative chunk size")
                if size == 0:
                    # Trailers (dropped) up to the empty line.
                    while self._read_line() not in (b"\r\n", b"\n"):
                        pass
                    break
                self._copy_exact(spool, size)
                if self._read_line() not in (b"\r\n", b"\n"):
                    raise _BadRequest(400, "chunk not followed by CRLF")
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        return spool

    # -- failures -----------------------------------------------------------------

    def _reset(self) -> None:
        """Close the client socket with a TCP RST and no answer."""
        self.close_connection = True
        sock = self.connection
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        # The buffered reader holds a reference to the socket: close it first so that
        # closing the socket really closes the descriptor (and sends the RST) now.
        try:
            self.rfile.close()
        except OSError:
            pass
        sock.close()

    def _send_xml_error(self, code: int, s3_code: str, message: str,
                        reason: str | None = None) -> None:
        """An S3-style XML error answer; the connection stays usable unless
        close_connection was set."""
        body = (f"<Error><Code>{escape(s3_code)}</Code>"
                f"<Message>{escape(message)}</Message></Error>").encode()
        try:
            self.send_response_only(code, reason)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Date", self.date_time_string())
            self.send_header("x-amz-request-id", uuid.uuid4().hex[:16].upper())
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:
            self.close_connection = True

    # -- forwarding ---------------------------------------------------------------

    def _close_upstream(self) -> None:
        conn = self.upstream
        if conn is not None:
            conn.close()

    def _upstream_conn(self) -> tuple[UpstreamConnection, bool]:
        """This client connection's upstream connection, and whether it is a kept-alive
        one (which the server may have closed meanwhile: then a failure is retried)."""
        conn = self.upstream
        if conn is None:
            conn = self.upstream = UpstreamConnection(
                self.server.upstream_host, self.server.upstream_port,
                timeout=UPSTREAM_TIMEOUT_S)
            return conn, False
        if conn.sock is None:
            return conn, False
        # An idle keep-alive socket that is readable was closed by the server (or holds
        # junk): start afresh rather than fail the request.
        poller = select.poll()
        poller.register(conn.sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        if poller.poll(0):
            conn.close()
            return conn, False
        return conn, True

    def _upstream_headers(self, chunked: bool, length: int | None) -> list[tuple[str, str]]:
        drop = REQUEST_HOP | _connection_tokens(self.headers.get_all("Connection"))
        headers = []
        for name, value in self.headers.items():
            lname = name.lower()
            if lname in drop:
                continue
            if chunked and lname == "content-length":
                continue
            headers.append((name, value))
        if chunked:
            headers.append(("Content-Length", str(length)))
        return headers

    def _forward(self, method: str, target: str, body, length: int | None,
                 chunked: bool) -> None:
        if chunked:
            body.seek(0, os.SEEK_END)
            length = body.tell()
        try:
            headers = self._upstream_headers(chunked, length)
        except Exception as e:  # pragma: no cover - defensive
            self.close_connection = True
            self._send_xml_error(400, "BadRequest", f"s3_proxy: {e}")
            return
        resp = None
        for attempt in (0, 1):
            conn, reused = self._upstream_conn()
            try:
                conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
                for name, value in headers:
                    conn.putheader(name, value)
                conn.endheaders()
                if body is not None:
                    body.seek(0)
                    while True:
                        data = body.read(CHUNK)
                        if not data:
                            break
                        conn.send(data)
                resp = conn.getresponse()
                break
            except (ValueError, http.client.InvalidURL) as e:
                conn.close()
                self.close_connection = True
                self._send_xml_error(400, "BadRequest", f"s3_proxy: {e}")
                return
            except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as e:
                # RemoteDisconnected is a ConnectionResetError: the server closed a
                # kept-alive connection before answering. Retry once on a fresh one.
                conn.close()
                if reused and attempt == 0:
                    continue
                self._upstream_failed(e)
                return
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                self._upstream_failed(e)
                return
        self.server.stats.add("forwarded")
        self._relay(method, resp)

    def _upstream_failed(self, error: BaseException) -> None:
        self.server.stats.add("upstream_errors")
        self.close_connection = True
        self._send_xml_error(502, "BadGateway",
                             f"s3_proxy: upstream {self.server.upstream_url} failed: "
                             f"{type(error).__name__}: {error}")

    def _relay(self, method: str, resp: http.client.HTTPResponse) -> None:
        status = resp.status
        no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
        drop = RESPONSE_HOP | _connection_tokens(resp.msg.get_all("Connection"))
        content_length = None
        if not resp.chunked:
            values = {v.strip() for v in resp.msg.get_all("Content-Length") or []}
            if len(values) == 1 and next(iter(values)).isdigit():
                content_length = int(next(iter(values)))
        if no_body:
            framing = "none"
        elif content_length is not None:
            framing = "length"
        elif self.request_version >= "HTTP/1.1":
            framing = "chunked"
        else:
            framing = "close"

        try:
            self.send_response_only(status, resp.reason)
            for name, value in resp.getheaders():
                lname = name.lower()
                if lname in drop:
                    continue
                if lname == "content-length" and resp.chunked:
                    continue
                self.send_header(name, value)
            if framing == "chunked":
                self.send_header("Transfer-Encoding", "chunked")
            if framing == "close" or self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
        except OSError:
            self._abort_both()
            return

        if framing == "none":
            try:
                resp.read()
            except (OSError, http.client.HTTPException):
                self._close_upstream()
            resp.close()
            return

        sent = 0
        while True:
            try:
                data = resp.read(CHUNK)
            except (OSError, http.client.HTTPException):
                self.server.stats.add("upstream_errors")
                self._abort_both()
                return
            if not data:
                break
            try:
                if framing == "chunked":
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                else:
                    self.wfile.write(data)
            except OSError:
                self._abort_both()
                return
            sent += len(data)
        resp.close()
        if framing == "length" and sent != content_length:
            # The server closed early: the client must not wait for the missing bytes.
            self.server.stats.add("upstream_errors")
            self._abort_both()
            return
        if framing == "chunked":
            try:
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                self.close_connection = True

    def _abort_both(self) -> None:
        self._close_upstream()
        self.close_connection = True


class ProxyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128
    allow_reuse_address = True

    upstream_url: str
    upstream_host: str
    upstream_port: int
    delay_s: float
    faults: Faults
    stats: Stats

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall; not needed.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = host
        self.server_port = port

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return  # a client hanging up is ordinary
        print(f"s3_proxy: error on a connection from {client_address[0]}:"
              f"{client_address[1]}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="s3_proxy.py",
        description="HTTP proxy adding an object store's latency and faults in front of "
                    "a local S3 server (moto_server). Listens on 127.0.0.1 only.")
    p.add_argument("--upstream", required=True,
                   help="the S3 server, http://HOST:PORT (e.g. moto_server's)")
    p.add_argument("--listen", default="127.0.0.1:0",
                   help="127.0.0.1:PORT to listen on; port 0 picks a free one "
                        "(default 127.0.0.1:0)")
    p.add_argument("--delay-ms", type=float, default=25.0,
                   help="latency added to every request before it is forwarded "
                        "(default 25)")
    p.add_argument("--fail-share", type=float, default=0.0,
                   help="share of requests, 0..1, failed before being forwarded "
                        "(default 0.0)")
    p.add_argument("--fail-kinds", default="slowdown,reset",
                   help="comma-separated failure kinds: slowdown (503 SlowDown), "
                        "reset (TCP RST, no answer) (default slowdown,reset)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the generator that picks failing requests (default 0)")
    p.add_argument("--stats-file", default=None,
                   help="write request counts there as JSON (at most once a second, "
                        "and on exit)")
    args = p.parse_args(argv)

    host, sep, port = args.listen.rpartition(":")
    if not sep or host != "127.0.0.1":
        p.error(f"--listen {args.listen!r}: this proxy listens on 127.0.0.1 only "
                f"(use 127.0.0.1:PORT, port 0 for a free one)")
    if not port.isdigit() or int(port) > 65535:
        p.error(f"--listen {args.listen!r}: the port must be a number 0..65535")
    args.listen_port = int(port)

    up = urllib.parse.urlsplit(args.upstream)
    try:
        up_port = up.port
    except ValueError:
        up_port = -1
    if up.scheme != "http" or not up.hostname or up_port == -1 \
            or up.path not in ("", "/") or up.query or up.fragment:
        p.error(f"--upstream {args.upstream!r}: expected http://HOST:PORT")
    args.upstream_host = up.hostname
    args.upstream_port = up_port or 80

    if not (args.delay_ms >= 0):
        p.error("--delay-ms must be >= 0")
    if not (0.0 <= args.fail_share <= 1.0):
        p.error("--fail-share must be between 0 and 1")
    kinds: list[str] = []
    for kind in (k.strip() for k in args.fail_kinds.split(",")):
        if not kind:
            continue
        if kind not in FAIL_KINDS:
            p.error(f"--fail-kinds: unknown kind {kind!r} (known: {', '.join(FAIL_KINDS)})")
        if kind not in kinds:
            kinds.append(kind)
    if not kinds:
        p.error("--fail-kinds: name at least one kind")
    args.kinds = kinds
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stats = Stats()
    writer = StatsWriter(stats, args.stats_file)

    try:
        server = ProxyServer(("127.0.0.1", args.listen_port), ProxyHandler)
    except OSError as e:
        print(f"s3_proxy: cannot listen on 127.0.0.1:{args.listen_port}: {e}",
              file=sys.stderr)
        return 1
    server.upstream_url = args.upstream
    server.upstream_host = args.upstream_host
    server.upstream_port = args.upstream_port
    server.delay_s = args.delay_ms / 1000.0
    server.faults = Faults(args.fail_share, args.kinds, args.seed)
    server.stats = stats

    stop = threading.Event()

    def on_signal(signum, frame):  # noqa: ARG001
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                               name="s3_proxy-accept", daemon=True)
    serving.start()
    writer.write(force=True)
    try:
        print(f"listening http://127.0.0.1:{server.server_port}", flush=True)
    except OSError:
        pass
    while not stop.wait(1.0):
        writer.write()
    server.shutdown()
    server.server_close()
    writer.write(force=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
