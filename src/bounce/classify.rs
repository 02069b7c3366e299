//! The bounce classifier: a reason from an enhanced status code and diagnostic text, driven by
//! a rules file (`rules.toml`, built in; users prepend their own via `[bounce] rules_file`).
//! Each top-level branch of each rule's patterns compiles once into its own regex, and rules
//! are tried lazily in order: most diagnostics are decided by the first few rules. Before any
//! regex runs, one Aho-Corasick pass (a DFA over the literals' first or last 16 bytes) finds
//! which branches' literals (prefixes, else suffixes) the text holds, kept as a bitset, and a
//! rule searches only those branches (and the few without literals).
//! The rule's whole alternation is compiled only if that prefilter is off (tests compare both
//! ways). (One `RegexSet` over all rules was measured 3-10x slower here: its overlapping
//! search keeps building lazy-DFA states for ~500 patterns on every new text.)
//!
//! A rule selects its reason when its `status` list holds the record's enhanced status, its
//! `reply_codes` the reply code, or one of its `patterns` matches the diagnostic (and its
//! command limits, if any, allow the failing SMTP command). The order of decision follows
//! Sisimai's:
//!
//! 1. stage-1 rules, in file order (user rules first), unless the diagnostic is not an SMTP
//!    reply (an `X-Unix` or `X-Postfix` Diagnostic-Code type; an `X-Postfix` text that
//!    quotes the remote server's reply, with its code, counts as one);
//! 2. the `[status]` table, unless it gives a reason listed as `refinable` (generic codes)
//!    or the diagnostic is not an SMTP reply;
//! 3. stage-2 rules (phrases that refine a generic status);
//! 4. the `[status]` table's refinable reason;
//! 5. the status class: x.6 → contenterror, x.7 → securityerror; an `X-Unix` or `X-Postfix`
//!    diagnostic type → mailererror;
//! 6. stage-3 rules (last resorts such as "a 50x reply is a syntax error");
//! 7. action `delayed` → expired; any diagnostic → onhold; nothing → undefined.

use std::collections::HashMap;
use std::sync::LazyLock;

use aho_corasick::{AhoCorasick, AhoCorasickKind, MatchKind};
use regex::{Regex, RegexBuilder};
use regex_syntax::hir::literal::{ExtractKind, Extractor};
use regex_syntax::hir::{Hir, HirKind};
use serde::Deserialize;

use super::reason::{BounceReason, BounceType, bounce_type};

/// The built-in rules, compiled into the binary.
pub const BUILTIN_RULES: &str = include_str!("rules.toml");

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("rules file is not valid TOML: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("rule {index} has unknown reason {reason:?}")]
    UnknownReason { index: usize, reason: String },
    #[error("status table entry {status:?} has unknown reason {reason:?}")]
    UnknownStatusReason { status: String, reason: String },
    #[error("rule {index} ({reason}) has neither status codes, reply codes nor patterns")]
    EmptyRule { index: usize, reason: String },
    #[error("rule {index} ({reason}) has stage {stage}; stages are 1, 2 and 3")]
    BadStage {
        index: usize,
        reason: String,
        stage: u8,
    },
    #[error("refinable reason {0:?} is unknown")]
    UnknownRefinable(String),
    #[error("invalid pattern in rules: {0}")]
    Regex(#[from] regex::Error),
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    /// Enhanced status → reason, used when no rule matched.
    #[serde(default)]
    status: HashMap<String, String>,
    /// Reasons from the status table that stage-2 rules may refine.
    #[serde(default)]
    refinable: Vec<String>,
    #[serde(default)]
    rule: Vec<RuleSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    reason: String,
    /// 1 (before the status table, the default), 2 (refining a generic status) or 3 (last).
    #[serde(default = "default_stage")]
    stage: u8,
    /// Reply codes (`503`) that select this reason by themselves.
    #[serde(default)]
    reply_codes: Vec<u16>,
    /// SMTP commands the rule never applies to.
    #[serde(default)]
    not_commands: Vec<String>,
    /// Reasons whose patterns, when they match too, void this rule's status-code selection.
    #[serde(default)]
    status_unless: Vec<String>,
    /// Select only when a code (status or reply code) AND a pattern match, not either.
    #[serde(default)]
    all: bool,
    /// Regexes that, when they match, make this rule's patterns not count.
    #[serde(default)]
    except: Vec<String>,
    /// Also use the patterns of the first rule (same file) with this reason.
    #[serde(default)]
    same_patterns_as: Option<String>,
    /// Enhanced status codes (`5.2.2`) that select this reason by themselves.
    #[serde(default)]
    status: Vec<String>,
    /// SMTP commands (`MAIL`, `RCPT`, `DATA`, ...) the rule is limited to; empty = any.
    #[serde(default)]
    commands: Vec<String>,
    /// Regular expressions matched against the lowercased, whitespace-collapsed diagnostic.
    #[serde(default)]
    patterns: Vec<String>,
}

fn default_stage() -> u8 {
    1
}

#[derive(Debug)]
struct Rule {
    reason: BounceReason,
    stage: u8,
    status: Vec<String>,
    reply_codes: Vec<u16>,
    commands: Vec<String>,
    not_commands: Vec<String>,
    status_unless: Vec<BounceReason>,
    all: bool,
    /// The rule's patterns as written; their alternation is compiled only
    /// when the prefilter is off.
    patterns: Vec<String>,
    regex: std::sync::OnceLock<Option<Regex>>,
    /// All `except` patterns as one alternation.
    except: Option<Regex>,
    /// This rule's entries in [`Classifier::branches`].
    branches: std::ops::Range<usize>,
}

impl Rule {
    fn applies_to(&self, command: Option<&str>) -> bool {
        let allowed = self.commands.is_empty()
            || command.is_some_and(|c| self.commands.iter().any(|x| x.eq_ignore_ascii_case(c)));
        let refused =
            command.is_some_and(|c| self.not_commands.iter().any(|x| x.eq_ignore_ascii_case(c)));
        allowed && !refused
    }

    fn selects_by_code(&self, status: Option<&str>, reply_code: Option<u16>) -> bool {
        status.is_some_and(|s| self.status.iter().any(|c| c == s))
            || reply_code.is_some_and(|c| self.reply_codes.contains(&c))
    }
}

/// What a classifier looks at for one failed recipient.
#[derive(Debug, Clone, Copy, Default)]
pub struct Evidence<'a> {
    /// Enhanced status code (RFC 3463), e.g. `5.1.1`.
    pub status: Option<&'a str>,
    pub reply_code: Option<u16>,
    /// Diagnostic text (the remote server's reply or the MTA's explanation).
    pub diagnostic: &'a str,
    /// DSN action (`failed`, `delayed`, ...).
    pub action: Option<&'a str>,
    /// The SMTP command the remote server refused (`MAIL`, `RCPT`, `DATA`), when known.
    pub command: Option<&'a str>,
}

/// A compiled rule set. Build once, share by reference.
#[derive(Debug)]
pub struct Classifier {
    rules: Vec<Rule>,
    /// The indexes of the rules of stage 1, 2 and 3, in order.
    stages: [Vec<usize>; 3],
    status_table: HashMap<String, BounceReason>,
    refinable: Vec<BounceReason>,
    /// Every top-level branch of every rule's patterns, compiled alone: only the branches
    /// whose literals the text holds are searched.
    branches: Vec<Regex>,
    prefilter: Prefilter,
}

static BUILTIN: LazyLock<Classifier> = LazyLock::new(|| {
    // The built-in rules are part of the binary and covered by tests; failing here is a
    // build defect, not an input error.
    #[allow(clippy::expect_used)]
    Classifier::from_sources(&[BUILTIN_RULES]).expect("built-in bounce rules compile")
});

impl Classifier {
    /// The classifier with only the built-in rules.
    pub fn builtin() -> &'static Classifier {
        &BUILTIN
    }

    /// Built-in rules with `user_rules` (same TOML form) tried first.
    pub fn with_user_rules(user_rules: &str) -> Result<Classifier, RulesError> {
        Self::from_sources(&[user_rules, BUILTIN_RULES])
    }

    /// Rules from several files, earlier files first; earlier `[status]` entries win.
    pub fn from_sources(sources: &[&str]) -> Result<Classifier, RulesError> {
        let mut rules = Vec::new();
        let mut branches = Vec::new();
        let mut literals = Vec::new();
        let mut status_table = HashMap::new();
        let mut refinable = Vec::new();
        for source in sources {
            let file: RulesFile = toml::from_str(source)?;
            // Pattern lists by reason (first rule with patterns), for `same_patterns_as`.
            let mut file_patterns: Vec<(String, Vec<String>)> = Vec::new();
            for spec in &file.rule {
                if !spec.patterns.is_empty()
                    && !file_patterns.iter().any(|(r, _)| *r == spec.reason)
                {
                    file_patterns.push((spec.reason.clone(), spec.patterns.clone()));
                }
            }
            for r in file.refinable {
                let parsed = r
                    .parse::<BounceReason>()
                    .map_err(|_| RulesError::UnknownRefinable(r.clone()))?;
                if !refinable.contains(&parsed) {
                    refinable.push(parsed);
                }
            }
            for (status, reason) in file.status {
                let parsed = reason.parse::<BounceReason>().map_err(|_| {
                    RulesError::UnknownStatusReason {
                        status: status.clone(),
                        reason: reason.clone(),
                    }
                })?;
                status_table.entry(status).or_insert(parsed);
            }
            for mut spec in file.rule {
                let index = rules.len();
                if let Some(other) = &spec.same_patterns_as {
                    let copied = file_patterns
                        .iter()
                        .find(|(r, _)| r == other)
                        .map(|(_, p)| p.clone())
                        .ok_or_else(|| RulesError::UnknownReason {
                            index,
                            reason: other.clone(),
                        })?;
                    spec.patterns.extend(copied);
                }
                let mut status_unless = Vec::new();
                for r in &spec.status_unless {
                    status_unless.push(r.parse::<BounceReason>().map_err(|_| {
                        RulesError::UnknownReason {
                            index,
                            reason: r.clone(),
                        }
                    })?);
                }
                let reason =
                    spec.reason
                        .parse::<BounceReason>()
                        .map_err(|_| RulesError::UnknownReason {
                            index,
                            reason: spec.reason.clone(),
                        })?;
                if spec.status.is_empty() && spec.patterns.is_empty() && spec.reply_codes.is_empty()
                {
                    return Err(RulesError::EmptyRule {
                        index,
                        reason: spec.reason,
                    });
                }
                if !(1..=3).contains(&spec.stage) {
                    return Err(RulesError::BadStage {
                        index,
                        reason: spec.reason,
                        stage: spec.stage,
                    });
                }
                let except = alternation(&spec.except)?;
                let first_branch = branches.len();
                for (branch, lits) in pattern_branches(&spec.patterns)? {
                    branches.push(branch);
                    literals.push(lits);
                }
                rules.push(Rule {
                    reason,
                    stage: spec.stage,
                    status: spec.status,
                    reply_codes: spec.reply_codes,
                    commands: spec.commands,
                    not_commands: spec.not_commands,
                    status_unless,
                    all: spec.all,
                    patterns: spec.patterns,
                    regex: std::sync::OnceLock::new(),
                    except,
                    branches: first_branch..branches.len(),
                });
            }
        }
        let stages = [1, 2, 3].map(|stage| {
            (0..rules.len())
                .filter(|&i| rules.get(i).is_some_and(|r: &Rule| r.stage == stage))
                .collect()
        });
        Ok(Classifier {
            rules,
            stages,
            status_table,
            refinable,
            branches,
            prefilter: Prefilter::new(literals),
        })
    }

    /// The first rule of `stage` that selects its reason for this evidence.
    fn first_rule(&self, m: &mut Matches<'_>, ev: &Evidence<'_>, stage: u8) -> Option<usize> {
        let status = ev.status.map(str::trim).filter(|s| !s.is_empty());
        let of_stage = self.stages.get(usize::from(stage).wrapping_sub(1));
        for &i in of_stage.into_iter().flatten() {
            let Some(rule) = self.rules.get(i) else {
                continue;
            };
            if !rule.applies_to(ev.command) {
                continue;
            }
            let by_code = rule.selects_by_code(status, ev.reply_code)
                && !rule
                    .status_unless
                    .iter()
                    .any(|&r| m.reason_matches(self, r, ev.command));
            let selected = if rule.all {
                by_code && m.rule_matches(self, i)
            } else {
                by_code || m.rule_matches(self, i)
            };
            if selected {
                return Some(i);
            }
        }
        None
    }

    /// The reason for one failed recipient whose diagnostic is an SMTP reply (or unknown).
    pub fn reason(&self, ev: &Evidence<'_>) -> BounceReason {
        self.reason_typed(ev, None)
    }

    /// The reason for one failed recipient; `diagnostic_type` is the Diagnostic-Code type
    /// (`smtp`, `x-unix`, `x-postfix`), which changes the order of decision (see above).
    pub fn reason_typed(&self, ev: &Evidence<'_>, diagnostic_type: Option<&str>) -> BounceReason {
        // A long extension type (`X-Outbound-Mail-Relay`) names the relay that wrote the text,
        // not whether it is an SMTP reply or a mailer's own message (`X-Unix`, `X-Postfix`):
        // the rules read such a diagnostic as untyped.
        let diagnostic_type = diagnostic_type.filter(|t| super::dsn::is_registered_type(t));
        let status = ev.status.map(str::trim).filter(|s| !s.is_empty());
        if let Some(s) = status
            && s.starts_with("2.")
            && !matches!(ev.action, Some(a) if is_failure_action(a))
        {
            return BounceReason::Delivered;
        }
        let normalized = normalize(ev.diagnostic);
        let mut m = Matches::new(&normalized, self.rules.len());
        let reason_of = |i: Option<usize>| i.and_then(|i| self.rules.get(i)).map(|r| r.reason);
        // Stage 1 reads SMTP replies; a mailer's own message (X-Unix, X-Postfix) skips it,
        // unless Postfix's text quotes the remote server's reply (`host mx.example[192.0.2.1]
        // refused to talk to me: 421 ...`): that reply is an SMTP reply like any other.
        let smtp_diagnostic = diagnostic_type.is_none_or(|t| t.eq_ignore_ascii_case("smtp"))
            || (diagnostic_type.is_some_and(|t| t.eq_ignore_ascii_case("x-postfix"))
                && ev.reply_code.is_some());
        if smtp_diagnostic && let Some(reason) = reason_of(self.first_rule(&mut m, ev, 1)) {
            return reason;
        }
        let by_status = status.and_then(|s| self.status_table.get(s)).copied();
        if let Some(reason) = by_status
            && !self.refinable.contains(&reason)
            && smtp_diagnostic
        {
            return reason;
        }
        if let Some(reason) = reason_of(self.first_rule(&mut m, ev, 2)) {
            return reason;
        }
        if let Some(reason) = by_status {
            return reason;
        }
        if let Some(s) = status {
            if s.get(1..3) == Some(".6") {
                return BounceReason::ContentError;
            }
            if s.get(1..3) == Some(".7") {
                return BounceReason::SecurityError;
            }
        }
        if diagnostic_type.is_some_and(|t| {
            t.eq_ignore_ascii_case("x-unix") || t.eq_ignore_ascii_case("x-postfix")
        }) {
            return BounceReason::MailerError;
        }
        if let Some(reason) = reason_of(self.first_rule(&mut m, ev, 3)) {
            return reason;
        }
        if matches!(ev.action, Some(a) if a.eq_ignore_ascii_case("delayed") || a.eq_ignore_ascii_case("expired"))
        {
            return BounceReason::Expired;
        }
        if !normalized.is_empty() {
            return BounceReason::OnHold;
        }
        BounceReason::Undefined
    }

    /// Labels a synchronous SMTP reply the way a bounce with the same content would be;
    /// `command` is the SMTP command it answered (`MAIL`, `RCPT`, `DATA`), when known.
    pub fn classify_reply(
        &self,
        reply_code: u16,
        enhanced_status: Option<&str>,
        text: &str,
        command: Option<&str>,
    ) -> (BounceReason, BounceType) {
        let status = enhanced_status
            .map(str::to_string)
            .or_else(|| super::text::find_enhanced_status(text));
        let ev = Evidence {
            status: status.as_deref(),
            reply_code: Some(reply_code),
            diagnostic: text,
            action: Some(if reply_code >= 500 {
                "failed"
            } else {
                "delayed"
            }),
            command,
        };
        let mut reason = self.reason(&ev);
        if reply_code < 400 && reason == BounceReason::Delivered {
            return (reason, BounceType::Undetermined);
        }
        // A temporary reply that nothing else explains is a deferral, not an expiry, unless
        // its status says so (X.4.7, delivery time expired): `451 4.3.0 try later` read as
        // `expired` on a recipient's first attempt.
        let says_expired = status.as_deref().is_some_and(|s| s.ends_with(".4.7"));
        if reply_code < 500 && reason == BounceReason::Expired && !says_expired {
            reason = BounceReason::OnHold;
        }
        (
            reason,
            bounce_type(reason, status.as_deref(), Some(reply_code)),
        )
    }
}

fn is_failure_action(action: &str) -> bool {
    action.eq_ignore_ascii_case("failed") || action.eq_ignore_ascii_case("delayed")
}

/// Which rules' patterns match one diagnostic, computed on first use.
struct Matches<'a> {
    text: &'a str,
    memo: Vec<Option<bool>>,
    /// The branches the text may match ([`Prefilter`]), once asked.
    possible: Option<BranchSet>,
}

impl<'a> Matches<'a> {
    fn new(text: &'a str, rules: usize) -> Self {
        Matches {
            text,
            memo: vec![None; rules],
            possible: None,
        }
    }

    /// Whether rule `i`'s patterns match (and none of its `except` patterns does).
    fn rule_matches(&mut self, c: &Classifier, i: usize) -> bool {
        if let Some(Some(known)) = self.memo.get(i) {
            return *known;
        }
        let text = self.text;
        let hit = !text.is_empty()
            && c.rules.get(i).is_some_and(|r| {
                let matched = if c.prefilter.enabled {
                    let possible = self
                        .possible
                        .get_or_insert_with(|| c.prefilter.possible(text));
                    possible
                        .members_in(r.branches.clone())
                        .any(|b| c.branches.get(b).is_some_and(|re| re.is_match(text)))
                } else {
                    r.regex
                        .get_or_init(|| alternation(&r.patterns).ok().flatten())
                        .as_ref()
                        .is_some_and(|re| re.is_match(text))
                };
                matched && !r.except.as_ref().is_some_and(|re| re.is_match(text))
            });
        if let Some(slot) = self.memo.get_mut(i) {
            *slot = Some(hit);
        }
        hit
    }

    /// Whether any rule of `reason` that applies to `command` matches the text.
    fn reason_matches(
        &mut self,
        c: &Classifier,
        reason: BounceReason,
        command: Option<&str>,
    ) -> bool {
        (0..c.rules.len()).any(|i| {
            c.rules.get(i).is_some_and(|r| {
                r.reason == reason && !r.branches.is_empty() && r.applies_to(command)
            }) && self.rule_matches(c, i)
        })
    }
}

/// One Aho-Corasick automaton over the literals every match of a pattern branch starts (or
/// ends) with: a diagnostic that holds none of a branch's literals cannot match it, so one
/// pass over the text replaces a regex search per rule, and only the few branches whose
/// literals occur are searched. The automaton is a DFA (one table look-up a byte; the
/// default NFA for this many literals took twice the instructions a diagnostic), over
/// literals cut to [`LITERAL_BYTES`] so that building it stays cheap.
#[derive(Debug)]
struct Prefilter {
    automaton: Option<AhoCorasick>,
    /// The branch each automaton pattern belongs to.
    owner: Vec<usize>,
    /// Branches without usable literals: their regex always runs.
    always: BranchSet,
    /// Off: each rule's whole alternation is searched instead (tests compare the two).
    enabled: bool,
}

impl Prefilter {
    /// `literals[i]`: branch `i`'s literals, `None` when they cannot be known.
    fn new(literals: Vec<Literals>) -> Self {
        let mut owner = Vec::new();
        let mut patterns = Vec::new();
        let mut always = BranchSet::empty(literals.len());
        for (branch, lits) in literals.into_iter().enumerate() {
            if lits.is_none() {
                always.insert(branch);
            }
            for lit in lits.into_iter().flatten() {
                owner.push(branch);
                patterns.push(lit);
            }
        }
        let build = |kind| {
            AhoCorasick::builder()
                .match_kind(MatchKind::Standard)
                .kind(kind)
                .build(&patterns)
        };
        // A DFA too large for its state ids (huge user rule files): the automatic choice.
        let automaton = build(Some(AhoCorasickKind::DFA))
            .or_else(|_| build(None))
            .ok();
        if automaton.is_none() {
            // Cannot happen for byte literals; without it every regex simply runs.
            always = BranchSet::full(always.len);
        }
        Prefilter {
            automaton,
            owner,
            always,
            enabled: true,
        }
    }

    /// The branches whose regex may match `text`: every occurrence of every literal counts
    /// (an overlapping search), since a leftmost one may hide another branch's literal.
    fn possible(&self, text: &str) -> BranchSet {
        let mut out = self.always.clone();
        if let Some(ac) = &self.automaton {
            for m in ac.find_overlapping_iter(text.as_bytes()) {
                if let Some(&b) = self.owner.get(m.pattern().as_usize()) {
                    out.insert(b);
                }
            }
        }
        out
    }
}

/// A set of branch indexes, one bit each; an index past its length counts as present (the
/// branch is searched).
#[derive(Debug, Clone)]
struct BranchSet {
    words: Vec<u64>,
    len: usize,
}

impl BranchSet {
    fn empty(len: usize) -> Self {
        BranchSet {
            words: vec![0; len.div_ceil(64)],
            len,
        }
    }

    fn full(len: usize) -> Self {
        BranchSet {
            words: vec![u64::MAX; len.div_ceil(64)],
            len,
        }
    }

    fn insert(&mut self, branch: usize) {
        if let Some(w) = self.words.get_mut(branch / 64) {
            *w |= 1 << (branch % 64);
        }
    }

    /// The members of the set in `range`, in order, a word of bits at a time.
    fn members_in(&self, range: std::ops::Range<usize>) -> impl Iterator<Item = usize> + '_ {
        let mut next = range.start;
        std::iter::from_fn(move || {
            while next < range.end {
                let b = next;
                if b >= self.len {
                    next += 1;
                    return Some(b);
                }
                let bits = self.words.get(b / 64).map_or(0, |w| w >> (b % 64));
                let found = b + bits.trailing_zeros() as usize;
                if bits == 0 || found >= self.len {
                    // On to the next word, or to the indexes past the end (all members).
                    next = ((b / 64 + 1) * 64).min(self.len);
                    continue;
                }
                next = found + 1;
                return (found < range.end).then_some(found);
            }
            None
        })
    }

    /// Whether `branch` is in the set: the definition [`BranchSet::members_in`] follows.
    #[cfg(test)]
    fn contains(&self, branch: usize) -> bool {
        branch >= self.len
            || self
                .words
                .get(branch / 64)
                .is_some_and(|w| w & (1 << (branch % 64)) != 0)
    }
}

/// Literals one of which every match of a branch contains; `None`: not known.
type Literals = Option<Vec<Vec<u8>>>;

/// The top-level branches of `patterns`, each compiled alone, with the literals one of which
/// every match of it contains (its prefixes, else its suffixes; `None`: not known, the branch
/// is always searched).
fn pattern_branches(patterns: &[String]) -> Result<Vec<(Regex, Literals)>, RulesError> {
    let mut out = Vec::new();
    for p in patterns {
        let pattern = ascii_word_boundaries(p);
        let Ok(hir) = regex_syntax::Parser::new().parse(&pattern) else {
            // A bad pattern: compiling it reports what is wrong (the rules file is refused).
            out.push((compile(&pattern)?, None));
            continue;
        };
        let branches = match hir.kind() {
            HirKind::Alternation(branches) => branches.as_slice(),
            _ => std::slice::from_ref(&hir),
        };
        for branch in branches {
            let lits = branch_literals(branch, ExtractKind::Prefix)
                .or_else(|| branch_literals(branch, ExtractKind::Suffix));
            out.push((compile(&branch.to_string())?, lits));
        }
    }
    Ok(out)
}

fn compile(pattern: &str) -> Result<Regex, RulesError> {
    Ok(RegexBuilder::new(pattern)
        .size_limit(32 << 20)
        .dfa_size_limit(16 << 20)
        .build()?)
}

/// The most bytes of a literal the prefilter looks for: the part of a prefix (suffix)
/// literal next to the match's start (end) still occurs in every match, and the short ones
/// keep the automaton small enough to build as a DFA in a few million instructions.
const LITERAL_BYTES: usize = 16;

fn branch_literals(hir: &Hir, kind: ExtractKind) -> Literals {
    let suffix = matches!(kind, ExtractKind::Suffix);
    let seq = Extractor::new().kind(kind).extract(hir);
    let lits = seq.literals()?;
    if lits.is_empty() || lits.iter().any(|l| l.as_bytes().is_empty()) {
        return None;
    }
    let mut out: Vec<Vec<u8>> = Vec::with_capacity(lits.len());
    for lit in lits {
        let bytes = lit.as_bytes();
        let kept = if suffix {
            bytes.get(bytes.len().saturating_sub(LITERAL_BYTES)..)
        } else {
            bytes.get(..bytes.len().min(LITERAL_BYTES))
        };
        let kept = kept.unwrap_or(bytes);
        if !out.iter().any(|o| o == kept) {
            out.push(kept.to_vec());
        }
    }
    Some(out)
}

/// One regex matching any of `patterns`, or none for no patterns.
fn alternation(patterns: &[String]) -> Result<Option<Regex>, RulesError> {
    if patterns.is_empty() {
        return Ok(None);
    }
    let joined = patterns
        .iter()
        .map(|p| format!("(?:{})", ascii_word_boundaries(p)))
        .collect::<Vec<_>>()
        .join("|");
    match RegexBuilder::new(&joined)
        .size_limit(32 << 20)
        .dfa_size_limit(16 << 20)
        .build()
    {
        Ok(re) => Ok(Some(re)),
        Err(joined_err) => {
            // Report the pattern that is wrong, not the whole alternation.
            for p in patterns {
                Regex::new(&ascii_word_boundaries(p))?;
            }
            Err(joined_err.into())
        }
    }
}

/// Rewrites `\b` / `\B` as ASCII word boundaries: Unicode ones stop the lazy DFA on any
/// non-ASCII byte and fall back to the much slower PikeVM.
fn ascii_word_boundaries(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len() + 16);
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('b') => out.push_str("(?-u:\\b)"),
                Some('B') => out.push_str("(?-u:\\B)"),
                Some(other) => {
                    out.push('\\');
                    out.push(other);
                }
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Lowercases and collapses every whitespace run to one space, so patterns can be written
/// as plain lowercase phrases; a multi-line SMTP reply (`550-5.2.1 ...` lines) becomes one
/// sentence.
pub fn normalize(text: &str) -> String {
    let flat = normalize_spaces(text);
    if !super::text::may_continue_reply(&flat) {
        return flat;
    }
    super::text::join_reply_lines(&flat)
}

fn normalize_spaces(text: &str) -> String {
    if text.is_ascii() {
        return normalize_ascii_spaces(text.as_bytes());
    }
    let mut out = String::with_capacity(text.len());
    for word in text.split(char::is_whitespace).filter(|w| !w.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        if word.is_ascii() {
            push_ascii_lowercase(&mut out, word);
            continue;
        }
        for c in word.chars() {
            // ASCII (nearly every character of a diagnostic) skips the Unicode tables.
            if c.is_ascii() {
                out.push(c.to_ascii_lowercase());
            } else {
                out.extend(c.to_lowercase());
            }
        }
    }
    out
}

/// `out` with `word` (ASCII) appended in lowercase: copied whole, then lowercased in place.
fn push_ascii_lowercase(out: &mut String, word: &str) {
    let start = out.len();
    out.push_str(word);
    if let Some(added) = out.get_mut(start..) {
        added.make_ascii_lowercase();
    }
}

/// [`normalize_spaces`] of ASCII text: the words (split at ASCII white space, which is all
/// of `char::is_whitespace` there) copied whole, then the copy lowercased in one pass.
fn normalize_ascii_spaces(text: &[u8]) -> String {
    let mut out = Vec::with_capacity(text.len());
    let words = text
        .split(|&b| super::text::is_white_space_byte(b))
        .filter(|w| !w.is_empty());
    for word in words {
        if !out.is_empty() {
            out.push(b' ');
        }
        out.extend_from_slice(word);
    }
    out.make_ascii_lowercase();
    // ASCII in, ASCII out: the check cannot fail.
    String::from_utf8(out).unwrap_or_default()
}

/// [`Classifier::classify_reply`] with the built-in rules.
pub fn classify_reply(
    reply_code: u16,
    enhanced_status: Option<&str>,
    text: &str,
    command: Option<&str>,
) -> (BounceReason, BounceType) {
    Classifier::builtin().classify_reply(reply_code, enhanced_status, text, command)
}

#[cfg(test)]
mod tests {
    use super::*;
    use BounceReason::*;

    fn reason(status: Option<&str>, text: &str) -> BounceReason {
        Classifier::builtin().reason(&Evidence {
            status,
            diagnostic: text,
            action: Some("failed"),
            ..Default::default()
        })
    }

    /// The ASCII shortcut lowercases and collapses exactly as the Unicode tables do.
    #[test]
    fn normalize_spaces_matches_the_unicode_definition() {
        // The definition, character by character through the Unicode tables.
        let slow = |t: &str| {
            let words: Vec<String> = t
                .split(char::is_whitespace)
                .filter(|w| !w.is_empty())
                .map(|w| w.chars().flat_map(char::to_lowercase).collect())
                .collect();
            words.join(" ")
        };
        let alphabet = crate::test_support::test_chars(
            "aZ5 \t\r\n\x0b\x0c\x1c\u{85}\u{a0}\u{2003}\u{3000}ÉİẞΣКǅ-.",
        );
        let mut rng = crate::test_support::TestRng::new(0x51_7cc1_b727_220a);
        for _ in 0..3000 {
            let t = rng.text(31, &alphabet);
            assert_eq!(normalize_spaces(&t), slow(&t), "{t:?}");
            let ascii: String = t.chars().filter(char::is_ascii).collect();
            assert_eq!(normalize_spaces(&ascii), slow(&ascii), "{ascii:?}");
        }
    }

    #[test]
    fn builtin_rules_compile() {
        let c = Classifier::builtin();
        assert!(c.rules.len() > 20);
        assert!(!c.status_table.is_empty());
    }

    #[test]
    fn classifies_a_synchronous_user_unknown_reply_as_hard() {
        assert_eq!(
            classify_reply(550, Some("5.1.1"), "User unknown", Some("RCPT")),
            (UserUnknown, BounceType::Hard)
        );
        // Without a status, the wording decides at RCPT...
        assert_eq!(
            classify_reply(550, None, "no such user here", Some("RCPT")),
            (UserUnknown, BounceType::Hard)
        );
        // ...and after DATA the same words mean a filter refused the recipient.
        assert_eq!(
            classify_reply(550, None, "no such user here", Some("DATA")),
            (Filtered, BounceType::Soft)
        );
    }

    #[test]
    fn finds_the_enhanced_status_inside_reply_text() {
        assert_eq!(
            classify_reply(552, None, "5.2.2 Mailbox full, try later", Some("RCPT")),
            (MailboxFull, BounceType::Soft)
        );
    }

    #[test]
    fn text_beats_a_generic_status_code() {
        assert_eq!(reason(Some("5.0.0"), "550 Mailbox is full"), MailboxFull);
        assert_eq!(
            reason(Some("5.1.1"), "quota exceeded for user"),
            MailboxFull
        );
    }

    #[test]
    fn status_alone_decides_when_text_says_nothing() {
        assert_eq!(reason(Some("5.1.1"), ""), UserUnknown);
        assert_eq!(reason(Some("5.1.2"), "bad"), HostUnknown);
        assert_eq!(reason(Some("5.2.2"), ""), MailboxFull);
        assert_eq!(reason(Some("5.6.9"), ""), ContentError);
        assert_eq!(reason(Some("5.7.99"), ""), SecurityError);
    }

    #[test]
    fn delayed_without_other_clue_is_expired_and_empty_is_undefined() {
        let c = Classifier::builtin();
        let ev = Evidence {
            action: Some("delayed"),
            ..Default::default()
        };
        assert_eq!(c.reason(&ev), Expired);
        assert_eq!(c.reason(&Evidence::default()), Undefined);
        assert_eq!(reason(None, "something odd happened"), OnHold);
    }

    #[test]
    fn delivered_status_is_delivered() {
        let c = Classifier::builtin();
        let ev = Evidence {
            status: Some("2.0.0"),
            action: Some("delivered"),
            ..Default::default()
        };
        assert_eq!(c.reason(&ev), Delivered);
    }

    #[test]
    fn user_rules_are_tried_before_builtin_ones() {
        let user = r#"
            [[rule]]
            reason = "blocked"
            patterns = ['mailbox is full of spam traps']
        "#;
        let c = Classifier::with_user_rules(user).unwrap_or_else(|e| panic!("{e}"));
        let ev = Evidence {
            diagnostic: "550 Mailbox is FULL of   spam traps",
            ..Default::default()
        };
        assert_eq!(c.reason(&ev), Blocked);
        assert_eq!(Classifier::builtin().reason(&ev), MailboxFull);
    }

    #[test]
    fn user_status_table_overrides_builtin() {
        let c = Classifier::with_user_rules("[status]\n\"5.9.9\" = \"suppressed\"\n")
            .unwrap_or_else(|e| panic!("{e}"));
        let ev = Evidence {
            status: Some("5.9.9"),
            ..Default::default()
        };
        assert_eq!(c.reason(&ev), Suppressed);
    }

    #[test]
    fn bad_user_rules_are_reported() {
        assert!(matches!(
            Classifier::with_user_rules("[[rule]]\nreason = \"nope\"\npatterns = ['x']"),
            Err(RulesError::UnknownReason { .. })
        ));
        assert!(matches!(
            Classifier::with_user_rules("[[rule]]\nreason = \"blocked\"\npatterns = ['(']"),
            Err(RulesError::Regex(_))
        ));
        assert!(matches!(
            Classifier::with_user_rules("[[rule]]\nreason = \"blocked\""),
            Err(RulesError::EmptyRule { .. })
        ));
        assert!(matches!(
            Classifier::with_user_rules("[[rule]]\nreason = \"blocked\"\nbogus = 1"),
            Err(RulesError::Toml(_))
        ));
    }

    fn at(command: &str, status: Option<&str>, text: &str) -> BounceReason {
        Classifier::builtin().reason(&Evidence {
            status,
            diagnostic: text,
            action: Some("failed"),
            command: Some(command),
            ..Default::default()
        })
    }

    #[test]
    fn an_x_postfix_text_is_read_as_a_reply_only_where_it_quotes_one() {
        let typed = |reply_code, text| {
            Classifier::builtin().reason_typed(
                &Evidence {
                    status: Some("4.0.0"),
                    reply_code,
                    diagnostic: text,
                    action: Some("delayed"),
                    ..Default::default()
                },
                Some("x-postfix"),
            )
        };
        let greeting = "delivery temporarily suspended: host mx.example.net[192.0.2.7] refused \
            to talk to me: 421 Service not available, closing transmission channel";
        // The remote server's greeting refused us: its reply decides, as at RCPT.
        assert_eq!(typed(Some(421), greeting), Blocked);
        // Without a reply code found in it, the text is Postfix's own: a mailer error.
        assert_eq!(typed(None, greeting), MailerError);
    }

    #[test]
    fn provider_codes_decide_whatever_the_wording() {
        // au/KDDI: no address before "User unknown" means the recipient's filter refused it.
        assert_eq!(reason(Some("5.0.0"), "550 : User unknown"), Filtered);
        assert_eq!(
            reason(Some("5.0.0"), "550 <a@ezweb.example>: User unknown"),
            UserUnknown
        );
        // Orange / La Poste and Yahoo name an unknown recipient even after DATA.
        assert_eq!(
            at(
                "DATA",
                Some("5.5.0"),
                "550 5.5.0 Invalid recipient. LPN007_416"
            ),
            UserUnknown
        );
        assert_eq!(
            at(
                "DATA",
                None,
                "554 delivery error: dd This user doesn't have a example.net account"
            ),
            UserUnknown
        );
        // GoDaddy's rate limit and Facebook's recipient preferences beat a 5.1.1 status.
        assert_eq!(
            reason(
                Some("5.1.1"),
                "550 5.1.1 <a@example.com> - 192.0.2.1 has sent to too many recipients this hour. IB607"
            ),
            Speeding
        );
        assert_eq!(
            reason(
                Some("5.1.1"),
                "550 5.1.1 RCP-P2 Refused due to recipient preferences"
            ),
            Filtered
        );
        assert_eq!(
            reason(
                Some("5.1.1"),
                "550 5.1.1 RCP-P1 Recipient address does not exist"
            ),
            UserUnknown
        );
        assert_eq!(
            at("RCPT", None, "554 Host network not allowed - see the docs"),
            PolicyViolation
        );
        assert_eq!(
            reason(
                Some("5.4.4"),
                "Name service error for name=example.org type=MX: Malformed or unexpected name server reply"
            ),
            NotAccept
        );
    }

    #[test]
    fn prefilter_never_changes_a_verdict() {
        let filtered = Classifier::from_sources(&[BUILTIN_RULES]).unwrap();
        let mut unfiltered = Classifier::from_sources(&[BUILTIN_RULES]).unwrap();
        // Whole alternations, no literal prefilter: what the branches must reproduce.
        unfiltered.prefilter.enabled = false;
        // Every plain phrase of the built-in rules, inside a reply, and some real replies.
        let file: RulesFile = toml::from_str(BUILTIN_RULES).unwrap();
        let mut texts: Vec<String> = file
            .rule
            .iter()
            .flat_map(|r| r.patterns.iter())
            .filter(|p| !p.contains(['\\', '(', '[', '?', '*', '+', '|', '.', '^', '$', '{']))
            .map(|p| format!("550 5.0.0 <a@example.org>: {p} (see help)"))
            .collect();
        assert!(texts.len() > 100, "{}", texts.len());
        texts.extend(
            [
                "550 5.1.1 <a@example.org>: Recipient address rejected: User unknown",
                "452 4.2.2 Mailbox full",
                "554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org",
                "550 5.7.1 Message rejected as spam by Content Filtering",
                "421 4.7.0 Try again later, closing connection. (EHLO) 123 spam",
                "550 high probability of spam",
                "451 4.7.1 Greylisted, please try again in 300 seconds",
                "",
            ]
            .map(str::to_string),
        );
        for text in &texts {
            for status in [None, Some("5.0.0"), Some("5.7.1"), Some("4.2.2")] {
                for command in [None, Some("RCPT"), Some("DATA")] {
                    let ev = Evidence {
                        status,
                        reply_code: Some(550),
                        diagnostic: text,
                        action: Some("failed"),
                        command,
                    };
                    assert_eq!(
                        filtered.reason(&ev),
                        unfiltered.reason(&ev),
                        "{text:?} {status:?} {command:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn prefilter_literals_come_from_prefixes_or_suffixes() {
        let lits = |p: &str| -> Vec<Literals> {
            pattern_branches(&[p.to_string()])
                .unwrap()
                .into_iter()
                .map(|(_, l)| l)
                .collect()
        };
        // Each top-level branch on its own; one that starts with a class has no prefix
        // literal but a suffix one.
        let got = lits(r"(?:\d\.\d\.\d|\d{3}) spam\z|mailbox full");
        assert_eq!(got.len(), 2, "{got:?}");
        let first = got[0].as_ref().expect("suffix literals");
        assert!(first.iter().all(|l| l.ends_with(b" spam")), "{first:?}");
        // Literals are cut to their first (prefixes) or last (suffixes) LITERAL_BYTES.
        assert_eq!(got[1], Some(vec![b"mailbox full".to_vec()]));
        let long = lits(r"(?:\d\.\d\.\d|\d{3}) mailbox is over its quota|user is over quota now");
        assert_eq!(long[0], Some(vec![b"s over its quota".to_vec()]));
        assert_eq!(long[1], Some(vec![b"user is over quo".to_vec()]));
        // Nothing fixed at either end: the branch is always searched.
        assert_eq!(lits(r"\w+ \w+"), [None]);
        let p = Prefilter::new(vec![Some(vec![b"full".to_vec()]), None]);
        let possible = |t: &str| {
            let set = p.possible(t);
            (0..3).map(|b| set.contains(b)).collect::<Vec<_>>()
        };
        // Branch 2 does not exist: past the end, a branch is always searched.
        assert_eq!(possible("mailbox is full"), [true, true, true]);
        assert_eq!(possible("user unknown"), [false, true, true]);
    }

    /// Walking the set's words finds exactly the branches `contains` says are in it.
    #[test]
    fn branch_set_members_are_those_it_contains() {
        let mut rng = crate::test_support::TestRng::new(0x0b17_5e75_0000_0001);
        for _ in 0..500 {
            let len = rng.below(200);
            let mut set = BranchSet::empty(len);
            for _ in 0..rng.below(40) {
                set.insert(rng.below(len + 1));
            }
            let start = rng.below(len + 10);
            let end = start + rng.below(len + 10);
            let walked: Vec<usize> = set.members_in(start..end).collect();
            let defined: Vec<usize> = (start..end).filter(|&b| set.contains(b)).collect();
            assert_eq!(walked, defined, "{len} {start}..{end}");
        }
        assert!(BranchSet::full(3).members_in(0..5).eq(0..5));
    }

    #[test]
    fn word_boundaries_become_ascii_ones() {
        assert_eq!(
            ascii_word_boundaries(r"\bab\B\\b\.x"),
            r"(?-u:\b)ab(?-u:\B)\\b\.x"
        );
    }

    #[test]
    fn normalize_lowercases_and_collapses_whitespace() {
        assert_eq!(normalize("  550\r\n  User\tUnknown  "), "550 user unknown");
        assert_eq!(
            normalize(
                "550-5.2.1 The user is receiving\r\n550-5.2.1 mail at a rate\r\n550 5.2.1 https://x"
            ),
            "550-5.2.1 the user is receiving mail at a rate https://x"
        );
    }
}
