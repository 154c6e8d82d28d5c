// braid dash page: polls the run list and the picked runs' metrics, draws them with Plotly.
//
// Metric names and panels come from /api/layout (braid.metrics.names), never from this file.
// Run names and ids are data: they reach the page only through textContent, and through
// plotText() (HTML entities) where Plotly draws them, so a name cannot add markup.
// URL parameters: run=ID (repeatable: runs picked at load), rank=R, poll=MS.
"use strict";

const params = new URLSearchParams(location.search);
const state = {
  layout: null,
  runs: [],
  picked: params.getAll("run"),
  rank: params.get("rank") || "0",
  data: new Map(), // run id -> last /api/data answer
  drawn: "", // signature of what the plots show, to skip identical redraws
  diffKey: "",
};
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b",
  "#e377c2", "#7f7f7f", "#bcbd22"];
// drag to zoom, double-click to reset; no mode bar over the titles
const PLOT_CONFIG = { displaylogo: false, responsive: true, displayModeBar: false };

function $(id) { return document.getElementById(id); }
function plotText(s) {
  return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}
function colorOf(runId) { return COLORS[state.picked.indexOf(runId) % COLORS.length]; }
function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}
function fmtDuration(s) {
  s = Math.max(0, Math.floor(s));
  const p = (n) => String(n).padStart(2, "0");
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${p(s % 60)}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h${p(Math.floor((s % 3600) / 60))}m`;
  return `${Math.floor(s / 86400)}d${p(Math.floor((s % 86400) / 3600))}h`;
}
async function getJSON(url) {
  const resp = await fetch(url, { cache: "no-store" });
  const body = await resp.json();
  if (!resp.ok) throw new Error(body.error || resp.statusText);
  return body;
}

// -- runs table and config diff --------------------------------------------------------------

function renderRuns() {
  const body = $("runs").querySelector("tbody");
  body.replaceChildren();
  $("no-runs").hidden = state.runs.length > 0;
  const now = Date.now() / 1000;
  for (const r of state.runs) {
    const tr = document.createElement("tr");
    const on = state.picked.includes(r.id);
    if (on) tr.className = "selected";
    const pick = document.createElement("input");
    pick.type = "checkbox";
    pick.checked = on;
    pick.addEventListener("change", () => toggle(r.id));
    const td = cell(tr, "");
    td.appendChild(pick);
    const name = cell(tr, "");
    if (on) {
      const sw = document.createElement("span");
      sw.className = "swatch";
      sw.style.background = colorOf(r.id);
      name.appendChild(sw);
    }
    name.appendChild(document.createTextNode(r.name && r.name !== r.id ? `${r.name} (${r.id})` : r.id));
    if (r.error) name.title = r.error;
    cell(tr, r.status, `status-${r.status}`);
    cell(tr, r.step == null ? "" : String(r.step), "num");
    cell(tr, r.last_loss == null ? "" : r.last_loss.toFixed(4), "num");
    cell(tr, r.start_time ? new Date(r.start_time * 1000).toLocaleString() : "");
    const end = r.end_time || (r.status === "running" ? now : r.heartbeat_time);
    cell(tr, r.start_time && end ? fmtDuration(end - r.start_time) : "", "num");
    cell(tr, r.world_size == null ? "" : String(r.world_size), "num");
    body.appendChild(tr);
  }
}

function toggle(runId) {
  const i = state.picked.indexOf(runId);
  if (i >= 0) state.picked.splice(i, 1);
  else state.picked.push(runId);
  const q = new URLSearchParams();
  for (const id of state.picked) q.append("run", id);
  if (state.rank !== "0") q.set("rank", state.rank);
  history.replaceState(null, "", `?${q}`);
  renderRuns();
  refreshData();
}

async function renderDiff() {
  const key = state.picked.join("\u0000");
  if (key === state.diffKey) return;
  state.diffKey = key;
  const box = $("diff");
  $("diff-section").hidden = state.picked.length < 2;
  box.replaceChildren();
  const base = state.picked[0];
  for (const other of state.picked.slice(1)) {
    let answer;
    try {
      answer = await getJSON(`api/diff?a=${encodeURIComponent(base)}&b=${encodeURIComponent(other)}`);
    } catch (e) {
      const p = document.createElement("p");
      p.textContent = `diff ${base} vs ${other}: ${e.message}`;
      box.appendChild(p);
      continue;
    }
    const table = document.createElement("table");
    const head = document.createElement("tr");
    for (const h of ["key", base, other]) {
      const th = document.createElement("th");
      th.textContent = h;
      head.appendChild(th);
    }
    table.appendChild(head);
    for (const d of answer.diff) {
      const tr = document.createElement("tr");
      cell(tr, d.key);
      cell(tr, d.a == null ? "" : JSON.stringify(d.a));
      cell(tr, d.b == null ? "" : JSON.stringify(d.b));
      table.appendChild(tr);
    }
    if (!answer.diff.length) {
      const tr = document.createElement("tr");
      cell(tr, "(same config)");
      table.appendChild(tr);
    }
    box.appendChild(table);
  }
}

// -- plots -------------------------------------------------------------------------------------

function axisLayout(title, logY, ys) {
  const finite = ys.filter((v) => v != null && isFinite(v));
  const lo = Math.min(...finite), hi = Math.max(...finite);
  const log = logY && finite.length && lo > 0 && hi / lo > 10;
  return {
    title: { text: title, font: { size: 14 } },
    margin: { l: 60, r: 20, t: 40, b: 40 },
    xaxis: { title: { text: "step" }, zeroline: false },
    yaxis: { type: log ? "log" : "linear", automargin: true },
    legend: { font: { size: 10 } },
    uirevision: "keep",
  };
}

function draw(id, traces, layout) {
  const div = $(id);
  div.hidden = traces.length === 0;
  if (traces.length) Plotly.react(div, traces, layout, PLOT_CONFIG);
  else Plotly.purge(div);
}

// Legend names: the metric for one run; the run id (and what the line is) for several.
function traceName(runId, what) {
  return state.picked.length > 1 ? `${plotText(runId)} ${what}`.trim() : what || "raw";
}

function lineTraces(runId, s, smooth, what) {
  const color = colorOf(runId);
  const smoothed = smooth && s.smooth && s.x.length >= 20;
  const raw = { x: s.x, y: s.y, name: traceName(runId, what), mode: "lines", type: "scatter",
    line: { color, width: smoothed ? 1 : 1.6 }, opacity: smoothed ? 0.35 : 1 };
  if (s.x.length < 20) { raw.mode = "lines+markers"; raw.marker = { size: 4 }; }
  const out = [raw];
  if (smoothed) {
    out.push({ x: s.x, y: s.smooth, name: traceName(runId, `${what} smoothed`.trim()),
      mode: "lines", type: "scatter", line: { color, width: 2 } });
  }
  return out;
}

function ensurePanel(gridId, id, tall) {
  if (!$(id)) {
    const div = document.createElement("div");
    div.className = tall ? "plot tall" : "plot";
    div.id = id;
    $(gridId).appendChild(div);
  }
  return id;
}

function drawAll() {
  const L = state.layout;
  const runs = state.picked.filter((id) => state.data.has(id)).map((id) => [id, state.data.get(id)]);
  // loss: train raw + smoothed, val with markers
  let traces = [], ys = [];
  for (const [id, d] of runs) {
    const train = d.series[L.loss.train], val = d.series[L.loss.val];
    if (train) { traces.push(...lineTraces(id, train, true, "train")); ys.push(...train.y); }
    if (val) {
      traces.push({ x: val.x, y: val.y, name: traceName(id, "val"),
        mode: "lines+markers", type: "scatter", line: { color: colorOf(id), dash: "dot", width: 2 },
        marker: { size: 6 } });
      ys.push(...val.y);
    }
  }
  draw("plot-loss", traces, axisLayout("Loss", true, ys));
  for (const p of L.panels) {
    traces = []; ys = [];
    for (const [id, d] of runs) {
      const s = d.series[p.metric];
      if (s) { traces.push(...lineTraces(id, s, p.smooth, "")); ys.push(...s.y); }
    }
    const title = `${p.title} <span style="font-size:11px;color:#888">${plotText(p.metric)}</span>`;
    draw(ensurePanel("series-grid", `plot-${p.key}`), traces, axisLayout(title, p.log_y, ys));
  }
  drawLoad(runs);
  drawOverlap(runs);
  traces = []; ys = [];
  for (const [id, d] of runs) {
    for (const name of Object.keys(d.series).sort()) {
      if (!name.startsWith(L.fp8_prefix)) continue;
      traces.push(...lineTraces(id, d.series[name], false, name.slice(L.fp8_prefix.length)));
      ys.push(...d.series[name].y);
    }
  }
  $("fp8-title").hidden = traces.length === 0;
  draw("plot-fp8", traces, axisLayout("FP8 numerics", true, ys));
}

function drawLoad(runs) {
  const wanted = new Set();
  const ratio = [];
  runs.forEach(([id, d], i) => {
    for (const l of d.load) {
      const pid = ensurePanel("load-grid", `plot-load-${i}-${l.layer}`, true);
      wanted.add(pid);
      const tag = runs.length > 1 ? `${plotText(id)}: ` : "";
      // white = the balanced share 1/E, red = overloaded (clipped at twice it), blue = idle
      draw(pid, [{ type: "heatmap", x: l.x, z: l.z, colorscale: "RdBu", zmin: 0,
        zmax: 2 / l.z.length, colorbar: { title: { text: "share" } } }],
        { ...axisLayout(`${tag}layer ${l.layer}: share of tokens per expert`, false, []),
          yaxis: { title: { text: "expert" } } });
      ratio.push({ x: l.imbalance.x, y: l.imbalance.y, type: "scatter", mode: "lines",
        name: `${tag}layer ${l.layer}`, line: { color: runs.length > 1 ? colorOf(id) : undefined } });
    }
  });
  if (ratio.length) wanted.add(ensurePanel("load-grid", "plot-imbalance"));
  for (const div of [...$("load-grid").children]) {
    if (!wanted.has(div.id)) { Plotly.purge(div); div.remove(); }
  }
  $("load-title").hidden = ratio.length === 0;
  if (ratio.length) {
    const lay = axisLayout("Expert imbalance: max / mean share (1 = balanced)", false, []);
    lay.shapes = [{ type: "line", xref: "paper", x0: 0, x1: 1, y0: 1, y1: 1,
      line: { color: "#999", dash: "dash", width: 1 } }];
    draw("plot-imbalance", ratio, lay);
  }
}

function drawOverlap(runs) {
  const traces = [];
  for (const [id, d] of runs) {
    if (!d.overlap.length) continue;
    const x = d.overlap.map((o) => `layer ${o.layer}`);
    const tag = runs.length > 1 ? `${plotText(id)} ` : "";
    traces.push({ type: "bar", x, y: d.overlap.map((o) => o.exposed_ms), name: `${tag}exposed ms`,
      offsetgroup: id, marker: { color: colorOf(id) } });
    traces.push({ type: "bar", x, y: d.overlap.map((o) => o.hidden_ms), name: `${tag}hidden ms`,
      offsetgroup: id, base: d.overlap.map((o) => o.exposed_ms),
      marker: { color: colorOf(id), opacity: 0.35 } });
  }
  $("overlap-title").hidden = traces.length === 0;
  const lay = axisLayout("Exchange time per layer: exposed vs hidden by compute (median ms)", false, []);
  lay.xaxis = {};
  lay.barmode = "group";
  draw("plot-overlap", traces, lay);
}

// -- polling -----------------------------------------------------------------------------------

async function refreshRuns() {
  try {
    state.runs = (await getJSON("api/runs")).runs;
    renderRuns();
    renderDiff();
  } catch (e) {
    $("status").textContent = `run list: ${e.message}`;
  }
}

async function refreshData() {
  const notes = [];
  await Promise.all(state.picked.map(async (id) => {
    try {
      const old = state.data.get(id);
      let url = `api/data?run=${encodeURIComponent(id)}&rank=${encodeURIComponent(state.rank)}`;
      if (old && old.read_at != null) url += `&have=${old.read_at}`; // "unchanged" if no news
      const d = await getJSON(url);
      if (!d.unchanged) state.data.set(id, d);
      if (d.note) notes.push(`${id}: ${d.note}`);
    } catch (e) {
      state.data.delete(id);
      notes.push(`${id}: ${e.message}`);
    }
  }));
  const box = $("notes");
  box.replaceChildren();
  for (const n of notes) {
    const p = document.createElement("p");
    p.textContent = n;
    box.appendChild(p);
  }
  const sig = JSON.stringify(state.picked.map((id) => [id, state.data.get(id)?.read_at]));
  if (sig !== state.drawn) {
    state.drawn = sig;
    drawAll();
  }
  $("status").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

async function loop(fn, ms) {
  for (;;) {
    await fn();
    await new Promise((r) => setTimeout(r, ms));
  }
}

async function main() {
  state.layout = await getJSON("api/layout");
  $("root").textContent = state.layout.root;
  const ms = Number(params.get("poll")) || state.layout.poll_ms;
  loop(refreshRuns, Math.max(ms, 1000));
  loop(refreshData, ms);
}

main();
