// Drives cnnserve's demo page in the system's headless Chromium (puppeteer-core) and reports what
// it saw as one JSON object on stdout; tests/page.rs starts the servers, runs this, and asserts on
// the report against the API's own answers.
//
//   node tests/browser/page.mjs <url> <screenshots dir> --image <photo> --not-image <file>
//        --dataset <zip> --key-url <url of a server with --api-key> --key <its key>
//
// A step that cannot complete (a timeout, a missing element) ends the run with exit status 1, a
// sentence on stderr saying which step and what the page showed, and a screenshot
// `failed-<step>.png`. Progress goes to stderr. Chromium: $CNNSERVE_CHROMIUM, else `chromium`.

import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";
import { parseArgs } from "node:util";
import puppeteer from "puppeteer-core";

const require = createRequire(import.meta.url);
const AXE = fs.readFileSync(require.resolve("axe-core/axe.min.js"), "utf8");

const { values: opt, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    image: { type: "string" },
    "not-image": { type: "string" },
    dataset: { type: "string" },
    "key-url": { type: "string" },
    key: { type: "string" },
  },
});
const [url, shots] = positionals;
for (const [name, value] of Object.entries({ url, "screenshots dir": shots, "--image": opt.image, "--not-image": opt["not-image"], "--dataset": opt.dataset, "--key-url": opt["key-url"], "--key": opt.key })) {
  if (!value) {
    console.error(`missing ${name}; usage: node page.mjs <url> <screenshots dir> --image F --not-image F --dataset ZIP --key-url URL --key KEY`);
    process.exit(2);
  }
}
fs.mkdirSync(shots, { recursive: true });

const log = (line) => process.stderr.write(`[page ${((Date.now() - t0) / 1000).toFixed(1)} s] ${line}\n`);
const t0 = Date.now();

function chromiumPath() {
  const name = process.env.CNNSERVE_CHROMIUM || "chromium";
  if (name.includes("/")) return name;
  for (const dir of (process.env.PATH || "").split(":")) {
    const candidate = path.join(dir, name);
    try {
      fs.accessSync(candidate, fs.constants.X_OK);
      return candidate;
    } catch {
      // next
    }
  }
  throw new Error(`\`${name}\` not found on PATH: install Debian's chromium (apt-get install chromium) or set CNNSERVE_CHROMIUM`);
}

const report = { url, steps: [], pages: {} };
let current = null; // the page a failing step screenshots

/** Runs one named step; a failure names it, keeps a screenshot, and ends the run. */
async function step(name, fn) {
  const started = Date.now();
  log(name);
  try {
    const result = await fn();
    report.steps.push({ name, seconds: +((Date.now() - started) / 1000).toFixed(2) });
    return result;
  } catch (e) {
    const shot = path.join(shots, `failed-${name.replace(/\W+/g, "-")}.png`);
    await current?.screenshot({ path: shot, fullPage: true }).catch(() => {});
    const seen = await current?.evaluate(() => document.querySelector("main")?.innerText.slice(0, 3000)).catch(() => "");
    console.error(`page test failed at step "${name}": ${e.message}\nscreenshot: ${shot}\nthe page showed:\n${seen}`);
    process.exit(1);
  }
}

/** Waits until `fn` (run in the page) is truthy; the error says what was awaited. */
async function until(page, what, fn, timeoutMs, ...args) {
  try {
    const handle = await page.waitForFunction(fn, { timeout: timeoutMs, polling: 100 }, ...args);
    return await handle.jsonValue();
  } catch (e) {
    throw new Error(`waited ${timeoutMs / 1000} s for ${what}: ${e.message.split("\n")[0]}`);
  }
}

/** Everything a page does that a test should know: errors, and every URL it asked for. */
function watchPage(page, name) {
  const seen = { errors: [], console_errors: [], requests: [] };
  report.pages[name] = seen;
  page.on("pageerror", (e) => seen.errors.push(e.message));
  page.on("console", (m) => m.type() === "error" && seen.console_errors.push(m.text()));
  page.on("request", (r) => seen.requests.push(r.url()));
  return seen;
}

const readBars = (page, box) =>
  page.$$eval(`${box} .bar-row`, (rows) => rows.map((row) => ({
    label: [...row.querySelectorAll(".bar-label tspan")].map((t) => t.textContent).join(" "),
    value: row.querySelector(".bar-value").textContent,
  })));

/** The prediction chart once it shows `model`'s answer for the picture named `file`. */
async function prediction(page, model, file) {
  await until(page, `the chart of ${model}'s answer for ${file}`, (m, f) => {
    const chart = document.getElementById("prediction-chart");
    return chart.dataset.model === m && chart.getAttribute("aria-busy") === "false" &&
      chart.querySelector(".bar-row") && document.getElementById("preview-name").textContent === f;
  }, 60000, model, file);
  return {
    model: await page.$eval("#prediction-chart", (c) => c.dataset.model),
    top_k: await page.$eval("#top-k", (i) => i.value),
    title: await page.$eval("#prediction-title", (e) => e.textContent),
    time: await page.$eval("#predict-time", (e) => e.textContent),
    bars: await readBars(page, "#prediction-chart"),
  };
}

async function axe(page) {
  if (!(await page.evaluate(() => typeof window.axe === "object"))) await page.addScriptTag({ content: AXE });
  return page.evaluate(async () => {
    const result = await window.axe.run(document, { resultTypes: ["violations"] });
    return result.violations.map((v) => ({
      id: v.id,
      impact: v.impact,
      help: v.help,
      nodes: v.nodes.slice(0, 5).map((n) => n.target.join(" ")),
    }));
  });
}

/** Fills the fine-tuning form as a person would, and starts the job. */
async function startJob(page, { name, epochs, batch, augment }) {
  const input = await page.$("#dataset");
  await input.uploadFile(opt.dataset);
  await page.select("#base-model", "googlenet");
  for (const [id, value] of [["#name", name], ["#epochs", String(epochs)], ["#batch-size", String(batch)]]) {
    await page.click(id, { clickCount: 3 });
    await page.keyboard.press("Backspace");
    await page.type(id, value);
  }
  if ((await page.$eval("#augment", (c) => c.checked)) !== augment) await page.click("#augment");
  await page.click("#start");
  await until(page, `the job “${name}” to open`, (n) => document.getElementById("job-name").textContent === n && !document.getElementById("job").hidden, 60000, name);
}

/** The finished job as the page shows it. */
function readJob(page) {
  return page.evaluate(() => {
    const text = (sel) => document.querySelector(sel)?.textContent ?? null;
    const points = (chart, series) => Number(document.querySelector(`${chart} .series.${series}`)?.dataset.points ?? -1);
    const table = document.getElementById("confusion");
    return {
      id: location.hash.replace("#job=", ""),
      status: text("#job-status"),
      eta: text("#job-eta"),
      error: document.getElementById("job-error").hidden ? null : text("#job-error"),
      cancel_visible: !document.getElementById("cancel").hidden,
      test_accuracy: text("#test-accuracy"),
      curves: {
        loss: { train: points("#loss-chart", "train"), valid: points("#loss-chart", "valid") },
        acc: { train: points("#acc-chart", "train"), valid: points("#acc-chart", "valid") },
        acc_ticks: [...document.querySelectorAll("#acc-chart .grid text")].map((t) => t.textContent),
      },
      confusion: table && {
        columns: [...table.querySelectorAll("thead th:not(.corner)")].map((th) => th.textContent),
        rows: [...table.tBodies[0].rows].map((tr) => ({
          label: tr.querySelector("th").textContent,
          cells: [...tr.querySelectorAll("td")].map((td) => td.textContent),
        })),
      },
      gallery: [...document.querySelectorAll(".gallery img")].map((img) => ({
        src: img.getAttribute("src"),
        loaded: img.complete && img.naturalWidth > 0,
        caption: img.nextElementSibling?.textContent,
      })),
      history_rows: document.querySelectorAll("#history tbody tr").length,
      per_class: {
        bars: [...document.querySelectorAll("#per-class-chart .bar-row")].map((row) => ({
          label: [...row.querySelectorAll(".bar-label tspan")].map((t) => t.textContent).join(" "),
          value: row.querySelector(".bar-value").textContent,
        })),
      },
    };
  });
}

/** In the page: each card's widths, the page's, and the smallest text on it. */
function cardWidths() {
  return {
    viewport: window.innerWidth,
    document_scroll_width: document.documentElement.scrollWidth,
    cards: [...document.querySelectorAll(".card")].map((c) => ({ id: c.id, scroll_width: c.scrollWidth, client_width: c.clientWidth })),
    smallest_font_px: Math.min(...[...document.querySelectorAll("body *")]
      .filter((e) => [...e.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim()) && e.getClientRects().length)
      .map((e) => parseFloat(getComputedStyle(e).fontSize))),
  };
}

/** Records the chart's epoch count, the phase and the status at every change of the job view. */
async function recordJobView(page) {
  await page.evaluate(() => {
    const seen = { epochs: [], phases: [], statuses: [], etas: [] };
    window.__seen = seen;
    const push = (list, v) => v != null && list[list.length - 1] !== v && list.push(v);
    const look = () => {
      push(seen.epochs, document.querySelector("#loss-chart svg")?.getAttribute("data-epochs"));
      push(seen.phases, document.querySelector("#phases li[aria-current]")?.dataset.phase);
      push(seen.statuses, document.getElementById("job-status").textContent);
      push(seen.etas, document.getElementById("job-eta").textContent);
    };
    new MutationObserver(look).observe(document.getElementById("job"), { subtree: true, childList: true, attributes: true, characterData: true });
  });
}

/** In the page: the status of the job named `n` once it has finished, else false. */
const finished = (n) => {
  const status = document.getElementById("job-status").textContent;
  return document.getElementById("job-name").textContent === n && ["succeeded", "failed", "cancelled"].includes(status) && status;
};

const browser = await puppeteer.launch({
  executablePath: chromiumPath(),
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic"],
});
try {
  const page = await browser.newPage();
  current = page;
  watchPage(page, "main");
  await page.setViewport({ width: 1280, height: 900 });

  await step("open the page", async () => {
    await page.goto(url);
    await until(page, "googlenet in the model list", () => [...document.querySelectorAll("#model option")].some((o) => o.value === "googlenet"), 30000);
    report.status = await page.$eval("#status", (e) => e.textContent);
  });

  await step("predict: a file that is not a picture", async () => {
    await (await page.$("#image")).uploadFile(opt["not-image"]);
    await until(page, "an error under the drop zone", () => !document.getElementById("predict-error").hidden, 30000);
    report.not_image_error = await page.$eval("#predict-error", (e) => e.innerText);
  });

  await step("predict: a photo", async () => {
    await (await page.$("#image")).uploadFile(opt.image);
    report.predict = await prediction(page, "googlenet", path.basename(opt.image));
    report.predict.error_hidden = await page.$eval("#predict-error", (e) => e.hidden);
    await page.screenshot({ path: path.join(shots, "1280-predict.png") });
  });

  await step("predict: a pasted picture", async () => {
    const bytes = fs.readFileSync(opt.image).toString("base64");
    await page.evaluate((b64) => {
      const data = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      const transfer = new DataTransfer();
      transfer.items.add(new File([data], "clipboard.jpg", { type: "image/jpeg" }));
      document.body.dispatchEvent(new ClipboardEvent("paste", { clipboardData: transfer, bubbles: true }));
    }, bytes);
    report.pasted = await prediction(page, "googlenet", "clipboard.jpg");
  });

  let petsId;
  await step("fine-tune: from upload to the confusion matrix", async () => {
    await recordJobView(page);
    await startJob(page, { name: "pets", epochs: 3, batch: 8, augment: true });
    const status = await until(page, "the job “pets” to finish", finished, 240000, "pets");
    report.job = await readJob(page);
    report.job.seen = await page.evaluate(() => window.__seen);
    report.job.finished_as = status;
    petsId = report.job.id;
    await until(page, "the example pictures to load", () => [...document.querySelectorAll(".gallery img")].every((i) => i.complete), 30000);
    report.job.gallery = (await readJob(page)).gallery;
    await page.screenshot({ path: path.join(shots, "1280-job.png"), fullPage: true });
  });

  await step("try this model", async () => {
    await page.click("#try-model");
    await until(page, "the model list to select pets", () => document.getElementById("model").value === "pets", 30000);
    report.try = {
      selected: await page.$eval("#model", (s) => s.value),
      focused: await page.evaluate(() => document.activeElement?.id),
      hint: await page.$eval("#model-hint", (e) => e.textContent),
      // The photo already chosen is classified again by the new model.
      prediction: await prediction(page, "pets", "clipboard.jpg"),
    };
    await page.screenshot({ path: path.join(shots, "1280-try-this-model.png") });
  });

  await step("models and jobs lists", async () => {
    report.models = await page.$$eval("#models li", (items) => items.map((li) => ({
      name: li.dataset.model,
      badges: [...li.querySelectorAll(".badge")].map((b) => b.textContent),
      text: li.querySelector(".item-sub").textContent,
      download: li.querySelector("a[download]")?.getAttribute("href") ?? null,
      delete: Boolean([...li.querySelectorAll("button")].find((b) => b.textContent === "Delete")),
    })));
    const href = report.models.find((m) => m.name === "pets")?.download;
    report.download = href && await page.evaluate(async (h) => {
      const r = await fetch(h);
      return { status: r.status, bytes: (await r.arrayBuffer()).byteLength, disposition: r.headers.get("content-disposition") };
    }, href);
  });

  await step("cancel a running job", async () => {
    await startJob(page, { name: "long", epochs: 300, batch: 8, augment: true });
    // Running, with its first epoch on the curves.
    await until(page, "the job “long” to finish an epoch", () =>
      document.querySelector("#phases li[aria-current]")?.dataset.phase === "training" &&
      document.getElementById("job-eta").textContent.startsWith("Epoch") &&
      Number(document.querySelector("#loss-chart svg")?.dataset.epochs) >= 1, 180000);
    const running = {
      status: await page.$eval("#job-status", (e) => e.textContent),
      eta: await page.$eval("#job-eta", (e) => e.textContent),
      cancel_visible: await page.$eval("#cancel", (b) => !b.hidden),
      epochs_drawn: await page.$eval("#loss-chart svg", (svg) => Number(svg.dataset.epochs)),
    };
    await page.screenshot({ path: path.join(shots, "1280-running.png") });
    await page.click("#cancel");
    const status = await until(page, "the job “long” to stop", finished, 120000, "long");
    report.cancel = { running, finished_as: status, ...(await readJob(page)) };
    await page.screenshot({ path: path.join(shots, "1280-cancelled.png") });
  });

  await step("jobs list", async () => {
    await until(page, "both jobs finished in the job list", () =>
      [...document.querySelectorAll("#jobs li .badge")].every((b) => ["succeeded", "failed", "cancelled"].includes(b.textContent)), 30000);
    report.jobs = await page.$$eval("#jobs li", (items) => items.map((li) => ({
      id: li.dataset.job,
      name: li.querySelector(".item-name").textContent,
      status: li.querySelector(".badge").textContent,
      text: li.querySelector(".item-sub").textContent,
    })));
  });

  await step("keyboard: every control takes focus visibly", async () => {
    await page.goto("about:blank"); // a fresh load, not a jump within the page
    await page.goto(`${url}#job=${petsId}`);
    await until(page, "the finished job", () => document.getElementById("confusion"), 30000);
    await page.evaluate(() => document.activeElement?.blur());
    const stops = [];
    for (let i = 0; i < 80; i++) {
      await page.keyboard.press("Tab");
      const stop = await page.evaluate(() => {
        const el = document.activeElement;
        if (!el || el === document.body) return null;
        if (el.dataset.tabbed) return "again";
        el.dataset.tabbed = "1";
        // The hidden file input shows its focus on the drop zone around it.
        const shown = el.classList.contains("file-hidden") ? el.closest(".drop") : el;
        const style = getComputedStyle(shown);
        const visible = (style.outlineStyle !== "none" && parseFloat(style.outlineWidth) >= 2) || style.boxShadow !== "none";
        const name = el.id || el.getAttribute("aria-label") || el.textContent.trim().slice(0, 40) || el.tagName;
        return { name, tag: el.tagName.toLowerCase(), visible };
      });
      if (stop === "again") break; // around the page once
      if (stop) stops.push(stop);
    }
    report.focus = stops;
  });

  await step("1280 px: cards and axe", async () => {
    // The epochs' table and the other folded parts open: still nothing wider than its card.
    await page.evaluate(() => document.querySelectorAll("details").forEach((d) => (d.open = true)));
    report.wide = await page.evaluate(cardWidths);
    report.axe_1280 = await axe(page);
  });

  await step("390 px: nothing wider than its card", async () => {
    await page.setViewport({ width: 390, height: 844, deviceScaleFactor: 2 });
    await page.goto("about:blank");
    await page.goto(`${url}#job=${petsId}`);
    await until(page, "the finished job", () => document.getElementById("confusion") && document.querySelector("#per-class-chart .bar-row"), 30000);
    await (await page.$("#image")).uploadFile(opt.image);
    await prediction(page, "googlenet", path.basename(opt.image));
    await page.evaluate(() => document.querySelectorAll("details").forEach((d) => (d.open = true)));
    await new Promise((r) => setTimeout(r, 300)); // charts redraw at their new width
    report.narrow = await page.evaluate(cardWidths);
    await page.screenshot({ path: path.join(shots, "390-page.png"), fullPage: true });
    await page.evaluate(() => window.scrollTo(0, 0));
    await page.screenshot({ path: path.join(shots, "390-top.png") });
    report.axe_390 = await axe(page);
  });

  // A server with --api-key, in a fresh browser context (its own sessionStorage).
  const context = await browser.createBrowserContext();
  const keyed = await context.newPage();
  current = keyed;
  watchPage(keyed, "key");
  await keyed.setViewport({ width: 1280, height: 900 });
  const key = opt.key;
  report.key = {};

  await step("API key: the page asks for it", async () => {
    await keyed.goto(opt["key-url"]);
    await until(keyed, "the API key dialog", () => document.getElementById("key-dialog").open, 30000);
    report.key.asked = true;
    report.key.status = await keyed.$eval("#status", (e) => e.textContent);
    await keyed.screenshot({ path: path.join(shots, "1280-api-key.png") });
    report.key.axe = await axe(keyed);
  });

  await step("API key: a wrong key is refused", async () => {
    await keyed.type("#key-input", `${key}-wrong`);
    await keyed.keyboard.press("Enter");
    await until(keyed, "the dialog to refuse the key", () => !document.getElementById("key-error").hidden, 30000);
    report.key.wrong = {
      error: await keyed.$eval("#key-error", (e) => e.textContent),
      still_open: await keyed.$eval("#key-dialog", (d) => d.open),
    };
  });

  await step("API key: the right key opens the page", async () => {
    await keyed.click("#key-input", { clickCount: 3 });
    await keyed.keyboard.press("Backspace");
    await keyed.type("#key-input", key);
    await keyed.click("#key-submit");
    await until(keyed, "the models, with the key", () =>
      !document.getElementById("key-dialog").open && [...document.querySelectorAll("#model option")].some((o) => o.value === "googlenet"), 30000);
    report.key.stored = await keyed.evaluate(() => sessionStorage.getItem("cnnserve.api_key"));
    await keyed.reload();
    await until(keyed, "the models after a reload", () => [...document.querySelectorAll("#model option")].some((o) => o.value === "googlenet"), 30000);
    report.key.asked_after_reload = await keyed.$eval("#key-dialog", (d) => d.open);
  });

  await step("API key: predict, a job with its live events and pictures, a download", async () => {
    await (await keyed.$("#image")).uploadFile(opt.image);
    report.key.predict = await prediction(keyed, "googlenet", path.basename(opt.image));
    await recordJobView(keyed);
    await startJob(keyed, { name: "keyed", epochs: 2, batch: 8, augment: false });
    report.key.job_finished_as = await until(keyed, "the job “keyed” to finish", finished, 240000, "keyed");
    report.key.seen = await keyed.evaluate(() => window.__seen);
    await until(keyed, "the example pictures to load", () => [...document.querySelectorAll(".gallery img")].every((i) => i.complete), 30000);
    report.key.job = await readJob(keyed);
    const href = await keyed.$eval('#models li[data-model="keyed"] a[download]', (a) => a.getAttribute("href"));
    report.key.download = await keyed.evaluate(async (h) => {
      const r = await fetch(h); // no header: the key is in the link
      return { href: h, status: r.status, bytes: (await r.arrayBuffer()).byteLength };
    }, href);
  });

  await step("delete a model, with a confirmation", async () => {
    const deleteButton = '#models li[data-model="keyed"] button.danger';
    await keyed.click(deleteButton);
    await until(keyed, "the confirmation", () => document.getElementById("confirm-dialog").open, 10000);
    report.key.confirm_title = await keyed.$eval("#confirm-title", (e) => e.textContent);
    await keyed.screenshot({ path: path.join(shots, "1280-confirm-delete.png") });
    await keyed.click("#confirm-keep");
    await until(keyed, "the confirmation to close", () => !document.getElementById("confirm-dialog").open, 10000);
    await new Promise((r) => setTimeout(r, 500));
    report.key.kept = await keyed.$$eval("#models li", (items) => items.map((li) => li.dataset.model));
    await keyed.click(deleteButton);
    await until(keyed, "the confirmation", () => document.getElementById("confirm-dialog").open, 10000);
    await keyed.click("#confirm-ok");
    await until(keyed, "keyed to leave the model list", () => !document.querySelector('#models li[data-model="keyed"]'), 30000);
    report.key.after_delete = await keyed.$$eval("#models li", (items) => items.map((li) => li.dataset.model));
    await keyed.screenshot({ path: path.join(shots, "1280-api-key-page.png"), fullPage: true });
  });
} finally {
  await browser.close().catch(() => {});
}
report.seconds = +((Date.now() - t0) / 1000).toFixed(1);
process.stdout.write(`${JSON.stringify(report)}\n`);
