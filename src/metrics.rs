//! The Prometheus registry and the typed handles each stage updates. One [`Metrics`] is made
//! at start and shared (`Arc`); `/metrics` encodes the registry in the text format.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabel {
    /// Reply code class: `2xx`, `4xx`, `5xx`.
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BounceLabel {
    pub reason: String,
    pub bounce_type: String,
}

/// Reply code → `"2xx"`/`"4xx"`/`"5xx"` label.
pub fn class_of(code: u16) -> ClassLabel {
    ClassLabel {
        class: format!("{}xx", code / 100),
    }
}

pub struct Metrics {
    pub registry: Registry,
    // Inbound (accept).
    pub smtp_connections: Counter,
    pub smtp_connections_open: Gauge,
    pub messages_accepted: Counter,
    pub recipients_accepted: Counter,
    pub smtp_rejections: Family<ClassLabel, Counter>,
    pub bytes_received: Counter,
    pub smtp_transaction_seconds: Histogram,
    pub smtp_content_memory_bytes: Gauge,
    // Delivery.
    pub delivery_recipients: Family<OutcomeLabel, Counter>,
    pub delivery_replies: Family<ClassLabel, Counter>,
    pub delivery_attempt_seconds: Histogram,
    pub time_to_final_seconds: Histogram,
    pub queue_size: Gauge,
    pub queue_oldest_age_seconds: Gauge,
    pub outbound_connections_open: Gauge,
    /// 1 while delivery starts nothing new because the store cannot record it.
    pub delivery_paused: Gauge,
    // Bounces.
    pub bounces: Family<BounceLabel, Counter>,
    pub complaints: Counter,
    pub suppressed_recipients: Counter,
    /// Recipients the domain check recorded `rejected` at accept, by reason.
    pub domain_check_rejections: Family<OutcomeLabel, Counter>,
    pub unmatched_bounces: Counter,
    pub bounce_mail_without_records: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mailtrail");
        let m = Self {
            smtp_connections: Counter::default(),
            smtp_connections_open: Gauge::default(),
            messages_accepted: Counter::default(),
            recipients_accepted: Counter::default(),
            smtp_rejections: Family::default(),
            bytes_received: Counter::default(),
            smtp_transaction_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            smtp_content_memory_bytes: Gauge::default(),
            delivery_recipients: Family::default(),
            delivery_replies: Family::default(),
            delivery_attempt_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 18)),
            time_to_final_seconds: Histogram::new(exponential_buckets(0.01, 4.0, 14)),
            queue_size: Gauge::default(),
            queue_oldest_age_seconds: Gauge::default(),
            outbound_connections_open: Gauge::default(),
            delivery_paused: Gauge::default(),
            bounces: Family::default(),
            complaints: Counter::default(),
            suppressed_recipients: Counter::default(),
            unmatched_bounces: Counter::default(),
            bounce_mail_without_records: Counter::default(),
            domain_check_rejections: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "smtp_connections",
            "Inbound SMTP connections accepted",
            m.smtp_connections.clone(),
        );
        registry.register(
            "smtp_content_memory_bytes",
            "Bytes of message content the SMTP sessions hold in memory now ([smtp] max_content_memory at most)",
            m.smtp_content_memory_bytes.clone(),
        );
        registry.register(
            "smtp_connections_open",
            "Inbound SMTP connections now open",
            m.smtp_connections_open.clone(),
        );
        registry.register(
            "messages_accepted",
            "Messages acknowledged with 250 (durably stored)",
            m.messages_accepted.clone(),
        );
        registry.register(
            "recipients_accepted",
            "Recipients of acknowledged messages",
            m.recipients_accepted.clone(),
        );
        registry.register(
            "smtp_rejections",
            "Inbound 4xx/5xx replies by reply code class",
            m.smtp_rejections.clone(),
        );
        registry.register(
            "smtp_received_bytes",
            "Message bytes acknowledged",
            m.bytes_received.clone(),
        );
        registry.register(
            "smtp_transaction_seconds",
            "Time from MAIL FROM to the final DATA/BDAT reply",
            m.smtp_transaction_seconds.clone(),
        );
        registry.register(
            "delivery_recipients",
            "Recipient delivery outcomes (delivered, deferred, failed, expired, ...)",
            m.delivery_recipients.clone(),
        );
        registry.register(
            "delivery_replies",
            "Remote SMTP replies to RCPT/DATA by reply code class",
            m.delivery_replies.clone(),
        );
        registry.register(
            "delivery_attempt_seconds",
            "Duration of one delivery attempt (one SMTP transaction)",
            m.delivery_attempt_seconds.clone(),
        );
        registry.register(
            "time_to_final_status_seconds",
            "Time from receipt to a recipient's final status",
            m.time_to_final_seconds.clone(),
        );
        registry.register(
            "queue_recipients",
            "Recipients queued or deferred",
            m.queue_size.clone(),
        );
        registry.register(
            "queue_oldest_age_seconds",
            "Age of the oldest queued or deferred recipient",
            m.queue_oldest_age_seconds.clone(),
        );
        registry.register(
            "outbound_connections_open",
            "Open outbound SMTP connections",
            m.outbound_connections_open.clone(),
        );
        registry.register(
            "delivery_paused",
            "1 while delivery starts no connection or transaction because the store cannot record attempts (it refuses writes, or a refused record waits)",
            m.delivery_paused.clone(),
        );
        registry.register(
            "bounces",
            "Bounce records by reason and bounce type",
            m.bounces.clone(),
        );
        registry.register(
            "complaints",
            "Feedback-report (ARF) complaints",
            m.complaints.clone(),
        );
        registry.register(
            "suppressed_recipients",
            "Recipients not relayed because their address is suppressed",
            m.suppressed_recipients.clone(),
        );
        registry.register(
            "domain_check_rejections",
            "Recipients recorded rejected at accept because their domain cannot receive mail (outcome: hostunknown, notaccept)",
            m.domain_check_rejections.clone(),
        );
        registry.register(
            "unmatched_bounces",
            "Bounce records that matched no sent message",
            m.unmatched_bounces.clone(),
        );
        registry.register(
            "bounce_mail_without_records",
            "Mail to the bounce domain that gave no bounce record (not a bounce, or none the parser could read)",
            m.bounce_mail_without_records.clone(),
        );
        Self { registry, ..m }
    }

    /// The Prometheus text exposition.
    /// Exports the store's group-commit counters: commands per commit is the batching factor,
    /// commits the number of `fsync`s.
    pub fn register_store(&mut self, counters: crate::store::sqlite::WriterStats) {
        self.registry.register(
            "store_commits",
            "Store transactions committed (one fsync each)",
            counters.commits,
        );
        self.registry.register(
            "store_commands",
            "Store write commands committed (group commit: several per transaction)",
            counters.commands,
        );
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_counters_by_name() {
        let m = Metrics::new();
        m.messages_accepted.inc();
        m.smtp_rejections.get_or_create(&class_of(554)).inc();
        let text = m.encode();
        assert!(
            text.contains("mailtrail_messages_accepted_total 1"),
            "{text}"
        );
        assert!(
            text.contains("mailtrail_smtp_rejections_total{class=\"5xx\"} 1"),
            "{text}"
        );
    }
}
