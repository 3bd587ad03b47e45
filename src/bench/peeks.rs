//! `peekgate bench peeks` (PostgreSQL): fan-out of one event to N peeking destinations, the
//! sustained delivery rate, authenticated renewal PUTs per second, the eviction sweep of 100,000
//! lapsed peeks and resident memory with 100,000 inbound peeks.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use diesel::prelude::*;
use ruma::{RoomId, ServerName, UserId};
use serde_json::{json, Value};

use super::{
    distinct_requests_script, encode, process_cpu_ns, processes_cpu_ms, remove_script, rss_mib, run_wrk, start,
    world_readable_room,
};
use peekgate::clock::now_ms;
use peekgate::db::{Backend, DbError};
use peekgate::federation::client::FedRequest;

/// The receiver child process; killed on drop.
pub(super) struct Receiver {
    pub(super) child: Child,
    pub(super) url: String,
    /// One client for every wait: `reqwest::get` would build a client (connector, TLS set-up)
    /// per call, inside the measured window.
    http: reqwest::Client,
}

impl Receiver {
    pub(super) fn spawn() -> anyhow::Result<Receiver> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["bench", "receiver", "--bind", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("start the receiver process")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("receiver stdout")?).read_line(&mut line)?;
        let url = line.trim().strip_prefix("listening on ").context("receiver did not start")?.to_owned();
        peekgate::app::install_crypto_provider();
        Ok(Receiver { child, url, http: reqwest::Client::new() })
    }

    /// Waits until `expected` PDUs with `marker` arrived; returns the arrival time of the last.
    /// The receiver holds each request until then (at most 10 s), so waiting is one request.
    pub(super) async fn wait_for(&self, marker: &str, expected: u64) -> anyhow::Result<i64> {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let stats: Value =
                self.http.get(format!("{}/wait/{marker}/{expected}", self.url)).send().await?.json().await?;
            let (count, last) = (stats["count"].as_u64().unwrap_or(0), stats["last_ms"].as_i64().unwrap_or(0));
            let refused = stats["refused"].as_u64().unwrap_or(0);
            anyhow::ensure!(refused == 0, "the receiver refused {refused} /send(s): a signature did not verify");
            if count >= expected {
                return Ok(last);
            }
            if Instant::now() > deadline {
                bail!("only {count} of {expected} deliveries of {marker}");
            }
        }
    }
}

impl Receiver {
    /// From now on the receiver verifies every `/send` with `server`'s key, as a homeserver
    /// would, and refuses any that does not verify.
    pub(super) async fn trust(&self, server: &str, key: &peekgate::keys::signing::SigningKey) -> anyhow::Result<()> {
        let trusted = json!({ "origin": server, "key_id": key.key_id(), "key": key.public_key_base64() });
        let answer = self.http.put(format!("{}/trust", self.url)).json(&trusted).send().await?;
        anyhow::ensure!(answer.status().is_success(), "the receiver did not take the key: {}", answer.status());
        Ok(())
    }

    /// How many `/send`s the receiver verified so far.
    pub(super) async fn verified(&self) -> anyhow::Result<u64> {
        let stats: Value = self.http.get(format!("{}/wait/-/0", self.url)).send().await?.json().await?;
        Ok(stats["verified"].as_u64().unwrap_or(0))
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sql_str(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// What `bench peeks` runs (see its command-line help).
pub struct PeeksOptions {
    pub destinations: usize,
    pub sustained: usize,
    pub wrk_seconds: u64,
    pub rounds: usize,
    pub appenders: usize,
    /// The receiver authenticates every `/send` (see `bench::receiver`).
    pub verify_signatures: bool,
    /// Of `destinations`, how many are joined servers rather than peekers.
    pub joined: usize,
}

pub async fn peeks(postgres_admin: &str, options: PeeksOptions) -> anyhow::Result<()> {
    let PeeksOptions { destinations, sustained, wrk_seconds, rounds, appenders, verify_signatures, joined } = options;
    anyhow::ensure!(rounds > 0 && appenders > 0, "--rounds and --appenders must be at least 1");
    anyhow::ensure!(joined <= destinations, "--joined cannot exceed --destinations");
    println!("peekgate bench peeks (release build: {}), PostgreSQL", !cfg!(debug_assertions));
    let receiver = Receiver::spawn()?;
    let host_listener = TcpListener::bind("127.0.0.1:0")?;
    let reader_listener = TcpListener::bind("127.0.0.1:0")?;
    let host_url = format!("http://{}", host_listener.local_addr()?);
    let reader_url = format!("http://{}", reader_listener.local_addr()?);
    let mut routes: Vec<(String, String)> =
        (0..destinations).map(|i| (format!("d{i}.bench"), receiver.url.clone())).collect();
    routes.push(("reader.bench".into(), reader_url));
    let host = start("host.bench", Backend::Postgres, postgres_admin, &routes, host_listener).await?;
    let reader = start(
        "reader.bench",
        Backend::Postgres,
        postgres_admin,
        &[("host.bench".into(), host_url.clone())],
        reader_listener,
    )
    .await?;
    let state = host.running.state.clone();
    if verify_signatures {
        receiver.trust("host.bench", &state.key).await?;
    }
    let alice = UserId::parse("@alice:host.bench")?;
    state.accounts.create_user(&alice, "bench password", false).await?;
    let room = world_readable_room(&state, &alice).await?;
    let head = state.rooms.latest_stream_pos(&room).await?;
    // d0..d{joined-1} are joined servers, the rest peek; all are "d{i}.bench" to the receiver.
    if joined > 0 {
        insert_followers(&state.db, &room, Follows::Joined, ("d", 0, joined), head).await?;
    }
    if joined < destinations {
        insert_followers(&state.db, &room, Follows::Peeking, ("d", joined, destinations - joined), head).await?;
    }
    println!("destinations: {} peeking, {joined} joined", destinations - joined);
    let say = {
        let (state, room, alice) = (state.clone(), room.clone(), alice.clone());
        move |body: String| {
            let (state, room, alice) = (state.clone(), room.clone(), alice.clone());
            async move {
                state
                    .rooms
                    .send(&room, &alice, "m.room.message", None, json!({ "msgtype": "m.text", "body": body }))
                    .await
            }
        }
    };
    let n = destinations as u64;

    // Warm-up: connections and workers.
    say("warm".into()).await?;
    receiver.wait_for("warm", n).await?;

    // 1. One event to N destinations: time from the append to the last 200, and the CPU this
    // process used meanwhile, over `rounds` events (one at a time, 100 ms apart).
    let mut times = Vec::new();
    let mut cpus = Vec::new();
    for round in 0..rounds {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let marker = format!("one-{round}");
        let cpu_before = process_cpu_ns();
        let sent_at = now_ms();
        say(marker.clone()).await?;
        let last = receiver.wait_for(&marker, n).await?;
        cpus.push((process_cpu_ns() - cpu_before) as f64 / 1e6);
        times.push((last - sent_at) as f64);
    }
    let mut slowest: Vec<(usize, f64)> = times.iter().copied().enumerate().collect();
    slowest.sort_by(|a, b| b.1.total_cmp(&a.1));
    times.sort_by(f64::total_cmp);
    cpus.sort_by(f64::total_cmp);
    let at = |sorted: &[f64], p: f64| sorted[((sorted.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "one event to {destinations} destinations, {rounds} rounds: append to the last 200 p50 {:.0} ms, p99 {:.0} ms (min {:.0}, max {:.0}); CPU of the gateway process p50 {:.1} ms (min {:.1}, p99 {:.1})",
        at(&times, 0.5), at(&times, 0.99), times[0], times[rounds - 1], at(&cpus, 0.5), cpus[0], at(&cpus, 0.99)
    );
    let slowest: Vec<String> = slowest.iter().take(5).map(|(round, ms)| format!("#{round} {ms:.0} ms")).collect();
    println!("the five slowest rounds: {}", slowest.join(", "));

    // 2. Sustained: `sustained` events sent by `appenders` concurrent clients through the client
    // API (`PUT /rooms/{roomId}/send`, as the clients of a busy server send them), all delivered
    // to every destination. Over HTTP they are handled by the server's HTTP workers, as real
    // clients' are, not by tasks queued behind the sender's on the gateway's runtime.
    let login = state.accounts.open_session(&alice, None, None).await?;
    let token = login.access_token;
    let client = reqwest::Client::new();
    let send_url = format!("{host_url}/_matrix/client/v3/rooms/{}/send/m.room.message", encode(room.as_str()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let receiver_pid = receiver.child.id();
    let others = || (processes_cpu_ms(|pid, _| pid == receiver_pid), processes_cpu_ms(|_, name| name == "postgres"));
    let series = |name: &str, label: &str| {
        state
            .metrics
            .render()
            .lines()
            .find(|l| l.starts_with(name) && l.contains(label))
            .and_then(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .unwrap_or(0.0)
    };
    let sent_transactions = || series("peekgate_federation_sent_transactions_total", "\"ok\"");
    let queue_transactions = || series("peekgate_federation_queue_transactions_total", "");
    let (transactions_before, queue_before) = (sent_transactions(), queue_transactions());
    let (receiver_before, postgres_before) = others();
    let gateway_before = process_cpu_ns();
    let started = now_ms();
    let senders: Vec<_> = (0..appenders)
        .map(|a| {
            let (client, send_url, token) = (client.clone(), send_url.clone(), token.clone());
            tokio::spawn(async move {
                for i in (a..sustained).step_by(appenders) {
                    let answer = client
                        .put(format!("{send_url}/s{i}"))
                        .bearer_auth(&token)
                        .json(&json!({ "msgtype": "m.text", "body": format!("s{i}") }))
                        .send()
                        .await?;
                    anyhow::ensure!(answer.status().is_success(), "send s{i}: {}", answer.status());
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for sender in senders {
        sender.await??;
    }
    let appended = now_ms();
    let mut last = 0;
    for i in 0..sustained {
        last = last.max(receiver.wait_for(&format!("s{i}"), n).await?);
    }
    let gateway_cpu = (process_cpu_ns() - gateway_before) as f64 / 1e9;
    let (receiver_after, postgres_after) = others();
    let secs = (last - started) as f64 / 1000.0;
    let transactions = sent_transactions() - transactions_before;
    println!(
        "sustained: CPU used meanwhile: gateway {gateway_cpu:.2} s, receiver {:.2} s, PostgreSQL {:.2} s, of {:.2} s on 2 cores; {transactions:.0} transactions, {:.1} events each, {:.0} of them from workers' own queue reads",
        (receiver_after - receiver_before) / 1000.0,
        (postgres_after - postgres_before) / 1000.0,
        2.0 * secs,
        (sustained as f64 * n as f64) / transactions.max(1.0),
        queue_transactions() - queue_before
    );
    println!(
        "sustained: {sustained} events from {appenders} concurrent clients (client API) to {destinations} destinations ({} PDUs) in {secs:.2} s = {:.0} events/s delivered ({:.0} PDUs/s); appending took {:.2} s",
        sustained as u64 * n,
        sustained as f64 / secs,
        sustained as f64 * n as f64 / secs,
        (appended - started) as f64 / 1000.0
    );
    if verify_signatures {
        println!(
            "receiver: {} /sends so far authenticated as a homeserver would (canonical body, X-Matrix signature), none refused",
            receiver.verified().await?
        );
    }

    // 3. Authenticated renewal PUTs: one real peek first (the host fetches the reader's keys).
    let host_name = <&ServerName>::try_from("host.bench")?;
    let path = format!("/_matrix/federation/v1/peek/{}/renew1?ver=10", encode(room.as_str()));
    let first = reader
        .running
        .state
        .federation
        .send(FedRequest {
            method: reqwest::Method::PUT,
            destination: host_name,
            path: &path,
            body: Some(json!({})),
            signed: true,
        })
        .await?;
    anyhow::ensure!(first.get("state").is_some(), "the first PUT creates the peek");
    let header = signed_put(&reader.running.state.key, &path);

    // Then wrk renews 1,000 distinct live peeks of the reader (inserted directly; each request
    // signed for its own path), so that batched renewals cannot fold repeats of one peek.
    let distinct = 1000;
    let now = now_ms();
    let room_sql = sql_str(room.as_str());
    state
        .db
        .run::<_, DbError, _>(move |conn| {
            diesel::sql_query(format!(
                "INSERT INTO inbound_peeks (origin, room_id, peek_id, created_ts, renewed_ts, renewal_interval_ms, expires_ts, start_stream_pos) \
                 SELECT 'reader.bench', {room_sql}, 'r' || g, {now}, {now}, 3600000, {}, 0 FROM generate_series(0, {}) g",
                now + 3_900_000,
                distinct - 1
            ))
            .execute(conn)?;
            Ok(())
        })
        .await?;
    // Each peek renewed under several distinct URIs (a query parameter the server ignores), so
    // no request repeats within the run.
    let variants = (wrk_seconds as usize * 20).max(1);
    let mut requests = Vec::with_capacity(distinct * variants);
    for v in 0..variants {
        for i in 0..distinct {
            let path = format!("/_matrix/federation/v1/peek/{}/r{i}?ver=10&n={v}", encode(room.as_str()));
            let header = signed_put(&reader.running.state.key, &path);
            requests.push((path, header));
        }
    }
    let script = distinct_requests_script("renew", "PUT", Some("{}"), &requests)?;
    run_wrk(
        &format!("renewal PUT, {distinct} distinct peeks, {} distinct requests", requests.len()),
        &format!("{host_url}{path}"),
        &header,
        wrk_seconds,
        64,
        Some(&script),
    )?;
    remove_script(&script);
    let renewals = state.metrics.render();
    let ok_line = renewals
        .lines()
        .find(|l| l.starts_with("peekgate_peek_renewals_total") && l.contains("inbound") && l.contains("\"ok\""));
    println!("renewal PUT: server-side counter {}", ok_line.unwrap_or("(missing)"));

    // 4 and 5. 100,000 inbound peeks: memory while serving, then the eviction sweep once lapsed.
    let big = 100_000;
    let head = state.rooms.latest_stream_pos(&room).await?;
    let rss_before = rss_mib();
    let t = Instant::now();
    insert_followers(&state.db, &room, Follows::Peeking, ("x", 0, big), head).await?;
    let inserted = t.elapsed();
    let live = state.inbound.live_count().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "memory: RSS of the bench process {rss_before:.0} MiB before and {:.0} MiB with {live} live inbound peeks (inserted in {:.1?}; the process also runs the reader server)",
        rss_mib(),
        inserted
    );
    // The eviction sweep on its own: the gateway is stopped first, so its sender does not start
    // delivering the 100,000 expired_peeks notices to servers that do not exist while we time it.
    let settings = state.settings.clone();
    reader.running.stop().await;
    host.running.stop().await;
    let bare = peekgate::app::build_state(settings, None).await?;
    bare.db
        .run::<_, DbError, _>(|conn| {
            diesel::sql_query("UPDATE inbound_peeks SET expires_ts = 0 WHERE origin LIKE 'x%'").execute(conn)?;
            // The UPDATE leaves a dead copy of every row; on a running server autovacuum
            // clears those (peeks lapse by time passing, not in one statement) before a sweep.
            diesel::sql_query("VACUUM ANALYZE inbound_peeks").execute(conn)?;
            diesel::sql_query("ANALYZE").execute(conn)?;
            Ok(())
        })
        .await?;
    let t = Instant::now();
    let (lapsed, _) = peekgate::schedule::evict_inbound(&bare.jobs()).await?;
    println!(
        "eviction sweep: {lapsed} lapsed peeks evicted (and expired_peeks queued) in {} ms",
        t.elapsed().as_millis()
    );
    drop(bare);
    Ok(())
}

/// How a bench destination follows the room.
#[derive(Clone, Copy)]
pub(super) enum Follows {
    /// A live peek.
    Peeking,
    /// A joined span from the head on, as the membership hooks record a remote join.
    Joined,
}

/// Inserts `count` destinations `{prefix}{i}.bench` from `i = from` that follow `room` from
/// `head` on, with their cursors at `head`.
pub(super) async fn insert_followers(
    db: &peekgate::db::Db,
    room: &RoomId,
    follows: Follows,
    (prefix, from, count): (&'static str, usize, usize),
    head: i64,
) -> anyhow::Result<()> {
    let room = sql_str(room.as_str());
    let (first, last) = (from, from + count - 1);
    let now = now_ms();
    let subscriptions = match follows {
        Follows::Peeking => {
            let expires = now + 3_900_000;
            format!(
                "INSERT INTO inbound_peeks (origin, room_id, peek_id, created_ts, renewed_ts, renewal_interval_ms, expires_ts, start_stream_pos) \
                 SELECT '{prefix}' || g || '.bench', {room}, 'p', {now}, {now}, 3600000, {expires}, {head} FROM generate_series({first}, {last}) g"
            )
        }
        Follows::Joined => format!(
            "INSERT INTO joined_servers (room_id, server_name, start_stream_pos) \
             SELECT {room}, '{prefix}' || g || '.bench', {head} FROM generate_series({first}, {last}) g"
        ),
    };
    insert_destinations(db, subscriptions, prefix, first, last, head).await
}

/// Runs `subscriptions` (an insert of peeks or joined spans) and adds the destinations
/// `{prefix}{first..=last}.bench` with their cursors at `head`.
async fn insert_destinations(
    db: &peekgate::db::Db,
    subscriptions: String,
    prefix: &'static str,
    first: usize,
    last: usize,
    head: i64,
) -> anyhow::Result<()> {
    db.run::<_, DbError, _>(move |conn| {
        diesel::sql_query(subscriptions).execute(conn)?;
        diesel::sql_query(format!(
            "INSERT INTO destinations (server_name, last_sent_pos) SELECT '{prefix}' || g || '.bench', {head} FROM generate_series({first}, {last}) g"
        ))
        .execute(conn)?;
        // Planner statistics as autovacuum keeps them on a running server.
        diesel::sql_query("ANALYZE").execute(conn)?;
        Ok(())
    })
    .await?;
    Ok(())
}

/// The X-Matrix header of the reader's `PUT {path}` with body `{}` to the host.
fn signed_put(key: &peekgate::keys::SigningKey, path: &str) -> String {
    peekgate::xmatrix::authorization_header(key, "reader.bench", "host.bench", "PUT", path, Some("{}"))
}
