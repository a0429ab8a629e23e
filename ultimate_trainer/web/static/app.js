// The monitor page: polls /api/state and /api/history and fills the page.
// Every figure and every text from training data goes through textContent: never parsed as HTML.
"use strict";

const $ = id => document.getElementById(id);
let refreshMs = 2000;

// ------------------------------------------------------------------ formatting
const isNum = v => typeof v === "number" && Number.isFinite(v);
const num = (v, d = 2) => isNum(v) ? v.toFixed(d) : "–";
const pct = v => isNum(v) ? v.toFixed(1) + "%" : "–";
const gb = v => isNum(v) ? v.toFixed(2) + " GB" : "–";

function dur(s) {
  if (!isNum(s)) return "–";
  s = Math.max(0, Math.round(s));
  if (s < 90) return s + " s";
  if (s < 5400) return Math.round(s / 60) + " min";
  if (s < 172800) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " days";
}

function clock(iso) {
  if (!iso) return "–";
  const d = new Date(iso.replace(/([+-]\d\d)(\d\d)$/, "$1:$2"));
  if (isNaN(d)) return String(iso);
  const sameDay = d.toDateString() === new Date().toDateString();
  return sameDay ? d.toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"})
                 : d.toLocaleString([], {month: "short", day: "numeric", hour: "2-digit", minute: "2-digit"});
}

function setText(id, text, cls) {
  const el = $(id);
  el.textContent = text;
  if (cls !== undefined) el.className = cls;
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function fillList(id, items, render, empty) {
  const ul = $(id);
  ul.replaceChildren(...(items.length ? items.map(render) : [el("li", empty, "muted")]));
}

const fileName = p => String(p || "").split(/[\\/]/).pop();

// ------------------------------------------------------------------ sections
function renderBar(st) {
  const t = st.training || {}, d = st.daemon || {}, m = st.memory;
  let state = st.waiting ? "waiting" : (t.stale ? "stale" : t.state || "–");
  if (d.state && d.state !== state) state += ` (${d.state.replace("_", " ")})`;
  setText("bar-state", state);
  setText("bar-file", (t.current_files || []).join(", ") || "–");
  setText("bar-step", isNum(t.global_step) ? t.global_step.toLocaleString() : "–");
  setText("bar-loss", num(t.loss, 4));
  setText("bar-acc", pct((t.accuracy || {}).overall));
  setText("bar-ram", m && !m.stale ? pct(m.percent) : "–");
  const gpus = (m && m.gpus) || [];
  const used = gpus.reduce((a, g) => a + (g.memory_used_gb || 0), 0), tot = gpus.reduce((a, g) => a + (g.memory_total_gb || 0), 0);
  setText("bar-gpu", !m ? "–" : gpus.length ? `${used.toFixed(1)}/${tot.toFixed(0)} GB` : "none");
  const level = (st.health || {}).level || "unknown";
  $("health-dot").className = "dot " + level;
  $("health-dot").title = "Overall health: " + level + ((st.health || {}).reasons || []).map(r => "\n• " + r.message).join("");
  $("bar").dataset.health = level;
}

function renderAlerts(st) {
  const reasons = (st.health || {}).reasons || [];
  const items = reasons.map(r => el("div", (r.level === "critical" ? "🛑 " : "⚠️ ") + r.message, "alert " + r.level));
  if (st.memory && st.memory.stale) items.push(el("div", "ℹ️ memory figures are " + dur(st.memory.age_seconds) + " old: is memory_stats_api.py running?", "alert info"));
  $("alerts").replaceChildren(...items);
  setText("waiting-text", "Waiting for the trainer: it has not written its status yet.");
  $("waiting").hidden = !st.waiting;
}

function renderTraining(st) {
  const t = st.training || {};
  const done = t.run_step, total = t.run_total_steps;
  const frac = isNum(done) && isNum(total) && total > 0 ? Math.min(1, done / total) : 0;
  $("run-fill").style.width = (frac * 100).toFixed(1) + "%";
  setText("run-label", isNum(total) ? `${done} / ${total} steps · ${(frac * 100).toFixed(0)}%` : "no run");
  renderPhase(t.progress, mergeProgress(st));
  const eta = isNum(t.eta_seconds) ? `${dur(t.eta_seconds)} (${clock(new Date(Date.now() + t.eta_seconds * 1000).toISOString())})` : "–";
  setText("eta", eta);
  setText("tps", isNum(t.tokens_per_second) ? t.tokens_per_second.toFixed(0) : "–");
  setText("lr", isNum(t.learning_rate) ? t.learning_rate.toExponential(2) : "–");
  setText("gn", num(t.grad_norm, 3));
  setText("epoch", num(t.epoch, 2));
  setText("model", t.base_model ? `${t.base_model} · ${t.device || "?"}${t.load_in_4bit ? " · 4-bit" : ""}` : "–");
  setText("ranks", ranksText(t));
  setText("t-age", isNum(t.age_seconds) ? dur(t.age_seconds) + " ago" + (t.stale ? " (trainer gone)" : "") : "–");
}

// The daily merge's phase while its child runs (consolidation_status.json's "progress"), else null.
function mergeProgress(st) {
  const c = st.consolidation;
  return c && c.running && c.progress ? c.progress : null;
}

// A long phase's progress (training_status.json's "progress", or the merge's): "rehearsal answers 120 / 380
// prompts · 32% · 4 min left"; the merge's read "consolidation · gate: the base 12 / 40 prompts · 30% · 2 min left".
function renderPhase(p, merge) {
  const shown = p || merge;
  const on = !!shown && isNum(shown.done) && isNum(shown.total) && shown.total > 0;
  $("phase").hidden = !on;
  if (!on) return;
  const frac = Math.min(1, shown.done / shown.total);
  $("phase-fill").style.width = (frac * 100).toFixed(1) + "%";
  const left = isNum(shown.eta_seconds) ? ` · ${dur(shown.eta_seconds)} left` : " · estimating…";
  const prefix = !p && !String(shown.phase).startsWith("consolidation") ? "consolidation · " : "";
  setText("phase-label", `${prefix}${shown.phase} ${shown.done} / ${shown.total} ${shown.unit} · ${(frac * 100).toFixed(0)}%${left}`);
}

// "1" or "2 · rank 0 cuda:0 3.10/3.40 GB, RAM 2.00 GB · rank 1 ...": world size, then every rank's memory.
function ranksText(t) {
  if (!isNum(t.world_size)) return "–";
  const ranks = Array.isArray(t.ranks) ? t.ranks : [];
  const one = r => {
    const dev = isNum(r.device_memory_allocated_bytes)
      ? ` ${gb(r.device_memory_allocated_bytes / 2 ** 30)} / peak ${gb(r.device_memory_peak_bytes / 2 ** 30)}` : "";
    return `rank ${r.rank} ${r.device || "?"}${dev}, RAM ${gb(r.rss_bytes / 2 ** 30)}${r.host ? " on " + r.host : ""}`;
  };
  return [String(t.world_size), ...ranks.map(one)].join(" · ");
}

function renderStability(st) {
  const s = (st.training || {}).stability || {};
  setText("stab-score", num(s.score, 1), isNum(s.score) ? (s.score >= 80 ? "good" : s.score >= 50 ? "neutral" : "bad") : "");
  setText("stab-slope", isNum(s.loss_slope) ? s.loss_slope.toExponential(2) : "–");
  setText("stab-anomalies", isNum(s.anomalies) ? String(s.anomalies) : "–", s.anomalies ? "bad" : "");
  const a = s.last_anomaly;
  setText("stab-last", a ? `step ${a.global_step}: ${a.kind} · ${(a.files || []).join(", ") || "?"}` : "none");
}

const TREND_CLASS = {falling: "good", flat: "neutral", rising: "bad", improving: "good", stable: "neutral", regressing: "bad", forgetting: "bad"};
const TREND_ICON = {falling: "↘ falling", flat: "→ flat", rising: "↗ rising", improving: "↗ improving", stable: "→ stable", regressing: "↘ regressing", forgetting: "⚠ forgetting"};
const RETENTION_CLASS = {falling: "bad", stable: "neutral", rising: "good"};

function renderLossFigures(st) {
  const t = st.training || {};
  setText("loss-now", num(t.loss, 4));
  setText("val-loss", num(isNum(t.val_loss) ? t.val_loss : st.last_val_loss, 4));
  setText("steps-count", ((st.history_counts || {}).steps || 0).toLocaleString());
  const lt = st.loss_trend;
  setText("loss-trend", lt ? TREND_ICON[lt] : "not enough steps", "tag " + (TREND_CLASS[lt] || "neutral"));
}

function signalClass(signal, value, overall, margin) {
  if (signal) return {above: "good", below: "bad", level: "neutral"}[signal] || "neutral";
  if (!isNum(value) || !isNum(overall)) return "neutral";
  return value >= overall + margin ? "good" : value <= overall - margin ? "bad" : "neutral";
}

function renderAccuracy(st) {
  const a = (st.training || {}).accuracy || {};
  const sig = a.signals || {};
  setText("acc-overall", pct(a.overall));
  setText("acc-20", pct(a.last_20), signalClass(sig.last_20, a.last_20, a.overall, 5));
  setText("acc-50", pct(a.last_50), signalClass(sig.last_50, a.last_50, a.overall, 3));
  setText("acc-n", isNum(a.evaluations) ? `${a.evaluations} · ${a.answers || 0} answers` : "–");
  // The verdict (web/state.py) is the accuracy trend, unless the model is forgetting what the base knew.
  const v = (st.verdict || {}).label || a.trend;
  setText("acc-trend", v ? TREND_ICON[v] : "not enough answers", "tag " + (TREND_CLASS[v] || "neutral"));
  $("acc-trend").title = (st.verdict || {}).reason || "Last 50 against overall: improving, stable or regressing";
  const r = (st.training || {}).retention || {};
  setText("ret-now", isNum(r.ratio) ? pct(100 * r.ratio) : "–", r.forgetting ? "bad" : RETENTION_CLASS[r.trend] || "");
  setText("ret-probe", isNum(r.correct) ? `${r.correct}/${r.total} · ${r.trend || "first probe"}` : "–");
  renderController((st.training || {}).controller);
}

const DECISION_CLASS = {step_down: "bad", step_back: "good", hold: "neutral"};

function renderController(c) {
  if (!c) { ["ctl-lr", "ctl-rehearsal", "ctl-last"].forEach(id => setText(id, "–", "")); return; }
  if (!c.enabled) {
    setText("ctl-lr", "x1 (controller off)", "");
    setText("ctl-rehearsal", isNum(c.rehearsal_fraction) ? pct(100 * c.rehearsal_fraction) : "–", "");
    setText("ctl-last", "off (controller.enabled is false)", "small muted");
    return;
  }
  const rate = isNum(c.learning_rate) ? ` · ${+c.learning_rate.toPrecision(3)}` : "";
  setText("ctl-lr", isNum(c.lr_scale) ? `x${+c.lr_scale.toFixed(4)}${rate}` : "–", c.lr_scale < 1 ? "bad" : "");
  const weighted = isNum(c.rehearsal_weight) && c.rehearsal_weight !== 1 ? ` (weighted x${+c.rehearsal_weight.toFixed(2)})` : "";
  const next = isNum(c.next_rehearsal_fraction) && c.next_rehearsal_fraction !== c.rehearsal_fraction
    ? ` → ${pct(100 * c.next_rehearsal_fraction)} now${weighted}, drawn from the next run` : "";
  setText("ctl-rehearsal", isNum(c.rehearsal_fraction) ? pct(100 * c.rehearsal_fraction) + next : "–");
  const d = c.last;
  const counts = Object.entries(c.decisions || {}).map(([k, n]) => `${k.replace("_", " ")} ${n}`).join(", ");
  // The reason is text: set through textContent like every other text here.
  setText("ctl-last", d ? `step ${d.global_step}: ${String(d.kind || "").replace("_", " ")} (${d.reason || ""})` +
          (counts ? ` · ${counts}` : "") : "no decision yet (one after each probe)", "small " + (DECISION_CLASS[(d || {}).kind] || ""));
}

function renderSkills(st) {
  const sk = st.skills || {};
  const rows = sk.skills || [];
  setText("skills-step", isNum(sk.step) ? `(step ${sk.step.toLocaleString()})` : "");
  const body = $("skills-body");
  if (!rows.length) { body.replaceChildren(emptyRow("no evaluation yet")); return; }
  body.replaceChildren(...rows.map(r => {
    const tr = el("tr");
    const vals = r.trend.map(p => p[1]);
    const delta = vals.length > 1 ? vals[vals.length - 1] - vals[0] : 0;
    const trend = el("td", vals.map(v => v.toFixed(0)).join(" → ") + "%",
                     "small " + (delta > 0 ? "good" : delta < 0 ? "bad" : "neutral"));
    tr.append(el("td", r.skill, "txt"), el("td", `${r.correct}/${r.total} · ${pct(r.accuracy)}`), trend);
    return tr;
  }));
}

function renderWorkbenchLink(st) {
  const a = $("workbench-link");
  if (!isNum(st.workbench_port)) { a.hidden = true; return; }
  const host = location.hostname.includes(":") ? `[${location.hostname}]` : location.hostname;
  a.href = `${location.protocol}//${host}:${st.workbench_port}/`;
  a.hidden = false;
}

function renderExamples(st) {
  const ex = ((st.training || {}).recent_examples || []).slice().reverse();
  const body = $("examples-body");
  if (!ex.length) { body.replaceChildren(emptyRow("no evaluation yet")); return; }
  body.replaceChildren(...ex.map(e => {
    const tr = el("tr", null, e.correct ? "ok" : "ko");
    const cells = [el("td", e.correct ? "✅" : "❌"), el("td", e.prompt, "txt"), el("td", e.expected, "txt"),
                   el("td", e.generated, "txt"), el("td", e.source, "mono small")];
    ["", "prompt", "expected", "model", "source"].forEach((label, i) => cells[i].dataset.label = label);
    tr.append(...cells);
    return tr;
  }));
}

function emptyRow(text) {
  const tr = el("tr"), td = el("td", text, "muted");
  td.colSpan = 5;
  tr.append(td);
  return tr;
}

function meter(fillId, frac, level) {
  const f = $(fillId);
  f.style.width = (Math.max(0, Math.min(1, frac)) * 100).toFixed(1) + "%";
  f.className = "fill " + level;
}

function renderRam(st) {
  const m = st.memory;
  const oom = $("oom");
  if (!m) {
    oom.className = "light unknown"; oom.textContent = "waiting";
    meter("ram-fill", 0, "ok"); meter("proc-fill", 0, "ok");
    setText("ram-text", "–"); setText("proc-text", "–"); setText("swap", "–"); setText("daemon-mem", "–");
    setText("m-age", "stats API not running"); setText("oom-reason", "Start memory_stats_api.py for RAM and GPU figures.");
    return;
  }
  const th = m.oom_thresholds || {medium_percent: 70, high_percent: 85};
  const lvl = p => p >= th.high_percent ? "critical" : p >= th.medium_percent ? "warning" : "ok";
  oom.className = "light " + ({LOW: "ok", MEDIUM: "warning", HIGH: "critical"}[m.oom_risk] || "unknown");
  oom.textContent = "OOM " + (m.oom_risk || "?");
  meter("ram-fill", (m.percent || 0) / 100, lvl(m.percent || 0));
  setText("ram-text", `${num(m.used_gb, 1)} / ${num(m.total_gb, 1)} GB · ${pct(m.percent)}`);
  const pp = isNum(m.training_process_gb) && m.total_gb ? 100 * m.training_process_gb / m.total_gb : 0;
  meter("proc-fill", pp / 100, lvl(m.percent || 0));
  setText("proc-text", isNum(m.training_process_gb) ? `${gb(m.training_process_gb)} · ${pp.toFixed(0)}%` : "not running");
  setText("swap", gb(m.swap_used_gb));
  setText("daemon-mem", isNum(m.daemon_process_gb) ? gb(m.daemon_process_gb) : "not running");
  setText("m-age", isNum(m.age_seconds) ? dur(m.age_seconds) + " ago" + (m.stale ? " (stale)" : "") : "–");
  setText("oom-reason", m.oom_reason || "");
}

function renderGpu(st) {
  const m = st.memory, box = $("gpu-list");
  if (!m) { box.replaceChildren(el("p", "waiting for the stats API", "muted")); return; }
  if (!m.gpu_available || !(m.gpus || []).length) {
    box.replaceChildren(el("p", "🚫 No GPU: training runs on the CPU.", "nogpu"), el("p", m.gpu_reason || "", "note"));
    return;
  }
  box.replaceChildren(...m.gpus.map(g => {
    const d = el("div", null, "gpu");
    d.append(el("div", `#${g.index} ${g.name || "GPU"}`, "gname"));
    const row = el("div", null, "gauge");
    row.title = "GPU memory in use";
    const mt = el("div", null, "meter"), f = el("div", null, "fill");
    const mp = g.memory_percent || 0;
    f.className = "fill " + (mp >= 97 ? "critical" : mp >= 90 ? "warning" : "ok");
    f.style.width = mp + "%";
    mt.append(f);
    row.append(el("span", "memory", "glabel"), mt, el("span", `${num(g.memory_used_gb, 1)} / ${num(g.memory_total_gb, 0)} GB`, "gval"));
    const figs = el("dl", null, "figs");
    for (const [k, v, tip] of [["util", pct(g.utilization_percent), "GPU utilization"],
                               ["temp", isNum(g.temperature_c) ? g.temperature_c + " °C" : "–", "GPU temperature"],
                               ["power", isNum(g.power_w) ? g.power_w + " W" + (isNum(g.power_limit_w) ? " / " + g.power_limit_w : "") : "–", "Power draw / limit"]]) {
      const div = el("div"); div.title = tip; div.append(el("dt", k), el("dd", v)); figs.append(div);
    }
    d.append(row, figs);
    return d;
  }));
}

function renderQueue(st) {
  const d = st.daemon;
  if (!d) {
    ["q-files", "q-rate", "q-eta", "q-done"].forEach(id => setText(id, "–"));
    fillList("q-list", [], null, "waiting for the daemon");
    fillList("failed-list", [], null, "–");
  } else {
    const q = d.queue || [];
    setText("q-files", `${q.filter(f => f.state === "waiting").length} waiting · ${q.filter(f => f.state === "training").length} training`);
    const tp = d.throughput || {};
    setText("q-rate", isNum(tp.mb_per_hour) ? tp.mb_per_hour.toFixed(1) : "–");
    setText("q-eta", d.queue_eta_at ? `${clock(d.queue_eta_at)} (${dur(d.queue_eta_seconds)})` : (q.length ? "estimating…" : "queue empty"));
    setText("q-done", isNum(d.done_files) ? String(d.done_files) : "–");
    fillList("q-list", q, f => el("li", `${f.state === "training" ? "🏃" : "⏳"} ${f.name} · ${(f.size_bytes / 1e6).toFixed(1)} MB`), "queue empty");
    fillList("failed-list", d.failed || [], f => {
      const li = el("li"); li.append(el("b", f.name), el("span", " · " + f.reason)); return li;
    }, "none");
  }
  const bad = (st.reports || []).flatMap(r => [
    ...(r.bad.length ? r.bad : r.error || r.bad_lines ? [`${r.file}: ${r.error || "bad lines"}`] : []),
    ...(r.warnings || []).map(w => "⚠️ " + w)]);
  fillList("bad-list", bad, b => el("li", b), "none");
}

function renderCheckpoints(st) {
  const t = st.training || {}, d = st.daemon || {}, c = d.consolidation || {};
  setText("ck-last", t.last_checkpoint || "none yet");
  const m = st.consolidation || {}, stage = m.running && m.stage ? ` · stage ${Math.min(m.stage.done + 1, m.stage.total)}/${m.stage.total}: ${m.stage.name}` : "";
  setText("co-next", c.running || m.running ? "running now" + stage : c.enabled === false ? "disabled" : c.next_at ? clock(c.next_at) : "–");
  const kept = c.retention_since_original || {};
  setText("co-kept", isNum(kept.ratio) ? `${(100 * kept.ratio).toFixed(1)}% (best ${(100 * kept.best).toFixed(1)}%)` : "–",
          isNum(kept.ratio) && kept.ratio < 0.95 ? "bad" : "");
  const disk = d.disk;
  setText("disk", disk ? `${num(disk.free_gb, 1)} / ${num(disk.total_gb, 0)} GB` : "–", disk ? "lvl-" + disk.level : "");
  fillList("ck-list", (t.checkpoints || []).slice(-8).reverse(), k => el("li", `${k.name} · step ${k.global_step} · ${clock(k.created_at)}`), "none yet");
  fillList("co-list", (c.history || []).slice(-5).reverse(), k => el("li", `${fileName(k.path)} · step ${k.global_step} · ${clock(k.created_at)}`), "none yet");
}

function renderCharts(h) {
  const steps = (h.steps || {}).points || [], evals = (h.evals || {}).points || [];
  UTCharts.drawChart($("loss-chart"), [
    {points: steps.map(p => [p.global_step, p.loss]), cls: "s1"},
    {points: evals.map(p => [p.global_step, p.val_loss]), cls: "s2", dots: true},
    // steps whose update the guard skipped (a non-finite loss has no point: it is null)
    {points: steps.filter(p => p.skipped).map(p => [p.global_step, p.loss]), cls: "s5", dotsOnly: true},
  ], {empty: "no steps logged yet"});
  UTCharts.drawChart($("gn-chart"), [
    {points: steps.map(p => [p.global_step, p.grad_norm]), cls: "s1"},
  ], {yMin: 0, empty: "no steps logged yet"});
  UTCharts.drawChart($("acc-chart"), [
    {points: evals.map(p => [p.global_step, p.accuracy]), cls: "s3", dotsOnly: true},
    {points: evals.map(p => [p.global_step, p.overall]), cls: "s1"},
    {points: evals.map(p => [p.global_step, p.last_50]), cls: "s4"},
    {points: ((h.probes || {}).points || []).map(p => [p.global_step, isNum(p.retention) ? 100 * p.retention : null]), cls: "s2", dots: true},
  ], {yMin: 0, yMax: 100, yUnit: "%", empty: "no evaluation yet"});
}

// ------------------------------------------------------------------ polling
async function getJSON(url) {
  const r = await fetch(url, {cache: "no-store"});
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r.json();
}

let lastHistory = null;

async function tick() {
  try {
    const [st, h] = await Promise.all([getJSON("/api/state"), getJSON("/api/history")]);
    for (const f of [renderBar, renderAlerts, renderTraining, renderLossFigures, renderStability, renderAccuracy,
                     renderSkills, renderWorkbenchLink, renderExamples, renderRam, renderGpu, renderQueue,
                     renderCheckpoints]) {
      try { f(st); } catch (e) { console.error(f.name, e); }  // one odd field must not blank the page
    }
    lastHistory = h;
    renderCharts(h);
    refreshMs = Math.max(200, (st.refresh_seconds || 2) * 1000);
    setText("refresh", String(st.refresh_seconds || 2));
    $("conn").className = "ok";
    document.body.dataset.loaded = "1";
  } catch (e) {
    $("conn").className = "bad";
    setText("waiting-text", "Monitor server not reachable; retrying…");
    $("waiting").hidden = false;
  }
  setTimeout(tick, refreshMs);
}

// ------------------------------------------------------------------ export, theme, keys
function download(url) {
  const a = document.createElement("a");
  a.href = url;
  a.download = "";
  document.body.appendChild(a);
  a.click();
  a.remove();
}

function applyTheme(theme) {
  document.documentElement.dataset.theme = theme;
  try { localStorage.setItem("ut-theme", theme); } catch (e) { /* private mode: not remembered */ }
  if (lastHistory) renderCharts(lastHistory);
}

function init() {
  let theme = null;
  try { theme = localStorage.getItem("ut-theme"); } catch (e) { /* ignore */ }
  if (theme !== "dark" && theme !== "light") {
    theme = window.matchMedia && window.matchMedia("(prefers-color-scheme: light)").matches ? "light" : "dark";
  }
  document.documentElement.dataset.theme = theme;
  $("theme").addEventListener("click", () => applyTheme(document.documentElement.dataset.theme === "dark" ? "light" : "dark"));
  $("export-json").addEventListener("click", () => download("/api/export.json"));
  $("export-csv").addEventListener("click", () => download("/api/export.csv"));
  document.addEventListener("keydown", e => {
    if (e.ctrlKey || e.metaKey || e.altKey || /INPUT|TEXTAREA|SELECT/.test(e.target.tagName)) return;
    if (e.key === "e") download("/api/export.json");
    if (e.key === "E") download("/api/export.csv");
  });
  window.addEventListener("resize", () => { if (lastHistory) renderCharts(lastHistory); });
  tick();
}

init();
