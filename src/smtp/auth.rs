//! SMTP AUTH (RFC 4954) credential checks against `[[smtp.users]]`: argon2 PHC strings,
//! verified on the blocking pool because each check deliberately costs tens of milliseconds.

use std::collections::HashMap;
use std::sync::Arc;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

use crate::config::UserConfig;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(
        "smtp.users: user `{user}` has an invalid password_hash (expected a PHC string such as `$argon2id$...`): {message}"
    )]
    BadHash { user: String, message: String },
    #[error("cannot hash password: {0}")]
    Hash(String),
}

/// The configured users. Unknown users are checked against a dummy hash so that a wrong user
/// name takes as long to refuse as a wrong password.
///
/// Each check costs tens of milliseconds of CPU by design, so guessing is throttled: one
/// check runs at a time across the server (many connections guessing at once get at most
/// one core, the rest keeps relaying), and a refusal is answered only after
/// [`FAILURE_DELAY`] (as Dovecot's `auth_failure_delay`), which slows one connection's
/// guesses to about one a second until `max_errors` ends it.
#[derive(Debug)]
pub struct Authenticator {
    users: HashMap<String, String>,
    dummy_hash: Option<String>,
    checks: tokio::sync::Semaphore,
}

/// How long a refused AUTH waits before its reply.
pub const FAILURE_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

impl Authenticator {
    /// Validates every PHC string now, so a typo fails `serve` at start.
    pub fn new(users: &[UserConfig]) -> Result<Self, AuthError> {
        let mut map = HashMap::new();
        for user in users {
            PasswordHash::new(&user.password_hash).map_err(|e| AuthError::BadHash {
                user: user.name.clone(),
                message: e.to_string(),
            })?;
            map.insert(user.name.clone(), user.password_hash.clone());
        }
        let dummy_hash = if map.is_empty() {
            None
        } else {
            Some(hash_password("mailtrail-dummy-password")?)
        };
        Ok(Self {
            users: map,
            dummy_hash,
            checks: tokio::sync::Semaphore::new(1),
        })
    }

    pub fn has_users(&self) -> bool {
        !self.users.is_empty()
    }

    /// Checks a password; blocks for the duration of one argon2 computation.
    pub fn verify_blocking(&self, username: &str, password: &str) -> bool {
        let (hash, known) = match self.users.get(username) {
            Some(hash) => (hash, true),
            None => match &self.dummy_hash {
                Some(dummy) => (dummy, false),
                None => return false,
            },
        };
        let Ok(parsed) = PasswordHash::new(hash) else {
            return false;
        };
        let ok = Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok();
        ok && known
    }

    /// Checks a password on the blocking pool, one check at a time; returns the user name
    /// when it matches, and otherwise answers after [`FAILURE_DELAY`].
    pub async fn verify(self: &Arc<Self>, username: String, password: String) -> Option<String> {
        let user = {
            let _turn = self.checks.acquire().await.ok()?;
            let this = Arc::clone(self);
            tokio::task::spawn_blocking(move || {
                this.verify_blocking(&username, &password)
                    .then_some(username)
            })
            .await
            .ok()
            .flatten()
        };
        if user.is_none() {
            tokio::time::sleep(FAILURE_DELAY).await;
        }
        user
    }
}

/// An argon2id PHC string for `mailtrail hash-password` (default parameters, random salt).
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| AuthError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users() -> Vec<UserConfig> {
        vec![UserConfig {
            name: "app".into(),
            password_hash: hash_password("secret").unwrap(),
        }]
    }

    #[test]
    fn hashes_to_argon2id_phc_string() {
        let h = hash_password("pw").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert_ne!(h, hash_password("pw").unwrap(), "salt must be random");
    }

    #[test]
    fn verifies_right_password_only() {
        let auth = Authenticator::new(&users()).unwrap();
        assert!(auth.verify_blocking("app", "secret"));
        assert!(!auth.verify_blocking("app", "wrong"));
        assert!(!auth.verify_blocking("nobody", "secret"));
    }

    #[test]
    fn rejects_invalid_hash_in_config() {
        let bad = vec![UserConfig {
            name: "app".into(),
            password_hash: "plaintext".into(),
        }];
        let err = Authenticator::new(&bad).unwrap_err();
        assert!(err.to_string().contains("user `app`"), "{err}");
    }

    #[tokio::test]
    async fn verifies_on_blocking_pool() {
        let auth = Arc::new(Authenticator::new(&users()).unwrap());
        assert_eq!(
            auth.verify("app".into(), "secret".into()).await.as_deref(),
            Some("app")
        );
        assert_eq!(auth.verify("app".into(), "nope".into()).await, None);
    }

    #[tokio::test]
    async fn a_refusal_waits_and_gives_the_turn_back() {
        let auth = Arc::new(Authenticator::new(&users()).unwrap());
        let started = std::time::Instant::now();
        let (a, b) = tokio::join!(
            auth.verify("app".into(), "nope".into()),
            auth.verify("app".into(), "secret".into()),
        );
        assert_eq!((a, b.as_deref()), (None, Some("app")));
        assert!(started.elapsed() >= FAILURE_DELAY);
        // Both checks done, the turn is free again.
        assert_eq!(auth.checks.available_permits(), 1);
    }
}
