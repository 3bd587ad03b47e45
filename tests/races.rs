//! Issue #11, races: each test stops one request at a pause point inside its race window
//! (`peekgate::pause`), changes the world from outside, lets the request go on, and checks that
//! the outcome is the one a serial order would give. Each failed on the code before its fix.

mod support;

use std::collections::BTreeSet;

use diesel::prelude::*;
use peekgate::db::schema::{destinations, inbound_peeks};
use peekgate::pause::{self, points};
use reqwest::Method;
use serde_json::{json, Value};
use support::client::{enc, Client};
use support::gateways::pair;
use support::peer::{KeyMode, TestPeer};
use support::{wait_until, DbKind, ServerSpec, TestServer};

const GW: &str = "gw.test";

fn open_registration(c: &mut peekgate::config::Config) {
    c.client.registration = "open".into();
}

fn peek_path(room: &str, peek_id: &str) -> String {
    format!("/_matrix/federation/v1/peek/{}/{}", enc(room), enc(peek_id))
}

async fn put_peek(peer: &TestPeer, gw: &TestServer, room: &str, peek_id: &str) -> (u16, Value) {
    peer.call(&gw.base, GW, Method::PUT, &format!("{}?ver=10", peek_path(room, peek_id)), Some(&json!({}))).await
}

/// A gateway knowing one test peer, with alice's world-readable v10 room.
async fn gateway_and_peer(db: DbKind, configure: impl FnOnce(&mut peekgate::config::Config) + 'static) -> Setup {
    let peer = TestPeer::start("peeker.test", KeyMode::Good);
    let gw = ServerSpec::new(GW, db)
        .configure(open_registration)
        .configure(configure)
        .destination(&peer.name, &peer.url)
        .start()
        .await;
    peer.trust(GW, &gw.base);
    let alice = Client::register(&gw.base, "alice").await;
    let room = alice.create_world_readable_room("lobby", "10").await;
    Setup { gw, peer, alice, room }
}

struct Setup {
    gw: TestServer,
    peer: TestPeer,
    alice: Client,
    room: String,
}

impl Setup {
    async fn make_room_shared(&self) -> String {
        let (status, answer) = self
            .alice
            .put_state(&self.room, "m.room.history_visibility", "", json!({ "history_visibility": "shared" }))
            .await;
        assert_eq!(status, 200, "{answer}");
        answer["event_id"].as_str().unwrap().to_owned()
    }

    async fn finish(self) {
        assert!(self.peer.inbox.problems.lock().unwrap().is_empty(), "{:?}", self.peer.inbox.problems.lock().unwrap());
        self.gw.stop().await;
        self.peer.stop().await;
    }
}

/// `(start_stream_pos, end_stream_pos)` of every inbound peek on the room.
async fn peek_rows(gw: &TestServer, room: &str) -> Vec<(i64, Option<i64>)> {
    let room = room.to_owned();
    gw.state()
        .db
        .run::<_, peekgate::db::DbError, _>(move |conn| {
            Ok(inbound_peeks::table
                .filter(inbound_peeks::room_id.eq(&room))
                .select((inbound_peeks::start_stream_pos, inbound_peeks::end_stream_pos))
                .load(conn)?)
        })
        .await
        .unwrap()
}

/// H1: a peek PUT that passed its checks while the room was world-readable, and records the
/// peek only after the room became `shared`, is refused (403) and records nothing: the checks
/// run again under the append lock. Before the fix it answered 200 and the peeker was sent
/// every later (no longer world-readable) event.
async fn h1_inbound_peek_racing_a_visibility_change_is_refused(db: DbKind) {
    let s = gateway_and_peer(db, |_| {}).await;
    let held = pause::hold(points::INBOUND_PEEK_RECORD, &s.room);
    let change = async {
        held.reached().await;
        s.make_room_shared().await;
        drop(held);
    };
    let ((status, body), ()) = tokio::join!(put_peek(&s.peer, &s.gw, &s.room, "racer"), change);
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{body}");
    assert!(peek_rows(&s.gw, &s.room).await.is_empty(), "no peek recorded");
    assert_eq!(s.gw.state().inbound.live_count().await.unwrap(), 0);
    s.finish().await;
}
both_backends!(h1_inbound_peek_racing_a_visibility_change_is_refused);

/// H1 for local devices: a `/peek` that checked peekability before a visibility change and
/// records the device's peek after it is refused, and `/sync` shows no peek.
async fn h1_device_peek_racing_a_visibility_change_is_refused(db: DbKind) {
    let s = gateway_and_peer(db, |_| {}).await;
    let bob = Client::register(&s.gw.base, "bob").await;
    let token = bob.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();
    let held = pause::hold(points::DEVICE_PEEK_RECORD, &s.room);
    let change = async {
        held.reached().await;
        s.make_room_shared().await;
        drop(held);
    };
    let ((status, body), ()) = tokio::join!(bob.peek(&s.room, &[]), change);
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{body}");
    let after = bob.sync(Some(&token), 0).await;
    assert!(after["rooms"].get("peek").is_none_or(|peek| peek.get(&s.room).is_none()), "{after}");
    let (status, body) = bob.unpeek(&s.room).await;
    assert_eq!(status, 400, "the device does not peek the room: {body}");
    s.finish().await;
}
both_backends!(h1_device_peek_racing_a_visibility_change_is_refused);

/// H9: two PUTs of one (origin, room, peek_id) at once. The first stops before recording; the
/// second records the peek at P1; an event is sent; the first goes on. It must renew the live
/// peek (`{}`), not replace it with a later start: the event after P1 is owed to the peeker.
async fn h9_concurrent_puts_of_one_peek_keep_the_first_start(db: DbKind) {
    let s = gateway_and_peer(db, |_| {}).await;
    let held = pause::hold(points::INBOUND_PEEK_RECORD, &s.room);
    let between = async {
        held.reached().await;
        let (status, second) = put_peek(&s.peer, &s.gw, &s.room, "twice").await;
        assert_eq!(status, 200, "{second}");
        assert!(second.get("state").is_some(), "the second PUT made the peek: {second}");
        let event = s.alice.say(&s.room, "between the two PUTs").await;
        drop(held);
        event
    };
    let ((status, first), between) = tokio::join!(put_peek(&s.peer, &s.gw, &s.room, "twice"), between);
    assert_eq!((status, &first), (200, &json!({})), "the later of the two renews");
    let rows = peek_rows(&s.gw, &s.room).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let stored = s.gw.state().rooms.event(&between).await.unwrap().unwrap();
    assert!(rows[0].0 < stored.stream_pos, "the peek starts before the event it is owed: {rows:?}");
    wait_until("the event between the PUTs is delivered", || async { s.peer.inbox.event_ids("10").contains(&between) })
        .await;
    s.finish().await;
}
both_backends!(h9_concurrent_puts_of_one_peek_keep_the_first_start);

/// H6: a peek that lapsed (not yet evicted) is not ended by a visibility change: ending it gave
/// it an end position, and delivery runs to an end whatever the expiry, so the lapsed peeker
/// was sent the events since its lapse. The eviction job tells it instead.
async fn h6_a_lapsed_peek_is_not_revived_by_a_visibility_change(db: DbKind) {
    let s = gateway_and_peer(db, |c| {
        c.peeks.renewal_interval_ms = 1000;
        c.schedule.evict_inbound = "0 0 0 1 1 *".into(); // the test evicts by hand
    })
    .await;
    assert_eq!(put_peek(&s.peer, &s.gw, &s.room, "lapses").await.0, 200);
    let live = s.alice.say(&s.room, "while live").await;
    wait_until("delivered while live", || async { s.peer.inbox.event_ids("10").contains(&live) }).await;
    // interval 1 s + grace 100 ms: certainly lapsed after this.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let lapsed = s.alice.say(&s.room, "after the lapse").await;
    let change = s.make_room_shared().await;
    let rows = peek_rows(&s.gw, &s.room).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].1, None, "the lapsed peek is left to the eviction job: {rows:?}");
    peekgate::schedule::evict_inbound(&s.gw.state().jobs()).await.unwrap();
    wait_until("expired_peeks for the lapsed peek", || async { !s.peer.inbox.expired_peeks().is_empty() }).await;
    let got = s.peer.inbox.event_ids("10");
    assert!(!got.contains(&lapsed) && !got.contains(&change), "nothing after the lapse was sent: {got:?}");
    assert_eq!(s.gw.metric("peekgate_peek_evictions_total{reason=\"lapsed\"}").await, 1.0);
    s.finish().await;
}
both_backends!(h6_a_lapsed_peek_is_not_revived_by_a_visibility_change);

/// H3: the renewal job claimed an outbound peek and stops before its re-PUT; meanwhile the last
/// device unpeeks and the peek is deleted at the target. The renewal must not re-create it.
/// Before the fix the re-PUT made a new peek at A that nobody would ever delete.
async fn h3_a_renewal_racing_the_delete_does_not_revive_the_peek(db: DbKind) {
    let p = pair(
        db,
        |a| a.peeks.renewal_interval_ms = 1000,
        |b| b.schedule.renew_outbound = "0 0 0 1 1 *".into(), // the test runs renewals by hand
        &[],
    )
    .await;
    assert_eq!(p.bob.peek(&p.room, &[]).await.0, 200);
    assert_eq!(p.a.state().inbound.live_count().await.unwrap(), 1);
    // Renewals are due half an interval after the peek.
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    let held = pause::hold(points::OUTBOUND_RENEWAL_PUT, &p.room);
    let jobs = p.b.state().jobs();
    let unpeek = async {
        held.reached().await;
        let (status, body) = p.bob.unpeek(&p.room).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(p.a.state().inbound.live_count().await.unwrap(), 0, "the DELETE reached A");
        drop(held);
    };
    let (renewals, ()) = tokio::join!(peekgate::schedule::renew_outbound(&jobs), unpeek);
    renewals.unwrap();
    assert_eq!(p.a.state().inbound.live_count().await.unwrap(), 0, "the renewal re-created the peek");
    // And later runs leave the ended peek alone too.
    peekgate::schedule::renew_outbound(&jobs).await.unwrap();
    assert_eq!(p.a.state().inbound.live_count().await.unwrap(), 0);
    p.a.stop().await;
    p.b.stop().await;
}
both_backends!(h3_a_renewal_racing_the_delete_does_not_revive_the_peek);

/// H2 (PostgreSQL: a sequence hands out IDs in call order, not commit order). Device one's
/// `/peek` writes its log entry and stops before committing; device two's `/peek` comes after;
/// device one syncs. Its token must not cover device two's entry while its own (smaller) one
/// is uncommitted, or the next sync from that token never shows the room's state.
#[test]
fn h2_sync_tokens_cover_only_committed_device_peek_changes() {
    support::run_async(h2_tokens(DbKind::Postgres));
}

async fn h2_tokens(db: DbKind) {
    let s = gateway_and_peer(db, |_| {}).await;
    let other_room = s.alice.create_world_readable_room("other", "10").await;
    let bob = Client::register(&s.gw.base, "bob").await;
    let bob_two = bob.login_device().await;
    let token = bob.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();
    let held = pause::hold(points::DEVICE_PEEK_LOG_COMMIT, &s.room);
    let first = bob.peek(&s.room, &[]);
    let meanwhile = async {
        held.reached().await;
        // The second peek commits at once without the fix; with it, it waits for the first.
        let second = bob_two.peek(&other_room, &[]);
        tokio::pin!(second);
        let finished = tokio::time::timeout(std::time::Duration::from_millis(500), &mut second).await.ok();
        let during = bob.sync(Some(&token), 0).await;
        drop(held);
        let second = match finished {
            Some(answer) => answer,
            None => second.await,
        };
        (during, second)
    };
    let ((status, body), (during, (second_status, _))) = tokio::join!(first, meanwhile);
    assert_eq!((status, second_status), (200, 200), "{body}");
    let during_token = during["next_batch"].as_str().unwrap().to_owned();
    let after = bob.sync(Some(&during_token), 0).await;
    let seen: BTreeSet<String> = [&during, &after]
        .iter()
        .filter_map(|answer| answer["rooms"]["peek"].as_object())
        .flat_map(|peeks| peeks.keys().cloned())
        .collect();
    assert!(seen.contains(&s.room), "the peek never showed up in /sync: {during} then {after}");
    let entry = &after["rooms"]["peek"][&s.room];
    assert!(
        entry["state"]["events"].as_array().is_some_and(|state| state.iter().any(|e| e["type"] == "m.room.create")),
        "the room's state comes with the new peek: {after}"
    );
    s.finish().await;
}

/// H4: the sender's lease is renewed while a worker waits out a back-off longer than the lease,
/// so a second instance on the same database never takes the destination over meanwhile: one
/// owner from the first failure to the delivery. Before the fix the lease ran out during the
/// back-off and the other instance started sending too.
#[test]
fn h4_a_destination_has_one_sender_through_a_long_back_off() {
    support::run_async(h4_one_sender());
}

async fn h4_one_sender() {
    let short_lease = |c: &mut peekgate::config::Config| c.federation.sender_lease_ms = 600;
    let s = gateway_and_peer(DbKind::Postgres, short_lease).await;
    let (url, key) = (s.gw.config.database.url.clone(), s.gw.config.signing.key_path.clone());
    let second = ServerSpec::new(GW, DbKind::Postgres)
        .configure(open_registration)
        .configure(short_lease)
        .configure(move |c| {
            c.database.url = url;
            c.signing.key_path = key;
        })
        .destination(&s.peer.name, &s.peer.url)
        .start()
        .await;
    assert_eq!(put_peek(&s.peer, &s.gw, &s.room, "leased").await.0, 200);
    // Three failures: back-offs of about 0.5 s, 2 s and 4 s, each far longer than the lease.
    s.peer.inbox.fail_remaining.store(3, std::sync::atomic::Ordering::SeqCst);
    let event = s.alice.say(&s.room, "through the back-off").await;
    let owners = std::sync::Mutex::new(BTreeSet::new());
    let db = s.gw.state().db.clone();
    wait_until("delivered after the back-off", || {
        let (db, peer, event, owners) = (db.clone(), &s.peer, event.clone(), &owners);
        async move {
            let owner: Option<String> = db
                .run::<_, peekgate::db::DbError, _>(|conn| {
                    Ok(destinations::table
                        .find("peeker.test")
                        .select(destinations::lease_owner)
                        .first::<Option<String>>(conn)
                        .optional()?
                        .flatten())
                })
                .await
                .unwrap();
            owners.lock().unwrap().extend(owner);
            peer.inbox.event_ids("10").contains(&event)
        }
    })
    .await;
    assert!(s.peer.inbox.attempts.load(std::sync::atomic::Ordering::SeqCst) >= 4);
    let owners = owners.into_inner().unwrap();
    assert_eq!(owners.len(), 1, "the destination changed hands during the back-off: {owners:?}");
    second.stop().await;
    s.finish().await;
}

/// The renewal job runs while a device's `/peek` of a remote room has established the room's
/// federation peek but not yet recorded the device's peek: it must not cancel the federation
/// peek for want of a watching device (found by `renewals_keep_the_peek_alive` under load). The
/// `/peek` now records the device's peek before releasing the room's lock, and the job decides
/// under that lock.
async fn a_device_peek_in_flight_keeps_its_new_federation_peek(db: DbKind) {
    let p = pair(db, |_| {}, |b| b.schedule.renew_outbound = "0 0 0 1 1 *".into(), &[]).await;
    p.bob.sync(None, 0).await;
    let held = pause::hold(points::DEVICE_PEEK_RECORD, &p.room);
    let jobs = p.b.state().jobs();
    let renewals = async {
        held.reached().await;
        let job = peekgate::schedule::renew_outbound(&jobs);
        tokio::pin!(job);
        // Without the fix the job finishes at once, cancelling the peek; with it, it waits for
        // the room's lock, which the paused /peek holds.
        let finished = tokio::time::timeout(std::time::Duration::from_millis(1000), &mut job).await.ok();
        drop(held);
        match finished {
            Some(result) => result,
            None => job.await,
        }
    };
    let ((status, body), renewals) = tokio::join!(p.bob.peek(&p.room, &[]), renewals);
    renewals.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(p.a.state().inbound.live_count().await.unwrap(), 1, "the federation peek was cancelled");
    let room_id = ruma::RoomId::parse(&p.room).unwrap();
    let peek = peekgate::peeks::outbound::get(&p.b.state().outbound, &room_id).await.unwrap().unwrap();
    assert!(peek.ended_ts.is_none());
    p.a.stop().await;
    p.b.stop().await;
}
both_backends!(a_device_peek_in_flight_keeps_its_new_federation_peek);
