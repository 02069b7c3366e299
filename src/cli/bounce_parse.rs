//! `mailtrail bounce parse FILE...`: parse returned mail from files, directories or mbox
//! files and print one line per bounce record (JSON lines with `--json`, a table without).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::bounce::{self, BounceRecord, Classifier};

/// One message to parse: where it came from and its bytes.
pub(crate) struct Source {
    pub(crate) file: String,
    /// 1-based position inside an mbox file; `None` for a single-message file.
    pub(crate) message: Option<usize>,
    pub(crate) raw: Vec<u8>,
}

/// Parses every message in `paths` with the built-in rules and prints its records.
pub fn run_bounce_parse(paths: &[PathBuf], json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    run_bounce_parse_with(paths, json, Classifier::builtin(), out)
}

/// As [`run_bounce_parse`], classifying with `classifier` (built-in plus user rules).
pub fn run_bounce_parse_with(
    paths: &[PathBuf],
    json: bool,
    classifier: &Classifier,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let (files, mut skipped) = collect_files(paths);
    let (mut messages, mut without_record) = (0usize, 0usize);
    if !json {
        writeln!(
            out,
            "{:<40} {:<36} {:<15} {:<12} {:<7} {:<5} {:<9} diagnostic",
            "file", "recipient", "reason", "type", "status", "code", "kind"
        )?;
    }
    for file in files {
        let data = match std::fs::read(&file) {
            Ok(data) => data,
            Err(e) => {
                skipped.push(format!("{}: {e}", file.display()));
                continue;
            }
        };
        for src in split_messages(&file, data) {
            let records = bounce::parse_with(&src.raw, classifier);
            messages += 1;
            if records.is_empty() {
                without_record += 1;
                // The table says so on the message's own row; JSON has one object per
                // record, and the count goes to standard error at the end.
                if !json {
                    writeln!(out, "{:<40} (no bounce record)", source_name(&src))?;
                }
            }
            for record in records {
                if json {
                    writeln!(out, "{}", json_line(&src, &record)?)?;
                } else {
                    writeln!(out, "{}", table_line(&src, &record))?;
                }
            }
        }
    }
    out.flush()?;
    if json && without_record > 0 {
        eprintln!(
            "mailtrail: {without_record} of {messages} message(s) gave no bounce record \
             (not a bounce, or none the parser could read)"
        );
    }
    report_skipped(&skipped)
}

/// The file a message came from, with its position in an mbox.
fn source_name(src: &Source) -> String {
    match src.message {
        Some(n) => format!("{}#{n}", src.file),
        None => src.file.clone(),
    }
}

/// The files under `paths`: each regular file named, and every regular file under each
/// directory (recursively, in name order, symbolic links followed). A directory reached
/// again (a link to it, or a link loop) is read once. What cannot be listed, or is no
/// regular file (a FIFO would block the read for ever), is left out and said in the second
/// list, so one bad entry does not end the run before the rest is read.
pub(crate) fn collect_files(paths: &[PathBuf]) -> (Vec<PathBuf>, Vec<String>) {
    let mut walk = Walk::default();
    for p in paths {
        walk.collect(p);
    }
    (walk.files, walk.skipped)
}

#[derive(Default)]
struct Walk {
    files: Vec<PathBuf>,
    skipped: Vec<String>,
    /// The directories read, by device and inode.
    seen: std::collections::HashSet<(u64, u64)>,
}

impl Walk {
    fn collect(&mut self, path: &Path) {
        use std::os::unix::fs::MetadataExt;
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) => return self.skipped.push(format!("{}: {e}", path.display())),
        };
        if meta.is_dir() {
            if !self.seen.insert((meta.dev(), meta.ino())) {
                return;
            }
            let entries = match std::fs::read_dir(path) {
                Ok(entries) => entries,
                Err(e) => return self.skipped.push(format!("{}: {e}", path.display())),
            };
            let mut entries: Vec<PathBuf> =
                entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            entries.sort();
            for e in entries {
                self.collect(&e);
            }
        } else if meta.is_file() {
            self.files.push(path.to_path_buf());
        } else {
            self.skipped
                .push(format!("{}: not a regular file", path.display()));
        }
    }
}

/// The files left out, on standard error; an error (exit status 1) when there were any.
pub(crate) fn report_skipped(skipped: &[String]) -> anyhow::Result<()> {
    for s in skipped {
        eprintln!("mailtrail: skipped {s}");
    }
    match skipped.len() {
        0 => Ok(()),
        n => anyhow::bail!("{n} file(s) could not be read (listed above)"),
    }
}

/// An mbox file (starts with a `From ` line) is split into its messages, `>From ` unquoted;
/// anything else is one message.
pub(crate) fn split_messages(path: &Path, data: Vec<u8>) -> Vec<Source> {
    let file = path.display().to_string();
    if !data.starts_with(b"From ") {
        return vec![Source {
            file,
            message: None,
            raw: data,
        }];
    }
    let mut messages: Vec<Vec<u8>> = Vec::new();
    for line in data.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b"From ") {
            messages.push(Vec::new());
            continue;
        }
        if let Some(cur) = messages.last_mut() {
            let unquoted = if line.starts_with(b">")
                && line
                    .iter()
                    .skip_while(|&&b| b == b'>')
                    .take(5)
                    .eq(b"From ".iter())
            {
                line.get(1..).unwrap_or(line)
            } else {
                line
            };
            cur.extend_from_slice(unquoted);
        }
    }
    // The empty line a writer puts after each message belongs to the mbox, not to the
    // message: kept, a message without a Message-ID was known by other content than the
    // same message stored in a file of its own, and fed in both ways it was stored twice.
    for raw in &mut messages {
        if raw.ends_with(b"\r\n\r\n") {
            raw.truncate(raw.len() - 2);
        } else if raw.ends_with(b"\n\n") {
            raw.truncate(raw.len() - 1);
        }
    }
    let single = messages.len() == 1;
    messages
        .into_iter()
        .enumerate()
        .map(|(i, raw)| Source {
            file: file.clone(),
            message: if single { None } else { Some(i + 1) },
            raw,
        })
        .collect()
}

fn json_line(src: &Source, record: &BounceRecord) -> anyhow::Result<String> {
    let mut value = serde_json::to_value(record)?;
    if let Some(obj) = value.as_object_mut() {
        obj.insert(
            "file".to_string(),
            serde_json::Value::String(src.file.clone()),
        );
        if let Some(n) = src.message {
            obj.insert("message".to_string(), serde_json::Value::from(n));
        }
    }
    Ok(serde_json::to_string(&value)?)
}

fn table_line(src: &Source, r: &BounceRecord) -> String {
    let file = source_name(src);
    // Both come from the network: shown with control characters escaped, on one line.
    let diagnostic: String = super::log::sanitize(r.diagnostic.as_deref().unwrap_or(""))
        .replace('\n', " ")
        .chars()
        .take(80)
        .collect();
    format!(
        "{:<40} {:<36} {:<15} {:<12} {:<7} {:<5} {:<9} {}",
        file,
        super::log::sanitize(&r.recipient).replace('\n', " "),
        r.reason.as_str(),
        r.bounce_type.as_str(),
        r.status.as_deref().unwrap_or("-"),
        r.reply_code
            .map(|c| c.to_string())
            .unwrap_or_else(|| "-".to_string()),
        r.kind.as_str(),
        diagnostic
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNCE: &str = "From: MAILER-DAEMON@mx.example.org\r\nTo: app@example.com\r\n\
Subject: Undelivered Mail Returned to Sender\r\n\r\n\
<nobody@example.net>: host mx.example.net[192.0.2.9] said: 550 5.1.1\r\n\
    <nobody@example.net>: Recipient address rejected: User unknown\r\n";

    #[test]
    fn splits_mbox_and_unquotes_from_lines() {
        let mbox = b"From a@b Mon Jan 1 00:00:00 2024\nSubject: one\n\n>From here\nFrom b@c Mon Jan 1 00:00:00 2024\nSubject: two\n\nx\n".to_vec();
        let msgs = split_messages(Path::new("m.mbox"), mbox);
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].raw, b"Subject: one\n\nFrom here\n");
        assert_eq!(msgs[1].message, Some(2));
        // Each message as it was before it was appended: without the separating empty line.
        let written = b"From a@b Mon Jan 1 00:00:00 2024\nSubject: one\n\nbody\n\n\
            From b@c Mon Jan 1 00:00:00 2024\r\nSubject: two\r\n\r\nx\r\n\r\n";
        let msgs = split_messages(Path::new("m.mbox"), written.to_vec());
        assert_eq!(msgs[0].raw, b"Subject: one\n\nbody\n");
        assert_eq!(msgs[1].raw, b"Subject: two\r\n\r\nx\r\n");
        let single = split_messages(Path::new("x.eml"), b"Subject: x\n\n".to_vec());
        assert_eq!(single.len(), 1);
        assert_eq!(single[0].message, None);
    }

    #[test]
    fn entries_that_cannot_be_read_are_skipped_and_the_rest_is_parsed() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("a.eml"), BOUNCE)?;
        // A FIFO (a read would block for ever) and a dangling link, sorted before z.eml.
        let fifo = dir.path().join("b.fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()?
                .success()
        );
        std::os::unix::fs::symlink(dir.path().join("gone"), dir.path().join("c.link"))?;
        std::fs::write(dir.path().join("z.eml"), BOUNCE)?;
        let (files, skipped) = collect_files(&[dir.path().to_path_buf()]);
        assert_eq!(files.len(), 2, "{files:?}");
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert!(
            skipped[0].contains("b.fifo: not a regular file"),
            "{skipped:?}"
        );
        assert!(skipped[1].contains("c.link"), "{skipped:?}");
        let mut out = Vec::new();
        let result = run_bounce_parse(&[dir.path().to_path_buf()], true, &mut out);
        assert!(result.is_err());
        let text = String::from_utf8(out)?;
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.contains("z.eml"), "{text}");
        Ok(())
    }

    #[test]
    fn a_directory_reached_again_through_links_is_read_once() -> anyhow::Result<()> {
        // lp/a/x.eml with two links from lp/a back to lp: followed blindly, the walk went
        // down every path of links until ELOOP (2^40 of them: it never ended).
        let dir = tempfile::tempdir()?;
        let lp = dir.path().join("lp");
        std::fs::create_dir_all(lp.join("a"))?;
        std::fs::write(lp.join("a/x.eml"), BOUNCE)?;
        std::os::unix::fs::symlink(&lp, lp.join("a/l1"))?;
        std::os::unix::fs::symlink(&lp, lp.join("a/l2"))?;
        let (files, skipped) = collect_files(&[lp.clone(), lp.join("a")]);
        assert_eq!(files, [lp.join("a/x.eml")]);
        assert!(skipped.is_empty(), "{skipped:?}");
        Ok(())
    }

    #[test]
    fn the_table_shows_network_text_escaped_on_one_line() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("esc.eml");
        std::fs::write(
            &p,
            BOUNCE.replace("host mx", "host \x1b]0;pwned\x07\x1b[2Jmx"),
        )?;
        let mut out = Vec::new();
        run_bounce_parse(&[p], false, &mut out)?;
        let text = String::from_utf8(out)?;
        assert!(!text.contains('\x1b') && !text.contains('\x07'), "{text:?}");
        assert!(text.contains("\\u{1b}"), "{text}");
        Ok(())
    }

    #[test]
    fn the_table_names_a_message_that_gave_no_record() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("note.eml");
        std::fs::write(&p, "From: a@b.example\r\nSubject: hi\r\n\r\nhello\r\n")?;
        let mut out = Vec::new();
        run_bounce_parse(&[p], false, &mut out)?;
        let text = String::from_utf8(out)?;
        assert!(
            text.lines()
                .any(|l| l.contains("note.eml") && l.contains("(no bounce record)")),
            "{text}"
        );
        Ok(())
    }

    #[test]
    fn prints_json_lines_with_the_required_fields() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("b.eml");
        std::fs::write(&p, BOUNCE)?;
        std::fs::write(
            dir.path().join("not.eml"),
            "From: a@b.example\r\nSubject: hi\r\n\r\nhello\r\n",
        )?;
        let mut out = Vec::new();
        run_bounce_parse(&[dir.path().to_path_buf()], true, &mut out)?;
        let text = String::from_utf8(out)?;
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(lines[0])?;
        for key in [
            "file",
            "recipient",
            "reason",
            "bounce_type",
            "status",
            "reply_code",
            "action",
            "diagnostic",
            "kind",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["recipient"], "nobody@example.net");
        assert_eq!(v["reason"], "userunknown");
        assert_eq!(v["bounce_type"], "hard");
        assert_eq!(v["reply_code"], 550);
        assert_eq!(v["file"], p.display().to_string());
        Ok(())
    }

    #[test]
    fn prints_a_table_without_json() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("b.eml");
        std::fs::write(&p, BOUNCE)?;
        let mut out = Vec::new();
        run_bounce_parse(&[p], false, &mut out)?;
        let text = String::from_utf8(out)?;
        assert!(text.lines().next().is_some_and(|l| l.starts_with("file")));
        assert!(text.contains("nobody@example.net") && text.contains("userunknown"));
        Ok(())
    }

    #[test]
    fn reports_missing_files() {
        let mut out = Vec::new();
        assert!(run_bounce_parse(&[PathBuf::from("/nonexistent/x.eml")], true, &mut out).is_err());
    }
}
