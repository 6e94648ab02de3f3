"""Run the pack inside a REAL ComfyUI server (0.3.75, from ``scripts/setup_dev.sh``) for tests.

- ``ComfyServer``: starts ``.venv/bin/python .comfyui/main.py --cpu ...`` on a free port with a
  fresh ``--base-directory`` whose ``custom_nodes/ComfyUI-BranchGRPO`` links to this checkout;
  waits for ``/system_stats``; stops it (terminate, then kill).
- ``ComfyClient``: ``object_info``, ``queue`` (graph in API format -> prompt_id), ``wait``
  (websocket, falling back to polling ``/history``), ``run`` (queue + wait + raise on error),
  ``interrupt``; every websocket message (``progress``, ``executing``, custom ones such as
  ``branchgrpo.metrics`` ...) is appended to ``client.messages``.
- ``server_fixtures()``: the session-scoped pytest fixtures ``comfy_base`` and ``comfy``
  (see tests/conftest.py). Tests that use them are skipped when ``.comfyui/`` is missing.

Only the standard library (urllib for HTTP) and ``websocket-client`` (optional: without it,
``wait`` polls ``/history`` and ``messages`` stays empty).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import procs
from bench.sandbox import COMFY_DIR, ROOT as REPO_ROOT, VENV_PYTHON  # the one place that finds the sandbox

PACK_NAME = "ComfyUI-BranchGRPO"
DEV_PACK_NAME = PACK_NAME + "-dev"
DEV_PACK_DIR = REPO_ROOT / "tests" / "comfy_dev_pack"
MODEL_SUBDIRS = ("diffusion_models", "checkpoints", "vae", "text_encoders", "clip", "loras",
                 "clip_vision", "vae_approx", "embeddings")
START_TIMEOUT_S = 120.0

__all__ = [
    "REPO_ROOT", "COMFY_DIR", "PACK_NAME", "comfy_missing_reason", "make_base_dir",
    "ComfyServer", "ComfyClient", "ComfyError", "ComfyQueueError", "ComfyExecutionError",
    "server_fixtures",
]


def comfy_missing_reason() -> Optional[str]:
    """Why a real ComfyUI cannot be started here, or None when it can."""
    if not (COMFY_DIR / "main.py").is_file():
        return f"ComfyUI not installed at {COMFY_DIR} (run scripts/setup_dev.sh)"
    if not VENV_PYTHON.exists():
        return f"{VENV_PYTHON} missing (run scripts/setup_dev.sh)"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_base_dir(base: Path, link_pack: bool = True, dev_pack: bool = True) -> Path:
    """A ComfyUI --base-directory: custom_nodes/<pack> -> this checkout (and, with ``dev_pack``,
    custom_nodes/<pack>-dev -> tests/comfy_dev_pack, the suite's tiny-model nodes), models/<kind>/,
    input/, output/, user/."""
    base = Path(base)
    for sub in ("custom_nodes", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for sub in MODEL_SUBDIRS:
        (base / "models" / sub).mkdir(parents=True, exist_ok=True)
    links = [(PACK_NAME, REPO_ROOT)] if link_pack else []
    if link_pack and dev_pack:
        links.append((DEV_PACK_NAME, DEV_PACK_DIR))
    for name, target in links:
        link = base / "custom_nodes" / name
        if not link.is_symlink() and not link.exists():
            link.symlink_to(target, target_is_directory=True)
    return base


# --------------------------------------------------------------------------- errors
class ComfyError(RuntimeError):
    pass


class ComfyQueueError(ComfyError):
    """POST /prompt refused the graph (HTTP 400): ``.body`` has ``error`` and ``node_errors``."""

    def __init__(self, status: int, body: Any):
        self.status = status
        self.body = body
        self.node_errors = body.get("node_errors") if isinstance(body, dict) else None
        super().__init__(f"/prompt refused the graph (HTTP {status}): {json.dumps(body, indent=1)[:4000]}")


class ComfyExecutionError(ComfyError):
    """A queued prompt finished with status error (``.history`` and ``.error_message``)."""

    def __init__(self, prompt_id: str, history: dict, error_message: Optional[dict]):
        self.prompt_id = prompt_id
        self.history = history
        self.error_message = error_message
        detail = ""
        if error_message:
            tb = error_message.get("traceback") or []
            detail = (f"\nnode {error_message.get('node_id')} ({error_message.get('node_type')}): "
                      f"{error_message.get('exception_type')}: {error_message.get('exception_message')}\n"
                      + "".join(tb)[-4000:])
        super().__init__(f"prompt {prompt_id} failed: status={history.get('status')}{detail}")


# --------------------------------------------------------------------------- server
class ComfyServer:
    """One ComfyUI process. ``start()`` blocks until ``/system_stats`` answers."""

    def __init__(self, base_dir: Path, port: Optional[int] = None,
                 extra_args: Sequence[str] = (), env: Optional[Dict[str, str]] = None,
                 link_pack: bool = True, dev_pack: bool = True):
        self.base_dir = make_base_dir(Path(base_dir), link_pack=link_pack, dev_pack=dev_pack)
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = list(extra_args)
        self.env = env
        self.log_path = self.base_dir / "comfyui.log"
        self.proc: Optional[subprocess.Popen] = None
        self.start_seconds: Optional[float] = None
        self._log_file = None

    @property
    def command(self) -> List[str]:
        db = self.base_dir / "user" / "comfyui.db"
        return [str(VENV_PYTHON), str(COMFY_DIR / "main.py"), "--cpu",
                "--listen", "127.0.0.1", "--port", str(self.port),
                "--disable-auto-launch", "--disable-api-nodes",
                "--base-directory", str(self.base_dir),
                "--database-url", f"sqlite:///{db}",
                *self.extra_args]

    def log_tail(self, n_chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return "<no log>"

    def start(self, timeout: float = START_TIMEOUT_S) -> "ComfyServer":
        reason = comfy_missing_reason()
        if reason:
            raise ComfyError(reason)
        env = dict(os.environ)
        env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "DO_NOT_TRACK": "1"})
        env.pop("PYTHONPATH", None)
        if self.env:
            env.update(self.env)
        self._log_file = open(self.log_path, "ab")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.command, cwd=str(self.base_dir), env=env,
                                     stdin=subprocess.DEVNULL, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, **procs.group_kwargs())
        deadline = t0 + timeout
        while True:
            if self.proc.poll() is not None:
                self._close_log()
                raise ComfyError(f"ComfyUI exited with code {self.proc.returncode} during start-up; "
                                 f"log {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, socket.timeout, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ComfyError(f"ComfyUI did not answer /system_stats within {timeout:.0f} s; "
                                 f"log {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.25)
        self.start_seconds = time.monotonic() - t0
        return self

    def stop(self, grace: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            procs.kill_group(proc, grace)  # the server and anything it started
        self._close_log()

    def _close_log(self):
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# --------------------------------------------------------------------------- client
def _is_done_message(msg: dict, prompt_id: str) -> bool:
    t = msg.get("type")
    data = msg.get("data") or {}
    if not isinstance(data, dict) or data.get("prompt_id") != prompt_id:
        return False
    if t == "executing" and data.get("node") is None:
        return True
    return t in ("execution_success", "execution_error", "execution_interrupted")


class ComfyClient:
    """HTTP + websocket client of one ComfyUI server.

    ``messages``: every websocket message so far, as dicts ``{"type": ..., "data": ...}``
    (binary frames, e.g. previews, as ``{"type": "binary", "data": bytes}``), in arrival order.
    """

    def __init__(self, url: str, server: Optional[ComfyServer] = None, use_websocket: bool = True):
        self.url = url.rstrip("/")
        self.server = server
        self.client_id = uuid.uuid4().hex
        self.messages: List[dict] = []
        self._cond = threading.Condition()
        self._ws = None
        self._ws_thread: Optional[threading.Thread] = None
        self._closed = False
        if use_websocket:
            self._connect_ws()

    # ---- plumbing
    def _connect_ws(self) -> None:
        try:
            import websocket  # websocket-client
        except ImportError:
            return
        ws_url = self.url.replace("http://", "ws://", 1) + f"/ws?clientId={self.client_id}"
        self._ws = websocket.create_connection(ws_url, timeout=10)
        self._ws.settimeout(None)
        self._ws_thread = threading.Thread(target=self._ws_loop, name="comfy-ws", daemon=True)
        self._ws_thread.start()

    def _ws_loop(self) -> None:
        import websocket
        while not self._closed:
            try:
                op, payload = self._ws.recv_data()
            except (websocket.WebSocketException, OSError):
                break
            if op == websocket.ABNF.OPCODE_TEXT:
                try:
                    msg = json.loads(payload.decode("utf-8"))
                except ValueError:
                    msg = {"type": "unparsed", "data": payload.decode("utf-8", "replace")}
            elif op == websocket.ABNF.OPCODE_BINARY:
                msg = {"type": "binary", "data": payload}
            elif op == websocket.ABNF.OPCODE_CLOSE:
                break
            else:
                continue
            with self._cond:
                self.messages.append(msg)
                self._cond.notify_all()
        with self._cond:
            self._ws = None if self._closed else self._ws
            self._cond.notify_all()

    @property
    def websocket_connected(self) -> bool:
        return self._ws is not None and self._ws_thread is not None and self._ws_thread.is_alive()

    def close(self) -> None:
        self._closed = True
        ws, self._ws = self._ws, None
        if ws is not None:
            try:
                ws.close()
            except Exception:
                pass
        if self._ws_thread is not None:
            self._ws_thread.join(timeout=5)

    def request(self, method: str, path: str, payload: Any = None, timeout: float = 60.0):
        """(status, parsed JSON or text) for one HTTP request; does not raise on HTTP errors."""
        data = None
        headers = {}
        if payload is not None:
            data = json.dumps(payload).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
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

    def get(self, path: str, timeout: float = 60.0):
        status, body = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise ComfyError(f"GET {path}: HTTP {status}: {str(body)[:2000]}")
        return body

    def post(self, path: str, payload: Any = None, timeout: float = 60.0):
        status, body = self.request("POST", path, payload if payload is not None else {}, timeout=timeout)
        if status != 200:
            raise ComfyError(f"POST {path}: HTTP {status}: {str(body)[:2000]}")
        return body

    # ---- API
    def system_stats(self) -> dict:
        return self.get("/system_stats")

    def object_info(self, node_class: Optional[str] = None) -> dict:
        """All node definitions, or ``{node_class: definition}`` for one."""
        return self.get("/object_info" + (f"/{node_class}" if node_class else ""))

    def queue(self, prompt: dict, extra_data: Optional[dict] = None) -> str:
        """POST an API-format graph; returns its prompt_id. HTTP 400 -> ComfyQueueError."""
        payload = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            payload["extra_data"] = extra_data
        status, body = self.request("POST", "/prompt", payload)
        if status != 200:
            raise ComfyQueueError(status, body)
        if body.get("node_errors"):
            raise ComfyQueueError(status, body)
        return body["prompt_id"]

    def history(self, prompt_id: str) -> Optional[dict]:
        body = self.get(f"/history/{prompt_id}")
        return body.get(prompt_id) if isinstance(body, dict) else None

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """Block until the prompt has finished (success, error or interrupted); returns its
        ``/history`` entry (``status.status_str``, ``outputs``, ``status.messages``)."""
        deadline = time.monotonic() + timeout
        if self.websocket_connected:
            with self._cond:
                while not any(_is_done_message(m, prompt_id) for m in self.messages):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(self._timeout_text(prompt_id, timeout))
                    if not self.websocket_connected:
                        break  # fall through to polling
                    self._cond.wait(timeout=min(left, 1.0))
        # /history is written right after the done message; poll until it shows the entry
        while True:
            entry = self.history(prompt_id)
            if entry and (entry.get("status") or {}).get("status_str") in ("success", "error"):
                return entry
            if time.monotonic() > deadline:
                raise TimeoutError(self._timeout_text(prompt_id, timeout))
            time.sleep(0.1)

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        """queue + wait; raises ComfyExecutionError unless the status is success."""
        prompt_id = self.queue(prompt)
        entry = self.wait(prompt_id, timeout=timeout)
        if entry.get("status", {}).get("status_str") != "success":
            raise ComfyExecutionError(prompt_id, entry, self.error_for(prompt_id, entry))
        return entry

    def interrupt(self) -> None:
        self.post("/interrupt", {})

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        self.post("/free", {"unload_models": unload_models, "free_memory": free_memory})

    # ---- messages
    def messages_for(self, prompt_id: Optional[str] = None, type: Optional[str] = None) -> List[dict]:
        """Messages (optionally only of one type, and only those whose data names prompt_id;
        a message without prompt_id, e.g. a custom one, matches any prompt_id)."""
        with self._cond:
            msgs = list(self.messages)
        out = []
        for m in msgs:
            if type is not None and m.get("type") != type:
                continue
            data = m.get("data")
            if prompt_id is not None and isinstance(data, dict) and "prompt_id" in data \
                    and data["prompt_id"] != prompt_id:
                continue
            out.append(m)
        return out

    def wait_for_message(self, predicate: Callable[[dict], bool], timeout: float = 60.0) -> dict:
        """First message (already received or arriving within timeout) for which predicate holds."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for m in self.messages[seen:]:
                    if predicate(m):
                        return m
                seen = len(self.messages)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no matching websocket message within %.0f s" % timeout)
                self._cond.wait(timeout=min(left, 1.0))

    def clear_messages(self) -> None:
        with self._cond:
            self.messages.clear()

    def error_for(self, prompt_id: str, entry: Optional[dict] = None) -> Optional[dict]:
        for m in self.messages_for(prompt_id, "execution_error"):
            return m.get("data")
        for name, data in ((entry or {}).get("status", {}).get("messages") or []):
            if name == "execution_error":
                return data
        return None

    def _timeout_text(self, prompt_id: str, timeout: float) -> str:
        tail = self.server.log_tail(3000) if self.server else ""
        return f"prompt {prompt_id} not finished within {timeout:.0f} s\n{tail}"


# --------------------------------------------------------------------------- pytest fixtures
def server_fixtures(extra_args: Sequence[str] = (), env: Optional[Dict[str, str]] = None,
                    base_fixture: str = "comfy_base", client_fixture: str = "comfy"):
    """Build the two session-scoped fixtures; assign them in a conftest.py:

        comfy_base, comfy = server_fixtures()

    ``comfy_base`` (Path): the server's --base-directory (models/, input/, output/, user/,
    custom_nodes/ComfyUI-BranchGRPO -> checkout), made fresh per session. Write model files
    into ``comfy_base / "models" / ...`` at any time (ComfyUI rescans its folders).
    ``comfy`` (ComfyClient): a started server's client; ``comfy.server`` is the ComfyServer
    (``.url``, ``.port``, ``.log_path``, ``.log_tail()``, ``.start_seconds``).
    Both skip the test when .comfyui/ is missing.
    """
    import pytest

    @pytest.fixture(scope="session", name=base_fixture)
    def _base(tmp_path_factory):
        reason = comfy_missing_reason()
        if reason:
            pytest.skip(reason)
        return make_base_dir(tmp_path_factory.mktemp("comfy-base"))

    @pytest.fixture(scope="session", name=client_fixture)
    def _client(request):
        reason = comfy_missing_reason()
        if reason:
            pytest.skip(reason)
        base = request.getfixturevalue(base_fixture)
        server = ComfyServer(base, extra_args=extra_args, env=env)
        server.start()
        client = ComfyClient(server.url, server=server)
        try:
            yield client
        finally:
            client.close()
            server.stop()

    return _base, _client
