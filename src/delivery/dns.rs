//! MX resolution (RFC 5321 §5.1, RFC 7505 null MX) for direct delivery.
//!
//! The decision logic is pure ([`order_exchanges`], [`targets`]): lookup answers in, ordered
//! connection targets or a classified failure out. [`MxResolver`] is the thin shell that asks
//! `hickory-resolver` and feeds those functions.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{RData, RecordType};
use rand::seq::SliceRandom;

/// Most addresses tried for one destination in one attempt (Postfix `smtp_mx_address_limit`).
pub const MAX_TARGETS: usize = 10;

/// One answer of a lookup, reduced to what the decision needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer<T> {
    Records(Vec<T>),
    /// NOERROR without records of that type (the name exists).
    NoRecords,
    /// NXDOMAIN: the name does not exist.
    NxDomain,
    /// SERVFAIL, REFUSED, timeout, network error: try again later.
    TempFail(String),
}

/// One MX record: preference and exchange host (without trailing dot; `""` for the root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mx {
    pub preference: u16,
    pub exchange: String,
}

/// A host to connect to, in the order to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The MX host name (TLS server name, Remote-MTA).
    pub host: String,
    pub addr: SocketAddr,
    /// The MX preference the host has (0 for an implicit MX, a literal, a route's hop).
    pub preference: u16,
}

/// Why a destination has no usable target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text}")]
pub struct DnsFailure {
    pub permanent: bool,
    /// RFC 3463 enhanced status for the record and DSN.
    pub enhanced_status: &'static str,
    /// Sisimai reason.
    pub reason: &'static str,
    pub text: String,
}

impl DnsFailure {
    fn temporary(text: String) -> Self {
        Self {
            permanent: false,
            enhanced_status: "4.4.3",
            reason: "systemerror",
            text,
        }
    }
}

/// The ordered exchange hosts for `domain` from its MX answer: by preference, equal
/// preferences shuffled (`shuffle` is given each run of equal preference); implicit MX (the
/// domain itself) when the domain has no MX; null MX → permanent `5.1.10`.
pub fn order_exchanges(
    domain: &str,
    mx: Answer<Mx>,
    mut shuffle: impl FnMut(&mut [Mx]),
) -> Result<Vec<String>, DnsFailure> {
    match mx {
        Answer::NxDomain => Err(DnsFailure {
            permanent: true,
            enhanced_status: "5.1.2",
            reason: "hostunknown",
            text: format!("Host or domain name not found: {domain} does not exist (NXDOMAIN)"),
        }),
        Answer::TempFail(why) => Err(DnsFailure::temporary(format!(
            "MX lookup for {domain} failed temporarily: {why}"
        ))),
        Answer::NoRecords => Ok(vec![domain.to_string()]),
        Answer::Records(records) if records.is_empty() => Ok(vec![domain.to_string()]),
        Answer::Records(mut records) => {
            // RFC 7505 §3: a single MX with root exchange means "accepts no mail". A root MX
            // mixed with others is a misconfiguration; skip it and use the real ones.
            if records.iter().all(|r| r.exchange.is_empty()) {
                return Err(DnsFailure {
                    permanent: true,
                    enhanced_status: "5.1.10",
                    reason: "notaccept",
                    text: format!("Domain {domain} does not accept mail (null MX, RFC 7505)"),
                });
            }
            records.retain(|r| !r.exchange.is_empty());
            records.sort_by_key(|r| r.preference);
            let mut start = 0;
            while start < records.len() {
                let pref = records[start].preference;
                let end = records[start..]
                    .iter()
                    .position(|r| r.preference != pref)
                    .map_or(records.len(), |n| start + n);
                shuffle(&mut records[start..end]);
                start = end;
            }
            let mut hosts: Vec<String> = Vec::new();
            for r in records {
                if !hosts.iter().any(|h| h.eq_ignore_ascii_case(&r.exchange)) {
                    hosts.push(r.exchange);
                }
            }
            Ok(hosts)
        }
    }
}

/// Connection targets for ordered exchanges, given each one's address answer. Hosts whose
/// lookup failed are skipped; if none is left the failure is temporary when any lookup failed
/// temporarily, else permanent (`5.1.2` for an implicit MX whose domain has no address,
/// `5.4.4` when no MX host has one).
pub fn targets(
    domain: &str,
    exchanges: &[String],
    addresses: &HashMap<String, Answer<IpAddr>>,
    port: u16,
) -> Result<Vec<Target>, DnsFailure> {
    let implicit = exchanges.len() == 1 && exchanges[0].eq_ignore_ascii_case(domain);
    let mut out = Vec::new();
    let mut temp: Option<String> = None;
    for host in exchanges {
        match addresses.get(host) {
            Some(Answer::Records(ips)) => {
                for ip in ips {
                    if out.len() < MAX_TARGETS {
                        out.push(Target {
                            host: host.clone(),
                            addr: SocketAddr::new(*ip, port),
                            preference: 0,
                        });
                    }
                }
            }
            Some(Answer::TempFail(why)) => {
                temp.get_or_insert_with(|| format!("address lookup for {host} failed: {why}"));
            }
            Some(Answer::NoRecords) | Some(Answer::NxDomain) | None => {}
        }
    }
    if !out.is_empty() {
        return Ok(out);
    }
    if let Some(why) = temp {
        return Err(DnsFailure::temporary(why));
    }
    if implicit {
        Err(DnsFailure {
            permanent: true,
            enhanced_status: "5.1.2",
            reason: "hostunknown",
            text: format!("Host or domain name not found: {domain} has no MX and no address"),
        })
    } else {
        Err(DnsFailure {
            permanent: true,
            enhanced_status: "5.4.4",
            reason: "hostunknown",
            text: format!(
                "No address for any MX host of {domain} ({})",
                exchanges.join(", ")
            ),
        })
    }
}

/// The targets without this host (RFC 5321 §5.1): when one of them is mailtrail itself
/// (`is_self`), it and every target of its preference or a higher one are dropped; when none
/// is left, the mail would loop: a permanent `5.4.6`, as Postfix's "loops back to myself".
pub fn without_self(
    destination: &str,
    targets: Vec<Target>,
    is_self: impl Fn(SocketAddr) -> bool,
) -> Result<Vec<Target>, DnsFailure> {
    let Some(own) = targets
        .iter()
        .filter(|t| is_self(t.addr))
        .map(|t| t.preference)
        .min()
    else {
        return Ok(targets);
    };
    let (kept, dropped): (Vec<Target>, Vec<Target>) =
        targets.into_iter().partition(|t| t.preference < own);
    if !kept.is_empty() {
        return Ok(kept);
    }
    Err(loops_back(destination, &dropped, is_self))
}

/// A route's fixed next hops without this host: a list tried in order, not MX preferences,
/// so only the hops that are mailtrail itself are dropped (and, as with MX hosts, none left
/// is a loop).
pub fn without_self_hops(
    destination: &str,
    targets: Vec<Target>,
    is_self: impl Fn(SocketAddr) -> bool,
) -> Result<Vec<Target>, DnsFailure> {
    let (dropped, kept): (Vec<Target>, Vec<Target>) =
        targets.into_iter().partition(|t| is_self(t.addr));
    if dropped.is_empty() || !kept.is_empty() {
        return Ok(kept);
    }
    Err(loops_back(destination, &dropped, is_self))
}

fn loops_back(
    destination: &str,
    dropped: &[Target],
    is_self: impl Fn(SocketAddr) -> bool,
) -> DnsFailure {
    let me = dropped
        .iter()
        .find(|t| is_self(t.addr))
        .map(|t| format!("{} [{}]", t.host, t.addr))
        .unwrap_or_default();
    DnsFailure {
        permanent: true,
        enhanced_status: "5.4.6",
        reason: "systemerror",
        text: format!("mail for {destination} loops back to myself ({me} is this server)"),
    }
}

/// Whether `addr` is mailtrail itself: one of its SMTP listeners (the same port, and the
/// same address or, for a listener on all addresses (`0.0.0.0`, `::`), an address of this
/// machine, one a socket can be bound to), or on any port one of the addresses it receives
/// mail on through a proxy or NAT (`proxies`, Postfix's `proxy_interfaces`).
pub fn is_own_listener(listeners: &[SocketAddr], proxies: &[IpAddr], addr: SocketAddr) -> bool {
    let unmapped = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    };
    let ip = unmapped(addr.ip());
    proxies.iter().any(|p| unmapped(*p) == ip)
        || listeners.iter().any(|l| {
            l.port() == addr.port()
                && (unmapped(l.ip()) == ip
                    || (l.ip().is_unspecified()
                        && (ip.is_loopback() || std::net::UdpSocket::bind((ip, 0)).is_ok())))
        })
}

/// An address literal domain (RFC 5321 4.1.3: `[192.0.2.1]`, `[IPv6:2001:db8::1]`, the tag
/// in any case) that names one host, delivered to directly. An IPv6 address without its
/// tag, a general literal (`[tag:...]`), and an address of no single host (unspecified,
/// broadcast, multicast: connecting to `0.0.0.0` reaches this machine) are none.
pub fn address_literal(domain: &str) -> Option<IpAddr> {
    let inner = domain.strip_prefix('[')?.strip_suffix(']')?;
    let ip = match inner.get(..5) {
        Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => {
            IpAddr::V6(inner.get(5..)?.parse::<std::net::Ipv6Addr>().ok()?)
        }
        _ => IpAddr::V4(inner.parse::<std::net::Ipv4Addr>().ok()?),
    };
    let one_host = match ip {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast()),
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast()),
    };
    one_host.then_some(ip)
}

/// The resolver shell: asks DNS and hands the answers to the pure functions above.
#[derive(Clone)]
pub struct MxResolver {
    resolver: TokioResolver,
}

impl MxResolver {
    /// Uses `nameservers` (UDP and TCP) when given, else the system configuration.
    pub fn new(
        nameservers: &[SocketAddr],
        timeout: Option<std::time::Duration>,
    ) -> Result<Self, NetError> {
        let mut builder = if nameservers.is_empty() {
            TokioResolver::builder_tokio()?
        } else {
            let servers = nameservers
                .iter()
                .map(|ns| {
                    let mut c = NameServerConfig::udp_and_tcp(ns.ip());
                    for conn in &mut c.connections {
                        conn.port = ns.port();
                    }
                    c
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        if let Some(t) = timeout {
            builder.options_mut().timeout = t;
        }
        Ok(Self {
            resolver: builder.build()?,
        })
    }

    /// Ordered targets for a recipient domain.
    pub async fn resolve(&self, domain: &str, port: u16) -> Result<Vec<Target>, DnsFailure> {
        if let Some(ip) = address_literal(domain) {
            return Ok(vec![Target {
                host: ip.to_string(),
                addr: SocketAddr::new(ip, port),
                preference: 0,
            }]);
        }
        let fqdn = format!("{}.", domain.trim_end_matches('.'));
        let mx = match self.resolver.lookup(fqdn.as_str(), RecordType::MX).await {
            Ok(lookup) => Answer::Records(
                lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(mx) => Some(Mx {
                            preference: mx.preference,
                            exchange: mx
                                .exchange
                                .to_ascii()
                                .trim_end_matches('.')
                                .to_ascii_lowercase(),
                        }),
                        _ => None,
                    })
                    .collect(),
            ),
            Err(e) => classify(&e),
        };
        let mut preferences: HashMap<String, u16> = HashMap::new();
        if let Answer::Records(records) = &mx {
            for r in records {
                let p = preferences
                    .entry(r.exchange.clone())
                    .or_insert(r.preference);
                *p = (*p).min(r.preference);
            }
        }
        let exchanges = order_exchanges(domain, mx, |s| s.shuffle(&mut rand::rng()))?;
        let mut addresses = HashMap::new();
        for host in &exchanges {
            addresses.insert(host.clone(), self.addresses(host).await);
            if addresses
                .values()
                .filter_map(|a| match a {
                    Answer::Records(r) => Some(r.len()),
                    _ => None,
                })
                .sum::<usize>()
                >= MAX_TARGETS
            {
                break;
            }
        }
        let mut targets = targets(domain, &exchanges, &addresses, port)?;
        for t in &mut targets {
            t.preference = preferences.get(&t.host).copied().unwrap_or(0);
        }
        Ok(targets)
    }

    /// A and AAAA of a host (IPv4 first, as most MX hosts are reachable over it).
    pub async fn addresses(&self, host: &str) -> Answer<IpAddr> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Answer::Records(vec![ip]);
        }
        let fqdn = format!("{}.", host.trim_end_matches('.'));
        let a = self.lookup_addrs(&fqdn, RecordType::A).await;
        let aaaa = self.lookup_addrs(&fqdn, RecordType::AAAA).await;
        match (a, aaaa) {
            (Answer::Records(mut v4), Answer::Records(v6)) => {
                v4.extend(v6);
                Answer::Records(v4)
            }
            (Answer::Records(v), _) | (_, Answer::Records(v)) => Answer::Records(v),
            (Answer::TempFail(e), _) | (_, Answer::TempFail(e)) => Answer::TempFail(e),
            (Answer::NxDomain, _) | (_, Answer::NxDomain) => Answer::NxDomain,
            _ => Answer::NoRecords,
        }
    }

    async fn lookup_addrs(&self, fqdn: &str, rt: RecordType) -> Answer<IpAddr> {
        match self.resolver.lookup(fqdn, rt).await {
            Ok(lookup) => {
                let ips: Vec<IpAddr> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::A(a) => Some(IpAddr::V4(a.0)),
                        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                        _ => None,
                    })
                    .collect();
                if ips.is_empty() {
                    Answer::NoRecords
                } else {
                    Answer::Records(ips)
                }
            }
            Err(e) => classify(&e),
        }
    }
}

/// Reduces a resolver error to the answer kinds the decision distinguishes.
fn classify<T>(e: &NetError) -> Answer<T> {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(nr))
            if nr.response_code == ResponseCode::NXDomain =>
        {
            Answer::NxDomain
        }
        NetError::Dns(DnsError::NoRecordsFound(_)) => Answer::NoRecords,
        NetError::Dns(DnsError::ResponseCode(ResponseCode::NXDomain)) => Answer::NxDomain,
        other => Answer::TempFail(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(host: &str, addr: &str, preference: u16) -> Target {
        Target {
            host: host.into(),
            addr: addr.parse().unwrap(),
            preference,
        }
    }

    #[test]
    fn this_server_and_the_mx_hosts_it_outranks_are_dropped() {
        let me: SocketAddr = "192.0.2.25:25".parse().unwrap();
        let is_me = |a: SocketAddr| a == me;
        let list = vec![
            at("a.test", "198.51.100.1:25", 5),
            at("me.test", "192.0.2.25:25", 10),
            at("peer.test", "198.51.100.2:25", 10),
            at("backup.test", "198.51.100.3:25", 20),
        ];
        let kept = without_self("d.test", list, is_me).unwrap();
        assert_eq!(kept, vec![at("a.test", "198.51.100.1:25", 5)]);
        // This server the best MX: nothing left, a loop.
        let only = vec![
            at("peer.test", "198.51.100.2:25", 10),
            at("me.test", "192.0.2.25:25", 10),
        ];
        let e = without_self("d.test", only, is_me).unwrap_err();
        assert!(e.permanent && e.enhanced_status == "5.4.6", "{e:?}");
        assert_eq!(
            e.text,
            "mail for d.test loops back to myself (me.test [192.0.2.25:25] is this server)"
        );
        // Without this server in it, the list is as it was.
        let other = vec![at("a.test", "198.51.100.1:25", 5)];
        assert_eq!(without_self("d.test", other.clone(), is_me).unwrap(), other);
    }

    #[test]
    fn a_route_hop_that_is_this_server_is_skipped_alone() {
        let hop = |host: &str, addr: &str| Target {
            host: host.into(),
            addr: addr.parse().unwrap(),
            preference: 0,
        };
        let is_me = |a: SocketAddr| a == "192.0.2.25:25".parse().unwrap();
        let hops = vec![
            hop("a.test", "192.0.2.1:25"),
            hop("me.test", "192.0.2.25:25"),
            hop("b.test", "192.0.2.2:25"),
        ];
        let kept = without_self_hops("route[0]", hops, is_me).unwrap();
        let hosts: Vec<&str> = kept.iter().map(|t| t.host.as_str()).collect();
        assert_eq!(hosts, ["a.test", "b.test"]);
        let e = without_self_hops("route[0]", vec![hop("me.test", "192.0.2.25:25")], is_me)
            .unwrap_err();
        assert_eq!((e.permanent, e.enhanced_status), (true, "5.4.6"));
    }

    #[test]
    fn own_listeners_are_recognised_by_address_and_port() {
        let me = |listeners: &[SocketAddr], addr: &str| {
            is_own_listener(listeners, &[], addr.parse().unwrap())
        };
        let specific: Vec<SocketAddr> = vec!["127.0.0.1:2525".parse().unwrap()];
        assert!(me(&specific, "127.0.0.1:2525"));
        assert!(me(&specific, "[::ffff:127.0.0.1]:2525"));
        assert!(!me(&specific, "127.0.0.1:25"));
        assert!(!me(&specific, "192.0.2.1:2525"));
        let any: Vec<SocketAddr> = vec!["0.0.0.0:25".parse().unwrap()];
        assert!(me(&any, "127.0.0.5:25"));
        // TEST-NET-1 is no address of this machine: nothing can be bound to it.
        assert!(!me(&any, "192.0.2.1:25"));
    }

    #[test]
    fn proxy_interfaces_are_this_server_on_any_port() {
        let listeners: Vec<SocketAddr> = vec!["127.0.0.1:2525".parse().unwrap()];
        let nat: Vec<IpAddr> = vec!["203.0.113.5".parse().unwrap()];
        let me = |addr: &str| is_own_listener(&listeners, &nat, addr.parse().unwrap());
        assert!(me("203.0.113.5:25"));
        assert!(me("[::ffff:203.0.113.5]:587"));
        assert!(!me("203.0.113.6:25"));
        assert!(me("127.0.0.1:2525"));
    }

    fn mx(p: u16, h: &str) -> Mx {
        Mx {
            preference: p,
            exchange: h.into(),
        }
    }

    fn no_shuffle(_: &mut [Mx]) {}

    #[test]
    fn orders_by_preference() {
        let r = order_exchanges(
            "example.com",
            Answer::Records(vec![mx(20, "b.mx"), mx(10, "a.mx"), mx(30, "c.mx")]),
            no_shuffle,
        )
        .unwrap();
        assert_eq!(r, vec!["a.mx", "b.mx", "c.mx"]);
    }

    #[test]
    fn shuffles_only_within_equal_preference() {
        let mut groups = Vec::new();
        let r = order_exchanges(
            "example.com",
            Answer::Records(vec![
                mx(10, "a1"),
                mx(20, "b1"),
                mx(10, "a2"),
                mx(20, "b2"),
                mx(5, "z"),
            ]),
            |s| {
                groups.push(s.iter().map(|m| m.exchange.clone()).collect::<Vec<_>>());
                s.reverse();
            },
        )
        .unwrap();
        assert_eq!(groups, vec![vec!["z"], vec!["a1", "a2"], vec!["b1", "b2"]]);
        assert_eq!(r, vec!["z", "a2", "a1", "b2", "b1"]);
    }

    #[test]
    fn real_shuffle_keeps_preference_order() {
        for _ in 0..50 {
            let r = order_exchanges(
                "d",
                Answer::Records(vec![mx(10, "a"), mx(10, "b"), mx(10, "c"), mx(0, "first")]),
                |s| s.shuffle(&mut rand::rng()),
            )
            .unwrap();
            assert_eq!(r[0], "first");
            let mut rest = r[1..].to_vec();
            rest.sort();
            assert_eq!(rest, vec!["a", "b", "c"]);
        }
    }

    #[test]
    fn no_mx_means_implicit_mx() {
        assert_eq!(
            order_exchanges("example.com", Answer::NoRecords, no_shuffle).unwrap(),
            vec!["example.com"]
        );
        assert_eq!(
            order_exchanges("example.com", Answer::Records(vec![]), no_shuffle).unwrap(),
            vec!["example.com"]
        );
    }

    #[test]
    fn null_mx_is_a_permanent_notaccept() {
        let e = order_exchanges("example.com", Answer::Records(vec![mx(0, "")]), no_shuffle)
            .unwrap_err();
        assert!(e.permanent);
        assert_eq!(e.enhanced_status, "5.1.10");
        assert_eq!(e.reason, "notaccept");
        // A root MX next to real ones is skipped rather than trusted.
        let r = order_exchanges(
            "example.com",
            Answer::Records(vec![mx(0, ""), mx(10, "mx")]),
            no_shuffle,
        )
        .unwrap();
        assert_eq!(r, vec!["mx"]);
    }

    #[test]
    fn nxdomain_is_permanent_and_servfail_temporary() {
        let e = order_exchanges("nope.example", Answer::NxDomain, no_shuffle).unwrap_err();
        assert!(e.permanent);
        assert_eq!((e.enhanced_status, e.reason), ("5.1.2", "hostunknown"));
        let e = order_exchanges("x.example", Answer::TempFail("SERVFAIL".into()), no_shuffle)
            .unwrap_err();
        assert!(!e.permanent);
        assert!(e.enhanced_status.starts_with('4'));
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn targets_follow_exchange_order_and_skip_hosts_without_address() {
        let ex = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        let mut addrs = HashMap::new();
        addrs.insert("a".to_string(), Answer::NxDomain);
        addrs.insert(
            "b".to_string(),
            Answer::Records(vec![ip("192.0.2.2"), ip("2001:db8::2")]),
        );
        addrs.insert("c".to_string(), Answer::Records(vec![ip("192.0.2.3")]));
        let t = targets("d", &ex, &addrs, 2525).unwrap();
        let got: Vec<(String, SocketAddr)> = t.into_iter().map(|t| (t.host, t.addr)).collect();
        assert_eq!(
            got,
            vec![
                ("b".into(), "192.0.2.2:2525".parse().unwrap()),
                ("b".into(), "[2001:db8::2]:2525".parse().unwrap()),
                ("c".into(), "192.0.2.3:2525".parse().unwrap()),
            ]
        );
    }

    #[test]
    fn no_address_anywhere_is_permanent_unless_a_lookup_failed_temporarily() {
        let ex = vec!["a".to_string()];
        let mut addrs = HashMap::new();
        addrs.insert("a".to_string(), Answer::NoRecords);
        let e = targets("d", &ex, &addrs, 25).unwrap_err();
        assert!(e.permanent);
        assert_eq!(e.enhanced_status, "5.4.4");
        addrs.insert("a".to_string(), Answer::TempFail("timeout".into()));
        assert!(!targets("d", &ex, &addrs, 25).unwrap_err().permanent);
        // Implicit MX: the domain itself has no address.
        let ex = vec!["d".to_string()];
        let mut addrs = HashMap::new();
        addrs.insert("d".to_string(), Answer::NxDomain);
        let e = targets("d", &ex, &addrs, 25).unwrap_err();
        assert_eq!(e.enhanced_status, "5.1.2");
    }

    #[test]
    fn targets_are_capped() {
        let ex = vec!["a".to_string()];
        let mut addrs = HashMap::new();
        addrs.insert(
            "a".to_string(),
            Answer::Records((1..=30).map(|i| ip(&format!("192.0.2.{i}"))).collect()),
        );
        assert_eq!(targets("d", &ex, &addrs, 25).unwrap().len(), MAX_TARGETS);
    }

    #[test]
    fn address_literals() {
        assert_eq!(address_literal("[192.0.2.1]"), Some(ip("192.0.2.1")));
        assert_eq!(
            address_literal("[IPv6:2001:db8::1]"),
            Some(ip("2001:db8::1"))
        );
        assert_eq!(address_literal("[ipv6:::1]"), Some(ip("::1")));
        assert_eq!(address_literal("example.com"), None);
        for none in [
            "[bogus]",
            "[::1]",
            "[IPv6:192.0.2.1]",
            "[192.0.2.256]",
            "[192.0.2]",
            "[x-tag:stuff]",
            "[0.0.0.0]",
            "[255.255.255.255]",
            "[224.0.0.1]",
            "[IPv6:::]",
            "[IPv6:ff02::1]",
            "192.0.2.1",
        ] {
            assert_eq!(address_literal(none), None, "{none}");
        }
    }
}
