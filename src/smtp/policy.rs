//! Per-recipient policy at RCPT: the shell asks a [`RecipientPolicy`] about every recipient
//! the session has checked for syntax. The default, [`RelayPolicy`], implements relay control
//! only; bounce-domain reception, suppression and domain checks plug in here later.

use super::reply::Reply;
use super::session::{RecipientCheck, RecipientVerdict};

#[async_trait::async_trait]
pub trait RecipientPolicy: Send + Sync + 'static {
    async fn check(&self, recipient: &RecipientCheck) -> RecipientVerdict;
}

/// Clients in `relay_networks` and authenticated clients may relay; everyone else gets
/// `554 5.7.1 Relay access denied` for every recipient.
#[derive(Debug, Default, Clone, Copy)]
pub struct RelayPolicy;

#[async_trait::async_trait]
impl RecipientPolicy for RelayPolicy {
    async fn check(&self, recipient: &RecipientCheck) -> RecipientVerdict {
        relay_verdict(recipient)
    }
}

/// The relay decision alone, for policies that add rules on top of it.
pub fn relay_verdict(recipient: &RecipientCheck) -> RecipientVerdict {
    if recipient.relay_allowed {
        RecipientVerdict::Accept
    } else {
        RecipientVerdict::Reject(Reply::new(554, "5.7.1", "Relay access denied"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(relay_allowed: bool) -> RecipientCheck {
        RecipientCheck {
            address: "a@example.net".into(),
            envelope_sender: "b@example.com".into(),
            client_ip: "203.0.113.1".parse().unwrap(),
            relay_allowed,
            auth_user: None,
        }
    }

    #[tokio::test]
    async fn accepts_relay_clients() {
        assert_eq!(
            RelayPolicy.check(&check(true)).await,
            RecipientVerdict::Accept
        );
    }

    #[tokio::test]
    async fn refuses_relay_from_outside_networks() {
        assert_eq!(
            RelayPolicy.check(&check(false)).await,
            RecipientVerdict::Reject(Reply::new(554, "5.7.1", "Relay access denied"))
        );
    }
}
