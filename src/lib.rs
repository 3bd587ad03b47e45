//! peekgate: a Matrix federation peeking gateway (MSC2444 target and peeker, MSC2753 client API).
//!
//! The modules follow the data flow of `design.md`: `config` → `keys` / `xmatrix` (identity and
//! authentication) → `federation` (client and routes) → `db` (storage); `app` wires them together.

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
pub mod logging;
pub mod metrics;
pub mod peeks;
pub mod rooms;
pub mod schedule;
pub mod sender;
pub mod state;
pub mod sync;
pub mod xmatrix;
