//! Parsing of the `KEY=VALUE` arguments of `settings set` and `automation set`.
//!
//! Every argument is checked before anything is written, and every invalid one is
//! reported at once.

use chrono::{DateTime, Utc};

use crate::store::Change;

/// Parses `settings set` arguments: `outbound_enabled`, `automation_paused`, `plan`,
/// `rate_per_minute` and `burst`.
pub fn tenant_changes(pairs: &[String]) -> Result<Vec<Change>, String> {
    collect(pairs, |key, value| match key {
        "outbound_enabled" => boolean(value).map(|v| change("outbound_enabled", v)),
        "automation_paused" => boolean(value).map(|v| change("automation_paused", v)),
        "plan" => match value {
            "starter" | "growth" | "enterprise" => Ok(change("plan", value)),
            _ => Err("write starter, growth or enterprise".into()),
        },
        "rate_per_minute" => positive(value).map(|v| change("rate_per_minute", v)),
        "burst" => positive(value).map(|v| change("burst", v)),
        _ => Err("unknown key; the keys are outbound_enabled, automation_paused, plan, rate_per_minute and burst".into()),
    })
}

/// Parses `automation set` arguments: `mode`, `shadow_validated`, `readiness_score`,
/// `readiness_threshold`, `revalidated` and `revalidation_interval_days`.
pub fn automation_changes(pairs: &[String], now: DateTime<Utc>) -> Result<Vec<Change>, String> {
    collect(pairs, |key, value| match key {
        "mode" => match value {
            "shadow" | "live" => Ok(change("mode", value)),
            _ => Err("write shadow or live".into()),
        },
        "shadow_validated" => boolean(value).map(|v| change("shadow_validated", v)),
        "readiness_score" => fraction(value).map(|v| change("readiness_score", v)),
        "readiness_threshold" => fraction(value).map(|v| change("readiness_threshold", v)),
        "revalidated" => {
            let time = if value == "now" {
                Ok(now)
            } else {
                DateTime::parse_from_rfc3339(value).map(|t| t.with_timezone(&Utc)).map_err(|_| "write now or an RFC 3339 time".to_string())
            };
            time.map(|t| change("revalidated_at", t.to_rfc3339()))
        }
        "revalidation_interval_days" => positive(value).map(|v| change("revalidation_interval_days", v)),
        _ => Err(
            "unknown key; the keys are mode, shadow_validated, readiness_score, readiness_threshold, revalidated and revalidation_interval_days"
                .into(),
        ),
    })
}

fn collect(pairs: &[String], parse: impl Fn(&str, &str) -> Result<Change, String>) -> Result<Vec<Change>, String> {
    let mut changes = Vec::new();
    let mut problems = Vec::new();
    for pair in pairs {
        let Some((key, value)) = pair.split_once('=') else {
            problems.push(format!("invalid argument \"{pair}\": write KEY=VALUE"));
            continue;
        };
        match parse(key.trim(), value.trim()) {
            Ok(change) => changes.push(change),
            Err(fix) => problems.push(format!("invalid setting {pair}: {fix}")),
        }
    }
    if pairs.is_empty() {
        problems.push("no KEY=VALUE given: name at least one setting to change".into());
    }
    if problems.is_empty() {
        Ok(changes)
    } else {
        Err(problems.join("\n"))
    }
}

fn change(column: &'static str, value: impl Into<serde_json::Value>) -> Change {
    Change { column, value: value.into() }
}

fn boolean(value: &str) -> Result<bool, String> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err("write true or false".into()),
    }
}

fn positive(value: &str) -> Result<i64, String> {
    match value.parse::<i64>() {
        Ok(number) if number > 0 && number <= i64::from(i32::MAX) => Ok(number),
        _ => Err("write a whole number above 0".into()),
    }
}

fn fraction(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(number) if (0.0..=1.0).contains(&number) => Ok(number),
        _ => Err("write a number from 0 to 1".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn tenant_keys_parse() {
        let changes = tenant_changes(&args(&["outbound_enabled=false", "plan=growth", "burst=40"])).unwrap();
        let columns: Vec<&str> = changes.iter().map(|c| c.column).collect();
        assert_eq!(columns, vec!["outbound_enabled", "plan", "burst"]);
        assert_eq!(changes[0].value, serde_json::json!(false));
    }

    #[test]
    fn every_bad_pair_reported() {
        let err = tenant_changes(&args(&["outbound_enabled=maybe", "plan=gold", "colour=blue", "burst"])).unwrap_err();
        assert_eq!(err.lines().count(), 4, "{err}");
        assert!(err.contains("outbound_enabled=maybe: write true or false"));
        assert!(err.contains("plan=gold"));
        assert!(err.contains("colour=blue: unknown key"));
        assert!(err.contains("\"burst\": write KEY=VALUE"));
    }

    #[test]
    fn automation_keys_parse() {
        let now = Utc::now();
        let changes = automation_changes(&args(&["mode=live", "readiness_score=0.95", "revalidated=now"]), now).unwrap();
        assert_eq!(changes[2].column, "revalidated_at");
        assert_eq!(changes[2].value, serde_json::json!(now.to_rfc3339()));
        assert!(automation_changes(&args(&["readiness_threshold=1.5"]), now).unwrap_err().contains("from 0 to 1"));
        assert!(automation_changes(&args(&["mode=auto"]), now).is_err());
    }

    #[test]
    fn nothing_to_change_is_an_error() {
        assert!(tenant_changes(&[]).unwrap_err().contains("no KEY=VALUE"));
    }
}
