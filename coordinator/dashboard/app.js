// NovaCron operations console. Plain browser JavaScript, no build step.
// Every API call goes through call() or stream() with a literal OpenAPI path
// template as its second argument: the test suite extracts those and checks
// each one against /api/v1/openapi.json. Data is rendered with textContent
// only, never as HTML. The token lives in sessionStorage and is only ever
// sent in the Authorization header.
"use strict";

const API = "/api/v1";
const TOKEN_KEY = "novacron.token";
const REFRESH_MS = 5000;
const BUSY_REFRESH_MS = 2000; // while migrations or drains run
const CONSOLE_POLL_MS = 1000;
const CONSOLE_KEEP = 64 * 1024; // characters of serial log kept on screen
const CONSOLE_READS = 8; // 1 MiB reads per poll at most (a long log is caught up over polls)
const REQUEST_TIMEOUT_MS = 10000;
const SLOW_REQUEST_MS = 130000; // VM create/start/stop wait for the agent
const MAX_FAILURES = 5; // consecutive failed refreshes before auto-refresh pauses
const MAX_STREAMS = 4; // live migration streams followed at once
const STREAM_MAX_MS = 6 * 3600 * 1000;
const HISTORY_LIMIT = 50;
const AUDIT_LIMIT = 100;
const PAGE = 4096;
const RATE_MIN_DT_S = 0.5; // shortest interval a measured rate is taken over
// Where each phase sits on the progress bar; pre-copy fills 10-75 % (as the CLI does).
const PHASE_PCT = { pending: 0, queued: 0, prepare: 5, precopy: 10, stopcopy: 80, postcopy: 85, commit: 95, completed: 100 };
const TERMINAL = new Set(["completed", "failed", "cancelled"]);
const DRAIN_TERMINAL = new Set(["completed", "done", "finished", "failed", "cancelled", "partial"]);
const STOPPABLE = new Set(["running", "paused"]);
const STARTABLE = new Set(["stopped", "shutoff", "crashed", "created"]);

const $ = (id) => document.getElementById(id);
const state = {
  failures: 0, timer: null, generation: 0,
  streams: new Map(), live: new Map(), rates: new Map(),
  features: {}, hosts: [], vms: [], migrations: [], policies: [], drains: new Map(),
  panel: null, console: null, audit: {},
  pending: new Map(), // VM name -> what is being done to it (starting, stopping)
  imagesGeneration: 0,
};

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
  for (const [k, v] of Object.entries(opts.query || {})) {
    if (v !== undefined && v !== null && v !== "") q.set(k, String(v));
  }
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

// One JSON request/response, aborted after opts.timeoutMs (default REQUEST_TIMEOUT_MS).
async function call(method, template, opts = {}) {
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), opts.timeoutMs || REQUEST_TIMEOUT_MS);
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

// -- formatting ------------------------------------------------------------------------------

const DASH = "—"; // a number the API does not (yet) provide

function isNum(v) { return typeof v === "number" && Number.isFinite(v); }

function bytes(n) {
  if (!isNum(n)) return DASH;
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i ? v.toFixed(1) : String(Math.round(v))) + " " + units[i];
}

function rate(bps) { return isNum(bps) && bps > 0 ? bytes(bps) + "/s" : DASH; }

function seconds(s) {
  if (!isNum(s)) return DASH;
  if (s < 10) return s.toFixed(1) + " s";
  if (s < 120) return Math.round(s) + " s";
  if (s < 7200) return Math.floor(s / 60) + " min " + String(Math.round(s % 60)).padStart(2, "0") + " s";
  return (s / 3600).toFixed(1) + " h";
}

function ms(v) { return isNum(v) ? (v < 100 ? v.toFixed(1) : Math.round(v)) + " ms" : DASH; }
function count(v) { return isNum(v) ? v.toLocaleString("en-US") : DASH; }
function fixed(v, digits) { return isNum(v) ? v.toFixed(digits) : DASH; }

function ago(ts) {
  if (!isNum(ts) || !ts) return DASH;
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 90) return s.toFixed(0) + " s ago";
  if (s < 5400) return (s / 60).toFixed(0) + " min ago";
  return new Date(ts * 1000).toLocaleString();
}

function clock(ts) { return isNum(ts) && ts ? new Date(ts * 1000).toLocaleTimeString() : DASH; }

// -- DOM helpers -----------------------------------------------------------------------------

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function button(text, onClick, cls, action) {
  const b = el("button", text, cls);
  b.type = "button";
  if (action) b.dataset.action = action; // what it does, for tests and people with devtools
  b.addEventListener("click", onClick);
  return b;
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

// Tag each row with the name or id it shows (data-key).
function tagRows(tbody, keys) {
  const trs = tbody.children;
  keys.forEach((key, i) => { if (trs[i]) trs[i].dataset.key = key; });
}

function badge(s, look) {
  const text = String(s === undefined || s === null ? "unknown" : s);
  return el("span", text, "badge state-" + (look || text).replace(/[^a-z_]/g, ""));
}
function stateCell(s) { const td = el("td"); td.append(badge(s)); return td; }
function numCell(text, cls) { return el("td", text, "num" + (cls ? " " + cls : "")); }
function monoCell(text) { return el("td", text, "mono"); }
function actionsCell(...buttons) {
  const td = el("td", null, "actions");
  td.append(...buttons.filter(Boolean));
  return td;
}

function fillSelect(select, options, keep) {
  const before = keep === undefined ? select.value : keep;
  select.replaceChildren(...options.map(([value, label, disabled]) => {
    const o = el("option", label === undefined ? value : label);
    o.value = value;
    o.disabled = Boolean(disabled);
    return o;
  }));
  if (options.some(([v, , d]) => v === before && !d)) select.value = before;
}

function showResult(node, text, bad) {
  node.textContent = text;
  node.className = "result" + (bad ? " bad" : text ? " ok" : "");
}

function sectionError(section, err, doing) {
  const box = $(section + "-error");
  if (!err) { box.hidden = true; box.textContent = ""; return; }
  box.textContent = (doing ? doing + ": " : "") + (err.message || String(err));
  box.hidden = false;
}

function showError(err) {
  const box = $("error");
  if (!err) { box.hidden = true; box.textContent = ""; return; }
  box.textContent = err.message || String(err);
  box.hidden = false;
}

function setStatus(text) { $("status").textContent = text; }

// -- hosts -----------------------------------------------------------------------------------

// maintenance and draining win over "up"; a host that stopped heartbeating is down whatever else.
function hostState(h) {
  if (h.state !== "up") return h.state;
  if (h.lifecycle === "draining" || h.drain) return "draining";
  for (const d of state.drains.values()) if (d.host === h.name && !DRAIN_TERMINAL.has(d.state)) return "draining";
  return h.maintenance ? "maintenance" : "up";
}

function takesVms(h) { return h.state === "up" && !h.maintenance; }

function renderHosts() {
  const onHost = new Map();
  for (const v of state.vms) onHost.set(v.host, (onHost.get(v.host) || 0) + 1);
  fillRows($("hosts"), state.hosts.map((h) => {
    const shown = hostState(h);
    const maint = button(h.maintenance ? "End maintenance" : "Maintenance",
      () => setMaintenance(h.name, !h.maintenance), "quiet", "maintenance");
    maint.title = h.maintenance ? "let the scheduler place VMs here again" : "place no new VMs here; running VMs stay";
    const drain = state.features.drain && h.state !== "down" && shown !== "draining"
      ? button("Drain…", () => openDrain(h.name), "quiet", "drain") : null;
    const memUsed = isNum(h.memory_bytes) && isNum(h.memory_available_bytes) && h.memory_bytes > 0
      ? h.memory_available_bytes / h.memory_bytes : null;
    return [
      el("td", h.name, "strong"), stateCell(shown), numCell(count(h.cpus)), numCell(bytes(h.memory_bytes)),
      numCell(bytes(h.memory_available_bytes), memUsed !== null && memUsed < 0.1 ? "warn" : ""),
      numCell(fixed(h.load, 2)), numCell(count(onHost.get(h.name) || 0)),
      el("td", ago(h.last_heartbeat), h.state === "down" ? "bad" : "muted"), actionsCell(maint, drain),
    ];
  }), 9, "no hosts registered");
  tagRows($("hosts"), state.hosts.map((h) => h.name));
  const up = state.hosts.filter((h) => h.state === "up").length;
  const maint = state.hosts.filter((h) => h.maintenance).length;
  $("hosts-summary").textContent = up + " of " + state.hosts.length + " up" + (maint ? ", " + maint + " in maintenance" : "");
  $("count-hosts").textContent = String(state.hosts.length);
}

async function setMaintenance(name, on) {
  try {
    await call("PUT", "/hosts/{name}/maintenance", { params: { name }, body: { maintenance: on } });
    sectionError("hosts", null);
  } catch (err) {
    sectionError("hosts", err, "maintenance " + (on ? "on" : "off") + " for " + name);
  }
  schedule(0);
}

// -- drains ----------------------------------------------------------------------------------

function openDrain(host) {
  openPanel("drain", "Drain " + host, host);
  showResult($("drain-result"), "");
}

async function onDrain(ev) {
  ev.preventDefault();
  const host = state.panel && state.panel.key;
  const out = $("drain-result");
  const maxParallel = Number($("drain-parallel").value);
  try {
    const doc = await call("POST", "/hosts/{name}/drain", { params: { name: host }, body: { max_parallel: maxParallel } });
    state.drains.set(doc.id, doc);
    showResult(out, "drain " + doc.id + " started: " + (doc.vms || []).length + " VM(s) to move");
    renderDrains();
    renderHosts();
  } catch (err) {
    if (err.status === 404 && /route|not found/i.test(err.message)) state.features.drain = false;
    showResult(out, err.message, true);
  }
  schedule(0);
}

async function pollDrains() {
  for (const [id, d] of state.drains) {
    if (DRAIN_TERMINAL.has(d.state)) continue;
    try {
      state.drains.set(id, await call("GET", "/drains/{id}", { params: { id } }));
    } catch (err) {
      sectionError("hosts", err, "drain " + id);
    }
  }
}

function renderDrains() {
  const box = $("drains");
  const cards = [];
  for (const d of [...state.drains.values()].reverse()) {
    const card = el("div", null, "card");
    const head = el("div", null, "card-head");
    head.append(el("span", "Drain of " + d.host, "strong"), badge(d.state, d.state === "running" ? "moving" : d.state),
      el("span", "at most " + d.max_parallel + " at once · " + d.id, "muted mono"));
    if (DRAIN_TERMINAL.has(d.state)) head.append(button("Dismiss", () => { state.drains.delete(d.id); renderDrains(); renderHosts(); }, "quiet", "dismiss"));
    const table = el("table", null, "grid compact");
    const thead = el("thead");
    const hr = el("tr");
    for (const h of ["VM", "target", "migration", "state", "why"]) hr.append(el("th", h));
    thead.append(hr);
    const tbody = el("tbody");
    fillRows(tbody, (d.vms || []).map((v) => [
      el("td", v.vm, "strong"), v.target || DASH, monoCell(v.migration || DASH), stateCell(v.state),
      el("td", v.error || "", v.error ? "bad" : ""),
    ]), 5, "no VMs on this host");
    table.append(thead, tbody);
    card.append(head, table);
    cards.push(card);
  }
  box.replaceChildren(...cards);
}

// -- VMs -------------------------------------------------------------------------------------

function bootsFrom(spec) {
  if (!spec) return DASH;
  if (spec.disk) return spec.disk;
  if (spec.kernel) return spec.kernel + (spec.initrd ? " + " + spec.initrd : "");
  return DASH;
}

function renderVms() {
  fillRows($("vms"), state.vms.map((v) => {
    const spec = v.spec || {};
    const busy = state.pending.has(v.name);
    const start = STARTABLE.has(v.state) ? button("Start", () => vmAction(v.name, "start"), "quiet", "start") : null;
    const stop = STOPPABLE.has(v.state) ? button("Stop", () => vmAction(v.name, "stop"), "quiet", "stop") : null;
    const migrate = v.state === "running" ? button("Migrate…", () => openMigrate(v.name), "quiet", "migrate") : null;
    const console_ = state.features.console ? button("Console", () => openConsole(v.name), "quiet", "console") : null;
    for (const b of [start, stop, migrate]) if (b) b.disabled = busy;
    return [
      el("td", v.name, "strong"), v.host, stateCell(busy ? state.pending.get(v.name) : v.state),
      numCell(count(spec.vcpus)), numCell(isNum(spec.memory_mb) ? spec.memory_mb + " MiB" : DASH),
      el("td", bootsFrom(spec), "mono muted"), el("td", v.error || "", v.error ? "bad" : ""),
      actionsCell(start, stop, migrate, console_),
    ];
  }), 8, "no VMs");
  tagRows($("vms"), state.vms.map((v) => v.name));
  const running = state.vms.filter((v) => v.state === "running").length;
  $("vms-summary").textContent = running + " of " + state.vms.length + " running";
  $("count-vms").textContent = String(state.vms.length);
}

async function vmAction(name, action) {
  state.pending.set(name, action === "start" ? "starting" : "stopping");
  renderVms();
  try {
    if (action === "start") await call("POST", "/vms/{name}/start", { params: { name }, timeoutMs: SLOW_REQUEST_MS });
    else await call("POST", "/vms/{name}/stop", { params: { name }, timeoutMs: SLOW_REQUEST_MS });
    sectionError("vms", null);
  } catch (err) {
    sectionError("vms", err, action + " " + name);
  } finally {
    state.pending.delete(name);
  }
  schedule(0);
}

// -- create ----------------------------------------------------------------------------------

async function openCreate() {
  openPanel("create", "New VM", null);
  showResult($("create-result"), "");
  const hosts = state.hosts.filter(takesVms).map((h) => [h.name]);
  fillSelect($("create-host"), [["", "scheduler chooses"], ...hosts]);
  await loadImages();
}

// The images a spec may name: the chosen host's, or those every host that takes VMs offers
// (the scheduler may pick any of them).
async function loadImages() {
  const note = $("create-images-note");
  const chosen = $("create-host").value;
  const generation = ++state.imagesGeneration; // a slower, older listing must not win
  const hosts = chosen ? [chosen] : state.hosts.filter(takesVms).map((h) => h.name);
  let names = null;
  const sizes = new Map();
  try {
    for (const name of hosts) {
      const doc = await call("GET", "/hosts/{name}/images", { params: { name } });
      const here = new Set(doc.images.map((i) => i.name));
      for (const i of doc.images) sizes.set(i.name, i.size);
      names = names === null ? here : new Set([...names].filter((n) => here.has(n)));
    }
    if (generation !== state.imagesGeneration) return;
    note.textContent = !hosts.length ? "no host takes new VMs"
      : (names.size ? names.size + " image(s) offered by " + (chosen || "every host that takes VMs")
        : "no image is offered by " + (chosen || "every host that takes VMs"));
    note.className = names && names.size ? "muted" : "bad";
  } catch (err) {
    if (generation !== state.imagesGeneration) return;
    names = new Set();
    note.textContent = "images: " + err.message;
    note.className = "bad";
  }
  if (generation !== state.imagesGeneration) return;
  const list = [...(names || [])].sort();
  const opt = (n) => [n, n + " (" + bytes(sizes.get(n)) + ")"];
  const pick = (re) => list.find((n) => re.test(n));
  fillSelect($("create-kernel"), list.map(opt), pick(/vmlinu|bzimage|kernel/i));
  fillSelect($("create-initrd"), [["", "none"], ...list.map(opt)], pick(/initr|\.cpio/i) || "");
  fillSelect($("create-disk"), list.map(opt), pick(/\.(qcow2|img|raw)$/i));
}

function onBootKind() {
  const disk = $("create-boot").value === "disk";
  for (const node of document.querySelectorAll(".boot-kernel")) node.hidden = disk;
  for (const node of document.querySelectorAll(".boot-disk")) node.hidden = !disk;
}

function createSpec() {
  const spec = {
    name: $("create-name").value.trim(), vcpus: Number($("create-vcpus").value),
    memory_mb: Number($("create-memory").value), accel: $("create-accel").value,
  };
  if ($("create-boot").value === "disk") {
    spec.disk = $("create-disk").value;
    if (/\.qcow2$/i.test(spec.disk)) spec.disk_format = "qcow2";
  } else {
    spec.kernel = $("create-kernel").value;
    if ($("create-initrd").value) spec.initrd = $("create-initrd").value;
    const cmdline = $("create-cmdline").value.trim();
    if (cmdline) spec.cmdline = cmdline;
  }
  if ($("create-host").value) spec.host = $("create-host").value;
  return spec;
}

async function onCreate(ev) {
  ev.preventDefault();
  const out = $("create-result");
  const spec = createSpec();
  if (!spec.kernel && !spec.disk) { showResult(out, "choose an image the host offers", true); return; }
  showResult(out, "creating " + spec.name + " …");
  try {
    const vm = await call("POST", "/vms", { body: spec, timeoutMs: SLOW_REQUEST_MS });
    showResult(out, vm.name + " is " + vm.state + " on " + vm.host);
  } catch (err) {
    showResult(out, err.message, true);
  }
  schedule(0);
}

async function onPlace() {
  const out = $("create-result");
  const spec = createSpec();
  try {
    const res = await call("POST", "/placements", { body: { vm: { vcpus: spec.vcpus, memory_mb: spec.memory_mb } } });
    const ex = res.explanation || {};
    const lines = [res.placed ? "→ " + res.host : "no host fits", ex.why || ""];
    for (const [host, why] of Object.entries(ex.rejected || {})) {
      lines.push(host + ": " + (typeof why === "string" ? why : JSON.stringify(why)));
    }
    showResult(out, lines.filter(Boolean).join("\n"), !res.placed);
  } catch (err) {
    showResult(out, err.message, true);
  }
}

// -- migrate ---------------------------------------------------------------------------------

function openMigrate(vmName) {
  const vm = state.vms.find((v) => v.name === vmName);
  if (!vm) return;
  openPanel("migrate", "Migrate " + vmName, vmName);
  $("migrate-from").textContent = "now on " + vm.host;
  showResult($("migrate-result"), "");
  fillTargets();
  const policies = state.features.policies ? state.policies : [];
  $("migrate-policy-row").hidden = !state.features.policies;
  const fallback = "by the VM's policy or labels, else " + (state.policyDefault ? "the default (" + state.policyDefault + ")" : "none");
  fillSelect($("migrate-policy"), [["", fallback], ...policies.map((p) => [p.name, policyLabel(p)])]);
}

function fillTargets() {
  const vmName = state.panel && state.panel.key;
  const vm = state.vms.find((v) => v.name === vmName);
  const force = $("migrate-force").checked;
  fillSelect($("migrate-target"), state.hosts.filter((h) => !vm || h.name !== vm.host).map((h) => {
    const why = h.state !== "up" ? h.state : h.maintenance ? "maintenance" : "";
    return [h.name, h.name + (why ? " (" + why + ")" : ""), h.state !== "up" || (h.maintenance && !force)];
  }));
}

function policyLabel(p) {
  const parts = [];
  const o = p.options || p;
  if (isNum(o.bandwidth_mbps)) parts.push(o.bandwidth_mbps ? o.bandwidth_mbps + " MB/s" : "unlimited");
  if (isNum(o.downtime_ms)) parts.push(o.downtime_ms + " ms budget");
  return p.name + (parts.length ? " — " + parts.join(", ") : "");
}

async function onMigrate(ev) {
  ev.preventDefault();
  const out = $("migrate-result");
  const body = { vm: state.panel && state.panel.key, target: $("migrate-target").value };
  if (!body.vm || !body.target) { showResult(out, "choose a target host that is up", true); return; }
  const options = {};
  if ($("migrate-bandwidth").value !== "") options.bandwidth_mbps = Number($("migrate-bandwidth").value);
  if ($("migrate-downtime").value !== "") options.downtime_ms = Number($("migrate-downtime").value);
  if (Object.keys(options).length) body.options = options;
  if ($("migrate-force").checked) body.force = true;
  if (state.features.policies && $("migrate-policy").value) body.policy = $("migrate-policy").value;
  try {
    const mig = await call("POST", "/migrations", { body });
    state.migrations = [mig, ...state.migrations.filter((m) => m.id !== mig.id)];
    follow(mig.id);
    openDetail(mig.id);
  } catch (err) {
    showResult(out, err.message, true);
  }
  schedule(0);
}

// -- migrations ------------------------------------------------------------------------------

function current(m) { return state.live.get(m.id) || m; } // a live stream knows better than the last poll

function progressPct(m) {
  // the agent's data progress (acked bytes against acked + remaining; never runs backwards)
  const data = (m.metrics || {}).progress_pct;
  if (isNum(data)) return m.phase === "completed" ? 100 : data;
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

// Pages still to send in the current pre-copy round, from the agent's counters; null when
// they do not tell (e.g. before the first batch). Round 1 sends every page that is not zero;
// each later round the pages the previous one left dirty.
function pagesLeftInRound(m) {
  const met = m.metrics || {};
  if (m.phase !== "precopy" || !isNum(met.pages_sent) || !isNum(m.round) || m.round < 1) return null;
  const rounds = Array.isArray(met.rounds) ? met.rounds.filter((r) => !r.stop_and_copy) : null;
  if (!rounds || rounds.length !== m.round - 1) return null; // the record does not hold every round
  const before = rounds.reduce((sum, r) => sum + (isNum(r.pages_sent) ? r.pages_sent : 0), 0);
  const sentNow = met.pages_sent - before;
  let toSend;
  if (m.round === 1) {
    const zeroSent = (met.native || {}).pages_zero_sent;
    if (!isNum(met.pages) || !isNum(met.pages_zero) || !isNum(zeroSent)) return null;
    toSend = met.pages - (met.pages_zero - zeroSent);
  } else {
    toSend = rounds[rounds.length - 1].dirty_after;
    if (!isNum(toSend)) return null;
  }
  return Math.max(0, toSend - sentNow);
}

// Wire bytes per second measured between the stream's updates; the last round's rate until then.
function observe(m) {
  const met = m.metrics || {};
  if (!isNum(met.total_s) || !isNum(met.bytes_wire)) return;
  const prev = state.rates.get(m.id);
  if (!prev) { state.rates.set(m.id, { t: met.total_s, b: met.bytes_wire, rate: null }); return; }
  const dt = met.total_s - prev.t;
  if (dt < RATE_MIN_DT_S) return;
  const inst = Math.max(0, (met.bytes_wire - prev.b) / dt);
  state.rates.set(m.id, { t: met.total_s, b: met.bytes_wire, rate: prev.rate === null ? inst : 0.5 * inst + 0.5 * prev.rate });
}

function numbers(m) {
  const met = m.metrics || {};
  const done = TERMINAL.has(m.phase);
  if (isNum(met.bytes_acked) && isNum(met.remaining_bytes)) {
    // the agent's own figures: acknowledged by the destination, remaining from the dirty set
    return {
      sent: met.bytes_acked, remaining: m.phase === "completed" ? 0 : met.remaining_bytes,
      rate: done ? null : met.rate_bytes_s, eta: done ? null : met.eta_s,
    };
  }
  const measured = (state.rates.get(m.id) || {}).rate;
  const speed = done ? null : (isNum(measured) && measured > 0 ? measured : (met.bandwidth_bytes_s || null));
  const left = pagesLeftInRound(m);
  let eta = null;
  if (left !== null && isNum(speed) && speed > 0 && met.pages_sent > 0 && met.bytes_wire > 0) {
    eta = left * (met.bytes_wire / met.pages_sent) / speed; // at the wire bytes a page has cost so far
  }
  return {
    sent: met.bytes_wire, remaining: m.phase === "completed" ? 0 : left === null ? null : left * PAGE,
    rate: speed, eta: done ? null : eta,
  };
}

function budgetOf(m) {
  const eff = (m.metrics || {}).effective_options || {};
  const given = (m.options || {}).downtime_ms;
  return isNum(eff.downtime_ms) ? eff.downtime_ms : isNum(given) ? given : null;
}

function downtimeCell(m) {
  const met = m.metrics || {};
  const budget = budgetOf(m);
  const over = met.budget_exceeded === true || m.budget_exceeded === true || (isNum(met.downtime_ms) && isNum(budget) && met.downtime_ms > budget);
  const td = numCell(ms(met.downtime_ms), over ? "bad strong" : "");
  if (isNum(budget)) td.title = "budget " + ms(budget) + (over ? ": over budget" : "");
  if (over) td.textContent += " ▲";
  return td;
}

function progressCell(m) {
  const td = el("td", null, "progress");
  if (TERMINAL.has(m.phase)) {
    td.append(el("span", m.phase === "completed" ? "done" : m.error || m.phase, m.phase === "completed" ? "muted" : "bad clip"));
    if (m.error) td.title = m.error;
    return td;
  }
  const pct = progressPct(m);
  const bar = el("progress");
  bar.max = 100;
  bar.value = pct;
  td.title = m.phase + (m.round ? ", round " + m.round : "");
  td.append(bar, el("span", Math.floor(pct) + "%" + (m.round ? " · r" + m.round : ""), "pct"));
  return td;
}

function policyCell(m) {
  const td = el("td", m.policy || DASH, m.policy ? "" : "muted");
  if (m.policy_source) td.title = "chosen by " + m.policy_source;
  return td;
}

function renderMigrations() {
  const rows = state.migrations.map((stored) => {
    const m = current(stored);
    const n = numbers(m);
    const detail = button("Details", () => openDetail(m.id), "quiet", "details");
    const cancel = TERMINAL.has(m.phase) ? null : button("Cancel", () => cancelMigration(m.id), "quiet danger-text", "cancel");
    const tr = [
      monoCell(m.id), el("td", m.vm, "strong"), el("td", m.source + " → " + m.target),
      policyCell(m), stateCell(m.phase), progressCell(m),
      numCell(bytes(n.sent)), numCell(bytes(n.remaining)), numCell(rate(n.rate)), numCell(seconds(n.eta)),
      downtimeCell(m), numCell(seconds((m.metrics || {}).total_s)), actionsCell(detail, cancel),
    ];
    return tr;
  });
  fillRows($("migrations"), rows, 13, "no migrations yet");
  // tag rows with the migration id, so a test (or a person with devtools) can find one
  tagRows($("migrations"), state.migrations.map((m) => m.id));
  const active = state.migrations.filter((m) => !TERMINAL.has(current(m).phase)).length;
  $("migrations-summary").textContent = active ? active + " running" : "none running";
  $("count-migrations").textContent = active ? String(active) : "";
}

async function cancelMigration(id) {
  try {
    await call("POST", "/migrations/{id}/cancel", { params: { id } });
    sectionError("migrations", null);
  } catch (err) {
    sectionError("migrations", err, "cancel " + id);
  }
  schedule(0);
}

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
    observe(doc);
    renderMigrations();
    if (state.panel && state.panel.kind === "detail" && state.panel.key === id) renderDetail();
  }).catch((err) => {
    if (err.name !== "AbortError" && generation === state.generation) sectionError("migrations", err, "following " + id);
  }).finally(() => {
    clearTimeout(limit);
    state.streams.delete(id);
    if (generation === state.generation) schedule(0); // pick up the final record
  });
}

function stopStreams() {
  state.generation++;
  for (const ctl of state.streams.values()) ctl.abort();
  state.streams.clear();
  state.live.clear();
}

// -- migration detail ------------------------------------------------------------------------

function openDetail(id) {
  openPanel("detail", "Migration " + id, id);
  renderDetail();
}

function kv(list, label, value, cls) {
  list.append(el("dt", label), el("dd", value, cls));
}

function renderDetail() {
  const id = state.panel.key;
  const stored = state.migrations.find((m) => m.id === id);
  const box = $("detail-view");
  if (!stored) { box.replaceChildren(el("p", "not in the recent history", "muted")); return; }
  const m = current(stored);
  const met = m.metrics || {};
  const n = numbers(m);
  const budget = budgetOf(m);
  const over = met.budget_exceeded === true || m.budget_exceeded === true || (isNum(met.downtime_ms) && isNum(budget) && met.downtime_ms > budget);
  const parts = [];
  if (m.error) parts.push(el("p", m.error, "inline-error"));
  const head = el("div", null, "detail-head");
  head.append(badge(m.phase), el("span", m.vm + ": " + m.source + " → " + m.target, "strong"),
    el("span", "policy " + (m.policy || DASH) + (m.policy && m.policy_source ? " (by " + m.policy_source + ")" : ""), "muted"));
  parts.push(head);
  if (!TERMINAL.has(m.phase)) {
    const bar = el("progress");
    bar.max = 100;
    bar.value = progressPct(m);
    parts.push(bar);
  }

  const live = el("dl", null, "kv");
  kv(live, "sent", bytes(n.sent) + (isNum(met.pages_sent) ? " · " + count(met.pages_sent) + " pages" : ""));
  kv(live, "left in this round", n.remaining === null || TERMINAL.has(m.phase) ? DASH
    : bytes(n.remaining) + " of guest RAM · " + count(n.remaining / PAGE) + " pages");
  kv(live, "rate", rate(n.rate));
  kv(live, "ETA (this round)", seconds(n.eta));
  kv(live, "round", isNum(m.round) && m.round ? m.round + " of at most " + ((met.effective_options || {}).max_rounds || (m.options || {}).max_rounds || DASH) : DASH);
  const measured = Array.isArray(met.rounds) && met.rounds.length > 0;
  kv(live, "dirty rate", measured && isNum(met.dirty_rate_pages_s) ? count(Math.round(met.dirty_rate_pages_s)) + " pages/s · " + rate(met.dirty_rate_pages_s * PAGE) : DASH);
  kv(live, "dirty after last round", measured && isNum(met.dirty_pages_last_round) ? count(met.dirty_pages_last_round) + " pages" : DASH);
  kv(live, "throttle", isNum(met.throttle_pct) ? met.throttle_pct + " %" : DASH);
  kv(live, "converged", met.converged === true ? "yes" : met.converged === false ? "no" : DASH);
  kv(live, "guest RAM", isNum(met.pages) ? bytes(met.pages * PAGE) : DASH);
  kv(live, "compression", isNum(met.compression_ratio) ? met.compression_ratio.toFixed(2) + " ×" : DASH);
  kv(live, "dedup", isNum(met.dedup_ratio) ? (met.dedup_ratio * 100).toFixed(1) + " % of pages" : DASH);
  kv(live, "total time", seconds(met.total_s));
  kv(live, "started", clock(m.created_at));
  parts.push(el("h3", "Progress"), live);

  const down = el("dl", null, "kv");
  kv(down, "guest paused for", ms(met.downtime_ms), over ? "bad strong" : "");
  kv(down, "budget", ms(budget));
  kv(down, "against budget", isNum(met.downtime_ms) && isNum(budget) && budget > 0
    ? (100 * met.downtime_ms / budget).toFixed(0) + " %" + (over ? " — over budget" : "") : DASH, over ? "bad strong" : "");
  kv(down, "pause ceiling", ms(met.pause_ceiling_ms));
  for (const [part, v] of Object.entries(met.downtime_parts || {})) kv(down, "  · " + part.replace(/_ms$/, "").replace(/_/g, " "), ms(v), "muted");
  parts.push(el("h3", "Downtime"), down);
  if (isNum(met.downtime_ms) && isNum(budget) && budget > 0) {
    const meter = el("meter", null, "budget");
    meter.min = 0;
    meter.max = Math.max(budget, met.downtime_ms);
    meter.optimum = 0;
    meter.high = budget * 0.999;
    meter.value = met.downtime_ms;
    parts.push(meter);
  }

  const rounds = Array.isArray(met.rounds) ? met.rounds : [];
  const table = el("table", null, "grid compact");
  const hr = el("tr");
  for (const h of ["round", "pages", "wire", "time", "dirty after", "est. stop"]) hr.append(el("th", h, h === "round" ? "" : "num"));
  const thead = el("thead");
  thead.append(hr);
  const tbody = el("tbody");
  fillRows(tbody, rounds.map((r) => [
    el("td", r.stop_and_copy ? r.round + " final" : r.round), numCell(count(r.pages_sent)), numCell(bytes(r.wire_bytes)),
    numCell(seconds(r.seconds)), numCell(count(r.dirty_after)), numCell(isNum(r.estimated_stop_s) ? ms(r.estimated_stop_s * 1000) : DASH),
  ]), 6, TERMINAL.has(m.phase) ? "no per-round data recorded"
    : m.phase === "precopy" ? "no round finished yet" : "rounds start with pre-copy");
  table.append(thead, tbody);
  parts.push(el("h3", "Rounds"), table);
  box.replaceChildren(...parts);
}

// -- console ---------------------------------------------------------------------------------

function openConsole(vmName) {
  openPanel("console", "Console " + vmName, vmName);
  state.console = { vm: vmName, offset: 0, text: "", timer: null, generation: state.generation };
  $("console-text").textContent = "";
  showResult($("console-result"), "");
  pollConsole();
}

async function pollConsole() {
  const c = state.console;
  if (!c || state.panel === null || state.panel.kind !== "console" || c.generation !== state.generation) return;
  try {
    for (let i = 0; i < CONSOLE_READS; i++) {
      const doc = await call("GET", "/vms/{name}/console/log", { params: { name: c.vm }, query: { offset: c.offset } });
      if (state.console !== c) return;
      if (doc.next_offset <= c.offset) break;
      c.offset = doc.next_offset;
      c.text = (c.text + doc.text).slice(-CONSOLE_KEEP);
      if (doc.text.length < 1 << 19) break; // caught up
    }
    const pre = $("console-text");
    const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.textContent = c.text;
    if (atEnd) pre.scrollTop = pre.scrollHeight;
    showResult($("console-result"), "");
  } catch (err) {
    showResult($("console-result"), err.message, true);
  }
  if (state.console === c) c.timer = setTimeout(pollConsole, CONSOLE_POLL_MS);
}

async function onConsoleSend(ev) {
  ev.preventDefault();
  const c = state.console;
  if (!c) return;
  const line = $("console-line").value;
  try {
    await call("POST", "/vms/{name}/console", { params: { name: c.vm }, body: { text: line + "\n" } });
    $("console-line").value = "";
    showResult($("console-result"), "");
  } catch (err) {
    showResult($("console-result"), err.message, true);
  }
}

function stopConsole() {
  if (state.console) clearTimeout(state.console.timer);
  state.console = null;
}

// -- panel -----------------------------------------------------------------------------------

const PANEL_PARTS = { create: "create-form", migrate: "migrate-form", drain: "drain-form", console: "console-view", detail: "detail-view" };

function openPanel(kind, title, key) {
  stopConsole();
  state.panel = { kind, key };
  for (const [k, id] of Object.entries(PANEL_PARTS)) $(id).hidden = k !== kind;
  $("panel-title").textContent = title;
  $("panel").hidden = false;
  $("app").classList.add("with-panel");
}

function closePanel() {
  stopConsole();
  state.panel = null;
  $("panel").hidden = true;
  $("app").classList.remove("with-panel");
}

// -- audit -----------------------------------------------------------------------------------

async function refreshAudit() {
  try {
    const doc = await call("GET", "/audit", { query: { limit: AUDIT_LIMIT, ...state.audit } });
    fillRows($("audit"), doc.entries.map((e) => [
      auditTime(e.time), e.actor, el("td", e.action, "strong"), el("td", e.target, "mono"),
      stateCell(e.result), numCell(isNum(e.status) ? e.status : DASH), numCell(ms(e.duration_ms)), el("td", e.remote, "muted mono"),
    ]), 8, "no audit entries" + (Object.keys(state.audit).length ? " match the filter" : ""));
    sectionError("audit", null);
  } catch (err) {
    sectionError("audit", err);
  }
}

// "2026-11-30T15:11:30.491+00:00" -> "2026-11-30 15:11:30Z" (the full stamp on hover)
function auditTime(text) {
  const td = el("td", String(text).replace("T", " ").replace(/\.\d+/, "").replace(/\+00:00$|Z$/, "Z"), "mono muted");
  td.title = String(text);
  return td;
}

function onAuditFilter(ev) {
  ev.preventDefault();
  state.audit = {};
  const action = $("audit-filter").value.trim();
  if (action) state.audit.action = action;
  if ($("audit-result").value) state.audit.result = $("audit-result").value;
  refreshAudit();
}

// -- refresh loop ----------------------------------------------------------------------------

// Which optional routes this coordinator has (drain and policies arrive with newer versions).
async function detectFeatures() {
  const doc = await call("GET", "/openapi.json");
  const has = (method, path) => Boolean((doc.paths[API + path] || {})[method]);
  state.features = {
    drain: has("post", "/hosts/{name}/drain") && has("get", "/drains/{id}"),
    policies: has("get", "/migration-policies"),
    images: has("get", "/hosts/{name}/images"),
    console: has("get", "/vms/{name}/console"),
  };
  if (state.features.policies) {
    try {
      const res = await call("GET", "/migration-policies");
      const list = Array.isArray(res) ? res : Array.isArray(res.policies) ? res.policies
        : Object.entries(res.policies || {}).map(([name, p]) => ({ name, ...p }));
      state.policies = list.filter((p) => p && typeof p.name === "string");
      state.policyDefault = typeof res.default === "string" ? res.default : null;
    } catch (_) {
      state.features.policies = false; // hidden rather than offered broken
    }
  }
}

async function refresh() {
  if (!token()) return;
  try {
    if (!state.features.checked) { await detectFeatures(); state.features.checked = true; }
    const [hosts, vms, migrations] = await Promise.all([
      call("GET", "/hosts"),
      call("GET", "/vms"),
      call("GET", "/migrations", { query: { limit: HISTORY_LIMIT } }),
    ]);
    state.hosts = hosts.hosts;
    for (const h of state.hosts) { // drains started elsewhere (the CLI, another tab)
      if (h.drain && !state.drains.has(h.drain)) state.drains.set(h.drain, { id: h.drain, host: h.name, state: "running", vms: [] });
    }
    await pollDrains();
    state.vms = vms.vms;
    state.migrations = migrations.migrations;
    for (const m of state.migrations) {
      if (TERMINAL.has(m.phase)) { state.live.delete(m.id); state.rates.delete(m.id); continue; }
      if (!state.live.has(m.id)) observe(m);
      follow(m.id);
    }
    renderHosts();
    renderDrains();
    renderVms();
    renderMigrations();
    if (state.panel && state.panel.kind === "detail") renderDetail();
    if (state.panel && state.panel.kind === "migrate") fillTargets();
    await refreshAudit();
    state.failures = 0;
    showError(null);
    setStatus("live · updated " + new Date().toLocaleTimeString());
  } catch (err) {
    state.failures++;
    if (err.status === 401) { signOut("The coordinator no longer accepts this token: " + err.message); return; }
    showError(err);
  }
}

function busy() {
  return state.migrations.some((m) => !TERMINAL.has(current(m).phase))
    || [...state.drains.values()].some((d) => !DRAIN_TERMINAL.has(d.state));
}

function schedule(delay) {
  clearTimeout(state.timer);
  if (!token()) return;
  if (state.failures >= MAX_FAILURES) {
    setStatus("auto-refresh paused after " + MAX_FAILURES + " errors");
    return;
  }
  state.timer = setTimeout(async () => {
    if (document.hidden) { schedule(REFRESH_MS); return; } // no polling in a background tab
    await refresh();
    if (token()) schedule(busy() ? BUSY_REFRESH_MS : REFRESH_MS);
  }, delay);
}

// -- sign in / out ---------------------------------------------------------------------------

function showApp(signedIn) {
  $("login").hidden = signedIn;
  $("app").hidden = !signedIn;
  $("nav").hidden = !signedIn;
  $("signout").hidden = !signedIn;
}

async function onLogin(ev) {
  ev.preventDefault();
  const value = $("token").value.trim();
  $("token").value = ""; // the field never keeps it
  const box = $("login-error");
  box.hidden = true;
  if (!value) return;
  sessionStorage.setItem(TOKEN_KEY, value);
  try {
    await call("GET", "/hosts"); // proves the token before anything else is shown
  } catch (err) {
    sessionStorage.removeItem(TOKEN_KEY);
    box.textContent = err.status === 401 ? "Token refused: " + err.message : "Cannot reach the coordinator: " + err.message;
    box.hidden = false;
    return;
  }
  state.failures = 0;
  state.features = {};
  showApp(true);
  setStatus("loading …");
  schedule(0);
}

function signOut(why) {
  sessionStorage.removeItem(TOKEN_KEY);
  stopStreams();
  closePanel();
  clearTimeout(state.timer);
  state.hosts = []; state.vms = []; state.migrations = []; state.drains.clear(); state.rates.clear();
  for (const id of ["hosts", "vms", "migrations", "audit", "drains"]) $(id).replaceChildren();
  showError(null);
  showApp(false);
  setStatus("");
  const box = $("login-error");
  box.textContent = why || "";
  box.hidden = !why;
  $("token").focus();
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", onLogin);
  $("signout").addEventListener("click", () => signOut(""));
  $("panel-close").addEventListener("click", closePanel);
  $("create-open").addEventListener("click", openCreate);
  $("create-host").addEventListener("change", loadImages);
  $("create-boot").addEventListener("change", onBootKind);
  $("create-form").addEventListener("submit", onCreate);
  $("create-place").addEventListener("click", onPlace);
  $("migrate-form").addEventListener("submit", onMigrate);
  $("migrate-force").addEventListener("change", fillTargets);
  $("drain-form").addEventListener("submit", onDrain);
  $("console-form").addEventListener("submit", onConsoleSend);
  $("audit-form").addEventListener("submit", onAuditFilter);
  showApp(Boolean(token()));
  if (token()) schedule(0);
  else $("token").focus();
});
