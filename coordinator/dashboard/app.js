// NovaCron operators' dashboard. Plain browser JavaScript, no build step.
// Every API call goes through call() or stream() with a literal OpenAPI path
// template as its second argument: the test suite extracts those and checks
// each one against /api/v1/openapi.json. Data is rendered with textContent
// only, never as HTML. The token lives in sessionStorage and is only ever
// sent in the Authorization header.
"use strict";

const API = "/api/v1";
const TOKEN_KEY = "novacron.token";
const REFRESH_MS = 5000;
const REQUEST_TIMEOUT_MS = 10000;
const MAX_FAILURES = 5; // consecutive failed refreshes before auto-refresh pauses
const MAX_STREAMS = 4; // live migration streams followed at once
const STREAM_MAX_MS = 6 * 3600 * 1000;
const HISTORY_LIMIT = 50;
// Where each phase sits on the progress bar; pre-copy fills 10-75 % (as the CLI does).
const PHASE_PCT = { pending: 0, prepare: 5, precopy: 10, stopcopy: 80, postcopy: 85, commit: 95, completed: 100 };
const TERMINAL = new Set(["completed", "failed", "cancelled"]);

const $ = (id) => document.getElementById(id);
const state = { failures: 0, timer: null, streams: new Map(), live: new Map(), generation: 0 };

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

function expand(template, params) {
  return template.replace(/\{(\w+)\}/g, (_, name) => {
    if (!(name in params)) throw new Error("missing path parameter " + name);
    return encodeURIComponent(String(params[name]));
  });
}

function url(template, opts) {
  let u = API + expand(template, opts.params || {});
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(opts.query || {})) q.set(k, String(v));
  if ([...q].length) u += "?" + q.toString();
  return u;
}

async function send(method, template, opts, signal) {
  const headers = { Accept: "application/json", Authorization: "Bearer " + token() };
  const init = { method, headers, signal, cache: "no-store", credentials: "omit" };
  if (opts.body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(opts.body);
  }
  const resp = await fetch(url(template, opts), init);
  if (!resp.ok) {
    let message = resp.status + " " + resp.statusText;
    try {
      const doc = await resp.json();
      if (doc && typeof doc.error === "string") message = doc.error; // the API's own words
    } catch (_) { /* not JSON: keep the status line */ }
    throw new ApiError(resp.status, message);
  }
  return resp;
}

// One JSON request/response, aborted after REQUEST_TIMEOUT_MS.
async function call(method, template, opts = {}) {
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), REQUEST_TIMEOUT_MS);
  try {
    const resp = await send(method, template, opts, ctl.signal);
    return await resp.json();
  } catch (err) {
    if (err.name === "AbortError") throw new ApiError(0, "request timed out: " + method + " " + template);
    throw err;
  } finally {
    clearTimeout(timer);
  }
}

// Server-sent events read with fetch and a stream reader (EventSource cannot send an Authorization header).
// Calls onEvent(name, data) per event; resolves when the server ends the stream.
async function stream(method, template, opts, signal, onEvent) {
  const resp = await send(method, template, opts, signal);
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue; // keep-alive comment
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") name = val;
        else if (field === "data") data.push(val);
      }
      if (data.length) onEvent(name, data.join("\n"));
    }
    if (buffer.length > 1 << 20) throw new Error("event stream line too long");
  }
}

// -- rendering -------------------------------------------------------------------------------

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function bytes(n) {
  if (n === undefined || n === null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = Number(n);
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i ? v.toFixed(1) : String(v)) + " " + units[i];
}

function ago(ts) {
  if (!ts) return "–";
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 90) return s.toFixed(0) + " s ago";
  if (s < 5400) return (s / 60).toFixed(0) + " min ago";
  return new Date(ts * 1000).toLocaleString();
}

function fillRows(tbody, rows, columns, emptyText) {
  const frag = document.createDocumentFragment();
  if (!rows.length) {
    const tr = el("tr");
    const td = el("td", emptyText, "empty");
    td.colSpan = columns;
    tr.append(td);
    frag.append(tr);
  }
  for (const cells of rows) {
    const tr = el("tr");
    for (const cell of cells) tr.append(cell instanceof Node ? cell : el("td", cell));
    frag.append(tr);
  }
  tbody.replaceChildren(frag);
}

function stateCell(s) { return el("td", s, "state-" + String(s).replace(/[^a-z]/g, "")); }
function numCell(text) { return el("td", text, "num"); }

// VMs per host come from the coordinator's VM records (the agents' own lists may lag).
function renderHosts(hosts, vms) {
  const onHost = new Map();
  for (const v of vms) onHost.set(v.host, [...(onHost.get(v.host) || []), v.name]);
  fillRows($("hosts"), hosts.map((h) => [
    h.name, stateCell(h.state), numCell(h.cpus), numCell(bytes(h.memory_bytes)),
    numCell(bytes(h.memory_available_bytes)),
    numCell(h.load === null || h.load === undefined ? "–" : Number(h.load).toFixed(2)),
    (onHost.get(h.name) || []).join(", ") || "–", ago(h.last_heartbeat),
  ]), 8, "no hosts registered");
  fillSelect($("migrate-target"), hosts.filter((h) => h.state === "up").map((h) => h.name));
}

function renderVms(vms) {
  fillRows($("vms"), vms.map((v) => [
    v.name, v.host, stateCell(v.state), numCell((v.spec || {}).vcpus ?? "–"),
    numCell((v.spec || {}).memory_mb === undefined ? "–" : v.spec.memory_mb + " MiB"), v.error || "",
  ]), 6, "no VMs");
  fillSelect($("migrate-vm"), vms.filter((v) => v.state === "running").map((v) => v.name));
}

function fillSelect(select, names) {
  const keep = select.value;
  select.replaceChildren(...names.map((n) => { const o = el("option", n); o.value = n; return o; }));
  if (names.includes(keep)) select.value = keep;
}

function progressPct(m) {
  // the agent's data progress (acked bytes against acked + remaining; never runs backwards)
  const data = (m.metrics || {}).progress_pct;
  if (typeof data === "number") return m.phase === "completed" ? 100 : data;
  let pct = PHASE_PCT[m.phase] ?? 0;
  if (m.phase === "precopy") {
    const met = m.metrics || {};
    const maxRounds = (m.options || {}).max_rounds || 30;
    const bySent = met.pages > 0 && typeof met.pages_sent === "number";
    const frac = bySent ? met.pages_sent / met.pages : (m.round || 0) / maxRounds;
    pct += 65 * Math.min(1, Math.max(0, frac));
  }
  return pct;
}

function renderMigrations(migrations) {
  fillRows($("migrations"), migrations.map((stored) => {
    const m = state.live.get(stored.id) || stored; // a live stream knows better than the last poll
    const met = m.metrics || {};
    let progress;
    if (TERMINAL.has(m.phase)) {
      progress = el("td", "–");
    } else {
      progress = el("td");
      const bar = el("progress");
      bar.max = 100;
      bar.value = progressPct(m);
      bar.title = m.phase + (m.round ? " round " + m.round : "");
      progress.append(bar);
    }
    const action = el("td");
    if (!TERMINAL.has(m.phase)) {
      const btn = el("button", "cancel");
      btn.type = "button";
      btn.addEventListener("click", () => cancelMigration(m.id));
      action.append(btn);
    }
    return [
      m.id, m.vm, m.source + " → " + m.target, stateCell(m.phase), progress,
      numCell(met.downtime_ms === undefined || met.downtime_ms === null ? "–"
        : met.downtime_ms + " ms" + (m.budget_exceeded ? " (over budget)" : "")),
      numCell(met.total_s === undefined ? "–" : Number(met.total_s).toFixed(2) + " s"),
      numCell(bytes(met.bytes_wire)), m.error || "", action,
    ];
  }), 10, "no migrations yet");
}

function showError(err) {
  const box = $("error");
  if (!err) { box.hidden = true; box.textContent = ""; return; }
  box.textContent = err.message || String(err);
  box.hidden = false;
}

function setStatus(text) { $("status").textContent = text; }

// -- live migrations -------------------------------------------------------------------------

function follow(id) {
  if (state.streams.has(id) || state.streams.size >= MAX_STREAMS) return;
  const ctl = new AbortController();
  const limit = setTimeout(() => ctl.abort(), STREAM_MAX_MS);
  state.streams.set(id, ctl);
  const generation = state.generation;
  stream("GET", "/migrations/{id}/events", { params: { id } }, ctl.signal, (name, data) => {
    if (name !== "migration") return;
    const doc = JSON.parse(data);
    state.live.set(id, doc);
    if (state.last) renderMigrations(state.last.migrations);
  }).catch((err) => {
    if (err.name !== "AbortError" && generation === state.generation) showError(err);
  }).finally(() => {
    clearTimeout(limit);
    state.streams.delete(id);
    state.live.delete(id);
    if (generation === state.generation) schedule(0); // pick up the final record
  });
}

function stopStreams() {
  state.generation++;
  for (const ctl of state.streams.values()) ctl.abort();
  state.streams.clear();
  state.live.clear();
}

async function cancelMigration(id) {
  try {
    await call("POST", "/migrations/{id}/cancel", { params: { id } });
    showError(null);
  } catch (err) {
    showError(err);
  }
  schedule(0);
}

// -- refresh loop ----------------------------------------------------------------------------

async function refresh() {
  if (!token()) { setStatus("paste the admin token to load data"); return; }
  try {
    const [hosts, vms, migrations] = await Promise.all([
      call("GET", "/hosts"),
      call("GET", "/vms"),
      call("GET", "/migrations", { query: { limit: HISTORY_LIMIT } }),
    ]);
    state.last = migrations;
    renderHosts(hosts.hosts, vms.vms);
    renderVms(vms.vms);
    renderMigrations(migrations.migrations);
    for (const m of migrations.migrations) if (!TERMINAL.has(m.phase)) follow(m.id);
    state.failures = 0;
    showError(null);
    setStatus("updated " + new Date().toLocaleTimeString());
  } catch (err) {
    state.failures++;
    showError(err);
    if (err.status === 401) state.failures = MAX_FAILURES; // a wrong token will not fix itself
  }
}

function schedule(delay) {
  clearTimeout(state.timer);
  if (state.failures >= MAX_FAILURES) {
    setStatus("auto-refresh paused after errors; press Use to retry");
    return;
  }
  state.timer = setTimeout(async () => {
    if (document.hidden) { schedule(REFRESH_MS); return; } // no polling in a background tab
    await refresh();
    schedule(REFRESH_MS);
  }, delay);
}

// -- forms -----------------------------------------------------------------------------------

function showResult(node, text, bad) {
  node.textContent = text;
  node.classList.toggle("bad", Boolean(bad));
}

async function onMigrate(ev) {
  ev.preventDefault();
  const out = $("migrate-result");
  const body = { vm: $("migrate-vm").value, target: $("migrate-target").value };
  if (!body.vm || !body.target) { showResult(out, "choose a running VM and a host", true); return; }
  try {
    const mig = await call("POST", "/migrations", { body });
    showResult(out, "migration " + mig.id + " started: " + mig.vm + " " + mig.source + " → " + mig.target);
    follow(mig.id);
  } catch (err) {
    showResult(out, err.message, true);
  }
  schedule(0);
}

async function onPlace(ev) {
  ev.preventDefault();
  const out = $("place-result");
  const vm = { vcpus: Number($("place-vcpus").value), memory_mb: Number($("place-memory").value) };
  const region = $("place-region").value.trim();
  if (region) vm.region = region;
  try {
    const res = await call("POST", "/placements", { body: { vm } });
    const ex = res.explanation || {};
    const lines = [
      res.placed ? "→ " + res.host : "no host fits",
      ex.why || "",
      "hosts considered: " + ex.hosts_considered + ", feasible: " + ex.feasible + ", strategy: " + res.strategy,
    ];
    const rejected = Object.entries(ex.rejected || {});
    if (rejected.length) {
      lines.push("rejected:");
      for (const [host, why] of rejected) lines.push("  " + host + ": " + (typeof why === "string" ? why : JSON.stringify(why)));
    }
    for (const alt of (ex.alternatives || []).slice(0, 5)) {
      lines.push("alternative: " + (typeof alt === "object" && alt && alt.host ? alt.host : JSON.stringify(alt)));
    }
    showResult(out, lines.filter(Boolean).join("\n"), !res.placed);
  } catch (err) {
    showResult(out, err.message, true);
  }
}

function onToken(ev) {
  ev.preventDefault();
  const value = $("token").value.trim();
  $("token").value = ""; // the field never keeps it on screen
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  if (token()) $("token").placeholder = "token set for this tab";
  stopStreams();
  state.failures = 0;
  schedule(0);
}

function onForget() {
  sessionStorage.removeItem(TOKEN_KEY);
  $("token").placeholder = "paste the admin token";
  stopStreams();
  clearTimeout(state.timer);
  for (const id of ["hosts", "vms", "migrations"]) $(id).replaceChildren();
  showError(null);
  setStatus("token forgotten");
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", onToken);
  $("forget").addEventListener("click", onForget);
  $("migrate-form").addEventListener("submit", onMigrate);
  $("place-form").addEventListener("submit", onPlace);
  if (token()) $("token").placeholder = "token set for this tab";
  schedule(0);
});
