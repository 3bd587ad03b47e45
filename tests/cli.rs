//! The `peekgate` binary as an operator uses it: `serve` on built-in defaults, one-line config
//! errors, `generate-key`, `migrate`, and a graceful exit on SIGTERM (also in the middle of a delivery).

mod support;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use support::client::{enc, Client};
use support::peer::{signing_bytes, KeyMode, TestPeer};
use support::process::{free_port, get_json, peekgate, spawn_serve};
use support::{wait_until, DbKind, TestDb};

fn stderr_lines(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stderr).lines().map(str::to_owned).collect()
}

#[tokio::test]
async fn serve_runs_on_builtin_defaults_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, http_port, metrics_port) = spawn_serve(dir.path(), None);
    let url = format!("http://127.0.0.1:{http_port}/_matrix/key/v2/server");
    let mut keys = None;
    for _ in 0..200 {
        keys = get_json(&url).await;
        if keys.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let keys = keys.expect("serve answers on the configured port");

    // The default server name, and a self-signature that verifies under the spec's algorithm.
    assert_eq!(keys["server_name"], "localhost:8008");
    let (key_id, key) = keys["verify_keys"].as_object().unwrap().iter().next().unwrap();
    let public: [u8; 32] = peekgate::keys::decode_base64(key["key"].as_str().unwrap()).unwrap().try_into().unwrap();
    let sig: [u8; 64] = peekgate::keys::decode_base64(keys["signatures"]["localhost:8008"][key_id].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    ed25519_dalek::VerifyingKey::from_bytes(&public)
        .unwrap()
        .verify_strict(&signing_bytes(&keys), &ed25519_dalek::Signature::from_bytes(&sig))
        .expect("self-signature verifies");

    // The defaults: SQLite under data/, the key under keys/ with mode 0600.
    assert!(dir.path().join("data/peekgate.sqlite").exists());
    let key_file = dir.path().join("keys/signing.key");
    let contents = std::fs::read_to_string(&key_file).unwrap();
    assert!(contents.starts_with(&format!("ed25519 {} ", key_id.trim_start_matches("ed25519:"))));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let metrics = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("peekgate_xmatrix_auth_failures_total"));

    // SIGTERM: a graceful stop with exit code 0.
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let mut exit = None;
    for _ in 0..100 {
        if let Some(status) = child.try_wait().unwrap() {
            exit = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let exit = exit.unwrap_or_else(|| {
        let _ = child.kill();
        panic!("serve did not exit after SIGTERM")
    });
    assert_eq!(exit.code(), Some(0));

    // A second start reuses the key.
    let again = std::fs::read_to_string(&key_file).unwrap();
    assert_eq!(again, contents);
}

#[test]
fn bad_config_exits_with_one_line_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let output = peekgate(dir.path()).arg("serve").env("PEEKGATE_HTTP__BIND", "nope").output().unwrap();
    assert!(!output.status.success());
    let lines = stderr_lines(&output);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("http.bind"), "{lines:?}");

    let config = dir.path().join("peekgate.toml");
    std::fs::write(&config, "server_name = \"gate.test\"\n[schedule]\nevict_inbound = \"whenever\"\n").unwrap();
    let output = peekgate(dir.path()).args(["serve", "--config"]).arg(&config).output().unwrap();
    assert!(!output.status.success());
    let lines = stderr_lines(&output);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("schedule.evict_inbound"), "{lines:?}");

    // A worker that would stop between two events of a busy room.
    let output = peekgate(dir.path()).arg("serve").env("PEEKGATE_FEDERATION__SENDER_IDLE_MS", "10").output().unwrap();
    assert!(!output.status.success());
    let lines = stderr_lines(&output);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("federation.sender_idle_ms"), "{lines:?}");

    // A value of the wrong type in the file.
    std::fs::write(&config, "[peeks]\nrenewal_interval_ms = \"soon\"\n").unwrap();
    let output = peekgate(dir.path()).arg("serve").env("PEEKGATE_CONFIG", &config).output().unwrap();
    assert!(!output.status.success());
    let lines = stderr_lines(&output);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("renewal_interval_ms"), "{lines:?}");
    // Nothing was created by a refused start.
    assert!(!dir.path().join("data").exists());
    assert!(!dir.path().join("keys").exists());
}

#[test]
fn generate_key_writes_synapse_format_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k/signing.key");
    let output = peekgate(dir.path()).args(["generate-key", "--path"]).arg(&path).output().unwrap();
    assert!(output.status.success(), "{:?}", stderr_lines(&output));
    let contents = std::fs::read_to_string(&path).unwrap();
    let parts: Vec<&str> = contents.split_whitespace().collect();
    assert_eq!(parts.len(), 3);
    assert_eq!(parts[0], "ed25519");
    assert!(peekgate::keys::is_valid_key_version(parts[1]));
    assert_eq!(peekgate::keys::decode_base64(parts[2]).unwrap().len(), 32);

    let output = peekgate(dir.path()).args(["generate-key", "--path"]).arg(&path).output().unwrap();
    assert!(!output.status.success());
    assert!(stderr_lines(&output)[0].contains("refusing to overwrite"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), contents, "the key is untouched");
}

#[test]
fn migrate_applies_once_on_postgres_and_reports_real_connection_errors() {
    let dir = tempfile::tempdir().unwrap();
    let db = support::TestDb::new(support::DbKind::Postgres);
    let run = || peekgate(dir.path()).arg("migrate").env("PEEKGATE_DATABASE__URL", &db.url).output().unwrap();
    let first = run();
    assert!(first.status.success(), "{:?}", stderr_lines(&first));
    let all = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres")).unwrap().count();
    assert!(String::from_utf8_lossy(&first.stdout).contains(&format!("{all} migration(s) applied")));
    let second = run();
    assert!(String::from_utf8_lossy(&second.stdout).contains("0 migration(s) applied"));

    // A role that does not exist: the error is PostgreSQL's, not an SQLite file named after the URL.
    let output = peekgate(dir.path())
        .arg("migrate")
        .env("PEEKGATE_DATABASE__URL", "postgres://no_such_role_pg@127.0.0.1:5432/postgres")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(stderr_lines(&output).join("\n").contains("no_such_role_pg"), "{:?}", stderr_lines(&output));
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "no stray files");
}

#[test]
fn user_create_makes_a_user_once() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("db.sqlite").display());
    let create = || {
        peekgate(dir.path())
            .args(["user", "create", "bob", "--password", "s3cret", "--admin"])
            .env("PEEKGATE_DATABASE__URL", &url)
            .output()
            .unwrap()
    };
    let first = create();
    assert!(first.status.success(), "{:?}", stderr_lines(&first));
    assert!(String::from_utf8_lossy(&first.stdout).contains("created @bob:localhost:8008 (admin)"));
    let again = create();
    assert!(!again.status.success());
    assert!(stderr_lines(&again)[0].contains("taken"), "{:?}", stderr_lines(&again));
    let bad = peekgate(dir.path())
        .args(["user", "create", "Not Valid", "--password", "x"])
        .env("PEEKGATE_DATABASE__URL", &url)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(stderr_lines(&bad)[0].contains("invalid username"), "{:?}", stderr_lines(&bad));
}

/// Issue #6: with debug logs in JSON, no password, access token or signing key appears in any
/// log line, even when the token travels in the deprecated `?access_token=` query parameter.
#[tokio::test]
async fn logs_never_contain_passwords_tokens_or_keys() {
    let dir = tempfile::tempdir().unwrap();
    let http_port = free_port();
    let child = peekgate(dir.path())
        .arg("serve")
        .env("PEEKGATE_HTTP__BIND", format!("127.0.0.1:{http_port}"))
        .env("PEEKGATE_METRICS__BIND", "")
        .env("PEEKGATE_CLIENT__REGISTRATION", "open")
        .env("PEEKGATE_LOG__FORMAT", "json")
        .env("PEEKGATE_LOG__FILTER", "debug")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{http_port}");
    let mut up = false;
    for _ in 0..200 {
        if get_json(&format!("{base}/health")).await.is_some() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "serve did not start");
    let password = "correct-horse-battery-staple-42";
    let http = reqwest::Client::new();
    let register =
        serde_json::json!({ "username": "carol", "password": password, "auth": { "type": "m.login.dummy" } });
    let answer: Value = http
        .post(format!("{base}/_matrix/client/v3/register"))
        .json(&register)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = answer["access_token"].as_str().unwrap().to_owned();
    let login = serde_json::json!({ "type": "m.login.password", "user": "carol", "password": password });
    let answer: Value =
        http.post(format!("{base}/_matrix/client/v3/login")).json(&login).send().await.unwrap().json().await.unwrap();
    let second_token = answer["access_token"].as_str().unwrap().to_owned();
    let whoami =
        http.get(format!("{base}/_matrix/client/v3/account/whoami?access_token={token}")).send().await.unwrap();
    assert_eq!(whoami.status().as_u16(), 200);
    let wrong =
        http.get(format!("{base}/_matrix/client/v3/account/whoami")).bearer_auth("pgt_not-a-real-token-123").send();
    assert_eq!(wrong.await.unwrap().status().as_u16(), 401);
    let wrong_in_query = format!("{base}/_matrix/client/v3/account/whoami?access_token=pgt_wrong-in-the-query-42");
    assert_eq!(http.get(wrong_in_query).send().await.unwrap().status().as_u16(), 401);
    let sync = format!("{base}/_matrix/client/v3/sync?access_token={second_token}");
    assert_eq!(http.get(sync).send().await.unwrap().status().as_u16(), 200);

    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let output = tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
    let logs = String::from_utf8_lossy(&output.stderr);
    assert!(logs.lines().count() > 5, "expected debug logs, got: {logs}");
    assert!(logs.contains("/_matrix/client/v3/account/whoami"), "requests are logged: {logs}");
    let seed = std::fs::read_to_string(dir.path().join("keys/signing.key")).unwrap();
    let seed = seed.split_whitespace().nth(2).unwrap().to_owned();
    for (what, secret) in [
        ("password", password),
        ("access token", token.as_str()),
        ("second access token", second_token.as_str()),
        ("a wrong token", "pgt_not-a-real-token-123"),
        ("a wrong token in the query", "pgt_wrong-in-the-query-42"),
        ("signing key seed", seed.as_str()),
    ] {
        assert!(!logs.contains(secret), "the {what} appears in the logs");
    }
}

/// H20: plain logs written to a pipe (journald, a file) carry no ANSI colour codes.
#[tokio::test]
async fn plain_logs_to_a_pipe_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let http_port = free_port();
    let child = peekgate(dir.path())
        .arg("serve")
        .env("PEEKGATE_HTTP__BIND", format!("127.0.0.1:{http_port}"))
        .env("PEEKGATE_METRICS__BIND", "")
        .env("PEEKGATE_LOG__FORMAT", "plain")
        .env("PEEKGATE_LOG__FILTER", "debug")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{http_port}");
    let mut up = false;
    for _ in 0..200 {
        if get_json(&format!("{base}/_matrix/key/v2/server")).await.is_some() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let output = tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
    let logs = String::from_utf8_lossy(&output.stderr);
    assert!(up, "serve did not start: {logs}");
    assert!(logs.lines().count() > 2, "expected debug logs, got: {logs}");
    assert!(!logs.contains("\x1b["), "ANSI escape codes in piped logs: {logs:?}");
}

/// #6: SIGTERM while transactions to a slow peeker are in flight. `serve` exits 0, and the server
/// started again on the same database delivers what the first one did not: the peeker ends with
/// every event (at-least-once: repeats allowed, losses not). On PostgreSQL, the production store.
#[test]
fn sigterm_during_delivery_loses_nothing() {
    support::run_async(sigterm_during_delivery());
}

async fn sigterm_during_delivery() {
    const GW: &str = "gw.test";
    let db = TestDb::new(DbKind::Postgres);
    let peer = TestPeer::start("peeker.test", KeyMode::Good);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("peekgate.toml");
    let key = dir.path().join("signing.key");
    let text = format!(
        "server_name = \"{GW}\"\n[database]\nurl = \"{}\"\n[signing]\nkey_path = \"{}\"\n[client]\nregistration = \"open\"\n\
         [federation.destinations]\n\"peeker.test\" = \"{}\"\n",
        db.url,
        key.display(),
        peer.url
    );
    std::fs::write(&config, text).unwrap();
    let start = || async {
        let (child, http_port, _) = spawn_serve(dir.path(), Some(&config));
        let base = format!("http://127.0.0.1:{http_port}");
        let url = format!("{base}/_matrix/key/v2/server");
        wait_until("serve answers", || async { get_json(&url).await.is_some() }).await;
        peer.trust(GW, &base);
        (child, base)
    };

    let (mut first, base) = start().await;
    let alice = Client::register(&base, "alice").await;
    let room = alice.create_world_readable_room("lobby", "10").await;
    let path = format!("/_matrix/federation/v1/peek/{}/p1?ver=10", enc(&room));
    let (status, answer) = peer.call(&base, GW, reqwest::Method::PUT, &path, Some(&json!({}))).await;
    assert_eq!(status, 200, "{answer}");
    peer.inbox.send_delay_ms.store(400, std::sync::atomic::Ordering::SeqCst);
    let mut sent = Vec::new();
    for i in 0..20 {
        sent.push(alice.say(&room, &format!("m{i}")).await);
    }
    // In flight and authenticated: `attempts` counts a request before the peer fetches our keys,
    // and a SIGTERM in between made the fetch (and so the check) fail.
    wait_until("a transaction in flight", || async {
        peer.inbox.attempts.load(std::sync::atomic::Ordering::SeqCst) > 0 && peer.inbox.has_keys_of(GW)
    })
    .await;
    let status = Command::new("kill").args(["-TERM", &first.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || first.wait().unwrap()).await.unwrap();
    assert_eq!(exit.code(), Some(0), "serve exits 0 on SIGTERM");
    let delivered_before_restart = peer.inbox.event_ids("10");
    assert!(delivered_before_restart.len() < sent.len(), "the stop came before everything was delivered");

    peer.inbox.send_delay_ms.store(0, std::sync::atomic::Ordering::SeqCst);
    let (mut second, _) = start().await;
    wait_until("every event after the restart", || async {
        let got = peer.inbox.event_ids("10");
        sent.iter().all(|id| got.contains(id))
    })
    .await;
    assert!(peer.inbox.problems.lock().unwrap().is_empty(), "{:?}", peer.inbox.problems.lock().unwrap());
    let _ = second.kill();
    let _ = second.wait();
}
