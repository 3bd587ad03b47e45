//! `peekgate bench rooms`: measured figures for the room store and the federation read path,
//! printed for BENCHMARKS.md. Runs two in-process servers on 127.0.0.1 (the host and a
//! non-member reader) on a throwaway database of each backend. Build with `--release`.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use anyhow::Context;
use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection};
use ruma::{OwnedRoomId, ServerName, UserId};
use serde_json::json;

use crate::app::{self, Listeners, RunningServer};
use crate::config::Config;
use crate::db::Backend;
use crate::rooms::CreateRoomRequest;

/// A database that exists for one benchmark run.
struct ScratchDb {
    url: String,
    admin: Option<(String, String)>,
    _dir: Option<tempfile_dir::Dir>,
}

/// A tiny temp-dir helper (the bench is part of the binary; no dev-dependencies here).
mod tempfile_dir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new(prefix: &str) -> std::io::Result<Dir> {
            let path = std::env::temp_dir().join(format!("{prefix}-{}", super::random_suffix()));
            std::fs::create_dir_all(&path)?;
            Ok(Dir(path))
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn random_suffix() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric.sample_string(&mut rand::rng(), 10).to_lowercase()
}

impl ScratchDb {
    fn new(backend: Backend, postgres_admin: &str) -> anyhow::Result<ScratchDb> {
        match backend {
            Backend::Postgres => {
                let name = format!("peekgate_bench_{}", random_suffix());
                let mut conn = PgConnection::establish(postgres_admin).context("connect to PostgreSQL")?;
                conn.batch_execute(&format!("CREATE DATABASE {name}"))?;
                let base = postgres_admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(postgres_admin);
                Ok(ScratchDb {
                    url: format!("{base}/{name}"),
                    admin: Some((postgres_admin.to_owned(), name)),
                    _dir: None,
                })
            }
            Backend::Sqlite => {
                let dir = tempfile_dir::Dir::new("peekgate-bench")?;
                let url = format!("sqlite://{}", dir.0.join("bench.sqlite").display());
                Ok(ScratchDb { url, admin: None, _dir: Some(dir) })
            }
        }
    }
}

impl Drop for ScratchDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = &self.admin {
            if let Ok(mut conn) = PgConnection::establish(admin) {
                let _ = conn.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
            }
        }
    }
}

struct BenchServer {
    running: RunningServer,
    _db: ScratchDb,
    _dir: tempfile_dir::Dir,
}

async fn start(
    name: &str,
    backend: Backend,
    postgres_admin: &str,
    peer: Option<(&str, String)>,
    http: TcpListener,
) -> anyhow::Result<BenchServer> {
    let db = ScratchDb::new(backend, postgres_admin)?;
    let dir = tempfile_dir::Dir::new("peekgate-bench-key")?;
    let mut config = Config { server_name: name.to_owned(), ..Config::default() };
    config.database.url = db.url.clone();
    config.database.pool_size = 8;
    config.signing.key_path = dir.0.join("signing.key");
    config.http.bind = "127.0.0.1:0".into();
    config.metrics.bind = String::new();
    config.log.filter = "warn".into();
    if let Some((peer_name, url)) = peer {
        config.federation.destinations.insert(peer_name.to_owned(), url);
    }
    let settings = config.validate()?;
    let state = app::build_state(settings, None).await?;
    let running = app::start(state, Listeners { http, tls: None, metrics: None })?;
    Ok(BenchServer { running, _db: db, _dir: dir })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

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
    let host = start("host.bench", backend, postgres_admin, Some(("reader.bench", reader_url)), host_listener).await?;
    let reader =
        start("reader.bench", backend, postgres_admin, Some(("host.bench", host_url.clone())), reader_listener).await?;
    let state = host.running.state.clone();
    let alice = UserId::parse("@alice:host.bench")?;
    let request = CreateRoomRequest {
        preset: Some("public_chat".into()),
        initial_state: vec![crate::rooms::InitialStateEvent {
            kind: "m.room.history_visibility".into(),
            state_key: String::new(),
            content: json!({ "history_visibility": "world_readable" }),
        }],
        ..CreateRoomRequest::default()
    };
    let room: OwnedRoomId = state.rooms.create_room(&alice, request).await?;

    // 1. Appends: sequential messages through the append path (sign, authorise, store).
    let started = Instant::now();
    for i in 0..appends {
        state
            .rooms
            .send(&room, &alice, "m.room.message", None, json!({ "msgtype": "m.text", "body": format!("m{i}") }))
            .await?;
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

    // 3. Signed GET /event from the non-member reader, warm key cache, load from wrk.
    let path = format!("/_matrix/federation/v1/event/{event_enc}");
    client.get(host_name, &path).await?;
    let header = crate::xmatrix::authorization_header(
        &reader.running.state.key,
        "reader.bench",
        "host.bench",
        "GET",
        &path,
        None,
    );
    run_wrk(&format!("{host_url}{path}"), &header, wrk_seconds)?;

    reader.running.stop().await;
    host.running.stop().await;
    Ok(())
}

fn encode(segment: &str) -> String {
    url::form_urlencoded::byte_serialize(segment.as_bytes()).collect()
}

/// Runs wrk (when installed) with the pre-signed header and prints its throughput line.
fn run_wrk(url: &str, header: &str, seconds: u64) -> anyhow::Result<()> {
    let output = std::process::Command::new("wrk")
        .args(["-t2", "-c64", &format!("-d{seconds}s"), "--latency", "-H", &format!("Authorization: {header}"), url])
        .output();
    match output {
        Ok(output) if output.status.success() => {
            let text = String::from_utf8_lossy(&output.stdout);
            for line in text.lines() {
                let line = line.trim();
                if line.starts_with("Requests/sec")
                    || line.starts_with("50%")
                    || line.starts_with("99%")
                    || line.contains("requests in")
                    || line.starts_with("Non-2xx")
                {
                    println!("GET /event (wrk -t2 -c64 -d{seconds}s): {line}");
                }
            }
            Ok(())
        }
        Ok(output) => anyhow::bail!("wrk failed: {}", String::from_utf8_lossy(&output.stderr)),
        Err(e) => {
            println!("GET /event: wrk not found ({e}); install it (apt-get install wrk) to measure throughput");
            Ok(())
        }
    }
}
