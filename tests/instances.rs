//! Several peekgate instances on one PostgreSQL database (design.md §6): an event stored or a
//! device peek changed through one instance wakes the other's sender and long-polling `/sync`
//! through PostgreSQL NOTIFY. (SQLite is single-instance by design.)

mod support;

use support::client::Client;
use support::gateways::open_registration;
use support::{wait_until, DbKind, ServerSpec};

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
