//! Server-server API: the outbound client (with server-name resolution) and our routes.

pub mod auth;
pub mod check;
pub mod client;
pub mod connection;
pub mod membership;
pub mod peek;
pub mod reads;
pub mod resolve;
pub mod send;
pub mod server;
