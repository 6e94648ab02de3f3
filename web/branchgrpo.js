// ComfyUI-BranchGRPO frontend extension: a live training chart on every Trainer (BranchGRPO) node.
//
// The Trainer streams one `branchgrpo.metrics` websocket event per iteration (nodes/trainer.py,
// ComfyProgress): {node, run, iteration, total, metrics: {reward_mean, reward_max, reward_min, reward_spread,
// clipfrac, kl_ref, grad_norm, eval_reward, ...}, tree: {widths, leaf_rewards, forks}}. The chart draws, per
// iteration, what says whether training is healthy: the reward (mean / best / worst, and the held-out ODE reward
// when the run evaluates), the reward's spread within trees before normalisation (the signal GRPO learns from),
// the fraction of clipped ratios with the KL to the base model (how far the update moves the policy), the
// gradient norm before clipping; and the latest tree (its splits, leaves coloured by reward).
// History is kept per run in localStorage and merged with the run's checkpoint history from
// GET /branchgrpo/runs/<run> (nodes/routes.py), so a page reload during (or after) a run loses nothing.
// Live events reach only the tab that queued the run; other tabs poll that route while the queue is busy.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPE = "BranchGRPOTrainer";
const EVENT = "branchgrpo.metrics";
const WIDGET = "branchgrpo_chart";
const RUN_KEY = "branchgrpo.run.";      // localStorage: RUN_KEY + run -> {history, tree, total, updated}
const NODE_KEY = "branchgrpo.nodes";    // localStorage: {"<graph id>/<node id>": run} (run of the last event)
const RUN_NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;  // the Trainer's run_name rule
const KEPT = ["iteration", "reward_mean", "reward_max", "reward_min", "reward_std", "adv_std", "loss",
  "clipfrac", "time_total", "reward_spread", "kl_ref", "kl", "grad_norm", "eval_reward", "eval_reward_std"];
const MAX_POINTS = 3000;   // per run, in memory and in localStorage
const MAX_RUNS = 24;       // runs kept in localStorage (least recently updated dropped first)
const MIN_HEIGHT = 480;

const runs = new Map();    // run -> {run, history: [{iteration, ...}], tree, total}
const charts = new Set();  // live chart objects (one per Trainer node on the canvas)
const fetched = new Map(); // run -> time of the last server fetch
const lastLive = new Map(); // run -> time of its last live event
const POLL_MS = 10000;      // while the queue runs, charts without live events poll the checkpoint
let pollTimer = 0;

// ------------------------------------------------------------------ numbers
const finite = (v) => typeof v === "number" && Number.isFinite(v);

/** [lo, hi] over the finite values, never of zero width (a flat curve gets a band around it). */
export function paddedRange(values) {
  let lo = Infinity, hi = -Infinity;
  for (const v of values) if (finite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  if (lo === Infinity) return null;
  const span = hi - lo;
  const pad = span > 1e-12 * Math.max(1, Math.abs(hi)) ? span * 0.08 : Math.max(Math.abs(hi) * 0.05, 0.5);
  return [lo - pad, hi + pad];
}

const fmt = (v) => {
  if (!finite(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
  return v.toFixed(a >= 100 ? 1 : a >= 1 ? 3 : 4);
};

function slim(iteration, metrics) {
  const out = { iteration };
  for (const k of KEPT) if (k !== "iteration") out[k] = finite(metrics?.[k]) ? metrics[k] : null;
  return out;
}

// ------------------------------------------------------------------ run store
function storage() {
  try { return window.localStorage; } catch { return null; }
}

function getRun(run) {
  let rec = runs.get(run);
  if (rec) return rec;
  rec = { run, history: [], tree: null, total: 0 };
  try {
    const saved = JSON.parse(storage()?.getItem(RUN_KEY + run) ?? "null");
    if (saved && Array.isArray(saved.history)) {
      rec.history = saved.history.filter((p) => p && finite(p.iteration));
      rec.tree = saved.tree ?? null;
      rec.total = finite(saved.total) ? saved.total : 0;
    }
  } catch { /* unreadable entry: start empty */ }
  runs.set(run, rec);
  return rec;
}

function saveRun(rec) {
  const ls = storage();
  if (!ls) return;
  const text = JSON.stringify({ history: rec.history.slice(-MAX_POINTS), tree: rec.tree, total: rec.total,
    updated: Date.now() });
  for (let attempt = 0; attempt < 3; attempt++) {
    try { ls.setItem(RUN_KEY + rec.run, text); pruneStorage(ls); return; } catch { pruneStorage(ls, 4); }
  }
}

function pruneStorage(ls, extra = 0) {
  const entries = [];
  for (let i = 0; i < ls.length; i++) {
    const key = ls.key(i);
    if (!key?.startsWith(RUN_KEY)) continue;
    let updated = 0;
    try { updated = JSON.parse(ls.getItem(key))?.updated ?? 0; } catch { /* broken: oldest */ }
    entries.push([updated, key]);
  }
  entries.sort((a, b) => a[0] - b[0]);
  const drop = Math.max(0, entries.length - MAX_RUNS) + extra;
  for (const [, key] of entries.slice(0, drop)) ls.removeItem(key);
}

/** One iteration from the live stream; a restarted run (iteration not after the last) drops the later points. */
function addPoint(rec, iteration, metrics) {
  const h = rec.history;
  while (h.length && h[h.length - 1].iteration >= iteration) h.pop();
  h.push(slim(iteration, metrics));
  if (h.length > MAX_POINTS) h.splice(0, h.length - MAX_POINTS);
}

/** The checkpoint's history is authoritative up to its iteration; later local points are kept only
 *  when both agree on the last shared iteration (otherwise the run was restarted meanwhile). */
function mergeServer(rec, serverHistory) {
  const server = serverHistory.map((m, i) => slim(finite(m.iteration) ? m.iteration : i + 1, m));
  if (!server.length) return false;
  const last = server[server.length - 1];
  const local = rec.history.find((p) => p.iteration === last.iteration);
  const agree = local && (local.reward_mean === last.reward_mean ||
    (finite(local.reward_mean) && finite(last.reward_mean) &&
      Math.abs(local.reward_mean - last.reward_mean) <= 1e-6 * Math.max(1, Math.abs(last.reward_mean))));
  const later = agree ? rec.history.filter((p) => p.iteration > last.iteration) : [];
  const before = JSON.stringify(rec.history);
  rec.history = server.concat(later).slice(-MAX_POINTS);
  return JSON.stringify(rec.history) !== before;
}

async function fetchRun(run, force = false) {
  if (!RUN_NAME.test(run)) return;
  const now = Date.now();
  if (!force && fetched.has(run) && now - fetched.get(run) < 5000) return;
  fetched.set(run, now);
  try {
    const res = await api.fetchApi(`/branchgrpo/runs/${encodeURIComponent(run)}`);
    if (!res.ok) return;
    const body = await res.json();
    const rec = getRun(run);
    if (Array.isArray(body?.history) && mergeServer(rec, body.history)) {
      saveRun(rec);
      redrawRun(run);
    }
  } catch { /* server without the route, or offline: the local history stays */ }
}

// ------------------------------------------------------------------ node <-> run
/** The key of a node in its root graph; null for a node not in a graph yet (then nothing is remembered: reading
 *  app.graph before the app is set up is an error in newer frontends). */
function graphKey(node) {
  const g = node.graph?.rootGraph ?? node.graph;
  return g ? `${g.id ?? ""}/${node.id}` : null;
}

function rememberNodeRun(node, run) {
  const ls = storage();
  if (!ls || graphKey(node) == null) return;
  try {
    const map = JSON.parse(ls.getItem(NODE_KEY) ?? "{}") || {};
    map[graphKey(node)] = run;
    const keys = Object.keys(map);
    for (const k of keys.slice(0, Math.max(0, keys.length - 200))) delete map[k];
    ls.setItem(NODE_KEY, JSON.stringify(map));
  } catch { /* storage full or disabled */ }
}

function rememberedNodeRun(node) {
  const key = graphKey(node);
  if (key == null) return null;
  try { return JSON.parse(storage()?.getItem(NODE_KEY) ?? "{}")?.[key] ?? null; } catch { return null; }
}

/** The run a Trainer node shows: its run_name widget, unless that input is linked (then the run of the
 *  node's last event), or an event named another run since the widget last changed. */
function nodeRun(node) {
  const chart = node.branchgrpoChart;
  if (chart?.override) return chart.override;
  const linked = node.inputs?.some((i) => i.name === "run_name" && i.link != null);
  const widget = node.widgets?.find((w) => w.name === "run_name");
  if (linked || !widget) return rememberedNodeRun(node) ?? (widget?.value || null);
  return widget.value || null;
}

function resolveNode(id, run) {
  const candidates = [];
  const walk = (graph, parts) => {
    if (!graph) return null;
    const head = parts[0];
    const node = graph.getNodeById?.(head) ?? graph.getNodeById?.(Number(head));
    if (parts.length === 1) return node;
    return walk(node?.subgraph, parts.slice(1));
  };
  if (id != null) candidates.push(walk(app.graph, String(id).split(":")));
  for (const chart of liveCharts()) if (nodeRun(chart.node) === run) candidates.push(chart.node);
  return candidates.find((n) => n && n.type === NODE_TYPE && n.branchgrpoChart) ?? null;
}

/** Charts of nodes that are in a graph (onRemoved drops the others from `charts`). */
function liveCharts() {
  return [...charts].filter((chart) => chart.node.graph);
}

function redrawRun(run) {
  for (const chart of liveCharts()) if (nodeRun(chart.node) === run) chart.draw();
}

// ------------------------------------------------------------------ drawing
const COLORS = {
  bg: "#16181c", frame: "#3a3f47", text: "#c9ced6", dim: "#7d8590", mean: "#f2f2f2",
  best: "#4cc38a", worst: "#e5534b", band: "rgba(76,195,138,0.13)", evalr: "#b48ef0", spread: "#39c5cf",
  clip: "#f0a35e", kl: "#d67ad6", grad: "#e0c85a",
  edge: "rgba(201,206,214,0.35)", fork: "rgba(240,163,94,0.35)",
};

/** Leaf colour for t in [0, 1]: red (worst) -> amber -> green (best). */
function rewardColor(t) {
  const stops = [[229, 83, 75], [240, 190, 80], [76, 195, 138]];
  const x = Math.min(1, Math.max(0, finite(t) ? t : 0.5)) * 2;
  const i = Math.min(1, Math.floor(x));
  const f = x - i;
  const c = stops[i].map((v, k) => Math.round(v + (stops[i + 1][k] - v) * f));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

/** A line over the finite values; a missing value lifts the pen, unless `sparse` (a series measured only on
 *  some iterations, such as the evaluation): then its points are joined and each is marked. */
function drawSeries(ctx, pts, key, xOf, yOf, color, width, sparse = false) {
  ctx.strokeStyle = color;
  ctx.fillStyle = color;
  ctx.lineWidth = width;
  ctx.beginPath();
  let pen = false, alone = [];
  pts.forEach((p, i) => {
    const v = p[key];
    if (!finite(v)) { if (!sparse) pen = false; return; }
    const x = xOf(p.iteration), y = yOf(v);
    if (pen) ctx.lineTo(x, y); else ctx.moveTo(x, y);
    const prev = pts[i - 1], next = pts[i + 1];
    if (sparse || (!finite(prev?.[key]) && !finite(next?.[key]))) alone.push([x, y]);
    pen = true;
  });
  ctx.stroke();
  const r = sparse ? width + 0.5 : width + 1.5;
  for (const [x, y] of alone) { ctx.beginPath(); ctx.arc(x, y, r, 0, 2 * Math.PI); ctx.fill(); }
}

function drawPanel(ctx, box, pts, series, title, legend, drawn = null) {
  const { x, y, w, h } = box;
  ctx.strokeStyle = COLORS.frame;
  ctx.lineWidth = 1;
  ctx.strokeRect(x + 0.5, y + 0.5, w - 1, h - 1);
  ctx.font = "11px sans-serif";
  ctx.textBaseline = "top";
  ctx.textAlign = "left";
  let lx = x + 5;
  if (title) { ctx.fillStyle = COLORS.dim; ctx.fillText(title, lx, y + 4); lx += ctx.measureText(title).width + 8; }
  drawn?.push([title, ...legend.map(([label]) => label)].filter(Boolean).join(" "));
  for (const [label, color] of legend) {
    ctx.fillStyle = color;
    ctx.fillText(label, lx, y + 4);
    lx += ctx.measureText(label).width + 10;
  }
  const ranged = series.map((s) => ({ ...s, range: paddedRange(s.keys.flatMap((k) => pts.map((p) => p[k]))) }));
  const gutter = (side) => Math.max(0, ...ranged.filter((s) => s.range && s.axis === side)
    .map((s) => Math.max(ctx.measureText(fmt(s.range[0])).width, ctx.measureText(fmt(s.range[1])).width) + 8));
  const gl = gutter("left"), gr = gutter("right");
  const inner = { x: x + 6 + gl, y: y + 22, w: w - 12 - gl - gr, h: h - 38 };
  if (!pts.length || inner.w < 4 || inner.h < 4) return;
  const x0 = pts[0].iteration, x1 = pts[pts.length - 1].iteration;
  const xOf = (it) => (x1 > x0 ? inner.x + (it - x0) / (x1 - x0) * inner.w : inner.x + inner.w / 2);
  ctx.fillStyle = COLORS.dim;
  ctx.textBaseline = "top";
  if (x1 > x0) {
    ctx.fillText(`it ${x0}`, inner.x, inner.y + inner.h + 3);
    ctx.textAlign = "right";
    ctx.fillText(`${x1}`, inner.x + inner.w, inner.y + inner.h + 3);
  } else {
    ctx.textAlign = "center";
    ctx.fillText(`it ${x0}`, inner.x + inner.w / 2, inner.y + inner.h + 3);
  }
  ctx.textAlign = "left";
  for (const s of ranged) {
    const range = s.range;
    if (!range) continue;
    const yOf = (v) => inner.y + inner.h - (v - range[0]) / (range[1] - range[0]) * inner.h;
    if (s.band) {
      const [lo, hi] = s.band;
      const band = pts.filter((p) => finite(p[lo]) && finite(p[hi]));
      if (band.length > 1) {
        ctx.fillStyle = COLORS.band;
        ctx.beginPath();
        band.forEach((p, i) => (i ? ctx.lineTo : ctx.moveTo).call(ctx, xOf(p.iteration), yOf(p[hi])));
        for (let i = band.length - 1; i >= 0; i--) ctx.lineTo(xOf(band[i].iteration), yOf(band[i][lo]));
        ctx.closePath();
        ctx.fill();
      }
    }
    for (const [key, color, width, sparse] of s.lines) drawSeries(ctx, pts, key, xOf, yOf, color, width, sparse);
    if (s.axis) {
      ctx.fillStyle = s.axisColor ?? COLORS.dim;
      const right = s.axis === "right";
      ctx.textAlign = right ? "left" : "right";
      const ax = right ? inner.x + inner.w + 4 : inner.x - 4;
      ctx.textBaseline = "top";
      ctx.fillText(fmt(range[1]), ax, inner.y - 2);
      ctx.textBaseline = "bottom";
      ctx.fillText(fmt(range[0]), ax, inner.y + inner.h + 2);
      ctx.textAlign = "left";
    }
  }
}

function drawTree(ctx, box, tree) {
  const { x, y, w, h } = box;
  ctx.strokeStyle = COLORS.frame;
  ctx.lineWidth = 1;
  ctx.strokeRect(x + 0.5, y + 0.5, w - 1, h - 1);
  ctx.font = "11px sans-serif";
  ctx.textBaseline = "top";
  ctx.fillStyle = COLORS.dim;
  const widths = (tree?.widths ?? []).map((v) => Math.max(0, Math.floor(Number(v) || 0)));
  if (widths.length < 1 || !widths.some((v) => v > 0)) {
    ctx.fillText("latest tree: none yet", x + 5, y + 4);
    return;
  }
  const rewards = (tree.leaf_rewards ?? []).map(Number);
  const range = paddedRange(rewards);
  let lo = Infinity, hi = -Infinity;
  for (const r of rewards) if (finite(r)) { lo = Math.min(lo, r); hi = Math.max(hi, r); }
  const nLeaves = widths[widths.length - 1];
  ctx.fillText(`latest tree: ${widths.length - 1} steps, ${nLeaves} leaves` +
    (lo <= hi ? `, reward ${fmt(lo)} … ${fmt(hi)}` : ""), x + 5, y + 4);
  const inner = { x: x + 12, y: y + 22, w: w - 40, h: h - 30 };
  if (inner.w < 4 || inner.h < 4) return;
  const D = widths.length - 1;
  const colX = (d) => inner.x + (D ? d / D : 0.5) * inner.w;
  const rowY = (d, k) => inner.y + (k + 0.5) / Math.max(1, widths[d]) * inner.h;
  const forks = new Set((tree.forks ?? []).map(Number));
  ctx.strokeStyle = COLORS.fork;
  ctx.setLineDash([3, 3]);
  for (const f of forks) {
    if (f < 0 || f >= D) continue;
    ctx.beginPath();
    ctx.moveTo(colX(f) + 0.5, inner.y);
    ctx.lineTo(colX(f) + 0.5, inner.y + inner.h);
    ctx.stroke();
  }
  ctx.setLineDash([]);
  const total = widths.reduce((a, b) => a + b, 0);
  if (total <= 4096) {  // edges: child k of depth d+1 hangs from node floor(k * w_d / w_{d+1}) of depth d
    ctx.strokeStyle = COLORS.edge;
    ctx.lineWidth = 1;
    ctx.beginPath();
    for (let d = 0; d < D; d++) {
      if (!widths[d] || !widths[d + 1]) continue;
      for (let k = 0; k < widths[d + 1]; k++) {
        const p = Math.min(widths[d] - 1, Math.floor(k * widths[d] / widths[d + 1]));
        ctx.moveTo(colX(d), rowY(d, p));
        ctx.lineTo(colX(d + 1), rowY(d + 1, k));
      }
    }
    ctx.stroke();
  }
  const dot = Math.max(1, Math.min(4, inner.h / Math.max(1, nLeaves) / 2.5));
  ctx.fillStyle = COLORS.dim;
  for (let d = 0; d < D; d++) {
    if (widths[d] > 512) continue;
    for (let k = 0; k < widths[d]; k++) { ctx.beginPath(); ctx.arc(colX(d), rowY(d, k), 1.5, 0, 2 * Math.PI); ctx.fill(); }
  }
  for (let k = 0; k < nLeaves; k++) {
    const r = rewards[k];
    ctx.fillStyle = range && finite(r) ? rewardColor((r - range[0]) / (range[1] - range[0])) : COLORS.dim;
    ctx.beginPath();
    ctx.arc(colX(D), rowY(D, k), dot + 1, 0, 2 * Math.PI);
    ctx.fill();
  }
  // colour scale of the leaves
  const sx = inner.x + inner.w + 14, sh = inner.h;
  for (let i = 0; i < sh; i++) { ctx.fillStyle = rewardColor(1 - i / sh); ctx.fillRect(sx, inner.y + i, 6, 1); }
}

// ------------------------------------------------------------------ the widget
function makeChart(node) {
  const element = document.createElement("div");
  element.className = "branchgrpo-chart";
  Object.assign(element.style, { width: "100%", height: "100%", minHeight: `${MIN_HEIGHT}px`, boxSizing: "border-box",
    background: COLORS.bg, borderRadius: "4px", overflow: "hidden" });
  const canvas = document.createElement("canvas");
  Object.assign(canvas.style, { width: "100%", height: "100%", display: "block" });
  element.appendChild(canvas);

  const chart = {
    node, element, canvas, override: null, drawn: 0, panels: [],
    get run() { return nodeRun(node); },
    get record() { const run = nodeRun(node); return run ? getRun(run) : null; },
    /** Points currently charted (the tests read this). */
    get points() { return this.record?.history.length ?? 0; },
    draw() {
      // layout size (CSS px of the node, before the canvas zoom) for the drawing; the bitmap follows
      // the on-screen size so the chart stays sharp when zoomed in
      const w = Math.max(1, element.clientWidth || 400), h = Math.max(1, element.clientHeight || MIN_HEIGHT);
      const rect = element.getBoundingClientRect();
      const zoom = rect.width > 0 ? Math.min(4, Math.max(0.5, rect.width / w)) : 1;
      const scale = (window.devicePixelRatio || 1) * zoom;
      if (canvas.width !== Math.round(w * scale) || canvas.height !== Math.round(h * scale)) {
        canvas.width = Math.round(w * scale);
        canvas.height = Math.round(h * scale);
      }
      const ctx = canvas.getContext("2d");
      if (!ctx) return;
      ctx.setTransform(scale, 0, 0, scale, 0, 0);
      ctx.clearRect(0, 0, w, h);
      ctx.fillStyle = COLORS.bg;
      ctx.fillRect(0, 0, w, h);
      const rec = this.record;
      const pts = rec?.history ?? [];
      this.drawn = pts.length;
      const last = pts[pts.length - 1];
      ctx.font = "12px sans-serif";
      ctx.textBaseline = "top";
      ctx.fillStyle = COLORS.text;
      const head = rec ? `run ${rec.run}` + (last ? ` · iteration ${last.iteration}` +
        (rec.total ? `/${rec.total}` : "") : " · no iterations yet") : "set run_name to see the run's chart";
      ctx.fillText(head, 6, 5);
      const pad = 4, top = 22, avail = h - top - pad;
      const shares = [0.27, 0.15, 0.17, 0.15];  // reward, spread, clip + KL, gradient; the tree gets the rest
      const heights = shares.map((f) => Math.round(avail * f));
      const hTree = avail - heights.reduce((a, b) => a + b, 0) - 4 * pad;
      const boxes = [];
      let y = top;
      for (const hp of heights) { boxes.push({ x: pad, y, w: w - 2 * pad, h: hp }); y += hp + pad; }
      const hasEval = pts.some((p) => finite(p.eval_reward));
      const klKey = pts.some((p) => finite(p.kl_ref)) ? "kl_ref" : "kl";  // runs before the KL measurement
      const lastOf = (key) => { for (let i = pts.length - 1; i >= 0; i--) if (finite(pts[i][key])) return pts[i][key]; };
      this.panels = [];
      drawPanel(ctx, boxes[0], pts,
        [{ keys: ["reward_mean", "reward_max", "reward_min", ...(hasEval ? ["eval_reward"] : [])],
          band: ["reward_min", "reward_max"], axis: "left",
          lines: [["reward_max", COLORS.best, 1], ["reward_min", COLORS.worst, 1], ["eval_reward", COLORS.evalr, 1.5, true],
            ["reward_mean", COLORS.mean, 2]] }],
        "reward", [[`mean ${fmt(last?.reward_mean)}`, COLORS.mean], [`best ${fmt(last?.reward_max)}`, COLORS.best],
          [`worst ${fmt(last?.reward_min)}`, COLORS.worst],
          ...(hasEval ? [[`held-out ${fmt(lastOf("eval_reward"))}`, COLORS.evalr]] : [])], this.panels);
      drawPanel(ctx, boxes[1], pts,
        [{ keys: ["reward_spread"], axis: "left", axisColor: COLORS.spread, lines: [["reward_spread", COLORS.spread, 1.5]] }],
        "", [[`reward spread within trees ${fmt(last?.reward_spread)}`, COLORS.spread]], this.panels);
      drawPanel(ctx, boxes[2], pts,
        [{ keys: ["clipfrac"], axis: "left", axisColor: COLORS.clip, lines: [["clipfrac", COLORS.clip, 1.5]] },
          { keys: [klKey], axis: "right", axisColor: COLORS.kl, lines: [[klKey, COLORS.kl, 1.5]] }],
        "", [[`clipped ${fmt(last?.clipfrac)}`, COLORS.clip],
          [`${klKey === "kl_ref" ? "KL to base" : "KL term"} ${fmt(last?.[klKey])}`, COLORS.kl]], this.panels);
      drawPanel(ctx, boxes[3], pts,
        [{ keys: ["grad_norm"], axis: "left", axisColor: COLORS.grad, lines: [["grad_norm", COLORS.grad, 1.5]] }],
        "", [[`grad norm (before clipping) ${fmt(last?.grad_norm)}`, COLORS.grad]], this.panels);
      drawTree(ctx, { x: pad, y, w: w - 2 * pad, h: Math.max(0, hTree) },
        rec?.tree);
    },
  };
  let frame = 0;
  chart.schedule = () => {
    if (frame) return;
    frame = requestAnimationFrame(() => { frame = 0; chart.draw(); });
  };
  if (typeof ResizeObserver !== "undefined") {
    chart.observer = new ResizeObserver(() => chart.schedule());
    chart.observer.observe(element);
  }
  chart.dispose = () => { chart.observer?.disconnect(); charts.delete(chart); };
  return chart;
}

function attachChart(node) {
  if (node.branchgrpoChart) return node.branchgrpoChart;
  const chart = makeChart(node);
  node.branchgrpoChart = chart;
  const widget = node.addDOMWidget(WIDGET, "branchgrpo-chart", chart.element, {
    serialize: false, hideOnZoom: false, getValue: () => undefined, setValue: () => {},
    getMinHeight: () => MIN_HEIGHT,
  });
  widget.serialize = false;  // not in widgets_values: saved workflows stay as the backend defines them
  chart.widget = widget;
  charts.add(chart);
  const runWidget = node.widgets?.find((w) => w.name === "run_name");
  if (runWidget) {
    const callback = runWidget.callback;
    runWidget.callback = function (...args) {
      chart.override = null;
      const run = nodeRun(node);
      if (run) fetchRun(run);
      chart.schedule();
      return callback?.apply(this, args);
    };
  }
  const onRemoved = node.onRemoved;
  node.onRemoved = function (...args) {
    chart.dispose();
    return onRemoved?.apply(this, args);
  };
  const [w, h] = node.size;
  node.setSize?.([Math.max(w, 420), h]);
  return chart;
}

/** Live events go only to the browser tab that queued the run; other tabs (or a new session) follow the
 *  run through its checkpoint while the queue is busy. */
function pollRuns() {
  const now = Date.now();
  const wanted = new Set();
  for (const chart of liveCharts()) {
    const run = nodeRun(chart.node);
    if (run && now - (lastLive.get(run) ?? 0) > POLL_MS) wanted.add(run);
  }
  for (const run of wanted) fetchRun(run, true);
}

let queueBusy = null;  // unknown until the first status
function onStatus(event) {
  const remaining = event?.detail?.exec_info?.queue_remaining;
  if (!finite(remaining)) return;
  const busy = remaining > 0;
  if (busy && !pollTimer) pollTimer = setInterval(pollRuns, POLL_MS);
  if (!busy && pollTimer) { clearInterval(pollTimer); pollTimer = 0; }
  if (!busy && queueBusy !== false) pollRuns();  // the last iterations of a run that just ended
  queueBusy = busy;
}

function onMetrics(event) {
  const data = event?.detail;
  if (!data || typeof data.run !== "string" || !finite(Number(data.iteration))) return;
  const rec = getRun(data.run);
  const iteration = Number(data.iteration);
  lastLive.set(data.run, Date.now());
  const gap = rec.history.length && iteration > rec.history[rec.history.length - 1].iteration + 1;
  addPoint(rec, iteration, data.metrics ?? {});
  if (data.tree) rec.tree = data.tree;
  if (finite(Number(data.total))) rec.total = Number(data.total);
  saveRun(rec);
  const node = resolveNode(data.node, data.run);
  if (node) {
    const chart = node.branchgrpoChart;
    if (nodeRun(node) !== data.run) chart.override = data.run;
    rememberNodeRun(node, data.run);
  }
  if (gap || (rec.history.length === 1 && iteration > 1)) fetchRun(data.run, true);
  redrawRun(data.run);
}

app.registerExtension({
  name: "BranchGRPO.LiveChart",
  setup() {
    api.addEventListener(EVENT, onMetrics);
    api.addEventListener("status", onStatus);
    // the websocket's first status may come before this listener: ask once
    api.fetchApi("/prompt").then((r) => (r.ok ? r.json() : null)).then((d) => d && onStatus({ detail: d }))
      .catch(() => {});
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_TYPE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const r = onNodeCreated?.apply(this, args);
      attachChart(this);
      return r;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (...args) {
      const r = onConfigure?.apply(this, args);
      const chart = attachChart(this);
      const run = nodeRun(this);
      if (run) fetchRun(run);
      chart.schedule();
      return r;
    };
  },
});
