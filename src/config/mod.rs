//! The TOML configuration: every key with its default, validated once at start.
//!
//! Unknown keys are errors (`deny_unknown_fields`), so a typo names the key instead of being
//! silently ignored. `config/mailtrail.toml` documents every key; keep the two in step.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the store (SQLite), spool and generated TLS material live.
    pub data_dir: PathBuf,
    /// Name used in the SMTP banner, EHLO reply, `Received:` headers and outbound EHLO.
    pub hostname: String,
    pub smtp: SmtpConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
    pub delivery: DeliveryConfig,
    pub dns: DnsConfig,
    #[serde(rename = "route")]
    pub routes: Vec<RouteConfig>,
    pub bounce: BounceConfig,
    pub suppression: SuppressionConfig,
    pub checks: ChecksConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./mailtrail-data"),
            hostname: default_hostname(),
            smtp: SmtpConfig::default(),
            http: HttpConfig::default(),
            log: LogConfig::default(),
            delivery: DeliveryConfig::default(),
            dns: DnsConfig::default(),
            routes: Vec::new(),
            bounce: BounceConfig::default(),
            suppression: SuppressionConfig::default(),
            checks: ChecksConfig::default(),
        }
    }
}

fn default_hostname() -> String {
    gethostname::gethostname()
        .into_string()
        .ok()
        .filter(|h| is_route_domain(h) && h != "*")
        .unwrap_or_else(|| "localhost".to_string())
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    /// Plain listeners (STARTTLS offered).
    pub listen: Vec<SocketAddr>,
    /// Implicit-TLS listeners (RFC 8314 "submissions"), empty by default.
    pub tls_listen: Vec<SocketAddr>,
    /// Addresses this server receives mail on by way of a proxy or NAT (Postfix's
    /// `proxy_interfaces`): a next hop on one of them, on any port, is this server itself (a
    /// mail loop, `5.4.6`), as a next hop on one of the listeners is.
    pub proxy_interfaces: Vec<IpAddr>,
    /// Clients in these networks may relay without AUTH.
    pub relay_networks: Vec<IpNet>,
    /// PEM certificate chain and key; when both are absent a self-signed pair is generated in
    /// `data_dir/tls/` at first start.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Largest message accepted, in bytes (advertised with SIZE).
    pub max_message_size: usize,
    /// Bytes of message content all sessions together hold in memory while receiving and
    /// storing; beyond it a message gets `452 4.3.1`.
    pub max_content_memory: usize,
    /// Free bytes the data_dir's file system must keep for `MAIL` to be taken; below it
    /// `452 4.3.1` (Postfix's `queue_minfree`). Unset: 1.5 × `max_message_size`, Postfix's
    /// own floor; 0: no check.
    pub min_free_space: Option<u64>,
    pub max_recipients: usize,
    /// Longest command line, CRLF included.
    pub max_command_line: usize,
    /// Longest DATA line, CRLF included; longer lines reject the message (`500 5.5.2`... see
    /// the session module).
    pub max_data_line: usize,
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub data_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Protocol errors (4xx/5xx replies to bad commands) before `421` and close.
    pub max_errors: usize,
    /// `Received:` fields a message may already carry; more is a mail loop (`554 5.4.6`).
    pub max_hops: usize,
    /// How long `serve` waits for transactions in flight at SIGTERM before closing them.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// AUTH refusals from one client network (an IPv4 address, an IPv6 /64) within
    /// `auth_failure_window` after which its AUTH gets `454 4.7.0` unchecked until the
    /// window has passed.
    pub auth_failure_limit: u32,
    #[serde(with = "humantime_serde")]
    pub auth_failure_window: Duration,
    /// AUTH users: `[[smtp.users]] name = "...", password_hash = "$argon2id$..."`.
    pub users: Vec<UserConfig>,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        Self {
            listen: vec!["127.0.0.1:2525".parse().expect("literal address")],
            tls_listen: Vec::new(),
            proxy_interfaces: Vec::new(),
            relay_networks: vec![
                "127.0.0.0/8".parse().expect("literal net"),
                "::1/128".parse().expect("literal net"),
            ],
            tls_cert: None,
            tls_key: None,
            max_message_size: 25 * 1024 * 1024,
            max_content_memory: 1024 * 1024 * 1024,
            min_free_space: None,
            max_recipients: 1000,
            max_command_line: 2048,
            max_data_line: 10_000,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            max_connections: 1000,
            max_connections_per_ip: 100,
            max_errors: 10,
            max_hops: 100,
            shutdown_grace: Duration::from_secs(30),
            auth_failure_limit: 10,
            auth_failure_window: Duration::from_secs(600),
            users: Vec::new(),
        }
    }
}

impl SmtpConfig {
    /// `min_free_space` in force: as set, else 1.5 × `max_message_size`.
    pub fn min_free_space(&self) -> u64 {
        self.min_free_space
            .unwrap_or(self.max_message_size as u64 / 2 * 3)
    }

    pub fn is_relay_client(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.relay_networks.iter().any(|n| n.contains(&ip))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// PHC string (`$argon2id$...`), made by `mailtrail hash-password`.
    pub password_hash: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: Vec<SocketAddr>,
    /// Host names requests may name besides IP addresses and `localhost` (a reverse proxy's).
    pub allowed_hosts: Vec<String>,
    /// Connections served at once, over all `listen` addresses; more are answered `503`
    /// and closed, so the admin port cannot take the SMTP listener's file descriptors.
    pub max_connections: usize,
    /// Longest wait for a whole request head, from accept or from the end of the previous
    /// response (so it also closes idle keep-alive connections).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Longest a response may take to be written, from its first byte until the kernel has
    /// taken the last: a client that does not read closes its connection after it.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: vec!["127.0.0.1:8025".parse().expect("literal address")],
            allowed_hosts: Vec::new(),
            max_connections: 64,
            header_read_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `human` or `json`.
    pub format: LogFormat,
    /// tracing filter, e.g. `info` or `mailtrail=debug`. `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Human,
            level: "info".to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Deliver queued mail at all (off: accept and queue only).
    pub enabled: bool,
    /// Domain of VERP envelope senders and bounce reception; empty = original sender kept.
    pub bounce_domain: String,
    /// Local part before the `+` of VERP senders.
    pub bounce_local_part: String,
    /// File holding the key for VERP MACs; generated in `data_dir` when absent.
    pub verp_key_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub retry_first: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub max_queue_lifetime: Duration,
    /// Send DSNs (RFC 3464) to the original sender.
    pub dsn: bool,
    /// With NOTIFY=DELAY, send a delay DSN once a recipient has been deferred this long.
    #[serde(with = "humantime_serde")]
    pub delay_dsn_after: Duration,
    pub max_connections: usize,
    pub max_connections_per_destination: usize,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub data_timeout: Duration,
    /// Remote port for MX delivery (25; tests point it elsewhere).
    pub mx_port: u16,
    /// Bodies of finished mail are deleted this long after receipt (the log stays).
    #[serde(with = "humantime_serde")]
    pub body_retention: Duration,
    /// Finished mail's log (envelope, recipients, events) and bounce records are deleted this
    /// long after receipt; zero keeps them forever.
    #[serde(with = "humantime_serde")]
    pub log_retention: Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            bounce_domain: String::new(),
            bounce_local_part: "bounces".to_string(),
            verp_key_file: None,
            retry_first: Duration::from_secs(300),
            retry_max_interval: Duration::from_secs(4 * 3600),
            max_queue_lifetime: Duration::from_secs(5 * 86400),
            dsn: true,
            delay_dsn_after: Duration::from_secs(4 * 3600),
            max_connections: 100,
            max_connections_per_destination: 20,
            connect_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            mx_port: 25,
            body_retention: Duration::from_secs(7 * 86400),
            log_retention: Duration::ZERO,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Resolver addresses (`"127.0.0.1:5353"`); empty = the system's `/etc/resolv.conf`.
    pub nameservers: Vec<SocketAddr>,
    #[serde(with = "humantime_serde::option")]
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum TlsPolicy {
    #[default]
    Opportunistic,
    Required,
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Recipient domains; `"*"` matches all.
    pub domains: Vec<String>,
    /// Only for these envelope-sender domains (empty = any).
    #[serde(default)]
    pub sender_domains: Vec<String>,
    /// Only for mail submitted by these AUTH users (empty = any).
    #[serde(default)]
    pub auth_users: Vec<String>,
    /// Fixed next hops `host:port`, tried in order; no MX lookup.
    #[serde(default)]
    pub mx: Vec<String>,
    #[serde(default)]
    pub tls: TlsPolicy,
    /// Implicit TLS (port 465 style) instead of STARTTLS.
    #[serde(default)]
    pub implicit_tls: bool,
    /// Verify the next hop's certificate (on for smarthosts; off for opportunistic MX TLS).
    #[serde(default)]
    pub verify_certificate: Option<bool>,
    /// Extra PEM CA file trusted for this route (tests, private CAs).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub auth_user: Option<String>,
    /// Password read from this file (trailing newline stripped) ...
    #[serde(default)]
    pub auth_password_file: Option<PathBuf>,
    /// ... or from this environment variable. Never logged.
    #[serde(default)]
    pub auth_password_env: Option<String>,
    /// Keep the original envelope sender instead of the VERP sender.
    #[serde(default)]
    pub keep_sender: bool,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct BounceConfig {
    /// Extra classification rules (TOML, same form as the built-in rules), tried first.
    pub rules_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SuppressionConfig {
    pub enabled: bool,
    /// `accept` (record the recipient `suppressed`, as SES does) or `refuse` (at RCPT).
    pub action: SuppressionAction,
    /// How long an entry lasts; 0 = forever.
    #[serde(with = "humantime_serde")]
    pub expiry: Duration,
    /// Soft bounces in a row (within `soft_window`) that suppress an address.
    pub soft_bounce_threshold: u32,
    #[serde(with = "humantime_serde")]
    pub soft_window: Duration,
}

impl Default for SuppressionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            action: SuppressionAction::Accept,
            expiry: Duration::from_secs(365 * 86400),
            soft_bounce_threshold: 5,
            soft_window: Duration::from_secs(7 * 86400),
        }
    }
}

impl SuppressionConfig {
    /// When an entry made at `now_ms` lapses: `None` with an expiry of 0 (forever).
    pub fn expires_at(&self, now_ms: i64) -> Option<i64> {
        (!self.expiry.is_zero()).then(|| {
            now_ms.saturating_add(i64::try_from(self.expiry.as_millis()).unwrap_or(i64::MAX))
        })
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SuppressionAction {
    Accept,
    Refuse,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChecksConfig {
    /// Check at RCPT that the recipient domain can receive mail (exists, no null MX).
    pub domain_check: bool,
    /// Longest the RCPT reply waits for that lookup; past it the recipient is accepted.
    #[serde(with = "humantime_serde")]
    pub domain_check_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub domain_cache_ttl: Duration,
}

impl Default for ChecksConfig {
    fn default() -> Self {
        Self {
            domain_check: true,
            domain_check_timeout: Duration::from_secs(2),
            domain_cache_ttl: Duration::from_secs(3600),
        }
    }
}

impl Config {
    /// Reads `path`, or the defaults when `None`.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let config = match path {
            None => Config::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                Self::parse(&text).map_err(|e| match e {
                    ConfigError::Parse { message, .. } => ConfigError::Parse {
                        path: path.to_path_buf(),
                        message,
                    },
                    other => other,
                })?
            }
        };
        Ok(config)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        // It goes into EHLO, Received: fields and DSNs: `<`, `;` or a space there would
        // make them say something else.
        if self.hostname == "*" || !is_route_domain(&self.hostname) {
            return Err(invalid(
                "hostname",
                "must be a host name (letters, digits, '-', '_' and dots)",
            ));
        }
        if self.smtp.listen.is_empty() && self.smtp.tls_listen.is_empty() {
            return Err(invalid(
                "smtp.listen",
                "at least one SMTP listener is needed",
            ));
        }
        if self.smtp.tls_cert.is_some() != self.smtp.tls_key.is_some() {
            return Err(invalid(
                "smtp.tls_cert",
                "tls_cert and tls_key must be set together",
            ));
        }
        for (key, v) in [
            ("smtp.max_message_size", self.smtp.max_message_size),
            ("smtp.max_recipients", self.smtp.max_recipients),
            ("smtp.max_connections", self.smtp.max_connections),
            (
                "smtp.max_connections_per_ip",
                self.smtp.max_connections_per_ip,
            ),
            ("smtp.max_errors", self.smtp.max_errors),
            ("smtp.max_hops", self.smtp.max_hops),
            (
                "smtp.auth_failure_limit",
                self.smtp.auth_failure_limit as usize,
            ),
            ("http.max_connections", self.http.max_connections),
            ("delivery.max_connections", self.delivery.max_connections),
            (
                "delivery.max_connections_per_destination",
                self.delivery.max_connections_per_destination,
            ),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if self.smtp.max_content_memory < self.smtp.max_message_size {
            return Err(invalid(
                "smtp.max_content_memory",
                "must be at least smtp.max_message_size (one message of the largest size)",
            ));
        }
        if self.smtp.max_command_line < 512 {
            return Err(invalid(
                "smtp.max_command_line",
                "must be at least 512 (RFC 5321 4.5.3.1.4)",
            ));
        }
        if self.smtp.max_data_line < 1000 {
            return Err(invalid(
                "smtp.max_data_line",
                "must be at least 1000 (RFC 5321 4.5.3.1.6)",
            ));
        }
        // A network written with host bits (`10.0.0.1/8`) is taken as the whole network: an
        // admin who meant one host would relay for sixteen million.
        for net in &self.smtp.relay_networks {
            if net.addr() != net.network() {
                return Err(invalid(
                    "smtp.relay_networks",
                    format!(
                        "\"{net}\" has host bits set: write \"{}\" for the network, or \
                         \"{}/{}\" for the one host",
                        net.trunc(),
                        net.addr(),
                        net.max_prefix_len()
                    ),
                ));
            }
        }
        for (i, host) in self.http.allowed_hosts.iter().enumerate() {
            if host == "*" || !is_route_domain(host) {
                return Err(invalid(
                    &format!("http.allowed_hosts[{i}]"),
                    format!("{host:?} is not a host name"),
                ));
            }
        }
        for (i, user) in self.smtp.users.iter().enumerate() {
            if user.name.is_empty() {
                return Err(invalid(
                    &format!("smtp.users[{i}].name"),
                    "must not be empty",
                ));
            }
            // Two entries for one name: only one password could ever work.
            if self.smtp.users[..i].iter().any(|u| u.name == user.name) {
                return Err(invalid(
                    &format!("smtp.users[{i}].name"),
                    format!("{:?} is listed twice", user.name),
                ));
            }
            if argon2::password_hash::PasswordHash::new(&user.password_hash).is_err() {
                return Err(invalid(
                    &format!("smtp.users[{i}].password_hash"),
                    "is not a PHC password hash (make one with `mailtrail hash-password`)",
                ));
            }
        }
        let bounce_domain = &self.delivery.bounce_domain;
        if !bounce_domain.is_empty()
            && (!bounce_domain.contains('.')
                || bounce_domain == "*"
                || !is_route_domain(bounce_domain))
        {
            return Err(invalid(
                "delivery.bounce_domain",
                "must be a fully qualified domain",
            ));
        }
        // The local part of every VERP sender: an ASCII dot-atom, or the addresses would need
        // quoting (or SMTPUTF8); without `+`, which starts the VERP tag (a `+` of its own made
        // every bounce fail the MAC check and be refused).
        let local = &self.delivery.bounce_local_part;
        if !(local.is_ascii() && !local.contains('+') && crate::smtp::session::is_dot_atom(local)) {
            return Err(invalid(
                "delivery.bounce_local_part",
                "must be a plain local part without '+' (letters, digits, and !#$%&'*-/=?^_`{|}~ between dots)",
            ));
        }
        // Zero would time out every session, expire every deferral at once, or wait for no
        // answer at all.
        for (key, v) in [
            ("smtp.command_timeout", self.smtp.command_timeout),
            ("smtp.data_timeout", self.smtp.data_timeout),
            ("smtp.auth_failure_window", self.smtp.auth_failure_window),
            ("http.header_read_timeout", self.http.header_read_timeout),
            ("http.write_timeout", self.http.write_timeout),
            ("delivery.retry_first", self.delivery.retry_first),
            (
                "delivery.max_queue_lifetime",
                self.delivery.max_queue_lifetime,
            ),
            ("delivery.connect_timeout", self.delivery.connect_timeout),
            ("delivery.command_timeout", self.delivery.command_timeout),
            ("delivery.data_timeout", self.delivery.data_timeout),
            ("suppression.soft_window", self.suppression.soft_window),
            (
                "checks.domain_check_timeout",
                self.checks.domain_check_timeout,
            ),
            (
                "dns.timeout",
                self.dns.timeout.unwrap_or(Duration::from_secs(1)),
            ),
        ] {
            if v.is_zero() {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if self.delivery.mx_port == 0 {
            return Err(invalid(
                "delivery.mx_port",
                "must be a port from 1 to 65535",
            ));
        }
        if self.suppression.soft_bounce_threshold == 0 {
            return Err(invalid(
                "suppression.soft_bounce_threshold",
                "must be greater than 0 (a soft bounce never suppresses alone)",
            ));
        }
        if self.delivery.max_queue_lifetime < self.delivery.retry_first {
            return Err(invalid(
                "delivery.max_queue_lifetime",
                "must not be shorter than delivery.retry_first (mail would expire before its first retry)",
            ));
        }
        if let Err(e) = log_filter(&self.log.level) {
            return Err(invalid("log.level", e));
        }
        if self.delivery.retry_max_interval < self.delivery.retry_first {
            return Err(invalid(
                "delivery.retry_max_interval",
                "must not be shorter than delivery.retry_first",
            ));
        }
        // Shorter, the log would go before the bodies it describes, or take the bounces the
        // soft-bounce threshold counts.
        if !self.delivery.log_retention.is_zero()
            && (self.delivery.log_retention < self.delivery.body_retention
                || self.delivery.log_retention < self.suppression.soft_window)
        {
            return Err(invalid(
                "delivery.log_retention",
                "must be \"0s\" (keep forever) or at least delivery.body_retention and \
                 suppression.soft_window",
            ));
        }
        for (i, route) in self.routes.iter().enumerate() {
            let key = |k: &str| format!("route[{i}].{k}");
            if route.domains.is_empty() {
                return Err(invalid(
                    &key("domains"),
                    "must list at least one domain or \"*\"",
                ));
            }
            for (k, list) in [
                ("domains", &route.domains),
                ("sender_domains", &route.sender_domains),
            ] {
                let domain_or_literal = |d: &str| {
                    is_route_domain(d) || crate::delivery::dns::address_literal(d).is_some()
                };
                if let Some(bad) = list.iter().find(|d| !domain_or_literal(d)) {
                    return Err(invalid(
                        &key(k),
                        format!(
                            "{bad:?} is not a domain, an address literal ([192.0.2.1], \
                             [IPv6:2001:db8::1]) or \"*\""
                        ),
                    ));
                }
            }
            // Only `[[smtp.users]]` authenticate: a name not among them never matches.
            if let Some(bad) = route
                .auth_users
                .iter()
                .find(|a| !self.smtp.users.iter().any(|u| &u.name == *a))
            {
                return Err(invalid(
                    &key("auth_users"),
                    format!("{bad:?} is not one of [[smtp.users]], so the route could never match"),
                ));
            }
            if route.auth_user.as_deref() == Some("") {
                return Err(invalid(&key("auth_user"), "must not be empty"));
            }
            if route.tls == TlsPolicy::None
                && (route.ca_file.is_some() || route.verify_certificate.is_some())
            {
                return Err(invalid(
                    &key(if route.ca_file.is_some() {
                        "ca_file"
                    } else {
                        "verify_certificate"
                    }),
                    "has no effect with tls = \"none\" (no TLS to verify)",
                ));
            }
            if route.auth_user.is_none()
                && (route.auth_password_file.is_some() || route.auth_password_env.is_some())
            {
                return Err(invalid(
                    &key("auth_user"),
                    "is needed: a password is set but no user to send it for",
                ));
            }
            if route.mx.is_empty() {
                return Err(invalid(
                    &key("mx"),
                    "must list at least one next hop host:port",
                ));
            }
            if route.implicit_tls && route.tls == TlsPolicy::None {
                return Err(invalid(
                    &key("implicit_tls"),
                    "TLS from the first byte contradicts tls = \"none\"",
                ));
            }
            for hop in &route.mx {
                let usable = crate::config::split_host_port(hop)
                    .is_some_and(|(host, port)| port != 0 && !host.contains(char::is_whitespace));
                if !usable {
                    return Err(invalid(&key("mx"), format!("{hop:?} is not host:port")));
                }
            }
            if route.auth_password_file.is_some() && route.auth_password_env.is_some() {
                return Err(invalid(
                    &key("auth_password_file"),
                    "set auth_password_file or auth_password_env, not both",
                ));
            }
            if route.auth_user.is_some()
                && route.auth_password_file.is_none()
                && route.auth_password_env.is_none()
            {
                return Err(invalid(
                    &key("auth_user"),
                    "needs auth_password_file or auth_password_env",
                ));
            }
        }
        Ok(())
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("mailtrail.db")
    }
}

/// A route's domain: `*`, or labels of letters, digits, `-` and `_` (and non-ASCII, for
/// IDNs) joined by dots; a trailing dot is allowed.
fn is_route_domain(d: &str) -> bool {
    if d == "*" {
        return true;
    }
    let d = d.strip_suffix('.').unwrap_or(d);
    !d.is_empty()
        && d.split('.').all(|label| {
            !label.is_empty()
                && label
                    .chars()
                    .all(|c| c.is_alphanumeric() || c == '-' || c == '_')
        })
}

/// The tracing filter of `[log] level`: a level (`info`), or comma-separated `target=level`
/// directives (`mailtrail=debug,info`). `EnvFilter` itself reads a bare word as a target
/// to log at every level, so `verbose` silenced everything: only levels stand alone here.
pub fn log_filter(level: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    for directive in level.split(',').map(str::trim) {
        let lvl = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        if !LEVELS.iter().any(|l| lvl.eq_ignore_ascii_case(l)) {
            return Err(format!(
                "{directive:?} is not a level (trace, debug, info, warn, error, off) or target=level"
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(level).map_err(|e| format!("{level:?}: {e}"))
}

/// Splits `host:port` / `[v6]:port`.
pub fn split_host_port(s: &str) -> Option<(String, u16)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, port) = rest.split_once("]:")?;
        return Some((host.to_string(), port.parse().ok()?));
    }
    let (host, port) = s.rsplit_once(':')?;
    if host.is_empty() || host.contains(':') {
        return None;
    }
    Some((host.to_string(), port.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key an invalid config names, and its message.
    fn refusal(toml: &str) -> (String, String) {
        match Config::parse(toml) {
            Err(ConfigError::Invalid { key, message }) => (key, message),
            other => panic!("{toml}: {other:?}"),
        }
    }

    #[test]
    fn contradictions_and_dead_entries_are_refused_with_their_key() {
        let hash = crate::smtp::auth::hash_password("pw").unwrap();
        let user =
            |name: &str| format!("[[smtp.users]]\nname = \"{name}\"\npassword_hash = \"{hash}\"\n");
        let (key, message) = refusal(&format!("{}{}", user("app"), user("app")));
        assert_eq!(key, "smtp.users[1].name");
        assert!(message.contains("twice"), "{message}");
        let (key, message) = refusal("[smtp]\nrelay_networks = [\"10.0.0.1/8\"]\n");
        assert_eq!(key, "smtp.relay_networks");
        assert!(
            message.contains("10.0.0.0/8") && message.contains("10.0.0.1/32"),
            "{message}"
        );
        assert!(
            Config::parse("[smtp]\nrelay_networks = [\"10.0.0.0/8\", \"10.1.2.3/32\"]\n").is_ok()
        );
        let (key, _) = refusal("[http]\nallowed_hosts = [\"ok.example\", \"bad host!\"]\n");
        assert_eq!(key, "http.allowed_hosts[1]");
        let route = "[[route]]\ndomains = [\"*\"]\nmx = [\"127.0.0.1:2525\"]\n";
        let (key, message) = refusal(&format!("{route}auth_users = [\"nobody\"]\n"));
        assert_eq!(key, "route[0].auth_users");
        assert!(message.contains("\"nobody\""), "{message}");
        assert!(Config::parse(&format!("{}{route}auth_users = [\"app\"]\n", user("app"))).is_ok());
        let (key, _) = refusal(&format!(
            "{route}auth_user = \"\"\nauth_password_env = \"X\"\n"
        ));
        assert_eq!(key, "route[0].auth_user");
        let (key, _) = refusal(&format!("{route}tls = \"none\"\nca_file = \"/ca.pem\"\n"));
        assert_eq!(key, "route[0].ca_file");
        let (key, _) = refusal(&format!(
            "{route}tls = \"none\"\nverify_certificate = true\n"
        ));
        assert_eq!(key, "route[0].verify_certificate");
    }

    #[test]
    fn empty_config_is_the_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.smtp.listen, vec!["127.0.0.1:2525".parse().unwrap()]);
        assert_eq!(c.http.listen, vec!["127.0.0.1:8025".parse().unwrap()]);
        assert_eq!(c.data_dir, PathBuf::from("./mailtrail-data"));
        assert!(c.smtp.is_relay_client("127.0.0.1".parse().unwrap()));
        assert!(c.smtp.is_relay_client("::1".parse().unwrap()));
        assert!(!c.smtp.is_relay_client("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::parse("[smtp]\nlisten = [\"127.0.0.1:25\"]\nlistne = 1\n").unwrap_err();
        assert!(e.to_string().contains("listne"), "{e}");
    }

    #[test]
    fn bad_cidr_is_named() {
        let c = Config::parse(
            "[[route]]\ndomains = [\"[192.0.2.1]\", \"[IPv6:2001:db8::1]\"]\nmx = [\"h:25\"]\n\
             sender_domains = [\"[127.0.0.1]\"]\n",
        )
        .unwrap();
        assert_eq!(c.routes[0].domains, ["[192.0.2.1]", "[IPv6:2001:db8::1]"]);
        let e = Config::parse("[smtp]\nrelay_networks = [\"10.0.0.0/99\"]\n").unwrap_err();
        let text = e.to_string();
        assert!(text.contains("relay_networks"), "{text}");
    }

    #[test]
    fn bad_duration_and_zero_limits_are_named() {
        let e = Config::parse("[smtp]\ncommand_timeout = \"soon\"\n").unwrap_err();
        assert!(e.to_string().contains("command_timeout"), "{e}");
        let e = Config::parse("[smtp]\nmax_recipients = 0\n").unwrap_err();
        assert!(e.to_string().contains("smtp.max_recipients"), "{e}");
        let e = Config::parse("[smtp]\nmax_content_memory = 1000000\n").unwrap_err();
        assert!(e.to_string().contains("smtp.max_content_memory"), "{e}");
    }

    #[test]
    fn http_limits_must_bound_something() {
        let e = Config::parse("[http]\nmax_connections = 0\n").unwrap_err();
        assert!(e.to_string().contains("http.max_connections"), "{e}");
        let e = Config::parse("[http]\nheader_read_timeout = \"0s\"\n").unwrap_err();
        assert!(e.to_string().contains("http.header_read_timeout"), "{e}");
        let e = Config::parse("[http]\nwrite_timeout = \"0s\"\n").unwrap_err();
        assert!(e.to_string().contains("http.write_timeout"), "{e}");
    }

    #[test]
    fn log_retention_is_forever_by_default_and_not_shorter_than_body_retention() {
        assert!(Config::parse("").unwrap().delivery.log_retention.is_zero());
        let c = Config::parse("[delivery]\nlog_retention = \"400days\"\n").unwrap();
        assert_eq!(c.delivery.log_retention, Duration::from_secs(400 * 86400));
        let e = Config::parse("[delivery]\nlog_retention = \"1day\"\n").unwrap_err();
        assert!(e.to_string().contains("delivery.log_retention"), "{e}");
        let short_body = "[delivery]\nlog_retention = \"1day\"\nbody_retention = \"1h\"\n";
        let e = Config::parse(short_body).unwrap_err();
        assert!(e.to_string().contains("soft_window"), "{e}");
        let c = Config::parse(&format!(
            "{short_body}[suppression]\nsoft_window = \"1day\"\n"
        ));
        assert!(c.is_ok(), "{c:?}");
    }

    #[test]
    fn routes_parse_in_the_fixed_form() {
        let c = Config::parse(
            "[[route]]\ndomains = [\"example.test\"]\nmx = [\"127.0.0.1:2626\"]\ntls = \"opportunistic\"\n",
        )
        .unwrap();
        assert_eq!(c.routes[0].mx, vec!["127.0.0.1:2626"]);
        assert_eq!(c.routes[0].tls, TlsPolicy::Opportunistic);
        let e =
            Config::parse("[[route]]\ndomains = [\"x.test\"]\nmx = [\"nohost\"]\n").unwrap_err();
        assert!(e.to_string().contains("route[0].mx"), "{e}");
        for (route, key) in [
            ("domains = [\"x.test\"]\nmx = []\n", "route[0].mx"),
            ("domains = [\"x.test\"]\n", "route[0].mx"),
            (
                "domains = [\"x.test\"]\nmx = [\"h:465\"]\nimplicit_tls = true\ntls = \"none\"\n",
                "route[0].implicit_tls",
            ),
        ] {
            let e = Config::parse(&format!("[[route]]\n{route}")).unwrap_err();
            assert!(e.to_string().contains(key), "{route}: {e}");
        }
    }

    #[test]
    fn unworkable_values_are_refused_with_their_key() {
        for (toml, key) in [
            ("[smtp]\ncommand_timeout = \"0s\"", "smtp.command_timeout"),
            ("[smtp]\ndata_timeout = \"0s\"", "smtp.data_timeout"),
            ("[smtp]\nauth_failure_limit = 0", "smtp.auth_failure_limit"),
            (
                "[smtp]\nauth_failure_window = \"0s\"",
                "smtp.auth_failure_window",
            ),
            (
                "[delivery]\nconnect_timeout = \"0s\"",
                "delivery.connect_timeout",
            ),
            (
                "[delivery]\nmax_queue_lifetime = \"0s\"",
                "delivery.max_queue_lifetime",
            ),
            (
                "[delivery]\nmax_queue_lifetime = \"1s\"\nretry_first = \"1h\"\nretry_max_interval = \"1h\"",
                "delivery.max_queue_lifetime",
            ),
            ("[delivery]\nmx_port = 0", "delivery.mx_port"),
            (
                "[suppression]\nsoft_bounce_threshold = 0",
                "suppression.soft_bounce_threshold",
            ),
            ("[log]\nlevel = \"verbose\"", "log.level"),
            ("hostname = \"a<b>;c\"", "hostname"),
            (
                "[delivery]\nbounce_local_part = \"a@b c\"",
                "delivery.bounce_local_part",
            ),
            (
                "[delivery]\nbounce_local_part = \"a+b\"",
                "delivery.bounce_local_part",
            ),
            (
                "[delivery]\nbounce_domain = \"bad domain..\"",
                "delivery.bounce_domain",
            ),
            ("[log]\nlevel = \"mailtrail=loud\"", "log.level"),
            (
                "[[route]]\ndomains = [\"\"]\nmx = [\"h:25\"]",
                "route[0].domains",
            ),
            (
                "[[route]]\ndomains = [\"not a domain!!\"]\nmx = [\"h:25\"]",
                "route[0].domains",
            ),
            (
                "[[route]]\ndomains = [\"[0.0.0.0]\"]\nmx = [\"h:25\"]",
                "route[0].domains",
            ),
            (
                "[[route]]\ndomains = [\"x.test\"]\nmx = [\"h:0\"]",
                "route[0].mx",
            ),
            (
                "[[route]]\ndomains = [\"x.test\"]\nmx = [\"has space:25\"]",
                "route[0].mx",
            ),
            (
                "[[route]]\ndomains = [\"x.test\"]\nmx = [\"h:25\"]\nauth_password_env = \"P\"",
                "route[0].auth_user",
            ),
        ] {
            let e = Config::parse(toml).unwrap_err();
            assert!(e.to_string().contains(key), "{toml}: {e}");
        }
        for level in [
            "info",
            "warn",
            "mailtrail=debug,info",
            "mailtrail::smtp=trace, warn",
        ] {
            let c = Config::parse(&format!("[log]\nlevel = {level:?}"));
            assert!(c.is_ok(), "{level}: {:?}", c.err());
        }
        let c = Config::parse(
            "[[route]]\ndomains = [\"*\", \"Example.TEST.\", \"bücher.test\"]\nmx = [\"[::1]:25\"]",
        );
        assert!(c.is_ok(), "{:?}", c.err());
    }

    #[test]
    fn host_port_split() {
        assert_eq!(split_host_port("a.b:25"), Some(("a.b".into(), 25)));
        assert_eq!(split_host_port("[::1]:25"), Some(("::1".into(), 25)));
        assert_eq!(split_host_port("::1:25"), None);
        assert_eq!(split_host_port("a.b"), None);
    }
}

#[cfg(test)]
mod documented_file {
    use super::*;

    /// The shipped, commented config must parse and equal the built-in defaults, so the
    /// documentation cannot drift from the code.
    #[test]
    fn shipped_config_is_the_defaults() {
        let text = include_str!("../../config/mailtrail.toml");
        let c = Config::parse(text).unwrap();
        let d = Config::default();
        assert_eq!(format!("{:?}", c.smtp), format!("{:?}", d.smtp));
        assert_eq!(format!("{:?}", c.http), format!("{:?}", d.http));
        assert_eq!(format!("{:?}", c.delivery), format!("{:?}", d.delivery));
        assert_eq!(
            format!("{:?}", c.suppression),
            format!("{:?}", d.suppression)
        );
        assert_eq!(format!("{:?}", c.checks), format!("{:?}", d.checks));
        assert_eq!(format!("{:?}", c.dns), format!("{:?}", d.dns));
        assert_eq!(c.data_dir, d.data_dir);
    }
}
