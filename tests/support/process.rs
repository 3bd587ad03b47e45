//! The `peekgate` binary as a child process, as an operator runs it: `serve` on free ports,
//! for the command-line tests and the reliability tests that kill it.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

/// A `peekgate` command run in `dir`.
pub fn peekgate(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_peekgate"));
    command.current_dir(dir);
    // Only what the test sets: no PEEKGATE_* from the surrounding environment.
    for (key, _) in std::env::vars() {
        if key.starts_with("PEEKGATE_") {
            command.env_remove(key);
        }
    }
    command
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `peekgate serve [--config FILE]` in `dir` on free HTTP and metrics ports (only the ports
/// differ from the configuration, so parallel tests do not collide): the child and both ports.
pub fn spawn_serve(dir: &Path, config: Option<&Path>) -> (std::process::Child, u16, u16) {
    let (http_port, metrics_port) = (free_port(), free_port());
    let mut command = peekgate(dir);
    command.arg("serve");
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    let child = command
        .env("PEEKGATE_HTTP__BIND", format!("127.0.0.1:{http_port}"))
        .env("PEEKGATE_METRICS__BIND", format!("127.0.0.1:{metrics_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (child, http_port, metrics_port)
}

pub async fn get_json(url: &str) -> Option<Value> {
    peekgate::app::install_crypto_provider();
    let response = reqwest::get(url).await.ok()?;
    response.json().await.ok()
}
