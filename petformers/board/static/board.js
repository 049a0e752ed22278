// petformers board: one page, no build step. Data comes from /api/* and live from /api/events (SSE).
"use strict";

const COLORS = ["#0b63c5", "#e8590c", "#2f9e44", "#ae3ec9", "#c2255c", "#1098ad", "#f08c00", "#5c7cfa"];
const state = {
  runs: [],            // rows of the run list
  selected: null,      // the run whose details are shown
  compared: new Set(), // runs ticked for comparison
  data: {},            // run -> {byStep: Map(step -> merged record), errors: []}
  detail: null,
  events: null,
  charts: {},
  chat: [],
  chatBusy: false,
};

const $ = (id) => document.getElementById(id);
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}
function fmt(v, digits = 4) {
  if (v === null || v === undefined) return "–";
  if (typeof v === "number") {
    if (!isFinite(v)) return String(v);
    if (Number.isInteger(v)) return v.toLocaleString("en-US");
    const a = Math.abs(v);
    return a !== 0 && (a < 1e-3 || a >= 1e6) ? v.toExponential(2) : String(Number(v.toFixed(digits)));
  }
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}
const shown = () => [...new Set([state.selected, ...state.compared].filter(Boolean))];
const colorOf = (name) => COLORS[Math.max(0, shown().indexOf(name)) % COLORS.length];

// ---- run list ---------------------------------------------------------------------------------
async function loadRuns() {
  const r = await fetch("/api/runs");
  const body = await r.json();
  $("root").textContent = body.root;
  setRuns(body.runs);
}
function setRuns(rows) {
  state.runs = rows;
  const list = $("runs");
  list.replaceChildren();
  $("no-runs").hidden = rows.length > 0;
  for (const row of rows) {
    const box = el("input", {type: "checkbox", class: "compare", "data-run": row.name, title: "compare"});
    box.checked = state.compared.has(row.name);
    box.addEventListener("click", (e) => { e.stopPropagation(); toggleCompare(row.name, box.checked); });
    const li = el("li", {"data-run": row.name, "data-state": row.state, title: row.reason || row.state},
      box, el("span", {class: "name", text: row.name}), el("span", {class: `state ${row.state}`, text: row.state}));
    if (row.name === state.selected) li.classList.add("selected");
    li.addEventListener("click", () => select(row.name));
    list.append(li);
  }
}
function updateRunState(name, st, reason) {
  const row = state.runs.find((r) => r.name === name);
  if (row) { row.state = st; row.reason = reason; }
  const li = document.querySelector(`#runs li[data-run="${CSS.escape(name)}"]`);
  if (li) {
    li.dataset.state = st;
    li.title = reason || st;
    li.querySelector(".state").className = `state ${st}`;
    li.querySelector(".state").textContent = st;
  }
  if (name === state.selected) {
    const previous = $("run-state").textContent;
    showState(st, reason);
    if (previous && previous !== st) loadDetail();  // artefacts, summary and evals appear at the end
  }
}

// ---- selection and live events ----------------------------------------------------------------
function select(name) {
  if (state.selected !== name) { state.chat = []; renderChat(); }
  state.selected = name;
  for (const li of document.querySelectorAll("#runs li")) li.classList.toggle("selected", li.dataset.run === name);
  $("welcome").hidden = true;
  $("run").hidden = false;
  history.replaceState(null, "", "#" + encodeURIComponent(name));
  loadDetail();
  subscribe();
}
function toggleCompare(name, on) {
  if (on) state.compared.add(name); else state.compared.delete(name);
  if (!state.selected && on) { select(name); return; }
  subscribe();
  loadDiff();
}
function subscribe() {
  if (state.events) state.events.close();
  const runs = shown();
  for (const name of Object.keys(state.data)) if (!runs.includes(name)) delete state.data[name];
  for (const name of runs) state.data[name] = {byStep: new Map(), errors: []};
  buildCharts();
  const query = runs.map((r) => "run=" + encodeURIComponent(r)).join("&");
  const source = new EventSource("/api/events?" + query);
  source.addEventListener("open", () => { $("live").textContent = "live"; $("live").classList.add("on"); });
  source.addEventListener("error", () => { $("live").textContent = "reconnecting…"; $("live").classList.remove("on"); });
  source.addEventListener("runs", (e) => setRuns(JSON.parse(e.data).runs));
  source.addEventListener("state", (e) => { const d = JSON.parse(e.data); updateRunState(d.run, d.state, d.reason); });
  source.addEventListener("problem", (e) => { const d = JSON.parse(e.data); addNote(`${d.run}: ${d.error}`); });
  source.addEventListener("metrics", (e) => {
    const d = JSON.parse(e.data);
    const store = state.data[d.run];
    if (!store) return;
    if (d.reset) { store.byStep = new Map(); store.errors = []; }
    for (const rec of d.records) {
      if (typeof rec.step !== "number") continue;
      store.byStep.set(rec.step, Object.assign(store.byStep.get(rec.step) || {}, rec));  // a resumed run rewrites steps
    }
    store.errors.push(...d.errors);
    scheduleRedraw();
  });
  // A reconnecting EventSource starts a new server stream that resends everything: start clean.
  source.addEventListener("open", () => { for (const n of runs) state.data[n] = {byStep: new Map(), errors: []}; });
  state.events = source;
  loadDiff();
}

// ---- run details ------------------------------------------------------------------------------
function showState(st, reason) {
  $("run-state").className = `state ${st}`;
  $("run-state").textContent = st;
  $("run-reason").textContent = reason || "";
}
function addNote(text) {
  const box = $("notes");
  if ([...box.children].some((p) => p.textContent === text)) return;
  box.append(el("p", {text}));
  box.hidden = false;
}
async function loadDetail() {
  const name = state.selected;
  const r = await fetch("/api/run?name=" + encodeURIComponent(name));
  const d = await r.json();
  if (name !== state.selected) return;
  if (d.error) { $("notes").replaceChildren(); addNote(d.error); return; }
  state.detail = d;
  $("run-title").textContent = d.name;
  showState(d.state, d.reason);
  $("run-path").textContent = d.path;
  $("notes").replaceChildren();
  $("notes").hidden = true;
  for (const n of d.notes) addNote(n);
  for (const n of (state.data[name] || {errors: []}).errors) addNote(n);
  $("config").textContent = d.config_text || "(no resolved_config.yaml)";
  renderEval(d.eval);
  renderSummary(d.summary);
  renderArtefacts(d);
  $("chat-info").textContent = d.base_model
    ? `Base ${d.base_model}; adapter: ${d.has_adapter ? d.path + "/adapter" : "the newest checkpoint's, if any"}. ` +
      "Greedy decoding through the same path as petformers chat."
    : "This run names no base model (load_checkpoint), so there is nothing to chat with.";
  renderCards();
}
function renderSummary(summary) {
  const box = $("summary");
  if (!summary) { box.replaceChildren(el("p", {class: "muted", text: "not written yet (the run writes run_summary.json at its end)"})); return; }
  const rows = Object.entries(summary).filter(([k]) => k !== "artefacts")
    .map(([k, v]) => el("tr", {}, el("th", {text: k}), el("td", {class: typeof v === "number" ? "num" : "", text: fmt(v)})));
  box.replaceChildren(el("table", {}, ...rows));
}
function renderArtefacts(d) {
  const rows = d.artefacts.map((a) => {
    const link = a.file ? el("a", {href: `/api/file?run=${encodeURIComponent(d.name)}&path=${encodeURIComponent(a.name)}`,
                                   target: "_blank", text: "open"}) : el("span");
    return el("tr", {}, el("td", {}, el("code", {text: a.name})), el("td", {text: a.what}),
      el("td", {class: "num", text: human(a.bytes)}), el("td", {}, el("code", {text: a.path})), el("td", {}, link));
  });
  $("artefacts").replaceChildren(el("table", {id: "artefact-table"},
    el("tr", {}, ...["name", "what", "size", "path", ""].map((h) => el("th", {text: h}))), ...rows));
}
function human(n) {
  for (const unit of ["B", "KiB", "MiB", "GiB"]) {
    if (n < 1024 || unit === "GiB") return unit === "B" ? `${n} B` : `${n.toFixed(1)} ${unit}`;
    n /= 1024;
  }
}
function renderEval(ev) {
  const box = $("eval");
  box.replaceChildren();
  if (!ev.metrics.length && !ev.samples.length) {
    box.append(el("p", {class: "muted", text: "No eval_before.json / eval_after.json in this run (make demo writes them: the base model's and " +
      "the fine-tuned model's answers on the held-out set)."}));
    return;
  }
  if (ev.metrics.length) {
    const rows = ev.metrics.map((m) => {
      const change = typeof m.before === "number" && typeof m.after === "number" ? (m.after - m.before) : null;
      return el("tr", {}, el("td", {}, el("code", {text: m.name})), el("td", {class: "num", text: fmt(m.before)}),
        el("td", {class: "num", text: fmt(m.after)}),
        el("td", {class: "num", text: change === null ? "" : (change >= 0 ? "+" : "") + fmt(change)}));
    });
    box.append(el("table", {id: "eval-table"}, el("tr", {}, ...["metric", "before (base)", "after (fine-tuned)", "change"]
      .map((h) => el("th", {text: h}))), ...rows));
  }
  if (ev.samples.length) {
    box.append(el("p", {class: "muted small", text: `Sample generations: ${ev.samples.length} of ${ev.total_samples}.`}));
    const mark = (pred, ref) => pred === null || pred === undefined ? el("span", {class: "muted", text: "–"}) :
      el("span", {}, el("span", {class: norm(pred) === norm(ref) ? "good" : "bad", text: norm(pred) === norm(ref) ? "✓ " : "✗ "}), pred);
    const rows = ev.samples.map((s) => el("tr", {}, el("td", {class: "text", text: s.prompt}),
      el("td", {class: "text", text: s.reference}), el("td", {class: "text"}, mark(s.before, s.reference)),
      el("td", {class: "text"}, mark(s.after, s.reference))));
    box.append(el("table", {class: "samples"}, el("tr", {}, ...["prompt", "reference", "before", "after"]
      .map((h) => el("th", {text: h}))), ...rows));
  }
}
const norm = (s) => String(s).trim().toLowerCase().replace(/\s+/g, " ");

// ---- cards and charts -------------------------------------------------------------------------
function series(name, key) {
  const store = state.data[name];
  if (!store) return [[], []];
  const steps = [...store.byStep.keys()].sort((a, b) => a - b);
  const xs = [], ys = [];
  for (const s of steps) {
    const v = store.byStep.get(s)[key];
    if (typeof v === "number") { xs.push(s); ys.push(v); }
  }
  return [xs, ys];
}
function lastValue(name, key) {
  const [, ys] = series(name, key);
  return ys.length ? ys[ys.length - 1] : null;
}
function renderCards() {
  const name = state.selected;
  if (!name) return;
  const store = state.data[name] || {byStep: new Map()};
  const steps = [...store.byStep.keys()];
  const summary = state.detail && state.detail.name === name ? state.detail.summary : null;
  const total = summary && summary.steps ? ` / ${summary.steps}` : "";
  const cards = [
    ["step", steps.length ? fmt(Math.max(...steps)) + total : "–"],
    ["train loss", fmt(lastValue(name, "loss"))],
    ["eval loss", fmt(lastValue(name, "eval_loss"))],
    ["eval ppl", fmt(lastValue(name, "eval_ppl"), 2)],
    ["lr", fmt(lastValue(name, "lr"))],
    ["tokens/s", fmt(lastValue(name, "tokens_per_s"), 1)],
    ["peak memory", memoryText(name, summary)],
  ];
  $("cards").replaceChildren(...cards.map(([label, value]) =>
    el("div", {class: "card", "data-card": label}, el("div", {class: "label", text: label}), el("div", {class: "value", text: value}))));
  const notes = store.errors || [];
  for (const n of notes) addNote(n);
}
function memoryText(name, summary) {
  const v = lastValue(name, "peak_memory_mib");
  if (v !== null) return `${fmt(v, 0)} MiB`;
  if (summary && typeof summary.peak_rss_mib === "number") return `${fmt(summary.peak_rss_mib, 0)} MiB`;
  return "–";
}
const CHARTS = [
  {id: "loss-chart", keys: [["loss", "train"], ["eval_loss", "eval"]], log: false},
  {id: "lr-chart", keys: [["lr", "lr"]]},
  {id: "tps-chart", keys: [["tokens_per_s", "tokens/s"]]},
  {id: "mem-chart", keys: [["peak_memory_mib", "MiB"]]},
];
function buildCharts() {
  for (const spec of CHARTS) {
    if (state.charts[spec.id]) { state.charts[spec.id].destroy(); delete state.charts[spec.id]; }
    $(spec.id).replaceChildren();
  }
  redraw();
}
let redrawPending = false;
function scheduleRedraw() {
  if (redrawPending) return;
  redrawPending = true;
  requestAnimationFrame(() => { redrawPending = false; redraw(); });
}
function chartData(spec) {
  const runs = shown();
  const tables = [], defs = [];
  for (const name of runs) {
    spec.keys.forEach(([key, label], i) => {
      const [xs, ys] = series(name, key);
      if (!xs.length) return;
      tables.push([xs, ys]);
      const stroke = runs.length > 1 || i === 0 ? colorOf(name) : COLORS[(i + 1) % COLORS.length];
      defs.push({label: runs.length > 1 ? `${name} ${label}` : label, stroke, width: i === 0 ? 1.5 : 2,
                 dash: i === 0 ? undefined : [6, 4], points: i > 0 ? {show: true} : {}, spanGaps: true,
                 value: (u, v) => fmt(v)});
    });
  }
  return {data: tables.length ? uPlot.join(tables) : null, defs};
}
function redraw() {
  for (const spec of CHARTS) {
    const box = $(spec.id);
    const {data, defs} = chartData(spec);
    const points = data ? data[0].length : 0;
    box.dataset.points = String(points);
    box.dataset.series = String(defs.length);
    if (!data) {
      if (state.charts[spec.id]) { state.charts[spec.id].destroy(); delete state.charts[spec.id]; }
      if (!box.querySelector(".empty")) box.replaceChildren(el("div", {class: "empty", text: "no data yet"}));
      continue;
    }
    const key = defs.map((d) => d.label).join("|");
    const chart = state.charts[spec.id];
    if (chart && chart._key === key) { chart.setData(data); continue; }
    if (chart) chart.destroy();
    box.replaceChildren();
    const opts = {
      width: Math.max(300, box.clientWidth - 4), height: 220,
      scales: {x: {time: false}},
      axes: [{label: "step"}, {size: 60}],
      series: [{label: "step"}, ...defs],
      legend: {live: true},
    };
    state.charts[spec.id] = new uPlot(opts, data, box);
    state.charts[spec.id]._key = key;
  }
  renderCards();
}
window.addEventListener("resize", () => {
  for (const spec of CHARTS) {
    const c = state.charts[spec.id];
    if (c) c.setSize({width: Math.max(300, $(spec.id).clientWidth - 4), height: 220});
  }
});

// ---- comparison -------------------------------------------------------------------------------
async function loadDiff() {
  const runs = shown();
  $("compare").hidden = runs.length < 2;
  if (runs.length < 2) return;
  const r = await fetch("/api/diff?" + runs.map((n) => "run=" + encodeURIComponent(n)).join("&"));
  const d = await r.json();
  const box = $("diff");
  if (d.error) { box.replaceChildren(el("p", {class: "notes", text: d.error})); return; }
  const head = el("tr", {}, el("th", {text: "key"}), ...d.runs.map((n) =>
    el("th", {}, el("span", {class: "swatch", style: `background:${colorOf(n)}`}), n)));
  const rows = d.rows.map((row) => el("tr", {}, el("td", {}, el("code", {text: row.key})), ...d.runs.map((n) =>
    row.missing.includes(n) ? el("td", {class: "diff-missing", text: "(not set)"}) : el("td", {text: fmt(row.values[n])}))));
  const parts = [el("table", {id: "diff-table"}, head, ...rows)];
  if (!d.rows.length) parts.unshift(el("p", {class: "muted", text: "The resolved configs are identical (output_dir aside)."}));
  for (const n of d.notes) parts.unshift(el("p", {class: "notes", text: n}));
  box.replaceChildren(...parts);
}

// ---- chat -------------------------------------------------------------------------------------
function renderChat() {
  const log = $("chat-log");
  log.replaceChildren(...state.chat.map((m) => el("div", {class: `msg ${m.role}`},
    el("span", {class: "who", text: m.role === "user" ? "you" : m.role}), el("span", {class: "text", text: m.content}))));
}
async function sendChat(text) {
  if (state.chatBusy || !text.trim() || !state.selected) return;
  state.chatBusy = true;
  $("chat-send").disabled = true;
  state.chat.push({role: "user", content: text});
  renderChat();
  const answer = el("span", {class: "text", "data-pieces": "0"});
  const div = el("div", {class: "msg assistant streaming"}, el("span", {class: "who", text: "assistant"}), answer);
  $("chat-log").append(div);
  const body = {run: state.selected, messages: state.chat.filter((m) => m.role !== "error"),
                max_new_tokens: Number($("chat-max").value) || 64};
  let full = "";
  try {
    const r = await fetch("/api/chat", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    if (!r.ok) throw new Error((await r.json()).error || r.statusText);
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const event = (block.match(/^event: (.*)$/m) || [])[1];
        const data = JSON.parse((block.match(/^data: (.*)$/m) || [, "{}"])[1]);
        if (event === "token") {
          answer.textContent += data.text;
          answer.dataset.pieces = String(Number(answer.dataset.pieces) + 1);
          $("chat-log").scrollTop = $("chat-log").scrollHeight;
        } else if (event === "info") {
          $("chat-info").textContent = data.text;
        } else if (event === "done") {
          full = data.text;
        } else if (event === "error") {
          throw new Error(data.text);
        }
      }
    }
    state.chat.push({role: "assistant", content: full || answer.textContent});
    div.classList.remove("streaming");
    div.classList.add("done");
  } catch (e) {
    div.classList.remove("streaming");
    div.replaceWith(el("div", {class: "msg error"}, el("span", {class: "who", text: "error"}), el("span", {class: "text", text: String(e.message || e)})));
    state.chat.pop();
  } finally {
    state.chatBusy = false;
    $("chat-send").disabled = false;
  }
}
$("chat-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("chat-input").value;
  $("chat-input").value = "";
  sendChat(text);
});
$("chat-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
});
$("chat-reset").addEventListener("click", () => { state.chat = []; renderChat(); });

// ---- start ------------------------------------------------------------------------------------
loadRuns().then(() => {
  const wanted = decodeURIComponent(location.hash.slice(1));
  if (wanted && state.runs.some((r) => r.name === wanted)) select(wanted);
  else subscribe();  // the run list stays live even before a run is chosen
});
