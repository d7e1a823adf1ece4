// vislens view: the page. Vanilla JS, no dependencies, no network beyond this server.
"use strict";

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, text = null) => {
  const svg = ["svg", "rect", "line", "polyline", "circle", "text", "g", "path", "title"].includes(tag);
  const e = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== null) e.textContent = text;
  return e;
};
const lut = (hex) => Array.from({ length: 256 }, (_, i) =>
  [0, 2, 4].map((o) => parseInt(hex.substr(6 * i + o, 2), 16)));
const SEQ = lut(VIRIDIS), DIV = lut(RDBU);

const state = {
  meta: null, a: null, b: null, layer: 0, head: "mean", scale: "share", row: null,
  sample: null, share: {}, auroc: {}, range: "robust", mapsToken: 0, listToken: 0,
};

async function api(path, params = {}) {
  const url = new URL("api/" + path, location.href);
  for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== "") url.searchParams.set(k, v);
  const r = await fetch(url);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function showError(err) {
  const box = $("#error");
  box.textContent = String(err.message || err);
  box.hidden = false;
}
const clearError = () => { $("#error").hidden = true; };
const fmt = (v, d = 3) => (v === null || v === undefined ? "–" : Number(v).toFixed(d));
const label = (name) => (state.meta.conditions.find((c) => c.name === name) || { label: name }).label;

// ------------------------------------------------------------------ set-up

async function init() {
  try {
    state.meta = await api("meta");
  } catch (err) { showError(err); return; }
  const m = state.meta;
  $("#file-info").textContent = `${m.file} · ${m.model || "model ?"} · ${m.n_samples} samples · ` +
    `${m.num_layers} layers × ${m.num_heads} heads · grid ${m.grid}×${m.grid}` + (m.complete ? "" : " · working file (incomplete)");
  for (const sel of ["#cond-a", "#cond-b"])
    for (const c of m.conditions) $(sel).append(el("option", { value: c.name }, `${c.label} (${c.done})`));
  state.a = m.baseline;
  state.b = (m.conditions.find((c) => c.name !== m.baseline) || m.conditions[0]).name;
  $("#cond-a").value = state.a; $("#cond-b").value = state.b;
  for (const r of m.relations) $("#f-relation").append(el("option", { value: r }, r));
  $("#head").append(el("option", { value: "mean" }, "mean over heads"));
  for (let h = 0; h < m.num_heads; h++) $("#head").append(el("option", { value: String(h) }, `head ${h}`));
  const slider = $("#layer");
  slider.max = String(m.num_layers - 1);
  state.layer = Math.floor(m.num_layers / 2);
  slider.value = String(state.layer);
  $("#layer-value").textContent = String(state.layer);
  paintBar($("#bar-seq"), SEQ); paintBar($("#bar-div"), DIV);

  slider.addEventListener("input", () => setLayer(Number(slider.value)));
  $("#head").addEventListener("change", (e) => { state.head = e.target.value; loadMaps(); });
  $("#scale").addEventListener("change", (e) => { state.scale = e.target.value; loadMaps(); });
  $("#range").addEventListener("change", (e) => { state.range = e.target.value; loadMaps(); });
  $("#show-image").addEventListener("change", () => drawSample());
  $("#cond-a").addEventListener("change", (e) => { state.a = e.target.value; conditionsChanged(); });
  $("#cond-b").addEventListener("change", (e) => { state.b = e.target.value; conditionsChanged(); });
  for (const id of ["#f-relation", "#f-outcome", "#f-changed", "#f-cmin", "#f-cmax"])
    $(id).addEventListener("change", () => loadList());
  document.addEventListener("keydown", (e) => { // j/k or ↓/↑: next / previous sample in the list
    if (e.target.closest("input, select, textarea")) return;
    const step = { ArrowDown: 1, j: 1, ArrowUp: -1, k: -1 }[e.key];
    if (!step) return;
    const items = [...document.querySelectorAll("#sample-list .item")];
    const at = items.findIndex((it) => Number(it.dataset.row) === state.row);
    const next = items[Math.max(0, Math.min(items.length - 1, at + step))];
    if (next) { e.preventDefault(); next.scrollIntoView({ block: "nearest" }); selectSample(Number(next.dataset.row)); }
  });
  await loadList(true);
  loadCharts();
}

function paintBar(canvas, table) {
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(256, 1);
  table.forEach(([r, g, b], i) => img.data.set([r, g, b, 255], 4 * i));
  ctx.putImageData(img, 0, 0);
}

function conditionsChanged() {
  loadList();
  if (state.row !== null) { drawResults(); drawAnswers(); loadMaps(); }
  loadCharts();
}

function setLayer(layer) {
  state.layer = layer;
  $("#layer").value = String(layer);
  $("#layer-value").textContent = String(layer);
  drawCharts();
  loadMaps();
}

// ------------------------------------------------------------------ sample list

async function loadList(selectFirst = false) {
  const token = ++state.listToken;
  let res;
  try {
    res = await api("samples", {
      condition: state.b, base: state.a, relation: $("#f-relation").value, outcome: $("#f-outcome").value,
      changed: $("#f-changed").value, cmin: $("#f-cmin").value, cmax: $("#f-cmax").value,
    });
  } catch (err) { showError(err); return; }
  if (token !== state.listToken) return;
  clearError();
  const list = $("#sample-list");
  list.replaceChildren();
  $("#list-count").textContent = `${res.total} of ${res.of} samples done under “${label(res.condition)}”` +
    (res.shown < res.total ? ` (first ${res.shown} shown)` : "");
  for (const s of res.samples) {
    const item = el("div", { class: "item", role: "option", "data-row": String(s.row) });
    item.append(el("span", { class: "mark " + (s.correct ? "ok" : "bad") }, s.correct ? "✓" : "✗"),
      el("span", { class: "id", title: s.id }, s.id), el("span", { class: "conf" }, fmt(s.confidence, 2)));
    const sub = el("span", { class: "sub" }, `${s.relation} · gold ${s.answer} · pred ${s.prediction}`);
    if (s.changed) sub.append(el("span", { class: "changed", title: `before: ${s.base_prediction}` }, ` · was ${s.base_prediction}`));
    item.append(sub);
    if (s.row === state.row) item.classList.add("selected");
    item.addEventListener("click", () => selectSample(s.row));
    list.append(item);
  }
  if (selectFirst && res.samples.length) selectSample(res.samples[0].row);
}

async function selectSample(row) {
  state.row = row;
  for (const it of document.querySelectorAll("#sample-list .item"))
    it.classList.toggle("selected", Number(it.dataset.row) === row);
  try {
    state.sample = await api("sample", { row });
  } catch (err) { showError(err); return; }
  if (state.row !== row) return;
  clearError();
  drawSample();
  drawResults();
  drawAnswers();
  loadMaps();
}

// ------------------------------------------------------------------ the sample

function drawSample() {
  const s = state.sample;
  if (!s) return;
  const q = $("#question");
  q.replaceChildren(el("b", {}, s.question + " "), el("span", { class: "gold" },
    `gold: ${s.answer} · options: ${s.options.join(", ")} · ${s.id}`));
  const showImage = $("#show-image").checked && s.image_url;
  const note = $("#image-note");
  note.hidden = !s.image_note;
  note.textContent = s.image_note ? `${s.image_note}: showing the attention map without the image` : "";
  const w = s.width > 0 ? s.width : state.meta.grid, h = s.height > 0 ? s.height : state.meta.grid;
  for (const id of ["#panel-a", "#panel-b", "#panel-d"]) {
    const stage = $(id + " .stage");
    stage.style.aspectRatio = `${w} / ${h}`;
    stage.classList.toggle("no-image", !showImage);
    const img = $(id + " .photo");
    if (showImage) {
      img.onerror = () => {
        note.hidden = false;
        note.textContent = `image ${s.image_path} could not be loaded: showing the attention map without the image`;
        stage.classList.add("no-image");
      };
      if (img.getAttribute("src") !== s.image_url) img.src = s.image_url;
    } else img.removeAttribute("src");
    drawBoxes($(id + " .boxes"), s, w, h);
  }
}

function drawBoxes(svg, s, w, h) {
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("preserveAspectRatio", "none");
  if (!(s.width > 0 && s.height > 0)) return; // boxes are in pixels of a known image size
  const fs = Math.max(w, h) * 0.045;
  for (const b of s.boxes) {
    const r = { x: b.x0, y: b.y0, width: Math.max(0, b.x1 - b.x0), height: Math.max(0, b.y1 - b.y0),
                "vector-effect": "non-scaling-stroke" };
    svg.append(el("rect", { ...r, class: "outer" }), el("rect", { ...r, class: "inner" }));
    svg.append(el("text", { x: b.x0 + fs * 0.2, y: Math.max(fs, b.y0 - fs * 0.25), "font-size": fs,
                            "stroke-width": fs * 0.12 }, b.label));
  }
}

function answerLine(c) {
  const r = state.sample && state.sample.results[c];
  if (!r || !r.done) return [el("span", { class: "k" }, "not done under this condition")];
  return [el("span", { class: "k" }, "prediction "), el("b", { class: "pred" }, r.prediction || "(empty)"), " ",
    el("span", { class: "mark " + (r.correct ? "ok" : "bad") }, r.correct ? "✓" : "✗"),
    el("span", { class: "k" }, " · confidence "), el("span", { class: "conf" }, fmt(r.confidence)),
    el("span", { class: "k" }, ` · gold ${state.sample.answer}`)];
}

function drawAnswers() {
  $("#panel-a figcaption").textContent = `before: ${label(state.a)}`;
  $("#panel-b figcaption").textContent = `after: ${label(state.b)}`;
  $("#answer-a").replaceChildren(...answerLine(state.a));
  $("#answer-b").replaceChildren(...answerLine(state.b));
}

function drawResults() {
  const s = state.sample, body = $("#results tbody");
  body.replaceChildren();
  for (const c of state.meta.conditions) {
    const r = s.results[c.name];
    const tr = el("tr", { "data-condition": c.name });
    if (c.name === state.a) tr.classList.add("is-a");
    if (c.name === state.b) tr.classList.add("is-b");
    tr.append(el("td", {}, c.label));
    if (!r.done) { tr.append(el("td", { colspan: "5", class: "k" }, "not done")); body.append(tr); continue; }
    tr.append(el("td", { class: "pred" }, r.prediction || "(empty)"),
      el("td", { class: "mark " + (r.correct ? "ok" : "bad") }, r.correct ? "✓" : "✗"),
      el("td", { class: "num conf" }, fmt(r.confidence)), el("td", { class: "num alpha" }, fmt(r.alpha_used, 2)));
    const probs = el("td", { class: "probs" });
    s.options.forEach((o, i) => {
      const p = r.option_probs[i];
      const span = el("span", { class: "prob" + (o === s.answer ? " gold" : ""), "data-option": o });
      const bar = el("span", { class: "bar" }); const fill = el("i");
      fill.style.width = `${Math.round(100 * Math.max(0, Math.min(1, p || 0)))}%`;
      bar.append(fill);
      span.append(`${o} `, bar, el("span", { class: "p" }, fmt(p)));
      probs.append(span);
    });
    tr.append(probs);
    body.append(tr);
  }
}

// ------------------------------------------------------------------ maps

async function loadMaps() {
  if (state.row === null) return;
  const token = ++state.mapsToken;
  const want = { row: state.row, a: state.a, b: state.b, layer: state.layer, head: state.head, scale: state.scale, range: state.range };
  let res;
  try {
    res = await api("maps", want);
  } catch (err) { showError(err); return; }
  if (token !== state.mapsToken) return; // a newer request (slider moved on) wins
  clearError();
  const key = [want.row, want.layer, want.head, want.scale].join("|");
  drawHeat($("#heat-a"), res.a.values, res.vmax, false, `${key}|${want.a}`);
  drawHeat($("#heat-b"), res.b.values, res.vmax, false, `${key}|${want.b}`);
  drawHeat($("#heat-d"), res.diff.values, res.dmax, true, `${key}|${want.a}>${want.b}`);
  const notes = [["#note-a", res.a.note], ["#note-b", res.b.note],
                 ["#note-d", res.a.note || res.b.note ? "no difference: a map is undefined here" : null]];
  for (const [id, text] of notes) { $(id).hidden = !text; $(id).textContent = text || ""; }
  const unit = res.scale === "share" ? " %" : "", d = res.scale === "share" ? 2 : 4;
  const clip = res.range === "robust" ? "≥ " : "";
  $("#vmax").textContent = `${clip}${fmt(res.vmax, d)}${unit}`;
  $("#dmax").textContent = `${clip}+${fmt(res.dmax, d)}${unit}`;
  $("#dmin").textContent = `${res.range === "robust" ? "≤ " : ""}−${fmt(res.dmax, d)}${unit}`;
  const where = `layer ${res.layer}, ${res.head === "mean" ? "mean over heads" : "head " + res.head}`;
  $("#answer-d").replaceChildren(el("span", { class: "k" },
    `${where} · largest change ${fmt(res.diff.max, d)}${unit} · largest cell ${fmt(Math.max(res.a.max ?? 0, res.b.max ?? 0), d)}${unit}`));
  document.body.dataset.maps = `${want.row}|${want.a}|${want.b}|${want.layer}|${want.head}|${want.scale}|${want.range}`;
}

// One canvas pixel per grid cell (scaled up by CSS): value -> colour-table index.
function drawHeat(canvas, values, vmax, diverging, key) {
  const G = values.length;
  canvas.width = G; canvas.height = G;
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(G, G);
  for (let r = 0; r < G; r++) for (let c = 0; c < G; c++) {
    const v = values[r][c];
    if (v === null) continue; // not done / undefined: transparent
    let t = diverging ? (vmax > 0 ? (v / vmax + 1) / 2 : 0.5) : (vmax > 0 ? v / vmax : 0);
    t = Math.max(0, Math.min(1, t));
    const [R, Gr, B] = (diverging ? DIV : SEQ)[Math.round(t * 255)];
    img.data.set([R, Gr, B, 255], 4 * (r * G + c));
  }
  ctx.putImageData(img, 0, 0);
  canvas.dataset.key = key;
}

// ------------------------------------------------------------------ per-layer charts

async function loadCharts() {
  const conds = [...new Set([state.a, state.b])];
  await Promise.all(conds.map(async (c) => {
    if (!state.share[c]) state.share[c] = await api("share", { condition: c }).catch((e) => ({ error: e.message }));
  }));
  drawCharts();
  await Promise.all(conds.map(async (c) => {
    if (!state.auroc[c]) state.auroc[c] = await api("auroc", { condition: c }).catch((e) => ({ note: e.message }));
  }));
  drawCharts();
}

function drawCharts() {
  const series = (store, key) => [[state.a, "var(--a)", ""], [state.b, "var(--b)", "5 3"]]
    .filter(([c], i, all) => i === 0 || c !== all[0][0])
    .map(([c, color, dash]) => ({ name: label(c), color, dash, values: store[c] && store[c][key], note: store[c] && store[c].note }));
  const au = series(state.auroc, "auroc");
  const pending = au.some((s) => s.values === undefined && !s.note);
  const note = pending ? "computing AUROC (one pass over the file)…" :
    (au.every((s) => !s.values) ? (au.find((s) => s.note) || {}).note || "no AUROC" : null);
  lineChart($("#chart-auroc"), au, 0, 1, [0, 0.25, 0.5, 0.75, 1], (v) => v.toFixed(2), 0.5, note);
  const sh = series(state.share, "share");
  const vals = sh.flatMap((s) => (s.values || []).filter((v) => v !== null));
  const top = Math.min(100, Math.max(10, Math.ceil((Math.max(0, ...vals) * 1.15) / 10) * 10));
  const ticks = [0, top / 4, top / 2, (3 * top) / 4, top];
  lineChart($("#chart-share"), sh, 0, top, ticks, (v) => `${Math.round(v)}%`, null,
    sh.every((s) => !s.values) ? "loading…" : null);
}

function lineChart(svg, series, y0, y1, ticks, tickFmt, chance, note) {
  const W = 520, H = 210, left = 44, right = 10, top = 26, bottom = 30;
  const L = state.meta.num_layers, bw = (W - left - right) / L;
  const X = (i) => left + (i + 0.5) * bw, Y = (v) => top + (1 - (v - y0) / (y1 - y0)) * (H - top - bottom);
  svg.replaceChildren();
  for (const t of ticks) {
    svg.append(el("line", { x1: left, x2: W - right, y1: Y(t), y2: Y(t), class: "grid" }));
    svg.append(el("text", { x: left - 4, y: Y(t) + 3, "text-anchor": "end", class: "tick" }, tickFmt(t)));
  }
  svg.append(el("rect", { x: left + state.layer * bw, y: top, width: bw, height: H - top - bottom, class: "current" }));
  if (chance !== null) svg.append(el("line", { x1: left, x2: W - right, y1: Y(chance), y2: Y(chance), class: "chance" }));
  svg.append(el("line", { x1: left, x2: W - right, y1: H - bottom, y2: H - bottom, class: "axis" }));
  svg.append(el("line", { x1: left, x2: left, y1: top, y2: H - bottom, class: "axis" }));
  const step = Math.max(1, Math.ceil(L / 16));
  for (let i = 0; i < L; i += step) svg.append(el("text", { x: X(i), y: H - bottom + 13, "text-anchor": "middle", class: "tick" }, String(i)));
  svg.append(el("text", { x: (left + W - right) / 2, y: H - 3, "text-anchor": "middle", class: "tick" }, "layer"));
  series.forEach((s, k) => {
    if (!s.values) return;
    let pts = [];
    const flush = () => { if (pts.length > 1) svg.append(el("polyline", { points: pts.join(" "), fill: "none", stroke: s.color, "stroke-width": 2, "stroke-dasharray": s.dash })); pts = []; };
    s.values.forEach((v, i) => { if (v === null) flush(); else pts.push(`${X(i)},${Y(v)}`); });
    flush();
    s.values.forEach((v, i) => {
      if (v === null) return;
      const dot = k === 0 ? el("circle", { cx: X(i), cy: Y(v), r: 3, fill: s.color })
        : el("rect", { x: X(i) - 3, y: Y(v) - 3, width: 6, height: 6, fill: s.color });
      dot.append(el("title", {}, `${s.name}, layer ${i}: ${v.toFixed(3)}`));
      svg.append(dot);
    });
    const lx = left + 8 + k * 240;
    svg.append(el("line", { x1: lx, x2: lx + 18, y1: 12, y2: 12, stroke: s.color, "stroke-width": 2, "stroke-dasharray": s.dash }));
    svg.append(el("text", { x: lx + 22, y: 15, class: "tick" }, s.name.length > 34 ? s.name.slice(0, 33) + "…" : s.name));
  });
  if (note) svg.append(el("text", { x: (left + W) / 2, y: (top + H - bottom) / 2, "text-anchor": "middle", class: "note" }, note));
  for (let i = 0; i < L; i++) {
    const hit = el("rect", { x: left + i * bw, y: top, width: bw, height: H - top - bottom, class: "layer-hit", "data-layer": String(i) });
    hit.append(el("title", {}, `layer ${i}`));
    hit.addEventListener("click", () => setLayer(i));
    svg.append(hit);
  }
}

init();
