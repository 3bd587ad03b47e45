//! Issue #11, the reliability suite: the gateway killed with SIGKILL in the middle of fan-out,
//! PostgreSQL restarted under a running gateway, and three instances on one database with the
//! delivering one killed. Acknowledged events are never lost: every
//! peer gets every one, in order (repeats after a crash are allowed, gaps are not).

mod support;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Method;
use serde_json::json;
use support::client::{enc, request, Client};
use support::peer::{KeyMode, TestPeer};
use support::peer_room::PeerRoom;
use support::pg_cluster::PgCluster;
use support::process::{get_json, spawn_serve};
use support::{wait_until, DbKind, ServerSpec, TestDb, TestServer};

const GW: &str = "gw.test";

/// The events of `sent` in the order `peer` first received them.
fn first_arrivals(peer: &TestPeer, sent: &[String]) -> Vec<String> {
    let mut seen = Vec::new();
    for id in peer.inbox.event_ids("10") {
        if sent.contains(&id) && !seen.contains(&id) {
            seen.push(id);
        }
    }
    seen
}

async fn peek(peer: &TestPeer, base: &str, room: &str, peek_id: &str) {
    let path = format!("/_matrix/federation/v1/peek/{}/{peek_id}?ver=10", enc(room));
    let (status, answer) = peer.call(base, GW, Method::PUT, &path, Some(&json!({}))).await;
    assert_eq!(status, 200, "{answer}");
}

/// A gateway started from `spec` (open registration, `peer` one of its destinations), alice's
/// world-readable room on it, and `peer` peeking that room.
async fn peeked_room(spec: ServerSpec, peer: &TestPeer) -> (TestServer, Client, String) {
    let gw = spec.configure(|c| c.client.registration = "open".into()).destination(&peer.name, &peer.url).start().await;
    peer.trust(GW, &gw.base);
    let alice = Client::register(&gw.base, "alice").await;
    let room = alice.create_world_readable_room("lobby", "10").await;
    peek(peer, &gw.base, &room, "p1").await;
    (gw, alice, room)
}

/// A configuration file for `serve` on `db` that knows `peers`, with a short sender lease so
/// that a restarted process takes over the dead one's destinations quickly.
fn write_config(dir: &Path, db_url: &str, peers: &[&TestPeer]) -> std::path::PathBuf {
    let config = dir.join("peekgate.toml");
    let mut text = format!(
        "server_name = \"{GW}\"\n[database]\nurl = \"{db_url}\"\n[signing]\nkey_path = \"{}\"\n\
         [client]\nregistration = \"open\"\n[federation]\nsender_lease_ms = 1000\n[federation.destinations]\n",
        dir.join("signing.key").display()
    );
    for peer in peers {
        text.push_str(&format!("\"{}\" = \"{}\"\n", peer.name, peer.url));
    }
    std::fs::write(&config, text).unwrap();
    config
}

/// kill -9 of the gateway while transactions to three slow peers are in flight, on
/// PostgreSQL; started again on the same database, it delivers the rest: every acknowledged
/// event reaches every peer, in order per peer.
#[test]
fn sigkill_during_fan_out_to_three_peers_loses_nothing() {
    support::run_async(sigkill_during_fan_out());
}

async fn sigkill_during_fan_out() {
    let db = TestDb::new(DbKind::Postgres);
    let peers: Vec<TestPeer> =
        ["p1.test", "p2.test", "p3.test"].iter().map(|name| TestPeer::start(name, KeyMode::Good)).collect();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &db.url, &peers.iter().collect::<Vec<_>>());
    let start = || async {
        let (child, http_port, _) = spawn_serve(dir.path(), Some(&config));
        let base = format!("http://127.0.0.1:{http_port}");
        let url = format!("{base}/_matrix/key/v2/server");
        wait_until("serve answers", || async { get_json(&url).await.is_some() }).await;
        for peer in &peers {
            peer.trust(GW, &base);
        }
        (child, base)
    };

    let (mut first, base) = start().await;
    let alice = Client::register(&base, "alice").await;
    let room = alice.create_world_readable_room("lobby", "10").await;
    for (i, peer) in peers.iter().enumerate() {
        peek(peer, &base, &room, &format!("k{i}")).await;
        // Each transaction takes the peer 1.5 s to answer.
        peer.inbox.send_delay_ms.store(1500, std::sync::atomic::Ordering::SeqCst);
    }
    // The first event's transactions are in flight (one per destination at a time), then the
    // rest is appended and acknowledged, and the gateway is killed before it can send them.
    let mut sent = vec![alice.say(&room, "m0").await];
    wait_until("transactions in flight", || async {
        peers.iter().all(|p| p.inbox.attempts.load(std::sync::atomic::Ordering::SeqCst) > 0)
    })
    .await;
    for i in 1..30 {
        sent.push(alice.say(&room, &format!("m{i}")).await);
    }
    first.kill().unwrap(); // SIGKILL: no shutdown, nothing flushed
    first.wait().unwrap();
    assert!(
        peers.iter().any(|p| first_arrivals(p, &sent).len() < sent.len()),
        "the kill came before everything was delivered"
    );

    for peer in &peers {
        peer.inbox.send_delay_ms.store(0, std::sync::atomic::Ordering::SeqCst);
    }
    let (mut second, _) = start().await;
    for peer in &peers {
        wait_until("every acknowledged event after the restart", || async {
            first_arrivals(peer, &sent).len() == sent.len()
        })
        .await;
        assert_eq!(first_arrivals(peer, &sent), sent, "{}: in order", peer.name);
        assert!(peer.inbox.problems.lock().unwrap().is_empty(), "{:?}", peer.inbox.problems.lock().unwrap());
    }
    let _ = second.kill();
    let _ = second.wait();
}

/// PostgreSQL stops (immediate shutdown: connections cut) under a running gateway and comes
/// back: `/ready` says the database is unreachable meanwhile, a message sent meanwhile gets a
/// Matrix error or is stored, and afterwards the gateway works again by itself; every
/// acknowledged event reaches the peeker, in order.
#[test]
fn postgres_restart_under_traffic_loses_nothing() {
    support::run_async(postgres_restart());
}

async fn postgres_restart() {
    let cluster = PgCluster::start();
    let url = cluster.create_database("peekgate");
    let peer = TestPeer::start("peeker.test", KeyMode::Good);
    let spec = ServerSpec::new(GW, DbKind::Postgres).configure(move |c| c.database.url = url);
    let (gw, alice, room) = peeked_room(spec, &peer).await;
    let mut acknowledged = Vec::new();
    for i in 0..5 {
        acknowledged.push(alice.say(&room, &format!("before {i}")).await);
    }

    cluster.stop();
    wait_until("/ready reports the database unreachable", || async {
        let (status, answer) = request(&gw.base, None, Method::GET, "/ready", None).await;
        status == 503 && answer["database"] == "unreachable"
    })
    .await;
    let (status, answer) = alice.send_message(&room, "during-outage", "during the outage").await;
    if status == 200 {
        acknowledged.push(answer["event_id"].as_str().unwrap().to_owned());
    } else {
        assert!(answer["errcode"].is_string(), "a Matrix error while the database is away: {status} {answer}");
    }

    cluster.resume();
    wait_until("/ready again", || async { request(&gw.base, None, Method::GET, "/ready", None).await.0 == 200 }).await;
    for i in 0..5 {
        let (status, answer) = alice.send_message(&room, &format!("after-{i}"), &format!("after {i}")).await;
        assert_eq!(status, 200, "{answer}");
        acknowledged.push(answer["event_id"].as_str().unwrap().to_owned());
    }
    wait_until("every acknowledged event reaches the peeker", || async {
        first_arrivals(&peer, &acknowledged).len() == acknowledged.len()
    })
    .await;
    assert_eq!(first_arrivals(&peer, &acknowledged), acknowledged, "in order");
    assert!(peer.inbox.problems.lock().unwrap().is_empty(), "{:?}", peer.inbox.problems.lock().unwrap());
    gw.stop().await;
    peer.stop().await;
}

/// The lease owner of a destination (an instance ID, `<pid>-<random>`), read from the database.
/// Waits until `destination`'s worker stopped and the manager released its lease.
async fn lease_released(db_url: &str, destination: &str) {
    wait_until("the worker stopped and its lease was released", || async {
        lease_owner(db_url, destination).is_none()
    })
    .await;
}

fn lease_owner(db_url: &str, destination: &str) -> Option<String> {
    use diesel::prelude::*;
    use peekgate::db::schema::destinations;
    let mut conn = diesel::PgConnection::establish(db_url).unwrap();
    destinations::table
        .find(destination)
        .select(destinations::lease_owner)
        .first::<Option<String>>(&mut conn)
        .optional()
        .unwrap()
        .flatten()
}

/// H4: a gateway that stops cleanly releases its destinations' leases (the sender's manager,
/// for all its stopped workers in one statement), so that another instance takes them over at
/// once instead of when they run out.
#[test]
fn a_clean_stop_releases_the_destination_leases() {
    support::run_async(clean_stop());
}

async fn clean_stop() {
    let peer = TestPeer::start("peeker.test", KeyMode::Good);
    let (mut gw, alice, room) = peeked_room(ServerSpec::new(GW, DbKind::Postgres), &peer).await;
    let sent = alice.say(&room, "hello").await;
    wait_until("the peeker has the event", || async { peer.inbox.event_ids("10").contains(&sent) }).await;
    let url = gw.db.url.clone();
    assert!(lease_owner(&url, "peeker.test").is_some(), "the delivering instance holds the lease");
    gw.stop_running().await;
    assert_eq!(lease_owner(&url, "peeker.test"), None, "released at the stop");
    gw.stop().await;
    peer.stop().await;
}

/// `federation.sender_idle_ms`: a destination's worker with nothing to send stops, and the
/// manager releases its lease; the next event for the destination starts a worker again, which
/// takes the lease and delivers it. Twice, so that a restarted worker also stops.
#[test]
fn an_idle_worker_stops_and_a_new_one_starts_for_new_work() {
    support::run_async(idle_worker());
}

async fn idle_worker() {
    let peer = TestPeer::start("peeker.test", KeyMode::Good);
    let spec = ServerSpec::new(GW, DbKind::Postgres).configure(|c| c.federation.sender_idle_ms = 300);
    let (gw, alice, room) = peeked_room(spec, &peer).await;
    let url = gw.db.url.clone();
    for body in ["first", "second", "third"] {
        let sent = alice.say(&room, body).await;
        wait_until("the peeker has the event", || async { peer.inbox.event_ids("10").contains(&sent) }).await;
        lease_released(&url, "peeker.test").await;
    }
    gw.stop().await;
    peer.stop().await;
}

/// A worker whose idle time runs out just as the fan-out hands it a body sends that body before
/// it stops. The fan-out counts the body as the worker's; before, it stayed in the stopped
/// worker's channel and the destination waited for the full scan (30 s). Forced with two pause
/// points: the worker held at its idle stop, the manager held right after the hand-off.
#[test]
fn a_body_handed_to_a_worker_going_idle_is_sent_before_it_stops() {
    support::run_async(handed_while_going_idle());
}

async fn handed_while_going_idle() {
    use peekgate::pause::{self, points};
    // A destination name of this test's own: pause points are armed per subject, process-wide.
    let peer = TestPeer::start("idler.test", KeyMode::Good);
    let spec = ServerSpec::new(GW, DbKind::Postgres).configure(|c| c.federation.sender_idle_ms = 300);
    let (gw, alice, room) = peeked_room(spec, &peer).await;
    let first = alice.say(&room, "first").await;
    wait_until("the peeker has the first event", || async { peer.inbox.event_ids("10").contains(&first) }).await;

    let idle = pause::hold(points::SENDER_WORKER_IDLE, "idler.test");
    idle.reached().await;
    let handed = pause::hold(points::SENDER_BODY_HANDED, "idler.test");
    let second = alice.say(&room, "second").await;
    handed.reached().await;
    idle.release();
    handed.release();

    lease_released(&gw.db.url, "idler.test").await;
    assert!(
        peer.inbox.event_ids("10").contains(&second),
        "the body handed over as the worker went idle was sent before the worker stopped"
    );
    gw.stop().await;
    peer.stop().await;
}

/// Three instances on one PostgreSQL, and the one delivering to a slow peeker is killed with
/// SIGKILL mid-delivery: another takes the destination over and delivers everything, in order;
/// the transactions the peeker received come from one sender at a time (the dead one's, then
/// the new owner's, never interleaved); renewals go on through the others; and lapsed peeks are
/// evicted exactly once over all three instances, and a remote room a local device peeks is
/// renewed by one instance at a time (never twice at once).
#[test]
fn three_instances_one_killed_mid_delivery() {
    support::run_async(three_instances());
}

async fn three_instances() {
    use diesel::prelude::*;
    let db = TestDb::new(DbKind::Postgres);
    let peer = TestPeer::start("peeker.test", KeyMode::Good);
    let host = TestPeer::start("one.test", KeyMode::Good);
    let hosted = Arc::new(Mutex::new(PeerRoom::create(&host, "host")));
    let remote_room = hosted.lock().unwrap().room_id.clone();
    *host.inbox.hosted.lock().unwrap() = Some(hosted);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &db.url, &[&peer, &host]);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("[schedule]\nevict_inbound = \"* * * * * *\"\nrenew_outbound = \"* * * * * *\"\n");
    std::fs::write(&config, text).unwrap();
    let mut instances = Vec::new();
    for _ in 0..3 {
        let (child, http_port, metrics_port) = spawn_serve(dir.path(), Some(&config));
        let base = format!("http://127.0.0.1:{http_port}");
        let url = format!("{base}/_matrix/key/v2/server");
        wait_until("serve answers", || async { get_json(&url).await.is_some() }).await;
        instances.push((child, base, metrics_port));
    }
    peer.trust(GW, &instances[0].1);
    host.trust(GW, &instances[0].1);
    let alice = Client::register(&instances[0].1, "alice").await;
    let room = alice.create_world_readable_room("lobby", "10").await;
    peek(&peer, &instances[0].1, &room, "live").await;

    // Lapsed peeks are evicted once, by whichever instance claims them.
    for i in 0..6 {
        peek(&peer, &instances[1].1, &room, &format!("lapse{i}")).await;
    }
    let mut conn = diesel::PgConnection::establish(&db.url).unwrap();
    diesel::sql_query("UPDATE inbound_peeks SET expires_ts = 0 WHERE peek_id LIKE 'lapse%'")
        .execute(&mut conn)
        .unwrap();
    let evictions = || async {
        let mut total = 0.0;
        for (_, _, metrics_port) in &instances {
            let text =
                reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics")).await.unwrap().text().await.unwrap();
            total += support::metric_value(&text, "peekgate_peek_evictions_total{reason=\"lapsed\"}");
        }
        total
    };
    wait_until("the lapsed peeks are evicted", || async { evictions().await >= 6.0 }).await;
    tokio::time::sleep(Duration::from_millis(2500)).await; // two more runs of the job on each instance
    assert_eq!(evictions().await, 6.0, "each lapsed peek is evicted once over the three instances");

    // A local device peeks a room of one.test (renewal interval 2 s: renewed every second by
    // whichever instance claims it). Two instances renewing at once would show as two PUTs
    // within moments of each other; one at a time, they are about a second apart.
    let bob = Client::register(&instances[2].1, "bob").await;
    bob.sync(None, 0).await;
    assert_eq!(bob.peek(&remote_room, &[]).await.0, 200);
    wait_until("four renewals", || async { host.inbox.peek_put_times.lock().unwrap().len() >= 5 }).await;
    let puts = host.inbox.peek_put_times.lock().unwrap().clone();
    let closest = puts.windows(2).map(|pair| pair[1] - pair[0]).min().unwrap();
    assert!(closest >= Duration::from_millis(400), "two renewals {closest:?} apart: renewed twice at once");

    // Delivery to a slow peeker (1.5 s per transaction): the first event's transaction is in
    // flight, the rest is appended, and the instance holding the destination is killed before
    // it can send them. The delay stays: a transaction the dead instance had in flight is then
    // recorded before any of its successor's.
    peer.inbox.send_delay_ms.store(1500, std::sync::atomic::Ordering::SeqCst);
    let attempts_before = peer.inbox.attempts.load(std::sync::atomic::Ordering::SeqCst);
    let mut sent = vec![alice.say(&room, "m0").await];
    wait_until("a transaction in flight", || async {
        peer.inbox.attempts.load(std::sync::atomic::Ordering::SeqCst) > attempts_before
    })
    .await;
    for i in 1..20 {
        sent.push(alice.say(&room, &format!("m{i}")).await);
    }
    let owner = lease_owner(&db.url, "peeker.test").expect("a sender holds the destination");
    let owner_pid: u32 = owner.split('-').next().unwrap().parse().unwrap();
    let victim = instances.iter().position(|(child, _, _)| child.id() == owner_pid).expect("the owner is one of ours");
    let (mut killed, _, _) = instances.remove(victim);
    killed.kill().unwrap();
    killed.wait().unwrap();
    assert!(first_arrivals(&peer, &sent).len() < sent.len(), "the kill came before everything was delivered");
    wait_until("everything delivered after the kill", || async { first_arrivals(&peer, &sent).len() == sent.len() })
        .await;
    assert_eq!(first_arrivals(&peer, &sent), sent, "in order");
    let new_owner = lease_owner(&db.url, "peeker.test");
    assert!(new_owner.as_ref().is_none_or(|o| *o != owner), "the dead instance's lease was taken over");

    // Transactions came from one sender at a time: each instance's transaction IDs start with
    // its start time, and the runs of one prefix never interleave.
    let prefixes: Vec<String> = peer
        .inbox
        .transactions
        .lock()
        .unwrap()
        .iter()
        .map(|txn| txn.txn_id.split('-').next().unwrap().to_owned())
        .collect();
    let mut runs: Vec<&String> = Vec::new();
    for prefix in &prefixes {
        if runs.last() != Some(&prefix) {
            assert!(!runs.contains(&prefix), "two senders interleaved: {prefixes:?}");
            runs.push(prefix);
        }
    }
    // Renewals go on through the instances that are left.
    let path = format!("/_matrix/federation/v1/peek/{}/live?ver=10", enc(&room));
    let (status, answer) = peer.call(&instances[0].1, GW, Method::PUT, &path, Some(&json!({}))).await;
    assert_eq!((status, answer), (200, json!({})), "a renewal through another instance");
    assert!(peer.inbox.problems.lock().unwrap().is_empty(), "{:?}", peer.inbox.problems.lock().unwrap());
    assert!(host.inbox.problems.lock().unwrap().is_empty(), "{:?}", host.inbox.problems.lock().unwrap());
    for (mut child, _, _) in instances {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The pool asks a connection whether the server is still there only after it sat idle or after
/// its work failed. A connection whose backend is terminated under it (as a PostgreSQL restart
/// or an administrator's `pg_terminate_backend` would) fails the work it was running, and is
/// then not handed out again: the next work, at once, on a pool of one, gets a new connection.
#[test]
fn a_connection_whose_backend_died_is_not_handed_out_again() {
    support::run_async(async {
        use diesel::connection::SimpleConnection;
        use diesel::prelude::*;
        use peekgate::db::{Db, DbError};
        let db = TestDb::new(DbKind::Postgres);
        let pool = Db::connect(&db.url, 1).unwrap();
        let backend = || {
            pool.run::<_, DbError, _>(|conn| {
                let pid: i32 = diesel::select(diesel::dsl::sql::<diesel::sql_types::Integer>("pg_backend_pid()"))
                    .get_result(conn)?;
                Ok(pid)
            })
        };
        let first = backend().await.unwrap();
        assert_eq!(backend().await.unwrap(), first, "a healthy connection is reused");
        let killed = pool
            .run::<_, DbError, _>(move |conn| {
                let admin_url = support::postgres_admin_url();
                let mut admin =
                    diesel::PgConnection::establish(&admin_url).map_err(|e| DbError::Connect(e.to_string()))?;
                admin.batch_execute(&format!("SELECT pg_terminate_backend({first})"))?;
                // Gone from the server before this connection is used again.
                let alive = format!("SELECT 1 FROM pg_stat_activity WHERE pid = {first}");
                while diesel::sql_query(&alive).execute(&mut admin)? > 0 {
                    std::thread::sleep(Duration::from_millis(10));
                }
                conn.batch_execute("SELECT 1")?;
                Ok(())
            })
            .await;
        assert!(killed.is_err(), "work on a terminated backend fails");
        let next = backend().await.expect("the next work gets a live connection");
        assert_ne!(next, first, "a new connection, not the dead one");
    });
}
