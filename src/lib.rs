//! peekgate: a Matrix federation peeking gateway (MSC2444 target and peeker, MSC2753 client API).
//!
//! Data flow (ARCHITECTURE.md has the module map): the HTTP edge (`federation::*` routes,
//! `client_api`) → `events::intake` for every remote PDU → `rooms`, the one append path →
//! subscribers (`peeks::inbound` and `peeks::devices` through `rooms::hooks`; `sync` and
//! `sender` through the stream position) → `sender` → peers. `app` wires it together.

pub mod accounts;
pub mod admin;
pub mod app;
pub mod canonical_json;
pub mod client_api;
pub mod clock;
pub mod config;
pub mod db;
pub mod error;
pub mod events;
pub mod federation;
pub mod http;
pub mod ids;
pub mod keys;
pub mod limits;
pub mod logging;
pub mod membership;
pub mod metrics;
pub mod pause;
pub mod peeks;
pub mod rooms;
pub mod schedule;
pub mod sender;
pub mod state;
pub mod sync;
pub mod transactions;
pub mod xmatrix;
