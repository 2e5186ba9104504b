// The egress map page: reads /api/v1/graph and /api/v1/flows, follows /api/v1/stream, and draws
// the graph as plain SVG (sources on the left, destinations on the right). No framework, no CDN.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const LEFT = 260, RIGHT = 640, WIDTH = 980, ROW = 26, TOP = 30;
const MAX_ROWS = 200; // recent flows kept in the table
const $ = (id) => document.getElementById(id);
let graph = { edges: [], namespaces: [], windows: [] };
let flows = [];
let stream = null;

function filters() {
  const q = new URLSearchParams();
  for (const id of ["window", "namespace", "decision", "tier"]) {
    const v = $(id).value.trim();
    if (v) q.set(id, v);
  }
  return q;
}

async function getJSON(url) {
  const r = await fetch(url, { credentials: "same-origin" });
  if (!r.ok) throw new Error(`${url}: ${r.status} ${await r.text()}`);
  return r.json();
}

function el(name, attrs, text) {
  const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function label(e) { return `${e.destination.host}:${e.destination.port}`; }

function fillSelect(select, values, show) {
  const current = select.value;
  const first = select.id === "namespace" ? [["", "all"]] : [];
  const options = first.concat(values.map((v) => [String(v), show(v)]));
  if (select.options.length === options.length &&
      options.every(([v], i) => select.options[i].value === v)) return;
  select.replaceChildren(...options.map(([v, t]) => new Option(t, v)));
  if (options.some(([v]) => v === current)) select.value = current;
}

function renderGraph() {
  fillSelect($("window"), graph.windows, (w) => (w >= 3600 && w % 3600 === 0 ? `${w / 3600}h` : `${w / 60}m`));
  fillSelect($("namespace"), graph.namespaces, (n) => n);
  const svg = $("graph");
  const sources = new Map(), dests = new Map();
  for (const e of graph.edges) {
    const s = `${e.source.namespace}/${e.source.app}`;
    sources.set(s, e.source);
    const d = dests.get(label(e)) || { edge: e, flows: 0, threats: [] };
    d.flows += e.flows;
    if (e.threats) d.threats.push(...e.threats);
    dests.set(label(e), d);
  }
  // Sources grouped by namespace, a heading row per namespace; destinations by flows.
  const srcRows = new Map();
  let row = 0, lastNs = null;
  const parts = [];
  for (const key of [...sources.keys()].sort()) {
    const src = sources.get(key);
    if (src.namespace !== lastNs) {
      parts.push(el("text", { class: "ns", x: 10, y: TOP + row * ROW }, `namespace ${src.namespace}`));
      lastNs = src.namespace; row += 1;
    }
    srcRows.set(key, TOP + row * ROW);
    parts.push(el("text", { class: "app", x: LEFT - 12, y: TOP + row * ROW + 4, "text-anchor": "end" }, src.app));
    parts.push(el("circle", { class: "node", cx: LEFT, cy: TOP + row * ROW, r: 5 }));
    row += 1;
  }
  const destRows = new Map();
  let drow = 0;
  for (const [key, d] of [...dests.entries()].sort((a, b) => b[1].flows - a[1].flows)) {
    const y = TOP + drow * ROW;
    destRows.set(key, y);
    const threat = d.threats.length > 0;
    const cls = threat ? "dest threat" : "dest";
    const feeds = [...new Set(d.threats.map((t) => t.feed))].join(", ");
    const t = el("text", { class: cls, x: RIGHT + 12, y: y + 4 }, threat ? `⚠ ${key} (${feeds})` : key);
    parts.push(t, el("circle", { class: threat ? "node threat" : "node", cx: RIGHT, cy: y, r: 5 }));
    drow += 1;
  }
  const measure = $("width").value;
  const size = (e) => (measure === "bytes" ? e.bytes_out + e.bytes_in : e.flows);
  const most = Math.max(1, ...graph.edges.map(size));
  for (const e of graph.edges) {
    const y1 = srcRows.get(`${e.source.namespace}/${e.source.app}`), y2 = destRows.get(label(e));
    const mid = (LEFT + RIGHT) / 2;
    const width = 1.5 + 8 * Math.log1p(size(e)) / Math.log1p(most);
    const path = el("path", {
      class: `edge ${e.decision}`,
      d: `M${LEFT},${y1} C${mid},${y1} ${mid},${y2} ${RIGHT},${y2}`,
      "stroke-width": width.toFixed(1),
      "data-source": `${e.source.namespace}/${e.source.app}`,
      "data-destination": label(e),
    });
    const rule = e.rule ? `, rule ${e.rule}` : "";
    path.append(el("title", {}, `${e.source.namespace}/${e.source.app} → ${label(e)}: ${e.flows} flows ` +
      `(${e.allowed} allowed, ${e.denied} denied, ${e.would_deny} would deny)${rule}; ` +
      `${e.bytes_out} B out, ${e.bytes_in} B in`));
    if (e.source.ip && !e.folded) path.addEventListener("click", () => explain(e.source.ip, label(e)));
    parts.unshift(path); // under the labels
  }
  const rows = Math.max(row, drow, 1);
  svg.setAttribute("viewBox", `0 0 ${WIDTH} ${TOP + rows * ROW}`);
  svg.replaceChildren(...parts);
  $("summary").textContent = `${graph.edges.length} edges, ${sources.size} sources, ${dests.size} destinations` +
    (graph.tracked_edges >= graph.max_edges ? ` (edge cap ${graph.max_edges} reached: the rest count as "other")` : "");
}

function renderFlows() {
  const body = $("flows").tBodies[0];
  body.replaceChildren(...flows.map((f) => {
    const tr = document.createElement("tr");
    const cells = [
      f.time ? f.time.replace("T", " ").slice(0, 19) : "",
      `${f.source.namespace}/${f.source.app} (${f.source.ip})`,
      `${f.destination.host}:${f.destination.port}`,
      f.decision,
      f.rule || "",
      f.reason,
      f.threats.map((t) => `${t.feed}: ${t.indicator}`).join(", "),
    ];
    for (const [i, c] of cells.entries()) {
      const td = document.createElement("td");
      td.textContent = c;
      if (i === 3) td.className = f.decision;
      tr.append(td);
    }
    tr.addEventListener("click", () => explain(f.source.ip, `${f.destination.host}:${f.destination.port}`));
    return tr;
  }));
}

async function explain(from, to) {
  const out = $("explain");
  out.textContent = `explaining ${from} → ${to} …`;
  try {
    const q = new URLSearchParams({ from, to });
    const r = await getJSON(`/api/v1/explain?${q}`);
    out.textContent = r.lines.join("\n");
  } catch (err) {
    out.textContent = String(err);
  }
}

function follow() {
  if (stream) stream.close();
  stream = null;
  // "#paused" freezes the view (and lets a headless browser finish loading: an open stream is a
  // request that never completes).
  if (location.hash === "#paused") {
    $("status").textContent = "paused (remove #paused from the address for live updates)";
    return;
  }
  if (!window.EventSource) return;
  const q = filters();
  q.set("after", flows.length ? flows[0].seq : 0);
  stream = new EventSource(`/api/v1/stream?${q}`);
  stream.addEventListener("open", () => { $("status").textContent = "live"; });
  stream.addEventListener("error", () => { $("status").textContent = "reconnecting…"; });
  stream.addEventListener("graph", (ev) => { graph = JSON.parse(ev.data); renderGraph(); });
  stream.addEventListener("flows", (ev) => {
    const fresh = JSON.parse(ev.data);
    flows = fresh.concat(flows.filter((f) => f.seq < fresh[fresh.length - 1].seq)).slice(0, MAX_ROWS);
    renderFlows();
  });
}

async function load() {
  try {
    const q = filters();
    graph = await getJSON(`/api/v1/graph?${q}`);
    flows = (await getJSON(`/api/v1/flows?${q}&limit=${MAX_ROWS}`)).flows;
    renderGraph();
    renderFlows();
    $("status").textContent = "loaded";
    follow();
  } catch (err) {
    $("status").textContent = String(err);
  }
}

for (const id of ["window", "namespace", "decision", "width"]) $(id).addEventListener("change", load);
$("tier").addEventListener("change", load);
window.addEventListener("hashchange", follow);
$("filters").addEventListener("submit", (ev) => { ev.preventDefault(); load(); });
load();
