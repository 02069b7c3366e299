//! Hands freshly accepted mail from the SMTP listener to the delivery loop in memory, so the
//! first attempt does not read the message and its body back from the store.
//!
//! The store stays the only source of truth; this is a shortcut past two reads. Race-free
//! because of the order of operations:
//!
//! 1. before the store write the listener [`claims`](Handoff::claim) the receipt: it enters
//!    `pending`;
//! 2. after the commit it [`sends`](Handoff::send) the message (or, when the write failed,
//!    [`releases`](Handoff::release) the claim);
//! 3. the delivery loop skips every receipt in `pending` when it scans the store, and takes
//!    it out of `pending` only when it receives the message, in the same turn as it marks the
//!    recipients in flight.
//!
//! So a committed message is either still in `pending` (its copy is on the way, scans leave it
//! alone) or already in flight, and it is never delivered twice. At most `limit` messages are
//! claimed at a time; beyond that the listener does not claim and the loop's scans find the
//! message as before (bounded memory under a flood).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::receipt::ReceiptId;
use crate::spool::AcceptedMessage;
use crate::store::{QueuedMessage, QueuedRecipient, RecipientStatus};

/// A committed message with its body, ready for its first attempt.
pub struct Fresh {
    pub message: QueuedMessage,
    pub body: Arc<Vec<u8>>,
}

pub struct Handoff {
    pending: Mutex<HashSet<ReceiptId>>,
    tx: mpsc::UnboundedSender<Fresh>,
    limit: usize,
}

impl Handoff {
    pub fn new(limit: usize) -> (Self, mpsc::UnboundedReceiver<Fresh>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Self {
                pending: Mutex::new(HashSet::new()),
                tx,
                limit,
            },
            rx,
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<ReceiptId>> {
        // Only a set of ids behind it: a panic elsewhere leaves it usable.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims a message about to be stored: `true` when it has recipients to relay and there
    /// is room. A `true` must be followed by [`send`](Self::send) or [`release`](Self::release).
    pub fn claim(&self, msg: &AcceptedMessage) -> bool {
        if msg.inbound_bounce || msg.recipients.iter().all(|r| r.preset.is_some()) {
            return false;
        }
        let mut pending = self.lock();
        pending.len() < self.limit && pending.insert(msg.receipt)
    }

    /// The store write failed: forget the claim.
    pub fn release(&self, receipt: ReceiptId) {
        self.lock().remove(&receipt);
    }

    /// Hands a claimed message, now committed, to the delivery loop.
    pub fn send(&self, msg: AcceptedMessage) {
        let receipt = msg.receipt;
        if self.tx.send(fresh(msg)).is_err() {
            // The loop has stopped; the store has the message for the next start.
            self.release(receipt);
        }
    }

    /// Whether a copy of `receipt` is on its way (scans must leave it alone).
    pub fn is_pending(&self, receipt: &ReceiptId) -> bool {
        self.lock().contains(receipt)
    }

    /// Called by the loop when it receives a message, as it marks it in flight.
    pub fn received(&self, receipt: &ReceiptId) {
        self.lock().remove(receipt);
    }
}

/// The queue entry the store would list for a message just accepted: every recipient without
/// a preset outcome, `queued`, due now.
fn fresh(msg: AcceptedMessage) -> Fresh {
    let at = msg.received_at_ms;
    let recipients = msg
        .recipients
        .into_iter()
        .enumerate()
        .filter(|(_, r)| r.preset.is_none())
        .filter_map(|(i, r)| {
            Some(QueuedRecipient {
                index: u32::try_from(i).ok()?,
                address: r.address,
                orcpt: r.orcpt,
                notify: r.notify,
                status: RecipientStatus::Queued,
                attempts: 0,
                next_attempt_at_ms: at,
                first_deferred_at_ms: None,
                delay_dsn_sent: false,
                last_reply_code: None,
                last_enhanced_status: None,
                last_reply_text: None,
                retry_requested_at: None,
            })
        })
        .collect();
    Fresh {
        message: QueuedMessage {
            receipt: msg.receipt,
            received_at_ms: at,
            envelope_sender: msg.envelope_sender,
            auth_user: msg.auth_user,
            envid: msg.envid,
            ret: msg.ret,
            eight_bit: msg.eight_bit,
            smtputf8: msg.smtputf8,
            size: msg.body.len() as u64,
            message_id: msg.message_id,
            subject: msg.subject,
            recipients,
        },
        body: Arc::new(msg.body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::PresetOutcome;

    fn message(receipt: ReceiptId, presets: &[bool]) -> AcceptedMessage {
        let addresses: Vec<String> = (0..presets.len())
            .map(|i| format!("r{i}@example.net"))
            .collect();
        let addresses: Vec<&str> = addresses.iter().map(String::as_str).collect();
        let mut msg =
            crate::test_support::accepted_message(&addresses, b"Subject: x\r\n\r\nhi\r\n");
        msg.receipt = receipt;
        for (r, &p) in msg.recipients.iter_mut().zip(presets) {
            r.preset = p.then(|| PresetOutcome {
                status: RecipientStatus::Suppressed,
                reason: "suppressed".into(),
                text: "on the suppression list".into(),
                bounce_type: "soft".into(),
                enhanced_status: None,
                accepted: true,
            });
        }
        msg
    }

    #[test]
    fn a_claimed_message_stays_pending_until_the_loop_receives_it() {
        let (h, mut rx) = Handoff::new(10);
        let id = ReceiptId::new();
        let msg = message(id, &[false, true, false]);
        assert!(h.claim(&msg));
        assert!(h.is_pending(&id));
        h.send(msg);
        assert!(
            h.is_pending(&id),
            "sent but not yet received: scans must skip it"
        );
        let fresh = rx.try_recv().unwrap();
        h.received(&fresh.message.receipt);
        assert!(!h.is_pending(&id));
        // Only the recipients to relay, with their index in the message.
        let idx: Vec<u32> = fresh.message.recipients.iter().map(|r| r.index).collect();
        assert_eq!(idx, vec![0, 2]);
        assert_eq!(fresh.body.as_slice(), b"Subject: x\r\n\r\nhi\r\n");
    }

    #[test]
    fn nothing_to_relay_or_no_room_is_not_claimed() {
        let (h, _rx) = Handoff::new(1);
        assert!(!h.claim(&message(ReceiptId::new(), &[true])));
        let mut bounce = message(ReceiptId::new(), &[false]);
        bounce.inbound_bounce = true;
        assert!(!h.claim(&bounce));
        assert!(h.claim(&message(ReceiptId::new(), &[false])));
        assert!(
            !h.claim(&message(ReceiptId::new(), &[false])),
            "limit reached"
        );
    }

    #[test]
    fn a_failed_write_releases_the_claim() {
        let (h, mut rx) = Handoff::new(10);
        let id = ReceiptId::new();
        assert!(h.claim(&message(id, &[false])));
        h.release(id);
        assert!(!h.is_pending(&id));
        assert!(rx.try_recv().is_err());
    }
}
