// runner dashboard: draws the page from the JSON inlined in it, then keeps it live from the runner server's REST
// API (the same routes the CLI uses). DOM built with textContent only: no server text is ever parsed as HTML.
"use strict";

const DATA = JSON.parse(document.getElementById("data").textContent);
const CSRF = document.querySelector('meta[name="csrf"]').content;
const PAGE = document.body.dataset.page;
const MAIN = document.getElementById("main");
const ACTIVE = ["STARTING", "RUNNING", "RETRYING", "EXPORTING"];
const ENDED = ["SUCCEEDED", "FAILED", "CANCELLED", "STOPPED"];
const STATES = ["QUEUED", ...ACTIVE, ...ENDED];

// ---- helpers --------------------------------------------------------------------------------------------------

function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}
const $ = (sel, el = document) => el.querySelector(sel);
const SVG = "http://www.w3.org/2000/svg";
function s(tag, attrs) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  return el;
}

class ApiError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  const init = { credentials: "same-origin", ...options, headers: { ...(options.headers || {}) } };
  if (init.method && init.method !== "GET") {
    init.headers["X-Runner-CSRF"] = CSRF;
    init.headers["Content-Type"] = "application/json";
  }
  const r = await fetch(path, init);
  if (r.status === 401) {
    location.href = "/login?next=" + encodeURIComponent(location.pathname + location.search);
    throw new ApiError("log in again", 401);
  }
  const body = (r.headers.get("content-type") || "").includes("json") ? await r.json() : await r.text();
  if (!r.ok) {
    const d = body && body.detail;
    throw new ApiError(typeof d === "string" ? d : JSON.stringify(d || body), r.status);
  }
  return body;
}

const post = (path, body) => api(path, { method: "POST", body: JSON.stringify(body || {}) });

function stateBadge(state) { return h("span", { class: "state " + state, text: state }); }

function duration(sec) {
  if (sec === null || sec === undefined || isNaN(sec)) return "";
  sec = Math.round(sec);
  if (sec < 60) return sec + " s";
  const m = Math.floor(sec / 60), r = sec % 60;
  if (m < 60) return m + " min " + String(r).padStart(2, "0") + " s";
  const hh = Math.floor(m / 60);
  if (hh < 48) return hh + " h " + String(m % 60).padStart(2, "0") + " min";
  return Math.floor(hh / 24) + " d " + (hh % 24) + " h";
}
// The CLI's format, whatever the browser's locale: 14:15:05 today, 2026-11-28 14:15:05 on another day.
function when(t) {
  if (!t) return "";
  const d = new Date(t * 1000), now = new Date(), two = (n) => String(n).padStart(2, "0");
  const time = `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`;
  return d.toDateString() === now.toDateString() ? time
    : `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())} ${time}`;
}
function num(x, digits = 3) {
  if (x === null || x === undefined) return "";
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x)) return x.toLocaleString();
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return x.toExponential(2);
  return x.toLocaleString(undefined, { maximumFractionDigits: digits });
}
function bytes(n) {
  if (n === null || n === undefined) return "";
  const u = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < u.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(n < 10 ? 2 : 1) : n) + " " + u[i];
}
function bar(fraction, cls) {
  const b = h("div", { class: "bar" + (cls ? " " + cls : "") }, h("span"));
  b.firstChild.style.width = Math.max(0, Math.min(1, fraction || 0)) * 100 + "%";
  return b;
}
function gpus(job) {
  return job.workers + " × " + (job.gpus ? num(job.gpus) + " GPU" : num(job.cpus) + " CPU");
}

// Calls fn now and every `ms` while the tab is visible; the header's "live" mark says whether the last call worked.
function every(ms, fn) {
  const live = $("#live");
  let timer = null, stopped = false;
  async function tick() {
    if (stopped) return;
    if (document.visibilityState !== "visible") { live.className = "live paused"; live.textContent = "paused"; return; }
    try {
      const more = await fn();
      live.className = "live"; live.textContent = "live";
      if (more === false) { stopped = true; live.textContent = "up to date"; return; }
    } catch (e) {
      live.className = "live stale"; live.textContent = "cannot reach the server";
    }
    timer = setTimeout(tick, ms);
  }
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible" && !stopped) { clearTimeout(timer); tick(); }
  });
  tick();
  return { stop() { stopped = true; clearTimeout(timer); } };
}

// ---- theme and navigation ---------------------------------------------------------------------------------------

(function theme() {
  const root = document.documentElement, system = matchMedia("(prefers-color-scheme: dark)");
  const apply = () => { root.dataset.theme = localStorage.getItem("runner-theme") || (system.matches ? "dark" : "light"); };
  apply();
  system.addEventListener("change", apply);
  $("#theme").addEventListener("click", () => {
    localStorage.setItem("runner-theme", root.dataset.theme === "dark" ? "light" : "dark");
    apply();
  });
  const nav = document.querySelector(`[data-nav="${PAGE === "job" ? "jobs" : PAGE}"]`);
  if (nav) nav.classList.add("here");
})();

// ---- charts -----------------------------------------------------------------------------------------------------

// series: [{label, step: [...], value: [...]}]. Draws lines on shared axes; data-points on the svg counts the points.
function chart(series, opts = {}) {
  const W = 460, H = 200, L = 58, R = 10, T = 10, B = 24;
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": opts.title || "chart" });
  const drawn = series.filter((x) => x.step.length);
  const total = drawn.reduce((a, x) => a + x.step.length, 0);
  svg.dataset.points = String(total);
  if (!drawn.length) {
    const t = s("text", { x: W / 2, y: H / 2, "text-anchor": "middle" });
    t.textContent = opts.empty || "no figures yet";
    svg.append(t);
    return h("div", {}, svg);
  }
  let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
  for (const x of drawn) {
    for (const v of x.step) { x0 = Math.min(x0, v); x1 = Math.max(x1, v); }
    for (const v of x.value) { y0 = Math.min(y0, v); y1 = Math.max(y1, v); }
  }
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  const least = Math.max(Math.abs(y0), Math.abs(y1)) * 0.02 || 1;  // a flat line is drawn flat, not magnified
  if (y1 - y0 < least) { const mid = (y0 + y1) / 2; y0 = mid - least / 2; y1 = mid + least / 2; }
  const pad = (y1 - y0) * 0.05, floor = y0 >= 0 ? 0 : -Infinity;
  y0 = Math.max(floor, y0 - pad); y1 += pad;
  const X = (v) => L + ((v - x0) / (x1 - x0)) * (W - L - R);
  const Y = (v) => T + (1 - (v - y0) / (y1 - y0)) * (H - T - B);
  const tick = (y1 - y0) / 4, digits = Math.max(0, Math.min(8, 1 - Math.floor(Math.log10(tick))));
  for (let i = 0; i <= 4; i++) {
    const v = y0 + tick * i, y = Y(v);
    svg.append(s("line", { class: "gridline", x1: L, x2: W - R, y1: y, y2: y }));
    const t = s("text", { x: L - 6, y: y + 4, "text-anchor": "end" });
    t.textContent = Math.abs(v) >= 1e5 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(2) : v.toFixed(digits);
    svg.append(t);
  }
  for (const [v, anchor] of [[x0, "start"], [x1, "end"]]) {
    const t = s("text", { x: X(v), y: H - 8, "text-anchor": anchor });
    t.textContent = "step " + num(Math.round(v));
    svg.append(t);
  }
  drawn.forEach((x, i) => {
    const cls = "s" + (series.indexOf(x) % 6);
    if (x.step.length === 1) {
      svg.append(s("circle", { class: cls, cx: X(x.step[0]), cy: Y(x.value[0]), r: 3 }));
    } else {
      const pts = x.step.map((st, j) => X(st).toFixed(1) + "," + Y(x.value[j]).toFixed(1)).join(" ");
      svg.append(s("polyline", { class: cls + (x.strong ? " strong" : ""), points: pts, "vector-effect": "non-scaling-stroke" }));
    }
  });
  const legend = h("div", { class: "legend" }, series.map((x, i) => h("span", {},
    h("i", { class: "s" + (i % 6) }), x.label + (x.points > x.step.length ? ` (${num(x.points)} steps, ${x.step.length} shown)` : ""))));
  return h("div", { class: "chart-wrap", dataset: { points: String(total) } }, svg, legend);
}

// ---- jobs page --------------------------------------------------------------------------------------------------

function jobsPage() {
  const st = { state: DATA.state || "", q: DATA.q || "", page: DATA.page || 1, size: DATA.page_size };
  const counts = h("div", { class: "counts" });
  const search = h("input", { type: "search", placeholder: "Filter by id, name or model", value: st.q,
                              "aria-label": "filter" });
  const pager = h("div", { class: "pager" });
  const body = h("tbody");
  const table = h("table", { id: "jobs" },
    h("thead", {}, h("tr", {}, ["State", "Name", "Model", "Mode", "Workers", "Progress", "Throughput", "Queue",
                                "Started", "Duration"].map((t) => h("th", { text: t, class: t === "Throughput" ? "num" : null })))),
    body);
  MAIN.append(h("h1", { text: "Jobs" }), h("div", { class: "toolbar" }, counts, search, pager),
              h("div", { class: "panel" }, table));

  function url() {
    const p = new URLSearchParams();
    if (st.state) p.set("state", st.state);
    if (st.q) p.set("q", st.q);
    p.set("limit", st.size); p.set("offset", (st.page - 1) * st.size);
    return p;
  }
  function draw(list) {
    counts.replaceChildren(
      h("span", { class: "chip" + (st.state ? "" : " on"), text: "All " + num(Object.values(list.counts).reduce((a, b) => a + b, 0)),
                  onclick: () => { st.state = ""; st.page = 1; refresh(); } }),
      ...STATES.map((name) => h("span", { class: "chip" + (st.state === name ? " on" : ""), dataset: { state: name },
        text: name.toLowerCase() + " " + num(list.counts[name] || 0),
        onclick: () => { st.state = st.state === name ? "" : name; st.page = 1; refresh(); } })));
    const first = list.total ? list.offset + 1 : 0, last = list.offset + list.jobs.length;
    pager.replaceChildren(
      h("button", { text: "‹ Newer", disabled: st.page <= 1, onclick: () => { st.page--; refresh(); } }),
      h("span", { class: "muted small", text: `${num(first)}–${num(last)} of ${num(list.total)}` }),
      h("button", { text: "Older ›", disabled: last >= list.total, onclick: () => { st.page++; refresh(); } }));
    if (!list.jobs.length) {
      body.replaceChildren(h("tr", {}, h("td", { colspan: 10, class: "empty",
        text: st.state || st.q ? "No job matches these filters." : "No jobs yet: runner submit recipe.yaml" })));
      return;
    }
    body.replaceChildren(...list.jobs.map(row));
  }
  function row(j) {
    const p = j.progress || {};
    const frac = p.total_steps ? p.step / p.total_steps : 0;
    const progress = j.state === "QUEUED" ? "" : p.step ? h("div", {},
      bar(j.state === "SUCCEEDED" ? 1 : frac, j.state === "RETRYING" ? "warn" : ""),
      h("span", { class: "small", text: `step ${num(p.step)}/${p.total_steps ? num(p.total_steps) : "?"}` +
                                        (j.eta_s !== null && j.eta_s !== undefined ? ` · ETA ${duration(j.eta_s)}` : "") })) : "";
    const queue = j.state === "QUEUED"
      ? h("div", {}, h("b", { text: j.queue_position ? "#" + j.queue_position : "" }), " ",
          h("span", { class: "muted small", text: j.waiting_for || "" }))
      : (j.state === "FAILED" && j.reason ? h("span", { class: "error small", text: j.reason }) : "");
    return h("tr", { dataset: { id: j.id, state: j.state } },
      h("td", {}, stateBadge(j.state)),
      h("td", {}, h("a", { href: "/ui/jobs/" + encodeURIComponent(j.id), text: j.name }), h("span", { class: "sub mono", text: j.id }),
        j.sweep ? h("span", { class: "sub sweep-note", text: `sweep: ${j.sweep.trials.length} of ${j.sweep.trial_count ?? "?"} trials` +
                                                        (j.sweep.chosen ? `, chose ${j.sweep.chosen.split("-").at(-1)}` : "") }) : ""),
      h("td", { class: "small", text: j.model || "" }),
      h("td", { text: j.mode || "" }),
      h("td", { class: "nowrap", text: gpus(j) }),
      h("td", {}, progress),
      h("td", { class: "num nowrap", text: ACTIVE.includes(j.state) && p.samples_per_s ? num(p.samples_per_s, 1) + " samples/s" : "" }),
      h("td", { class: "queue" }, queue),
      h("td", { class: "nowrap small", text: when(j.started_at) }),
      h("td", { class: "nowrap small", text: duration(j.duration_s) }));
  }
  let typing = null;
  search.addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => { st.q = search.value.trim(); st.page = 1; refresh(); }, 250);
  });
  async function load() {
    const list = await api("/jobs?" + url());
    draw(list);
    const shown = new URLSearchParams();
    if (st.state) shown.set("state", st.state);
    if (st.q) shown.set("q", st.q);
    if (st.page > 1) shown.set("page", st.page);
    history.replaceState(null, "", "/ui/jobs" + (shown.toString() ? "?" + shown : ""));
  }
  let poller = null;
  function refresh() { if (poller) poller.stop(); poller = every(2000, load); }
  draw(DATA.list);
  poller = every(2000, load);
}

// ---- job page ---------------------------------------------------------------------------------------------------

function jobPage() {
  const id = DATA.id;
  if (DATA.missing) {
    MAIN.append(h("h1", { text: "No such job" }), h("p", { class: "muted", text: DATA.missing }),
                h("a", { href: "/ui/jobs", text: "All jobs" }));
    return;
  }
  const base = "/jobs/" + encodeURIComponent(id);
  const title = h("h1", {});
  const reason = h("div");
  const cards = h("div", { class: "grid" });
  const lossBox = h("div", { class: "panel", id: "loss" }, h("h2", { text: "Loss" }));
  const evalBox = h("div", { class: "panel", id: "evaluation" }, h("h2", { text: "Evaluation (validation)" }));
  const speedBox = h("div", { class: "panel", id: "throughput" }, h("h2", { text: "Throughput" }));
  const lrBox = h("div", { class: "panel", id: "lr" }, h("h2", { text: "Learning rate" }));
  const results = h("div", { class: "panel", id: "results" });
  const sweepBox = h("div", { class: "panel section", id: "sweep" });
  const exportBox = h("div", { class: "panel", id: "export" });
  const ckpts = h("div", { class: "panel", id: "checkpoints" });
  const files = h("div", { class: "panel", id: "artifacts" });
  const events = h("ol", { class: "events" });
  const log = h("pre", { class: "log", id: "log" });
  const recipe = h("pre", { class: "recipe", id: "recipe" });
  MAIN.append(title, reason, cards, sweepBox,
    h("div", { class: "cols" }, lossBox, evalBox, speedBox, lrBox),
    h("div", { class: "cols section" }, results, exportBox),
    h("div", { class: "cols section" }, ckpts, files),
    h("div", { class: "panel section", id: "logs" }, h("h2", { text: "Log" }), log),
    h("div", { class: "cols" }, h("div", { class: "panel", id: "history" }, h("h2", { text: "State history" }), events),
      h("div", { class: "panel" }, h("h2", { text: "Recipe (secrets redacted)" }), recipe)));

  let job = DATA.job, lastEvent = 0, lastStep = -1, lastState = null, extrasAt = 0;

  function drawHeader() {
    const actions = h("span", { class: "actions" });
    if (job.kind === "trial") {  // a trial is cancelled, retried and removed with its sweep
      actions.append(h("a", { href: "/ui/jobs/" + encodeURIComponent(job.parent), id: "sweep-link",
                              text: "trial of sweep " + job.parent }));
    } else if (!ENDED.includes(job.state)) {
      actions.append(h("button", { class: "danger", id: "cancel", text: "Cancel", onclick: async () => {
        if (!confirm(`Cancel job ${id}? Its workers are stopped; a retry can go on from its last checkpoint.`)) return;
        try { job = await post(base + "/cancel"); drawHeader(); } catch (e) { alert(e.message); }
      } }));
    }
    if ((job.state === "FAILED" || job.state === "CANCELLED") && job.kind !== "trial") {
      for (const [label, fromCkpt] of [["Retry", false], ["Retry from checkpoint", true]]) {
        actions.append(h("button", { text: label, id: fromCkpt ? "retry-checkpoint" : "retry", onclick: async () => {
          if (!confirm(`${label}: job ${id} goes back in the queue as attempt ${job.attempt + 1}.`)) return;
          // a new attempt: the page starts over (the live updates and the log stream had stopped at the end)
          try { await post(base + "/retry", { from_checkpoint: fromCkpt }); location.reload(); } catch (e) { alert(e.message); }
        } }));
      }
    }
    const ray = job.ray_url ? h("a", { href: job.ray_url, target: "_blank", rel: "noopener", class: "small",
                                       text: "in Ray's dashboard ↗" }) : "";
    title.replaceChildren(h("span", { text: job.name }), stateBadge(job.state),
                          h("span", { class: "muted small mono", text: job.id }), ray, actions);
    reason.replaceChildren();
    if ((job.warnings || []).length) {
      reason.append(h("div", { class: "reason warn", id: "warnings" }, h("b", { text: "Warnings" }),
        h("ul", {}, job.warnings.map((w) => h("li", {}, h("span", { class: "muted small", text: when(w.at) + " " }), w.message)))));
    }
    if (job.state === "QUEUED") {
      reason.append(h("div", { class: "reason wait", id: "waiting" },
        h("b", { text: job.queue_position ? `#${job.queue_position} in the queue: ` : "queued: " }), job.waiting_for || ""));
    } else if (job.reason && (job.state === "FAILED" || job.state === "CANCELLED")) {
      reason.append(h("div", { class: "reason", id: "reason" }, h("b", { text: job.state === "FAILED" ? "Failed: " : "Cancelled: " }), job.reason));
    } else if (job.reason && job.state === "SUCCEEDED") {
      reason.append(h("div", { class: "reason warn", id: "reason" }, h("b", { text: "Succeeded, but: " }), job.reason));
    }
    const p = job.progress || {};
    const card = (k, v, extra) => h("div", { class: "card" }, h("div", { class: "k", text: k }), h("div", { class: "v", text: v }), extra || "");
    cards.replaceChildren(
      card("Model", job.model || ""), card("Tuning", job.mode || ""), card("Workers", gpus(job)),
      card("Progress", p.step ? `step ${num(p.step)}/${p.total_steps ? num(p.total_steps) : "?"}` : "—",
           p.total_steps ? bar(job.state === "SUCCEEDED" ? 1 : p.step / p.total_steps) : ""),
      card("ETA", job.eta_s !== null && job.eta_s !== undefined ? duration(job.eta_s) : "—"),
      card("Throughput", !p.samples_per_s ? "—" : (ACTIVE.includes(job.state) ? "" : "last ") +
                         `${num(p.samples_per_s, 1)} samples/s`),
      card("Latest loss", p.loss !== undefined && p.loss !== null ? num(p.loss, 4) : "—"),
      card("Attempt", String(job.attempt || 0)), card("Priority", String(job.priority)),
      card("Started", when(job.started_at) || "—"), card("Duration", duration(job.duration_s) || "—"));
  }

  async function drawCharts() {
    const sr = await api(base + "/series");
    const t = sr.train || {}, v = sr.validation || {};
    const line = (label, x) => x ? { label, step: x.step, value: x.value, points: x.points } : { label, step: [], value: [] };
    lossBox.replaceChildren(h("h2", { text: "Loss" }), chart([line("train", t.loss), line("validation", v.loss)], { title: "loss" }));
    const evalKeys = ["accuracy", "macro_f1", "mse", "mae", "perplexity"].filter((k) => v[k]);
    evalBox.replaceChildren(h("h2", { text: "Evaluation (validation)" }),
      chart(evalKeys.map((k) => line(k, v[k])), { title: "evaluation", empty: "no validation yet" }));
    speedBox.replaceChildren(h("h2", { text: "Throughput" }), chart([line("samples/s", t.samples_per_s)], { title: "throughput" }),
      t.tokens_per_s ? h("div", { class: "small muted", text: `latest: ${num(t.tokens_per_s.value.at(-1), 0)} tokens/s` }) : "");
    lrBox.replaceChildren(h("h2", { text: "Learning rate" }), chart([line("lr", t.lr)], { title: "learning rate" }));
  }

  function table(head, rows, classes = []) {
    return h("table", {}, h("thead", {}, h("tr", {}, head.map((x) => h("th", { text: x })))),
      h("tbody", {}, rows.map((r, i) => h("tr", { class: classes[i] || "" }, r.map((c) => c instanceof Node ? h("td", {}, c) : h("td", { text: c }))))));
  }

  // a sweep: its trials (values, state, best validation figure, steps, time) and every trial's validation curve
  let sweepSign = null, sweepSettled = null, sweepAt = 0, sweepCurves = [];
  async function drawSweep() {
    const sw = job.sweep;
    if (!sw) { sweepBox.hidden = true; return; }
    const names = [...new Set(sw.trials.flatMap((t) => Object.keys(t.values)))].sort();
    const value = (v) => typeof v === "number" && !Number.isInteger(v) ? num(v, 4) : String(v ?? "—");
    const rows = sw.trials.map((t) => [
      h("a", { href: "/ui/jobs/" + encodeURIComponent(t.id), text: t.id.split("-").at(-1) }),
      ...names.map((n) => value(t.values[n])), stateBadge(t.state),
      typeof t.best === "number" ? `${num(t.best, 4)} (step ${num(t.best_step)})` : "—",
      t.steps !== null && t.steps !== undefined ? `${num(t.steps)}/${t.total_steps ? num(t.total_steps) : "?"}` : "—",
      duration(t.duration_s) || "—", t.chosen ? h("b", { class: "ok", text: "★ chosen" }) : ""]);
    // every trial's curve: fetched again when a trial has moved on, at most every 10 s while they train
    const sign = JSON.stringify(sw.trials.map((t) => [t.id, t.state, t.steps, t.chosen]));
    const settled = JSON.stringify(sw.trials.map((t) => [t.id, t.state, t.chosen]));
    if (sign !== sweepSign && (settled !== sweepSettled || Date.now() - sweepAt > 10000)) {
      sweepSign = sign; sweepSettled = settled; sweepAt = Date.now();
      sweepCurves = await Promise.all(sw.trials.slice(0, 24).map(async (t) => {
        const v = (await api("/jobs/" + encodeURIComponent(t.id) + "/series")).validation || {};
        const x = v[sw.metric];
        return { label: t.id.split("-").at(-1) + (t.chosen ? " (chosen)" : ""), step: x ? x.step : [],
                 value: x ? x.value : [], points: x ? x.points : 0, strong: t.chosen };
      }));
    }
    const curves = sweepCurves;
    const better = sw.higher_is_better ? "higher" : "lower";
    sweepBox.hidden = false;
    sweepBox.replaceChildren(h("h2", { text: `Sweep: ${sw.trials.length} of ${sw.trial_count ?? "?"} trials` }),
      h("div", { id: "trials" }, table(["trial", ...names, "state", `best validation ${sw.metric}`, "steps", "time", ""], rows,
                                       sw.trials.map((t) => t.chosen ? "chosen" : ""))),
      h("p", { class: "small", id: "chosen", text: sw.chosen
        ? `Chosen on validation ${sw.metric} (${better} is better): ${sw.chosen}. The test split is scored once, on it.`
        : `Chosen on validation ${sw.metric} (${better} is better) when the search is over.` }),
      h("h3", { text: `Validation ${sw.metric}, every trial` }),
      h("div", { id: "trial-curves" }, chart(curves, { title: "trials", empty: "no validation yet" })));
  }

  async function drawExtras() {
    const [art, ck] = await Promise.all([api(base + "/artifacts"), api(base + "/checkpoints")]);
    const ev = art.eval;
    results.replaceChildren(h("h2", { text: "Evaluation metrics" }));
    if (ev) {
      const base = ev.baseline || null;
      const keys = [...new Set([...Object.keys(ev.validation || {}), ...Object.keys(ev.test || {})])];
      results.append(table(["", "validation", "test", ...(base ? ["baseline"] : [])],
        keys.map((k) => [k, num((ev.validation || {})[k], 4), num((ev.test || {})[k], 4), ...(base ? [num(base[k], 4)] : [])])));
      const sel = ev.selection;
      results.append(h("p", { class: "small", id: "selection", text: sel
        ? `Kept the weights of step ${num(sel.step)} of ${num(ev.steps)}: ${sel.why}${ev.stopped_early ? "; stopped early" : ""}.`
        : `${ev.selected_by ? "best checkpoint by " + ev.selected_by : ""}${ev.best_step ? ", step " + ev.best_step : ""}${ev.stopped_early ? "; stopped early" : ""}` }));
      if (base && base.verdict) {
        results.append(h("p", { class: "small " + (base.beaten ? "ok" : "bad"), id: "baseline",
                                text: `Baseline (${base.what}): ${base.verdict}.` }));
      }
      const champ = ev.champion;
      if (champ) {
        const pairs = [["on_this_test", "this job's test split"], ["on_champion_test", "the champion's test split"]]
          .filter(([k]) => champ[k]);
        results.append(h("div", { class: "small", id: "champion" },
          h("b", { text: `Against champion ${champ.model} v${champ.version}: ` }),
          champ.note ? champ.note : pairs.map(([k, where]) => h("div", {},
            `${where} (${num(champ[k].rows)} rows): ` + Object.keys(champ[k].challenger).filter((m) => typeof champ[k].challenger[m] === "number" && !["examples", "tokens"].includes(m))
              .map((m) => `${m} ${num(champ[k].challenger[m], 4)} here, ${num(champ[k].champion[m], 4)} the champion`).join("; ")))));
      }
    } else results.append(h("p", { class: "muted", text: "Written when training ends (eval.json)." }));

    const ex = art.export;
    exportBox.replaceChildren(h("h2", { text: "Export" }));
    if (ex) {
      const quality = ex.task === "classification" ? "accuracy" : ex.task === "regression" ? "mse" : "perplexity";
      exportBox.append(table(["variant", "size", "latency b=1", "latency b=8", quality],
        Object.entries(ex.variants || {}).map(([name, x]) => [name, bytes(x.bytes), num(x.latency_ms_b1, 1) + " ms", num(x.latency_ms_b8, 1) + " ms", num(x[quality], 4)])));
      const interval = (c) => typeof c.low === "number" ? `, 95% interval ${num(c.low, 3)} to ${num(c.high, 3)} on ${num(c.rows)} rows` : "";
      const checks = Object.entries(ex.checks || {}).map(([name, c]) => h("li", {},
        h("span", { class: c.passed ? "ok" : "bad", text: c.passed ? "passed " : "failed " }), name,
        c.value !== undefined ? ` (${c.compared}: ${num(c.value, 3)}${interval(c)}, bound ${num(c.bound, 3)})` : (c.max_abs_diff !== undefined ? ` (max |diff| ${num(c.max_abs_diff)})` : "")));
      const opt = ex.optimize && typeof ex.optimize === "object" ? ex.optimize : {};
      const fused = Object.entries(opt.fused_ops || {}).map(([op, n]) => `${n} ${op}`).join(", ");
      exportBox.append(h("p", { class: "small", id: "fusion" }, opt.used ? "Fused graph: " + (fused || "no onnxruntime ops")
        : opt.asked === undefined ? "" : "Unfused graph: " + (opt.reason || "the optimisation stage did not run")));
      const shipped = ex.shipped && typeof ex.shipped === "object" ? ex.shipped : null;
      if (shipped) exportBox.append(h("p", { class: shipped.note ? "reason warn small" : "small", id: "shipped" },
        h("b", { text: "Ships: " }), shipped.quantized ? `${shipped.variant} (model.quantized.onnx)` : "fp32 (model.onnx)",
        shipped.note ? " — " + shipped.note : ""));
      const tries = Array.isArray(ex.attempts) ? ex.attempts.filter((a) => a && typeof a === "object") : [];
      if (tries.length > 1 || (tries.length === 1 && !tries[0].passed)) exportBox.append(h("div", { id: "attempts" },
        h("h3", { text: "Quantization tries" }),
        table(["try", "kept fp32", "quality", "latency b=8", "result"], tries.map((a) => [a.description || a.variant,
          num((a.kept_fp32 || []).length), a.quality ? `${a.quality.compared} ${num(a.quality.value, 3)}${interval(a.quality)}` : (a.error || ""),
          typeof a.latency_ms_b8 === "number" ? num(a.latency_ms_b8, 1) + " ms" : "", a.passed ? "within the bound" : "missed"]))));
      exportBox.append(h("ul", { class: "small" }, checks),
        h("p", { class: ex.passed ? "ok" : "bad", text: ex.passed ? "The export passed its checks." : "The export failed: " + (ex.failure || "see the checks") }));
    } else exportBox.append(h("p", { class: "muted", text: "PyTorch, ONNX and quantized ONNX compared here once the job exports." }));

    ckpts.replaceChildren(h("h2", { text: "Checkpoints" }), ck.checkpoints.length
      ? table(["step", "size", "written"], ck.checkpoints.map((c) => [c.step === null ? c.name : num(c.step), bytes(c.bytes), when(c.written_at)]))
      : h("p", { class: "muted", text: "None yet." }));

    const shown = art.files.filter((f) => !f.path.startsWith("checkpoints/"));
    files.replaceChildren(h("h2", { text: `Artifacts (${shown.length} files)` }), shown.length
      ? table(["file", "size"], shown.map((f) => [h("a", { href: base + "/files/" + f.path.split("/").map(encodeURIComponent).join("/"), download: "", text: f.path }), bytes(f.bytes)]))
      : h("p", { class: "muted", text: "None yet." }));
  }

  async function drawEvents() {
    const got = await api(base + "/events?after=" + lastEvent);
    for (const e of got.events) {
      lastEvent = e.id;
      events.append(h("li", {}, h("span", { class: "muted small", text: when(e.at) + " " }),
        e.state_to ? h("b", { text: (e.state_from ? e.state_from + " → " : "") + e.state_to + " " }) : "", e.message));
    }
  }

  function follow() {
    // EventSource reconnects by itself, sending the last id (a byte offset): the server goes on from there.
    const src = new EventSource(base + "/logs?follow=true");
    const atBottom = () => log.scrollHeight - log.scrollTop - log.clientHeight < 30;
    src.addEventListener("log", (e) => {
      const stick = atBottom();
      log.append(e.data + "\n");
      if (stick) log.scrollTop = log.scrollHeight;
    });
    src.addEventListener("end", () => { src.close(); log.dataset.ended = "true"; });
  }

  async function poll() {
    const was = lastState;
    job = await api(base);
    lastState = job.state;
    drawHeader();
    const p = job.progress || {};
    await drawEvents();
    if (p.step !== lastStep || job.state !== was) { lastStep = p.step; await drawCharts(); }
    if (job.state !== was || Date.now() - extrasAt > 10000) { extrasAt = Date.now(); await drawExtras(); }
    if (job.sweep) await drawSweep();
    return !ENDED.includes(job.state);  // false: the job has ended and nothing more will change
  }

  drawHeader();
  drawSweep();
  api(base + "/recipe").then((r) => { recipe.textContent = r.recipe; });
  follow();
  every(2000, poll);
}

// ---- cluster page -----------------------------------------------------------------------------------------------

function clusterPage() {
  const head = h("h1", { text: "Cluster" });
  const cards = h("div", { class: "grid" });
  const body = h("div", { class: "panel" });
  MAIN.append(head, cards, body);
  if (DATA.ray_url) head.append(h("a", { href: DATA.ray_url, target: "_blank", rel: "noopener", class: "small", text: "Ray's dashboard ↗" }));
  const used = (total, free) => total - free;
  async function load() {
    let c;
    try { c = await api("/cluster"); } catch (e) {
      if (e.status === 503) { body.replaceChildren(h("p", { class: "muted", text: e.message })); return true; }
      throw e;
    }
    const card = (k, v, frac) => h("div", { class: "card" }, h("div", { class: "k", text: k }), h("div", { class: "v", text: v }), frac === undefined ? "" : bar(frac));
    cards.replaceChildren(card("Nodes", String(c.nodes.length)),
      card("CPUs in use", `${num(used(c.cpus, c.free_cpus))} of ${num(c.cpus)}`, c.cpus ? used(c.cpus, c.free_cpus) / c.cpus : 0),
      card("GPUs in use", `${num(used(c.gpus, c.free_gpus))} of ${num(c.gpus)}`, c.gpus ? used(c.gpus, c.free_gpus) / c.gpus : 0));
    const rows = c.nodes.map((n) => h("tr", { dataset: { node: n.id } },
      h("td", {}, h("b", { text: n.host || n.ip || "node" }), n.head ? h("span", { class: "muted small", text: " head" }) : "",
        n.type ? h("span", { class: "muted small", text: " " + n.type }) : "", n.draining ? h("span", { class: "warn small", text: " draining" }) : "",
        h("span", { class: "sub mono", text: (n.ip ? n.ip + " · " : "") + n.id.slice(0, 12) })),
      h("td", {}, h("span", { text: `${num(used(n.cpus, n.free_cpus))} / ${num(n.cpus)} used` }), bar(n.cpus ? used(n.cpus, n.free_cpus) / n.cpus : 0)),
      h("td", {}, h("span", { text: n.gpus ? `${num(used(n.gpus, n.free_gpus))} / ${num(n.gpus)} used` : "none" }), n.gpus ? bar(used(n.gpus, n.free_gpus) / n.gpus) : "",
        n.gpu_memory_bytes ? h("span", { class: "sub", text: `${n.gpu_name || "GPU"}, ${bytes(n.gpu_memory_bytes)} each` }) : ""),
      h("td", {}, n.mem_total ? h("span", { text: `${bytes(n.mem_used)} / ${bytes(n.mem_total)} used` }) : "",
        n.mem_total ? bar(n.mem_used / n.mem_total) : "", h("span", { class: "sub", text: `Ray may schedule ${bytes(n.memory_bytes)}` })),
      h("td", { class: "held" }, n.held.length ? n.held.map((x) => h("div", {},
        x.job ? h("a", { href: "/ui/jobs/" + encodeURIComponent(x.job), text: x.job }) : h("span", { class: "muted", text: x.submission || "a Ray job outside the runner" }),
        h("span", { class: "muted small", text: ` ${num(x.cpus)} CPU${x.gpus ? ", " + num(x.gpus) + " GPU" : ""}` }))) : h("span", { class: "muted", text: "free" }))));
    const thead = h("thead", {}, h("tr", {}, ["Node", "CPUs", "GPUs", "Memory", "Held by"].map((t) => h("th", { text: t }))));
    const parts = [h("table", { id: "nodes" }, thead, h("tbody", {}, rows))];
    if (c.node_types && c.node_types.length) {
      // what the autoscaler can add, and the nodes the runner asked for on behalf of queued jobs
      const asked = {};
      for (const r of c.requests || []) for (const t of r.node_types) (asked[t] = asked[t] || []).push(r.job);
      const typeRows = c.node_types.map((t) => h("tr", { dataset: { type: t.name } },
        h("td", {}, h("b", { text: t.name })),
        h("td", { text: `${num(t.cpus)} CPUs${t.gpus ? ", " + num(t.gpus) + " GPUs" : ""}` }),
        h("td", { class: "count", text: `${t.now} of ${t.max < 0 ? "no limit" : t.max}` + ((c.pending_launches || {})[t.name] ? ` (${c.pending_launches[t.name]} starting)` : "") }),
        h("td", { class: "could", text: t.could_start === null ? "no limit" : String(t.could_start) }),
        h("td", { class: "asked" }, (asked[t.name] || []).length ? asked[t.name].map((j) => h("div", {},
          h("a", { href: "/ui/jobs/" + encodeURIComponent(j), text: j }))) : h("span", { class: "muted", text: "none" }))));
      const th = h("thead", {}, h("tr", {}, ["Node type", "Each", "Nodes now", "Could still start", "Asked for by"].map((t) => h("th", { text: t }))));
      const bundles = (c.resource_request || []).reduce((n, r) => n + r.count, 0);
      parts.push(h("h2", { text: "Node types the autoscaler can add" }), h("table", { id: "types" }, th, h("tbody", {}, typeRows)),
        h("p", { class: "muted small", id: "request", text: bundles ? `The cluster's resource request: ${bundles} bundle${bundles === 1 ? "" : "s"} (those in use included).` : "No resource request: idle nodes go after the autoscaler's idle timeout." }));
    }
    body.replaceChildren(...parts);
  }
  every(3000, load);
}

// ---- schedules page ---------------------------------------------------------------------------------------------

function schedulesPage() {
  const body = h("div", { class: "panel" });
  MAIN.append(h("h1", { text: "Schedules" }), body);
  async function act(path, question) {
    if (question && !confirm(question)) return;
    try { await post(path); await load(); } catch (e) { alert(e.message); }
  }
  async function load() {
    const got = await api("/schedules");
    if (!got.schedules.length) {
      body.replaceChildren(h("p", { class: "empty", text: "No schedules: runner schedule add recipe.yaml" }));
      return;
    }
    const rows = got.schedules.map((s) => {
      const base = "/schedules/" + encodeURIComponent(s.id);
      const last = s.fires[0];
      return h("tr", { dataset: { id: s.id } },
        h("td", {}, h("b", { text: s.id + " " }), s.paused ? h("span", { class: "state CANCELLED", text: "PAUSED" }) : ""),
        h("td", { class: "small", text: s.what + " · concurrency " + s.concurrency }),
        h("td", { class: "small nowrap" }, s.next.length ? [s.next[0].local, h("span", { class: "sub", text: s.next[0].utc })] : "—"),
        h("td", { class: "small last" }, last ? [h("b", { text: last.outcome + " " }), when(last.slot_at), h("span", { class: "sub", text: last.reason }),
          last.job_id ? h("a", { href: "/ui/jobs/" + encodeURIComponent(last.job_id), text: last.job_id }) : ""] : "no fire yet"),
        h("td", { class: "nowrap" },
          h("button", { text: s.paused ? "Resume" : "Pause", class: "pause", onclick: () => act(base + (s.paused ? "/resume" : "/pause")) }), " ",
          h("button", { text: "Run now", class: "trigger", onclick: () => act(base + "/trigger", `Run schedule ${s.id} now?`) })));
    });
    body.replaceChildren(h("table", { id: "schedules" }, h("thead", {}, h("tr", {},
      ["Schedule", "Fires", "Next fire", "Last fire", ""].map((t) => h("th", { text: t })))), h("tbody", {}, rows)));
  }
  every(3000, load);
}

// ---- models page ------------------------------------------------------------------------------------------------

function modelsPage() {
  const body = h("div");
  MAIN.append(h("h1", { text: "Models" }), body);
  async function act(path, payload, question) {
    if (!confirm(question)) return;
    try { await post(path, payload); await load(); } catch (e) { alert(e.message); }
  }
  async function load() {
    const got = await api("/models");
    if (!got.models.length) {
      body.replaceChildren(h("p", { class: "panel empty", text: "No registered models: a recipe with register_as: NAME registers its SUCCEEDED jobs." }));
      return;
    }
    const panels = [];
    for (const m of got.models) {
      const detail = await api("/models/" + encodeURIComponent(m.model));
      const base = "/models/" + encodeURIComponent(m.model);
      const marks = {};
      for (const [alias, v] of Object.entries(detail.aliases)) (marks[v] = marks[v] || []).push(alias);
      const rows = detail.versions.slice().reverse().map((v) => h("tr", { dataset: { version: v.version } },
        h("td", {}, h("b", { text: "v" + v.version }), " ", (marks[v.version] || []).map((a) => h("span", { class: "state SUCCEEDED", text: a }))),
        h("td", {}, h("a", { href: "/ui/jobs/" + encodeURIComponent(v.job_id), text: v.job_id })),
        h("td", { class: "num", text: v.metric + " " + num(v.value, 4) }),
        h("td", { class: "small " + (v.promoted ? "" : "muted"), text: v.decision }),
        h("td", {}, marks[v.version] && marks[v.version].includes("champion") ? "" :
          h("button", { text: "Make champion", class: "promote", onclick: () => act(base + "/promote", { version: v.version, alias: "champion" },
            `Make v${v.version} the champion of ${m.model}?`) }))));
      const moves = detail.events.filter((e) => e.alias).reverse().map((e) => h("li", {},
        h("span", { class: "muted small", text: when(e.at) + " " }), h("b", { text: `${e.alias}: ${e.from_version ? "v" + e.from_version : "none"} → v${e.to_version} ` }), e.message));
      panels.push(h("div", { class: "panel", dataset: { model: m.model } },
        h("h2", {}, m.model + " ", h("button", { text: "Roll back champion", class: "rollback",
          onclick: () => act(base + "/rollback", { alias: "champion" }, `Move ${m.model}'s champion back to its previous version?`) })),
        h("table", {}, h("thead", {}, h("tr", {}, ["Version", "Job", "Test metric", "Gate", ""].map((t) => h("th", { text: t })))), h("tbody", {}, rows)),
        h("h2", { class: "section", text: "Moves" }), h("ol", { class: "events" }, moves)));
    }
    body.replaceChildren(...panels);
  }
  every(3000, load);
}

({ jobs: jobsPage, job: jobPage, cluster: clusterPage, schedules: schedulesPage, models: modelsPage })[PAGE]();
