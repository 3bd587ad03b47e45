//! Remote servers' keys: fetched from `/_matrix/key/v2/server`, checked (server name and a
//! valid self-signature by every verify key), cached per (server, key id) in the database with
//! the validity we may rely on, and refetched for an unknown key at most once per 5 minutes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use ed25519_dalek::VerifyingKey;
use ruma::signatures::{to_canonical_json_string_for_signing, verify_canonical_json_bytes};
use ruma::{CanonicalJsonObject, CanonicalJsonValue, OwnedServerName, ServerName, SigningKeyAlgorithm};

use super::encoding::{decode_base64, encode_base64};
use super::signing::SigningKey;
use crate::clock::now_ms;
use crate::config::OldKeyConfig;
use crate::db::schema::{server_key_responses, server_keys};
use crate::db::write_transaction;
use crate::db::{Db, DbError};
use crate::federation::client::{FederationClient, FederationError};
use crate::on_backend;

/// The spec caps how long a fetched key may be trusted, whatever `valid_until_ts` says.
const MAX_TRUST_MS: i64 = 7 * 24 * 3600 * 1000;
/// At most one refetch per server in this window when a key is unknown or stale.
pub const REFETCH_INTERVAL: Duration = Duration::from_secs(300);
/// A refetch that did not turn up the key it was made for holds the server's slot only this
/// long (H14): any unauthenticated request naming an unknown key ID makes one, and holding the
/// slot for the whole interval let it block the server's real new key for five minutes.
pub const MISSED_REFETCH_HOLD: Duration = Duration::from_secs(10);
/// Bound on the in-memory key cache (it is only a copy of the database table).
const MEMORY_CACHE_MAX: usize = 10_000;
/// Per-server bookkeeping (fetch locks, last fetch times) is pruned when it grows past this
/// (H14): the names are chosen by whoever sends us requests.
const PER_SERVER_MAX: usize = 1_024;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{server} has no key {key_id} valid at {at}")]
    NotValid { server: String, key_id: String, at: i64 },
    #[error("keys of {0} were fetched moments ago; not refetching yet")]
    RateLimited(String),
    #[error("fetching keys of {server}: {source}")]
    Fetch { server: String, source: FederationError },
    #[error("key response of {server} rejected: {reason}")]
    BadResponse { server: String, reason: String },
    #[error(transparent)]
    Db(#[from] DbError),
}

/// One verify key as we cache it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyKey {
    pub key_id: String,
    pub public_key: [u8; 32],
    /// Until when signatures by this key count (ms); for old keys, their `expired_ts`.
    pub valid_until_ts: i64,
    pub is_old: bool,
}

impl VerifyKey {
    /// Whether this key may check a signature made at `valid_at`; `current_only` (request
    /// authentication) also refuses old keys.
    fn serves(&self, valid_at: i64, current_only: bool) -> bool {
        self.valid_until_ts >= valid_at && !(current_only && self.is_old)
    }
}

/// A key response that passed every check.
#[derive(Debug, Clone)]
pub struct VerifiedKeyResponse {
    pub keys: Vec<VerifyKey>,
    /// The response's own `valid_until_ts` (what the notary API compares against).
    pub valid_until_ts: i64,
    pub object: CanonicalJsonObject,
}

/// Checks a `/_matrix/key/v2/server` response for `server`: right `server_name`, at least one
/// ed25519 verify key, a valid self-signature by every ed25519 verify key, not expired.
/// Keys under other algorithms cannot be checked and are ignored.
pub fn verify_key_response(
    server: &ServerName,
    object: CanonicalJsonObject,
    now: i64,
) -> Result<VerifiedKeyResponse, String> {
    match object.get("server_name") {
        Some(CanonicalJsonValue::String(name)) if name == server.as_str() => {}
        Some(other) => return Err(format!("server_name is {other}, expected {server}")),
        None => return Err("server_name is missing".into()),
    }
    let valid_until_ts = match object.get("valid_until_ts") {
        Some(CanonicalJsonValue::Integer(ts)) => i64::from(*ts),
        _ => return Err("valid_until_ts is missing or not an integer".into()),
    };
    if valid_until_ts <= now {
        return Err(format!("the response expired at {valid_until_ts}"));
    }
    let trusted_until = valid_until_ts.min(now + MAX_TRUST_MS);
    let verify_keys = parse_keys(&object, "verify_keys", false, trusted_until)?;
    if verify_keys.is_empty() {
        return Err("no ed25519 verify key".into());
    }
    let signatures = match object.get("signatures") {
        Some(CanonicalJsonValue::Object(all)) => match all.get(server.as_str()) {
            Some(CanonicalJsonValue::Object(ours)) => ours,
            _ => return Err("no signatures by the server itself".into()),
        },
        _ => return Err("signatures are missing".into()),
    };
    let canonical = to_canonical_json_string_for_signing(&object).map_err(|e| e.to_string())?;
    for key in &verify_keys {
        let Some(CanonicalJsonValue::String(sig)) = signatures.get(&key.key_id) else {
            return Err(format!("{} did not sign the response", key.key_id));
        };
        let sig = decode_base64(sig).ok_or_else(|| format!("signature by {} is not base64", key.key_id))?;
        verify_canonical_json_bytes(&SigningKeyAlgorithm::Ed25519, &key.public_key, &sig, canonical.as_bytes())
            .map_err(|_| format!("bad self-signature by {}", key.key_id))?;
    }
    // H17: an old key counts only for what it signed before it expired, never past this fetch
    // (whatever `expired_ts` claims), and never under the ID of a self-signed verify key.
    let old_keys: Vec<VerifyKey> = parse_keys(&object, "old_verify_keys", true, 0)?
        .into_iter()
        .filter(|old| !verify_keys.iter().any(|k| k.key_id == old.key_id))
        .map(|old| VerifyKey { valid_until_ts: old.valid_until_ts.min(now), ..old })
        .collect();
    let mut keys = verify_keys;
    keys.extend(old_keys);
    Ok(VerifiedKeyResponse { keys, valid_until_ts, object })
}

fn parse_keys(
    object: &CanonicalJsonObject,
    field: &str,
    old: bool,
    valid_until_ts: i64,
) -> Result<Vec<VerifyKey>, String> {
    let Some(value) = object.get(field) else {
        return if old { Ok(Vec::new()) } else { Err(format!("{field} is missing")) };
    };
    let CanonicalJsonValue::Object(map) = value else {
        return Err(format!("{field} is not an object"));
    };
    let mut keys = Vec::new();
    for (key_id, entry) in map {
        if !key_id.starts_with("ed25519:") {
            continue;
        }
        let CanonicalJsonValue::Object(entry) = entry else {
            return Err(format!("{field}.{key_id} is not an object"));
        };
        let Some(CanonicalJsonValue::String(key)) = entry.get("key") else {
            return Err(format!("{field}.{key_id}.key is missing"));
        };
        let public_key: [u8; 32] = decode_base64(key)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| format!("{field}.{key_id}.key is not a 32-byte base64 key"))?;
        let valid_until_ts = if old {
            match entry.get("expired_ts") {
                Some(CanonicalJsonValue::Integer(ts)) => i64::from(*ts),
                _ => return Err(format!("{field}.{key_id}.expired_ts is missing")),
            }
        } else {
            valid_until_ts
        };
        keys.push(VerifyKey { key_id: key_id.clone(), public_key, valid_until_ts, is_old: old });
    }
    Ok(keys)
}

/// Our own keys, answered without any fetch.
struct OwnKeys {
    server_name: OwnedServerName,
    key: Arc<SigningKey>,
    old_keys: Vec<OldKeyConfig>,
}

pub struct RemoteKeys {
    db: Db,
    client: Arc<FederationClient>,
    own: OwnKeys,
    last_fetch: Mutex<HashMap<OwnedServerName, Instant>>,
    fetch_locks: Mutex<HashMap<OwnedServerName, Arc<tokio::sync::Mutex<()>>>>,
    /// Keys already read from the database: every authenticated request needs one.
    memory: Mutex<HashMap<(OwnedServerName, String), VerifyKey>>,
    /// Public keys as curve points, by their bytes: decompressing one costs a tenth of a
    /// verification, and every authenticated request needs its origin's key as a point.
    points: Mutex<HashMap<[u8; 32], VerifyingKey>>,
}

impl RemoteKeys {
    pub fn new(
        db: Db,
        client: Arc<FederationClient>,
        server_name: OwnedServerName,
        key: Arc<SigningKey>,
        old_keys: Vec<OldKeyConfig>,
    ) -> RemoteKeys {
        RemoteKeys {
            db,
            client,
            own: OwnKeys { server_name, key, old_keys },
            last_fetch: Mutex::new(HashMap::new()),
            fetch_locks: Mutex::new(HashMap::new()),
            memory: Mutex::new(HashMap::new()),
            points: Mutex::new(HashMap::new()),
        }
    }

    /// The public key `key_id` of `server`, valid at `valid_at` (ms), current or old: for event
    /// signatures, checked at the event's timestamp. Uses the cache, fetching the server's keys
    /// when the key is unknown or no longer valid (rate-limited).
    pub async fn verify_key(&self, server: &ServerName, key_id: &str, valid_at: i64) -> Result<[u8; 32], KeyError> {
        self.lookup(server, key_id, valid_at, false).await
    }

    /// The public key `key_id` of `server` for X-Matrix request authentication: only a current
    /// key (`verify_keys`) valid now; an old key never authenticates a request (H17).
    pub async fn request_key(&self, server: &ServerName, key_id: &str) -> Result<[u8; 32], KeyError> {
        self.lookup(server, key_id, now_ms(), true).await
    }

    async fn lookup(
        &self,
        server: &ServerName,
        key_id: &str,
        valid_at: i64,
        current_only: bool,
    ) -> Result<[u8; 32], KeyError> {
        let not_valid = || KeyError::NotValid { server: server.to_string(), key_id: key_id.to_owned(), at: valid_at };
        if server == self.own.server_name {
            return self.own_key(key_id, valid_at, current_only).ok_or_else(not_valid);
        }
        if let Some(key) = self.cached_valid(server, key_id, valid_at, current_only).await? {
            return Ok(key);
        }
        // One fetch per server at a time: concurrent callers wait, then find it cached.
        let lock = self.fetch_lock(server);
        let _guard = lock.lock().await;
        if let Some(key) = self.cached_valid(server, key_id, valid_at, current_only).await? {
            return Ok(key);
        }
        let fetched = self.fetch_and_store(server).await?;
        let found = fetched.keys.iter().find(|k| k.key_id == key_id && k.serves(valid_at, current_only));
        if found.is_none() {
            self.shorten_fetch_slot(server);
        }
        found.map(|k| k.public_key).ok_or_else(not_valid)
    }

    /// The refetch just made for `server` did not find the key asked for: let the next one
    /// come after [`MISSED_REFETCH_HOLD`] instead of the whole interval.
    fn shorten_fetch_slot(&self, server: &ServerName) {
        if let Some(at) = self.last_fetch.lock().unwrap().get_mut(server) {
            if let Some(earlier) = Instant::now().checked_sub(REFETCH_INTERVAL - MISSED_REFETCH_HOLD) {
                *at = earlier;
            }
        }
    }

    /// A cached key valid at `valid_at`: from memory, else from the database (then remembered).
    async fn cached_valid(
        &self,
        server: &ServerName,
        key_id: &str,
        valid_at: i64,
        current_only: bool,
    ) -> Result<Option<[u8; 32]>, KeyError> {
        let memory_key = (server.to_owned(), key_id.to_owned());
        if let Some(key) = self.memory.lock().unwrap().get(&memory_key) {
            if key.serves(valid_at, current_only) {
                return Ok(Some(key.public_key));
            }
        }
        let Some(key) = self.cached(server, key_id).await? else {
            return Ok(None);
        };
        let public_key = key.serves(valid_at, current_only).then_some(key.public_key);
        self.remember(server, key);
        Ok(public_key)
    }

    fn remember(&self, server: &ServerName, key: VerifyKey) {
        let mut memory = self.memory.lock().unwrap();
        if memory.len() >= MEMORY_CACHE_MAX {
            memory.clear();
        }
        memory.insert((server.to_owned(), key.key_id.clone()), key);
    }

    /// `public_key` as a curve point, decompressed once; `None` when it is not one.
    fn point(&self, public_key: [u8; 32]) -> Option<VerifyingKey> {
        if let Some(point) = self.points.lock().unwrap().get(&public_key) {
            return Some(*point);
        }
        let point = VerifyingKey::from_bytes(&public_key).ok()?;
        let mut points = self.points.lock().unwrap();
        if points.len() >= MEMORY_CACHE_MAX {
            points.clear();
        }
        points.insert(public_key, point);
        Some(point)
    }

    fn fetch_lock(&self, server: &ServerName) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.fetch_locks.lock().unwrap();
        // Forget the locks nobody holds or waits for.
        prune_per_server(&mut locks, |lock| Arc::strong_count(lock) > 1);
        locks.entry(server.to_owned()).or_default().clone()
    }

    fn own_key(&self, key_id: &str, valid_at: i64, current_only: bool) -> Option<[u8; 32]> {
        if key_id == self.own.key.key_id() {
            return Some(self.own.key.public_key());
        }
        if current_only {
            return None;
        }
        let old = self.own.old_keys.iter().find(|k| k.key_id == key_id)?;
        if (old.expired_ts as i64) < valid_at {
            return None;
        }
        decode_base64(&old.public_key)?.try_into().ok()
    }

    /// The cached key row, if any.
    pub async fn cached(&self, server: &ServerName, key_id: &str) -> Result<Option<VerifyKey>, KeyError> {
        let server = server.to_string();
        let key_id = key_id.to_owned();
        let row: Option<(String, String, i64, bool)> = self
            .db
            .run::<_, DbError, _>(move |conn| {
                Ok(server_keys::table
                    .filter(server_keys::server_name.eq(&server))
                    .filter(server_keys::key_id.eq(&key_id))
                    .select((
                        server_keys::key_id,
                        server_keys::public_key,
                        server_keys::valid_until_ts,
                        server_keys::is_old,
                    ))
                    .first(conn)
                    .optional()?)
            })
            .await?;
        Ok(row.and_then(|(key_id, public_key, valid_until_ts, is_old)| {
            let public_key = decode_base64(&public_key)?.try_into().ok()?;
            Some(VerifyKey { key_id, public_key, valid_until_ts, is_old })
        }))
    }

    /// Fetches, verifies and caches `server`'s key response, at most once per 5 minutes.
    pub async fn fetch_and_store(&self, server: &ServerName) -> Result<VerifiedKeyResponse, KeyError> {
        self.take_fetch_slot(server)?;
        let value = self
            .client
            .get_unsigned(server, "/_matrix/key/v2/server")
            .await
            .map_err(|source| KeyError::Fetch { server: server.to_string(), source })?;
        let bad = |reason: String| KeyError::BadResponse { server: server.to_string(), reason };
        let object = match CanonicalJsonValue::try_from(value) {
            Ok(CanonicalJsonValue::Object(object)) => object,
            Ok(_) => return Err(bad("not an object".into())),
            Err(e) => return Err(bad(e.to_string())),
        };
        let mut verified = verify_key_response(server, object, now_ms()).map_err(bad)?;
        verified.keys = self.store(server, &verified).await?;
        for key in &verified.keys {
            self.remember(server, key.clone());
        }
        Ok(verified)
    }

    fn take_fetch_slot(&self, server: &ServerName) -> Result<(), KeyError> {
        let mut last = self.last_fetch.lock().unwrap();
        // Only fetches within the interval still limit anything.
        prune_per_server(&mut last, |at| at.elapsed() < REFETCH_INTERVAL);
        if let Some(at) = last.get(server) {
            if at.elapsed() < REFETCH_INTERVAL {
                return Err(KeyError::RateLimited(server.to_string()));
            }
        }
        last.insert(server.to_owned(), Instant::now());
        Ok(())
    }

    /// Caches the response and its keys; returns the keys kept. An old key never replaces a
    /// cached current key of the same ID with other key material (H17): that entry is dropped.
    async fn store(&self, server: &ServerName, verified: &VerifiedKeyResponse) -> Result<Vec<VerifyKey>, KeyError> {
        let server = server.to_string();
        let now = now_ms();
        let keys = verified.keys.clone();
        let rows: Vec<_> = verified
            .keys
            .iter()
            .map(|k| {
                (
                    server_keys::server_name.eq(server.clone()),
                    server_keys::key_id.eq(k.key_id.clone()),
                    server_keys::public_key.eq(encode_base64(&k.public_key)),
                    server_keys::valid_until_ts.eq(k.valid_until_ts),
                    server_keys::is_old.eq(k.is_old),
                    server_keys::fetched_ts.eq(now),
                )
            })
            .collect();
        let response_json = serde_json::to_string(&verified.object).expect("canonical JSON serialises");
        let valid_until_ts = verified.valid_until_ts;
        self.db
            .run::<_, DbError, _>(move |conn| {
                write_transaction(conn, |conn| {
                    let mut kept = Vec::new();
                    for (key, row) in keys.iter().zip(rows) {
                        if key.is_old {
                            let existing: Option<(String, bool)> = server_keys::table
                                .filter(server_keys::server_name.eq(&server))
                                .filter(server_keys::key_id.eq(&key.key_id))
                                .select((server_keys::public_key, server_keys::is_old))
                                .first(conn)
                                .optional()?;
                            let encoded = encode_base64(&key.public_key);
                            if existing.is_some_and(|(public_key, is_old)| !is_old && public_key != encoded) {
                                continue;
                            }
                        }
                        kept.push(key.clone());
                        let (_, _, public_key, valid_until, is_old, fetched) = row.clone();
                        on_backend!(&mut *conn, |c| diesel::insert_into(server_keys::table)
                            .values(row.clone())
                            .on_conflict((server_keys::server_name, server_keys::key_id))
                            .do_update()
                            .set((public_key, valid_until, is_old, fetched))
                            .execute(c))?;
                    }
                    let response = (
                        server_key_responses::server_name.eq(server.clone()),
                        server_key_responses::response_json.eq(response_json.clone()),
                        server_key_responses::valid_until_ts.eq(valid_until_ts),
                        server_key_responses::fetched_ts.eq(now),
                    );
                    on_backend!(&mut *conn, |c| diesel::insert_into(server_key_responses::table)
                        .values(response.clone())
                        .on_conflict(server_key_responses::server_name)
                        .do_update()
                        .set((response.1.clone(), response.2, response.3))
                        .execute(c))?;
                    Ok::<_, diesel::result::Error>(kept)
                })
                .map_err(DbError::from)
            })
            .await
            .map_err(KeyError::from)
    }

    /// The notary answer for `server`: its key response (ours, freshly signed, for ourselves),
    /// valid at least until `minimum_valid_until_ts`; refreshed from the origin when the cached
    /// copy is older, and the last good copy kept when the origin cannot be reached.
    /// A fetch spends one of `fetch_budget`; with none left only what is cached is served (H14:
    /// one notary query may not make us fetch from many servers).
    pub async fn notary_lookup(
        &self,
        server: &ServerName,
        minimum_valid_until_ts: i64,
        fetch_budget: &mut usize,
        own_publication: impl FnOnce() -> CanonicalJsonObject,
    ) -> Result<Option<CanonicalJsonObject>, KeyError> {
        if server == self.own.server_name {
            return Ok(Some(own_publication()));
        }
        let cached = self.cached_response(server).await?;
        if let Some((object, valid_until)) = &cached {
            if *valid_until >= minimum_valid_until_ts {
                return Ok(Some(object.clone()));
            }
        }
        if *fetch_budget == 0 {
            return Ok(cached.map(|(object, _)| object));
        }
        *fetch_budget -= 1;
        match self.fetch_and_store(server).await {
            Ok(verified) => Ok(Some(verified.object)),
            Err(e) => {
                tracing::info!(server = %server, error = %e, "notary: serving the last good key response");
                Ok(cached.map(|(object, _)| object))
            }
        }
    }

    async fn cached_response(&self, server: &ServerName) -> Result<Option<(CanonicalJsonObject, i64)>, KeyError> {
        let server = server.to_string();
        let row: Option<(String, i64)> = self
            .db
            .run::<_, DbError, _>(move |conn| {
                Ok(server_key_responses::table
                    .filter(server_key_responses::server_name.eq(&server))
                    .select((server_key_responses::response_json, server_key_responses::valid_until_ts))
                    .first(conn)
                    .optional()?)
            })
            .await?;
        Ok(row.and_then(|(json, valid_until)| Some((serde_json::from_str(&json).ok()?, valid_until))))
    }
}

/// Keeps a map keyed by server names others choose bounded (H14): once it holds
/// [`PER_SERVER_MAX`] entries, only those `still_needed` keeps stay.
fn prune_per_server<V>(map: &mut HashMap<OwnedServerName, V>, mut still_needed: impl FnMut(&V) -> bool) {
    if map.len() >= PER_SERVER_MAX {
        map.retain(|_, value| still_needed(value));
    }
}

#[async_trait::async_trait]
impl crate::xmatrix::RequestKeys for RemoteKeys {
    async fn request_key(&self, server: &ServerName, key_id: &str) -> Result<VerifyingKey, String> {
        let public_key = RemoteKeys::request_key(self, server, key_id).await.map_err(|e| e.to_string())?;
        self.point(public_key).ok_or_else(|| format!("{key_id} of {server} is not an ed25519 public key"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(i: usize) -> OwnedServerName {
        OwnedServerName::try_from(format!("s{i}.example")).unwrap()
    }

    /// H14: fetch locks nobody holds and fetch times older than the interval are forgotten once
    /// the maps are full, whatever names requests brought in.
    #[test]
    fn per_server_maps_stay_bounded() {
        let mut locks: HashMap<OwnedServerName, Arc<tokio::sync::Mutex<()>>> =
            (0..PER_SERVER_MAX).map(|i| (name(i), Arc::default())).collect();
        let held = locks[&name(7)].clone();
        prune_per_server(&mut locks, |lock| Arc::strong_count(lock) > 1);
        assert_eq!(locks.keys().cloned().collect::<Vec<_>>(), vec![name(7)], "only the lock in use stays");
        drop(held);

        let long_ago = Instant::now().checked_sub(REFETCH_INTERVAL * 2).unwrap_or_else(Instant::now);
        let mut last: HashMap<OwnedServerName, Instant> = (0..PER_SERVER_MAX).map(|i| (name(i), long_ago)).collect();
        last.insert(name(3), Instant::now());
        prune_per_server(&mut last, |at| at.elapsed() < REFETCH_INTERVAL);
        assert_eq!(last.len(), 1, "only the recent fetch still limits anything");
        // Below the bound nothing is pruned.
        let mut small: HashMap<OwnedServerName, Instant> = (0..10).map(|i| (name(i), long_ago)).collect();
        prune_per_server(&mut small, |at| at.elapsed() < REFETCH_INTERVAL);
        assert_eq!(small.len(), 10);
    }
}
