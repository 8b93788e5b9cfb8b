//! The demo page in a real browser. `tests/browser/page.mjs` (puppeteer-core driving the system's
//! headless Chromium) uses the page as a person would, against `cnnserve serve` processes started
//! here, and reports what the page showed; this test holds the report against the API's own
//! answers. Screenshots go to `$CARGO_TARGET_DIR/screenshots/`.
//!
//! Needs Node.js (18 or newer), the driver's npm packages (`npm ci --prefix tests/browser`:
//! puppeteer-core and axe-core, pinned by its package-lock.json) and Debian's `chromium` (or the
//! binary named by `CNNSERVE_CHROMIUM`). Without any of them the test fails and says what to do.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn chromium() -> String {
    let binary = std::env::var("CNNSERVE_CHROMIUM").unwrap_or_else(|_| "chromium".into());
    let found = Command::new(&binary)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "`{binary}` not found: install Debian's chromium (apt-get install chromium) or set \
         CNNSERVE_CHROMIUM to a Chromium binary"
    );
    binary
}

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// Node and the driver's packages, or a failure that says how to get them.
fn node() -> &'static str {
    let version = Command::new("node").arg("--version").output();
    assert!(
        version.as_ref().is_ok_and(|o| o.status.success()),
        "`node` not found: the page test drives Chromium from Node.js; install Node.js 18 or newer \
         (Debian: apt-get install nodejs npm), then run `npm ci --prefix tests/browser`"
    );
    let modules = browser_dir().join("node_modules");
    for package in ["puppeteer-core/package.json", "axe-core/axe.min.js"] {
        assert!(
            modules.join(package).is_file(),
            "the page test's npm packages are not installed ({} is missing): run \
             `npm ci --prefix tests/browser` (puppeteer-core and axe-core, pinned by \
             tests/browser/package-lock.json; nothing else is downloaded, the browser is the \
             system's chromium)",
            modules.join(package).display()
        );
    }
    "node"
}

/// `$CARGO_TARGET_DIR/screenshots`, else `screenshots` in this build's target dir.
fn screenshots_dir() -> PathBuf {
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .expect("the target dir")
            .to_path_buf(),
    };
    target.join("screenshots")
}

/// `cnnserve serve` on a weights dir of its own holding the fixture GoogLeNet; killed on drop.
struct Server {
    running: common::binary::Running,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(extra: &[&str]) -> Self {
        let dir = common::googlenet_dir();
        let mut command = common::binary::serve_googlenet(dir.path());
        command.args(extra);
        Self {
            running: common::binary::Running::start(command),
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        self.running.url(path)
    }
}

/// A small zip of the cat/dog set: every 20th training photo and every 3rd test photo of each
/// class, as `catanddog/{train,test}/{Cat,Dog}/…`.
fn small_catanddog_zip() -> Vec<u8> {
    let root = common::data_dir().join("catanddog");
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default();
    for (split, step) in [("train", 20), ("test", 3)] {
        for class in ["Cat", "Dog"] {
            let mut files: Vec<PathBuf> = std::fs::read_dir(root.join(split).join(class))
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            files.sort();
            for file in files.iter().step_by(step) {
                let name = file.file_name().unwrap().to_string_lossy();
                zip.start_file(format!("catanddog/{split}/{class}/{name}"), options)
                    .unwrap();
                zip.write_all(&std::fs::read(file).unwrap()).unwrap();
            }
        }
    }
    zip.finish().unwrap().into_inner()
}

/// A percentage as the page writes it: JavaScript's `(x * 100).toFixed(1)`, which rounds an exact
/// tie up where Rust's formatting rounds it to even.
fn percent(x: f64) -> String {
    let v = x * 100.0;
    if (v * 10.0).fract() == 0.5 {
        format!("{:.1}%", (v * 10.0).ceil() / 10.0)
    } else {
        format!("{v:.1}%")
    }
}

fn get_json(url: &str, key: Option<&str>) -> Value {
    let mut request = ureq::get(url);
    if let Some(key) = key {
        request = request.header("authorization", &format!("Bearer {key}"));
    }
    let text = request
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .body_mut()
        .read_to_string()
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// `(label, "12.3%")` of `/predict`'s answer, as the chart should show it.
fn api_predictions(
    server: &Server,
    model: &str,
    image: &[u8],
    key: Option<&str>,
) -> Vec<(String, String)> {
    let url = server.url(&format!("/predict?model={model}&top_k=5"));
    let mut request = ureq::post(&url).header("content-type", "image/jpeg");
    if let Some(key) = key {
        request = request.header("authorization", &format!("Bearer {key}"));
    }
    let text = request
        .send(image)
        .unwrap_or_else(|e| panic!("POST {url}: {e}"))
        .body_mut()
        .read_to_string()
        .unwrap();
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["model"], model);
    body["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["label"].as_str().unwrap().to_string(),
                percent(p["probability"].as_f64().unwrap()),
            )
        })
        .collect()
}

/// The `(label, value)` rows of a bar chart in the report.
fn bars(chart: &Value) -> Vec<(String, String)> {
    chart["bars"]
        .as_array()
        .unwrap_or_else(|| panic!("no bars in {chart}"))
        .iter()
        .map(|b| {
            (
                b["label"].as_str().unwrap().to_string(),
                b["value"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap_or_default().to_string())
        .collect()
}

/// Runs the driver; its report, or a failure with its own account of what went wrong.
fn drive(args: &[String]) -> Value {
    let script = browser_dir().join("page.mjs");
    let started = Instant::now();
    let mut child = Command::new(node())
        .arg(&script)
        .args(args)
        .env("CNNSERVE_CHROMIUM", chromium())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut stdout, mut stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut s).unwrap();
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut s).unwrap();
        s
    });
    let deadline = started + Duration::from_secs(540);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the page test ran over 9 minutes; it said:\n{}",
                err.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    eprintln!("{err}");
    assert!(
        status.success(),
        "the page test failed ({status}):\n{err}\n{out}"
    );
    let report: Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("the page test's report is not JSON ({e}):\n{out}"));
    eprintln!(
        "page test: {} s in the browser, {:.1} s in all",
        report["seconds"],
        started.elapsed().as_secs_f64()
    );
    report
}

#[test]
fn the_demo_page_predicts_trains_cancels_and_asks_for_the_key() {
    let started = Instant::now();
    node();
    let work = tempfile::tempdir().unwrap();
    let dataset = work.path().join("catanddog-small.zip");
    std::fs::write(&dataset, small_catanddog_zip()).unwrap();
    let not_image = work.path().join("notes.txt");
    std::fs::write(&not_image, "a shopping list, not a photo\n").unwrap();
    let image_path = common::data_dir().join("catanddog/test/Cat/8106.jpg");
    let image = std::fs::read(&image_path).unwrap();
    let key = "page-test-key-7f3a";

    let open = Server::start(&[]);
    let keyed = Server::start(&["--api-key", key]);
    let shots = screenshots_dir();
    let report = drive(&[
        open.url("/"),
        shots.display().to_string(),
        "--image".into(),
        image_path.display().to_string(),
        "--not-image".into(),
        not_image.display().to_string(),
        "--dataset".into(),
        dataset.display().to_string(),
        "--key-url".into(),
        keyed.url("/"),
        "--key".into(),
        key.into(),
    ]);
    let r = &report;

    // Nothing but the server itself: no CDN, font or script from elsewhere.
    for (name, server) in [("main", &open), ("key", &keyed)] {
        let page = &r["pages"][name];
        let origin = server.url("/");
        let foreign: Vec<String> = strings(&page["requests"])
            .into_iter()
            .filter(|u| {
                !u.starts_with(&origin) && !u.starts_with("blob:") && !u.starts_with("data:")
            })
            .collect();
        assert!(foreign.is_empty(), "requests to other places: {foreign:?}");
        assert_eq!(page["errors"], serde_json::json!([]), "script errors");
    }
    // The only failed loads are the ones the test asks for: the text file (415) and the key.
    let expected_failure = |text: &str, status: &str| {
        text.starts_with("Failed to load resource") && text.contains(status)
    };
    for text in strings(&r["pages"]["main"]["console_errors"]) {
        assert!(expected_failure(&text, "415"), "console error: {text}");
    }
    for text in strings(&r["pages"]["key"]["console_errors"]) {
        assert!(expected_failure(&text, "401"), "console error: {text}");
    }
    assert_eq!(r["status"], "1 model ready");

    // Predict: an error in plain words, then the chart equals the API's answer.
    let error = r["not_image_error"].as_str().unwrap();
    assert!(
        error.starts_with("This file is not a picture the server can read")
            && error.contains("not an image"),
        "{error}"
    );
    let googlenet = api_predictions(&open, "googlenet", &image, None);
    assert_eq!(googlenet.len(), 5);
    assert_eq!(r["predict"]["model"], "googlenet");
    assert_eq!(bars(&r["predict"]), googlenet, "the chart against /predict");
    assert_eq!(r["predict"]["title"], "Top 5 classes by googlenet");
    let time = r["predict"]["time"].as_str().unwrap();
    assert!(
        time.starts_with("Took ") && time.contains(" ms on the server"),
        "{time}"
    );
    assert_eq!(bars(&r["pasted"]), googlenet, "a pasted picture");

    // The job, from upload to the confusion matrix.
    let job_view = &r["job"];
    let id = job_view["id"].as_str().unwrap();
    let job = get_json(&open.url(&format!("/jobs/{id}")), None);
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job_view["status"], "succeeded");
    let result = &job["result"];
    let classes = strings(&job["dataset"]["classes"]);
    assert_eq!(classes, ["Cat", "Dog"]);
    let confusion = &job_view["confusion"];
    assert_eq!(strings(&confusion["columns"]), classes, "column headers");
    for (i, row) in confusion["rows"].as_array().unwrap().iter().enumerate() {
        assert_eq!(row["label"], classes[i].as_str());
        let expected: Vec<String> = result["confusion_matrix"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(strings(&row["cells"]), expected, "confusion matrix row {i}");
    }
    assert_eq!(confusion["rows"].as_array().unwrap().len(), classes.len());
    assert_eq!(
        job_view["test_accuracy"],
        percent(result["test_acc"].as_f64().unwrap())
    );
    let per_class: Vec<(String, String)> = result["per_class"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let accuracy = percent(c["accuracy"].as_f64().unwrap());
            (
                c["class"].as_str().unwrap().to_string(),
                format!("{accuracy} of {}", c["support"]),
            )
        })
        .collect();
    assert_eq!(
        bars(&job_view["per_class"]),
        per_class,
        "per-class accuracy"
    );
    // Curves: train and validation, one point per epoch, drawn as the epochs came.
    let epochs = job["history"].as_array().unwrap().len();
    assert_eq!(epochs, 3);
    for chart in ["loss", "acc"] {
        for series in ["train", "valid"] {
            assert_eq!(
                job_view["curves"][chart][series], epochs,
                "{chart} curve, {series}"
            );
        }
    }
    assert_eq!(job_view["history_rows"], epochs);
    let seen: Vec<usize> = strings(&job_view["seen"]["epochs"])
        .iter()
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(
        seen.windows(2).all(|w| w[0] < w[1])
            && seen.last() == Some(&epochs)
            && seen.iter().any(|&n| n > 0 && n < epochs),
        "the curves grow one epoch at a time while the job runs: {seen:?}"
    );
    let phases = strings(&job_view["seen"]["phases"]);
    let order = [
        "reading",
        "caching",
        "training",
        "evaluating",
        "saving",
        "done",
    ];
    let positions: Vec<usize> = phases
        .iter()
        .map(|p| order.iter().position(|o| o == p).unwrap())
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1])
            && phases.contains(&"training".to_string())
            && phases.last().map(String::as_str) == Some("done"),
        "phases shown live, in order: {phases:?}"
    );
    let etas = strings(&job_view["seen"]["etas"]);
    assert!(
        etas.iter()
            .any(|e| e.starts_with("Epoch ") && e.contains("photos/s")),
        "live progress while training: {etas:?}"
    );
    let finished = job_view["eta"].as_str().unwrap();
    assert!(
        finished.starts_with("Finished in ")
            && !finished.contains("/s")
            && !finished.contains("left"),
        "a finished job shows finished figures: {finished}"
    );
    assert_eq!(job_view["cancel_visible"], false);
    let gallery = job_view["gallery"].as_array().unwrap();
    assert_eq!(gallery.len(), result["examples"].as_array().unwrap().len());
    assert!(!gallery.is_empty());
    for (n, picture) in gallery.iter().enumerate() {
        assert_eq!(
            picture["loaded"], true,
            "example {n} did not load: {picture}"
        );
        assert_eq!(picture["src"], format!("/jobs/{id}/examples/{n}"));
    }

    // Try this model: selected in the predict panel, and its chart is the API's.
    assert_eq!(r["try"]["selected"], "pets");
    assert_eq!(r["try"]["focused"], "model");
    assert_eq!(
        bars(&r["try"]["prediction"]),
        api_predictions(&open, "pets", &image, None),
        "the new model's chart against /predict"
    );

    // Models: states, a download link for the fine-tuned head, which serves its file.
    let models = r["models"].as_array().unwrap();
    let pets = models.iter().find(|m| m["name"] == "pets").unwrap();
    assert_eq!(pets["badges"][0], "ready");
    assert_eq!(pets["download"], "/models/pets/download");
    assert_eq!(pets["delete"], true);
    let googlenet_item = models.iter().find(|m| m["name"] == "googlenet").unwrap();
    assert_eq!(googlenet_item["download"], Value::Null);
    assert_eq!(googlenet_item["delete"], false, "pretrained models stay");
    let head = ureq::get(&open.url("/models/pets/download"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_vec()
        .unwrap();
    assert_eq!(r["download"]["status"], 200);
    assert_eq!(r["download"]["bytes"], head.len());

    // Cancel: a job long enough to be running, stopped from the page.
    let cancel = &r["cancel"];
    assert_eq!(cancel["running"]["status"], "running");
    assert_eq!(cancel["running"]["cancel_visible"], true);
    assert!(
        cancel["running"]["epochs_drawn"].as_u64() >= Some(1),
        "curves drawn while the job runs: {}",
        cancel["running"]
    );
    let long = get_json(
        &open.url(&format!("/jobs/{}", cancel["id"].as_str().unwrap())),
        None,
    );
    assert_eq!(long["name"], "long");
    assert_eq!(long["status"], "cancelled", "{long}");
    let long_epochs = long["history"].as_array().unwrap().len();
    assert!(
        (1..300).contains(&long_epochs),
        "cancelled between its first and last epoch: {long_epochs}"
    );
    assert_eq!(cancel["status"], "cancelled");
    let stopped = cancel["eta"].as_str().unwrap();
    assert!(
        stopped.starts_with(&format!("Cancelled after {long_epochs} epoch"))
            && stopped.contains("of 300")
            && !stopped.contains("/s")
            && !stopped.contains("left"),
        "{stopped}"
    );
    // The job list: each with its state, finished figures only.
    let jobs = r["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2);
    for (name, status) in [("pets", "succeeded"), ("long", "cancelled")] {
        let item = jobs.iter().find(|j| j["name"] == name).unwrap();
        assert_eq!(item["status"], status);
        let text = item["text"].as_str().unwrap();
        assert!(!text.contains("/s") && !text.contains("left"), "{text}");
    }
    let pets_item = jobs.iter().find(|j| j["name"] == "pets").unwrap();
    assert!(
        pets_item["text"].as_str().unwrap().contains(&format!(
            "test accuracy {}",
            percent(result["test_acc"].as_f64().unwrap())
        )),
        "{pets_item}"
    );

    // Keyboard: every control is reached by Tab and shows its focus.
    let focus = r["focus"].as_array().unwrap();
    let reached: Vec<&str> = focus.iter().map(|f| f["name"].as_str().unwrap()).collect();
    for control in [
        "model",
        "top-k",
        "image",
        "dataset",
        "epochs",
        "augment",
        "start",
        "try-model",
    ] {
        assert!(
            reached.contains(&control),
            "Tab never reaches #{control}: {reached:?}"
        );
    }
    let unseen: Vec<&Value> = focus.iter().filter(|f| f["visible"] != true).collect();
    assert!(unseen.is_empty(), "focus not visible on {unseen:?}");

    // At 390 and 1280 px (the epochs' table open): no card scrolls sideways, nothing is wider
    // than the screen, no text under 12 px.
    for (width, layout) in [(390, &r["narrow"]), (1280, &r["wide"])] {
        assert_eq!(layout["viewport"], width);
        assert!(
            layout["document_scroll_width"].as_u64() <= Some(width),
            "the page scrolls sideways at {width} px: {layout}"
        );
        let cards = layout["cards"].as_array().unwrap();
        assert_eq!(cards.len(), 4, "{layout}");
        for card in cards {
            assert!(
                card["scroll_width"].as_u64() <= card["client_width"].as_u64(),
                "card #{} is wider than itself at {width} px: {card}",
                card["id"]
            );
        }
        assert!(
            layout["smallest_font_px"].as_f64().unwrap() >= 12.0,
            "{layout}"
        );
    }

    // axe-core: no serious or critical violation, wide, narrow, and with the key dialog open.
    for (run, violations) in [
        ("1280 px", &r["axe_1280"]),
        ("390 px", &r["axe_390"]),
        ("the API key dialog", &r["key"]["axe"]),
    ] {
        let serious: Vec<&Value> = violations
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["impact"] == "serious" || v["impact"] == "critical")
            .collect();
        assert!(serious.is_empty(), "axe-core at {run}: {serious:#?}");
    }

    // The API key: asked once, a wrong one refused, the right one kept for the tab.
    let k = &r["key"];
    assert_eq!(k["asked"], true);
    assert!(
        k["wrong"]["error"].as_str().unwrap().contains("refused")
            && k["wrong"]["still_open"] == true,
        "{}",
        k["wrong"]
    );
    assert_eq!(k["stored"], key, "kept in sessionStorage");
    assert_eq!(k["asked_after_reload"], false, "asked once per tab");
    assert_eq!(
        bars(&k["predict"]),
        api_predictions(&keyed, "googlenet", &image, Some(key)),
        "a prediction with the key"
    );
    assert_eq!(k["job_finished_as"], "succeeded");
    let keyed_id = k["job"]["id"].as_str().unwrap();
    let events = format!("/jobs/{keyed_id}/events?api_key={key}");
    assert!(
        strings(&r["pages"]["key"]["requests"])
            .iter()
            .any(|u| u.ends_with(&events)),
        "the live events carry the key"
    );
    let keyed_epochs: Vec<String> = strings(&k["seen"]["epochs"]);
    assert_eq!(
        keyed_epochs.last().map(String::as_str),
        Some("2"),
        "{keyed_epochs:?}"
    );
    for picture in k["job"]["gallery"].as_array().unwrap() {
        assert_eq!(picture["loaded"], true, "{picture}");
        assert!(picture["src"]
            .as_str()
            .unwrap()
            .ends_with(&format!("?api_key={key}")));
    }
    assert_eq!(k["download"]["status"], 200, "{}", k["download"]);
    assert!(k["download"]["bytes"].as_u64().unwrap() > 0);
    // Delete with a confirmation: "Keep it" keeps it, "Delete" deletes it.
    assert_eq!(k["confirm_title"], "Delete the model “keyed”?");
    assert!(strings(&k["kept"]).contains(&"keyed".to_string()));
    assert!(!strings(&k["after_delete"]).contains(&"keyed".to_string()));
    let listed = get_json(&keyed.url("/models"), Some(key));
    assert!(
        listed["models"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["name"] != "keyed"),
        "{listed}"
    );
    assert!(
        matches!(
            ureq::get(&keyed.url("/models")).call(),
            Err(ureq::Error::StatusCode(401))
        ),
        "the keyed server still asks for its key"
    );

    for name in [
        "1280-predict.png",
        "1280-job.png",
        "1280-try-this-model.png",
        "1280-cancelled.png",
        "390-page.png",
        "1280-api-key.png",
    ] {
        assert!(shots.join(name).is_file(), "no screenshot {name}");
    }
    eprintln!(
        "the page test took {:.1} s; screenshots in {}",
        started.elapsed().as_secs_f64(),
        shots.display()
    );
}

/// The page's DOM once its scripts have run (virtual time lets fetches and rendering finish).
fn rendered(url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=10000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn swagger_ui_shows_every_route_of_the_openapi_document() {
    let server = Server::start(&[]);
    let doc = get_json(&server.url("/openapi.json"), None);
    let docs = rendered(&server.url("/docs/"));
    let paths: Vec<&String> = doc["paths"].as_object().unwrap().keys().collect();
    assert!(paths.len() > 15, "{paths:?}");
    for path in paths {
        assert!(
            docs.contains(&format!(r#"data-path="{path}""#)),
            "{path} is not shown by Swagger UI"
        );
    }
}
