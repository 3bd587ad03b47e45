//! Interop with real Synapse (JN-13), over TLS on loopback: Synapse is installed from PyPI in a
//! virtualenv by the test support (see `support::synapse`) and never skipped. peekgate runs on
//! SQLite with server name `localhost:<TLS port>`, so Synapse reaches it without SRV or
//! `.well-known`; peekgate reaches Synapse through a `federation.destinations` override.

mod support;

use std::time::{Duration, Instant};

use peekgate::federation::client::{FedRequest, FederationError};
use reqwest::Method;
use ruma::ServerName;
use serde_json::{json, Value};
use support::client::{enc, Client};
use support::synapse::Synapse;
use support::{run_async, wait_until, DbKind, TestServer};

fn server_name(name: &str) -> &ServerName {
    <&ServerName>::try_from(name).unwrap()
}

/// Synapse's published `(key_id, public key)`, fetched by peekgate's federation client.
async fn synapse_key(gateway: &TestServer, synapse: &Synapse) -> (String, String) {
    let keys =
        gateway.state().federation.get_unsigned(server_name(&synapse.server_name), "/_matrix/key/v2/server").await;
    let keys = keys.unwrap_or_else(|e| panic!("Synapse's keys over TLS: {e}\n{}", synapse.log_tail()));
    assert_eq!(keys["server_name"], synapse.server_name.as_str());
    let (key_id, key) = keys["verify_keys"].as_object().unwrap().iter().next().unwrap();
    (key_id.clone(), key["key"].as_str().unwrap().to_owned())
}

fn directory_path(alias: &str) -> String {
    format!("/_matrix/federation/v1/query/directory?room_alias={}", enc(alias))
}

/// a. Synapse starts, registers a user, and hosts a public world-readable room with an alias.
#[test]
fn synapse_hosts_a_world_readable_room() {
    run_async(async {
        let synapse = Synapse::start().await;
        let (alice, token) = synapse.register("alice").await;
        assert_eq!(alice, format!("@alice:{}", synapse.server_name));
        let room = synapse.create_world_readable_room(&token, "lobby", "10").await;
        assert!(room.starts_with('!'), "{room}");

        let alias = format!("#lobby:{}", synapse.server_name);
        let (status, answer) = synapse.resolve_alias(&token, &alias).await;
        assert_eq!((status, answer["room_id"].as_str()), (200, Some(room.as_str())), "{answer}");
        let path = format!("/_matrix/client/v3/rooms/{}/state/m.room.history_visibility/", enc(&room));
        let (status, answer) = synapse.call(Some(&token), Method::GET, &path, None).await;
        assert_eq!((status, &answer["history_visibility"]), (200, &json!("world_readable")), "{answer}");
        let path = format!("/_matrix/client/v3/rooms/{}/state/m.room.create/", enc(&room));
        let (status, answer) = synapse.call(Some(&token), Method::GET, &path, None).await;
        assert_eq!((status, &answer["room_version"]), (200, &json!("10")), "{answer}");

        synapse.send_message(&token, &room, "hello from synapse").await;
        assert_eq!(synapse.timeline_bodies(&token, &room).await, vec!["hello from synapse"]);
    });
}

/// b. Keys and X-Matrix both ways over TLS: peekgate's signed directory query is accepted by
/// Synapse (which fetched peekgate's key from its TLS listener), and Synapse's directory query
/// for a peekgate alias is accepted by peekgate (which fetched Synapse's key).
#[test]
fn federation_requests_are_authenticated_both_ways() {
    run_async(async {
        let synapse = Synapse::start().await;
        let (_, syn_token) = synapse.register("alice").await;
        let syn_room = synapse.create_world_readable_room(&syn_token, "lobby", "10").await;
        let certs = tempfile::tempdir().unwrap();
        let gateway = synapse.gateway_spec(DbKind::Sqlite, certs.path()).start().await;
        let syn = server_name(&synapse.server_name);

        // peekgate -> Synapse, signed: Synapse answers with the room.
        let syn_alias = format!("#lobby:{}", synapse.server_name);
        let answer = gateway.state().federation.get(syn, &directory_path(&syn_alias)).await;
        let answer =
            answer.unwrap_or_else(|e| panic!("signed query/directory to Synapse: {e}\n{}", synapse.log_tail()));
        assert_eq!(answer["room_id"].as_str(), Some(syn_room.as_str()), "{answer}");
        assert!(answer["servers"].as_array().unwrap().contains(&json!(synapse.server_name)), "{answer}");
        // An unknown alias: Synapse's own 404, after authenticating us.
        let missing =
            gateway.state().federation.get(syn, &directory_path(&format!("#nothing:{}", synapse.server_name))).await;
        assert!(
            matches!(&missing, Err(FederationError::Status { status: 404, errcode, .. }) if errcode == "M_NOT_FOUND"),
            "{missing:?}"
        );
        // The same query unsigned is refused: the signature is what Synapse accepted above.
        let unsigned = FedRequest {
            method: Method::GET,
            destination: syn,
            path: &directory_path(&syn_alias),
            body: None,
            signed: false,
        };
        let refused = gateway.state().federation.send(unsigned).await;
        assert!(
            matches!(&refused, Err(FederationError::Status { status: 401, errcode, .. }) if errcode == "M_UNAUTHORIZED"),
            "{refused:?}"
        );

        // Synapse -> peekgate, signed: a Synapse user resolves an alias of a peekgate room.
        let bob = Client::register(&gateway.base, "bob").await;
        let pg_room = bob.create_world_readable_room("hall", "10").await;
        let pg_alias = format!("#hall:{}", gateway.server_name);
        let (status, answer) = synapse.resolve_alias(&syn_token, &pg_alias).await;
        assert_eq!(status, 200, "Synapse resolving {pg_alias}: {answer}\n{}", synapse.log_tail());
        assert_eq!(answer["room_id"].as_str(), Some(pg_room.as_str()), "{answer}");
        assert!(answer["servers"].as_array().unwrap().contains(&json!(gateway.server_name)), "{answer}");
        // An alias peekgate does not know: peekgate's 404 reaches Synapse's user as 404.
        let (status, answer) = synapse.resolve_alias(&syn_token, &format!("#nothing:{}", gateway.server_name)).await;
        assert_eq!((status, answer["errcode"].as_str()), (404, Some("M_NOT_FOUND")), "{answer}");

        // peekgate authenticated Synapse with the key Synapse publishes, and refused nothing.
        let (key_id, public) = synapse_key(&gateway, &synapse).await;
        let cached = gateway.state().keys.cached(syn, &key_id).await.unwrap();
        let cached = cached.expect("peekgate cached Synapse's key while verifying its request");
        assert_eq!(peekgate::keys::encode_base64(&cached.public_key), public);
        for reason in [
            "missing_header",
            "malformed_header",
            "wrong_destination",
            "unknown_algorithm",
            "key_unavailable",
            "bad_signature",
        ] {
            let series = format!("peekgate_xmatrix_auth_failures_total{{reason=\"{reason}\"}}");
            assert_eq!(gateway.metric(&series).await, 0.0, "{series}");
        }
        gateway.stop().await;
    });
}

/// c. Synapse implements no MSC2444: a peekgate device peeking a Synapse room gets a clear
/// Matrix error in bounded time, and no peek is left behind.
#[test]
fn peeking_a_synapse_room_fails_clearly() {
    run_async(async {
        let synapse = Synapse::start().await;
        let (_, syn_token) = synapse.register("alice").await;
        let syn_room = synapse.create_world_readable_room(&syn_token, "lobby", "10").await;
        let certs = tempfile::tempdir().unwrap();
        let gateway = synapse.gateway_spec(DbKind::Sqlite, certs.path()).start().await;
        let bob = Client::register(&gateway.base, "bob").await;
        bob.sync(None, 0).await;

        let syn_alias = format!("#lobby:{}", synapse.server_name);
        let by_room_id = (syn_room.as_str(), vec![synapse.server_name.as_str()]);
        for (target, servers) in [(syn_alias.as_str(), vec![]), by_room_id] {
            let started = Instant::now();
            let (status, answer) = bob.peek(target, &servers).await;
            let took = started.elapsed();
            eprintln!("peek {target} via Synapse: {status} {answer} after {:.1} s", took.as_secs_f64());
            assert!(took < Duration::from_secs(30), "peek {target} took {took:?}");
            assert_eq!((status, answer["errcode"].as_str()), (404, Some("M_NOT_FOUND")), "{target}: {answer}");
            assert!(answer["error"].as_str().is_some_and(|e| !e.is_empty()), "{answer}");
        }
        // Synapse was really asked: it logged the unknown peek endpoint twice.
        let puts = synapse.log().matches("PUT /_matrix/federation/v1/peek/").count();
        assert!(puts >= 2, "Synapse saw {puts} peek PUTs\n{}", synapse.log_tail());
        // Nothing is left: no outbound peek, no device peek in /sync.
        assert_eq!(gateway.metric("peekgate_outbound_peeks").await, 0.0);
        assert_eq!(gateway.metric("peekgate_device_peeks").await, 0.0);
        let sync: Value = bob.sync(None, 0).await;
        assert!(sync["rooms"]["peek"].as_object().is_none_or(|p| p.is_empty()), "{sync}");
        gateway.stop().await;
    });
}

/// JN-13 with JN-1, JN-2, JN-4, JN-10: a Synapse user joins a peekgate room by its alias
/// (Synapse's `make_join`/`send_join` against peekgate, and its checks of peekgate's answer),
/// both sides exchange messages over signed `/send`s, and the Synapse user leaves through
/// `make_leave`/`send_leave`.
async fn a_synapse_user_joins_a_peekgate_room_talks_and_leaves(db: DbKind) {
    let synapse = Synapse::start().await;
    let (carol, carol_token) = synapse.register("carol").await;
    let certs = tempfile::tempdir().unwrap();
    let gateway = synapse.gateway_spec(db, certs.path()).start().await;
    let alice = Client::register(&gateway.base, "alice").await;
    let room =
        alice.create_room(json!({ "preset": "public_chat", "room_alias_name": "square", "room_version": "10" })).await;
    alice.say(&room, "before carol").await;
    let membership = |user: String| {
        let (state, room) = (gateway.state(), ruma::RoomId::parse(&room).unwrap());
        async move { state.rooms.membership(&room, &ruma::UserId::parse(&user).unwrap()).await.unwrap() }
    };

    let alias = format!("#square:{}", gateway.server_name);
    let (status, answer) = synapse.join(&carol_token, &alias, &[]).await;
    assert_eq!(status, 200, "Synapse joining {alias}: {answer}\n{}", synapse.log_tail());
    assert_eq!(answer["room_id"].as_str(), Some(room.as_str()), "{answer}");
    assert_eq!(membership(carol.clone()).await.as_deref(), Some("join"));

    alice.say(&room, "hello carol").await;
    wait_until("Synapse shows peekgate's message", || async {
        synapse.timeline_bodies(&carol_token, &room).await.contains(&"hello carol".to_owned())
    })
    .await;
    synapse.send_message(&carol_token, &room, "hello alice").await;
    wait_until("peekgate stores Synapse's message", || async {
        alice.bodies(&room).await.contains(&"hello alice".to_owned())
    })
    .await;
    assert_eq!(alice.bodies(&room).await, ["before carol", "hello carol", "hello alice"], "one copy each, in order");

    let (status, answer) = synapse.leave(&carol_token, &room).await;
    assert_eq!(status, 200, "Synapse leaving: {answer}\n{}", synapse.log_tail());
    wait_until("peekgate stores the leave", || async { membership(carol.clone()).await.as_deref() == Some("leave") })
        .await;
    let joined = gateway.state().rooms.joined_servers(&ruma::RoomId::parse(&room).unwrap()).await.unwrap();
    assert!(!joined.contains(&synapse.server_name), "{joined:?}");
    // Nothing Synapse sent was refused.
    assert_eq!(gateway.metric("peekgate_federation_received_pdus_total{result=\"rejected\"}").await, 0.0);
    gateway.stop().await;
}
both_backends!(a_synapse_user_joins_a_peekgate_room_talks_and_leaves);

/// A peekgate user joins a Synapse room by alias; the join must name the room.
async fn join_synapse_room(synapse: &Synapse, user: &Client, alias: &str, room: &str) {
    let (status, answer) = user.join(alias).await;
    assert_eq!(status, 200, "joining {alias}: {answer}\n{}", synapse.log_tail());
    assert_eq!(answer["room_id"].as_str(), Some(room), "{answer}");
}

/// A message from the Synapse user to the peekgate user and one back, each waited for on the
/// other side.
async fn messages_both_ways(synapse: &Synapse, token: &str, user: &Client, room: &str, tag: &str) {
    let (to_peekgate, to_synapse) = (format!("{tag} hello alice"), format!("{tag} hello carol"));
    synapse.send_message(token, room, &to_peekgate).await;
    wait_until("peekgate stores Synapse's message", || async { user.bodies(room).await.contains(&to_peekgate) }).await;
    user.say(room, &to_synapse).await;
    wait_until("Synapse shows peekgate's message", || async {
        synapse.timeline_bodies(token, room).await.contains(&to_synapse)
    })
    .await;
}

/// JN-13 with JN-6, JN-7, JN-8, JN-10: a peekgate user joins a Synapse room by its alias
/// (peekgate's `make_join`/`send_join` against Synapse, and peekgate's validation of Synapse's
/// answer), messages go both ways, and the peekgate user leaves (peekgate's own leave event,
/// sent to Synapse).
async fn a_peekgate_user_joins_a_synapse_room_talks_and_leaves(db: DbKind) {
    let synapse = Synapse::start().await;
    let (_, carol_token) = synapse.register("carol").await;
    let room = synapse
        .create_room(&carol_token, json!({ "preset": "public_chat", "room_alias_name": "plaza", "room_version": "10" }))
        .await;
    synapse.send_message(&carol_token, &room, "before alice").await;
    let certs = tempfile::tempdir().unwrap();
    let gateway = synapse.gateway_spec(db, certs.path()).start().await;
    let alice = Client::register(&gateway.base, "alice").await;

    join_synapse_room(&synapse, &alice, &format!("#plaza:{}", synapse.server_name), &room).await;
    let room_id = ruma::RoomId::parse(&room).unwrap();
    let member = |user: &str| {
        let (rooms, room_id, user) =
            (gateway.state().rooms.clone(), room_id.clone(), ruma::UserId::parse(user).unwrap());
        async move { rooms.membership(&room_id, &user).await.unwrap() }
    };
    assert_eq!(member(&alice.user_id).await.as_deref(), Some("join"));

    messages_both_ways(&synapse, &carol_token, &alice, &room, "v10").await;
    assert_eq!(
        synapse.timeline_bodies(&carol_token, &room).await,
        ["before alice", "v10 hello alice", "v10 hello carol"]
    );

    let path = format!("/_matrix/client/v3/rooms/{}/leave", enc(&room));
    let (status, answer) = alice.call(Method::POST, &path, Some(&json!({}))).await;
    assert_eq!(status, 200, "{answer}");
    let members_path = format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(&room), enc(&alice.user_id));
    wait_until("Synapse stores alice's leave", || async {
        let (status, answer) = synapse.call(Some(&carol_token), Method::GET, &members_path, None).await;
        status == 200 && answer["membership"] == "leave"
    })
    .await;
    assert_eq!(gateway.metric("peekgate_federation_received_pdus_total{result=\"rejected\"}").await, 0.0);
    gateway.stop().await;
}
both_backends!(a_peekgate_user_joins_a_synapse_room_talks_and_leaves);

/// JN-13 with JN-5 and JN-7: invites both ways. A Synapse user invites a peekgate user to a
/// private Synapse room (peekgate signs the invite, the user's sync shows it, they join); a
/// peekgate user invites a Synapse user to a private peekgate room (Synapse signs it, its user
/// sees the invite and joins through peekgate).
async fn invites_both_ways_with_synapse(db: DbKind) {
    let synapse = Synapse::start().await;
    let (carol, carol_token) = synapse.register("carol").await;
    let certs = tempfile::tempdir().unwrap();
    let gateway = synapse.gateway_spec(db, certs.path()).start().await;
    let alice = Client::register(&gateway.base, "alice").await;
    let since = alice.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();

    // Synapse -> peekgate.
    let syn_room = synapse
        .create_room(&carol_token, json!({ "preset": "private_chat", "room_version": "10", "name": "den" }))
        .await;
    let (status, answer) = synapse.invite(&carol_token, &syn_room, &alice.user_id).await;
    assert_eq!(status, 200, "Synapse inviting {}: {answer}\n{}", alice.user_id, synapse.log_tail());
    let invited = alice.sync(Some(&since), 5_000).await;
    let state = invited["rooms"]["invite"][&syn_room]["invite_state"]["events"].as_array().cloned().unwrap_or_default();
    assert!(state.iter().any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "den"), "{invited}");
    let (status, answer) = alice.join(&syn_room).await;
    assert_eq!(status, 200, "joining the Synapse room after the invite: {answer}\n{}", synapse.log_tail());
    let path = format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(&syn_room), enc(&alice.user_id));
    let (status, answer) = synapse.call(Some(&carol_token), Method::GET, &path, None).await;
    assert_eq!((status, answer["membership"].as_str()), (200, Some("join")), "{answer}");

    // peekgate -> Synapse.
    let pg_room = alice.create_room(json!({ "preset": "private_chat", "room_version": "10", "name": "attic" })).await;
    let path = format!("/_matrix/client/v3/rooms/{}/invite", enc(&pg_room));
    let (status, answer) = alice.call(Method::POST, &path, Some(&json!({ "user_id": carol }))).await;
    assert_eq!(status, 200, "inviting {carol}: {answer}\n{}", synapse.log_tail());
    wait_until("Synapse shows the invite", || async {
        let (_, sync) = synapse.call(Some(&carol_token), Method::GET, "/_matrix/client/v3/sync?timeout=0", None).await;
        sync["rooms"]["invite"].get(&pg_room).is_some()
    })
    .await;
    let (status, answer) = synapse.join(&carol_token, &pg_room, &[&gateway.server_name]).await;
    assert_eq!(status, 200, "Synapse joining after the invite: {answer}\n{}", synapse.log_tail());
    let room_id = ruma::RoomId::parse(&pg_room).unwrap();
    let carol_id = ruma::UserId::parse(&carol).unwrap();
    assert_eq!(gateway.state().rooms.membership(&room_id, &carol_id).await.unwrap().as_deref(), Some("join"));
    gateway.stop().await;
}
both_backends!(invites_both_ways_with_synapse);

/// JN-13 with JN-12: a room version 12 room on Synapse joined from peekgate by alias, messages
/// both ways; and a Synapse user joins a peekgate v12 room.
async fn room_version_12_with_synapse(db: DbKind) {
    let synapse = Synapse::start().await;
    let (_, carol_token) = synapse.register("carol").await;
    let syn_room = synapse
        .create_room(
            &carol_token,
            json!({ "preset": "public_chat", "room_alias_name": "twelve", "room_version": "12" }),
        )
        .await;
    let certs = tempfile::tempdir().unwrap();
    let gateway = synapse.gateway_spec(db, certs.path()).start().await;
    let alice = Client::register(&gateway.base, "alice").await;

    join_synapse_room(&synapse, &alice, &format!("#twelve:{}", synapse.server_name), &syn_room).await;
    messages_both_ways(&synapse, &carol_token, &alice, &syn_room, "v12").await;

    let pg_room =
        alice.create_room(json!({ "preset": "public_chat", "room_alias_name": "ours12", "room_version": "12" })).await;
    let pg_alias = format!("#ours12:{}", gateway.server_name);
    let (status, answer) = synapse.join(&carol_token, &pg_alias, &[]).await;
    assert_eq!(status, 200, "Synapse joining the peekgate v12 room: {answer}\n{}", synapse.log_tail());
    alice.say(&pg_room, "v12 welcome").await;
    wait_until("Synapse shows the message in peekgate's v12 room", || async {
        synapse.timeline_bodies(&carol_token, &pg_room).await.contains(&"v12 welcome".to_owned())
    })
    .await;
    assert_eq!(gateway.metric("peekgate_federation_received_pdus_total{result=\"rejected\"}").await, 0.0);
    gateway.stop().await;
}
both_backends!(room_version_12_with_synapse);
