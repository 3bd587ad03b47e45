//! Two gateways for federation tests: A hosts `#lobby:a.test` (world-readable, v10) with its
//! user alice, B has bob, and each can reach the other (and the given test peers).

use super::client::Client;
use super::peer::TestPeer;
use super::{DbKind, ServerSpec, TestServer};

pub const A: &str = "a.test";
pub const B: &str = "b.test";

pub fn open_registration(c: &mut peekgate::config::Config) {
    c.client.registration = "open".into();
}

/// B renews and cancels every second, so tests see renewals and TBD-1 quickly.
pub fn fast_schedule(c: &mut peekgate::config::Config) {
    c.schedule.renew_outbound = "* * * * * *".into();
}

/// Gateway A hosting `#lobby:a.test` (world-readable, v10) and gateway B whose users peek it.
pub struct Pair {
    pub a: TestServer,
    pub b: TestServer,
    pub alice: Client,
    pub bob: Client,
    pub room: String,
}

pub async fn pair(
    db: DbKind,
    configure_a: impl FnOnce(&mut peekgate::config::Config) + 'static,
    configure_b: impl FnOnce(&mut peekgate::config::Config) + 'static,
    peers: &[&TestPeer],
) -> Pair {
    let a = ServerSpec::new(A, db).configure(open_registration).configure(configure_a);
    let mut b = ServerSpec::new(B, db).configure(open_registration).configure(fast_schedule).configure(configure_b);
    let (a_url, b_url) = (a.url(), b.url());
    let mut a = a.destination(B, &b_url);
    for peer in peers {
        a = a.destination(&peer.name, &peer.url);
        b = b.destination(&peer.name, &peer.url);
    }
    let a = a.start().await;
    let b = b.destination(A, &a_url).start().await;
    for peer in peers {
        peer.trust(A, &a.base);
        peer.trust(B, &b.base);
    }
    let alice = Client::register(&a.base, "alice").await;
    let room = alice.create_world_readable_room("lobby", "10").await;
    let bob = Client::register(&b.base, "bob").await;
    Pair { a, b, alice, bob, room }
}
