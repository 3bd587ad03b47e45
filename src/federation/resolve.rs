//! Server-name resolution (server-server API "Resolving server names"): IP literals, explicit
//! ports, `.well-known/matrix/server` delegation, SRV (`_matrix-fed._tcp`, then the deprecated
//! `_matrix._tcp`) and the port-8448 fallback. Every address we would connect to passes the
//! [`AddressPolicy`] first, so a remote name can never point us at our own network.
//!
//! DNS and the well-known fetch are traits so tests can inject them (these machines have no DNS).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ipnet::IpNet;
use ruma::ServerName;

const DEFAULT_PORT: u16 = 8448;
const WELL_KNOWN_TTL: Duration = Duration::from_secs(24 * 3600);
const WELL_KNOWN_FAILURE_TTL: Duration = Duration::from_secs(3600);
/// `.well-known` answers kept at most (H14).
pub const WELL_KNOWN_CACHE_MAX: usize = 10_000;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    #[error("no address found for {0}")]
    NoAddress(String),
    #[error("address {0} is in a range outbound federation may not reach")]
    Refused(IpAddr),
    #[error("DNS lookup of {name} failed: {reason}")]
    Dns { name: String, reason: String },
    #[error("invalid delegated server name {0:?}")]
    BadDelegation(String),
}

/// Where to send requests for a server name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedServer {
    /// The host in the URL: the name the TLS certificate must be valid for (or an IP literal).
    pub url_host: String,
    pub port: u16,
    /// The `Host` header to send.
    pub host_header: String,
    /// Addresses to connect to, already checked against the policy.
    pub addrs: Vec<IpAddr>,
}

/// A target from an SRV record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrvTarget {
    pub host: String,
    pub port: u16,
}

#[async_trait]
pub trait Dns: Send + Sync {
    async fn srv(&self, name: &str) -> Result<Vec<SrvTarget>, ResolveError>;
    async fn ips(&self, host: &str) -> Result<Vec<IpAddr>, ResolveError>;
}

/// Fetches `https://<host>/.well-known/matrix/server` and returns its `m.server`, if valid.
#[async_trait]
pub trait WellKnownFetcher: Send + Sync {
    async fn fetch_well_known(&self, host: &str) -> Option<String>;
}

/// Which remote addresses outbound federation may connect to.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    pub allow_private: bool,
    pub allowed: Vec<IpNet>,
}

impl AddressPolicy {
    pub fn permits(&self, ip: IpAddr) -> bool {
        self.allow_private || self.allowed.iter().any(|net| net.contains(&ip)) || !is_internal(ip)
    }

    pub fn check(&self, ip: IpAddr) -> Result<IpAddr, ResolveError> {
        if self.permits(ip) {
            Ok(ip)
        } else {
            Err(ResolveError::Refused(ip))
        }
    }
}

/// Loopback, private, link-local, shared (CGNAT), IETF-protocol (192.0.0.0/24), benchmarking
/// (198.18.0.0/15), reserved (240.0.0.0/4), unique-local, site-local, unspecified, multicast
/// and broadcast addresses. IPv6 addresses that carry an IPv4 address (IPv4-mapped,
/// IPv4-compatible `::a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) are judged by it too.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10
                || o[0] == 0
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0.0/24
                || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18.0.0/15
                || o[0] >= 240 // 240.0.0.0/4
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = embedded_ipv4(v6) {
                if is_internal(IpAddr::V4(v4)) {
                    return true;
                }
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // fc00::/7 unique local
                || (s[0] & 0xffc0) == 0xfe80 // fe80::/10 link local
                || (s[0] & 0xffc0) == 0xfec0 // fec0::/10 site local (deprecated)
                || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1) // 64:ff9b:1::/48 local-use NAT64
        }
    }
}

/// The IPv4 address an IPv6 address carries: IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible
/// `::a.b.c.d`, NAT64 `64:ff9b::a.b.c.d` or 6to4 `2002:AABB:CCDD::/48`.
fn embedded_ipv4(v6: std::net::Ipv6Addr) -> Option<std::net::Ipv4Addr> {
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = v6.segments();
    let low = std::net::Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if s[..6] == [0; 6] && !v6.is_loopback() && !v6.is_unspecified() {
        return Some(low); // ::a.b.c.d
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(low); // 64:ff9b::/96
    }
    if s[0] == 0x2002 {
        return Some(std::net::Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8));
    }
    None
}

/// Splits `host[:port]` (IPv6 literals in brackets) the way ruma's `ServerName` does.
fn split_host_port(name: &str) -> Result<(String, Option<u16>), ResolveError> {
    let parsed = <&ServerName>::try_from(name).map_err(|_| ResolveError::BadDelegation(name.into()))?;
    Ok((parsed.host().to_owned(), parsed.port()))
}

fn ip_literal(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

pub struct Resolver {
    dns: Arc<dyn Dns>,
    policy: AddressPolicy,
    well_known_cache: Mutex<HashMap<String, (Instant, Option<String>)>>,
}

impl Resolver {
    pub fn new(dns: Arc<dyn Dns>, policy: AddressPolicy) -> Resolver {
        Resolver { dns, policy, well_known_cache: Mutex::new(HashMap::new()) }
    }

    pub fn policy(&self) -> &AddressPolicy {
        &self.policy
    }

    /// Resolves `server_name` following the spec's steps in order.
    pub async fn resolve(
        &self,
        server_name: &ServerName,
        well_known: &dyn WellKnownFetcher,
    ) -> Result<ResolvedServer, ResolveError> {
        let host = server_name.host();
        // 1. IP literal: that IP, given port or 8448.
        if let Some(ip) = ip_literal(host) {
            return self.literal(host, ip, server_name.port(), server_name.as_str());
        }
        // 2. Hostname with explicit port.
        if let Some(port) = server_name.port() {
            return self.named(host, host, port, server_name.as_str()).await;
        }
        // 3. Delegation through .well-known.
        if let Some(delegated) = self.well_known(host, well_known).await {
            return self.resolve_delegated(&delegated).await;
        }
        // 4-6. SRV on the server name, then 8448.
        self.srv_or_default(host).await
    }

    async fn resolve_delegated(&self, delegated: &str) -> Result<ResolvedServer, ResolveError> {
        let (dhost, dport) = split_host_port(delegated)?;
        if let Some(ip) = ip_literal(&dhost) {
            return self.literal(&dhost, ip, dport, delegated);
        }
        if let Some(port) = dport {
            return self.named(&dhost, &dhost, port, delegated).await;
        }
        self.srv_or_default(&dhost).await
    }

    /// SRV `_matrix-fed._tcp`, then the deprecated `_matrix._tcp`, then `host:8448`.
    /// The certificate name and `Host` stay `host`, never the SRV target.
    async fn srv_or_default(&self, host: &str) -> Result<ResolvedServer, ResolveError> {
        for prefix in ["_matrix-fed._tcp", "_matrix._tcp"] {
            let targets = self.dns.srv(&format!("{prefix}.{host}")).await.unwrap_or_default();
            if let Some(target) = targets.first() {
                return self.named(host, &target.host, target.port, host).await;
            }
        }
        self.named(host, host, DEFAULT_PORT, host).await
    }

    fn literal(
        &self,
        url_host: &str,
        ip: IpAddr,
        port: Option<u16>,
        host_header: &str,
    ) -> Result<ResolvedServer, ResolveError> {
        self.policy.check(ip)?;
        Ok(ResolvedServer {
            url_host: url_host.to_owned(),
            port: port.unwrap_or(DEFAULT_PORT),
            host_header: host_header.to_owned(),
            addrs: vec![ip],
        })
    }

    /// Looks up `lookup_host` and keeps the addresses the policy permits; refuses when none is.
    async fn named(
        &self,
        url_host: &str,
        lookup_host: &str,
        port: u16,
        host_header: &str,
    ) -> Result<ResolvedServer, ResolveError> {
        let ips = self.lookup_permitted(lookup_host).await?;
        Ok(ResolvedServer { url_host: url_host.to_owned(), port, host_header: host_header.to_owned(), addrs: ips })
    }

    pub async fn lookup_permitted(&self, host: &str) -> Result<Vec<IpAddr>, ResolveError> {
        let ips = self.dns.ips(host).await?;
        if ips.is_empty() {
            return Err(ResolveError::NoAddress(host.to_owned()));
        }
        let permitted: Vec<IpAddr> = ips.iter().copied().filter(|ip| self.policy.permits(*ip)).collect();
        if permitted.is_empty() {
            return Err(ResolveError::Refused(ips[0]));
        }
        Ok(permitted)
    }

    /// The delegated server name from well-known, cached for 24 h (failures for 1 h).
    async fn well_known(&self, host: &str, fetcher: &dyn WellKnownFetcher) -> Option<String> {
        if let Some((at, cached)) = self.well_known_cache.lock().unwrap().get(host) {
            let ttl = if cached.is_some() { WELL_KNOWN_TTL } else { WELL_KNOWN_FAILURE_TTL };
            if at.elapsed() < ttl {
                return cached.clone();
            }
        }
        let fetched = fetcher
            .fetch_well_known(host)
            .await
            .filter(|delegated| <&ServerName>::try_from(delegated.as_str()).is_ok());
        let mut cache = self.well_known_cache.lock().unwrap();
        if cache.len() >= WELL_KNOWN_CACHE_MAX {
            // H14: hosts are named by others; keep the cache bounded, expired answers first.
            cache.retain(|_, (at, answer)| {
                at.elapsed() < if answer.is_some() { WELL_KNOWN_TTL } else { WELL_KNOWN_FAILURE_TTL }
            });
            if cache.len() >= WELL_KNOWN_CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(host.to_owned(), (Instant::now(), fetched.clone()));
        fetched
    }
}

/// DNS through hickory, with the system's resolver configuration.
pub struct HickoryDns {
    resolver: Option<hickory_resolver::TokioResolver>,
}

impl HickoryDns {
    pub fn from_system() -> HickoryDns {
        let resolver =
            hickory_resolver::TokioResolver::builder_tokio().map(|builder| builder.build()).ok().and_then(Result::ok);
        if resolver.is_none() {
            tracing::warn!("no usable system DNS configuration; only federation.destinations will resolve");
        }
        HickoryDns { resolver }
    }

    fn resolver(&self, name: &str) -> Result<&hickory_resolver::TokioResolver, ResolveError> {
        self.resolver
            .as_ref()
            .ok_or_else(|| ResolveError::Dns { name: name.to_owned(), reason: "no DNS resolver configured".to_owned() })
    }
}

#[async_trait]
impl Dns for HickoryDns {
    async fn srv(&self, name: &str) -> Result<Vec<SrvTarget>, ResolveError> {
        let lookup = self
            .resolver(name)?
            .srv_lookup(name)
            .await
            .map_err(|e| ResolveError::Dns { name: name.to_owned(), reason: e.to_string() })?;
        let mut records: Vec<(u16, u16, SrvTarget)> = lookup
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                hickory_resolver::proto::rr::RData::SRV(srv) => Some((
                    srv.priority,
                    u16::MAX - srv.weight,
                    SrvTarget { host: srv.target.to_utf8().trim_end_matches('.').to_owned(), port: srv.port },
                )),
                _ => None,
            })
            .collect();
        // Lowest priority first; within a priority, heaviest weight first.
        records.sort_by_key(|(priority, inverse_weight, _)| (*priority, *inverse_weight));
        Ok(records.into_iter().map(|(_, _, target)| target).collect())
    }

    async fn ips(&self, host: &str) -> Result<Vec<IpAddr>, ResolveError> {
        let lookup = self
            .resolver(host)?
            .lookup_ip(host)
            .await
            .map_err(|e| ResolveError::Dns { name: host.to_owned(), reason: e.to_string() })?;
        Ok(lookup.iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An injected DNS: fixed SRV and address records.
    #[derive(Default)]
    struct FakeDns {
        srv: HashMap<String, Vec<SrvTarget>>,
        ips: HashMap<String, Vec<IpAddr>>,
    }

    #[async_trait]
    impl Dns for FakeDns {
        async fn srv(&self, name: &str) -> Result<Vec<SrvTarget>, ResolveError> {
            Ok(self.srv.get(name).cloned().unwrap_or_default())
        }
        async fn ips(&self, host: &str) -> Result<Vec<IpAddr>, ResolveError> {
            self.ips
                .get(host)
                .cloned()
                .ok_or_else(|| ResolveError::Dns { name: host.into(), reason: "NXDOMAIN".into() })
        }
    }

    struct FakeWellKnown(HashMap<String, String>);

    #[async_trait]
    impl WellKnownFetcher for FakeWellKnown {
        async fn fetch_well_known(&self, host: &str) -> Option<String> {
            self.0.get(host).cloned()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn h14_the_well_known_cache_stays_bounded() {
        let (resolver, well_known) = fixture();
        for i in 0..WELL_KNOWN_CACHE_MAX + 100 {
            resolver.well_known(&format!("h{i}.example"), &well_known).await;
        }
        let cached = resolver.well_known_cache.lock().unwrap().len();
        assert!(cached <= WELL_KNOWN_CACHE_MAX, "{cached} answers cached");
        assert!(cached > 0);
    }

    fn fixture() -> (Resolver, FakeWellKnown) {
        let mut dns = FakeDns::default();
        for (host, addr) in [
            ("plain.example", "203.0.113.1"),
            ("ported.example", "203.0.113.2"),
            ("delegated.example", "203.0.113.3"),
            ("matrix.delegated.example", "203.0.113.4"),
            ("srvtarget.example", "203.0.113.5"),
            ("legacytarget.example", "203.0.113.6"),
            ("srv.example", "203.0.113.7"),
            ("inside.example", "10.0.0.8"),
            ("metadata.example", "169.254.169.254"),
            ("loop6.example", "::1"),
            ("dhost.example", "203.0.113.9"),
        ] {
            dns.ips.insert(host.into(), vec![ip(addr)]);
        }
        dns.srv.insert(
            "_matrix-fed._tcp.srv.example".into(),
            vec![SrvTarget { host: "srvtarget.example".into(), port: 8449 }],
        );
        dns.srv.insert(
            "_matrix._tcp.legacy.example".into(),
            vec![SrvTarget { host: "legacytarget.example".into(), port: 8450 }],
        );
        dns.srv.insert(
            "_matrix-fed._tcp.dhost.example".into(),
            vec![SrvTarget { host: "srvtarget.example".into(), port: 9000 }],
        );
        let well_known = FakeWellKnown(HashMap::from([
            ("delegated.example".to_owned(), "matrix.delegated.example:443".to_owned()),
            ("toip.example".to_owned(), "203.0.113.10".to_owned()),
            ("tosrv.example".to_owned(), "dhost.example".to_owned()),
        ]));
        (Resolver::new(Arc::new(dns), AddressPolicy::default()), well_known)
    }

    async fn resolve(name: &str) -> Result<ResolvedServer, ResolveError> {
        let (resolver, wk) = fixture();
        resolver.resolve(<&ServerName>::try_from(name).unwrap(), &wk).await
    }

    fn expect(url_host: &str, port: u16, host_header: &str, addr: &str) -> ResolvedServer {
        ResolvedServer { url_host: url_host.into(), port, host_header: host_header.into(), addrs: vec![ip(addr)] }
    }

    #[tokio::test]
    async fn ip_literals_use_their_port_or_8448() {
        assert_eq!(
            resolve("203.0.113.20").await.unwrap(),
            expect("203.0.113.20", 8448, "203.0.113.20", "203.0.113.20")
        );
        assert_eq!(
            resolve("[2001:db8::1]:99").await.unwrap(),
            expect("[2001:db8::1]", 99, "[2001:db8::1]:99", "2001:db8::1")
        );
    }

    #[tokio::test]
    async fn explicit_port_skips_well_known_and_srv() {
        assert_eq!(
            resolve("ported.example:1234").await.unwrap(),
            expect("ported.example", 1234, "ported.example:1234", "203.0.113.2")
        );
    }

    #[tokio::test]
    async fn well_known_delegation_variants() {
        assert_eq!(
            resolve("delegated.example").await.unwrap(),
            expect("matrix.delegated.example", 443, "matrix.delegated.example:443", "203.0.113.4")
        );
        assert_eq!(
            resolve("toip.example").await.unwrap(),
            expect("203.0.113.10", 8448, "203.0.113.10", "203.0.113.10")
        );
        // Delegated host without port: SRV of the delegated host; cert and Host stay the delegated host.
        assert_eq!(
            resolve("tosrv.example").await.unwrap(),
            expect("dhost.example", 9000, "dhost.example", "203.0.113.5")
        );
    }

    #[tokio::test]
    async fn srv_then_legacy_srv_then_8448() {
        assert_eq!(resolve("srv.example").await.unwrap(), expect("srv.example", 8449, "srv.example", "203.0.113.5"));
        let (resolver, wk) = fixture();
        // legacy.example has only a _matrix._tcp record; its target resolves.
        let got = resolver.resolve(<&ServerName>::try_from("legacy.example").unwrap(), &wk).await.unwrap();
        assert_eq!(got, expect("legacy.example", 8450, "legacy.example", "203.0.113.6"));
        assert_eq!(
            resolve("plain.example").await.unwrap(),
            expect("plain.example", 8448, "plain.example", "203.0.113.1")
        );
    }

    #[tokio::test]
    async fn internal_addresses_are_refused() {
        assert_eq!(resolve("127.0.0.1:8448").await, Err(ResolveError::Refused(ip("127.0.0.1"))));
        assert_eq!(resolve("[::1]").await, Err(ResolveError::Refused(ip("::1"))));
        assert_eq!(resolve("169.254.169.254").await, Err(ResolveError::Refused(ip("169.254.169.254"))));
        assert_eq!(resolve("metadata.example").await, Err(ResolveError::Refused(ip("169.254.169.254"))));
        assert_eq!(resolve("loop6.example").await, Err(ResolveError::Refused(ip("::1"))));
        assert_eq!(resolve("inside.example").await, Err(ResolveError::Refused(ip("10.0.0.8"))));
    }

    #[tokio::test]
    async fn allowed_ranges_open_exactly_that_range() {
        let (_, wk) = fixture();
        let mut dns = FakeDns::default();
        dns.ips.insert("inside.example".into(), vec![ip("10.0.0.8")]);
        let policy = AddressPolicy { allow_private: false, allowed: vec!["10.0.0.0/24".parse().unwrap()] };
        let resolver = Resolver::new(Arc::new(dns), policy);
        let got = resolver.resolve(<&ServerName>::try_from("inside.example:8448").unwrap(), &wk).await;
        assert_eq!(got.unwrap().addrs, vec![ip("10.0.0.8")]);
        let refused = resolver.resolve(<&ServerName>::try_from("10.0.1.1").unwrap(), &wk).await;
        assert_eq!(refused, Err(ResolveError::Refused(ip("10.0.1.1"))));
    }

    #[test]
    fn internal_ranges() {
        for internal in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_internal(ip(internal)), "{internal}");
        }
        for external in ["203.0.113.1", "8.8.8.8", "2001:db8::1", "172.32.0.1"] {
            assert!(!is_internal(ip(external)), "{external}");
        }
    }

    /// H15: the special-purpose ranges the first guard missed, and IPv6 forms that carry an IPv4
    /// address (NAT64, 6to4, IPv4-compatible), which are judged by that address.
    #[test]
    fn special_purpose_and_embedded_ipv4_ranges() {
        for internal in [
            "192.0.0.1",          // 192.0.0.0/24 IETF protocol assignments
            "192.0.0.170",        // (NAT64 discovery)
            "198.18.0.1",         // 198.18.0.0/15 benchmarking
            "198.19.255.254",     //
            "240.0.0.1",          // 240.0.0.0/4 reserved
            "255.255.255.254",    //
            "fec0::1",            // fec0::/10 site-local
            "feff::1",            //
            "64:ff9b::7f00:1",    // NAT64 of 127.0.0.1
            "64:ff9b::a9fe:a9fe", // NAT64 of 169.254.169.254
            "64:ff9b::10.0.0.1",  //
            "2002:7f00:1::",      // 6to4 of 127.0.0.1
            "2002:c0a8:101::1",   // 6to4 of 192.168.1.1
            "2002:a00:1:1::2",    // 6to4 of 10.0.0.1
            "::127.0.0.1",        // IPv4-compatible
            "::10.0.0.1",         //
            "::169.254.169.254",  //
            "64:ff9b:1::1",       // 64:ff9b:1::/48 local-use NAT64
        ] {
            assert!(is_internal(ip(internal)), "{internal}");
        }
        for external in [
            "192.0.1.1",
            "198.17.255.255",
            "198.20.0.1",
            "223.255.255.1",
            "64:ff9b::cb00:7101", // NAT64 of 203.0.113.1
            "64:ff9b::8.8.8.8",
            "2002:808:808::1", // 6to4 of 8.8.8.8
            "::8.8.8.8",
            "2001:db8::1",
        ] {
            assert!(!is_internal(ip(external)), "{external}");
        }
    }
}
