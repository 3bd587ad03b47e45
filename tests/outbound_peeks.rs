//! Outbound peeks and the MSC2753 client API (peeking.md §5-7: OP-*, CP-*, TBD-1) over real
//! HTTP: gateway B's users peek rooms of gateway A through signed federation requests, on
//! PostgreSQL and SQLite. Hostile or non-implementing targets are test peers with their own keys.

mod support;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use reqwest::Method;
use serde_json::{json, Value};
use support::client::{enc, Client};
use support::gateways::{fast_schedule, open_registration, pair, A, B};
use support::peer::{KeyMode, TestPeer};
use support::peer_room::PeerRoom;
use support::{wait_until, DbKind, ServerSpec, TestServer};

/// Live inbound peeks A holds (all from B in these tests).
async fn peeks_at(server: &TestServer) -> i64 {
    server.state().inbound.live_count().await.unwrap()
}

fn bodies(timeline: &Value) -> Vec<String> {
    timeline["events"]
        .as_array()
        .map(|events| events.iter().filter_map(|e| e["content"]["body"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// Syncs (long-polling) from `since` until `check` holds for the accumulated responses of the
/// room's `section`; returns the last token.
async fn sync_until(client: &Client, mut since: String, what: &str, mut check: impl FnMut(&Value) -> bool) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let answer = client.sync(Some(&since), 5_000).await;
        since = answer["next_batch"].as_str().unwrap().to_owned();
        if check(&answer) {
            return since;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for: {what}");
    }
}

fn token(answer: &Value) -> String {
    answer["next_batch"].as_str().unwrap().to_owned()
}

/// OP-1..4, CP-1, CP-2, CP-9, OP-2: B's device peeks A's room by alias; the state shows in
/// `rooms.peek`, A's new events reach B's long-polling sync, and A holds one peek however many
/// of B's devices peek.
async fn peek_by_alias_and_watch_live(db: DbKind) {
    let p = pair(db, |_| {}, |_| {}, &[]).await;
    let second = p.bob.login_device().await;
    let t0 = token(&p.bob.sync(None, 0).await);
    let t0_second = token(&second.sync(None, 0).await);

    let (status, answer) = p.bob.peek("#lobby:a.test", &[]).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["room_id"], p.room);
    assert!(answer["peek_expiry_ts"].as_i64().unwrap() > chrono::Utc::now().timestamp_millis());

    let first = p.bob.sync(Some(&t0), 0).await;
    let entry = &first["rooms"]["peek"][&p.room];
    let state_types: BTreeSet<&str> = entry["state"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .chain(entry["timeline"]["events"].as_array().unwrap())
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    for kind in ["m.room.create", "m.room.history_visibility", "m.room.power_levels", "m.room.member"] {
        assert!(state_types.contains(kind), "first peek entry lacks {kind}: {entry}");
    }
    assert_eq!(entry["ephemeral"]["events"], json!([]));
    assert!(first["rooms"]["join"].get(&p.room).is_none());

    // A second device of bob peeks the same room: still one federation peek at A (OP-2).
    let (status, _) = second.peek(&p.room, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(peeks_at(&p.a).await, 1);
    // CP-4: peeking again from the same device is idempotent.
    assert_eq!(p.bob.peek(&p.room, &[]).await.0, 200);

    let mut since = token(&first);
    for i in 0..3 {
        let body = format!("live {i}");
        p.alice.say(&p.room, &body).await;
        since = sync_until(&p.bob, since, &body, |answer| {
            bodies(&answer["rooms"]["peek"][&p.room]["timeline"]).contains(&body)
        })
        .await;
    }
    // Only the device that peeks sees the room: bob's second device saw it from its own peek on.
    let seen = second.sync(Some(&t0_second), 0).await;
    let timeline = bodies(&seen["rooms"]["peek"][&p.room]["timeline"]);
    assert_eq!(timeline, ["live 0", "live 1", "live 2"], "{seen}");
    assert_eq!(peeks_at(&p.a).await, 1);
    assert_eq!(p.b.metric("peekgate_federation_received_pdus_total{result=\"rejected\"}").await, 0.0);
}
both_backends!(peek_by_alias_and_watch_live);

/// CP-6, CP-7, CP-12, OP-8: unpeek gives one leave entry; A gets DELETE when B's last device
/// stops; unpeek errors.
async fn unpeek_leaves_once_and_deletes_the_remote_peek(db: DbKind) {
    let p = pair(db, |_| {}, |c| c.peeks.outbound_linger_ms = 300, &[]).await;
    let second = p.bob.login_device().await;
    let t0 = token(&p.bob.sync(None, 0).await);
    second.sync(None, 0).await;
    assert_eq!(p.bob.peek("#lobby:a.test", &[]).await.0, 200);
    assert_eq!(second.peek("#lobby:a.test", &[]).await.0, 200);
    let t1 = token(&p.bob.sync(Some(&t0), 0).await);
    p.alice.say(&p.room, "before unpeek").await;
    let t1 = sync_until(&p.bob, t1, "message before unpeek", |a| a["rooms"]["peek"].get(&p.room).is_some()).await;

    let (status, answer) = p.bob.unpeek(&p.room).await;
    assert_eq!((status, answer), (200, json!({})));
    let after = p.bob.sync(Some(&t1), 0).await;
    assert!(after["rooms"]["leave"].get(&p.room).is_some(), "no leave entry: {after}");
    assert!(after["rooms"].get("peek").is_none_or(|peek| peek.get(&p.room).is_none()));
    let again = p.bob.sync(Some(&token(&after)), 0).await;
    assert!(again["rooms"]["leave"].get(&p.room).is_none(), "leave shown twice: {again}");
    // The other device still peeks: A keeps its one peek.
    assert_eq!(peeks_at(&p.a).await, 1);

    let (status, answer) = p.bob.unpeek(&p.room).await;
    assert_eq!((status, answer["errcode"].as_str()), (400, Some("M_BAD_STATE")));
    let (status, answer) = p.bob.unpeek("!unknown:a.test").await;
    assert_eq!((status, answer["errcode"].as_str()), (404, Some("M_NOT_FOUND")));
    // Bad /sync parameters are Matrix errors too.
    for query in ["timeout=soon", "since=yesterday", "since=s1", "timeout=-5"] {
        let (status, answer) =
            p.bob.call(reqwest::Method::GET, &format!("/_matrix/client/v3/sync?{query}"), None).await;
        assert_eq!((status, answer["errcode"].as_str()), (400, Some("M_INVALID_PARAM")), "{query}: {answer}");
    }

    assert_eq!(second.unpeek(&p.room).await.0, 200);
    assert_eq!(peeks_at(&p.a).await, 0, "A still holds a peek after B's last device stopped");
    // Nothing left behind on B either: the outbound peek and B's copy of the room are forgotten.
    let room_id = ruma::RoomId::parse(&p.room).unwrap();
    wait_until("B forgets the room", || async { p.b.state().rooms.room(&room_id).await.unwrap().is_none() }).await;
    assert!(peekgate::peeks::outbound::get(&p.b.state().outbound, &room_id).await.unwrap().is_none());
    let leftover = p.b.state().rooms.events_in_range(&room_id, 0, true, 10).await;
    assert!(leftover.is_err() || leftover.unwrap().is_empty());
    let report = peekgate::admin::peeks(&p.b.state().db).await.unwrap();
    assert!(report.outbound.is_empty() && report.device.is_empty(), "{report:?}");
    // A sync from a token older than the unpeek still works, with an empty leave entry.
    let late = p.bob.sync(Some(&t1), 0).await;
    assert_eq!(late["rooms"]["leave"][&p.room], json!({}), "{late}");
}
both_backends!(unpeek_leaves_once_and_deletes_the_remote_peek);

/// OP-7: B renews before A's interval lapses (A advertises a short interval), so A never
/// evicts the peek while bob keeps syncing.
async fn renewals_keep_the_peek_alive(db: DbKind) {
    let short = |c: &mut peekgate::config::Config| {
        // B renews every 3 s (half the interval, on a job that runs every second); A evicts
        // after 6.6 s: seconds of margin for a loaded machine.
        c.peeks.renewal_interval_ms = 6_000;
        c.peeks.eviction_grace_ms = 1_000;
        c.schedule.evict_inbound = "* * * * * *".into();
    };
    let p = pair(db, short, |_| {}, &[]).await;
    let mut since = token(&p.bob.sync(None, 0).await);
    assert_eq!(p.bob.peek(&p.room, &[]).await.0, 200);
    let renewed = "peekgate_peek_renewals_total{direction=\"inbound\",result=\"ok\"}";
    wait_until("A sees three renewals from B", || async { p.a.metric(renewed).await >= 3.0 }).await;
    // Well past the first interval plus grace: the peek is still live, and events still arrive.
    assert_eq!(peeks_at(&p.a).await, 1);
    assert!(p.b.metric("peekgate_peek_renewals_total{direction=\"outbound\",result=\"ok\"}").await >= 3.0);
    p.alice.say(&p.room, "still here").await;
    since = sync_until(&p.bob, since, "event after renewals", |a| {
        bodies(&a["rooms"]["peek"][&p.room]["timeline"]).contains(&"still here".to_owned())
    })
    .await;
    assert!(!since.is_empty());
    assert_eq!(p.a.metric("peekgate_peek_evictions_total{reason=\"lapsed\"}").await, 0.0);
    // The job's gauges: one federation peek, one live device peek.
    assert_eq!(p.b.metric("peekgate_outbound_peeks").await, 1.0);
    assert_eq!(p.b.metric("peekgate_device_peeks").await, 1.0);
}
both_backends!(renewals_keep_the_peek_alive);

/// TBD-1: a device that stops syncing makes B DELETE the peek at A; when it syncs again B
/// re-peeks before answering and the room comes back with `limited: true`.
async fn idle_device_deletes_then_repeeks_with_a_gap(db: DbKind) {
    let p = pair(db, |_| {}, |c| c.peeks.idle_device_ms = 1_500, &[]).await;
    let since = token(&p.bob.sync(None, 0).await);
    assert_eq!(p.bob.peek(&p.room, &[]).await.0, 200);
    let since = token(&p.bob.sync(Some(&since), 0).await);
    wait_until("A receives DELETE after bob idles", || async { peeks_at(&p.a).await == 0 }).await;
    p.alice.say(&p.room, "said while bob was away").await;

    let back = p.bob.sync(Some(&since), 0).await;
    let entry = &back["rooms"]["peek"][&p.room];
    assert_eq!(entry["timeline"]["limited"], true, "{back}");
    assert_eq!(peeks_at(&p.a).await, 1, "B did not re-peek");
    // Told once: the next sync has no gap to report.
    let next = p.bob.sync(Some(&token(&back)), 0).await;
    assert!(next["rooms"].get("peek").is_none_or(|peek| peek.get(&p.room).is_none()), "{next}");
}
both_backends!(idle_device_deletes_then_repeeks_with_a_gap);

/// CP-8: a sync without `since` ends the device's peeks (and the federation peek).
async fn initial_sync_clears_the_devices_peeks(db: DbKind) {
    let p = pair(db, |_| {}, |_| {}, &[]).await;
    p.bob.sync(None, 0).await;
    assert_eq!(p.bob.peek(&p.room, &[]).await.0, 200);
    let fresh = p.bob.sync(None, 0).await;
    assert!(fresh["rooms"].get("peek").is_none_or(|peek| peek.get(&p.room).is_none()), "{fresh}");
    assert!(fresh["rooms"]["leave"].get(&p.room).is_none(), "{fresh}");
    p.alice.say(&p.room, "after reset").await;
    let later = p.bob.sync(Some(&token(&fresh)), 1_000).await;
    assert!(later["rooms"].get("peek").is_none_or(|peek| peek.get(&p.room).is_none()), "{later}");
    assert_eq!(peeks_at(&p.a).await, 0);
}
both_backends!(initial_sync_clears_the_devices_peeks);

/// CP-3, OP-5, item 7 and 8 of the issue: clear errors for unknown aliases, rooms that are not
/// world-readable, malformed IDs, and targets that do not implement peeking or are down.
async fn peek_errors_are_clear(db: DbKind) {
    let unaware = TestPeer::start("unaware.test", KeyMode::Good);
    let nothing_listens = |c: &mut peekgate::config::Config| {
        c.federation.destinations.insert("down.test".into(), "http://127.0.0.1:1".into());
    };
    let p = pair(db, |_| {}, nothing_listens, &[&unaware]).await;
    let shared = p
        .alice
        .create_room(json!({
            "preset": "public_chat",
            "room_alias_name": "private",
            "room_version": "10",
            "initial_state": [{ "type": "m.room.history_visibility", "content": { "history_visibility": "shared" } }],
        }))
        .await;
    p.bob.sync(None, 0).await;
    let cases: Vec<(&str, Vec<&str>, u16, &str)> = vec![
        ("#nobody:a.test", vec![], 404, "M_NOT_FOUND"),
        ("#private:a.test", vec![], 403, "M_FORBIDDEN"),
        (shared.as_str(), vec![], 403, "M_FORBIDDEN"),
        ("lobby", vec![], 400, "M_INVALID_PARAM"),
        ("#nodomain", vec![], 400, "M_INVALID_PARAM"),
        // A room ID without a server part (room version 12 style): no candidate to ask.
        ("!serverless", vec![], 404, "M_NOT_FOUND"),
        // Synapse today: 404 M_UNRECOGNIZED for the peek endpoint.
        ("!room:unaware.test", vec![], 404, "M_NOT_FOUND"),
        // Nothing listens there (a reserved, closed port).
        ("!room:down.test", vec![], 404, "M_NOT_FOUND"),
    ];
    for (target, servers, status, errcode) in cases {
        let (got, answer) = p.bob.peek(target, &servers).await;
        assert_eq!((got, answer["errcode"].as_str()), (status, Some(errcode)), "{target}: {answer}");
    }
    assert_eq!(unaware.inbox.peek_requests("PUT").len(), 1);
}
both_backends!(peek_errors_are_clear);

/// OP-4, OP-5: a hostile first candidate answers with a forged event in `state`, a tampered
/// hash, an event of another room or a room that is not world-readable: nothing of it is
/// stored, B DELETEs that peek and takes the next candidate (A).
async fn hostile_target_answers_are_refused(db: DbKind) {
    let evil = TestPeer::start("evil.test", KeyMode::Good);
    // This test peeks and unpeeks more than a device normally may in a minute.
    let p = pair(db, |_| {}, |c| c.client.peek.burst = 100, &[&evil]).await;
    p.bob.sync(None, 0).await;
    // A genuine answer for the room, obtained by the peer from A.
    let path = format!("/_matrix/federation/v1/peek/{}/genuine?ver=10", enc(&p.room));
    let (status, genuine) = evil.call(&p.a.base, A, Method::PUT, &path, Some(&json!({}))).await;
    assert_eq!(status, 200, "{genuine}");

    let create = genuine["state"].as_array().unwrap().iter().find(|e| e["type"] == "m.room.create").unwrap().clone();
    let mut forged_topic = json!({
        "room_id": p.room, "sender": p.alice.user_id, "type": "m.room.topic", "state_key": "",
        "content": { "topic": "forged" }, "auth_events": [], "prev_events": [], "depth": 99,
        "origin_server_ts": 1, "origin": A,
        "hashes": { "sha256": "" },
    });
    forged_topic["hashes"]["sha256"] = json!(support::verify::content_hash(&forged_topic));
    // Signed by the peer's key under A's name: a forged signature.
    let sig = support::peer::sign_value(&evil.key, &support::verify::redact(&forged_topic, "10"));
    forged_topic["signatures"] = json!({ A: { "ed25519:a_key": sig.clone() } });
    let forged_id = support::verify::event_id(&forged_topic, "10");

    let mut with_forged = genuine.clone();
    with_forged["state"].as_array_mut().unwrap().push(forged_topic);
    let mut bad_hash = genuine.clone();
    let hv = bad_hash["state"].as_array_mut().unwrap().iter_mut().find(|e| e["type"] == "m.room.join_rules").unwrap();
    hv["content"]["join_rule"] = json!("invite");
    let mut wrong_room = genuine.clone();
    wrong_room["state"].as_array_mut().unwrap()[0]["room_id"] = json!("!other:a.test");
    let mut not_readable = genuine.clone();
    not_readable["state"].as_array_mut().unwrap().retain(|e| e["type"] != "m.room.history_visibility");
    // A second, validly signed create event (by the peer's own user) in the auth chain.
    let mut two_creates = genuine.clone();
    let mut content = create["content"].clone();
    content["creator"] = json!("@mallory:evil.test");
    let (other_create, _) = evil.build_pdu("10", &p.room, "mallory", "m.room.create", Some(""), content, &[], &[], 1);
    two_creates["auth_chain"].as_array_mut().unwrap().push(other_create);

    for (case, answer) in [
        ("forged signature", with_forged),
        ("bad hash", bad_hash),
        ("wrong room_id", wrong_room),
        ("not world-readable", not_readable),
        ("two create events", two_creates),
    ] {
        *evil.inbox.peek_answer.lock().unwrap() = Some((200, answer));
        let before = evil.inbox.peek_requests("DELETE").len();
        let (status, answer) = p.bob.peek(&p.room, &["evil.test"]).await;
        assert_eq!(status, 200, "{case}: the next candidate should have been used: {answer}");
        let deletes = evil.inbox.peek_requests("DELETE");
        assert_eq!(deletes.len(), before + 1, "{case}: no DELETE for the refused peek");
        let put = evil.inbox.peek_requests("PUT").last().unwrap().split('?').next().unwrap().to_owned();
        assert_eq!(deletes.last().unwrap(), &put, "{case}: DELETE names another peek");
        let peek = peekgate::peeks::outbound::get(&p.b.state().outbound, &ruma::RoomId::parse(&p.room).unwrap())
            .await
            .unwrap();
        assert_eq!(peek.unwrap().target, A, "{case}");
        // Reset for the next case: nobody peeks, so the next /peek starts over with evil.test.
        assert_eq!(p.bob.unpeek(&p.room).await.0, 200);
    }
    assert!(p.b.state().rooms.event(&forged_id).await.unwrap().is_none(), "the forged event was stored");
    let join_rules =
        p.b.state().rooms.state_event(&ruma::RoomId::parse(&p.room).unwrap(), "m.room.join_rules", "").await;
    assert_eq!(join_rules.unwrap().unwrap().content_value()["join_rule"], "public");

    // With no other candidate, the client gets the error itself: a room of the hostile server
    // that is not world-readable is 403, an answer with a forged event is 404 (OP-5).
    let own = PeerRoom::create(&evil, "mallory");
    let mut unreadable = own.peek_answer(60_000);
    unreadable["state"].as_array_mut().unwrap().retain(|e| e["type"] != "m.room.history_visibility");
    *evil.inbox.peek_answer.lock().unwrap() = Some((200, unreadable));
    let (status, answer) = p.bob.peek(&own.room_id, &[]).await;
    assert_eq!((status, answer["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{answer}");
    let mut forged = own.peek_answer(60_000);
    let first = &mut forged["state"].as_array_mut().unwrap()[0];
    first["signatures"] = json!({ "evil.test": { "ed25519:p1": sig } });
    *evil.inbox.peek_answer.lock().unwrap() = Some((200, forged));
    let (status, answer) = p.bob.peek(&own.room_id, &[]).await;
    assert_eq!((status, answer["errcode"].as_str()), (404, Some("M_NOT_FOUND")), "{answer}");
    let own_room = ruma::RoomId::parse(&own.room_id).unwrap();
    assert!(p.b.state().rooms.room(&own_room).await.unwrap().is_none(), "nothing of a refused answer is stored");
}
both_backends!(hostile_target_answers_are_refused);

/// OP-9: PDUs for rooms B does not peek, or from a server that is not B's target for the room,
/// get a per-PDU error; the transaction itself succeeds.
async fn pdus_for_rooms_not_peeked_are_refused_one_by_one(db: DbKind) {
    let evil = TestPeer::start("evil.test", KeyMode::Good);
    let p = pair(db, |_| {}, |_| {}, &[&evil]).await;
    p.bob.sync(None, 0).await;
    assert_eq!(p.bob.peek(&p.room, &[]).await.0, 200);
    let (pdu, id) =
        evil.build_pdu("10", &p.room, "mallory", "m.room.message", None, json!({ "body": "hi" }), &[], &[], 5);
    let (pdu2, id2) = evil.build_pdu(
        "10",
        "!nobody:evil.test",
        "mallory",
        "m.room.message",
        None,
        json!({ "body": "x" }),
        &[],
        &[],
        5,
    );
    let txn = json!({ "origin": "evil.test", "origin_server_ts": 1, "pdus": [pdu, pdu2] });
    let (status, answer) = evil.call(&p.b.base, B, Method::PUT, "/_matrix/federation/v1/send/t1", Some(&txn)).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["pdus"][&id]["error"].as_str().unwrap().contains("does not peek"), "{answer}");
    assert!(answer["pdus"][&id2]["error"].is_string(), "{answer}");
    assert!(p.b.state().rooms.event(&id).await.unwrap().is_none());
}
both_backends!(pdus_for_rooms_not_peeked_are_refused_one_by_one);

/// CP-10 (local room): a device peeking one of B's own rooms joins it; its next sync shows the
/// room in `join` with the join event and no full state, and not in `peek`; the user's other
/// peeking device loses its peek without a leave entry.
async fn joining_a_local_peeked_room_moves_it_to_join(db: DbKind) {
    let p = pair(db, |_| {}, |_| {}, &[]).await;
    let carol = Client::register(&p.b.base, "carol").await;
    let local = carol.create_world_readable_room("home", "11").await;
    let other = p.bob.login_device().await;
    let t = token(&p.bob.sync(None, 0).await);
    let t_other = token(&other.sync(None, 0).await);
    assert_eq!(p.bob.peek("#home:b.test", &[]).await.0, 200);
    assert_eq!(other.peek(&local, &[]).await.0, 200);
    let first = p.bob.sync(Some(&t), 0).await;
    assert!(first["rooms"]["peek"].get(&local).is_some(), "{first}");
    let t_other = token(&other.sync(Some(&t_other), 0).await);

    assert_eq!(p.bob.join(&local).await.0, 200);
    let (status, answer) = p.bob.peek(&local, &[]).await;
    assert_eq!((status, answer["errcode"].as_str()), (400, Some("M_BAD_STATE")));
    let joined = p.bob.sync(Some(&token(&first)), 0).await;
    let entry = &joined["rooms"]["join"][&local];
    assert!(
        entry["timeline"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "m.room.member" && e["state_key"] == p.bob.user_id.as_str()),
        "{joined}"
    );
    assert_eq!(entry["state"]["events"], json!([]), "full state resent: {joined}");
    assert!(joined["rooms"].get("peek").is_none_or(|peek| peek.get(&local).is_none()));
    assert!(joined["rooms"]["leave"].get(&local).is_none());
    let other_view = other.sync(Some(&t_other), 0).await;
    assert!(other_view["rooms"]["join"].get(&local).is_some(), "{other_view}");
    assert!(other_view["rooms"]["leave"].get(&local).is_none(), "{other_view}");
    assert!(other_view["rooms"].get("peek").is_none_or(|peek| peek.get(&local).is_none()));

    // Leaving the room: one leave entry ending with the leave event, then nothing.
    let path = format!("/_matrix/client/v3/rooms/{}/leave", enc(&local));
    assert_eq!(p.bob.call(reqwest::Method::POST, &path, Some(&json!({}))).await.0, 200);
    let left = p.bob.sync(Some(&token(&joined)), 0).await;
    let last = left["rooms"]["leave"][&local]["timeline"]["events"].as_array().unwrap().last().cloned();
    assert_eq!(last.map(|e| e["content"]["membership"].clone()), Some(json!("leave")), "{left}");
    assert!(left["rooms"]["join"].get(&local).is_none(), "{left}");
    let after = p.bob.sync(Some(&token(&left)), 0).await;
    assert!(after["rooms"]["leave"].get(&local).is_none(), "{after}");
}
both_backends!(joining_a_local_peeked_room_moves_it_to_join);

/// CP-11: when the peeked room's history stops being world-readable (on A), the change
/// reaches B, and bob's device gets a leave entry for the room once.
async fn visibility_change_ends_peeks_with_a_leave(db: DbKind) {
    let p = pair(db, |_| {}, |_| {}, &[]).await;
    let since = token(&p.bob.sync(None, 0).await);
    assert_eq!(p.bob.peek(&p.room, &[]).await.0, 200);
    let since = token(&p.bob.sync(Some(&since), 0).await);
    let (status, _) =
        p.alice.put_state(&p.room, "m.room.history_visibility", "", json!({ "history_visibility": "shared" })).await;
    assert_eq!(status, 200);
    let since = sync_until(&p.bob, since, "a leave entry", |a| a["rooms"]["leave"].get(&p.room).is_some()).await;
    let again = p.bob.sync(Some(&since), 0).await;
    assert!(again["rooms"]["leave"].get(&p.room).is_none(), "{again}");
    let (status, answer) = p.bob.peek(&p.room, &[]).await;
    assert_eq!((status, answer["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{answer}");
}
both_backends!(visibility_change_ends_peeks_with_a_leave);

/// Message bodies one device saw in a peeked room, over several syncs.
struct Seen {
    room_id: String,
    bodies: Vec<String>,
    gappy: bool,
}

impl Seen {
    fn take(&mut self, answer: &Value) -> &Vec<String> {
        let entry = &answer["rooms"]["peek"][&self.room_id];
        self.gappy |= entry["timeline"]["limited"] == true;
        self.bodies.extend(bodies(&entry["timeline"]));
        &self.bodies
    }
}

/// A room hosted by `one` that `two`'s relay has joined, so that either can serve it.
fn shared_room(one: &TestPeer, two: &TestPeer) -> (String, Arc<Mutex<PeerRoom>>) {
    let mut hosted = PeerRoom::create(one, "host");
    hosted.join(two, "relay");
    (hosted.room_id.clone(), Arc::new(Mutex::new(hosted)))
}

/// OP-5, OP-6: the first target disappears; B's renewals fail until the peek lapses, then the
/// second candidate takes over with a new peek, the gap is filled with get_missing_events, and
/// bob's sync misses no event. The targets are two peers serving the same room.
async fn failover_to_the_next_target_misses_no_event(db: DbKind) {
    let one = TestPeer::start("one.test", KeyMode::Good);
    let two = TestPeer::start("two.test", KeyMode::Good);
    let (room_id, hosted) = shared_room(&one, &two);
    for peer in [&one, &two] {
        *peer.inbox.hosted.lock().unwrap() = Some(hosted.clone());
    }
    let b = ServerSpec::new(B, db)
        .configure(open_registration)
        .configure(fast_schedule)
        .destination("one.test", &one.url)
        .destination("two.test", &two.url)
        .start()
        .await;
    let bob = Client::register(&b.base, "bob").await;
    let since = token(&bob.sync(None, 0).await);
    let (status, answer) = bob.peek(&room_id, &["one.test", "two.test"]).await;
    assert_eq!(status, 200, "{answer}");
    let mut seen = Seen { room_id: room_id.clone(), bodies: Vec::new(), gappy: false };
    let first = bob.sync(Some(&since), 0).await;
    seen.take(&first);
    let since = token(&first);

    let m1 = hosted.lock().unwrap().say(&one, "host", "m1");
    let (status, answer) = one.send_transaction(&b.base, B, vec![m1]).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["pdus"].as_object().unwrap().values().all(|r| r.get("error").is_none()), "{answer}");
    let since = sync_until(&bob, since, "m1", |a| seen.take(a).contains(&"m1".to_owned())).await;

    one.inbox.down.store(true, Ordering::SeqCst);
    hosted.lock().unwrap().say(&two, "relay", "m2");
    hosted.lock().unwrap().say(&one, "host", "m3");
    let room = ruma::RoomId::parse(&room_id).unwrap();
    wait_until("B fails over to two.test", || async {
        peekgate::peeks::outbound::get(&b.state().outbound, &room)
            .await
            .unwrap()
            .is_some_and(|p| p.target == "two.test")
    })
    .await;
    let since = sync_until(&bob, since, "m2 and m3", |a| seen.take(a).contains(&"m3".to_owned())).await;

    let m4 = hosted.lock().unwrap().say(&two, "relay", "m4");
    let (status, answer) = two.send_transaction(&b.base, B, vec![m4]).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["pdus"].as_object().unwrap().values().all(|r| r.get("error").is_none()), "{answer}");
    sync_until(&bob, since, "m4", |a| seen.take(a).contains(&"m4".to_owned())).await;
    assert_eq!(seen.bodies, ["m1", "m2", "m3", "m4"], "bob's sync missed or repeated an event");
    assert!(!seen.gappy, "the gap should have been filled, not reported");
    assert!(b.metric("peekgate_peek_renewals_total{direction=\"outbound\",result=\"failed\"}").await >= 1.0);
    assert_eq!(two.inbox.peek_requests("PUT").len(), 1);
}
both_backends!(failover_to_the_next_target_misses_no_event);

/// A room hosted by the test peer `one.test`, and bob on B peeking it through that peer.
struct HostedPeek {
    one: TestPeer,
    hosted: Arc<Mutex<PeerRoom>>,
    room_id: String,
    b: TestServer,
    bob: Client,
    /// A sync token after the room's first appearance in bob's sync.
    since: String,
}

async fn peeking_a_peer_room(db: DbKind) -> HostedPeek {
    let one = TestPeer::start("one.test", KeyMode::Good);
    let hosted = Arc::new(Mutex::new(PeerRoom::create(&one, "host")));
    let room_id = hosted.lock().unwrap().room_id.clone();
    *one.inbox.hosted.lock().unwrap() = Some(hosted.clone());
    let b = ServerSpec::new(B, db).configure(open_registration).destination("one.test", &one.url).start().await;
    let bob = Client::register(&b.base, "bob").await;
    let since = token(&bob.sync(None, 0).await);
    let (status, answer) = bob.peek(&room_id, &["one.test"]).await;
    assert_eq!(status, 200, "{answer}");
    let since = token(&bob.sync(Some(&since), 0).await);
    HostedPeek { one, hosted, room_id, b, bob, since }
}

/// OP-9 with a long gap: a pushed PDU 250 events ahead of B is linked up through several
/// `get_missing_events` pages of 100, and B ends up holding every event of the room.
async fn a_long_gap_is_filled_page_by_page(db: DbKind) {
    let HostedPeek { one, hosted, b, .. } = peeking_a_peer_room(db).await;
    for i in 0..250 {
        hosted.lock().unwrap().say(&one, "host", &format!("unseen {i}"));
    }
    let pushed = hosted.lock().unwrap().say(&one, "host", "pushed");
    let (status, answer) = one.send_transaction(&b.base, B, vec![pushed]).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["pdus"].as_object().unwrap().values().all(|r| r.get("error").is_none()), "{answer}");
    let ids: Vec<String> = hosted.lock().unwrap().events.iter().map(|(id, _)| id.clone()).collect();
    for id in &ids {
        assert!(b.state().rooms.event(id).await.unwrap().is_some(), "B lacks {id}");
    }
    assert!(one.inbox.missing_requests.load(Ordering::SeqCst) >= 3, "one page cannot hold 250 events");
}
both_backends!(a_long_gap_is_filled_page_by_page);

/// A gap longer than `get_missing_events` may walk (1,000 events): the pushed PDU is refused,
/// and B re-peeks the room through the same target for a new starting point instead of
/// refusing every later PDU too; bob's next sync marks the timeline `limited`.
async fn a_gap_too_long_to_fill_resyncs_the_room(db: DbKind) {
    let HostedPeek { one, hosted, room_id, b, bob, since } = peeking_a_peer_room(db).await;
    for i in 0..1_050 {
        hosted.lock().unwrap().say(&one, "host", &format!("unseen {i}"));
    }
    let pushed = hosted.lock().unwrap().say(&one, "host", "pushed");
    let (status, answer) = one.send_transaction(&b.base, B, vec![pushed]).await;
    assert_eq!(status, 200, "{answer}");
    let results: Vec<&Value> = answer["pdus"].as_object().unwrap().values().collect();
    assert!(results[0]["error"].as_str().unwrap().contains("prev events"), "{answer}");

    let pushed_id = hosted.lock().unwrap().events.last().unwrap().0.clone();
    wait_until("B re-syncs the room from a new peek", || async {
        b.state().rooms.event(&pushed_id).await.unwrap().is_some()
    })
    .await;
    let peek_ids = one.inbox.put_peek_ids();
    assert_eq!(peek_ids.len(), 2, "exactly one re-peek: {peek_ids:?}");
    wait_until("B DELETEs the old peek", || async { one.inbox.peek_requests("DELETE").len() == 1 }).await;
    let answer = bob.sync(Some(&since), 0).await;
    let timeline = &answer["rooms"]["peek"][&room_id]["timeline"];
    assert_eq!(timeline["limited"], true, "{answer}");
    assert_eq!(bodies(timeline).last().map(String::as_str), Some("pushed"), "{answer}");
}
both_backends!(a_gap_too_long_to_fill_resyncs_the_room);

/// CP-1, CP-6 under the other prefixes: `/peek` under `unstable/org.matrix.msc2753` with the
/// revision-B body `servers` (the room ID's own server is down, so only the body's candidate
/// can answer), `/unpeek` under `r0`, which ends the federation peek with a DELETE.
async fn unstable_and_r0_prefixes_with_body_servers(db: DbKind) {
    let one = TestPeer::start("one.test", KeyMode::Good);
    let two = TestPeer::start("two.test", KeyMode::Good);
    let (room_id, hosted) = shared_room(&one, &two);
    *two.inbox.hosted.lock().unwrap() = Some(hosted.clone());
    one.inbox.down.store(true, Ordering::SeqCst);
    let b = ServerSpec::new(B, db)
        .configure(open_registration)
        .destination("one.test", &one.url)
        .destination("two.test", &two.url)
        .start()
        .await;
    let bob = Client::register(&b.base, "bob").await;
    bob.sync(None, 0).await;
    let peek = format!("/_matrix/client/unstable/org.matrix.msc2753/peek/{}", enc(&room_id));
    let (status, answer) = bob.call(Method::POST, &peek, Some(&json!({ "servers": ["two.test"] }))).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["room_id"], room_id.as_str());
    assert!(answer["peek_expiry_ts"].as_i64().unwrap() > chrono::Utc::now().timestamp_millis(), "{answer}");
    assert_eq!(two.inbox.peek_requests("PUT").len(), 1);

    let unpeek = format!("/_matrix/client/r0/rooms/{}/unpeek", enc(&room_id));
    let (status, answer) = bob.call(Method::POST, &unpeek, Some(&json!({}))).await;
    assert_eq!((status, answer), (200, json!({})));
    wait_until("two.test receives the DELETE", || async { two.inbox.peek_requests("DELETE").len() == 1 }).await;
}
both_backends!(unstable_and_r0_prefixes_with_body_servers);

/// CP-14 and CP-3: a device's live peeks are capped, `/peek` calls are rate limited (429 with
/// `retry_after_ms`), and an encrypted room cannot be peeked.
async fn peek_limits_and_encrypted_rooms(db: DbKind) {
    let limits = |c: &mut peekgate::config::Config| {
        c.client.peek.max_per_device = 2;
        c.client.peek.per_minute = 1;
        c.client.peek.burst = 4;
    };
    let p = pair(db, |_| {}, limits, &[]).await;
    let carol = Client::register(&p.b.base, "carol").await;
    let rooms = [
        carol.create_world_readable_room("one", "11").await,
        carol.create_world_readable_room("two", "11").await,
        carol.create_world_readable_room("three", "11").await,
    ];
    let secret = carol.create_world_readable_room("secret", "11").await;
    let (status, _) =
        carol.put_state(&secret, "m.room.encryption", "", json!({ "algorithm": "m.megolm.v1.aes-sha2" })).await;
    assert_eq!(status, 200);
    p.bob.sync(None, 0).await;

    let (status, answer) = p.bob.peek(&secret, &[]).await;
    assert_eq!((status, answer["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{answer}");
    assert_eq!(p.bob.peek(&rooms[0], &[]).await.0, 200);
    assert_eq!(p.bob.peek(&rooms[1], &[]).await.0, 200);
    let (status, answer) = p.bob.peek(&rooms[2], &[]).await;
    assert_eq!((status, answer["errcode"].as_str()), (429, Some("M_LIMIT_EXCEEDED")), "cap: {answer}");
    // The burst of four calls is spent: the rate limit answers now.
    let (status, answer) = p.bob.peek(&rooms[0], &[]).await;
    assert_eq!((status, answer["errcode"].as_str()), (429, Some("M_LIMIT_EXCEEDED")), "rate: {answer}");
    assert!(answer["retry_after_ms"].as_u64().unwrap() > 0);
    // H18: the budget is the user's, not the device's: a new login gets no fresh allowance.
    let other = p.bob.login_device().await;
    let (status, answer) = other.peek(&rooms[2], &[]).await;
    assert_eq!((status, answer["errcode"].as_str()), (429, Some("M_LIMIT_EXCEEDED")), "{answer}");
    // Another user has a budget of their own.
    let dave = Client::register(&p.b.base, "dave").await;
    assert_eq!(dave.peek(&rooms[2], &[]).await.0, 200);
}
both_backends!(peek_limits_and_encrypted_rooms);

/// H18: live peeks are capped per user over all their devices (`client.peek.max_per_user`), not
/// only per device: every login is a new device, and each had a fresh cap.
async fn h18_live_peeks_are_capped_per_user(db: DbKind) {
    let limits = |c: &mut peekgate::config::Config| {
        c.client.peek.max_per_device = 2;
        c.client.peek.max_per_user = 3;
    };
    let p = pair(db, |_| {}, limits, &[]).await;
    let carol = Client::register(&p.b.base, "carol").await;
    let mut rooms = Vec::new();
    for name in ["one", "two", "three", "four"] {
        rooms.push(carol.create_world_readable_room(name, "11").await);
    }
    let second = p.bob.login_device().await;
    assert_eq!(p.bob.peek(&rooms[0], &[]).await.0, 200);
    assert_eq!(p.bob.peek(&rooms[1], &[]).await.0, 200);
    assert_eq!(second.peek(&rooms[2], &[]).await.0, 200);
    let (status, answer) = second.peek(&rooms[3], &[]).await;
    assert_eq!((status, answer["errcode"].as_str()), (429, Some("M_LIMIT_EXCEEDED")), "{answer}");
    // An unpeek frees a place for any of the user's devices.
    assert_eq!(p.bob.unpeek(&rooms[0]).await.0, 200);
    assert_eq!(second.peek(&rooms[3], &[]).await.0, 200);
}
both_backends!(h18_live_peeks_are_capped_per_user);

/// OP-7: a renewal answered with a full body (the target had lapsed our peek and started a new
/// one) is validated and used as a re-sync point: the events the target never pushed are
/// fetched with get_missing_events and reach bob's sync.
async fn renewal_answered_in_full_resyncs(db: DbKind) {
    let one = TestPeer::start("one.test", KeyMode::Good);
    let hosted = Arc::new(Mutex::new(PeerRoom::create(&one, "host")));
    let room_id = hosted.lock().unwrap().room_id.clone();
    *one.inbox.hosted.lock().unwrap() = Some(hosted.clone());
    let b = ServerSpec::new(B, db)
        .configure(open_registration)
        .configure(fast_schedule)
        .destination("one.test", &one.url)
        .start()
        .await;
    let bob = Client::register(&b.base, "bob").await;
    let since = token(&bob.sync(None, 0).await);
    assert_eq!(bob.peek(&room_id, &[]).await.0, 200);
    let mut seen = Seen { room_id: room_id.clone(), bodies: Vec::new(), gappy: false };
    let first = bob.sync(Some(&since), 0).await;
    seen.take(&first);
    // The target forgets our peek (it lapsed there) and the room moves on without telling us.
    one.inbox.peek_requests.lock().unwrap().clear();
    hosted.lock().unwrap().say(&one, "host", "while lapsed 1");
    hosted.lock().unwrap().say(&one, "host", "while lapsed 2");
    sync_until(&bob, token(&first), "events recovered by the renewal", |a| {
        seen.take(a).contains(&"while lapsed 2".to_owned())
    })
    .await;
    assert_eq!(seen.bodies, ["while lapsed 1", "while lapsed 2"]);
    assert!(!seen.gappy);
    let peek = peekgate::peeks::outbound::get(&b.state().outbound, &ruma::RoomId::parse(&room_id).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(peek.target, "one.test", "a full renewal answer is not a failover");
}
both_backends!(renewal_answered_in_full_resyncs);

/// OP-2 under concurrency: two devices peeking the same remote room at the same moment make
/// one federation peek, not two.
async fn simultaneous_peeks_share_one_federation_peek(db: DbKind) {
    let p = pair(db, |_| {}, |_| {}, &[]).await;
    let devices = [p.bob.login_device().await, p.bob.login_device().await, p.bob.login_device().await];
    for device in &devices {
        device.sync(None, 0).await;
    }
    let answers = futures_util::future::join_all(devices.iter().map(|d| d.peek("#lobby:a.test", &[]))).await;
    for (status, answer) in answers {
        assert_eq!(status, 200, "{answer}");
    }
    assert_eq!(peeks_at(&p.a).await, 1);
}
both_backends!(simultaneous_peeks_share_one_federation_peek);

/// CP-9: `lazy_load_members` applies to peeked rooms as to joined ones: the state carries only
/// the member events of the timeline's senders.
async fn lazy_loaded_members_in_a_peeked_room(db: DbKind) {
    let p = pair(db, |_| {}, |_| {}, &[]).await;
    let carol = Client::register(&p.b.base, "carol").await;
    let dave = Client::register(&p.b.base, "dave").await;
    let room = carol.create_world_readable_room("lazy", "11").await;
    assert_eq!(dave.join(&room).await.0, 200);
    carol.say(&room, "only carol speaks").await;
    let since = token(&p.bob.sync(None, 0).await);
    assert_eq!(p.bob.peek(&room, &[]).await.0, 200);
    let members = |lazy: bool| {
        let filter = json!({ "room": { "timeline": { "limit": 1 }, "state": { "lazy_load_members": lazy } } });
        let path = format!("/_matrix/client/v3/sync?since={}&filter={}", enc(&since), enc(&filter.to_string()));
        let bob = &p.bob;
        let room = room.clone();
        async move {
            let (status, answer) = bob.call(reqwest::Method::GET, &path, None).await;
            assert_eq!(status, 200, "{answer}");
            let entry = &answer["rooms"]["peek"][&room];
            let members: BTreeSet<String> = entry["state"]["events"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["type"] == "m.room.member")
                .map(|e| e["state_key"].as_str().unwrap().to_owned())
                .collect();
            members
        }
    };
    assert_eq!(members(true).await, BTreeSet::from([carol.user_id.clone()]));
    assert_eq!(members(false).await, BTreeSet::from([carol.user_id.clone(), dave.user_id.clone()]));
}
both_backends!(lazy_loaded_members_in_a_peeked_room);

/// A room hosted by `one.test` in another implementation's dialect (issue 14), and B.
struct DialectHost {
    one: TestPeer,
    hosted: Arc<Mutex<PeerRoom>>,
    room_id: String,
    b: TestServer,
    bob: Client,
}

async fn dialect_host(db: DbKind, configure_b: impl FnOnce(&mut peekgate::config::Config) + 'static) -> DialectHost {
    let one = TestPeer::start("one.test", KeyMode::Good);
    one.inbox.dialect.store(true, Ordering::SeqCst);
    let hosted = Arc::new(Mutex::new(PeerRoom::create(&one, "host")));
    let room_id = hosted.lock().unwrap().room_id.clone();
    *one.inbox.hosted.lock().unwrap() = Some(hosted.clone());
    let b = ServerSpec::new(B, db)
        .configure(open_registration)
        .configure(configure_b)
        .destination("one.test", &one.url)
        .start()
        .await;
    let bob = Client::register(&b.base, "bob").await;
    DialectHost { one, hosted, room_id, b, bob }
}

fn no_pdu_errors(answer: &Value) -> bool {
    answer["pdus"].as_object().is_some_and(|results| results.values().all(|r| r.get("error").is_none()))
}

/// OP-4.6, OP-9 (issue 14): a target in another dialect answers the peek with a `messages`
/// list and no `latest_event`, and refuses get_missing_events to non-members (403) but serves
/// `/backfill`. Bob peeks its room by alias: the first sync shows the state and the history in
/// `messages`; a live event whose prev event is the newest message is accepted; a gap of 30
/// events is filled through `/backfill`, page by page (the target gives at most 10 a page).
async fn other_dialect_host_messages_live_event_and_backfilled_gap(db: DbKind) {
    let DialectHost { one, hosted, room_id, b, bob } = dialect_host(db, |_| {}).await;
    for i in 0..3 {
        hosted.lock().unwrap().say(&one, "host", &format!("history {i}"));
    }
    let since = token(&bob.sync(None, 0).await);
    let (status, answer) = bob.peek("#lobby:one.test", &[]).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["room_id"], room_id.as_str());
    let put = one.inbox.peek_requests("PUT");
    assert_eq!(put.len(), 1, "{put:?}");

    let first = bob.sync(Some(&since), 0).await;
    let entry = &first["rooms"]["peek"][&room_id];
    let types: BTreeSet<&str> = entry["state"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .chain(entry["timeline"]["events"].as_array().unwrap())
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    for kind in ["m.room.create", "m.room.history_visibility", "m.room.power_levels", "m.room.member"] {
        assert!(types.contains(kind), "first peek entry lacks {kind}: {entry}");
    }
    assert_eq!(bodies(&entry["timeline"]), ["history 0", "history 1", "history 2"], "{entry}");
    // The newest message by depth is the room's forward extremity.
    let room = ruma::RoomId::parse(&room_id).unwrap();
    let newest = hosted.lock().unwrap().events.last().unwrap().0.clone();
    assert_eq!(b.state().rooms.forward_extremities(&room).await.unwrap(), [newest]);

    // A live event: its prev event is the newest message, which B holds.
    let live = hosted.lock().unwrap().say(&one, "host", "live");
    let (status, answer) = one.send_transaction(&b.base, B, vec![live]).await;
    assert_eq!(status, 200, "{answer}");
    assert!(no_pdu_errors(&answer), "{answer}");
    let since = sync_until(&bob, token(&first), "the live event", |a| {
        bodies(&a["rooms"]["peek"][&room_id]["timeline"]) == ["live"]
    })
    .await;

    // A gap of 30 events the target never pushed, then one it pushes.
    for i in 0..30 {
        hosted.lock().unwrap().say(&one, "host", &format!("gap {i}"));
    }
    let pushed = hosted.lock().unwrap().say(&one, "host", "pushed");
    let (status, answer) = one.send_transaction(&b.base, B, vec![pushed]).await;
    assert_eq!(status, 200, "{answer}");
    assert!(no_pdu_errors(&answer), "{answer}");
    let ids: Vec<String> = hosted.lock().unwrap().events.iter().map(|(id, _)| id.clone()).collect();
    for id in &ids {
        assert!(b.state().rooms.event(id).await.unwrap().is_some(), "B lacks {id}");
    }
    assert!(one.inbox.refused_reads.load(Ordering::SeqCst) >= 1, "get_missing_events was not tried first");
    assert_eq!(one.inbox.missing_requests.load(Ordering::SeqCst), 0);
    let pages = one.inbox.backfill_requests.load(Ordering::SeqCst);
    assert!(pages >= 4, "31 events at 10 a page need 4 pages, saw {pages}");
    let mut expected: Vec<String> = (0..30).map(|i| format!("gap {i}")).collect();
    expected.push("pushed".into());
    let answer = bob.sync(Some(&since), 0).await;
    let timeline = &answer["rooms"]["peek"][&room_id]["timeline"];
    assert_eq!(bodies(timeline), expected, "{answer}");
    assert_eq!(timeline["limited"], false, "the gap was filled, not skipped: {answer}");
    // One peek all along: no re-peek was needed.
    assert_eq!(one.inbox.put_peek_ids().len(), 1);
    assert_eq!(b.metric("peekgate_federation_received_pdus_total{result=\"rejected\"}").await, 0.0);
}
both_backends!(other_dialect_host_messages_live_event_and_backfilled_gap);

/// OP-7 (issue 14): the dialect host answers every renewal with a full body. That is a new
/// starting point, not an error: the peek stays with the same target and peek_id, and events
/// the target never pushed are recovered through `/backfill` (get_missing_events is refused)
/// and reach bob's sync without a gap.
async fn other_dialect_host_full_renewals_are_resync_points(db: DbKind) {
    let DialectHost { one, hosted, room_id, b, bob } = dialect_host(db, fast_schedule).await;
    let since = token(&bob.sync(None, 0).await);
    assert_eq!(bob.peek(&room_id, &["one.test"]).await.0, 200);
    let mut seen = Seen { room_id: room_id.clone(), bodies: Vec::new(), gappy: false };
    let first = bob.sync(Some(&since), 0).await;
    seen.take(&first);
    wait_until("two renewals answered in full", || async { one.inbox.peek_requests("PUT").len() >= 3 }).await;
    hosted.lock().unwrap().say(&one, "host", "unpushed 1");
    hosted.lock().unwrap().say(&one, "host", "unpushed 2");
    sync_until(&bob, token(&first), "events recovered by a renewal", |a| {
        seen.take(a).contains(&"unpushed 2".to_owned())
    })
    .await;
    assert_eq!(seen.bodies, ["unpushed 1", "unpushed 2"]);
    assert!(!seen.gappy, "a renewal that continues the timeline is not a gap");
    assert!(one.inbox.backfill_requests.load(Ordering::SeqCst) >= 1);
    assert_eq!(one.inbox.missing_requests.load(Ordering::SeqCst), 0);
    let peek = peekgate::peeks::outbound::get(&b.state().outbound, &ruma::RoomId::parse(&room_id).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(peek.target, "one.test");
    assert_eq!(one.inbox.put_peek_ids().len(), 1, "renewals keep the peek_id");
    assert!(one.inbox.peek_requests("DELETE").is_empty(), "a full renewal answer is not a failure");
    assert!(b.metric("peekgate_peek_renewals_total{direction=\"outbound\",result=\"ok\"}").await >= 2.0);
    assert_eq!(b.metric("peekgate_peek_renewals_total{direction=\"outbound\",result=\"failed\"}").await, 0.0);
}
both_backends!(other_dialect_host_full_renewals_are_resync_points);

/// OP-9's last resort (issue 14): when `/backfill` cannot close the gap either (here its
/// events are forged), the pushed PDU is refused, nothing of the forged history is stored, and
/// B takes a fresh `PUT /peek` as a new starting point; bob's sync marks it `limited`.
async fn other_dialect_host_unfillable_gap_repeeks(db: DbKind) {
    let DialectHost { one, hosted, room_id, b, bob } = dialect_host(db, |_| {}).await;
    let since = token(&bob.sync(None, 0).await);
    assert_eq!(bob.peek(&room_id, &["one.test"]).await.0, 200);
    let since = token(&bob.sync(Some(&since), 0).await);
    one.inbox.forge_backfill.store(true, Ordering::SeqCst);
    for i in 0..30 {
        hosted.lock().unwrap().say(&one, "host", &format!("gap {i}"));
    }
    let pushed = hosted.lock().unwrap().say(&one, "host", "pushed");
    let (status, answer) = one.send_transaction(&b.base, B, vec![pushed]).await;
    assert_eq!(status, 200, "{answer}");
    let results: Vec<&Value> = answer["pdus"].as_object().unwrap().values().collect();
    assert!(results[0]["error"].as_str().unwrap().contains("prev events"), "{answer}");
    assert!(one.inbox.backfill_requests.load(Ordering::SeqCst) >= 1, "/backfill was not tried");

    let events: Vec<String> = hosted.lock().unwrap().events.iter().map(|(id, _)| id.clone()).collect();
    let pushed_id = events.last().unwrap().clone();
    wait_until("B re-peeks for a new starting point", || async {
        b.state().rooms.event(&pushed_id).await.unwrap().is_some()
    })
    .await;
    assert_eq!(one.inbox.put_peek_ids().len(), 2, "exactly one re-peek");
    wait_until("B DELETEs the old peek", || async { one.inbox.peek_requests("DELETE").len() == 1 }).await;
    // The new answer's `messages` hold the newest 10 events; the forged history before them
    // was never stored.
    let kept = support::peer::DIALECT_MESSAGES;
    for id in &events[events.len() - 30 - 1..events.len() - kept] {
        assert!(b.state().rooms.event(id).await.unwrap().is_none(), "B stored {id} from a forged /backfill");
    }
    let answer = bob.sync(Some(&since), 0).await;
    let timeline = &answer["rooms"]["peek"][&room_id]["timeline"];
    assert_eq!(timeline["limited"], true, "{answer}");
    let mut expected: Vec<String> = (21..30).map(|i| format!("gap {i}")).collect();
    expected.push("pushed".into());
    assert_eq!(bodies(timeline), expected, "{answer}");
}
both_backends!(other_dialect_host_unfillable_gap_repeeks);

/// OP-4.6 with hostile `messages` (issue 14): a message altered after signing, or one whose
/// auth events are not in the answer, makes the whole answer invalid (DELETE sent, nothing
/// stored); a valid list longer than peekgate keeps is cut to its newest 50 by depth.
async fn dialect_messages_are_validated_and_bounded(db: DbKind) {
    let one = TestPeer::start("one.test", KeyMode::Good);
    let mut hosted = PeerRoom::create(&one, "host");
    let room_id = hosted.room_id.clone();
    for i in 0..60 {
        hosted.say(&one, "host", &format!("m{i}"));
    }
    let b = ServerSpec::new(B, db).configure(open_registration).destination("one.test", &one.url).start().await;
    let bob = Client::register(&b.base, "bob").await;
    let since = token(&bob.sync(None, 0).await);
    let room = ruma::RoomId::parse(&room_id).unwrap();
    let answer = hosted.dialect_peek_answer(60_000, 60);

    let mut altered = answer.clone();
    altered["messages"][59]["content"]["body"] = json!("altered");
    let mut orphan = answer.clone();
    let (stranger, _) = one.build_pdu(
        "10",
        &room_id,
        "stranger",
        "m.room.message",
        None,
        json!({ "msgtype": "m.text", "body": "who?" }),
        &["$not-in-the-answer".to_owned()],
        &[hosted.events.last().unwrap().0.clone()],
        100,
    );
    orphan["messages"].as_array_mut().unwrap().push(stranger);
    for (what, bad) in [("altered message", altered), ("message with unknown auth events", orphan)] {
        *one.inbox.peek_answer.lock().unwrap() = Some((200, bad));
        let deletes = one.inbox.peek_requests("DELETE").len();
        let (status, answer) = bob.peek(&room_id, &["one.test"]).await;
        assert_eq!(status, 404, "{what}: {answer}");
        assert!(b.state().rooms.room(&room).await.unwrap().is_none(), "{what}: B stored part of the answer");
        assert_eq!(one.inbox.peek_requests("DELETE").len(), deletes + 1, "{what}: no DELETE");
    }

    *one.inbox.peek_answer.lock().unwrap() = Some((200, answer));
    let (status, answer) = bob.peek(&room_id, &["one.test"]).await;
    assert_eq!(status, 200, "{answer}");
    let first = bob.sync(Some(&since), 0).await;
    let expected: Vec<String> = (10..60).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies(&first["rooms"]["peek"][&room_id]["timeline"]), expected, "{first}");
    let oldest_dropped = hosted.events.iter().find(|(_, pdu)| pdu["content"]["body"] == "m9").unwrap().0.clone();
    assert!(b.state().rooms.event(&oldest_dropped).await.unwrap().is_none());
}
both_backends!(dialect_messages_are_validated_and_bounded);
