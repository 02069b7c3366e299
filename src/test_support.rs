//! Helpers shared by unit tests across modules.

/// Random inputs for the tests that compare a hand-written scan with the regex or the
/// definition it replaces: a deterministic 64-bit LCG (Knuth's MMIX constants).
pub(crate) struct TestRng(u64);

impl TestRng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    /// A number in `0..n`.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// Up to `max_pieces` of `pieces`, drawn at random and concatenated.
    pub(crate) fn text<S: AsRef<str>>(&mut self, max_pieces: usize, pieces: &[S]) -> String {
        let n = self.below(max_pieces + 1);
        let mut t = String::new();
        for _ in 0..n {
            if let Some(p) = pieces.get(self.below(pieces.len())) {
                t.push_str(p.as_ref());
            }
        }
        t
    }
}

/// The characters of `alphabet`, one piece each, for [`TestRng::text`].
pub(crate) fn test_chars(alphabet: &str) -> Vec<String> {
    alphabet.chars().map(String::from).collect()
}

/// A message as the SMTP stage hands it over: from `app@example.com` on loopback, received at
/// 1,000 ms, to `recipients` (no DSN parameters, no preset outcome), with `body`.
pub(crate) fn accepted_message(recipients: &[&str], body: &[u8]) -> crate::spool::AcceptedMessage {
    crate::spool::AcceptedMessage {
        receipt: crate::receipt::ReceiptId::new(),
        received_at_ms: 1_000,
        client_ip: std::net::Ipv4Addr::LOCALHOST.into(),
        helo: "client".into(),
        tls_version: None,
        auth_user: None,
        envelope_sender: "app@example.com".into(),
        recipients: recipients
            .iter()
            .map(|a| crate::spool::AcceptedRecipient {
                address: a.to_string(),
                orcpt: None,
                notify: None,
                preset: None,
            })
            .collect(),
        envid: None,
        ret: None,
        eight_bit: false,
        smtputf8: false,
        message_id: None,
        subject: None,
        context: None,
        body: body.to_vec(),
        inbound_bounce: false,
    }
}
