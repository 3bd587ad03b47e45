//! Rooms of our own (federation-essentials §6-8, peeking.md §4 WR-1..4), over real HTTP on
//! PostgreSQL and SQLite: the client API, event signing checked independently, the auth rules,
//! and a second server reading world-readable rooms through every WR endpoint.

mod support;

use std::collections::BTreeSet;

use reqwest::Method;
use ruma::{RoomId, ServerName, UserId};
use serde_json::{json, Value};
use support::client::{enc, request, Client};
use support::verify::check_event;
use support::{DbKind, ServerSpec, TestServer};

fn open_registration(c: &mut peekgate::config::Config) {
    c.client.registration = "open".into();
}

fn server_name(name: &str) -> &ServerName {
    <&ServerName>::try_from(name).unwrap()
}

async fn client_api_round_trip(db: DbKind) {
    let server = ServerSpec::new("a.test", db).configure(open_registration).start().await;
    let base = &server.base;

    // Registration is user-interactive: first a 401 with the dummy flow.
    let body = json!({ "username": "alice", "password": "pw" });
    let (status, answer) = request(base, None, Method::POST, "/_matrix/client/v3/register", Some(&body)).await;
    assert_eq!(status, 401);
    assert_eq!(answer["flows"][0]["stages"][0], "m.login.dummy");
    let alice = Client::register(base, "alice").await;
    assert_eq!(alice.user_id, "@alice:a.test");
    let (status, answer) = request(
        base,
        None,
        Method::POST,
        "/_matrix/client/v3/register",
        Some(&json!({ "username": "alice", "password": "x", "auth": { "type": "m.login.dummy" } })),
    )
    .await;
    assert_eq!((status, answer["errcode"].as_str()), (400, Some("M_USER_IN_USE")));
    let (status, answer) = request(
        base,
        None,
        Method::POST,
        "/_matrix/client/v3/register",
        Some(&json!({ "username": "Bad Name", "password": "x", "auth": { "type": "m.login.dummy" } })),
    )
    .await;
    assert_eq!((status, answer["errcode"].as_str()), (400, Some("M_INVALID_USERNAME")));

    // Login with the password, whoami, logout.
    let (status, login) = request(base, None, Method::POST, "/_matrix/client/v3/login",
        Some(&json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "alice" }, "password": "pw-123456" }))).await;
    assert_eq!(status, 200, "{login}");
    let token = login["access_token"].as_str().unwrap();
    let (status, who) = request(base, Some(token), Method::GET, "/_matrix/client/v3/account/whoami", None).await;
    assert_eq!((status, who["user_id"].as_str()), (200, Some("@alice:a.test")));
    let (status, answer) = request(
        base,
        None,
        Method::POST,
        "/_matrix/client/v3/login",
        Some(&json!({ "type": "m.login.password", "user": "alice", "password": "wrong" })),
    )
    .await;
    assert_eq!((status, answer["errcode"].as_str()), (403, Some("M_FORBIDDEN")));
    let (status, _) = request(base, Some(token), Method::POST, "/_matrix/client/v3/logout", Some(&json!({}))).await;
    assert_eq!(status, 200);
    let (status, answer) = request(base, Some(token), Method::GET, "/_matrix/client/v3/account/whoami", None).await;
    assert_eq!((status, answer["errcode"].as_str()), (401, Some("M_UNKNOWN_TOKEN")));
    let (status, answer) = request(base, None, Method::GET, "/_matrix/client/v3/account/whoami", None).await;
    assert_eq!((status, answer["errcode"].as_str()), (401, Some("M_MISSING_TOKEN")));

    // createRoom with an alias and world-readable history; the alias resolves.
    let room = alice.create_world_readable_room("lobby", "10").await;
    let (status, dir) =
        alice.call(Method::GET, &format!("/_matrix/client/v3/directory/room/{}", enc("#lobby:a.test")), None).await;
    assert_eq!((status, dir["room_id"].as_str()), (200, Some(room.as_str())));
    let taken = alice.create_room_raw(json!({ "room_alias_name": "lobby" })).await;
    assert_eq!((taken.0, taken.1["errcode"].as_str()), (400, Some("M_ROOM_IN_USE")));

    // Sending is idempotent per transaction ID.
    let (status, first) = alice.send_message(&room, "txn1", "hello").await;
    assert_eq!(status, 200);
    let (_, again) = alice.send_message(&room, "txn1", "hello").await;
    assert_eq!(first["event_id"], again["event_id"]);
    // Also when the repeats arrive together with other sends (one group commit, likely): one
    // event, the same ID for every repeat, and the other sends stored too.
    let (a, b, c, other) = tokio::join!(
        alice.send_message(&room, "txn2", "together"),
        alice.send_message(&room, "txn2", "together"),
        alice.send_message(&room, "txn2", "together"),
        alice.send_message(&room, "txn3", "beside"),
    );
    for (status, answer) in [&a, &b, &c, &other] {
        assert_eq!(*status, 200, "{answer}");
    }
    assert_eq!((&a.1["event_id"], &b.1["event_id"]), (&c.1["event_id"], &c.1["event_id"]));
    assert_ne!(a.1["event_id"], other.1["event_id"]);
    let (_, recent) = alice
        .call(Method::GET, &format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=20", enc(&room)), None)
        .await;
    let bodies: Vec<&str> =
        recent["chunk"].as_array().unwrap().iter().filter_map(|e| e["content"]["body"].as_str()).collect();
    assert_eq!(bodies.iter().filter(|b| **b == "together").count(), 1, "{bodies:?}");
    assert_eq!(bodies.iter().filter(|b| **b == "beside").count(), 1, "{bodies:?}");

    // State: put and get, then the full state.
    let (status, _) = alice.put_state(&room, "m.room.topic", "", json!({ "topic": "peeking" })).await;
    assert_eq!(status, 200);
    let (status, topic) =
        alice.call(Method::GET, &format!("/_matrix/client/v3/rooms/{}/state/m.room.topic/", enc(&room)), None).await;
    assert_eq!((status, topic["topic"].as_str()), (200, Some("peeking")));
    let (status, all) = alice.call(Method::GET, &format!("/_matrix/client/v3/rooms/{}/state", enc(&room)), None).await;
    assert_eq!(status, 200);
    let kinds: BTreeSet<&str> = all.as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    for kind in [
        "m.room.create",
        "m.room.member",
        "m.room.power_levels",
        "m.room.join_rules",
        "m.room.history_visibility",
        "m.room.canonical_alias",
        "m.room.topic",
    ] {
        assert!(kinds.contains(kind), "{kind} in {kinds:?}");
    }

    // Messages, newest first; the transaction was stored once.
    let (status, page) = alice
        .call(Method::GET, &format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50", enc(&room)), None)
        .await;
    assert_eq!(status, 200);
    let hellos = page["chunk"].as_array().unwrap().iter().filter(|e| e["content"]["body"] == "hello").count();
    assert_eq!(hellos, 1);
    assert_eq!(page["chunk"][0]["type"], "m.room.topic");

    // Bad input: clear errors.
    let (status, answer) =
        request(base, alice.token.as_deref(), Method::POST, "/_matrix/client/v3/createRoom", None).await;
    assert_eq!((status, answer["errcode"].as_str()), (400, Some("M_NOT_JSON")));
    let (status, answer) =
        alice.call(Method::PUT, "/_matrix/client/v3/rooms/not-a-room/send/m.room.message/t", Some(&json!({}))).await;
    assert_eq!((status, answer["errcode"].as_str()), (400, Some("M_INVALID_PARAM")));
    let (status, answer) = alice.create_room_raw(json!({ "room_version": "1" })).await;
    assert_eq!((status, answer["errcode"].as_str()), (400, Some("M_UNSUPPORTED_ROOM_VERSION")));
    let (status, answer) = alice.call(Method::GET, "/_matrix/client/v3/rooms/!nope:a.test/messages", None).await;
    assert_eq!((status, answer["errcode"].as_str()), (404, Some("M_NOT_FOUND")));
    server.stop().await;
}
both_backends!(client_api_round_trip);

async fn registration_is_off_by_default(db: DbKind) {
    let server = ServerSpec::new("a.test", db).start().await;
    let body = json!({ "username": "x", "password": "y", "auth": { "type": "m.login.dummy" } });
    let (status, answer) = request(&server.base, None, Method::POST, "/_matrix/client/v3/register", Some(&body)).await;
    assert_eq!((status, answer["errcode"].as_str()), (403, Some("M_FORBIDDEN")));
    server.stop().await;
}
both_backends!(registration_is_off_by_default);

/// Sends a request head announcing a 100-byte body, then only 2 bytes of it, and reads what
/// the server answers (at most 20 s; a server with no body deadline never answers).
async fn trickle(base: &str, method: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\""
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    let read = async {
        loop {
            let n = stream.read(&mut buffer).await.unwrap_or(0);
            answer.extend_from_slice(&buffer[..n]);
            if n == 0 || answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(20), read).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// H18: a body trickling in slower than `http.body_read_timeout_ms` allows is cut off with 408
/// and a Matrix error, on the client and the federation API, instead of holding a connection
/// and a handler for as long as the client likes.
async fn h18_slow_request_bodies_get_408(db: DbKind) {
    let server = ServerSpec::new("a.test", db).configure(|c| c.http.body_read_timeout_ms = 300).start().await;
    for (method, path) in [("POST", "/_matrix/client/v3/login"), ("PUT", "/_matrix/federation/v1/send/slow-1")] {
        let answer = trickle(&server.base, method, path).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{path}: {answer:?}");
        assert!(answer.contains("\"errcode\":\"M_UNKNOWN\""), "{path}: {answer:?}");
    }
    // A body that arrives in time is not affected.
    let body =
        json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "x" }, "password": "y" });
    let (status, answer) = request(&server.base, None, Method::POST, "/_matrix/client/v3/login", Some(&body)).await;
    assert_eq!((status, answer["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{answer}");
    server.stop().await;
}
both_backends!(h18_slow_request_bodies_get_408);

/// H13: login attempts are limited per user ID (a burst of 10, then 429 M_LIMIT_EXCEEDED with
/// `retry_after_ms`), and an unknown user gets exactly the answer a wrong password gets (the
/// same argon2 work runs for both; timing is measured in benches, not asserted here).
async fn h13_login_attempts_are_limited_and_unknown_users_look_like_wrong_passwords(db: DbKind) {
    let server = ServerSpec::new("a.test", db).configure(open_registration).start().await;
    Client::register(&server.base, "alice").await;
    let attempt = |user: &str, password: &str| json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": user }, "password": password });
    let login = |body: Value| {
        let base = server.base.clone();
        async move { request(&base, None, Method::POST, "/_matrix/client/v3/login", Some(&body)).await }
    };
    let wrong = login(attempt("alice", "wrong")).await;
    let unknown = login(attempt("nobody", "wrong")).await;
    assert_eq!(wrong.0, 403, "{}", wrong.1);
    assert_eq!(wrong, unknown, "an unknown user is answered like a wrong password");
    for _ in 0..9 {
        assert_eq!(login(attempt("alice", "wrong")).await.0, 403);
    }
    // The 11th attempt for alice within the burst is refused, even with the right password.
    let (status, answer) = login(attempt("alice", "pw-123456")).await;
    assert_eq!((status, answer["errcode"].as_str()), (429, Some("M_LIMIT_EXCEEDED")), "{answer}");
    assert!(answer["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{answer}");
    // Other users are not held up by alice's limit.
    assert_eq!(login(attempt("nobody", "wrong")).await.0, 403);
    server.stop().await;
}
both_backends!(h13_login_attempts_are_limited_and_unknown_users_look_like_wrong_passwords);

async fn auth_rules_refuse_and_leave_no_trace(db: DbKind) {
    let server = ServerSpec::new("a.test", db).configure(open_registration).start().await;
    let alice = Client::register(&server.base, "alice").await;
    let bob = Client::register(&server.base, "bob").await;
    let private = alice.create_room(json!({ "preset": "private_chat" })).await;
    let public = alice.create_room(json!({ "preset": "public_chat" })).await;
    let rooms = &server.state().rooms;
    let private_id = RoomId::parse(&private).unwrap();
    let before = rooms.latest_stream_pos(&private_id).await.unwrap();

    // A non-member cannot send, and cannot join an invite-only room.
    let (status, answer) = bob.send_message(&private, "t1", "let me in").await;
    assert_eq!((status, answer["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{answer}");
    let (status, _) = bob.join(&private).await;
    assert_eq!(status, 403);
    assert_eq!(rooms.latest_stream_pos(&private_id).await.unwrap(), before, "nothing was stored");

    // Joined but below the required power level: cannot change the name (needs 50).
    let (status, _) = bob.join(&public).await;
    assert_eq!(status, 200);
    let (status, answer) = bob.put_state(&public, "m.room.name", "", json!({ "name": "mine" })).await;
    assert_eq!((status, answer["errcode"].as_str()), (403, Some("M_FORBIDDEN")));
    let public_id = RoomId::parse(&public).unwrap();
    assert!(rooms.state_event(&public_id, "m.room.name", "").await.unwrap().is_none());
    // ... but can talk, and alice (power 100) can rename.
    bob.say(&public, "hi").await;
    let (status, _) = alice.put_state(&public, "m.room.name", "", json!({ "name": "ours" })).await;
    assert_eq!(status, 200);
    // A state key naming another user is refused.
    let (status, _) = bob.put_state(&public, "m.room.member", &alice.user_id, json!({ "membership": "leave" })).await;
    assert_eq!(status, 403);
    // A remote room cannot be joined yet: a clear error.
    let (status, answer) = bob.join("!elsewhere:b.test").await;
    assert_eq!((status, answer["errcode"].as_str()), (404, Some("M_NOT_FOUND")));
    server.stop().await;
}
both_backends!(auth_rules_refuse_and_leave_no_trace);

/// Group commit (`rooms::group_commit`): sends that arrive together are stored together, a
/// refused one among them costs the others nothing, and a client transaction repeated within
/// one group is stored once.
async fn sends_at_the_same_time_are_stored_together_and_alone_when_one_fails(db: DbKind) {
    let server = ServerSpec::new("a.test", db).configure(open_registration).start().await;
    let alice = Client::register(&server.base, "alice").await;
    let room = alice.create_world_readable_room("together", "10").await;
    let room_id = RoomId::parse(&room).unwrap();
    let rooms = server.state().rooms.clone();
    let before = rooms.latest_stream_pos(&room_id).await.unwrap();
    let (alice_id, mallory) = (UserId::parse(&alice.user_id).unwrap(), UserId::parse("@mallory:a.test").unwrap());

    // Ten sends at once: eight of alice's, one of a non-member, one repeat of alice's first
    // client transaction. The first starts a commit; the rest queue behind it and share one.
    let send = |sender: &UserId, body: String, txn: Option<(String, String)>| {
        let (rooms, room_id, sender) = (rooms.clone(), room_id.clone(), sender.to_owned());
        async move {
            let content = json!({ "msgtype": "m.text", "body": body });
            rooms.send_once(&room_id, &sender, "m.room.message", None, content, txn).await
        }
    };
    let txn = || Some(("DEVICE".to_owned(), "t0".to_owned()));
    let mut sends: Vec<_> = (0..8)
        .map(|i| Box::pin(send(&alice_id, format!("m{i}"), (i == 0).then(txn).flatten())) as std::pin::Pin<Box<_>>)
        .collect();
    sends.push(Box::pin(send(&mallory, "let me in".into(), None)));
    sends.push(Box::pin(send(&alice_id, "m0".into(), txn())));
    let results = futures_util::future::join_all(sends).await;

    let stored: Vec<_> = results[..8].iter().map(|r| r.as_ref().expect("alice's sends are stored")).collect();
    assert!(
        matches!(results[8], Err(peekgate::rooms::RoomError::Forbidden(_))),
        "the non-member's send is refused: {:?}",
        results[8]
    );
    let repeat = results[9].as_ref().expect("the repeated client transaction answers");
    assert_eq!(repeat.event_id, stored[0].event_id, "a repeated client transaction is the same event");
    let positions: BTreeSet<i64> = stored.iter().map(|a| a.stream_pos).collect();
    assert_eq!(positions.len(), 8, "eight events, eight positions");
    assert!(positions.iter().all(|p| *p > before));
    assert_eq!(rooms.latest_stream_pos(&room_id).await.unwrap(), *positions.last().unwrap());
    // What a client reads: alice's eight messages, each once, and nothing of mallory's.
    let mut bodies = alice.bodies(&room).await;
    bodies.sort();
    assert_eq!(bodies, (0..8).map(|i| format!("m{i}")).collect::<Vec<_>>());
    for appended in &stored {
        let event = rooms.event(appended.event_id.as_str()).await.unwrap().expect("stored");
        assert_eq!(event.pdu.sender.as_str(), alice.user_id);
    }
    server.stop().await;
}
both_backends!(sends_at_the_same_time_are_stored_together_and_alone_when_one_fails);

/// A group of sends to two rooms, with a state event among them, stored in as few transactions
/// as arrive together: a group takes each room's lock once and carries the room row from one
/// append to the next (`rooms::group_commit`), so each room's events must still form one chain
/// (prev events, depth + 1) and every event after the topic change must sit on the state that
/// includes it.
async fn grouped_sends_keep_each_rooms_chain_and_state(db: DbKind) {
    let server = ServerSpec::new("a.test", db).configure(open_registration).start().await;
    let alice = Client::register(&server.base, "alice").await;
    let (first, second) =
        (alice.create_world_readable_room("one", "10").await, alice.create_world_readable_room("two", "10").await);
    let (first_id, second_id) = (RoomId::parse(&first).unwrap(), RoomId::parse(&second).unwrap());
    let bob = Client::register(&server.base, "bob").await;
    assert_eq!(bob.join(&first).await.0, 200);
    let (alice_id, bob_id) = (UserId::parse(&alice.user_id).unwrap(), UserId::parse(&bob.user_id).unwrap());
    let rooms = server.state().rooms.clone();
    let text = |body: &str| json!({ "msgtype": "m.text", "body": body });
    let sends: Vec<(&RoomId, &UserId, &str, Option<&str>, Value)> = vec![
        (&first_id, &alice_id, "m.room.message", None, text("a1")),
        (&first_id, &alice_id, "m.room.message", None, text("a2")),
        (&first_id, &bob_id, "m.room.message", None, text("a-bob")),
        (&first_id, &alice_id, "m.room.topic", Some(""), json!({ "topic": "changed in the group" })),
        (&first_id, &alice_id, "m.room.message", None, text("a3")),
        (&second_id, &alice_id, "m.room.message", None, text("b1")),
        (&first_id, &alice_id, "m.room.message", None, text("a4")),
        (&second_id, &alice_id, "m.room.message", None, text("b2")),
    ];
    let results =
        futures_util::future::join_all(sends.iter().map(|(room, sender, kind, state_key, content)| {
            rooms.send(room, sender, kind, *state_key, content.clone())
        }))
        .await;
    let appended: Vec<_> = results.into_iter().map(|r| r.expect("every send is stored")).collect();

    for room in [&first_id, &second_id] {
        let mut chain = Vec::new();
        for ((sent_to, sender, ..), done) in sends.iter().zip(&appended) {
            if *sent_to == room {
                let event = rooms.event(done.event_id.as_str()).await.unwrap().expect("stored");
                // Each event is authorised by its own sender's membership.
                let member =
                    rooms.state_event(room, "m.room.member", sender.as_str()).await.unwrap().expect("a member");
                assert!(
                    event.pdu.auth_events.contains(&member.event_id),
                    "{sender}'s member event authorises their event"
                );
                chain.push(event);
            }
        }
        chain.sort_by_key(|event| event.stream_pos);
        for pair in chain.windows(2) {
            let (earlier, later) = (&pair[0], &pair[1]);
            assert_eq!(later.pdu.prev_events, vec![earlier.pdu.event_id.clone()], "one chain in {room}");
            assert_eq!(later.pdu.depth, earlier.pdu.depth + 1, "depth + 1 in {room}");
            assert_eq!(
                later.state_group_before,
                Some(earlier.state_group),
                "each event on the state the one before left, in {room}"
            );
        }
    }
    let topic = rooms.event(appended[3].event_id.as_str()).await.unwrap().expect("stored");
    assert_ne!(topic.state_group_before, Some(topic.state_group), "the topic starts a new state group");
    let after_topic = rooms.event(appended[4].event_id.as_str()).await.unwrap().expect("stored");
    assert_eq!(after_topic.state_group_before, Some(topic.state_group));
    let (status, state) = request(
        &server.base,
        alice.token.as_deref(),
        Method::GET,
        &format!("/_matrix/client/v3/rooms/{}/state/m.room.topic", enc(&first)),
        None,
    )
    .await;
    assert_eq!((status, state["topic"].as_str()), (200, Some("changed in the group")));
    server.stop().await;
}
both_backends!(grouped_sends_keep_each_rooms_chain_and_state);

/// Events peekgate builds pass a check written from the spec, for both room versions; and the
/// two versions' redaction rules really differ (a create event's signature only verifies under
/// its own version's rules).
async fn events_pass_an_independent_check(db: DbKind) {
    let server = ServerSpec::new("a.test", db).configure(open_registration).start().await;
    let alice = Client::register(&server.base, "alice").await;
    let keys = server.published_keys().await;
    for version in ["10", "11"] {
        let room = alice.create_world_readable_room(&format!("v{version}"), version).await;
        alice.say(&room, "checked").await;
        let room_id = RoomId::parse(&room).unwrap();
        let events = server.state().rooms.events_in_range(&room_id, 0, true, 100).await.unwrap();
        assert!(events.len() >= 6);
        for stored in &events {
            let json = stored.pdu.federation_json();
            check_event(&json, version, "a.test", &keys, Some(stored.pdu.event_id.as_str()))
                .unwrap_or_else(|e| panic!("v{version} {}: {e}", json["type"]));
            let other = if version == "10" { "11" } else { "10" };
            if json["type"] == "m.room.create" {
                assert!(
                    check_event(&json, other, "a.test", &keys, None).is_err(),
                    "v{version} create under v{other} rules"
                );
                assert_eq!(json["content"]["room_version"], version);
                assert_eq!(json["content"].get("creator").is_some(), version == "10");
            }
        }
    }
    server.stop().await;
}
both_backends!(events_pass_an_independent_check);

/// Fetches `path` from `target` with `reader`'s federation client (signed).
async fn fed_get(reader: &TestServer, path: &str) -> Result<Value, u16> {
    reader.state().federation.get(server_name("a.test"), path).await.map_err(|e| e.status().unwrap_or(0))
}

/// POSTs `get_missing_events` for the (encoded) room `r` to a.test with `reader`'s client.
async fn get_missing_events(reader: &TestServer, r: &str, body: Value) -> Result<Value, u16> {
    let path = format!("/_matrix/federation/v1/get_missing_events/{r}");
    let request = peekgate::federation::client::FedRequest {
        method: Method::POST,
        destination: server_name("a.test"),
        path: &path,
        body: Some(body),
        signed: true,
    };
    reader.state().federation.send(request).await.map_err(|e| e.status().unwrap_or(0))
}

/// Verifies a PDU received over federation with the reader's own code (peekgate's
/// verify_received fetches the origin's key through the reader's key cache) and the test's
/// independent check.
async fn verify_received(reader: &TestServer, pdu: &Value, version: &str, keys: &[(String, String)]) {
    check_event(pdu, version, "a.test", keys, None).unwrap_or_else(|e| panic!("{}: {e}", pdu["type"]));
    let object = match ruma::CanonicalJsonValue::try_from(pdu.clone()).unwrap() {
        ruma::CanonicalJsonValue::Object(o) => o,
        _ => unreachable!(),
    };
    let v = peekgate::events::RoomVersion::parse(version).unwrap();
    let verified = peekgate::events::verify_received(&reader.state().keys, object.clone(), v).await.unwrap();
    assert_eq!(verified, object, "hash matched, nothing redacted");
}

async fn non_member_server_reads_world_readable_room(db: DbKind) {
    let a_spec = ServerSpec::new("a.test", db).configure(open_registration);
    let b_spec = ServerSpec::new("b.test", db);
    let (a_url, b_url) = (a_spec.url(), b_spec.url());
    let a = a_spec.destination("b.test", &b_url).start().await;
    let b = b_spec.destination("a.test", &a_url).start().await;
    let keys = a.published_keys().await;
    let alice = Client::register(&a.base, "alice").await;
    let room = alice.create_world_readable_room("open", "10").await;
    let mut sent = Vec::new();
    for i in 0..5 {
        sent.push(alice.say(&room, &format!("m{i}")).await);
    }
    let last = sent.last().unwrap().clone();
    let r = enc(&room);

    // /query/directory resolves the alias; an unknown alias is 404.
    let dir = fed_get(&b, &format!("/_matrix/federation/v1/query/directory?room_alias={}", enc("#open:a.test")))
        .await
        .unwrap();
    assert_eq!(dir["room_id"], room.as_str());
    assert_eq!(
        fed_get(&b, &format!("/_matrix/federation/v1/query/directory?room_alias={}", enc("#nope:a.test"))).await,
        Err(404)
    );

    // /event for every message: verified by B.
    for id in &sent {
        let answer = fed_get(&b, &format!("/_matrix/federation/v1/event/{}", enc(id))).await.unwrap();
        verify_received(&b, &answer["pdus"][0], "10", &keys).await;
        assert_eq!(support::verify::event_id(&answer["pdus"][0], "10"), *id);
    }
    // /state and /state_ids at the last message: state before it, with its auth chain.
    let state = fed_get(&b, &format!("/_matrix/federation/v1/state/{r}?event_id={}", enc(&last))).await.unwrap();
    let pdus = state["pdus"].as_array().unwrap();
    assert!(pdus.iter().any(|p| p["type"] == "m.room.create"));
    assert!(pdus
        .iter()
        .any(|p| p["type"] == "m.room.history_visibility" && p["content"]["history_visibility"] == "world_readable"));
    for pdu in pdus.iter().chain(state["auth_chain"].as_array().unwrap()) {
        verify_received(&b, pdu, "10", &keys).await;
    }
    let ids = fed_get(&b, &format!("/_matrix/federation/v1/state_ids/{r}?event_id={}", enc(&last))).await.unwrap();
    assert_eq!(ids["pdu_ids"].as_array().unwrap().len(), pdus.len());
    // /event_auth, /backfill, /get_missing_events.
    let auth = fed_get(&b, &format!("/_matrix/federation/v1/event_auth/{r}/{}", enc(&last))).await.unwrap();
    assert!(auth["auth_chain"].as_array().unwrap().iter().any(|p| p["type"] == "m.room.create"));
    let backfill = fed_get(&b, &format!("/_matrix/federation/v1/backfill/{r}?v={}&limit=3", enc(&last))).await.unwrap();
    let got: Vec<&str> =
        backfill["pdus"].as_array().unwrap().iter().map(|p| p["content"]["body"].as_str().unwrap_or("")).collect();
    assert_eq!(got, ["m4", "m3", "m2"]);
    for pdu in backfill["pdus"].as_array().unwrap() {
        verify_received(&b, pdu, "10", &keys).await;
    }
    let body = json!({ "earliest_events": [sent[1]], "latest_events": [last], "limit": 10 });
    let missing = get_missing_events(&b, &r, body).await.unwrap();
    let got: Vec<&str> =
        missing["events"].as_array().unwrap().iter().map(|p| p["content"]["body"].as_str().unwrap_or("")).collect();
    assert_eq!(got, ["m2", "m3"], "between earliest (excluded) and latest (excluded), oldest first");
    // H12: a read names at most 100 events per list, whatever the caller sends.
    let many: Vec<String> = (0..101).map(|i| format!("$e{i}")).collect();
    let body = json!({ "earliest_events": [], "latest_events": many, "limit": 10 });
    assert_eq!(get_missing_events(&b, &r, body).await, Err(400));
    let vs: String = many.iter().map(|id| format!("&v={}", enc(id))).collect();
    assert_eq!(fed_get(&b, &format!("/_matrix/federation/v1/backfill/{r}?limit=3{vs}")).await, Err(400));

    // Unknown room and event: 404.
    assert_eq!(fed_get(&b, &format!("/_matrix/federation/v1/event/{}", enc("$nope"))).await, Err(404));
    assert_eq!(
        fed_get(&b, &format!("/_matrix/federation/v1/state_ids/{}?event_id={}", enc("!nope:a.test"), enc(&last))).await,
        Err(404)
    );
    a.stop().await;
    b.stop().await;
}
both_backends!(non_member_server_reads_world_readable_room);

async fn shared_history_is_refused_and_visibility_is_judged_per_event(db: DbKind) {
    let a_spec = ServerSpec::new("a.test", db).configure(open_registration);
    let b_spec = ServerSpec::new("b.test", db);
    let (a_url, b_url) = (a_spec.url(), b_spec.url());
    let a = a_spec.destination("b.test", &b_url).start().await;
    let b = b_spec.destination("a.test", &a_url).start().await;
    let alice = Client::register(&a.base, "alice").await;

    // A `shared` room: every WR endpoint answers 403.
    let shared = alice.create_room(json!({ "preset": "public_chat" })).await;
    let msg = alice.say(&shared, "secret").await;
    let (r, e) = (enc(&shared), enc(&msg));
    for path in [
        format!("/_matrix/federation/v1/event/{e}"),
        format!("/_matrix/federation/v1/state/{r}?event_id={e}"),
        format!("/_matrix/federation/v1/state_ids/{r}?event_id={e}"),
        format!("/_matrix/federation/v1/backfill/{r}?v={e}"),
        format!("/_matrix/federation/v1/event_auth/{r}/{e}"),
    ] {
        assert_eq!(fed_get(&b, &path).await, Err(403), "{path}");
    }
    let body = json!({ "earliest_events": [], "latest_events": [msg], "limit": 10 });
    assert_eq!(get_missing_events(&b, &r, body).await, Err(403));

    // World-readable, then shared: earlier events keep their visibility, later ones do not.
    let room = alice.create_world_readable_room("flip", "11").await;
    let early = alice.say(&room, "early").await;
    let (status, change) =
        alice.put_state(&room, "m.room.history_visibility", "", json!({ "history_visibility": "shared" })).await;
    assert_eq!(status, 200);
    let change = change["event_id"].as_str().unwrap().to_owned();
    let late = alice.say(&room, "late").await;
    // Twice: the second answers come from the event and visibility caches (#13), and must be
    // the same as the first.
    for _ in 0..2 {
        assert!(fed_get(&b, &format!("/_matrix/federation/v1/event/{}", enc(&early))).await.is_ok());
        assert!(
            fed_get(&b, &format!("/_matrix/federation/v1/event/{}", enc(&change))).await.is_ok(),
            "the change itself is visible (before rule)"
        );
        assert_eq!(fed_get(&b, &format!("/_matrix/federation/v1/event/{}", enc(&late))).await, Err(403));
    }
    let backfill =
        fed_get(&b, &format!("/_matrix/federation/v1/backfill/{}?v={}&limit=3", enc(&room), enc(&late))).await.unwrap();
    let ids: Vec<&str> = backfill["pdus"].as_array().unwrap().iter().map(|p| p["type"].as_str().unwrap()).collect();
    assert_eq!(ids, ["m.room.history_visibility", "m.room.message"], "late is left out");
    a.stop().await;
    b.stop().await;
}
both_backends!(shared_history_is_refused_and_visibility_is_judged_per_event);

async fn thousand_members_state_stays_correct(db: DbKind) {
    let a_spec = ServerSpec::new("a.test", db).configure(open_registration);
    let b_spec = ServerSpec::new("b.test", db);
    let (a_url, b_url) = (a_spec.url(), b_spec.url());
    let a = a_spec.destination("b.test", &b_url).start().await;
    let b = b_spec.destination("a.test", &a_url).start().await;
    let alice = Client::register(&a.base, "alice").await;
    let room = alice.create_world_readable_room("big", "10").await;
    let room_id = RoomId::parse(&room).unwrap();
    let rooms = &a.state().rooms;
    // Members join through the same append path the client API uses (no accounts needed).
    let mut midpoint = String::new();
    for i in 0..1000 {
        let user = UserId::parse(format!("@member{i}:a.test")).unwrap();
        rooms
            .send(&room_id, &user, "m.room.member", Some(user.as_str()), json!({ "membership": "join" }))
            .await
            .unwrap();
        if i == 499 {
            midpoint = alice.say(&room, "halfway").await;
        }
    }
    let last = alice.say(&room, "full").await;
    let ids =
        fed_get(&b, &format!("/_matrix/federation/v1/state_ids/{}?event_id={}", enc(&room), enc(&last))).await.unwrap();
    let count = ids["pdu_ids"].as_array().unwrap().len();
    // create, power_levels, join_rules, history_visibility, canonical_alias + 1001 members.
    assert_eq!(count, 5 + 1001, "state ids at the last event");
    let state =
        fed_get(&b, &format!("/_matrix/federation/v1/state/{}?event_id={}", enc(&room), enc(&last))).await.unwrap();
    let members: BTreeSet<&str> = state["pdus"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] == "m.room.member")
        .map(|p| p["state_key"].as_str().unwrap())
        .collect();
    assert_eq!(members.len(), 1001);
    assert!(members.contains("@member999:a.test"));
    // The state at the midpoint has exactly the first 500 members (state groups across snapshots).
    let half = fed_get(&b, &format!("/_matrix/federation/v1/state_ids/{}?event_id={}", enc(&room), enc(&midpoint)))
        .await
        .unwrap();
    assert_eq!(half["pdu_ids"].as_array().unwrap().len(), 5 + 501);
    assert_eq!(rooms.current_state(&room_id).await.unwrap().len(), 5 + 1001);
    a.stop().await;
    b.stop().await;
}
both_backends!(thousand_members_state_stays_correct);
