// The recipe explorer: a request in, the recipe and its LR schedule out; for a study, the evidence
// the recipe was fitted on and the runs with their loss curves, refreshed while any of them runs.
// Talks only to the service's /v1 API, with the API key (if any) kept in this browser's localStorage.

import { Chart, fmt } from "./chart.js";

const KEY_STORE = "largebatch.apiKey";
const REFRESH_MS = 3000;
const MAX_CURVES = 12; // loss curves drawn at once: the newest runs
const MAX_POINTS = 2000; // per curve: more does not show on a screen, and slows the redraws
const COLORS = ["#2f6fdb", "#d9480f", "#2f855a", "#9c36b5", "#c2255c", "#0c8599", "#e67700", "#5c7cfa",
  "#37b24d", "#f03e3e", "#1098ad", "#7048e8"];

const LAMB_512 = { batch_size: 512, lr: 6.25e-4, warmup_ratio: 0.003125, steps: 1000000 };
const EXAMPLES = {
  "BERT-Large, LAMB 512 → 32K (LAMB Table 4)": {
    model: { params: 340000000 }, reference: LAMB_512, target: { batch_size: 32768 },
  },
  "BERT-Large, LANS mixed batch 96K → 32K": {
    model: { params: 340000000 }, reference: LAMB_512, optimizer: "lans",
    stages: [{ batch_size: 98304, share: 0.9, seq_len: 128 }, { batch_size: 32768, share: 0.1, seq_len: 512 }],
  },
  "ResNet-50, SGD 256 → 8K, linear rule, cosine": {
    model: { params: 25600000, family: "cnn" },
    reference: { batch_size: 256, lr: 0.1, optimizer: "sgd", warmup_steps: 0, steps: 450000 },
    target: { batch_size: 8192 }, rule: "linear", decay: "cosine",
  },
};

const $ = (sel) => document.querySelector(sel);
const state = { study: null, selectedRun: null, timer: null, charts: {}, recipe: null, curves: new Map() };

// ------------------------------------------------------------------------------------------ API

class ApiError extends Error {}

function apiKey() {
  return localStorage.getItem(KEY_STORE) || "";
}

async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await r.json().catch(() => null);
  if (!r.ok) {
    let detail = data && data.detail !== undefined ? data.detail : r.statusText;
    if (Array.isArray(detail)) detail = detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("\n");
    throw new ApiError(`${r.status} ${data && data.type ? data.type : "error"}: ${detail}`);
  }
  return data;
}

function showError(err) {
  const box = $("#error");
  if (!err) { box.hidden = true; box.textContent = ""; return; }
  box.textContent = err.message || String(err);
  box.hidden = false;
}

// ------------------------------------------------------------------------------------------ helpers

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "–" : text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function list(target, items, empty) {
  target.textContent = "";
  for (const text of items.length ? items : [empty]) {
    const li = document.createElement("li");
    li.textContent = text;
    if (!items.length) li.className = "none";
    target.appendChild(li);
  }
}

function chart(id, opts) {
  if (state.charts[id]) state.charts[id].update(opts);
  else state.charts[id] = new Chart($(id), opts);
}

function readRequest() {
  try {
    return JSON.parse($("#request").value);
  } catch (e) {
    throw new ApiError(`the request is not valid JSON: ${e.message}`);
  }
}

function writeRequest(req) {
  $("#request").value = JSON.stringify(req, null, 2);
}

function targetBatch(req, recipe) {
  if (recipe && recipe.stages.length) return recipe.stages[recipe.stages.length - 1].batch_size;
  return req.target ? req.target.batch_size : undefined;
}

// ------------------------------------------------------------------------------------------ the recipe

async function recommend() {
  showError(null);
  const button = $("#submit");
  button.disabled = true;
  try {
    const req = readRequest();
    const out = await api("v1/recommendations", { method: "POST", body: req });
    const recipe = { optimizer: out.optimizer, stages: out.stages, total_steps: out.total_steps };
    const schedule = await api("v1/schedule?points=600", { method: "POST", body: recipe });
    state.recipe = out;
    renderRecipe(out, schedule);
    if (state.study) await refreshStudy();
  } catch (e) {
    showError(e);
  } finally {
    button.disabled = false;
  }
}

function renderRecipe(out, schedule) {
  $("#recipe-panel").hidden = false;
  const opt = out.optimizer;
  $("#recipe-summary").textContent = `${opt.name.toUpperCase()}, LR ${fmt(opt.lr)}, weight decay ${fmt(opt.weight_decay)}, `
    + `${fmt(out.total_steps)} steps`;
  chart("#schedule-chart", {
    title: "LR schedule", xLabel: "step", yLabel: "learning rate", height: 260, yMin: 0,
    vlines: schedule.stage_starts.slice(1),
    series: [{ name: "LR", color: COLORS[0], kind: "line",
      points: schedule.steps.map((s, i) => [s, schedule.lr[i]]) }],
  });
  const body = $("#stages tbody");
  body.textContent = "";
  out.stages.forEach((s, i) => {
    const tr = document.createElement("tr");
    cell(tr, `${i + 1}`);
    cell(tr, fmt(s.batch_size));
    cell(tr, fmt(s.steps));
    cell(tr, fmt(s.peak_lr));
    cell(tr, s.ideal_lr === null ? null : fmt(s.ideal_lr));
    cell(tr, s.lr_cap === null ? null : fmt(s.lr_cap));
    cell(tr, `${fmt(s.warmup_steps)} (${(100 * s.warmup_ratio).toFixed(2)}%)`);
    cell(tr, fmt(s.const_steps));
    cell(tr, `${fmt(s.decay_steps)} ${s.decay}`);
    cell(tr, s.seq_len === null ? null : fmt(s.seq_len));
    body.appendChild(tr);
  });
  list($("#rationale"), out.rationale, "–");
  list($("#warnings"), out.warnings, "none");
}

// ------------------------------------------------------------------------------------------ studies

async function loadStudies() {
  const select = $("#study");
  const keep = select.value;
  try {
    const page = await api("v1/studies?limit=1000");
    select.length = 1;
    for (const s of page.items) {
      const o = document.createElement("option");
      o.value = s.name;
      o.textContent = `${s.name} (${s.n_runs} runs)`;
      select.appendChild(o);
    }
    select.value = page.items.some((s) => s.name === keep) ? keep : "";
    $("#key-status").textContent = apiKey() ? "key in use" : "open mode";
    if (!select.value && !state.study && page.items.length) {
      // Open on the most recent study, with its evidence and runs.
      const newest = page.items.reduce((a, b) => (b.created_at > a.created_at ? b : a));
      select.value = newest.name;
      await pickStudy(newest.name);
    }
  } catch (e) {
    $("#key-status").textContent = e.message.startsWith("401") ? "this service needs an API key" : e.message;
  }
}

async function pickStudy(name) {
  showError(null);
  state.study = name || null;
  state.curves.clear();
  state.selectedRun = null;
  clearTimeout(state.timer);
  let req;
  try { req = readRequest(); } catch { req = structuredClone(Object.values(EXAMPLES)[0]); }
  if (!name) {
    delete req.study;
    $("#request-source").textContent = "";
    writeRequest(req);
    $("#study-panel").hidden = true;
    return;
  }
  try {
    const study = await api(`v1/studies/${encodeURIComponent(name)}`);
    const runs = await api(`v1/studies/${encodeURIComponent(name)}/runs?limit=1000`);
    req = requestFromRuns(study, runs.items);
    writeRequest(req);
    $("#study-name").textContent = study.name;
    $("#study-meta").textContent = `${study.model_family}, ${fmt(study.model_params)} parameters, `
      + `${study.direction} ${study.metric}`;
    $("#study-panel").hidden = false;
    await refreshStudy();
  } catch (e) {
    showError(e);
  }
}

// A request made of the study's own runs: its best finished run at its smallest batch size is the
// reference, its largest batch size the target. A study without runs resets the request to the first
// example for the study's model, and the page says so.
function requestFromRuns(study, runs) {
  const model = { params: study.model_params, family: study.model_family };
  const sign = study.direction === "maximize" ? -1 : 1;
  const done = runs.filter((r) => r.state === "completed" && r.metric !== null);
  const pool = done.length ? done : runs;
  if (!pool.length) {
    $("#request-source").textContent = `${study.name} has no runs yet: the request is the first example's, `
      + "for this study's model";
    return { ...structuredClone(Object.values(EXAMPLES)[0]), model, study: study.name };
  }
  const smallest = Math.min(...pool.map((r) => r.batch_size));
  const ref = pool.filter((r) => r.batch_size === smallest)
    .reduce((a, b) => (done.length && sign * b.metric < sign * a.metric ? b : a));
  const target = Math.max(...runs.map((r) => r.batch_size));
  $("#request-source").textContent = `from ${study.name}'s runs: reference run ${ref.id} (batch `
    + `${fmt(ref.batch_size)}, LR ${fmt(ref.peak_lr)}), target its largest batch size ${fmt(target)}`;
  return {
    model, study: study.name,
    reference: { batch_size: ref.batch_size, lr: ref.peak_lr, warmup_ratio: ref.warmup_ratio, steps: ref.steps,
      optimizer: ref.optimizer },
    target: { batch_size: target },
  };
}

async function refreshStudy() {
  clearTimeout(state.timer);
  const name = state.study;
  if (!name) return;
  let req = {};
  try { req = readRequest(); } catch { /* the evidence does not need it */ }
  const target = targetBatch(req, state.recipe);
  const q = new URLSearchParams();
  if (target) q.set("batch_size", target);
  if (req.use_family_evidence) q.set("family", "true");
  const [evidence, runs, critical] = await Promise.all([
    api(`v1/studies/${encodeURIComponent(name)}/evidence?${q}`),
    api(`v1/studies/${encodeURIComponent(name)}/runs?limit=1000`),
    api(`v1/studies/${encodeURIComponent(name)}/critical-batch`),
  ]);
  if (state.study !== name) return; // another study was picked meanwhile
  renderEvidence(evidence);
  renderCritical(critical);
  renderRuns(runs.items);
  await renderCurves(runs.items);
  const live = runs.items.some((r) => r.state === "running");
  $("#runs-refresh").textContent = live
    ? `refreshing every ${REFRESH_MS / 1000} s while runs are running · ${new Date().toLocaleTimeString()}`
    : `updated ${new Date().toLocaleTimeString()}`;
  if (live) state.timer = setTimeout(() => refreshStudy().catch(showError), REFRESH_MS);
}

function renderEvidence(ev) {
  const batches = [...new Set(ev.runs.map((r) => r.batch_size))].sort((a, b) => a - b);
  const color = (b) => COLORS[batches.indexOf(b) % COLORS.length];
  const done = ev.runs.filter((r) => r.outcome === "completed" && r.metric !== null);
  const metricSeries = batches.map((b) => ({
    name: `batch ${fmt(b)}`, color: color(b), kind: "line", markers: true,
    points: done.filter((r) => r.batch_size === b).sort((x, y) => x.lr - y.lr)
      .map((r) => [r.lr, r.metric, `run ${r.run_id}`]),
  })).filter((s) => s.points.length);
  const diverged = ev.runs.filter((r) => r.outcome === "diverged");
  // A diverged run has no metric: mark its LR at the worst end of the axis.
  const metrics = done.map((r) => r.metric);
  const worst = !metrics.length ? 1 : ev.direction === "maximize" ? Math.min(...metrics) : Math.max(...metrics);
  if (diverged.length) {
    metricSeries.push({ name: "diverged", color: "#c0392b", kind: "points", marker: "cross",
      points: diverged.map((r) => [r.lr, worst, `run ${r.run_id}, batch ${r.batch_size}: diverged`]) });
  }
  chart("#metric-chart", { xLabel: "peak LR", yLabel: ev.metric, xLog: true, height: 260, series: metricSeries });

  const recipeStages = state.recipe ? state.recipe.stages : [];
  const lrSeries = [
    { name: "completed", color: "#2f855a", kind: "points",
      points: done.map((r) => [r.batch_size, r.lr, `run ${r.run_id}: ${ev.metric} ${fmt(r.metric)}`]) },
    { name: "diverged", color: "#c0392b", kind: "points", marker: "cross",
      points: diverged.map((r) => [r.batch_size, r.lr, `run ${r.run_id}`]) },
    { name: "fitted optimum", color: "#2f6fdb", kind: "line",
      points: ev.optimum.map((p) => [p.batch_size, p.lr]) },
    { name: "divergence boundary", color: "#c0392b", kind: "step", dash: "6 4",
      points: ev.boundary.map((p) => [p.batch_size, p.cap, `cap (below LR ${fmt(p.diverged_lr)} that diverged)`]) },
    { name: "recipe", color: "#e67700", kind: "points", radius: 6,
      points: recipeStages.map((s) => [s.batch_size, s.peak_lr, "this recipe"]) },
  ];
  chart("#evidence-chart", { xLabel: "batch size", yLabel: "peak LR", xLog: true, yLog: true, height: 260,
    xTicks: [...new Set([...batches, ...recipeStages.map((s) => s.batch_size)])], series: lrSeries });
  const fit = ev.fit
    ? `Fit on ${ev.fit.n_runs} completed runs at batch sizes ${ev.fit.batch_sizes.map(fmt).join(", ")}: `
      + `LR* ∝ batch^${ev.fit.exponent.toFixed(3)} ± ${ev.fit.exponent_sd.toFixed(3)} (the rule's prior: ${ev.fit.prior_exponent}; `
      + `data weight ${ev.fit.data_weight.toFixed(2)})`
      + (ev.fit.bend && ev.fit.bend_weight >= 0.05
        ? `; the runs' optima bend near batch ${fmt(ev.fit.bend)} (F-test at 5%; a measured critical batch bends the recipe's curve).` : ".")
    : "No fitted curve yet: it needs completed runs at three or more LRs that show a minimum.";
  $("#fit").textContent = [fit, ...ev.conflicts].join(" ");
}

function renderCritical(cb) {
  const fit = cb.fit;
  const series = [
    { name: "95% band", color: "#2f6fdb", kind: "band", legend: false,
      points: fit ? fit.points.map((p) => [p.examples_seen, p.noise_scale_low, p.noise_scale_high]) : [] },
    { name: "runs, pooled by examples seen", color: "#868e96", kind: "points", radius: 3,
      points: cb.points.map((p) => [p.examples_seen, p.noise_scale,
        `B_noise ${fmt(p.noise_scale)} at ${fmt(p.examples_seen)} examples (${p.runs} runs, ${p.reports} reports)`]) },
    { name: "fitted critical batch", color: "#2f6fdb", kind: "line",
      points: fit ? fit.points.map((p) => [p.examples_seen, p.noise_scale,
        `${fmt(p.noise_scale)} (${fmt(p.noise_scale_low)}–${fmt(p.noise_scale_high)})`]) : [] },
  ];
  chart("#critical-chart", { xLabel: "examples seen", yLabel: "B_noise (examples)", xLog: true, yLog: true,
    height: 240, series });
  const how = fit && fit.interval === "run_bootstrap" ? "bootstrap over runs"
    : "t-interval over the points of fewer than 5 runs, optimistic";
  $("#critical-fit").textContent = fit
    ? `B_noise ≈ ${fmt(fit.coefficient)} × examples^${fit.exponent.toFixed(3)} (95%: ${fit.exponent_low.toFixed(3)}`
      + `–${fit.exponent_high.toFixed(3)}; ${how}), from ${cb.runs} runs; log residual RMS `
      + `${fit.residual_rms.toFixed(2)}; calibration ×${fmt(cb.calibration.factor)}`
      + (cb.calibration.factor_low != null
        ? ` (95%: ${fmt(cb.calibration.factor_low)}–${fmt(cb.calibration.factor_high)})` : "")
      + ` (${cb.calibration.measured} measured critical batches).`
    : `No fitted critical batch: ${cb.reason}`;
}

function renderRuns(runs) {
  const body = $("#runs tbody");
  body.textContent = "";
  for (const r of runs) {
    const tr = document.createElement("tr");
    tr.dataset.run = r.id;
    if (r.id === state.selectedRun) tr.className = "selected";
    cell(tr, `${r.id}`);
    cell(tr, `${r.number}`);
    const st = cell(tr, "");
    const badge = document.createElement("span");
    badge.className = `state ${r.state}`;
    badge.textContent = r.state;
    st.appendChild(badge);
    cell(tr, fmt(r.batch_size));
    cell(tr, fmt(r.peak_lr));
    cell(tr, fmt(r.steps));
    cell(tr, r.last_step === null ? null : fmt(r.last_step));
    cell(tr, r.last_loss === null ? null : fmt(r.last_loss));
    cell(tr, r.metric === null ? null : fmt(r.metric));
    cell(tr, r.reason, "reason");
    tr.onclick = () => {
      state.selectedRun = state.selectedRun === r.id ? null : r.id;
      refreshStudy().catch(showError);
    };
    body.appendChild(tr);
  }
}

async function fetchCurve(run) {
  // First the whole run, downsampled by the service (each step range's lowest and highest loss: a spike
  // survives); then, while it runs, only the reports after the last step drawn.
  let have = state.curves.get(run.id);
  if (!have) {
    const curve = await api(`v1/runs/${run.id}/curve?points=${MAX_POINTS / 2}`);
    have = { points: [], lastStep: curve.last_step === null ? -1 : curve.last_step };
    for (const b of curve.buckets) {
      if (b.high !== null) have.points.push([b.first_step, b.high]);
      if (b.low !== null && b.last_step !== b.first_step) have.points.push([b.last_step, b.low]);
      if (b.nonfinite) have.points.push([b.last_step, NaN]);
    }
    state.curves.set(run.id, have);
  }
  if (run.state !== "running" && (run.last_step === null || have.lastStep >= run.last_step)) return have;
  for (;;) {
    const page = await api(`v1/runs/${run.id}/reports?limit=5000&after_step=${have.lastStep}`);
    for (const p of page.items) have.points.push([p.step, p.finite ? p.loss : NaN]);
    if (!page.items.length) break;
    have.lastStep = page.items[page.items.length - 1].step;
    if (page.items.length < 5000) break;
  }
  return have;
}

// Every k-th point, and always the last (where a diverged run ends).
function thin(points, max) {
  if (points.length <= max) return points;
  const k = Math.ceil(points.length / max);
  const out = points.filter((_, i) => i % k === 0);
  if ((points.length - 1) % k) out.push(points[points.length - 1]);
  return out;
}

// A diverged run's loss explodes by orders of magnitude: scale the chart to the others' losses and let
// the explosion run off the top, where it still reads as one.
function robustTop(curves) {
  const ys = curves.flatMap((c) => c.points.map((p) => p[1])).filter(Number.isFinite).sort((a, b) => a - b);
  if (ys.length < 10) return undefined;
  const lo = ys[0];
  const q = ys[Math.floor(0.9 * (ys.length - 1))];
  return q + 1.5 * (q - lo);
}

async function renderCurves(runs) {
  const shown = runs.slice().sort((a, b) => b.id - a.id).slice(0, MAX_CURVES);
  if (state.selectedRun !== null && !shown.some((r) => r.id === state.selectedRun)) {
    const sel = runs.find((r) => r.id === state.selectedRun);
    if (sel) shown.push(sel);
  }
  // Running runs last: drawn on top of the finished ones (an SVG paints in order), and thicker.
  shown.sort((a, b) => (a.state === "running") - (b.state === "running"));
  const curves = await Promise.all(shown.map(fetchCurve));
  const series = shown.map((r, i) => ({
    name: `run ${r.id} · B ${fmt(r.batch_size)} · LR ${fmt(r.peak_lr)} · ${r.state}`,
    color: COLORS[i % COLORS.length], kind: "line",
    width: state.selectedRun === r.id ? 3.5 : r.state === "running" && state.selectedRun === null ? 3 : 1.8,
    hidden: state.selectedRun !== null && state.selectedRun !== r.id,
    points: thin(curves[i].points, MAX_POINTS),
  }));
  const lossChart = state.charts["#loss-chart"];
  if (lossChart && lossChart.focus !== state.selectedRun) {
    // A click on a run row shows its curve alone, a second click all of them; otherwise the legend rules.
    lossChart.hidden = new Set(series.filter((s) => s.hidden).map((s) => s.name));
  }
  chart("#loss-chart", { xLabel: "step", yLabel: "reported loss", height: 280, yMax: robustTop(curves), series });
  state.charts["#loss-chart"].focus = state.selectedRun;
}

// ------------------------------------------------------------------------------------------ wiring

function init() {
  const examples = $("#example");
  for (const name of Object.keys(EXAMPLES)) {
    const o = document.createElement("option");
    o.textContent = name;
    examples.appendChild(o);
  }
  examples.onchange = () => {
    const req = structuredClone(EXAMPLES[examples.value]);
    if (state.study) req.study = state.study;
    $("#request-source").textContent = state.study ? `an example's request, with ${state.study}'s evidence` : "";
    writeRequest(req);
  };
  writeRequest(EXAMPLES[examples.value]);
  $("#api-key").value = apiKey();
  $("#key-form").onsubmit = (ev) => {
    ev.preventDefault();
    const key = $("#api-key").value.trim();
    if (key) localStorage.setItem(KEY_STORE, key); else localStorage.removeItem(KEY_STORE);
    loadStudies();
  };
  $("#study").onchange = (ev) => pickStudy(ev.target.value);
  $("#submit").onclick = recommend;
  $("#request").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) recommend();
  });
  let resize;
  window.addEventListener("resize", () => {
    clearTimeout(resize);
    resize = setTimeout(() => Object.values(state.charts).forEach((c) => c.render()), 150);
  });
  loadStudies();
}

init();
