//! `peekgate bench signing`: the signing part of a fan-out, alone. One `/send` body's X-Matrix
//! headers for N destinations, made one by one (the whole signed text through ruma, as a single
//! request is signed), one by one over the body's shared prefix, and in the sender's batches.
//! No network and no database, on one core: steadier than the fan-out figures of `bench peeks`,
//! which share two cores with the receiver and PostgreSQL.

use std::hint::black_box;
use std::time::Instant;

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
    Ok(())
}

/// A canonical JSON `/send` body of about `bytes` bytes.
fn body_of(bytes: usize) -> String {
    let text = "x".repeat(bytes.saturating_sub(80));
    format!("{{\"edus\":[],\"origin\":\"{ORIGIN}\",\"pdus\":[{{\"content\":{{\"body\":\"{text}\"}}}}]}}")
}
