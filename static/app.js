// The demo page: plain JavaScript over cnnserve's own HTTP API. No library, nothing fetched from
// elsewhere: the charts are SVG drawn here.
"use strict";

const $ = (id) => document.getElementById(id);

/** An element: `h("p", { class: "x", text: "hi" }, child, …)`. */
function h(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

const SVG_NS = "http://www.w3.org/2000/svg";
/** An SVG element, as `h` makes HTML ones. */
function s(tag, attrs, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

function build(node, attrs, children) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "text") node.textContent = value;
    else if (name === "class") node.setAttribute("class", value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  node.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

// ---------------------------------------------------------------------------------------------
// Numbers as people read them

/** 0.6234 → "62.3%" (one decimal, as the API's probabilities rounded). */
const percent = (x) => `${(x * 100).toFixed(1)}%`;

function milliseconds(ms) {
  if (!Number.isFinite(ms)) return "";
  return ms < 10 ? `${ms.toFixed(1)} ms` : ms < 1000 ? `${Math.round(ms)} ms` : seconds(ms / 1000);
}

/** A duration in seconds, rounded to what matters: "0.4 s", "42 s", "3 min 5 s", "2 h 10 min". */
function seconds(sec) {
  if (!Number.isFinite(sec) || sec < 0) return "";
  if (sec < 10 && !Number.isInteger(sec)) return `${sec.toFixed(1)} s`;
  if (sec < 60) return `${Math.round(sec)} s`;
  const min = Math.floor(sec / 60);
  if (min < 60) return `${min} min ${Math.round(sec % 60)} s`;
  return `${Math.floor(min / 60)} h ${min % 60} min`;
}

const plural = (n, one, many) => `${n} ${n === 1 ? one : many || one + "s"}`;
const sum = (xs) => xs.reduce((a, b) => a + b, 0);

function when(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  const today = new Date().toDateString() === date.toDateString();
  return today
    ? date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : date.toLocaleString([], { dateStyle: "medium", timeStyle: "short" });
}

// ---------------------------------------------------------------------------------------------
// The API, with the key when the server asks for one

const KEY_ITEM = "cnnserve.api_key";
let apiKey = sessionStorage.getItem(KEY_ITEM) || "";
/** While the key dialog is open for requests that got 401: they wait on this. */
let keyWanted = null;

/** `url` with `?api_key=` where a browser cannot send a header (EventSource, <img>, links). */
function withKey(url) {
  if (!apiKey) return url;
  return `${url}${url.includes("?") ? "&" : "?"}api_key=${encodeURIComponent(apiKey)}`;
}

/** Plain words for the API's error types; the server's own sentence follows as the detail. */
const PLAIN = {
  model_loading: "This model is still loading: try again in a few seconds.",
  model_unavailable: "This model could not be loaded, so it cannot answer.",
  overloaded: "The server is busy right now: try again in a moment.",
  invalid_image: "This file is not a picture the server can read (JPEG, PNG, BMP, WebP or GIF).",
  unsupported_media_type: "This file is not a picture the server can read (JPEG, PNG, BMP, WebP or GIF).",
  payload_too_large: "This file is larger than the server accepts.",
  too_many_pixels: "This picture has more pixels than the server accepts.",
  device_out_of_memory: "The server ran out of memory for this request: try again in a moment.",
  invalid_dataset: "The data set cannot be used as it is:",
  unsupported: "These settings cannot be used with this base model.",
  internal: "Something went wrong on the server.",
};

class ApiError extends Error {
  constructor(message, { detail = "", problems = [], status = 0, type = "" } = {}) {
    super(message);
    this.detail = detail;
    this.problems = problems;
    this.status = status;
    this.type = type;
  }
}

const unreachable = () =>
  new ApiError("The server cannot be reached: is cnnserve still running?", { type: "network" });

function problemText(p) {
  return typeof p === "string" ? p : (p.file ? `${p.file}: ` : "") + (p.message || JSON.stringify(p));
}

function capitalized(text) {
  return text ? text[0].toUpperCase() + text.slice(1) : text;
}

/** The ApiError for an error answer (`{"error", "error_type", "details"}`). */
function answerError(status, body) {
  const detail = capitalized(body.error || `The server answered ${status}.`);
  const problems = Array.isArray(body.details?.problems) ? body.details.problems.map(problemText) : [];
  const plain = PLAIN[body.error_type];
  if (!plain) return new ApiError(detail, { problems, status, type: body.error_type });
  return new ApiError(plain, { detail: problems.length ? "" : detail, problems, status, type: body.error_type });
}

/** fetch with the key; a 401 opens the key dialog, and the request is sent again once a key is given. */
async function request(path, options = {}) {
  for (;;) {
    const headers = new Headers(options.headers || {});
    if (apiKey) headers.set("Authorization", `Bearer ${apiKey}`);
    let response;
    try {
      response = await fetch(path, { ...options, headers });
    } catch {
      throw unreachable();
    }
    if (response.status !== 401) return response;
    await askForKey(Boolean(apiKey));
  }
}

/** The JSON of a successful answer, or an ApiError. */
async function api(path, options) {
  const response = await request(path, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw answerError(response.status, body);
  return body;
}

function askForKey(refused) {
  if (!keyWanted) {
    let resolve;
    keyWanted = new Promise((r) => (resolve = r));
    keyWanted.resolve = resolve;
  }
  openKeyDialog(refused ? "The server refused the key this tab had: type it again." : "");
  setStatus("This server asks for an API key.");
  $("key-button").hidden = false;
  return keyWanted;
}

function openKeyDialog(message) {
  const dialog = $("key-dialog");
  showError("key-error", message || null);
  if (!dialog.open) dialog.showModal();
  $("key-input").focus();
}

$("key-button").addEventListener("click", () => openKeyDialog(""));

$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = $("key-input").value.trim();
  if (!key) return showError("key-error", "Type the key first.");
  $("key-submit").disabled = true;
  try {
    // Checked before it is kept: a wrong key keeps the dialog open with a sentence.
    const response = await fetch("/models", { headers: { Authorization: `Bearer ${key}` } });
    if (response.status === 401) {
      showError("key-error", "The server refused this key: check it and type it again.");
      $("key-input").select();
      return;
    }
  } catch {
    return showError("key-error", unreachable());
  } finally {
    $("key-submit").disabled = false;
  }
  apiKey = key;
  sessionStorage.setItem(KEY_ITEM, key);
  $("key-input").value = "";
  $("key-dialog").close();
  $("key-button").hidden = false;
  if (keyWanted) {
    const waiting = keyWanted;
    keyWanted = null;
    waiting.resolve();
  } else {
    refreshAll();
  }
});

/** Shows an error (an ApiError, an Error, a string) in the element `id`, or hides it (null). */
function showError(id, error) {
  const box = $(id);
  box.replaceChildren();
  box.hidden = !error;
  if (!error) return;
  const message = typeof error === "string" ? error : error.message || String(error);
  box.append(h("span", { text: message }));
  if (error.problems?.length) {
    box.append(h("ul", {}, error.problems.map((p) => h("li", { text: p }))));
  }
  if (error.detail) box.append(h("span", { class: "detail", text: `Details: ${error.detail}` }));
}

function setStatus(text) {
  $("status").textContent = text;
}

// ---------------------------------------------------------------------------------------------
// Charts: hand-written SVG, redrawn at the width of their box

const charts = new Map();
const resizes = new ResizeObserver((entries) => {
  for (const entry of entries) {
    const draw = charts.get(entry.target);
    if (draw && Math.abs(entry.target.clientWidth - (draw.width || 0)) > 1) draw();
  }
});

/** Draws into `box` now and again whenever its width changes. */
function drawn(box, draw) {
  const redraw = () => {
    redraw.width = box.clientWidth;
    box.replaceChildren(draw(Math.max(box.clientWidth, 200)));
  };
  charts.set(box, redraw);
  resizes.observe(box);
  redraw();
}

/** Splits `text` into lines no wider than `width` as `measure` (an SVG <text>) renders them. */
function wrapped(text, width, measure) {
  const fits = (t) => {
    measure.textContent = t;
    return measure.getComputedTextLength() <= width;
  };
  const lines = [];
  let line = "";
  for (const word of text.split(/\s+/)) {
    const next = line ? `${line} ${word}` : word;
    if (!line || fits(next)) line = next;
    else {
      lines.push(line);
      line = word;
    }
  }
  if (line) lines.push(line);
  return lines;
}

/**
 * A horizontal bar chart: each item's label (wrapped, never cut) and value above its bar.
 * items: [{ label, value (0..1), note? }]; `title` names the chart for screen readers.
 */
function barChart(box, items, title) {
  drawn(box, (width) => {
    const svg = s("svg", { class: "bars", width, role: "img", "aria-label": `${title}: ${items.map((i) => `${i.label} ${percent(i.value)}`).join(", ")}` });
    box.replaceChildren(svg); // measured in place, so that fonts are the page's
    const measure = s("text", { class: "bar-label" });
    svg.append(measure);
    const valueWidth = 112;
    let y = 0;
    const rows = items.map((item) => {
      const lines = wrapped(item.label, width - valueWidth, measure);
      const value = percent(item.value) + (item.note ? ` ${item.note}` : "");
      const top = y;
      y += lines.length * 17 + 24;
      const row = s("g", { class: "bar-row", "data-label": item.label, "data-value": item.value },
        s("title", { text: `${item.label}: ${value}` }),
        s("text", { class: "bar-label", x: 0, y: top + 13 },
          lines.map((line, i) => s("tspan", { x: 0, dy: i ? 17 : 0, text: line }))),
        s("text", { class: "bar-value", x: width, y: top + 13, "text-anchor": "end", text: value }),
        s("rect", { class: "bar-track", x: 0, y: top + lines.length * 17 + 2, width, height: 10, rx: 5 }),
        s("rect", { class: "bar-fill", x: 0, y: top + lines.length * 17 + 2, width: Math.max(item.value * width, item.value > 0 ? 2 : 0), height: 10, rx: 5 }));
      return row;
    });
    measure.remove();
    svg.append(...rows);
    svg.setAttribute("height", Math.max(y, 1));
    svg.setAttribute("viewBox", `0 0 ${width} ${Math.max(y, 1)}`);
    return svg;
  });
}

/** Tick values from 0 to at least `max`, 3 to 6 of them, at 1, 2 or 5 times a power of ten. */
function ticks(max) {
  if (!(max > 0)) return [0, 1];
  const raw = max / 4;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((m) => max / m <= 5);
  const out = [];
  for (let t = 0; t < max + step * 0.999; t += step) out.push(+t.toPrecision(6));
  return out;
}

/**
 * Train against validation per epoch. `key` picks the metric (`loss` or `acc`); the x axis runs
 * to `epochs` (the planned number, so the curves grow into it); `best` marks the kept epoch.
 */
function curveChart(box, history, key, epochs, best) {
  const isAcc = key === "acc";
  const series = [
    { name: "train", cls: "train", values: history.map((m) => m[`train_${key}`]) },
    { name: "validation", cls: "valid", values: history.map((m) => m[`valid_${key}`]) },
  ];
  const last = history[history.length - 1];
  const label = history.length
    ? `${isAcc ? "Accuracy" : "Loss"} per epoch, ${plural(history.length, "epoch")} of ${epochs}; last: train ${isAcc ? percent(last[`train_${key}`]) : last[`train_${key}`].toFixed(3)}, validation ${isAcc ? percent(last[`valid_${key}`]) : last[`valid_${key}`].toFixed(3)}`
    : `${isAcc ? "Accuracy" : "Loss"} per epoch: no epoch finished yet`;
  drawn(box, (width) => {
    const height = Math.round(Math.min(220, Math.max(150, width * 0.5)));
    const m = { left: 46, right: 18, top: 10, bottom: 34 };
    const w = width - m.left - m.right;
    const hgt = height - m.top - m.bottom;
    const xMax = Math.max(epochs, history.length, 2);
    const finite = series.flatMap((se) => se.values).filter(Number.isFinite);
    const yTicks = isAcc ? [0, 0.25, 0.5, 0.75, 1] : ticks(Math.max(...finite, 0) * 1.05 || 1);
    const yMax = yTicks[yTicks.length - 1];
    const x = (epoch) => m.left + ((epoch - 1) / (xMax - 1)) * w;
    const y = (v) => m.top + hgt - (Math.min(Math.max(v, 0), yMax) / yMax) * hgt;
    // Epoch labels at a round step, as many as fit.
    const room = Math.max(2, Math.floor(w / 40));
    const xStep = [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500].find((m) => Math.ceil(xMax / m) <= room) || 1000;
    const xTicks = [1];
    for (let e = xStep <= 2 ? 1 + xStep : xStep; e <= xMax; e += xStep) xTicks.push(e);
    const svg = s("svg", { class: "curves", width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": label, "data-epochs": history.length },
      yTicks.map((t) => s("g", { class: "grid" },
        s("line", { x1: m.left, x2: m.left + w, y1: y(t), y2: y(t) }),
        s("text", { x: m.left - 6, y: y(t) + 4, "text-anchor": "end", text: isAcc ? `${Math.round(t * 100)}%` : String(t) }))),
      xTicks.map((e) => s("text", { class: "tick", x: x(e), y: m.top + hgt + 16, "text-anchor": "middle", text: String(e) })),
      s("text", { class: "axis-title", x: m.left + w / 2, y: height - 2, "text-anchor": "middle", text: "epoch" }),
      history.length ? null : s("text", { class: "empty", x: m.left + w / 2, y: m.top + hgt / 2, "text-anchor": "middle", text: "no epoch finished yet" }),
      best ? s("line", { class: "best", x1: x(best), x2: x(best), y1: m.top, y2: m.top + hgt }, s("title", { text: `kept: epoch ${best}` })) : null,
      series.map((se) => {
        const points = se.values.map((v, i) => [x(i + 1), y(v), v, i + 1]).filter((p) => Number.isFinite(p[2]));
        return s("g", { class: `series ${se.cls}`, "data-points": points.length },
          points.length > 1 ? s("polyline", { points: points.map((p) => `${p[0].toFixed(1)},${p[1].toFixed(1)}`).join(" ") }) : null,
          points.map((p) => s("circle", { cx: p[0], cy: p[1], r: 3.5 },
            s("title", { text: `epoch ${p[3]}, ${se.name}: ${isAcc ? percent(p[2]) : p[2].toFixed(4)}` }))));
      }));
    return svg;
  });
}

// ---------------------------------------------------------------------------------------------
// Models

let models = [];
let defaultModel = null;
let modelsTimer = null;

async function loadModels() {
  clearTimeout(modelsTimer);
  let answer;
  try {
    answer = await api("/models");
    showError("models-error", null);
  } catch (e) {
    showError("models-error", e);
    throw e;
  }
  models = answer.models;
  defaultModel = answer.default_model;
  renderModelChoices();
  renderModels();
  const ready = models.filter((m) => m.state === "ready").length;
  const loading = models.filter((m) => m.state === "loading").length;
  const failed = models.filter((m) => m.state === "failed").length;
  setStatus([
    ready ? `${plural(ready, "model")} ready` : "no model ready yet",
    loading ? `${loading} loading…` : "",
    failed ? `${failed} failed to load` : "",
  ].filter(Boolean).join(", "));
  if (loading) modelsTimer = setTimeout(() => loadModels().catch(() => {}), 2000);
}

function describeModel(m) {
  if (m.state !== "ready") return m.architecture || "";
  if (m.kind === "fine_tuned") {
    const acc = m.metrics?.evaluation?.test_acc;
    return `fine-tuned on ${m.base_model}, ${plural(m.num_classes, "class", "classes")}` +
      (Number.isFinite(acc) ? `, ${m.metrics.evaluation.split || "test"} accuracy ${percent(acc)}` : "");
  }
  return `${m.architecture}, ${plural(m.num_classes, "class", "classes")} (ImageNet)`;
}

function renderModelChoices() {
  const ready = models.filter((m) => m.state === "ready");
  const select = $("model");
  const chosen = select.value || defaultModel;
  select.replaceChildren(...ready.map((m) =>
    h("option", { value: m.name, text: m.kind === "fine_tuned" ? `${m.name} (fine-tuned, ${m.num_classes} classes)` : `${m.name} (${m.architecture})` })));
  select.value = ready.some((m) => m.name === chosen) ? chosen : defaultModel || "";
  if (!ready.length) select.append(h("option", { value: "", text: "no model ready yet" }));

  const bases = ready.filter((m) => m.kind === "pretrained");
  const base = $("base-model");
  const baseChosen = base.value || (bases.some((m) => m.name === defaultModel) ? defaultModel : "");
  base.replaceChildren(...bases.map((m) => h("option", { value: m.name, text: `${m.name} (${m.architecture})` })));
  if (baseChosen && bases.some((m) => m.name === baseChosen)) base.value = baseChosen;
  updateLayerChoice();
}

/** Only VGG's classifier has more than one layer to train. */
function updateLayerChoice() {
  const base = models.find((m) => m.name === $("base-model").value);
  const vgg = !base || (base.architecture || "").startsWith("vgg");
  const option = $("train-layers").querySelector('option[value="classifier"]');
  option.disabled = !vgg;
  if (!vgg && $("train-layers").value === "classifier") $("train-layers").value = "head";
}
$("base-model").addEventListener("change", updateLayerChoice);

function renderModels() {
  const list = $("models");
  list.replaceChildren(...models.map((m) => {
    const tuned = m.kind === "fine_tuned";
    const actions = [];
    if (m.state === "ready") {
      actions.push(h("button", { type: "button", class: "quiet", onclick: () => tryModel(m.name), "aria-label": `Use ${m.name} to classify` , text: "Use" }));
    }
    if (tuned) {
      actions.push(h("a", { class: "button quiet", href: withKey(`/models/${encodeURIComponent(m.name)}/download`), download: `${m.name}.safetensors`, "aria-label": `Download the head of ${m.name} (safetensors)`, text: "Download" }));
      actions.push(h("button", { type: "button", class: "danger quiet", "aria-label": `Delete ${m.name}`, text: "Delete", onclick: () => deleteModel(m.name) }));
    }
    return h("li", { class: "item", "data-model": m.name },
      h("div", { class: "item-main" },
        h("strong", { class: "item-name", text: m.name }),
        h("span", { class: `badge ${m.state}`, text: m.state }),
        m.default ? h("span", { class: "badge", text: "default" }) : null),
      h("p", { class: "item-sub", text: describeModel(m) }),
      m.error ? h("p", { class: "error", text: m.error }) : null,
      actions.length ? h("div", { class: "item-actions" }, actions) : null);
  }));
}

async function deleteModel(name) {
  const ok = await confirmDialog(`Delete the model “${name}”?`, `Its files are removed from the server's weights folder. This cannot be undone.`, "Delete");
  if (!ok) return;
  try {
    await api(`/models/${encodeURIComponent(name)}`, { method: "DELETE" });
    if ($("model").value === name) $("model").value = defaultModel || "";
    await loadModels();
  } catch (e) {
    showError("models-error", e);
  }
}

$("rescan").addEventListener("click", async () => {
  try {
    await api("/models/reload", { method: "POST" });
    await loadModels();
  } catch (e) {
    showError("models-error", e);
  }
});

/** Selects a model in the predict panel and brings the panel into view. */
async function tryModel(name) {
  await loadModels().catch(() => {});
  const select = $("model");
  if (![...select.options].some((o) => o.value === name)) {
    showError("predict-error", `The model “${name}” is not ready to answer.`);
    return;
  }
  select.value = name;
  $("model-hint").textContent = `“${name}” is selected: drop, paste or choose a photo to try it.`;
  $("predict").scrollIntoView({ block: "start" });
  select.focus({ preventScroll: true });
  if (currentFile) classify(currentFile);
}

// ---------------------------------------------------------------------------------------------
// Predict

let currentFile = null;
let previewUrl = null;
let predictSeq = 0;

async function classify(file) {
  currentFile = file;
  const seq = ++predictSeq;
  showError("predict-error", null);
  const model = $("model").value;
  if (!model) {
    showError("predict-error", "No model is ready yet: wait until one is listed under Models.");
    return;
  }
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  $("preview").src = previewUrl;
  $("preview").alt = `The photo being classified${file.name ? `: ${file.name}` : ""}`;
  $("preview-name").textContent = file.name || "pasted picture";
  $("predict-result").hidden = false;
  $("prediction-chart").setAttribute("aria-busy", "true");
  $("predict-time").textContent = `Asking ${model}…`;
  const topK = Math.max(1, Math.min(1000, parseInt($("top-k").value, 10) || 5));
  const params = new URLSearchParams({ model, top_k: String(topK) });
  const started = performance.now();
  try {
    const response = await request(`/predict?${params}`, {
      method: "POST",
      // The server recognises pictures by their bytes; a file's guessed type can only mislead it.
      headers: { "content-type": file.type.startsWith("image/") ? file.type : "application/octet-stream" },
      body: file,
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw answerError(response.status, body);
    if (seq !== predictSeq) return;
    const took = performance.now() - started;
    $("prediction-title").textContent = `Top ${plural(body.predictions.length, "class", "classes")} by ${body.model}`;
    barChart($("prediction-chart"), body.predictions.map((p) => ({ label: p.label, value: p.probability })), `Classes predicted by ${body.model}`);
    $("prediction-chart").dataset.model = body.model;
    const server = parseFloat(response.headers.get("x-total-time"));
    const inference = parseFloat(response.headers.get("x-inference-time"));
    $("predict-time").textContent = Number.isFinite(server)
      ? `Took ${milliseconds(server)} on the server (${milliseconds(inference)} in the network), ${milliseconds(took)} with the upload.`
      : `Took ${milliseconds(took)}.`;
  } catch (e) {
    if (seq !== predictSeq) return;
    $("prediction-chart").replaceChildren();
    $("predict-time").textContent = "";
    $("predict-result").hidden = true;
    showError("predict-error", e);
  } finally {
    if (seq === predictSeq) $("prediction-chart").setAttribute("aria-busy", "false");
  }
}

$("image").addEventListener("change", (e) => e.target.files[0] && classify(e.target.files[0]));
$("model").addEventListener("change", () => {
  $("model-hint").textContent = "";
  if (currentFile) classify(currentFile);
});
let topKTimer = null;
$("top-k").addEventListener("input", () => {
  clearTimeout(topKTimer);
  topKTimer = setTimeout(() => currentFile && $("top-k").checkValidity() && classify(currentFile), 300);
});

const drop = $("drop");
const dropTarget = $("predict");
const imageIn = (list) => [...(list || [])].find((f) => f.type.startsWith("image/") || !f.type);
dropTarget.addEventListener("dragover", (e) => {
  e.preventDefault();
  drop.classList.add("over");
});
dropTarget.addEventListener("dragleave", (e) => {
  if (!dropTarget.contains(e.relatedTarget)) drop.classList.remove("over");
});
dropTarget.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  const file = imageIn(e.dataTransfer.files);
  if (file) classify(file);
});
// A picture pasted anywhere on the page (not text pasted into a field) is classified.
document.addEventListener("paste", (e) => {
  const file = [...(e.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
  if (!file) return;
  e.preventDefault();
  classify(file);
});

// ---------------------------------------------------------------------------------------------
// Fine-tuning: the upload

/** POST /finetune through XMLHttpRequest, which reports the upload's progress. */
function upload(form) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/finetune");
    if (apiKey) xhr.setRequestHeader("Authorization", `Bearer ${apiKey}`);
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) $("upload-status").textContent = `Uploading… ${Math.round((e.loaded / e.total) * 100)}%`;
    });
    xhr.upload.addEventListener("load", () => ($("upload-status").textContent = "Checking the data set…"));
    xhr.addEventListener("load", () => {
      let body = {};
      try {
        body = JSON.parse(xhr.responseText);
      } catch {
        // not JSON: the status says it
      }
      resolve({ status: xhr.status, body });
    });
    xhr.addEventListener("error", () => reject(unreachable()));
    xhr.send(form);
  });
}

$("finetune-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const formEl = event.target;
  showError("finetune-error", null);
  const form = new FormData(formEl);
  form.set("augment", $("augment").checked ? "true" : "false");
  if (!form.get("name")) form.delete("name");
  $("start").disabled = true;
  try {
    let answer = await upload(form);
    while (answer.status === 401) {
      await askForKey(Boolean(apiKey));
      answer = await upload(form);
    }
    if (answer.status !== 202) throw answerError(answer.status, answer.body);
    $("upload-status").textContent = "Queued.";
    $("name").value = "";
    openJob(answer.body.job_id);
    loadJobs().catch(() => {});
  } catch (e) {
    $("upload-status").textContent = "";
    showError("finetune-error", e);
  } finally {
    $("start").disabled = false;
  }
});

// ---------------------------------------------------------------------------------------------
// Fine-tuning: one job, live

const PHASES = ["reading", "caching", "training", "evaluating", "saving", "done"];
/** The job shown: its id, the EventSource, and what is known so far. */
let watched = null;

function openJob(id) {
  if (location.hash !== `#job=${id}`) history.replaceState(null, "", `#job=${id}`);
  watch(id);
}

function watch(id) {
  if (watched?.source) watched.source.close();
  const w = { id, job: null, history: new Map(), progress: null };
  watched = w;
  $("job-empty").hidden = true;
  $("job").hidden = false;
  showError("job-error", null);
  // Subscribe first, then read the job: nothing that happens in between is missed.
  const source = new EventSource(withKey(`/jobs/${encodeURIComponent(id)}/events`));
  w.source = source;
  const current = () => watched === w;
  source.addEventListener("open", async () => {
    try {
      const job = await api(`/jobs/${encodeURIComponent(id)}`);
      if (!current() || w.done) return;
      for (const m of job.history) w.history.set(m.epoch, m);
      if (!w.progress || later(job.progress, w.progress)) w.progress = job.progress;
      w.job = job;
      renderJob(w);
    } catch (e) {
      if (current()) showError("job-error", e);
    }
  });
  source.addEventListener("progress", (e) => {
    if (!current()) return;
    const p = JSON.parse(e.data);
    if (w.progress && later(w.progress, p)) return;
    w.progress = p;
    if (w.job && w.job.status === "queued") w.job.status = "running";
    if (w.job) renderProgress(w);
  });
  source.addEventListener("epoch", (e) => {
    if (!current()) return;
    const m = JSON.parse(e.data);
    w.history.set(m.epoch, m);
    if (w.job) renderCurves(w);
  });
  source.addEventListener("done", (e) => {
    source.close();
    if (!current()) return;
    const job = JSON.parse(e.data);
    w.done = true;
    w.job = job;
    w.progress = job.progress;
    w.history = new Map(job.history.map((m) => [m.epoch, m]));
    renderJob(w);
    loadJobs().catch(() => {});
    if (job.status === "succeeded") loadModels().catch(() => {});
  });
  source.addEventListener("error", () => {
    // The browser reconnects by itself; a job that is gone (purged) ends here.
    if (current() && source.readyState === EventSource.CLOSED && !w.done) {
      showError("job-error", "Lost the job's live updates: reload the page to see where it is.");
    }
  });
}

/** Whether progress `a` is further along than `b`. */
function later(a, b) {
  if (!a) return false;
  if (!b) return true;
  const pa = PHASES.indexOf(a.phase);
  const pb = PHASES.indexOf(b.phase);
  return pa !== pb ? pa > pb : a.done > b.done;
}

function renderJob(w) {
  const job = w.job;
  $("upload-status").textContent = "";
  $("job-name").textContent = job.name;
  const badge = $("job-status");
  badge.textContent = job.status;
  badge.className = `badge ${job.status}`;
  const counts = job.dataset.counts;
  const p = job.params;
  $("job-meta").textContent =
    `on ${job.base_model} · ${job.dataset.classes.length} classes (${job.dataset.classes.join(", ")}) · ` +
    `${sum(counts.train)} training, ${sum(counts.valid)} validation, ${sum(counts.test)} test photos · ` +
    `${plural(p.epochs, "epoch")}, learning rate ${p.learning_rate}, batch ${p.batch_size}, ` +
    `${p.augment ? "augmented" : "no augmentation"}, ${p.train_layers === "head" ? "last layer" : "whole classifier"} · job ${job.job_id}`;
  if (job.error && job.status !== "cancelled") showError("job-error", job.error);
  else showError("job-error", null);
  renderProgress(w);
  renderCurves(w);
  renderResult(job);
}

function renderProgress(w) {
  const job = w.job;
  const p = w.progress;
  const finished = ["succeeded", "failed", "cancelled"].includes(job.status);
  const badge = $("job-status");
  badge.textContent = job.status;
  badge.className = `badge ${job.status}`;
  $("cancel").hidden = finished;
  $("cancel").disabled = false;
  const phase = job.status === "succeeded" ? "done" : p?.phase;
  const at = PHASES.indexOf(phase);
  for (const li of $("phases").children) {
    const i = PHASES.indexOf(li.dataset.phase);
    li.className = at < 0 ? "" : i < at || (i === at && phase === "done") ? "past" : i === at ? (finished ? "stopped" : "current") : "";
    if (i === at) li.setAttribute("aria-current", "step");
    else li.removeAttribute("aria-current");
  }
  const bar = $("job-progress");
  const eta = $("job-eta");
  if (finished) {
    bar.value = job.status === "succeeded" ? 1 : p && p.total ? p.done / p.total : 0;
    eta.textContent = finishedText(job, w);
    return;
  }
  if (job.status === "queued" || !p) {
    bar.removeAttribute("value");
    eta.textContent = "Waiting for its turn: one job trains at a time.";
    return;
  }
  const fraction = p.total ? p.done / p.total : 0;
  switch (p.phase) {
    case "reading":
      bar.removeAttribute("value");
      eta.textContent = "Reading and checking the photos…";
      break;
    case "caching":
      bar.value = fraction;
      eta.textContent = `Running the frozen network on each photo once: ${p.done} of ${p.total}.`;
      break;
    case "training":
      bar.value = fraction;
      eta.textContent = `Epoch ${Math.max(p.epoch, 1)} of ${p.epochs}, step ${p.step} of ${p.steps} · ` +
        `${p.images_per_s >= 100 ? Math.round(p.images_per_s) : p.images_per_s.toFixed(1)} photos/s` +
        (p.eta_s >= 1 ? ` · about ${seconds(Math.round(p.eta_s))} left` : p.eta_s > 0 ? " · under a second left" : "");
      break;
    case "evaluating":
      bar.value = 1;
      eta.textContent = "Scoring the best epoch on the held-out photos…";
      break;
    default:
      bar.value = 1;
      eta.textContent = "Saving the model…";
  }
}

/** A finished job's figures: what it did and how long it took, no live speed. */
function finishedText(job, w) {
  const took = job.started_at && job.finished_at ? (new Date(job.finished_at) - new Date(job.started_at)) / 1000 : NaN;
  const epochs = w.history.size;
  const duration = Number.isFinite(took) ? ` in ${seconds(took)}` : "";
  switch (job.status) {
    case "succeeded":
      return `Finished${duration}: ${plural(epochs, "epoch")} trained, epoch ${job.result.best_epoch} kept.`;
    case "cancelled":
      return job.started_at
        ? `Cancelled after ${plural(epochs, "epoch")} of ${job.params.epochs}${duration}.`
        : "Cancelled before it started.";
    default:
      return `Failed${epochs ? ` after ${plural(epochs, "epoch")} of ${job.params.epochs}` : ""}${duration}.`;
  }
}

function renderCurves(w) {
  const history = [...w.history.values()].sort((a, b) => a.epoch - b.epoch);
  const epochs = w.job.params.epochs;
  const best = w.job.result?.best_epoch;
  curveChart($("loss-chart"), history, "loss", epochs, best);
  curveChart($("acc-chart"), history, "acc", epochs, best);
  const fmt = (x) => (typeof x === "number" ? x.toFixed(4) : "");
  $("history").tBodies[0].replaceChildren(...history.map((m) =>
    h("tr", { class: m.epoch === best ? "best" : null },
      h("th", { scope: "row", text: String(m.epoch) }),
      [m.train_loss, m.train_acc, m.valid_loss, m.valid_acc].map((v) => h("td", { text: fmt(v) })))));
}

function renderResult(job) {
  const box = $("job-result");
  box.replaceChildren();
  const r = job.result;
  if (!r) return;
  const split = r.split === "test" ? "test" : "validation";
  const classes = job.dataset.classes;
  const total = sum(r.confusion_matrix.map(sum));
  box.append(
    h("div", { class: "score" },
      h("p", { class: "big" }, h("span", { class: "big-number", id: "test-accuracy", text: percent(r.test_acc) }), ` ${split} accuracy`),
      h("p", { class: "muted", text: `${plural(total, "photo")} held out, loss ${r.test_loss.toFixed(4)}, kept epoch ${r.best_epoch}. The model “${r.model}” is being served.` }),
      h("div", { class: "actions" },
        h("button", { id: "try-model", type: "button", text: "Try this model", onclick: () => tryModel(r.model) }),
        h("a", { class: "button quiet", href: withKey(`/models/${encodeURIComponent(r.model)}/download`), download: `${r.model}.safetensors`, text: "Download the head" }))),
    h("div", { class: "evaluation" },
      h("div", { class: "confusion-box" },
        h("h4", { text: "Confusion matrix" }),
        h("div", { class: "table-wrap", tabindex: 0, role: "region", "aria-label": "Confusion matrix" }, confusionTable(r.confusion_matrix, classes, split))),
      h("div", { class: "per-class-box" },
        h("h4", { text: "Accuracy per class" }),
        h("div", { id: "per-class-chart", class: "chart-box" }))));
  barChart($("per-class-chart"), r.per_class.map((c) => ({ label: c.class, value: c.accuracy, note: `of ${c.support}` })), `Accuracy per class on the ${split} photos`);
  const right = r.examples.map((ex, n) => [ex, n]).filter(([ex]) => ex.correct);
  const wrong = r.examples.map((ex, n) => [ex, n]).filter(([ex]) => !ex.correct);
  const gallery = (title, list, empty) => h("div", { class: "gallery-box" },
    h("h4", { text: title }),
    list.length
      ? h("div", { class: "gallery" }, list.map(([ex, n]) => h("figure", { class: ex.correct ? "correct" : "wrong" },
        h("img", { src: withKey(`/jobs/${encodeURIComponent(job.job_id)}/examples/${n}`), width: 112, height: 112, alt: `${ex.file}: a ${ex.true_label}` }),
        h("figcaption", {},
          h("span", { text: `${ex.predicted_label} ${Math.round(ex.probability * 100)}%` }),
          ex.correct ? null : h("span", { class: "truth", text: `is ${ex.true_label}` })))))
      : h("p", { class: "muted", text: empty }));
  box.append(
    gallery("Most confident and right", right, "No photo was classified correctly."),
    gallery("Most confident and wrong", wrong, `No mistake on the ${split} photos.`));
}

function confusionTable(matrix, classes, split) {
  const rowTotals = matrix.map(sum);
  return h("table", { class: "confusion", id: "confusion" },
    h("caption", { text: `Rows: the true class; columns: the class predicted (${split} photos).` }),
    h("thead", {}, h("tr", {},
      h("th", { scope: "col", class: "corner", text: "true \\ predicted" }),
      classes.map((c) => h("th", { scope: "col", text: c })))),
    h("tbody", {}, matrix.map((row, i) => h("tr", {},
      h("th", { scope: "row", text: classes[i] }),
      row.map((n, j) => {
        const share = rowTotals[i] ? n / rowTotals[i] : 0;
        const kind = i === j ? "hit" : "miss";
        return h("td", {
          class: `${kind}${n && share >= 0.5 ? " strong" : n ? " some" : ""}`,
          style: `--share:${share.toFixed(3)}`,
          title: `${n} ${classes[i]} photo${n === 1 ? "" : "s"} predicted as ${classes[j]}`,
          text: String(n),
        });
      })))));
}

$("cancel").addEventListener("click", async () => {
  if (!watched) return;
  const id = watched.id;
  $("cancel").disabled = true;
  $("job-eta").textContent = "Cancelling…";
  try {
    await api(`/jobs/${encodeURIComponent(id)}`, { method: "DELETE" });
  } catch (e) {
    showError("job-error", e);
    $("cancel").disabled = false;
  }
});

// ---------------------------------------------------------------------------------------------
// Jobs

let jobsTimer = null;

async function loadJobs() {
  clearTimeout(jobsTimer);
  let jobs;
  try {
    ({ jobs } = await api("/jobs"));
    showError("jobs-error", null);
  } catch (e) {
    showError("jobs-error", e);
    throw e;
  }
  $("jobs-empty").hidden = jobs.length > 0;
  $("jobs").replaceChildren(...jobs.map(jobItem));
  if (jobs.some((j) => j.status === "queued" || j.status === "running")) {
    jobsTimer = setTimeout(() => loadJobs().catch(() => {}), 3000);
  }
}

function jobSummary(job) {
  const took = job.started_at && job.finished_at ? (new Date(job.finished_at) - new Date(job.started_at)) / 1000 : NaN;
  const parts = [`on ${job.base_model}`, `${job.dataset.classes.length} classes`];
  switch (job.status) {
    case "succeeded":
      parts.push(`${job.result.split} accuracy ${percent(job.result.test_acc)}`, `${plural(job.history.length, "epoch")} in ${seconds(took)}`);
      break;
    case "running": {
      const p = job.progress;
      if (p?.phase === "training") parts.push(`training, epoch ${Math.max(p.epoch, 1)} of ${p.epochs}`);
      else if (p) parts.push(p.phase);
      break;
    }
    case "queued":
      parts.push("waiting for its turn");
      break;
    default:
      parts.push(job.started_at ? `stopped after ${plural(job.history.length, "epoch")} of ${job.params.epochs}` : "never started");
  }
  parts.push(when(job.created_at));
  return parts.join(" · ");
}

function jobItem(job) {
  const finished = ["succeeded", "failed", "cancelled"].includes(job.status);
  return h("li", { class: "item", "data-job": job.job_id },
    h("div", { class: "item-main" },
      h("a", { class: "item-name", href: `#job=${job.job_id}`, text: job.name, onclick: (e) => {
        e.preventDefault();
        openJob(job.job_id);
        $("job-panel").scrollIntoView({ block: "start" });
      } }),
      h("span", { class: `badge ${job.status}`, text: job.status })),
    h("p", { class: "item-sub", text: jobSummary(job) }),
    job.status === "failed" && job.error ? h("p", { class: "error", text: job.error }) : null,
    h("div", { class: "item-actions" },
      finished
        ? h("button", { type: "button", class: "danger quiet", "aria-label": `Remove the job ${job.name} from the list`, text: "Remove", onclick: () => removeJob(job) })
        : h("button", { type: "button", class: "danger quiet", "aria-label": `Cancel the job ${job.name}`, text: "Cancel", onclick: () => cancelJob(job) })));
}

async function cancelJob(job) {
  try {
    await api(`/jobs/${encodeURIComponent(job.job_id)}`, { method: "DELETE" });
    await loadJobs();
  } catch (e) {
    showError("jobs-error", e);
  }
}

async function removeJob(job) {
  const ok = await confirmDialog(`Remove the job “${job.name}”?`, "Its record, uploaded data set and pictures are deleted. A model it trained stays.", "Remove");
  if (!ok) return;
  try {
    await api(`/jobs/${encodeURIComponent(job.job_id)}?purge=true`, { method: "DELETE" });
    if (watched?.id === job.job_id) {
      watched.source?.close();
      watched = null;
      $("job").hidden = true;
      $("job-empty").hidden = false;
      history.replaceState(null, "", location.pathname);
    }
    await loadJobs();
  } catch (e) {
    showError("jobs-error", e);
  }
}

// ---------------------------------------------------------------------------------------------
// Confirmation

/** A modal question; resolves true when confirmed. */
function confirmDialog(title, text, action) {
  const dialog = $("confirm-dialog");
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  $("confirm-ok").textContent = action;
  const opener = document.activeElement;
  dialog.returnValue = "";
  dialog.showModal();
  $("confirm-keep").focus();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      if (opener && opener.isConnected) opener.focus();
      resolve(dialog.returnValue === "ok");
    }, { once: true });
  });
}

// ---------------------------------------------------------------------------------------------
// Start

function refreshAll() {
  return Promise.all([loadModels(), loadJobs()]);
}

window.addEventListener("hashchange", () => {
  const linked = location.hash.match(/^#job=(\w+)$/);
  if (linked && watched?.id !== linked[1]) watch(linked[1]);
});

async function start() {
  if (apiKey) $("key-button").hidden = false;
  try {
    await refreshAll();
    // A link to a job (#job=<id>) opens it.
    const linked = location.hash.match(/^#job=(\w+)$/);
    if (linked) watch(linked[1]);
  } catch (e) {
    setStatus(`The server does not answer yet (${e.message}); trying again…`);
    setTimeout(start, 2000);
  }
}
start();
