//! Inbound ESMTP: a sans-IO session state machine ([`session`]) and the tokio listener around
//! it ([`server`]).

pub mod auth;
pub mod content;
pub mod disk;
pub mod message;
pub mod policy;
pub mod reply;
pub mod server;
pub mod session;
pub mod throttle;
pub mod tls;

pub use auth::{Authenticator, hash_password};
pub use policy::{RecipientPolicy, RelayPolicy};
pub use reply::Reply;
pub use server::{AcceptHook, ServerError, SmtpServer};
pub use session::{
    Action, Credentials, Peer, RecipientCheck, RecipientVerdict, Session, SessionConfig,
};
