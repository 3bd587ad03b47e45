//! `Authorization: X-Matrix` (server-server API, "Request Authentication"): one signer for our
//! outbound requests and one verifier for inbound ones. Both assemble the signed object as
//! canonical JSON text around a body that is already canonical, so a body is serialised once
//! however many destinations it is signed for, and once however many headers a request carries.
//!
//! The HTTP edge (`federation::auth`) reads and limits the body, calls [`verify`], and maps an
//! [`AuthFailure`] to a Matrix error; this module knows nothing of actix or of the app's state.

use ed25519_dalek::ed25519::signature::MultipartVerifier;
use ed25519_dalek::{Signature, SignatureError, VerifyingKey};
use ruma::api::federation::authentication::XMatrix;
use ruma::{OwnedServerName, ServerName, SigningKeyAlgorithm};

use crate::keys::signing::{PrefixSigner, SigningKey};

/// At most this many `Authorization` headers are tried (one per key of the origin); the rest
/// are ignored, so a request cannot buy unbounded key fetches and signature checks.
pub const MAX_HEADERS: usize = 4;

/// The signed object (never sent) as canonical JSON text: `content` (only when the request has
/// a body, already canonical), `destination`, `method`, `origin` and `uri`, in that key order.
/// Kept in pieces around the borrowed body, so that a verifier hashes a large body where it
/// lies instead of copying it into one string first.
struct SignedText<'a> {
    /// `{"content":` before a body, `{` without one.
    opening: &'static str,
    content: &'a str,
    /// From `destination` (after a `,` when there is a body) to the closing brace.
    rest: String,
}

impl<'a> SignedText<'a> {
    fn new(method: &str, uri: &str, origin: &str, destination: &str, canonical_content: Option<&'a str>) -> Self {
        let quote = |s: &str| serde_json::to_string(s).expect("strings serialise");
        let (opening, content, comma) = match canonical_content {
            Some(content) => ("{\"content\":", content, ","),
            None => ("{", "", ""),
        };
        let rest = format!(
            "{comma}\"destination\":{},\"method\":{},\"origin\":{},\"uri\":{}}}",
            quote(destination),
            quote(method),
            quote(origin),
            quote(uri)
        );
        SignedText { opening, content, rest }
    }

    fn pieces(&self) -> [&[u8]; 3] {
        [self.opening.as_bytes(), self.content.as_bytes(), self.rest.as_bytes()]
    }
}

fn signed_text(method: &str, uri: &str, origin: &str, destination: &str, canonical_content: Option<&str>) -> String {
    let text = SignedText::new(method, uri, origin, destination, canonical_content);
    [text.opening, text.content, &text.rest].concat()
}

/// The `Authorization` header value for an outbound request whose body, if any, is
/// `canonical_content` (canonical JSON text).
pub fn authorization_header(
    key: &SigningKey,
    origin: &str,
    destination: &str,
    method: &str,
    uri: &str,
    canonical_content: Option<&str>,
) -> String {
    let sig = key.sign_bytes(signed_text(method, uri, origin, destination, canonical_content).as_bytes());
    header_value(origin, destination, &key.key_id(), &sig)
}

/// The header value around a signature: one layout for single and shared-body headers.
fn header_value(origin: &str, destination: &str, key_id: &str, sig: &str) -> String {
    format!("X-Matrix origin=\"{origin}\",destination=\"{destination}\",key=\"{key_id}\",sig=\"{sig}\"")
}

/// The X-Matrix headers of one request (method, URI and canonical body) for many destinations:
/// the fan-out's `/send`. The signed text puts `content` first and `destination` right after it,
/// so everything before the destination is hashed once (see [`PrefixSigner`]); the headers are
/// the ones [`authorization_header`] makes.
pub struct SharedBodyAuthorization {
    signer: PrefixSigner,
    /// The signed text after the destination.
    tail: String,
    origin: String,
    key_id: String,
}

impl SharedBodyAuthorization {
    pub fn new(key: &SigningKey, origin: &str, method: &str, uri: &str, canonical_content: &str) -> Self {
        let quote = |s: &str| serde_json::to_string(s).expect("strings serialise");
        let prefix = format!("{{\"content\":{canonical_content},\"destination\":");
        SharedBodyAuthorization {
            signer: key.prefix_signer(prefix.into_bytes()),
            tail: format!(",\"method\":{},\"origin\":{},\"uri\":{}}}", quote(method), quote(origin), quote(uri)),
            origin: origin.to_owned(),
            key_id: key.key_id(),
        }
    }

    /// The `Authorization` header value for `destination`.
    pub fn header(&self, destination: &str) -> String {
        self.headers(&[destination]).pop().expect("one header per destination")
    }

    /// The `Authorization` header values for `destinations`, in order, signed together
    /// (see [`PrefixSigner::sign_many`]).
    pub fn headers<D: AsRef<str>>(&self, destinations: &[D]) -> Vec<String> {
        let suffixes: Vec<Vec<u8>> = destinations
            .iter()
            .map(|destination| {
                let quoted = serde_json::to_string(destination.as_ref()).expect("strings serialise");
                format!("{quoted}{}", self.tail).into_bytes()
            })
            .collect();
        let suffixes: Vec<&[u8]> = suffixes.iter().map(Vec::as_slice).collect();
        let signatures = self.signer.sign_many(&suffixes);
        destinations
            .iter()
            .zip(signatures)
            .map(|(destination, sig)| header_value(&self.origin, destination.as_ref(), &self.key_id, &sig))
            .collect()
    }
}

/// Why an inbound request failed authentication; the label of
/// `peekgate_xmatrix_auth_failures_total{reason}` (a closed set, so bounded cardinality).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    MissingHeader,
    MalformedHeader,
    OwnOrigin,
    WrongDestination,
    UnknownAlgorithm,
    KeyUnavailable,
    BadSignature,
    BodyTooLarge,
}

impl AuthFailure {
    pub const ALL: [AuthFailure; 8] = [
        AuthFailure::MissingHeader,
        AuthFailure::MalformedHeader,
        AuthFailure::OwnOrigin,
        AuthFailure::WrongDestination,
        AuthFailure::UnknownAlgorithm,
        AuthFailure::KeyUnavailable,
        AuthFailure::BadSignature,
        AuthFailure::BodyTooLarge,
    ];

    pub fn label(self) -> &'static str {
        match self {
            AuthFailure::MissingHeader => "missing_header",
            AuthFailure::MalformedHeader => "malformed_header",
            AuthFailure::OwnOrigin => "own_origin",
            AuthFailure::WrongDestination => "wrong_destination",
            AuthFailure::UnknownAlgorithm => "unknown_algorithm",
            AuthFailure::KeyUnavailable => "key_unavailable",
            AuthFailure::BadSignature => "bad_signature",
            AuthFailure::BodyTooLarge => "body_too_large",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            AuthFailure::MissingHeader => "Missing X-Matrix Authorization header",
            AuthFailure::MalformedHeader => "Malformed X-Matrix Authorization header",
            AuthFailure::OwnOrigin => "Requests may not claim to come from this server",
            AuthFailure::WrongDestination => "X-Matrix destination is not this server",
            AuthFailure::UnknownAlgorithm => "Unsupported signing key algorithm",
            AuthFailure::KeyUnavailable => "Cannot find a valid key for the origin",
            AuthFailure::BadSignature => "Invalid X-Matrix signature",
            AuthFailure::BodyTooLarge => "Request body exceeds the limit",
        }
    }
}

/// Where the verifier gets an origin's public key: a key that is valid *now* (request
/// authentication never accepts an expired key). `keys::RemoteKeys` is the real one; the trait
/// keeps this module below the key service, which signs its own fetches with [`authorization_header`].
#[async_trait::async_trait]
pub trait RequestKeys: Sync {
    async fn request_key(&self, server: &ServerName, key_id: &str) -> Result<VerifyingKey, String>;
}

/// A request to authenticate: what the signature covers.
pub struct Inbound<'a> {
    pub method: &'a str,
    /// The raw path and query, as sent.
    pub uri: &'a str,
    /// The body as canonical JSON text, when there is one.
    pub canonical_content: Option<&'a str>,
}

/// Why one header failed, with the origin it claimed (when it could be read) and a detail for
/// the log.
pub type HeaderFailure = (AuthFailure, Option<String>, String);

/// Authenticates a request: the first of at most [`MAX_HEADERS`] X-Matrix headers that
/// verifies names the origin. `ours` is our server name (the required `destination`).
pub async fn verify(
    keys: &dyn RequestKeys,
    ours: &str,
    headers: &[&str],
    request: &Inbound<'_>,
) -> Result<OwnedServerName, HeaderFailure> {
    let mut last = (AuthFailure::MissingHeader, None, String::new());
    for header in headers.iter().take(MAX_HEADERS) {
        match verify_header(keys, ours, header, request).await {
            Ok(origin) => return Ok(origin),
            Err(failure) => last = failure,
        }
    }
    Err(last)
}

async fn verify_header(
    keys: &dyn RequestKeys,
    ours: &str,
    header: &str,
    request: &Inbound<'_>,
) -> Result<OwnedServerName, HeaderFailure> {
    let x = XMatrix::parse(header).map_err(|e| (AuthFailure::MalformedHeader, None, e.to_string()))?;
    let origin = x.origin.to_string();
    let with_origin = |f: AuthFailure, detail: String| (f, Some(origin.clone()), detail);
    if origin == ours {
        return Err(with_origin(AuthFailure::OwnOrigin, String::new()));
    }
    if let Some(destination) = &x.destination {
        if destination.as_str() != ours {
            return Err(with_origin(AuthFailure::WrongDestination, destination.to_string()));
        }
    }
    if x.key.algorithm() != SigningKeyAlgorithm::Ed25519 {
        return Err(with_origin(AuthFailure::UnknownAlgorithm, x.key.to_string()));
    }
    // Only a key that is current now authenticates a request (H17); old keys verify events only.
    let public_key =
        keys.request_key(&x.origin, x.key.as_str()).await.map_err(|e| with_origin(AuthFailure::KeyUnavailable, e))?;
    let signed = SignedText::new(request.method, request.uri, &origin, ours, request.canonical_content);
    verify_signature(&public_key, x.sig.as_bytes(), &signed)
        .map_err(|e| with_origin(AuthFailure::BadSignature, e.to_string()))?;
    Ok(x.origin)
}

/// Ed25519 verification (ed25519-dalek's `verify`, as ruma's verifier uses) over the signed
/// text's pieces, hashed one after the other.
fn verify_signature(public_key: &VerifyingKey, sig: &[u8], signed: &SignedText<'_>) -> Result<(), SignatureError> {
    let signature = Signature::from_slice(sig)?;
    public_key.multipart_verify(&signed.pieces(), &signature)
}

#[cfg(test)]
mod tests {
    use ruma::signatures::to_canonical_json_string_for_signing;
    use ruma::{CanonicalJsonObject, CanonicalJsonValue};

    use super::*;

    /// The text assembly must equal what ruma's canonical JSON makes of the same object.
    #[test]
    fn signed_text_is_the_canonical_request_object() {
        let body = serde_json::json!({ "origin": "a.test", "pdus": [{ "b": "x\"y", "a": 1 }], "edus": [] });
        let canonical = CanonicalJsonValue::try_from(body).unwrap();
        let text = crate::canonical_json::encode(&canonical);
        let mut object = CanonicalJsonObject::new();
        for (k, v) in [
            ("method", "PUT"),
            ("uri", "/_matrix/federation/v1/send/1-2?x=\u{e9}"),
            ("origin", "a.test"),
            ("destination", "b.test:8448"),
        ] {
            object.insert(k.into(), CanonicalJsonValue::String(v.into()));
        }
        let without_body = to_canonical_json_string_for_signing(&object).unwrap();
        object.insert("content".into(), canonical);
        let with_body = to_canonical_json_string_for_signing(&object).unwrap();
        let uri = "/_matrix/federation/v1/send/1-2?x=\u{e9}";
        assert_eq!(signed_text("PUT", uri, "a.test", "b.test:8448", Some(&text)), with_body);
        assert_eq!(signed_text("PUT", uri, "a.test", "b.test:8448", None), without_body);
    }

    /// The verifier hashes the signed text in pieces: it accepts what was signed over the whole
    /// text, as ruma's verifier does, and refuses a signature over another text or a changed one.
    #[test]
    fn verification_in_pieces_agrees_with_the_whole_text() {
        let key = SigningKey::generate();
        let public = VerifyingKey::from_bytes(&key.public_key()).unwrap();
        let uri = "/_matrix/federation/v1/send/1-2";
        for content in [Some(r#"{"pdus":[{"b":"x\"y"}]}"#), None] {
            let whole = signed_text("PUT", uri, "a.test", "b.test", content);
            let sig = crate::keys::encoding::decode_base64(&key.sign_bytes(whole.as_bytes())).unwrap();
            let ruma_verifies = |text: &str, sig: &[u8]| {
                ruma::signatures::verify_canonical_json_bytes(
                    &SigningKeyAlgorithm::Ed25519,
                    &key.public_key(),
                    sig,
                    text.as_bytes(),
                )
                .is_ok()
            };
            let text = SignedText::new("PUT", uri, "a.test", "b.test", content);
            assert!(verify_signature(&public, &sig, &text).is_ok());
            assert!(ruma_verifies(&whole, &sig));
            let elsewhere = SignedText::new("PUT", uri, "a.test", "c.test", content);
            assert!(verify_signature(&public, &sig, &elsewhere).is_err());
            assert!(!ruma_verifies(&signed_text("PUT", uri, "a.test", "c.test", content), &sig));
            let mut changed = sig.clone();
            changed[40] ^= 1;
            assert!(verify_signature(&public, &changed, &text).is_err());
            assert!(!ruma_verifies(&whole, &changed));
            assert!(verify_signature(&public, &sig[..63], &text).is_err());
        }
    }

    /// One body's headers for many destinations are the headers signed one by one, and verify.
    #[test]
    fn shared_body_headers_are_the_single_headers() {
        let key = SigningKey::generate();
        let body = r#"{"edus":[],"origin":"a.test","pdus":[{"content":{"body":"h\u00e9 \"x\""}}]}"#;
        let uri = "/_matrix/federation/v1/send/17-3";
        let shared = SharedBodyAuthorization::new(&key, "a.test", "PUT", uri, body);
        let destinations = ["b.test", "d0.bench:8448", "[::1]:8448"];
        let together = shared.headers(&destinations);
        for (destination, batched) in destinations.into_iter().zip(together) {
            let header = shared.header(destination);
            assert_eq!(batched, header);
            assert_eq!(header, authorization_header(&key, "a.test", destination, "PUT", uri, Some(body)));
            let sig = header.rsplit("sig=\"").next().unwrap().trim_end_matches('"');
            let text = signed_text("PUT", uri, "a.test", destination, Some(body));
            ruma::signatures::verify_canonical_json_bytes(
                &ruma::SigningKeyAlgorithm::Ed25519,
                &key.public_key(),
                &crate::keys::encoding::decode_base64(sig).unwrap(),
                text.as_bytes(),
            )
            .unwrap();
        }
    }
}
