//! `peekgate check-federation <server_name>`: each step of talking to another server, printed
//! as pass or fail with the reason: resolution, the version endpoint, the key fetch, the key
//! response's verification, clock skew, and a request signed with our key.

use ruma::{CanonicalJsonValue, ServerName};
use serde_json::Value;

use super::client::FederationClient;
use crate::clock::now_ms;
use crate::keys::remote::verify_key_response;

/// Clocks further apart than this make signatures and key validity unreliable.
const MAX_SKEW_MS: i64 = 30_000;

#[derive(Debug)]
pub struct Step {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

fn step(name: &'static str, result: Result<String, String>) -> Step {
    match result {
        Ok(detail) => Step { name, ok: true, detail },
        Err(detail) => Step { name, ok: false, detail },
    }
}

/// Runs every step (later steps still run after a failure, when they can).
pub async fn check(client: &FederationClient, server: &ServerName) -> Vec<Step> {
    let mut steps = vec![step("resolve", client.route(server).await.map_err(|e| e.to_string()))];
    let version = client.get_unsigned(server, "/_matrix/federation/v1/version").await;
    steps.push(step(
        "version",
        version
            .map(|v| {
                format!(
                    "{} {}",
                    v["server"]["name"].as_str().unwrap_or("?"),
                    v["server"]["version"].as_str().unwrap_or("?")
                )
            })
            .map_err(|e| e.to_string()),
    ));
    match client.get_unsigned_dated(server, "/_matrix/key/v2/server").await {
        Ok((keys, date)) => {
            steps.push(step("key fetch", Ok("GET /_matrix/key/v2/server answered".into())));
            steps.push(step("key verification", verify_keys(server, keys)));
            steps.push(step("clock skew", skew(date.as_deref())));
        }
        Err(e) => {
            steps.push(step("key fetch", Err(e.to_string())));
            steps.push(step("key verification", Err("no key response to verify".into())));
            steps.push(step("clock skew", Err("no answer to compare clocks with".into())));
        }
    }
    steps.push(step("signed request", signed_request(client, server).await));
    steps
}

fn verify_keys(server: &ServerName, keys: Value) -> Result<String, String> {
    let object = match CanonicalJsonValue::try_from(keys) {
        Ok(CanonicalJsonValue::Object(object)) => object,
        _ => return Err("the key response is not canonical JSON".into()),
    };
    let verified = verify_key_response(server, object, now_ms())?;
    let ids: Vec<String> = verified.keys.iter().filter(|k| !k.is_old).map(|k| k.key_id.clone()).collect();
    Ok(format!("self-signed by {}, valid until {}", ids.join(", "), verified.valid_until_ts))
}

fn skew(date: Option<&str>) -> Result<String, String> {
    let date = date.ok_or("the answer has no Date header")?;
    let remote = chrono::DateTime::parse_from_rfc2822(date).map_err(|e| format!("bad Date header {date:?}: {e}"))?;
    // The Date header has whole seconds: take the middle of the second it names.
    let skew_ms = remote.timestamp_millis() + 500 - now_ms();
    let text = format!("{:+.1} s (Date: {date})", skew_ms as f64 / 1000.0);
    if skew_ms.abs() <= MAX_SKEW_MS {
        Ok(text)
    } else {
        Err(format!("{text}: more than {} s apart", MAX_SKEW_MS / 1000))
    }
}

/// A signed request every server serves: a directory query for an alias that does not exist.
/// 200 or 404 means the server accepted our X-Matrix signature (it fetched our key to do so).
async fn signed_request(client: &FederationClient, server: &ServerName) -> Result<String, String> {
    let alias = format!("#peekgate-check-federation:{server}");
    let encoded: String = url::form_urlencoded::byte_serialize(alias.as_bytes()).collect();
    let path = format!("/_matrix/federation/v1/query/directory?room_alias={encoded}");
    match client.get(server, &path).await {
        Ok(_) => Ok("our X-Matrix signature was accepted".into()),
        Err(e) if e.status() == Some(404) => Ok("our X-Matrix signature was accepted (404 for the probe alias)".into()),
        Err(e) => Err(format!("{e}: the server did not accept our signed request (can it fetch our keys?)")),
    }
}
