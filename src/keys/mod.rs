//! Server keys: our own signing key and its publication (`/_matrix/key/v2/server`), remote
//! servers' keys (fetched, verified and cached), and the notary query endpoints.

pub mod encoding;
pub mod http;
pub mod parallel_sha512;
pub mod remote;
pub mod signing;

pub use encoding::{decode_base64, encode_base64, is_valid_key_version};
pub use remote::{KeyError, RemoteKeys, VerifyKey};
pub use signing::SigningKey;
