//! The bounce reason taxonomy (Sisimai's vocabulary, so results compare directly with that
//! library) and the hard/soft/complaint/autoreply bounce type derived from a reason.

use std::fmt;
use std::str::FromStr;

macro_rules! reasons {
    ($($variant:ident => $name:literal),* $(,)?) => {
        /// Why a recipient's mail failed, in Sisimai's words.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(rename_all = "lowercase")]
        pub enum BounceReason { $($variant),* }

        impl BounceReason {
            /// Every reason, in declaration order.
            pub const ALL: &'static [BounceReason] = &[$(BounceReason::$variant),*];

            pub fn as_str(self) -> &'static str {
                match self { $(BounceReason::$variant => $name),* }
            }
        }

        impl FromStr for BounceReason {
            type Err = UnknownReason;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s.trim().to_ascii_lowercase().as_str() {
                    $($name => Ok(BounceReason::$variant),)*
                    _ => Err(UnknownReason(s.to_string())),
                }
            }
        }
    };
}

reasons! {
    UserUnknown => "userunknown",
    HostUnknown => "hostunknown",
    MailboxFull => "mailboxfull",
    MesgTooBig => "mesgtoobig",
    ExceedLimit => "exceedlimit",
    Blocked => "blocked",
    SpamDetected => "spamdetected",
    VirusDetected => "virusdetected",
    Filtered => "filtered",
    PolicyViolation => "policyviolation",
    SecurityError => "securityerror",
    AuthFailure => "authfailure",
    Rejected => "rejected",
    NoRelaying => "norelaying",
    NotAccept => "notaccept",
    SystemError => "systemerror",
    SystemFull => "systemfull",
    NetworkError => "networkerror",
    TooManyConn => "toomanyconn",
    Expired => "expired",
    Suspend => "suspend",
    HasMoved => "hasmoved",
    MailerError => "mailererror",
    ContentError => "contenterror",
    NotCompliantRfc => "notcompliantrfc",
    SyntaxError => "syntaxerror",
    Speeding => "speeding",
    RequirePtr => "requireptr",
    BadReputation => "badreputation",
    RateLimited => "ratelimited",
    Suppressed => "suppressed",
    Delivered => "delivered",
    Vacation => "vacation",
    Feedback => "feedback",
    OnHold => "onhold",
    Undefined => "undefined",
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown bounce reason {0:?}")]
pub struct UnknownReason(pub String);

impl fmt::Display for BounceReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a bounce means for the address: `hard` ones suppress it at once, `soft` ones only
/// after repetition, `complaint` is a feedback report, `autoreply` is no failure at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BounceType {
    Hard,
    Soft,
    Complaint,
    Autoreply,
    Undetermined,
}

impl BounceType {
    pub fn as_str(self) -> &'static str {
        match self {
            BounceType::Hard => "hard",
            BounceType::Soft => "soft",
            BounceType::Complaint => "complaint",
            BounceType::Autoreply => "autoreply",
            BounceType::Undetermined => "undetermined",
        }
    }
}

impl fmt::Display for BounceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The reason a user named (in any case, as `mailtrail bounces --reason` and the API take
/// it), by its stored name; a name that is none is an error listing the names.
pub fn reason_named(name: &str) -> Result<&'static str, String> {
    name.parse::<BounceReason>()
        .map(BounceReason::as_str)
        .map_err(|_| {
            let names: Vec<&str> = BounceReason::ALL.iter().map(|r| r.as_str()).collect();
            format!("no reason {name:?}; the reasons are: {}", names.join(", "))
        })
}

/// The bounce type of a reason, as Sisimai's `hardbounce` decides it: the address itself is
/// wrong (userunknown, hostunknown, hasmoved), or the domain refuses mail for good
/// (notaccept with a permanent 5xx status). Everything else may pass on a later try.
pub fn bounce_type(
    reason: BounceReason,
    status: Option<&str>,
    reply_code: Option<u16>,
) -> BounceType {
    use BounceReason::*;
    match reason {
        Feedback => BounceType::Complaint,
        Vacation => BounceType::Autoreply,
        Undefined | OnHold | Delivered => BounceType::Undetermined,
        // Suppressed: an address the provider will not send to again (Amazon SES reports it
        // as a Permanent bounce), nor will we.
        UserUnknown | HostUnknown | HasMoved | Suppressed => BounceType::Hard,
        NotAccept => {
            let permanent = match (status, reply_code) {
                (Some(s), _) if !s.is_empty() => s.starts_with('5'),
                (_, Some(code)) => (500..600).contains(&code),
                // No code at all: a domain that accepts no mail stays so (Sisimai: hard).
                _ => true,
            };
            if permanent {
                BounceType::Hard
            } else {
                BounceType::Soft
            }
        }
        _ => BounceType::Soft,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_round_trips_through_its_name() {
        for r in BounceReason::ALL {
            assert_eq!(r.as_str().parse::<BounceReason>(), Ok(*r));
        }
        assert_eq!(
            "UserUnknown".parse::<BounceReason>(),
            Ok(BounceReason::UserUnknown)
        );
        assert!("nonsense".parse::<BounceReason>().is_err());
    }

    #[test]
    fn address_errors_are_hard_and_the_rest_soft() {
        assert_eq!(
            bounce_type(BounceReason::UserUnknown, Some("5.1.1"), None),
            BounceType::Hard
        );
        assert_eq!(
            bounce_type(BounceReason::HostUnknown, None, None),
            BounceType::Hard
        );
        assert_eq!(
            bounce_type(BounceReason::HasMoved, None, None),
            BounceType::Hard
        );
        assert_eq!(
            bounce_type(BounceReason::MailboxFull, Some("5.2.2"), None),
            BounceType::Soft
        );
        assert_eq!(
            bounce_type(BounceReason::Blocked, None, Some(554)),
            BounceType::Soft
        );
    }

    #[test]
    fn notaccept_is_soft_only_when_temporary() {
        assert_eq!(
            bounce_type(BounceReason::NotAccept, Some("5.1.10"), None),
            BounceType::Hard
        );
        assert_eq!(
            bounce_type(BounceReason::NotAccept, None, Some(556)),
            BounceType::Hard
        );
        assert_eq!(
            bounce_type(BounceReason::NotAccept, Some("4.3.2"), None),
            BounceType::Soft
        );
        // No code at all: a domain that takes no mail (Sisimai: hard).
        assert_eq!(
            bounce_type(BounceReason::NotAccept, None, None),
            BounceType::Hard
        );
    }

    #[test]
    fn complaints_autoreplies_and_unknowns_have_their_own_types() {
        assert_eq!(
            bounce_type(BounceReason::Feedback, None, None),
            BounceType::Complaint
        );
        assert_eq!(
            bounce_type(BounceReason::Vacation, None, None),
            BounceType::Autoreply
        );
        assert_eq!(
            bounce_type(BounceReason::Undefined, None, None),
            BounceType::Undetermined
        );
        assert_eq!(
            bounce_type(BounceReason::OnHold, None, None),
            BounceType::Undetermined
        );
    }
}
