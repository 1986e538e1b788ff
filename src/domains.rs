//! Sending-domain onboarding: the DNS records a tenant publishes, checking them, and the
//! lifecycle that revalidation drives (verified, failing, suspended).
//!
//! The checks only read DNS and return data; the caller decides what to store. That keeps
//! every network call outside database transactions.

use chrono::{DateTime, Utc};

use crate::dkim::{self, Algorithm};
use crate::dns::{TxtAnswer, TxtSource};

/// The label under the domain that contains the verification token.
pub const VERIFICATION_LABEL: &str = "_outbound-verification";
const VERIFICATION_TAG: &str = "outbound-verification=";
const RECOMMENDED_DMARC: &str = "v=DMARC1; p=quarantine; adkim=r; aspf=r";

/// One DNS record to publish.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DnsRecord {
    pub name: String,
    #[serde(rename = "type")]
    pub record_type: String,
    /// The record's text as published: quoted strings of at most 255 octets.
    pub value: String,
    pub purpose: String,
    pub required: bool,
}

/// A DKIM key as the checks see it: no private part.
#[derive(Debug, Clone)]
pub struct KeyFacts {
    pub selector: String,
    pub algorithm: Algorithm,
    pub public_key: String,
    pub state: KeyState,
    pub retired_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    /// Made by `rotate-key` or by turning dual signing on; waits for its record.
    Pending,
    /// Signs every message.
    Active,
    /// Replaced; its record stays published for the overlap period.
    Retired,
}

impl KeyState {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "pending" => Some(KeyState::Pending),
            "active" => Some(KeyState::Active),
            "retired" => Some(KeyState::Retired),
            _ => None,
        }
    }
}

/// The facts about a domain that the checks need.
#[derive(Debug, Clone)]
pub struct DomainFacts {
    pub domain: String,
    pub verification_token: String,
    pub keys: Vec<KeyFacts>,
}

pub fn dkim_record_name(selector: &str, domain: &str) -> String {
    format!("{selector}._domainkey.{domain}")
}

/// Lists every record the owner publishes: the verification token, the DKIM record of each key
/// that signs or waits to sign, the SPF include and a recommended DMARC record.
pub fn records_to_publish(facts: &DomainFacts, spf_include: &str) -> Vec<DnsRecord> {
    let domain = &facts.domain;
    let mut records = vec![DnsRecord {
        name: format!("{VERIFICATION_LABEL}.{domain}"),
        record_type: "TXT".into(),
        value: format!("\"{VERIFICATION_TAG}{}\"", facts.verification_token),
        purpose: "proves the tenant controls the domain".into(),
        required: true,
    }];
    for key in facts.keys.iter().filter(|key| key.state != KeyState::Retired) {
        records.push(dkim_record(domain, key));
    }
    records.push(DnsRecord {
        name: domain.clone(),
        record_type: "TXT".into(),
        value: format!("\"v=spf1 include:{spf_include} ~all\""),
        purpose: "SPF: lets the platform's relays send for the domain (merge the include into an existing SPF record)".into(),
        required: true,
    });
    records.push(DnsRecord {
        name: format!("_dmarc.{domain}"),
        record_type: "TXT".into(),
        value: format!("\"{RECOMMENDED_DMARC}\""),
        purpose: "DMARC: recommended policy for mail that fails SPF and DKIM alignment".into(),
        required: false,
    });
    records
}

/// Builds the DKIM record of one key. The active keys' records are the required ones.
pub fn dkim_record(domain: &str, key: &KeyFacts) -> DnsRecord {
    DnsRecord {
        name: dkim_record_name(&key.selector, domain),
        record_type: "TXT".into(),
        value: dkim::dkim_record_value(key.algorithm, &key.public_key),
        purpose: key_purpose(key),
        required: key.state == KeyState::Active,
    }
}

fn key_purpose(key: &KeyFacts) -> String {
    match (key.state, key.algorithm) {
        (KeyState::Active, Algorithm::Rsa) => "DKIM public key (RSA) that receivers check signatures with".into(),
        (KeyState::Active, Algorithm::Ed25519) => "DKIM public key (Ed25519) of the second signature".into(),
        (_, Algorithm::Rsa) => "new DKIM key (RSA): signing moves to it once this record verifies".into(),
        (_, Algorithm::Ed25519) => "DKIM key (Ed25519) for dual signing: it signs once this record verifies".into(),
    }
}

/// The state of one record after a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordState {
    /// Found, and it contains what the service expects.
    Pass,
    /// The name has no such record.
    Missing,
    /// A record is there but contains something else.
    WrongValue,
    /// The lookup failed (timeout, SERVFAIL), so the record may be fine.
    NotVisible,
}

impl RecordState {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordState::Pass => "pass",
            RecordState::Missing => "missing",
            RecordState::WrongValue => "wrong_value",
            RecordState::NotVisible => "not_visible",
        }
    }
}

/// One record's check, with a sentence that states what was found and what to do.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecordCheck {
    pub name: String,
    #[serde(rename = "type")]
    pub record_type: String,
    pub purpose: &'static str,
    pub required: bool,
    pub state: RecordState,
    pub explanation: String,
    /// The DKIM key's selector, for DKIM records.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
}

/// Looks up every record of the domain. DKIM records are checked for the active and the
/// pending keys; the active ones are required.
pub async fn check_records(facts: &DomainFacts, spf_include: &str, dns: &dyn TxtSource) -> Vec<RecordCheck> {
    let domain = &facts.domain;
    let verification_name = format!("{VERIFICATION_LABEL}.{domain}");
    let dmarc_name = format!("_dmarc.{domain}");
    // The lookups run together, so a slow name server costs one timeout, not one per record.
    let ((verification, spf, dmarc), dkim_checks) =
        futures_util::join!(futures_util::future::join3(dns.txt(&verification_name), dns.txt(domain), dns.txt(&dmarc_name)), check_dkim(facts, dns));

    let expected = format!("{VERIFICATION_TAG}{}", facts.verification_token);
    let (state, explanation) = judge_verification(&verification, &expected);
    let mut checks =
        vec![RecordCheck { name: verification_name, record_type: "TXT".into(), purpose: "verification", required: true, state, explanation, selector: None }];
    checks.extend(dkim_checks);

    let (state, explanation) = evaluate_spf(domain, &spf, spf_include, dns).await;
    checks.push(RecordCheck { name: domain.clone(), record_type: "TXT".into(), purpose: "spf", required: true, state, explanation, selector: None });

    let (state, explanation) = judge_dmarc(&dmarc);
    checks.push(RecordCheck { name: dmarc_name, record_type: "TXT".into(), purpose: "dmarc", required: false, state, explanation, selector: None });
    checks
}

/// Looks up the DKIM record of every active and pending key. The active keys are required,
/// unless a pending key of the same algorithm is ready to replace them.
pub async fn check_dkim(facts: &DomainFacts, dns: &dyn TxtSource) -> Vec<RecordCheck> {
    let keys: Vec<&KeyFacts> = facts.keys.iter().filter(|key| key.state != KeyState::Retired).collect();
    let names: Vec<String> = keys.iter().map(|key| dkim_record_name(&key.selector, &facts.domain)).collect();
    let answers = futures_util::future::join_all(names.iter().map(|name| dns.txt(name))).await;

    let mut checks: Vec<RecordCheck> = keys
        .into_iter()
        .zip(names)
        .zip(answers)
        .map(|((key, name), answer)| {
            let (state, explanation) = judge_dkim(&answer, key);
            RecordCheck {
                name,
                record_type: "TXT".into(),
                purpose: "dkim",
                required: key.state == KeyState::Active,
                state,
                explanation,
                selector: Some(key.selector.clone()),
            }
        })
        .collect();
    hand_over_ready_keys(&mut checks, facts);
    checks
}

/// Makes a pending key whose record passes the required one of its algorithm, in place of
/// the active key it is about to replace: the owner may delete the old record first.
fn hand_over_ready_keys(checks: &mut [RecordCheck], facts: &DomainFacts) {
    let ready = keys_ready(checks, facts);
    let algorithm_of = |selector: &str| facts.keys.iter().find(|key| key.selector == selector).map(|key| key.algorithm);
    let replaced: Vec<Algorithm> = ready.iter().filter_map(|selector| algorithm_of(selector)).collect();
    for check in checks.iter_mut() {
        let Some(selector) = check.selector.clone() else { continue };
        if ready.contains(&selector) {
            check.required = true;
        } else if algorithm_of(&selector).is_some_and(|algorithm| replaced.contains(&algorithm)) {
            check.required = false;
        }
    }
}

fn absent(answer: &TxtAnswer, what: &str, publish: &str) -> Option<(RecordState, String)> {
    match answer {
        TxtAnswer::Records(_) => None,
        TxtAnswer::NoRecords { negative_ttl } => {
            let wait = match negative_ttl {
                Some(seconds) => format!(
                    " If you published it in the last {seconds} {}, resolvers may still return the old answer, so check again after that.",
                    if *seconds == 1 { "second" } else { "seconds" }
                ),
                None => String::new(),
            };
            Some((RecordState::Missing, format!("No {what} record at this name. Publish {publish}.{wait}")))
        }
        TxtAnswer::Unavailable(error) => Some((
            RecordState::NotVisible,
            format!(
                "The lookup failed ({error}), so the record's state is unknown: the domain's name servers or the resolvers did not answer. Check again later."
            ),
        )),
    }
}

fn judge_verification(answer: &TxtAnswer, expected: &str) -> (RecordState, String) {
    if let Some(absent) = absent(answer, "verification", &format!("\"{expected}\"")) {
        return absent;
    }
    let TxtAnswer::Records(records) = answer else { unreachable!("absent() handles the other answers") };
    if records.iter().any(|record| record.trim() == expected) {
        return (RecordState::Pass, "Found, and the token matches.".into());
    }
    match records.iter().find(|record| record.trim().starts_with(VERIFICATION_TAG)) {
        Some(other) => (
            RecordState::WrongValue,
            format!("The record holds another token ({}); replace its value with \"{expected}\". A token from an earlier `domain add` no longer counts.", other.trim()),
        ),
        None => (RecordState::WrongValue, format!("There are TXT records at this name, but none holds a token; add \"{expected}\".")),
    }
}

fn judge_dkim(answer: &TxtAnswer, key: &KeyFacts) -> (RecordState, String) {
    let expected = dkim::dkim_record_value(key.algorithm, &key.public_key);
    if let Some(absent) = absent(answer, "DKIM", &expected) {
        return absent;
    }
    let TxtAnswer::Records(records) = answer else { unreachable!("absent() handles the other answers") };
    let mut problem = None;
    for record in records {
        match dkim_record_matches(record, key) {
            Ok(()) if key.state == KeyState::Pending => return (RecordState::Pass, "Found, and the public key matches the new key.".into()),
            Ok(()) => return (RecordState::Pass, "Found, and the public key matches the key this service signs with.".into()),
            Err(why) => problem = Some(why),
        }
    }
    let why = problem.unwrap_or_else(|| "it is not a DKIM key record".into());
    (
        RecordState::WrongValue,
        format!("The record does not match: {why}. Receivers would fail every signature with selector {}. Publish exactly {expected}", key.selector),
    )
}

/// Compares a DKIM key record (strings already joined) with the stored key.
pub fn dkim_record_matches(record: &str, key: &KeyFacts) -> Result<(), String> {
    let tags = parse_tags(record);
    if tags.iter().any(|(name, value)| name == "v" && value != "DKIM1") {
        return Err("its v= tag is not DKIM1".into());
    }
    let published_type = tags.iter().find(|(name, _)| name == "k").map(|(_, value)| value.as_str()).unwrap_or("rsa");
    if published_type != key.algorithm.as_str() {
        return Err(format!("it says k={published_type}, and this key is {}", key.algorithm.as_str()));
    }
    let Some((_, published)) = tags.iter().find(|(name, _)| name == "p") else {
        return Err("it has no p= tag".into());
    };
    let published: String = published.split_whitespace().collect();
    if published.is_empty() {
        return Err("its p= tag is empty, which revokes the key".into());
    }
    if published != key.public_key {
        return Err("its p= value is another public key (a copy from an older key, or cut short)".into());
    }
    Ok(())
}

/// Splits a `tag=value; tag=value` list (DKIM, DMARC). Tag names are lower-cased.
pub fn parse_tags(record: &str) -> Vec<(String, String)> {
    record
        .split(';')
        .filter_map(|part| part.split_once('='))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect()
}

fn is_spf(record: &str) -> bool {
    let lower = record.trim_start().to_ascii_lowercase();
    lower == "v=spf1" || lower.starts_with("v=spf1 ")
}

fn judge_spf(answer: &TxtAnswer, spf_include: &str) -> (RecordState, String) {
    let suggested = format!("\"v=spf1 include:{spf_include} ~all\"");
    if let Some(absent) = absent(answer, "SPF", &suggested) {
        return absent;
    }
    let TxtAnswer::Records(records) = answer else { unreachable!("absent() handles the other answers") };
    let spf: Vec<&String> = records.iter().filter(|record| is_spf(record)).collect();
    match spf.as_slice() {
        [] => (RecordState::Missing, format!("There are TXT records here, but none is SPF (v=spf1). Publish {suggested}.")),
        [record] => {
            let accepted = [format!("include:{spf_include}"), format!("+include:{spf_include}"), format!("redirect={spf_include}")];
            let found = record.split_whitespace().any(|term| accepted.iter().any(|term_text| term.eq_ignore_ascii_case(term_text)));
            if found {
                (RecordState::Pass, format!("Found, and it includes {spf_include}."))
            } else {
                (
                    RecordState::WrongValue,
                    format!("The SPF record ({record}) does not include {spf_include}, so receivers do not accept the platform's relays for this domain. Add include:{spf_include} before its all term."),
                )
            }
        }
        _ => (
            RecordState::WrongValue,
            format!("There are {} SPF records; receivers treat that as a permanent error (RFC 7208). Merge them into one record that includes {spf_include}.", spf.len()),
        ),
    }
}

/// Judges the SPF record as a receiver evaluates it. [`judge_spf`] reads the record itself,
/// then the full evaluation follows its includes. An include reached through another one
/// passes. A record over the 10-lookup limit, or with an include of a name without SPF, fails
/// when that breaks the platform's mail.
async fn evaluate_spf(domain: &str, answer: &TxtAnswer, spf_include: &str, dns: &dyn TxtSource) -> (RecordState, String) {
    let (state, explanation) = judge_spf(answer, spf_include);
    let one_record = matches!(answer, TxtAnswer::Records(records) if records.iter().filter(|record| is_spf(record)).count() == 1);
    if !one_record {
        return (state, explanation);
    }

    let findings = crate::diagnose::check_spf_answer(domain, spf_include, answer, dns).await;
    let reached = findings.iter().any(|finding| finding.code == "spf_ok");
    let breaks_platform_mail = |finding: &&crate::diagnose::Finding| {
        matches!(finding.code, "spf_too_many_lookups" | "spf_include_void") && finding.severity == crate::diagnose::Severity::Error
    };
    let problem = findings.iter().find(breaks_platform_mail);

    if let Some(unavailable) = findings.iter().find(|finding| finding.code == "spf_unavailable") {
        if problem.is_none() {
            return (RecordState::NotVisible, unavailable.finding.clone());
        }
    }
    match (state, problem) {
        // The record names the include: only a broken evaluation can still fail it.
        (RecordState::Pass, Some(problem)) => {
            let fix = problem.fix.as_deref().unwrap_or_default();
            (RecordState::WrongValue, format!("{} {fix}", problem.finding))
        }
        (RecordState::WrongValue, None) if reached => (RecordState::Pass, format!("Found, and it reaches {spf_include} through one of its includes.")),
        _ => (state, explanation),
    }
}

fn judge_dmarc(answer: &TxtAnswer) -> (RecordState, String) {
    let suggested = format!("\"{RECOMMENDED_DMARC}\"");
    if let Some((state, text)) = absent(answer, "DMARC", &suggested) {
        return (state, format!("{text} It is recommended, not required."));
    }
    let TxtAnswer::Records(records) = answer else { unreachable!("absent() handles the other answers") };
    if records.iter().any(|record| record.trim_start().to_ascii_uppercase().starts_with("V=DMARC1")) {
        (RecordState::Pass, "Found. Run `outbound domain diagnose` for what its policy means.".into())
    } else {
        (RecordState::WrongValue, format!("There are TXT records here, but none starts with v=DMARC1. Publish {suggested}."))
    }
}

/// The verdict over all required records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conclusion {
    /// Every required record passes.
    Pass,
    /// A required record is missing or wrong.
    Fail,
    /// No required record fails, but at least one could not be looked up.
    Inconclusive,
}

pub fn conclude(checks: &[RecordCheck]) -> Conclusion {
    let required = || checks.iter().filter(|check| check.required);
    if required().any(|check| matches!(check.state, RecordState::Missing | RecordState::WrongValue)) {
        Conclusion::Fail
    } else if required().any(|check| check.state == RecordState::NotVisible) {
        Conclusion::Inconclusive
    } else {
        Conclusion::Pass
    }
}

/// Returns the selectors of pending keys whose records passed, so they may start signing.
pub fn keys_ready(checks: &[RecordCheck], facts: &DomainFacts) -> Vec<String> {
    facts
        .keys
        .iter()
        .filter(|key| key.state == KeyState::Pending)
        .filter(|key| checks.iter().any(|check| check.selector.as_deref() == Some(key.selector.as_str()) && check.state == RecordState::Pass))
        .map(|key| key.selector.clone())
        .collect()
}

/// A sending domain's status, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainStatus {
    Pending,
    Verified,
    Failing,
    Suspended,
}

impl DomainStatus {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "pending" => Some(DomainStatus::Pending),
            "verified" => Some(DomainStatus::Verified),
            "failing" => Some(DomainStatus::Failing),
            "suspended" => Some(DomainStatus::Suspended),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DomainStatus::Pending => "pending",
            DomainStatus::Verified => "verified",
            DomainStatus::Failing => "failing",
            DomainStatus::Suspended => "suspended",
        }
    }

    /// Returns whether mail may be sent from the domain. A failing domain keeps sending
    /// through its grace period.
    pub fn may_send(self) -> bool {
        matches!(self, DomainStatus::Verified | DomainStatus::Failing)
    }
}

/// The change one revalidation makes to a verified or failing domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Nothing changes (records pass on a verified domain, or the lookup was inconclusive,
    /// or a failing domain is still within its grace period).
    Stay,
    /// A required record stopped passing: the grace period starts now.
    StartFailing,
    /// The grace period ran out.
    Suspend,
    /// A failing domain's records pass again.
    Recover,
}

/// Decides the next state. An inconclusive lookup never changes anything: a resolver
/// outage on the platform's side must not suspend tenants.
pub fn revalidation_step(
    status: DomainStatus,
    conclusion: Conclusion,
    failing_since: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    grace: chrono::Duration,
) -> Transition {
    match (status, conclusion) {
        (_, Conclusion::Inconclusive) => Transition::Stay,
        (DomainStatus::Verified, Conclusion::Pass) => Transition::Stay,
        (DomainStatus::Verified, Conclusion::Fail) => Transition::StartFailing,
        (DomainStatus::Failing, Conclusion::Pass) => Transition::Recover,
        (DomainStatus::Failing, Conclusion::Fail) => match failing_since {
            Some(since) if now - since < grace => Transition::Stay,
            _ => Transition::Suspend,
        },
        // Pending and suspended domains change only through `domain verify`.
        (DomainStatus::Pending | DomainStatus::Suspended, _) => Transition::Stay,
    }
}

/// When a retired key's record may be deleted: after the overlap, messages signed with it
/// have long been checked by their receivers.
pub fn safe_to_remove_at(retired_at: DateTime<Utc>, overlap: chrono::Duration) -> DateTime<Utc> {
    retired_at + overlap
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::fixed::FixedTxt;

    fn facts() -> DomainFacts {
        DomainFacts {
            domain: "shop.example".into(),
            verification_token: "abc123".into(),
            keys: vec![KeyFacts {
                selector: "s1".into(),
                algorithm: Algorithm::Rsa,
                public_key: "MIIBIjANBgkqh".into(),
                state: KeyState::Active,
                retired_at: None,
            }],
        }
    }

    fn complete_zone() -> FixedTxt {
        FixedTxt::default()
            .with("_outbound-verification.shop.example", &["outbound-verification=abc123"])
            .with("s1._domainkey.shop.example", &["v=DKIM1; k=rsa; p=MIIBIjANBgkqh"])
            .with("shop.example", &["google-site-verification=x", "v=spf1 include:_spf.outbound.example ~all"])
            .with("_spf.outbound.example", &["v=spf1 ip4:198.51.100.0/24 -all"])
    }

    fn state_of(checks: &[RecordCheck], purpose: &str) -> RecordState {
        checks.iter().find(|check| check.purpose == purpose).expect("checked").state
    }

    #[tokio::test]
    async fn complete_zone_passes_without_dmarc() {
        let checks = check_records(&facts(), "_spf.outbound.example", &complete_zone()).await;
        assert_eq!(conclude(&checks), Conclusion::Pass);
        assert_eq!(state_of(&checks, "dmarc"), RecordState::Missing);
    }

    #[tokio::test]
    async fn each_broken_record_fails_with_its_state() {
        let cases = [
            ("_outbound-verification.shop.example", vec!["outbound-verification=old999"], "verification", RecordState::WrongValue, "old999"),
            ("s1._domainkey.shop.example", vec!["v=DKIM1; k=rsa; p=OTHERKEY"], "dkim", RecordState::WrongValue, "another public key"),
            ("s1._domainkey.shop.example", vec!["v=DKIM1; k=rsa; p="], "dkim", RecordState::WrongValue, "revokes"),
            ("shop.example", vec!["v=spf1 include:_spf.google.com ~all"], "spf", RecordState::WrongValue, "does not include _spf.outbound.example"),
            ("shop.example", vec!["v=spf1 -all", "v=spf1 include:_spf.outbound.example ~all"], "spf", RecordState::WrongValue, "2 SPF records"),
        ];
        for (name, records, purpose, state, phrase) in cases {
            let zone = complete_zone().with(name, &records);
            let checks = check_records(&facts(), "_spf.outbound.example", &zone).await;
            let check = checks.iter().find(|check| check.purpose == purpose).expect("checked");
            assert_eq!(check.state, state, "{name}: {}", check.explanation);
            assert!(check.explanation.contains(phrase), "{name}: {}", check.explanation);
            assert_eq!(conclude(&checks), Conclusion::Fail, "{name}");
        }
    }

    #[tokio::test]
    async fn spf_evaluation_follows_includes() {
        let nested = complete_zone()
            .with("shop.example", &["v=spf1 include:_spf.helpdesk.example -all"])
            .with("_spf.helpdesk.example", &["v=spf1 include:_spf.outbound.example -all"]);
        let checks = check_records(&facts(), "_spf.outbound.example", &nested).await;
        assert_eq!(state_of(&checks, "spf"), RecordState::Pass, "reached through a nested include");

        let includes: String = (0..10).map(|i| format!("include:i{i}.example ")).collect();
        let mut over_limit = complete_zone().with("shop.example", &[&format!("v=spf1 {includes}include:_spf.outbound.example ~all")]);
        for i in 0..10 {
            over_limit = over_limit.with(&format!("i{i}.example"), &["v=spf1 ip4:192.0.2.1 -all"]);
        }
        let checks = check_records(&facts(), "_spf.outbound.example", &over_limit).await;
        let spf = checks.iter().find(|check| check.purpose == "spf").expect("checked");
        assert_eq!(spf.state, RecordState::WrongValue);
        assert!(spf.explanation.contains("permerror"), "{}", spf.explanation);
    }

    #[tokio::test]
    async fn missing_record_mentions_negative_caching() {
        let mut zone = complete_zone();
        zone.answers.insert("s1._domainkey.shop.example".into(), TxtAnswer::NoRecords { negative_ttl: Some(300) });
        let checks = check_records(&facts(), "_spf.outbound.example", &zone).await;
        let dkim = checks.iter().find(|check| check.purpose == "dkim").expect("checked");
        assert_eq!(dkim.state, RecordState::Missing);
        assert!(dkim.explanation.contains("300 seconds"), "{}", dkim.explanation);
        assert!(dkim.explanation.contains("p=MIIBIjANBgkqh"), "says what to publish: {}", dkim.explanation);
    }

    #[tokio::test]
    async fn unanswered_lookup_is_inconclusive() {
        let mut zone = complete_zone();
        zone.answers.insert("shop.example".into(), TxtAnswer::Unavailable("timed out".into()));
        let checks = check_records(&facts(), "_spf.outbound.example", &zone).await;
        assert_eq!(state_of(&checks, "spf"), RecordState::NotVisible);
        assert_eq!(conclude(&checks), Conclusion::Inconclusive);
    }

    #[tokio::test]
    async fn pending_key_ready_only_when_its_record_passes() {
        let mut facts = facts();
        facts.keys.push(KeyFacts { selector: "s2".into(), algorithm: Algorithm::Ed25519, public_key: "ED".into(), state: KeyState::Pending, retired_at: None });
        let checks = check_records(&facts, "_spf.outbound.example", &complete_zone()).await;
        assert_eq!(conclude(&checks), Conclusion::Pass, "a pending key is not required");
        assert!(keys_ready(&checks, &facts).is_empty());

        let zone = complete_zone().with("s2._domainkey.shop.example", &["v=DKIM1; k=ed25519; p=ED"]);
        let checks = check_records(&facts, "_spf.outbound.example", &zone).await;
        assert_eq!(keys_ready(&checks, &facts), vec!["s2".to_string()]);
    }

    #[tokio::test]
    async fn ready_key_replaces_deleted_old_record() {
        let mut facts = facts();
        facts.keys.push(KeyFacts { selector: "s2".into(), algorithm: Algorithm::Rsa, public_key: "NEWKEY".into(), state: KeyState::Pending, retired_at: None });
        let mut zone = complete_zone().with("s2._domainkey.shop.example", &["v=DKIM1; k=rsa; p=NEWKEY"]);
        zone.answers.remove("s1._domainkey.shop.example");

        let checks = check_records(&facts, "_spf.outbound.example", &zone).await;

        assert_eq!(conclude(&checks), Conclusion::Pass, "the old record may go once the new one is there: {checks:#?}");
        let old = checks.iter().find(|check| check.selector.as_deref() == Some("s1")).expect("old key checked");
        assert!(!old.required);
        let new = checks.iter().find(|check| check.selector.as_deref() == Some("s2")).expect("new key checked");
        assert!(new.required);
    }

    #[test]
    fn dkim_type_must_match() {
        let key = &facts().keys[0];
        assert!(dkim_record_matches("v=DKIM1; p=MIIBIjANBgkqh", key).is_ok(), "k defaults to rsa");
        assert!(dkim_record_matches("v=DKIM1; k=rsa; p=MIIB IjANBgkqh", key).is_ok(), "whitespace in p= is ignored");
        assert!(dkim_record_matches("v=DKIM1; k=ed25519; p=MIIBIjANBgkqh", key).unwrap_err().contains("k=ed25519"));
    }

    #[test]
    fn revalidation_schedule() {
        let now = Utc::now();
        let grace = chrono::Duration::hours(72);
        let hours_ago = |h| Some(now - chrono::Duration::hours(h));
        use Conclusion::*;
        use DomainStatus::*;
        assert_eq!(revalidation_step(Verified, Pass, None, now, grace), Transition::Stay);
        assert_eq!(revalidation_step(Verified, Fail, None, now, grace), Transition::StartFailing);
        assert_eq!(revalidation_step(Verified, Inconclusive, None, now, grace), Transition::Stay);
        assert_eq!(revalidation_step(Failing, Fail, hours_ago(71), now, grace), Transition::Stay);
        assert_eq!(revalidation_step(Failing, Fail, hours_ago(72), now, grace), Transition::Suspend);
        assert_eq!(revalidation_step(Failing, Inconclusive, hours_ago(100), now, grace), Transition::Stay);
        assert_eq!(revalidation_step(Failing, Pass, hours_ago(100), now, grace), Transition::Recover);
        assert_eq!(revalidation_step(Suspended, Pass, hours_ago(100), now, grace), Transition::Stay);
        assert_eq!(revalidation_step(Pending, Fail, None, now, grace), Transition::Stay);
    }
}
