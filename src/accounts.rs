//! Local accounts: users (argon2 password hashes), devices and access tokens. Only a SHA-256 of
//! each token is stored, so a database leak does not leak sessions.
//!
//! Password work is bounded (H13): at most [`HASHING_AT_ONCE`] argon2 runs at a time (each takes
//! about 19 MiB), login attempts are rate-limited per user ID and registrations per server, and an
//! unknown user costs the same argon2 verification as a wrong password, so the answer time does
//! not tell whether an account exists.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use diesel::prelude::*;
use rand::distr::{Alphanumeric, SampleString};
use ruma::{OwnedUserId, ServerName, UserId};
use sha2::{Digest, Sha256};

use std::num::NonZeroU32;
use std::sync::{Arc, OnceLock};

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::Semaphore;

use crate::clock::now_ms;
use crate::db::schema::{access_tokens, devices, users};
use crate::db::{Db, DbError};
use crate::on_backend;

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("user ID already taken")]
    UserInUse,
    #[error("invalid username: {0}")]
    InvalidUsername(String),
    #[error("invalid username or password")]
    BadCredentials,
    #[error("unknown access token")]
    UnknownToken,
    #[error("password hashing failed: {0}")]
    Hash(String),
    /// H13: too many login attempts for this user, or registrations on this server.
    #[error("too many attempts")]
    LimitExceeded { retry_after_ms: u64 },
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<diesel::result::Error> for AccountError {
    fn from(e: diesel::result::Error) -> Self {
        AccountError::Db(DbError::Query(e))
    }
}

/// Who is calling, from a valid access token.
#[derive(Debug, Clone)]
pub struct Session {
    pub user_id: OwnedUserId,
    pub device_id: String,
    pub token_hash: String,
    pub is_admin: bool,
}

/// A fresh login.
#[derive(Debug, Clone)]
pub struct Login {
    pub user_id: OwnedUserId,
    pub device_id: String,
    pub access_token: String,
}

/// argon2 runs at once (one per core of a small machine); more callers wait their turn.
pub const HASHING_AT_ONCE: usize = 2;
/// Login attempts per user ID: a burst of this many, then one more every 6 seconds.
pub const LOGIN_ATTEMPTS_BURST: u32 = 10;
/// Registrations on this server: a burst of this many, then one more every 2 seconds.
pub const REGISTRATIONS_BURST: u32 = 30;

pub struct Accounts {
    db: Db,
    hashing: Arc<Semaphore>,
    login_attempts: DefaultKeyedRateLimiter<String>,
    registrations: DefaultDirectRateLimiter,
}

/// Localparts: lower-case letters, digits and `._=-/+`, as the spec's user ID grammar allows.
pub fn validate_localpart(localpart: &str, server_name: &ServerName) -> Result<OwnedUserId, AccountError> {
    if localpart.is_empty()
        || !localpart.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._=-/+".contains(&b))
    {
        return Err(AccountError::InvalidUsername("use only a-z, 0-9 and . _ = - / +".to_owned()));
    }
    let user_id =
        crate::ids::local_user(localpart, server_name).map_err(|e| AccountError::InvalidUsername(e.to_string()))?;
    if user_id.as_str().len() > 255 {
        return Err(AccountError::InvalidUsername("the user ID would exceed 255 bytes".to_owned()));
    }
    Ok(user_id)
}

fn hash_token(token: &str) -> String {
    Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

fn hash_password(password: &str) -> Result<String, AccountError> {
    let mut salt = [0u8; 16];
    rand::fill(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| AccountError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AccountError::Hash(e.to_string()))
}

fn password_matches(password: &str, stored: &str) -> bool {
    PasswordHash::new(stored).is_ok_and(|hash| Argon2::default().verify_password(password.as_bytes(), &hash).is_ok())
}

/// A hash no password matches, verified for unknown users so that they cost what a wrong
/// password costs.
fn decoy_hash() -> &'static str {
    static DECOY: OnceLock<String> = OnceLock::new();
    DECOY.get_or_init(|| {
        let mut random = [0u8; 32];
        rand::fill(&mut random);
        hash_password(&encode_hex(&random)).expect("hashing a random password works")
    })
}

fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn quota(burst: u32, period: std::time::Duration) -> Quota {
    Quota::with_period(period).expect("non-zero period").allow_burst(NonZeroU32::new(burst).expect("non-zero burst"))
}

/// `LimitExceeded` with the wait a governor reported.
fn limited(not_until: governor::NotUntil<governor::clock::QuantaInstant>) -> AccountError {
    use governor::clock::{Clock, DefaultClock};
    let wait = not_until.wait_time_from(DefaultClock::default().now());
    AccountError::LimitExceeded { retry_after_ms: wait.as_millis().max(1) as u64 }
}

impl Accounts {
    pub fn new(db: Db) -> Accounts {
        Accounts {
            db,
            hashing: Arc::new(Semaphore::new(HASHING_AT_ONCE)),
            login_attempts: RateLimiter::keyed(quota(LOGIN_ATTEMPTS_BURST, std::time::Duration::from_secs(6))),
            registrations: RateLimiter::direct(quota(REGISTRATIONS_BURST, std::time::Duration::from_secs(2))),
        }
    }

    /// Runs argon2 work on a blocking thread, at most [`HASHING_AT_ONCE`] at a time.
    async fn with_hashing<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, AccountError> {
        let _permit = self.hashing.acquire().await.map_err(|e| AccountError::Hash(e.to_string()))?;
        tokio::task::spawn_blocking(work).await.map_err(|e| AccountError::Hash(e.to_string()))
    }

    /// H13: registration through the client API (not `peekgate user create`) is rate-limited.
    pub fn check_registration_rate(&self) -> Result<(), AccountError> {
        self.registrations.check().map_err(limited)
    }

    /// Whether the user exists (has an account here).
    pub async fn exists(&self, user_id: &UserId) -> Result<bool, AccountError> {
        let user_id = user_id.to_string();
        self.db
            .run(move |conn| {
                let found = users::table.find(&user_id).select(users::user_id).first::<String>(conn).optional()?;
                Ok(found.is_some())
            })
            .await
    }

    /// Creates a user; fails with `UserInUse` when the ID exists.
    pub async fn create_user(&self, user_id: &UserId, password: &str, admin: bool) -> Result<(), AccountError> {
        let user_id = user_id.to_string();
        let password = password.to_owned();
        let hash = self.with_hashing(move || hash_password(&password)).await??;
        self.db
            .run(move |conn| {
                let inserted = on_backend!(&mut *conn, |c| diesel::insert_into(users::table)
                    .values((
                        users::user_id.eq(&user_id),
                        users::password_hash.eq(&hash),
                        users::is_admin.eq(admin),
                        users::created_ts.eq(now_ms()),
                    ))
                    .on_conflict_do_nothing()
                    .execute(c))?;
                if inserted == 0 {
                    return Err(AccountError::UserInUse);
                }
                Ok(())
            })
            .await
    }

    /// Checks the password and opens a new session on a (new or given) device.
    pub async fn login(
        &self,
        user_id: &UserId,
        password: &str,
        device_id: Option<String>,
        display_name: Option<String>,
    ) -> Result<Login, AccountError> {
        crate::limits::check_key(&self.login_attempts, &user_id.to_string()).map_err(limited)?;
        let stored: Option<String> = {
            let user_id = user_id.to_string();
            self.db
                .run(move |conn| {
                    Ok::<_, AccountError>(
                        users::table
                            .filter(users::user_id.eq(&user_id))
                            .select(users::password_hash)
                            .first(conn)
                            .optional()?,
                    )
                })
                .await?
        };
        let password = password.to_owned();
        let known = stored.is_some();
        // The decoy is made (once) on the blocking thread too: it is an argon2 run as well.
        let matches = self
            .with_hashing(move || password_matches(&password, stored.as_deref().unwrap_or_else(|| decoy_hash())))
            .await?;
        if !(known && matches) {
            return Err(AccountError::BadCredentials);
        }
        self.open_session(user_id, device_id, display_name).await
    }

    /// A new access token for `user_id` on `device_id` (created when new).
    pub async fn open_session(
        &self,
        user_id: &UserId,
        device_id: Option<String>,
        display_name: Option<String>,
    ) -> Result<Login, AccountError> {
        let device_id = device_id.unwrap_or_else(|| Alphanumeric.sample_string(&mut rand::rng(), 10).to_uppercase());
        let access_token = format!("pgt_{}", Alphanumeric.sample_string(&mut rand::rng(), 40));
        let (uid, did, token_hash) = (user_id.to_string(), device_id.clone(), hash_token(&access_token));
        self.db
            .run(move |conn| {
                let now = now_ms();
                on_backend!(&mut *conn, |c| diesel::insert_into(devices::table)
                    .values((
                        devices::user_id.eq(&uid),
                        devices::device_id.eq(&did),
                        devices::display_name.eq(&display_name),
                        devices::created_ts.eq(now),
                    ))
                    .on_conflict_do_nothing()
                    .execute(c))?;
                diesel::insert_into(access_tokens::table)
                    .values((
                        access_tokens::token_hash.eq(&token_hash),
                        access_tokens::user_id.eq(&uid),
                        access_tokens::device_id.eq(&did),
                        access_tokens::created_ts.eq(now),
                    ))
                    .execute(conn)?;
                Ok::<_, AccountError>(())
            })
            .await?;
        Ok(Login { user_id: user_id.to_owned(), device_id, access_token })
    }

    pub async fn authenticate(&self, token: &str) -> Result<Session, AccountError> {
        let token_hash = hash_token(token);
        self.db
            .run(move |conn| {
                let row: Option<(String, String, bool)> = access_tokens::table
                    .inner_join(users::table.on(users::user_id.eq(access_tokens::user_id)))
                    .filter(access_tokens::token_hash.eq(&token_hash))
                    .select((access_tokens::user_id, access_tokens::device_id, users::is_admin))
                    .first(conn)
                    .optional()?;
                let (user_id, device_id, is_admin) = row.ok_or(AccountError::UnknownToken)?;
                let user_id = UserId::parse(user_id).map_err(|_| AccountError::UnknownToken)?;
                Ok(Session { user_id, device_id, token_hash, is_admin })
            })
            .await
    }

    pub async fn logout(&self, session: &Session) -> Result<(), AccountError> {
        let token_hash = session.token_hash.clone();
        self.db
            .run(move |conn| {
                diesel::delete(access_tokens::table.filter(access_tokens::token_hash.eq(&token_hash))).execute(conn)?;
                Ok::<_, AccountError>(())
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn localparts() {
        let server = <&ServerName>::try_from("a.test").unwrap();
        assert!(validate_localpart("alice.b_c-1", server).is_ok());
        for bad in ["", "Alice", "al ice", "al:ice", "ä"] {
            assert!(validate_localpart(bad, server).is_err(), "{bad:?}");
        }
        assert!(validate_localpart(&"a".repeat(260), server).is_err());
    }

    #[test]
    fn passwords_hash_and_verify() {
        let hash = hash_password("correct horse").unwrap();
        assert!(password_matches("correct horse", &hash));
        assert!(!password_matches("wrong", &hash));
    }
}
