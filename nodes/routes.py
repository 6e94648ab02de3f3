"""Server route of the pack: a run's metrics history, so the live chart on the Trainer node survives
page reloads (web/branchgrpo.js). GET /branchgrpo/runs/{run} (also under /api/) reads
output/branchgrpo/<run>/checkpoint.pt and answers ``{"run", "iteration", "history": [metrics, ...]}``
(an empty history when the run has no checkpoint yet; HTTP 400 for a name that is not a plain folder name).
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
from . import comfy_core as core

log = logging.getLogger("BranchGRPO")
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # the Trainer's run_name rule
_cache: dict[str, tuple[tuple[int, int], dict]] = {}  # path -> ((mtime_ns, size), answer)


def _clean(value):
    """JSON-safe: finite numbers stay, NaN/inf become null, strings stay, the rest is dropped."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, str):
        return value
    return None


def read_history(path: str) -> dict:
    """The run's history from its checkpoint (tensors memory-mapped, never read); cached by mtime."""
    st = os.stat(path)
    key = (st.st_mtime_ns, st.st_size)
    hit = _cache.get(path)
    if hit and hit[0] == key:
        return hit[1]
    import torch
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    history = json.loads(state.get("history") or "[]", parse_constant=lambda _: None)
    history = [{k: _clean(v) for k, v in m.items()} for m in history if isinstance(m, dict)]
    answer = {"iteration": int(state.get("iteration", len(history))), "history": history}
    _cache[path] = (key, answer)
    return answer


def register() -> None:
    try:
        from aiohttp import web
        routes = core.prompt_server().routes
    except Exception:  # not inside a ComfyUI server
        return

    @routes.get("/branchgrpo/runs/{run}")
    async def branchgrpo_run_history(request):
        run = request.match_info["run"]
        if not RUN_NAME.match(run):
            return web.json_response({"error": "invalid run name: use letters, digits, '_', '.' or '-'"},
                                     status=400)
        path = os.path.join(core.folder_paths.get_output_directory(), "branchgrpo", run, "checkpoint.pt")
        if not os.path.isfile(path):  # not (yet) a run: an empty history, not an error the browser logs
            return web.json_response({"run": run, "iteration": 0, "history": []})
        try:
            answer = await asyncio.to_thread(read_history, path)
        except Exception as e:  # a foreign or half-migrated file: say so, do not crash the route
            log.warning("BranchGRPO: cannot read the history of %s: %s", path, e)
            return web.json_response({"error": f"cannot read the checkpoint of run {run!r}"}, status=500)
        return web.json_response({"run": run, **answer})


register()
