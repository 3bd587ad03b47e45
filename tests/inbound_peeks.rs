//! Inbound federated peeks (MSC2444, peekgate is the peeked server), peeking.md §1-3 and §8,
//! over real HTTP on PostgreSQL and SQLite. The peekers are test peers with their own keys that
//! verify every transaction and PDU they receive.

mod support;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use reqwest::Method;
use ruma::RoomId;
use serde_json::{json, Value};
use support::client::{enc, Client};
use support::peer::{KeyMode, TestPeer};
use support::verify::check_event;
use support::{wait_until, DbKind, ServerSpec, TestServer};

const GW: &str = "gw.test";

fn open_registration(c: &mut peekgate::config::Config) {
    c.client.registration = "open".into();
}

fn peek_path(room: &str, peek_id: &str) -> String {
    format!("/_matrix/federation/v1/peek/{}/{}", enc(room), enc(peek_id))
}

/// A gateway that knows `peers` (by name), an account on it and a world-readable v10 room.
struct Setup {
    gw: TestServer,
    alice: Client,
    room: String,
    peers: Vec<TestPeer>,
}

async fn setup(
    db: DbKind,
    peer_names: &[&str],
    configure: impl FnOnce(&mut peekgate::config::Config) + 'static,
) -> Setup {
    let peers: Vec<TestPeer> = peer_names.iter().map(|n| TestPeer::start(n, KeyMode::Good)).collect();
    let mut spec = ServerSpec::new(GW, db).configure(open_registration).configure(configure);
    for peer in &peers {
        spec = spec.destination(&peer.name, &peer.url);
    }
    let gw = spec.start().await;
    for peer in &peers {
        peer.trust(GW, &gw.base);
        for other in &peers {
            peer.trust(&other.name, &other.url);
        }
    }
    let alice = Client::register(&gw.base, "alice").await;
    let room = alice.create_world_readable_room("lobby", "10").await;
    Setup { gw, alice, room, peers }
}

async fn put_peek(peer: &TestPeer, gw: &TestServer, room: &str, peek_id: &str, query: &str) -> (u16, Value) {
    let path = format!("{}{query}", peek_path(room, peek_id));
    peer.call(&gw.base, GW, Method::PUT, &path, Some(&json!({}))).await
}

/// The current state event ID of `kind` (empty state key) in a gateway's room.
async fn state_id(gw: &TestServer, room: &str, kind: &str) -> String {
    let room_id = RoomId::parse(room).unwrap();
    gw.state().rooms.state_event(&room_id, kind, "").await.unwrap().unwrap().event_id.to_string()
}

/// The newest event of a gateway's room.
async fn latest(gw: &TestServer, room: &str) -> peekgate::rooms::StoredEvent {
    let room_id = RoomId::parse(room).unwrap();
    gw.state().rooms.events_in_range(&room_id, i64::MAX, false, 1).await.unwrap().remove(0)
}

async fn finish(setup: Setup) {
    for peer in &setup.peers {
        assert!(
            peer.inbox.problems.lock().unwrap().is_empty(),
            "{}: {:?}",
            peer.name,
            peer.inbox.problems.lock().unwrap()
        );
    }
    setup.gw.stop().await;
    for peer in setup.peers {
        peer.stop().await;
    }
}

/// FP-1, FP-5, FP-7, FP-9: the Rev A body, verified event by event; renewal; two origins.
async fn fp7_new_peek_returns_verified_state_and_renewal_is_empty(db: DbKind) {
    let s = setup(db, &["peeker.test", "other.test"], |_| {}).await;
    let keys = s.gw.published_keys().await;
    let last = s.alice.say(&s.room, "before the peek").await;
    let (status, body) = put_peek(&s.peers[0], &s.gw, &s.room, "Ab3xZ9q", "?ver=10&ver=11").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["room_version"], "10");
    assert_eq!(body["renewal_interval"], 3_600_000);
    assert_eq!(body["latest_event_id"], last.as_str());
    assert_eq!(body["latest_event"]["content"]["body"], "before the peek");
    let state = body["state"].as_array().unwrap();
    let chain = body["auth_chain"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    for pdu in state.iter().chain(chain).chain(std::iter::once(&body["latest_event"])) {
        check_event(pdu, "10", GW, &keys, None).unwrap_or_else(|e| panic!("{}: {e}", pdu["type"]));
        ids.insert(support::verify::event_id(pdu, "10"));
    }
    // Every state event's auth events are in state ∪ auth_chain (FP-7 test row).
    for pdu in state {
        for auth in pdu["auth_events"].as_array().unwrap() {
            assert!(ids.contains(auth.as_str().unwrap()), "missing auth event {auth}");
        }
    }
    let kinds: BTreeSet<&str> = state.iter().map(|p| p["type"].as_str().unwrap()).collect();
    assert!(kinds.contains("m.room.create") && kinds.contains("m.room.history_visibility"));
    // FP-9: the same peek again within the interval renews it: {}.
    let (status, body) = put_peek(&s.peers[0], &s.gw, &s.room, "Ab3xZ9q", "?ver=10").await;
    assert_eq!((status, body.clone()), (200, json!({})));
    // FP-5: the same peek_id from another origin is an independent peek.
    let (status, body) = put_peek(&s.peers[1], &s.gw, &s.room, "Ab3xZ9q", "?ver=10").await;
    assert_eq!(status, 200);
    assert!(body["state"].is_array());
    // Rev B renew.
    let (status, body) = s.peers[0]
        .call(&s.gw.base, GW, Method::POST, &format!("{}/renew", peek_path(&s.room, "Ab3xZ9q")), Some(&json!({})))
        .await;
    assert_eq!((status, body["renewal_interval"].as_i64()), (200, Some(3_600_000)));
    let (status, _) = s.peers[0]
        .call(&s.gw.base, GW, Method::POST, &format!("{}/renew", peek_path(&s.room, "nope")), Some(&json!({})))
        .await;
    assert_eq!(status, 404);
    assert_eq!(s.gw.metric("peekgate_peek_renewals_total{direction=\"inbound\",result=\"ok\"}").await, 2.0);
    finish(s).await;
}
both_backends!(fp7_new_peek_returns_verified_state_and_renewal_is_empty);

/// The hostile rows: FP-2, FP-3, FP-4, FP-6 and the check order.
async fn fp_hostile_requests_get_the_right_errors(db: DbKind) {
    let s = setup(db, &["peeker.test"], |_| {}).await;
    let peer = &s.peers[0];
    let expect = |(status, body): (u16, Value), want: (u16, &str)| {
        assert_eq!((status, body["errcode"].as_str().unwrap_or("")), want, "{body}");
        body
    };
    for bad in ["123456789", "abc!", "ab:c", "é"] {
        expect(put_peek(peer, &s.gw, &s.room, bad, "?ver=10").await, (400, "M_UNRECOGNIZED"));
    }
    expect(put_peek(peer, &s.gw, &s.room, "a.b=c_d-", "?ver=10").await, (200, ""));
    let body = expect(put_peek(peer, &s.gw, &s.room, "p1", "?ver=9").await, (400, "M_INCOMPATIBLE_ROOM_VERSION"));
    assert_eq!(body["room_version"], "10");
    let body = expect(put_peek(peer, &s.gw, &s.room, "p1", "").await, (400, "M_INCOMPATIBLE_ROOM_VERSION"));
    assert_eq!(body["room_version"], "10");
    // Unknown room: 404, before the peek_id and version checks.
    expect(put_peek(peer, &s.gw, "!nope:gw.test", "123456789", "?ver=1").await, (404, "M_NOT_FOUND"));
    // Not world-readable: 403.
    let shared = s.alice.create_room(json!({ "preset": "public_chat" })).await;
    expect(put_peek(peer, &s.gw, &shared, "p1", "?ver=10").await, (403, "M_FORBIDDEN"));
    // Encrypted, although world-readable: 403.
    let encrypted = s.alice.create_world_readable_room("enc", "10").await;
    s.alice.put_state(&encrypted, "m.room.encryption", "", json!({ "algorithm": "m.megolm.v1.aes-sha2" })).await;
    expect(put_peek(peer, &s.gw, &encrypted, "p1", "?ver=10").await, (403, "M_FORBIDDEN"));
    // FP-2: no body.
    let (status, body) =
        peer.call(&s.gw.base, GW, Method::PUT, &format!("{}?ver=10", peek_path(&s.room, "p2")), None).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_NOT_JSON")));
    // Server ACL first: a denied origin gets 403 even with a bad peek_id.
    let acl_room = s.alice.create_world_readable_room("acl", "10").await;
    let (status, _) = s
        .alice
        .put_state(
            &acl_room,
            "m.room.server_acl",
            "",
            json!({ "allow": ["*"], "deny": ["peeker.test"], "allow_ip_literals": false }),
        )
        .await;
    assert_eq!(status, 200);
    expect(put_peek(peer, &s.gw, &acl_room, "123456789", "?ver=10").await, (403, "M_FORBIDDEN"));
    // Unsigned: 401.
    let (status, body) = support::client::request(
        &s.gw.base,
        None,
        Method::PUT,
        &format!("{}?ver=10", peek_path(&s.room, "p3")),
        Some(&json!({})),
    )
    .await;
    assert_eq!((status, body["errcode"].as_str()), (401, Some("M_UNAUTHORIZED")));
    finish(s).await;
}
both_backends!(fp_hostile_requests_get_the_right_errors);

/// FP-10: DELETE ends only the caller's own peek.
async fn fp10_delete_ends_own_peek_only(db: DbKind) {
    let s = setup(db, &["peeker.test", "other.test"], |_| {}).await;
    let (a, b) = (&s.peers[0], &s.peers[1]);
    assert_eq!(put_peek(a, &s.gw, &s.room, "k1", "?ver=10").await.0, 200);
    assert_eq!(put_peek(b, &s.gw, &s.room, "k1", "?ver=10").await.0, 200);
    // Another origin's peek: 404, and it stays.
    let path = peek_path(&s.room, "k1");
    let (status, _) = b.call(&s.gw.base, GW, Method::DELETE, &peek_path(&s.room, "kb"), None).await;
    assert_eq!(status, 404);
    let (status, body) = a.call(&s.gw.base, GW, Method::DELETE, &path, None).await;
    assert_eq!((status, body), (200, json!({})));
    let (status, body) = a.call(&s.gw.base, GW, Method::DELETE, &path, None).await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")));
    // B's peek with the same id is untouched: renewing it answers {}.
    assert_eq!(put_peek(b, &s.gw, &s.room, "k1", "?ver=10").await, (200, json!({})));
    // After the DELETE, A gets no events; B does.
    let id = s.alice.say(&s.room, "after delete").await;
    wait_until("B receives the event", || async { b.inbox.event_ids("10").contains(&id) }).await;
    let later = s.alice.say(&s.room, "later").await;
    wait_until("B receives the later event", || async { b.inbox.event_ids("10").contains(&later) }).await;
    assert!(a.inbox.pdus().is_empty(), "A deleted its peek");
    finish(s).await;
}
both_backends!(fp10_delete_ends_own_peek_only);

/// FP-12: new peeks are rate-limited per origin (429 with retry_after_ms); renewals are not.
async fn fp12_too_many_peeks_get_429(db: DbKind) {
    let s = setup(db, &["peeker.test"], |c| {
        c.federation.peek.new_peeks_per_minute = 1;
        c.federation.peek.new_peeks_burst = 2;
    })
    .await;
    let peer = &s.peers[0];
    assert_eq!(put_peek(peer, &s.gw, &s.room, "r1", "?ver=10").await.0, 200);
    assert_eq!(put_peek(peer, &s.gw, &s.room, "r2", "?ver=10").await.0, 200);
    let (status, body) = put_peek(peer, &s.gw, &s.room, "r3", "?ver=10").await;
    assert_eq!((status, body["errcode"].as_str()), (429, Some("M_LIMIT_EXCEEDED")));
    assert!(body["retry_after_ms"].as_u64().unwrap() > 0);
    assert_eq!(put_peek(peer, &s.gw, &s.room, "r1", "?ver=10").await, (200, json!({})), "renewal is not limited");
    finish(s).await;

    // The cap on peek_ids per (origin, room).
    let s = setup(db, &["peeker.test"], |c| c.federation.peek.max_ids_per_room = 2).await;
    let peer = &s.peers[0];
    assert_eq!(put_peek(peer, &s.gw, &s.room, "c1", "?ver=10").await.0, 200);
    assert_eq!(put_peek(peer, &s.gw, &s.room, "c2", "?ver=10").await.0, 200);
    let (status, body) = put_peek(peer, &s.gw, &s.room, "c3", "?ver=10").await;
    assert_eq!((status, body["errcode"].as_str()), (429, Some("M_LIMIT_EXCEEDED")));
    assert_eq!(body["retry_after_ms"], 60_000);
    finish(s).await;

    // H18: the cap on live peeks from all origins together.
    let s = setup(db, &["one.test", "two.test"], |c| c.federation.peek.max_active_total = 2).await;
    assert_eq!(put_peek(&s.peers[0], &s.gw, &s.room, "a", "?ver=10").await.0, 200);
    assert_eq!(put_peek(&s.peers[0], &s.gw, &s.room, "b", "?ver=10").await.0, 200);
    let (status, body) = put_peek(&s.peers[1], &s.gw, &s.room, "c", "?ver=10").await;
    assert_eq!((status, body["errcode"].as_str()), (429, Some("M_LIMIT_EXCEEDED")), "another origin: {body}");
    assert_eq!(put_peek(&s.peers[0], &s.gw, &s.room, "a", "?ver=10").await, (200, json!({})), "renewals go on");
    finish(s).await;
}
both_backends!(fp12_too_many_peeks_get_429);

/// PE-1, PE-2, PE-3: every later event reaches the peeker once, however many peek_ids it holds,
/// including an event another server sent into the room (the relay Dendrite lacks).
async fn pe1_every_event_once_including_other_servers(db: DbKind) {
    let s = setup(db, &["peeker.test", "third.test"], |_| {}).await;
    let (peeker, third) = (&s.peers[0], &s.peers[1]);
    let before = s.alice.say(&s.room, "before").await;
    assert_eq!(put_peek(peeker, &s.gw, &s.room, "one", "?ver=10").await.0, 200);
    assert_eq!(put_peek(peeker, &s.gw, &s.room, "two", "?ver=10").await.0, 200);
    let mut expected = vec![s.alice.say(&s.room, "m1").await];

    // third.test joins the public room and talks, over /send.
    let (create, power, join_rules) = (
        state_id(&s.gw, &s.room, "m.room.create").await,
        state_id(&s.gw, &s.room, "m.room.power_levels").await,
        state_id(&s.gw, &s.room, "m.room.join_rules").await,
    );
    let latest = latest(&s.gw, &s.room).await;
    let (join, join_id) = third.build_pdu(
        "10",
        &s.room,
        "carol",
        "m.room.member",
        Some("@carol:third.test"),
        json!({ "membership": "join" }),
        &[create.clone(), power.clone(), join_rules],
        &[latest.pdu.event_id.to_string()],
        latest.pdu.depth + 1,
    );
    let (msg, msg_id) = third.build_pdu(
        "10",
        &s.room,
        "carol",
        "m.room.message",
        None,
        json!({ "msgtype": "m.text", "body": "hello from third" }),
        &[create, power, join_id.clone()],
        std::slice::from_ref(&join_id),
        latest.pdu.depth + 2,
    );
    let txn = json!({ "origin": "third.test", "origin_server_ts": 1, "pdus": [join, msg] });
    let (status, answer) = third.call(&s.gw.base, GW, Method::PUT, "/_matrix/federation/v1/send/t1", Some(&txn)).await;
    assert_eq!(status, 200);
    assert_eq!(answer["pdus"][&join_id], json!({}), "{answer}");
    assert_eq!(answer["pdus"][&msg_id], json!({}), "{answer}");
    expected.push(join_id);
    expected.push(msg_id);
    let m2 = s.alice.say(&s.room, "m2").await;
    expected.push(m2.clone());

    wait_until("the peeker has every event", || async {
        expected.iter().all(|id| peeker.inbox.event_ids("10").contains(id))
    })
    .await;
    let got = peeker.inbox.event_ids("10");
    assert!(!got.contains(&before), "nothing from before the peek (PE-3 start)");
    for id in &expected {
        assert_eq!(got.iter().filter(|g| *g == id).count(), 1, "{id} once per destination (PE-2)");
    }
    assert_eq!(got, expected, "in order");
    // The third server, joined but not peeking, is sent our events after its join (JN-10),
    // never its own.
    wait_until("the joined server has m2", || async { third.inbox.event_ids("10").contains(&m2) }).await;
    assert_eq!(third.inbox.event_ids("10"), [m2]);
    finish(s).await;
}
both_backends!(pe1_every_event_once_including_other_servers);

/// PE-1, PE-2 under a burst: 150 events appended at once (more than one transaction's 50, so
/// the sender delivers them in several chunks) reach the peeker each exactly once, in order, in
/// transactions of at most 50 PDUs.
async fn a_burst_arrives_complete_in_order_and_in_chunks(db: DbKind) {
    let s = setup(db, &["peeker.test"], |_| {}).await;
    let peeker = &s.peers[0];
    assert_eq!(put_peek(peeker, &s.gw, &s.room, "burst", "?ver=10").await.0, 200);
    let state = s.gw.state();
    let room = RoomId::parse(&s.room).unwrap();
    let alice = ruma::UserId::parse(format!("@alice:{GW}")).unwrap();
    let sends = (0..150).map(|i| {
        let (room, alice) = (room.clone(), alice.clone());
        async move {
            let content = json!({ "msgtype": "m.text", "body": format!("burst {i}") });
            state.rooms.send(&room, &alice, "m.room.message", None, content).await.unwrap();
        }
    });
    futures_util::future::join_all(sends).await;
    wait_until("the peeker has the whole burst", || async { peeker.inbox.pdus().len() >= 150 }).await;
    let stored: Vec<String> = {
        let (_, answer) = s
            .alice
            .call(Method::GET, &format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=150", enc(&s.room)), None)
            .await;
        let mut ids: Vec<String> =
            answer["chunk"].as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap().to_owned()).collect();
        ids.reverse();
        ids
    };
    assert_eq!(peeker.inbox.event_ids("10"), stored, "every event once, in the room's order");
    for txn in peeker.inbox.transactions.lock().unwrap().iter() {
        assert!(txn.pdus.len() <= 50, "a transaction of {} PDUs", txn.pdus.len());
    }
    finish(s).await;
}
both_backends!(a_burst_arrives_complete_in_order_and_in_chunks);

/// Peeks that lapse 1 s after their last renewal, and the eviction job every second.
fn short_peeks_evicted_every_second(c: &mut peekgate::config::Config) {
    c.peeks.renewal_interval_ms = 1000;
    c.schedule.evict_inbound = "* * * * * *".into();
}

/// RE-2: a peek that is not renewed lapses: no more events, then a full body on re-PUT; the
/// eviction job deletes it and tells the peeker (PE-7).
async fn re2_lapsed_peek_stops_and_is_evicted(db: DbKind) {
    // The real schedule, every second, does the eviction below.
    let s = setup(db, &["peeker.test"], short_peeks_evicted_every_second).await;
    let peer = &s.peers[0];
    assert_eq!(put_peek(peer, &s.gw, &s.room, "short", "?ver=10").await.0, 200);
    let first = s.alice.say(&s.room, "while live").await;
    wait_until("first event delivered", || async { peer.inbox.event_ids("10").contains(&first) }).await;
    // interval 1 s + grace 100 ms: wait until it has certainly lapsed.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let lapsed = s.alice.say(&s.room, "after lapse").await;
    // FP-9: a PUT for a lapsed peek is a new peek (full body), starting after `lapsed`.
    let (status, body) = put_peek(peer, &s.gw, &s.room, "short", "?ver=10").await;
    assert_eq!(status, 200);
    assert_eq!(body["latest_event_id"], lapsed.as_str());
    let fresh = s.alice.say(&s.room, "after re-peek").await;
    wait_until("the re-peek delivers", || async { peer.inbox.event_ids("10").contains(&fresh) }).await;
    assert!(!peer.inbox.event_ids("10").contains(&lapsed), "not relayed while lapsed");

    // Let it lapse again; the scheduled eviction job removes it and queues expired_peeks. (The
    // schedule may also have evicted the first lapse before the re-PUT: count from here.)
    let evictions = "peekgate_peek_evictions_total{reason=\"lapsed\"}";
    let before = s.gw.metric(evictions).await;
    let notices_before = peer.inbox.expired_peeks().len();
    wait_until("the schedule evicts the lapsed peek", || async { s.gw.metric(evictions).await == before + 1.0 }).await;
    assert!(s.gw.metric("peekgate_schedule_runs_total{job=\"evict_inbound\",result=\"ok\"}").await >= 1.0);
    wait_until("expired_peeks notice", || async { peer.inbox.expired_peeks().len() > notices_before }).await;
    assert_eq!(peer.inbox.expired_peeks()[notices_before], json!({ "room_id": s.room, "peek_id": "short" }));
    let (status, _) = peer
        .call(&s.gw.base, GW, Method::POST, &format!("{}/renew", peek_path(&s.room, "short")), Some(&json!({})))
        .await;
    assert_eq!(status, 404);
    finish(s).await;
}
both_backends!(re2_lapsed_peek_stops_and_is_evicted);

/// PE-7 in a busy room: a lapsed peek's `expired_peeks` notice reaches its server while events
/// keep coming, though the fan-out hands that server a body every round (its other peek is
/// live), not only once the room falls quiet.
async fn pe7_a_notice_arrives_while_the_room_stays_busy(db: DbKind) {
    let s = setup(db, &["peeker.test"], short_peeks_evicted_every_second).await;
    let peer = &s.peers[0];
    for id in ["long", "short"] {
        assert_eq!(put_peek(peer, &s.gw, &s.room, id, "?ver=10").await.0, 200);
    }
    let renew_long = format!("{}/renew", peek_path(&s.room, "long"));
    let notice = |id: &str| json!({ "room_id": s.room, "peek_id": id });
    // At most 200 events, 100 ms apart: the short peek lapses after 1.1 s and the schedule
    // evicts it within a second more.
    let mut busy_events = 0;
    while !peer.inbox.expired_peeks().contains(&notice("short")) && busy_events < 200 {
        s.alice.say(&s.room, &format!("busy {busy_events}")).await;
        if busy_events % 3 == 0 {
            let (status, _) = peer.call(&s.gw.base, GW, Method::POST, &renew_long, Some(&json!({}))).await;
            assert_eq!(status, 200, "the long peek is kept alive");
        }
        busy_events += 1;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(peer.inbox.expired_peeks().contains(&notice("short")), "no notice in {busy_events} busy events");
    assert!(!peer.inbox.expired_peeks().contains(&notice("long")), "the renewed peek stays");
    finish(s).await;
}
both_backends!(pe7_a_notice_arrives_while_the_room_stays_busy);

/// RE-3, RE-5, PE-7: the visibility change itself is delivered, then nothing more; the peeker
/// is told the peek expired; re-PUT gets 403 and /renew 404.
async fn re3_visibility_change_ends_peeks(db: DbKind) {
    let s = setup(db, &["peeker.test"], |_| {}).await;
    let peer = &s.peers[0];
    assert_eq!(put_peek(peer, &s.gw, &s.room, "v1", "?ver=10").await.0, 200);
    let m1 = s.alice.say(&s.room, "m1").await;
    let (status, change) =
        s.alice.put_state(&s.room, "m.room.history_visibility", "", json!({ "history_visibility": "shared" })).await;
    assert_eq!(status, 200);
    let change = change["event_id"].as_str().unwrap().to_owned();
    let m2 = s.alice.say(&s.room, "m2").await;
    wait_until("expired_peeks after the change", || async { !peer.inbox.expired_peeks().is_empty() }).await;
    let got = peer.inbox.event_ids("10");
    assert_eq!(got, vec![m1, change], "the change is delivered; m2 is not");
    assert!(!got.contains(&m2));
    assert_eq!(peer.inbox.expired_peeks(), vec![json!({ "room_id": s.room, "peek_id": "v1" })]);
    let (status, body) = put_peek(peer, &s.gw, &s.room, "v1", "?ver=10").await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")));
    let (status, _) =
        peer.call(&s.gw.base, GW, Method::POST, &format!("{}/renew", peek_path(&s.room, "v1")), Some(&json!({}))).await;
    assert_eq!(status, 404);
    // Once delivered, the ended peek is evicted with its reason.
    peekgate::schedule::evict_inbound(&s.gw.state().jobs()).await.unwrap();
    assert_eq!(s.gw.metric("peekgate_peek_evictions_total{reason=\"visibility_changed\"}").await, 1.0);
    finish(s).await;
}
both_backends!(re3_visibility_change_ends_peeks);

/// H6: a peek the room ended (RE-3) whose last events its server has not received yet (its
/// transactions fail) is not replaced by a re-PUT of the same peek ID once the room is peekable
/// again: the new peek would start after the events the old one owes, the change event among
/// them. The re-PUT gets 429 and ends the server's back-off; once those events are delivered,
/// the same PUT makes a new peek.
async fn h6_a_reused_peek_id_waits_for_the_ended_peeks_last_events(db: DbKind) {
    let s = setup(db, &["peeker.test"], |c| {
        c.federation.peek.new_peeks_per_minute = 1000;
        c.federation.peek.new_peeks_burst = 1000;
    })
    .await;
    let peer = &s.peers[0];
    assert_eq!(put_peek(peer, &s.gw, &s.room, "again", "?ver=10").await.0, 200);
    peer.inbox.fail_remaining.store(1_000, Ordering::SeqCst);
    let before = s.alice.say(&s.room, "before the change").await;
    let (status, change) =
        s.alice.put_state(&s.room, "m.room.history_visibility", "", json!({ "history_visibility": "shared" })).await;
    assert_eq!(status, 200);
    let change = change["event_id"].as_str().unwrap().to_owned();
    let readable = json!({ "history_visibility": "world_readable" });
    assert_eq!(s.alice.put_state(&s.room, "m.room.history_visibility", "", readable).await.0, 200);
    wait_until("the failing peeker was tried", || async { peer.inbox.attempts.load(Ordering::SeqCst) >= 1 }).await;
    let (status, body) = put_peek(peer, &s.gw, &s.room, "again", "?ver=10").await;
    assert_eq!((status, body["errcode"].as_str()), (429, Some("M_LIMIT_EXCEEDED")), "{body}");
    assert!(body["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{body}");

    peer.inbox.fail_remaining.store(0, Ordering::SeqCst);
    wait_until("the re-PUT succeeds once the ended peek's events are out", || async {
        put_peek(peer, &s.gw, &s.room, "again", "?ver=10").await.0 == 200
    })
    .await;
    let got = peer.inbox.event_ids("10");
    assert!(got.contains(&before) && got.contains(&change), "the ended peek's events, the change included: {got:?}");
    finish(s).await;
}
both_backends!(h6_a_reused_peek_id_waits_for_the_ended_peeks_last_events);

/// RE-4 (H8): when our last member leaves, the room's peeks end after that event, and new PUTs
/// and renewals get 404, so peekers fail over to a server that still takes part.
async fn re4_last_member_leaving_ends_peeks_and_refuses_new_ones(db: DbKind) {
    let s = setup(db, &["peeker.test"], |_| {}).await;
    let peer = &s.peers[0];
    assert_eq!(put_peek(peer, &s.gw, &s.room, "v1", "?ver=10").await.0, 200);
    let m1 = s.alice.say(&s.room, "m1").await;
    let path = format!("/_matrix/client/v3/rooms/{}/leave", support::client::enc(&s.room));
    let (status, answer) = s.alice.call(Method::POST, &path, Some(&json!({}))).await;
    assert_eq!(status, 200, "{answer}");
    wait_until("expired_peeks after the leave", || async { !peer.inbox.expired_peeks().is_empty() }).await;
    let got = peer.inbox.event_ids("10");
    assert_eq!(got.len(), 2, "m1 and the leave are delivered: {got:?}");
    assert_eq!(got[0], m1);
    let (status, body) = put_peek(peer, &s.gw, &s.room, "v2", "?ver=10").await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")), "a new PUT after the last member left");
    let (status, _) =
        peer.call(&s.gw.base, GW, Method::POST, &format!("{}/renew", peek_path(&s.room, "v1")), Some(&json!({}))).await;
    assert_eq!(status, 404);
    peekgate::schedule::evict_inbound(&s.gw.state().jobs()).await.unwrap();
    assert_eq!(s.gw.metric("peekgate_peek_evictions_total{reason=\"room_left\"}").await, 1.0);
    finish(s).await;
}
both_backends!(re4_last_member_leaving_ends_peeks_and_refuses_new_ones);

/// H7: `m.room.history_visibility` and `m.room.encryption` with a non-empty state key are not the
/// room's setting and end no peek; the same change with the empty state key still does (RE-3).
async fn re3_only_the_empty_state_key_ends_peeks(db: DbKind) {
    let s = setup(db, &["peeker.test"], |_| {}).await;
    let peer = &s.peers[0];
    assert_eq!(put_peek(peer, &s.gw, &s.room, "k1", "?ver=10").await.0, 200);
    let (status, vis) =
        s.alice.put_state(&s.room, "m.room.history_visibility", "x", json!({ "history_visibility": "shared" })).await;
    assert_eq!(status, 200, "{vis}");
    let (status, enc_event) =
        s.alice.put_state(&s.room, "m.room.encryption", "x", json!({ "algorithm": "m.megolm.v1.aes-sha2" })).await;
    assert_eq!(status, 200, "{enc_event}");
    let m1 = s.alice.say(&s.room, "m1").await;
    wait_until("m1 delivered", || async { peer.inbox.event_ids("10").contains(&m1) }).await;
    let got = peer.inbox.event_ids("10");
    assert!(got.contains(&vis["event_id"].as_str().unwrap().to_owned()));
    assert!(got.contains(&enc_event["event_id"].as_str().unwrap().to_owned()));
    assert!(peer.inbox.expired_peeks().is_empty(), "{:?}", peer.inbox.expired_peeks());
    let (status, _) =
        peer.call(&s.gw.base, GW, Method::POST, &format!("{}/renew", peek_path(&s.room, "k1")), Some(&json!({}))).await;
    assert_eq!(status, 200, "the peek is still open");
    // The room's own setting (empty state key) still ends it.
    let (status, change) =
        s.alice.put_state(&s.room, "m.room.history_visibility", "", json!({ "history_visibility": "shared" })).await;
    assert_eq!(status, 200);
    let change = change["event_id"].as_str().unwrap().to_owned();
    wait_until("expired_peeks after the change", || async { !peer.inbox.expired_peeks().is_empty() }).await;
    assert!(peer.inbox.event_ids("10").contains(&change));
    assert_eq!(peer.inbox.expired_peeks(), vec![json!({ "room_id": s.room, "peek_id": "k1" })]);
    finish(s).await;
}
both_backends!(re3_only_the_empty_state_key_ends_peeks);

/// A peeker that answers 500 for a while is retried with back-off (the same transaction), then
/// gets everything in order; a healthy peeker meanwhile has everything already.
async fn failing_peeker_backs_off_and_healthy_one_is_not_held_up(db: DbKind) {
    let s = setup(db, &["flaky.test", "healthy.test"], |_| {}).await;
    let (flaky, healthy) = (&s.peers[0], &s.peers[1]);
    flaky.inbox.fail_remaining.store(3, Ordering::SeqCst);
    assert_eq!(put_peek(flaky, &s.gw, &s.room, "f", "?ver=10").await.0, 200);
    assert_eq!(put_peek(healthy, &s.gw, &s.room, "h", "?ver=10").await.0, 200);
    let mut sent = Vec::new();
    for i in 0..5 {
        sent.push(s.alice.say(&s.room, &format!("e{i}")).await);
    }
    wait_until("healthy peeker has everything", || async {
        sent.iter().all(|id| healthy.inbox.event_ids("10").contains(id))
    })
    .await;
    // The flaky one is still inside its back-off (0.5 s, then 2 s, then 4 s) at this point.
    assert!(flaky.inbox.pdus().len() < sent.len(), "the healthy peeker did not wait for the flaky one");
    wait_until("flaky peeker catches up", || async { sent.iter().all(|id| flaky.inbox.event_ids("10").contains(id)) })
        .await;
    assert_eq!(flaky.inbox.event_ids("10"), sent, "everything, in order, once");
    let attempts = flaky.inbox.attempts.load(Ordering::SeqCst);
    assert!(attempts >= 4, "three failures then success: {attempts} attempts");
    // The retries reused one transaction ID: the first accepted transaction carries events
    // queued before the first failure.
    assert!(s.gw.metric("peekgate_federation_sent_transactions_total{result=\"failed\"}").await >= 3.0);
    finish(s).await;
}
both_backends!(failing_peeker_backs_off_and_healthy_one_is_not_held_up);

/// H5 and the fan-out's catch-up (#13): two peekers that answer slowly fall behind while
/// events keep coming, without holding up a fast one. Once they answer promptly again, the
/// fan-out catches them up from where they are, with chunks read once for both, instead of each
/// reading its own queue: no transaction is built from a queue read, not even at the start, and
/// both end with every event once, in order.
async fn slow_peekers_fall_behind_and_are_caught_up_in_order(db: DbKind) {
    const QUEUE_TRANSACTIONS: &str = "peekgate_federation_queue_transactions_total";
    let s = setup(db, &["slow1.test", "slow2.test", "fast.test"], |_| {}).await;
    for (peer, id) in s.peers.iter().zip(["s1", "s2", "f"]) {
        assert_eq!(put_peek(peer, &s.gw, &s.room, id, "?ver=10").await.0, 200);
    }
    let (slow, fast) = (&s.peers[..2], &s.peers[2]);
    // The first event starts the workers, at their stored cursors, and the fan-out catches
    // them up together.
    let mut sent = vec![s.alice.say(&s.room, "warm-up").await];
    wait_until("every peeker has the warm-up", || async {
        s.peers.iter().all(|p| p.inbox.event_ids("10") == sent[..1])
    })
    .await;
    assert_eq!(s.gw.metric(QUEUE_TRANSACTIONS).await, 0.0, "no worker started on its own queue");
    for peer in slow {
        peer.inbox.send_delay_ms.store(1_500, Ordering::SeqCst);
    }
    // Spread out, so that rounds pass the slow peekers by: their hand-off fills up, then they
    // count as stalled (a send running over a second).
    for i in 0..12 {
        sent.push(s.alice.say(&s.room, &format!("e{i}")).await);
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    }
    wait_until("the fast peeker has everything", || async { fast.inbox.event_ids("10") == sent }).await;
    for peer in slow {
        assert!(peer.inbox.event_ids("10").len() < sent.len(), "{} was not waited for", peer.name);
        peer.inbox.send_delay_ms.store(0, Ordering::SeqCst);
    }
    // Events in a room only the fast one peeks go in between: the slow ones are moved past
    // those without a message, and take the next body from where they are.
    let side = s.alice.create_world_readable_room("side", "10").await;
    assert_eq!(put_peek(fast, &s.gw, &side, "side", "?ver=10").await.0, 200);
    let mut fast_expected = sent.clone();
    for i in 12..15 {
        fast_expected.push(s.alice.say(&side, &format!("side {i}")).await);
        sent.push(s.alice.say(&s.room, &format!("e{i}")).await);
        fast_expected.push(sent.last().unwrap().clone());
    }
    for peer in slow {
        wait_until("a slow peeker catches up", || async { peer.inbox.event_ids("10").len() >= sent.len() }).await;
        assert_eq!(peer.inbox.event_ids("10"), sent, "{}: every event once, in order", peer.name);
    }
    wait_until("the fast peeker has the last events", || async {
        fast.inbox.event_ids("10").len() >= fast_expected.len()
    })
    .await;
    assert_eq!(fast.inbox.event_ids("10"), fast_expected, "fast.test: both rooms' events once, in order");
    assert_eq!(s.gw.metric(QUEUE_TRANSACTIONS).await, 0.0, "caught up by the fan-out alone");
    finish(s).await;
}
both_backends!(slow_peekers_fall_behind_and_are_caught_up_in_order);

/// Durable delivery: with 200 events queued for 3 peekers that are down, the gateway stops and
/// starts again; every peeker ends with all 200 events (duplicates allowed, gaps not).
async fn restart_with_queued_events_loses_nothing(db: DbKind) {
    let mut s = setup(db, &["p1.test", "p2.test", "p3.test"], |_| {}).await;
    for (i, peer) in s.peers.iter().enumerate() {
        peer.inbox.fail_remaining.store(usize::MAX / 2, Ordering::SeqCst);
        assert_eq!(put_peek(peer, &s.gw, &s.room, &format!("d{i}"), "?ver=10").await.0, 200);
    }
    let room_id = RoomId::parse(&s.room).unwrap();
    let alice = ruma::UserId::parse(&s.alice.user_id).unwrap();
    let mut sent = Vec::new();
    for i in 0..200 {
        let appended =
            s.gw.state()
                .rooms
                .send(&room_id, &alice, "m.room.message", None, json!({ "msgtype": "m.text", "body": format!("q{i}") }))
                .await
                .unwrap();
        sent.push(appended.event_id.to_string());
    }
    for peer in &s.peers {
        wait_until("a delivery attempt", || async { peer.inbox.attempts.load(Ordering::SeqCst) > 0 }).await;
    }
    let gw = s.gw.restart().await;
    for peer in &s.peers {
        // The restarted gateway listens on a new port; its key is the same.
        peer.trust(GW, &gw.base);
        peer.inbox.fail_remaining.store(0, Ordering::SeqCst);
    }
    s.gw = gw;
    for peer in &s.peers {
        wait_until("all 200 events after the restart", || async {
            let got: BTreeSet<String> = peer.inbox.event_ids("10").into_iter().collect();
            sent.iter().all(|id| got.contains(id))
        })
        .await;
        // At most 50 PDUs per transaction.
        assert!(peer.inbox.transactions.lock().unwrap().iter().all(|t| t.pdus.len() <= 50));
    }
    finish(s).await;
}
both_backends!(restart_with_queued_events_loses_nothing);

/// Inbound /send: at most 50 PDUs; origin must match; a repeated txn ID gets the same answer.
async fn send_transaction_limits_and_dedup(db: DbKind) {
    let s = setup(db, &["third.test"], |_| {}).await;
    let third = &s.peers[0];
    let pdus: Vec<Value> = (0..51).map(|_| json!({})).collect();
    let big = json!({ "origin": "third.test", "origin_server_ts": 1, "pdus": pdus });
    let (status, body) = third.call(&s.gw.base, GW, Method::PUT, "/_matrix/federation/v1/send/big", Some(&big)).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_BAD_JSON")));
    let spoof = json!({ "origin": "someone.else", "origin_server_ts": 1, "pdus": [] });
    let (status, _) = third.call(&s.gw.base, GW, Method::PUT, "/_matrix/federation/v1/send/spoof", Some(&spoof)).await;
    assert_eq!(status, 400);
    // A PDU for a room we do not know: a per-PDU error, the transaction itself succeeds.
    let (pdu, id) =
        third.build_pdu("10", "!unknown:gw.test", "carol", "m.room.message", None, json!({ "body": "x" }), &[], &[], 1);
    let txn = json!({ "origin": "third.test", "origin_server_ts": 1, "pdus": [pdu] });
    let (status, first) = third.call(&s.gw.base, GW, Method::PUT, "/_matrix/federation/v1/send/once", Some(&txn)).await;
    assert_eq!(status, 200);
    assert!(first["pdus"][&id]["error"].is_string(), "{first}");
    let (_, again) = third.call(&s.gw.base, GW, Method::PUT, "/_matrix/federation/v1/send/once", Some(&txn)).await;
    assert_eq!(first, again);
    finish(s).await;
}
both_backends!(send_transaction_limits_and_dedup);

/// Forged PDUs sent into a room are refused and leave no trace: a bad signature, a room_id that
/// is not the room's, a sender from another server; a bad content hash is stored redacted.
async fn forged_pdus_are_refused(db: DbKind) {
    let s = setup(db, &["third.test"], |_| {}).await;
    let third = &s.peers[0];
    let rooms = &s.gw.state().rooms;
    let room_id = RoomId::parse(&s.room).unwrap();
    let (create, power, join_rules) = (
        state_id(&s.gw, &s.room, "m.room.create").await,
        state_id(&s.gw, &s.room, "m.room.power_levels").await,
        state_id(&s.gw, &s.room, "m.room.join_rules").await,
    );
    let latest = latest(&s.gw, &s.room).await;
    let before = rooms.latest_stream_pos(&room_id).await.unwrap();
    let prev = [latest.pdu.event_id.to_string()];
    let auth = [create.clone(), power.clone(), join_rules.clone()];
    let depth = latest.pdu.depth + 1;

    // 1. Bad signature: signed, then the content changed and the hash recomputed.
    let (mut forged, _) = third.build_pdu(
        "10",
        &s.room,
        "carol",
        "m.room.member",
        Some("@carol:third.test"),
        json!({ "membership": "join" }),
        &auth,
        &prev,
        depth,
    );
    forged["content"]["displayname"] = json!("mallory");
    forged["hashes"]["sha256"] = json!(support::verify::content_hash(&forged));
    // 2. room_id of another of our rooms, with this room's auth and prev events.
    let second = s.alice.create_world_readable_room("second", "10").await;
    let (other_room, _) = third.build_pdu(
        "10",
        &second,
        "carol",
        "m.room.member",
        Some("@carol:third.test"),
        json!({ "membership": "join" }),
        &auth,
        &prev,
        depth,
    );
    // 3. A sender on a server other than the signer.
    let (mut impostor, _) = third.build_pdu(
        "10",
        &s.room,
        "carol",
        "m.room.member",
        Some("@carol:third.test"),
        json!({ "membership": "join" }),
        &auth,
        &prev,
        depth,
    );
    impostor["sender"] = json!("@alice:gw.test");
    let txn = json!({ "origin": "third.test", "origin_server_ts": 1, "pdus": [forged, other_room, impostor] });
    let (status, answer) =
        third.call(&s.gw.base, GW, Method::PUT, "/_matrix/federation/v1/send/forged", Some(&txn)).await;
    assert_eq!(status, 200);
    let results = answer["pdus"].as_object().unwrap();
    assert_eq!(results.len(), 3, "{answer}");
    assert!(results.values().all(|r| r["error"].is_string()), "{answer}");
    assert_eq!(rooms.latest_stream_pos(&room_id).await.unwrap(), before, "nothing stored");
    assert_eq!(s.gw.metric("peekgate_federation_received_pdus_total{result=\"rejected\"}").await, 3.0);

    // 4. A bad content hash with a valid signature: stored only in its redacted form.
    let (mut tampered, tampered_id) = third.build_pdu(
        "10",
        &s.room,
        "carol",
        "m.room.member",
        Some("@carol:third.test"),
        json!({ "membership": "join", "displayname": "Carol" }),
        &auth,
        &prev,
        depth,
    );
    tampered["content"]["displayname"] = json!("Mallory"); // not covered by the redacted signature
    let txn = json!({ "origin": "third.test", "origin_server_ts": 1, "pdus": [tampered] });
    let (status, answer) =
        third.call(&s.gw.base, GW, Method::PUT, "/_matrix/federation/v1/send/hash", Some(&txn)).await;
    assert_eq!(status, 200);
    assert_eq!(answer["pdus"][&tampered_id], json!({}), "{answer}");
    let stored = rooms.event(&tampered_id).await.unwrap().unwrap();
    assert_eq!(stored.pdu.content_value(), json!({ "membership": "join" }), "redacted, no displayname");
    finish(s).await;
}
both_backends!(forged_pdus_are_refused);

/// H10, intake step 1: a PDU that lists more signature entries than any signer needs is refused
/// by the format check, which runs before any key is looked up (so its cost does not grow with
/// the list); a huge list is refused by the format rules (64 KiB) alike. Each gets a per-PDU
/// error; nothing is stored.
async fn h10_signature_lists_are_bounded_before_key_lookups(db: DbKind) {
    let s = setup(db, &["third.test"], |_| {}).await;
    let third = &s.peers[0];
    let room_id = RoomId::parse(&s.room).unwrap();
    let (create, power, join_rules) = (
        state_id(&s.gw, &s.room, "m.room.create").await,
        state_id(&s.gw, &s.room, "m.room.power_levels").await,
        state_id(&s.gw, &s.room, "m.room.join_rules").await,
    );
    let latest = latest(&s.gw, &s.room).await;
    let before = s.gw.state().rooms.latest_stream_pos(&room_id).await.unwrap();
    let with_signatures = |servers: usize, keys_each: usize| {
        let (mut pdu, _) = third.build_pdu(
            "10",
            &s.room,
            "carol",
            "m.room.member",
            Some("@carol:third.test"),
            json!({ "membership": "join" }),
            &[create.clone(), power.clone(), join_rules.clone()],
            &[latest.pdu.event_id.to_string()],
            latest.pdu.depth + 1,
        );
        let valid = pdu["signatures"]["third.test"].clone();
        let mut signatures = serde_json::Map::new();
        for server in 0..servers {
            let mut keys = serde_json::Map::new();
            for key in 0..keys_each {
                keys.insert(format!("ed25519:k{key}"), valid["ed25519:p1"].clone());
            }
            signatures.insert(format!("s{server}.example"), Value::Object(keys));
        }
        signatures.insert("third.test".to_owned(), valid);
        pdu["signatures"] = Value::Object(signatures);
        pdu
    };
    let (status, answer) = third.send_transaction(&s.gw.base, GW, vec![with_signatures(4, 4)]).await;
    assert_eq!(status, 200, "{answer}");
    let error = answer["pdus"].as_object().unwrap().values().next().unwrap()["error"].as_str().unwrap_or("").to_owned();
    assert!(error.contains("signature entries"), "{answer}");
    let (status, answer) = third.send_transaction(&s.gw.base, GW, vec![with_signatures(200, 100)]).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["pdus"].as_object().unwrap().values().all(|r| r["error"].is_string()), "{answer}");
    assert_eq!(s.gw.state().rooms.latest_stream_pos(&room_id).await.unwrap(), before, "nothing stored");
}
both_backends!(h10_signature_lists_are_bounded_before_key_lookups);

/// Every contract metric name is exposed, and the exposition parses as Prometheus text.
async fn metrics_expose_every_contract_name(db: DbKind) {
    let server = ServerSpec::new(GW, db).start().await;
    let addr = server.running().metrics_addr.unwrap();
    let text = reqwest::get(format!("http://{addr}/metrics")).await.unwrap().text().await.unwrap();
    for name in peekgate::metrics::CONTRACT {
        assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
    }
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap();
        assert!(value.parse::<f64>().is_ok(), "{line}");
        let name = series.split('{').next().unwrap();
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'), "{line}");
    }
    server.stop().await;
}
both_backends!(metrics_expose_every_contract_name);

/// The eviction job also forgets answers to transactions received over a day ago (the
/// `(origin, txn_id)` de-duplication window), keeping recent ones.
async fn old_transaction_answers_are_forgotten(db: DbKind) {
    use diesel::prelude::*;
    use peekgate::db::schema::received_txns;
    let gw = ServerSpec::new(GW, db).start().await;
    let now = chrono::Utc::now().timestamp_millis();
    let rows = vec![
        (
            received_txns::origin.eq("p.test"),
            received_txns::txn_id.eq("old"),
            received_txns::response.eq("{}"),
            received_txns::received_ts.eq(now - 2 * 86_400_000),
        ),
        (
            received_txns::origin.eq("p.test"),
            received_txns::txn_id.eq("new"),
            received_txns::response.eq("{}"),
            received_txns::received_ts.eq(now),
        ),
    ];
    let state = gw.state();
    state
        .db
        .run::<_, peekgate::db::DbError, _>(move |conn| {
            for row in rows {
                diesel::insert_into(received_txns::table).values(row).execute(conn)?;
            }
            Ok(())
        })
        .await
        .unwrap();
    peekgate::schedule::evict_inbound(&state.jobs()).await.unwrap();
    let left: Vec<String> = state
        .db
        .run::<_, peekgate::db::DbError, _>(|conn| Ok(received_txns::table.select(received_txns::txn_id).load(conn)?))
        .await
        .unwrap();
    assert_eq!(left, ["new"]);
}
both_backends!(old_transaction_answers_are_forgotten);

/// FP-4 interop switch: with `federation.peek.lenient_peek_ids`, a Dendrite-style peek_id (the
/// room ID itself) is accepted, renewed and deleted; without it the same request is refused.
async fn fp4_lenient_peek_ids_for_dendrite(db: DbKind) {
    let s = setup(db, &["dendrite.test"], |c| c.federation.peek.lenient_peek_ids = true).await;
    let peer = &s.peers[0];
    let (status, answer) = put_peek(peer, &s.gw, &s.room, &s.room, "?ver=10").await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["state"].is_array(), "{answer}");
    let (status, answer) = put_peek(peer, &s.gw, &s.room, &s.room, "?ver=10").await;
    assert_eq!((status, answer), (200, json!({})));
    let (status, _) = peer.call(&s.gw.base, GW, Method::DELETE, &peek_path(&s.room, &s.room), None).await;
    assert_eq!(status, 200);
    finish(s).await;

    let strict = setup(db, &["dendrite.test"], |_| {}).await;
    let (status, answer) = put_peek(&strict.peers[0], &strict.gw, &strict.room, &strict.room, "?ver=10").await;
    assert_eq!((status, answer["errcode"].as_str()), (400, Some("M_UNRECOGNIZED")), "{answer}");
    finish(strict).await;
}
both_backends!(fp4_lenient_peek_ids_for_dendrite);

/// Runs SQL statements on the gateway's database (rows the tests need as they are).
async fn run_sql(state: &peekgate::state::AppState, statements: Vec<String>) {
    state
        .db
        .run::<_, peekgate::db::DbError, _>(move |conn| {
            for statement in statements {
                diesel::RunQueryDsl::execute(diesel::sql_query(statement), conn)?;
            }
            Ok(())
        })
        .await
        .unwrap();
}

/// The eviction job forgets a destination that keeps failing, never answered (or not for a
/// week) and has no peek left, with its undelivered notices; failing destinations that still
/// have a peek, and healthy ones, stay.
async fn dead_destinations_are_forgotten(db: DbKind) {
    let gw = ServerSpec::new(GW, db).start().await;
    let now = chrono::Utc::now().timestamp_millis();
    let statements = vec![
        "INSERT INTO destinations (server_name, last_sent_pos, failure_count) VALUES ('dead.test', 0, 5)".to_owned(),
        format!("INSERT INTO destinations (server_name, last_sent_pos, failure_count, last_success_ts) VALUES ('stale.test', 0, 5, {})", now - 8 * 86_400_000),
        "INSERT INTO destinations (server_name, last_sent_pos, failure_count) VALUES ('peeking.test', 0, 5)".to_owned(),
        format!("INSERT INTO destinations (server_name, last_sent_pos, failure_count, last_success_ts) VALUES ('healthy.test', 0, 0, {now})"),
        "INSERT INTO peek_notices (destination, room_id, peek_id, after_pos) VALUES ('dead.test', '!r:gw.test', 'p', 0)".to_owned(),
        format!(
            "INSERT INTO inbound_peeks (origin, room_id, peek_id, created_ts, renewed_ts, renewal_interval_ms, expires_ts, start_stream_pos) \
             VALUES ('peeking.test', '!r:gw.test', 'p', {now}, {now}, 3600000, {}, 0)",
            now + 3_600_000
        ),
    ];
    let state = gw.state();
    run_sql(state, statements).await;
    peekgate::schedule::evict_inbound(&state.jobs()).await.unwrap();
    let left: Vec<String> =
        peekgate::admin::destinations(&state.db).await.unwrap().into_iter().map(|d| d.server_name).collect();
    assert_eq!(left, ["healthy.test", "peeking.test"]);
    let notices = state
        .db
        .run::<_, peekgate::db::DbError, _>(|conn| {
            use diesel::prelude::*;
            Ok(peekgate::db::schema::peek_notices::table.count().get_result::<i64>(conn)?)
        })
        .await
        .unwrap();
    assert_eq!(notices, 0);
}
both_backends!(dead_destinations_are_forgotten);

/// RE-2 / PE-7 (#13): the sweep queues notices with plain inserts; a peek that lapses while a
/// notice for the same peek is still pending (it lapsed, came back under its ID and lapsed
/// again) is evicted all the same, beside the others, with one notice each.
async fn a_pending_notice_does_not_stop_the_sweep(db: DbKind) {
    let gw = ServerSpec::new(GW, db).start().await;
    let now = chrono::Utc::now().timestamp_millis();
    let lapsed = |origin: &str| {
        format!(
            "INSERT INTO inbound_peeks (origin, room_id, peek_id, created_ts, renewed_ts, renewal_interval_ms, expires_ts, start_stream_pos) \
             VALUES ('{origin}', '!r:gw.test', 'p', {now}, {now}, 3600000, {}, 0)",
            now - 1
        )
    };
    let statements = vec![
        "INSERT INTO peek_notices (destination, room_id, peek_id, after_pos) VALUES ('again.test', '!r:gw.test', 'p', 0)"
            .to_owned(),
        lapsed("again.test"),
        lapsed("other.test"),
    ];
    let state = gw.state();
    run_sql(state, statements).await;
    let (lapsed, _) = peekgate::schedule::evict_inbound(&state.jobs()).await.unwrap();
    assert_eq!(lapsed, 2);
    let (peeks, notices) = state
        .db
        .run::<_, peekgate::db::DbError, _>(|conn| {
            use diesel::prelude::*;
            use peekgate::db::schema::{inbound_peeks, peek_notices};
            let peeks = inbound_peeks::table.count().get_result::<i64>(conn)?;
            let notices: Vec<String> =
                peek_notices::table.select(peek_notices::destination).order(peek_notices::destination).load(conn)?;
            Ok((peeks, notices))
        })
        .await
        .unwrap();
    assert_eq!(peeks, 0);
    assert_eq!(notices, ["again.test", "other.test"]);
}
both_backends!(a_pending_notice_does_not_stop_the_sweep);
