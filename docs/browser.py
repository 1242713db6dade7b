"""Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages
ended by NUL on file descriptors 3 and 4), so screenshots can click and scroll without a websocket client
or a WebDriver. Used by docs/mlflow_compare.py."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any


class BrowserError(RuntimeError):
    """Chromium is missing, died, or a page did not get ready: names the fix."""


class Browser:
    """One headless Chromium with one page of ``width`` x ``height`` CSS pixels."""

    def __init__(self, width: int = 1600, height: int = 1000, executable: str | None = None):
        names = ("chromium", "chromium-browser", "google-chrome")
        exe = executable or next((path for path in map(shutil.which, names) if path), None)
        if exe is None:
            raise BrowserError("no Chromium found; install it (apt-get install -y chromium) or pass its path")
        self._profile = tempfile.mkdtemp(prefix="chromium-")
        to_child, self._out = os.pipe()  # we write commands, Chromium reads them on fd 3
        self._in, from_child = os.pipe()  # Chromium writes answers on fd 4

        def wire() -> None:  # in the child, before exec: the pipe ends on fds 3 and 4, kept across exec
            high = os.dup(to_child), os.dup(from_child)  # first out of the way of 3 and 4 themselves
            os.dup2(high[0], 3, inheritable=True)
            os.dup2(high[1], 4, inheritable=True)

        self._proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--remote-debugging-pipe", f"--user-data-dir={self._profile}", "about:blank"],
            preexec_fn=wire, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(to_child)
        os.close(from_child)
        self._next_id, self._buffer = 0, b""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.resize(width, height)

    def resize(self, width: int, height: int) -> None:
        """The page's viewport in CSS pixels (the screenshot's size)."""
        self.page("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})  # fmt: skip

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """One DevTools command; returns its result (events in between are skipped)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        while True:
            answer = self._read()
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise BrowserError(f"{method}: {answer['error'].get('message')}")
                return answer.get("result", {})

    def _read(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = os.read(self._in, 1 << 16)
            if not chunk:
                raise BrowserError("Chromium closed its DevTools pipe (it crashed or was killed)")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def page(self, method: str, params: dict | None = None) -> dict:
        return self.send(method, params, self._session)

    def evaluate(self, script: str) -> Any:
        """The value of a JavaScript expression in the page (awaited if it is a promise)."""
        result = self.page("Runtime.evaluate", {"expression": script, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"script failed: {result['exceptionDetails'].get('text')} in {script[:80]!r}")
        return result["result"].get("value")

    def open(self, url: str, ready: str, timeout: float = 90.0) -> None:
        """Navigate and wait until the JavaScript expression ``ready`` is true."""
        self.page("Page.navigate", {"url": url})
        self.wait(ready, timeout, f"{url}: not ready")

    def wait(self, condition: str, timeout: float = 10.0, what: str = "page") -> None:
        """Wait until the JavaScript expression ``condition`` is true (an exception in it counts as false)."""
        deadline = time.monotonic() + timeout
        check = f"(() => {{ try {{ return Boolean({condition}); }} catch (e) {{ return false; }} }})()"
        while not self.evaluate(check):
            if time.monotonic() > deadline:
                raise BrowserError(f"{what}: {condition} still false after {timeout:.0f} s; is the server up?")
            time.sleep(0.2)

    def capture(self, clip: dict[str, float] | None = None) -> bytes:
        """A PNG of the viewport, or of ``clip`` (x, y, width, height in CSS pixels)."""
        params: dict[str, Any] = {"format": "png"}
        if clip:
            params["clip"] = {**clip, "scale": 1}
        return base64.b64decode(self.page("Page.captureScreenshot", params)["data"])

    def screenshot(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.capture())
        return path

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except BrowserError:
            pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        os.close(self._out)
        os.close(self._in)
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
