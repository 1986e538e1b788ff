//! The domain commands: `domain add`, `verify`, `rotate-key`, `dual-signing` and
//! `diagnose`. Each does its DNS lookups first and then one short transaction, so no
//! database transaction waits on DNS.

use chrono::{DateTime, Utc};
use rand::Rng as _;
use uuid::Uuid;

use crate::address::ascii_domain;
use crate::cli::CliError;
use crate::configuration::Settings;
use crate::diagnose::{self, Finding, Severity};
use crate::dkim::{self, Algorithm};
use crate::dns::{self, TxtSource};
use crate::domains::{self, Conclusion, DnsRecord, DomainStatus, KeyState, RecordCheck, RecordState};
use crate::store::{self, StoredDomain, StoredKey};

#[derive(Debug, Clone, serde::Serialize)]
pub struct AddedDomain {
    pub domain: String,
    pub selector: String,
    pub records: Vec<DnsRecord>,
    /// The DKIM public key (base64 SubjectPublicKeyInfo), as in the record's `p=` tag.
    pub public_key: String,
}

fn parse_domain(domain: &str) -> Result<String, CliError> {
    ascii_domain(domain).ok_or_else(|| CliError::Usage(format!("invalid --domain {domain}: write a host name like mail.example.com")))
}

/// Returns a selector that is new for the domain: a prefix, the date and random hex, so that
/// a rotation on the day of `domain add` does not collide.
fn new_selector(prefix: &str) -> String {
    format!("{prefix}{}{:04x}", Utc::now().format("%Y%m%d"), rand::thread_rng().gen::<u16>())
}

fn new_key(settings: &Settings, domain: &str, algorithm: Algorithm) -> Result<(dkim::GeneratedKey, Vec<u8>), CliError> {
    let kek = settings.keys.encryption_key.clone().expect("required at load");
    let key = dkim::generate_key(algorithm).map_err(|err| CliError::Runtime(err.into()))?;
    let encrypted = dkim::encrypt_private_key(&kek, domain, &key.private_pkcs8);
    Ok((key, encrypted))
}

/// Makes the domain's DKIM key and token, stores them (the key encrypted), and returns
/// the records to publish.
pub async fn add_domain(settings: &Settings, tenant: Uuid, domain: &str, actor: Uuid) -> Result<AddedDomain, CliError> {
    let domain = parse_domain(domain)?;
    let (key, encrypted) = new_key(settings, &domain, Algorithm::Rsa)?;
    let selector = new_selector("ob");
    let token = Uuid::new_v4().simple().to_string();
    let pool = store::connect(&settings.database, store::Patience::Once).await?;
    let new_key = store::NewKey { selector: &selector, algorithm: Algorithm::Rsa, encrypted_private_key: encrypted, public_key: &key.public_base64 };
    store::add_domain(&pool, store::NewDomain { tenant_id: tenant, actor, domain: &domain, verification_token: &token, key: new_key }).await?;

    let facts = domains::DomainFacts {
        domain: domain.clone(),
        verification_token: token,
        keys: vec![domains::KeyFacts {
            selector: selector.clone(),
            algorithm: Algorithm::Rsa,
            public_key: key.public_base64.clone(),
            state: KeyState::Active,
            retired_at: None,
        }],
    };
    let records = domains::records_to_publish(&facts, &settings.domains.spf_include);
    Ok(AddedDomain { domain, selector, records, public_key: key.public_base64 })
}

pub fn print_records(added: &AddedDomain) {
    println!("Publish these DNS records for {} (selector {}):\n", added.domain, added.selector);
    for record in &added.records {
        let required = if record.required { "required" } else { "recommended" };
        println!("{} {} ({required}: {})\n  {}\n", record.name, record.record_type, record.purpose, record.value);
    }
}

/// A DKIM key in a report, with when its record may be deleted.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyReport {
    pub selector: String,
    pub record_name: String,
    pub algorithm: Algorithm,
    pub state: KeyState,
    pub activated_at: Option<DateTime<Utc>>,
    pub retired_at: Option<DateTime<Utc>>,
    /// For retired keys: when the record may be deleted.
    pub safe_to_remove_at: Option<DateTime<Utc>>,
    pub safe_to_remove: bool,
}

fn key_reports(domain: &StoredDomain, overlap: std::time::Duration, now: DateTime<Utc>) -> Vec<KeyReport> {
    let overlap = chrono::Duration::from_std(overlap).unwrap_or(chrono::Duration::MAX);
    domain
        .keys
        .iter()
        .map(|key| {
            let safe_at = key.retired_at.map(|retired| domains::safe_to_remove_at(retired, overlap));
            KeyReport {
                selector: key.selector.clone(),
                record_name: domains::dkim_record_name(&key.selector, &domain.domain),
                algorithm: key.algorithm,
                state: key.state,
                activated_at: key.activated_at,
                retired_at: key.retired_at,
                safe_to_remove_at: safe_at,
                safe_to_remove: safe_at.is_some_and(|at| now >= at),
            }
        })
        .collect()
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub domain: String,
    /// True when every required record passes.
    pub passed: bool,
    /// True when a required record could not be looked up and none failed.
    pub inconclusive: bool,
    /// The domain's status after the check.
    pub status: &'static str,
    /// True when the operator marked the domain verified and revalidation skips it.
    pub operator_verified: bool,
    pub records: Vec<RecordCheck>,
    pub keys: Vec<KeyReport>,
    /// Pending keys that started signing with this check.
    pub keys_activated: Vec<String>,
}

async fn resolver(settings: &Settings) -> Result<dns::Resolver, CliError> {
    dns::Resolver::new(&settings.dns).map_err(|err| CliError::Runtime(err.into()))
}

/// `domain verify`: looks the records up, stores the outcome, and returns the report. The
/// domain becomes verified when every required record passes; pending keys whose records
/// pass start signing either way.
pub async fn verify(settings: &Settings, tenant: Uuid, domain: &str, actor: Uuid) -> Result<VerifyReport, CliError> {
    let domain = parse_domain(domain)?;
    let pool = store::connect(&settings.database, store::Patience::Once).await?;
    store::check_owner(&pool, tenant, actor).await?;
    let Some(stored) = store::find_domain(&pool, Some(tenant), &domain).await? else {
        return Err(CliError::Usage(format!("domain {domain} is not registered for tenant {tenant}; add it first with `outbound domain add`")));
    };

    let dns = resolver(settings).await?;
    let facts = stored.facts();
    let checks = domains::check_records(&facts, &settings.domains.spf_include, &dns).await;
    let conclusion = domains::conclude(&checks);
    let keys_ready = domains::keys_ready(&checks, &facts);

    let status = (conclusion == Conclusion::Pass).then_some(DomainStatus::Verified);
    let outcome = store::CheckOutcome {
        domain: &domain,
        status,
        checks: serde_json::to_value(&checks).unwrap_or_default(),
        keys_ready: &keys_ready,
    };
    store::record_verification(&pool, tenant, actor, outcome).await?;

    let after = store::find_domain(&pool, Some(tenant), &domain).await?.unwrap_or(stored);
    // The check's requirements already hand over from a replaced key to its successor; only
    // the explanation of the replaced key's record still speaks of a key that signs.
    let mut checks = checks;
    for check in checks.iter_mut().filter(|check| check.state == RecordState::Pass) {
        let key = after.keys.iter().find(|key| Some(&key.selector) == check.selector.as_ref());
        if key.is_some_and(|key| key.state == KeyState::Retired) {
            check.explanation = "Found. This key is retired by this check: keep its record until the overlap ends.".into();
        }
    }
    Ok(VerifyReport {
        domain,
        passed: conclusion == Conclusion::Pass,
        inconclusive: conclusion == Conclusion::Inconclusive,
        status: after.status.as_str(),
        operator_verified: after.operator_verified,
        records: checks,
        keys: key_reports(&after, settings.domains.key_overlap, Utc::now()),
        keys_activated: keys_ready,
    })
}

pub fn print_verify(report: &VerifyReport) {
    println!("DNS records of {}:\n", report.domain);
    for check in &report.records {
        let required = if check.required { "required" } else { "recommended" };
        println!("  [{}] {} {} ({required})", check.state.as_str(), check.name, check.record_type);
        println!("      {}", check.explanation);
    }
    println!("\nDKIM keys:");
    print_keys(&report.keys);
    for selector in &report.keys_activated {
        println!("\nThe key with selector {selector} signs from now on.");
    }
    if report.passed {
        println!("\ndomain {} is verified: every required record passes, and outbound sending is enabled for it.", report.domain);
    }
}

fn print_keys(keys: &[KeyReport]) {
    for key in keys {
        let note = match key.state {
            KeyState::Active => "the key this service signs with".to_string(),
            KeyState::Pending => "waits for its DNS record; it signs once the record verifies".to_string(),
            KeyState::Retired if key.safe_to_remove => "retired; safe to remove its DNS record now".to_string(),
            KeyState::Retired => format!(
                "retired; keep its DNS record until {} (messages signed with it may still be checked)",
                key.safe_to_remove_at.map(|at| at.format("%Y-%m-%dT%H:%M:%SZ").to_string()).unwrap_or_default()
            ),
        };
        println!("  {} ({}, {}): {note}", key.record_name, key.algorithm.as_str(), state_text(key.state));
    }
}

fn state_text(state: KeyState) -> &'static str {
    match state {
        KeyState::Pending => "pending",
        KeyState::Active => "active",
        KeyState::Retired => "retired",
    }
}

/// Why `domain verify` exits non-zero: the report was printed, and not every required
/// record passes.
pub fn verify_failure(report: &VerifyReport) -> CliError {
    let failing: Vec<&str> = report
        .records
        .iter()
        .filter(|check| check.required && check.state != RecordState::Pass)
        .map(|check| check.name.as_str())
        .collect();
    let (count, verb) = match failing.len() {
        1 => ("1 required record".to_string(), "does"),
        many => (format!("{many} required records"), "do"),
    };
    let names = failing.join(", ");
    let domain = &report.domain;
    let text = if report.inconclusive {
        format!(
            "the lookup of {count} failed ({names}), so the domain's status was not changed; check that OUTBOUND_DNS_SERVERS answer, and run `outbound domain verify` again later"
        )
    } else if report.operator_verified {
        format!(
            "{count} of {domain} {verb} not pass ({names}). The domain stays {} because the operator marked it verified, and revalidation does not check it. Fix the records and run `outbound domain verify` again: once they pass, revalidation checks the domain like any other",
            report.status
        )
    } else if report.status == "verified" {
        format!(
            "{count} of {domain} {verb} not pass ({names}). The domain stays verified for now: revalidation moves it to failing, then to suspended after the grace period. Fix the records and run `outbound domain verify` again"
        )
    } else if report.status == "failing" {
        format!(
            "{count} of {domain} {verb} not pass ({names}). The domain is failing: it is suspended when the grace period ends. Fix the records and run `outbound domain verify` again"
        )
    } else {
        format!("domain {domain} is not verified: {count} {verb} not pass ({names}); fix them as explained above and run `outbound domain verify` again")
    };
    CliError::Runtime(anyhow::anyhow!(text))
}

/// A key made by `rotate-key` or `dual-signing on`, with the record to publish.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NewKeyReport {
    pub domain: String,
    pub selector: String,
    pub algorithm: Algorithm,
    pub records: Vec<DnsRecord>,
    /// The key of the same algorithm that keeps signing until the new record verifies.
    pub replaces: Option<String>,
    /// How long the replaced key's record stays published after the switch, in seconds.
    pub overlap_seconds: u64,
}

/// What `add_key` is asked for: a rotation of the key of one algorithm, or the first
/// Ed25519 key of dual signing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRequest {
    Rotate(Algorithm),
    DualSigningOn,
}

impl KeyRequest {
    fn algorithm(self) -> Algorithm {
        match self {
            KeyRequest::Rotate(algorithm) => algorithm,
            KeyRequest::DualSigningOn => Algorithm::Ed25519,
        }
    }
}

/// Makes a pending key under a new selector. It signs once its record verifies (through
/// `domain verify` or the worker's revalidation). Tenant and owner are checked first, so
/// that others learn nothing about the keys.
pub async fn add_key(settings: &Settings, tenant: Uuid, domain: &str, actor: Uuid, request: KeyRequest) -> Result<NewKeyReport, CliError> {
    let domain = parse_domain(domain)?;
    let pool = store::connect(&settings.database, store::Patience::Once).await?;
    store::check_owner(&pool, tenant, actor).await?;
    let Some(stored) = store::find_domain(&pool, Some(tenant), &domain).await? else {
        return Err(CliError::Usage(format!("domain {domain} is not registered for tenant {tenant}; add it first with `outbound domain add`")));
    };
    check_ed25519_state(&stored, request)?;

    let algorithm = request.algorithm();
    let replaces = stored.keys.iter().find(|key| key.algorithm == algorithm && key.state == KeyState::Active).map(|key| key.selector.clone());
    let (key, encrypted) = new_key(settings, &domain, algorithm)?;
    let prefix = match algorithm {
        Algorithm::Rsa => "ob",
        Algorithm::Ed25519 => "ed",
    };
    let selector = new_selector(prefix);
    let new_key = store::NewKey { selector: &selector, algorithm, encrypted_private_key: encrypted, public_key: &key.public_base64 };
    store::add_pending_key(&pool, tenant, actor, &domain, new_key).await?;

    let facts = domains::KeyFacts { selector: selector.clone(), algorithm, public_key: key.public_base64, state: KeyState::Pending, retired_at: None };
    let mut record = domains::dkim_record(&domain, &facts);
    // The new key's record is what the owner must publish for the switch to happen.
    record.required = true;
    Ok(NewKeyReport { domain, selector, algorithm, records: vec![record], replaces, overlap_seconds: settings.domains.key_overlap.as_secs() })
}

/// Rejects Ed25519 requests that do not fit the domain's keys: a second `dual-signing on`
/// would silently rotate the key, and rotating a key that does not sign would turn dual
/// signing on by another name.
fn check_ed25519_state(stored: &StoredDomain, request: KeyRequest) -> Result<(), CliError> {
    let domain = &stored.domain;
    let ed25519 = stored.keys.iter().find(|key| key.algorithm == Algorithm::Ed25519 && key.state != KeyState::Retired);
    let message = match (request, ed25519) {
        (KeyRequest::Rotate(Algorithm::Rsa), _) | (KeyRequest::Rotate(Algorithm::Ed25519), Some(StoredKey { state: KeyState::Active, .. })) => return Ok(()),
        (KeyRequest::DualSigningOn, None) => return Ok(()),
        (KeyRequest::DualSigningOn, Some(key)) if key.state == KeyState::Active => format!(
            "dual signing is already on for {domain} (selector {}); to replace its key, run `outbound domain rotate-key --algorithm ed25519`",
            key.selector
        ),
        (KeyRequest::DualSigningOn, Some(key)) => format!(
            "dual signing for {domain} waits for the DNS record of selector {}; publish it and run `outbound domain verify`, or discard the key with `outbound domain dual-signing off`",
            key.selector
        ),
        (KeyRequest::Rotate(Algorithm::Ed25519), Some(key)) => format!(
            "the Ed25519 key of {domain} (selector {}) waits for its DNS record and does not sign yet; publish it and run `outbound domain verify`",
            key.selector
        ),
        (KeyRequest::Rotate(Algorithm::Ed25519), None) => {
            format!("no Ed25519 key signs for {domain}, so there is none to rotate; turn dual signing on with `outbound domain dual-signing on`")
        }
    };
    Err(CliError::Usage(message))
}

pub fn print_new_key(report: &NewKeyReport) {
    println!("New {} key for {} (selector {}). Publish this record, then run `outbound domain verify`:\n", report.algorithm.as_str(), report.domain, report.selector);
    for record in &report.records {
        println!("{} {}\n  {}\n", record.name, record.record_type, record.value);
    }
    let overlap = humantime::format_duration(std::time::Duration::from_secs(report.overlap_seconds));
    match &report.replaces {
        Some(old) => println!(
            "Until the record verifies, selector {old} keeps signing. After the switch, keep the record of {old} for {overlap} (domains.key_overlap): `domain verify` says when it is safe to remove."
        ),
        None => println!("Until the record verifies, messages carry no {} signature.", report.algorithm.as_str()),
    }
}

/// `dual-signing off`: stops the Ed25519 signature.
pub async fn stop_dual_signing(settings: &Settings, tenant: Uuid, domain: &str, actor: Uuid) -> Result<store::RetiredKeys, CliError> {
    let domain = parse_domain(domain)?;
    let pool = store::connect(&settings.database, store::Patience::Once).await?;
    store::check_owner(&pool, tenant, actor).await?;
    Ok(store::retire_keys(&pool, tenant, actor, &domain, Algorithm::Ed25519).await?)
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Diagnosis {
    pub domain: String,
    /// False when the domain is not a sending domain here: DKIM cannot be compared.
    pub registered: bool,
    pub findings: Vec<Finding>,
}

/// Runs `domain diagnose`: how receivers evaluate SPF, DKIM and DMARC, and how to fix it.
pub async fn diagnose(settings: &Settings, domain: &str) -> Result<Diagnosis, CliError> {
    let domain = parse_domain(domain)?;
    let pool = store::connect(&settings.database, store::Patience::Once).await?;
    let stored = store::find_domain(&pool, None, &domain).await?;
    let dns = resolver(settings).await?;

    let mut findings = diagnose::check_spf(&domain, &settings.domains.spf_include, &dns).await;
    findings.extend(dkim_findings(stored.as_ref(), settings, &dns).await);
    let mut dmarc = diagnose::check_dmarc(&domain, &dns).await;
    if stored.is_some() {
        dmarc_verdict(&findings, &mut dmarc);
    }
    findings.extend(dmarc);
    Ok(Diagnosis { domain, registered: stored.is_some(), findings })
}

/// Replaces the DMARC `ok` finding when SPF and DKIM are both known to fail for the
/// service's mail: DMARC needs one of them to pass, aligned, so receivers apply the policy.
fn dmarc_verdict(spf_and_dkim: &[Finding], dmarc: &mut [Finding]) {
    let passes = |code: &str| spf_and_dkim.iter().any(|finding| finding.code == code);
    if passes("spf_ok") || passes("dkim_ok") || passes("spf_unavailable") || passes("dkim_unavailable") {
        return;
    }
    let Some(aligned) = dmarc.iter().position(|finding| finding.code == "dmarc_aligned") else {
        return;
    };
    dmarc[aligned] = Finding {
        record: "DMARC",
        severity: Severity::Error,
        code: "dmarc_fails",
        finding: "Neither SPF nor DKIM passes for mail from this service, so DMARC fails for every message and receivers apply the domain's DMARC policy to it.".into(),
        fix: Some("Fix the SPF or DKIM errors above: either one passing is enough for DMARC.".into()),
    };
}

async fn dkim_findings(stored: Option<&StoredDomain>, settings: &Settings, dns: &dyn TxtSource) -> Vec<Finding> {
    let Some(stored) = stored else {
        return vec![Finding {
            record: "DKIM",
            severity: Severity::Warning,
            code: "dkim_domain_unknown",
            finding: "The domain is not a sending domain of this service, so there is no key to compare its DKIM records with.".into(),
            fix: Some("Add it with `outbound domain add` to get a key and the records to publish.".into()),
        }];
    };
    let facts = stored.facts();
    let checks = domains::check_dkim(&facts, dns).await;
    let mut findings: Vec<Finding> = checks
        .iter()
        .filter_map(|check| {
            let selector = check.selector.as_deref().unwrap_or_default();
            let key = facts.keys.iter().find(|key| key.selector == selector)?;
            let expected = dkim::dkim_record_value(key.algorithm, &key.public_key);
            Some(dkim_finding(check, selector, key.state == KeyState::Pending, &expected))
        })
        .collect();
    let retired: Vec<KeyReport> = key_reports(stored, settings.domains.key_overlap, Utc::now()).into_iter().filter(|key| key.state == KeyState::Retired).collect();
    let answers = futures_util::future::join_all(retired.iter().map(|key| dns.txt(&key.record_name))).await;
    for (key, answer) in retired.iter().zip(answers) {
        let published = match answer {
            crate::dns::TxtAnswer::Records(_) => true,
            crate::dns::TxtAnswer::NoRecords { .. } => false,
            // Unknown state: report only what is certain, the date until which to keep it.
            crate::dns::TxtAnswer::Unavailable(_) => true,
        };
        findings.push(retired_key_finding(key, published));
    }
    findings
}

/// Describes a retired key's record: keep it during the overlap, delete it after.
fn retired_key_finding(key: &KeyReport, published: bool) -> Finding {
    let until = key.safe_to_remove_at.map(|at| at.format("%Y-%m-%dT%H:%M:%SZ").to_string()).unwrap_or_default();
    let selector = &key.selector;
    let (severity, finding, fix) = match (key.safe_to_remove, published) {
        (true, true) => (
            Severity::Ok,
            format!("Selector {selector} is retired and its overlap has passed: nothing signs with it any more."),
            Some(format!("Delete the TXT record {}.", key.record_name)),
        ),
        (true, false) => (Severity::Ok, format!("Selector {selector} is retired and its record is gone, as it should be."), None),
        (false, true) => (Severity::Ok, format!("Selector {selector} is retired; keep its record until {until}, because receivers may still check messages signed with it."), None),
        (false, false) => (
            Severity::Warning,
            format!("Selector {selector} is retired, but its record is already gone: receivers that check a message signed with it before {until} fail that signature."),
            Some(format!("Publish the record at {} again until {until}, or accept those failures.", key.record_name)),
        ),
    };
    Finding { record: "DKIM", severity, code: "dkim_retired_key", finding, fix }
}

fn dkim_finding(check: &RecordCheck, selector: &str, pending: bool, expected: &str) -> Finding {
    let (severity, code, finding) = match (check.state, pending) {
        (RecordState::Pass, false) => (Severity::Ok, "dkim_ok", format!("Selector {selector}: the record matches the key that signs; signatures verify.")),
        (RecordState::Pass, true) => (
            Severity::Ok,
            "dkim_pending_ready",
            format!("Selector {selector}: the new key's record is published; the next `outbound domain verify` moves signing to it."),
        ),
        (RecordState::Missing, false) => (
            Severity::Error,
            "dkim_missing",
            format!("Selector {selector}: no DKIM record, so receivers fail every signature (dkim=permerror or fail) and DMARC can only pass through SPF."),
        ),
        (RecordState::WrongValue, false) => (
            Severity::Error,
            "dkim_mismatch",
            format!("Selector {selector}: the published key is not the one this service signs with, so receivers fail every signature."),
        ),
        (RecordState::NotVisible, _) => (Severity::Warning, "dkim_unavailable", format!("Selector {selector}: the lookup got no answer, so its state is unknown.")),
        (_, true) => (
            Severity::Warning,
            "dkim_pending_missing",
            format!("Selector {selector}: a new key waits for its record; until it is published, signing stays with the current key."),
        ),
    };
    let fix = match check.state {
        RecordState::Pass => None,
        RecordState::NotVisible => Some("Run the diagnosis again later.".to_string()),
        RecordState::Missing | RecordState::WrongValue => Some(format!("Publish exactly {expected} at {}.", check.name)),
    };
    Finding { record: "DKIM", severity, code, finding, fix }
}

pub fn print_diagnosis(diagnosis: &Diagnosis) {
    println!("What receivers see for {}:\n", diagnosis.domain);
    for finding in &diagnosis.findings {
        let severity = match finding.severity {
            Severity::Ok => "ok",
            Severity::Warning => "warning",
            Severity::Error => "error",
        };
        println!("  [{severity}] {} {}: {}", finding.record, finding.code, finding.finding);
        if let Some(fix) = &finding.fix {
            println!("      fix: {fix}");
        }
    }
}
