"""Run a UI-format ComfyUI workflow headless and stream what it does: the CPU demo's runner.

    .venv/bin/python scripts/run_demo.py                       # start the sandbox ComfyUI, run workflows/cpu_demo.json
    .venv/bin/python scripts/run_demo.py --url http://127.0.0.1:8188   # use a ComfyUI that is already running
    .venv/bin/python scripts/run_demo.py --set 5.iterations=4  # override a node input (node id . input = JSON value)

Steps: (1) start ComfyUI from the sandbox of scripts/setup_dev.sh (``.comfyui/`` with ``--base-directory
.comfy-base``, CPU, a free port) unless ``--url`` is given; (2) convert the UI workflow (what the frontend saves)
into the API prompt that ``POST /prompt`` takes, with the node definitions of ``GET /object_info`` giving each
node's widget order (:func:`ui_to_api`); (3) queue it and stream progress over the websocket: which node runs,
the Trainer's reward per iteration, what each output node wrote; (4) stop the server it started and print where
the LoRA, the reward curve and the images went. Exit code 0 on success, 1 if the prompt failed.

Only the standard library and ``websocket-client`` (installed by setup_dev.sh; without it the run is polled).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORKFLOW = ROOT / "workflows" / "cpu_demo.json"
FRONTEND_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


# ------------------------------------------------------------------------------------ UI -> API
class ConversionError(ValueError):
    pass


def _is_widget(spec) -> bool:
    """An input that the frontend shows as a widget (and saves in ``widgets_values``), not a socket."""
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    opts = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _has_control(name: str, spec) -> bool:
    opts = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
    flag = opts.get("control_after_generate")
    if flag is None:  # the frontend's default for seed inputs of nodes that do not say
        return name in ("seed", "noise_seed")
    return bool(flag)


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API prompt (``{node_id: {"class_type", "inputs", "_meta"}}``) of a UI-format workflow.

    Widget values are matched to input names in the order of ``object_info[type]["input_order"]`` (required
    then optional), skipping the extra "control after generate" value the frontend stores after a seed (an optional
    widget the workflow has no value for, newer than the file, is left to the server's default); links
    become ``[origin_id, origin_slot]`` (through Reroute nodes). Note/Markdown notes are dropped; muted nodes
    (mode 2) are dropped; bypassed nodes (mode 4) are not supported (an error says so)."""
    if not isinstance(workflow.get("nodes"), list) or "links" not in workflow:
        raise ConversionError("not a UI-format workflow (no 'nodes' / 'links'); an API prompt can be queued as is")
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {}
    for link in workflow["links"]:
        if isinstance(link, dict):  # newer serialisation
            links[link["id"]] = (link["origin_id"], link["origin_slot"])
        else:
            links[link[0]] = (link[1], link[2])

    def source(link_id):
        origin, slot = links[link_id]
        seen = set()
        while nodes[origin]["type"] == "Reroute":
            if origin in seen:
                raise ConversionError(f"Reroute loop at node {origin}")
            seen.add(origin)
            upstream = (nodes[origin].get("inputs") or [{}])[0].get("link")
            if upstream is None:
                return None
            origin, slot = links[upstream]
        return [str(origin), slot]

    prompt = {}
    for nid, node in nodes.items():
        ntype = node["type"]
        if ntype in FRONTEND_ONLY or node.get("mode", 0) == 2:
            continue
        if node.get("mode", 0) == 4:
            raise ConversionError(f"node {nid} ({ntype}) is bypassed; un-bypass or delete it")
        if ntype not in object_info:
            raise ConversionError(f"node {nid}: type {ntype!r} is not known to this ComfyUI (missing custom node?)")
        info = object_info[ntype]
        specs = {**(info["input"].get("required") or {}), **(info["input"].get("optional") or {})}
        order = info.get("input_order") or {}
        names = list(order.get("required") or []) + list(order.get("optional") or [])
        values = list(node.get("widgets_values") or [])
        if isinstance(node.get("widgets_values"), dict):
            raise ConversionError(f"node {nid} ({ntype}): widgets_values saved as a dict are not supported")
        inputs = {}
        pos = 0
        for name in names:
            spec = specs.get(name)
            if spec is None or not _is_widget(spec):
                continue
            if pos >= len(values):
                if name in (order.get("optional") or []):
                    continue  # an optional widget newer than the saved workflow: the server's default, as the UI
                raise ConversionError(f"node {nid} ({ntype}): no saved value for widget {name!r}; re-save the "
                                      "workflow in this ComfyUI")
            inputs[name] = values[pos]
            pos += 1
            if _has_control(name, spec) and pos < len(values) and values[pos] in CONTROL_VALUES:
                pos += 1
        for inp in node.get("inputs") or []:
            if inp.get("link") is not None:
                src = source(inp["link"])
                if src is not None:
                    inputs[inp["name"]] = src
        entry = {"class_type": ntype, "inputs": inputs}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        prompt[str(nid)] = entry
    # links from dropped (muted / note) nodes would fail validation: drop them like the frontend does
    for entry in prompt.values():
        for k, v in list(entry["inputs"].items()):
            if isinstance(v, list) and len(v) == 2 and isinstance(v[1], int) and v[0] not in prompt:
                del entry["inputs"][k]
    return prompt


def apply_overrides(prompt: dict, overrides: list[str]) -> None:
    """``NODE.INPUT=VALUE`` (VALUE as JSON, else a string); NODE is a node id or a class_type (all of that type)."""
    for item in overrides:
        try:
            target, value = item.split("=", 1)
            node, name = target.rsplit(".", 1)
        except ValueError:
            raise SystemExit(f"--set {item!r}: expected NODE.INPUT=VALUE, e.g. 5.iterations=4") from None
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        hits = [e for nid, e in prompt.items() if nid == node or e["class_type"] == node]
        if not hits:
            raise SystemExit(f"--set {item!r}: no node {node!r} in the workflow")
        for e in hits:
            e["inputs"][name] = parsed


# ------------------------------------------------------------------------------------------- HTTP
def http(url: str, payload=None, timeout: float = 60.0):
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET",
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


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


class SandboxServer:
    """ComfyUI from scripts/setup_dev.sh's sandbox, headless on CPU; stopped by its PID."""

    def __init__(self, base: Path, port: int = 8188, python: Path | None = None, comfy_dir: Path | None = None):
        self.base = Path(base)
        self.python = Path(python or ROOT / ".venv" / "bin" / "python")
        self.comfy_dir = Path(comfy_dir or ROOT / ".comfyui")
        self.port = _free_port(port)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / "comfyui_demo.log"
        self.proc = None

    def start(self, timeout: float = 180.0) -> "SandboxServer":
        if not (self.comfy_dir / "main.py").is_file() or not self.python.exists():
            raise SystemExit(f"no sandbox ComfyUI at {self.comfy_dir} (run: bash scripts/setup_dev.sh)")
        for sub in ("custom_nodes", "input", "output", "user", "models/loras"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / "ComfyUI-BranchGRPO"
        if not link.exists():
            link.symlink_to(ROOT, target_is_directory=True)
        cmd = [str(self.python), str(self.comfy_dir / "main.py"), "--cpu", "--listen", "127.0.0.1",
               "--port", str(self.port), "--disable-auto-launch", "--disable-api-nodes",
               "--base-directory", str(self.base)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1"}
        env.pop("PYTHONPATH", None)
        self._log = open(self.log_path, "ab")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=str(self.base), env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"ComfyUI exited during start-up (code {self.proc.returncode}); see {self.log_path}")
            try:
                if http(self.url + "/system_stats", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() - t0 > timeout:
                self.stop()
                raise SystemExit(f"ComfyUI did not start within {timeout:.0f} s; see {self.log_path}")
            time.sleep(0.25)
        say(f"ComfyUI started in {time.monotonic() - t0:.1f} s at {self.url} (pid {self.proc.pid}, "
            f"base {self.base}, log {self.log_path})")
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
            say(f"ComfyUI stopped (pid {proc.pid})")
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None


T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[demo {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------------------------ run + stream
class Runner:
    """Queue one prompt and follow it over the websocket (``/history`` polling as a fallback)."""

    def __init__(self, url: str, prompt: dict, quiet: bool = False):
        self.url, self.prompt, self.quiet = url.rstrip("/"), prompt, quiet
        self.client_id = uuid.uuid4().hex
        self.metrics: list[dict] = []
        self.done = threading.Event()
        self.error: dict | None = None
        self.prompt_id: str | None = None
        self.ws = None

    def _log(self, msg: str) -> None:
        if not self.quiet:
            say(msg)

    def _title(self, nid) -> str:
        e = self.prompt.get(str(nid)) or {}
        return (e.get("_meta") or {}).get("title") or e.get("class_type", "?")

    def _on_message(self, msg: dict) -> None:
        t, d = msg.get("type"), msg.get("data") or {}
        if isinstance(d, dict) and d.get("prompt_id") not in (None, self.prompt_id):
            return
        if t == "executing" and d.get("node") is not None:
            self._log(f"running node {d['node']}: {self._title(d['node'])}")
        elif t == "execution_cached" and d.get("nodes"):
            self._log(f"cached: {', '.join(d['nodes'])}")
        elif t == "branchgrpo.metrics":
            m = d.get("metrics") or {}
            self.metrics.append({"iteration": d.get("iteration"), **m})
            self._log(f"  iteration {d.get('iteration')}/{d.get('total')}: reward mean {m.get('reward_mean', 0):.4f} "
                      f"(best {m.get('reward_max', 0):.4f}, worst {m.get('reward_min', 0):.4f}), "
                      f"loss {m.get('loss', 0):.3g}, {m.get('time_total', 0):.1f} s")
        elif t == "executed":
            out = d.get("output") or {}
            for img in out.get("images") or []:
                self._log(f"  {self._title(d.get('node'))} wrote {img.get('type')}/"
                          f"{(img.get('subfolder') + '/') if img.get('subfolder') else ''}{img.get('filename')}")
            for text in out.get("text") or []:
                self._log(f"  {self._title(d.get('node'))}: " + str(text).replace("\n", " | "))
        elif t == "execution_error":
            self.error = d
            self.done.set()
        elif t in ("execution_success", "execution_interrupted"):
            if t == "execution_interrupted":
                self.error = {"exception_message": "interrupted", **d}
            self.done.set()

    def _ws_loop(self) -> None:
        import websocket
        while not self.done.is_set():
            try:
                op, payload = self.ws.recv_data()
            except Exception:
                break
            if op == websocket.ABNF.OPCODE_TEXT:
                try:
                    self._on_message(json.loads(payload.decode("utf-8")))
                except ValueError:
                    pass
            elif op == websocket.ABNF.OPCODE_CLOSE:
                break

    def run(self, timeout: float = 1800.0) -> dict:
        """Queue, follow, and return the ``/history`` entry; raises RuntimeError on a refused or failed prompt."""
        try:
            import websocket
            self.ws = websocket.create_connection(
                self.url.replace("http://", "ws://", 1) + f"/ws?clientId={self.client_id}", timeout=10)
            self.ws.settimeout(None)
            threading.Thread(target=self._ws_loop, daemon=True).start()
        except Exception as e:  # no websocket-client, or no websocket: poll /history
            self._log(f"(no websocket: {e}; polling /history without live progress)")
            self.ws = None
        status, body = http(self.url + "/prompt", {"prompt": self.prompt, "client_id": self.client_id})
        if status != 200 or (isinstance(body, dict) and body.get("node_errors")):
            raise RuntimeError(f"ComfyUI refused the workflow (HTTP {status}): {json.dumps(body, indent=1)[:3000]}")
        self.prompt_id = body["prompt_id"]
        self._log(f"queued prompt {self.prompt_id} ({len(self.prompt)} nodes)")
        deadline = time.monotonic() + timeout
        while True:
            if self.ws is not None:
                self.done.wait(timeout=1.0)
            else:
                time.sleep(1.0)
            _, hist = http(f"{self.url}/history/{self.prompt_id}")
            entry = (hist or {}).get(self.prompt_id) if isinstance(hist, dict) else None
            state = ((entry or {}).get("status") or {}).get("status_str")
            if state in ("success", "error"):
                break
            if time.monotonic() > deadline:
                http(self.url + "/interrupt", {})
                raise RuntimeError(f"the workflow did not finish within {timeout:.0f} s (interrupted)")
        if self.ws is not None:
            self.done.set()
            try:
                self.ws.close()
            except Exception:
                pass
        if state != "success":
            messages = entry["status"].get("messages") or []
            err = self.error or next((d for n, d in messages if n == "execution_error"), {})
            raise RuntimeError(f"the workflow failed in node {err.get('node_id')} ({err.get('node_type')}): "
                               f"{err.get('exception_type', '')}: {err.get('exception_message')}\n"
                               + "".join(err.get("traceback") or [])[-3000:])
        return entry


def summarise(entry: dict, prompt: dict, base: Path | None, metrics: list[dict], k: int = 5) -> dict:
    """Paths of what the workflow wrote (LoRA, images) and the reward trend."""
    out = {"loras": [], "images": [], "texts": {}, "metrics": metrics}
    for nid, o in (entry.get("outputs") or {}).items():
        title = ((prompt.get(nid) or {}).get("_meta") or {}).get("title") or (prompt.get(nid) or {}).get("class_type")
        if o.get("text"):
            out["texts"][nid] = {"title": title, "text": [str(t) for t in o["text"]]}
        for name in o.get("lora_name") or []:
            path = str(base / "models" / "loras" / name) if base else name
            out["loras"].append({"node": nid, "title": title, "name": name, "path": path})
        for img in o.get("images") or []:
            rel = "/".join(p for p in (img.get("subfolder"), img.get("filename")) if p)
            path = str(base / img.get("type", "output") / rel) if base else f"{img.get('type')}/{rel}"
            out["images"].append({"node": nid, "title": title, "path": path, "type": img.get("type")})
    rewards = [m["reward_mean"] for m in metrics if m.get("reward_mean") is not None]
    if rewards:
        k = max(1, min(k, len(rewards) // 2 or 1))
        first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
        out["reward"] = {"first": first, "last": last, "gain": last - first, "window": k, "iterations": len(rewards)}
    return out


def reward_label(prompt: dict) -> str:
    """What the Trainer's reward input is: the weight-free reward's name, else the node's title / type."""
    for entry in prompt.values():
        src = entry["inputs"].get("reward") if entry["class_type"] == "BranchGRPOTrainer" else None
        if isinstance(src, list) and src[0] in prompt:
            node = prompt[src[0]]
            if node["class_type"] == "BranchGRPOWeightFreeReward":
                return str(node["inputs"].get("reward"))
            return (node.get("_meta") or {}).get("title") or node["class_type"]
    return "reward"


def server_base_dir(url: str) -> Path | None:
    """The --base-directory of a running ComfyUI, from /system_stats' argv (None if it has none)."""
    status, stats = http(url.rstrip("/") + "/system_stats")
    argv = ((stats or {}).get("system") or {}).get("argv") or [] if status == 200 else []
    for i, a in enumerate(argv):
        if a == "--base-directory" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if a.startswith("--base-directory="):
            return Path(a.split("=", 1)[1])
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--workflow", default=str(DEFAULT_WORKFLOW), help="UI-format workflow (default: %(default)s)")
    ap.add_argument("--url", default="", help="a running ComfyUI (default: start the sandbox's own)")
    ap.add_argument("--base-dir", default=str(ROOT / ".comfy-base"), help="--base-directory of the server this script "
                    "starts (default: %(default)s)")
    ap.add_argument("--port", type=int, default=8188,
                    help="preferred port of the started server (a free one otherwise)")
    ap.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                    help="override an input, e.g. --set 5.iterations=4 or --set BranchGRPOTrainer.seed=1")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds before the run is interrupted")
    ap.add_argument("--summary", default="", help="also write the summary (paths, metrics) as JSON here")
    ap.add_argument("--print-api", action="store_true", help="print the converted API prompt and exit")
    args = ap.parse_args(argv)

    workflow = json.loads(Path(args.workflow).read_text())
    server = None
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            server = SandboxServer(Path(args.base_dir), port=args.port).start()
            url = server.url
        status, info = http(url + "/object_info", timeout=120)
        if status != 200:
            raise SystemExit(f"GET /object_info failed (HTTP {status})")
        prompt = ui_to_api(workflow, info)
        apply_overrides(prompt, args.set)
        if args.print_api:
            print(json.dumps(prompt, indent=1))
            return 0
        say(f"converted {Path(args.workflow).name} (UI format, {len(workflow['nodes'])} nodes) to an API prompt "
            f"of {len(prompt)} nodes")
        runner = Runner(url, prompt)
        t0 = time.monotonic()
        try:
            entry = runner.run(timeout=args.timeout)
        except RuntimeError as e:
            say(f"FAILED: {e}")
            return 1
        elapsed = time.monotonic() - t0
        base = Path(args.base_dir) if server else server_base_dir(url)
        summary = summarise(entry, prompt, base, runner.metrics)
        summary.update(seconds=elapsed, prompt_id=runner.prompt_id)
    finally:
        if server is not None:
            server.stop()
    say(f"done: the workflow ran in {elapsed:.0f} s ({elapsed / 60:.1f} min)")
    if "reward" in summary:
        r = summary["reward"]
        say(f"reward ({reward_label(prompt)}; mean of the first vs last {r['window']} of {r['iterations']} "
            "iterations): "
            f"{r['first']:.4f} -> {r['last']:.4f} ({r['gain']:+.4f})")
    for lo in summary["loras"]:
        say(f"LoRA:  {lo['path']}")
    for im in summary["images"]:
        say(f"image: {im['path']}  ({im['title']})")
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
