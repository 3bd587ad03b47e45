//! `peekgate bench receiver`: one lightweight federation receiver that answers 200 to every
//! `/send` for any number of destinations, and counts the PDUs it got per body marker. Runs as
//! its own process so its CPU is not counted as the gateway's.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use serde_json::json;
use tokio::sync::Notify;

use peekgate::clock::now_ms;

/// marker -> (PDUs received, time of the last one in ms), and a wake-up for `/wait`.
#[derive(Default)]
struct Counts {
    by_marker: Mutex<HashMap<String, (u64, i64)>>,
    changed: Notify,
}

/// Only what the receiver counts; everything else in a transaction is skipped unparsed, so the
/// receiver (sharing the machine's cores with the gateway) costs as little as it can.
#[derive(serde::Deserialize)]
struct Txn<'a> {
    #[serde(borrow, default)]
    pdus: Vec<MarkedPdu<'a>>,
}

#[derive(serde::Deserialize)]
struct MarkedPdu<'a> {
    #[serde(borrow, default)]
    content: Option<Marker<'a>>,
}

#[derive(serde::Deserialize)]
struct Marker<'a> {
    #[serde(borrow, default)]
    body: Option<std::borrow::Cow<'a, str>>,
}

async fn send(body: web::Bytes, counts: web::Data<Counts>) -> HttpResponse {
    let now = now_ms();
    if let Ok(txn) = serde_json::from_slice::<Txn>(&body) {
        let mut by_marker = counts.by_marker.lock().unwrap();
        for pdu in txn.pdus {
            let marker = pdu.content.and_then(|c| c.body).unwrap_or_default();
            let entry = match by_marker.get_mut(marker.as_ref()) {
                Some(entry) => entry,
                None => by_marker.entry(marker.into_owned()).or_insert((0, 0)),
            };
            entry.0 += 1;
            entry.1 = now;
        }
    }
    counts.changed.notify_waiters();
    HttpResponse::Ok().json(json!({ "pdus": {} }))
}

/// Answers once `count` PDUs with `marker` arrived, or after 10 s with what arrived so far: the
/// bench waits with one request instead of polling, so its waiting costs the measured process
/// almost nothing.
async fn wait(path: web::Path<(String, u64)>, counts: web::Data<Counts>) -> HttpResponse {
    let (marker, expected) = path.into_inner();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let changed = counts.changed.notified();
        let (count, last_ms) = counts.by_marker.lock().unwrap().get(marker.as_str()).copied().unwrap_or((0, 0));
        if count >= expected || tokio::time::Instant::now() >= deadline {
            return HttpResponse::Ok().json(json!({ "count": count, "last_ms": last_ms }));
        }
        let _ = tokio::time::timeout_at(deadline, changed).await;
    }
}

/// Serves until the process is killed; prints `listening on <url>` first.
pub async fn receiver(bind: &str) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind(bind)?;
    println!("listening on http://{}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let counts: web::Data<Counts> = web::Data::new(Counts::default());
    HttpServer::new(move || {
        App::new()
            .app_data(counts.clone())
            .app_data(web::PayloadConfig::new(64 * 1024 * 1024))
            .route("/_matrix/federation/v1/send/{txn}", web::put().to(send))
            .route("/wait/{marker}/{count}", web::get().to(wait))
    })
    .workers(2)
    .backlog(4096)
    .max_connections(50_000)
    .listen(listener)?
    .run()
    .await?;
    Ok(())
}
