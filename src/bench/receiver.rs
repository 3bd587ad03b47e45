//! `peekgate bench receiver`: one lightweight federation receiver that answers 200 to every
//! `/send` for any number of destinations, and counts the PDUs it got per body marker. Runs as
//! its own process so its CPU is not counted as the gateway's.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use actix_web::{web, App, HttpResponse, HttpServer};
use serde_json::{json, Value};

use peekgate::clock::now_ms;

/// marker -> (PDUs received, time of the last one in ms)
type Counts = Arc<Mutex<HashMap<String, (u64, i64)>>>;

async fn send(body: web::Bytes, counts: web::Data<Counts>) -> HttpResponse {
    let txn: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let now = now_ms();
    if let Some(pdus) = txn["pdus"].as_array() {
        let mut counts = counts.lock().unwrap();
        for pdu in pdus {
            let marker = pdu["content"]["body"].as_str().unwrap_or("").to_owned();
            let entry = counts.entry(marker).or_insert((0, 0));
            entry.0 += 1;
            entry.1 = now;
        }
    }
    HttpResponse::Ok().json(json!({ "pdus": {} }))
}

async fn stats(marker: web::Path<String>, counts: web::Data<Counts>) -> HttpResponse {
    let (count, last_ms) = counts.lock().unwrap().get(marker.as_str()).copied().unwrap_or((0, 0));
    HttpResponse::Ok().json(json!({ "count": count, "last_ms": last_ms }))
}

/// Serves until the process is killed; prints `listening on <url>` first.
pub async fn receiver(bind: &str) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind(bind)?;
    println!("listening on http://{}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let counts: web::Data<Counts> = web::Data::new(Arc::default());
    HttpServer::new(move || {
        App::new()
            .app_data(counts.clone())
            .app_data(web::PayloadConfig::new(64 * 1024 * 1024))
            .route("/_matrix/federation/v1/send/{txn}", web::put().to(send))
            .route("/stats/{marker}", web::get().to(stats))
    })
    .workers(2)
    .backlog(4096)
    .max_connections(50_000)
    .listen(listener)?
    .run()
    .await?;
    Ok(())
}
