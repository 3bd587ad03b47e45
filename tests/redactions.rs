//! H19: redactions are applied to what every path serves: `/messages` and `/sync` for clients,
//! `/event` and peek answers for other servers, and the sender's queue for peekers that were
//! behind. Before the fix the redaction was stored and the original content served everywhere.

mod support;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use reqwest::Method;
use serde_json::{json, Value};
use support::client::{enc, Client};
use support::peer::{KeyMode, TestPeer};
use support::peer_room::PeerRoom;
use support::{wait_until, DbKind, ServerSpec};

const GW: &str = "gw.test";

async fn redact(client: &Client, room: &str, event_id: &str, txn: &str) -> (u16, Value) {
    let path = format!("/_matrix/client/v3/rooms/{}/redact/{}/{txn}", enc(room), enc(event_id));
    client.call(Method::PUT, &path, Some(&json!({ "reason": "spam" }))).await
}

/// The federation `/event` answer for one event, as a server that is not in the room sees it.
async fn federation_event(peer: &TestPeer, base: &str, event_id: &str) -> Value {
    let (status, answer) =
        peer.call(base, GW, Method::GET, &format!("/_matrix/federation/v1/event/{}", enc(event_id)), None).await;
    assert_eq!(status, 200, "{answer}");
    answer["pdus"][0].clone()
}

async fn redactions_reach_every_reader(db: DbKind, version: &str) {
    let reader = TestPeer::start("reader.test", KeyMode::Good);
    let behind = TestPeer::start("behind.test", KeyMode::Good);
    let gw = ServerSpec::new(GW, db)
        .configure(|c| c.client.registration = "open".into())
        .destination(&reader.name, &reader.url)
        .destination(&behind.name, &behind.url)
        .start()
        .await;
    for peer in [&reader, &behind] {
        peer.trust(GW, &gw.base);
    }
    let alice = Client::register(&gw.base, "alice").await;
    let room = alice.create_world_readable_room("lobby", version).await;
    // A peeker whose transactions fail for a while (back-offs of about 0.5, 2 and 4 s): the
    // message and its redaction queue up meanwhile.
    let peek = format!("/_matrix/federation/v1/peek/{}/late?ver={version}", enc(&room));
    assert_eq!(behind.call(&gw.base, GW, Method::PUT, &peek, Some(&json!({}))).await.0, 200);
    behind.inbox.fail_remaining.store(3, Ordering::SeqCst);
    let warm_up = alice.say(&room, "warm-up").await;
    wait_until("the failing peeker was tried", || async { behind.inbox.attempts.load(Ordering::SeqCst) >= 1 }).await;

    let secret = alice.say(&room, "secret words").await;
    // Read once before the redaction, so that the answer after it comes through the cached path
    // of `/event` (#13): a cached copy must not outlive the redaction.
    assert_eq!(federation_event(&reader, &gw.base, &secret).await["content"]["body"], "secret words");
    let (status, topic) = alice.put_state(&room, "m.room.topic", "", json!({ "topic": "secret topic" })).await;
    assert_eq!(status, 200, "{topic}");
    let topic = topic["event_id"].as_str().unwrap().to_owned();
    for (target, txn) in [(&secret, "r1"), (&topic, "r2")] {
        let (status, answer) = redact(&alice, &room, target, txn).await;
        assert_eq!(status, 200, "{answer}");
    }

    // Federation `/event`: the redacted form (content emptied, still signed and hashed).
    let served = federation_event(&reader, &gw.base, &secret).await;
    assert_eq!(served["content"], json!({}), "{served}");
    assert_eq!(served["type"], "m.room.message");
    // Client `/messages`.
    let path = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=20", enc(&room));
    let (status, messages) = alice.call(Method::GET, &path, None).await;
    assert_eq!(status, 200, "{messages}");
    let chunk = messages["chunk"].as_array().unwrap();
    let original = chunk.iter().find(|e| e["event_id"] == secret.as_str()).expect("the message is listed");
    assert_eq!(original["content"], json!({}), "{original}");
    // `/sync` of a device peeking the room.
    let bob = Client::register(&gw.base, "bob").await;
    assert_eq!(bob.peek(&room, &[]).await.0, 200);
    let synced = bob.sync(None, 0).await;
    let text = synced.to_string();
    assert!(!text.contains("secret words") && !text.contains("secret topic"), "{synced}");
    // A new peek's answer: the topic in its state is redacted.
    let peek = format!("/_matrix/federation/v1/peek/{}/fresh?ver={version}", enc(&room));
    let (status, answer) = reader.call(&gw.base, GW, Method::PUT, &peek, Some(&json!({}))).await;
    assert_eq!(status, 200, "{answer}");
    let state_topic = answer["state"].as_array().unwrap().iter().find(|e| e["type"] == "m.room.topic").unwrap();
    assert_eq!(state_topic["content"], json!({}), "{state_topic}");
    // The peeker that was behind gets the message redacted (the queue reads the stored form),
    // then the redactions themselves.
    wait_until("the failing peeker catches up", || async { behind.inbox.event_ids(version).contains(&topic) }).await;
    assert!(behind.inbox.event_ids(version).contains(&warm_up));
    let delivered = behind.inbox.pdus().into_iter().map(|pdu| pdu.to_string()).collect::<Vec<_>>().join("\n");
    assert!(!delivered.contains("secret words"), "{delivered}");
    assert!(behind.inbox.problems.lock().unwrap().is_empty(), "{:?}", behind.inbox.problems.lock().unwrap());
    gw.stop().await;
    reader.stop().await;
    behind.stop().await;
}

/// v10 names the redacted event at the top level of the redaction, v11 in its content.
async fn h19_redactions_reach_every_reader(db: DbKind) {
    redactions_reach_every_reader(db, "10").await;
    redactions_reach_every_reader(db, "11").await;
}
both_backends!(h19_redactions_reach_every_reader);

/// A redaction naming an event we do not hold is stored and changes nothing else; a redaction
/// path with something that is not an event ID is a 400 `M_INVALID_PARAM`.
async fn h19_a_redaction_of_an_unknown_event_changes_nothing(db: DbKind) {
    let reader = TestPeer::start("reader.test", KeyMode::Good);
    let gw = ServerSpec::new(GW, db)
        .configure(|c| c.client.registration = "open".into())
        .destination(&reader.name, &reader.url)
        .start()
        .await;
    reader.trust(GW, &gw.base);
    let alice = Client::register(&gw.base, "alice").await;
    let room = alice.create_world_readable_room("lobby", "11").await;
    let kept = alice.say(&room, "kept words").await;
    let (status, answer) = redact(&alice, &room, "$unknown-event-id", "r1").await;
    assert_eq!(status, 200, "a redaction of an event we do not hold is stored: {answer}");
    let served = federation_event(&reader, &gw.base, &kept).await;
    assert_eq!(served["content"]["body"], "kept words", "{served}");
    let (status, answer) = redact(&alice, &room, "not an event id", "r2").await;
    assert_eq!((status, answer["errcode"].as_str()), (400, Some("M_INVALID_PARAM")), "{answer}");
    gw.stop().await;
    reader.stop().await;
}
both_backends!(h19_a_redaction_of_an_unknown_event_changes_nothing);

/// An event stored after its redaction is stored redacted: the redaction names an event on
/// another branch of the room's graph, so it arrives (and is accepted) first. Before, the
/// redaction was kept but the event it names was stored and served whole when it came.
async fn h19_an_event_arriving_after_its_redaction_is_stored_redacted(db: DbKind) {
    let host = TestPeer::start("one.test", KeyMode::Good);
    let hosted = Arc::new(Mutex::new(PeerRoom::create(&host, "host")));
    let room_id = hosted.lock().unwrap().room_id.clone();
    *host.inbox.hosted.lock().unwrap() = Some(hosted.clone());
    let gw = ServerSpec::new(GW, db)
        .configure(|c| c.client.registration = "open".into())
        .destination(&host.name, &host.url)
        .start()
        .await;
    host.trust(GW, &gw.base);
    let bob = Client::register(&gw.base, "bob").await;
    assert_eq!(bob.peek(&room_id, &[]).await.0, 200);
    // Two events on the newest one: a message, and (on a branch of its own) its redaction.
    let (message, redaction, message_id, redaction_id) = {
        let mut room = hosted.lock().unwrap();
        let newest = vec![room.events.last().unwrap().0.clone()];
        let content = json!({ "msgtype": "m.text", "body": "forked words" });
        let (message, message_id) = room.fork(&host, "host", ("m.room.message", content), &newest, &[]);
        let redacts = [("redacts", Value::from(message_id.clone()))];
        let (redaction, redaction_id) =
            room.fork(&host, "host", ("m.room.redaction", json!({ "reason": "spam" })), &newest, &redacts);
        (message, redaction, message_id, redaction_id)
    };
    let stored = |id: String| {
        let gw = &gw;
        async move { gw.state().rooms.event(&id).await.unwrap() }
    };
    let (status, answer) = host.send_transaction(&gw.base, GW, vec![redaction]).await;
    assert_eq!((status, &answer["pdus"][&redaction_id]), (200, &json!({})), "{answer}");
    assert!(stored(redaction_id.clone()).await.is_some());
    assert!(stored(message_id.clone()).await.is_none(), "the message has not arrived yet");
    let (status, answer) = host.send_transaction(&gw.base, GW, vec![message]).await;
    assert_eq!((status, &answer["pdus"][&message_id]), (200, &json!({})), "{answer}");
    let message = stored(message_id.clone()).await.expect("the message is stored");
    assert_eq!(message.pdu.content_value(), json!({}), "stored redacted");
    let synced = bob.sync(None, 0).await.to_string();
    assert!(!synced.contains("forked words"), "{synced}");
    gw.stop().await;
    host.stop().await;
}
both_backends!(h19_an_event_arriving_after_its_redaction_is_stored_redacted);
