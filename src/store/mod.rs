//! The outcome store: messages, recipients with their current status, and an append-only
//! event history per recipient. SQLite (WAL) is the embedded default behind the [`Store`]
//! trait so other backends can follow.

/// A recipient's current status (ARCHITECTURE.md "Outcome model").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecipientStatus {
    Queued,
    Delivered,
    Deferred,
    Failed,
    Expired,
    Suppressed,
    Bounced,
    Complained,
    Rejected,
}

impl RecipientStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Delivered => "delivered",
            Self::Deferred => "deferred",
            Self::Failed => "failed",
            Self::Expired => "expired",
            Self::Suppressed => "suppressed",
            Self::Bounced => "bounced",
            Self::Complained => "complained",
            Self::Rejected => "rejected",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Self::Queued,
            "delivered" => Self::Delivered,
            "deferred" => Self::Deferred,
            "failed" => Self::Failed,
            "expired" => Self::Expired,
            "suppressed" => Self::Suppressed,
            "bounced" => Self::Bounced,
            "complained" => Self::Complained,
            "rejected" => Self::Rejected,
            _ => return None,
        })
    }

    /// Still waiting for a delivery attempt.
    pub fn is_pending(self) -> bool {
        matches!(self, Self::Queued | Self::Deferred)
    }
}

impl std::fmt::Display for RecipientStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
