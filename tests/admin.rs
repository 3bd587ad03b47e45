//! The operator's surface (issue #6): the admin HTTP API and its token check, the
//! `peeks list` / `destinations` CLI, `check-federation`, and logs free of secrets.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;

use reqwest::Method;
use serde_json::{json, Value};
use support::client::{enc, request, Client};
use support::gateways::{pair, A, B};
use support::peer::{KeyMode, TestPeer};
use support::{wait_until, DbKind, TestServer};

/// A and B from [`pair`], with bob's device on B peeking A's room.
async fn gateways(db: DbKind, peers: &[&TestPeer]) -> (TestServer, TestServer, Client, String) {
    let p = pair(db, |_| {}, |_| {}, peers).await;
    p.bob.sync(None, 0).await;
    let (status, answer) = p.bob.peek(&p.room, &[]).await;
    assert_eq!(status, 200, "{answer}");
    (p.a, p.b, p.alice, p.room)
}

/// An admin account on `server`, logged in.
async fn admin(server: &TestServer) -> Client {
    let user = ruma::UserId::parse(format!("@root:{}", server.server_name)).unwrap();
    server.state().accounts.create_user(&user, "pw-123456", true).await.unwrap();
    Client::login(&server.base, "root").await
}

/// A config file for the CLI naming the test server's database, key and destinations.
fn config_file(dir: &Path, server: &TestServer) -> std::path::PathBuf {
    let mut text = format!(
        "server_name = \"{}\"\n[database]\nurl = \"{}\"\n[signing]\nkey_path = \"{}\"\n[federation.destinations]\n",
        server.server_name,
        server.config.database.url,
        server.config.signing.key_path.display(),
    );
    for (name, url) in &server.config.federation.destinations {
        text += &format!("\"{name}\" = \"{url}\"\n");
    }
    let path = dir.join("peekgate.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn peekgate(args: &[&str], config: &Path) -> (i32, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_peekgate"));
    for (key, _) in std::env::vars() {
        if key.starts_with("PEEKGATE_") {
            command.env_remove(key);
        }
    }
    let output = command.args(args).arg("--config").arg(config).output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Admin API: no token is 401, a non-admin token 403; an admin sees inbound, outbound and
/// device peeks, and can end them.
async fn admin_api_lists_and_ends_peeks_for_admins_only(db: DbKind) {
    let (a, b, alice, room) = gateways(db, &[]).await;
    let (status, answer) = request(&a.base, None, Method::GET, "/_peekgate/admin/v1/peeks", None).await;
    assert_eq!((status, answer["errcode"].as_str()), (401, Some("M_MISSING_TOKEN")));
    let (status, answer) = alice.call(Method::GET, "/_peekgate/admin/v1/peeks", None).await;
    assert_eq!((status, answer["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{answer}");
    let (status, _) = alice.call(Method::POST, "/_peekgate/admin/v1/destinations/b.test/reset", None).await;
    assert_eq!(status, 403);

    let root_a = admin(&a).await;
    let (status, peeks) = root_a.call(Method::GET, "/_peekgate/admin/v1/peeks", None).await;
    assert_eq!(status, 200, "{peeks}");
    assert_eq!(peeks["inbound"].as_array().unwrap().len(), 1, "{peeks}");
    assert_eq!(peeks["inbound"][0]["origin"], B);
    assert_eq!(peeks["inbound"][0]["room_id"], room.as_str());

    let root_b = admin(&b).await;
    let (_, peeks) = root_b.call(Method::GET, "/_peekgate/admin/v1/peeks", None).await;
    assert_eq!(peeks["outbound"][0]["target"], A, "{peeks}");
    assert_eq!(peeks["device"][0]["user_id"], "@bob:b.test", "{peeks}");
    let device = peeks["device"][0]["device_id"].as_str().unwrap().to_owned();

    // Ending bob's device peek on B also ends B's federation peek at A (nobody else watches).
    let path = format!("/_peekgate/admin/v1/peeks/device/{}/{}/{}", enc("@bob:b.test"), enc(&device), enc(&room));
    let (status, answer) = root_b.call(Method::DELETE, &path, None).await;
    assert_eq!((status, answer), (200, json!({})));
    assert_eq!(root_b.call(Method::DELETE, &path, None).await.0, 404);
    assert_eq!(a.state().inbound.live_count().await.unwrap(), 0);
    let (_, peeks) = root_b.call(Method::GET, "/_peekgate/admin/v1/peeks", None).await;
    assert_eq!(peeks["device"], json!([]));
    assert!(peeks["outbound"][0]["ended_ts"].is_i64(), "{peeks}");
}
both_backends!(admin_api_lists_and_ends_peeks_for_admins_only);

/// A destination backing off is listed as such; an admin's reset makes the sender retry at
/// once, long before its back-off would have ended.
async fn admin_reset_wakes_a_backing_off_destination(db: DbKind) {
    let slow = TestPeer::start("slow.test", KeyMode::Good);
    let (a, _b, alice, room) = gateways(db, &[&slow]).await;
    let path = format!("/_matrix/federation/v1/peek/{}/slow1?ver=10", enc(&room));
    let (status, answer) = slow.call(&a.base, A, Method::PUT, &path, Some(&json!({}))).await;
    assert_eq!(status, 200, "{answer}");
    slow.inbox.fail_remaining.store(1_000, Ordering::SeqCst);
    alice.say(&room, "to a server that keeps failing").await;
    let root = admin(&a).await;
    let slow_row = || async {
        let (_, list) = root.call(Method::GET, "/_peekgate/admin/v1/destinations", None).await;
        list["destinations"].as_array().unwrap().iter().find(|d| d["server_name"] == "slow.test").cloned()
    };
    // The fourth failure waits about 8 s.
    wait_until("slow.test backing off after 4 failures", || async {
        slow_row().await.is_some_and(|d| d["failure_count"].as_i64().unwrap() >= 4 && d["backing_off"] == true)
    })
    .await;
    let retry_at = slow_row().await.unwrap()["retry_at"].as_i64().unwrap();
    slow.inbox.fail_remaining.store(0, Ordering::SeqCst);
    let (status, answer) = root.call(Method::POST, "/_peekgate/admin/v1/destinations/slow.test/reset", None).await;
    assert_eq!((status, answer), (200, json!({})));
    wait_until("delivery after the reset", || async { !slow.inbox.pdus().is_empty() }).await;
    assert!(
        chrono::Utc::now().timestamp_millis() < retry_at,
        "delivered only when the back-off ended anyway: the reset did not wake the sender"
    );
    let (status, _) = root.call(Method::POST, "/_peekgate/admin/v1/destinations/nobody.test/reset", None).await;
    assert_eq!(status, 404);
}
both_backends!(admin_reset_wakes_a_backing_off_destination);

/// The CLI: `peeks list [--json]`, `destinations list [--json]` and `destinations reset`.
async fn cli_lists_peeks_and_destinations(db: DbKind) {
    let (a, b, _alice, room) = gateways(db, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let config_b = config_file(dir.path(), &b);
    let (code, out, err) = peekgate(&["peeks", "list", "--json"], &config_b);
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["outbound"][0]["room_id"], room.as_str(), "{out}");
    assert_eq!(report["device"][0]["user_id"], "@bob:b.test");
    let (code, out, _) = peekgate(&["peeks", "list"], &config_b);
    assert_eq!(code, 0);
    assert!(out.contains("outbound peeks (1)") && out.contains(&room), "{out}");

    let dir_a = tempfile::tempdir().unwrap();
    let config_a = config_file(dir_a.path(), &a);
    wait_until("A has b.test as a destination", || async {
        peekgate::admin::destinations(&a.state().db).await.unwrap().iter().any(|d| d.server_name == B)
    })
    .await;
    let (code, out, err) = peekgate(&["destinations", "list", "--json"], &config_a);
    assert_eq!(code, 0, "{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    assert!(list.as_array().unwrap().iter().any(|d| d["server_name"] == B), "{out}");
    let (code, out, err) = peekgate(&["destinations", "reset", B], &config_a);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("reset b.test"), "{out}");
    let (code, _, err) = peekgate(&["destinations", "reset", "nobody.test"], &config_a);
    assert_eq!(code, 2);
    assert!(err.contains("not a destination"), "{err}");
}
both_backends!(cli_lists_peeks_and_destinations);

/// `check-federation` passes every step against another peekgate and fails (exit 1) against a
/// server whose key response is not validly self-signed.
async fn check_federation_passes_and_fails_as_it_should(db: DbKind) {
    let bad = TestPeer::start("badkeys.test", KeyMode::BadSelfSignature);
    let (_a, b, _alice, _room) = gateways(db, &[&bad]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), &b);
    let (code, out, err) = peekgate(&["check-federation", A], &config);
    assert_eq!(code, 0, "{out}{err}");
    for step in ["resolve", "version", "key fetch", "key verification", "clock skew", "signed request"] {
        let line = out.lines().find(|l| l.starts_with(step)).unwrap_or_else(|| panic!("no {step} line: {out}"));
        assert!(line.contains(" pass "), "{line}");
    }
    let (code, out, _) = peekgate(&["check-federation", "badkeys.test"], &config);
    assert_eq!(code, 1, "{out}");
    let line = out.lines().find(|l| l.starts_with("key verification")).unwrap();
    assert!(line.contains("FAIL") && line.contains("self-signature"), "{line}");
}
both_backends!(check_federation_passes_and_fails_as_it_should);
