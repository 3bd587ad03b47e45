//! The text encodings of keys: unpadded base64 and key versions.

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD_NO_PAD};
use base64::engine::DecodePaddingMode;
use base64::Engine;

/// Standard alphabet, decoding padded or unpadded input (the spec says decoders should accept
/// both) and ignoring non-zero trailing bits, which real keys have: the spec's own test seed
/// `...XA1` ends in one.
const LENIENT_STANDARD: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// Unpadded standard base64, as Matrix uses for keys, hashes and signatures.
pub fn encode_base64(bytes: &[u8]) -> String {
    STANDARD_NO_PAD.encode(bytes)
}

pub fn decode_base64(text: &str) -> Option<Vec<u8>> {
    LENIENT_STANDARD.decode(text).ok()
}

/// A key "version" (the part after `ed25519:`) is `[a-zA-Z0-9_]+`.
pub fn is_valid_key_version(version: &str) -> bool {
    !version.is_empty() && version.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_accepts_padded_and_unpadded() {
        assert_eq!(decode_base64("YQ").unwrap(), b"a");
        assert_eq!(decode_base64("YQ==").unwrap(), b"a");
        assert_eq!(encode_base64(b"a"), "YQ");
        assert!(decode_base64("!!").is_none());
    }

    #[test]
    fn key_versions() {
        assert!(is_valid_key_version("a_1Bc"));
        assert!(!is_valid_key_version(""));
        assert!(!is_valid_key_version("a-b"));
    }
}
