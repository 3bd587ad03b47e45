//! `peekgate bench rooms`: measured figures for the room store and the federation read path,
//! printed for BENCHMARKS.md. Runs two in-process servers on 127.0.0.1 (the host and a
//! non-member reader) on a throwaway database of each backend. Build with `--release`.

use std::net::TcpListener;
use std::time::Instant;

use ruma::{ServerName, UserId};
use serde_json::json;

use super::{
    analyze, distinct_requests_script, encode, percentile, remove_script, run_wrk, start, world_readable_room,
};
use peekgate::db::Backend;

/// Runs every room benchmark on both backends and prints the figures.
pub async fn rooms(postgres_admin: &str, appends: usize, wrk_seconds: u64) -> anyhow::Result<()> {
    println!("peekgate bench rooms (release build: {})", !cfg!(debug_assertions));
    for backend in [Backend::Postgres, Backend::Sqlite] {
        println!("\n== {backend:?} ==");
        rooms_on(backend, postgres_admin, appends, wrk_seconds).await?;
    }
    Ok(())
}

async fn rooms_on(backend: Backend, postgres_admin: &str, appends: usize, wrk_seconds: u64) -> anyhow::Result<()> {
    let host_listener = TcpListener::bind("127.0.0.1:0")?;
    let reader_listener = TcpListener::bind("127.0.0.1:0")?;
    let host_url = format!("http://{}", host_listener.local_addr()?);
    let reader_url = format!("http://{}", reader_listener.local_addr()?);
    let host =
        start("host.bench", backend, postgres_admin, &[("reader.bench".into(), reader_url)], host_listener).await?;
    let reader =
        start("reader.bench", backend, postgres_admin, &[("host.bench".into(), host_url.clone())], reader_listener)
            .await?;
    let state = host.running.state.clone();
    let alice = UserId::parse("@alice:host.bench")?;
    let room = world_readable_room(&state, &alice).await?;

    // 1. Appends: sequential messages through the append path (sign, authorise, store).
    let started = Instant::now();
    let mut messages = Vec::with_capacity(appends);
    for i in 0..appends {
        let event = state
            .rooms
            .send(&room, &alice, "m.room.message", None, json!({ "msgtype": "m.text", "body": format!("m{i}") }))
            .await?;
        messages.push(event.event_id);
    }
    let elapsed = started.elapsed();
    println!("appends: {appends} events in {:.2?} = {:.0} events/s", elapsed, appends as f64 / elapsed.as_secs_f64());

    // 2. A room with 1,000 members; time /state and /state_ids fetched by the reader (signed).
    for i in 0..1000 {
        let user = UserId::parse(format!("@m{i}:host.bench"))?;
        state.rooms.send(&room, &user, "m.room.member", Some(user.as_str()), json!({ "membership": "join" })).await?;
    }
    let last =
        state.rooms.send(&room, &alice, "m.room.message", None, json!({ "msgtype": "m.text", "body": "x" })).await?;
    if backend == Backend::Postgres {
        analyze(&state).await?;
    }
    let client = reader.running.state.federation.clone();
    let host_name = <&ServerName>::try_from("host.bench")?;
    let room_enc = encode(room.as_str());
    let event_enc = encode(last.event_id.as_str());
    for (label, path) in [
        ("/state", format!("/_matrix/federation/v1/state/{room_enc}?event_id={event_enc}")),
        ("/state_ids", format!("/_matrix/federation/v1/state_ids/{room_enc}?event_id={event_enc}")),
    ] {
        client.get(host_name, &path).await?; // warm the key caches
        let mut times = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            let body = client.get(host_name, &path).await?;
            times.push(t.elapsed());
            let n = body.get("pdus").or(body.get("pdu_ids")).and_then(|v| v.as_array()).map(Vec::len).unwrap_or(0);
            anyhow::ensure!(n > 1000, "{label} returned {n} entries");
        }
        times.sort();
        println!(
            "{label} of a 1,000-member room ({} state events): p50 {:.1?}, p90 {:.1?}, max {:.1?} over 20 requests",
            1006,
            percentile(&times, 0.5),
            percentile(&times, 0.9),
            times.last().unwrap()
        );
    }

    // 3. Signed GET /event from the non-member reader, warm key cache, load from wrk: distinct
    // events, each request signed on its own (a query parameter the server ignores keeps every
    // URI distinct for the whole run), 16 connections.
    let path = format!("/_matrix/federation/v1/event/{event_enc}");
    client.get(host_name, &path).await?;
    let signed_get = |path: &str| {
        peekgate::xmatrix::authorization_header(
            &reader.running.state.key,
            "reader.bench",
            "host.bench",
            "GET",
            path,
            None,
        )
    };
    let header = signed_get(&path);
    let wanted = wrk_seconds as usize * 20_000;
    let requests: Vec<(String, String)> = (0..wanted)
        .map(|i| {
            let event = &messages[i % messages.len()];
            let path = format!("/_matrix/federation/v1/event/{}?n={}", encode(event.as_str()), i / messages.len());
            let header = signed_get(&path);
            (path, header)
        })
        .collect();
    let script = distinct_requests_script("event", "GET", None, &requests)?;
    run_wrk(
        &format!("GET /event, {} events, {wanted} distinct requests", messages.len()),
        &format!("{host_url}{path}"),
        &header,
        wrk_seconds,
        16,
        Some(&script),
    )?;
    remove_script(&script);

    reader.running.stop().await;
    host.running.stop().await;
    Ok(())
}
