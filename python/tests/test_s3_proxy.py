"""scripts/s3_proxy.py, the latency and fault stand-in for an object store, in front of
a real S3 server (`moto_server` from PyPI moto, installed by `source scripts/setup.sh`
into $TRUSTFLOW_MOTO_DIR, default ~/.cache/trustflow/moto).

Run from the repository root:

    PYTHONPATH=$TRUSTFLOW_RAY_DIR:python python3 -m unittest discover -s python/tests -v
    python3 -m unittest python.tests.test_s3_proxy -v

setUpClass starts moto_server and one proxy (--delay-ms 100) on free 127.0.0.1 ports;
tearDownClass stops both, also when a test or setUpClass itself failed. Tests that
need other flags start their own proxy and stop it in a cleanup. Only http.client
speaks to the servers. The requests are not really signed: moto does not check
signatures, but treats a request with no Authorization header as anonymous (and then
refuses to read private objects), so each request carries a placeholder SigV4 header.
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import os
import select
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
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PROXY = os.path.join(REPO, "scripts", "s3_proxy.py")
MOTO_DIR = os.environ.get("TRUSTFLOW_MOTO_DIR") or os.path.expanduser(
    "~/.cache/trustflow/moto")
MOTO_INSTALLED = os.path.isdir(os.path.join(MOTO_DIR, "moto"))

BUCKET = "proxy-test"
# A key with the characters that S3 clients must percent-encode in a path.
KEY = "dir/a key é+=%#.bin"
AUTH = ("AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;x-amz-date, Signature=0000")
S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
RESET_ERRORS = (ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def key_path(key: str) -> str:
    return f"/{BUCKET}/" + urllib.parse.quote(key, safe="/")


def stop_process(proc: subprocess.Popen, sig=signal.SIGTERM, timeout=10.0):
    """Stop `proc` (signal, then kill) and return its exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for f in (proc.stdout, proc.stderr):
        if f is not None:
            f.close()
    return proc.returncode


class Proxy:
    """scripts/s3_proxy.py in a child process; `port` is read from its first line."""

    def __init__(self, upstream: str, *flags: str):
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, PROXY, "--upstream", upstream, *flags],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.stderr)
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.startswith("listening http://127.0.0.1:"):
            stop_process(self.proc)
            raise RuntimeError(f"s3_proxy did not start: stdout {line!r}, stderr "
                               f"{self.errors()!r}")
        self.port = int(line.strip().rsplit(":", 1)[1])

    def errors(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def stop(self, sig=signal.SIGTERM) -> int:
        rc = stop_process(self.proc, sig)
        self.stderr.close()
        return rc


def request(conn: http.client.HTTPConnection, method: str, path: str, body=None,
            headers=None, **kwargs):
    """One request on `conn`: (status, headers, body bytes)."""
    all_headers = {"Authorization": AUTH}
    if body is not None:
        all_headers["Content-Type"] = "application/octet-stream"
    all_headers.update(headers or {})
    conn.request(method, path, body=body, headers=all_headers, **kwargs)
    resp = conn.getresponse()
    data = resp.read()
    return resp.status, resp, data


def error_code(body: bytes) -> str:
    return ET.fromstring(body).findtext("Code")


@unittest.skipUnless(MOTO_INSTALLED, f"moto_server is not installed in {MOTO_DIR} "
                     "(`source scripts/setup.sh` installs it; or set TRUSTFLOW_MOTO_DIR)")
class S3ProxyTest(unittest.TestCase):
    moto: subprocess.Popen | None = None
    proxy: Proxy | None = None

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="s3-proxy-test-")
        try:
            cls.moto_port = free_port()
            cls.moto_stderr = open(os.path.join(cls.tmp, "moto.log"), "wb")
            cls.moto = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                 str(cls.moto_port)],
                env=dict(os.environ, PYTHONPATH=MOTO_DIR), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=cls.moto_stderr)
            cls.upstream = f"http://127.0.0.1:{cls.moto_port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    c = http.client.HTTPConnection("127.0.0.1", cls.moto_port, timeout=2)
                    c.request("GET", "/")
                    c.getresponse().read()
                    c.close()
                    break
                except OSError:
                    if cls.moto.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("moto_server did not answer within 60 s; see "
                                           + os.path.join(cls.tmp, "moto.log"))
                    time.sleep(0.1)
            cls.stats_path = os.path.join(cls.tmp, "stats.json")
            cls.proxy = Proxy(cls.upstream, "--delay-ms", "100",
                              "--stats-file", cls.stats_path)
            conn = cls.proxy.conn()
            status, _, body = request(conn, "PUT", f"/{BUCKET}")
            conn.close()
            if status != 200:
                raise RuntimeError(f"creating the bucket through the proxy: {status} {body!r}")
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        try:
            if cls.proxy is not None:
                cls.proxy.stop()
                cls.proxy = None
        finally:
            if cls.moto is not None:
                stop_process(cls.moto, signal.SIGKILL)
                cls.moto = None
                cls.moto_stderr.close()
            shutil.rmtree(cls.tmp, ignore_errors=True)

    def start_proxy(self, *flags: str, upstream: str | None = None) -> Proxy:
        proxy = Proxy(upstream or self.upstream, *flags)
        self.addCleanup(proxy.stop)
        return proxy

    def direct(self) -> http.client.HTTPConnection:
        """A connection straight to moto_server, bypassing every proxy."""
        conn = http.client.HTTPConnection("127.0.0.1", self.moto_port, timeout=60)
        self.addCleanup(conn.close)
        return conn

    # (1) Bytes and S3 semantics survive the proxy.
    def test_round_trip(self):
        conn = self.proxy.conn()
        self.addCleanup(conn.close)
        path = key_path(KEY)
        self.assertIn("%20", path)
        data = bytes(range(256)) * 40 + b"tail"

        status, resp, _ = request(conn, "PUT", path, body=data)
        self.assertEqual(status, 200)
        etag = resp.getheader("ETag")
        self.assertEqual(etag, '"%s"' % hashlib.md5(data).hexdigest())

        status, resp, body = request(conn, "GET", path)
        self.assertEqual((status, body), (200, data))
        self.assertEqual(resp.getheader("Content-Length"), str(len(data)))

        status, resp, body = request(conn, "GET", path, headers={"Range": "bytes=100-1123"})
        self.assertEqual(status, 206)
        self.assertEqual(body, data[100:1124])
        self.assertEqual(resp.getheader("Content-Range"), f"bytes 100-1123/{len(data)}")

        status, resp, body = request(conn, "GET", path, headers={"Range": "bytes=-4"})
        self.assertEqual((status, body), (206, b"tail"))

        status, resp, body = request(conn, "HEAD", path)
        self.assertEqual((status, body), (200, b""))
        self.assertEqual(resp.getheader("Content-Length"), str(len(data)))
        self.assertEqual(resp.getheader("ETag"), etag)

        status, _, body = request(conn, "GET", f"/{BUCKET}?list-type=2&prefix=dir%2F")
        self.assertEqual(status, 200)
        listing = ET.fromstring(body)
        keys = {c.findtext(f"{S3_NS}Key"): int(c.findtext(f"{S3_NS}Size"))
                for c in listing.iter(f"{S3_NS}Contents")}
        self.assertEqual(keys, {KEY: len(data)})

        # A large body, sent with Content-Length, streamed back.
        big = os.urandom(20 << 20)
        big_path = key_path("dir/big object.bin")
        status, _, _ = request(conn, "PUT", big_path, body=big)
        self.assertEqual(status, 200)
        status, _, body = request(conn, "GET", big_path)
        self.assertEqual(status, 200)
        self.assertEqual(hashlib.sha256(body).digest(), hashlib.sha256(big).digest())

        # A chunked upload is decoded and forwarded with a Content-Length.
        pieces = [os.urandom(n) for n in (1, 70000, 3, 1 << 20)]
        chunked_path = key_path("dir/chunked+upload.bin")
        status, _, _ = request(conn, "PUT", chunked_path, body=iter(pieces),
                               encode_chunked=True)
        self.assertEqual(status, 200)
        status, _, body = request(conn, "GET", chunked_path)
        self.assertEqual((status, body), (200, b"".join(pieces)))

        for p in (path, big_path, chunked_path):
            status, _, _ = request(conn, "DELETE", p)
            self.assertEqual(status, 204)
        status, _, body = request(conn, "GET", path)
        self.assertEqual(status, 404)
        self.assertEqual(error_code(body), "NoSuchKey")

    # The request target and headers (Host included) reach the server byte for byte.
    def test_target_and_headers_pass_unchanged(self):
        seen = []

        class Echo(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n)
                seen.append((self.requestline, self.headers.items(), body))
                out = b"echo"
                self.send_response(200)
                self.send_header("Content-Length", str(len(out)))
                self.send_header("X-Amz-Meta-Twice", "1")
                self.send_header("X-Amz-Meta-Twice", "2")
                self.end_headers()
                self.wfile.write(out)

            do_PUT = do_GET

            def log_message(self, *args):
                pass

        echo = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
        echo.daemon_threads = True
        threading.Thread(target=echo.serve_forever, daemon=True).start()
        self.addCleanup(echo.server_close)
        self.addCleanup(echo.shutdown)
        proxy = Proxy(f"http://127.0.0.1:{echo.server_address[1]}", "--delay-ms", "0")
        self.addCleanup(proxy.stop)

        conn = proxy.conn()
        self.addCleanup(conn.close)
        target = "//b/k%2Fx%20y+z%C3%A9%2b?list-type=2&prefix=a%2Fb&x=%20+&empty"
        conn.putrequest("GET", target, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", "my-bucket.s3.eu-west-1.example.com:9000")
        conn.putheader("X-Amz-Date", "20260101T000000Z")
        conn.putheader("x-amz-meta-Mixed", "a  b")
        conn.putheader("X-Dup", "1")
        conn.putheader("X-Dup", "2")
        conn.endheaders()
        resp = conn.getresponse()
        self.assertEqual(resp.read(), b"echo")
        self.assertEqual(resp.msg.get_all("X-Amz-Meta-Twice"), ["1", "2"])
        requestline, headers, _ = seen[-1]
        self.assertEqual(requestline, f"GET {target} HTTP/1.1")
        self.assertEqual(headers, [("Host", "my-bucket.s3.eu-west-1.example.com:9000"),
                                   ("X-Amz-Date", "20260101T000000Z"),
                                   ("x-amz-meta-Mixed", "a  b"),
                                   ("X-Dup", "1"), ("X-Dup", "2")])

        # Chunked from the client: forwarded with Content-Length, no Transfer-Encoding.
        conn.request("PUT", "/b/k", body=iter([b"abc", b"defg"]), encode_chunked=True,
                     headers={"Host": "h"})
        self.assertEqual(conn.getresponse().read(), b"echo")
        _, headers, body = seen[-1]
        self.assertEqual(body, b"abcdefg")
        names = {k.lower(): v for k, v in headers}
        self.assertEqual(names.get("content-length"), "7")
        self.assertNotIn("transfer-encoding", names)
        self.assertEqual(names.get("host"), "h")

    # (2) The delay is paid by each request, concurrently.
    def test_delay_is_per_request_and_concurrent(self):
        conn = self.proxy.conn()
        self.addCleanup(conn.close)
        path = key_path("concurrent/obj")
        status, _, _ = request(conn, "PUT", path, body=b"x" * 1000)
        self.assertEqual(status, 200)
        n = 8
        totals = []
        # Best of three: a loaded machine can slow one round, but serialised requests
        # could never take under n x 100 ms = 800 ms.
        for _ in range(3):
            conns = [self.proxy.conn() for _ in range(n)]
            for c in conns:
                c.connect()
            barrier = threading.Barrier(n + 1)
            results = [None] * n

            def get(i):
                barrier.wait()
                t0 = time.monotonic()
                results[i] = request(conns[i], "GET", path)[::2] + (time.monotonic() - t0,)

            threads = [threading.Thread(target=get, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            barrier.wait()
            t0 = time.monotonic()
            for t in threads:
                t.join(30)
            totals.append(time.monotonic() - t0)
            for c in conns:
                c.close()
            for status, body, took in results:
                self.assertEqual((status, body), (200, b"x" * 1000))
                self.assertGreaterEqual(took, 0.100)
            if totals[-1] < 0.5:
                break
        self.assertLess(min(totals), 0.5, f"{n} concurrent GETs took {totals} s")

    # (3) SlowDown answers before forwarding; the connection stays usable.
    def test_slowdown_never_reaches_the_store(self):
        proxy = self.start_proxy("--delay-ms", "0", "--fail-share", "1.0",
                                 "--fail-kinds", "slowdown")
        conn = proxy.conn()
        self.addCleanup(conn.close)
        path = key_path("slowdown/never stored")
        calls = [("PUT", path, b"y" * 100_000), ("GET", path, None),
                 ("GET", f"/{BUCKET}?list-type=2", None), ("DELETE", path, None),
                 ("PUT", path, iter([b"chunk", b"ed"]))]
        sock = None
        for method, p, body in calls:
            extra = {"encode_chunked": True} if body is not None and \
                not isinstance(body, bytes) else {}
            status, resp, data = request(conn, method, p, body=body, **extra)
            self.assertEqual(status, 503)
            self.assertEqual(resp.getheader("Content-Type"), "application/xml")
            self.assertEqual(int(resp.getheader("Content-Length")), len(data))
            self.assertEqual(error_code(data), "SlowDown")
            self.assertEqual(ET.fromstring(data).findtext("Message"),
                             "Please reduce your request rate.")
            # Kept alive: the same socket serves every request.
            sock = sock or conn.sock
            self.assertIs(conn.sock, sock)
        status, resp, data = request(conn, "HEAD", path)
        self.assertEqual((status, data), (503, b""))

        status, _, _ = request(self.direct(), "HEAD", path)
        self.assertEqual(status, 404, "a failed request reached moto_server")

    # (4) A reset closes the connection with no answer, before forwarding.
    def test_reset_closes_the_connection(self):
        proxy = self.start_proxy("--delay-ms", "0", "--fail-share", "1.0",
                                 "--fail-kinds", "reset")
        path = key_path("reset/never stored")
        for method, body in (("PUT", b"z" * 200_000), ("GET", None)):
            conn = proxy.conn()
            with self.assertRaises(RESET_ERRORS):
                request(conn, method, path, body=body)
            conn.close()
        status, _, _ = request(self.direct(), "HEAD", path)
        self.assertEqual(status, 404, "a reset request reached moto_server")

    # (5) The same seed gives the same failures for the same requests.
    def test_seeded_failures_repeat(self):
        conn = self.proxy.conn()
        self.addCleanup(conn.close)
        path = key_path("seeded/obj")
        self.assertEqual(request(conn, "PUT", path, body=b"s")[0], 200)

        def outcomes(proxy):
            out = []
            conn = proxy.conn()
            for i in range(40):
                try:
                    status, _, body = request(conn, "GET" if i % 3 else "HEAD", path)
                    out.append("slowdown" if status == 503 else status)
                except RESET_ERRORS:
                    out.append("reset")
                    conn.close()
                    conn = proxy.conn()
            conn.close()
            return out

        flags = ["--delay-ms", "0", "--fail-share", "0.3", "--fail-kinds", "slowdown,reset"]
        first = outcomes(self.start_proxy(*flags, "--seed", "7"))
        second = outcomes(self.start_proxy(*flags, "--seed", "7"))
        other = outcomes(self.start_proxy(*flags, "--seed", "8"))
        self.assertEqual(first, second)
        self.assertNotEqual(first, other)
        self.assertEqual(set(first), {200, "slowdown", "reset"}, first)
        self.assertTrue(4 <= 40 - first.count(200) <= 24, first)

    # (6) Counts in the stats file, while running and on SIGTERM.
    def test_stats_file(self):
        stats_path = os.path.join(self.tmp, "fault-stats.json")
        proxy = Proxy(self.upstream, "--delay-ms", "10", "--fail-share", "0.5",
                      "--fail-kinds", "slowdown", "--seed", "3", "--stats-file", stats_path)
        try:
            conn = proxy.conn()
            path = key_path("stats/obj")
            statuses = [request(conn, m, path, body=b"b" if m == "PUT" else None)[0]
                        for m in ("PUT", "PUT", "PUT", "GET", "GET", "HEAD", "DELETE")]
            conn.close()
            slowdowns = statuses.count(503)
            self.assertTrue(0 < slowdowns < 7, statuses)

            deadline = time.monotonic() + 5
            while True:
                with open(stats_path) as f:
                    stats = json.load(f)
                if stats["requests"] == 7 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            expected = {"requests": 7, "by_method": {"PUT": 3, "GET": 2, "HEAD": 1,
                                                     "DELETE": 1},
                        "delayed": 7, "failed_slowdown": slowdowns, "failed_reset": 0,
                        "forwarded": 7 - slowdowns, "upstream_errors": 0}
            self.assertEqual(stats, expected)
        finally:
            rc = proxy.stop(signal.SIGTERM)
        self.assertEqual(rc, 0)
        with open(stats_path) as f:
            self.assertEqual(json.load(f), expected)

        # The shared proxy counts too (it created the bucket); its file is rewritten
        # within a second of a change.
        deadline = time.monotonic() + 5
        while True:
            with open(self.stats_path) as f:
                shared = json.load(f)
            if shared["requests"] >= 1 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.assertGreaterEqual(shared["requests"], 1)
        self.assertEqual(shared["requests"], shared["delayed"])
        self.assertEqual(shared["failed_slowdown"] + shared["failed_reset"], 0)

    def test_refuses_other_hosts(self):
        for listen in ("0.0.0.0:0", "localhost:0", "[::1]:0"):
            done = subprocess.run([sys.executable, PROXY, "--upstream", self.upstream,
                                   "--listen", listen], capture_output=True, text=True,
                                  timeout=30)
            self.assertEqual(done.returncode, 2, done.stderr)
            self.assertIn("127.0.0.1 only", done.stderr)
            self.assertEqual(done.stdout, "")

    def test_upstream_down_is_a_502(self):
        proxy = self.start_proxy("--delay-ms", "0",
                                 upstream=f"http://127.0.0.1:{free_port()}")
        conn = proxy.conn()
        self.addCleanup(conn.close)
        status, _, body = request(conn, "GET", "/x/y")
        self.assertEqual(status, 502)
        self.assertEqual(error_code(body), "BadGateway")


if __name__ == "__main__":
    unittest.main()
