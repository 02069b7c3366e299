//! Inbound ESMTP: a sans-IO session state machine ([`session`]) and the tokio listener around
//! it ([`server`]).

pub mod content;
pub mod message;
pub mod reply;
pub mod session;

pub use reply::Reply;
pub use session::{Action, RecipientCheck, RecipientVerdict, Session, SessionConfig};
