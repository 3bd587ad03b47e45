//! `peekgate bench signing`: the signing part of a fan-out, alone. One `/send` body's X-Matrix
//! headers for N destinations, made one by one (the whole signed text through ruma, as a single
//! request is signed), one by one over the body's shared prefix, and in the sender's batches.
//! Then the receiving side's first step: the canonical text of a received `/send` body, checked in
//! one scan ([`canonical_json::already_canonical`]) against parsed and encoded again.
//! No network and no database, on one core: steadier than the fan-out figures of `bench peeks`,
//! which share two cores with the receiver and PostgreSQL.

use std::hint::black_box;
use std::time::Instant;

use serde_json::json;

use peekgate::canonical_json;
use peekgate::keys::SigningKey;
use peekgate::sender::SIGNING_BATCH;
use peekgate::xmatrix::{authorization_header, SharedBodyAuthorization};

const ORIGIN: &str = "host.bench";
const PATH: &str = "/_matrix/federation/v1/send/1700000000000-1";

pub fn signing(destinations: usize, bodies: usize) -> anyhow::Result<()> {
    anyhow::ensure!(destinations > 0 && bodies > 0, "--destinations and --bodies must be at least 1");
    println!("peekgate bench signing (release build: {})", !cfg!(debug_assertions));
    let key = SigningKey::generate();
    let names: Vec<String> = (0..destinations).map(|i| format!("d{i}.bench")).collect();
    // One PDU is about 1 KB; the sustained run of `bench peeks` sends about 29 per transaction.
    for (label, body_bytes) in [("one PDU, 1 KB", 1_000), ("29 PDUs, 30 KB", 30_000)] {
        let body = body_of(body_bytes);
        let per_header = |run: &dyn Fn()| {
            let started = Instant::now();
            for _ in 0..bodies {
                run();
            }
            started.elapsed().as_secs_f64() * 1e6 / (bodies * destinations) as f64
        };
        let whole = per_header(&|| {
            for name in &names {
                black_box(authorization_header(&key, ORIGIN, name, "PUT", PATH, Some(&body)));
            }
        });
        let prefixed = per_header(&|| {
            let shared = SharedBodyAuthorization::new(&key, ORIGIN, "PUT", PATH, &body);
            for name in &names {
                black_box(shared.header(name));
            }
        });
        let batched = per_header(&|| {
            let shared = SharedBodyAuthorization::new(&key, ORIGIN, "PUT", PATH, &body);
            for batch in names.chunks(SIGNING_BATCH) {
                black_box(shared.headers(batch));
            }
        });
        println!(
            "{label}: µs per destination's header over {bodies} bodies × {destinations} destinations: whole text {whole:.1}, shared prefix {prefixed:.1}, shared prefix in batches of {SIGNING_BATCH} {batched:.1} (the sender's way)"
        );
    }
    canonical_check(bodies);
    Ok(())
}

/// µs per received `/send` body of 40 PDUs (the sustained run's size) for its canonical text:
/// the scan that takes a canonical body as it is, and the full parse and encode it replaces.
fn canonical_check(bodies: usize) {
    let body = transaction_of(40);
    let runs = bodies * 100;
    let time = |run: &dyn Fn() -> usize| {
        let started = Instant::now();
        for _ in 0..runs {
            black_box(run());
        }
        started.elapsed().as_secs_f64() * 1e6 / runs as f64
    };
    let scanned = time(&|| canonical_json::already_canonical(black_box(body.as_bytes())).map_or(0, str::len));
    let encoded = time(&|| {
        let value: serde_json::Value = serde_json::from_slice(black_box(body.as_bytes())).expect("JSON");
        canonical_json::encode_value(value).expect("canonical").len()
    });
    println!(
        "received /send of 40 PDUs ({} KB): µs for its canonical text over {runs} runs: one scan {scanned:.1}, parse and encode {encoded:.1}",
        body.len() / 1000
    );
}

/// A canonical `/send` body of `pdus` room messages shaped as real ones (hashes, signatures,
/// auth and prev events, a body with an escape and non-ASCII text).
fn transaction_of(pdus: usize) -> String {
    let pdus: Vec<_> = (0..pdus)
        .map(|i| {
            json!({
                "auth_events": ["$Mcp5Gvs2Fc7mdy8Zf9cW1CfW0rGzXJqgV5l9oZJQyX0", "$3bUt3ugSdRw6EuJyGeJ5wmvJ6cBUuCJ8aOHTDz5lGJg"],
                "content": { "body": format!("message {i}: \"quoted\"\nand ünïcödé"), "msgtype": "m.text" },
                "depth": 100 + i,
                "hashes": { "sha256": "0vJcH5M0Vbr1ryc7l9ktZmTOpbbhMzV6ZKxcfgkTfGs" },
                "origin_server_ts": 1_700_000_000_000_i64 + i as i64,
                "prev_events": ["$qYq4Lxz0pPP1aVpG8DDn6H0xS6ukzLqEb0gUHlHkqTc"],
                "room_id": "!OGEhHVWSdvArJzumhm:host.bench",
                "sender": "@alice:host.bench",
                "signatures": { ORIGIN: { "ed25519:a_Abcd": "Wm+VzmOUOz08Ds+0NTWb1d4CZrVsJSikkeRxh6aCcUwu6pNC78FunoD7KNWzqFn241eYHYMGCA5McEiVPdhzBA" } },
                "type": "m.room.message",
            })
        })
        .collect();
    let transaction = json!({ "edus": [], "origin": ORIGIN, "origin_server_ts": 1_700_000_000_000_i64, "pdus": pdus });
    canonical_json::encode_value(transaction).expect("canonical")
}

/// A canonical JSON `/send` body of about `bytes` bytes.
fn body_of(bytes: usize) -> String {
    let text = "x".repeat(bytes.saturating_sub(80));
    format!("{{\"edus\":[],\"origin\":\"{ORIGIN}\",\"pdus\":[{{\"content\":{{\"body\":\"{text}\"}}}}]}}")
}
