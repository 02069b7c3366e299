//! Time arguments of the CLI and API (`--since`, `--until`): RFC 3339, a date, or a duration
//! meaning "that long ago".

use chrono::{DateTime, NaiveDate, Utc};

/// Parses `s` into Unix milliseconds. `now_ms` anchors relative forms like `2h` or `3d`.
pub fn parse_time(s: &str, now_ms: i64) -> Result<i64, String> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        let t = d
            .and_hms_opt(0, 0, 0)
            .ok_or_else(|| format!("invalid date {s:?}"))?;
        return Ok(t.and_utc().timestamp_millis());
    }
    if let Ok(d) = humantime::parse_duration(s) {
        let ms = i64::try_from(d.as_millis()).map_err(|_| format!("duration too long: {s:?}"))?;
        return Ok(now_ms.saturating_sub(ms));
    }
    Err(format!(
        "cannot read time {s:?}: use RFC 3339 (2026-11-23T10:00:00Z), a date (2026-11-23) or a duration ago (2h, 3d)"
    ))
}

/// Unix milliseconds → RFC 3339 UTC with seconds.
pub fn format_time(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| ms.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_three_forms() {
        let now = 1_800_000_000_000;
        assert_eq!(
            parse_time("2026-11-23T10:00:00Z", now).unwrap(),
            DateTime::parse_from_rfc3339("2026-11-23T10:00:00Z")
                .unwrap()
                .timestamp_millis()
        );
        assert_eq!(
            format_time(parse_time("2026-11-23", now).unwrap()),
            "2026-11-23T00:00:00Z"
        );
        assert_eq!(parse_time("2h", now).unwrap(), now - 7_200_000);
        assert!(parse_time("yesterday-ish", now).unwrap_err().contains("RFC 3339"));
    }
}
