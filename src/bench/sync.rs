//! `peekgate bench sync`: the time from an event accepted at gateway A to its appearance in a
//! long-polling `/sync` of a device on gateway B that peeks A's room (issue #5), over real
//! HTTP and signed federation between two in-process gateways, on each backend.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use ruma::UserId;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{encode, percentile, start, world_readable_room};
use peekgate::db::Backend;

pub async fn sync(postgres_admin: &str, events: usize) -> anyhow::Result<()> {
    println!("peekgate bench sync (release build: {})", !cfg!(debug_assertions));
    for backend in [Backend::Postgres, Backend::Sqlite] {
        println!("\n== {backend:?} ==");
        sync_on(backend, postgres_admin, events).await?;
    }
    Ok(())
}

async fn sync_on(backend: Backend, postgres_admin: &str, events: usize) -> anyhow::Result<()> {
    let (a_listener, b_listener) = (TcpListener::bind("127.0.0.1:0")?, TcpListener::bind("127.0.0.1:0")?);
    let a_url = format!("http://{}", a_listener.local_addr()?);
    let b_url = format!("http://{}", b_listener.local_addr()?);
    let a = start("host.bench", backend, postgres_admin, &[("peeker.bench".into(), b_url.clone())], a_listener).await?;
    let b = start("peeker.bench", backend, postgres_admin, &[("host.bench".into(), a_url)], b_listener).await?;
    let (a_state, b_state) = (a.running.state.clone(), b.running.state.clone());

    let alice = UserId::parse("@alice:host.bench")?;
    let room = world_readable_room(&a_state, &alice).await?;
    let bob = UserId::parse("@bob:peeker.bench")?;
    b_state.accounts.create_user(&bob, "bench-password", false).await?;
    let token = b_state.accounts.open_session(&bob, None, None).await?.access_token;

    let http = reqwest::Client::new();
    let client = Client { http: http.clone(), base: b_url.clone(), token: token.clone() };
    let since = client.sync(None, 0).await?["next_batch"].as_str().unwrap_or_default().to_owned();
    let peek =
        client.post(&format!("/_matrix/client/v3/peek/{}?server_name=host.bench", encode(room.as_str()))).await?;
    anyhow::ensure!(peek["room_id"] == room.as_str(), "peek failed: {peek}");

    // The watcher long-polls B and reports when each message body first appears.
    let (arrivals, mut arrived) = mpsc::unbounded_channel::<(String, Instant)>();
    let room_key = room.to_string();
    let watcher = tokio::spawn(async move {
        let mut since = since;
        loop {
            let Ok(answer) = client.sync(Some(&since), 30_000).await else { return };
            let now = Instant::now();
            since = answer["next_batch"].as_str().unwrap_or_default().to_owned();
            let timeline = &answer["rooms"]["peek"][&room_key]["timeline"]["events"];
            for event in timeline.as_array().into_iter().flatten() {
                if let Some(body) = event["content"]["body"].as_str() {
                    if arrivals.send((body.to_owned(), now)).is_err() {
                        return;
                    }
                }
            }
        }
    });

    let mut latencies = Vec::with_capacity(events);
    let started = Instant::now();
    for i in 0..events {
        let body = format!("bench {i}");
        a_state.rooms.send(&room, &alice, "m.room.message", None, json!({ "msgtype": "m.text", "body": body })).await?;
        let accepted = Instant::now();
        loop {
            let (seen, at) = tokio::time::timeout(Duration::from_secs(30), arrived.recv())
                .await?
                .ok_or_else(|| anyhow::anyhow!("the sync watcher stopped"))?;
            if seen == body {
                latencies.push(at.saturating_duration_since(accepted));
                break;
            }
        }
    }
    let elapsed = started.elapsed();
    watcher.abort();
    latencies.sort();
    println!(
        "event accepted at A -> in B's long-polling /sync, {events} events one after another: \
         p50 {:.1?}, p99 {:.1?}, max {:.1?} ({:.0} events/s end to end)",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default(),
        events as f64 / elapsed.as_secs_f64(),
    );
    a.running.stop().await;
    b.running.stop().await;
    Ok(())
}

/// The few client calls the benchmark makes.
struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    async fn sync(&self, since: Option<&str>, timeout_ms: u64) -> anyhow::Result<Value> {
        let filter = encode(r#"{"room":{"timeline":{"limit":100}}}"#);
        let mut url = format!("{}/_matrix/client/v3/sync?timeout={timeout_ms}&filter={filter}", self.base);
        if let Some(since) = since {
            url = format!("{url}&since={}", encode(since));
        }
        Ok(self.http.get(url).bearer_auth(&self.token).send().await?.json().await?)
    }

    async fn post(&self, path: &str) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        Ok(self.http.post(url).bearer_auth(&self.token).json(&json!({})).send().await?.json().await?)
    }
}
