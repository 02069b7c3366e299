//! The inbound SMTP session (`smtp::Session`, sans-IO) fed arbitrary client bytes at arbitrary
//! read boundaries, with a shell that answers every request at once. Must not panic; every
//! reply must be well-formed; every `queued as` must match a stored message.
//!
//! Input layout: byte 0 selects the session options and the policy, bytes 1..=8 are read
//! sizes (cycled), the rest is the client's byte stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailtrail::smtp::auth::AuthOutcome;
use mailtrail::smtp::content::ContentMemory;
use mailtrail::smtp::{Action, Peer, RecipientVerdict, Reply, Session, SessionConfig};

fuzz_target!(|input: &[u8]| {
    if input.len() < 9 {
        return;
    }
    let opts = input[0];
    let cuts = &input[1..9];
    let stream = &input[9..];
    let config = SessionConfig {
        hostname: "mx.test".into(),
        max_message_size: 2000,
        max_recipients: 4,
        max_command_line: 512,
        max_data_line: 300,
        max_errors: if opts & 0x80 != 0 { 1000 } else { 5 },
        max_hops: 3,
        tls_available: opts & 1 != 0,
        auth_available: opts & 2 != 0,
        content_memory: ContentMemory::new(usize::MAX),
        untrusted_content_memory: ContentMemory::new(4096),
    };
    let ip = if opts & 4 != 0 {
        "127.0.0.1"
    } else {
        "192.0.2.1"
    };
    let tls = (opts & 8 != 0).then(|| "TLSv1.3".to_string());
    let peer = Peer {
        ip: ip.parse().unwrap(),
        relay_client: opts & 16 != 0,
    };
    let mut shell = Shell {
        session: Session::new(config, peer, tls),
        policy: (opts >> 5) & 3,
        store_fail_next: false,
        stored: 0,
        queued: 0,
        closed: false,
        tls_pending: false,
        replies: 0,
    };
    let greeting = shell.session.greeting();
    shell.run(greeting);
    let mut rest = stream;
    let mut i = 0;
    while !rest.is_empty() && !shell.closed {
        let n = (cuts[i % cuts.len()] as usize + 1).min(rest.len());
        i += 1;
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        let actions = shell.session.feed(chunk);
        shell.run(actions);
        if shell.tls_pending {
            shell.tls_pending = false;
            let actions = shell.session.tls_started("TLSv1.3".into());
            shell.run(actions);
        }
    }
    assert_eq!(shell.queued, shell.stored);
    if shell.closed {
        assert!(shell.session.feed(b"NOOP\r\n").is_empty());
    }
});

struct Shell {
    session: Session,
    policy: u8,
    store_fail_next: bool,
    stored: usize,
    queued: usize,
    closed: bool,
    tls_pending: bool,
    replies: usize,
}

impl Shell {
    fn run(&mut self, actions: Vec<Action>) {
        for action in actions {
            assert!(!self.closed, "action after Close: {action:?}");
            match action {
                Action::Send(reply) => self.check_reply(&reply),
                Action::Close => self.closed = true,
                Action::StartTls => self.tls_pending = true,
                Action::Authenticate(c) => {
                    let outcome = match (c.username.as_str(), c.password.as_str()) {
                        ("app", "secret") => AuthOutcome::Accepted(c.username),
                        (_, "throttled") => AuthOutcome::Throttled,
                        _ => AuthOutcome::Refused,
                    };
                    let next = self.session.auth_verified(outcome);
                    self.run(next);
                }
                Action::CheckRecipient(check) => {
                    let verdict = match self.policy {
                        0 => RecipientVerdict::Accept,
                        1 if check.address.contains("bounce") => {
                            RecipientVerdict::AcceptInboundBounce
                        }
                        1 => RecipientVerdict::Accept,
                        2 if check.relay_allowed => RecipientVerdict::Accept,
                        _ => RecipientVerdict::Reject(Reply::new(554, "5.7.1", "Relay denied")),
                    };
                    let next = self.session.recipient_checked(verdict);
                    self.run(next);
                }
                Action::Store(msg) => {
                    assert!(!msg.recipients.is_empty());
                    let ok = !self.store_fail_next;
                    self.store_fail_next = !self.store_fail_next;
                    if ok {
                        self.stored += 1;
                    }
                    let next = self.session.stored(ok);
                    self.run(next);
                }
            }
        }
    }

    fn check_reply(&mut self, reply: &Reply) {
        self.replies += 1;
        let wire = reply.to_string();
        assert!(wire.ends_with("\r\n"));
        for line in wire.split_terminator("\r\n") {
            assert!(!line.contains(['\r', '\n']), "{wire:?}");
            assert!(line.len() >= 3 && line.as_bytes()[..3].iter().all(u8::is_ascii_digit));
        }
        if wire.contains("queued as") {
            self.queued += 1;
        }
    }
}
