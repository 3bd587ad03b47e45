//! Our own ed25519 signing key: Synapse's key-file format (`ed25519 <version> <seed>`), created
//! on first start, and the self-signed `/_matrix/key/v2/server` publication.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use curve25519_dalek::{EdwardsPoint, Scalar};
use ed25519_dalek::hazmat::ExpandedSecretKey;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use rand::distr::{Alphanumeric, SampleString};
use ruma::signatures::{Ed25519KeyPair, KeyPair};
use ruma::{CanonicalJsonObject, CanonicalJsonValue, Int};
use sha2::{Digest, Sha512};

use super::encoding::{decode_base64, encode_base64, is_valid_key_version};
use super::parallel_sha512::sha512_each;
use crate::config::OldKeyConfig;

#[derive(Debug, thiserror::Error)]
pub enum SigningKeyError {
    #[error("key file {0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    #[error("key file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("key file {path}: {reason}")]
    Malformed { path: PathBuf, reason: String },
}

/// Our signing key. Holds the ruma key pair used for every signature we make.
pub struct SigningKey {
    version: String,
    seed: [u8; 32],
    pair: Ed25519KeyPair,
    public_key: [u8; 32],
}

impl std::fmt::Debug for SigningKey {
    // Never print the seed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("key_id", &self.key_id()).finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A fresh key with a random Synapse-style version (`a_` + 4 characters).
    pub fn generate() -> SigningKey {
        let mut seed = [0u8; 32];
        rand::fill(&mut seed);
        let version = format!("a_{}", Alphanumeric.sample_string(&mut rand::rng(), 4));
        SigningKey::from_seed(&version, seed)
    }

    /// Builds the key from its 32-byte seed; `version` must be `[a-zA-Z0-9_]+`.
    pub fn from_seed(version: &str, seed: [u8; 32]) -> SigningKey {
        let dalek = ed25519_dalek::SigningKey::from_bytes(&seed);
        let der = dalek.to_pkcs8_der().expect("an ed25519 key always encodes as PKCS#8");
        let pair = Ed25519KeyPair::from_der(der.as_bytes(), version.to_owned())
            .expect("PKCS#8 from ed25519-dalek is accepted by ruma");
        SigningKey { version: version.to_owned(), seed, public_key: dalek.verifying_key().to_bytes(), pair }
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    /// `ed25519:<version>`
    pub fn key_id(&self) -> String {
        format!("ed25519:{}", self.version)
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.public_key
    }

    pub fn public_key_base64(&self) -> String {
        encode_base64(&self.public_key)
    }

    pub fn pair(&self) -> &Ed25519KeyPair {
        &self.pair
    }

    /// Signs raw bytes (already canonical JSON) and returns the unpadded base64 signature.
    pub fn sign_bytes(&self, bytes: &[u8]) -> String {
        encode_base64(self.pair.sign(bytes).as_bytes())
    }

    /// A signer for messages that all begin with `prefix`; see [`PrefixSigner`].
    pub fn prefix_signer(&self, prefix: Vec<u8>) -> PrefixSigner {
        let expanded = ExpandedSecretKey::from(&self.seed);
        let mut nonce_start = Sha512::new();
        nonce_start.update(expanded.hash_prefix);
        nonce_start.update(&prefix);
        PrefixSigner { expanded, public_key: self.public_key, prefix, nonce_start }
    }

    /// Adds our signature to `object` under `signatures[server_name][key_id]` (Signing JSON).
    pub fn sign_json(&self, server_name: &str, object: &mut CanonicalJsonObject) {
        ruma::signatures::sign_json(server_name, &self.pair, object)
            .expect("signing a canonical JSON object cannot fail");
    }

    /// The key file line, Synapse's format.
    pub fn to_file_contents(&self) -> String {
        format!("ed25519 {} {}\n", self.version, encode_base64(&self.seed))
    }

    /// Parses a key file; the first `ed25519` line is our current key.
    pub fn parse(path: &Path, contents: &str) -> Result<SigningKey, SigningKeyError> {
        let malformed = |reason: &str| SigningKeyError::Malformed { path: path.to_owned(), reason: reason.to_owned() };
        let line =
            contents.lines().map(str::trim).find(|l| !l.is_empty()).ok_or_else(|| malformed("the file is empty"))?;
        let mut parts = line.split_whitespace();
        let (Some(alg), Some(version), Some(seed), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed("expected `ed25519 <version> <base64 seed>`"));
        };
        if alg != "ed25519" {
            return Err(malformed("only ed25519 keys are supported"));
        }
        if !is_valid_key_version(version) {
            return Err(malformed("the key version must be [a-zA-Z0-9_]+"));
        }
        let seed: [u8; 32] = decode_base64(seed)
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| malformed("the seed is not 32 bytes of base64"))?;
        Ok(SigningKey::from_seed(version, seed))
    }

    pub fn load(path: &Path) -> Result<SigningKey, SigningKeyError> {
        let contents =
            std::fs::read_to_string(path).map_err(|source| SigningKeyError::Io { path: path.to_owned(), source })?;
        SigningKey::parse(path, &contents)
    }

    /// Writes a new key to `path` with mode 0600; refuses to overwrite an existing file.
    pub fn write_new(path: &Path) -> Result<SigningKey, SigningKeyError> {
        let io = |source| SigningKeyError::Io { path: path.to_owned(), source };
        if path.exists() {
            return Err(SigningKeyError::Exists(path.to_owned()));
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let key = SigningKey::generate();
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                SigningKeyError::Exists(path.to_owned())
            } else {
                io(e)
            }
        })?;
        file.write_all(key.to_file_contents().as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(key)
    }

    /// `serve` start-up: load the key, or create it when the file does not exist yet.
    pub fn load_or_generate(path: &Path) -> Result<(SigningKey, bool), SigningKeyError> {
        if path.exists() {
            Ok((SigningKey::load(path)?, false))
        } else {
            Ok((SigningKey::write_new(path)?, true))
        }
    }

    /// Our `/_matrix/key/v2/server` body, self-signed.
    pub fn publication(
        &self,
        server_name: &str,
        valid_until_ts: i64,
        old_keys: &[OldKeyConfig],
    ) -> CanonicalJsonObject {
        let mut verify_keys = CanonicalJsonObject::new();
        verify_keys.insert(self.key_id(), key_object(self.public_key_base64(), None));
        let mut old_verify_keys = CanonicalJsonObject::new();
        for old in old_keys {
            old_verify_keys.insert(old.key_id.clone(), key_object(old.public_key.clone(), Some(old.expired_ts as i64)));
        }
        let mut object = CanonicalJsonObject::new();
        object.insert("server_name".into(), CanonicalJsonValue::String(server_name.into()));
        object.insert("verify_keys".into(), CanonicalJsonValue::Object(verify_keys));
        object.insert("old_verify_keys".into(), CanonicalJsonValue::Object(old_verify_keys));
        object.insert("valid_until_ts".into(), CanonicalJsonValue::Integer(Int::new_saturating(valid_until_ts)));
        self.sign_json(server_name, &mut object);
        object
    }
}

/// Signs many messages that begin with the same bytes: one `/send` body signed for each of a
/// thousand destinations, whose X-Matrix text differs only after the body.
///
/// Ed25519 (RFC 8032 §5.1.6) hashes the message twice: after the key's secret hash prefix, for
/// the nonce `r`, and after `R` and the public key, for the challenge `k`. The nonce hash over
/// the shared prefix is computed once here and continued per message; the challenge hash starts
/// with `R`, which differs per message, so it covers the whole message each time. That halves
/// the hashing of a large body, and the challenge hashes of a batch are computed several at a time
/// ([`super::parallel_sha512`]). The signatures are the ones ed25519-dalek makes for the whole
/// message (Ed25519 is deterministic; the tests compare them byte for byte).
///
/// The prefix is owned and fixed at creation: a nonce computed over one prefix and a challenge
/// over another would be two signatures with the same `r`, which reveals the key.
pub struct PrefixSigner {
    expanded: ExpandedSecretKey,
    public_key: [u8; 32],
    prefix: Vec<u8>,
    /// SHA-512 after the key's hash prefix and `prefix`: the start of every nonce hash.
    nonce_start: Sha512,
}

impl PrefixSigner {
    /// The unpadded base64 Ed25519 signatures of `prefix || suffix` for each suffix, in order.
    ///
    /// Signing many at once saves the most expensive step after the scalar multiplication:
    /// turning each nonce point `R` into its 32-byte form needs a field inversion (about a
    /// fifth of a signature here), and one batch inversion (Montgomery's trick, constant time)
    /// serves them all. With a thousand destinations per body that is ~3.5 µs per signature.
    pub fn sign_many(&self, suffixes: &[&[u8]]) -> Vec<String> {
        let nonces: Vec<Scalar> = suffixes
            .iter()
            .map(|suffix| {
                let mut nonce = self.nonce_start.clone();
                nonce.update(suffix);
                Scalar::from_hash(nonce)
            })
            .collect();
        let points: Vec<EdwardsPoint> = nonces.iter().map(EdwardsPoint::mul_base).collect();
        let big_rs = EdwardsPoint::compress_batch_alloc(&points);
        let challenge_messages: Vec<[&[u8]; 4]> = suffixes
            .iter()
            .zip(&big_rs)
            .map(|(suffix, big_r)| [big_r.as_bytes(), &self.public_key[..], &self.prefix[..], suffix])
            .collect();
        let challenges = sha512_each(&challenge_messages);
        nonces
            .iter()
            .zip(big_rs.iter().zip(&challenges))
            .map(|(r, (big_r, challenge))| {
                let s = Scalar::from_bytes_mod_order_wide(challenge) * self.expanded.scalar + r;
                let mut signature = [0u8; 64];
                signature[..32].copy_from_slice(big_r.as_bytes());
                signature[32..].copy_from_slice(s.as_bytes());
                encode_base64(&signature)
            })
            .collect()
    }
}

fn key_object(public_key: String, expired_ts: Option<i64>) -> CanonicalJsonValue {
    let mut key = CanonicalJsonObject::new();
    key.insert("key".into(), CanonicalJsonValue::String(public_key));
    if let Some(ts) = expired_ts {
        key.insert("expired_ts".into(), CanonicalJsonValue::Integer(Int::new_saturating(ts)));
    }
    CanonicalJsonValue::Object(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_round_trip() {
        let key = SigningKey::generate();
        let parsed = SigningKey::parse(Path::new("k"), &key.to_file_contents()).unwrap();
        assert_eq!(parsed.key_id(), key.key_id());
        assert_eq!(parsed.public_key(), key.public_key());
        assert!(key.version().starts_with("a_"));
    }

    /// The prefix signer makes ed25519-dalek's own signatures (Ed25519 is deterministic), alone
    /// and in batches, for empty, short and multi-block prefixes and suffixes, with several keys.
    #[test]
    fn prefix_signatures_are_the_plain_signatures() {
        for seed in [[0u8; 32], [7u8; 32], rand::random()] {
            let key = SigningKey::from_seed("k", seed);
            for prefix_len in [0usize, 1, 111, 112, 127, 128, 129, 1_000, 5_000] {
                let prefix: Vec<u8> = (0..prefix_len).map(|i| (i * 31 + 7) as u8).collect();
                let signer = key.prefix_signer(prefix.clone());
                let suffixes = [&b""[..], b"x", b"\"d0.bench\",\"method\":\"PUT\"}", &[0xa5; 300][..]];
                let together = signer.sign_many(&suffixes);
                assert_eq!(together.len(), suffixes.len());
                for (suffix, batched) in suffixes.iter().zip(&together) {
                    let whole = [prefix.as_slice(), suffix].concat();
                    let plain = key.sign_bytes(&whole);
                    let alone = signer.sign_many(&[suffix]).pop().unwrap();
                    assert_eq!(alone, plain, "prefix {prefix_len}, suffix {}", suffix.len());
                    assert_eq!(*batched, plain, "batched: prefix {prefix_len}, suffix {}", suffix.len());
                }
            }
        }
    }

    #[test]
    fn malformed_files_are_refused() {
        for bad in ["", "rsa a_1 AAAA", "ed25519 a-1 AAAA", "ed25519 a_1 AAAA", "ed25519 a_1"] {
            assert!(SigningKey::parse(Path::new("k"), bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn write_new_refuses_to_overwrite_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/signing.key");
        SigningKey::write_new(&path).unwrap();
        assert!(matches!(SigningKey::write_new(&path), Err(SigningKeyError::Exists(_))));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
