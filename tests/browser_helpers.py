"""Drive ComfyUI's real frontend in headless Chromium (Debian's /usr/bin/chromium through Playwright,
no browser download) against the session's ComfyUI server.

- ``browser_missing_reason()``: why browser tests cannot run here (None when they can).
- ``launch(playwright)``: a headless Chromium with the flags that work in this sandbox.
- ``ComfyPage``: one page of the frontend: ``open()`` (waits until the app and our extension are up),
  ``js(...)``, and ``errors()``: console errors and page errors, minus known frontend noise.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("BRANCHGRPO_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# (Playwright gives every launch a fresh temporary profile itself; it refuses --user-data-dir.)
WORKFLOWS_DIR = Path(__file__).resolve().parent.parent / "workflows"
PAGE_TIMEOUT_MS = 60_000

# Console errors of ComfyUI's own frontend (1.32.9) on a bare server with no network, seen with our
# extension stubbed out as well; none of them comes from this pack.
KNOWN_NOISE = [
    # 404s for optional per-user files and folders a fresh --base-directory does not have, and the
    # browser's own favicon request (ComfyUI has none at /favicon.ico)
    (re.compile(r"^Failed to load resource: the server responded with a status of 404"),
     re.compile(r"/(api/)?(userdata(/|\?)|user\.css)|/favicon\.ico$")),
    # the frontend asks api.comfy.org for the core node pack's registry entry; CSP blocks it offline
    (re.compile(r"^Connecting to 'https://api\.comfy\.org/.*Content Security Policy"), None),
    # the setting store's onChange on a setting id the frontend never registered (GraphView load)
    (re.compile(r"^TypeError: Cannot read properties of undefined \(reading 'id'\)\s+at onChange "), None),
    # frontend 1.49.6 (ComfyUI 0.33.0) reads its own app.rootGraph while it starts, with or without this pack
    # (seen on a bare server)
    (re.compile(r"^ComfyApp graph accessed before initialization$"), re.compile(r"/assets/settingStore-")),
]


def browser_missing_reason() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Python playwright is not installed (scripts/setup_dev.sh installs it)"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)) and not shutil.which(CHROMIUM):
        return f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set BRANCHGRPO_CHROMIUM)"
    return None


def launch(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


def http_json(url: str, payload: Any = None, method: str | None = None, timeout: float = 30.0):
    """(status, parsed body) of one request; HTTP errors are returned, not raised."""
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"),
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, body = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    text = body.decode("utf-8", "replace")
    try:
        return status, json.loads(text) if text else None
    except ValueError:
        return status, text


def shipped_workflows() -> list[Path]:
    return sorted(WORKFLOWS_DIR.glob("*.json"))


class ComfyPage:
    """One browser page on the ComfyUI frontend, collecting console errors and page errors."""

    def __init__(self, browser, url: str, viewport=(1600, 1000)):
        self.url = url.rstrip("/")
        self.context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
        self.page = self.context.new_page()
        self.page.set_default_timeout(PAGE_TIMEOUT_MS)
        self.messages: list[dict] = []
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda e: self.messages.append(
            {"type": "pageerror", "text": f"{e}\n{getattr(e, 'stack', '') or ''}", "url": ""}))

    def _on_console(self, msg):
        if msg.type in ("error", "assert"):
            loc = msg.location or {}
            self.messages.append({"type": msg.type, "text": msg.text, "url": loc.get("url", "")})

    def open(self, path: str = "/") -> ComfyPage:
        """Load the page; returns when the graph, the node definitions and our extension are ready."""
        http_json(self.url + "/api/settings", {"Comfy.TutorialCompleted": True})
        self.page.goto(self.url + path)
        self.page.wait_for_function(
            "() => window.app?.graph && window.LiteGraph?.registered_node_types?.BranchGRPOTrainer"
            " && app.extensions?.some(e => e.name === 'BranchGRPO.LiveChart')", timeout=PAGE_TIMEOUT_MS)
        return self

    def reload(self) -> ComfyPage:
        self.page.reload()
        self.page.wait_for_function(
            "() => window.app?.graph && window.LiteGraph?.registered_node_types?.BranchGRPOTrainer"
            " && app.extensions?.some(e => e.name === 'BranchGRPO.LiveChart')", timeout=PAGE_TIMEOUT_MS)
        return self

    def js(self, script: str, arg: Any = None):
        return self.page.evaluate(script, arg)

    def wait_js(self, predicate: str, arg: Any = None, timeout_s: float = 60.0):
        return self.page.wait_for_function(predicate, arg=arg, timeout=timeout_s * 1000)

    def errors(self) -> list[str]:
        """Console errors and page errors that are not known frontend noise (KNOWN_NOISE)."""
        out = []
        for m in self.messages:
            if m["type"] != "pageerror" and any(
                    text.search(m["text"]) and (where is None or where.search(m["url"] or m["text"]))
                    for text, where in KNOWN_NOISE):
                continue
            out.append(f"[{m['type']}] {m['text']} ({m['url']})")
        return out

    def screenshot(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path))
        return path

    def close(self):
        self.context.close()


def wait_until(predicate, timeout_s: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout_s:.0f} s")
        time.sleep(interval)
