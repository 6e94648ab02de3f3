"""The live chart (web/branchgrpo.js) in ComfyUI's real frontend, in headless Chromium, against the real
server: the widget on the Trainer node, flat curves and missing values, a tiny training graph queued
from the page whose points appear as iterations finish, the history surviving page reloads (from
localStorage, and from GET /branchgrpo/runs/<run> when the browser has nothing), and a second tab
following the run through that route. No console errors.

Skipped with the reason when Chromium (/usr/bin/chromium) or Python playwright is missing.
"""
from __future__ import annotations

import time

import pytest

import tiny_models as tm
from browser_helpers import ComfyPage, browser_missing_reason, http_json, launch, wait_until
from comfy_server import PACK_NAME
from test_comfy_training import training_graph

pytestmark = pytest.mark.comfy
TRAINER = "app.graph.nodes.find((n) => n.type === 'BranchGRPOTrainer')"  # a JS expression
POINTS = f"() => {TRAINER}?.branchgrpoChart?.points ?? -1"


@pytest.fixture(scope="module")
def browser():
    reason = browser_missing_reason()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        b = launch(pw)
        yield b
        b.close()


@pytest.fixture
def page(browser, comfy):
    cp = ComfyPage(browser, comfy.url).open()
    yield cp
    cp.close()


@pytest.fixture(scope="module")
def models(comfy_base):
    paths = tm.write_all_tiny(comfy_base / "models")
    paths["clip_l"] = tm.write_random_clip_l(comfy_base / "models")
    return paths


def _numbered(graph: dict) -> dict:
    """The API graph with numeric node ids, as a graph made in the editor has."""
    ids = {k: str(i) for i, k in enumerate(graph, start=1)}
    out = {}
    for k, node in graph.items():
        inputs = {n: ([ids[v[0]], v[1]] if isinstance(v, list) and len(v) == 2 and v[0] in ids else v)
                  for n, v in node["inputs"].items()}
        out[ids[k]] = {**node, "inputs": inputs}
    return out


def _wait_queue_empty(url: str, timeout_s: float):
    def idle():
        status, q = http_json(url + "/queue")
        return status == 200 and not q["queue_running"] and not q["queue_pending"]
    wait_until(idle, timeout_s, interval=0.5, what="an empty queue")


def test_extension_is_served_and_adds_the_chart_to_trainer_nodes_only(page, comfy):
    status, _ = http_json(f"{comfy.url}/extensions/{PACK_NAME}/branchgrpo.js")
    assert status == 200
    res = page.js("""async () => {
      const t = LiteGraph.createNode('BranchGRPOTrainer'); app.graph.add(t);
      const s = LiteGraph.createNode('BranchGRPOBranchSchedule'); app.graph.add(s);
      const chart = t.branchgrpoChart;
      const backend = t.widgets.filter((w) => w.name !== 'branchgrpo_chart').length;
      const { output } = await app.graphToPrompt();
      return { chart: !!chart, widget: t.widgets.some((w) => w.name === 'branchgrpo_chart'),
               other: !!s.branchgrpoChart, run: chart?.run, saved: t.serialize().widgets_values.length, backend,
               inPrompt: Object.keys(output[String(t.id)]?.inputs ?? {}) };
    }""")
    assert res["chart"] and res["widget"] and not res["other"]
    assert res["run"] == "branchgrpo_run"
    assert res["saved"] == res["backend"], "the chart must not add a value to the saved widgets_values"
    assert "branchgrpo_chart" not in res["inPrompt"]
    assert not page.errors(), "\n".join(page.errors())


def test_flat_curves_missing_values_and_restarts_draw_without_errors(page):
    res = page.js("""async () => {
      const mod = await import('/extensions/ComfyUI-BranchGRPO/branchgrpo.js');
      const t = LiteGraph.createNode('BranchGRPOTrainer'); app.graph.add(t);
      t.widgets.find((w) => w.name === 'run_name').value = 'synthetic_flat';
      const { api } = window.comfyAPI.api;
      const flat = { reward_mean: 0.5, reward_max: 0.5, reward_min: 0.5, reward_std: 0, adv_std: 0, loss: null,
                     clipfrac: null, time_total: 0.1, reward_spread: 0, kl_ref: 0, grad_norm: null };
      const send = (i, metrics, tree) => api.dispatchCustomEvent('branchgrpo.metrics',
        { node: String(t.id), run: 'synthetic_flat', iteration: i, total: 5, metrics, tree });
      const tree = { widths: [1, 2, 2, 4, 4], leaf_rewards: [0.5, 0.5, 0.5, 0.5], forks: [0, 2] };
      // the held-out reward comes only on some iterations (a sparse series)
      send(1, { ...flat, eval_reward: 0.4 }, tree); send(2, flat, tree);
      send(3, { ...flat, reward_mean: null, eval_reward: 0.45 }, { widths: [], leaf_rewards: [] });
      const chart = t.branchgrpoChart;
      chart.draw();
      const after3 = [chart.points, chart.drawn];
      const panels = [...chart.panels];
      const kept = chart.record.history.map((p) => p.eval_reward);
      send(1, flat, tree);  // the same run started again from scratch
      chart.draw();
      const stored = JSON.parse(localStorage.getItem('branchgrpo.run.synthetic_flat'));
      chart.draw();
      return { after3, panels, kept, panelsRestart: [...chart.panels], afterRestart: chart.points,
               stored: stored.history.length,
               flat: mod.paddedRange([2, 2, 2]), zero: mod.paddedRange([0, 0]), empty: mod.paddedRange([null, NaN]),
               spread: mod.paddedRange([1, 3]), canvas: [chart.canvas.width, chart.canvas.height] };
    }""")
    assert res["after3"] == [3, 3]
    assert res["kept"] == [0.4, None, 0.45]
    # the four health panels, the held-out reward in the legend while the run has one
    assert res["panels"] == ["reward mean – best 0.5000 worst 0.5000 held-out 0.4500",
                             "reward spread within trees 0.0000", "clipped – KL to base 0.0000",
                             "grad norm (before clipping) –"]
    assert res["panelsRestart"][0] == "reward mean 0.5000 best 0.5000 worst 0.5000"
    assert res["afterRestart"] == 1 and res["stored"] == 1
    for lo, hi in (res["flat"], res["zero"], res["spread"]):
        assert lo < hi
    assert res["flat"][0] < 2 < res["flat"][1] and res["empty"] is None
    assert res["canvas"][0] > 0 and res["canvas"][1] > 0
    assert not page.errors(), "\n".join(page.errors())


def test_training_queued_from_the_page_charts_every_iteration_and_survives_reloads(page, browser, comfy, models,
                                                                                   tmp_path):
    iterations = 4
    run = f"browser_chart_{int(time.time())}"
    graph = _numbered(training_graph(models, run, iterations=iterations, lora_file=f"branchgrpo/{run}"))
    t0 = time.monotonic()
    page.js("async (g) => { await app.loadApiJson(g, 'browser_training.json'); }", graph)
    assert page.js(POINTS) == 0
    # the Trainer's previews (best | worst leaf) arrive as binary preview events addressed to its node
    page.js("""() => { window.__previews = [];
      window.comfyAPI.api.api.addEventListener('b_preview_with_metadata',
        (e) => window.__previews.push(String(e.detail.displayNodeId))); }""")
    page.js("() => app.queuePrompt(0, 1)")
    # another tab (its own websocket client id: no live events) with the same graph follows the checkpoint
    other = ComfyPage(browser, comfy.url).open()
    other.js("async (g) => { await app.loadApiJson(g, 'browser_training.json'); }", graph)

    # points appear one per finished iteration
    seen = [0]
    deadline = time.monotonic() + 240
    while seen[-1] < 2 and time.monotonic() < deadline:
        n = page.js(POINTS)
        if n != seen[-1]:
            seen.append(n)
        time.sleep(0.1)
    assert seen[-1] >= 2, f"chart points over time: {seen}"
    assert seen == sorted(seen) and len(seen) >= 2, seen
    t_first = time.monotonic() - t0
    trainer_id = page.js(f"() => String({TRAINER}.id)")
    previews = page.js("() => window.__previews")
    assert previews.count(trainer_id) >= 1 and set(previews) == {trainer_id}, (previews, trainer_id)
    assert page.js(f"() => (app.nodePreviewImages?.[{TRAINER}.id] ?? []).length") >= 1  # shown on the node

    # reload while the run goes on: the history is back at once (localStorage), later points keep coming
    before = page.js(POINTS)
    page.reload()
    page.wait_js(f"() => ({POINTS})() >= {before}", timeout_s=30)
    page.wait_js(f"() => ({POINTS})() === {iterations}", timeout_s=240)
    _wait_queue_empty(comfy.url, 120)
    chart = page.js(f"""() => {{ const c = {TRAINER}.branchgrpoChart; c.draw();
      return {{ run: c.run, drawn: c.drawn, tree: c.record.tree, last: c.record.history.at(-1), panels: c.panels,
                iterations: c.record.history.map((p) => p.iteration) }}; }}""")
    assert chart["run"] == run and chart["drawn"] == iterations
    assert chart["iterations"] == list(range(1, iterations + 1))
    assert chart["tree"]["widths"] == [1, 2, 2, 4, 4, 4, 4] and len(chart["tree"]["leaf_rewards"]) == 4
    kept = ("reward_mean", "reward_max", "reward_min", "adv_std", "reward_spread", "clipfrac", "grad_norm", "kl_ref")
    assert all(isinstance(chart["last"][k], (int, float)) for k in kept)
    assert chart["last"]["kl_ref"] > 0 and chart["last"]["grad_norm"] > 0 and chart["last"]["reward_spread"] >= 0
    assert [p.split(" ")[0] for p in chart["panels"]] == ["reward", "reward", "clipped", "grad"]
    shot = page.screenshot(tmp_path / "trainer_chart.png")
    assert shot.stat().st_size > 0

    other.wait_js(f"() => ({POINTS})() === {iterations}", timeout_s=30)
    assert not other.errors(), "\n".join(other.errors())
    other.close()

    # a browser that never saw the run (the pack's records gone from localStorage) gets the history from the
    # checkpoint; the frontend's own keys stay (frontend 1.49.6 keeps the open workflow there)
    status, body = http_json(f"{comfy.url}/branchgrpo/runs/{run}")
    assert status == 200 and [m["iteration"] for m in body["history"]] == list(range(1, iterations + 1))
    page.js("""() => Object.keys(localStorage).filter((k) => k.startsWith('branchgrpo.'))
      .forEach((k) => localStorage.removeItem(k))""")
    page.reload()
    page.wait_js(f"() => ({POINTS})() === {iterations}", timeout_s=30)
    assert not page.errors(), "\n".join(page.errors())
    print(f"first points after {t_first:.1f} s, whole test {time.monotonic() - t0:.1f} s")


def test_run_route_validates_the_run_name(comfy):
    for bad in ("..%2F..%2Fetc", "a%20b", "%2Eprofile", "x" * 80):
        status, body = http_json(f"{comfy.url}/branchgrpo/runs/{bad}")
        assert status in (400, 404), (bad, status, body)
    status, body = http_json(f"{comfy.url}/api/branchgrpo/runs/never_ran")
    assert status == 200 and body["history"] == []
