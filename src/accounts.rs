//! Local accounts: users (argon2 password hashes), devices and access tokens. Only a SHA-256 of
//! each token is stored, so a database leak does not leak sessions.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use diesel::prelude::*;
use rand::distr::{Alphanumeric, SampleString};
use ruma::{OwnedUserId, ServerName, UserId};
use sha2::{Digest, Sha256};

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

pub struct Accounts {
    db: Db,
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

impl Accounts {
    pub fn new(db: Db) -> Accounts {
        Accounts { db }
    }

    /// Creates a user; fails with `UserInUse` when the ID exists.
    pub async fn create_user(&self, user_id: &UserId, password: &str, admin: bool) -> Result<(), AccountError> {
        let user_id = user_id.to_string();
        let password = password.to_owned();
        self.db
            .run(move |conn| {
                let hash = hash_password(&password)?;
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
        let ok = tokio::task::spawn_blocking(move || stored.is_some_and(|hash| password_matches(&password, &hash)))
            .await
            .unwrap_or(false);
        if !ok {
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
