#!/usr/bin/env python3
"""Load a local HTML page in headless Chromium and report what the browser saw.

The browser test of `trustflow report` calls this; it needs only Python's
standard library and Debian's chromium. It opens PAGE.html as a file:// URL,
collects console errors, uncaught exceptions and browser log errors (CSP
violations, failed resource loads), evaluates the given JS expressions, saves a
full-page screenshot and prints one JSON object to stdout. It exits 0 whenever
the page was checked, errors or not (the caller judges), and 2 when Chromium
could not be started or the DevTools protocol failed or timed out.

Usage:
  browser_check.py PAGE.html --screenshot OUT.png [--eval NAME=JS ...]
      [--width 1280] [--height 2000] [--timeout 60] [--chromium PATH]

Chromium is driven over --remote-debugging-pipe: it reads NUL-terminated CDP
JSON messages from fd 3 and writes its own to fd 4, so no port is opened.
"""
import argparse
import base64
import fcntl
import json
import math
import os
import pathlib
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

MAX_SCREENSHOT_HEIGHT = 20000
# Keep Chromium off the network: the page is a local file and must not need it.
# Even with the background services off, Chromium still preconnects to its search
# engine and to Google hosts; the resolver rule makes every host name unresolvable.
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--no-default-browser-check", "--remote-debugging-pipe", "--hide-scrollbars",
    "--mute-audio", "--disable-extensions", "--disable-sync",
    "--disable-background-networking", "--disable-component-update",
    "--disable-default-apps", "--disable-domain-reliability", "--no-pings",
    "--disable-client-side-phishing-detection", "--password-store=basic",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--disable-features=Translate,OptimizationHints,MediaRouter,"
    "DialMediaRouteProvider,AutofillServerCommunication,"
    "CertificateTransparencyComponentUpdater,InterestFeedContentSuggestions",
]


class CdpError(Exception):
    """Chromium failed to start, died, timed out or answered with an error."""


class Cdp:
    """A minimal synchronous CDP client over Chromium's pipe transport."""

    def __init__(self, write_fd, read_fd, deadline, on_event):
        self.write_fd, self.read_fd = write_fd, read_fd
        self.deadline, self.on_event = deadline, on_event
        self.next_id, self.buf = 0, b""

    def send_nowait(self, method, params=None, session=None):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self.write_fd, data):]
        return self.next_id

    def send(self, method, params=None, session=None):
        want = self.send_nowait(method, params, session)
        while True:
            msg = self._read(self.deadline)
            if msg is None:
                raise CdpError(f"timed out waiting for the reply to {method}")
            if msg.get("id") == want:
                if "error" in msg:
                    raise CdpError(f"{method} failed: {msg['error']}")
                return msg.get("result", {})
            self._dispatch(msg)

    def pump(self, until, stop=lambda: False):
        """Dispatch events until `stop()` holds or the time `until` passes."""
        until = min(until, self.deadline)
        while not stop():
            msg = self._read(until)
            if msg is None:
                return stop()
            self._dispatch(msg)
        return True

    def _dispatch(self, msg):
        if "method" in msg:  # replies to send_nowait commands are dropped
            self.on_event(msg["method"], msg.get("params", {}))

    def _read(self, until):
        """Return the next message, or None once `until` has passed."""
        while b"\0" not in self.buf:
            left = until - time.monotonic()
            if left <= 0:
                return None
            if not select.select([self.read_fd], [], [], left)[0]:
                return None
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise CdpError("chromium closed the DevTools pipe (it exited)")
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\0", 1)
        return json.loads(raw)


def describe(obj):
    """Render a CDP RemoteObject (a console argument) as text."""
    if "value" in obj:
        v = obj["value"]
        return v if isinstance(v, str) else json.dumps(v)
    return obj.get("unserializableValue") or obj.get("description") or obj.get("type", "?")


def where(url, line=None):
    """" (url:line)" for a message; CDP line numbers are 0-based, Log's often absent."""
    if not url:
        return ""
    return f" ({url}:{line + 1})" if line is not None else f" ({url})"


class Collector:
    """Sorts page events into errors and other console output."""

    def __init__(self):
        self.errors, self.console_other = [], []
        self.loaded, self.cdp, self.session = False, None, None

    def __call__(self, method, p):
        if method == "Runtime.consoleAPICalled":
            text = " ".join(describe(a) for a in p.get("args", []))
            frames = (p.get("stackTrace") or {}).get("callFrames") or [{}]
            loc = where(frames[0].get("url"), frames[0].get("lineNumber"))
            line = f"console.{p['type']}: {text}{loc}"
            (self.errors if p["type"] in ("error", "assert") else self.console_other).append(line)
        elif method == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            text = (d.get("exception") or {}).get("description") or d.get("text", "")
            loc = where(d.get("url"), d.get("lineNumber"))
            self.errors.append(f"uncaught exception: {text}{loc}")
        elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
            e = p["entry"]  # CSP violations, failed resource loads, ...
            loc = where(e.get("url"), e.get("lineNumber"))
            self.errors.append(f"log[{e['source']}]: {e['text']}{loc}")
        elif method == "Page.loadEventFired":
            self.loaded = True
        elif method == "Page.javascriptDialogOpening":
            # An unanswered alert() would block the page until the timeout; a
            # static report has no business opening one, so it counts as an error.
            self.errors.append(f"dialog ({p['type']}): {p['message']}")
            self.cdp.send_nowait("Page.handleJavaScriptDialog", {"accept": False}, self.session)


def check(args, cdp, col):
    """Run the check over an attached browser; returns the JSON report."""
    version = cdp.send("Browser.getVersion")["product"]
    target = cdp.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    s = cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    col.session = s
    for domain in ("Runtime", "Log", "Page"):
        cdp.send(f"{domain}.enable", session=s)
    cdp.send("Emulation.setDeviceMetricsOverride", {
        "width": args.width, "height": args.height, "deviceScaleFactor": 1, "mobile": False,
    }, session=s)

    url = pathlib.Path(args.page).resolve().as_uri()  # percent-encodes spaces, '#'...
    nav = cdp.send("Page.navigate", {"url": url}, session=s)
    if nav.get("errorText"):
        col.errors.append(f"navigation failed: {nav['errorText']}")
    if not cdp.pump(cdp.deadline, lambda: col.loaded):
        raise CdpError("timed out waiting for the page's load event")
    cdp.pump(time.monotonic() + 0.3)  # late errors (timers, image error handlers)

    def evaluate(expr):
        r = cdp.send("Runtime.evaluate", {
            "expression": expr, "returnByValue": True, "awaitPromise": True,
        }, session=s)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            return {"exception": (d.get("exception") or {}).get("description") or d.get("text")}
        res = r["result"]  # undefined has no "value" and comes out as null
        return res.get("value", res.get("unserializableValue"))

    # The href test guards against a stray load event from the initial about:blank.
    ready = ("location.href !== 'about:blank' && document.readyState === 'complete'"
             " && [...document.images].every(i => i.complete)")
    while evaluate(ready) is not True:
        if time.monotonic() >= cdp.deadline:
            raise CdpError("timed out waiting for the document and its images to load")
        cdp.pump(time.monotonic() + 0.1)

    evals = {name: evaluate(expr) for name, expr in args.eval}

    size = cdp.send("Page.getLayoutMetrics", session=s)["cssContentSize"]
    clip = {"x": 0, "y": 0, "scale": 1,
            "width": max(1, math.ceil(size["width"])),
            "height": max(1, min(math.ceil(size["height"]), MAX_SCREENSHOT_HEIGHT))}
    shot = cdp.send("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True, "clip": clip,
    }, session=s)
    png = base64.b64decode(shot["data"])
    with open(args.screenshot, "wb") as f:
        f.write(png)
    cdp.pump(time.monotonic())  # events that arrived during the last commands
    return {"url": url, "errors": col.errors, "console_other": col.console_other,
            "evals": evals, "screenshot": args.screenshot,
            "screenshot_bytes": len(png), "chromium": version}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("page")
    ap.add_argument("--screenshot", required=True)
    ap.add_argument("--eval", action="append", default=[], metavar="NAME=JS")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=2000)
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    pairs = []
    for item in args.eval:
        name, sep, expr = item.partition("=")
        if not sep or not name:
            ap.error(f"--eval wants NAME=JS_EXPRESSION, got {item!r}")
        pairs.append((name, expr))
    args.eval = pairs
    if not os.path.isfile(args.page):
        ap.error(f"no such page: {args.page}")
    return args


def high_fd(fd):
    """Move `fd` to a number >= 10."""
    new = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return new


def main():
    args = parse_args()
    deadline = time.monotonic() + args.timeout
    tmp = tempfile.mkdtemp(prefix="browser_check.")
    # Keep the pipe ends above the standard and target fds in this process, so
    # the child can put them on 3 and 4 without clobbering stdio or each other.
    fds = [high_fd(fd) for fd in (*os.pipe(), *os.pipe())]
    to_chrome_r, to_chrome_w, from_chrome_r, from_chrome_w = fds
    open_fds = list(fds)

    def child_fds():
        os.dup2(to_chrome_r, 3)
        os.dup2(from_chrome_w, 4)

    # Chromium's stderr (wrapper-script and GPU/dbus noise) goes to a file that
    # is shown only when something goes wrong.
    log_path = os.path.join(tmp, "chromium.log")
    proc = None
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [args.chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp}/profile"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                pass_fds=(3, 4), preexec_fn=child_fds, start_new_session=True)
        # Only the child keeps its ends, so a dead Chromium reads as EOF here.
        for fd in (to_chrome_r, from_chrome_w):
            os.close(fd)
            open_fds.remove(fd)
        col = Collector()
        col.cdp = cdp = Cdp(to_chrome_w, from_chrome_r, deadline, col)
        report = check(args, cdp, col)
    except (CdpError, OSError, ValueError, KeyError) as e:
        with open(log_path, "rb") as f:
            tail = f.read()[-4000:].decode(errors="replace")
        print(f"browser_check: {type(e).__name__}: {e}\n"
              f"--- chromium output (tail) ---\n{tail}", file=sys.stderr)
        return 2
    finally:
        for fd in open_fds:
            os.close(fd)
        if proc is not None:
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0


def stop(proc):
    """End Chromium and the zygote/renderer processes it forked (its group).

    Closing the DevTools pipe already makes Chromium quit cleanly; the signals
    are for a browser that hangs and for anything left behind in its group.
    """
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return  # the whole group is gone
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            pass


if __name__ == "__main__":
    sys.exit(main())
