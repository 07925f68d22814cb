// flock dashboard: polls /ui/api/overview on the node that served it and draws the cluster.
// No framework, no build step: plain DOM, every text set with textContent (never innerHTML).
"use strict";

const POLL_MS = 1000;
const HISTORY = 60; // points kept per sparkline
const state = { key: sessionStorage.getItem("flock-key") || "", auth: null, overview: null,
  history: {}, seen: {}, timer: null, chat: null, stageSeen: {} };

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.key) h["Authorization"] = "Bearer " + state.key;
  return h;
}

async function api(path, opts) {
  opts = opts || {};
  const response = await fetch(path, Object.assign({}, opts, {
    headers: headers(opts.headers), cache: "no-store" }));
  return response;
}

async function jsonOf(response) {
  const text = await response.text();
  try { return JSON.parse(text); } catch (e) { return { error: { message: text } }; }
}

function message(body) {
  if (!body) return "";
  if (typeof body.error === "string") return body.error;
  if (body.error && body.error.message) return body.error.message;
  if (body.errors) return body.errors.join("; ");
  return JSON.stringify(body);
}

const gib = (b) => (b / 2 ** 30).toFixed(1) + " GiB";
const mib = (b) => (b / 2 ** 20).toFixed(0) + " MiB";
const ms = (s) => (s === null || s === undefined ? "–" : (s * 1000).toFixed(0) + " ms");
const fixed = (x, d) => (x === null || x === undefined ? "–" : Number(x).toFixed(d));

// ---- auth -------------------------------------------------------------------------------------

async function checkAuth() {
  const response = await api("/ui/api/auth");
  state.auth = await response.json();
  const locked = state.auth.keys_required && !state.auth.key_ok;
  $("login").hidden = !locked;
  $("main").hidden = locked;
  if (locked) {
    $("summary").textContent = "API key required";
    if (state.key) $("key-error").textContent = "That key was refused.";
    $("key-input").focus();
    stopPolling();
    return false;
  }
  $("admin-note").textContent = state.auth.note;
  document.querySelectorAll("form.admin button").forEach((b) => {
    b.disabled = !(state.auth.admin === "key" || state.auth.admin === "loopback");
  });
  return true;
}

$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  state.key = $("key-input").value.trim();
  sessionStorage.setItem("flock-key", state.key);
  $("key-input").value = "";
  if (await checkAuth()) { $("key-error").textContent = ""; startPolling(); }
});

// ---- polling ----------------------------------------------------------------------------------

function stopPolling() { if (state.timer) clearTimeout(state.timer); state.timer = null; }

function startPolling() { stopPolling(); poll(); }

async function poll() {
  try {
    const response = await api("/ui/api/overview");
    if (response.status === 401) { await checkAuth(); return; }
    const data = await jsonOf(response);
    if (!response.ok) throw new Error(message(data));
    state.overview = data;
    $("error").textContent = "";
    render(data);
  } catch (e) {
    $("error").textContent = "Cannot reach this node: " + e.message;
  }
  state.timer = setTimeout(poll, POLL_MS);
}

// ---- rendering --------------------------------------------------------------------------------

function nodeName(status, id) {
  const n = status.nodes.find((x) => x.node_id === id) || state.seen[id];
  return n ? n.name : id.slice(0, 8);
}

function render(data) {
  const status = data.status;
  const leader = status.leader ? nodeName(status, status.leader) : "none";
  $("summary").textContent = `cluster ${status.cluster} · ${status.nodes.length} nodes · ` +
    `leader ${leader} · spec generation ${status.spec.generation}`;
  // A node forgotten by membership is still shown, dead, so a failure does not just vanish.
  const now = new Set(status.nodes.map((n) => n.node_id));
  for (const n of status.nodes) state.seen[n.node_id] = n;
  const rows = status.nodes.slice();
  for (const [id, n] of Object.entries(state.seen)) {
    if (!now.has(id)) rows.push(Object.assign({}, n, { status: "dead", leader: false, rtt_ms: null }));
  }
  renderGraph(status, rows);
  renderNodes(rows, data.live, status);
  // For bench/dashboard.py: when N nodes were first drawn, as a performance mark.
  const mark = "flock-nodes-" + rows.length;
  if (!performance.getEntriesByName(mark).length) performance.mark(mark);
  renderPlacements(status, data.live);
  renderFigures(status, data.live);
  renderModels(data.models, status, rows);
  renderTransfers(status, data.live);
  renderSpec(status, rows);
}

function replace(tbody, rows) { tbody.replaceChildren(...rows); }

function renderNodes(rows, live, status) {
  replace($("nodes").tBodies[0], rows.map((n) => {
    const figures = live[n.node_id] || {};
    const load = figures.load;
    const used = n.memory_total_bytes - n.memory_available_bytes;
    const share = n.memory_total_bytes ? used / n.memory_total_bytes : 0;
    const loadText = load ? `${fixed(load.load_avg[0], 2)} / ${load.cpu_count} cpu` +
      (load.runner_busy === null ? "" : ` · runners ${(load.runner_busy * 100).toFixed(0)}% busy`) : "–";
    return el("tr", { "data-node": n.node_id, "data-status": n.status },
      el("th", { scope: "row" }, n.name, n.leader ? " (leader)" : ""),
      el("td", { class: "status-" + n.status }, n.status),
      el("td", {}, `${n.backend}${n.blas ? " · " + n.blas : ""}${n.compute_gflops ? " · " + n.compute_gflops.toFixed(0) + " GFLOP/s" : ""}`),
      el("td", {}, el("span", { class: "meter", role: "img", "aria-label": `${(share * 100).toFixed(0)}% used` },
        el("span", { style: `width:${(share * 100).toFixed(0)}%` })), `${gib(used)} / ${gib(n.memory_total_bytes)}`),
      el("td", {}, loadText),
      el("td", {}, n.version),
      el("td", {}, String(n.spec_generation)),
      el("td", {}, n.rtt_ms === null || n.rtt_ms === undefined ? "–" : n.rtt_ms.toFixed(1) + " ms"));
  }));
  const bad = status.incompatible || [];
  $("incompatible").replaceChildren(...bad.map((b) =>
    el("p", { class: "warn" }, "incompatible: ", typeof b === "string" ? b : JSON.stringify(b))));
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function renderGraph(status, rows) {
  const g = $("graph");
  const cx = 300, cy = 130, r = rows.length > 1 ? 95 : 0;
  const pos = {};
  rows.forEach((n, i) => {
    const a = (2 * Math.PI * i) / rows.length - Math.PI / 2;
    pos[n.node_id] = [cx + r * Math.cos(a) * 1.8, cy + r * Math.sin(a)];
  });
  const parts = [];
  const self = status.node_id;
  for (const n of rows) {
    if (n.node_id === self || !pos[self]) continue;
    const [x1, y1] = pos[self], [x2, y2] = pos[n.node_id];
    parts.push(svg("line", { x1, y1, x2, y2, "stroke-dasharray": n.status === "dead" ? "4 4" : "none" }));
    if (n.rtt_ms !== null && n.rtt_ms !== undefined) {
      parts.push(svg("text", { x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 4, "text-anchor": "middle" },
        n.rtt_ms.toFixed(1) + " ms"));
    }
  }
  const colour = { self: "#2f8a57", alive: "#2f8a57", suspect: "#c08a00", dead: "#b3261e", unknown: "#888" };
  for (const n of rows) {
    const [x, y] = pos[n.node_id];
    const node = svg("g", { class: "graph-node", "data-node": n.node_id });
    node.append(svg("circle", { cx: x, cy: y, r: 16, fill: colour[n.status] || "#888" }));
    node.append(svg("text", { x, y: y + 30, "text-anchor": "middle" },
      `${n.name}${n.leader ? " ★" : ""} (${n.status})`));
    node.append(svg("title", {}, `${n.name}: ${n.status}, ${n.backend}, ${gib(n.memory_available_bytes)} free`));
    parts.push(node);
  }
  g.replaceChildren(...parts);
}

function runnerStates(live, placement) {
  // Each node reports its own runners; rank order follows the stages' node order.
  const out = [];
  let rank = 0;
  for (const stage of placement.stages) {
    for (const node of stage.nodes) {
      const runners = ((live[node] || {}).runners || []).filter((r) => r.key.startsWith(placement.instance_id + "/"));
      out.push({ rank, node, state: runners.length ? runners.map((r) => r.state).join(",") : "unknown" });
      rank += 1;
    }
  }
  return out;
}

function stageView(live, placement) {
  // A pipeline's stages as its head reports them: each stage's busy share of wall time since
  // the last poll (from busy-second totals) and the micro-batches in the ring.
  // Keyed by runner key (instance/rank): the head's rank reports for the whole ring.
  const reported = Object.entries((live[placement.head] || {}).stages || {})
    .find(([key]) => key.startsWith(placement.instance_id + "/"));
  const figures = reported && reported[1];
  if (!figures || !Object.keys(figures.busy_s).length) return null;
  const now = (live[placement.head] || {}).time || Date.now() / 1000;
  const seen = state.stageSeen[placement.instance_id];
  state.stageSeen[placement.instance_id] = { time: now, busy: figures.busy_s };
  const stages = Object.keys(figures.busy_s).sort((a, b) => a - b);
  const parts = stages.map((stage) => {
    const was = seen && seen.busy[stage];
    const share = seen && was !== undefined && now > seen.time
      ? Math.min(1, Math.max(0, (figures.busy_s[stage] - was) / (now - seen.time))) : null;
    return el("span", { class: "stage-busy", "data-stage": stage,
      "data-busy-s": figures.busy_s[stage].toFixed(3) },
      `stage ${stage} ${share === null ? "…" : Math.round(100 * share) + "%"}`);
  });
  const flight = figures.in_flight === null ? "" : ` · ${figures.in_flight} in flight`;
  return el("p", { class: "stages note", "data-in-flight": figures.in_flight ?? "" },
    "busy: ", ...parts.flatMap((p, i) => (i ? [" · ", p] : [p])), flight);
}

function renderPlacements(status, live) {
  const list = status.placements.map((p) => {
    const total = Math.max(...p.stages.map((s) => s.layer_stop), 1);
    const bar = el("div", { class: "bar", role: "img", "aria-label": `layers of ${p.instance_id}` },
      p.stages.map((s) => el("div", { class: "stage", style: `flex:${s.layer_stop - s.layer_start}`,
        "data-layers": `${s.layer_start}-${s.layer_stop - 1}`,
        title: `layers ${s.layer_start}-${s.layer_stop - 1} on ${s.nodes.map((x) => nodeName(status, x)).join(", ")}` },
      `${s.layer_start}–${s.layer_stop - 1} ${s.nodes.map((x) => nodeName(status, x)).join("+")}`)));
    const ranks = runnerStates(live, p);
    const removable = p.owner !== "spec";
    return el("div", { class: "placement", "data-instance": p.instance_id },
      el("h3", {}, `${p.model} · ${p.instance_id}`),
      el("p", {}, `strategy ${p.strategy} · owner ${p.owner} · ${total} layers · ${p.dtype || ""}` +
        (p.replicas !== undefined ? ` · replicas ${p.replicas}` : "") + (p.slot !== undefined && p.slot !== null ? ` · slot ${p.slot}` : "")),
      el("p", { class: "note" }, p.reason || ""),
      bar,
      stageView(live, p),
      el("ul", { class: "ranks" }, ranks.map((r) => el("li", {},
        `rank ${r.rank} on ${nodeName(status, r.node)}: `, el("span", { class: "state-" + r.state }, r.state)))),
      removable ? el("button", { type: "button", class: "admin-action",
        disabled: !(state.auth && (state.auth.admin === "key" || state.auth.admin === "loopback")),
        onclick: () => removeInstance(p.instance_id) }, `Remove ${p.instance_id}`) : null);
  });
  $("placement-list").replaceChildren(...(list.length ? list : [el("p", {}, "Nothing is placed.")]));
  $("problems").replaceChildren(...(status.problems || []).map((p) =>
    el("p", { class: "warn" }, `problem: ${p.instance_id}: ${p.message}`)));
}

function pushHistory(key, value) {
  const h = state.history[key] || (state.history[key] = []);
  h.push(value);
  if (h.length > HISTORY) h.shift();
  return h;
}

function spark(points, label) {
  const canvas = el("canvas", { class: "spark", width: 120, height: 28, role: "img", "aria-label": label });
  const ctx = canvas.getContext("2d");
  const max = Math.max(...points, 1e-9);
  ctx.strokeStyle = getComputedStyle(document.documentElement).getPropertyValue("--accent") || "#06c";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  points.forEach((v, i) => {
    const x = (i / Math.max(HISTORY - 1, 1)) * 120, y = 26 - (v / max) * 24;
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
  return canvas;
}

function renderFigures(status, live) {
  const rows = [];
  for (const n of status.nodes) {
    const figures = live[n.node_id];
    if (!figures) continue;
    if (figures.error) {
      rows.push(el("tr", {}, el("th", { scope: "row" }, n.name), el("td", { colspan: 8, class: "warn" }, figures.error)));
      continue;
    }
    for (const [model, f] of Object.entries(figures.models || {})) {
      const h = pushHistory(n.node_id + "/" + model, f.decode_tps);
      rows.push(el("tr", {},
        el("th", { scope: "row" }, n.name), el("td", {}, model),
        el("td", {}, fixed(f.decode_tps, 1)),
        el("td", {}, `${ms(f.ttft_p50_s)} / ${ms(f.ttft_p95_s)}`),
        el("td", {}, fixed(f.queued, 0)), el("td", {}, fixed(f.active, 0)),
        el("td", {}, `${mib(f.kv_used_bytes)} / ${mib(f.kv_capacity_bytes)}`),
        el("td", {}, f.prefix_hit_rate === null ? "–" : (f.prefix_hit_rate * 100).toFixed(0) + "%"),
        el("td", {}, spark(h, `decode tok/s of ${model} on ${n.name}, last ${h.length} samples`))));
    }
  }
  replace($("figures").tBodies[0], rows.length ? rows :
    [el("tr", {}, el("td", { colspan: 9 }, "No runner has reported yet."))]);
}

function optionsFor(select, names) {
  const current = select.value;
  const key = names.join("\n");
  if (select.dataset.names === key) return;
  select.dataset.names = key;
  select.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
  if (names.includes(current)) select.value = current;
}

function renderModels(models, status, rows) {
  const admin = state.auth && (state.auth.admin === "key" || state.auth.admin === "loopback");
  replace($("store").tBodies[0], models.store.map((m) => el("tr", {},
    el("th", { scope: "row" }, m.name), el("td", {}, m.architecture || "–"),
    el("td", {}, m.quantization || "–"), el("td", {}, m.size_bytes ? mib(m.size_bytes) : "–"),
    el("td", {}, el("button", { type: "button", disabled: !admin,
      onclick: () => removeModel(m.name) }, `Remove ${m.name}`)))));
  replace($("catalogue").tBodies[0], models.catalogue.map((m) => el("tr", {},
    el("th", { scope: "row" }, m.name), el("td", {}, m.nodes.map((x) => nodeName(status, x)).join(", ")))));
  const known = $("known-models");
  if (known.dataset.filled !== "1") {
    known.replaceChildren(...models.known.map((n) => el("option", { value: n })));
    known.dataset.filled = "1";
  }
  const names = [...new Set([...models.catalogue.map((m) => m.name), ...status.placements.map((p) => p.model)])].sort();
  optionsFor($("place-model"), names);
  optionsFor($("chat-model"), [...new Set(status.placements.map((p) => p.model).concat(names))]);
  const boxes = $("place-nodes");
  const ids = rows.filter((n) => n.status !== "dead").map((n) => n.node_id);
  if (boxes.dataset.ids !== ids.join(",")) {
    boxes.dataset.ids = ids.join(",");
    boxes.replaceChildren(el("legend", {}, "Nodes (none ticked: placement chooses)"),
      ...ids.map((id) => el("label", {}, el("input", { type: "checkbox", value: id, name: "place-node" }), " ", nodeName(status, id))));
  }
}

function renderTransfers(status, live) {
  const rows = [];
  for (const [node, figures] of Object.entries(live)) {
    for (const t of (figures.transfers || [])) {
      const seconds = Math.max(figures.time - t.started, 0.001);
      rows.push(el("tr", {}, el("th", { scope: "row" }, nodeName(status, node)), el("td", {}, t.model),
        el("td", {}, t.layers), el("td", {}, mib(t.bytes)), el("td", {}, mib(t.bytes / seconds) + "/s")));
    }
  }
  replace($("transfers").tBodies[0], rows.length ? rows : [el("tr", {}, el("td", { colspan: 5 }, "None."))]);
}

function renderSpec(status, rows) {
  const spec = status.spec;
  $("spec-summary").textContent = `generation ${spec.generation}` +
    (spec.hash ? ` (${spec.hash.slice(0, 12)})` : "") +
    (spec.local_file ? ` · this node's file: ${spec.local_file}` : "") + " · nodes follow: " +
    rows.map((n) => `${n.name} ${n.spec_generation}`).join(", ");
  $("spec-errors").replaceChildren(...spec.errors.map((e) => el("li", { role: "alert" }, e)));
}

// ---- actions ----------------------------------------------------------------------------------

async function removeInstance(id) {
  const response = await api("/cluster/instances/" + encodeURIComponent(id), { method: "DELETE" });
  $("place-status").textContent = response.ok ? `removed ${id}` : message(await jsonOf(response));
}

async function removeModel(name) {
  if (!confirm(`Remove ${name} from this node's store?`)) return;
  const response = await api("/ui/api/models/" + encodeURIComponent(name), { method: "DELETE" });
  $("pull-status").textContent = response.ok ? `removed ${name}` : message(await jsonOf(response));
}

$("place-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const nodes = [...document.querySelectorAll("input[name=place-node]:checked")].map((b) => b.value);
  const body = { model: $("place-model").value, strategy: $("place-strategy").value };
  if (nodes.length) body.nodes = nodes;
  $("place-status").textContent = "placing…";
  const response = await api("/cluster/instances", { method: "POST",
    headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  const data = await jsonOf(response);
  $("place-status").textContent = response.ok ? `placed ${data.instance_id}` : message(data);
});

async function readLines(response, onLine) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, cut).trim();
      buffer = buffer.slice(cut + 1);
      if (line) onLine(line);
    }
  }
  if (buffer.trim()) onLine(buffer.trim());
}

$("pull-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const bar = $("pull-progress"), out = $("pull-status");
  bar.hidden = false; bar.removeAttribute("value"); out.textContent = "starting…";
  const response = await api("/ui/api/pull", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ name: $("pull-name").value }) });
  if (!response.ok) { out.textContent = message(await jsonOf(response)); bar.hidden = true; return; }
  await readLines(response, (line) => {
    const item = JSON.parse(line);
    if (item.status) out.textContent = item.status;
    if (item.total) { bar.max = item.total; bar.value = item.completed; out.textContent = `${mib(item.completed)} / ${mib(item.total)}`; }
    if (item.done) { out.textContent = `pulled ${item.done}`; bar.value = bar.max; }
    if (item.error) out.textContent = item.error;
  });
});

$("chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const output = $("chat-output"), stats = $("chat-stats");
  const controller = new AbortController();
  state.chat = controller;
  $("chat-send").disabled = true; $("chat-stop").disabled = false;
  output.textContent = ""; stats.textContent = "waiting for the first token…";
  const started = performance.now();
  let first = 0, tokens = 0;
  try {
    const response = await fetch("/v1/chat/completions", { method: "POST", signal: controller.signal,
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({ model: $("chat-model").value, stream: true, max_tokens: 256,
        messages: [{ role: "user", content: $("chat-input").value }] }) });
    if (!response.ok) throw new Error(message(await jsonOf(response)));
    await readLines(response, (line) => {
      if (!line.startsWith("data:")) return;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(message(chunk));
      const piece = (chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content) || "";
      if (!piece) return;
      if (!first) first = performance.now();
      tokens += 1;
      output.textContent += piece;
      const rate = tokens > 1 ? (tokens - 1) / ((performance.now() - first) / 1000) : 0;
      stats.textContent = `TTFT ${(first - started).toFixed(0)} ms · ${rate.toFixed(1)} tok/s · ${tokens} chunks`;
    });
    stats.textContent += " · done";
  } catch (e) {
    stats.textContent = controller.signal.aborted ? stats.textContent + " · stopped" : "error: " + e.message;
  } finally {
    $("chat-send").disabled = false; $("chat-stop").disabled = true; state.chat = null;
  }
});

$("chat-stop").addEventListener("click", () => { if (state.chat) state.chat.abort(); });

$("doctor-run").addEventListener("click", async () => {
  const body = $("doctor-results").tBodies[0];
  body.replaceChildren(el("tr", {}, el("td", { colspan: 3 }, "running…")));
  const response = await api("/ui/api/doctor", { method: "POST" });
  const data = await jsonOf(response);
  if (!response.ok || data.error) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: 3, role: "alert" }, message(data)))); return;
  }
  body.replaceChildren(...data.checks.map((c) => el("tr", {},
    el("th", { scope: "row" }, c.name), el("td", { class: c.status }, c.status),
    el("td", {}, c.detail, c.fix ? el("br") : null, c.fix ? "fix: " + c.fix : null))));
});

$("theme").addEventListener("click", () => {
  const root = document.documentElement;
  const dark = root.dataset.theme ? root.dataset.theme === "dark" : matchMedia("(prefers-color-scheme: dark)").matches;
  root.dataset.theme = dark ? "light" : "dark";
  localStorage.setItem("flock-theme", root.dataset.theme);
});
if (localStorage.getItem("flock-theme")) document.documentElement.dataset.theme = localStorage.getItem("flock-theme");

checkAuth().then((ok) => { if (ok) startPolling(); }).catch((e) => { $("error").textContent = e.message; });
