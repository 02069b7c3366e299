//! SMTP AUTH (RFC 4954) credential checks against `[[smtp.users]]`: argon2 PHC strings,
//! verified on the blocking pool because each check deliberately costs tens of milliseconds.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

use super::throttle::{Count, FailureCount, MAX_TRACKED, client_network};
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
/// Each check costs tens of milliseconds of CPU by design, so guessing is throttled:
/// - a refusal is answered only after [`FAILURE_DELAY`] (as Dovecot's
///   `auth_failure_delay`), which slows one connection's guesses to about one a second until
///   `max_errors` ends it;
/// - checks run one at a time in each of three lanes (each client network counted apart:
///   an IPv4 address, an IPv6 /64): client networks that authenticated lately
///   ([`KNOWN_FOR`]) and have no refusal since, those without a recent refusal, and those
///   with one. Guessing from many connections takes at most two cores, and an application
///   that has authenticated before waits for no guesser's check;
/// - a client network with `failure_limit` refusals within `failure_window` gets
///   `454 4.7.0` without a check until the window has passed (fail2ban's rule, built in).
///   Its standing is read again once its turn comes, so attempts sent in parallel stop at
///   the limit too instead of all being checked.
#[derive(Debug)]
pub struct Authenticator {
    users: HashMap<String, String>,
    dummy_hash: Option<String>,
    known_checks: tokio::sync::Semaphore,
    checks: tokio::sync::Semaphore,
    suspect_checks: tokio::sync::Semaphore,
    throttle: Throttle,
}

/// How long a client network that authenticated counts as known (checked in its own lane).
pub const KNOWN_FOR: Duration = Duration::from_secs(24 * 3600);

/// How long a refused AUTH waits before its reply.
pub const FAILURE_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// What an AUTH exchange comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthOutcome {
    /// The password matches this user.
    Accepted(String),
    /// Wrong user name or password.
    Refused,
    /// Too many refusals from this client network lately: not checked.
    Throttled,
}

/// Recent AUTH refusals per client network, and the networks that authenticated lately.
#[derive(Debug)]
struct Throttle {
    refusals: FailureCount,
    /// When each network last authenticated.
    known: Mutex<HashMap<IpAddr, Instant>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// Authenticated within [`KNOWN_FOR`], no refusal since.
    Known,
    /// No recent refusal.
    Clean,
    /// Refused lately, below the limit (or not counted: too many networks are).
    Suspect,
    /// At the limit: not checked.
    Blocked,
}

impl Throttle {
    fn new(limit: u32, window: Duration) -> Self {
        Self {
            refusals: FailureCount::new(limit, window),
            known: Mutex::new(HashMap::new()),
        }
    }

    fn standing(&self, ip: IpAddr, now: Instant) -> Standing {
        match self.refusals.count(ip, now) {
            Count::AtLimit => return Standing::Blocked,
            Count::Some(_) | Count::Untracked => return Standing::Suspect,
            Count::None => {}
        }
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        match known.get(&client_network(ip)) {
            Some(at) if now.duration_since(*at) < KNOWN_FOR => Standing::Known,
            _ => Standing::Clean,
        }
    }

    /// A refusal also ends the network's standing as known: it has to authenticate again.
    fn refused(&self, ip: IpAddr, now: Instant) {
        self.refusals.failed(ip, now);
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&client_network(ip));
    }

    fn accepted(&self, ip: IpAddr, now: Instant) {
        self.refusals.clear(ip);
        let key = client_network(ip);
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if known.len() >= MAX_TRACKED {
            known.retain(|_, at| now.duration_since(*at) < KNOWN_FOR);
        }
        if known.len() < MAX_TRACKED || known.contains_key(&key) {
            known.insert(key, now);
        }
    }
}

impl Authenticator {
    /// Validates every PHC string now, so a typo fails `serve` at start. `failure_limit`
    /// refusals from one client network within `failure_window` throttle it.
    pub fn new(
        users: &[UserConfig],
        failure_limit: u32,
        failure_window: Duration,
    ) -> Result<Self, AuthError> {
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
            known_checks: tokio::sync::Semaphore::new(1),
            checks: tokio::sync::Semaphore::new(1),
            suspect_checks: tokio::sync::Semaphore::new(1),
            throttle: Throttle::new(failure_limit, failure_window),
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

    /// The lane a client network's checks wait in (none for one at the limit).
    fn lane(&self, standing: Standing) -> Option<&tokio::sync::Semaphore> {
        match standing {
            Standing::Known => Some(&self.known_checks),
            Standing::Clean => Some(&self.checks),
            Standing::Suspect => Some(&self.suspect_checks),
            Standing::Blocked => None,
        }
    }

    /// Waits for `client`'s turn in the lane of its standing, read again once the turn
    /// comes: a refusal counted meanwhile (an attempt of the same network sent in parallel)
    /// moves it to another lane or to the limit. `None` at the limit.
    async fn turn(&self, client: IpAddr) -> Option<tokio::sync::SemaphorePermit<'_>> {
        let mut standing = self.throttle.standing(client, Instant::now());
        loop {
            let turn = self.lane(standing)?.acquire().await.ok()?;
            let now = self.throttle.standing(client, Instant::now());
            if now == standing {
                return Some(turn);
            }
            standing = now;
        }
    }

    /// Checks a password from `client` on the blocking pool, one check at a time in its
    /// lane; a refusal (and a throttled attempt) is answered after [`FAILURE_DELAY`].
    pub async fn verify(
        self: &Arc<Self>,
        client: IpAddr,
        username: String,
        password: String,
    ) -> AuthOutcome {
        self.verify_as(client, username, password, false).await
    }

    /// [`Self::verify`], refusing even the right password when the exchange is `unusable`
    /// (see [`super::Credentials::unusable`]): after the same check, delay and count.
    pub async fn verify_as(
        self: &Arc<Self>,
        client: IpAddr,
        username: String,
        password: String,
        unusable: bool,
    ) -> AuthOutcome {
        let Some(turn) = self.turn(client).await else {
            tracing::warn!(client = %client, "AUTH throttled: too many refusals from this client lately");
            tokio::time::sleep(FAILURE_DELAY).await;
            return AuthOutcome::Throttled;
        };
        let this = Arc::clone(self);
        let user = tokio::task::spawn_blocking(move || {
            this.verify_blocking(&username, &password)
                .then_some(username)
        })
        .await
        .ok()
        .flatten()
        .filter(|_| !unusable);
        match user {
            Some(user) => {
                self.throttle.accepted(client, Instant::now());
                AuthOutcome::Accepted(user)
            }
            None => {
                self.throttle.refused(client, Instant::now());
                drop(turn);
                tokio::time::sleep(FAILURE_DELAY).await;
                AuthOutcome::Refused
            }
        }
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
        let auth = authenticator();
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
        let err = Authenticator::new(&bad, 3, WINDOW).unwrap_err();
        assert!(err.to_string().contains("user `app`"), "{err}");
    }

    const WINDOW: Duration = Duration::from_secs(600);

    fn authenticator() -> Arc<Authenticator> {
        Arc::new(Authenticator::new(&users(), 3, WINDOW).unwrap())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn verifies_on_blocking_pool() {
        let auth = authenticator();
        let client = ip("192.0.2.1");
        assert_eq!(
            auth.verify(client, "app".into(), "secret".into()).await,
            AuthOutcome::Accepted("app".into())
        );
        assert_eq!(
            auth.verify(client, "app".into(), "nope".into()).await,
            AuthOutcome::Refused
        );
    }

    #[tokio::test]
    async fn a_refusal_waits_and_gives_the_turn_back() {
        let auth = authenticator();
        let started = std::time::Instant::now();
        let (a, b) = tokio::join!(
            auth.verify(ip("192.0.2.1"), "app".into(), "nope".into()),
            auth.verify(ip("192.0.2.2"), "app".into(), "secret".into()),
        );
        assert_eq!(
            (a, b),
            (AuthOutcome::Refused, AuthOutcome::Accepted("app".into()))
        );
        assert!(started.elapsed() >= FAILURE_DELAY);
        // Both checks done, the turns are free again.
        assert_eq!(auth.checks.available_permits(), 1);
        assert_eq!(auth.suspect_checks.available_permits(), 1);
    }

    #[tokio::test]
    async fn a_client_with_refusals_checks_in_its_own_lane_and_is_throttled_at_the_limit() {
        let auth = authenticator();
        let guesser = ip("2001:db8:1:2::7");
        assert_eq!(
            auth.verify(guesser, "app".into(), "a".into()).await,
            AuthOutcome::Refused
        );
        // Now suspect: while a guess of it holds the suspect lane, an application without
        // refusals is checked at once in the other lane.
        let suspect_turn = auth.suspect_checks.acquire().await.unwrap();
        let app = auth.verify(ip("192.0.2.9"), "app".into(), "secret".into());
        let app = tokio::time::timeout(Duration::from_secs(20), app).await;
        assert_eq!(app.ok(), Some(AuthOutcome::Accepted("app".into())));
        drop(suspect_turn);
        // Another address of the same /64 counts with it: the third refusal reaches the limit.
        for guess in ["b", "c"] {
            assert_eq!(
                auth.verify(ip("2001:db8:1:2::8"), "app".into(), guess.into())
                    .await,
                AuthOutcome::Refused
            );
        }
        // Throttled now, even with the right password; another /64 is not.
        assert_eq!(
            auth.verify(guesser, "app".into(), "secret".into()).await,
            AuthOutcome::Throttled
        );
        assert_eq!(
            auth.verify(ip("2001:db8:1:3::7"), "app".into(), "secret".into())
                .await,
            AuthOutcome::Accepted("app".into())
        );
    }

    #[tokio::test]
    async fn attempts_sent_in_parallel_stop_at_the_limit_too() {
        let auth = authenticator();
        let guesser = ip("192.0.2.66");
        let attempts = (0..20).map(|i| {
            let auth = Arc::clone(&auth);
            tokio::spawn(async move { auth.verify(guesser, "app".into(), format!("g{i}")).await })
        });
        let mut outcomes = Vec::new();
        for a in attempts.collect::<Vec<_>>() {
            outcomes.push(a.await.unwrap());
        }
        let refused = outcomes
            .iter()
            .filter(|o| **o == AuthOutcome::Refused)
            .count();
        let throttled = outcomes
            .iter()
            .filter(|o| **o == AuthOutcome::Throttled)
            .count();
        // The limit is 3: three were checked, the others not.
        assert_eq!((refused, throttled), (3, 17), "{outcomes:?}");
        assert_eq!(
            auth.verify(guesser, "app".into(), "secret".into()).await,
            AuthOutcome::Throttled
        );
    }

    #[tokio::test]
    async fn an_unusable_exchange_is_refused_and_counted_even_with_the_right_password() {
        let auth = authenticator();
        let client = ip("192.0.2.77");
        let started = std::time::Instant::now();
        assert_eq!(
            auth.verify_as(client, "app".into(), "secret".into(), true)
                .await,
            AuthOutcome::Refused
        );
        assert!(started.elapsed() >= FAILURE_DELAY);
        assert_eq!(
            auth.throttle.standing(client, Instant::now()),
            Standing::Suspect
        );
    }

    #[tokio::test]
    async fn a_network_that_authenticated_is_checked_apart_from_new_ones() {
        let auth = authenticator();
        let app = ip("192.0.2.10");
        assert_eq!(
            auth.verify(app, "app".into(), "secret".into()).await,
            AuthOutcome::Accepted("app".into())
        );
        // New networks (guessers from many addresses) hold the lane of the clean ones: the
        // application that authenticated before does not wait for them.
        let clean_turn = auth.checks.acquire().await.unwrap();
        let again = auth.verify(app, "app".into(), "secret".into());
        let again = tokio::time::timeout(Duration::from_secs(20), again).await;
        assert_eq!(again.ok(), Some(AuthOutcome::Accepted("app".into())));
        drop(clean_turn);
        // A refusal makes it suspect again, known or not, and once its window has passed
        // it is a network like any other, not known.
        assert_eq!(
            auth.verify(app, "app".into(), "nope".into()).await,
            AuthOutcome::Refused
        );
        assert_eq!(
            auth.throttle.standing(app, Instant::now()),
            Standing::Suspect
        );
        assert_eq!(
            auth.throttle.standing(app, Instant::now() + WINDOW),
            Standing::Clean
        );
    }

    #[test]
    fn refusals_count_within_their_window_and_a_success_clears_them() {
        let t = Throttle::new(2, WINDOW);
        let (a, now) = (ip("198.51.100.1"), Instant::now());
        assert_eq!(t.standing(a, now), Standing::Clean);
        t.refused(a, now);
        assert_eq!(t.standing(a, now), Standing::Suspect);
        t.refused(a, now + Duration::from_secs(1));
        assert_eq!(
            t.standing(a, now + Duration::from_secs(2)),
            Standing::Blocked
        );
        // The window runs from the first refusal; after it the client is clean again.
        assert_eq!(t.standing(a, now + WINDOW), Standing::Clean);
        t.refused(a, now + WINDOW);
        t.accepted(a, now + WINDOW);
        assert_eq!(t.standing(a, now + WINDOW), Standing::Known);
        // An IPv4-mapped address is its IPv4 address.
        t.refused(a, now);
        assert_eq!(
            t.standing(ip("::ffff:198.51.100.1"), now),
            Standing::Suspect
        );
    }
}
