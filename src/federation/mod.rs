//! Server-server API: the outbound client (with server-name resolution) and our routes.

pub mod client;
pub mod reads;
pub mod resolve;
pub mod server;
