//! The release binary as a child process: started with JSON logs on a free port, its address read
//! from its "listening" line, healthy before use, every log line kept, killed when dropped.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Running {
    pub child: Child,
    pub addr: String,
    /// The fields of the "listening" log line (role, replica, stores…).
    pub listening: Value,
    logs: Arc<Mutex<Vec<String>>>,
}

/// `cnnserve serve --json-logs --addr 127.0.0.1:0` and the caller's arguments.
pub fn serve_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cnnserve"));
    command
        .env("RUST_LOG", "info")
        .env_remove("RUST_BACKTRACE")
        .env_remove("CNNSERVE_API_KEY")
        .args(["serve", "--json-logs", "--addr", "127.0.0.1:0"]);
    command
}

/// [`serve_command`] on `dir` (a weights dir with the fixture GoogLeNet, as from
/// [`super::googlenet_dir`]): offline, GoogLeNet the default, no gRPC.
pub fn serve_googlenet(dir: &std::path::Path) -> Command {
    let mut command = serve_command();
    command
        .args([
            "--offline",
            "--grpc-addr",
            "",
            "--default-model",
            "googlenet",
        ])
        .arg("--weights-dir")
        .arg(dir);
    command
}

impl Running {
    /// Spawns `command` (a [`serve_command`]) and waits until it listens and `/health` is 200.
    pub fn start(mut command: Command) -> Self {
        let mut child = command.stderr(Stdio::piped()).spawn().unwrap();
        // Every line is kept, and the pipe drained so that the server never blocks on it.
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let kept = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if v["fields"]["message"] == "listening" {
                        let _ = tx.send(v["fields"].clone());
                    }
                }
                kept.lock().unwrap().push(line);
            }
        });
        let listening = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!(
                    "the server never said it listens:\n{}",
                    logs.lock().unwrap().join("\n")
                )
            });
        let addr = listening["addr"].as_str().unwrap_or_default().to_string();
        let running = Self {
            child,
            addr,
            listening,
            logs,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while ureq::get(&running.url("/health")).call().is_err() {
            assert!(
                Instant::now() < deadline,
                "not healthy within a minute:\n{}",
                running.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        running
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every log line so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// SIGKILL, and the exit reaped.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}
