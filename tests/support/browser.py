"""Headless Chromium (Debian's ``/usr/bin/chromium``) driven through the DevTools protocol over a pipe: JSON
messages, each ended by a NUL byte, written to the browser's fd 3 and read from its fd 4
(``--remote-debugging-pipe``). No port is opened, no library is needed, and the browser resolves no host
(``--host-resolver-rules``), so a page that tried to fetch anything would fail, and the test sees it.

    with Browser(tmp_path) as browser:
        page = browser.open("file:///.../report.html#where=iqa%20%3E%200.5", width=1366, height=768)
        page.evaluate("document.title")
        page.click("#some-button")
        page.screenshot(tmp_path / "shot.png", full_page=True)
"""

from __future__ import annotations

import base64
import json
import os
import selectors
import subprocess
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"


class BrowserError(RuntimeError):
    """The browser answered a command with an error, closed its pipe or took too long."""


class Browser:
    """One headless Chromium with a throwaway profile; ``open`` gives a ``Page``."""

    def __init__(self, profile: Path, timeout: float = 30.0):
        self.timeout = timeout
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def fds():                       # in the child, before exec: the protocol's pipes at fds 3 and 4
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
             "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}",
             "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=fds, pass_fds=(3, 4))
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._from_browser, selectors.EVENT_READ)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (BrowserError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """One command; returns its result, raises ``BrowserError`` on an error. Events that arrive in the
        meantime are kept in ``events``."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive(time.monotonic() + self.timeout, method)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, session: str | None = None, timeout: float | None = None) -> dict:
        """The first event ``method`` (of ``session``) not yet consumed, waiting for it if need be."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for i, event in enumerate(self.events):
                if event.get("method") == method and (session is None or event.get("sessionId") == session):
                    return self.events.pop(i)
            self.events.append(self._receive(deadline, method))

    def _receive(self, deadline: float, waiting_for: str) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not self._selector.select(left):
                raise BrowserError(f"no answer to {waiting_for} within {self.timeout:g} s")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise BrowserError(f"the browser closed its pipe while waiting for {waiting_for}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, url: str, width: int = 1366, height: int = 768) -> Page:
        """A new tab of ``width`` x ``height`` CSS pixels at ``url``, once its load event has fired."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        for method in ("Page.enable", "Runtime.enable", "Network.enable"):
            page.send(method)
        page.resize(width, height)
        page.navigate(url)
        return page


class Page:
    """One tab: navigate, evaluate JavaScript, click and type as a user would, take screenshots."""

    def __init__(self, browser: Browser, session: str):
        self.browser, self.session = browser, session

    def send(self, method: str, params: dict | None = None) -> dict:
        return self.browser.send(method, params, self.session)

    def resize(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def navigate(self, url: str) -> None:
        """Go to ``url``; wait for its load event, unless only the fragment changed (no new document)."""
        if "loaderId" in self.send("Page.navigate", {"url": url}):
            self.browser.wait_for("Page.loadEventFired", self.session)

    def requests(self) -> list[str]:
        """Every URL the page has asked the network for so far (``data:`` URIs included)."""
        return [e["params"]["request"]["url"] for e in self.browser.events
                if e.get("method") == "Network.requestWillBeSent" and e.get("sessionId") == self.session]

    def errors(self) -> list[str]:
        """Every uncaught exception the page's scripts have thrown so far, and every console.error."""
        out = []
        for e in self.browser.events:
            if e.get("sessionId") != self.session:
                continue
            if e.get("method") == "Runtime.exceptionThrown":
                details = e["params"]["exceptionDetails"]
                out.append(details.get("exception", {}).get("description") or details.get("text", ""))
            elif e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error":
                out.append(" ".join(str(a.get("value", a.get("description", ""))) for a in e["params"]["args"]))
        return out

    def evaluate(self, expression: str):
        """The value of a JavaScript expression (a promise is awaited); a thrown error raises."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(f"{expression[:80]!r}: {details.get('exception', {}).get('description', details)}")
        return result["result"].get("value")

    def settle(self) -> None:
        """Wait until the page has drawn twice: what an input scheduled for the next frame is on screen."""
        self.evaluate("new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")

    def center(self, selector: str) -> tuple[float, float]:
        """Where ``selector``'s first element is on screen, scrolled into view first."""
        box = self.evaluate(f"""(() => {{
            const el = document.querySelector({json.dumps(selector)});
            if (!el) return null;
            el.scrollIntoView({{block: "center"}});
            const r = el.getBoundingClientRect();
            return [r.left, r.top, r.width, r.height];
        }})()""")
        if box is None:
            raise BrowserError(f"no element {selector!r}")
        self.settle()              # the scroll drawn before a click: else the first one may land on stale layout
        return box[0] + box[2] / 2, box[1] + box[3] / 2

    def click_at(self, x: float, y: float) -> None:
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left",
                                                   "clickCount": 0 if kind == "mouseMoved" else 1})

    def click(self, selector: str) -> None:
        self.click_at(*self.center(selector))

    def drag(self, start: tuple[float, float], end: tuple[float, float], steps: int = 8) -> None:
        """Press at ``start``, move to ``end`` in ``steps``, release: a user dragging."""
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": start[0], "y": start[1]})
        self.send("Input.dispatchMouseEvent", {"type": "mousePressed", "x": start[0], "y": start[1],
                                               "button": "left", "clickCount": 1})
        for i in range(1, steps + 1):
            x = start[0] + (end[0] - start[0]) * i / steps
            y = start[1] + (end[1] - start[1]) * i / steps
            self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y, "button": "left",
                                                   "buttons": 1})
        self.send("Input.dispatchMouseEvent", {"type": "mouseReleased", "x": end[0], "y": end[1],
                                               "button": "left", "clickCount": 1})

    def press(self, key: str, code: str | None = None, key_code: int = 0) -> None:
        """One key, pressed and released (``key``: "ArrowRight", "Enter", "Tab", ...)."""
        params = {"key": key, "code": code or key, "windowsVirtualKeyCode": key_code}
        text = {"Enter": "\r", "Tab": "\t"}.get(key)
        self.send("Input.dispatchKeyEvent", {"type": "keyDown", "text": text, **params} if text else
                  {"type": "rawKeyDown", **params})
        self.send("Input.dispatchKeyEvent", {"type": "keyUp", **params})

    def type_text(self, text: str) -> None:
        self.send("Input.insertText", {"text": text})

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        """A PNG of the viewport, or of the whole page (the viewport stretched to the page's height)."""
        params: dict = {"format": "png"}
        if full_page:                 # from the top, so that what sticks to the top is drawn there
            self.evaluate("window.scrollTo(0, 0)")
            self.settle()
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            params |= {"captureBeyondViewport": True,
                       "clip": {"x": 0, "y": 0, "width": self.width, "height": size["height"], "scale": 1}}
        data = self.send("Page.captureScreenshot", params)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)
