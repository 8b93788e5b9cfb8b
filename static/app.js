// The demo page: plain JavaScript over cnnserve's own HTTP API, nothing else.
"use strict";

const $ = (id) => document.getElementById(id);

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const problems = body.details && body.details.problems;
    const detail = Array.isArray(problems) && problems.length
      ? "\n" + problems.map((p) => (typeof p === "string" ? p : (p.file ? p.file + ": " : "") + p.message)).join("\n")
      : "";
    throw new Error((body.error || response.statusText) + detail);
  }
  return body;
}

function showError(id, error) {
  const el = $(id);
  el.textContent = error ? String(error.message || error) : "";
  el.hidden = !error;
}

async function loadModels() {
  const { default_model, models: all } = await api("/models");
  // Models still loading or failed have no classes yet: list the ones that answer.
  const models = all.filter((m) => m.state === "ready");
  const loading = all.filter((m) => m.state === "loading").length;
  const options = models.map((m) => {
    const o = document.createElement("option");
    o.value = m.name;
    o.textContent = `${m.name} (${m.kind === "fine_tuned" ? m.num_classes + " classes" : m.architecture})`;
    o.selected = m.name === default_model;
    return o;
  });
  $("model").replaceChildren(...options);
  const bases = models.filter((m) => m.kind === "pretrained").map((m) => {
    const o = document.createElement("option");
    o.value = o.textContent = m.name;
    return o;
  });
  $("base-model").replaceChildren(...bases);
  $("status").textContent =
    (models.length ? `${models.length} model(s) ready` : "no model ready") +
    (loading ? `, ${loading} loading…` : "");
  if (loading) setTimeout(() => loadModels().catch(() => {}), 2000);
}

async function classify(file) {
  showError("predict-error", null);
  $("preview").src = URL.createObjectURL(file);
  $("preview").hidden = false;
  const params = new URLSearchParams({ model: $("model").value, top_k: $("top-k").value });
  try {
    const body = await api(`/predict?${params}`, {
      method: "POST",
      headers: { "content-type": file.type || "application/octet-stream" },
      body: file,
    });
    $("predictions").replaceChildren(...body.predictions.map((p) => {
      const li = document.createElement("li");
      const pct = (p.probability * 100).toFixed(1);
      li.innerHTML = `<span class="label"></span><span class="bar"><span style="width:${pct}%"></span></span><span class="pct">${pct}%</span>`;
      li.querySelector(".label").textContent = p.label;
      return li;
    }));
  } catch (e) {
    $("predictions").replaceChildren();
    showError("predict-error", e);
  }
}

$("image").addEventListener("change", (e) => e.target.files[0] && classify(e.target.files[0]));
$("model").addEventListener("change", () => $("image").files[0] && classify($("image").files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files[0]) classify(e.dataTransfer.files[0]);
});

$("finetune-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  showError("finetune-error", null);
  const form = new FormData(e.target);
  form.set("augment", e.target.augment.checked ? "true" : "false");
  if (!form.get("name")) form.delete("name");
  try {
    const { job_id } = await api("/finetune", { method: "POST", body: form });
    watch(job_id);
    loadJobs();
  } catch (err) {
    showError("finetune-error", err);
  }
});

function fmt(x) {
  return typeof x === "number" ? x.toFixed(4) : "";
}

function addHistoryRow(m) {
  const tr = document.createElement("tr");
  for (const v of [m.epoch, fmt(m.train_loss), fmt(m.train_acc), fmt(m.valid_loss), fmt(m.valid_acc)]) {
    const td = document.createElement("td");
    td.textContent = v;
    tr.append(td);
  }
  $("history").tBodies[0].append(tr);
}

function showJob(job) {
  $("job").hidden = false;
  $("job-id").textContent = job.job_id;
  $("job-status").textContent = job.status;
  $("job-status").className = `badge ${job.status}`;
  $("history").tBodies[0].replaceChildren();
  job.history.forEach(addHistoryRow);
  showProgress(job.progress, job.status === "succeeded");
  const result = $("job-result");
  result.replaceChildren();
  if (job.error) {
    const p = document.createElement("p");
    p.className = "error";
    p.textContent = job.error;
    result.append(p);
  }
  if (job.result) {
    const r = job.result;
    const summary = document.createElement("p");
    summary.textContent = `Model “${r.model}” is live. Best epoch ${r.best_epoch}; ${r.split} accuracy ${(r.test_acc * 100).toFixed(1)}% (loss ${fmt(r.test_loss)}).`;
    result.append(summary);
    const gallery = document.createElement("div");
    gallery.className = "gallery";
    r.examples.forEach((ex, n) => {
      const fig = document.createElement("figure");
      fig.className = ex.correct ? "correct" : "wrong";
      const img = document.createElement("img");
      img.src = `/jobs/${job.job_id}/examples/${n}`;
      img.alt = ex.file;
      const cap = document.createElement("figcaption");
      cap.textContent = `${ex.predicted_label} ${(ex.probability * 100).toFixed(0)}%` + (ex.correct ? "" : ` (is ${ex.true_label})`);
      fig.append(img, cap);
      gallery.append(fig);
    });
    result.append(gallery);
    loadModels();
  }
}

function showProgress(p, complete) {
  if (!p) {
    $("job-progress").value = complete ? 1 : 0;
    $("job-eta").textContent = "";
    return;
  }
  const fraction = p.total ? p.done / p.total : 0;
  switch (p.phase) {
    case "reading":
      $("job-progress").value = 0;
      $("job-eta").textContent = "reading the data set…";
      break;
    case "caching":
      $("job-progress").value = fraction;
      $("job-eta").textContent = `running the frozen network: ${p.done}/${p.total} images`;
      break;
    case "training":
      $("job-progress").value = fraction;
      $("job-eta").textContent = `epoch ${p.epoch}/${p.epochs}, step ${p.step}/${p.steps}, ${p.images_per_s.toFixed(1)} images/s, about ${Math.round(p.eta_s)} s left`;
      break;
    case "evaluating":
    case "saving":
      $("job-progress").value = 1;
      $("job-eta").textContent = p.phase === "saving" ? "saving the model…" : "evaluating the best epoch…";
      break;
    default:
      $("job-progress").value = complete || p.phase === "done" ? 1 : fraction;
      $("job-eta").textContent = p.epoch
        ? `${p.epochs} epoch(s), ${p.images_per_s.toFixed(1)} images/s on average`
        : "";
  }
}

let source = null;
async function watch(id) {
  if (source) source.close();
  showJob(await api(`/jobs/${id}`));
  source = new EventSource(`/jobs/${id}/events`);
  source.addEventListener("progress", (e) => showProgress(JSON.parse(e.data)));
  source.addEventListener("epoch", (e) => addHistoryRow(JSON.parse(e.data)));
  source.addEventListener("done", (e) => {
    source.close();
    showJob(JSON.parse(e.data));
    loadJobs();
  });
}

async function loadJobs() {
  const { jobs } = await api("/jobs");
  $("jobs").replaceChildren(...jobs.map((job) => {
    const li = document.createElement("li");
    const a = document.createElement("a");
    a.href = `#job=${job.job_id}`;
    a.textContent = `${job.name} (${job.base_model})`;
    a.addEventListener("click", () => watch(job.job_id));
    const badge = document.createElement("span");
    badge.className = `badge ${job.status}`;
    badge.textContent = job.status;
    li.append(a, " ", badge);
    return li;
  }));
}

async function start() {
  try {
    await loadModels();
    await loadJobs();
    // A link to a job (#job=<id>) opens it.
    const linked = location.hash.match(/^#job=(\w+)$/);
    if (linked) await watch(linked[1]);
  } catch (e) {
    $("status").textContent = `server unavailable: ${e.message}`;
    setTimeout(start, 2000);
  }
}
start();
