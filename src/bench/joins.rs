//! `peekgate bench joins` (PostgreSQL; issue #12): joining a 1,000-member room hosted by
//! another peekgate, and serving `send_join` for such a room. Gateways run in-process on real
//! 127.0.0.1 sockets, each with `federation.destinations` naming the others (signed HTTP, keys
//! fetched over HTTP), each on a scratch database dropped afterwards.
//!
//! Gateway A (`host.bench`) hosts public rooms; their members are local users created on A
//! whose joins are appended through the room service (set-up, timed but not a figure).
//!
//! (1) A user of another gateway joins through `membership::outbound::join_room`: make_join,
//!     our copy signed, send_join, the answer validated and stored. A gateway that already has
//!     a member in the room makes a second join a local append, so every run uses a fresh
//!     gateway `b<i>.bench` (fresh database) with its own user; its start and the key fetches
//!     between it and A happen before the clock starts. Each run joins a room of its own with
//!     the same members: in a shared room, run i's answer would hold the joins of the gateways
//!     before it, whose keys run i must fetch from them (and they are stopped by then).
//! (2) A serves `send_join` for a fresh user of gateway `b.bench` (make_join and signing before
//!     the clock): (2a) `membership::inbound::send` called in-process on A, and (2b) the signed
//!     `PUT /_matrix/federation/v2/send_join` from `b.bench`'s federation client to A over HTTP.
//!     Both go to one more room, which grows by two members per run.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use ruma::{OwnedRoomId, RoomId, ServerName, UserId};
use serde_json::{json, Value};

use super::{analyze, encode, percentile, start, BenchServer};
use peekgate::db::Backend;
use peekgate::events::RoomVersion;
use peekgate::federation::client::FedRequest;
use peekgate::membership::{inbound, outbound, Membership};
use peekgate::state::AppState;

const HOST: &str = "host.bench";
/// The gateway whose users' joins A serves in figure (2).
const SIGNER: &str = "b.bench";

pub async fn joins(postgres_admin: &str, members: usize, runs: usize) -> anyhow::Result<()> {
    println!("peekgate bench joins (release build: {}), PostgreSQL", !cfg!(debug_assertions));
    ensure!(runs > 0, "--runs must be at least 1");
    let a_listener = TcpListener::bind("127.0.0.1:0")?;
    let a_url = format!("http://{}", a_listener.local_addr()?);
    let signer_listener = TcpListener::bind("127.0.0.1:0")?;
    let mut routes = vec![(SIGNER.to_owned(), format!("http://{}", signer_listener.local_addr()?))];
    let mut joiner_listeners = Vec::new();
    for i in 0..runs {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        routes.push((joiner_name(i), format!("http://{}", listener.local_addr()?)));
        joiner_listeners.push(listener);
    }
    let to_a = [(HOST.to_owned(), a_url)];
    let a = start(HOST, Backend::Postgres, postgres_admin, &routes, a_listener).await?;
    let a_state = a.running.state.clone();

    // Set-up (not a figure): the members' accounts, then the rooms and their joins.
    let t = Instant::now();
    let mut accounts = tokio::task::JoinSet::new();
    for i in 0..members {
        let (a_state, user) = (a_state.clone(), UserId::parse(format!("@m{i}:{HOST}"))?);
        accounts.spawn(async move { a_state.accounts.create_user(&user, "bench-password", false).await });
    }
    while let Some(created) = accounts.join_next().await {
        created??;
    }
    let accounts_took = t.elapsed();
    let t = Instant::now();
    let mut rooms = Vec::new();
    for _ in 0..=runs {
        rooms.push(hosted_room(&a_state, members).await?);
    }
    let rooms_took = t.elapsed();
    analyze(&a_state).await?;
    let joined = joined_members(&a_state, &rooms[0]).await?;
    println!(
        "set-up on A (not measured): {members} accounts created in {:.1?} (argon2, 2 at a time); \
         {} public rooms, each created by @alice:{HOST} and joined by the {members} users through the room service, \
         in {:.1?} ({:.0} joins/s); each room has {joined} joined members",
        accounts_took,
        runs + 1,
        rooms_took,
        ((runs + 1) * members) as f64 / rooms_took.as_secs_f64()
    );
    let room_of_2 = rooms.pop().context("a room for (2)")?;

    // (1) Client-path joins from fresh gateways.
    println!("\n(1) join_room on a fresh gateway b<i>.bench (make_join + sign + send_join + validate + store)");
    println!("| run | joining user | members before | gateway start | key fetches (both ways) | join_room |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let mut join_times = Vec::new();
    for (i, (listener, room)) in joiner_listeners.into_iter().zip(rooms).enumerate() {
        let before = joined_members(&a_state, &room).await?;
        let t = Instant::now();
        let b = start(&joiner_name(i), Backend::Postgres, postgres_admin, &to_a, listener).await?;
        let started_in = t.elapsed();
        let b_state = b.running.state.clone();
        let user = UserId::parse(format!("@joiner{i}:{}", joiner_name(i)))?;
        b_state.accounts.create_user(&user, "bench-password", false).await?;
        let keys_in = fetch_keys_both_ways(&a_state, &b_state).await?;
        let t = Instant::now();
        outbound::join_room(&b_state.outbound, &user, &room, &[HOST.to_owned()]).await?;
        let took = t.elapsed();
        ensure!(b_state.rooms.membership(&room, &user).await?.as_deref() == Some("join"), "B does not see the join");
        ensure!(a_state.rooms.membership(&room, &user).await?.as_deref() == Some("join"), "A does not see the join");
        println!("| {i} | {user} | {before} | {} | {} | **{}** |", ms(started_in), ms(keys_in), ms(took));
        join_times.push(took);
        stop(b).await;
    }

    // (2) A serving send_join to users of one gateway, b.bench.
    let signer = start(SIGNER, Backend::Postgres, postgres_admin, &to_a, signer_listener).await?;
    let s_state = signer.running.state.clone();
    fetch_keys_both_ways(&a_state, &s_state).await?;
    analyze(&a_state).await?;
    println!("\n(2) send_join served by A for a fresh user of {SIGNER} (make_join and signing not timed)");
    println!(
        "| run | members before | (2a) inbound::send in-process | (2a) answer to JSON bytes | (2b) signed HTTP PUT send_join, round trip |"
    );
    println!("| --- | --- | --- | --- | --- |");
    let (mut served, mut serialised, mut round_trips) = (Vec::new(), Vec::new(), Vec::new());
    let mut sizes = Vec::new();
    let room = room_of_2;
    for i in 0..runs {
        let before = joined_members(&a_state, &room).await?;
        // (2a)
        let user = UserId::parse(format!("@direct{i}:{SIGNER}"))?;
        let (version, template) = template_in_process(&a_state, &room, &user).await?;
        let join = s_state.rooms.complete_template(&template, version)?;
        let signer_name = <&ServerName>::try_from(SIGNER)?;
        let t = Instant::now();
        let answer = inbound::send(
            &a_state.rooms,
            &a_state.keys,
            signer_name,
            &room,
            join.event_id.as_str(),
            join.federation_json(),
            Membership::Join,
        )
        .await?;
        let direct = t.elapsed();
        let t = Instant::now();
        let bytes = serde_json::to_vec(&answer)?;
        let to_bytes = t.elapsed();
        sizes.push(answer_size(&answer, bytes.len()));
        // (2b)
        let user = UserId::parse(format!("@http{i}:{SIGNER}"))?;
        let (version, template) = template_over_http(&s_state, &room, &user).await?;
        let join = s_state.rooms.complete_template(&template, version)?;
        let path =
            format!("/_matrix/federation/v2/send_join/{}/{}", encode(room.as_str()), encode(join.event_id.as_str()));
        let request = FedRequest {
            method: reqwest::Method::PUT,
            destination: <&ServerName>::try_from(HOST)?,
            path: &path,
            body: Some(join.federation_json()),
            signed: true,
        };
        let t = Instant::now();
        let answer = s_state.federation.send(request).await?;
        let round_trip = t.elapsed();
        ensure!(answer.get("state").and_then(Value::as_array).is_some(), "send_join over HTTP: no state in the answer");
        sizes.push(answer_size(&answer, serde_json::to_vec(&answer)?.len()));
        println!("| {i} | {before} | **{}** | {} | **{}** |", ms(direct), ms(to_bytes), ms(round_trip));
        served.push(direct);
        serialised.push(to_bytes);
        round_trips.push(round_trip);
    }
    let after = joined_members(&a_state, &room).await?;

    println!("\nsend_join answers (state events / auth chain events / compact JSON bytes):");
    let (first, last) = (&sizes[0], &sizes[sizes.len() - 1]);
    println!("  first answer of (2): {first}");
    println!("  last answer of (2):  {last} (the room then had {after} joined members)");

    println!("\n| figure ({runs} runs) | p50 | p90 | max |");
    println!("| --- | --- | --- | --- |");
    summary("(1) join_room, end to end on the joining gateway", &mut join_times);
    summary("(2a) A: inbound::send (intake, append, answer built)", &mut served);
    summary("(2a) A: the answer to JSON bytes", &mut serialised);
    summary("(2b) signed PUT send_join over HTTP, round trip", &mut round_trips);

    stop(signer).await;
    stop(a).await;
    Ok(())
}

fn joiner_name(i: usize) -> String {
    format!("b{i}.bench")
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn summary(label: &str, times: &mut [Duration]) {
    times.sort();
    println!(
        "| {label} | {} | {} | {} |",
        ms(percentile(times, 0.5)),
        ms(percentile(times, 0.9)),
        ms(times[times.len() - 1])
    );
}

fn answer_size(answer: &Value, bytes: usize) -> String {
    let count = |key: &str| answer.get(key).and_then(Value::as_array).map_or(0, Vec::len);
    format!("{} state events, {} auth chain events, {bytes} bytes", count("state"), count("auth_chain"))
}

/// A public room of A created by alice and joined by the users `@m0`..`@m{members - 1}`.
async fn hosted_room(a: &AppState, members: usize) -> anyhow::Result<OwnedRoomId> {
    let alice = UserId::parse(format!("@alice:{HOST}"))?;
    let request = peekgate::rooms::CreateRoomRequest { preset: Some("public_chat".into()), ..Default::default() };
    let room = a.rooms.create_room(&alice, request).await?;
    for i in 0..members {
        let user = UserId::parse(format!("@m{i}:{HOST}"))?;
        let content = json!({ "membership": "join" });
        a.rooms.send(&room, &user, "m.room.member", Some(user.as_str()), content).await?;
    }
    Ok(room)
}

/// Stops the server; its scratch database is dropped with the rest of `server`.
async fn stop(server: BenchServer) {
    server.running.stop().await;
}

/// Joined members of `room` in A's current state.
async fn joined_members(state: &AppState, room: &RoomId) -> anyhow::Result<usize> {
    Ok(state
        .rooms
        .current_state(room)
        .await?
        .iter()
        .filter(|e| e.event_type() == "m.room.member" && e.content_value()["membership"] == "join")
        .count())
}

/// Each gateway fetches the other's current key over HTTP (warm caches before the clock starts,
/// as between servers that have talked before). Returns the time both fetches took.
async fn fetch_keys_both_ways(a: &AppState, b: &AppState) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let (a_name, b_name) = (a.settings.server_name.clone(), b.settings.server_name.clone());
    b.keys.request_key(&a_name, &a.key.key_id()).await?;
    a.keys.request_key(&b_name, &b.key.key_id()).await?;
    Ok(t.elapsed())
}

/// A's make_join template for `user`, built by calling A directly.
async fn template_in_process(
    a: &AppState,
    room: &OwnedRoomId,
    user: &UserId,
) -> anyhow::Result<(RoomVersion, serde_json::Map<String, Value>)> {
    let offered: Vec<String> = RoomVersion::SUPPORTED.iter().map(|v| v.as_str().to_owned()).collect();
    let made = inbound::make(&a.rooms, user.server_name(), room, user.as_str(), Membership::Join, &offered).await?;
    parse_template(made)
}

/// A's make_join template for `user`, fetched by `b` over signed HTTP.
async fn template_over_http(
    b: &AppState,
    room: &OwnedRoomId,
    user: &UserId,
) -> anyhow::Result<(RoomVersion, serde_json::Map<String, Value>)> {
    let versions: Vec<String> = RoomVersion::SUPPORTED.iter().map(|v| format!("ver={}", v.as_str())).collect();
    let path = format!(
        "/_matrix/federation/v1/make_join/{}/{}?{}",
        encode(room.as_str()),
        encode(user.as_str()),
        versions.join("&")
    );
    let made = b.federation.get(<&ServerName>::try_from(HOST)?, &path).await?;
    parse_template(made)
}

fn parse_template(made: Value) -> anyhow::Result<(RoomVersion, serde_json::Map<String, Value>)> {
    let raw = made.get("room_version").and_then(Value::as_str).context("make_join: no room_version")?;
    let version = RoomVersion::parse(raw).context("make_join: unsupported room version")?;
    let template = made.get("event").and_then(Value::as_object).context("make_join: no event")?.clone();
    Ok((version, template))
}
