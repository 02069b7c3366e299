//! Failures counted per client network within a window (fail2ban's rule, built in): the
//! AUTH refusals and the forged bounce addresses of one network, so that guessing from
//! many connections or one after another meets one limit.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Client networks tracked at most in one map (bounded memory); past that a new one is
/// not remembered, and [`FailureCount::count`] calls it [`Count::Untracked`].
pub const MAX_TRACKED: usize = 100_000;

/// The network a client is counted by: its IPv4 address (also when IPv4-mapped), or the /64
/// of its IPv6 address (one subscriber's, which holds 2^64 addresses).
pub fn client_network(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
        },
    }
}

/// What [`FailureCount::count`] knows of a network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// No failure within the window.
    None,
    /// This many failures within the window, below the limit.
    Some(u32),
    /// The limit is reached: turn it away until the window has passed.
    AtLimit,
    /// Not counted: the map is full of networks with recent failures.
    Untracked,
}

/// Failures per client network, the window running from each network's first one.
#[derive(Debug)]
pub struct FailureCount {
    limit: u32,
    window: Duration,
    clients: Mutex<Clients>,
}

#[derive(Debug, Default)]
struct Clients {
    map: HashMap<IpAddr, Failures>,
    /// When a full map was last purged of networks past their window: at most once a
    /// second, so that a full map does not cost a scan of it per failure.
    purged: Option<Instant>,
}

/// How often a full map may be purged.
const PURGE_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    since: Instant,
}

impl FailureCount {
    pub fn new(limit: u32, window: Duration) -> Self {
        Self {
            limit,
            window,
            clients: Mutex::new(Clients::default()),
        }
    }

    pub fn count(&self, ip: IpAddr, now: Instant) -> Count {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let key = client_network(ip);
        let clients = &mut clients.map;
        match clients.get(&key) {
            Some(f) if now.duration_since(f.since) >= self.window => {
                clients.remove(&key);
                Count::None
            }
            Some(f) if f.count >= self.limit => Count::AtLimit,
            Some(f) => Count::Some(f.count),
            None if clients.len() >= MAX_TRACKED => Count::Untracked,
            None => Count::None,
        }
    }

    /// Counts one failure; true when it is the one that reaches the limit.
    pub fn failed(&self, ip: IpAddr, now: Instant) -> bool {
        let mut guard = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let Clients {
            map: clients,
            purged,
        } = &mut *guard;
        if clients.len() >= MAX_TRACKED
            && purged.is_none_or(|at| now.duration_since(at) >= PURGE_EVERY)
        {
            let window = self.window;
            clients.retain(|_, f| now.duration_since(f.since) < window);
            *purged = Some(now);
        }
        let key = client_network(ip);
        let full = clients.len() >= MAX_TRACKED;
        let count = match clients.get_mut(&key) {
            Some(f) if now.duration_since(f.since) < self.window => {
                f.count = f.count.saturating_add(1);
                f.count
            }
            Some(f) => {
                *f = Failures {
                    count: 1,
                    since: now,
                };
                1
            }
            None if !full => {
                clients.insert(
                    key,
                    Failures {
                        count: 1,
                        since: now,
                    },
                );
                1
            }
            None => 0,
        };
        count == self.limit
    }

    /// Forgets the network's failures (it proved itself).
    pub fn clear(&self, ip: IpAddr) {
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .remove(&client_network(ip));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(600);

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn failures_count_within_their_window_per_network() {
        let c = FailureCount::new(2, WINDOW);
        let (a, now) = (ip("198.51.100.1"), Instant::now());
        assert_eq!(c.count(a, now), Count::None);
        assert!(!c.failed(a, now));
        assert_eq!(c.count(a, now), Count::Some(1));
        assert!(
            c.failed(a, now + Duration::from_secs(1)),
            "the second reaches 2"
        );
        assert_eq!(c.count(a, now + Duration::from_secs(2)), Count::AtLimit);
        assert!(
            !c.failed(a, now + Duration::from_secs(3)),
            "only the second says so"
        );
        // The window runs from the first failure; after it the network starts over.
        assert_eq!(c.count(a, now + WINDOW), Count::None);
        c.failed(a, now + WINDOW);
        c.clear(a);
        assert_eq!(c.count(a, now + WINDOW), Count::None);
        // An IPv4-mapped address is its IPv4 address; an IPv6 address counts by its /64.
        c.failed(a, now);
        assert_eq!(c.count(ip("::ffff:198.51.100.1"), now), Count::Some(1));
        c.failed(ip("2001:db8:1:2::7"), now);
        assert_eq!(c.count(ip("2001:db8:1:2::8"), now), Count::Some(1));
        assert_eq!(c.count(ip("2001:db8:1:3::7"), now), Count::None);
    }

    #[test]
    fn a_full_map_counts_no_newcomer_until_its_entries_age_out() {
        let c = FailureCount::new(3, WINDOW);
        let now = Instant::now();
        for n in 0..MAX_TRACKED as u32 {
            c.failed(IpAddr::V4(n.into()), now);
        }
        let newcomer = ip("2001:db8::1");
        assert_eq!(c.count(newcomer, now), Count::Untracked);
        c.failed(newcomer, now + Duration::from_secs(1));
        assert_eq!(c.count(newcomer, now), Count::Untracked);
        // Past the window the old entries are purged, and the newcomer counts.
        c.failed(newcomer, now + WINDOW);
        assert_eq!(c.count(newcomer, now + WINDOW), Count::Some(1));
    }
}
