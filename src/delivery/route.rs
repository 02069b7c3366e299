//! Next-hop selection: which `[[route]]` (smarthost / fixed MX) or direct MX carries each
//! recipient, and how a message's due recipients split into SMTP transactions.
//!
//! Pure: no DNS, no sockets. First matching route wins; no match means direct MX for the
//! recipient's domain.

use crate::config::{RouteConfig, split_host_port};
use crate::store::QueuedMessage;

/// Where one transaction goes: a configured route (by index in `[[route]]`) or the MX hosts of
/// a recipient domain. Also the key for connection reuse and per-destination limits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Destination {
    Route(usize),
    /// Lower-cased recipient domain (or address literal such as `[192.0.2.1]`).
    Domain(String),
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Route(i) => write!(f, "route[{i}]"),
            Destination::Domain(d) => f.write_str(d),
        }
    }
}

/// Which reverse-path a transaction uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenderMode {
    /// The message's own envelope sender (null sender for DSNs, `keep_sender` routes, or no
    /// bounce domain configured).
    Original,
    /// One VERP address per recipient, so the transaction carries exactly one recipient.
    Verp,
}

/// Most recipients in one transaction (Postfix `smtp_destination_recipient_limit`); servers
/// commonly refuse the 101st with `452 4.5.3`, which would cost the rest a retry interval.
pub const MAX_RECIPIENTS_PER_TRANSACTION: usize = 50;

/// One planned SMTP transaction: recipients (by index) that share a destination and sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub destination: Destination,
    pub sender: SenderMode,
    pub recipients: Vec<u32>,
}

/// The domain part of an address, lower-cased (an IPv6 literal's tag spelt `IPv6:`, as
/// RFC 5321 4.1.3 writes it); empty when there is none (null sender).
pub fn domain_of(address: &str) -> String {
    let domain = address
        .rsplit_once('@')
        .map(|(_, d)| d.trim_end_matches('.').to_ascii_lowercase())
        .unwrap_or_default();
    match domain.strip_prefix("[ipv6:") {
        Some(rest) => format!("[IPv6:{rest}"),
        None => domain,
    }
}

/// Whether `route` applies to a recipient domain / sender domain / AUTH user.
pub fn route_matches(
    route: &RouteConfig,
    recipient_domain: &str,
    sender_domain: &str,
    auth_user: Option<&str>,
) -> bool {
    let domain_ok = route
        .domains
        .iter()
        .any(|d| d == "*" || same_domain(d, recipient_domain));
    let sender_ok = route.sender_domains.is_empty()
        || route
            .sender_domains
            .iter()
            .any(|d| !sender_domain.is_empty() && same_domain(d, sender_domain));
    let user_ok = route.auth_users.is_empty()
        || auth_user.is_some_and(|u| route.auth_users.iter().any(|a| a == u));
    domain_ok && sender_ok && user_ok
}

/// Whether a route's domain names an address's domain: in any case, a trailing dot
/// aside, and an address literal by the address it names (`[IPv6:2001:DB8::1]` is
/// `[ipv6:2001:db8:0::1]`).
pub(crate) fn same_domain(route_domain: &str, domain: &str) -> bool {
    match (
        super::dns::address_literal(route_domain),
        super::dns::address_literal(domain),
    ) {
        (Some(a), Some(b)) => a == b,
        _ => route_domain
            .trim_end_matches('.')
            .eq_ignore_ascii_case(domain.trim_end_matches('.')),
    }
}

/// The destination of one recipient: the first matching route, else its domain's MX.
pub fn select(
    routes: &[RouteConfig],
    recipient: &str,
    envelope_sender: &str,
    auth_user: Option<&str>,
) -> Destination {
    let rcpt_domain = domain_of(recipient);
    let sender_domain = domain_of(envelope_sender);
    routes
        .iter()
        .position(|r| route_matches(r, &rcpt_domain, &sender_domain, auth_user))
        .map(Destination::Route)
        .unwrap_or(Destination::Domain(rcpt_domain))
}

/// Splits a message's due recipients into transactions: one per destination, except that
/// VERP senders differ per recipient, so with VERP each recipient is its own transaction
/// (as Postfix VERP does). Order follows the first recipient of each batch.
pub fn plan(routes: &[RouteConfig], msg: &QueuedMessage, verp_enabled: bool) -> Vec<Batch> {
    let mut batches: Vec<Batch> = Vec::new();
    for rcpt in &msg.recipients {
        let destination = select(
            routes,
            &rcpt.address,
            &msg.envelope_sender,
            msg.auth_user.as_deref(),
        );
        let keep_sender = match destination {
            Destination::Route(i) => routes.get(i).is_some_and(|r| r.keep_sender),
            Destination::Domain(_) => false,
        };
        // A DSN (null sender) must keep the null sender: a VERP sender would let it bounce.
        let sender = if verp_enabled && !keep_sender && !msg.envelope_sender.is_empty() {
            SenderMode::Verp
        } else {
            SenderMode::Original
        };
        if sender == SenderMode::Original
            && let Some(b) = batches.iter_mut().find(|b| {
                b.destination == destination
                    && b.sender == SenderMode::Original
                    && b.recipients.len() < MAX_RECIPIENTS_PER_TRANSACTION
            })
        {
            b.recipients.push(rcpt.index);
            continue;
        }
        batches.push(Batch {
            destination,
            sender,
            recipients: vec![rcpt.index],
        });
    }
    batches
}

/// A fixed next hop of a route, parsed from `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedHop {
    pub host: String,
    pub port: u16,
}

/// The route's `mx` list as hops, in order (config validation already rejected bad entries).
pub fn fixed_hops(route: &RouteConfig) -> Vec<FixedHop> {
    route
        .mx
        .iter()
        .filter_map(|hop| split_host_port(hop))
        .map(|(host, port)| FixedHop { host, port })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::receipt::ReceiptId;
    use crate::store::{QueuedRecipient, RecipientStatus};

    fn route(domains: &[&str]) -> RouteConfig {
        RouteConfig {
            domains: domains.iter().map(|s| s.to_string()).collect(),
            sender_domains: vec![],
            auth_users: vec![],
            mx: vec!["127.0.0.1:2526".into()],
            tls: Default::default(),
            implicit_tls: false,
            verify_certificate: None,
            ca_file: None,
            auth_user: None,
            auth_password_file: None,
            auth_password_env: None,
            keep_sender: false,
        }
    }

    fn msg(sender: &str, rcpts: &[&str]) -> QueuedMessage {
        QueuedMessage {
            receipt: ReceiptId::new(),
            received_at_ms: 0,
            envelope_sender: sender.into(),
            auth_user: None,
            envid: None,
            ret: None,
            eight_bit: false,
            smtputf8: false,
            size: 10,
            message_id: None,
            subject: None,
            recipients: rcpts
                .iter()
                .enumerate()
                .map(|(i, a)| QueuedRecipient {
                    index: i as u32,
                    address: a.to_string(),
                    orcpt: None,
                    notify: None,
                    status: RecipientStatus::Queued,
                    attempts: 0,
                    next_attempt_at_ms: 0,
                    first_deferred_at_ms: None,
                    delay_dsn_sent: false,
                    last_reply_code: None,
                    last_enhanced_status: None,
                    last_reply_text: None,
                    retry_requested_at: None,
                })
                .collect(),
        }
    }

    #[test]
    fn no_route_means_direct_mx_by_lowercased_domain() {
        assert_eq!(
            select(&[], "Bob@Example.COM", "a@b.c", None),
            Destination::Domain("example.com".into())
        );
    }

    #[test]
    fn first_matching_route_wins_and_star_matches_all() {
        let routes = vec![route(&["example.org"]), route(&["*"])];
        assert_eq!(
            select(&routes, "x@EXAMPLE.org", "", None),
            Destination::Route(0)
        );
        assert_eq!(
            select(&routes, "x@other.net", "", None),
            Destination::Route(1)
        );
    }

    #[test]
    fn sender_domain_and_auth_user_restrict_a_route() {
        let mut r = route(&["*"]);
        r.sender_domains = vec!["shop.example".into()];
        r.auth_users = vec!["app1".into()];
        let routes = vec![r];
        assert_eq!(
            select(&routes, "x@y.z", "news@shop.example", Some("app1")),
            Destination::Route(0)
        );
        assert_eq!(
            select(&routes, "x@y.z", "news@other.example", Some("app1")),
            Destination::Domain("y.z".into())
        );
        assert_eq!(
            select(&routes, "x@y.z", "news@shop.example", None),
            Destination::Domain("y.z".into())
        );
        // The null sender has no domain, so it never matches a sender_domains route.
        assert_eq!(
            select(&routes, "x@y.z", "", Some("app1")),
            Destination::Domain("y.z".into())
        );
    }

    #[test]
    fn without_verp_recipients_batch_per_destination() {
        let m = msg(
            "s@a.example",
            &["1@x.example", "2@y.example", "3@X.example"],
        );
        let b = plan(&[], &m, false);
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].destination, Destination::Domain("x.example".into()));
        assert_eq!(b[0].recipients, vec![0, 2]);
        assert_eq!(b[1].recipients, vec![1]);
        assert!(b.iter().all(|b| b.sender == SenderMode::Original));
    }

    #[test]
    fn with_verp_each_recipient_is_its_own_transaction() {
        let m = msg("s@a.example", &["1@x.example", "2@x.example"]);
        let b = plan(&[], &m, true);
        assert_eq!(b.len(), 2);
        assert!(b.iter().all(|b| b.sender == SenderMode::Verp));
        assert_eq!(b[0].recipients, vec![0]);
        assert_eq!(b[1].recipients, vec![1]);
    }

    #[test]
    fn keep_sender_route_batches_even_with_verp() {
        let mut r = route(&["*"]);
        r.keep_sender = true;
        let m = msg("s@a.example", &["1@x.example", "2@y.example"]);
        let b = plan(&[r], &m, true);
        assert_eq!(
            b,
            vec![Batch {
                destination: Destination::Route(0),
                sender: SenderMode::Original,
                recipients: vec![0, 1]
            }]
        );
    }

    #[test]
    fn null_sender_is_never_verped() {
        let m = msg("", &["1@x.example", "2@x.example"]);
        let b = plan(&[], &m, true);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].sender, SenderMode::Original);
    }

    #[test]
    fn large_batches_split_at_the_recipient_limit() {
        let addrs: Vec<String> = (0..120).map(|i| format!("r{i}@x.example")).collect();
        let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        let b = plan(&[], &msg("s@a.example", &refs), false);
        let sizes: Vec<usize> = b.iter().map(|b| b.recipients.len()).collect();
        assert_eq!(sizes, vec![50, 50, 20]);
        let mut all: Vec<u32> = b.iter().flat_map(|b| b.recipients.clone()).collect();
        all.sort();
        assert_eq!(all, (0..120).collect::<Vec<u32>>());
    }

    #[test]
    fn an_ipv6_literal_keeps_its_tag_as_the_rfc_spells_it() {
        assert_eq!(domain_of("u@[ipv6:2001:DB8::1]"), "[IPv6:2001:db8::1]");
        assert_eq!(domain_of("u@Shop.Example."), "shop.example");
    }

    #[test]
    fn a_route_names_an_address_literal_by_its_address() {
        let r = route(&["[IPv6:2001:DB8::1]", "[192.0.2.1]", "Shop.Example."]);
        for (rcpt, sender) in [
            ("u@[ipv6:2001:db8:0::1]", ""),
            ("u@[192.0.2.1]", ""),
            ("u@shop.example", ""),
        ] {
            assert!(route_matches(&r, &domain_of(rcpt), sender, None), "{rcpt}");
        }
        for rcpt in ["u@[192.0.2.2]", "u@[ipv6:2001:db8::2]", "u@192.0.2.1"] {
            assert!(!route_matches(&r, &domain_of(rcpt), "", None), "{rcpt}");
        }
        let mut by_sender = route(&["*"]);
        by_sender.sender_domains = vec!["[127.0.0.1]".into()];
        assert!(route_matches(&by_sender, "x.test", "[127.0.0.1]", None));
        assert!(!route_matches(&by_sender, "x.test", "[127.0.0.2]", None));
    }

    #[test]
    fn fixed_hops_keep_order() {
        let mut r = route(&["*"]);
        r.mx = vec!["a.example:25".into(), "[::1]:2525".into()];
        assert_eq!(
            fixed_hops(&r),
            vec![
                FixedHop {
                    host: "a.example".into(),
                    port: 25
                },
                FixedHop {
                    host: "::1".into(),
                    port: 2525
                }
            ]
        );
    }
}
