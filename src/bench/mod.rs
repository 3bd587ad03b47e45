//! `peekgate bench ...`: printed figures for BENCHMARKS.md (build with `--release`). Part of the
//! binary, not the library: it drives the library from outside, as an operator would. Each
//! benchmark runs in-process servers on 127.0.0.1 on throwaway databases.

mod dead_peers;
mod joins;
mod peeks;
mod receiver;
mod rooms;
mod signing;
mod sync;

use std::net::TcpListener;
use std::time::Duration;

use anyhow::Context;
use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection};

pub use dead_peers::dead_peers;
pub use joins::joins;
pub use peeks::{peeks, PeeksOptions};
pub use receiver::receiver;
pub use rooms::rooms;
pub use signing::signing;
pub use sync::sync;

use peekgate::app::{self, Listeners, RunningServer};
use peekgate::config::Config;
use peekgate::db::Backend;

/// CPU time used by this process so far (all threads, user and system), in nanoseconds. One
/// `clock_gettime` call: reading it costs the measured process next to nothing.
pub(super) fn process_cpu_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid, writable timespec; the clock ID is a constant Linux knows.
    let result = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut now) };
    if result != 0 {
        return 0;
    }
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// CPU time in ms (user and system, from /proc, 10 ms resolution) used so far by the other
/// processes `wanted` picks by PID and command name: the receiver, PostgreSQL's backends.
pub(super) fn processes_cpu_ms(wanted: impl Fn(u32, &str) -> bool) -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let mut ticks = 0u64;
    for entry in entries.filter_map(Result::ok) {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // `pid (comm) state ppid ...`: utime and stime are the 12th and 13th fields after comm.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        if !wanted(pid, &stat[open + 1..close]) {
            continue;
        }
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        ticks += field(11) + field(12);
    }
    ticks as f64 * 1000.0 / ticks_per_second
}

/// Resident memory of this process, in MiB, from /proc.
pub(super) fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// A database that exists for one benchmark run.
pub(super) struct ScratchDb {
    pub(super) url: String,
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
    pub(super) fn new(backend: Backend, postgres_admin: &str) -> anyhow::Result<ScratchDb> {
        match backend {
            Backend::Postgres => {
                let name = format!("peekgate_bench_{}", random_suffix());
                let mut conn = PgConnection::establish(postgres_admin).context("connect to PostgreSQL")?;
                conn.batch_execute(&format!("CREATE DATABASE {name}"))?;
                // The scratch database's URL keeps the admin URL's query (`?sslmode=disable`).
                let (path, query) = match postgres_admin.split_once('?') {
                    Some((path, query)) => (path, format!("?{query}")),
                    None => (postgres_admin, String::new()),
                };
                let base = path.rsplit_once('/').map(|(b, _)| b).unwrap_or(path);
                Ok(ScratchDb {
                    url: format!("{base}/{name}{query}"),
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

pub(super) struct BenchServer {
    pub(super) running: RunningServer,
    _db: ScratchDb,
    _dir: tempfile_dir::Dir,
}

pub(super) async fn start(
    name: &str,
    backend: Backend,
    postgres_admin: &str,
    destinations: &[(String, String)],
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
    for (server, url) in destinations {
        config.federation.destinations.insert(server.clone(), url.clone());
    }
    let settings = config.validate()?;
    let state = app::build_state(settings, None).await?;
    let running = app::start(state, Listeners { http, tls: None, metrics: None })?;
    Ok(BenchServer { running, _db: db, _dir: dir })
}

/// Planner statistics as autovacuum keeps them on a running server: without them the figures
/// depend on whether autoanalyze happened to run yet.
pub(super) async fn analyze(state: &peekgate::state::AppState) -> anyhow::Result<()> {
    state
        .db
        .run::<_, peekgate::db::DbError, _>(|conn| {
            diesel::connection::SimpleConnection::batch_execute(conn, "ANALYZE")?;
            Ok(())
        })
        .await?;
    Ok(())
}

/// A world-readable public room created by `creator` on `state`'s server.
pub(super) async fn world_readable_room(
    state: &peekgate::state::AppState,
    creator: &ruma::UserId,
) -> anyhow::Result<ruma::OwnedRoomId> {
    let request = peekgate::rooms::CreateRoomRequest {
        preset: Some("public_chat".into()),
        initial_state: vec![peekgate::rooms::InitialStateEvent {
            kind: "m.room.history_visibility".into(),
            state_key: String::new(),
            content: serde_json::json!({ "history_visibility": "world_readable" }),
        }],
        ..peekgate::rooms::CreateRoomRequest::default()
    };
    Ok(state.rooms.create_room(creator, request).await?)
}

pub(super) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

pub(super) fn encode(segment: &str) -> String {
    url::form_urlencoded::byte_serialize(segment.as_bytes()).collect()
}

/// A wrk script that sends each of `requests` (path and query, `Authorization` header) once
/// before any repeats, split between wrk's two threads, so that no request in a throughput run
/// can reuse another's result. The requests go to a data file read at start-up (a script of
/// 100,000 literals is beyond LuaJIT's constants limit). Returns the script's path; the data
/// file sits beside it.
pub(super) fn distinct_requests_script(
    name: &str,
    method: &str,
    body: Option<&str>,
    requests: &[(String, String)],
) -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir();
    let data = dir.join(format!("peekgate-{name}-{}.txt", std::process::id()));
    let script = dir.join(format!("peekgate-{name}-{}.lua", std::process::id()));
    let mut lines = String::new();
    for (path, header) in requests {
        anyhow::ensure!(!path.contains('\t') && !header.contains('\t'), "tab in a request");
        lines += &format!("{path}\t{header}\n");
    }
    std::fs::write(&data, lines)?;
    let headers = match body {
        Some(_) => "{ [\"Authorization\"] = header, [\"Content-Type\"] = \"application/json\" }",
        None => "{ [\"Authorization\"] = header }",
    };
    let body = body.map(|b| format!("{b:?}")).unwrap_or_else(|| "nil".into());
    std::fs::write(
        &script,
        format!(
            "local threads = 0\n\
             function setup(thread)\n\
               thread:set(\"id\", threads)\n\
               threads = threads + 1\n\
             end\n\
             requests = {{}}\n\
             counter = 0\n\
             function init(args)\n\
               local n = 0\n\
               for line in io.lines({data:?}) do\n\
                 if n % 2 == id then\n\
                   local path, header = line:match(\"([^\\t]*)\\t(.*)\")\n\
                   requests[#requests + 1] = wrk.format({method:?}, path, {headers}, {body})\n\
                 end\n\
                 n = n + 1\n\
               end\n\
             end\n\
             function request()\n\
               counter = counter % #requests + 1\n\
               return requests[counter]\n\
             end\n"
        ),
    )?;
    Ok(script)
}

/// Removes a script of [`distinct_requests_script`] and its data file.
pub(super) fn remove_script(script: &std::path::Path) {
    let _ = std::fs::remove_file(script.with_extension("txt"));
    let _ = std::fs::remove_file(script);
}

/// Runs wrk (when installed) with the pre-signed header and prints its throughput line.
pub(super) fn run_wrk(
    label: &str,
    url: &str,
    header: &str,
    seconds: u64,
    connections: u32,
    script: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let mut command = std::process::Command::new("wrk");
    command.args([
        "-t2",
        &format!("-c{connections}"),
        &format!("-d{seconds}s"),
        "--latency",
        "-H",
        &format!("Authorization: {header}"),
    ]);
    if let Some(script) = script {
        command.arg("-s").arg(script);
    }
    let output = command.arg(url).output();
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
                    println!("{label} (wrk -t2 -c{connections} -d{seconds}s): {line}");
                }
            }
            Ok(())
        }
        Ok(output) => anyhow::bail!("wrk failed: {}", String::from_utf8_lossy(&output.stderr)),
        Err(e) => {
            println!("{label}: wrk not found ({e}); install it (apt-get install wrk) to measure throughput");
            Ok(())
        }
    }
}
