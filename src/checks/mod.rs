//! Checks before sending, run at RCPT through the SMTP stage's [`RecipientPolicy`] hook:
//! mail for the bounce domain (accepted from anyone, VERP MAC verified), relay control, the
//! suppression list, and whether the recipient's domain can receive mail at all.
//!
//! The decisions are pure functions ([`bounce_domain_verdict`], [`suppression_verdict`],
//! [`domain_verdict`]); [`SubmissionPolicy`] only gathers the facts (store, DNS) they need.

pub mod suppressions;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::bounce::{BounceReason, verp};
use crate::config::{Config, SuppressionAction};
use crate::delivery::dns::MxResolver;
use crate::metrics::Metrics;
use crate::smtp::policy::relay_verdict;
use crate::smtp::throttle::{Count, FailureCount};
use crate::smtp::{RecipientCheck, RecipientPolicy, RecipientVerdict, Reply};
use crate::spool::PresetOutcome;
use crate::store::{RecipientStatus, Suppression};

pub use suppressions::SuppressionCache;

/// Local parts at the bounce domain that take mail without a VERP tag: DSNs sent to the
/// plain bounce address, feedback loops (ARF) and the RFC 2142 role accounts.
const PLAIN_BOUNCE_LOCALS: [&str; 3] = ["postmaster", "abuse", "fbl"];

/// What the domain check found for a recipient domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainStatus {
    /// Has a usable MX or address.
    Receives,
    /// NXDOMAIN (or no address for any exchange): reason `hostunknown`.
    DoesNotExist,
    /// Null MX (RFC 7505): reason `notaccept`.
    NullMx,
    /// Timeout, SERVFAIL: never a reason to reject.
    Unknown,
}

/// What an address at the bounce domain is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BounceAddress {
    /// The plain bounce address, a role account (RFC 2142) or `<postmaster>`.
    Plain,
    /// A VERP address whose MAC verifies.
    Verp,
    /// Shaped as a VERP address, with a MAC that does not verify: forged, or guessed.
    ForgedVerp,
    /// Any other local part.
    Unknown,
}

/// Forged VERP MACs (a 40-bit MAC can be guessed online) one client network may send
/// within [`FORGED_VERP_WINDOW`]; past them every VERP address from it gets `450` unchecked
/// until the window has passed.
pub const FORGED_VERP_LIMIT: u32 = 10;
pub const FORGED_VERP_WINDOW: Duration = Duration::from_secs(600);

/// What `address` is when it is at the bounce domain (or `<postmaster>` with one set);
/// `None` otherwise.
pub fn bounce_address(
    address: &str,
    bounce_domain: &str,
    bounce_local: &str,
    key: Option<&[u8]>,
) -> Option<BounceAddress> {
    if bounce_domain.is_empty() {
        return None;
    }
    if address.eq_ignore_ascii_case("postmaster") {
        return Some(BounceAddress::Plain);
    }
    let (local, domain) = address.rsplit_once('@')?;
    if !domain
        .trim_end_matches('.')
        .eq_ignore_ascii_case(bounce_domain)
    {
        return None;
    }
    let local_lc = local.to_ascii_lowercase();
    if local_lc == bounce_local.to_ascii_lowercase() || PLAIN_BOUNCE_LOCALS.contains(&&*local_lc) {
        return Some(BounceAddress::Plain);
    }
    Some(
        match key.map(|k| verp::decode(k, bounce_local, bounce_domain, address)) {
            Some(Ok(_)) => BounceAddress::Verp,
            Some(Err(verp::VerpError::BadMac)) => BounceAddress::ForgedVerp,
            _ => BounceAddress::Unknown,
        },
    )
}

/// `Some(verdict)` when `address` is at the bounce domain: VERP addresses whose MAC verifies
/// and the plain bounce addresses are inbound bounce mail; anything else there is unknown.
pub fn bounce_domain_verdict(
    address: &str,
    bounce_domain: &str,
    bounce_local: &str,
    key: Option<&[u8]>,
) -> Option<RecipientVerdict> {
    let kind = bounce_address(address, bounce_domain, bounce_local, key);
    bounce_verdict(address, bounce_domain, kind)
}

/// [`bounce_domain_verdict`] for an address whose [`bounce_address`] is known already.
fn bounce_verdict(
    address: &str,
    bounce_domain: &str,
    kind: Option<BounceAddress>,
) -> Option<RecipientVerdict> {
    if address.eq_ignore_ascii_case("postmaster") {
        // RFC 5321 4.5.1: `<Postmaster>` without a domain must be taken. mailtrail has no
        // mailbox of its own; with a bounce domain it lands with the bounce mail.
        return Some(if bounce_domain.is_empty() {
            RecipientVerdict::Reject(Reply::new(
                550,
                "5.1.1",
                "No postmaster mailbox here: this relay receives mail only for its bounce \
                 domain, and none is set",
            ))
        } else {
            RecipientVerdict::AcceptInboundBounce
        });
    }
    Some(match kind? {
        BounceAddress::Plain | BounceAddress::Verp => RecipientVerdict::AcceptInboundBounce,
        BounceAddress::ForgedVerp => RecipientVerdict::Reject(Reply::new(
            550,
            "5.1.1",
            "Unknown bounce address (VERP tag does not verify)",
        )),
        BounceAddress::Unknown => RecipientVerdict::Reject(Reply::new(
            550,
            "5.1.1",
            "Unknown bounce address (no such mailbox at the bounce domain)",
        )),
    })
}

/// The verdict for a suppressed address: recorded `suppressed` and not relayed (like Amazon
/// SES), or refused at RCPT when configured so.
pub fn suppression_verdict(entry: &Suppression, action: SuppressionAction) -> RecipientVerdict {
    let since = crate::cli::log::format_time(entry.first_at_ms);
    let text = format!(
        "Recipient address suppressed since {since} after {} ({})",
        entry.source, entry.reason
    );
    match action {
        // The status a refusal would give (below), for the DSN the sender gets.
        SuppressionAction::Accept => RecipientVerdict::AcceptWithOutcome(PresetOutcome::new(
            RecipientStatus::Suppressed,
            BounceReason::Suppressed,
            Some("5.7.1"),
            None,
            text,
        )),
        SuppressionAction::Refuse => RecipientVerdict::Reject(Reply::new(550, "5.7.1", text)),
    }
}

/// The verdict for a domain that cannot receive mail: accepted (the client learns nothing it
/// could not look up itself) and recorded `rejected` without a delivery attempt.
pub fn domain_verdict(domain: &str, status: DomainStatus) -> Option<RecipientVerdict> {
    let (reason, status, text) = match status {
        DomainStatus::Receives | DomainStatus::Unknown => return None,
        DomainStatus::DoesNotExist => (
            BounceReason::HostUnknown,
            "5.1.2",
            format!("Recipient domain {domain} does not exist"),
        ),
        DomainStatus::NullMx => (
            BounceReason::NotAccept,
            "5.1.10",
            format!("Recipient domain {domain} accepts no mail (null MX, RFC 7505)"),
        ),
    };
    Some(RecipientVerdict::AcceptWithOutcome(PresetOutcome::new(
        RecipientStatus::Rejected,
        reason,
        Some(status),
        None,
        format!("{status} {text}"),
    )))
}

/// True when a `[[route]]` with fixed next hops may take this domain: such domains are not
/// checked (the next hop decides). Domains match as routing matches them
/// (`route::same_domain`: any case, a trailing dot aside, address literals by address);
/// a route's sender or AUTH-user condition is not known at RCPT time for every route, so
/// any route naming the domain counts.
pub fn routed_to_fixed_hop(config: &Config, domain: &str) -> bool {
    config.routes.iter().any(|r| {
        !r.mx.is_empty()
            && r.domains
                .iter()
                .any(|d| d == "*" || crate::delivery::route::same_domain(d, domain))
    })
}

/// Recipient-domain lookups with a cache; a temporary failure is cached briefly only.
pub struct DomainCheck {
    resolver: MxResolver,
    timeout: Duration,
    ttl: Duration,
    cache: Mutex<HashMap<String, (Instant, DomainStatus)>>,
}

/// Most domains kept in the cache; past it the cache starts over (bounded memory).
const DOMAIN_CACHE_MAX: usize = 100_000;
const UNKNOWN_TTL: Duration = Duration::from_secs(60);

impl DomainCheck {
    pub fn new(resolver: MxResolver, timeout: Duration, ttl: Duration) -> Self {
        Self {
            resolver,
            timeout,
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub async fn status(&self, domain: &str) -> DomainStatus {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        if crate::delivery::dns::address_literal(&domain).is_some() {
            return DomainStatus::Receives;
        }
        if let Ok(cache) = self.cache.lock()
            && let Some((at, status)) = cache.get(&domain)
        {
            let ttl = if *status == DomainStatus::Unknown {
                UNKNOWN_TTL
            } else {
                self.ttl
            };
            if at.elapsed() < ttl {
                return *status;
            }
        }
        let status =
            match tokio::time::timeout(self.timeout, self.resolver.resolve(&domain, 25)).await {
                Ok(Ok(_)) => DomainStatus::Receives,
                Ok(Err(f)) if f.permanent && f.reason == "notaccept" => DomainStatus::NullMx,
                Ok(Err(f)) if f.permanent => DomainStatus::DoesNotExist,
                Ok(Err(_)) | Err(_) => DomainStatus::Unknown,
            };
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= DOMAIN_CACHE_MAX {
                cache.clear();
            }
            cache.insert(domain, (Instant::now(), status));
        }
        status
    }
}

/// The policy `serve` installs: bounce domain, relay control, suppression, domain check.
pub struct SubmissionPolicy {
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    verp_key: Option<Vec<u8>>,
    domains: Option<DomainCheck>,
    suppressions: Arc<SuppressionCache>,
    /// Forged VERP MACs per client network.
    forged_verps: FailureCount,
}

impl SubmissionPolicy {
    pub fn new(
        config: Arc<Config>,
        suppressions: Arc<SuppressionCache>,
        metrics: Arc<Metrics>,
        verp_key: Option<Vec<u8>>,
        domains: Option<DomainCheck>,
    ) -> Self {
        Self {
            config,
            metrics,
            verp_key,
            domains,
            suppressions,
            forged_verps: FailureCount::new(FORGED_VERP_LIMIT, FORGED_VERP_WINDOW),
        }
    }

    /// `Some(450)` for a VERP address from a client network that sent too many forged ones
    /// lately (a valid one too: the reply must not tell a guess that hit); counts a forged
    /// one otherwise.
    fn forged_verp_guard(
        &self,
        ip: std::net::IpAddr,
        kind: Option<BounceAddress>,
    ) -> Option<RecipientVerdict> {
        if !matches!(kind, Some(BounceAddress::Verp | BounceAddress::ForgedVerp)) {
            return None;
        }
        let now = Instant::now();
        // Untracked: 100,000 networks have forged lately (an IPv6 /48 holds 65,536 /64s),
        // and one more would not be counted: turned away too, as all are at the limit.
        if matches!(
            self.forged_verps.count(ip, now),
            Count::AtLimit | Count::Untracked
        ) {
            return Some(RecipientVerdict::Reject(Reply::new(
                450,
                "4.7.1",
                "Too many forged bounce addresses from your address, try again later",
            )));
        }
        if kind == Some(BounceAddress::ForgedVerp) && self.forged_verps.failed(ip, now) {
            tracing::warn!(
                client = %ip,
                "{FORGED_VERP_LIMIT} forged VERP addresses from this client: its VERP \
                 addresses get 450 for {} minutes",
                FORGED_VERP_WINDOW.as_secs() / 60
            );
        }
        None
    }
}

#[async_trait::async_trait]
impl RecipientPolicy for SubmissionPolicy {
    async fn check(&self, recipient: &RecipientCheck) -> RecipientVerdict {
        let d = &self.config.delivery;
        // Read once (the MAC check is an HMAC) for the guard and the verdict.
        let kind = bounce_address(
            &recipient.address,
            &d.bounce_domain,
            &d.bounce_local_part,
            self.verp_key.as_deref(),
        );
        if let Some(v) = self.forged_verp_guard(recipient.client_ip, kind) {
            return v;
        }
        if let Some(v) = bounce_verdict(&recipient.address, &d.bounce_domain, kind) {
            return v;
        }
        let relay = relay_verdict(recipient);
        if !matches!(relay, RecipientVerdict::Accept) {
            return relay;
        }
        if self.config.suppression.enabled {
            let now = chrono::Utc::now().timestamp_millis();
            match self.suppressions.lookup(&recipient.address, now).await {
                Ok(Some(entry)) => {
                    self.metrics.suppressed_recipients.inc();
                    return suppression_verdict(&entry, self.config.suppression.action);
                }
                Ok(None) => {}
                // The store will refuse the message too; say so now rather than later.
                Err(e) => {
                    tracing::warn!(error = %e, "suppression lookup failed");
                    return RecipientVerdict::Reject(Reply::new(
                        451,
                        "4.3.0",
                        "Temporary lookup failure, try again later",
                    ));
                }
            }
        }
        if let Some(check) = &self.domains
            && let Some((_, domain)) = recipient.address.rsplit_once('@')
            && !routed_to_fixed_hop(&self.config, domain)
            && let Some(v) = domain_verdict(domain, check.status(domain).await)
        {
            if let RecipientVerdict::AcceptWithOutcome(o) = &v {
                self.metrics
                    .domain_check_rejections
                    .get_or_create(&crate::metrics::OutcomeLabel {
                        outcome: o.reason.clone(),
                    })
                    .inc();
            }
            return v;
        }
        RecipientVerdict::Accept
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::receipt::ReceiptId;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn postmaster_without_a_domain_is_bounce_mail_or_refused() {
        assert_eq!(
            bounce_domain_verdict("PostMaster", "bounce.example.com", "bounces", Some(KEY)),
            Some(RecipientVerdict::AcceptInboundBounce)
        );
        assert!(matches!(
            bounce_domain_verdict("postmaster", "", "bounces", Some(KEY)),
            Some(RecipientVerdict::Reject(r)) if r.code == 550
        ));
    }

    #[test]
    fn verp_address_with_good_mac_is_inbound_bounce() {
        let r = ReceiptId::new();
        let addr = verp::encode(KEY, "bounces", "bounce.example.com", r, 2);
        assert_eq!(
            bounce_domain_verdict(&addr, "bounce.example.com", "bounces", Some(KEY)),
            Some(RecipientVerdict::AcceptInboundBounce)
        );
        // Case-folded by some MTA on the way back: still verifies.
        assert_eq!(
            bounce_domain_verdict(
                &addr.to_uppercase(),
                "bounce.example.com",
                "bounces",
                Some(KEY)
            ),
            Some(RecipientVerdict::AcceptInboundBounce)
        );
    }

    #[test]
    fn forged_verp_address_is_refused_550_5_1_1() {
        let r = ReceiptId::new();
        let addr = verp::encode(b"another key", "bounces", "bounce.example.com", r, 0);
        match bounce_domain_verdict(&addr, "bounce.example.com", "bounces", Some(KEY)) {
            Some(RecipientVerdict::Reject(reply)) => {
                assert_eq!(reply.code, 550);
                assert_eq!(reply.enhanced_status, Some("5.1.1"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            bounce_domain_verdict(
                "someone@bounce.example.com",
                "bounce.example.com",
                "bounces",
                Some(KEY)
            ),
            Some(RecipientVerdict::Reject(_))
        ));
    }

    #[test]
    fn plain_bounce_and_role_addresses_are_inbound_bounce() {
        for a in [
            "bounces@bounce.example.com",
            "Postmaster@Bounce.Example.Com",
            "fbl@bounce.example.com",
        ] {
            assert_eq!(
                bounce_domain_verdict(a, "bounce.example.com", "bounces", Some(KEY)),
                Some(RecipientVerdict::AcceptInboundBounce),
                "{a}"
            );
        }
    }

    #[test]
    fn other_domains_and_no_bounce_domain_are_not_decided_here() {
        assert_eq!(
            bounce_domain_verdict("a@example.org", "bounce.example.com", "bounces", Some(KEY)),
            None
        );
        assert_eq!(
            bounce_domain_verdict("bounces@bounce.example.com", "", "bounces", Some(KEY)),
            None
        );
    }

    fn entry() -> Suppression {
        Suppression {
            address: "gone@example.org".into(),
            reason: "userunknown".into(),
            source: "bounce".into(),
            first_at_ms: 0,
            last_at_ms: 0,
            count: 1,
            expires_at_ms: None,
        }
    }

    #[test]
    fn suppressed_address_is_recorded_or_refused_as_configured() {
        match suppression_verdict(&entry(), SuppressionAction::Accept) {
            RecipientVerdict::AcceptWithOutcome(p) => {
                assert_eq!(p.status, RecipientStatus::Suppressed);
                assert_eq!(p.reason, "suppressed");
                // Permanent, as Amazon SES reports a suppressed address: not retried.
                assert_eq!(p.bounce_type, "hard");
                assert!(p.text.contains("userunknown"), "{}", p.text);
            }
            other => panic!("{other:?}"),
        }
        match suppression_verdict(&entry(), SuppressionAction::Refuse) {
            RecipientVerdict::Reject(reply) => {
                assert_eq!((reply.code, reply.enhanced_status), (550, Some("5.7.1")));
                assert!(reply.lines[0].contains("suppressed"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn dead_domains_are_rejected_without_attempt_and_unknown_never() {
        let reason = |s| match domain_verdict("x.test", s) {
            Some(RecipientVerdict::AcceptWithOutcome(p)) => {
                assert_eq!(p.status, RecipientStatus::Rejected);
                // A domain that cannot receive mail is a permanent failure.
                assert_eq!(p.bounce_type, "hard");
                Some(p.reason)
            }
            None => None,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            reason(DomainStatus::DoesNotExist).as_deref(),
            Some("hostunknown")
        );
        assert_eq!(reason(DomainStatus::NullMx).as_deref(), Some("notaccept"));
        assert_eq!(reason(DomainStatus::Unknown), None);
        assert_eq!(reason(DomainStatus::Receives), None);
    }

    #[test]
    fn fixed_routes_exempt_their_domains() {
        let c =
            Config::parse("[[route]]\ndomains = [\"routed.test\"]\nmx = [\"127.0.0.1:2626\"]\n")
                .unwrap();
        assert!(routed_to_fixed_hop(&c, "ROUTED.test"));
        assert!(routed_to_fixed_hop(&c, "routed.test."));
        assert!(!routed_to_fixed_hop(&c, "other.test"));
    }

    #[test]
    fn an_address_at_the_bounce_domain_is_plain_verp_forged_or_unknown() {
        let r = ReceiptId::new();
        let good = verp::encode(KEY, "bounces", "b.test", r, 1);
        let forged = verp::encode(b"another key", "bounces", "b.test", r, 1);
        let kind = |a: &str| bounce_address(a, "b.test", "bounces", Some(KEY));
        assert_eq!(kind("bounces@b.test"), Some(BounceAddress::Plain));
        assert_eq!(kind("FBL@b.test."), Some(BounceAddress::Plain));
        assert_eq!(kind("postmaster"), Some(BounceAddress::Plain));
        assert_eq!(kind(&good), Some(BounceAddress::Verp));
        assert_eq!(kind(&forged), Some(BounceAddress::ForgedVerp));
        assert_eq!(kind("jane@b.test"), Some(BounceAddress::Unknown));
        assert_eq!(kind("jane@other.test"), None);
        assert_eq!(bounce_address(&good, "", "bounces", Some(KEY)), None);
    }

    #[tokio::test]
    async fn a_network_that_guesses_verp_macs_is_turned_away_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let config: Config = Config::parse(
            "[delivery]\nbounce_domain = \"b.test\"\n[checks]\ndomain_check = false\n",
        )
        .unwrap();
        let store: Arc<dyn crate::store::Store> = Arc::new(
            crate::store::sqlite::SqliteStore::open_path(&dir.path().join("t.db")).unwrap(),
        );
        let policy = SubmissionPolicy::new(
            Arc::new(config),
            Arc::new(SuppressionCache::new(store)),
            Arc::new(Metrics::new()),
            Some(KEY.to_vec()),
            None,
        );
        let rcpt = |address: String, ip: &str| RecipientCheck {
            address,
            envelope_sender: String::new(),
            client_ip: ip.parse().unwrap(),
            relay_allowed: false,
            auth_user: None,
        };
        let code = |v: RecipientVerdict| match v {
            RecipientVerdict::Reject(r) => r.code,
            RecipientVerdict::AcceptInboundBounce => 250,
            other => panic!("{other:?}"),
        };
        let r = ReceiptId::new();
        let guess = |i: u32| verp::encode(b"guess", "bounces", "b.test", r, i);
        let good = verp::encode(KEY, "bounces", "b.test", r, 0);
        for i in 0..FORGED_VERP_LIMIT {
            let v = policy.check(&rcpt(guess(i), "192.0.2.7")).await;
            assert_eq!(code(v), 550, "guess {i}");
        }
        // At the limit: a guess, and the real address too (a hit must look like a miss).
        for address in [guess(99), good.clone()] {
            let v = policy.check(&rcpt(address, "192.0.2.7")).await;
            match v {
                RecipientVerdict::Reject(reply) => {
                    assert_eq!((reply.code, reply.enhanced_status), (450, Some("4.7.1")))
                }
                other => panic!("{other:?}"),
            }
        }
        // The plain bounce address still takes its bounces; other networks are not held.
        let plain = policy
            .check(&rcpt("bounces@b.test".into(), "192.0.2.7"))
            .await;
        assert_eq!(code(plain), 250);
        let other = policy.check(&rcpt(good, "192.0.2.8")).await;
        assert_eq!(code(other), 250);
        // Unknown local parts (backscatter for made-up addresses) are not guesses.
        for i in 0..2 * FORGED_VERP_LIMIT {
            let v = policy
                .check(&rcpt(format!("x{i}@b.test"), "192.0.2.9"))
                .await;
            assert_eq!(code(v), 550);
        }
        let after = policy
            .check(&rcpt(
                verp::encode(KEY, "bounces", "b.test", r, 1),
                "192.0.2.9",
            ))
            .await;
        assert_eq!(code(after), 250);
    }
}
