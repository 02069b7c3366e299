//! Delivery: relays each queued message to its next hop and records every recipient's reply.
//!
//! Data flow: [`scheduler`] takes fresh mail from the listener ([`handoff`]) and asks the
//! store for due messages → [`route`] picks a destination
//! per recipient and splits them into transactions → [`dns`] finds the MX targets →
//! [`client`] runs the SMTP transaction → [`retry`] turns replies into statuses → [`dsn`]
//! builds delivery status notifications → the store records attempts and DSNs in one commit.

pub mod client;
pub mod dns;
pub mod downgrade;
pub mod dsn;
pub mod handoff;
pub mod reply;
pub mod retry;
pub mod route;
pub mod scheduler;
pub mod verp_sender;

pub use handoff::Handoff;
pub use scheduler::{Delivery, DeliveryHandle};
