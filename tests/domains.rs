//! Domain onboarding against a real DNS server on loopback: `domain verify`, revalidation,
//! `domain diagnose`, key rotation and Ed25519 dual signing.

mod common;

use std::process::Output;
use std::time::Duration;

use base64::Engine as _;
use common::{assert_status, quoted_strings, request, DnsServer, TestEnv, Tenant};
use outbound::outcome::Status;
use uuid::Uuid;

fn json_of(output: &Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|err| panic!("{err}: {}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)))
}

fn succeeded(output: &Output) -> serde_json::Value {
    assert!(output.status.success(), "{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    json_of(output)
}

/// A tenant whose domain was added through the CLI but not verified.
struct Onboarded {
    tenant: Tenant,
    records: Vec<serde_json::Value>,
}

impl Onboarded {
    fn record(&self, prefix: &str) -> &serde_json::Value {
        self.records.iter().find(|r| r["name"].as_str().unwrap().starts_with(prefix)).unwrap_or_else(|| panic!("no record {prefix}"))
    }

    fn dkim_name(&self) -> String {
        let name = self.records.iter().find(|r| r["name"].as_str().unwrap().contains("._domainkey.")).expect("a DKIM record");
        name["name"].as_str().unwrap().to_string()
    }

    /// Returns the selector of the domain's first key.
    fn selector(&self) -> String {
        self.dkim_name().split("._domainkey.").next().expect("a selector").to_string()
    }

    fn args<'a>(&'a self, command: &'a str, owner: &'a str, tenant: &'a str) -> Vec<&'a str> {
        vec!["domain", command, "--tenant", tenant, "--domain", &self.tenant.domain, "--actor", owner, "--json"]
    }
}

async fn onboard(env: &mut TestEnv) -> Onboarded {
    let domain = format!("d{}.example", &Uuid::new_v4().simple().to_string()[..10]);
    let created = outbound::store::create_tenant(&env.pool, "DNS Store", &format!("owner@{domain}"), "starter").await.expect("tenant");
    let (tenant_id, owner) = (created.tenant_id.to_string(), created.owner_user_id.to_string());
    let added = succeeded(&env.cli(&["domain", "add", "--tenant", &tenant_id, "--domain", &domain, "--actor", &owner, "--json"], None));
    let public_key = added["public_key"].as_str().unwrap().to_string();
    env.public_keys.push(public_key.clone());
    let tenant = Tenant { tenant_id: created.tenant_id, owner: created.owner_user_id, domain, public_key };
    Onboarded { tenant, records: added["records"].as_array().unwrap().clone() }
}

/// Starts a test environment with a DNS server and one domain verified through it.
async fn verified_domain() -> (TestEnv, DnsServer, Onboarded) {
    let mut env = TestEnv::start().await;
    let mut dns = DnsServer::start(env.spool.path());
    let onboarded = onboard(&mut env).await;
    dns.publish(&onboarded.records);
    succeeded(&verify(&env, &dns, &onboarded));
    (env, dns, onboarded)
}

fn verify(env: &TestEnv, dns: &DnsServer, onboarded: &Onboarded) -> Output {
    let (tenant, owner) = (onboarded.tenant.tenant_id.to_string(), onboarded.tenant.owner.to_string());
    env.cli(&onboarded.args("verify", &owner, &tenant), Some(dns))
}

fn record_state<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["records"].as_array().unwrap().iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("no check of {name}: {report}"))
}

async fn domain_status(env: &TestEnv, domain: &str) -> String {
    sqlx::query_scalar("SELECT status FROM sending_domains WHERE domain = $1").bind(domain).fetch_one(&env.pool).await.expect("domain row")
}

/// Polls the domain's stored status until it is `expected`, as the worker's revalidation moves it.
async fn wait_for_status(env: &TestEnv, domain: &str, expected: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while domain_status(env, domain).await != expected {
        assert!(tokio::time::Instant::now() < deadline, "domain {domain} never became {expected}; worker log:\n{}", env.worker_log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn signed_messages(env: &TestEnv, message_id: &str) -> Vec<String> {
    env.received_with_message_id(message_id).iter().map(|r| base64::engine::general_purpose::STANDARD.encode(&r.content)).collect()
}

/// Returns the selectors and algorithms of a message's signatures, after dkimpy verified
/// each one against the key published in DNS.
fn verified_signers(env: &TestEnv, dns: &DnsServer, message_id: &str) -> Vec<(String, String)> {
    let messages = signed_messages(env, message_id);
    assert_eq!(messages.len(), 1, "one message with {message_id}");
    let report = common::verify_dkim_by_dns(&messages, dns).remove(0);
    let verified = report["verified"].as_array().expect("verified flags");
    assert!(!verified.is_empty() && verified.iter().all(|flag| flag == true), "a signature failed: {report}");
    report["signers"].as_array().unwrap().iter().map(|s| (s["s"].as_str().unwrap().to_string(), s["a"].as_str().unwrap().to_string())).collect()
}

fn public_key_of(record_value: &str) -> String {
    let joined: String = quoted_strings(record_value).concat();
    joined.split("p=").nth(1).expect("a p= tag").trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_split_record_enables_sending() {
    let mut env = TestEnv::start().await;
    let mut dns = DnsServer::start(env.spool.path());
    let onboarded = onboard(&mut env).await;
    sqlx::query("UPDATE tenants SET outbound_enabled = false WHERE id = $1").bind(onboarded.tenant.tenant_id).execute(&env.pool).await.unwrap();

    let dkim = onboarded.record(&onboarded.dkim_name());
    assert!(quoted_strings(dkim["value"].as_str().unwrap()).len() >= 2, "an RSA-2048 record is published as several strings");
    dns.publish(&onboarded.records);

    let report = succeeded(&verify(&env, &dns, &onboarded));
    assert_eq!(report["passed"], true);
    assert_eq!(report["status"], "verified");
    assert_eq!(record_state(&report, &onboarded.dkim_name())["state"], "pass");
    assert_eq!(domain_status(&env, &onboarded.tenant.domain).await, "verified");
    let enabled: bool = sqlx::query_scalar("SELECT outbound_enabled FROM tenants WHERE id = $1").bind(onboarded.tenant.tenant_id).fetch_one(&env.pool).await.unwrap();
    assert!(enabled, "verifying the domain enables outbound sending");
    let audited: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = 'domain.status' AND new_value = '\"verified\"' AND actor = $1")
        .bind(onboarded.tenant.owner.to_string())
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(audited, 1);

    env.start_worker();
    let sent = env.publish_and_wait(&request(&onboarded.tenant, &["customer@example.net"])).await;
    assert_status(&sent, Status::Sent, None);
    let signers = verified_signers(&env, &dns, sent.message_id.as_deref().unwrap());
    assert_eq!(signers.len(), 1);
    env.check_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_explains_each_broken_record() {
    let mut env = TestEnv::start().await;
    let mut dns = DnsServer::start(env.spool.path());
    let other_key = outbound::dkim::generate_key(outbound::dkim::Algorithm::Rsa).unwrap().public_base64;
    let other_record = outbound::dkim::dkim_record_value(outbound::dkim::Algorithm::Rsa, &other_key);

    // (what breaks, the record it concerns, its state, words of the explanation)
    type Break = fn(&mut DnsServer, &Onboarded, &str);
    let cases: Vec<(&str, Break, &str, &str, &str)> = vec![
        ("verification record missing", |dns: &mut DnsServer, o: &Onboarded, _: &str| dns.remove(&format!("_outbound-verification.{}", o.tenant.domain)), "_outbound-verification", "missing", "No verification record"),
        ("wrong token", |dns: &mut DnsServer, o: &Onboarded, _: &str| dns.set_txt(&format!("_outbound-verification.{}", o.tenant.domain), &["outbound-verification=0123456789abcdef"]), "_outbound-verification", "wrong_value", "another token"),
        ("DKIM key mismatched", |dns: &mut DnsServer, o: &Onboarded, other: &str| {
            let strings = quoted_strings(other);
            dns.set_txt(&o.dkim_name(), &strings.iter().map(String::as_str).collect::<Vec<_>>());
        }, "dkim", "wrong_value", "another public key"),
        ("DKIM record absent", |dns: &mut DnsServer, o: &Onboarded, _: &str| dns.remove(&o.dkim_name()), "dkim", "missing", "No DKIM record"),
        ("SPF without the include", |dns: &mut DnsServer, o: &Onboarded, _: &str| dns.set_txt(&o.tenant.domain, &["v=spf1 include:_spf.google.com ~all"]), "spf", "wrong_value", "does not include _spf.outbound.example"),
    ];

    for (case, break_it, record, state, words) in cases {
        let onboarded = onboard(&mut env).await;
        dns.publish(&onboarded.records);
        break_it(&mut dns, &onboarded, &other_record);

        let output = verify(&env, &dns, &onboarded);
        assert_eq!(output.status.code(), Some(1), "{case}: exit 1 when the domain is not verified");
        let report = json_of(&output);
        let name = match record {
            "dkim" => onboarded.dkim_name(),
            "spf" => onboarded.tenant.domain.clone(),
            prefix => format!("{prefix}.{}", onboarded.tenant.domain),
        };
        let check = record_state(&report, &name);
        assert_eq!(check["state"], state, "{case}: {check}");
        let explanation = check["explanation"].as_str().unwrap();
        assert!(explanation.contains(words), "{case}: {explanation}");
        let failing: Vec<_> = report["records"].as_array().unwrap().iter().filter(|r| r["required"] == true && r["state"] != "pass").collect();
        assert_eq!(failing.len(), 1, "{case}: only the broken record fails: {report}");
        assert!(String::from_utf8_lossy(&output.stderr).contains(&name), "{case}: stderr names the record");
        assert_eq!(domain_status(&env, &onboarded.tenant.domain).await, "pending", "{case}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_is_owner_only() {
    let mut env = TestEnv::start().await;
    let mut dns = DnsServer::start(env.spool.path());
    let onboarded = onboard(&mut env).await;
    dns.publish(&onboarded.records);
    let admin = outbound::store::add_member(&env.pool, onboarded.tenant.tenant_id, onboarded.tenant.owner, "admin@x.example", "admin").await.unwrap();

    let tenant = onboarded.tenant.tenant_id.to_string();
    let admin = admin.to_string();
    let mut dual_signing = onboarded.args("dual-signing", &admin, &tenant);
    dual_signing.insert(2, "on");
    let mut rotate_ed25519 = onboarded.args("rotate-key", &admin, &tenant);
    rotate_ed25519.extend(["--algorithm", "ed25519"]);
    for args in [onboarded.args("verify", &admin, &tenant), onboarded.args("rotate-key", &admin, &tenant), dual_signing, rotate_ed25519] {
        let denied = env.cli(&args, Some(&dns));
        assert_eq!(denied.status.code(), Some(3), "{args:?}");
        assert!(String::from_utf8_lossy(&denied.stderr).contains("permission denied: only the tenant owner can change outbound email settings"));
    }
    assert_eq!(domain_status(&env, &onboarded.tenant.domain).await, "pending");
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM dkim_keys").fetch_one(&env.pool).await.unwrap();
    assert_eq!(keys, 1, "no key added by a non-owner");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revalidation_suspends_then_verify_resumes() {
    let (mut env, mut dns, onboarded) = verified_domain().await;
    env.extra_env = vec![
        ("OUTBOUND_DNS_SERVERS".into(), dns.address()),
        ("OUTBOUND_DOMAINS__REVALIDATE_INTERVAL".into(), "1s".into()),
        ("OUTBOUND_DOMAINS__GRACE_PERIOD".into(), "5s".into()),
    ];
    // A domain the operator marked verified has no records here, and is not re-checked.
    let overridden = env.tenant(true).await;
    let domain = onboarded.tenant.domain.clone();

    dns.remove(&onboarded.dkim_name());
    let reverify = verify(&env, &dns, &onboarded);
    assert_eq!(reverify.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&reverify.stderr);
    assert!(stderr.contains("The domain stays verified"), "the owner's check leaves the status to revalidation: {stderr}");
    assert_eq!(domain_status(&env, &domain).await, "verified");

    env.start_worker();
    wait_for_status(&env, &domain, "failing").await;
    let in_grace = env.publish_and_wait(&request(&onboarded.tenant, &["customer@example.net"])).await;
    assert_status(&in_grace, Status::Sent, None);

    wait_for_status(&env, &domain, "suspended").await;
    let blocked = env.publish_and_wait(&request(&onboarded.tenant, &["customer@example.net"])).await;
    assert_status(&blocked, Status::Blocked, Some("domain_not_verified"));
    assert!(blocked.detail.contains("suspended"), "{}", blocked.detail);
    let actions: Vec<String> = sqlx::query_scalar("SELECT new_value #>> '{}' FROM audit_log WHERE action = 'domain.status' AND actor = 'revalidation' ORDER BY id")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(actions, vec!["failing", "suspended"]);

    // Restoring the record alone does not lift a suspension; the owner verifies again.
    dns.publish(&[onboarded.record(&onboarded.dkim_name()).clone()]);
    let report = succeeded(&verify(&env, &dns, &onboarded));
    assert_eq!(report["status"], "verified");
    let resumed = env.publish_and_wait(&request(&onboarded.tenant, &["customer@example.net"])).await;
    assert_status(&resumed, Status::Sent, None);

    let (_, metrics) = common::http_get(env.metrics_port, "/metrics");
    assert!(metrics.contains("outbound_domain_status_changes_total{status=\"suspended\"} 1"), "{metrics}");
    assert_eq!(env.received().len(), 2, "nothing sent while suspended");
    assert_eq!(domain_status(&env, &overridden.domain).await, "verified", "operator-verified domains are not revalidated");
    env.check_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_revalidation_changes_nothing() {
    let (mut env, dns, onboarded) = verified_domain().await;
    // A resolver that never responds: the records' state is unknown, not failing.
    drop(dns);
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    env.extra_env = vec![
        ("OUTBOUND_DNS_SERVERS".into(), silent.local_addr().unwrap().to_string()),
        ("OUTBOUND_DOMAINS__REVALIDATE_INTERVAL".into(), "1s".into()),
        ("OUTBOUND_DOMAINS__GRACE_PERIOD".into(), "1s".into()),
    ];
    env.start_worker();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        // The listener comes up with the worker; until then, there is nothing to read.
        let listening = std::net::TcpStream::connect(("127.0.0.1", env.metrics_port)).is_ok();
        let metrics = if listening { common::http_get(env.metrics_port, "/metrics").1 } else { String::new() };
        if metrics.contains("outbound_domain_checks_total{result=\"inconclusive\"}") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no inconclusive check; worker log:\n{}", env.worker_log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(domain_status(&env, &onboarded.tenant.domain).await, "verified");
}

fn diagnose(env: &TestEnv, dns: &DnsServer, domain: &str) -> Vec<(String, String, String)> {
    let report = succeeded(&env.cli(&["domain", "diagnose", "--domain", domain, "--json"], Some(dns)));
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["code"].as_str().unwrap().to_string(), f["severity"].as_str().unwrap().to_string(), f["finding"].as_str().unwrap().to_string()))
        .collect()
}

fn has(findings: &[(String, String, String)], code: &str, severity: &str) -> bool {
    findings.iter().any(|(c, s, _)| c == code && s == severity)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnose_finds_each_problem() {
    let mut env = TestEnv::start().await;
    let mut dns = DnsServer::start(env.spool.path());
    let onboarded = onboard(&mut env).await;
    let domain = onboarded.tenant.domain.clone();
    dns.publish(&onboarded.records);
    let good_spf = "v=spf1 include:_spf.outbound.example ~all";

    let all_good = diagnose(&env, &dns, &domain);
    for code in ["spf_ok", "dkim_ok", "dmarc_aligned"] {
        assert!(has(&all_good, code, "ok"), "{code}: {all_good:?}");
    }
    assert!(!all_good.iter().any(|(_, s, _)| s == "error"), "{all_good:?}");

    let published_dkim = quoted_strings(onboarded.record(&onboarded.dkim_name())["value"].as_str().unwrap());
    let other = outbound::dkim::generate_key(outbound::dkim::Algorithm::Rsa).unwrap().public_base64;
    let other_dkim = quoted_strings(&outbound::dkim::dkim_record_value(outbound::dkim::Algorithm::Rsa, &other));
    for i in 0..11 {
        dns.set_txt(&format!("i{i}.{domain}"), &["v=spf1 ip4:192.0.2.1 -all"]);
    }
    let eleven_includes: String = (0..11).map(|i| format!("include:i{i}.{domain} ")).collect();
    let over_limit = format!("v=spf1 {eleven_includes}include:_spf.outbound.example ~all");
    let reject = Some("v=DMARC1; p=reject");
    let void_first = format!("v=spf1 include:typo.{domain} include:_spf.outbound.example -all");
    let cases = [
        Zone { case: "no SPF", spf: vec![], dmarc: reject, dkim: Dkim::Published, code: "spf_missing", severity: "error" },
        Zone { case: "several SPF", spf: vec![good_spf, "v=spf1 -all"], dmarc: reject, dkim: Dkim::Published, code: "spf_multiple", severity: "error" },
        Zone { case: "SPF without include", spf: vec!["v=spf1 include:_spf.google.com -all"], dmarc: reject, dkim: Dkim::Published, code: "spf_include_missing", severity: "error" },
        Zone { case: "SPF over 10 lookups", spf: vec![&over_limit], dmarc: reject, dkim: Dkim::Published, code: "spf_too_many_lookups", severity: "error" },
        Zone { case: "DKIM missing", spf: vec![good_spf], dmarc: reject, dkim: Dkim::Absent, code: "dkim_missing", severity: "error" },
        Zone { case: "DKIM mismatch", spf: vec![good_spf], dmarc: reject, dkim: Dkim::Other(&other_dkim), code: "dkim_mismatch", severity: "error" },
        Zone { case: "no DMARC", spf: vec![good_spf], dmarc: None, dkim: Dkim::Published, code: "dmarc_missing", severity: "warning" },
        Zone { case: "DMARC p=none", spf: vec![good_spf], dmarc: Some("v=DMARC1; p=none"), dkim: Dkim::Published, code: "dmarc_policy_none", severity: "warning" },
        Zone { case: "SPF include of a void name", spf: vec![&void_first], dmarc: reject, dkim: Dkim::Published, code: "spf_include_void", severity: "error" },
        Zone { case: "neither SPF nor DKIM", spf: vec![], dmarc: reject, dkim: Dkim::Absent, code: "dmarc_fails", severity: "error" },
        Zone { case: "DMARC strict", spf: vec![good_spf], dmarc: Some("v=DMARC1; p=reject; adkim=s; aspf=s"), dkim: Dkim::Published, code: "dmarc_aligned", severity: "ok" },
    ];

    for zone in cases {
        dns.remove(&domain);
        for record in &zone.spf {
            dns.add_txt(&domain, &[record]);
        }
        match zone.dmarc {
            Some(dmarc) => dns.set_txt(&format!("_dmarc.{domain}"), &[dmarc]),
            None => dns.remove(&format!("_dmarc.{domain}")),
        }
        match zone.dkim {
            Dkim::Published => dns.set_txt(&onboarded.dkim_name(), &published_dkim.iter().map(String::as_str).collect::<Vec<_>>()),
            Dkim::Other(strings) => dns.set_txt(&onboarded.dkim_name(), &strings.iter().map(String::as_str).collect::<Vec<_>>()),
            Dkim::Absent => dns.remove(&onboarded.dkim_name()),
        }

        let findings = diagnose(&env, &dns, &domain);

        let (case, code, severity) = (zone.case, zone.code, zone.severity);
        assert!(has(&findings, code, severity), "{case}: expected {code} ({severity}) in {findings:?}");
        if code == "dmarc_aligned" {
            let (_, _, text) = findings.iter().find(|(c, _, _)| c == code).unwrap();
            assert!(text.contains("reject"), "{case}: names the policy: {text}");
            assert!(text.to_lowercase().contains("strict"), "{case}: names the alignment mode: {text}");
        }
    }
}

/// One zone for `diagnose`: the records at the domain, at `_dmarc` and at the DKIM
/// selector, and the finding expected.
struct Zone<'a> {
    case: &'a str,
    spf: Vec<&'a str>,
    dmarc: Option<&'a str>,
    dkim: Dkim<'a>,
    code: &'a str,
    severity: &'a str,
}

enum Dkim<'a> {
    Published,
    Other(&'a [String]),
    Absent,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_key_signs_once_published() {
    let (mut env, mut dns, onboarded) = verified_domain().await;
    env.start_worker();
    let (tenant, owner) = (onboarded.tenant.tenant_id.to_string(), onboarded.tenant.owner.to_string());
    let old_selector = onboarded.selector();

    let rotated = succeeded(&env.cli(&onboarded.args("rotate-key", &owner, &tenant), None));
    let new_selector = rotated["selector"].as_str().unwrap().to_string();
    assert_ne!(new_selector, old_selector);
    let new_record = rotated["records"][0].clone();
    env.public_keys.push(public_key_of(new_record["value"].as_str().unwrap()));

    // Before its record is published, the new key waits and the old one signs.
    let report = succeeded(&verify(&env, &dns, &onboarded));
    let new_key = report["keys"].as_array().unwrap().iter().find(|k| k["selector"] == new_selector.as_str()).unwrap();
    assert_eq!(new_key["state"], "pending");
    let before = env.publish_and_wait(&request(&onboarded.tenant, &["customer@example.net"])).await;
    assert_eq!(verified_signers(&env, &dns, before.message_id.as_deref().unwrap()), vec![(old_selector.clone(), "rsa-sha256".to_string())]);

    dns.publish(&[new_record]);
    let report = succeeded(&verify(&env, &dns, &onboarded));
    assert_eq!(report["keys_activated"], serde_json::json!([new_selector]));
    let old_key = report["keys"].as_array().unwrap().iter().find(|k| k["selector"] == old_selector.as_str()).unwrap().clone();
    assert_eq!(old_key["state"], "retired");
    assert_eq!(old_key["safe_to_remove"], false, "within the overlap: {old_key}");
    let retired_at: chrono::DateTime<chrono::Utc> = old_key["retired_at"].as_str().unwrap().parse().unwrap();
    let safe_at: chrono::DateTime<chrono::Utc> = old_key["safe_to_remove_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(safe_at - retired_at, chrono::Duration::hours(168), "the default overlap");

    let after = env.publish_and_wait(&request(&onboarded.tenant, &["customer@example.net"])).await;
    assert_eq!(verified_signers(&env, &dns, after.message_id.as_deref().unwrap()), vec![(new_selector.clone(), "rsa-sha256".to_string())]);

    // Deleting the old record within the overlap is reported: earlier messages would fail.
    let old_record = onboarded.record(&onboarded.dkim_name()).clone();
    dns.remove(&onboarded.dkim_name());
    let findings = diagnose(&env, &dns, &onboarded.tenant.domain);
    assert!(has(&findings, "dkim_retired_key", "warning"), "{findings:?}");
    dns.publish(&[old_record]);

    // Once the overlap has passed, the old selector is reported safe to remove.
    sqlx::query("UPDATE dkim_keys SET retired_at = retired_at - interval '168 hours 1 minute' WHERE selector = $1")
        .bind(&old_selector)
        .execute(&env.pool)
        .await
        .unwrap();
    let report = succeeded(&verify(&env, &dns, &onboarded));
    let old_key = report["keys"].as_array().unwrap().iter().find(|k| k["selector"] == old_selector.as_str()).unwrap();
    assert_eq!(old_key["safe_to_remove"], true);
    let findings = diagnose(&env, &dns, &onboarded.tenant.domain);
    let retired = findings.iter().find(|(code, _, _)| code == "dkim_retired_key").expect("the retired key is reported");
    assert!(retired.2.contains(&old_selector), "{retired:?}");
    assert!(retired.2.contains("overlap has passed"), "{retired:?}");
    env.check_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_signing_both_signatures_verify() {
    let (mut env, mut dns, onboarded) = verified_domain().await;
    env.start_worker();
    let (tenant, owner) = (onboarded.tenant.tenant_id.to_string(), onboarded.tenant.owner.to_string());
    let rsa_selector = onboarded.selector();

    let mut args = onboarded.args("dual-signing", &owner, &tenant);
    args.insert(2, "on");
    let mut rotate = onboarded.args("rotate-key", &owner, &tenant);
    rotate.extend(["--algorithm", "ed25519"]);
    let nothing_to_rotate = env.cli(&rotate, None);
    assert_eq!(nothing_to_rotate.status.code(), Some(2), "no Ed25519 key to rotate yet");
    let turned_on = succeeded(&env.cli(&args, None));
    let again = env.cli(&args, None);
    assert_eq!(again.status.code(), Some(2), "a second `on` is refused");
    assert!(String::from_utf8_lossy(&again.stderr).contains("waits for the DNS record"), "{}", String::from_utf8_lossy(&again.stderr));
    let ed_selector = turned_on["selector"].as_str().unwrap().to_string();
    let ed_record = turned_on["records"][0].clone();
    assert!(ed_record["value"].as_str().unwrap().contains("k=ed25519"));
    env.public_keys.push(public_key_of(ed_record["value"].as_str().unwrap()));
    dns.publish(&[ed_record]);
    let report = succeeded(&verify(&env, &dns, &onboarded));
    assert_eq!(report["keys_activated"], serde_json::json!([ed_selector]));

    let sent = env.publish_and_wait(&request(&onboarded.tenant, &["customer@example.net"])).await;
    let mut signers = verified_signers(&env, &dns, sent.message_id.as_deref().unwrap());
    signers.sort();
    let mut expected = vec![(rsa_selector.clone(), "rsa-sha256".to_string()), (ed_selector, "ed25519-sha256".to_string())];
    expected.sort();
    assert_eq!(signers, expected, "both signatures verify with the keys in DNS");

    args[2] = "off";
    succeeded(&env.cli(&args, None));
    let single = env.publish_and_wait(&request(&onboarded.tenant, &["customer@example.net"])).await;
    assert_eq!(verified_signers(&env, &dns, single.message_id.as_deref().unwrap()), vec![(rsa_selector, "rsa-sha256".to_string())]);
    env.check_contract();
}

/// Databases migrated before keys moved to `dkim_keys` keep every domain's key, and the
/// worker signs with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_keeps_existing_keys() {
    let database = format!("outbound_test_{}", &Uuid::new_v4().simple().to_string()[..10]);
    let admin = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/postgres").await.unwrap();
    sqlx::query(&format!("CREATE DATABASE \"{database}\"")).execute(&admin).await.unwrap();
    let pool = sqlx::PgPool::connect(&format!("postgres://postgres@127.0.0.1:5432/{database}")).await.unwrap();

    let before_keys = outbound::store::MIGRATOR.iter().filter(|m| m.version < 20261204000005).cloned().collect::<Vec<_>>();
    let earlier = sqlx::migrate::Migrator { migrations: std::borrow::Cow::Owned(before_keys), ..sqlx::migrate::Migrator::DEFAULT };
    earlier.run(&pool).await.unwrap();
    let tenant = outbound::store::create_tenant(&pool, "Old Store", "owner@old.example", "starter").await.unwrap();
    let key = outbound::dkim::generate_key(outbound::dkim::Algorithm::Rsa).unwrap();
    let sealed = outbound::dkim::encrypt_private_key(&common::key_bytes(), "old.example", &key.private_pkcs8);
    sqlx::query(
        "INSERT INTO sending_domains (id, tenant_id, domain, selector, dkim_private_key, dkim_public_key, verification_token, status)
         VALUES (gen_random_uuid(), $1, 'old.example', 'ob20260101', $2, $3, 'token', 'verified')",
    )
    .bind(tenant.tenant_id)
    .bind(&sealed)
    .bind(&key.public_base64)
    .execute(&pool)
    .await
    .unwrap();

    outbound::store::MIGRATOR.run(&pool).await.unwrap();

    let moved: (String, String, String, Vec<u8>, String) =
        sqlx::query_as("SELECT selector, algorithm, state, private_key, public_key FROM dkim_keys WHERE domain = 'old.example'").fetch_one(&pool).await.unwrap();
    assert_eq!(moved, ("ob20260101".into(), "rsa".into(), "active".into(), sealed, key.public_base64.clone()));
    let state = outbound::store::sender_state(&pool, tenant.tenant_id, "old.example").await.unwrap().expect("tenant");
    let domain = state.domain.expect("domain");
    assert_eq!(domain.status, outbound::domains::DomainStatus::Verified);
    assert_eq!(domain.active_keys.len(), 1);
    let private = outbound::dkim::decrypt_private_key(&common::key_bytes(), "old.example", &domain.active_keys[0].encrypted_private_key).unwrap();
    assert_eq!(private, key.private_pkcs8);

    pool.close().await;
    sqlx::query(&format!("DROP DATABASE \"{database}\" WITH (FORCE)")).execute(&admin).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_commands_reject_bad_input() {
    let mut env = TestEnv::start().await;
    let dns = DnsServer::start(env.spool.path());
    let onboarded = onboard(&mut env).await;
    let (tenant, owner) = (onboarded.tenant.tenant_id.to_string(), onboarded.tenant.owner.to_string());
    let unknown_tenant = Uuid::new_v4().to_string();

    let mut rotate_ed25519 = onboarded.args("rotate-key", &owner, &tenant);
    rotate_ed25519.extend(["--algorithm", "ed25519"]);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["domain", "verify", "--tenant", &unknown_tenant, "--domain", "x.example", "--actor", &owner], "not found"),
        (vec!["domain", "verify", "--tenant", &tenant, "--domain", "other.example", "--actor", &owner], "add it first with `outbound domain add`"),
        (vec!["domain", "verify", "--tenant", &tenant, "--domain", "not a domain!", "--actor", &owner], "invalid --domain"),
        (vec!["domain", "diagnose", "--domain", "not a domain!"], "invalid --domain"),
        (rotate_ed25519, "no Ed25519 key signs"),
    ];

    for (args, words) in cases {
        let output = env.cli(&args, Some(&dns));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(words), "{args:?}: {stderr}");
    }
}
