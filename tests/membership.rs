//! Membership over federation, inbound (spec/membership.md JN-1, JN-2, JN-4, JN-10): another
//! server's user joins one of our rooms through `make_join`/`send_join`, receives our events
//! while joined, sends its own, and leaves through `make_leave`/`send_leave`. The joining
//! servers are test peers with their own keys that verify everything they receive; bad joins
//! get clear Matrix errors and leave nothing stored.

mod support;

use reqwest::Method;
use ruma::{RoomId, UserId};
use serde_json::{json, Value};
use support::client::{enc, Client};
use support::peer::{KeyMode, TestPeer};
use support::verify::{check_event, event_id};
use support::{wait_until, DbKind, ServerSpec, TestServer};

const GW: &str = "gw.test";

struct Setup {
    gw: TestServer,
    alice: Client,
    peers: Vec<TestPeer>,
}

async fn setup(db: DbKind, peer_names: &[&str]) -> Setup {
    let peers: Vec<TestPeer> = peer_names.iter().map(|n| TestPeer::start(n, KeyMode::Good)).collect();
    let mut spec = ServerSpec::new(GW, db).configure(support::gateways::open_registration);
    for peer in &peers {
        spec = spec.destination(&peer.name, &peer.url);
    }
    let gw = spec.start().await;
    for peer in &peers {
        peer.trust(GW, &gw.base);
    }
    let alice = Client::register(&gw.base, "alice").await;
    Setup { gw, alice, peers }
}

async fn finish(setup: Setup) {
    for peer in &setup.peers {
        let problems = peer.inbox.problems.lock().unwrap().clone();
        assert!(problems.is_empty(), "{}: {problems:?}", peer.name);
    }
    setup.gw.stop().await;
    for peer in setup.peers {
        peer.stop().await;
    }
}

/// A public room (anyone may join; history `shared`, so not peekable) of `version`.
async fn public_room(alice: &Client, version: &str) -> String {
    alice.create_room(json!({ "preset": "public_chat", "room_version": version })).await
}

async fn make(peer: &TestPeer, gw: &TestServer, kind: &str, room: &str, user: &str, query: &str) -> (u16, Value) {
    let path = format!("/_matrix/federation/v1/make_{kind}/{}/{}{query}", enc(room), enc(user));
    peer.call(&gw.base, GW, Method::GET, &path, None).await
}

async fn send(peer: &TestPeer, gw: &TestServer, path: &str, room: &str, id: &str, event: &Value) -> (u16, Value) {
    let path = format!("/_matrix/federation/{path}/{}/{}", enc(room), enc(id));
    peer.call(&gw.base, GW, Method::PUT, &path, Some(event)).await
}

/// `make_join` then `send_join` (v2) for `@{localpart}:{peer}`: the answer.
async fn join(peer: &TestPeer, gw: &TestServer, room: &str, localpart: &str, version: &str) -> (String, Value) {
    let user = format!("@{localpart}:{}", peer.name);
    let (status, made) = make(peer, gw, "join", room, &user, "?ver=10&ver=11").await;
    assert_eq!(status, 200, "make_join: {made}");
    let (event, id) = peer.complete_template(&made["event"], version);
    let (status, answer) = send(peer, gw, "v2/send_join", room, &id, &event).await;
    assert_eq!(status, 200, "send_join: {answer}");
    (id, answer)
}

async fn state_id(gw: &TestServer, room: &str, kind: &str, state_key: &str) -> Option<String> {
    let room_id = RoomId::parse(room).unwrap();
    gw.state().rooms.state_event(&room_id, kind, state_key).await.unwrap().map(|e| e.event_id.to_string())
}

async fn membership(gw: &TestServer, room: &str, user: &str) -> Option<String> {
    let (room_id, user) = (RoomId::parse(room).unwrap(), UserId::parse(user).unwrap());
    gw.state().rooms.membership(&room_id, &user).await.unwrap()
}

async fn stored(gw: &TestServer, event_id: &str) -> bool {
    gw.state().rooms.event(event_id).await.unwrap().is_some()
}

/// The message bodies a peer has received, in order.
fn bodies(peer: &TestPeer) -> Vec<String> {
    peer.inbox.pdus().iter().filter_map(|p| p["content"]["body"].as_str().map(str::to_owned)).collect()
}

/// JN-1, JN-2, JN-4, JN-10: a template from the current state; the join answered with the
/// state before it and its auth chain, all signed by us; our events reach the joined server
/// (and only ours); its own messages are accepted; after its leave it gets nothing more.
async fn a_remote_user_joins_talks_and_leaves(db: DbKind, version: &str) {
    let s = setup(db, &["joiner.test", "stays.test"]).await;
    let (joiner, stays) = (&s.peers[0], &s.peers[1]);
    let room = public_room(&s.alice, version).await;
    let before = s.alice.say(&room, "before the join").await;
    let bob = "@bob:joiner.test";

    // JN-1: the template.
    let (status, made) = make(joiner, &s.gw, "join", &room, bob, "?ver=10&ver=11").await;
    assert_eq!(status, 200, "{made}");
    assert_eq!(made["room_version"], version);
    let template = &made["event"];
    assert_eq!(template["type"], "m.room.member");
    assert_eq!(template["sender"], bob);
    assert_eq!(template["state_key"], bob);
    assert_eq!(template["content"]["membership"], "join");
    assert_eq!(template["prev_events"], json!([before]));
    assert!(template.get("signatures").is_none() && template.get("hashes").is_none(), "{template}");
    let mut auth: Vec<String> =
        template["auth_events"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect();
    auth.sort();
    let mut expected = vec![
        state_id(&s.gw, &room, "m.room.create", "").await.unwrap(),
        state_id(&s.gw, &room, "m.room.power_levels", "").await.unwrap(),
        state_id(&s.gw, &room, "m.room.join_rules", "").await.unwrap(),
    ];
    expected.sort();
    assert_eq!(auth, expected, "a first join is authorised by create, power levels and join rules");

    // JN-2: the join, and the answer.
    let (event, join_id) = joiner.complete_template(template, version);
    let (status, answer) = send(joiner, &s.gw, "v2/send_join", &room, &join_id, &event).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["origin"], GW);
    assert_eq!(answer["members_omitted"], false);
    assert_eq!(event_id(&answer["event"], version), join_id);
    let keys = s.gw.published_keys().await;
    let state = answer["state"].as_array().unwrap();
    let chain = answer["auth_chain"].as_array().unwrap();
    for pdu in state.iter().chain(chain) {
        check_event(pdu, version, GW, &keys, None).unwrap_or_else(|e| panic!("{}: {e}", pdu["type"]));
    }
    let state_keys: Vec<(String, String)> = state
        .iter()
        .map(|e| (e["type"].as_str().unwrap().to_owned(), e["state_key"].as_str().unwrap().to_owned()))
        .collect();
    assert!(state_keys.contains(&("m.room.member".into(), s.alice.user_id.clone())), "{state_keys:?}");
    assert!(!state_keys.iter().any(|(_, k)| k == bob), "the state is the state before the join: {state_keys:?}");
    // The auth chain holds every auth event of the state and of the join.
    let known: Vec<String> = state.iter().chain(chain).map(|e| event_id(e, version)).collect();
    for pdu in state.iter().chain(std::iter::once(&event)) {
        for auth in pdu["auth_events"].as_array().unwrap() {
            assert!(known.contains(&auth.as_str().unwrap().to_owned()), "{auth} missing from the answer");
        }
    }
    assert_eq!(membership(&s.gw, &room, bob).await.as_deref(), Some("join"));

    // A retried send_join gets the same answer and stores nothing twice.
    let (status, again) = send(joiner, &s.gw, "v2/send_join", &room, &join_id, &event).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["state"], answer["state"]);

    // A second server joins and stays, as the control for what the first gets after leaving.
    join(stays, &s.gw, &room, "carol", version).await;

    // JN-10: our events reach the joined servers, signed (the peers verify every PDU).
    s.alice.say(&room, "hello servers").await;
    wait_until("the joined servers receive our message", || async {
        bodies(joiner).contains(&"hello servers".to_owned()) && bodies(stays).contains(&"hello servers".to_owned())
    })
    .await;
    assert!(!bodies(joiner).contains(&"before the join".to_owned()), "history before the join is not sent");

    // The joined server's own message is accepted through /send and not echoed back to it;
    // the other joined server gets it from its origin, not from us.
    let bob_member = state_id(&s.gw, &room, "m.room.member", bob).await.unwrap();
    let create = state_id(&s.gw, &room, "m.room.create", "").await.unwrap();
    let power = state_id(&s.gw, &room, "m.room.power_levels", "").await.unwrap();
    let latest = s.gw.state().rooms.forward_extremities(&RoomId::parse(&room).unwrap()).await.unwrap();
    let depth = 100;
    let (pdu, bob_says) = joiner.build_pdu(
        version,
        &room,
        "bob",
        "m.room.message",
        None,
        json!({ "msgtype": "m.text", "body": "hi from bob" }),
        &[create, power, bob_member],
        &latest,
        depth,
    );
    let (status, result) = joiner.send_transaction(&s.gw.base, GW, vec![pdu]).await;
    assert_eq!(status, 200, "{result}");
    assert_eq!(result["pdus"][&bob_says], json!({}), "{result}");
    assert!(stored(&s.gw, &bob_says).await);
    s.alice.say(&room, "after bob").await;
    wait_until("the control receives the next message", || async { bodies(stays).contains(&"after bob".to_owned()) })
        .await;
    assert!(!bodies(stays).contains(&"hi from bob".to_owned()), "another server's event is not relayed to members");
    wait_until("bob's server receives the next message", || async { bodies(joiner).contains(&"after bob".to_owned()) })
        .await;
    assert!(!bodies(joiner).contains(&"hi from bob".to_owned()), "its own event is not echoed");

    // JN-4: the leave.
    let (status, made) = make(joiner, &s.gw, "leave", &room, bob, "").await;
    assert_eq!(status, 200, "{made}");
    assert_eq!(made["event"]["content"]["membership"], "leave");
    let (leave, leave_id) = joiner.complete_template(&made["event"], version);
    let (status, answer) = send(joiner, &s.gw, "v2/send_leave", &room, &leave_id, &leave).await;
    assert_eq!((status, answer), (200, json!({})));
    assert_eq!(membership(&s.gw, &room, bob).await.as_deref(), Some("leave"));
    s.alice.say(&room, "after the leave").await;
    wait_until("the control receives the message after the leave", || async {
        bodies(stays).contains(&"after the leave".to_owned())
    })
    .await;
    // Both destinations are served by the same sender pass; give a wrongly sent copy time to land.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(!bodies(joiner).contains(&"after the leave".to_owned()), "a server that left gets nothing more");
    finish(s).await;
}

async fn joins_in_room_version_10(db: DbKind) {
    a_remote_user_joins_talks_and_leaves(db, "10").await;
}
both_backends!(joins_in_room_version_10);

async fn joins_in_room_version_11(db: DbKind) {
    a_remote_user_joins_talks_and_leaves(db, "11").await;
}
both_backends!(joins_in_room_version_11);

/// JN-1, JN-2 bad input: each refusal is a clear Matrix error and leaves nothing stored.
async fn bad_joins_are_refused_and_change_nothing(db: DbKind) {
    let s = setup(db, &["joiner.test", "impostor.test"]).await;
    let (joiner, impostor) = (&s.peers[0], &s.peers[1]);
    let room = public_room(&s.alice, "10").await;
    let bob = "@bob:joiner.test";
    let errcode = |answer: &Value| answer["errcode"].as_str().unwrap_or_default().to_owned();

    // make_join: a user of another server, an unknown room, versions we don't have.
    let (status, answer) = make(joiner, &s.gw, "join", &room, "@bob:impostor.test", "?ver=10").await;
    assert_eq!((status, errcode(&answer)), (403, "M_FORBIDDEN".into()), "{answer}");
    let (status, answer) = make(joiner, &s.gw, "join", "!nowhere:gw.test", bob, "?ver=10").await;
    assert_eq!((status, errcode(&answer)), (404, "M_NOT_FOUND".into()), "{answer}");
    for query in ["?ver=1&ver=9", ""] {
        let (status, answer) = make(joiner, &s.gw, "join", &room, bob, query).await;
        assert_eq!((status, errcode(&answer)), (400, "M_INCOMPATIBLE_ROOM_VERSION".into()), "{answer}");
        assert_eq!(answer["room_version"], "10");
    }

    // An invite-only room refuses the template, and a join built by hand is refused by the
    // auth rules.
    let private = s.alice.create_room(json!({ "preset": "private_chat", "room_version": "10" })).await;
    let (status, answer) = make(joiner, &s.gw, "join", &private, bob, "?ver=10").await;
    assert_eq!((status, errcode(&answer)), (403, "M_FORBIDDEN".into()), "{answer}");
    let auth = [
        state_id(&s.gw, &private, "m.room.create", "").await.unwrap(),
        state_id(&s.gw, &private, "m.room.power_levels", "").await.unwrap(),
        state_id(&s.gw, &private, "m.room.join_rules", "").await.unwrap(),
    ];
    let prev = s.gw.state().rooms.forward_extremities(&RoomId::parse(&private).unwrap()).await.unwrap();
    let content = json!({ "membership": "join" });
    let (uninvited, uninvited_id) =
        joiner.build_pdu("10", &private, "bob", "m.room.member", Some(bob), content.clone(), &auth, &prev, 10);
    let (status, answer) = send(joiner, &s.gw, "v2/send_join", &private, &uninvited_id, &uninvited).await;
    assert_eq!((status, errcode(&answer)), (403, "M_FORBIDDEN".into()), "{answer}");
    assert!(!stored(&s.gw, &uninvited_id).await);
    assert_eq!(membership(&s.gw, &private, bob).await, None);

    // send_join with a good template but a wrong path ID, the wrong membership, someone
    // else's user, or a signature by the wrong server.
    let (_, made) = make(joiner, &s.gw, "join", &room, bob, "?ver=10").await;
    let (event, id) = joiner.complete_template(&made["event"], "10");
    let (status, answer) = send(joiner, &s.gw, "v2/send_join", &room, "$notthisone", &event).await;
    assert_eq!((status, errcode(&answer)), (400, "M_BAD_JSON".into()), "{answer}");
    let mut as_leave = made["event"].clone();
    as_leave["content"]["membership"] = json!("leave");
    let (as_leave, as_leave_id) = joiner.complete_template(&as_leave, "10");
    let (status, answer) = send(joiner, &s.gw, "v2/send_join", &room, &as_leave_id, &as_leave).await;
    assert_eq!((status, errcode(&answer)), (400, "M_BAD_JSON".into()), "{answer}");
    let (forged, forged_id) = impostor.complete_template(&made["event"], "10");
    let (status, answer) = send(joiner, &s.gw, "v2/send_join", &room, &forged_id, &forged).await;
    assert_eq!((status, errcode(&answer)), (403, "M_FORBIDDEN".into()), "signed by impostor.test only: {answer}");
    let (status, answer) = send(impostor, &s.gw, "v2/send_join", &room, &id, &event).await;
    assert_eq!((status, errcode(&answer)), (403, "M_FORBIDDEN".into()), "sent by another server: {answer}");
    let mut altered = event.clone();
    altered["content"]["displayname"] = json!("changed after signing");
    let altered_id = event_id(&altered, "10");
    let (status, answer) = send(joiner, &s.gw, "v2/send_join", &room, &altered_id, &altered).await;
    assert_eq!((status, errcode(&answer)), (400, "M_BAD_JSON".into()), "content hash mismatch: {answer}");
    let (status, answer) = send(joiner, &s.gw, "v2/send_join", &room, &id, &json!("not an object")).await;
    assert_eq!(status, 400, "{answer}");
    for refused in [&as_leave_id, &forged_id, &altered_id] {
        assert!(!stored(&s.gw, refused).await, "{refused} was stored");
    }
    assert_eq!(membership(&s.gw, &room, bob).await, None, "nothing was stored");

    // The good event still joins, through v1 (answered as `[200, {...}]`).
    let (status, answer) = send(joiner, &s.gw, "v1/send_join", &room, &id, &event).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer[0], 200);
    assert_eq!(event_id(&answer[1]["event"], "10"), id);
    assert_eq!(membership(&s.gw, &room, bob).await.as_deref(), Some("join"));
    // A leave through send_leave v1 for a user of another server is refused.
    let (_, made) = make(joiner, &s.gw, "leave", &room, bob, "").await;
    let (leave, leave_id) = joiner.complete_template(&made["event"], "10");
    let (status, answer) = send(impostor, &s.gw, "v1/send_leave", &room, &leave_id, &leave).await;
    assert_eq!((status, errcode(&answer)), (403, "M_FORBIDDEN".into()), "{answer}");
    let (status, answer) = send(joiner, &s.gw, "v1/send_leave", &room, &leave_id, &leave).await;
    assert_eq!((status, answer), (200, json!([200, {}])));
    finish(s).await;
}
both_backends!(bad_joins_are_refused_and_change_nothing);

async fn read_event(peer: &TestPeer, gw: &TestServer, id: &str) -> (u16, Value) {
    let path = format!("/_matrix/federation/v1/event/{}", enc(id));
    peer.call(&gw.base, GW, Method::GET, &path, None).await
}

/// JN-11: a joined server reads history as the spec's per-server rule allows: under `joined`
/// visibility nothing from before its join, under `shared` everything while it is joined; a
/// server with no member reads neither.
async fn joined_servers_read_only_the_history_their_users_could_see(db: DbKind) {
    let s = setup(db, &["joiner.test", "outsider.test"]).await;
    let (joiner, outsider) = (&s.peers[0], &s.peers[1]);
    let joined_only = s
        .alice
        .create_room(json!({
            "preset": "public_chat",
            "room_version": "10",
            "initial_state": [{ "type": "m.room.history_visibility", "content": { "history_visibility": "joined" } }],
        }))
        .await;
    let shared = public_room(&s.alice, "10").await;
    let secret = s.alice.say(&joined_only, "before the join").await;
    let earlier = s.alice.say(&shared, "shared before the join").await;
    join(joiner, &s.gw, &joined_only, "bob", "10").await;
    join(joiner, &s.gw, &shared, "bob", "10").await;
    let open = s.alice.say(&joined_only, "after the join").await;

    let (status, answer) = read_event(joiner, &s.gw, &secret).await;
    assert_eq!((status, answer["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{answer}");
    let (status, answer) = read_event(joiner, &s.gw, &open).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["pdus"][0]["content"]["body"], "after the join");
    let (status, answer) = read_event(joiner, &s.gw, &earlier).await;
    assert_eq!(status, 200, "shared history is readable once joined: {answer}");
    for id in [&secret, &open, &earlier] {
        let (status, answer) = read_event(outsider, &s.gw, id).await;
        assert_eq!(status, 403, "a server with no member: {answer}");
    }

    // Backfill walks past the join but hands out only what the joined server may see.
    let path = format!("/_matrix/federation/v1/backfill/{}?v={}&limit=50", enc(&joined_only), enc(&open));
    let (status, answer) = joiner.call(&s.gw.base, GW, Method::GET, &path, None).await;
    assert_eq!(status, 200, "{answer}");
    let bodies: Vec<&str> =
        answer["pdus"].as_array().unwrap().iter().filter_map(|p| p["content"]["body"].as_str()).collect();
    assert_eq!(bodies, ["after the join"], "{answer}");
    let ids: Vec<String> = answer["pdus"].as_array().unwrap().iter().map(|p| event_id(p, "10")).collect();
    assert!(!ids.contains(&secret));
    finish(s).await;
}
both_backends!(joined_servers_read_only_the_history_their_users_could_see);

fn sync_token(answer: &Value) -> String {
    answer["next_batch"].as_str().unwrap().to_owned()
}

/// JN-6, JN-7 (leave), JN-8, JN-10 between two peekgates: bob on B joins a room on A by its
/// alias (make_join and send_join from B, the answer validated before B stores it); messages go
/// both ways, each once; bob's leave is B's own event, sent to A.
async fn a_user_joins_a_room_on_another_peekgate(db: DbKind) {
    use support::gateways::{pair, A};
    let p = pair(db, |_| {}, |_| {}, &[]).await;
    let square = p
        .alice
        .create_room(json!({ "preset": "public_chat", "room_alias_name": "square", "room_version": "10" }))
        .await;
    p.alice.say(&square, "before bob").await;

    let (status, answer) = p.bob.join(&format!("#square:{A}")).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["room_id"].as_str(), Some(square.as_str()));
    assert_eq!(membership(&p.a, &square, &p.bob.user_id).await.as_deref(), Some("join"));
    assert_eq!(membership(&p.b, &square, &p.bob.user_id).await.as_deref(), Some("join"));
    assert_eq!(membership(&p.b, &square, &p.alice.user_id).await.as_deref(), Some("join"), "B has the room's state");

    p.alice.say(&square, "hello bob").await;
    wait_until("B stores A's message", || async { p.bob.bodies(&square).await.contains(&"hello bob".into()) }).await;
    p.bob.say(&square, "hello alice").await;
    wait_until("A stores B's message", || async { p.alice.bodies(&square).await.contains(&"hello alice".into()) })
        .await;
    assert_eq!(p.alice.bodies(&square).await, ["before bob", "hello bob", "hello alice"]);
    wait_until("B has both messages", || async { p.bob.bodies(&square).await.len() >= 2 }).await;
    assert_eq!(p.bob.bodies(&square).await, ["hello bob", "hello alice"], "once each, in order");

    let path = format!("/_matrix/client/v3/rooms/{}/leave", enc(&square));
    assert_eq!(p.bob.call(Method::POST, &path, Some(&json!({}))).await.0, 200);
    wait_until("A stores bob's leave", || async {
        membership(&p.a, &square, &p.bob.user_id).await.as_deref() == Some("leave")
    })
    .await;
    // Joining again works the same way (B is no longer in the room, so through A again).
    assert_eq!(p.bob.join(&square).await.0, 200, "rejoin by room ID (A is the ID's server)");
    assert_eq!(membership(&p.a, &square, &p.bob.user_id).await.as_deref(), Some("join"));
}
both_backends!(a_user_joins_a_room_on_another_peekgate);

/// JN-6 refusals: an invite-only room on A refuses bob (403 from A, told to the client as 403
/// within the request), a room nobody serves is 404, and nothing is stored on B either way.
async fn joins_that_cannot_happen_are_clear_and_store_nothing(db: DbKind) {
    use support::gateways::pair;
    let p = pair(db, |_| {}, |_| {}, &[]).await;
    let private = p.alice.create_room(json!({ "preset": "private_chat", "room_version": "10" })).await;
    let (status, answer) = p.bob.join(&private).await;
    assert_eq!((status, answer["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{answer}");
    assert!(p.b.state().rooms.room(&RoomId::parse(&private).unwrap()).await.unwrap().is_none());
    let (status, answer) = p.bob.join("!nowhere:a.test").await;
    assert_eq!((status, answer["errcode"].as_str()), (404, Some("M_NOT_FOUND")), "{answer}");
    let (status, answer) = p.bob.join("!serverless").await;
    assert_eq!((status, answer["errcode"].as_str()), (404, Some("M_NOT_FOUND")), "{answer}");
    assert_eq!(membership(&p.a, &private, &p.bob.user_id).await, None);
}
both_backends!(joins_that_cannot_happen_are_clear_and_store_nothing);

/// JN-9: a device peeking a room on A joins it: its next sync shows the room in `join` with
/// the join and without the state it already has, not in `peek`; the federation peek is
/// DELETEd once no device peeks (B's renewal job runs every second here).
async fn a_peeked_remote_room_moves_to_join(db: DbKind) {
    use support::gateways::pair;
    let p = pair(db, |_| {}, |_| {}, &[]).await;
    let t = sync_token(&p.bob.sync(None, 0).await);
    assert_eq!(p.bob.peek(&p.room, &[]).await.0, 200);
    let first = p.bob.sync(Some(&t), 0).await;
    assert!(first["rooms"]["peek"].get(&p.room).is_some(), "{first}");
    assert_eq!(p.a.state().inbound.live_count().await.unwrap(), 1);
    // Peeking sends nothing: the room's servers are not destinations of B (JN-10) until it
    // joins, not even when a member event reaches B through the peek.
    let carol = Client::register(&p.a.base, "carol").await;
    assert_eq!(carol.join(&p.room).await.0, 200);
    wait_until("B stores carol's join", || async { membership(&p.b, &p.room, &carol.user_id).await.is_some() }).await;
    let destinations = || async {
        let list = peekgate::admin::destinations(&p.b.state().db).await.unwrap();
        list.into_iter().map(|d| d.server_name).collect::<Vec<_>>()
    };
    assert_eq!(destinations().await, Vec::<String>::new());

    let (status, answer) = p.bob.join(&p.room).await;
    assert_eq!(status, 200, "{answer}");
    let joined = p.bob.sync(Some(&sync_token(&first)), 0).await;
    let entry = &joined["rooms"]["join"][&p.room];
    let timeline = entry["timeline"]["events"].as_array().unwrap_or_else(|| panic!("not in join: {joined}"));
    assert!(
        timeline.iter().any(|e| e["type"] == "m.room.member" && e["state_key"] == p.bob.user_id.as_str()),
        "{joined}"
    );
    assert_eq!(entry["state"]["events"], json!([]), "state resent: {joined}");
    assert!(joined["rooms"].get("peek").is_none_or(|peek| peek.get(&p.room).is_none()), "{joined}");
    assert_eq!(destinations().await, [support::gateways::A]);
    wait_until("B deletes its federation peek", || async { p.a.state().inbound.live_count().await.unwrap() == 0 })
        .await;
    p.alice.say(&p.room, "to a member now").await;
    wait_until("bob reads A's message as a member", || async {
        p.bob.bodies(&p.room).await.contains(&"to a member now".into())
    })
    .await;
}
both_backends!(a_peeked_remote_room_moves_to_join);

/// JN-5, JN-7 between two peekgates: alice on A invites bob on B to a private room; B signs
/// the invite, bob's sync shows it in `rooms.invite` with the room's stripped state, and bob
/// joins through A; the invite then leaves his sync.
async fn invites_between_two_peekgates(db: DbKind) {
    use support::gateways::pair;
    let p = pair(db, |_| {}, |_| {}, &[]).await;
    let private =
        p.alice.create_room(json!({ "preset": "private_chat", "room_version": "10", "name": "backstage" })).await;
    let since = sync_token(&p.bob.sync(None, 0).await);
    let path = format!("/_matrix/client/v3/rooms/{}/invite", enc(&private));
    let (status, answer) = p.alice.call(Method::POST, &path, Some(&json!({ "user_id": p.bob.user_id }))).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(membership(&p.a, &private, &p.bob.user_id).await.as_deref(), Some("invite"));

    let invited = p.bob.sync(Some(&since), 0).await;
    let state = invited["rooms"]["invite"][&private]["invite_state"]["events"].as_array().cloned().unwrap_or_default();
    assert!(state.iter().any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "backstage"), "{invited}");
    assert!(
        state.iter().any(|e| e["type"] == "m.room.member"
            && e["state_key"] == p.bob.user_id.as_str()
            && e["content"]["membership"] == "invite"),
        "{invited}"
    );
    let again = p.bob.sync(Some(&sync_token(&invited)), 0).await;
    assert!(again["rooms"]["invite"].get(&private).is_none(), "an invite shows once: {again}");

    let (status, answer) = p.bob.join(&private).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(membership(&p.a, &private, &p.bob.user_id).await.as_deref(), Some("join"));
    let joined = p.bob.sync(None, 0).await;
    assert!(joined["rooms"]["join"].get(&private).is_some(), "{joined}");
    assert!(joined["rooms"]["invite"].get(&private).is_none(), "{joined}");
}
both_backends!(invites_between_two_peekgates);

async fn put_invite(
    peer: &TestPeer,
    gw: &TestServer,
    room: &str,
    id: &str,
    event: &Value,
    version: &str,
) -> (u16, Value) {
    let path = format!("/_matrix/federation/v2/invite/{}/{}", enc(room), enc(id));
    let body = json!({ "event": event, "room_version": version, "invite_room_state": [] });
    peer.call(&gw.base, GW, Method::PUT, &path, Some(&body)).await
}

/// JN-5 bad input: invites for users we don't have, from a server that is not the sender's,
/// with a forged signature or an unknown room version are refused and nothing is shown.
async fn bad_invites_are_refused(db: DbKind) {
    let s = setup(db, &["inviter.test", "impostor.test"]).await;
    let (inviter, impostor) = (&s.peers[0], &s.peers[1]);
    let room = "!elsewhere:inviter.test";
    let invite_for = |peer: &TestPeer, invitee: &str| {
        let fake = format!("$fake{}", uuid::Uuid::new_v4().simple());
        peer.build_pdu(
            "10",
            room,
            "carol",
            "m.room.member",
            Some(invitee),
            json!({ "membership": "invite" }),
            std::slice::from_ref(&fake),
            std::slice::from_ref(&fake),
            5,
        )
    };
    let alice = s.alice.user_id.clone();
    let errcode = |answer: &Value| answer["errcode"].as_str().unwrap_or_default().to_owned();

    let (event, id) = invite_for(inviter, "@nobody:gw.test");
    let (status, answer) = put_invite(inviter, &s.gw, room, &id, &event, "10").await;
    assert_eq!((status, errcode(&answer)), (404, "M_NOT_FOUND".into()), "{answer}");
    let (event, id) = invite_for(inviter, &alice);
    let (status, answer) = put_invite(impostor, &s.gw, room, &id, &event, "10").await;
    assert_eq!((status, errcode(&answer)), (403, "M_FORBIDDEN".into()), "{answer}");
    let (status, answer) = put_invite(inviter, &s.gw, room, &id, &event, "1").await;
    assert_eq!((status, errcode(&answer)), (400, "M_INCOMPATIBLE_ROOM_VERSION".into()), "{answer}");
    let mut forged = event.clone();
    forged["signatures"] = impostor
        .build_pdu("10", room, "carol", "m.room.member", Some(&alice), json!({ "membership": "invite" }), &[], &[], 5)
        .0["signatures"]
        .clone();
    let (status, answer) = put_invite(inviter, &s.gw, room, &id, &forged, "10").await;
    assert_eq!((status, errcode(&answer)), (403, "M_FORBIDDEN".into()), "{answer}");
    let sync = s.alice.sync(None, 0).await;
    assert!(sync["rooms"]["invite"].as_object().is_none_or(|i| i.is_empty()), "{sync}");

    // The good one is signed by us and shown.
    let (status, answer) = put_invite(inviter, &s.gw, room, &id, &event, "10").await;
    assert_eq!(status, 200, "{answer}");
    check_event(&answer["event"], "10", GW, &s.gw.published_keys().await, Some(&id)).unwrap();
    check_event(&answer["event"], "10", "inviter.test", &inviter.public_keys(), Some(&id)).unwrap();
    let sync = s.alice.sync(None, 0).await;
    assert!(sync["rooms"]["invite"].get(room).is_some(), "{sync}");
    finish(s).await;
}
both_backends!(bad_invites_are_refused);

/// JN-6 bad input: a hostile first candidate answers `make_join` with a template for someone
/// else, or `send_join` with a forged, altered, foreign, doubled or unauthorised state. Each is
/// refused before anything is stored and the next candidate (A) is used; with no other
/// candidate the client gets a clear 404 and nothing of the room is kept.
async fn hostile_join_answers_are_refused(db: DbKind) {
    use support::gateways::{pair, A};
    let evil = TestPeer::start("evil.test", KeyMode::Good);
    let p = pair(db, |_| {}, |_| {}, &[&evil]).await;
    // The room's real state and auth chain (the lobby is world-readable: the peer peeks it).
    let path = format!("/_matrix/federation/v1/peek/{}/genuine?ver=10", enc(&p.room));
    let (status, genuine) = evil.call(&p.a.base, A, Method::PUT, &path, Some(&json!({}))).await;
    assert_eq!(status, 200, "{genuine}");
    let state: Vec<Value> = genuine["state"].as_array().unwrap().clone();
    let id_of = |kind: &str| event_id(state.iter().find(|e| e["type"] == kind).unwrap(), "10");
    let (create, power, rules) = (id_of("m.room.create"), id_of("m.room.power_levels"), id_of("m.room.join_rules"));
    let latest = genuine["latest_event_id"].as_str().unwrap().to_owned();
    let answer =
        json!({ "origin": "evil.test", "state": state, "auth_chain": genuine["auth_chain"], "members_omitted": false });
    let template_for = |room: &str, user: &str| {
        json!({ "room_version": "10", "event": {
            "room_id": room, "sender": user, "state_key": user, "type": "m.room.member",
            "content": { "membership": "join" }, "auth_events": [create, power, rules], "prev_events": [latest],
            "depth": 100, "origin_server_ts": 1, "origin": "b.test",
        } })
    };

    let mut forged = answer.clone();
    let (mut topic, _) =
        evil.build_pdu("10", &p.room, "x", "m.room.topic", Some(""), json!({ "topic": "forged" }), &[], &[], 9);
    topic["sender"] = json!(p.alice.user_id);
    forged["state"].as_array_mut().unwrap().push(topic);
    let mut altered = answer.clone();
    let rules_event =
        altered["state"].as_array_mut().unwrap().iter_mut().find(|e| e["type"] == "m.room.join_rules").unwrap();
    rules_event["content"]["join_rule"] = json!("invite");
    let mut foreign = answer.clone();
    foreign["state"].as_array_mut().unwrap()[0]["room_id"] = json!("!other:a.test");
    let mut two_creates = answer.clone();
    let (other_create, _) = evil.build_pdu("10", &p.room, "mallory", "m.room.create", Some(""), json!({}), &[], &[], 1);
    two_creates["auth_chain"].as_array_mut().unwrap().push(other_create);
    let mut unauthorised = answer.clone();
    let (name, _) = evil.build_pdu(
        "10",
        &p.room,
        "mallory",
        "m.room.name",
        Some(""),
        json!({ "name": "mine" }),
        &[create.clone(), power.clone()],
        std::slice::from_ref(&latest),
        9,
    );
    unauthorised["state"].as_array_mut().unwrap().push(name);

    let cases = [
        ("a template for another user", None, answer.clone()),
        ("a forged signature", Some(()), forged),
        ("an altered event", Some(()), altered),
        ("an event of another room", Some(()), foreign),
        ("two create events", Some(()), two_creates),
        ("an event the auth rules refuse", Some(()), unauthorised),
    ];
    for (i, (case, asks_send_join, send_join_answer)) in cases.into_iter().enumerate() {
        let user = Client::register(&p.b.base, &format!("joiner{i}")).await;
        let template_user = if asks_send_join.is_some() { user.user_id.clone() } else { "@mallory:evil.test".into() };
        *evil.inbox.make_join_answer.lock().unwrap() = Some(template_for(&p.room, &template_user));
        *evil.inbox.send_join_answer.lock().unwrap() = Some(send_join_answer);
        let before = evil.inbox.joins_received.lock().unwrap().len();
        let path = format!("/_matrix/client/v3/join/{}?server_name=evil.test", enc(&p.room));
        let (status, answer) = user.call(Method::POST, &path, Some(&json!({}))).await;
        assert_eq!(status, 200, "{case}: the next candidate (A) should have been used: {answer}");
        let asked = evil.inbox.joins_received.lock().unwrap().len() - before;
        assert_eq!(asked, usize::from(asks_send_join.is_some()), "{case}: send_join requests");
        assert_eq!(membership(&p.a, &p.room, &user.user_id).await.as_deref(), Some("join"), "{case}");
        let topic = p.b.state().rooms.state_event(&RoomId::parse(&p.room).unwrap(), "m.room.topic", "").await.unwrap();
        assert!(topic.is_none(), "{case}: the forged topic was stored");
        let name = p.b.state().rooms.state_event(&RoomId::parse(&p.room).unwrap(), "m.room.name", "").await.unwrap();
        assert!(name.is_none(), "{case}: the unauthorised name was stored");
        // Leave again, so that B is not in the room and the next join is a federated one.
        let leave = format!("/_matrix/client/v3/rooms/{}/leave", enc(&p.room));
        assert_eq!(user.call(Method::POST, &leave, Some(&json!({}))).await.0, 200, "{case}");
    }

    // With the hostile server as the only candidate: a clear error, and no room kept.
    let elsewhere = "!hideout:evil.test";
    let carol = Client::register(&p.b.base, "carol").await;
    *evil.inbox.make_join_answer.lock().unwrap() = Some(template_for(elsewhere, &carol.user_id));
    *evil.inbox.send_join_answer.lock().unwrap() = Some(answer);
    let started = std::time::Instant::now();
    let (status, answer) = carol.join(elsewhere).await;
    assert_eq!((status, answer["errcode"].as_str()), (404, Some("M_NOT_FOUND")), "{answer}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    assert!(p.b.state().rooms.room(&RoomId::parse(elsewhere).unwrap()).await.unwrap().is_none());
    evil.stop().await;
}
both_backends!(hostile_join_answers_are_refused);

/// JN-12: room version 12 between two peekgates. A's room ID is the create event's reference
/// hash (no server part; the create event names no room and is in no auth events; alice is not
/// in the power levels); bob on B peeks it and joins it by alias (the only candidate source),
/// and messages go both ways.
async fn room_version_12_between_two_peekgates(db: DbKind) {
    use support::gateways::{pair, A};
    let p = pair(db, |_| {}, |_| {}, &[]).await;
    let room = p
        .alice
        .create_room(json!({
            "preset": "public_chat", "room_alias_name": "twelve", "room_version": "12",
            "initial_state": [{ "type": "m.room.history_visibility", "content": { "history_visibility": "world_readable" } }],
        }))
        .await;
    assert!(!room.contains(':'), "a v12 room ID has no server part: {room}");
    let room_id = RoomId::parse(&room).unwrap();
    let create = p.a.state().rooms.state_event(&room_id, "m.room.create", "").await.unwrap().unwrap();
    assert_eq!(format!("!{}", &create.event_id.as_str()[1..]), room);
    assert!(create.federation_json().get("room_id").is_none(), "{}", create.federation_json());
    let power = p.a.state().rooms.state_event(&room_id, "m.room.power_levels", "").await.unwrap().unwrap();
    assert!(power.content_value()["users"].get(&p.alice.user_id).is_none());
    let member = p.a.state().rooms.state_event(&room_id, "m.room.member", &p.alice.user_id).await.unwrap().unwrap();
    assert!(!member.auth_events.contains(&create.event_id), "v12: the create event is in no auth events");
    p.alice.say(&room, "twelve before").await;

    let alias = format!("#twelve:{A}");
    let (status, answer) = p.bob.peek(&alias, &[]).await;
    assert_eq!(status, 200, "peek of a v12 room: {answer}");
    let (status, answer) = p.bob.join(&alias).await;
    assert_eq!(status, 200, "join of a v12 room: {answer}");
    assert_eq!(answer["room_id"].as_str(), Some(room.as_str()));
    assert_eq!(membership(&p.a, &room, &p.bob.user_id).await.as_deref(), Some("join"));
    p.bob.say(&room, "twelve from bob").await;
    wait_until("A stores bob's message", || async { p.alice.bodies(&room).await.contains(&"twelve from bob".into()) })
        .await;
    p.alice.say(&room, "twelve from alice").await;
    wait_until("B stores alice's message", || async {
        p.bob.bodies(&room).await.contains(&"twelve from alice".into())
    })
    .await;
}
both_backends!(room_version_12_between_two_peekgates);

/// JN-8 with hostile and concurrent servers in one of our rooms (bob on joiner.test, carol on
/// stays.test, both joined):
/// - an event whose prev events lead to a state where its sender was not in the room is
///   rejected, although the current state would allow it;
/// - an event allowed by the state before it but not by the current state (bob was banned
///   meanwhile) is soft-failed: accepted, stored, never shown to clients;
/// - concurrent state is resolved by state resolution: bob's topic applied first, then carol's
///   concurrent demotion of bob arrives; the resolved state keeps the demotion and drops the
///   topic, which the demoted bob could not set.
async fn concurrent_events_are_checked_and_resolved(db: DbKind) {
    let s = setup(db, &["joiner.test", "stays.test"]).await;
    let (joiner, stays) = (&s.peers[0], &s.peers[1]);
    let room = public_room(&s.alice, "10").await;
    let before_bob = s.alice.say(&room, "before bob").await;
    join(joiner, &s.gw, &room, "bob", "10").await;
    join(stays, &s.gw, &room, "carol", "10").await;
    let (bob, carol) = ("@bob:joiner.test", "@carol:stays.test");
    let power_content = json!({
        "users": { s.alice.user_id.clone(): 100, carol: 100, bob: 50 },
        "users_default": 0, "events_default": 0, "state_default": 50, "ban": 50, "kick": 50, "redact": 50, "invite": 0,
        "events": { "m.room.power_levels": 100 },
    });
    let (status, answer) = s.alice.put_state(&room, "m.room.power_levels", "", power_content.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let id = |kind: &'static str, key: &'static str| {
        let (gw, room) = (&s.gw, room.clone());
        async move { state_id(gw, &room, kind, key).await.unwrap() }
    };
    let (create, power) = (id("m.room.create", "").await, id("m.room.power_levels", "").await);
    let (bob_member, carol_member) = (id("m.room.member", bob).await, id("m.room.member", carol).await);
    let fork_point = s.alice.say(&room, "the fork point").await;
    let text = |body: &str| json!({ "msgtype": "m.text", "body": body });

    // Rejected: its prev event is from before bob joined.
    let auth = [create.clone(), power.clone(), bob_member.clone()];
    let (early, early_id) =
        joiner.build_pdu("10", &room, "bob", "m.room.message", None, text("from the past"), &auth, &[before_bob], 60);
    let (_, result) = joiner.send_transaction(&s.gw.base, GW, vec![early]).await;
    assert!(result["pdus"][&early_id]["error"].is_string(), "{result}");
    assert!(!stored(&s.gw, &early_id).await);

    // Resolved: bob's topic (extends the current state) then carol's concurrent demotion.
    let (topic, topic_id) = joiner.build_pdu(
        "10",
        &room,
        "bob",
        "m.room.topic",
        Some(""),
        json!({ "topic": "bob's topic" }),
        &auth,
        std::slice::from_ref(&fork_point),
        60,
    );
    let (_, result) = joiner.send_transaction(&s.gw.base, GW, vec![topic]).await;
    assert_eq!(result["pdus"][&topic_id], json!({}), "{result}");
    assert_eq!(state_id(&s.gw, &room, "m.room.topic", "").await.as_deref(), Some(topic_id.as_str()));
    let mut demoted = power_content.clone();
    demoted["users"][bob] = json!(0);
    let carol_auth = [create.clone(), power.clone(), carol_member.clone()];
    let (demotion, demotion_id) = stays.build_pdu(
        "10",
        &room,
        "carol",
        "m.room.power_levels",
        Some(""),
        demoted,
        &carol_auth,
        std::slice::from_ref(&fork_point),
        60,
    );
    let (_, result) = stays.send_transaction(&s.gw.base, GW, vec![demotion]).await;
    assert_eq!(result["pdus"][&demotion_id], json!({}), "{result}");
    assert_eq!(state_id(&s.gw, &room, "m.room.power_levels", "").await.as_deref(), Some(demotion_id.as_str()));
    assert_eq!(state_id(&s.gw, &room, "m.room.topic", "").await, None, "the demoted bob's topic is resolved away");
    assert!(stored(&s.gw, &topic_id).await, "the topic stays stored");

    // Soft-failed: alice bans bob; bob's message from before the ban arrives after it.
    let ban = s
        .alice
        .call(Method::POST, &format!("/_matrix/client/v3/rooms/{}/ban", enc(&room)), Some(&json!({ "user_id": bob })))
        .await;
    if ban.0 != 200 {
        let (status, answer) = s.alice.put_state(&room, "m.room.member", bob, json!({ "membership": "ban" })).await;
        assert_eq!(status, 200, "{answer}");
    }
    assert_eq!(membership(&s.gw, &room, bob).await.as_deref(), Some("ban"));
    let (late, late_id) = joiner.build_pdu(
        "10",
        &room,
        "bob",
        "m.room.message",
        None,
        text("sent before the ban"),
        &[create, power, bob_member],
        std::slice::from_ref(&topic_id),
        61,
    );
    let (_, result) = joiner.send_transaction(&s.gw.base, GW, vec![late]).await;
    assert_eq!(result["pdus"][&late_id], json!({}), "soft-failed events are accepted: {result}");
    assert!(stored(&s.gw, &late_id).await, "a soft-failed event is stored");
    assert!(!s.alice.bodies(&room).await.contains(&"sent before the ban".to_owned()), "but never shown");
    finish(s).await;
}
both_backends!(concurrent_events_are_checked_and_resolved);

/// JN-3: a restricted room (version 10) refuses a remote join clearly until restricted joins
/// are authorised.
async fn restricted_joins_are_refused_clearly(db: DbKind) {
    let s = setup(db, &["joiner.test"]).await;
    let joiner = &s.peers[0];
    let other = public_room(&s.alice, "10").await;
    let room = s
        .alice
        .create_room(json!({
            "preset": "public_chat", "room_version": "10",
            "initial_state": [{ "type": "m.room.join_rules", "content": {
                "join_rule": "restricted", "allow": [{ "type": "m.room_membership", "room_id": other }],
            } }],
        }))
        .await;
    let (status, answer) = make(joiner, &s.gw, "join", &room, "@bob:joiner.test", "?ver=10").await;
    assert_eq!((status, answer["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("restricted"), "{answer}");
    finish(s).await;
}
both_backends!(restricted_joins_are_refused_clearly);

/// JN-8: a joined server sends an event whose prev event we never got, and cannot give it
/// through `get_missing_events`; we fetch the state at the missing event (`/state_ids`, then
/// `/event` for what we lack), check it, keep the missing event as an outlier and place the new
/// one. A state naming a forged event is refused, and so is the new event.
async fn a_gap_is_closed_with_a_state_fetch(db: DbKind) {
    let s = setup(db, &["joiner.test"]).await;
    let joiner = &s.peers[0];
    let room = public_room(&s.alice, "10").await;
    join(joiner, &s.gw, &room, "bob", "10").await;
    let latest = s.gw.state().rooms.forward_extremities(&RoomId::parse(&room).unwrap()).await.unwrap();
    let bob = "@bob:joiner.test";
    let ids = |kind: &'static str, key: &'static str| {
        let (gw, room) = (&s.gw, room.clone());
        async move { state_id(gw, &room, kind, key).await.unwrap() }
    };
    let auth = [ids("m.room.create", "").await, ids("m.room.power_levels", "").await, ids("m.room.member", bob).await];
    let state_now: Vec<String> =
        s.gw.state()
            .rooms
            .current_state(&RoomId::parse(&room).unwrap())
            .await
            .unwrap()
            .iter()
            .map(|e| e.event_id.to_string())
            .collect();
    let text = |body: &str| json!({ "msgtype": "m.text", "body": body });
    let (missed, missed_id) =
        joiner.build_pdu("10", &room, "bob", "m.room.message", None, text("missed"), &auth, &latest, 80);
    joiner.inbox.served_events.lock().unwrap().insert(missed_id.clone(), missed);

    // A state that names an event nobody can verify: refused, nothing stored.
    let forged_id = "$forgedforgedforgedforgedforgedforgedforg".to_owned();
    let mut with_forged = state_now.clone();
    with_forged.push(forged_id.clone());
    let (mut forged, _) =
        joiner.build_pdu("10", &room, "bob", "m.room.topic", Some(""), json!({ "topic": "x" }), &auth, &latest, 80);
    forged["content"]["topic"] = json!("changed after signing");
    joiner.inbox.served_events.lock().unwrap().insert(forged_id, forged);
    *joiner.inbox.state_ids_answer.lock().unwrap() = Some(json!({ "pdu_ids": with_forged, "auth_chain_ids": [] }));
    let (next, next_id) = joiner.build_pdu(
        "10",
        &room,
        "bob",
        "m.room.message",
        None,
        text("after the gap"),
        &auth,
        std::slice::from_ref(&missed_id),
        81,
    );
    let (_, result) = joiner.send_transaction(&s.gw.base, GW, vec![next.clone()]).await;
    assert!(result["pdus"][&next_id]["error"].is_string(), "{result}");
    assert!(!stored(&s.gw, &missed_id).await && !stored(&s.gw, &next_id).await);

    // The real state: the gap closes.
    *joiner.inbox.state_ids_answer.lock().unwrap() = Some(json!({ "pdu_ids": state_now, "auth_chain_ids": [] }));
    let (_, result) = joiner.send_transaction(&s.gw.base, GW, vec![next]).await;
    assert_eq!(result["pdus"][&next_id], json!({}), "{result}");
    assert!(stored(&s.gw, &missed_id).await, "the missed event is kept (as an outlier)");
    let bodies = s.alice.bodies(&room).await;
    assert!(bodies.contains(&"after the gap".to_owned()), "{bodies:?}");
    assert!(!bodies.contains(&"missed".to_owned()), "an outlier is not in the timeline: {bodies:?}");
    finish(s).await;
}
both_backends!(a_gap_is_closed_with_a_state_fetch);

/// JN-7: bob on B declines alice's invite to a room on A that B is not in: `make_leave` and
/// `send_leave` through A; A records the leave and bob's sync no longer shows the invite.
async fn an_invite_to_another_server_is_declined(db: DbKind) {
    use support::gateways::pair;
    let p = pair(db, |_| {}, |_| {}, &[]).await;
    let private = p.alice.create_room(json!({ "preset": "private_chat", "room_version": "10" })).await;
    let path = format!("/_matrix/client/v3/rooms/{}/invite", enc(&private));
    assert_eq!(p.alice.call(Method::POST, &path, Some(&json!({ "user_id": p.bob.user_id }))).await.0, 200);
    let invited = p.bob.sync(None, 0).await;
    assert!(invited["rooms"]["invite"].get(&private).is_some(), "{invited}");

    let leave = format!("/_matrix/client/v3/rooms/{}/leave", enc(&private));
    let (status, answer) = p.bob.call(Method::POST, &leave, Some(&json!({}))).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(membership(&p.a, &private, &p.bob.user_id).await.as_deref(), Some("leave"));
    let after = p.bob.sync(None, 0).await;
    assert!(after["rooms"]["invite"].get(&private).is_none(), "{after}");
    // Without an invite there is nobody to decline: a room B does not know.
    let (status, _) =
        p.bob.call(Method::POST, &leave.replace(&enc(&private), &enc("!nowhere:a.test")), Some(&json!({}))).await;
    assert_eq!(status, 404);
}
both_backends!(an_invite_to_another_server_is_declined);
