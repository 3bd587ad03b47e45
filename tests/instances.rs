//! Several peekgate instances on one PostgreSQL database (design.md §6): an event stored or a
//! device peek changed through one instance wakes the other's sender and long-polling `/sync`
//! through PostgreSQL NOTIFY. (SQLite is single-instance by design.)

mod support;

use std::sync::{Arc, Mutex};

use support::client::Client;
use support::gateways::open_registration;
use support::peer::{KeyMode, TestPeer};
use support::peer_room::PeerRoom;
use support::{wait_until, DbKind, ServerSpec, TestServer};

#[test]
fn instances_on_one_postgres_wake_each_other() {
    support::run_async(wake_each_other());
}

async fn wake_each_other() {
    let one = ServerSpec::new("gw.test", DbKind::Postgres).configure(open_registration).start().await;
    let (url, key) = (one.config.database.url.clone(), one.config.signing.key_path.clone());
    let two = ServerSpec::new("gw.test", DbKind::Postgres)
        .configure(open_registration)
        .configure(move |c| {
            c.database.url = url;
            c.signing.key_path = key;
        })
        .start()
        .await;
    let alice = Client::register(&one.base, "alice").await;
    let room = alice.create_world_readable_room("lobby", "11").await;
    let bob = Client::register(&two.base, "bob").await;
    let since = bob.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();
    assert_eq!(bob.peek(&room, &[]).await.0, 200);
    // The peek's first appearance, so that the long poll below waits for the new event.
    let since = bob.sync(Some(&since), 0).await["next_batch"].as_str().unwrap().to_owned();

    // A long poll on instance two, then an event through instance one.
    let waiting = {
        let since = since.clone();
        tokio::spawn(async move { bob.sync(Some(&since), 30_000).await })
    };
    let event_id = alice.say(&room, "through the other instance").await;
    let stored = one.state().rooms.event(&event_id).await.unwrap().unwrap().stream_pos;
    // Only a notification moves instance two's in-process stream position: nothing was
    // appended there.
    let mut stream = two.state().rooms.subscribe();
    wait_until("instance two hears of the event", || {
        let seen = *stream.borrow_and_update();
        async move { seen >= stored }
    })
    .await;
    let answer = waiting.await.unwrap();
    let timeline = &answer["rooms"]["peek"][&room]["timeline"]["events"];
    assert!(timeline.as_array().unwrap().iter().any(|e| e["event_id"] == event_id.as_str()), "{answer}");

    // Device-peek changes made through instance two reach instance one the same way.
    let before = *one.state().device_peeks.subscribe().borrow();
    let carol = Client::register(&two.base, "carol").await;
    carol.sync(None, 0).await;
    assert_eq!(carol.peek(&room, &[]).await.0, 200);
    let mut peeks = one.state().device_peeks.subscribe();
    wait_until("instance one hears of the peek", || {
        let seen = *peeks.borrow_and_update();
        async move { seen > before }
    })
    .await;
}

/// A second instance of the gateway that `first` is: same server name, database and key.
async fn second_instance(first: &TestServer, peer: &TestPeer) -> TestServer {
    let (url, key) = (first.config.database.url.clone(), first.config.signing.key_path.clone());
    ServerSpec::new(&first.server_name, DbKind::Postgres)
        .configure(open_registration)
        .configure(move |c| {
            c.database.url = url;
            c.signing.key_path = key;
        })
        .destination(&peer.name, &peer.url)
        .start()
        .await
}

/// OP-2 across instances: devices on two instances peeking the same remote room at the same
/// moment make one federation peek, not one per instance.
#[test]
fn instances_share_one_federation_peek() {
    support::run_async(share_one_federation_peek());
}

async fn share_one_federation_peek() {
    let peer = TestPeer::start("one.test", KeyMode::Good);
    let hosted = Arc::new(Mutex::new(PeerRoom::create(&peer, "host")));
    let room_id = hosted.lock().unwrap().room_id.clone();
    *peer.inbox.hosted.lock().unwrap() = Some(hosted);
    let one = ServerSpec::new("gw.test", DbKind::Postgres)
        .configure(open_registration)
        .destination(&peer.name, &peer.url)
        .start()
        .await;
    let two = second_instance(&one, &peer).await;
    let on_one = Client::register(&one.base, "bob").await;
    let on_two = Client::login(&two.base, "bob").await;
    on_one.sync(None, 0).await;
    on_two.sync(None, 0).await;
    let (first, second) = tokio::join!(on_one.peek(&room_id, &["one.test"]), on_two.peek(&room_id, &["one.test"]));
    assert_eq!(first.0, 200, "{}", first.1);
    assert_eq!(second.0, 200, "{}", second.1);
    let peek_ids = peer.inbox.put_peek_ids();
    assert_eq!(peek_ids.len(), 1, "one federation peek for both instances: {peek_ids:?}");
}
