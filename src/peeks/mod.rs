//! Peeks: inbound (MSC2444, other servers peek our rooms), outbound (we peek rooms of other
//! servers), and the peeks of local devices (MSC2753) that outbound peeks serve.

pub mod devices;
pub mod inbound;
pub mod local;
pub mod outbound;

/// A validated peek ID (FP-4): 1-8 characters of `[0-9a-zA-Z.=_-]`, or, with the lenient
/// interop switch on, any 1-255 bytes of printable ASCII (Dendrite sends room IDs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeekId(String);

impl PeekId {
    pub fn parse(raw: &str, lenient: bool) -> Option<PeekId> {
        let strict = (1..=8).contains(&raw.len())
            && raw.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'=' | b'_' | b'-'));
        let loose = lenient && (1..=255).contains(&raw.len()) && raw.bytes().all(|b| (0x21..=0x7e).contains(&b));
        (strict || loose).then(|| PeekId(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::PeekId;

    #[test]
    fn fp4_peek_id_charset_and_length() {
        assert!(PeekId::parse("a.b=c_d-", false).is_some());
        assert!(PeekId::parse("12345678", false).is_some());
        for bad in ["", "123456789", "abc!", "ab:c", "é", "a b"] {
            assert!(PeekId::parse(bad, false).is_none(), "{bad:?}");
        }
        assert!(PeekId::parse("!room:server.example", true).is_some());
        assert!(PeekId::parse("a b", true).is_none());
    }
}
