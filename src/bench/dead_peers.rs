//! `peekgate bench dead-peers` (PostgreSQL; issue #11 H5, TBD-12): healthy peeking destinations
//! get a burst of events appended back to back; the figure is the time from the first append to
//! the last delivery, once with only the healthy destinations and once beside 20 destinations
//! that accept connections and never answer and one that answers 400 to everything. A dead peer
//! must not cost the healthy ones anything measurable.

use std::net::TcpListener;
use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use serde_json::json;

use super::peeks::{insert_followers, Follows, Receiver};
use super::{start, world_readable_room};
use peekgate::clock::now_ms;
use peekgate::db::Backend;

/// Silent peers: they accept connections and never read or answer.
const SILENT: usize = 20;

pub async fn dead_peers(postgres_admin: &str, healthy: usize, events: usize, rounds: usize) -> anyhow::Result<()> {
    println!("peekgate bench dead-peers (release build: {}), PostgreSQL", !cfg!(debug_assertions));
    let receiver = Receiver::spawn()?;
    let silent = (0..SILENT).map(|_| silent_peer()).collect::<anyhow::Result<Vec<String>>>()?;
    let failing = failing_peer()?;
    let mut alone = Vec::new();
    let mut beside_dead = Vec::new();
    for round in 0..rounds {
        // Interleaved, so that a drift of the machine affects both alike.
        alone.push(run(&receiver, postgres_admin, healthy, events, None, &format!("a{round}")).await?);
        let dead = Some((silent.as_slice(), failing.as_str()));
        beside_dead.push(run(&receiver, postgres_admin, healthy, events, dead, &format!("d{round}")).await?);
    }
    alone.sort_by(f64::total_cmp);
    beside_dead.sort_by(f64::total_cmp);
    let median = |v: &[f64]| v[v.len() / 2];
    println!(
        "{events} events to {healthy} healthy destinations, time to the last delivery over {rounds} rounds: \
         alone median {:.0} ms (min {:.0}, max {:.0}); beside {SILENT} silent and 1 failing destination median {:.0} ms (min {:.0}, max {:.0})",
        median(&alone),
        alone[0],
        alone[alone.len() - 1],
        median(&beside_dead),
        beside_dead[0],
        beside_dead[beside_dead.len() - 1],
    );
    Ok(())
}

/// One run on a fresh gateway: the milliseconds from the first append to the last delivery.
async fn run(
    receiver: &Receiver,
    postgres_admin: &str,
    healthy: usize,
    events: usize,
    dead: Option<(&[String], &str)>,
    tag: &str,
) -> anyhow::Result<f64> {
    let mut routes: Vec<(String, String)> =
        (0..healthy).map(|i| (format!("h{i}.bench"), receiver.url.clone())).collect();
    if let Some((silent, failing)) = dead {
        routes.extend(silent.iter().enumerate().map(|(i, url)| (format!("s{i}.bench"), url.clone())));
        routes.push(("f0.bench".into(), failing.to_owned()));
    }
    let host =
        start("host.bench", Backend::Postgres, postgres_admin, &routes, TcpListener::bind("127.0.0.1:0")?).await?;
    let state = host.running.state.clone();
    let alice = ruma::UserId::parse("@alice:host.bench")?;
    let room = world_readable_room(&state, &alice).await?;
    let head = state.rooms.latest_stream_pos(&room).await?;
    insert_followers(&state.db, &room, Follows::Peeking, ("h", 0, healthy), head).await?;
    if let Some((silent, _)) = dead {
        insert_followers(&state.db, &room, Follows::Peeking, ("s", 0, silent.len()), head).await?;
        insert_followers(&state.db, &room, Follows::Peeking, ("f", 0, 1), head).await?;
    }
    let say = |body: String| {
        let (state, room, alice) = (state.clone(), room.clone(), alice.clone());
        async move {
            state.rooms.send(&room, &alice, "m.room.message", None, json!({ "msgtype": "m.text", "body": body })).await
        }
    };
    let n = healthy as u64;
    // Warm-up: connections and workers; the dead destinations are dead by the time of the burst.
    say(format!("{tag}-warm")).await?;
    receiver.wait_for(&format!("{tag}-warm"), n).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = now_ms();
    for i in 0..events {
        say(format!("{tag}-{i}")).await?;
    }
    let mut last = 0;
    for i in 0..events {
        last = last.max(receiver.wait_for(&format!("{tag}-{i}"), n).await?);
    }
    host.running.stop().await;
    Ok((last - started) as f64)
}

/// A peer that accepts connections and never answers; returns its URL.
fn silent_peer() -> anyhow::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let url = format!("http://{}", listener.local_addr()?);
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    Ok(url)
}

/// A peer that answers every request with 400 `M_UNKNOWN`; returns its URL.
fn failing_peer() -> anyhow::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let url = format!("http://{}", listener.local_addr()?);
    let server = HttpServer::new(|| {
        App::new().default_service(web::to(|| async {
            HttpResponse::BadRequest().json(json!({ "errcode": "M_UNKNOWN", "error": "always refused" }))
        }))
    })
    .workers(1)
    .disable_signals()
    .listen(listener)?
    .run();
    tokio::spawn(server);
    Ok(url)
}
